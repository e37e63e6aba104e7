//! Helpers of the collection tests: peers on a fresh in-process hub with a unique cluster id and short
//! timings, and bounded waits. Time only bounds waits; no test asserts how long something took.
#![allow(dead_code)] // each test binary uses a different subset

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hamok_collections::register_kinds;
use hamok_runtime::raft::PeerId;
use hamok_runtime::transport::memory::InProcessHub;
use hamok_runtime::{Hamok, HamokBuilder};

/// The bound of most waits: far above what any step needs, so only a real failure reaches it.
pub const WAIT: Duration = Duration::from_secs(15);

/// A cluster id no other test (or earlier run) uses.
pub fn unique_id(name: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "{name}-{}-{}-{nanos}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Peers of one cluster on a hub of their own.
pub struct Cluster {
    pub hub: InProcessHub,
    pub id: String,
    pub peers: Vec<Hamok>,
}

/// A builder with the test timings, on `hub`, in cluster `cluster`, with every collection kind.
pub fn builder(hub: &InProcessHub, cluster: &str, peer: &str) -> HamokBuilder {
    register_kinds(
        Hamok::builder()
            .peer_id(peer)
            .cluster_id(cluster)
            .transport(hub.clone())
            .election_timeout_ms(150)
            .heartbeat_interval_ms(30)
            .peer_max_idle_ms(1_500)
            .request_timeout_ms(5_000),
    )
}

impl Cluster {
    /// `n` peers `p00..`, joined together, with one agreed leader.
    pub async fn start(name: &str, n: usize) -> Cluster {
        Self::start_with(name, n, |b| b).await
    }

    /// Like [`Cluster::start`], with every builder passed through `f` first.
    pub async fn start_with(
        name: &str,
        n: usize,
        f: impl Fn(HamokBuilder) -> HamokBuilder,
    ) -> Cluster {
        let hub = InProcessHub::new();
        let id = unique_id(name);
        let mut peers = Vec::new();
        for i in 0..n {
            let b = f(builder(&hub, &id, &format!("p{i:02}")));
            peers.push(b.build().await.expect("build peer"));
        }
        let tasks: Vec<_> = peers
            .iter()
            .cloned()
            .map(|p| tokio::spawn(async move { p.join().await }))
            .collect();
        for t in tasks {
            t.await.expect("join task").expect("join");
        }
        let cluster = Cluster { hub, id, peers };
        cluster.wait_stable().await;
        cluster
    }

    /// Waits until every peer knows the same leader and every other peer as a member.
    pub async fn wait_stable(&self) {
        let all: BTreeSet<PeerId> = self
            .peers
            .iter()
            .map(|p| p.local_peer_id().clone())
            .collect();
        wait_until("a stable cluster", WAIT, || {
            let leaders: BTreeSet<Option<PeerId>> =
                self.peers.iter().map(|p| p.leader_id()).collect();
            leaders.len() == 1
                && leaders.iter().next().unwrap().is_some()
                && self.peers.iter().all(|p| {
                    let mut expected = all.clone();
                    expected.remove(p.local_peer_id());
                    p.remote_peer_ids().into_iter().collect::<BTreeSet<_>>() == expected
                })
        })
        .await;
    }

    /// The position of the leader.
    pub fn leader(&self) -> usize {
        self.peers
            .iter()
            .position(|p| p.is_leader())
            .expect("a leader")
    }

    /// A follower's position.
    pub fn follower(&self) -> usize {
        self.peers
            .iter()
            .position(|p| !p.is_leader())
            .expect("a follower")
    }

    /// Builds and joins one more peer.
    pub async fn add_peer(&mut self, name: &str) -> Hamok {
        self.add_peer_with(name, |b| b).await
    }

    /// Builds (with `f`) and joins one more peer.
    pub async fn add_peer_with(
        &mut self,
        name: &str,
        f: impl Fn(HamokBuilder) -> HamokBuilder,
    ) -> Hamok {
        let p = f(builder(&self.hub, &self.id, name))
            .build()
            .await
            .expect("build peer");
        p.join().await.expect("join late peer");
        self.peers.push(p.clone());
        p
    }

    pub async fn close(&self) {
        for p in &self.peers {
            p.close().await;
        }
    }
}

/// Polls `f` every 10 ms until it returns `Some`, and panics naming `what` after `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Polls a condition every 10 ms until it holds, and panics naming `what` after `timeout`.
pub async fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    eventually(what, timeout, || {
        let ok = cond();
        async move { ok.then_some(()) }
    })
    .await
}

/// Receives the next event within [`WAIT`].
pub async fn next<T: std::fmt::Debug>(events: &mut hamok_collections::Events<T>) -> T {
    tokio::time::timeout(WAIT, events.recv())
        .await
        .expect("an event in time")
        .expect("an event")
}
