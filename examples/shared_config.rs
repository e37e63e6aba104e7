//! Shared config: three replicas in one process (no broker) share one validated `Limits` value. A
//! watcher on each replica prints every value it sees (its first item is the current value). The
//! example sets the value, has an invalid value refused before it reaches the log, runs an `update`,
//! loses a `compare_and_set` race, lists the history and rolls back; then it cuts one replica off,
//! changes the config twice, heals, and shows every watcher ends on the same latest revision.
//!
//! ```text
//! cargo run --example shared_config
//! ```

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hamok::prelude::*;
use hamok::runtime::transport::memory::InProcessHub;
use serde::{Deserialize, Serialize};

#[path = "common/mod.rs"]
mod common;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Limits {
    max_conns: u32,
    rate_per_sec: u32,
}

/// Every replica installs the same validator: it runs before a value is submitted.
fn validate(l: &Limits) -> Result<(), String> {
    if l.max_conns == 0 {
        return Err("max_conns must be > 0".into());
    }
    if l.rate_per_sec > 10_000 {
        return Err(format!("rate_per_sec {} is above 10000", l.rate_per_sec));
    }
    Ok(())
}

/// The last revision each replica's watcher saw.
type Seen = Arc<Mutex<Vec<u64>>>;

/// Waits until every watcher has seen `revision` (bounded).
async fn settle(seen: &Seen, revision: u64) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while seen.lock().unwrap().iter().any(|r| *r != revision) {
        assert!(
            Instant::now() < deadline,
            "watchers stuck at {:?}, want {revision}",
            seen.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::main]
async fn main() -> Result<(), HamokError> {
    let hub = InProcessHub::new();
    let peers =
        common::start_replicas(&hub, "shared-config", ["alice", "bob", "carol"], |b| b).await?;
    peers[0].wait_until_leader(Duration::from_secs(5)).await?;

    let mut configs: Vec<SharedConfig<Limits>> = Vec::new();
    for p in &peers {
        configs.push(
            p.get_or_create_config::<Limits>("limits")
                .await?
                .with_validator(validate),
        );
    }

    // One watcher per replica. The first item is the current value (here: never set).
    // The watchers stop at the service's shutdown (or when their peer closes: `next()` is `None`).
    let seen: Seen = Arc::new(Mutex::new(vec![0; peers.len()]));
    let (shutdown, stop) = tokio::sync::watch::channel(false);
    let mut watchers = Vec::new();
    for (i, (p, config)) in peers.iter().zip(&configs).enumerate() {
        let mut watch = config.watch();
        let (me, seen, mut stop) = (p.local_peer_id().to_string(), seen.clone(), stop.clone());
        watchers.push(tokio::spawn(async move {
            loop {
                let item = tokio::select! {
                    item = watch.next() => item,
                    _ = stop.changed() => None,
                };
                match item {
                    Some(Ok(Some(v))) => {
                        println!("  [{me} watch] rev {:>2}: {:?}", v.revision, v.value);
                        seen.lock().unwrap()[i] = v.revision;
                    }
                    Some(Ok(None)) => println!("  [{me} watch] (never set)"),
                    Some(Err(e)) => println!("  [{me} watch] error: {e}"),
                    None => break,
                }
            }
        }));
    }
    let (alice, bob, carol) = (&configs[0], &configs[1], &configs[2]);

    let first = alice
        .set(Limits {
            max_conns: 100,
            rate_per_sec: 50,
        })
        .await?;
    println!("alice set rev {first}");
    settle(&seen, first).await;

    let invalid = Limits {
        max_conns: 0,
        rate_per_sec: 50,
    };
    match bob.set(invalid).await {
        Err(e) => println!("bob's invalid set refused before the log: {e}"),
        Ok(r) => panic!("an invalid value was set (rev {r})"),
    }
    assert_eq!(
        bob.get_linearizable().await?.map(|v| v.revision),
        Some(first)
    );

    let updated = carol
        .update(|l| {
            let l = l.expect("set above");
            Limits {
                max_conns: l.max_conns + 50,
                ..l
            }
        })
        .await?;
    println!("carol's update: rev {updated}");
    settle(&seen, updated).await;

    // Bob read revision `updated`; alice changes the value before bob's compare-and-set lands. (A
    // revision is the log index that set the value: it grows, but not one by one.)
    let read = bob.get()?.expect("set").revision;
    let raced = alice
        .set(Limits {
            max_conns: 150,
            rate_per_sec: 80,
        })
        .await?;
    match bob
        .compare_and_set(
            read,
            Limits {
                max_conns: 200,
                rate_per_sec: 50,
            },
        )
        .await?
    {
        CasOutcome::Conflict(current) => {
            println!("bob's compare_and_set over rev {read}: conflict, now {current:?}")
        }
        CasOutcome::Set(r) => panic!("compare_and_set over a stale revision succeeded (rev {r})"),
    }
    settle(&seen, raced).await;

    println!("history on bob (oldest first):");
    for v in bob.history()? {
        println!("  rev {:>2}: {:?}", v.revision, v.value);
    }
    let rolled = bob.rollback(first).await?;
    println!("bob rolled back to rev {first}'s value as rev {rolled}");
    settle(&seen, rolled).await;

    // Cut a follower off, change the config twice on the majority side, heal.
    let cut = peers
        .iter()
        .position(|p| !p.is_leader())
        .expect("a follower");
    let writer = (cut + 1) % peers.len();
    let (cut_id, writer_id) = (peers[cut].local_peer_id(), peers[writer].local_peer_id());
    hub.isolate(cut_id);
    println!("{cut_id} is cut off; {writer_id} changes the config twice");
    let mut latest = 0;
    for rate in [100, 120] {
        latest = configs[writer]
            .update(|l| Limits {
                rate_per_sec: rate,
                ..l.expect("set above")
            })
            .await?;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    println!(
        "{cut_id} still has rev {:?} (latest is {latest})",
        configs[cut].revision()
    );
    hub.heal();
    println!("healed");
    settle(&seen, latest).await;
    let fresh = configs[cut].get_linearizable().await?.expect("set");
    assert_eq!(fresh.revision, latest);
    println!(
        "every watcher ends on rev {latest}: {:?}",
        seen.lock().unwrap()
    );

    for p in &peers {
        let _ = p.leave().await;
        p.close().await;
    }
    let _ = shutdown.send(true);
    for w in watchers {
        w.await.expect("watcher task");
    }
    Ok(())
}
