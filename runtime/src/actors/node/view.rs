//! What the handle can see of the peer without a round trip to the actor: the engine's [`Status`]
//! plus the runtime's own state, published through a `watch` channel whenever it changes.

use crate::raft::{Membership, Role, Status};

/// Where the peer stands with respect to a cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JoinState {
    /// `join` not called yet.
    Idle,
    /// Looking for a cluster (or for the peers to found one with), or coming back to it after being
    /// removed or cut off: not a member as far as this peer can tell.
    Discovering,
    /// A voter of the cluster (a learner when `only_follower`), in contact with its leader.
    Joined,
    /// Leaving.
    Leaving,
    /// Left; `join` starts over.
    Left,
}

/// The published state of one peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct View {
    /// The engine's part.
    pub raft: Status,
    /// The runtime's part.
    pub join_state: JoinState,
    /// Entries in the log store.
    pub log_entries: u64,
    /// Approximate bytes of those entries.
    pub log_bytes: u64,
    /// Requests submitted here and not answered yet.
    pub pending_requests: usize,
    /// The peer's actors have stopped.
    pub closed: bool,
}

impl View {
    pub(crate) fn initial() -> Self {
        View {
            raft: Status {
                id: crate::raft::PeerId::from(""),
                role: Role::Follower,
                term: 0,
                leader: None,
                commit_index: 0,
                applied_index: 0,
                last_index: 0,
                snapshot_index: 0,
                membership: Membership::default(),
            },
            join_state: JoinState::Idle,
            log_entries: 0,
            log_bytes: 0,
            pending_requests: 0,
            closed: false,
        }
    }
}
