//! The file store against its contract and its recovery rules: round trips through a reopen,
//! truncation, snapshots (also one interrupted by a crash), torn tails, flipped bits, missing chunks,
//! the directory lock, the peer id, and a failed fsync.

use std::fs;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;

use super::*;
use crate::raft::{EntryPayload, Membership, SnapshotMeta};

fn e(index: LogIndex, term: Term, data: &[u8]) -> Entry {
    Entry {
        index,
        term,
        payload: EntryPayload::Command(Bytes::copy_from_slice(data)),
    }
}

fn entries(from: LogIndex, to: LogIndex, term: Term) -> Vec<Entry> {
    (from..=to)
        .map(|i| e(i, term, format!("command {i}").as_bytes()))
        .collect()
}

fn snapshot(index: LogIndex, term: Term) -> Snapshot {
    Snapshot {
        meta: SnapshotMeta {
            last_index: index,
            last_term: term,
            membership: Membership::with_voters([PeerId::from("a")]),
        },
        data: Bytes::from(format!("state at {index}")),
    }
}

fn open(dir: &Path) -> Result<FileLogStore, HamokError> {
    FileLogStore::open(dir, FileLogStoreOptions::default())
}

fn small_chunks_options() -> FileLogStoreOptions {
    FileLogStoreOptions {
        chunk_max_bytes: 4 << 10,
        ..FileLogStoreOptions::default()
    }
}

fn small_chunks(dir: &Path) -> FileLogStore {
    FileLogStore::open(dir, small_chunks_options()).unwrap()
}

/// Entries 1 to 300 of term 1 in small chunks (several of them), synced, the store closed.
fn closed_store_of_300_entries_in_small_chunks(dir: &Path) {
    let mut s = small_chunks(dir);
    s.write_entries(1, &entries(1, 300, 1)).unwrap();
    s.sync().unwrap();
}

/// A seeded xorshift: `next(n)` is a number below `n` (tests' random walks, the same on every run).
fn seeded(seed: u64) -> impl FnMut(u64) -> u64 {
    let mut rng = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    move |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n.max(1)
    }
}

fn ids(state: &PersistedState) -> Vec<(LogIndex, Term)> {
    state.entries.iter().map(|e| (e.index, e.term)).collect()
}

fn chunk_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir.join(wal::DIR_NAME))
        .unwrap()
        .map(|f| f.unwrap().path())
        .filter(|p| p.file_name().unwrap() != "LOCK")
        .collect();
    files.sort();
    files
}

/// Where the records of a chunk end (its file goes on with the zeros written ahead of them).
fn log_len(chunk: &Path) -> usize {
    wal::records_end(&fs::read(chunk).unwrap())
}

/// Writes `bytes` over a chunk at `at`, as a crash may leave part of a write.
fn write_at(chunk: &Path, at: usize, bytes: &[u8]) {
    let mut all = fs::read(chunk).unwrap();
    if all.len() < at + bytes.len() {
        all.resize(at + bytes.len(), 0);
    }
    all[at..at + bytes.len()].copy_from_slice(bytes);
    fs::write(chunk, all).unwrap();
}

fn corrupt(result: Result<FileLogStore, HamokError>) -> String {
    match result {
        Err(HamokError::Storage(StorageError::Corrupt { detail, source, .. })) => {
            format!("{detail} {source:?}")
        }
        Err(other) => panic!("expected Corrupt, got {other:?}"),
        Ok(store) => panic!("expected Corrupt, opened {store:?}"),
    }
}

#[test]
fn everything_survives_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = open(dir.path()).unwrap();
    s.bind_peer(&PeerId::from("a")).unwrap();
    s.save_hard_state(&HardState {
        term: 3,
        voted_for: Some(PeerId::from("b")),
    })
    .unwrap();
    s.write_entries(1, &entries(1, 10, 2)).unwrap();
    s.save_committed(7, 2).unwrap();
    s.sync().unwrap();
    assert_eq!(s.size().0, 10);
    drop(s);

    let mut s = open(dir.path()).unwrap();
    assert_eq!(s.peer_id(), Some(PeerId::from("a")));
    let loaded = s.load().unwrap();
    assert_eq!(loaded.hard_state.term, 3);
    assert_eq!(loaded.hard_state.voted_for, Some(PeerId::from("b")));
    assert_eq!(loaded.entries, entries(1, 10, 2));
    assert_eq!(loaded.committed, 7);
    assert_eq!(
        s.size(),
        (
            10,
            entries(1, 10, 2)
                .iter()
                .map(|e| e.size_bytes() as u64)
                .sum()
        )
    );
}

#[test]
fn a_conflicting_suffix_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = open(dir.path()).unwrap();
    s.write_entries(1, &entries(1, 8, 1)).unwrap();
    s.save_committed(4, 1).unwrap();
    s.write_entries(6, &entries(6, 7, 2)).unwrap();
    s.sync().unwrap();
    drop(s);
    let loaded = open(dir.path()).unwrap().load().unwrap();
    assert_eq!(
        ids(&loaded),
        vec![(1, 1), (2, 1), (3, 1), (4, 1), (5, 1), (6, 2), (7, 2)]
    );
}

#[test]
fn snapshots_compact_the_log_and_survive() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = small_chunks(dir.path());
    s.write_entries(1, &entries(1, 300, 1)).unwrap();
    s.save_committed(300, 1).unwrap();
    s.sync().unwrap();
    let before = chunk_files(dir.path()).len();
    assert!(before > 3, "small chunks: {before}");
    s.save_snapshot(&snapshot(250, 1)).unwrap();
    assert_eq!(s.size().0, 50);
    drop(s);
    let after = chunk_files(dir.path()).len();
    assert!(
        after < before,
        "compacted chunks are removed: {before} -> {after}"
    );
    let loaded = small_chunks(dir.path()).load().unwrap();
    assert_eq!(loaded.snapshot, snapshot(250, 1));
    assert_eq!(loaded.entries.first().map(|e| e.index), Some(251));
    assert_eq!(loaded.entries.last().map(|e| e.index), Some(300));
    assert_eq!(loaded.committed, 300);
}

#[test]
fn a_snapshot_from_the_leader_replaces_a_conflicting_log() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = open(dir.path()).unwrap();
    s.write_entries(1, &entries(1, 10, 1)).unwrap();
    s.save_committed(3, 1).unwrap();
    s.sync().unwrap();
    // The leader's snapshot at (12, 4): beyond this log, which must not survive above its commit.
    s.save_snapshot(&snapshot(12, 4)).unwrap();
    s.write_entries(13, &entries(13, 14, 4)).unwrap();
    s.sync().unwrap();
    drop(s);
    let loaded = open(dir.path()).unwrap().load().unwrap();
    assert_eq!(loaded.snapshot.meta.last_index, 12);
    assert_eq!(ids(&loaded), vec![(13, 4), (14, 4)]);
    assert_eq!(loaded.committed, 12);
}

#[test]
fn a_crash_between_snapshot_and_compaction_is_finished_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = open(dir.path()).unwrap();
    s.write_entries(1, &entries(1, 20, 1)).unwrap();
    s.sync().unwrap();
    drop(s);
    // The snapshot file was written, the process died before the log was compacted.
    snapshot::write(dir.path(), &snapshot(15, 1)).unwrap();
    let loaded = open(dir.path()).unwrap().load().unwrap();
    assert_eq!(loaded.snapshot.meta.last_index, 15);
    assert_eq!(loaded.entries.first().map(|e| e.index), Some(16));
    assert_eq!(loaded.entries.len(), 5);
    // A temporary snapshot file left by a crash mid-write is ignored and removed.
    fs::write(dir.path().join("snapshot.tmp"), b"half a snap").unwrap();
    let loaded = open(dir.path()).unwrap().load().unwrap();
    assert_eq!(loaded.snapshot.meta.last_index, 15);
    assert!(!dir.path().join("snapshot.tmp").exists());
}

#[test]
fn a_torn_tail_is_cut_at_the_last_whole_record() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = open(dir.path()).unwrap();
    s.write_entries(1, &entries(1, 10, 1)).unwrap();
    s.sync().unwrap();
    drop(s);
    let last = chunk_files(dir.path()).pop().unwrap();
    // The last record (entry 10) lost its last bytes: a write the power cut interrupted left the
    // zeros that were there before.
    write_at(&last, log_len(&last) - 5, &[0; 5]);
    let mut s = open(dir.path()).unwrap();
    assert_eq!(ids(&s.load().unwrap()).last(), Some(&(9, 1)));
    // And the store goes on from there.
    s.write_entries(10, &entries(10, 11, 1)).unwrap();
    s.sync().unwrap();
    drop(s);
    assert_eq!(open(dir.path()).unwrap().load().unwrap().entries.len(), 11);
}

#[test]
fn a_flipped_bit_before_the_tail_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = open(dir.path()).unwrap();
    s.write_entries(1, &entries(1, 10, 1)).unwrap();
    s.sync().unwrap();
    drop(s);
    let last = chunk_files(dir.path()).pop().unwrap();
    let mut bytes = fs::read(&last).unwrap();
    // Flip a bit in the payload of an entry in the middle ("command 5").
    let at = bytes
        .windows(9)
        .position(|w| w == b"command 5")
        .expect("the entry is in the chunk");
    bytes[at + 3] ^= 0x10;
    fs::write(&last, bytes).unwrap();
    let detail = corrupt(open(dir.path()));
    assert!(!detail.is_empty());
}

#[test]
fn a_missing_chunk_refuses_to_start() {
    for victim in ["middle", "first", "newest"] {
        let dir = tempfile::tempdir().unwrap();
        closed_store_of_300_entries_in_small_chunks(dir.path());
        let chunks = chunk_files(dir.path());
        assert!(chunks.len() >= 3);
        let gone = match victim {
            "first" => &chunks[0],
            "newest" => chunks.last().unwrap(),
            _ => &chunks[chunks.len() / 2],
        };
        fs::remove_file(gone).unwrap();
        let detail = corrupt(FileLogStore::open(dir.path(), small_chunks_options()));
        assert!(detail.contains("missing"), "{victim}: {detail}");
    }
}

/// The crash points of closing a full chunk (`Wal::start_chunk`): after the new chunk was created
/// and before or while its predecessor's seal was written. Both leave an empty newest chunk; the
/// store opens with every record before the seal, and the cut seal stays cut.
#[test]
fn a_crash_while_closing_a_chunk_loses_nothing_written_before() {
    for cut in [wal::SEAL_BYTES, 7, 1] {
        let dir = tempfile::tempdir().unwrap();
        closed_store_of_300_entries_in_small_chunks(dir.path());
        let chunks = chunk_files(dir.path());
        let (newest, before) = (&chunks[chunks.len() - 1], &chunks[chunks.len() - 2]);
        // What the newest chunk held, and the seal (or part of it) at the end of the one before.
        let mut old = fs::read(before).unwrap();
        let n = old.len();
        old.truncate(n - cut);
        fs::write(before, &old).unwrap();
        fs::write(newest, b"").unwrap();
        let open_prefix = || {
            let loaded = FileLogStore::open(dir.path(), small_chunks_options())
                .unwrap()
                .load()
                .unwrap();
            let got = ids(&loaded);
            let last = got.last().unwrap().0;
            assert!(last < 300, "the newest chunk's entries are gone");
            assert_eq!(got, (1..=last).map(|i| (i, 1)).collect::<Vec<_>>());
            last
        };
        let first = open_prefix();
        // The second open finds a header in the newest chunk: the cut seal must be gone by then.
        assert_eq!(open_prefix(), first, "cut {cut}");
    }
    // A seal cut short before a chunk that holds records is damage, not a crash.
    let dir = tempfile::tempdir().unwrap();
    closed_store_of_300_entries_in_small_chunks(dir.path());
    let chunks = chunk_files(dir.path());
    let before = &chunks[chunks.len() - 2];
    let old = fs::read(before).unwrap();
    fs::write(before, &old[..old.len() - 3]).unwrap();
    assert!(corrupt(FileLogStore::open(dir.path(), small_chunks_options())).contains("verify"));
}

/// A full chunk is cut to its seal after the seal is written (its preallocated zeros go); a crash
/// before that cut reached the disk leaves zeros after the seal, which is whole: nothing is lost. Any
/// other byte after a seal is damage.
#[test]
fn zeros_after_a_seal_are_the_rest_of_a_chunk_not_yet_cut() {
    let dir = tempfile::tempdir().unwrap();
    closed_store_of_300_entries_in_small_chunks(dir.path());
    let first = chunk_files(dir.path()).remove(0);
    let sealed = fs::read(&first).unwrap();
    let mut with_zeros = sealed.clone();
    with_zeros.extend_from_slice(&[0; 4096]);
    fs::write(&first, &with_zeros).unwrap();
    let loaded = FileLogStore::open(dir.path(), small_chunks_options())
        .unwrap()
        .load()
        .unwrap();
    assert_eq!(ids(&loaded), (1..=300).map(|i| (i, 1)).collect::<Vec<_>>());
    with_zeros[sealed.len() + 100] = 1;
    fs::write(&first, &with_zeros).unwrap();
    assert!(corrupt(FileLogStore::open(dir.path(), small_chunks_options())).contains("seal"));
}

#[test]
fn a_damaged_or_missing_snapshot_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = open(dir.path()).unwrap();
    s.write_entries(1, &entries(1, 20, 1)).unwrap();
    s.save_snapshot(&snapshot(10, 1)).unwrap();
    drop(s);
    let path = dir.path().join("snapshot");
    let good = fs::read(&path).unwrap();
    let mut bad = good.clone();
    let n = bad.len();
    bad[n - 2] ^= 0x01;
    fs::write(&path, &bad).unwrap();
    assert!(corrupt(open(dir.path())).contains("checksum"));
    fs::remove_file(&path).unwrap();
    assert!(corrupt(open(dir.path())).contains("compacted to 10"));
    fs::write(&path, &good).unwrap();
    assert_eq!(open(dir.path()).unwrap().load().unwrap().entries.len(), 10);
}

#[test]
fn a_directory_in_use_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let _first = open(dir.path()).unwrap();
    match open(dir.path()) {
        Err(HamokError::Storage(StorageError::Locked { .. })) => {}
        other => panic!("expected Locked, got {other:?}"),
    }
}

#[test]
fn a_directory_keeps_its_peer() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = open(dir.path()).unwrap();
    assert_eq!(s.peer_id(), None);
    s.bind_peer(&PeerId::from("a")).unwrap();
    drop(s);
    let mut s = open(dir.path()).unwrap();
    assert_eq!(s.peer_id(), Some(PeerId::from("a")));
    s.bind_peer(&PeerId::from("a")).unwrap();
    match s.bind_peer(&PeerId::from("b")) {
        Err(HamokError::Storage(StorageError::WrongPeer { stored, .. })) => {
            assert_eq!(stored, PeerId::from("a"))
        }
        other => panic!("expected WrongPeer, got {other:?}"),
    }
}

#[test]
fn a_failed_fsync_stops_the_store_for_good() {
    let dir = tempfile::tempdir().unwrap();
    let fail = Arc::new(AtomicBool::new(false));
    let options = FileLogStoreOptions {
        fail_syncs: Some(fail.clone()),
        ..FileLogStoreOptions::default()
    };
    let mut s = FileLogStore::open(dir.path(), options).unwrap();
    s.write_entries(1, &entries(1, 3, 1)).unwrap();
    s.sync().unwrap();
    s.write_entries(4, &entries(4, 5, 1)).unwrap();
    fail.store(true, Ordering::SeqCst);
    let first = s.sync().unwrap_err();
    assert!(
        matches!(first, HamokError::Storage(StorageError::Io { .. })),
        "{first:?}"
    );
    // No retry can succeed, even once the disk "recovers": the failure is sticky.
    fail.store(false, Ordering::SeqCst);
    assert_eq!(s.sync().unwrap_err(), first);
    assert_eq!(s.write_entries(6, &entries(6, 6, 1)).unwrap_err(), first);
    assert_eq!(s.save_hard_state(&HardState::default()).unwrap_err(), first);
}

#[test]
fn a_background_sync_reports_its_outcome_and_a_failed_one_fails_every_later_call() {
    let dir = tempfile::tempdir().unwrap();
    let fail = Arc::new(AtomicBool::new(false));
    let options = FileLogStoreOptions {
        fail_syncs: Some(fail.clone()),
        background_sync: true,
        ..FileLogStoreOptions::default()
    };
    let mut s = FileLogStore::open(dir.path(), options).unwrap();
    assert!(s.syncs_in_background());
    let (tx, rx) = std::sync::mpsc::channel();
    let done = |tx: &std::sync::mpsc::Sender<Result<(), StorageError>>| -> crate::store::SyncDone {
        let tx = tx.clone();
        Box::new(move |r| tx.send(r).unwrap())
    };
    let wait = || rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap();

    s.write_entries(1, &entries(1, 3, 1)).unwrap();
    assert!(s.sync_in_background(done(&tx)).unwrap());
    assert_eq!(wait(), Ok(()));
    assert!(
        !s.sync_in_background(done(&tx)).unwrap(),
        "nothing waits for a sync"
    );

    s.write_entries(4, &entries(4, 5, 1)).unwrap();
    fail.store(true, Ordering::SeqCst);
    assert!(s.sync_in_background(done(&tx)).unwrap());
    let failed = wait().unwrap_err();
    assert!(matches!(failed, StorageError::Io { .. }), "{failed:?}");
    // Sticky, for inline calls too, even once the disk "recovers".
    fail.store(false, Ordering::SeqCst);
    let expected = HamokError::Storage(failed);
    assert_eq!(s.sync().unwrap_err(), expected);
    assert_eq!(s.write_entries(6, &entries(6, 6, 1)).unwrap_err(), expected);
    assert_eq!(s.sync_in_background(done(&tx)).unwrap_err(), expected);
    drop(s);

    // What the first background sync covered is there after a reopen.
    let mut s = open(dir.path()).unwrap();
    let loaded = s.load().unwrap();
    assert!(loaded.entries.len() >= 3, "{:?}", loaded.entries);
}

#[test]
fn nothing_is_synced_in_the_background_unless_asked_and_under_batch() {
    for (sync, background_sync) in [
        (SyncPolicy::Batch, false),
        (SyncPolicy::Interval, true),
        (SyncPolicy::Never, true),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let options = FileLogStoreOptions {
            sync,
            background_sync,
            ..FileLogStoreOptions::default()
        };
        let mut s = FileLogStore::open(dir.path(), options).unwrap();
        assert!(!s.syncs_in_background());
        s.write_entries(1, &entries(1, 3, 1)).unwrap();
        assert!(!s.sync_in_background(Box::new(|_| {})).unwrap());
    }
}

#[test]
fn the_memory_store_keeps_the_commit_mark_too() {
    let mut s = crate::store::MemoryLogStore::new();
    s.write_entries(1, &entries(1, 5, 1)).unwrap();
    s.save_committed(4, 1).unwrap();
    assert_eq!(s.load().unwrap().committed, 4);
}

#[test]
fn the_rest_of_an_interrupted_write_after_the_records_is_a_torn_tail() {
    for tail in [
        vec![0u8; 4096],
        b"\x2a\x00\x00\x00garbage of a write cut short".to_vec(),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let mut s = open(dir.path()).unwrap();
        s.write_entries(1, &entries(1, 10, 1)).unwrap();
        s.sync().unwrap();
        drop(s);
        let last = chunk_files(dir.path()).pop().unwrap();
        let whole = log_len(&last);
        write_at(&last, whole, &tail);
        let mut s = open(dir.path()).unwrap();
        assert_eq!(ids(&s.load().unwrap()).last(), Some(&(10, 1)));
        // The tail is cut: after the records (now with the open's own write) only zeros.
        let bytes = fs::read(&last).unwrap();
        let end = log_len(&last);
        assert!(end > whole, "the open's write follows the records");
        assert!(bytes[end..].iter().all(|&b| b == 0), "the tail is cut");
        // The store goes on after the records, and all of it survives a reopen.
        s.write_entries(11, &entries(11, 12, 1)).unwrap();
        s.sync().unwrap();
        drop(s);
        assert_eq!(
            ids(&open(dir.path()).unwrap().load().unwrap()).last(),
            Some(&(12, 1))
        );
    }
}

#[test]
fn a_damaged_record_in_a_closed_chunk_refuses_to_start_even_at_its_end() {
    let dir = tempfile::tempdir().unwrap();
    closed_store_of_300_entries_in_small_chunks(dir.path());
    let first = chunk_files(dir.path()).remove(0);
    let mut bytes = fs::read(&first).unwrap();
    let n = bytes.len();
    // The last byte of the first chunk: a torn tail is possible only in the last chunk.
    bytes[n - 1] ^= 0x01;
    fs::write(&first, bytes).unwrap();
    assert!(corrupt(FileLogStore::open(dir.path(), small_chunks_options())).contains("verify"));
}

#[test]
fn a_truncation_across_chunks_and_a_cut_header_survive_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = small_chunks(dir.path());
    s.save_hard_state(&HardState {
        term: 2,
        voted_for: Some(PeerId::from("a")),
    })
    .unwrap();
    s.write_entries(1, &entries(1, 300, 1)).unwrap();
    s.save_committed(50, 1).unwrap();
    s.sync().unwrap();
    let chunks = chunk_files(dir.path()).len();
    assert!(chunks >= 3, "{chunks}");
    // A new leader replaces everything from 60 on (entry 60 lives in an older chunk).
    s.write_entries(60, &entries(60, 120, 2)).unwrap();
    s.sync().unwrap();
    drop(s);
    let expected: Vec<(LogIndex, Term)> =
        (1..=120).map(|i| (i, if i < 60 { 1 } else { 2 })).collect();
    let loaded = small_chunks(dir.path()).load().unwrap();
    assert_eq!(ids(&loaded), expected);
    assert_eq!(loaded.committed, 50);
    // A crash right after a new chunk was created, before its header reached the disk.
    let last = chunk_files(dir.path()).pop().unwrap();
    let name = last.file_name().unwrap().to_string_lossy().into_owned();
    let next: u64 = name.trim_end_matches(".log").parse::<u64>().unwrap() + 1;
    fs::write(last.with_file_name(format!("{next:020}.log")), b"").unwrap();
    let mut s = small_chunks(dir.path());
    let loaded = s.load().unwrap();
    assert_eq!(ids(&loaded), expected);
    assert_eq!(loaded.hard_state.term, 2);
    // The empty chunk got its header: the store goes on in it, and all of it survives a reopen.
    s.write_entries(121, &entries(121, 130, 2)).unwrap();
    s.sync().unwrap();
    drop(s);
    let loaded = small_chunks(dir.path()).load().unwrap();
    assert_eq!(loaded.entries.len(), 130);
    assert_eq!(loaded.hard_state.voted_for, Some(PeerId::from("a")));
}

#[test]
fn a_directory_of_the_earlier_layout_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    fs::create_dir_all(dir.path().join("log")).unwrap();
    fs::write(
        dir.path().join("log").join("r-00000000000000000000.wal"),
        b"x",
    )
    .unwrap();
    assert!(corrupt(open(dir.path())).contains("earlier builds"));
}

#[test]
fn a_second_load_rereads_the_files() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = open(dir.path()).unwrap();
    assert!(s.load().unwrap().entries.is_empty(), "what open read");
    s.write_entries(1, &entries(1, 5, 1)).unwrap();
    s.save_committed(3, 1).unwrap();
    s.sync().unwrap();
    let first = s.load().unwrap();
    s.write_entries(6, &entries(6, 7, 1)).unwrap();
    s.sync().unwrap();
    let again = s.load().unwrap();
    assert_eq!(first.entries.len(), 5);
    assert_eq!(again.entries, entries(1, 7, 1));
    assert_eq!(again.committed, 3);
}

#[test]
fn a_truncation_that_opens_a_chunk_survives_the_removal_of_the_chunks_before_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = small_chunks(dir.path());
    let mut last = 0;
    // Fill the first chunk: the next record starts a new one.
    loop {
        last += 1;
        s.write_entries(last, &entries(last, last, 1)).unwrap();
        s.sync().unwrap();
        let chunk = chunk_files(dir.path()).pop().unwrap();
        if log_len(&chunk) >= 4 << 10 {
            break;
        }
    }
    // A new leader's suffix: the new chunk holds its header, then this truncation.
    let from = last - 5;
    s.write_entries(from, &entries(from, last + 3, 2)).unwrap();
    s.sync().unwrap();
    assert_eq!(chunk_files(dir.path()).len(), 2);
    s.save_snapshot(&snapshot(last, 2)).unwrap();
    drop(s);
    assert_eq!(
        chunk_files(dir.path()).len(),
        1,
        "the chunk behind the snapshot is gone"
    );
    let loaded = small_chunks(dir.path()).load().unwrap();
    assert_eq!(loaded.snapshot.meta.last_index, last);
    assert_eq!(
        ids(&loaded),
        vec![(last + 1, 2), (last + 2, 2), (last + 3, 2)]
    );
}

/// A seeded random walk over the store's calls (appends, a new leader's conflicting suffix, commit
/// marks, votes, snapshots that compact the log, writes lost to a crash before their sync) in small
/// chunks, reopening the store often and checking what it loads against a model.
#[test]
fn random_walks_reload_what_was_synced() {
    struct Model {
        base: (LogIndex, Term),
        entries: Vec<(LogIndex, Term)>,
        committed: LogIndex,
        hard_state: HardState,
    }
    impl Model {
        fn last(&self) -> LogIndex {
            self.entries.last().map_or(self.base.0, |e| e.0)
        }
        fn term_at(&self, i: LogIndex) -> Term {
            if i == self.base.0 {
                return self.base.1;
            }
            self.entries[(i - self.base.0 - 1) as usize].1
        }
    }
    for seed in 1..=40u64 {
        let mut next = seeded(seed);
        let dir = tempfile::tempdir().unwrap();
        let options = || FileLogStoreOptions {
            chunk_max_bytes: 1 << 10,
            ..FileLogStoreOptions::default()
        };
        let mut s = FileLogStore::open(dir.path(), options()).unwrap();
        let mut m = Model {
            base: (0, 0),
            entries: Vec::new(),
            committed: 0,
            hard_state: HardState::default(),
        };
        for step in 0..300 {
            let last = m.last();
            match next(10) {
                0..=2 => {
                    let n = 1 + next(8);
                    let term = m.hard_state.term.max(1);
                    s.write_entries(last + 1, &entries(last + 1, last + n, term))
                        .unwrap();
                    m.entries.extend((last + 1..=last + n).map(|i| (i, term)));
                }
                3 if last > m.committed.max(m.base.0) => {
                    // A new leader replaces the uncommitted suffix from `from` on.
                    let low = m.committed.max(m.base.0) + 1;
                    let from = low + next(last - low + 1);
                    let term = m.hard_state.term + 1;
                    m.hard_state = HardState {
                        term,
                        voted_for: Some(PeerId::from(format!("p{}", next(3)))),
                    };
                    s.save_hard_state(&m.hard_state).unwrap();
                    let n = 1 + next(6);
                    s.write_entries(from, &entries(from, from + n - 1, term))
                        .unwrap();
                    m.entries.truncate((from - m.base.0 - 1) as usize);
                    m.entries.extend((from..from + n).map(|i| (i, term)));
                }
                4 if last > m.committed => {
                    let c = m.committed + 1 + next(last - m.committed);
                    s.save_committed(c, m.term_at(c)).unwrap();
                    m.committed = c;
                }
                5 if m.committed > m.base.0 => {
                    let i = m.base.0 + 1 + next(m.committed - m.base.0);
                    let t = m.term_at(i);
                    s.save_snapshot(&snapshot(i, t)).unwrap();
                    m.entries.drain(..(i - m.base.0) as usize);
                    m.base = (i, t);
                }
                6 => {
                    // Written, never synced: a crash loses it, and may leave part of it behind.
                    s.write_entries(last + 1, &entries(last + 1, last + 2, 99))
                        .unwrap();
                    drop(s);
                    let chunk = chunk_files(dir.path()).pop().unwrap();
                    let garbage: Vec<u8> = (0..next(40)).map(|_| next(256) as u8).collect();
                    write_at(&chunk, log_len(&chunk), &garbage);
                    s = FileLogStore::open(dir.path(), options()).unwrap();
                }
                _ => {}
            }
            s.sync().unwrap();
            if next(4) == 0 {
                drop(s);
                s = FileLogStore::open(dir.path(), options()).unwrap();
                let loaded = s.load().unwrap();
                let at = format!("seed {seed} step {step}");
                assert_eq!(ids(&loaded), m.entries, "{at}");
                assert_eq!(loaded.snapshot.meta.last_index, m.base.0, "{at}");
                assert_eq!(loaded.committed, m.committed.max(m.base.0), "{at}");
                assert_eq!(loaded.hard_state, m.hard_state, "{at}");
            }
        }
        assert!(
            chunk_files(dir.path()).len() < 40,
            "compaction deletes chunks"
        );
    }
}

#[test]
fn an_entry_larger_than_a_record_is_refused_typed() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = open(dir.path()).unwrap();
    s.write_entries(1, &entries(1, 2, 1)).unwrap();
    // Zeroed pages the check never touches: refused before it is encoded.
    let huge = Entry {
        index: 3,
        term: 1,
        payload: EntryPayload::Command(Bytes::from(vec![0u8; 256 << 20])),
    };
    match s.write_entries(3, &[huge]) {
        Err(HamokError::Codec { context, .. }) => {
            assert!(context.contains("larger than"), "{context}")
        }
        other => panic!("expected a codec error, got {other:?}"),
    }
}

/// Entries with payloads of `bytes` each, so that a write spans several sectors.
fn big_entries(from: LogIndex, to: LogIndex, term: Term, bytes: usize) -> Vec<Entry> {
    (from..=to)
        .map(|i| {
            let mut data = format!("command {i} ").into_bytes();
            data.resize(bytes, b'a' + (i % 26) as u8);
            e(i, term, &data)
        })
        .collect()
}

/// What a power cut may leave of a file written over: each 512-byte sector that changed since
/// `before` holds either its new content or its old one (zeros past the old end).
fn crash_image(before: &[u8], after: &[u8], mut keep_new: impl FnMut() -> bool) -> Vec<u8> {
    let mut image = after.to_vec();
    for sector in (0..after.len()).step_by(512) {
        let end = (sector + 512).min(after.len());
        let old: Vec<u8> = (sector..end)
            .map(|i| before.get(i).copied().unwrap_or(0))
            .collect();
        if old != after[sector..end] && !keep_new() {
            image[sector..end].copy_from_slice(&old);
        }
    }
    image
}

/// The chunks are written over zeros, so a power cut in the middle of writes that were never synced
/// can leave any of their sectors: holes followed by records that verify. Recovery must keep what
/// was synced and a prefix of the rest, and never call that corruption (the rule of an append-only
/// log, which refuses records that verify after one that does not, fails this test). Three cuts in a
/// row per seed: a recovered log whose last write lost its end goes on, and is torn again.
#[test]
fn a_power_cut_in_the_middle_of_unsynced_writes_keeps_a_prefix_of_them() {
    let mut holes_before_kept_records = 0;
    for seed in 1..=40u64 {
        let mut next = seeded(seed);
        let dir = tempfile::tempdir().unwrap();
        let mut synced: Vec<(LogIndex, Term)> = (1..=10 + next(20)).map(|i| (i, 1)).collect();
        let mut s = open(dir.path()).unwrap();
        s.write_entries(1, &big_entries(1, synced.len() as u64, 1, 200))
            .unwrap();
        s.sync().unwrap();
        drop(s);
        for round in 2..=4u64 {
            let at = format!("seed {seed} round {round}");
            // Writes that reach the kernel and never the disk: a store that does not sync (what
            // its open writes, it syncs).
            let never = FileLogStoreOptions {
                sync: SyncPolicy::Never,
                ..FileLogStoreOptions::default()
            };
            let mut s = FileLogStore::open(dir.path(), never).unwrap();
            let chunk = chunk_files(dir.path()).pop().unwrap();
            let before = fs::read(&chunk).unwrap();
            let mut written = synced.clone();
            for _ in 0..1 + next(4) {
                let (first, n) = (written.len() as u64 + 1, 1 + next(30));
                let bytes = 50 + next(400) as usize;
                s.write_entries(first, &big_entries(first, first + n - 1, round, bytes))
                    .unwrap();
                s.sync().unwrap();
                written.extend((first..first + n).map(|i| (i, round)));
            }
            drop(s);
            let after = fs::read(&chunk).unwrap();
            let image = crash_image(&before, &after, || next(2) == 0);
            // Whether the image has a hole (a changed sector left old) before one that got its
            // new content: the case an append-only rule calls corruption.
            let sectors: Vec<(bool, bool)> = (0..after.len())
                .step_by(512)
                .map(|i| {
                    let end = (i + 512).min(after.len());
                    let changed = before.get(i..end) != Some(&after[i..end]);
                    (changed, image[i..end] == after[i..end])
                })
                .collect();
            let first_hole = sectors.iter().position(|&(changed, new)| changed && !new);
            if first_hole.is_some_and(|h| sectors[h..].iter().any(|&(changed, new)| changed && new))
            {
                holes_before_kept_records += 1;
            }
            fs::write(&chunk, &image).unwrap();
            let loaded = open(dir.path())
                .unwrap_or_else(|e| panic!("{at}: a crash is not corruption: {e}"))
                .load()
                .unwrap();
            let loaded = ids(&loaded);
            assert!(
                (synced.len()..=written.len()).contains(&loaded.len()),
                "{at}: kept {}, synced {}, written {}",
                loaded.len(),
                synced.len(),
                written.len()
            );
            assert_eq!(loaded[..], written[..loaded.len()], "{at}");
            // What a reopen recovered is synced by it.
            synced = loaded;
        }
        // The store goes on with batch syncs, and everything survives a reopen.
        let mut s = open(dir.path()).unwrap();
        let first = synced.len() as u64 + 1;
        s.write_entries(first, &big_entries(first, first + 4, 9, 300))
            .unwrap();
        s.sync().unwrap();
        drop(s);
        let again = ids(&open(dir.path()).unwrap().load().unwrap());
        assert_eq!(again.len() as u64, first + 4, "seed {seed}");
        assert_eq!(again[..synced.len()], synced[..], "seed {seed}");
    }
    assert!(
        holes_before_kept_records >= 20,
        "the seeds must tear writes with holes before kept sectors ({holes_before_kept_records})"
    );
}

/// A sector lost from a write that a later write declares synced is damage, never a torn write:
/// cutting there would drop acknowledged entries.
#[test]
fn a_lost_sector_in_a_write_declared_synced_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = open(dir.path()).unwrap();
    s.write_entries(1, &big_entries(1, 20, 1, 300)).unwrap();
    s.sync().unwrap();
    s.write_entries(21, &big_entries(21, 25, 1, 300)).unwrap();
    s.sync().unwrap();
    drop(s);
    let chunk = chunk_files(dir.path()).pop().unwrap();
    let bytes = fs::read(&chunk).unwrap();
    // A whole sector in the middle of entries 1-20 reads as zeros.
    let at = bytes.windows(10).position(|w| w == b"command 10").unwrap();
    let sector = at / 512 * 512;
    write_at(&chunk, sector, &[0; 512]);
    let detail = corrupt(open(dir.path()));
    assert!(detail.contains("was synced"), "{detail}");
}

/// The last synced write is declared synced by a write of its own once time passes (the store's
/// tick): from then on, damage to it refuses to start. Before that, recovery cannot tell a lost
/// sector in it from a torn write and cuts it (the one ambiguity the module docs state).
#[test]
fn the_last_synced_write_is_declared_when_time_passes() {
    for tick in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let mut s = open(dir.path()).unwrap();
        s.write_entries(1, &big_entries(1, 20, 1, 300)).unwrap();
        s.sync().unwrap();
        if tick {
            // Nothing to write: the tick's call.
            s.sync().unwrap();
            s.sync().unwrap();
        }
        drop(s);
        let chunk = chunk_files(dir.path()).pop().unwrap();
        let bytes = fs::read(&chunk).unwrap();
        let at = bytes.windows(10).position(|w| w == b"command 10").unwrap();
        write_at(&chunk, at / 512 * 512, &[0; 512]);
        let result = open(dir.path());
        if tick {
            assert!(corrupt(result).contains("was synced"));
        } else {
            let kept = ids(&result.unwrap().load().unwrap()).len();
            assert!(kept < 10, "cut before entry 10: {kept}");
        }
    }
}

/// A log written by builds before 2026-12-03 (appended `.wal` chunks, no `Flush` records) is read
/// with the rules of its time and continued in a chunk of this build.
#[test]
fn a_log_of_the_earlier_format_is_read_and_continued() {
    let dir = tempfile::tempdir().unwrap();
    let wal_dir = dir.path().join(wal::DIR_NAME);
    fs::create_dir_all(&wal_dir).unwrap();
    let legacy = wal_dir.join(format!("{:020}.wal", 0));
    let chunk = wal::legacy_chunk(3, "a", &entries(1, 10, 1));
    fs::write(&legacy, &chunk).unwrap();
    let mut s = open(dir.path()).unwrap();
    let loaded = s.load().unwrap();
    assert_eq!(ids(&loaded), (1..=10).map(|i| (i, 1)).collect::<Vec<_>>());
    assert_eq!(loaded.hard_state.term, 3);
    s.write_entries(11, &entries(11, 12, 3)).unwrap();
    s.sync().unwrap();
    drop(s);
    let names: Vec<String> = chunk_files(dir.path())
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, [format!("{:020}.wal", 0), format!("{:020}.log", 1)]);
    let loaded = open(dir.path()).unwrap().load().unwrap();
    assert_eq!(ids(&loaded).len(), 12);
    assert_eq!(loaded.hard_state.voted_for, Some(PeerId::from("a")));

    // The earlier rule in an earlier build's last chunk: a damaged record followed by records that
    // verify is corruption; one at the very end is a torn tail.
    for (flip_at_end, expect_corrupt) in [(false, true), (true, false)] {
        let dir = tempfile::tempdir().unwrap();
        let wal_dir = dir.path().join(wal::DIR_NAME);
        fs::create_dir_all(&wal_dir).unwrap();
        let mut bytes = chunk.clone();
        let at = if flip_at_end {
            bytes.len() - 1
        } else {
            bytes.windows(9).position(|w| w == b"command 5").unwrap()
        };
        bytes[at] ^= 0x10;
        fs::write(wal_dir.join(format!("{:020}.wal", 0)), &bytes).unwrap();
        let result = open(dir.path());
        if expect_corrupt {
            assert!(corrupt(result).contains("verify"));
        } else {
            assert_eq!(ids(&result.unwrap().load().unwrap()).len(), 9);
        }
    }
}

/// The node makes a sync on the runtime's thread when the store says it cannot wait on the disk:
/// only a commit mark written under `batch`, anything under `never`, but not writes that need their
/// `fdatasync`, nor a write that closes a full chunk.
#[test]
fn a_sync_may_block_only_when_it_would_wait_on_the_disk() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = small_chunks(dir.path());
    assert!(!s.sync_may_block(), "nothing written");
    s.write_entries(1, &entries(1, 3, 1)).unwrap();
    assert!(s.sync_may_block(), "entries wait for their fdatasync");
    s.sync().unwrap();
    s.save_committed(2, 1).unwrap();
    assert!(!s.sync_may_block(), "a commit mark alone is not synced");
    s.sync().unwrap();
    // Fill the chunk: the next write closes it, with syncs.
    let mut last = 3;
    while log_len(&chunk_files(dir.path()).pop().unwrap()) < 4 << 10 {
        assert!(!s.sync_may_block(), "entry {last} is synced");
        last += 1;
        s.write_entries(last, &entries(last, last, 1)).unwrap();
        s.sync().unwrap();
    }
    assert!(s.sync_may_block(), "the next write closes a full chunk");
    drop(s);
    let never = FileLogStoreOptions {
        sync: SyncPolicy::Never,
        ..FileLogStoreOptions::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let mut s = FileLogStore::open(dir.path(), never).unwrap();
    s.write_entries(1, &entries(1, 3, 1)).unwrap();
    assert!(!s.sync_may_block(), "never syncs");
}

/// Entries are written on the runtime's thread only under a policy that syncs them later, and not
/// when they would close a full chunk (which syncs).
#[test]
fn entries_may_block_only_when_a_sync_comes_with_them() {
    let open = |sync, sync_interval| {
        let dir = tempfile::tempdir().unwrap();
        let options = FileLogStoreOptions {
            sync,
            sync_interval,
            ..small_chunks_options()
        };
        let s = FileLogStore::open(dir.path(), options).unwrap();
        (dir, s)
    };
    let hour = Duration::from_secs(3600);
    let (_dir, batch) = open(SyncPolicy::Batch, hour);
    assert!(batch.entries_may_block(1, 10), "batch syncs every write");
    let (_dir, interval) = open(SyncPolicy::Interval, hour);
    assert!(!interval.entries_may_block(1, 10), "an hour has not passed");
    let (_dir, due) = open(SyncPolicy::Interval, Duration::ZERO);
    assert!(due.entries_may_block(1, 10), "the interval has passed");
    let (_dir, mut never) = open(SyncPolicy::Never, hour);
    assert!(!never.entries_may_block(1, 10), "never syncs");
    assert!(
        never.entries_may_block(1, 4 << 10),
        "these fill the chunk, which is closed with syncs"
    );
    assert!(
        never.entries_may_block(100, 10),
        "nor do their envelopes fit"
    );
    // Close to the end of the chunk, the estimate errs toward a hand-off.
    let mut last = 0;
    while !never.entries_may_block(1, 10) {
        last += 1;
        never.write_entries(last, &entries(last, last, 1)).unwrap();
        never.sync().unwrap();
    }
    assert!(!never.sync_may_block(), "the chunk is not full yet");
}
