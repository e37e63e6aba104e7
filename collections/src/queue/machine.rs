//! The state machine of a queue: its replicated state, its commands, and how each changes the state.
//!
//! The queue's items are, in order: the **returned** items (given back by a `nack`, an expired lease or
//! a holder's removal, most recently returned first, each with its delivery count), then the pushed
//! items. Taken items are **leased** (by delivery id, to the taking peer) until acknowledged; items
//! returned too often are **dead letters**. Every part is replicated and in the snapshot.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use bytes::Bytes;
use hamok_runtime::raft::{LogIndex, PeerId};
use hamok_runtime::state_machine::ApplyContext;
use hamok_runtime::HamokError;
use serde::{Deserialize, Serialize};

use super::lease::QueueExtra;
use super::{QUEUE_FULL, QUEUE_KIND};
use crate::common::{encode, write_lock, Raw};
use crate::machine::{Core, Logic, Machine};

/// Most items one `take`, `pop` or `ack` command handles: one command is one log entry and one apply,
/// which must stay short (the node applies nothing else meanwhile).
pub const MAX_BATCH: u32 = 1024;

/// Longest lease a `take` or `extend` may ask for (a day): an item never returns before its lease ends,
/// so a mistaken huge lease would strand it.
pub const MAX_LEASE_MS: u64 = 24 * 60 * 60 * 1000;

/// Refuses a lease outside 1 ms to [`MAX_LEASE_MS`] (checked by the handle before sending, and by the
/// state machine for commands from anywhere).
pub(crate) fn check_lease(lease_ms: u64) -> Result<(), HamokError> {
    if lease_ms == 0 || lease_ms > MAX_LEASE_MS {
        return Err(HamokError::Rejected(format!(
            "a lease must be between 1 and {MAX_LEASE_MS} ms, not {lease_ms}"
        )));
    }
    Ok(())
}

/// Refuses more than [`MAX_BATCH`] `what` in one command.
pub(crate) fn check_batch(len: usize, what: &str) -> Result<(), HamokError> {
    if len > MAX_BATCH as usize {
        return Err(HamokError::Rejected(format!(
            "at most {MAX_BATCH} {what} per command, not {len}"
        )));
    }
    Ok(())
}

/// An item with how many times it was delivered.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Counted {
    pub(crate) value: Bytes,
    pub(crate) deliveries: u32,
}

/// A taken, unacknowledged item.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Lease {
    pub(crate) value: Bytes,
    /// How many times the item was delivered, this delivery included.
    pub(crate) deliveries: u32,
    /// The peer that took it.
    pub(crate) holder: PeerId,
    /// The lease's length, as last asked for (take or extend).
    pub(crate) lease_ms: u64,
    /// How many times the lease was extended (a timer names it when it asks for expiry).
    pub(crate) renewals: u32,
}

/// The replicated content of a queue. Fields after `capacity` default when absent, so a snapshot of an
/// earlier version (items and capacity only) still restores.
#[derive(Default, Serialize, Deserialize)]
pub(crate) struct QueueState {
    pub(crate) items: VecDeque<Bytes>,
    pub(crate) capacity: Option<u64>,
    /// Items given back, served before `items` (the front is the head).
    #[serde(default)]
    pub(crate) returned: VecDeque<Counted>,
    /// Taken, unacknowledged items by delivery id.
    #[serde(default)]
    pub(crate) leased: BTreeMap<u64, Lease>,
    /// The next delivery id.
    #[serde(default)]
    pub(crate) next_delivery: u64,
    /// After this many deliveries, an item that comes back becomes a dead letter.
    #[serde(default)]
    pub(crate) max_deliveries: Option<u32>,
    /// Items delivered `max_deliveries` times and not acknowledged, oldest first.
    #[serde(default)]
    pub(crate) dead: VecDeque<Counted>,
    /// The cluster's members (empty: not known yet); a non-member cannot take.
    #[serde(default)]
    pub(crate) members: BTreeSet<PeerId>,
}

impl QueueState {
    /// Visible items: returned, then pushed.
    pub(crate) fn visible_len(&self) -> usize {
        self.returned.len() + self.items.len()
    }

    /// The visible items in order, with their delivery counts.
    pub(crate) fn visible(&self) -> impl Iterator<Item = (&Bytes, u32)> {
        self.returned
            .iter()
            .map(|c| (&c.value, c.deliveries))
            .chain(self.items.iter().map(|v| (v, 0)))
    }

    /// Everything the capacity counts: visible, leased and dead.
    fn held(&self) -> u64 {
        (self.visible_len() + self.leased.len() + self.dead.len()) as u64
    }

    fn pop_front(&mut self) -> Option<Counted> {
        match self.returned.pop_front() {
            Some(c) => Some(c),
            None => self.items.pop_front().map(|value| Counted {
                value,
                deliveries: 0,
            }),
        }
    }
}

/// One delivery as a `take` answers it: (delivery id, value, deliveries so far including this one).
pub(crate) type Taken = (u64, Bytes, u32);

/// How a lease ended without an ack: where its item went.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// Back to the head of the queue.
    Returned,
    /// To the dead letters.
    DeadLettered,
}

#[derive(Serialize, Deserialize)]
pub(crate) enum QueueCmd {
    Push(Vec<Bytes>),
    Pop(u32),
    Clear,
    SetCapacity(Option<u64>),
    /// Takes up to `n` items under a lease of `lease_ms`, for the submitting peer.
    Take {
        n: u32,
        lease_ms: u64,
    },
    /// Acknowledges deliveries: answers, per id, whether it was held (and is now removed).
    Ack(Vec<u64>),
    /// Gives a delivery back: answers where it went, or `None` if it was not held.
    Nack(u64),
    /// Extends a held delivery's lease to `lease_ms` from now: answers whether it was held.
    Extend {
        id: u64,
        lease_ms: u64,
    },
    /// A lease timer asks to end delivery `id` whose lease ran out at renewal `renewals` (a later
    /// extension or an ack makes it do nothing).
    Expire {
        id: u64,
        renewals: u32,
    },
    SetMaxDeliveries(Option<u32>),
    /// Takes up to `n` dead letters (removes them).
    PopDead(u32),
}

/// A queue event's raw key: what tells the typed decoder which event an `Insert` or `Remove` is.
/// Pushes and pops have an empty key.
#[derive(Serialize, Deserialize)]
pub(crate) enum Tag {
    /// An `Insert` of an item given back, with its delivery count.
    Returned(u32),
    /// A `Remove` of an item that became a dead letter, with its delivery count.
    DeadLettered(u32),
}

/// What is particular to a queue's state machine ([`Machine`]`<QueueLogic>`).
#[derive(Default)]
pub(crate) struct QueueLogic;

/// The state machine of a queue.
pub(crate) type QueueMachine = Machine<QueueLogic>;

/// Builds events only when somebody listens.
struct Emit {
    listening: bool,
    events: Vec<Raw>,
}

impl Emit {
    fn push(&mut self, raw: impl FnOnce() -> Raw) {
        if self.listening {
            self.events.push(raw());
        }
    }

    fn tagged(&mut self, tag: Tag, value: &Bytes, insert: bool) {
        if self.listening {
            let key = encode(&tag).unwrap_or_default();
            let value = value.clone();
            self.events.push(if insert {
                Raw::Insert { key, value }
            } else {
                Raw::Remove { key, value }
            });
        }
    }
}

/// Ends lease `id` without an ack: its item goes back to the head, or to the dead letters once it was
/// delivered `max_deliveries` times. Answers where it went, `None` if `id` is not leased.
fn end_lease(state: &mut QueueState, id: u64, emit: &mut Emit) -> Option<Outcome> {
    let lease = state.leased.remove(&id)?;
    let item = Counted {
        value: lease.value,
        deliveries: lease.deliveries,
    };
    if state
        .max_deliveries
        .is_some_and(|max| item.deliveries >= max)
    {
        emit.tagged(Tag::DeadLettered(item.deliveries), &item.value, false);
        state.dead.push_back(item);
        Some(Outcome::DeadLettered)
    } else {
        let was_empty = state.visible_len() == 0;
        emit.tagged(Tag::Returned(item.deliveries), &item.value, true);
        state.returned.push_front(item);
        if was_empty {
            emit.push(|| Raw::NotEmpty);
        }
        Some(Outcome::Returned)
    }
}

/// The events of items leaving the visible queue (a pop or a take).
fn removed(emit: &mut Emit, values: &[&Bytes], now_empty: bool) {
    for v in values {
        emit.push(|| Raw::Remove {
            key: Bytes::new(),
            value: (*v).clone(),
        });
    }
    if !values.is_empty() && now_empty {
        emit.push(|| Raw::Empty);
    }
}

impl Logic for QueueLogic {
    type State = QueueState;
    type Extra = QueueExtra;
    type Command = QueueCmd;

    fn kind(&self) -> &str {
        QUEUE_KIND
    }

    fn exec(
        &self,
        core: &Core<QueueState, QueueExtra>,
        ctx: &ApplyContext,
        cmd: QueueCmd,
    ) -> Result<Bytes, HamokError> {
        let mut emit = Emit {
            listening: core.listening(),
            events: Vec::new(),
        };
        let response = {
            let mut guard = write_lock(&core.state);
            let state = &mut *guard;
            match cmd {
                QueueCmd::Push(values) => {
                    let after = state.held() + values.len() as u64;
                    if state.capacity.is_some_and(|cap| after > cap) {
                        return Err(HamokError::Busy(QUEUE_FULL));
                    }
                    let was_empty = state.visible_len() == 0;
                    for v in values {
                        emit.push(|| Raw::Insert {
                            key: Bytes::new(),
                            value: v.clone(),
                        });
                        state.items.push_back(v);
                    }
                    if was_empty && state.visible_len() > 0 {
                        emit.push(|| Raw::NotEmpty);
                    }
                    encode(&(state.visible_len() as u64))
                }
                QueueCmd::Pop(n) => {
                    let n = (n.min(MAX_BATCH) as usize).min(state.visible_len());
                    let popped: Vec<Bytes> = (0..n)
                        .filter_map(|_| state.pop_front().map(|c| c.value))
                        .collect();
                    removed(
                        &mut emit,
                        &popped.iter().collect::<Vec<_>>(),
                        state.visible_len() == 0,
                    );
                    encode(&popped)
                }
                QueueCmd::Clear => {
                    let n = state.visible_len() as u64 + state.dead.len() as u64;
                    let had_visible = state.visible_len() > 0;
                    state.items.clear();
                    state.returned.clear();
                    state.dead.clear();
                    emit.push(|| Raw::Clear);
                    if had_visible {
                        emit.push(|| Raw::Empty);
                    }
                    encode(&n)
                }
                QueueCmd::SetCapacity(capacity) => {
                    state.capacity = capacity;
                    encode(&())
                }
                QueueCmd::Take { n, lease_ms } => {
                    check_lease(lease_ms)?;
                    if !state.members.is_empty() && !state.members.contains(&ctx.client) {
                        return Err(HamokError::Rejected(format!(
                            "`{}` is not a member: it cannot hold a lease",
                            ctx.client
                        )));
                    }
                    let n = (n.min(MAX_BATCH) as usize).min(state.visible_len());
                    let mut taken: Vec<Taken> = Vec::with_capacity(n);
                    for _ in 0..n {
                        let Some(item) = state.pop_front() else { break };
                        let id = state.next_delivery;
                        state.next_delivery += 1;
                        let deliveries = item.deliveries.saturating_add(1);
                        taken.push((id, item.value.clone(), deliveries));
                        state.leased.insert(
                            id,
                            Lease {
                                value: item.value,
                                deliveries,
                                holder: ctx.client.clone(),
                                lease_ms,
                                renewals: 0,
                            },
                        );
                    }
                    removed(
                        &mut emit,
                        &taken.iter().map(|t| &t.1).collect::<Vec<_>>(),
                        state.visible_len() == 0,
                    );
                    encode(&taken)
                }
                QueueCmd::Ack(ids) => {
                    check_batch(ids.len(), "acks")?;
                    let acked: Vec<bool> = ids
                        .iter()
                        .map(|id| state.leased.remove(id).is_some())
                        .collect();
                    encode(&acked)
                }
                QueueCmd::Nack(id) => encode(&end_lease(state, id, &mut emit)),
                QueueCmd::Extend { id, lease_ms } => {
                    check_lease(lease_ms)?;
                    let held = match state.leased.get_mut(&id) {
                        Some(lease) => {
                            lease.lease_ms = lease_ms;
                            lease.renewals = lease.renewals.wrapping_add(1);
                            true
                        }
                        None => false,
                    };
                    encode(&held)
                }
                QueueCmd::Expire { id, renewals } => {
                    let current = state
                        .leased
                        .get(&id)
                        .is_some_and(|l| l.renewals == renewals);
                    let outcome = if current {
                        end_lease(state, id, &mut emit)
                    } else {
                        None
                    };
                    encode(&outcome)
                }
                QueueCmd::SetMaxDeliveries(max) => {
                    if max == Some(0) {
                        return Err(HamokError::Rejected(
                            "max_deliveries must be at least 1".into(),
                        ));
                    }
                    state.max_deliveries = max;
                    encode(&())
                }
                QueueCmd::PopDead(n) => {
                    let n = (n.min(MAX_BATCH) as usize).min(state.dead.len());
                    let dead: Vec<(Bytes, u32)> = state
                        .dead
                        .drain(..n)
                        .map(|c| (c.value, c.deliveries))
                        .collect();
                    encode(&dead)
                }
            }
        };
        core.emit(emit.events);
        response
    }

    fn on_members(
        &self,
        core: &Core<QueueState, QueueExtra>,
        _index: LogIndex,
        members: &BTreeSet<PeerId>,
    ) {
        if members.is_empty() {
            // Not known yet (see `StateMachine::on_members`).
            return;
        }
        let mut emit = Emit {
            listening: core.listening(),
            events: Vec::new(),
        };
        {
            let mut guard = write_lock(&core.state);
            let state = &mut *guard;
            state.members = members.clone();
            // A lease lasts while its holder is a member: the entry that removes the holder gives its
            // items back, in that entry's log order.
            let gone: Vec<u64> = state
                .leased
                .iter()
                .filter(|(_, l)| !members.contains(&l.holder))
                .map(|(id, _)| *id)
                .collect();
            for id in gone {
                end_lease(state, id, &mut emit);
            }
        }
        core.emit(emit.events);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::{decode, Envelope};
    use hamok_runtime::state_machine::StateMachine;

    fn ctx(index: u64, client: &str) -> ApplyContext {
        ApplyContext {
            index,
            term: 1,
            client: client.into(),
            local: true,
        }
    }

    fn run<R: serde::de::DeserializeOwned>(
        m: &mut QueueMachine,
        index: u64,
        client: &str,
        cmd: QueueCmd,
    ) -> Result<R, HamokError> {
        let bytes = encode(&Envelope::Op(cmd)).unwrap();
        m.apply(&ctx(index, client), &bytes)
            .and_then(|b| decode(&b))
    }

    fn values(m: &QueueMachine) -> Vec<(Bytes, u32)> {
        let s = crate::common::read_lock(&m.core().state);
        s.visible().map(|(v, d)| (v.clone(), d)).collect()
    }

    #[test]
    fn take_ack_nack_expire_and_dead_letters() {
        let mut m = QueueMachine::default();
        let b = |s: &'static str| Bytes::from_static(s.as_bytes());
        let _: u64 = run(&mut m, 1, "a", QueueCmd::Push(vec![b("x"), b("y"), b("z")])).unwrap();
        let _: () = run(&mut m, 2, "a", QueueCmd::SetMaxDeliveries(Some(2))).unwrap();

        // Take two: leased to `a`, delivery ids 0 and 1, first delivery.
        let taken: Vec<Taken> = run(
            &mut m,
            3,
            "a",
            QueueCmd::Take {
                n: 2,
                lease_ms: 1000,
            },
        )
        .unwrap();
        assert_eq!(taken, vec![(0, b("x"), 1), (1, b("y"), 1)]);
        assert_eq!(values(&m), vec![(b("z"), 0)]);

        // Ack 0 once: the second ack of the same delivery answers false.
        let acked: Vec<bool> = run(&mut m, 4, "a", QueueCmd::Ack(vec![0, 0, 7])).unwrap();
        assert_eq!(acked, vec![true, false, false]);

        // Nack 1: back to the head with its count.
        let out: Option<Outcome> = run(&mut m, 5, "a", QueueCmd::Nack(1)).unwrap();
        assert_eq!(out, Some(Outcome::Returned));
        assert_eq!(values(&m), vec![(b("y"), 1), (b("z"), 0)]);

        // Take y again (second delivery), extend it, then an expiry naming the old renewal does
        // nothing and one naming the current renewal dead-letters it (2 deliveries = max).
        let taken: Vec<Taken> = run(
            &mut m,
            6,
            "b",
            QueueCmd::Take {
                n: 1,
                lease_ms: 1000,
            },
        )
        .unwrap();
        assert_eq!(taken, vec![(2, b("y"), 2)]);
        assert!(run::<bool>(
            &mut m,
            7,
            "b",
            QueueCmd::Extend {
                id: 2,
                lease_ms: 50
            }
        )
        .unwrap());
        let stale: Option<Outcome> =
            run(&mut m, 8, "c", QueueCmd::Expire { id: 2, renewals: 0 }).unwrap();
        assert_eq!(stale, None);
        let out: Option<Outcome> =
            run(&mut m, 9, "c", QueueCmd::Expire { id: 2, renewals: 1 }).unwrap();
        assert_eq!(out, Some(Outcome::DeadLettered));
        // The expired delivery can no longer be acknowledged.
        assert_eq!(
            run::<Vec<bool>>(&mut m, 10, "b", QueueCmd::Ack(vec![2])).unwrap(),
            vec![false]
        );
        let dead: Vec<(Bytes, u32)> = run(&mut m, 11, "a", QueueCmd::PopDead(10)).unwrap();
        assert_eq!(dead, vec![(b("y"), 2)]);

        // Bad leases are refused and change nothing.
        assert!(run::<Vec<Taken>>(&mut m, 12, "a", QueueCmd::Take { n: 1, lease_ms: 0 }).is_err());
        assert_eq!(values(&m), vec![(b("z"), 0)]);
    }

    #[test]
    fn removal_of_the_holder_returns_its_leases_and_non_members_cannot_take() {
        let mut m = QueueMachine::default();
        let b = |s: &'static str| Bytes::from_static(s.as_bytes());
        let members = |ps: &[&str]| ps.iter().map(|p| PeerId::from(*p)).collect::<BTreeSet<_>>();
        m.on_members(1, &members(&["a", "b"]));
        let _: u64 = run(&mut m, 2, "a", QueueCmd::Push(vec![b("x"), b("y")])).unwrap();
        let _: Vec<Taken> = run(
            &mut m,
            3,
            "a",
            QueueCmd::Take {
                n: 1,
                lease_ms: 60_000,
            },
        )
        .unwrap();
        let _: Vec<Taken> = run(
            &mut m,
            4,
            "b",
            QueueCmd::Take {
                n: 1,
                lease_ms: 60_000,
            },
        )
        .unwrap();
        m.on_members(5, &members(&["b"]));
        // a's item came back; b's stays leased.
        assert_eq!(values(&m), vec![(b("x"), 1)]);
        assert_eq!(crate::common::read_lock(&m.core().state).leased.len(), 1);
        let refused = run::<Vec<Taken>>(&mut m, 6, "a", QueueCmd::Take { n: 1, lease_ms: 10 });
        assert!(matches!(refused, Err(HamokError::Rejected(_))));
    }

    #[test]
    fn a_snapshot_of_the_earlier_layout_restores() {
        // The layout before acknowledged delivery: (initialized, (items, capacity)).
        let old = encode(&(true, (vec![Bytes::from_static(b"\x01")], Some(5u64)))).unwrap();
        let mut m = QueueMachine::default();
        m.restore(&old).unwrap();
        let s = crate::common::read_lock(&m.core().state);
        assert_eq!(s.items.len(), 1);
        assert_eq!(s.capacity, Some(5));
        assert!(s.leased.is_empty() && s.returned.is_empty());
    }
}
