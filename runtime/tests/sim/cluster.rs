//! The simulated peers: each has durable storage (hard state, snapshot, log) that survives crashes and a
//! live part (engine, state machine, client bookkeeping) that does not. This module drives the engine's
//! `Ready` contract and runs the per-step safety checks.

use std::collections::{BTreeMap, BTreeSet};

use crate::store::{FileLogStore, FileLogStoreOptions, LogStore, SyncPolicy};
use crate::HamokError;

use crate::raft::{
    Entry, HardState, LogIndex, Membership, PeerId, PersistedState, RaftConfig, RaftNode, Ready,
    Role, Snapshot, SnapshotMeta, Term,
};

use super::checks::{ensure, violation, Check, Registry};
use super::kv::{payload_digest, ApplyResult, Kv, Value};
use super::network::{Network, SendOutcome};
use super::trace::{Ev, MsgSum, Trace};
use super::util::{fnv64, mix64, Rng};

/// What survives a crash.
#[derive(Clone, Debug, Default)]
pub struct Durable {
    pub hard_state: HardState,
    pub snapshot: Snapshot,
    pub log: Vec<Entry>,
}

impl Durable {
    pub fn from_state(s: PersistedState) -> Durable {
        Durable {
            hard_state: s.hard_state,
            snapshot: s.snapshot,
            log: s.entries,
        }
    }

    pub fn persisted(&self) -> PersistedState {
        PersistedState {
            hard_state: self.hard_state.clone(),
            snapshot: self.snapshot.clone(),
            entries: self.log.clone(),
            committed: 0,
        }
    }

    pub fn snapshot_index(&self) -> LogIndex {
        self.snapshot.meta.last_index
    }

    pub fn last_index(&self) -> LogIndex {
        self.log.last().map_or(self.snapshot_index(), |e| e.index)
    }

    pub fn entry(&self, index: LogIndex) -> Option<&Entry> {
        let first = self.log.first()?.index;
        if index < first {
            return None;
        }
        self.log.get((index - first) as usize)
    }

    pub fn term_at(&self, index: LogIndex) -> Option<Term> {
        if index == self.snapshot_index() {
            return Some(self.snapshot.meta.last_term);
        }
        self.entry(index).map(|e| e.term)
    }
}

/// The part of a peer that a crash destroys.
pub struct Live {
    pub node: RaftNode,
    pub kv: Kv,
    pub deadline: u64,
    pub last_commit: LogIndex,
    pub last_applied: LogIndex,
    pub last_term: Term,
    /// The term in which this incarnation was last checked as a new leader.
    pub leader_checked: Option<Term>,
    /// Writes proposed here, by log index: (op id, term of the proposal).
    pub pending_writes: BTreeMap<LogIndex, Vec<(u64, Term)>>,
    /// Reads started here: ctx (= op id) -> read index once known.
    pub reads: BTreeMap<u64, Option<LogIndex>>,
    pub compact_at: LogIndex,
    pub last_soft: Option<(Role, Term)>,
    /// The configuration in force (the latest in the log) at the last check.
    pub last_config: Membership,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotStatus {
    Running,
    Crashed,
    /// Removed from the cluster (or never added): gone for good.
    Stopped,
}

pub struct Slot {
    pub id: PeerId,
    pub durable: Durable,
    pub live: Option<Live>,
    pub status: SlotStatus,
    pub incarnation: u32,
    /// A paused peer (think: a long GC pause or a stalled disk) handles nothing before this time; messages
    /// to it wait.
    pub paused_until: u64,
    /// With the file store: this incarnation's open store (closed by a crash, reopened by a restart).
    pub file: Option<FileLogStore>,
    /// With `persist_async`: the first entry a leader wrote that no sync has covered yet (a crash
    /// may lose it and everything after). `durable.log` holds it meanwhile, as the kernel would.
    pub unsynced_from: Option<LogIndex>,
    /// When the last background sync this incarnation started completes (they complete in order).
    pub sync_done_at: u64,
}

/// What an operation is (with its outcome once known).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OpWhat {
    Put {
        value: Value,
    },
    Get {
        observed: Option<Option<Value>>,
    },
    Cas {
        expected: Option<Value>,
        new: Value,
        ok: Option<bool>,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpStatus {
    /// Not yet accepted by any peer; not part of the history.
    Attempting,
    /// Accepted, outcome pending.
    InFlight,
    Done,
    /// Definitely did not take effect: left out of the history.
    Failed,
    /// A read that never got an answer: left out of the history.
    Dropped,
    /// A write whose proposer lost track of it (crash, timeout): may or may not have taken effect.
    Unknown,
}

#[derive(Clone, Debug)]
pub struct OpRec {
    pub id: u64,
    pub client: usize,
    pub key: u8,
    pub what: OpWhat,
    pub status: OpStatus,
    pub call: u64,
    pub ret: Option<u64>,
    pub call_ms: u64,
    pub ret_ms: u64,
    pub node: Option<PeerId>,
    pub slot: Option<(LogIndex, Term)>,
    pub attempts: u32,
    pub liveness: bool,
    /// Its peer crashed or was stopped while it was in flight (exempt from the liveness bound).
    pub excused: bool,
}

impl OpRec {
    pub fn is_write(&self) -> bool {
        !matches!(self.what, OpWhat::Get { .. })
    }
}

#[derive(Clone, Debug, Default)]
pub struct Client {
    pub current: Option<u64>,
    /// The last value this client saw per key (for CAS expectations).
    pub seen: BTreeMap<u8, Option<Value>>,
}

/// Events of the driver (workload, faults, phases), in time order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DriverEv {
    ClientWake(usize),
    Retry(u64),
    OpTimeout(u64),
    Fault,
    HealPartition(u64),
    Restart(PeerId),
    Stop(PeerId),
    ChaosEnd,
    FinalStep,
    Sweep,
    /// A leader's background sync completed: its log is durable up to (`index`, `term`).
    Synced {
        id: PeerId,
        incarnation: u32,
        index: LogIndex,
        term: Term,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Chaos,
    Final { since: u64 },
    Drain { until: u64 },
    Done,
}

#[derive(Clone, Debug, Default)]
pub struct Stats {
    pub events: u64,
    pub deliveries: u64,
    pub ticks: u64,
    pub crashes: u64,
    pub restarts: u64,
    pub partitions: u64,
    pub transfers: u64,
    pub conf_proposed: u64,
    pub conf_committed: u64,
    pub compactions: u64,
    /// Compactions written into the engine's last snapshot buffer (`take_snapshot_buffer`).
    pub snapshot_buffers_reused: u64,
    pub snapshots_installed: u64,
    /// Crashes that lost a leader's unsynced entries (`persist_async`).
    pub unsynced_lost: u64,
    pub stray_read_states: u64,
    pub read_retries: u64,
    pub max_nodes: usize,
}

/// A membership change proposed by the simulation, resolved through the applied registry.
#[derive(Clone, Debug)]
pub struct ConfOp {
    pub change: crate::raft::MembershipChange,
    pub index: LogIndex,
    pub term: Term,
    pub resolved: bool,
}

pub struct Cluster {
    pub seed: u64,
    pub now: u64,
    pub config: RaftConfig,
    pub hook: Option<fn(&mut RaftNode)>,
    pub genesis: Membership,
    /// Boxed, so that taking a slot out and putting it back (see [`Cluster::with_slot`]) moves a pointer.
    pub slots: BTreeMap<PeerId, Box<Slot>>,
    pub network: Network,
    pub registry: Registry,
    pub trace: Trace,
    pub history: BTreeMap<u64, OpRec>,
    pub clients: Vec<Client>,
    pub hseq: u64,
    pub next_op: u64,
    pub stats: Stats,
    pub queue: BTreeMap<(u64, u64), DriverEv>,
    pub qseq: u64,
    pub phase: Phase,
    pub conf_ops: Vec<ConfOp>,
    pub next_peer: u32,
    /// Randomness for workload and harness choices, faults, and engine seeds.
    pub rng: Rng,
    pub fault_rng: Rng,
    pub compact_min: u64,
    pub compact_max: u64,
    /// With the file store: the directory holding one [`FileLogStore`] per peer, which mirrors every
    /// durable write of the model; a restarted peer starts from what the store loads, after checking it
    /// equals the model.
    pub file_root: Option<tempfile::TempDir>,
}

/// Writes what `rd` asks to persist to the peer's file store too (file-store runs only).
fn mirror_to_file(slot: &mut Slot, rd: &Ready) -> Check {
    let Some(store) = slot.file.as_mut() else {
        return Ok(());
    };
    let id = &slot.id;
    let fail = |what: &str, e: HamokError| violation("file store", format!("{id}: {what}: {e}"));
    if let Some(snap) = &rd.snapshot {
        store.save_snapshot(snap).map_err(|e| fail("snapshot", e))?;
    }
    if let Some(hs) = &rd.hard_state {
        store
            .save_hard_state(hs)
            .map_err(|e| fail("hard state", e))?;
    }
    if let Some(from) = rd.entries_from {
        store
            .write_entries(from, &rd.entries)
            .map_err(|e| fail("entries", e))?;
    }
    if let Some(last) = rd.committed.last() {
        store
            .save_committed(last.index, last.term)
            .map_err(|e| fail("commit mark", e))?;
    }
    store.sync().map_err(|e| fail("sync", e))
}

impl Cluster {
    /// What a (re)starting peer starts from: the model's durable state, or, in a file-store run, what
    /// its reopened store loads, which must equal the model (plus a commit mark).
    fn reopen_file_store(&mut self, slot: &mut Slot) -> Check<PersistedState> {
        let model = slot.durable.persisted();
        let Some(root) = &self.file_root else {
            return Ok(model);
        };
        let id = slot.id.clone();
        let dir = root.path().join(id.as_str());
        let fresh = !dir.exists();
        slot.file = None;
        let options = FileLogStoreOptions {
            // The simulation closes stores, it does not cut power: writes that reached the kernel are
            // what a restart must find (and syncing every Ready would make seeds slow).
            sync: SyncPolicy::Never,
            // Small chunks: a seed rolls several, and compaction deletes those behind its snapshots.
            chunk_max_bytes: 2 << 10,
            ..FileLogStoreOptions::default()
        };
        let mut store = FileLogStore::open(&dir, options)
            .map_err(|e| violation("file store", format!("{id}: open: {e}")))?;
        let fail =
            |what: &str, e: HamokError| violation("file store", format!("{id}: {what}: {e}"));
        if fresh {
            store
                .save_snapshot(&model.snapshot)
                .map_err(|e| fail("snapshot", e))?;
            store
                .save_hard_state(&model.hard_state)
                .map_err(|e| fail("hard state", e))?;
            if let Some(first) = model.entries.first() {
                store
                    .write_entries(first.index, &model.entries)
                    .map_err(|e| fail("entries", e))?;
            }
            store.sync().map_err(|e| fail("sync", e))?;
            slot.file = Some(store);
            return Ok(model);
        }
        let loaded = store.load().map_err(|e| fail("load", e))?;
        ensure(
            loaded.hard_state == model.hard_state
                && loaded.snapshot == model.snapshot
                && loaded.entries == model.entries,
            "file store",
            || {
                format!(
                    "{id} reloaded term {} vote {:?} snapshot {} log {:?}..={:?}, but persisted term {} \
                     vote {:?} snapshot {} log {:?}..={:?}",
                    loaded.hard_state.term,
                    loaded.hard_state.voted_for,
                    loaded.snapshot.meta.last_index,
                    loaded.entries.first().map(|e| e.index),
                    loaded.entries.last().map(|e| e.index),
                    model.hard_state.term,
                    model.hard_state.voted_for,
                    model.snapshot.meta.last_index,
                    model.entries.first().map(|e| e.index),
                    model.entries.last().map(|e| e.index),
                )
            },
        )?;
        slot.file = Some(store);
        Ok(loaded)
    }

    /// The next history time stamp.
    pub fn next_seq(&mut self) -> u64 {
        self.hseq += 1;
        self.hseq
    }

    pub fn schedule(&mut self, at: u64, ev: DriverEv) {
        self.qseq += 1;
        self.queue.insert((at.max(self.now), self.qseq), ev);
    }

    pub fn note(&mut self, s: String) {
        let now = self.now;
        self.trace.text(now, s);
    }

    /// Runs `f` on the slot `id`, taken out of the map for the duration (so `f` can use the rest of `self`).
    pub fn with_slot<R>(
        &mut self,
        id: &PeerId,
        f: impl FnOnce(&mut Self, &mut Slot) -> R,
    ) -> Option<R> {
        let mut slot = self.slots.remove(id)?;
        let r = f(self, &mut slot);
        self.slots.insert(id.clone(), slot);
        Some(r)
    }

    pub fn is_running(&self, id: &PeerId) -> bool {
        self.slots.get(id).is_some_and(|s| s.live.is_some())
    }

    /// Running and not paused: a client can talk to it now.
    pub fn is_available(&self, id: &PeerId) -> bool {
        self.slots
            .get(id)
            .is_some_and(|s| s.live.is_some() && s.paused_until <= self.now)
    }

    pub fn available_ids(&self) -> Vec<PeerId> {
        self.slots
            .values()
            .filter(|s| s.live.is_some() && s.paused_until <= self.now)
            .map(|s| s.id.clone())
            .collect()
    }

    pub fn running_ids(&self) -> Vec<PeerId> {
        self.slots
            .values()
            .filter(|s| s.live.is_some())
            .map(|s| s.id.clone())
            .collect()
    }

    /// Peers that exist (running or crashed), i.e. not stopped for good.
    pub fn present_ids(&self) -> Vec<PeerId> {
        self.slots
            .values()
            .filter(|s| s.status != SlotStatus::Stopped)
            .map(|s| s.id.clone())
            .collect()
    }

    pub fn node(&self, id: &PeerId) -> Option<&RaftNode> {
        self.slots.get(id)?.live.as_ref().map(|l| &l.node)
    }

    /// The available leader with the highest term, if any.
    pub fn best_leader(&self) -> Option<PeerId> {
        self.slots
            .values()
            .filter(|s| s.paused_until <= self.now)
            .filter_map(|s| s.live.as_ref())
            .filter(|l| l.node.role() == Role::Leader)
            .max_by_key(|l| (l.node.term(), l.node.id().clone()))
            .map(|l| l.node.id().clone())
    }

    pub fn add_slot(&mut self, id: PeerId, state: PersistedState) {
        self.slots.insert(
            id.clone(),
            Box::new(Slot {
                id,
                durable: Durable::from_state(state),
                live: None,
                status: SlotStatus::Crashed,
                incarnation: 0,
                paused_until: 0,
                file: None,
                unsynced_from: None,
                sync_done_at: 0,
            }),
        );
        let present = self.present_ids().len();
        self.stats.max_nodes = self.stats.max_nodes.max(present);
    }

    /// Starts (or restarts) a peer from its durable state.
    pub fn start_node(&mut self, id: &PeerId) -> Check {
        let now = self.now;
        let r = self.with_slot(id, |c, slot| -> Check {
            slot.incarnation += 1;
            let seed =
                mix64(c.seed ^ fnv64(slot.id.as_str().as_bytes()) ^ u64::from(slot.incarnation));
            let persisted = c.reopen_file_store(slot)?;
            let mut node =
                RaftNode::new(slot.id.clone(), c.config.clone(), seed, now, persisted)
                    .map_err(|e| violation("harness", format!("RaftNode::new failed: {e}")))?;
            if let Some(hook) = c.hook {
                hook(&mut node);
            }
            let kv = Kv::from_snapshot(&slot.durable.snapshot)
                .map_err(|e| violation("snapshot integrity", format!("{}: {e}", slot.id)))?;
            let compact_at = kv.applied + c.rng.between(c.compact_min, c.compact_max);
            let last_commit = node.commit_index();
            let last_applied = node.applied_index();
            let last_term = node.term();
            let last_config = node.latest_membership().clone();
            ensure(
                last_term >= slot.durable.hard_state.term,
                "term monotonicity",
                || {
                    format!(
                        "{} restarted in term {last_term} below its persisted term {}",
                        slot.id, slot.durable.hard_state.term
                    )
                },
            )?;
            slot.live = Some(Live {
                node,
                kv,
                deadline: now,
                last_commit,
                last_applied,
                last_term,
                leader_checked: None,
                pending_writes: BTreeMap::new(),
                reads: BTreeMap::new(),
                compact_at,
                last_soft: None,
                last_config,
            });
            slot.status = SlotStatus::Running;
            slot.paused_until = 0;
            let s = format!(
                "{}: start (incarnation {}) snapshot={} log={}..={} term={}",
                slot.id,
                slot.incarnation,
                slot.durable.snapshot_index(),
                slot.durable.log.first().map_or(0, |e| e.index),
                slot.durable.last_index(),
                slot.durable.hard_state.term
            );
            c.note(s);
            c.drain_node(slot)
        });
        r.unwrap_or(Ok(()))
    }

    /// Kills a peer: its live part is lost; its durable part stays (unless `stop`).
    pub fn crash(&mut self, id: &PeerId, stop: bool) {
        let Some(slot) = self.slots.get_mut(id) else {
            return;
        };
        let live = slot.live.take();
        // The process dies: its store is closed (and reopened from disk by a restart).
        slot.file = None;
        // A leader's writes no sync covered yet: a power cut loses them, a crash of the process alone
        // does not (seeded, mostly a power cut; file-store runs model the process crash only, their store keeps them).
        let lost_from = match slot.unsynced_from.take() {
            Some(from) if self.file_root.is_none() && self.fault_rng.chance(0.8) => {
                slot.durable.log.retain(|e| e.index < from);
                Some(from)
            }
            _ => None,
        };
        slot.status = if stop {
            SlotStatus::Stopped
        } else {
            SlotStatus::Crashed
        };
        let what = if stop { "stopped" } else { "crashed" };
        self.note(format!("{id}: {what}"));
        if let Some(from) = lost_from {
            self.note(format!(
                "{id}: power cut: its unsynced entries from {from} are lost"
            ));
            self.stats.unsynced_lost += 1;
        }
        if let Some(live) = live {
            for ops in live.pending_writes.values() {
                for (op, _) in ops {
                    if let Some(rec) = self.history.get_mut(op) {
                        rec.excused = true;
                    }
                    self.abandon_write(*op);
                }
            }
            for op in live.reads.keys() {
                if let Some(rec) = self.history.get_mut(op) {
                    rec.excused = true;
                }
                self.drop_read(*op);
            }
        }
    }

    /// A write's proposer lost track of it: its outcome is unknown (resolved at the end, if possible).
    pub fn abandon_write(&mut self, op: u64) {
        if let Some(rec) = self.history.get_mut(&op) {
            if rec.status == OpStatus::InFlight {
                rec.status = OpStatus::Unknown;
                rec.ret_ms = self.now;
                self.free_client(op);
            }
        }
    }

    pub fn drop_read(&mut self, op: u64) {
        if let Some(rec) = self.history.get_mut(&op) {
            if matches!(rec.status, OpStatus::InFlight | OpStatus::Attempting) {
                rec.status = OpStatus::Dropped;
                rec.ret_ms = self.now;
                self.free_client(op);
            }
        }
    }

    /// The client of `op` may issue its next operation.
    pub fn free_client(&mut self, op: u64) {
        let Some(rec) = self.history.get(&op) else {
            return;
        };
        let c = rec.client;
        if c < self.clients.len() && self.clients[c].current == Some(op) {
            self.clients[c].current = None;
            let think = self.rng.between(1, 25);
            self.schedule(self.now + think, DriverEv::ClientWake(c));
        }
    }

    /// Delivers a message (or drops it if the receiver is down or the link is cut).
    pub fn deliver(&mut self, msg: crate::raft::Message) -> Check {
        let now = self.now;
        if !self.is_running(&msg.to) {
            self.network.stats.dead += 1;
            if self.trace.messages {
                self.trace.push(
                    now,
                    Ev::DropAt {
                        msg: MsgSum::of(&msg),
                        why: "receiver down",
                    },
                );
            }
            return Ok(());
        }
        if self.network.is_blocked(&msg.from, &msg.to) {
            self.network.stats.blocked += 1;
            if self.trace.messages {
                self.trace.push(
                    now,
                    Ev::DropAt {
                        msg: MsgSum::of(&msg),
                        why: "partitioned",
                    },
                );
            }
            return Ok(());
        }
        let paused_until = self.slots.get(&msg.to).map_or(0, |s| s.paused_until);
        if paused_until > now {
            self.network.requeue(paused_until, msg);
            return Ok(());
        }
        self.network.stats.delivered += 1;
        self.stats.deliveries += 1;
        if self.trace.messages {
            self.trace.push(
                now,
                Ev::Deliver {
                    msg: MsgSum::of(&msg),
                },
            );
        }
        let to = msg.to.clone();
        self.with_slot(&to, |c, slot| {
            slot.live.as_mut().unwrap().node.step(now, msg);
            c.drain_node(slot)
        })
        .unwrap_or(Ok(()))
    }

    pub fn tick_node(&mut self, id: &PeerId) -> Check {
        let now = self.now;
        self.stats.ticks += 1;
        self.with_slot(id, |c, slot| {
            slot.live.as_mut().unwrap().node.tick(now);
            c.drain_node(slot)
        })
        .unwrap_or(Ok(()))
    }

    /// Runs an engine call on a running peer, then handles its output and checks it.
    pub fn call<R>(
        &mut self,
        id: &PeerId,
        f: impl FnOnce(&mut RaftNode, u64) -> R,
    ) -> Option<Check<R>> {
        let now = self.now;
        self.with_slot(id, |c, slot| {
            let live = slot.live.as_mut()?;
            let r = f(&mut live.node, now);
            Some(c.drain_node(slot).map(|()| r))
        })
        .flatten()
    }

    /// Handles every pending `Ready`, compacts when due, serves reads, and checks the peer.
    pub fn drain_node(&mut self, slot: &mut Slot) -> Check {
        let mut rounds = 0;
        loop {
            let Some(live) = slot.live.as_mut() else {
                return Ok(());
            };
            if live.node.has_ready() {
                rounds += 1;
                if rounds > 10_000 {
                    return Err(violation(
                        "engine progress",
                        format!("{} keeps producing Ready without input", slot.id),
                    ));
                }
                let rd = live.node.take_ready();
                self.handle_ready(slot, rd)?;
                continue;
            }
            if self.maybe_compact(slot)? {
                continue;
            }
            break;
        }
        self.serve_reads(slot)?;
        self.check_node(slot)?;
        let now = self.now;
        if let Some(live) = slot.live.as_mut() {
            let d = live.node.next_deadline_ms();
            live.deadline = d.clamp(now + 1, now + 1000);
        }
        Ok(())
    }

    fn handle_ready(&mut self, slot: &mut Slot, rd: Ready) -> Check {
        let id = slot.id.clone();
        let now = self.now;
        if let Some(ss) = &rd.soft_state {
            self.trace.push(
                now,
                Ev::Role {
                    id: id.clone(),
                    role: ss.role,
                    term: ss.term,
                    leader: ss.leader.clone(),
                },
            );
        }

        // A leader's pure append may be synced in the background (`persist_async`): written now,
        // reported durable by a later `Synced` event; everything else is synced before its messages.
        let in_background = self.config.persist_async
            && slot
                .live
                .as_ref()
                .is_some_and(|l| l.node.role() == Role::Leader)
            && rd.hard_state.is_none()
            && rd.snapshot.is_none()
            && !rd.entries.is_empty()
            && rd.entries_from == Some(slot.durable.last_index() + 1);

        // 1. Durable writes: snapshot, hard state, log.
        if let Some(snap) = &rd.snapshot {
            let (idx, term) = (snap.meta.last_index, snap.meta.last_term);
            ensure(
                idx > slot.durable.snapshot_index(),
                "snapshot install",
                || {
                    format!(
                        "{id} was given snapshot ({idx},{term}) not beyond its snapshot {}",
                        slot.durable.snapshot_index()
                    )
                },
            )?;
            self.registry
                .check_installed_snapshot(&id, idx, term, fnv64(&snap.data))?;
            if slot.durable.term_at(idx) == Some(term) {
                slot.durable.log.retain(|e| e.index > idx);
            } else {
                slot.durable.log.clear();
            }
            slot.durable.snapshot = snap.clone();
            self.stats.snapshots_installed += 1;
        }
        if let Some(hs) = &rd.hard_state {
            let old = &slot.durable.hard_state;
            ensure(hs.term >= old.term, "term monotonicity", || {
                format!("{id} persisted term {} after term {}", hs.term, old.term)
            })?;
            if hs.term == old.term {
                if let Some(v) = &old.voted_for {
                    ensure(hs.voted_for.as_ref() == Some(v), "vote safety", || {
                        format!(
                            "{id} changed its vote in term {} from {v} to {:?}",
                            hs.term, hs.voted_for
                        )
                    })?;
                }
            }
            if let Some(v) = &hs.voted_for {
                self.registry.record_vote(&id, hs.term, v)?;
            }
            slot.durable.hard_state = hs.clone();
        }
        if let Some(from) = rd.entries_from {
            let snap_idx = slot.durable.snapshot_index();
            ensure(from > snap_idx, "log write", || {
                format!("{id} asked to truncate at {from}, inside its snapshot ({snap_idx})")
            })?;
            ensure(from <= slot.durable.last_index() + 1, "log write", || {
                format!(
                    "{id} asked to write from {from}, leaving a gap after {}",
                    slot.durable.last_index()
                )
            })?;
            // Never lose an entry known committed.
            for e in slot.durable.log.iter().filter(|e| e.index >= from) {
                if let Some(c) = self.registry.committed.get(&e.index) {
                    if c.term == e.term {
                        let rewritten = rd
                            .entries
                            .get((e.index - from) as usize)
                            .is_some_and(|n| n.term == e.term);
                        ensure(rewritten, "leader completeness", || {
                            format!(
                                "{id} truncates committed entry ({}, {}) (committed, first seen by {})",
                                e.index, e.term, c.first_by
                            )
                        })?;
                    }
                }
            }
            slot.durable.log.retain(|e| e.index < from);
            for (expect, e) in (from..).zip(rd.entries.iter()) {
                ensure(e.index == expect, "log write", || {
                    format!("{id} got entry {} where {expect} was expected", e.index)
                })?;
                ensure(e.term <= slot.durable.hard_state.term, "log write", || {
                    format!(
                        "{id} persists entry ({}, {}) above its term {}",
                        e.index, e.term, slot.durable.hard_state.term
                    )
                })?;
                let prev_term = slot.durable.term_at(e.index - 1).ok_or_else(|| {
                    violation("log write", format!("{id} has no entry before {}", e.index))
                })?;
                ensure(e.term >= prev_term, "log matching", || {
                    format!(
                        "{id}: entry ({}, {}) follows an entry of higher term {prev_term}",
                        e.index, e.term
                    )
                })?;
                self.registry.record_log_entry(
                    &id,
                    e.index,
                    e.term,
                    payload_digest(&e.payload),
                    prev_term,
                )?;
                slot.durable.log.push(e.clone());
            }
        } else {
            ensure(rd.entries.is_empty(), "ready contract", || {
                format!("{id}: Ready has entries but no entries_from")
            })?;
        }
        if rd.snapshot.is_some() || rd.hard_state.is_some() || rd.entries_from.is_some() {
            self.trace.push(
                now,
                Ev::Persist {
                    id: id.clone(),
                    hard: rd
                        .hard_state
                        .as_ref()
                        .map(|h| (h.term, h.voted_for.clone())),
                    snapshot: rd
                        .snapshot
                        .as_ref()
                        .map(|s| (s.meta.last_index, s.meta.last_term)),
                    from: rd.entries_from,
                    n: rd.entries.len(),
                    last: slot.durable.last_index(),
                },
            );
        }

        mirror_to_file(slot, &rd)?;
        let mut report = None;
        if in_background {
            let (first, last) = (&rd.entries[0], &rd.entries[rd.entries.len() - 1]);
            slot.unsynced_from.get_or_insert(first.index);
            // Usually quick; sometimes a slow disk, which widens the window a crash can hit.
            let took = if self.rng.chance(0.1) {
                self.rng.between(50, 300)
            } else {
                self.rng.between(0, 20)
            };
            let at = (now + took).max(slot.sync_done_at);
            slot.sync_done_at = at;
            self.schedule(
                at,
                DriverEv::Synced {
                    id: id.clone(),
                    incarnation: slot.incarnation,
                    index: last.index,
                    term: last.term,
                },
            );
        } else if rd.snapshot.is_some() || rd.hard_state.is_some() || rd.entries_from.is_some() {
            // This sync covers every earlier background write too.
            slot.unsynced_from = None;
            let last = slot.durable.last_index();
            report = slot.durable.term_at(last).map(|t| (last, t));
        }

        // 2. Send.
        for m in rd.messages {
            ensure(m.from == id, "ready contract", || {
                format!("{id} sends a message from {}", m.from)
            })?;
            let sum = self.trace.messages.then(|| MsgSum::of(&m));
            let outcome = self.network.send(now, m);
            if let Some(msg) = sum {
                let outcome = match outcome {
                    SendOutcome::Queued {
                        duplicated: true, ..
                    } => "duplicated",
                    SendOutcome::Queued { .. } => "queued",
                    SendOutcome::Lost => "lost",
                    SendOutcome::Blocked => "partitioned",
                };
                self.trace.push(now, Ev::Send { msg, outcome });
            }
        }

        // 3. Restore the snapshot, apply committed entries.
        let live = slot.live.as_mut().unwrap();
        if let Some(snap) = &rd.snapshot {
            let idx = snap.meta.last_index;
            ensure(idx > live.kv.applied, "snapshot install", || {
                format!(
                    "{id} would restore snapshot at {idx} over applied state at {}",
                    live.kv.applied
                )
            })?;
            let kv = Kv::from_snapshot(snap)
                .map_err(|e| violation("snapshot integrity", format!("{id}: {e}")))?;
            if let Some(rec) = self.registry.applied.get(&idx) {
                ensure(
                    rec.chain == kv.chain && rec.term == kv.applied_term,
                    "state machine safety",
                    || {
                        format!(
                            "{id} restored a snapshot at {idx} whose state differs from what {} applied there",
                            rec.first_by
                        )
                    },
                )?;
            }
            live.kv = kv;
            // Writes proposed here and now covered by the snapshot: resolve through the registry.
            let covered: Vec<LogIndex> =
                live.pending_writes.range(..=idx).map(|(i, _)| *i).collect();
            for i in covered {
                let ops = live.pending_writes.remove(&i).unwrap_or_default();
                let Some(rec) = self.registry.applied.get(&i) else {
                    return Err(violation(
                        "snapshot integrity",
                        format!(
                            "{id} installed a snapshot covering index {i} that no peer applied"
                        ),
                    ));
                };
                let (term, result) = (rec.term, rec.result);
                let seq = self.next_seq();
                for (op, t) in ops {
                    self.resolve_write(op, t, i, term, result, seq)?;
                }
            }
        }
        if let (Some(first), Some(last)) = (rd.committed.first(), rd.committed.last()) {
            let (first, last) = (first.index, last.index);
            let commit = live.node.commit_index();
            for e in &rd.committed {
                ensure(e.index == live.kv.applied + 1, "apply order", || {
                    format!(
                        "{id} was handed entry {} to apply after applied {}",
                        e.index, live.kv.applied
                    )
                })?;
                ensure(e.index <= commit, "apply beyond commit", || {
                    format!("{id} applies {} beyond its commit index {commit}", e.index)
                })?;
                match slot.durable.entry(e.index) {
                    Some(d) => ensure(d == e, "apply/log mismatch", || {
                        format!(
                            "{id} applies ({}, {}) but its durable log has ({}, {}) there",
                            e.index, e.term, d.index, d.term
                        )
                    })?,
                    None => {
                        return Err(violation(
                            "apply/log mismatch",
                            format!(
                                "{id} applies entry {} that is not in its durable log",
                                e.index
                            ),
                        ))
                    }
                }
                let digest = payload_digest(&e.payload);
                let result = live
                    .kv
                    .apply(e)
                    .map_err(|s| violation("state machine", format!("{id}: {s}")))?;
                let seq = self.next_seq();
                self.registry
                    .record_apply(&id, e, digest, live.kv.chain, result, seq, now)?;
                if let Some(ops) = live.pending_writes.remove(&e.index) {
                    for (op, t) in ops {
                        self.resolve_write(op, t, e.index, e.term, result, seq)?;
                    }
                }
            }
            self.trace.push(
                now,
                Ev::Apply {
                    id: id.clone(),
                    first,
                    last,
                    commit,
                },
            );
        }

        if let (true, Some((index, term))) = (self.config.persist_async, report) {
            live.node.on_persisted(index, term);
        }

        // 4. Reads.
        for rs in rd.read_states {
            match live.reads.get_mut(&rs.ctx) {
                None => self.stats.stray_read_states += 1,
                Some(slot_index) => match rs.index {
                    Some(i) => {
                        if slot_index.is_none() {
                            *slot_index = Some(i);
                        } else {
                            self.stats.stray_read_states += 1;
                        }
                    }
                    None => {
                        live.reads.remove(&rs.ctx);
                        self.stats.read_retries += 1;
                        let at = now + self.rng.between(5, 30);
                        self.schedule(at, DriverEv::Retry(rs.ctx));
                    }
                },
            }
        }
        Ok(())
    }

    /// The entry at `index` (term `term`, result `result`) settled the write `op` proposed at
    /// (`index`, `proposed_term`).
    fn resolve_write(
        &mut self,
        op: u64,
        proposed_term: Term,
        index: LogIndex,
        term: Term,
        result: Option<ApplyResult>,
        seq: u64,
    ) -> Check {
        let now = self.now;
        let Some(rec) = self.history.get_mut(&op) else {
            return Ok(());
        };
        if !matches!(rec.status, OpStatus::InFlight | OpStatus::Unknown) {
            return Ok(());
        }
        if term == proposed_term {
            ensure(result.map(|r| r.op) == Some(op), "log matching", || {
                format!(
                    "op {op} was proposed at ({index}, {term}) but the entry applied there carries {result:?}"
                )
            })?;
            rec.status = OpStatus::Done;
            rec.ret = Some(seq);
            rec.ret_ms = now;
            if let OpWhat::Cas { ok, .. } = &mut rec.what {
                *ok = result.and_then(|r| r.cas_ok);
            }
            let (c, key) = (rec.client, rec.key);
            let seen = match &rec.what {
                OpWhat::Put { value } => Some(*value),
                OpWhat::Cas {
                    new,
                    ok: Some(true),
                    ..
                } => Some(*new),
                _ => None,
            };
            if let (Some(v), Some(cl)) = (seen, self.clients.get_mut(c)) {
                cl.seen.insert(key, Some(v));
            }
        } else {
            rec.status = OpStatus::Failed;
        }
        self.free_client(op);
        Ok(())
    }

    /// Compacts the log when due. Returns whether it did.
    fn maybe_compact(&mut self, slot: &mut Slot) -> Check<bool> {
        let Some(live) = slot.live.as_mut() else {
            return Ok(false);
        };
        let applied = live.kv.applied;
        if applied < live.compact_at || applied <= slot.durable.snapshot_index() {
            return Ok(false);
        }
        let id = slot.id.clone();
        let term = live.kv.applied_term;
        ensure(
            live.node.term_at(applied) == Some(term),
            "log matching",
            || {
                format!(
                    "{id} applied ({applied}, {term}) but its log says term {:?} there",
                    live.node.term_at(applied)
                )
            },
        )?;
        // Written into the engine's last snapshot buffer when nothing else holds it (no chunk in
        // flight), as the runtime does; the durable copy below is a copy, so the next one can be too.
        let buffer = live.node.take_snapshot_buffer();
        self.stats.snapshot_buffers_reused += u64::from(buffer.is_some());
        let data = live.kv.serialize_into(buffer.unwrap_or_default());
        let next = applied + self.rng.between(self.compact_min, self.compact_max);
        live.compact_at = next;
        match live.node.compact(applied, data.clone()) {
            Ok(()) => {
                self.registry
                    .record_snapshot(&id, applied, term, fnv64(&data))?;
                slot.durable.snapshot = Snapshot {
                    meta: SnapshotMeta {
                        last_index: applied,
                        last_term: term,
                        membership: live.kv.membership.clone(),
                    },
                    data: bytes::Bytes::copy_from_slice(&data),
                };
                slot.durable.log.retain(|e| e.index > applied);
                if let Some(store) = slot.file.as_mut() {
                    store
                        .save_snapshot(&slot.durable.snapshot)
                        .map_err(|e| violation("file store", format!("{id}: snapshot: {e}")))?;
                }
                self.stats.compactions += 1;
                self.note(format!("{id}: compacted to ({applied}, {term})"));
                Ok(true)
            }
            Err(e) => {
                self.note(format!("{id}: compact({applied}) refused: {e}"));
                Ok(false)
            }
        }
    }

    /// Answers reads whose index the local state machine has reached.
    fn serve_reads(&mut self, slot: &mut Slot) -> Check {
        let Some(live) = slot.live.as_mut() else {
            return Ok(());
        };
        let applied = live.kv.applied;
        let ready: Vec<u64> = live
            .reads
            .iter()
            .filter(|(_, i)| i.is_some_and(|i| i <= applied))
            .map(|(ctx, _)| *ctx)
            .collect();
        for ctx in ready {
            let index = live.reads.remove(&ctx).flatten().unwrap_or(0);
            let seq = self.next_seq();
            let now = self.now;
            let Some(rec) = self.history.get_mut(&ctx) else {
                continue;
            };
            if rec.status != OpStatus::InFlight {
                continue;
            }
            let observed = live.kv.get(rec.key);
            rec.what = OpWhat::Get {
                observed: Some(observed),
            };
            rec.status = OpStatus::Done;
            rec.ret = Some(seq);
            rec.ret_ms = now;
            let (c, key) = (rec.client, rec.key);
            if let Some(cl) = self.clients.get_mut(c) {
                cl.seen.insert(key, observed);
            }
            let s = format!(
                "{}: read op#{ctx} key {key} at index {index} (applied {applied}) -> {observed:?}",
                slot.id
            );
            self.note(s);
            self.free_client(ctx);
        }
        Ok(())
    }

    /// The per-step invariants of one peer.
    pub fn check_node(&mut self, slot: &mut Slot) -> Check {
        let id = slot.id.clone();
        let Some(live) = slot.live.as_mut() else {
            return Ok(());
        };
        let n = &live.node;
        let (term, role) = (n.term(), n.role());
        let (commit, applied, last, snap) = (
            n.commit_index(),
            n.applied_index(),
            n.last_index(),
            n.snapshot_index(),
        );
        ensure(term >= live.last_term, "term monotonicity", || {
            format!("{id}: term went from {} to {term}", live.last_term)
        })?;
        ensure(
            term == slot.durable.hard_state.term,
            "hard state persisted",
            || {
                format!(
                    "{id} is in term {term} but its persisted term is {}",
                    slot.durable.hard_state.term
                )
            },
        )?;
        ensure(commit >= live.last_commit, "commit monotonicity", || {
            format!(
                "{id}: commit index went from {} to {commit}",
                live.last_commit
            )
        })?;
        ensure(applied >= live.last_applied, "applied monotonicity", || {
            format!(
                "{id}: applied index went from {} to {applied}",
                live.last_applied
            )
        })?;
        ensure(
            snap <= applied && applied <= commit && commit <= last,
            "index order",
            || {
                format!("{id}: snapshot {snap} <= applied {applied} <= commit {commit} <= last {last} fails")
            },
        )?;
        ensure(applied == live.kv.applied, "applied index", || {
            format!(
                "{id}: engine applied index {applied}, state machine applied {}",
                live.kv.applied
            )
        })?;
        let d = &slot.durable;
        ensure(
            d.last_index() == last && d.term_at(last) == n.term_at(last),
            "durable log",
            || {
                format!(
                    "{id}: engine log ends at ({last}, {:?}), durable log at ({}, {:?})",
                    n.term_at(last),
                    d.last_index(),
                    d.term_at(d.last_index())
                )
            },
        )?;
        ensure(d.snapshot_index() == snap, "durable snapshot", || {
            format!(
                "{id}: engine snapshot index {snap}, durable snapshot index {}",
                d.snapshot_index()
            )
        })?;
        if let Some(soft) = live.last_soft {
            if soft != (role, term) && role == Role::Leader {
                let s = format!("{id}: leader of term {term} (last index {last}, commit {commit})");
                self.trace.text(self.now, s);
            }
        }
        live.last_soft = Some((role, term));

        // Election safety and leader completeness (for a peer that just became leader).
        if role == Role::Leader {
            self.registry.record_leader(term, &id)?;
            if live.leader_checked != Some(term) {
                live.leader_checked = Some(term);
                for (i, rec) in self.registry.committed.range(snap + 1..) {
                    if rec.at_term >= term {
                        continue;
                    }
                    let has = n.term_at(*i);
                    ensure(has == Some(rec.term), "leader completeness", || {
                        format!(
                            "{id} became leader of term {term} without committed entry ({i}, {}) (committed in term {} per {}); it has {has:?} there",
                            rec.term, rec.at_term, rec.first_by
                        )
                    })?;
                }
            }
        }

        // Commit durability: an entry a leader commits is in the synced log of a majority of the
        // configuration that decided it (checked while that configuration stays in force).
        if role == Role::Leader
            && commit > live.last_commit
            && *n.latest_membership() == live.last_config
        {
            let config = &live.last_config;
            for i in (live.last_commit + 1).max(snap + 1)..=commit {
                let t = n.term_at(i);
                // A snapshot covers only committed entries: one that reaches `i` holds it.
                let synced = |d: &Durable, unsynced_from: Option<LogIndex>| {
                    i <= d.snapshot_index()
                        || (d.term_at(i) == t && unsynced_from.is_none_or(|u| i < u))
                };
                let holders: Vec<&PeerId> = config
                    .voters
                    .iter()
                    .filter(|v| {
                        if **v == id {
                            synced(&slot.durable, slot.unsynced_from)
                        } else {
                            self.slots
                                .get(*v)
                                .is_some_and(|o| synced(&o.durable, o.unsynced_from))
                        }
                    })
                    .collect();
                ensure(
                    holders.len() > config.voters.len() / 2,
                    "commit durability",
                    || {
                        format!(
                            "{id} committed ({i}, {t:?}) held synced only by {holders:?} of voters {:?}",
                            config.voters
                        )
                    },
                )?;
            }
        }

        // Newly known commits: uniqueness, and every later-term leader must hold them.
        if commit > live.last_commit {
            for i in live.last_commit + 1..=commit {
                let t = if i <= snap {
                    match n.term_at(i) {
                        Some(t) => t,
                        None => continue,
                    }
                } else {
                    n.term_at(i).ok_or_else(|| {
                        violation(
                            "index order",
                            format!("{id} has commit index {commit} but no term at {i}"),
                        )
                    })?
                };
                if self.registry.record_commit(&id, i, t, term)? {
                    let at_term = self.registry.committed[&i].at_term;
                    for other in self.slots.values() {
                        let Some(ol) = other.live.as_ref() else {
                            continue;
                        };
                        let on = &ol.node;
                        if on.role() != Role::Leader
                            || on.term() <= at_term
                            || i <= on.snapshot_index()
                        {
                            continue;
                        }
                        let has = on.term_at(i);
                        ensure(has == Some(t), "leader completeness", || {
                            format!(
                                "{} is leader of term {} but lacks entry ({i}, {t}) that {id} knows committed (in term {at_term}); it has {has:?}",
                                other.id,
                                on.term()
                            )
                        })?;
                    }
                }
            }
        }
        live.last_term = term;
        live.last_commit = commit;
        live.last_applied = applied;
        if *n.latest_membership() != live.last_config {
            live.last_config = n.latest_membership().clone();
        }
        Ok(())
    }

    /// Runs the per-peer checks on every running peer.
    pub fn check_all(&mut self) -> Check {
        let ids: Vec<PeerId> = self.running_ids();
        for id in ids {
            self.with_slot(&id, |c, slot| c.check_node(slot))
                .unwrap_or(Ok(()))?;
        }
        Ok(())
    }

    /// Peers in the latest committed configuration.
    pub fn members(&self) -> BTreeSet<PeerId> {
        self.registry
            .current_membership(&self.genesis)
            .members()
            .cloned()
            .collect()
    }
}
