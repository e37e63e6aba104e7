//! Producer and consumers over a replicated queue: one replica pushes batches of work, two others pop
//! concurrently. Every item is taken exactly once, and the queue's events (`not-empty`, `empty`) let a
//! consumer sleep instead of polling.
//!
//! ```text
//! cargo run --example queue_producer_consumers
//! ```

use std::collections::BTreeSet;
use std::time::Duration;

use hamok::prelude::*;
use hamok::runtime::transport::memory::InProcessHub;

#[path = "common/mod.rs"]
mod common;

const ITEMS: u32 = 2_000;

#[tokio::main]
async fn main() -> Result<(), HamokError> {
    let hub = InProcessHub::new();
    let peers = common::start_replicas(
        &hub,
        "queue-example",
        ["producer", "consumer-a", "consumer-b"],
        |b| b,
    )
    .await?;
    let producer_queue = peers[0].get_or_create_queue::<u32>("work").await?;

    // Consumers: pop until the producer is done and the queue is empty; wait for `NotEmpty` otherwise.
    let mut consumers = Vec::new();
    for p in &peers[1..] {
        let queue = p.get_or_create_queue::<u32>("work").await?;
        let name = p.local_peer_id().to_string();
        consumers.push(tokio::spawn(async move {
            let mut events = queue.events();
            let mut got = Vec::new();
            loop {
                match queue.pop().await? {
                    Some(item) if item == u32::MAX => {
                        // The end marker: put it back for the other consumer and stop.
                        queue.push_one(u32::MAX).await?;
                        break;
                    }
                    Some(item) => got.push(item),
                    None => {
                        // Empty: sleep until something is pushed (or a short timeout, to re-check).
                        let _ = tokio::time::timeout(Duration::from_millis(50), async {
                            while let Ok(e) = events.recv().await {
                                if e == QueueEvent::NotEmpty {
                                    break;
                                }
                            }
                        })
                        .await;
                    }
                }
            }
            println!("{name} consumed {} items", got.len());
            Ok::<_, HamokError>(got)
        }));
    }

    // The producer pushes batches (each batch is one atomic log entry).
    for batch in (0..ITEMS).collect::<Vec<_>>().chunks(100) {
        producer_queue.push(batch.iter().copied()).await?;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    producer_queue.push_one(u32::MAX).await?;

    let mut all = Vec::new();
    for c in consumers {
        all.extend(c.await.expect("consumer task")?);
    }
    let distinct: BTreeSet<u32> = all.iter().copied().collect();
    assert_eq!(all.len(), ITEMS as usize, "every item once");
    assert_eq!(distinct.len(), ITEMS as usize, "no item twice");
    println!("{} items consumed exactly once", all.len());
    for p in &peers {
        p.close().await;
    }
    Ok(())
}
