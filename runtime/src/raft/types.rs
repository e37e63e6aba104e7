//! The vocabulary of the engine: peer ids, terms, indices, log entries, persisted state.

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::membership::Membership;

/// A Raft term. Term 0 exists only before the first election.
pub type Term = u64;

/// A position in the replicated log. Index 0 is the empty prefix (genesis); real entries start at 1.
pub type LogIndex = u64;

/// The identity of one peer. Cheap to clone (a shared string), ordered, and serialized as a plain string.
///
/// ```
/// use hamok_runtime::raft::PeerId;
/// let a = PeerId::from("peer-a");
/// assert_eq!(a.as_str(), "peer-a");
/// assert!(PeerId::from("a") < PeerId::from("b"));
/// ```
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct PeerId(Arc<str>);

/// Most peer ids a thread keeps for decoding (see [`PeerId::interned`]): a cluster has a handful of
/// peers, and each process start of one is one more client, so a few slots hit nearly always while the
/// cache stays small (at most 8 ids of at most [`MAX_INTERNED_ID_BYTES`] each, per thread).
const INTERNED_PEER_IDS: usize = 8;

/// The longest id the cache keeps: a garbage frame's id, however long, must not stay behind it.
const MAX_INTERNED_ID_BYTES: usize = 256;

thread_local! {
    /// The ids this thread decoded last, most recent first.
    static RECENT_PEER_IDS: std::cell::RefCell<Vec<PeerId>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

impl PeerId {
    /// Wraps a string as a peer id.
    pub fn new(id: impl Into<Arc<str>>) -> Self {
        PeerId(id.into())
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The id `s`, shared with an equal id this thread decoded lately. Every frame and every log
    /// command carries peer ids, and a decoded `Arc<str>` costs two allocations (serde builds a
    /// `String`, then the `Arc` copies it): this costs none on a hit.
    fn interned(s: &str) -> PeerId {
        if s.len() > MAX_INTERNED_ID_BYTES {
            return PeerId::from(s);
        }
        RECENT_PEER_IDS.with(|recent| {
            let Ok(mut recent) = recent.try_borrow_mut() else {
                return PeerId::from(s);
            };
            if let Some(at) = recent.iter().position(|id| id.as_str() == s) {
                let id = recent[at].clone();
                // Move to the front: the ids in use stay, a burst of new ones evicts the oldest.
                recent[..=at].rotate_right(1);
                return id;
            }
            let id = PeerId::from(s);
            if recent.len() == INTERNED_PEER_IDS {
                recent.pop();
            }
            recent.insert(0, id.clone());
            id
        })
    }
}

impl<'de> Deserialize<'de> for PeerId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = PeerId;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a peer id (a string)")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<PeerId, E> {
                Ok(PeerId::interned(s))
            }
            fn visit_bytes<E: serde::de::Error>(self, b: &[u8]) -> Result<PeerId, E> {
                // rmp-serde hands a string that is not UTF-8 over as bytes: refused, as before.
                std::str::from_utf8(b)
                    .map(PeerId::interned)
                    .map_err(|_| E::invalid_value(serde::de::Unexpected::Bytes(b), &self))
            }
        }
        deserializer.deserialize_str(Visitor)
    }
}

impl From<&str> for PeerId {
    fn from(s: &str) -> Self {
        PeerId(Arc::from(s))
    }
}

impl From<String> for PeerId {
    fn from(s: String) -> Self {
        PeerId(Arc::from(s))
    }
}

impl fmt::Display for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A buffer lent for decoding (see [`sharing`]), and the copy of it the entries share, made at the
/// first entry.
struct Lent {
    source: Bytes,
    copy: Option<Bytes>,
}

thread_local! {
    /// The buffer this thread is decoding, when its owner lent it (see [`sharing`]).
    static DECODE_SOURCE: std::cell::RefCell<Option<Lent>> =
        const { std::cell::RefCell::new(None) };
}

/// Runs `decode`, a decoding of `source`, with the command payloads it decodes (of log entries, and of
/// the requests a `Submit` forwards, which the leader puts in its log as they are) sharing one copy
/// of `source` instead of each copied out of it: one allocation per frame instead of one per entry,
/// and compaction frees a frame's entries at once. The copy (made at the first
/// entry, so a frame without entries costs nothing) is the frame alone: `source` itself may be a
/// slice of a transport's receive buffer (async-nats reads many messages into one), which entries
/// kept in the log until the next compaction must not hold. Entries decoded otherwise (from a
/// store's files) are copied each, as before; either way the values are the same.
pub(crate) fn sharing<R>(source: &Bytes, decode: impl FnOnce() -> R) -> R {
    /// Puts back what was lent before, even if `decode` unwinds.
    struct Restore(Option<Lent>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let before = self.0.take();
            DECODE_SOURCE.with(|s| *s.borrow_mut() = before);
        }
    }
    let lent = Lent {
        source: source.clone(),
        copy: None,
    };
    let _restore = Restore(DECODE_SOURCE.with(|s| s.borrow_mut().replace(lent)));
    decode()
}

/// A command payload: a slice of the copy of the buffer lent by [`sharing`] when it comes from there,
/// else a copy of its own.
/// Accepts what `Bytes` itself accepts (MessagePack `bin`, and a sequence of bytes).
pub(crate) fn command_bytes<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Bytes, D::Error> {
    struct Visitor;
    impl<'de> serde::de::Visitor<'de> for Visitor {
        type Value = Bytes;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a command (bytes)")
        }
        fn visit_borrowed_bytes<E: serde::de::Error>(self, b: &'de [u8]) -> Result<Bytes, E> {
            let shared = DECODE_SOURCE.with(|s| {
                let mut lent = s.try_borrow_mut().ok()?;
                let lent = lent.as_mut()?;
                let start = lent.source.as_ptr() as usize;
                let at = (b.as_ptr() as usize).checked_sub(start)?;
                if at + b.len() > lent.source.len() {
                    return None;
                }
                let copy = lent
                    .copy
                    .get_or_insert_with(|| Bytes::copy_from_slice(&lent.source));
                Some(copy.slice(at..at + b.len()))
            });
            Ok(shared.unwrap_or_else(|| Bytes::copy_from_slice(b)))
        }
        fn visit_bytes<E: serde::de::Error>(self, b: &[u8]) -> Result<Bytes, E> {
            Ok(Bytes::copy_from_slice(b))
        }
        fn visit_byte_buf<E: serde::de::Error>(self, b: Vec<u8>) -> Result<Bytes, E> {
            Ok(Bytes::from(b))
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Bytes, A::Error> {
            // The hint is the sender's claim: capped, so a forged length cannot reserve memory.
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
            while let Some(byte) = seq.next_element::<u8>()? {
                out.push(byte);
            }
            Ok(Bytes::from(out))
        }
    }
    deserializer.deserialize_bytes(Visitor)
}

/// What a log entry carries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntryPayload {
    /// Appended by every new leader so it can commit an entry of its own term at once.
    Noop,
    /// An opaque command for the state machines above the engine.
    Command(#[serde(deserialize_with = "command_bytes")] Bytes),
    /// A new cluster configuration (the whole membership, not a delta). Takes effect once committed.
    /// Boxed: it is rare, and inline it would make every entry of the log 16 bytes larger.
    Membership(Box<Membership>),
}

impl EntryPayload {
    /// Approximate size in bytes, used to bound batches and the uncommitted tail.
    pub fn size_bytes(&self) -> usize {
        match self {
            EntryPayload::Noop => 0,
            EntryPayload::Command(b) => b.len(),
            EntryPayload::Membership(m) => m.size_bytes(),
        }
    }
}

/// One entry of the replicated log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The term of the leader that created the entry.
    pub term: Term,
    /// The entry's position in the log.
    pub index: LogIndex,
    /// What the entry carries.
    pub payload: EntryPayload,
}

// A peer's log holds up to `snapshot_after_entries` (10,000) of these in a ring buffer of 16,384 slots:
// each byte of an entry costs 16 KiB a peer (72 bytes before the membership was boxed).
const _: () = assert!(std::mem::size_of::<Entry>() <= 56);

/// Bytes of framing counted per entry on top of its payload when sizing batches.
pub(crate) const ENTRY_OVERHEAD_BYTES: usize = 24;

impl Entry {
    /// Approximate encoded size in bytes.
    pub fn size_bytes(&self) -> usize {
        ENTRY_OVERHEAD_BYTES + self.payload.size_bytes()
    }
}

/// The state that must be durable before any message of the same [`Ready`](super::Ready) is sent.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HardState {
    /// The latest term this peer has seen.
    pub term: Term,
    /// The candidate this peer voted for in `term`, if any.
    pub voted_for: Option<PeerId>,
}

/// Describes a snapshot: the log prefix it replaces and the configuration in force at its end.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotMeta {
    /// The last log index the snapshot covers.
    pub last_index: LogIndex,
    /// The term of the entry at `last_index`.
    pub last_term: Term,
    /// The committed membership as of `last_index`.
    pub membership: Membership,
}

/// A snapshot: its metadata and the state machines' bytes, opaque to the engine.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// What the snapshot covers.
    pub meta: SnapshotMeta,
    /// The state machines' serialized state at `meta.last_index`.
    pub data: Bytes,
}

/// Everything a restarted peer needs from durable storage to resume without violating safety.
#[derive(Clone, Debug, Default)]
pub struct PersistedState {
    /// Term and vote.
    pub hard_state: HardState,
    /// The latest snapshot (genesis membership at index 0 for a bootstrapped cluster).
    pub snapshot: Snapshot,
    /// Log entries after `snapshot.meta.last_index`, contiguous.
    pub entries: Vec<Entry>,
    /// The highest index this peer knew committed when it last persisted (0 when not kept). A restarted
    /// peer applies up to it before serving anything, so it never serves older state than before its
    /// restart. Never above the last entry (the engine clamps it).
    pub committed: LogIndex,
}

/// The role a peer plays in its current term.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Role {
    /// Follows a leader (or waits for one). Learners are followers that are not voters.
    Follower,
    /// Asks for pre-votes without changing its term, so a partitioned peer cannot disrupt the cluster.
    PreCandidate,
    /// Asks for votes in a new term.
    Candidate,
    /// Accepts proposals and replicates the log.
    Leader,
}

impl PersistedState {
    /// The state of a brand-new cluster whose first configuration is `membership` (at index 0, term 0).
    pub fn genesis(membership: Membership) -> PersistedState {
        PersistedState {
            hard_state: HardState::default(),
            snapshot: Snapshot {
                meta: SnapshotMeta {
                    last_index: 0,
                    last_term: 0,
                    membership,
                },
                data: Bytes::new(),
            },
            entries: Vec::new(),
            committed: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(id: &str) -> PeerId {
        rmp_serde::from_slice(&rmp_serde::to_vec(id).unwrap()).unwrap()
    }

    #[test]
    fn decoded_peer_ids_are_equal_and_shared_while_recent() {
        let a = decode("peer-a");
        assert_eq!(a, PeerId::from("peer-a"));
        // Decoded again: the same allocation, not a new one.
        assert!(Arc::ptr_eq(&a.0, &decode("peer-a").0));
        // Twice as many other ids as the cache holds: each decodes right, and "peer-a" is evicted
        // (a new allocation, still equal).
        for n in 0..2 * INTERNED_PEER_IDS {
            let id = format!("other-{n}");
            assert_eq!(decode(&id).as_str(), id);
        }
        let again = decode("peer-a");
        assert_eq!(again, a);
        assert!(!Arc::ptr_eq(&a.0, &again.0));
        RECENT_PEER_IDS.with(|r| assert_eq!(r.borrow().len(), INTERNED_PEER_IDS));
        // An id longer than the cache keeps decodes right and is not kept.
        let long = "x".repeat(MAX_INTERNED_ID_BYTES + 1);
        assert_eq!(decode(&long).as_str(), long);
        RECENT_PEER_IDS.with(|r| assert!(r.borrow().iter().all(|id| id.as_str() != long)));
    }

    #[test]
    fn a_peer_id_that_is_not_utf8_is_refused() {
        // A MessagePack str of 2 bytes that are not UTF-8.
        let bad = [0xa2, 0xff, 0xfe];
        assert!(rmp_serde::from_slice::<PeerId>(&bad).is_err());
        assert!(rmp_serde::from_slice::<PeerId>(&rmp_serde::to_vec(&7u32).unwrap()).is_err());
    }
}
