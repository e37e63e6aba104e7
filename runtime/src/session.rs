//! Client sessions: which request numbers of one client have been applied, so that a retried request
//! applies at most once.
//!
//! A client (one peer process, see [`ClientId`](crate::state_machine::ClientId)) numbers its requests 1, 2, 3, ... and
//! sends with each the lowest number it still waits for (its *floor*). Everything below the floor has
//! been answered, so its dedup state may go. Above the floor the applied numbers are kept as ranges:
//! requests mostly apply in order, so a session is a handful of ranges however many requests overtake a
//! stuck one. The number of ranges is bounded by the number of *gaps* (requests not yet applied above
//! the floor), which a well-behaved client keeps below its `max_pending_requests`.
//!
//! A session also caches the responses of its applied requests above the floor (the Raft
//! dissertation's §6.3 session). They are needed when a peer catches up from a snapshot that already
//! contains its own pending requests: it never applies them one by one, so it answers them from the
//! cache. The cache is bounded ([`MAX_RESPONSE_BYTES_PER_SESSION`], and
//! [`MAX_RESPONSE_CACHE_BYTES`] over all sessions); a response it had to drop is answered
//! [`HamokError::AppliedResponseLost`](crate::HamokError::AppliedResponseLost). The cache is not part of
//! the deduplication decision, so peers may trim it differently without diverging.

use std::collections::{BTreeMap, VecDeque};

use bytes::Bytes;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::raft::LogIndex;

/// Most disjoint ranges of applied request numbers kept per client. Every gap between two ranges is a
/// request the client still waits for (or gave up on while an older one was pending), so a client that
/// respects `max_pending_requests` (at most [`MAX_PENDING_REQUESTS_LIMIT`](crate::config::MAX_PENDING_REQUESTS_LIMIT))
/// never reaches it. A client that does is misbehaving: its oldest range is forgotten and the numbers below
/// it are reported as [`SeqStatus::Forgotten`], never silently judged duplicates.
pub const MAX_SEQ_RANGES_PER_SESSION: usize = 65_536;

/// Most bytes of cached responses per session; beyond it the oldest are dropped. Why 1 MiB: a client's
/// cached responses are those of its requests still in flight (up to `max_pending_requests`), and
/// typical responses are tens of bytes.
pub const MAX_RESPONSE_BYTES_PER_SESSION: usize = 1024 * 1024;

/// Most bytes of cached responses over all sessions of a peer; beyond it the least recently active
/// session's cache is dropped. Why 16 MiB: far above what live clients hold in flight, small next to the
/// state itself, and it bounds the cost sessions of departed peers add to every snapshot.
pub const MAX_RESPONSE_CACHE_BYTES: usize = 16 * 1024 * 1024;

/// What a session knows about one request number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeqStatus {
    /// Not applied yet: apply it now.
    New,
    /// Applied before (or below the client's own floor, hence answered): skip it.
    Applied,
    /// Below a floor raised by the range bound: whether it was applied is no longer known, and it will
    /// not be applied again.
    Forgotten,
}

/// Dedup state of one client.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Session {
    /// Numbers below it are done (applied, answered, or forgotten).
    floor: u64,
    /// Highest floor the range bound forced; numbers below it not known applied are `Forgotten`.
    forced_floor: u64,
    /// Applied numbers at or above `floor`: start → end (exclusive), disjoint, not adjacent.
    applied: SeqMap<u64>,
    /// Responses of applied requests at or above `floor` (see the module doc), and their total size.
    responses: SeqMap<Bytes>,
    /// Sum of the lengths in `responses` (derived: not in the snapshot, recounted on restore).
    #[serde(skip)]
    response_bytes: usize,
    /// Log index of the last command of this client (to evict the least recently active client).
    pub(crate) last_active: LogIndex,
}

impl Session {
    /// Raises the floor to the client's `floor` (never lowers it) and drops the state below it.
    pub(crate) fn advance_floor(&mut self, floor: u64) {
        if floor <= self.floor {
            return;
        }
        self.floor = floor;
        // Pop from the front: the usual step drops one range or none (or moves the start of the
        // range reaching over the floor), and this runs for every command.
        while let Some(&(start, end)) = self.applied.first() {
            if start >= floor {
                break;
            }
            if end > floor {
                // The range reaching over the floor keeps its upper part.
                self.applied.raise_first_key(floor);
                break;
            }
            self.applied.pop_first();
        }
        while let Some((seq, _)) = self.responses.first() {
            if *seq >= floor {
                break;
            }
            let (_, dropped) = self.responses.pop_first().expect("just seen");
            self.response_bytes -= dropped.len();
        }
    }

    /// Caches the response of `seq` (just applied). Returns the bytes added (negative when older
    /// responses made room).
    pub(crate) fn cache_response(&mut self, seq: u64, response: Bytes) -> isize {
        let before = self.response_bytes as isize;
        if response.len() <= MAX_RESPONSE_BYTES_PER_SESSION {
            self.response_bytes += response.len();
            self.responses.insert(seq, response);
            while self.response_bytes > MAX_RESPONSE_BYTES_PER_SESSION {
                let (_, dropped) = self.responses.pop_first().expect("over the bound");
                self.response_bytes -= dropped.len();
            }
        }
        self.response_bytes as isize - before
    }

    /// The cached response of `seq`, if it is still held.
    pub(crate) fn response(&self, seq: u64) -> Option<&Bytes> {
        self.responses.get(seq)
    }

    /// Drops every cached response; returns the bytes freed.
    pub(crate) fn drop_responses(&mut self) -> usize {
        self.responses.clear();
        std::mem::take(&mut self.response_bytes)
    }

    /// Bytes of cached responses.
    pub(crate) fn response_bytes(&self) -> usize {
        self.response_bytes
    }

    /// Recounts the derived `response_bytes` (after deserializing).
    pub(crate) fn recount(&mut self) {
        self.response_bytes = self.responses.values().map(Bytes::len).sum();
    }

    /// Status of `seq`.
    pub(crate) fn status(&self, seq: u64) -> SeqStatus {
        if self.contains(seq) {
            return SeqStatus::Applied;
        }
        if seq < self.forced_floor {
            return SeqStatus::Forgotten;
        }
        if seq < self.floor {
            return SeqStatus::Applied;
        }
        SeqStatus::New
    }

    fn contains(&self, seq: u64) -> bool {
        self.applied
            .last_at_or_below(seq)
            .is_some_and(|&(_, end)| seq < end)
    }

    /// Records `seq` as applied. Returns false (and changes nothing) when it is not [`SeqStatus::New`].
    pub(crate) fn insert(&mut self, seq: u64) -> bool {
        if self.status(seq) != SeqStatus::New {
            return false;
        }
        let end = seq + 1;
        let mut start = seq;
        let mut new_end = end;
        if let Some(&(s, e)) = seq
            .checked_sub(1)
            .and_then(|below| self.applied.last_at_or_below(below))
        {
            if e == seq {
                start = s;
            }
        }
        if let Some(next_end) = self.applied.remove(end) {
            new_end = next_end;
        }
        self.applied.insert(start, new_end);
        while self.applied.len() > MAX_SEQ_RANGES_PER_SESSION {
            // A client with more gaps than any well-behaved one: forget its oldest range. The gaps
            // below become `Forgotten` so their requests get an explicit answer instead of none.
            let (_, oldest_end) = self
                .applied
                .pop_first()
                .expect("over the bound, so non-empty");
            self.floor = oldest_end;
            self.forced_floor = oldest_end;
        }
        true
    }

    /// Number of disjoint ranges kept (for tests and stats).
    #[cfg(test)]
    pub(crate) fn ranges(&self) -> usize {
        self.applied.len()
    }
}

/// A map from request numbers, kept as a deque sorted by number: what a session holds mostly grows at
/// the back (requests apply about in order) and shrinks at the front (the floor rises), which a deque
/// does in place, where a `BTreeMap` splits and merges nodes (an allocation and a free per command,
/// on every peer). A number out of order is found by binary search and inserted where it belongs (at
/// worst a shift of the whole deque: [`MAX_SEQ_RANGES_PER_SESSION`] ranges, or the responses of one
/// client's requests above its floor).
/// Serialized as a map, exactly as the `BTreeMap` it replaced (snapshots keep their format).
#[derive(Clone, Debug, PartialEq, Eq)]
struct SeqMap<V>(VecDeque<(u64, V)>);

impl<V> Default for SeqMap<V> {
    fn default() -> Self {
        SeqMap(VecDeque::new())
    }
}

impl<V> SeqMap<V> {
    /// Where `key` is, or where it would go.
    fn search(&self, key: u64) -> Result<usize, usize> {
        // Most lookups are of the last number: check it before searching.
        match self.0.back() {
            Some((last, _)) if *last < key => Err(self.0.len()),
            Some((last, _)) if *last == key => Ok(self.0.len() - 1),
            _ => self.0.binary_search_by_key(&key, |(k, _)| *k),
        }
    }

    fn get(&self, key: u64) -> Option<&V> {
        self.search(key).ok().map(|i| &self.0[i].1)
    }

    /// Inserts or replaces; returns the value replaced.
    fn insert(&mut self, key: u64, value: V) -> Option<V> {
        match self.search(key) {
            Ok(i) => Some(std::mem::replace(&mut self.0[i].1, value)),
            Err(i) if i == self.0.len() => {
                self.0.push_back((key, value));
                None
            }
            Err(i) => {
                self.0.insert(i, (key, value));
                None
            }
        }
    }

    fn remove(&mut self, key: u64) -> Option<V> {
        let i = self.search(key).ok()?;
        self.0.remove(i).map(|(_, v)| v)
    }

    /// The entry with the greatest key at or below `key`.
    fn last_at_or_below(&self, key: u64) -> Option<&(u64, V)> {
        let i = match self.search(key) {
            Ok(i) => i,
            Err(0) => return None,
            Err(i) => i - 1,
        };
        self.0.get(i)
    }

    fn first(&self) -> Option<&(u64, V)> {
        self.0.front()
    }

    fn pop_first(&mut self) -> Option<(u64, V)> {
        self.0.pop_front()
    }

    /// Moves the first key up to `key`, which must stay below the second one.
    fn raise_first_key(&mut self, key: u64) {
        debug_assert!(self.0.get(1).is_none_or(|(next, _)| key < *next));
        if let Some(first) = self.0.front_mut() {
            debug_assert!(key >= first.0);
            first.0 = key;
        }
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn clear(&mut self) {
        self.0.clear();
    }

    fn values(&self) -> impl Iterator<Item = &V> {
        self.0.iter().map(|(_, v)| v)
    }
}

impl<V: Serialize> Serialize for SeqMap<V> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.0.iter().map(|(k, v)| (k, v)))
    }
}

impl<'de, V: Deserialize<'de>> Deserialize<'de> for SeqMap<V> {
    /// Read as a `BTreeMap` (sorted, a repeated key keeps its last value), as before.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let map = BTreeMap::<u64, V>::deserialize(deserializer)?;
        Ok(SeqMap(map.into_iter().collect()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_merge_and_floor_trims() {
        let mut s = Session::default();
        assert!(s.insert(1));
        assert!(s.insert(3));
        assert_eq!(s.ranges(), 2);
        assert!(s.insert(2));
        assert_eq!(s.ranges(), 1);
        assert!(!s.insert(2));
        assert_eq!(s.status(4), SeqStatus::New);
        s.advance_floor(3);
        assert_eq!(s.status(1), SeqStatus::Applied);
        assert_eq!(s.status(3), SeqStatus::Applied);
        assert_eq!(s.ranges(), 1);
        s.advance_floor(10);
        assert_eq!(s.ranges(), 0);
        assert_eq!(s.status(9), SeqStatus::Applied);
        assert_eq!(s.status(10), SeqStatus::New);
    }

    /// The bug this file exists for: one stuck request while many more than the old per-session bound
    /// of later requests apply. The stuck one must still apply when its retry arrives.
    #[test]
    fn a_stuck_request_survives_any_number_of_later_ones() {
        let mut s = Session::default();
        s.advance_floor(1);
        for seq in 2..=300_000 {
            assert!(s.insert(seq));
        }
        assert_eq!(s.ranges(), 1);
        assert_eq!(s.status(1), SeqStatus::New);
        assert!(s.insert(1));
        assert_eq!(s.ranges(), 1);
        assert!(!s.insert(1));
    }

    #[test]
    fn responses_are_cached_above_the_floor_within_the_bound() {
        let mut s = Session::default();
        for seq in 1..=3 {
            assert!(s.insert(seq));
            s.cache_response(seq, Bytes::from(vec![seq as u8; 10]));
        }
        assert_eq!(s.response_bytes(), 30);
        assert_eq!(s.response(2).map(|b| b[0]), Some(2));
        s.advance_floor(3);
        assert!(s.response(2).is_none());
        assert_eq!(s.response_bytes(), 10);
        // One response as large as the bound pushes the older ones out.
        assert!(s.insert(4));
        s.cache_response(4, Bytes::from(vec![0; MAX_RESPONSE_BYTES_PER_SESSION]));
        assert!(s.response(3).is_none());
        assert!(s.response(4).is_some());
        assert_eq!(s.response_bytes(), MAX_RESPONSE_BYTES_PER_SESSION);
        assert_eq!(s.drop_responses(), MAX_RESPONSE_BYTES_PER_SESSION);
        assert!(s.response(4).is_none());
    }

    #[test]
    fn the_range_bound_reports_forgotten_numbers() {
        let mut s = Session::default();
        s.advance_floor(1);
        // Every other number applies: one gap per range.
        let last = 2 * (MAX_SEQ_RANGES_PER_SESSION as u64 + 1);
        for seq in (2..=last).step_by(2) {
            assert!(s.insert(seq));
        }
        assert_eq!(s.ranges(), MAX_SEQ_RANGES_PER_SESSION);
        // The oldest range [2, 3) went: gap 1 below it is reported, not applied, not a "duplicate";
        // gap 3 above it is still open.
        assert_eq!(s.status(1), SeqStatus::Forgotten);
        assert_eq!(s.status(2), SeqStatus::Forgotten);
        assert_eq!(s.status(3), SeqStatus::New);
        assert_eq!(s.status(4), SeqStatus::Applied);
        assert!(s.insert(3));
        assert_eq!(s.status(3), SeqStatus::Applied);
    }

    /// The same operations on a `SeqMap` and on the `BTreeMap` it replaced give the same answers and
    /// the same contents, keys in and out of order.
    #[test]
    fn a_seq_map_behaves_as_the_btree_map_it_replaced() {
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move |bound: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % bound
        };
        let mut seq_map = SeqMap::default();
        let mut model = BTreeMap::new();
        let mut back = 0;
        for step in 0..20_000u64 {
            // Mostly at the back, as requests apply; sometimes anywhere below it.
            let key = if next(4) == 0 {
                next(back + 1)
            } else {
                back + next(3)
            };
            back = back.max(key);
            match next(6) {
                0..=2 => assert_eq!(seq_map.insert(key, step), model.insert(key, step)),
                3 => assert_eq!(seq_map.remove(key), model.remove(&key)),
                4 => assert_eq!(seq_map.pop_first(), model.pop_first()),
                _ => {
                    let second = model.keys().nth(1).copied().unwrap_or(u64::MAX);
                    if let Some((&first, &v)) = model.first_key_value() {
                        let raised = first + next((second - first).min(4));
                        seq_map.raise_first_key(raised);
                        model.remove(&first);
                        model.insert(raised, v);
                    }
                }
            }
            assert_eq!(seq_map.get(key), model.get(&key));
            assert_eq!(
                seq_map.last_at_or_below(key).copied(),
                model.range(..=key).next_back().map(|(k, v)| (*k, *v))
            );
            assert_eq!(seq_map.len(), model.len());
        }
        let contents: Vec<(u64, u64)> = seq_map.0.iter().copied().collect();
        assert_eq!(contents, model.into_iter().collect::<Vec<_>>());
    }

    /// Snapshots keep their format: a `SeqMap` is written as the `BTreeMap` was, and read back.
    #[test]
    fn a_seq_map_is_serialized_as_a_btree_map() {
        let model: BTreeMap<u64, Bytes> = [(3, Bytes::from_static(b"c")), (7, Bytes::new())]
            .into_iter()
            .collect();
        let mut seq_map = SeqMap::default();
        seq_map.insert(7, Bytes::new());
        seq_map.insert(3, Bytes::from_static(b"c"));
        let written = rmp_serde::to_vec(&seq_map).unwrap();
        assert_eq!(written, rmp_serde::to_vec(&model).unwrap());
        let read: SeqMap<Bytes> = rmp_serde::from_slice(&written).unwrap();
        assert_eq!(read, seq_map);
    }
}
