//! The lock table: FIFO grants with strictly increasing fencing tokens, fenced writes refused once the
//! lock moved on, cancel-safe waits, and a cut-off holder that learns it lost the lock before the
//! cluster hands it to another peer.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use hamok_collections::*;
use hamok_runtime::HamokError;
use hamok_testkit::wait::eventually;
use tokio::time::Instant;

async fn tables(c: &Cluster, id: &str) -> Vec<HamokLock> {
    let mut out = Vec::new();
    for p in &c.peers {
        out.push(p.get_or_create_lock_table(id).await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grants_are_fifo_tokens_grow_and_fenced_writes_follow_the_holder() {
    let c = Cluster::start("lock-fifo", 3).await;
    let locks = tables(&c, "locks").await;
    let maps: Vec<HamokMap<String, String>> = {
        let mut v = Vec::new();
        for p in &c.peers {
            v.push(p.get_or_create_map("guarded").await.unwrap());
        }
        v
    };
    let first = locks[0].lock("job").await.unwrap();
    assert_eq!(
        locks[2]
            .holder_linearizable("job")
            .await
            .unwrap()
            .map(|h| h.token),
        Some(first.token())
    );
    assert!(
        locks[1].try_lock("job").await.unwrap().is_none(),
        "held: try_lock does not queue"
    );
    maps[0]
        .fenced(first.fence())
        .set("k".into(), "first".into())
        .await
        .unwrap();

    // Two waiters queue in order: peer 1, then peer 2.
    let l1 = locks[1].clone();
    let w1 = tokio::spawn(async move { l1.lock("job").await });
    eventually("peer 1 queued", WAIT, || async {
        (locks[0].waiting("job") == 1).then_some(())
    })
    .await;
    let l2 = locks[2].clone();
    let w2 = tokio::spawn(async move { l2.lock("job").await });
    eventually("peer 2 queued", WAIT, || async {
        (locks[0].waiting("job") == 2).then_some(())
    })
    .await;

    let first_fence = first.fence();
    assert!(first.unlock().await.unwrap());
    let second = w1.await.unwrap().unwrap();
    assert!(
        second.token() > first_fence.token,
        "tokens strictly increase"
    );
    // The old holder's fence no longer writes, on any peer's handle; the new one does.
    let e = maps[0]
        .fenced(first_fence.clone())
        .set("k".into(), "stale".into())
        .await
        .unwrap_err();
    assert!(matches!(e, HamokError::StaleFence { .. }), "{e:?}");
    assert!(!e.may_have_taken_effect());
    maps[1]
        .fenced(second.fence())
        .set("k".into(), "second".into())
        .await
        .unwrap();
    assert!(second.check().await.unwrap());
    drop(second); // released in the background
    let third = w2.await.unwrap().unwrap();
    assert!(third.token() > first_fence.token);
    assert_eq!(
        maps[2]
            .get_linearizable(&"k".into())
            .await
            .unwrap()
            .as_deref(),
        Some("second")
    );
    assert!(third.unlock().await.unwrap());
    eventually("lock free", WAIT, || async {
        locks
            .iter()
            .all(|l| l.holder("job").is_none())
            .then_some(())
    })
    .await;
    c.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_or_timed_out_wait_leaves_no_grant_behind() {
    let c = Cluster::start("lock-cancel", 3).await;
    let locks = tables(&c, "locks").await;
    let held = locks[0].lock("x").await.unwrap();
    // A wait that times out, and one whose future is dropped.
    let e = locks[1]
        .lock_with("x", LockOptions::wait_timeout(Duration::from_millis(100)))
        .await
        .unwrap_err();
    assert!(matches!(e, HamokError::Timeout { after_ms: 100 }), "{e:?}");
    let dropped = tokio::time::timeout(Duration::from_millis(100), locks[2].lock("x")).await;
    assert!(dropped.is_err(), "still waiting when dropped");
    eventually("both cancels applied", WAIT, || async {
        (locks[0].waiting("x") == 0).then_some(())
    })
    .await;
    assert!(held.unlock().await.unwrap());
    // Nobody is left to be granted: the lock stays free.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for l in &locks {
        assert_eq!(l.holder_linearizable("x").await.unwrap(), None);
    }
    // And it can be taken again.
    let again = locks[2].try_lock("x").await.unwrap().expect("free");
    assert!(again.unlock().await.unwrap());
    c.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_off_holder_learns_it_lost_before_the_lock_moves_and_its_fence_is_refused() {
    // With the default timings (the guarantee is stated for them).
    let d = hamok_runtime::HamokConfig::default();
    let c = Cluster::start_with("lock-cutoff", 3, |b| {
        b.election_timeout_ms(d.election_timeout_ms)
            .heartbeat_interval_ms(d.heartbeat_interval_ms)
            .peer_max_idle_ms(d.peer_max_idle_ms)
    })
    .await;
    let locks = tables(&c, "locks").await;
    let holder_at = c.follower();
    let waiter_at = (0..3).find(|i| *i != holder_at).unwrap();
    let maps: Vec<HamokMap<String, u64>> = {
        let mut v = Vec::new();
        for p in &c.peers {
            v.push(p.get_or_create_map("fenced").await.unwrap());
        }
        v
    };
    let guard = locks[holder_at].lock("leader-job").await.unwrap();
    let old_fence = guard.fence();
    maps[holder_at]
        .fenced(old_fence.clone())
        .set("owner".into(), holder_at as u64)
        .await
        .unwrap();

    // Who notices what, when (instants, compared only by order).
    let lost_at: Arc<Mutex<Option<Instant>>> = Arc::default();
    let lost = guard.lost();
    let rec = lost_at.clone();
    tokio::spawn(async move {
        lost.await;
        *rec.lock().unwrap() = Some(Instant::now());
    });
    let waiter = locks[waiter_at].clone();
    let next = tokio::spawn(async move {
        let g = waiter
            .lock_with("leader-job", LockOptions::wait_timeout(WAIT))
            .await;
        (Instant::now(), g)
    });
    eventually("the waiter queued", WAIT, || async {
        (locks[waiter_at].waiting("leader-job") == 1).then_some(())
    })
    .await;

    c.hub.isolate(c.peers[holder_at].local_peer_id());
    let (granted_at, new_guard) = next.await.unwrap();
    let new_guard = new_guard.expect("granted once the holder is removed");
    let lost_at = lost_at
        .lock()
        .unwrap()
        .expect("lost() fired on the cut-off holder");
    assert!(
        lost_at <= granted_at,
        "the holder must know it lost before the lock moves on"
    );
    assert!(guard.is_lost());
    assert!(new_guard.token() > old_fence.token);
    maps[waiter_at]
        .fenced(new_guard.fence())
        .set("owner".into(), waiter_at as u64)
        .await
        .unwrap();

    // After the heal the old holder rejoins; its writes under the old fence are refused, so it cannot
    // overwrite the new holder's state.
    c.hub.heal();
    let e = eventually("the old holder is back and refused", WAIT, || {
        let m = maps[holder_at].fenced(old_fence.clone());
        async move {
            match m.set("owner".into(), 99).await {
                Err(e @ HamokError::StaleFence { .. }) => Some(e),
                Ok(_) => panic!("a stale holder's write landed"),
                Err(_) => None,
            }
        }
    })
    .await;
    assert!(matches!(e, HamokError::StaleFence { current: Some(t), .. } if t == new_guard.token()));
    assert_eq!(
        maps[waiter_at]
            .get_linearizable(&"owner".into())
            .await
            .unwrap(),
        Some(waiter_at as u64)
    );
    drop(guard);
    assert!(new_guard.unlock().await.unwrap());
    c.close().await;
}

#[test]
fn fence_gate_keeps_the_highest_token() {
    let gate = FenceGate::default();
    gate.admit("a", 5).unwrap();
    gate.admit("b", 1).unwrap();
    assert!(gate.admit("a", 4).is_err());
    gate.admit("a", 6).unwrap();
    assert_eq!(gate.highest("a"), Some(6));
    assert_eq!(gate.highest("b"), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ttl_lease_expires_unless_renewed() {
    let c = Cluster::start("lock-ttl", 3).await;
    let locks = tables(&c, "locks").await;
    let lease = Duration::from_millis(300);
    let opts = LockOptions::default().with_lease(lease);
    // Renewed every 100 ms for a second: still held, never lost.
    let kept = locks[1].lock_with("kept", opts).await.unwrap();
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(kept.renew().await.unwrap(), "renewed while held");
    }
    assert!(!kept.is_lost());
    assert!(kept.check().await.unwrap());
    assert!(kept.unlock().await.unwrap());
    // Not renewed: the holder learns it lost, then the cluster releases it, and a waiter gets it.
    let lapsed = locks[1].lock_with("lapsed", opts).await.unwrap();
    let token = lapsed.token();
    let waiter = locks[2].clone();
    // Bounded: an expiry that never comes fails the test instead of hanging it.
    let next = tokio::spawn(async move {
        let g = waiter
            .lock_with("lapsed", LockOptions::wait_timeout(WAIT))
            .await;
        (Instant::now(), g)
    });
    tokio::time::timeout(WAIT, lapsed.lost())
        .await
        .expect("lost() fires when the lease runs out");
    let lost_at = Instant::now();
    let (granted_at, granted) = next.await.unwrap();
    let granted = granted.unwrap();
    assert!(
        lost_at <= granted_at,
        "the holder knows before the lock moves"
    );
    assert!(granted.token() > token);
    assert!(
        !lapsed.renew().await.unwrap(),
        "an expired grant cannot be renewed"
    );
    // A queued grant with a lease is renewed at once, so it is timed from then.
    let queued = {
        let l0 = locks[0].clone();
        let w = tokio::spawn(async move { l0.lock_with("lapsed", opts).await });
        eventually("queued", WAIT, || async {
            (locks[0].waiting("lapsed") == 1).then_some(())
        })
        .await;
        assert!(granted.unlock().await.unwrap());
        w.await.unwrap().unwrap()
    };
    assert!(!queued.is_lost());
    assert!(queued.renew().await.unwrap());
    assert!(queued.unlock().await.unwrap());
    drop(lapsed);
    c.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_keep_growing_across_a_whole_cluster_restart() {
    // A cluster with the in-memory store: a restart of every peer is a new, empty log.
    let c = Cluster::start("lock-restart", 3).await;
    let locks = tables(&c, "locks").await;
    let mut last = 0;
    for _ in 0..3 {
        let g = locks[1].lock("r").await.unwrap();
        assert!(g.token() > last);
        last = g.token();
        assert!(g.unlock().await.unwrap());
    }
    c.close().await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    let again = Cluster::start("lock-restart", 3).await;
    let locks = tables(&again, "locks").await;
    let g = locks[2].lock("r").await.unwrap();
    assert!(
        g.token() > last,
        "token {} after the restart, {last} before",
        g.token()
    );
    assert!(g.unlock().await.unwrap());
    again.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_lock_and_a_job_end_when_their_peer_closes() {
    let c = Cluster::start("lock-close", 3).await;
    let locks = tables(&c, "locks").await;
    let held = locks[0].lock("busy").await.unwrap();
    let waiter = locks[1].clone();
    let wait = tokio::spawn(async move { waiter.lock("busy").await });
    let job = LeaderJob::start(
        &locks[1],
        "busy",
        |ctx| async move { ctx.cancelled().await },
    );
    eventually("both queued", WAIT, || async {
        (locks[0].waiting("busy") == 2).then_some(())
    })
    .await;
    c.peers[1].close().await;
    let e = tokio::time::timeout(WAIT, wait)
        .await
        .expect("the wait ends")
        .unwrap()
        .unwrap_err();
    assert!(matches!(e, HamokError::Closed), "{e:?}");
    let mut state = job.state();
    tokio::time::timeout(WAIT, state.wait_for(|s| *s == JobState::Finished))
        .await
        .expect("the job ends with its peer")
        .unwrap();
    assert!(held.unlock().await.unwrap());
    c.close().await;
}
