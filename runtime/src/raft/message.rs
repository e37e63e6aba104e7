//! The messages peers exchange. Every message carries the sender's term.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::types::{Entry, LogIndex, PeerId, SnapshotMeta, Term};

/// One Raft message from `from` to `to`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// The sender.
    pub from: PeerId,
    /// The receiver.
    pub to: PeerId,
    /// The sender's term (for a pre-vote request: the term it would campaign in).
    pub term: Term,
    /// What the message says.
    pub body: MessageBody,
}

/// The kinds of Raft message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MessageBody {
    /// Asks for a vote (or a pre-vote) for a candidacy in `Message::term`.
    RequestVote {
        /// A pre-vote: the receiver answers as it would vote but changes no state.
        pre_vote: bool,
        /// Campaign started by a leadership transfer: receivers ignore their leader lease.
        transfer: bool,
        /// The candidate's last log index.
        last_log_index: LogIndex,
        /// The term of the candidate's last entry.
        last_log_term: Term,
    },
    /// Answers a [`MessageBody::RequestVote`].
    VoteResponse {
        /// Answers a pre-vote.
        pre_vote: bool,
        /// Whether the vote is granted.
        granted: bool,
    },
    /// Replicates entries after (`prev_log_index`, `prev_log_term`).
    AppendEntries {
        /// Index of the entry just before `entries`.
        prev_log_index: LogIndex,
        /// Term of that entry.
        prev_log_term: Term,
        /// The entries, contiguous; may be empty (a probe).
        entries: Vec<Entry>,
        /// The leader's commit index.
        leader_commit: LogIndex,
        /// Entries up to this index are committed as soon as the recipient holds them (0: no such
        /// promise). Set only by the leader of a configuration of exactly three voters with no change
        /// pending, to a voter, for entries of its own term that it holds durably: with the
        /// recipient's copy they are on two of three voters, a majority, and since any two
        /// configurations in use differ by one server, every later majority overlaps them. The
        /// recipient commits them without waiting for the leader to count its answer: a follower's
        /// write completes one round trip sooner, and the leader's separate commit notice is not needed.
        committed_once_held: LogIndex,
    },
    /// Answers [`MessageBody::AppendEntries`].
    AppendResponse {
        /// Whether the entries were accepted.
        success: bool,
        /// On success: the last index now known to match the leader. On rejection: the rejected
        /// `prev_log_index` (lets the leader ignore stale rejections).
        index: LogIndex,
        /// On rejection: the index the follower suggests probing at (its conflict hint).
        hint_index: LogIndex,
        /// On rejection: the follower's term at `hint_index`, for fast back-up.
        hint_term: Term,
    },
    /// Keeps followers from campaigning, carries the commit index and confirms leadership for reads.
    Heartbeat {
        /// The leader's commit index, capped at what the follower is known to hold.
        commit: LogIndex,
        /// Leadership-confirmation round, echoed back (see ReadIndex).
        read_seq: u64,
    },
    /// Answers [`MessageBody::Heartbeat`], once per round: a heartbeat whose round the follower has
    /// already answered in this term (a commit notice reuses the current round) gets no answer.
    HeartbeatResponse {
        /// The echoed round.
        read_seq: u64,
    },
    /// One chunk of a snapshot the leader installs on a peer that is too far behind.
    InstallSnapshot {
        /// What the snapshot covers.
        meta: SnapshotMeta,
        /// Offset of `data` in the whole snapshot.
        offset: u64,
        /// The chunk.
        data: Bytes,
        /// Whether this is the last chunk.
        done: bool,
    },
    /// Answers [`MessageBody::InstallSnapshot`].
    SnapshotResponse {
        /// The snapshot's last index (identifies the snapshot together with `last_term`).
        last_index: LogIndex,
        /// The snapshot's last term.
        last_term: Term,
        /// How many bytes the receiver holds so far (the next offset it expects).
        next_offset: u64,
        /// Whether the snapshot is installed (or already covered by the receiver's commit).
        done: bool,
    },
    /// Tells the transfer target to campaign at once.
    TimeoutNow,
    /// A follower asks the leader for a read index on behalf of a local read.
    ReadIndexRequest {
        /// Opaque to the leader; identifies the read on the follower.
        ctx: u64,
    },
    /// The leader's answer to [`MessageBody::ReadIndexRequest`].
    ReadIndexResponse {
        /// The follower's read id.
        ctx: u64,
        /// The index the read must wait for, or `None` when the leader could not serve it.
        index: Option<LogIndex>,
    },
}

impl Message {
    /// Approximate encoded size in bytes (for accounting, not exact).
    pub fn size_bytes(&self) -> usize {
        let body = match &self.body {
            MessageBody::AppendEntries { entries, .. } => {
                entries.iter().map(Entry::size_bytes).sum::<usize>() + 32
            }
            MessageBody::InstallSnapshot { data, meta, .. } => {
                data.len() + meta.membership.size_bytes() + 32
            }
            _ => 32,
        };
        body + self.from.as_str().len() + self.to.as_str().len() + 8
    }
}
