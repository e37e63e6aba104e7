//! The reference's update-if race: several replicas try to claim the same pending job with
//! compare-and-set at the same moment. The log orders their attempts, so exactly one wins each round,
//! and every loser learns it at once (`false`, never a timeout).
//!
//! ```text
//! cargo run --example map_update_if_race
//! ```

use hamok::prelude::*;
use hamok::runtime::transport::memory::InProcessHub;
use serde::{Deserialize, Serialize};

#[path = "common/mod.rs"]
mod common;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
enum Job {
    Pending,
    Running { by: String },
}

async fn start(n: usize) -> Result<Vec<Hamok>, HamokError> {
    let hub = InProcessHub::new();
    let peers = common::start_replicas(
        &hub,
        "update-if-race",
        (0..n).map(|i| format!("worker-{i}")),
        |b| b,
    )
    .await?;
    Ok(peers)
}

#[tokio::main]
async fn main() -> Result<(), HamokError> {
    let peers = start(3).await?;
    let mut maps = Vec::new();
    for p in &peers {
        maps.push(p.get_or_create_map::<String, Job>("jobs").await?);
    }
    let mut wins = vec![0u32; peers.len()];
    for round in 0..10 {
        let job = format!("job-{round}");
        maps[0].set(job.clone(), Job::Pending).await?;
        for m in &maps {
            m.sync().await?;
        }
        // Everyone tries to move the job from Pending to Running-by-me at once.
        let attempts: Vec<_> = peers
            .iter()
            .zip(&maps)
            .map(|(p, m)| {
                let (m, job) = (m.clone(), job.clone());
                let me = p.local_peer_id().to_string();
                tokio::spawn(async move {
                    m.update_if(job, Job::Running { by: me }, Job::Pending)
                        .await
                })
            })
            .collect();
        let mut winners = Vec::new();
        for (i, a) in attempts.into_iter().enumerate() {
            if a.await.expect("attempt task")? {
                winners.push(i);
                wins[i] += 1;
            }
        }
        assert_eq!(winners.len(), 1, "exactly one winner");
        let state = maps[2].get_linearizable(&job).await?;
        println!("{job}: won by worker-{} -> {state:?}", winners[0]);
    }
    println!("wins per worker: {wins:?}");
    for p in &peers {
        p.close().await;
    }
    Ok(())
}
