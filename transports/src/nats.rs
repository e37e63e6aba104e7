//! The NATS adapter: [`NatsTransport`], over async-nats.
//!
//! # Subjects
//!
//! With the default prefix `hamok`, the peer `p` of cluster `c` subscribes to
//!
//! - `hamok.c.all`: broadcasts (discovery hellos, votes, ...), and
//! - `hamok.c.peer.p`: frames unicast to it.
//!
//! Cluster and peer ids must be 1 to 128 bytes of `[A-Za-z0-9_-]` (the runtime's configuration already
//! insists on it); anything else is refused rather than escaped, since `.`, `*` and `>` have a meaning in
//! a subject. `connect` returns once the server has the subscriptions (checked with a round trip through
//! the server: a request nobody answers, which the server itself refuses). Frames are published raw
//! (the encoded [`hamok_runtime::wire::Frame`]), no headers; the frames one batch of the writer
//! ([`NatsTransportBuilder::publish_batch`]) holds for the same peer travel in one message, within the
//! server's `max_payload` (a server's cost is per message; a broadcast travels alone, never moved
//! across). Each link has its own connection, made with `no_echo`, so a peer never hears its own
//! broadcasts.
//!
//! # Delivery, buffers and drops
//!
//! [`Link::send`] and [`Link::broadcast`] never wait: they put the frame in the link's bounded outbound
//! queue ([`NatsTransportBuilder::outbound_capacity`]) that a writer task drains into the client; a full
//! queue, a disconnected client or a frame above the server's `max_payload` is refused at once and
//! counted in [`NatsTransport::stats`]. On the receiving side async-nats buffers each subscription
//! ([`NatsTransportBuilder::subscription_capacity`], 1 Mi messages here against the client's 64 Ki
//! default) and **drops messages silently** when that buffer is full: the client's slow-consumer events
//! are counted in [`TransportStats::dropped_slow_consumer`]. A reader task hands each message straight to
//! the peer's bounded [`Inbound`] and never waits either. Raft retransmits whatever is lost.
//!
//! # Reconnection
//!
//! async-nats reconnects by itself (with the backoff of
//! [`NatsTransportBuilder::reconnect_delay_max`]) and re-sends its subscriptions, so a short broker
//! outage needs nothing from the runtime: frames sent while disconnected are dropped and counted, and Raft
//! catches up afterwards. The link reports itself dead ([`Link::closed`] resolves, and the runtime's
//! supervisor connects a new one with its own backoff) only when the client gives up (its connection is
//! closed, [`NatsTransportBuilder::max_reconnects`] is reached), or when it has been disconnected for
//! longer than [`NatsTransportBuilder::max_disconnected`] (5 s by default).
//!
//! ```no_run
//! # async fn demo() -> Result<(), hamok_runtime::HamokError> {
//! use hamok_runtime::Hamok;
//! use hamok_transports::nats::NatsTransport;
//!
//! let transport = NatsTransport::builder()
//!     .servers(["nats://127.0.0.1:4222"])
//!     .name("orders-replica-1")
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

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::client::RequestErrorKind;
use async_nats::connection::State;
use async_nats::{Client, ClientError, ConnectOptions, Event, ServerAddr, Subject};
use bytes::Bytes;
use futures::StreamExt;
use hamok_runtime::raft::PeerId;
use hamok_runtime::transport::{BoxFuture, Inbound, Link, Transport};
use hamok_runtime::HamokError;
use tokio::sync::watch;

use crate::batch;
use crate::common::{check_prefix, check_token, env_urls, Counters};
use crate::link::{counted_connect, Bus, BusLink, LinkState, Publisher, Received};
use crate::stats::TransportStats;

/// The environment variable naming the NATS server(s) (comma-separated) when the builder names none.
pub const NATS_URL_ENV: &str = "HAMOK_NATS_URL";
/// The server used when neither the builder nor [`NATS_URL_ENV`] names one.
pub const DEFAULT_NATS_URL: &str = "nats://127.0.0.1:4222";
/// The default first token of every subject.
pub const DEFAULT_SUBJECT_PREFIX: &str = "hamok";

/// How the client authenticates (never printed).
#[derive(Clone)]
enum Auth {
    None,
    Token(String),
    UserPassword(String, String),
    NKey(String),
    CredentialsFile(PathBuf),
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Auth::None => "none",
            Auth::Token(_) => "token",
            Auth::UserPassword(..) => "user/password",
            Auth::NKey(_) => "nkey",
            Auth::CredentialsFile(_) => "credentials file",
        })
    }
}

#[derive(Clone)]
struct NatsConfig {
    servers: Vec<ServerAddr>,
    auth: Auth,
    require_tls: bool,
    root_certificates: Vec<PathBuf>,
    client_certificate: Option<(PathBuf, PathBuf)>,
    name: Option<String>,
    subject_prefix: String,
    outbound_capacity: usize,
    publish_batch: usize,
    subscription_capacity: usize,
    client_capacity: usize,
    connect_timeout: Duration,
    max_disconnected: Option<Duration>,
    max_reconnects: Option<usize>,
    reconnect_delay_max: Duration,
}

/// Builds a [`NatsTransport`]; see the [module docs](self).
#[derive(Clone)]
pub struct NatsTransportBuilder {
    servers: Option<Vec<String>>,
    auth: Auth,
    require_tls: bool,
    root_certificates: Vec<PathBuf>,
    client_certificate: Option<(PathBuf, PathBuf)>,
    name: Option<String>,
    subject_prefix: String,
    outbound_capacity: usize,
    publish_batch: usize,
    subscription_capacity: usize,
    client_capacity: usize,
    connect_timeout: Duration,
    max_disconnected: Option<Duration>,
    max_reconnects: Option<usize>,
    reconnect_delay_max: Duration,
}

impl std::fmt::Debug for NatsTransportBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // URLs may carry credentials: not printed.
        f.debug_struct("NatsTransportBuilder")
            .field("servers", &self.servers.as_ref().map(Vec::len))
            .field("auth", &self.auth)
            .field("subject_prefix", &self.subject_prefix)
            .field("outbound_capacity", &self.outbound_capacity)
            .field("publish_batch", &self.publish_batch)
            .field("subscription_capacity", &self.subscription_capacity)
            .field("max_disconnected", &self.max_disconnected)
            .finish_non_exhaustive()
    }
}

impl Default for NatsTransportBuilder {
    fn default() -> Self {
        NatsTransportBuilder {
            servers: None,
            auth: Auth::None,
            require_tls: false,
            root_certificates: Vec::new(),
            client_certificate: None,
            name: None,
            subject_prefix: DEFAULT_SUBJECT_PREFIX.to_string(),
            outbound_capacity: 65_536,
            publish_batch: batch::DEFAULT_PUBLISH_BATCH,
            subscription_capacity: 1 << 20,
            client_capacity: 8_192,
            connect_timeout: Duration::from_secs(5),
            max_disconnected: Some(Duration::from_secs(5)),
            max_reconnects: None,
            reconnect_delay_max: Duration::from_secs(2),
        }
    }
}

impl NatsTransportBuilder {
    /// The server(s) to connect to, tried in turn (`nats://host:port`, `tls://host:port`, credentials in
    /// the URL allowed). Default: the comma-separated list in `HAMOK_NATS_URL`, else
    /// `nats://127.0.0.1:4222`.
    pub fn servers<I, S>(mut self, urls: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.servers = Some(urls.into_iter().map(Into::into).collect());
        self
    }

    /// One server (see [`NatsTransportBuilder::servers`]).
    pub fn server(self, url: impl Into<String>) -> Self {
        self.servers([url.into()])
    }

    /// Authenticates with a token.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.auth = Auth::Token(token.into());
        self
    }

    /// Authenticates with a user name and password.
    pub fn user_password(mut self, user: impl Into<String>, password: impl Into<String>) -> Self {
        self.auth = Auth::UserPassword(user.into(), password.into());
        self
    }

    /// Authenticates with an NKey seed (`SU...`).
    pub fn nkey(mut self, seed: impl Into<String>) -> Self {
        self.auth = Auth::NKey(seed.into());
        self
    }

    /// Authenticates with a `.creds` file (JWT + NKey seed), read at each connect.
    pub fn credentials_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.auth = Auth::CredentialsFile(path.into());
        self
    }

    /// Requires TLS even for `nats://` URLs (a `tls://` URL requires it anyway).
    pub fn require_tls(mut self, yes: bool) -> Self {
        self.require_tls = yes;
        self
    }

    /// Trusts the CA certificates of a PEM file (besides the system's).
    pub fn root_certificate(mut self, pem: impl Into<PathBuf>) -> Self {
        self.root_certificates.push(pem.into());
        self
    }

    /// Presents a client certificate (mutual TLS): PEM certificate and key files.
    pub fn client_certificate(mut self, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        self.client_certificate = Some((cert.into(), key.into()));
        self
    }

    /// The connection name shown by the server (default: `hamok <cluster>/<peer>`).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// The first token(s) of every subject (default `hamok`); dot-separated tokens of `[A-Za-z0-9_-]`.
    pub fn subject_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.subject_prefix = prefix.into();
        self
    }

    /// Most frames waiting to be handed to the client, per link (default 65 536); beyond it `send`
    /// refuses and counts them.
    pub fn outbound_capacity(mut self, frames: usize) -> Self {
        self.outbound_capacity = frames;
        self
    }

    /// Most frames the writer takes from the queue at once (default 256): those to the same peer travel
    /// in one NATS message (a server's cost is per message), a broadcast alone and in its place. `1`
    /// sends every frame in its own message.
    pub fn publish_batch(mut self, frames: usize) -> Self {
        self.publish_batch = frames;
        self
    }

    /// Most received messages async-nats buffers per subscription before dropping (default 1 Mi;
    /// async-nats's own default of 64 Ki lost 5–14% of a 1 M burst here).
    pub fn subscription_capacity(mut self, messages: usize) -> Self {
        self.subscription_capacity = messages;
        self
    }

    /// Most commands buffered between the writer task and the client's connection task (default 8192).
    pub fn client_capacity(mut self, commands: usize) -> Self {
        self.client_capacity = commands;
        self
    }

    /// How long one connection attempt may take (default 5 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// After this long disconnected the link reports itself dead, so the runtime builds a new one
    /// (default 5 s; `None`: rely on the client's reconnection only).
    pub fn max_disconnected(mut self, limit: Option<Duration>) -> Self {
        self.max_disconnected = limit;
        self
    }

    /// Reconnection attempts after which the client gives up and the link dies (default: unlimited).
    pub fn max_reconnects(mut self, attempts: Option<usize>) -> Self {
        self.max_reconnects = attempts;
        self
    }

    /// Longest wait between two reconnection attempts of the client (default 2 s; the wait doubles
    /// from 20 ms up to it).
    pub fn reconnect_delay_max(mut self, delay: Duration) -> Self {
        self.reconnect_delay_max = delay;
        self
    }

    /// Checks the settings and builds the transport. Connects nothing yet: each
    /// [`Transport::connect`] opens its own connection.
    pub fn build(self) -> Result<NatsTransport, HamokError> {
        let urls = self
            .servers
            .unwrap_or_else(|| env_urls(NATS_URL_ENV, DEFAULT_NATS_URL));
        if urls.is_empty() {
            return Err(HamokError::Config {
                key: "nats.servers".into(),
                reason: "no server".into(),
            });
        }
        let mut servers = Vec::with_capacity(urls.len());
        for url in &urls {
            servers.push(url.parse::<ServerAddr>().map_err(|e| HamokError::Config {
                key: "nats.servers".into(),
                reason: format!("{}: {e}", redact(url)),
            })?);
        }
        check_prefix("nats.subject_prefix", &self.subject_prefix)?;
        for (key, value) in [
            ("nats.outbound_capacity", self.outbound_capacity),
            ("nats.publish_batch", self.publish_batch),
            ("nats.subscription_capacity", self.subscription_capacity),
            ("nats.client_capacity", self.client_capacity),
        ] {
            if value == 0 {
                return Err(HamokError::Config {
                    key: key.into(),
                    reason: "must be at least 1".into(),
                });
            }
        }
        Ok(NatsTransport {
            inner: Arc::new(NatsInner {
                config: NatsConfig {
                    servers,
                    auth: self.auth,
                    require_tls: self.require_tls,
                    root_certificates: self.root_certificates,
                    client_certificate: self.client_certificate,
                    name: self.name,
                    subject_prefix: self.subject_prefix,
                    outbound_capacity: self.outbound_capacity,
                    publish_batch: self.publish_batch,
                    subscription_capacity: self.subscription_capacity,
                    client_capacity: self.client_capacity,
                    connect_timeout: self.connect_timeout,
                    max_disconnected: self.max_disconnected,
                    max_reconnects: self.max_reconnects,
                    reconnect_delay_max: self.reconnect_delay_max,
                },
                counters: Arc::new(Counters::default()),
            }),
        })
    }
}

/// A URL with any password replaced, for error messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://***{}", &url[..scheme], &url[at..])
        }
        _ => url.to_string(),
    }
}

/// A [`Transport`] over NATS. Cheap to clone; clones share their settings and their
/// [`NatsTransport::stats`]. Give each peer its own (or a clone, to sum the counters of several).
#[derive(Clone)]
pub struct NatsTransport {
    inner: Arc<NatsInner>,
}

impl std::fmt::Debug for NatsTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsTransport")
            .field("servers", &self.inner.config.servers.len())
            .field("subject_prefix", &self.inner.config.subject_prefix)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

struct NatsInner {
    config: NatsConfig,
    counters: Arc<Counters>,
}

impl NatsTransport {
    /// Starts building a transport.
    pub fn builder() -> NatsTransportBuilder {
        NatsTransportBuilder::default()
    }

    /// A transport with every setting at its default (server from `HAMOK_NATS_URL`).
    pub fn from_env() -> Result<NatsTransport, HamokError> {
        Self::builder().build()
    }

    /// What this transport (all its links, past and present) did with the frames it carried.
    pub fn stats(&self) -> TransportStats {
        self.inner.counters.snapshot()
    }

    /// The subject carrying the broadcasts of `cluster`.
    pub fn broadcast_subject(&self, cluster: &str) -> String {
        format!("{}.{cluster}.all", self.inner.config.subject_prefix)
    }

    /// The subject carrying the frames unicast to `peer` of `cluster`.
    pub fn peer_subject(&self, cluster: &str, peer: &str) -> String {
        format!("{}.{cluster}.peer.{peer}", self.inner.config.subject_prefix)
    }
}

impl Transport for NatsTransport {
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

/// Whether the client of one link is connected, fed by the client's events; shared by the link's
/// [`NatsBus`], its watchdog and the client's event callback.
#[derive(Debug)]
struct Connectivity {
    link: Arc<LinkState>,
    /// Whether the client is connected to a server (fast path of `send`).
    up: AtomicBool,
    /// The same, for the watchdog.
    up_watch: watch::Sender<bool>,
}

impl Connectivity {
    fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::Release);
        self.up_watch.send_replace(up);
    }

    fn on_event(&self, event: Event) {
        let counters = self.link.counters();
        match event {
            Event::Connected => {
                if !self.up.load(Ordering::Acquire) {
                    Counters::bump(&counters.reconnects);
                }
                self.set_up(true);
            }
            Event::Disconnected => {
                if self.up.load(Ordering::Acquire) {
                    Counters::bump(&counters.disconnects);
                }
                self.set_up(false);
            }
            Event::SlowConsumer(_) => Counters::bump(&counters.dropped_slow_consumer),
            Event::Closed => self.link.die("NATS connection closed"),
            Event::ClientError(ClientError::MaxReconnects) => self
                .link
                .die("NATS client gave up reconnecting (max reconnects)"),
            // Our own close drains the connection: nothing to warn about.
            Event::Draining => tracing::debug!("NATS connection draining"),
            other => tracing::warn!(event = %other, "NATS client event"),
        }
    }

    /// The watchdog: a client disconnected for longer than `limit` means a new link.
    async fn watch(self: Arc<Self>, limit: Duration) {
        let mut up = self.up_watch.subscribe();
        loop {
            if up.wait_for(|up| !*up).await.is_err() {
                return;
            }
            match tokio::time::timeout(limit, up.wait_for(|up| *up)).await {
                Ok(Ok(_)) => continue,
                Ok(Err(_)) => return,
                Err(_) => {
                    self.link
                        .die(format!("NATS disconnected for more than {limit:?}"));
                    return;
                }
            }
        }
    }
}

impl NatsInner {
    async fn options(
        &self,
        connectivity: &Arc<Connectivity>,
        label: String,
    ) -> Result<ConnectOptions, HamokError> {
        let c = &self.config;
        let mut opts = ConnectOptions::new();
        opts = match &c.auth {
            Auth::None => opts,
            Auth::Token(t) => opts.token(t.clone()),
            Auth::UserPassword(u, p) => opts.user_and_password(u.clone(), p.clone()),
            Auth::NKey(seed) => opts.nkey(seed.clone()),
            Auth::CredentialsFile(path) => {
                opts.credentials_file(path)
                    .await
                    .map_err(|e| HamokError::Config {
                        key: "nats.credentials_file".into(),
                        reason: format!("{}: {e}", path.display()),
                    })?
            }
        };
        if c.require_tls {
            opts = opts.require_tls(true);
        }
        for pem in &c.root_certificates {
            opts = opts.add_root_certificates(pem.clone());
        }
        if let Some((cert, key)) = &c.client_certificate {
            opts = opts.add_client_certificate(cert.clone(), key.clone());
        }
        let max_delay = c.reconnect_delay_max;
        let events = connectivity.clone();
        Ok(opts
            .name(c.name.clone().unwrap_or(label))
            .no_echo()
            .subscription_capacity(c.subscription_capacity)
            .client_capacity(c.client_capacity)
            .connection_timeout(c.connect_timeout)
            .max_reconnects(c.max_reconnects)
            .reconnect_delay_callback(move |attempt| {
                let ms = 20u64.saturating_mul(1u64 << attempt.min(16));
                Duration::from_millis(ms).min(max_delay)
            })
            .event_callback(move |event| {
                events.on_event(event);
                async {}
            }))
    }

    async fn connect(
        &self,
        cluster: &str,
        local: PeerId,
        inbound: Inbound,
    ) -> Result<BusLink<NatsBus>, HamokError> {
        check_token("cluster_id", cluster)?;
        check_token("peer_id", local.as_str())?;
        let c = &self.config;
        let base = format!("{}.{cluster}", c.subject_prefix);
        let broadcast = Subject::from(format!("{base}.all"));
        let unicast_prefix = format!("{base}.peer.");
        let mine = format!("{unicast_prefix}{local}");

        let state = LinkState::new(self.counters.clone(), false);
        let (up_watch, _) = watch::channel(true);
        let connectivity = Arc::new(Connectivity {
            link: state.clone(),
            up: AtomicBool::new(true),
            up_watch,
        });
        let opts = self
            .options(&connectivity, format!("hamok {cluster}/{local}"))
            .await?;
        let guard = c.connect_timeout * (c.servers.len() as u32 + 1);
        let client = match tokio::time::timeout(guard, opts.connect(c.servers.clone())).await {
            Ok(Ok(client)) => client,
            Ok(Err(e)) => return Err(HamokError::transport("NATS connect", e)),
            Err(_) => {
                return Err(HamokError::Transport {
                    context: format!("NATS connect: timed out after {guard:?}"),
                    source: None,
                })
            }
        };
        let sub_err = |e: async_nats::SubscribeError| HamokError::transport("NATS subscribe", e);
        let sub_all = client.subscribe(broadcast.clone()).await.map_err(sub_err)?;
        let sub_me = client.subscribe(mine).await.map_err(sub_err)?;
        sync_with_server(&client, c.connect_timeout).await?;

        // Several frames in one message (see `batch`); a damaged batch goes on whole, and the receiver's
        // decoder counts it as malformed.
        let received = futures::stream::select(sub_all, sub_me).flat_map(|msg| {
            let frames = match batch::split(msg.payload) {
                Ok(frames) => frames,
                Err(whole) => vec![whole],
            };
            futures::stream::iter(frames.into_iter().map(Received::Frame))
        });
        let link = BusLink::start(
            state,
            NatsBus {
                connectivity: connectivity.clone(),
                client: client.clone(),
                broadcast: broadcast.clone(),
                unicast_prefix,
            },
            NatsPublisher {
                client,
                broadcast,
                max_batch: c.publish_batch,
            },
            c.outbound_capacity,
            received,
            inbound,
            "NATS subscriptions ended",
        );
        if let Some(limit) = c.max_disconnected {
            link.spawn(connectivity.watch(limit));
        }
        Ok(link)
    }
}

/// Waits for a round trip through the server, so that it has processed the subscriptions sent before:
/// frames published to us from now on reach us. (`Client::flush` only writes the client's buffer out: a
/// frame published by another connection right after it could still miss a subscription the server had
/// not read yet.) The round trip is a request nobody answers: the server itself replies "no responders"
/// once it has read everything this connection sent before it.
async fn sync_with_server(client: &Client, limit: Duration) -> Result<(), HamokError> {
    let subject = format!("_HAMOK.sync.{}", uuid::Uuid::new_v4().simple());
    match tokio::time::timeout(limit, client.request(subject, Bytes::new())).await {
        // Answered: by the server ("no responders", the usual case) or by someone: a round trip either way.
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) if e.kind() == RequestErrorKind::NoResponders => Ok(()),
        Ok(Err(e)) if e.kind() != RequestErrorKind::TimedOut => {
            Err(HamokError::transport("NATS sync", e))
        }
        // A server too old to send "no responders" never answers: the subscriptions are most likely in
        // place by now, and Raft retransmits whatever a late one misses.
        Ok(Err(_)) | Err(_) => {
            tracing::warn!("NATS server did not answer the sync request within {limit:?}");
            Ok(())
        }
    }
}

/// How a [`BusLink`] reaches NATS: subjects, the client's connection state, and the client (its
/// server's payload limit, and to drain on close).
struct NatsBus {
    connectivity: Arc<Connectivity>,
    client: Client,
    broadcast: Subject,
    unicast_prefix: String,
}

impl Bus for NatsBus {
    type Address = Subject;
    const TARGET: &'static str = "a NATS subject token";

    fn unicast(&self, to: &PeerId) -> Subject {
        Subject::from(format!("{}{}", self.unicast_prefix, to))
    }

    fn broadcast(&self) -> Subject {
        self.broadcast.clone()
    }

    fn admit(&self, frame: &Bytes, counters: &Counters) -> Result<(), HamokError> {
        // The limit of the server the client is connected to now: the client reads it from each
        // server's INFO, also after a reconnect to another server.
        let limit = self.client.max_payload();
        let size = batch::alone_len(frame);
        if size > limit {
            Counters::bump(&counters.dropped_too_large);
            return Err(HamokError::TooLarge { size, limit });
        }
        if !self.connectivity.up.load(Ordering::Acquire) {
            Counters::bump(&counters.dropped_link_down);
            return Err(HamokError::Transport {
                context: "disconnected from NATS".into(),
                source: None,
            });
        }
        Ok(())
    }

    fn shutdown(&self) {
        let client = self.client.clone();
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                // Unsubscribes, flushes and closes the connection.
                let _ = tokio::time::timeout(Duration::from_secs(2), client.drain()).await;
            });
        }
    }
}

/// The writer of a NATS link: each batch it takes from the queue goes into the client as one message
/// per destination (see `batch`), a broadcast alone and in its place.
struct NatsPublisher {
    client: Client,
    /// The subject of broadcasts: a barrier when frames are coalesced.
    broadcast: Subject,
    max_batch: usize,
}

impl Publisher<Subject> for NatsPublisher {
    fn batch_limit(&self) -> usize {
        self.max_batch
    }

    async fn publish(
        &mut self,
        batch: &mut Vec<(Subject, Bytes)>,
        counters: &Counters,
    ) -> Result<(), String> {
        // No body of several frames is larger than the current server's `max_payload` (read per batch:
        // a reconnect may have moved the client to a server with a smaller one).
        let max_body_bytes = self.client.max_payload();
        for m in batch::coalesce(batch, &self.broadcast, max_body_bytes) {
            if self.client.connection_state() == State::Disconnected {
                // Stale by the time we are back: Raft will resend what matters.
                Counters::add(&counters.dropped_link_down, m.frames);
                continue;
            }
            match self.client.publish(m.to, m.body).await {
                Ok(()) => {
                    Counters::add(&counters.frames_sent, m.frames);
                    Counters::bump(&counters.messages_sent);
                    Counters::add(&counters.bytes_sent, m.frame_bytes);
                }
                Err(e) => {
                    Counters::add(&counters.dropped_publish_failed, m.frames);
                    tracing::debug!(error = %e, "NATS publish failed");
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builder_checks_settings() {
        assert!(NatsTransport::builder()
            .server("nats://127.0.0.1:4222")
            .build()
            .is_ok());
        assert!(NatsTransport::builder()
            .subject_prefix("a.*")
            .build()
            .is_err());
        assert!(NatsTransport::builder()
            .servers(Vec::<String>::new())
            .build()
            .is_err());
        assert!(NatsTransport::builder()
            .outbound_capacity(0)
            .build()
            .is_err());
        assert!(NatsTransport::builder().publish_batch(0).build().is_err());
        let t = NatsTransport::builder()
            .server("nats://127.0.0.1:4222")
            .subject_prefix("org.hamok")
            .build()
            .unwrap();
        assert_eq!(t.broadcast_subject("c"), "org.hamok.c.all");
        assert_eq!(t.peer_subject("c", "p"), "org.hamok.c.peer.p");
        assert_eq!(t.stats(), TransportStats::default());
    }

    #[test]
    fn secrets_are_not_printed() {
        let b = NatsTransport::builder()
            .server("nats://u:url-s3cret@h:4222")
            .token("s3cret")
            .user_password("u", "pw-s3cret");
        assert!(!format!("{b:?}").contains("s3cret"));
        let t = b.build().unwrap();
        assert!(!format!("{t:?}").contains("s3cret"));
        assert_eq!(redact("nats://u:pw@h:4222"), "nats://***@h:4222");
        assert_eq!(redact("nats://h:4222"), "nats://h:4222");
    }

    #[tokio::test]
    async fn bad_ids_are_refused_before_connecting() {
        let t = NatsTransport::builder()
            .server("nats://127.0.0.1:1")
            .build()
            .unwrap();
        let inbound = Inbound::new(1, |_| {});
        let err = t
            .connect("a.b", PeerId::from("p"), inbound.clone())
            .await
            .err()
            .unwrap();
        assert!(
            matches!(err, HamokError::Config { ref key, .. } if key == "cluster_id"),
            "{err:?}"
        );
        let err = t
            .connect("c", PeerId::from("p*"), inbound)
            .await
            .err()
            .unwrap();
        assert!(
            matches!(err, HamokError::Config { ref key, .. } if key == "peer_id"),
            "{err:?}"
        );
        assert_eq!(t.stats().connect_failures, 2);
    }
}
