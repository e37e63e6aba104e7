//! The write-ahead log of a [`FileLogStore`](super::FileLogStore): chunk files of checksummed
//! records, written and synced on the caller's thread.
//!
//! Why not the `raft-log` crate (used until 2026-11-30): it hands every flush to a worker thread and
//! waits for its answer, two thread wake-ups per flush. Measured on this project's 2-core machine with
//! three durable peers in one process: a commit-mark flush without `fdatasync` took 39-58 µs (a
//! `write(2)` takes about 5), and a synced flush 159-218 µs against 95 µs for three `fdatasync`s
//! racing on the same disk. The engine already batches (one flush per Ready), so the worker bought
//! nothing here; its payload cache also kept a second copy of recent entries.
//!
//! Why chunks are preallocated (2026-12-03): an `fdatasync` after writing over zeros already in the
//! file costs about half as much as one after an append (measured 2026-12-01 on this project's
//! machine: a 4 KiB write + sync 124-134 µs against 200-309 µs; a durable leader write 412-469 µs
//! against 461-553 µs), because the file system commits no new size or blocks. So the open chunk is
//! filled with zeros ahead of its records ([`PREALLOC_BYTES`] at a time) and every write goes over
//! them. The price: a power cut in the middle of a multi-page write may leave a never-written (zero)
//! sector *before* sectors that did reach the disk, so records that verify can follow one that does
//! not, which in an append-only file (ext4, `data=ordered`) only damage could cause. Each write
//! therefore starts with a `Flush` record declaring the write's sequence number, its extent, and
//! the last write known synced, and recovery tells a torn write from damage by those records (below).
//!
//! Layout of `wal/`: an exclusive `LOCK` file and chunks named by a sequence number
//! (`00000000000000000000.log`, ...; consecutive). A chunk is a sequence of records, then zeros:
//!
//! ```text
//! record := body_len: u32 LE | body_crc: u32 LE (CRC-32 of body) | head_crc: u32 LE (CRC-32 of the 8 bytes before) | body
//! body   := kind: u8 | fields (integers u64 LE, strings u16 LE length + UTF-8)
//! ```
//!
//! Kinds: `Flush` (the first record of every write: its sequence number, its bytes from this record
//! on, and the highest sequence number whose `fdatasync` had returned), `Vote` (term, voted for: one
//! record, never torn apart), `Entry` (index, term, the MessagePack of the [`EntryPayload`]),
//! `Truncate` (drop entries from an index on), `Purge` (the log's base: entries up to it are behind
//! the snapshot), `Commit` (the commit mark), `Meta` (the peer id and the cluster incarnation), `Next`
//! (the seal: the last record of a full chunk, naming its successor). Every chunk starts with the
//! state at its start (`Meta`, `Vote`, `Purge`, `Commit`), so the chunks before it can be deleted
//! once every entry they hold is purged. A write with nothing else to say (a `Flush` record alone)
//! is made once time passes after a sync, so that the last synced write is also declared synced on
//! disk (see [`Wal::mark_synced`]).
//!
//! Recovery replays every chunk in order. The log of the last chunk ends where the rest of the file
//! is zeros. A record that does not verify, anywhere else, is a torn write (cut off: it was never
//! synced, so never acknowledged) only when all of these hold:
//! - it is in the last chunk;
//! - no `Flush` record that verifies after it says its write was synced (its write is the one whose
//!   extent holds it, or, past the last verified write's extent, the next one);
//! - when records that verify follow it: a whole 512-byte sector between it and the next of them is
//!   zeros (a sector the write never reached; a flipped bit leaves none).
//!
//! The one other torn write is a seal cut short before an empty last chunk (a crash while a chunk was
//! being closed, see `Wal::start_chunk`), also cut. Anything else that does not verify, a missing
//! chunk (the newest one too: its predecessor's seal names it), or entries that skip indexes the
//! log's base does not cover is [`StorageError::Corrupt`]. What remains ambiguous: damage to the last
//! synced write before a later record declares it synced (the time until the next write or tick,
//! plus the kernel's writeback of that record), when the damage leaves no record that verifies
//! after it or happens to zero a whole sector; such a write is cut like a torn one.
//!
//! Chunks written by builds before 2026-12-03 (`.wal`, appended, no `Flush` records) are read with
//! the rules of their time: a record that does not verify is a torn tail only at the very end of the
//! last chunk. The first write of this build closes such a chunk and goes on in a new `.log` one.
//! Chunks closed by builds before the seal (2026-12-01) have none: deleting the newest of those goes
//! unnoticed, as it did then.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::snapshot::{io_error, sync_dir};
use crate::error::{Cause, HamokError};
use crate::raft::{Entry, EntryPayload, LogIndex, Term};
use crate::store::StorageError;

/// The directory of the chunks, under the store's directory.
pub(super) const DIR_NAME: &str = "wal";
const LOCK_NAME: &str = "LOCK";
/// The name of a chunk written by this build (preallocated, `Flush` records).
const CHUNK_SUFFIX: &str = ".log";
/// The name of a chunk written by builds before 2026-12-03 (appended, no `Flush` records).
const LEGACY_SUFFIX: &str = ".wal";
const HEAD_BYTES: usize = 12;
/// More than an entry record's body holds besides the payload's bytes (its kind, index and term, the
/// payload's variant and length): for estimates that must not fall short.
const ENTRY_ENVELOPE_BYTES: usize = 64;
/// The largest record body written or accepted: entries are bounded far below this by the largest
/// frame; a corrupt length must not make recovery allocate without bound.
const MAX_BODY_BYTES: usize = 256 << 20;
/// The largest entry payload [`Wal::append`] takes: room left for the record's other fields.
const MAX_ENTRY_PAYLOAD_BYTES: usize = MAX_BODY_BYTES - 4096;
/// The pending buffer keeps at most this capacity between flushes (a burst of large entries must not
/// keep its memory).
const PENDING_KEEP_BYTES: usize = 4 << 20;
/// How far ahead of its records the open chunk is filled with zeros (at most up to the chunk's
/// size): one write in this many bytes of log extends the file and pays for it at its sync.
pub(super) const PREALLOC_BYTES: u64 = 1 << 20;
/// Zeros are written in pieces of this size (a static buffer, no allocation).
static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
/// The unit a disk writes whole or not at all: a torn write leaves whole sectors of old content.
const SECTOR_BYTES: usize = 512;
/// Preallocated lengths are whole pages.
const PAGE_BYTES: u64 = 4096;

const KIND_VOTE: u8 = 1;
const KIND_ENTRY: u8 = 2;
const KIND_TRUNCATE: u8 = 3;
const KIND_PURGE: u8 = 4;
const KIND_COMMIT: u8 = 5;
const KIND_META: u8 = 6;
/// The last record of a full chunk: the sequence number of the chunk that follows it.
const KIND_NEXT: u8 = 7;
/// The first record of every write: its sequence number, its extent, the last write synced.
const KIND_FLUSH: u8 = 8;
/// The bytes of a `Next` record.
pub(super) const SEAL_BYTES: usize = HEAD_BYTES + 1 + 8;
/// The bytes of a `Flush` record.
const FLUSH_BYTES: usize = HEAD_BYTES + 1 + 3 * 8;

/// What the log holds, as recovery replays it.
#[derive(Debug, Default)]
pub(super) struct WalState {
    /// Term and vote.
    pub(super) vote: (Term, Option<String>),
    /// The base: entries up to it are compacted away, `(index, term)`.
    pub(super) base: (LogIndex, Term),
    /// The commit mark, `(index, term)`.
    pub(super) commit: (LogIndex, Term),
    /// The peer id and the cluster incarnation, once bound.
    pub(super) meta: Option<(String, u64)>,
}

/// How a chunk was written, told by its file name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    /// Builds before 2026-12-03: appended, no `Flush` records (`.wal`).
    Legacy,
    /// Preallocated, every write declared by a `Flush` record (`.log`).
    Flushed,
}

/// A chunk file kept by the log.
#[derive(Debug)]
struct Chunk {
    seq: u64,
    format: Format,
    /// The last entry index of the log when the chunk began: the older chunks hold no entry above it,
    /// so they can go once the base reaches it.
    last_at_start: LogIndex,
}

/// The open chunk's file, where the next write goes and how far it is filled with zeros.
struct OpenChunk {
    file: File,
    /// Where the next write goes (the end of the records); the file's position.
    write_at: u64,
    /// The file's length: zeros from `write_at` to it.
    len: u64,
}

impl OpenChunk {
    /// Writes `bytes` at the end of the records, first filling the file with zeros ahead of them
    /// (up to `prealloc_to`, and past the write in whole pages) when they would pass its end.
    fn write(&mut self, bytes: &[u8], prealloc_to: u64) -> io::Result<()> {
        let end = self.write_at + bytes.len() as u64;
        if end > self.len {
            let target = end.max(prealloc_to.min(end + PREALLOC_BYTES));
            let target = target.div_ceil(PAGE_BYTES) * PAGE_BYTES;
            self.file.seek(SeekFrom::Start(self.len))?;
            let mut at = self.len;
            while at < target {
                let n = (target - at).min(ZEROS.len() as u64) as usize;
                self.file.write_all(&ZEROS[..n])?;
                at += n as u64;
            }
            self.len = target;
            self.file.seek(SeekFrom::Start(self.write_at))?;
        }
        self.file.write_all(bytes)?;
        self.write_at = end;
        Ok(())
    }
}

/// The write-ahead log (see the module docs).
pub(super) struct Wal {
    dir: PathBuf,
    /// Held for the log's lifetime: the exclusive lock on the directory.
    _lock: File,
    chunk_max_bytes: u64,
    /// The open chunk (the last one).
    open: OpenChunk,
    /// The chunks kept, oldest first; the last is the open one.
    chunks: VecDeque<Chunk>,
    /// Bytes of the chunk the next record goes to, written or pending.
    chunk_bytes: u64,
    /// Records encoded but not yet written; every write in it begins with a `Flush` record whose
    /// fields are filled in when it is written.
    pending: Vec<u8>,
    /// Where in `pending` a new chunk begins (its `Flush` record and header encoded there), with the
    /// log's last index at that point: a full chunk ends at a record boundary, so a big batch spans
    /// several chunks.
    rolls: Vec<(usize, LogIndex)>,
    /// While the header of a new chunk is being encoded (no roll inside it).
    in_header: bool,
    /// The state after every record appended so far (the header of the next chunk).
    state: WalState,
    /// The last entry index after every record appended so far.
    last_index: LogIndex,
    /// The sequence number of the last write.
    flush_seq: u64,
    /// The highest write sequence number whose sync has returned (here, or on the store's sync
    /// thread, which shares it).
    synced: Arc<AtomicU64>,
    /// The highest of those that a written `Flush` record declares.
    declared_synced: u64,
}

impl std::fmt::Debug for Wal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wal")
            .field("dir", &self.dir)
            .field("chunks", &self.chunks.len())
            .field("last_index", &self.last_index)
            .field("flush_seq", &self.flush_seq)
            .finish_non_exhaustive()
    }
}

/// What [`Wal::open`] recovered.
pub(super) struct Recovered {
    pub(super) state: WalState,
    /// The entries above the base, contiguous.
    pub(super) entries: Vec<Entry>,
}

impl Wal {
    /// Opens (or creates) the log under `store_dir`, takes its lock, recovers it (cutting a torn tail)
    /// and returns it with what it holds.
    pub(super) fn open(
        store_dir: &Path,
        chunk_max_bytes: usize,
    ) -> Result<(Wal, Recovered), StorageError> {
        let dir = store_dir.join(DIR_NAME);
        fs::create_dir_all(&dir).map_err(|e| io_error(store_dir, "create the log directory", e))?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(LOCK_NAME))
            .map_err(|e| io_error(store_dir, "open the lock file", e))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                return Err(StorageError::Locked {
                    dir: store_dir.to_path_buf(),
                    source: None,
                })
            }
            Err(fs::TryLockError::Error(e)) => {
                return Err(io_error(store_dir, "lock the directory", e))
            }
        }
        let scan = scan(store_dir, &dir, true)?;
        let mut chunks: VecDeque<Chunk> = scan.chunks.into();
        let fresh = chunks.is_empty();
        if fresh {
            chunks.push_back(Chunk {
                seq: 0,
                format: Format::Flushed,
                last_at_start: 0,
            });
        }
        let last = chunks.back_mut().expect("one chunk at least");
        if last.format == Format::Legacy && scan.last_end == 0 {
            // An empty chunk of an earlier build (created, then a crash): this build's from now on.
            fs::rename(
                chunk_path(&dir, last.seq, Format::Legacy),
                chunk_path(&dir, last.seq, Format::Flushed),
            )
            .and_then(|_| sync_dir(&dir))
            .map_err(|e| io_error(store_dir, "rename an empty log chunk", e))?;
            last.format = Format::Flushed;
        }
        let (last_seq, last_format) = (last.seq, last.format);
        let path = chunk_path(&dir, last_seq, last_format);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| io_error(store_dir, "open the last log chunk", e))?;
        let len = file
            .metadata()
            .map_err(|e| io_error(store_dir, "read the last log chunk's length", e))?
            .len();
        let mut open = OpenChunk {
            file,
            write_at: scan.last_end,
            len,
        };
        open.file
            .seek(SeekFrom::Start(scan.last_end))
            .map_err(|e| io_error(store_dir, "seek the last log chunk", e))?;
        if !fresh {
            // What recovery read may still be only in the kernel (a crash of the process): synced
            // now, so that the write below can declare it synced.
            open.file
                .sync_data()
                .map_err(|e| io_error(store_dir, "sync the last log chunk", e))?;
        }
        let last_index = scan.entries.last().map_or(scan.state.base.0, |e| e.index);
        let mut wal = Wal {
            dir,
            _lock: lock,
            chunk_max_bytes: chunk_max_bytes as u64,
            open,
            chunks,
            // A chunk of an earlier build is closed by the first write: this build writes its own.
            chunk_bytes: if last_format == Format::Legacy {
                chunk_max_bytes as u64
            } else {
                scan.last_end
            },
            pending: Vec::new(),
            rolls: Vec::new(),
            in_header: false,
            state: WalState {
                vote: scan.state.vote.clone(),
                base: scan.state.base,
                commit: scan.state.commit,
                meta: scan.state.meta.clone(),
            },
            last_index,
            flush_seq: scan.last_flush_seq,
            synced: Arc::new(AtomicU64::new(scan.last_flush_seq)),
            declared_synced: 0,
        };
        if scan.last_end > 0 && last_format == Format::Flushed {
            // A write of its own, synced, that declares everything recovered synced and begins where
            // the records end: the last write before it may have declared an extent past that point
            // (its end was torn off), and the next damaged record must be told apart from it.
            wal.reserve_flush();
            wal.flush(true)
                .map_err(|e| wal.io("mark the recovered log", e))?;
        }
        if scan.last_end == 0 {
            // A new log, or a chunk whose header a crash cut off while it was being started.
            wal.write_header();
            wal.flush(true).map_err(|e| wal.io("start the log", e))?;
            if fresh {
                // The first chunk's name, and the log directory's own, outlive a power cut.
                sync_dir(&wal.dir)
                    .and_then(|_| sync_dir(store_dir))
                    .map_err(|e| wal.io("sync the log directory", e))?;
            }
        }
        Ok((
            wal,
            Recovered {
                state: scan.state,
                entries: scan.entries,
            },
        ))
    }

    /// Re-reads the log from its files (after flushing what is pending).
    pub(super) fn reread(&mut self, store_dir: &Path) -> Result<Recovered, StorageError> {
        self.flush(false)
            .map_err(|e| io_error(store_dir, "write the log", e))?;
        let scan = scan(store_dir, &self.dir, false)?;
        Ok(Recovered {
            state: scan.state,
            entries: scan.entries,
        })
    }

    /// The state after every record appended so far.
    pub(super) fn state(&self) -> &WalState {
        &self.state
    }

    /// A second descriptor of the open chunk, for a sync on another thread, with the sequence number
    /// of the last write it holds (to record in [`Wal::synced_writes`] once that sync returns).
    pub(super) fn open_chunk(&self) -> io::Result<(File, u64)> {
        Ok((self.open.file.try_clone()?, self.flush_seq))
    }

    /// The highest write sequence number whose sync has returned, shared with a sync thread.
    pub(super) fn synced_writes(&self) -> Arc<AtomicU64> {
        self.synced.clone()
    }

    /// Whether records wait to be written.
    pub(super) fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Queues a write of a `Flush` record alone when a sync has returned that no written record
    /// declares yet; returns whether it did. Made when time passes (the store's tick): until a later
    /// record on disk says so, recovery cannot tell damage to the last synced write from a torn one.
    pub(super) fn mark_synced(&mut self) -> bool {
        if !self.pending.is_empty() || self.synced.load(Ordering::Acquire) <= self.declared_synced {
            return false;
        }
        self.reserve_flush();
        true
    }

    /// Whether writing what is pending, or the next record, closes a full chunk (which syncs).
    pub(super) fn next_write_rolls(&self) -> bool {
        !self.rolls.is_empty() || self.chunk_bytes >= self.chunk_max_bytes
    }

    /// Whether writing what is pending and then `count` entries of `bytes` bytes in all may close a
    /// full chunk (which syncs): over-estimated, with a record's largest envelope per entry and a
    /// `Flush` record.
    pub(super) fn write_rolls(&self, count: usize, bytes: usize) -> bool {
        let envelope = (HEAD_BYTES + ENTRY_ENVELOPE_BYTES) as u64;
        let written = (bytes as u64)
            .saturating_add((count as u64).saturating_mul(envelope))
            .saturating_add(FLUSH_BYTES as u64);
        self.next_write_rolls() || self.chunk_bytes.saturating_add(written) >= self.chunk_max_bytes
    }

    /// The last entry index after every record appended so far.
    pub(super) fn last_index(&self) -> LogIndex {
        self.last_index
    }

    /// Appends an entry (it must follow the last one); returns the bytes of its record. An entry
    /// larger than a record may be is refused, typed (the frame and command limits keep entries far
    /// below it; a configuration that lets one through stops the peer instead of writing it).
    pub(super) fn append(&mut self, entry: &Entry) -> Result<usize, HamokError> {
        debug_assert_eq!(entry.index, self.last_index + 1, "entries are contiguous");
        if entry.payload.size_bytes() > MAX_ENTRY_PAYLOAD_BYTES {
            return Err(HamokError::codec(
                format!(
                    "log entry {} of {} bytes is larger than a log record may be ({MAX_ENTRY_PAYLOAD_BYTES})",
                    entry.index,
                    entry.payload.size_bytes()
                ),
                None,
            ));
        }
        let start = self.begin(KIND_ENTRY);
        self.pending.extend_from_slice(&entry.index.to_le_bytes());
        self.pending.extend_from_slice(&entry.term.to_le_bytes());
        if let Err(e) = rmp_serde::encode::write(&mut self.pending, &entry.payload) {
            self.pending.truncate(start);
            return Err(e.into());
        }
        self.last_index = entry.index;
        Ok(self.finish(start))
    }

    /// Drops the entries from `from` on (`from` is above the base).
    pub(super) fn truncate(&mut self, from: LogIndex) {
        debug_assert!(from > self.state.base.0);
        let start = self.begin(KIND_TRUNCATE);
        self.pending.extend_from_slice(&from.to_le_bytes());
        self.finish(start);
        self.last_index = self.last_index.min(from - 1);
    }

    /// Moves the base to `(index, term)`: the entries up to it are behind a snapshot.
    pub(super) fn purge(&mut self, index: LogIndex, term: Term) {
        self.put_purge(index, term);
        self.state.base = (index, term);
        self.last_index = self.last_index.max(index);
    }

    /// Records the commit mark.
    pub(super) fn commit(&mut self, index: LogIndex, term: Term) {
        self.put_pair(KIND_COMMIT, index, term);
        self.state.commit = (index, term);
    }

    /// Records term and vote.
    pub(super) fn save_vote(&mut self, term: Term, voted_for: Option<&str>) {
        self.put_vote(term, voted_for);
        self.state.vote = (term, voted_for.map(str::to_owned));
    }

    /// Records the peer id and the cluster incarnation.
    pub(super) fn save_meta(&mut self, id: &str, incarnation: u64) {
        self.put_meta(id, incarnation);
        self.state.meta = Some((id.to_owned(), incarnation));
    }

    /// Writes what is pending (starting the new chunks it begins), one write per chunk, each declared
    /// by its `Flush` record, and, when `sync`, `fdatasync`s the open chunk; after a synced flush,
    /// deletes the chunks the base has passed. On error the caller must stop using the log: what
    /// reached the disk is unknown.
    pub(super) fn flush(&mut self, sync: bool) -> io::Result<()> {
        let mut written = 0;
        for (at, last_at_start) in std::mem::take(&mut self.rolls) {
            if at > written {
                self.write_flush(written, at)?;
            }
            written = at;
            self.start_chunk(last_at_start)?;
        }
        if self.pending.len() > written {
            self.write_flush(written, self.pending.len())?;
        }
        self.pending.clear();
        if self.pending.capacity() > PENDING_KEEP_BYTES {
            self.pending.shrink_to(PENDING_KEEP_BYTES);
        }
        if sync {
            self.open.file.sync_data()?;
            self.synced.fetch_max(self.flush_seq, Ordering::AcqRel);
            self.remove_passed_chunks()?;
        }
        Ok(())
    }

    /// Fills in the `Flush` record at `pending[from..]` for the write of `pending[from..to]`, and
    /// makes that write.
    fn write_flush(&mut self, from: usize, to: usize) -> io::Result<()> {
        self.flush_seq += 1;
        let synced = self.synced.load(Ordering::Acquire);
        let record = &mut self.pending[from..from + FLUSH_BYTES];
        record[HEAD_BYTES] = KIND_FLUSH;
        let fields = &mut record[HEAD_BYTES + 1..];
        fields[..8].copy_from_slice(&self.flush_seq.to_le_bytes());
        fields[8..16].copy_from_slice(&((to - from) as u64).to_le_bytes());
        fields[16..].copy_from_slice(&synced.to_le_bytes());
        fill_head(record);
        self.declared_synced = self.declared_synced.max(synced);
        let prealloc_to = self.chunk_max_bytes;
        self.open.write(&self.pending[from..to], prealloc_to)
    }

    /// Closes the full chunk and opens the next one, in an order that leaves recovery a state it can
    /// tell from damage at every crash point:
    ///
    /// 1. the full chunk is synced (a later chunk must never outlive its records: recovery would
    ///    find a hole);
    /// 2. the next chunk is created and its name synced (so the seal below never outlives it);
    /// 3. the full chunk is sealed (a `Next` record naming its successor), cut to its records (its
    ///    zeros go) and synced again: from then on, a missing successor is a deleted chunk, never a
    ///    crash, and recovery refuses it.
    ///
    /// A crash inside step 3 leaves a torn seal before an empty chunk, which recovery cuts, or a
    /// whole seal followed by zeros, which it accepts. Costs two more syncs per chunk (one chunk per
    /// 64 MiB of log by default).
    fn start_chunk(&mut self, last_at_start: LogIndex) -> io::Result<()> {
        self.open.file.sync_data()?;
        self.synced.fetch_max(self.flush_seq, Ordering::AcqRel);
        let seq = self.chunks.back().expect("one chunk at least").seq + 1;
        let next = OpenOptions::new()
            .create_new(true)
            .read(true)
            .write(true)
            .open(chunk_path(&self.dir, seq, Format::Flushed))?;
        sync_dir(&self.dir)?;
        let mut seal = Vec::with_capacity(SEAL_BYTES);
        seal.extend_from_slice(&[0; HEAD_BYTES]);
        seal.push(KIND_NEXT);
        seal.extend_from_slice(&seq.to_le_bytes());
        fill_head(&mut seal);
        debug_assert_eq!(seal.len(), SEAL_BYTES);
        self.open.file.write_all(&seal)?;
        let end = self.open.write_at + SEAL_BYTES as u64;
        if self.open.len > end {
            self.open.file.set_len(end)?;
            self.open.file.sync_all()?;
        } else {
            self.open.file.sync_data()?;
        }
        self.open = OpenChunk {
            file: next,
            write_at: 0,
            len: 0,
        };
        self.chunks.push_back(Chunk {
            seq,
            format: Format::Flushed,
            last_at_start,
        });
        Ok(())
    }

    /// Deletes the oldest chunks while every entry they hold is at or below the base (the next chunk
    /// starts with the state, so nothing else in them is needed). Only after a synced flush: the
    /// purge that allows it is on disk.
    fn remove_passed_chunks(&mut self) -> io::Result<()> {
        while self.chunks.len() > 1 && self.chunks[1].last_at_start <= self.state.base.0 {
            let gone = self.chunks.pop_front().expect("two chunks at least");
            match fs::remove_file(chunk_path(&self.dir, gone.seq, gone.format)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Encodes the state as the first records of a chunk.
    fn write_header(&mut self) {
        if let Some((id, incarnation)) = self.state.meta.clone() {
            self.put_meta(&id, incarnation);
        }
        let (term, voted_for) = self.state.vote.clone();
        self.put_vote(term, voted_for.as_deref());
        let (index, term) = self.state.base;
        self.put_purge(index, term);
        let (index, term) = self.state.commit;
        self.put_pair(KIND_COMMIT, index, term);
    }

    fn put_purge(&mut self, index: LogIndex, term: Term) {
        self.put_pair(KIND_PURGE, index, term);
    }

    fn put_pair(&mut self, kind: u8, a: u64, b: u64) {
        let start = self.begin(kind);
        self.pending.extend_from_slice(&a.to_le_bytes());
        self.pending.extend_from_slice(&b.to_le_bytes());
        self.finish(start);
    }

    fn put_vote(&mut self, term: Term, voted_for: Option<&str>) {
        let start = self.begin(KIND_VOTE);
        self.pending.extend_from_slice(&term.to_le_bytes());
        match voted_for {
            Some(id) => {
                self.pending.push(1);
                put_str(&mut self.pending, id);
            }
            None => self.pending.push(0),
        }
        self.finish(start);
    }

    fn put_meta(&mut self, id: &str, incarnation: u64) {
        let start = self.begin(KIND_META);
        put_str(&mut self.pending, id);
        self.pending.extend_from_slice(&incarnation.to_le_bytes());
        self.finish(start);
    }

    /// Reserves the `Flush` record that begins a write (filled in by `write_flush`).
    fn reserve_flush(&mut self) {
        self.pending.extend_from_slice(&[0; FLUSH_BYTES]);
        self.chunk_bytes += FLUSH_BYTES as u64;
    }

    /// Starts a record (in a new chunk, with its `Flush` record and the state as its header, when the
    /// current one is full; after a `Flush` record when it begins a write): reserves its head, writes
    /// its kind. Returns where it starts.
    fn begin(&mut self, kind: u8) -> usize {
        if self.chunk_bytes >= self.chunk_max_bytes && !self.in_header {
            self.rolls.push((self.pending.len(), self.last_index));
            self.chunk_bytes = 0;
            self.reserve_flush();
            self.in_header = true;
            self.write_header();
            self.in_header = false;
        } else if self.pending.is_empty() {
            self.reserve_flush();
        }
        let start = self.pending.len();
        self.pending.extend_from_slice(&[0; HEAD_BYTES]);
        self.pending.push(kind);
        start
    }

    /// Fills in the head of the record that starts at `start`; returns its bytes.
    fn finish(&mut self, start: usize) -> usize {
        let body_len = self.pending.len() - start - HEAD_BYTES;
        // Entries are checked in `append`; every other record is a few dozen bytes.
        debug_assert!(
            body_len <= MAX_BODY_BYTES,
            "a log record of {body_len} bytes"
        );
        fill_head(&mut self.pending[start..]);
        self.chunk_bytes += (HEAD_BYTES + body_len) as u64;
        HEAD_BYTES + body_len
    }

    fn io(&self, what: &str, e: io::Error) -> StorageError {
        StorageError::Io {
            context: format!("{what} in {}", self.dir.display()),
            source: Some(Cause::new(e)),
        }
    }
}

/// Fills in the head of `record` (its body already follows the head's reserved bytes).
fn fill_head(record: &mut [u8]) {
    let body_len = record.len() - HEAD_BYTES;
    let body_crc = crc32fast::hash(&record[HEAD_BYTES..]);
    let head = &mut record[..HEAD_BYTES];
    head[..4].copy_from_slice(&(body_len as u32).to_le_bytes());
    head[4..8].copy_from_slice(&body_crc.to_le_bytes());
    let head_crc = crc32fast::hash(&head[..8]);
    head[8..].copy_from_slice(&head_crc.to_le_bytes());
}

fn put_str(buf: &mut Vec<u8>, s: &str) {
    // Peer ids are validated far shorter; a longer string is cut at a char boundary rather than
    // written with a length that does not fit.
    let mut end = s.len().min(u16::MAX as usize);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    buf.extend_from_slice(&(end as u16).to_le_bytes());
    buf.extend_from_slice(&s.as_bytes()[..end]);
}

fn chunk_path(dir: &Path, seq: u64, format: Format) -> PathBuf {
    let suffix = match format {
        Format::Legacy => LEGACY_SUFFIX,
        Format::Flushed => CHUNK_SUFFIX,
    };
    dir.join(format!("{seq:020}{suffix}"))
}

/// The chunks in `dir`, sorted by sequence number; any other file but the lock is an error.
fn list_chunks(store_dir: &Path, dir: &Path) -> Result<Vec<(u64, Format)>, StorageError> {
    let mut chunks = Vec::new();
    for item in fs::read_dir(dir).map_err(|e| io_error(store_dir, "list the log", e))? {
        let item = item.map_err(|e| io_error(store_dir, "list the log", e))?;
        let name = item.file_name();
        let name = name.to_string_lossy();
        if name == LOCK_NAME {
            continue;
        }
        let parsed = [
            (CHUNK_SUFFIX, Format::Flushed),
            (LEGACY_SUFFIX, Format::Legacy),
        ]
        .into_iter()
        .find_map(|(suffix, format)| {
            name.strip_suffix(suffix)
                .and_then(|n| n.parse::<u64>().ok())
                .map(|seq| (seq, format))
        });
        match parsed {
            Some(chunk) => chunks.push(chunk),
            None => {
                return Err(StorageError::Corrupt {
                    dir: store_dir.to_path_buf(),
                    detail: format!("unexpected file `{name}` in the log directory"),
                    source: None,
                })
            }
        }
    }
    chunks.sort_unstable_by_key(|&(seq, _)| seq);
    Ok(chunks)
}

struct Scan {
    state: WalState,
    entries: Vec<Entry>,
    chunks: Vec<Chunk>,
    /// Where the records of the last chunk end (after a cut: where it was cut).
    last_end: u64,
    /// The sequence number of the last `Flush` record.
    last_flush_seq: u64,
}

/// The writes recovery has seen, to tell a torn write from damage (see the module docs).
#[derive(Default)]
struct Writes {
    /// The sequence number of the last `Flush` record that verified.
    last_seq: u64,
    /// Where, in the chunk being read, that write's extent ends (`None` before the chunk's first).
    end_in_chunk: Option<usize>,
}

/// Replays every chunk (see the module docs for what verifies); with `repair`, cuts a torn tail.
fn scan(store_dir: &Path, dir: &Path, repair: bool) -> Result<Scan, StorageError> {
    let corrupt = |detail: String| StorageError::Corrupt {
        dir: store_dir.to_path_buf(),
        detail,
        source: None,
    };
    let listed = list_chunks(store_dir, dir)?;
    for pair in listed.windows(2) {
        let ((a, a_format), (b, b_format)) = (pair[0], pair[1]);
        if b != a + 1 {
            return Err(corrupt(format!(
                "log chunk {} is missing (found {a} then {b})",
                a + 1,
            )));
        }
        if a_format == Format::Flushed && b_format == Format::Legacy {
            return Err(corrupt(format!(
                "log chunk {b} has the name of an earlier build's chunk after one of this build's"
            )));
        }
    }
    let mut replay = Replay::default();
    let mut writes = Writes::default();
    let mut chunks = Vec::with_capacity(listed.len());
    let mut last_end = 0u64;
    for (i, &(seq, format)) in listed.iter().enumerate() {
        let is_last = i + 1 == listed.len();
        let path = chunk_path(dir, seq, format);
        let mut bytes = Vec::new();
        File::open(&path)
            .and_then(|mut f| f.read_to_end(&mut bytes))
            .map_err(|e| io_error(store_dir, "read a log chunk", e))?;
        chunks.push(Chunk {
            seq,
            format,
            last_at_start: replay.next - 1,
        });
        writes.end_in_chunk = None;
        let mut at = 0usize;
        let mut sealed = false;
        while at < bytes.len() {
            match parse_record(&bytes[at..]) {
                Ok((kind, body, len)) if kind == KIND_NEXT => {
                    if body != (seq + 1).to_le_bytes() || !all_zero(&bytes[at + len..]) {
                        return Err(corrupt(format!(
                            "chunk {}: a seal at byte {at} that is not the chunk's last record or \
                             does not name chunk {}",
                            path.display(),
                            seq + 1
                        )));
                    }
                    sealed = true;
                    at = bytes.len();
                }
                Ok((kind, body, len)) if kind == KIND_FLUSH && format == Format::Flushed => {
                    let (flush, extent, synced) = flush_fields(body).map_err(|d| {
                        corrupt(format!("chunk {}: byte {at}: {d}", path.display()))
                    })?;
                    if flush <= writes.last_seq || synced > flush || (extent as usize) < len {
                        return Err(corrupt(format!(
                            "chunk {}: byte {at}: write {flush} (extent {extent}, synced {synced}) \
                             after write {}",
                            path.display(),
                            writes.last_seq
                        )));
                    }
                    writes.last_seq = flush;
                    writes.end_in_chunk = Some(at.saturating_add(extent as usize));
                    at += len;
                }
                Ok((kind, body, len)) => {
                    replay
                        .apply(kind, body)
                        .map_err(|d| corrupt(format!("chunk {}: {d}", path.display())))?;
                    at += len;
                }
                Err(_) if is_last && format == Format::Flushed && all_zero(&bytes[at..]) => {
                    // The zeros ahead of the records: the log ends here.
                    break;
                }
                Err(bad) => {
                    let verdict = if is_last {
                        match format {
                            Format::Legacy => {
                                if !records_after(&bytes, at + 1).is_empty() {
                                    Err("records that verify follow it".to_string())
                                } else {
                                    Ok(())
                                }
                            }
                            Format::Flushed => torn_write(&bytes, at, &writes),
                        }
                    } else if i + 2 == listed.len()
                        && all_zero(&bytes[(at + SEAL_BYTES).min(bytes.len())..])
                        && fs::metadata(chunk_path(dir, listed[i + 1].0, listed[i + 1].1))
                            .map_err(|e| io_error(store_dir, "read a log chunk", e))?
                            .len()
                            == 0
                    {
                        // A seal cut short by a crash while the next chunk, just created, is still
                        // empty (see `Wal::start_chunk`).
                        Ok(())
                    } else {
                        Err("it is not in the last chunk".to_string())
                    };
                    if let Err(why) = verdict {
                        return Err(corrupt(format!(
                            "chunk {}: the record at byte {at} does not verify ({bad:?}), and {why}",
                            path.display()
                        )));
                    }
                    if repair {
                        tracing::warn!(
                            chunk = %path.display(),
                            at,
                            cut_bytes = bytes.len() - at,
                            "cutting a torn tail off the log (a write that was never synced)"
                        );
                        let f = OpenOptions::new()
                            .write(true)
                            .open(&path)
                            .map_err(|e| io_error(store_dir, "open a torn log chunk", e))?;
                        f.set_len(at as u64)
                            .and_then(|_| f.sync_all())
                            .map_err(|e| io_error(store_dir, "cut a torn log tail", e))?;
                    }
                    break;
                }
            }
        }
        if is_last {
            last_end = at as u64;
            if sealed {
                return Err(corrupt(format!(
                    "log chunk {} is missing: chunk {} was sealed with it as its successor",
                    seq + 1,
                    path.display()
                )));
            }
        }
    }
    let Replay {
        state,
        entries,
        missing_upto,
        ..
    } = replay;
    if missing_upto > state.base.0 {
        return Err(corrupt(format!(
            "log entries up to {missing_upto} are missing (a chunk is missing) while the log's base is {}",
            state.base.0
        )));
    }
    Ok(Scan {
        state,
        entries: entries.into(),
        chunks,
        last_end,
        last_flush_seq: writes.last_seq,
    })
}

/// Whether the record at `at` of the last chunk, which does not verify, belongs to a write that was
/// torn by a crash (`Ok`) rather than damaged (`Err`, saying why). See the module docs.
fn torn_write(bytes: &[u8], at: usize, writes: &Writes) -> Result<(), String> {
    let after = records_after(bytes, at + 1);
    let Some(&(next_at, _, _)) = after.first() else {
        // Nothing verifies after it: the end of the last write (or damage to the very last record,
        // which looks the same).
        return Ok(());
    };
    // Its write: the one whose extent holds it, or past that extent, the next one.
    let damaged = match writes.end_in_chunk {
        Some(end) if at < end => writes.last_seq,
        _ => writes.last_seq + 1,
    };
    for &(pos, kind, body) in &after {
        if kind != KIND_FLUSH {
            continue;
        }
        if let Ok((flush, _, synced)) = flush_fields(body) {
            if synced >= damaged {
                return Err(format!(
                    "write {flush} at byte {pos} says write {damaged}, which holds it, was synced"
                ));
            }
        }
    }
    if !unwritten_sector(bytes, at, next_at) {
        return Err(format!(
            "records that verify follow it from byte {next_at}, with no whole sector of zeros \
             (one the write never reached) between"
        ));
    }
    Ok(())
}

/// Whether a whole sector of zeros lies in `bytes[from..to]`, or starts in it at `from`: the
/// sector holding `from` counts when it is zeros from `from` on (what came before `from` in it
/// was written by an earlier write); a sector reaching `to` does not (the record at `to` verifies,
/// so that sector reached the disk).
fn unwritten_sector(bytes: &[u8], from: usize, to: usize) -> bool {
    let mut sector = from / SECTOR_BYTES * SECTOR_BYTES;
    while sector + SECTOR_BYTES <= to {
        if all_zero(&bytes[from.max(sector)..sector + SECTOR_BYTES]) {
            return true;
        }
        sector += SECTOR_BYTES;
    }
    false
}

/// The records that verify in `bytes[from..]`, found at any byte offset (past one that verifies,
/// the search goes on after it): `(offset, kind, fields)`. Runs only on recovery of a damaged
/// chunk.
fn records_after(bytes: &[u8], from: usize) -> Vec<(usize, u8, &[u8])> {
    let end = bytes.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    let mut found = Vec::new();
    let mut at = from;
    while at < end {
        match parse_record(&bytes[at..]) {
            Ok((kind, body, len)) => {
                found.push((at, kind, body));
                at += len;
            }
            Err(_) => at += 1,
        }
    }
    found
}

/// Where the records that verify from the start of a chunk end (tests: the log's end in a chunk
/// whose file goes on with zeros).
#[cfg(test)]
pub(super) fn records_end(bytes: &[u8]) -> usize {
    let mut at = 0;
    while let Ok((_, _, len)) = parse_record(&bytes[at..]) {
        at += len;
    }
    at
}

/// A chunk as builds before 2026-12-03 wrote it (tests: reading and continuing such a log): the
/// header records, then the entries, appended, no `Flush` records.
#[cfg(test)]
pub(super) fn legacy_chunk(term: Term, voted_for: &str, entries: &[Entry]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut record = |kind: u8, fields: &[u8]| {
        let start = out.len();
        out.extend_from_slice(&[0; HEAD_BYTES]);
        out.push(kind);
        out.extend_from_slice(fields);
        fill_head(&mut out[start..]);
    };
    let mut vote = term.to_le_bytes().to_vec();
    vote.push(1);
    put_str(&mut vote, voted_for);
    record(KIND_VOTE, &vote);
    record(KIND_PURGE, &[0; 16]);
    record(KIND_COMMIT, &[0; 16]);
    for e in entries {
        let mut fields = e.index.to_le_bytes().to_vec();
        fields.extend_from_slice(&e.term.to_le_bytes());
        rmp_serde::encode::write(&mut fields, &e.payload).expect("an entry encodes");
        record(KIND_ENTRY, &fields);
    }
    out
}

/// The fields of a `Flush` record: its write's sequence number, extent and last write synced.
fn flush_fields(body: &[u8]) -> Result<(u64, u64, u64), String> {
    let mut r = Fields(body);
    let fields = (r.u64()?, r.u64()?, r.u64()?);
    if !r.0.is_empty() {
        return Err(format!("{} trailing bytes in a flush record", r.0.len()));
    }
    Ok(fields)
}

fn all_zero(bytes: &[u8]) -> bool {
    bytes.iter().all(|&b| b == 0)
}

/// Why a record does not verify.
#[derive(Debug, Clone, Copy)]
enum Bad {
    /// The file ends inside its head or body.
    Short,
    /// Its head or body does not match its checksum.
    Mismatch,
}

/// Parses the record at the start of `bytes`: `(kind, fields, record length)`.
fn parse_record(bytes: &[u8]) -> Result<(u8, &[u8], usize), Bad> {
    if bytes.len() < HEAD_BYTES {
        return Err(Bad::Short);
    }
    let word = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().expect("4 bytes"));
    if crc32fast::hash(&bytes[..8]) != word(8) {
        return Err(Bad::Mismatch);
    }
    let body_len = word(0) as usize;
    if body_len == 0 || body_len > MAX_BODY_BYTES {
        return Err(Bad::Mismatch);
    }
    let end = HEAD_BYTES + body_len;
    if bytes.len() < end {
        return Err(Bad::Short);
    }
    let body = &bytes[HEAD_BYTES..end];
    if crc32fast::hash(body) != word(4) {
        return Err(Bad::Mismatch);
    }
    Ok((body[0], &body[1..], end))
}

/// The replay of the records, in order.
struct Replay {
    state: WalState,
    entries: VecDeque<Entry>,
    /// The index the next entry record must have.
    next: LogIndex,
    /// The highest index whose entry was skipped (its chunk is gone): the base must cover it.
    missing_upto: LogIndex,
}

impl Default for Replay {
    fn default() -> Self {
        Replay {
            state: WalState::default(),
            entries: VecDeque::new(),
            next: 1,
            missing_upto: 0,
        }
    }
}

impl Replay {
    fn apply(&mut self, kind: u8, body: &[u8]) -> Result<(), String> {
        let mut r = Fields(body);
        match kind {
            KIND_VOTE => {
                let term = r.u64()?;
                let voted_for = match r.u8()? {
                    0 => None,
                    1 => Some(r.string()?),
                    other => return Err(format!("a vote record with flag {other}")),
                };
                self.state.vote = (term, voted_for);
            }
            KIND_ENTRY => {
                let index = r.u64()?;
                let term = r.u64()?;
                let payload: EntryPayload = rmp_serde::from_slice(r.rest())
                    .map_err(|e| format!("log entry {index} does not decode ({e})"))?;
                if index < self.next {
                    return Err(format!(
                        "log entry {index} where {} was expected, with no truncation before it",
                        self.next
                    ));
                }
                if index > self.next {
                    // Entries before it are in a chunk that is gone: fine only if the base covers them.
                    self.missing_upto = self.missing_upto.max(index - 1);
                    self.entries.clear();
                }
                self.entries.push_back(Entry {
                    index,
                    term,
                    payload,
                });
                self.next = index + 1;
            }
            KIND_TRUNCATE => {
                let from = r.u64()?;
                if from <= self.state.base.0 {
                    return Err(format!(
                        "a truncation from {from}, at or below the log's base {}",
                        self.state.base.0
                    ));
                }
                if from > self.next {
                    // The entries it cut are in a chunk that is gone (deleted once the base passed
                    // them): fine only if the base covers them.
                    self.missing_upto = self.missing_upto.max(from - 1);
                    self.entries.clear();
                } else {
                    while self.entries.back().is_some_and(|e| e.index >= from) {
                        self.entries.pop_back();
                    }
                    self.missing_upto = self.missing_upto.min(from - 1);
                }
                self.next = from;
            }
            KIND_PURGE => {
                let index = r.u64()?;
                let term = r.u64()?;
                if index < self.state.base.0 {
                    return Err(format!(
                        "the log's base goes back from {} to {index}",
                        self.state.base.0
                    ));
                }
                self.state.base = (index, term);
                while self.entries.front().is_some_and(|e| e.index <= index) {
                    self.entries.pop_front();
                }
                self.next = self.next.max(index + 1);
            }
            KIND_COMMIT => {
                let index = r.u64()?;
                let term = r.u64()?;
                self.state.commit = (index, term);
            }
            KIND_META => {
                let id = r.string()?;
                let incarnation = r.u64()?;
                self.state.meta = Some((id, incarnation));
            }
            other => return Err(format!("a record of unknown kind {other}")),
        }
        if kind != KIND_ENTRY && !r.0.is_empty() {
            return Err(format!(
                "{} trailing bytes in a record of kind {kind}",
                r.0.len()
            ));
        }
        Ok(())
    }
}

/// A reader over a record's fields.
struct Fields<'a>(&'a [u8]);

impl<'a> Fields<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err("a record shorter than its fields".into());
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }

    fn string(&mut self) -> Result<String, String> {
        let len = u16::from_le_bytes(self.take(2)?.try_into().expect("2 bytes")) as usize;
        String::from_utf8(self.take(len)?.to_vec()).map_err(|_| "a string that is not UTF-8".into())
    }

    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.0)
    }
}
