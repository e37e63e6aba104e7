//! What the engine asks its driver to do: persist, send, apply, answer reads.

use super::message::Message;
use super::types::{Entry, HardState, LogIndex, PeerId, Role, Snapshot, Term};

/// Role, term and leader, reported when any of them changes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SoftState {
    /// The peer's role.
    pub role: Role,
    /// The peer's term.
    pub term: Term,
    /// The leader this peer follows (itself when leader), if known.
    pub leader: Option<PeerId>,
}

/// The outcome of a ReadIndex request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadState {
    /// The caller's id for the read.
    pub ctx: u64,
    /// Serve the read once the local state machines have applied this index; `None` when the read was
    /// abandoned (leadership lost, no leader, or the leader refused): retry it.
    pub index: Option<LogIndex>,
}

/// One batch of work for the driver. Handle it in this order:
/// 1. make `snapshot`, `hard_state` and the log write (`entries_from`, `entries`) durable;
/// 2. send `messages` (only now: a vote or an acknowledgement must never outrun the state it promises);
/// 3. restore `snapshot` into the state machines, then apply `committed` in order;
/// 4. answer each of `read_states` once the applied index reaches its index.
///
/// With [`RaftConfig::persist_async`](super::RaftConfig::persist_async), a leader's Ready that carries
/// no `hard_state` and no `snapshot` may send its messages and apply before its log write is durable
/// (they promise nothing about the leader's own log); report each write with
/// [`RaftNode::on_persisted`](super::RaftNode::on_persisted) once it is, every other Ready's right
/// after step 1.
#[derive(Clone, Debug, Default)]
pub struct Ready {
    /// Set when role, term or leader changed.
    pub soft_state: Option<SoftState>,
    /// Set when term or vote changed: persist before sending.
    pub hard_state: Option<HardState>,
    /// A snapshot received from the leader: persist it (it replaces the log up to its index), then restore it.
    pub snapshot: Option<Snapshot>,
    /// When set, truncate the durable log at this index (drop it and everything after) and append `entries`.
    pub entries_from: Option<LogIndex>,
    /// Entries to append to the durable log, contiguous from `entries_from`.
    pub entries: Vec<Entry>,
    /// Messages to send after the writes above are durable.
    pub messages: Vec<Message>,
    /// Committed entries to apply, in order, contiguous.
    pub committed: Vec<Entry>,
    /// Outcomes of ReadIndex requests.
    pub read_states: Vec<ReadState>,
}

impl Ready {
    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.soft_state.is_none()
            && self.hard_state.is_none()
            && self.snapshot.is_none()
            && self.entries_from.is_none()
            && self.messages.is_empty()
            && self.committed.is_empty()
            && self.read_states.is_empty()
    }
}
