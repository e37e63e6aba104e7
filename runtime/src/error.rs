//! The one error type of the public API.

use crate::raft::{PeerId, RaftConfigError, RaftError};

/// Why a call on a [`Hamok`](crate::Hamok) handle (or a collection built on it) failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HamokError {
    /// The operation did not complete within its timeout. A write that timed out may still be applied
    /// later (until then the runtime resends it under the same request number, so it applies at most
    /// once); a retry by the caller is a new request.
    #[error("timed out after {0} ms")]
    Timeout(u64),
    /// The peer is not a joined member of a cluster (call `join` first; or it left, or it is
    /// rejoining after a removal or a cut-off). The request was refused: nothing was done.
    #[error("not joined to a cluster")]
    NotJoined,
    /// The peer is closed. The request was refused: nothing was done.
    #[error("closed")]
    Closed,
    /// The peer stopped waiting for this request before it was answered (it left its cluster, or
    /// closed): the request may still be applied, once.
    #[error("interrupted before an answer ({0}); the request may still be applied")]
    Interrupted(&'static str),
    /// No leader is reachable (no quorum, or an election is under way).
    #[error("no leader or no quorum")]
    NoQuorum,
    /// This operation needs the leader, and this peer is not it.
    #[error("not the leader (leader: {leader:?})")]
    NotLeader {
        /// The leader, if known.
        leader: Option<PeerId>,
    },
    /// Too much pending work: back off and retry.
    #[error("busy: {0}")]
    Busy(&'static str),
    /// A value could not be encoded or decoded.
    #[error("codec: {0}")]
    Codec(String),
    /// The transport failed.
    #[error("transport: {0}")]
    Transport(String),
    /// The configuration is invalid; names the key.
    #[error("invalid config `{key}`: {reason}")]
    Config {
        /// The offending key, as in the TOML file and (upper-cased, `HAMOK_` prefixed) the environment.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A value or command exceeds a configured limit.
    #[error("too large: {size} bytes, limit {limit}")]
    TooLarge {
        /// Size of the refused value.
        size: usize,
        /// The configured limit.
        limit: usize,
    },
    /// A storage id is used for another kind of collection.
    #[error("storage `{id}` exists with another kind ({existing})")]
    KindMismatch {
        /// The storage id.
        id: String,
        /// The kind it already has.
        existing: String,
    },
    /// The state machine rejected the command (its own typed reason, as text).
    #[error("rejected: {0}")]
    Rejected(String),
    /// The write was applied exactly once, but its response is gone: this peer caught up from a snapshot
    /// that already contained it, and the response was not in the snapshot's bounded response cache (or
    /// the command was rejected). Do not retry it; read the state to learn the outcome.
    #[error("the request was applied, but its response was not kept (caught up from a snapshot)")]
    AppliedResponseLost,
    /// The cluster no longer knows whether this write was applied: more requests of this peer overtook
    /// it than its dedup state keeps. It will not be applied from now on. Only a peer that exceeds its
    /// own `max_pending_requests` discipline can see this.
    #[error("the request's outcome is unknown: its dedup record was forgotten")]
    OutcomeUnknown,
    /// The Raft engine refused the request.
    #[error("raft: {0}")]
    Raft(RaftError),
}

impl HamokError {
    /// Whether the failed operation may nevertheless have taken effect (or will): `true` for a timeout,
    /// an interruption, an unknown outcome or a lost response; `false` when it was certainly refused
    /// before it could change anything (not joined, closed, busy, too large, rejected by the state
    /// machine, invalid configuration, ...). Reads never take effect.
    pub fn may_have_taken_effect(&self) -> bool {
        matches!(
            self,
            HamokError::Timeout(_)
                | HamokError::Interrupted(_)
                | HamokError::AppliedResponseLost
                | HamokError::OutcomeUnknown
                | HamokError::Codec(_)
        )
    }
}

impl From<RaftError> for HamokError {
    fn from(e: RaftError) -> Self {
        match e {
            RaftError::NotLeader { leader } => HamokError::NotLeader { leader },
            RaftError::Busy => HamokError::Busy("too many uncommitted entries"),
            RaftError::CommandTooLarge { size, limit } => HamokError::TooLarge { size, limit },
            other => HamokError::Raft(other),
        }
    }
}

impl From<RaftConfigError> for HamokError {
    fn from(e: RaftConfigError) -> Self {
        HamokError::Config {
            key: e.field.to_string(),
            reason: e.reason.to_string(),
        }
    }
}

impl From<rmp_serde::encode::Error> for HamokError {
    fn from(e: rmp_serde::encode::Error) -> Self {
        HamokError::Codec(e.to_string())
    }
}

impl From<rmp_serde::decode::Error> for HamokError {
    fn from(e: rmp_serde::decode::Error) -> Self {
        HamokError::Codec(e.to_string())
    }
}
