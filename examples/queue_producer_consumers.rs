//! Producer and consumers over a replicated queue with acknowledged delivery: one replica pushes
//! batches of work, three others take items under a lease and acknowledge each when it is done. One
//! consumer "crashes" while holding items (it stops without acknowledging them): their leases run out
//! and the other consumers get them again, with their delivery count. Every item is acknowledged
//! exactly once.
//!
//! ```text
//! cargo run --example queue_producer_consumers
//! ```

use std::collections::BTreeMap;
use std::time::Duration;

use hamok::prelude::*;
use hamok::runtime::transport::memory::InProcessHub;

#[path = "common/mod.rs"]
mod common;

const ITEMS: u32 = 2_000;
/// How long a consumer may hold an item before the cluster gives it to another one.
const LEASE: Duration = Duration::from_millis(500);

/// Takes and acknowledges items until the queue stays empty for 2 s.
/// With `crash_after`, stops (as if its process died) holding its last batch.
async fn consume(
    queue: HamokQueue<u32>,
    name: &str,
    crash_after: Option<usize>,
) -> Result<Vec<(u32, u32)>, HamokError> {
    let mut acked = Vec::new();
    loop {
        // Up to 10 items per take, one log entry; waits (woken by the queue's events) when empty.
        let batch = match queue.take_wait(LEASE, Duration::from_secs(2)).await? {
            Some(first) => {
                let mut batch = vec![first];
                batch.extend(queue.take_many(9, LEASE).await?);
                batch
            }
            None => return Ok(acked), // nothing for 2 s: the work is done
        };
        if crash_after.is_some_and(|n| acked.len() >= n) {
            println!("{name}: crashing while holding {} items", batch.len());
            return Ok(acked);
        }
        let ids: Vec<DeliveryId> = batch.iter().map(|d| d.id).collect();
        // Work would happen here; then one ack for the batch. `false` means the lease ran out first
        // (the item went to someone else): then this consumer's work on it does not count.
        let answers = queue.ack_many(&ids).await?;
        for (d, ok) in batch.iter().zip(answers) {
            if ok {
                acked.push((d.value, d.deliveries));
            }
        }
    }
}

#[tokio::main]
async fn main() -> Result<(), HamokError> {
    let hub = InProcessHub::new();
    let peers = common::start_replicas(
        &hub,
        "queue-example",
        ["producer", "consumer-a", "consumer-b", "consumer-c"],
        |b| b,
    )
    .await?;
    let producer_queue = peers[0].get_or_create_queue::<u32>("work").await?;

    let mut consumers = Vec::new();
    for (i, p) in peers[1..].iter().enumerate() {
        let queue = p.get_or_create_queue::<u32>("work").await?;
        let name = p.local_peer_id().to_string();
        // consumer-c crashes after 100 items.
        let crash_after = (i == 2).then_some(100);
        consumers.push(tokio::spawn(async move {
            let acked = consume(queue, &name, crash_after).await?;
            println!("{name} acknowledged {} items", acked.len());
            Ok::<_, HamokError>(acked)
        }));
    }

    // The producer pushes batches (each batch is one atomic log entry).
    for batch in (0..ITEMS).collect::<Vec<_>>().chunks(100) {
        producer_queue.push(batch.iter().copied()).await?;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    let mut acks: BTreeMap<u32, u32> = BTreeMap::new();
    let mut redelivered = 0;
    for c in consumers {
        for (item, deliveries) in c.await.expect("consumer task")? {
            *acks.entry(item).or_default() += 1;
            redelivered += usize::from(deliveries > 1);
        }
    }
    assert_eq!(acks.len(), ITEMS as usize, "every item acknowledged");
    assert!(acks.values().all(|n| *n == 1), "no item acknowledged twice");
    producer_queue.sync().await?;
    assert_eq!((producer_queue.len(), producer_queue.in_flight()), (0, 0));
    println!(
        "{} items acknowledged exactly once; {redelivered} of them after a redelivery",
        acks.len()
    );
    for p in &peers {
        p.close().await;
    }
    Ok(())
}
