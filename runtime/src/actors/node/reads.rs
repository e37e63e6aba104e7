//! Linearizable reads: each waits for a read index confirmed by a leader after the read began, then for
//! this peer to apply up to that index, and only then runs against the state machines.
//!
//! The read rule: a read is served from local state only once a read index obtained for it has been
//! applied here. A read that cannot get one (not joined, no leader, cut off) fails with a typed error
//! at its deadline; it never falls back to the local state.

use std::collections::BTreeMap;

use super::frames::Output;
use super::planted_bugs::PlantedBugs;
use crate::error::HamokError;
use crate::raft::{LogIndex, RaftNode, ReadState, SeededRng};
use crate::state_machine::{StateMachine, StateMachines};
use crate::stats::metric_names::READ_INDEX_SECONDS;

/// What a served query sees.
pub(crate) struct Served<'a> {
    /// This peer's applied index when the query ran (at or above the read index for a linearizable
    /// read).
    pub applied_index: LogIndex,
    /// The state machine of the collection asked for, if it exists.
    pub machine: Option<&'a dyn StateMachine>,
}

/// A closure run against a collection's state machine inside the node.
pub(crate) type QueryFn = Box<dyn FnOnce(Result<Served<'_>, HamokError>) + Send>;

struct PendingRead {
    collection: String,
    timeout_ms: u64,
    f: QueryFn,
    deadline_ms: u64,
    /// When the read started (for the read latency).
    started_ms: u64,
    /// The read index, once a leader confirmed one.
    index: Option<LogIndex>,
    /// When the outstanding read-index request was sent (`None`: none outstanding).
    requested_at_ms: Option<u64>,
}

/// This peer's linearizable reads in flight.
pub(super) struct Reads {
    next_ctx: u64,
    pending: BTreeMap<u64, PendingRead>,
    /// A read index request unanswered for this long is asked again (a lost request or answer).
    reask_after_ms: u64,
}

impl Reads {
    /// `seed` picks where read contexts start: a late read-index answer meant for an earlier run of this
    /// peer id (same id, frames still on the bus) must not match a read of this run, or it could serve
    /// it at a stale index.
    pub(super) fn new(seed: u64, reask_after_ms: u64) -> Self {
        Reads {
            next_ctx: SeededRng::new(seed ^ 0x7265_6164_7321).next_u64(), // "reads!"
            pending: BTreeMap::new(),
            reask_after_ms,
        }
    }

    /// A fresh read context.
    pub(super) fn next_ctx(&mut self) -> u64 {
        let ctx = self.next_ctx;
        self.next_ctx = self.next_ctx.wrapping_add(1);
        ctx
    }

    /// Starts a linearizable read of `collection` (the caller checked that the peer is joined).
    pub(super) fn start(
        &mut self,
        now_ms: u64,
        collection: String,
        timeout_ms: u64,
        f: QueryFn,
        raft: &mut RaftNode,
    ) {
        let ctx = self.next_ctx();
        self.pending.insert(
            ctx,
            PendingRead {
                collection,
                timeout_ms,
                f,
                deadline_ms: now_ms.saturating_add(timeout_ms),
                started_ms: now_ms,
                index: None,
                requested_at_ms: None,
            },
        );
        self.request(now_ms, ctx, raft);
    }

    fn request(&mut self, now_ms: u64, ctx: u64, raft: &mut RaftNode) {
        let asked = raft.read_index(now_ms, ctx).is_ok();
        if let Some(r) = self.pending.get_mut(&ctx) {
            r.requested_at_ms = asked.then_some(now_ms);
        }
    }

    /// A leader's answer. Re-asks can bring several: the first index counts (each is a valid read index,
    /// confirmed by a leader after it received the request, which was after the read began).
    pub(super) fn on_read_state(&mut self, rs: ReadState) {
        let Some(read) = self.pending.get_mut(&rs.ctx) else {
            return;
        };
        // A refusal or abandonment (`None`: the peer asked does not lead, or lost its leadership) is
        // asked again at the next leader change, or after `reask_after_ms`; never at once, since two
        // peers that each take the other for the leader would bounce it without pause.
        if let Some(index) = rs.index {
            read.index.get_or_insert(index);
        }
    }

    /// (Re-)asks the read index of reads without one: those not asked, those asked `reask_after_ms`
    /// ago, and all of them when `all` (a new leader).
    pub(super) fn retry(&mut self, now_ms: u64, all: bool, raft: &mut RaftNode) {
        let reask_after = self.reask_after_ms;
        let due: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, r)| {
                r.index.is_none()
                    && (all
                        || r.requested_at_ms
                            .is_none_or(|t| now_ms >= t.saturating_add(reask_after)))
            })
            .map(|(ctx, _)| *ctx)
            .collect();
        for ctx in due {
            self.request(now_ms, ctx, raft);
        }
    }

    /// Serves every read whose index this peer has applied.
    pub(super) fn serve(
        &mut self,
        applied: LogIndex,
        state_machines: &StateMachines,
        out: &mut Output,
    ) {
        let ready: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, r)| r.index.is_some_and(|i| i <= applied))
            .map(|(ctx, _)| *ctx)
            .collect();
        for ctx in ready {
            if let Some(read) = self.pending.remove(&ctx) {
                out.latency(READ_INDEX_SECONDS, read.started_ms);
                (read.f)(Ok(Served {
                    applied_index: applied,
                    machine: state_machines.get(&read.collection),
                }));
            }
        }
    }

    /// Fails the reads whose deadline has passed.
    pub(super) fn expire(
        &mut self,
        now_ms: u64,
        applied: LogIndex,
        state_machines: &StateMachines,
        bugs: PlantedBugs,
    ) {
        let expired: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, r)| now_ms >= r.deadline_ms)
            .map(|(ctx, _)| *ctx)
            .collect();
        for ctx in expired {
            if let Some(r) = self.pending.remove(&ctx) {
                if bugs.read_falls_back_to_local() {
                    (r.f)(Ok(Served {
                        applied_index: applied,
                        machine: state_machines.get(&r.collection),
                    }));
                } else {
                    (r.f)(Err(HamokError::Timeout {
                        after_ms: r.timeout_ms,
                    }));
                }
            }
        }
    }

    /// Fails every waiting read with `error`.
    pub(super) fn fail_all(&mut self, error: HamokError) {
        for (_, r) in std::mem::take(&mut self.pending) {
            (r.f)(Err(error.clone()));
        }
    }
}
