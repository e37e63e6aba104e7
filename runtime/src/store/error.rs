//! [`StorageError`]: why a durable store refused to open, load or write.

use std::path::PathBuf;

use crate::error::Cause;
use crate::raft::PeerId;

/// Why a [`LogStore`](super::LogStore) failed. Each case stops the peer (it never starts on, or goes on
/// with, state it cannot trust); none is retried.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    /// Another live process holds the directory's lock. Two peers on one directory would interleave
    /// their logs.
    #[error("storage directory {dir:?} is in use by another process")]
    Locked {
        /// The directory.
        dir: PathBuf,
        /// The lock error.
        #[source]
        source: Option<Cause>,
    },
    /// The stored data is damaged where it cannot be a torn tail: a bad checksum or an undecodable
    /// record before the last one, a missing chunk or a gap, a snapshot file that does not verify, or a
    /// log that does not continue its snapshot. The peer refuses to start: cutting the log there could
    /// drop committed entries. Restore the directory from a backup, or remove it to rejoin as a new peer.
    #[error("storage directory {dir:?} is corrupt: {detail}")]
    Corrupt {
        /// The directory.
        dir: PathBuf,
        /// What does not verify, and where.
        detail: String,
        /// The underlying error, if any.
        #[source]
        source: Option<Cause>,
    },
    /// The directory was written by another peer id.
    #[error("storage directory {dir:?} belongs to peer `{stored}`, not `{configured}`")]
    WrongPeer {
        /// The directory.
        dir: PathBuf,
        /// The id it holds.
        stored: PeerId,
        /// The id this peer was given.
        configured: PeerId,
    },
    /// A volatile in-memory store ([`MemoryLogStore::volatile`](super::MemoryLogStore::volatile)) was
    /// asked to load after entries or a snapshot were written to it: it keeps neither, so it cannot
    /// give them back.
    #[error("a volatile in-memory store keeps no log and cannot be loaded again")]
    Volatile,
    /// A read, write or `fdatasync` failed. After a failed sync the store refuses every further call:
    /// the kernel may have dropped the unwritten pages, so nothing written since the last good sync can
    /// be trusted.
    #[error("storage I/O failed ({context})")]
    Io {
        /// What was being done.
        context: String,
        /// The I/O error.
        #[source]
        source: Option<Cause>,
    },
}
