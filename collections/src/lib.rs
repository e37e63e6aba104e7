//! hamok-collections: the replicated collections, state machines over the Raft log.
//!
//! **Not implemented yet.** This crate will hold `Map<K, V>`, `Record<T>`, `Queue<T>`, `Emitter<E>` and
//! `RemoteMap<K, V>` (later also a lock, an election and a config collection). Each one is a deterministic
//! state machine: `apply(command) -> response` gives the same result on every peer, and `snapshot()` /
//! `restore()` capture its state. Typed handles encode keys and values with rmp-serde. A collection's
//! state exists on every peer from the log, whether or not that peer created a local handle, so a
//! snapshot of the Raft state covers every collection and a late handle needs no catch-up of its own.
//!
//! See `ARCHITECTURE.md` (layer 3, state machines) at the repository root.
#![forbid(unsafe_code)]
#![warn(missing_docs)]
