//! Fault-switch proof: the deterministic simulation (`tests/sim`, shared with the `simulation` integration
//! test) must notice when the engine is made unsafe on purpose. Each test plants one bug in every peer
//! through [`PlantedBugs`] and runs the default seeds until one fails; it asserts that one does, and reports
//! how many seeds it took and what caught the bug (a checker invariant or an engine assertion).

#[path = "../../tests/sim/mod.rs"]
mod sim;

use super::node::PlantedBugs;
use super::RaftNode;

/// The hook that switches on the planted bug `field` in a peer (a plain `fn`, as `assert_caught`
/// takes).
macro_rules! planted {
    ($field:ident) => {
        |node: &mut RaftNode| {
            node.set_planted_bugs(PlantedBugs {
                $field: true,
                ..PlantedBugs::default()
            })
        }
    };
}

/// Runs the default seeds with `hook` on every peer until one fails (all of them with
/// `HAMOK_SIM_FAULT_ALL=1`, to measure the catch rate); panics if none fails.
fn assert_caught(name: &str, hook: fn(&mut RaftNode)) {
    let (seeds, replay) = sim::seeds_from_env();
    let all = std::env::var("HAMOK_SIM_FAULT_ALL").is_ok_and(|v| v != "0");
    let replay_command = format!(
        "HAMOK_SIM_SEED={{seed}} cargo test -p hamok-runtime --lib raft::planted_bug_tests::{name} -- --nocapture"
    );
    let batch = sim::run_batch(
        &seeds,
        &|seed| sim::SimOptions {
            hook: Some(hook),
            replay,
            ..sim::SimOptions::new(seed, &replay_command)
        },
        if replay { 1 } else { sim::threads_from_env() },
        !all,
    );
    let Some((position, first)) = batch.failures.first() else {
        panic!(
            "fault `{name}` went unnoticed over {} seeds:\n{}",
            batch.ran,
            batch.summary(false)
        );
    };
    let mut by_check = std::collections::BTreeMap::new();
    for (_, f) in &batch.failures {
        *by_check.entry(f.caught_by()).or_insert(0usize) += 1;
    }
    println!(
        "fault `{name}`: first caught by seed {} (position {} of {}) — {}; {} of {} seeds run failed ({:.1}s); caught by: {by_check:?}\n{first}",
        first.seed,
        position + 1,
        batch.total,
        first.caught_by(),
        batch.failures.len(),
        batch.ran,
        batch.wall.as_secs_f64(),
    );
}

#[test]
fn simulation_catches_commit_without_quorum() {
    assert_caught(
        "simulation_catches_commit_without_quorum",
        planted!(commit_without_quorum),
    );
}

#[test]
fn simulation_catches_vote_without_log_check() {
    assert_caught(
        "simulation_catches_vote_without_log_check",
        planted!(vote_without_log_check),
    );
}

/// Only the seeds that sync a leader's log in the background (`persist_async`, half of them) can
/// catch it: a leader that counts its unsynced copy commits with one follower fewer than a majority
/// holds, and a power cut that loses the copy loses the write.
#[test]
fn simulation_catches_counting_the_leaders_unsynced_log() {
    assert_caught(
        "simulation_catches_counting_the_leaders_unsynced_log",
        planted!(count_own_log_unsynced),
    );
}

/// With four or more voters, a follower that commits on the leader's copy and its own commits what
/// no majority holds: only seeds with such clusters, a crash or partition at the right time, can show it.
#[test]
fn simulation_catches_a_commit_promise_in_a_cluster_of_more_than_three() {
    assert_caught(
        "simulation_catches_a_commit_promise_in_a_cluster_of_more_than_three",
        planted!(committed_once_held_any_size),
    );
}

/// Only seeds that sync a leader's log in the background can catch it, as for
/// `simulation_catches_counting_the_leaders_unsynced_log`.
#[test]
fn simulation_catches_a_commit_promise_on_the_leaders_unsynced_copy() {
    assert_caught(
        "simulation_catches_a_commit_promise_on_the_leaders_unsynced_copy",
        planted!(committed_once_held_unsynced),
    );
}

/// A follower answers a write on the leader's promise before the leader counts it; a read that
/// begins at the leader's commit index after that answer misses the write.
#[test]
fn simulation_catches_a_read_that_ignores_commit_promises() {
    assert_caught(
        "simulation_catches_a_read_that_ignores_commit_promises",
        planted!(read_ignores_promises),
    );
}
