//! An in-process transport: several peers of one process (or one test) share an [`InProcessHub`], which
//! hands each frame straight to the target peer's [`Inbound`].
//!
//! With no fault configured, [`Link::send`] is a snapshot lookup and a direct
//! [`Inbound::deliver`] call: no task, no channel, no copy of the frame. The hub also has test controls
//! to inject network faults: partitions ([`InProcessHub::partition`], [`InProcessHub::isolate`]),
//! one-way blocks ([`InProcessHub::block`]), random loss and duplication (driven by a seeded generator,
//! so a run is reproducible), delayed delivery and forced disconnects ([`InProcessHub::disconnect`]).
//!
//! This module holds the hub and its links; the fault configuration and the per-frame routing
//! decisions are in `faults.rs`, the delay queue task in `delay.rs`, the counters ([`HubStats`]) in
//! `stats.rs`.
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

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use bytes::Bytes;

use super::{BoxFuture, CloseSignal, Inbound, Link, Transport};
use crate::error::HamokError;
use crate::raft::{PeerId, SeededRng};

mod delay;
mod faults;
mod stats;

use delay::DelayQueue;
pub use delay::MAX_DELAYED_IN_FLIGHT;
use faults::Faults;
pub use stats::HubStats;
use stats::{bump, Counters};

/// The seed of [`InProcessHub::new`]; use [`InProcessHub::with_seed`] for another sequence of random
/// losses, duplicates and delays.
pub const DEFAULT_SEED: u64 = 0x6861_6d6f_6b5f_6875; // "hamok_hu"

/// Locks a mutex, ignoring poisoning (the protected data stays consistent: every critical section
/// either completes or changes nothing that matters).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One connected peer.
#[derive(Clone)]
struct Registered {
    link_id: u64,
    inbound: Inbound,
    signal: Arc<CloseSignal>,
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
mod tests;
