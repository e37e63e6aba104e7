//! hamok collections: replicated [`HamokMap`], [`HamokRecord`], [`HamokQueue`], [`HamokEmitter`],
//! [`HamokSet`], [`HamokRemoteMap`], the fenced lock table [`HamokLock`] (with [`LeaderJob`]) and
//! [`SharedConfig`], each a deterministic state machine on the Raft log of a
//! [`Hamok`] peer plus a typed handle.
//!
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use hamok_collections::{register_kinds, HamokCollections};
//! use hamok_runtime::Hamok;
//!
//! let hamok = register_kinds(Hamok::builder().cluster_id("doc-lib")).build().await?;
//! hamok.join().await?;
//! let map = hamok.get_or_create_map::<String, String>("config").await?;
//! map.set("mode".into(), "fast".into()).await?;
//! assert_eq!(map.get(&"mode".into())?.as_deref(), Some("fast"));
//! hamok.close().await;
//! # Ok::<(), hamok_runtime::HamokError>(()) }).unwrap();
//! ```
//!
//! # Shape
//!
//! - Every peer must register the collection kinds before building ([`register_kinds`], and
//!   [`register_remote_map`] per remote map): a peer rebuilds every collection it learns of from the log
//!   or a snapshot, whether or not it opened a handle, so a snapshot of the Raft state covers every
//!   collection and a late handle (or a late peer) needs no catch-up protocol of its own.
//! - Collections are opened on the [`Hamok`] handle through the [`HamokCollections`] extension trait:
//!   `create_*` fails if the id exists, `get_or_create_*` opens it either way; an id used by another
//!   kind is [`HamokError::KindMismatch`] in both.
//! - `K`, `V`, `T`, `E`, `M` are any `Serialize + DeserializeOwned` types, encoded with rmp-serde; the
//!   state machines hold encoded bytes in ordered containers (deterministic on every peer) and compare
//!   encoded bytes for compare-and-set.
//! - Writes go through the log and resolve once applied on the calling peer (read-your-writes). Local
//!   reads see this peer's applied state; every handle has a `sync` (or `*_linearizable`) for reads
//!   that reflect every write acknowledged anywhere before. Events come from `apply`, on every peer, in
//!   log order, and never skip silently: a peer that catches up by installing a snapshot, or a
//!   subscriber that falls more than [`EVENT_CAPACITY`] events behind, gets the whole state as a
//!   `Resync` event (see [`ResyncReason`]) exactly where its stream resumes.
//! - One local handle group per collection and peer: every clone and every `get_or_create_*` of the
//!   same id share state, events and background work. Prefer cloning a handle over re-opening it: each
//!   open is two log entries (create-if-absent, and the `Init` that tells create from open).
//!
//! How each method of the reference library (TypeScript hamok 2.6) maps to this crate is listed in
//! `collections/REFERENCE_MAP.md`.
//!
//! # Why handles are not actors
//!
//! The state machines run inside the runtime's node actor, which the runtime supervises; a handle is
//! a thin, cloneable front that submits commands and reads shared state, so it needs no mailbox of its
//! own. The two collections with background work ([`HamokEmitter`]: deliveries and cleanup;
//! [`HamokRemoteMap`]: the store executor) run it on one tokio task per collection and peer; see their
//! modules for why that task needs no supervisor.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod background;
mod common;
pub mod config;
pub mod emitter;
pub mod job;
pub mod lock;
mod machine;
pub mod map;
pub mod queue;
pub mod record;
#[cfg(feature = "redis")]
mod redis_map;
pub mod remote_map;
pub mod set;

use std::future::Future;
use std::sync::Arc;

use hamok_runtime::{Hamok, HamokBuilder, HamokError};
use serde::de::DeserializeOwned;
use serde::Serialize;

pub use common::{Events, RecvError, ResyncReason, EVENT_CAPACITY};
pub use config::{CasOutcome, ConfigWatch, SharedConfig, Versioned, CONFIG_KIND, MAX_HISTORY};
pub use emitter::{EmitterStats, HamokEmitter, HandlerId, SubscriptionEvent, EMITTER_KIND};
pub use job::{leadership, JobContext, JobState, LeaderJob};
pub use lock::{
    FenceGate, HamokLock, LockEvent, LockGuard, LockHolder, LockOptions, LOCK_KIND, MAX_LOCKS,
    MAX_WAITERS_PER_LOCK, TOKENS_PER_MS,
};
pub use map::{HamokMap, MapEvent, MapSnapshot, MAP_KIND};
pub use queue::{DeadLetter, Delivery, DeliveryId, HamokQueue, QueueEvent, QUEUE_FULL, QUEUE_KIND};
pub use record::{Field, FieldValue, HamokRecord, Patch, RecordEvent, RECORD_KIND};
#[cfg(feature = "redis")]
pub use redis_map::{RedisRemoteMap, APPLIED_INDEX_FIELD};
pub use remote_map::{
    remote_map_kind, HamokRemoteMap, MemoryRemoteMap, RemoteMap, RemoteMapIter, RemoteOp,
    RemoteOutcome,
};
pub use set::{HamokSet, SetEvent, SET_KIND};

use common::{open, OpenMode};
use machine::Machine;

/// Registers the kinds of every collection but remote maps (see [`register_remote_map`]). Every peer
/// of a cluster must register the same kinds.
pub fn register_kinds(builder: HamokBuilder) -> HamokBuilder {
    builder
        .register_kind(MAP_KIND, || Box::<map::MapMachine>::default())
        .register_kind(SET_KIND, || Box::<set::SetMachine>::default())
        .register_kind(QUEUE_KIND, || Box::<queue::QueueMachine>::default())
        .register_kind(RECORD_KIND, || Box::<record::RecordMachine>::default())
        .register_kind(EMITTER_KIND, || Box::<emitter::EmitterMachine>::default())
        .register_kind(LOCK_KIND, || Box::<lock::LockMachine>::default())
        .register_kind(CONFIG_KIND, || Box::<config::ConfigMachine>::default())
}

/// Registers the remote map `id` with its store. Every peer of the cluster must register it (with a
/// store reaching the same data), since whichever peer leads executes the mutations.
pub fn register_remote_map(
    builder: HamokBuilder,
    id: &str,
    store: Arc<dyn RemoteMap>,
) -> HamokBuilder {
    let kind = remote_map_kind(id);
    let factory_kind = kind.clone();
    builder.register_kind(&kind, move || {
        Box::new(Machine::new(remote_map::RemoteMapLogic::new(
            factory_kind.clone(),
            store.clone(),
        )))
    })
}

/// Opens replicated collections on a [`Hamok`] peer. `create_*` fails with [`HamokError::Rejected`] if
/// the id already exists; `get_or_create_*` opens an existing collection or creates it. Either fails with
/// [`HamokError::KindMismatch`] if the id belongs to another kind of collection. The peer must be joined.
pub trait HamokCollections {
    /// Creates the map `id`.
    fn create_map<K, V>(
        &self,
        id: &str,
    ) -> impl Future<Output = Result<HamokMap<K, V>, HamokError>> + Send
    where
        K: Serialize + DeserializeOwned,
        V: Serialize + DeserializeOwned;

    /// Opens the map `id`, creating it if absent.
    fn get_or_create_map<K, V>(
        &self,
        id: &str,
    ) -> impl Future<Output = Result<HamokMap<K, V>, HamokError>> + Send
    where
        K: Serialize + DeserializeOwned,
        V: Serialize + DeserializeOwned;

    /// Creates the set `id`.
    fn create_set<T>(
        &self,
        id: &str,
    ) -> impl Future<Output = Result<HamokSet<T>, HamokError>> + Send
    where
        T: Serialize + DeserializeOwned;

    /// Opens the set `id`, creating it if absent.
    fn get_or_create_set<T>(
        &self,
        id: &str,
    ) -> impl Future<Output = Result<HamokSet<T>, HamokError>> + Send
    where
        T: Serialize + DeserializeOwned;

    /// Creates the queue `id`.
    fn create_queue<T>(
        &self,
        id: &str,
    ) -> impl Future<Output = Result<HamokQueue<T>, HamokError>> + Send
    where
        T: Serialize + DeserializeOwned;

    /// Opens the queue `id`, creating it if absent.
    fn get_or_create_queue<T>(
        &self,
        id: &str,
    ) -> impl Future<Output = Result<HamokQueue<T>, HamokError>> + Send
    where
        T: Serialize + DeserializeOwned;

    /// Creates the record `id`.
    fn create_record<T>(
        &self,
        id: &str,
    ) -> impl Future<Output = Result<HamokRecord<T>, HamokError>> + Send
    where
        T: Serialize + DeserializeOwned + Send + Sync + 'static;

    /// Opens the record `id`, creating it if absent.
    fn get_or_create_record<T>(
        &self,
        id: &str,
    ) -> impl Future<Output = Result<HamokRecord<T>, HamokError>> + Send
    where
        T: Serialize + DeserializeOwned + Send + Sync + 'static;

    /// Opens the record `id`, creating it if absent, and inserts the fields of `initial` that are absent
    /// (so the first opener's initial object wins field by field and later openers overwrite nothing).
    fn get_or_create_record_with<T>(
        &self,
        id: &str,
        initial: T,
    ) -> impl Future<Output = Result<HamokRecord<T>, HamokError>> + Send
    where
        T: Serialize + DeserializeOwned + Send + Sync + 'static;

    /// Creates the emitter `id`.
    fn create_emitter<E, M>(
        &self,
        id: &str,
    ) -> impl Future<Output = Result<HamokEmitter<E, M>, HamokError>> + Send
    where
        E: Serialize + DeserializeOwned + 'static,
        M: Serialize + DeserializeOwned;

    /// Opens the emitter `id`, creating it if absent.
    fn get_or_create_emitter<E, M>(
        &self,
        id: &str,
    ) -> impl Future<Output = Result<HamokEmitter<E, M>, HamokError>> + Send
    where
        E: Serialize + DeserializeOwned + 'static,
        M: Serialize + DeserializeOwned;

    /// Creates the shared config `id` (see [`SharedConfig`]).
    fn create_config<T>(
        &self,
        id: &str,
    ) -> impl Future<Output = Result<SharedConfig<T>, HamokError>> + Send
    where
        T: Serialize + DeserializeOwned;

    /// Opens the shared config `id`, creating it if absent.
    fn get_or_create_config<T>(
        &self,
        id: &str,
    ) -> impl Future<Output = Result<SharedConfig<T>, HamokError>> + Send
    where
        T: Serialize + DeserializeOwned;

    /// Creates the lock table `id` (see [`HamokLock`]).
    fn create_lock_table(
        &self,
        id: &str,
    ) -> impl Future<Output = Result<HamokLock, HamokError>> + Send;

    /// Opens the lock table `id`, creating it if absent.
    fn get_or_create_lock_table(
        &self,
        id: &str,
    ) -> impl Future<Output = Result<HamokLock, HamokError>> + Send;

    /// Creates the remote map `id` (registered with [`register_remote_map`] on every peer).
    fn create_remote_map<K, V>(
        &self,
        id: &str,
    ) -> impl Future<Output = Result<HamokRemoteMap<K, V>, HamokError>> + Send
    where
        K: Serialize + DeserializeOwned,
        V: Serialize + DeserializeOwned;

    /// Opens the remote map `id`, creating it if absent. Call it on every peer at start-up: the peer
    /// that leads executes the mutations only while it has a handle open.
    fn get_or_create_remote_map<K, V>(
        &self,
        id: &str,
    ) -> impl Future<Output = Result<HamokRemoteMap<K, V>, HamokError>> + Send
    where
        K: Serialize + DeserializeOwned,
        V: Serialize + DeserializeOwned;
}

// Every method is the one open path (`common::open`); the handle type says what is particular.
impl HamokCollections for Hamok {
    async fn create_map<K, V>(&self, id: &str) -> Result<HamokMap<K, V>, HamokError>
    where
        K: Serialize + DeserializeOwned,
        V: Serialize + DeserializeOwned,
    {
        open(self, id, OpenMode::Create, ()).await
    }

    async fn get_or_create_map<K, V>(&self, id: &str) -> Result<HamokMap<K, V>, HamokError>
    where
        K: Serialize + DeserializeOwned,
        V: Serialize + DeserializeOwned,
    {
        open(self, id, OpenMode::GetOrCreate, ()).await
    }

    async fn create_set<T>(&self, id: &str) -> Result<HamokSet<T>, HamokError>
    where
        T: Serialize + DeserializeOwned,
    {
        open(self, id, OpenMode::Create, ()).await
    }

    async fn get_or_create_set<T>(&self, id: &str) -> Result<HamokSet<T>, HamokError>
    where
        T: Serialize + DeserializeOwned,
    {
        open(self, id, OpenMode::GetOrCreate, ()).await
    }

    async fn create_queue<T>(&self, id: &str) -> Result<HamokQueue<T>, HamokError>
    where
        T: Serialize + DeserializeOwned,
    {
        open(self, id, OpenMode::Create, ()).await
    }

    async fn get_or_create_queue<T>(&self, id: &str) -> Result<HamokQueue<T>, HamokError>
    where
        T: Serialize + DeserializeOwned,
    {
        open(self, id, OpenMode::GetOrCreate, ()).await
    }

    async fn create_record<T>(&self, id: &str) -> Result<HamokRecord<T>, HamokError>
    where
        T: Serialize + DeserializeOwned + Send + Sync + 'static,
    {
        open(self, id, OpenMode::Create, None).await
    }

    async fn get_or_create_record<T>(&self, id: &str) -> Result<HamokRecord<T>, HamokError>
    where
        T: Serialize + DeserializeOwned + Send + Sync + 'static,
    {
        open(self, id, OpenMode::GetOrCreate, None).await
    }

    async fn get_or_create_record_with<T>(
        &self,
        id: &str,
        initial: T,
    ) -> Result<HamokRecord<T>, HamokError>
    where
        T: Serialize + DeserializeOwned + Send + Sync + 'static,
    {
        open(self, id, OpenMode::GetOrCreate, Some(initial)).await
    }

    async fn create_emitter<E, M>(&self, id: &str) -> Result<HamokEmitter<E, M>, HamokError>
    where
        E: Serialize + DeserializeOwned + 'static,
        M: Serialize + DeserializeOwned,
    {
        open(self, id, OpenMode::Create, ()).await
    }

    async fn get_or_create_emitter<E, M>(&self, id: &str) -> Result<HamokEmitter<E, M>, HamokError>
    where
        E: Serialize + DeserializeOwned + 'static,
        M: Serialize + DeserializeOwned,
    {
        open(self, id, OpenMode::GetOrCreate, ()).await
    }

    async fn create_config<T>(&self, id: &str) -> Result<SharedConfig<T>, HamokError>
    where
        T: Serialize + DeserializeOwned,
    {
        open(self, id, OpenMode::Create, ()).await
    }

    async fn get_or_create_config<T>(&self, id: &str) -> Result<SharedConfig<T>, HamokError>
    where
        T: Serialize + DeserializeOwned,
    {
        open(self, id, OpenMode::GetOrCreate, ()).await
    }

    async fn create_lock_table(&self, id: &str) -> Result<HamokLock, HamokError> {
        open(self, id, OpenMode::Create, ()).await
    }

    async fn get_or_create_lock_table(&self, id: &str) -> Result<HamokLock, HamokError> {
        open(self, id, OpenMode::GetOrCreate, ()).await
    }

    async fn create_remote_map<K, V>(&self, id: &str) -> Result<HamokRemoteMap<K, V>, HamokError>
    where
        K: Serialize + DeserializeOwned,
        V: Serialize + DeserializeOwned,
    {
        open(self, id, OpenMode::Create, ()).await
    }

    async fn get_or_create_remote_map<K, V>(
        &self,
        id: &str,
    ) -> Result<HamokRemoteMap<K, V>, HamokError>
    where
        K: Serialize + DeserializeOwned,
        V: Serialize + DeserializeOwned,
    {
        open(self, id, OpenMode::GetOrCreate, ()).await
    }
}
