//! Chunked snapshot transfer: the leader's sending side and a follower's receiving side.

use bytes::Bytes;

use super::types::{LogIndex, Snapshot, SnapshotMeta, Term};

/// The leader's side of one snapshot transfer to one follower.
#[derive(Clone, Debug)]
pub struct SnapshotSender {
    /// The snapshot being sent (identified by last index and term).
    pub last_index: LogIndex,
    /// Its term.
    pub last_term: Term,
    /// Bytes sent so far (the next chunk starts here).
    pub sent_offset: u64,
    /// Bytes the follower confirmed holding.
    pub acked_offset: u64,
    /// Chunks sent and not yet answered. Bounded by `max_inflight_snapshot_chunks`.
    pub inflight_chunks: usize,
    /// When the follower last answered (or the transfer started).
    pub last_ack_ms: u64,
}

impl SnapshotSender {
    /// Starts sending the snapshot ending at (`last_index`, `last_term`).
    pub fn new(last_index: LogIndex, last_term: Term, now_ms: u64) -> Self {
        SnapshotSender {
            last_index,
            last_term,
            sent_offset: 0,
            acked_offset: 0,
            inflight_chunks: 0,
            last_ack_ms: now_ms,
        }
    }

    /// Whether this transfer sends `meta`'s snapshot.
    pub fn is_for(&self, meta: &SnapshotMeta) -> bool {
        self.last_index == meta.last_index && self.last_term == meta.last_term
    }

    /// The next chunk to send, if the window allows and bytes remain: (offset, bytes, is last).
    pub fn next_chunk(
        &mut self,
        data: &Bytes,
        chunk_bytes: usize,
        max_inflight: usize,
    ) -> Option<(u64, Bytes, bool)> {
        let total = data.len() as u64;
        let finished = self.sent_offset >= total && (total > 0 || self.sent_offset > 0);
        if self.inflight_chunks >= max_inflight || finished {
            return None;
        }
        let start = self.sent_offset;
        let end = (start + chunk_bytes as u64).min(total);
        let chunk = data.slice(start as usize..end as usize);
        // An empty snapshot is still sent as one (empty, last) chunk; mark it sent past its end.
        self.sent_offset = if total == 0 { 1 } else { end };
        self.inflight_chunks += 1;
        Some((start, chunk, end >= total))
    }

    /// Records the follower's answer: it holds `next_offset` bytes. Its count is the truth even when it
    /// goes down (the follower restarted, or dropped the transfer): resending from a higher offset than it
    /// holds would be refused forever.
    pub fn on_response(&mut self, next_offset: u64, now_ms: u64) {
        self.inflight_chunks = self.inflight_chunks.saturating_sub(1);
        self.acked_offset = next_offset;
        self.last_ack_ms = now_ms;
    }

    /// Resends from what the follower confirmed (chunks were lost).
    pub fn rewind(&mut self, now_ms: u64) {
        self.sent_offset = self.acked_offset;
        self.inflight_chunks = 0;
        self.last_ack_ms = now_ms;
    }
}

/// What became of a received chunk.
#[derive(Debug)]
pub enum ChunkOutcome {
    /// Stored or refused; the follower now holds this many bytes.
    Partial(u64),
    /// The last chunk arrived: the snapshot is whole.
    Complete(Snapshot),
    /// The snapshot would exceed the size limit; the transfer was dropped.
    TooLarge,
}

/// A follower's side: assembles chunks that arrive in order.
#[derive(Debug)]
pub struct SnapshotReceiver {
    meta: SnapshotMeta,
    buf: Vec<u8>,
}

impl SnapshotReceiver {
    /// Accepts a chunk into `slot` (creating or replacing the transfer as needed). Chunks out of order are
    /// refused with the offset expected, so the leader resends from there.
    pub fn accept(
        slot: &mut Option<SnapshotReceiver>,
        meta: SnapshotMeta,
        offset: u64,
        data: &[u8],
        done: bool,
        max_bytes: u64,
    ) -> ChunkOutcome {
        let same = slot.as_ref().is_some_and(|r| {
            r.meta.last_index == meta.last_index && r.meta.last_term == meta.last_term
        });
        if !same {
            if offset != 0 {
                *slot = None;
                return ChunkOutcome::Partial(0);
            }
            *slot = Some(SnapshotReceiver {
                meta,
                buf: Vec::new(),
            });
        }
        let receiver = slot.as_mut().expect("slot was just filled");
        let held = receiver.buf.len() as u64;
        if offset != held {
            return ChunkOutcome::Partial(held);
        }
        if held + data.len() as u64 > max_bytes {
            *slot = None;
            return ChunkOutcome::TooLarge;
        }
        receiver.buf.extend_from_slice(data);
        if done {
            let receiver = slot.take().expect("slot is filled");
            return ChunkOutcome::Complete(Snapshot {
                meta: receiver.meta,
                data: Bytes::from(receiver.buf),
            });
        }
        ChunkOutcome::Partial(receiver.buf.len() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sender_restarts_from_zero_when_the_receiver_lost_its_chunks() {
        let data = Bytes::from(vec![7u8; 100]);
        let mut sender = SnapshotSender::new(10, 2, 0);
        let offsets: Vec<u64> = std::iter::from_fn(|| sender.next_chunk(&data, 30, 2))
            .map(|(offset, _, _)| offset)
            .collect();
        assert_eq!(offsets, vec![0, 30]);
        sender.on_response(30, 1);
        sender.on_response(60, 2);
        // The receiver restarts and refuses the next chunk: it holds nothing.
        assert_eq!(sender.next_chunk(&data, 30, 2).map(|c| c.0), Some(60));
        sender.on_response(0, 3);
        sender.rewind(3);
        assert_eq!(sender.next_chunk(&data, 30, 2).map(|c| c.0), Some(0));
    }
}
