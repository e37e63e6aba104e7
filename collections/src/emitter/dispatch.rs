//! Delivery on one peer: the direct messages between emitter tasks (publish, notify, ack), the local
//! handlers, and the background task that receives them and cleans up departed subscribers.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use hamok_runtime::raft::PeerId;
use hamok_runtime::{Hamok, HamokError, HamokEvent};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use super::machine::{EmitterCmd, EmitterState};
use crate::common::{decode, encode, Envelope, Local};

/// How often the leader checks the subscription table for peers that are no longer members.
const CLEANUP_INTERVAL: Duration = Duration::from_secs(1);

/// Most direct messages queued for an emitter's task on one peer; beyond it they are dropped (a
/// publisher then sees no ack from this peer).
const INBOX_CAPACITY: usize = 4096;

/// Direct (not replicated) messages between the emitter tasks of two peers.
#[derive(Serialize, Deserialize)]
pub(super) enum DirectMsg {
    Publish {
        req: u64,
        event: String,
        payload: Bytes,
    },
    Notify {
        event: String,
        payload: Bytes,
    },
    Ack {
        req: u64,
    },
}

pub(super) type RawHandler = Arc<dyn Fn(&PeerId, &[u8]) + Send + Sync>;

pub(super) struct LocalEvent {
    pub(super) metadata: Bytes,
    pub(super) handlers: Vec<(u64, RawHandler)>,
}

pub(super) struct PendingPublish {
    pub(super) remaining: BTreeSet<PeerId>,
    pub(super) acked: Vec<PeerId>,
    pub(super) done: Option<oneshot::Sender<()>>,
}

/// What the emitter's handles on one peer share besides the table.
pub(crate) struct EmitterExtra {
    pub(super) channel: String,
    pub(super) local_events: Mutex<BTreeMap<String, LocalEvent>>,
    pub(super) next_id: AtomicU64,
    pub(super) pending: Mutex<HashMap<u64, PendingPublish>>,
    pub(super) inbox: Mutex<Option<mpsc::Receiver<(PeerId, Bytes)>>>,
    pub(super) inbox_tx: mpsc::Sender<(PeerId, Bytes)>,
    pub(super) received: AtomicU64,
    pub(super) sent: AtomicU64,
}

pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl EmitterExtra {
    pub(crate) fn new(id: &str) -> Self {
        let (tx, rx) = mpsc::channel(INBOX_CAPACITY);
        EmitterExtra {
            channel: format!("hamok.emitter/{id}"),
            local_events: Mutex::new(BTreeMap::new()),
            next_id: AtomicU64::new(1),
            pending: Mutex::new(HashMap::new()),
            inbox: Mutex::new(Some(rx)),
            inbox_tx: tx,
            received: AtomicU64::new(0),
            sent: AtomicU64::new(0),
        }
    }

    /// Runs the local handlers of `event`; answers whether there was any.
    pub(super) fn dispatch(&self, from: &PeerId, event: &str, payload: &[u8]) -> bool {
        let handlers: Vec<RawHandler> = lock(&self.local_events)
            .get(event)
            .map(|e| e.handlers.iter().map(|(_, h)| h.clone()).collect())
            .unwrap_or_default();
        for h in &handlers {
            if std::panic::catch_unwind(AssertUnwindSafe(|| h(from, payload))).is_err() {
                tracing::warn!(event, "an emitter handler panicked");
            }
        }
        self.received.fetch_add(1, Ordering::Relaxed);
        !handlers.is_empty()
    }

    pub(super) fn on_ack(&self, from: PeerId, req: u64) {
        let mut pending = lock(&self.pending);
        if let Some(p) = pending.get_mut(&req) {
            if p.remaining.remove(&from) {
                p.acked.push(from);
            }
            if p.remaining.is_empty() {
                if let Some(done) = p.done.take() {
                    let _ = done.send(());
                }
            }
        }
    }
}

pub(super) type EmitterLocal = Local<EmitterState, EmitterExtra>;

/// Starts the emitter's background task on this peer (once per local handle group).
pub(crate) fn start(hamok: &Hamok, local: &Arc<EmitterLocal>) -> Result<(), HamokError> {
    let Some(mut inbox) = lock(&local.extra.inbox).take() else {
        return Ok(()); // already started
    };
    let tx = local.extra.inbox_tx.clone();
    hamok.on_direct(&local.extra.channel, move |from, payload| {
        // Runs inside the node actor: never block, never run user code here.
        let _ = tx.try_send((from, payload));
    })?;
    let weak = Arc::downgrade(local);
    let hamok = hamok.clone();
    let mut events = hamok.events();
    tokio::spawn(async move {
        let mut cleanup = tokio::time::interval(CLEANUP_INTERVAL);
        cleanup.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut rejoining = false;
        loop {
            tokio::select! {
                msg = inbox.recv() => {
                    let Some((from, bytes)) = msg else { return };
                    let Some(local) = weak.upgrade() else { return };
                    on_direct(&hamok, &local, from, &bytes);
                }
                _ = cleanup.tick() => {
                    let Some(local) = weak.upgrade() else { return };
                    if hamok.is_closed() { return; }
                    cleanup_departed(&hamok, &local).await;
                }
                ev = events.recv() => {
                    let Some(local) = weak.upgrade() else { return };
                    match ev {
                        Ok(HamokEvent::Close) | Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                        Ok(HamokEvent::RemotePeerLeft(_)) | Ok(HamokEvent::Leader) => {
                            cleanup_departed(&hamok, &local).await;
                        }
                        Ok(HamokEvent::Rejoining) => rejoining = true,
                        Ok(HamokEvent::Joined) if rejoining => {
                            rejoining = false;
                            resubscribe(&hamok, &local).await;
                        }
                        _ => {}
                    }
                }
            }
        }
    });
    Ok(())
}

fn on_direct(hamok: &Hamok, local: &EmitterLocal, from: PeerId, bytes: &[u8]) {
    let msg: DirectMsg = match decode(bytes) {
        Ok(m) => m,
        Err(e) => {
            tracing::debug!(%from, "undecodable emitter message: {e}");
            return;
        }
    };
    match msg {
        DirectMsg::Publish {
            req,
            event,
            payload,
        } => {
            if local.extra.dispatch(&from, &event, &payload) {
                if let Ok(ack) = encode(&DirectMsg::Ack { req }) {
                    let _ = hamok.send_direct(Some(from), &local.extra.channel, ack);
                }
            }
        }
        DirectMsg::Notify { event, payload } => {
            local.extra.dispatch(&from, &event, &payload);
        }
        DirectMsg::Ack { req } => local.extra.on_ack(from, req),
    }
}

/// Leader only: removes the subscriptions of peers that are no longer members.
async fn cleanup_departed(hamok: &Hamok, local: &EmitterLocal) {
    if !hamok.is_leader() {
        return;
    }
    let mut members: BTreeSet<PeerId> = hamok.remote_peer_ids().into_iter().collect();
    members.insert(hamok.local_peer_id().clone());
    let departed: Vec<PeerId> = local.read(|s| {
        s.subs
            .values()
            .flat_map(|p| p.keys())
            .filter(|p| !members.contains(*p))
            .cloned()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect()
    });
    if departed.is_empty() {
        return;
    }
    let Ok(cmd) = encode(&Envelope::Op(EmitterCmd::RemovePeers(departed))) else {
        return;
    };
    if let Err(e) = hamok.submit(&local.id, cmd.to_vec()).await {
        tracing::debug!("emitter cleanup not applied (retried later): {e}");
    }
}

/// After this peer was removed and joined again: subscribe again to every event with local handlers.
async fn resubscribe(hamok: &Hamok, local: &EmitterLocal) {
    let wanted: Vec<(String, Bytes)> = lock(&local.extra.local_events)
        .iter()
        .filter(|(_, e)| !e.handlers.is_empty())
        .map(|(event, e)| (event.clone(), e.metadata.clone()))
        .collect();
    for (event, metadata) in wanted {
        if let Ok(cmd) = encode(&Envelope::Op(EmitterCmd::Subscribe { event, metadata })) {
            let _ = hamok.submit(&local.id, cmd.to_vec()).await;
        }
    }
}
