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
//! per local handle group. Nothing is encoded or copied for events when nobody subscribed.
//!
//! # Streams never skip silently
//!
//! Where a stream cannot deliver every event it gives the whole state instead, as a `Resync` event
//! (each collection's event type has one), at exactly the point of the log where the stream resumes:
//! replaying a `Resync` and then the events after it reproduces the collection's state.
//!
//! - **Snapshot install** ([`ResyncReason::SnapshotInstalled`]): the runtime rebuilds every state
//!   machine from the snapshot and re-links the handle groups (`Machine::observe`), which sends the
//!   new state to the subscribers. It runs on the node's apply thread, between two applies.
//! - **Lag** ([`ResyncReason::Lagged`]): every machine has a *gate* (a mutex) that `apply` and
//!   `on_members` hold while they change the state and send its events. A subscriber that fell more than
//!   [`EVENT_CAPACITY`] events behind takes the gate of the machine its group reads, moves its receiver
//!   to the tail of the channel, encodes the state and lets go: every event sent after that is newer
//!   than the state, every event before it is in it.
//!
//! **Lock order** (no deadlock): a machine's gate, then a group's `slot` and `gate` cells, then the
//! state's lock. `Machine::observe` takes two gates (the one the group read so far, then the new
//! machine's); only the apply thread does, so no two threads ever wait for each other's gate.

use std::future::Future;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::Duration;

use bytes::Bytes;
use hamok_runtime::state_machine::{Fence, Op, StateMachine};
use hamok_runtime::{Hamok, HamokError, HamokEvent};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, oneshot};

use crate::machine::{Logic, Machine};

/// Most events buffered per subscriber of a collection's events; a subscriber that falls further behind
/// gets a `Resync` with [`ResyncReason::Lagged`] (the whole state) instead of the events it missed.
pub const EVENT_CAPACITY: usize = 4096;

/// Encodes a value with rmp-serde (compact: structs as arrays).
///
/// Keys, values, commands and responses are encoded on every write, several times per operation on
/// every peer, and most are a few dozen bytes. Encoded into a fresh `Vec` they took three to four
/// allocations each (the `Vec` doubling from 8 bytes, then `Bytes`'s shared header because length
/// and capacity differ); here they are encoded into a per-thread scratch buffer and copied out in
/// one exact allocation. An encoding larger than [`SCRATCH_KEEP_BYTES`] leaves with its buffer
/// instead, so the scratch buffer never keeps more than about twice that.
pub(crate) fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Bytes, HamokError> {
    encode_as(value, Bytes::copy_from_slice, Bytes::from)
}

/// [`encode`] into a `Vec` (a log command's payload is one): one exact allocation as well.
pub(crate) fn encode_to_vec<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, HamokError> {
    encode_as(value, <[u8]>::to_vec, |big| big)
}

/// Encodes `value` in the scratch buffer and hands it out with `copy`, or, when it is too big to keep
/// (or the buffer is taken), as the whole `Vec` it was encoded in, with `take`.
fn encode_as<T: Serialize + ?Sized, R>(
    value: &T,
    copy: impl FnOnce(&[u8]) -> R,
    take: impl FnOnce(Vec<u8>) -> R,
) -> Result<R, HamokError> {
    SCRATCH.with(|scratch| {
        // A `Serialize` that itself encodes (none here does) finds the buffer taken: a fresh one.
        let Ok(mut buf) = scratch.try_borrow_mut() else {
            return Ok(take(rmp_serde::to_vec(value)?));
        };
        buf.clear();
        let written = rmp_serde::encode::write(&mut *buf, value);
        if buf.len() > SCRATCH_KEEP_BYTES {
            let big = std::mem::take(&mut *buf);
            written?;
            return Ok(take(big));
        }
        written?;
        Ok(copy(&buf))
    })
}

/// The largest encoding [`encode`]'s per-thread scratch buffer keeps its room for.
const SCRATCH_KEEP_BYTES: usize = 64 << 10;

thread_local! {
    /// [`encode`]'s buffer on this thread.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The length of [`encode`]'s bytes for `value`, counted without building them.
pub(crate) fn encoded_len<T: Serialize + ?Sized>(value: &T) -> Result<usize, HamokError> {
    /// A writer that only counts.
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    rmp_serde::encode::write(&mut count, value)?;
    Ok(count.0)
}

/// Decodes a value encoded by [`encode`].
pub(crate) fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, HamokError> {
    Ok(rmp_serde::from_slice(bytes)?)
}

/// The envelope of every collection command: `Init` marks the collection as created (the first `Init`
/// applied answers `true`, which is how `create_*` tells "created" from "already existed" without a
/// race), `Op` carries the collection's own command. (Not to be confused with the runtime's frame
/// codec, `hamok_runtime::wire`: this is the payload of one log command.)
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Envelope<C> {
    Init,
    Op(C),
}

/// A raw event as a state machine emits it: bytes, decoded only by the typed stream of a subscriber.
/// `Resync` carries the whole state ([`encode`] of the collection's `Logic::State`; a remote map's: of
/// a `MapState` read from its store) at exactly the point where the stream resumes.
#[derive(Clone, Debug)]
pub(crate) enum Raw {
    Insert { key: Bytes, value: Bytes },
    Update { key: Bytes, old: Bytes, new: Bytes },
    Remove { key: Bytes, value: Bytes },
    Clear,
    Empty,
    NotEmpty,
    Close,
    Resync { state: Bytes, reason: ResyncReason },
}

/// Why an event stream delivered the whole state (a `Resync` event) instead of the events in between.
///
/// Either way the `Resync` carries the collection's whole state at the point where the stream resumes,
/// and the events after it continue from exactly that state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ResyncReason {
    /// This peer installed a snapshot from the leader (it had fallen behind, or was cut off, while the
    /// leader compacted its log): the stream skipped every entry the snapshot covers.
    SnapshotInstalled,
    /// This subscriber fell more than [`EVENT_CAPACITY`] events behind: at least `missed` events were
    /// skipped.
    Lagged {
        /// How many events the subscriber did not get (at least).
        missed: u64,
    },
}

/// Why a typed event could not be received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecvError {
    /// Every local handle of the collection was dropped: no more events will come.
    Closed,
    /// An event's key or value did not decode as the handle's type.
    Codec(String),
}

impl std::fmt::Display for RecvError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RecvError::Closed => write!(f, "event stream closed"),
            RecvError::Codec(e) => write!(f, "event does not decode: {e}"),
        }
    }
}

impl std::error::Error for RecvError {}

/// The encoded state a lagging stream resumes from, now or (a remote map's, read from its store) later.
pub(crate) enum Resynced {
    Now(Result<Bytes, HamokError>),
    Later(oneshot::Receiver<Bytes>),
}

/// Moves a lagging receiver to the tail of its channel and answers the state it resumes from (see
/// [`Local::resync`]). It holds the handle group, so a stream keeps the group alive.
pub(crate) type ResyncFn = Arc<dyn Fn(&mut broadcast::Receiver<Raw>) -> Resynced + Send + Sync>;

/// A typed stream of a collection's events on this peer (see each collection for its event type).
///
/// Events come in log order. A stream never skips silently: where it could not deliver some events
/// (this subscriber fell more than [`EVENT_CAPACITY`] events behind, or this peer installed a snapshot)
/// it delivers the collection's whole state as a `Resync` event (see [`ResyncReason`]), and the events
/// after it continue from exactly that state.
///
/// A stream keeps the collection's local handle group alive: events keep coming while it exists, even if
/// every handle was dropped.
pub struct Events<T> {
    rx: broadcast::Receiver<Raw>,
    decode: fn(Raw) -> Result<T, HamokError>,
    resync: ResyncFn,
    /// A resync whose state is still being read (a remote map's), with the events it stands for: it
    /// comes before any further event.
    pending: Option<(u64, oneshot::Receiver<Bytes>)>,
}

impl<T> Events<T> {
    /// A stream of `local`'s events; on lag it resyncs to the state `local` reads, exactly.
    pub(crate) fn new<S, X>(
        local: &Arc<Local<S, X>>,
        decode: fn(Raw) -> Result<T, HamokError>,
    ) -> Self
    where
        S: Serialize + Send + Sync + 'static,
        X: Send + Sync + 'static,
    {
        let group = local.clone();
        let resync: ResyncFn = Arc::new(move |rx| Resynced::Now(group.resync(rx)));
        Self::with_resync(local.events.subscribe(), decode, resync)
    }

    /// A stream that resyncs with `resync` on lag.
    pub(crate) fn with_resync(
        rx: broadcast::Receiver<Raw>,
        decode: fn(Raw) -> Result<T, HamokError>,
        resync: ResyncFn,
    ) -> Self {
        Events {
            rx,
            decode,
            resync,
            pending: None,
        }
    }

    fn convert(&self, raw: Raw) -> Result<T, RecvError> {
        (self.decode)(raw).map_err(|e| RecvError::Codec(e.to_string()))
    }

    /// The `Resync` of a lag of `missed` events.
    fn lagged(&self, state: Result<Bytes, HamokError>, missed: u64) -> Result<T, RecvError> {
        let state = state.map_err(|e| RecvError::Codec(e.to_string()))?;
        self.convert(Raw::Resync {
            state,
            reason: ResyncReason::Lagged { missed },
        })
    }

    /// Resyncs after a lag of `missed` events: the `Resync` now, or `None` if its state comes later.
    fn on_lag(&mut self, missed: u64) -> Option<Result<T, RecvError>> {
        match (self.resync)(&mut self.rx) {
            Resynced::Now(state) => Some(self.lagged(state, missed)),
            Resynced::Later(state) => {
                self.pending = Some((missed, state));
                None
            }
        }
    }

    /// Waits for the next event.
    pub async fn recv(&mut self) -> Result<T, RecvError> {
        loop {
            if let Some((missed, state)) = &mut self.pending {
                // Cancel safe: the pending resync stays until its state arrived.
                let missed = *missed;
                let state = state.await.map_err(|_| RecvError::Closed);
                self.pending = None;
                return self.lagged(Ok(state?), missed);
            }
            match self.rx.recv().await {
                Ok(raw) => return self.convert(raw),
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    if let Some(event) = self.on_lag(n) {
                        return event;
                    }
                }
                Err(broadcast::error::RecvError::Closed) => return Err(RecvError::Closed),
            }
        }
    }

    /// The next event if one is buffered, without waiting.
    pub fn try_recv(&mut self) -> Result<Option<T>, RecvError> {
        if let Some((missed, state)) = &mut self.pending {
            let missed = *missed;
            return match state.try_recv() {
                Err(oneshot::error::TryRecvError::Empty) => Ok(None),
                Err(oneshot::error::TryRecvError::Closed) => Err(RecvError::Closed),
                Ok(state) => {
                    self.pending = None;
                    self.lagged(Ok(state), missed).map(Some)
                }
            };
        }
        match self.rx.try_recv() {
            Ok(raw) => self.convert(raw).map(Some),
            Err(broadcast::error::TryRecvError::Empty) => Ok(None),
            Err(broadcast::error::TryRecvError::Lagged(n)) => match self.on_lag(n) {
                Some(event) => event.map(Some),
                None => self.try_recv(),
            },
            Err(broadcast::error::TryRecvError::Closed) => Err(RecvError::Closed),
        }
    }
}

/// Decodes each encoded item (the typed content of a `Resync`).
pub(crate) fn decode_each<'a, T: DeserializeOwned>(
    items: impl IntoIterator<Item = &'a Bytes>,
) -> Result<Vec<T>, HamokError> {
    items.into_iter().map(|item| decode(item)).collect()
}

pub(crate) fn read_lock<S>(lock: &RwLock<S>) -> std::sync::RwLockReadGuard<'_, S> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

pub(crate) fn write_lock<S>(lock: &RwLock<S>) -> std::sync::RwLockWriteGuard<'_, S> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
}

/// A handle group's event channel, made at its first subscriber: a broadcast channel holds its
/// [`EVENT_CAPACITY`] slots from birth (about half a MiB), and most handle groups never have a
/// subscriber. Sending before then reaches nobody, as sending to a channel without receivers does.
#[derive(Default)]
pub(crate) struct EventChannel(std::sync::OnceLock<broadcast::Sender<Raw>>);

impl EventChannel {
    /// A receiver of every event sent from now on.
    pub(crate) fn subscribe(&self) -> broadcast::Receiver<Raw> {
        self.0
            .get_or_init(|| broadcast::channel(EVENT_CAPACITY).0)
            .subscribe()
    }

    /// How many receivers there are (0 before the first subscriber).
    pub(crate) fn receiver_count(&self) -> usize {
        self.0.get().map_or(0, broadcast::Sender::receiver_count)
    }

    /// Sends `event` to the receivers there are (none: dropped).
    pub(crate) fn send(&self, event: Raw) {
        if let Some(sender) = self.0.get() {
            let _ = sender.send(event);
        }
    }
}

/// A machine's gate (see the module documentation): held while events are sent.
pub(crate) type Gate = Arc<Mutex<()>>;

/// Takes a gate (a panic while it was held leaves nothing half done that it protects).
pub(crate) fn hold(gate: &Mutex<()>) -> MutexGuard<'_, ()> {
    gate.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Whether two of a group's gates are the same one.
pub(crate) fn same_gate(a: &Option<Gate>, b: &Option<Gate>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
        (None, None) => true,
        _ => false,
    }
}

/// What the local handles of one collection on one peer share (every clone and every handle opened on
/// the same id). `X` holds what a collection adds (the emitter's handlers, the remote map's executor).
pub(crate) struct Local<S, X> {
    pub(crate) id: String,
    pub(crate) slot: RwLock<Arc<RwLock<S>>>,
    /// The gate of the machine whose state `slot` holds (set with it by `Core::observe`); `None` until
    /// the group is first linked to a machine.
    pub(crate) gate: RwLock<Option<Gate>>,
    pub(crate) events: EventChannel,
    closed: AtomicBool,
    /// Wakes every [`Local::closed`] waiter when `closed` is set.
    closed_notify: tokio::sync::Notify,
    /// Whether a task watches the peer for `Close` (started with the first event stream).
    watching: AtomicBool,
    pub(crate) extra: X,
}

impl<S: Default, X> Local<S, X> {
    fn new(id: &str, extra: X) -> Self {
        Local {
            id: id.to_string(),
            slot: RwLock::new(Arc::new(RwLock::new(S::default()))),
            gate: RwLock::new(None),
            events: EventChannel::default(),
            closed: AtomicBool::new(false),
            closed_notify: tokio::sync::Notify::new(),
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

    /// Moves the lagging receiver `rx` to the tail of the channel and answers the encoded state it
    /// resumes from: under the gate of the machine this group reads, so no event is in flight meanwhile
    /// (every event sent later is newer than the state, every event sent before is in it).
    pub(crate) fn resync(&self, rx: &mut broadcast::Receiver<Raw>) -> Result<Bytes, HamokError>
    where
        S: Serialize,
    {
        loop {
            // Lock order: the gate, then the cells, then the state (see the module documentation).
            let gate = read_lock(&self.gate).clone();
            let _held = gate.as_deref().map(hold);
            if !same_gate(&read_lock(&self.gate), &gate) {
                // Linked to another machine meanwhile: take that one's gate.
                continue;
            }
            *rx = rx.resubscribe();
            let state = read_lock(&self.slot).clone();
            return encode(&*read_lock(&state));
        }
    }

    /// Sends events to this peer's subscribers (for events that do not come from `apply`).
    pub(crate) fn emit(&self, events: Vec<Raw>) {
        if self.events.receiver_count() > 0 {
            for e in events {
                self.events.send(e);
            }
        }
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Marks the handles closed and tells their subscribers (once).
    pub(crate) fn close(&self) {
        if !self.closed.swap(true, Ordering::AcqRel) {
            self.events.send(Raw::Close);
            self.closed_notify.notify_waiters();
        }
    }

    /// Completes once the handles are closed (at once if they are).
    pub(crate) async fn closed(&self) {
        // Registered before the flag is read: a `close` between the two still wakes it.
        let notified = self.closed_notify.notified();
        if self.is_closed() {
            return;
        }
        notified.await;
    }

    pub(crate) fn check_open(&self) -> Result<(), HamokError> {
        if self.is_closed() {
            Err(HamokError::Closed)
        } else {
            Ok(())
        }
    }
}

/// Whether opening a collection may find it already created.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum OpenMode {
    /// `create_*`: fail with [`HamokError::Rejected`] if the collection exists.
    Create,
    /// `get_or_create_*`: open it either way.
    GetOrCreate,
}

/// A typed collection handle, as the one open path ([`open`]) builds it.
pub(crate) trait Opened: Sized {
    /// The collection's logic (its state machine is `Machine<Self::Logic>`).
    type Logic: Logic;
    /// What opening takes besides the id (a record's initial object).
    type Options: Send;
    /// The kind collection `id` is registered under.
    fn kind(id: &str) -> String;
    /// The fresh local part of a handle group for `id` (used when this peer has none yet).
    fn extra(id: &str) -> <Self::Logic as Logic>::Extra;
    /// Builds the handle on an open handle group: starts background work, applies options.
    fn finish(
        handle: LogicHandle<Self::Logic>,
        options: Self::Options,
    ) -> impl Future<Output = Result<Self, HamokError>> + Send;
}

/// The untyped handle of a collection with logic `L`.
pub(crate) type LogicHandle<L> = Handle<<L as Logic>::State, <L as Logic>::Extra>;

/// The one way every collection is opened: creates it through the log (or finds it), joins this peer's
/// handle group for it, and lets the handle type finish.
pub(crate) async fn open<H: Opened>(
    hamok: &Hamok,
    id: &str,
    mode: OpenMode,
    options: H::Options,
) -> Result<H, HamokError> {
    let local = open_local::<H::Logic>(hamok, id, &H::kind(id), mode, || H::extra(id)).await?;
    let handle = Handle {
        hamok: hamok.clone(),
        local,
        timeout: None,
        fence: None,
    };
    H::finish(handle, options).await
}

/// The shared local part of collection `id` on this peer (see [`open`]).
async fn open_local<L: Logic>(
    hamok: &Hamok,
    id: &str,
    kind: &str,
    mode: OpenMode,
    extra: impl FnOnce() -> L::Extra,
) -> Result<Arc<Local<L::State, L::Extra>>, HamokError> {
    hamok.create_collection(id, kind).await?;
    let init: Envelope<()> = Envelope::Init;
    let first: bool = decode(&hamok.submit(id, encode(&init)?).await?)?;
    if mode == OpenMode::Create && !first {
        return Err(HamokError::Rejected(format!(
            "collection `{id}` already exists"
        )));
    }
    // One local handle group per collection and peer: reuse a live one.
    let live = |m: Option<&dyn StateMachine>| {
        m.and_then(|m| m.as_any().downcast_ref::<Machine<L>>())
            .and_then(|m| m.core().live_local())
    };
    if let Some(local) = hamok.query(id, false, live).await? {
        return Ok(local);
    }
    let local = Arc::new(Local::new(id, extra()));
    let weak = Arc::downgrade(&local);
    hamok.attach(id, move |machine| {
        if let (Some(m), Some(local)) = (
            machine.as_any_mut().downcast_mut::<Machine<L>>(),
            weak.upgrade(),
        ) {
            m.observe(&local);
        }
    })?;
    // The node handles its mailbox in order: once this query ran, so did the attach hook.
    if let Some(other) = hamok.query(id, false, live).await? {
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

/// A typed handle's link to its collection: the peer, the shared local part, and the bound of each call.
pub(crate) struct Handle<S, X> {
    pub(crate) hamok: Hamok,
    pub(crate) local: Arc<Local<S, X>>,
    /// Bounds each call through the log or the leader (`None`: the peer's `request_timeout_ms`).
    pub(crate) timeout: Option<Duration>,
    /// Carried by every write: applied only while this lock is held under its token.
    pub(crate) fence: Option<Fence>,
}

impl<S, X> Clone for Handle<S, X> {
    fn clone(&self) -> Self {
        Handle {
            hamok: self.hamok.clone(),
            local: self.local.clone(),
            timeout: self.timeout,
            fence: self.fence.clone(),
        }
    }
}

impl<S, X> Handle<S, X> {
    /// The same handle group, with each call bounded by `timeout`.
    pub(crate) fn with_timeout(&self, timeout: Duration) -> Self {
        Handle {
            timeout: Some(timeout),
            ..self.clone()
        }
    }

    /// The same handle group, every write carrying `fence`.
    pub(crate) fn with_fence(&self, fence: Fence) -> Self {
        Handle {
            fence: Some(fence),
            ..self.clone()
        }
    }

    /// The bound of one call.
    pub(crate) fn call_timeout(&self) -> Duration {
        self.timeout
            .unwrap_or_else(|| Duration::from_millis(self.hamok.config().request_timeout_ms))
    }

    /// Submits a command through the log and decodes the machine's response.
    pub(crate) async fn submit<C: Serialize, R: DeserializeOwned>(
        &self,
        cmd: C,
    ) -> Result<R, HamokError> {
        self.local.check_open()?;
        let payload = encode_to_vec(&Envelope::Op(cmd))?;
        let op = Op::Apply {
            collection: self.local.id.clone().into(),
            payload: payload.into(),
            fence: self.fence.clone(),
        };
        let response = self
            .hamok
            .submit_op_with_timeout(op, self.call_timeout())
            .await?;
        // The command was applied: a response that does not decode says so.
        decode(&response).map_err(HamokError::after_apply)
    }

    /// A typed event stream; the first one starts watching the peer for `Close` (only subscribers need
    /// it, so handles without subscribers cost no task).
    pub(crate) fn events<T>(&self, decode: fn(Raw) -> Result<T, HamokError>) -> Events<T>
    where
        S: Serialize + Send + Sync + 'static,
        X: Send + Sync + 'static,
    {
        self.watch_close();
        Events::new(&self.local, decode)
    }

    /// Starts watching the peer for `Close` (once per handle group), so the group learns it is closed.
    pub(crate) fn watch_close(&self)
    where
        S: Send + Sync + 'static,
        X: Send + Sync + 'static,
    {
        if !self.local.watching.swap(true, Ordering::AcqRel) {
            watch_close(&self.hamok, &self.local);
        }
    }

    /// Waits until this peer has applied every write acknowledged anywhere before the call.
    pub(crate) async fn sync(&self) -> Result<(), HamokError> {
        self.local.check_open()?;
        self.hamok
            .wait_until_linearizable(self.call_timeout())
            .await
            .map(|_| ())
    }
}

/// [`Opened`] for a handle built from the handle group alone (no options, no per-peer extra, no
/// background work): `plain_opened!(HamokSet<T>, SetLogic, SET_KIND)`.
macro_rules! plain_opened {
    ($name:ident<$($t:ident),+>, $logic:ty, $kind:expr) => {
        impl<$($t),+> $crate::common::Opened for $name<$($t),+>
        where
            $($t: serde::Serialize + serde::de::DeserializeOwned,)+
        {
            type Logic = $logic;
            type Options = ();

            fn kind(_id: &str) -> String {
                $kind.to_string()
            }

            fn extra(_id: &str) {}

            async fn finish(
                handle: $crate::common::LogicHandle<$logic>,
                _options: (),
            ) -> Result<Self, hamok_runtime::HamokError> {
                Ok($name::new(handle))
            }
        }
    };
}
pub(crate) use plain_opened;

/// What every typed handle has alike: its id, and a copy bounded by a per-call timeout. The handle type
/// has a `handle: Handle<..>` field and implements `Clone`.
macro_rules! handle_basics {
    ($name:ident<$($t:ident),+>) => {
        impl<$($t),+> $name<$($t),+> {
            /// The collection's id.
            pub fn id(&self) -> &str {
                &self.handle.local.id
            }

            /// A handle to the same collection (same local state, events and background work) whose
            /// every call through the log or the leader (writes, `sync`, linearizable reads) is bounded
            /// by `timeout` instead of the peer's `request_timeout_ms`. A call that runs out fails with
            /// [`HamokError::Timeout`](hamok_runtime::HamokError::Timeout) (it may still take effect:
            /// see [`HamokError::may_have_taken_effect`](hamok_runtime::HamokError::may_have_taken_effect)),
            /// or [`HamokError::NoQuorum`](hamok_runtime::HamokError::NoQuorum) if it never reached a
            /// leader. Other clones keep their own bound.
            pub fn with_timeout(&self, timeout: std::time::Duration) -> Self {
                Self {
                    handle: self.handle.with_timeout(timeout),
                    ..self.clone()
                }
            }

            /// A handle to the same collection whose every write carries `fence` (from a lock
            /// guard: [`LockGuard::fence`](crate::LockGuard::fence)): the write is applied only while
            /// that lock is still held under that token, decided at apply time in log order, and is
            /// otherwise refused with
            /// [`HamokError::StaleFence`](hamok_runtime::HamokError::StaleFence) (not applied). A holder
            /// that lost its lock can therefore not overwrite what the next holder wrote.
            pub fn fenced(&self, fence: hamok_runtime::state_machine::Fence) -> Self {
                Self {
                    handle: self.handle.with_fence(fence),
                    ..self.clone()
                }
            }
        }
    };
}
pub(crate) use handle_basics;

/// Decodes a machine's command envelope; an undecodable command is a deterministic rejection.
pub(crate) fn decode_command<C: DeserializeOwned>(
    command: &[u8],
) -> Result<Envelope<C>, HamokError> {
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

    /// The scratch buffer of `encode`: every size round-trips, whatever was encoded before it on
    /// the thread, and a big encoding does not stay as the buffer's room.
    #[test]
    fn encode_copies_out_exact_bytes_of_every_size() {
        for len in [0usize, 1, 7, 31, 200, SCRATCH_KEEP_BYTES + 1, 3, 1 << 20, 5] {
            let value = (len as u64, "v".repeat(len));
            let bytes = encode(&value).unwrap();
            assert_eq!(&bytes[..], &rmp_serde::to_vec(&value).unwrap()[..], "{len}");
            assert_eq!(encode_to_vec(&value).unwrap(), &bytes[..], "{len}");
            assert_eq!(decode::<(u64, String)>(&bytes).unwrap(), value);
            let room = SCRATCH.with(|s| s.borrow().capacity());
            assert!(room <= 2 * SCRATCH_KEEP_BYTES, "{len}: {room}");
        }
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
        let a = encode(&Envelope::<()>::Init).unwrap();
        let b = encode(&Envelope::<Vec<(Bytes, Bytes)>>::Init).unwrap();
        assert_eq!(a, b);
        let w: Envelope<String> = decode_command(&a).unwrap();
        assert!(matches!(w, Envelope::Init));
    }
}
