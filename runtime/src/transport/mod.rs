//! How frames move between peers. A transport knows nothing of Raft: it moves opaque, already-encoded
//! frames, unicast to one peer or broadcast to the cluster, and hands what arrives to an [`Inbound`] sink.
//!
//! Delivery is best effort: a transport may drop, duplicate or reorder frames (Raft retransmits), but it
//! must never block the caller: every queue is bounded and a full queue drops (and counts) the frame.
//!
//! Transports in this crate: the in-process hub ([`memory`]) and hand wiring ([`manual`]); the broker
//! adapters live in `hamok-transports`. Every link marks its death with a [`CloseSignal`].

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;

use crate::error::HamokError;
use crate::raft::PeerId;

mod close;
pub mod manual;
pub mod memory;

pub use close::CloseSignal;

/// A boxed future, so transports can be used as trait objects.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// A way to reach the other peers of a cluster (in-process hub, NATS, RabbitMQ, or wired by hand).
pub trait Transport: Send + Sync + 'static {
    /// Connects the peer `local` of `cluster`: from now on frames for it (unicast to `local`, or
    /// broadcast) go to `inbound`. Called again after the link dies (the runtime reconnects).
    fn connect(
        &self,
        cluster: &str,
        local: PeerId,
        inbound: Inbound,
    ) -> BoxFuture<Result<Arc<dyn Link>, HamokError>>;
}

/// One live connection of one peer.
pub trait Link: Send + Sync + 'static {
    /// Queues a frame for `to`. Never blocks; returns an error (and drops the frame) when the link is
    /// down or its queue is full.
    fn send(&self, to: &PeerId, frame: Bytes) -> Result<(), HamokError>;
    /// Queues a frame for every other peer of the cluster. Never blocks.
    fn broadcast(&self, frame: Bytes) -> Result<(), HamokError>;
    /// Resolves, with a reason, when the link is dead and must be reconnected.
    fn closed(&self) -> BoxFuture<String>;
    /// Disconnects (idempotent).
    fn close(&self);
}

/// Where a transport delivers the frames it receives. Cheap to clone. Bounded: when the peer has not
/// yet processed `capacity` frames, further frames are dropped and counted rather than queued, so a slow
/// peer cannot make memory grow without limit.
#[derive(Clone)]
pub struct Inbound {
    deliver: Arc<dyn Fn(Bytes) + Send + Sync>,
    in_flight: Arc<AtomicUsize>,
    dropped: Arc<AtomicU64>,
    capacity: usize,
}

impl Inbound {
    /// A sink that hands frames to `deliver`, with at most `capacity` frames undelivered to the consumer
    /// (the consumer calls [`Inbound::processed`] for each one it has finished).
    pub fn new(capacity: usize, deliver: impl Fn(Bytes) + Send + Sync + 'static) -> Self {
        Inbound {
            deliver: Arc::new(deliver),
            in_flight: Arc::new(AtomicUsize::new(0)),
            dropped: Arc::new(AtomicU64::new(0)),
            capacity,
        }
    }

    /// Hands a received frame to the peer. Returns false (and counts a drop) when the peer is saturated.
    pub fn deliver(&self, frame: Bytes) -> bool {
        if self.in_flight.fetch_add(1, Ordering::AcqRel) >= self.capacity {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        (self.deliver)(frame);
        true
    }

    /// The consumer finished one delivered frame.
    pub fn processed(&self) {
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
    }

    /// Frames dropped because the peer was saturated.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

impl std::fmt::Debug for Inbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbound")
            .field("in_flight", &self.in_flight.load(Ordering::Relaxed))
            .field("capacity", &self.capacity)
            .finish()
    }
}
