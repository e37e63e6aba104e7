//! hamok's benchmark: one command that measures hamok against the targets of the design brief (§5) and,
//! over NATS, against NATS JetStream KV in the same run.
//!
//! ```text
//! cargo run --release --example bench -- [--transport memory|nats|rabbitmq] [--peers 3]
//!     [--scenario NAME[,NAME...]|all] [--json FILE] [--quick] [--save] [--threads N] [--durable]
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
//! column (and JSON field), a last table sets each durable row beside its in-memory one, and a first
//! and a last row time back-to-back 4 KiB appends + `fdatasync` in that directory (what
//! `dd oflag=dsync` measures): context for the durable rows, not a bound on them. Other I/O on the
//! machine moves it a lot (on a busy VM it has read ~4 ms while hamok's own `fdatasync`s, traced in
//! the same run, took ~0.1 ms at the median).
//! The NATS KV baseline runs once, in the in-memory pass.

mod cluster;
mod kv;
mod queue;
mod report;
mod scenarios;

use std::io::Write as _;
use std::path::PathBuf;
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
    Ok(args)
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
    ];
    eprintln!("-- load average at start: {load_start}");
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
        records: Vec::new(),
        on_record: Box::new(|r: &Record| {
            println!("{}", r.table_row());
            let _ = std::io::stdout().flush();
        }),
    };
    if let Some(root) = &storage_root {
        disk_probe(&mut ctx, &mut meta, root.path(), args.quick, "start").await?;
    }
    let passes: &[bool] = if args.durable {
        &[false, true]
    } else {
        &[false]
    };
    let mut failure = None;
    'scenarios: for scenario in &args.scenarios {
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
    if let Some(root) = storage_root {
        // Again at the end: other I/O on the machine moves this figure, and durable rows with it.
        if failure.is_none() {
            disk_probe(&mut ctx, &mut meta, root.path(), args.quick, "end").await?;
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
            args.transport.name()
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
        for r in &ctx.records {
            text.push_str(&r.table_row());
            text.push('\n');
        }
        text.push('\n');
        if let Some(table) = &comparison {
            text.push_str(&format!("durable vs in-memory (same run):\n\n{table}\n\n"));
        }
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)?;
        file.write_all(text.as_bytes())?;
        eprintln!("-- appended to {}", path.display());
    }
    match failure {
        Some(f) => Err(f.into()),
        None => Ok(()),
    }
}

/// `--durable`: emits a row timing raw 4 KiB appends + `fdatasync` in `dir` (without hamok), taken at
/// the `when` (`start`, `end`) of the run.
async fn disk_probe(
    ctx: &mut Ctx,
    meta: &mut Vec<(String, Value)>,
    dir: &std::path::Path,
    quick: bool,
    when: &str,
) -> Res<()> {
    let (dir, n) = (dir.to_path_buf(), if quick { 100 } else { 500 });
    let hist = tokio::task::spawn_blocking(move || cluster::fdatasync_probe(&dir, n)).await??;
    let mut r = Record::new(
        "disk",
        "-",
        1,
        "-",
        &format!("4 KiB append + fdatasync loop, no hamok ({when} of run)"),
    )
    .config("file", "new file in the storage directory");
    r.storage = "durable".into();
    r.summary = hist.summary();
    r.ops_per_s = 1e6 / r.summary.mean_us.max(1e-3);
    meta.push((format!("fdatasync_{when}_p50_us"), r.summary.p50_us.into()));
    meta.push((format!("fdatasync_{when}_p99_us"), r.summary.p99_us.into()));
    ctx.emit_record(r);
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
        assert_eq!(args("").unwrap().scenarios.len(), ALL.len());
    }

    #[test]
    fn timestamps() {
        let t = UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
        assert_eq!(utc_timestamp(t), "2023-11-14T22:13:20Z");
        assert_eq!(utc_timestamp(UNIX_EPOCH), "1970-01-01T00:00:00Z");
    }
}
