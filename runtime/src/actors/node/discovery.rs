//! Discovery, joining and rejoining: where this peer stands with respect to a cluster ([`JoinState`]),
//! the hello announcements, the bootstrap rule, and the two rules that decide membership as this peer
//! reports it.
//!
//! * **The join rule.** A peer is `Joined` once it is a voter (a learner when `only_follower`) of a
//!   committed configuration that is at least as recent as its leader's: it leads, or, since it started
//!   looking, it obtained a read index from a leader (a ReadIndex round, as for a linearizable read)
//!   and has committed up to it. A peer's own, possibly stale, log never makes it joined by itself: a
//!   removed peer whose log never received its removal still lists itself as a voter.
//! * **The rejoin rule.** A joined peer that learns its removal (a committed configuration without it),
//!   or that has heard nothing from a leader for `peer_max_idle_ms` (the time after which a leader
//!   removes a silent member, so it may have been removed without hearing of it), reports `Rejoining`,
//!   stops saying it is joined, and looks for the cluster again. Only a leader's messages of the current
//!   term count as contact: another cut-off peer's election traffic does not.

use std::collections::BTreeMap;

use super::frames::Output;
use super::planted_bugs::PlantedBugs;
use crate::config::HamokConfig;
use crate::events::HamokEvent;
use crate::raft::{LogIndex, Membership, PeerId, RaftNode, ReadState, Role};
use crate::stats::JoinState;
use crate::wire::{HamokMessage, Hello, PROTOCOL_VERSION};

/// A change of join state the peer must act on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Transition {
    /// It became a member in contact with its leader.
    Joined,
    /// It is joined but no longer a member (or may not be): it must look for the cluster again.
    LostMembership,
    /// It is leaving and its removal is committed.
    LeaveCommitted,
}

/// Most peers remembered as looking for a cluster during one search (enough for any real service; a
/// flood of hellos from made-up ids cannot grow it further).
const MAX_DISCOVERED: usize = 1_024;

pub(super) struct Discovery {
    id: PeerId,
    state: JoinState,
    /// When the current search for the cluster began.
    started_ms: u64,
    /// Peers looking for a cluster too, and whether each may lead (only those may found one).
    discovered: BTreeMap<PeerId, bool>,
    /// A member of a cluster has been heard since this peer started: it never founds one itself (the
    /// cluster exists, even if it is out of reach right now; two clusters under one id would split the
    /// service's state).
    member_heard: bool,
    /// When a frame of this cluster in another protocol version last came: a peer of another build
    /// is on the bus, possibly a member of the cluster that holds the service's state, which this
    /// peer cannot hear. It founds no cluster until a whole discovery window passed without one.
    other_version_heard_ms: Option<u64>,
    /// The other protocol version last reported (one event per version change, not one per frame).
    reported_version: Option<u16>,
    last_hello_ms: Option<u64>,
    /// The last message from a leader of the current term.
    last_leader_contact_ms: u64,
    /// The ReadIndex round of the current search: its context and when it was asked.
    membership_read: Option<(u64, u64)>,
    /// The read index that round obtained: the join rule waits until this peer has committed that far.
    catch_up_to: Option<LogIndex>,
    /// A membership read unanswered for this long is asked again.
    reask_after_ms: u64,

    hello_interval_ms: u64,
    discovery_window_ms: u64,
    peer_max_idle_ms: u64,
    only_follower: bool,
}

impl Discovery {
    pub(super) fn new(id: PeerId, config: &HamokConfig) -> Self {
        Discovery {
            id,
            state: JoinState::Idle,
            started_ms: 0,
            discovered: BTreeMap::new(),
            member_heard: false,
            other_version_heard_ms: None,
            reported_version: None,
            last_hello_ms: None,
            last_leader_contact_ms: 0,
            membership_read: None,
            catch_up_to: None,
            reask_after_ms: config.election_timeout_ms,

            hello_interval_ms: config.hello_interval_ms,
            discovery_window_ms: config.discovery_window_ms,
            peer_max_idle_ms: config.peer_max_idle_ms,
            only_follower: config.only_follower,
        }
    }

    pub(super) fn state(&self) -> JoinState {
        self.state
    }

    /// Whether the peer takes part in Raft at all (ticks and messages).
    pub(super) fn participating(&self) -> bool {
        !matches!(self.state, JoinState::Idle | JoinState::Left)
    }

    /// Whether requests and linearizable reads are accepted.
    pub(super) fn accepts_requests(&self) -> bool {
        matches!(self.state, JoinState::Joined | JoinState::Leaving)
    }

    /// Starts looking for the cluster (a first join, or a rejoin).
    pub(super) fn start(&mut self, now_ms: u64) {
        self.state = JoinState::Discovering;
        self.started_ms = now_ms;
        self.discovered.clear();
        self.last_hello_ms = None;
        self.membership_read = None;
        self.catch_up_to = None;
    }

    /// A joined peer lost its membership (or cannot tell): it says so and looks for the cluster again.
    pub(super) fn rejoin(&mut self, now_ms: u64, out: &mut Output) {
        out.emit(HamokEvent::Rejoining);
        self.start(now_ms);
    }

    pub(super) fn begin_leave(&mut self) {
        self.state = JoinState::Leaving;
    }

    pub(super) fn left(&mut self) {
        self.state = JoinState::Left;
    }

    /// A new link: announce at once.
    pub(super) fn on_link_up(&mut self) {
        if self.state == JoinState::Discovering {
            self.last_hello_ms = None;
        }
    }

    /// `from` said goodbye: it no longer looks for a cluster.
    pub(super) fn forget(&mut self, from: &PeerId) {
        self.discovered.remove(from);
    }

    /// When this peer last heard from its leader (or became one, or joined).
    pub(super) fn last_leader_contact_ms(&self) -> u64 {
        self.last_leader_contact_ms
    }

    /// A message from the leader of the current term (judged by the engine after stepping it).
    pub(super) fn on_leader_contact(&mut self, now_ms: u64) {
        self.last_leader_contact_ms = now_ms;
    }

    /// While discovering and following a leader: asks it for a read index (once per search, again if
    /// unanswered for `reask_after_ms`), so the join rule knows how far this peer must commit.
    /// `next_ctx` numbers the request among the peer's reads.
    pub(super) fn ask_membership_read(
        &mut self,
        now_ms: u64,
        raft: &mut RaftNode,
        next_ctx: impl FnOnce() -> u64,
    ) {
        if self.state != JoinState::Discovering
            || self.catch_up_to.is_some()
            || raft.role() == Role::Leader
            || raft.leader_id().is_none()
            || self
                .membership_read
                .is_some_and(|(_, at)| now_ms < at.saturating_add(self.reask_after_ms))
        {
            return;
        }
        let ctx = next_ctx();
        self.membership_read = raft
            .read_index(now_ms, ctx)
            .is_ok()
            .then_some((ctx, now_ms));
    }

    /// The outcome of a read-index request, if it was this search's membership read (returns whether
    /// it was).
    pub(super) fn on_read_state(&mut self, rs: &ReadState) -> bool {
        if self.membership_read.map(|(ctx, _)| ctx) != Some(rs.ctx) {
            return false;
        }
        // A refusal (`None`) is asked again after `reask_after_ms`.
        if let Some(index) = rs.index {
            self.catch_up_to.get_or_insert(index);
        }
        true
    }

    /// This peer leads: it is its own leader contact.
    pub(super) fn on_leading(&mut self, now_ms: u64) {
        self.last_leader_contact_ms = now_ms;
    }

    /// The planted bug: any higher-term message counts as leader contact.
    pub(super) fn on_higher_term(&mut self, now_ms: u64, bugs: PlantedBugs) {
        if bugs.idle_timer_refreshed_by_any_higher_term() {
            self.last_leader_contact_ms = now_ms;
        }
    }

    /// Whether this peer may call itself joined: a voter (any member, when only a follower) of the
    /// committed configuration and of the latest one in its log. A removal of this peer still pending
    /// in the log it caught up on would take it out again right after: the whole-peer simulation saw a
    /// restarted peer's `join()` answer `Ok` and the peer removed 80 ms later, when the removal (decided
    /// while it was silent) committed. It waits for that removal to commit or be overwritten instead.
    fn is_member(&self, raft: &RaftNode) -> bool {
        let lists = |membership: &Membership| {
            if self.only_follower {
                membership.contains(&self.id)
            } else {
                membership.is_voter(&self.id)
            }
        };
        lists(raft.membership()) && lists(raft.latest_membership())
    }

    /// The join and rejoin rules, applied to the engine's committed configuration.
    pub(super) fn judge(&mut self, now_ms: u64, raft: &RaftNode) -> Option<Transition> {
        let listed = raft.membership().contains(&self.id);
        match self.state {
            JoinState::Discovering => {
                let current = if raft.role() == Role::Leader {
                    true
                } else {
                    raft.leader_id().is_some()
                        && self.catch_up_to.is_some_and(|c| raft.commit_index() >= c)
                };
                if current && self.is_member(raft) {
                    self.state = JoinState::Joined;
                    self.last_leader_contact_ms = now_ms;
                    return Some(Transition::Joined);
                }
                None
            }
            JoinState::Joined if !listed => Some(Transition::LostMembership),
            JoinState::Joined
                if raft.role() != Role::Leader
                    && now_ms
                        >= self
                            .last_leader_contact_ms
                            .saturating_add(self.peer_max_idle_ms) =>
            {
                Some(Transition::LostMembership)
            }
            JoinState::Leaving if !listed => Some(Transition::LeaveCommitted),
            _ => None,
        }
    }

    fn hello(&self, raft: &RaftNode, reply: bool) -> Hello {
        Hello {
            member: raft.membership().contains(&self.id),
            leader: raft.leader_id().cloned(),
            term: raft.term(),
            joining: self.state == JoinState::Discovering,
            reply,
            can_lead: !self.only_follower,
        }
    }

    fn join_request(&self) -> HamokMessage {
        HamokMessage::JoinRequest {
            only_follower: self.only_follower,
        }
    }

    /// While discovering: announce every `hello_interval_ms` (a broadcast hello, and a join request to
    /// the leader when one is known).
    pub(super) fn announce(
        &mut self,
        now_ms: u64,
        raft: &RaftNode,
        leader: Option<PeerId>,
        out: &mut Output,
    ) {
        if self.state != JoinState::Discovering {
            return;
        }
        if self
            .last_hello_ms
            .is_some_and(|t| now_ms < t.saturating_add(self.hello_interval_ms))
        {
            return;
        }
        self.last_hello_ms = Some(now_ms);
        out.broadcast(HamokMessage::Hello(self.hello(raft, true)));
        if let Some(leader) = leader {
            out.send(leader, self.join_request());
        }
    }

    /// The bootstrap rule: this peer has heard no member of a cluster since it started (for at least a
    /// whole discovery window), has never been part of one (no configuration in its log: a peer that
    /// left keeps its log), may lead, has heard no peer of its cluster speaking another protocol
    /// version for a whole discovery window (see [`Discovery::heard_other_version`]), and has the
    /// lowest id among the peers it heard looking (that may lead): it founds a cluster of one.
    /// Everyone else waits for it.
    pub(super) fn should_bootstrap(&self, now_ms: u64, raft: &RaftNode, bugs: PlantedBugs) -> bool {
        let pristine =
            raft.last_index() == 0 && raft.term() == 0 && raft.membership().voters.is_empty();
        let other_version_heard = self
            .other_version_heard_ms
            .is_some_and(|t| now_ms < t.saturating_add(self.discovery_window_ms));
        if self.state != JoinState::Discovering
            || self.member_heard
            || other_version_heard
            || !pristine
            || self.only_follower
            || now_ms < self.started_ms.saturating_add(self.discovery_window_ms)
        {
            return false;
        }
        if bugs.bootstrap_ignores_lowest_id() {
            return true;
        }
        let lowest = self
            .discovered
            .iter()
            .filter(|(_, can_lead)| **can_lead)
            .map(|(p, _)| p)
            .chain(std::iter::once(&self.id))
            .min();
        lowest == Some(&self.id)
    }

    /// A frame of this cluster in protocol `version`, which this build cannot read: a peer of another
    /// build of hamok is on the bus (a rolling upgrade across protocol versions, a stale replica).
    /// It may belong to the cluster that holds the service's state, out of this peer's hearing, so
    /// this peer founds no cluster while such frames come (two clusters under one id would split
    /// the state, and grant one lock twice). Reported once per version change, as an event and a
    /// warning; `dropped_version` counts the frames.
    pub(super) fn heard_other_version(&mut self, now_ms: u64, version: u16, out: &mut Output) {
        self.other_version_heard_ms = Some(now_ms);
        if self.reported_version == Some(version) {
            return;
        }
        self.reported_version = Some(version);
        tracing::warn!(
            peer = %self.id,
            theirs = version,
            ours = PROTOCOL_VERSION,
            "peers of this cluster speak another protocol version: neither side reads the other's \
             frames, and this peer founds no cluster while it hears them"
        );
        out.emit(HamokEvent::ProtocolVersionMismatch {
            theirs: version,
            ours: PROTOCOL_VERSION,
        });
    }

    /// A hello from `from`. Members answer hellos that ask for it; a discovering peer learns who leads
    /// (`leader_hint`) and asks to join.
    pub(super) fn on_hello(
        &mut self,
        from: PeerId,
        hello: Hello,
        raft: &RaftNode,
        leader_hint: &mut Option<PeerId>,
        out: &mut Output,
    ) {
        if hello.member {
            self.member_heard = true;
            if let Some(leader) = hello.leader.clone() {
                if raft.leader_id().is_none() {
                    *leader_hint = Some(leader);
                }
            }
        } else if hello.joining
            && (self.discovered.len() < MAX_DISCOVERED || self.discovered.contains_key(&from))
        {
            self.discovered.insert(from.clone(), hello.can_lead);
        }
        if hello.reply && raft.membership().contains(&self.id) {
            out.send(from, HamokMessage::Hello(self.hello(raft, false)));
        }
        if self.state == JoinState::Discovering && hello.member {
            if let Some(leader) = raft.leader_id().cloned().or(leader_hint.clone()) {
                out.send(leader, self.join_request());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::{
        Entry, EntryPayload, HardState, Message, MessageBody, PersistedState, RaftConfig, Snapshot,
        SnapshotMeta,
    };

    fn member_hello() -> Hello {
        Hello {
            member: true,
            leader: None,
            term: 3,
            joining: false,
            reply: false,
            can_lead: true,
        }
    }

    /// A peer that has heard a member of a cluster never founds one itself, even in a later search
    /// during which it hears nobody (the cluster exists, it is only out of reach). (The whole-peer
    /// simulation found a pristine peer that had met the cluster, left it before being admitted, and,
    /// cut off when joining again, founded a second cluster under the same id.)
    #[test]
    // `PlantedBugs` is a unit struct only without the feature `testing`.
    #[allow(clippy::default_constructed_unit_structs)]
    fn a_peer_that_heard_a_member_never_bootstraps() {
        let config = HamokConfig::default();
        let raft = RaftNode::new(
            PeerId::from("a"),
            RaftConfig::default(),
            1,
            0,
            PersistedState::default(),
        )
        .unwrap();
        let mut hint = None;
        let (events, _received) = tokio::sync::broadcast::channel(64);
        let mut out = Output::new(events);

        let mut lonely = Discovery::new(PeerId::from("a"), &config);
        lonely.start(0);
        assert!(lonely.should_bootstrap(config.discovery_window_ms, &raft, PlantedBugs::default()));

        let mut discovery = Discovery::new(PeerId::from("a"), &config);
        discovery.start(0);
        discovery.on_hello(
            PeerId::from("m"),
            member_hello(),
            &raft,
            &mut hint,
            &mut out,
        );
        discovery.left();
        discovery.start(10_000);
        let later = 10_000 + 10 * config.discovery_window_ms;
        assert!(!discovery.should_bootstrap(later, &raft, PlantedBugs::default()));
    }

    /// A peer that hears its cluster speaking another protocol version founds no cluster until a
    /// whole discovery window passed without such a frame, and reports the mismatch once per version.
    #[test]
    #[allow(clippy::default_constructed_unit_structs)]
    fn a_peer_that_hears_another_protocol_version_waits_to_bootstrap() {
        let config = HamokConfig::default();
        let window = config.discovery_window_ms;
        let raft = RaftNode::new(
            PeerId::from("a"),
            RaftConfig::default(),
            1,
            0,
            PersistedState::default(),
        )
        .unwrap();
        let (events, mut received) = tokio::sync::broadcast::channel(64);
        let mut out = Output::new(events);
        let mut discovery = Discovery::new(PeerId::from("a"), &config);
        discovery.start(0);
        // The old build speaks every 100 ms for three windows.
        let mut now = 0;
        while now < 3 * window {
            discovery.heard_other_version(now, PROTOCOL_VERSION - 1, &mut out);
            assert!(
                !discovery.should_bootstrap(now, &raft, PlantedBugs::default()),
                "founded a cluster at {now} ms while another version spoke"
            );
            now += 100;
        }
        let last = now - 100;
        assert!(!discovery.should_bootstrap(last + window - 1, &raft, PlantedBugs::default()));
        assert!(discovery.should_bootstrap(last + window, &raft, PlantedBugs::default()));
        // One event for the whole run of frames of one version, one more for another version.
        discovery.heard_other_version(now, PROTOCOL_VERSION + 1, &mut out);
        let mut mismatches = Vec::new();
        while let Ok(event) = received.try_recv() {
            if let HamokEvent::ProtocolVersionMismatch { theirs, ours } = event {
                mismatches.push((theirs, ours));
            }
        }
        assert_eq!(
            mismatches,
            [
                (PROTOCOL_VERSION - 1, PROTOCOL_VERSION),
                (PROTOCOL_VERSION + 1, PROTOCOL_VERSION)
            ]
        );
    }

    /// A peer that caught up with its leader joins only if the latest configuration in its log keeps
    /// it: a removal of it still pending there (decided while it was silent) would take it out again
    /// as soon as it commits, right after `join()` answered `Ok`.
    #[test]
    fn a_pending_removal_of_the_peer_holds_its_join_back() {
        let id = |s: &str| PeerId::from(s);
        let judged = |pending_removal: bool| {
            let members = Membership::with_voters([id("a"), id("l"), id("x")]);
            let entries = if pending_removal {
                vec![Entry {
                    term: 2,
                    index: 1,
                    payload: EntryPayload::Membership(Box::new(Membership::with_voters([
                        id("l"),
                        id("x"),
                    ]))),
                }]
            } else {
                Vec::new()
            };
            let persisted = PersistedState {
                hard_state: HardState {
                    term: 2,
                    voted_for: None,
                },
                snapshot: Snapshot {
                    meta: SnapshotMeta {
                        last_index: 0,
                        last_term: 0,
                        membership: members,
                    },
                    data: Default::default(),
                },
                entries,
                committed: 0,
            };
            let mut raft = RaftNode::new(id("a"), RaftConfig::default(), 1, 0, persisted).unwrap();
            // The leader's heartbeat: the peer knows its leader, and commits nothing more.
            raft.step(
                1,
                Message {
                    from: id("l"),
                    to: id("a"),
                    term: 2,
                    body: MessageBody::Heartbeat {
                        commit: 0,
                        read_seq: 0,
                    },
                },
            );
            assert_eq!(raft.leader_id(), Some(&id("l")));
            assert!(raft.membership().is_voter(&id("a")));
            let mut discovery = Discovery::new(id("a"), &HamokConfig::default());
            discovery.start(0);
            // Caught up with the read index the leader gave.
            discovery.catch_up_to = Some(0);
            discovery.judge(2, &raft)
        };
        assert!(matches!(judged(false), Some(Transition::Joined)));
        assert_eq!(
            judged(true),
            None,
            "joined while its own removal is pending"
        );
    }
}
