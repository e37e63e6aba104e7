//! # hamok
//!
//! Replicated, strongly consistent state for the replicas of one service, over the message bus they
//! already run (NATS or RabbitMQ). Each replica embeds a Raft peer; the peers replicate a log over the bus
//! and apply it to typed collections (maps, records, queues, emitters), so every replica sees the same
//! state in the same order without running etcd, Consul or ZooKeeper next to the service.
//!
//! This crate is a thin facade: it re-exports the workspace crates under one name.
//!
//! - [`runtime`] (`hamok-runtime`): the Raft engine ([`raft`]), the supervised node actors, the wire
//!   codec, the transport trait with the in-process transport, and the `Hamok` handle.
//! - [`collections`] (`hamok-collections`): the replicated collections (Map, Record, Queue, Emitter, Set,
//!   RemoteMap over Redis); [`prelude`] re-exports what a service uses.
//! - [`transports`] (`hamok-transports`): the NATS and RabbitMQ adapters, behind the `nats` and `rabbitmq`
//!   features.
//!
//! What exists today and what is planned is listed in `README.md`; the layers and their rules are in
//! `ARCHITECTURE.md`.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub use hamok_runtime as runtime;
pub use hamok_runtime::raft;

pub use hamok_collections as collections;
pub use hamok_transports as transports;

#[cfg(feature = "gateway")]
pub mod gateway;
pub mod stores;

/// Everything a service needs to use hamok's collections: `use hamok::prelude::*;`.
///
/// The [`HamokCollections`](hamok_collections::HamokCollections) extension trait (so `create_map` and
/// friends are methods of [`Hamok`](hamok_runtime::Hamok)), [`register_kinds`](hamok_collections::register_kinds)
/// for the builder, the collection, event and error types, and the coordination primitives (locks,
/// leader jobs, shared config).
pub mod prelude {
    pub use hamok_collections::RedisRemoteMap;
    pub use hamok_collections::{
        leadership, CasOutcome, ConfigWatch, FenceGate, HamokLock, JobContext, JobState, LeaderJob,
        LockEvent, LockGuard, LockHolder, LockOptions, SharedConfig, Versioned,
    };
    pub use hamok_collections::{
        register_kinds, register_remote_map, DeadLetter, Delivery, DeliveryId, Events, Field,
        HamokCollections, HamokEmitter, HamokMap, HamokQueue, HamokRecord, HamokRemoteMap,
        HamokSet, MapEvent, MemoryRemoteMap, Patch, QueueEvent, RecordEvent, RecvError, RemoteMap,
        ResyncReason, SetEvent, SubscriptionEvent,
    };
    pub use hamok_runtime::raft::PeerId;
    pub use hamok_runtime::state_machine::Fence;
    pub use hamok_runtime::{Hamok, HamokBuilder, HamokError, HamokEvent};
}
