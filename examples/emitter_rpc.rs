//! Request/response between replicas over a replicated emitter. Workers subscribe to `compute`
//! (the subscription table is replicated, so every replica knows who serves it); the client publishes a
//! request, learns who acknowledged it, and gets each worker's answer back on `response`, which only the
//! client subscribes to.
//!
//! ```text
//! cargo run --example emitter_rpc
//! ```

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hamok::prelude::*;
use hamok::runtime::transport::memory::InProcessHub;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

#[path = "common/mod.rs"]
mod common;

#[derive(Clone, Debug, Serialize, Deserialize)]
enum Msg {
    Request { id: u64, n: u64 },
    Response { id: u64, square: u64, by: String },
}

/// Metadata a worker publishes with its subscription.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct WorkerInfo {
    capacity: u32,
}

type Pending = Arc<Mutex<HashMap<u64, mpsc::UnboundedSender<(String, u64)>>>>;

#[tokio::main]
async fn main() -> Result<(), HamokError> {
    let hub = InProcessHub::new();
    let peers = common::start_replicas(
        &hub,
        "emitter-rpc",
        ["client", "worker-1", "worker-2"],
        |b| b,
    )
    .await?;

    // Workers: answer every request by notifying `response`.
    for (i, p) in peers.iter().enumerate().skip(1) {
        let emitter = p.get_or_create_emitter::<Msg, WorkerInfo>("rpc").await?;
        let reply = emitter.clone();
        let me = p.local_peer_id().to_string();
        emitter
            .subscribe(
                "compute",
                move |from, msg| {
                    if let Msg::Request { id, n } = msg {
                        println!("{me} computes {n}² for {from}");
                        let answer = Msg::Response {
                            id,
                            square: n * n,
                            by: me.clone(),
                        };
                        let _ = reply.notify("response", &answer);
                    }
                },
                WorkerInfo {
                    capacity: 10 * i as u32,
                },
            )
            .await?;
    }

    // The client: route responses to the caller waiting for them.
    let client = peers[0]
        .get_or_create_emitter::<Msg, WorkerInfo>("rpc")
        .await?
        .with_publish_timeout(Duration::from_secs(1));
    let pending: Pending = Arc::default();
    let routes = pending.clone();
    client
        .subscribe(
            "response",
            move |_, msg| {
                if let Msg::Response { id, square, by } = msg {
                    if let Some(tx) = routes.lock().unwrap().get(&id) {
                        let _ = tx.send((by, square));
                    }
                }
            },
            WorkerInfo { capacity: 0 },
        )
        .await?;
    client.sync().await?;
    for (peer, info) in client.subscribers("compute")? {
        println!("worker {peer} serves compute (capacity {})", info.capacity);
    }

    for id in 1..=3u64 {
        let (tx, mut rx) = mpsc::unbounded_channel();
        pending.lock().unwrap().insert(id, tx);
        let acked = client
            .publish("compute", &Msg::Request { id, n: id + 6 })
            .await?;
        println!("request {id} acknowledged by {acked:?}");
        assert_eq!(acked.len(), 2);
        for _ in 0..acked.len() {
            let (by, square) = tokio::time::timeout(Duration::from_secs(5), rx.recv())
                .await
                .expect("a response in time")
                .expect("a response");
            println!("request {id}: {by} answered {square}");
            assert_eq!(square, (id + 6) * (id + 6));
        }
        pending.lock().unwrap().remove(&id);
    }
    for p in &peers {
        p.close().await;
    }
    Ok(())
}
