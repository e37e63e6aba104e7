//! The "wire it yourself" transport: the peer's outgoing frames come out of a bounded stream
//! ([`OutboundFrames`]) for you to ship over any medium (a socket, a message bus, a test harness), and
//! you hand the frames that arrive for this peer back in with [`ManualTransport::accept`].
//!
//! One [`ManualTransport`] serves one peer. Addressing is yours: an [`OutboundFrame`] says whom it is for
//! (`Some(peer)`, or `None` for every other peer of the cluster), and whatever you `accept` is delivered
//! to the connected peer as is.
//!
//! ```
//! use bytes::Bytes;
//! use hamok_runtime::raft::PeerId;
//! use hamok_runtime::transport::manual::ManualTransport;
//! use hamok_runtime::transport::{Inbound, Transport};
//!
//! #[tokio::main]
//! async fn main() {
//!     let (transport_a, mut out_a) = ManualTransport::new(1024);
//!     let (transport_b, _out_b) = ManualTransport::new(1024);
//!     let (got_tx, mut got_rx) = tokio::sync::mpsc::unbounded_channel();
//!
//!     let link_a = transport_a
//!         .connect("cluster", PeerId::from("a"), Inbound::new(64, |_| {}))
//!         .await
//!         .unwrap();
//!     let _link_b = transport_b
//!         .connect("cluster", PeerId::from("b"), Inbound::new(64, move |f| got_tx.send(f).unwrap()))
//!         .await
//!         .unwrap();
//!
//!     link_a.send(&PeerId::from("b"), Bytes::from_static(b"hi")).unwrap();
//!     // Your medium: here, a direct hand-over from a's outbound stream to b.
//!     let out = out_a.recv().await.unwrap();
//!     assert_eq!(out.to, Some(PeerId::from("b")));
//!     transport_b.accept(out.frame).unwrap();
//!     assert_eq!(got_rx.recv().await.unwrap(), Bytes::from_static(b"hi"));
//! }
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use tokio::sync::mpsc;

use super::{BoxFuture, CloseSignal, Inbound, Link, Transport};
use crate::error::HamokError;
use crate::raft::PeerId;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One frame the peer wants sent: ship `frame` to `to` (or to every other peer of the cluster when `to`
/// is `None`) over your medium, where the receiving side hands it to its [`ManualTransport::accept`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboundFrame {
    /// The target peer; `None` for a broadcast to every other peer of the cluster.
    pub to: Option<PeerId>,
    /// The encoded frame, opaque to the transport.
    pub frame: Bytes,
}

/// The bounded stream of the frames a [`ManualTransport`]'s peer sends. Drain it promptly: when it is
/// full, further sends fail with [`HamokError::Busy`] and are dropped. Dropping it kills the link (the
/// peer's [`Link::closed`] resolves and reconnecting fails).
#[derive(Debug)]
pub struct OutboundFrames {
    rx: mpsc::Receiver<OutboundFrame>,
}

impl OutboundFrames {
    /// The next frame to ship, waiting for one; `None` once every [`ManualTransport`] clone (and every
    /// link made from one) has been dropped.
    pub async fn recv(&mut self) -> Option<OutboundFrame> {
        self.rx.recv().await
    }

    /// The next frame to ship if one is queued, without waiting.
    pub fn try_recv(&mut self) -> Option<OutboundFrame> {
        self.rx.try_recv().ok()
    }

    /// How many frames are queued.
    pub fn len(&self) -> usize {
        self.rx.len()
    }

    /// Whether no frame is queued.
    pub fn is_empty(&self) -> bool {
        self.rx.is_empty()
    }

    /// The underlying Tokio receiver (e.g. to wrap it in a stream adapter).
    pub fn into_inner(self) -> mpsc::Receiver<OutboundFrame> {
        self.rx
    }
}

/// The current connection of the peer.
struct Current {
    link_id: u64,
    local: PeerId,
    inbound: Inbound,
    signal: Arc<CloseSignal>,
}

struct ManualInner {
    tx: mpsc::Sender<OutboundFrame>,
    current: Mutex<Option<Arc<Current>>>,
    next_link_id: AtomicU64,
    dropped: AtomicU64,
}

impl ManualInner {
    /// Ends the connection `link_id` (any connection when `None`) with `reason`; true if one ended.
    fn end(&self, link_id: Option<u64>, reason: &str) -> bool {
        let ended = {
            let mut current = lock(&self.current);
            match current.as_ref() {
                Some(c) if link_id.is_none_or(|id| id == c.link_id) => current.take(),
                _ => None,
            }
        };
        match ended {
            Some(c) => c.signal.close(reason),
            None => false,
        }
    }
}

/// A [`Transport`] for one peer whose frames you carry yourself: outgoing frames come out of the
/// [`OutboundFrames`] stream returned by [`ManualTransport::new`], incoming ones go in through
/// [`ManualTransport::accept`]. Cheap to clone (clones share the peer's connection).
///
/// [`connect`](Transport::connect) again (as the runtime does after the link dies) replaces the previous
/// connection and closes its link. [`disconnect`](ManualTransport::disconnect) kills the current link,
/// for when your medium went down and the runtime should reconnect.
#[derive(Clone)]
pub struct ManualTransport {
    inner: Arc<ManualInner>,
}

impl std::fmt::Debug for ManualTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ManualTransport")
            .field("local", &self.local())
            .field(
                "queued",
                &(self.inner.tx.max_capacity() - self.inner.tx.capacity()),
            )
            .field("dropped", &self.dropped())
            .finish()
    }
}

impl ManualTransport {
    /// A transport whose outgoing frames queue, at most `capacity` of them (at least 1), in the
    /// returned [`OutboundFrames`].
    pub fn new(capacity: usize) -> (ManualTransport, OutboundFrames) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let transport = ManualTransport {
            inner: Arc::new(ManualInner {
                tx,
                current: Mutex::new(None),
                next_link_id: AtomicU64::new(1),
                dropped: AtomicU64::new(0),
            }),
        };
        (transport, OutboundFrames { rx })
    }

    /// Hands in a frame received from your medium for this peer. Never blocks.
    ///
    /// # Errors
    ///
    /// [`HamokError::Transport`] when the peer is not connected (the frame is dropped; Raft
    /// retransmits), [`HamokError::Busy`] when the peer's [`Inbound`] is saturated (dropped and counted
    /// by [`Inbound::dropped`]).
    pub fn accept(&self, frame: Bytes) -> Result<(), HamokError> {
        let current = lock(&self.inner.current).clone();
        let Some(current) = current else {
            return Err(HamokError::Transport {
                context: "manual transport: not connected".to_string(),
                source: None,
            });
        };
        if current.inbound.deliver(frame) {
            Ok(())
        } else {
            Err(HamokError::Busy("inbound queue full"))
        }
    }

    /// Kills the current link (its [`Link::closed`] resolves with "disconnected" and its sends fail), so
    /// the runtime reconnects. Returns false if no peer was connected.
    pub fn disconnect(&self) -> bool {
        self.inner.end(None, "disconnected")
    }

    /// The connected peer, if any.
    pub fn local(&self) -> Option<PeerId> {
        lock(&self.inner.current).as_ref().map(|c| c.local.clone())
    }

    /// Whether a peer is connected.
    pub fn is_connected(&self) -> bool {
        lock(&self.inner.current).is_some()
    }

    /// Outgoing frames dropped because [`OutboundFrames`] was full.
    pub fn dropped(&self) -> u64 {
        self.inner.dropped.load(Ordering::Relaxed)
    }
}

impl Transport for ManualTransport {
    fn connect(
        &self,
        cluster: &str,
        local: PeerId,
        inbound: Inbound,
    ) -> BoxFuture<Result<Arc<dyn Link>, HamokError>> {
        let inner = self.inner.clone();
        let cluster = cluster.to_string();
        Box::pin(async move {
            if inner.tx.is_closed() {
                return Err(HamokError::Transport {
                    context: "manual transport: outbound stream dropped".to_string(),
                    source: None,
                });
            }
            let link_id = inner.next_link_id.fetch_add(1, Ordering::Relaxed);
            let signal = Arc::new(CloseSignal::new());
            let new = Arc::new(Current {
                link_id,
                local: local.clone(),
                inbound,
                signal: signal.clone(),
            });
            let old = lock(&inner.current).replace(new);
            if let Some(old) = old {
                old.signal
                    .close("replaced by a new connection of the same peer");
            }
            tracing::debug!(cluster = %cluster, peer = %local, "manual transport: connected");
            let link: Arc<dyn Link> = Arc::new(ManualLink {
                inner,
                link_id,
                signal,
            });
            Ok(link)
        })
    }
}

/// The link of a [`ManualTransport`]. Dropping it closes it.
struct ManualLink {
    inner: Arc<ManualInner>,
    link_id: u64,
    signal: Arc<CloseSignal>,
}

impl ManualLink {
    fn push(&self, to: Option<PeerId>, frame: Bytes) -> Result<(), HamokError> {
        if self.signal.is_closed() {
            return Err(HamokError::Transport {
                context: "link closed".to_string(),
                source: None,
            });
        }
        match self.inner.tx.try_send(OutboundFrame { to, frame }) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.inner.dropped.fetch_add(1, Ordering::Relaxed);
                Err(HamokError::Busy("outbound queue full"))
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.inner
                    .end(Some(self.link_id), "outbound stream dropped");
                self.signal.close("outbound stream dropped");
                Err(HamokError::Transport {
                    context: "manual transport: outbound stream dropped".to_string(),
                    source: None,
                })
            }
        }
    }
}

impl Link for ManualLink {
    fn send(&self, to: &PeerId, frame: Bytes) -> Result<(), HamokError> {
        self.push(Some(to.clone()), frame)
    }

    fn broadcast(&self, frame: Bytes) -> Result<(), HamokError> {
        self.push(None, frame)
    }

    fn closed(&self) -> BoxFuture<String> {
        let wait = self.signal.wait();
        let signal = self.signal.clone();
        let tx = self.inner.tx.clone();
        Box::pin(async move {
            tokio::select! {
                reason = wait => reason,
                () = tx.closed() => {
                    signal.close("outbound stream dropped");
                    "outbound stream dropped".to_string()
                }
            }
        })
    }

    fn close(&self) {
        self.inner.end(Some(self.link_id), "closed");
        self.signal.close("closed");
    }
}

impl Drop for ManualLink {
    fn drop(&mut self) {
        if !self.signal.is_closed() {
            self.close();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn pid(s: &str) -> PeerId {
        PeerId::from(s)
    }

    fn b(s: &'static str) -> Bytes {
        Bytes::from_static(s.as_bytes())
    }

    /// An inbound that forwards to a channel and marks each frame processed at once.
    fn forwarding() -> (Inbound, mpsc::UnboundedReceiver<Bytes>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let slot: Arc<Mutex<Option<Inbound>>> = Arc::new(Mutex::new(None));
        let me = slot.clone();
        let inbound = Inbound::new(1024, move |frame| {
            let _ = tx.send(frame);
            if let Some(i) = me.lock().unwrap().as_ref() {
                i.processed();
            }
        });
        *slot.lock().unwrap() = Some(inbound.clone());
        (inbound, rx)
    }

    /// Ships every frame of `out` (from peer `from`) to the peers of `net` it is addressed to.
    fn pump(
        from: PeerId,
        mut out: OutboundFrames,
        net: Vec<(PeerId, ManualTransport)>,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            while let Some(OutboundFrame { to, frame }) = out.recv().await {
                for (peer, transport) in &net {
                    let addressed = match &to {
                        Some(to) => to == peer,
                        None => *peer != from,
                    };
                    if addressed {
                        let _ = transport.accept(frame.clone());
                    }
                }
            }
        })
    }

    async fn next(rx: &mut mpsc::UnboundedReceiver<Bytes>) -> Bytes {
        tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("frame in time")
            .expect("channel open")
    }

    #[tokio::test]
    async fn round_trip_between_peers_wired_by_hand() {
        let names = ["a", "b", "c"];
        let mut transports = Vec::new();
        let mut outs = Vec::new();
        for _ in names {
            let (t, o) = ManualTransport::new(64);
            transports.push(t);
            outs.push(o);
        }
        let net: Vec<(PeerId, ManualTransport)> = names
            .iter()
            .map(|n| pid(n))
            .zip(transports.iter().cloned())
            .collect();
        let mut links = Vec::new();
        let mut rxs = Vec::new();
        for (name, t) in names.iter().zip(&transports) {
            let (inbound, rx) = forwarding();
            links.push(t.connect("c", pid(name), inbound).await.unwrap());
            rxs.push(rx);
        }
        let pumps: Vec<_> = names
            .iter()
            .zip(outs)
            .map(|(n, o)| pump(pid(n), o, net.clone()))
            .collect();

        links[0].send(&pid("b"), b("a->b")).unwrap();
        assert_eq!(next(&mut rxs[1]).await, b("a->b"));
        links[1].send(&pid("a"), b("b->a")).unwrap();
        assert_eq!(next(&mut rxs[0]).await, b("b->a"));
        links[2].broadcast(b("from c")).unwrap();
        assert_eq!(next(&mut rxs[0]).await, b("from c"));
        assert_eq!(next(&mut rxs[1]).await, b("from c"));
        tokio::task::yield_now().await;
        assert!(rxs[2].try_recv().is_err(), "no echo of a broadcast");
        assert_eq!(transports[1].local(), Some(pid("b")));

        for p in pumps {
            p.abort();
        }
    }

    #[tokio::test]
    async fn stream_ends_when_transport_and_links_are_gone() {
        let (t, mut out) = ManualTransport::new(8);
        let link = t
            .connect("c", pid("a"), Inbound::new(8, |_| {}))
            .await
            .unwrap();
        link.send(&pid("b"), b("last")).unwrap();
        drop(t);
        assert_eq!(out.recv().await.unwrap().frame, b("last"));
        drop(link);
        let end = tokio::time::timeout(Duration::from_secs(5), out.recv()).await;
        assert_eq!(end.unwrap(), None);
    }

    #[tokio::test]
    async fn frames_come_out_in_order_with_their_target() {
        let (t, mut out) = ManualTransport::new(8);
        let link = t
            .connect("c", pid("a"), Inbound::new(1, |_| {}))
            .await
            .unwrap();
        link.send(&pid("b"), b("1")).unwrap();
        link.broadcast(b("2")).unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!(
            out.recv().await.unwrap(),
            OutboundFrame {
                to: Some(pid("b")),
                frame: b("1")
            }
        );
        assert_eq!(
            out.try_recv().unwrap(),
            OutboundFrame {
                to: None,
                frame: b("2")
            }
        );
        assert!(out.try_recv().is_none());
        assert!(out.is_empty());
    }

    #[tokio::test]
    async fn full_outbound_queue_is_busy_and_counted() {
        let (t, mut out) = ManualTransport::new(2);
        let link = t
            .connect("c", pid("a"), Inbound::new(1, |_| {}))
            .await
            .unwrap();
        link.send(&pid("b"), b("1")).unwrap();
        link.broadcast(b("2")).unwrap();
        assert_eq!(
            link.send(&pid("b"), b("3")),
            Err(HamokError::Busy("outbound queue full"))
        );
        assert_eq!(
            link.broadcast(b("4")),
            Err(HamokError::Busy("outbound queue full"))
        );
        assert_eq!(t.dropped(), 2);
        out.recv().await.unwrap();
        link.send(&pid("b"), b("5")).unwrap();
        assert_eq!(t.dropped(), 2);
    }

    #[tokio::test]
    async fn accept_errors() {
        let (t, _out) = ManualTransport::new(2);
        assert!(matches!(
            t.accept(b("x")),
            Err(HamokError::Transport { .. })
        ));
        let inbound = Inbound::new(1, |_| {});
        let link = t.connect("c", pid("a"), inbound.clone()).await.unwrap();
        t.accept(b("1")).unwrap();
        // Not processed yet: the inbound (capacity 1) is saturated.
        assert_eq!(
            t.accept(b("2")),
            Err(HamokError::Busy("inbound queue full"))
        );
        assert_eq!(inbound.dropped(), 1);
        inbound.processed();
        t.accept(b("3")).unwrap();
        link.close();
        assert!(!t.is_connected());
        assert!(matches!(
            t.accept(b("4")),
            Err(HamokError::Transport { .. })
        ));
    }

    #[tokio::test]
    async fn disconnect_close_and_replace() {
        let (t, _out) = ManualTransport::new(8);
        let first = t
            .connect("c", pid("a"), Inbound::new(8, |_| {}))
            .await
            .unwrap();
        let closed = first.closed();
        let second = t
            .connect("c", pid("a"), Inbound::new(8, |_| {}))
            .await
            .unwrap();
        let reason = tokio::time::timeout(Duration::from_secs(5), closed)
            .await
            .unwrap();
        assert!(reason.contains("replaced"), "{reason}");
        assert!(first.send(&pid("b"), b("x")).is_err());
        drop(first); // does not end the replacement
        assert!(t.is_connected());
        second.send(&pid("b"), b("x")).unwrap();

        let closed = second.closed();
        assert!(t.disconnect());
        assert_eq!(closed.await, "disconnected");
        assert!(!t.disconnect());
        assert!(second.broadcast(b("x")).is_err());

        let third = t
            .connect("c", pid("a"), Inbound::new(8, |_| {}))
            .await
            .unwrap();
        third.close();
        third.close();
        assert_eq!(third.closed().await, "closed");
        assert!(!t.is_connected());
    }

    #[tokio::test]
    async fn dropped_outbound_stream_kills_the_link() {
        let (t, out) = ManualTransport::new(8);
        let link = t
            .connect("c", pid("a"), Inbound::new(8, |_| {}))
            .await
            .unwrap();
        let closed = link.closed();
        drop(out);
        let reason = tokio::time::timeout(Duration::from_secs(5), closed)
            .await
            .unwrap();
        assert_eq!(reason, "outbound stream dropped");
        assert!(matches!(
            link.send(&pid("b"), b("x")),
            Err(HamokError::Transport { .. })
        ));
        assert!(t
            .connect("c", pid("a"), Inbound::new(8, |_| {}))
            .await
            .is_err());
    }
}
