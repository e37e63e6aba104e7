//! Regression tests of two faults found by using the library as a new user would (issue 10), each at
//! the public API:
//!
//! 1. a linearizable read on a cut-off follower answered `Ok` with data overwritten by the majority
//!    (the read barrier's failure was ignored and the local state returned), and
//!    `wait_until_linearizable` on a peer that never joined answered `Ok(0)`;
//! 2. two followers cut off together for longer than `peer_max_idle_ms` were removed by the leader and
//!    never rejoined after the heal (each one's pre-votes kept the other's idle timer fresh), while
//!    still reporting `is_joined() == true`.
//!
//! Time only bounds waits; nothing here asserts how long a step took.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use hamok::prelude::*;
use hamok::runtime::raft::PeerId;

/// Builds peers `ids` with the collections registered, on the cluster's hub, and joins them together.
async fn start_with_collections(cluster: &TestCluster, ids: &[String]) -> Vec<Hamok> {
    let mut peers = Vec::new();
    for id in ids {
        let o = &cluster.opts;
        let peer = register_kinds(Hamok::builder())
            .peer_id(id.clone())
            .cluster_id(cluster.cluster_id.clone())
            .transport(cluster.hub.clone())
            .election_timeout_ms(o.election_timeout_ms)
            .heartbeat_interval_ms(o.heartbeat_interval_ms)
            .peer_max_idle_ms(o.peer_max_idle_ms)
            .request_timeout_ms(o.request_timeout_ms)
            .build()
            .await
            .unwrap_or_else(|e| panic!("build {id}: {e}"));
        peers.push(peer);
    }
    join_all_at_once(&peers).await;
    peers
}

/// Three peers; a follower is isolated; the majority overwrites a key (acknowledged). Every
/// linearizable read on the isolated follower, through every public read path, fails with a typed
/// error or returns the new value: never the overwritten one. Before the fix the first read timed out
/// and later ones answered the old value at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn linearizable_reads_on_a_cut_off_follower_never_return_overwritten_data() {
    let opts = Opts {
        request_timeout_ms: 400,
        // Long enough that the follower is still a member (not removed) for most of the reads below,
        // short enough that it also starts rejoining during them.
        peer_max_idle_ms: 1_500,
        ..Opts::default()
    };
    let cluster = TestCluster::new("stale-read", opts);
    let ids: Vec<String> = (0..3).map(pid).collect();
    let peers = start_with_collections(&cluster, &ids).await;
    let leader = agreed_leader(&peers).await;
    wait_membership(&peers).await;
    let follower = (leader + 1) % 3;
    let maps: Vec<HamokMap<String, String>> = {
        let mut maps = Vec::new();
        for p in &peers {
            maps.push(p.get_or_create_map("m").await.expect("open map"));
        }
        maps
    };
    maps[leader]
        .set("k".into(), "old".into())
        .await
        .expect("first write");
    for m in &maps {
        assert_eq!(
            m.get_linearizable(&"k".into()).await.expect("read before"),
            Some("old".to_string())
        );
    }

    cluster.hub.isolate(peers[follower].local_peer_id());
    maps[leader]
        .set("k".into(), "new".into())
        .await
        .expect("majority overwrite");
    // The follower still holds the old value locally (it cannot have heard of the overwrite).
    assert_eq!(
        maps[follower].get(&"k".into()).expect("local read"),
        Some("old".to_string())
    );

    // Reads on the isolated follower for a while (it times out, then starts rejoining): each one fails
    // with a typed error. None may answer the overwritten value, and none can answer the new one.
    let mut errors = BTreeSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_millis(3_000);
    let mut reads = 0;
    while tokio::time::Instant::now() < deadline {
        reads += 1;
        match maps[follower].get_linearizable(&"k".into()).await {
            Ok(v) => panic!("read {reads} on the isolated follower answered {v:?}"),
            Err(e) => errors.insert(format!("{e:?}")),
        };
        match maps[follower].sync().await {
            Ok(()) => panic!("sync {reads} on the isolated follower succeeded"),
            Err(e) => errors.insert(format!("{e:?}")),
        };
        match peers[follower]
            .wait_until_linearizable(Duration::from_millis(300))
            .await
        {
            Ok(i) => panic!("wait_until_linearizable {reads} answered Ok({i}) while isolated"),
            Err(e) => errors.insert(format!("{e:?}")),
        };
    }
    println!("isolated follower: {reads} rounds of reads, errors seen: {errors:?}");

    // After the heal the follower reads the new value.
    cluster.hub.heal();
    let fresh = eventually("the healed follower reads the new value", WAIT, || {
        let m = maps[follower].clone();
        async move { m.get_linearizable(&"k".into()).await.ok() }
    })
    .await;
    assert_eq!(fresh, Some("new".to_string()));
    close_all(&peers).await;
}

/// `wait_until_linearizable` on a peer that never joined is an error, not `Ok(0)`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_until_linearizable_before_join_is_an_error() {
    let cluster = TestCluster::new("never-joined", Opts::default());
    let peer = cluster.peer("p00").await;
    let r = peer
        .wait_until_linearizable(Duration::from_millis(200))
        .await;
    assert_eq!(r, Err(HamokError::NotJoined));
    peer.close().await;
}

/// Five peers; two followers are cut off together for longer than `peer_max_idle_ms`; the leader
/// removes both. While outside the configuration they say so (`is_joined()` false, a `Rejoining`
/// event); after the heal both find the cluster and rejoin by themselves: all five are voters again
/// and the rejoined peers' writes and linearizable reads succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_peers_removed_together_rejoin_by_themselves() {
    let opts = Opts {
        peer_max_idle_ms: 800,
        ..Opts::default()
    };
    let cluster = TestCluster::new("pair-rejoin", opts);
    let ids: Vec<String> = (0..5).map(pid).collect();
    let peers = start_with_collections(&cluster, &ids).await;
    let leader = agreed_leader(&peers).await;
    wait_membership(&peers).await;
    let cut: Vec<usize> = vec![(leader + 1) % 5, (leader + 2) % 5];
    let cut_ids: Vec<PeerId> = cut
        .iter()
        .map(|&i| peers[i].local_peer_id().clone())
        .collect();
    let rest_ids: Vec<PeerId> = (0..5)
        .filter(|i| !cut.contains(i))
        .map(|i| peers[i].local_peer_id().clone())
        .collect();
    let logs: Vec<EventLog> = cut.iter().map(|&i| EventLog::collect(&peers[i])).collect();

    cluster.hub.partition(&[&cut_ids, &rest_ids]);
    wait_until("the leader removed both cut-off followers", WAIT, || {
        let remote: BTreeSet<PeerId> = peers[leader].remote_peer_ids().into_iter().collect();
        cut_ids.iter().all(|id| !remote.contains(id))
    })
    .await;
    for (n, &i) in cut.iter().enumerate() {
        wait_until(
            &format!("{} says it is not joined", cut_ids[n]),
            WAIT,
            || !peers[i].is_joined(),
        )
        .await;
        logs[n]
            .wait_for("a Rejoining event", |e| *e == HamokEvent::Rejoining)
            .await;
    }

    cluster.hub.heal();
    wait_until("all five are joined voters again", WAIT, || {
        peers.iter().all(|p| p.is_joined())
            && peers[leader].remote_peer_ids().len() == 4
            && peers.iter().all(|p| p.leader_id().is_some())
    })
    .await;
    wait_membership(&peers).await;
    for &i in &cut {
        let map: HamokMap<String, u64> = peers[i].get_or_create_map("after").await.expect("open");
        map.set(peers[i].local_peer_id().to_string(), 1)
            .await
            .expect("write from a rejoined peer");
        assert_eq!(
            map.get_linearizable(&peers[i].local_peer_id().to_string())
                .await
                .expect("linearizable read on a rejoined peer"),
            Some(1)
        );
    }
    close_all(&peers).await;
}
