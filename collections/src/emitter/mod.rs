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
//!   direct message ([`Hamok::send_direct`](hamok_runtime::Hamok::send_direct)) to each subscribed peer. A receiving peer runs its local
//!   handlers and, for a publish, answers with an ack; `publish` returns the peers that acknowledged
//!   within its timeout, so a dead subscriber costs the timeout but never fails the call for the living.
//!   Handlers run on a task of the emitter, never inside the node actor, and a panicking handler is
//!   caught (logged) without stopping delivery.
//! - **Dead subscribers are cleaned through the log**: the state machine API has no membership callback
//!   yet, so the leader checks the table against the cluster's members ([`Hamok::remote_peer_ids`](hamok_runtime::Hamok::remote_peer_ids)) when
//!   a peer leaves (`RemotePeerLeft`), when it becomes leader, and every second, and submits a
//!   `RemovePeers` command for subscribers that are no longer members. A peer that is removed and joins
//!   again re-submits its subscriptions when it is joined again.
//!
//! Background work (receiving direct messages, acks, cleanup) runs on one tokio task per emitter and
//! peer, which ends when every handle of the emitter on that peer is dropped or the peer closes. It is a
//! plain task rather than a ractor actor because it has no state to recover after a crash: user handlers
//! — the only code that can panic — are isolated with `catch_unwind`, and the replicated state lives in
//! the node actor, which the runtime supervises.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hamok_runtime::raft::PeerId;
use hamok_runtime::HamokError;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::oneshot;

use crate::common::{
    decode, encode, handle_basics, Events, Handle, LogicHandle, Opened, Raw, ResyncReason, Types,
};

mod dispatch;
mod machine;

use dispatch::{lock, start, DirectMsg, EmitterExtra, LocalEvent, PendingPublish, RawHandler};
pub(crate) use machine::EmitterMachine;
use machine::{EmitterCmd, EmitterLogic, EmitterState};

/// The kind an emitter is registered under.
pub const EMITTER_KIND: &str = "hamok.emitter";
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
    /// The stream could not deliver some events (see [`ResyncReason`]): the table holds exactly
    /// `subscriptions` now (by event name, then peer), and the events after this one continue from
    /// there.
    Resync {
        /// Every subscription: event name, subscriber, its metadata.
        subscriptions: Vec<(String, PeerId, M)>,
        /// Why the events in between were skipped.
        reason: ResyncReason,
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
        Raw::Resync { state, reason } => {
            let mut subscriptions = Vec::new();
            for (event, peers) in decode::<EmitterState>(&state)?.subs {
                for (peer, metadata) in peers {
                    subscriptions.push((event.clone(), peer, decode(&metadata)?));
                }
            }
            SubscriptionEvent::Resync {
                subscriptions,
                reason,
            }
        }
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
impl<E, M> Opened for HamokEmitter<E, M>
where
    E: Serialize + DeserializeOwned + 'static,
    M: Serialize + DeserializeOwned,
{
    type Logic = EmitterLogic;
    type Options = ();

    fn kind(_id: &str) -> String {
        EMITTER_KIND.to_string()
    }

    fn extra(id: &str) -> EmitterExtra {
        EmitterExtra::new(id)
    }

    async fn finish(handle: LogicHandle<EmitterLogic>, _options: ()) -> Result<Self, HamokError> {
        start(&handle.hamok, &handle.local)?;
        Ok(HamokEmitter::new(handle))
    }
}

handle_basics!(HamokEmitter<E, M>);

impl<E, M> HamokEmitter<E, M> {
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

    /// Subscribes to the changes of the replicated subscription table on this peer. Events come in log
    /// order. The stream never skips silently: after a [`SubscriptionEvent::Resync`] its
    /// `subscriptions` are the whole table at that point of the log, and the events that follow
    /// continue from exactly that state (replaying `Resync`, then the events, reproduces the table).
    pub fn events(&self) -> Events<SubscriptionEvent<M>> {
        self.handle.events(decode_event::<M>)
    }
}
