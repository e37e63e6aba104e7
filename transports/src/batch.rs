//! Several frames in one broker message: a broker's cost is per message, so the frames a writer
//! drains at once for the same destination travel together.
//!
//! A body that carries several frames starts with [`BATCH_MARKER`] (`0xc1`, the one byte no
//! MessagePack value starts with), then, per frame, its length (u32, little-endian) and its bytes. A
//! frame alone is its own body, unchanged, unless it starts with the marker itself (an authenticated
//! frame: the runtime's `AUTH_MARKER` is the same byte): such a frame travels as a batch of one, so a
//! body that starts with the marker is always a batch. Sent bare, its tag's first bytes would be read
//! as a length, and a tag that happened to parse would split the frame into pieces. Bodies built from
//! several frames stay under the limit the publisher gives (at most [`MAX_BATCH_BODY_BYTES`]; NATS:
//! also the server's `max_payload`); a frame that would pass it starts the next body.

use bytes::{BufMut, Bytes, BytesMut};

/// The first byte of a body that carries several frames.
pub(crate) const BATCH_MARKER: u8 = 0xc1;
/// The largest body built from several frames (a receiver holds one body at a time per delivery;
/// NATS's default `max_payload` is the same 1 MiB).
pub(crate) const MAX_BATCH_BODY_BYTES: usize = 1 << 20;
/// The default most frames a link's writer takes from its queue at once (and so the most one broker
/// message can carry from one batch).
pub(crate) const DEFAULT_PUBLISH_BATCH: usize = 256;
/// The most frames one body carries: what a receiver splits one delivery into is bounded.
pub(crate) const MAX_BATCH_FRAMES: usize = 1024;

/// One message to publish: its destination, its body, and the frames (and their bytes) it carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Message<A> {
    pub(crate) to: A,
    pub(crate) body: Bytes,
    pub(crate) frames: u64,
    pub(crate) frame_bytes: u64,
}

/// The messages that carry `batch`, in order. Frames to the same destination travel together, in the
/// order they were queued; a frame to `barrier` (the broadcast destination) travels alone and is
/// never moved across, so what one receiver gets from broadcasts and unicasts keeps its order. A body
/// of several frames stays within `max_body_bytes` (capped at [`MAX_BATCH_BODY_BYTES`]); a frame is
/// never split, so one larger than that travels alone.
pub(crate) fn coalesce<A: Clone + PartialEq>(
    batch: &[(A, Bytes)],
    barrier: &A,
    max_body_bytes: usize,
) -> Vec<Message<A>> {
    let max_body_bytes = max_body_bytes.min(MAX_BATCH_BODY_BYTES);
    let mut out = Vec::new();
    // The destinations since the last barrier, in the order of their first frame.
    let mut groups: Vec<(A, Vec<Bytes>)> = Vec::new();
    for (to, frame) in batch {
        if to == barrier {
            flush(&mut groups, &mut out, max_body_bytes);
            out.push(single(to.clone(), frame.clone()));
            continue;
        }
        match groups.iter_mut().find(|(k, _)| k == to) {
            Some((_, frames)) => frames.push(frame.clone()),
            None => groups.push((to.clone(), vec![frame.clone()])),
        }
    }
    flush(&mut groups, &mut out, max_body_bytes);
    out
}

/// The bytes of the body that carries `frame` alone (see the module docs). NATS checks it against
/// the server's `max_payload`; RabbitMQ has no such limit to check.
#[cfg_attr(not(feature = "nats"), allow(dead_code))]
pub(crate) fn alone_len(frame: &[u8]) -> usize {
    if frame.first() == Some(&BATCH_MARKER) {
        frame.len() + 1 + 4
    } else {
        frame.len()
    }
}

fn single<A>(to: A, frame: Bytes) -> Message<A> {
    if frame.first() == Some(&BATCH_MARKER) {
        return batch_body(to, std::slice::from_ref(&frame));
    }
    Message {
        to,
        frame_bytes: frame.len() as u64,
        body: frame,
        frames: 1,
    }
}

fn flush<A: Clone>(
    groups: &mut Vec<(A, Vec<Bytes>)>,
    out: &mut Vec<Message<A>>,
    max_body_bytes: usize,
) {
    for (to, frames) in groups.drain(..) {
        let mut run: Vec<Bytes> = Vec::new();
        let mut run_bytes = 1;
        for frame in frames {
            let grown = run_bytes + 4 + frame.len();
            if !run.is_empty() && (grown > max_body_bytes || run.len() == MAX_BATCH_FRAMES) {
                out.push(body(to.clone(), std::mem::take(&mut run)));
                run_bytes = 1;
            }
            run_bytes += 4 + frame.len();
            run.push(frame);
        }
        if !run.is_empty() {
            out.push(body(to, run));
        }
    }
}

/// The message for `frames` (one or more) to `to`.
fn body<A>(to: A, frames: Vec<Bytes>) -> Message<A> {
    if let [frame] = frames.as_slice() {
        return single(to, frame.clone());
    }
    batch_body(to, &frames)
}

/// `frames` behind the marker, each with its length.
fn batch_body<A>(to: A, frames: &[Bytes]) -> Message<A> {
    let frame_bytes: usize = frames.iter().map(Bytes::len).sum();
    let mut body = BytesMut::with_capacity(1 + 4 * frames.len() + frame_bytes);
    body.put_u8(BATCH_MARKER);
    for frame in frames {
        body.put_u32_le(frame.len() as u32);
        body.put_slice(frame);
    }
    Message {
        to,
        body: body.freeze(),
        frames: frames.len() as u64,
        frame_bytes: frame_bytes as u64,
    }
}

/// The frames a received body carries (slices of it, not copies). A body that does not start with
/// [`BATCH_MARKER`] is one frame. `Err` for a batch that does not parse (lengths past its end, no
/// frame, too many): the caller hands the whole body on, and the receiver's decoder counts it as a
/// malformed frame.
pub(crate) fn split(body: Bytes) -> Result<Vec<Bytes>, Bytes> {
    if body.first() != Some(&BATCH_MARKER) {
        return Ok(vec![body]);
    }
    let mut frames = Vec::new();
    let mut at = 1;
    while at < body.len() {
        let Some(&[a, b, c, d]) = body.get(at..at + 4) else {
            return Err(body);
        };
        let len = u32::from_le_bytes([a, b, c, d]) as usize;
        let start = at + 4;
        if len == 0 || body.len() - start < len || frames.len() == MAX_BATCH_FRAMES {
            return Err(body);
        }
        frames.push(body.slice(start..start + len));
        at = start + len;
    }
    if frames.is_empty() {
        return Err(body);
    }
    Ok(frames)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    fn frames_to(messages: &[Message<&'static str>], to: &str) -> Vec<Bytes> {
        messages
            .iter()
            .filter(|m| m.to == to)
            .flat_map(|m| split(m.body.clone()).unwrap())
            .collect()
    }

    #[test]
    fn frames_to_one_destination_travel_together_in_order() {
        let batch = vec![
            ("b", f("b1")),
            ("c", f("c1")),
            ("b", f("b2")),
            ("c", f("c2")),
            ("b", f("b3")),
        ];
        let out = coalesce(&batch, &"all", MAX_BATCH_BODY_BYTES);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].to, "b");
        assert_eq!(out[0].frames, 3);
        assert_eq!(out[0].body[0], BATCH_MARKER);
        assert_eq!(frames_to(&out, "b"), vec![f("b1"), f("b2"), f("b3")]);
        assert_eq!(frames_to(&out, "c"), vec![f("c1"), f("c2")]);
        assert_eq!(out.iter().map(|m| m.frames).sum::<u64>(), 5);
        assert_eq!(out[1].frame_bytes, 4);
    }

    #[test]
    fn a_frame_alone_is_its_own_body_and_broadcasts_are_barriers() {
        let batch = vec![
            ("b", f("b1")),
            ("all", f("x1")),
            ("b", f("b2")),
            ("b", f("b3")),
        ];
        let out = coalesce(&batch, &"all", MAX_BATCH_BODY_BYTES);
        let order: Vec<(&str, u64)> = out.iter().map(|m| (m.to, m.frames)).collect();
        assert_eq!(order, vec![("b", 1), ("all", 1), ("b", 2)]);
        assert_eq!(out[0].body, f("b1"), "unchanged");
        assert_eq!(out[1].body, f("x1"));
    }

    #[test]
    fn bodies_stay_under_their_bounds() {
        let big = Bytes::from(vec![7u8; MAX_BATCH_BODY_BYTES / 3]);
        let batch: Vec<(&str, Bytes)> = (0..7).map(|_| ("b", big.clone())).collect();
        let out = coalesce(&batch, &"all", MAX_BATCH_BODY_BYTES);
        assert!(out.len() >= 3, "{}", out.len());
        assert!(out.iter().all(|m| m.body.len() <= MAX_BATCH_BODY_BYTES));
        assert_eq!(frames_to(&out, "b").len(), 7);
        let tiny: Vec<(&str, Bytes)> = (0..MAX_BATCH_FRAMES + 5).map(|_| ("b", f("t"))).collect();
        let out = coalesce(&tiny, &"all", MAX_BATCH_BODY_BYTES);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].frames, MAX_BATCH_FRAMES as u64);
        // A frame larger than a batch body travels alone.
        let huge = Bytes::from(vec![1u8; MAX_BATCH_BODY_BYTES + 1]);
        let out = coalesce(
            &[("b", f("s")), ("b", huge.clone())],
            &"all",
            MAX_BATCH_BODY_BYTES,
        );
        assert_eq!(out.len(), 2);
        assert_eq!(out[1].body, huge);
        // A smaller limit (a NATS server's `max_payload`) holds too: 4 frames of 10 bytes per body.
        let small: Vec<(&str, Bytes)> = (0..40).map(|_| ("b", f("0123456789"))).collect();
        let out = coalesce(&small, &"all", 64);
        assert_eq!(out.len(), 10);
        assert!(out.iter().all(|m| m.body.len() <= 64));
        assert_eq!(
            frames_to(&out, "b"),
            small.iter().map(|(_, b)| b.clone()).collect::<Vec<_>>()
        );
    }

    #[test]
    fn damaged_batches_are_handed_on_whole() {
        let good = coalesce(
            &[("b", f("one")), ("b", f("two"))],
            &"all",
            MAX_BATCH_BODY_BYTES,
        )[0]
        .body
        .clone();
        assert_eq!(split(good.clone()).unwrap(), vec![f("one"), f("two")]);
        for bad in [
            good.slice(..good.len() - 1),                       // cut short
            Bytes::from_static(&[BATCH_MARKER]),                // no frame
            Bytes::from_static(&[BATCH_MARKER, 0, 0]),          // a length cut short
            Bytes::from_static(&[BATCH_MARKER, 0, 0, 0, 0]),    // an empty frame
            Bytes::from_static(&[BATCH_MARKER, 9, 0, 0, 0, 1]), // a length past the end
        ] {
            assert_eq!(split(bad.clone()), Err(bad));
        }
        // Anything else is one frame, whatever it holds.
        assert_eq!(split(f("plain")).unwrap(), vec![f("plain")]);
    }

    /// An authenticated frame starts with the marker, and its tag is random: one whose first bytes
    /// read as a length that fits (here 2, then 1 more piece) must still arrive whole and alone,
    /// sent alone, as a broadcast or among others.
    #[test]
    fn a_frame_that_starts_with_the_marker_arrives_whole() {
        let tricky = Bytes::from_static(&[BATCH_MARKER, 2, 0, 0, 0, 0xaa, 0xbb, 1, 0, 0, 0, 0xcc]);
        assert_eq!(
            split(tricky.clone()).unwrap().len(),
            2,
            "bare, it would be cut up"
        );
        assert_eq!(alone_len(&tricky), tricky.len() + 5);
        for batch in [
            vec![("b", tricky.clone())],
            vec![("all", tricky.clone())],
            vec![
                ("b", f("one")),
                ("all", tricky.clone()),
                ("b", tricky.clone()),
            ],
        ] {
            let out = coalesce(&batch, &"all", MAX_BATCH_BODY_BYTES);
            let got: Vec<Bytes> = out
                .iter()
                .flat_map(|m| split(m.body.clone()).unwrap())
                .collect();
            let sent: Vec<Bytes> = batch.iter().map(|(_, b)| b.clone()).collect();
            assert_eq!(got, sent);
            assert!(out
                .iter()
                .all(|m| m.frames == 1 || m.body[0] == BATCH_MARKER));
            let lone = out.iter().find(|m| m.body.ends_with(&tricky)).unwrap();
            assert_eq!(lone.frame_bytes, tricky.len() as u64);
        }
        assert_eq!(alone_len(b"plain"), 5);
    }
}
