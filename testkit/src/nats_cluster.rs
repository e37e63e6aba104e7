//! A throwaway cluster of real `nats-server` processes on loopback: [`NatsCluster`].
//!
//! [`NatsCluster::start`] starts `n` servers (3 by default with [`NatsCluster::builder`]) as one NATS
//! cluster: each on its own free loopback ports (client, cluster route and HTTP monitor, chosen at
//! start), each named, with JetStream on and its store in a temporary directory, every server given the
//! route URLs of all the others. A server counts as ready when its client port accepts a connection, its
//! monitor answers `/healthz` with 200 (with JetStream on, that needs a JetStream meta leader) and
//! `/routez` shows a route to every other running server; `start` returns once all of them are.
//!
//! [`NatsCluster::kill`] SIGKILLs one server (no lame-duck mode, no goodbye to its clients or routes),
//! [`NatsCluster::restart`] starts it again on the same ports and store directory, and
//! [`NatsCluster::client_url`] gives the URL a client connects to. [`NatsCluster::connection_names`]
//! lists the names of the client connections a server holds (its `/connz`), to find out where a client
//! is connected after the failovers a client does by itself.
//!
//! # Cleaning up
//!
//! Dropping the cluster kills every server and removes the temporary directory, also when a test
//! panics (the drop runs while unwinding). Each server also runs under a small `sh` guard that holds a
//! pipe from this process and SIGKILLs the server as soon as that pipe closes, so a test process that
//! is killed itself (SIGKILL, Ctrl-C) leaves no server behind either (only its temporary directory,
//! `hamok-nats-cluster-*`, stays then). Only the servers started here are ever signalled.
//!
//! The binary is `$HAMOK_NATS_SERVER` when set, else `nats-server` on `PATH`, in `/usr/sbin` or
//! `/usr/bin` (Debian's package `nats-server`, 2.9 here). Nothing here asserts: every failure is a
//! [`NatsClusterError`] that says what was tried, with the end of the server's log.
//!
//! ```no_run
//! # async fn demo() -> Result<(), hamok_testkit::nats_cluster::NatsClusterError> {
//! use hamok_testkit::nats_cluster::NatsCluster;
//!
//! let mut cluster = NatsCluster::start(3).await?;
//! let url = cluster.client_url(0); // "nats://127.0.0.1:<port>"
//! cluster.kill(0)?;
//! cluster.restart(0).await?;
//! # let _ = url;
//! # Ok(()) }
//! ```

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The environment variable naming the `nats-server` binary to run (default: found on `PATH`,
/// `/usr/sbin`, `/usr/bin`).
pub const NATS_SERVER_ENV: &str = "HAMOK_NATS_SERVER";

/// The loopback address every server binds.
const HOST: &str = "127.0.0.1";

/// How long a single monitor request may take.
const HTTP_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a killed server's guard may take to exit.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);

/// The guard each server runs under (`sh -c GUARD <nats-server> <args>...`, its own standard error
/// appended to the server's log). It starts the server in the background (standard input from
/// `/dev/null`, output appended to `$HAMOK_NATS_LOG`), prints its pid, and waits for it; a watcher
/// reads the guard's standard input (a pipe from this process) and SIGKILLs the server when it closes:
/// when [`NatsCluster::kill`] closes it, or when this process dies. A server that exits by itself ends
/// the guard with its exit status (and the watcher is stopped, so it never signals a pid that is not
/// the server's).
const GUARD: &str = r#"exec 3<&0 </dev/null
"$0" "$@" >>"$HAMOK_NATS_LOG" 2>&1 3<&- &
s=$!
echo "$s"
exec 1>/dev/null
( read -r _ <&3; kill -9 "$s" 2>/dev/null ) &
w=$!
exec 3<&-
wait "$s"
code=$?
kill "$w" 2>/dev/null
exit "$code"
"#;

/// Why the cluster, or one of its servers, could not be started, checked or stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatsClusterError(String);

impl NatsClusterError {
    fn new(what: impl Into<String>) -> Self {
        NatsClusterError(what.into())
    }
}

impl std::fmt::Display for NatsClusterError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NatsClusterError {}

/// Settings of a [`NatsCluster`]; [`NatsClusterBuilder::start`] starts it.
#[derive(Debug, Clone)]
pub struct NatsClusterBuilder {
    servers: usize,
    jetstream: bool,
    binary: Option<PathBuf>,
    ready_timeout: Duration,
    extra_args: Vec<String>,
}

impl Default for NatsClusterBuilder {
    fn default() -> Self {
        NatsClusterBuilder {
            servers: 3,
            jetstream: true,
            binary: None,
            ready_timeout: Duration::from_secs(30),
            extra_args: Vec::new(),
        }
    }
}

impl NatsClusterBuilder {
    /// How many servers (default 3; at least 1).
    pub fn servers(mut self, n: usize) -> Self {
        self.servers = n;
        self
    }

    /// JetStream on (the default) or off. With it on, each server keeps its store in its own directory
    /// under the cluster's temporary directory, kept across [`NatsCluster::restart`].
    pub fn jetstream(mut self, on: bool) -> Self {
        self.jetstream = on;
        self
    }

    /// The `nats-server` binary (default: [`NATS_SERVER_ENV`], else found on `PATH`, `/usr/sbin`,
    /// `/usr/bin`).
    pub fn binary(mut self, path: impl Into<PathBuf>) -> Self {
        self.binary = Some(path.into());
        self
    }

    /// The bound of every wait for a server to be ready (default 30 s).
    pub fn ready_timeout(mut self, timeout: Duration) -> Self {
        self.ready_timeout = timeout;
        self
    }

    /// One more command-line argument given to every server (after the ones set here).
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.extra_args.push(arg.into());
        self
    }

    /// Starts every server at once (a JetStream cluster needs a majority to become healthy) and waits
    /// until each one is ready. On failure, the servers already started are killed.
    pub async fn start(self) -> Result<NatsCluster, NatsClusterError> {
        if self.servers == 0 {
            return Err(NatsClusterError::new(
                "a NATS cluster needs at least 1 server",
            ));
        }
        let binary = match self.binary {
            Some(path) => path,
            None => find_binary()?,
        };
        let dir = tempfile::Builder::new()
            .prefix("hamok-nats-cluster-")
            .tempdir()
            .map_err(|e| NatsClusterError::new(format!("a temporary directory: {e}")))?;
        let name = cluster_name();
        let ports = free_ports(3 * self.servers)?;
        let servers = (0..self.servers)
            .map(|i| Server {
                name: format!("{name}-n{i}"),
                client_port: ports[3 * i],
                cluster_port: ports[3 * i + 1],
                monitor_port: ports[3 * i + 2],
                store_dir: dir.path().join(format!("n{i}")),
                log_file: dir.path().join(format!("n{i}.log")),
                running: None,
            })
            .collect();
        let mut cluster = NatsCluster {
            name,
            binary,
            jetstream: self.jetstream,
            ready_timeout: self.ready_timeout,
            extra_args: self.extra_args,
            servers,
            dir,
        };
        for i in 0..cluster.len() {
            cluster.spawn(i)?;
        }
        for i in 0..cluster.len() {
            cluster.wait_ready(i).await?;
        }
        Ok(cluster)
    }
}

/// A running server: its guard process, the pipe that keeps the server alive, the server's pid.
#[derive(Debug)]
struct Running {
    guard: Child,
    /// Closing it makes the guard SIGKILL the server.
    lifeline: Option<ChildStdin>,
    pid: u32,
}

#[derive(Debug)]
struct Server {
    name: String,
    client_port: u16,
    cluster_port: u16,
    monitor_port: u16,
    store_dir: PathBuf,
    log_file: PathBuf,
    running: Option<Running>,
}

/// `n` `nats-server` processes forming one cluster on loopback; see the [module docs](self).
#[derive(Debug)]
pub struct NatsCluster {
    name: String,
    binary: PathBuf,
    jetstream: bool,
    ready_timeout: Duration,
    extra_args: Vec<String>,
    servers: Vec<Server>,
    dir: tempfile::TempDir,
}

impl NatsCluster {
    /// Settings with their defaults: 3 servers, JetStream on, ready within 30 s.
    pub fn builder() -> NatsClusterBuilder {
        NatsClusterBuilder::default()
    }

    /// Starts `n` servers with the default settings and waits until they are ready.
    pub async fn start(n: usize) -> Result<NatsCluster, NatsClusterError> {
        Self::builder().servers(n).start().await
    }

    /// How many servers the cluster has (running or not).
    pub fn len(&self) -> usize {
        self.servers.len()
    }

    /// Whether the cluster has no server (never, once started).
    pub fn is_empty(&self) -> bool {
        self.servers.is_empty()
    }

    /// The cluster's name (`--cluster_name`), unique per cluster started.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The name of server `i` (`-n`, shown by its monitor and in its log).
    pub fn server_name(&self, i: usize) -> &str {
        &self.servers[i].name
    }

    /// The URL a client connects to server `i` with: `nats://127.0.0.1:<client port>`.
    pub fn client_url(&self, i: usize) -> String {
        format!("nats://{HOST}:{}", self.servers[i].client_port)
    }

    /// Every server's client URL, in order.
    pub fn client_urls(&self) -> Vec<String> {
        (0..self.len()).map(|i| self.client_url(i)).collect()
    }

    /// The URL of server `i`'s HTTP monitor (`/healthz`, `/varz`, `/connz`, `/routez`, ...).
    pub fn monitor_url(&self, i: usize) -> String {
        format!("http://{HOST}:{}", self.servers[i].monitor_port)
    }

    /// The cluster's temporary directory (stores and logs), removed when the cluster is dropped.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The directory of server `i`'s JetStream store (kept across restarts).
    pub fn store_dir(&self, i: usize) -> &Path {
        &self.servers[i].store_dir
    }

    /// The log file of server `i` (its output, appended across restarts).
    pub fn log_file(&self, i: usize) -> &Path {
        &self.servers[i].log_file
    }

    /// The last `lines` lines of server `i`'s log.
    pub fn log_tail(&self, i: usize, lines: usize) -> String {
        tail(&self.servers[i].log_file, lines)
    }

    /// The pid of server `i`'s process, while it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.servers[i].running.as_ref().map(|r| r.pid)
    }

    /// Whether server `i` was started (or restarted) and not killed since, and has not exited by
    /// itself.
    pub fn is_running(&mut self, i: usize) -> bool {
        match self.servers[i].running.as_mut() {
            None => false,
            Some(r) => matches!(r.guard.try_wait(), Ok(None)),
        }
    }

    /// SIGKILLs server `i` and waits until it is gone. Killing a server that is not running does
    /// nothing.
    pub fn kill(&mut self, i: usize) -> Result<(), NatsClusterError> {
        let server = &mut self.servers[i];
        match server.running.take() {
            None => Ok(()),
            Some(running) => stop(&server.name, running),
        }
    }

    /// Starts server `i` again, on the same ports and store directory (killing it first if it still
    /// runs), and waits until it is ready.
    pub async fn restart(&mut self, i: usize) -> Result<(), NatsClusterError> {
        self.kill(i)?;
        self.spawn(i)?;
        self.wait_ready(i).await
    }

    /// Waits (up to the cluster's ready timeout) until server `i` is ready: its client port accepts,
    /// `/healthz` answers 200, and `/routez` counts a route to every other running server.
    pub async fn wait_ready(&mut self, i: usize) -> Result<(), NatsClusterError> {
        let deadline = Instant::now() + self.ready_timeout;
        loop {
            let others = (0..self.len())
                .filter(|&j| j != i && self.is_running(j))
                .count();
            if !self.is_running(i) {
                let status = self.servers[i]
                    .running
                    .as_mut()
                    .and_then(|r| r.guard.try_wait().ok().flatten())
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| "not started".into());
                return Err(self.failure(i, &format!("exited before it was ready ({status})")));
            }
            let why = match self.readiness(i, others).await {
                Ok(()) => return Ok(()),
                Err(why) => why,
            };
            if Instant::now() >= deadline {
                return Err(self.failure(
                    i,
                    &format!("not ready within {:?}: {why}", self.ready_timeout),
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The names of the client connections server `i` holds now (its `/connz`; a client that set no
    /// name shows as an empty string).
    pub async fn connection_names(&self, i: usize) -> Result<Vec<String>, NatsClusterError> {
        let (status, body) = http_get(self.servers[i].monitor_port, "/connz?limit=100000")
            .await
            .map_err(|e| NatsClusterError::new(format!("{}: /connz: {e}", self.servers[i].name)))?;
        if status != 200 {
            return Err(NatsClusterError::new(format!(
                "{}: /connz answered {status}: {body}",
                self.servers[i].name
            )));
        }
        let json: serde_json::Value = serde_json::from_str(&body)
            .map_err(|e| NatsClusterError::new(format!("{}: /connz: {e}", self.servers[i].name)))?;
        Ok(json["connections"]
            .as_array()
            .map(|conns| {
                conns
                    .iter()
                    .map(|c| c["name"].as_str().unwrap_or_default().to_string())
                    .collect()
            })
            .unwrap_or_default())
    }

    /// One readiness check of server `i`, which should have a route to `others` servers.
    async fn readiness(&self, i: usize, others: usize) -> Result<(), String> {
        let server = &self.servers[i];
        let addr = format!("{HOST}:{}", server.client_port);
        match tokio::time::timeout(HTTP_TIMEOUT, TcpStream::connect(&addr)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(format!("client port {addr}: {e}")),
            Err(_) => return Err(format!("client port {addr}: connect timed out")),
        }
        match http_get(server.monitor_port, "/healthz").await {
            Ok((200, _)) => {}
            Ok((status, body)) => return Err(format!("/healthz answered {status}: {body}")),
            Err(e) => return Err(format!("/healthz: {e}")),
        }
        let routes = match http_get(server.monitor_port, "/routez").await {
            Ok((200, body)) => serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["num_routes"].as_u64())
                .ok_or_else(|| format!("/routez: no num_routes in {body}"))?,
            Ok((status, body)) => return Err(format!("/routez answered {status}: {body}")),
            Err(e) => return Err(format!("/routez: {e}")),
        };
        if (routes as usize) < others {
            return Err(format!("{routes} route(s), want {others}"));
        }
        Ok(())
    }

    /// The command-line arguments of server `i`.
    fn args(&self, i: usize) -> Vec<String> {
        let s = &self.servers[i];
        let routes: Vec<String> = self
            .servers
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, o)| format!("nats://{HOST}:{}", o.cluster_port))
            .collect();
        let mut args: Vec<String> = vec![
            "-a".into(),
            HOST.into(),
            "-p".into(),
            s.client_port.to_string(),
            "-m".into(),
            s.monitor_port.to_string(),
            "-n".into(),
            s.name.clone(),
            "--cluster_name".into(),
            self.name.clone(),
            "--cluster".into(),
            format!("nats://{HOST}:{}", s.cluster_port),
        ];
        if !routes.is_empty() {
            args.push("--routes".into());
            args.push(routes.join(","));
        }
        if self.jetstream {
            args.push("-js".into());
            args.push("-sd".into());
            args.push(s.store_dir.display().to_string());
        }
        args.extend(self.extra_args.iter().cloned());
        args
    }

    /// Starts server `i` under its guard (not waiting for it to be ready).
    fn spawn(&mut self, i: usize) -> Result<(), NatsClusterError> {
        let args = self.args(i);
        let server = &mut self.servers[i];
        if server.running.is_some() {
            return Err(NatsClusterError::new(format!(
                "{}: already running",
                server.name
            )));
        }
        std::fs::create_dir_all(&server.store_dir)
            .map_err(|e| NatsClusterError::new(format!("{}: {e}", server.store_dir.display())))?;
        // The guard's own messages (the shell reports the SIGKILL) go to the server's log too.
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&server.log_file)
            .map_err(|e| NatsClusterError::new(format!("{}: {e}", server.log_file.display())))?;
        let tried = format!("{} {}", self.binary.display(), args.join(" "));
        let mut guard = Command::new("sh")
            .arg("-c")
            .arg(GUARD)
            .arg(&self.binary)
            .args(&args)
            .env("HAMOK_NATS_LOG", &server.log_file)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .map_err(|e| {
                NatsClusterError::new(format!("{}: sh -c <guard> {tried}: {e}", server.name))
            })?;
        let lifeline = guard.stdin.take();
        let mut first = String::new();
        let read = guard
            .stdout
            .take()
            .map(|out| BufReader::new(out).read_line(&mut first));
        let pid = match (read, first.trim().parse::<u32>()) {
            (Some(Ok(_)), Ok(pid)) => pid,
            _ => {
                drop(lifeline);
                let _ = guard.kill();
                let _ = guard.wait();
                return Err(NatsClusterError::new(format!(
                    "{}: the guard of '{tried}' did not report the server's pid (got {first:?})",
                    server.name
                )));
            }
        };
        server.running = Some(Running {
            guard,
            lifeline,
            pid,
        });
        Ok(())
    }

    /// An error about server `i` with the command that ran it and the end of its log.
    fn failure(&self, i: usize, what: &str) -> NatsClusterError {
        let s = &self.servers[i];
        NatsClusterError::new(format!(
            "NATS server {} (client {HOST}:{}, cluster {}, monitor {}) {what}\n  command: {} {}\n  \
             log {}:\n{}",
            s.name,
            s.client_port,
            s.cluster_port,
            s.monitor_port,
            self.binary.display(),
            self.args(i).join(" "),
            s.log_file.display(),
            tail(&s.log_file, 20)
        ))
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for server in &mut self.servers {
            if let Some(running) = server.running.take() {
                if let Err(e) = stop(&server.name, running) {
                    eprintln!("NatsCluster: {e}");
                }
            }
        }
    }
}

/// SIGKILLs a server through its guard and waits for the guard to exit (bounded); if the guard does
/// not exit, kills the guard and the server's pid directly.
fn stop(name: &str, mut running: Running) -> Result<(), NatsClusterError> {
    // Closing the pipe makes the guard's watcher SIGKILL the server; the guard exits once it is gone.
    drop(running.lifeline.take());
    let deadline = Instant::now() + KILL_TIMEOUT;
    loop {
        match running.guard.try_wait() {
            Ok(Some(_)) => return Ok(()),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(2)),
            _ => break,
        }
    }
    // The guard is stuck: the server is still its child, so its pid cannot have been reused.
    let _ = Command::new("kill")
        .args(["-9", &running.pid.to_string()])
        .status();
    let _ = running.guard.kill();
    let _ = running.guard.wait();
    Err(NatsClusterError::new(format!(
        "{name}: its guard did not exit within {KILL_TIMEOUT:?} after the kill; killed server pid {} \
         directly",
        running.pid
    )))
}

/// The `nats-server` binary: [`NATS_SERVER_ENV`], else `PATH`, `/usr/sbin`, `/usr/bin`.
fn find_binary() -> Result<PathBuf, NatsClusterError> {
    if let Some(path) = std::env::var_os(NATS_SERVER_ENV).filter(|v| !v.is_empty()) {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(NatsClusterError::new(format!(
                "{NATS_SERVER_ENV}={} is not a file",
                path.display()
            )))
        };
    }
    let path_dirs = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    path_dirs
        .into_iter()
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/bin")])
        .map(|dir| dir.join("nats-server"))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            NatsClusterError::new(format!(
                "nats-server not found (looked at ${NATS_SERVER_ENV}, PATH, /usr/sbin, /usr/bin): \
                 install Debian's package nats-server (apt-get install nats-server) or set \
                 {NATS_SERVER_ENV} to the binary"
            ))
        })
}

/// A cluster name no other cluster of this or another process uses.
fn cluster_name() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "hamok-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// `n` distinct ports free on loopback right now. They are taken below the kernel's ephemeral range
/// when there is room there, so that no outgoing connection's source port takes one of them while its
/// server is down (which would make its restart on the same port fail); else from the ephemeral range.
fn free_ports(n: usize) -> Result<Vec<u16>, NatsClusterError> {
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    const LOW: u16 = 10_000;
    let mut held: Vec<TcpListener> = Vec::with_capacity(n);
    if ephemeral_low > LOW + 1_000 {
        let span = u64::from(ephemeral_low - LOW);
        let mut x = seed();
        let mut tries = 0;
        while held.len() < n && tries < 50 * n {
            tries += 1;
            // xorshift64
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let port = LOW + (x % span) as u16;
            if let Ok(l) = TcpListener::bind((HOST, port)) {
                held.push(l);
            }
        }
    }
    while held.len() < n {
        let l = TcpListener::bind((HOST, 0))
            .map_err(|e| NatsClusterError::new(format!("a free port on {HOST}: {e}")))?;
        held.push(l);
    }
    held.iter()
        .map(|l| {
            l.local_addr()
                .map(|a| a.port())
                .map_err(|e| NatsClusterError::new(format!("a free port on {HOST}: {e}")))
        })
        .collect()
}

/// A seed that differs between processes and calls.
fn seed() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let s = nanos
        ^ (u64::from(std::process::id()) << 32)
        ^ NEXT
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15);
    s | 1
}

/// One HTTP/1.0 GET to the monitor on `port`: the status code and the body.
async fn http_get(port: u16, path: &str) -> Result<(u16, String), String> {
    let exchange = async {
        let mut stream = TcpStream::connect((HOST, port))
            .await
            .map_err(|e| e.to_string())?;
        let request = format!("GET {path} HTTP/1.0\r\nHost: {HOST}:{port}\r\n\r\n");
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut raw = Vec::new();
        stream
            .read_to_end(&mut raw)
            .await
            .map_err(|e| e.to_string())?;
        Ok::<_, String>(raw)
    };
    let raw = tokio::time::timeout(HTTP_TIMEOUT, exchange)
        .await
        .map_err(|_| format!("no answer within {HTTP_TIMEOUT:?}"))??;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| format!("not an HTTP answer: {head:?}"))?;
    Ok((status, body.trim().to_string()))
}

/// The last `lines` lines of a file (at most its last 64 KiB), indented.
fn tail(path: &Path, lines: usize) -> String {
    let read = || -> std::io::Result<String> {
        let mut f = File::open(path)?;
        let len = f.metadata()?.len();
        f.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)))?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    };
    match read() {
        Ok(text) => {
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..]
                .iter()
                .map(|l| format!("    {l}"))
                .collect::<Vec<_>>()
                .join("\n")
        }
        Err(e) => format!("    (cannot read {}: {e})", path.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_distinct_and_bindable() {
        let ports = free_ports(9).unwrap();
        let mut sorted = ports.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), 9, "{ports:?}");
        for p in ports {
            TcpListener::bind((HOST, p)).unwrap();
        }
    }

    /// A client of the raw NATS protocol named `name`, connected to `url` (until dropped).
    async fn named_client(port: u16, name: &str) -> TcpStream {
        let mut s = TcpStream::connect((HOST, port)).await.unwrap();
        s.write_all(
            format!("CONNECT {{\"name\":\"{name}\",\"verbose\":false}}\r\nPING\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&got).contains("PONG") {
            let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
                .await
                .expect("PONG in time")
                .unwrap();
            assert!(n > 0, "server closed: {}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..n]);
        }
        s
    }

    fn alive(pid: u32) -> bool {
        Path::new(&format!("/proc/{pid}")).exists()
    }

    /// A real cluster (needs `nats-server`; fails, never skips, without it): start, kill, restart on
    /// the same port, connection names, and nothing left after the drop.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn start_kill_restart_and_drop() {
        let mut c = NatsCluster::start(3)
            .await
            .unwrap_or_else(|e| panic!("a 3-server NATS cluster: {e}"));
        assert_eq!(c.len(), 3);
        let pids: Vec<u32> = (0..3).map(|i| c.pid(i).unwrap()).collect();
        assert!(pids.iter().all(|p| alive(*p)), "{pids:?}");
        let port = c.servers[1].client_port;
        let _probe = named_client(port, "probe-1").await;
        let names = c.connection_names(1).await.unwrap();
        assert_eq!(names, vec!["probe-1".to_string()]);
        assert!(c.connection_names(0).await.unwrap().is_empty());

        c.kill(1).unwrap();
        assert!(!c.is_running(1) && c.pid(1).is_none());
        assert!(!alive(pids[1]), "killed server {} still there", pids[1]);
        assert!(TcpStream::connect((HOST, port)).await.is_err());
        c.kill(1).unwrap(); // not running: nothing to do

        c.restart(1)
            .await
            .unwrap_or_else(|e| panic!("restart: {e}"));
        assert!(c.is_running(1));
        assert_eq!(c.client_url(1), format!("nats://{HOST}:{port}"));
        let _probe = named_client(port, "probe-2").await;
        assert_eq!(
            c.connection_names(1).await.unwrap(),
            vec!["probe-2".to_string()]
        );
        let restarted = c.pid(1).unwrap();
        assert!(c.store_dir(1).join("jetstream").is_dir());
        let log = std::fs::read_to_string(c.log_file(1)).unwrap();
        assert_eq!(log.matches("Server is ready").count(), 2, "two starts");
        assert!(!c.log_tail(1, 5).is_empty());

        let dir = c.dir().to_path_buf();
        drop(c);
        for pid in [pids[0], restarted, pids[2]] {
            assert!(!alive(pid), "server {pid} left behind");
        }
        assert!(!dir.exists(), "{} left behind", dir.display());
    }

    #[test]
    fn server_arguments() {
        let dir = tempfile::tempdir().unwrap();
        let mk = |i: u16| Server {
            name: format!("c-n{i}"),
            client_port: 100 + i,
            cluster_port: 200 + i,
            monitor_port: 300 + i,
            store_dir: dir.path().join(format!("n{i}")),
            log_file: dir.path().join(format!("n{i}.log")),
            running: None,
        };
        let cluster = NatsCluster {
            name: "c".into(),
            binary: PathBuf::from("nats-server"),
            jetstream: true,
            ready_timeout: Duration::from_secs(1),
            extra_args: vec!["-DV".into()],
            servers: vec![mk(0), mk(1), mk(2)],
            dir,
        };
        let args = cluster.args(1).join(" ");
        assert!(args.starts_with("-a 127.0.0.1 -p 101 -m 301 -n c-n1 --cluster_name c"));
        assert!(args.contains(
            "--cluster nats://127.0.0.1:201 --routes nats://127.0.0.1:200,nats://127.0.0.1:202"
        ));
        assert!(args.contains("-js -sd "), "{args}");
        assert!(args.ends_with(" -DV"), "{args}");
        assert_eq!(cluster.client_url(2), "nats://127.0.0.1:102");
        assert_eq!(cluster.monitor_url(0), "http://127.0.0.1:300");
    }
}
