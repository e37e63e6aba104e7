//! hamok's own test support (not published): the seeded simulation of whole peers ([`sim`]), and the
//! helpers the integration tests of `hamok`, `hamok-collections` and `hamok-transports` share: bounded
//! waits ([`wait`]) and cluster helpers ([`cluster`]: unique ids, peer ids, joining and closing peers
//! together, waiting for one leader and a complete membership); and a cluster of real `nats-server`
//! processes on loopback that a test can SIGKILL and restart ([`nats_cluster`]).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod cluster;
pub mod nats_cluster;
// Not every item of the simulation (nor of the engine simulation's files it includes by path) has its
// rustdoc line yet.
#[allow(missing_docs)]
pub mod sim;
pub mod wait;

// The simulation helpers shared with the engine's simulation (`runtime/tests/sim/util.rs`, included by
// path) name the engine as `crate::raft`.
pub(crate) use hamok_runtime::raft;
