//! The background `fdatasync` of a [`FileLogStore`](super::FileLogStore): one thread per store, started
//! on first use, that syncs the log's open chunk while the peer goes on. A leader uses it for its own
//! log writes, which may become durable after its messages leave (`RaftConfig::persist_async`).
//!
//! Jobs queue in order. The thread takes every job queued, syncs the newest one's file once (every
//! earlier write is in that file, or in a chunk synced when it was closed), then reports each job's
//! outcome, in order. A failed sync is final: every later job fails, and so does every inline sync of
//! the store, which first waits for this thread to be idle. (A failed `fdatasync` is reported once
//! per open file description: an inline sync on a duplicate of the same description could succeed
//! after this thread's failed, and hide it.)

use std::fs::File;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use crate::error::Cause;
use crate::store::{StorageError, SyncDone};

/// Most jobs waiting for the thread. Past it the caller syncs inline (which waits for the thread):
/// backpressure on a disk slower than the peer's writes, and a bound on the files held open.
pub(super) const MAX_QUEUED_SYNCS: usize = 1024;

struct State {
    /// A duplicate of the open chunk's descriptor, the sequence number of the last write it holds,
    /// and who waits for the outcome.
    jobs: Vec<(File, u64, SyncDone)>,
    /// A sync is running (its jobs are out of `jobs`).
    busy: bool,
    /// The first failed sync: every later one fails with it.
    failed: Option<StorageError>,
    /// The store is closing: the thread finishes the jobs queued, then ends.
    closed: bool,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
    /// Where, for error messages.
    context: String,
    /// The log's highest write sequence number synced (`Wal::synced_writes`): raised after each
    /// sync that returns, before its jobs are told.
    synced: Arc<AtomicU64>,
    /// Fault injection (`testing` feature): while set, every sync fails.
    #[cfg(any(test, feature = "testing"))]
    fail: Option<Arc<std::sync::atomic::AtomicBool>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock can only come from a `done` callback, which runs unlocked;
        // the state stays consistent either way.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn sync(&self, file: &File) -> Result<(), StorageError> {
        #[cfg(any(test, feature = "testing"))]
        if self
            .fail
            .as_ref()
            .is_some_and(|f| f.load(std::sync::atomic::Ordering::SeqCst))
        {
            return Err(StorageError::Io {
                context: format!(
                    "fdatasync in {} (injected, in the background)",
                    self.context
                ),
                source: None,
            });
        }
        file.sync_data().map_err(|e| StorageError::Io {
            context: format!("fdatasync in {} (in the background)", self.context),
            source: Some(Cause::new(e)),
        })
    }
}

/// The sync thread of one store. Dropping it finishes the queued jobs and joins the thread.
pub(super) struct Syncer {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Syncer {
    /// Starts the thread.
    pub(super) fn start(
        context: String,
        synced: Arc<AtomicU64>,
        #[cfg(any(test, feature = "testing"))] fail: Option<Arc<std::sync::atomic::AtomicBool>>,
    ) -> Result<Syncer, StorageError> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                jobs: Vec::new(),
                busy: false,
                failed: None,
                closed: false,
            }),
            changed: Condvar::new(),
            context,
            synced,
            #[cfg(any(test, feature = "testing"))]
            fail,
        });
        let thread = std::thread::Builder::new()
            .name("hamok-fsync".into())
            .spawn({
                let shared = shared.clone();
                move || run(&shared)
            })
            .map_err(|e| StorageError::Io {
                context: format!("start the sync thread of {}", shared.context),
                source: Some(Cause::new(e)),
            })?;
        Ok(Syncer {
            shared,
            thread: Some(thread),
        })
    }

    /// Whether another job fits in the queue.
    pub(super) fn has_room(&self) -> bool {
        self.shared.lock().jobs.len() < MAX_QUEUED_SYNCS
    }

    /// Queues a sync of `file` (a duplicate of the open chunk's descriptor, holding the log's writes up
    /// to sequence number `seq`); `done` gets its outcome. Fails at once if an earlier sync failed.
    pub(super) fn submit(&self, file: File, seq: u64, done: SyncDone) -> Result<(), StorageError> {
        let mut state = self.shared.lock();
        if let Some(e) = &state.failed {
            return Err(e.clone());
        }
        debug_assert!(state.jobs.len() < MAX_QUEUED_SYNCS, "checked by has_room");
        state.jobs.push((file, seq, done));
        self.shared.changed.notify_all();
        Ok(())
    }

    /// Waits until no job is queued or running; then the first failure, if any.
    pub(super) fn wait_idle(&self) -> Result<(), StorageError> {
        let mut state = self.shared.lock();
        while state.busy || !state.jobs.is_empty() {
            state = self
                .shared
                .changed
                .wait(state)
                .unwrap_or_else(|e| e.into_inner());
        }
        state.failed.clone().map_or(Ok(()), Err)
    }

    /// The first failed sync, if any.
    pub(super) fn failed(&self) -> Option<StorageError> {
        self.shared.lock().failed.clone()
    }
}

impl Drop for Syncer {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.changed.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn run(shared: &Shared) {
    loop {
        let (jobs, failed) = {
            let mut state = shared.lock();
            while state.jobs.is_empty() && !state.closed {
                state = shared
                    .changed
                    .wait(state)
                    .unwrap_or_else(|e| e.into_inner());
            }
            if state.jobs.is_empty() {
                return; // closed, nothing left
            }
            state.busy = true;
            (std::mem::take(&mut state.jobs), state.failed.clone())
        };
        let result = match (failed, jobs.last()) {
            (Some(e), _) => Err(e),
            (None, Some((file, seq, _))) => shared.sync(file).map(|()| {
                shared.synced.fetch_max(*seq, Ordering::AcqRel);
            }),
            (None, None) => Ok(()),
        };
        {
            let mut state = shared.lock();
            state.busy = false;
            if let Err(e) = &result {
                state.failed.get_or_insert_with(|| e.clone());
            }
            shared.changed.notify_all();
        }
        for (_, _, done) in jobs {
            done(result.clone());
        }
    }
}
