//! The seeded simulation of whole peers (see `hamok_testkit::sim`): the default seeds, replay of one
//! seed, determinism, the planted runtime bugs each check must catch, and a wrong queue consumer the
//! acknowledged-delivery check must catch.
//!
//! Run with `-- --nocapture` to see the per-seed figures.

use hamok_runtime::testing::PlantedBugs;
use hamok_testkit::sim::jobs::{self, Consumer};
use hamok_testkit::sim::{self, SimOptions};

#[test]
fn peer_simulation_random_seeds() {
    let (seeds, replay) = sim::seeds_from_env();
    let threads = if replay { 1 } else { sim::threads_from_env() };
    let batch = sim::run_batch(
        &seeds,
        &|seed| SimOptions {
            replay,
            paused_holders: true,
            ..SimOptions::new(seed)
        },
        threads,
    );
    println!("{}", batch.summary(seeds.len() <= 200));
    if let Some(first) = batch.failures.first() {
        let failed: Vec<String> = batch.failures.iter().map(|f| f.seed.to_string()).collect();
        panic!(
            "{} of {} seeds failed (seeds {}).\nFirst failure:\n{first}",
            batch.failures.len(),
            seeds.len(),
            failed.join(", ")
        );
    }
}

/// Seeds that once exposed a runtime bug, run on every test run: 1 (a forward bounced between two
/// peers that each took the other for the leader: a message storm), 11 (a peer that left wiped its log
/// and, rejoining, voted a removed peer with a stale log into leadership, which overwrote committed
/// entries), 23 (a rejoined peer's writes went to a fresh in-memory store instead of its own; restarted,
/// it had lost acknowledged entries, and the leader probed above them forever), 617 (a new leader
/// removed members as silent on what it had heard as a follower), 639 (a pristine peer that had met the
/// cluster, cut off when joining again, founded a second cluster under the same id), 426 and 631 (a
/// peer left by timeout while the leader's log held its removal; a power cut took the removal from
/// the leader, the peer's longer log refused the last voter its vote, and outside its latest
/// configuration the peer would not campaign: no leader ever again).
const REGRESSION_SEEDS: &[u64] = &[1, 11, 23, 426, 617, 631, 639];

#[test]
fn peer_simulation_regression_seeds() {
    let batch = sim::run_batch(REGRESSION_SEEDS, &SimOptions::new, sim::threads_from_env());
    println!("{}", batch.summary(true));
    let failed: Vec<String> = batch.failures.iter().map(|f| f.to_string()).collect();
    assert!(
        failed.is_empty(),
        "regression seeds failed:\n{}",
        failed.join("\n")
    );
}

/// Seeds with crashes and power cuts four times as frequent (the fault mix the durable planted bugs
/// are caught with; in the even seeds every crash a power cut in the middle of the leader's write,
/// as for `counts_unwritten_copy`), and paused lock holders: without a planted bug, every check
/// holds.
#[test]
fn peer_simulation_crash_heavy_seeds() {
    let seeds: Vec<u64> = (1..=CRASH_HEAVY_SEEDS).collect();
    let batch = sim::run_batch(
        &seeds,
        &|seed| SimOptions {
            crash_heavy: true,
            leader_write_cuts: seed % 2 == 0,
            paused_holders: true,
            ..SimOptions::new(seed)
        },
        sim::threads_from_env(),
    );
    println!("{}", batch.summary(false));
    let failed: Vec<String> = batch.failures.iter().map(|f| f.to_string()).collect();
    assert!(
        failed.is_empty(),
        "crash-heavy seeds failed:\n{}",
        failed.join("\n")
    );
}

/// How many seeds [`peer_simulation_crash_heavy_seeds`] runs.
const CRASH_HEAVY_SEEDS: u64 = 32;

/// A seed is an exact function of its number: two runs give the same trace.
#[test]
fn same_seed_same_trace() {
    for seed in [3, 17] {
        let a = sim::run(&SimOptions::new(seed)).expect("first run");
        let b = sim::run(&SimOptions::new(seed)).expect("second run");
        assert_eq!(
            a.trace_digest, b.trace_digest,
            "seed {seed} is not reproducible"
        );
        assert_eq!(a.counts.requests, b.counts.requests);
    }
}

/// Runs seeds from 1 with the options `make` gives until one fails; returns the failures (at most
/// `max` seeds).
fn catches(make: &(dyn Fn(u64) -> SimOptions + Sync), max: u64) -> Vec<sim::SimFailure> {
    let threads = sim::threads_from_env();
    let mut failures = Vec::new();
    let mut next = 1;
    while next <= max && failures.is_empty() {
        let seeds: Vec<u64> = (next..(next + threads as u64 * 4).min(max + 1)).collect();
        next += seeds.len() as u64;
        let batch = sim::run_batch(&seeds, make, threads);
        failures.extend(batch.failures);
    }
    failures
}

fn assert_caught(name: &str, bugs: PlantedBugs, expected: &[&str]) {
    assert_caught_with(
        name,
        &|seed| SimOptions {
            bugs,
            ..SimOptions::new(seed)
        },
        expected,
    );
}

/// Runs seeds from 1 with the planted bug on (in the options `make` gives) until one fails, at most
/// 200; one of the failures must be by a check of `expected`.
fn assert_caught_with(name: &str, make: &(dyn Fn(u64) -> SimOptions + Sync), expected: &[&str]) {
    let failures = catches(make, 200);
    let first = failures
        .first()
        .unwrap_or_else(|| panic!("planted bug `{name}` went unnoticed in 200 seeds"));
    println!(
        "planted bug `{name}` caught by seed {} ({}): {}",
        first.seed,
        first.check,
        first.detail.lines().next().unwrap_or("")
    );
    assert!(
        failures
            .iter()
            .any(|f| expected.contains(&f.check.as_str())),
        "planted bug `{name}` was caught, but not by {expected:?}: {first}"
    );
}

/// The bug of issue 10: a read that cannot get a read index answers from local state.
#[test]
fn planted_read_from_local_state_is_caught() {
    assert_caught(
        "read_falls_back_to_local",
        PlantedBugs {
            read_falls_back_to_local: true,
            ..PlantedBugs::default()
        },
        &["linearizability"],
    );
}

/// Every peer that heard no member founds a cluster, not only the lowest id.
#[test]
fn planted_bootstrap_without_the_lowest_id_rule_is_caught() {
    assert_caught(
        "bootstrap_ignores_lowest_id",
        PlantedBugs {
            bootstrap_ignores_lowest_id: true,
            ..PlantedBugs::default()
        },
        &["election safety", "rejoin bound"],
    );
}

/// The other bug of issue 10: any higher-term message refreshes the idle timer.
#[test]
fn planted_idle_timer_refreshed_by_any_higher_term_is_caught() {
    assert_caught(
        "idle_timer_refreshed_by_any_higher_term",
        PlantedBugs {
            idle_timer_refreshed_by_any_higher_term: true,
            ..PlantedBugs::default()
        },
        &["rejoin bound"],
    );
}

/// Fenced writes applied without checking the lock's current token: a paused holder's write under
/// its released fence is accepted (or lands after the next holder's).
#[test]
fn planted_fence_not_checked_is_caught() {
    assert_caught_with(
        "fence_not_checked",
        &|seed| SimOptions {
            bugs: PlantedBugs {
                fence_not_checked: true,
                ..PlantedBugs::default()
            },
            paused_holders: true,
            ..SimOptions::new(seed)
        },
        &["fences"],
    );
}

/// A wrong consumer of the queue `jobs`: it pops (at most once) and then abandons the item, as if a
/// lease would bring it back. The acknowledged-delivery check must report the items it lost.
#[test]
fn pop_and_abandon_consumer_is_caught() {
    let seeds: Vec<u64> = (1..=4).collect();
    let batch = sim::run_batch(
        &seeds,
        &|seed| SimOptions {
            consumer: Consumer::PopAndAbandon,
            ..SimOptions::new(seed)
        },
        sim::threads_from_env(),
    );
    let caught: Vec<&sim::SimFailure> = batch
        .failures
        .iter()
        .filter(|f| f.check == jobs::NOTHING_LOST)
        .collect();
    let first = caught.first().unwrap_or_else(|| {
        panic!(
            "a consumer that pops and abandons went unnoticed in seeds {seeds:?}:\n{}",
            batch.summary(true)
        )
    });
    println!(
        "pop-and-abandon consumer caught by {} of {} seeds, first seed {}: {}",
        caught.len(),
        seeds.len(),
        first.seed,
        first.detail.lines().next().unwrap_or("")
    );
}

/// A leader that counts its own log write durable when its background sync starts, not when it
/// returns: a power cut then loses an entry that only the leader and too few followers held, which
/// the cluster had committed and a client was told of. Under the usual fault mix 3 seeds of the
/// first 400 catch it (126, 151, 381); with crashes four times as frequent, 5 of the first 100.
#[test]
fn planted_report_of_unsynced_writes_is_caught() {
    assert_caught_with(
        "report_unsynced_writes",
        &|seed| SimOptions {
            bugs: PlantedBugs {
                report_unsynced_writes: true,
                ..PlantedBugs::default()
            },
            crash_heavy: true,
            ..SimOptions::new(seed)
        },
        &["linearizability", "no acknowledged write lost"],
    );
}

/// A durable leader that counts its own log copy before writing it: its append, sent before its own
/// write, promises a follower a commit of entries that a power cut in the middle of that write takes
/// from the leader (and from the follower that had not written them yet), after the follower that
/// had answered a client. Under the usual fault mix 2 seeds of the first 1,000 fail (39, 385); with
/// every crash such a power cut (`leader_write_cuts`) and crashes four times as frequent, 27 of
/// 1,000, the first at seed 42. The same mix without the bug passed 1,000 seeds (2026-12-03).
#[test]
fn planted_count_of_an_unwritten_copy_is_caught() {
    assert_caught_with(
        "counts_unwritten_copy",
        &|seed| SimOptions {
            bugs: PlantedBugs {
                counts_unwritten_copy: true,
                ..PlantedBugs::default()
            },
            crash_heavy: true,
            leader_write_cuts: true,
            ..SimOptions::new(seed)
        },
        &[
            "linearizability",
            "no acknowledged write lost",
            jobs::NOTHING_LOST,
        ],
    );
}
