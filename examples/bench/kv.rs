//! The baseline a NATS user would otherwise pick: NATS JetStream KV (`kv.put`, one bucket), measured
//! with the same load driver and the same keys and values as hamok. On one server (`HAMOK_NATS_URL`)
//! the bucket has 1 replica; with `--nats-cluster` it has one replica per server (3) and there is one
//! client per server, the operations spread over them in turn, as hamok's peers are spread.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use async_nats::jetstream::kv;

use crate::cluster::{key, random_u64, run_load, value, Progress, Res, WAIT};
use crate::scenarios::Ctx;

/// The server of the single-server baseline (the same variable the NATS transport reads).
fn nats_url() -> String {
    std::env::var("HAMOK_NATS_URL")
        .ok()
        .and_then(|v| v.split(',').next().map(str::to_string))
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "nats://127.0.0.1:4222".to_string())
}

/// The `latency` or `throughput` rows of the baseline.
pub async fn kv_rows(ctx: &mut Ctx, scenario: &str) -> Res<()> {
    let (urls, replicas) = if ctx.nats_servers.is_empty() {
        (vec![nats_url()], 1)
    } else {
        (ctx.nats_servers.clone(), ctx.nats_servers.len())
    };
    let mut clients = Vec::with_capacity(urls.len());
    for url in &urls {
        clients.push(
            async_nats::connect(url.as_str())
                .await
                .map_err(|e| format!("NATS KV baseline: cannot connect to {url}: {e}"))?,
        );
    }
    let js = jetstream::new(clients[0].clone());
    let bucket = format!("hamok_bench_{:012x}", random_u64() >> 16);
    let result = async {
        create_bucket(&js, &bucket, replicas).await?;
        // Every client opens the bucket itself (its own JetStream context on its own server).
        let mut stores = Vec::with_capacity(clients.len());
        for (client, url) in clients.iter().zip(&urls) {
            stores.push(
                jetstream::new(client.clone())
                    .get_key_value(bucket.as_str())
                    .await
                    .map_err(|e| {
                        format!("NATS KV baseline: cannot open bucket {bucket} via {url}: {e}")
                    })?,
            );
        }
        // A replicated stream elects its leader after its creation: wait until every client can put.
        for (store, url) in stores.iter().zip(&urls) {
            first_put(store, url).await?;
        }
        let leader = stream_leader(&js, &bucket).await;
        // Which client sits on the server of the stream's leader (its `server_name` in INFO).
        let on_leader = leader.as_ref().and_then(|l| {
            clients
                .iter()
                .position(|c| &c.server_info().server_name == l)
        });
        let setup = Setup {
            stores,
            urls: urls.clone(),
            replicas,
            leader,
            on_leader,
        };
        rows(ctx, scenario, &setup).await
    }
    .await;
    let _ = js.delete_key_value(&bucket).await;
    for client in &clients {
        let _ = tokio::time::timeout(Duration::from_secs(5), client.flush()).await;
    }
    result
}

/// Creates bucket `bucket` with `replicas` replicas on file storage, history 1.
async fn create_bucket(js: &jetstream::Context, bucket: &str, replicas: usize) -> Res<()> {
    let config = kv::Config {
        bucket: bucket.to_string(),
        history: 1,
        num_replicas: replicas,
        storage: jetstream::stream::StorageType::File,
        ..Default::default()
    };
    let Err(first) = js.create_key_value(config).await else {
        return Ok(());
    };
    // async-nats 0.51 cannot read the account info of an older server (Debian's 2.9 here): create the
    // bucket's stream as `create_key_value` would, then open it as a bucket.
    eprintln!(
        "  NATS KV baseline: create_key_value failed ({first}); creating the KV stream by hand \
         ({replicas} replica{})",
        if replicas == 1 { "" } else { "s" }
    );
    js.create_stream(jetstream::stream::Config {
        name: format!("KV_{bucket}"),
        subjects: vec![format!("$KV.{bucket}.>")],
        max_messages_per_subject: 1,
        storage: jetstream::stream::StorageType::File,
        num_replicas: replicas,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        discard: jetstream::stream::DiscardPolicy::New,
        ..Default::default()
    })
    .await
    .map_err(|e| {
        format!("NATS KV baseline: cannot create bucket {bucket}: {first}; by hand: {e}")
    })?;
    Ok(())
}

/// Retries one put through `store` until it succeeds (bounded by [`WAIT`]).
async fn first_put(store: &kv::Store, url: &str) -> Res<()> {
    let deadline = Instant::now() + WAIT;
    loop {
        match store.put("warm-up", bytes::Bytes::from_static(b"x")).await {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() > deadline => {
                return Err(format!("NATS KV baseline: no put via {url} succeeded: {e}").into())
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// The server name of the leader of the bucket's stream (`None` if the server does not say).
async fn stream_leader(js: &jetstream::Context, bucket: &str) -> Option<String> {
    let mut stream = js.get_stream(format!("KV_{bucket}")).await.ok()?;
    let info = stream.info().await.ok()?;
    info.cluster.as_ref()?.leader.clone()
}

/// The opened bucket, one store per client.
struct Setup {
    stores: Vec<kv::Store>,
    urls: Vec<String>,
    replicas: usize,
    /// The server name of the stream's leader.
    leader: Option<String>,
    /// The index of the client on the leader's server.
    on_leader: Option<usize>,
}

async fn rows(ctx: &mut Ctx, scenario: &str, setup: &Setup) -> Res<()> {
    let keys = ctx.sizes.memory_keys;
    let val = bytes::Bytes::from(value(ctx.value_bytes));
    // Operation `i` goes through client `i mod len`.
    let put = |stores: Vec<kv::Store>, val: bytes::Bytes| {
        let stores = Arc::new(stores);
        move |i: u64| {
            let (stores, val) = (stores.clone(), val.clone());
            async move {
                let store = &stores[(i % stores.len() as u64) as usize];
                store.put(key(i, keys), val).await.map(|_| ())
            }
        }
    };
    // Warm-up: the bucket's stream, every client's subscriptions.
    run_load(
        ctx.sizes.warmup_n,
        1,
        &Progress::new(0, ""),
        put(setup.stores.clone(), val.clone()),
    )
    .await?;
    let spread = setup.stores.len() > 1;
    // (n, in flight, clients used, `from`, label)
    let mut runs: Vec<(u64, usize, Vec<kv::Store>, &str, &str)> = Vec::new();
    if scenario == "latency" {
        runs.push((
            ctx.sizes.latency_n,
            1,
            setup.stores.clone(),
            "client",
            "kv.put sequential",
        ));
        // With a cluster, also from one client on the stream leader's server and one elsewhere.
        if let (true, Some(l)) = (spread, setup.on_leader) {
            let other = (l + 1) % setup.stores.len();
            runs.push((
                ctx.sizes.latency_n,
                1,
                vec![setup.stores[l].clone()],
                "client on stream leader's server",
                "kv.put sequential",
            ));
            runs.push((
                ctx.sizes.latency_n,
                1,
                vec![setup.stores[other].clone()],
                "client on another server",
                "kv.put sequential",
            ));
        }
    } else {
        for c in ctx.sizes.concurrency.clone() {
            runs.push((
                ctx.sizes.throughput_n,
                c,
                setup.stores.clone(),
                "client",
                "kv.put",
            ));
        }
    }
    for (n, c, stores, from, what) in runs {
        let clients = stores.len();
        let progress = Progress::new(
            n,
            &format!("{scenario}: NATS KV baseline, {from}, {c} in flight"),
        );
        let load = run_load(n, c, &progress, put(stores, val.clone())).await?;
        progress.finish();
        let mut r = ctx
            .baseline_record(scenario, what)
            .config("keys", keys)
            .config("bucket_replicas", setup.replicas)
            .config("bucket_storage", "file")
            .config("server", setup.urls.join(","));
        r.from = from.to_string();
        if spread {
            r = r.extra(
                "clients",
                if clients > 1 {
                    format!("{clients}, one per server, in turn")
                } else {
                    "1".to_string()
                },
            );
            if let Some(leader) = &setup.leader {
                r = r.config("stream_leader", leader.as_str());
            }
        }
        let r = ctx.load_record_of(r, c, &load);
        ctx.emit_record(r);
    }
    Ok(())
}
