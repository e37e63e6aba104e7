//! Map, Set, Queue and Record on in-process clusters: every method, every event, the races of the
//! reference's examples, and catch-up by snapshot.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;

use common::*;
use hamok_collections::*;
use hamok_runtime::HamokError;
use serde::{Deserialize, Serialize};

// -------------------------------------------------------------------------------------------------
// Map

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn map_methods_and_their_results() {
    let c = Cluster::start("map-methods", 3).await;
    let a = c.peers[c.follower()]
        .create_map::<String, i64>("m")
        .await
        .unwrap();
    let b = c.peers[c.leader()]
        .get_or_create_map::<String, i64>("m")
        .await
        .unwrap();

    assert_eq!(a.set("x".into(), 1).await.unwrap(), None);
    assert_eq!(a.set("x".into(), 2).await.unwrap(), Some(1));
    let olds = a.set_all([("x".into(), 3), ("y".into(), 4)]).await.unwrap();
    assert_eq!(olds, vec![("x".to_string(), 2)]);
    assert_eq!(a.insert("x".into(), 9).await.unwrap(), Some(3));
    assert_eq!(a.insert("z".into(), 5).await.unwrap(), None);
    let existing = a
        .insert_all([("z".into(), 0), ("w".into(), 6)])
        .await
        .unwrap();
    assert_eq!(existing, vec![("z".to_string(), 5)]);
    assert_eq!(a.get(&"z".into()).unwrap(), Some(5));
    assert_eq!(a.len(), 4);
    assert!(!a.is_empty());
    assert!(a.contains_key(&"w".into()).unwrap());
    assert_eq!(
        a.keys().unwrap().into_iter().collect::<BTreeSet<_>>(),
        ["w", "x", "y", "z"].iter().map(|s| s.to_string()).collect()
    );
    assert_eq!(a.values().unwrap().iter().sum::<i64>(), 3 + 4 + 5 + 6);
    assert_eq!(a.entries().unwrap().len(), 4);
    assert_eq!(a.iter().count(), 4);
    let some = a.get_all([&"x".to_string(), &"nope".to_string()]).unwrap();
    assert_eq!(some, vec![("x".to_string(), 3)]);

    assert!(a.update_if("x".into(), 10, 3).await.unwrap());
    assert!(!a.update_if("x".into(), 11, 3).await.unwrap());
    assert!(!a.update_if("absent".into(), 1, 0).await.unwrap());
    assert!(
        !a.remove_if("x".into(), 3).await.unwrap(),
        "a mismatch is false, not a timeout"
    );
    assert!(a.remove_if("x".into(), 10).await.unwrap());
    assert_eq!(a.get(&"x".into()).unwrap(), None);

    assert!(a.delete("y".into()).await.unwrap());
    assert!(!a.delete("y".into()).await.unwrap());
    assert_eq!(a.remove("z".into()).await.unwrap(), Some(5));
    assert_eq!(a.remove("z".into()).await.unwrap(), None);
    a.set_all([("p".into(), 1), ("q".into(), 2), ("r".into(), 3)])
        .await
        .unwrap();
    let deleted = a
        .delete_all(["p".to_string(), "nope".to_string()])
        .await
        .unwrap();
    assert_eq!(deleted, vec!["p".to_string()]);
    let removed = a
        .remove_all(["q".to_string(), "nope".to_string()])
        .await
        .unwrap();
    assert_eq!(removed, vec![("q".to_string(), 2)]);

    // The other peer sees the same state (linearizable, then local).
    assert_eq!(b.get_linearizable(&"r".into()).await.unwrap(), Some(3));
    assert_eq!(b.export(), a.export());

    let snap = a.export();
    a.clear().await.unwrap();
    assert!(a.is_empty());
    b.import(snap.clone()).await.unwrap();
    a.sync().await.unwrap();
    assert_eq!(a.export(), snap);
    c.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn map_values_that_look_false_are_values() {
    let c = Cluster::start("map-falsy", 1).await;
    let ints = c.peers[0].create_map::<String, i64>("ints").await.unwrap();
    assert_eq!(ints.set("k".into(), 0).await.unwrap(), None);
    assert_eq!(ints.insert("k".into(), 5).await.unwrap(), Some(0));
    assert_eq!(
        ints.get_all([&"k".to_string()]).unwrap(),
        vec![("k".to_string(), 0)]
    );
    assert!(ints.update_if("k".into(), 1, 0).await.unwrap());
    assert!(ints.update_if("k".into(), 0, 1).await.unwrap());
    assert!(ints.remove_if("k".into(), 0).await.unwrap());

    let opts = c.peers[0]
        .create_map::<String, Option<String>>("opts")
        .await
        .unwrap();
    opts.set("n".into(), None).await.unwrap();
    assert_eq!(opts.get(&"n".into()).unwrap(), Some(None));
    assert_eq!(
        opts.insert("n".into(), Some("x".into())).await.unwrap(),
        Some(None)
    );
    assert_eq!(opts.remove("n".into()).await.unwrap(), Some(None));

    let strs = c.peers[0].create_map::<bool, String>("strs").await.unwrap();
    strs.set(false, String::new()).await.unwrap();
    assert_eq!(strs.get(&false).unwrap(), Some(String::new()));
    assert!(strs.remove_if(false, String::new()).await.unwrap());
    c.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn map_events_on_every_peer() {
    let c = Cluster::start("map-events", 3).await;
    let writer = c.peers[0].create_map::<String, u32>("ev").await.unwrap();
    let mut streams = Vec::new();
    for p in &c.peers {
        let m = p.get_or_create_map::<String, u32>("ev").await.unwrap();
        streams.push(m.events());
    }
    writer.set("a".into(), 1).await.unwrap();
    writer.set("a".into(), 2).await.unwrap();
    writer.insert("b".into(), 3).await.unwrap();
    writer.insert("b".into(), 4).await.unwrap(); // no event: exists
    writer.update_if("b".into(), 5, 3).await.unwrap();
    writer.update_if("b".into(), 6, 3).await.unwrap(); // no event: mismatch
    writer.delete("a".into()).await.unwrap();
    writer.remove("b".into()).await.unwrap();
    writer.set("c".into(), 7).await.unwrap();
    writer.remove_if("c".into(), 7).await.unwrap();
    writer.clear().await.unwrap();
    let expected = vec![
        MapEvent::Insert {
            key: "a".to_string(),
            value: 1,
        },
        MapEvent::Update {
            key: "a".to_string(),
            old: 1,
            new: 2,
        },
        MapEvent::Insert {
            key: "b".to_string(),
            value: 3,
        },
        MapEvent::Update {
            key: "b".to_string(),
            old: 3,
            new: 5,
        },
        MapEvent::Remove {
            key: "a".to_string(),
            value: 2,
        },
        MapEvent::Remove {
            key: "b".to_string(),
            value: 5,
        },
        MapEvent::Insert {
            key: "c".to_string(),
            value: 7,
        },
        MapEvent::Remove {
            key: "c".to_string(),
            value: 7,
        },
        MapEvent::Clear,
    ];
    for (i, s) in streams.iter_mut().enumerate() {
        for e in &expected {
            assert_eq!(&next(s).await, e, "peer {i}");
        }
    }
    writer.close();
    assert_eq!(next(&mut streams[0]).await, MapEvent::Close);
    assert!(matches!(
        writer.set("x".into(), 1).await,
        Err(HamokError::Closed)
    ));
    // Opening it again gives a fresh handle; the replicated map was untouched.
    let reopened = c.peers[0]
        .get_or_create_map::<String, u32>("ev")
        .await
        .unwrap();
    assert!(!reopened.is_closed());
    reopened.set("again".into(), 1).await.unwrap();
    assert_eq!(
        next(&mut streams[1]).await,
        MapEvent::Insert {
            key: "again".to_string(),
            value: 1
        }
    );
    c.close().await;
}

/// Closing the peer closes its handles and their streams get `Close`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_the_peer_closes_its_handles() {
    let c = Cluster::start("peer-close", 2).await;
    let m = c.peers[1].create_map::<String, u32>("m").await.unwrap();
    let mut ev = m.events();
    c.peers[1].close().await;
    assert_eq!(next(&mut ev).await, MapEvent::Close);
    assert!(m.is_closed());
    c.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_rules_and_kind_mismatch() {
    let c = Cluster::start("create-rules", 2).await;
    let p = &c.peers[0];
    p.create_map::<String, u8>("m").await.unwrap();
    assert!(matches!(
        c.peers[1].create_map::<String, u8>("m").await,
        Err(HamokError::Rejected(_))
    ));
    c.peers[1]
        .get_or_create_map::<String, u8>("m")
        .await
        .unwrap();
    assert!(matches!(
        p.get_or_create_queue::<u8>("m").await,
        Err(HamokError::KindMismatch { .. })
    ));
    assert!(matches!(
        p.create_record::<Cfg>("m").await,
        Err(HamokError::KindMismatch { .. })
    ));
    p.create_queue::<u8>("q").await.unwrap();
    assert!(matches!(
        p.create_queue::<u8>("q").await,
        Err(HamokError::Rejected(_))
    ));
    assert!(matches!(
        p.get_or_create_emitter::<u8, ()>("q").await,
        Err(HamokError::KindMismatch { .. })
    ));
    assert!(matches!(
        p.get_or_create_set::<u8>("q").await,
        Err(HamokError::KindMismatch { .. })
    ));
    c.close().await;
}

/// The reference's update-if race: 5 peers, 100 rounds, all try to move one key from round r to r+1;
/// exactly one wins each round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_if_race_has_exactly_one_winner_per_round() {
    let c = Cluster::start("update-if-race", 5).await;
    let mut maps = Vec::new();
    for p in &c.peers {
        maps.push(p.get_or_create_map::<String, u32>("race").await.unwrap());
    }
    maps[0].set("k".into(), 0).await.unwrap();
    for m in &maps {
        m.sync().await.unwrap();
    }
    for round in 0..100u32 {
        let tasks: Vec<_> = maps
            .iter()
            .cloned()
            .map(|m| tokio::spawn(async move { m.update_if("k".into(), round + 1, round).await }))
            .collect();
        let mut winners = 0;
        for t in tasks {
            if t.await.unwrap().unwrap() {
                winners += 1;
            }
        }
        assert_eq!(winners, 1, "round {round}");
    }
    assert_eq!(
        maps[3].get_linearizable(&"k".into()).await.unwrap(),
        Some(100)
    );
    c.close().await;
}

/// A handle opened late, on a peer that joined after log compaction, sees the whole state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_peer_after_compaction_sees_every_collection() {
    let mut c = Cluster::start_with("late-peer", 3, |b| b.snapshot_after_entries(50)).await;
    let p = c.peers[0].clone();
    let map = p.create_map::<u32, String>("m").await.unwrap();
    for i in 0..200 {
        map.set(i, format!("v{i}")).await.unwrap();
    }
    let queue = p.create_queue::<u32>("q").await.unwrap();
    queue.push(0..10).await.unwrap();
    queue.pop().await.unwrap();
    let set = p.create_set::<String>("s").await.unwrap();
    set.add(["a".to_string(), "b".to_string()]).await.unwrap();
    let rec = p.create_record::<Cfg>("r").await.unwrap();
    rec.set(NAME, &"late".to_string()).await.unwrap();
    let em = p.create_emitter::<String, u8>("e").await.unwrap();
    em.subscribe("topic", |_, _| {}, 7).await.unwrap();
    for i in 200..260 {
        map.set(i, format!("v{i}")).await.unwrap();
    }
    wait_until("a snapshot was taken", WAIT, || {
        p.stats().counters.snapshots_taken > 0
    })
    .await;

    let late = c
        .add_peer_with("p09", |b| b.snapshot_after_entries(50))
        .await;
    assert!(
        late.stats().counters.snapshots_installed > 0,
        "caught up by snapshot"
    );
    let lm = late.get_or_create_map::<u32, String>("m").await.unwrap();
    lm.sync().await.unwrap();
    assert_eq!(lm.len(), 260);
    assert_eq!(lm.get(&7).unwrap().as_deref(), Some("v7"));
    let lq = late.get_or_create_queue::<u32>("q").await.unwrap();
    assert_eq!(lq.to_vec().unwrap(), (1..10).collect::<Vec<_>>());
    let ls = late.get_or_create_set::<String>("s").await.unwrap();
    assert!(ls.contains(&"b".to_string()).unwrap());
    let lr = late.get_or_create_record::<Cfg>("r").await.unwrap();
    assert_eq!(lr.get(NAME).unwrap().as_deref(), Some("late"));
    let le = late.get_or_create_emitter::<String, u8>("e").await.unwrap();
    assert_eq!(
        le.subscribers("topic").unwrap(),
        vec![(p.local_peer_id().clone(), 7)]
    );
    // And it keeps following: a write from the late peer is seen by the others.
    lm.set(1000, "from-late".into()).await.unwrap();
    assert_eq!(
        map.get_linearizable(&1000).await.unwrap().as_deref(),
        Some("from-late")
    );
    c.close().await;
}

// -------------------------------------------------------------------------------------------------
// Set

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_methods_and_events() {
    let c = Cluster::start("set", 2).await;
    let a = c.peers[0].create_set::<String>("s").await.unwrap();
    let b = c.peers[1].get_or_create_set::<String>("s").await.unwrap();
    let mut ev = b.events();
    assert_eq!(
        a.add(["x".to_string(), "y".to_string(), "x".to_string()])
            .await
            .unwrap(),
        2
    );
    assert_eq!(a.add(["x".to_string()]).await.unwrap(), 0);
    assert!(a.contains(&"x".to_string()).unwrap());
    assert!(b.contains_linearizable(&"y".to_string()).await.unwrap());
    assert_eq!(a.len(), 2);
    assert_eq!(a.values().unwrap(), a.iter().collect::<Vec<_>>());
    assert_eq!(
        a.remove(["x".to_string(), "nope".to_string()])
            .await
            .unwrap(),
        1
    );
    a.clear().await.unwrap();
    assert!(a.is_empty());
    for e in [
        SetEvent::Add("x".to_string()),
        SetEvent::Add("y".to_string()),
        SetEvent::Remove("x".to_string()),
        SetEvent::Clear,
    ] {
        assert_eq!(next(&mut ev).await, e);
    }
    c.close().await;
}

// -------------------------------------------------------------------------------------------------
// Queue

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_methods_capacity_and_events() {
    let c = Cluster::start("queue", 2).await;
    let a = c.peers[0].create_queue::<u32>("q").await.unwrap();
    let b = c.peers[1].get_or_create_queue::<u32>("q").await.unwrap();
    let mut ev = b.events();
    assert_eq!(a.pop().await.unwrap(), None);
    assert_eq!(a.push([1, 2, 3]).await.unwrap(), 3);
    assert_eq!(a.push_one(4).await.unwrap(), 4);
    assert_eq!(a.peek().unwrap(), Some(1));
    assert_eq!(a.len(), 4);
    assert_eq!(a.to_vec().unwrap(), vec![1, 2, 3, 4]);
    assert_eq!(a.iter().collect::<Vec<_>>(), vec![1, 2, 3, 4]);
    assert_eq!(b.pop().await.unwrap(), Some(1));
    assert_eq!(a.pop_many(2).await.unwrap(), vec![2, 3]);
    assert_eq!(a.pop().await.unwrap(), Some(4));
    assert!(a.is_empty());

    a.set_capacity(Some(2)).await.unwrap();
    b.sync().await.unwrap();
    assert_eq!(b.capacity(), Some(2));
    a.push([7, 8]).await.unwrap();
    assert_eq!(
        b.push([9]).await.unwrap_err(),
        HamokError::Busy(QUEUE_FULL),
        "a full queue refuses the push"
    );
    assert_eq!(a.len(), 2);
    assert_eq!(a.clear().await.unwrap(), 2);
    a.set_capacity(None).await.unwrap();
    a.push([0]).await.unwrap();

    use QueueEvent::*;
    let expected = [
        Add(1),
        Add(2),
        Add(3),
        NotEmpty,
        Add(4),
        Remove(1),
        Remove(2),
        Remove(3),
        Remove(4),
        Empty,
        Add(7),
        Add(8),
        NotEmpty,
        Clear,
        Empty,
        Add(0),
        NotEmpty,
    ];
    for e in expected {
        assert_eq!(next(&mut ev).await, e);
    }
    c.close().await;
}

/// 3 peers pop a 10,000-item queue concurrently: every item is popped exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_pops_take_every_item_exactly_once() {
    const N: u32 = 10_000;
    let c = Cluster::start("queue-pops", 3).await;
    let q0 = c.peers[0].create_queue::<u32>("jobs").await.unwrap();
    for chunk in (0..N).collect::<Vec<_>>().chunks(1000) {
        q0.push(chunk.iter().copied()).await.unwrap();
    }
    let mut tasks = Vec::new();
    for p in &c.peers {
        let q = p.get_or_create_queue::<u32>("jobs").await.unwrap();
        q.sync().await.unwrap();
        // Two concurrent consumers per peer.
        for _ in 0..2 {
            let q = q.clone();
            tasks.push(tokio::spawn(async move {
                let mut got = Vec::new();
                while let Some(v) = q.pop().await.unwrap() {
                    got.push(v);
                }
                got
            }));
        }
    }
    let mut all = Vec::new();
    let mut per_consumer = Vec::new();
    for t in tasks {
        let got = t.await.unwrap();
        per_consumer.push(got.len());
        // Each consumer sees items in FIFO order.
        assert!(got.windows(2).all(|w| w[0] < w[1]));
        all.extend(got);
    }
    assert_eq!(
        all.len(),
        N as usize,
        "no item lost or duplicated: {per_consumer:?}"
    );
    all.sort_unstable();
    assert_eq!(all, (0..N).collect::<Vec<_>>());
    assert!(q0.is_empty());
    c.close().await;
}

// -------------------------------------------------------------------------------------------------
// Record

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Cfg {
    name: String,
    replicas: u32,
    #[serde(default)]
    tags: Vec<String>,
    owner: Option<String>,
}

const NAME: Field<Cfg, String> = Field::new("name");
const REPLICAS: Field<Cfg, u32> = Field::new("replicas");
const TAGS: Field<Cfg, Vec<String>> = Field::new("tags");
const OWNER: Field<Cfg, Option<String>> = Field::new("owner");

fn cfg() -> Cfg {
    Cfg {
        name: "svc".into(),
        replicas: 3,
        tags: vec!["a".into()],
        owner: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn record_methods() {
    let c = Cluster::start("record", 2).await;
    let a = c.peers[0].create_record::<Cfg>("r").await.unwrap();
    assert!(a.initial_object().is_none());
    assert!(a.is_empty());
    assert!(a.instance().is_err(), "required fields are missing");
    assert_eq!(a.insert_instance(&cfg()).await.unwrap().len(), 0);
    assert_eq!(a.instance().unwrap(), cfg());
    let existing = a
        .insert_instance(&Cfg {
            replicas: 9,
            ..cfg()
        })
        .await
        .unwrap();
    assert_eq!(existing.len(), 4);
    assert_eq!(existing.get(REPLICAS).unwrap(), Some(3));

    assert_eq!(a.set(REPLICAS, &5).await.unwrap(), Some(3));
    assert_eq!(a.get(REPLICAS).unwrap(), Some(5));
    assert_eq!(a.insert(REPLICAS, &7).await.unwrap(), Some(5));
    assert!(a.update_if(REPLICAS, &6, &5).await.unwrap());
    assert!(!a.update_if(REPLICAS, &8, &5).await.unwrap());
    assert_eq!(a.get(OWNER).unwrap(), Some(None));
    // Multi-field CAS: every expected field must match.
    let claimed = a
        .update_instance_if(
            Patch::new()
                .with(OWNER, &Some("me".into()))
                .with(REPLICAS, &1),
            Patch::new().with(OWNER, &None).with(REPLICAS, &6),
        )
        .await
        .unwrap();
    assert!(claimed);
    let again = a
        .update_instance_if(
            Patch::new().with(OWNER, &Some("you".into())),
            Patch::new().with(OWNER, &None).with(REPLICAS, &1),
        )
        .await
        .unwrap();
    assert!(!again, "owner no longer None");

    assert!(a.delete(TAGS).await.unwrap());
    assert!(!a.delete(TAGS).await.unwrap());
    assert_eq!(
        a.instance().unwrap().tags,
        Vec::<String>::new(),
        "serde default"
    );
    // Expected-absent condition.
    assert!(a
        .update_instance_if(
            Patch::new().with(TAGS, &vec!["b".into()]),
            Patch::new().without(TAGS)
        )
        .await
        .unwrap());
    a.apply_patch(Patch::new().without(OWNER).with(NAME, &"n2".into()))
        .await
        .unwrap();
    assert_eq!(a.get(OWNER).unwrap(), None);
    assert_eq!(a.get(NAME).unwrap().as_deref(), Some("n2"));
    a.set_instance(&cfg()).await.unwrap();
    let b = c.peers[1].get_or_create_record::<Cfg>("r").await.unwrap();
    assert_eq!(b.instance_linearizable().await.unwrap(), cfg());
    assert_eq!(b.field_names().len(), 4);
    a.clear().await.unwrap();
    assert_eq!(a.len(), 0);

    // A handle with an initial object inserts only the absent fields.
    a.set(REPLICAS, &42).await.unwrap();
    let with = c.peers[1]
        .get_or_create_record_with("r", cfg())
        .await
        .unwrap();
    assert_eq!(with.initial_object(), Some(&cfg()));
    assert_eq!(with.get(REPLICAS).unwrap(), Some(42));
    assert_eq!(with.get(NAME).unwrap().as_deref(), Some("svc"));
    c.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn record_events_per_field() {
    let c = Cluster::start("record-events", 2).await;
    let a = c.peers[0].create_record::<Cfg>("r").await.unwrap();
    let b = c.peers[1].get_or_create_record::<Cfg>("r").await.unwrap();
    let mut ev = b.events();
    a.set(NAME, &"x".into()).await.unwrap();
    a.set(NAME, &"y".into()).await.unwrap();
    a.insert(REPLICAS, &2).await.unwrap();
    a.delete(NAME).await.unwrap();
    a.clear().await.unwrap();
    match next(&mut ev).await {
        RecordEvent::Insert { field, value } => {
            assert_eq!(field, "name");
            assert_eq!(value.get(NAME).unwrap(), "x");
        }
        e => panic!("unexpected {e:?}"),
    }
    match next(&mut ev).await {
        RecordEvent::Update { field, old, new } => {
            assert_eq!(field, "name");
            assert_eq!(old.decode::<String>().unwrap(), "x");
            assert_eq!(new.decode::<String>().unwrap(), "y");
        }
        e => panic!("unexpected {e:?}"),
    }
    let e = next(&mut ev).await;
    assert_eq!(e.field(), Some("replicas"));
    assert!(matches!(e, RecordEvent::Insert { .. }));
    assert!(matches!(next(&mut ev).await, RecordEvent::Remove { field, .. } if field == "name"));
    assert_eq!(next(&mut ev).await, RecordEvent::Clear);
    c.close().await;
}

/// The reference's record race: two peers claim the same pending job; exactly one wins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn record_update_instance_if_race() {
    let c = Cluster::start("record-race", 3).await;
    let mut recs = Vec::new();
    for p in &c.peers {
        recs.push(Arc::new(
            p.get_or_create_record_with::<Cfg>("job", cfg())
                .await
                .unwrap(),
        ));
    }
    for round in 0..20u32 {
        let tasks: Vec<_> = recs
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let r = r.clone();
                tokio::spawn(async move {
                    r.update_instance_if(
                        Patch::new()
                            .with(OWNER, &Some(format!("p{i}")))
                            .with(REPLICAS, &(round + 100)),
                        Patch::new().with(OWNER, &None),
                    )
                    .await
                    .unwrap()
                })
            })
            .collect();
        let mut wins = 0;
        for t in tasks {
            wins += t.await.unwrap() as u32;
        }
        assert_eq!(wins, 1, "round {round}");
        recs[0].set(OWNER, &None).await.unwrap();
        for r in &recs {
            r.sync().await.unwrap();
        }
    }
    c.close().await;
}
