//! Peer processes for the multi-process tests: the `nats_cluster` example compiled into the test
//! binary, run again as a child process and driven through its standard input and output.
//!
//! A test binary includes this file (`#[path = "common/peer_process.rs"] mod peer_process;`) and
//! declares the child's entry point, a test of that exact name ([`ENTRY_POINT`]):
//!
//! ```ignore
//! #[test]
//! fn peer_process_entry_point() {
//!     peer_process::entry_point();
//! }
//! ```
//!
//! [`Peer::spawn`] runs that binary again with only this test selected and the peer's arguments in
//! [`PEER_ARGS_ENV`]; in every other run the entry point returns at once.
#![allow(dead_code)] // each test binary uses a different subset

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

/// Bound of one answer from a peer process.
pub const ANSWER: Duration = Duration::from_secs(8);

/// The peer program: the `nats_cluster` example, compiled into the test binary too, so that the
/// processes always run the code under test (an example binary on disk may be stale or missing).
#[path = "../../examples/nats_cluster.rs"]
#[allow(dead_code)]
mod peer_program;

/// Set in a child process: the arguments of the peer program, separated by `\x1f`.
pub const PEER_ARGS_ENV: &str = "HAMOK_MULTIPROCESS_PEER_ARGS";

/// The name of the test every including binary declares as its children's entry point.
pub const ENTRY_POINT: &str = "peer_process_entry_point";

/// The body of the [`ENTRY_POINT`] test: in a peer process (`PEER_ARGS_ENV` set), runs the peer
/// program and exits with its code; otherwise returns at once.
pub fn entry_point() {
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

/// One peer process, driven through its standard input and output. Dropping it kills the process
/// (also when a test panics).
pub struct Peer {
    pub id: String,
    pub child: Child,
    stdin: ChildStdin,
    /// The lines the process prints, in order (`event ...` lines are also echoed to the test output).
    pub lines: mpsc::UnboundedReceiver<String>,
    stopped: bool,
}

impl Peer {
    /// Starts peer `id` of `cluster` over `transport` at `url`, with short Raft timings.
    pub fn spawn(id: &str, cluster: &str, transport: &str, url: &str) -> Peer {
        Peer::spawn_with(id, cluster, transport, url, &[])
    }

    /// [`Peer::spawn`] with `extra` arguments for the peer program (e.g. `--storage-dir DIR`).
    pub fn spawn_with(id: &str, cluster: &str, transport: &str, url: &str, extra: &[&str]) -> Peer {
        let mut args = vec![
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
        args.extend_from_slice(extra);
        let mut child = Command::new(std::env::current_exe().expect("test binary path"))
            .args([ENTRY_POINT, "--exact", "--nocapture", "--test-threads=1"])
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

    pub fn send(&mut self, line: &str) {
        writeln!(self.stdin, "{line}").expect("write to peer");
        self.stdin.flush().expect("flush to peer");
    }

    /// The answer to `add N TAG` sent earlier: `Ok(total)` it acknowledged, `Err(line)` the error it
    /// printed, or `None` if neither came within [`ANSWER`]. Other lines are skipped; a peer that
    /// exited panics.
    pub async fn add_answer(&mut self, tag: &str) -> Option<Result<i64, String>> {
        let ack = format!("ack {tag} ");
        let err = format!("err {tag} ");
        let deadline = tokio::time::Instant::now() + ANSWER;
        loop {
            match tokio::time::timeout_at(deadline, self.lines.recv()).await {
                Ok(Some(line)) if line.starts_with(&ack) => {
                    return Some(Ok(line[ack.len()..].trim().parse().expect("a total")))
                }
                Ok(Some(line)) if line.starts_with(&err) => return Some(Err(line)),
                Ok(Some(_)) => continue,
                Ok(None) => panic!("peer {} exited", self.id),
                Err(_) => return None,
            }
        }
    }

    /// The next line starting with `prefix` (others skipped), or `None` after `timeout`.
    pub async fn expect(&mut self, prefix: &str, timeout: Duration) -> Option<String> {
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

    /// Sends `command` and returns the rest of the next line starting with `answer` (panics after
    /// [`ANSWER`]).
    pub async fn ask(&mut self, command: &str, answer: &str) -> String {
        self.send(command);
        let line = self
            .expect(answer, ANSWER)
            .await
            .unwrap_or_else(|| panic!("peer {} did not answer {command:?}", self.id));
        line[answer.len()..].trim().to_string()
    }

    pub async fn leader(&mut self) -> String {
        self.ask("leader", "leader ").await
    }

    pub async fn members(&mut self) -> String {
        self.ask("members", "members ").await
    }

    pub fn signal(&mut self, sig: &str) {
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

/// Waits (at most 20 s) until `peer` reports the members `want` (sorted, comma-separated).
pub async fn wait_members(peer: &mut Peer, want: &str) {
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
