//! Why an engine call was refused.

use super::config::RaftConfigError;
use super::membership::MembershipError;
use super::types::{LogIndex, PeerId};

/// Why a proposal, read, transfer or compaction was refused. Nothing was changed when one is returned.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RaftError {
    /// Only the leader accepts this; `leader` is the one this peer knows of, if any.
    #[error("not the leader (leader: {leader:?})")]
    NotLeader {
        /// The current leader, if known.
        leader: Option<PeerId>,
    },
    /// A leadership transfer is in progress; proposals wait until it ends.
    #[error("leadership transfer in progress")]
    TransferInProgress,
    /// Too much is uncommitted or pending: back off and retry.
    #[error("busy: too much pending work")]
    Busy,
    /// The command is larger than `max_command_bytes`.
    #[error("command of {size} bytes exceeds the limit of {limit}")]
    CommandTooLarge {
        /// Size of the refused command.
        size: usize,
        /// The configured limit.
        limit: usize,
    },
    /// A configuration change is still uncommitted, or this leader has not yet committed an entry of its
    /// own term (the single-server-change rule).
    #[error("a membership change is pending")]
    MembershipChangePending,
    /// The change is not a valid step from the current configuration.
    #[error(transparent)]
    Membership(#[from] MembershipError),
    /// The learner has not caught up with the commit index yet.
    #[error("learner {0} has not caught up")]
    LearnerBehind(PeerId),
    /// The target of a transfer is not a voter, or is this peer.
    #[error("cannot transfer leadership to {0}")]
    InvalidTransferTarget(PeerId),
    /// Compaction must stay within the applied prefix and move forward.
    #[error("cannot compact to {index}: applied {applied}, snapshot {snapshot}")]
    InvalidCompaction {
        /// The requested index.
        index: LogIndex,
        /// The applied index.
        applied: LogIndex,
        /// The current snapshot index.
        snapshot: LogIndex,
    },
}

/// Why an engine could not be built from its configuration and persisted state.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RaftStartError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] RaftConfigError),
    /// The persisted entries are not contiguous after the snapshot: the store lost or reordered
    /// entries. The peer must not start on it (what is missing may be committed).
    #[error("persisted log is not contiguous: entry {found} where {expected} was expected")]
    LogNotContiguous {
        /// The index the next entry should have had.
        expected: LogIndex,
        /// The index it had.
        found: LogIndex,
    },
}
