//! hamok's own test support (not published): the seeded simulation of whole peers ([`sim`]).
#![forbid(unsafe_code)]

pub mod sim;

// The simulation helpers shared with the engine's simulation (`runtime/tests/sim/util.rs`, included by
// path) name the engine as `crate::raft`.
pub(crate) use hamok_runtime::raft;
