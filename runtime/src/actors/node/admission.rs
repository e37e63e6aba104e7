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

/// Most joiners waiting to be admitted at once; further join requests are ignored until room frees up
/// (their senders keep asking). Bounds the leader's memory against a flood of join requests.
const MAX_WAITING_JOINERS: usize = 64;

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
    /// The term this peer last started leading in: silence is judged only from the start of a term's
    /// leadership on (as a follower it had no reason to hear from the others).
    leading_term: Option<u64>,
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
            leading_term: None,
            peer_max_idle_ms,
        }
    }

    /// A frame came from `peer`. Only members are tracked (see `on_membership`), so the map stays as
    /// small as the configuration whatever else is on the bus.
    pub(super) fn heard(&mut self, peer: &PeerId, now_ms: u64) {
        if let Some(last) = self.last_heard.get_mut(peer) {
            *last = now_ms;
            self.reported_silent.remove(peer);
        }
    }

    /// This peer leads in `term`: when that is new, every member gets a full `peer_max_idle_ms` from now
    /// (as a follower it had no reason to hear from them).
    fn start_leading(&mut self, now_ms: u64, term: u64) {
        if self.leading_term == Some(term) {
            return;
        }
        self.leading_term = Some(term);
        for last in self.last_heard.values_mut() {
            *last = now_ms;
        }
        self.reported_silent.clear();
    }

    pub(super) fn on_join_request(&mut self, from: PeerId, only_follower: bool) {
        if self.wants_join.len() < MAX_WAITING_JOINERS || self.wants_join.contains_key(&from) {
            self.wants_join.insert(from, !only_follower);
        }
    }

    pub(super) fn on_leave_request(&mut self, from: PeerId) {
        self.wants_leave.insert(from);
    }

    /// A configuration was committed: track its members (a new one counts as heard now), forget the
    /// others, and drop the requests it satisfied.
    pub(super) fn on_membership(&mut self, now_ms: u64, membership: &Membership) {
        self.last_heard
            .retain(|p, _| membership.contains(p) && *p != self.id);
        for peer in membership.members() {
            if *peer != self.id {
                self.last_heard.entry(peer.clone()).or_insert(now_ms);
            }
        }
        self.reported_silent.retain(|p| membership.contains(p));
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
        self.start_leading(now_ms, raft.term());
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::{PersistedState, RaftConfig};

    /// A leader of one voter with two learners, `b` and `c`.
    fn leader() -> (RaftNode, Membership) {
        let mut membership = Membership::with_voters([PeerId::from("a")]);
        membership.learners = [PeerId::from("b"), PeerId::from("c")].into();
        let mut raft = RaftNode::new(
            PeerId::from("a"),
            RaftConfig::default(),
            1,
            0,
            PersistedState::genesis(membership.clone()),
        )
        .unwrap();
        raft.campaign_now(0);
        assert_eq!(raft.role(), Role::Leader);
        (raft, membership)
    }

    fn silent(received: &mut tokio::sync::broadcast::Receiver<HamokEvent>) -> Vec<String> {
        let mut out = Vec::new();
        while let Ok(e) = received.try_recv() {
            if let HamokEvent::NoHeartbeatFrom(p) = e {
                out.push(p.to_string());
            }
        }
        out
    }

    /// Silence is judged from the start of this peer's leadership: what it heard (or did not) as a
    /// follower says nothing, since followers do not talk to each other. (The whole-peer simulation
    /// found a new leader removing members it had simply never needed to hear from, when its first
    /// tick as leader came before the engine's role change was processed.)
    #[test]
    fn a_new_leader_gives_every_member_a_full_idle_period() {
        let (mut raft, membership) = leader();
        let mut admission = Admission::new(PeerId::from("a"), 1_000);
        let (events, mut received) = tokio::sync::broadcast::channel(64);
        let mut out = Output::new(events);
        admission.on_membership(0, &membership);
        // Long after the membership was applied, this peer starts leading.
        admission.duties(10_000, &mut raft, &mut out);
        assert!(silent(&mut received).is_empty());
        admission.heard(&PeerId::from("b"), 10_500);
        admission.duties(11_000, &mut raft, &mut out);
        assert_eq!(
            silent(&mut received),
            ["c"],
            "c said nothing for a whole period of leadership"
        );
    }
}
