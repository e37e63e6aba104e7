//! The leader's membership duties: admit joiners (as learners, promoted once caught up), remove
//! members that asked to leave, and remove members silent for `peer_max_idle_ms`, all through the log,
//! one change at a time.
//!
//! A member is silent when no frame of any kind (Raft, hello, join request) has come from it for
//! `peer_max_idle_ms`; a member that keeps answering is never removed for idleness.

use std::collections::{BTreeMap, BTreeSet};

use super::frames::Output;
use crate::events::HamokEvent;
use crate::raft::{Membership, MembershipChange, PeerId, RaftNode, Role};

pub(super) struct Admission {
    id: PeerId,
    /// Peers that asked to join, and whether each wants to vote (false: `only_follower`).
    wants_join: BTreeMap<PeerId, bool>,
    /// Members that asked to leave.
    wants_leave: BTreeSet<PeerId>,
    /// When each peer was last heard from (any frame).
    last_heard: BTreeMap<PeerId, u64>,
    /// Members reported silent (`NoHeartbeatFrom`) and not heard from since.
    reported_silent: BTreeSet<PeerId>,
    peer_max_idle_ms: u64,
}

impl Admission {
    pub(super) fn new(id: PeerId, peer_max_idle_ms: u64) -> Self {
        Admission {
            id,
            wants_join: BTreeMap::new(),
            wants_leave: BTreeSet::new(),
            last_heard: BTreeMap::new(),
            reported_silent: BTreeSet::new(),
            peer_max_idle_ms,
        }
    }

    /// A frame came from `peer`.
    pub(super) fn heard(&mut self, peer: &PeerId, now_ms: u64) {
        self.last_heard.insert(peer.clone(), now_ms);
        self.reported_silent.remove(peer);
    }

    /// `peer` is gone (said goodbye, or its removal is committed): forget when it was heard.
    pub(super) fn forget(&mut self, peer: &PeerId) {
        self.last_heard.remove(peer);
        self.reported_silent.remove(peer);
    }

    /// This peer became the leader: every member gets a full `peer_max_idle_ms` from now (we had no
    /// reason to hear from them before).
    pub(super) fn on_leading(&mut self, now_ms: u64, members: impl Iterator<Item = PeerId>) {
        for peer in members {
            self.heard(&peer, now_ms);
        }
    }

    pub(super) fn on_join_request(&mut self, from: PeerId, only_follower: bool) {
        self.wants_join.insert(from, !only_follower);
    }

    pub(super) fn on_leave_request(&mut self, from: PeerId) {
        self.wants_leave.insert(from);
    }

    /// Drops the requests a committed configuration satisfied.
    pub(super) fn on_membership(&mut self, membership: &Membership) {
        self.wants_join.retain(|p, wants_vote| {
            !(membership.is_voter(p) || (membership.is_learner(p) && !*wants_vote))
        });
        self.wants_leave.retain(|p| membership.contains(p));
    }

    /// Leader only: proposes the next membership change, if any. What cannot be proposed now (another
    /// change pending, a learner still behind) is tried again on the next tick.
    pub(super) fn duties(&mut self, now_ms: u64, raft: &mut RaftNode, out: &mut Output) {
        if raft.role() != Role::Leader {
            return;
        }
        let latest = raft.latest_membership().clone();
        self.wants_join.retain(|p, wants_vote| {
            !(latest.is_voter(p) || (latest.is_learner(p) && !*wants_vote))
        });
        let mut silent = Vec::new();
        for peer in latest.members() {
            if *peer == self.id {
                continue;
            }
            let last = *self.last_heard.entry(peer.clone()).or_insert(now_ms);
            if now_ms >= last.saturating_add(self.peer_max_idle_ms) {
                if self.reported_silent.insert(peer.clone()) {
                    out.emit(HamokEvent::NoHeartbeatFrom(peer.clone()));
                }
                silent.push(peer.clone());
            }
        }
        let change = if let Some(peer) = self.wants_leave.iter().find(|p| latest.contains(p)) {
            Some(MembershipChange::Remove(peer.clone()))
        } else if let Some(peer) = silent.first() {
            Some(MembershipChange::Remove(peer.clone()))
        } else if let Some((peer, _)) = self.wants_join.iter().find(|(p, _)| !latest.contains(p)) {
            Some(MembershipChange::AddLearner(peer.clone()))
        } else {
            let commit = raft.commit_index();
            self.wants_join
                .iter()
                .find(|(p, wants_vote)| {
                    **wants_vote
                        && latest.is_learner(p)
                        && raft.match_index(p).is_some_and(|m| m >= commit)
                })
                .map(|(p, _)| MembershipChange::Promote(p.clone()))
        };
        if let Some(change) = change {
            let _ = raft.propose_membership(now_ms, change);
        }
    }
}
