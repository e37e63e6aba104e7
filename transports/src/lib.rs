//! hamok-transports: adapters that carry hamok frames over the message bus a service already runs.
//!
//! | feature | type | broker client |
//! |---|---|---|
//! | `nats` | [`nats::NatsTransport`] (builder: [`nats::NatsTransportBuilder`]) | async-nats 0.51 |
//! | `rabbitmq` | [`rabbitmq::AmqpTransport`] (builder: [`rabbitmq::AmqpTransportBuilder`]) | lapin 4 (AMQP 0-9-1) |
//!
//! Each implements [`hamok_runtime::transport::Transport`]; hand one to
//! [`HamokBuilder::transport`](hamok_runtime::HamokBuilder::transport). A transport moves opaque frames,
//! unicast to one peer and broadcast to the cluster, scoped by cluster id so that several clusters share
//! one broker. It knows nothing of Raft: every frame it delivers may be garbage or foreign, and the runtime
//! decides what to drop (and counts it in `Hamok::stats()`).
//!
//! The rules both adapters keep:
//!
//! - **Never block the peer.** `send` and `broadcast` put the frame in a bounded per-link queue drained by
//!   a writer task; a full queue refuses the frame at once. Both adapters use one link type for this
//!   and differ only in how a frame is addressed, written and received. Received frames go straight to the peer's
//!   bounded [`Inbound`](hamok_runtime::transport::Inbound).
//! - **Count every loss** in [`TransportStats`] (`transport.stats()`), and rely on Raft retransmission,
//!   never on delivery.
//! - **Report a dead connection** through `Link::closed`, so the runtime's supervisor reconnects with
//!   backoff (calling `connect` again, which re-subscribes / re-declares everything).
//!
//! Broker URLs default to the environment (`HAMOK_NATS_URL`, `HAMOK_AMQP_URL`) and then to the local
//! defaults (`nats://127.0.0.1:4222`, `amqp://guest:guest@127.0.0.1:5672/%2f`).
//!
//! See `ARCHITECTURE.md` (layer 4, transports) at the repository root.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

// The shared link (`link`) and most of `common` are used only by the adapters; without either feature
// only `is_valid_token` and the stats type are reachable.
#[cfg(any(feature = "nats", feature = "rabbitmq"))]
mod batch;
#[cfg_attr(not(any(feature = "nats", feature = "rabbitmq")), allow(dead_code))]
mod common;
#[cfg(any(feature = "nats", feature = "rabbitmq"))]
mod link;
#[cfg_attr(not(any(feature = "nats", feature = "rabbitmq")), allow(dead_code))]
mod stats;

#[cfg(feature = "nats")]
pub mod nats;
#[cfg(feature = "rabbitmq")]
pub mod rabbitmq;

pub use common::is_valid_token;
#[cfg(feature = "nats")]
pub use nats::{NatsTransport, NatsTransportBuilder};
#[cfg(feature = "rabbitmq")]
pub use rabbitmq::{AmqpTransport, AmqpTransportBuilder};
pub use stats::TransportStats;
