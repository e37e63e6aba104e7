//! Machinery every collection shares: the codec, the command envelope, the link between a state machine
//! (owned by the node actor) and the local handles of this peer, and the typed event streams.
//!
//! # How a handle sees its state machine
//!
//! The state machine of a collection lives inside the runtime's node actor, which applies committed
//! commands to it. Its data sits behind an `Arc<RwLock<..>>` that the machine shares with the local
//! handles of its peer: the machine takes the write lock while it applies a command, handles take the read
//! lock for local reads. The runtime's attach hook ([`Hamok::attach`]) hands the `Arc` over whenever the
//! machine is (re)created — created through the log, or rebuilt from a snapshot — so a handle always
//! reads the machine currently in the node.
//!
//! Why a shared lock rather than [`Hamok::query`] for every local read: a query is a message to the node
//! actor and waits behind everything in its mailbox (a burst of appends, a snapshot install), while a
//! read lock is taken in tens of nanoseconds and only ever waits for one command's apply. Determinism is
//! unaffected: only `apply` writes. Linearizable reads still go through the node (a ReadIndex round,
//! [`Hamok::wait_until_linearizable`]) and then read the shared state.
//!
//! Events are produced by `apply` on every peer, in log order, and sent on a bounded broadcast channel
//! per local handle group (a subscriber that falls behind by more than [`EVENT_CAPACITY`] events gets
//! [`RecvError::Lagged`]). Nothing is encoded or copied for events when nobody subscribed.

use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError, RwLock, Weak};

use bytes::Bytes;
use hamok_runtime::state_machine::StateMachine;
use hamok_runtime::{Hamok, HamokError, HamokEvent};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

/// Most events buffered per subscriber of a collection's events; a subscriber that falls further behind
/// loses the oldest and is told how many with [`RecvError::Lagged`].
pub const EVENT_CAPACITY: usize = 4096;

/// Encodes a value with rmp-serde (compact: structs as arrays).
pub(crate) fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Bytes, HamokError> {
    Ok(Bytes::from(rmp_serde::to_vec(value)?))
}

/// Decodes a value encoded by [`encode`].
pub(crate) fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, HamokError> {
    Ok(rmp_serde::from_slice(bytes)?)
}

/// The envelope of every collection command: `Init` marks the collection as created (the first `Init`
/// applied answers `true`, which is how `create_*` tells "created" from "already existed" without a
/// race), `Op` carries the collection's own command.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Wire<C> {
    Init,
    Op(C),
}

/// A raw event as a state machine emits it: bytes, decoded only by the typed stream of a subscriber.
#[derive(Clone, Debug)]
pub(crate) enum Raw {
    Insert { key: Bytes, value: Bytes },
    Update { key: Bytes, old: Bytes, new: Bytes },
    Remove { key: Bytes, value: Bytes },
    Clear,
    Empty,
    NotEmpty,
    Close,
}

/// Why a typed event could not be received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecvError {
    /// The subscriber fell behind and lost this many events (the stream goes on with newer ones).
    Lagged(u64),
    /// Every local handle of the collection was dropped: no more events will come.
    Closed,
    /// An event's key or value did not decode as the handle's type.
    Codec(String),
}

impl std::fmt::Display for RecvError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RecvError::Lagged(n) => write!(f, "lagged behind: {n} events lost"),
            RecvError::Closed => write!(f, "event stream closed"),
            RecvError::Codec(e) => write!(f, "event does not decode: {e}"),
        }
    }
}

impl std::error::Error for RecvError {}

/// A typed stream of a collection's events on this peer (see each collection for its event type).
///
/// A stream keeps the collection's local handle group alive: events keep coming while it exists, even if
/// every handle was dropped.
pub struct Events<T> {
    rx: broadcast::Receiver<Raw>,
    decode: fn(Raw) -> Result<T, HamokError>,
    _keep: Arc<dyn std::any::Any + Send + Sync>,
}

impl<T> Events<T> {
    pub(crate) fn new<S, X>(
        local: &Arc<Local<S, X>>,
        decode: fn(Raw) -> Result<T, HamokError>,
    ) -> Self
    where
        S: Send + Sync + 'static,
        X: Send + Sync + 'static,
    {
        Events {
            rx: local.events.subscribe(),
            decode,
            _keep: local.clone(),
        }
    }

    fn convert(&self, raw: Raw) -> Result<T, RecvError> {
        (self.decode)(raw).map_err(|e| RecvError::Codec(e.to_string()))
    }

    /// Waits for the next event.
    pub async fn recv(&mut self) -> Result<T, RecvError> {
        match self.rx.recv().await {
            Ok(raw) => self.convert(raw),
            Err(broadcast::error::RecvError::Lagged(n)) => Err(RecvError::Lagged(n)),
            Err(broadcast::error::RecvError::Closed) => Err(RecvError::Closed),
        }
    }

    /// The next event if one is buffered, without waiting.
    pub fn try_recv(&mut self) -> Result<Option<T>, RecvError> {
        match self.rx.try_recv() {
            Ok(raw) => self.convert(raw).map(Some),
            Err(broadcast::error::TryRecvError::Empty) => Ok(None),
            Err(broadcast::error::TryRecvError::Lagged(n)) => Err(RecvError::Lagged(n)),
            Err(broadcast::error::TryRecvError::Closed) => Err(RecvError::Closed),
        }
    }
}

fn read_lock<S>(lock: &RwLock<S>) -> std::sync::RwLockReadGuard<'_, S> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

pub(crate) fn write_lock<S>(lock: &RwLock<S>) -> std::sync::RwLockWriteGuard<'_, S> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
}

/// What the local handles of one collection on one peer share (every clone and every handle opened on
/// the same id). `X` holds what a collection adds (the emitter's handlers, the remote map's executor).
pub(crate) struct Local<S, X> {
    pub(crate) id: String,
    slot: RwLock<Arc<RwLock<S>>>,
    events: broadcast::Sender<Raw>,
    closed: AtomicBool,
    /// Whether a task watches the peer for `Close` (started with the first event stream).
    watching: AtomicBool,
    pub(crate) extra: X,
}

impl<S: Default, X> Local<S, X> {
    fn new(id: &str, extra: X) -> Self {
        let (events, _) = broadcast::channel(EVENT_CAPACITY);
        Local {
            id: id.to_string(),
            slot: RwLock::new(Arc::new(RwLock::new(S::default()))),
            events,
            closed: AtomicBool::new(false),
            watching: AtomicBool::new(false),
            extra,
        }
    }
}

impl<S, X> Local<S, X> {
    /// Runs `f` on the state of this peer's machine (a local read: the state as applied here).
    pub(crate) fn read<R>(&self, f: impl FnOnce(&S) -> R) -> R {
        let state = read_lock(&self.slot).clone();
        let guard = read_lock(&state);
        f(&guard)
    }

    /// Sends events to this peer's subscribers (for events that do not come from `apply`).
    pub(crate) fn emit(&self, events: Vec<Raw>) {
        if self.events.receiver_count() > 0 {
            for e in events {
                let _ = self.events.send(e);
            }
        }
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Marks the handles closed and tells their subscribers (once).
    pub(crate) fn close(&self) {
        if !self.closed.swap(true, Ordering::AcqRel) {
            let _ = self.events.send(Raw::Close);
        }
    }

    pub(crate) fn check_open(&self) -> Result<(), HamokError> {
        if self.is_closed() {
            Err(HamokError::Closed)
        } else {
            Ok(())
        }
    }
}

/// The part of a state machine that links it to local handles: its shared state and its observers.
pub(crate) struct Core<S, X> {
    pub(crate) state: Arc<RwLock<S>>,
    observers: Vec<Weak<Local<S, X>>>,
    /// Whether an `Init` was applied (replicated, part of the snapshot).
    pub(crate) initialized: bool,
}

impl<S: Default, X> Default for Core<S, X> {
    fn default() -> Self {
        Core {
            state: Arc::new(RwLock::new(S::default())),
            observers: Vec::new(),
            initialized: false,
        }
    }
}

impl<S, X> Core<S, X> {
    /// Applies `Init`: answers whether this is the first.
    pub(crate) fn init(&mut self) -> Result<Bytes, HamokError> {
        let first = !self.initialized;
        self.initialized = true;
        encode(&first)
    }

    /// Whether any local subscriber listens (events are only built then).
    pub(crate) fn listening(&self) -> bool {
        self.observers
            .iter()
            .any(|w| w.upgrade().is_some_and(|l| l.events.receiver_count() > 0))
    }

    /// Sends events to the local subscribers.
    pub(crate) fn emit(&self, events: Vec<Raw>) {
        if events.is_empty() {
            return;
        }
        for weak in &self.observers {
            if let Some(local) = weak.upgrade() {
                if local.events.receiver_count() > 0 {
                    for e in &events {
                        let _ = local.events.send(e.clone());
                    }
                }
            }
        }
    }

    /// The local handles' shared part, if one is alive (and not closed) on this peer.
    pub(crate) fn live_local(&self) -> Option<Arc<Local<S, X>>> {
        self.observers
            .iter()
            .filter_map(Weak::upgrade)
            .find(|l| !l.is_closed())
    }

    /// Links a local handle group to this machine: it reads this machine's state from now on.
    fn observe(&mut self, local: &Arc<Local<S, X>>) {
        *write_lock(&local.slot) = self.state.clone();
        self.observers.retain(|w| w.strong_count() > 0);
        if !self
            .observers
            .iter()
            .any(|w| std::ptr::eq(w.as_ptr(), Arc::as_ptr(local)))
        {
            self.observers.push(Arc::downgrade(local));
        }
    }
}

/// A collection's state machine, as the shared machinery sees it.
pub(crate) trait Collection: StateMachine + Sized {
    type State: Default + Send + Sync + 'static;
    type Extra: Send + Sync + 'static;
    fn core(&self) -> &Core<Self::State, Self::Extra>;
    fn core_mut(&mut self) -> &mut Core<Self::State, Self::Extra>;
}

/// Creates (through the log) or finds collection `id` of `kind`, and returns the local handle group of
/// this peer for it. `strict`: fail if the collection already existed.
pub(crate) async fn open<M: Collection>(
    hamok: &Hamok,
    id: &str,
    kind: &str,
    strict: bool,
    extra: impl FnOnce() -> M::Extra,
) -> Result<Handle<M::State, M::Extra>, HamokError> {
    let local = open_local::<M>(hamok, id, kind, strict, extra).await?;
    Ok(Handle {
        hamok: hamok.clone(),
        local,
    })
}

/// The shared local part of collection `id` on this peer (see [`open`]).
async fn open_local<M: Collection>(
    hamok: &Hamok,
    id: &str,
    kind: &str,
    strict: bool,
    extra: impl FnOnce() -> M::Extra,
) -> Result<Arc<Local<M::State, M::Extra>>, HamokError> {
    hamok.create_storage(id, kind).await?;
    let init: Wire<()> = Wire::Init;
    let first: bool = decode(&hamok.submit(id, encode(&init)?).await?)?;
    if strict && !first {
        return Err(HamokError::Rejected(format!(
            "collection `{id}` already exists"
        )));
    }
    // One local handle group per collection and peer: reuse a live one.
    let existing = hamok
        .query(id, false, |m| {
            m.and_then(|m| m.as_any().downcast_ref::<M>())
                .and_then(|m| m.core().live_local())
        })
        .await?;
    if let Some(local) = existing {
        return Ok(local);
    }
    let local = Arc::new(Local::new(id, extra()));
    let weak = Arc::downgrade(&local);
    hamok.attach(id, move |machine| {
        if let (Some(m), Some(local)) = (machine.as_any_mut().downcast_mut::<M>(), weak.upgrade()) {
            m.core_mut().observe(&local);
        }
    })?;
    // The node handles its mailbox in order: once this query ran, so did the attach hook.
    let attached = hamok
        .query(id, false, |m| {
            m.and_then(|m| m.as_any().downcast_ref::<M>())
                .and_then(|m| m.core().live_local())
        })
        .await?;
    if let Some(other) = attached {
        if !Arc::ptr_eq(&other, &local) {
            // Another task of this peer opened the same collection at the same moment: use its group.
            return Ok(other);
        }
    }
    Ok(local)
}

/// Closes the local handle group (and emits `Close`) when the peer closes.
fn watch_close<S: Send + Sync + 'static, X: Send + Sync + 'static>(
    hamok: &Hamok,
    local: &Arc<Local<S, X>>,
) {
    let mut rx = hamok.events();
    let weak = Arc::downgrade(local);
    tokio::spawn(async move {
        loop {
            let closed = match rx.recv().await {
                Ok(HamokEvent::Close) | Err(broadcast::error::RecvError::Closed) => true,
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => false,
            };
            match weak.upgrade() {
                Some(local) if closed => {
                    local.close();
                    return;
                }
                Some(_) => {}
                None => return,
            }
        }
    });
}

/// A typed handle's link to its collection: the peer and the shared local part.
pub(crate) struct Handle<S, X> {
    pub(crate) hamok: Hamok,
    pub(crate) local: Arc<Local<S, X>>,
}

impl<S, X> Clone for Handle<S, X> {
    fn clone(&self) -> Self {
        Handle {
            hamok: self.hamok.clone(),
            local: self.local.clone(),
        }
    }
}

impl<S, X> Handle<S, X> {
    /// Submits a command through the log and decodes the machine's response.
    pub(crate) async fn submit<C: Serialize, R: DeserializeOwned>(
        &self,
        cmd: C,
    ) -> Result<R, HamokError> {
        self.local.check_open()?;
        let bytes = encode(&Wire::Op(cmd))?;
        let response = self.hamok.submit(&self.local.id, bytes.to_vec()).await?;
        // The command was applied: a response that does not decode says so.
        decode(&response).map_err(HamokError::after_apply)
    }

    /// A typed event stream; the first one starts watching the peer for `Close` (only subscribers need
    /// it, so handles without subscribers cost no task).
    pub(crate) fn events<T>(&self, decode: fn(Raw) -> Result<T, HamokError>) -> Events<T>
    where
        S: Send + Sync + 'static,
        X: Send + Sync + 'static,
    {
        if !self.local.watching.swap(true, Ordering::AcqRel) {
            watch_close(&self.hamok, &self.local);
        }
        Events::new(&self.local, decode)
    }

    /// Waits until this peer has applied every write acknowledged anywhere before the call.
    pub(crate) async fn sync(&self) -> Result<(), HamokError> {
        self.local.check_open()?;
        let timeout = std::time::Duration::from_millis(self.hamok.config().request_timeout_ms);
        self.hamok
            .wait_until_linearizable(timeout)
            .await
            .map(|_| ())
    }
}

/// Decodes a machine's command envelope; an undecodable command is a deterministic rejection.
pub(crate) fn decode_command<C: DeserializeOwned>(command: &[u8]) -> Result<Wire<C>, HamokError> {
    rmp_serde::from_slice(command).map_err(|e| HamokError::codec(format!("bad command: {e}"), None))
}

/// Marker for handles' type parameters: `fn() -> T` keeps handles `Send + Sync` whatever `T` is.
pub(crate) type Types<T> = PhantomData<fn() -> T>;

// -------------------------------------------------------------------------------------------------
// MessagePack helpers for records: split a map into its entries' raw bytes, and build one back.

const MAX_DEPTH: usize = 128;

fn truncated() -> HamokError {
    HamokError::codec("truncated MessagePack value", None)
}

fn read_be(buf: &[u8], at: usize, n: usize) -> Result<usize, HamokError> {
    let bytes = buf.get(at..at + n).ok_or_else(truncated)?;
    Ok(bytes.iter().fold(0usize, |acc, b| (acc << 8) | *b as usize))
}

/// The position just after the MessagePack value at `at`.
fn skip_value(buf: &[u8], at: usize, depth: usize) -> Result<usize, HamokError> {
    use rmp::Marker as M;
    if depth > MAX_DEPTH {
        return Err(HamokError::codec("MessagePack value nested too deep", None));
    }
    let marker = M::from_u8(*buf.get(at).ok_or_else(truncated)?);
    let p = at + 1;
    let end = match marker {
        M::FixPos(_) | M::FixNeg(_) | M::Null | M::True | M::False => p,
        M::U8 | M::I8 => p + 1,
        M::U16 | M::I16 => p + 2,
        M::U32 | M::I32 | M::F32 => p + 4,
        M::U64 | M::I64 | M::F64 => p + 8,
        M::FixStr(n) => p + n as usize,
        M::Str8 | M::Bin8 => p + 1 + read_be(buf, p, 1)?,
        M::Str16 | M::Bin16 => p + 2 + read_be(buf, p, 2)?,
        M::Str32 | M::Bin32 => p + 4 + read_be(buf, p, 4)?,
        M::FixArray(n) => skip_n(buf, p, n as usize, depth)?,
        M::Array16 => skip_n(buf, p + 2, read_be(buf, p, 2)?, depth)?,
        M::Array32 => skip_n(buf, p + 4, read_be(buf, p, 4)?, depth)?,
        M::FixMap(n) => skip_n(buf, p, 2 * n as usize, depth)?,
        M::Map16 => skip_n(buf, p + 2, 2 * read_be(buf, p, 2)?, depth)?,
        M::Map32 => skip_n(buf, p + 4, 2 * read_be(buf, p, 4)?, depth)?,
        M::FixExt1 => p + 2,
        M::FixExt2 => p + 3,
        M::FixExt4 => p + 5,
        M::FixExt8 => p + 9,
        M::FixExt16 => p + 17,
        M::Ext8 => p + 2 + read_be(buf, p, 1)?,
        M::Ext16 => p + 3 + read_be(buf, p, 2)?,
        M::Ext32 => p + 5 + read_be(buf, p, 4)?,
        M::Reserved => return Err(HamokError::codec("reserved MessagePack marker", None)),
    };
    if end > buf.len() {
        return Err(truncated());
    }
    Ok(end)
}

fn skip_n(buf: &[u8], mut at: usize, n: usize, depth: usize) -> Result<usize, HamokError> {
    for _ in 0..n {
        at = skip_value(buf, at, depth + 1)?;
    }
    Ok(at)
}

/// Splits an encoded MessagePack map with string keys into (key, encoded value) pairs.
pub(crate) fn split_map(buf: &[u8]) -> Result<Vec<(String, Bytes)>, HamokError> {
    use rmp::Marker as M;
    let not_map = || HamokError::codec("a record's type must serialize as a map (a struct)", None);
    let marker = M::from_u8(*buf.first().ok_or_else(not_map)?);
    let (len, mut at) = match marker {
        M::FixMap(n) => (n as usize, 1),
        M::Map16 => (read_be(buf, 1, 2)?, 3),
        M::Map32 => (read_be(buf, 1, 4)?, 5),
        _ => return Err(not_map()),
    };
    let mut out = Vec::with_capacity(len.min(1024));
    for _ in 0..len {
        let key_end = skip_value(buf, at, 0)?;
        let key: String = rmp_serde::from_slice(&buf[at..key_end])
            .map_err(|_| HamokError::codec("a record's field names must be strings", None))?;
        let value_end = skip_value(buf, key_end, 0)?;
        out.push((key, Bytes::copy_from_slice(&buf[key_end..value_end])));
        at = value_end;
    }
    if at != buf.len() {
        return Err(HamokError::codec(
            "trailing bytes after a MessagePack map",
            None,
        ));
    }
    Ok(out)
}

/// Builds an encoded MessagePack map from (key, encoded value) pairs.
pub(crate) fn build_map<'a>(
    entries: impl ExactSizeIterator<Item = (&'a str, &'a [u8])>,
) -> Vec<u8> {
    let mut out = Vec::new();
    // Writing into a Vec cannot fail.
    let _ = rmp::encode::write_map_len(&mut out, entries.len() as u32);
    for (key, value) in entries {
        let _ = rmp::encode::write_str(&mut out, key);
        out.extend_from_slice(value);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[derive(Serialize, Deserialize, PartialEq, Debug)]
    struct Sample {
        name: String,
        n: i64,
        nested: BTreeMap<String, Vec<Option<u8>>>,
        f: f64,
        b: Vec<u8>,
    }

    #[test]
    fn split_and_build_round_trip() {
        let mut nested = BTreeMap::new();
        nested.insert("x".to_string(), vec![Some(1), None, Some(255)]);
        let s = Sample {
            name: "a".repeat(300),
            n: -70000,
            nested,
            f: 1.5,
            b: vec![1, 2, 3],
        };
        let bytes = rmp_serde::to_vec_named(&s).unwrap();
        let fields = split_map(&bytes).unwrap();
        assert_eq!(fields.len(), 5);
        let rebuilt = build_map(fields.iter().map(|(k, v)| (k.as_str(), &v[..])));
        let back: Sample = rmp_serde::from_slice(&rebuilt).unwrap();
        assert_eq!(back, s);
        assert!(split_map(&bytes[..bytes.len() - 1]).is_err());
        assert!(split_map(&rmp_serde::to_vec(&5u8).unwrap()).is_err());
    }

    #[test]
    fn init_encodes_alike_for_every_command_type() {
        let a = encode(&Wire::<()>::Init).unwrap();
        let b = encode(&Wire::<Vec<(Bytes, Bytes)>>::Init).unwrap();
        assert_eq!(a, b);
        let w: Wire<String> = decode_command(&a).unwrap();
        assert!(matches!(w, Wire::Init));
    }
}
