//! Three OS processes (the `nats_cluster` example) form one cluster over a real NATS server, and again
//! over RabbitMQ. While a client keeps writing, the leader is SIGKILLed, a
//! replacement joins, and a follower is SIGSTOPped and SIGCONTed; at the end no acknowledged write is
//! lost and every live peer has the same state.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use hamok::transports::nats::{DEFAULT_NATS_URL, NATS_URL_ENV};
use tokio::sync::mpsc;

/// The broker tests' helpers (`require_broker`, `unique_id`), shared with `transports/tests/`.
#[path = "../transports/tests/common/mod.rs"]
mod common;

use common::{require_broker, unique_id};

/// Bound of one answer from a peer process.
const ANSWER: Duration = Duration::from_secs(8);

/// The peer program: the `nats_cluster` example, compiled into this test binary too, so that the
/// processes always run the code under test (an example binary on disk may be stale or missing).
#[path = "../examples/nats_cluster.rs"]
#[allow(dead_code)]
mod peer_program;

/// Set in a child process: the arguments of the peer program, separated by `\x1f`.
const PEER_ARGS_ENV: &str = "HAMOK_MULTIPROCESS_PEER_ARGS";

/// Not a test: the entry point of the peer processes the scenario below starts (this binary run again
/// with `PEER_ARGS_ENV` set). Without it, returns at once.
#[test]
fn peer_process_entry_point() {
    let Ok(args) = std::env::var(PEER_ARGS_ENV) else {
        return;
    };
    // The test harness has printed "test peer_process_entry_point ... " without a newline: end it.
    println!();
    let argv: Vec<String> = args.split('\x1f').map(str::to_string).collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let code = runtime.block_on(peer_program::run(argv));
    std::process::exit(code);
}

/// One peer process, driven through its standard input and output.
struct Peer {
    id: String,
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::UnboundedReceiver<String>,
    stopped: bool,
}

impl Peer {
    fn spawn(id: &str, cluster: &str, transport: &str, url: &str) -> Peer {
        let args = [
            "--transport",
            transport,
            "--peer-id",
            id,
            "--cluster",
            cluster,
            "--url",
            url,
            "--election-timeout-ms",
            "200",
            "--heartbeat-interval-ms",
            "40",
            "--peer-max-idle-ms",
            "1500",
        ];
        let mut child = Command::new(std::env::current_exe().expect("test binary path"))
            .args([
                "peer_process_entry_point",
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(PEER_ARGS_ENV, args.join("\x1f"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn peer process");
        let stdout = child.stdout.take().expect("stdout");
        let stdin = child.stdin.take().expect("stdin");
        let (tx, lines) = mpsc::unbounded_channel();
        let tag = id.to_string();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if line.starts_with("event ") {
                    println!("[{tag}] {line}");
                }
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Peer {
            id: id.to_string(),
            child,
            stdin,
            lines,
            stopped: false,
        }
    }

    fn send(&mut self, line: &str) {
        writeln!(self.stdin, "{line}").expect("write to peer");
        self.stdin.flush().expect("flush to peer");
    }

    /// The next line starting with `prefix` (others skipped), or `None` after `timeout`.
    async fn expect(&mut self, prefix: &str, timeout: Duration) -> Option<String> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.lines.recv()).await {
                Ok(Some(line)) if line.starts_with(prefix) => return Some(line),
                Ok(Some(_)) => continue,
                Ok(None) => panic!("peer {} exited", self.id),
                Err(_) => return None,
            }
        }
    }

    async fn ask(&mut self, command: &str, answer: &str) -> String {
        self.send(command);
        let line = self
            .expect(answer, ANSWER)
            .await
            .unwrap_or_else(|| panic!("peer {} did not answer {command:?}", self.id));
        line[answer.len()..].trim().to_string()
    }

    async fn leader(&mut self) -> String {
        self.ask("leader", "leader ").await
    }

    async fn members(&mut self) -> String {
        self.ask("members", "members ").await
    }

    fn signal(&mut self, sig: &str) {
        let status = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {sig} {}", self.id);
        self.stopped = sig == "-STOP";
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        if self.stopped {
            let _ = Command::new("kill")
                .args(["-CONT", &self.child.id().to_string()])
                .status();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The client: counts acknowledged writes and writes of unknown outcome.
#[derive(Default)]
struct Client {
    next: u64,
    acked: i64,
    unknown: i64,
}

impl Client {
    /// One `add 1` through `peer`.
    async fn write(&mut self, peer: &mut Peer) {
        self.next += 1;
        let tag = format!("w{}", self.next);
        peer.send(&format!("add 1 {tag}"));
        let ack = format!("ack {tag} ");
        let err = format!("err {tag} ");
        let deadline = tokio::time::Instant::now() + ANSWER;
        loop {
            match tokio::time::timeout_at(deadline, peer.lines.recv()).await {
                Ok(Some(line)) if line.starts_with(&ack) => {
                    self.acked += 1;
                    return;
                }
                Ok(Some(line)) if line.starts_with(&err) => {
                    println!("[{}] {line}", peer.id);
                    self.unknown += 1;
                    return;
                }
                Ok(Some(_)) => continue,
                Ok(None) => panic!("peer {} exited", peer.id),
                Err(_) => {
                    println!("[{}] no answer to {tag}", peer.id);
                    self.unknown += 1;
                    return;
                }
            }
        }
    }
}

async fn wait_members(peer: &mut Peer, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let m = peer.members().await;
        if m == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{}: members {m}, want {want}",
            peer.id
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_leader_kill_and_follower_pause_lose_no_acknowledged_write() {
    let url = require_broker("NATS", NATS_URL_ENV, DEFAULT_NATS_URL, 4222).await;
    scenario("nats", &url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_leader_kill_and_follower_pause_lose_no_acknowledged_write() {
    use hamok::transports::rabbitmq::{AMQP_URL_ENV, DEFAULT_AMQP_URL};
    let url = require_broker("RabbitMQ", AMQP_URL_ENV, DEFAULT_AMQP_URL, 5672).await;
    scenario("rabbitmq", &url).await;
}

/// The scenario over `transport` (`nats` or `rabbitmq`) at `url`.
async fn scenario(transport: &str, url: &str) {
    let cluster = unique_id(&format!("mp{transport}"));
    let started = Instant::now();
    let mut peers: Vec<Peer> = ["p0", "p1", "p2"]
        .iter()
        .map(|id| Peer::spawn(id, &cluster, transport, url))
        .collect();
    for p in &mut peers {
        p.expect("ready ", Duration::from_secs(30))
            .await
            .unwrap_or_else(|| panic!("peer {} never became ready", p.id));
    }
    wait_members(&mut peers[0], "p0,p1,p2").await;
    println!(
        "[{transport}] 3 processes formed a cluster in {:?}",
        started.elapsed()
    );
    let mut client = Client::default();
    for i in 0..15 {
        let n = peers.len();
        client.write(&mut peers[i % n]).await;
    }

    // SIGKILL the leader; the client keeps writing through the others.
    let leader = peers[0].leader().await;
    let at = peers
        .iter()
        .position(|p| p.id == leader)
        .expect("the leader is one of ours");
    let t = Instant::now();
    peers[at].child.kill().expect("SIGKILL the leader");
    let _ = peers[at].child.wait();
    let dead = peers.remove(at);
    drop(dead);
    client.write(&mut peers[0]).await;
    println!(
        "[{transport}] SIGKILL of leader {leader}: next write answered after {:?}",
        t.elapsed()
    );
    for i in 0..15 {
        let n = peers.len();
        client.write(&mut peers[i % n]).await;
    }
    let mut rest: Vec<&str> = peers.iter().map(|p| p.id.as_str()).collect();
    rest.sort();
    let rest = rest.join(",");
    wait_members(&mut peers[0], &rest).await;

    // A replacement joins, so that pausing a follower leaves a quorum.
    peers.push(Peer::spawn("p3", &cluster, transport, url));
    let last = peers.len() - 1;
    peers[last]
        .expect("ready ", Duration::from_secs(30))
        .await
        .expect("p3 ready");
    let all = format!("{rest},p3");
    for p in &mut peers {
        wait_members(p, &all).await;
    }

    // SIGSTOP a follower (shorter than peer_max_idle_ms) while the client writes through the others.
    let leader = peers[0].leader().await;
    let paused = peers
        .iter()
        .position(|p| p.id != leader)
        .expect("a follower");
    peers[paused].signal("-STOP");
    let until = Instant::now() + Duration::from_millis(800);
    let mut during = 0;
    while Instant::now() < until {
        let n = peers.len();
        let target = (paused + 1 + during % (n - 1)) % n;
        client.write(&mut peers[target]).await;
        during += 1;
    }
    peers[paused].signal("-CONT");
    println!(
        "[{transport}] {during} writes while {} was stopped",
        peers[paused].id
    );
    for i in 0..15 {
        let n = peers.len();
        client.write(&mut peers[i % n]).await;
    }

    // Every live peer converges on one total holding every acknowledged write.
    let mut totals = Vec::new();
    for p in &mut peers {
        let value: i64 = p.ask("get", "value ").await.parse().expect("a number");
        totals.push((p.id.clone(), value));
    }
    println!(
        "[{transport}] totals {totals:?}: {} acknowledged, {} of unknown outcome",
        client.acked, client.unknown
    );
    let total = totals[0].1;
    assert!(
        totals.iter().all(|(_, v)| *v == total),
        "peers disagree: {totals:?}"
    );
    assert!(
        (client.acked..=client.acked + client.unknown).contains(&total),
        "total {total}: {} acknowledged writes, {} of unknown outcome",
        client.acked,
        client.unknown
    );
    for p in &mut peers {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let local: i64 = p.ask("local", "local ").await.parse().expect("a number");
            if local == total {
                break;
            }
            assert!(Instant::now() < deadline, "{} stuck at {local}", p.id);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    println!(
        "[{transport}] multi-process scenario took {:?}",
        started.elapsed()
    );
}
