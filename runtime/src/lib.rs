//! hamok runtime: the pure Raft engine ([`raft`]) that the node actors, the wire codec, the transports and
//! the `Hamok` handle are built on.
//!
//! The layers and their rules are in `ARCHITECTURE.md` at the repository root.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod raft;
