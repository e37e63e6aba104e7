//! The `queue` scenario: a replicated queue's `push_one`, `pop` (at most once), `take` + `ack` (at least
//! once) and `take_many` + `ack_many`, from the leader and from a follower.
//!
//! One queue, opened on every peer (created through the leader). Before each consuming row the leader
//! fills it (untimed, `push` of [`FILL_BATCH`] items per log entry) with exactly as many items as the row
//! consumes; after each row every peer's `len()` and `in_flight()` must be what the row leaves (after
//! `sync()`): a run also checks that it did what its rows claim.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hamok::collections::{DeliveryId, HamokCollections, HamokQueue};

use crate::cluster::{run_load, value, Cluster, LoadResult, Progress, Res};
use crate::report::Hist;
use crate::scenarios::Ctx;

/// The queue every row uses: string items of `value_bytes` bytes.
type Queue = HamokQueue<String>;

/// The lease of every take (every item is acknowledged long before).
const LEASE: Duration = Duration::from_secs(30);
/// Items per `push` (one log entry) when filling the queue.
const FILL_BATCH: u64 = 500;
/// Items per `take_many`.
const TAKE_BATCH: u32 = 10;
/// The in-flight counts of `pop` and `take+ack` (1: the latency row).
const CONCURRENCY: [usize; 3] = [1, 10, 100];

/// `queue`: the rows of the module docs, on a fresh cluster of `ctx.peers` peers.
pub async fn queue(ctx: &mut Ctx) -> Res<()> {
    let net = ctx.net();
    let (cluster, _) = Cluster::start(&net, "queue", ctx.peers).await?;
    let result = rows(ctx, &cluster).await;
    cluster.close().await;
    result
}

/// The queue on every peer, and what it should hold.
struct Bench {
    queues: Vec<Queue>,
    leader: usize,
    item: Arc<str>,
    /// Visible items every peer should see once synced (nothing is ever left in flight).
    expect_len: u64,
}

impl Bench {
    /// Pushes `n` items from the leader, [`FILL_BATCH`] per log entry (untimed), then waits for every
    /// peer to have applied them.
    async fn fill(&mut self, n: u64) -> Res<()> {
        let leader = &self.queues[self.leader];
        let mut left = n;
        while left > 0 {
            let batch = left.min(FILL_BATCH);
            let after = leader
                .push((0..batch).map(|_| self.item.to_string()))
                .await?;
            self.expect_len += batch;
            if after != self.expect_len {
                return Err(format!(
                    "queue: a fill push answered {after} visible items, expected {}",
                    self.expect_len
                )
                .into());
            }
            left -= batch;
        }
        self.check("the fill").await
    }

    /// Every peer, synced, sees `expect_len` visible items and none in flight.
    async fn check(&self, after: &str) -> Res<()> {
        for (i, q) in self.queues.iter().enumerate() {
            q.sync().await?;
            let (len, in_flight) = (q.len() as u64, q.in_flight());
            if len != self.expect_len || in_flight != 0 {
                return Err(format!(
                    "queue: after {after}, peer {i} sees {len} items and {in_flight} in flight, \
                     expected {} and 0",
                    self.expect_len
                )
                .into());
            }
        }
        Ok(())
    }
}

async fn rows(ctx: &mut Ctx, cluster: &Cluster) -> Res<()> {
    let leader = cluster.leader_index();
    cluster.peers[leader]
        .get_or_create_queue::<String>("bench")
        .await?;
    let mut queues = Vec::new();
    for p in &cluster.peers {
        queues.push(p.get_or_create_queue::<String>("bench").await?);
    }
    let mut bench = Bench {
        queues,
        leader,
        item: Arc::from(value(ctx.value_bytes)),
        expect_len: 0,
    };
    let mut sources = vec![(leader, "leader")];
    if cluster.peers.len() > 1 {
        sources.push((cluster.follower_index(), "follower"));
    }
    let (latency_n, throughput_n) = (ctx.sizes.queue_latency_n, ctx.sizes.queue_throughput_n);
    for (at, from) in sources {
        let q = bench.queues[at].clone();
        // Warm-up (connections, the follower's forwarding, the allocator): push, take and ack.
        let warmup = ctx.sizes.warmup_n;
        let none = Progress::new(0, "");
        loaded(push_load(&q, &bench.item, warmup, &none).await?)?;
        loaded(take_ack_load(&q, warmup, 1, 1, &none).await?.0)?;
        bench.check("the warm-up").await?;

        // push_one, for reference.
        let label = format!("queue: push_one from {from}");
        let progress = Progress::new(latency_n, &label);
        let load = push_load(&q, &bench.item, latency_n, &progress).await?;
        progress.finish();
        bench.expect_len += load.hist.count();
        let r = row(ctx, from, "queue push_one (1 item, 1 log entry)", 1, &load);
        ctx.emit_record(r);
        loaded(load)?;
        bench.check(&label).await?;

        // pop (at most once), then take + ack (at least once): one row per concurrency each.
        for (kind, what) in [
            ("pop", "queue pop (1 log entry)"),
            ("take+ack", "queue take+ack (2 log entries)"),
        ] {
            for c in CONCURRENCY {
                let n = if c == 1 { latency_n } else { throughput_n };
                bench.fill(n).await?;
                let label = format!("queue: {kind} from {from}, {c} in flight");
                let progress = Progress::new(n, &label);
                let (load, halves) = if kind == "pop" {
                    (pop_load(&q, n, c, &progress).await?, None)
                } else {
                    let (load, halves) = take_ack_load(&q, n, c, 1, &progress).await?;
                    (load, Some(halves))
                };
                progress.finish();
                bench.expect_len -= load.hist.count();
                let r = row(ctx, from, what, c, &load);
                let r = match halves {
                    Some(halves) => halves.note(r),
                    None => r,
                };
                ctx.emit_record(r);
                loaded(load)?;
                bench.check(&label).await?;
            }
        }

        // take_many + ack_many, counted in items.
        let c = 100;
        let batches = (throughput_n / u64::from(TAKE_BATCH)).max(1);
        let items = batches * u64::from(TAKE_BATCH);
        bench.fill(items).await?;
        let label = format!("queue: take_many({TAKE_BATCH})+ack_many from {from}");
        let progress = Progress::new(batches, &label);
        let (load, halves) = take_ack_load(&q, batches, c, TAKE_BATCH, &progress).await?;
        progress.finish();
        bench.expect_len -= load.hist.count() * u64::from(TAKE_BATCH);
        let what = format!(
            "queue take_many({TAKE_BATCH})+ack_many (2 log entries; ops/s counts items, n and \
             latencies are per batch)"
        );
        let mut r = halves.note(row(ctx, from, &what, c, &load));
        r.ops_per_s = load.ops_per_s() * f64::from(TAKE_BATCH);
        let r = r
            .extra("batches_per_s", load.ops_per_s())
            .config("items", items);
        ctx.emit_record(r);
        loaded(load)?;
        bench.check(&label).await?;
    }
    Ok(())
}

/// The record of one row.
fn row(
    ctx: &Ctx,
    from: &str,
    what: &str,
    concurrency: usize,
    load: &LoadResult,
) -> crate::report::Record {
    let r = ctx
        .record("queue", ctx.peers, from, what)
        .config("lease_ms", LEASE.as_millis() as u64)
        .config("fill_batch", FILL_BATCH)
        .config("fill_from", "leader");
    ctx.load_record_of(r, concurrency, load)
}

/// `Err` if any operation of `load` failed (its row is already out, with the first error).
fn loaded(load: LoadResult) -> Res<()> {
    match load.errors {
        0 => Ok(()),
        errors => Err(format!(
            "queue: {errors} operations failed, the first: {}",
            load.first_error.as_deref().unwrap_or("?")
        )
        .into()),
    }
}

/// `n` sequential `push_one`s.
async fn push_load(q: &Queue, item: &Arc<str>, n: u64, progress: &Progress) -> Res<LoadResult> {
    let (q, item) = (q.clone(), item.clone());
    run_load(n, 1, progress, move |_| {
        let (q, item) = (q.clone(), item.clone());
        async move { q.push_one(item.to_string()).await.map(|_| ()) }
    })
    .await
}

/// `n` `pop`s, `c` in flight; an empty answer is an error (the queue holds at least `n` items).
async fn pop_load(q: &Queue, n: u64, c: usize, progress: &Progress) -> Res<LoadResult> {
    let q = q.clone();
    run_load(n, c, progress, move |_| {
        let q = q.clone();
        async move {
            match q.pop().await {
                Ok(Some(v)) => {
                    black_box(v);
                    Ok(())
                }
                Ok(None) => Err("pop found the queue empty".to_string()),
                Err(e) => Err(format!("pop: {e}")),
            }
        }
    })
    .await
}

/// The latencies of the two halves of a take + ack.
#[derive(Clone, Default)]
struct Halves {
    take: Arc<Hist>,
    ack: Arc<Hist>,
}

impl Halves {
    /// `r` with the halves' p50s.
    fn note(&self, r: crate::report::Record) -> crate::report::Record {
        r.extra("take_p50_us", self.take.summary().p50_us)
            .extra("ack_p50_us", self.ack.summary().p50_us)
    }
}

/// `n` operations, `c` in flight, each a `take_many(batch)` (`take` for 1) then an `ack_many` (`ack`
/// for 1) of what it took. Taking fewer than `batch` items, or an ack answering `false`, is an error.
async fn take_ack_load(
    q: &Queue,
    n: u64,
    c: usize,
    batch: u32,
    progress: &Progress,
) -> Res<(LoadResult, Halves)> {
    let q = q.clone();
    let halves = Halves::default();
    let h = halves.clone();
    let load = run_load(n, c, progress, move |_| {
        let (q, h) = (q.clone(), h.clone());
        async move {
            let started = Instant::now();
            let ids: Vec<DeliveryId> = if batch == 1 {
                match q.take(LEASE).await {
                    Ok(Some(d)) => vec![black_box(d).id],
                    Ok(None) => return Err("take found the queue empty".to_string()),
                    Err(e) => return Err(format!("take: {e}")),
                }
            } else {
                let taken = q
                    .take_many(batch, LEASE)
                    .await
                    .map_err(|e| format!("take_many: {e}"))?;
                taken.into_iter().map(|d| black_box(d).id).collect()
            };
            let took = Instant::now();
            h.take.record(took - started);
            // Acknowledge whatever was taken, even a short batch, so the queue holds no lease after.
            let acked = if batch == 1 {
                vec![q.ack(ids[0]).await.map_err(|e| format!("ack: {e}"))?]
            } else {
                q.ack_many(&ids)
                    .await
                    .map_err(|e| format!("ack_many: {e}"))?
            };
            h.ack.record(took.elapsed());
            if ids.len() < batch as usize {
                return Err(format!(
                    "take_many({batch}) found {} items, the queue should hold enough",
                    ids.len()
                ));
            }
            match acked.iter().filter(|a| !**a).count() {
                0 => Ok(()),
                refused => Err(format!(
                    "{refused} of {} acks answered false (no longer held)",
                    ids.len()
                )),
            }
        }
    })
    .await?;
    Ok((load, halves))
}
