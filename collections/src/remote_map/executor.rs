//! The leader's executor: takes pending mutations in log order, executes each against the store with its
//! log index, answers the submitter, announces the changes, and records what was executed.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};
use std::time::Duration;

use bytes::Bytes;
use hamok_runtime::raft::LogIndex;
use hamok_runtime::{Hamok, HamokError};
use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, Notify};

use super::machine::PendingOp;

use super::machine::{RemoteCmd, RemoteMapLogic, RemoteState};
use super::store::{RemoteMap, RemoteOp, RemoteOutcome};
use crate::common::{decode, encode, Envelope, Local, Raw};
use crate::machine::Machine;

/// Most mutations one executor round executes before recording them as executed.
const EXECUTE_BATCH: usize = 256;

/// Direct messages: an executor delivering a result to the submitter, or telling every peer what a
/// mutation changed.
#[derive(Serialize, Deserialize)]
pub(super) enum RemoteMsg {
    Outcome {
        req: u64,
        result: Result<RemoteOutcome, String>,
    },
    Events(Vec<RemoteEvent>),
}

/// A change a mutation made to the store, as sent to every peer.
#[derive(Clone, Serialize, Deserialize)]
pub(super) enum RemoteEvent {
    Insert { key: Bytes, value: Bytes },
    Update { key: Bytes, old: Bytes, new: Bytes },
    Remove { key: Bytes, value: Bytes },
    Clear,
}

impl From<RemoteEvent> for Raw {
    fn from(e: RemoteEvent) -> Raw {
        match e {
            RemoteEvent::Insert { key, value } => Raw::Insert { key, value },
            RemoteEvent::Update { key, old, new } => Raw::Update { key, old, new },
            RemoteEvent::Remove { key, value } => Raw::Remove { key, value },
            RemoteEvent::Clear => Raw::Clear,
        }
    }
}

/// What `op` changed, given its outcome.
fn changes(op: &RemoteOp, outcome: &RemoteOutcome) -> Vec<RemoteEvent> {
    match (op, outcome) {
        (RemoteOp::Set(entries), RemoteOutcome::Values(olds)) => entries
            .iter()
            .zip(olds)
            .map(|((key, value), old)| match old {
                Some(old) => RemoteEvent::Update {
                    key: key.clone(),
                    old: old.clone(),
                    new: value.clone(),
                },
                None => RemoteEvent::Insert {
                    key: key.clone(),
                    value: value.clone(),
                },
            })
            .collect(),
        (RemoteOp::Insert(entries), RemoteOutcome::Values(existing)) => entries
            .iter()
            .zip(existing)
            .filter(|(_, e)| e.is_none())
            .map(|((key, value), _)| RemoteEvent::Insert {
                key: key.clone(),
                value: value.clone(),
            })
            .collect(),
        (RemoteOp::Remove(keys), RemoteOutcome::Values(removed)) => keys
            .iter()
            .zip(removed)
            .filter_map(|(key, v)| {
                v.as_ref().map(|value| RemoteEvent::Remove {
                    key: key.clone(),
                    value: value.clone(),
                })
            })
            .collect(),
        (RemoteOp::UpdateIf { key, new, expected }, RemoteOutcome::Bool(true)) => {
            vec![RemoteEvent::Update {
                key: key.clone(),
                old: expected.clone(),
                new: new.clone(),
            }]
        }
        (RemoteOp::Clear, RemoteOutcome::Done) => vec![RemoteEvent::Clear],
        _ => Vec::new(),
    }
}

pub(super) type Waiter = oneshot::Sender<Result<RemoteOutcome, HamokError>>;

/// What the handles of a remote map on one peer share: the store, the executor's wake-up and the
/// callers waiting for results.
pub(crate) struct RemoteExtra {
    pub(super) channel: String,
    pub(super) store: OnceLock<Arc<dyn RemoteMap>>,
    pub(super) wake: Notify,
    pub(super) waiters: Mutex<HashMap<u64, Waiter>>,
    pub(super) next_req: AtomicU64,
    pub(super) started: AtomicBool,
}

impl RemoteExtra {
    pub(super) fn new(id: &str) -> Self {
        // Request ids start at a random point so a restarted peer's ids do not meet its old ones.
        let start = RandomState::new().build_hasher().finish() >> 16;
        RemoteExtra {
            channel: format!("hamok.remote-map/{id}"),
            store: OnceLock::new(),
            wake: Notify::new(),
            waiters: Mutex::new(HashMap::new()),
            next_req: AtomicU64::new(start),
            started: AtomicBool::new(false),
        }
    }

    pub(super) fn resolve(&self, req: u64, result: Result<RemoteOutcome, HamokError>) {
        let waiter = self
            .waiters
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&req);
        if let Some(w) = waiter {
            let _ = w.send(result);
        }
    }
}

pub(super) type RemoteLocal = Local<RemoteState, RemoteExtra>;

/// Finds the store of this peer's machine and starts the executor (once per local handle group).
pub(crate) async fn start(hamok: &Hamok, local: &Arc<RemoteLocal>) -> Result<(), HamokError> {
    if local.extra.store.get().is_none() {
        let store = hamok
            .query(&local.id, false, |m| {
                m.and_then(|m| m.as_any().downcast_ref::<Machine<RemoteMapLogic>>())
                    .map(|m| m.logic().store.clone())
            })
            .await?
            .ok_or_else(|| HamokError::Rejected(format!("no remote map `{}`", local.id)))?;
        let _ = local.extra.store.set(store);
    }
    if local.extra.started.swap(true, Ordering::AcqRel) {
        return Ok(());
    }
    let weak = Arc::downgrade(local);
    let results = weak.clone();
    hamok.on_direct(&local.extra.channel, move |_from, payload| {
        let Some(local) = results.upgrade() else {
            return;
        };
        match decode::<RemoteMsg>(&payload) {
            Ok(RemoteMsg::Outcome { req, result }) => local
                .extra
                .resolve(req, result.map_err(HamokError::Rejected)),
            Ok(RemoteMsg::Events(events)) => {
                local.emit(events.into_iter().map(Raw::from).collect())
            }
            Err(_) => {}
        }
    })?;
    tokio::spawn(run_executor(hamok.clone(), weak));
    Ok(())
}

enum Executed {
    Done(Result<RemoteOutcome, HamokError>),
    Skipped,
    Abandoned,
}

async fn execute_with_retry(
    hamok: &Hamok,
    store: &Arc<dyn RemoteMap>,
    index: LogIndex,
    op: &RemoteOp,
) -> Executed {
    let mut backoff = Duration::from_millis(10);
    loop {
        match store.execute(index, op).await {
            Ok(Some(outcome)) => return Executed::Done(Ok(outcome)),
            Ok(None) => return Executed::Skipped,
            Err(e @ HamokError::Rejected(_)) => return Executed::Done(Err(e)),
            Err(e) => {
                tracing::warn!(index, "remote map store failed (retrying): {e}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                if !hamok.is_leader() || hamok.is_closed() {
                    return Executed::Abandoned;
                }
            }
        }
    }
}

async fn run_executor(hamok: Hamok, weak: Weak<RemoteLocal>) {
    let mut last_done: LogIndex = 0;
    let mut leading = false;
    loop {
        let Some(local) = weak.upgrade() else { return };
        if hamok.is_closed() {
            return;
        }
        let notified = local.extra.wake.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if hamok.is_leader() {
            if !leading {
                // Newly leading: everything still pending may need executing (the store skips what an
                // earlier leader did).
                leading = true;
                last_done = 0;
            }
            let batch: Vec<(LogIndex, PendingOp)> = local.read(|s| {
                s.pending
                    .range(last_done + 1..)
                    .take(EXECUTE_BATCH)
                    .map(|(i, p)| (*i, p.clone()))
                    .collect()
            });
            if !batch.is_empty() {
                if let Some(store) = local.extra.store.get().cloned() {
                    let mut progressed = false;
                    for (index, p) in batch {
                        match execute_with_retry(&hamok, &store, index, &p.op).await {
                            Executed::Done(result) => {
                                if let Ok(outcome) = &result {
                                    announce(&hamok, &local, changes(&p.op, outcome));
                                }
                                deliver(&hamok, &local, &p, result)
                            }
                            Executed::Skipped => {
                                // Executed by an earlier leader, which may not have answered.
                                if let Ok(Some(outcome)) = store.outcome(index).await {
                                    deliver(&hamok, &local, &p, Ok(outcome));
                                }
                            }
                            Executed::Abandoned => break,
                        }
                        last_done = index;
                        progressed = true;
                    }
                    if progressed {
                        record_executed(&hamok, &local.id, last_done).await;
                    }
                    continue;
                }
            }
        } else {
            leading = false;
        }
        tokio::select! {
            _ = &mut notified => {}
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
}

/// Emits a mutation's changes here and sends them to every other peer (best effort: a peer that misses
/// the message misses the events, never data).
fn announce(hamok: &Hamok, local: &RemoteLocal, events: Vec<RemoteEvent>) {
    if events.is_empty() {
        return;
    }
    if let Ok(bytes) = encode(&RemoteMsg::Events(events.clone())) {
        let _ = hamok.send_direct(None, &local.extra.channel, bytes);
    }
    local.emit(events.into_iter().map(Raw::from).collect());
}

fn deliver(
    hamok: &Hamok,
    local: &RemoteLocal,
    p: &PendingOp,
    result: Result<RemoteOutcome, HamokError>,
) {
    if &p.client == hamok.local_peer_id() {
        local.extra.resolve(p.req, result);
        return;
    }
    let msg = RemoteMsg::Outcome {
        req: p.req,
        result: result.map_err(|e| e.to_string()),
    };
    if let Ok(bytes) = encode(&msg) {
        let _ = hamok.send_direct(Some(p.client.clone()), &local.extra.channel, bytes);
    }
}

async fn record_executed(hamok: &Hamok, id: &str, up_to: LogIndex) {
    let Ok(cmd) = encode(&Envelope::Op(RemoteCmd::Executed(up_to))) else {
        return;
    };
    if let Err(e) = hamok.submit(id, cmd.to_vec()).await {
        tracing::debug!("remote map: recording executed mutations failed (redone later): {e}");
    }
}
