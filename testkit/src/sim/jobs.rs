//! Acknowledged delivery in the whole-peer simulation: the queue [`JOBS`], what its producers and
//! consumers saw through the public API (pushes, takes, acks, nacks, extensions, with the checker's
//! clock at call and return), the final state read from every replica, and the checks over them.
//!
//! The promise checked is the queue's, as a consumer sees it: an item is acknowledged (an ack answering
//! `true`) at most once in all; it is delivered again only if no earlier holder acknowledged it, each
//! delivery counting one more than the last; a lease is not ended under its holder before its
//! deadline unless the holder left the cluster; and no acknowledged push is lost: at the end it was
//! acknowledged, or an ack of it may have taken effect, or it is still in the queue (visible, leased
//! or a dead letter), and every replica holds the same queue.
//!
//! [`check`] is a pure function of the recorded history, so it is tested on hand-made histories
//! (below) as well as run on every seed.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use hamok_runtime::HamokError;

/// The queue the consumers take from.
pub const JOBS: &str = "jobs";

/// Shortest lease a consumer asks for (ms).
pub const MIN_LEASE_MS: u64 = 150;
/// Longest lease a consumer asks for (ms).
pub const MAX_LEASE_MS: u64 = 500;

/// How the simulated consumers of [`JOBS`] consume.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Consumer {
    /// `take`/`take_many` under a lease, then ack (most), nack, ack late, extend, or abandon.
    #[default]
    Take,
    /// A wrong client, to show the checks catch one: `pop` (at most once) and then abandon the item
    /// as if a lease would bring it back. Acknowledged pushes get lost.
    PopAndAbandon,
}

/// How a call ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    /// Done, and answered yes: a push acknowledged, an ack `true`, a nack that gave the item back, an
    /// extension of a held lease.
    Yes,
    /// Done, and answered no: the delivery was no longer held (ack `false`, nack `None`, extend
    /// `false`).
    No,
    /// Failed in a way that may have taken effect.
    Unknown,
    /// Failed without taking effect.
    Failed,
}

impl Answer {
    /// The answer of a failed call.
    pub fn of_error(e: &HamokError) -> Answer {
        if e.may_have_taken_effect() {
            Answer::Unknown
        } else {
            Answer::Failed
        }
    }

    /// The answer of a call that answers whether the delivery was held.
    pub fn of<T>(r: &Result<T, HamokError>, yes: impl FnOnce(&T) -> bool) -> Answer {
        match r {
            Ok(v) if yes(v) => Answer::Yes,
            Ok(_) => Answer::No,
            Err(e) => Answer::of_error(e),
        }
    }
}

/// One push call to [`JOBS`] (one log entry, one or more values).
#[derive(Clone, Debug)]
pub struct JobPush {
    pub values: Vec<u64>,
    pub answer: Answer,
}

/// One delivery a consumer got from `take`/`take_many`.
#[derive(Clone, Debug)]
pub struct Taken {
    pub value: u64,
    /// The delivery id.
    pub id: u64,
    /// The delivery count the take answered.
    pub deliveries: u32,
    /// The peer that took it (the lease's holder).
    pub holder: String,
    pub client: usize,
    /// The checker's clock at the take's call and return.
    pub call: u64,
    pub ret: u64,
    /// Simulated ms at the take's call and return.
    pub call_ms: u64,
    pub ret_ms: u64,
    /// `Delivery::deadline`, in simulated ms.
    pub deadline_ms: u64,
}

/// What a settling call did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SettleKind {
    Ack,
    Nack,
    /// An extension to a lease of this many ms from the call.
    Extend {
        lease_ms: u64,
    },
}

/// One ack, nack or extend of one delivery (an `ack_many` gives one per delivery, with the same
/// stamps).
#[derive(Clone, Debug)]
pub struct Settle {
    pub kind: SettleKind,
    pub value: u64,
    /// The delivery id.
    pub id: u64,
    pub client: usize,
    pub call: u64,
    pub ret: u64,
    pub call_ms: u64,
    pub ret_ms: u64,
    pub answer: Answer,
}

/// Everything the run recorded about [`JOBS`].
#[derive(Clone, Debug, Default)]
pub struct JobsLog {
    pub pushes: Vec<JobPush>,
    pub taken: Vec<Taken>,
    pub settles: Vec<Settle>,
    /// When a peer stopped being a member, as any peer saw it (a leader's silence flag, a member
    /// removed or left, the peer's own leave or `Rejoining`): the entry that removes a holder gives its
    /// leases back, before their deadline.
    pub removals: Vec<(String, u64)>,
    /// Takes that failed in a way that may have taken effect (their items stay leased until expiry).
    pub takes_unknown: usize,
    /// Deliveries the consumer dropped on purpose (the lease must bring them back).
    pub abandoned: usize,
    /// Items popped by a [`Consumer::PopAndAbandon`] consumer.
    pub popped: usize,
}

/// [`JOBS`] as one replica holds it at the end.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Replica {
    /// The visible items, head first.
    pub visible: Vec<u64>,
    /// How many items are leased.
    pub in_flight: usize,
    /// The dead letters.
    pub dead: Vec<u64>,
}

/// [`JOBS`] at the end, on every replica that could be read, after waiting for leases to run out.
#[derive(Clone, Debug, Default)]
pub struct FinalJobs {
    pub replicas: Vec<(String, Replica)>,
    /// Leases still held on some replica when the wait for them to run out ended.
    pub leases_left: bool,
    /// How long the wait lasted (simulated ms).
    pub waited_ms: u64,
}

/// A broken check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    pub check: &'static str,
    pub detail: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.check, self.detail)
    }
}

/// An item acknowledged (`true`) more than once.
pub const ACK_ONCE: &str = "ack at most once";
/// A delivery of an item after an ack of it answered `true`.
pub const NO_DELIVERY_AFTER_ACK: &str = "no delivery after ack";
/// Delivery ids or counts of one item out of order.
pub const COUNTS_INCREASE: &str = "delivery counts increase";
/// A delivery found not held before its deadline, its holder still a member.
pub const LEASE_HONOURED: &str = "lease honoured";
/// An acknowledged push neither acknowledged nor in the queue at the end.
pub const NOTHING_LOST: &str = "no acknowledged job lost";
/// An item in the queue twice, back after its ack, never pushed, or more leases than items.
pub const HELD_ONCE: &str = "job held once";
/// Replicas that disagree on the final queue.
pub const REPLICAS_AGREE: &str = "jobs replicas agree";
/// Leases still held after every lease had time to run out.
pub const LEASES_EXPIRE: &str = "leases expire";

/// Checks the history, and the final state when there is one (there is none when the peers did not
/// converge). `removal_slack_ms`: how long after an answer the removal of the holder that explains it
/// may be noted.
pub fn check(log: &JobsLog, fin: Option<&FinalJobs>, removal_slack_ms: u64) -> Vec<Finding> {
    let mut found = Vec::new();
    let mut fail = |check: &'static str, detail: String| found.push(Finding { check, detail });

    // Deliveries by item, in delivery-id order (the log order of the takes).
    let mut by_item: BTreeMap<u64, Vec<&Taken>> = BTreeMap::new();
    for t in &log.taken {
        by_item.entry(t.value).or_default().push(t);
    }
    for ts in by_item.values_mut() {
        ts.sort_by_key(|t| t.id);
    }
    let mut by_id: BTreeMap<u64, &Taken> = BTreeMap::new();
    for t in &log.taken {
        if let Some(other) = by_id.insert(t.id, t) {
            fail(
                COUNTS_INCREASE,
                format!(
                    "delivery id {} was answered twice: item {} (client {}, count {}) and item {} (client {}, count {})",
                    t.id, other.value, other.client, other.deliveries, t.value, t.client, t.deliveries
                ),
            );
        }
    }
    let acks_true: Vec<&Settle> = log
        .settles
        .iter()
        .filter(|s| s.kind == SettleKind::Ack && s.answer == Answer::Yes)
        .collect();

    // (a) At most one `true` per item.
    let mut true_by_item: BTreeMap<u64, Vec<&Settle>> = BTreeMap::new();
    for s in &acks_true {
        true_by_item.entry(s.value).or_default().push(s);
    }
    for (v, acks) in &true_by_item {
        if acks.len() > 1 {
            let list: Vec<String> = acks
                .iter()
                .map(|s| {
                    format!(
                        "delivery {} by client {} at {} ms",
                        s.id, s.client, s.ret_ms
                    )
                })
                .collect();
            fail(
                ACK_ONCE,
                format!(
                    "item {v} was acknowledged true {} times: {}",
                    acks.len(),
                    list.join(", ")
                ),
            );
        }
    }

    // (b) No delivery after a `true` ack: none taken after the ack returned, none later in the log.
    for s in &acks_true {
        for t in by_item.get(&s.value).into_iter().flatten() {
            if t.call > s.ret {
                fail(
                    NO_DELIVERY_AFTER_ACK,
                    format!(
                        "item {} was delivered (delivery {}, count {}, to client {} on {}, take called at {} ms) \
                         after an ack of delivery {} answered true at {} ms",
                        s.value, t.id, t.deliveries, t.client, t.holder, t.call_ms, s.id, s.ret_ms
                    ),
                );
            } else if t.id > s.id {
                fail(
                    NO_DELIVERY_AFTER_ACK,
                    format!(
                        "item {}: delivery {} was acknowledged true (at {} ms), yet the item was delivered \
                         again later in the log as delivery {} (count {}, to client {} on {} at {} ms)",
                        s.value, s.id, s.ret_ms, t.id, t.deliveries, t.client, t.holder, t.ret_ms
                    ),
                );
            }
        }
    }

    // (c) Per item, delivery counts strictly increase in delivery-id order, and a delivery that
    // returned before another was called has the lower id.
    for (v, ts) in &by_item {
        for w in ts.windows(2) {
            if w[1].deliveries <= w[0].deliveries {
                fail(
                    COUNTS_INCREASE,
                    format!(
                        "item {v}: delivery {} has count {}, the later delivery {} count {}",
                        w[0].id, w[0].deliveries, w[1].id, w[1].deliveries
                    ),
                );
            }
        }
        if let Some(t) = ts.iter().find(|t| t.deliveries == 0) {
            fail(
                COUNTS_INCREASE,
                format!("item {v}: delivery {} has count 0", t.id),
            );
        }
        for a in ts {
            for b in ts {
                if a.ret < b.call && a.id > b.id {
                    fail(
                        COUNTS_INCREASE,
                        format!(
                            "item {v}: delivery {} returned at {} ms, before delivery {} was called at {} ms, \
                             yet has the higher id",
                            a.id, a.ret_ms, b.id, b.call_ms
                        ),
                    );
                }
            }
        }
    }

    // A lease is not ended under its holder before its deadline (extensions included), unless the
    // holder stopped being a member or the same delivery was settled (or may have been) before.
    let mut settles_by_id: BTreeMap<u64, Vec<&Settle>> = BTreeMap::new();
    for s in &log.settles {
        settles_by_id.entry(s.id).or_default().push(s);
    }
    for s in &log.settles {
        if s.answer != Answer::No {
            continue;
        }
        let Some(t) = by_id.get(&s.id) else {
            continue;
        };
        let same = settles_by_id.get(&s.id).map(Vec::as_slice).unwrap_or(&[]);
        let settled_before = same.iter().any(|o| {
            o.call < s.call
                && !matches!(o.kind, SettleKind::Extend { .. })
                && matches!(o.answer, Answer::Yes | Answer::Unknown)
        });
        if settled_before {
            continue;
        }
        let deadline = same
            .iter()
            .filter_map(|o| match o.kind {
                SettleKind::Extend { lease_ms } if o.answer == Answer::Yes && o.ret < s.call => {
                    Some(o.call_ms + lease_ms)
                }
                _ => None,
            })
            .fold(t.deadline_ms, u64::max);
        if s.ret_ms >= deadline {
            continue;
        }
        let removed = log.removals.iter().any(|(p, at)| {
            *p == t.holder && *at >= t.call_ms && *at <= s.ret_ms + removal_slack_ms
        });
        if !removed {
            fail(
                LEASE_HONOURED,
                format!(
                    "item {}: {:?} of delivery {} (client {}, holder {}, taken at {} ms, deadline {} ms) answered \
                     not held at {} ms, before the deadline, with the holder a member throughout",
                    s.value, s.kind, s.id, s.client, t.holder, t.call_ms, deadline, s.ret_ms
                ),
            );
        }
    }

    // Every delivered item was pushed.
    let mut pushed: BTreeMap<u64, Answer> = BTreeMap::new();
    for p in &log.pushes {
        for v in &p.values {
            pushed.insert(*v, p.answer);
        }
    }
    let may_be_in = |v: &u64| matches!(pushed.get(v), Some(Answer::Yes | Answer::Unknown));
    for v in by_item.keys() {
        if !may_be_in(v) {
            fail(
                HELD_ONCE,
                format!(
                    "item {v} was delivered but never pushed (push answer {:?})",
                    pushed.get(v)
                ),
            );
        }
    }

    let Some(fin) = fin else {
        return found;
    };
    // (d) The final state.
    let Some((first, q)) = fin.replicas.first() else {
        return found;
    };
    for (id, r) in &fin.replicas[1..] {
        if r != q {
            fail(
                REPLICAS_AGREE,
                format!("{id} holds {r:?}, {first} holds {q:?}"),
            );
        }
    }
    if fin.leases_left {
        let left: Vec<String> = fin
            .replicas
            .iter()
            .map(|(id, r)| format!("{id}: {}", r.in_flight))
            .collect();
        fail(
            LEASES_EXPIRE,
            format!(
                "{} ms after the clients stopped (longer than the longest lease plus the follower grace), \
                 items are still leased: {}",
                fin.waited_ms,
                left.join(", ")
            ),
        );
    }
    let mut present: BTreeMap<u64, usize> = BTreeMap::new();
    for v in q.visible.iter().chain(&q.dead) {
        *present.entry(*v).or_default() += 1;
    }
    for (v, n) in &present {
        if *n > 1 {
            fail(HELD_ONCE, format!("item {v} is in the queue {n} times"));
        }
        if !may_be_in(v) {
            fail(
                HELD_ONCE,
                format!(
                    "item {v} is in the queue but was never pushed (push answer {:?})",
                    pushed.get(v)
                ),
            );
        }
        if let Some(acks) = true_by_item.get(v) {
            fail(
                HELD_ONCE,
                format!(
                    "item {v} is in the queue after an ack of delivery {} answered true at {} ms",
                    acks[0].id, acks[0].ret_ms
                ),
            );
        }
    }
    // What may have left the queue for good without an ack answering true: an ack that failed in a way
    // that may have taken effect.
    let maybe_acked: BTreeSet<u64> = log
        .settles
        .iter()
        .filter(|s| s.kind == SettleKind::Ack && s.answer == Answer::Unknown)
        .map(|s| s.value)
        .collect();
    let unaccounted: Vec<u64> = pushed
        .iter()
        .filter(|(v, a)| {
            **a == Answer::Yes
                && !true_by_item.contains_key(v)
                && !present.contains_key(v)
                && !maybe_acked.contains(v)
        })
        .map(|(v, _)| *v)
        .collect();
    // The leased items are only counted: they must cover the unaccounted ones...
    if unaccounted.len() > q.in_flight {
        fail(
            NOTHING_LOST,
            format!(
                "{} acknowledged pushes are neither acknowledged, nor possibly acknowledged, nor visible, and only {} \
                 items are leased: {unaccounted:?}",
                unaccounted.len(),
                q.in_flight
            ),
        );
    }
    // ...and cannot be more than the items that could be leased.
    let could_be_leased = pushed
        .iter()
        .filter(|(v, a)| {
            matches!(a, Answer::Yes | Answer::Unknown)
                && !true_by_item.contains_key(v)
                && !present.contains_key(v)
        })
        .count();
    if q.in_flight > could_be_leased {
        fail(
            HELD_ONCE,
            format!(
                "{} items are leased, but only {could_be_leased} pushed items are neither acknowledged nor visible",
                q.in_flight
            ),
        );
    }
    found
}

/// What the run counted about [`JOBS`], for the summary.
#[derive(Clone, Debug, Default)]
pub struct JobCounts {
    pub pushes_acked: usize,
    pub deliveries: usize,
    /// Deliveries with a count above 1.
    pub redeliveries: usize,
    pub acks_true: usize,
    pub acks_false: usize,
    /// Acks that failed in a way that may have taken effect.
    pub acks_unknown: usize,
    /// Nacks that gave the item back.
    pub nacks: usize,
    /// Extensions of a held lease.
    pub extends: usize,
    pub abandoned: usize,
    /// Items left at the end: visible, leased and dead.
    pub left: usize,
    pub popped: usize,
}

impl JobCounts {
    /// The counts of `log` and `fin`.
    pub fn of(log: &JobsLog, fin: Option<&FinalJobs>) -> JobCounts {
        let settles = |kind: fn(&SettleKind) -> bool, answer: Answer| {
            log.settles
                .iter()
                .filter(|s| kind(&s.kind) && s.answer == answer)
                .count()
        };
        let ack = |k: &SettleKind| *k == SettleKind::Ack;
        JobCounts {
            pushes_acked: log
                .pushes
                .iter()
                .filter(|p| p.answer == Answer::Yes)
                .map(|p| p.values.len())
                .sum(),
            deliveries: log.taken.len(),
            redeliveries: log.taken.iter().filter(|t| t.deliveries > 1).count(),
            acks_true: settles(ack, Answer::Yes),
            acks_false: settles(ack, Answer::No),
            acks_unknown: settles(ack, Answer::Unknown),
            nacks: settles(|k| *k == SettleKind::Nack, Answer::Yes),
            extends: settles(|k| matches!(k, SettleKind::Extend { .. }), Answer::Yes),
            abandoned: log.abandoned,
            left: fin
                .and_then(|f| f.replicas.first())
                .map(|(_, r)| r.visible.len() + r.in_flight + r.dead.len())
                .unwrap_or(0),
            popped: log.popped,
        }
    }

    /// Adds `other` to these counts.
    pub fn add(&mut self, other: &JobCounts) {
        self.pushes_acked += other.pushes_acked;
        self.deliveries += other.deliveries;
        self.redeliveries += other.redeliveries;
        self.acks_true += other.acks_true;
        self.acks_false += other.acks_false;
        self.acks_unknown += other.acks_unknown;
        self.nacks += other.nacks;
        self.extends += other.extends;
        self.abandoned += other.abandoned;
        self.left += other.left;
        self.popped += other.popped;
    }
}

impl fmt::Display for JobCounts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} pushes acknowledged, {} deliveries ({} redeliveries), acks {} true / {} false / {} uncertain, \
             {} nacks, {} extends, {} abandoned, {} left at the end",
            self.pushes_acked,
            self.deliveries,
            self.redeliveries,
            self.acks_true,
            self.acks_false,
            self.acks_unknown,
            self.nacks,
            self.extends,
            self.abandoned,
            self.left
        )?;
        if self.popped > 0 {
            write!(f, ", {} popped (and abandoned)", self.popped)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hand-made history: stamps are the checker clock, ms are ten times the stamp.
    #[derive(Default)]
    struct H {
        log: JobsLog,
        clock: u64,
    }

    impl H {
        fn tick(&mut self) -> u64 {
            self.clock += 1;
            self.clock
        }

        fn push(&mut self, values: &[u64], answer: Answer) -> &mut Self {
            self.tick();
            self.tick();
            self.log.pushes.push(JobPush {
                values: values.to_vec(),
                answer,
            });
            self
        }

        /// A take of `value` as delivery `id` with count `deliveries`, leased for 100 ms, holder p1.
        fn take(&mut self, value: u64, id: u64, deliveries: u32) -> &mut Self {
            let call = self.tick();
            let ret = self.tick();
            self.log.taken.push(Taken {
                value,
                id,
                deliveries,
                holder: "p1".into(),
                client: 0,
                call,
                ret,
                call_ms: call * 10,
                ret_ms: ret * 10,
                deadline_ms: call * 10 + 100,
            });
            self
        }

        fn settle(&mut self, kind: SettleKind, value: u64, id: u64, answer: Answer) -> &mut Self {
            let call = self.tick();
            let ret = self.tick();
            self.log.settles.push(Settle {
                kind,
                value,
                id,
                client: 0,
                call,
                ret,
                call_ms: call * 10,
                ret_ms: ret * 10,
                answer,
            });
            self
        }

        fn ack(&mut self, value: u64, id: u64, answer: Answer) -> &mut Self {
            self.settle(SettleKind::Ack, value, id, answer)
        }

        /// Lets time pass (past every deadline so far).
        fn later(&mut self) -> &mut Self {
            self.clock += 100;
            self
        }

        fn checks(&self, fin: Option<&FinalJobs>) -> Vec<&'static str> {
            check(&self.log, fin, 0).iter().map(|f| f.check).collect()
        }
    }

    fn fin(visible: &[u64], in_flight: usize) -> FinalJobs {
        let r = Replica {
            visible: visible.to_vec(),
            in_flight,
            dead: Vec::new(),
        };
        FinalJobs {
            replicas: vec![("p1".into(), r.clone()), ("p2".into(), r)],
            leases_left: false,
            waited_ms: 0,
        }
    }

    #[test]
    fn a_correct_history_passes() {
        let mut h = H::default();
        h.push(&[1, 2], Answer::Yes).push(&[3], Answer::Yes);
        // 1: taken, abandoned, redelivered after its lease, acked.
        h.take(1, 0, 1).later().take(1, 1, 2).ack(1, 1, Answer::Yes);
        // The late ack of the first delivery answers false: no longer held.
        h.ack(1, 0, Answer::No);
        // 2: nacked, then taken again and acked with an uncertain answer.
        h.take(2, 2, 1)
            .settle(SettleKind::Nack, 2, 2, Answer::Yes)
            .take(2, 3, 2)
            .ack(2, 3, Answer::Unknown);
        // 3: taken and still leased at the end.
        h.take(3, 4, 1);
        assert_eq!(h.checks(Some(&fin(&[], 1))), Vec::<&str>::new());
        // Or back in the queue.
        assert_eq!(h.checks(Some(&fin(&[3], 0))), Vec::<&str>::new());
    }

    #[test]
    fn a_second_true_ack_is_caught() {
        let mut h = H::default();
        h.push(&[1], Answer::Yes)
            .take(1, 0, 1)
            .ack(1, 0, Answer::Yes)
            .ack(1, 0, Answer::Yes);
        assert!(h.checks(None).contains(&ACK_ONCE));
    }

    #[test]
    fn a_delivery_after_a_true_ack_is_caught() {
        // Taken again after the ack returned.
        let mut h = H::default();
        h.push(&[1], Answer::Yes)
            .take(1, 0, 1)
            .ack(1, 0, Answer::Yes)
            .take(1, 1, 2);
        assert!(h.checks(None).contains(&NO_DELIVERY_AFTER_ACK));
        // Concurrent with the ack, but later in the log than the acknowledged delivery.
        let mut h = H::default();
        h.push(&[1], Answer::Yes).take(1, 0, 1);
        let ack_call = h.tick();
        h.take(1, 1, 2);
        let ack_ret = h.tick();
        h.log.settles.push(Settle {
            kind: SettleKind::Ack,
            value: 1,
            id: 0,
            client: 1,
            call: ack_call,
            ret: ack_ret,
            call_ms: ack_call * 10,
            ret_ms: ack_ret * 10,
            answer: Answer::Yes,
        });
        assert_eq!(h.checks(None), vec![NO_DELIVERY_AFTER_ACK]);
    }

    #[test]
    fn delivery_counts_out_of_order_are_caught() {
        let mut h = H::default();
        h.push(&[1], Answer::Yes)
            .take(1, 0, 2)
            .later()
            .take(1, 1, 2);
        assert_eq!(h.checks(None), vec![COUNTS_INCREASE]);
        // A delivery id reused.
        let mut h = H::default();
        h.push(&[1, 2], Answer::Yes).take(1, 0, 1).take(2, 0, 1);
        assert!(h.checks(None).contains(&COUNTS_INCREASE));
    }

    #[test]
    fn a_lease_ended_early_is_caught_unless_the_holder_was_removed() {
        let mut h = H::default();
        h.push(&[1], Answer::Yes)
            .take(1, 0, 1)
            .ack(1, 0, Answer::No);
        assert_eq!(h.checks(None), vec![LEASE_HONOURED]);
        let at = h.log.taken[0].call_ms + 5;
        h.log.removals.push(("p1".into(), at));
        assert_eq!(h.checks(None), Vec::<&str>::new());
        // After an uncertain ack, the retry may answer false.
        let mut h = H::default();
        h.push(&[1], Answer::Yes)
            .take(1, 0, 1)
            .ack(1, 0, Answer::Unknown)
            .ack(1, 0, Answer::No);
        assert_eq!(h.checks(None), Vec::<&str>::new());
        // An extension moves the deadline.
        let mut h = H::default();
        h.push(&[1], Answer::Yes).take(1, 0, 1);
        h.clock += 8;
        h.settle(SettleKind::Extend { lease_ms: 300 }, 1, 0, Answer::Yes);
        h.clock += 5;
        h.ack(1, 0, Answer::No);
        assert_eq!(h.checks(None), vec![LEASE_HONOURED]);
    }

    #[test]
    fn a_lost_item_is_caught() {
        let mut h = H::default();
        h.push(&[1, 2], Answer::Yes).take(1, 0, 1);
        // 1 leased and 2 visible: fine; neither: 1 is lost.
        assert_eq!(h.checks(Some(&fin(&[2], 1))), Vec::<&str>::new());
        assert_eq!(h.checks(Some(&fin(&[2], 0))), vec![NOTHING_LOST]);
        // An uncertain push may be gone; an uncertain ack explains a missing item.
        let mut h = H::default();
        h.push(&[1], Answer::Unknown).push(&[2], Answer::Yes);
        h.take(2, 0, 1).ack(2, 0, Answer::Unknown);
        assert_eq!(h.checks(Some(&fin(&[], 0))), Vec::<&str>::new());
        // A false ack does not.
        let mut h = H::default();
        h.push(&[2], Answer::Yes)
            .take(2, 0, 1)
            .later()
            .ack(2, 0, Answer::No);
        assert_eq!(h.checks(Some(&fin(&[], 0))), vec![NOTHING_LOST]);
    }

    #[test]
    fn an_item_held_twice_or_never_pushed_is_caught() {
        let mut h = H::default();
        h.push(&[1], Answer::Yes).push(&[2], Answer::Failed);
        assert_eq!(h.checks(Some(&fin(&[1, 1], 0))), vec![HELD_ONCE]);
        assert_eq!(h.checks(Some(&fin(&[1, 2], 0))), vec![HELD_ONCE]);
        assert_eq!(h.checks(Some(&fin(&[1], 1))), vec![HELD_ONCE]);
        // Acknowledged, and back in the queue.
        h.take(1, 0, 1).ack(1, 0, Answer::Yes);
        assert_eq!(h.checks(Some(&fin(&[1], 0))), vec![HELD_ONCE]);
    }

    #[test]
    fn disagreeing_replicas_and_stuck_leases_are_caught() {
        let mut h = H::default();
        h.push(&[1], Answer::Yes);
        let mut f = fin(&[1], 0);
        f.replicas[1].1.visible.clear();
        assert_eq!(h.checks(Some(&f)), vec![REPLICAS_AGREE]);
        let mut f = fin(&[], 1);
        f.leases_left = true;
        assert_eq!(h.checks(Some(&f)), vec![LEASES_EXPIRE]);
    }
}
