//! [`FileLogStore`]: a peer's Raft state in a directory of its own, crash-safe.
//!
//! Layout of the directory:
//!
//! * `log/`: the write-ahead log, kept by the `raft-log` crate (chunked files, a checksum per record,
//!   an exclusive `LOCK` file): term and vote as one record, entries, truncations, purges behind the
//!   snapshot, the commit mark, and this peer's id.
//! * `snapshot`: the latest snapshot, replaced atomically (see `snapshot.rs`).
//!
//! Recovery rules (at [`FileLogStore::open`]):
//!
//! * a torn tail (the last record of the last chunk cut short, or trailing zeros) is cut at the last
//!   valid record: it was never synced, so it was never acknowledged;
//! * a bad checksum or an undecodable record anywhere else, a missing chunk or a gap between chunks, a
//!   log that does not continue its snapshot, or a snapshot file that does not verify is
//!   [`StorageError::Corrupt`]: the peer refuses to start (cutting there could drop committed entries);
//! * a directory whose lock another live process holds is [`StorageError::Locked`];
//! * a crash between writing a snapshot and purging the log behind it is finished on open.
//!
//! After any failed write or `fdatasync` the store refuses every call ([`StorageError::Io`]), so the
//! peer stops: a failed fsync is never retried.

mod snapshot;

use std::collections::VecDeque;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use raft_log::api::raft_log_writer::RaftLogWriter;
use raft_log::{RaftLog, Types};

use super::{LogStore, StorageError, SyncPolicy};
use crate::config::StorageConfig;
use crate::error::{Cause, HamokError};
use crate::raft::{
    Entry, EntryPayload, HardState, LogIndex, PeerId, PersistedState, Snapshot, Term,
};

/// Largest chunk file of the log: the log is compacted behind snapshots a whole chunk at a time, so
/// this bounds the disk a compacted log still holds (with the default snapshot thresholds, a chunk
/// spans several snapshots).
const CHUNK_MAX_BYTES: usize = 64 << 20;
/// Entries whose payload the log keeps cached in memory besides the engine's own copy (reads at open
/// go to disk past it).
const CACHE_MAX_ENTRIES: usize = 1_024;
const CACHE_MAX_BYTES: usize = 8 << 20;
/// Read buffer of the log's chunk reader.
const READ_BUFFER_BYTES: usize = 1 << 20;

/// The log's record types, on `raft-log`'s own codecs (each record is checksummed by the log).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct LogTypes;

impl Types for LogTypes {
    /// `(term, index)`: ordered by term, then index.
    type LogId = (u64, u64);
    /// The MessagePack encoding of the entry's [`EntryPayload`].
    type LogPayload = Vec<u8>;
    /// `(term, voted_for)`: term and vote in one record, never torn apart.
    type Vote = (u64, Option<String>);
    type Callback = SyncSender<Result<(), io::Error>>;
    /// The id of the peer that owns the directory, and the incarnation of the cluster its log belongs to.
    type UserData = (String, u64);

    fn log_index(log_id: &(u64, u64)) -> u64 {
        log_id.1
    }

    fn payload_size(payload: &Vec<u8>) -> u64 {
        payload.len() as u64
    }
}

/// Options of a [`FileLogStore`] beyond its directory.
#[derive(Clone, Debug)]
pub struct FileLogStoreOptions {
    /// When the log is synced (default: once per Ready).
    pub sync: SyncPolicy,
    /// With [`SyncPolicy::Interval`]: the longest time between two syncs.
    pub sync_interval: Duration,
    /// Largest chunk file (default 64 MiB; tests use small chunks to exercise several).
    pub chunk_max_bytes: usize,
    /// Fault injection (`testing` feature): while set, every sync fails as an `fdatasync` error would.
    #[cfg(any(test, feature = "testing"))]
    pub fail_syncs: Option<Arc<std::sync::atomic::AtomicBool>>,
}

impl Default for FileLogStoreOptions {
    fn default() -> Self {
        FileLogStoreOptions {
            sync: SyncPolicy::Batch,
            sync_interval: Duration::from_millis(100),
            chunk_max_bytes: CHUNK_MAX_BYTES,
            #[cfg(any(test, feature = "testing"))]
            fail_syncs: None,
        }
    }
}

impl FileLogStoreOptions {
    /// The options `[storage]` asks for.
    pub fn from_config(storage: &StorageConfig) -> Self {
        FileLogStoreOptions {
            sync: storage.sync,
            sync_interval: Duration::from_millis(storage.sync_interval_ms),
            ..FileLogStoreOptions::default()
        }
    }
}

/// A durable [`LogStore`] in a directory of its own (see the module docs for the layout and the
/// recovery rules). Selected by `storage.dir` (or [`HamokBuilder::storage_dir`](crate::HamokBuilder::storage_dir)).
///
/// ```
/// use hamok_runtime::store::{FileLogStore, FileLogStoreOptions, LogStore};
/// let dir = std::env::temp_dir().join(format!("hamok-doc-{}", std::process::id()));
/// let mut store = FileLogStore::open(&dir, FileLogStoreOptions::default())?;
/// assert_eq!(store.load()?.entries.len(), 0);
/// drop(store);
/// # std::fs::remove_dir_all(&dir).unwrap();
/// # Ok::<(), hamok_runtime::HamokError>(())
/// ```
pub struct FileLogStore {
    dir: PathBuf,
    log: RaftLog<LogTypes>,
    options: FileLogStoreOptions,
    snapshot_index: LogIndex,
    snapshot_term: Term,
    /// `(term, bytes)` of each entry after the snapshot, in index order: answers "which term is at
    /// index i" and the log's size without reading the disk.
    entries: VecDeque<(Term, u32)>,
    entry_bytes: u64,
    committed: LogIndex,
    /// What `open` read, handed out by the first `load`.
    loaded: Option<PersistedState>,
    /// Writes not yet flushed to the log's files, and whether any of them must be synced (term, vote,
    /// entries, truncations; the commit mark alone need not be).
    dirty: bool,
    needs_sync: bool,
    /// With `SyncPolicy::Interval`: when writes were last synced, and whether some wait for a sync.
    last_sync: Instant,
    unsynced: bool,
    /// Set by the first failed write or sync: every later call fails with it.
    failed: Option<StorageError>,
}

impl std::fmt::Debug for FileLogStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileLogStore")
            .field("dir", &self.dir)
            .field("snapshot_index", &self.snapshot_index)
            .field("entries", &self.entries.len())
            .field("committed", &self.committed)
            .finish_non_exhaustive()
    }
}

impl FileLogStore {
    /// Opens (or creates) the store in `dir`, recovering it by the rules of the module docs. Reads and
    /// verifies everything (the log and the snapshot), so a damaged directory fails here, typed.
    pub fn open(dir: impl AsRef<Path>, options: FileLogStoreOptions) -> Result<Self, HamokError> {
        let dir = dir.as_ref().to_path_buf();
        let log_dir = dir.join("log");
        std::fs::create_dir_all(&log_dir)
            .map_err(|e| snapshot::io_error(&dir, "create storage directory", e))?;
        snapshot::remove_leftover(&dir)?;
        let mut config = raft_log::Config::new(log_dir.to_string_lossy());
        config.wal.chunk_max_size = Some(options.chunk_max_bytes);
        config.wal.read_buffer_size = Some(READ_BUFFER_BYTES);
        // One sync per Ready is the batching: the log's worker must not wait for more.
        config.wal.flush_batch_wait = Some(Duration::ZERO);
        config.log_cache_max_items = Some(CACHE_MAX_ENTRIES);
        config.log_cache_capacity = Some(CACHE_MAX_BYTES);
        let log = RaftLog::<LogTypes>::open(Arc::new(config)).map_err(|e| open_error(&dir, e))?;
        let snapshot = snapshot::read(&dir)?.unwrap_or_default();
        let mut store = FileLogStore {
            dir,
            log,
            options,
            snapshot_index: snapshot.meta.last_index,
            snapshot_term: snapshot.meta.last_term,
            entries: VecDeque::new(),
            entry_bytes: 0,
            committed: 0,
            loaded: None,
            dirty: false,
            needs_sync: false,
            last_sync: Instant::now(),
            unsynced: false,
            failed: None,
        };
        let loaded = store.recover(snapshot)?;
        store.loaded = Some(loaded);
        Ok(store)
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn corrupt(&self, detail: String) -> StorageError {
        StorageError::Corrupt {
            dir: self.dir.clone(),
            detail,
            source: None,
        }
    }

    /// Reads the log against the snapshot, finishes an interrupted snapshot install, and returns what
    /// the engine restarts from.
    fn recover(&mut self, snapshot: Snapshot) -> Result<PersistedState, StorageError> {
        let state = self.log.log_state().clone();
        let purged = state.purged().map_or(0, |p| p.1);
        let has_snapshot_file = snapshot.meta.last_index > 0 || !snapshot.data.is_empty();
        if purged > self.snapshot_index {
            return Err(self.corrupt(format!(
                "the log is compacted to {purged} but the snapshot {} only reaches {}",
                if has_snapshot_file {
                    "file"
                } else {
                    "file is missing and"
                },
                self.snapshot_index
            )));
        }
        if state.purged().is_none() && state.last().is_none() {
            // A new directory: the base every later truncation refers to.
            self.log
                .purge((0, 0))
                .map_err(|e| self.io("initialise log", e))?;
            self.flush(true)?;
        }
        // Read every entry after the snapshot, checking that they continue it.
        let last = state.last().map_or(0, |l| l.1);
        let mut entries = Vec::new();
        let mut conflict = false;
        if last >= self.snapshot_index && self.snapshot_index > purged {
            // The entry at the snapshot's index must be the snapshot's own.
            match self
                .log
                .read(self.snapshot_index, self.snapshot_index + 1)
                .next()
            {
                Some(Ok(((term, _), _))) => conflict = term != self.snapshot_term,
                Some(Err(e)) => return Err(self.read_error(self.snapshot_index, e)),
                None => conflict = true,
            }
        } else if last < self.snapshot_index {
            conflict = true;
        }
        if !conflict {
            let mut expected = self.snapshot_index + 1;
            for item in self.log.read(self.snapshot_index + 1, last + 1) {
                let ((term, index), payload) = item.map_err(|e| self.read_error(expected, e))?;
                if index != expected {
                    return Err(self.corrupt(format!(
                        "log entry {index} where {expected} was expected (a chunk is missing)"
                    )));
                }
                let payload: EntryPayload =
                    rmp_serde::from_slice(&payload).map_err(|e| StorageError::Corrupt {
                        dir: self.dir.clone(),
                        detail: format!("log entry {index} does not decode"),
                        source: Some(Cause::new(e)),
                    })?;
                entries.push(Entry {
                    index,
                    term,
                    payload,
                });
                expected += 1;
            }
            if expected != last + 1 {
                return Err(self.corrupt(format!(
                    "the log ends at {} but records entries up to {last}",
                    expected - 1
                )));
            }
        }
        if self.snapshot_index > purged || conflict {
            // A crash came between writing the snapshot and compacting the log behind it (or the log
            // conflicts with a snapshot installed from the leader): finish it.
            self.adopt_snapshot(conflict)?;
            entries.clear();
            if !conflict {
                return self.recover(snapshot);
            }
        }
        for e in &entries {
            self.entries
                .push_back((e.term, u32::try_from(e.size_bytes()).unwrap_or(u32::MAX)));
            self.entry_bytes += e.size_bytes() as u64;
        }
        let committed = state
            .committed()
            .map_or(0, |c| c.1)
            .max(self.snapshot_index);
        self.committed = committed;
        let hard_state = match state.vote().cloned() {
            Some((term, voted_for)) => HardState {
                term,
                voted_for: voted_for.map(PeerId::from),
            },
            None => HardState::default(),
        };
        Ok(PersistedState {
            hard_state,
            snapshot,
            entries,
            committed,
        })
    }

    /// Makes the log start right after the snapshot (`snapshot_index`, `snapshot_term`): drops the
    /// entries it covers, and, when the log conflicts with it, every entry above the commit mark.
    fn adopt_snapshot(&mut self, conflict: bool) -> Result<(), StorageError> {
        let (index, term) = (self.snapshot_index, self.snapshot_term);
        if conflict {
            let state = self.log.log_state();
            let last = state.last().map_or(0, |l| l.1);
            let first_kept = state.purged().map_or(0, |p| p.1) + 1;
            let committed = state.committed().map_or(0, |c| c.1);
            if committed >= index {
                return Err(self.corrupt(format!(
                    "the snapshot at ({index}, {term}) conflicts with committed log entries up to {committed}"
                )));
            }
            let from = first_kept.max(committed + 1);
            if from <= last {
                self.log
                    .truncate(from)
                    .map_err(|e| self.io("truncate the log under a snapshot", e))?;
            }
        }
        self.log
            .purge((term, index))
            .map_err(|e| self.io("compact the log behind a snapshot", e))?;
        // Always synced: compacted chunks are removed only behind a synced purge.
        self.flush(true)
    }

    fn read_error(&self, index: LogIndex, e: io::Error) -> StorageError {
        StorageError::Corrupt {
            dir: self.dir.clone(),
            detail: format!("log entry {index} is unreadable"),
            source: Some(Cause::new(e)),
        }
    }

    fn io(&self, context: &str, e: io::Error) -> StorageError {
        StorageError::Io {
            context: format!("{context} in {}", self.dir.display()),
            source: Some(Cause::new(e)),
        }
    }

    /// Fails with the error that stopped the store, if any.
    fn check(&self) -> Result<(), HamokError> {
        match &self.failed {
            Some(e) => Err(HamokError::Storage(e.clone())),
            None => Ok(()),
        }
    }

    /// Records `e` as the store's failure (every later call fails with it) and returns it.
    fn fail(&mut self, e: StorageError) -> HamokError {
        self.failed.get_or_insert(e.clone());
        HamokError::Storage(e)
    }

    /// Hands the pending writes to the log's writer and waits until they are written (and synced, when
    /// `sync`).
    fn flush(&mut self, sync: bool) -> Result<(), StorageError> {
        #[cfg(any(test, feature = "testing"))]
        if sync
            && self
                .options
                .fail_syncs
                .as_ref()
                .is_some_and(|f| f.load(std::sync::atomic::Ordering::SeqCst))
        {
            return Err(StorageError::Io {
                context: format!("fdatasync in {} (injected)", self.dir.display()),
                source: None,
            });
        }
        let (tx, rx) = sync_channel(1);
        self.log
            .flush(sync, Some(tx))
            .map_err(|e| self.io("flush the log", e))?;
        match rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(self.io(if sync { "fdatasync" } else { "write" }, e)),
            Err(_) => {
                return Err(StorageError::Io {
                    context: format!("the log writer of {} stopped", self.dir.display()),
                    source: None,
                })
            }
        }
        self.dirty = false;
        self.needs_sync = false;
        if sync {
            self.last_sync = Instant::now();
            self.unsynced = false;
        } else {
            self.unsynced = true;
        }
        Ok(())
    }

    fn last_index(&self) -> LogIndex {
        self.snapshot_index + self.entries.len() as u64
    }

    fn term_at(&self, index: LogIndex) -> Option<Term> {
        if index == self.snapshot_index {
            return Some(self.snapshot_term);
        }
        let offset = index.checked_sub(self.snapshot_index + 1)?;
        self.entries.get(offset as usize).map(|(t, _)| *t)
    }

    fn save_snapshot_inner(&mut self, snap: &Snapshot) -> Result<(), StorageError> {
        let (index, term) = (snap.meta.last_index, snap.meta.last_term);
        if index < self.snapshot_index {
            return Err(self.corrupt(format!(
                "asked to keep snapshot {index} behind the stored snapshot {}",
                self.snapshot_index
            )));
        }
        let conflict = self.term_at(index) != Some(term);
        snapshot::write(&self.dir, snap)?;
        if conflict {
            self.entries.clear();
            self.entry_bytes = 0;
        } else {
            let covered = (index - self.snapshot_index) as usize;
            for (_, bytes) in self.entries.drain(..covered) {
                self.entry_bytes -= u64::from(bytes);
            }
        }
        self.snapshot_index = index;
        self.snapshot_term = term;
        self.committed = self.committed.max(index);
        self.adopt_snapshot(conflict)
    }

    fn write_entries_inner(&mut self, from: LogIndex, entries: &[Entry]) -> Result<(), HamokError> {
        let from = from.max(self.snapshot_index + 1);
        let last = self.last_index();
        if from > last + 1 {
            return Err(HamokError::codec(
                format!("log write at {from} leaves a gap after {last}"),
                None,
            ));
        }
        if from <= last {
            self.log
                .truncate(from)
                .map_err(|e| self.io("truncate the log", e))?;
            let keep = (from - self.snapshot_index - 1) as usize;
            for (_, bytes) in self.entries.drain(keep..) {
                self.entry_bytes -= u64::from(bytes);
            }
            self.committed = self.committed.min(from - 1);
        }
        let mut records = Vec::with_capacity(entries.len());
        for e in entries.iter().filter(|e| e.index >= from) {
            let payload = rmp_serde::to_vec(&e.payload)?;
            let bytes = e.size_bytes();
            self.entries
                .push_back((e.term, u32::try_from(bytes).unwrap_or(u32::MAX)));
            self.entry_bytes += bytes as u64;
            records.push(((e.term, e.index), payload));
        }
        self.log
            .append(records)
            .map_err(|e| self.io("append to the log", e))?;
        self.dirty = true;
        self.needs_sync = true;
        Ok(())
    }
}

fn open_error(dir: &Path, e: io::Error) -> StorageError {
    match e.kind() {
        io::ErrorKind::WouldBlock => StorageError::Locked {
            dir: dir.to_path_buf(),
            source: Some(Cause::new(e)),
        },
        io::ErrorKind::PermissionDenied | io::ErrorKind::NotFound => StorageError::Io {
            context: format!("open the log in {}", dir.display()),
            source: Some(Cause::new(e)),
        },
        // Damaged records, gaps between chunks, records that break the log's own rules.
        _ => StorageError::Corrupt {
            dir: dir.to_path_buf(),
            detail: "the log does not verify".into(),
            source: Some(Cause::new(e)),
        },
    }
}

/// Runs `f`; a storage error stops the store for good.
macro_rules! guarded {
    ($self:ident, $body:expr) => {{
        $self.check()?;
        match $body {
            Ok(v) => Ok(v),
            Err(HamokError::Storage(e)) => Err($self.fail(e)),
            Err(e) => Err(e),
        }
    }};
}

impl LogStore for FileLogStore {
    fn load(&mut self) -> Result<PersistedState, HamokError> {
        self.check()?;
        if let Some(loaded) = self.loaded.take() {
            return Ok(loaded);
        }
        let snapshot = snapshot::read(&self.dir)?.unwrap_or_default();
        self.entries.clear();
        self.entry_bytes = 0;
        guarded!(self, self.recover(snapshot).map_err(HamokError::Storage))
    }

    fn save_hard_state(&mut self, state: &HardState) -> Result<(), HamokError> {
        guarded!(self, {
            let vote = (state.term, state.voted_for.as_ref().map(|p| p.to_string()));
            self.dirty = true;
            self.needs_sync = true;
            self.log
                .save_vote(vote)
                .map(|_| ())
                .map_err(|e| HamokError::Storage(self.io("save term and vote", e)))
        })
    }

    fn save_snapshot(&mut self, snap: &Snapshot) -> Result<(), HamokError> {
        guarded!(
            self,
            self.save_snapshot_inner(snap).map_err(HamokError::Storage)
        )
    }

    fn write_entries(&mut self, from: LogIndex, entries: &[Entry]) -> Result<(), HamokError> {
        guarded!(self, self.write_entries_inner(from, entries))
    }

    fn save_committed(&mut self, index: LogIndex, term: Term) -> Result<(), HamokError> {
        guarded!(self, {
            if index <= self.committed || self.term_at(index) != Some(term) {
                Ok(())
            } else {
                self.committed = index;
                self.dirty = true;
                self.log
                    .commit((term, index))
                    .map(|_| ())
                    .map_err(|e| HamokError::Storage(self.io("save the commit mark", e)))
            }
        })
    }

    fn sync(&mut self) -> Result<(), HamokError> {
        guarded!(self, {
            // Whether to fdatasync now; otherwise the writes only reach the kernel (they survive a
            // crash of the process, not a power cut).
            let sync = match self.options.sync {
                SyncPolicy::Batch => self.needs_sync,
                SyncPolicy::Interval => {
                    (self.needs_sync || self.unsynced)
                        && self.last_sync.elapsed() >= self.options.sync_interval
                }
                SyncPolicy::Never => false,
            };
            if self.dirty || sync {
                self.flush(sync).map_err(HamokError::Storage)
            } else {
                Ok(())
            }
        })
    }

    fn size(&self) -> (u64, u64) {
        (self.entries.len() as u64, self.entry_bytes)
    }

    fn peer_id(&self) -> Option<PeerId> {
        self.log
            .log_state()
            .user_data
            .as_ref()
            .map(|(id, _)| PeerId::from(id.clone()))
    }

    fn incarnation(&self) -> u64 {
        self.log
            .log_state()
            .user_data
            .as_ref()
            .map_or(0, |(_, i)| *i)
    }

    fn save_incarnation(&mut self, incarnation: u64) -> Result<(), HamokError> {
        guarded!(self, {
            let id = self.peer_id().map(|p| p.to_string()).unwrap_or_default();
            self.log
                .save_user_data(Some((id, incarnation)))
                .map_err(|e| self.io("save the cluster incarnation", e))
                .and_then(|_| self.flush(true))
                .map_err(HamokError::Storage)
        })
    }

    fn bind_peer(&mut self, id: &PeerId) -> Result<(), HamokError> {
        guarded!(self, {
            match self.peer_id() {
                Some(stored) if stored == *id => Ok(()),
                Some(stored) => Err(HamokError::Storage(StorageError::WrongPeer {
                    dir: self.dir.clone(),
                    stored,
                    configured: id.clone(),
                })),
                None => self
                    .log
                    .save_user_data(Some((id.to_string(), self.incarnation())))
                    .map_err(|e| self.io("save the peer id", e))
                    .and_then(|_| self.flush(true))
                    .map_err(HamokError::Storage),
            }
        })
    }
}

#[cfg(test)]
mod tests;
