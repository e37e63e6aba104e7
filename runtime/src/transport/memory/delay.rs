//! The hub's delay queue: frames given a delay wait in a heap ordered by `(due time, send order)` and
//! a task of the hub delivers them when due, checking their route again at that moment.
//!
//! The task's `select!` is biased: a fixed branch order keeps runs on a paused clock reproducible.

use std::cmp::Ordering as CmpOrdering;
use std::collections::BinaryHeap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::time::{sleep_until, Duration, Instant};

use super::stats::{bump, Counters};
use super::{lock, HubInner, State};
use crate::raft::PeerId;

/// At most this many delayed frames wait in a hub at once; beyond it, frames are dropped and counted
/// in [`HubStats::overflow`](super::HubStats::overflow).
pub const MAX_DELAYED_IN_FLIGHT: usize = 100_000;

/// A frame waiting in the delay queue.
struct Delayed {
    due: Instant,
    seq: u64,
    cluster: Arc<str>,
    from: PeerId,
    to: PeerId,
    frame: Bytes,
    slot: DelaySlot,
}

impl PartialEq for Delayed {
    fn eq(&self, other: &Self) -> bool {
        (self.due, self.seq) == (other.due, other.seq)
    }
}
impl Eq for Delayed {}
impl PartialOrd for Delayed {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}
impl Ord for Delayed {
    /// Reversed, so that `BinaryHeap` (a max-heap) pops the earliest `(due, seq)` first.
    fn cmp(&self, other: &Self) -> CmpOrdering {
        (other.due, other.seq).cmp(&(self.due, self.seq))
    }
}

/// One of the [`MAX_DELAYED_IN_FLIGHT`] slots; released (and, if the frame was never handled, counted
/// as overflow) when the delayed frame is dropped.
struct DelaySlot {
    counters: Arc<Counters>,
    handled: bool,
}

impl Drop for DelaySlot {
    fn drop(&mut self) {
        self.counters
            .delayed_in_flight
            .fetch_sub(1, Ordering::AcqRel);
        if !self.handled {
            bump(&self.counters.overflow);
        }
    }
}

/// The sending side of the hub's delay-queue task (spawned lazily on the first delayed frame, and again
/// if the runtime it ran on has gone).
#[derive(Default)]
pub(super) struct DelayQueue {
    tx: Option<mpsc::UnboundedSender<Delayed>>,
    seq: u64,
}

impl HubInner {
    /// Queues a frame for delivery in `ms` milliseconds.
    pub(super) fn schedule(
        self: &Arc<Self>,
        cluster: &Arc<str>,
        from: &PeerId,
        to: &PeerId,
        frame: Bytes,
        ms: u64,
    ) {
        let counters = &self.counters;
        if counters.delayed_in_flight.fetch_add(1, Ordering::AcqRel) >= MAX_DELAYED_IN_FLIGHT {
            counters.delayed_in_flight.fetch_sub(1, Ordering::AcqRel);
            bump(&counters.overflow);
            return;
        }
        bump(&counters.delayed);
        let slot = DelaySlot {
            counters: counters.clone(),
            handled: false,
        };
        let mut queue = lock(&self.delay);
        queue.seq += 1;
        let mut item = Delayed {
            due: Instant::now() + Duration::from_millis(ms),
            seq: queue.seq,
            cluster: cluster.clone(),
            from: from.clone(),
            to: to.clone(),
            frame,
            slot,
        };
        if let Some(tx) = &queue.tx {
            match tx.send(item) {
                Ok(()) => return,
                // The task died with its runtime: start another one below.
                Err(mpsc::error::SendError(back)) => item = back,
            }
        }
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            queue.tx = None;
            // Dropping `item` releases its slot and counts it as overflow.
            tracing::debug!("in-process hub: no Tokio runtime for a delayed frame; dropped");
            return;
        };
        let (tx, rx) = mpsc::unbounded_channel();
        // Cannot fail: `rx` is alive.
        let _ = tx.send(item);
        queue.tx = Some(tx);
        handle.spawn(run_delay_queue(Arc::downgrade(self), rx));
    }

    /// Delivers a delayed frame that is due, if its route is still open.
    fn deliver_delayed(&self, state: &State, mut item: Delayed) {
        item.slot.handled = true;
        let Some(target) = state.target(&item.cluster, &item.to) else {
            bump(&self.counters.unroutable);
            return;
        };
        if !state.faults.can_reach(&item.from, &item.to) {
            bump(&self.counters.blocked);
            return;
        }
        self.counters.deliver(&target.inbound, item.frame.clone());
    }
}

/// The delay-queue task: delivers delayed frames in `(due, send order)` order. Ends when the hub is gone.
async fn run_delay_queue(hub: Weak<HubInner>, mut rx: mpsc::UnboundedReceiver<Delayed>) {
    let mut heap: BinaryHeap<Delayed> = BinaryHeap::new();
    loop {
        // Deliver everything due before waiting again, so a flood of new frames cannot starve the timer.
        let now = Instant::now();
        if heap.peek().is_some_and(|d| d.due <= now) {
            let Some(hub) = hub.upgrade() else { return };
            let state = hub.snapshot();
            while heap.peek().is_some_and(|d| d.due <= now) {
                if let Some(item) = heap.pop() {
                    hub.deliver_delayed(&state, item);
                }
            }
        }
        let next_due = heap.peek().map(|d| d.due);
        // Biased: a fixed branch order keeps runs on a paused clock reproducible.
        tokio::select! {
            biased;
            item = rx.recv() => match item {
                Some(item) => {
                    heap.push(item);
                    while let Ok(item) = rx.try_recv() {
                        heap.push(item);
                    }
                }
                // The hub is gone: frames still waiting are dropped (and counted).
                None => return,
            },
            _ = sleep_until(next_due.unwrap_or(now)), if next_due.is_some() => {}
        }
    }
}
