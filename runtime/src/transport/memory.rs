//! An in-process transport: several peers of one process (or one test) share an [`InProcessHub`], which
//! hands each frame straight to the target peer's [`Inbound`].
//!
//! With no fault configured, [`Link::send`] is a snapshot lookup and a direct
//! [`Inbound::deliver`] call: no task, no channel, no copy of the frame. The hub also has test controls
//! to inject network faults: partitions ([`InProcessHub::partition`], [`InProcessHub::isolate`]),
//! one-way blocks ([`InProcessHub::block`]), random loss and duplication (driven by a seeded generator,
//! so a run is reproducible), delayed delivery and forced disconnects ([`InProcessHub::disconnect`]).
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use bytes::Bytes;
//! use hamok_runtime::raft::PeerId;
//! use hamok_runtime::transport::memory::InProcessHub;
//! use hamok_runtime::transport::{Inbound, Transport};
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let hub = InProcessHub::new();
//! let received = Arc::new(Mutex::new(Vec::new()));
//! let sink = received.clone();
//! let inbound_b = Inbound::new(1024, move |frame: Bytes| sink.lock().unwrap().push(frame));
//! let inbound_a = Inbound::new(1024, |_frame: Bytes| {});
//!
//! let a = hub.connect("cluster", PeerId::from("a"), inbound_a).await.unwrap();
//! let _b = hub.connect("cluster", PeerId::from("b"), inbound_b).await.unwrap();
//! a.send(&PeerId::from("b"), Bytes::from_static(b"hello")).unwrap();
//! assert_eq!(received.lock().unwrap().as_slice(), &[Bytes::from_static(b"hello")]);
//! assert_eq!(hub.stats().delivered, 1);
//! # });
//! ```

use std::cmp::Ordering as CmpOrdering;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, Weak};

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::time::{sleep_until, Duration, Instant};

use super::{BoxFuture, CloseSignal, Inbound, Link, Transport};
use crate::error::HamokError;
use crate::raft::{PeerId, SeededRng};

/// At most this many delayed frames wait in a hub at once; beyond it, frames are dropped and counted
/// in [`HubStats::overflow`].
pub const MAX_DELAYED_IN_FLIGHT: usize = 100_000;

/// The seed of [`InProcessHub::new`]; use [`InProcessHub::with_seed`] for another sequence of random
/// losses, duplicates and delays.
pub const DEFAULT_SEED: u64 = 0x6861_6d6f_6b5f_6875; // "hamok_hu"

/// Locks a mutex, ignoring poisoning (the protected data stays consistent: every critical section
/// either completes or changes nothing that matters).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------------------------------------------
// Statistics
// ---------------------------------------------------------------------------------------------------

/// What an [`InProcessHub`] did with the frames sent through it (see [`InProcessHub::stats`]).
///
/// A broadcast counts once per target. `dropped` is the total of the frames that reached no peer, for
/// any reason; the other `dropped`-like fields break it down.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HubStats {
    /// Frames (duplicates included) accepted by a target's [`Inbound`].
    pub delivered: u64,
    /// Frames that reached no peer, for any reason (the sum of `unroutable`, `blocked`, `lost`,
    /// `saturated` and `overflow`).
    pub dropped: u64,
    /// Extra copies made by the duplicate rate.
    pub duplicated: u64,
    /// Frames (copies included) scheduled for delayed delivery.
    pub delayed: u64,
    /// Dropped because the target was not connected (at send time or, for a delayed frame, at delivery
    /// time).
    pub unroutable: u64,
    /// Dropped by a partition, an isolation or a one-way block.
    pub blocked: u64,
    /// Dropped at random by the drop rate.
    pub lost: u64,
    /// Dropped because the target's [`Inbound`] was saturated (also counted by [`Inbound::dropped`]).
    pub saturated: u64,
    /// Dropped because [`MAX_DELAYED_IN_FLIGHT`] delayed frames were already waiting, because no Tokio
    /// runtime was available to deliver a delayed frame, or because the runtime shut down first.
    pub overflow: u64,
}

#[derive(Debug, Default)]
struct Counters {
    delivered: AtomicU64,
    duplicated: AtomicU64,
    delayed: AtomicU64,
    unroutable: AtomicU64,
    blocked: AtomicU64,
    lost: AtomicU64,
    saturated: AtomicU64,
    overflow: AtomicU64,
    delayed_in_flight: AtomicUsize,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

impl Counters {
    fn snapshot(&self) -> HubStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut s = HubStats {
            delivered: get(&self.delivered),
            dropped: 0,
            duplicated: get(&self.duplicated),
            delayed: get(&self.delayed),
            unroutable: get(&self.unroutable),
            blocked: get(&self.blocked),
            lost: get(&self.lost),
            saturated: get(&self.saturated),
            overflow: get(&self.overflow),
        };
        s.dropped = s.unroutable + s.blocked + s.lost + s.saturated + s.overflow;
        s
    }

    /// Hands `frame` to `inbound`, counting the outcome.
    fn deliver(&self, inbound: &Inbound, frame: Bytes) {
        if inbound.deliver(frame) {
            bump(&self.delivered);
        } else {
            bump(&self.saturated);
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// Shared state
// ---------------------------------------------------------------------------------------------------

/// One connected peer.
#[derive(Clone)]
struct Registered {
    link_id: u64,
    inbound: Inbound,
    signal: Arc<CloseSignal>,
}

/// The configured faults. Connectivity faults are keyed by peer id and apply in every cluster.
#[derive(Clone, Debug, Default)]
struct Faults {
    /// Peer -> group index; `None` when no partition is in force.
    partition: Option<BTreeMap<PeerId, usize>>,
    isolated: BTreeSet<PeerId>,
    /// `(from, to)` pairs that cannot talk in that direction.
    blocked: BTreeSet<(PeerId, PeerId)>,
    drop_rate: f64,
    duplicate_rate: f64,
    /// `(min, max)` delay in milliseconds; `None` for immediate delivery.
    delay_ms: Option<(u64, u64)>,
}

impl Faults {
    fn is_clean(&self) -> bool {
        self.partition.is_none()
            && self.isolated.is_empty()
            && self.blocked.is_empty()
            && self.drop_rate <= 0.0
            && self.duplicate_rate <= 0.0
            && self.delay_ms.is_none()
    }

    /// Whether a frame from `from` may reach `to` right now.
    fn can_reach(&self, from: &PeerId, to: &PeerId) -> bool {
        if from == to {
            return true;
        }
        if self.isolated.contains(from) || self.isolated.contains(to) {
            return false;
        }
        if let Some(groups) = &self.partition {
            match (groups.get(from), groups.get(to)) {
                (Some(a), Some(b)) if a == b => {}
                _ => return false,
            }
        }
        !self.blocked.contains(&(from.clone(), to.clone()))
    }
}

/// An immutable snapshot of the hub: who is connected and which faults are in force. Senders clone the
/// `Arc` under a short read lock; mutations copy on write.
#[derive(Clone, Default)]
struct State {
    clusters: BTreeMap<Arc<str>, BTreeMap<PeerId, Registered>>,
    faults: Faults,
    /// Cached `faults.is_clean()`: the fast path test.
    clean: bool,
}

impl State {
    fn target(&self, cluster: &str, to: &PeerId) -> Option<&Registered> {
        self.clusters.get(cluster).and_then(|peers| peers.get(to))
    }
}

/// A frame waiting in the delay queue.
struct Delayed {
    due: Instant,
    seq: u64,
    cluster: Arc<str>,
    from: PeerId,
    to: PeerId,
    frame: Bytes,
    slot: DelaySlot,
}

impl PartialEq for Delayed {
    fn eq(&self, other: &Self) -> bool {
        (self.due, self.seq) == (other.due, other.seq)
    }
}
impl Eq for Delayed {}
impl PartialOrd for Delayed {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}
impl Ord for Delayed {
    /// Reversed, so that `BinaryHeap` (a max-heap) pops the earliest `(due, seq)` first.
    fn cmp(&self, other: &Self) -> CmpOrdering {
        (other.due, other.seq).cmp(&(self.due, self.seq))
    }
}

/// One of the [`MAX_DELAYED_IN_FLIGHT`] slots; released (and, if the frame was never handled, counted
/// as overflow) when the delayed frame is dropped.
struct DelaySlot {
    counters: Arc<Counters>,
    handled: bool,
}

impl Drop for DelaySlot {
    fn drop(&mut self) {
        self.counters
            .delayed_in_flight
            .fetch_sub(1, Ordering::AcqRel);
        if !self.handled {
            bump(&self.counters.overflow);
        }
    }
}

/// The sending side of the hub's delay-queue task (spawned lazily on the first delayed frame, and again
/// if the runtime it ran on has gone).
#[derive(Default)]
struct DelayQueue {
    tx: Option<mpsc::UnboundedSender<Delayed>>,
    seq: u64,
}

struct HubInner {
    state: RwLock<Arc<State>>,
    counters: Arc<Counters>,
    rng: Mutex<SeededRng>,
    delay: Mutex<DelayQueue>,
    next_link_id: AtomicU64,
}

impl HubInner {
    fn snapshot(&self) -> Arc<State> {
        self.state.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Applies `f` to a private copy of the state (copy on write) and publishes it. Returns what `f`
    /// returns; never calls out to user code while holding the lock.
    fn update<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        let mut guard = self.state.write().unwrap_or_else(|e| e.into_inner());
        let state = Arc::make_mut(&mut guard);
        let r = f(state);
        state.clean = state.faults.is_clean();
        r
    }

    fn update_faults(&self, f: impl FnOnce(&mut Faults)) {
        self.update(|s| f(&mut s.faults));
    }

    /// Routes one frame from `from` to the registered `target` through the configured faults.
    fn route(
        self: &Arc<Self>,
        state: &State,
        cluster: &Arc<str>,
        from: &PeerId,
        to: &PeerId,
        target: &Registered,
        frame: Bytes,
    ) {
        if state.clean {
            self.counters.deliver(&target.inbound, frame);
            return;
        }
        let faults = &state.faults;
        if !faults.can_reach(from, to) {
            bump(&self.counters.blocked);
            return;
        }
        let (lost, duplicate, delays) = {
            let mut rng = lock(&self.rng);
            let lost = faults.drop_rate > 0.0 && rng.chance(faults.drop_rate);
            let duplicate =
                !lost && faults.duplicate_rate > 0.0 && rng.chance(faults.duplicate_rate);
            let mut delays = [None, None];
            if let (false, Some((min, max))) = (lost, faults.delay_ms) {
                delays[0] = Some(rng.range(min, max.saturating_add(1)));
                if duplicate {
                    delays[1] = Some(rng.range(min, max.saturating_add(1)));
                }
            }
            (lost, duplicate, delays)
        };
        if lost {
            bump(&self.counters.lost);
            return;
        }
        let copies = if duplicate {
            bump(&self.counters.duplicated);
            2
        } else {
            1
        };
        for delay in delays.into_iter().take(copies) {
            match delay {
                None => self.counters.deliver(&target.inbound, frame.clone()),
                Some(ms) => self.schedule(cluster, from, to, frame.clone(), ms),
            }
        }
    }

    /// Queues a frame for delivery in `ms` milliseconds.
    fn schedule(
        self: &Arc<Self>,
        cluster: &Arc<str>,
        from: &PeerId,
        to: &PeerId,
        frame: Bytes,
        ms: u64,
    ) {
        let counters = &self.counters;
        if counters.delayed_in_flight.fetch_add(1, Ordering::AcqRel) >= MAX_DELAYED_IN_FLIGHT {
            counters.delayed_in_flight.fetch_sub(1, Ordering::AcqRel);
            bump(&counters.overflow);
            return;
        }
        bump(&counters.delayed);
        let slot = DelaySlot {
            counters: counters.clone(),
            handled: false,
        };
        let mut queue = lock(&self.delay);
        queue.seq += 1;
        let mut item = Delayed {
            due: Instant::now() + Duration::from_millis(ms),
            seq: queue.seq,
            cluster: cluster.clone(),
            from: from.clone(),
            to: to.clone(),
            frame,
            slot,
        };
        if let Some(tx) = &queue.tx {
            match tx.send(item) {
                Ok(()) => return,
                // The task died with its runtime: start another one below.
                Err(mpsc::error::SendError(back)) => item = back,
            }
        }
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            queue.tx = None;
            // Dropping `item` releases its slot and counts it as overflow.
            tracing::debug!("in-process hub: no Tokio runtime for a delayed frame; dropped");
            return;
        };
        let (tx, rx) = mpsc::unbounded_channel();
        // Cannot fail: `rx` is alive.
        let _ = tx.send(item);
        queue.tx = Some(tx);
        handle.spawn(run_delay_queue(Arc::downgrade(self), rx));
    }

    /// Delivers a delayed frame that is due, if its route is still open.
    fn deliver_delayed(&self, state: &State, mut item: Delayed) {
        item.slot.handled = true;
        let Some(target) = state.target(&item.cluster, &item.to) else {
            bump(&self.counters.unroutable);
            return;
        };
        if !state.faults.can_reach(&item.from, &item.to) {
            bump(&self.counters.blocked);
            return;
        }
        self.counters.deliver(&target.inbound, item.frame.clone());
    }

    /// Removes every registration for which `select(cluster, peer)` holds, then closes those links
    /// with `reason`. Returns how many links were closed.
    fn remove_where(
        &self,
        reason: &str,
        select: impl Fn(&str, &PeerId, &Registered) -> bool,
    ) -> usize {
        let removed = self.update(|s| {
            let mut removed = Vec::new();
            for (cluster, peers) in s.clusters.iter_mut() {
                peers.retain(|peer, reg| {
                    if select(cluster, peer, reg) {
                        // Cloned so the inbound (user code) is dropped outside the lock.
                        removed.push(reg.clone());
                        false
                    } else {
                        true
                    }
                });
            }
            s.clusters.retain(|_, peers| !peers.is_empty());
            removed
        });
        for reg in &removed {
            reg.signal.close(reason);
        }
        removed.len()
    }
}

/// The delay-queue task: delivers delayed frames in `(due, send order)` order. Ends when the hub is gone.
async fn run_delay_queue(hub: Weak<HubInner>, mut rx: mpsc::UnboundedReceiver<Delayed>) {
    let mut heap: BinaryHeap<Delayed> = BinaryHeap::new();
    loop {
        // Deliver everything due before waiting again, so a flood of new frames cannot starve the timer.
        let now = Instant::now();
        if heap.peek().is_some_and(|d| d.due <= now) {
            let Some(hub) = hub.upgrade() else { return };
            let state = hub.snapshot();
            while heap.peek().is_some_and(|d| d.due <= now) {
                if let Some(item) = heap.pop() {
                    hub.deliver_delayed(&state, item);
                }
            }
        }
        let next_due = heap.peek().map(|d| d.due);
        // Biased: a fixed branch order keeps runs on a paused clock reproducible.
        tokio::select! {
            biased;
            item = rx.recv() => match item {
                Some(item) => {
                    heap.push(item);
                    while let Ok(item) = rx.try_recv() {
                        heap.push(item);
                    }
                }
                // The hub is gone: frames still waiting are dropped (and counted).
                None => return,
            },
            _ = sleep_until(next_due.unwrap_or(now)), if next_due.is_some() => {}
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// The hub
// ---------------------------------------------------------------------------------------------------

/// An in-process "network" that several peers share: a [`Transport`] whose links hand frames directly
/// to the target peer's [`Inbound`], plus test controls to inject faults.
///
/// Cheap to clone (clones share the same network). Clusters are independent: a peer only ever sees
/// frames of the cluster it connected to, even when peers of several clusters share one hub.
/// Connecting a peer id that is already connected in that cluster replaces the old connection and
/// closes the old link.
///
/// # Faults
///
/// Connectivity faults ([`partition`](Self::partition), [`isolate`](Self::isolate),
/// [`block`](Self::block)) are keyed by peer id and apply in every cluster of the hub; they are checked
/// when a frame is sent and, for a delayed frame, again when it is due (so a partition also cuts frames
/// already in flight). [`heal`](Self::heal) lifts them all. Loss, duplication and delay
/// ([`set_drop_rate`](Self::set_drop_rate), [`set_duplicate_rate`](Self::set_duplicate_rate),
/// [`set_delay_ms`](Self::set_delay_ms)) apply to every frame, per target, using a generator seeded by
/// [`with_seed`](Self::with_seed) (so runs are reproducible for the same sequence of sends);
/// [`clear_faults`](Self::clear_faults) lifts everything.
///
/// ```
/// use bytes::Bytes;
/// use hamok_runtime::raft::PeerId;
/// use hamok_runtime::transport::memory::InProcessHub;
/// use hamok_runtime::transport::{Inbound, Transport};
///
/// #[tokio::main]
/// async fn main() {
///     let hub = InProcessHub::new();
///     let (a, b) = (PeerId::from("a"), PeerId::from("b"));
///     let link_a = hub.connect("c", a.clone(), Inbound::new(16, |_| {})).await.unwrap();
///     let _link_b = hub.connect("c", b.clone(), Inbound::new(16, |_| {})).await.unwrap();
///
///     hub.block(&a, &b); // a can no longer reach b (b still reaches a)
///     link_a.send(&b, Bytes::from_static(b"lost")).unwrap();
///     assert_eq!(hub.stats().blocked, 1);
///
///     hub.heal();
///     link_a.send(&b, Bytes::from_static(b"arrives")).unwrap();
///     assert_eq!(hub.stats().delivered, 1);
/// }
/// ```
#[derive(Clone)]
pub struct InProcessHub {
    inner: Arc<HubInner>,
}

impl Default for InProcessHub {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for InProcessHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.inner.snapshot();
        let peers: BTreeMap<&str, Vec<&PeerId>> = state
            .clusters
            .iter()
            .map(|(c, peers)| (&**c, peers.keys().collect()))
            .collect();
        f.debug_struct("InProcessHub")
            .field("peers", &peers)
            .field("faults", &state.faults)
            .field("stats", &self.stats())
            .finish()
    }
}

impl InProcessHub {
    /// An empty hub with no faults, seeded with [`DEFAULT_SEED`].
    pub fn new() -> Self {
        Self::with_seed(DEFAULT_SEED)
    }

    /// An empty hub with no faults whose random losses, duplicates and delays follow `seed`.
    pub fn with_seed(seed: u64) -> Self {
        InProcessHub {
            inner: Arc::new(HubInner {
                state: RwLock::new(Arc::new(State {
                    clean: true,
                    ..State::default()
                })),
                counters: Arc::new(Counters::default()),
                rng: Mutex::new(SeededRng::new(seed)),
                delay: Mutex::new(DelayQueue::default()),
                next_link_id: AtomicU64::new(1),
            }),
        }
    }

    /// What the hub did with the frames so far.
    pub fn stats(&self) -> HubStats {
        self.inner.counters.snapshot()
    }

    /// The peers currently connected in `cluster`, in order.
    pub fn peers(&self, cluster: &str) -> Vec<PeerId> {
        self.inner
            .snapshot()
            .clusters
            .get(cluster)
            .map(|peers| peers.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Kills every link of `peer` (in every cluster): their [`Link::closed`] futures resolve and their
    /// sends fail, so the runtime reconnects. Frames for `peer` are dropped until it does. Returns how
    /// many links were killed.
    pub fn disconnect(&self, peer: &PeerId) -> usize {
        self.inner
            .remove_where("disconnected by the in-process hub", |_, p, _| p == peer)
    }

    /// Splits the network: peers in different groups cannot talk to each other, in either direction.
    /// **Peers listed in no group are isolated from everyone** (a partition describes the whole
    /// network). Replaces any previous partition; isolations and one-way blocks stay in force.
    pub fn partition(&self, groups: &[&[PeerId]]) {
        let map: BTreeMap<PeerId, usize> = groups
            .iter()
            .enumerate()
            .flat_map(|(i, group)| group.iter().map(move |p| (p.clone(), i)))
            .collect();
        self.inner.update_faults(|f| f.partition = Some(map));
    }

    /// Cuts `peer` off from every other peer, both ways, until [`heal`](Self::heal).
    pub fn isolate(&self, peer: &PeerId) {
        self.inner.update_faults(|f| {
            f.isolated.insert(peer.clone());
        });
    }

    /// Blocks frames from `from` to `to` (one way: `to` still reaches `from`) until
    /// [`heal`](Self::heal) or [`unblock`](Self::unblock).
    pub fn block(&self, from: &PeerId, to: &PeerId) {
        self.inner.update_faults(|f| {
            f.blocked.insert((from.clone(), to.clone()));
        });
    }

    /// Lifts a one-way block set by [`block`](Self::block).
    pub fn unblock(&self, from: &PeerId, to: &PeerId) {
        self.inner.update_faults(|f| {
            f.blocked.remove(&(from.clone(), to.clone()));
        });
    }

    /// Restores full connectivity: lifts the partition, every isolation and every one-way block. Loss,
    /// duplication and delay stay as configured (see [`clear_faults`](Self::clear_faults)).
    pub fn heal(&self) {
        self.inner.update_faults(|f| {
            f.partition = None;
            f.isolated.clear();
            f.blocked.clear();
        });
    }

    /// Lifts every fault: connectivity ([`heal`](Self::heal)), loss, duplication and delay.
    pub fn clear_faults(&self) {
        self.inner.update_faults(|f| *f = Faults::default());
    }

    /// Drops each frame (per target) with probability `rate`, clamped to `[0, 1]`; 0 disables.
    pub fn set_drop_rate(&self, rate: f64) {
        let rate = sanitize_rate(rate);
        self.inner.update_faults(|f| f.drop_rate = rate);
    }

    /// Delivers each frame (per target) twice with probability `rate`, clamped to `[0, 1]`; 0 disables.
    pub fn set_duplicate_rate(&self, rate: f64) {
        let rate = sanitize_rate(rate);
        self.inner.update_faults(|f| f.duplicate_rate = rate);
    }

    /// Delays each frame (per target) by a uniformly random whole number of milliseconds in
    /// `[min, max]` (the bounds are swapped if reversed); `(0, 0)` restores immediate delivery.
    ///
    /// Delayed frames are delivered by a task of the hub (spawned on the current Tokio runtime) in the
    /// order of their due time, then of sending; so different delays reorder frames, equal delays
    /// never do. At most [`MAX_DELAYED_IN_FLIGHT`] frames wait at once; more are dropped and counted.
    pub fn set_delay_ms(&self, min: u64, max: u64) {
        let (min, max) = if min <= max { (min, max) } else { (max, min) };
        let delay = if max == 0 { None } else { Some((min, max)) };
        self.inner.update_faults(|f| f.delay_ms = delay);
    }
}

fn sanitize_rate(rate: f64) -> f64 {
    if rate.is_nan() {
        0.0
    } else {
        rate.clamp(0.0, 1.0)
    }
}

impl Transport for InProcessHub {
    fn connect(
        &self,
        cluster: &str,
        local: PeerId,
        inbound: Inbound,
    ) -> BoxFuture<Result<Arc<dyn Link>, HamokError>> {
        let hub = self.inner.clone();
        let cluster: Arc<str> = Arc::from(cluster);
        Box::pin(async move {
            let link_id = hub.next_link_id.fetch_add(1, Ordering::Relaxed);
            let signal = Arc::new(CloseSignal::new());
            let registered = Registered {
                link_id,
                inbound,
                signal: signal.clone(),
            };
            let replaced = hub.update(|s| {
                s.clusters
                    .entry(cluster.clone())
                    .or_default()
                    .insert(local.clone(), registered)
            });
            if let Some(old) = replaced {
                old.signal
                    .close("replaced by a new connection of the same peer");
            }
            tracing::debug!(cluster = &*cluster, peer = %local, "in-process hub: connected");
            let link: Arc<dyn Link> = Arc::new(MemoryLink {
                hub,
                cluster,
                local,
                link_id,
                signal,
            });
            Ok(link)
        })
    }
}

/// The link of one peer on an [`InProcessHub`]. Dropping it closes it.
struct MemoryLink {
    hub: Arc<HubInner>,
    cluster: Arc<str>,
    local: PeerId,
    link_id: u64,
    signal: Arc<CloseSignal>,
}

fn link_closed() -> HamokError {
    HamokError::Transport {
        context: "link closed".to_string(),
        source: None,
    }
}

impl Link for MemoryLink {
    fn send(&self, to: &PeerId, frame: Bytes) -> Result<(), HamokError> {
        if self.signal.is_closed() {
            return Err(link_closed());
        }
        let state = self.hub.snapshot();
        match state.target(&self.cluster, to) {
            Some(target) => self
                .hub
                .route(&state, &self.cluster, &self.local, to, target, frame),
            // Peers come and go: not an error for the sender.
            None => bump(&self.hub.counters.unroutable),
        }
        Ok(())
    }

    fn broadcast(&self, frame: Bytes) -> Result<(), HamokError> {
        if self.signal.is_closed() {
            return Err(link_closed());
        }
        let state = self.hub.snapshot();
        if let Some(peers) = state.clusters.get(&*self.cluster) {
            for (to, target) in peers.iter().filter(|(p, _)| **p != self.local) {
                self.hub.route(
                    &state,
                    &self.cluster,
                    &self.local,
                    to,
                    target,
                    frame.clone(),
                );
            }
        }
        Ok(())
    }

    fn closed(&self) -> BoxFuture<String> {
        Box::pin(self.signal.wait())
    }

    fn close(&self) {
        let id = self.link_id;
        let cluster = &*self.cluster;
        let local = &self.local;
        self.hub.remove_where("closed", |c, p, reg| {
            c == cluster && p == local && reg.link_id == id
        });
        self.signal.close("closed");
    }
}

impl Drop for MemoryLink {
    fn drop(&mut self) {
        if !self.signal.is_closed() {
            self.close();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex as StdMutex;

    const C: &str = "cluster";

    fn pid(s: &str) -> PeerId {
        PeerId::from(s)
    }

    /// A recording inbound: every delivered frame is pushed to the shared vector (and processed at once,
    /// so the capacity never fills).
    fn recorder(capacity: usize) -> (Inbound, Arc<StdMutex<Vec<Bytes>>>) {
        let got = Arc::new(StdMutex::new(Vec::new()));
        let sink = got.clone();
        let slot: Arc<StdMutex<Option<Inbound>>> = Arc::new(StdMutex::new(None));
        let me = slot.clone();
        let inbound = Inbound::new(capacity, move |frame| {
            sink.lock().unwrap().push(frame);
            if let Some(i) = me.lock().unwrap().as_ref() {
                i.processed();
            }
        });
        *slot.lock().unwrap() = Some(inbound.clone());
        (inbound, got)
    }

    /// An inbound that records but never processes (so it saturates at `capacity`).
    fn holder(capacity: usize) -> (Inbound, Arc<StdMutex<Vec<Bytes>>>) {
        let got = Arc::new(StdMutex::new(Vec::new()));
        let sink = got.clone();
        let inbound = Inbound::new(capacity, move |frame| sink.lock().unwrap().push(frame));
        (inbound, got)
    }

    async fn join(
        hub: &InProcessHub,
        cluster: &str,
        peer: &str,
    ) -> (Arc<dyn Link>, Arc<StdMutex<Vec<Bytes>>>) {
        let (inbound, got) = recorder(1_000_000);
        let link = hub.connect(cluster, pid(peer), inbound).await.unwrap();
        (link, got)
    }

    fn b(s: &'static str) -> Bytes {
        Bytes::from_static(s.as_bytes())
    }

    fn count(v: &Arc<StdMutex<Vec<Bytes>>>) -> usize {
        v.lock().unwrap().len()
    }

    #[tokio::test]
    async fn unicast_and_broadcast() {
        let hub = InProcessHub::new();
        let (a, got_a) = join(&hub, C, "a").await;
        let (bl, got_b) = join(&hub, C, "b").await;
        let (_c, got_c) = join(&hub, C, "c").await;

        a.send(&pid("b"), b("to-b")).unwrap();
        assert_eq!(*got_b.lock().unwrap(), vec![b("to-b")]);
        assert_eq!(count(&got_a) + count(&got_c), 0);

        bl.broadcast(b("all")).unwrap();
        assert_eq!(*got_a.lock().unwrap(), vec![b("all")]);
        assert_eq!(*got_c.lock().unwrap(), vec![b("all")]);
        assert_eq!(
            count(&got_b),
            1,
            "a broadcast does not come back to its sender"
        );

        // Unknown target: fine for the sender, counted.
        a.send(&pid("zz"), b("nobody")).unwrap();
        let s = hub.stats();
        assert_eq!(s.delivered, 3);
        assert_eq!(s.unroutable, 1);
        assert_eq!(s.dropped, 1);
        assert_eq!(hub.peers(C), vec![pid("a"), pid("b"), pid("c")]);
    }

    #[tokio::test]
    async fn clusters_are_isolated() {
        let hub = InProcessHub::new();
        let (a1, got_a1) = join(&hub, "one", "a").await;
        let (_b1, got_b1) = join(&hub, "one", "b").await;
        let (a2, got_a2) = join(&hub, "two", "a").await;
        let (_b2, got_b2) = join(&hub, "two", "b").await;
        let (_c2, got_c2) = join(&hub, "two", "c").await;

        a1.broadcast(b("one")).unwrap();
        a1.send(&pid("c"), b("no c in one")).unwrap();
        a2.send(&pid("b"), b("two")).unwrap();

        assert_eq!(*got_b1.lock().unwrap(), vec![b("one")]);
        assert_eq!(*got_b2.lock().unwrap(), vec![b("two")]);
        assert_eq!(count(&got_c2), 0);
        assert_eq!(count(&got_a1) + count(&got_a2), 0);
        assert_eq!(hub.stats().unroutable, 1);
    }

    #[tokio::test]
    async fn partition_and_heal() {
        let hub = InProcessHub::new();
        let (a, got_a) = join(&hub, C, "a").await;
        let (bl, got_b) = join(&hub, C, "b").await;
        let (c, got_c) = join(&hub, C, "c").await;
        let (d, got_d) = join(&hub, C, "d").await;

        hub.partition(&[&[pid("a"), pid("b")], &[pid("c")]]);
        a.broadcast(b("x")).unwrap();
        c.broadcast(b("y")).unwrap();
        d.broadcast(b("z")).unwrap(); // d is in no group: isolated
        bl.send(&pid("a"), b("w")).unwrap();
        assert_eq!(*got_a.lock().unwrap(), vec![b("w")]);
        assert_eq!(*got_b.lock().unwrap(), vec![b("x")]);
        assert_eq!(count(&got_c) + count(&got_d), 0);
        assert_eq!(hub.stats().blocked, 2 + 3 + 3);

        hub.heal();
        c.send(&pid("a"), b("healed")).unwrap();
        d.send(&pid("b"), b("healed")).unwrap();
        assert_eq!(count(&got_a), 2);
        assert_eq!(count(&got_b), 2);

        hub.isolate(&pid("a"));
        a.broadcast(b("x")).unwrap();
        bl.send(&pid("a"), b("x")).unwrap();
        c.send(&pid("d"), b("ok")).unwrap();
        assert_eq!(count(&got_a), 2);
        assert_eq!(count(&got_b), 2);
        assert_eq!(count(&got_d), 1);
        hub.heal();
        bl.send(&pid("a"), b("back")).unwrap();
        assert_eq!(count(&got_a), 3);
    }

    #[tokio::test]
    async fn one_way_block() {
        let hub = InProcessHub::new();
        let (a, got_a) = join(&hub, C, "a").await;
        let (bl, got_b) = join(&hub, C, "b").await;
        hub.block(&pid("a"), &pid("b"));
        a.send(&pid("b"), b("blocked")).unwrap();
        bl.send(&pid("a"), b("passes")).unwrap();
        assert_eq!(count(&got_b), 0);
        assert_eq!(*got_a.lock().unwrap(), vec![b("passes")]);
        hub.unblock(&pid("a"), &pid("b"));
        a.send(&pid("b"), b("now")).unwrap();
        assert_eq!(*got_b.lock().unwrap(), vec![b("now")]);
    }

    #[tokio::test]
    async fn drop_rate_is_about_p() {
        let hub = InProcessHub::with_seed(7);
        let (a, _) = join(&hub, C, "a").await;
        let (_b, got_b) = join(&hub, C, "b").await;
        hub.set_drop_rate(0.3);
        for _ in 0..10_000 {
            a.send(&pid("b"), b("f")).unwrap();
        }
        let s = hub.stats();
        assert_eq!(s.lost + s.delivered, 10_000);
        assert_eq!(s.delivered as usize, count(&got_b));
        assert!((2_700..=3_300).contains(&s.lost), "lost {}", s.lost);

        // Same seed, same sends: same outcome.
        let hub2 = InProcessHub::with_seed(7);
        let (a2, _) = join(&hub2, C, "a").await;
        let (_b2, _) = join(&hub2, C, "b").await;
        hub2.set_drop_rate(0.3);
        for _ in 0..10_000 {
            a2.send(&pid("b"), b("f")).unwrap();
        }
        assert_eq!(hub2.stats(), s);

        hub.set_drop_rate(1.0);
        a.send(&pid("b"), b("f")).unwrap();
        assert_eq!(hub.stats().lost, s.lost + 1);
        hub.clear_faults();
        a.send(&pid("b"), b("f")).unwrap();
        assert_eq!(hub.stats().delivered, s.delivered + 1);
    }

    #[tokio::test]
    async fn duplicates() {
        let hub = InProcessHub::new();
        let (a, _) = join(&hub, C, "a").await;
        let (_b, got_b) = join(&hub, C, "b").await;
        hub.set_duplicate_rate(1.0);
        a.send(&pid("b"), b("twice")).unwrap();
        assert_eq!(*got_b.lock().unwrap(), vec![b("twice"), b("twice")]);
        assert_eq!(hub.stats().duplicated, 1);
        assert_eq!(hub.stats().delivered, 2);

        hub.set_duplicate_rate(0.5);
        for _ in 0..10_000 {
            a.send(&pid("b"), b("f")).unwrap();
        }
        let dup = hub.stats().duplicated - 1;
        assert!((4_700..=5_300).contains(&dup), "duplicated {dup}");
        assert_eq!(count(&got_b) as u64, 2 + 10_000 + dup);
    }

    #[tokio::test(start_paused = true)]
    async fn delay_orders_by_due_time() {
        let hub = InProcessHub::new();
        let (a, _) = join(&hub, C, "a").await;
        let (_b, got_b) = join(&hub, C, "b").await;

        // Equal delays keep send order.
        hub.set_delay_ms(50, 50);
        for i in 0..100u32 {
            a.send(&pid("b"), Bytes::from(i.to_be_bytes().to_vec()))
                .unwrap();
        }
        assert_eq!(count(&got_b), 0, "nothing arrives before the delay");
        tokio::time::sleep(Duration::from_millis(49)).await;
        assert_eq!(count(&got_b), 0);
        tokio::time::sleep(Duration::from_millis(2)).await;
        let expected: Vec<Bytes> = (0..100u32)
            .map(|i| Bytes::from(i.to_be_bytes().to_vec()))
            .collect();
        assert_eq!(*got_b.lock().unwrap(), expected);
        assert_eq!(hub.stats().delayed, 100);
        got_b.lock().unwrap().clear();

        // A longer delay sent first arrives after a shorter one sent later.
        hub.set_delay_ms(100, 100);
        a.send(&pid("b"), b("slow")).unwrap();
        hub.set_delay_ms(10, 10);
        a.send(&pid("b"), b("fast")).unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(*got_b.lock().unwrap(), vec![b("fast")]);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(*got_b.lock().unwrap(), vec![b("fast"), b("slow")]);

        // Random delays in a range: everything arrives within max.
        hub.set_delay_ms(5, 30);
        for _ in 0..1_000 {
            a.send(&pid("b"), b("r")).unwrap();
        }
        tokio::time::sleep(Duration::from_millis(31)).await;
        assert_eq!(count(&got_b), 1_002);
        assert_eq!(hub.stats().delivered, 1_102);

        // Back to immediate delivery.
        hub.set_delay_ms(0, 0);
        a.send(&pid("b"), b("now")).unwrap();
        assert_eq!(count(&got_b), 1_003);
    }

    #[tokio::test(start_paused = true)]
    async fn partition_cuts_frames_in_flight() {
        let hub = InProcessHub::new();
        let (a, _) = join(&hub, C, "a").await;
        let (_b, got_b) = join(&hub, C, "b").await;
        hub.set_delay_ms(10, 10);
        a.send(&pid("b"), b("in flight")).unwrap();
        hub.isolate(&pid("b"));
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(count(&got_b), 0);
        assert_eq!(hub.stats().blocked, 1);
        assert_eq!(hub.stats().delayed, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn delayed_frames_are_bounded() {
        let hub = InProcessHub::new();
        let (a, _) = join(&hub, C, "a").await;
        let (_b, got_b) = join(&hub, C, "b").await;
        hub.set_delay_ms(1_000, 1_000);
        for _ in 0..MAX_DELAYED_IN_FLIGHT + 10 {
            a.send(&pid("b"), b("f")).unwrap();
        }
        let s = hub.stats();
        assert_eq!(s.delayed as usize, MAX_DELAYED_IN_FLIGHT);
        assert_eq!(s.overflow, 10);
        tokio::time::sleep(Duration::from_millis(1_001)).await;
        assert_eq!(count(&got_b), MAX_DELAYED_IN_FLIGHT);
        assert_eq!(
            hub.inner.counters.delayed_in_flight.load(Ordering::Relaxed),
            0
        );
        // Slots are free again.
        a.send(&pid("b"), b("f")).unwrap();
        assert_eq!(hub.stats().delayed as usize, MAX_DELAYED_IN_FLIGHT + 1);
    }

    #[tokio::test(start_paused = true)]
    async fn delayed_frame_for_a_departed_peer_is_unroutable() {
        let hub = InProcessHub::new();
        let (a, _) = join(&hub, C, "a").await;
        let (bl, _) = join(&hub, C, "b").await;
        hub.set_delay_ms(10, 10);
        a.send(&pid("b"), b("late")).unwrap();
        bl.close();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(hub.stats().unroutable, 1);
        assert_eq!(hub.stats().delivered, 0);
    }

    #[tokio::test]
    async fn disconnect_resolves_closed_and_peer_can_reconnect() {
        let hub = InProcessHub::new();
        let (a, got_a) = join(&hub, C, "a").await;
        let (bl, _) = join(&hub, C, "b").await;
        let closed = a.closed();

        assert_eq!(hub.disconnect(&pid("a")), 1);
        let reason = tokio::time::timeout(Duration::from_secs(5), closed)
            .await
            .unwrap();
        assert!(reason.contains("disconnected"), "{reason}");
        assert!(a.send(&pid("b"), b("x")).is_err());
        assert!(a.broadcast(b("x")).is_err());
        // A closed() asked after the fact resolves at once.
        assert_eq!(a.closed().await, reason);

        bl.send(&pid("a"), b("gone")).unwrap();
        assert_eq!(count(&got_a), 0);
        assert_eq!(hub.peers(C), vec![pid("b")]);

        let (a2, got_a2) = join(&hub, C, "a").await;
        bl.send(&pid("a"), b("back")).unwrap();
        assert_eq!(*got_a2.lock().unwrap(), vec![b("back")]);
        // Closing the old (dead) link again does not unregister the new one.
        a.close();
        drop(a);
        bl.send(&pid("a"), b("still")).unwrap();
        assert_eq!(count(&got_a2), 2);
        a2.send(&pid("b"), b("x")).unwrap();
    }

    #[tokio::test]
    async fn close_and_replace() {
        let hub = InProcessHub::new();
        let (a, _) = join(&hub, C, "a").await;
        let (first, got_first) = join(&hub, C, "b").await;
        let (_second, got_second) = join(&hub, C, "b").await;
        let reason = tokio::time::timeout(Duration::from_secs(5), first.closed())
            .await
            .unwrap();
        assert!(reason.contains("replaced"), "{reason}");
        a.send(&pid("b"), b("x")).unwrap();
        assert_eq!(count(&got_first), 0);
        assert_eq!(count(&got_second), 1);
        drop(first); // must not unregister the replacement
        a.send(&pid("b"), b("y")).unwrap();
        assert_eq!(count(&got_second), 2);

        let closed = a.closed();
        a.close();
        a.close(); // idempotent
        assert_eq!(closed.await, "closed");
        assert_eq!(hub.peers(C), vec![pid("b")]);

        // Dropping a link unregisters it.
        let (c, _) = join(&hub, C, "c").await;
        assert_eq!(hub.peers(C).len(), 2);
        drop(c);
        assert_eq!(hub.peers(C), vec![pid("b")]);
    }

    #[tokio::test]
    async fn saturated_inbound_drops_and_counts() {
        let hub = InProcessHub::new();
        let (a, _) = join(&hub, C, "a").await;
        let (inbound, got) = holder(3);
        let _bl = hub.connect(C, pid("b"), inbound.clone()).await.unwrap();
        for _ in 0..5 {
            a.send(&pid("b"), b("f")).unwrap();
        }
        assert_eq!(count(&got), 3);
        assert_eq!(inbound.dropped(), 2);
        let s = hub.stats();
        assert_eq!((s.delivered, s.saturated, s.dropped), (3, 2, 2));
        inbound.processed();
        a.send(&pid("b"), b("f")).unwrap();
        assert_eq!(count(&got), 4);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_senders() {
        let hub = InProcessHub::new();
        let (_sink, got) = join(&hub, C, "sink").await;
        let mut tasks = Vec::new();
        for i in 0..4 {
            let (link, _) = join(&hub, C, &format!("p{i}")).await;
            tasks.push(tokio::spawn(async move {
                for _ in 0..5_000 {
                    link.send(&pid("sink"), b("f")).unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(count(&got), 20_000);
        assert_eq!(hub.stats().delivered, 20_000);
    }

    #[test]
    fn delayed_send_without_runtime_is_dropped() {
        let hub = InProcessHub::new();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let (a, _bl, got) = rt.block_on(async {
            let (a, _) = join(&hub, C, "a").await;
            let (bl, got) = join(&hub, C, "b").await;
            (a, bl, got)
        });
        hub.set_delay_ms(1, 1);
        a.send(&pid("b"), b("f")).unwrap(); // outside any runtime
        assert_eq!(count(&got), 0);
        assert_eq!(hub.stats().overflow, 1);
    }
}
