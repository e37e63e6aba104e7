//! Leader election with three in-process peers.
//!
//! Three peers join at the same moment on the default in-process hub (no broker), elect a leader, and
//! then the leader is stopped without leaving (as if its process died): the two others elect a new one
//! and writes succeed again.
//!
//! ```text
//! cargo run --example leader_election
//! ```

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hamok::runtime::state_machine::Op;
use hamok::runtime::{Hamok, HamokError};

#[tokio::main]
async fn main() -> Result<(), HamokError> {
    // A cluster id of our own: every peer built without a transport shares one process-wide hub.
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let cluster_id = format!("leader-election-{}-{nanos}", std::process::id());

    let mut peers = Vec::new();
    for name in ["alice", "bob", "carol"] {
        let peer = Hamok::builder()
            .peer_id(name)
            .cluster_id(cluster_id.clone())
            .build()
            .await?;
        peers.push(peer);
    }

    // All three join at once: the bootstrap rule makes them one cluster, not three.
    let started = Instant::now();
    let joins: Vec<_> = peers
        .iter()
        .cloned()
        .map(|p| tokio::spawn(async move { p.join().await }))
        .collect();
    for join in joins {
        join.await.expect("join task")?;
    }
    let leader = peers[0].wait_until_leader(Duration::from_secs(5)).await?;
    println!(
        "{} peers joined cluster {cluster_id}; leader: {leader} ({:.1} ms from join to leader)",
        peers.len(),
        started.elapsed().as_secs_f64() * 1e3
    );
    for p in &peers {
        println!(
            "  {:<6} role {:?}, knows leader {}, remote peers {:?}",
            p.local_peer_id().as_str(),
            p.state(),
            p.leader_id().map(|l| l.to_string()).unwrap_or_default(),
            p.remote_peer_ids()
                .iter()
                .map(|r| r.to_string())
                .collect::<Vec<_>>()
        );
    }
    peers[0].submit_op(Op::Noop).await?;

    // Stop the leader as if its process died (no leave): the others must notice and elect a new one.
    let pos = peers
        .iter()
        .position(|p| p.local_peer_id() == &leader)
        .expect("the leader is one of ours");
    let old = peers.remove(pos);
    let stopped = Instant::now();
    old.close().await;
    println!("stopped the leader {leader}");

    // Write through a survivor until a write succeeds.
    let writer = &peers[0];
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        match writer
            .submit_op_with_timeout(Op::Noop, Duration::from_secs(5))
            .await
        {
            Ok(_) => break,
            Err(e) if stopped.elapsed() < Duration::from_secs(10) => {
                eprintln!("  write failed ({e}), retrying");
            }
            Err(e) => return Err(e),
        }
    }
    let write_ok = stopped.elapsed();
    // The survivors' view of the leader (the write above could only succeed under a new one).
    let new_leader = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match writer.leader_id() {
                Some(l) if l != leader => break l,
                _ => tokio::time::sleep(Duration::from_millis(1)).await,
            }
        }
    })
    .await
    .map_err(|_| HamokError::Timeout { after_ms: 5_000 })?;
    println!(
        "new leader: {new_leader}; first successful write {:.1} ms after the old leader stopped ({attempts} attempt(s))",
        write_ok.as_secs_f64() * 1e3
    );
    assert_ne!(new_leader, leader, "a different peer leads now");

    for p in &peers {
        p.close().await;
    }
    Ok(())
}
