//! The `Hamok` handle: what a service embeds. One handle is one peer of one cluster.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use figment::providers::Serialized;
use figment::Figment;
use ractor::{Actor, ActorRef};
use serde::Serialize;
use tokio::sync::{broadcast, oneshot, watch, Semaphore};

use crate::actors::node::{NodeArgs, NodeMsg, Peer, PeerArgs, PlantedBugs, Served};
use crate::actors::supervisor::{SupervisorActor, SupervisorArgs, SupervisorMsg};
use crate::config::HamokConfig;
use crate::error::HamokError;
use crate::events::HamokEvent;
use crate::raft::{LogIndex, PeerId, Role};
use crate::state_machine::{Op, StateMachine, StateMachineFactory};
use crate::stats::{Counters, HamokStats, JoinState, LeaderContact, PeerStatus, ReplicaProgress};
use crate::store::{FileLogStore, FileLogStoreOptions, LogStore, MemoryLogStore, SyncPolicy};
use crate::transport::memory::InProcessHub;
use crate::transport::{Inbound, Transport};

/// Most events buffered per subscriber; a subscriber that falls further behind loses the oldest.
const EVENT_CHANNEL_CAPACITY: usize = 4096;

/// The hub every peer built without an explicit transport shares: several `Hamok`s in one process
/// find each other with no broker at all.
fn default_hub() -> InProcessHub {
    static HUB: OnceLock<InProcessHub> = OnceLock::new();
    HUB.get_or_init(InProcessHub::new).clone()
}

/// How long `join` waits and how often it starts over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JoinOptions {
    /// How long one attempt waits to be admitted.
    pub timeout: Duration,
    /// Further attempts after the first times out.
    pub max_retry: u32,
}

/// Builds a [`Hamok`] peer.
///
/// Configuration precedence: defaults < the TOML file of [`HamokBuilder::config_file`] < `HAMOK_*`
/// environment variables < values set here in code.
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use hamok_runtime::Hamok;
/// let hamok = Hamok::builder().cluster_id("doc-builder").election_timeout_ms(200).build().await?;
/// hamok.join().await?; // alone: founds a cluster of one and leads it
/// assert!(hamok.is_leader());
/// hamok.close().await;
/// # Ok::<(), hamok_runtime::HamokError>(()) }).unwrap();
/// ```
pub struct HamokBuilder {
    overrides: Vec<(String, figment::value::Value)>,
    config_file: Option<PathBuf>,
    transport: Option<Arc<dyn Transport>>,
    store: Option<Box<dyn LogStore>>,
    kinds: BTreeMap<String, StateMachineFactory>,
    error: Option<HamokError>,
    /// Fixed randomness (tests only): see `HamokBuilder::seed`.
    seed: Option<u64>,
    bugs: PlantedBugs,
}

impl Default for HamokBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl HamokBuilder {
    /// A builder with every setting at its default.
    pub fn new() -> Self {
        HamokBuilder {
            overrides: Vec::new(),
            config_file: None,
            transport: None,
            store: None,
            kinds: BTreeMap::new(),
            error: None,
            seed: None,
            // A unit struct without the `testing` feature.
            #[allow(clippy::default_constructed_unit_structs)]
            bugs: PlantedBugs::default(),
        }
    }

    /// Draws every random choice of the peer (election timeouts, read contexts, its request nonce, its
    /// id when none is set) from `seed` instead of the system's randomness, so a test run replays.
    /// Only with the `testing` feature: two runs of one peer id must never share a nonce in production
    /// (a restarted peer's requests would be taken for retries of the previous run's).
    #[cfg(feature = "testing")]
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// Switches on planted bugs (hamok's own simulation tests; `testing` feature only).
    #[cfg(feature = "testing")]
    pub fn planted_bugs(mut self, bugs: PlantedBugs) -> Self {
        self.bugs = bugs;
        self
    }

    /// Reads settings from a TOML file (keys as in [`HamokConfig`]).
    pub fn config_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.config_file = Some(path.into());
        self
    }

    /// Sets any configuration key (dotted for nested keys, e.g. `raft.max_inflight_appends`).
    pub fn set<V: Serialize>(mut self, key: &str, value: V) -> Self {
        match figment::value::Value::serialize(value) {
            Ok(v) => self.overrides.push((key.to_string(), v)),
            Err(e) => {
                self.error = Some(HamokError::Config {
                    key: key.to_string(),
                    reason: e.to_string(),
                })
            }
        }
        self
    }

    /// This peer's id (default: a random uuid).
    pub fn peer_id(self, id: impl Into<String>) -> Self {
        self.set("peer_id", id.into())
    }

    /// Makes the peer durable: term, vote, log and snapshots are kept in `dir` (`storage.dir`), and a
    /// peer restarted on the same directory resumes from them, with its id. One directory per peer;
    /// a directory in use by a live peer is refused.
    ///
    /// ```no_run
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let hamok = hamok_runtime::HamokBuilder::new()
    ///     .storage_dir("/var/lib/orders/hamok")
    ///     .build()
    ///     .await?;
    /// # Ok::<(), hamok_runtime::HamokError>(()) }).unwrap();
    /// ```
    pub fn storage_dir(self, dir: impl Into<PathBuf>) -> Self {
        self.set("storage.dir", dir.into())
    }

    /// When a durable peer syncs its log (`storage.sync`; see [`SyncPolicy`] for what each policy can
    /// lose).
    pub fn storage_sync(self, policy: SyncPolicy) -> Self {
        self.set("storage.sync", policy)
    }

    /// The cluster to join (frames of other clusters on the same bus are ignored).
    pub fn cluster_id(self, id: impl Into<String>) -> Self {
        self.set("cluster_id", id.into())
    }

    /// See [`HamokConfig::election_timeout_ms`].
    pub fn election_timeout_ms(self, ms: u64) -> Self {
        self.set("election_timeout_ms", ms)
    }

    /// See [`HamokConfig::heartbeat_interval_ms`].
    pub fn heartbeat_interval_ms(self, ms: u64) -> Self {
        self.set("heartbeat_interval_ms", ms)
    }

    /// See [`HamokConfig::peer_max_idle_ms`].
    pub fn peer_max_idle_ms(self, ms: u64) -> Self {
        self.set("peer_max_idle_ms", ms)
    }

    /// See [`HamokConfig::request_timeout_ms`].
    pub fn request_timeout_ms(self, ms: u64) -> Self {
        self.set("request_timeout_ms", ms)
    }

    /// See [`HamokConfig::only_follower`].
    pub fn only_follower(self, yes: bool) -> Self {
        self.set("only_follower", yes)
    }

    /// See [`HamokConfig::auto_stop_on_no_remote_peers`].
    pub fn auto_stop_on_no_remote_peers(self, yes: bool) -> Self {
        self.set("auto_stop_on_no_remote_peers", yes)
    }

    /// Turns on frame authentication with a shared secret (see [`HamokConfig::cluster_key`]).
    pub fn cluster_key(self, secret: impl Into<String>) -> Self {
        self.set("cluster_key", secret.into())
    }

    /// See [`HamokConfig::snapshot_after_entries`].
    pub fn snapshot_after_entries(self, entries: u64) -> Self {
        self.set("snapshot_after_entries", entries)
    }

    /// How peers reach each other (default: a process-wide in-process hub).
    pub fn transport(mut self, transport: impl Transport) -> Self {
        self.transport = Some(Arc::new(transport));
        self
    }

    /// Where term, vote, snapshot and log are kept (default: in memory).
    pub fn log_store(mut self, store: impl LogStore) -> Self {
        self.store = Some(Box::new(store));
        self
    }

    /// Registers a kind of state machine (collections register theirs).
    pub fn register_kind(
        mut self,
        kind: &str,
        factory: impl Fn() -> Box<dyn StateMachine> + Send + Sync + 'static,
    ) -> Self {
        self.kinds.insert(kind.to_string(), Arc::new(factory));
        self
    }

    /// The configuration this builder would use.
    pub fn resolve_config(&self) -> Result<HamokConfig, HamokError> {
        if let Some(e) = &self.error {
            return Err(e.clone());
        }
        let mut figment: Figment = HamokConfig::figment(self.config_file.as_deref());
        for (key, value) in &self.overrides {
            figment = figment.merge(Serialized::default(key, value.clone()));
        }
        HamokConfig::from_figment(figment)
    }

    /// Starts the peer's actors. The peer does not take part in any cluster until [`Hamok::join`].
    pub async fn build(self) -> Result<Hamok, HamokError> {
        let config = self.resolve_config()?;
        let random: u128 = match self.seed {
            Some(seed) => {
                let mut rng = crate::raft::SeededRng::new(seed);
                (u128::from(rng.next_u64()) << 64) | u128::from(rng.next_u64())
            }
            None => uuid::Uuid::new_v4().as_u128(),
        };
        let mut store: Box<dyn LogStore> = match (self.store, &config.storage.dir) {
            (Some(store), _) => store,
            (None, Some(dir)) => Box::new(FileLogStore::open(
                dir,
                FileLogStoreOptions::from_config(&config.storage),
            )?),
            (None, None) => Box::new(MemoryLogStore::volatile()),
        };
        // The configured id, else the one a durable store was written by (a restarted peer keeps its
        // identity), else a new one.
        let peer_id = match (&config.peer_id, store.peer_id()) {
            (Some(id), _) => PeerId::from(id.clone()),
            (None, Some(stored)) => stored,
            (None, None) => PeerId::from(uuid::Uuid::from_u128(random).to_string()),
        };
        store.bind_peer(&peer_id)?;
        let transport = self
            .transport
            .unwrap_or_else(|| Arc::new(default_hub()) as Arc<dyn Transport>);
        let (view_tx, view_rx) = watch::channel(PeerStatus::initial());
        let (events, _) = broadcast::channel(EVENT_CHANNEL_CAPACITY);
        let counters = Arc::new(Counters::default());
        let contact = Arc::new(LeaderContact::new());

        // Frames reach the node actor straight from the transport, bounded by `max_inbound_frames`.
        let node_slot: Arc<OnceLock<ActorRef<NodeMsg>>> = Arc::new(OnceLock::new());
        let slot = node_slot.clone();
        let inbound = Inbound::new(config.max_inbound_frames, move |frame| {
            if let Some(node) = slot.get() {
                let _ = node.send_message(NodeMsg::Inbound(frame));
            }
        });
        // The peer is built here, not in its actor: a store that cannot be loaded fails `build` with
        // its typed error.
        let peer = Peer::new(
            PeerArgs {
                id: peer_id.clone(),
                config: config.clone(),
                store,
                kinds: self.kinds,
                counters: counters.clone(),
                nonce: random as u64,
                seed: (random >> 64) as u64,
                bugs: self.bugs,
                events: events.clone(),
            },
            0,
        )?;
        let node_args = NodeArgs {
            peer,
            tick_interval_ms: config.tick_interval_ms,
            inbound: inbound.clone(),
            view: view_tx,
            events: events.clone(),
            counters: counters.clone(),
            contact: contact.clone(),
        };
        let (node_tx, node_rx) = oneshot::channel();
        let (supervisor, _) = Actor::spawn(
            None,
            SupervisorActor,
            SupervisorArgs {
                node: node_args,
                transport,
                cluster: config.cluster_id.clone(),
                peer: peer_id.clone(),
                inbound: inbound.clone(),
                node_ref: node_tx,
            },
        )
        .await
        .map_err(|e| HamokError::transport("cannot start peer", e))?;
        let node = node_rx.await.map_err(|_| HamokError::Closed)?;
        let _ = node_slot.set(node.clone());
        Ok(Hamok {
            inner: Arc::new(Inner {
                seeded: self.seed.is_some(),
                in_flight: Semaphore::new(config.max_pending_requests),
                peer_id,
                config,
                node,
                supervisor,
                view: view_rx,
                events,
                counters,
                contact,
                inbound,
            }),
        })
    }
}

struct Inner {
    /// A seeded peer (hamok's own simulation) reads a wall clock derived from its paused clock.
    seeded: bool,
    /// Requests and linearizable reads in flight through this peer. The node actor's mailbox is not
    /// bounded, so callers wait here (backpressure) rather than queue there without limit.
    in_flight: Semaphore,
    peer_id: PeerId,
    config: HamokConfig,
    node: ActorRef<NodeMsg>,
    supervisor: ActorRef<SupervisorMsg>,
    view: watch::Receiver<PeerStatus>,
    events: broadcast::Sender<HamokEvent>,
    counters: Arc<Counters>,
    contact: Arc<LeaderContact>,
    inbound: Inbound,
}

/// One peer of a hamok cluster. Cheap to clone; every clone is the same peer.
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use hamok_runtime::Hamok;
/// use hamok_runtime::transport::memory::InProcessHub;
///
/// let hub = InProcessHub::new();
/// let a = Hamok::builder().peer_id("a").transport(hub.clone()).build().await?;
/// let b = Hamok::builder().peer_id("b").transport(hub.clone()).build().await?;
/// let (ja, jb) = tokio::join!(a.join(), b.join());
/// ja?;
/// jb?;
/// let leader = a.wait_until_leader(std::time::Duration::from_secs(5)).await?;
/// assert_eq!(b.leader_id(), Some(leader));
/// # a.close().await; b.close().await;
/// # Ok::<(), hamok_runtime::HamokError>(()) }).unwrap();
/// ```
#[derive(Clone)]
pub struct Hamok {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Hamok {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hamok")
            .field("peer_id", &self.inner.peer_id)
            .field("state", &self.state())
            .finish()
    }
}

impl Hamok {
    /// Starts building a peer.
    pub fn builder() -> HamokBuilder {
        HamokBuilder::new()
    }

    fn send(&self, msg: NodeMsg) -> Result<(), HamokError> {
        self.inner
            .node
            .send_message(msg)
            .map_err(|_| HamokError::Closed)
    }

    /// Waits for room among the requests in flight (see `Inner::in_flight`).
    async fn permit(
        &self,
        timeout: Duration,
    ) -> Result<tokio::sync::SemaphorePermit<'_>, HamokError> {
        match tokio::time::timeout(timeout, self.inner.in_flight.acquire()).await {
            Ok(Ok(permit)) => Ok(permit),
            Ok(Err(_)) => Err(HamokError::Closed),
            Err(_) => Err(HamokError::Busy("too many requests in flight")),
        }
    }

    fn view(&self) -> PeerStatus {
        self.inner.view.borrow().clone()
    }

    /// Waits until `pred` holds on the peer's view, or `timeout`.
    async fn wait_for(
        &self,
        timeout: Duration,
        pred: impl Fn(&PeerStatus) -> bool,
    ) -> Result<PeerStatus, HamokError> {
        let mut rx = self.inner.view.clone();
        let wait = async {
            loop {
                {
                    let v = rx.borrow_and_update();
                    if pred(&v) {
                        return Ok(v.clone());
                    }
                    if v.closed {
                        return Err(HamokError::Closed);
                    }
                }
                if rx.changed().await.is_err() {
                    return Err(HamokError::Closed);
                }
            }
        };
        tokio::time::timeout(timeout, wait)
            .await
            .map_err(|_| HamokError::timeout(timeout))?
    }

    /// Joins a cluster with the configured timeout and retries (see [`Hamok::join_with`]).
    pub async fn join(&self) -> Result<(), HamokError> {
        self.join_with(JoinOptions {
            timeout: Duration::from_millis(self.inner.config.join_timeout_ms),
            max_retry: self.inner.config.join_max_retry,
        })
        .await
    }

    /// Finds the cluster over the transport and joins it: as a learner first, then as a voter once caught
    /// up (a learner for good when `only_follower`). When no cluster answers within the discovery window,
    /// the lowest-id peer among those starting together founds one and the others join it. Each attempt
    /// waits `timeout`; after `max_retry` further attempts it fails with [`HamokError::Timeout`].
    pub async fn join_with(&self, options: JoinOptions) -> Result<(), HamokError> {
        let mut last = HamokError::timeout(options.timeout);
        for _ in 0..=options.max_retry {
            self.send(NodeMsg::Join)?;
            match self
                .wait_for(options.timeout, |v| v.join_state == JoinState::Joined)
                .await
            {
                Ok(_) => return Ok(()),
                Err(HamokError::Closed) => return Err(HamokError::Closed),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// Leaves the cluster: hands leadership over first when leading, removes itself through the log and
    /// tells the others. Requests still waiting fail with [`HamokError::Interrupted`]. The peer stays
    /// usable: `join` again rejoins the cluster as a learner first, with the log, term and vote it kept
    /// (a peer never forgets what it acknowledged or voted for under an identity the cluster knows).
    pub async fn leave(&self) -> Result<(), HamokError> {
        let (tx, rx) = oneshot::channel();
        self.send(NodeMsg::Leave(tx))?;
        rx.await.map_err(|_| HamokError::Closed)?
    }

    /// Stops the peer's actors. Pending requests fail with [`HamokError::Interrupted`] (they may still
    /// be applied by the cluster), later calls with [`HamokError::Closed`]. Does not leave the
    /// cluster first (call [`Hamok::leave`] for that); the others remove it once it is silent.
    pub async fn close(&self) {
        let _ = self.inner.supervisor.stop_and_wait(None, None).await;
        // Wait for the node to finish publishing that it is closed.
        let _ = self.wait_for(Duration::from_secs(5), |v| v.closed).await;
    }

    /// Whether the peer is closed.
    pub fn is_closed(&self) -> bool {
        self.inner.view.borrow().closed
    }

    /// Waits until a leader is known and returns it.
    pub async fn wait_until_leader(&self, timeout: Duration) -> Result<PeerId, HamokError> {
        let v = self
            .wait_for(timeout, |v| {
                v.raft.leader.is_some()
                    && matches!(v.join_state, JoinState::Joined | JoinState::Leaving)
            })
            .await?;
        Ok(v.raft.leader.expect("checked"))
    }

    /// Waits until this peer has applied everything it knows to be committed.
    pub async fn wait_until_commit_head(&self, timeout: Duration) -> Result<LogIndex, HamokError> {
        let target = self.view().raft.commit_index;
        let v = self
            .wait_for(timeout, |v| v.raft.applied_index >= target)
            .await?;
        Ok(v.raft.applied_index)
    }

    /// Waits until this peer has applied everything the leader had committed when the call was made
    /// (a ReadIndex round): after it, local reads see every write acknowledged before the call.
    /// Returns the index this peer had applied when the barrier passed.
    ///
    /// Fails, and then promises nothing about local reads, when the round cannot complete: the peer is
    /// not joined ([`HamokError::NotJoined`]), no leader confirmed a read index in time
    /// ([`HamokError::Timeout`]), or the peer closed ([`HamokError::Closed`]).
    pub async fn wait_until_linearizable(&self, timeout: Duration) -> Result<LogIndex, HamokError> {
        let (tx, rx) = oneshot::channel();
        self.query_raw("", true, timeout, move |served| {
            let _ = tx.send(served.map(|s| s.applied_index));
        })?;
        // The node answers at the deadline at the latest; the outer timeout only guards a stuck actor.
        match tokio::time::timeout(timeout + Duration::from_millis(500), rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(HamokError::Closed),
            Err(_) => Err(HamokError::timeout(timeout)),
        }
    }

    /// Whether this peer leads its cluster.
    pub fn is_leader(&self) -> bool {
        let v = self.inner.view.borrow();
        v.raft.role == Role::Leader && v.raft.leader.as_ref() == Some(&self.inner.peer_id)
    }

    /// The leader this peer knows of.
    pub fn leader_id(&self) -> Option<PeerId> {
        self.inner.view.borrow().raft.leader.clone()
    }

    /// This peer's role.
    pub fn state(&self) -> Role {
        self.inner.view.borrow().raft.role
    }

    /// Whether this peer is part of a cluster.
    pub fn is_joined(&self) -> bool {
        self.inner.view.borrow().join_state == JoinState::Joined
    }

    /// This peer's id.
    pub fn local_peer_id(&self) -> &PeerId {
        &self.inner.peer_id
    }

    /// The other members of the cluster (voters and learners), as of the committed configuration.
    pub fn remote_peer_ids(&self) -> Vec<PeerId> {
        self.inner
            .view
            .borrow()
            .raft
            .membership
            .members()
            .filter(|p| **p != self.inner.peer_id)
            .cloned()
            .collect()
    }

    /// The configuration in force.
    pub fn config(&self) -> &HamokConfig {
        &self.inner.config
    }

    /// Wall-clock time in milliseconds since the Unix epoch, as this peer reads it (for stamps that
    /// must be deterministic in the log: the reader puts the value in its command). A peer built with a
    /// seed (hamok's own simulation) reads a fixed epoch plus its tokio clock, so its runs repeat.
    pub fn wall_clock_ms(&self) -> u64 {
        if self.inner.seeded {
            /// 2023-11-14T22:13:20Z: any fixed instant will do.
            const SEEDED_EPOCH_MS: u64 = 1_700_000_000_000;
            let elapsed = self.inner.contact.started().elapsed().as_millis();
            return SEEDED_EPOCH_MS.saturating_add(u64::try_from(elapsed).unwrap_or(u64::MAX));
        }
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    /// How long ago this peer last heard from the leader of its cluster (zero while it leads). A peer
    /// that has not heard from a leader for `peer_max_idle_ms` is removed by the cluster; a lock holder
    /// watches this to let go of its lock before that can happen (see the lock table of
    /// `hamok-collections`).
    pub fn leader_contact_age(&self) -> Duration {
        self.inner.contact.age()
    }

    /// How far each member has replicated, as this peer sees it while it leads (empty on a follower:
    /// ask the leader's handle or gateway). Sorted by peer id.
    pub async fn replication(&self) -> Result<Vec<ReplicaProgress>, HamokError> {
        let (tx, rx) = oneshot::channel();
        self.send(NodeMsg::Replication(tx))?;
        let matches = rx.await.map_err(|_| HamokError::Closed)?;
        let last = matches.iter().map(|(_, m)| *m).max().unwrap_or(0);
        let mut out: Vec<ReplicaProgress> = matches
            .into_iter()
            .map(|(peer, match_index)| ReplicaProgress {
                peer,
                match_index,
                lag: last - match_index,
            })
            .collect();
        out.sort_by(|a, b| a.peer.cmp(&b.peer));
        Ok(out)
    }

    /// This peer's published status and its counters.
    pub fn stats(&self) -> HamokStats {
        HamokStats {
            status: self.view(),
            counters: self.inner.counters.values(self.inner.inbound.dropped()),
        }
    }

    /// A watch of this peer's published status (role, term, leader, indices, membership, join state):
    /// latest-value semantics, never lagging, fed by the node itself.
    pub fn status_watch(&self) -> watch::Receiver<PeerStatus> {
        self.inner.view.clone()
    }

    /// Subscribes to this peer's events.
    pub fn events(&self) -> broadcast::Receiver<HamokEvent> {
        self.inner.events.subscribe()
    }

    /// Submits an operation through the log; resolves with the state machine's response once this peer
    /// has applied it (read-your-writes). Retried across leader changes and applied at most once.
    pub async fn submit_op(&self, op: Op<'static>) -> Result<Bytes, HamokError> {
        let timeout = Duration::from_millis(self.inner.config.request_timeout_ms);
        self.submit_op_with_timeout(op, timeout).await
    }

    /// [`Hamok::submit_op`] with an explicit timeout.
    pub async fn submit_op_with_timeout(
        &self,
        op: Op<'static>,
        timeout: Duration,
    ) -> Result<Bytes, HamokError> {
        let _permit = self.permit(timeout).await?;
        let (tx, rx) = oneshot::channel();
        self.send(NodeMsg::Submit {
            op,
            timeout,
            reply: tx,
        })?;
        // The node answers at the deadline at the latest; the outer timeout only guards a stuck actor.
        match tokio::time::timeout(timeout + Duration::from_millis(500), rx).await {
            Ok(Ok(result)) => result,
            // The node went away with the request in its hands.
            Ok(Err(_)) => Err(HamokError::Interrupted("the peer stopped")),
            Err(_) => Err(HamokError::timeout(timeout)),
        }
    }

    /// Submits an opaque command to the state machine of `collection`.
    pub async fn submit(
        &self,
        collection: &str,
        command: impl Into<Vec<u8>>,
    ) -> Result<Bytes, HamokError> {
        self.submit_op(Op::Apply {
            collection: collection.to_string().into(),
            payload: command.into().into(),
            fence: None,
        })
        .await
    }

    /// Creates collection `id` of `kind` through the log (a no-op if it exists with that kind; an error if it
    /// exists with another).
    pub async fn create_collection(&self, id: &str, kind: &str) -> Result<(), HamokError> {
        self.submit_op(Op::Create {
            collection: id.to_string().into(),
            kind: kind.to_string().into(),
        })
        .await
        .map(|_| ())
    }

    fn query_raw(
        &self,
        collection: &str,
        linearizable: bool,
        timeout: Duration,
        f: impl FnOnce(Result<Served<'_>, HamokError>) + Send + 'static,
    ) -> Result<(), HamokError> {
        self.send(NodeMsg::Query {
            collection: collection.to_string(),
            linearizable,
            timeout,
            f: Box::new(f),
        })
    }

    /// Runs `f` on the state machine of `collection` inside the node and returns its result. With
    /// `linearizable`, `f` runs only after a ReadIndex round, so it sees every write acknowledged before
    /// the call; otherwise it sees this peer's applied state (fast, possibly stale).
    pub async fn query<R: Send + 'static>(
        &self,
        collection: &str,
        linearizable: bool,
        f: impl FnOnce(Option<&dyn StateMachine>) -> R + Send + 'static,
    ) -> Result<R, HamokError> {
        let timeout = Duration::from_millis(self.inner.config.request_timeout_ms);
        let _permit = self.permit(timeout).await?;
        let (tx, rx) = oneshot::channel();
        self.query_raw(collection, linearizable, timeout, move |r| {
            let _ = tx.send(r.map(|served| f(served.machine)));
        })?;
        match tokio::time::timeout(timeout + Duration::from_millis(500), rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(HamokError::Closed),
            Err(_) => Err(HamokError::timeout(timeout)),
        }
    }

    /// Runs `hook` on the state machine of `collection` now (if it exists) and whenever it is recreated
    /// (created through the log, or restored from a snapshot). Collections attach local observers so.
    pub fn attach(
        &self,
        collection: &str,
        hook: impl Fn(&mut dyn StateMachine) + Send + Sync + 'static,
    ) -> Result<(), HamokError> {
        self.send(NodeMsg::Attach {
            collection: collection.to_string(),
            hook: Arc::new(hook),
        })
    }

    /// Handles direct (not replicated, not ordered) messages of `channel` from other peers.
    pub fn on_direct(
        &self,
        channel: &str,
        handler: impl Fn(PeerId, Bytes) + Send + Sync + 'static,
    ) -> Result<(), HamokError> {
        self.send(NodeMsg::OnDirect {
            channel: channel.to_string(),
            handler: Arc::new(handler),
        })
    }

    /// Sends a direct message of `channel` to one peer, or to all with `None`. Best effort.
    pub fn send_direct(
        &self,
        to: Option<PeerId>,
        channel: &str,
        payload: Bytes,
    ) -> Result<(), HamokError> {
        self.send(NodeMsg::SendDirect {
            to,
            channel: channel.to_string(),
            payload,
        })
    }
}
