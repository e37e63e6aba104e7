//! [`HamokRemoteMap`]: a map whose data lives in an external store (e.g. a Redis hash, see
//! [`RedisRemoteMap`](crate::RedisRemoteMap)), with Raft ordering its mutations.
//!
//! # Exactly once, in log order, across leader changes
//!
//! The state machine does no I/O (apply must be deterministic): applying a mutation only records it as
//! *pending*, under its log index, on every peer. The **leader's executor** takes pending mutations in
//! log order and executes each against the store with its log index, through
//! [`RemoteMap::execute`]. The store applies a mutation and records its index **atomically, only if
//! the index is above the last one it recorded** (the Redis implementation runs one Lua script per
//! mutation that reads the hash's `__hamok_applied_index` field, writes the data and the field, or
//! does nothing). So:
//!
//! - a mutation executed by the old leader just before it lost leadership, and executed again by the
//!   new leader from its pending list, reaches the store once: the second execution is skipped;
//! - two executors that both believe they lead (an old leader not yet aware it was deposed) cannot
//!   apply a mutation twice or out of order: each executes in log order, and the index check admits
//!   index `i` only once and only after everything before it;
//! - a mutation committed but not yet executed when the leader dies is executed by the next leader
//!   (every peer has the pending list: it is replicated state, and part of the snapshot).
//!
//! After a batch, the executor submits an `Executed(up_to)` command, so every peer prunes its pending
//! list deterministically. The executor delivers each result to the peer that submitted the mutation
//! (directly, or by a direct message), which is how `set` returns the old value. The store also records
//! each mutation's outcome with it ([`RemoteMap::outcome`]; the Redis implementation keeps the last
//! 100,000 indices), so when a new leader finds a mutation already executed by a leader that was cut off
//! before it could answer, it answers the caller from the recorded outcome. Only with a store that keeps
//! no outcomes (or a caller whose own peer is cut off) does a caller get [`HamokError::Timeout`] for a
//! mutation that was applied (exactly once).
//!
//! A store error that is not deterministic (connection lost) is retried, with backoff, for as long as
//! the peer leads: mutations are never skipped, so the store never sees them out of order. A rejection
//! ([`HamokError::Rejected`], e.g. the key holds a non-hash value) is reported to the caller and the
//! executor moves on.
//!
//! Every peer that may lead must run the executor: register the map's kind on every peer with
//! [`register_remote_map`](crate::register_remote_map) and open the map
//! ([`HamokCollections::get_or_create_remote_map`](crate::HamokCollections)) on every peer at start-up.
//!
//! Reads ([`HamokRemoteMap::get`], `keys`, `len`, iteration) go straight to the store: they see every
//! mutation whose call returned, and maybe some still in flight. Events ([`HamokRemoteMap::events`]:
//! insert, update, remove, clear) are sent by the executing leader to every peer after each mutation.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use hamok_runtime::raft::LogIndex;
use hamok_runtime::HamokError;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::oneshot;

use crate::common::{
    decode, encode, handle_basics, Events, Handle, Local, LogicHandle, Opened, ResyncFn, Resynced,
    Types,
};
use crate::map::{MapEvent, MapState};

mod executor;
mod machine;
mod store;

use executor::{start, RemoteExtra};
pub(crate) use machine::RemoteMapLogic;
use machine::{RemoteCmd, RemoteState};
pub use store::{MemoryRemoteMap, RemoteMap, RemoteOp, RemoteOutcome};

/// The prefix of the kinds remote maps are registered under (one kind per map id, since each map has its
/// own store).
pub const REMOTE_MAP_KIND_PREFIX: &str = "hamok.remote-map/";

/// The kind of the remote map `id`.
pub fn remote_map_kind(id: &str) -> String {
    format!("{REMOTE_MAP_KIND_PREFIX}{id}")
}

/// Most mutations pending (committed, not yet known executed) per remote map; further mutations are
/// refused with [`HamokError::Busy`] until the store catches up.
pub const MAX_PENDING_MUTATIONS: usize = 100_000;

/// A replicated map of `K` to `V` whose data lives in a [`RemoteMap`] store. Cheap to clone.
///
/// Mutations resolve once executed against the store (exactly once, in log order); reads go to the
/// store.
pub struct HamokRemoteMap<K, V> {
    handle: Handle<RemoteState, RemoteExtra>,
    _types: Types<(K, V)>,
}

impl<K, V> Clone for HamokRemoteMap<K, V> {
    fn clone(&self) -> Self {
        HamokRemoteMap {
            handle: self.handle.clone(),
            _types: Types::default(),
        }
    }
}

impl<K, V> std::fmt::Debug for HamokRemoteMap<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HamokRemoteMap")
            .field("id", &self.handle.local.id)
            .finish()
    }
}

fn encode_pairs<K: Serialize, V: Serialize>(
    entries: impl IntoIterator<Item = (K, V)>,
) -> Result<Vec<(Bytes, Bytes)>, HamokError> {
    entries
        .into_iter()
        .map(|(k, v)| Ok((encode(&k)?, encode(&v)?)))
        .collect()
}

fn encode_keys<K: Serialize>(keys: impl IntoIterator<Item = K>) -> Result<Vec<Bytes>, HamokError> {
    keys.into_iter().map(|k| encode(&k)).collect()
}

fn unexpected() -> HamokError {
    HamokError::codec("remote map: unexpected outcome", None)
}

impl<K, V> Opened for HamokRemoteMap<K, V>
where
    K: Serialize + DeserializeOwned,
    V: Serialize + DeserializeOwned,
{
    type Logic = RemoteMapLogic;
    type Options = ();

    fn kind(id: &str) -> String {
        remote_map_kind(id)
    }

    fn extra(id: &str) -> RemoteExtra {
        RemoteExtra::new(id)
    }

    async fn finish(handle: LogicHandle<RemoteMapLogic>, _options: ()) -> Result<Self, HamokError> {
        start(&handle.hamok, &handle.local).await?;
        Ok(HamokRemoteMap::new(handle))
    }
}

handle_basics!(HamokRemoteMap<K, V>);

impl<K, V> HamokRemoteMap<K, V> {
    fn store(&self) -> Result<&Arc<dyn RemoteMap>, HamokError> {
        self.handle.local.check_open()?;
        self.handle
            .local
            .extra
            .store
            .get()
            .ok_or_else(|| HamokError::Rejected("remote map has no store".into()))
    }

    /// Mutations committed on this peer and not yet known executed.
    pub fn pending(&self) -> usize {
        self.handle.local.read(|s| s.pending.len())
    }

    /// Number of entries (from the store).
    pub async fn len(&self) -> Result<usize, HamokError> {
        self.store()?.len().await
    }

    /// Whether the store holds no entry.
    pub async fn is_empty(&self) -> Result<bool, HamokError> {
        Ok(self.len().await? == 0)
    }

    /// Removes every entry.
    pub async fn clear(&self) -> Result<(), HamokError> {
        self.mutate(RemoteOp::Clear).await.map(|_| ())
    }

    /// Subscribes to the changes executed against the store, on this peer: the executing leader sends
    /// them to every peer after each mutation (best effort: unlike a [`HamokMap`](crate::HamokMap)'s
    /// events they are not part of the log, so a peer cut off at that moment misses them, and an
    /// installed snapshot brings no [`MapEvent::Resync`]).
    ///
    /// A subscriber that falls more than [`EVENT_CAPACITY`](crate::EVENT_CAPACITY) events behind gets a
    /// [`MapEvent::Resync`] with [`ResyncReason::Lagged`](crate::ResyncReason::Lagged) instead of the
    /// events it missed: its `entries` are read from the store after the lag (retried while the store
    /// fails), so the events after it may already be in them. Not exact as a
    /// [`HamokMap`](crate::HamokMap)'s, but replaying `Resync`, then the events, still converges to the
    /// store's content: each event sets what it describes.
    pub fn events(&self) -> Events<MapEvent<K, V>>
    where
        K: DeserializeOwned,
        V: DeserializeOwned,
    {
        self.handle.watch_close();
        let local = self.handle.local.clone();
        let runtime = tokio::runtime::Handle::current();
        let resync: ResyncFn = Arc::new(move |rx| {
            *rx = rx.resubscribe();
            let (tx, state) = oneshot::channel();
            runtime.spawn(read_store(local.clone(), tx));
            Resynced::Later(state)
        });
        Events::with_resync(
            self.handle.local.events.subscribe(),
            crate::map::decode_event::<K, V>,
            resync,
        )
    }

    /// Closes this peer's handles (the executor stops once they are all dropped).
    pub fn close(&self) {
        self.handle.local.close();
    }

    async fn mutate(&self, op: RemoteOp) -> Result<RemoteOutcome, HamokError> {
        self.handle.local.check_open()?;
        let extra = &self.handle.local.extra;
        let req = extra.next_req.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        extra
            .waiters
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(req, tx);
        let forget = || {
            extra
                .waiters
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&req);
        };
        // One bound for the whole call: ordering through the log, then execution by the leader.
        let timeout = self.handle.call_timeout();
        let started = tokio::time::Instant::now();
        let submitted: Result<LogIndex, HamokError> =
            self.handle.submit(RemoteCmd::Mutate { req, op }).await;
        if let Err(e) = submitted {
            forget();
            return Err(e);
        }
        match tokio::time::timeout(timeout.saturating_sub(started.elapsed()), rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(HamokError::Closed),
            Err(_) => {
                forget();
                // Ordered in the log: it will be executed, exactly once, whether or not we wait.
                Err(HamokError::timeout(timeout))
            }
        }
    }
}

impl<K, V> HamokRemoteMap<K, V>
where
    K: Serialize + DeserializeOwned,
    V: Serialize + DeserializeOwned,
{
    pub(crate) fn new(handle: Handle<RemoteState, RemoteExtra>) -> Self {
        HamokRemoteMap {
            handle,
            _types: Types::default(),
        }
    }

    async fn values_op(&self, op: RemoteOp) -> Result<Vec<Option<Bytes>>, HamokError> {
        match self.mutate(op).await? {
            RemoteOutcome::Values(v) => Ok(v),
            _ => Err(unexpected()),
        }
    }

    /// Sets `key` to `value`; returns the previous value.
    pub async fn set(&self, key: K, value: V) -> Result<Option<V>, HamokError> {
        let olds = self
            .values_op(RemoteOp::Set(vec![(encode(&key)?, encode(&value)?)]))
            .await?;
        first(olds)
    }

    /// Sets every entry, atomically; returns the entries that had a previous value, with it.
    pub async fn set_all(
        &self,
        entries: impl IntoIterator<Item = (K, V)>,
    ) -> Result<Vec<(K, V)>, HamokError> {
        let entries = encode_pairs(entries)?;
        let keys: Vec<Bytes> = entries.iter().map(|(k, _)| k.clone()).collect();
        zip_some(keys, self.values_op(RemoteOp::Set(entries)).await?)
    }

    /// Sets `key` only if absent (never overwrites); returns the existing value if there was one.
    pub async fn insert(&self, key: K, value: V) -> Result<Option<V>, HamokError> {
        let existing = self
            .values_op(RemoteOp::Insert(vec![(encode(&key)?, encode(&value)?)]))
            .await?;
        first(existing)
    }

    /// [`HamokRemoteMap::insert`] for every entry, atomically; returns the entries that already existed.
    pub async fn insert_all(
        &self,
        entries: impl IntoIterator<Item = (K, V)>,
    ) -> Result<Vec<(K, V)>, HamokError> {
        let entries = encode_pairs(entries)?;
        let keys: Vec<Bytes> = entries.iter().map(|(k, _)| k.clone()).collect();
        zip_some(keys, self.values_op(RemoteOp::Insert(entries)).await?)
    }

    /// Removes `key`; returns the value it held.
    pub async fn remove(&self, key: K) -> Result<Option<V>, HamokError> {
        first(
            self.values_op(RemoteOp::Remove(vec![encode(&key)?]))
                .await?,
        )
    }

    /// Removes every key, atomically; returns the removed entries.
    pub async fn remove_all(
        &self,
        keys: impl IntoIterator<Item = K>,
    ) -> Result<Vec<(K, V)>, HamokError> {
        let keys = encode_keys(keys)?;
        let removed = self.values_op(RemoteOp::Remove(keys.clone())).await?;
        zip_some(keys, removed)
    }

    /// Deletes `key`; returns whether it existed.
    pub async fn delete(&self, key: K) -> Result<bool, HamokError> {
        let removed = self
            .values_op(RemoteOp::Remove(vec![encode(&key)?]))
            .await?;
        Ok(removed.into_iter().next().flatten().is_some())
    }

    /// Deletes every key, atomically; returns the keys that existed.
    pub async fn delete_all(
        &self,
        keys: impl IntoIterator<Item = K>,
    ) -> Result<Vec<K>, HamokError> {
        let keys = encode_keys(keys)?;
        let removed = self.values_op(RemoteOp::Remove(keys.clone())).await?;
        keys.iter()
            .zip(removed)
            .filter(|(_, v)| v.is_some())
            .map(|(k, _)| decode(k))
            .collect()
    }

    /// Sets `key` to `new` only if it holds `expected` when the mutation executes; returns whether it did.
    pub async fn update_if(&self, key: K, new: V, expected: V) -> Result<bool, HamokError> {
        match self
            .mutate(RemoteOp::UpdateIf {
                key: encode(&key)?,
                new: encode(&new)?,
                expected: encode(&expected)?,
            })
            .await?
        {
            RemoteOutcome::Bool(b) => Ok(b),
            _ => Err(unexpected()),
        }
    }

    /// The value of `key` (from the store).
    pub async fn get(&self, key: &K) -> Result<Option<V>, HamokError> {
        match self.store()?.get(&encode(key)?).await? {
            Some(v) => Ok(Some(decode(&v)?)),
            None => Ok(None),
        }
    }

    /// The entries of the present keys among `keys` (from the store).
    pub async fn get_all<'a>(
        &self,
        keys: impl IntoIterator<Item = &'a K>,
    ) -> Result<Vec<(K, V)>, HamokError>
    where
        K: 'a,
    {
        let keys: Vec<Bytes> = keys
            .into_iter()
            .map(|k| encode(k))
            .collect::<Result<_, _>>()?;
        let values = self.store()?.get_all(&keys).await?;
        zip_some(keys, values)
    }

    /// Every key (from the store).
    pub async fn keys(&self) -> Result<Vec<K>, HamokError> {
        let keys = self.store()?.keys().await?;
        keys.iter().map(|k| decode(k)).collect()
    }

    /// Iterates over the entries page by page (from the store).
    pub fn iter(&self) -> RemoteMapIter<K, V> {
        RemoteMapIter {
            store: self.store().ok().cloned(),
            cursor: 0,
            started: false,
            buffer: std::collections::VecDeque::new(),
            _types: Types::default(),
        }
    }

    /// Every entry (from the store).
    pub async fn entries(&self) -> Result<Vec<(K, V)>, HamokError> {
        let mut it = self.iter();
        let mut out = Vec::new();
        while let Some(entry) = it.next().await {
            out.push(entry?);
        }
        Ok(out)
    }
}

/// An asynchronous iterator over a remote map's entries, fetched from the store in pages.
pub struct RemoteMapIter<K, V> {
    store: Option<Arc<dyn RemoteMap>>,
    cursor: u64,
    started: bool,
    buffer: std::collections::VecDeque<(Bytes, Bytes)>,
    _types: Types<(K, V)>,
}

/// Entries fetched per page by [`RemoteMapIter`].
const PAGE: usize = 256;

impl<K: DeserializeOwned, V: DeserializeOwned> RemoteMapIter<K, V> {
    /// The next entry; `None` at the end.
    pub async fn next(&mut self) -> Option<Result<(K, V), HamokError>> {
        loop {
            if let Some((k, v)) = self.buffer.pop_front() {
                return Some(decode(&k).and_then(|k| Ok((k, decode(&v)?))));
            }
            if self.started && self.cursor == 0 {
                return None;
            }
            let Some(store) = &self.store else {
                return Some(Err(HamokError::Closed));
            };
            self.started = true;
            match store.scan(self.cursor, PAGE).await {
                Ok((next, page)) => {
                    self.cursor = next;
                    self.buffer.extend(page);
                }
                Err(e) => {
                    self.cursor = 0;
                    return Some(Err(e));
                }
            }
        }
    }
}

/// Reads every entry of the store, for a lagging event stream's `Resync` (encoded as a map's state, so
/// the map's event decoder reads it); retries while the store fails and the stream waits.
async fn read_store(local: Arc<Local<RemoteState, RemoteExtra>>, tx: oneshot::Sender<Bytes>) {
    let mut backoff = Duration::from_millis(10);
    loop {
        let Some(store) = local.extra.store.get() else {
            return;
        };
        if local.is_closed() || tx.is_closed() {
            return;
        }
        match scan_all(store.as_ref()).await {
            Ok(entries) => {
                match encode(&MapState { entries }) {
                    Ok(state) => {
                        let _ = tx.send(state);
                    }
                    Err(e) => tracing::error!("remote map `{}`: resync failed: {e}", local.id),
                }
                return;
            }
            Err(e) => {
                tracing::debug!(
                    "remote map `{}`: reading the store to resync: {e}",
                    local.id
                );
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// Every entry of `store`, page by page.
async fn scan_all(store: &dyn RemoteMap) -> Result<BTreeMap<Bytes, Bytes>, HamokError> {
    let mut entries = BTreeMap::new();
    let mut cursor = 0;
    loop {
        let (next, page) = store.scan(cursor, PAGE).await?;
        entries.extend(page);
        if next == 0 {
            return Ok(entries);
        }
        cursor = next;
    }
}

fn first<V: DeserializeOwned>(values: Vec<Option<Bytes>>) -> Result<Option<V>, HamokError> {
    match values.into_iter().next().flatten() {
        Some(v) => Ok(Some(decode(&v)?)),
        None => Ok(None),
    }
}

fn zip_some<K: DeserializeOwned, V: DeserializeOwned>(
    keys: Vec<Bytes>,
    values: Vec<Option<Bytes>>,
) -> Result<Vec<(K, V)>, HamokError> {
    keys.iter()
        .zip(values)
        .filter_map(|(k, v)| v.map(|v| (k, v)))
        .map(|(k, v)| Ok((decode(k)?, decode(&v)?)))
        .collect()
}
