//! What a peer reports as it runs: role and leader changes, membership, commits, errors.

use crate::raft::{LogIndex, PeerId, Role, Term};

/// An event of one peer, delivered to every subscriber of [`Hamok::events`](crate::Hamok::events).
/// Covers every event of the reference library.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum HamokEvent {
    /// The peer is part of a cluster (as a voter, or a learner if `only_follower`).
    Joined,
    /// The peer lost its cluster (removed, or no leader heard for too long) and is joining again.
    Rejoining,
    /// The peer left its cluster.
    Left,
    /// The peer became a follower.
    Follower,
    /// The peer became a (pre-)candidate.
    Candidate,
    /// The peer became the leader.
    Leader,
    /// The role changed.
    StateChanged {
        /// The new role.
        new: Role,
        /// The previous role.
        old: Role,
    },
    /// The known leader changed.
    LeaderChanged {
        /// The new leader, if any.
        new: Option<PeerId>,
        /// The previous one.
        old: Option<PeerId>,
        /// The term it leads.
        term: Term,
    },
    /// A peer became a member of the cluster.
    RemotePeerJoined(PeerId),
    /// A peer stopped being a member of the cluster.
    RemotePeerLeft(PeerId),
    /// Entries up to this index were applied.
    Commit(LogIndex),
    /// The leader sent a heartbeat round (on the leader), or one arrived (on a follower).
    Heartbeat,
    /// Something went wrong that the peer survived (a dropped frame, a failed write, a restart).
    Error(String),
    /// The leader has not heard from this member for `peer_max_idle_ms` and removes it.
    NoHeartbeatFrom(PeerId),
    /// Peers of this cluster speak protocol version `theirs`, which this build (speaking `ours`)
    /// cannot read, nor they its frames: another build of hamok is on the bus, as during a rolling
    /// upgrade across protocol versions. While such frames come, a peer that has not joined a cluster
    /// founds none (the service's state is never split between two clusters of one id); it joins
    /// when a cluster of its own version answers. Reported once per version heard in a row;
    /// `Counters::dropped_version` counts the frames.
    ProtocolVersionMismatch {
        /// The version the other peers speak.
        theirs: u16,
        /// The version this peer speaks ([`PROTOCOL_VERSION`](crate::wire::PROTOCOL_VERSION)).
        ours: u16,
    },
    /// The peer closed.
    Close,
}
