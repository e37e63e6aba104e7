//! Peers of a test cluster, whatever they are built on: unique ids, peer ids, joining and closing them
//! together, and waiting for one leader and a complete membership.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use hamok_runtime::raft::PeerId;
use hamok_runtime::Hamok;

use crate::wait::{eventually, wait_until, WAIT};

/// An id starting with `name` that no other test, run or process uses (a cluster id, a storage key):
/// `name`, the process id, a counter and the time in nanoseconds, joined by `-` (so a valid broker
/// subject token whenever `name` is one).
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

/// `p00`, `p01`, ...: ids ordered as numbered (the lowest founds a cluster).
pub fn pid(n: usize) -> String {
    format!("p{n:02}")
}

/// Joins every peer concurrently (each in its own task) and panics if one fails.
pub async fn join_all_at_once(peers: &[Hamok]) {
    let tasks: Vec<_> = peers
        .iter()
        .cloned()
        .map(|p| tokio::spawn(async move { (p.local_peer_id().clone(), p.join().await) }))
        .collect();
    for t in tasks {
        let (id, result) = t.await.expect("join task");
        result.unwrap_or_else(|e| panic!("join of {id} failed: {e}"));
    }
}

/// Closes every peer.
pub async fn close_all(peers: &[Hamok]) {
    for p in peers {
        p.close().await;
    }
}

/// The leader every peer of `peers` knows, when they all know the same one.
pub fn known_leader(peers: &[Hamok]) -> Option<PeerId> {
    let leaders: BTreeSet<Option<PeerId>> = peers.iter().map(|p| p.leader_id()).collect();
    match leaders.into_iter().collect::<Vec<_>>().as_slice() {
        [Some(l)] => Some(l.clone()),
        _ => None,
    }
}

/// The position in `peers` of the leader they all know, when it is one of them and says it leads.
pub fn leader_among(peers: &[Hamok]) -> Option<usize> {
    let leader = known_leader(peers)?;
    peers
        .iter()
        .position(|p| *p.local_peer_id() == leader)
        .filter(|&i| peers[i].is_leader())
}

/// Whether every peer of `peers` has exactly the others as its remote peers.
pub fn membership_complete(peers: &[Hamok]) -> bool {
    let all: BTreeSet<PeerId> = peers.iter().map(|p| p.local_peer_id().clone()).collect();
    peers.iter().all(|p| {
        let mut expected = all.clone();
        expected.remove(p.local_peer_id());
        p.remote_peer_ids().into_iter().collect::<BTreeSet<_>>() == expected
    })
}

/// Waits (up to [`WAIT`]) until every peer of `peers` knows the same leader, that leader is one of
/// them and says it leads; returns its position in `peers`.
pub async fn agreed_leader(peers: &[Hamok]) -> usize {
    eventually("all peers agree on one leader among them", WAIT, || {
        let found = leader_among(peers);
        async move { found }
    })
    .await
}

/// Waits (up to [`WAIT`]) until every peer of `peers` has exactly the others as its remote peers.
pub async fn wait_membership(peers: &[Hamok]) {
    let all: BTreeSet<&PeerId> = peers.iter().map(|p| p.local_peer_id()).collect();
    wait_until(
        &format!("every peer's remote peers are the others of {all:?}"),
        WAIT,
        || membership_complete(peers),
    )
    .await
}
