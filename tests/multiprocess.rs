//! Three OS processes (the `nats_cluster` example) form one cluster over a real NATS server, and again
//! over RabbitMQ. While a client keeps writing, the leader is SIGKILLed, a
//! replacement joins, and a follower is SIGSTOPped and SIGCONTed; at the end no acknowledged write is
//! lost and every live peer has the same state.

use std::time::{Duration, Instant};

use hamok::transports::nats::{DEFAULT_NATS_URL, NATS_URL_ENV};

/// The broker tests' helpers (`require_broker`, `unique_id`), shared with `transports/tests/`.
#[path = "../transports/tests/common/mod.rs"]
mod common;

/// The peer processes (the `nats_cluster` example run by this binary again), shared with
/// `tests/durable_nats.rs`.
#[path = "common/peer_process.rs"]
mod peer_process;

use common::{require_broker, unique_id};
use peer_process::{wait_members, Peer};

/// Not a test: the entry point of the peer processes the scenario below starts (this binary run again
/// by [`Peer::spawn`]). In a normal test run, returns at once.
#[test]
fn peer_process_entry_point() {
    peer_process::entry_point();
}

/// The client: counts acknowledged writes and writes of unknown outcome.
#[derive(Default)]
struct Client {
    next: u64,
    acked: i64,
    unknown: i64,
}

impl Client {
    /// One `add 1` through `peer`.
    async fn write(&mut self, peer: &mut Peer) {
        self.next += 1;
        let tag = format!("w{}", self.next);
        peer.send(&format!("add 1 {tag}"));
        match peer.add_answer(&tag).await {
            Some(Ok(_)) => self.acked += 1,
            Some(Err(line)) => {
                println!("[{}] {line}", peer.id);
                self.unknown += 1;
            }
            None => {
                println!("[{}] no answer to {tag}", peer.id);
                self.unknown += 1;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_leader_kill_and_follower_pause_lose_no_acknowledged_write() {
    let url = require_broker("NATS", NATS_URL_ENV, DEFAULT_NATS_URL, 4222).await;
    scenario("nats", &url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_leader_kill_and_follower_pause_lose_no_acknowledged_write() {
    use hamok::transports::rabbitmq::{AMQP_URL_ENV, DEFAULT_AMQP_URL};
    let url = require_broker("RabbitMQ", AMQP_URL_ENV, DEFAULT_AMQP_URL, 5672).await;
    scenario("rabbitmq", &url).await;
}

/// The scenario over `transport` (`nats` or `rabbitmq`) at `url`.
async fn scenario(transport: &str, url: &str) {
    let cluster = unique_id(&format!("mp{transport}"));
    let started = Instant::now();
    let mut peers: Vec<Peer> = ["p0", "p1", "p2"]
        .iter()
        .map(|id| Peer::spawn(id, &cluster, transport, url))
        .collect();
    for p in &mut peers {
        p.expect("ready ", Duration::from_secs(30))
            .await
            .unwrap_or_else(|| panic!("peer {} never became ready", p.id));
    }
    wait_members(&mut peers[0], "p0,p1,p2").await;
    println!(
        "[{transport}] 3 processes formed a cluster in {:?}",
        started.elapsed()
    );
    let mut client = Client::default();
    for i in 0..15 {
        let n = peers.len();
        client.write(&mut peers[i % n]).await;
    }

    // SIGKILL the leader; the client keeps writing through the others.
    let leader = peers[0].leader().await;
    let at = peers
        .iter()
        .position(|p| p.id == leader)
        .expect("the leader is one of ours");
    let t = Instant::now();
    peers[at].child.kill().expect("SIGKILL the leader");
    let _ = peers[at].child.wait();
    let dead = peers.remove(at);
    drop(dead);
    client.write(&mut peers[0]).await;
    println!(
        "[{transport}] SIGKILL of leader {leader}: next write answered after {:?}",
        t.elapsed()
    );
    for i in 0..15 {
        let n = peers.len();
        client.write(&mut peers[i % n]).await;
    }
    let mut rest: Vec<&str> = peers.iter().map(|p| p.id.as_str()).collect();
    rest.sort();
    let rest = rest.join(",");
    wait_members(&mut peers[0], &rest).await;

    // A replacement joins, so that pausing a follower leaves a quorum.
    peers.push(Peer::spawn("p3", &cluster, transport, url));
    let last = peers.len() - 1;
    peers[last]
        .expect("ready ", Duration::from_secs(30))
        .await
        .expect("p3 ready");
    let all = format!("{rest},p3");
    for p in &mut peers {
        wait_members(p, &all).await;
    }

    // SIGSTOP a follower (shorter than peer_max_idle_ms) while the client writes through the others.
    let leader = peers[0].leader().await;
    let paused = peers
        .iter()
        .position(|p| p.id != leader)
        .expect("a follower");
    peers[paused].signal("-STOP");
    let until = Instant::now() + Duration::from_millis(800);
    let mut during = 0;
    while Instant::now() < until {
        let n = peers.len();
        let target = (paused + 1 + during % (n - 1)) % n;
        client.write(&mut peers[target]).await;
        during += 1;
    }
    peers[paused].signal("-CONT");
    println!(
        "[{transport}] {during} writes while {} was stopped",
        peers[paused].id
    );
    for i in 0..15 {
        let n = peers.len();
        client.write(&mut peers[i % n]).await;
    }

    // Every live peer converges on one total holding every acknowledged write.
    let mut totals = Vec::new();
    for p in &mut peers {
        let value: i64 = p.ask("get", "value ").await.parse().expect("a number");
        totals.push((p.id.clone(), value));
    }
    println!(
        "[{transport}] totals {totals:?}: {} acknowledged, {} of unknown outcome",
        client.acked, client.unknown
    );
    let total = totals[0].1;
    assert!(
        totals.iter().all(|(_, v)| *v == total),
        "peers disagree: {totals:?}"
    );
    assert!(
        (client.acked..=client.acked + client.unknown).contains(&total),
        "total {total}: {} acknowledged writes, {} of unknown outcome",
        client.acked,
        client.unknown
    );
    for p in &mut peers {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let local: i64 = p.ask("local", "local ").await.parse().expect("a number");
            if local == total {
                break;
            }
            assert!(Instant::now() < deadline, "{} stuck at {local}", p.id);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    println!(
        "[{transport}] multi-process scenario took {:?}",
        started.elapsed()
    );
}
