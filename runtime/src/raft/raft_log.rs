//! The in-memory log: a snapshot base plus the entries after it, the commit and applied marks, and the
//! record of what has changed since the driver last persisted.

use std::collections::VecDeque;

use super::error::RaftStartError;
use super::types::{Entry, LogIndex, Term};

/// The log of one peer. Entries are contiguous from `snapshot_index + 1`.
#[derive(Debug)]
pub struct RaftLog {
    snapshot_index: LogIndex,
    snapshot_term: Term,
    entries: VecDeque<Entry>,
    commit: LogIndex,
    applied: LogIndex,
    /// Bytes of the entries above `commit` (the leader bounds this).
    uncommitted_bytes: usize,
    /// Bytes of every entry held (what the node compacts by).
    bytes: usize,
    /// Lowest index changed since the last [`RaftLog::take_unpersisted`].
    unpersisted_from: Option<LogIndex>,
    /// The end of the prefix the driver reported durable (see [`RaftLog::mark_durable`]); never past
    /// the last index: a truncation lowers it.
    durable: LogIndex,
}

impl RaftLog {
    /// A log whose prefix up to `snapshot_index` is a snapshot, followed by `entries` (already durable).
    pub fn new(
        snapshot_index: LogIndex,
        snapshot_term: Term,
        entries: Vec<Entry>,
        committed: LogIndex,
    ) -> Result<Self, RaftStartError> {
        let mut log = RaftLog {
            snapshot_index,
            snapshot_term,
            entries: VecDeque::with_capacity(entries.len()),
            commit: snapshot_index,
            applied: snapshot_index,
            uncommitted_bytes: 0,
            bytes: 0,
            unpersisted_from: None,
            durable: snapshot_index,
        };
        for entry in entries {
            let expected = log.last_index() + 1;
            if entry.index != expected {
                return Err(RaftStartError::LogNotContiguous {
                    expected,
                    found: entry.index,
                });
            }
            log.uncommitted_bytes += entry.size_bytes();
            log.bytes += entry.size_bytes();
            log.entries.push_back(entry);
        }
        log.durable = log.last_index();
        // Entries up to the persisted commit index were committed when it was written: they count as
        // committed again (and are applied before anything is served). Clamped to the log, so a store
        // that kept the mark but lost its entries cannot claim more than it holds.
        let committed = committed.min(log.last_index());
        if committed > log.commit {
            log.commit_to(committed);
        }
        Ok(log)
    }

    /// First index held as an entry (one past the snapshot).
    pub fn first_index(&self) -> LogIndex {
        self.snapshot_index + 1
    }

    /// Last index in the log (the snapshot's when there are no entries).
    pub fn last_index(&self) -> LogIndex {
        self.snapshot_index + self.entries.len() as u64
    }

    /// Term of the last entry.
    pub fn last_term(&self) -> Term {
        self.entries.back().map_or(self.snapshot_term, |e| e.term)
    }

    /// Last index covered by the snapshot.
    pub fn snapshot_index(&self) -> LogIndex {
        self.snapshot_index
    }

    /// Highest index known committed.
    pub fn commit_index(&self) -> LogIndex {
        self.commit
    }

    /// Highest index handed out for applying.
    pub fn applied_index(&self) -> LogIndex {
        self.applied
    }

    /// Number of entries held (after the snapshot) and their bytes.
    pub fn size(&self) -> (usize, usize) {
        (self.entries.len(), self.bytes)
    }

    /// Bytes of the entries above the commit index.
    pub fn uncommitted_bytes(&self) -> usize {
        self.uncommitted_bytes
    }

    /// The term at `index`: known for the snapshot's last index and every entry; `None` below the snapshot
    /// or past the end.
    pub fn term(&self, index: LogIndex) -> Option<Term> {
        if index == self.snapshot_index {
            return Some(self.snapshot_term);
        }
        self.entry(index).map(|e| e.term)
    }

    /// The entry at `index`, if held.
    pub fn entry(&self, index: LogIndex) -> Option<&Entry> {
        if index <= self.snapshot_index {
            return None;
        }
        self.entries.get((index - self.first_index()) as usize)
    }

    /// Whether the log holds an entry of `term` at `index` (or the snapshot ends there with that term).
    pub fn matches(&self, index: LogIndex, term: Term) -> bool {
        self.term(index) == Some(term)
    }

    /// The voting rule of the paper (§5.4.1): a candidate's log is at least as up to date as ours.
    pub fn is_up_to_date(&self, last_index: LogIndex, last_term: Term) -> bool {
        last_term > self.last_term()
            || (last_term == self.last_term() && last_index >= self.last_index())
    }

    /// The largest index `<= index` whose term is `<= term`, or the snapshot index if there is none above
    /// it. Terms never decrease along the log, so this is a binary search. Used for fast back-up.
    pub fn find_conflict_by_term(&self, index: LogIndex, term: Term) -> LogIndex {
        let index = index.min(self.last_index());
        if index <= self.snapshot_index {
            return self.snapshot_index;
        }
        let upto = (index - self.snapshot_index) as usize;
        let (a, b) = self.entries.as_slices();
        let count = if upto <= a.len() {
            a[..upto].partition_point(|e| e.term <= term)
        } else {
            let in_a = a.partition_point(|e| e.term <= term);
            if in_a < a.len() {
                in_a
            } else {
                a.len() + b[..upto - a.len()].partition_point(|e| e.term <= term)
            }
        };
        self.snapshot_index + count as u64
    }

    /// Appends entries that continue the log (the leader's own proposals).
    pub fn append(&mut self, entry: Entry) {
        debug_assert_eq!(
            entry.index,
            self.last_index() + 1,
            "append must continue the log"
        );
        debug_assert!(
            entry.term >= self.last_term(),
            "terms never decrease along the log"
        );
        self.mark_unpersisted(entry.index);
        self.uncommitted_bytes += entry.size_bytes();
        self.bytes += entry.size_bytes();
        self.entries.push_back(entry);
    }

    /// Follower side of AppendEntries once `prev` matched: skips entries already held, truncates at the
    /// first conflict and appends the rest. Returns the index of the last entry of the message and whether
    /// the log changed, or `None` (log untouched) when the entries would rewrite a committed entry, which
    /// only a forged or corrupt message can ask for.
    pub fn append_after_match(
        &mut self,
        prev_index: LogIndex,
        entries: Vec<Entry>,
    ) -> Option<(LogIndex, bool)> {
        let last_new = prev_index + entries.len() as u64;
        let mut conflict_at = None;
        for (offset, entry) in entries.iter().enumerate() {
            if entry.index <= self.snapshot_index {
                continue; // covered by our snapshot: committed, so it matches
            }
            if self.term(entry.index) != Some(entry.term) {
                conflict_at = Some(offset);
                break;
            }
        }
        let Some(offset) = conflict_at else {
            return Some((last_new, false));
        };
        let first_new = entries[offset].index;
        if first_new <= self.commit {
            return None;
        }
        if entries[offset..].windows(2).any(|w| w[1].term < w[0].term)
            || entries[offset].term < self.term(first_new - 1).unwrap_or(0)
        {
            return None; // terms never decrease along a log: corrupt
        }
        if first_new <= self.last_index() {
            self.truncate_from(first_new);
        }
        for entry in entries.into_iter().skip(offset) {
            self.append(entry);
        }
        Some((last_new, true))
    }

    /// Drops the entry at `index` and everything after it. Never reaches committed entries.
    fn truncate_from(&mut self, index: LogIndex) {
        debug_assert!(index > self.commit && index > self.snapshot_index);
        let keep = (index - self.first_index()) as usize;
        for entry in self.entries.drain(keep..) {
            self.uncommitted_bytes = self.uncommitted_bytes.saturating_sub(entry.size_bytes());
            self.bytes -= entry.size_bytes();
        }
        self.durable = self.durable.min(index - 1);
        self.mark_unpersisted(index);
    }

    /// Up to `max_entries` entries from `from`, stopping before `max_bytes` is passed (at least one).
    pub fn slice(&self, from: LogIndex, max_entries: usize, max_bytes: usize) -> Vec<Entry> {
        if from <= self.snapshot_index || from > self.last_index() {
            return Vec::new();
        }
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for entry in self.entries.range((from - self.first_index()) as usize..) {
            if out.len() >= max_entries {
                break;
            }
            bytes += entry.size_bytes();
            if !out.is_empty() && bytes > max_bytes {
                break;
            }
            out.push(entry.clone());
        }
        out
    }

    /// Raises the commit index (never lowers it; never past the last index).
    pub fn commit_to(&mut self, index: LogIndex) -> bool {
        if index <= self.commit {
            return false;
        }
        assert!(
            index <= self.last_index(),
            "commit {index} past last index {}",
            self.last_index()
        );
        for i in self.commit + 1..=index {
            if let Some(entry) = self.entry(i) {
                self.uncommitted_bytes = self.uncommitted_bytes.saturating_sub(entry.size_bytes());
            }
        }
        self.commit = index;
        true
    }

    /// Whether committed entries wait to be applied.
    pub fn has_next_committed(&self) -> bool {
        self.applied < self.commit
    }

    /// Hands out up to `max` committed entries after `applied` and advances `applied` past them.
    pub fn next_committed(&mut self, max: usize) -> Vec<Entry> {
        let from = self.applied + 1;
        let to = self.commit.min(self.applied + max as u64);
        let mut out = Vec::with_capacity((to + 1).saturating_sub(from) as usize);
        for i in from..=to {
            match self.entry(i) {
                Some(e) => out.push(e.clone()),
                None => break,
            }
        }
        self.applied += out.len() as u64;
        debug_assert!(self.applied <= self.commit);
        out
    }

    /// Drops entries up to `index` (which must be applied), making it the snapshot base.
    pub fn compact_to(&mut self, index: LogIndex) {
        debug_assert!(index <= self.applied && index > self.snapshot_index);
        let term = self.term(index).expect("compaction index is in the log");
        let drop = (index - self.snapshot_index) as usize;
        for entry in self.entries.drain(..drop) {
            self.bytes -= entry.size_bytes();
        }
        self.snapshot_index = index;
        self.snapshot_term = term;
    }

    /// Installs a snapshot received from the leader. Keeps the entries after it when the log agrees with
    /// the snapshot at its last index, and drops the whole log otherwise.
    pub fn restore(&mut self, index: LogIndex, term: Term) {
        debug_assert!(index > self.commit);
        if self.matches(index, term) {
            let drop = (index - self.snapshot_index) as usize;
            self.entries.drain(..drop);
            self.durable = self.durable.max(index);
        } else {
            self.entries.clear();
            self.durable = index;
            self.mark_unpersisted(index + 1);
        }
        self.snapshot_index = index;
        self.snapshot_term = term;
        self.commit = index;
        self.applied = index;
        self.uncommitted_bytes = self.entries.iter().map(Entry::size_bytes).sum();
        self.bytes = self.uncommitted_bytes;
    }

    /// The end of the prefix reported durable.
    pub fn durable_index(&self) -> LogIndex {
        self.durable
    }

    /// The driver made the log durable up to `index`, whose entry had `term` when it was written.
    /// Ignored (`false`) when the log no longer holds that entry (truncated since, or compacted) or
    /// already counts it durable.
    pub fn mark_durable(&mut self, index: LogIndex, term: Term) -> bool {
        if index <= self.durable || self.term(index) != Some(term) {
            return false;
        }
        self.durable = index;
        true
    }

    fn mark_unpersisted(&mut self, index: LogIndex) {
        self.unpersisted_from = Some(self.unpersisted_from.map_or(index, |i| i.min(index)));
    }

    /// Whether there are changes the driver has not persisted yet.
    pub fn has_unpersisted(&self) -> bool {
        self.unpersisted_from.is_some()
    }

    /// The write the driver must make durable: truncate at the returned index, then append the entries.
    pub fn take_unpersisted(&mut self) -> Option<(LogIndex, Vec<Entry>)> {
        let from = self.unpersisted_from.take()?.max(self.first_index());
        let entries = if from > self.last_index() {
            Vec::new()
        } else {
            self.entries
                .range((from - self.first_index()) as usize..)
                .cloned()
                .collect()
        };
        Some((from, entries))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::types::EntryPayload;
    use bytes::Bytes;

    fn entry(index: LogIndex, term: Term, len: usize) -> Entry {
        Entry {
            index,
            term,
            payload: EntryPayload::Command(Bytes::from(vec![0u8; len])),
        }
    }

    fn held_bytes(log: &RaftLog) -> usize {
        log.entries.iter().map(Entry::size_bytes).sum()
    }

    #[test]
    fn the_byte_count_follows_appends_truncations_compactions_and_restores() {
        let mut log = RaftLog::new(0, 0, vec![entry(1, 1, 10), entry(2, 1, 20)], 0).unwrap();
        assert_eq!(log.size(), (2, held_bytes(&log)));
        log.append(entry(3, 1, 30));
        log.append(entry(4, 1, 40));
        assert_eq!(log.size(), (4, held_bytes(&log)));
        // A conflicting suffix from index 3 is replaced by one longer entry.
        log.append_after_match(2, vec![entry(3, 2, 100)]).unwrap();
        assert_eq!(log.size(), (3, held_bytes(&log)));
        log.commit_to(3);
        let _ = log.next_committed(10);
        log.compact_to(2);
        assert_eq!(log.size(), (1, held_bytes(&log)));
        log.append(entry(4, 2, 7));
        log.restore(10, 3);
        assert_eq!(log.size(), (0, 0));
    }
}
