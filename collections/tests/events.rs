//! Event streams never skip silently: a subscriber that lags gets a `Resync` (the whole state, exactly
//! where its stream resumes), a peer that installs a snapshot sends one, and in both cases replaying the
//! `Resync` and then the events reproduces the collection's state.

mod common;

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use common::*;
use hamok_collections::*;
use tokio::sync::watch;

const SENTINEL: &str = "~done";

/// Applies one map event to a replica built from the stream alone. Strict: an insert of a present key,
/// an update or removal whose old value differs, is a stream that is not exact.
fn replay_map(replica: &mut BTreeMap<String, u64>, event: MapEvent<String, u64>) {
    match event {
        MapEvent::Insert { key, value } => {
            let old = replica.insert(key.clone(), value);
            assert_eq!(old, None, "insert of `{key}`, present in the replica");
        }
        MapEvent::Update { key, old, new } => {
            let was = replica.insert(key.clone(), new);
            assert_eq!(
                was,
                Some(old),
                "update of `{key}`: the replica had another value"
            );
        }
        MapEvent::Remove { key, value } => {
            let was = replica.remove(&key);
            assert_eq!(
                was,
                Some(value),
                "remove of `{key}`: the replica had another value"
            );
        }
        MapEvent::Clear => replica.clear(),
        MapEvent::Resync { entries, .. } => *replica = entries.into_iter().collect(),
        MapEvent::Close => panic!("the stream closed"),
    }
}

/// Reads `events` into `replica` until the sentinel key arrives; answers the `Resync` reasons seen.
/// `seen` learns the highest value written so far (the writers' round).
async fn replay_map_until_sentinel(
    events: &mut Events<MapEvent<String, u64>>,
    replica: &mut BTreeMap<String, u64>,
    seen: Option<&watch::Sender<u64>>,
) -> Vec<ResyncReason> {
    let mut reasons = Vec::new();
    loop {
        let event = next(events).await;
        match &event {
            MapEvent::Resync { reason, .. } => reasons.push(reason.clone()),
            MapEvent::Insert { value, .. } | MapEvent::Update { new: value, .. } => {
                if let Some(seen) = seen {
                    seen.send_if_modified(|r| std::mem::replace(r, (*r).max(*value)) != *r);
                }
            }
            _ => {}
        }
        replay_map(replica, event);
        if replica.contains_key(SENTINEL) {
            return reasons;
        }
    }
}

/// Rounds of map writes: sets over a key space smaller than the writes (so updates too), and deletes
/// now and then; each call is one log entry. Round `r` sets its keys to `r`. With `pace`, a round waits
/// until the reader it names has seen round `r - 20` (a few thousand events behind at most, well within
/// the buffer), however slowly the test machine runs that reader.
async fn map_writes(
    map: &HamokMap<String, u64>,
    rounds: std::ops::Range<u64>,
    mut pace: Option<watch::Receiver<u64>>,
) {
    for round in rounds {
        if let Some(seen) = pace.as_mut() {
            let behind = round.saturating_sub(20);
            tokio::time::timeout(WAIT, seen.wait_for(|r| *r >= behind))
                .await
                .expect("the reader keeps up")
                .expect("the reader runs");
        }
        let batch: Vec<(String, u64)> = (0..100)
            .map(|i| (format!("k{:04}", (round * 100 + i) % 3_000), round))
            .collect();
        map.set_all(batch).await.unwrap();
        if round % 5 == 4 {
            let gone: Vec<String> = (0..20)
                .map(|i| format!("k{:04}", (round * 37 + i) % 3_000))
                .collect();
            map.delete_all(gone).await.unwrap();
        }
    }
}

/// A subscriber that does not read while more than `EVENT_CAPACITY` events are applied gets a
/// `Resync` (lagged) when it reads again, taken while writes keep being applied; replaying it and the
/// events after it reproduces the map exactly. A subscriber that keeps up never gets one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lagging_map_subscriber_resyncs_exactly() {
    let c = Cluster::start("ev-map-lag", 3).await;
    let writer = c.peers[c.leader()]
        .create_map::<String, u64>("m")
        .await
        .unwrap();
    let map = c.peers[c.follower()]
        .get_or_create_map::<String, u64>("m")
        .await
        .unwrap();
    let mut lagging = map.events();
    let mut eager = map.events();
    let (seen_tx, seen) = watch::channel(0);
    let keeping_up = tokio::spawn(async move {
        let mut replica = BTreeMap::new();
        let reasons = replay_map_until_sentinel(&mut eager, &mut replica, Some(&seen_tx)).await;
        (replica, reasons)
    });

    // Far more events than the buffer holds, none read by `lagging`.
    map_writes(&writer, 0..50, Some(seen.clone())).await;
    map.sync().await.unwrap();
    let applied_events = 50 * 100 + 10 * 20;
    assert!(applied_events > EVENT_CAPACITY);

    // `lagging` reads again while more writes are applied.
    let more = {
        let writer = writer.clone();
        tokio::spawn(async move {
            map_writes(&writer, 50..80, Some(seen)).await;
            writer.set(SENTINEL.to_string(), 0).await.unwrap();
        })
    };
    let mut replica = BTreeMap::new();
    let first = next(&mut lagging).await;
    match &first {
        MapEvent::Resync {
            reason: ResyncReason::Lagged { missed },
            ..
        } => assert!(*missed > 0),
        other => panic!("expected a lagged Resync first, got {other:?}"),
    }
    replay_map(&mut replica, first);
    let reasons = replay_map_until_sentinel(&mut lagging, &mut replica, None).await;
    more.await.unwrap();
    assert!(
        reasons
            .iter()
            .all(|r| matches!(r, ResyncReason::Lagged { .. })),
        "{reasons:?}"
    );

    let state: BTreeMap<String, u64> = map.entries().unwrap().into_iter().collect();
    assert_eq!(replica, state, "Resync + events reproduce the map");

    let (eager_replica, eager_reasons) = keeping_up.await.unwrap();
    assert!(
        eager_reasons.is_empty(),
        "a subscriber that keeps up gets no Resync: {eager_reasons:?}"
    );
    assert_eq!(eager_replica, state);
    c.close().await;
}

/// The same for a queue: pushes and pops past the buffer, the subscriber reads afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lagging_queue_subscriber_resyncs_exactly() {
    let c = Cluster::start("ev-queue-lag", 3).await;
    let q = c.peers[c.leader()].create_queue::<u64>("q").await.unwrap();
    let mut lagging = q.events();
    for round in 0..60u64 {
        q.push((0..100).map(|i| round * 100 + i)).await.unwrap();
        q.pop_many(70).await.unwrap();
    }
    q.push_one(u64::MAX).await.unwrap();

    let mut replica: VecDeque<u64> = VecDeque::new();
    let mut resyncs = 0;
    loop {
        match next(&mut lagging).await {
            QueueEvent::Add(v) => replica.push_back(v),
            QueueEvent::Remove(v) => {
                assert_eq!(replica.pop_front(), Some(v), "a pop of another head")
            }
            QueueEvent::Empty => assert!(replica.is_empty()),
            QueueEvent::NotEmpty => assert!(!replica.is_empty()),
            QueueEvent::Clear => replica.clear(),
            QueueEvent::Resync { items, reason, .. } => {
                assert!(matches!(reason, ResyncReason::Lagged { missed } if missed > 0));
                resyncs += 1;
                replica = items.into();
            }
            other => panic!("unexpected {other:?}"),
        }
        if replica.back() == Some(&u64::MAX) {
            break;
        }
    }
    assert!(resyncs >= 1, "the subscriber lagged");
    assert_eq!(Vec::from(replica), q.to_vec().unwrap());
    c.close().await;
}

/// A follower cut off from the leader while the leader writes and compacts its log catches up by
/// installing a snapshot: its subscribers (opened before the cut) get a `Resync` (snapshot installed),
/// and replaying it and the events after it reproduces the collection's state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_install_resyncs_subscribers() {
    let c = Cluster::start_with("ev-snap", 3, |b| {
        b.snapshot_after_entries(50).peer_max_idle_ms(60_000)
    })
    .await;
    let (l, f) = (c.leader(), c.follower());
    let lmap = c.peers[l].create_map::<String, u64>("m").await.unwrap();
    let lset = c.peers[l].create_set::<u64>("s").await.unwrap();
    let fmap = c.peers[f]
        .get_or_create_map::<String, u64>("m")
        .await
        .unwrap();
    let fset = c.peers[f].get_or_create_set::<u64>("s").await.unwrap();
    let mut map_events = fmap.events();
    let mut set_events = fset.events();

    lmap.set("before".into(), 1).await.unwrap();
    lset.add([1]).await.unwrap();
    wait_until("the follower applied the first writes", WAIT, || {
        fmap.get(&"before".into()).unwrap() == Some(1) && fset.contains(&1).unwrap()
    })
    .await;
    let installed_before = c.peers[f].stats().counters.snapshots_installed;

    // The follower hears nothing from the leader (its own frames still arrive: it stays a member).
    let (lid, fid) = (
        c.peers[l].local_peer_id().clone(),
        c.peers[f].local_peer_id().clone(),
    );
    c.hub.block(&lid, &fid);
    for i in 0..200u64 {
        lmap.set(format!("k{:03}", i % 150), i).await.unwrap();
        if i % 3 == 0 {
            lset.add([i]).await.unwrap();
        }
        if i % 7 == 0 {
            lmap.delete(format!("k{:03}", i % 150 / 2)).await.unwrap();
            lset.remove([i / 2]).await.unwrap();
        }
    }
    assert!(
        c.peers[l].stats().status.raft.snapshot_index > 0,
        "the leader compacted its log"
    );
    c.hub.unblock(&lid, &fid);

    // After the install: more changes, then the sentinels.
    lmap.set("after".into(), 2).await.unwrap();
    lmap.delete("before".into()).await.unwrap();
    lset.add([1_000_000]).await.unwrap();
    lmap.set(SENTINEL.into(), 0).await.unwrap();

    let mut replica = BTreeMap::new();
    let reasons = replay_map_until_sentinel(&mut map_events, &mut replica, None).await;
    assert!(
        c.peers[f].stats().counters.snapshots_installed > installed_before,
        "the follower caught up by installing a snapshot"
    );
    assert!(
        reasons.contains(&ResyncReason::SnapshotInstalled),
        "the map's subscriber was resynced: {reasons:?}"
    );
    let state: BTreeMap<String, u64> = fmap.entries().unwrap().into_iter().collect();
    assert_eq!(replica, state, "Resync + events reproduce the map");
    assert_eq!(
        state,
        lmap.entries().unwrap().into_iter().collect(),
        "as on the leader"
    );

    let mut members = BTreeSet::new();
    let mut set_reasons = Vec::new();
    while !members.contains(&1_000_000) {
        match next(&mut set_events).await {
            SetEvent::Add(v) => assert!(members.insert(v), "add of a member"),
            SetEvent::Remove(v) => assert!(members.remove(&v), "remove of a non-member"),
            SetEvent::Clear => members.clear(),
            SetEvent::Resync { items, reason } => {
                set_reasons.push(reason);
                members = items.into_iter().collect();
            }
            SetEvent::Close => panic!("the stream closed"),
        }
    }
    assert!(set_reasons.contains(&ResyncReason::SnapshotInstalled));
    fset.sync().await.unwrap();
    assert_eq!(members, fset.values().unwrap().into_iter().collect());
    c.close().await;
}

/// A remote map's events come from its executor, not the log: a lagging subscriber's `Resync` holds
/// the store's entries read after the lag. Not exact, but replaying it and the events after it
/// converges to the store's content.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lagging_remote_map_subscriber_resyncs_from_the_store() {
    let store: std::sync::Arc<dyn RemoteMap> = std::sync::Arc::new(MemoryRemoteMap::new());
    let c = Cluster::start_with("ev-rm-lag", 3, move |b| {
        register_remote_map(b, "rm", store.clone())
    })
    .await;
    let mut handles = Vec::new();
    for p in &c.peers {
        handles.push(
            p.get_or_create_remote_map::<String, u64>("rm")
                .await
                .unwrap(),
        );
    }
    let rm = &handles[c.leader()];
    let mut lagging = rm.events();
    for round in 0..50u64 {
        let batch: Vec<(String, u64)> = (0..100)
            .map(|i| (format!("k{:04}", (round * 100 + i) % 3_000), round))
            .collect();
        rm.set_all(batch).await.unwrap();
    }
    rm.delete("k0000".into()).await.unwrap();
    rm.set(SENTINEL.into(), 0).await.unwrap();

    let mut replica = BTreeMap::new();
    let mut reasons = Vec::new();
    while !replica.contains_key(SENTINEL) {
        // Lenient: events after the Resync may already be in it; each sets what it describes.
        match next(&mut lagging).await {
            MapEvent::Insert { key, value }
            | MapEvent::Update {
                key, new: value, ..
            } => {
                replica.insert(key, value);
            }
            MapEvent::Remove { key, .. } => {
                replica.remove(&key);
            }
            MapEvent::Clear => replica.clear(),
            MapEvent::Resync { entries, reason } => {
                reasons.push(reason);
                replica = entries.into_iter().collect();
            }
            MapEvent::Close => panic!("the stream closed"),
        }
    }
    assert!(
        matches!(reasons.first(), Some(ResyncReason::Lagged { missed }) if *missed > 0),
        "{reasons:?}"
    );
    let state: BTreeMap<String, u64> = rm.entries().await.unwrap().into_iter().collect();
    assert_eq!(replica, state);
    c.close().await;
}
