//! The one [`Link`] both broker adapters use: [`BusLink`], parameterised by the few things a broker
//! does its own way ([`Bus`]: how a frame is addressed, refused or torn down; [`Publisher`]: how queued
//! frames are written; a stream of [`Received`] messages: how frames arrive).
//!
//! What every link does the same way lives here:
//!
//! - `send` checks the target id (counted in `dropped_invalid_target`), `send` and `broadcast` refuse
//!   at once on a dead link (`dropped_link_down`) or whatever the bus refuses, and put the frame in a
//!   bounded queue without waiting (a full queue: `dropped_queue_full`);
//! - a writer task drains that queue in batches of at most [`Publisher::batch_limit`] frames, each batch
//!   written before the next is taken; a publisher error kills the link;
//! - a reader task hands each received frame straight to the peer's bounded [`Inbound`]
//!   (`frames_received`, `bytes_received`, `dropped_inbound_full`, `self_echo_skipped`), and kills
//!   the link when the broker's stream fails or ends;
//! - a death is counted once (`links_lost`, and `disconnects` where a dead link is a lost connection),
//!   `closed()` resolves with the first reason, `close()` is idempotent, stops every task of the link and
//!   tears the connection down (also on drop).

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use hamok_runtime::raft::PeerId;
use hamok_runtime::transport::{BoxFuture, CloseSignal, Inbound, Link};
use hamok_runtime::HamokError;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::common::{is_valid_token, Counters};

/// How one broker addresses, admits and tears down the frames of a [`BusLink`].
pub(crate) trait Bus: Send + Sync + 'static {
    /// Where a queued frame goes (a NATS subject, an AMQP routing key).
    type Address: Send + 'static;

    /// What a peer id must be usable as, for the error of an invalid target ("a NATS subject token").
    const TARGET: &'static str;

    /// The address of the frames unicast to `to` (a valid token: [`is_valid_token`] holds).
    fn unicast(&self, to: &PeerId) -> Self::Address;

    /// The address of the cluster's broadcasts.
    fn broadcast(&self) -> Self::Address;

    /// Refuses (and counts) a frame the broker cannot take right now, before it is queued. Called only
    /// while the link is alive. Default: every frame is admitted.
    fn admit(&self, _frame: &Bytes, _counters: &Counters) -> Result<(), HamokError> {
        Ok(())
    }

    /// Disconnects from the broker, without waiting (called once, by the first `close`, after the
    /// link's tasks were stopped).
    fn shutdown(&self);
}

/// How one broker writes the frames of a [`BusLink`]'s queue; runs in the link's writer task.
pub(crate) trait Publisher<A>: Send + 'static {
    /// The most frames taken from the queue at once (at least 1).
    fn batch_limit(&self) -> usize;

    /// Writes `batch`, in order, counting each frame (`frames_sent` and `bytes_sent`, or the reason it
    /// was lost). `Err(reason)` kills the link. The batch is cleared afterwards.
    fn publish(
        &mut self,
        batch: &mut Vec<(A, Bytes)>,
        counters: &Counters,
    ) -> impl Future<Output = Result<(), String>> + Send;
}

/// One message from the broker, as the reader task sees it. (NATS never echoes a peer's own frames,
/// `no_echo`, and reports a failed connection through its events: only RabbitMQ makes the last two.)
#[derive(Debug)]
#[cfg_attr(not(feature = "rabbitmq"), allow(dead_code))]
pub(crate) enum Received {
    /// A frame for the peer.
    Frame(Bytes),
    /// The peer's own broadcast, routed back to it by the broker: skipped and counted.
    OwnEcho,
    /// The broker's stream failed: the link dies with this reason.
    Failed(String),
}

/// The "alive or dead" state of one link, shared by the link, its tasks and any broker callback.
#[derive(Debug)]
pub(crate) struct LinkState {
    signal: CloseSignal,
    counters: Arc<Counters>,
    death_is_disconnect: bool,
}

impl LinkState {
    /// A live link counting into `counters`. With `death_is_disconnect`, a death also counts as a lost
    /// broker connection (`disconnects`): where a link cannot outlive its connection (RabbitMQ); a
    /// client that reconnects by itself (NATS) counts its disconnects from its own events instead.
    pub(crate) fn new(counters: Arc<Counters>, death_is_disconnect: bool) -> Arc<Self> {
        Arc::new(LinkState {
            signal: CloseSignal::new(),
            counters,
            death_is_disconnect,
        })
    }

    /// The counters of the transport that made the link.
    pub(crate) fn counters(&self) -> &Counters {
        &self.counters
    }

    /// The link failed: resolve `closed()` with `reason` (counted once; nothing if already dead).
    pub(crate) fn die(&self, reason: impl Into<String>) {
        if self.signal.close(reason) {
            if self.death_is_disconnect {
                Counters::bump(&self.counters.disconnects);
            }
            Counters::bump(&self.counters.links_lost);
        }
    }
}

/// The background tasks of one link, aborted together when the link is closed or dropped.
#[derive(Debug, Default)]
struct Tasks(Mutex<Vec<JoinHandle<()>>>);

impl Tasks {
    fn push(&self, handle: JoinHandle<()>) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(handle);
    }

    fn abort_all(&self) {
        for t in self.0.lock().unwrap_or_else(|e| e.into_inner()).drain(..) {
            t.abort();
        }
    }
}

impl Drop for Tasks {
    fn drop(&mut self) {
        self.abort_all();
    }
}

/// One peer's link over a broker (see the [module docs](self)). Dropping it closes it.
pub(crate) struct BusLink<B: Bus> {
    state: Arc<LinkState>,
    bus: B,
    tx: mpsc::Sender<(B::Address, Bytes)>,
    tasks: Tasks,
    torn_down: AtomicBool,
}

impl<B: Bus> BusLink<B> {
    /// Starts a link (counted in `links_opened`): a writer task draining a queue of
    /// `outbound_capacity` frames into `publisher`, and a reader task handing the frames of `received`
    /// to `inbound`; the link dies with `ended` when that stream ends.
    pub(crate) fn start<P, S>(
        state: Arc<LinkState>,
        bus: B,
        publisher: P,
        outbound_capacity: usize,
        received: S,
        inbound: Inbound,
        ended: &'static str,
    ) -> Self
    where
        P: Publisher<B::Address>,
        S: Stream<Item = Received> + Send + 'static,
    {
        let (tx, rx) = mpsc::channel(outbound_capacity);
        let tasks = Tasks::default();
        tasks.push(tokio::spawn(read(received, inbound, state.clone(), ended)));
        tasks.push(tokio::spawn(write(rx, publisher, state.clone())));
        Counters::bump(&state.counters.links_opened);
        BusLink {
            state,
            bus,
            tx,
            tasks,
            torn_down: AtomicBool::new(false),
        }
    }

    /// Runs `task` (a watchdog) for as long as the link lives.
    pub(crate) fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        self.tasks.push(tokio::spawn(task));
    }

    fn queue(&self, address: B::Address, frame: Bytes) -> Result<(), HamokError> {
        let counters = self.state.counters();
        if self.state.signal.is_closed() {
            Counters::bump(&counters.dropped_link_down);
            return Err(link_closed());
        }
        self.bus.admit(&frame, counters)?;
        enqueue(&self.tx, (address, frame), counters)
    }
}

impl<B: Bus> Link for BusLink<B> {
    fn send(&self, to: &PeerId, frame: Bytes) -> Result<(), HamokError> {
        if !is_valid_token(to.as_str()) {
            Counters::bump(&self.state.counters.dropped_invalid_target);
            return Err(HamokError::Transport {
                context: format!("peer id {to:?} cannot be {}", B::TARGET),
                source: None,
            });
        }
        self.queue(self.bus.unicast(to), frame)
    }

    fn broadcast(&self, frame: Bytes) -> Result<(), HamokError> {
        self.queue(self.bus.broadcast(), frame)
    }

    fn closed(&self) -> BoxFuture<String> {
        Box::pin(self.state.signal.wait())
    }

    fn close(&self) {
        self.state.signal.close("closed");
        if self.torn_down.swap(true, Ordering::AcqRel) {
            return;
        }
        self.tasks.abort_all();
        self.bus.shutdown();
    }
}

impl<B: Bus> Drop for BusLink<B> {
    fn drop(&mut self) {
        self.close();
    }
}

/// The error of a frame given to a dead link.
fn link_closed() -> HamokError {
    HamokError::Transport {
        context: "link closed".into(),
        source: None,
    }
}

/// Queues `item` for the writer task without ever waiting: a full queue drops (and counts) the frame.
fn enqueue<T>(tx: &mpsc::Sender<T>, item: T, counters: &Counters) -> Result<(), HamokError> {
    match tx.try_send(item) {
        Ok(()) => Ok(()),
        Err(mpsc::error::TrySendError::Full(_)) => {
            Counters::bump(&counters.dropped_queue_full);
            Err(HamokError::Busy("transport outbound queue full"))
        }
        Err(mpsc::error::TrySendError::Closed(_)) => {
            Counters::bump(&counters.dropped_link_down);
            Err(link_closed())
        }
    }
}

/// The reader task: from the broker straight into the peer's bounded inbound, never waiting on it.
async fn read<S>(received: S, inbound: Inbound, state: Arc<LinkState>, ended: &'static str)
where
    S: Stream<Item = Received>,
{
    let mut received = std::pin::pin!(received);
    while let Some(message) = received.next().await {
        let counters = state.counters();
        match message {
            Received::Frame(frame) => {
                Counters::bump(&counters.frames_received);
                Counters::add(&counters.bytes_received, frame.len() as u64);
                if !inbound.deliver(frame) {
                    Counters::bump(&counters.dropped_inbound_full);
                }
            }
            Received::OwnEcho => Counters::bump(&counters.self_echo_skipped),
            Received::Failed(reason) => {
                state.die(reason);
                return;
            }
        }
    }
    state.die(ended);
}

/// The writer task: batches from the bounded queue, each written before the next is taken.
async fn write<A, P>(mut rx: mpsc::Receiver<(A, Bytes)>, mut publisher: P, state: Arc<LinkState>)
where
    P: Publisher<A>,
{
    let limit = publisher.batch_limit().max(1);
    let mut batch = Vec::with_capacity(limit);
    while rx.recv_many(&mut batch, limit).await > 0 {
        let outcome = publisher.publish(&mut batch, state.counters()).await;
        batch.clear();
        if let Err(reason) = outcome {
            state.die(reason);
            return;
        }
    }
}

/// [`Transport::connect`](hamok_runtime::transport::Transport::connect) of an adapter: runs
/// `connecting` and counts a failure in `connect_failures`.
pub(crate) fn counted_connect<L, F>(
    counters: Arc<Counters>,
    connecting: F,
) -> BoxFuture<Result<Arc<dyn Link>, HamokError>>
where
    L: Link,
    F: Future<Output = Result<L, HamokError>> + Send + 'static,
{
    Box::pin(async move {
        match connecting.await {
            Ok(link) => Ok(Arc::new(link) as Arc<dyn Link>),
            Err(e) => {
                Counters::bump(&counters.connect_failures);
                Err(e)
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// A broker of the test: addresses are strings, a frame of more than 4 bytes is refused, published
    /// frames go to a channel, and a frame "fail" fails the publish.
    struct FakeBus {
        shut: Arc<AtomicBool>,
    }

    impl Bus for FakeBus {
        type Address = String;
        const TARGET: &'static str = "a fake token";

        fn unicast(&self, to: &PeerId) -> String {
            format!("peer.{to}")
        }

        fn broadcast(&self) -> String {
            "all".into()
        }

        fn admit(&self, frame: &Bytes, counters: &Counters) -> Result<(), HamokError> {
            if frame.len() > 4 {
                Counters::bump(&counters.dropped_too_large);
                return Err(HamokError::TooLarge {
                    size: frame.len(),
                    limit: 4,
                });
            }
            Ok(())
        }

        fn shutdown(&self) {
            assert!(!self.shut.swap(true, Ordering::AcqRel), "shut down twice");
        }
    }

    struct FakePublisher {
        out: mpsc::UnboundedSender<(String, Bytes)>,
        /// Holds the writer until a permit is given, so the queue can be filled.
        gate: Arc<tokio::sync::Semaphore>,
    }

    impl Publisher<String> for FakePublisher {
        fn batch_limit(&self) -> usize {
            2
        }

        async fn publish(
            &mut self,
            batch: &mut Vec<(String, Bytes)>,
            counters: &Counters,
        ) -> Result<(), String> {
            if let Ok(permit) = self.gate.acquire().await {
                permit.forget();
            }
            for (to, frame) in batch.drain(..) {
                if frame == "fail" {
                    Counters::bump(&counters.dropped_publish_failed);
                    return Err("publish failed".into());
                }
                Counters::bump(&counters.frames_sent);
                Counters::bump(&counters.messages_sent);
                Counters::add(&counters.bytes_sent, frame.len() as u64);
                let _ = self.out.send((to, frame));
            }
            Ok(())
        }
    }

    struct Fixture {
        link: BusLink<FakeBus>,
        counters: Arc<Counters>,
        out: mpsc::UnboundedReceiver<(String, Bytes)>,
        gate: Arc<tokio::sync::Semaphore>,
        feed: mpsc::UnboundedSender<Received>,
        got: Arc<Mutex<Vec<Bytes>>>,
        shut: Arc<AtomicBool>,
    }

    /// A link with a queue of `capacity`, an inbound of 2 frames, a closed writer gate.
    fn fixture(capacity: usize, death_is_disconnect: bool) -> Fixture {
        let counters = Arc::new(Counters::default());
        let state = LinkState::new(counters.clone(), death_is_disconnect);
        let (out_tx, out) = mpsc::unbounded_channel();
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let (feed, feed_rx) = mpsc::unbounded_channel();
        let got: Arc<Mutex<Vec<Bytes>>> = Arc::default();
        let sink = got.clone();
        let inbound = Inbound::new(2, move |f| sink.lock().unwrap().push(f));
        let shut = Arc::new(AtomicBool::new(false));
        let link = BusLink::start(
            state,
            FakeBus { shut: shut.clone() },
            FakePublisher {
                out: out_tx,
                gate: gate.clone(),
            },
            capacity,
            stream_of(feed_rx),
            inbound,
            "feed ended",
        );
        Fixture {
            link,
            counters,
            out,
            gate,
            feed,
            got,
            shut,
        }
    }

    fn stream_of(
        mut rx: mpsc::UnboundedReceiver<Received>,
    ) -> impl Stream<Item = Received> + Send + 'static {
        futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
    }

    async fn within<T>(f: impl Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(5), f)
            .await
            .expect("in time")
    }

    fn b(s: &'static str) -> Bytes {
        Bytes::from_static(s.as_bytes())
    }

    #[tokio::test]
    async fn addresses_refusals_and_a_full_queue() {
        let mut f = fixture(2, false);
        assert!(f.link.send(&PeerId::from("a.b"), b("x")).is_err());
        assert!(matches!(
            f.link.broadcast(b("toolong")),
            Err(HamokError::TooLarge { size: 7, limit: 4 })
        ));
        // The writer takes one batch and waits at the gate; then the queue (2) fills.
        f.link.send(&PeerId::from("p"), b("1")).unwrap();
        f.link.broadcast(b("2")).unwrap();
        tokio::task::yield_now().await;
        let mut refused = 0;
        for _ in 0..5 {
            if let Err(e) = f.link.broadcast(b("3")) {
                assert_eq!(e, HamokError::Busy("transport outbound queue full"));
                refused += 1;
            }
        }
        assert!(refused >= 3, "{refused}");
        f.gate.add_permits(100);
        assert_eq!(within(f.out.recv()).await, Some(("peer.p".into(), b("1"))));
        assert_eq!(within(f.out.recv()).await, Some(("all".into(), b("2"))));
        let s = f.counters.snapshot();
        assert_eq!(s.dropped_invalid_target, 1);
        assert_eq!(s.dropped_too_large, 1);
        assert_eq!(s.dropped_queue_full, refused);
        assert_eq!(s.links_opened, 1);
    }

    #[tokio::test]
    async fn reader_counts_and_dies_when_the_stream_ends() {
        let f = fixture(8, true);
        let closed = f.link.closed();
        for frame in ["a", "b", "c"] {
            f.feed.send(Received::Frame(b(frame))).unwrap();
        }
        f.feed.send(Received::OwnEcho).unwrap();
        drop(f.feed);
        assert_eq!(within(closed).await, "feed ended");
        assert_eq!(*f.got.lock().unwrap(), vec![b("a"), b("b")]);
        let s = f.counters.snapshot();
        assert_eq!(
            (
                s.frames_received,
                s.bytes_received,
                s.dropped_inbound_full,
                s.self_echo_skipped
            ),
            (3, 3, 1, 1)
        );
        assert_eq!((s.links_lost, s.disconnects), (1, 1));
        assert!(matches!(
            f.link.send(&PeerId::from("p"), b("x")),
            Err(HamokError::Transport { .. })
        ));
        assert_eq!(f.counters.snapshot().dropped_link_down, 1);
    }

    #[tokio::test]
    async fn failures_kill_the_link_once() {
        let f = fixture(8, false);
        f.gate.add_permits(100);
        f.link.broadcast(b("fail")).unwrap();
        assert_eq!(within(f.link.closed()).await, "publish failed");
        f.feed.send(Received::Failed("later".into())).unwrap();
        tokio::task::yield_now().await;
        assert_eq!(f.link.closed().await, "publish failed");
        let s = f.counters.snapshot();
        assert_eq!((s.links_lost, s.disconnects), (1, 0));
    }

    #[tokio::test]
    async fn close_is_idempotent_and_not_a_loss() {
        let f = fixture(8, true);
        let closed = f.link.closed();
        f.link.close();
        f.link.close();
        assert_eq!(within(closed).await, "closed");
        assert!(f.shut.load(Ordering::Acquire));
        assert!(f.link.broadcast(b("x")).is_err());
        drop(f.link); // closes again: no second shutdown
        let s = f.counters.snapshot();
        assert_eq!(
            (s.links_lost, s.disconnects, s.dropped_link_down),
            (0, 0, 1)
        );
    }

    #[tokio::test]
    async fn full_queue_drops_and_counts() {
        let counters = Counters::default();
        let (tx, rx) = mpsc::channel(2);
        enqueue(&tx, 1, &counters).unwrap();
        enqueue(&tx, 2, &counters).unwrap();
        assert!(enqueue(&tx, 3, &counters).is_err());
        drop(rx);
        assert!(enqueue(&tx, 4, &counters).is_err());
        let s = counters.snapshot();
        assert_eq!(
            (s.dropped_queue_full, s.dropped_link_down, s.dropped),
            (1, 1, 2)
        );
    }

    #[tokio::test]
    async fn failed_connect_is_counted() {
        let counters = Arc::new(Counters::default());
        let r = counted_connect(counters.clone(), async {
            Err::<BusLink<FakeBus>, _>(link_closed())
        })
        .await;
        assert!(r.is_err());
        assert_eq!(counters.snapshot().connect_failures, 1);
    }
}
