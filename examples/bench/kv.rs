//! The baseline a NATS user would otherwise pick: NATS JetStream KV (`kv.put`, one bucket, replicas 1,
//! on the local server), measured with the same load driver and the same keys and values as hamok.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use async_nats::jetstream::kv;

use crate::cluster::{key, random_u64, run_load, value, Progress, Res};
use crate::scenarios::Ctx;

/// The server of the baseline (the same variable the NATS transport reads).
fn nats_url() -> String {
    std::env::var("HAMOK_NATS_URL")
        .ok()
        .and_then(|v| v.split(',').next().map(str::to_string))
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "nats://127.0.0.1:4222".to_string())
}

/// The `latency` or `throughput` rows of the baseline.
pub async fn kv_rows(ctx: &mut Ctx, scenario: &str) -> Res<()> {
    let url = nats_url();
    let client = async_nats::connect(url.as_str())
        .await
        .map_err(|e| format!("NATS KV baseline: cannot connect to {url}: {e}"))?;
    let js = jetstream::new(client.clone());
    let bucket = format!("hamok_bench_{:012x}", random_u64() >> 16);
    let config = || kv::Config {
        bucket: bucket.clone(),
        history: 1,
        num_replicas: 1,
        storage: jetstream::stream::StorageType::File,
        ..Default::default()
    };
    let store = match js.create_key_value(config()).await {
        Ok(store) => store,
        Err(first) => {
            // async-nats 0.51 cannot read the account info of an older server (Debian's 2.9 here):
            // create the bucket's stream as `create_key_value` would, then open it as a bucket.
            eprintln!("  NATS KV baseline: create_key_value failed ({first}); creating the KV stream by hand");
            js.create_stream(jetstream::stream::Config {
                name: format!("KV_{bucket}"),
                subjects: vec![format!("$KV.{bucket}.>")],
                max_messages_per_subject: 1,
                storage: jetstream::stream::StorageType::File,
                num_replicas: 1,
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
            js.get_key_value(bucket.as_str())
                .await
                .map_err(|e| format!("NATS KV baseline: cannot open bucket {bucket}: {e}"))?
        }
    };
    let result = rows(ctx, scenario, &store).await;
    let _ = js.delete_key_value(&bucket).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), client.flush()).await;
    result
}

async fn rows(ctx: &mut Ctx, scenario: &str, store: &kv::Store) -> Res<()> {
    let keys = ctx.sizes.memory_keys;
    let val = bytes::Bytes::from(value(ctx.value_bytes));
    let put = |store: kv::Store, val: bytes::Bytes| {
        let store = Arc::new(store);
        move |i: u64| {
            let (store, val) = (store.clone(), val.clone());
            async move { store.put(key(i, keys), val).await.map(|_| ()) }
        }
    };
    // Warm-up: the bucket's stream, the client's subscriptions.
    run_load(
        ctx.sizes.warmup_n,
        1,
        &Progress::new(0, ""),
        put(store.clone(), val.clone()),
    )
    .await?;
    let mut runs = Vec::new();
    if scenario == "latency" {
        runs.push((ctx.sizes.latency_n, 1usize));
    } else {
        for c in ctx.sizes.concurrency.clone() {
            runs.push((ctx.sizes.throughput_n, c));
        }
    }
    for (n, c) in runs {
        let progress = Progress::new(n, &format!("{scenario}: NATS KV baseline, {c} in flight"));
        let load = run_load(n, c, &progress, put(store.clone(), val.clone())).await?;
        progress.finish();
        let what = if c == 1 && scenario == "latency" {
            "kv.put sequential"
        } else {
            "kv.put"
        };
        let r = ctx
            .baseline_record(scenario, what)
            .config("keys", keys)
            .config("bucket_replicas", 1u64)
            .config("bucket_storage", "file")
            .config("server", nats_url());
        let r = ctx.load_record_of(r, c, &load);
        ctx.emit_record(r);
    }
    Ok(())
}
