//! The protocol: elections (pre-vote, check-quorum, leader lease), replication (immediate, batched,
//! pipelined), commit, membership through the log, leadership transfer, ReadIndex and snapshots.
//!
//! Everything here is driven by the caller: no clock, no I/O. Each entry point takes `now_ms`; output is
//! collected and handed out by [`RaftNode::take_ready`].

use std::collections::BTreeMap;

use bytes::Bytes;

use super::config::RaftConfig;
use super::error::{RaftError, RaftStartError};
use super::membership::{Membership, MembershipChange};
use super::message::{Message, MessageBody};
use super::progress::{Progress, ProgressState};
use super::raft_log::RaftLog;
use super::read_only::ReadOnly;
use super::ready::{ReadState, Ready, SoftState};
use super::rng::SeededRng;
use super::snapshot::{ChunkOutcome, SnapshotReceiver, SnapshotSender};
use super::types::{
    Entry, EntryPayload, HardState, LogIndex, PeerId, PersistedState, Role, Snapshot, SnapshotMeta,
    Term,
};
use super::votes::{VoteResult, VoteTally};

/// Planted bugs that prove the simulation catches unsafe engines. Compiled only into this crate's own
/// unit tests: unreachable from the public API.
#[cfg(test)]
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct PlantedBugs {
    /// The leader commits its last entry without waiting for a majority.
    pub commit_without_quorum: bool,
    /// Votes (and pre-votes) are granted without the up-to-date log check.
    pub vote_without_log_check: bool,
    /// With `persist_async`, the leader counts its own log toward a commit before it is reported
    /// durable.
    pub count_own_log_unsynced: bool,
    /// An append's `committed_once_held` is set whatever the number of voters (with five, two copies
    /// are no majority).
    pub committed_once_held_any_size: bool,
    /// An append's `committed_once_held` counts the leader's copy before it is durable.
    pub committed_once_held_unsynced: bool,
    /// A read begins at the leader's commit index, below what a follower may have committed on a
    /// promise (and answered).
    pub read_ignores_promises: bool,
}

/// A snapshot of a peer's observable state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    /// This peer.
    pub id: PeerId,
    /// Its role.
    pub role: Role,
    /// Its term.
    pub term: Term,
    /// The leader it knows of.
    pub leader: Option<PeerId>,
    /// Highest index known committed.
    pub commit_index: LogIndex,
    /// Highest index handed out for applying.
    pub applied_index: LogIndex,
    /// Last index in the log.
    pub last_index: LogIndex,
    /// Last index covered by the snapshot.
    pub snapshot_index: LogIndex,
    /// The committed configuration (the one in force).
    pub membership: Membership,
}

/// One Raft peer: a deterministic state machine over messages, time and proposals.
///
/// See the [module documentation](super) for the contract and an example.
pub struct RaftNode {
    id: PeerId,
    config: RaftConfig,
    rng: SeededRng,
    now_ms: u64,

    // Persistent state (mirrored; the driver persists it from `Ready`).
    term: Term,
    voted_for: Option<PeerId>,
    log: RaftLog,
    /// The latest snapshot, kept to send to peers that are too far behind.
    snapshot: Snapshot,
    /// The snapshot's bytes were handed out by `take_snapshot_buffer` for the next snapshot: nothing
    /// is sent from them until `compact` or an install replaces the snapshot.
    snapshot_buffer_taken: bool,

    // Configuration: every configuration in the log, oldest first; the first is the snapshot's.
    // The committed one (in force) is the last at or below the commit index.
    configs: Vec<(LogIndex, Membership)>,
    committed_config: usize,

    // Volatile state.
    role: Role,
    leader: Option<PeerId>,
    election_deadline_ms: u64,
    last_leader_contact_ms: Option<u64>,
    /// The newest heartbeat round this follower answered, and the term it was in. A heartbeat of a
    /// round already answered (the leader's commit notices reuse the current round) is not answered
    /// again: the leader needs one answer per round, and commit notices would otherwise double the
    /// messages of every write.
    answered_round: (Term, u64),
    votes: VoteTally,
    incoming_snapshot: Option<SnapshotReceiver>,

    // Leader state.
    progress: BTreeMap<PeerId, Progress>,
    /// The highest `committed_once_held` this leader has sent in its term: a follower may have
    /// committed (and answered a client) up to there before this leader counted it, so no read
    /// index is lower.
    promised: LogIndex,
    heartbeat_deadline_ms: u64,
    check_quorum_deadline_ms: u64,
    transfer: Option<(PeerId, u64)>,
    read_only: ReadOnly,

    // Output, drained by `take_ready`.
    messages: Vec<Message>,
    read_states: Vec<ReadState>,
    snapshot_to_restore: Option<Snapshot>,
    hard_state_dirty: bool,
    reported_soft_state: SoftState,
    needs_flush: bool,

    #[cfg(test)]
    bugs: PlantedBugs,
}

impl RaftNode {
    /// Creates a peer from its persisted state: [`PersistedState::genesis`] for the founding members of a
    /// new cluster, an empty `PersistedState::default()` for a peer that will be added by a leader, or
    /// what the log store recovered after a restart. The peer starts as a follower.
    pub fn new(
        id: PeerId,
        config: RaftConfig,
        seed: u64,
        now_ms: u64,
        state: PersistedState,
    ) -> Result<RaftNode, RaftStartError> {
        config.validate()?;
        let meta = &state.snapshot.meta;
        let log = RaftLog::new(
            meta.last_index,
            meta.last_term,
            state.entries,
            state.committed,
        )?;
        let mut configs = vec![(meta.last_index, meta.membership.clone())];
        for i in log.first_index()..=log.last_index() {
            if let Some(Entry {
                payload: EntryPayload::Membership(m),
                ..
            }) = log.entry(i)
            {
                configs.push((i, Membership::clone(m)));
            }
        }
        let mut node = RaftNode {
            id,
            rng: SeededRng::new(seed),
            now_ms,
            term: state.hard_state.term,
            voted_for: state.hard_state.voted_for,
            log,
            snapshot: state.snapshot,
            snapshot_buffer_taken: false,
            configs,
            committed_config: 0,
            role: Role::Follower,
            leader: None,
            election_deadline_ms: now_ms,
            last_leader_contact_ms: None,
            answered_round: (0, 0),
            votes: VoteTally::default(),
            incoming_snapshot: None,
            progress: BTreeMap::new(),
            promised: 0,
            heartbeat_deadline_ms: now_ms,
            check_quorum_deadline_ms: now_ms,
            transfer: None,
            read_only: ReadOnly::default(),
            messages: Vec::new(),
            read_states: Vec::new(),
            snapshot_to_restore: None,
            hard_state_dirty: false,
            reported_soft_state: SoftState {
                role: Role::Follower,
                term: state.hard_state.term,
                leader: None,
            },
            needs_flush: false,
            config,
            #[cfg(test)]
            bugs: PlantedBugs::default(),
        };
        node.refresh_committed_config();
        node.reset_election_deadline();
        Ok(node)
    }

    /// Turns on planted bugs (this crate's unit tests only).
    #[cfg(test)]
    pub(crate) fn set_planted_bugs(&mut self, bugs: PlantedBugs) {
        self.bugs = bugs;
    }

    // ------------------------------------------------------------------------------------------------
    // Inputs

    /// The driver made this peer's log durable up to `index`, the entry there having `term` when it
    /// was written (with [`RaftConfig::persist_async`]: report each Ready's last entry once its write
    /// is durable; reports may lag, and one the log no longer matches is ignored). A leader may then
    /// commit: its own copy counts toward a majority from here on.
    pub fn on_persisted(&mut self, index: LogIndex, term: Term) {
        if self.log.mark_durable(index, term) {
            self.maybe_commit();
        }
    }

    /// Lets time pass: election timeouts, heartbeats, check-quorum, retransmission, transfer timeouts.
    pub fn tick(&mut self, now_ms: u64) {
        self.advance_clock(now_ms);
        if self.role == Role::Leader {
            self.tick_leader();
        } else if self.now_ms >= self.election_deadline_ms {
            if self.is_promotable() {
                self.start_pre_vote();
            } else {
                // A learner (or removed peer) never campaigns; it only stops claiming to know a leader
                // it has not heard from for an election timeout.
                self.leader = None;
                self.reset_election_deadline();
            }
        }
    }

    /// Handles a message from a peer. Messages addressed to another peer are ignored.
    pub fn step(&mut self, now_ms: u64, msg: Message) {
        self.advance_clock(now_ms);
        if msg.to != self.id || msg.from == self.id {
            return;
        }
        if msg.term > self.term {
            match msg.body {
                MessageBody::RequestVote { transfer, .. } if !transfer && self.in_lease() => {
                    // Leader lease (check-quorum): we heard from a live leader recently, so this
                    // candidate is partitioned or flapping. Ignore it without adopting its term.
                    return;
                }
                MessageBody::RequestVote { pre_vote: true, .. } => {}
                MessageBody::VoteResponse {
                    pre_vote: true,
                    granted: true,
                } => {}
                MessageBody::AppendEntries { .. }
                | MessageBody::Heartbeat { .. }
                | MessageBody::InstallSnapshot { .. }
                | MessageBody::TimeoutNow => self.become_follower(msg.term, Some(msg.from.clone())),
                _ => self.become_follower(msg.term, None),
            }
        } else if msg.term < self.term {
            match msg.body {
                MessageBody::AppendEntries { .. }
                | MessageBody::Heartbeat { .. }
                | MessageBody::InstallSnapshot { .. } => {
                    // A deposed leader: our term in the answer makes it step down.
                    self.send(
                        msg.from,
                        MessageBody::AppendResponse {
                            success: false,
                            index: 0,
                            hint_index: 0,
                            hint_term: 0,
                        },
                    );
                }
                MessageBody::RequestVote { pre_vote: true, .. } => {
                    self.send(
                        msg.from,
                        MessageBody::VoteResponse {
                            pre_vote: true,
                            granted: false,
                        },
                    );
                }
                MessageBody::ReadIndexRequest { ctx } => {
                    self.send(
                        msg.from,
                        MessageBody::ReadIndexResponse { ctx, index: None },
                    );
                }
                MessageBody::ReadIndexResponse { ctx, index } => {
                    // An answer from the leader of an older term is still a valid read index: that
                    // leader confirmed its leadership after it received the request, so every write
                    // completed before the read began is at or below it. Dropping it left the read
                    // waiting for an answer that never came (simulation seed 17833).
                    self.read_states.push(ReadState { ctx, index });
                }
                _ => {}
            }
            return;
        }

        if self.role == Role::Leader && msg.term == self.term {
            if let Some(pr) = self.progress.get_mut(&msg.from) {
                pr.recent_active = true;
            }
        }

        let from = msg.from;
        let term = msg.term;
        match msg.body {
            MessageBody::RequestVote {
                pre_vote,
                last_log_index,
                last_log_term,
                ..
            } => self.handle_request_vote(from, term, pre_vote, last_log_index, last_log_term),
            MessageBody::VoteResponse { pre_vote, granted } => {
                self.handle_vote_response(from, term, pre_vote, granted)
            }
            MessageBody::AppendEntries {
                prev_log_index,
                prev_log_term,
                entries,
                leader_commit,
                committed_once_held,
            } => self.handle_append(
                from,
                (prev_log_index, prev_log_term),
                entries,
                leader_commit,
                committed_once_held,
            ),
            MessageBody::AppendResponse {
                success,
                index,
                hint_index,
                hint_term,
            } => self.handle_append_response(from, success, index, hint_index, hint_term),
            MessageBody::Heartbeat { commit, read_seq } => {
                self.handle_heartbeat(from, commit, read_seq)
            }
            MessageBody::HeartbeatResponse { read_seq } => {
                self.handle_heartbeat_response(from, read_seq)
            }
            MessageBody::InstallSnapshot {
                meta,
                offset,
                data,
                done,
            } => self.handle_install_snapshot(from, meta, offset, data, done),
            MessageBody::SnapshotResponse {
                last_index,
                last_term,
                next_offset,
                done,
            } => self.handle_snapshot_response(from, last_index, last_term, next_offset, done),
            MessageBody::TimeoutNow => self.handle_timeout_now(from),
            MessageBody::ReadIndexRequest { ctx } => self.handle_read_index_request(from, ctx),
            MessageBody::ReadIndexResponse { ctx, index } => {
                self.read_states.push(ReadState { ctx, index });
            }
        }
    }

    /// Appends a command to the leader's log; it is sent to followers with the next `take_ready`.
    /// Returns the (index, term) it will commit at, if it commits.
    pub fn propose(&mut self, now_ms: u64, data: Bytes) -> Result<(LogIndex, Term), RaftError> {
        self.advance_clock(now_ms);
        self.check_can_propose()?;
        if data.len() > self.config.limits.max_command_bytes {
            return Err(RaftError::CommandTooLarge {
                size: data.len(),
                limit: self.config.limits.max_command_bytes,
            });
        }
        if self.log.uncommitted_bytes() + data.len() > self.config.limits.max_uncommitted_bytes {
            return Err(RaftError::Busy);
        }
        Ok(self.append_own(EntryPayload::Command(data)))
    }

    /// Proposes a single-server configuration change. Refused while another change is uncommitted, and
    /// until this leader has committed an entry of its own term (the single-server-change fix).
    pub fn propose_membership(
        &mut self,
        now_ms: u64,
        change: MembershipChange,
    ) -> Result<(LogIndex, Term), RaftError> {
        self.advance_clock(now_ms);
        self.check_can_propose()?;
        let latest_index = self.configs.last().map_or(0, |(i, _)| *i);
        if latest_index > self.log.commit_index() || !self.committed_in_term() {
            return Err(RaftError::MembershipChangePending);
        }
        let next = self.latest_membership().apply_change(&change)?;
        if let MembershipChange::Promote(id) = &change {
            let caught_up = self
                .progress
                .get(id)
                .is_some_and(|pr| pr.match_index >= self.log.commit_index());
            if !caught_up {
                return Err(RaftError::LearnerBehind(id.clone()));
            }
        }
        Ok(self.append_own(EntryPayload::Membership(Box::new(next))))
    }

    /// Starts a linearizable read identified by `ctx`. Its outcome comes as a [`ReadState`] in a later
    /// `Ready`: serve the read once the applied index reaches `index`.
    /// On a follower the request is forwarded to the leader.
    pub fn read_index(&mut self, now_ms: u64, ctx: u64) -> Result<(), RaftError> {
        self.advance_clock(now_ms);
        match self.role {
            Role::Leader => self.leader_read(ctx, None),
            _ => match self.leader.clone() {
                Some(leader) => {
                    self.send(leader, MessageBody::ReadIndexRequest { ctx });
                    Ok(())
                }
                None => Err(RaftError::NotLeader { leader: None }),
            },
        }
    }

    /// Hands leadership to `target`: catches it up, then tells it to campaign at once. Proposals are
    /// refused until the transfer ends (success, or an election timeout).
    pub fn transfer_leadership(&mut self, now_ms: u64, target: PeerId) -> Result<(), RaftError> {
        self.advance_clock(now_ms);
        if self.role != Role::Leader {
            return Err(RaftError::NotLeader {
                leader: self.leader.clone(),
            });
        }
        if target == self.id
            || !self.config_in_force().is_voter(&target)
            || !self.latest_membership().is_voter(&target)
        {
            return Err(RaftError::InvalidTransferTarget(target));
        }
        self.transfer = Some((
            target.clone(),
            self.now_ms + self.config.election_timeout_ms,
        ));
        self.maybe_send_timeout_now(&target);
        self.needs_flush = true;
        Ok(())
    }

    /// Starts an election now (with pre-vote) instead of waiting for the election timeout. Used when a
    /// lone peer bootstraps a cluster of one, or to speed up a known-leaderless start. Ignored on a leader
    /// and on peers that are not voters.
    pub fn campaign_now(&mut self, now_ms: u64) {
        self.advance_clock(now_ms);
        if self.role != Role::Leader && self.is_promotable() {
            self.start_pre_vote();
        }
    }

    /// The current snapshot's buffer, for the driver to write the next snapshot into, when nothing else
    /// holds it (no chunk of it is in flight): a peer then never holds two snapshots at once (with
    /// three peers of 1.3 MB snapshots compacting at about the same index, 4 MB at the peak). From
    /// here until [`compact`](Self::compact) (or an installed snapshot) replaces the snapshot, this
    /// node sends no snapshot: a driver whose snapshot fails leaves a follower that needs one waiting,
    /// never fed the half-written buffer.
    pub fn take_snapshot_buffer(&mut self) -> Option<Vec<u8>> {
        if self.snapshot_buffer_taken || self.snapshot.data.is_empty() {
            return None;
        }
        let data = std::mem::take(&mut self.snapshot.data);
        match data.try_into_mut() {
            Ok(unique) => {
                self.snapshot_buffer_taken = true;
                Some(Vec::from(unique))
            }
            Err(shared) => {
                self.snapshot.data = shared;
                None
            }
        }
    }

    /// Replaces the log up to `index` (which must be applied) with a snapshot whose state-machine bytes
    /// are `data`. The engine keeps the snapshot to send to peers that fall behind it.
    pub fn compact(&mut self, index: LogIndex, data: Bytes) -> Result<(), RaftError> {
        if index > self.log.applied_index() || index <= self.log.snapshot_index() {
            return Err(RaftError::InvalidCompaction {
                index,
                applied: self.log.applied_index(),
                snapshot: self.log.snapshot_index(),
            });
        }
        let term = self
            .log
            .term(index)
            .expect("applied entries above the snapshot are held");
        let membership = self.membership_at(index).clone();
        self.log.compact_to(index);
        // Keep the configuration in force at `index` as the new base, and every later one.
        let base = self
            .configs
            .iter()
            .rposition(|(i, _)| *i <= index)
            .unwrap_or(0);
        self.configs.drain(..base);
        self.configs[0] = (index, membership.clone());
        self.refresh_committed_config();
        self.snapshot = Snapshot {
            meta: SnapshotMeta {
                last_index: index,
                last_term: term,
                membership,
            },
            data,
        };
        self.snapshot_buffer_taken = false;
        Ok(())
    }

    // ------------------------------------------------------------------------------------------------
    // Output

    /// Whether [`RaftNode::take_ready`] has anything to hand out.
    pub fn has_ready(&self) -> bool {
        self.needs_flush
            || !self.messages.is_empty()
            || !self.read_states.is_empty()
            || self.hard_state_dirty
            || self.snapshot_to_restore.is_some()
            || self.log.has_unpersisted()
            || self.log.has_next_committed()
            || self.soft_state() != self.reported_soft_state
    }

    /// Collects everything to persist, send, apply and answer. See [`Ready`] for the order to follow.
    pub fn take_ready(&mut self) -> Ready {
        self.flush();
        let soft = self.soft_state();
        let soft_state = (soft != self.reported_soft_state).then(|| {
            self.reported_soft_state = soft.clone();
            soft
        });
        let hard_state = std::mem::take(&mut self.hard_state_dirty).then(|| HardState {
            term: self.term,
            voted_for: self.voted_for.clone(),
        });
        let (entries_from, entries) = match self.log.take_unpersisted() {
            Some((from, entries)) => (Some(from), entries),
            None => (None, Vec::new()),
        };
        let committed = self.log.next_committed(self.config.limits.max_apply_batch);
        self.check_invariants();
        Ready {
            soft_state,
            hard_state,
            snapshot: self.snapshot_to_restore.take(),
            entries_from,
            entries,
            messages: std::mem::take(&mut self.messages),
            committed,
            read_states: std::mem::take(&mut self.read_states),
        }
    }

    /// The next time [`RaftNode::tick`] has something to do.
    pub fn next_deadline_ms(&self) -> u64 {
        if self.role == Role::Leader {
            let mut next = self
                .heartbeat_deadline_ms
                .min(self.check_quorum_deadline_ms);
            if let Some((_, deadline)) = &self.transfer {
                next = next.min(*deadline);
            }
            next
        } else {
            self.election_deadline_ms
        }
    }

    // ------------------------------------------------------------------------------------------------
    // Observers

    /// This peer's id.
    pub fn id(&self) -> &PeerId {
        &self.id
    }

    /// Its role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// Its term.
    pub fn term(&self) -> Term {
        self.term
    }

    /// The leader it follows (itself when leading), if known.
    pub fn leader_id(&self) -> Option<&PeerId> {
        self.leader.as_ref()
    }

    /// Highest index known committed.
    pub fn commit_index(&self) -> LogIndex {
        self.log.commit_index()
    }

    /// Highest index handed out for applying.
    pub fn applied_index(&self) -> LogIndex {
        self.log.applied_index()
    }

    /// Last index in the log.
    pub fn last_index(&self) -> LogIndex {
        self.log.last_index()
    }

    /// Entries held after the snapshot, and their bytes (what the driver compacts by).
    pub fn log_size(&self) -> (u64, u64) {
        let (entries, bytes) = self.log.size();
        (entries as u64, bytes as u64)
    }

    /// Last index covered by the snapshot.
    pub fn snapshot_index(&self) -> LogIndex {
        self.log.snapshot_index()
    }

    /// The configuration the protocol uses for elections, votes, commit and check-quorum: the latest one
    /// in the log, committed or not (the Raft dissertation's rule, §4.1). Using the committed one instead
    /// is unsafe once a peer restarts: its commit index restarts at its snapshot, and a configuration two
    /// single-server steps old has majorities that no longer overlap the current one's.
    fn config_in_force(&self) -> &Membership {
        self.latest_membership()
    }

    /// The latest committed configuration (what the cluster has agreed on, as far as this peer knows).
    pub fn membership(&self) -> &Membership {
        &self.configs[self.committed_config].1
    }

    /// The latest configuration in the log, committed or not.
    pub fn latest_membership(&self) -> &Membership {
        &self.configs.last().expect("configs is never empty").1
    }

    /// The latest snapshot (what a peer too far behind is sent).
    pub fn snapshot(&self) -> &Snapshot {
        &self.snapshot
    }

    /// Whether a leadership transfer is under way.
    pub fn transfer_in_progress(&self) -> bool {
        self.transfer.is_some()
    }

    /// Whether this leader is streaming a snapshot to some peer. Compacting meanwhile makes that
    /// snapshot stale on arrival, and the peer needs a second one.
    pub fn snapshot_send_in_progress(&self) -> bool {
        self.role == Role::Leader
            && self
                .progress
                .values()
                .any(|pr| pr.state == ProgressState::Snapshot)
    }

    /// Whether compacting the log up to `index` now would take from a follower that keeps up (heard
    /// from this check-quorum period) entries it has not been sent yet: with its send window full when
    /// they were appended, it would need the whole snapshot for a gap of a few entries. A leader's
    /// driver waits for it, within the slack of its snapshot thresholds.
    pub fn compaction_would_strand(&self, index: LogIndex) -> bool {
        self.role == Role::Leader
            && self.progress.iter().any(|(id, pr)| {
                *id != self.id
                    && pr.recent_active
                    && pr.state != ProgressState::Snapshot
                    && pr.next_index <= index
            })
    }

    /// The leader's view of `peer`'s match index (`None` when not leader or not a member).
    pub fn match_index(&self, peer: &PeerId) -> Option<LogIndex> {
        if self.role != Role::Leader {
            return None;
        }
        if *peer == self.id {
            return Some(self.log.last_index());
        }
        self.progress.get(peer).map(|pr| pr.match_index)
    }

    /// The leader's view of every member's match index, itself included (its last index); empty when
    /// not leader.
    pub fn replication(&self) -> Vec<(PeerId, LogIndex)> {
        if self.role != Role::Leader {
            return Vec::new();
        }
        self.config_in_force()
            .members()
            .filter_map(|p| self.match_index(p).map(|m| (p.clone(), m)))
            .collect()
    }

    /// The term of the entry at `index`, if held (or the snapshot's last index).
    pub fn term_at(&self, index: LogIndex) -> Option<Term> {
        self.log.term(index)
    }

    /// Everything observable at once.
    pub fn status(&self) -> Status {
        Status {
            id: self.id.clone(),
            role: self.role,
            term: self.term,
            leader: self.leader.clone(),
            commit_index: self.log.commit_index(),
            applied_index: self.log.applied_index(),
            last_index: self.log.last_index(),
            snapshot_index: self.log.snapshot_index(),
            membership: self.membership().clone(),
        }
    }

    // ------------------------------------------------------------------------------------------------
    // Elections

    fn advance_clock(&mut self, now_ms: u64) {
        // A clock that steps back is ignored rather than trusted: time only moves forward here.
        self.now_ms = self.now_ms.max(now_ms);
    }

    fn reset_election_deadline(&mut self) {
        let base = self.config.election_timeout_ms;
        self.election_deadline_ms = self.now_ms + self.rng.range(base, 2 * base);
    }

    /// Whether this peer may campaign (learners never do, nor peers that know their removal
    /// committed): it is a voter in its latest configuration, or in its committed one while its log
    /// holds its own uncommitted removal. The votes are counted over the latest configuration either
    /// way (a candidate outside it does not count itself), so this decides only who tries, never who
    /// wins.
    /// Without the second case, a peer whose log held its removal could not campaign after the
    /// leader that appended the removal lost it (a power cut before its sync): the one voter left
    /// needed this peer's vote, which its longer log refused, and neither could ever be elected
    /// (peer simulation seeds 426, 631). Elected, such a peer replicates its log, commits its own
    /// removal and hands leadership on (`maybe_step_down_removed`).
    fn is_promotable(&self) -> bool {
        self.config_in_force().is_voter(&self.id) || self.membership().is_voter(&self.id)
    }

    /// Whether we heard from a live leader within the election timeout (or are the leader).
    fn in_lease(&self) -> bool {
        match self.role {
            Role::Leader => true,
            _ => {
                self.leader.is_some()
                    && self
                        .last_leader_contact_ms
                        .is_some_and(|t| self.now_ms < t + self.config.election_timeout_ms)
            }
        }
    }

    fn soft_state(&self) -> SoftState {
        SoftState {
            role: self.role,
            term: self.term,
            leader: self.leader.clone(),
        }
    }

    fn become_follower(&mut self, term: Term, leader: Option<PeerId>) {
        debug_assert!(term >= self.term);
        if term > self.term {
            self.term = term;
            self.voted_for = None;
            self.hard_state_dirty = true;
        }
        if self.role == Role::Leader {
            self.abandon_reads();
            self.progress.clear();
            self.transfer = None;
        }
        self.role = Role::Follower;
        if leader.is_some() {
            self.last_leader_contact_ms = Some(self.now_ms);
        }
        self.leader = leader;
        self.reset_election_deadline();
    }

    fn start_pre_vote(&mut self) {
        self.role = Role::PreCandidate;
        self.leader = None;
        self.votes = VoteTally::default();
        self.reset_election_deadline();
        self.votes.record(self.id.clone(), true);
        if self.votes.result(self.config_in_force()) == VoteResult::Won {
            self.campaign(false);
            return;
        }
        self.request_votes(self.term + 1, true, false);
    }

    fn campaign(&mut self, transfer: bool) {
        self.role = Role::Candidate;
        self.term += 1;
        self.voted_for = Some(self.id.clone());
        self.hard_state_dirty = true;
        self.leader = None;
        self.votes = VoteTally::default();
        self.reset_election_deadline();
        self.votes.record(self.id.clone(), true);
        if self.votes.result(self.config_in_force()) == VoteResult::Won {
            self.become_leader();
            return;
        }
        self.request_votes(self.term, false, transfer);
    }

    fn request_votes(&mut self, term: Term, pre_vote: bool, transfer: bool) {
        // Ask the voters of the configuration the votes are counted in (the latest in the log). Asking
        // the committed configuration's instead left a candidate one vote short forever when its log
        // held an uncommitted promotion (simulation seeds 10169, 17833).
        let voters: Vec<PeerId> = self
            .config_in_force()
            .voters
            .iter()
            .filter(|v| **v != self.id)
            .cloned()
            .collect();
        for to in voters {
            self.messages.push(Message {
                from: self.id.clone(),
                to,
                term,
                body: MessageBody::RequestVote {
                    pre_vote,
                    transfer,
                    last_log_index: self.log.last_index(),
                    last_log_term: self.log.last_term(),
                },
            });
        }
    }

    fn handle_request_vote(
        &mut self,
        from: PeerId,
        term: Term,
        pre_vote: bool,
        last_log_index: LogIndex,
        last_log_term: Term,
    ) {
        // A peer that has never had a configuration (never founded a cluster nor received a log) has
        // nothing to judge a candidate by, and may be an earlier member that lost its storage: its
        // vote could elect a candidate with a stale log. It votes once it has a log.
        let has_configuration = !self.config_in_force().voters.is_empty();
        let can_vote = has_configuration
            && (self.voted_for.as_ref() == Some(&from)
                || (self.voted_for.is_none() && self.leader.is_none())
                || (pre_vote && term > self.term));
        #[allow(unused_mut)]
        let mut up_to_date = self.log.is_up_to_date(last_log_index, last_log_term);
        #[cfg(test)]
        if self.bugs.vote_without_log_check {
            up_to_date = true;
        }
        let granted = can_vote && up_to_date;
        if granted && !pre_vote {
            self.voted_for = Some(from.clone());
            self.hard_state_dirty = true;
            self.reset_election_deadline();
        }
        // A granted pre-vote answers in the candidate's prospective term; anything else in ours.
        let reply_term = if pre_vote && granted { term } else { self.term };
        self.messages.push(Message {
            from: self.id.clone(),
            to: from,
            term: reply_term,
            body: MessageBody::VoteResponse { pre_vote, granted },
        });
    }

    fn handle_vote_response(&mut self, from: PeerId, term: Term, pre_vote: bool, granted: bool) {
        let expected = match self.role {
            Role::PreCandidate if pre_vote => term == self.term + 1 || term == self.term,
            Role::Candidate if !pre_vote => term == self.term,
            _ => false,
        };
        if !expected {
            return;
        }
        self.votes.record(from, granted);
        match self.votes.result(self.config_in_force()) {
            VoteResult::Won if self.role == Role::PreCandidate => self.campaign(false),
            VoteResult::Won => self.become_leader(),
            VoteResult::Lost => self.become_follower(self.term, None),
            VoteResult::Pending => {}
        }
    }

    fn handle_timeout_now(&mut self, from: PeerId) {
        if self.leader.as_ref() != Some(&from) || !self.is_promotable() {
            return;
        }
        self.campaign(true);
    }

    fn become_leader(&mut self) {
        debug_assert_eq!(self.role, Role::Candidate);
        debug_assert_eq!(self.voted_for.as_ref(), Some(&self.id));
        self.role = Role::Leader;
        self.leader = Some(self.id.clone());
        self.transfer = None;
        debug_assert!(self.read_only.is_empty(), "only a leader queues reads");
        self.progress.clear();
        self.promised = 0;
        self.rebuild_progress();
        for pr in self.progress.values_mut() {
            pr.recent_active = true; // they just voted for us; judge them from the next period
        }
        self.heartbeat_deadline_ms = self.now_ms + self.config.heartbeat_interval_ms;
        self.check_quorum_deadline_ms = self.now_ms + self.config.election_timeout_ms;
        // A no-op of our term lets us commit everything before it (§5.4.2) and unlocks reads and
        // configuration changes.
        self.append_own(EntryPayload::Noop);
    }

    // ------------------------------------------------------------------------------------------------
    // Leader: proposals, replication, commit

    fn check_can_propose(&self) -> Result<(), RaftError> {
        if self.role != Role::Leader {
            return Err(RaftError::NotLeader {
                leader: self.leader.clone(),
            });
        }
        if self.transfer.is_some() {
            return Err(RaftError::TransferInProgress);
        }
        let uncommitted = self.log.last_index() - self.log.commit_index();
        if uncommitted >= self.config.limits.max_uncommitted_entries as u64 {
            return Err(RaftError::Busy);
        }
        Ok(())
    }

    fn append_own(&mut self, payload: EntryPayload) -> (LogIndex, Term) {
        let index = self.log.last_index() + 1;
        let is_config = matches!(payload, EntryPayload::Membership(_));
        if let EntryPayload::Membership(m) = &payload {
            self.configs.push((index, Membership::clone(m)));
        }
        self.log.append(Entry {
            term: self.term,
            index,
            payload,
        });
        if is_config {
            self.rebuild_progress();
        }
        self.needs_flush = true;
        self.maybe_commit();
        (index, self.term)
    }

    /// Progress is kept for every member of the committed and the latest configuration.
    fn rebuild_progress(&mut self) {
        let next = self.log.last_index() + 1;
        let members: Vec<PeerId> = self
            .membership()
            .members()
            .chain(self.latest_membership().members())
            .filter(|p| **p != self.id)
            .cloned()
            .collect();
        self.progress.retain(|id, _| members.contains(id));
        for id in members {
            self.progress
                .entry(id)
                .or_insert_with(|| Progress::new(next));
        }
    }

    fn committed_in_term(&self) -> bool {
        self.log.term(self.log.commit_index()) == Some(self.term)
    }

    fn maybe_commit(&mut self) {
        if self.role != Role::Leader {
            return;
        }
        let last = self.log.last_index();
        // Its own copy counts once durable: at once when the driver persists before anything else,
        // as reported when it syncs in the background.
        #[allow(unused_mut)]
        let mut own = if self.config.persist_async {
            self.log.durable_index()
        } else {
            last
        };
        #[cfg(test)]
        if self.bugs.count_own_log_unsynced {
            own = last;
        }
        #[allow(unused_mut)]
        let mut index = self.config_in_force().quorum_index(|id| {
            if *id == self.id {
                own
            } else {
                self.progress.get(id).map_or(0, |pr| pr.match_index)
            }
        });
        #[cfg(test)]
        if self.bugs.commit_without_quorum {
            index = last;
        }
        // Only an entry of the current term is committed by counting replicas (§5.4.2).
        if index > self.log.commit_index() && self.log.term(index) == Some(self.term) {
            self.commit_to(index);
        }
    }

    fn commit_to(&mut self, index: LogIndex) {
        let was_in_term = self.role == Role::Leader && self.committed_in_term();
        if !self.log.commit_to(index) {
            return;
        }
        let before = self.committed_config;
        self.refresh_committed_config();
        if self.role != Role::Leader {
            return;
        }
        self.needs_flush = true;
        if self.committed_config != before {
            let old: Vec<(PeerId, LogIndex)> = self
                .progress
                .iter()
                .map(|(id, pr)| (id.clone(), pr.match_index))
                .collect();
            self.rebuild_progress();
            // Peers dropped from the configuration get one last heartbeat carrying the commit index, so
            // they learn of their removal (the leader sends them nothing after this).
            let commit = self.log.commit_index();
            let seq = self.read_only.current_seq();
            for (peer, matched) in old {
                if !self.progress.contains_key(&peer) {
                    self.send(
                        peer,
                        MessageBody::Heartbeat {
                            commit: commit.min(matched),
                            read_seq: seq,
                        },
                    );
                }
            }
        }
        if !was_in_term && self.committed_in_term() {
            let index = self.read_index_floor();
            for read in self.read_only.take_waiting() {
                self.register_read(read.ctx, read.from, index);
            }
        }
    }

    fn refresh_committed_config(&mut self) {
        let commit = self.log.commit_index();
        self.committed_config = self
            .configs
            .iter()
            .rposition(|(i, _)| *i <= commit)
            .unwrap_or(0);
    }

    fn membership_at(&self, index: LogIndex) -> &Membership {
        let pos = self
            .configs
            .iter()
            .rposition(|(i, _)| *i <= index)
            .unwrap_or(0);
        &self.configs[pos].1
    }

    fn handle_append_response(
        &mut self,
        from: PeerId,
        success: bool,
        index: LogIndex,
        hint_index: LogIndex,
        hint_term: Term,
    ) {
        if self.role != Role::Leader {
            return;
        }
        let last_index = self.log.last_index();
        let Some(pr) = self.progress.get_mut(&from) else {
            if success && index <= last_index {
                // A peer just removed from the configuration acknowledging late: tell it the commit
                // (which covers its removal once it holds it), since nothing else will be sent to it.
                let commit = self.log.commit_index().min(index);
                let seq = self.read_only.current_seq();
                self.send(
                    from,
                    MessageBody::Heartbeat {
                        commit,
                        read_seq: seq,
                    },
                );
            }
            return;
        };
        if success {
            if index > last_index {
                return; // cannot acknowledge what we never sent: a forged or corrupt answer
            }
            let advanced = pr.maybe_update(index);
            match pr.state {
                ProgressState::Probe => pr.become_replicate(),
                ProgressState::Snapshot if pr.match_index + 1 >= self.log.first_index() => {
                    pr.become_replicate()
                }
                _ => {}
            }
            self.needs_flush = true;
            if advanced {
                self.maybe_commit();
            }
            if self.transfer.as_ref().is_some_and(|(t, _)| *t == from) {
                self.maybe_send_timeout_now(&from);
            }
            return;
        }
        // Rejected: back up, skipping a whole conflicting term at a time.
        let stale = match pr.state {
            ProgressState::Replicate => index <= pr.match_index,
            ProgressState::Probe => index + 1 != pr.next_index,
            ProgressState::Snapshot => true,
        };
        if stale || index == 0 {
            return;
        }
        let probe_at = if hint_term > 0 {
            self.log.find_conflict_by_term(hint_index, hint_term)
        } else {
            hint_index
        };
        let pr = self.progress.get_mut(&from).expect("checked above");
        if probe_at < pr.match_index {
            // The follower no longer holds entries it acknowledged (its storage lost them, or it came
            // back from an older copy): repair its log from what it has, instead of probing above it
            // forever (one rejected append per round trip, without end).
            pr.match_index = probe_at;
        }
        pr.become_probe();
        pr.next_index = (probe_at + 1).min(index).max(pr.match_index + 1);
        self.needs_flush = true;
    }

    fn maybe_send_timeout_now(&mut self, target: &PeerId) {
        let caught_up = self
            .progress
            .get(target)
            .is_some_and(|pr| pr.match_index == self.log.last_index());
        if caught_up {
            self.send(target.clone(), MessageBody::TimeoutNow);
        }
    }

    fn tick_leader(&mut self) {
        if let Some((_, deadline)) = &self.transfer {
            if self.now_ms >= *deadline {
                self.transfer = None; // the target did not take over in time: keep leading
            }
        }
        if self.now_ms >= self.check_quorum_deadline_ms {
            self.check_quorum_deadline_ms = self.now_ms + self.config.election_timeout_ms;
            let active: Vec<PeerId> = self
                .progress
                .iter()
                .filter(|(_, pr)| pr.recent_active)
                .map(|(id, _)| id.clone())
                .chain(std::iter::once(self.id.clone()))
                .collect();
            if !self.config_in_force().has_quorum(active.iter()) {
                // Check-quorum: a leader cut off from a majority stops serving.
                self.become_follower(self.term, None);
                return;
            }
            for pr in self.progress.values_mut() {
                pr.recent_active = false;
            }
        }
        if self.now_ms >= self.heartbeat_deadline_ms {
            self.heartbeat_deadline_ms = self.now_ms + self.config.heartbeat_interval_ms;
            self.retransmit_lost();
            // Every periodic heartbeat is a new round, so followers answer it (check-quorum and the
            // leader lease live on those answers); it also serves reads queued for the next round.
            let seq = self.read_only.start_round();
            self.broadcast_heartbeats(seq);
        }
    }

    /// Appends or chunks unanswered for two heartbeat intervals are presumed lost: resend from the
    /// last confirmed point.
    fn retransmit_lost(&mut self) {
        let timeout = 2 * self.config.heartbeat_interval_ms;
        let now = self.now_ms;
        for pr in self.progress.values_mut() {
            match pr.state {
                ProgressState::Probe => {
                    if pr.paused && now >= pr.probe_sent_ms + timeout {
                        pr.paused = false;
                        self.needs_flush = true;
                    }
                }
                ProgressState::Replicate => {
                    if pr.oldest_inflight_ms().is_some_and(|t| now >= t + timeout) {
                        pr.become_probe();
                        self.needs_flush = true;
                    }
                }
                ProgressState::Snapshot => {
                    if let Some(sender) = pr.snapshot.as_mut() {
                        if now >= sender.last_ack_ms + timeout {
                            sender.rewind(now);
                            self.needs_flush = true;
                        }
                    }
                }
            }
        }
    }

    fn broadcast_heartbeats(&mut self, read_seq: u64) {
        let commit = self.log.commit_index();
        let targets: Vec<(PeerId, LogIndex)> = self
            .progress
            .iter()
            .map(|(id, pr)| (id.clone(), commit.min(pr.match_index)))
            .collect();
        for (to, commit) in targets {
            self.send_heartbeat(to, commit, read_seq);
        }
    }

    fn send_heartbeat(&mut self, to: PeerId, commit: LogIndex, read_seq: u64) {
        if let Some(pr) = self.progress.get_mut(&to) {
            pr.commit_sent = pr.commit_sent.max(commit);
        }
        self.send(to, MessageBody::Heartbeat { commit, read_seq });
    }

    /// Sends what each follower is missing, within its window, then commit notices and read rounds.
    fn flush(&mut self) {
        if !std::mem::take(&mut self.needs_flush) || self.role != Role::Leader {
            return;
        }
        let peers: Vec<PeerId> = self.progress.keys().cloned().collect();
        let mut sent_to = Vec::new();
        for peer in &peers {
            if self.send_appends(peer) {
                sent_to.push(peer.clone());
            }
        }
        // A follower whose known commit index (capped at what it holds) moved past what we last told it
        // learns it from a heartbeat now, so it applies (and answers its clients) without waiting for the
        // next tick. A read round goes to everyone.
        let read_round = self.read_only.take_broadcast();
        let seq = read_round.unwrap_or(self.read_only.current_seq());
        let commit = self.log.commit_index();
        for peer in &peers {
            let pr = &self.progress[peer];
            let pr_commit = commit.min(pr.match_index);
            if read_round.is_none() && pr_commit <= pr.commit_sent {
                continue;
            }
            self.send_heartbeat(peer.clone(), pr_commit, seq);
        }
        if read_round.is_some() {
            self.confirm_reads(); // a cluster of one confirms at once
        }
        self.maybe_step_down_removed();
    }

    /// Sends appends (or snapshot chunks) to `peer` while its window allows. Returns whether anything
    /// was sent.
    fn send_appends(&mut self, peer: &PeerId) -> bool {
        let mut sent = false;
        // Bounded: each pass either sends within the window (bounded) or breaks.
        loop {
            let last_index = self.log.last_index();
            let pr = self.progress.get_mut(peer).expect("peer has progress");
            if pr.state == ProgressState::Snapshot {
                return self.send_snapshot_chunks(peer) || sent;
            }
            if !pr.can_send(self.config.limits.max_inflight_appends) {
                return sent;
            }
            let wanted = match pr.state {
                ProgressState::Probe => {
                    pr.next_index <= last_index || pr.match_index + 1 < pr.next_index
                }
                _ => pr.next_index <= last_index,
            };
            if !wanted {
                return sent;
            }
            let prev_index = pr.next_index - 1;
            let Some(prev_term) = self.log.term(prev_index) else {
                // The entries it needs are compacted away: send the snapshot instead.
                let sender = SnapshotSender::new(
                    self.snapshot.meta.last_index,
                    self.snapshot.meta.last_term,
                    self.now_ms,
                );
                pr.become_snapshot(sender);
                return self.send_snapshot_chunks(peer) || sent;
            };
            let entries = self.log.slice(
                pr.next_index,
                self.config.limits.max_entries_per_append,
                self.config.limits.max_bytes_per_append,
            );
            let last_sent = prev_index + entries.len() as u64;
            pr.on_sent(last_sent, self.now_ms);
            let probing = pr.state == ProgressState::Probe;
            let leader_commit = self.log.commit_index();
            let committed_once_held = self.committed_once_held(peer, last_sent);
            self.promised = self.promised.max(committed_once_held);
            let pr = self.progress.get_mut(peer).expect("peer has progress");
            // The follower will take the commit index up to the last entry of this message, and
            // what it commits once it holds them: no commit notice needed for those.
            pr.commit_sent = pr
                .commit_sent
                .max(leader_commit.min(last_sent))
                .max(committed_once_held);
            self.send(
                peer.clone(),
                MessageBody::AppendEntries {
                    prev_log_index: prev_index,
                    prev_log_term: prev_term,
                    entries,
                    leader_commit,
                    committed_once_held,
                },
            );
            sent = true;
            if probing {
                return sent;
            }
        }
    }

    /// What an append to `peer` ending at `last_sent` promises is committed once `peer` holds it
    /// (see `MessageBody::AppendEntries::committed_once_held`): the last of those entries this leader
    /// holds durably, when they are of its term, the configuration has exactly three voters, `peer`
    /// and this leader among them, and no configuration change is pending; 0 otherwise.
    fn committed_once_held(&self, peer: &PeerId, last_sent: LogIndex) -> LogIndex {
        let config = self.config_in_force();
        #[allow(unused_mut)]
        let mut three = config.voters.len() == 3;
        #[cfg(test)]
        if self.bugs.committed_once_held_any_size {
            three = true;
        }
        let settled = self.committed_config + 1 == self.configs.len();
        if !three || !settled || !config.is_voter(&self.id) || !config.is_voter(peer) {
            return 0;
        }
        #[allow(unused_mut)]
        let mut own = if self.config.persist_async {
            self.log.durable_index()
        } else {
            self.log.last_index()
        };
        #[cfg(test)]
        if self.bugs.committed_once_held_unsynced {
            own = self.log.last_index();
        }
        let held = own.min(last_sent);
        if self.log.term(held) == Some(self.term) {
            held
        } else {
            0
        }
    }

    fn send_snapshot_chunks(&mut self, peer: &PeerId) -> bool {
        if self.snapshot_buffer_taken {
            return false; // the driver is writing the next snapshot into it (see take_snapshot_buffer)
        }
        let meta = self.snapshot.meta.clone();
        let data = self.snapshot.data.clone();
        let pr = self.progress.get_mut(peer).expect("peer has progress");
        let sender = pr
            .snapshot
            .get_or_insert_with(|| SnapshotSender::new(meta.last_index, meta.last_term, 0));
        if !sender.is_for(&meta) {
            // We compacted again since the transfer began: send the newer snapshot from the start.
            *sender = SnapshotSender::new(meta.last_index, meta.last_term, self.now_ms);
        }
        let mut chunks = Vec::new();
        while let Some(chunk) = sender.next_chunk(
            &data,
            self.config.limits.snapshot_chunk_bytes,
            self.config.limits.max_inflight_snapshot_chunks,
        ) {
            chunks.push(chunk);
        }
        let sent = !chunks.is_empty();
        for (offset, data, done) in chunks {
            self.send(
                peer.clone(),
                MessageBody::InstallSnapshot {
                    meta: meta.clone(),
                    offset,
                    data,
                    done,
                },
            );
        }
        sent
    }

    fn handle_snapshot_response(
        &mut self,
        from: PeerId,
        last_index: LogIndex,
        last_term: Term,
        next_offset: u64,
        done: bool,
    ) {
        if self.role != Role::Leader {
            return;
        }
        let now = self.now_ms;
        let Some(pr) = self.progress.get_mut(&from) else {
            return;
        };
        if pr.state != ProgressState::Snapshot {
            return;
        }
        let current = pr
            .snapshot
            .as_ref()
            .is_some_and(|s| s.last_index == last_index && s.last_term == last_term);
        if !current {
            return; // an answer about an older transfer
        }
        if done {
            pr.maybe_update(last_index);
            pr.become_probe();
            self.maybe_commit();
        } else if let Some(sender) = pr.snapshot.as_mut() {
            sender.on_response(next_offset, now);
            if next_offset < sender.sent_offset && sender.inflight_chunks == 0 {
                sender.rewind(now); // the follower lost or refused chunks: resend from what it holds
            }
        }
        self.needs_flush = true;
    }

    /// A leader whose own removal committed hands over to the most up-to-date voter and steps down.
    ///
    /// Judged only once the leader has committed an entry of its term: before that its commit index,
    /// and with it its committed configuration, can be stale (the commit index is not persisted, so a
    /// restarted peer starts from its snapshot's configuration, which may predate its promotion). A
    /// leader that stepped down on that stale view was elected again at once (its log is the longest)
    /// and stepped down again: no stable leader (simulation seed 36259).
    fn maybe_step_down_removed(&mut self) {
        if self.role != Role::Leader
            || !self.committed_in_term()
            || self.membership().is_voter(&self.id)
        {
            return;
        }
        let last = self.log.last_index();
        let successor = self
            .membership()
            .voters
            .iter()
            .filter(|v| {
                self.progress
                    .get(*v)
                    .is_some_and(|pr| pr.match_index == last)
            })
            .min()
            .cloned();
        if let Some(to) = successor {
            self.send(to, MessageBody::TimeoutNow);
        }
        self.become_follower(self.term, None);
    }

    // ------------------------------------------------------------------------------------------------
    // Follower: appends, heartbeats, snapshots

    /// A message from the leader of our term: follow it and restart the election timer.
    fn accept_leader(&mut self, from: &PeerId) {
        if self.role != Role::Follower || self.leader.as_ref() != Some(from) {
            debug_assert!(
                self.role != Role::Leader,
                "two leaders in term {}: {} and {}",
                self.term,
                self.id,
                from
            );
            if self.role == Role::Leader {
                return;
            }
            self.become_follower(self.term, Some(from.clone()));
        }
        self.last_leader_contact_ms = Some(self.now_ms);
        self.reset_election_deadline();
    }

    fn handle_append(
        &mut self,
        from: PeerId,
        (prev_log_index, prev_log_term): (LogIndex, Term),
        entries: Vec<Entry>,
        leader_commit: LogIndex,
        committed_once_held: LogIndex,
    ) {
        if self.role == Role::Leader {
            return;
        }
        self.accept_leader(&from);
        let commit = self.log.commit_index();
        if prev_log_index < commit {
            // Everything up to our commit index matches the leader already.
            self.send(
                from,
                MessageBody::AppendResponse {
                    success: true,
                    index: commit,
                    hint_index: 0,
                    hint_term: 0,
                },
            );
            return;
        }
        if self.log.matches(prev_log_index, prev_log_term) {
            let contiguous = entries
                .iter()
                .enumerate()
                .all(|(i, e)| e.index == prev_log_index + 1 + i as u64);
            if !contiguous {
                return; // malformed: drop rather than corrupt the log
            }
            let mut new_configs = Vec::new();
            for e in &entries {
                if let EntryPayload::Membership(m) = &e.payload {
                    new_configs.push((e.index, Membership::clone(m)));
                }
            }
            let Some((last_new, changed)) = self.log.append_after_match(prev_log_index, entries)
            else {
                return; // would rewrite committed entries: forged or corrupt, drop it
            };
            if changed {
                self.sync_configs_after_append(new_configs);
            }
            self.follower_commit_to(leader_commit.min(last_new));
            // Held now (durable before anything of this Ready is sent or applied): on a majority
            // with the leader's copy, when of the leader's term (which this peer's is now).
            let held = committed_once_held.min(last_new);
            if self.log.term(held) == Some(self.term) && self.latest_membership().is_voter(&self.id)
            {
                self.follower_commit_to(held);
            }
            self.send(
                from,
                MessageBody::AppendResponse {
                    success: true,
                    index: last_new,
                    hint_index: 0,
                    hint_term: 0,
                },
            );
        } else {
            let hint_index = self
                .log
                .find_conflict_by_term(prev_log_index.min(self.log.last_index()), prev_log_term);
            let hint_term = self.log.term(hint_index).unwrap_or(0);
            self.send(
                from,
                MessageBody::AppendResponse {
                    success: false,
                    index: prev_log_index,
                    hint_index,
                    hint_term,
                },
            );
        }
    }

    /// After the log changed on a follower: drop configurations of truncated entries, add new ones.
    fn sync_configs_after_append(&mut self, new_configs: Vec<(LogIndex, Membership)>) {
        let last = self.log.last_index();
        // Configurations above the last index, or whose entry was replaced, are gone.
        let log = &self.log;
        let snapshot_index = log.snapshot_index();
        self.configs.retain(|(i, _)| {
            *i <= snapshot_index
                || (*i <= last
                    && matches!(
                        log.entry(*i),
                        Some(Entry {
                            payload: EntryPayload::Membership(_),
                            ..
                        })
                    ))
        });
        for (index, membership) in new_configs {
            let present = self.configs.iter().any(|(i, _)| *i == index);
            if !present && index > snapshot_index {
                let pos = self.configs.partition_point(|(i, _)| *i < index);
                self.configs.insert(pos, (index, membership));
            }
        }
        // An entry replaced by one of the same index: make sure the stored membership is the log's.
        for (i, m) in self.configs.iter_mut() {
            if let Some(Entry {
                payload: EntryPayload::Membership(actual),
                ..
            }) = log.entry(*i)
            {
                if **actual != *m {
                    *m = Membership::clone(actual);
                }
            }
        }
        self.refresh_committed_config();
    }

    fn follower_commit_to(&mut self, index: LogIndex) {
        if index > self.log.commit_index() {
            self.commit_to(index);
        }
    }

    fn handle_heartbeat(&mut self, from: PeerId, commit: LogIndex, read_seq: u64) {
        if self.role == Role::Leader {
            return;
        }
        self.accept_leader(&from);
        self.follower_commit_to(commit.min(self.log.last_index()));
        if (self.term, read_seq) > self.answered_round {
            self.answered_round = (self.term, read_seq);
            self.send(from, MessageBody::HeartbeatResponse { read_seq });
        }
    }

    fn handle_heartbeat_response(&mut self, from: PeerId, read_seq: u64) {
        if self.role != Role::Leader {
            return;
        }
        let Some(pr) = self.progress.get_mut(&from) else {
            return;
        };
        if read_seq > self.read_only.current_seq() {
            return; // never sent: a forged or corrupt answer
        }
        pr.read_acked_seq = pr.read_acked_seq.max(read_seq);
        if pr.state == ProgressState::Probe && pr.paused {
            // It is alive: probe again rather than wait for the retransmit timer.
            pr.paused = false;
            self.needs_flush = true;
        }
        self.confirm_reads();
    }

    fn handle_install_snapshot(
        &mut self,
        from: PeerId,
        meta: SnapshotMeta,
        offset: u64,
        data: Bytes,
        done: bool,
    ) {
        if self.role == Role::Leader {
            return;
        }
        self.accept_leader(&from);
        let (last_index, last_term) = (meta.last_index, meta.last_term);
        let respond = |node: &mut Self, next_offset: u64, done: bool| {
            node.send(
                from.clone(),
                MessageBody::SnapshotResponse {
                    last_index,
                    last_term,
                    next_offset,
                    done,
                },
            );
        };
        if last_index <= self.log.commit_index() {
            // We already hold everything it covers.
            self.incoming_snapshot = None;
            respond(self, 0, true);
            return;
        }
        let outcome = SnapshotReceiver::accept(
            &mut self.incoming_snapshot,
            meta,
            offset,
            &data,
            done,
            self.config.limits.max_snapshot_bytes,
        );
        match outcome {
            ChunkOutcome::Partial(held) => respond(self, held, false),
            ChunkOutcome::TooLarge => respond(self, 0, false),
            ChunkOutcome::Complete(snapshot) => {
                self.install_snapshot(snapshot);
                respond(self, 0, true);
            }
        }
    }

    fn install_snapshot(&mut self, snapshot: Snapshot) {
        let meta = &snapshot.meta;
        debug_assert!(meta.last_index > self.log.commit_index());
        self.log.restore(meta.last_index, meta.last_term);
        let keep: Vec<(LogIndex, Membership)> = self
            .configs
            .iter()
            .filter(|(i, _)| *i > meta.last_index && *i <= self.log.last_index())
            .cloned()
            .collect();
        self.configs = vec![(meta.last_index, meta.membership.clone())];
        self.configs.extend(keep);
        self.refresh_committed_config();
        self.snapshot = snapshot.clone();
        self.snapshot_buffer_taken = false;
        self.snapshot_to_restore = Some(snapshot);
    }

    // ------------------------------------------------------------------------------------------------
    // Reads

    fn leader_read(&mut self, ctx: u64, from: Option<PeerId>) -> Result<(), RaftError> {
        if self.read_only.len() >= self.config.limits.max_pending_reads {
            return Err(RaftError::Busy);
        }
        if !self.committed_in_term() {
            // Our commit index may lag the previous leader's: wait for our no-op to commit.
            self.read_only.add_waiting(ctx, from);
            return Ok(());
        }
        let index = self.read_index_floor();
        self.register_read(ctx, from, index);
        Ok(())
    }

    /// The index a read that begins now waits for: the commit index, or what a follower may have
    /// committed on this leader's promise if higher (a write it answered must be visible to every
    /// read that begins after).
    fn read_index_floor(&self) -> LogIndex {
        #[cfg(test)]
        if self.bugs.read_ignores_promises {
            return self.log.commit_index();
        }
        self.log.commit_index().max(self.promised)
    }

    fn register_read(&mut self, ctx: u64, from: Option<PeerId>, index: LogIndex) {
        self.read_only.add_pending(ctx, from, index);
        self.needs_flush = true;
    }

    /// Releases the reads whose round a majority of voters has acknowledged.
    fn confirm_reads(&mut self) {
        let current = self.read_only.current_seq();
        let confirmed = self.config_in_force().quorum_index(|id| {
            if *id == self.id {
                current
            } else {
                self.progress.get(id).map_or(0, |pr| pr.read_acked_seq)
            }
        });
        for read in self.read_only.release(confirmed) {
            self.answer_read(read.ctx, read.from, Some(read.index));
        }
    }

    fn answer_read(&mut self, ctx: u64, from: Option<PeerId>, index: Option<LogIndex>) {
        match from {
            None => self.read_states.push(ReadState { ctx, index }),
            Some(peer) => self.send(peer, MessageBody::ReadIndexResponse { ctx, index }),
        }
    }

    fn handle_read_index_request(&mut self, from: PeerId, ctx: u64) {
        if self.role != Role::Leader || self.leader_read(ctx, Some(from.clone())).is_err() {
            self.send(from, MessageBody::ReadIndexResponse { ctx, index: None });
        }
    }

    fn abandon_reads(&mut self) {
        for (ctx, from) in self.read_only.abandon_all() {
            self.answer_read(ctx, from, None);
        }
        for pr in self.progress.values_mut() {
            pr.read_acked_seq = 0;
        }
    }

    // ------------------------------------------------------------------------------------------------
    // Plumbing

    fn send(&mut self, to: PeerId, body: MessageBody) {
        self.messages.push(Message {
            from: self.id.clone(),
            to,
            term: self.term,
            body,
        });
    }

    fn check_invariants(&self) {
        debug_assert!(self.log.snapshot_index() <= self.log.applied_index());
        debug_assert!(self.log.applied_index() <= self.log.commit_index());
        debug_assert!(self.log.commit_index() <= self.log.last_index());
        debug_assert!(self.log.durable_index() <= self.log.last_index());
        debug_assert!(!self.configs.is_empty());
        debug_assert!(self.configs.windows(2).all(|w| w[0].0 < w[1].0));
        debug_assert!(
            self.role != Role::Leader || self.leader.as_ref() == Some(&self.id),
            "a leader follows itself"
        );
        debug_assert!(
            self.role != Role::Leader || self.voted_for.as_ref() == Some(&self.id),
            "a leader voted for itself in its term"
        );
    }
}
