//! hamok's benchmark: one command that measures hamok against the targets of the design brief (§5) and,
//! over NATS, against NATS JetStream KV in the same run.
//!
//! ```text
//! cargo run --release --example bench -- [--transport memory|nats|rabbitmq] [--peers 3]
//!     [--scenario NAME[,NAME...]|all] [--json FILE] [--quick] [--save] [--threads N] [--durable]
//!     [--nats-cluster]
//! ```
//!
//! The broker transports are always built into the examples (a dev-dependency enables them). Brokers
//! are found at `HAMOK_NATS_URL` / `HAMOK_AMQP_URL`, by default on localhost.
//!
//! Scenarios (issue 6): `election`, `latency`, `throughput`, `failover`, `catchup`, `memory`, `scale`,
//! `read`, `locks`, `queue` (a queue's `push_one`, `pop`, `take`+`ack` and `take_many`+`ack_many`,
//! from the leader and from a follower); `all` runs them all (`memory` first, so that its peak RSS is
//! its own). Each prints markdown table rows on stdout (progress and diagnostics go to stderr) and,
//! with `--json`, a JSON record (scenario, transport, peers, from, concurrency, n, p50/p99/mean/max
//! in µs, ops/s, extra figures, configuration). `--quick` shrinks every count so that
//! `--scenario all --quick` takes under a minute.
//! `--save` appends the table to `bench/results/<date>-<transport>.md`.
//!
//! Every peer is its own `Hamok` (its own actors); all peers of a run live in this process, so the
//! memory figures are the whole process's. With `--processes` (broker transports only), `latency`,
//! `throughput` and `scale` run every peer but the measured one in a child process (this binary in
//! its internal `--peer-process CLUSTER PEER` mode), as the brief's NATS targets are stated. The load is driven from spawned tasks (never from the
//! `block_on` thread, where every operation would pay a cross-thread wake-up).
//!
//! With `--durable` every selected scenario runs twice: once with in-memory peers, then with durable
//! ones (`storage_dir`, one directory per peer under a fresh temporary directory, removed at the end;
//! the default sync policy, one `fdatasync` per Ready batch). The rows say which in their `storage`
//! column (and JSON field), a last table sets each durable row beside its in-memory one, and first
//! and last rows time back-to-back 4 KiB appends + `fdatasync` in that directory (what
//! `dd oflag=dsync` measures), then the same over preallocated zeros (what a preallocated log would
//! pay; hamok's log appends), one loop alone and one loop per peer at once (the peers share the
//! disk, and a write's syncs on the leader and its followers overlap): context for the durable rows,
//! not a bound on them. Other I/O on the
//! machine moves it a lot (on a busy VM it has read ~4 ms while hamok's own `fdatasync`s, traced in
//! the same run, took ~0.1 ms at the median).
//! The NATS KV baseline runs once, in the in-memory pass.
//!
//! With `--nats-cluster` (`--transport nats` only) the run starts its own cluster of three local NATS
//! servers (routes on loopback, JetStream on; `hamok_testkit::nats_cluster`, stopped at the end of the
//! run, also on error) instead of using `HAMOK_NATS_URL`: peer `p<i>` connects to server `i` (with
//! `--processes`, the child peer processes too), the KV baseline's bucket has 3 replicas and one
//! client per server, and hamok's rows say `nats-cluster`. `rtt` rows come first and again last: a
//! NATS request/reply round trip at 1 in flight between clients on servers 0 and 1, and on server 0
//! alone for reference, and the same for a frame echoed between two of hamok's NATS transport links.
//! At the end, a table of ratios (hamok leader and follower write p50 over the round trip, the mean of
//! its first and last rows; KV R3 put p50 over hamok's leader and follower write p50; throughput hamok
//! / KV R3 at 100 and 1,000 in flight), also in the JSON as records of scenario `ratio`.

mod cluster;
mod kv;
mod multi_server;
mod queue;
mod report;
mod scenarios;

use std::io::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use cluster::{Res, TransportKind};
use report::{json_document, Record, Value};
use scenarios::{Ctx, Sizes, ALL};

const USAGE: &str = "\
usage: cargo run --release --example bench -- [options]

options:
  --transport memory|nats|rabbitmq   how the peers talk (default memory; nats also measures NATS KV)
  --peers N                          peers per cluster (default 3; `scale` uses 3, 5 and 7)
  --scenario NAME[,NAME...]|all      election, latency, throughput, failover, catchup, memory, scale,
                                     read, locks, queue (default all)
  --json FILE                        also write every record as JSON to FILE
  --quick                            small counts: `--scenario all --quick` runs in under a minute
  --save                             append the table to bench/results/<date>-<transport>.md
  --concurrency N[,N...]             in-flight counts of throughput and scale (default 1,10,100,1000)
  --threads N                        tokio worker threads (default: one per CPU)
  --processes                        broker transports: in latency, throughput and scale, run every
                                     peer but the measured one in its own OS process
  --durable                          run every scenario twice, in memory and with durable peers (each
                                     in its own directory under a fresh temporary directory in $TMPDIR
                                     or /tmp, removed at the end; sync policy batch), and compare
  --nats-cluster                     with --transport nats: start 3 local NATS servers as one cluster,
                                     each peer on its own server, KV baseline with 3 replicas; adds
                                     rtt rows (NATS round trip across servers) and a table of ratios
  -h, --help                         this help
";

struct Args {
    transport: TransportKind,
    peers: usize,
    scenarios: Vec<String>,
    json: Option<PathBuf>,
    quick: bool,
    save: bool,
    threads: Option<usize>,
    processes: bool,
    /// Measure every scenario in memory and again with durable peers.
    durable: bool,
    /// Overrides the in-flight counts of `throughput` and `scale`.
    concurrency: Option<Vec<usize>>,
    /// `--nats-cluster`: the run on its own local cluster of 3 NATS servers.
    nats_cluster: bool,
    /// Internal: the one NATS server the `--peer-process` peer connects to (`--nats-cluster`).
    nats_url: Option<String>,
    /// Internal: run one peer of `(cluster, peer)` in this process (see `--processes`).
    peer_process: Option<(String, String)>,
    /// Internal: the storage directory of the `--peer-process` peer (`--durable --processes`).
    peer_storage: Option<PathBuf>,
}

fn parse_args(mut it: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut args = Args {
        transport: TransportKind::Memory,
        peers: 3,
        scenarios: ALL.iter().map(|s| s.to_string()).collect(),
        json: None,
        quick: false,
        save: false,
        threads: None,
        processes: false,
        durable: false,
        concurrency: None,
        nats_cluster: false,
        nats_url: None,
        peer_process: None,
        peer_storage: None,
    };
    while let Some(arg) = it.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let mut value = |what: &str| {
            inline
                .clone()
                .or_else(|| it.next())
                .ok_or_else(|| format!("{name} needs {what}"))
        };
        match name.as_str() {
            "--transport" => {
                let v = value("a transport")?;
                args.transport = TransportKind::parse(&v)
                    .ok_or_else(|| format!("unknown transport {v:?} (memory, nats, rabbitmq)"))?;
            }
            "--peers" => {
                let v = value("a number")?;
                args.peers = v
                    .parse()
                    .ok()
                    .filter(|n| (1..=15).contains(n))
                    .ok_or_else(|| format!("--peers takes 1 to 15, not {v:?}"))?;
            }
            "--scenario" | "--scenarios" => {
                let v = value("a scenario")?;
                if v == "all" {
                    args.scenarios = ALL.iter().map(|s| s.to_string()).collect();
                } else {
                    args.scenarios = Vec::new();
                    for s in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                        if !ALL.contains(&s) {
                            return Err(format!(
                                "unknown scenario {s:?} (one of {}, or all)",
                                ALL.join(", ")
                            ));
                        }
                        args.scenarios.push(s.to_string());
                    }
                }
            }
            "--json" => args.json = Some(PathBuf::from(value("a file")?)),
            "--threads" => {
                let v = value("a number")?;
                args.threads = Some(
                    v.parse()
                        .ok()
                        .filter(|n| *n >= 1)
                        .ok_or_else(|| format!("--threads takes a positive number, not {v:?}"))?,
                );
            }
            "--quick" => args.quick = true,
            "--processes" => args.processes = true,
            "--durable" => args.durable = true,
            "--nats-cluster" => args.nats_cluster = true,
            "--nats-url" => args.nats_url = Some(value("a URL")?),
            "--concurrency" => {
                let v = value("a list of numbers")?;
                let list: Option<Vec<usize>> = v
                    .split(',')
                    .map(|c| c.trim().parse().ok().filter(|n| *n >= 1))
                    .collect();
                args.concurrency = Some(list.filter(|l| !l.is_empty()).ok_or_else(|| {
                    format!("--concurrency takes positive numbers separated by commas, not {v:?}")
                })?);
            }
            "--peer-process" => {
                let cluster = value("a cluster id")?;
                let peer = it
                    .next()
                    .ok_or("--peer-process needs a cluster id and a peer id")?;
                args.peer_process = Some((cluster, peer));
            }
            "--peer-storage" => args.peer_storage = Some(PathBuf::from(value("a directory")?)),
            "--save" => args.save = true,
            "-h" | "--help" => {
                print!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}\n\n{USAGE}")),
        }
    }
    if args.nats_cluster && args.transport != TransportKind::Nats {
        return Err("--nats-cluster needs --transport nats".into());
    }
    Ok(args)
}

/// With `--features mimalloc` the benchmark runs on mimalloc instead of the system allocator (the
/// header and the JSON name the allocator). The library never picks one: a service embedding hamok
/// chooses its own (see README "Performance").
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The global allocator of this build, as the report names it.
const ALLOCATOR: &str = if cfg!(feature = "mimalloc") {
    "mimalloc"
} else {
    "system"
};

/// The allocator's settings taken from the environment (`GLIBC_TUNABLES`, `MIMALLOC_*`), as
/// `NAME=value` pairs, or `defaults`: they change the figures as much as the allocator does (README
/// "Performance", the allocator).
fn allocator_settings() -> String {
    let mut set: Vec<String> = std::env::vars()
        .filter(|(k, _)| k == "GLIBC_TUNABLES" || k.starts_with("MIMALLOC_"))
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    set.sort();
    if set.is_empty() {
        "defaults".into()
    } else {
        set.join(" ")
    }
}

fn main() {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("bench: {e}");
            std::process::exit(2);
        }
    };
    if args.processes && args.transport == TransportKind::Memory {
        eprintln!("bench: --processes needs a broker transport (--transport nats or rabbitmq)");
        std::process::exit(2);
    }
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bench: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    // Everything runs in a spawned task: the `block_on` thread only waits for it.
    let outcome = runtime.block_on(async move {
        match args.peer_process.clone() {
            Some((cluster, peer)) => {
                tokio::spawn(cluster::peer_process_main(
                    args.transport,
                    cluster,
                    peer,
                    args.peer_storage.clone(),
                    args.nats_url.clone(),
                ))
                .await
            }
            None => tokio::spawn(run(args, threads)).await,
        }
    });
    match outcome {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            eprintln!("bench: {e}");
            std::process::exit(1);
        }
        Err(e) => {
            eprintln!("bench: {e}");
            std::process::exit(1);
        }
    }
}

async fn run(args: Args, threads: usize) -> Res<()> {
    let started = Instant::now();
    let started_at = SystemTime::now();
    let load_start = cluster::loadavg();
    let command = format!(
        "cargo run --release --example bench -- {}",
        std::env::args().skip(1).collect::<Vec<_>>().join(" ")
    );
    let mut meta: Vec<(String, Value)> = vec![
        ("tool".into(), "hamok examples/bench".into()),
        ("command".into(), command.clone().into()),
        ("transport".into(), args.transport.name().into()),
        ("peers".into(), args.peers.into()),
        ("quick".into(), args.quick.into()),
        ("processes".into(), args.processes.into()),
        ("durable".into(), args.durable.into()),
        ("runtime_threads".into(), threads.into()),
        ("started_utc".into(), utc_timestamp(started_at).into()),
        ("loadavg_start".into(), load_start.clone().into()),
        (
            "cpus".into(),
            std::thread::available_parallelism()
                .map_or(0, |n| n.get())
                .into(),
        ),
        ("allocator".into(), ALLOCATOR.into()),
        ("allocator_settings".into(), allocator_settings().into()),
    ];
    eprintln!(
        "-- load average at start: {load_start}; allocator: {ALLOCATOR} ({})",
        allocator_settings()
    );
    // `--nats-cluster`: the servers live as long as the run (they stop when the last reference, this
    // one or the context's, is dropped: on every return, error or not).
    let nats_cluster = if args.nats_cluster {
        let cluster = Arc::new(multi_server::start().await?);
        let urls = cluster.client_urls();
        meta.push(("nats_cluster".into(), true.into()));
        meta.push(("nats_servers".into(), urls.join(",").into()));
        if let Some(version) = multi_server::server_version(&urls[0]).await {
            meta.push(("nats_server_version".into(), version.into()));
        }
        Some(cluster)
    } else {
        None
    };
    // `--durable`: the durable pass of each scenario keeps its peers under `<root>/<scenario>/`.
    let storage_root = if args.durable {
        let root = tempfile::Builder::new()
            .prefix("hamok-bench-")
            .tempdir()
            .map_err(|e| format!("cannot create the storage directory: {e}"))?;
        let fs = cluster::filesystem_type(root.path()).unwrap_or_else(|| "unknown".into());
        eprintln!(
            "-- durable peers under {} ({fs}), sync policy {}",
            root.path().display(),
            cluster::sync_policy_name()
        );
        if fs == "tmpfs" || fs == "ramfs" {
            eprintln!("   warning: {fs} is memory; set TMPDIR to a directory on a disk");
        }
        meta.push((
            "storage_root".into(),
            root.path().display().to_string().into(),
        ));
        meta.push(("storage_fs".into(), fs.into()));
        meta.push(("storage_sync".into(), cluster::sync_policy_name().into()));
        Some(root)
    } else {
        None
    };
    println!("{}", Record::table_header());
    let _ = std::io::stdout().flush();
    let mut ctx = Ctx {
        kind: args.transport,
        peers: args.peers,
        quick: args.quick,
        threads,
        processes: args.processes,
        value_bytes: 100,
        storage: None,
        sizes: {
            let mut sizes = Sizes::new(args.quick);
            if let Some(c) = &args.concurrency {
                sizes.concurrency = c.clone();
            }
            sizes
        },
        nats_servers: nats_cluster
            .as_ref()
            .map(|c| c.client_urls())
            .unwrap_or_default(),
        nats_cluster: nats_cluster.clone(),
        placement: None,
        records: Vec::new(),
        on_record: Box::new(|r: &Record| {
            println!("{}", r.table_row());
            let _ = std::io::stdout().flush();
        }),
    };
    if let Some(root) = &storage_root {
        disk_probe(
            &mut ctx,
            &mut meta,
            root.path(),
            args.quick,
            args.peers,
            "start",
        )
        .await?;
    }
    let passes: &[bool] = if args.durable {
        &[false, true]
    } else {
        &[false]
    };
    let mut failure = None;
    if nats_cluster.is_some() {
        let t = Instant::now();
        eprintln!("-- rtt");
        if let Err(e) = multi_server::rtt_rows(&mut ctx, "start").await {
            eprintln!("bench: rtt failed: {e}");
            failure = Some(format!("rtt failed: {e}"));
        } else {
            eprintln!("   rtt took {:.1} s", t.elapsed().as_secs_f64());
        }
    }
    'scenarios: for scenario in &args.scenarios {
        if failure.is_some() {
            break;
        }
        for &durable in passes {
            let label = if durable { " (durable)" } else { "" };
            ctx.storage = match &storage_root {
                Some(root) if durable => {
                    let dir = root.path().join(scenario);
                    std::fs::create_dir_all(&dir)?;
                    Some(dir)
                }
                _ => None,
            };
            let t = Instant::now();
            eprintln!("-- {scenario}{label}");
            let outcome = ctx.run(scenario).await;
            // Every peer of the pass is closed: its directories go now (the disk a run holds is bounded
            // by one scenario's).
            if let Some(dir) = ctx.storage.take() {
                if let Err(e) = std::fs::remove_dir_all(&dir) {
                    eprintln!("   cannot remove {}: {e}", dir.display());
                }
            }
            if let Err(e) = outcome {
                eprintln!("bench: scenario {scenario}{label} failed: {e}");
                failure = Some(format!("scenario {scenario}{label} failed: {e}"));
                break 'scenarios;
            }
            eprintln!(
                "   {scenario}{label} took {:.1} s",
                t.elapsed().as_secs_f64()
            );
            if let Some(path) = &args.json {
                std::fs::write(path, json_document(&meta, &ctx.records))?;
            }
        }
    }
    if nats_cluster.is_some() && failure.is_none() {
        eprintln!("-- rtt (again, at the end)");
        if let Err(e) = multi_server::rtt_rows(&mut ctx, "end").await {
            eprintln!("bench: rtt failed: {e}");
            failure = Some(format!("rtt failed: {e}"));
        }
    }
    if let Some(root) = storage_root {
        // Again at the end: other I/O on the machine moves this figure, and durable rows with it.
        if failure.is_none() {
            disk_probe(
                &mut ctx,
                &mut meta,
                root.path(),
                args.quick,
                args.peers,
                "end",
            )
            .await?;
        }
        let path = root.path().display().to_string();
        if let Err(e) = root.close() {
            eprintln!("   cannot remove {path}: {e}");
        }
    }
    let comparison = if args.durable {
        report::comparison_table(&ctx.records)
    } else {
        None
    };
    if let Some(table) = &comparison {
        println!("\ndurable vs in-memory (same run):\n\n{table}");
        let _ = std::io::stdout().flush();
    }
    // `--nats-cluster`: the ratios of this run's rows, printed, and as records for the JSON.
    let ratios = if nats_cluster.is_some() {
        let (table, records) = multi_server::ratios(&ctx.records);
        ctx.records.extend(records);
        println!(
            "\nratios (same run, {} NATS servers):\n\n{table}",
            multi_server::SERVERS
        );
        let _ = std::io::stdout().flush();
        Some(table)
    } else {
        None
    };
    let total = started.elapsed().as_secs_f64();
    eprintln!(
        "-- done in {total:.1} s (load average {})",
        cluster::loadavg()
    );
    meta.push(("elapsed_s".into(), total.into()));
    meta.push(("loadavg_end".into(), cluster::loadavg().into()));
    if let Some(path) = &args.json {
        std::fs::write(path, json_document(&meta, &ctx.records))
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    if args.save && failure.is_none() {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("bench/results");
        std::fs::create_dir_all(&dir)?;
        let path = dir.join(format!(
            "{}-{}.md",
            &utc_timestamp(started_at)[..10],
            if nats_cluster.is_some() {
                multi_server::TRANSPORT
            } else {
                args.transport.name()
            }
        ));
        let mut text = format!(
            "## {} ({} peers{}{}, {threads} runtime threads, {total:.0} s, load average {load_start} at start, {} at end)\n\n`{command}`\n\n{}\n",
            utc_timestamp(started_at),
            args.peers,
            if args.quick { ", quick" } else { "" },
            if args.durable { ", in memory and durable" } else { "" },
            cluster::loadavg(),
            Record::table_header()
        );
        for r in ctx.records.iter().filter(|r| r.scenario != "ratio") {
            text.push_str(&r.table_row());
            text.push('\n');
        }
        text.push('\n');
        if let Some(table) = &comparison {
            text.push_str(&format!("durable vs in-memory (same run):\n\n{table}\n\n"));
        }
        if let Some(table) = &ratios {
            text.push_str(&format!(
                "ratios (same run, {} NATS servers):\n\n{table}\n\n",
                multi_server::SERVERS
            ));
        }
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)?;
        file.write_all(text.as_bytes())?;
        eprintln!("-- appended to {}", path.display());
    }
    // The servers stop here (both references gone), before the result is reported.
    drop(ctx);
    if let Some(cluster) = nats_cluster {
        eprintln!("-- stopping the NATS cluster {}", cluster.name());
        drop(cluster);
    }
    match failure {
        Some(f) => Err(f.into()),
        None => Ok(()),
    }
}

/// `--durable`: emits rows timing raw 4 KiB writes + `fdatasync` in `dir` (without hamok), appends
/// and overwrites of preallocated zeros, one loop alone and `peers` loops at once, taken at the
/// `when` (`start`, `end`) of the run.
async fn disk_probe(
    ctx: &mut Ctx,
    meta: &mut Vec<(String, Value)>,
    dir: &std::path::Path,
    quick: bool,
    peers: usize,
    when: &str,
) -> Res<()> {
    let n = if quick { 100 } else { 500 };
    // One loop alone, then one per peer at once: the peers of a run share this disk, and a write's
    // syncs (the leader's and its followers') run at the same time. Appends (what hamok's log does),
    // then writes over preallocated zeros (what a preallocated log would pay: see the file store's
    // `wal.rs` for why it does not).
    for preallocated in [false, true] {
        for writers in [1, peers] {
            let dir = dir.to_path_buf();
            let hist = tokio::task::spawn_blocking(move || {
                cluster::fdatasync_probe(&dir, n, writers, preallocated)
            })
            .await??;
            let how = if preallocated {
                "overwrite of preallocated zeros"
            } else {
                "append"
            };
            let what = if writers == 1 {
                format!("4 KiB {how} + fdatasync loop, no hamok ({when} of run)")
            } else {
                format!("{writers} such loops at once, one file each ({when} of run)")
            };
            let mut r = Record::new("disk", "-", writers, "-", &what)
                .config("file", "new file in the storage directory");
            r.storage = "durable".into();
            r.summary = hist.summary();
            r.ops_per_s = writers as f64 * 1e6 / r.summary.mean_us.max(1e-3);
            let kind = if preallocated { "_preallocated" } else { "" };
            let key = if writers == 1 {
                format!("fdatasync{kind}_{when}")
            } else {
                format!("fdatasync{kind}_{writers}_at_once_{when}")
            };
            meta.push((format!("{key}_p50_us"), r.summary.p50_us.into()));
            meta.push((format!("{key}_p99_us"), r.summary.p99_us.into()));
            ctx.emit_record(r);
        }
    }
    Ok(())
}

/// `YYYY-MM-DDTHH:MM:SSZ` of `t` (civil-from-days, no date crate needed).
fn utc_timestamp(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3_600,
        rem % 3_600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Result<Args, String> {
        parse_args(s.split_whitespace().map(str::to_string))
    }

    #[test]
    fn parses_flags() {
        let a =
            args("--transport nats --peers 5 --scenario latency,read --json=/tmp/x --quick --save")
                .unwrap();
        assert_eq!(a.transport, TransportKind::Nats);
        assert_eq!(a.peers, 5);
        assert_eq!(a.scenarios, vec!["latency", "read"]);
        assert_eq!(a.json, Some(PathBuf::from("/tmp/x")));
        assert!(a.quick && a.save);
        assert!(!a.durable && !a.processes);
        let a =
            args("--transport nats --durable --processes --scenario latency,throughput").unwrap();
        assert!(a.durable && a.processes);
        assert_eq!(a.scenarios, vec!["latency", "throughput"]);
        assert!(args("--durable").unwrap().durable);
        let a = args("--peer-process c p1 --peer-storage /tmp/s/c/p1").unwrap();
        assert_eq!(a.peer_process, Some(("c".into(), "p1".into())));
        assert_eq!(a.peer_storage, Some(PathBuf::from("/tmp/s/c/p1")));
        assert!(args("--peer-storage").is_err());
        assert!(args("--scenario nope").is_err());
        assert!(args("--peers 0").is_err());
        assert!(args("--bogus").is_err());
        let a = args("--transport nats --nats-cluster --processes --scenario latency,throughput")
            .unwrap();
        assert!(a.nats_cluster && a.processes);
        assert_eq!(a.transport, TransportKind::Nats);
        assert!(!args("--transport nats").unwrap().nats_cluster);
        assert!(args("--nats-cluster").is_err(), "needs --transport nats");
        assert!(args("--transport rabbitmq --nats-cluster").is_err());
        let a =
            args("--transport nats --peer-process c p2 --nats-url nats://127.0.0.1:4333").unwrap();
        assert_eq!(a.nats_url.as_deref(), Some("nats://127.0.0.1:4333"));
        assert!(args("--nats-url").is_err());
        let urls = ["n0".to_string(), "n1".to_string(), "n2".to_string()];
        let net = cluster::Net::fresh(TransportKind::Nats).with_nats_servers(&urls);
        assert_eq!(net.nats_url_for("p1").as_deref(), Some("n1"));
        assert_eq!(net.nats_url_for("p4").as_deref(), Some("n1"));
        assert_eq!(net.nats_url_for("x").as_deref(), Some("n0"));
        assert_eq!(
            cluster::Net::fresh(TransportKind::Nats).nats_url_for("p1"),
            None
        );
        assert_eq!(args("").unwrap().scenarios.len(), ALL.len());
    }

    #[test]
    fn timestamps() {
        let t = UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
        assert_eq!(utc_timestamp(t), "2023-11-14T22:13:20Z");
        assert_eq!(utc_timestamp(UNIX_EPOCH), "1970-01-01T00:00:00Z");
    }
}
