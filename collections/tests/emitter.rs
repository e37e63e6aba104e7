//! The emitter: replicated subscriptions, publish with acks, notify, metadata CAS, dead subscribers.

mod common;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use hamok_collections::*;
use hamok_runtime::raft::PeerId;

type Inbox = Arc<Mutex<Vec<(PeerId, String)>>>;

fn recorder(inbox: &Inbox) -> impl Fn(&PeerId, String) + Send + Sync + 'static {
    let inbox = inbox.clone();
    move |from, msg| inbox.lock().unwrap().push((from.clone(), msg))
}

fn ids(c: &Cluster, which: &[usize]) -> BTreeSet<PeerId> {
    which
        .iter()
        .map(|i| c.peers[*i].local_peer_id().clone())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_reaches_every_subscriber_and_returns_the_ackers() {
    let c = Cluster::start("em-publish", 3).await;
    let mut ems = Vec::new();
    let mut inboxes = Vec::new();
    for p in &c.peers {
        let em = p
            .get_or_create_emitter::<String, String>("em")
            .await
            .unwrap();
        let inbox: Inbox = Arc::default();
        em.subscribe(
            "greet",
            recorder(&inbox),
            format!("meta-{}", p.local_peer_id()),
        )
        .await
        .unwrap();
        ems.push(em);
        inboxes.push(inbox);
    }
    for em in &ems {
        em.sync().await.unwrap();
        assert!(em.has_subscribers("greet"));
        assert!(!em.has_subscribers("other"));
        assert_eq!(em.subscriber_ids("greet").len(), 3);
    }
    let acked: BTreeSet<PeerId> = ems[0]
        .publish("greet", &"hello".to_string())
        .await
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(acked, ids(&c, &[0, 1, 2]));
    for inbox in &inboxes {
        assert_eq!(
            inbox.lock().unwrap().as_slice(),
            &[(c.peers[0].local_peer_id().clone(), "hello".to_string())]
        );
    }
    // Nobody subscribes to "other": nothing delivered, nobody acks.
    assert!(ems[1]
        .publish("other", &"x".into())
        .await
        .unwrap()
        .is_empty());
    assert!(!ems[1].notify("other", &"x".into()).unwrap());

    // Notify: fire and forget, delivered eventually everywhere.
    assert!(ems[2].notify("greet", &"psst".into()).unwrap());
    for inbox in &inboxes {
        wait_until("notify delivered", WAIT, || {
            inbox.lock().unwrap().iter().any(|(_, m)| m == "psst")
        })
        .await;
    }
    let stats = ems[2].stats();
    assert_eq!(stats.subscriptions, 1);
    assert!(stats.sent >= 2);
    c.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsubscribe_removes_one_event_only_and_handlers_are_local() {
    let c = Cluster::start("em-unsub", 2).await;
    let a = c.peers[0].create_emitter::<String, ()>("em").await.unwrap();
    let b = c.peers[1]
        .get_or_create_emitter::<String, ()>("em")
        .await
        .unwrap();
    let inbox_a: Inbox = Arc::default();
    let inbox_b: Inbox = Arc::default();
    a.subscribe("A", recorder(&inbox_a), ()).await.unwrap();
    let second = a.subscribe("A", recorder(&inbox_a), ()).await.unwrap();
    a.subscribe("B", recorder(&inbox_a), ()).await.unwrap();
    b.subscribe("B", recorder(&inbox_b), ()).await.unwrap();
    b.sync().await.unwrap();

    // Two local handlers of A on peer 0: both run, one ack.
    let acked = b.publish("A", &"1".into()).await.unwrap();
    assert_eq!(acked, vec![c.peers[0].local_peer_id().clone()]);
    assert_eq!(inbox_a.lock().unwrap().len(), 2);

    // Removing one handler keeps the subscription; removing the last drops it.
    a.remove_handler(second).await.unwrap();
    assert!(a.has_local_handlers("A"));
    b.publish("A", &"2".into()).await.unwrap();
    assert_eq!(inbox_a.lock().unwrap().len(), 3);

    // Unsubscribing from A leaves B (the reference removed the peer from every event).
    assert!(a.unsubscribe("A").await.unwrap());
    assert!(!a.unsubscribe("A").await.unwrap());
    b.sync().await.unwrap();
    assert!(!b.has_subscribers("A"));
    assert_eq!(b.subscriber_ids("B").len(), 2);
    assert!(b.publish("A", &"3".into()).await.unwrap().is_empty());
    let acked: BTreeSet<PeerId> = b
        .publish("B", &"4".into())
        .await
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(acked, ids(&c, &[0, 1]));

    // Clear: this peer leaves every event.
    a.clear().await.unwrap();
    b.sync().await.unwrap();
    assert_eq!(
        b.subscriber_ids("B"),
        vec![c.peers[1].local_peer_id().clone()]
    );
    assert_eq!(a.stats().subscriptions, 0);
    c.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscription_metadata_compare_and_set_and_table_events() {
    let c = Cluster::start("em-meta", 2).await;
    let a = c.peers[0]
        .create_emitter::<u32, String>("em")
        .await
        .unwrap();
    let b = c.peers[1]
        .get_or_create_emitter::<u32, String>("em")
        .await
        .unwrap();
    let mut ev = b.events();
    let me = c.peers[0].local_peer_id().clone();
    a.subscribe("jobs", |_, _| {}, "idle".to_string())
        .await
        .unwrap();
    assert_eq!(a.metadata("jobs").unwrap().as_deref(), Some("idle"));
    // Wrong expected value: false.
    assert!(!a
        .update_subscription_metadata("jobs", &"busy".into(), Some(&"nope".into()))
        .await
        .unwrap());
    // Right expected value: true.
    assert!(a
        .update_subscription_metadata("jobs", &"busy".into(), Some(&"idle".into()))
        .await
        .unwrap());
    // Unconditional.
    assert!(a
        .update_subscription_metadata("jobs", &"done".into(), None)
        .await
        .unwrap());
    // Not subscribed to that event: false.
    assert!(!a
        .update_subscription_metadata("other", &"x".into(), None)
        .await
        .unwrap());
    b.sync().await.unwrap();
    assert_eq!(
        b.subscribers("jobs").unwrap(),
        vec![(me.clone(), "done".to_string())]
    );
    a.unsubscribe("jobs").await.unwrap();
    assert_eq!(
        next(&mut ev).await,
        SubscriptionEvent::Added {
            event: "jobs".into(),
            peer: me.clone(),
            metadata: "idle".into()
        }
    );
    assert_eq!(
        next(&mut ev).await,
        SubscriptionEvent::Updated {
            event: "jobs".into(),
            peer: me.clone(),
            old: "idle".into(),
            new: "busy".into()
        }
    );
    assert!(matches!(
        next(&mut ev).await,
        SubscriptionEvent::Updated { .. }
    ));
    assert_eq!(
        next(&mut ev).await,
        SubscriptionEvent::Removed {
            event: "jobs".into(),
            peer: me,
            metadata: "done".into()
        }
    );
    c.close().await;
}

/// A dead subscriber costs the publish timeout but never fails the call for the living, and the
/// leader removes its subscriptions through the log once it leaves the membership.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_subscribers_do_not_fail_publish_and_are_cleaned() {
    let c = Cluster::start("em-dead", 3).await;
    let mut ems = Vec::new();
    for p in &c.peers {
        let em = p.get_or_create_emitter::<String, ()>("em").await.unwrap();
        em.subscribe("t", |_, _| {}, ()).await.unwrap();
        ems.push(em.with_publish_timeout(Duration::from_millis(300)));
    }
    for em in &ems {
        em.sync().await.unwrap();
    }
    // Cut off a follower that is not the publisher.
    let leader = c.leader();
    let victim = (0..3).find(|i| *i != leader).unwrap();
    let publisher = (0..3).find(|i| *i != leader && *i != victim).unwrap();
    let victim_id = c.peers[victim].local_peer_id().clone();
    c.hub.isolate(&victim_id);
    let acked: BTreeSet<PeerId> = ems[publisher]
        .publish("t", &"x".into())
        .await
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(acked, ids(&c, &[leader, publisher]));
    // The leader removes the silent peer from the membership, then its subscriptions.
    wait_until("the dead subscriber is cleaned", WAIT, || {
        !ems[leader].subscriber_ids("t").contains(&victim_id)
            && !ems[publisher].subscriber_ids("t").contains(&victim_id)
    })
    .await;
    let acked: BTreeSet<PeerId> = ems[publisher]
        .publish("t", &"y".into())
        .await
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(acked, ids(&c, &[leader, publisher]));
    // Once reconnected, the peer joins again and subscribes again by itself.
    c.hub.heal();
    wait_until("the returning peer subscribes again", WAIT, || {
        ems[publisher].subscriber_ids("t").contains(&victim_id)
    })
    .await;
    let acked: BTreeSet<PeerId> = ems[publisher]
        .publish("t", &"z".into())
        .await
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(acked, ids(&c, &[0, 1, 2]));
    c.close().await;
}
