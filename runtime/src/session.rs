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

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::raft::LogIndex;
use crate::seq_deque::SeqMap;

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
}
