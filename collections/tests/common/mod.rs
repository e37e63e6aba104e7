//! Helpers of the collection tests: peers on a fresh in-process hub with a unique cluster id and short
//! timings, and the bounded waits and cluster helpers of `hamok-testkit` (re-exported). Time only
//! bounds waits; no test asserts how long something took.
#![allow(dead_code)] // each test binary uses a different subset

use hamok_collections::register_kinds;
use hamok_runtime::transport::memory::InProcessHub;
use hamok_runtime::{Hamok, HamokBuilder};
pub use hamok_testkit::cluster::unique_id;
use hamok_testkit::cluster::{close_all, join_all_at_once, known_leader, membership_complete, pid};
pub use hamok_testkit::wait::{wait_until, WAIT};

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
            let b = f(builder(&hub, &id, &pid(i)));
            peers.push(b.build().await.expect("build peer"));
        }
        join_all_at_once(&peers).await;
        let cluster = Cluster { hub, id, peers };
        cluster.wait_stable().await;
        cluster
    }

    /// Waits until every peer knows the same leader and every other peer as a member.
    pub async fn wait_stable(&self) {
        wait_until("a stable cluster", WAIT, || {
            known_leader(&self.peers).is_some() && membership_complete(&self.peers)
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

    /// Closes every peer.
    pub async fn close(&self) {
        close_all(&self.peers).await;
    }
}

/// Receives the next event within [`WAIT`].
pub async fn next<T: std::fmt::Debug>(events: &mut hamok_collections::Events<T>) -> T {
    tokio::time::timeout(WAIT, events.recv())
        .await
        .expect("an event in time")
        .expect("an event")
}
