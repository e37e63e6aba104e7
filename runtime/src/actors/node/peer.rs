//! [`Peer`]: every decision of one peer, as pure logic over the Raft engine. It owns the engine and
//! one value per concern ([`Apply`], [`Requests`], [`Reads`], [`Discovery`], [`Admission`], [`Leave`]);
//! it never reads a clock (time comes in as `now_ms`, the milliseconds since the peer started, the
//! engine's own time base) and draws randomness only from its seed. What it wants done (frames to send,
//! events, a stop) collects in an [`Output`] that the actor shell drains after each input.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::broadcast;

use super::admission::Admission;
use super::apply::{Apply, AttachFn, CommandApplied};
use super::discovery::{Discovery, Transition};
use super::frames::{Codec, Dropped, Output};
use super::leave::{Leave, LeaveReply, LeaveStep};
use super::planted_bugs::PlantedBugs;
use super::reads::{QueryFn, Reads, Served};
use super::requests::{self, Reply, Requests, Route};
use crate::config::HamokConfig;
use crate::error::HamokError;
use crate::events::HamokEvent;
use crate::raft::{
    Entry, EntryPayload, LogIndex, Membership, Message, MessageBody, PeerId, PersistedState,
    RaftNode, Ready, Role, Term,
};
use crate::state_machine::{Applied, ClientId, Op, StateMachineFactory};
use crate::stats::{Counters, JoinState, PeerStatus};
use crate::store::{LogStore, StorageError, SyncDone};
use crate::wire::HamokMessage;

/// A handler of direct (unordered, peer-to-peer) messages of one channel.
pub(crate) type DirectFn = Arc<dyn Fn(PeerId, Bytes) + Send + Sync>;

/// Most engine outputs processed in one flush before yielding to the mailbox (so timers and new input
/// are never starved by a long backlog).
const MAX_READY_ROUNDS_PER_FLUSH: usize = 64;

/// Everything a peer starts from.
pub(crate) struct PeerArgs {
    pub id: PeerId,
    pub config: HamokConfig,
    pub store: Box<dyn LogStore>,
    pub kinds: BTreeMap<String, StateMachineFactory>,
    pub counters: Arc<Counters>,
    /// Random per process start: tells this run's requests from an earlier run's.
    pub nonce: u64,
    /// Seeds the engine's election timeouts and the read contexts.
    pub seed: u64,
    pub bugs: PlantedBugs,
    /// Where the peer's events go.
    pub events: broadcast::Sender<HamokEvent>,
}

/// Frames encoded for sending, and what else the peer asks of its shell.
pub(crate) struct Drained {
    /// Encoded frames: to one peer, or to all with `None`.
    pub frames: Vec<(Option<PeerId>, Bytes)>,
    /// Stop the peer, for this reason.
    pub stop: Option<String>,
    /// Latencies that ended: the metric and when it started (in the `now_ms` time base).
    pub latencies: Vec<(&'static str, u64)>,
}

/// How the shell times the apply of one engine output's committed entries: it is called with the
/// apply and runs it once (measuring it with its clock, which the peer never reads).
pub(crate) type TimeApply<'a> = &'a mut dyn FnMut(&mut dyn FnMut());

/// Sends encoded frames at once, through the shell's link: a leader's replication messages that may
/// leave before its own log write (see `Peer::send_replication_early`).
pub(crate) type SendNow<'a> = &'a mut dyn FnMut(Vec<(Option<PeerId>, Bytes)>);

/// How a background sync of the store reaches the shell: its ticket and outcome, from the store's
/// sync thread (see [`Peer::on_synced`]).
pub(crate) type SyncNotifier = Arc<dyn Fn(u64, Result<(), StorageError>) + Send + Sync>;

pub(crate) struct Peer {
    id: PeerId,
    config: HamokConfig,
    seed: u64,
    bugs: PlantedBugs,
    counters: Arc<Counters>,
    raft: RaftNode,
    codec: Codec,
    apply: Apply,
    requests: Requests,
    reads: Reads,
    discovery: Discovery,
    admission: Admission,
    leave: Leave,
    direct_handlers: BTreeMap<String, DirectFn>,
    /// Who leads, as another peer told us, for when the engine knows no leader.
    leader_hint: Option<PeerId>,
    /// The other members of the committed configuration.
    remote_peers: BTreeSet<PeerId>,
    had_remote_peers: bool,
    last_role: Role,
    last_leader: Option<PeerId>,
    last_heartbeat_event_ms: u64,
    /// The foreign incarnation last reported (one event per foreign cluster, not one per frame).
    reported_foreign_incarnation: Option<u64>,
    out: Output,
    /// Set by the shell when the store can sync in the background: a leader's own log writes then
    /// become durable after its messages leave.
    sync_notifier: Option<SyncNotifier>,
    /// Background syncs in flight, oldest first: ticket, and the last entry they make durable. At most
    /// what the store's sync queue holds (it refuses more, and the Ready is then synced inline).
    background_syncs: VecDeque<(u64, LogIndex, Term)>,
    next_sync_ticket: u64,
    /// The engine counts its own log only as reported durable (`RaftConfig::persist_async`; see
    /// `Apply::counts_only_reported_writes`): every log write is reported, inline ones at once.
    persist_async: bool,
}

impl Peer {
    /// A peer restored from its store, not yet taking part in any cluster (see [`Peer::join`]).
    pub(crate) fn new(args: PeerArgs, now_ms: u64) -> Result<Peer, HamokError> {
        let PeerArgs {
            id,
            config,
            store,
            kinds,
            counters,
            nonce,
            seed,
            bugs,
            events,
        } = args;
        let mut apply = Apply::new(store, kinds, &config);
        if bugs.fence_not_checked() {
            apply.plant_fence_not_checked();
        }
        let persisted = apply.load()?;
        let persist_async = if bugs.counts_unwritten_copy() {
            apply.syncs_in_background()
        } else {
            apply.counts_only_reported_writes()
        };
        let raft = RaftNode::new(
            id.clone(),
            engine_config(&config, persist_async),
            seed,
            now_ms,
            persisted,
        )?;
        let mut codec = Codec::new(id.clone(), &config);
        codec.incarnation = apply.incarnation();
        let client = ClientId {
            peer: id.clone(),
            nonce,
        };
        Ok(Peer {
            codec,
            requests: Requests::new(
                client,
                config.max_pending_requests,
                config.raft_config().limits.max_command_bytes,
                config.raft_config().limits.max_bytes_per_append,
                config.election_timeout_ms,
            ),
            reads: Reads::new(seed, config.election_timeout_ms),
            discovery: Discovery::new(id.clone(), &config),
            admission: Admission::new(id.clone(), config.peer_max_idle_ms),
            leave: Leave::new(
                id.clone(),
                config.hello_interval_ms,
                config.request_timeout_ms,
            ),
            direct_handlers: BTreeMap::new(),
            leader_hint: None,
            remote_peers: BTreeSet::new(),
            had_remote_peers: false,
            last_role: Role::Follower,
            last_leader: None,
            last_heartbeat_event_ms: now_ms,
            reported_foreign_incarnation: None,
            out: Output::new(events),
            sync_notifier: None,
            background_syncs: VecDeque::new(),
            next_sync_ticket: 0,
            persist_async,
            id,
            config,
            seed,
            bugs,
            counters,
            raft,
            apply,
        })
    }

    // --------------------------------------------------------------------------------------------
    // What the shell reads

    /// What the handle may see.
    pub(crate) fn status(&self) -> PeerStatus {
        let (log_entries, log_bytes) = self.raft.log_size();
        PeerStatus {
            raft: self.raft.status(),
            join_state: self.discovery.state(),
            log_entries,
            log_bytes,
            pending_requests: self.requests.len(),
            closed: false,
        }
    }

    /// This peer's id.
    pub(crate) fn id(&self) -> &PeerId {
        &self.id
    }

    /// The leader's view of each member's match index (empty when not leading).
    pub(crate) fn replication(&self) -> Vec<(PeerId, crate::raft::LogIndex)> {
        self.raft.replication()
    }

    /// Whether the engine has output to process or forwards wait to be sent (the shell then posts
    /// itself a flush, so a burst of input is handled before either).
    pub(crate) fn has_ready(&self) -> bool {
        self.raft.has_ready() || self.requests.has_forwards()
    }

    /// Takes what the peer wants done since the last drain, with frames encoded.
    pub(crate) fn drain(&mut self) -> Drained {
        let mut frames = Vec::with_capacity(self.out.frames.len());
        for (to, body) in std::mem::take(&mut self.out.frames) {
            match self.codec.encode(to.clone(), body) {
                Ok(bytes) => frames.push((to, bytes)),
                Err(e) => self.out.emit(HamokEvent::Error(format!("encode: {e}"))),
            }
        }
        Drained {
            frames,
            stop: self.out.stop.take(),
            latencies: std::mem::take(&mut self.out.latencies),
        }
    }

    // --------------------------------------------------------------------------------------------
    // Inputs

    /// A frame from the bus.
    pub(crate) fn on_frame(&mut self, now_ms: u64, bytes: &Bytes) {
        let frame = match self.codec.decode(bytes, &self.counters, &mut self.out) {
            Ok(frame) => frame,
            Err(Dropped::OtherVersion(version)) => {
                self.discovery
                    .heard_other_version(now_ms, version, &mut self.out);
                return;
            }
            Err(Dropped::Counted) => return,
        };
        if !self.accepts_incarnation(frame.incarnation) {
            return;
        }
        let from = frame.from;
        self.admission.heard(&from, now_ms);
        let leading = self.raft.role() == Role::Leader;
        match frame.body {
            HamokMessage::Raft(msg) => self.on_raft_message(now_ms, msg, frame.incarnation),
            HamokMessage::Hello(hello) => self.discovery.on_hello(
                from,
                hello,
                &self.raft,
                &mut self.leader_hint,
                &mut self.out,
            ),
            HamokMessage::JoinRequest { only_follower } if leading => {
                self.admission.on_join_request(from, only_follower);
                self.admission.duties(now_ms, &mut self.raft, &mut self.out);
            }
            HamokMessage::LeaveRequest if leading => {
                let gone = !self.raft.membership().contains(&from)
                    && !self.raft.latest_membership().contains(&from);
                if gone {
                    // Its removal is committed; it may have missed the commit notice.
                    self.out.send(from, HamokMessage::Removed);
                } else {
                    self.admission.on_leave_request(from);
                    self.admission.duties(now_ms, &mut self.raft, &mut self.out);
                }
            }
            HamokMessage::JoinRequest { .. } | HamokMessage::LeaveRequest => {}
            HamokMessage::Removed => {
                if self.discovery.state() == JoinState::Leaving
                    && self.raft.leader_id() == Some(&from)
                {
                    self.finish_leave(LeaveStep::Done);
                }
            }
            HamokMessage::Goodbye => self.discovery.forget(&from),
            HamokMessage::Submit { requests } => requests::admit_forwarded(
                now_ms,
                from,
                requests,
                &mut self.raft,
                &self.counters,
                &mut self.out,
            ),
            HamokMessage::SubmitRedirect { seqs, leader } => {
                // Our forwards reached a peer that does not lead: send again to whom it names, or
                // wait for a leader.
                if leader.is_some() && leader.as_ref() != self.raft.leader_id() {
                    self.leader_hint = leader;
                }
                for seq in seqs {
                    let route = Route {
                        raft: &mut self.raft,
                        leader_hint: self.leader_hint.clone(),
                    };
                    self.requests.on_redirect(now_ms, seq, &from, route);
                }
            }
            HamokMessage::Direct { channel, payload } => {
                if let Some(handler) = self.direct_handlers.get(&channel) {
                    handler(from, payload);
                }
            }
        }
    }

    /// Whether a frame of cluster incarnation `theirs` may be handled: yes when either side has none
    /// yet or both agree. Otherwise it is dropped, counted, and reported once per foreign incarnation.
    fn accepts_incarnation(&mut self, theirs: u64) -> bool {
        let ours = self.codec.incarnation;
        if theirs == 0 || ours == 0 || theirs == ours {
            return true;
        }
        Counters::bump(&self.counters.dropped_foreign_incarnation);
        tracing::debug!(
            peer = %self.id,
            reason = "foreign incarnation",
            incarnation = theirs,
            "frame dropped"
        );
        if self.reported_foreign_incarnation != Some(theirs) {
            self.reported_foreign_incarnation = Some(theirs);
            tracing::warn!(
                peer = %self.id,
                incarnation = theirs,
                ours,
                "dropping the frames of another incarnation of this cluster (a storage directory \
                 that outlived its cluster?)"
            );
            self.out.emit(HamokEvent::Error(format!(
                "dropping frames of cluster incarnation {theirs:#x}: this peer's log belongs to \
                 incarnation {ours:#x} of cluster `{}`, founded before the one on the bus now (a storage \
                 directory that outlived its cluster?); move its storage directory away to join the \
                 current cluster as a new peer",
                self.config.cluster_id
            )));
        }
        false
    }

    /// The cluster's incarnation from now on: kept with the log, stamped on every frame.
    fn adopt_incarnation(&mut self, incarnation: u64) {
        if let Err(e) = self.apply.save_incarnation(incarnation) {
            tracing::error!(peer = %self.id, error = %e, "storage failed: the peer stops");
            let reason = format!("storage failed: {e}");
            self.out.emit(HamokEvent::Error(reason.clone()));
            self.out.stop = Some(reason);
            return;
        }
        self.codec.incarnation = incarnation;
    }

    fn on_raft_message(&mut self, now_ms: u64, msg: Message, incarnation: u64) {
        if !self.discovery.participating() {
            return;
        }
        let from_a_leader = matches!(
            msg.body,
            MessageBody::AppendEntries { .. }
                | MessageBody::Heartbeat { .. }
                | MessageBody::InstallSnapshot { .. }
        );
        if self.codec.incarnation == 0
            && incarnation != 0
            && from_a_leader
            && msg.term >= self.raft.term()
        {
            // The first leader this peer follows: its log belongs to that cluster from now on.
            self.adopt_incarnation(incarnation);
        }
        if msg.term > self.raft.term() {
            self.discovery.on_higher_term(now_ms, self.bugs);
        }
        let (from, term) = (msg.from.clone(), msg.term);
        if matches!(msg.body, MessageBody::Heartbeat { .. }) {
            self.out.emit(HamokEvent::Heartbeat);
        }
        self.raft.step(now_ms, msg);
        // Contact with the leader, as the engine judges it after stepping: only the leader of the
        // current term counts (not a stray candidate of a higher term).
        if from_a_leader && self.raft.term() == term && self.raft.leader_id() == Some(&from) {
            self.discovery.on_leader_contact(now_ms);
        }
    }

    /// Time passed: the engine's timers, discovery, join/rejoin judgement, leaving, leader duties,
    /// retries and deadlines.
    pub(crate) fn tick(&mut self, now_ms: u64) {
        if let Err(e) = self.apply.tick() {
            // A store that cannot sync cannot be trusted with another write: the peer stops.
            tracing::error!(peer = %self.id, error = %e, "storage failed: the peer stops");
            let reason = format!("storage failed: {e}");
            self.out.emit(HamokEvent::Error(reason.clone()));
            self.out.stop = Some(reason);
            return;
        }
        if self.discovery.participating() && now_ms >= self.raft.next_deadline_ms() {
            self.raft.tick(now_ms);
        }
        match self.discovery.state() {
            JoinState::Discovering => self.discovery_step(now_ms),
            JoinState::Joined => {
                if self.raft.role() == Role::Leader {
                    self.discovery.on_leading(now_ms);
                }
                self.update_join_state(now_ms);
                if self.closing() && self.remote_peers.is_empty() {
                    self.out.stop =
                        Some("no remote peers left (auto_stop_on_no_remote_peers)".into());
                }
            }
            JoinState::Leaving => self.leave_step(now_ms),
            JoinState::Idle | JoinState::Left => {}
        }
        if self.raft.role() == Role::Leader {
            self.admission.duties(now_ms, &mut self.raft, &mut self.out);
            if now_ms
                >= self
                    .last_heartbeat_event_ms
                    .saturating_add(self.config.heartbeat_interval_ms)
            {
                self.last_heartbeat_event_ms = now_ms;
                self.out.emit(HamokEvent::Heartbeat);
            }
        }
        self.retry_requests(now_ms, false);
        self.reads.retry(now_ms, false, &mut self.raft);
        self.requests.expire(now_ms);
        self.reads.expire(
            now_ms,
            self.raft.applied_index(),
            self.apply.state_machines(),
            self.bugs,
        );
    }

    /// Sends the forwards gathered since the last flush (one frame for the burst), then processes the
    /// engine's output: at most [`MAX_READY_ROUNDS_PER_FLUSH`] rounds. A Ready that
    /// cannot be persisted or applied (a store that failed, a snapshot that does not restore) stops the
    /// peer: none of its messages leave, and the shell stops gracefully, so every waiting request is
    /// answered (`Interrupted`) and the handle reports the peer closed.
    /// `time_apply` runs (and times) the apply of each output's committed entries.
    pub(crate) fn flush(&mut self, now_ms: u64, time_apply: TimeApply<'_>, send_now: SendNow<'_>) {
        if self.requests.has_forwards() {
            let route = Route {
                raft: &mut self.raft,
                leader_hint: self.leader_hint.clone(),
            };
            self.requests.flush(now_ms, route, &mut self.out);
        }
        for _ in 0..MAX_READY_ROUNDS_PER_FLUSH {
            if !self.raft.has_ready() {
                break;
            }
            let ready = self.raft.take_ready();
            if let Err(e) = self.handle_ready(now_ms, ready, &mut *time_apply, &mut *send_now) {
                return self.stop_on(&e);
            }
        }
    }

    /// The engine's output cannot be persisted or applied: the peer stops (see [`Peer::flush`]).
    fn stop_on(&mut self, e: &HamokError) {
        tracing::error!(
            peer = %self.id,
            error = %e,
            "cannot handle the engine's output: the peer stops"
        );
        let reason = format!("the peer stops: {e}");
        self.out.emit(HamokEvent::Error(reason.clone()));
        self.out.stop = Some(reason);
    }

    /// Lets a leader's own log writes be synced in the background when the store can: `notify` is
    /// how their outcomes reach the shell (which hands them to [`Peer::on_synced`]).
    pub(crate) fn set_sync_notifier(&mut self, notify: SyncNotifier) {
        if self.apply.syncs_in_background() {
            self.sync_notifier = Some(notify);
        }
    }

    /// A background sync ended. Done: the engine hears that the log is durable up to the last entry
    /// it covered (a leader's own copy then counts toward a commit). Failed: the peer stops, as for
    /// any store failure (the store refuses every later call too).
    pub(crate) fn on_synced(&mut self, ticket: u64, result: Result<(), StorageError>) {
        if let Err(e) = result {
            return self.stop_on(&HamokError::Storage(e));
        }
        let mut durable = None;
        while let Some(&(t, index, term)) = self.background_syncs.front() {
            if t > ticket {
                break;
            }
            self.background_syncs.pop_front();
            durable = Some((index, term));
        }
        if let Some((index, term)) = durable {
            self.raft.on_persisted(index, term);
        }
    }

    /// The transport (re)connected.
    pub(crate) fn link_up(&mut self) {
        self.discovery.on_link_up();
    }

    /// Starts discovery and joining (nothing if already joining or joined). A peer that left joins
    /// again with its log, term and vote: wiping them could let it vote for a stale candidate (or twice
    /// in a term) under an identity the cluster still knows.
    pub(crate) fn join(&mut self, now_ms: u64) {
        if !matches!(self.discovery.state(), JoinState::Idle | JoinState::Left) {
            return;
        }
        tracing::info!(peer = %self.id, term = self.raft.term(), "joining: discovery started");
        self.discovery.start(now_ms);
        self.discovery_step(now_ms);
    }

    /// Leaves the cluster; `reply` is answered when done.
    pub(crate) fn leave(&mut self, now_ms: u64, reply: LeaveReply) {
        match self.discovery.state() {
            JoinState::Joined | JoinState::Discovering => {}
            JoinState::Idle | JoinState::Left => {
                let _ = reply.send(Ok(()));
                return;
            }
            JoinState::Leaving => {
                let _ = reply.send(Err(HamokError::Busy("already leaving")));
                return;
            }
        }
        tracing::info!(peer = %self.id, term = self.raft.term(), "leaving");
        self.leave.start(now_ms, reply);
        self.discovery.begin_leave();
        if !self.raft.membership().contains(&self.id) {
            self.finish_leave(LeaveStep::Done);
        }
    }

    /// Submits an operation; `reply` is answered once it is applied here (or refused, or timed out).
    pub(crate) fn submit(&mut self, now_ms: u64, op: Op, timeout_ms: u64, reply: Reply) {
        if !self.discovery.accepts_requests() {
            let _ = reply.send(Err(HamokError::NotJoined));
            return;
        }
        if let Op::Create { kind, .. } = &op {
            if !self.apply.knows_kind(kind) {
                // Never put a kind into the log that this peer cannot even build (a typo, a missing
                // registration): it is refused here, before any peer applies it.
                let _ = reply.send(Err(HamokError::Rejected(format!(
                    "unknown collection kind `{kind}` (register it on every peer's builder)"
                ))));
                return;
            }
        }
        let route = Route {
            raft: &mut self.raft,
            leader_hint: self.leader_hint.clone(),
        };
        self.requests.submit(now_ms, op, timeout_ms, reply, route);
    }

    /// Runs `f` on `collection`: now on the local state, or after a ReadIndex round if `linearizable`.
    pub(crate) fn query(
        &mut self,
        now_ms: u64,
        collection: String,
        linearizable: bool,
        timeout_ms: u64,
        f: QueryFn,
    ) {
        if !linearizable {
            f(Ok(Served {
                applied_index: self.raft.applied_index(),
                machine: self.apply.state_machines().get(&collection),
            }));
            return;
        }
        if !self.discovery.accepts_requests() {
            f(Err(HamokError::NotJoined));
            return;
        }
        self.reads
            .start(now_ms, collection, timeout_ms, f, &mut self.raft);
    }

    /// Registers a hook on `collection`'s state machine (now, and whenever it is recreated).
    pub(crate) fn attach(&mut self, collection: String, hook: AttachFn) {
        self.apply.attach(collection, hook);
    }

    /// Registers the handler of a direct-message channel.
    pub(crate) fn on_direct(&mut self, channel: String, handler: DirectFn) {
        self.direct_handlers.insert(channel, handler);
    }

    /// Sends a direct message to one peer, or to all with `None`.
    pub(crate) fn send_direct(&mut self, to: Option<PeerId>, channel: String, payload: Bytes) {
        self.out
            .frames
            .push((to, HamokMessage::Direct { channel, payload }));
    }

    /// The peer stops: everything waiting fails with `Closed`.
    pub(crate) fn close(&mut self) {
        self.requests
            .fail_all(HamokError::Interrupted("the peer closed"));
        self.reads.fail_all(HamokError::Closed);
        self.leave.finish(Err(HamokError::Closed));
        self.out.emit(HamokEvent::Close);
        // Release the store (a durable one's directory lock) now, before the handle can see the peer
        // closed: a peer restarted on the same directory right after must find it free.
        self.apply.release_store();
    }

    // --------------------------------------------------------------------------------------------
    // The engine's output

    /// A leader's replication messages (append, heartbeat, snapshot chunk) leave before its own log
    /// write, which then runs in parallel with the followers' (the Raft dissertation, §10.2.1): one
    /// sync fewer on the commit path. Safe because they promise nothing about the leader's log, and
    /// the leader's own copy counts toward a commit only once durable: inline, this peer steps its
    /// followers' responses only after this Ready's write returned (the actor handles one input at a
    /// time); in the background (`storage.background_sync`), the engine counts it once `on_synced`
    /// reported it. Not when the Ready changes the term or vote or carries a snapshot: those are
    /// durable before anything else leaves.
    fn send_replication_early(&mut self, ready: &mut Ready, send_now: SendNow<'_>) {
        if ready.hard_state.is_some()
            || ready.snapshot.is_some()
            || self.raft.role() != Role::Leader
            || ready.messages.is_empty()
        {
            return;
        }
        let (early, later): (Vec<Message>, Vec<Message>) = std::mem::take(&mut ready.messages)
            .into_iter()
            .partition(|m| {
                matches!(
                    m.body,
                    MessageBody::AppendEntries { .. }
                        | MessageBody::Heartbeat { .. }
                        | MessageBody::InstallSnapshot { .. }
                )
            });
        ready.messages = later;
        let mut frames = Vec::with_capacity(early.len());
        for msg in early {
            let to = msg.to.clone();
            match self.codec.encode(Some(to.clone()), HamokMessage::Raft(msg)) {
                Ok(bytes) => frames.push((Some(to), bytes)),
                Err(e) => self.out.emit(HamokEvent::Error(format!("encode: {e}"))),
            }
        }
        if !frames.is_empty() {
            send_now(frames);
        }
    }

    /// Whether this Ready's log write may become durable after its messages leave: a leader's, that
    /// changes neither term nor vote and carries no snapshot. Its messages promise nothing about the
    /// leader's own log, whose copy the engine counts toward a commit only once `on_synced` reports
    /// it (`RaftConfig::persist_async`); a follower's acknowledgement, a vote or a snapshot must be
    /// durable before anything leaves.
    fn may_sync_in_background(&self, ready: &Ready) -> bool {
        self.raft.role() == Role::Leader && ready.hard_state.is_none() && ready.snapshot.is_none()
    }

    fn handle_ready(
        &mut self,
        now_ms: u64,
        mut ready: Ready,
        time_apply: TimeApply<'_>,
        send_now: SendNow<'_>,
    ) -> Result<(), HamokError> {
        // 1. Persist, in order, before anything else leaves (a leader's replication may leave first).
        self.send_replication_early(&mut ready, send_now);
        let last_written = ready.entries.last().map(|e| (e.index, e.term));
        let background = match (&self.sync_notifier, last_written) {
            (Some(notify), Some(_)) if self.may_sync_in_background(&ready) => {
                let (notify, ticket) = (notify.clone(), self.next_sync_ticket);
                let done: SyncDone = Box::new(move |result| notify(ticket, result));
                Some(done)
            }
            _ => None,
        };
        let in_background = self.apply.persist(&ready, background)?;
        match (in_background, last_written) {
            (true, Some((index, term))) => {
                self.background_syncs
                    .push_back((self.next_sync_ticket, index, term));
                self.next_sync_ticket += 1;
                if self.bugs.report_unsynced_writes() {
                    self.raft.on_persisted(index, term);
                }
            }
            // Durable already: the engine hears it at once.
            (false, Some((index, term))) if self.persist_async => {
                self.raft.on_persisted(index, term)
            }
            _ => {}
        }
        let Ready {
            soft_state,
            snapshot,
            messages,
            committed,
            read_states,
            ..
        } = ready;
        // 2. Send.
        for msg in messages {
            let to = msg.to.clone();
            self.out.send(to, HamokMessage::Raft(msg));
        }
        // 3. Apply.
        if let Some(snapshot) = snapshot {
            self.apply.install(&snapshot)?;
            Counters::bump(&self.counters.snapshots_installed);
            tracing::info!(
                peer = %self.id,
                index = snapshot.meta.last_index,
                term = snapshot.meta.last_term,
                "snapshot installed"
            );
            self.requests
                .answer_applied_in_snapshot(self.apply.state_machines(), &mut self.out);
            self.on_membership_applied(now_ms);
        }
        if let Some(last) = committed.last().map(|e| e.index) {
            let mut committed = Some(committed);
            time_apply(&mut || {
                for entry in committed.take().into_iter().flatten() {
                    self.apply_entry(now_ms, entry);
                }
            });
            self.out.emit(HamokEvent::Commit(last));
        }
        // 4. Reads.
        for rs in read_states {
            if !self.discovery.on_read_state(&rs) {
                self.reads.on_read_state(rs);
            }
        }
        self.reads.serve(
            self.raft.applied_index(),
            self.apply.state_machines(),
            &mut self.out,
        );
        if let Some(soft) = soft_state {
            self.on_soft_state(now_ms, soft.role, soft.leader, soft.term);
        }
        if let Some(index) = self.apply.maybe_snapshot(&mut self.raft, &self.counters)? {
            tracing::info!(peer = %self.id, index, term = self.raft.term(), "snapshot taken");
        }
        Ok(())
    }

    /// When this peer last heard from its leader, or `now_ms` while it leads a cluster it joined
    /// (a leader cut off from its quorum steps down within an election timeout, and stops counting).
    pub(crate) fn leader_contact_ms(&self, now_ms: u64) -> u64 {
        if self.raft.role() == Role::Leader && self.discovery.state() == JoinState::Joined {
            now_ms
        } else {
            self.discovery.last_leader_contact_ms()
        }
    }

    fn apply_entry(&mut self, now_ms: u64, entry: Entry) {
        let bytes = match entry.payload {
            EntryPayload::Noop => return,
            EntryPayload::Membership(membership) => {
                tracing::info!(
                    peer = %self.id,
                    index = entry.index,
                    term = entry.term,
                    voters = ?membership.voters,
                    learners = ?membership.learners,
                    "membership applied"
                );
                self.apply.apply_members(entry.index, &membership);
                return self.on_membership_applied(now_ms);
            }
            EntryPayload::Command(bytes) => bytes,
        };
        match self
            .apply
            .apply_command(entry.index, entry.term, &bytes, self.requests.client())
        {
            CommandApplied::Undecodable(reason) => self.out.emit(HamokEvent::Error(reason)),
            CommandApplied::UnknownKind(reason) => {
                self.out.emit(HamokEvent::Error(reason.clone()));
                self.out.stop = Some(reason);
            }
            CommandApplied::Done {
                client,
                seq,
                applied,
            } => {
                if !matches!(applied, Applied::Done(_)) {
                    Counters::bump(&self.counters.duplicates_skipped);
                }
                if client != *self.requests.client() || !self.requests.is_pending(seq) {
                    return;
                }
                let answer = match applied {
                    Applied::Done(result) => result,
                    // Still waiting means the first apply came inside a snapshot (answered at install,
                    // so this is only a fallback): never leave it unanswered.
                    Applied::Duplicate => self
                        .apply
                        .state_machines()
                        .cached_response(&client, seq)
                        .ok_or(HamokError::AppliedResponseLost),
                    Applied::Forgotten => Err(HamokError::OutcomeUnknown),
                };
                self.requests.answer(seq, answer, &mut self.out);
            }
        }
    }

    /// The committed membership may have changed: remote peers, the leader's bookkeeping, join state.
    fn on_membership_applied(&mut self, now_ms: u64) {
        let membership: Membership = self.raft.membership().clone();
        let now_members: BTreeSet<PeerId> = membership
            .members()
            .filter(|p| **p != self.id)
            .cloned()
            .collect();
        for gone in self.remote_peers.difference(&now_members) {
            // Its client sessions stay (bounded by MAX_CLIENT_SESSIONS): a retry of its requests may
            // still be in flight, and dropping the session would let it apply twice.
            tracing::info!(peer = %self.id, member = %gone, term = self.raft.term(), "member removed");
            self.out.emit(HamokEvent::RemotePeerLeft(gone.clone()));
        }
        for new in now_members.difference(&self.remote_peers) {
            tracing::info!(peer = %self.id, member = %new, term = self.raft.term(), "member added");
            self.out.emit(HamokEvent::RemotePeerJoined(new.clone()));
        }
        if !now_members.is_empty() {
            self.had_remote_peers = true;
        }
        self.remote_peers = now_members;
        self.admission.on_membership(now_ms, &membership);
        self.update_join_state(now_ms);
    }

    fn on_soft_state(&mut self, now_ms: u64, role: Role, leader: Option<PeerId>, term: u64) {
        if role != self.last_role {
            let old = std::mem::replace(&mut self.last_role, role);
            trace_role_change(&self.id, term, old, role, leader.as_ref());
            self.out.emit(match role {
                Role::Follower => HamokEvent::Follower,
                Role::PreCandidate | Role::Candidate => HamokEvent::Candidate,
                Role::Leader => HamokEvent::Leader,
            });
            self.out.emit(HamokEvent::StateChanged { new: role, old });
            if role == Role::Leader {
                self.discovery.on_leading(now_ms);
            }
        }
        if leader != self.last_leader {
            let old = std::mem::replace(&mut self.last_leader, leader.clone());
            tracing::info!(
                peer = %self.id,
                term,
                leader = leader.as_ref().map(tracing::field::display),
                old = old.as_ref().map(tracing::field::display),
                "leader changed"
            );
            self.out.emit(HamokEvent::LeaderChanged {
                new: leader.clone(),
                old,
                term,
            });
            if leader.is_some() {
                // A new leader: forward whatever waits, at once (fast failover of writes and reads).
                self.retry_requests(now_ms, true);
                self.reads.retry(now_ms, true, &mut self.raft);
            }
        }
    }

    // --------------------------------------------------------------------------------------------
    // Join, rejoin, leave

    fn closing(&self) -> bool {
        self.config.auto_stop_on_no_remote_peers && self.had_remote_peers
    }

    fn retry_requests(&mut self, now_ms: u64, all: bool) {
        let route = Route {
            raft: &mut self.raft,
            leader_hint: self.leader_hint.clone(),
        };
        self.requests.retry(now_ms, all, route, &self.counters);
    }

    /// One step of the search for the cluster: announce, ask the leader for a membership read, judge,
    /// and found a cluster if the bootstrap rule says so.
    fn discovery_step(&mut self, now_ms: u64) {
        let leader = self.raft.leader_id().cloned().or(self.leader_hint.clone());
        self.discovery
            .announce(now_ms, &self.raft, leader, &mut self.out);
        let reads = &mut self.reads;
        self.discovery
            .ask_membership_read(now_ms, &mut self.raft, || reads.next_ctx());
        self.update_join_state(now_ms);
        if self
            .discovery
            .should_bootstrap(now_ms, &self.raft, self.bugs)
        {
            self.bootstrap(now_ms);
        }
    }

    /// Applies the join and rejoin rules (see `discovery.rs`).
    fn update_join_state(&mut self, now_ms: u64) {
        match self.discovery.judge(now_ms, &self.raft) {
            Some(Transition::Joined) => {
                tracing::info!(
                    peer = %self.id,
                    term = self.raft.term(),
                    leader = self.raft.leader_id().map(tracing::field::display),
                    role = ?self.raft.role(),
                    "joined"
                );
                self.out.emit(HamokEvent::Joined);
                if self.raft.role() == Role::Follower {
                    // Announce the role it joins in (the leader announced its own on election).
                    self.out.emit(HamokEvent::Follower);
                }
            }
            Some(Transition::LostMembership) => {
                tracing::warn!(
                    peer = %self.id,
                    term = self.raft.term(),
                    "not a member any more (removed or cut off): rejoining"
                );
                self.leader_hint = None;
                self.discovery.rejoin(now_ms, &mut self.out);
            }
            Some(Transition::LeaveCommitted) => self.finish_leave(LeaveStep::Done),
            None => {}
        }
    }

    /// Founds a cluster of one and leads it.
    fn bootstrap(&mut self, now_ms: u64) {
        let genesis = PersistedState::genesis(Membership::with_voters([self.id.clone()]));
        // A new cluster: a new incarnation, random (the seed is random per process outside tests).
        let incarnation =
            crate::raft::SeededRng::new(self.seed ^ now_ms.rotate_left(32)).next_u64() | 1;
        let mut raft = match RaftNode::new(
            self.id.clone(),
            engine_config(&self.config, self.persist_async),
            self.seed,
            now_ms,
            genesis.clone(),
        ) {
            Ok(raft) => raft,
            Err(e) => {
                self.out.emit(HamokEvent::Error(format!("bootstrap: {e}")));
                return;
            }
        };
        if let Err(e) = self.apply.save_snapshot(&genesis.snapshot) {
            self.out.emit(HamokEvent::Error(format!("bootstrap: {e}")));
            return;
        }
        tracing::info!(peer = %self.id, incarnation, "founding a new cluster");
        self.adopt_incarnation(incarnation);
        raft.campaign_now(now_ms);
        self.raft = raft;
        self.update_join_state(now_ms);
    }

    fn leave_step(&mut self, now_ms: u64) {
        match self.leave.tick(now_ms, &mut self.raft, &mut self.out) {
            LeaveStep::Wait => {}
            step => self.finish_leave(step),
        }
    }

    /// Ends a leave: `Done` (removed, or the last voter) or `TimedOut` (the caller is told; this peer
    /// stops taking part anyway, and the leader removes it as silent).
    fn finish_leave(&mut self, step: LeaveStep) {
        let result = match step {
            LeaveStep::TimedOut => Err(HamokError::Timeout {
                after_ms: self.config.request_timeout_ms,
            }),
            _ => Ok(()),
        };
        self.out.broadcast(HamokMessage::Goodbye);
        self.discovery.left();
        tracing::info!(
            peer = %self.id,
            term = self.raft.term(),
            timed_out = result.is_err(),
            "left the cluster"
        );
        self.out.emit(HamokEvent::Left);
        self.requests
            .fail_all(HamokError::Interrupted("the peer left its cluster"));
        self.reads.fail_all(HamokError::NotJoined);
        self.leave.finish(result);
    }
}

/// The tracing events of a role change: elections (pre-vote or campaign started, won, lost) at info,
/// and the change itself.
fn trace_role_change(id: &PeerId, term: u64, old: Role, new: Role, leader: Option<&PeerId>) {
    let leader = leader.map(tracing::field::display);
    match (old, new) {
        (_, Role::PreCandidate) => tracing::info!(peer = %id, term, "election: pre-vote started"),
        (_, Role::Candidate) => tracing::info!(peer = %id, term, "election: campaign started"),
        (_, Role::Leader) => tracing::info!(peer = %id, term, "election won"),
        (Role::PreCandidate | Role::Candidate, Role::Follower) => {
            tracing::info!(peer = %id, term, leader, "election lost")
        }
        _ => {}
    }
    tracing::info!(peer = %id, term, role = ?new, old = ?old, "role changed");
}

/// The engine's configuration for this peer: the configured one, counting its own log only as
/// reported durable when the store outlives the process (see `Peer::persist_async`).
fn engine_config(config: &HamokConfig, persist_async: bool) -> crate::raft::RaftConfig {
    crate::raft::RaftConfig {
        persist_async,
        ..config.raft_config()
    }
}
