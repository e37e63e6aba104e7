//! A broker node dies (issue 15): three hamok peers in this process keep writing while the broker under
//! the leader's peer goes away, twice.
//!
//! - NATS: a 3-server NATS cluster of this test's own (`hamok_testkit::nats_cluster`, free loopback
//!   ports; the shared server on 4222 is not used), each peer's transport given only its own server's
//!   URL. Twice: the server the current leader's peer is connected to (read from the servers' `/connz`)
//!   is SIGKILLed, stays down for a while with writes going on, and is restarted on its ports and store.
//!   The NATS client learns the other servers' URLs from the cluster (`connect_urls` in the server's
//!   INFO) and fails over to one of them by itself. Only that reconnection of a live client uses them: a
//!   new link (the runtime's, after `max_disconnected`, or a restarted replica's) is made from the
//!   configured URLs alone, so with one URL it waits for that one server. A deployment gives every
//!   replica all the servers (`HAMOK_NATS_URL=nats://a:4222,nats://b:4222,nats://c:4222`); this test
//!   gives one, to show that the failover of a live link does not depend on it.
//! - RabbitMQ: each peer reaches the shared broker through its own loopback TCP proxy in this process
//!   (the broker itself is never touched). Twice: the leader's peer's proxy cuts its connections and
//!   refuses new ones for a while, with writes going on; the runtime makes a new link afterwards.
//!
//! Every peer runs a writer: map sets of a fresh key each, `w<peer>-<n>` = `n`, each recorded with its
//! outcome. Checked: writes are acknowledged again after each fault (within a bound), every
//! acknowledged write is in the final map of every peer with its value (and nothing was invented), the
//! peers converge to the same entries, and the transports of the peers that lost their broker count it
//! (NATS: `disconnects` and `reconnects`; RabbitMQ: `disconnects`, `links_lost` and a new link).
//!
//! A broker or `nats-server` that is missing fails the test with a message saying so: it never skips.
//! Time here is only ever a bound on a wait: nothing asserts how long something took.

/// The broker tests' helpers (`require_broker`, `host_port`, `Proxy`, `stats_line`), shared with
/// `transports/tests/`.
#[path = "../transports/tests/common/mod.rs"]
mod broker;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use broker::{host_port, require_broker, stats_line, Proxy};
use hamok::collections::{register_kinds, HamokCollections, HamokMap};
use hamok::runtime::transport::Transport;
use hamok::runtime::{Hamok, HamokEvent};
use hamok::transports::nats::NatsTransport;
use hamok::transports::rabbitmq::{AmqpTransport, AMQP_URL_ENV, DEFAULT_AMQP_URL};
use hamok::transports::TransportStats;
use hamok_testkit::cluster::{
    agreed_leader, close_all, join_all_at_once, pid, unique_id, wait_membership,
};
use hamok_testkit::nats_cluster::NatsCluster;
use hamok_testkit::wait::{eventually, WAIT};
use tokio::sync::broadcast;
use tokio::task::JoinHandle;

/// Peers (and, for NATS, servers).
const PEERS: usize = 3;
/// Faults per test.
const ROUNDS: usize = 2;
/// How long a killed server stays down (or a cut connection stays cut) at least.
const DOWN: Duration = Duration::from_secs(2);
/// Bound for writes to be acknowledged again after a fault, and for every writer after the heal.
const RESUME: Duration = Duration::from_secs(30);
/// Acknowledged writes, started after the fault, that count as "writes go on".
const WRITES_AFTER_FAULT: usize = 10;
/// Acknowledged writes before the first fault.
const WRITES_BEFORE: usize = 20;
/// Pause of a writer between two writes (after a failed one: `PACE * 5`).
const PACE: Duration = Duration::from_millis(10);
/// Bound for the writers to finish their last write once told to stop (a write is bounded by the
/// request timeout, 5 s).
const STOP: Duration = Duration::from_secs(20);
/// The map every writer writes to.
const MAP: &str = "writes";

type Map = HamokMap<String, u64>;

// -------------------------------------------------------------------------------------------------
// Peers and writers
// -------------------------------------------------------------------------------------------------

/// Builds peer `i` of `cluster` on `transport` (production timings), joins all at once, opens the map
/// on every peer; waits for one leader and a complete membership.
async fn start_peers<T: Transport + Clone>(
    cluster: &str,
    transports: &[T],
) -> (Vec<Hamok>, Vec<Map>) {
    let mut peers = Vec::new();
    for (i, t) in transports.iter().enumerate() {
        let peer = register_kinds(
            Hamok::builder()
                .peer_id(pid(i))
                .cluster_id(cluster)
                .transport(t.clone()),
        )
        .build()
        .await
        .unwrap_or_else(|e| panic!("build peer {}: {e}", pid(i)));
        peers.push(peer);
    }
    join_all_at_once(&peers).await;
    agreed_leader(&peers).await;
    wait_membership(&peers).await;
    let mut maps = Vec::new();
    for p in &peers {
        maps.push(
            p.get_or_create_map::<String, u64>(MAP)
                .await
                .unwrap_or_else(|e| panic!("open map on {}: {e}", p.local_peer_id())),
        );
    }
    (peers, maps)
}

/// One write and what came of it.
#[derive(Debug, Clone)]
struct Record {
    writer: usize,
    key: String,
    value: u64,
    started: Instant,
    /// `Ok(previous value)` (acknowledged), or the error (outcome unknown: maybe applied, maybe not).
    outcome: Result<Option<u64>, String>,
}

/// One writer per peer, each setting fresh keys through its peer until stopped.
struct Writers {
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<Vec<Record>>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Writers {
    fn start(maps: &[Map]) -> Writers {
        let stop = Arc::new(AtomicBool::new(false));
        let log: Arc<Mutex<Vec<Record>>> = Arc::default();
        let tasks = maps
            .iter()
            .cloned()
            .enumerate()
            .map(|(writer, map)| {
                let stop = stop.clone();
                let log = log.clone();
                tokio::spawn(async move {
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        n += 1;
                        let key = format!("w{writer}-{n:06}");
                        let started = Instant::now();
                        let outcome = map.set(key.clone(), n).await.map_err(|e| e.to_string());
                        let failed = outcome.is_err();
                        log.lock().unwrap().push(Record {
                            writer,
                            key,
                            value: n,
                            started,
                            outcome,
                        });
                        tokio::time::sleep(if failed { PACE * 5 } else { PACE }).await;
                    }
                })
            })
            .collect();
        Writers { stop, log, tasks }
    }

    /// Acknowledged writes started at or after `t`, per writer.
    fn acked_since(&self, t: Instant) -> Vec<usize> {
        let mut per = vec![0; self.tasks.len()];
        for r in self.log.lock().unwrap().iter() {
            if r.started >= t && r.outcome.is_ok() {
                per[r.writer] += 1;
            }
        }
        per
    }

    /// Writes answered with an error so far.
    fn failed(&self) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.outcome.is_err())
            .count()
    }

    /// Waits (up to `bound`) until `n` writes started at or after `t` were acknowledged, by any writer.
    async fn wait_acked(&self, what: &str, t: Instant, n: usize, bound: Duration) {
        eventually(
            &format!("{n} acknowledged writes started {what}"),
            bound,
            || {
                let got: usize = self.acked_since(t).iter().sum();
                async move { (got >= n).then_some(()) }
            },
        )
        .await;
    }

    /// Waits (up to `bound`) until every writer has an acknowledged write started at or after `t`.
    async fn wait_every_writer(&self, what: &str, t: Instant, bound: Duration) {
        eventually(
            &format!("every writer to have a write acknowledged {what}"),
            bound,
            || {
                let all = self.acked_since(t).iter().all(|n| *n > 0);
                async move { all.then_some(()) }
            },
        )
        .await;
    }

    /// Stops the writers (each finishes its write in progress) and returns every write.
    async fn stop(self) -> Vec<Record> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            tokio::time::timeout(STOP, t)
                .await
                .unwrap_or_else(|_| panic!("a writer did not stop within {STOP:?}"))
                .expect("writer task");
        }
        let log = self.log.lock().unwrap();
        log.clone()
    }
}

/// The membership and leadership events of every peer, with when they came (for the report; nothing is
/// asserted on them).
struct EventLog {
    log: Arc<Mutex<Vec<String>>>,
    tasks: Vec<JoinHandle<()>>,
}

impl EventLog {
    fn start(peers: &[Hamok], since: Instant) -> EventLog {
        let log: Arc<Mutex<Vec<String>>> = Arc::default();
        let tasks = peers
            .iter()
            .map(|p| {
                let mut events = p.events();
                let id = p.local_peer_id().to_string();
                let log = log.clone();
                tokio::spawn(async move {
                    loop {
                        let e = match events.recv().await {
                            Ok(e) => e,
                            Err(broadcast::error::RecvError::Lagged(_)) => continue,
                            Err(broadcast::error::RecvError::Closed) => return,
                        };
                        if matches!(
                            e,
                            HamokEvent::Commit(_)
                                | HamokEvent::Heartbeat
                                | HamokEvent::StateChanged { .. }
                                | HamokEvent::Follower
                                | HamokEvent::Candidate
                        ) {
                            continue;
                        }
                        let at = since.elapsed().as_millis();
                        log.lock().unwrap().push(format!("+{at} ms {id}: {e:?}"));
                    }
                })
            })
            .collect();
        EventLog { log, tasks }
    }

    fn print(self, tag: &str) {
        for t in &self.tasks {
            t.abort();
        }
        for line in self.log.lock().unwrap().iter() {
            println!("[{tag}] event {line}");
        }
    }
}

/// Waits (up to [`WAIT`]) until every peer, after a `sync`, holds the same entries; returns them.
async fn converged(maps: &[Map]) -> BTreeMap<String, u64> {
    eventually(
        "every peer to hold the same entries after sync",
        WAIT,
        || async move {
            let mut states = Vec::new();
            for m in maps {
                m.sync().await.ok()?;
                states.push(m.entries().ok()?.into_iter().collect::<BTreeMap<_, _>>());
            }
            states
                .windows(2)
                .all(|w| w[0] == w[1])
                .then(|| states.swap_remove(0))
        },
    )
    .await
}

/// Every acknowledged write is in `state` with its value, acknowledged on a fresh key (no previous
/// value), and every entry of `state` is a write some writer made.
fn check_no_acknowledged_write_lost(tag: &str, records: &[Record], state: &BTreeMap<String, u64>) {
    let acked: Vec<&Record> = records.iter().filter(|r| r.outcome.is_ok()).collect();
    let lost: Vec<String> = acked
        .iter()
        .filter(|r| state.get(&r.key) != Some(&r.value))
        .map(|r| format!("{}={} (found {:?})", r.key, r.value, state.get(&r.key)))
        .collect();
    assert!(
        lost.is_empty(),
        "[{tag}] {} of {} acknowledged writes are not in the converged map, e.g. {:?}",
        lost.len(),
        acked.len(),
        &lost[..lost.len().min(10)]
    );
    let overwrote: Vec<&&Record> = acked
        .iter()
        .filter(|r| !matches!(r.outcome, Ok(None)))
        .collect();
    assert!(
        overwrote.is_empty(),
        "[{tag}] writes of fresh keys answered with a previous value (applied twice?): {:?}",
        &overwrote[..overwrote.len().min(10)]
    );
    let made: BTreeMap<&str, u64> = records.iter().map(|r| (r.key.as_str(), r.value)).collect();
    let invented: Vec<(&String, &u64)> = state
        .iter()
        .filter(|(k, v)| made.get(k.as_str()) != Some(*v))
        .collect();
    assert!(
        invented.is_empty(),
        "[{tag}] entries no writer wrote: {:?}",
        &invented[..invented.len().min(10)]
    );
}

/// The end of a scenario: writers stopped, peers converged, the checks, the figures printed.
async fn finish(
    tag: &str,
    peers: &[Hamok],
    maps: &[Map],
    writers: Writers,
    events: EventLog,
    transports: &[TransportStats],
) {
    let records = writers.stop().await;
    agreed_leader(peers).await;
    wait_membership(peers).await;
    let state = converged(maps).await;
    check_no_acknowledged_write_lost(tag, &records, &state);
    let acked = records.iter().filter(|r| r.outcome.is_ok()).count();
    let failed: Vec<&Record> = records.iter().filter(|r| r.outcome.is_err()).collect();
    let unknown_present = failed.iter().filter(|r| state.contains_key(&r.key)).count();
    println!(
        "[{tag}] {} writes: {acked} acknowledged, {} failed (outcome unknown; {unknown_present} of them \
         applied after all); {} entries on every peer",
        records.len(),
        failed.len(),
        state.len()
    );
    for r in failed.iter().take(5) {
        println!("[{tag}]   failed: {} ({:?})", r.key, r.outcome);
    }
    events.print(tag);
    for p in peers {
        println!("[{tag}] {}", stats_line(&p.stats()));
    }
    for (i, s) in transports.iter().enumerate() {
        println!("[{tag}] transport {}: {s:?}", pid(i));
    }
}

// -------------------------------------------------------------------------------------------------
// NATS: a server of the cluster is SIGKILLed
// -------------------------------------------------------------------------------------------------

/// The name the NATS server shows for peer `i`'s connection (the transport's default).
fn connection_name(cluster: &str, i: usize) -> String {
    format!("hamok {cluster}/{}", pid(i))
}

/// The peers connected to each server now (`None` for a server not running or not answering).
async fn peers_by_server(
    nats: &NatsCluster,
    down: Option<usize>,
    cluster: &str,
) -> Vec<Option<Vec<usize>>> {
    let mut out = Vec::new();
    for s in 0..nats.len() {
        if Some(s) == down {
            out.push(None);
            continue;
        }
        out.push(nats.connection_names(s).await.ok().map(|names| {
            (0..PEERS)
                .filter(|i| names.contains(&connection_name(cluster, *i)))
                .collect()
        }));
    }
    out
}

/// Waits (up to [`WAIT`]) until every peer is connected to exactly one server (`down`, if any, is
/// not running); returns each peer's.
async fn server_of_each_peer(nats: &NatsCluster, down: Option<usize>, cluster: &str) -> Vec<usize> {
    eventually(
        "every peer connected to exactly one NATS server",
        WAIT,
        || async move {
            let by_server = peers_by_server(nats, down, cluster).await;
            let mut of = vec![Vec::new(); PEERS];
            for (s, peers) in by_server.iter().enumerate() {
                if Some(s) == down {
                    continue;
                }
                for &i in peers.as_ref()? {
                    of[i].push(s);
                }
            }
            of.iter()
                .all(|servers| servers.len() == 1)
                .then(|| of.iter().map(|servers| servers[0]).collect())
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_server_of_the_leader_killed_twice_writes_go_on_nothing_acknowledged_lost() {
    let tag = "nats-death";
    let began = Instant::now();
    let mut nats = NatsCluster::start(PEERS).await.unwrap_or_else(|e| {
        panic!("this test needs its own 3-server NATS cluster (nats-server on loopback): {e}")
    });
    println!(
        "[{tag}] NATS cluster {} up in {:?}: {:?}",
        nats.name(),
        began.elapsed(),
        nats.client_urls()
    );
    let cluster = unique_id("death");
    // Each peer is given only its own server: it learns the others from the cluster.
    let transports: Vec<NatsTransport> = (0..PEERS)
        .map(|i| {
            NatsTransport::builder()
                .server(nats.client_url(i))
                .build()
                .expect("NATS transport settings")
        })
        .collect();
    let (peers, maps) = start_peers(&cluster, &transports).await;
    let on = server_of_each_peer(&nats, None, &cluster).await;
    assert_eq!(
        on,
        (0..PEERS).collect::<Vec<_>>(),
        "each peer on its server"
    );
    println!("[{tag}] peers formed {:?} after the start", began.elapsed());

    let events = EventLog::start(&peers, began);
    let writers = Writers::start(&maps);
    writers
        .wait_acked("before the first kill", began, WRITES_BEFORE, WAIT)
        .await;

    for round in 1..=ROUNDS {
        let leader = agreed_leader(&peers).await;
        let on = server_of_each_peer(&nats, None, &cluster).await;
        let victim = on[leader];
        let affected: Vec<usize> = (0..PEERS).filter(|&i| on[i] == victim).collect();
        let before: Vec<TransportStats> = transports.iter().map(|t| t.stats()).collect();

        let killed = Instant::now();
        nats.kill(victim)
            .unwrap_or_else(|e| panic!("SIGKILL of NATS server {victim}: {e}"));
        println!(
            "[{tag}] round {round}: SIGKILLed server {victim} ({}), leader {}'s; peers on it: {:?}",
            nats.server_name(victim),
            pid(leader),
            affected.iter().map(|&i| pid(i)).collect::<Vec<_>>()
        );
        writers
            .wait_acked("after the kill", killed, WRITES_AFTER_FAULT, RESUME)
            .await;
        let resumed = killed.elapsed();
        // The peers that were on the killed server count the loss and the failover.
        for &i in &affected {
            let t = transports[i].clone();
            let was = before[i];
            eventually(
                &format!(
                    "{}'s transport to count a disconnect and a reconnect",
                    pid(i)
                ),
                WAIT,
                || {
                    let s = t.stats();
                    async move {
                        (s.disconnects > was.disconnects && s.reconnects > was.reconnects)
                            .then_some(())
                    }
                },
            )
            .await;
        }
        let moved = server_of_each_peer(&nats, Some(victim), &cluster).await;
        for &i in &affected {
            assert_ne!(moved[i], victim, "{} still on the killed server", pid(i));
        }
        tokio::time::sleep(DOWN.saturating_sub(killed.elapsed())).await;
        let down_for = killed.elapsed();

        let restarting = Instant::now();
        nats.restart(victim)
            .await
            .unwrap_or_else(|e| panic!("restart of NATS server {victim}: {e}"));
        let ready = restarting.elapsed();
        let healed = Instant::now();
        writers
            .wait_every_writer("after the restart", healed, RESUME)
            .await;
        println!(
            "[{tag}] round {round}: {WRITES_AFTER_FAULT} writes acknowledged {resumed:?} after the kill; \
             server down {down_for:?}, ready {ready:?} after its restart; peers now on servers {moved:?}; \
             every writer acknowledged again {:?} after the restart; {} failed writes so far",
            healed.elapsed(),
            writers.failed()
        );
        for &i in &affected {
            let s = transports[i].stats();
            println!(
                "[{tag}] round {round}: {}: disconnects {} -> {}, reconnects {} -> {}, links opened {} \
                 lost {}, dropped while down {}",
                pid(i),
                before[i].disconnects,
                s.disconnects,
                before[i].reconnects,
                s.reconnects,
                s.links_opened,
                s.links_lost,
                s.dropped_link_down
            );
        }
    }

    let stats: Vec<TransportStats> = transports.iter().map(|t| t.stats()).collect();
    finish(tag, &peers, &maps, writers, events, &stats).await;
    close_all(&peers).await;
    drop(nats);
    println!("[{tag}] took {:?}", began.elapsed());
}

// -------------------------------------------------------------------------------------------------
// RabbitMQ: the leader's peer loses its connection (a proxy in this process cuts it)
// -------------------------------------------------------------------------------------------------

/// `url` with its `host:port` replaced by `addr`.
fn via(url: &str, addr: &str) -> String {
    let hp = host_port(url, 5672);
    if url.contains(&hp) {
        url.replacen(&hp, addr, 1)
    } else {
        let host = hp.rsplit_once(':').map(|(h, _)| h).unwrap_or(&hp);
        url.replacen(host, addr, 1)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_connection_of_the_leader_cut_twice_writes_go_on_nothing_acknowledged_lost() {
    let tag = "amqp-cut";
    let began = Instant::now();
    let url = require_broker("RabbitMQ", AMQP_URL_ENV, DEFAULT_AMQP_URL, 5672).await;
    let upstream = host_port(&url, 5672);
    let mut proxies = Vec::new();
    for _ in 0..PEERS {
        proxies.push(Arc::new(Proxy::start(upstream.clone()).await));
    }
    let cluster = unique_id("cut");
    let transports: Vec<AmqpTransport> = proxies
        .iter()
        .map(|p| {
            AmqpTransport::builder()
                .url(via(&url, &p.addr))
                .build()
                .expect("AMQP transport settings")
        })
        .collect();
    let (peers, maps) = start_peers(&cluster, &transports).await;
    println!("[{tag}] peers formed {:?} after the start", began.elapsed());

    let events = EventLog::start(&peers, began);
    let writers = Writers::start(&maps);
    writers
        .wait_acked("before the first cut", began, WRITES_BEFORE, WAIT)
        .await;

    for round in 1..=ROUNDS {
        let leader = agreed_leader(&peers).await;
        let before = transports[leader].stats();
        let cut = Instant::now();
        // Cuts every connection of the leader's peer and refuses new ones for `DOWN`.
        let outage = {
            let proxy = proxies[leader].clone();
            tokio::spawn(async move { proxy.outage(DOWN).await })
        };
        println!(
            "[{tag}] round {round}: cut the connection of {} (the leader) for {DOWN:?}",
            pid(leader)
        );
        writers
            .wait_acked("after the cut", cut, WRITES_AFTER_FAULT, RESUME)
            .await;
        let resumed = cut.elapsed();
        tokio::time::timeout(RESUME, outage)
            .await
            .expect("the outage ends")
            .expect("outage task");
        let healed = Instant::now();
        let t = transports[leader].clone();
        eventually(
            &format!(
                "{}'s transport to count the lost connection and open a new link",
                pid(leader)
            ),
            RESUME,
            || {
                let s = t.stats();
                async move {
                    (s.disconnects > before.disconnects
                        && s.links_lost > before.links_lost
                        && s.links_opened > before.links_opened)
                        .then_some(())
                }
            },
        )
        .await;
        writers
            .wait_every_writer("after the cut ended", healed, RESUME)
            .await;
        let s = transports[leader].stats();
        println!(
            "[{tag}] round {round}: {WRITES_AFTER_FAULT} writes acknowledged {resumed:?} after the cut; \
             every writer acknowledged again {:?} after it ended; {}: disconnects {} -> {}, links lost \
             {} -> {}, opened {} -> {}, connect failures {} -> {}; {} failed writes so far",
            healed.elapsed(),
            pid(leader),
            before.disconnects,
            s.disconnects,
            before.links_lost,
            s.links_lost,
            before.links_opened,
            s.links_opened,
            before.connect_failures,
            s.connect_failures,
            writers.failed()
        );
    }

    let stats: Vec<TransportStats> = transports.iter().map(|t| t.stats()).collect();
    finish(tag, &peers, &maps, writers, events, &stats).await;
    close_all(&peers).await;
    println!("[{tag}] took {:?}", began.elapsed());
}
