//! Durable peers over a real NATS server, in three OS processes (the `nats_cluster` example with
//! `--storage-dir`): all three are SIGKILLed at once in the middle of a write load, then restarted on
//! the same directories with the same ids. They elect a leader among themselves, every acknowledged
//! write is still there, nothing was invented, and the cluster takes writes again.
//!
//! Time here is only ever a bound on a wait: nothing asserts how long something took.

use std::path::Path;
use std::time::{Duration, Instant};

use hamok::transports::nats::{DEFAULT_NATS_URL, NATS_URL_ENV};
use tokio::sync::mpsc::error::TryRecvError;

/// The broker tests' helpers (`require_broker`, `unique_id`), shared with `transports/tests/`.
#[path = "../transports/tests/common/mod.rs"]
mod common;

/// The peer processes (the `nats_cluster` example run by this binary again), shared with
/// `tests/multiprocess.rs`.
#[path = "common/peer_process.rs"]
mod peer_process;

use common::{require_broker, unique_id};
use peer_process::{wait_members, Peer};

/// Not a test: the entry point of the peer processes the scenario below starts (this binary run again
/// by [`Peer::spawn_with`]). In a normal test run, returns at once.
#[test]
fn peer_process_entry_point() {
    peer_process::entry_point();
}

/// The peers, also the names of their storage directories.
const IDS: [&str; 3] = ["a", "b", "c"];
/// What `members` answers on every peer.
const MEMBERS: &str = "a,b,c";
/// Acknowledged writes before the kill.
const ACKS_BEFORE_KILL: usize = 200;
/// Writes each peer has in flight during the load.
const IN_FLIGHT_PER_PEER: usize = 8;
/// Bound of a peer process's start (`ready`: joined, the collection exists).
const START: Duration = Duration::from_secs(60);
/// Bound of the write load up to the kill.
const LOAD: Duration = Duration::from_secs(60);
/// Bound for the peers to agree on a leader.
const ELECTION: Duration = Duration::from_secs(30);
/// Bound for a peer to apply what a linearizable read returned.
const APPLY: Duration = Duration::from_secs(10);
/// Bound for a killed process's output to end.
const DRAIN: Duration = Duration::from_secs(10);

/// Starts the three durable peers of `cluster`, each on its directory under `dirs`.
fn start_peers(cluster: &str, url: &str, dirs: &Path) -> Vec<Peer> {
    IDS.iter()
        .map(|id| {
            let dir = dirs.join(id);
            let dir = dir.to_str().expect("a UTF-8 temporary directory");
            Peer::spawn_with(id, cluster, "nats", url, &["--storage-dir", dir])
        })
        .collect()
}

/// Waits until every peer printed `ready`.
async fn wait_ready(peers: &mut [Peer], when: &str) {
    for p in peers {
        p.expect("ready ", START)
            .await
            .unwrap_or_else(|| panic!("{when}: peer {} not ready within {START:?}", p.id));
    }
}

/// Waits until every peer reports the same leader (not `none`); returns it.
async fn agreed_leader(peers: &mut [Peer], when: &str) -> String {
    let deadline = Instant::now() + ELECTION;
    loop {
        let mut seen = Vec::new();
        for p in peers.iter_mut() {
            seen.push((p.id.clone(), p.leader().await));
        }
        let first = &seen[0].1;
        if first != "none" && seen.iter().all(|(_, l)| l == first) {
            return first.clone();
        }
        assert!(
            Instant::now() < deadline,
            "{when}: the peers did not agree on a leader within {ELECTION:?}: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The write load: `add 1 wN` through all three peers, several in flight on each.
#[derive(Default)]
struct Load {
    /// Writes sent (the tag of the last one is `w{sent}`).
    sent: u64,
    /// Writes acknowledged, and the highest total an acknowledgement carried.
    acked: usize,
    max_total: i64,
    /// Writes answered with an error (outcome unknown).
    failed: usize,
    /// Writes sent to each peer and not answered yet.
    in_flight: [usize; 3],
}

impl Load {
    /// Tops every peer up to `IN_FLIGHT_PER_PEER` writes in flight.
    fn top_up(&mut self, peers: &mut [Peer]) {
        for (i, p) in peers.iter_mut().enumerate() {
            while self.in_flight[i] < IN_FLIGHT_PER_PEER {
                self.sent += 1;
                p.send(&format!("add 1 w{}", self.sent));
                self.in_flight[i] += 1;
            }
        }
    }

    /// Takes note of one line of peer `i`.
    fn note(&mut self, i: usize, id: &str, line: &str) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["ack", tag, total] if tag.starts_with('w') => {
                let total: i64 = total.parse().expect("a total");
                self.acked += 1;
                self.max_total = self.max_total.max(total);
                self.in_flight[i] -= 1;
            }
            ["err", tag, ..] if tag.starts_with('w') => {
                println!("[{id}] {line}");
                self.failed += 1;
                self.in_flight[i] -= 1;
            }
            _ => {}
        }
    }

    /// Takes note of every line the peers have printed so far; returns how many there were.
    fn poll(&mut self, peers: &mut [Peer]) -> usize {
        let mut n = 0;
        for (i, p) in peers.iter_mut().enumerate() {
            loop {
                match p.lines.try_recv() {
                    Ok(line) => {
                        self.note(i, &p.id, &line);
                        n += 1;
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        panic!("peer {} exited during the write load", p.id)
                    }
                }
            }
        }
        n
    }

    /// After the kill: takes note of every line the dead peers printed, up to the end of their output.
    async fn drain(&mut self, peers: &mut [Peer]) {
        for (i, p) in peers.iter_mut().enumerate() {
            loop {
                match tokio::time::timeout(DRAIN, p.lines.recv()).await {
                    Ok(Some(line)) => self.note(i, &p.id, &line),
                    Ok(None) => break,
                    Err(_) => panic!(
                        "the output of killed peer {} did not end within {DRAIN:?}",
                        p.id
                    ),
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_kill_9_of_all_peers_mid_load_loses_no_acknowledged_write() {
    let url = require_broker("NATS", NATS_URL_ENV, DEFAULT_NATS_URL, 4222).await;
    let cluster = unique_id("durable");
    // Declared before the peers, so dropped after them (the processes are killed first).
    let dirs = tempfile::TempDir::new().expect("a temporary directory");
    let started = Instant::now();

    let mut peers = start_peers(&cluster, &url, dirs.path());
    wait_ready(&mut peers, "first start").await;
    for p in &mut peers {
        wait_members(p, MEMBERS).await;
    }
    let leader = agreed_leader(&mut peers, "first start").await;
    println!(
        "[durable] 3 processes formed cluster {cluster} in {:?}, leader {leader}",
        started.elapsed()
    );

    // The write load, up to ACKS_BEFORE_KILL acknowledgements. It stops right after the peers' answers
    // are read, not after sending: the writes still in flight then were sent a while before, so the
    // peers are working on them (in their logs, replicating, committing, answering).
    let mut load = Load::default();
    let deadline = Instant::now() + LOAD;
    loop {
        load.top_up(&mut peers);
        if load.poll(&mut peers) == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        if load.acked >= ACKS_BEFORE_KILL && load.in_flight.iter().sum::<usize>() > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {} of {} writes acknowledged within {LOAD:?} ({} failed)",
            load.acked,
            load.sent,
            load.failed
        );
    }

    // kill -9 of all three at once, with writes in flight.
    let in_flight = load.in_flight;
    for p in &mut peers {
        p.child.kill().expect("SIGKILL a peer");
    }
    for p in &mut peers {
        let status = p.child.wait().expect("wait for a killed peer");
        assert!(!status.success(), "{} exited on its own: {status}", p.id);
    }
    // What the peers printed before they died counts: those writes were acknowledged.
    load.drain(&mut peers).await;
    println!(
        "[durable] SIGKILLed a,b,c: {} writes sent, {} acknowledged (highest total {}), {} failed, \
         {} unanswered; in flight at the kill: {in_flight:?}",
        load.sent,
        load.acked,
        load.max_total,
        load.failed,
        load.sent - (load.acked + load.failed) as u64
    );
    drop(peers);

    // Restart all three on their directories.
    let restarted = Instant::now();
    let mut peers = start_peers(&cluster, &url, dirs.path());
    wait_ready(&mut peers, "after the restart").await;
    let leader = agreed_leader(&mut peers, "after the restart").await;
    println!(
        "[durable] restarted: ready and leader {leader} agreed after {:?}",
        restarted.elapsed()
    );
    for p in &mut peers {
        wait_members(p, MEMBERS).await;
    }

    // Every acknowledged write is there, and nothing that was never sent.
    let mut values = Vec::new();
    for p in &mut peers {
        let value: i64 = p.ask("get", "value ").await.parse().expect("a number");
        values.push((p.id.clone(), value));
    }
    println!("[durable] linearizable reads after the restart: {values:?}");
    let total = values[0].1;
    assert!(
        values.iter().all(|(_, v)| *v == total),
        "linearizable reads disagree: {values:?}"
    );
    assert!(
        total >= load.max_total,
        "acknowledged writes lost: the counter is {total}, an acknowledgement said {} \
         ({} acknowledged of {} sent)",
        load.max_total,
        load.acked,
        load.sent
    );
    assert!(
        total <= load.sent as i64,
        "the counter is {total}, only {} writes of 1 were sent",
        load.sent
    );

    // The cluster takes writes again, and every peer applies them.
    peers[0].send("add 1 after");
    let after = peers[0]
        .add_answer("after")
        .await
        .expect("an answer to the write after the restart")
        .unwrap_or_else(|e| panic!("a write after the restart failed: {e}"));
    assert_eq!(after, total + 1, "the write after the restart");
    for p in &mut peers {
        let value: i64 = p.ask("get", "value ").await.parse().expect("a number");
        assert_eq!(value, after, "linearizable read on {}", p.id);
        let deadline = Instant::now() + APPLY;
        loop {
            let local: i64 = p.ask("local", "local ").await.parse().expect("a number");
            if local == after {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{} stuck at {local}, want {after}",
                p.id
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    println!(
        "[durable] scenario took {:?}: final total {after}",
        started.elapsed()
    );
}
