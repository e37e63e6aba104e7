//! Clusters of peers on one transport, and the load driver.

use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hamok::collections::{register_kinds, HamokCollections, HamokMap};
use hamok::runtime::store::SyncPolicy;
use hamok::runtime::transport::memory::InProcessHub;
use hamok::runtime::{Hamok, HamokBuilder, HamokError};
use indicatif::{ProgressBar, ProgressStyle};

use crate::report::Hist;

/// Any error of the benchmark.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The benchmark's result type.
pub type Res<T> = Result<T, BoxError>;

/// The map every scenario writes: string keys, string values.
pub type Map = HamokMap<String, String>;

/// How long any single wait of the harness may take before the scenario fails.
pub const WAIT: Duration = Duration::from_secs(30);

/// The transports a cluster can run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransportKind {
    Memory,
    Nats,
    RabbitMq,
}

impl TransportKind {
    pub fn name(self) -> &'static str {
        match self {
            TransportKind::Memory => "memory",
            TransportKind::Nats => "nats",
            TransportKind::RabbitMq => "rabbitmq",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "memory" | "mem" | "in-process" => Some(TransportKind::Memory),
            "nats" => Some(TransportKind::Nats),
            "rabbitmq" | "rabbit" | "amqp" => Some(TransportKind::RabbitMq),
            _ => None,
        }
    }
}

/// A random 64-bit value from the standard library's randomly keyed hasher (no RNG crate needed).
pub fn random_u64() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.write_u32(std::process::id());
    h.finish()
}

/// Where the peers of one scenario meet: a fresh in-process hub, or the broker; and where they keep
/// their Raft state.
#[derive(Clone)]
pub struct Net {
    pub kind: TransportKind,
    hub: InProcessHub,
    /// `--durable`: every peer keeps its state in `<root>/<cluster>/<peer>`; `None`: in memory.
    storage: Option<PathBuf>,
    /// `--nats-cluster`: the client URLs of the cluster's servers; peer `p<i>` connects to server
    /// `i mod len` only. `None`: every peer connects to `HAMOK_NATS_URL` (the single-server mode).
    nats_servers: Option<Arc<[String]>>,
}

impl Net {
    /// A fresh network of in-memory peers (a new hub for `memory`; the broker is shared, clusters are
    /// kept apart by id).
    pub fn fresh(kind: TransportKind) -> Self {
        Net::new(kind, None)
    }

    /// A fresh network whose peers are durable under `storage` when it is set.
    pub fn new(kind: TransportKind, storage: Option<PathBuf>) -> Self {
        Net {
            kind,
            hub: InProcessHub::new(),
            storage,
            nats_servers: None,
        }
    }

    /// The same network with every NATS peer `p<i>` connected to `servers[i mod servers.len()]`
    /// (`--nats-cluster`); an empty list changes nothing.
    pub fn with_nats_servers(mut self, servers: &[String]) -> Self {
        self.nats_servers = (!servers.is_empty()).then(|| servers.into());
        self
    }

    /// The one NATS server peer `peer` connects to: `p<i>` (and any name ending in digits `i`) to
    /// server `i mod len`, other names to the first; `None` without `--nats-cluster`.
    pub fn nats_url_for(&self, peer: &str) -> Option<String> {
        let servers = self.nats_servers.as_ref()?;
        let digits = peer.len() - peer.trim_end_matches(|c: char| c.is_ascii_digit()).len();
        let i: usize = peer[peer.len() - digits..].parse().unwrap_or(0);
        Some(servers[i % servers.len()].clone())
    }

    /// The storage directory of peer `peer` of `cluster` (`None`: in memory). Cluster ids are unique
    /// to the run and peer names to their cluster, so no two peers share one.
    pub fn peer_dir(&self, cluster: &str, peer: &str) -> Option<PathBuf> {
        self.storage
            .as_ref()
            .map(|root| root.join(cluster).join(peer))
    }

    /// A builder for peer `peer` of `cluster`, with the collections registered, the transport set and,
    /// when durable, its own storage directory.
    pub fn builder(&self, cluster: &str, peer: &str) -> Res<HamokBuilder> {
        let b = register_kinds(Hamok::builder().cluster_id(cluster).peer_id(peer));
        let b = match self.kind {
            TransportKind::Memory => b.transport(self.hub.clone()),
            TransportKind::Nats => nats_transport(b, self.nats_url_for(peer))?,
            TransportKind::RabbitMq => rabbitmq_transport(b)?,
        };
        Ok(durable(b, self.peer_dir(cluster, peer)))
    }
}

/// The sync policy of durable peers: the default, one `fdatasync` per Ready batch (group commit).
pub const SYNC_POLICY: SyncPolicy = SyncPolicy::Batch;

/// Set, the environment's `storage.sync` replaces [`SYNC_POLICY`] (to compare policies, e.g.
/// `never`: what a durable write costs without its `fdatasync`).
const SYNC_POLICY_ENV: &str = "HAMOK_STORAGE__SYNC";

/// The environment's sync policy, if it sets one (the peers' configuration reads it too).
fn sync_policy_env() -> Option<String> {
    std::env::var(SYNC_POLICY_ENV).ok()
}

/// The sync policy of the run as the configuration spells it (`batch`, or the environment's).
pub fn sync_policy_name() -> String {
    sync_policy_env().unwrap_or_else(|| format!("{SYNC_POLICY:?}").to_lowercase())
}

/// `b` keeping its state in `dir` (with [`SYNC_POLICY`] unless the environment sets one), or `b`
/// unchanged for `None`.
fn durable(b: HamokBuilder, dir: Option<PathBuf>) -> HamokBuilder {
    match dir {
        Some(dir) if sync_policy_env().is_some() => b.storage_dir(dir),
        Some(dir) => b.storage_dir(dir).storage_sync(SYNC_POLICY),
        None => b,
    }
}

/// `b` over NATS: to `url` alone when given (`--nats-cluster`), else to `HAMOK_NATS_URL`.
fn nats_transport(b: HamokBuilder, url: Option<String>) -> Res<HamokBuilder> {
    let transport = match url {
        Some(url) => hamok::transports::NatsTransport::builder()
            .server(url)
            .build()?,
        None => hamok::transports::NatsTransport::from_env()?,
    };
    Ok(b.transport(transport))
}

fn rabbitmq_transport(b: HamokBuilder) -> Res<HamokBuilder> {
    Ok(b.transport(hamok::transports::AmqpTransport::from_env()?))
}

/// A cluster id unique to this run: `bench-<tag>-<random>` (ids allow `[A-Za-z0-9_-]`).
pub fn cluster_id(tag: &str) -> String {
    format!("bench-{tag}-{:016x}", random_u64())
}

/// The peers of one cluster, each its own `Hamok` (its own actors).
pub struct Cluster {
    pub id: String,
    pub net: Net,
    pub peers: Vec<Hamok>,
    next_peer: usize,
}

/// What a cold start took.
pub struct ColdStart {
    /// From the `join()` calls to the first peer that knows itself as leader.
    pub first_leader: Duration,
    /// From the `join()` calls to the last `join()` returning.
    pub all_joined: Duration,
}

impl Cluster {
    /// Builds `n` peers (not timed), then joins them all at once (timed).
    pub async fn start(net: &Net, tag: &str, n: usize) -> Res<(Cluster, ColdStart)> {
        let id = cluster_id(tag);
        let mut peers = Vec::with_capacity(n);
        for i in 0..n {
            peers.push(net.builder(&id, &format!("p{i}"))?.build().await?);
        }
        let started = Instant::now();
        let leaders: Vec<_> = peers
            .iter()
            .cloned()
            .map(|p| {
                tokio::spawn(async move {
                    p.wait_until_leader(WAIT).await?;
                    Ok::<_, HamokError>(Instant::now())
                })
            })
            .collect();
        let joins: Vec<_> = peers
            .iter()
            .cloned()
            .map(|p| {
                tokio::spawn(async move {
                    p.join().await?;
                    Ok::<_, HamokError>(Instant::now())
                })
            })
            .collect();
        let mut all_joined = started;
        for j in joins {
            all_joined = all_joined.max(j.await??);
        }
        let mut first_leader: Option<Instant> = None;
        for l in leaders {
            let at = l.await??;
            first_leader = Some(first_leader.map_or(at, |f| f.min(at)));
        }
        let cluster = Cluster {
            id,
            net: net.clone(),
            peers,
            next_peer: n,
        };
        cluster.settle().await?;
        Ok((
            cluster,
            ColdStart {
                first_leader: first_leader.unwrap_or(started) - started,
                all_joined: all_joined - started,
            },
        ))
    }

    /// Waits until every peer knows the same leader, which is one of them.
    pub async fn settle(&self) -> Res<()> {
        let deadline = Instant::now() + WAIT;
        loop {
            let leaders: Vec<_> = self.peers.iter().map(|p| p.leader_id()).collect();
            let agreed = leaders[0].is_some() && leaders.iter().all(|l| *l == leaders[0]);
            if agreed && self.peers.iter().any(|p| p.is_leader()) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("cluster {} did not settle on a leader", self.id).into());
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// The index of the leader.
    pub fn leader_index(&self) -> usize {
        self.peers.iter().position(|p| p.is_leader()).unwrap_or(0)
    }

    /// The index of a peer that is not the leader (the leader itself in a cluster of one).
    pub fn follower_index(&self) -> usize {
        let l = self.leader_index();
        (0..self.peers.len()).find(|&i| i != l).unwrap_or(l)
    }

    /// A new peer of this cluster, built but not joined.
    pub async fn new_peer(&mut self) -> Res<Hamok> {
        let name = format!("p{}", self.next_peer);
        self.next_peer += 1;
        Ok(self.net.builder(&self.id, &name)?.build().await?)
    }

    /// Opens the map `id` on every peer (created through the leader first).
    pub async fn open_map(&self, id: &str) -> Res<Vec<Map>> {
        let leader = &self.peers[self.leader_index()];
        leader.get_or_create_map::<String, String>(id).await?;
        let mut maps = Vec::new();
        for p in &self.peers {
            maps.push(p.get_or_create_map::<String, String>(id).await?);
        }
        Ok(maps)
    }

    /// Closes every peer, concurrently.
    pub async fn close(self) {
        close_all(self.peers).await;
    }
}

/// Closes peers concurrently.
pub async fn close_all(peers: Vec<Hamok>) {
    let tasks: Vec<_> = peers
        .into_iter()
        .map(|p| tokio::spawn(async move { p.close().await }))
        .collect();
    for t in tasks {
        let _ = t.await;
    }
}

/// A progress bar on stderr when stdout is a terminal; nothing otherwise.
#[derive(Clone)]
pub struct Progress(Option<ProgressBar>);

impl Progress {
    pub fn new(len: u64, message: &str) -> Self {
        if !std::io::stdout().is_terminal() || len == 0 {
            return Progress(None);
        }
        let pb = ProgressBar::new(len);
        if let Ok(style) = ProgressStyle::with_template(
            "  {msg:<40} [{bar:30}] {pos:>9}/{len:<9} {per_sec:>12} eta {eta}",
        ) {
            pb.set_style(style.progress_chars("=> "));
        }
        pb.set_message(message.to_string());
        Progress(Some(pb))
    }

    pub fn inc(&self, delta: u64) {
        if let Some(pb) = &self.0 {
            pb.inc(delta);
        }
    }

    pub fn finish(&self) {
        if let Some(pb) = &self.0 {
            pb.finish_and_clear();
        }
    }
}

/// What a load run measured.
pub struct LoadResult {
    pub hist: Arc<Hist>,
    pub elapsed: Duration,
    pub errors: u64,
    pub first_error: Option<String>,
}

impl LoadResult {
    pub fn ops_per_s(&self) -> f64 {
        self.hist.count() as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Runs `n` operations `op(i)` with `concurrency` of them in flight, each worker a spawned task (never
/// the `block_on` thread: a cross-thread wake-up per operation would dominate). Records the latency of
/// every successful operation; failures are counted.
pub async fn run_load<F, Fut, E>(
    n: u64,
    concurrency: usize,
    progress: &Progress,
    op: F,
) -> Res<LoadResult>
where
    F: Fn(u64) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: std::fmt::Display,
{
    let hist = Arc::new(Hist::default());
    let next = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let first_error = Arc::new(std::sync::Mutex::new(None::<String>));
    let started = Instant::now();
    let workers: Vec<_> = (0..concurrency.max(1))
        .map(|_| {
            let (hist, next, errors, first_error, op, progress) = (
                hist.clone(),
                next.clone(),
                errors.clone(),
                first_error.clone(),
                op.clone(),
                progress.clone(),
            );
            tokio::spawn(async move {
                let mut unreported = 0;
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        break;
                    }
                    let t = Instant::now();
                    match op(i).await {
                        Ok(()) => hist.record(t.elapsed()),
                        Err(e) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                            let mut first = first_error.lock().unwrap_or_else(|e| e.into_inner());
                            if first.is_none() {
                                *first = Some(e.to_string());
                            }
                        }
                    }
                    unreported += 1;
                    if unreported == 64 {
                        progress.inc(unreported);
                        unreported = 0;
                    }
                }
                progress.inc(unreported);
            })
        })
        .collect();
    for w in workers {
        w.await?;
    }
    let elapsed = started.elapsed();
    let first_error = first_error.lock().unwrap_or_else(|e| e.into_inner()).take();
    Ok(LoadResult {
        hist,
        elapsed,
        errors: errors.load(Ordering::Relaxed),
        first_error,
    })
}

/// The key of operation `i` over `keys` distinct keys.
pub fn key(i: u64, keys: u64) -> String {
    format!("key-{:08}", i % keys.max(1))
}

/// A value of `len` bytes.
pub fn value(len: usize) -> String {
    "v".repeat(len)
}

/// Reads a field (in KiB) of `/proc/self/status`, as MiB.
pub fn proc_status_mib(field: &str) -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kib: f64 = line
        .trim_start_matches(field)
        .trim_start_matches(':')
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kib / 1024.0)
}

/// Resets the peak RSS (VmHWM) of this process to its current RSS; false if the kernel refused.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// The 1, 5 and 15 minute load averages (other work on the machine skews every figure).
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// A peer running in a child process (`--processes`): this same binary in `--peer-process` mode.
pub struct PeerProcess {
    child: std::process::Child,
    stdin: Option<std::process::ChildStdin>,
}

impl PeerProcess {
    /// Starts peer `peer` of `cluster` on `net` in a child process (durable in its directory of `net`,
    /// when `net` is durable); resolves once it has joined.
    pub async fn spawn(net: &Net, cluster: &str, peer: &str) -> Res<PeerProcess> {
        use std::io::BufRead;
        use std::process::{Command, Stdio};
        let mut command = Command::new(std::env::current_exe()?);
        command.args([
            "--transport",
            net.kind.name(),
            "--peer-process",
            cluster,
            peer,
        ]);
        if let Some(dir) = net.peer_dir(cluster, peer) {
            command.arg("--peer-storage").arg(dir);
        }
        if let Some(url) = net.nats_url_for(peer) {
            command.args(["--nats-url", &url]);
        }
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().ok_or("no stdout of the peer process")?;
        let line = tokio::time::timeout(
            WAIT,
            tokio::task::spawn_blocking(move || {
                let mut line = String::new();
                std::io::BufReader::new(stdout)
                    .read_line(&mut line)
                    .map(|_| line)
            }),
        )
        .await;
        let mut process = PeerProcess { child, stdin };
        match line {
            Ok(Ok(Ok(l))) if l.trim() == "joined" => Ok(process),
            other => {
                process.stop().await;
                Err(format!("peer process {peer} did not join: {other:?}").into())
            }
        }
    }

    /// Closes its stdin (it then closes its peer and exits) and waits for it; kills it if it hangs.
    pub async fn stop(&mut self) {
        self.stdin.take();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) | Err(_) => return,
                Ok(None) if Instant::now() > deadline => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    return;
                }
                Ok(None) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
    }
}

impl Drop for PeerProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The `--peer-process` mode: one peer that joins `cluster` (durable in `storage` when given; over
/// NATS, connected to `nats_url` alone when given), prints `joined`, and stays until its stdin closes
/// (the parent stopped it, or died).
pub async fn peer_process_main(
    kind: TransportKind,
    cluster: String,
    peer: String,
    storage: Option<PathBuf>,
    nats_url: Option<String>,
) -> Res<()> {
    let net = match nats_url {
        Some(url) => Net::fresh(kind).with_nats_servers(&[url]),
        None => Net::fresh(kind),
    };
    let builder = net.builder(&cluster, &peer)?;
    let hamok = durable(builder, storage).build().await?;
    hamok.join().await?;
    {
        use std::io::Write as _;
        let mut out = std::io::stdout();
        writeln!(out, "joined")?;
        out.flush()?;
    }
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
        let _ = tx.send(());
    });
    let _ = rx.await;
    hamok.close().await;
    Ok(())
}

/// The type of the filesystem holding `path` (the longest mount point of `/proc/self/mounts` above
/// it), e.g. `ext4`: on `tmpfs` an `fdatasync` costs nothing and durable figures mean little.
pub fn filesystem_type(path: &Path) -> Option<String> {
    let path = path.canonicalize().ok()?;
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace().skip(1);
            Some((PathBuf::from(fields.next()?), fields.next()?.to_string()))
        })
        .filter(|(mount, _)| path.starts_with(mount))
        .max_by_key(|(mount, _)| mount.as_os_str().len())
        .map(|(_, kind)| kind)
}

/// Times up to `n` back-to-back writes of 4 KiB to a new file in `dir`, each followed by `fdatasync`
/// (`File::sync_data`), stopping after [`WAIT`], in `writers` loops at once (one file each). Appends
/// give the raw sync cost `dd oflag=dsync` shows; with `preallocated`, the file is first filled with
/// zeros (synced, untimed) and the writes go over them (what a preallocated log would pay; hamok's log
/// appends, see the file store's `wal.rs`). Blocking.
pub fn fdatasync_probe(dir: &Path, n: u64, writers: usize, preallocated: bool) -> Res<Hist> {
    use std::io::{Seek as _, Write as _};
    let hist = Hist::default();
    let deadline = Instant::now() + WAIT;
    std::thread::scope(|scope| -> Res<()> {
        let loops: Vec<_> = (0..writers.max(1))
            .map(|w| {
                let (hist, path) = (&hist, dir.join(format!("fdatasync-probe-{w}")));
                scope.spawn(move || -> std::io::Result<()> {
                    let mut file = std::fs::OpenOptions::new()
                        .create_new(true)
                        .write(true)
                        .open(&path)?;
                    let block = [0u8; 4096];
                    if preallocated {
                        for _ in 0..n {
                            file.write_all(&block)?;
                        }
                        file.sync_data()?;
                        file.rewind()?;
                    }
                    for _ in 0..n {
                        let t = Instant::now();
                        file.write_all(&block)?;
                        file.sync_data()?;
                        hist.record(t.elapsed());
                        if Instant::now() > deadline {
                            break;
                        }
                    }
                    drop(file);
                    std::fs::remove_file(&path)
                })
            })
            .collect();
        for l in loops {
            l.join()
                .map_err(|_| "an fdatasync probe thread panicked")??;
        }
        Ok(())
    })?;
    Ok(hist)
}
