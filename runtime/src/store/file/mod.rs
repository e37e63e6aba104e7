//! [`FileLogStore`]: a peer's Raft state in a directory of its own, crash-safe.
//!
//! Layout of the directory:
//!
//! * `wal/`: the write-ahead log (`wal.rs`: chunk files of checksummed records, an exclusive `LOCK`
//!   file): term and vote as one record, entries, truncations, purges behind the snapshot, the commit
//!   mark, and this peer's id with the cluster incarnation. Written on the calling thread, and synced
//!   there or, for a leader's own log writes, on the store's sync thread (`syncer.rs`).
//! * `snapshot`: the latest snapshot, replaced atomically (see `snapshot.rs`).
//!
//! Recovery rules (at [`FileLogStore::open`]):
//!
//! * a torn write is cut off: it was never synced, so it was never acknowledged. The log's chunks
//!   are filled with zeros ahead of their records and every write is declared by a record of its own
//!   (sequence number, extent, the last write synced), because a write over zeros may reach the disk
//!   in any order of its sectors: a record that does not verify in the last chunk is torn when no
//!   later record says its write was synced and, if records that verify follow it, a whole sector
//!   before them is zeros (the `wal.rs` module docs give the rule and what it cannot tell apart). So
//!   is a seal (a full chunk's last record, naming the next chunk) cut short by a crash before the
//!   next chunk received anything;
//! * a bad checksum or an undecodable record anywhere else, a missing chunk (the newest too: its
//!   predecessor's seal names it) or a gap between chunks, a
//!   log that does not continue its snapshot, or a snapshot file that does not verify is
//!   [`StorageError::Corrupt`]: the peer refuses to start (cutting there could drop committed entries);
//! * a directory whose lock another live process holds is [`StorageError::Locked`];
//! * a directory in the layout of earlier builds (a `log/` of the `raft-log` crate) is
//!   [`StorageError::Corrupt`], never read as empty;
//! * a crash between writing a snapshot and purging the log behind it is finished on open.
//!
//! After any failed write or `fdatasync` the store refuses every call ([`StorageError::Io`]), so the
//! peer stops: a failed fsync is never retried.

mod snapshot;
mod syncer;
mod wal;

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
#[cfg(any(test, feature = "testing"))]
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{LogStore, StorageError, SyncDone, SyncPolicy};
use crate::config::StorageConfig;
use crate::error::{Cause, HamokError};
use crate::raft::{Entry, HardState, LogIndex, PeerId, PersistedState, Snapshot, Term};
use syncer::Syncer;
use wal::{Recovered, Wal};

/// Largest chunk file of the log: the log is compacted behind snapshots a whole chunk at a time, so
/// this bounds the disk a compacted log still holds (with the default snapshot thresholds, a chunk
/// spans several snapshots).
const CHUNK_MAX_BYTES: usize = 64 << 20;

/// Options of a [`FileLogStore`] beyond its directory.
#[derive(Clone, Debug)]
pub struct FileLogStoreOptions {
    /// When the log is synced (default: once per Ready).
    pub sync: SyncPolicy,
    /// With [`SyncPolicy::Interval`]: the longest time between two syncs.
    pub sync_interval: Duration,
    /// Largest chunk file (default 64 MiB; tests use small chunks to exercise several).
    pub chunk_max_bytes: usize,
    /// With [`SyncPolicy::Batch`]: sync a leader's own log writes on the store's sync thread (see
    /// `storage.background_sync`; default off).
    pub background_sync: bool,
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
            background_sync: false,
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
            background_sync: storage.background_sync,
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
    /// The sync thread, once a background sync was asked for. Declared before `wal`: dropped first,
    /// it finishes its syncs before the log's files and lock are released.
    syncer: Option<Syncer>,
    wal: Wal,
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
    /// Whether the writes not yet flushed to the log's files (the log's pending records) include one
    /// that must be synced (term, vote, entries, truncations; the commit mark alone need not be).
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
        std::fs::create_dir_all(&dir)
            .map_err(|e| snapshot::io_error(&dir, "create storage directory", e))?;
        refuse_old_layout(&dir)?;
        let (wal, recovered) = Wal::open(&dir, options.chunk_max_bytes)?;
        snapshot::remove_leftover(&dir)?;
        let snapshot = snapshot::read(&dir)?.unwrap_or_default();
        let mut store = FileLogStore {
            dir,
            syncer: None,
            wal,
            options,
            snapshot_index: snapshot.meta.last_index,
            snapshot_term: snapshot.meta.last_term,
            entries: VecDeque::new(),
            entry_bytes: 0,
            committed: 0,
            loaded: None,
            needs_sync: false,
            last_sync: Instant::now(),
            unsynced: false,
            failed: None,
        };
        let loaded = store.recover(snapshot, recovered)?;
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

    /// Checks the log against the snapshot, finishes an interrupted snapshot install, and returns what
    /// the engine restarts from.
    fn recover(
        &mut self,
        snapshot: Snapshot,
        recovered: Recovered,
    ) -> Result<PersistedState, StorageError> {
        let Recovered { state, mut entries } = recovered;
        let purged = state.base.0;
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
        // The entry at the snapshot's index, when the log still holds it, must be the snapshot's own
        // (the entries are contiguous from `purged + 1`).
        let conflict = self.snapshot_index > purged
            && entries
                .get((self.snapshot_index - purged - 1) as usize)
                .is_none_or(|e| e.term != self.snapshot_term);
        if self.snapshot_index > purged {
            // A crash came between writing the snapshot and compacting the log behind it (or the log
            // conflicts with a snapshot installed from the leader): finish it.
            self.adopt_snapshot(conflict)?;
            if conflict {
                entries.clear();
            } else {
                entries.drain(..(self.snapshot_index - purged) as usize);
            }
        }
        for e in &entries {
            self.entries
                .push_back((e.term, u32::try_from(e.size_bytes()).unwrap_or(u32::MAX)));
            self.entry_bytes += e.size_bytes() as u64;
        }
        let committed = state.commit.0.max(self.snapshot_index);
        self.committed = committed;
        let (term, voted_for) = state.vote;
        Ok(PersistedState {
            hard_state: HardState {
                term,
                voted_for: voted_for.map(PeerId::from),
            },
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
            let last = self.wal.last_index();
            let first_kept = self.wal.state().base.0 + 1;
            let committed = self.wal.state().commit.0;
            if committed >= index {
                return Err(self.corrupt(format!(
                    "the snapshot at ({index}, {term}) conflicts with committed log entries up to {committed}"
                )));
            }
            let from = first_kept.max(committed + 1);
            if from <= last {
                self.wal.truncate(from);
            }
        }
        self.wal.purge(index, term);
        // Always synced: compacted chunks are removed only behind a synced purge.
        self.flush(true)
    }

    /// Fails with the error that stopped the store, if any.
    fn check(&self) -> Result<(), HamokError> {
        match &self.failed {
            Some(e) => Err(HamokError::Storage(e.clone())),
            None => match self.syncer.as_ref().and_then(Syncer::failed) {
                Some(e) => Err(HamokError::Storage(e)),
                None => Ok(()),
            },
        }
    }

    /// Records `e` as the store's failure (every later call fails with it) and returns it.
    fn fail(&mut self, e: StorageError) -> HamokError {
        self.failed.get_or_insert(e.clone());
        HamokError::Storage(e)
    }

    /// Writes the pending records to the log's open chunk (and syncs it, when `sync`), on this thread.
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
        if sync {
            // Every background sync first: a failure there must not hide behind this one's success.
            if let Some(syncer) = &self.syncer {
                syncer.wait_idle()?;
            }
        }
        let wal_dir = self.dir.join(wal::DIR_NAME);
        self.wal.flush(sync).map_err(|e| StorageError::Io {
            context: format!(
                "{} in {}",
                if sync { "fdatasync" } else { "write" },
                wal_dir.display()
            ),
            source: Some(Cause::new(e)),
        })?;
        self.needs_sync = false;
        if sync {
            self.last_sync = Instant::now();
            self.unsynced = false;
        } else {
            self.unsynced = true;
        }
        Ok(())
    }

    /// Whether the next `sync` must `fdatasync`, by the sync policy.
    fn sync_due(&self) -> bool {
        match self.options.sync {
            SyncPolicy::Batch => self.needs_sync,
            SyncPolicy::Interval => {
                (self.needs_sync || self.unsynced)
                    && self.last_sync.elapsed() >= self.options.sync_interval
            }
            SyncPolicy::Never => false,
        }
    }

    fn sync_in_background_inner(&mut self, done: SyncDone) -> Result<bool, HamokError> {
        if !self.syncs_in_background() || !self.needs_sync {
            return Ok(false);
        }
        if self.syncer.is_none() {
            let wal_dir = self.dir.join(wal::DIR_NAME);
            self.syncer = Some(Syncer::start(
                wal_dir.display().to_string(),
                self.wal.synced_writes(),
                #[cfg(any(test, feature = "testing"))]
                self.options.fail_syncs.clone(),
            )?);
        }
        if !self.syncer.as_ref().is_some_and(Syncer::has_room) {
            return Ok(false);
        }
        self.flush(false)?;
        let (file, seq) = self.wal.open_chunk().map_err(|e| StorageError::Io {
            context: format!(
                "duplicate the open chunk's descriptor in {}",
                self.dir.display()
            ),
            source: Some(Cause::new(e)),
        })?;
        if let Some(syncer) = &self.syncer {
            syncer.submit(file, seq, done)?;
        }
        Ok(true)
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
            self.wal.truncate(from);
            let keep = (from - self.snapshot_index - 1) as usize;
            for (_, bytes) in self.entries.drain(keep..) {
                self.entry_bytes -= u64::from(bytes);
            }
            self.committed = self.committed.min(from - 1);
        }
        for e in entries.iter().filter(|e| e.index >= from) {
            self.wal.append(e)?;
            let bytes = e.size_bytes();
            self.entries
                .push_back((e.term, u32::try_from(bytes).unwrap_or(u32::MAX)));
            self.entry_bytes += bytes as u64;
        }
        self.needs_sync = true;
        Ok(())
    }
}

/// A directory written by earlier builds, whose log was the `raft-log` crate's (`log/`), is refused,
/// typed: read as this layout it would look empty, and a peer must never restart from nothing while
/// its old state sits beside it.
fn refuse_old_layout(dir: &Path) -> Result<(), StorageError> {
    if dir.join("log").is_dir() {
        return Err(StorageError::Corrupt {
            dir: dir.to_path_buf(),
            detail: "it holds a `log/` directory in the layout of earlier builds (the raft-log crate's), which this build does not read".into(),
            source: None,
        });
    }
    Ok(())
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
        guarded!(self, {
            let snapshot = snapshot::read(&self.dir)?.unwrap_or_default();
            let recovered = self.wal.reread(&self.dir)?;
            self.entries.clear();
            self.entry_bytes = 0;
            self.snapshot_index = snapshot.meta.last_index;
            self.snapshot_term = snapshot.meta.last_term;
            self.recover(snapshot, recovered)
                .map_err(HamokError::Storage)
        })
    }

    fn save_hard_state(&mut self, state: &HardState) -> Result<(), HamokError> {
        guarded!(self, {
            self.wal
                .save_vote(state.term, state.voted_for.as_ref().map(PeerId::as_str));
            self.needs_sync = true;
            Ok(())
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
                self.wal.commit(index, term);
                Ok(())
            }
        })
    }

    fn sync(&mut self) -> Result<(), HamokError> {
        guarded!(self, {
            // Whether to fdatasync now; otherwise the writes only reach the kernel (they survive a
            // crash of the process, not a power cut).
            let sync = self.sync_due();
            // With nothing else to write, a write of its own declares the last sync (see
            // `Wal::mark_synced`): one small write after each quiet spell, none while writes flow.
            if self.wal.has_pending() || sync || self.wal.mark_synced() {
                self.flush(sync).map_err(HamokError::Storage)
            } else {
                Ok(())
            }
        })
    }

    fn sync_may_block(&self) -> bool {
        // A full chunk is closed with syncs (see `Wal::start_chunk`).
        self.sync_due() || self.wal.next_write_rolls()
    }

    fn entries_may_block(&self, count: usize, bytes: usize) -> bool {
        let sync_comes = match self.options.sync {
            SyncPolicy::Batch => true,
            // Due once the interval has passed, with these entries to sync whatever was before.
            SyncPolicy::Interval => self.last_sync.elapsed() >= self.options.sync_interval,
            SyncPolicy::Never => false,
        };
        sync_comes || self.wal.write_rolls(count, bytes)
    }

    fn syncs_in_background(&self) -> bool {
        self.options.sync == SyncPolicy::Batch && self.options.background_sync
    }

    fn sync_in_background(&mut self, done: SyncDone) -> Result<bool, HamokError> {
        guarded!(self, self.sync_in_background_inner(done))
    }

    fn size(&self) -> (u64, u64) {
        (self.entries.len() as u64, self.entry_bytes)
    }

    fn peer_id(&self) -> Option<PeerId> {
        self.wal
            .state()
            .meta
            .as_ref()
            .map(|(id, _)| PeerId::from(id.clone()))
    }

    fn incarnation(&self) -> u64 {
        self.wal.state().meta.as_ref().map_or(0, |(_, i)| *i)
    }

    fn save_incarnation(&mut self, incarnation: u64) -> Result<(), HamokError> {
        guarded!(self, {
            let id = self.peer_id().map(|p| p.to_string()).unwrap_or_default();
            self.wal.save_meta(&id, incarnation);
            self.flush(true).map_err(HamokError::Storage)
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
                None => {
                    let incarnation = self.incarnation();
                    self.wal.save_meta(id.as_str(), incarnation);
                    self.flush(true).map_err(HamokError::Storage)
                }
            }
        })
    }
}

#[cfg(test)]
mod tests;
