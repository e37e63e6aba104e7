//! The hub's unit tests: routing, clusters, every fault, the delay queue, links coming and going.

use std::sync::Mutex as StdMutex;

use tokio::time::Duration;

use super::*;

const C: &str = "cluster";

fn pid(s: &str) -> PeerId {
    PeerId::from(s)
}

/// A recording inbound: every delivered frame is pushed to the shared vector (and processed at once,
/// so the capacity never fills).
fn recorder(capacity: usize) -> (Inbound, Arc<StdMutex<Vec<Bytes>>>) {
    let got = Arc::new(StdMutex::new(Vec::new()));
    let sink = got.clone();
    let slot: Arc<StdMutex<Option<Inbound>>> = Arc::new(StdMutex::new(None));
    let me = slot.clone();
    let inbound = Inbound::new(capacity, move |frame| {
        sink.lock().unwrap().push(frame);
        if let Some(i) = me.lock().unwrap().as_ref() {
            i.processed();
        }
    });
    *slot.lock().unwrap() = Some(inbound.clone());
    (inbound, got)
}

/// An inbound that records but never processes (so it saturates at `capacity`).
fn holder(capacity: usize) -> (Inbound, Arc<StdMutex<Vec<Bytes>>>) {
    let got = Arc::new(StdMutex::new(Vec::new()));
    let sink = got.clone();
    let inbound = Inbound::new(capacity, move |frame| sink.lock().unwrap().push(frame));
    (inbound, got)
}

async fn join(
    hub: &InProcessHub,
    cluster: &str,
    peer: &str,
) -> (Arc<dyn Link>, Arc<StdMutex<Vec<Bytes>>>) {
    let (inbound, got) = recorder(1_000_000);
    let link = hub.connect(cluster, pid(peer), inbound).await.unwrap();
    (link, got)
}

fn b(s: &'static str) -> Bytes {
    Bytes::from_static(s.as_bytes())
}

fn count(v: &Arc<StdMutex<Vec<Bytes>>>) -> usize {
    v.lock().unwrap().len()
}

#[tokio::test]
async fn unicast_and_broadcast() {
    let hub = InProcessHub::new();
    let (a, got_a) = join(&hub, C, "a").await;
    let (bl, got_b) = join(&hub, C, "b").await;
    let (_c, got_c) = join(&hub, C, "c").await;

    a.send(&pid("b"), b("to-b")).unwrap();
    assert_eq!(*got_b.lock().unwrap(), vec![b("to-b")]);
    assert_eq!(count(&got_a) + count(&got_c), 0);

    bl.broadcast(b("all")).unwrap();
    assert_eq!(*got_a.lock().unwrap(), vec![b("all")]);
    assert_eq!(*got_c.lock().unwrap(), vec![b("all")]);
    assert_eq!(
        count(&got_b),
        1,
        "a broadcast does not come back to its sender"
    );

    // Unknown target: fine for the sender, counted.
    a.send(&pid("zz"), b("nobody")).unwrap();
    let s = hub.stats();
    assert_eq!(s.delivered, 3);
    assert_eq!(s.unroutable, 1);
    assert_eq!(s.dropped, 1);
    assert_eq!(hub.peers(C), vec![pid("a"), pid("b"), pid("c")]);
}

#[tokio::test]
async fn clusters_are_isolated() {
    let hub = InProcessHub::new();
    let (a1, got_a1) = join(&hub, "one", "a").await;
    let (_b1, got_b1) = join(&hub, "one", "b").await;
    let (a2, got_a2) = join(&hub, "two", "a").await;
    let (_b2, got_b2) = join(&hub, "two", "b").await;
    let (_c2, got_c2) = join(&hub, "two", "c").await;

    a1.broadcast(b("one")).unwrap();
    a1.send(&pid("c"), b("no c in one")).unwrap();
    a2.send(&pid("b"), b("two")).unwrap();

    assert_eq!(*got_b1.lock().unwrap(), vec![b("one")]);
    assert_eq!(*got_b2.lock().unwrap(), vec![b("two")]);
    assert_eq!(count(&got_c2), 0);
    assert_eq!(count(&got_a1) + count(&got_a2), 0);
    assert_eq!(hub.stats().unroutable, 1);
}

#[tokio::test]
async fn partition_and_heal() {
    let hub = InProcessHub::new();
    let (a, got_a) = join(&hub, C, "a").await;
    let (bl, got_b) = join(&hub, C, "b").await;
    let (c, got_c) = join(&hub, C, "c").await;
    let (d, got_d) = join(&hub, C, "d").await;

    hub.partition(&[&[pid("a"), pid("b")], &[pid("c")]]);
    a.broadcast(b("x")).unwrap();
    c.broadcast(b("y")).unwrap();
    d.broadcast(b("z")).unwrap(); // d is in no group: isolated
    bl.send(&pid("a"), b("w")).unwrap();
    assert_eq!(*got_a.lock().unwrap(), vec![b("w")]);
    assert_eq!(*got_b.lock().unwrap(), vec![b("x")]);
    assert_eq!(count(&got_c) + count(&got_d), 0);
    assert_eq!(hub.stats().blocked, 2 + 3 + 3);

    hub.heal();
    c.send(&pid("a"), b("healed")).unwrap();
    d.send(&pid("b"), b("healed")).unwrap();
    assert_eq!(count(&got_a), 2);
    assert_eq!(count(&got_b), 2);

    hub.isolate(&pid("a"));
    a.broadcast(b("x")).unwrap();
    bl.send(&pid("a"), b("x")).unwrap();
    c.send(&pid("d"), b("ok")).unwrap();
    assert_eq!(count(&got_a), 2);
    assert_eq!(count(&got_b), 2);
    assert_eq!(count(&got_d), 1);
    hub.heal();
    bl.send(&pid("a"), b("back")).unwrap();
    assert_eq!(count(&got_a), 3);
}

#[tokio::test]
async fn one_way_block() {
    let hub = InProcessHub::new();
    let (a, got_a) = join(&hub, C, "a").await;
    let (bl, got_b) = join(&hub, C, "b").await;
    hub.block(&pid("a"), &pid("b"));
    a.send(&pid("b"), b("blocked")).unwrap();
    bl.send(&pid("a"), b("passes")).unwrap();
    assert_eq!(count(&got_b), 0);
    assert_eq!(*got_a.lock().unwrap(), vec![b("passes")]);
    hub.unblock(&pid("a"), &pid("b"));
    a.send(&pid("b"), b("now")).unwrap();
    assert_eq!(*got_b.lock().unwrap(), vec![b("now")]);
}

#[tokio::test]
async fn drop_rate_is_about_p() {
    let hub = InProcessHub::with_seed(7);
    let (a, _) = join(&hub, C, "a").await;
    let (_b, got_b) = join(&hub, C, "b").await;
    hub.set_drop_rate(0.3);
    for _ in 0..10_000 {
        a.send(&pid("b"), b("f")).unwrap();
    }
    let s = hub.stats();
    assert_eq!(s.lost + s.delivered, 10_000);
    assert_eq!(s.delivered as usize, count(&got_b));
    assert!((2_700..=3_300).contains(&s.lost), "lost {}", s.lost);

    // Same seed, same sends: same outcome.
    let hub2 = InProcessHub::with_seed(7);
    let (a2, _) = join(&hub2, C, "a").await;
    let (_b2, _) = join(&hub2, C, "b").await;
    hub2.set_drop_rate(0.3);
    for _ in 0..10_000 {
        a2.send(&pid("b"), b("f")).unwrap();
    }
    assert_eq!(hub2.stats(), s);

    hub.set_drop_rate(1.0);
    a.send(&pid("b"), b("f")).unwrap();
    assert_eq!(hub.stats().lost, s.lost + 1);
    hub.clear_faults();
    a.send(&pid("b"), b("f")).unwrap();
    assert_eq!(hub.stats().delivered, s.delivered + 1);
}

#[tokio::test]
async fn duplicates() {
    let hub = InProcessHub::new();
    let (a, _) = join(&hub, C, "a").await;
    let (_b, got_b) = join(&hub, C, "b").await;
    hub.set_duplicate_rate(1.0);
    a.send(&pid("b"), b("twice")).unwrap();
    assert_eq!(*got_b.lock().unwrap(), vec![b("twice"), b("twice")]);
    assert_eq!(hub.stats().duplicated, 1);
    assert_eq!(hub.stats().delivered, 2);

    hub.set_duplicate_rate(0.5);
    for _ in 0..10_000 {
        a.send(&pid("b"), b("f")).unwrap();
    }
    let dup = hub.stats().duplicated - 1;
    assert!((4_700..=5_300).contains(&dup), "duplicated {dup}");
    assert_eq!(count(&got_b) as u64, 2 + 10_000 + dup);
}

#[tokio::test(start_paused = true)]
async fn delay_orders_by_due_time() {
    let hub = InProcessHub::new();
    let (a, _) = join(&hub, C, "a").await;
    let (_b, got_b) = join(&hub, C, "b").await;

    // Equal delays keep send order.
    hub.set_delay_ms(50, 50);
    for i in 0..100u32 {
        a.send(&pid("b"), Bytes::from(i.to_be_bytes().to_vec()))
            .unwrap();
    }
    assert_eq!(count(&got_b), 0, "nothing arrives before the delay");
    tokio::time::sleep(Duration::from_millis(49)).await;
    assert_eq!(count(&got_b), 0);
    tokio::time::sleep(Duration::from_millis(2)).await;
    let expected: Vec<Bytes> = (0..100u32)
        .map(|i| Bytes::from(i.to_be_bytes().to_vec()))
        .collect();
    assert_eq!(*got_b.lock().unwrap(), expected);
    assert_eq!(hub.stats().delayed, 100);
    got_b.lock().unwrap().clear();

    // A longer delay sent first arrives after a shorter one sent later.
    hub.set_delay_ms(100, 100);
    a.send(&pid("b"), b("slow")).unwrap();
    hub.set_delay_ms(10, 10);
    a.send(&pid("b"), b("fast")).unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(*got_b.lock().unwrap(), vec![b("fast")]);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(*got_b.lock().unwrap(), vec![b("fast"), b("slow")]);

    // Random delays in a range: everything arrives within max.
    hub.set_delay_ms(5, 30);
    for _ in 0..1_000 {
        a.send(&pid("b"), b("r")).unwrap();
    }
    tokio::time::sleep(Duration::from_millis(31)).await;
    assert_eq!(count(&got_b), 1_002);
    assert_eq!(hub.stats().delivered, 1_102);

    // Back to immediate delivery.
    hub.set_delay_ms(0, 0);
    a.send(&pid("b"), b("now")).unwrap();
    assert_eq!(count(&got_b), 1_003);
}

#[tokio::test(start_paused = true)]
async fn partition_cuts_frames_in_flight() {
    let hub = InProcessHub::new();
    let (a, _) = join(&hub, C, "a").await;
    let (_b, got_b) = join(&hub, C, "b").await;
    hub.set_delay_ms(10, 10);
    a.send(&pid("b"), b("in flight")).unwrap();
    hub.isolate(&pid("b"));
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(count(&got_b), 0);
    assert_eq!(hub.stats().blocked, 1);
    assert_eq!(hub.stats().delayed, 1);
}

#[tokio::test(start_paused = true)]
async fn delayed_frames_are_bounded() {
    let hub = InProcessHub::new();
    let (a, _) = join(&hub, C, "a").await;
    let (_b, got_b) = join(&hub, C, "b").await;
    hub.set_delay_ms(1_000, 1_000);
    for _ in 0..MAX_DELAYED_IN_FLIGHT + 10 {
        a.send(&pid("b"), b("f")).unwrap();
    }
    let s = hub.stats();
    assert_eq!(s.delayed as usize, MAX_DELAYED_IN_FLIGHT);
    assert_eq!(s.overflow, 10);
    tokio::time::sleep(Duration::from_millis(1_001)).await;
    assert_eq!(count(&got_b), MAX_DELAYED_IN_FLIGHT);
    assert_eq!(
        hub.inner.counters.delayed_in_flight.load(Ordering::Relaxed),
        0
    );
    // Slots are free again.
    a.send(&pid("b"), b("f")).unwrap();
    assert_eq!(hub.stats().delayed as usize, MAX_DELAYED_IN_FLIGHT + 1);
}

#[tokio::test(start_paused = true)]
async fn delayed_frame_for_a_departed_peer_is_unroutable() {
    let hub = InProcessHub::new();
    let (a, _) = join(&hub, C, "a").await;
    let (bl, _) = join(&hub, C, "b").await;
    hub.set_delay_ms(10, 10);
    a.send(&pid("b"), b("late")).unwrap();
    bl.close();
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(hub.stats().unroutable, 1);
    assert_eq!(hub.stats().delivered, 0);
}

#[tokio::test]
async fn disconnect_resolves_closed_and_peer_can_reconnect() {
    let hub = InProcessHub::new();
    let (a, got_a) = join(&hub, C, "a").await;
    let (bl, _) = join(&hub, C, "b").await;
    let closed = a.closed();

    assert_eq!(hub.disconnect(&pid("a")), 1);
    let reason = tokio::time::timeout(Duration::from_secs(5), closed)
        .await
        .unwrap();
    assert!(reason.contains("disconnected"), "{reason}");
    assert!(a.send(&pid("b"), b("x")).is_err());
    assert!(a.broadcast(b("x")).is_err());
    // A closed() asked after the fact resolves at once.
    assert_eq!(a.closed().await, reason);

    bl.send(&pid("a"), b("gone")).unwrap();
    assert_eq!(count(&got_a), 0);
    assert_eq!(hub.peers(C), vec![pid("b")]);

    let (a2, got_a2) = join(&hub, C, "a").await;
    bl.send(&pid("a"), b("back")).unwrap();
    assert_eq!(*got_a2.lock().unwrap(), vec![b("back")]);
    // Closing the old (dead) link again does not unregister the new one.
    a.close();
    drop(a);
    bl.send(&pid("a"), b("still")).unwrap();
    assert_eq!(count(&got_a2), 2);
    a2.send(&pid("b"), b("x")).unwrap();
}

#[tokio::test]
async fn close_and_replace() {
    let hub = InProcessHub::new();
    let (a, _) = join(&hub, C, "a").await;
    let (first, got_first) = join(&hub, C, "b").await;
    let (_second, got_second) = join(&hub, C, "b").await;
    let reason = tokio::time::timeout(Duration::from_secs(5), first.closed())
        .await
        .unwrap();
    assert!(reason.contains("replaced"), "{reason}");
    a.send(&pid("b"), b("x")).unwrap();
    assert_eq!(count(&got_first), 0);
    assert_eq!(count(&got_second), 1);
    drop(first); // must not unregister the replacement
    a.send(&pid("b"), b("y")).unwrap();
    assert_eq!(count(&got_second), 2);

    let closed = a.closed();
    a.close();
    a.close(); // idempotent
    assert_eq!(closed.await, "closed");
    assert_eq!(hub.peers(C), vec![pid("b")]);

    // Dropping a link unregisters it.
    let (c, _) = join(&hub, C, "c").await;
    assert_eq!(hub.peers(C).len(), 2);
    drop(c);
    assert_eq!(hub.peers(C), vec![pid("b")]);
}

#[tokio::test]
async fn saturated_inbound_drops_and_counts() {
    let hub = InProcessHub::new();
    let (a, _) = join(&hub, C, "a").await;
    let (inbound, got) = holder(3);
    let _bl = hub.connect(C, pid("b"), inbound.clone()).await.unwrap();
    for _ in 0..5 {
        a.send(&pid("b"), b("f")).unwrap();
    }
    assert_eq!(count(&got), 3);
    assert_eq!(inbound.dropped(), 2);
    let s = hub.stats();
    assert_eq!((s.delivered, s.saturated, s.dropped), (3, 2, 2));
    inbound.processed();
    a.send(&pid("b"), b("f")).unwrap();
    assert_eq!(count(&got), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_senders() {
    let hub = InProcessHub::new();
    let (_sink, got) = join(&hub, C, "sink").await;
    let mut tasks = Vec::new();
    for i in 0..4 {
        let (link, _) = join(&hub, C, &format!("p{i}")).await;
        tasks.push(tokio::spawn(async move {
            for _ in 0..5_000 {
                link.send(&pid("sink"), b("f")).unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(count(&got), 20_000);
    assert_eq!(hub.stats().delivered, 20_000);
}

#[test]
fn delayed_send_without_runtime_is_dropped() {
    let hub = InProcessHub::new();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let (a, _bl, got) = rt.block_on(async {
        let (a, _) = join(&hub, C, "a").await;
        let (bl, got) = join(&hub, C, "b").await;
        (a, bl, got)
    });
    hub.set_delay_ms(1, 1);
    a.send(&pid("b"), b("f")).unwrap(); // outside any runtime
    assert_eq!(count(&got), 0);
    assert_eq!(hub.stats().overflow, 1);
}
