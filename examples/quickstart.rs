//! Quick start (the reference README's example): three replicas in one process, no broker. Each sets
//! its own key in a replicated map; each then reads the others' values.
//!
//! ```text
//! cargo run --example quickstart
//! ```

use std::time::Duration;

use hamok::prelude::*;
use hamok::runtime::transport::memory::InProcessHub;

#[tokio::main]
async fn main() -> Result<(), HamokError> {
    // Replicas of one service share a bus; here an in-process hub stands in for NATS or RabbitMQ.
    let hub = InProcessHub::new();
    let mut peers = Vec::new();
    for name in ["alice", "bob", "carol"] {
        let hamok = register_kinds(Hamok::builder())
            .peer_id(name)
            .cluster_id("quickstart")
            .transport(hub.clone())
            .build()
            .await?;
        peers.push(hamok);
    }
    // Started together, they discover each other and elect a leader.
    let joins: Vec<_> = peers
        .iter()
        .cloned()
        .map(|p| tokio::spawn(async move { p.join().await }))
        .collect();
    for j in joins {
        j.await.expect("join task")?;
    }
    let leader = peers[0].wait_until_leader(Duration::from_secs(5)).await?;
    println!("leader: {leader}");

    // Every replica opens the same map and writes its own entry (writes from followers are forwarded).
    let mut maps = Vec::new();
    for p in &peers {
        let map = p.get_or_create_map::<String, String>("greetings").await?;
        map.set(
            p.local_peer_id().to_string(),
            format!("hello from {}", p.local_peer_id()),
        )
        .await?;
        maps.push(map);
    }

    // Reads are local; `sync` waits until this replica has applied every acknowledged write.
    for (p, map) in peers.iter().zip(&maps) {
        map.sync().await?;
        for other in &peers {
            let value = map.get(&other.local_peer_id().to_string())?;
            println!(
                "{} reads {}: {:?}",
                p.local_peer_id(),
                other.local_peer_id(),
                value
            );
            assert_eq!(value, Some(format!("hello from {}", other.local_peer_id())));
        }
    }
    for p in &peers {
        p.leave().await?;
        p.close().await;
    }
    Ok(())
}
