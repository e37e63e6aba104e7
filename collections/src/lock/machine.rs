//! A lock table's state machine: per lock name, the holder (peer, owner, fencing token) and a FIFO of
//! waiters; grants, releases and the release of removed members, all in log order.
//!
//! **Fencing tokens.** Each grant's token is greater than every token the table handed out before
//! (the last one is replicated state, in the snapshot: so across leader changes and snapshots), and not
//! below the granting command's wall-clock stamp times [`TOKENS_PER_MS`]: after a whole-cluster restart
//! (a new log, with the in-memory store) the first grants are stamped later than every grant of the
//! earlier cluster, so their tokens are greater too, as long as the peers' clocks did not go back by
//! more than the restart took. Deterministic: the stamp is in the log.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use bytes::Bytes;
use hamok_runtime::raft::{LogIndex, PeerId};
use hamok_runtime::state_machine::ApplyContext;
use hamok_runtime::HamokError;
use serde::{Deserialize, Serialize};

use super::local::LockExtra;
use super::LOCK_KIND;
use crate::common::{encode, write_lock, Raw};
use crate::machine::{Core, Logic};

/// Most waiters one lock queues; further `lock` calls are refused with [`HamokError::Busy`] (a queue
/// this long means callers wait far longer than any sensible timeout anyway).
pub const MAX_WAITERS_PER_LOCK: usize = 1024;

/// Most lock names with a holder or waiters in one table; further acquisitions of new names are
/// refused with [`HamokError::Busy`]. A free lock with no waiters takes no room.
pub const MAX_LOCKS: usize = 100_000;

/// Who holds a lock, under which token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Grant {
    pub(crate) peer: PeerId,
    /// The waiting call on that peer (random per call).
    pub(crate) owner: u64,
    pub(crate) token: u64,
    /// A TTL lease (milliseconds), if the holder asked for one.
    pub(crate) lease_ms: Option<u64>,
    /// How many times the holder renewed its lease (an expiry names the count it timed).
    pub(crate) renewals: u64,
    /// Whether the lease's timers run: from a direct grant, or from the holder's first renewal of a
    /// grant it got from the queue (it could not know when that grant happened, so it renews at once
    /// and its lease, like everyone's timers, counts from that renewal).
    pub(crate) timed: bool,
}

/// A waiting `lock` call.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Waiter {
    pub(crate) peer: PeerId,
    pub(crate) owner: u64,
    pub(crate) lease_ms: Option<u64>,
}

/// One lock: its holder and its queue.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct LockEntry {
    pub(crate) holder: Option<Grant>,
    pub(crate) waiters: VecDeque<Waiter>,
}

/// The replicated table.
#[derive(Default, Serialize, Deserialize)]
pub(crate) struct LockState {
    pub(crate) locks: BTreeMap<String, LockEntry>,
    /// The members in force (a lock is held only by a member: the default lease); empty until the
    /// cluster's first membership change.
    pub(crate) members: BTreeSet<PeerId>,
    /// The last fencing token handed out.
    pub(crate) last_token: u64,
}

impl LockState {
    /// The holder of `name`.
    pub(crate) fn holder(&self, name: &str) -> Option<&Grant> {
        self.locks.get(name)?.holder.as_ref()
    }
}

/// A lock table's command, stamped with the submitter's wall clock (milliseconds since the Unix epoch),
/// which only sets a floor under the tokens it grants (see [`Tokens`]): deterministic, since the stamp
/// is in the log.
#[derive(Serialize, Deserialize)]
pub(crate) struct Stamped {
    pub(crate) wall_ms: u64,
    pub(crate) cmd: LockCmd,
}

impl Stamped {
    /// `cmd`, stamped with `hamok`'s wall clock now.
    pub(crate) fn now(hamok: &hamok_runtime::Hamok, cmd: LockCmd) -> Self {
        Stamped {
            wall_ms: hamok.wall_clock_ms(),
            cmd,
        }
    }
}

/// A lock table's commands.
#[derive(Serialize, Deserialize)]
pub(crate) enum LockCmd {
    /// Take `name` for (submitter, `owner`); if it is held, queue (`wait`) or answer `Busy`.
    Acquire {
        name: String,
        owner: u64,
        wait: bool,
        lease_ms: Option<u64>,
    },
    /// Let go of `name` if it is held under `token`.
    Release { name: String, token: u64 },
    /// The call (submitter, `owner`) stopped waiting: drop it from the queue, or release the lock if it
    /// was granted meanwhile.
    Cancel { name: String, owner: u64 },
    /// The holder under `token` renews its TTL lease.
    Renew { name: String, token: u64 },
    /// A peer's timer says the lease of `token` ran out after `renewals` renewals: release it if it is
    /// still that grant, not renewed since.
    Expire {
        name: String,
        token: u64,
        renewals: u64,
    },
}

/// What an `Acquire` got.
#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Acquired {
    /// Held, under this token.
    Granted(u64),
    /// Queued behind the holder (a later grant reaches the caller through the apply path).
    Queued,
    /// Held by another and the caller would not wait.
    Busy(Grant),
}

/// What is particular to a lock table's state machine ([`Machine`](crate::machine::Machine)`<LockLogic>`).
#[derive(Default)]
pub(crate) struct LockLogic;

/// Hands out fencing tokens: each greater than the last one of the table and not below `floor` (the
/// submitter's wall clock, in milliseconds, times [`TOKENS_PER_MS`]; 0 for a membership entry).
pub(crate) struct Tokens<'a> {
    last: &'a mut u64,
    floor: u64,
}

/// How many tokens one millisecond of wall clock leaves room for: a table grants at most one lock per
/// log entry, and no cluster commits a thousand entries in a millisecond.
pub const TOKENS_PER_MS: u64 = 1_000;

impl Tokens<'_> {
    fn next(&mut self) -> u64 {
        *self.last = self.last.saturating_add(1).max(self.floor);
        *self.last
    }
}

/// Grants `name` to the first waiter that is a member, under the next token; records events and
/// notifies a waiting call of this peer.
fn grant_next(
    name: &str,
    entry: &mut LockEntry,
    members: &BTreeSet<PeerId>,
    tokens: &mut Tokens<'_>,
    notes: &mut Notes,
) {
    debug_assert!(entry.holder.is_none());
    while let Some(w) = entry.waiters.pop_front() {
        if !members.contains(&w.peer) {
            continue;
        }
        let grant = Grant {
            peer: w.peer,
            owner: w.owner,
            token: tokens.next(),
            lease_ms: w.lease_ms,
            renewals: 0,
            timed: false,
        };
        notes.granted(name, &grant);
        entry.holder = Some(grant);
        return;
    }
}

/// Takes the holder of `name` off (it is released); the next waiter gets the lock under the next token.
fn release(
    name: &str,
    entry: &mut LockEntry,
    members: &BTreeSet<PeerId>,
    tokens: &mut Tokens<'_>,
    notes: &mut Notes,
) {
    if let Some(old) = entry.holder.take() {
        notes.released(name, &old);
    }
    grant_next(name, entry, members, tokens, notes);
}

/// What applying one entry changed that this peer's handles must hear of: grants and releases (for
/// waiting calls, `lost()` and the event stream).
#[derive(Default)]
pub(crate) struct Notes {
    pub(crate) granted: Vec<(String, Grant)>,
    pub(crate) released: Vec<(String, Grant)>,
    /// Waiters dropped because their peer is no longer a member.
    pub(crate) dropped: Vec<Waiter>,
}

impl Notes {
    fn granted(&mut self, name: &str, grant: &Grant) {
        self.granted.push((name.to_string(), grant.clone()));
    }
    fn released(&mut self, name: &str, grant: &Grant) {
        self.released.push((name.to_string(), grant.clone()));
    }

    /// The events for subscribers: an insert per grant (key: name, value: the grant), a remove per
    /// release.
    fn events(&self) -> Vec<Raw> {
        let mut events = Vec::new();
        for (name, grant) in &self.released {
            if let (Ok(key), Ok(value)) = (encode(name), encode(grant)) {
                events.push(Raw::Remove { key, value });
            }
        }
        for (name, grant) in &self.granted {
            if let (Ok(key), Ok(value)) = (encode(name), encode(grant)) {
                events.push(Raw::Insert { key, value });
            }
        }
        events
    }
}

/// Hands the notes to this peer's handles (waiting calls, holders, subscribers).
fn deliver(core: &Core<LockState, LockExtra>, notes: Notes) {
    if notes.granted.is_empty() && notes.released.is_empty() && notes.dropped.is_empty() {
        return;
    }
    if core.listening() {
        core.emit(notes.events());
    }
    if let Some(local) = core.live_local() {
        local.extra.on_applied(&notes);
    }
}

impl Logic for LockLogic {
    type State = LockState;
    type Extra = LockExtra;
    type Command = Stamped;

    fn kind(&self) -> &str {
        LOCK_KIND
    }

    fn exec(
        &self,
        core: &Core<LockState, LockExtra>,
        ctx: &ApplyContext,
        stamped: Stamped,
    ) -> Result<Bytes, HamokError> {
        let mut notes = Notes::default();
        let floor = stamped.wall_ms.saturating_mul(TOKENS_PER_MS);
        let response = {
            let mut guard = write_lock(&core.state);
            let state = &mut *guard;
            let mut tokens = Tokens {
                last: &mut state.last_token,
                floor,
            };
            let response = match stamped.cmd {
                LockCmd::Acquire {
                    name,
                    owner,
                    wait,
                    lease_ms,
                } => {
                    // Empty: no membership change applied yet (a cluster that never grew past its
                    // founder), so nobody can have been removed either.
                    if !state.members.is_empty() && !state.members.contains(&ctx.client) {
                        return Err(HamokError::Rejected(format!(
                            "lock `{name}`: peer `{}` is not a member of the cluster",
                            ctx.client
                        )));
                    }
                    if !state.locks.contains_key(&name) && state.locks.len() >= MAX_LOCKS {
                        return Err(HamokError::Busy("lock table full"));
                    }
                    let entry = state.locks.entry(name.clone()).or_default();
                    match &entry.holder {
                        None => {
                            let token = tokens.next();
                            let grant = Grant {
                                peer: ctx.client.clone(),
                                owner,
                                token,
                                lease_ms,
                                renewals: 0,
                                timed: true,
                            };
                            notes.granted(&name, &grant);
                            entry.holder = Some(grant);
                            encode(&Acquired::Granted(token))
                        }
                        Some(holder) if !wait => encode(&Acquired::Busy(holder.clone())),
                        Some(_) => {
                            if entry.waiters.len() >= MAX_WAITERS_PER_LOCK {
                                return Err(HamokError::Busy("too many waiters for this lock"));
                            }
                            entry.waiters.push_back(Waiter {
                                peer: ctx.client.clone(),
                                owner,
                                lease_ms,
                            });
                            encode(&Acquired::Queued)
                        }
                    }
                }
                LockCmd::Release { name, token } => {
                    let members = &state.members;
                    let released = match state.locks.get_mut(&name) {
                        Some(entry) if entry.holder.as_ref().is_some_and(|h| h.token == token) => {
                            release(&name, entry, members, &mut tokens, &mut notes);
                            true
                        }
                        _ => false,
                    };
                    encode(&released)
                }
                LockCmd::Cancel { name, owner } => {
                    let members = &state.members;
                    let mut done = false;
                    if let Some(entry) = state.locks.get_mut(&name) {
                        let before = entry.waiters.len();
                        entry
                            .waiters
                            .retain(|w| !(w.peer == ctx.client && w.owner == owner));
                        done = entry.waiters.len() != before;
                        let holds = entry
                            .holder
                            .as_ref()
                            .is_some_and(|h| h.peer == ctx.client && h.owner == owner);
                        if holds {
                            release(&name, entry, members, &mut tokens, &mut notes);
                            done = true;
                        }
                    }
                    encode(&done)
                }
                LockCmd::Renew { name, token } => {
                    let holder = state
                        .locks
                        .get_mut(&name)
                        .and_then(|e| e.holder.as_mut())
                        .filter(|h| h.token == token && h.peer == ctx.client);
                    let renewed = match holder {
                        Some(h) => {
                            h.renewals += 1;
                            h.timed = true;
                            true
                        }
                        None => false,
                    };
                    encode(&renewed)
                }
                LockCmd::Expire {
                    name,
                    token,
                    renewals,
                } => {
                    let members = &state.members;
                    let expired = match state.locks.get_mut(&name) {
                        Some(entry)
                            if entry.holder.as_ref().is_some_and(|h| {
                                h.token == token && h.renewals == renewals && h.lease_ms.is_some()
                            }) =>
                        {
                            release(&name, entry, members, &mut tokens, &mut notes);
                            true
                        }
                        _ => false,
                    };
                    encode(&expired)
                }
            };
            prune(state);
            response
        };
        deliver(core, notes);
        response
    }

    fn on_members(
        &self,
        core: &Core<LockState, LockExtra>,
        index: LogIndex,
        members: &BTreeSet<PeerId>,
    ) {
        let mut notes = Notes::default();
        if members.is_empty() {
            // Not known yet (see `StateMachine::on_members`): nothing to release.
            return;
        }
        {
            let mut guard = write_lock(&core.state);
            let state = &mut *guard;
            state.members = members.clone();
            let mut tokens = Tokens {
                last: &mut state.last_token,
                floor: 0,
            };
            let _ = index;
            for (name, entry) in state.locks.iter_mut() {
                let (stay, gone): (VecDeque<Waiter>, VecDeque<Waiter>) = entry
                    .waiters
                    .drain(..)
                    .partition(|w| members.contains(&w.peer));
                entry.waiters = stay;
                notes.dropped.extend(gone);
                // The default lease: a lock is held only by a member. The removal that ends a
                // holder's membership releases its locks, in that entry's log order.
                if entry
                    .holder
                    .as_ref()
                    .is_some_and(|h| !members.contains(&h.peer))
                {
                    release(name, entry, members, &mut tokens, &mut notes);
                }
            }
            prune(state);
        }
        deliver(core, notes);
    }

    fn current_fence(&self, core: &Core<LockState, LockExtra>, name: &str) -> Option<u64> {
        crate::common::read_lock(&core.state)
            .holder(name)
            .map(|g| g.token)
    }
}

/// Drops entries with no holder and no waiters (a free lock takes no room).
fn prune(state: &mut LockState) {
    state
        .locks
        .retain(|_, e| e.holder.is_some() || !e.waiters.is_empty());
}
