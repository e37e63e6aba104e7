//! [`LeaderJob`]: a named job that exactly one peer of the cluster runs at a time.
//!
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use hamok_collections::{register_kinds, HamokCollections, LeaderJob};
//! use hamok_runtime::{Hamok, HamokError};
//!
//! let hamok = register_kinds(Hamok::builder().cluster_id("doc-job")).build().await?;
//! hamok.join().await?;
//! let locks = hamok.get_or_create_lock_table("jobs").await?;
//! let job = LeaderJob::start(&locks, "compaction", |ctx| async move {
//!     // Work until told to stop; every effect carries `ctx.fence()`.
//!     ctx.cancelled().await;
//! });
//! job.wait_running().await;
//! job.stop().await;
//! hamok.close().await;
//! # Ok::<(), hamok_runtime::HamokError>(()) }).unwrap();
//! ```
//!
//! A job is a lock of a [`HamokLock`] table held by the peer that runs it, so it inherits the lock's
//! guarantees: one holder at a time, a fencing token that grows with every run
//! ([`JobContext::fence`], for fenced writes and [`FenceGate`](crate::FenceGate)), and release when the
//! holder leaves the cluster. On each peer:
//!
//! - **Start and stop strictly alternate**: a run's closure has returned before the peer lets go of the
//!   lock and before it campaigns again, so two runs never overlap on one peer, and across peers fencing
//!   covers the moments a cut-off runner has not yet noticed. [`LeaderJob::state`] shows where the peer
//!   stands (`Campaigning → Running → Stopped → Campaigning ...`; a watch: a slow reader may skip states).
//! - **Losing the job cancels the run**: when the lock is lost ([`LockGuard::lost`](crate::LockGuard)),
//!   the context's [`JobContext::cancelled`] fires; the closure must return promptly.
//! - **It campaigns again by itself** after a loss or after the closure returned (no process exit
//!   needed), until [`LeaderJob::stop`], which cancels the run, awaits the closure and resigns, or until
//!   the peer closes. A closure that returns by itself less than [`LeaderJob::SHORT_RUN`] after it
//!   started makes the next campaign wait ([`LeaderJob::SHORT_RUN_PAUSE_MIN`], doubling with every
//!   short run in a row up to [`LeaderJob::SHORT_RUN_PAUSE_MAX`]): a job that fails at once (a
//!   database down, a bad setting) would otherwise take and release its lock as fast as the log
//!   commits, two log entries per turn on every peer.
//! - The closure runs on a task of its own: a panic in it ends that run (logged) like a return.
//!
//! Several named jobs spread over peers as their locks are granted: nothing ties them to the Raft
//! leader. [`leadership`] watches who leads the Raft cluster, for work that must run on the leader.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hamok_runtime::raft::PeerId;
use hamok_runtime::state_machine::Fence;
use hamok_runtime::{Hamok, HamokError};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

use crate::lock::HamokLock;

/// Where a peer's run of a job stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobState {
    /// Waiting for the job's lock.
    Campaigning,
    /// Running the closure under this fencing token.
    Running {
        /// The run's token.
        token: u64,
    },
    /// The run under this token ended (the closure returned), and the lock was let go.
    Stopped {
        /// The run's token.
        token: u64,
    },
    /// [`LeaderJob::stop`] was called: nothing more runs here.
    Finished,
}

/// What a run of a job gets.
#[derive(Clone, Debug)]
pub struct JobContext {
    fence: Fence,
    cancel: CancellationToken,
}

impl JobContext {
    /// The fence of this run (the lock's): give it to fenced writes.
    pub fn fence(&self) -> Fence {
        self.fence.clone()
    }

    /// The run's fencing token.
    pub fn token(&self) -> u64 {
        self.fence.token
    }

    /// Resolves when this peer must stop running the job (it lost the lock, or `stop` was called).
    pub fn cancelled(&self) -> WaitForCancellationFuture<'_> {
        self.cancel.cancelled()
    }

    /// Whether [`JobContext::cancelled`] has fired.
    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }
}

/// Backoff between campaigns after an error (not joined yet, no quorum): bounded so a peer that comes
/// back campaigns again soon.
const RETRY_MAX: Duration = Duration::from_secs(1);

/// A named job this peer campaigns for and runs while it holds the job's lock.
pub struct LeaderJob {
    stop: CancellationToken,
    task: JoinHandle<()>,
    state: watch::Receiver<JobState>,
}

impl std::fmt::Debug for LeaderJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaderJob")
            .field("state", &*self.state.borrow())
            .finish()
    }
}

impl LeaderJob {
    /// A run whose closure returns by itself sooner than this after it started is short: the next
    /// campaign waits (see the module docs).
    pub const SHORT_RUN: Duration = Duration::from_secs(1);
    /// The wait after the first short run in a row.
    pub const SHORT_RUN_PAUSE_MIN: Duration = Duration::from_millis(50);
    /// The longest wait after short runs in a row (each doubles the last).
    pub const SHORT_RUN_PAUSE_MAX: Duration = Duration::from_secs(30);

    /// Campaigns for job `name` on lock table `locks` and runs `job` whenever this peer holds it.
    pub fn start<F, Fut>(locks: &HamokLock, name: &str, job: F) -> LeaderJob
    where
        F: Fn(JobContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let stop = CancellationToken::new();
        let (tx, state) = watch::channel(JobState::Campaigning);
        let task = tokio::spawn(campaign(
            locks.clone(),
            name.to_string(),
            Arc::new(job),
            stop.clone(),
            tx,
        ));
        LeaderJob { stop, task, state }
    }

    /// This peer's state of the job (latest value; a slow reader may skip intermediate states).
    pub fn state(&self) -> watch::Receiver<JobState> {
        self.state.clone()
    }

    /// Whether this peer runs the job now.
    pub fn is_running(&self) -> bool {
        matches!(*self.state.borrow(), JobState::Running { .. })
    }

    /// Waits until this peer runs the job.
    pub async fn wait_running(&self) {
        let mut state = self.state.clone();
        let _ = state
            .wait_for(|s| matches!(s, JobState::Running { .. } | JobState::Finished))
            .await;
    }

    /// Stops campaigning: cancels a run in progress, waits for its closure to return, and lets go of
    /// the lock.
    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

async fn campaign<F, Fut>(
    locks: HamokLock,
    name: String,
    job: Arc<F>,
    stop: CancellationToken,
    state: watch::Sender<JobState>,
) where
    F: Fn(JobContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut backoff = Duration::from_millis(10);
    let mut short_run_pause = LeaderJob::SHORT_RUN_PAUSE_MIN;
    let set = |next: JobState| {
        // A repeated state (campaigning again after a failed attempt) is not a change.
        state.send_if_modified(|s| {
            let changed = *s != next;
            *s = next;
            changed
        });
    };
    loop {
        if locks.is_closed() {
            break;
        }
        set(JobState::Campaigning);
        let guard = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            r = locks.lock(&name) => r,
        };
        let guard = match guard {
            Ok(g) => g,
            Err(HamokError::Closed) => break,
            Err(e) => {
                tracing::debug!("job `{name}`: campaign failed (retrying): {e}");
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(RETRY_MAX);
                continue;
            }
        };
        backoff = Duration::from_millis(10);
        let token = guard.token();
        let cancel = CancellationToken::new();
        let ctx = JobContext {
            fence: guard.fence(),
            cancel: cancel.clone(),
        };
        set(JobState::Running { token });
        let started = tokio::time::Instant::now();
        let mut run = tokio::spawn((job)(ctx));
        // Whether `stop` was called, and whether the closure returned by itself.
        let (stopping, returned) = tokio::select! {
            biased;
            _ = stop.cancelled() => (true, false),
            _ = guard.lost() => (false, false),
            r = &mut run => {
                if let Err(e) = r {
                    tracing::warn!("job `{name}`: run {token} failed: {e}");
                }
                (false, true)
            }
        };
        // Resign only once the closure has returned.
        cancel.cancel();
        if !run.is_finished() {
            if let Err(e) = (&mut run).await {
                tracing::warn!("job `{name}`: run {token} failed: {e}");
            }
        }
        let _ = guard.unlock().await;
        set(JobState::Stopped { token });
        if stopping {
            break;
        }
        if returned && started.elapsed() < LeaderJob::SHORT_RUN {
            tracing::debug!(
                "job `{name}`: run {token} returned after {:?}; campaigning again in {short_run_pause:?}",
                started.elapsed()
            );
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(short_run_pause) => {}
            }
            short_run_pause = (short_run_pause * 2).min(LeaderJob::SHORT_RUN_PAUSE_MAX);
        } else {
            short_run_pause = LeaderJob::SHORT_RUN_PAUSE_MIN;
        }
    }
    set(JobState::Finished);
}

/// A watch of who leads this peer's Raft cluster (`None` while nobody does, as far as it knows). The
/// watch ends (its sender is dropped) when the peer closes.
pub fn leadership(hamok: &Hamok) -> watch::Receiver<Option<PeerId>> {
    let mut status = hamok.status_watch();
    let (tx, rx) = watch::channel(status.borrow().raft.leader.clone());
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tx.closed() => return,
                changed = status.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
            }
            let leader = status.borrow_and_update().raft.leader.clone();
            tx.send_if_modified(|old| {
                let changed = *old != leader;
                *old = leader;
                changed
            });
        }
    });
    rx
}
