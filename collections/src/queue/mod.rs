//! [`HamokQueue`]: a replicated FIFO queue, with at-most-once pops and acknowledged (at-least-once)
//! takes.
//!
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use std::time::Duration;
//! use hamok_collections::{register_kinds, HamokCollections};
//! use hamok_runtime::Hamok;
//!
//! let hamok = register_kinds(Hamok::builder().cluster_id("doc-queue")).build().await?;
//! hamok.join().await?;
//! let jobs = hamok.get_or_create_queue::<String>("jobs").await?;
//! jobs.push(["resize a.png".to_string(), "resize b.png".to_string()]).await?;
//!
//! // At-least-once: the item stays leased to this peer until it is acknowledged.
//! let job = jobs.take(Duration::from_secs(30)).await?.expect("an item");
//! assert_eq!(job.value, "resize a.png");
//! assert_eq!(job.deliveries, 1);
//! assert!(jobs.ack(job.id).await?, "acknowledged by this call");
//!
//! // A nack gives it back to the head, with its delivery count.
//! let job = jobs.take(Duration::from_secs(30)).await?.expect("an item");
//! assert_eq!(jobs.nack(job.id).await?, Some(hamok_collections::queue::Outcome::Returned));
//! let again = jobs.take(Duration::from_secs(30)).await?.expect("an item");
//! assert_eq!((again.value.as_str(), again.deliveries), ("resize b.png", 2));
//! hamok.close().await;
//! # Ok::<(), hamok_runtime::HamokError>(()) }).unwrap();
//! ```
//!
//! # Two ways to consume
//!
//! - **[`pop`](HamokQueue::pop): at most once.** A pop is a command in the log: it takes the head *as of
//!   its place in the log*, so concurrent pops from any number of peers each get a distinct item, and the
//!   runtime deduplicates a pop retried across a leader change. But once the pop is applied the item has
//!   left the queue: if its answer is lost (a timeout while the leader changes, a crash of the caller),
//!   nobody has it.
//! - **[`take`](HamokQueue::take) / [`ack`](HamokQueue::ack): at least once.** A take moves the head to
//!   the *leased* items, under a fresh [`DeliveryId`], held by the taking peer. [`ack`](HamokQueue::ack)
//!   removes it (and answers `true` exactly once per delivery: a delivery that is no longer held answers
//!   `false`). The item comes back to the head of the queue, its delivery count kept, when
//!   - the holder gives it back with [`nack`](HamokQueue::nack);
//!   - its lease runs out: the cluster's timers count the lease from when the take was applied, so never
//!     before the holder's own [`Delivery::deadline`] (a lower bound; see [`FOLLOWER_GRACE`] for which
//!     peer's clock decides); [`extend`](HamokQueue::extend) renews it;
//!   - the holder leaves or is removed from the cluster: in the log entry that removes it.
//!
//!   With [`set_max_deliveries`](HamokQueue::set_max_deliveries), an item that comes back after that
//!   many deliveries becomes a **dead letter** instead ([`dead_letters`](HamokQueue::dead_letters),
//!   [`pop_dead_letters`](HamokQueue::pop_dead_letters)). A consumer therefore sees an item again only
//!   if a holder did not ack it, and must make its processing idempotent for that case.
//!
//! A push of several values is one log entry: they enter the queue together, in order. An optional
//! capacity (replicated, set with [`HamokQueue::set_capacity`]) counts visible, leased and dead items
//! and refuses a push that would exceed it with [`HamokError::Busy`]`("queue is full")`, leaving the
//! queue unchanged.

mod lease;
mod machine;

use std::time::Duration;

use bytes::Bytes;
use hamok_runtime::HamokError;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::common::{decode, encode, handle_basics, Events, LogicHandle, Opened, Raw, Types};
use lease::QueueExtra;
pub use lease::FOLLOWER_GRACE;
pub(crate) use machine::QueueMachine;
pub use machine::{Outcome, MAX_BATCH, MAX_LEASE_MS};
use machine::{QueueCmd, QueueLogic, Tag, Taken};

/// The kind a queue is registered under.
pub const QUEUE_KIND: &str = "hamok.queue";

/// The message of the error a push into a full queue fails with ([`HamokError::Busy`]).
pub const QUEUE_FULL: &str = "queue is full";

/// An event of a queue on this peer. Events come in log order. A stream never skips silently: after a
/// [`QueueEvent::Resync`] its `items` are the whole queue at that point of the log, and the events
/// that follow continue from exactly that state (replaying `Resync`, then the events, reproduces the
/// queue).
#[derive(Clone, Debug, PartialEq)]
pub enum QueueEvent<T> {
    /// A value was pushed.
    Add(T),
    /// A value left the visible queue: popped, or taken under a lease.
    Remove(T),
    /// A taken value came back to the head (a `nack`, an expired lease, or its holder's removal).
    Returned {
        /// The value.
        value: T,
        /// How many times it was delivered so far.
        deliveries: u32,
    },
    /// A taken value that came back after `max_deliveries` deliveries became a dead letter.
    DeadLettered {
        /// The value.
        value: T,
        /// How many times it was delivered.
        deliveries: u32,
    },
    /// The queue became empty (by pops, takes or a clear).
    Empty,
    /// The queue was empty and a push (or a returned item) made it non-empty.
    NotEmpty,
    /// The queue was cleared.
    Clear,
    /// The stream could not deliver some events (see [`ResyncReason`](crate::ResyncReason)): the
    /// queue's visible items are exactly `items` now (head first; given-back items included), and the
    /// events after this one continue from there.
    Resync {
        /// Every visible item (not leased, not dead), head first.
        items: Vec<T>,
        /// How many items are leased (taken, not acknowledged) at that point.
        in_flight: usize,
        /// Why the events in between were skipped.
        reason: crate::ResyncReason,
    },
    /// The handle (or its peer) was closed.
    Close,
}

fn decode_event<T: DeserializeOwned>(raw: Raw) -> Result<QueueEvent<T>, HamokError> {
    // The raw key of an insert or remove tags the given-back and dead-lettered items.
    let tag = |key: &Bytes| -> Result<Option<Tag>, HamokError> {
        if key.is_empty() {
            Ok(None)
        } else {
            decode(key).map(Some)
        }
    };
    Ok(match raw {
        Raw::Insert { key, value } => match tag(&key)? {
            Some(Tag::Returned(deliveries)) => QueueEvent::Returned {
                value: decode(&value)?,
                deliveries,
            },
            _ => QueueEvent::Add(decode(&value)?),
        },
        Raw::Remove { key, value } => match tag(&key)? {
            Some(Tag::DeadLettered(deliveries)) => QueueEvent::DeadLettered {
                value: decode(&value)?,
                deliveries,
            },
            _ => QueueEvent::Remove(decode(&value)?),
        },
        Raw::Update { new: value, .. } => QueueEvent::Remove(decode(&value)?),
        Raw::Clear => QueueEvent::Clear,
        Raw::Empty => QueueEvent::Empty,
        Raw::NotEmpty => QueueEvent::NotEmpty,
        Raw::Close => QueueEvent::Close,
        Raw::Resync { state, reason } => {
            let state: machine::QueueState = decode(&state)?;
            QueueEvent::Resync {
                items: crate::common::decode_each(state.visible().map(|(v, _)| v))?,
                in_flight: state.leased.len(),
                reason,
            }
        }
    })
}

/// Identifies one delivery of one item (a [`HamokQueue::take`]): unique in the queue, never reused.
/// An item given back and taken again gets a new one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct DeliveryId(pub u64);

impl std::fmt::Display for DeliveryId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// An item taken under a lease ([`HamokQueue::take`]): acknowledge it with [`HamokQueue::ack`].
#[derive(Clone, Debug, PartialEq)]
pub struct Delivery<T> {
    /// This delivery's id, for [`ack`](HamokQueue::ack), [`nack`](HamokQueue::nack) and
    /// [`extend`](HamokQueue::extend).
    pub id: DeliveryId,
    /// The item.
    pub value: T,
    /// How many times the item was delivered, this delivery included (1 the first time; more means an
    /// earlier holder did not acknowledge it).
    pub deliveries: u32,
    /// Until when this peer may count on holding it: the lease counted from before the take was sent.
    /// The cluster gives the item back no earlier (see the [module docs](self)).
    pub deadline: Instant,
}

/// A dead letter: an item delivered `max_deliveries` times and never acknowledged.
#[derive(Clone, Debug, PartialEq)]
pub struct DeadLetter<T> {
    /// The item.
    pub value: T,
    /// How many times it was delivered.
    pub deliveries: u32,
}

/// How long [`HamokQueue::take_wait`] sleeps between attempts when no event woke it (a bound on how
/// late it can notice an item whose arrival event it missed).
const TAKE_WAIT_POLL: Duration = Duration::from_millis(250);

/// A replicated FIFO queue of `T`. Cheap to clone. Push, pop, take, ack and clear go through the log;
/// `peek`, `len` and iteration are local. See the [module docs](self) for the delivery guarantees.
pub struct HamokQueue<T> {
    handle: LogicHandle<QueueLogic>,
    _types: Types<T>,
}

impl<T> Clone for HamokQueue<T> {
    fn clone(&self) -> Self {
        HamokQueue {
            handle: self.handle.clone(),
            _types: Types::default(),
        }
    }
}

impl<T> std::fmt::Debug for HamokQueue<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HamokQueue")
            .field("id", &self.handle.local.id)
            .field("len", &self.len())
            .field("in_flight", &self.in_flight())
            .finish()
    }
}

impl<T: Serialize + DeserializeOwned> Opened for HamokQueue<T> {
    type Logic = QueueLogic;
    type Options = ();

    fn kind(_id: &str) -> String {
        QUEUE_KIND.to_string()
    }

    fn extra(_id: &str) -> QueueExtra {
        QueueExtra::default()
    }

    async fn finish(handle: LogicHandle<QueueLogic>, _options: ()) -> Result<Self, HamokError> {
        handle.local.extra.start_timer(&handle.hamok, &handle.local);
        Ok(HamokQueue::new(handle))
    }
}

handle_basics!(HamokQueue<T>);

/// Checks a lease length before it is sent: 1 ms to [`MAX_LEASE_MS`].
fn lease_ms(lease: Duration) -> Result<u64, HamokError> {
    let ms = u64::try_from(lease.as_millis()).unwrap_or(u64::MAX);
    machine::check_lease(ms)?;
    Ok(ms)
}

impl<T> HamokQueue<T> {
    /// Number of visible items: pushed or given back, not taken (local).
    pub fn len(&self) -> usize {
        self.handle.local.read(|s| s.visible_len())
    }

    /// Whether no item is visible (local).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of taken, unacknowledged items (local).
    pub fn in_flight(&self) -> usize {
        self.handle.local.read(|s| s.leased.len())
    }

    /// The capacity in force (local); `None` is unbounded.
    pub fn capacity(&self) -> Option<u64> {
        self.handle.local.read(|s| s.capacity)
    }

    /// After how many deliveries an item that comes back becomes a dead letter (local); `None`: never.
    pub fn max_deliveries(&self) -> Option<u32> {
        self.handle.local.read(|s| s.max_deliveries)
    }

    /// Sets (or with `None` removes) the capacity, through the log. Items already queued stay.
    pub async fn set_capacity(&self, capacity: Option<u64>) -> Result<(), HamokError> {
        self.handle.submit(QueueCmd::SetCapacity(capacity)).await
    }

    /// Sets (or with `None` removes) the dead-letter threshold, through the log: an item that comes
    /// back (nack, expiry, holder removed) after `max` deliveries goes to the dead letters instead of
    /// the head. `Some(0)` is refused.
    pub async fn set_max_deliveries(&self, max: Option<u32>) -> Result<(), HamokError> {
        self.handle.submit(QueueCmd::SetMaxDeliveries(max)).await
    }

    /// Removes every visible item and every dead letter; returns how many there were. Leased items
    /// stay with their holders (their acks still count).
    pub async fn clear(&self) -> Result<u64, HamokError> {
        self.handle.submit(QueueCmd::Clear).await
    }

    /// Acknowledges delivery `id`: removes the item for good. Answers `true` if this call removed it,
    /// `false` if the delivery is no longer held (already acknowledged, its lease ran out, it was
    /// given back, or its holder was removed): then the item may be delivered again, or already was.
    /// Any peer may acknowledge any delivery.
    pub async fn ack(&self, id: DeliveryId) -> Result<bool, HamokError> {
        let acked: Vec<bool> = self.handle.submit(QueueCmd::Ack(vec![id.0])).await?;
        Ok(acked.first().copied().unwrap_or(false))
    }

    /// Acknowledges up to [`MAX_BATCH`] deliveries in one log entry; answers, per id, what
    /// [`ack`](Self::ack) would.
    pub async fn ack_many(&self, ids: &[DeliveryId]) -> Result<Vec<bool>, HamokError> {
        machine::check_batch(ids.len(), "acks")?;
        let ids = ids.iter().map(|id| id.0).collect();
        self.handle.submit(QueueCmd::Ack(ids)).await
    }

    /// Gives delivery `id` back: to the head of the queue, or to the dead letters once it was
    /// delivered `max_deliveries` times. Answers where it went; `None` if it was no longer held.
    pub async fn nack(&self, id: DeliveryId) -> Result<Option<Outcome>, HamokError> {
        self.handle.submit(QueueCmd::Nack(id.0)).await
    }

    /// Renews delivery `id`'s lease to `lease` from now. Answers whether it was still held (if so,
    /// this peer may count on it until `lease` after the call was made).
    pub async fn extend(&self, id: DeliveryId, lease: Duration) -> Result<bool, HamokError> {
        let lease_ms = lease_ms(lease)?;
        self.handle
            .submit(QueueCmd::Extend { id: id.0, lease_ms })
            .await
    }

    /// Waits until local reads reflect every write acknowledged before the call.
    pub async fn sync(&self) -> Result<(), HamokError> {
        self.handle.sync().await
    }

    /// Closes this peer's handles (subscribers get [`QueueEvent::Close`]).
    pub fn close(&self) {
        self.handle.local.close();
    }
}

impl<T: Serialize + DeserializeOwned> HamokQueue<T> {
    pub(crate) fn new(handle: LogicHandle<QueueLogic>) -> Self {
        HamokQueue {
            handle,
            _types: Types::default(),
        }
    }

    /// Appends `values` at the tail, atomically (one log entry, in order); returns the number of
    /// visible items after. Fails with [`HamokError::Busy`]`(`[`QUEUE_FULL`]`)` if that would exceed
    /// the capacity.
    pub async fn push(&self, values: impl IntoIterator<Item = T>) -> Result<u64, HamokError> {
        let values: Vec<Bytes> = values
            .into_iter()
            .map(|v| encode(&v))
            .collect::<Result<_, _>>()?;
        self.handle.submit(QueueCmd::Push(values)).await
    }

    /// Appends one value; returns the number of visible items after.
    pub async fn push_one(&self, value: T) -> Result<u64, HamokError> {
        self.push(std::iter::once(value)).await
    }

    /// Takes the head, if any, **at most once**: if the answer is lost, so is the item (see the
    /// [module docs](self); [`take`](Self::take) is the at-least-once alternative).
    pub async fn pop(&self) -> Result<Option<T>, HamokError> {
        let popped: Vec<Bytes> = self.handle.submit(QueueCmd::Pop(1)).await?;
        match popped.first() {
            Some(v) => Ok(Some(decode(v)?)),
            None => Ok(None),
        }
    }

    /// Takes up to `n` items (at most [`MAX_BATCH`]) from the head in one log entry, at most once
    /// (like [`pop`](Self::pop)).
    pub async fn pop_many(&self, n: u32) -> Result<Vec<T>, HamokError> {
        let popped: Vec<Bytes> = self.handle.submit(QueueCmd::Pop(n)).await?;
        popped.iter().map(|v| decode(v)).collect()
    }

    /// Takes the head, if any, leased to this peer for `lease` (1 ms to [`MAX_LEASE_MS`]): **at least
    /// once**. Acknowledge it with [`ack`](Self::ack) before [`Delivery::deadline`], or it comes back.
    /// A take whose answer is lost (a timeout) leaves the item leased to this peer until the lease
    /// runs out.
    pub async fn take(&self, lease: Duration) -> Result<Option<Delivery<T>>, HamokError> {
        Ok(self.take_many(1, lease).await?.into_iter().next())
    }

    /// Takes up to `n` items (at most [`MAX_BATCH`]) from the head in one log entry, each leased to
    /// this peer for `lease` (see [`take`](Self::take)).
    pub async fn take_many(&self, n: u32, lease: Duration) -> Result<Vec<Delivery<T>>, HamokError> {
        let lease_ms = lease_ms(lease)?;
        let sent = Instant::now();
        let taken: Vec<Taken> = self.handle.submit(QueueCmd::Take { n, lease_ms }).await?;
        let deadline = sent + Duration::from_millis(lease_ms);
        // The items are leased now: one that does not decode must still be acknowledged (or it would
        // come back forever), so a decoding failure says the take was applied.
        taken
            .into_iter()
            .map(|(id, value, deliveries)| {
                Ok(Delivery {
                    id: DeliveryId(id),
                    value: decode(&value).map_err(HamokError::after_apply)?,
                    deliveries,
                    deadline,
                })
            })
            .collect()
    }

    /// Like [`take`](Self::take), but waits up to `wait` for an item to become visible (woken by this
    /// peer's queue events, and polling every 250 ms). `Ok(None)` when `wait` passed with the queue
    /// empty.
    pub async fn take_wait(
        &self,
        lease: Duration,
        wait: Duration,
    ) -> Result<Option<Delivery<T>>, HamokError> {
        let until = Instant::now() + wait;
        let mut events = self.handle.events(|raw| Ok(matches!(raw, Raw::Close)));
        loop {
            if let Some(d) = self.take(lease).await? {
                return Ok(Some(d));
            }
            let now = Instant::now();
            if now >= until {
                return Ok(None);
            }
            let nap = (until - now).min(TAKE_WAIT_POLL);
            if self.is_empty() {
                match tokio::time::timeout(nap, events.recv()).await {
                    Ok(Ok(true)) | Ok(Err(crate::RecvError::Closed)) => {
                        return Err(HamokError::Closed)
                    }
                    _ => {}
                }
            }
        }
    }

    /// The dead letters, oldest first (local copy).
    pub fn dead_letters(&self) -> Result<Vec<DeadLetter<T>>, HamokError> {
        let raw: Vec<(Bytes, u32)> = self.handle.local.read(|s| {
            s.dead
                .iter()
                .map(|c| (c.value.clone(), c.deliveries))
                .collect()
        });
        raw.into_iter()
            .map(|(v, deliveries)| {
                Ok(DeadLetter {
                    value: decode(&v)?,
                    deliveries,
                })
            })
            .collect()
    }

    /// Removes and returns up to `n` dead letters (at most [`MAX_BATCH`]), oldest first.
    pub async fn pop_dead_letters(&self, n: u32) -> Result<Vec<DeadLetter<T>>, HamokError> {
        let dead: Vec<(Bytes, u32)> = self.handle.submit(QueueCmd::PopDead(n)).await?;
        dead.into_iter()
            .map(|(v, deliveries)| {
                Ok(DeadLetter {
                    value: decode(&v).map_err(HamokError::after_apply)?,
                    deliveries,
                })
            })
            .collect()
    }

    /// The head without taking it (local).
    pub fn peek(&self) -> Result<Option<T>, HamokError> {
        match self
            .handle
            .local
            .read(|s| s.visible().next().map(|(v, _)| v.clone()))
        {
            Some(v) => Ok(Some(decode(&v)?)),
            None => Ok(None),
        }
    }

    /// The visible items from head to tail (local copy).
    pub fn to_vec(&self) -> Result<Vec<T>, HamokError> {
        self.raw_items().iter().map(|v| decode(v)).collect()
    }

    /// Iterates from head to tail over a copy of the visible items taken now (items that fail to
    /// decode are skipped).
    pub fn iter(&self) -> impl Iterator<Item = T> {
        self.raw_items().into_iter().filter_map(|v| decode(&v).ok())
    }

    fn raw_items(&self) -> Vec<Bytes> {
        self.handle
            .local
            .read(|s| s.visible().map(|(v, _)| v.clone()).collect())
    }

    /// Subscribes to the queue's events on this peer, in log order. The stream never skips silently:
    /// when this peer installs a snapshot, or the subscriber falls more than
    /// [`EVENT_CAPACITY`](crate::EVENT_CAPACITY) events behind, it yields [`QueueEvent::Resync`] with
    /// the queue's visible items at exactly that point, and the events after it continue from there.
    pub fn events(&self) -> Events<QueueEvent<T>> {
        self.handle.events(decode_event::<T>)
    }
}
