//! [`HamokQueue`]: a replicated FIFO queue.
//!
//! A pop is a command in the log: it takes the head *as of its place in the log*, so concurrent pops
//! from any number of peers each get a distinct item, and every item pushed is popped exactly once (the
//! runtime deduplicates retried requests, so a pop retried across a leader change does not take two
//! items). A push of several values is one log entry: they enter the queue together, in order.
//!
//! An optional capacity (replicated, set with [`HamokQueue::set_capacity`]) refuses a push that would
//! exceed it with [`HamokError::Busy`]`("queue is full")`, leaving the queue unchanged.

mod machine;

use bytes::Bytes;
use hamok_runtime::HamokError;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::common::{decode, encode, handle_basics, plain_opened, Events, Handle, Raw, Types};
pub(crate) use machine::QueueMachine;
use machine::{QueueCmd, QueueLogic, QueueState};

/// The kind a queue is registered under.
pub const QUEUE_KIND: &str = "hamok.queue";

/// The message of the error a push into a full queue fails with ([`HamokError::Busy`]).
pub const QUEUE_FULL: &str = "queue is full";

/// An event of a queue on this peer.
#[derive(Clone, Debug, PartialEq)]
pub enum QueueEvent<T> {
    /// A value was pushed.
    Add(T),
    /// A value was popped.
    Remove(T),
    /// The queue became empty (by pops or a clear).
    Empty,
    /// The queue was empty and a push made it non-empty.
    NotEmpty,
    /// The queue was cleared.
    Clear,
    /// The handle (or its peer) was closed.
    Close,
}

fn decode_event<T: DeserializeOwned>(raw: Raw) -> Result<QueueEvent<T>, HamokError> {
    Ok(match raw {
        Raw::Insert { value, .. } => QueueEvent::Add(decode(&value)?),
        Raw::Remove { value, .. } | Raw::Update { new: value, .. } => {
            QueueEvent::Remove(decode(&value)?)
        }
        Raw::Clear => QueueEvent::Clear,
        Raw::Empty => QueueEvent::Empty,
        Raw::NotEmpty => QueueEvent::NotEmpty,
        Raw::Close => QueueEvent::Close,
    })
}

/// A replicated FIFO queue of `T`. Cheap to clone. Push, pop and clear go through the log; `peek`,
/// `len` and iteration are local.
pub struct HamokQueue<T> {
    handle: Handle<QueueState, ()>,
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
            .finish()
    }
}

plain_opened!(HamokQueue<T>, QueueLogic, QUEUE_KIND);
handle_basics!(HamokQueue<T>);

impl<T> HamokQueue<T> {
    /// Number of items (local).
    pub fn len(&self) -> usize {
        self.handle.local.read(|s| s.items.len())
    }

    /// Whether the queue is empty (local).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The capacity in force (local); `None` is unbounded.
    pub fn capacity(&self) -> Option<u64> {
        self.handle.local.read(|s| s.capacity)
    }

    /// Sets (or with `None` removes) the capacity, through the log. Items already queued stay.
    pub async fn set_capacity(&self, capacity: Option<u64>) -> Result<(), HamokError> {
        self.handle.submit(QueueCmd::SetCapacity(capacity)).await
    }

    /// Removes every item; returns how many there were.
    pub async fn clear(&self) -> Result<u64, HamokError> {
        self.handle.submit(QueueCmd::Clear).await
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
    pub(crate) fn new(handle: Handle<QueueState, ()>) -> Self {
        HamokQueue {
            handle,
            _types: Types::default(),
        }
    }

    /// Appends `values` at the tail, atomically (one log entry, in order); returns the length after.
    /// Fails with [`HamokError::Busy`]`(`[`QUEUE_FULL`]`)` if that would exceed the capacity.
    pub async fn push(&self, values: impl IntoIterator<Item = T>) -> Result<u64, HamokError> {
        let values: Vec<Bytes> = values
            .into_iter()
            .map(|v| encode(&v))
            .collect::<Result<_, _>>()?;
        self.handle.submit(QueueCmd::Push(values)).await
    }

    /// Appends one value; returns the length after.
    pub async fn push_one(&self, value: T) -> Result<u64, HamokError> {
        self.push(std::iter::once(value)).await
    }

    /// Takes the head, if any.
    pub async fn pop(&self) -> Result<Option<T>, HamokError> {
        let popped: Vec<Bytes> = self.handle.submit(QueueCmd::Pop(1)).await?;
        match popped.first() {
            Some(v) => Ok(Some(decode(v)?)),
            None => Ok(None),
        }
    }

    /// Takes up to `n` items from the head in one log entry.
    pub async fn pop_many(&self, n: u32) -> Result<Vec<T>, HamokError> {
        let popped: Vec<Bytes> = self.handle.submit(QueueCmd::Pop(n)).await?;
        popped.iter().map(|v| decode(v)).collect()
    }

    /// The head without taking it (local).
    pub fn peek(&self) -> Result<Option<T>, HamokError> {
        match self.handle.local.read(|s| s.items.front().cloned()) {
            Some(v) => Ok(Some(decode(&v)?)),
            None => Ok(None),
        }
    }

    /// The items from head to tail (local copy).
    pub fn to_vec(&self) -> Result<Vec<T>, HamokError> {
        let raw: Vec<Bytes> = self
            .handle
            .local
            .read(|s| s.items.iter().cloned().collect());
        raw.iter().map(|v| decode(v)).collect()
    }

    /// Iterates from head to tail over a copy taken now (items that fail to decode are skipped).
    pub fn iter(&self) -> impl Iterator<Item = T> {
        let raw: Vec<Bytes> = self
            .handle
            .local
            .read(|s| s.items.iter().cloned().collect());
        raw.into_iter().filter_map(|v| decode(&v).ok())
    }

    /// Subscribes to the queue's events on this peer.
    pub fn events(&self) -> Events<QueueEvent<T>> {
        self.handle.events(decode_event::<T>)
    }
}
