//! The Raft engine: a pure, deterministic state machine.
//!
//! No tokio, no clock, no I/O, no thread-local randomness: time comes in as `now_ms` on every call,
//! randomness from a seed. Inputs are [`RaftNode::step`] (a message), [`RaftNode::tick`] (time passed),
//! [`RaftNode::propose`], [`RaftNode::propose_membership`], [`RaftNode::read_index`],
//! [`RaftNode::transfer_leadership`] and [`RaftNode::compact`]; the output is a [`Ready`] taken with
//! [`RaftNode::take_ready`], which says what to persist, what to send after that, what to apply and which
//! reads may be served.
//!
//! One concept per file (private; the public surface is the items re-exported here): `raft_log` the
//! in-memory log, `progress` a follower's replication state seen from the leader, `read_only` ReadIndex
//! bookkeeping, `votes` election tallies, `snapshot` chunked snapshot transfer, `membership`
//! configurations and quorums, `node` the protocol itself.
//!
//! ```
//! use hamok_runtime::raft::{Membership, PeerId, PersistedState, RaftConfig, RaftNode, Role};
//!
//! // A cluster of one bootstraps, elects itself and commits a proposal.
//! let me = PeerId::from("a");
//! let genesis = PersistedState::genesis(Membership::with_voters([me.clone()]));
//! let mut node = RaftNode::new(me, RaftConfig::default(), 7, 0, genesis).unwrap();
//! node.tick(1_000); // past any election timeout
//! assert_eq!(node.role(), Role::Leader);
//! let (index, _term) = node.propose(1_000, bytes::Bytes::from_static(b"hello")).unwrap();
//! let ready = node.take_ready();
//! assert!(ready.committed.iter().any(|e| e.index == index));
//! ```

mod config;
mod error;
mod membership;
mod message;
mod node;
mod progress;
mod raft_log;
mod read_only;
mod ready;
mod rng;
mod snapshot;
mod types;
mod votes;

#[cfg(test)]
mod planted_bug_tests;

pub use config::{RaftConfig, RaftConfigError, RaftLimits};
pub use error::{RaftError, RaftStartError};
pub use membership::{Membership, MembershipChange, MembershipError};
pub use message::{Message, MessageBody};
pub use node::{RaftNode, Status};
pub use ready::{ReadState, Ready, SoftState};
pub use rng::SeededRng;
pub(crate) use types::{command_bytes, sharing};
pub use types::{
    Entry, EntryPayload, HardState, LogIndex, PeerId, PersistedState, Role, Snapshot, SnapshotMeta,
    Term,
};
