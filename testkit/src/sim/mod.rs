//! The seeded simulation of whole peers: the real runtime (node actors, discovery, join, rejoin,
//! removal of silent members, request retries, reads), the real engine and the real collections, on an
//! in-process hub with seeded faults, driven on a paused clock by a current-thread tokio runtime.
//!
//! Why real actors on a paused clock rather than the peer's pure logic in a hand-written harness: the
//! faults this simulation exists for lived at the boundary between the runtime and the user (a barrier
//! whose error was dropped in the handle), so the clients call the public API (`HamokMap::set`,
//! `update_if`, `insert`, `get_linearizable`, `HamokQueue::push_one`) and everything under it runs
//! unchanged. The runs are still exact functions of the seed: the clock is tokio's paused clock (time
//! advances only when every task waits), the runtime has one thread, every random choice (peers' seeds,
//! the hub's losses and delays, faults, workload) comes from the seed, and every `select!` on the path
//! is biased. `same_seed_same_trace` checks it: two runs of a seed produce the same trace digest.
//!
//! What each seed checks (see [`world`] for the phases):
//! * **election safety**: no term has two leaders, as any peer reports them (`LeaderChanged`); with the
//!   bootstrap rule broken, simultaneous starts found two clusters and this fails;
//! * **answering member kept**: a leader never flags as silent a member that was up and connected to it
//!   for the whole `peer_max_idle_ms` before (checked against the connectivity timeline, [`netlog`]);
//! * **rejoin bound**: after the heal, every peer that is up is a joined member of the one cluster, with
//!   every other up peer in its membership, within `Plan::rejoin_bound_ms`;
//! * **answered in time**: every client request is answered (a value or a typed error) within its
//!   timeout plus timer granularity;
//! * **liveness**: after convergence, a write through every peer succeeds;
//! * **no acknowledged write lost, none applied twice**: every acknowledged queue push is in the final
//!   queue exactly once, no item twice; every replica holds the same map and queue;
//! * **linearizability**: the map history (writes, compare-and-sets, linearizable reads) passes the
//!   WGL checker (`runtime/tests/sim/linearizability.rs`, shared with the engine's simulation);
//! * **acknowledged delivery** ([`jobs`]): on the queue `jobs`, which the clients push to and take from
//!   under short leases (acking, nacking, extending, acking late or abandoning), no item is
//!   acknowledged twice, none is delivered after its ack, delivery counts increase, no lease ends
//!   before its deadline while its holder is a member, and once leases had time to run out every
//!   acknowledged push was acknowledged or is still in the queue, the same on every replica.
//!
//! Knobs: `HAMOK_PEER_SIM_SEEDS=N` runs seeds `1..=N` (default [`DEFAULT_SEEDS`]),
//! `HAMOK_PEER_SIM_FIRST_SEED=F` starts at `F`, `HAMOK_PEER_SIM_SEED=S` replays seed `S` with its full
//! trace, `HAMOK_PEER_SIM_THREADS=T` sets the worker threads.

pub mod jobs;
pub mod netlog;
pub mod plan;
pub mod tap;
pub mod trace;
pub mod world;

mod kv {
    /// The checker's value type.
    pub type Value = u64;
}

/// The WGL linearizability checker, shared with the engine's simulation.
#[path = "../../../runtime/tests/sim/linearizability.rs"]
pub mod linearizability;

/// Seeded randomness, the seed and thread knobs and the batch runner, shared with the engine's
/// simulation.
#[path = "../../../runtime/tests/sim/util.rs"]
pub mod util;

use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hamok_runtime::testing::PlantedBugs;

use jobs::{Consumer, JobCounts};
use linearizability::{check_history, LinError};
use plan::Plan;
use trace::{Trace, REPLAY_TRACE_LINES, TRACE_LINES};
use world::World;

/// Seeds run by default: in a release build (the test command's simulation step), and in the
/// everyday debug run.
pub const DEFAULT_SEEDS: usize = if cfg!(debug_assertions) { 100 } else { 1_000 };

/// States the linearizability search may explore per key before giving up.
const LIN_BUDGET: usize = 2_000_000;

/// How to run one seed.
#[derive(Clone, Debug)]
pub struct SimOptions {
    /// The seed.
    pub seed: u64,
    /// Planted bugs to switch on in every peer.
    pub bugs: PlantedBugs,
    /// Keep the whole trace and print it.
    pub replay: bool,
    /// How the clients consume the queue `jobs` (a wrong consumer shows the checks catch one).
    pub consumer: Consumer,
    /// The fenced lock's holders also push under their released fence after a pause (see
    /// `world::locked`). Off in [`SimOptions::new`], so the planted bugs' tests keep the workload
    /// their seeds were found with; the random seeds and the fence's planted bug turn it on.
    pub paused_holders: bool,
    /// Crashes and power cuts make four times their usual share of the faults (14 % → 40 %): the
    /// durable stores' planted bugs need a power cut at the right moment, which the usual mix brings
    /// in a few seeds out of hundreds.
    pub crash_heavy: bool,
    /// Every crash fault is a power cut that comes in the middle of the leader's next log write (after
    /// its replication left) and takes one follower with it; in the usual mix, one crash fault in
    /// twenty-two (0.3 × 0.5 × 0.3). That is the one instant at which it matters whether a durable
    /// leader counts its own copy before writing it (the planted bug `counts_unwritten_copy`).
    pub leader_write_cuts: bool,
}

impl SimOptions {
    /// Seed `seed`, no planted bug, no replay.
    pub fn new(seed: u64) -> Self {
        SimOptions {
            seed,
            bugs: PlantedBugs::default(),
            replay: false,
            consumer: Consumer::Take,
            paused_holders: false,
            crash_heavy: false,
            leader_write_cuts: false,
        }
    }
}

/// A broken check.
#[derive(Clone, Debug)]
pub struct Violation {
    /// The check's name.
    pub check: &'static str,
    /// What was seen.
    pub detail: String,
    /// When (simulated ms).
    pub at_ms: u64,
}

/// What a run counted.
#[derive(Clone, Debug, Default)]
pub struct Counts {
    pub requests: usize,
    pub writes: usize,
    pub reads_checked: usize,
    pub pushes_acked: usize,
    /// Writes accepted under a lock's fence.
    pub fenced_writes: usize,
    pub queue_items: usize,
    pub partitions: usize,
    pub long_partitions: usize,
    /// Long partitions that cut off two or more peers together.
    pub long_group_cuts: usize,
    pub crashes: usize,
    /// Crashes that were power cuts losing log writes no sync covered yet.
    pub unsynced_lost: usize,
    /// Power cuts that came in the middle of a log write (after a leader's replication left).
    pub cut_during_write: usize,
    pub restarts: usize,
    pub leaves: usize,
    pub added: usize,
    /// Members a leader flagged as silent (and removes).
    pub silence_removals: usize,
    /// `Rejoining` events: peers that found they were (or may have been) removed.
    pub rejoins: usize,
    pub joins: usize,
    pub terms_with_leader: usize,
    /// From the heal to one converged cluster.
    pub converge_ms: u64,
    /// The queue `jobs`: acknowledged delivery.
    pub jobs: JobCounts,
}

/// One passing seed.
#[derive(Clone, Debug)]
pub struct SimReport {
    pub seed: u64,
    pub counts: Counts,
    pub lin_ops: usize,
    pub sim_ms: u64,
    pub wall: Duration,
    pub trace_digest: u64,
}

impl fmt::Display for SimReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.counts;
        write!(
            f,
            "seed {:>5}: {:>6} sim-ms | requests {:>4} (writes {:>4}, reads checked {:>4}, pushes acked {:>3}, fenced {:>3}) lin ops {:>4} | \
             partitions {:>2} (long {:>2}, groups {:>2}) crashes {:>2} leaves {:>2} added {:>2} | removals {:>2} rejoins {:>2} joins {:>2} | \
             jobs: deliveries {:>3} (again {:>2}) acks {:>3}/{:>2}/{:>2} | converged {:>5} ms | {:.2}s",
            self.seed,
            self.sim_ms,
            c.requests,
            c.writes,
            c.reads_checked,
            c.pushes_acked,
            c.fenced_writes,
            self.lin_ops,
            c.partitions,
            c.long_partitions,
            c.long_group_cuts,
            c.crashes,
            c.leaves,
            c.added,
            c.silence_removals,
            c.rejoins,
            c.joins,
            c.jobs.deliveries,
            c.jobs.redeliveries,
            c.jobs.acks_true,
            c.jobs.acks_false,
            c.jobs.acks_unknown,
            c.converge_ms,
            self.wall.as_secs_f64()
        )
    }
}

/// One failing seed.
#[derive(Clone, Debug)]
pub struct SimFailure {
    pub seed: u64,
    /// The first broken check.
    pub check: String,
    pub detail: String,
    pub at_ms: u64,
    pub trace_tail: Vec<String>,
}

impl SimFailure {
    /// The command that replays this seed with its full trace.
    pub fn replay_command(&self) -> String {
        format!(
            "HAMOK_PEER_SIM_SEED={} cargo test -p hamok-testkit --test peer_simulation peer_simulation_random_seeds -- --nocapture",
            self.seed
        )
    }
}

impl fmt::Display for SimFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "peer simulation seed {} FAILED at {} ms: {}\n{}",
            self.seed, self.at_ms, self.check, self.detail
        )?;
        writeln!(f, "--- last {} trace lines ---", self.trace_tail.len())?;
        for l in &self.trace_tail {
            writeln!(f, "{l}")?;
        }
        write!(f, "replay with: {}", self.replay_command())
    }
}

/// Runs one seed.
pub fn run(opts: &SimOptions) -> Result<SimReport, SimFailure> {
    let started = Instant::now();
    let plan = Plan::draw(opts.seed);
    let cap = if opts.replay {
        REPLAY_TRACE_LINES
    } else {
        TRACE_LINES
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a current-thread runtime");
    let world = runtime.block_on(async { World::new(opts, plan, Trace::new(cap)) });
    let shared = world.shared();
    let tap = world.tap();
    let watchdog = Watchdog::start(shared.clone(), world.hub(), world.tap());
    let outcome = catch_unwind(AssertUnwindSafe(|| runtime.block_on(world.run())));
    watchdog.stop();
    drop(runtime);
    let mut s = shared.lock().unwrap_or_else(|e| e.into_inner());
    if opts.replay {
        println!("===== trace of peer simulation seed {} =====", opts.seed);
        println!("{}", s.trace.dump());
        let frames = tap.all_since(s.t0());
        if !frames.is_empty() {
            println!("===== every frame sent (HAMOK_PEER_SIM_FRAMES) =====");
            for (at, line) in frames {
                println!("{at:>7} ms  {line}");
            }
        }
    }
    let fail = |check: String, detail: String, at_ms: u64, trace: &Trace| SimFailure {
        seed: opts.seed,
        check,
        detail,
        at_ms,
        trace_tail: trace.tail(60),
    };
    let (ops, counts, sim_ms) = match outcome {
        Ok(done) => done,
        Err(panic) => {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "(non-string panic)".into());
            let at = s.now_ms();
            return Err(fail("panic".into(), msg, at, &s.trace));
        }
    };
    if let Some(v) = s.violations.first() {
        return Err(fail(
            v.check.to_string(),
            v.detail.clone(),
            v.at_ms,
            &s.trace,
        ));
    }
    let history: Vec<_> = ops.iter().map(|r| r.op.clone()).collect();
    let lin = match check_history(&history, LIN_BUDGET) {
        Ok(stats) => stats,
        Err(e) => {
            let check = match e {
                LinError::NotLinearizable { .. } => "linearizability",
                LinError::Inconclusive { .. } => "linearizability (inconclusive)",
            };
            s.trace.note(sim_ms, format!("VIOLATION {check}"));
            return Err(fail(check.into(), e.to_string(), sim_ms, &s.trace));
        }
    };
    Ok(SimReport {
        seed: opts.seed,
        counts,
        lin_ops: lin.ops,
        sim_ms,
        wall: started.elapsed(),
        trace_digest: s.trace.digest(),
    })
}

/// Wall-clock seconds without simulated time moving, while frames keep flowing, after which a run is
/// declared a message storm.
const STALL_WALL_SECS: u64 = 20;

/// Catches message storms. Simulated time only advances when every task waits; peers that answer each
/// other at once forever (a retry loop with no timer in it) stop the clock, and the run would never end.
/// This thread notices simulated time standing still while the hub keeps delivering, records a
/// `runaway` violation and drops every frame from then on, so the run can finish and report.
struct Watchdog {
    stop: std::sync::mpsc::Sender<()>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watchdog {
    fn start(
        shared: std::sync::Arc<Mutex<world::Shared>>,
        hub: hamok_runtime::transport::memory::InProcessHub,
        tap: tap::Tap,
    ) -> Watchdog {
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let mut last = (u64::MAX, 0u64);
            let mut stalled_secs = 0;
            // Wakes every 250 ms, or at once when the run ends (a message, or the sender dropped).
            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                stopped.recv_timeout(Duration::from_millis(250))
            {
                let sim_ms = shared
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .last_note_ms();
                let delivered = hub.stats().delivered;
                if sim_ms == last.0 && delivered > last.1 {
                    stalled_secs += 1;
                } else {
                    stalled_secs = 0;
                }
                last = (sim_ms, delivered);
                if stalled_secs >= STALL_WALL_SECS * 4 {
                    let frames = delivered;
                    shared
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .violation_at(
                            sim_ms,
                            "runaway",
                            format!(
                                "simulated time stood still at {sim_ms} ms for {STALL_WALL_SECS} s of wall                                  time while frames kept flowing ({frames} delivered in all): a message storm; \
                                 the last frames sent:\n{}",
                                tap.last(40).join("\n")
                            ),
                        );
                    hub.set_drop_rate(1.0);
                    return;
                }
            }
        });
        Watchdog {
            stop,
            thread: Some(thread),
        }
    }

    fn stop(mut self) {
        let _ = self.stop.send(());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The seeds to run: `HAMOK_PEER_SIM_SEED=S` (replay one; the flag says so), else
/// `HAMOK_PEER_SIM_SEEDS` seeds (default [`DEFAULT_SEEDS`]) from `HAMOK_PEER_SIM_FIRST_SEED` (default 1).
pub fn seeds_from_env() -> (Vec<u64>, bool) {
    util::seeds_from_env("HAMOK_PEER_SIM", DEFAULT_SEEDS)
}

/// Worker threads: `HAMOK_PEER_SIM_THREADS`, else the machine's parallelism (at most 8).
pub fn threads_from_env() -> usize {
    util::threads_from_env("HAMOK_PEER_SIM")
}

/// The results of many seeds.
pub struct Batch {
    /// Passing seeds, in seed order.
    pub reports: Vec<SimReport>,
    /// Failing seeds, in seed order.
    pub failures: Vec<SimFailure>,
    pub wall: Duration,
}

impl Batch {
    /// Totals, and one line per seed when `per_seed`.
    pub fn summary(&self, per_seed: bool) -> String {
        let mut s = String::new();
        if per_seed {
            for r in &self.reports {
                s.push_str(&format!("{r}\n"));
            }
        }
        let sum =
            |f: fn(&Counts) -> usize| self.reports.iter().map(|r| f(&r.counts)).sum::<usize>();
        let n = self.reports.len().max(1);
        s.push_str(&format!(
            "peer simulation: {} seeds, {} passed, {} failed, wall {:.1}s\n",
            self.reports.len() + self.failures.len(),
            self.reports.len(),
            self.failures.len(),
            self.wall.as_secs_f64()
        ));
        s.push_str(&format!(
            "  totals: {} requests ({} writes, {} linearizable reads checked, {} pushes acknowledged), {} ops in the linearizability check; \
             {} partitions ({} longer than peer_max_idle, {} of them cutting off 2+ peers together), {} crashes ({} power cuts losing unsynced writes, {} during a log write), {} restarts, {} leaves, {} peers added; \
             {} removals of silent members, {} rejoins, {} joins\n",
            sum(|c| c.requests),
            sum(|c| c.writes),
            sum(|c| c.reads_checked),
            sum(|c| c.pushes_acked),
            self.reports.iter().map(|r| r.lin_ops).sum::<usize>(),
            sum(|c| c.partitions),
            sum(|c| c.long_partitions),
            sum(|c| c.long_group_cuts),
            sum(|c| c.crashes),
            sum(|c| c.unsynced_lost),
            sum(|c| c.cut_during_write),
            sum(|c| c.restarts),
            sum(|c| c.leaves),
            sum(|c| c.added),
            sum(|c| c.silence_removals),
            sum(|c| c.rejoins),
            sum(|c| c.joins),
        ));
        let mut jobs = JobCounts::default();
        for r in &self.reports {
            jobs.add(&r.counts.jobs);
        }
        s.push_str(&format!("  jobs (acknowledged delivery): {jobs}\n"));
        s.push_str(&format!(
            "  per seed (avg): {} requests, {} reads checked, {} partitions, {} removals, {} rejoins; heal -> converged max {} ms\n",
            sum(|c| c.requests) / n,
            sum(|c| c.reads_checked) / n,
            sum(|c| c.partitions) / n,
            sum(|c| c.silence_removals) / n,
            sum(|c| c.rejoins) / n,
            self.reports.iter().map(|r| r.counts.converge_ms).max().unwrap_or(0),
        ));
        for f in &self.failures {
            s.push_str(&format!(
                "  FAILED seed {}: {} — {}\n",
                f.seed,
                f.check,
                f.replay_command()
            ));
        }
        s
    }
}

/// Runs `seeds` on `threads` workers (each seed on its own runtime).
pub fn run_batch(
    seeds: &[u64],
    make: &(dyn Fn(u64) -> SimOptions + Sync),
    threads: usize,
) -> Batch {
    let started = Instant::now();
    let mut batch = Batch {
        reports: Vec::new(),
        failures: Vec::new(),
        wall: Duration::ZERO,
    };
    for (_, r) in util::run_seeds(seeds, threads, false, &|seed| run(&make(seed))) {
        match r {
            Ok(rep) => batch.reports.push(rep),
            Err(f) => batch.failures.push(f),
        }
    }
    batch.wall = started.elapsed();
    batch
}
