//! Where a peer keeps its term, vote, snapshot and log: the [`LogStore`] trait, the in-memory store
//! that is the embedded default ([`MemoryLogStore`]), and the durable file store ([`FileLogStore`],
//! selected by `storage.dir`).
//!
//! The node actor writes what each [`Ready`](crate::raft::Ready) asks for, in order (snapshot, term and
//! vote, entries, commit mark), then calls [`LogStore::sync`] once (group commit), and only then sends
//! that Ready's messages (a leader's own log write may instead be synced by
//! [`LogStore::sync_in_background`], when the store offers it). A durable store must have made every write durable when `sync` returns (as
//! far as its [`SyncPolicy`] promises); a store that fails any call stops the peer (a failed fsync is
//! never retried: the kernel may have dropped the dirty pages, so a retry that succeeds proves nothing).

mod error;
mod file;
mod memory;

pub use error::StorageError;
pub use file::{FileLogStore, FileLogStoreOptions};
pub use memory::MemoryLogStore;

use serde::{Deserialize, Serialize};

use crate::error::HamokError;
use crate::raft::{Entry, HardState, LogIndex, PeerId, PersistedState, Snapshot, Term};

/// Durable (or not) storage of one peer's Raft state.
pub trait LogStore: Send + 'static {
    /// Everything stored, to rebuild the engine after a restart.
    fn load(&mut self) -> Result<PersistedState, HamokError>;
    /// Records the term and vote.
    fn save_hard_state(&mut self, state: &HardState) -> Result<(), HamokError>;
    /// Records a snapshot; entries up to its last index are dropped (all entries, when the entry at its
    /// last index is missing or of another term). Durable when it returns, whatever the sync policy.
    fn save_snapshot(&mut self, snapshot: &Snapshot) -> Result<(), HamokError>;
    /// Drops the entry at `from` and everything after it, then appends `entries` (contiguous from `from`).
    fn write_entries(&mut self, from: LogIndex, entries: &[Entry]) -> Result<(), HamokError>;
    /// Records that the entry (`index`, `term`), which this store holds, is committed. The default
    /// keeps nothing: a restarted peer then re-applies only up to its snapshot until its leader tells it
    /// the commit index (still safe, but it may briefly serve older local reads than before).
    fn save_committed(&mut self, index: LogIndex, term: Term) -> Result<(), HamokError> {
        let _ = (index, term);
        Ok(())
    }
    /// Makes every write so far durable (a no-op for the in-memory store). A durable store first waits
    /// for its background syncs, and fails if one did.
    fn sync(&mut self) -> Result<(), HamokError>;

    /// Whether [`LogStore::sync_in_background`] may start syncs (the node then lets a leader's own
    /// log writes become durable after its messages leave). Default: `false`.
    fn syncs_in_background(&self) -> bool {
        false
    }
    /// Writes every pending write to the kernel and starts making it durable on another thread;
    /// `done` gets the outcome there, once. `Ok(false)` when nothing needs a sync or no sync could be
    /// started (the default): the caller then calls [`LogStore::sync`].
    fn sync_in_background(&mut self, done: SyncDone) -> Result<bool, HamokError> {
        let _ = done;
        Ok(false)
    }

    /// Number of entries and their approximate bytes currently stored.
    fn size(&self) -> (u64, u64);

    /// Whether what this store holds dies with the process (an in-memory store). A leader's log write
    /// then counts toward a commit without being reported durable first: a crash loses the whole
    /// store anyway, and the peer comes back as a new one. A store that outlives the process has
    /// each write reported durable first, and a follower is promised a commit only on what was
    /// reported (`AppendEntries::committed_once_held`). Default: `false`, the safe answer.
    fn is_volatile(&self) -> bool {
        false
    }

    /// Whether calls may wait on the disk or the network. The node then makes them without holding
    /// up the runtime's other tasks (`tokio::task::block_in_place` on a multi-thread runtime), at the
    /// cost of a thread hand-off per call. Default: `true`; a store that only touches memory answers
    /// `false`.
    fn may_block(&self) -> bool {
        true
    }

    /// Whether a [`sync`](LogStore::sync) now, after at most a commit mark was saved, may wait on the
    /// disk. When it may not (nothing written needs an `fdatasync` yet, as after a Ready that only
    /// moves the commit mark under `batch`), the node makes that call, and the mark's write, on the
    /// runtime's thread: a thread hand-off costs more than the `write(2)`. Default: [`may_block`].
    ///
    /// [`may_block`]: LogStore::may_block
    fn sync_may_block(&self) -> bool {
        self.may_block()
    }

    /// Whether writing `count` entries of `bytes` bytes in all, and the [`sync`](LogStore::sync)
    /// after them, may wait on the disk. When it may not (the policy syncs them later), the node
    /// makes those calls on the runtime's thread, as for a commit mark: the writes only reach the
    /// kernel's page cache. Default: [`may_block`](LogStore::may_block).
    fn entries_may_block(&self, count: usize, bytes: usize) -> bool {
        let _ = (count, bytes);
        self.may_block()
    }

    /// The peer id this store was written by, if it keeps one (a durable store does, so a restarted
    /// peer keeps its identity without configuring it).
    fn peer_id(&self) -> Option<PeerId> {
        None
    }
    /// Binds the store to `id` (before anything is loaded). A store written by another peer refuses
    /// with [`StorageError::WrongPeer`]: its vote and log belong to that identity.
    fn bind_peer(&mut self, id: &PeerId) -> Result<(), HamokError> {
        let _ = id;
        Ok(())
    }
    /// The incarnation of the cluster this store's log belongs to (0: none yet, or not kept). See
    /// [`Frame::incarnation`](crate::wire::Frame::incarnation).
    fn incarnation(&self) -> u64 {
        0
    }
    /// Records the incarnation of the cluster the log belongs to (when the peer founds a cluster or first
    /// accepts a leader's entries). Durable when it returns.
    fn save_incarnation(&mut self, incarnation: u64) -> Result<(), HamokError> {
        let _ = incarnation;
        Ok(())
    }
}

/// Called once, on a store's sync thread, with the outcome of a sync started by
/// [`LogStore::sync_in_background`].
pub type SyncDone = Box<dyn FnOnce(Result<(), StorageError>) + Send>;

/// When a durable store calls `fdatasync`, and what each choice can lose.
///
/// | policy | survives a process crash (`kill -9`) | survives a power cut / kernel crash |
/// |---|---|---|
/// | `batch` (default) | everything acknowledged | everything acknowledged |
/// | `interval` | everything acknowledged | all but up to `sync_interval_ms` of writes |
/// | `never` | everything acknowledged | all but what the kernel had not yet written back |
///
/// Only `batch` keeps Raft's promise through a power cut: with the others, a peer may come back having
/// forgotten a vote or entries it acknowledged, and if a majority does so at once, acknowledged writes
/// can be lost. Writes always reach the kernel before a Ready's messages leave, so a crash of the
/// process alone (the common case: a deploy, an OOM kill) loses nothing under any policy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncPolicy {
    /// One `fdatasync` per Ready (group commit: every write of a batch shares it), before the batch's
    /// messages are sent.
    #[default]
    Batch,
    /// At most one `fdatasync` per `storage.sync_interval_ms`, from the Ready path.
    Interval,
    /// Never `fdatasync` the log (snapshots are still written atomically and synced).
    Never,
}
