//! Helpers of the broker tests: a counter state machine, peers with short Raft timings on a transport,
//! the scenarios both brokers run, garbage frames and a TCP proxy that can cut the broker off; the
//! bounded waits and cluster helpers of `hamok-testkit` (re-exported).
#![allow(dead_code)] // each test binary uses a different subset

use std::any::Any;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hamok_runtime::raft::PeerId;
use hamok_runtime::state_machine::{ApplyContext, StateMachine};
use hamok_runtime::transport::{Inbound, Link, Transport};
use hamok_runtime::wire::{encode, Frame, HamokMessage, Hello, PROTOCOL_VERSION};
use hamok_runtime::{Hamok, HamokError, HamokStats};
pub use hamok_testkit::cluster::{
    agreed_leader, close_all, join_all_at_once, pid, unique_id, wait_membership,
};
pub use hamok_testkit::wait::{eventually, WAIT};
use hamok_transports::TransportStats;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

// -------------------------------------------------------------------------------------------------
// A counter state machine
// -------------------------------------------------------------------------------------------------

/// The kind the counter is registered under.
pub const KIND: &str = "tcounter";
/// The collection the tests write to.
pub const COLLECTION: &str = "counter";

/// Adds the little-endian i64 of each command; answers the new total.
#[derive(Default)]
pub struct Counter {
    total: i64,
}

fn le_i64(data: &[u8]) -> Result<i64, HamokError> {
    let bytes: [u8; 8] = data
        .try_into()
        .map_err(|_| HamokError::codec(format!("counter: {} bytes, want 8", data.len()), None))?;
    Ok(i64::from_le_bytes(bytes))
}

impl StateMachine for Counter {
    fn kind(&self) -> &str {
        KIND
    }
    fn apply(&mut self, _ctx: &ApplyContext, command: &[u8]) -> Result<Bytes, HamokError> {
        self.total += le_i64(command)?;
        Ok(Bytes::copy_from_slice(&self.total.to_le_bytes()))
    }
    fn snapshot(&self) -> Result<Bytes, HamokError> {
        Ok(Bytes::copy_from_slice(&self.total.to_le_bytes()))
    }
    fn restore(&mut self, data: &[u8]) -> Result<(), HamokError> {
        self.total = le_i64(data)?;
        Ok(())
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

/// Adds `n` through `peer`; returns the total the write produced.
pub async fn add(peer: &Hamok, n: i64) -> Result<i64, HamokError> {
    let response = peer.submit(COLLECTION, n.to_le_bytes().to_vec()).await?;
    le_i64(&response)
}

/// The counter on `peer` (`None` when the collection does not exist there).
pub async fn read(peer: &Hamok, linearizable: bool) -> Result<Option<i64>, HamokError> {
    peer.query(COLLECTION, linearizable, |sm| {
        sm.and_then(|m| m.as_any().downcast_ref::<Counter>())
            .map(|c| c.total)
    })
    .await
}

// -------------------------------------------------------------------------------------------------
// Brokers and transports
// -------------------------------------------------------------------------------------------------

/// A transport under test: anything with counters.
pub trait TestTransport: Transport + Clone {
    fn stats(&self) -> TransportStats;
}

/// `host:port` of a broker URL (scheme, credentials and path stripped).
pub fn host_port(url: &str, default_port: u16) -> String {
    let rest = url.split("://").nth(1).unwrap_or(url);
    let rest = rest.rsplit('@').next().unwrap_or(rest);
    let authority = rest.split(['/', '?']).next().unwrap_or(rest);
    if authority.contains(':') {
        authority.to_string()
    } else {
        format!("{authority}:{default_port}")
    }
}

/// The broker URL of `env` (or `default`); panics with a clear message when nothing answers there.
pub async fn require_broker(what: &str, env: &str, default: &str, default_port: u16) -> String {
    let url = std::env::var(env)
        .ok()
        .filter(|v| !v.trim().is_empty())
        .unwrap_or_else(|| default.to_string());
    let first = url.split(',').next().unwrap_or(&url).trim().to_string();
    let addr = host_port(&first, default_port);
    match tokio::time::timeout(Duration::from_secs(3), TcpStream::connect(&addr)).await {
        Ok(Ok(_)) => first,
        Ok(Err(e)) => panic!(
            "{what} is not reachable at {addr} ({env}={first:?}): {e}. These tests need a real \
             broker: start it (scripts/brokers.sh) or point {env} at one."
        ),
        Err(_) => panic!(
            "{what} did not answer at {addr} within 3 s ({env}={first:?}). These tests need a real \
             broker: start it (scripts/brokers.sh) or point {env} at one."
        ),
    }
}

/// Declares one `#[tokio::test]` per scenario that every broker runs the same way: wait for the
/// broker (`$broker().await` gives its URL), then run `$scenario($tag, || $transport(&url))`.
///
/// ```ignore
/// scenario_tests! {
///     broker: server, transport: transport;
///     three_peers_join_write_and_survive_leader_loss => three_peers("nats3"),
/// }
/// ```
// Invoked by the broker test crates; `tests/multiprocess.rs` includes this file without invoking it.
#[allow(unused_macros)]
macro_rules! scenario_tests {
    (
        broker: $broker:ident, transport: $transport:ident;
        $($name:ident => $scenario:ident($tag:literal),)+
    ) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let url = $broker().await;
                $scenario($tag, || $transport(&url)).await;
            }
        )+
    };
}
// Used by the broker test crates; `tests/multiprocess.rs` includes this file without it.
#[allow(unused_imports)]
pub(crate) use scenario_tests;

/// Builds (does not join) peer `id` of `cluster` over `transport`, with short Raft timings.
pub async fn build_peer<T: Transport>(cluster: &str, id: &str, transport: T) -> Hamok {
    build_keyed_peer(cluster, id, transport, None).await
}

/// [`build_peer`], with the frames authenticated under `key` when one is given.
pub async fn build_keyed_peer<T: Transport>(
    cluster: &str,
    id: &str,
    transport: T,
    key: Option<&str>,
) -> Hamok {
    let builder = Hamok::builder();
    let builder = match key {
        Some(key) => builder.cluster_key(key),
        None => builder,
    };
    builder
        .peer_id(id)
        .cluster_id(cluster)
        .transport(transport)
        .election_timeout_ms(200)
        .heartbeat_interval_ms(40)
        .peer_max_idle_ms(3_000)
        .request_timeout_ms(5_000)
        .register_kind(KIND, || Box::new(Counter::default()))
        .build()
        .await
        .unwrap_or_else(|e| panic!("build peer {id} of {cluster}: {e}"))
}

/// Builds `n` peers of `cluster`, each on its own transport from `make`, and joins them all at once.
pub async fn start<T: TestTransport>(
    cluster: &str,
    n: usize,
    make: &impl Fn() -> T,
) -> (Vec<Hamok>, Vec<T>) {
    start_keyed(cluster, n, make, None).await
}

/// [`start`], with the frames authenticated under `key` when one is given.
pub async fn start_keyed<T: TestTransport>(
    cluster: &str,
    n: usize,
    make: &impl Fn() -> T,
    key: Option<&str>,
) -> (Vec<Hamok>, Vec<T>) {
    let mut peers = Vec::new();
    let mut transports = Vec::new();
    for i in 0..n {
        let t = make();
        peers.push(build_keyed_peer(cluster, &pid(i), t.clone(), key).await);
        transports.push(t);
    }
    join_all_at_once(&peers).await;
    (peers, transports)
}

// -------------------------------------------------------------------------------------------------
// Waiting
// -------------------------------------------------------------------------------------------------

/// Waits until every peer reads `want`: a linearizable read, then the local applied state.
pub async fn wait_value(peers: &[Hamok], want: i64) {
    for p in peers {
        let lin = read(p, true)
            .await
            .unwrap_or_else(|e| panic!("linearizable read on {}: {e}", p.local_peer_id()));
        assert_eq!(
            lin,
            Some(want),
            "linearizable read on {}",
            p.local_peer_id()
        );
        let p2 = p.clone();
        eventually(
            &format!("{} to apply up to {want}", p.local_peer_id()),
            WAIT,
            || {
                let p = p2.clone();
                async move { (read(&p, false).await.ok().flatten() == Some(want)).then_some(()) }
            },
        )
        .await;
    }
}

pub fn stats_line(s: &HamokStats) -> String {
    format!(
        "{}: role {:?} term {} commit {} in {} out {} malformed {} foreign {} version {} \
         inbound_full {} outbound {} connects {}",
        s.status.raft.id,
        s.status.raft.role,
        s.status.raft.term,
        s.status.raft.commit_index,
        s.counters.frames_in,
        s.counters.frames_out,
        s.counters.dropped_malformed,
        s.counters.dropped_foreign_cluster,
        s.counters.dropped_version,
        s.counters.dropped_inbound_full,
        s.counters.dropped_outbound,
        s.counters.transport_connects
    )
}

// -------------------------------------------------------------------------------------------------
// Scenarios
// -------------------------------------------------------------------------------------------------

/// 3 peers: join, a write from each, read back everywhere, lose the leader, write again.
pub async fn three_peers<T: TestTransport>(tag: &str, make: impl Fn() -> T) {
    let cluster = unique_id(tag);
    let started = Instant::now();
    let (peers, transports) = start(&cluster, 3, &make).await;
    let leader = agreed_leader(&peers).await;
    wait_membership(&peers).await;
    println!(
        "[{tag}] formed in {:?}, leader {}",
        started.elapsed(),
        pid(leader)
    );

    peers[(leader + 1) % 3]
        .create_collection(COLLECTION, KIND)
        .await
        .expect("create collection through a follower");
    for (i, p) in peers.iter().enumerate() {
        add(p, i as i64 + 1)
            .await
            .unwrap_or_else(|e| panic!("write from {}: {e}", pid(i)));
    }
    wait_value(&peers, 6).await;

    // set() latency, leader and follower (a rough figure: debug build, one process).
    let follower = (leader + 1) % 3;
    for (who, idx) in [("leader", leader), ("follower", follower)] {
        let mut lat = Vec::new();
        for _ in 0..50 {
            let t = Instant::now();
            add(&peers[idx], 0).await.expect("latency write");
            lat.push(t.elapsed());
        }
        lat.sort();
        println!(
            "[{tag}] add() from {who}: p50 {:?} p99 {:?} (50 writes)",
            lat[lat.len() / 2],
            lat[lat.len() * 99 / 100]
        );
    }

    // Throughput with 100 writes in flight through the leader (a rough figure, as above).
    let t = Instant::now();
    let tasks: Vec<_> = (0..100)
        .map(|_| {
            let p = peers[leader].clone();
            tokio::spawn(async move {
                for _ in 0..20 {
                    add(&p, 0).await.expect("throughput write");
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("throughput task");
    }
    println!(
        "[{tag}] 2000 writes, 100 in flight: {:.0} writes/s",
        2000.0 / t.elapsed().as_secs_f64()
    );

    // Lose the leader: the other two elect one and keep writing.
    let t = Instant::now();
    peers[leader].close().await;
    let rest: Vec<Hamok> = (0..3)
        .filter(|&i| i != leader)
        .map(|i| peers[i].clone())
        .collect();
    let total = add(&rest[1], 10)
        .await
        .expect("a write after the leader is gone");
    assert_eq!(total, 16);
    println!(
        "[{tag}] leader close to next acknowledged write: {:?}",
        t.elapsed()
    );
    let new_leader = agreed_leader(&rest).await;
    assert_ne!(rest[new_leader].local_peer_id().as_str(), pid(leader));
    wait_value(&rest, 16).await;

    for p in &rest {
        let s = p.stats();
        println!("[{tag}] {}", stats_line(&s));
        assert_eq!(
            s.counters.dropped_malformed
                + s.counters.dropped_foreign_cluster
                + s.counters.dropped_version,
            0
        );
    }
    for (i, t) in transports.iter().enumerate() {
        let s = t.stats();
        println!("[{tag}] transport {}: {s:?}", pid(i));
        assert!(s.links_opened >= 1 && s.frames_sent > 0 && s.frames_received > 0);
    }
    close_all(&rest).await;
}

/// 3 peers whose frames are authenticated (a cluster key): every frame starts with the same byte
/// as a batch of several, so this checks the two framings do not get in each other's way on a real
/// broker. They join, take a burst of writes from every peer (frames alone and batches), and agree;
/// no frame is refused as unauthenticated or malformed.
pub async fn authenticated<T: TestTransport>(tag: &str, make: impl Fn() -> T) {
    const KEY: &str = "a-cluster-key-for-the-broker-tests";
    let cluster = unique_id(tag);
    let (peers, transports) = start_keyed(&cluster, 3, &make, Some(KEY)).await;
    agreed_leader(&peers).await;
    wait_membership(&peers).await;
    peers[0]
        .create_collection(COLLECTION, KIND)
        .await
        .expect("create the collection");
    let writes: Vec<_> = (0..300)
        .map(|i| {
            let p = peers[i % 3].clone();
            tokio::spawn(async move { add(&p, 1).await })
        })
        .collect();
    for w in writes {
        w.await
            .expect("write task")
            .expect("an authenticated write");
    }
    wait_value(&peers, 300).await;
    for p in &peers {
        let s = p.stats();
        println!("[{tag}] {}", stats_line(&s));
        assert_eq!(
            (
                s.counters.dropped_unauthenticated,
                s.counters.dropped_malformed
            ),
            (0, 0),
            "{}",
            p.local_peer_id()
        );
    }
    let sent: Vec<TransportStats> = transports.iter().map(|t| t.stats()).collect();
    assert!(
        sent.iter().any(|s| s.messages_sent < s.frames_sent),
        "some messages carried several frames: {sent:?}"
    );
    close_all(&peers).await;
}

/// Two clusters with the same peer ids on one broker: each keeps its own members and state.
pub async fn two_clusters<T: TestTransport>(tag: &str, make: impl Fn() -> T) {
    let a = unique_id(&format!("{tag}a"));
    let b = unique_id(&format!("{tag}b"));
    let ((pa, ta), (pb, tb)) = tokio::join!(start(&a, 3, &make), start(&b, 3, &make));
    agreed_leader(&pa).await;
    agreed_leader(&pb).await;
    wait_membership(&pa).await;
    wait_membership(&pb).await;

    pa[0]
        .create_collection(COLLECTION, KIND)
        .await
        .expect("create a");
    pb[2]
        .create_collection(COLLECTION, KIND)
        .await
        .expect("create b");
    let (ra, rb) = tokio::join!(
        async {
            for p in &pa {
                add(p, 1).await.expect("write a");
            }
        },
        async {
            for p in &pb {
                add(p, 100).await.expect("write b");
            }
        }
    );
    let ((), ()) = (ra, rb);
    wait_value(&pa, 3).await;
    wait_value(&pb, 300).await;
    wait_membership(&pa).await;
    wait_membership(&pb).await;
    for p in pa.iter().chain(&pb) {
        let s = p.stats();
        assert_eq!(
            s.counters.dropped_foreign_cluster,
            0,
            "no frame of the other cluster reaches a peer: {}",
            stats_line(&s)
        );
        assert_eq!(s.status.remote_peers(), 2);
    }
    for t in ta.iter().chain(&tb) {
        assert_eq!(t.stats().dropped, 0, "{:?}", t.stats());
    }
    close_all(&pa).await;
    close_all(&pb).await;
}

/// The garbage of one kind published on the bus, and the peer counter it must bump.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Garbage {
    Random,
    Truncated,
    ForeignCluster,
    FutureVersion,
}

fn hello_frame(cluster: &str, version: u16) -> Frame {
    Frame {
        version,
        cluster: cluster.to_string(),
        incarnation: 0,
        from: PeerId::from("intruder"),
        to: None,
        body: HamokMessage::Hello(Hello {
            member: true,
            leader: Some(PeerId::from("intruder")),
            term: 1_000_000,
            joining: false,
            reply: true,
            can_lead: true,
        }),
    }
}

/// One garbage frame of `kind` for `cluster` (`n` varies the random bytes).
pub fn garbage(kind: Garbage, cluster: &str, n: u64) -> Bytes {
    match kind {
        Garbage::Random => {
            // xorshift64*, seeded per frame: reproducible.
            let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ n.wrapping_mul(0x2545_F491_4F6C_DD1D);
            let len = 1 + (n as usize * 37) % 300;
            (0..len)
                .map(|_| {
                    x ^= x >> 12;
                    x ^= x << 25;
                    x ^= x >> 27;
                    (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 56) as u8
                })
                .collect::<Vec<u8>>()
                .into()
        }
        Garbage::Truncated => {
            let full = encode(&hello_frame(cluster, PROTOCOL_VERSION)).expect("encode");
            let cut = 1 + (n as usize) % (full.len() - 1);
            full.slice(..cut)
        }
        Garbage::ForeignCluster => {
            encode(&hello_frame(&format!("{cluster}-other"), PROTOCOL_VERSION)).expect("encode")
        }
        Garbage::FutureVersion => {
            encode(&hello_frame(cluster, PROTOCOL_VERSION + 1)).expect("encode")
        }
    }
}

/// Where a raw garbage publish goes.
#[derive(Clone, Debug)]
pub enum Target {
    Broadcast,
    Peer(String),
}

/// 3 peers keep writing while raw garbage is published on the cluster's broadcast subject / routing
/// key and on one peer's unicast one: the writes all succeed, every peer counts what it dropped.
///
/// `publish(target, bytes)` publishes one raw message.
pub async fn garbage_frames<T, P, Fut>(tag: &str, make: impl Fn() -> T, publish: P)
where
    T: TestTransport,
    P: Fn(String, Target, Bytes) -> Fut,
    Fut: Future<Output = ()>,
{
    let cluster = unique_id(tag);
    let (peers, transports) = start(&cluster, 3, &make).await;
    agreed_leader(&peers).await;
    wait_membership(&peers).await;
    peers[0]
        .create_collection(COLLECTION, KIND)
        .await
        .expect("create");

    // A writer through every peer, all the time the garbage flows.
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let writers: Vec<JoinHandle<Result<(), HamokError>>> = peers
        .iter()
        .cloned()
        .map(|p| {
            let stop = stop.clone();
            let written = written.clone();
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    add(&p, 1).await?;
                    written.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            })
        })
        .collect();

    const ROUNDS: u64 = 20;
    let kinds = [
        Garbage::Random,
        Garbage::Truncated,
        Garbage::ForeignCluster,
        Garbage::FutureVersion,
    ];
    for n in 0..ROUNDS {
        for kind in kinds {
            publish(
                cluster.clone(),
                Target::Broadcast,
                garbage(kind, &cluster, n),
            )
            .await;
            publish(
                cluster.clone(),
                Target::Peer(pid(1)),
                garbage(kind, &cluster, n),
            )
            .await;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    // Every peer got every broadcast piece; p1 also the unicast ones.
    for (i, p) in peers.iter().enumerate() {
        let per_kind = if i == 1 { 2 * ROUNDS } else { ROUNDS };
        let p2 = p.clone();
        eventually(
            &format!("{} to count the garbage it was sent", pid(i)),
            WAIT,
            || {
                let s = p2.stats();
                async move {
                    (s.counters.dropped_malformed >= 2 * per_kind
                        && s.counters.dropped_foreign_cluster >= per_kind
                        && s.counters.dropped_version >= per_kind)
                        .then_some(())
                }
            },
        )
        .await;
    }
    // Writes went on meanwhile, and go on after.
    let before = written.load(Ordering::Relaxed);
    eventually("writes to continue after the garbage", WAIT, || {
        let w = written.load(Ordering::Relaxed);
        async move { (w >= before + 30).then_some(()) }
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await
            .expect("writer task")
            .expect("no write failed during the garbage");
    }
    let total = written.load(Ordering::Relaxed) as i64;
    wait_value(&peers, total).await;
    agreed_leader(&peers).await;
    for (i, p) in peers.iter().enumerate() {
        let s = p.stats();
        println!("[{tag}] {}", stats_line(&s));
        let per_kind = if i == 1 { 2 * ROUNDS } else { ROUNDS };
        assert_eq!(
            s.counters.dropped_foreign_cluster,
            per_kind,
            "{}",
            stats_line(&s)
        );
        assert_eq!(s.counters.dropped_version, per_kind, "{}", stats_line(&s));
        assert!(
            s.counters.dropped_malformed >= 2 * per_kind,
            "{}",
            stats_line(&s)
        );
        assert_eq!(
            s.status.remote_peers(),
            2,
            "the intruder never became a member"
        );
    }
    for (i, t) in transports.iter().enumerate() {
        println!("[{tag}] transport {}: {:?}", pid(i), t.stats());
    }
    println!("[{tag}] {total} writes during and after the garbage");
    close_all(&peers).await;
}

// -------------------------------------------------------------------------------------------------
// Broker outage through a TCP proxy
// -------------------------------------------------------------------------------------------------

/// A loopback TCP proxy in front of a broker; [`Proxy::outage`] cuts every connection and refuses new
/// ones for a while, [`Proxy::retarget`] sends new connections to another broker.
pub struct Proxy {
    pub addr: String,
    upstream: Arc<Mutex<String>>,
    up: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl Proxy {
    pub async fn start(upstream: String) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr").to_string();
        let up = Arc::new(AtomicBool::new(true));
        let upstream = Arc::new(Mutex::new(upstream));
        let conns: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let accept = {
            let up = up.clone();
            let upstream = upstream.clone();
            let conns = conns.clone();
            tokio::spawn(async move {
                loop {
                    let Ok((mut client, _)) = listener.accept().await else {
                        return;
                    };
                    if !up.load(Ordering::Acquire) {
                        let _ = client.shutdown().await;
                        continue;
                    }
                    let upstream = upstream.lock().unwrap().clone();
                    let task = tokio::spawn(async move {
                        if let Ok(mut server) = TcpStream::connect(&upstream).await {
                            let _ = client.set_nodelay(true);
                            let _ = server.set_nodelay(true);
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                        }
                    });
                    let mut conns = conns.lock().unwrap();
                    conns.retain(|t| !t.is_finished());
                    conns.push(task);
                }
            })
        };
        Proxy {
            addr,
            upstream,
            up,
            conns,
            accept,
        }
    }

    /// Connections made from now on go to `upstream` (the ones open stay where they are).
    pub fn retarget(&self, upstream: String) {
        *self.upstream.lock().unwrap() = upstream;
    }

    /// Cuts every proxied connection and refuses new ones for `down`.
    pub async fn outage(&self, down: Duration) {
        self.up.store(false, Ordering::Release);
        for t in self.conns.lock().unwrap().drain(..) {
            t.abort();
        }
        tokio::time::sleep(down).await;
        self.up.store(true, Ordering::Release);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        for t in self.conns.lock().unwrap().drain(..) {
            t.abort();
        }
    }
}

/// 3 peers reach the broker through `proxy`; writes are acknowledged, the broker is cut off for
/// `down`, and afterwards the cluster is healthy again with every acknowledged write there.
pub async fn outage<T: TestTransport>(
    tag: &str,
    proxy: &Proxy,
    down: Duration,
    make: impl Fn() -> T,
) -> Vec<T> {
    let cluster = unique_id(tag);
    let (peers, transports) = start(&cluster, 3, &make).await;
    agreed_leader(&peers).await;
    wait_membership(&peers).await;
    peers[0]
        .create_collection(COLLECTION, KIND)
        .await
        .expect("create");
    let mut acked = 0;
    for p in &peers {
        add(p, 1).await.expect("write before the outage");
        acked += 1;
    }

    let t = Instant::now();
    proxy.outage(down).await;
    // Writes after the outage. A write that fails may still have been applied (its outcome is
    // unknown): the final total must hold every acknowledged write, plus at most the unknown ones.
    let mut unknown = 0;
    for p in &peers {
        loop {
            match add(p, 1).await {
                Ok(_) => break,
                Err(e) if unknown < 5 => {
                    unknown += 1;
                    println!(
                        "[{tag}] write after outage from {}: {e} (trying again)",
                        p.local_peer_id()
                    );
                }
                Err(e) => panic!("no write after the outage from {}: {e}", p.local_peer_id()),
            }
        }
        acked += 1;
    }
    println!(
        "[{tag}] outage of {down:?}: all peers writing again {:?} after it began",
        t.elapsed()
    );
    agreed_leader(&peers).await;
    wait_membership(&peers).await;
    let total = read(&peers[0], true)
        .await
        .expect("linearizable read after the outage")
        .expect("collection");
    assert!(
        (acked..=acked + unknown).contains(&total),
        "total {total}: {acked} acknowledged writes, {unknown} of unknown outcome"
    );
    wait_value(&peers, total).await;
    for (i, t) in transports.iter().enumerate() {
        println!("[{tag}] transport {}: {:?}", pid(i), t.stats());
    }
    for p in &peers {
        println!("[{tag}] {}", stats_line(&p.stats()));
    }
    close_all(&peers).await;
    transports
}

// -------------------------------------------------------------------------------------------------
// Link-level checks (no Raft): routing, echo, drops
// -------------------------------------------------------------------------------------------------

/// An inbound that keeps what it receives (never marks a frame processed: `capacity` bounds it).
pub fn collector(capacity: usize) -> (Inbound, Arc<Mutex<Vec<Bytes>>>) {
    let got: Arc<Mutex<Vec<Bytes>>> = Arc::default();
    let sink = got.clone();
    let inbound = Inbound::new(capacity, move |frame| sink.lock().unwrap().push(frame));
    (inbound, got)
}

pub async fn connect<T: TestTransport>(
    t: &T,
    cluster: &str,
    peer: &str,
    inbound: Inbound,
) -> Arc<dyn Link> {
    t.connect(cluster, PeerId::from(peer), inbound)
        .await
        .unwrap_or_else(|e| panic!("connect {peer} to {cluster}: {e}"))
}

fn sorted(v: &Arc<Mutex<Vec<Bytes>>>) -> Vec<Bytes> {
    let mut v = v.lock().unwrap().clone();
    v.sort();
    v
}

/// [`bursts`] where a receiver has one stream (an AMQP queue): a broadcast keeps its place among the
/// peer's unicasts.
pub async fn bursts_in_order<T: TestTransport>(tag: &str, make: impl Fn() -> T) {
    bursts(tag, make, true).await;
}

/// [`bursts`] where broadcasts and unicasts come on two streams (NATS: two subscriptions): each keeps
/// its order, not their interleaving.
pub async fn bursts_in_order_per_stream<T: TestTransport>(tag: &str, make: impl Fn() -> T) {
    bursts(tag, make, false).await;
}

/// Frames queued faster than the writer drains them travel several to one broker message: each
/// arrives whole, once, in the order sent (across broadcasts and unicasts when `one_stream`, else
/// within each), and the writer published fewer messages than frames.
async fn bursts<T: TestTransport>(tag: &str, make: impl Fn() -> T, one_stream: bool) {
    let cluster = unique_id(tag);
    let (ta, tb, tc) = (make(), make(), make());
    let (ia, _got_a) = collector(16);
    let (ib, got_b) = collector(4096);
    let (ic, got_c) = collector(4096);
    let a = connect(&ta, &cluster, "a", ia).await;
    let _b = connect(&tb, &cluster, "b", ib).await;
    let _c = connect(&tc, &cluster, "c", ic).await;
    let (mut want_b, mut want_c) = (Vec::new(), Vec::new());
    let mut broadcasts = std::collections::HashSet::new();
    for i in 0..2000u32 {
        let frame = Bytes::from(format!("frame {i}"));
        if i % 250 == 0 {
            broadcasts.insert(frame.clone());
            a.broadcast(frame.clone()).unwrap();
            want_b.push(frame.clone());
            want_c.push(frame);
        } else if i % 3 == 0 {
            a.send(&PeerId::from("c"), frame.clone()).unwrap();
            want_c.push(frame);
        } else {
            a.send(&PeerId::from("b"), frame.clone()).unwrap();
            want_b.push(frame);
        }
    }
    eventually("b and c to get every frame", WAIT, || {
        let ok = got_b.lock().unwrap().len() >= want_b.len()
            && got_c.lock().unwrap().len() >= want_c.len();
        async move { ok.then_some(()) }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The streams whose order a receiver keeps: all it gets, or its broadcasts and its unicasts.
    let streams = |frames: &[Bytes]| -> Vec<Vec<Bytes>> {
        if one_stream {
            return vec![frames.to_vec()];
        }
        let (b, u): (Vec<Bytes>, Vec<Bytes>) =
            frames.iter().cloned().partition(|f| broadcasts.contains(f));
        vec![b, u]
    };
    for (peer, got, want) in [("b", &got_b, &want_b), ("c", &got_c, &want_c)] {
        let got = got.lock().unwrap().clone();
        for (got, want) in streams(&got).iter().zip(streams(want).iter()) {
            let first_difference = got.iter().zip(want.iter()).position(|(g, w)| g != w);
            assert!(
                got.len() == want.len() && first_difference.is_none(),
                "{peer}: each frame whole, once, in order: {} frames for {}, first difference at {first_difference:?}",
                got.len(),
                want.len()
            );
        }
    }
    let s = ta.stats();
    assert_eq!(s.frames_sent, 2000, "{s:?}");
    assert_eq!(s.dropped, 0, "{s:?}");
    assert!(
        s.messages_sent < s.frames_sent,
        "frames travelled together: {s:?}"
    );
    assert_eq!(tb.stats().frames_received as usize, want_b.len());
}

/// Broadcast reaches every other peer of the cluster and not the sender; unicast reaches only its
/// target; another cluster with the same peer ids hears nothing; a closed link refuses and says why.
pub async fn link_routing<T: TestTransport>(tag: &str, make: impl Fn() -> T) {
    let cluster = unique_id(tag);
    let other = unique_id(tag);
    let (ta, tb, tc, td) = (make(), make(), make(), make());
    let (ia, got_a) = collector(1024);
    let (ib, got_b) = collector(1024);
    let (ic, got_c) = collector(1024);
    let (id, got_d) = collector(1024);
    let a = connect(&ta, &cluster, "a", ia).await;
    let b = connect(&tb, &cluster, "b", ib).await;
    let _c = connect(&tc, &cluster, "c", ic).await;
    let d = connect(&td, &other, "b", id).await;

    a.broadcast(Bytes::from_static(b"all")).unwrap();
    a.send(&PeerId::from("b"), Bytes::from_static(b"to-b"))
        .unwrap();
    b.send(&PeerId::from("c"), Bytes::from_static(b"to-c"))
        .unwrap();
    b.send(&PeerId::from("nobody"), Bytes::from_static(b"lost"))
        .unwrap();
    d.broadcast(Bytes::from_static(b"other")).unwrap();
    let b_want = vec![Bytes::from_static(b"all"), Bytes::from_static(b"to-b")];
    let c_want = vec![Bytes::from_static(b"all"), Bytes::from_static(b"to-c")];
    eventually("b and c to get their frames", WAIT, || {
        let ok = sorted(&got_b) == b_want && sorted(&got_c) == c_want;
        async move { ok.then_some(()) }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(sorted(&got_b), b_want, "nothing more for b");
    assert!(
        got_a.lock().unwrap().is_empty(),
        "a broadcast does not come back to its sender"
    );
    assert!(
        got_d.lock().unwrap().is_empty(),
        "another cluster hears nothing"
    );
    assert_eq!(ta.stats().frames_received, 0);

    // Ids that cannot be a subject token are refused, not escaped into someone else's subject.
    assert!(a
        .send(&PeerId::from("b.x"), Bytes::from_static(b"x"))
        .is_err());
    assert!(a
        .send(&PeerId::from("*"), Bytes::from_static(b"x"))
        .is_err());
    assert_eq!(ta.stats().dropped_invalid_target, 2);

    let closed = a.closed();
    a.close();
    a.close();
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(5), closed)
            .await
            .unwrap(),
        "closed"
    );
    assert!(a.broadcast(Bytes::from_static(b"x")).is_err());
    let s = ta.stats();
    assert_eq!(
        (s.links_opened, s.links_lost, s.dropped_link_down),
        (1, 0, 1),
        "{s:?}"
    );
    assert_eq!(s.frames_sent, 2);
}

/// A transport whose broker is not there: `connect` fails (within the transport's connect timeout)
/// and the failure is counted.
pub async fn unreachable_broker<T: TestTransport>(t: T) {
    let r = t
        .connect("c", PeerId::from("p"), Inbound::new(8, |_| {}))
        .await;
    assert!(r.is_err());
    assert_eq!(t.stats().connect_failures, 1);
}

/// Frames beyond the outbound queue are refused at once and counted; the rest go out.
pub async fn outbound_queue_bound<T: TestTransport>(
    tag: &str,
    small_queue: T,
    make: impl Fn() -> T,
) {
    let cluster = unique_id(tag);
    let (ia, _) = collector(1 << 20);
    let (ib, got_b) = collector(1 << 20);
    let a = connect(&small_queue, &cluster, "a", ia).await;
    let _b = connect(&make(), &cluster, "b", ib).await;
    const N: u64 = 20_000;
    let mut refused = 0;
    for i in 0..N {
        if a.send(&PeerId::from("b"), Bytes::from(i.to_le_bytes().to_vec()))
            .is_err()
        {
            refused += 1;
        }
    }
    let s = small_queue.stats();
    assert!(refused > 0, "a tight loop outruns an 8-frame queue: {s:?}");
    assert_eq!(s.dropped_queue_full, refused);
    let deadline = Instant::now() + WAIT;
    loop {
        let s = small_queue.stats();
        let received = got_b.lock().unwrap().len() as u64;
        if s.frames_sent == N - refused && received == N - refused {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{refused} refused, {received} received; sender {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!("[{tag}] {refused} of {N} refused by a full queue");
}

/// A peer that processes nothing: frames beyond its inbound bound are dropped and counted.
pub async fn inbound_bound<T: TestTransport>(tag: &str, make: impl Fn() -> T) {
    let cluster = unique_id(tag);
    let (tx_t, rx_t) = (make(), make());
    let (ia, _) = collector(16);
    let (ib, got_b) = collector(5);
    let a = connect(&tx_t, &cluster, "a", ia).await;
    let _b = connect(&rx_t, &cluster, "b", ib).await;
    for i in 0..20u8 {
        a.send(&PeerId::from("b"), Bytes::from(vec![i])).unwrap();
    }
    let deadline = Instant::now() + WAIT;
    while rx_t.stats().frames_received < 20 {
        assert!(
            Instant::now() < deadline,
            "b's transport did not receive the 20 frames: sender {:?}, receiver {:?}",
            tx_t.stats(),
            rx_t.stats()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(got_b.lock().unwrap().len(), 5);
    assert_eq!(rx_t.stats().dropped_inbound_full, 15);
    assert_eq!(rx_t.stats().dropped, 15);
}
