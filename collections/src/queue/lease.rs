//! The lease timer of a queue: ends leases that ran out.
//!
//! Every joined peer with the queue open times each lease it sees from when it first saw it applied
//! (or extended), and asks the cluster to expire it ([`QueueCmd::Expire`], naming the delivery and the
//! renewal, so a later ack or extension makes the request do nothing). The leader asks at the lease plus
//! a margin ([`expiry_after`]); a follower only [`FOLLOWER_GRACE`] later still, so normally only the
//! leader's clock decides and the followers are a fallback for a leader without the queue open. An item
//! therefore never returns before its lease ran out on the timing peer's clock, counted from after the
//! take was applied: a lower bound, like every lease without synchronised clocks.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use hamok_runtime::Hamok;
use tokio::time::Instant;

use super::machine::{QueueCmd, QueueState};
use crate::background::{expiry_after, submit_retrying};
use crate::common::{encode, Envelope, Local};

/// How often a lease timer looks at the queue's leases.
const LEASE_TICK: Duration = Duration::from_millis(20);

/// How much later than the leader a follower asks to expire a lease.
pub const FOLLOWER_GRACE: Duration = Duration::from_secs(1);

/// How long a timer waits before asking again for an expiry that was not applied (its submission
/// failed every attempt, say during a long election).
const ASK_AGAIN_AFTER: Duration = Duration::from_secs(5);

/// The handle group of a queue on one peer.
pub(crate) type QueueLocal = Local<QueueState, QueueExtra>;

/// What the handles of one queue on one peer share besides the state: whether the lease timer runs.
#[derive(Default)]
pub(crate) struct QueueExtra {
    timer: AtomicBool,
}

impl QueueExtra {
    /// Starts this group's lease timer (once). Ends when the group is gone or the peer closed.
    pub(crate) fn start_timer(&self, hamok: &Hamok, local: &Arc<QueueLocal>) {
        if self.timer.swap(true, Ordering::AcqRel) {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(lease_timer(hamok.clone(), Arc::downgrade(local)));
        }
    }
}

/// One lease as a timer tracks it: (delivery id, renewal) → (first seen, last asked).
type Seen = HashMap<(u64, u32), (Instant, Option<Instant>)>;

/// Bounded: one entry per lease of the queue (the queue's leases are bounded by its capacity and by
/// what consumers take).
async fn lease_timer(hamok: Hamok, local: Weak<QueueLocal>) {
    let mut seen: Seen = HashMap::new();
    let mut current: Vec<(u64, u32, u64)> = Vec::new();
    loop {
        tokio::time::sleep(LEASE_TICK).await;
        let Some(local) = local.upgrade() else { return };
        if hamok.is_closed() || local.is_closed() {
            return;
        }
        if !hamok.is_joined() {
            seen.clear();
            continue;
        }
        current.clear();
        local
            .read(|s| current.extend(s.leased.iter().map(|(id, l)| (*id, l.renewals, l.lease_ms))));
        if current.is_empty() {
            seen.clear();
            continue;
        }
        let now = Instant::now();
        let grace = if hamok.is_leader() {
            Duration::ZERO
        } else {
            FOLLOWER_GRACE
        };
        let live: std::collections::HashSet<(u64, u32)> =
            current.iter().map(|(id, r, _)| (*id, *r)).collect();
        seen.retain(|k, _| live.contains(k));
        for &(id, renewals, lease_ms) in &current {
            let (since, asked) = seen.entry((id, renewals)).or_insert((now, None));
            let due = now.saturating_duration_since(*since) >= expiry_after(lease_ms) + grace;
            let may_ask =
                asked.is_none_or(|at| now.saturating_duration_since(at) >= ASK_AGAIN_AFTER);
            if due && may_ask {
                *asked = Some(now);
                if let Ok(bytes) = encode(&Envelope::Op(QueueCmd::Expire { id, renewals })) {
                    submit_retrying(&hamok, &local.id, bytes);
                }
            }
        }
    }
}
