//! The wire format: every frame is a [`Frame`] encoded with MessagePack (rmp-serde), byte payloads as
//! MessagePack `bin` (serde_bytes / `Bytes`). Every frame carries the protocol version and the cluster id,
//! so frames of another cluster or an incompatible version sharing the bus are recognised and dropped.

use bytes::Bytes;
use hmac::{Hmac, Mac};
use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::raft::{self, PeerId, Term};

/// The version of the wire protocol this build speaks. Frames of any other version are dropped.
/// (4: `Submit` carries a batch of forwarded requests.)
pub const PROTOCOL_VERSION: u16 = 4;

/// Most bytes one [`Forward`] adds to its frame beside its command: its array header, sequence number
/// and the command's `bin` header.
pub const FORWARD_ENVELOPE_BYTES: usize = 16;

/// One frame on the bus.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Frame {
    /// [`PROTOCOL_VERSION`] of the sender.
    pub version: u16,
    /// The cluster the frame belongs to.
    pub cluster: String,
    /// Which founding of `cluster` the sender belongs to: a random id drawn by the peer that founded it,
    /// kept by every member with its log; 0 for a peer that has joined no cluster yet. A peer drops the
    /// frames of another incarnation (counted in `dropped_foreign_incarnation`): a durable peer whose
    /// directory outlived its cluster must not mix its log into a cluster founded since under the same id.
    pub incarnation: u64,
    /// The sending peer.
    pub from: PeerId,
    /// The receiving peer; `None` for a broadcast.
    pub to: Option<PeerId>,
    /// What the frame says.
    pub body: HamokMessage,
}

/// What peers say to each other.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum HamokMessage {
    /// A Raft protocol message.
    Raft(raft::Message),
    /// Discovery: a peer announces itself (broadcast) or answers an announcement (unicast).
    Hello(Hello),
    /// Asks the leader to add the sender to the cluster (as a learner, then a voter).
    JoinRequest {
        /// The sender never campaigns and stays a non-voting learner.
        only_follower: bool,
    },
    /// Asks the leader to remove the sender from the cluster.
    LeaveRequest,
    /// The sender has left the cluster and stops (broadcast).
    Goodbye,
    /// From the leader to a peer that asked to leave: it is in neither the committed nor the latest
    /// configuration any more.
    Removed,
    /// Writes forwarded by the peer that received them to the leader; the sender is their client.
    /// A peer gathers the forwards it made while handling a burst of input and sends them in one
    /// frame, in the order it made them.
    Submit {
        /// The forwarded requests (at least one).
        requests: Vec<Forward>,
    },
    /// The receiver of a `Submit` is not the leader; retry at `leader`.
    SubmitRedirect {
        /// The refused requests.
        seqs: Vec<u64>,
        /// The leader, if known.
        leader: Option<PeerId>,
    },
    /// An application-level message between peers (used by collections, e.g. the emitter), not ordered by
    /// the log.
    Direct {
        /// The collection or feature it is for.
        channel: String,
        /// Its payload.
        payload: Bytes,
    },
}

/// One write of a [`HamokMessage::Submit`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Forward {
    /// The client's sequence number of this request.
    pub seq: u64,
    /// The encoded command (decoded by a peer as a slice of one copy of its frame, as log entries
    /// are: see `raft::sharing`).
    #[serde(deserialize_with = "raft::command_bytes")]
    pub command: Bytes,
}

/// A discovery announcement.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The sender is a voter or learner of a cluster.
    pub member: bool,
    /// The leader the sender knows of.
    pub leader: Option<PeerId>,
    /// The sender's term.
    pub term: Term,
    /// The sender is looking for a cluster to join.
    pub joining: bool,
    /// The answer expected: a broadcast hello asks every member to reply.
    pub reply: bool,
    /// The sender may lead (it is not `only_follower`): only such peers may found a cluster.
    pub can_lead: bool,
}

/// First byte of an authenticated frame. `0xC1` is never valid MessagePack, so a peer without a key
/// drops authenticated frames as malformed instead of half-understanding them.
pub const AUTH_MARKER: u8 = 0xC1;

/// Length of the authentication tag (HMAC-SHA256).
pub const AUTH_TAG_BYTES: usize = 32;

/// A cluster's shared frame key. An authenticated frame is `AUTH_MARKER || tag || msgpack frame`, the tag
/// being HMAC-SHA256 of the msgpack bytes under the key.
#[derive(Clone)]
pub struct FrameKey {
    mac: Hmac<Sha256>,
}

impl FrameKey {
    /// A key from a shared secret.
    pub fn new(secret: &[u8]) -> Self {
        FrameKey {
            mac: <Hmac<Sha256> as Mac>::new_from_slice(secret)
                .expect("HMAC takes keys of any length"),
        }
    }

    fn tag(&self, body: &[u8]) -> [u8; AUTH_TAG_BYTES] {
        let mut mac = self.mac.clone();
        mac.update(body);
        mac.finalize().into_bytes().into()
    }

    fn verify(&self, body: &[u8], tag: &[u8]) -> bool {
        let mut mac = self.mac.clone();
        mac.update(body);
        mac.verify_slice(tag).is_ok() // constant time
    }
}

impl std::fmt::Debug for FrameKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FrameKey(..)")
    }
}

/// Why a received frame was dropped.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Not a frame at all (garbage, truncated, wrong types).
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// Larger than the configured limit.
    #[error("frame of {0} bytes exceeds the limit")]
    TooLarge(usize),
    /// A frame of this cluster in another protocol version: a peer of another build of hamok, whose
    /// frames this one cannot read (nor it this one's). A peer that hears one does not found a
    /// cluster (see `discovery.rs`, the bootstrap rule).
    #[error("protocol version {0} (this build speaks {PROTOCOL_VERSION})")]
    Version(u16),
    /// A frame of another cluster (of any protocol version).
    #[error("frame of cluster `{0}`")]
    ForeignCluster(String),
    /// A unicast frame for another peer (a misrouting transport).
    #[error("frame addressed to another peer")]
    NotForUs,
    /// Authentication is on and the frame has no valid tag.
    #[error("frame not authenticated by the cluster key")]
    Unauthenticated,
}

/// The header of a frame, decoded without its body: classifies frames whose body does not decode.
#[derive(Deserialize)]
struct FrameHeader {
    version: u16,
    cluster: String,
    #[allow(dead_code)]
    incarnation: IgnoredAny,
    #[allow(dead_code)]
    from: IgnoredAny,
    #[allow(dead_code)]
    to: IgnoredAny,
    #[allow(dead_code)]
    body: IgnoredAny,
}

impl HamokMessage {
    /// Approximate encoded size in bytes: sizes the encode buffer once instead of growing it (growth
    /// copies showed up at ~10 % of a throughput profile).
    pub fn size_hint(&self) -> usize {
        match self {
            HamokMessage::Raft(m) => m.size_bytes(),
            HamokMessage::Submit { requests } => requests
                .iter()
                .map(|r| r.command.len() + FORWARD_ENVELOPE_BYTES)
                .sum::<usize>()
                .saturating_add(16),
            HamokMessage::Direct { channel, payload } => channel.len() + payload.len() + 16,
            _ => 64,
        }
    }
}

impl Frame {
    /// Approximate encoded size in bytes (see [`HamokMessage::size_hint`]).
    pub fn size_hint(&self) -> usize {
        self.body.size_hint()
            + self.cluster.len()
            + self.from.as_str().len()
            + self.to.as_ref().map_or(0, |p| p.as_str().len())
            + 16
    }
}

/// Encodes a frame (unauthenticated).
pub fn encode(frame: &Frame) -> Result<Bytes, rmp_serde::encode::Error> {
    let mut out = Vec::with_capacity(frame.size_hint());
    rmp_serde::encode::write(&mut out, frame)?;
    Ok(Bytes::from(out))
}

/// Encodes a frame, authenticated when `key` is given.
pub fn encode_with(
    frame: &Frame,
    key: Option<&FrameKey>,
) -> Result<Bytes, rmp_serde::encode::Error> {
    let Some(key) = key else {
        return encode(frame);
    };
    // Marker and a tag placeholder first, the body after it, then the tag over the body: one buffer.
    let header = 1 + AUTH_TAG_BYTES;
    let mut out = Vec::with_capacity(header + frame.size_hint());
    out.push(AUTH_MARKER);
    out.resize(header, 0);
    rmp_serde::encode::write(&mut out, frame)?;
    let tag = key.tag(&out[header..]);
    out[1..header].copy_from_slice(&tag);
    Ok(Bytes::from(out))
}

/// [`decode`], requiring a valid tag under `key` when one is given.
pub fn decode_with(
    bytes: &[u8],
    cluster: &str,
    local: &PeerId,
    max_frame_bytes: usize,
    key: Option<&FrameKey>,
) -> Result<Frame, DecodeError> {
    let Some(key) = key else {
        return decode(bytes, cluster, local, max_frame_bytes);
    };
    if bytes.len() > max_frame_bytes {
        return Err(DecodeError::TooLarge(bytes.len()));
    }
    if bytes.len() < 1 + AUTH_TAG_BYTES || bytes[0] != AUTH_MARKER {
        return Err(DecodeError::Unauthenticated);
    }
    let (tag, body) = bytes[1..].split_at(AUTH_TAG_BYTES);
    if !key.verify(body, tag) {
        return Err(DecodeError::Unauthenticated);
    }
    decode(body, cluster, local, max_frame_bytes)
}

/// [`decode_with`] of a frame held as [`Bytes`]: the command payloads of the log entries it carries
/// are slices of one copy of `bytes` (made at the first entry) instead of a copy each: one
/// allocation per frame instead of one per entry. `bytes` itself is not held, so a transport may hand
/// over slices of its receive buffer.
pub fn decode_shared(
    bytes: &Bytes,
    cluster: &str,
    local: &PeerId,
    max_frame_bytes: usize,
    key: Option<&FrameKey>,
) -> Result<Frame, DecodeError> {
    raft::sharing(bytes, || {
        decode_with(bytes, cluster, local, max_frame_bytes, key)
    })
}

/// Decodes a frame and checks it is for `cluster`, this version and (if unicast) `local`.
/// Never panics, whatever the bytes.
pub fn decode(
    bytes: &[u8],
    cluster: &str,
    local: &PeerId,
    max_frame_bytes: usize,
) -> Result<Frame, DecodeError> {
    if bytes.len() > max_frame_bytes {
        return Err(DecodeError::TooLarge(bytes.len()));
    }
    let frame: Frame = match rmp_serde::from_slice(bytes) {
        Ok(frame) => frame,
        Err(e) => {
            // Tell a frame of another version or cluster (whose body we may not understand) from garbage.
            // Another cluster's first, whatever its version: only this cluster's peers speaking
            // another version are news (see `DecodeError::Version`).
            return Err(match rmp_serde::from_slice::<FrameHeader>(bytes) {
                Ok(h) if h.cluster != cluster => DecodeError::ForeignCluster(h.cluster),
                Ok(h) if h.version != PROTOCOL_VERSION => DecodeError::Version(h.version),
                _ => DecodeError::Malformed(e.to_string()),
            });
        }
    };
    if frame.cluster != cluster {
        return Err(DecodeError::ForeignCluster(frame.cluster));
    }
    if frame.version != PROTOCOL_VERSION {
        return Err(DecodeError::Version(frame.version));
    }
    if frame.to.as_ref().is_some_and(|to| to != local) {
        return Err(DecodeError::NotForUs);
    }
    if let HamokMessage::Raft(m) = &frame.body {
        // The envelope and the Raft message must agree on who is talking to whom.
        if m.from != frame.from || &m.to != local {
            return Err(DecodeError::Malformed(
                "raft message sender or receiver mismatch".into(),
            ));
        }
    }
    Ok(frame)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::{Entry, EntryPayload, Message, MessageBody};

    fn frame(body: HamokMessage) -> Frame {
        Frame {
            version: PROTOCOL_VERSION,
            cluster: "c1".into(),
            incarnation: 7,
            from: PeerId::from("a"),
            to: Some(PeerId::from("b")),
            body,
        }
    }

    fn append() -> HamokMessage {
        append_of(&[Bytes::from_static(b"hello")])
    }

    /// An append of one entry per payload, from index 2 on.
    fn append_of(payloads: &[Bytes]) -> HamokMessage {
        let entries: Vec<Entry> = (2..)
            .zip(payloads)
            .map(|(index, p)| Entry {
                term: 3,
                index,
                payload: EntryPayload::Command(p.clone()),
            })
            .collect();
        HamokMessage::Raft(Message {
            from: PeerId::from("a"),
            to: PeerId::from("b"),
            term: 3,
            body: MessageBody::AppendEntries {
                prev_log_index: 1,
                prev_log_term: 1,
                committed_once_held: entries.last().map_or(0, |e| e.index),
                entries,
                leader_commit: 1,
            },
        })
    }

    #[test]
    fn round_trip() {
        let forwards = HamokMessage::Submit {
            requests: vec![
                Forward {
                    seq: 7,
                    command: Bytes::from_static(b"one"),
                },
                Forward {
                    seq: u64::MAX,
                    command: Bytes::from(vec![9u8; 300]),
                },
            ],
        };
        let redirect = HamokMessage::SubmitRedirect {
            seqs: vec![7, u64::MAX],
            leader: Some(PeerId::from("c")),
        };
        for body in [append(), forwards, redirect] {
            let f = frame(body);
            let bytes = encode(&f).unwrap();
            assert!(bytes.len() <= f.size_hint() + 64, "the size hint is close");
            assert_eq!(
                decode(&bytes, "c1", &PeerId::from("b"), 1 << 20).unwrap(),
                f
            );
        }
    }

    /// The command payloads of a frame decoded from `Bytes` (of an append's entries, of the requests a
    /// `Submit` forwards) are slices of one copy of the frame: laid out as in the frame, but not in
    /// it, so the buffer the frame came in (a transport's receive buffer, here a larger one the frame
    /// is a slice of) is not held by them. The values are those of a plain decode.
    #[test]
    fn commands_decoded_from_shared_bytes_share_one_copy_of_the_frame() {
        fn payloads(f: &Frame) -> Vec<Bytes> {
            match &f.body {
                HamokMessage::Submit { requests } => {
                    requests.iter().map(|r| r.command.clone()).collect()
                }
                HamokMessage::Raft(Message {
                    body: MessageBody::AppendEntries { entries, .. },
                    ..
                }) => entries
                    .iter()
                    .map(|e| match &e.payload {
                        EntryPayload::Command(b) => b.clone(),
                        other => panic!("not a command: {other:?}"),
                    })
                    .collect(),
                other => panic!("not an append: {other:?}"),
            }
        }
        let (first, second) = (Bytes::from(vec![1u8; 40]), Bytes::from(vec![2u8; 40]));
        let forwards = HamokMessage::Submit {
            requests: vec![
                Forward {
                    seq: 1,
                    command: first.clone(),
                },
                Forward {
                    seq: 2,
                    command: second.clone(),
                },
            ],
        };
        let b = PeerId::from("b");
        let key = FrameKey::new(b"secret");
        let frames = [
            frame(append_of(&[first.clone(), second.clone()])),
            frame(forwards),
        ];
        for (f, signing) in frames.iter().flat_map(|f| [(f, None), (f, Some(&key))]) {
            let encoded = encode_with(f, signing).unwrap();
            let find = |p: &Bytes| encoded.windows(p.len()).position(|w| w == &p[..]).unwrap();
            let gap_in_frame = find(&second) - find(&first);
            // The frame as a transport hands it over: a slice of a larger receive buffer.
            let mut buffer = vec![0u8; 1 << 16];
            buffer[100..100 + encoded.len()].copy_from_slice(&encoded);
            let buffer = Bytes::from(buffer);
            let bytes = buffer.slice(100..100 + encoded.len());

            let shared = decode_shared(&bytes, "c1", &b, 1 << 20, signing).unwrap();
            assert_eq!(
                shared,
                decode_with(&bytes, "c1", &b, 1 << 20, signing).unwrap()
            );
            assert_eq!(&shared, f);
            let p = payloads(&shared);
            let (start, end) = (
                buffer.as_ptr() as usize,
                buffer.as_ptr() as usize + buffer.len(),
            );
            assert!(
                p.iter()
                    .all(|p| (p.as_ptr() as usize) < start || (p.as_ptr() as usize) >= end),
                "an entry points into the receive buffer"
            );
            assert_eq!(
                p[1].as_ptr() as usize - p[0].as_ptr() as usize,
                gap_in_frame,
                "the entries are not slices of one copy of the frame"
            );
            drop(bytes);
            assert!(
                buffer.is_unique(),
                "something decoded holds the receive buffer"
            );
        }
    }

    #[test]
    fn payload_bytes_are_msgpack_bin() {
        // serde_bytes / Bytes encode as `bin` (0xc4..), not as an array of integers.
        let f = frame(HamokMessage::Direct {
            channel: "x".into(),
            payload: Bytes::from(vec![7u8; 100]),
        });
        let bytes = encode(&f).unwrap();
        assert!(bytes.len() < 140, "{} bytes", bytes.len());
    }

    #[test]
    fn foreign_cluster_and_version_are_classified() {
        let mut f = frame(append());
        f.cluster = "other".into();
        let bytes = encode(&f).unwrap();
        assert_eq!(
            decode(&bytes, "c1", &PeerId::from("b"), 1 << 20),
            Err(DecodeError::ForeignCluster("other".into()))
        );
        let mut f = frame(append());
        f.version = 99;
        let bytes = encode(&f).unwrap();
        assert_eq!(
            decode(&bytes, "c1", &PeerId::from("b"), 1 << 20),
            Err(DecodeError::Version(99))
        );
        // Another cluster on another version is another cluster's traffic (a shared bus), not news.
        f.cluster = "other".into();
        let bytes = encode(&f).unwrap();
        assert_eq!(
            decode(&bytes, "c1", &PeerId::from("b"), 1 << 20),
            Err(DecodeError::ForeignCluster("other".into()))
        );
    }

    #[test]
    fn future_version_with_unknown_body_is_a_version_drop() {
        #[derive(Serialize)]
        enum FutureBody {
            Quantum { qubits: u32 },
        }
        #[derive(Serialize)]
        struct FutureFrame {
            version: u16,
            cluster: String,
            incarnation: u64,
            from: PeerId,
            to: Option<PeerId>,
            body: FutureBody,
        }
        let bytes = rmp_serde::to_vec(&FutureFrame {
            version: PROTOCOL_VERSION + 1,
            cluster: "c1".into(),
            incarnation: 1,
            from: PeerId::from("a"),
            to: None,
            body: FutureBody::Quantum { qubits: 5 },
        })
        .unwrap();
        assert_eq!(
            decode(&bytes, "c1", &PeerId::from("b"), 1 << 20),
            Err(DecodeError::Version(PROTOCOL_VERSION + 1))
        );
        // Read from the header alone, another cluster's future frame is still another cluster's.
        assert_eq!(
            decode(&bytes, "c2", &PeerId::from("b"), 1 << 20),
            Err(DecodeError::ForeignCluster("c1".into()))
        );
    }

    #[test]
    fn garbage_never_panics() {
        let mut rng = crate::raft::SeededRng::new(42);
        let good = encode(&frame(append())).unwrap();
        for i in 0..20_000 {
            let bytes: Vec<u8> = if i % 2 == 0 {
                let len = rng.range(0, 64) as usize;
                (0..len).map(|_| rng.next_u64() as u8).collect()
            } else {
                // Truncated or bit-flipped valid frames.
                let mut b = good.to_vec();
                let cut = rng.range(0, b.len() as u64) as usize;
                b.truncate(cut.max(1));
                let flip = rng.range(0, b.len() as u64) as usize;
                b[flip] ^= 1 << rng.range(0, 8);
                b
            };
            let _ = decode(&bytes, "c1", &PeerId::from("b"), 1 << 20);
        }
    }

    #[test]
    fn authenticated_frames_need_the_key() {
        let f = frame(append());
        let key = FrameKey::new(b"sixteen-byte-key!");
        let other = FrameKey::new(b"another-key-entirely");
        let b = PeerId::from("b");
        let signed = encode_with(&f, Some(&key)).unwrap();
        assert_eq!(
            decode_with(&signed, "c1", &b, 1 << 20, Some(&key)).unwrap(),
            f
        );
        // Wrong key, no key on a keyed peer, tampering, and a keyless peer reading a keyed frame.
        assert_eq!(
            decode_with(&signed, "c1", &b, 1 << 20, Some(&other)),
            Err(DecodeError::Unauthenticated)
        );
        let plain = encode(&f).unwrap();
        assert_eq!(
            decode_with(&plain, "c1", &b, 1 << 20, Some(&key)),
            Err(DecodeError::Unauthenticated)
        );
        let mut tampered = signed.to_vec();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert_eq!(
            decode_with(&tampered, "c1", &b, 1 << 20, Some(&key)),
            Err(DecodeError::Unauthenticated)
        );
        assert!(matches!(
            decode_with(&signed, "c1", &b, 1 << 20, None),
            Err(DecodeError::Malformed(_))
        ));
    }

    #[test]
    fn oversized_and_misaddressed_frames_are_dropped() {
        let bytes = encode(&frame(append())).unwrap();
        assert_eq!(
            decode(&bytes, "c1", &PeerId::from("b"), 8),
            Err(DecodeError::TooLarge(bytes.len()))
        );
        assert_eq!(
            decode(&bytes, "c1", &PeerId::from("z"), 1 << 20),
            Err(DecodeError::NotForUs)
        );
    }
}
