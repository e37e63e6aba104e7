//! `hamok`: a command-line REPL over a replicated key-value / hash / set / queue / config / lock store
//! (`hamok repl`), and one peer with the HTTP gateway (`hamok serve`).
//!
//! ```text
//! hamok repl                              # 3 in-process peers p1, p2, p3 (no broker), prompt on p1
//! hamok repl --peers 5 --durable ./data   # 5 peers, each keeping its Raft state in ./data/<peer-id>
//! hamok repl --transport nats --cluster demo --url nats://127.0.0.1:4222   # one peer of cluster demo
//! hamok serve --http 127.0.0.1:8080 --transport nats --cluster demo        # one peer + HTTP gateway
//! ```
//!
//! # The REPL
//!
//! Commands are case-insensitive words separated by spaces; `"..."` quotes a word with spaces (`\"`,
//! `\\` inside). `HELP` lists them (the table is in `table.rs`): tf-raft's `SET`, `GET [--linearizable]`,
//! `DEL`, `HSET name k:v ...`, `HGET`, `HDEL`, `SSET`, `SHAS`, `SDEL`; `LOCK name [wait_ms]`, `UNLOCK`,
//! `CONFIG GET|SET|WATCH`, `QPUSH`, `QPOP`, `QTAKE`, `QACK`; `LEADER`, `PEERS`, `STATUS`; in the in-process cluster
//! `KILL id` (closes a peer; the prompt moves off it), `RESTART id` (rebuilds it with the same id and
//! directory, and rejoins) and `PEER id` (moves the prompt); `QUIT` / `EXIT`.
//!
//! Answers follow redis-cli: on a terminal `OK`, `"value"`, `(nil)`, `(integer) 7`, numbered lists,
//! `(error) ...`; when standard output is not a terminal, raw values (no quotes, no `(integer)`, list
//! items one per line, `(nil)` as an empty line), errors still as `(error) ...`. Every command is
//! bounded (5 s; `LOCK` and `CONFIG WATCH` add their own wait; `RESTART` 30 s).
//!
//! When standard input is a terminal, lines are edited with rustyline (history, kept in
//! `~/.hamok_history` or `$HAMOK_HISTFILE`, none when that is empty; Tab completes command names);
//! otherwise commands are read line by line from standard input, without a prompt, and the
//! program exits with status 0 at the end of input (non-zero only when the peers cannot start). Lines
//! are at most 1 MiB. On exit the in-process peers are closed without leaving (a `--durable` cluster
//! started again on the same directory resumes where it was); a broker peer leaves first.
//!
//! Logs (tracing) go to standard error, filtered by `RUST_LOG` (default `warn` for the REPL, `info` for
//! `serve`).

/// With `--features mimalloc` the program runs on mimalloc: profiled, the system allocator's malloc and
/// free took about a third of a peer's CPU under load (see README "Performance" for the trade-off in
/// memory). The library itself never picks one.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod cluster;
mod exec;
mod input;
mod reply;
mod serve;
mod status;
mod table;

use std::io::{IsTerminal, Write};
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use hamok::runtime::transport::memory::InProcessHub;

use crate::cluster::{Cluster, PeerSpec, TransportKind};
use crate::exec::Session;
use crate::input::{Input, Line};

/// The command line.
#[derive(Parser)]
#[command(
    name = "hamok",
    version,
    about = "Raft-replicated collections: a REPL and an HTTP gateway"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// A prompt over N in-process peers, or over one peer of a broker cluster.
    Repl(ReplArgs),
    /// One peer with the HTTP gateway.
    Serve(ServeArgs),
}

/// Where the peers run.
#[derive(Args)]
struct ClusterArgs {
    /// The transport: in-process peers (no broker), NATS or RabbitMQ.
    #[arg(long, value_enum, default_value_t = TransportKind::Memory)]
    transport: TransportKind,
    /// The cluster id (peers of other clusters on the same bus are ignored).
    #[arg(long, default_value = "hamok")]
    cluster: String,
    /// Keep the Raft state on disk: in memory mode in DIR/<peer-id>, else in DIR.
    #[arg(long, value_name = "DIR")]
    durable: Option<PathBuf>,
    /// The broker URL(s), comma-separated (default: HAMOK_NATS_URL / HAMOK_AMQP_URL, then localhost).
    #[arg(long)]
    url: Option<String>,
    /// This peer's id on a broker (default: the one in --durable DIR, else random).
    #[arg(long)]
    peer_id: Option<String>,
}

impl ClusterArgs {
    fn spec(&self) -> PeerSpec {
        PeerSpec {
            transport: self.transport,
            cluster: self.cluster.clone(),
            url: self.url.clone(),
            durable: self.durable.clone(),
            peer_id: self.peer_id.clone(),
            hub: InProcessHub::new(),
        }
    }
}

#[derive(Args)]
struct ReplArgs {
    #[command(flatten)]
    cluster: ClusterArgs,
    /// How many in-process peers (memory transport only).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(1..=15))]
    peers: u8,
}

#[derive(Args)]
struct ServeArgs {
    /// The address the HTTP gateway listens on.
    #[arg(long, value_name = "ADDR")]
    http: String,
    #[command(flatten)]
    cluster: ClusterArgs,
    /// Answer writes on a follower with a redirect to the leader instead of forwarding them.
    #[arg(long)]
    redirect: bool,
    /// This peer's HTTP address as others reach it (default: the one it listens on).
    #[arg(long, value_name = "URL")]
    advertise: Option<String>,
}

fn main() {
    let cli = Cli::parse();
    let default_filter = match cli.command {
        Command::Repl(_) => "warn",
        Command::Serve(_) => "info",
    };
    init_tracing(default_filter);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("hamok: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    let code = match cli.command {
        Command::Repl(args) => repl(&runtime, args),
        Command::Serve(args) => runtime.block_on(serve::run(args)),
    };
    // Peers' background tasks must not hold the exit.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    std::process::exit(code);
}

/// A fmt subscriber to standard error, filtered by `RUST_LOG` (else `default`).
fn init_tracing(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// `hamok repl`: starts the peers, then answers lines until `QUIT` or the end of input.
fn repl(rt: &tokio::runtime::Runtime, args: ReplArgs) -> i32 {
    let spec = args.cluster.spec();
    let n = usize::from(args.peers);
    let cluster = match rt.block_on(Cluster::start(spec, n)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("hamok: cannot start the peers: {e}");
            return 1;
        }
    };
    let interactive = std::io::stdin().is_terminal();
    let pretty = std::io::stdout().is_terminal();
    let mut input: Box<dyn Input> = if interactive {
        match input::Terminal::new(input::history_file()) {
            Ok(t) => Box::new(t),
            Err(e) => {
                eprintln!("hamok: cannot open the terminal: {e}");
                return 1;
            }
        }
    } else {
        Box::new(input::Piped::new())
    };
    let mut session = Session::new(cluster);
    if interactive {
        println!(
            "hamok: {} peer(s) on cluster '{}' ({:?}); HELP lists the commands",
            session.cluster.peers.len(),
            args.cluster.cluster,
            args.cluster.transport
        );
    }
    answer_lines(rt, &mut session, input.as_mut(), pretty);
    rt.block_on(session.cluster.shutdown());
    0
}

/// The read-run-print loop.
fn answer_lines(
    rt: &tokio::runtime::Runtime,
    session: &mut Session,
    input: &mut dyn Input,
    pretty: bool,
) {
    loop {
        let prompt = format!("hamok:{}> ", session.current);
        let outcome = match input.read(&prompt) {
            Line::Eof => return,
            Line::Bad(e) => exec::Outcome {
                reply: Some(reply::Reply::Error(e)),
                quit: false,
            },
            Line::Text(line) => rt.block_on(session.line(&line)),
        };
        if let Some(reply) = outcome.reply {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{}", reply.render(pretty));
            let _ = out.flush();
        }
        if outcome.quit {
            return;
        }
    }
}
