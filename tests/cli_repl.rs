//! The `hamok` program's REPL, driven through standard input as a script would drive it: three
//! in-process peers (`repl --peers 3`), one command per line, raw answers on standard output (standard
//! output is a pipe here, so values are printed without quotes or `(integer)`).
//!
//! Every read of an answer is bounded; no test asserts how long anything took.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::Duration;

/// Bound of one answer (a command is bounded by 5 s in the program; `RESTART` by 30 s).
const ANSWER_WAIT: Duration = Duration::from_secs(45);

/// A cluster id no other test (or run) uses.
fn cluster_id(name: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "cli-{name}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A running `hamok repl`, answered one command at a time.
struct Repl {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
}

impl Repl {
    fn start(extra: &[&str], cluster: &str) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_hamok"))
            .args(["repl", "--peers", "3", "--cluster", cluster])
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start hamok");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let stdin = child.stdin.take();
        Repl {
            child,
            stdin,
            lines,
        }
    }

    /// Sends `line` without reading an answer.
    fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "{line}").expect("write a command");
        stdin.flush().expect("flush");
    }

    /// Sends `line` and returns the `n` lines of its answer.
    fn cmd_n(&mut self, line: &str, n: usize) -> Vec<String> {
        self.send(line);
        (0..n).map(|_| self.next_line(line)).collect()
    }

    /// Sends `line` and returns its one-line answer.
    fn cmd(&mut self, line: &str) -> String {
        self.cmd_n(line, 1).remove(0)
    }

    fn next_line(&mut self, what: &str) -> String {
        let shown: String = what.chars().take(60).collect();
        match self.lines.recv_timeout(ANSWER_WAIT) {
            Ok(l) => l,
            Err(RecvTimeoutError::Timeout) => {
                panic!("no answer to {shown:?} within {ANSWER_WAIT:?}")
            }
            Err(RecvTimeoutError::Disconnected) => {
                panic!("hamok exited before answering {shown:?}")
            }
        }
    }

    /// Closes standard input and waits (bounded) for the exit status; no answer may be left.
    fn finish(mut self) -> i32 {
        drop(self.stdin.take());
        let deadline = std::time::Instant::now() + ANSWER_WAIT;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                let rest: Vec<String> = self.lines.try_iter().collect();
                assert!(rest.is_empty(), "unexpected output: {rest:?}");
                return status.code().unwrap_or(-1);
            }
            assert!(
                std::time::Instant::now() < deadline,
                "hamok did not exit at the end of input"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Repl {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn key_value_hash_set_and_bad_input() {
    let mut r = Repl::start(&[], &cluster_id("kv"));
    assert_eq!(r.cmd("SET a 1"), "OK");
    assert_eq!(r.cmd("get a"), "1");
    assert_eq!(r.cmd("GET a --linearizable"), "1");
    assert_eq!(r.cmd("GET missing"), "", "(nil) is an empty line when raw");
    assert_eq!(r.cmd("SET \"with space\" \"a b\""), "OK");
    assert_eq!(r.cmd("GET \"with space\""), "a b");
    assert_eq!(r.cmd("DEL a"), "1");
    assert_eq!(r.cmd("DEL a"), "0");
    assert_eq!(r.cmd("HSET h x:1 y:2"), "2");
    assert_eq!(r.cmd("HSET h x:3"), "0");
    assert_eq!(r.cmd("HGET h x"), "3");
    assert_eq!(r.cmd("HDEL h x nope"), "1");
    assert_eq!(r.cmd("HGET h x"), "");
    assert_eq!(r.cmd("SSET s a b"), "2");
    assert_eq!(r.cmd("SHAS s a"), "1");
    assert_eq!(r.cmd("SDEL s a c"), "1");
    assert_eq!(r.cmd("SHAS s a"), "0");
    // Bad input: one error line each, and the REPL goes on.
    assert_eq!(
        r.cmd("HSET h"),
        "(error) wrong number of arguments for 'HSET'"
    );
    assert_eq!(r.cmd("FOO bar"), "(error) unknown command 'FOO'");
    assert_eq!(
        r.cmd("CONFIG NOPE x"),
        "(error) unknown command 'CONFIG NOPE'"
    );
    assert_eq!(
        r.cmd("HSET h novalue"),
        "(error) 'novalue' is not field:value"
    );
    let big = "x".repeat(600 * 1024);
    let too_large = r.cmd(&format!("SET big {big}"));
    assert!(too_large.starts_with("(error) too large"), "{too_large}");
    // An empty line (and a blank one) answers nothing: the next answer is the next command's.
    r.send("");
    r.send("   ");
    assert_eq!(r.cmd("SET after-empty-line yes"), "OK");
    assert_eq!(r.cmd("GET after-empty-line"), "yes");
    assert_eq!(r.finish(), 0);
}

#[test]
fn queues_config_locks_and_help() {
    let mut r = Repl::start(&[], &cluster_id("coord"));
    assert_eq!(r.cmd("QPUSH q a b"), "2");
    assert_eq!(r.cmd("QPOP q"), "a");
    assert_eq!(r.cmd("QPOP q"), "b");
    assert_eq!(r.cmd("QPOP q"), "");
    // Acknowledged delivery: the lease's delivery id, the value, the delivery count; one ack counts.
    assert_eq!(r.cmd("QPUSH q c"), "1");
    let taken = r.cmd_n("QTAKE q 60000", 3);
    assert_eq!(taken[1..], ["c".to_string(), "1".to_string()]);
    assert_eq!(r.cmd(&format!("QACK q {}", taken[0])), "1");
    assert_eq!(r.cmd(&format!("QACK q {}", taken[0])), "0");
    assert_eq!(r.cmd("QTAKE q"), "");
    assert_eq!(r.cmd("QTAKE q 0"), "(error) lease_ms must be at least 1");
    assert_eq!(r.cmd("CONFIG GET c"), "");
    assert_eq!(r.cmd("CONFIG SET c v1 1"), "(error) conflict: never set");
    let rev: u64 = r.cmd("CONFIG SET c v1 0").parse().expect("a revision");
    assert_eq!(
        r.cmd_n("CONFIG GET c", 2),
        ["v1".to_string(), rev.to_string()]
    );
    assert_eq!(
        r.cmd(&format!("CONFIG SET c v2 {}", rev + 1_000)),
        format!("(error) conflict: revision {rev} is there")
    );
    let rev2: u64 = r
        .cmd(&format!("CONFIG SET c v2 {rev}"))
        .parse()
        .expect("a revision");
    assert!(rev2 > rev);
    // Nobody else changes it: the watch ends empty after its (short) wait.
    assert_eq!(r.cmd("CONFIG WATCH c 1 100"), "");
    let token: u64 = r.cmd("LOCK l").parse().expect("a fencing token");
    assert!(token > 0);
    assert_eq!(r.cmd("UNLOCK l"), "1");
    assert_eq!(r.cmd("UNLOCK l"), "0");
    assert_eq!(
        r.cmd("LOCK l 99999999"),
        "(error) wait_ms must be an integer from 0 to 30000"
    );
    let help = r.cmd("HELP SET");
    assert!(help.starts_with("SET key value"), "{help}");
    assert_eq!(r.cmd("quit"), "OK");
    assert_eq!(r.finish(), 0);
}

/// The leader as the prompt's peer knows it, waiting (bounded) until there is one.
fn leader(r: &mut Repl) -> String {
    let leader = r.cmd("LEADER");
    assert!(!leader.is_empty(), "no leader");
    leader
}

#[test]
fn status_peers_kill_leader_failover_and_restart() {
    let mut r = Repl::start(&[], &cluster_id("failover"));
    assert_eq!(r.cmd("SET k before"), "OK");
    let old = leader(&mut r);
    let peers = r.cmd_n("PEERS", 3);
    assert!(
        peers
            .iter()
            .any(|p| p.starts_with(&format!("{old} (leader"))),
        "{peers:?}"
    );
    let status = r.cmd_n("STATUS", 14);
    assert_eq!(status[0], "peer:p1");
    assert!(status.iter().any(|l| l == "voters:p1,p2,p3"), "{status:?}");
    assert!(
        status.iter().any(|l| l == &format!("leader:{old}")),
        "{status:?}"
    );
    // Kill the leader: the prompt moves off it if it was there, and writes go on after the failover.
    assert_eq!(r.cmd(&format!("KILL {old}")), "OK");
    assert_eq!(
        r.cmd(&format!("KILL {old}")),
        format!("(error) peer '{old}' is already down")
    );
    let other = ["p1", "p2", "p3"]
        .into_iter()
        .find(|p| *p != old)
        .expect("another peer");
    assert_eq!(r.cmd(&format!("PEER {other}")), "OK");
    assert_eq!(r.cmd("SET k after"), "OK");
    assert_eq!(r.cmd("GET k --linearizable"), "after");
    let new = leader(&mut r);
    assert_ne!(new, old);
    assert_eq!(r.cmd(&format!("PEER {old}")), "OK");
    assert_eq!(
        r.cmd("GET k"),
        format!("(error) peer '{old}' is down (PEER id to switch)")
    );
    assert_eq!(r.cmd(&format!("RESTART {old}")), "OK");
    assert_eq!(r.cmd("GET k --linearizable"), "after");
    assert_eq!(r.cmd("PEER nobody"), "(error) no peer 'nobody'");
    assert_eq!(r.cmd("exit"), "OK");
    assert_eq!(r.finish(), 0);
}

#[test]
fn durable_peers_keep_their_state_across_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().to_str().expect("utf-8 path");
    let cluster = cluster_id("durable");
    let mut r = Repl::start(&["--durable", path], &cluster);
    assert_eq!(r.cmd("SET kept 42"), "OK");
    assert_eq!(r.cmd("QUIT"), "OK");
    assert_eq!(r.finish(), 0);
    for id in ["p1", "p2", "p3"] {
        assert!(dir.path().join(id).is_dir(), "no directory for {id}");
    }
    let mut r = Repl::start(&["--durable", path], &cluster);
    assert_eq!(r.cmd("GET kept --linearizable"), "42");
    assert_eq!(r.finish(), 0);
}

/// Over a real broker (NATS, then RabbitMQ): two `hamok repl` processes join one cluster, one peer each;
/// what one writes, the other reads (linearizably), and either can take and release a lock.
#[test]
fn two_processes_share_their_stores_over_each_broker() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let nats = runtime.block_on(broker::require_broker(
        "NATS",
        hamok::transports::nats::NATS_URL_ENV,
        hamok::transports::nats::DEFAULT_NATS_URL,
        4222,
    ));
    let amqp = runtime.block_on(broker::require_broker(
        "RabbitMQ",
        hamok::transports::rabbitmq::AMQP_URL_ENV,
        hamok::transports::rabbitmq::DEFAULT_AMQP_URL,
        5672,
    ));
    for (transport, url) in [("nats", nats), ("rabbitmq", amqp)] {
        let cluster = cluster_id(transport);
        let mut a = Repl::start(
            &["--transport", transport, "--url", &url, "--peer-id", "a"],
            &cluster,
        );
        assert_eq!(a.cmd("SET shared 1"), "OK", "{transport}");
        let mut b = Repl::start(
            &["--transport", transport, "--url", &url, "--peer-id", "b"],
            &cluster,
        );
        // b joins a's cluster (it never founds its own: it hears a member) before it answers.
        assert_eq!(b.cmd("LEADER"), "a", "{transport}");
        assert_eq!(b.cmd("GET shared --linearizable"), "1", "{transport}");
        assert_eq!(b.cmd("SET shared 2"), "OK", "{transport}");
        assert_eq!(a.cmd("GET shared --linearizable"), "2", "{transport}");
        let token = b.cmd("LOCK job");
        assert!(token.parse::<u64>().is_ok(), "{transport}: {token}");
        assert_eq!(b.cmd("UNLOCK job"), "1", "{transport}");
        assert_eq!(b.cmd("QUIT"), "OK");
        assert_eq!(b.finish(), 0);
        assert_eq!(a.cmd("QUIT"), "OK");
        assert_eq!(a.finish(), 0);
    }
}

/// The broker tests' helpers (`require_broker`), shared with `transports/tests/`.
#[path = "../transports/tests/common/mod.rs"]
mod broker;

#[test]
fn startup_failure_is_non_zero() {
    let status = Command::new(env!("CARGO_BIN_EXE_hamok"))
        .args(["repl", "--peers", "0"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("run hamok");
    assert_ne!(status.code(), Some(0));
}
