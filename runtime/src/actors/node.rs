//! The Raft node actor: owns the engine, the log store, the storages (apply path), discovery, join and
//! leave. Everything that touches Raft state runs here, one message at a time, so no locks are needed.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::sync::{broadcast, oneshot, watch};

use crate::config::HamokConfig;
use crate::error::HamokError;
use crate::events::HamokEvent;
use crate::raft::{
    Entry, EntryPayload, Membership, MembershipChange, Message, PeerId, PersistedState, RaftError,
    RaftNode, ReadState, Ready, Role,
};
use crate::state_machine::{
    Applied, ClientId, LogCommand, Op, SeqStatus, StateMachine, StateMachineFactory, Storages,
};
use crate::stats::Counters;
use crate::store::LogStore;
use crate::transport::{Inbound, Link};
use crate::wire::{self, DecodeError, Frame, FrameKey, HamokMessage, Hello, PROTOCOL_VERSION};

/// A closure run against a storage's state machine inside the node actor.
pub(crate) type QueryFn = Box<dyn FnOnce(Result<Option<&dyn StateMachine>, HamokError>) + Send>;
/// A hook run on a storage's state machine whenever it is (re)created (to attach local observers).
pub(crate) type AttachFn = Arc<dyn Fn(&mut dyn StateMachine) + Send + Sync>;
/// A handler of direct (unordered, peer-to-peer) messages of one channel.
pub(crate) type DirectFn = Arc<dyn Fn(PeerId, Bytes) + Send + Sync>;

/// Messages of the node actor.
pub(crate) enum NodeMsg {
    /// A frame from the transport.
    Inbound(Bytes),
    /// Timer.
    Tick,
    /// Process the engine's output (posted to self, so bursts of input are batched).
    Flush,
    /// The transport (re)connected.
    LinkUp(Arc<dyn Link>),
    /// The transport lost its connection.
    LinkDown,
    /// Start discovery and joining.
    Join,
    /// Leave the cluster; answered when done.
    Leave(oneshot::Sender<Result<(), HamokError>>),
    /// Submit an operation; answered once applied on this peer.
    Submit {
        op: Op,
        timeout: Duration,
        reply: oneshot::Sender<Result<Bytes, HamokError>>,
    },
    /// Run a closure on a storage, after a ReadIndex barrier if `linearizable`.
    Query {
        storage: String,
        linearizable: bool,
        timeout: Duration,
        f: QueryFn,
    },
    /// Register a hook run on a storage's state machine whenever it is (re)created, and now if it exists.
    Attach { storage: String, hook: AttachFn },
    /// Register the handler of a direct-message channel.
    OnDirect { channel: String, handler: DirectFn },
    /// Send a direct message to one peer, or to all with `None`.
    SendDirect {
        to: Option<PeerId>,
        channel: String,
        payload: Bytes,
    },
}

/// Where the peer stands with respect to a cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JoinState {
    /// `join` not called yet.
    Idle,
    /// Looking for a cluster (or for the peers to found one with).
    Discovering,
    /// Part of a cluster.
    Joined,
    /// Leaving.
    Leaving,
    /// Left; `join` starts over.
    Left,
}

/// What the handle can see without a round trip to the actor.
#[derive(Clone, Debug)]
pub(crate) struct View {
    pub role: Role,
    pub term: u64,
    pub leader: Option<PeerId>,
    pub commit_index: u64,
    pub applied_index: u64,
    pub last_index: u64,
    pub snapshot_index: u64,
    pub membership: Arc<Membership>,
    pub join_state: JoinState,
    pub closed: bool,
    pub log_entries: u64,
    pub log_bytes: u64,
    pub pending_requests: usize,
}

impl View {
    pub(crate) fn initial() -> Self {
        View {
            role: Role::Follower,
            term: 0,
            leader: None,
            commit_index: 0,
            applied_index: 0,
            last_index: 0,
            snapshot_index: 0,
            membership: Arc::new(Membership::default()),
            join_state: JoinState::Idle,
            closed: false,
            log_entries: 0,
            log_bytes: 0,
            pending_requests: 0,
        }
    }
}

/// Everything the node actor starts from.
pub(crate) struct NodeArgs {
    pub peer_id: PeerId,
    pub config: HamokConfig,
    pub store: Box<dyn LogStore>,
    pub kinds: BTreeMap<String, StateMachineFactory>,
    pub inbound: Inbound,
    pub view: watch::Sender<View>,
    pub events: broadcast::Sender<HamokEvent>,
    pub counters: Arc<Counters>,
    pub nonce: u64,
    pub seed: u64,
}

/// A request submitted on this peer, waiting to be applied here.
struct PendingRequest {
    command: Bytes,
    timeout: Duration,
    reply: oneshot::Sender<Result<Bytes, HamokError>>,
    deadline: Instant,
    last_sent: Option<Instant>,
}

/// A linearizable query waiting for its read index and then for the apply of that index.
struct PendingRead {
    storage: String,
    timeout: Duration,
    f: QueryFn,
    deadline: Instant,
    index: Option<u64>,
    /// When its outstanding ReadIndex request was sent (`None`: none outstanding). A request or answer
    /// lost on the bus is re-asked after an election timeout, so a read never waits for its deadline
    /// on a lost frame.
    requested_at: Option<Instant>,
}

pub(crate) struct NodeState {
    id: PeerId,
    config: HamokConfig,
    started: Instant,
    raft: RaftNode,
    store: Box<dyn LogStore>,
    storages: Storages,
    attach_hooks: BTreeMap<String, Vec<AttachFn>>,
    direct_handlers: BTreeMap<String, DirectFn>,
    link: Option<Arc<dyn Link>>,
    inbound: Inbound,
    view: watch::Sender<View>,
    events: broadcast::Sender<HamokEvent>,
    counters: Arc<Counters>,
    seed: u64,
    frame_key: Option<FrameKey>,

    // Client side of requests.
    client: ClientId,
    next_seq: u64,
    pending: BTreeMap<u64, PendingRequest>,
    next_read_ctx: u64,
    reads: BTreeMap<u64, PendingRead>,

    // Discovery and membership.
    join_state: JoinState,
    discovery_started: Instant,
    discovered: BTreeMap<PeerId, bool>,
    member_heard: bool,
    hinted_leader: Option<PeerId>,
    last_hello: Option<Instant>,
    last_leader_contact: Instant,
    leave_reply: Option<(oneshot::Sender<Result<(), HamokError>>, Instant)>,
    had_remote_peers: bool,
    remote_peers: BTreeSet<PeerId>,

    // Leader duties.
    wants_join: BTreeMap<PeerId, bool>,
    wants_leave: BTreeSet<PeerId>,
    last_heard: BTreeMap<PeerId, Instant>,

    flush_scheduled: bool,
    stop_requested: Option<String>,
    last_heartbeat_event: Instant,
    last_role: Role,
    last_leader: Option<PeerId>,
}

/// The node actor.
pub(crate) struct NodeActor;

/// Most engine outputs processed in one flush before yielding to the mailbox (so timers and new input
/// are never starved by a long backlog).
const MAX_READY_ROUNDS_PER_FLUSH: usize = 64;

impl Actor for NodeActor {
    type Msg = NodeMsg;
    type State = NodeState;
    type Arguments = NodeArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<NodeMsg>,
        mut args: NodeArgs,
    ) -> Result<NodeState, ActorProcessingErr> {
        let persisted = args.store.load()?;
        let raft = RaftNode::new(
            args.peer_id.clone(),
            args.config.raft_config(),
            args.seed,
            0,
            persisted.clone(),
        )?;
        let mut storages = Storages::new(args.kinds);
        storages.restore(&persisted.snapshot.data, |_, _| {})?;
        let now = Instant::now();
        myself.send_interval(Duration::from_millis(args.config.tick_interval_ms), || {
            NodeMsg::Tick
        });
        let state = NodeState {
            id: args.peer_id.clone(),
            started: now,
            raft,
            store: args.store,
            storages,
            attach_hooks: BTreeMap::new(),
            direct_handlers: BTreeMap::new(),
            link: None,
            inbound: args.inbound,
            view: args.view,
            events: args.events,
            counters: args.counters,
            seed: args.seed,
            frame_key: args
                .config
                .cluster_key
                .as_ref()
                .map(|k| FrameKey::new(k.as_bytes())),
            client: ClientId {
                peer: args.peer_id,
                nonce: args.nonce,
            },
            next_seq: 1,
            pending: BTreeMap::new(),
            // Random start: a late read-index answer meant for an earlier run of this peer id (same
            // id, frames still on the bus) must not match a read of this run, or it could serve it
            // at a stale index.
            next_read_ctx: uuid::Uuid::new_v4().as_u64_pair().0,
            reads: BTreeMap::new(),
            join_state: JoinState::Idle,
            discovery_started: now,
            discovered: BTreeMap::new(),
            member_heard: false,
            hinted_leader: None,
            last_hello: None,
            last_leader_contact: now,
            leave_reply: None,
            had_remote_peers: false,
            remote_peers: BTreeSet::new(),
            wants_join: BTreeMap::new(),
            wants_leave: BTreeSet::new(),
            last_heard: BTreeMap::new(),
            flush_scheduled: false,
            stop_requested: None,
            last_heartbeat_event: now,
            last_role: Role::Follower,
            last_leader: None,
            config: args.config,
        };
        state.publish_view();
        Ok(state)
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<NodeMsg>,
        state: &mut NodeState,
    ) -> Result<(), ActorProcessingErr> {
        for (_, p) in std::mem::take(&mut state.pending) {
            let _ = p.reply.send(Err(HamokError::Closed));
        }
        for (_, r) in std::mem::take(&mut state.reads) {
            (r.f)(Err(HamokError::Closed));
        }
        if let Some((reply, _)) = state.leave_reply.take() {
            let _ = reply.send(Err(HamokError::Closed));
        }
        if let Some(link) = state.link.take() {
            link.close();
        }
        state.view.send_modify(|v| v.closed = true);
        let _ = state.events.send(HamokEvent::Close);
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<NodeMsg>,
        msg: NodeMsg,
        state: &mut NodeState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            NodeMsg::Inbound(bytes) => {
                state.inbound.processed();
                state.on_frame(&bytes);
            }
            NodeMsg::Tick => state.on_tick(&myself),
            NodeMsg::Flush => {
                state.flush_scheduled = false;
                state.process_ready()?;
            }
            NodeMsg::LinkUp(link) => {
                Counters::bump(&state.counters.transport_connects);
                state.link = Some(link);
                if matches!(state.join_state, JoinState::Discovering) {
                    state.last_hello = None; // announce at once on the new link
                }
            }
            NodeMsg::LinkDown => {
                state.link = None;
            }
            NodeMsg::Join => state.start_join(),
            NodeMsg::Leave(reply) => state.start_leave(reply),
            NodeMsg::Submit { op, timeout, reply } => state.submit(op, timeout, reply),
            NodeMsg::Query {
                storage,
                linearizable,
                timeout,
                f,
            } => state.query(storage, linearizable, timeout, f),
            NodeMsg::Attach { storage, hook } => {
                if let Some(machine) = state.storages.get_mut(&storage) {
                    hook(machine);
                }
                state.attach_hooks.entry(storage).or_default().push(hook);
            }
            NodeMsg::OnDirect { channel, handler } => {
                state.direct_handlers.insert(channel, handler);
            }
            NodeMsg::SendDirect {
                to,
                channel,
                payload,
            } => state.send_frame(to, HamokMessage::Direct { channel, payload }),
        }
        if state.raft.has_ready() && !state.flush_scheduled {
            state.flush_scheduled = true;
            myself.send_message(NodeMsg::Flush)?;
        }
        if let Some(reason) = state.stop_requested.take() {
            myself.stop(Some(reason));
        }
        Ok(())
    }
}

impl NodeState {
    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn emit(&self, event: HamokEvent) {
        // A lagging subscriber loses the oldest events (bounded channel); nobody listening is fine.
        let _ = self.events.send(event);
    }

    fn closing(&self) -> bool {
        self.config.auto_stop_on_no_remote_peers && self.had_remote_peers
    }

    // --------------------------------------------------------------------------------------------
    // Frames in and out

    fn send_frame(&mut self, to: Option<PeerId>, body: HamokMessage) {
        let Some(link) = self.link.as_ref() else {
            Counters::bump(&self.counters.dropped_outbound);
            return;
        };
        let frame = Frame {
            version: PROTOCOL_VERSION,
            cluster: self.config.cluster_id.clone(),
            from: self.id.clone(),
            to: to.clone(),
            body,
        };
        let bytes = match wire::encode_with(&frame, self.frame_key.as_ref()) {
            Ok(b) => b,
            Err(e) => {
                self.emit(HamokEvent::Error(format!("encode: {e}")));
                return;
            }
        };
        let sent = match &to {
            Some(peer) => link.send(peer, bytes),
            None => link.broadcast(bytes),
        };
        match sent {
            Ok(()) => Counters::bump(&self.counters.frames_out),
            Err(_) => Counters::bump(&self.counters.dropped_outbound),
        }
    }

    fn on_frame(&mut self, bytes: &[u8]) {
        Counters::bump(&self.counters.frames_in);
        let frame = match wire::decode_with(
            bytes,
            &self.config.cluster_id,
            &self.id,
            self.config.max_frame_bytes,
            self.frame_key.as_ref(),
        ) {
            Ok(f) => f,
            Err(e) => {
                let counter = match &e {
                    DecodeError::ForeignCluster(_) => &self.counters.dropped_foreign_cluster,
                    DecodeError::Version(_) => &self.counters.dropped_version,
                    DecodeError::Unauthenticated => &self.counters.dropped_unauthenticated,
                    _ => &self.counters.dropped_malformed,
                };
                Counters::bump(counter);
                // Foreign clusters legitimately share a bus: count them, don't alarm.
                if !matches!(e, DecodeError::ForeignCluster(_) | DecodeError::NotForUs) {
                    self.emit(HamokEvent::Error(format!("dropped frame: {e}")));
                }
                return;
            }
        };
        if frame.from == self.id {
            return; // our own broadcast echoed back by the bus
        }
        let now = Instant::now();
        self.last_heard.insert(frame.from.clone(), now);
        match frame.body {
            HamokMessage::Raft(msg) => self.on_raft_message(msg, now),
            HamokMessage::Hello(hello) => self.on_hello(frame.from, hello),
            HamokMessage::JoinRequest { only_follower } => {
                if self.raft.role() == Role::Leader {
                    self.wants_join.insert(frame.from, !only_follower);
                    self.leader_duties();
                }
            }
            HamokMessage::LeaveRequest => {
                if self.raft.role() == Role::Leader {
                    let gone = !self.raft.membership().contains(&frame.from)
                        && !self.raft.latest_membership().contains(&frame.from);
                    if gone {
                        // Its removal is committed; it may have missed the commit notice.
                        self.send_frame(Some(frame.from), HamokMessage::Removed);
                    } else {
                        self.wants_leave.insert(frame.from);
                        self.leader_duties();
                    }
                }
            }
            HamokMessage::Removed => {
                if self.join_state == JoinState::Leaving
                    && self.raft.leader_id() == Some(&frame.from)
                {
                    self.finish_leave();
                }
            }
            HamokMessage::Goodbye => {
                self.last_heard.remove(&frame.from);
                self.discovered.remove(&frame.from);
            }
            HamokMessage::Submit {
                seq,
                floor: _,
                command,
            } => self.on_forwarded_submit(frame.from, seq, Bytes::from(command)),
            HamokMessage::SubmitRedirect { seq, leader } => {
                // Our forward reached a non-leader: send again to whom it names, or wait for a leader.
                if let Some(p) = self.pending.get_mut(&seq) {
                    p.last_sent = None;
                }
                if leader.is_some() && leader != self.raft.leader_id().cloned() {
                    self.hinted_leader = leader;
                }
                self.retry_pending(false);
            }
            HamokMessage::Direct { channel, payload } => {
                if let Some(handler) = self.direct_handlers.get(&channel) {
                    handler(frame.from, payload);
                }
            }
        }
    }

    fn on_raft_message(&mut self, msg: Message, now: Instant) {
        if self.join_state == JoinState::Left || self.join_state == JoinState::Idle {
            return; // not participating
        }
        if Some(&msg.from) == self.raft.leader_id() || msg.term > self.raft.term() {
            self.last_leader_contact = now;
        }
        if matches!(msg.body, crate::raft::MessageBody::Heartbeat { .. }) {
            self.emit(HamokEvent::Heartbeat);
        }
        let now_ms = self.now_ms();
        self.raft.step(now_ms, msg);
    }

    // --------------------------------------------------------------------------------------------
    // The engine's output

    fn process_ready(&mut self) -> Result<(), HamokError> {
        for _ in 0..MAX_READY_ROUNDS_PER_FLUSH {
            if !self.raft.has_ready() {
                break;
            }
            let ready = self.raft.take_ready();
            self.handle_ready(ready)?;
        }
        self.publish_view();
        Ok(())
    }

    fn handle_ready(&mut self, ready: Ready) -> Result<(), HamokError> {
        // 1. Persist, in order, before anything leaves.
        if let Some(snapshot) = &ready.snapshot {
            self.store.save_snapshot(snapshot)?;
        }
        if let Some(hs) = &ready.hard_state {
            self.store.save_hard_state(hs)?;
        }
        if let Some(from) = ready.entries_from {
            self.store.write_entries(from, &ready.entries)?;
        }
        if ready.snapshot.is_some() || ready.hard_state.is_some() || ready.entries_from.is_some() {
            self.store.sync()?;
        }
        // 2. Send.
        for msg in ready.messages {
            let to = msg.to.clone();
            self.send_frame(Some(to), HamokMessage::Raft(msg));
        }
        // 3. Apply.
        if let Some(snapshot) = ready.snapshot {
            let hooks = &self.attach_hooks;
            self.storages.restore(&snapshot.data, |id, machine| {
                for hook in hooks.get(id).into_iter().flatten() {
                    hook(machine);
                }
            })?;
            Counters::bump(&self.counters.snapshots_installed);
            self.answer_requests_in_snapshot();
            self.on_membership_applied();
        }
        if !ready.committed.is_empty() {
            let last = ready.committed.last().map_or(0, |e| e.index);
            for entry in ready.committed {
                self.apply_entry(entry);
            }
            self.emit(HamokEvent::Commit(last));
        }
        // 4. Reads.
        for rs in ready.read_states {
            self.on_read_state(rs);
        }
        self.serve_reads();
        if let Some(soft) = ready.soft_state {
            self.on_soft_state(soft.role, soft.leader, soft.term);
        }
        self.maybe_snapshot()?;
        Ok(())
    }

    fn apply_entry(&mut self, entry: Entry) {
        match entry.payload {
            EntryPayload::Noop => {}
            EntryPayload::Membership(_) => self.on_membership_applied(),
            EntryPayload::Command(bytes) => {
                let cmd: LogCommand = match rmp_serde::from_slice(&bytes) {
                    Ok(c) => c,
                    Err(e) => {
                        // Skipped identically on every peer: determinism holds.
                        self.emit(HamokEvent::Error(format!("undecodable command: {e}")));
                        return;
                    }
                };
                let local = cmd.client == self.client;
                let seq = cmd.seq;
                let created = match &cmd.op {
                    Op::Create { storage, kind } => {
                        if !self.storages.knows_kind(kind) {
                            // The submitter knew this kind (it checks before submitting), so the others
                            // build it: this peer would silently diverge. Stop loudly instead.
                            let reason = format!(
                                "storage `{storage}` has kind `{kind}`, which this peer has not \
                                 registered: it cannot follow the cluster and stops"
                            );
                            self.emit(HamokEvent::Error(reason.clone()));
                            self.stop_requested = Some(reason);
                            return;
                        }
                        Some(storage.clone())
                    }
                    _ => None,
                };
                let result = self.storages.apply(entry.index, entry.term, cmd, local);
                if let Some(storage) = created {
                    self.run_attach_hooks(&storage);
                }
                match result {
                    Applied::Done(result) => {
                        if local {
                            if let Some(p) = self.pending.remove(&seq) {
                                let _ = p.reply.send(result);
                            }
                        }
                    }
                    Applied::Duplicate => {
                        Counters::bump(&self.counters.duplicates_skipped);
                        if local {
                            // Still waiting means the first apply came inside a snapshot (answered
                            // at install, so this is only a fallback): never leave it unanswered.
                            if let Some(p) = self.pending.remove(&seq) {
                                let cached = self.storages.cached_response(&self.client, seq);
                                let _ = p.reply.send(cached.ok_or(HamokError::AppliedResponseLost));
                            }
                        }
                    }
                    Applied::Forgotten => {
                        Counters::bump(&self.counters.duplicates_skipped);
                        if local {
                            if let Some(p) = self.pending.remove(&seq) {
                                let _ = p.reply.send(Err(HamokError::OutcomeUnknown));
                            }
                        }
                    }
                }
            }
        }
    }

    /// After a snapshot install: local requests the snapshot already applied will never be applied
    /// here one by one, so answer them now (from the session's response cache) instead of letting
    /// them time out.
    fn answer_requests_in_snapshot(&mut self) {
        let done: Vec<(u64, SeqStatus)> = self
            .pending
            .keys()
            .map(|&seq| (seq, self.storages.request_status(&self.client, seq)))
            .filter(|(_, status)| *status != SeqStatus::New)
            .collect();
        for (seq, status) in done {
            if let Some(p) = self.pending.remove(&seq) {
                let answer = match status {
                    SeqStatus::Forgotten => Err(HamokError::OutcomeUnknown),
                    _ => self
                        .storages
                        .cached_response(&self.client, seq)
                        .ok_or(HamokError::AppliedResponseLost),
                };
                let _ = p.reply.send(answer);
            }
        }
    }

    fn run_attach_hooks(&mut self, storage: &str) {
        let Some(hooks) = self.attach_hooks.get(storage) else {
            return;
        };
        if let Some(machine) = self.storages.get_mut(storage) {
            for hook in hooks {
                hook(machine);
            }
        }
    }

    /// The committed membership may have changed: update remote peers, join state and sessions.
    fn on_membership_applied(&mut self) {
        let membership = self.raft.membership().clone();
        let now_members: BTreeSet<PeerId> = membership
            .members()
            .filter(|p| **p != self.id)
            .cloned()
            .collect();
        for gone in self.remote_peers.difference(&now_members) {
            // Its client sessions stay (bounded by MAX_CLIENT_SESSIONS): a retry of its requests may
            // still be in flight, and dropping the session would let it apply twice.
            self.last_heard.remove(gone);
            let _ = self.events.send(HamokEvent::RemotePeerLeft(gone.clone()));
        }
        for new in now_members.difference(&self.remote_peers) {
            self.last_heard.insert(new.clone(), Instant::now());
            let _ = self.events.send(HamokEvent::RemotePeerJoined(new.clone()));
        }
        if !now_members.is_empty() {
            self.had_remote_peers = true;
        }
        self.remote_peers = now_members;
        self.wants_join.retain(|p, wants_vote| {
            !(membership.is_voter(p) || (membership.is_learner(p) && !*wants_vote))
        });
        self.wants_leave.retain(|p| membership.contains(p));
        self.update_join_state();
    }

    /// Joined once this peer is a voter (a learner when `only_follower`) of the committed configuration.
    fn update_join_state(&mut self) {
        let membership = self.raft.membership();
        let member = if self.config.only_follower {
            membership.contains(&self.id)
        } else {
            membership.is_voter(&self.id)
        };
        match self.join_state {
            JoinState::Discovering if member && self.raft.leader_id().is_some() => {
                self.join_state = JoinState::Joined;
                self.last_leader_contact = Instant::now();
                self.emit(HamokEvent::Joined);
                if self.raft.role() == Role::Follower {
                    // Announce the role it joins in (the leader announced its own on election).
                    self.emit(HamokEvent::Follower);
                }
            }
            JoinState::Joined if !membership.contains(&self.id) => {
                // Removed while we still want to be in: join again.
                self.rejoin();
            }
            JoinState::Leaving if !membership.contains(&self.id) => self.finish_leave(),
            _ => {}
        }
    }

    fn on_soft_state(&mut self, role: Role, leader: Option<PeerId>, term: u64) {
        if role != self.last_role {
            let old = self.last_role;
            self.last_role = role;
            self.emit(match role {
                Role::Follower => HamokEvent::Follower,
                Role::PreCandidate | Role::Candidate => HamokEvent::Candidate,
                Role::Leader => HamokEvent::Leader,
            });
            self.emit(HamokEvent::StateChanged { new: role, old });
            if role == Role::Leader {
                let now = Instant::now();
                for peer in self.remote_peers.clone() {
                    self.last_heard.insert(peer, now);
                }
            }
        }
        if leader != self.last_leader {
            let old = std::mem::replace(&mut self.last_leader, leader.clone());
            self.emit(HamokEvent::LeaderChanged {
                new: leader.clone(),
                old,
                term,
            });
            if leader.is_some() {
                self.last_leader_contact = Instant::now();
                // A new leader: forward whatever waits, at once (fast failover of writes).
                self.retry_pending(true);
                self.retry_reads(true);
            }
        }
    }

    fn maybe_snapshot(&mut self) -> Result<(), HamokError> {
        let applied = self.raft.applied_index();
        let since = applied.saturating_sub(self.raft.snapshot_index());
        let (_, bytes) = self.store.size();
        // While a snapshot streams to a lagging peer, a new one would make it stale on arrival (the
        // peer would need a second install): wait, up to twice the thresholds so the log stays bounded.
        let slack = if self.raft.snapshot_send_in_progress() {
            2
        } else {
            1
        };
        if since == 0
            || (since < self.config.snapshot_after_entries.saturating_mul(slack)
                && bytes < self.config.snapshot_after_bytes.saturating_mul(slack))
        {
            return Ok(());
        }
        let data = self.storages.snapshot()?;
        self.raft.compact(applied, data)?;
        self.store.save_snapshot(self.raft.snapshot())?;
        Counters::bump(&self.counters.snapshots_taken);
        Ok(())
    }

    fn publish_view(&self) {
        let (log_entries, log_bytes) = self.store.size();
        let status = self.raft.status();
        let membership = Arc::new(status.membership);
        let pending = self.pending.len();
        self.view.send_if_modified(|v| {
            let changed = v.role != status.role
                || v.term != status.term
                || v.leader != status.leader
                || v.commit_index != status.commit_index
                || v.applied_index != status.applied_index
                || v.last_index != status.last_index
                || v.snapshot_index != status.snapshot_index
                || *v.membership != *membership
                || v.join_state != self.join_state
                || v.log_entries != log_entries
                || v.pending_requests != pending;
            if changed {
                *v = View {
                    role: status.role,
                    term: status.term,
                    leader: status.leader.clone(),
                    commit_index: status.commit_index,
                    applied_index: status.applied_index,
                    last_index: status.last_index,
                    snapshot_index: status.snapshot_index,
                    membership: membership.clone(),
                    join_state: self.join_state,
                    closed: false,
                    log_entries,
                    log_bytes,
                    pending_requests: pending,
                };
            }
            changed
        });
    }

    // --------------------------------------------------------------------------------------------
    // Requests

    fn submit(
        &mut self,
        op: Op,
        timeout: Duration,
        reply: oneshot::Sender<Result<Bytes, HamokError>>,
    ) {
        if self.join_state != JoinState::Joined && self.join_state != JoinState::Leaving {
            let _ = reply.send(Err(HamokError::NotJoined));
            return;
        }
        if self.pending.len() >= self.config.max_pending_requests {
            let _ = reply.send(Err(HamokError::Busy("too many pending requests")));
            return;
        }
        if let Op::Create { kind, .. } = &op {
            if !self.storages.knows_kind(kind) {
                // Never put a kind into the log that this peer cannot even build (a typo, a missing
                // registration): it is refused here, before any peer applies it.
                let _ = reply.send(Err(HamokError::Rejected(format!(
                    "unknown storage kind `{kind}` (register it on every peer's builder)"
                ))));
                return;
            }
        }
        // The number is taken only once the request is accepted: a refused request leaves no gap in
        // the session (gaps cost dedup state until the floor passes them).
        let seq = self.next_seq;
        let floor = self.pending.keys().next().copied().unwrap_or(seq).min(seq);
        let cmd = LogCommand {
            client: self.client.clone(),
            seq,
            floor,
            op,
        };
        let command = match rmp_serde::to_vec(&cmd) {
            Ok(v) => Bytes::from(v),
            Err(e) => {
                let _ = reply.send(Err(e.into()));
                return;
            }
        };
        let limit = self.config.raft_config().max_command_bytes;
        if command.len() > limit {
            let _ = reply.send(Err(HamokError::TooLarge {
                size: command.len(),
                limit,
            }));
            return;
        }
        self.next_seq += 1;
        self.pending.insert(
            seq,
            PendingRequest {
                command,
                timeout,
                reply,
                deadline: Instant::now() + timeout,
                last_sent: None,
            },
        );
        self.send_request(seq);
    }

    /// Proposes (on the leader) or forwards (to the leader) one pending request.
    fn send_request(&mut self, seq: u64) {
        let Some(p) = self.pending.get(&seq) else {
            return;
        };
        let command = p.command.clone();
        let now_ms = self.now_ms();
        let sent = if self.raft.role() == Role::Leader {
            match self.raft.propose(now_ms, command) {
                Ok(_) => true,
                Err(RaftError::CommandTooLarge { size, limit }) => {
                    if let Some(p) = self.pending.remove(&seq) {
                        let _ = p.reply.send(Err(HamokError::TooLarge { size, limit }));
                    }
                    return;
                }
                // Busy, transfer in progress: the retry timer tries again.
                Err(_) => false,
            }
        } else if let Some(leader) = self
            .raft
            .leader_id()
            .cloned()
            .or(self.hinted_leader.clone())
        {
            let floor = self.pending.keys().next().copied().unwrap_or(seq);
            self.send_frame(
                Some(leader),
                HamokMessage::Submit {
                    seq,
                    floor,
                    command: command.to_vec(),
                },
            );
            true
        } else {
            false
        };
        if sent {
            if let Some(p) = self.pending.get_mut(&seq) {
                p.last_sent = Some(Instant::now());
            }
        }
    }

    fn on_forwarded_submit(&mut self, from: PeerId, seq: u64, command: Bytes) {
        if self.raft.role() != Role::Leader {
            let leader = self.raft.leader_id().cloned();
            self.send_frame(Some(from), HamokMessage::SubmitRedirect { seq, leader });
            return;
        }
        // Only well-formed commands of the sending peer enter the log: a peer cannot spoof another's
        // session (and with it, the dedup of its requests).
        let valid = rmp_serde::from_slice::<LogCommand>(&command)
            .is_ok_and(|c| c.client.peer == from && c.seq == seq);
        if !valid {
            Counters::bump(&self.counters.dropped_malformed);
            return;
        }
        let now_ms = self.now_ms();
        if self.raft.propose(now_ms, command).is_err() {
            // Busy or transferring: the client retries after its timer.
        }
    }

    /// Resends requests not yet applied: all of them when `all` (a new leader), else those unanswered
    /// for an election timeout (a lost forward or a proposal lost with a deposed leader).
    fn retry_pending(&mut self, all: bool) {
        let now = Instant::now();
        let resend_after = Duration::from_millis(self.config.election_timeout_ms);
        let due: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| all || p.last_sent.is_none_or(|t| now >= t + resend_after))
            .map(|(seq, _)| *seq)
            .collect();
        for seq in due {
            if self.pending[&seq].last_sent.is_some() {
                Counters::bump(&self.counters.requests_retried);
            }
            self.send_request(seq);
        }
    }

    fn query(&mut self, storage: String, linearizable: bool, timeout: Duration, f: QueryFn) {
        if !linearizable {
            f(Ok(self.storages.get(&storage)));
            return;
        }
        if self.join_state != JoinState::Joined && self.join_state != JoinState::Leaving {
            f(Err(HamokError::NotJoined));
            return;
        }
        let ctx = self.next_read_ctx;
        self.next_read_ctx = self.next_read_ctx.wrapping_add(1);
        self.reads.insert(
            ctx,
            PendingRead {
                storage,
                timeout,
                f,
                deadline: Instant::now() + timeout,
                index: None,
                requested_at: None,
            },
        );
        self.request_read(ctx);
    }

    fn request_read(&mut self, ctx: u64) {
        let now_ms = self.now_ms();
        let ok = self.raft.read_index(now_ms, ctx).is_ok();
        if let Some(r) = self.reads.get_mut(&ctx) {
            r.requested_at = ok.then(Instant::now);
        }
    }

    fn on_read_state(&mut self, rs: ReadState) {
        let Some(read) = self.reads.get_mut(&rs.ctx) else {
            return;
        };
        match rs.index {
            // Re-asks can bring several answers: the first one counts (each is a valid read index).
            Some(index) => {
                read.index.get_or_insert(index);
            }
            None => read.requested_at = None, // abandoned: re-asked on the next tick
        }
    }

    /// (Re-)asks the read index of reads without one: those not asked, those asked longer than an
    /// election timeout ago (a lost request or answer), and all of them when `all` (a new leader). A
    /// duplicate answer is harmless: the first one sets the index.
    fn retry_reads(&mut self, all: bool) {
        let now = Instant::now();
        let reask_after = Duration::from_millis(self.config.election_timeout_ms);
        let due: Vec<u64> = self
            .reads
            .iter()
            .filter(|(_, r)| {
                r.index.is_none() && (all || r.requested_at.is_none_or(|t| now >= t + reask_after))
            })
            .map(|(ctx, _)| *ctx)
            .collect();
        for ctx in due {
            self.request_read(ctx);
        }
    }

    fn serve_reads(&mut self) {
        let applied = self.raft.applied_index();
        let ready: Vec<u64> = self
            .reads
            .iter()
            .filter(|(_, r)| r.index.is_some_and(|i| i <= applied))
            .map(|(ctx, _)| *ctx)
            .collect();
        for ctx in ready {
            let read = self.reads.remove(&ctx).expect("listed above");
            (read.f)(Ok(self.storages.get(&read.storage)));
        }
    }

    fn expire(&mut self) {
        let now = Instant::now();
        let expired: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| now >= p.deadline)
            .map(|(s, _)| *s)
            .collect();
        for seq in expired {
            let p = self.pending.remove(&seq).expect("listed above");
            let _ = p
                .reply
                .send(Err(HamokError::Timeout(p.timeout.as_millis() as u64)));
        }
        let expired: Vec<u64> = self
            .reads
            .iter()
            .filter(|(_, r)| now >= r.deadline)
            .map(|(c, _)| *c)
            .collect();
        for ctx in expired {
            let r = self.reads.remove(&ctx).expect("listed above");
            (r.f)(Err(HamokError::Timeout(r.timeout.as_millis() as u64)));
        }
    }

    // --------------------------------------------------------------------------------------------
    // Timers, discovery, join, leave, leader duties

    fn on_tick(&mut self, myself: &ActorRef<NodeMsg>) {
        let now_ms = self.now_ms();
        let participating = !matches!(self.join_state, JoinState::Idle | JoinState::Left);
        if participating && now_ms >= self.raft.next_deadline_ms() {
            self.raft.tick(now_ms);
        }
        match self.join_state {
            JoinState::Discovering => self.discovery_tick(),
            JoinState::Joined => self.joined_tick(),
            JoinState::Leaving => self.leaving_tick(myself),
            JoinState::Idle | JoinState::Left => {}
        }
        if self.raft.role() == Role::Leader {
            self.leader_duties();
            let every = Duration::from_millis(self.config.heartbeat_interval_ms);
            if self.last_heartbeat_event.elapsed() >= every {
                self.last_heartbeat_event = Instant::now();
                self.emit(HamokEvent::Heartbeat);
            }
        }
        self.retry_pending(false);
        self.retry_reads(false);
        self.expire();
        self.publish_view();
    }

    fn start_join(&mut self) {
        match self.join_state {
            JoinState::Idle | JoinState::Left => {}
            _ => return, // already joining or joined
        }
        if self.join_state == JoinState::Left {
            // A fresh start: forget the old cluster entirely (its log, state and sessions).
            if let Err(e) = self.reset_after_leave() {
                self.emit(HamokEvent::Error(format!(
                    "cannot restart after leave: {e}"
                )));
                return;
            }
        }
        self.join_state = JoinState::Discovering;
        self.discovery_started = Instant::now();
        self.discovered.clear();
        self.member_heard = false;
        self.last_hello = None;
        // A restarted durable peer may already be a member.
        self.update_join_state();
        self.discovery_tick();
        self.publish_view();
    }

    fn reset_after_leave(&mut self) -> Result<(), HamokError> {
        let mut store = crate::store::MemoryLogStore::new();
        let persisted = store.load()?;
        self.store = Box::new(store);
        self.seed = self.seed.wrapping_add(1);
        self.raft = RaftNode::new(
            self.id.clone(),
            self.config.raft_config(),
            self.seed,
            self.now_ms(),
            persisted,
        )?;
        self.storages.restore(&[], |_, _| {})?;
        self.remote_peers.clear();
        self.had_remote_peers = false;
        Ok(())
    }

    fn rejoin(&mut self) {
        self.emit(HamokEvent::Rejoining);
        self.join_state = JoinState::Discovering;
        self.discovery_started = Instant::now();
        self.discovered.clear();
        self.member_heard = false;
        self.last_hello = None;
        self.hinted_leader = None;
    }

    fn hello(&self, reply: bool) -> Hello {
        let membership = self.raft.membership();
        Hello {
            member: membership.contains(&self.id),
            leader: self.raft.leader_id().cloned(),
            term: self.raft.term(),
            joining: matches!(self.join_state, JoinState::Discovering),
            reply,
            can_lead: !self.config.only_follower,
        }
    }

    fn discovery_tick(&mut self) {
        let now = Instant::now();
        let hello_every = Duration::from_millis(self.config.hello_interval_ms);
        if self.last_hello.is_none_or(|t| now >= t + hello_every) {
            self.last_hello = Some(now);
            let hello = self.hello(true);
            self.send_frame(None, HamokMessage::Hello(hello));
            if let Some(leader) = self
                .raft
                .leader_id()
                .cloned()
                .or(self.hinted_leader.clone())
            {
                self.send_frame(
                    Some(leader),
                    HamokMessage::JoinRequest {
                        only_follower: self.config.only_follower,
                    },
                );
            }
        }
        self.update_join_state();
        if self.join_state != JoinState::Discovering {
            return;
        }
        // Bootstrap rule: nobody answered as a member for a whole discovery window, and we have the lowest
        // id among the peers that could lead: found a cluster of one. Everyone else waits for us.
        let window = Duration::from_millis(self.config.discovery_window_ms);
        let pristine = self.raft.last_index() == 0
            && self.raft.term() == 0
            && self.raft.membership().voters.is_empty();
        if !self.member_heard
            && pristine
            && !self.config.only_follower
            && now >= self.discovery_started + window
        {
            let lowest = self
                .discovered
                .iter()
                .filter(|(_, can_lead)| **can_lead)
                .map(|(p, _)| p)
                .chain(std::iter::once(&self.id))
                .min()
                .cloned();
            if lowest.as_ref() == Some(&self.id) {
                self.bootstrap();
            }
        }
    }

    fn bootstrap(&mut self) {
        let genesis = PersistedState::genesis(Membership::with_voters([self.id.clone()]));
        let now_ms = self.now_ms();
        match RaftNode::new(
            self.id.clone(),
            self.config.raft_config(),
            self.seed,
            now_ms,
            genesis.clone(),
        ) {
            Ok(mut raft) => {
                if let Err(e) = self.store.save_snapshot(&genesis.snapshot) {
                    self.emit(HamokEvent::Error(format!("bootstrap: {e}")));
                    return;
                }
                raft.campaign_now(now_ms);
                self.raft = raft;
                self.update_join_state();
            }
            Err(e) => self.emit(HamokEvent::Error(format!("bootstrap: {e}"))),
        }
    }

    fn on_hello(&mut self, from: PeerId, hello: Hello) {
        if hello.member {
            self.member_heard = true;
            if let Some(leader) = hello.leader.clone() {
                if self.raft.leader_id().is_none() {
                    self.hinted_leader = Some(leader);
                }
            }
        } else if hello.joining {
            self.discovered.insert(from.clone(), hello.can_lead);
        }
        let we_are_member = self.raft.membership().contains(&self.id);
        if hello.reply && we_are_member {
            let answer = self.hello(false);
            self.send_frame(Some(from.clone()), HamokMessage::Hello(answer));
        }
        if self.join_state == JoinState::Discovering {
            if let Some(leader) = self
                .raft
                .leader_id()
                .cloned()
                .or(self.hinted_leader.clone())
            {
                if hello.member {
                    self.send_frame(
                        Some(leader),
                        HamokMessage::JoinRequest {
                            only_follower: self.config.only_follower,
                        },
                    );
                }
            }
        }
    }

    fn joined_tick(&mut self) {
        if self.raft.role() == Role::Leader {
            self.last_leader_contact = Instant::now();
            return;
        }
        // Cut off from any leader for longer than the leader waits before removing a silent peer: we may
        // have been removed without hearing of it. Look for the cluster again.
        let silent_for = self.last_leader_contact.elapsed();
        if silent_for > Duration::from_millis(self.config.peer_max_idle_ms) {
            self.rejoin();
        }
        if self.closing() && self.remote_peers.is_empty() {
            self.stop_requested =
                Some("no remote peers left (auto_stop_on_no_remote_peers)".into());
        }
    }

    fn start_leave(&mut self, reply: oneshot::Sender<Result<(), HamokError>>) {
        match self.join_state {
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
        let deadline = Instant::now() + Duration::from_millis(self.config.request_timeout_ms);
        self.leave_reply = Some((reply, deadline));
        self.join_state = JoinState::Leaving;
        if !self.raft.membership().contains(&self.id) {
            self.finish_leave();
        }
    }

    fn leaving_tick(&mut self, _myself: &ActorRef<NodeMsg>) {
        if let Some((_, deadline)) = &self.leave_reply {
            if Instant::now() >= *deadline {
                // Tell the caller; we still stop participating (the leader removes us as silent).
                let (reply, _) = self.leave_reply.take().expect("checked");
                let _ = reply.send(Err(HamokError::Timeout(self.config.request_timeout_ms)));
                self.finish_leave();
                return;
            }
        }
        let membership = self.raft.membership().clone();
        if !membership.contains(&self.id) {
            self.finish_leave();
            return;
        }
        let others: Vec<PeerId> = membership
            .voters
            .iter()
            .filter(|p| **p != self.id)
            .cloned()
            .collect();
        if self.raft.role() == Role::Leader {
            if others.is_empty() {
                // The last voter: there is nobody to hand over to. Leaving ends the cluster.
                self.finish_leave();
                return;
            }
            if !self.raft.transfer_in_progress() {
                let target = others
                    .iter()
                    .max_by_key(|p| {
                        (
                            self.raft.match_index(p).unwrap_or(0),
                            std::cmp::Reverse((*p).clone()),
                        )
                    })
                    .cloned()
                    .expect("others is not empty");
                let now_ms = self.now_ms();
                let _ = self.raft.transfer_leadership(now_ms, target);
            }
        } else if let Some(leader) = self.raft.leader_id().cloned() {
            let now = Instant::now();
            let every = Duration::from_millis(self.config.hello_interval_ms);
            if self.last_hello.is_none_or(|t| now >= t + every) {
                self.last_hello = Some(now);
                self.send_frame(Some(leader), HamokMessage::LeaveRequest);
            }
        }
    }

    fn finish_leave(&mut self) {
        self.send_frame(None, HamokMessage::Goodbye);
        self.join_state = JoinState::Left;
        self.emit(HamokEvent::Left);
        for (_, p) in std::mem::take(&mut self.pending) {
            let _ = p.reply.send(Err(HamokError::NotJoined));
        }
        if let Some((reply, _)) = self.leave_reply.take() {
            let _ = reply.send(Ok(()));
        }
        self.publish_view();
    }

    /// Leader-only: admit joiners, promote caught-up learners, remove leavers and silent peers.
    /// One configuration change at a time; what cannot be done now is retried on the next tick.
    fn leader_duties(&mut self) {
        if self.raft.role() != Role::Leader {
            return;
        }
        let now = Instant::now();
        let now_ms = self.now_ms();
        let idle = Duration::from_millis(self.config.peer_max_idle_ms);
        let latest = self.raft.latest_membership().clone();
        // Requests already satisfied need no work.
        self.wants_join.retain(|p, wants_vote| {
            !(latest.is_voter(p) || (latest.is_learner(p) && !*wants_vote))
        });
        for peer in latest.members() {
            if *peer == self.id {
                continue;
            }
            let last = *self.last_heard.entry(peer.clone()).or_insert(now);
            if now >= last + idle && !self.wants_leave.contains(peer) {
                self.wants_leave.insert(peer.clone());
                let _ = self.events.send(HamokEvent::NoHeartbeatFrom(peer.clone()));
            }
        }
        let change = if let Some(peer) = self.wants_leave.iter().find(|p| latest.contains(p)) {
            Some(MembershipChange::Remove(peer.clone()))
        } else if let Some((peer, _)) = self.wants_join.iter().find(|(p, _)| !latest.contains(p)) {
            Some(MembershipChange::AddLearner(peer.clone()))
        } else {
            let commit = self.raft.commit_index();
            self.wants_join
                .iter()
                .find(|(p, wants_vote)| {
                    **wants_vote
                        && latest.is_learner(p)
                        && self.raft.match_index(p).is_some_and(|m| m >= commit)
                })
                .map(|(p, _)| MembershipChange::Promote(p.clone()))
        };
        if let Some(change) = change {
            let _ = self.raft.propose_membership(now_ms, change);
        }
    }
}
