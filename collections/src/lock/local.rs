//! What the handles of one lock table on one peer share: the calls waiting for a grant, the guards
//! this peer holds (whose `lost()` fires when the apply path releases them), and the release of grants
//! nobody here waits for any more.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};
use std::time::Duration;

use hamok_runtime::raft::PeerId;
use hamok_runtime::Hamok;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use super::machine::{LockCmd, LockState, Notes, Stamped};
use crate::background::{expiry_after, submit_retrying};
use crate::common::{encode, Envelope, Local};

/// How a waiting `lock` call learns its fate from the apply path.
pub(crate) enum WaitOutcome {
    /// Granted under this token.
    Granted(u64),
    /// Dropped from the queue: this peer is no longer a member.
    Dropped,
}

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
    /// Whether this group's lease timer runs.
    lease_timer: std::sync::atomic::AtomicBool,
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
            lease_timer: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Starts this group's lease timer (once).
    pub(crate) fn start_lease_timer(&self, local: &Arc<LockLocal>) {
        if self.lease_timer.swap(true, Ordering::AcqRel) {
            return;
        }
        if let Some((_, hamok)) = self.peer.get() {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(lease_timer(hamok.clone(), Arc::downgrade(local)));
            }
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

/// Submits a release or cancel from a task, retrying (it is idempotent: a release names its token, a
/// cancel its owner). A guard dropped outside any runtime cannot submit: the membership lease frees the
/// lock once this peer is gone.
pub(crate) fn submit_in_background(hamok: &Hamok, id: &str, cmd: LockCmd) {
    if let Ok(bytes) = encode(&Envelope::Op(Stamped::now(hamok, cmd))) {
        submit_retrying(hamok, id, bytes);
    }
}

/// How often a lease timer looks at the table.
const LEASE_TICK: Duration = Duration::from_millis(20);

/// The handle group of a lock table on one peer.
pub(crate) type LockLocal = Local<LockState, LockExtra>;

/// Every joined peer with the table open times the TTL leases it sees, from the moment it applied the
/// grant (or its latest renewal), and asks the cluster to expire one that ran out. Expiry is therefore
/// never earlier than the lease after the grant on any peer's clock (a lower bound, like every lease
/// without synchronised clocks); the first expiry applied wins and later ones do nothing (they name the
/// token and the renewal count). Ends when the handle group is gone or the peer closed. Bounded: one
/// entry per held lock with a lease.
async fn lease_timer(hamok: Hamok, local: Weak<LockLocal>) {
    let mut seen: HashMap<(String, u64, u64), (tokio::time::Instant, bool)> = HashMap::new();
    loop {
        tokio::time::sleep(LEASE_TICK).await;
        let Some(local) = local.upgrade() else { return };
        if hamok.is_closed() {
            return;
        }
        if !hamok.is_joined() {
            seen.clear();
            continue;
        }
        let leased: Vec<(String, u64, u64, u64)> = local.read(|s| {
            s.locks
                .iter()
                .filter_map(|(name, e)| {
                    let h = e.holder.as_ref().filter(|h| h.timed)?;
                    Some((name.clone(), h.token, h.renewals, h.lease_ms?))
                })
                .collect()
        });
        let now = tokio::time::Instant::now();
        let current: std::collections::HashSet<(String, u64, u64)> = leased
            .iter()
            .map(|(n, t, r, _)| (n.clone(), *t, *r))
            .collect();
        seen.retain(|k, _| current.contains(k));
        for (name, token, renewals, lease_ms) in leased {
            let (since, asked) = seen
                .entry((name.clone(), token, renewals))
                .or_insert((now, false));
            if !*asked && now.saturating_duration_since(*since) >= expiry_after(lease_ms) {
                *asked = true;
                submit_in_background(
                    &hamok,
                    &local.id,
                    LockCmd::Expire {
                        name,
                        token,
                        renewals,
                    },
                );
            }
        }
    }
}
