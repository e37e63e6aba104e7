//! Frame authentication: peers without the cluster key cannot join, vote or write; their frames are
//! counted as unauthenticated.

use std::time::Duration;

use hamok_runtime::transport::memory::InProcessHub;
use hamok_runtime::{Hamok, HamokError, JoinOptions};

async fn peer(hub: &InProcessHub, id: &str, key: Option<&str>) -> Hamok {
    let mut b = Hamok::builder()
        .peer_id(id)
        .cluster_id("auth-test")
        .election_timeout_ms(150)
        .heartbeat_interval_ms(30)
        .transport(hub.clone());
    if let Some(key) = key {
        b = b.cluster_key(key);
    }
    b.build().await.expect("valid config")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_without_the_key_cannot_join() {
    let hub = InProcessHub::new();
    let key = "a-shared-secret-of-some-length";
    let a = peer(&hub, "a", Some(key)).await;
    let b = peer(&hub, "b", Some(key)).await;
    let (ja, jb) = tokio::join!(a.join(), b.join());
    ja.unwrap();
    jb.unwrap();
    let leader = a.wait_until_leader(Duration::from_secs(5)).await.unwrap();
    assert_eq!(b.leader_id(), Some(leader));

    let opts = JoinOptions {
        timeout: Duration::from_millis(1_500),
        max_retry: 0,
    };
    let keyless = peer(&hub, "c", None).await;
    let wrong = peer(&hub, "d", Some("not-the-shared-secret!!")).await;
    // Hearing nobody (every frame they see is refused, and theirs are refused), each founds a cluster of
    // its own: it never becomes a member of the keyed one, never votes in it and never writes to it.
    let (jc, jd) = tokio::join!(keyless.join_with(opts), wrong.join_with(opts));
    jc.unwrap();
    jd.unwrap();
    assert_eq!(keyless.leader_id().as_ref(), Some(keyless.local_peer_id()));
    assert_eq!(wrong.leader_id().as_ref(), Some(wrong.local_peer_id()));
    assert!(keyless.remote_peer_ids().is_empty());
    assert!(wrong.remote_peer_ids().is_empty());
    assert_eq!(
        a.leader_id(),
        b.leader_id(),
        "the keyed cluster kept its leader"
    );
    // They were heard, and refused.
    let refused =
        a.stats().counters.dropped_unauthenticated + b.stats().counters.dropped_unauthenticated;
    assert!(refused > 0);
    assert_eq!(
        a.remote_peer_ids().len(),
        1,
        "only the keyed peer is a member"
    );
    assert_eq!(b.remote_peer_ids().len(), 1);
    for p in [&a, &b, &keyless, &wrong] {
        p.close().await;
    }
}

#[test]
fn a_short_key_is_a_config_error_naming_the_key() {
    let err = Hamok::builder()
        .cluster_key("short")
        .resolve_config()
        .unwrap_err();
    assert!(
        matches!(err, HamokError::Config { ref key, .. } if key == "cluster_key"),
        "{err:?}"
    );
}
