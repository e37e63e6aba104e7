//! One seed's run: whole peers (the real `Hamok` actors, the real `HamokMap` and `HamokQueue`) on an
//! in-process hub, on a paused clock, with clients, faults, and the checks.
//!
//! The run has three phases. **Chaos**: the initial peers start (together, or staggered), clients
//! write, compare-and-set, read linearizably, push to a queue, and push to and take from the queue
//! [`JOBS`] under leases (see [`jobs`]) through the public API, and faults
//! are injected: partitions (one peer, a pair, a random split; shorter or longer than
//! `peer_max_idle_ms`), loss, duplication and delay, crashes and restarts (the log store survives, as
//! a durable peer's would), graceful leaves and rejoins, and new peers joining. **Heal**: every fault
//! is lifted and every peer restarted or rejoined; every peer that is up must be a joined member of
//! one cluster with all the others within `Plan::rejoin_bound_ms`, and then write. **Drain**: clients
//! stop, the final state is read (that of [`JOBS`] once its leases had time to run out), and the
//! history is checked.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use hamok_collections::{
    register_kinds, DeliveryId, HamokCollections, HamokLock, HamokMap, HamokQueue, LockOptions,
};
use hamok_runtime::raft::{Entry, HardState, LogIndex, PeerId, PersistedState, Snapshot};
use hamok_runtime::store::{LogStore, MemoryLogStore, StorageError, SyncDone};
use hamok_runtime::testing::PlantedBugs;
use hamok_runtime::transport::memory::InProcessHub;
use hamok_runtime::{Hamok, HamokError, HamokEvent};
use tokio::task::JoinHandle;
use tokio::time::{sleep, sleep_until, Instant};

use super::jobs::{
    self, Answer, Consumer, FinalJobs, JobPush, JobsLog, Replica, Settle, SettleKind, Taken, JOBS,
};
use super::linearizability::{Op, OpKind};
use super::netlog::{NetLog, NetState};
use super::plan::{mix64, Plan, Rng};
use super::tap::Tap;
use super::trace::Trace;
use super::{Counts, SimOptions, Violation};

/// Keys of the map the clients use.
pub const KEYS: u8 = 4;
/// The cluster id of every run.
const CLUSTER: &str = "sim";
/// The id of the client that performs the liveness writes after the heal.
const LIVENESS_CLIENT: usize = 1_000;

/// A log store that survives its peer: a crashed peer restarts from it, as a durable peer would.
///
/// In seeds with background syncs it behaves as a durable store under the `batch` policy: a leader's
/// own log writes are synced in the background (each sync takes a seeded time, and they complete in
/// order), every other write is synced inline, and [`SharedStore::power_cut`] loses what no sync
/// covered yet, commit marks included.
///
/// In every seed the power can also fail in the middle of a log write
/// ([`SharedStore::power_cut_at_next_write`]): after a leader's replication left and before its own
/// copy was written (`send_replication_early`), an instant no crash between two actor messages reaches.
#[derive(Clone, Default)]
pub struct SharedStore(Arc<Mutex<StoreState>>);

#[derive(Default)]
struct StoreState {
    store: MemoryLogStore,
    /// The seeded time each background sync takes; `None`: this store syncs inline only.
    background: Option<Rng>,
    /// The first index written that no sync covered yet.
    unsynced_from: Option<LogIndex>,
    /// A write that needs an `fdatasync` (anything but a commit mark) waits for one, as in the file
    /// store: an inline `sync` with nothing such only writes, it covers no background write.
    needs_sync: bool,
    /// The last index written.
    last_written: LogIndex,
    /// The commit mark as recorded, and as a sync last covered it.
    committed: LogIndex,
    committed_synced: LogIndex,
    /// When the last background sync started completes (they complete in order).
    last_done: Option<Instant>,
    /// Bumped by a power cut: the syncs then in flight never make anything durable.
    generation: u64,
    /// Armed: the power fails during the next write of entries, and with it that of these stores.
    cut_at_next_write: Option<Vec<SharedStore>>,
    /// The armed cut happened (reported once by [`SharedStore::disarm`]).
    cut_during_write: bool,
    /// The power is off: every write and sync fails, so the peer stops at its next one, until it
    /// restarts ([`SharedStore::revive`]).
    dead: bool,
}

impl StoreState {
    /// Every write so far is durable.
    fn synced(&mut self) {
        self.needs_sync = false;
        self.unsynced_from = None;
        self.committed_synced = self.committed;
    }
}

impl SharedStore {
    /// A store; with `background`, one that syncs a leader's writes in the background, each sync
    /// taking a time drawn from it.
    pub fn new(background: Option<Rng>) -> Self {
        SharedStore(Arc::new(Mutex::new(StoreState {
            background,
            ..StoreState::default()
        })))
    }

    fn inner(&self) -> MutexGuard<'_, StoreState> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The power fails: writes no sync covered are lost, and syncs in flight never complete.
    /// Returns the first index lost, if any.
    pub fn power_cut(&self) -> Option<LogIndex> {
        self.inner().power_cut()
    }

    /// The power will fail in the middle of this store's next write of entries: that write and every
    /// write no sync covered are lost, the write fails (its peer stops), and so do all later writes
    /// and syncs until [`SharedStore::revive`]. The stores `with` lose power at the same instant (a
    /// follower still to write what the leader sent: it stops at its next write).
    pub fn power_cut_at_next_write(&self, with: Vec<SharedStore>) {
        let mut s = self.inner();
        s.cut_at_next_write = Some(with);
        s.cut_during_write = false;
    }

    /// Disarms [`SharedStore::power_cut_at_next_write`]; whether the cut happened.
    pub fn disarm(&self) -> bool {
        let mut s = self.inner();
        s.cut_at_next_write = None;
        std::mem::take(&mut s.cut_during_write)
    }

    /// Power is back (the peer restarts on this store).
    pub fn revive(&self) {
        let mut s = self.inner();
        s.dead = false;
        s.cut_at_next_write = None;
    }

    /// Fails while the power is off.
    fn alive(&self) -> Result<MutexGuard<'_, StoreState>, HamokError> {
        let s = self.inner();
        if s.dead {
            return Err(power_off());
        }
        Ok(s)
    }
}

impl StoreState {
    fn power_cut(&mut self) -> Option<LogIndex> {
        self.generation += 1;
        self.committed = self.committed_synced;
        let lost = self.unsynced_from.take();
        if let Some(from) = lost {
            let _ = self.store.write_entries(from, &[]);
            self.last_written = from - 1;
        }
        lost
    }
}

/// What a store whose power failed answers.
fn power_off() -> HamokError {
    HamokError::Storage(StorageError::Io {
        context: "the power failed (simulated)".into(),
        source: None,
    })
}

impl LogStore for SharedStore {
    fn load(&mut self) -> Result<PersistedState, HamokError> {
        let mut s = self.inner();
        let committed = s.committed;
        let mut state = s.store.load()?;
        state.committed = committed;
        Ok(state)
    }
    fn save_hard_state(&mut self, state: &HardState) -> Result<(), HamokError> {
        let mut s = self.alive()?;
        s.needs_sync = true;
        s.store.save_hard_state(state)
    }
    fn save_snapshot(&mut self, snapshot: &Snapshot) -> Result<(), HamokError> {
        // Durable when it returns, with every write before it (as the file store's). A copy, not a
        // second hold on the peer's buffer: as with the file and volatile stores, the peer then writes
        // its next snapshot into that buffer (`RaftNode::take_snapshot_buffer`), and the simulation
        // runs that path.
        let copy = Snapshot {
            meta: snapshot.meta.clone(),
            data: bytes::Bytes::copy_from_slice(&snapshot.data),
        };
        let mut s = self.alive()?;
        s.store.save_snapshot(&copy)?;
        // The entries after it are kept when the log agreed with it, dropped otherwise.
        s.last_written = snapshot.meta.last_index + s.store.size().0;
        s.synced();
        Ok(())
    }
    fn write_entries(&mut self, from: LogIndex, entries: &[Entry]) -> Result<(), HamokError> {
        let mut s = self.alive()?;
        if let Some(with) = (!entries.is_empty())
            .then(|| s.cut_at_next_write.take())
            .flatten()
        {
            s.power_cut();
            s.dead = true;
            s.cut_during_write = true;
            drop(s);
            for other in with {
                let mut o = other.inner();
                o.power_cut();
                o.dead = true;
            }
            return Err(power_off());
        }
        s.store.write_entries(from, entries)?;
        s.last_written = from - 1 + entries.len() as u64;
        s.needs_sync = true;
        if s.background.is_some() {
            s.unsynced_from = Some(s.unsynced_from.map_or(from, |u| u.min(from)));
        }
        Ok(())
    }
    fn save_committed(&mut self, index: LogIndex, _term: u64) -> Result<(), HamokError> {
        let mut s = self.alive()?;
        s.committed = s.committed.max(index);
        Ok(())
    }
    fn incarnation(&self) -> u64 {
        self.inner().store.incarnation()
    }
    fn save_incarnation(&mut self, incarnation: u64) -> Result<(), HamokError> {
        self.alive()?.store.save_incarnation(incarnation)
    }
    fn sync(&mut self) -> Result<(), HamokError> {
        let mut s = self.alive()?;
        if s.needs_sync || s.background.is_none() {
            s.synced();
        }
        Ok(())
    }
    fn syncs_in_background(&self) -> bool {
        self.inner().background.is_some()
    }
    fn sync_in_background(&mut self, done: SyncDone) -> Result<bool, HamokError> {
        let (at, generation, upto, committed) = {
            let mut s = self.alive()?;
            if !s.needs_sync || s.unsynced_from.is_none() {
                return Ok(false);
            }
            s.needs_sync = false;
            let Some(rng) = s.background.as_mut() else {
                return Ok(false);
            };
            // Often slow against the clients' pace (a write every few ms): the window a power cut
            // can hit must be wide for the seeds to find what it loses.
            let took_ms = if rng.chance(0.3) {
                rng.between(20, 150)
            } else {
                rng.between(1, 10)
            };
            let at = (Instant::now() + Duration::from_millis(took_ms))
                .max(s.last_done.unwrap_or_else(Instant::now));
            s.last_done = Some(at);
            (at, s.generation, s.last_written, s.committed)
        };
        let store = self.clone();
        tokio::spawn(async move {
            sleep_until(at).await;
            {
                let mut s = store.inner();
                if s.generation == generation {
                    if s.unsynced_from.is_some_and(|u| u <= upto) {
                        s.unsynced_from = (s.last_written > upto).then_some(upto + 1);
                    }
                    s.committed_synced = s.committed_synced.max(committed);
                }
            }
            done(Ok(()));
        });
        Ok(true)
    }
    fn size(&self) -> (u64, u64) {
        self.inner().store.size()
    }

    fn may_block(&self) -> bool {
        false
    }
}

/// Where a peer stands in the run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Status {
    Up,
    Crashed,
    Leaving,
}

struct Slot {
    id: String,
    only_follower: bool,
    store: SharedStore,
    incarnation: u64,
    status: Status,
    leave_task: Option<JoinHandle<()>>,
}

/// One operation of a client, as recorded.
#[derive(Clone, Debug)]
pub struct OpRecord {
    pub op: Op,
    pub peer: String,
    pub call_ms: u64,
    pub ret_ms: u64,
    pub outcome: String,
}

/// One push to the queue.
#[derive(Clone, Debug)]
struct Push {
    value: u64,
    acked: bool,
}

/// What every task of the run shares. Never held across an await.
pub struct Shared {
    t0: Instant,
    /// The linearizability checker's clock: strictly increasing, one tick per call or return.
    clock: u64,
    pub trace: Trace,
    pub ops: Vec<OpRecord>,
    pushes: Vec<Push>,
    /// What the producers and consumers of [`JOBS`] saw.
    pub jobs: JobsLog,
    /// Peer handles by id, with their incarnation; `None` while down.
    handles: BTreeMap<String, Option<(u64, Hamok)>>,
    /// The leader each term had, as any peer reported it.
    leaders: BTreeMap<u64, String>,
    pub net: NetLog,
    pub counts: Counts,
    pub violations: Vec<Violation>,
    stop_clients: bool,
    next_op: u64,
    peer_max_idle_ms: u64,
    /// The latest an answer may come after its call: the request timeout plus timer granularity.
    answer_bound_ms: u64,
    last_note_ms: u64,
    /// The watchdog found a message storm: every frame is dropped from then on.
    runaway: bool,
}

impl Shared {
    pub fn now_ms(&self) -> u64 {
        u64::try_from(self.t0.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    pub fn note(&mut self, line: impl AsRef<str>) {
        let now = self.now_ms();
        self.last_note_ms = now;
        self.trace.note(now, line);
    }

    /// The instant the run started (simulated time 0).
    pub fn t0(&self) -> Instant {
        self.t0
    }

    /// The simulated time of the last trace line (read by the watchdog from another thread).
    pub fn last_note_ms(&self) -> u64 {
        self.last_note_ms
    }

    /// Records a broken check.
    pub fn violation_at(&mut self, at_ms: u64, check: &'static str, detail: String) {
        self.runaway |= check == "runaway";
        self.trace
            .note(at_ms, format!("VIOLATION {check}: {detail}"));
        self.violations.push(Violation {
            check,
            detail,
            at_ms,
        });
    }

    fn violation(&mut self, check: &'static str, detail: String) {
        let at_ms = self.now_ms();
        self.note(format!("VIOLATION {check}: {detail}"));
        self.violations.push(Violation {
            check,
            detail,
            at_ms,
        });
    }

    fn leader_reported(&mut self, by: &str, term: u64, leader: &str) {
        match self.leaders.get(&term) {
            Some(known) if known != leader => {
                let known = known.clone();
                self.violation(
                    "election safety",
                    format!("term {term} has two leaders: {known} and {leader} (reported by {by})"),
                );
            }
            Some(_) => {}
            None => {
                self.leaders.insert(term, leader.to_string());
                self.counts.terms_with_leader += 1;
            }
        }
    }
}

type SharedRef = Arc<Mutex<Shared>>;

fn lock(shared: &SharedRef) -> MutexGuard<'_, Shared> {
    shared.lock().unwrap_or_else(|e| e.into_inner())
}

/// A fault or step scheduled at a time.
#[derive(Clone, Debug)]
enum Action {
    Fault,
    HealPartition(u64),
    CalmNetwork(u64),
    Restart(String),
    /// The power cut armed by a fault (`SharedStore::power_cut_at_next_write`) took these peers down.
    PowerCut(Vec<String>),
    Rejoin(String),
    EndChaos,
}

/// The network faults in force (re-applied whole to the hub on every change).
#[derive(Clone, Debug, Default)]
struct Net {
    groups: Option<Vec<Vec<String>>>,
    loss: f64,
    duplicate: f64,
    delay_ms: Option<(u64, u64)>,
    partition_gen: u64,
    noise_gen: u64,
}

pub struct World {
    seed: u64,
    plan: Plan,
    bugs: PlantedBugs,
    consumer: Consumer,
    paused_holders: bool,
    /// Crashes and power cuts make four times their usual share of the faults.
    crash_heavy: bool,
    /// Every crash fault is a power cut in the middle of the leader's next log write, with a follower.
    leader_write_cuts: bool,
    hub: InProcessHub,
    tap: Tap,
    slots: BTreeMap<String, Slot>,
    shared: SharedRef,
    net: Net,
    rng: Rng,
    queue: BTreeMap<(u64, u64), Action>,
    qseq: u64,
    clients: Vec<JoinHandle<()>>,
    next_peer: usize,
    /// This seed's durable peers sync a leader's own log writes in the background (half the seeds;
    /// drawn apart from the plan, so the other half runs as before), and a crash is mostly a power cut.
    background_syncs: bool,
}

impl World {
    /// The world of one seed: its options, the plan drawn from its seed, and where its trace goes.
    pub fn new(opts: &SimOptions, plan: Plan, trace: Trace) -> World {
        let seed = opts.seed;
        let shared = Shared {
            t0: Instant::now(),
            clock: 0,
            trace,
            ops: Vec::new(),
            pushes: Vec::new(),
            jobs: JobsLog::default(),
            handles: BTreeMap::new(),
            leaders: BTreeMap::new(),
            net: NetLog::default(),
            counts: Counts::default(),
            violations: Vec::new(),
            stop_clients: false,
            next_op: 1,
            peer_max_idle_ms: plan.peer_max_idle_ms,
            answer_bound_ms: plan.request_timeout_ms + 2 * plan.tick_interval_ms + 1,
            last_note_ms: 0,
            runaway: false,
        };
        let hub = InProcessHub::with_seed(mix64(seed ^ 0x0068_7562));
        World {
            seed,
            bugs: opts.bugs,
            consumer: opts.consumer,
            paused_holders: opts.paused_holders,
            crash_heavy: opts.crash_heavy,
            leader_write_cuts: opts.leader_write_cuts,
            tap: Tap::new(hub.clone()),
            hub,
            slots: BTreeMap::new(),
            shared: Arc::new(Mutex::new(shared)),
            net: Net::default(),
            rng: Rng::stream(seed, "faults"),
            queue: BTreeMap::new(),
            qseq: 0,
            clients: Vec::new(),
            next_peer: plan.initial_peers + 1,
            background_syncs: mix64(seed ^ 0x0073_796e_6373) & 1 == 1,
            plan,
        }
    }

    pub fn shared(&self) -> SharedRef {
        self.shared.clone()
    }

    /// The frame tap.
    pub fn tap(&self) -> Tap {
        self.tap.clone()
    }

    /// The hub (the watchdog cuts every link through it to end a message storm).
    pub fn hub(&self) -> InProcessHub {
        self.hub.clone()
    }

    fn now_ms(&self) -> u64 {
        lock(&self.shared).now_ms()
    }

    fn note(&self, line: impl AsRef<str>) {
        lock(&self.shared).note(line);
    }

    fn schedule(&mut self, at_ms: u64, action: Action) {
        self.qseq += 1;
        self.queue.insert((at_ms, self.qseq), action);
    }

    // ------------------------------------------------------------------------------------------
    // Peers

    async fn build(&self, id: &str, only_follower: bool, store: SharedStore, inc: u64) -> Hamok {
        let p = &self.plan;
        let seed = mix64(self.seed ^ super::plan::fnv64(id.as_bytes()) ^ inc.rotate_left(32));
        let hamok = register_kinds(Hamok::builder())
            .peer_id(id)
            .cluster_id(CLUSTER)
            .transport(self.tap.clone())
            .seed(seed)
            .planted_bugs(self.bugs)
            .election_timeout_ms(p.election_timeout_ms)
            .heartbeat_interval_ms(p.heartbeat_interval_ms)
            .peer_max_idle_ms(p.peer_max_idle_ms)
            .request_timeout_ms(p.request_timeout_ms)
            .only_follower(only_follower)
            .snapshot_after_entries(p.snapshot_after_entries)
            .set("hello_interval_ms", p.hello_interval_ms)
            .set("discovery_window_ms", p.discovery_window_ms)
            .set("tick_interval_ms", p.tick_interval_ms)
            .log_store(store)
            .build()
            .await
            .unwrap_or_else(|e| panic!("building peer {id}: {e}"));
        tokio::spawn(collect_events(
            self.shared.clone(),
            hamok.clone(),
            id.to_string(),
        ));
        hamok
    }

    /// Starts (or restarts) peer `id` and lets it join.
    async fn start_peer(&mut self, id: &str, join_after_ms: u64) {
        let (only_follower, store, inc) = {
            let slot = self.slots.get_mut(id).expect("a known peer");
            slot.incarnation += 1;
            slot.status = Status::Up;
            (slot.only_follower, slot.store.clone(), slot.incarnation)
        };
        store.revive();
        let hamok = self.build(id, only_follower, store, inc).await;
        {
            let mut s = lock(&self.shared);
            let now = s.now_ms();
            s.net.up(now, id);
            s.handles.insert(id.to_string(), Some((inc, hamok.clone())));
            s.note(format!(
                "{id}: started (incarnation {inc}{})",
                if only_follower { ", only_follower" } else { "" }
            ));
        }
        spawn_join(self.shared.clone(), hamok, id.to_string(), join_after_ms);
    }

    fn add_slot(&mut self, id: String, only_follower: bool) {
        let syncs = self
            .background_syncs
            .then(|| Rng::stream(self.seed ^ super::plan::fnv64(id.as_bytes()), "syncs"));
        self.slots.insert(
            id.clone(),
            Slot {
                id,
                only_follower,
                store: SharedStore::new(syncs),
                incarnation: 0,
                status: Status::Crashed,
                leave_task: None,
            },
        );
    }

    fn handle(&self, id: &str) -> Option<Hamok> {
        lock(&self.shared)
            .handles
            .get(id)
            .cloned()
            .flatten()
            .map(|(_, h)| h)
    }

    fn up_ids(&self) -> Vec<String> {
        self.slots
            .values()
            .filter(|s| s.status == Status::Up)
            .map(|s| s.id.clone())
            .collect()
    }

    async fn crash(&mut self, id: &str) {
        let Some(hamok) = self.handle(id) else {
            return;
        };
        {
            let mut s = lock(&self.shared);
            let now = s.now_ms();
            s.net.down(now, id);
            s.handles.insert(id.to_string(), None);
            s.counts.crashes += 1;
            s.note(format!("{id}: CRASH"));
        }
        self.slots.get_mut(id).expect("known").status = Status::Crashed;
        hamok.close().await;
        // Mostly a power cut, where a leader may lose log writes no background sync covered yet.
        if self.background_syncs && self.rng.chance(0.7) {
            let store = self.slots[id].store.clone();
            let lost = store.power_cut();
            let mut s = lock(&self.shared);
            s.note(format!(
                "{id}: power cut, unsynced writes lost from {lost:?}"
            ));
            if lost.is_some() {
                s.counts.unsynced_lost += 1;
            }
        }
    }

    /// Ends a power cut armed by a fault: whether or not a log write came (and failed), its peers are
    /// down from now on, and restart later. Now and then every other peer goes down too, a moment
    /// later (the whole cluster restarts, in a random order, with what each had written).
    async fn power_cut(&mut self, mut ids: Vec<String>) {
        let during_write = self.slots[&ids[0]].store.disarm();
        if self.rng.chance(0.3) {
            let others: Vec<String> = self
                .up_ids()
                .into_iter()
                .filter(|id| !ids.contains(id))
                .collect();
            ids.extend(others);
        }
        {
            let mut s = lock(&self.shared);
            s.note(format!(
                "{ids:?}: power cut {}",
                if during_write {
                    "came during a log write"
                } else {
                    "before any log write"
                }
            ));
            s.counts.cut_during_write += usize::from(during_write);
        }
        self.crash_and_restart_later(ids).await;
    }

    /// Crashes `ids`, each to restart 200 ms to 3 s from now.
    async fn crash_and_restart_later(&mut self, ids: Vec<String>) {
        let now = self.now_ms();
        for id in ids {
            self.crash(&id).await;
            let after = self.rng.between(200, 3_000);
            self.schedule(now + after, Action::Restart(id));
        }
    }

    fn leave(&mut self, id: &str) {
        let Some(hamok) = self.handle(id) else {
            return;
        };
        {
            let mut s = lock(&self.shared);
            let now = s.now_ms();
            // Not answering from now on, as far as the removal check is concerned.
            s.net.down(now, id);
            s.jobs.removals.push((id.to_string(), now));
            s.counts.leaves += 1;
            s.note(format!("{id}: leave()"));
        }
        let shared = self.shared.clone();
        let name = id.to_string();
        let slot = self.slots.get_mut(id).expect("known");
        slot.status = Status::Leaving;
        slot.leave_task = Some(tokio::spawn(async move {
            let r = hamok.leave().await;
            lock(&shared).note(format!("{name}: leave() -> {r:?}"));
        }));
    }

    /// A peer that left joins again (once its leave finished).
    async fn rejoin(&mut self, id: &str) {
        let task = self.slots.get_mut(id).and_then(|s| s.leave_task.take());
        if let Some(task) = task {
            let _ = task.await;
        }
        let Some(hamok) = self.handle(id) else {
            return;
        };
        self.slots.get_mut(id).expect("known").status = Status::Up;
        {
            let mut s = lock(&self.shared);
            let now = s.now_ms();
            s.net.up(now, id);
            s.note(format!("{id}: join() again after leaving"));
        }
        spawn_join(self.shared.clone(), hamok, id.to_string(), 0);
    }

    // ------------------------------------------------------------------------------------------
    // Network

    fn apply_net(&mut self) {
        self.hub.clear_faults();
        if let Some(groups) = &self.net.groups {
            let groups: Vec<Vec<PeerId>> = groups
                .iter()
                .map(|g| g.iter().map(|p| PeerId::from(p.as_str())).collect())
                .collect();
            let refs: Vec<&[PeerId]> = groups.iter().map(Vec::as_slice).collect();
            self.hub.partition(&refs);
        }
        self.hub.set_drop_rate(self.net.loss);
        self.hub.set_duplicate_rate(self.net.duplicate);
        if let Some((min, max)) = self.net.delay_ms {
            self.hub.set_delay_ms(min, max);
        }
        if lock(&self.shared).runaway {
            self.hub.set_drop_rate(1.0);
        }
        let state = NetState {
            groups: self.net.groups.as_ref().map(|gs| {
                gs.iter()
                    .map(|g| g.iter().cloned().collect::<BTreeSet<String>>())
                    .collect()
            }),
            loss: self.net.loss,
        };
        let mut s = lock(&self.shared);
        let now = s.now_ms();
        s.net.net(now, state);
    }

    // ------------------------------------------------------------------------------------------
    // The run

    /// Runs the whole scenario; violations are recorded in the shared state.
    pub async fn run(mut self) -> (Vec<OpRecord>, Counts, u64) {
        let p = self.plan.clone();
        self.note(format!(
            "seed {}: {} peers{}, {} clients, election {} ms, heartbeat {} ms, peer_max_idle {} ms, \
             request timeout {} ms, snapshot every {} entries, chaos {} ms, {} start",
            self.seed,
            p.initial_peers,
            p.only_follower
                .map(|i| format!(" (p{} only_follower)", i + 1))
                .unwrap_or_default(),
            p.clients,
            p.election_timeout_ms,
            p.heartbeat_interval_ms,
            p.peer_max_idle_ms,
            p.request_timeout_ms,
            p.snapshot_after_entries,
            p.chaos_ms,
            if p.simultaneous_start {
                "simultaneous"
            } else {
                "staggered"
            }
        ));
        for i in 0..p.initial_peers {
            self.add_slot(format!("p{}", i + 1), p.only_follower == Some(i));
        }
        let ids: Vec<String> = self.slots.keys().cloned().collect();
        for id in &ids {
            let delay = if p.simultaneous_start {
                0
            } else {
                self.rng.between(0, p.discovery_window_ms)
            };
            self.start_peer(id, delay).await;
        }
        for c in 0..p.clients {
            let peer = ids[c % ids.len()].clone();
            let task = tokio::spawn(client(
                self.shared.clone(),
                c,
                peer,
                Rng::stream(self.seed, &format!("client {c}")),
                self.consumer,
                self.paused_holders,
            ));
            self.clients.push(task);
        }
        let first = self.rng.between(p.fault_gap_ms.0, p.fault_gap_ms.1) + 300;
        self.schedule(first, Action::Fault);
        self.schedule(p.chaos_ms, Action::EndChaos);

        // Chaos.
        while let Some((&(at, seq), _)) = self.queue.iter().next() {
            let action = self.queue.remove(&(at, seq)).expect("listed");
            let t0 = lock(&self.shared).t0;
            sleep_until(t0 + Duration::from_millis(at)).await;
            if matches!(action, Action::EndChaos) {
                break;
            }
            self.act(action).await;
        }

        // Heal.
        self.heal().await;
        let healed_at = self.now_ms();
        let converged = self.converge(healed_at).await;
        if converged {
            self.liveness().await;
        }
        // Drain.
        lock(&self.shared).stop_clients = true;
        for task in std::mem::take(&mut self.clients) {
            let _ = task.await;
        }
        let final_jobs = if converged {
            self.final_state().await;
            self.check_fences().await;
            Some(self.final_jobs().await)
        } else {
            None
        };
        self.check_jobs(final_jobs.as_ref());
        let ids: Vec<String> = self.slots.keys().cloned().collect();
        for id in ids {
            let handle = self.handle(&id);
            if let Some(h) = handle {
                h.close().await;
            }
        }
        let mut s = lock(&self.shared);
        let ops = std::mem::take(&mut s.ops);
        let counts = s.counts.clone();
        let now = s.now_ms();
        (ops, counts, now)
    }

    async fn act(&mut self, action: Action) {
        let p = self.plan.clone();
        match action {
            Action::Fault => {
                self.fault().await;
                let gap = self.rng.between(p.fault_gap_ms.0, p.fault_gap_ms.1);
                let at = self.now_ms() + gap;
                self.schedule(at, Action::Fault);
            }
            Action::HealPartition(gen) => {
                if gen == self.net.partition_gen && self.net.groups.is_some() {
                    self.net.groups = None;
                    self.apply_net();
                    self.note("network: partition healed");
                }
            }
            Action::CalmNetwork(gen) => {
                if gen == self.net.noise_gen {
                    self.net.loss = 0.0;
                    self.net.duplicate = 0.0;
                    self.net.delay_ms = None;
                    self.apply_net();
                    self.note("network: calm");
                }
            }
            Action::Restart(id) => {
                let pristine = self.slots.get(&id).is_some_and(|s| {
                    s.store
                        .clone()
                        .load()
                        .is_ok_and(|p| p.entries.is_empty() && p.snapshot.meta.last_index == 0)
                });
                if pristine && !self.can_hear_the_cluster() {
                    // Restarting with nothing on disk is a new peer: see `fault`.
                    let at = self.now_ms() + 300;
                    self.schedule(at, Action::Restart(id));
                    return;
                }
                if self
                    .slots
                    .get(&id)
                    .is_some_and(|s| s.status == Status::Crashed)
                {
                    lock(&self.shared).counts.restarts += 1;
                    self.start_peer(&id, 0).await;
                }
            }
            Action::PowerCut(ids) => self.power_cut(ids).await,
            Action::Rejoin(id) => {
                if self
                    .slots
                    .get(&id)
                    .is_some_and(|s| s.status == Status::Leaving)
                {
                    self.rejoin(&id).await;
                }
            }
            Action::EndChaos => {}
        }
    }

    /// Draws and applies one fault.
    async fn fault(&mut self) {
        let p = self.plan.clone();
        let up = self.up_ids();
        let all: Vec<String> = self.slots.keys().cloned().collect();
        let now = self.now_ms();
        let crashes = if self.crash_heavy { 56 } else { 14 };
        match self.rng.weighted(&[30, 15, crashes, 8, 8, 25]) {
            0 if all.len() >= 2 => {
                // A partition: one peer, a pair, or a random split; shorter or longer than the time
                // after which the leader removes a silent member.
                let mut shuffled = all.clone();
                for i in (1..shuffled.len()).rev() {
                    let j = self.rng.index(i + 1);
                    shuffled.swap(i, j);
                }
                let cut = match self.rng.weighted(&[35, 35, 30]) {
                    0 => 1,
                    1 if shuffled.len() >= 4 => 2,
                    _ => 1 + self.rng.index(shuffled.len() - 1),
                };
                let (a, b) = shuffled.split_at(cut);
                let long = self.rng.chance(0.5);
                let lasts = if long {
                    self.rng
                        .between(p.peer_max_idle_ms + 200, 2 * p.peer_max_idle_ms + 500)
                } else {
                    self.rng.between(100, p.peer_max_idle_ms / 2)
                };
                self.net.partition_gen += 1;
                self.net.groups = Some(vec![a.to_vec(), b.to_vec()]);
                self.apply_net();
                let mut s = lock(&self.shared);
                s.counts.partitions += 1;
                if long {
                    s.counts.long_partitions += 1;
                    if cut >= 2 {
                        s.counts.long_group_cuts += 1;
                    }
                }
                s.note(format!(
                    "network: partition {a:?} | {b:?} for {lasts} ms ({})",
                    if long {
                        "longer than peer_max_idle"
                    } else {
                        "short"
                    }
                ));
                drop(s);
                let gen = self.net.partition_gen;
                self.schedule(now + lasts, Action::HealPartition(gen));
            }
            1 => {
                self.net.noise_gen += 1;
                self.net.loss = 0.3 * self.rng.unit();
                self.net.duplicate = 0.2 * self.rng.unit();
                let max = self.rng.between(1, 20);
                self.net.delay_ms = self.rng.chance(0.6).then_some((1, max));
                self.apply_net();
                let lasts = self.rng.between(300, 2_000);
                self.note(format!(
                    "network: loss {:.2}, duplication {:.2}, delay {:?} ms for {lasts} ms",
                    self.net.loss, self.net.duplicate, self.net.delay_ms
                ));
                let gen = self.net.noise_gen;
                self.schedule(now + lasts, Action::CalmNetwork(gen));
            }
            2 if !up.is_empty() => {
                // Now and then the power fails in the middle of the first peer's next log write,
                // which for a leader may come after its replication left (see `SharedStore`).
                // (With `leader_write_cuts`, always: see `SimOptions::leader_write_cuts`.)
                let targeted = self.leader_write_cuts;
                let during_write = targeted || self.rng.chance(0.3);
                let losing = self.background_syncs || during_write;
                // Where writes can be lost, often the leader: only a leader's copy can be counted
                // (and promised) before it is durable.
                let leader = up
                    .iter()
                    .find(|id| self.handle(id).is_some_and(|h| h.is_leader()))
                    .cloned();
                let mut down = match leader {
                    Some(leader) if losing && (targeted || self.rng.chance(0.5)) => vec![leader],
                    _ => vec![up[self.rng.index(up.len())].clone()],
                };
                // Now and then a power cut takes a follower down with the leader: the leader's
                // unsynced entries are then held by fewer peers than the cluster may have counted.
                if losing && up.len() >= 3 && (targeted || self.rng.chance(0.3)) {
                    let other = up
                        .iter()
                        .filter(|id| **id != down[0])
                        .nth(self.rng.index(up.len() - 1))
                        .cloned();
                    down.extend(other);
                }
                if during_write {
                    let with = down[1..]
                        .iter()
                        .map(|id| self.slots[id].store.clone())
                        .collect();
                    self.slots[&down[0]].store.power_cut_at_next_write(with);
                    self.note(format!(
                        "{down:?}: power cut armed at {}'s next log write",
                        down[0]
                    ));
                    let at = now + self.rng.between(1, 40);
                    self.schedule(at, Action::PowerCut(down));
                } else {
                    self.crash_and_restart_later(down).await;
                }
            }
            3 if up.len() >= 2 => {
                let id = up[self.rng.index(up.len())].clone();
                self.leave(&id);
                let after = self.rng.between(300, 3_000);
                self.schedule(now + after, Action::Rejoin(id));
            }
            // A new peer, only where it can hear the cluster: a pristine peer that hears no member for
            // a discovery window founds a cluster of its own (the bootstrap rule), and two clusters
            // under one id are what "one cluster forms from peers that hear each other" rules out.
            4 if up.len() < p.max_peers && self.can_hear_the_cluster() => {
                let id = format!("p{}", self.next_peer);
                self.next_peer += 1;
                self.add_slot(id.clone(), false);
                lock(&self.shared).counts.added += 1;
                self.start_peer(&id, 0).await;
            }
            _ => {}
        }
    }

    /// Whether a new peer would hear a member: no partition, little loss, and a joined member up.
    fn can_hear_the_cluster(&self) -> bool {
        self.net.groups.is_none()
            && self.net.loss < 0.2
            && self
                .up_ids()
                .iter()
                .any(|id| self.handle(id).is_some_and(|h| h.is_joined()))
    }

    async fn heal(&mut self) {
        self.net = Net {
            partition_gen: self.net.partition_gen + 1,
            noise_gen: self.net.noise_gen + 1,
            ..Net::default()
        };
        self.apply_net();
        self.note("=== heal: every fault lifted, crashed peers restart, departed peers rejoin ===");
        // A power cut still armed ends now: its peers are down and restart below.
        let cuts: Vec<Vec<String>> = std::mem::take(&mut self.queue)
            .into_values()
            .filter_map(|a| match a {
                Action::PowerCut(ids) => Some(ids),
                _ => None,
            })
            .collect();
        for ids in cuts {
            self.power_cut(ids).await;
        }
        let ids: Vec<String> = self.slots.keys().cloned().collect();
        for id in ids {
            match self.slots[&id].status {
                Status::Crashed => {
                    lock(&self.shared).counts.restarts += 1;
                    self.start_peer(&id, 0).await;
                }
                Status::Leaving => self.rejoin(&id).await,
                Status::Up => {}
            }
        }
    }

    /// Waits until every peer is a joined member of one cluster with all the others; a violation if
    /// that takes longer than the bound.
    async fn converge(&mut self, healed_at: u64) -> bool {
        let bound = self.plan.rejoin_bound_ms;
        loop {
            let peers: Vec<(String, Hamok)> = self
                .slots
                .keys()
                .filter_map(|id| self.handle(id).map(|h| (id.clone(), h)))
                .collect();
            let problems = convergence_problems(&peers);
            let now = self.now_ms();
            if problems.is_empty() && !peers.is_empty() {
                let mut s = lock(&self.shared);
                s.counts.converge_ms = now - healed_at;
                s.note(format!(
                    "converged {} ms after the heal: {} peers, leader {:?}",
                    now - healed_at,
                    peers.len(),
                    peers[0].1.leader_id()
                ));
                return true;
            }
            if now > healed_at + bound {
                lock(&self.shared).violation(
                    "rejoin bound",
                    format!(
                        "{bound} ms after the heal the peers are not one cluster: {}",
                        problems.join("; ")
                    ),
                );
                return false;
            }
            sleep(Duration::from_millis(10)).await;
        }
    }

    /// Every peer writes once after convergence; each write must succeed.
    async fn liveness(&mut self) {
        let ids: Vec<String> = self.slots.keys().cloned().collect();
        for id in ids {
            let Some(hamok) = self.handle(&id) else {
                continue;
            };
            let mut done = false;
            let mut failed = Vec::new();
            for attempt in 0..3 {
                if attempt > 0 {
                    self.wait_joined(&id, &hamok).await;
                }
                let map = match hamok.get_or_create_map::<u8, u64>("kv").await {
                    Ok(m) => m,
                    Err(e) => {
                        failed.push(format!("opening the map: {e}"));
                        continue;
                    }
                };
                let key = (lock(&self.shared).next_op % u64::from(KEYS)) as u8;
                let outcome = put(&self.shared, LIVENESS_CLIENT, &id, &map, key).await;
                match outcome {
                    Ok(_) => {
                        done = true;
                        break;
                    }
                    Err(e) => failed.push(e.to_string()),
                }
            }
            if !done {
                lock(&self.shared).violation(
                    "liveness",
                    format!(
                        "after convergence, three writes through {id} failed: {}",
                        failed.join("; ")
                    ),
                );
            }
        }
    }

    /// Before another liveness attempt through `id`: waits (up to the answer bound) until it is a
    /// joined member again. A removal decided before the heal (a member flagged silent while cut
    /// off) may commit only after the peer came back and joined, its commit held up by lost frames:
    /// the peer is then removed and joins again at once, and a write in between fails.
    async fn wait_joined(&self, id: &str, hamok: &Hamok) {
        let until = self.now_ms() + lock(&self.shared).answer_bound_ms;
        if !hamok.is_joined() {
            self.note(format!(
                "liveness: {id} is not joined ({:?}), waiting",
                hamok.state()
            ));
        }
        while !hamok.is_joined() && self.now_ms() < until {
            sleep(Duration::from_millis(10)).await;
        }
    }

    /// Reads the final state everywhere: every replica must hold the same map and queue, every
    /// acknowledged push must be in the queue exactly once, and the final values join the history.
    async fn final_state(&mut self) {
        let ids: Vec<String> = self.slots.keys().cloned().collect();
        let mut states: Vec<ReplicaState> = Vec::new();
        for id in &ids {
            let Some(hamok) = self.handle(id) else {
                continue;
            };
            let (map, queue) = match (
                hamok.get_or_create_map::<u8, u64>("kv").await,
                hamok.get_or_create_queue::<u64>("q").await,
            ) {
                (Ok(m), Ok(q)) => (m, q),
                (m, q) => {
                    lock(&self.shared).violation(
                        "liveness",
                        format!("final read on {id}: {:?} {:?}", m.err(), q.err()),
                    );
                    continue;
                }
            };
            for key in 0..KEYS {
                let _ = get(&self.shared, LIVENESS_CLIENT + 1, id, &map, key).await;
            }
            if let Err(e) = hamok
                .wait_until_linearizable(Duration::from_millis(self.plan.request_timeout_ms))
                .await
            {
                lock(&self.shared).violation("liveness", format!("final barrier on {id}: {e}"));
                continue;
            }
            let entries: Vec<(u8, u64)> = match map.entries() {
                Ok(e) => e,
                Err(e) => {
                    lock(&self.shared).violation("codec", format!("map on {id}: {e}"));
                    continue;
                }
            };
            states.push((id.clone(), entries, queue.iter().collect()));
        }
        let mut s = lock(&self.shared);
        if let Some((first, map0, queue0)) = states.first().cloned() {
            for (id, map, queue) in &states[1..] {
                if *map != map0 || *queue != queue0 {
                    s.violation(
                        "replicas agree",
                        format!("{id} holds map {map:?} queue {queue:?}, {first} holds map {map0:?} queue {queue0:?}"),
                    );
                }
            }
            let mut seen: BTreeMap<u64, usize> = BTreeMap::new();
            for v in &queue0 {
                *seen.entry(*v).or_default() += 1;
            }
            let pushed: BTreeMap<u64, bool> = s.pushes.iter().map(|p| (p.value, p.acked)).collect();
            for (v, n) in &seen {
                if *n > 1 {
                    s.violation("applied once", format!("queue item {v} is there {n} times"));
                }
                if !pushed.contains_key(v) {
                    s.violation("applied once", format!("queue item {v} was never pushed"));
                }
            }
            let lost: Vec<u64> = pushed
                .iter()
                .filter(|(v, acked)| **acked && !seen.contains_key(v))
                .map(|(v, _)| *v)
                .collect();
            if !lost.is_empty() {
                s.violation(
                    "no acknowledged write lost",
                    format!("acknowledged pushes missing from the queue: {lost:?}"),
                );
            }
            s.counts.queue_items = queue0.len();
            s.counts.pushes_acked = pushed.values().filter(|a| **a).count();
        }
    }
}

impl World {
    /// No fenced write under an older token landed after one under a newer token: the fenced queue,
    /// in log order, never goes down.
    async fn check_fences(&mut self) {
        let Some(hamok) = self.slots.keys().find_map(|id| self.handle(id)) else {
            return;
        };
        let Ok(fenced) = hamok.get_or_create_queue::<u64>("fenced").await else {
            return;
        };
        let items: Vec<u64> = fenced.iter().collect();
        let mut s = lock(&self.shared);
        if let Some(w) = items.windows(2).find(|w| w[1] < w[0]) {
            s.violation(
                "fences",
                format!(
                    "a write under token {} landed after one under token {}: {items:?}",
                    w[1], w[0]
                ),
            );
        }
    }
}

impl World {
    /// Reads [`JOBS`] on every peer once its leases had time to run out. The queue is opened on every
    /// peer first (so every peer's lease timer runs); it is read as soon as no replica holds a lease
    /// (then there is nothing to wait for), else when the longest lease, its expiry margin, the
    /// follower grace and a margin have passed since: then a lease still held is a violation.
    async fn final_jobs(&mut self) -> FinalJobs {
        let ids: Vec<String> = self.slots.keys().cloned().collect();
        let mut queues: Vec<(String, Hamok, HamokQueue<u64>)> = Vec::new();
        for id in &ids {
            let Some(hamok) = self.handle(id) else {
                continue;
            };
            match hamok.get_or_create_queue::<u64>(JOBS).await {
                Ok(q) => queues.push((id.clone(), hamok, q)),
                Err(e) => {
                    lock(&self.shared).violation("liveness", format!("opening {JOBS} on {id}: {e}"))
                }
            }
        }
        let started = self.now_ms();
        let lease = Duration::from_millis(jobs::MAX_LEASE_MS);
        let wait = lease
            + (lease / 10).max(Duration::from_millis(20))
            + hamok_collections::queue::FOLLOWER_GRACE
            + Duration::from_millis(300);
        let until = started + u64::try_from(wait.as_millis()).unwrap_or(u64::MAX);
        let timeout = Duration::from_millis(self.plan.request_timeout_ms);
        let leases_left = loop {
            let now = self.now_ms();
            if now < until && queues.iter().any(|(_, _, q)| q.in_flight() > 0) {
                sleep(Duration::from_millis(20)).await;
                continue;
            }
            for (id, hamok, _) in &queues {
                if let Err(e) = hamok.wait_until_linearizable(timeout).await {
                    lock(&self.shared)
                        .violation("liveness", format!("final barrier on {id} ({JOBS}): {e}"));
                }
            }
            let held = queues.iter().any(|(_, _, q)| q.in_flight() > 0);
            if !held || self.now_ms() >= until {
                break held;
            }
        };
        let mut fin = FinalJobs {
            replicas: Vec::new(),
            leases_left,
            waited_ms: self.now_ms() - started,
        };
        for (id, _, q) in &queues {
            match (q.to_vec(), q.dead_letters()) {
                (Ok(visible), Ok(dead)) => fin.replicas.push((
                    id.clone(),
                    Replica {
                        visible,
                        in_flight: q.in_flight(),
                        dead: dead.into_iter().map(|d| d.value).collect(),
                    },
                )),
                (v, d) => lock(&self.shared).violation(
                    "codec",
                    format!("{JOBS} on {id}: {:?} {:?}", v.err(), d.err()),
                ),
            }
        }
        lock(&self.shared).note(format!(
            "{JOBS}: final state after {} ms: {:?}",
            fin.waited_ms,
            fin.replicas.first()
        ));
        fin
    }

    /// Runs the checks of [`JOBS`] (the final ones only when `fin` was read) and counts.
    fn check_jobs(&mut self, fin: Option<&FinalJobs>) {
        let mut s = lock(&self.shared);
        let slack = s.answer_bound_ms;
        let found = jobs::check(&s.jobs, fin, slack);
        s.counts.jobs = jobs::JobCounts::of(&s.jobs, fin);
        for f in found {
            s.violation(f.check, f.detail);
        }
    }
}

/// One replica's final state: its id, its map entries and its queue.
type ReplicaState = (String, Vec<(u8, u64)>, Vec<u64>);

/// Why the peers are not (yet) one cluster with everyone joined; empty when they are.
fn convergence_problems(peers: &[(String, Hamok)]) -> Vec<String> {
    let mut problems = Vec::new();
    let ids: BTreeSet<String> = peers.iter().map(|(id, _)| id.clone()).collect();
    let leaders: BTreeSet<Option<PeerId>> = peers.iter().map(|(_, h)| h.leader_id()).collect();
    if leaders.len() != 1 || leaders.iter().next().is_some_and(Option::is_none) {
        problems.push(format!("leaders seen: {leaders:?}"));
    }
    for (id, h) in peers {
        if !h.is_joined() {
            problems.push(format!("{id} not joined ({:?})", h.state()));
        }
        let remote: BTreeSet<String> = h
            .remote_peer_ids()
            .into_iter()
            .map(|p| p.to_string())
            .collect();
        let mut expected = ids.clone();
        expected.remove(id);
        if remote != expected {
            problems.push(format!("{id} sees members {remote:?}"));
        }
    }
    problems
}

fn spawn_join(shared: SharedRef, hamok: Hamok, id: String, after_ms: u64) {
    tokio::spawn(async move {
        if after_ms > 0 {
            sleep(Duration::from_millis(after_ms)).await;
        }
        let r = hamok.join().await;
        lock(&shared).note(format!("{id}: join() -> {r:?}"));
    });
}

/// Follows one incarnation's events: leaders per term, silence flags (checked against the
/// connectivity timeline), joins and rejoins.
async fn collect_events(shared: SharedRef, hamok: Hamok, id: String) {
    use tokio::sync::broadcast::error::RecvError;
    let mut rx = hamok.events();
    drop(hamok);
    loop {
        let event = match rx.recv().await {
            Ok(HamokEvent::Close) | Err(RecvError::Closed) => break,
            Ok(e) => e,
            Err(RecvError::Lagged(n)) => {
                lock(&shared).note(format!("{id}: event collector lagged by {n}"));
                continue;
            }
        };
        let mut s = lock(&shared);
        match &event {
            HamokEvent::LeaderChanged {
                new: Some(leader),
                term,
                ..
            } => {
                s.leader_reported(&id, *term, leader.as_str());
                s.note(format!("{id}: leader {leader} (term {term})"));
            }
            HamokEvent::NoHeartbeatFrom(peer) => {
                s.counts.silence_removals += 1;
                let now = s.now_ms();
                s.jobs.removals.push((peer.to_string(), now));
                let from = now.saturating_sub(s.peer_max_idle_ms);
                s.note(format!("{id}: removes silent {peer}"));
                if s.net.connected_throughout(&id, peer.as_str(), from, now) {
                    s.violation(
                        "answering member kept",
                        format!(
                            "leader {id} removes {peer} as silent, yet both were up and connected \
                             for the whole {from}..{now} ms"
                        ),
                    );
                }
            }
            HamokEvent::Joined => {
                s.counts.joins += 1;
                s.note(format!("{id}: Joined"));
            }
            HamokEvent::Rejoining => {
                s.counts.rejoins += 1;
                let now = s.now_ms();
                s.jobs.removals.push((id.clone(), now));
                s.note(format!("{id}: Rejoining"));
            }
            HamokEvent::RemotePeerLeft(p) => {
                let now = s.now_ms();
                s.jobs.removals.push((p.to_string(), now));
                s.note(format!("{id}: member {p} left"));
            }
            HamokEvent::RemotePeerJoined(p) => s.note(format!("{id}: member {p} joined")),
            HamokEvent::Left => {
                let now = s.now_ms();
                s.jobs.removals.push((id.clone(), now));
                s.note(format!("{id}: Left"));
            }
            HamokEvent::Error(e) => s.note(format!("{id}: error event: {e}")),
            _ => {}
        }
    }
}

// ----------------------------------------------------------------------------------------------
// Clients

/// One client: bound to one peer id (whichever incarnation is up), it writes, compare-and-sets,
/// reads linearizably, pushes, takes the fenced lock, and produces and consumes [`JOBS`], through the
/// public API, until told to stop.
async fn client(
    shared: SharedRef,
    c: usize,
    peer: String,
    mut rng: Rng,
    consumer: Consumer,
    paused_holders: bool,
) {
    let mut open: Option<Opened> = None;
    let mut seen: BTreeMap<u8, u64> = BTreeMap::new();
    // Deliveries being worked on in the background (see `consume`); awaited before the client ends.
    let mut workers: Vec<JoinHandle<()>> = Vec::new();
    loop {
        sleep(Duration::from_millis(rng.between(2, 30))).await;
        workers.retain(|w| !w.is_finished());
        let (stop, current) = {
            let s = lock(&shared);
            (s.stop_clients, s.handles.get(&peer).cloned().flatten())
        };
        if stop {
            for w in workers {
                let _ = w.await;
            }
            return;
        }
        let Some((inc, hamok)) = current else {
            sleep(Duration::from_millis(50)).await;
            continue;
        };
        if open.as_ref().is_none_or(|o| o.inc != inc) {
            match Opened::open(inc, &hamok).await {
                Ok(o) => open = Some(o),
                Err(_) => {
                    sleep(Duration::from_millis(50)).await;
                    continue;
                }
            }
        }
        let Opened {
            map,
            queue,
            locks,
            fenced,
            jobs,
            ..
        } = open.as_ref().expect("opened above");
        let key = rng.index(usize::from(KEYS)) as u8;
        match rng.weighted(&[40, 20, 30, 10, 8, 5, 7]) {
            0 => {
                if let Ok(v) = put(&shared, c, &peer, map, key).await {
                    seen.insert(key, v);
                }
            }
            1 => {
                if let Ok(Some(v)) = cas(&shared, c, &peer, map, key, seen.get(&key).copied()).await
                {
                    seen.insert(key, v);
                }
            }
            2 => {
                if let Ok(Some(v)) = get(&shared, c, &peer, map, key).await {
                    seen.insert(key, v);
                }
            }
            3 => push(&shared, c, &peer, queue).await,
            4 => {
                let holder = Holder {
                    locks,
                    fenced,
                    paused: paused_holders,
                };
                locked(&shared, c, &peer, holder, &mut rng).await
            }
            5 => push_jobs(&shared, c, &peer, jobs, &mut rng).await,
            _ => match consumer {
                Consumer::Take => consume(&shared, c, &peer, jobs, &mut rng, &mut workers).await,
                Consumer::PopAndAbandon => pop_and_abandon(&shared, c, &peer, jobs).await,
            },
        }
    }
}

/// What a client opens on its peer (again after each restart of the peer).
struct Opened {
    inc: u64,
    map: HamokMap<u8, u64>,
    queue: HamokQueue<u64>,
    locks: HamokLock,
    /// Written only under the lock `FENCED_LOCK`, each item the writer's fencing token.
    fenced: HamokQueue<u64>,
    /// Pushed to, and taken from under leases.
    jobs: HamokQueue<u64>,
}

impl Opened {
    async fn open(inc: u64, hamok: &Hamok) -> Result<Opened, HamokError> {
        Ok(Opened {
            inc,
            map: hamok.get_or_create_map("kv").await?,
            queue: hamok.get_or_create_queue("q").await?,
            locks: hamok.get_or_create_lock_table("locks").await?,
            fenced: hamok.get_or_create_queue("fenced").await?,
            jobs: hamok.get_or_create_queue(JOBS).await?,
        })
    }
}

/// The lock the fenced writers take.
const FENCED_LOCK: &str = "L";

/// What a lock holder of [`locked`] works with.
struct Holder<'a> {
    locks: &'a HamokLock,
    fenced: &'a HamokQueue<u64>,
    /// After its unlock, it pauses and pushes once more under the released fence.
    paused: bool,
}

/// A sloppy lock holder: takes the lock, pushes its token under the fence, then pushes again at the
/// same time as it unlocks (so the second push may be ordered after the release, or retried after the
/// lock moved on), ignoring `lost()`. Fencing must keep every item of the queue in token order anyway.
///
/// A `paused` holder then pauses and pushes once more under the released fence (a holder paused past
/// its release, the case fencing is for). Fencing must refuse that push once the unlock was
/// acknowledged: it was submitted after the unlock's answer, so it is ordered after the release. (The
/// second push alone rarely lands after the next holder's since a peer forwards the requests of a
/// burst in one frame: the push and the unlock travel, and are lost or retried, together.)
async fn locked(shared: &SharedRef, c: usize, peer: &str, holder: Holder<'_>, rng: &mut Rng) {
    let wait = Duration::from_millis(lock(shared).answer_bound_ms);
    let guard = match holder
        .locks
        .lock_with(FENCED_LOCK, LockOptions::wait_timeout(wait))
        .await
    {
        Ok(g) => g,
        Err(e) => {
            lock(shared).note(format!("client {c} on {peer}: lock -> {e}"));
            return;
        }
    };
    let token = guard.token();
    let writer = holder.fenced.fenced(guard.fence());
    let first = writer.push_one(token).await;
    sleep(Duration::from_millis(rng.between(0, 40))).await;
    let (second, unlocked) = tokio::join!(writer.push_one(token), guard.unlock());
    let late = if holder.paused {
        sleep(Duration::from_millis(rng.between(0, 40))).await;
        Some(writer.push_one(token).await)
    } else {
        None
    };
    let mut s = lock(shared);
    s.note(format!(
        "client {c} on {peer}: locked token {token}: push {first:?}, push {second:?}, unlock {unlocked:?}, late push {late:?}"
    ));
    if unlocked.is_ok() && late.as_ref().is_some_and(Result::is_ok) {
        s.violation(
            "fences",
            format!("client {c} on {peer}: a push under token {token} was accepted after its unlock was acknowledged"),
        );
    }
    s.counts.fenced_writes += usize::from(first.is_ok())
        + usize::from(second.is_ok())
        + usize::from(late.is_some_and(|r| r.is_ok()));
}

/// Starts recording an operation: its id and call stamp.
fn call(shared: &SharedRef) -> (u64, u64, u64) {
    let mut s = lock(shared);
    let id = s.next_op;
    s.next_op += 1;
    let stamp = s.tick();
    (id, stamp, s.now_ms())
}

/// Finishes recording: checks the answer came within its bound, and records the op for the checker.
#[allow(clippy::too_many_arguments)]
fn record(
    shared: &SharedRef,
    c: usize,
    peer: &str,
    id: u64,
    key: u8,
    kind: Option<OpKind>,
    call_stamp: u64,
    call_ms: u64,
    completed: bool,
    outcome: String,
) -> (u64, u64) {
    let mut s = lock(shared);
    let ret = s.tick();
    let ret_ms = s.now_ms();
    s.counts.requests += 1;
    if ret_ms - call_ms > s.answer_bound_ms {
        let bound = s.answer_bound_ms;
        s.violation(
            "answered in time",
            format!(
                "client {c} op#{id} on {peer} took {} ms (bound {bound} ms): {outcome}",
                ret_ms - call_ms
            ),
        );
    }
    s.note(format!("client {c} on {peer}: op#{id} key {key} {outcome}"));
    if let Some(kind) = kind {
        s.ops.push(OpRecord {
            op: Op {
                id,
                client: c,
                key,
                call: call_stamp,
                ret: completed.then_some(ret),
                kind,
            },
            peer: peer.to_string(),
            call_ms,
            ret_ms,
            outcome,
        });
    }
    (ret, ret_ms)
}

/// [`record`] for an operation outside the key-value history (queue pushes, takes, acks): timed,
/// noted and bounded like the others, but no key and no [`OpKind`] for the linearizability check.
#[allow(clippy::too_many_arguments)]
fn record_other(
    shared: &SharedRef,
    c: usize,
    peer: &str,
    id: u64,
    call_stamp: u64,
    call_ms: u64,
    completed: bool,
    outcome: String,
) -> (u64, u64) {
    record(
        shared, c, peer, id, 0, None, call_stamp, call_ms, completed, outcome,
    )
}

async fn put(
    shared: &SharedRef,
    c: usize,
    peer: &str,
    map: &HamokMap<u8, u64>,
    key: u8,
) -> Result<u64, HamokError> {
    let (id, stamp, call_ms) = call(shared);
    let r = map.set(key, id).await;
    let outcome = format!("set({key}, {id}) -> {r:?}");
    // A failed write that may still take effect stays pending (no return) for the checker; one that
    // was refused is left out.
    record(
        shared,
        c,
        peer,
        id,
        key,
        written(&r).then_some(OpKind::Put { value: id }),
        stamp,
        call_ms,
        r.is_ok(),
        outcome,
    );
    lock(shared).counts.writes += 1;
    r.map(|_| id)
}

/// A compare-and-set: `update_if` against the last value seen, or `insert` when none was seen.
/// Returns the value now held if it succeeded.
async fn cas(
    shared: &SharedRef,
    c: usize,
    peer: &str,
    map: &HamokMap<u8, u64>,
    key: u8,
    expected: Option<u64>,
) -> Result<Option<u64>, HamokError> {
    let (id, stamp, call_ms) = call(shared);
    let r = match expected {
        Some(old) => map.update_if(key, id, old).await,
        None => map.insert(key, id).await.map(|existing| existing.is_none()),
    };
    let outcome = format!("cas({key}: {expected:?} -> {id}) -> {r:?}");
    record(
        shared,
        c,
        peer,
        id,
        key,
        written(&r).then_some(OpKind::Cas {
            expected,
            new: id,
            ok: r.as_ref().ok().copied(),
        }),
        stamp,
        call_ms,
        r.is_ok(),
        outcome,
    );
    lock(shared).counts.writes += 1;
    r.map(|ok| ok.then_some(id))
}

/// Whether a write's outcome leaves it in the history: done, or failed in a way that may have taken
/// effect.
fn written<T>(r: &Result<T, HamokError>) -> bool {
    r.as_ref()
        .err()
        .is_none_or(HamokError::may_have_taken_effect)
}

/// A linearizable read through the map's public read path.
async fn get(
    shared: &SharedRef,
    c: usize,
    peer: &str,
    map: &HamokMap<u8, u64>,
    key: u8,
) -> Result<Option<u64>, HamokError> {
    let (id, stamp, call_ms) = call(shared);
    let r = map.get_linearizable(&key).await;
    let outcome = format!("get_linearizable({key}) -> {r:?}");
    // A failed read carries no information: it is left out of the history.
    let kind = r.as_ref().ok().map(|v| OpKind::Get { observed: *v });
    if kind.is_some() {
        lock(shared).counts.reads_checked += 1;
    }
    record(
        shared, c, peer, id, key, kind, stamp, call_ms, true, outcome,
    );
    r
}

async fn push(shared: &SharedRef, c: usize, peer: &str, queue: &HamokQueue<u64>) {
    let (id, stamp, call_ms) = call(shared);
    let r = queue.push_one(id).await;
    let outcome = format!("push({id}) -> {r:?}");
    record_other(shared, c, peer, id, stamp, call_ms, r.is_ok(), outcome);
    lock(shared).pushes.push(Push {
        value: id,
        acked: r.is_ok(),
    });
}

/// A fresh value for an item of [`JOBS`] (from the operation ids: unique in the run).
fn fresh(shared: &SharedRef) -> u64 {
    let mut s = lock(shared);
    let v = s.next_op;
    s.next_op += 1;
    v
}

/// Pushes one or two fresh items to [`JOBS`] (one log entry).
async fn push_jobs(
    shared: &SharedRef,
    c: usize,
    peer: &str,
    jobs: &HamokQueue<u64>,
    rng: &mut Rng,
) {
    let (id, stamp, call_ms) = call(shared);
    let mut values = vec![id];
    if rng.chance(0.25) {
        values.push(fresh(shared));
    }
    let r = jobs.push(values.iter().copied()).await;
    let outcome = format!("{JOBS} push({values:?}) -> {r:?}");
    record_other(shared, c, peer, id, stamp, call_ms, r.is_ok(), outcome);
    let answer = match &r {
        Ok(_) => Answer::Yes,
        Err(e) => Answer::of_error(e),
    };
    lock(shared).jobs.pushes.push(JobPush { values, answer });
}

/// A consumer's turn: takes one to three items under a short lease, then per item, by a seeded choice,
/// acks it (most), nacks it, abandons it (the lease must bring it back), or hands it to a background
/// worker (in `workers`, so the client goes on meanwhile) that acks it only after its lease ran out,
/// or extends the lease halfway and acks it after the first deadline. A batch is sometimes acked with
/// one `ack_many`. An ack that fails in a way that may have taken effect is retried once.
async fn consume(
    shared: &SharedRef,
    c: usize,
    peer: &str,
    jobs: &HamokQueue<u64>,
    rng: &mut Rng,
    workers: &mut Vec<JoinHandle<()>>,
) {
    let n = [1u32, 1, 1, 2, 3][rng.index(5)];
    let lease_ms = rng.between(jobs::MIN_LEASE_MS, jobs::MAX_LEASE_MS);
    let lease = Duration::from_millis(lease_ms);
    let (op, stamp, call_ms) = call(shared);
    let r = jobs.take_many(n, lease).await;
    let outcome = match &r {
        Ok(ds) => format!(
            "{JOBS} take_many({n}, {lease_ms} ms) -> {:?}",
            ds.iter()
                .map(|d| (d.id.0, d.value, d.deliveries))
                .collect::<Vec<_>>()
        ),
        Err(e) => format!("{JOBS} take_many({n}, {lease_ms} ms) -> Err({e:?})"),
    };
    let (ret, ret_ms) = record_other(shared, c, peer, op, stamp, call_ms, r.is_ok(), outcome);
    let got = match r {
        Ok(got) => got,
        Err(e) => {
            if e.may_have_taken_effect() {
                lock(shared).jobs.takes_unknown += 1;
            }
            return;
        }
    };
    {
        let mut s = lock(shared);
        let t0 = s.t0;
        for d in &got {
            let deadline_ms = u64::try_from(d.deadline.saturating_duration_since(t0).as_millis())
                .unwrap_or(u64::MAX);
            s.jobs.taken.push(Taken {
                value: d.value,
                id: d.id.0,
                deliveries: d.deliveries,
                holder: peer.to_string(),
                client: c,
                call: stamp,
                ret,
                call_ms,
                ret_ms,
                deadline_ms,
            });
        }
    }
    if got.len() >= 2 && rng.chance(0.3) {
        sleep(Duration::from_millis(rng.between(0, 30))).await;
        let ids: Vec<_> = got.iter().map(|d| d.id).collect();
        let (op, stamp, call_ms) = call(shared);
        let r = jobs.ack_many(&ids).await;
        let outcome = format!("{JOBS} ack_many({ids:?}) -> {r:?}");
        let (ret, ret_ms) = record_other(shared, c, peer, op, stamp, call_ms, r.is_ok(), outcome);
        let mut retry = Vec::new();
        {
            let mut s = lock(shared);
            for (i, d) in got.iter().enumerate() {
                let answer = match &r {
                    Ok(acked) => {
                        if acked.get(i).copied().unwrap_or(false) {
                            Answer::Yes
                        } else {
                            Answer::No
                        }
                    }
                    Err(e) => Answer::of_error(e),
                };
                if answer == Answer::Unknown {
                    retry.push(d);
                }
                s.jobs.settles.push(Settle {
                    kind: SettleKind::Ack,
                    value: d.value,
                    id: d.id.0,
                    client: c,
                    call: stamp,
                    ret,
                    call_ms,
                    ret_ms,
                    answer,
                });
            }
        }
        for d in retry {
            settle(shared, c, peer, jobs, SettleKind::Ack, d.id, d.value).await;
        }
        return;
    }
    for d in &got {
        match rng.weighted(&[65, 7, 8, 10, 10]) {
            0 => {
                sleep(Duration::from_millis(rng.between(0, 30))).await;
                ack(shared, c, peer, jobs, d.id, d.value).await;
            }
            1 => {
                // Past the lease: the item may be back (and delivered again), and the ack answer false.
                let at = d.deadline + Duration::from_millis(rng.between(20, 200));
                let (shared, peer, jobs, id, value) = (
                    shared.clone(),
                    peer.to_string(),
                    jobs.clone(),
                    d.id,
                    d.value,
                );
                workers.push(tokio::spawn(async move {
                    sleep_until(at).await;
                    ack(&shared, c, &peer, &jobs, id, value).await;
                }));
            }
            2 => {
                // Renewed halfway, acknowledged after the first deadline, before the second.
                let (shared, peer, jobs, id, value) = (
                    shared.clone(),
                    peer.to_string(),
                    jobs.clone(),
                    d.id,
                    d.value,
                );
                workers.push(tokio::spawn(async move {
                    sleep(lease / 2).await;
                    let kind = SettleKind::Extend { lease_ms };
                    let held = settle(&shared, c, &peer, &jobs, kind, id, value).await;
                    if held == Answer::Yes {
                        sleep(lease * 3 / 4).await;
                    }
                    ack(&shared, c, &peer, &jobs, id, value).await;
                }));
            }
            3 => {
                sleep(Duration::from_millis(rng.between(0, 20))).await;
                settle(shared, c, peer, jobs, SettleKind::Nack, d.id, d.value).await;
            }
            _ => {
                let mut s = lock(shared);
                s.jobs.abandoned += 1;
                s.note(format!(
                    "client {c} on {peer}: {JOBS} abandons delivery {} (item {})",
                    d.id, d.value
                ));
            }
        }
    }
}

/// Acknowledges a delivery; once more if the answer was lost (the retry may answer false).
async fn ack(
    shared: &SharedRef,
    c: usize,
    peer: &str,
    jobs: &HamokQueue<u64>,
    id: DeliveryId,
    value: u64,
) {
    if settle(shared, c, peer, jobs, SettleKind::Ack, id, value).await == Answer::Unknown {
        settle(shared, c, peer, jobs, SettleKind::Ack, id, value).await;
    }
}

/// One ack, nack or extend of delivery `id`, recorded.
async fn settle(
    shared: &SharedRef,
    c: usize,
    peer: &str,
    jobs: &HamokQueue<u64>,
    kind: SettleKind,
    id: DeliveryId,
    value: u64,
) -> Answer {
    let (op, stamp, call_ms) = call(shared);
    let (answer, outcome) = match kind {
        SettleKind::Ack => {
            let r = jobs.ack(id).await;
            (Answer::of(&r, |held| *held), format!("ack({id}) -> {r:?}"))
        }
        SettleKind::Nack => {
            let r = jobs.nack(id).await;
            (
                Answer::of(&r, Option::is_some),
                format!("nack({id}) -> {r:?}"),
            )
        }
        SettleKind::Extend { lease_ms } => {
            let r = jobs.extend(id, Duration::from_millis(lease_ms)).await;
            (
                Answer::of(&r, |held| *held),
                format!("extend({id}, {lease_ms} ms) -> {r:?}"),
            )
        }
    };
    let outcome = format!("{JOBS} {outcome} (item {value})");
    let done = matches!(answer, Answer::Yes | Answer::No);
    let (ret, ret_ms) = record_other(shared, c, peer, op, stamp, call_ms, done, outcome);
    lock(shared).jobs.settles.push(Settle {
        kind,
        value,
        id: id.0,
        client: c,
        call: stamp,
        ret,
        call_ms,
        ret_ms,
        answer,
    });
    answer
}

/// The wrong consumer of [`Consumer::PopAndAbandon`]: pops (at most once) and drops the item.
async fn pop_and_abandon(shared: &SharedRef, c: usize, peer: &str, jobs: &HamokQueue<u64>) {
    let (op, stamp, call_ms) = call(shared);
    let r = jobs.pop().await;
    let outcome = format!("{JOBS} pop() -> {r:?}, abandoned");
    record_other(shared, c, peer, op, stamp, call_ms, r.is_ok(), outcome);
    if let Ok(Some(_)) = r {
        lock(shared).jobs.popped += 1;
    }
}
