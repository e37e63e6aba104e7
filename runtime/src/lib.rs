//! hamok runtime: the pure Raft engine ([`raft`]), and the runtime that turns it into a library a
//! service embeds: the [`Hamok`] handle driven by supervised ractor actors, the wire codec ([`wire`]),
//! the [`transport`] trait with the in-process and hand-wired transports, configuration ([`config`]),
//! the log store ([`store`]), the state-machine layer ([`state_machine`]), events and stats.
//!
//! The layers and their rules are in `ARCHITECTURE.md` at the repository root.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod actors;
pub mod config;
mod error;
mod events;
mod hamok;
pub mod raft;
mod seq_deque;
pub mod session;
pub mod state_machine;
mod stats;
pub mod store;
pub mod transport;
pub mod wire;

pub use config::HamokConfig;
pub use error::{Cause, HamokError};
pub use events::HamokEvent;
pub use hamok::{Hamok, HamokBuilder, JoinOptions};
pub use stats::{metric_names, CounterValues, HamokStats, JoinState, PeerStatus, ReplicaProgress};

/// Hooks for hamok's own tests (crate feature `testing`, which only the workspace's test crate turns
/// on): planted bugs in the runtime's decisions, switched on with `HamokBuilder::planted_bugs`, and seeded
/// peers (`HamokBuilder::seed`). Never for production use.
#[cfg(feature = "testing")]
pub mod testing {
    pub use crate::actors::node::PlantedBugs;
}
