//! One hamok peer per process over a real broker: start three in three terminals and they form one
//! cluster; kill the leader and the others elect another.
//!
//! ```text
//! cargo run --example nats_cluster -- --peer-id a --cluster demo
//! cargo run --example nats_cluster -- --peer-id b --cluster demo
//! cargo run --example nats_cluster -- --peer-id c --cluster demo
//! # the same over RabbitMQ:
//! cargo run --example nats_cluster -- --transport rabbitmq --peer-id a --cluster demo
//! ```
//!
//! Options: `--peer-id ID` (default: random), `--cluster ID` (default `demo`), `--transport
//! nats|rabbitmq` (default `nats`), `--url URL` (default: `HAMOK_NATS_URL` / `HAMOK_AMQP_URL`, then the
//! local broker), `--election-timeout-ms N`, `--heartbeat-interval-ms N`, `--peer-max-idle-ms N`,
//! `--storage-dir DIR` (default: none, the peer keeps its Raft state in memory; with it the peer is
//! durable: term, vote, log and snapshots are kept in `DIR`, one directory per peer, and a peer
//! restarted on the same directory with the same `--peer-id` resumes from them and rejoins).
//!
//! Each peer keeps a replicated counter. It prints leader and membership changes, and reads commands
//! on standard input, one per line (answers on standard output, one line each):
//!
//! | command | answer |
//! |---|---|
//! | `add N [TAG]` | `ack TAG TOTAL` or `err TAG REASON` (adds N through the log) |
//! | `get` | `value N` (linearizable read) |
//! | `local` | `local N` (this peer's applied state) |
//! | `leader` | `leader ID` or `leader none` |
//! | `members` | `members A,B,C` (this peer and its remote peers, sorted) |
//! | `stats` | `stats ...` (peer counters) |
//! | `quit` | leaves the cluster and exits |

use std::any::Any;
use std::time::Duration;

use bytes::Bytes;
use hamok::runtime::state_machine::{ApplyContext, StateMachine};
use hamok::runtime::{Hamok, HamokError, HamokEvent};

const KIND: &str = "example-counter";
const COLLECTION: &str = "counter";

/// The replicated state: a total; each command adds a little-endian i64 and answers the new total.
#[derive(Default)]
struct Counter(i64);

fn le_i64(data: &[u8]) -> Result<i64, HamokError> {
    let bytes: [u8; 8] = data
        .try_into()
        .map_err(|_| HamokError::codec("counter: want 8 bytes", None))?;
    Ok(i64::from_le_bytes(bytes))
}

impl StateMachine for Counter {
    fn kind(&self) -> &str {
        KIND
    }
    fn apply(&mut self, _: &ApplyContext, command: &[u8]) -> Result<Bytes, HamokError> {
        self.0 += le_i64(command)?;
        Ok(Bytes::copy_from_slice(&self.0.to_le_bytes()))
    }
    fn snapshot(&self) -> Result<Bytes, HamokError> {
        Ok(Bytes::copy_from_slice(&self.0.to_le_bytes()))
    }
    fn restore(&mut self, data: &[u8]) -> Result<(), HamokError> {
        self.0 = le_i64(data)?;
        Ok(())
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

struct Args {
    peer_id: Option<String>,
    cluster: String,
    transport: String,
    url: Option<String>,
    election_timeout_ms: Option<u64>,
    heartbeat_interval_ms: Option<u64>,
    peer_max_idle_ms: Option<u64>,
    storage_dir: Option<String>,
}

fn parse_args(argv: Vec<String>) -> Result<Args, String> {
    let mut args = Args {
        peer_id: None,
        cluster: "demo".into(),
        transport: "nats".into(),
        url: None,
        election_timeout_ms: None,
        heartbeat_interval_ms: None,
        peer_max_idle_ms: None,
        storage_dir: None,
    };
    let mut it = argv.into_iter();
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        let number = |v: String| v.parse::<u64>().map_err(|e| format!("{flag}: {e}"));
        match flag.as_str() {
            "--peer-id" => args.peer_id = Some(value()?),
            "--cluster" => args.cluster = value()?,
            "--transport" => args.transport = value()?,
            "--url" => args.url = Some(value()?),
            "--election-timeout-ms" => args.election_timeout_ms = Some(number(value()?)?),
            "--heartbeat-interval-ms" => args.heartbeat_interval_ms = Some(number(value()?)?),
            "--peer-max-idle-ms" => args.peer_max_idle_ms = Some(number(value()?)?),
            "--storage-dir" => args.storage_dir = Some(value()?),
            "-h" | "--help" => {
                return Err("usage: nats_cluster [--peer-id ID] [--cluster ID] \
                            [--transport nats|rabbitmq] [--url URL] [--election-timeout-ms N] \
                            [--heartbeat-interval-ms N] [--peer-max-idle-ms N] \
                            [--storage-dir DIR]"
                    .into())
            }
            other => return Err(format!("unknown argument {other:?} (try --help)")),
        }
    }
    Ok(args)
}

async fn build(args: &Args) -> Result<Hamok, HamokError> {
    let mut b = Hamok::builder()
        .cluster_id(args.cluster.clone())
        .register_kind(KIND, || Box::new(Counter::default()));
    if let Some(id) = &args.peer_id {
        b = b.peer_id(id.clone());
    }
    if let Some(ms) = args.election_timeout_ms {
        b = b.election_timeout_ms(ms);
    }
    if let Some(ms) = args.heartbeat_interval_ms {
        b = b.heartbeat_interval_ms(ms);
    }
    if let Some(ms) = args.peer_max_idle_ms {
        b = b.peer_max_idle_ms(ms);
    }
    if let Some(dir) = &args.storage_dir {
        b = b.storage_dir(dir);
    }
    match args.transport.as_str() {
        "nats" => {
            let mut t = hamok::transports::NatsTransport::builder();
            if let Some(url) = &args.url {
                t = t.servers(url.split(',').map(str::to_string));
            }
            b = b.transport(t.build()?);
        }
        "rabbitmq" => {
            let mut t = hamok::transports::AmqpTransport::builder();
            if let Some(url) = &args.url {
                t = t.urls(url.split(',').map(str::to_string));
            }
            b = b.transport(t.build()?);
        }
        other => {
            return Err(HamokError::Config {
                key: "--transport".into(),
                reason: format!("{other:?}: want `nats` or `rabbitmq`"),
            })
        }
    }
    b.build().await
}

async fn read(hamok: &Hamok, linearizable: bool) -> Result<i64, HamokError> {
    hamok
        .query(COLLECTION, linearizable, |sm| {
            sm.and_then(|m| m.as_any().downcast_ref::<Counter>())
                .map_or(0, |c| c.0)
        })
        .await
}

/// Answers one command line.
async fn command(hamok: Hamok, line: String) {
    let words: Vec<&str> = line.split_whitespace().collect();
    match words.as_slice() {
        ["add", n, rest @ ..] => {
            let tag = rest.first().copied().unwrap_or("-");
            let result = match n.parse::<i64>() {
                Ok(n) => hamok
                    .submit(COLLECTION, n.to_le_bytes().to_vec())
                    .await
                    .and_then(|r| le_i64(&r)),
                Err(e) => Err(HamokError::codec(e.to_string(), None)),
            };
            match result {
                Ok(total) => println!("ack {tag} {total}"),
                Err(e) => println!("err {tag} {e}"),
            }
        }
        ["get"] => match read(&hamok, true).await {
            Ok(v) => println!("value {v}"),
            Err(e) => println!("err get {e}"),
        },
        ["local"] => match read(&hamok, false).await {
            Ok(v) => println!("local {v}"),
            Err(e) => println!("err local {e}"),
        },
        ["leader"] => println!(
            "leader {}",
            hamok
                .leader_id()
                .map_or_else(|| "none".to_string(), |l| l.to_string())
        ),
        ["members"] => {
            let mut all: Vec<String> = hamok
                .remote_peer_ids()
                .iter()
                .map(ToString::to_string)
                .collect();
            all.push(hamok.local_peer_id().to_string());
            all.sort();
            println!("members {}", all.join(","));
        }
        ["stats"] => println!("stats {:?}", hamok.stats()),
        [] => {}
        _ => println!("err - unknown command {line:?}"),
    }
}

#[tokio::main]
async fn main() {
    std::process::exit(run(std::env::args().skip(1).collect()).await)
}

/// The whole program; returns the exit code. (`tests/multiprocess.rs` and `tests/durable_nats.rs` run
/// it in their child processes.)
pub async fn run(argv: Vec<String>) -> i32 {
    let args = match parse_args(argv) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return 2;
        }
    };
    let hamok = match build(&args).await {
        Ok(h) => h,
        Err(e) => {
            eprintln!("cannot start the peer: {e}");
            return 1;
        }
    };
    let mut events = hamok.events();
    tokio::spawn(async move {
        loop {
            match events.recv().await {
                Ok(HamokEvent::LeaderChanged { new, term, .. }) => println!(
                    "event leader {} term {term}",
                    new.map_or_else(|| "none".to_string(), |l| l.to_string())
                ),
                Ok(HamokEvent::RemotePeerJoined(p)) => println!("event peer-joined {p}"),
                Ok(HamokEvent::RemotePeerLeft(p)) => println!("event peer-left {p}"),
                Ok(HamokEvent::Rejoining) => println!("event rejoining"),
                Ok(_) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(_) => return,
            }
        }
    });
    if let Err(e) = hamok.join().await {
        eprintln!("cannot join cluster {}: {e}", args.cluster);
        return 1;
    }
    // Every peer creates the collection: a no-op once it exists.
    loop {
        match hamok.create_collection(COLLECTION, KIND).await {
            Ok(()) => break,
            Err(e) => {
                eprintln!("create collection: {e} (retrying)");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    println!(
        "ready {} cluster {} via {}",
        hamok.local_peer_id(),
        args.cluster,
        args.transport
    );

    // Standard input is read on a thread of its own (blocking reads), one line at a time.
    let (tx, mut lines) = tokio::sync::mpsc::unbounded_channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    while let Some(line) = lines.recv().await {
        if line.trim() == "quit" {
            let _ = tokio::time::timeout(Duration::from_secs(5), hamok.leave()).await;
            hamok.close().await;
            return 0;
        }
        tokio::spawn(command(hamok.clone(), line));
    }
    // Standard input closed (started in the background): keep serving until killed.
    std::future::pending::<()>().await;
    0
}
