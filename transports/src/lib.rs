//! hamok-transports: adapters that carry hamok frames over a message bus.
//!
//! **Not implemented yet.** This crate will hold a NATS adapter (async-nats, feature `nats`) and a
//! RabbitMQ adapter (lapin, feature `rabbitmq`), each implementing the transport trait of
//! `hamok-runtime`. A transport moves opaque frames: unicast to one peer and broadcast to the cluster. It
//! knows nothing of Raft; every frame it delivers may be garbage or foreign, and the runtime decides what
//! to drop.
//!
//! See `ARCHITECTURE.md` (layer 4, transports) at the repository root.
#![forbid(unsafe_code)]
#![warn(missing_docs)]
