//! [`MemoryLogStore`]: the embedded default, everything in memory.

use std::collections::VecDeque;

use super::{LogStore, StorageError};
use crate::error::HamokError;
use crate::raft::{Entry, HardState, LogIndex, PersistedState, Snapshot, Term};

/// Everything in memory, nothing survives the process. Memory stays bounded because the node snapshots
/// and compacts by log size.
///
/// Two modes:
/// - [`MemoryLogStore::new`] keeps a copy of the log, so a wrapper that outlives the peer (a test's
///   simulated crash and restart) can [`load`](LogStore::load) it again;
/// - [`MemoryLogStore::volatile`], the builder's default, keeps no entries and no snapshot bytes: a
///   peer owns its store and dies with it, so the engine's own log and snapshot are the only copies
///   anyone reads. A second copy of the log would double its memory, and a second hold on the snapshot
///   would keep the peer from writing the next snapshot into its buffer. Loading a volatile store once
///   entries or a snapshot were written is refused ([`StorageError::Volatile`]): it could not give
///   them back.
#[derive(Debug, Default)]
pub struct MemoryLogStore {
    hard_state: HardState,
    snapshot: Snapshot,
    entries: VecDeque<Entry>,
    bytes: u64,
    committed: LogIndex,
    incarnation: u64,
    /// Keeps no entries (see the type's docs).
    volatile: bool,
    /// A volatile store was written entries or a snapshot since it was created.
    written: bool,
}

impl MemoryLogStore {
    /// An empty store that keeps a copy of the log, for a wrapper that reloads it after a simulated
    /// restart.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty store that keeps no entries and no snapshot, for a peer that owns it (the builder's
    /// default).
    pub fn volatile() -> Self {
        Self {
            volatile: true,
            ..Self::default()
        }
    }

    fn first_index(&self) -> LogIndex {
        self.snapshot.meta.last_index + 1
    }
}

impl LogStore for MemoryLogStore {
    fn load(&mut self) -> Result<PersistedState, HamokError> {
        if self.written {
            return Err(StorageError::Volatile.into());
        }
        Ok(PersistedState {
            hard_state: self.hard_state.clone(),
            snapshot: self.snapshot.clone(),
            entries: self.entries.iter().cloned().collect(),
            committed: self.committed,
        })
    }

    fn save_hard_state(&mut self, state: &HardState) -> Result<(), HamokError> {
        self.hard_state = state.clone();
        Ok(())
    }

    fn save_snapshot(&mut self, snapshot: &Snapshot) -> Result<(), HamokError> {
        if self.volatile {
            self.written = true;
            return Ok(());
        }
        let last = snapshot.meta.last_index;
        let matches = self
            .entries
            .iter()
            .find(|e| e.index == last)
            .is_some_and(|e| e.term == snapshot.meta.last_term);
        if matches {
            while self.entries.front().is_some_and(|e| e.index <= last) {
                let e = self.entries.pop_front().expect("front exists");
                self.bytes -= e.size_bytes() as u64;
            }
        } else {
            self.entries.clear();
            self.bytes = 0;
        }
        self.snapshot = snapshot.clone();
        Ok(())
    }

    fn write_entries(&mut self, from: LogIndex, entries: &[Entry]) -> Result<(), HamokError> {
        if self.volatile {
            self.written |= !entries.is_empty();
            return Ok(());
        }
        let from = from.max(self.first_index());
        let keep = (from - self.first_index()) as usize;
        if keep > self.entries.len() {
            return Err(HamokError::codec(
                format!(
                    "log write at {from} leaves a gap after {}",
                    self.first_index() + self.entries.len() as u64 - 1
                ),
                None,
            ));
        }
        for e in self.entries.drain(keep..) {
            self.bytes -= e.size_bytes() as u64;
        }
        for e in entries.iter().filter(|e| e.index >= from) {
            self.bytes += e.size_bytes() as u64;
            self.entries.push_back(e.clone());
        }
        Ok(())
    }

    fn save_committed(&mut self, index: LogIndex, _term: Term) -> Result<(), HamokError> {
        self.committed = self.committed.max(index);
        Ok(())
    }

    fn sync(&mut self) -> Result<(), HamokError> {
        Ok(())
    }

    fn incarnation(&self) -> u64 {
        self.incarnation
    }

    fn save_incarnation(&mut self, incarnation: u64) -> Result<(), HamokError> {
        self.incarnation = incarnation;
        Ok(())
    }

    fn size(&self) -> (u64, u64) {
        (self.entries.len() as u64, self.bytes)
    }

    fn may_block(&self) -> bool {
        false
    }

    fn is_volatile(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::{EntryPayload, SnapshotMeta};

    fn e(index: LogIndex, term: u64) -> Entry {
        Entry {
            index,
            term,
            payload: EntryPayload::Noop,
        }
    }

    #[test]
    fn a_volatile_store_keeps_no_entries_and_refuses_to_load_after_writes() {
        let mut s = MemoryLogStore::volatile();
        assert!(s.load().unwrap().entries.is_empty());
        s.save_hard_state(&HardState {
            term: 3,
            voted_for: None,
        })
        .unwrap();
        s.write_entries(1, &[e(1, 1), e(2, 1)]).unwrap();
        assert_eq!(s.size(), (0, 0));
        assert!(matches!(
            s.load(),
            Err(HamokError::Storage(StorageError::Volatile))
        ));

        // A snapshot is not kept either (it would hold the peer's snapshot buffer), so it too makes
        // the store refuse to load.
        let mut s = MemoryLogStore::volatile();
        let snapshot = Snapshot {
            meta: SnapshotMeta {
                last_index: 2,
                last_term: 1,
                membership: Default::default(),
            },
            data: bytes::Bytes::from(vec![7u8; 16]),
        };
        s.save_snapshot(&snapshot).unwrap();
        assert!(
            snapshot.data.is_unique(),
            "the store holds no reference to it"
        );
        assert!(matches!(
            s.load(),
            Err(HamokError::Storage(StorageError::Volatile))
        ));
    }

    #[test]
    fn write_truncate_snapshot_load() {
        let mut s = MemoryLogStore::new();
        s.write_entries(1, &[e(1, 1), e(2, 1), e(3, 1)]).unwrap();
        s.write_entries(3, &[e(3, 2), e(4, 2)]).unwrap();
        assert_eq!(s.size().0, 4);
        let snap = Snapshot {
            meta: SnapshotMeta {
                last_index: 2,
                last_term: 1,
                membership: Default::default(),
            },
            data: bytes::Bytes::from_static(b"state"),
        };
        s.save_snapshot(&snap).unwrap();
        s.save_hard_state(&HardState {
            term: 2,
            voted_for: None,
        })
        .unwrap();
        let loaded = s.load().unwrap();
        assert_eq!(loaded.snapshot, snap);
        assert_eq!(
            loaded
                .entries
                .iter()
                .map(|e| (e.index, e.term))
                .collect::<Vec<_>>(),
            vec![(3, 2), (4, 2)]
        );
        assert_eq!(loaded.hard_state.term, 2);
        assert!(s.write_entries(9, &[e(9, 2)]).is_err(), "gaps are refused");
    }
}
