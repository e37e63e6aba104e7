//! Locks, leader jobs and shared config over a real NATS server (`HAMOK_NATS_URL`, default
//! nats://127.0.0.1:4222): a holder whose process dies (its peer closed without leaving) loses the lock
//! to a waiter once the cluster removes it, under a greater token, and its fenced writes are refused;
//! a leader job fails over; every replica's config watch ends on the same value. A server that does not
//! answer fails the test with a message saying so: it never skips.

#[path = "../transports/tests/common/mod.rs"]
mod broker;

use std::time::Duration;

use hamok::collections::{register_kinds, HamokCollections, HamokMap, LeaderJob, LockOptions};
use hamok::runtime::{Hamok, HamokError};
use hamok_testkit::cluster::{close_all, join_all_at_once, unique_id};
use hamok_testkit::wait::{eventually, WAIT};
use hamok_transports::nats::{NatsTransport, DEFAULT_NATS_URL, NATS_URL_ENV};

async fn peers(cluster: &str, n: usize, url: &str) -> Vec<Hamok> {
    let mut out = Vec::new();
    for i in 0..n {
        let transport = NatsTransport::builder()
            .server(url)
            .build()
            .expect("NATS transport settings");
        let peer = register_kinds(
            Hamok::builder()
                .peer_id(format!("p{i}"))
                .cluster_id(cluster)
                .transport(transport)
                .election_timeout_ms(200)
                .heartbeat_interval_ms(40)
                .peer_max_idle_ms(2_000)
                .request_timeout_ms(5_000),
        )
        .build()
        .await
        .unwrap_or_else(|e| panic!("build peer {i}: {e}"));
        out.push(peer);
    }
    join_all_at_once(&out).await;
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locks_jobs_and_config_over_nats() {
    let url = broker::require_broker("NATS", NATS_URL_ENV, DEFAULT_NATS_URL, 4222).await;
    let cluster = unique_id("coord");
    let peers = peers(&cluster, 3, &url).await;
    let mut locks = Vec::new();
    let mut maps: Vec<HamokMap<String, String>> = Vec::new();
    for p in &peers {
        locks.push(p.get_or_create_lock_table("locks").await.unwrap());
        maps.push(p.get_or_create_map("guarded").await.unwrap());
    }

    // The holder is a follower; the waiter another peer.
    let leader = eventually("a leader", WAIT, || {
        let i = peers.iter().position(|p| p.is_leader());
        async move { i }
    })
    .await;
    let holder = (0..3).find(|i| *i != leader).unwrap();
    let waiter = (0..3).find(|i| *i != leader && *i != holder).unwrap();
    let guard = locks[holder].lock("resource").await.unwrap();
    let old = guard.fence();
    maps[holder]
        .fenced(old.clone())
        .set("owner".into(), "holder".into())
        .await
        .unwrap();
    let w = locks[waiter].clone();
    let next = tokio::spawn(async move {
        w.lock_with("resource", LockOptions::wait_timeout(WAIT))
            .await
    });

    // The holder's process dies: its peer stops talking without leaving. The cluster removes it after
    // `peer_max_idle_ms` and, in the same log entry, releases its lock to the waiter.
    let stale_writer = maps[holder].fenced(old.clone());
    std::mem::forget(guard); // a dead process releases nothing
    peers[holder].close().await;
    let granted = next.await.unwrap().expect("the waiter gets the lock");
    assert!(granted.token() > old.token);
    maps[waiter]
        .fenced(granted.fence())
        .set("owner".into(), "waiter".into())
        .await
        .unwrap();
    // A write under the dead holder's fence, through a live peer, is refused.
    let e = maps[leader]
        .fenced(old)
        .set("owner".into(), "stale".into())
        .await
        .unwrap_err();
    assert!(matches!(e, HamokError::StaleFence { .. }), "{e:?}");
    drop(stale_writer);
    assert_eq!(
        maps[leader]
            .get_linearizable(&"owner".into())
            .await
            .unwrap()
            .as_deref(),
        Some("waiter")
    );
    assert!(granted.unlock().await.unwrap());

    // A leader job on the two live peers: one runs it; when it stops, the other takes over.
    let live = [leader, waiter];
    let jobs: Vec<LeaderJob> = live
        .iter()
        .map(|i| {
            LeaderJob::start(&locks[*i], "report", |ctx| async move {
                ctx.cancelled().await;
            })
        })
        .collect();
    let first = eventually("a job runner", WAIT, || {
        let r = jobs.iter().position(|j| j.is_running());
        async move { r }
    })
    .await;
    let mut jobs: Vec<Option<LeaderJob>> = jobs.into_iter().map(Some).collect();
    jobs[first].take().unwrap().stop().await;
    let other = 1 - first;
    let runner = jobs[other].as_ref().unwrap();
    tokio::time::timeout(WAIT, runner.wait_running())
        .await
        .expect("the job fails over");
    jobs[other].take().unwrap().stop().await;

    // Shared config: every live replica's watch ends on the same value.
    let mut watches = Vec::new();
    for i in live {
        let cfg = peers[i].get_or_create_config::<u32>("limit").await.unwrap();
        watches.push((cfg.clone(), cfg.watch()));
    }
    let rev = watches[0].0.set(7).await.unwrap();
    for (_, w) in &mut watches {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let v = tokio::time::timeout_at(deadline, w.next())
                .await
                .expect("the watch sees the value")
                .expect("open")
                .unwrap();
            if v.as_ref().is_some_and(|v| v.revision == rev) {
                assert_eq!(v.unwrap().value, 7);
                break;
            }
        }
    }
    tokio::time::sleep(Duration::from_millis(10)).await;
    close_all(&peers).await;
}
