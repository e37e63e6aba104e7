//! Acknowledged queue delivery under faults: consumers on five peers take, ack, nack and abandon items
//! while the leader is cut off, a consumer's peer is partitioned, and a peer crashes holding items.
//! A recorded history is checked: every pushed item is acknowledged exactly once, none is lost, and an
//! item is delivered again only if no earlier holder acknowledged it. The check is shown to catch a
//! lost item, a double ack and a delivery after an ack, including the real loss of the at-most-once
//! `pop` when its consumer crashes.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use hamok_collections::queue::Outcome;
use hamok_collections::*;
use hamok_runtime::HamokError;
use hamok_testkit::cluster::pid;

/// What became of one observed delivery.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fate {
    /// `ack` answered `true`.
    Acked,
    /// `ack` answered `false`: the delivery was no longer held.
    NotHeld,
    /// `ack` failed in a way that may have taken effect.
    Unknown,
    /// Given back with `nack`, or abandoned (its consumer "crashed" holding it).
    Released,
}

/// One delivery as a consumer saw it. `sent` and `answered` are positions on one global counter:
/// `sent` taken before the take was sent, `answered` after the ack's answer came back.
#[derive(Clone, Debug)]
struct Rec {
    item: u32,
    deliveries: u32,
    sent: u64,
    fate: Fate,
    answered: u64,
}

#[derive(Default)]
struct History {
    pushed: BTreeSet<u32>,
    recs: Vec<Rec>,
}

/// Checks a history: returns every violation found (empty: the history is correct).
fn check(h: &History) -> Vec<String> {
    let mut bad = Vec::new();
    let mut by_item: BTreeMap<u32, Vec<&Rec>> = BTreeMap::new();
    for r in &h.recs {
        if !h.pushed.contains(&r.item) {
            bad.push(format!("item {} delivered but never pushed", r.item));
        }
        by_item.entry(r.item).or_default().push(r);
    }
    for item in &h.pushed {
        let recs = by_item.get(item).map(Vec::as_slice).unwrap_or(&[]);
        let acked: Vec<&&Rec> = recs.iter().filter(|r| r.fate == Fate::Acked).collect();
        let unknown = recs.iter().any(|r| r.fate == Fate::Unknown);
        match acked.len() {
            1 => {}
            0 if unknown => {} // its ack may have been the one applied
            0 => bad.push(format!("item {item} lost: never acknowledged ({recs:?})")),
            n => bad.push(format!("item {item} acknowledged {n} times ({recs:?})")),
        }
        // No delivery whose take was sent after an ack of the item was answered.
        if let Some(first_ack) = acked.iter().map(|r| r.answered).min() {
            for r in recs.iter().filter(|r| r.sent > first_ack) {
                bad.push(format!(
                    "item {item} delivered again after it was acknowledged: {r:?}"
                ));
            }
        }
        // Delivery counts grow with every delivery.
        let mut counts: Vec<u32> = recs.iter().map(|r| r.deliveries).collect();
        counts.sort_unstable();
        if counts.windows(2).any(|w| w[0] == w[1]) || counts.first().is_some_and(|c| *c == 0) {
            bad.push(format!("item {item}: delivery counts {counts:?}"));
        }
    }
    bad
}

struct Recorder {
    clock: AtomicU64,
    history: Mutex<History>,
}

impl Recorder {
    fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::SeqCst)
    }

    fn record(&self, rec: Rec) {
        self.history.lock().unwrap().recs.push(rec);
    }

    fn acked(&self) -> usize {
        let h = self.history.lock().unwrap();
        let acked: BTreeSet<u32> = h
            .recs
            .iter()
            .filter(|r| r.fate == Fate::Acked)
            .map(|r| r.item)
            .collect();
        acked.len()
    }
}

/// A small deterministic generator (xorshift), one per consumer.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

const ITEMS: u32 = 300;
const LEASE: Duration = Duration::from_millis(400);

/// Takes, then acks (most), nacks or abandons (some) until `stop`.
async fn consume(q: HamokQueue<u32>, rec: Arc<Recorder>, stop: Arc<AtomicBool>, seed: u64) {
    let mut rng = Rng(seed | 1);
    while !stop.load(Ordering::SeqCst) {
        let sent = rec.tick();
        let d = match q.take_wait(LEASE, Duration::from_millis(100)).await {
            Ok(Some(d)) => d,
            Ok(None) => continue,
            Err(HamokError::Closed) => return,
            // A take whose answer is lost leaves its item leased until the lease runs out.
            Err(_) => continue,
        };
        let roll = rng.below(100);
        let fate = if roll < 8 {
            // The consumer "crashes" holding the item: nothing more is done with it.
            Fate::Released
        } else if roll < 12 {
            match q.nack(d.id).await {
                Ok(Some(Outcome::Returned)) | Ok(None) => Fate::Released,
                Ok(Some(Outcome::DeadLettered)) => panic!("no dead-letter threshold is set"),
                Err(e) if e.may_have_taken_effect() => Fate::Released,
                Err(_) => Fate::Released,
            }
        } else {
            if roll < 16 {
                // Slow work: past the lease sometimes, so the ack finds the delivery gone.
                tokio::time::sleep(LEASE + Duration::from_millis(200)).await;
            }
            match q.ack(d.id).await {
                Ok(true) => Fate::Acked,
                Ok(false) => Fate::NotHeld,
                Err(e) if e.may_have_taken_effect() => Fate::Unknown,
                Err(_) => Fate::NotHeld,
            }
        };
        rec.record(Rec {
            item: d.value,
            deliveries: d.deliveries,
            sent,
            fate,
            answered: rec.tick(),
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_item_is_acknowledged_once_through_crashes_partitions_and_leader_changes() {
    let c = Cluster::start("queue-ack", 5).await;
    let mut queues = Vec::new();
    for p in &c.peers {
        queues.push(p.get_or_create_queue::<u32>("jobs").await.unwrap());
    }
    let rec = Arc::new(Recorder {
        clock: AtomicU64::new(0),
        history: Mutex::new(History {
            pushed: (0..ITEMS).collect(),
            ..History::default()
        }),
    });
    let stop = Arc::new(AtomicBool::new(false));

    // The producer (p00) pushes in batches. Its timeout outlasts every fault below, so a push is never
    // ambiguous (it would fail the test loudly).
    let producer = {
        let q = queues[0].clone();
        tokio::spawn(async move {
            for start in (0..ITEMS).step_by(20) {
                let batch: Vec<u32> = (start..(start + 20).min(ITEMS)).collect();
                q.push(batch).await.expect("push");
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
        })
    };

    // Consumers on p00..p03; p04 is the peer that crashes holding items.
    let consumers: Vec<_> = (0..4)
        .map(|i| {
            tokio::spawn(consume(
                queues[i].clone(),
                rec.clone(),
                stop.clone(),
                0x9e37_79b9 + i as u64,
            ))
        })
        .collect();

    // p04 takes five items under a lease far longer than the test and crashes (closes) holding them:
    // only its removal from the cluster can give them back.
    let crashed: Vec<Delivery<u32>> =
        hamok_testkit::wait::eventually("p04 takes items", WAIT, || {
            let q = queues[4].clone();
            async move {
                let taken = q.take_many(5, Duration::from_secs(3600)).await.ok()?;
                (!taken.is_empty()).then_some(taken)
            }
        })
        .await;
    let crash_sent = rec.tick();
    c.peers[4].close().await;
    for d in &crashed {
        rec.record(Rec {
            item: d.value,
            deliveries: d.deliveries,
            sent: crash_sent,
            fate: Fate::Released,
            answered: rec.tick(),
        });
    }

    // Cut the leader off twice (a new leader is elected each time), and partition a consumer's peer.
    let live: Vec<usize> = (0..4).collect();
    for round in 0..2 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let leader = live
            .iter()
            .copied()
            .find(|&i| c.peers[i].is_leader())
            .unwrap_or(0);
        c.hub.isolate(&pid(leader).into());
        tokio::time::sleep(Duration::from_millis(700)).await;
        c.hub.heal();
        let other = (leader + 1 + round) % 4;
        tokio::time::sleep(Duration::from_millis(300)).await;
        c.hub.isolate(&pid(other).into());
        tokio::time::sleep(Duration::from_millis(500)).await;
        c.hub.heal();
    }
    producer.await.unwrap();

    // Until every item is acknowledged, or a generous bound: then the check says what went wrong.
    let until = tokio::time::Instant::now() + Duration::from_secs(60);
    while rec.acked() < ITEMS as usize && tokio::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::SeqCst);
    for t in consumers {
        t.await.unwrap();
    }

    let h = std::mem::take(&mut *rec.history.lock().unwrap());
    let violations = check(&h);
    assert!(violations.is_empty(), "violations: {violations:#?}");
    let count = |f: Fate| h.recs.iter().filter(|r| r.fate == f).count();
    eprintln!(
        "{} deliveries: {} acked, {} not held any more, {} unknown, {} released",
        h.recs.len(),
        count(Fate::Acked),
        count(Fate::NotHeld),
        count(Fate::Unknown),
        count(Fate::Released)
    );
    // The faults did their work: items came back after crashes, nacks and expired leases, and the
    // crashed peer's items were delivered again.
    let redelivered = h.recs.iter().filter(|r| r.deliveries > 1).count();
    assert!(redelivered > 0, "no redelivery happened");
    for d in &crashed {
        assert!(
            h.recs
                .iter()
                .any(|r| r.item == d.value && r.deliveries > d.deliveries && r.fate == Fate::Acked),
            "item {} held by the crashed peer was delivered again and acknowledged",
            d.value
        );
    }
    for q in &queues[..4] {
        q.sync().await.unwrap();
        assert_eq!(
            (q.len(), q.in_flight()),
            (0, 0),
            "nothing left on {}",
            q.id()
        );
    }
    c.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaving_holder_gives_its_items_back_in_the_removal_and_dead_letters_collect() {
    let c = Cluster::start("queue-leave", 3).await;
    let q0 = c.peers[0].get_or_create_queue::<String>("q").await.unwrap();
    let q2 = c.peers[2].get_or_create_queue::<String>("q").await.unwrap();
    q0.push(["a".to_string(), "b".to_string()]).await.unwrap();
    q0.set_max_deliveries(Some(2)).await.unwrap();

    // p02 takes "a" for an hour and leaves: the removal gives it back at once.
    let held = q2.take(Duration::from_secs(3600)).await.unwrap().unwrap();
    assert_eq!((held.value.as_str(), held.deliveries), ("a", 1));
    let mut events = q0.events();
    c.peers[2].leave().await.unwrap();
    loop {
        match next(&mut events).await {
            QueueEvent::Returned { value, deliveries } => {
                assert_eq!((value.as_str(), deliveries), ("a", 1));
                break;
            }
            other => eprintln!("event {other:?}"),
        }
    }
    assert_eq!(q0.to_vec().unwrap(), vec!["a".to_string(), "b".to_string()]);
    // Its old delivery can no longer be acknowledged.
    assert!(!q0.ack(held.id).await.unwrap());

    // Second delivery of "a", not acknowledged: its lease runs out and it becomes a dead letter.
    let second = q0.take(Duration::from_millis(50)).await.unwrap().unwrap();
    assert_eq!((second.value.as_str(), second.deliveries), ("a", 2));
    loop {
        if let QueueEvent::DeadLettered { value, deliveries } = next(&mut events).await {
            assert_eq!((value.as_str(), deliveries), ("a", 2));
            break;
        }
    }
    assert!(!q0.ack(second.id).await.unwrap());
    let dead = q0.pop_dead_letters(10).await.unwrap();
    assert_eq!(
        dead,
        vec![DeadLetter {
            value: "a".to_string(),
            deliveries: 2
        }]
    );
    // take_wait wakes on a push from another peer.
    let q1 = c.peers[1].get_or_create_queue::<String>("q").await.unwrap();
    let b = q1.take(Duration::from_secs(10)).await.unwrap().unwrap();
    assert!(q1.ack(b.id).await.unwrap());
    let waiter = {
        let q0 = q0.clone();
        tokio::spawn(async move {
            q0.take_wait(Duration::from_secs(10), Duration::from_secs(20))
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    q1.push_one("c".to_string()).await.unwrap();
    let got = waiter.await.unwrap().unwrap().unwrap();
    assert_eq!(got.value, "c");
    c.close().await;
}

/// The same consumers with the at-most-once `pop`: a consumer that crashes after its pop loses the
/// item, and the history check says so. (What `take`/`ack` exists to prevent.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_check_catches_the_items_an_at_most_once_pop_loses() {
    let c = Cluster::start("queue-pop-loss", 3).await;
    let q = c.peers[1].get_or_create_queue::<u32>("q").await.unwrap();
    q.push(0..20).await.unwrap();
    let mut h = History {
        pushed: (0..20).collect(),
        ..History::default()
    };
    let mut clock = 0;
    let mut rng = Rng(7);
    while let Some(item) = q.pop().await.unwrap() {
        clock += 1;
        // One in four consumers crashes after its pop: the item is gone with it.
        let fate = if rng.below(4) == 0 {
            Fate::Released
        } else {
            Fate::Acked
        };
        h.recs.push(Rec {
            item,
            deliveries: 1,
            sent: clock,
            fate,
            answered: clock,
        });
    }
    let lost = h.recs.iter().filter(|r| r.fate == Fate::Released).count();
    assert!(lost > 0);
    let violations = check(&h);
    assert_eq!(
        violations.iter().filter(|v| v.contains("lost")).count(),
        lost,
        "{violations:#?}"
    );
    c.close().await;
}

#[test]
fn the_check_catches_double_acks_deliveries_after_an_ack_and_bad_counts() {
    let rec = |item, deliveries, sent, fate, answered| Rec {
        item,
        deliveries,
        sent,
        fate,
        answered,
    };
    let pushed: BTreeSet<u32> = [1].into();
    let ok = History {
        pushed: pushed.clone(),
        recs: vec![
            rec(1, 1, 0, Fate::Released, 1),
            rec(1, 2, 2, Fate::Acked, 3),
        ],
    };
    assert!(check(&ok).is_empty());
    let twice = History {
        pushed: pushed.clone(),
        recs: vec![rec(1, 1, 0, Fate::Acked, 1), rec(1, 2, 0, Fate::Acked, 2)],
    };
    assert!(check(&twice).iter().any(|v| v.contains("2 times")));
    let after_ack = History {
        pushed: pushed.clone(),
        recs: vec![rec(1, 1, 0, Fate::Acked, 1), rec(1, 2, 5, Fate::NotHeld, 6)],
    };
    assert!(check(&after_ack).iter().any(|v| v.contains("after it was")));
    let same_count = History {
        pushed,
        recs: vec![
            rec(1, 1, 0, Fate::Released, 1),
            rec(1, 1, 2, Fate::Acked, 3),
        ],
    };
    assert!(check(&same_count).iter().any(|v| v.contains("counts")));
}
