//! Running parsed commands: the store commands over the prompt's peer's [`Stores`], and the session
//! commands (`PEER`, `KILL`, `RESTART`, `STATUS`, ...) over the [`Cluster`].

use std::future::Future;
use std::time::Duration;

use hamok::collections::queue::MAX_LEASE_MS;
use hamok::prelude::{CasOutcome, DeliveryId, HamokError};
use hamok::stores::{Stores, DEFAULT_LEASE_MS};

use crate::cluster::Cluster;
use crate::reply::Reply;
use crate::table::{self, Cmd, Parsed};

/// Bound of every command but `LOCK` (plus its wait), `CONFIG WATCH` (its wait) and `RESTART`.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound of `RESTART` (build, discovery, catching up).
const RESTART_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest `LOCK` wait.
const MAX_LOCK_WAIT_MS: u64 = 30_000;
/// Longest `CONFIG WATCH` wait.
const MAX_WATCH_WAIT_MS: u64 = 60_000;
/// Default `CONFIG WATCH` wait.
const DEFAULT_WATCH_WAIT_MS: u64 = 5_000;
/// Most changes one `CONFIG WATCH` collects.
const MAX_WATCH_CHANGES: u64 = 1_000;
/// Pause between two tries of a request refused before it was sent (no leader yet).
const RETRY_PAUSE: Duration = Duration::from_millis(100);

/// The REPL's state: the peers and the one the prompt is on.
pub struct Session {
    /// The peers.
    pub cluster: Cluster,
    /// The prompt's peer.
    pub current: String,
}

/// What a line did.
pub struct Outcome {
    /// The answer to print (`None`: a blank line).
    pub reply: Option<Reply>,
    /// Whether to exit.
    pub quit: bool,
}

impl Session {
    /// A session on the first peer of `cluster`.
    pub fn new(cluster: Cluster) -> Self {
        let current = cluster.first_up().unwrap_or_default();
        Session { cluster, current }
    }

    /// Parses and runs one line.
    pub async fn line(&mut self, line: &str) -> Outcome {
        match table::parse(line) {
            Ok(None) => Outcome {
                reply: None,
                quit: false,
            },
            Err(reply) => Outcome {
                reply: Some(reply),
                quit: false,
            },
            Ok(Some(p)) => {
                let quit = p.spec.cmd == Cmd::Quit;
                let reply = if quit { Reply::Ok } else { self.run(p).await };
                Outcome {
                    reply: Some(reply),
                    quit,
                }
            }
        }
    }

    async fn run(&mut self, p: Parsed) -> Reply {
        match p.spec.cmd {
            Cmd::Help => table::help(&p.args),
            Cmd::Peer => self.switch(&p.args[0]),
            Cmd::Kill => self.kill(&p.args[0]).await,
            Cmd::Restart => self.restart(&p.args[0]).await,
            Cmd::Leader | Cmd::Peers | Cmd::Status => self.info(p.spec.cmd),
            _ => match self.cluster.stores(&self.current) {
                Some(stores) => store_command(stores, p.spec.cmd, &p.args).await,
                None => Reply::Error(format!(
                    "peer '{}' is down (PEER id to switch)",
                    self.current
                )),
            },
        }
    }

    fn in_process_only(&self, what: &str) -> Option<Reply> {
        (!self.cluster.in_process()).then(|| {
            Reply::Error(format!(
                "{what} needs the in-process cluster (--transport memory)"
            ))
        })
    }

    fn switch(&mut self, id: &str) -> Reply {
        if !self.cluster.peers.contains_key(id) {
            return Reply::Error(format!("no peer '{id}'"));
        }
        self.current = id.to_string();
        Reply::Ok
    }

    async fn kill(&mut self, id: &str) -> Reply {
        if let Some(e) = self.in_process_only("KILL") {
            return e;
        }
        if self.cluster.peers.values().filter(|s| s.is_some()).count() == 1
            && self.cluster.stores(id).is_some()
        {
            return Reply::error("cannot kill the last peer that is up");
        }
        if let Err(e) = self.cluster.kill(id).await {
            return Reply::Error(e);
        }
        // The prompt moves to a peer that is up.
        if self.current == id {
            self.current = self.cluster.first_up().unwrap_or_default();
        }
        Reply::Ok
    }

    async fn restart(&mut self, id: &str) -> Reply {
        if let Some(e) = self.in_process_only("RESTART") {
            return e;
        }
        match tokio::time::timeout(RESTART_TIMEOUT, self.cluster.restart(id)).await {
            Ok(Ok(())) => Reply::Ok,
            Ok(Err(e)) => Reply::Error(e),
            Err(_) => Reply::Error(format!(
                "peer '{id}' did not rejoin within {} s",
                RESTART_TIMEOUT.as_secs()
            )),
        }
    }

    fn info(&self, cmd: Cmd) -> Reply {
        let Some(stores) = self.cluster.stores(&self.current) else {
            return Reply::Error(format!("peer '{}' is down", self.current));
        };
        let hamok = stores.hamok();
        match cmd {
            Cmd::Leader => Reply::opt(hamok.leader_id().map(|l| l.to_string())),
            Cmd::Peers => self.peers(stores),
            _ => crate::status::status(hamok),
        }
    }

    /// Every member this peer knows of, and the local peers that are down.
    fn peers(&self, stores: &Stores) -> Reply {
        let status = stores.hamok().stats().status;
        let m = &status.raft.membership;
        let mut ids: std::collections::BTreeSet<String> =
            m.members().map(|p| p.to_string()).collect();
        ids.extend(self.cluster.peers.keys().cloned());
        let items = ids
            .into_iter()
            .map(|id| {
                let role = if self.cluster.peers.get(&id).is_some_and(Option::is_none) {
                    "down"
                } else if status
                    .raft
                    .leader
                    .as_ref()
                    .is_some_and(|l| l.to_string() == id)
                {
                    "leader"
                } else if m.learners.iter().any(|p| p.to_string() == id) {
                    "learner"
                } else if m.voters.iter().any(|p| p.to_string() == id) {
                    "follower"
                } else {
                    "not a member"
                };
                let here = if id == self.current { ", prompt" } else { "" };
                Reply::Str(format!("{id} ({role}{here})"))
            })
            .collect();
        Reply::List(items)
    }
}

/// Runs `f` again while it is refused before being sent (no leader yet, not joined yet); the caller
/// bounds the whole.
async fn retry<T, F, Fut>(mut f: F) -> Result<T, HamokError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, HamokError>>,
{
    loop {
        match f().await {
            Err(HamokError::NotLeader { .. } | HamokError::NotJoined) => {
                tokio::time::sleep(RETRY_PAUSE).await
            }
            other => return other,
        }
    }
}

/// A store command, bounded by [`COMMAND_TIMEOUT`] (plus its own wait for `LOCK` / `CONFIG WATCH`).
async fn store_command(stores: &Stores, cmd: Cmd, args: &[String]) -> Reply {
    let extra = match extra_wait(cmd, args) {
        Ok(d) => d,
        Err(e) => return e,
    };
    let bound = COMMAND_TIMEOUT + extra;
    match tokio::time::timeout(bound, store_reply(stores, cmd, args)).await {
        Ok(Ok(reply)) => reply,
        Ok(Err(e)) => Reply::error(e),
        Err(_) => Reply::Error(format!(
            "timed out after {} ms (a write may still take effect)",
            bound.as_millis()
        )),
    }
}

/// The wait a command asks for on top of the usual bound.
fn extra_wait(cmd: Cmd, args: &[String]) -> Result<Duration, Reply> {
    let ms = match cmd {
        Cmd::Lock => number(args.get(1), 0, MAX_LOCK_WAIT_MS, "wait_ms")?,
        Cmd::ConfigWatch => number(
            args.get(2),
            DEFAULT_WATCH_WAIT_MS,
            MAX_WATCH_WAIT_MS,
            "wait_ms",
        )?,
        _ => 0,
    };
    Ok(Duration::from_millis(ms))
}

/// An optional number argument in `0..=max`.
fn number(arg: Option<&String>, default: u64, max: u64, what: &str) -> Result<u64, Reply> {
    let Some(a) = arg else { return Ok(default) };
    match a.parse::<u64>() {
        Ok(n) if n <= max => Ok(n),
        _ => Err(Reply::Error(format!(
            "{what} must be an integer from 0 to {max}"
        ))),
    }
}

async fn store_reply(s: &Stores, cmd: Cmd, a: &[String]) -> Result<Reply, HamokError> {
    Ok(match cmd {
        Cmd::Set => retry(|| s.kv_set(&a[0], &a[1])).await.map(|_| Reply::Ok)?,
        Cmd::Get => return get(s, a).await,
        Cmd::Del => Reply::Int(retry(|| s.kv_del(&a[0])).await?.is_some().into()),
        Cmd::HSet => return hset(s, a).await,
        Cmd::HGet => Reply::opt(s.hash_get(&a[0], &a[1], false).await?),
        Cmd::HDel => Reply::count(retry(|| s.hash_del(&a[0], &a[1..])).await?),
        Cmd::SSet => Reply::count(retry(|| s.set_add(&a[0], &a[1..])).await?),
        Cmd::SHas => Reply::Int(s.set_has(&a[0], &a[1], false).await?.into()),
        Cmd::SDel => Reply::count(retry(|| s.set_del(&a[0], &a[1..])).await?),
        Cmd::QPush => Reply::count(retry(|| s.queue_push(&a[0], &a[1..])).await?),
        Cmd::QPop => Reply::opt(retry(|| s.queue_pop(&a[0])).await?),
        Cmd::QTake => return queue_take(s, a).await,
        Cmd::QAck => return queue_ack(s, a).await,
        Cmd::Lock => return lock(s, a).await,
        Cmd::Unlock => Reply::Int(s.unlock(&a[0]).await?.into()),
        Cmd::ConfigGet => config_get(s, &a[0]).await?,
        Cmd::ConfigSet => return config_set(s, a).await,
        Cmd::ConfigWatch => return config_watch(s, a).await,
        _ => Reply::error("not a store command"),
    })
}

async fn queue_take(s: &Stores, a: &[String]) -> Result<Reply, HamokError> {
    let lease_ms = match number(a.get(1), DEFAULT_LEASE_MS, MAX_LEASE_MS, "lease_ms") {
        Ok(0) => return Ok(Reply::error("lease_ms must be at least 1")),
        Ok(ms) => ms,
        Err(reply) => return Ok(reply),
    };
    let lease = Duration::from_millis(lease_ms);
    Ok(match retry(|| s.queue_take(&a[0], lease)).await? {
        Some(d) => Reply::List(vec![
            Reply::count(d.id.0),
            Reply::Str(d.value),
            Reply::count(d.deliveries),
        ]),
        None => Reply::Nil,
    })
}

async fn queue_ack(s: &Stores, a: &[String]) -> Result<Reply, HamokError> {
    let Ok(id) = a[1].parse::<u64>() else {
        return Ok(Reply::error(
            "id must be a delivery id (an integer from QTAKE)",
        ));
    };
    Ok(Reply::Int(
        retry(|| s.queue_ack(&a[0], DeliveryId(id))).await?.into(),
    ))
}

async fn get(s: &Stores, a: &[String]) -> Result<Reply, HamokError> {
    let linearizable = match a.get(1).map(String::as_str) {
        None => false,
        Some(f) if f.eq_ignore_ascii_case("--linearizable") => true,
        Some(other) => {
            return Ok(Reply::Error(format!(
                "unknown option '{other}' (want --linearizable)"
            )))
        }
    };
    Ok(Reply::opt(retry(|| s.kv_get(&a[0], linearizable)).await?))
}

async fn hset(s: &Stores, a: &[String]) -> Result<Reply, HamokError> {
    let mut fields = Vec::new();
    for kv in &a[1..] {
        match kv.split_once(':') {
            Some((k, v)) => fields.push((k.to_string(), v.to_string())),
            None => return Ok(Reply::Error(format!("'{kv}' is not field:value"))),
        }
    }
    Ok(Reply::count(retry(|| s.hash_set(&a[0], &fields)).await?))
}

async fn lock(s: &Stores, a: &[String]) -> Result<Reply, HamokError> {
    let wait = number(a.get(1), 0, MAX_LOCK_WAIT_MS, "wait_ms").unwrap_or_default();
    let token = retry(|| s.lock(&a[0], Duration::from_millis(wait))).await?;
    Ok(Reply::count(token))
}

async fn config_get(s: &Stores, name: &str) -> Result<Reply, HamokError> {
    Ok(match s.config_get(name, false).await? {
        None => Reply::Nil,
        Some(v) => Reply::List(vec![Reply::Str(v.value), Reply::count(v.revision)]),
    })
}

async fn config_set(s: &Stores, a: &[String]) -> Result<Reply, HamokError> {
    let expected = match a.get(2) {
        None => None,
        Some(r) => match r.parse::<u64>() {
            Ok(r) => Some(r),
            Err(_) => return Ok(Reply::error("expected_revision must be an integer")),
        },
    };
    Ok(
        match retry(|| s.config_set(&a[0], &a[1], expected)).await? {
            CasOutcome::Set(revision) => Reply::count(revision),
            CasOutcome::Conflict(Some(current)) => {
                Reply::Error(format!("conflict: revision {current} is there"))
            }
            CasOutcome::Conflict(None) => Reply::error("conflict: never set"),
        },
    )
}

/// The next `n` changes of a config (the watch's first item, the current value, is skipped), as
/// `revision value` pairs; as many as came within the wait.
async fn config_watch(s: &Stores, a: &[String]) -> Result<Reply, HamokError> {
    let n = match number(a.get(1), 1, MAX_WATCH_CHANGES, "n") {
        Ok(n) => n,
        Err(e) => return Ok(e),
    };
    let wait = Duration::from_millis(
        number(
            a.get(2),
            DEFAULT_WATCH_WAIT_MS,
            MAX_WATCH_WAIT_MS,
            "wait_ms",
        )
        .unwrap_or_default(),
    );
    let mut watch = s.config_watch(&a[0]).await?;
    // The first item is the value as of now.
    let _ = tokio::time::timeout(wait, watch.next()).await;
    let mut changes = Vec::new();
    let deadline = tokio::time::Instant::now() + wait;
    while (changes.len() as u64) < n {
        match tokio::time::timeout_at(deadline, watch.next()).await {
            Ok(Some(Ok(Some(v)))) => {
                changes.push(Reply::Str(format!("{} {}", v.revision, v.value)))
            }
            Ok(Some(Ok(None))) => {}
            Ok(Some(Err(e))) => return Err(e),
            Ok(None) | Err(_) => break,
        }
    }
    Ok(Reply::List(changes))
}
