//! The actors of one peer: a supervisor over the Raft node actor and the transport actor.

pub(crate) mod node;
pub(crate) mod supervisor;
pub(crate) mod transport;
