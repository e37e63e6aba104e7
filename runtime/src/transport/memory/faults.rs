//! The hub's faults: what is configured (`Faults`, set through the fault controls of `InProcessHub`)
//! and what it decides for each frame (`Faults::can_reach`, `Faults::draw`, `HubInner::route`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use bytes::Bytes;

use super::stats::bump;
use super::{lock, HubInner, InProcessHub, Registered, State};
use crate::raft::{PeerId, SeededRng};

/// The configured faults. Connectivity faults are keyed by peer id and apply in every cluster.
#[derive(Clone, Debug, Default)]
pub(super) struct Faults {
    /// Peer -> group index; `None` when no partition is in force.
    partition: Option<BTreeMap<PeerId, usize>>,
    isolated: BTreeSet<PeerId>,
    /// `(from, to)` pairs that cannot talk in that direction.
    blocked: BTreeSet<(PeerId, PeerId)>,
    drop_rate: f64,
    duplicate_rate: f64,
    /// `(min, max)` delay in milliseconds; `None` for immediate delivery.
    delay_ms: Option<(u64, u64)>,
}

/// What the random faults decided for one frame on its way to one target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Draw {
    /// Dropped by the drop rate.
    Lost,
    /// Delivered, twice if `duplicated`: each copy at once (`None`) or after its delay in milliseconds.
    Deliver {
        duplicated: bool,
        delays: [Option<u64>; 2],
    },
}

impl Faults {
    /// Whether no fault at all is configured (the hub's fast path).
    pub(super) fn is_clean(&self) -> bool {
        self.partition.is_none()
            && self.isolated.is_empty()
            && self.blocked.is_empty()
            && self.drop_rate <= 0.0
            && self.duplicate_rate <= 0.0
            && self.delay_ms.is_none()
    }

    /// Whether a frame from `from` may reach `to` right now.
    pub(super) fn can_reach(&self, from: &PeerId, to: &PeerId) -> bool {
        if from == to {
            return true;
        }
        if self.isolated.contains(from) || self.isolated.contains(to) {
            return false;
        }
        if let Some(groups) = &self.partition {
            match (groups.get(from), groups.get(to)) {
                (Some(a), Some(b)) if a == b => {}
                _ => return false,
            }
        }
        !self.blocked.contains(&(from.clone(), to.clone()))
    }

    /// Draws loss, duplication and delays for one frame. The draws, and their order, are part of what
    /// makes a seeded run replay: loss first (if a drop rate is set), then duplication (if not lost and
    /// a duplicate rate is set), then one delay per copy (if a delay is set).
    pub(super) fn draw(&self, rng: &mut SeededRng) -> Draw {
        if self.drop_rate > 0.0 && rng.chance(self.drop_rate) {
            return Draw::Lost;
        }
        let duplicated = self.duplicate_rate > 0.0 && rng.chance(self.duplicate_rate);
        let mut delays = [None, None];
        if let Some((min, max)) = self.delay_ms {
            delays[0] = Some(rng.range(min, max.saturating_add(1)));
            if duplicated {
                delays[1] = Some(rng.range(min, max.saturating_add(1)));
            }
        }
        Draw::Deliver { duplicated, delays }
    }
}

impl HubInner {
    /// Changes the configured faults (copy on write, like every change of the hub's state).
    fn update_faults(&self, f: impl FnOnce(&mut Faults)) {
        self.update(|s| f(&mut s.faults));
    }

    /// Routes one frame from `from` to the registered `target` through the configured faults.
    pub(super) fn route(
        self: &Arc<Self>,
        state: &State,
        cluster: &Arc<str>,
        from: &PeerId,
        to: &PeerId,
        target: &Registered,
        frame: Bytes,
    ) {
        if state.clean {
            self.counters.deliver(&target.inbound, frame);
            return;
        }
        let faults = &state.faults;
        if !faults.can_reach(from, to) {
            bump(&self.counters.blocked);
            return;
        }
        let draw = faults.draw(&mut lock(&self.rng));
        let Draw::Deliver { duplicated, delays } = draw else {
            bump(&self.counters.lost);
            return;
        };
        let copies = if duplicated {
            bump(&self.counters.duplicated);
            2
        } else {
            1
        };
        for delay in delays.into_iter().take(copies) {
            match delay {
                None => self.counters.deliver(&target.inbound, frame.clone()),
                Some(ms) => self.schedule(cluster, from, to, frame.clone(), ms),
            }
        }
    }
}

/// The fault controls.
impl InProcessHub {
    /// Splits the network: peers in different groups cannot talk to each other, in either direction.
    /// **Peers listed in no group are isolated from everyone** (a partition describes the whole
    /// network). Replaces any previous partition; isolations and one-way blocks stay in force.
    pub fn partition(&self, groups: &[&[PeerId]]) {
        let map: BTreeMap<PeerId, usize> = groups
            .iter()
            .enumerate()
            .flat_map(|(i, group)| group.iter().map(move |p| (p.clone(), i)))
            .collect();
        self.inner.update_faults(|f| f.partition = Some(map));
    }

    /// Cuts `peer` off from every other peer, both ways, until [`heal`](Self::heal).
    pub fn isolate(&self, peer: &PeerId) {
        self.inner.update_faults(|f| {
            f.isolated.insert(peer.clone());
        });
    }

    /// Blocks frames from `from` to `to` (one way: `to` still reaches `from`) until
    /// [`heal`](Self::heal) or [`unblock`](Self::unblock).
    pub fn block(&self, from: &PeerId, to: &PeerId) {
        self.inner.update_faults(|f| {
            f.blocked.insert((from.clone(), to.clone()));
        });
    }

    /// Lifts a one-way block set by [`block`](Self::block).
    pub fn unblock(&self, from: &PeerId, to: &PeerId) {
        self.inner.update_faults(|f| {
            f.blocked.remove(&(from.clone(), to.clone()));
        });
    }

    /// Restores full connectivity: lifts the partition, every isolation and every one-way block. Loss,
    /// duplication and delay stay as configured (see [`clear_faults`](Self::clear_faults)).
    pub fn heal(&self) {
        self.inner.update_faults(|f| {
            f.partition = None;
            f.isolated.clear();
            f.blocked.clear();
        });
    }

    /// Lifts every fault: connectivity ([`heal`](Self::heal)), loss, duplication and delay.
    pub fn clear_faults(&self) {
        self.inner.update_faults(|f| *f = Faults::default());
    }

    /// Drops each frame (per target) with probability `rate`, clamped to `[0, 1]`; 0 disables.
    pub fn set_drop_rate(&self, rate: f64) {
        let rate = sanitize_rate(rate);
        self.inner.update_faults(|f| f.drop_rate = rate);
    }

    /// Delivers each frame (per target) twice with probability `rate`, clamped to `[0, 1]`; 0 disables.
    pub fn set_duplicate_rate(&self, rate: f64) {
        let rate = sanitize_rate(rate);
        self.inner.update_faults(|f| f.duplicate_rate = rate);
    }

    /// Delays each frame (per target) by a uniformly random whole number of milliseconds in
    /// `[min, max]` (the bounds are swapped if reversed); `(0, 0)` restores immediate delivery.
    ///
    /// Delayed frames are delivered by a task of the hub (spawned on the current Tokio runtime) in the
    /// order of their due time, then of sending; so different delays reorder frames, equal delays
    /// never do. At most [`MAX_DELAYED_IN_FLIGHT`](super::MAX_DELAYED_IN_FLIGHT) frames wait at once; more are dropped and counted.
    pub fn set_delay_ms(&self, min: u64, max: u64) {
        let (min, max) = if min <= max { (min, max) } else { (max, min) };
        let delay = if max == 0 { None } else { Some((min, max)) };
        self.inner.update_faults(|f| f.delay_ms = delay);
    }
}

/// A probability from user input: NaN is 0, anything else clamped to `[0, 1]`.
fn sanitize_rate(rate: f64) -> f64 {
    if rate.is_nan() {
        0.0
    } else {
        rate.clamp(0.0, 1.0)
    }
}
