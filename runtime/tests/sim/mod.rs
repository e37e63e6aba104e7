//! A deterministic simulation of a Raft cluster built on `crate::raft`, with a linearizability checker.
//!
//! The harness is shared by the integration test `tests/simulation.rs` and the engine's unit tests
//! (`src/raft/fault_tests.rs`, which includes this directory with `#[path]`). It names engine items only as
//! `crate::raft::...`: inside the library that is the engine module, and the integration test makes it
//! resolve with `use hamok_runtime::raft;` at its crate root.
//!
//! One run ([`run`]) simulates 3 to 7 peers for one seed with a virtual clock in milliseconds:
//!
//! * a network with loss (up to 30%), duplication, delays with reordering, and symmetric and asymmetric
//!   partitions ([`network`]);
//! * crashes and restarts: a restarted peer keeps only its durable hard state, snapshot and log, and rebuilds
//!   its state machine from them ([`cluster`]); pauses (a peer handles nothing for a while, its messages
//!   queue up: think of a long GC pause or a stalled disk);
//! * membership churn (add a learner under a fresh id, promote it once caught up, remove voters including the
//!   leader, remove learners), leadership transfers, and periodic log compaction, so that lagging and new
//!   peers receive snapshots in several chunks ([`driver`]);
//! * a client workload on a small key-value store ([`kv`]): puts of unique values and compare-and-sets
//!   proposed on a leader, reads through ReadIndex on any peer;
//! * safety invariants checked at every step ([`checks`], [`cluster::Cluster::check_node`]), then, after the
//!   faults heal, liveness bounds (a leader emerges, proposals commit, everyone catches up), and finally the
//!   recorded history is checked for linearizability ([`linearizability`]).
//!
//! Everything is a function of the seed: maps are ordered, there is no wall clock in the logic, and every
//! random choice comes from a seeded stream.
#![allow(dead_code)]

pub mod checks;
pub mod cluster;
pub mod driver;
pub mod kv;
pub mod linearizability;
pub mod network;
pub mod trace;
pub mod util;

use std::cell::RefCell;
use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Once;
use std::time::{Duration, Instant};

use crate::raft::RaftNode;

use cluster::Cluster;
use driver::Liveness;
use network::NetStats;
use trace::Trace;

/// Seeds run by default (override with `HAMOK_SIM_SEEDS=N`; replay one with `HAMOK_SIM_SEED=S`): 4,000 in a
/// release build (about a minute here), 1,000 in the debug profile, where every engine `debug_assert!` is
/// on and the run is part of the everyday `cargo test --workspace`.
pub const DEFAULT_SEEDS: usize = if cfg!(debug_assertions) { 1_000 } else { 4_000 };

/// Trace lines kept in normal runs (the tail goes into failure messages).
const TRACE_LINES: usize = 4_000;
/// Trace lines kept when replaying one seed (printed in full).
const REPLAY_TRACE_LINES: usize = 2_000_000;

/// How to run one seed.
#[derive(Clone, Debug)]
pub struct SimOptions {
    pub seed: u64,
    /// Called on every peer right after it is created or restarted (e.g. to switch on engine faults).
    pub hook: Option<fn(&mut RaftNode)>,
    /// Replay mode: keep a large trace and print it at the end.
    pub replay: bool,
    /// The command that replays a seed; `{seed}` is replaced by the seed.
    pub replay_command: String,
    /// Every peer also keeps its state in a real [`FileLogStore`](crate::store::FileLogStore) (in a
    /// temporary directory) and restarts from what it loads, checked against the model.
    pub file_store: bool,
}

impl SimOptions {
    pub fn new(seed: u64, replay_command: &str) -> SimOptions {
        SimOptions {
            seed,
            hook: None,
            replay: false,
            replay_command: replay_command.to_string(),
            file_store: false,
        }
    }

    pub fn replay_command(&self) -> String {
        self.replay_command
            .replace("{seed}", &self.seed.to_string())
    }
}

/// What one successful run measured.
#[derive(Clone, Debug, Default)]
pub struct SimReport {
    pub seed: u64,
    pub sim_ms: u64,
    pub wall: Duration,
    pub events: u64,
    pub initial_voters: usize,
    pub max_nodes: usize,
    pub writes_ok: usize,
    pub writes_failed: usize,
    pub writes_unknown: usize,
    pub reads_ok: usize,
    pub cas_ok: usize,
    pub lin_ops: usize,
    pub lin_states: usize,
    pub leaders: usize,
    pub final_commit: u64,
    pub crashes: u64,
    pub restarts: u64,
    pub partitions: u64,
    pub transfers: u64,
    pub conf_proposed: u64,
    pub conf_committed: u64,
    pub compactions: u64,
    /// Compactions written into the engine's last snapshot buffer.
    pub snapshot_buffers_reused: u64,
    pub snapshots_installed: u64,
    /// Crashes that lost a leader's unsynced entries (seeds with `persist_async`).
    pub unsynced_lost: u64,
    pub leader_after_heal_ms: u64,
    pub max_commit_latency_ms: u64,
    pub net: NetStats,
}

impl fmt::Display for SimReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "seed {:>5}: {:>5} sim-ms {:>6} events | writes ok {:>4} failed {:>3} unknown {:>2} | reads {:>4} | lin ops {:>4} ({:>6} states) | \
             leaders {:>3} commit {:>5} | crashes {:>2} partitions {:>2} transfers {:>2} conf {:>2}/{:>2} peers {}..{} | compactions {:>3} snapshots installed {:>3} | \
             msgs {} lost {} dup {} | {:.2}s",
            self.seed,
            self.sim_ms,
            self.events,
            self.writes_ok,
            self.writes_failed,
            self.writes_unknown,
            self.reads_ok,
            self.lin_ops,
            self.lin_states,
            self.leaders,
            self.final_commit,
            self.crashes,
            self.partitions,
            self.transfers,
            self.conf_committed,
            self.conf_proposed,
            self.initial_voters,
            self.max_nodes,
            self.compactions,
            self.snapshots_installed,
            self.net.sent,
            self.net.lost,
            self.net.duplicated,
            self.wall.as_secs_f64()
        )
    }
}

/// Why a run failed.
#[derive(Clone, Debug)]
pub struct SimFailure {
    pub seed: u64,
    pub at_ms: u64,
    /// The invariant that broke, or "panic".
    pub invariant: String,
    pub detail: String,
    /// For a panic: where it happened (engine code or harness).
    pub panic_location: Option<String>,
    pub trace_tail: Vec<String>,
    pub replay: String,
}

impl SimFailure {
    /// Who caught it: the harness's checker, or a panic (assertion) in the engine or the harness.
    pub fn caught_by(&self) -> String {
        match &self.panic_location {
            Some(loc) if loc.contains("src/raft/") => format!("engine assertion at {loc}"),
            Some(loc) => format!("panic at {loc}"),
            None if self.invariant == "panic" => "panic".to_string(),
            None => format!("checker: {}", self.invariant),
        }
    }
}

impl fmt::Display for SimFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "simulation seed {} FAILED at {} ms: {} ({})",
            self.seed,
            self.at_ms,
            self.invariant,
            self.caught_by()
        )?;
        writeln!(f, "{}", self.detail)?;
        writeln!(f, "--- last {} trace lines ---", self.trace_tail.len())?;
        for l in &self.trace_tail {
            writeln!(f, "{l}")?;
        }
        write!(f, "replay with: {}", self.replay)
    }
}

thread_local! {
    static LAST_PANIC: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Records the location of panics (so a failure can say whether the engine or the harness panicked), then
/// defers to the previous hook.
fn install_panic_hook() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let loc = info
                .location()
                .map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()));
            LAST_PANIC.with(|p| *p.borrow_mut() = loc);
            previous(info);
        }));
    });
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(non-string panic payload)".to_string()
    }
}

/// Runs one seed. Engine panics are caught and reported as failures.
#[allow(clippy::result_large_err)]
pub fn run(opts: &SimOptions) -> Result<SimReport, SimFailure> {
    install_panic_hook();
    let started = Instant::now();
    let cap = if opts.replay {
        REPLAY_TRACE_LINES
    } else {
        TRACE_LINES
    };
    let (mut cluster, plan) = Cluster::build(opts.seed, opts.hook, Trace::new(cap, true));
    if opts.file_store {
        cluster.file_root = Some(tempfile::tempdir().expect("a temporary directory"));
    }
    let mut live = Liveness::default();
    LAST_PANIC.with(|p| *p.borrow_mut() = None);
    let result = catch_unwind(AssertUnwindSafe(|| cluster.run(&plan, &mut live)));
    if opts.replay {
        println!("===== trace of seed {} =====", opts.seed);
        println!("{}", cluster.trace.dump());
        println!("===== final state =====\n{}", cluster.describe_nodes());
    }
    let fail =
        |invariant: String, detail: String, loc: Option<String>, cluster: &Cluster| SimFailure {
            seed: opts.seed,
            at_ms: cluster.now,
            invariant,
            detail,
            panic_location: loc,
            trace_tail: cluster.trace.tail(80),
            replay: opts.replay_command(),
        };
    match result {
        Ok(Ok(out)) => Ok(SimReport {
            seed: opts.seed,
            sim_ms: cluster.now,
            wall: started.elapsed(),
            events: cluster.stats.events,
            initial_voters: plan.initial_voters,
            max_nodes: cluster.stats.max_nodes,
            writes_ok: out.writes_ok,
            writes_failed: out.writes_failed,
            writes_unknown: out.writes_unknown,
            reads_ok: out.reads_ok,
            cas_ok: out.cas_ok,
            lin_ops: out.lin.ops,
            lin_states: out.lin.states,
            leaders: cluster.registry.leaders.len(),
            final_commit: cluster
                .registry
                .committed
                .keys()
                .next_back()
                .copied()
                .unwrap_or(0),
            crashes: cluster.stats.crashes,
            restarts: cluster.stats.restarts,
            partitions: cluster.stats.partitions,
            transfers: cluster.stats.transfers,
            conf_proposed: cluster.stats.conf_proposed,
            conf_committed: cluster.stats.conf_committed,
            compactions: cluster.stats.compactions,
            snapshot_buffers_reused: cluster.stats.snapshot_buffers_reused,
            snapshots_installed: cluster.stats.snapshots_installed,
            unsynced_lost: cluster.stats.unsynced_lost,
            leader_after_heal_ms: out.leader_after_heal_ms,
            max_commit_latency_ms: out.max_commit_latency_ms,
            net: cluster.network.stats,
        }),
        Ok(Err(v)) => Err(fail(v.invariant.to_string(), v.detail, None, &cluster)),
        Err(payload) => {
            let loc = LAST_PANIC.with(|p| p.borrow_mut().take());
            let msg = panic_message(payload.as_ref());
            let detail = format!(
                "panic: {msg}{}",
                loc.as_ref()
                    .map(|l| format!(" (at {l})"))
                    .unwrap_or_default()
            );
            Err(fail("panic".to_string(), detail, loc, &cluster))
        }
    }
}

/// The seeds to run: `HAMOK_SIM_SEED=S` (replay one), else `HAMOK_SIM_SEEDS` seeds (default
/// [`DEFAULT_SEEDS`]) from `HAMOK_SIM_FIRST_SEED` (default 1). The flag says whether this is a replay.
pub fn seeds_from_env() -> (Vec<u64>, bool) {
    util::seeds_from_env("HAMOK_SIM", DEFAULT_SEEDS)
}

/// Worker threads: `HAMOK_SIM_THREADS`, else the machine's parallelism (at most 8).
pub fn threads_from_env() -> usize {
    util::threads_from_env("HAMOK_SIM")
}

/// The results of running many seeds.
pub struct Batch {
    /// Successful runs, by seed order.
    pub reports: Vec<SimReport>,
    /// Failures with their position (0-based) in the seed list, by position.
    pub failures: Vec<(usize, SimFailure)>,
    /// How many seeds ran.
    pub ran: usize,
    pub total: usize,
    pub wall: Duration,
}

impl Batch {
    /// A summary: totals, averages, and one line per seed.
    pub fn summary(&self, per_seed: bool) -> String {
        let mut s = String::new();
        let n = self.reports.len().max(1);
        let sum = |f: fn(&SimReport) -> usize| self.reports.iter().map(f).sum::<usize>();
        let (w, r, l, ev) = (
            sum(|r| r.writes_ok),
            sum(|r| r.reads_ok),
            sum(|r| r.lin_ops),
            sum(|r| r.events as usize),
        );
        if per_seed {
            for rep in &self.reports {
                s.push_str(&format!("{rep}\n"));
            }
        }
        s.push_str(&format!(
            "simulation: {} of {} seeds run, {} passed, {} failed, wall time {:.1}s\n",
            self.ran,
            self.total,
            self.reports.len(),
            self.failures.len(),
            self.wall.as_secs_f64()
        ));
        s.push_str(&format!(
            "  per passing seed (avg): {} committed writes (proposals) and {} reads checked, {} ops in the linearizability check, {} events, {:.0} simulated ms\n",
            w / n,
            r / n,
            l / n,
            ev / n,
            self.reports.iter().map(|r| r.sim_ms as f64).sum::<f64>() / n as f64
        ));
        s.push_str(&format!(
            "  totals: {w} committed writes, {r} reads, {l} ops checked; {} failed and {} unknown writes; {} crashes, {} partitions, {} transfers, {} membership changes committed, {} compactions ({} into the last snapshot's buffer), {} snapshots installed, {} crashes that lost a leader's unsynced entries\n",
            sum(|r| r.writes_failed),
            sum(|r| r.writes_unknown),
            sum(|r| r.crashes as usize),
            sum(|r| r.partitions as usize),
            sum(|r| r.transfers as usize),
            sum(|r| r.conf_committed as usize),
            sum(|r| r.compactions as usize),
            sum(|r| r.snapshot_buffers_reused as usize),
            sum(|r| r.snapshots_installed as usize),
            sum(|r| r.unsynced_lost as usize),
        ));
        if let Some(min) = self.reports.iter().map(|r| r.writes_ok + r.reads_ok).min() {
            s.push_str(&format!("  fewest ops checked in a seed: {min}\n"));
        }
        for (pos, f) in &self.failures {
            s.push_str(&format!(
                "  FAILED seed {} (position {}): {} [{}] — replay: {}\n",
                f.seed,
                pos + 1,
                f.invariant,
                f.caught_by(),
                f.replay
            ));
        }
        s
    }
}

/// Runs `seeds` on `threads` workers. With `stop_at_first`, no new seed starts once one failed (seeds are
/// taken in order, so every seed before the first failure has run).
pub fn run_batch(
    seeds: &[u64],
    make: &(dyn Fn(u64) -> SimOptions + Sync),
    threads: usize,
    stop_at_first: bool,
) -> Batch {
    let started = Instant::now();
    #[allow(clippy::result_large_err)]
    // a failure carries its trace tail; built once per failing seed
    let results = util::run_seeds(seeds, threads, stop_at_first, &|seed| run(&make(seed)));
    let ran = results.len();
    let mut reports = Vec::new();
    let mut failures = Vec::new();
    for (i, r) in results {
        match r {
            Ok(rep) => reports.push(rep),
            Err(f) => failures.push((i, f)),
        }
    }
    Batch {
        reports,
        failures,
        ran,
        total: seeds.len(),
        wall: started.elapsed(),
    }
}
