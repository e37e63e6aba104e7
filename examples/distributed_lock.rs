//! Distributed lock with fencing: three replicas in one process (no broker).
//!
//! 1. Two tasks on each replica contend for lock `counter` and do a read-modify-write of a replicated
//!    map under it, through a handle fenced with the guard's token; they also append to an "external"
//!    resource that checks tokens itself with a [`FenceGate`].
//! 2. A holder is cut off from the others: its `lost()` fires, the cluster removes it and grants the
//!    lock to the waiter on another replica (a higher token); after the heal, the old holder's fenced
//!    write is refused with `StaleFence`, and the external resource refuses its old token too.
//!
//! ```text
//! cargo run --example distributed_lock
//! ```

use std::sync::Mutex;
use std::time::{Duration, Instant};

use hamok::collections::{FenceGate, HamokLock, LockEvent};
use hamok::prelude::*;
use hamok::runtime::transport::memory::InProcessHub;

#[path = "common/mod.rs"]
mod common;

const LOCK: &str = "counter";
const ROUNDS: u64 = 2;
const WORKERS_PER_PEER: usize = 2;

/// A resource outside hamok (a file, a database row, an API) that remembers the highest fencing token
/// it has seen and refuses older ones. The token check and the write happen under one mutex, as they
/// must in a real resource (one transaction, one conditional write).
#[derive(Default)]
struct ExternalLog {
    gate: FenceGate,
    lines: Mutex<Vec<String>>,
}

impl ExternalLog {
    fn append(&self, token: u64, line: String) -> Result<(), HamokError> {
        let mut lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        self.gate.admit(LOCK, token)?;
        lines.push(line);
        Ok(())
    }
}

#[tokio::main]
async fn main() -> Result<(), HamokError> {
    let start = Instant::now();
    let at = move || format!("{:>5} ms", start.elapsed().as_millis());
    let hub = InProcessHub::new();
    let peers =
        common::start_replicas(&hub, "distributed-lock", ["alice", "bob", "carol"], |b| b).await?;
    let leader = peers[0].wait_until_leader(Duration::from_secs(5)).await?;
    println!("{} leader: {leader}", at());

    let mut locks: Vec<HamokLock> = Vec::new();
    let mut maps: Vec<HamokMap<String, u64>> = Vec::new();
    for p in &peers {
        locks.push(p.get_or_create_lock_table("locks").await?);
        maps.push(p.get_or_create_map("ledger").await?);
    }
    let external = std::sync::Arc::new(ExternalLog::default());

    // --- 1. Contention: every worker increments the counter ROUNDS times, one holder at a time. ---
    println!(
        "{} {} workers contend for `{LOCK}`:",
        at(),
        3 * WORKERS_PER_PEER
    );
    let mut workers = Vec::new();
    for (i, p) in peers.iter().enumerate() {
        for w in 0..WORKERS_PER_PEER {
            let (locks, map, external) = (locks[i].clone(), maps[i].clone(), external.clone());
            let me = format!("{}#{w}", p.local_peer_id());
            workers.push(tokio::spawn(async move {
                for _ in 0..ROUNDS {
                    let guard = locks.lock(LOCK).await?;
                    // The grant was applied here after the previous holder's release, so a local read
                    // sees everything the previous holder wrote.
                    let before = map.get(&"counter".to_string())?.unwrap_or(0);
                    map.fenced(guard.fence())
                        .set("counter".into(), before + 1)
                        .await?;
                    external.append(guard.token(), format!("{me}: {}", before + 1))?;
                    println!(
                        "  {me:<8} token {:>3}: counter {before} -> {}",
                        guard.token(),
                        before + 1
                    );
                    guard.unlock().await?;
                }
                Ok::<(), HamokError>(())
            }));
        }
    }
    for w in workers {
        w.await.expect("worker task")?;
    }
    maps[0].sync().await?;
    let total = maps[0].get(&"counter".to_string())?.unwrap_or(0);
    let expected = 3 * WORKERS_PER_PEER as u64 * ROUNDS;
    println!(
        "{} counter = {total} (expected {expected}): no increment lost",
        at()
    );
    assert_eq!(total, expected);

    // --- 2. A holder is cut off. ---
    // The holder is a follower (so the cluster keeps its leader), the waiter another peer, and the
    // third peer prints the lock events it applies.
    let holder_at = peers
        .iter()
        .position(|p| !p.is_leader())
        .expect("a follower");
    let waiter_at = (holder_at + 1) % peers.len();
    let observer_at = (holder_at + 2) % peers.len();
    let (holder, waiter) = (
        peers[holder_at].local_peer_id(),
        peers[waiter_at].local_peer_id(),
    );
    let mut events = locks[observer_at].events();
    let observer = peers[observer_at].local_peer_id().clone();
    tokio::spawn(async move {
        while let Ok(event) = events.recv().await {
            match event {
                LockEvent::Acquired { name, holder } => println!(
                    "  [{observer} sees] {name} acquired by {} (token {})",
                    holder.peer, holder.token
                ),
                LockEvent::Released { name, holder } => println!(
                    "  [{observer} sees] {name} released by {} (token {})",
                    holder.peer, holder.token
                ),
                LockEvent::Resync { held, reason } => {
                    println!("  [{observer} sees] {} locks held ({reason:?})", held.len())
                }
                LockEvent::Close => return,
            }
        }
    });

    let guard = locks[holder_at].lock(LOCK).await?;
    let old_fence = guard.fence();
    maps[holder_at]
        .fenced(guard.fence())
        .set("owner".into(), 1)
        .await?;
    external.append(guard.token(), format!("{holder}: owner"))?;
    println!(
        "{} {holder} holds `{LOCK}` under token {}",
        at(),
        guard.token()
    );

    let next = {
        let locks = locks[waiter_at].clone();
        tokio::spawn(async move { locks.lock(LOCK).await })
    };
    while locks[waiter_at].waiting(LOCK) == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    println!("{} {waiter} waits for `{LOCK}`", at());

    hub.isolate(holder);
    println!(
        "{} {holder} is cut off (peer_max_idle_ms = {})",
        at(),
        peers[holder_at].config().peer_max_idle_ms
    );
    guard.lost().await;
    println!("{} {holder}: lost() fired: stop acting on the lock", at());
    let new_guard = next.await.expect("waiter task")?;
    println!(
        "{} {waiter} got `{LOCK}` under token {} (> {})",
        at(),
        new_guard.token(),
        old_fence.token
    );
    assert!(new_guard.token() > old_fence.token);
    maps[waiter_at]
        .fenced(new_guard.fence())
        .set("owner".into(), 2)
        .await?;
    external.append(new_guard.token(), format!("{waiter}: owner"))?;

    hub.heal();
    println!(
        "{} healed; {holder} rejoins and retries its fenced write",
        at()
    );
    // Until it is back in the cluster its writes fail otherwise (not joined, no leader yet, ...).
    let stale = maps[holder_at]
        .fenced(old_fence.clone())
        .with_timeout(Duration::from_secs(1));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match stale.set("owner".into(), 99).await {
            Err(e @ HamokError::StaleFence { .. }) => {
                println!("{} {holder}'s write refused: {e}", at());
                break;
            }
            Ok(_) => panic!("a stale holder's write was applied"),
            Err(e) => {
                println!("{} {holder}'s write failed (not back yet): {e}", at());
                assert!(
                    Instant::now() < deadline,
                    "the old holder never got back: {e}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    match external.append(old_fence.token, format!("{holder}: owner again")) {
        Err(e) => println!("{} external resource refuses {holder} too: {e}", at()),
        Ok(()) => panic!("the external resource took a stale token"),
    }
    let owner = maps[holder_at].get_linearizable(&"owner".into()).await?;
    println!("{} owner = {owner:?} (the new holder's write stands)", at());
    assert_eq!(owner, Some(2));

    drop(guard); // already released by the cluster: dropping it changes nothing
    new_guard.unlock().await?;
    println!(
        "{} external log: {} lines, highest token {:?}",
        at(),
        external
            .lines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len(),
        external.gate.highest(LOCK)
    );
    for p in &peers {
        let _ = p.leave().await;
        p.close().await;
    }
    Ok(())
}
