//! Global safety registries, fed at every step, and the invariant violations they detect.
//!
//! * Election safety: at most one leader per term, ever ([`Registry::record_leader`]).
//! * Log matching: every persisted entry is registered as `(index, term) -> (payload digest, previous
//!   entry's term)`. Two entries with the same index and term must agree on both; by induction on the index,
//!   the logs are then identical up to that point ([`Registry::record_log_entry`]).
//! * Commit uniqueness and leader completeness: every index any peer reports committed is registered with
//!   its term and the lowest term in which it was seen committed; every leader of a later term must hold it
//!   ([`Registry::record_commit`], checked by the cluster when leaders appear and when commits are learned).
//! * State machine safety: the entry applied at index `i` (term, payload, and the hash chain of the whole
//!   applied prefix) is the same on every peer ([`Registry::record_apply`]); every snapshot taken at index
//!   `i` has the same bytes, and an installed snapshot is byte-identical to one a peer took.
//! * Vote safety: a peer never votes for two candidates in one term, across restarts.

use std::collections::BTreeMap;
use std::fmt;

use crate::raft::{Entry, LogIndex, Membership, PeerId, Term};

use super::kv::ApplyResult;

/// A broken invariant.
#[derive(Clone, Debug)]
pub struct Violation {
    pub invariant: &'static str,
    pub detail: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.invariant, self.detail)
    }
}

pub type Check<T = ()> = Result<T, Violation>;

pub fn violation(invariant: &'static str, detail: impl Into<String>) -> Violation {
    Violation {
        invariant,
        detail: detail.into(),
    }
}

/// Fails with `invariant` unless `cond`.
pub fn ensure(cond: bool, invariant: &'static str, detail: impl FnOnce() -> String) -> Check {
    if cond {
        Ok(())
    } else {
        Err(violation(invariant, detail()))
    }
}

#[derive(Clone, Debug)]
pub struct CommittedRec {
    pub term: Term,
    /// The lowest term of any peer that reported this index committed: the entry was committed by the
    /// leader of that term or an earlier one, so every leader of a higher term must hold it.
    pub at_term: Term,
    pub first_by: PeerId,
}

#[derive(Clone, Debug)]
pub struct AppliedRec {
    pub term: Term,
    pub digest: u64,
    pub chain: u64,
    pub result: Option<ApplyResult>,
    pub membership: Option<Membership>,
    /// History sequence number and time of the first application anywhere.
    pub first_seq: u64,
    pub first_ms: u64,
    pub first_by: PeerId,
}

#[derive(Default)]
pub struct Registry {
    pub leaders: BTreeMap<Term, PeerId>,
    pub log: BTreeMap<(LogIndex, Term), (u64, Term, PeerId)>,
    pub committed: BTreeMap<LogIndex, CommittedRec>,
    pub applied: BTreeMap<LogIndex, AppliedRec>,
    pub snapshots: BTreeMap<LogIndex, (Term, u64, PeerId)>,
    pub votes: BTreeMap<(PeerId, Term), PeerId>,
    /// Committed configurations by index (from applied membership entries).
    pub memberships: BTreeMap<LogIndex, Membership>,
}

impl Registry {
    pub fn record_leader(&mut self, term: Term, id: &PeerId) -> Check {
        match self.leaders.get(&term) {
            Some(other) if other != id => Err(violation(
                "election safety",
                format!("two leaders in term {term}: {other} and {id}"),
            )),
            Some(_) => Ok(()),
            None => {
                self.leaders.insert(term, id.clone());
                Ok(())
            }
        }
    }

    pub fn record_vote(&mut self, node: &PeerId, term: Term, candidate: &PeerId) -> Check {
        match self.votes.get(&(node.clone(), term)) {
            Some(c) if c != candidate => Err(violation(
                "vote safety",
                format!("{node} voted for {c} and then {candidate} in term {term}"),
            )),
            Some(_) => Ok(()),
            None => {
                self.votes.insert((node.clone(), term), candidate.clone());
                Ok(())
            }
        }
    }

    pub fn record_log_entry(
        &mut self,
        node: &PeerId,
        index: LogIndex,
        term: Term,
        digest: u64,
        prev_term: Term,
    ) -> Check {
        match self.log.get(&(index, term)) {
            Some((d, p, by)) => {
                if *d != digest || *p != prev_term {
                    return Err(violation(
                        "log matching",
                        format!(
                            "{node} persisted entry ({index},{term}) with digest {digest:#x} after term {prev_term}, \
                             but {by} persisted ({index},{term}) with digest {d:#x} after term {p}"
                        ),
                    ));
                }
                Ok(())
            }
            None => {
                self.log
                    .insert((index, term), (digest, prev_term, node.clone()));
                Ok(())
            }
        }
    }

    /// Registers that `node` (in term `node_term`) knows `index` committed with entry term `term`.
    /// Returns true when the index is newly known committed, or known committed in an earlier term now.
    pub fn record_commit(
        &mut self,
        node: &PeerId,
        index: LogIndex,
        term: Term,
        node_term: Term,
    ) -> Check<bool> {
        match self.committed.get_mut(&index) {
            Some(rec) => {
                if rec.term != term {
                    return Err(violation(
                        "commit uniqueness",
                        format!(
                            "{node} has index {index} committed with term {term}, but {} had it committed with term {}",
                            rec.first_by, rec.term
                        ),
                    ));
                }
                if node_term < rec.at_term {
                    rec.at_term = node_term;
                    return Ok(true);
                }
                Ok(false)
            }
            None => {
                self.committed.insert(
                    index,
                    CommittedRec {
                        term,
                        at_term: node_term,
                        first_by: node.clone(),
                    },
                );
                Ok(true)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub fn record_apply(
        &mut self,
        node: &PeerId,
        e: &Entry,
        digest: u64,
        chain: u64,
        result: Option<ApplyResult>,
        seq: u64,
        now: u64,
    ) -> Check {
        match self.applied.get(&e.index) {
            Some(rec) => {
                if rec.term != e.term || rec.digest != digest {
                    return Err(violation(
                        "state machine safety",
                        format!(
                            "{node} applied ({}, {}) digest {digest:#x} at index {}, but {} applied ({}, {}) digest {:#x} there",
                            e.index, e.term, e.index, rec.first_by, e.index, rec.term, rec.digest
                        ),
                    ));
                }
                if rec.chain != chain {
                    return Err(violation(
                        "state machine safety",
                        format!(
                            "{node}'s applied prefix up to {} (hash {chain:#x}) differs from {}'s ({:#x})",
                            e.index, rec.first_by, rec.chain
                        ),
                    ));
                }
                if rec.result != result {
                    return Err(violation(
                        "state machine safety",
                        format!(
                            "{node} got result {result:?} applying index {}, {} got {:?}",
                            e.index, rec.first_by, rec.result
                        ),
                    ));
                }
                Ok(())
            }
            None => {
                let membership = match &e.payload {
                    crate::raft::EntryPayload::Membership(m) => {
                        self.memberships.insert(e.index, Membership::clone(m));
                        Some(Membership::clone(m))
                    }
                    _ => None,
                };
                self.applied.insert(
                    e.index,
                    AppliedRec {
                        term: e.term,
                        digest,
                        chain,
                        result,
                        membership,
                        first_seq: seq,
                        first_ms: now,
                        first_by: node.clone(),
                    },
                );
                Ok(())
            }
        }
    }

    /// A peer took a snapshot at `index`.
    pub fn record_snapshot(
        &mut self,
        node: &PeerId,
        index: LogIndex,
        term: Term,
        digest: u64,
    ) -> Check {
        match self.snapshots.get(&index) {
            Some((t, d, by)) => ensure(*t == term && *d == digest, "state machine safety", || {
                format!(
                    "{node} took a snapshot at ({index},{term}) with data {digest:#x}, {by} took ({index},{t}) with data {d:#x}"
                )
            }),
            None => {
                self.snapshots.insert(index, (term, digest, node.clone()));
                Ok(())
            }
        }
    }

    /// A peer installed a snapshot received from a leader: it must be one some peer took, byte for byte.
    pub fn check_installed_snapshot(
        &self,
        node: &PeerId,
        index: LogIndex,
        term: Term,
        digest: u64,
    ) -> Check {
        match self.snapshots.get(&index) {
            Some((t, d, by)) => ensure(*t == term && *d == digest, "snapshot integrity", || {
                format!(
                    "{node} installed a snapshot ({index},{term}) with data {digest:#x}, but {by}'s snapshot there is ({index},{t}) with data {d:#x}"
                )
            }),
            None => Err(violation(
                "snapshot integrity",
                format!("{node} installed a snapshot at ({index},{term}) that no peer ever took"),
            )),
        }
    }

    /// The latest committed configuration, from applied membership entries (or `genesis`).
    pub fn current_membership<'a>(&'a self, genesis: &'a Membership) -> &'a Membership {
        self.memberships.values().next_back().unwrap_or(genesis)
    }
}
