//! [`HamokEmitter`]: distributed events with a replicated subscription table.
//!
//! # Design
//!
//! - **Subscriptions are replicated**: the table `event -> {peer -> metadata}` is a state machine, so
//!   every peer knows who listens to what. The first local handler of an event on a peer submits a
//!   `Subscribe` (the subscribing peer is the command's submitter, taken from the log, not from the
//!   payload); [`HamokEmitter::unsubscribe`] removes this peer from *that event only* (the reference
//!   removed it from all of them).
//! - **Messages are not replicated**: [`HamokEmitter::publish`] and [`HamokEmitter::notify`] send a
//!   direct message ([`Hamok::send_direct`]) to each subscribed peer. A receiving peer runs its local
//!   handlers and, for a publish, answers with an ack; `publish` returns the peers that acknowledged
//!   within its timeout, so a dead subscriber costs the timeout but never fails the call for the living.
//!   Handlers run on a task of the emitter, never inside the node actor, and a panicking handler is
//!   caught (logged) without stopping delivery.
//! - **Dead subscribers are cleaned through the log**: the state machine API has no membership callback
//!   yet, so the leader checks the table against the cluster's members ([`Hamok::remote_peer_ids`]) when
//!   a peer leaves (`RemotePeerLeft`), when it becomes leader, and every second, and submits a
//!   `RemovePeers` command for subscribers that are no longer members. A peer that is removed and joins
//!   again re-submits its subscriptions when it is joined again.
//!
//! Background work (receiving direct messages, acks, cleanup) runs on one tokio task per emitter and
//! peer, which ends when every handle of the emitter on that peer is dropped or the peer closes. It is a
//! plain task rather than a ractor actor because it has no state to recover after a crash: user handlers
//! — the only code that can panic — are isolated with `catch_unwind`, and the replicated state lives in
//! the node actor, which the runtime supervises.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use hamok_runtime::raft::PeerId;
use hamok_runtime::state_machine::{ApplyContext, StateMachine};
use hamok_runtime::{Hamok, HamokError, HamokEvent};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::common::{
    decode, decode_command, encode, write_lock, Collection, Core, Events, Handle, Local, Raw,
    Types, Wire,
};

/// The kind an emitter is registered under.
pub const EMITTER_KIND: &str = "hamok.emitter";

/// How often the leader checks the subscription table for peers that are no longer members.
const CLEANUP_INTERVAL: Duration = Duration::from_secs(1);

/// Most direct messages queued for an emitter's task on one peer; beyond it they are dropped (a
/// publisher then sees no ack from this peer).
const INBOX_CAPACITY: usize = 4096;

/// The replicated subscription table.
#[derive(Default)]
pub(crate) struct EmitterState {
    subs: BTreeMap<String, BTreeMap<PeerId, Bytes>>,
}

#[derive(Serialize, Deserialize)]
enum EmitterCmd {
    /// Subscribes the submitting peer to `event` (no change if already subscribed); answers whether it
    /// was added.
    Subscribe { event: String, metadata: Bytes },
    /// Unsubscribes the submitting peer from `event`; answers whether it was subscribed.
    Unsubscribe { event: String },
    /// Unsubscribes the submitting peer from every event; answers how many subscriptions went.
    UnsubscribeAll,
    /// Sets the submitting peer's metadata for `event` if it is subscribed and (when given) the current
    /// metadata equals `expected`; answers whether it did.
    UpdateMetadata {
        event: String,
        new: Bytes,
        expected: Option<Bytes>,
    },
    /// Removes every subscription of `peers` (cleanup of departed peers); answers how many went.
    RemovePeers(Vec<PeerId>),
}

/// Direct (not replicated) messages between the emitter tasks of two peers.
#[derive(Serialize, Deserialize)]
enum DirectMsg {
    Publish {
        req: u64,
        event: String,
        payload: Bytes,
    },
    Notify {
        event: String,
        payload: Bytes,
    },
    Ack {
        req: u64,
    },
}

type RawHandler = Arc<dyn Fn(&PeerId, &[u8]) + Send + Sync>;

struct LocalEvent {
    metadata: Bytes,
    handlers: Vec<(u64, RawHandler)>,
}

struct PendingPublish {
    remaining: BTreeSet<PeerId>,
    acked: Vec<PeerId>,
    done: Option<oneshot::Sender<()>>,
}

/// What the emitter's handles on one peer share besides the table.
pub(crate) struct EmitterExtra {
    channel: String,
    local_events: Mutex<BTreeMap<String, LocalEvent>>,
    next_id: AtomicU64,
    pending: Mutex<HashMap<u64, PendingPublish>>,
    inbox: Mutex<Option<mpsc::Receiver<(PeerId, Bytes)>>>,
    inbox_tx: mpsc::Sender<(PeerId, Bytes)>,
    received: AtomicU64,
    sent: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl EmitterExtra {
    pub(crate) fn new(id: &str) -> Self {
        let (tx, rx) = mpsc::channel(INBOX_CAPACITY);
        EmitterExtra {
            channel: format!("hamok.emitter/{id}"),
            local_events: Mutex::new(BTreeMap::new()),
            next_id: AtomicU64::new(1),
            pending: Mutex::new(HashMap::new()),
            inbox: Mutex::new(Some(rx)),
            inbox_tx: tx,
            received: AtomicU64::new(0),
            sent: AtomicU64::new(0),
        }
    }

    /// Runs the local handlers of `event`; answers whether there was any.
    fn dispatch(&self, from: &PeerId, event: &str, payload: &[u8]) -> bool {
        let handlers: Vec<RawHandler> = lock(&self.local_events)
            .get(event)
            .map(|e| e.handlers.iter().map(|(_, h)| h.clone()).collect())
            .unwrap_or_default();
        for h in &handlers {
            if std::panic::catch_unwind(AssertUnwindSafe(|| h(from, payload))).is_err() {
                tracing::warn!(event, "an emitter handler panicked");
            }
        }
        self.received.fetch_add(1, Ordering::Relaxed);
        !handlers.is_empty()
    }

    fn on_ack(&self, from: PeerId, req: u64) {
        let mut pending = lock(&self.pending);
        if let Some(p) = pending.get_mut(&req) {
            if p.remaining.remove(&from) {
                p.acked.push(from);
            }
            if p.remaining.is_empty() {
                if let Some(done) = p.done.take() {
                    let _ = done.send(());
                }
            }
        }
    }
}

/// The state machine of an emitter.
#[derive(Default)]
pub(crate) struct EmitterMachine {
    core: Core<EmitterState, EmitterExtra>,
}

impl Collection for EmitterMachine {
    type State = EmitterState;
    type Extra = EmitterExtra;
    fn core(&self) -> &Core<EmitterState, EmitterExtra> {
        &self.core
    }
    fn core_mut(&mut self) -> &mut Core<EmitterState, EmitterExtra> {
        &mut self.core
    }
}

fn sub_key(event: &str, peer: &PeerId) -> Result<Bytes, HamokError> {
    encode(&(event, peer))
}

impl EmitterMachine {
    fn exec(&mut self, client: &PeerId, cmd: EmitterCmd) -> Result<Bytes, HamokError> {
        let mut events = self.core.listening().then(Vec::new);
        let response = {
            let mut state = write_lock(&self.core.state);
            let subs = &mut state.subs;
            match cmd {
                EmitterCmd::Subscribe { event, metadata } => {
                    let peers = subs.entry(event.clone()).or_default();
                    let added = !peers.contains_key(client);
                    if added {
                        peers.insert(client.clone(), metadata.clone());
                        if let Some(ev) = events.as_mut() {
                            ev.push(Raw::Insert {
                                key: sub_key(&event, client)?,
                                value: metadata,
                            });
                        }
                    }
                    encode(&added)
                }
                EmitterCmd::Unsubscribe { event } => {
                    let old = subs.get_mut(&event).and_then(|p| p.remove(client));
                    if subs.get(&event).is_some_and(|p| p.is_empty()) {
                        subs.remove(&event);
                    }
                    if let (Some(ev), Some(value)) = (events.as_mut(), &old) {
                        ev.push(Raw::Remove {
                            key: sub_key(&event, client)?,
                            value: value.clone(),
                        });
                    }
                    encode(&old.is_some())
                }
                EmitterCmd::UnsubscribeAll => {
                    let n = remove_peers(subs, std::slice::from_ref(client), &mut events)?;
                    encode(&n)
                }
                EmitterCmd::RemovePeers(peers) => {
                    let n = remove_peers(subs, &peers, &mut events)?;
                    encode(&n)
                }
                EmitterCmd::UpdateMetadata {
                    event,
                    new,
                    expected,
                } => {
                    let current = subs.get_mut(&event).and_then(|p| p.get_mut(client));
                    let hit = match current {
                        Some(current) if expected.as_ref().is_none_or(|e| e == current) => {
                            let old = std::mem::replace(current, new.clone());
                            if let Some(ev) = events.as_mut() {
                                ev.push(Raw::Update {
                                    key: sub_key(&event, client)?,
                                    old,
                                    new,
                                });
                            }
                            true
                        }
                        _ => false,
                    };
                    encode(&hit)
                }
            }
        };
        self.core.emit(events.unwrap_or_default());
        response
    }
}

fn remove_peers(
    subs: &mut BTreeMap<String, BTreeMap<PeerId, Bytes>>,
    peers: &[PeerId],
    events: &mut Option<Vec<Raw>>,
) -> Result<u64, HamokError> {
    let mut n = 0;
    for (event, subscribers) in subs.iter_mut() {
        for peer in peers {
            if let Some(value) = subscribers.remove(peer) {
                n += 1;
                if let Some(ev) = events.as_mut() {
                    ev.push(Raw::Remove {
                        key: sub_key(event, peer)?,
                        value,
                    });
                }
            }
        }
    }
    subs.retain(|_, p| !p.is_empty());
    Ok(n)
}

impl StateMachine for EmitterMachine {
    fn kind(&self) -> &str {
        EMITTER_KIND
    }

    fn apply(&mut self, ctx: &ApplyContext, command: &[u8]) -> Result<Bytes, HamokError> {
        match decode_command(command)? {
            Wire::Init => self.core.init(),
            Wire::Op(cmd) => self.exec(&ctx.client, cmd),
        }
    }

    fn snapshot(&self) -> Result<Bytes, HamokError> {
        let state = self.core.state.read().unwrap_or_else(|e| e.into_inner());
        encode(&(self.core.initialized, &state.subs))
    }

    fn restore(&mut self, data: &[u8]) -> Result<(), HamokError> {
        let (initialized, subs): (bool, BTreeMap<String, BTreeMap<PeerId, Bytes>>) = decode(data)?;
        self.core.initialized = initialized;
        write_lock(&self.core.state).subs = subs;
        Ok(())
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
}

/// A change of an emitter's replicated subscription table, as applied on this peer.
#[derive(Clone, Debug, PartialEq)]
pub enum SubscriptionEvent<M> {
    /// `peer` subscribed to `event`.
    Added {
        /// The event name.
        event: String,
        /// The subscriber.
        peer: PeerId,
        /// Its metadata.
        metadata: M,
    },
    /// `peer`'s metadata for `event` changed.
    Updated {
        /// The event name.
        event: String,
        /// The subscriber.
        peer: PeerId,
        /// The previous metadata.
        old: M,
        /// The new metadata.
        new: M,
    },
    /// `peer` no longer subscribes to `event` (unsubscribed, or removed as departed).
    Removed {
        /// The event name.
        event: String,
        /// The former subscriber.
        peer: PeerId,
        /// Its metadata.
        metadata: M,
    },
    /// The handle (or its peer) was closed.
    Close,
}

fn decode_event<M: DeserializeOwned>(raw: Raw) -> Result<SubscriptionEvent<M>, HamokError> {
    Ok(match raw {
        Raw::Insert { key, value } => {
            let (event, peer): (String, PeerId) = decode(&key)?;
            SubscriptionEvent::Added {
                event,
                peer,
                metadata: decode(&value)?,
            }
        }
        Raw::Update { key, old, new } => {
            let (event, peer): (String, PeerId) = decode(&key)?;
            SubscriptionEvent::Updated {
                event,
                peer,
                old: decode(&old)?,
                new: decode(&new)?,
            }
        }
        Raw::Remove { key, value } => {
            let (event, peer): (String, PeerId) = decode(&key)?;
            SubscriptionEvent::Removed {
                event,
                peer,
                metadata: decode(&value)?,
            }
        }
        Raw::Clear | Raw::Empty | Raw::NotEmpty | Raw::Close => SubscriptionEvent::Close,
    })
}

/// Identifies one local handler, to remove it alone ([`HamokEmitter::remove_handler`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HandlerId(u64);

/// Distributed events of payload type `E`, with subscription metadata of type `M`. Cheap to clone.
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use hamok_collections::{register_kinds, HamokCollections};
/// use hamok_runtime::Hamok;
/// let hamok = register_kinds(Hamok::builder().cluster_id("doc-emitter")).build().await?;
/// hamok.join().await?;
/// let emitter = hamok.create_emitter::<String, ()>("chat").await?;
/// let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
/// emitter.subscribe("message", move |_from, text: String| { let _ = tx.send(text); }, ()).await?;
/// let acked = emitter.publish("message", &"hello".to_string()).await?;
/// assert_eq!(acked, vec![hamok.local_peer_id().clone()]);
/// assert_eq!(rx.recv().await.as_deref(), Some("hello"));
/// hamok.close().await;
/// # Ok::<(), hamok_runtime::HamokError>(()) }).unwrap();
/// ```
pub struct HamokEmitter<E, M = ()> {
    handle: Handle<EmitterState, EmitterExtra>,
    publish_timeout: Duration,
    _types: Types<(E, M)>,
}

impl<E, M> Clone for HamokEmitter<E, M> {
    fn clone(&self) -> Self {
        HamokEmitter {
            handle: self.handle.clone(),
            publish_timeout: self.publish_timeout,
            _types: Types::default(),
        }
    }
}

impl<E, M> std::fmt::Debug for HamokEmitter<E, M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HamokEmitter")
            .field("id", &self.handle.local.id)
            .finish()
    }
}

/// Counters of an emitter on this peer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EmitterStats {
    /// Events this peer subscribes to.
    pub subscriptions: usize,
    /// Publish/notify messages delivered to this peer's handlers.
    pub received: u64,
    /// Publish/notify messages this peer sent (one per target peer).
    pub sent: u64,
}

type EmitterLocal = Local<EmitterState, EmitterExtra>;

/// Starts the emitter's background task on this peer (once per local handle group).
pub(crate) fn start(hamok: &Hamok, local: &Arc<EmitterLocal>) -> Result<(), HamokError> {
    let Some(mut inbox) = lock(&local.extra.inbox).take() else {
        return Ok(()); // already started
    };
    let tx = local.extra.inbox_tx.clone();
    hamok.on_direct(&local.extra.channel, move |from, payload| {
        // Runs inside the node actor: never block, never run user code here.
        let _ = tx.try_send((from, payload));
    })?;
    let weak = Arc::downgrade(local);
    let hamok = hamok.clone();
    let mut events = hamok.events();
    tokio::spawn(async move {
        let mut cleanup = tokio::time::interval(CLEANUP_INTERVAL);
        cleanup.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut rejoining = false;
        loop {
            tokio::select! {
                msg = inbox.recv() => {
                    let Some((from, bytes)) = msg else { return };
                    let Some(local) = weak.upgrade() else { return };
                    on_direct(&hamok, &local, from, &bytes);
                }
                _ = cleanup.tick() => {
                    let Some(local) = weak.upgrade() else { return };
                    if hamok.is_closed() { return; }
                    cleanup_departed(&hamok, &local).await;
                }
                ev = events.recv() => {
                    let Some(local) = weak.upgrade() else { return };
                    match ev {
                        Ok(HamokEvent::Close) | Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                        Ok(HamokEvent::RemotePeerLeft(_)) | Ok(HamokEvent::Leader) => {
                            cleanup_departed(&hamok, &local).await;
                        }
                        Ok(HamokEvent::Rejoining) => rejoining = true,
                        Ok(HamokEvent::Joined) if rejoining => {
                            rejoining = false;
                            resubscribe(&hamok, &local).await;
                        }
                        _ => {}
                    }
                }
            }
        }
    });
    Ok(())
}

fn on_direct(hamok: &Hamok, local: &EmitterLocal, from: PeerId, bytes: &[u8]) {
    let msg: DirectMsg = match decode(bytes) {
        Ok(m) => m,
        Err(e) => {
            tracing::debug!(%from, "undecodable emitter message: {e}");
            return;
        }
    };
    match msg {
        DirectMsg::Publish {
            req,
            event,
            payload,
        } => {
            if local.extra.dispatch(&from, &event, &payload) {
                if let Ok(ack) = encode(&DirectMsg::Ack { req }) {
                    let _ = hamok.send_direct(Some(from), &local.extra.channel, ack);
                }
            }
        }
        DirectMsg::Notify { event, payload } => {
            local.extra.dispatch(&from, &event, &payload);
        }
        DirectMsg::Ack { req } => local.extra.on_ack(from, req),
    }
}

/// Leader only: removes the subscriptions of peers that are no longer members.
async fn cleanup_departed(hamok: &Hamok, local: &EmitterLocal) {
    if !hamok.is_leader() {
        return;
    }
    let mut members: BTreeSet<PeerId> = hamok.remote_peer_ids().into_iter().collect();
    members.insert(hamok.local_peer_id().clone());
    let departed: Vec<PeerId> = local.read(|s| {
        s.subs
            .values()
            .flat_map(|p| p.keys())
            .filter(|p| !members.contains(*p))
            .cloned()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect()
    });
    if departed.is_empty() {
        return;
    }
    let Ok(cmd) = encode(&Wire::Op(EmitterCmd::RemovePeers(departed))) else {
        return;
    };
    if let Err(e) = hamok.submit(&local.id, cmd.to_vec()).await {
        tracing::debug!("emitter cleanup not applied (retried later): {e}");
    }
}

/// After this peer was removed and joined again: subscribe again to every event with local handlers.
async fn resubscribe(hamok: &Hamok, local: &EmitterLocal) {
    let wanted: Vec<(String, Bytes)> = lock(&local.extra.local_events)
        .iter()
        .filter(|(_, e)| !e.handlers.is_empty())
        .map(|(event, e)| (event.clone(), e.metadata.clone()))
        .collect();
    for (event, metadata) in wanted {
        if let Ok(cmd) = encode(&Wire::Op(EmitterCmd::Subscribe { event, metadata })) {
            let _ = hamok.submit(&local.id, cmd.to_vec()).await;
        }
    }
}

impl<E, M> HamokEmitter<E, M> {
    /// The emitter's id.
    pub fn id(&self) -> &str {
        &self.handle.local.id
    }

    /// The same emitter with another publish timeout (default: the peer's `request_timeout_ms`).
    pub fn with_publish_timeout(mut self, timeout: Duration) -> Self {
        self.publish_timeout = timeout;
        self
    }

    /// The publish timeout of this handle.
    pub fn publish_timeout(&self) -> Duration {
        self.publish_timeout
    }

    /// Whether any peer (this one included) subscribes to `event` (local view of the table).
    pub fn has_subscribers(&self, event: &str) -> bool {
        self.handle
            .local
            .read(|s| s.subs.get(event).is_some_and(|p| !p.is_empty()))
    }

    /// Whether this peer has local handlers for `event`.
    pub fn has_local_handlers(&self, event: &str) -> bool {
        lock(&self.handle.local.extra.local_events)
            .get(event)
            .is_some_and(|e| !e.handlers.is_empty())
    }

    /// The peers subscribed to `event` (local view of the table).
    pub fn subscriber_ids(&self, event: &str) -> Vec<PeerId> {
        self.handle.local.read(|s| {
            s.subs
                .get(event)
                .map(|p| p.keys().cloned().collect())
                .unwrap_or_default()
        })
    }

    /// The events with at least one subscriber (local view of the table).
    pub fn event_names(&self) -> Vec<String> {
        self.handle.local.read(|s| s.subs.keys().cloned().collect())
    }

    /// Counters of this peer.
    pub fn stats(&self) -> EmitterStats {
        let extra = &self.handle.local.extra;
        EmitterStats {
            subscriptions: lock(&extra.local_events)
                .values()
                .filter(|e| !e.handlers.is_empty())
                .count(),
            received: extra.received.load(Ordering::Relaxed),
            sent: extra.sent.load(Ordering::Relaxed),
        }
    }

    /// Waits until the local view of the table reflects every change acknowledged before the call.
    pub async fn sync(&self) -> Result<(), HamokError> {
        self.handle.sync().await
    }

    /// Unsubscribes this peer from `event` (its other subscriptions stay) and drops its local handlers
    /// of `event`. Returns whether this peer was subscribed.
    pub async fn unsubscribe(&self, event: &str) -> Result<bool, HamokError> {
        lock(&self.handle.local.extra.local_events).remove(event);
        self.handle
            .submit(EmitterCmd::Unsubscribe {
                event: event.to_string(),
            })
            .await
    }

    /// Removes one local handler; when it was the last of its event, unsubscribes this peer from it.
    pub async fn remove_handler(&self, id: HandlerId) -> Result<(), HamokError> {
        let emptied = {
            let mut events = lock(&self.handle.local.extra.local_events);
            let mut emptied = None;
            for (event, e) in events.iter_mut() {
                let before = e.handlers.len();
                e.handlers.retain(|(h, _)| *h != id.0);
                if e.handlers.len() != before && e.handlers.is_empty() {
                    emptied = Some(event.clone());
                }
            }
            if let Some(event) = &emptied {
                events.remove(event);
            }
            emptied
        };
        if let Some(event) = emptied {
            let _: bool = self
                .handle
                .submit(EmitterCmd::Unsubscribe { event })
                .await?;
        }
        Ok(())
    }

    /// Unsubscribes this peer from every event and drops all its local handlers.
    pub async fn clear(&self) -> Result<(), HamokError> {
        lock(&self.handle.local.extra.local_events).clear();
        let _: u64 = self.handle.submit(EmitterCmd::UnsubscribeAll).await?;
        Ok(())
    }

    /// Closes this peer's handles (subscribers of the table's events get [`SubscriptionEvent::Close`]).
    /// Does not unsubscribe (call [`HamokEmitter::clear`] first for that).
    pub fn close(&self) {
        self.handle.local.close();
    }
}

impl<E, M> HamokEmitter<E, M>
where
    E: Serialize + DeserializeOwned + 'static,
    M: Serialize + DeserializeOwned,
{
    pub(crate) fn new(handle: Handle<EmitterState, EmitterExtra>) -> Self {
        let publish_timeout = Duration::from_millis(handle.hamok.config().request_timeout_ms);
        HamokEmitter {
            handle,
            publish_timeout,
            _types: Types::default(),
        }
    }

    /// Adds a local handler of `event`, called with the sending peer and the payload for every publish
    /// or notify of `event` this peer receives. The first handler of an event subscribes this peer (with
    /// `metadata`) through the log; later handlers of the same event only add locally.
    pub async fn subscribe(
        &self,
        event: &str,
        handler: impl Fn(&PeerId, E) + Send + Sync + 'static,
        metadata: M,
    ) -> Result<HandlerId, HamokError> {
        self.handle.local.check_open()?;
        let metadata = encode(&metadata)?;
        let raw: RawHandler =
            Arc::new(
                move |from: &PeerId, payload: &[u8]| match decode::<E>(payload) {
                    Ok(e) => handler(from, e),
                    Err(e) => tracing::warn!(%from, "emitter payload does not decode: {e}"),
                },
            );
        let extra = &self.handle.local.extra;
        let id = extra.next_id.fetch_add(1, Ordering::Relaxed);
        let first = {
            let mut events = lock(&extra.local_events);
            let entry = events.entry(event.to_string()).or_insert(LocalEvent {
                metadata: metadata.clone(),
                handlers: Vec::new(),
            });
            entry.handlers.push((id, raw));
            entry.handlers.len() == 1
        };
        if first {
            let result: Result<bool, _> = self
                .handle
                .submit(EmitterCmd::Subscribe {
                    event: event.to_string(),
                    metadata,
                })
                .await;
            if let Err(e) = result {
                let mut events = lock(&extra.local_events);
                if let Some(entry) = events.get_mut(event) {
                    entry.handlers.retain(|(h, _)| *h != id);
                    if entry.handlers.is_empty() {
                        events.remove(event);
                    }
                }
                return Err(e);
            }
        }
        Ok(HandlerId(id))
    }

    /// Sets this peer's metadata for `event` to `new`, if this peer subscribes to it and (when
    /// `expected` is given) its current metadata equals `expected` (compare-and-set at apply time).
    /// Returns whether it changed.
    pub async fn update_subscription_metadata(
        &self,
        event: &str,
        new: &M,
        expected: Option<&M>,
    ) -> Result<bool, HamokError> {
        let new = encode(new)?;
        let expected = expected.map(encode).transpose()?;
        let updated: bool = self
            .handle
            .submit(EmitterCmd::UpdateMetadata {
                event: event.to_string(),
                new: new.clone(),
                expected,
            })
            .await?;
        if updated {
            if let Some(e) = lock(&self.handle.local.extra.local_events).get_mut(event) {
                e.metadata = new;
            }
        }
        Ok(updated)
    }

    /// The subscribers of `event` with their metadata (local view of the table).
    pub fn subscribers(&self, event: &str) -> Result<Vec<(PeerId, M)>, HamokError> {
        let raw: Vec<(PeerId, Bytes)> = self.handle.local.read(|s| {
            s.subs
                .get(event)
                .map(|p| p.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
                .unwrap_or_default()
        });
        raw.into_iter().map(|(p, m)| Ok((p, decode(&m)?))).collect()
    }

    /// This peer's metadata for `event`, if it subscribes (local view of the table).
    pub fn metadata(&self, event: &str) -> Result<Option<M>, HamokError> {
        let me = self.handle.hamok.local_peer_id().clone();
        match self
            .handle
            .local
            .read(|s| s.subs.get(event).and_then(|p| p.get(&me)).cloned())
        {
            Some(m) => Ok(Some(decode(&m)?)),
            None => Ok(None),
        }
    }

    /// Delivers `payload` to every peer subscribed to `event` (this one included: its handlers run
    /// before the call returns) and waits, at most the publish timeout, for their acknowledgements.
    /// Returns the peers that acknowledged; subscribers that are dead or too slow are simply missing.
    pub async fn publish(&self, event: &str, payload: &E) -> Result<Vec<PeerId>, HamokError> {
        self.handle.local.check_open()?;
        let payload = encode(payload)?;
        let me = self.handle.hamok.local_peer_id().clone();
        let targets = self.subscriber_ids(event);
        let extra = &self.handle.local.extra;
        let mut acked = Vec::new();
        let remote: BTreeSet<PeerId> = targets.into_iter().filter(|p| *p != me).collect();
        if self.has_local_handlers(event) && extra.dispatch(&me, event, &payload) {
            acked.push(me.clone());
        }
        if remote.is_empty() {
            return Ok(acked);
        }
        let req = extra.next_id.fetch_add(1, Ordering::Relaxed);
        let (done_tx, done_rx) = oneshot::channel();
        lock(&extra.pending).insert(
            req,
            PendingPublish {
                remaining: remote.clone(),
                acked: Vec::new(),
                done: Some(done_tx),
            },
        );
        let msg = encode(&DirectMsg::Publish {
            req,
            event: event.to_string(),
            payload,
        })?;
        for peer in &remote {
            extra.sent.fetch_add(1, Ordering::Relaxed);
            if let Err(e) =
                self.handle
                    .hamok
                    .send_direct(Some(peer.clone()), &extra.channel, msg.clone())
            {
                lock(&extra.pending).remove(&req);
                return Err(e);
            }
        }
        let _ = tokio::time::timeout(self.publish_timeout, done_rx).await;
        if let Some(p) = lock(&extra.pending).remove(&req) {
            acked.extend(p.acked);
        }
        Ok(acked)
    }

    /// Sends `payload` to every peer subscribed to `event` (this one included) without waiting for
    /// anything. Returns whether there was any subscriber.
    pub fn notify(&self, event: &str, payload: &E) -> Result<bool, HamokError> {
        self.handle.local.check_open()?;
        let payload = encode(payload)?;
        let me = self.handle.hamok.local_peer_id().clone();
        let targets = self.subscriber_ids(event);
        if targets.is_empty() {
            return Ok(false);
        }
        let extra = &self.handle.local.extra;
        let msg = encode(&DirectMsg::Notify {
            event: event.to_string(),
            payload: payload.clone(),
        })?;
        for peer in targets {
            if peer == me {
                extra.dispatch(&me, event, &payload);
            } else {
                extra.sent.fetch_add(1, Ordering::Relaxed);
                self.handle
                    .hamok
                    .send_direct(Some(peer), &extra.channel, msg.clone())?;
            }
        }
        Ok(true)
    }

    /// Subscribes to the changes of the replicated subscription table on this peer.
    pub fn events(&self) -> Events<SubscriptionEvent<M>> {
        self.handle.events(decode_event::<M>)
    }
}
