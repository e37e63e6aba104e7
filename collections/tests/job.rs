//! Leader-only jobs: one runner at a time (as fenced effects show), runs that start and end alternately
//! on every peer, failover when the runner is cut off, and `stop` that awaits the closure and resigns.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use hamok_collections::*;
use hamok_runtime::HamokError;
use hamok_testkit::wait::eventually;

/// Every run's start and end: (peer, token, "start" | "end").
type Runs = Arc<Mutex<Vec<(String, u64, &'static str)>>>;

/// Each run pushes its token to the fenced queue every few milliseconds until cancelled, and records
/// its start and end on the shared log.
fn start_job(locks: &HamokLock, queue: HamokQueue<u64>, runs: Runs, peer: String) -> LeaderJob {
    LeaderJob::start(locks, "j", move |ctx| {
        let queue = queue.fenced(ctx.fence());
        let runs = runs.clone();
        let peer = peer.clone();
        async move {
            runs.lock()
                .unwrap()
                .push((peer.clone(), ctx.token(), "start"));
            while !ctx.is_cancelled() {
                match queue.push_one(ctx.token()).await {
                    Ok(_) | Err(HamokError::StaleFence { .. }) => {}
                    Err(_) => {}
                }
                tokio::select! {
                    _ = ctx.cancelled() => {}
                    _ = tokio::time::sleep(Duration::from_millis(5)) => {}
                }
            }
            runs.lock().unwrap().push((peer, ctx.token(), "end"));
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_runner_at_a_time_with_failover_and_stop() {
    let c = Cluster::start("job", 3).await;
    let runs: Runs = Arc::default();
    let mut jobs = Vec::new();
    let mut states = Vec::new();
    let mut recorders = Vec::new();
    for p in &c.peers {
        let locks = p.get_or_create_lock_table("jobs").await.unwrap();
        let queue = p.get_or_create_queue::<u64>("effects").await.unwrap();
        let job = start_job(&locks, queue, runs.clone(), p.local_peer_id().to_string());
        // Every state each peer goes through, in order.
        let mut rx = job.state();
        let seen: Arc<Mutex<Vec<JobState>>> =
            Arc::new(Mutex::new(vec![rx.borrow_and_update().clone()]));
        let rec = seen.clone();
        recorders.push(tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                rec.lock().unwrap().push(rx.borrow_and_update().clone());
            }
        }));
        states.push(seen);
        jobs.push(Some(job));
    }
    let running = |jobs: &Vec<Option<LeaderJob>>| {
        jobs.iter()
            .enumerate()
            .filter(|(_, j)| j.as_ref().is_some_and(|j| j.is_running()))
            .map(|(i, _)| i)
            .collect::<Vec<_>>()
    };
    let first = eventually("a runner", WAIT, || {
        let r = running(&jobs);
        async move { (r.len() == 1).then(|| r[0]) }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;

    // The runner is cut off: it stops (cancelled) and another peer takes over.
    c.hub.isolate(c.peers[first].local_peer_id());
    let second = eventually("failover", WAIT, || {
        let r = running(&jobs);
        async move { r.iter().copied().find(|i| *i != first) }
    })
    .await;
    eventually("the cut-off runner stopped", WAIT, || {
        let stopped = !jobs[first].as_ref().unwrap().is_running();
        async move { stopped.then_some(()) }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    c.hub.heal();

    // `stop` on the runner: its closure ends and a third peer (or the healed one) takes over.
    jobs[second].take().unwrap().stop().await;
    eventually("another runner after stop", WAIT, || {
        let r = running(&jobs);
        async move { r.iter().copied().find(|i| *i != second) }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    for job in jobs.iter_mut() {
        if let Some(job) = job.take() {
            job.stop().await;
        }
    }

    // Fenced effects, in log order: tokens never go down (no write of an older run after a newer's).
    let queue = c.peers[second]
        .get_or_create_queue::<u64>("effects")
        .await
        .unwrap();
    queue.sync().await.unwrap();
    let effects: Vec<u64> = queue.iter().collect();
    assert!(!effects.is_empty());
    assert!(
        effects.windows(2).all(|w| w[0] <= w[1]),
        "a run's effect landed after a newer run's: {effects:?}"
    );
    // Every run ended (its closure returned), and runs on one peer never overlap.
    let runs = runs.lock().unwrap().clone();
    let tokens: Vec<u64> = runs
        .iter()
        .filter(|r| r.2 == "start")
        .map(|r| r.1)
        .collect();
    assert!(tokens.len() >= 3, "{runs:?}");
    for t in &tokens {
        assert!(
            runs.iter().any(|r| r.1 == *t && r.2 == "end"),
            "run {t} never ended: {runs:?}"
        );
    }
    // Start and stop alternate on every peer: each start is followed by its own end before the next.
    for p in &c.peers {
        let id = p.local_peer_id().to_string();
        let mine: Vec<(u64, &str)> = runs
            .iter()
            .filter(|r| r.0 == id)
            .map(|r| (r.1, r.2))
            .collect();
        for pair in mine.chunks(2) {
            assert!(
                matches!(pair, [(a, "start"), (b, "end")] if a == b),
                "peer {id}: runs do not alternate: {mine:?}"
            );
        }
    }
    // Every peer's job ended stopped. A recorder ends once it has seen its job's last state (the
    // job's task, which sends them, ended with `stop`): read the records only then.
    for recorder in recorders {
        tokio::time::timeout(WAIT, recorder)
            .await
            .expect("a recorder ends once its job stopped")
            .unwrap();
    }
    for (i, seen) in states.iter().enumerate() {
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen.last(), Some(&JobState::Finished), "peer {i}: {seen:?}");
    }
    c.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leadership_watch_follows_the_raft_leader() {
    let c = Cluster::start("leadership", 3).await;
    let mut watch = leadership(&c.peers[c.follower()]);
    let leader = c.peers[c.leader()].local_peer_id().clone();
    assert_eq!(watch.borrow_and_update().clone(), Some(leader.clone()));
    c.peers[c.leader()].close().await;
    let new = eventually("a new leader in the watch", WAIT, || {
        let now = watch.borrow_and_update().clone();
        let old = leader.clone();
        async move { now.filter(|l| *l != old) }
    })
    .await;
    assert_ne!(new, leader);
    c.close().await;
}

/// A closure that returns at once does not spin on its lock: each short run in a row makes the next
/// campaign wait twice as long as the last, from `SHORT_RUN_PAUSE_MIN`. (Only lower bounds on the
/// gaps are checked: a sleep is never shorter than asked.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_returns_at_once_backs_off_between_runs() {
    let c = Cluster::start("job-short-runs", 1).await;
    let locks = c.peers[0].get_or_create_lock_table("jobs").await.unwrap();
    let starts: Arc<Mutex<Vec<(u64, tokio::time::Instant)>>> = Arc::default();
    let rec = starts.clone();
    let job = LeaderJob::start(&locks, "fails-at-once", move |ctx| {
        rec.lock()
            .unwrap()
            .push((ctx.token(), tokio::time::Instant::now()));
        async {}
    });
    const RUNS: usize = 5;
    eventually("five runs", WAIT, || {
        let n = starts.lock().unwrap().len();
        async move { (n >= RUNS).then_some(()) }
    })
    .await;
    job.stop().await;
    let starts = starts.lock().unwrap().clone();
    let mut pause = LeaderJob::SHORT_RUN_PAUSE_MIN;
    for pair in starts.windows(2).take(RUNS - 1) {
        let ((t0, at0), (t1, at1)) = (pair[0], pair[1]);
        assert!(t1 > t0, "every run holds a newer grant: {starts:?}");
        assert!(
            at1 - at0 >= pause,
            "runs {t0} and {t1} {:?} apart, less than the pause {pause:?}",
            at1 - at0
        );
        pause *= 2;
    }
    c.close().await;
}
