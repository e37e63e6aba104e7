//! What the hub did with the frames: [`HubStats`] and the live counters behind it.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use bytes::Bytes;

use crate::transport::Inbound;

/// What an [`InProcessHub`](super::InProcessHub) did with the frames sent through it (see
/// [`InProcessHub::stats`](super::InProcessHub::stats)).
///
/// A broadcast counts once per target. `dropped` is the total of the frames that reached no peer, for
/// any reason; the other `dropped`-like fields break it down.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HubStats {
    /// Frames (duplicates included) accepted by a target's [`Inbound`].
    pub delivered: u64,
    /// Frames that reached no peer, for any reason (the sum of `unroutable`, `blocked`, `lost`,
    /// `saturated` and `overflow`).
    pub dropped: u64,
    /// Extra copies made by the duplicate rate.
    pub duplicated: u64,
    /// Frames (copies included) scheduled for delayed delivery.
    pub delayed: u64,
    /// Dropped because the target was not connected (at send time or, for a delayed frame, at delivery
    /// time).
    pub unroutable: u64,
    /// Dropped by a partition, an isolation or a one-way block.
    pub blocked: u64,
    /// Dropped at random by the drop rate.
    pub lost: u64,
    /// Dropped because the target's [`Inbound`] was saturated (also counted by [`Inbound::dropped`]).
    pub saturated: u64,
    /// Dropped because [`MAX_DELAYED_IN_FLIGHT`](super::MAX_DELAYED_IN_FLIGHT) delayed frames were already waiting, because no Tokio
    /// runtime was available to deliver a delayed frame, or because the runtime shut down first.
    pub overflow: u64,
}

/// The live counters behind [`HubStats`], shared by the hub, its links and its delay queue.
#[derive(Debug, Default)]
pub(super) struct Counters {
    pub(super) delivered: AtomicU64,
    pub(super) duplicated: AtomicU64,
    pub(super) delayed: AtomicU64,
    pub(super) unroutable: AtomicU64,
    pub(super) blocked: AtomicU64,
    pub(super) lost: AtomicU64,
    pub(super) saturated: AtomicU64,
    pub(super) overflow: AtomicU64,
    /// Delayed frames waiting right now (bounded by `MAX_DELAYED_IN_FLIGHT`); not a statistic.
    pub(super) delayed_in_flight: AtomicUsize,
}

/// Adds one to `counter`.
pub(super) fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

impl Counters {
    /// The counters now, with `dropped` summed.
    pub(super) fn snapshot(&self) -> HubStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut s = HubStats {
            delivered: get(&self.delivered),
            dropped: 0,
            duplicated: get(&self.duplicated),
            delayed: get(&self.delayed),
            unroutable: get(&self.unroutable),
            blocked: get(&self.blocked),
            lost: get(&self.lost),
            saturated: get(&self.saturated),
            overflow: get(&self.overflow),
        };
        s.dropped = s.unroutable + s.blocked + s.lost + s.saturated + s.overflow;
        s
    }

    /// Hands `frame` to `inbound`, counting the outcome.
    pub(super) fn deliver(&self, inbound: &Inbound, frame: Bytes) {
        if inbound.deliver(frame) {
            bump(&self.delivered);
        } else {
            bump(&self.saturated);
        }
    }
}
