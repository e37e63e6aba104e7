//! A tiny deterministic network for engine tests: a set of [`RaftNode`]s keyed by id, one FIFO queue of
//! messages delivered by hand, and a driver that follows the contract of [`Ready`]: persist (into an
//! in-memory [`PersistedState`] per node), then send, then apply.
//!
//! Nothing here reads a clock or a random source: time is `Net::now`, moved by the test, and each node
//! gets a fixed seed.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use bytes::Bytes;
use hamok_runtime::raft::{
    Entry, EntryPayload, LogIndex, Membership, Message, MessageBody, PeerId, PersistedState,
    RaftConfig, RaftNode, ReadState, Ready, Role, Snapshot, Term,
};

/// Shorthand for a peer id.
pub fn pid(s: &str) -> PeerId {
    PeerId::from(s)
}

/// Short timings so tests read easily: election timeout 100 ms, heartbeat 10 ms.
pub fn cfg() -> RaftConfig {
    RaftConfig {
        election_timeout_ms: 100,
        heartbeat_interval_ms: 10,
        ..RaftConfig::default()
    }
}

/// Entries `(index, term)` carrying a small command each.
pub fn entries(spec: &[(LogIndex, Term)]) -> Vec<Entry> {
    spec.iter()
        .map(|&(index, term)| Entry {
            term,
            index,
            payload: EntryPayload::Command(Bytes::from(format!("cmd-{index}-{term}"))),
        })
        .collect()
}

/// A message from `from` to `to` in `term`.
pub fn msg(from: &str, to: &str, term: Term, body: MessageBody) -> Message {
    Message {
        from: pid(from),
        to: pid(to),
        term,
        body,
    }
}

/// A restart-ready state: the genesis snapshot of `voters`, then `hard term`/`vote` and `log`.
pub fn persisted(voters: &[&str], term: Term, log: Vec<Entry>) -> PersistedState {
    let mut state = PersistedState::genesis(Membership::with_voters(voters.iter().map(|v| pid(v))));
    state.hard_state.term = term;
    state.entries = log;
    state
}

/// The simulated cluster.
pub struct Net {
    /// The peers.
    pub nodes: BTreeMap<PeerId, RaftNode>,
    /// What each peer has made durable, exactly as its Readys asked.
    pub storage: BTreeMap<PeerId, PersistedState>,
    /// Entries each peer's state machine applied, in order (reset by a restart).
    pub applied: BTreeMap<PeerId, Vec<Entry>>,
    /// Snapshots each peer restored.
    pub restored: BTreeMap<PeerId, Vec<Snapshot>>,
    /// Read outcomes each peer reported.
    pub read_states: BTreeMap<PeerId, Vec<ReadState>>,
    /// Messages sent and not yet delivered, oldest first.
    pub queue: VecDeque<Message>,
    /// Every message delivered (stepped into its receiver), oldest first.
    pub delivered: Vec<Message>,
    /// Every message any peer sent (delivered, dropped or still queued), oldest first.
    pub sent: Vec<Message>,
    /// Messages to or from these peers are dropped.
    pub isolated: BTreeSet<PeerId>,
    /// Messages to these peers are dropped.
    pub deaf: BTreeSet<PeerId>,
    /// The clock passed to every call.
    pub now: u64,
    config: RaftConfig,
    next_seed: u64,
    /// Applied index per peer, to check committed entries come out contiguous and exactly once.
    applied_index: BTreeMap<PeerId, LogIndex>,
}

impl Net {
    /// A new cluster whose founding voters are `ids`.
    pub fn new(ids: &[&str], config: RaftConfig) -> Net {
        let genesis = PersistedState::genesis(Membership::with_voters(ids.iter().map(|i| pid(i))));
        let mut net = Net::empty(config);
        for id in ids {
            net.add_node(id, genesis.clone());
        }
        net
    }

    /// A cluster of peers built from the given persisted states.
    pub fn with_states(config: RaftConfig, states: Vec<(&str, PersistedState)>) -> Net {
        let mut net = Net::empty(config);
        for (id, state) in states {
            net.add_node(id, state);
        }
        net
    }

    fn empty(config: RaftConfig) -> Net {
        Net {
            nodes: BTreeMap::new(),
            storage: BTreeMap::new(),
            applied: BTreeMap::new(),
            restored: BTreeMap::new(),
            read_states: BTreeMap::new(),
            queue: VecDeque::new(),
            delivered: Vec::new(),
            sent: Vec::new(),
            isolated: BTreeSet::new(),
            deaf: BTreeSet::new(),
            now: 0,
            config,
            next_seed: 1,
            applied_index: BTreeMap::new(),
        }
    }

    /// Starts a peer from `state` (`PersistedState::default()` for a peer a leader will add).
    pub fn add_node(&mut self, id: &str, state: PersistedState) {
        let seed = self.next_seed;
        self.next_seed += 1;
        let node = RaftNode::new(pid(id), self.config.clone(), seed, self.now, state.clone())
            .expect("valid config");
        self.applied_index
            .insert(pid(id), state.snapshot.meta.last_index);
        self.storage.insert(pid(id), state);
        self.applied.insert(pid(id), Vec::new());
        self.nodes.insert(pid(id), node);
    }

    /// Rebuilds a peer from what it persisted (its volatile state and state machine are lost).
    pub fn restart(&mut self, id: &str) {
        let state = self.storage[&pid(id)].clone();
        let seed = self.next_seed;
        self.next_seed += 1;
        let node = RaftNode::new(pid(id), self.config.clone(), seed, self.now, state.clone())
            .expect("valid config");
        self.applied_index
            .insert(pid(id), state.snapshot.meta.last_index);
        self.applied.insert(pid(id), Vec::new());
        self.nodes.insert(pid(id), node);
    }

    /// The peer `id`.
    pub fn node(&self, id: &str) -> &RaftNode {
        &self.nodes[&pid(id)]
    }

    /// The peer `id`, mutably.
    pub fn node_mut(&mut self, id: &str) -> &mut RaftNode {
        self.nodes.get_mut(&pid(id)).expect("known peer")
    }

    /// The unique leader of the highest term among leaders, if any.
    pub fn leader(&self) -> Option<PeerId> {
        self.nodes
            .values()
            .filter(|n| n.role() == Role::Leader)
            .max_by_key(|n| n.term())
            .map(|n| n.id().clone())
    }

    /// Takes `id`'s Ready and handles it as a driver must: persist, then queue the messages, then apply.
    /// Returns the Ready for inspection.
    pub fn drain(&mut self, id: &str) -> Ready {
        let id = pid(id);
        let ready = self.nodes.get_mut(&id).expect("known peer").take_ready();
        // 1. Persist.
        let store = self.storage.get_mut(&id).expect("known peer");
        if let Some(hs) = &ready.hard_state {
            store.hard_state = hs.clone();
        }
        if let Some(snap) = &ready.snapshot {
            store.entries.retain(|e| e.index > snap.meta.last_index);
            store.snapshot = snap.clone();
        }
        if let Some(from) = ready.entries_from {
            store.entries.retain(|e| e.index < from);
            store.entries.extend(ready.entries.iter().cloned());
        } else {
            assert!(ready.entries.is_empty(), "entries without entries_from");
        }
        let base = store.snapshot.meta.last_index;
        for (i, e) in store.entries.iter().enumerate() {
            assert_eq!(
                e.index,
                base + 1 + i as u64,
                "{id}: durable log is not contiguous after applying a Ready"
            );
        }
        // 2. Send.
        for m in &ready.messages {
            assert_eq!(m.from, id, "a peer sends only as itself");
            self.queue.push_back(m.clone());
            self.sent.push(m.clone());
        }
        // 3. Apply: a restored snapshot, then committed entries, each exactly once and in order.
        let applied = self.applied_index.get_mut(&id).expect("known peer");
        if let Some(snap) = &ready.snapshot {
            *applied = snap.meta.last_index;
            self.restored
                .entry(id.clone())
                .or_default()
                .push(snap.clone());
        }
        for e in &ready.committed {
            assert_eq!(
                e.index,
                *applied + 1,
                "{id}: committed entries out of order"
            );
            *applied = e.index;
            self.applied
                .get_mut(&id)
                .expect("known peer")
                .push(e.clone());
        }
        // 4. Reads.
        self.read_states
            .entry(id)
            .or_default()
            .extend(ready.read_states.iter().cloned());
        ready
    }

    /// Drains every peer.
    pub fn drain_all(&mut self) {
        let ids: Vec<PeerId> = self.nodes.keys().cloned().collect();
        for id in ids {
            self.drain(id.as_str());
        }
    }

    /// Drains every peer and returns (and forgets) every queued message.
    pub fn take_queue(&mut self) -> Vec<Message> {
        self.drain_all();
        self.queue.drain(..).collect()
    }

    /// Steps one message into its receiver now (no filtering). Its answers wait for the next drain.
    pub fn deliver(&mut self, m: Message) {
        let now = self.now;
        self.delivered.push(m.clone());
        if let Some(node) = self.nodes.get_mut(&m.to) {
            node.step(now, m);
        }
    }

    fn dropped(&self, m: &Message) -> bool {
        self.isolated.contains(&m.from)
            || self.isolated.contains(&m.to)
            || self.deaf.contains(&m.to)
    }

    /// Delivers messages (and the messages they cause) until nothing is left to send.
    pub fn deliver_all(&mut self) {
        self.deliver_all_with(Some);
    }

    /// Like [`Net::deliver_all`], but each message first goes through `filter`, which may drop it
    /// (`None`) or rewrite it.
    pub fn deliver_all_with<F: FnMut(Message) -> Option<Message>>(&mut self, mut filter: F) {
        for _ in 0..1_000_000 {
            self.drain_all();
            let Some(m) = self.queue.pop_front() else {
                return;
            };
            if self.dropped(&m) {
                continue;
            }
            if let Some(m) = filter(m) {
                self.deliver(m);
            }
        }
        panic!("the network never went quiet");
    }

    /// Moves the clock to `now` (never backwards) and ticks peer `id`.
    pub fn tick(&mut self, id: &str, now: u64) {
        self.now = self.now.max(now);
        let now = self.now;
        self.node_mut(id).tick(now);
    }

    /// Advances the clock by `ms` and ticks every peer once.
    pub fn tick_all(&mut self, ms: u64) {
        self.now += ms;
        let now = self.now;
        for node in self.nodes.values_mut() {
            node.tick(now);
        }
    }

    /// Lets `ms` milliseconds pass one at a time, ticking every peer and delivering everything each step.
    pub fn run_for(&mut self, ms: u64) {
        for _ in 0..ms {
            self.tick_all(1);
            self.deliver_all();
        }
    }

    /// Makes `id` time out (only it is ticked) and delivers the election; asserts it won.
    pub fn elect(&mut self, id: &str) {
        let deadline = self.node(id).next_deadline_ms();
        self.tick(id, deadline);
        self.deliver_all();
        assert_eq!(self.node(id).role(), Role::Leader, "{id} should have won");
    }

    /// Ticks every peer a millisecond at a time, delivering everything, until some peer leads
    /// (at most `limit_ms`). Returns the leader.
    pub fn tick_until_leader(&mut self, limit_ms: u64) -> PeerId {
        for _ in 0..limit_ms {
            self.tick_all(1);
            self.deliver_all();
            if let Some(leader) = self.leader() {
                return leader;
            }
        }
        panic!("no leader within {limit_ms} ms");
    }

    /// Drops every later message to `id`.
    pub fn drop_messages_to(&mut self, id: &str) {
        self.deaf.insert(pid(id));
    }

    /// Drops every later message to or from `id`.
    pub fn isolate(&mut self, id: &str) {
        self.isolated.insert(pid(id));
    }

    /// Stops dropping messages.
    pub fn heal(&mut self) {
        self.isolated.clear();
        self.deaf.clear();
    }

    /// Messages delivered so far to `to` whose body satisfies `pred`.
    pub fn delivered_to<P: Fn(&MessageBody) -> bool>(&self, to: &str, pred: P) -> Vec<Message> {
        self.delivered
            .iter()
            .filter(|m| m.to.as_str() == to && pred(&m.body))
            .cloned()
            .collect()
    }
}
