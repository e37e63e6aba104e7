//! Shared config: revisions, validation before the log, compare-and-set, history and rollback, and
//! watches whose first item is the current value, that coalesce for a slow watcher, and that end on the
//! same latest value on every replica after a partition heals, also when a replica catches up by
//! installing a snapshot.

mod common;

use common::*;
use hamok_collections::*;
use hamok_runtime::HamokError;
use hamok_testkit::wait::eventually;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Limits {
    max_conns: u32,
}

fn valid(l: &Limits) -> Result<(), String> {
    if l.max_conns == 0 {
        Err("max_conns must be positive".into())
    } else {
        Ok(())
    }
}

async fn configs(c: &Cluster) -> Vec<SharedConfig<Limits>> {
    let mut out = Vec::new();
    for p in &c.peers {
        out.push(
            p.get_or_create_config::<Limits>("limits")
                .await
                .unwrap()
                .with_validator(valid),
        );
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revisions_validation_cas_history_and_rollback() {
    let c = Cluster::start("config", 3).await;
    let cfg = configs(&c).await;
    assert_eq!(cfg[0].get().unwrap(), None);
    let r1 = cfg[0].set(Limits { max_conns: 10 }).await.unwrap();
    // An invalid value is refused before the log: nothing changes anywhere.
    let e = cfg[1].set(Limits { max_conns: 0 }).await.unwrap_err();
    assert!(
        matches!(e, HamokError::Rejected(_)) && !e.may_have_taken_effect(),
        "{e:?}"
    );
    let now = cfg[2].get_linearizable().await.unwrap().unwrap();
    assert_eq!((now.revision, now.value), (r1, Limits { max_conns: 10 }));
    // Compare-and-set over a stale revision loses; over the current one wins.
    let r2 = cfg[1]
        .compare_and_set(r1, Limits { max_conns: 20 })
        .await
        .unwrap()
        .revision()
        .expect("set over the current revision");
    assert!(r2 > r1);
    assert_eq!(
        cfg[2]
            .compare_and_set(r1, Limits { max_conns: 30 })
            .await
            .unwrap(),
        CasOutcome::Conflict(Some(r2))
    );
    // update() is a read-modify-write that retries on conflict.
    let r3 = cfg[2]
        .update(|old| Limits {
            max_conns: old.map_or(1, |o| o.max_conns + 1),
        })
        .await
        .unwrap();
    assert_eq!(
        cfg[0]
            .get_linearizable()
            .await
            .unwrap()
            .unwrap()
            .value
            .max_conns,
        21
    );
    let history: Vec<u64> = cfg[0]
        .history()
        .unwrap()
        .iter()
        .map(|v| v.revision)
        .collect();
    assert_eq!(history, vec![r1, r2, r3]);
    // Rollback to the first value, as a new revision.
    let r4 = cfg[1].rollback(r1).await.unwrap();
    assert!(r4 > r3);
    let now = cfg[0].get_linearizable().await.unwrap().unwrap();
    assert_eq!((now.revision, now.value), (r4, Limits { max_conns: 10 }));
    assert!(cfg[0].rollback(12_345_678).await.is_err());
    // A validator is a handle's: one without it can still be given a value (documented: give every
    // replica the same validator), but it never changes what the validating handle refuses.
    assert!(cfg[0].set(Limits { max_conns: 0 }).await.is_err());
    c.close().await;
}

/// Takes items from `watch` until one satisfies `done` (panics after `WAIT`); every item must be a
/// value (never an error).
async fn watch_until(
    watch: &mut ConfigWatch<Limits>,
    done: impl Fn(&Versioned<Limits>) -> bool,
) -> Versioned<Limits> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let next = tokio::time::timeout_at(deadline, watch.next())
            .await
            .expect("the watch reached the value in time")
            .expect("the watch is open");
        if let Some(v) = next.expect("a watch never errs") {
            if done(&v) {
                return v;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_start_with_the_current_value_coalesce_and_agree_after_a_partition() {
    let c = Cluster::start("config-watch", 3).await;
    let cfg = configs(&c).await;
    // A watch opened before any value: its first item says "nothing yet".
    let mut early = cfg[1].watch();
    assert_eq!(early.next().await.unwrap().unwrap(), None);
    let r1 = cfg[0].set(Limits { max_conns: 1 }).await.unwrap();
    // A watch opened later starts with the current value at once.
    let mut late = cfg[2].watch();
    let first = eventually("the value reached peer 2", WAIT, || {
        let v = cfg[2].get().unwrap();
        async move { v.filter(|v| v.revision == r1) }
    })
    .await;
    assert_eq!(late.next().await.unwrap().unwrap(), Some(first));
    // A slow watcher that misses many changes gets the latest, never an error.
    let mut last = 0;
    for n in 2..=50 {
        last = cfg[0].set(Limits { max_conns: n }).await.unwrap();
    }
    let latest = watch_until(&mut early, |v| v.value.max_conns == 50).await;
    assert_eq!(latest.revision, last);

    // One peer cut off while the value changes; after the heal every watch ends on the same latest.
    let mut watches: Vec<ConfigWatch<Limits>> = cfg.iter().map(|c| c.watch()).collect();
    for w in &mut watches {
        w.next().await.unwrap().unwrap();
    }
    let cut = c.follower();
    let writer = (0..3).find(|i| *i != cut).unwrap();
    c.hub.isolate(c.peers[cut].local_peer_id());
    let mut final_rev = 0;
    for n in 100..110 {
        final_rev = cfg[writer].set(Limits { max_conns: n }).await.unwrap();
    }
    c.hub.heal();
    for (i, w) in watches.iter_mut().enumerate() {
        let seen = watch_until(w, |v| v.revision >= final_rev).await;
        assert_eq!(
            (seen.revision, seen.value.max_conns),
            (final_rev, 109),
            "peer {i}"
        );
    }
    // A watch ends when its peer closes.
    let mut closing = cfg[0].watch();
    closing.next().await.unwrap().unwrap();
    c.close().await;
    let end = tokio::time::timeout(WAIT, closing.next())
        .await
        .expect("the watch ends");
    assert!(end.is_none(), "{end:?}");
}

/// A follower that catches up by installing a snapshot (every change of the value lies inside it, so
/// none is applied one by one there) still ends its watch on the latest value: the install relinks
/// the config and republishes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_ends_on_the_latest_value_after_a_snapshot_install() {
    let c = Cluster::start_with("config-snap", 3, |b| {
        b.snapshot_after_entries(50).peer_max_idle_ms(60_000)
    })
    .await;
    let cfg = configs(&c).await;
    let (l, f) = (c.leader(), c.follower());
    let first = cfg[l].set(Limits { max_conns: 1 }).await.unwrap();
    let mut watch = cfg[f].watch();
    watch_until(&mut watch, |v| v.revision == first).await;
    let installed_before = c.peers[f].stats().counters.snapshots_installed;

    // The follower hears nothing from the leader while the value changes, then while other writes
    // push the leader's snapshot past the last change.
    let (lid, fid) = (
        c.peers[l].local_peer_id().clone(),
        c.peers[f].local_peer_id().clone(),
    );
    c.hub.block(&lid, &fid);
    let mut last = 0;
    for n in 2..=120 {
        last = cfg[l].set(Limits { max_conns: n }).await.unwrap();
    }
    let other = c.peers[l].create_map::<u64, u64>("other").await.unwrap();
    for i in 0..150 {
        other.set(i, i).await.unwrap();
    }
    let snapshot_index = c.peers[l].stats().status.raft.snapshot_index;
    assert!(
        snapshot_index >= last,
        "the leader's snapshot ({snapshot_index}) covers the last change ({last})"
    );
    c.hub.unblock(&lid, &fid);

    let seen = watch_until(&mut watch, |v| v.revision == last).await;
    assert_eq!(seen.value.max_conns, 120);
    // The counters are published after the install: wait for them rather than read them at once.
    wait_until(
        "the follower caught up by installing a snapshot",
        WAIT,
        || c.peers[f].stats().counters.snapshots_installed > installed_before,
    )
    .await;
    c.close().await;
}
