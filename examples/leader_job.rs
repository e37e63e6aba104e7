//! A leader-only job: job `report` runs on exactly one replica at a time and fails over when that
//! replica goes away. Its closure prints a heartbeat with its fencing token (and records it in a map
//! through a fenced handle) until it is cancelled.
//!
//! In one process (default): three replicas on an in-process hub; the replica running the job is
//! closed (as if it crashed), the job fails over once the cluster has removed it, then the new runner
//! stops its job gracefully and the third takes over at once.
//!
//! ```text
//! cargo run --example leader_job
//! ```
//!
//! One replica per process over NATS: start two or three, and press Ctrl-C in the one that prints
//! heartbeats (it stops the job, leaves and exits); another takes over. Kill it instead (`kill -9`) and
//! another takes over once the cluster has removed it (`peer_max_idle_ms`, 3 s by default).
//!
//! ```text
//! cargo run --example leader_job -- --nats nats://127.0.0.1:4222 --peer-id a --cluster jobs
//! cargo run --example leader_job -- --nats nats://127.0.0.1:4222 --peer-id b --cluster jobs
//! ```
//!
//! Every replica also prints who leads the Raft cluster (`leadership`): the job's runner and the Raft
//! leader are independent.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hamok::collections::{leadership, HamokLock, JobState, LeaderJob};
use hamok::prelude::*;
use hamok::runtime::transport::memory::InProcessHub;

#[path = "common/mod.rs"]
mod common;

const JOB: &str = "report";

/// Starts job `report` on `locks`: while this replica runs it, every `period` it prints a heartbeat and
/// records it in `beats` under the run's fence (refused once another replica runs the job).
fn start_report(
    locks: &HamokLock,
    beats: HamokMap<String, String>,
    me: String,
    period: Duration,
) -> LeaderJob {
    LeaderJob::start(locks, JOB, move |ctx| {
        let beats = beats.fenced(ctx.fence());
        let me = me.clone();
        async move {
            println!("{} [{me}] {JOB}: started, token {}", now(), ctx.token());
            let mut tick = tokio::time::interval(period);
            let mut n = 0u64;
            loop {
                tokio::select! {
                    _ = ctx.cancelled() => break,
                    _ = tick.tick() => {}
                }
                n += 1;
                println!(
                    "{} [{me}] {JOB}: heartbeat {n}, token {}",
                    now(),
                    ctx.token()
                );
                let line = format!("{me} #{n} token {}", ctx.token());
                match beats.set(JOB.into(), line).await {
                    Ok(_) => {}
                    Err(e @ HamokError::StaleFence { .. }) => {
                        println!("{} [{me}] {JOB}: {e}; stopping", now());
                        break;
                    }
                    // No quorum, timeout, ...: the run goes on until it is cancelled.
                    Err(e) => println!("{} [{me}] {JOB}: write failed: {e}", now()),
                }
            }
            println!("{} [{me}] {JOB}: stopped, token {}", now(), ctx.token());
        }
    })
}

/// Prints every change of who leads the Raft cluster, as `hamok` sees it, until it closes.
fn print_leadership(hamok: &Hamok) {
    let mut leader = leadership(hamok);
    let me = hamok.local_peer_id().clone();
    tokio::spawn(async move {
        loop {
            let now_leader = leader.borrow_and_update().clone();
            let name = now_leader.map_or_else(|| "none".to_string(), |l| l.to_string());
            println!("{} [{me}] raft leader: {name}", now());
            if leader.changed().await.is_err() {
                return;
            }
        }
    });
}

/// Wall-clock time of day (UTC), to compare the output of several processes.
fn now() -> String {
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let s = t.as_secs() % 86_400;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        s / 3600,
        s / 60 % 60,
        s % 60,
        t.subsec_millis()
    )
}

struct Args {
    nats: Option<String>,
    peer_id: Option<String>,
    cluster: String,
}

fn parse_args(argv: Vec<String>) -> Result<Args, String> {
    let mut args = Args {
        nats: None,
        peer_id: None,
        cluster: "leader-job".into(),
    };
    let mut it = argv.into_iter();
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--nats" => args.nats = Some(value()?),
            "--peer-id" => args.peer_id = Some(value()?),
            "--cluster" => args.cluster = value()?,
            "-h" | "--help" => {
                return Err(
                    "usage: leader_job [--nats URL [--peer-id ID] [--cluster ID]] \
                     (without --nats: three replicas in this process)"
                        .into(),
                )
            }
            other => return Err(format!("unknown argument {other:?} (try --help)")),
        }
    }
    if args.nats.is_none() && args.peer_id.is_some() {
        return Err("--peer-id needs --nats".into());
    }
    Ok(args)
}

#[tokio::main]
async fn main() {
    let args = match parse_args(std::env::args().skip(1).collect()) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let result = match &args.nats {
        None => in_process().await,
        Some(url) => over_nats(url, &args).await,
    };
    if let Err(e) = result {
        eprintln!("leader_job: {e}");
        std::process::exit(1);
    }
}

/// Three replicas in this process: crash-like failover, then a graceful hand-over.
async fn in_process() -> Result<(), HamokError> {
    let started = Instant::now();
    let hub = InProcessHub::new();
    let peers =
        common::start_replicas(&hub, "leader-job", ["alice", "bob", "carol"], |b| b).await?;
    peers[0].wait_until_leader(Duration::from_secs(5)).await?;
    let mut jobs = Vec::new();
    for p in &peers {
        print_leadership(p);
        let locks = p.get_or_create_lock_table("jobs").await?;
        let beats = p.get_or_create_map("beats").await?;
        let me = p.local_peer_id().to_string();
        jobs.push(Some(start_report(
            &locks,
            beats,
            me,
            Duration::from_millis(300),
        )));
    }

    let first = wait_for_runner(&jobs, None).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    let crashed = peers[first].local_peer_id().clone();
    println!(
        "{} closing {crashed}, which runs {JOB} (t = {} ms)",
        now(),
        started.elapsed().as_millis()
    );
    let closed_at = Instant::now();
    peers[first].close().await;
    let second = wait_for_runner(&jobs, Some(first)).await;
    println!(
        "{} {JOB} failed over to {} {} ms after the close (the cluster removes a silent peer after \
         peer_max_idle_ms = {} ms)",
        now(),
        peers[second].local_peer_id(),
        closed_at.elapsed().as_millis(),
        peers[second].config().peer_max_idle_ms
    );
    // The closed replica's job keeps campaigning (and failing) until stopped.
    if let Some(job) = jobs[first].take() {
        job.stop().await;
    }

    tokio::time::sleep(Duration::from_millis(700)).await;
    println!(
        "{} stopping {JOB} on {}: it resigns once its closure returned",
        now(),
        peers[second].local_peer_id()
    );
    let stopped_at = Instant::now();
    if let Some(job) = jobs[second].take() {
        job.stop().await;
    }
    let third = wait_for_runner(&jobs, Some(second)).await;
    println!(
        "{} {JOB} handed over to {} {} ms after stop",
        now(),
        peers[third].local_peer_id(),
        stopped_at.elapsed().as_millis()
    );
    tokio::time::sleep(Duration::from_millis(700)).await;

    for job in jobs.iter_mut().filter_map(Option::take) {
        job.stop().await;
    }
    let beats = peers[third]
        .get_or_create_map::<String, String>("beats")
        .await?;
    println!(
        "{} last recorded heartbeat: {:?}",
        now(),
        beats.get_linearizable(&JOB.to_string()).await?
    );
    for (i, p) in peers.iter().enumerate() {
        if i != first {
            let _ = p.leave().await;
            p.close().await;
        }
    }
    Ok(())
}

/// Waits until a replica other than `not` runs the job; its position.
async fn wait_for_runner(jobs: &[Option<LeaderJob>], not: Option<usize>) -> usize {
    loop {
        let running = jobs
            .iter()
            .enumerate()
            .find(|(i, j)| Some(*i) != not && j.as_ref().is_some_and(LeaderJob::is_running));
        if let Some((i, _)) = running {
            return i;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// One replica of a cluster over NATS, until Ctrl-C.
async fn over_nats(url: &str, args: &Args) -> Result<(), HamokError> {
    let transport = hamok::transports::nats::NatsTransport::builder()
        .servers(url.split(',').map(str::to_string))
        .build()?;
    let mut builder = register_kinds(Hamok::builder())
        .cluster_id(args.cluster.clone())
        .transport(transport);
    if let Some(id) = &args.peer_id {
        builder = builder.peer_id(id.clone());
    }
    let hamok = builder.build().await?;
    let me = hamok.local_peer_id().to_string();
    hamok.join().await?;
    println!(
        "{} [{me}] joined cluster {} over {url}",
        now(),
        args.cluster
    );
    print_leadership(&hamok);

    let locks = hamok.get_or_create_lock_table("jobs").await?;
    let beats = hamok.get_or_create_map("beats").await?;
    let job = start_report(&locks, beats, me.clone(), Duration::from_secs(1));
    // The job's state on this replica: say when it waits for another replica's run to end.
    let mut state = job.state();
    let watched = me.clone();
    tokio::spawn(async move {
        let mut waiting = false;
        loop {
            let campaigning = matches!(*state.borrow_and_update(), JobState::Campaigning);
            if campaigning && !waiting {
                println!("{} [{watched}] {JOB}: waiting (campaigning)", now());
            }
            waiting = campaigning;
            if state.changed().await.is_err() {
                return;
            }
        }
    });

    if let Err(e) = tokio::signal::ctrl_c().await {
        eprintln!("cannot listen for Ctrl-C ({e}): stopping now");
    }
    println!("{} [{me}] Ctrl-C: stopping {JOB}", now());
    job.stop().await;
    let _ = tokio::time::timeout(Duration::from_secs(5), hamok.leave()).await;
    hamok.close().await;
    println!("{} [{me}] closed", now());
    Ok(())
}
