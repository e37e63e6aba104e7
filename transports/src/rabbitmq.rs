//! The RabbitMQ adapter: [`AmqpTransport`], over lapin (AMQP 0-9-1).
//!
//! # Topology
//!
//! With the default prefix `hamok`, cluster `c` has one topic exchange `hamok.c` (non-durable,
//! auto-deleted once no queue is bound to it). Each link of peer `p` declares one server-named,
//! exclusive, auto-delete queue (gone with its connection), bound to the exchange with the routing keys
//! `all` (broadcasts) and `peer.p` (frames unicast to `p`), and consumes it with no acknowledgements:
//! Raft retransmits, so a frame lost anywhere only costs a retry. The queue is bounded on the broker, in
//! messages ([`AmqpTransportBuilder::queue_max_length`], `x-max-length`) and in bytes
//! ([`AmqpTransportBuilder::queue_max_bytes`], `x-max-length-bytes`), oldest dropped first: a peer that
//! stops reading costs the broker a bounded amount of memory, never the whole node's.
//!
//! Cluster and peer ids must be 1 to 128 bytes of `[A-Za-z0-9_-]` (the runtime's configuration already
//! insists on it): `.`, `*` and `#` mean something in topic routing keys, so anything else is refused.
//! Frames are published raw (the encoded [`hamok_runtime::wire::Frame`]) with the sender's peer id as
//! `app_id`, and the frames one batch of the writer holds for the same peer travel in one message
//! (`batch.rs`: a broker's cost is per message; a broadcast is never moved across); the exchange
//! routes a peer's broadcasts back to its own queue too, and the consumer skips those
//! ([`TransportStats::self_echo_skipped`]).
//!
//! # Flow control
//!
//! [`Link::send`] and [`Link::broadcast`] never wait: frames go into a bounded per-link queue
//! ([`AmqpTransportBuilder::outbound_capacity`]) and a writer task publishes them in batches of up to
//! [`AmqpTransportBuilder::publish_batch`], waiting for each batch to be written before taking the next:
//! when the broker pushes back (TCP backpressure, `connection.blocked`), the queue fills and further
//! frames are refused and counted, never buffered without bound. Publisher confirms are off by default
//! ([`AmqpTransportBuilder::publisher_confirms`]): they add a broker round trip per batch and Raft does not
//! need them.
//!
//! # Reconnection
//!
//! lapin does not reconnect by itself here (its auto-recovery is left off: the runtime already
//! supervises links). When the connection, a channel or the consumer fails, [`Link::closed`] resolves;
//! the runtime's supervisor then calls [`Transport::connect`] again with backoff, which connects anew and
//! re-declares the exchange, queue and bindings. Heartbeats ([`AmqpTransportBuilder::heartbeat`], 5 s by
//! default) detect a broker that went silent.
//!
//! TLS (`amqps://`) is not compiled in: lapin is built without a TLS backend to keep builds short.
//!
//! ```no_run
//! # async fn demo() -> Result<(), hamok_runtime::HamokError> {
//! use hamok_runtime::Hamok;
//! use hamok_transports::rabbitmq::AmqpTransport;
//!
//! let transport = AmqpTransport::builder()
//!     .url("amqp://guest:guest@127.0.0.1:5672/%2f")
//!     .build()?;
//! let hamok = Hamok::builder()
//!     .cluster_id("orders")
//!     .transport(transport.clone())
//!     .build()
//!     .await?;
//! hamok.join().await?;
//! println!("{:?}", transport.stats());
//! # Ok(()) }
//! ```

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use hamok_runtime::raft::PeerId;
use hamok_runtime::transport::{BoxFuture, Inbound, Link, Transport};
use hamok_runtime::HamokError;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::uri::{AMQPScheme, AMQPUri};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};

use crate::batch;
use crate::common::{check_prefix, check_token, env_urls, Counters};
use crate::link::{counted_connect, Bus, BusLink, LinkState, Publisher, Received};
use crate::stats::TransportStats;

/// The environment variable naming the broker URL(s) (comma-separated) when the builder names none.
pub const AMQP_URL_ENV: &str = "HAMOK_AMQP_URL";
/// The broker used when neither the builder nor [`AMQP_URL_ENV`] names one.
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// The default first part of every exchange name.
pub const DEFAULT_EXCHANGE_PREFIX: &str = "hamok";
/// The routing key of broadcasts.
pub const BROADCAST_KEY: &str = "all";
/// The default of [`AmqpTransportBuilder::queue_max_bytes`]: 64 MiB.
pub const DEFAULT_QUEUE_MAX_BYTES: u64 = 64 << 20;

/// The routing key of the frames unicast to `peer`.
pub fn peer_routing_key(peer: &str) -> String {
    format!("peer.{peer}")
}

#[derive(Clone)]
struct AmqpConfig {
    uris: Vec<AMQPUri>,
    exchange_prefix: String,
    connection_name: Option<String>,
    outbound_capacity: usize,
    publish_batch: usize,
    publisher_confirms: bool,
    connect_timeout: Duration,
    queue_max_length: Option<u32>,
    queue_max_bytes: Option<u64>,
    message_ttl: Option<Duration>,
}

/// Builds an [`AmqpTransport`]; see the [module docs](self).
#[derive(Clone)]
pub struct AmqpTransportBuilder {
    urls: Option<Vec<String>>,
    exchange_prefix: String,
    connection_name: Option<String>,
    outbound_capacity: usize,
    publish_batch: usize,
    publisher_confirms: bool,
    heartbeat: Duration,
    connect_timeout: Duration,
    queue_max_length: Option<u32>,
    queue_max_bytes: Option<u64>,
    message_ttl: Option<Duration>,
}

impl std::fmt::Debug for AmqpTransportBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // URLs carry passwords: not printed.
        f.debug_struct("AmqpTransportBuilder")
            .field("urls", &self.urls.as_ref().map(Vec::len))
            .field("exchange_prefix", &self.exchange_prefix)
            .field("outbound_capacity", &self.outbound_capacity)
            .field("publish_batch", &self.publish_batch)
            .field("publisher_confirms", &self.publisher_confirms)
            .finish_non_exhaustive()
    }
}

impl Default for AmqpTransportBuilder {
    fn default() -> Self {
        AmqpTransportBuilder {
            urls: None,
            exchange_prefix: DEFAULT_EXCHANGE_PREFIX.to_string(),
            connection_name: None,
            outbound_capacity: 65_536,
            publish_batch: batch::DEFAULT_PUBLISH_BATCH,
            publisher_confirms: false,
            heartbeat: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            queue_max_length: Some(100_000),
            queue_max_bytes: Some(DEFAULT_QUEUE_MAX_BYTES),
            message_ttl: None,
        }
    }
}

impl AmqpTransportBuilder {
    /// The broker URL (`amqp://user:password@host:port/vhost`, vhost `/` spelt `%2f`; URL query options
    /// such as `?heartbeat=10&frame_max=131072` honoured). Default: `HAMOK_AMQP_URL`, else
    /// `amqp://guest:guest@127.0.0.1:5672/%2f`.
    pub fn url(self, url: impl Into<String>) -> Self {
        self.urls([url.into()])
    }

    /// Several broker URLs (nodes of one RabbitMQ cluster): each connect tries them in turn.
    pub fn urls<I, S>(mut self, urls: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.urls = Some(urls.into_iter().map(Into::into).collect());
        self
    }

    /// The first part of every exchange name (default `hamok`: cluster `c` uses exchange `hamok.c`).
    pub fn exchange_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.exchange_prefix = prefix.into();
        self
    }

    /// The connection name shown by the broker (default: `hamok <cluster>/<peer>`).
    pub fn connection_name(mut self, name: impl Into<String>) -> Self {
        self.connection_name = Some(name.into());
        self
    }

    /// Most frames waiting to be published, per link (default 65 536); beyond it `send` refuses and
    /// counts them.
    pub fn outbound_capacity(mut self, frames: usize) -> Self {
        self.outbound_capacity = frames;
        self
    }

    /// Most frames the writer publishes before waiting for them to be written (default 256).
    pub fn publish_batch(mut self, frames: usize) -> Self {
        self.publish_batch = frames;
        self
    }

    /// Waits for the broker's confirms of each batch before the next (default off); nacks are counted
    /// in [`TransportStats::dropped_nacked`].
    pub fn publisher_confirms(mut self, yes: bool) -> Self {
        self.publisher_confirms = yes;
        self
    }

    /// The AMQP heartbeat asked for when the URL names none (default 5 s, whole seconds; zero disables).
    pub fn heartbeat(mut self, interval: Duration) -> Self {
        self.heartbeat = interval;
        self
    }

    /// How long connecting and declaring the topology may take (default 5 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Most messages the broker keeps in a peer's queue, oldest dropped first (default 100 000; `None`:
    /// unbounded). A message is one frame, or up to 1,024 frames (at most 1 MiB) that one writer
    /// batch held for the same peer.
    pub fn queue_max_length(mut self, frames: Option<u32>) -> Self {
        self.queue_max_length = frames;
        self
    }

    /// Most bytes of message bodies the broker keeps in a peer's queue, oldest dropped first (default
    /// 64 MiB; `None`: bounded by [`queue_max_length`](Self::queue_max_length) alone). The message
    /// bound alone would let a peer that stops reading hold up to 100 000 messages of up to 1 MiB
    /// each on the broker; Raft retransmits whatever is dropped.
    pub fn queue_max_bytes(mut self, bytes: Option<u64>) -> Self {
        self.queue_max_bytes = bytes;
        self
    }

    /// Frames older than this are discarded by the broker instead of delivered (default: none).
    pub fn message_ttl(mut self, ttl: Option<Duration>) -> Self {
        self.message_ttl = ttl;
        self
    }

    /// Checks the settings and builds the transport. Connects nothing yet: each
    /// [`Transport::connect`] opens its own connection.
    pub fn build(self) -> Result<AmqpTransport, HamokError> {
        let config_err = |key: &str, reason: String| HamokError::Config {
            key: key.to_string(),
            reason,
        };
        let urls = self
            .urls
            .unwrap_or_else(|| env_urls(AMQP_URL_ENV, DEFAULT_AMQP_URL));
        if urls.is_empty() {
            return Err(config_err("amqp.urls", "no broker URL".into()));
        }
        let heartbeat = u16::try_from(self.heartbeat.as_secs()).unwrap_or(u16::MAX);
        let mut uris = Vec::with_capacity(urls.len());
        for (i, url) in urls.iter().enumerate() {
            // The URL may hold a password: say which one failed, not what it was.
            let mut uri: AMQPUri = url
                .parse()
                .map_err(|e: String| config_err("amqp.urls", format!("URL #{}: {e}", i + 1)))?;
            if uri.scheme == AMQPScheme::AMQPS {
                return Err(config_err(
                    "amqp.urls",
                    format!(
                        "URL #{}: amqps:// needs TLS, which this build of hamok-transports lacks",
                        i + 1
                    ),
                ));
            }
            if uri.query.heartbeat.is_none() {
                uri.query.heartbeat = Some(heartbeat);
            }
            uris.push(uri);
        }
        check_prefix("amqp.exchange_prefix", &self.exchange_prefix)?;
        for (key, value) in [
            ("amqp.outbound_capacity", self.outbound_capacity),
            ("amqp.publish_batch", self.publish_batch),
        ] {
            if value == 0 {
                return Err(config_err(key, "must be at least 1".into()));
            }
        }
        Ok(AmqpTransport {
            inner: Arc::new(AmqpInner {
                config: AmqpConfig {
                    uris,
                    exchange_prefix: self.exchange_prefix,
                    connection_name: self.connection_name,
                    outbound_capacity: self.outbound_capacity,
                    publish_batch: self.publish_batch,
                    publisher_confirms: self.publisher_confirms,
                    connect_timeout: self.connect_timeout,
                    queue_max_length: self.queue_max_length,
                    queue_max_bytes: self.queue_max_bytes,
                    message_ttl: self.message_ttl,
                },
                counters: Arc::new(Counters::default()),
                next_uri: AtomicUsize::new(0),
            }),
        })
    }
}

/// A [`Transport`] over RabbitMQ. Cheap to clone; clones share their settings and their
/// [`AmqpTransport::stats`]. Give each peer its own (or a clone, to sum the counters of several).
#[derive(Clone)]
pub struct AmqpTransport {
    inner: Arc<AmqpInner>,
}

impl std::fmt::Debug for AmqpTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpTransport")
            .field("exchange_prefix", &self.inner.config.exchange_prefix)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

struct AmqpInner {
    config: AmqpConfig,
    counters: Arc<Counters>,
    /// The URL the next connect tries first (after a failure, the next one).
    next_uri: AtomicUsize,
}

impl AmqpTransport {
    /// Starts building a transport.
    pub fn builder() -> AmqpTransportBuilder {
        AmqpTransportBuilder::default()
    }

    /// A transport with every setting at its default (broker from `HAMOK_AMQP_URL`).
    pub fn from_env() -> Result<AmqpTransport, HamokError> {
        Self::builder().build()
    }

    /// What this transport (all its links, past and present) did with the frames it carried.
    pub fn stats(&self) -> TransportStats {
        self.inner.counters.snapshot()
    }

    /// The exchange of `cluster`.
    pub fn exchange(&self, cluster: &str) -> String {
        format!("{}.{cluster}", self.inner.config.exchange_prefix)
    }
}

impl Transport for AmqpTransport {
    fn connect(
        &self,
        cluster: &str,
        local: PeerId,
        inbound: Inbound,
    ) -> BoxFuture<Result<Arc<dyn Link>, HamokError>> {
        let inner = self.inner.clone();
        let cluster = cluster.to_string();
        counted_connect(self.inner.counters.clone(), async move {
            inner.connect(&cluster, local, inbound).await
        })
    }
}

/// Declares a link's queue: server-named, exclusive, auto-deleted, with the broker-side bounds of the
/// settings ([`queue_arguments`]).
async fn declare_link_queue(
    channel: &Channel,
    c: &AmqpConfig,
) -> Result<lapin::Queue, lapin::Error> {
    channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            queue_arguments(c),
        )
        .await
}

/// The arguments each link's queue is declared with: the broker-side bounds of the settings.
fn queue_arguments(c: &AmqpConfig) -> FieldTable {
    let mut args = FieldTable::default();
    if let Some(max) = c.queue_max_length {
        args.insert(
            "x-max-length".into(),
            AMQPValue::LongInt(i32::try_from(max).unwrap_or(i32::MAX)),
        );
    }
    if let Some(max) = c.queue_max_bytes {
        args.insert(
            "x-max-length-bytes".into(),
            AMQPValue::LongLongInt(i64::try_from(max).unwrap_or(i64::MAX)),
        );
    }
    if let Some(ttl) = c.message_ttl {
        args.insert(
            "x-message-ttl".into(),
            AMQPValue::LongInt(i32::try_from(ttl.as_millis()).unwrap_or(i32::MAX)),
        );
    }
    args
}

fn amqp_err(what: &str) -> impl Fn(lapin::Error) -> HamokError + '_ {
    move |e| HamokError::transport(format!("AMQP {what}"), e)
}

/// The pieces of a connection with its topology declared.
struct Opened {
    conn: Connection,
    consumer: lapin::Consumer,
    publisher: Channel,
}

impl AmqpInner {
    async fn open(&self, cluster: &str, local: &PeerId) -> Result<Opened, HamokError> {
        let c = &self.config;
        let name = c
            .connection_name
            .clone()
            .unwrap_or_else(|| format!("hamok {cluster}/{local}"));
        let start = self.next_uri.load(Ordering::Relaxed);
        let mut last = None;
        let mut conn = None;
        for i in 0..c.uris.len() {
            let at = (start + i) % c.uris.len();
            let props = ConnectionProperties::default().with_connection_name(name.clone().into());
            match Connection::connect_uri(c.uris[at].clone(), props).await {
                Ok(ok) => {
                    conn = Some(ok);
                    break;
                }
                Err(e) => {
                    self.next_uri.store(at + 1, Ordering::Relaxed);
                    last = Some(e);
                }
            }
        }
        let conn = match (conn, last) {
            (Some(conn), _) => conn,
            (None, Some(e)) => return Err(amqp_err("connect")(e)),
            (None, None) => {
                return Err(HamokError::Transport {
                    context: "AMQP: no broker URL".into(),
                    source: None,
                })
            }
        };

        let exchange = format!("{}.{cluster}", c.exchange_prefix);
        let consume = conn.create_channel().await.map_err(amqp_err("channel"))?;
        consume
            .exchange_declare(
                exchange.as_str().into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    auto_delete: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(amqp_err("exchange.declare"))?;
        let queue = declare_link_queue(&consume, c)
            .await
            .map_err(amqp_err("queue.declare"))?;
        for key in [BROADCAST_KEY.to_string(), peer_routing_key(local.as_str())] {
            consume
                .queue_bind(
                    queue.name().clone(),
                    exchange.as_str().into(),
                    key.into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(amqp_err("queue.bind"))?;
        }
        let consumer = consume
            .basic_consume(
                queue.name().clone(),
                format!("hamok-{cluster}-{local}").into(),
                BasicConsumeOptions {
                    no_ack: true,
                    exclusive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(amqp_err("basic.consume"))?;
        let publisher = conn.create_channel().await.map_err(amqp_err("channel"))?;
        if c.publisher_confirms {
            publisher
                .confirm_select(ConfirmSelectOptions::default())
                .await
                .map_err(amqp_err("confirm.select"))?;
        }
        Ok(Opened {
            conn,
            consumer,
            publisher,
        })
    }

    async fn connect(
        &self,
        cluster: &str,
        local: PeerId,
        inbound: Inbound,
    ) -> Result<BusLink<AmqpBus>, HamokError> {
        check_token("cluster_id", cluster)?;
        check_token("peer_id", local.as_str())?;
        let c = &self.config;
        let Opened {
            conn,
            consumer,
            publisher,
        } = match tokio::time::timeout(c.connect_timeout, self.open(cluster, &local)).await {
            Ok(result) => result?,
            Err(_) => {
                return Err(HamokError::Transport {
                    context: format!("AMQP connect: timed out after {:?}", c.connect_timeout),
                    source: None,
                })
            }
        };
        // A link cannot outlive its connection here: its death is a lost connection too.
        let state = LinkState::new(self.counters.clone(), true);
        let me: ShortString = local.as_str().into();
        let events = conn.events_listener();
        let status = conn.status().clone();
        let bus = AmqpBus {
            open: Mutex::new(Some((conn, publisher.clone()))),
        };
        let publisher = AmqpPublisher {
            channel: publisher,
            exchange: format!("{}.{cluster}", c.exchange_prefix).into(),
            properties: BasicProperties::default().with_app_id(me.clone()),
            max_batch: c.publish_batch,
            confirms: c.publisher_confirms,
            broadcast: BROADCAST_KEY.into(),
        };
        let received = consumer.flat_map(move |delivery| {
            let items = match delivery {
                Ok(d) if d.properties.app_id().as_ref() == Some(&me) => vec![Received::OwnEcho],
                // Several frames in one message (see `batch`); a damaged batch goes on whole, and the
                // receiver's decoder counts it as malformed.
                Ok(d) => match batch::split(Bytes::from(d.data)) {
                    Ok(frames) => frames.into_iter().map(Received::Frame).collect(),
                    Err(whole) => vec![Received::Frame(whole)],
                },
                Err(e) => vec![Received::Failed(format!("AMQP consumer failed: {e}"))],
            };
            futures::stream::iter(items)
        });
        let link = BusLink::start(
            state.clone(),
            bus,
            publisher,
            c.outbound_capacity,
            received,
            inbound,
            "AMQP consumer ended",
        );
        link.spawn(watch_connection(events, status, state));
        Ok(link)
    }
}

/// Connection events and a status watchdog (heartbeat loss, broker-side close): the link dies with
/// its connection.
async fn watch_connection(
    events: impl Stream<Item = lapin::Event>,
    status: lapin::ConnectionStatus,
    state: Arc<LinkState>,
) {
    let mut events = std::pin::pin!(events);
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            event = events.next() => match event {
                Some(lapin::Event::Error(e)) => {
                    state.die(format!("AMQP connection failed: {e}"));
                    return;
                }
                Some(lapin::Event::ConnectionBlocked(reason)) => {
                    tracing::warn!(%reason, "RabbitMQ blocked the connection");
                }
                Some(_) => {}
                None => {
                    state.die("AMQP connection gone");
                    return;
                }
            },
            _ = tick.tick() => {
                if !status.connected() {
                    state.die("AMQP connection no longer connected");
                    return;
                }
            }
        }
    }
}

/// How a [`BusLink`] reaches RabbitMQ: routing keys, and the connection to close.
struct AmqpBus {
    /// The connection, with a second handle of the publisher's channel that is let go only once the
    /// connection is closed. The writer task's handle goes when the link aborts it, and lapin closes
    /// a channel when its last handle goes: that close, racing the connection's, made lapin log a
    /// connection error on every shutdown. Closed with the connection instead, the channel sends
    /// nothing of its own.
    open: Mutex<Option<(Connection, Channel)>>,
}

impl Bus for AmqpBus {
    type Address = ShortString;
    const TARGET: &'static str = "an AMQP routing key";

    fn unicast(&self, to: &PeerId) -> ShortString {
        peer_routing_key(to.as_str()).into()
    }

    fn broadcast(&self) -> ShortString {
        BROADCAST_KEY.into()
    }

    fn shutdown(&self) {
        let open = self.open.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let (Some((conn, publisher)), Ok(handle)) = (open, tokio::runtime::Handle::try_current())
        {
            handle.spawn(async move {
                if conn.status().connected() {
                    let _ = tokio::time::timeout(
                        Duration::from_secs(2),
                        conn.close(200, "hamok link closed".into()),
                    )
                    .await;
                }
                drop(publisher);
            });
        }
        // Without a runtime the connection is dropped here, which closes it too.
    }
}

/// The writer of a RabbitMQ link: batches of publishes on one channel, each batch written (and, with
/// publisher confirms, confirmed) before the next.
struct AmqpPublisher {
    channel: Channel,
    exchange: ShortString,
    properties: BasicProperties,
    max_batch: usize,
    confirms: bool,
    /// The routing key of broadcasts: a barrier when frames are coalesced.
    broadcast: ShortString,
}

impl Publisher<ShortString> for AmqpPublisher {
    fn batch_limit(&self) -> usize {
        self.max_batch
    }

    async fn publish(
        &mut self,
        batch: &mut Vec<(ShortString, Bytes)>,
        counters: &Counters,
    ) -> Result<(), String> {
        let messages = batch::coalesce(batch, &self.broadcast, batch::MAX_BATCH_BODY_BYTES);
        let publishes = messages.iter().map(|m| {
            self.channel.basic_publish(
                self.exchange.clone(),
                m.to.clone(),
                BasicPublishOptions::default(),
                &m.body,
                self.properties.clone(),
            )
        });
        let results = futures::future::join_all(publishes).await;
        let mut failure = None;
        let mut pending = Vec::new();
        for (result, m) in results.into_iter().zip(messages.iter()) {
            match result {
                Ok(confirm) => {
                    Counters::add(&counters.frames_sent, m.frames);
                    Counters::bump(&counters.messages_sent);
                    Counters::add(&counters.bytes_sent, m.frame_bytes);
                    if self.confirms {
                        pending.push((confirm, m.frames));
                    }
                }
                Err(e) => {
                    Counters::add(&counters.dropped_publish_failed, m.frames);
                    failure.get_or_insert(e);
                }
            }
        }
        let (confirms, frames): (Vec<_>, Vec<u64>) = pending.into_iter().unzip();
        for (confirmation, frames) in futures::future::join_all(confirms)
            .await
            .into_iter()
            .zip(frames)
        {
            match confirmation {
                Ok(Confirmation::Nack(_)) => Counters::add(&counters.dropped_nacked, frames),
                Ok(_) => {}
                Err(e) => {
                    failure.get_or_insert(e);
                }
            }
        }
        match failure {
            Some(e) => Err(format!("AMQP publish failed: {e}")),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builder_checks_settings() {
        let t = AmqpTransport::builder()
            .url("amqp://guest:guest@127.0.0.1:5672/%2f")
            .build()
            .unwrap();
        assert_eq!(t.exchange("c"), "hamok.c");
        assert_eq!(t.inner.config.uris[0].query.heartbeat, Some(5));
        let t = AmqpTransport::builder()
            .url("amqp://127.0.0.1:5672/%2f?heartbeat=9")
            .build()
            .unwrap();
        assert_eq!(t.inner.config.uris[0].query.heartbeat, Some(9));
        assert!(AmqpTransport::builder()
            .url("amqps://127.0.0.1/%2f")
            .build()
            .is_err());
        assert!(AmqpTransport::builder().url("http://x").build().is_err());
        assert!(AmqpTransport::builder()
            .exchange_prefix("a.#")
            .build()
            .is_err());
        assert!(AmqpTransport::builder().publish_batch(0).build().is_err());
        assert_eq!(peer_routing_key("p"), "peer.p");
    }

    /// Each bound of the settings, on a real broker: a queue declared as a link declares its own
    /// ([`declare_link_queue`]), with no consumer, keeps no more than the bound.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn queue_bounds_hold_on_the_broker() {
        let url = crate::common::env_urls(AMQP_URL_ENV, DEFAULT_AMQP_URL)[0].clone();
        let conn = tokio::time::timeout(
            Duration::from_secs(10),
            Connection::connect(&url, ConnectionProperties::default()),
        )
        .await
        .unwrap_or_else(|_| {
            panic!("no answer from RabbitMQ at {AMQP_URL_ENV} / {DEFAULT_AMQP_URL}")
        })
        .expect("RabbitMQ connection");
        let channel = conn.create_channel().await.unwrap();
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        let config = |length: Option<u32>, bytes: Option<u64>, ttl: Option<Duration>| {
            let mut c = AmqpTransport::builder()
                .queue_max_length(length)
                .queue_max_bytes(bytes)
                .message_ttl(ttl)
                .build()
                .unwrap()
                .inner
                .config
                .clone();
            c.uris.clear();
            c
        };
        // (settings, bodies of 1,000 bytes published, wait, messages left)
        let cases = [
            (config(Some(5), None, None), 20, 0, 5),
            (config(None, Some(10_000), None), 20, 0, 10),
            (config(Some(100_000), Some(4_500), None), 20, 0, 4),
            (
                config(None, None, Some(Duration::from_millis(50))),
                20,
                300,
                0,
            ),
            (config(None, None, None), 20, 0, 20),
        ];
        for (i, (c, published, wait_ms, left)) in cases.into_iter().enumerate() {
            let queue = declare_link_queue(&channel, &c).await.unwrap();
            for _ in 0..published {
                let confirm = channel
                    .basic_publish(
                        "".into(),
                        queue.name().clone(),
                        BasicPublishOptions::default(),
                        &[7u8; 1_000],
                        BasicProperties::default(),
                    )
                    .await
                    .unwrap()
                    .await
                    .unwrap();
                assert!(confirm.is_ack(), "case {i}: {confirm:?}");
            }
            tokio::time::sleep(Duration::from_millis(wait_ms)).await;
            let now = channel
                .queue_declare(
                    queue.name().clone(),
                    QueueDeclareOptions {
                        passive: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await
                .unwrap();
            assert_eq!(now.message_count(), left, "case {i}");
        }
        let _ = conn.close(200, "done".into()).await;
    }

    #[test]
    fn passwords_are_not_printed() {
        let b = AmqpTransport::builder().url("amqp://u:s3cret@h/%2f");
        assert!(!format!("{b:?}").contains("s3cret"));
        let err = AmqpTransport::builder()
            .url("amqp://u:s3cret@h:notaport/%2f")
            .build()
            .err()
            .unwrap();
        assert!(!err.to_string().contains("s3cret"), "{err}");
    }
}
