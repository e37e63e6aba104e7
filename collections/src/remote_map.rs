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

use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use hamok_runtime::raft::{LogIndex, PeerId};
use hamok_runtime::state_machine::{ApplyContext, StateMachine};
use hamok_runtime::{Hamok, HamokError};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, Notify};

use crate::common::{
    decode, decode_command, encode, write_lock, Collection, Core, Events, Handle, Local, Raw,
    Types, Wire,
};
use crate::map::MapEvent;

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

/// Most mutations one executor round executes before recording them as executed.
const EXECUTE_BATCH: usize = 256;

/// A mutation of a remote map; keys and values are encoded bytes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RemoteOp {
    /// Set every entry; the outcome is the previous values ([`RemoteOutcome::Values`]).
    Set(Vec<(Bytes, Bytes)>),
    /// Set every absent key, never overwriting; the outcome is the existing values (`None` = inserted).
    Insert(Vec<(Bytes, Bytes)>),
    /// Remove every key; the outcome is the removed values.
    Remove(Vec<Bytes>),
    /// Set `key` to `new` if it holds `expected`; the outcome is whether it did ([`RemoteOutcome::Bool`]).
    UpdateIf {
        /// The key.
        key: Bytes,
        /// The new value.
        new: Bytes,
        /// The value it must hold.
        expected: Bytes,
    },
    /// Remove every entry ([`RemoteOutcome::Done`]).
    Clear,
}

/// What executing a [`RemoteOp`] produced.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RemoteOutcome {
    /// One optional value per key of the operation, in order.
    Values(Vec<Option<Bytes>>),
    /// A condition's result.
    Bool(bool),
    /// Done, nothing to report.
    Done,
}

/// An external key-value store holding a remote map's data (keys and values are encoded bytes).
///
/// Mutations carry the log index that ordered them. An implementation must apply a mutation **and**
/// record its index atomically, and only if the index is greater than the last recorded one; otherwise
/// it must leave the store untouched and answer `Ok(None)`. That is what makes execution exactly-once
/// across leader changes (see the [module documentation](self)).
#[async_trait]
pub trait RemoteMap: Send + Sync + 'static {
    /// The value of `key`.
    async fn get(&self, key: &[u8]) -> Result<Option<Bytes>, HamokError>;
    /// The values of `keys`, in order.
    async fn get_all(&self, keys: &[Bytes]) -> Result<Vec<Option<Bytes>>, HamokError>;
    /// Every key.
    async fn keys(&self) -> Result<Vec<Bytes>, HamokError>;
    /// Number of entries.
    async fn len(&self) -> Result<usize, HamokError>;
    /// Whether there is no entry.
    async fn is_empty(&self) -> Result<bool, HamokError> {
        Ok(self.len().await? == 0)
    }
    /// One page of entries from `cursor` (0 to start); the next cursor is 0 at the end. Pages may
    /// overlap if the map changes meanwhile.
    async fn scan(
        &self,
        cursor: u64,
        count: usize,
    ) -> Result<(u64, Vec<(Bytes, Bytes)>), HamokError>;
    /// The last log index executed.
    async fn applied_index(&self) -> Result<LogIndex, HamokError>;

    /// Sets every entry at log index `index`; previous values, or `None` if `index` was executed already.
    async fn set_all(
        &self,
        index: LogIndex,
        entries: &[(Bytes, Bytes)],
    ) -> Result<Option<Vec<Option<Bytes>>>, HamokError>;
    /// Sets every absent key at `index`; existing values (`None` = inserted), or `None` if executed already.
    async fn insert_all(
        &self,
        index: LogIndex,
        entries: &[(Bytes, Bytes)],
    ) -> Result<Option<Vec<Option<Bytes>>>, HamokError>;
    /// Removes every key at `index`; removed values, or `None` if executed already.
    async fn remove_all(
        &self,
        index: LogIndex,
        keys: &[Bytes],
    ) -> Result<Option<Vec<Option<Bytes>>>, HamokError>;
    /// Compare-and-set at `index`; whether it set, or `None` if executed already.
    async fn update_if(
        &self,
        index: LogIndex,
        key: &[u8],
        new: &[u8],
        expected: &[u8],
    ) -> Result<Option<bool>, HamokError>;
    /// Removes every entry at `index`; `None` if executed already.
    async fn clear(&self, index: LogIndex) -> Result<Option<()>, HamokError>;

    /// The outcome recorded when `index` was executed, if the store still has it (`None` if it keeps
    /// no outcomes, the default). An executor that finds a mutation already executed — by a leader cut
    /// off before it could answer — uses it to answer the caller instead of letting it time out.
    async fn outcome(&self, index: LogIndex) -> Result<Option<RemoteOutcome>, HamokError> {
        let _ = index;
        Ok(None)
    }

    /// Sets one entry at `index` (see [`RemoteMap::set_all`]).
    async fn set(
        &self,
        index: LogIndex,
        key: Bytes,
        value: Bytes,
    ) -> Result<Option<Option<Bytes>>, HamokError> {
        Ok(self
            .set_all(index, &[(key, value)])
            .await?
            .map(|v| v.into_iter().next().flatten()))
    }

    /// Removes one key at `index` (see [`RemoteMap::remove_all`]).
    async fn remove(
        &self,
        index: LogIndex,
        key: Bytes,
    ) -> Result<Option<Option<Bytes>>, HamokError> {
        Ok(self
            .remove_all(index, &[key])
            .await?
            .map(|v| v.into_iter().next().flatten()))
    }

    /// Executes `op` at `index`: `None` if `index` was executed already.
    async fn execute(
        &self,
        index: LogIndex,
        op: &RemoteOp,
    ) -> Result<Option<RemoteOutcome>, HamokError> {
        Ok(match op {
            RemoteOp::Set(entries) => self
                .set_all(index, entries)
                .await?
                .map(RemoteOutcome::Values),
            RemoteOp::Insert(entries) => self
                .insert_all(index, entries)
                .await?
                .map(RemoteOutcome::Values),
            RemoteOp::Remove(keys) => self
                .remove_all(index, keys)
                .await?
                .map(RemoteOutcome::Values),
            RemoteOp::UpdateIf { key, new, expected } => self
                .update_if(index, key, new, expected)
                .await?
                .map(RemoteOutcome::Bool),
            RemoteOp::Clear => self.clear(index).await?.map(|()| RemoteOutcome::Done),
        })
    }
}

/// A [`RemoteMap`] in this process's memory: for tests and examples, and to show the contract. It
/// keeps the outcomes of the last 10,000 executed indices.
#[derive(Default)]
pub struct MemoryRemoteMap {
    inner: Mutex<(LogIndex, BTreeMap<Bytes, Bytes>)>,
    outcomes: Mutex<BTreeMap<LogIndex, RemoteOutcome>>,
}

impl MemoryRemoteMap {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn with<R>(
        &self,
        index: LogIndex,
        f: impl FnOnce(&mut BTreeMap<Bytes, Bytes>) -> R,
    ) -> Option<R> {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if index <= inner.0 {
            return None;
        }
        inner.0 = index;
        Some(f(&mut inner.1))
    }

    fn read<R>(&self, f: impl FnOnce(&BTreeMap<Bytes, Bytes>) -> R) -> R {
        f(&self.inner.lock().unwrap_or_else(PoisonError::into_inner).1)
    }
}

#[async_trait]
impl RemoteMap for MemoryRemoteMap {
    async fn get(&self, key: &[u8]) -> Result<Option<Bytes>, HamokError> {
        Ok(self.read(|m| m.get(key).cloned()))
    }
    async fn get_all(&self, keys: &[Bytes]) -> Result<Vec<Option<Bytes>>, HamokError> {
        Ok(self.read(|m| keys.iter().map(|k| m.get(k).cloned()).collect()))
    }
    async fn keys(&self) -> Result<Vec<Bytes>, HamokError> {
        Ok(self.read(|m| m.keys().cloned().collect()))
    }
    async fn len(&self) -> Result<usize, HamokError> {
        Ok(self.read(|m| m.len()))
    }
    async fn scan(
        &self,
        cursor: u64,
        count: usize,
    ) -> Result<(u64, Vec<(Bytes, Bytes)>), HamokError> {
        let count = count.max(1);
        Ok(self.read(|m| {
            let page: Vec<(Bytes, Bytes)> = m
                .iter()
                .skip(cursor as usize)
                .take(count)
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            let next = cursor + page.len() as u64;
            let next = if next as usize >= m.len() { 0 } else { next };
            (next, page)
        }))
    }
    async fn applied_index(&self) -> Result<LogIndex, HamokError> {
        Ok(self.inner.lock().unwrap_or_else(PoisonError::into_inner).0)
    }
    async fn set_all(
        &self,
        index: LogIndex,
        entries: &[(Bytes, Bytes)],
    ) -> Result<Option<Vec<Option<Bytes>>>, HamokError> {
        Ok(self.with(index, |m| {
            entries
                .iter()
                .map(|(k, v)| m.insert(k.clone(), v.clone()))
                .collect()
        }))
    }
    async fn insert_all(
        &self,
        index: LogIndex,
        entries: &[(Bytes, Bytes)],
    ) -> Result<Option<Vec<Option<Bytes>>>, HamokError> {
        Ok(self.with(index, |m| {
            entries
                .iter()
                .map(|(k, v)| match m.get(k) {
                    Some(existing) => Some(existing.clone()),
                    None => {
                        m.insert(k.clone(), v.clone());
                        None
                    }
                })
                .collect()
        }))
    }
    async fn remove_all(
        &self,
        index: LogIndex,
        keys: &[Bytes],
    ) -> Result<Option<Vec<Option<Bytes>>>, HamokError> {
        Ok(self.with(index, |m| keys.iter().map(|k| m.remove(k)).collect()))
    }
    async fn update_if(
        &self,
        index: LogIndex,
        key: &[u8],
        new: &[u8],
        expected: &[u8],
    ) -> Result<Option<bool>, HamokError> {
        Ok(self.with(index, |m| {
            let hit = m.get(key).is_some_and(|v| v[..] == *expected);
            if hit {
                m.insert(Bytes::copy_from_slice(key), Bytes::copy_from_slice(new));
            }
            hit
        }))
    }
    async fn clear(&self, index: LogIndex) -> Result<Option<()>, HamokError> {
        Ok(self.with(index, |m| m.clear()))
    }
    async fn outcome(&self, index: LogIndex) -> Result<Option<RemoteOutcome>, HamokError> {
        Ok(self
            .outcomes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&index)
            .cloned())
    }
    async fn execute(
        &self,
        index: LogIndex,
        op: &RemoteOp,
    ) -> Result<Option<RemoteOutcome>, HamokError> {
        let outcome = match op {
            RemoteOp::Set(entries) => self
                .set_all(index, entries)
                .await?
                .map(RemoteOutcome::Values),
            RemoteOp::Insert(entries) => self
                .insert_all(index, entries)
                .await?
                .map(RemoteOutcome::Values),
            RemoteOp::Remove(keys) => self
                .remove_all(index, keys)
                .await?
                .map(RemoteOutcome::Values),
            RemoteOp::UpdateIf { key, new, expected } => self
                .update_if(index, key, new, expected)
                .await?
                .map(RemoteOutcome::Bool),
            RemoteOp::Clear => self.clear(index).await?.map(|()| RemoteOutcome::Done),
        };
        if let Some(outcome) = &outcome {
            let mut outcomes = self.outcomes.lock().unwrap_or_else(PoisonError::into_inner);
            outcomes.insert(index, outcome.clone());
            let keep = outcomes.split_off(&index.saturating_sub(10_000));
            *outcomes = keep;
        }
        Ok(outcome)
    }
}

// -------------------------------------------------------------------------------------------------
// The state machine

/// A mutation committed and not yet known executed.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct PendingOp {
    client: PeerId,
    req: u64,
    op: RemoteOp,
}

/// The replicated part of a remote map: the pending mutations.
#[derive(Default, Serialize, Deserialize)]
pub(crate) struct RemoteState {
    pending: BTreeMap<LogIndex, PendingOp>,
    executed_up_to: LogIndex,
}

#[derive(Serialize, Deserialize)]
enum RemoteCmd {
    /// A mutation; answers its log index.
    Mutate { req: u64, op: RemoteOp },
    /// Mutations up to this index are executed: forget them.
    Executed(LogIndex),
}

/// Direct messages: an executor delivering a result to the submitter, or telling every peer what a
/// mutation changed.
#[derive(Serialize, Deserialize)]
enum RemoteMsg {
    Outcome {
        req: u64,
        result: Result<RemoteOutcome, String>,
    },
    Events(Vec<RemoteEvent>),
}

/// A change a mutation made to the store, as sent to every peer.
#[derive(Clone, Serialize, Deserialize)]
enum RemoteEvent {
    Insert { key: Bytes, value: Bytes },
    Update { key: Bytes, old: Bytes, new: Bytes },
    Remove { key: Bytes, value: Bytes },
    Clear,
}

impl From<RemoteEvent> for Raw {
    fn from(e: RemoteEvent) -> Raw {
        match e {
            RemoteEvent::Insert { key, value } => Raw::Insert { key, value },
            RemoteEvent::Update { key, old, new } => Raw::Update { key, old, new },
            RemoteEvent::Remove { key, value } => Raw::Remove { key, value },
            RemoteEvent::Clear => Raw::Clear,
        }
    }
}

/// What `op` changed, given its outcome.
fn changes(op: &RemoteOp, outcome: &RemoteOutcome) -> Vec<RemoteEvent> {
    match (op, outcome) {
        (RemoteOp::Set(entries), RemoteOutcome::Values(olds)) => entries
            .iter()
            .zip(olds)
            .map(|((key, value), old)| match old {
                Some(old) => RemoteEvent::Update {
                    key: key.clone(),
                    old: old.clone(),
                    new: value.clone(),
                },
                None => RemoteEvent::Insert {
                    key: key.clone(),
                    value: value.clone(),
                },
            })
            .collect(),
        (RemoteOp::Insert(entries), RemoteOutcome::Values(existing)) => entries
            .iter()
            .zip(existing)
            .filter(|(_, e)| e.is_none())
            .map(|((key, value), _)| RemoteEvent::Insert {
                key: key.clone(),
                value: value.clone(),
            })
            .collect(),
        (RemoteOp::Remove(keys), RemoteOutcome::Values(removed)) => keys
            .iter()
            .zip(removed)
            .filter_map(|(key, v)| {
                v.as_ref().map(|value| RemoteEvent::Remove {
                    key: key.clone(),
                    value: value.clone(),
                })
            })
            .collect(),
        (RemoteOp::UpdateIf { key, new, expected }, RemoteOutcome::Bool(true)) => {
            vec![RemoteEvent::Update {
                key: key.clone(),
                old: expected.clone(),
                new: new.clone(),
            }]
        }
        (RemoteOp::Clear, RemoteOutcome::Done) => vec![RemoteEvent::Clear],
        _ => Vec::new(),
    }
}

type Waiter = oneshot::Sender<Result<RemoteOutcome, HamokError>>;

/// What the handles of a remote map on one peer share: the store, the executor's wake-up and the
/// callers waiting for results.
pub(crate) struct RemoteExtra {
    channel: String,
    store: OnceLock<Arc<dyn RemoteMap>>,
    wake: Notify,
    waiters: Mutex<HashMap<u64, Waiter>>,
    next_req: AtomicU64,
    started: AtomicBool,
}

impl RemoteExtra {
    fn new(id: &str) -> Self {
        // Request ids start at a random point so a restarted peer's ids do not meet its old ones.
        let start = RandomState::new().build_hasher().finish() >> 16;
        RemoteExtra {
            channel: format!("hamok.remote-map/{id}"),
            store: OnceLock::new(),
            wake: Notify::new(),
            waiters: Mutex::new(HashMap::new()),
            next_req: AtomicU64::new(start),
            started: AtomicBool::new(false),
        }
    }

    fn resolve(&self, req: u64, result: Result<RemoteOutcome, HamokError>) {
        let waiter = self
            .waiters
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&req);
        if let Some(w) = waiter {
            let _ = w.send(result);
        }
    }
}

/// The state machine of a remote map: the store it executes against (given at registration) and the
/// pending mutations.
pub(crate) struct RemoteMapMachine {
    kind: String,
    store: Arc<dyn RemoteMap>,
    core: Core<RemoteState, RemoteExtra>,
}

impl RemoteMapMachine {
    pub(crate) fn new(kind: String, store: Arc<dyn RemoteMap>) -> Self {
        RemoteMapMachine {
            kind,
            store,
            core: Core::default(),
        }
    }
}

impl Collection for RemoteMapMachine {
    type State = RemoteState;
    type Extra = RemoteExtra;
    fn core(&self) -> &Core<RemoteState, RemoteExtra> {
        &self.core
    }
    fn core_mut(&mut self) -> &mut Core<RemoteState, RemoteExtra> {
        &mut self.core
    }
}

impl StateMachine for RemoteMapMachine {
    fn kind(&self) -> &str {
        &self.kind
    }

    fn apply(&mut self, ctx: &ApplyContext, command: &[u8]) -> Result<Bytes, HamokError> {
        match decode_command(command)? {
            Wire::Init => self.core.init(),
            Wire::Op(RemoteCmd::Mutate { req, op }) => {
                {
                    let mut state = write_lock(&self.core.state);
                    if state.pending.len() >= MAX_PENDING_MUTATIONS {
                        return Err(HamokError::Busy("remote map: too many pending mutations"));
                    }
                    state.pending.insert(
                        ctx.index,
                        PendingOp {
                            client: ctx.client.clone(),
                            req,
                            op,
                        },
                    );
                }
                if let Some(local) = self.core.live_local() {
                    local.extra.wake.notify_one();
                }
                encode(&ctx.index)
            }
            Wire::Op(RemoteCmd::Executed(up_to)) => {
                let mut state = write_lock(&self.core.state);
                if up_to > state.executed_up_to {
                    state.executed_up_to = up_to;
                    let keep = state.pending.split_off(&(up_to + 1));
                    state.pending = keep;
                }
                encode(&())
            }
        }
    }

    fn snapshot(&self) -> Result<Bytes, HamokError> {
        let state = self.core.state.read().unwrap_or_else(|e| e.into_inner());
        encode(&(self.core.initialized, &*state))
    }

    fn restore(&mut self, data: &[u8]) -> Result<(), HamokError> {
        let (initialized, state): (bool, RemoteState) = decode(data)?;
        self.core.initialized = initialized;
        *write_lock(&self.core.state) = state;
        Ok(())
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
}

type RemoteLocal = Local<RemoteState, RemoteExtra>;

pub(crate) fn new_extra(id: &str) -> RemoteExtra {
    RemoteExtra::new(id)
}

/// Finds the store of this peer's machine and starts the executor (once per local handle group).
pub(crate) async fn start(hamok: &Hamok, local: &Arc<RemoteLocal>) -> Result<(), HamokError> {
    if local.extra.store.get().is_none() {
        let store = hamok
            .query(&local.id, false, |m| {
                m.and_then(|m| m.as_any().downcast_ref::<RemoteMapMachine>())
                    .map(|m| m.store.clone())
            })
            .await?
            .ok_or_else(|| HamokError::Rejected(format!("no remote map `{}`", local.id)))?;
        let _ = local.extra.store.set(store);
    }
    if local.extra.started.swap(true, Ordering::AcqRel) {
        return Ok(());
    }
    let weak = Arc::downgrade(local);
    let results = weak.clone();
    hamok.on_direct(&local.extra.channel, move |_from, payload| {
        let Some(local) = results.upgrade() else {
            return;
        };
        match decode::<RemoteMsg>(&payload) {
            Ok(RemoteMsg::Outcome { req, result }) => local
                .extra
                .resolve(req, result.map_err(HamokError::Rejected)),
            Ok(RemoteMsg::Events(events)) => {
                local.emit(events.into_iter().map(Raw::from).collect())
            }
            Err(_) => {}
        }
    })?;
    tokio::spawn(run_executor(hamok.clone(), weak));
    Ok(())
}

enum Executed {
    Done(Result<RemoteOutcome, HamokError>),
    Skipped,
    Abandoned,
}

async fn execute_with_retry(
    hamok: &Hamok,
    store: &Arc<dyn RemoteMap>,
    index: LogIndex,
    op: &RemoteOp,
) -> Executed {
    let mut backoff = Duration::from_millis(10);
    loop {
        match store.execute(index, op).await {
            Ok(Some(outcome)) => return Executed::Done(Ok(outcome)),
            Ok(None) => return Executed::Skipped,
            Err(e @ HamokError::Rejected(_)) => return Executed::Done(Err(e)),
            Err(e) => {
                tracing::warn!(index, "remote map store failed (retrying): {e}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                if !hamok.is_leader() || hamok.is_closed() {
                    return Executed::Abandoned;
                }
            }
        }
    }
}

async fn run_executor(hamok: Hamok, weak: Weak<RemoteLocal>) {
    let mut last_done: LogIndex = 0;
    let mut leading = false;
    loop {
        let Some(local) = weak.upgrade() else { return };
        if hamok.is_closed() {
            return;
        }
        let notified = local.extra.wake.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if hamok.is_leader() {
            if !leading {
                // Newly leading: everything still pending may need executing (the store skips what an
                // earlier leader did).
                leading = true;
                last_done = 0;
            }
            let batch: Vec<(LogIndex, PendingOp)> = local.read(|s| {
                s.pending
                    .range(last_done + 1..)
                    .take(EXECUTE_BATCH)
                    .map(|(i, p)| (*i, p.clone()))
                    .collect()
            });
            if !batch.is_empty() {
                if let Some(store) = local.extra.store.get().cloned() {
                    let mut progressed = false;
                    for (index, p) in batch {
                        match execute_with_retry(&hamok, &store, index, &p.op).await {
                            Executed::Done(result) => {
                                if let Ok(outcome) = &result {
                                    announce(&hamok, &local, changes(&p.op, outcome));
                                }
                                deliver(&hamok, &local, &p, result)
                            }
                            Executed::Skipped => {
                                // Executed by an earlier leader, which may not have answered.
                                if let Ok(Some(outcome)) = store.outcome(index).await {
                                    deliver(&hamok, &local, &p, Ok(outcome));
                                }
                            }
                            Executed::Abandoned => break,
                        }
                        last_done = index;
                        progressed = true;
                    }
                    if progressed {
                        record_executed(&hamok, &local.id, last_done).await;
                    }
                    continue;
                }
            }
        } else {
            leading = false;
        }
        tokio::select! {
            _ = &mut notified => {}
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
}

/// Emits a mutation's changes here and sends them to every other peer (best effort: a peer that misses
/// the message misses the events, never data).
fn announce(hamok: &Hamok, local: &RemoteLocal, events: Vec<RemoteEvent>) {
    if events.is_empty() {
        return;
    }
    if let Ok(bytes) = encode(&RemoteMsg::Events(events.clone())) {
        let _ = hamok.send_direct(None, &local.extra.channel, bytes);
    }
    local.emit(events.into_iter().map(Raw::from).collect());
}

fn deliver(
    hamok: &Hamok,
    local: &RemoteLocal,
    p: &PendingOp,
    result: Result<RemoteOutcome, HamokError>,
) {
    if &p.client == hamok.local_peer_id() {
        local.extra.resolve(p.req, result);
        return;
    }
    let msg = RemoteMsg::Outcome {
        req: p.req,
        result: result.map_err(|e| e.to_string()),
    };
    if let Ok(bytes) = encode(&msg) {
        let _ = hamok.send_direct(Some(p.client.clone()), &local.extra.channel, bytes);
    }
}

async fn record_executed(hamok: &Hamok, id: &str, up_to: LogIndex) {
    let Ok(cmd) = encode(&Wire::Op(RemoteCmd::Executed(up_to))) else {
        return;
    };
    if let Err(e) = hamok.submit(id, cmd.to_vec()).await {
        tracing::debug!("remote map: recording executed mutations failed (redone later): {e}");
    }
}

// -------------------------------------------------------------------------------------------------
// The typed handle

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

impl<K, V> HamokRemoteMap<K, V> {
    /// The map's id.
    pub fn id(&self) -> &str {
        &self.handle.local.id
    }

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
    /// events they are not part of the log, so a peer cut off at that moment misses them).
    pub fn events(&self) -> Events<MapEvent<K, V>>
    where
        K: DeserializeOwned,
        V: DeserializeOwned,
    {
        self.handle.events(crate::map::decode_event::<K, V>)
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
        let submitted: Result<LogIndex, HamokError> =
            self.handle.submit(RemoteCmd::Mutate { req, op }).await;
        if let Err(e) = submitted {
            forget();
            return Err(e);
        }
        let timeout = Duration::from_millis(self.handle.hamok.config().request_timeout_ms);
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(HamokError::Closed),
            Err(_) => {
                forget();
                Err(HamokError::Timeout {
                    after_ms: timeout.as_millis() as u64,
                })
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
