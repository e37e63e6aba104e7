//! Deques keyed by request number, sorted: what a client's requests need on every command, where
//! numbers come mostly in order at the back and leave mostly in order from the front. [`SeqMap`]
//! (sessions: applied numbers and cached responses) and [`SeqSlots`] (the requests waiting on a peer)
//! do both in place, where a `BTreeMap` splits and merges nodes, an allocation and a free every few
//! commands on every peer. Both give their memory back once mostly empty ([`shrink_when_sparse`]).

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Least capacity a deque keeps when it shrinks (no reallocation churn for the usual handful).
const MIN_KEPT_CAPACITY: usize = 64;

/// Gives back memory a burst left: a deque holding under a quarter of its capacity shrinks to twice
/// its length, at least [`MIN_KEPT_CAPACITY`] (amortized: since the last change of capacity, the
/// length fell by at least half of what it is copying now).
fn shrink_when_sparse<T>(deque: &mut VecDeque<T>) {
    if deque.capacity() > MIN_KEPT_CAPACITY && deque.len() < deque.capacity() / 4 {
        deque.shrink_to((deque.len() * 2).max(MIN_KEPT_CAPACITY));
    }
}

/// A map from request numbers, kept as a deque sorted by number: what a session holds mostly grows at
/// the back (requests apply about in order) and shrinks at the front (the floor rises), which a deque
/// does in place, where a `BTreeMap` splits and merges nodes (an allocation and a free per command,
/// on every peer). A number out of order is found by binary search and inserted where it belongs: at
/// worst a shift of the whole deque, which holds at most
/// [`MAX_SEQ_RANGES_PER_SESSION`](crate::session::MAX_SEQ_RANGES_PER_SESSION) ranges, or the
/// responses of one client's requests above its floor. Serialized as a map, exactly as the `BTreeMap`
/// it replaced (snapshots keep their format).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SeqMap<V>(VecDeque<(u64, V)>);

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

    pub(crate) fn get(&self, key: u64) -> Option<&V> {
        self.search(key).ok().map(|i| &self.0[i].1)
    }

    /// Inserts or replaces; returns the value replaced.
    pub(crate) fn insert(&mut self, key: u64, value: V) -> Option<V> {
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

    pub(crate) fn remove(&mut self, key: u64) -> Option<V> {
        let i = self.search(key).ok()?;
        let removed = self.0.remove(i).map(|(_, v)| v);
        shrink_when_sparse(&mut self.0);
        removed
    }

    /// The entry with the greatest key at or below `key`.
    pub(crate) fn last_at_or_below(&self, key: u64) -> Option<&(u64, V)> {
        let i = match self.search(key) {
            Ok(i) => i,
            Err(0) => return None,
            Err(i) => i - 1,
        };
        self.0.get(i)
    }

    pub(crate) fn first(&self) -> Option<&(u64, V)> {
        self.0.front()
    }

    pub(crate) fn pop_first(&mut self) -> Option<(u64, V)> {
        let first = self.0.pop_front();
        shrink_when_sparse(&mut self.0);
        first
    }

    /// Moves the first key up to `key`, which must stay below the second one.
    pub(crate) fn raise_first_key(&mut self, key: u64) {
        debug_assert!(self.0.get(1).is_none_or(|(next, _)| key < *next));
        if let Some(first) = self.0.front_mut() {
            debug_assert!(key >= first.0);
            first.0 = key;
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }

    /// Empties the map and gives its memory back (a session's responses are dropped to free memory).
    pub(crate) fn clear(&mut self) {
        self.0 = VecDeque::new();
    }

    pub(crate) fn values(&self) -> impl Iterator<Item = &V> {
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

/// The requests waiting on a peer (`actors/node/requests.rs`), by number: a deque sorted by number,
/// where a request answered out of order leaves an empty slot. Numbers are handed out in increasing
/// order, so a new request goes at the back, and answers come mostly in order, from the front: both in
/// place, where a `BTreeMap` split and merged nodes (of more than a KiB each) as requests came and
/// went. Empty slots at the front are dropped at once, and all of them whenever they outnumber the
/// waiting requests (plus [`SLACK_SLOTS`]), so the deque holds at most twice the waiting requests
/// plus that slack.
pub(crate) struct SeqSlots<V> {
    slots: VecDeque<(u64, Option<V>)>,
    /// Slots holding a value.
    live: usize,
}

/// Empty slots tolerated before they are swept, on top of one per waiting request.
const SLACK_SLOTS: usize = 64;

impl<V> Default for SeqSlots<V> {
    fn default() -> Self {
        SeqSlots {
            slots: VecDeque::new(),
            live: 0,
        }
    }
}

impl<V> SeqSlots<V> {
    pub(crate) fn len(&self) -> usize {
        self.live
    }

    /// The lowest number waiting (the front slot is never empty).
    pub(crate) fn first_key(&self) -> Option<u64> {
        self.slots.front().map(|(seq, _)| *seq)
    }

    /// Adds `seq`, which must be above every number held.
    pub(crate) fn push(&mut self, seq: u64, value: V) {
        assert!(
            self.slots.back().is_none_or(|(last, _)| *last < seq),
            "request numbers are handed out in increasing order"
        );
        self.slots.push_back((seq, Some(value)));
        self.live += 1;
    }

    fn index(&self, seq: u64) -> Option<usize> {
        self.slots.binary_search_by_key(&seq, |(k, _)| *k).ok()
    }

    pub(crate) fn get(&self, seq: u64) -> Option<&V> {
        self.slots[self.index(seq)?].1.as_ref()
    }

    pub(crate) fn get_mut(&mut self, seq: u64) -> Option<&mut V> {
        let i = self.index(seq)?;
        self.slots[i].1.as_mut()
    }

    pub(crate) fn remove(&mut self, seq: u64) -> Option<V> {
        let i = self.index(seq)?;
        let value = self.slots[i].1.take()?;
        self.live -= 1;
        while self.slots.front().is_some_and(|(_, v)| v.is_none()) {
            self.slots.pop_front();
        }
        if self.slots.len() > 2 * self.live + SLACK_SLOTS {
            self.slots.retain(|(_, v)| v.is_some());
        }
        shrink_when_sparse(&mut self.slots);
        Some(value)
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (&u64, &V)> {
        self.slots
            .iter()
            .filter_map(|(seq, v)| v.as_ref().map(|v| (seq, v)))
    }

    pub(crate) fn keys(&self) -> impl Iterator<Item = &u64> {
        self.iter().map(|(seq, _)| seq)
    }

    pub(crate) fn into_values(self) -> impl Iterator<Item = (u64, V)> {
        self.slots
            .into_iter()
            .filter_map(|(seq, v)| v.map(|v| (seq, v)))
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::raft::SeededRng;

    /// Seeded numbers below a bound.
    fn random_below(seed: u64) -> impl FnMut(u64) -> u64 {
        let mut rng = SeededRng::new(seed);
        move |bound| rng.range(0, bound)
    }

    /// The same operations on a `SeqMap` and on the `BTreeMap` it replaced give the same answers and
    /// the same contents, keys in and out of order.
    #[test]
    fn a_seq_map_behaves_as_the_btree_map_it_replaced() {
        let mut next = random_below(0x9e37_79b9_7f4a_7c15_u64);
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

    /// Requests come and go in any order: the slots answer as a `BTreeMap` would, and empty slots
    /// stay within their bound.
    #[test]
    fn seq_slots_behave_as_a_btree_map_within_their_bound() {
        let mut next = random_below(0x2545_f491_4f6c_dd1d_u64);
        let mut slots = SeqSlots::default();
        let mut model = BTreeMap::new();
        let mut seq = 0;
        for step in 0..50_000u64 {
            match next(5) {
                // Up to a few hundred waiting, as a loaded peer has.
                0 | 1 if model.len() < 300 => {
                    seq += 1;
                    slots.push(seq, step);
                    model.insert(seq, step);
                }
                2 => {
                    // In the first half one old request is stuck and the rest answered in any
                    // order (empty slots pile up behind it); then mostly the oldest.
                    let key = match model.keys().next() {
                        Some(first) if step >= 25_000 && next(3) > 0 => *first,
                        _ => seq.saturating_sub(next(400)),
                    };
                    assert_eq!(slots.remove(key), model.remove(&key));
                }
                _ => {
                    let key = seq.saturating_sub(next(400));
                    if let Some(v) = slots.get_mut(key) {
                        *v += 1;
                    }
                    if let Some(v) = model.get_mut(&key) {
                        *v += 1;
                    }
                }
            }
            assert_eq!(slots.len(), model.len());
            assert_eq!(slots.first_key(), model.keys().next().copied());
            assert!(slots.slots.len() <= 2 * slots.len() + SLACK_SLOTS);
        }
        assert!(slots.iter().map(|(k, v)| (*k, *v)).eq(model.clone()));
        assert!(slots.into_values().eq(model));
    }

    /// After a burst, a deque that is nearly empty again gives its memory back.
    #[test]
    fn a_burst_leaves_no_memory_behind() {
        let mut seq_map = SeqMap::default();
        let mut slots = SeqSlots::default();
        for seq in 1..=10_000 {
            seq_map.insert(seq, seq);
            slots.push(seq, seq);
        }
        for seq in 1..=9_990 {
            seq_map.pop_first();
            slots.remove(seq);
        }
        assert!(
            seq_map.0.capacity() <= 4 * MIN_KEPT_CAPACITY,
            "{}",
            seq_map.0.capacity()
        );
        assert!(
            slots.slots.capacity() <= 4 * MIN_KEPT_CAPACITY,
            "{}",
            slots.slots.capacity()
        );
        // Cleared (a session's responses dropped under memory pressure): nothing kept.
        for seq in 10_000..20_000 {
            seq_map.insert(seq, seq);
        }
        seq_map.clear();
        assert_eq!(seq_map.0.capacity(), 0);
    }
}
