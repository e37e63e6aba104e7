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
//! Why chunks are not preallocated (measured 2026-12-01, then reverted): an `fdatasync` after
//! writing over zeros already in the file costs about half as much as one after an append here (a
//! 4 KiB write + sync 124-134 µs against 200-309 µs; a durable leader write 412-469 µs against
//! 461-553 µs), because the file system commits no new size or blocks. But then a power cut in the
//! middle of a multi-page write can leave a never-written (zero) page *before* pages that did reach
//! the disk, so records that verify follow a record that does not: recovery would call that
//! corruption and refuse to start, where an append-only file (on ext4, `data=ordered`) only ever
//! loses its end. Telling that hole from damage to synced records needs each flush to declare its
//! extent (a record kind of its own, so a format change): left for later.
//!
//! Layout of `wal/`: an exclusive `LOCK` file and chunks named by a sequence number
//! (`00000000000000000000.wal`, ...; consecutive). A chunk is a sequence of records:
//!
//! ```text
//! record := body_len: u32 LE | body_crc: u32 LE (CRC-32 of body) | head_crc: u32 LE (CRC-32 of the 8 bytes before) | body
//! body   := kind: u8 | fields (integers u64 LE, strings u16 LE length + UTF-8)
//! ```
//!
//! Kinds: `Vote` (term, voted for: one record, never torn apart), `Entry` (index, term, the MessagePack
//! of the [`EntryPayload`]), `Truncate` (drop entries from an index on), `Purge` (the log's base:
//! entries up to it are behind the snapshot), `Commit` (the commit mark), `Meta` (the peer id and the
//! cluster incarnation), `Next` (the seal: the last record of a full chunk, naming its successor).
//! Every chunk starts with the state at its start (`Meta`, `Vote`, `Purge`, `Commit`), so the chunks
//! before it can be deleted once every entry they hold is purged.
//!
//! Recovery replays every chunk in order. A record that does not verify is a torn tail only in the
//! last chunk, and only when no record that verifies starts anywhere after it (cut short, zeros, the
//! remains of an interrupted write): the file is cut there (it was never synced, so never
//! acknowledged). A damaged last record is indistinguishable from a torn one and is cut too. The
//! one other torn tail is a seal cut short before an empty last chunk (a crash while a chunk was
//! being closed, see `Wal::start_chunk`), also cut. Anything else that does not verify, a missing
//! chunk (the newest one too: its predecessor's seal names it), or entries that skip indexes the
//! log's base does not cover is [`StorageError::Corrupt`]. Chunks closed by builds before the seal
//! (2026-12-01) have none: deleting the newest of those goes unnoticed, as it did then.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use super::snapshot::{io_error, sync_dir};
use crate::error::{Cause, HamokError};
use crate::raft::{Entry, EntryPayload, LogIndex, Term};
use crate::store::StorageError;

/// The directory of the chunks, under the store's directory.
pub(super) const DIR_NAME: &str = "wal";
const LOCK_NAME: &str = "LOCK";
const CHUNK_SUFFIX: &str = ".wal";
const HEAD_BYTES: usize = 12;
/// The largest record body written or accepted: entries are bounded far below this by the largest
/// frame; a corrupt length must not make recovery allocate without bound.
const MAX_BODY_BYTES: usize = 256 << 20;
/// The largest entry payload [`Wal::append`] takes: room left for the record's other fields.
const MAX_ENTRY_PAYLOAD_BYTES: usize = MAX_BODY_BYTES - 4096;
/// The pending buffer keeps at most this capacity between flushes (a burst of large entries must not
/// keep its memory).
const PENDING_KEEP_BYTES: usize = 4 << 20;

const KIND_VOTE: u8 = 1;
const KIND_ENTRY: u8 = 2;
const KIND_TRUNCATE: u8 = 3;
const KIND_PURGE: u8 = 4;
const KIND_COMMIT: u8 = 5;
const KIND_META: u8 = 6;
/// The last record of a full chunk: the sequence number of the chunk that follows it.
const KIND_NEXT: u8 = 7;
/// The bytes of a `Next` record.
pub(super) const SEAL_BYTES: usize = HEAD_BYTES + 1 + 8;

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

/// A chunk file kept by the log.
#[derive(Debug)]
struct Chunk {
    seq: u64,
    /// The last entry index of the log when the chunk began: the older chunks hold no entry above it,
    /// so they can go once the base reaches it.
    last_at_start: LogIndex,
}

/// The write-ahead log (see the module docs).
pub(super) struct Wal {
    dir: PathBuf,
    /// Held for the log's lifetime: the exclusive lock on the directory.
    _lock: File,
    chunk_max_bytes: u64,
    /// The open chunk (the last one), positioned at its end.
    file: File,
    /// The chunks kept, oldest first; the last is the open one.
    chunks: VecDeque<Chunk>,
    /// Bytes of the chunk the next record goes to, written or pending.
    chunk_bytes: u64,
    /// Records encoded but not yet written.
    pending: Vec<u8>,
    /// Where in `pending` a new chunk begins (its header encoded there), with the log's last index at
    /// that point: a full chunk ends at a record boundary, so a big batch spans several chunks.
    rolls: Vec<(usize, LogIndex)>,
    /// While the header of a new chunk is being encoded (no roll inside it).
    in_header: bool,
    /// The state after every record appended so far (the header of the next chunk).
    state: WalState,
    /// The last entry index after every record appended so far.
    last_index: LogIndex,
}

impl std::fmt::Debug for Wal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wal")
            .field("dir", &self.dir)
            .field("chunks", &self.chunks.len())
            .field("last_index", &self.last_index)
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
                last_at_start: 0,
            });
        }
        let last_seq = chunks.back().expect("one chunk at least").seq;
        let path = chunk_path(&dir, last_seq);
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| io_error(store_dir, "open the last log chunk", e))?;
        let chunk_bytes = file
            .seek(SeekFrom::End(0))
            .map_err(|e| io_error(store_dir, "seek the last log chunk", e))?;
        let last_index = scan.entries.last().map_or(scan.state.base.0, |e| e.index);
        let mut wal = Wal {
            dir,
            _lock: lock,
            chunk_max_bytes: chunk_max_bytes as u64,
            file,
            chunks,
            chunk_bytes,
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
        };
        if chunk_bytes == 0 {
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

    /// A second descriptor of the open chunk, for a sync on another thread.
    pub(super) fn open_chunk(&self) -> io::Result<File> {
        self.file.try_clone()
    }

    /// Whether records wait to be written.
    pub(super) fn has_pending(&self) -> bool {
        !self.pending.is_empty()
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

    /// Writes what is pending (starting the new chunks it begins) and, when `sync`, `fdatasync`s the
    /// open chunk; after a synced flush, deletes the chunks the base has passed. On error the caller
    /// must stop using the log: what reached the disk is unknown.
    pub(super) fn flush(&mut self, sync: bool) -> io::Result<()> {
        let mut written = 0;
        for (at, last_at_start) in std::mem::take(&mut self.rolls) {
            self.file.write_all(&self.pending[written..at])?;
            written = at;
            self.start_chunk(last_at_start)?;
        }
        self.file.write_all(&self.pending[written..])?;
        self.pending.clear();
        if self.pending.capacity() > PENDING_KEEP_BYTES {
            self.pending.shrink_to(PENDING_KEEP_BYTES);
        }
        if sync {
            self.file.sync_data()?;
            self.remove_passed_chunks()?;
        }
        Ok(())
    }

    /// Closes the full chunk and opens the next one, in an order that leaves recovery a state it can
    /// tell from damage at every crash point:
    ///
    /// 1. the full chunk is synced (a later chunk must never outlive its records: recovery would
    ///    find a hole);
    /// 2. the next chunk is created and its name synced (so the seal below never outlives it);
    /// 3. the full chunk is sealed (a `Next` record naming its successor) and synced again: from
    ///    then on, a missing successor is a deleted chunk, never a crash, and recovery refuses it.
    ///
    /// A crash inside step 3 leaves a torn seal before an empty chunk, which recovery cuts.
    /// Costs two more syncs per chunk (one chunk per 64 MiB of log by default).
    fn start_chunk(&mut self, last_at_start: LogIndex) -> io::Result<()> {
        self.file.sync_data()?;
        let seq = self.chunks.back().expect("one chunk at least").seq + 1;
        let next = OpenOptions::new()
            .create_new(true)
            .read(true)
            .write(true)
            .open(chunk_path(&self.dir, seq))?;
        sync_dir(&self.dir)?;
        let mut seal = Vec::with_capacity(SEAL_BYTES);
        seal.extend_from_slice(&[0; HEAD_BYTES]);
        seal.push(KIND_NEXT);
        seal.extend_from_slice(&seq.to_le_bytes());
        fill_head(&mut seal);
        debug_assert_eq!(seal.len(), SEAL_BYTES);
        self.file.write_all(&seal)?;
        self.file.sync_data()?;
        self.file = next;
        self.chunks.push_back(Chunk { seq, last_at_start });
        Ok(())
    }

    /// Deletes the oldest chunks while every entry they hold is at or below the base (the next chunk
    /// starts with the state, so nothing else in them is needed). Only after a synced flush: the
    /// purge that allows it is on disk.
    fn remove_passed_chunks(&mut self) -> io::Result<()> {
        while self.chunks.len() > 1 && self.chunks[1].last_at_start <= self.state.base.0 {
            let gone = self.chunks.pop_front().expect("two chunks at least");
            match fs::remove_file(chunk_path(&self.dir, gone.seq)) {
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

    /// Starts a record (in a new chunk, with the state as its header, when the current one is
    /// full): reserves its head, writes its kind. Returns where it starts.
    fn begin(&mut self, kind: u8) -> usize {
        if self.chunk_bytes >= self.chunk_max_bytes && !self.in_header {
            self.rolls.push((self.pending.len(), self.last_index));
            self.chunk_bytes = 0;
            self.in_header = true;
            self.write_header();
            self.in_header = false;
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

fn chunk_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{seq:020}{CHUNK_SUFFIX}"))
}

/// The chunk sequence numbers in `dir`, sorted; any other file but the lock is an error.
fn list_chunks(store_dir: &Path, dir: &Path) -> Result<Vec<u64>, StorageError> {
    let mut seqs = Vec::new();
    for item in fs::read_dir(dir).map_err(|e| io_error(store_dir, "list the log", e))? {
        let item = item.map_err(|e| io_error(store_dir, "list the log", e))?;
        let name = item.file_name();
        let name = name.to_string_lossy();
        if name == LOCK_NAME {
            continue;
        }
        match name
            .strip_suffix(CHUNK_SUFFIX)
            .and_then(|n| n.parse::<u64>().ok())
        {
            Some(seq) => seqs.push(seq),
            None => {
                return Err(StorageError::Corrupt {
                    dir: store_dir.to_path_buf(),
                    detail: format!("unexpected file `{name}` in the log directory"),
                    source: None,
                })
            }
        }
    }
    seqs.sort_unstable();
    Ok(seqs)
}

struct Scan {
    state: WalState,
    entries: Vec<Entry>,
    chunks: Vec<Chunk>,
}

/// Replays every chunk (see the module docs for what verifies); with `repair`, cuts a torn tail.
fn scan(store_dir: &Path, dir: &Path, repair: bool) -> Result<Scan, StorageError> {
    let corrupt = |detail: String| StorageError::Corrupt {
        dir: store_dir.to_path_buf(),
        detail,
        source: None,
    };
    let seqs = list_chunks(store_dir, dir)?;
    for pair in seqs.windows(2) {
        if pair[1] != pair[0] + 1 {
            return Err(corrupt(format!(
                "log chunk {} is missing (found {} then {})",
                pair[0] + 1,
                pair[0],
                pair[1]
            )));
        }
    }
    let mut replay = Replay::default();
    let mut chunks = Vec::with_capacity(seqs.len());
    for (i, &seq) in seqs.iter().enumerate() {
        let is_last = i + 1 == seqs.len();
        let path = chunk_path(dir, seq);
        let mut bytes = Vec::new();
        File::open(&path)
            .and_then(|mut f| f.read_to_end(&mut bytes))
            .map_err(|e| io_error(store_dir, "read a log chunk", e))?;
        chunks.push(Chunk {
            seq,
            last_at_start: replay.next - 1,
        });
        let mut at = 0usize;
        let mut sealed = false;
        while at < bytes.len() {
            match parse_record(&bytes[at..]) {
                Ok((kind, body, len)) if kind == KIND_NEXT => {
                    if body != (seq + 1).to_le_bytes() || at + len != bytes.len() {
                        return Err(corrupt(format!(
                            "chunk {}: a seal at byte {at} that is not the chunk's last record or \
                             does not name chunk {}",
                            path.display(),
                            seq + 1
                        )));
                    }
                    sealed = true;
                    at += len;
                }
                Ok((kind, body, len)) => {
                    replay
                        .apply(kind, body)
                        .map_err(|d| corrupt(format!("chunk {}: {d}", path.display())))?;
                    at += len;
                }
                Err(bad) => {
                    // A torn tail: in the last chunk, or a seal cut short by a crash while the next
                    // chunk, just created, is still empty (see `Wal::start_chunk`).
                    let torn = if is_last {
                        !valid_record_after(&bytes[at + 1..])
                    } else {
                        i + 2 == seqs.len()
                            && bytes.len() - at <= SEAL_BYTES
                            && fs::metadata(chunk_path(dir, seqs[i + 1]))
                                .map_err(|e| io_error(store_dir, "read a log chunk", e))?
                                .len()
                                == 0
                    };
                    if !torn {
                        return Err(corrupt(format!(
                            "chunk {}: the record at byte {at} does not verify ({bad:?})",
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
        if is_last && sealed {
            return Err(corrupt(format!(
                "log chunk {} is missing: chunk {} was sealed with it as its successor",
                seq + 1,
                path.display()
            )));
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
    })
}

/// Why a record does not verify.
#[derive(Debug, Clone, Copy)]
enum Bad {
    /// The file ends inside its head or body.
    Short,
    /// Its head or body does not match its checksum.
    Mismatch,
}

/// Whether a whole record that verifies starts anywhere in `bytes`: after a record that does not
/// verify, none does in a torn tail (what follows the last good record was never synced: cut short,
/// zeros, or the remains of an interrupted write), while a damaged record in the middle of the log
/// is followed by good ones. Runs only on recovery of a damaged chunk.
fn valid_record_after(bytes: &[u8]) -> bool {
    (0..bytes.len()).any(|at| parse_record(&bytes[at..]).is_ok())
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
