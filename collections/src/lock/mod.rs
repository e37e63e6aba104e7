//! [`HamokLock`]: a replicated table of named, fenced locks.
//!
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use hamok_collections::{register_kinds, HamokCollections};
//! use hamok_runtime::Hamok;
//!
//! let hamok = register_kinds(Hamok::builder().cluster_id("doc-lock")).build().await?;
//! hamok.join().await?;
//! let locks = hamok.get_or_create_lock_table("locks").await?;
//! let state = hamok.get_or_create_map::<String, u64>("state").await?;
//!
//! let guard = locks.lock("migration").await?;
//! // Writes under the fence are refused once the lock has moved on (see `fenced`).
//! state.fenced(guard.fence()).set("step".into(), 1).await?;
//! assert!(guard.check().await?);
//! guard.unlock().await?;
//! hamok.close().await;
//! # Ok::<(), hamok_runtime::HamokError>(()) }).unwrap();
//! ```
//!
//! # Guarantees
//!
//! - **One holder at a time, FIFO.** Grants happen in log order: `lock` queues behind the holder and is
//!   granted when the lock is released; `try_lock` never queues. A `lock` future that is dropped (or
//!   times out) leaves no grant behind: its cancel goes through the log and releases the lock if it was
//!   granted meanwhile, and a grant that reaches this peer for a call nobody waits for is given back at
//!   once.
//! - **Fencing tokens** ([`LockGuard::token`]) strictly increase per lock (and over the whole table):
//!   each is greater than the table's last one (replicated state: across leader changes and
//!   snapshots) and not below the granting command's wall-clock stamp times [`TOKENS_PER_MS`], so after
//!   a whole-cluster restart (a new, empty log with the in-memory store) new tokens are still greater
//!   than every earlier one, provided the peers' clocks did not go back by more than the restart took.
//! - **Fenced writes**: a collection handle's [`fenced`](crate::HamokMap::fenced) copy carries the
//!   guard's fence with every write; the write is applied only while the lock is still held under that
//!   token, decided at apply time in the same log as the grants, else refused with
//!   [`HamokError::StaleFence`]. A paused or cut-off holder can therefore never overwrite what the next
//!   holder wrote. For resources outside hamok, [`FenceGate`] keeps the highest token seen per lock and
//!   rejects older ones.
//! - **The lease is the holder's membership.** The cluster releases a holder's locks in the same log
//!   entry that removes the holder (a dead or cut-off peer is removed after `peer_max_idle_ms` of
//!   silence), so there is no keep-alive per lock. [`LockGuard::lost`] fires on the holder as soon as it
//!   can no longer be sure it holds the lock: the cluster released it, or this peer has not heard from a
//!   leader for half of `peer_max_idle_ms` (before the cluster can remove it, when the election timeout
//!   is well below that, as with the defaults), or it left or closed. A holder must stop acting when
//!   `lost` fires; fencing covers the moments before it notices.
//! - **An optional TTL lease** ([`LockOptions::lease`], renewed with [`LockGuard::renew`]): the cluster
//!   also releases the lock when it is not renewed in time. Every peer with the table open times it on
//!   its own clock from when it applied the grant or the latest renewal, plus a margin (a tenth of the
//!   lease, at least 20 ms), so it is a lower bound (never released earlier); the holder's `lost()`
//!   fires at the bare lease counted from before its own request, so before any peer's timer.
//! - **Bounded**: at most [`MAX_WAITERS_PER_LOCK`] waiters per lock and [`MAX_LOCKS`] held or awaited
//!   names per table ([`HamokError::Busy`] beyond).
//!
//! Not reentrant: a second `lock` of a held name queues behind the first, even on the same peer.

mod local;
mod machine;

use std::sync::Arc;
use std::time::Duration;

use hamok_runtime::raft::PeerId;
use hamok_runtime::state_machine::Fence;
use hamok_runtime::{Hamok, HamokError};
use serde::{Deserialize, Serialize};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

pub(crate) use local::LockExtra;
use local::{submit_in_background, WaitOutcome};
use machine::{Acquired, Grant, LockCmd, Stamped};
pub(crate) use machine::{LockLogic, LockState};
pub use machine::{MAX_LOCKS, MAX_WAITERS_PER_LOCK, TOKENS_PER_MS};

use crate::common::{decode, Events, Handle, LogicHandle, Opened, Raw, ResyncReason};
use crate::machine::Machine;

/// How often a waiting `lock` checks whether its peer closed.
const CLOSE_POLL: Duration = Duration::from_millis(100);

/// The kind a lock table is registered under.
pub const LOCK_KIND: &str = "hamok.lock";

/// The state machine of a lock table.
pub(crate) type LockMachine = Machine<LockLogic>;

/// Who holds a lock, and under which fencing token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockHolder {
    /// The holding peer.
    pub peer: PeerId,
    /// The fencing token of its grant.
    pub token: u64,
}

impl From<&Grant> for LockHolder {
    fn from(g: &Grant) -> Self {
        LockHolder {
            peer: g.peer.clone(),
            token: g.token,
        }
    }
}

/// A change of a lock, as applied on this peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LockEvent {
    /// `name` was granted.
    Acquired {
        /// The lock.
        name: String,
        /// To whom, under which token.
        holder: LockHolder,
    },
    /// `name` was released (unlocked, cancelled, or its holder was removed from the cluster).
    Released {
        /// The lock.
        name: String,
        /// Who held it.
        holder: LockHolder,
    },
    /// The stream could not deliver some events (see [`ResyncReason`]): exactly the locks in `held`
    /// are held now (by name), and the events after this one continue from there.
    Resync {
        /// Every held lock: its name and holder.
        held: Vec<(String, LockHolder)>,
        /// Why the events in between were skipped.
        reason: ResyncReason,
    },
    /// The handle (or its peer) was closed.
    Close,
}

fn decode_event(raw: Raw) -> Result<LockEvent, HamokError> {
    Ok(match raw {
        Raw::Insert { key, value }
        | Raw::Update {
            key, new: value, ..
        } => LockEvent::Acquired {
            name: decode(&key)?,
            holder: LockHolder::from(&decode::<Grant>(&value)?),
        },
        Raw::Remove { key, value } => LockEvent::Released {
            name: decode(&key)?,
            holder: LockHolder::from(&decode::<Grant>(&value)?),
        },
        Raw::Clear | Raw::Empty | Raw::NotEmpty | Raw::Close => LockEvent::Close,
        Raw::Resync { state, reason } => LockEvent::Resync {
            held: decode::<LockState>(&state)?
                .locks
                .iter()
                .filter_map(|(name, e)| Some((name.clone(), LockHolder::from(e.holder.as_ref()?))))
                .collect(),
            reason,
        },
    })
}

/// How [`HamokLock::lock_with`] waits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LockOptions {
    /// Give up (with [`HamokError::Timeout`]) if not granted within this; `None` waits until granted,
    /// or until this peer leaves the cluster ([`HamokError::NotJoined`]) or closes.
    pub wait_timeout: Option<Duration>,
    /// A TTL lease on top of the membership lease: unless renewed ([`LockGuard::renew`]) within this,
    /// the cluster releases the lock. The cluster's timers run on the peers' clocks from when each
    /// applied the grant or renewal, so the lease is a **lower bound**: the lock is never released
    /// earlier, maybe somewhat later; the holder's `lost()` fires at the lease measured from before its
    /// request, so first.
    pub lease: Option<Duration>,
}

impl LockOptions {
    /// Waits at most `timeout`.
    pub fn wait_timeout(timeout: Duration) -> Self {
        LockOptions {
            wait_timeout: Some(timeout),
            ..LockOptions::default()
        }
    }

    /// These options with a TTL lease of `lease`.
    pub fn with_lease(self, lease: Duration) -> Self {
        LockOptions {
            lease: Some(lease),
            ..self
        }
    }
}

/// A replicated table of named locks (see the [module documentation](self)). Cheap to clone.
pub struct HamokLock {
    handle: Handle<LockState, LockExtra>,
}

impl Clone for HamokLock {
    fn clone(&self) -> Self {
        HamokLock {
            handle: self.handle.clone(),
        }
    }
}

impl std::fmt::Debug for HamokLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HamokLock")
            .field("id", &self.handle.local.id)
            .finish()
    }
}

impl Opened for HamokLock {
    type Logic = LockLogic;
    type Options = ();

    fn kind(_id: &str) -> String {
        LOCK_KIND.to_string()
    }

    fn extra(id: &str) -> LockExtra {
        LockExtra::new(id)
    }

    async fn finish(handle: LogicHandle<LockLogic>, _options: ()) -> Result<Self, HamokError> {
        handle.local.extra.bind(&handle.hamok);
        Ok(HamokLock { handle })
    }
}

impl HamokLock {
    /// The table's id.
    pub fn id(&self) -> &str {
        &self.handle.local.id
    }

    /// The same table with each call through the log bounded by `timeout` (see
    /// [`HamokMap::with_timeout`](crate::HamokMap::with_timeout)); a waiting `lock` is bounded by its
    /// [`LockOptions`] instead.
    pub fn with_timeout(&self, timeout: Duration) -> Self {
        HamokLock {
            handle: self.handle.with_timeout(timeout),
        }
    }

    /// Takes lock `name`, waiting (FIFO) until it is granted; see [`HamokLock::lock_with`].
    pub async fn lock(&self, name: &str) -> Result<LockGuard, HamokError> {
        self.lock_with(name, LockOptions::default()).await
    }

    /// Takes lock `name` if it is free now; `Ok(None)` if another holds it.
    pub async fn try_lock(&self, name: &str) -> Result<Option<LockGuard>, HamokError> {
        self.acquire(name, false, LockOptions::default()).await
    }

    /// Takes lock `name`, waiting as `options` say. Dropping the returned future before it resolves
    /// leaves no grant behind.
    pub async fn lock_with(
        &self,
        name: &str,
        options: LockOptions,
    ) -> Result<LockGuard, HamokError> {
        match self.acquire(name, true, options).await? {
            Some(guard) => Ok(guard),
            None => Err(HamokError::Rejected(format!(
                "lock `{name}` was not granted"
            ))),
        }
    }

    async fn acquire(
        &self,
        name: &str,
        wait: bool,
        options: LockOptions,
    ) -> Result<Option<LockGuard>, HamokError> {
        let started = tokio::time::Instant::now();
        let extra = &self.handle.local.extra;
        let (owner, granted) = extra.wait();
        // Armed until the call ends with a guard or certainly left nothing in the table.
        let mut pending = PendingWait {
            table: self,
            name,
            owner,
            armed: true,
        };
        let lease_ms = options
            .lease
            .map(|l| u64::try_from(l.as_millis()).unwrap_or(u64::MAX).max(1));
        if lease_ms.is_some() {
            extra.start_lease_timer(&self.handle.local);
        }
        let cmd = LockCmd::Acquire {
            name: name.to_string(),
            owner,
            wait,
            lease_ms,
        };
        let acquired: Acquired = match self.handle.submit(Stamped::now(self.hamok(), cmd)).await {
            Ok(a) => a,
            Err(e) => {
                pending.armed = e.may_have_taken_effect();
                return Err(e);
            }
        };
        let (token, queued) = match acquired {
            Acquired::Granted(token) => (token, false),
            Acquired::Busy(_) => {
                pending.armed = false;
                return Ok(None);
            }
            Acquired::Queued => {
                let outcome = match options.wait_timeout {
                    Some(limit) => {
                        match tokio::time::timeout(
                            limit.saturating_sub(started.elapsed()),
                            self.wait_for_grant(granted),
                        )
                        .await
                        {
                            Ok(outcome) => outcome?,
                            Err(_) => return Err(HamokError::timeout(limit)),
                        }
                    }
                    None => self.wait_for_grant(granted).await?,
                };
                match outcome {
                    WaitOutcome::Granted(token) => (token, true),
                    WaitOutcome::Dropped => {
                        pending.armed = false;
                        return Err(HamokError::NotJoined);
                    }
                }
            }
        };
        pending.armed = false;
        extra.stop_waiting(owner);
        // The holder's lease runs from before its request: it ends no later than anyone's timer. (A
        // grant from the queue is timed by nobody until the renewal below, which restarts it.)
        let base = if queued {
            tokio::time::Instant::now()
        } else {
            started
        };
        let lease = options.lease.map(|l| Lease {
            length: l,
            deadline: Arc::new(std::sync::Mutex::new(base + l)),
        });
        let guard = LockGuard::new(self.clone(), name, token, lease);
        if queued && guard.lease.is_some() {
            // Granted from the queue at a moment this peer cannot know: the lease starts with a
            // renewal (no timer runs on the grant before it).
            guard.renew().await?;
        }
        Ok(Some(guard))
    }

    /// Waits for the apply path to grant (or drop) a queued call; `Closed` once the peer closed (checked
    /// every [`CLOSE_POLL`], so a waiting `lock` never outlives its peer).
    async fn wait_for_grant(
        &self,
        mut granted: tokio::sync::oneshot::Receiver<WaitOutcome>,
    ) -> Result<WaitOutcome, HamokError> {
        loop {
            match tokio::time::timeout(CLOSE_POLL, &mut granted).await {
                Ok(Ok(outcome)) => return Ok(outcome),
                // The waiting entry is gone without an answer: only when the table's group is.
                Ok(Err(_)) => return Err(HamokError::Closed),
                Err(_) if self.is_closed() => return Err(HamokError::Closed),
                Err(_) => {}
            }
        }
    }

    /// Who holds `name`, as applied on this peer (a local read).
    pub fn holder(&self, name: &str) -> Option<LockHolder> {
        self.handle
            .local
            .read(|s| s.holder(name).map(LockHolder::from))
    }

    /// Who holds `name`, reflecting every grant and release acknowledged anywhere before the call.
    pub async fn holder_linearizable(&self, name: &str) -> Result<Option<LockHolder>, HamokError> {
        self.handle.sync().await?;
        Ok(self.holder(name))
    }

    /// How many callers wait for `name` (local).
    pub fn waiting(&self, name: &str) -> usize {
        self.handle
            .local
            .read(|s| s.locks.get(name).map_or(0, |e| e.waiters.len()))
    }

    /// This peer's lock events (every grant and release of the table, in log order). The stream never
    /// skips silently: after a [`LockEvent::Resync`] its `held` are the table's holders at that point of
    /// the log, and the events that follow continue from exactly that state (replaying `Resync`, then
    /// the events, reproduces who holds what).
    pub fn events(&self) -> Events<LockEvent> {
        self.handle.events(decode_event)
    }

    fn hamok(&self) -> &Hamok {
        &self.handle.hamok
    }

    /// Whether this table's peer closed.
    pub fn is_closed(&self) -> bool {
        self.handle.hamok.is_closed() || self.handle.local.is_closed()
    }
}

/// Cancels a `lock` call that ends without a guard (dropped, timed out) and may have left a waiter or a
/// grant in the table.
struct PendingWait<'a> {
    table: &'a HamokLock,
    name: &'a str,
    owner: u64,
    armed: bool,
}

impl Drop for PendingWait<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let extra = &self.table.handle.local.extra;
        extra.stop_waiting(self.owner);
        submit_in_background(
            self.table.hamok(),
            self.table.id(),
            LockCmd::Cancel {
                name: self.name.to_string(),
                owner: self.owner,
            },
        );
    }
}

/// A held lock. Released by [`LockGuard::unlock`], or in the background when dropped.
#[must_use = "the lock is released when the guard is dropped"]
pub struct LockGuard {
    table: HamokLock,
    name: String,
    token: u64,
    lost: CancellationToken,
    lease: Option<Lease>,
    released: bool,
}

/// A guard's TTL lease: its length, and when it runs out on the holder's clock.
#[derive(Clone)]
struct Lease {
    length: Duration,
    deadline: Arc<std::sync::Mutex<tokio::time::Instant>>,
}

impl Lease {
    fn deadline(&self) -> tokio::time::Instant {
        *self
            .deadline
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl std::fmt::Debug for LockGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LockGuard")
            .field("table", &self.table.id())
            .field("name", &self.name)
            .field("token", &self.token)
            .field("lost", &self.lost.is_cancelled())
            .finish()
    }
}

impl LockGuard {
    fn new(table: HamokLock, name: &str, token: u64, lease: Option<Lease>) -> Self {
        let lost = table.handle.local.extra.hold(token);
        // Released before this guard existed (a race with the cluster): lost at once.
        if table.holder(name).is_none_or(|h| h.token != token) {
            lost.cancel();
        }
        watch_contact(table.hamok().clone(), lost.clone(), lease.clone());
        LockGuard {
            table,
            name: name.to_string(),
            token,
            lost,
            lease,
            released: false,
        }
    }

    /// Renews the TTL lease (see [`LockOptions::lease`]); `Ok(false)` if the lock is no longer held
    /// under this guard's token (or it has no lease). The new lease runs from before the call.
    pub async fn renew(&self) -> Result<bool, HamokError> {
        let Some(lease) = &self.lease else {
            return Ok(false);
        };
        let started = tokio::time::Instant::now();
        if self.lost.is_cancelled() {
            return Ok(false);
        }
        let renewed: bool = self
            .table
            .handle
            .submit(Stamped::now(
                self.table.hamok(),
                LockCmd::Renew {
                    name: self.name.clone(),
                    token: self.token,
                },
            ))
            .await?;
        if renewed && !self.lost.is_cancelled() {
            *lease
                .deadline
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = started + lease.length;
        }
        Ok(renewed)
    }

    /// The lock's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The fencing token of this grant (greater than every earlier grant's of this table).
    pub fn token(&self) -> u64 {
        self.token
    }

    /// The fence to give fenced writes ([`HamokMap::fenced`](crate::HamokMap::fenced)).
    pub fn fence(&self) -> Fence {
        Fence {
            table: self.table.id().to_string(),
            name: self.name.clone(),
            token: self.token,
        }
    }

    /// Resolves when this peer can no longer be sure it holds the lock (see the
    /// [module documentation](self)); stop acting on the lock's behalf then.
    pub fn lost(&self) -> WaitForCancellationFutureOwned {
        self.lost.clone().cancelled_owned()
    }

    /// A token cancelled when [`LockGuard::lost`] resolves (to hand to tasks working under the lock).
    pub fn lost_token(&self) -> CancellationToken {
        self.lost.clone()
    }

    /// Whether [`LockGuard::lost`] has fired.
    pub fn is_lost(&self) -> bool {
        self.lost.is_cancelled()
    }

    /// Confirms through the leader (a linearizable read) that this grant still holds.
    pub async fn check(&self) -> Result<bool, HamokError> {
        let holder = self.table.holder_linearizable(&self.name).await?;
        Ok(holder.is_some_and(|h| {
            h.token == self.token && &h.peer == self.table.hamok().local_peer_id()
        }))
    }

    /// Releases the lock; `Ok(false)` if it had already been released by the cluster.
    pub async fn unlock(mut self) -> Result<bool, HamokError> {
        self.released = true;
        self.lost.cancel();
        self.table.handle.local.extra.unhold(self.token);
        self.table
            .handle
            .submit(Stamped::now(
                self.table.hamok(),
                LockCmd::Release {
                    name: self.name.clone(),
                    token: self.token,
                },
            ))
            .await
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        self.lost.cancel();
        self.table.handle.local.extra.unhold(self.token);
        submit_in_background(
            self.table.hamok(),
            self.table.id(),
            LockCmd::Release {
                name: self.name.clone(),
                token: self.token,
            },
        );
    }
}

/// Fires `lost` when this peer has gone half of `peer_max_idle_ms` without a leader (the cluster removes
/// a peer after the whole of it), or is no longer joined, or closed, or its TTL lease ran out on its
/// own clock. Ends when `lost` fires.
fn watch_contact(hamok: Hamok, lost: CancellationToken, lease: Option<Lease>) {
    let bound = Duration::from_millis(hamok.config().peer_max_idle_ms / 2);
    let period = (bound / 4).max(Duration::from_millis(5));
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        lost.cancel();
        return;
    };
    runtime.spawn(async move {
        loop {
            // Wake at the lease's deadline exactly, not up to a period after it.
            let mut wake = tokio::time::Instant::now() + period;
            if let Some(l) = &lease {
                wake = wake.min(l.deadline());
            }
            tokio::select! {
                biased;
                _ = lost.cancelled() => return,
                _ = tokio::time::sleep_until(wake) => {}
            }
            let expired = lease
                .as_ref()
                .is_some_and(|l| tokio::time::Instant::now() >= l.deadline());
            if expired
                || hamok.is_closed()
                || !hamok.is_joined()
                || hamok.leader_contact_age() >= bound
            {
                lost.cancel();
                return;
            }
        }
    });
}

/// Keeps the highest fencing token seen per lock and rejects older ones: the check a resource outside
/// hamok (a file, a database row, an external API) makes so a holder that lost its lock cannot act on
/// it. Share one gate per resource (it is `Sync`).
///
/// ```
/// use hamok_collections::FenceGate;
/// let gate = FenceGate::default();
/// assert!(gate.admit("job", 7).is_ok());
/// assert!(gate.admit("job", 9).is_ok());
/// assert!(gate.admit("job", 7).is_err(), "an older holder is refused");
/// assert!(gate.admit("job", 9).is_ok(), "the current holder may write again");
/// ```
#[derive(Debug, Default)]
pub struct FenceGate {
    highest: std::sync::Mutex<std::collections::BTreeMap<String, u64>>,
}

impl FenceGate {
    /// Admits `token` for lock `name` if no greater token was seen (and remembers it), else
    /// [`HamokError::StaleFence`].
    pub fn admit(&self, name: &str, token: u64) -> Result<(), HamokError> {
        let mut highest = self
            .highest
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let seen = highest.entry(name.to_string()).or_insert(0);
        if token < *seen {
            return Err(HamokError::StaleFence {
                name: name.to_string(),
                token,
                current: Some(*seen),
            });
        }
        *seen = token;
        Ok(())
    }

    /// The highest token seen for `name`.
    pub fn highest(&self, name: &str) -> Option<u64> {
        self.highest
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(name)
            .copied()
    }
}
