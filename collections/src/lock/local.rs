//! What the handles of one lock table on one peer share: the calls waiting for a grant, the guards
//! this peer holds (whose `lost()` fires when the apply path releases them), and the release of grants
//! nobody here waits for any more.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::Duration;

use hamok_runtime::raft::PeerId;
use hamok_runtime::{Hamok, HamokError};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use super::machine::{LockCmd, Notes};
use crate::common::{encode, Envelope};

/// How a waiting `lock` call learns its fate from the apply path.
pub(crate) enum WaitOutcome {
    /// Granted under this token.
    Granted(u64),
    /// Dropped from the queue: this peer is no longer a member.
    Dropped,
}

/// Most attempts at submitting a release or a cancel that a dropped guard or wait leaves behind; after
/// them the membership lease still frees the lock if this peer goes away.
const CLEANUP_ATTEMPTS: u32 = 8;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

pub(crate) struct LockExtra {
    id: String,
    /// This peer and its handle, set when the first handle opens (before any command of it).
    peer: OnceLock<(PeerId, Hamok)>,
    /// Calls waiting for a grant, by owner.
    waiting: Mutex<HashMap<u64, oneshot::Sender<WaitOutcome>>>,
    /// Guards held here, by token: cancelled when the apply path releases the grant.
    held: Mutex<HashMap<u64, CancellationToken>>,
    next_owner: AtomicU64,
}

impl LockExtra {
    pub(crate) fn new(id: &str) -> Self {
        // Owners start at a random point, so a restarted process's calls never match its old ones.
        let start = RandomState::new().build_hasher().finish() >> 1;
        LockExtra {
            id: id.to_string(),
            peer: OnceLock::new(),
            waiting: Mutex::new(HashMap::new()),
            held: Mutex::new(HashMap::new()),
            next_owner: AtomicU64::new(start),
        }
    }

    pub(crate) fn bind(&self, hamok: &Hamok) {
        let _ = self
            .peer
            .set((hamok.local_peer_id().clone(), hamok.clone()));
    }

    /// A fresh owner id for one `lock` call, registered as waiting.
    pub(crate) fn wait(&self) -> (u64, oneshot::Receiver<WaitOutcome>) {
        let owner = self.next_owner.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        lock(&self.waiting).insert(owner, tx);
        (owner, rx)
    }

    pub(crate) fn stop_waiting(&self, owner: u64) {
        lock(&self.waiting).remove(&owner);
    }

    /// A guard for `token` now exists here: its token fires when the grant is released.
    pub(crate) fn hold(&self, token: u64) -> CancellationToken {
        lock(&self.held).entry(token).or_default().clone()
    }

    pub(crate) fn unhold(&self, token: u64) {
        lock(&self.held).remove(&token);
    }

    /// Runs inside the node's apply: never blocks, never awaits.
    pub(crate) fn on_applied(&self, notes: &Notes) {
        let Some((me, hamok)) = self.peer.get() else {
            return;
        };
        for (name, grant) in notes.granted.iter().filter(|(_, g)| &g.peer == me) {
            let waiter = lock(&self.waiting).remove(&grant.owner);
            let delivered =
                waiter.is_some_and(|tx| tx.send(WaitOutcome::Granted(grant.token)).is_ok());
            if !delivered {
                // Granted to a call that stopped waiting (or to this peer's previous process): nobody
                // will use it, so give it back at once.
                let cmd = LockCmd::Release {
                    name: name.clone(),
                    token: grant.token,
                };
                submit_in_background(hamok, &self.id, cmd);
            }
        }
        for (_, grant) in notes.released.iter().filter(|(_, g)| &g.peer == me) {
            if let Some(token) = lock(&self.held).remove(&grant.token) {
                token.cancel();
            }
        }
        // Calls of this peer dropped from a queue because it left the configuration.
        for waiter in notes.dropped.iter().filter(|w| &w.peer == me) {
            if let Some(tx) = lock(&self.waiting).remove(&waiter.owner) {
                let _ = tx.send(WaitOutcome::Dropped);
            }
        }
    }
}

/// Submits a release or cancel from a task, retrying a few times with backoff (it is idempotent: a
/// release names its token, a cancel its owner).
pub(crate) fn submit_in_background(hamok: &Hamok, id: &str, cmd: LockCmd) {
    let Ok(bytes) = encode(&Envelope::Op(cmd)) else {
        return;
    };
    let hamok = hamok.clone();
    let id = id.to_string();
    tokio::spawn(async move {
        let mut backoff = Duration::from_millis(20);
        for _ in 0..CLEANUP_ATTEMPTS {
            match hamok.submit(&id, bytes.to_vec()).await {
                Ok(_) | Err(HamokError::Closed) | Err(HamokError::Rejected(_)) => return,
                Err(e) => {
                    tracing::debug!("lock table `{id}`: cleanup failed (retrying): {e}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
    });
}
