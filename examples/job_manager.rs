//! Job manager (the reference's `redis-job-manager` story, in process): five replicas share a map of
//! jobs. Whichever replica leads assigns pending jobs to the least loaded member with compare-and-set;
//! each replica runs the jobs assigned to it, moving them Assigned -> Running -> Done with
//! compare-and-set too. One replica stops working and leaves: once the cluster has removed it, the
//! leader re-assigns its unfinished jobs to the others.
//!
//! ```text
//! cargo run --example job_manager
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use hamok::prelude::*;
use hamok::runtime::transport::memory::InProcessHub;
use serde::{Deserialize, Serialize};

#[path = "common/mod.rs"]
mod common;

const JOBS: usize = 30;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum State {
    Pending,
    Assigned,
    Running,
    Done,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Job {
    owner: Option<String>,
    state: State,
}

type Jobs = HamokMap<String, Job>;

/// The leader's duty: assign pending jobs, and give back the jobs of replicas that are gone.
async fn assign(hamok: &Hamok, jobs: &Jobs) -> Result<(), HamokError> {
    if !hamok.is_leader() {
        return Ok(());
    }
    let mut members: BTreeSet<String> = hamok
        .remote_peer_ids()
        .iter()
        .map(|p| p.to_string())
        .collect();
    members.insert(hamok.local_peer_id().to_string());
    let entries = jobs.entries()?;
    let mut load: BTreeMap<String, usize> = members.iter().map(|m| (m.clone(), 0)).collect();
    for (_, job) in &entries {
        if let (Some(owner), State::Assigned | State::Running) = (&job.owner, &job.state) {
            if let Some(n) = load.get_mut(owner) {
                *n += 1;
            }
        }
    }
    for (id, job) in entries {
        match (&job.owner, &job.state) {
            (Some(owner), State::Assigned | State::Running) if !members.contains(owner) => {
                let back = Job {
                    owner: None,
                    state: State::Pending,
                };
                if jobs.update_if(id.clone(), back, job.clone()).await? {
                    println!(
                        "leader {}: {owner} is gone, {id} is pending again",
                        hamok.local_peer_id()
                    );
                }
            }
            (None, State::Pending) => {
                let Some((least, _)) = load.iter().min_by_key(|(m, n)| (**n, (*m).clone())) else {
                    continue;
                };
                let least = least.clone();
                let assigned = Job {
                    owner: Some(least.clone()),
                    state: State::Assigned,
                };
                if jobs.update_if(id, assigned, job).await? {
                    *load.entry(least).or_default() += 1;
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// Every replica's duty: run the jobs assigned to it. Returns the jobs it finished.
async fn work(hamok: &Hamok, jobs: &Jobs) -> Result<Vec<String>, HamokError> {
    let me = hamok.local_peer_id().to_string();
    let mut finished = Vec::new();
    for (id, job) in jobs.entries()? {
        if job.owner.as_deref() != Some(me.as_str()) {
            continue;
        }
        match job.state {
            State::Assigned => {
                let running = Job {
                    state: State::Running,
                    ..job.clone()
                };
                if jobs.update_if(id.clone(), running.clone(), job).await? {
                    tokio::time::sleep(Duration::from_millis(10)).await; // the work
                    let done = Job {
                        state: State::Done,
                        ..running.clone()
                    };
                    if jobs.update_if(id.clone(), done, running).await? {
                        finished.push(id);
                    }
                }
            }
            State::Pending | State::Running | State::Done => {}
        }
    }
    Ok(finished)
}

#[tokio::main]
async fn main() -> Result<(), HamokError> {
    let hub = InProcessHub::new();
    let peers = common::start_replicas(
        &hub,
        "job-manager",
        (0..5).map(|i| format!("replica-{i}")),
        |b| b,
    )
    .await?;
    peers[0].wait_until_leader(Duration::from_secs(5)).await?;
    let leader = peers.iter().position(|p| p.is_leader()).expect("a leader");
    // The replica that will stop working and leave: any follower.
    let quitter = (leader + 1) % peers.len();
    println!(
        "leader: {}, the replica that will leave: {}",
        peers[leader].local_peer_id(),
        peers[quitter].local_peer_id()
    );

    let jobs = peers[0].get_or_create_map::<String, Job>("jobs").await?;
    jobs.set_all((0..JOBS).map(|i| {
        (
            format!("job-{i:02}"),
            Job {
                owner: None,
                state: State::Pending,
            },
        )
    }))
    .await?;

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut tasks = Vec::new();
    for (i, p) in peers.iter().enumerate() {
        let (p, mut stop) = (p.clone(), stop_rx.clone());
        let jobs = p.get_or_create_map::<String, Job>("jobs").await?;
        let works = i != quitter; // the quitter takes jobs but never runs them
        tasks.push(tokio::spawn(async move {
            let mut finished = Vec::new();
            while !*stop.borrow_and_update() {
                // A replica that is leaving or gone gets errors: it just stops.
                if assign(&p, &jobs).await.is_err() {
                    break;
                }
                if works {
                    match work(&p, &jobs).await {
                        Ok(done) => finished.extend(done),
                        Err(_) => break,
                    }
                }
                let _ = tokio::time::timeout(Duration::from_millis(20), stop.changed()).await;
            }
            (p.local_peer_id().to_string(), finished)
        }));
    }

    // Once the quitter holds jobs, it leaves the cluster (the others see it removed through the log).
    let quitter_id = peers[quitter].local_peer_id().to_string();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !jobs
        .values()?
        .iter()
        .any(|j| j.owner.as_deref() == Some(quitter_id.as_str()))
    {
        assert!(Instant::now() < deadline, "the quitter never got a job");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!("{quitter_id} holds jobs and leaves");
    peers[quitter].leave().await?;

    // Wait until every job is done.
    let observer = &peers[leader];
    let view = observer.get_or_create_map::<String, Job>("jobs").await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        view.sync().await?;
        let done = view
            .values()?
            .iter()
            .filter(|j| j.state == State::Done)
            .count();
        if done == JOBS {
            break;
        }
        assert!(Instant::now() < deadline, "only {done} of {JOBS} jobs done");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = stop_tx.send(true);
    let mut total = 0;
    for t in tasks {
        let (peer, finished) = t.await.expect("replica task");
        println!("{peer} finished {} jobs", finished.len());
        assert!(peer != quitter_id || finished.is_empty());
        total += finished.len();
    }
    assert_eq!(total, JOBS, "every job done exactly once");
    for p in &peers {
        p.close().await;
    }
    Ok(())
}
