//! Cluster-level integration tests: whole `Hamok` peers on an in-process hub, in the scenarios users of
//! the reference library run (three peers, join/leave/rejoin, re-election, rolling replacement, late
//! catch-up), plus the faults the reference cannot survive (partitions, duplicated frames, garbage on
//! the bus).
//!
//! Every test builds its own [`InProcessHub`](hamok::runtime::transport::memory::InProcessHub) and a
//! unique cluster id. Time only bounds waits; nothing here asserts how long a step took.

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use hamok::runtime::raft::{PeerId, Role};
use hamok::runtime::transport::{Inbound, Transport};
use hamok::runtime::wire::{self, Frame, HamokMessage, Hello, PROTOCOL_VERSION};
use hamok::runtime::{Hamok, HamokError, HamokEvent, JoinState};

fn ids(peers: &[Hamok]) -> Vec<PeerId> {
    peers.iter().map(|p| p.local_peer_id().clone()).collect()
}

fn has_key(state: &SmState, key: &str, value: &str) -> bool {
    state.kv.get(key).map(String::as_str) == Some(value)
}

// -------------------------------------------------------------------------------------------------
// 1. Three peers started at the same moment
// -------------------------------------------------------------------------------------------------

/// Three peers joining at the same instant end in one cluster with one leader, each knowing the other
/// two; a write from each is visible on every peer, by linearizable read and, once the commit head is
/// applied, by local read. Repeated on three fresh clusters, since a split is a race.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_peers_started_together_form_one_cluster() {
    for attempt in 0..3 {
        let cluster = TestCluster::new("three", Opts::default());
        let peers = cluster.start(&["p00", "p01", "p02"]).await;

        let leader = agreed_leader(&peers).await;
        let leader_id = peers[leader].local_peer_id().clone();
        for p in &peers {
            assert_eq!(p.leader_id(), Some(leader_id.clone()), "attempt {attempt}");
            assert_eq!(
                p.is_leader(),
                p.local_peer_id() == &leader_id,
                "attempt {attempt}"
            );
        }
        assert_eq!(
            peers.iter().filter(|p| p.state() == Role::Leader).count(),
            1
        );
        wait_membership(&peers).await;
        for p in &peers {
            let remote: BTreeSet<PeerId> = p.remote_peer_ids().into_iter().collect();
            let others: BTreeSet<PeerId> = ids(&peers)
                .into_iter()
                .filter(|id| id != p.local_peer_id())
                .collect();
            assert_eq!(remote, others, "remote peers of {}", p.local_peer_id());
            assert_eq!(p.stats().status.remote_peers(), 2);
        }

        create_collection(&peers[0]).await;
        let mut last_index = 0;
        for (i, p) in peers.iter().enumerate() {
            let index = put(p, &format!("from-{i}"), &format!("v{i}"))
                .await
                .unwrap_or_else(|e| panic!("write from {}: {e}", p.local_peer_id()));
            last_index = last_index.max(index);
        }

        // Local reads, once each peer knows the writes are committed and has applied its commit head.
        for p in &peers {
            wait_until("the peer learns the last write is committed", WAIT, || {
                p.stats().status.raft.commit_index >= last_index
            })
            .await;
            let applied = p.wait_until_commit_head(WAIT).await.expect("commit head");
            assert!(applied >= last_index);
            let state = local_state(p).await;
            for i in 0..3 {
                assert!(
                    has_key(&state, &format!("from-{i}"), &format!("v{i}")),
                    "local read on {} misses from-{i}: {state:?}",
                    p.local_peer_id()
                );
            }
        }
        // Linearizable reads.
        for p in &peers {
            let state = lin_state(p).await;
            assert_eq!(state.kv.len(), 3, "on {}: {state:?}", p.local_peer_id());
            for i in 0..3 {
                assert!(has_key(&state, &format!("from-{i}"), &format!("v{i}")));
            }
            p.wait_until_linearizable(WAIT)
                .await
                .expect("linearizable barrier");
        }
        close_all(&peers).await;
    }
}

// -------------------------------------------------------------------------------------------------
// 2. Join, leave, rejoin
// -------------------------------------------------------------------------------------------------

/// A peer leaves (the others see it go and are two), then joins again with the same handle and gets
/// the state written while it was away; all three are members again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_leave_rejoin() {
    let cluster = TestCluster::new("rejoin", Opts::default());
    let peers = cluster.start(&["p00", "p01", "p02"]).await;
    agreed_leader(&peers).await;
    wait_membership(&peers).await;
    create_collection(&peers[0]).await;
    put(&peers[0], "before", "1").await.expect("write before");

    let logs: Vec<EventLog> = peers.iter().map(EventLog::collect).collect();
    let leader = agreed_leader(&peers).await;
    // The leaver is a follower (leadership hand-over is test 3's subject).
    let leaver_pos = (0..3).find(|&i| i != leader).expect("a follower");
    let leaver = peers[leaver_pos].clone();
    let leaver_id = leaver.local_peer_id().clone();
    let stayers: Vec<Hamok> = peers
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != leaver_pos)
        .map(|(_, p)| p.clone())
        .collect();

    leaver.leave().await.expect("leave");
    assert!(!leaver.is_joined());
    for (i, log) in logs.iter().enumerate() {
        if i != leaver_pos {
            log.wait_for("RemotePeerLeft of the leaver", |e| {
                *e == HamokEvent::RemotePeerLeft(leaver_id.clone())
            })
            .await;
        }
    }
    // The leaver's event collector is a task of its own: wait for it rather than race it.
    logs[leaver_pos]
        .wait_for("Left on the leaver", |e| *e == HamokEvent::Left)
        .await;
    wait_membership(&stayers).await;
    for p in &stayers {
        assert_eq!(p.remote_peer_ids().len(), 1);
    }
    put(&stayers[0], "while-away", "2")
        .await
        .expect("write while away");
    assert!(
        matches!(
            put(&leaver, "from-left", "x").await,
            Err(HamokError::NotJoined)
        ),
        "a peer that left refuses writes"
    );

    leaver.join().await.expect("rejoin");
    wait_membership(&peers).await;
    for p in &peers {
        assert_eq!(p.remote_peer_ids().len(), 2, "on {}", p.local_peer_id());
    }
    for (i, log) in logs.iter().enumerate() {
        if i != leaver_pos {
            log.wait_for("RemotePeerJoined of the rejoined peer", |e| {
                *e == HamokEvent::RemotePeerJoined(leaver_id.clone())
            })
            .await;
        }
    }
    let state = lin_state(&leaver).await;
    assert!(
        has_key(&state, "before", "1") && has_key(&state, "while-away", "2"),
        "{state:?}"
    );
    assert!(!state.kv.contains_key("from-left"));
    put(&leaver, "after", "3")
        .await
        .expect("write after rejoin");
    for p in &peers {
        let state = lin_state(p).await;
        assert_eq!(state.kv.len(), 3, "on {}: {state:?}", p.local_peer_id());
        assert!(has_key(&state, "after", "3"));
    }
    close_all(&peers).await;
}

// -------------------------------------------------------------------------------------------------
// 3. Re-election after the leader leaves
// -------------------------------------------------------------------------------------------------

/// Ten rounds: the leader leaves, one of the two others is elected, a write succeeds, and a fresh peer
/// joins to keep three; it sees every write so far.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reelection_after_leader_leaves_ten_rounds() {
    let cluster = TestCluster::new("reelect", Opts::default());
    let mut peers = cluster.start(&["p00", "p01", "p02"]).await;
    agreed_leader(&peers).await;
    wait_membership(&peers).await;
    create_collection(&peers[0]).await;
    for round in 0..10 {
        let leader = agreed_leader(&peers).await;
        let old = peers.remove(leader);
        let old_id = old.local_peer_id().clone();
        old.leave()
            .await
            .unwrap_or_else(|e| panic!("round {round}: leave of leader {old_id}: {e}"));

        let new_leader = agreed_leader(&peers).await;
        assert_ne!(peers[new_leader].local_peer_id(), &old_id);
        wait_membership(&peers).await; // the two survivors, without the leaver
        let follower = &peers[1 - new_leader];
        put(follower, &format!("round-{round}"), "ok")
            .await
            .unwrap_or_else(|e| panic!("round {round}: write after re-election: {e}"));
        old.close().await;

        let fresh = cluster.peer(&pid(3 + round)).await;
        fresh
            .join()
            .await
            .unwrap_or_else(|e| panic!("round {round}: join of {}: {e}", fresh.local_peer_id()));
        peers.push(fresh.clone());
        wait_membership(&peers).await;
        let state = lin_state(&fresh).await;
        for r in 0..=round {
            assert!(
                has_key(&state, &format!("round-{r}"), "ok"),
                "round {round}: {state:?}"
            );
        }
    }
    close_all(&peers).await;
}

// -------------------------------------------------------------------------------------------------
// 4. Rolling replacement under writes
// -------------------------------------------------------------------------------------------------

/// Every peer is replaced (ten rounds of join-new / leave-old) while a writer submits unique values one
/// after the other, retrying each until acknowledged; at the end every acknowledged write is on every
/// remaining peer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_replacement_loses_no_acknowledged_write() {
    let cluster = TestCluster::new("rolling", Opts::default());
    let initial = cluster.start(&["p00", "p01", "p02"]).await;
    agreed_leader(&initial).await;
    wait_membership(&initial).await;
    create_collection(&initial[0]).await;

    let members = Arc::new(Mutex::new(initial.clone()));
    let stop = Arc::new(AtomicBool::new(false));
    let acked: Arc<Mutex<Vec<String>>> = Arc::new(Mutex::new(Vec::new()));
    let errors = Arc::new(AtomicU64::new(0));
    let writer = {
        let (members, stop, acked, errors) =
            (members.clone(), stop.clone(), acked.clone(), errors.clone());
        tokio::spawn(async move {
            let mut n = 0u64;
            let mut turn = 0usize;
            'writes: while !stop.load(Ordering::Relaxed) {
                let key = format!("w{n:05}");
                loop {
                    if stop.load(Ordering::Relaxed) {
                        break 'writes;
                    }
                    turn += 1;
                    let peer = {
                        let m = members.lock().unwrap();
                        m[turn % m.len()].clone()
                    };
                    let cmd = put_cmd(&key, &key);
                    let op = hamok::runtime::state_machine::Op::Apply {
                        collection: COLLECTION.into(),
                        payload: cmd.into(),
                        fence: None,
                    };
                    match peer
                        .submit_op_with_timeout(op, Duration::from_secs(2))
                        .await
                    {
                        Ok(_) => {
                            acked.lock().unwrap().push(key);
                            break;
                        }
                        Err(_) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                    }
                }
                n += 1;
            }
        })
    };

    let mut all_built = initial.clone();
    for round in 0..10 {
        let fresh = cluster.peer(&pid(3 + round)).await;
        fresh
            .join()
            .await
            .unwrap_or_else(|e| panic!("round {round}: join of {}: {e}", fresh.local_peer_id()));
        all_built.push(fresh.clone());
        // The writer keeps using the oldest peer while it leaves: writes it acknowledges there must
        // survive its departure, and writes it refuses are retried elsewhere.
        let (old, current) = {
            let mut m = members.lock().unwrap();
            m.push(fresh);
            (m[0].clone(), m[1..].to_vec())
        };
        let with_old = members.lock().unwrap().clone();
        wait_membership(&with_old).await;
        old.leave()
            .await
            .unwrap_or_else(|e| panic!("round {round}: leave of {}: {e}", old.local_peer_id()));
        members.lock().unwrap().remove(0);
        old.close().await;
        wait_membership(&current).await;
        agreed_leader(&current).await;
    }
    // Let the writer see the final cluster for a moment, then stop it.
    let before_stop = acked.lock().unwrap().len();
    wait_until(
        "the writer makes progress on the final cluster",
        WAIT,
        || acked.lock().unwrap().len() >= before_stop + 10,
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    tokio::time::timeout(Duration::from_secs(10), writer)
        .await
        .expect("writer stops")
        .expect("writer task");

    let acked = acked.lock().unwrap().clone();
    let members = members.lock().unwrap().clone();
    assert!(
        acked.len() >= 10,
        "the writer made progress: {} acknowledged",
        acked.len()
    );
    println!(
        "rolling replacement: {} writes acknowledged, {} failed attempts retried",
        acked.len(),
        errors.load(Ordering::Relaxed)
    );
    let reference = lin_state(&members[0]).await;
    for p in &members {
        let state = lin_state(p).await;
        let missing: Vec<&String> = acked.iter().filter(|k| !has_key(&state, k, k)).collect();
        assert!(
            missing.is_empty(),
            "{} lost {} acknowledged writes: {:?}",
            p.local_peer_id(),
            missing.len(),
            &missing[..missing.len().min(20)]
        );
        assert_eq!(state, reference, "the survivors agree");
    }
    close_all(&members).await;
}

// -------------------------------------------------------------------------------------------------
// 5. Late peer catching up from a snapshot
// -------------------------------------------------------------------------------------------------

/// With snapshots every 100 entries, 2,000 writes are compacted away; a peer joining afterwards gets a
/// snapshot and with it the whole state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_peer_catches_up_from_snapshot_after_compaction() {
    const WRITES: usize = 2_000;
    let opts = Opts {
        snapshot_after_entries: Some(100),
        ..Opts::default()
    };
    let cluster = TestCluster::new("late", opts);
    let peers = cluster.start(&["p00", "p01", "p02"]).await;
    let leader = agreed_leader(&peers).await;
    wait_membership(&peers).await;
    create_collection(&peers[0]).await;

    // 20 concurrent writers of 100 sequential writes each, spread over the three peers.
    let mut tasks = Vec::new();
    for w in 0..20 {
        let peer = peers[w % 3].clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..WRITES / 20 {
                let k = format!("k{:05}", w * (WRITES / 20) + i);
                put(&peer, &k, &k)
                    .await
                    .unwrap_or_else(|e| panic!("write {k} on {}: {e}", peer.local_peer_id()));
            }
        }));
    }
    for t in tasks {
        t.await.expect("writer");
    }
    let stats = peers[leader].stats();
    assert!(
        stats.counters.snapshots_taken >= 1,
        "the leader compacted its log: {stats:?}"
    );
    assert!(stats.status.raft.snapshot_index > 0, "{stats:?}");

    let late = cluster.peer("p03").await;
    late.join().await.expect("late join");
    let mut all = peers.clone();
    all.push(late.clone());
    wait_membership(&all).await;
    let state = lin_state(&late).await;
    assert_eq!(state.kv.len(), WRITES, "the late peer has the full state");
    for i in 0..WRITES {
        let k = format!("k{i:05}");
        assert!(has_key(&state, &k, &k), "missing {k}");
    }
    let late_stats = late.stats();
    assert!(
        late_stats.counters.snapshots_installed >= 1,
        "the late peer was caught up by a snapshot: {late_stats:?}"
    );
    assert_eq!(state, lin_state(&peers[0]).await);
    // And it keeps up with the log from there.
    put(&late, "after-catch-up", "1")
        .await
        .expect("write from the late peer");
    for p in &all {
        assert!(has_key(&lin_state(p).await, "after-catch-up", "1"));
    }
    close_all(&all).await;
}

// -------------------------------------------------------------------------------------------------
// 6. Partition 2 | 3
// -------------------------------------------------------------------------------------------------

/// Five peers split 2|3 with the leader on the minority side: the minority commits nothing (its leader
/// steps down; a write there fails), the majority elects a leader and commits; after healing all five
/// converge on the majority's state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_minority_cannot_commit_and_heal_converges() {
    let opts = Opts {
        // Longer than the partition lasts: this test is about quorum, not about removing silent peers.
        peer_max_idle_ms: 20_000,
        ..Opts::default()
    };
    let cluster = TestCluster::new("partition", opts);
    let names: Vec<String> = (0..5).map(pid).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let peers = cluster.start(&names).await;
    let leader = agreed_leader(&peers).await;
    wait_membership(&peers).await;
    create_collection(&peers[0]).await;
    let mut acked: Vec<(String, String)> = Vec::new();
    for (i, p) in peers.iter().enumerate() {
        let (k, v) = (format!("before-{i}"), format!("{i}"));
        put(p, &k, &v).await.expect("write before the partition");
        acked.push((k, v));
    }

    // The leader and one follower on the minority side.
    let minority_pos = [leader, (leader + 1) % 5];
    let minority: Vec<Hamok> = minority_pos.iter().map(|&i| peers[i].clone()).collect();
    let majority: Vec<Hamok> = (0..5)
        .filter(|i| !minority_pos.contains(i))
        .map(|i| peers[i].clone())
        .collect();
    let (min_ids, maj_ids) = (ids(&minority), ids(&majority));
    cluster.hub.partition(&[&min_ids, &maj_ids]);

    // Writes on the minority side fail (timeout, or no quorum) and never succeed while partitioned.
    let short = Duration::from_millis(1_000);
    let minority_writes: Vec<_> = minority
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let p = p.clone();
            tokio::spawn(async move {
                let op = hamok::runtime::state_machine::Op::Apply {
                    collection: COLLECTION.into(),
                    payload: put_cmd(&format!("minority-{i}"), "lost").into(),
                    fence: None,
                };
                p.submit_op_with_timeout(op, short).await
            })
        })
        .collect();
    // A write on the majority side succeeds once it has elected a leader.
    put(&majority[0], "majority", "won")
        .await
        .expect("majority write");
    acked.push(("majority".into(), "won".into()));
    let new_leader = agreed_leader(&majority).await;
    assert!(!min_ids.contains(majority[new_leader].local_peer_id()));
    for (i, t) in minority_writes.into_iter().enumerate() {
        let r = t.await.expect("minority write task");
        assert!(
            r.is_err(),
            "minority write {i} succeeded while partitioned: {r:?}"
        );
    }
    // Check-quorum: the old leader steps down; nobody on the minority side leads.
    wait_until("no minority peer believes it leads", WAIT, || {
        minority.iter().all(|p| !p.is_leader())
    })
    .await;
    for i in 0..2 {
        let state = local_state(&majority[0]).await;
        assert!(
            !state.kv.contains_key(&format!("minority-{i}")),
            "{state:?}"
        );
    }
    for (i, p) in majority.iter().enumerate() {
        let (k, v) = (format!("during-{i}"), format!("{i}"));
        put(p, &k, &v)
            .await
            .expect("majority write during partition");
        acked.push((k, v));
    }

    cluster.hub.heal();
    let final_leader = agreed_leader(&peers).await;
    assert!(maj_ids.contains(peers[final_leader].local_peer_id()));
    let states = eventually(
        "all five converge on one state with every acknowledged write",
        WAIT,
        || {
            let peers = peers.clone();
            let acked = acked.clone();
            async move {
                let mut states = Vec::new();
                for p in &peers {
                    match read_state(p, true).await {
                        Ok(Some(s)) => states.push(s),
                        _ => return None,
                    }
                }
                let same = states.windows(2).all(|w| w[0] == w[1]);
                let complete = acked.iter().all(|(k, v)| has_key(&states[0], k, v));
                (same && complete).then_some(states)
            }
        },
    )
    .await;
    let minority_applied: Vec<&String> = states[0]
        .kv
        .keys()
        .filter(|k| k.starts_with("minority-"))
        .collect();
    println!("partition: minority writes applied after heal: {minority_applied:?}");
    put(&minority[0], "after-heal", "1")
        .await
        .expect("write after heal from the old minority");
    for p in &peers {
        assert!(has_key(&lin_state(p).await, "after-heal", "1"));
    }
    close_all(&peers).await;
}

/// A follower cut off from the leader's frames (one way: its own still arrive) submits a write: the
/// leader applies it, then compacts its log past the follower. The follower catches up from a snapshot
/// that already contains its write, so it never applies it one by one: it must answer the write with
/// its real response (from the sessions' response cache in the snapshot) instead of leaving it waiting
/// until its timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_covered_by_an_installed_snapshot_is_answered() {
    let opts = Opts {
        snapshot_after_entries: Some(50),
        peer_max_idle_ms: 60_000,
        request_timeout_ms: 30_000,
        ..Opts::default()
    };
    let cluster = TestCluster::new("snapans", opts);
    let peers = cluster.start(&["p00", "p01", "p02"]).await;
    let leader = agreed_leader(&peers).await;
    wait_membership(&peers).await;
    create_collection(&peers[leader]).await;
    let follower = (leader + 1) % 3;
    let ids = ids(&peers);
    // Everything of the current term is applied on the follower before the cut.
    put(&peers[leader], "before", "1")
        .await
        .expect("write before the cut");
    eventually(
        "follower applied the first write",
        Duration::from_secs(10),
        || async { has_key(&local_state(&peers[follower]).await, "before", "1").then_some(()) },
    )
    .await;

    cluster.hub.block(&ids[leader], &ids[follower]);
    let writer = peers[follower].clone();
    let write = tokio::spawn(async move { put(&writer, "cut-off", "1").await });
    eventually(
        "the leader applied the follower's write",
        Duration::from_secs(10),
        || async { has_key(&lin_state(&peers[leader]).await, "cut-off", "1").then_some(()) },
    )
    .await;
    for i in 0..200 {
        put(&peers[leader], &format!("fill{i:03}"), "1")
            .await
            .expect("fill write");
    }
    assert!(
        peers[leader].stats().status.raft.snapshot_index > 0,
        "the leader compacted"
    );
    cluster.hub.unblock(&ids[leader], &ids[follower]);

    let answer = tokio::time::timeout(Duration::from_secs(20), write)
        .await
        .expect("the write is answered before its 30 s timeout")
        .expect("writer task");
    assert!(
        peers[follower].stats().counters.snapshots_installed >= 1,
        "the follower caught up from a snapshot"
    );
    let index = answer.expect("answered with the response cached in the snapshot");
    assert!(
        index > 0,
        "the response names the log index the write applied at"
    );
    let state = lin_state(&peers[follower]).await;
    assert!(has_key(&state, "cut-off", "1"));
    assert_eq!(state, lin_state(&peers[leader]).await);
    close_all(&peers).await;
}

// -------------------------------------------------------------------------------------------------
// 7. Duplicated and retried writes apply once
// -------------------------------------------------------------------------------------------------

/// Every frame on the bus delivered twice: N increments submitted from a follower give exactly N, and
/// no increment id is applied twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicated_frames_apply_each_increment_once() {
    const N: u64 = 200;
    let cluster = TestCluster::new("dup", Opts::default());
    let peers = cluster.start(&["p00", "p01", "p02"]).await;
    let leader = agreed_leader(&peers).await;
    wait_membership(&peers).await;
    create_collection(&peers[0]).await;

    cluster.hub.set_duplicate_rate(1.0);
    let follower = &peers[(leader + 1) % 3];
    for id in 0..N {
        follower
            .submit(COLLECTION, incr_cmd(id))
            .await
            .unwrap_or_else(|e| panic!("increment {id}: {e}"));
    }
    assert!(
        cluster.hub.stats().duplicated > 0,
        "the hub duplicated frames"
    );
    for p in &peers {
        let state = lin_state(p).await;
        assert_eq!(state.counter, N, "counter on {}", p.local_peer_id());
        assert!(
            state.duplicate_ids().is_empty(),
            "ids applied twice: {:?}",
            state.duplicate_ids()
        );
        assert_eq!(
            state.incr_ids,
            (0..N).collect::<Vec<_>>(),
            "applied in submit order"
        );
    }
    let skipped: u64 = peers
        .iter()
        .map(|p| p.stats().counters.duplicates_skipped)
        .sum();
    println!("duplicated frames: duplicates_skipped over the peers = {skipped}");
    close_all(&peers).await;
}

/// A follower submits increments (each with a unique id, never resubmitted by the test) while the leader
/// is closed without leaving: the final counter is between the acknowledged and the submitted count,
/// every acknowledged id is applied, and no id is applied twice, also with every frame duplicated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forced_leader_change_applies_no_increment_twice() {
    let cluster = TestCluster::new("forced", Opts::default());
    let peers = cluster.start(&["p00", "p01", "p02"]).await;
    let leader = agreed_leader(&peers).await;
    wait_membership(&peers).await;
    create_collection(&peers[0]).await;
    cluster.hub.set_duplicate_rate(1.0);

    let follower = peers[(leader + 1) % 3].clone();
    let acked = Arc::new(Mutex::new(Vec::<u64>::new()));
    let submitted = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (follower, acked, submitted, stop) = (
            follower.clone(),
            acked.clone(),
            submitted.clone(),
            stop.clone(),
        );
        tokio::spawn(async move {
            let mut id = 0u64;
            while !stop.load(Ordering::Relaxed) {
                submitted.store(id + 1, Ordering::Relaxed);
                let op = hamok::runtime::state_machine::Op::Apply {
                    collection: COLLECTION.into(),
                    payload: incr_cmd(id).into(),
                    fence: None,
                };
                if follower
                    .submit_op_with_timeout(op, Duration::from_secs(3))
                    .await
                    .is_ok()
                {
                    acked.lock().unwrap().push(id);
                }
                id += 1;
            }
        })
    };
    wait_until("increments before the leader change", WAIT, || {
        acked.lock().unwrap().len() >= 30
    })
    .await;
    let old_leader = peers[leader].clone();
    old_leader.close().await;
    let survivors: Vec<Hamok> = peers
        .iter()
        .filter(|p| p.local_peer_id() != old_leader.local_peer_id())
        .cloned()
        .collect();
    let before = acked.lock().unwrap().len();
    wait_until("increments after the leader change", WAIT, || {
        acked.lock().unwrap().len() >= before + 30
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    tokio::time::timeout(Duration::from_secs(10), writer)
        .await
        .expect("writer stops")
        .expect("writer task");
    agreed_leader(&survivors).await;

    let acked = acked.lock().unwrap().clone();
    let submitted = submitted.load(Ordering::Relaxed);
    for p in &survivors {
        let state = lin_state(p).await;
        assert!(
            state.duplicate_ids().is_empty(),
            "ids applied twice: {:?}",
            state.duplicate_ids()
        );
        assert!(
            acked.len() as u64 <= state.counter && state.counter <= submitted,
            "acknowledged {} <= counter {} <= submitted {submitted}",
            acked.len(),
            state.counter
        );
        let applied: BTreeSet<u64> = state.incr_ids.iter().copied().collect();
        let lost: Vec<&u64> = acked.iter().filter(|id| !applied.contains(id)).collect();
        assert!(
            lost.is_empty(),
            "acknowledged increments not applied: {lost:?}"
        );
    }
    println!(
        "forced leader change: {} acknowledged of {submitted} submitted, requests_retried on the follower = {}",
        acked.len(),
        follower.stats().counters.requests_retried
    );
    close_all(&survivors).await;
}

// -------------------------------------------------------------------------------------------------
// 8. Garbage and foreign frames
// -------------------------------------------------------------------------------------------------

/// A tiny deterministic generator for garbage bytes.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}

/// An intruder on the bus sends random bytes, truncated frames, misaddressed frames, frames of another
/// cluster and of another protocol version, and forged submits, to every peer while writes go on: the
/// cluster keeps working and each peer counts what it dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_foreign_frames_are_dropped_and_counted() {
    const ROUNDS: u64 = 100;
    let cluster = TestCluster::new("garbage", Opts::default());
    let peers = cluster.start(&["p00", "p01", "p02"]).await;
    let leader = agreed_leader(&peers).await;
    wait_membership(&peers).await;
    create_collection(&peers[0]).await;

    // The intruder: a link on the same hub and cluster that swallows what it receives.
    let slot: Arc<OnceLock<Inbound>> = Arc::new(OnceLock::new());
    let me = slot.clone();
    let inbound = Inbound::new(1024, move |_frame: Bytes| {
        if let Some(i) = me.get() {
            i.processed();
        }
    });
    let _ = slot.set(inbound.clone());
    let intruder = PeerId::from("intruder");
    let link = cluster
        .hub
        .connect(&cluster.cluster_id, intruder.clone(), inbound)
        .await
        .expect("intruder connects");

    let before: Vec<_> = peers.iter().map(|p| p.stats()).collect();
    let writer = {
        let peers = peers.clone();
        tokio::spawn(async move {
            let mut results = Vec::new();
            for i in 0..150 {
                let p = &peers[i % 3];
                results.push(put(p, &format!("g{i}"), "v").await);
            }
            results
        })
    };

    let hello = Hello {
        member: true,
        leader: None,
        term: 1_000,
        joining: false,
        reply: true,
        can_lead: true,
    };
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
    for round in 0..ROUNDS {
        for target in ids(&peers) {
            let frame =
                |cluster: &str, version: u16, to: Option<PeerId>, body: HamokMessage| Frame {
                    version,
                    cluster: cluster.to_string(),
                    incarnation: 0,
                    from: intruder.clone(),
                    to,
                    body,
                };
            // Random bytes.
            let len = (rng.next() % 200) as usize;
            link.send(&target, Bytes::from(rng.bytes(len))).unwrap();
            // A valid frame cut short.
            let valid = wire::encode(&frame(
                &cluster.cluster_id,
                PROTOCOL_VERSION,
                Some(target.clone()),
                HamokMessage::Hello(hello.clone()),
            ))
            .unwrap();
            let cut = 1 + (rng.next() as usize) % (valid.len() - 1);
            link.send(&target, valid.slice(..cut)).unwrap();
            // Addressed to another peer (a misrouting bus).
            let misaddressed = wire::encode(&frame(
                &cluster.cluster_id,
                PROTOCOL_VERSION,
                Some(PeerId::from("nobody")),
                HamokMessage::Goodbye,
            ))
            .unwrap();
            link.send(&target, misaddressed).unwrap();
            // Another cluster sharing the bus.
            let other = wire::encode(&frame(
                "another-cluster",
                PROTOCOL_VERSION,
                Some(target.clone()),
                HamokMessage::Hello(hello.clone()),
            ))
            .unwrap();
            link.send(&target, other).unwrap();
            // A future protocol version.
            let future = wire::encode(&frame(
                &cluster.cluster_id,
                PROTOCOL_VERSION + 1,
                Some(target.clone()),
                HamokMessage::LeaveRequest,
            ))
            .unwrap();
            link.send(&target, future).unwrap();
            // A forged submit whose command is garbage (the leader refuses it).
            let forged = wire::encode(&frame(
                &cluster.cluster_id,
                PROTOCOL_VERSION,
                Some(target.clone()),
                HamokMessage::Submit {
                    requests: vec![wire::Forward {
                        seq: round + 1,
                        command: Bytes::from(rng.bytes(32)),
                    }],
                },
            ))
            .unwrap();
            link.send(&target, forged).unwrap();
        }
        if round % 10 == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    // A broadcast of garbage reaches every peer too.
    link.broadcast(Bytes::from_static(b"\xc1\xc1 not msgpack"))
        .unwrap();

    for (i, r) in writer.await.expect("writer").into_iter().enumerate() {
        r.unwrap_or_else(|e| panic!("write g{i} failed during the garbage: {e}"));
    }
    for (p, b) in peers.iter().zip(&before) {
        let id = p.local_peer_id().clone();
        wait_until(&format!("{id} counts every dropped frame"), WAIT, || {
            let s = p.stats();
            s.counters.dropped_malformed - b.counters.dropped_malformed > ROUNDS * 2
                && s.counters.dropped_misrouted - b.counters.dropped_misrouted >= ROUNDS
                && s.counters.dropped_foreign_cluster - b.counters.dropped_foreign_cluster >= ROUNDS
                && s.counters.dropped_version - b.counters.dropped_version >= ROUNDS
        })
        .await;
        let s = p.stats();
        println!(
            "{id}: dropped_malformed +{} dropped_foreign_cluster +{} dropped_version +{} (leader: {})",
            s.counters.dropped_malformed - b.counters.dropped_malformed,
            s.counters.dropped_foreign_cluster - b.counters.dropped_foreign_cluster,
            s.counters.dropped_version - b.counters.dropped_version,
            p.is_leader()
        );
        assert_eq!(
            s.counters.dropped_foreign_cluster - b.counters.dropped_foreign_cluster,
            ROUNDS
        );
        assert_eq!(
            s.counters.dropped_version - b.counters.dropped_version,
            ROUNDS
        );
        assert_eq!(
            s.counters.dropped_misrouted - b.counters.dropped_misrouted,
            ROUNDS,
            "a sound frame for another peer is misrouted, not malformed"
        );
    }
    // The forged submits entered no log: only the 150 real writes are there.
    for p in &peers {
        let state = lin_state(p).await;
        assert_eq!(state.kv.len(), 150, "on {}", p.local_peer_id());
        assert_eq!(state.counter, 0);
    }
    // The leader also refused every forged submit as malformed (if it led throughout).
    let s = peers[leader].stats();
    if s.status.raft.term == before[leader].status.raft.term && peers[leader].is_leader() {
        assert!(
            s.counters.dropped_malformed - before[leader].counters.dropped_malformed > ROUNDS * 3,
            "{s:?}"
        );
    }
    link.close();
    close_all(&peers).await;
}

/// A rolling upgrade across protocol versions: a pristine peer that hears its cluster speaking another
/// protocol version founds no cluster of its own while it does (the old build's peers may hold the
/// service's state, and two clusters under one id would grant one lock twice). It says why once, and
/// founds a cluster when the old build has been silent for a discovery window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_founds_no_cluster_while_another_protocol_version_speaks() {
    const WINDOW_MS: u64 = 500;
    let cluster = TestCluster::new("old-build", Opts::default());
    let old = PeerId::from("old-build");
    let sink = Inbound::new(1024, |_frame: Bytes| {});
    let link = cluster
        .hub
        .connect(&cluster.cluster_id, old.clone(), sink)
        .await
        .expect("the old build connects");
    let old_hello = wire::encode(&Frame {
        version: PROTOCOL_VERSION - 1,
        cluster: cluster.cluster_id.clone(),
        incarnation: 7,
        from: old,
        to: None,
        body: HamokMessage::Hello(Hello {
            member: true,
            leader: None,
            term: 5,
            joining: false,
            reply: true,
            can_lead: true,
        }),
    })
    .unwrap();
    // The old build announces itself every 20 ms until told to stop.
    let speaking = Arc::new(AtomicBool::new(true));
    let speaker = {
        let speaking = speaking.clone();
        tokio::spawn(async move {
            while speaking.load(Ordering::SeqCst) {
                link.broadcast(old_hello.clone()).unwrap();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            link.close();
        })
    };

    let peer = Hamok::builder()
        .peer_id("p00")
        .cluster_id(cluster.cluster_id.clone())
        .transport(cluster.hub.clone())
        .set("discovery_window_ms", WINDOW_MS)
        .register_kind(KIND, || Box::new(TestSm::default()))
        .build()
        .await
        .expect("build p00");
    let events = EventLog::collect(&peer);
    let joining = {
        let peer = peer.clone();
        tokio::spawn(async move { peer.join().await })
    };
    // Six discovery windows of the old build speaking: without the rule the peer founds a cluster
    // after the first.
    for _ in 0..(6 * WINDOW_MS / 50) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let status = peer.stats().status;
        assert_ne!(
            status.join_state,
            JoinState::Joined,
            "founded a cluster while another protocol version spoke: {status:?}"
        );
        assert!(!peer.is_leader());
    }
    assert!(peer.stats().counters.dropped_version > 0);
    speaking.store(false, Ordering::SeqCst);
    speaker.await.expect("the old build stops");
    joining
        .await
        .expect("join task")
        .expect("joins once the old build is silent");
    assert!(peer.is_leader(), "a cluster of one, founded by p00");
    let mismatches: Vec<HamokEvent> = events
        .all()
        .into_iter()
        .filter(|e| matches!(e, HamokEvent::ProtocolVersionMismatch { .. }))
        .collect();
    assert_eq!(
        mismatches,
        [HamokEvent::ProtocolVersionMismatch {
            theirs: PROTOCOL_VERSION - 1,
            ours: PROTOCOL_VERSION
        }],
        "one event for the whole run of the old build's frames"
    );
    peer.close().await;
}

// -------------------------------------------------------------------------------------------------
// 9. only_follower, and events
// -------------------------------------------------------------------------------------------------

/// An `only_follower` peer joins as a learner and never leads, not even when the leader is gone or no
/// leader can be elected; the events of every peer tell what happened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_follower_never_leads_and_events_are_emitted() {
    let cluster = TestCluster::new("learner", Opts::default());
    let mut voters = Vec::new();
    for id in ["p01", "p02", "p03"] {
        voters.push(cluster.peer(id).await);
    }
    // The lowest id of all, so the bootstrap rule would pick it if it ignored only_follower.
    let learner = cluster
        .peer_with(
            "p00",
            &Opts {
                only_follower: true,
                ..Opts::default()
            },
        )
        .await;
    let mut all = voters.clone();
    all.push(learner.clone());
    let logs: Vec<EventLog> = all.iter().map(EventLog::collect).collect();
    let learner_log = logs[3].clone();
    join_all_at_once(&all).await;

    let leader = agreed_leader(&all).await;
    assert!(leader < 3, "the leader is a voter");
    wait_membership(&all).await;
    assert!(learner.is_joined() && !learner.is_leader());
    create_collection(&voters[0]).await;
    let index = put(&learner, "from-learner", "1")
        .await
        .expect("write from the learner");
    for p in &all {
        assert!(has_key(&lin_state(p).await, "from-learner", "1"));
    }

    // Events of the first phase.
    let leader_id = all[leader].local_peer_id().clone();
    for (p, log) in all.iter().zip(&logs) {
        let me = p.local_peer_id().clone();
        log.wait_for(
            "Commit of the learner's write",
            |e| matches!(e, HamokEvent::Commit(i) if *i >= index),
        )
        .await;
        let events = log.all();
        assert!(
            events.contains(&HamokEvent::Joined),
            "{me}: Joined in {events:?}"
        );
        assert!(
            events.iter().any(|e| matches!(
                e,
                HamokEvent::LeaderChanged { new: Some(l), .. } if *l == leader_id
            )),
            "{me}: LeaderChanged to {leader_id} in {events:?}"
        );
        for other in ids(&all).into_iter().filter(|o| *o != me) {
            assert!(
                events.contains(&HamokEvent::RemotePeerJoined(other.clone())),
                "{me}: RemotePeerJoined({other}) in {events:?}"
            );
        }
        if me == leader_id {
            assert!(
                events.contains(&HamokEvent::Leader),
                "{me}: Leader in {events:?}"
            );
        } else {
            assert!(
                !events.contains(&HamokEvent::Leader),
                "{me}: no Leader in {events:?}"
            );
        }
    }

    // The leader dies (no leave): a voter takes over, never the learner.
    let old = all[leader].clone();
    old.close().await;
    assert!(old.is_closed(), "is_closed() after close()");
    logs[leader]
        .wait_for("Close on the closed leader", |e| *e == HamokEvent::Close)
        .await;
    let survivors: Vec<Hamok> = all
        .iter()
        .filter(|p| p.local_peer_id() != &leader_id)
        .cloned()
        .collect();
    let second = agreed_leader(&survivors).await;
    let second_id = survivors[second].local_peer_id().clone();
    assert_ne!(&second_id, learner.local_peer_id());
    put(&learner, "after-failover", "1")
        .await
        .expect("write from the learner after failover");
    for (p, log) in all.iter().zip(&logs) {
        if p.local_peer_id() == &leader_id {
            continue;
        }
        log.wait_for(
            "LeaderChanged to the second leader",
            |e| matches!(e, HamokEvent::LeaderChanged { new: Some(l), .. } if *l == second_id),
        )
        .await;
        // The dead leader is removed once silent for peer_max_idle_ms.
        log.wait_for("RemotePeerLeft of the closed leader", |e| {
            *e == HamokEvent::RemotePeerLeft(leader_id.clone())
        })
        .await;
    }
    assert!(logs
        .iter()
        .zip(&all)
        .any(|(log, p)| p.local_peer_id() == &second_id && log.any(|e| *e == HamokEvent::Leader)));
    assert_eq!(survivors[second].stats().status.raft.role, Role::Leader);
    wait_membership(&survivors).await;

    // The second leader dies too: one voter of two is left, no leader can be elected, and the learner
    // still does not campaign.
    survivors[second].close().await;
    let last_voter = survivors
        .iter()
        .find(|p| p.local_peer_id() != &second_id && p.local_peer_id() != learner.local_peer_id())
        .expect("a voter is left")
        .clone();
    // Watch for longer than several election timeouts and than peer_max_idle_ms (after which the
    // learner looks for a cluster again): it must not campaign, nor found a cluster of its own.
    let until = std::time::Instant::now() + Duration::from_millis(2_500);
    while std::time::Instant::now() < until {
        assert!(!learner.is_leader(), "the only_follower peer leads");
        assert!(
            !matches!(
                learner.state(),
                Role::Candidate | Role::PreCandidate | Role::Leader
            ),
            "the only_follower peer campaigns: {:?}",
            learner.state()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!last_voter.is_leader(), "one voter of two cannot lead");
    println!(
        "no quorum: learner leader_id={:?} joined={}, last voter leader_id={:?} role={:?}",
        learner.leader_id(),
        learner.is_joined(),
        last_voter.leader_id(),
        last_voter.state()
    );
    let events = learner_log.all();
    for forbidden in [HamokEvent::Leader, HamokEvent::Candidate] {
        assert!(
            !events.contains(&forbidden),
            "learner emitted {forbidden:?}: {events:?}"
        );
    }
    close_all(&[learner, last_voter]).await;
}

/// Every peer announces its role by event once joined: the leader `Leader`, the others `Follower`
/// (the reference emits `follower` when a peer enters the follower state on join).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_joined_peer_announces_its_role() {
    let cluster = TestCluster::new("roles", Opts::default());
    let mut peers = Vec::new();
    for id in ["p00", "p01", "p02"] {
        peers.push(cluster.peer(id).await);
    }
    let logs: Vec<EventLog> = peers.iter().map(EventLog::collect).collect();
    join_all_at_once(&peers).await;
    let leader = agreed_leader(&peers).await;
    wait_membership(&peers).await;
    for (i, (p, log)) in peers.iter().zip(&logs).enumerate() {
        let expected = if i == leader {
            HamokEvent::Leader
        } else {
            HamokEvent::Follower
        };
        log.wait_for(&format!("{} emits {expected:?}", p.local_peer_id()), |e| {
            *e == expected
        })
        .await;
    }
    close_all(&peers).await;
}
