//! A remote map whose data lives in a Redis hash: three replicas, Raft orders the mutations, the
//! leader executes them against Redis exactly once, and every replica reads straight from Redis.
//! Needs Redis at 127.0.0.1:6379 (`HAMOK_REDIS_URL` overrides); without it the example says so and
//! exits.
//!
//! ```text
//! cargo run --example redis_remote_map
//! ```

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use hamok::prelude::*;
use hamok::runtime::transport::memory::InProcessHub;

#[path = "common/mod.rs"]
mod common;

#[tokio::main]
async fn main() -> Result<(), HamokError> {
    let url = std::env::var("HAMOK_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let key = format!("hamok-example-sessions-{nanos}");
    let store = match RedisRemoteMap::connect(&url, key.clone()).await {
        Ok(store) => Arc::new(store),
        Err(e) => {
            println!("no Redis at {url} ({e}): start one to run this example");
            return Ok(());
        }
    };

    let hub = InProcessHub::new();
    let peers =
        common::start_replicas(&hub, "redis-remote-map", ["api-1", "api-2", "api-3"], |b| {
            register_remote_map(b, "sessions", store.clone())
        })
        .await?;
    // Every replica opens the map at start-up: whichever leads executes the mutations.
    let mut maps = Vec::new();
    for p in &peers {
        maps.push(
            p.get_or_create_remote_map::<String, String>("sessions")
                .await?,
        );
    }

    maps[1].set("user-1".into(), "token-a".into()).await?;
    let existing = maps[2].insert("user-1".into(), "token-b".into()).await?;
    println!("insert over an existing session keeps it: {existing:?}");
    assert_eq!(existing.as_deref(), Some("token-a"));
    let rotated = maps[0]
        .update_if("user-1".into(), "token-c".into(), "token-a".into())
        .await?;
    let stale = maps[2]
        .update_if("user-1".into(), "token-d".into(), "token-a".into())
        .await?;
    println!("rotation with the right token: {rotated}; with a stale one: {stale}");
    assert!(rotated && !stale);
    maps[2]
        .set_all((2..6).map(|i| (format!("user-{i}"), format!("token-{i}"))))
        .await?;
    assert_eq!(
        maps[1].remove("user-5".into()).await?.as_deref(),
        Some("token-5")
    );

    // Reads go to Redis, from any replica.
    let mut entries = maps[0].entries().await?;
    entries.sort();
    println!("{} sessions in Redis hash {key}:", maps[1].len().await?);
    for (user, token) in &entries {
        println!("  {user} -> {token}");
    }
    assert_eq!(entries.len(), 4);

    maps[0].clear().await?;
    assert!(maps[2].is_empty().await?);
    store.destroy().await?;
    for p in &peers {
        p.close().await;
    }
    Ok(())
}
