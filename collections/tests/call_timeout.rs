//! A per-call bound (`with_timeout`) on collection handles: on a cut-off peer, a bounded call fails with
//! the bound it was given (not the peer's `request_timeout_ms`), saying whether it may have taken effect;
//! other clones keep their own bound; after the heal the bounded handle works again.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use hamok_collections::*;
use hamok_runtime::HamokError;
use hamok_testkit::wait::eventually;

const BOUND: Duration = Duration::from_millis(300);

/// The bound a failed call reports (`Timeout` or `NoQuorum` carry it).
fn bound_of(e: &HamokError) -> Option<u64> {
    match e {
        HamokError::Timeout { after_ms } | HamokError::NoQuorum { after_ms } => Some(*after_ms),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bounded_calls_fail_with_their_own_bound_on_a_cut_off_peer() {
    let store = Arc::new(MemoryRemoteMap::default());
    // Idle removal well beyond the test's cut-off, so the cut-off peer stays joined throughout.
    let c = Cluster::start_with("call-timeout", 3, move |b| {
        register_remote_map(b.peer_max_idle_ms(20_000), "rm", store.clone())
    })
    .await;
    let f = c.follower();
    let peer = &c.peers[f];
    let map = peer.get_or_create_map::<String, u64>("m").await.unwrap();
    let queue = peer.get_or_create_queue::<u64>("q").await.unwrap();
    let mut remotes = Vec::new();
    for p in &c.peers {
        remotes.push(
            p.get_or_create_remote_map::<String, u64>("rm")
                .await
                .unwrap(),
        );
    }
    map.set("k".into(), 1).await.unwrap();

    let bounded = map.with_timeout(BOUND);
    assert_eq!(bounded.id(), "m");
    c.hub.isolate(peer.local_peer_id());

    // A write: it never reached a leader (NoQuorum: certainly not applied) or its outcome is unknown
    // (Timeout); either way the error carries this call's bound.
    let e = bounded.set("k".into(), 2).await.unwrap_err();
    assert_eq!(bound_of(&e), Some(300), "write: {e:?}");
    // A linearizable read cannot be confirmed: it fails with the bound, never answers from local state.
    let e = bounded.get_linearizable(&"k".into()).await.unwrap_err();
    assert_eq!(bound_of(&e), Some(300), "read: {e:?}");
    // A clone keeps the bound; another collection's handle can be bounded alike.
    let e = bounded.clone().sync().await.unwrap_err();
    assert_eq!(bound_of(&e), Some(300), "sync of a clone: {e:?}");
    let e = queue.with_timeout(BOUND).push([7]).await.unwrap_err();
    assert_eq!(bound_of(&e), Some(300), "queue push: {e:?}");
    // A remote map's call is bounded as a whole (ordering and execution).
    let e = remotes[f]
        .with_timeout(BOUND)
        .set("r".into(), 1)
        .await
        .unwrap_err();
    assert_eq!(bound_of(&e), Some(300), "remote map set: {e:?}");

    // The unbounded handle still has the peer's request timeout (5 s here): a linearizable read
    // started now outlives the cut-off and succeeds once the peer is back.
    let unbounded = map.clone();
    let read = tokio::spawn(async move { unbounded.get_linearizable(&"k".into()).await });
    tokio::time::sleep(BOUND).await;
    c.hub.heal();
    let value = read
        .await
        .unwrap()
        .expect("the unbounded read waits through the heal");
    assert!(value == Some(1) || value == Some(2), "{value:?}");

    // After the heal, the bounded handle works again.
    eventually("bounded write after the heal", WAIT, || {
        let bounded = bounded.clone();
        async move { bounded.set("k".into(), 3).await.ok() }
    })
    .await;
    assert_eq!(
        bounded.get_linearizable(&"k".into()).await.unwrap(),
        Some(3)
    );
    c.close().await;
}
