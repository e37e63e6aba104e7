//! An emitter's state machine: the replicated subscription table `event -> {peer -> metadata}`.

use std::collections::BTreeMap;

use bytes::Bytes;
use hamok_runtime::raft::PeerId;
use hamok_runtime::state_machine::ApplyContext;
use hamok_runtime::HamokError;
use serde::{Deserialize, Serialize};

use super::dispatch::EmitterExtra;
use super::EMITTER_KIND;
use crate::common::{encode, write_lock, Raw};
use crate::machine::{Core, Logic, Machine};

/// The replicated subscription table.
#[derive(Default, Serialize, Deserialize)]
#[serde(transparent)]
pub(crate) struct EmitterState {
    pub(super) subs: BTreeMap<String, BTreeMap<PeerId, Bytes>>,
}

#[derive(Serialize, Deserialize)]
pub(crate) enum EmitterCmd {
    /// Subscribes the submitting peer to `event` (no change if already subscribed); answers whether it
    /// was added.
    Subscribe { event: String, metadata: Bytes },
    /// Unsubscribes the submitting peer from `event`; answers whether it was subscribed.
    Unsubscribe { event: String },
    /// Unsubscribes the submitting peer from every event; answers how many subscriptions went.
    UnsubscribeAll,
    /// Sets the submitting peer's metadata for `event` if it is subscribed and (when given) the current
    /// metadata equals `expected`; answers whether it did.
    UpdateMetadata {
        event: String,
        new: Bytes,
        expected: Option<Bytes>,
    },
    /// Removes every subscription of `peers` (cleanup of departed peers); answers how many went.
    RemovePeers(Vec<PeerId>),
}

/// What is particular to an emitter's state machine ([`Machine`]`<EmitterLogic>`).
#[derive(Default)]
pub(crate) struct EmitterLogic;

/// The state machine of an emitter.
pub(crate) type EmitterMachine = Machine<EmitterLogic>;

pub(super) fn sub_key(event: &str, peer: &PeerId) -> Result<Bytes, HamokError> {
    encode(&(event, peer))
}

impl Logic for EmitterLogic {
    type State = EmitterState;
    type Extra = EmitterExtra;
    type Command = EmitterCmd;

    fn kind(&self) -> &str {
        EMITTER_KIND
    }

    fn exec(
        &self,
        core: &Core<EmitterState, EmitterExtra>,
        ctx: &ApplyContext,
        cmd: EmitterCmd,
    ) -> Result<Bytes, HamokError> {
        // The subscribing peer is the command's submitter, taken from the log, not from the payload.
        let client = &ctx.client;
        let mut events = core.listening().then(Vec::new);
        let response = {
            let mut state = write_lock(&core.state);
            let subs = &mut state.subs;
            match cmd {
                EmitterCmd::Subscribe { event, metadata } => {
                    let peers = subs.entry(event.clone()).or_default();
                    let added = !peers.contains_key(client);
                    if added {
                        peers.insert(client.clone(), metadata.clone());
                        if let Some(ev) = events.as_mut() {
                            ev.push(Raw::Insert {
                                key: sub_key(&event, client)?,
                                value: metadata,
                            });
                        }
                    }
                    encode(&added)
                }
                EmitterCmd::Unsubscribe { event } => {
                    let old = subs.get_mut(&event).and_then(|p| p.remove(client));
                    if subs.get(&event).is_some_and(|p| p.is_empty()) {
                        subs.remove(&event);
                    }
                    if let (Some(ev), Some(value)) = (events.as_mut(), &old) {
                        ev.push(Raw::Remove {
                            key: sub_key(&event, client)?,
                            value: value.clone(),
                        });
                    }
                    encode(&old.is_some())
                }
                EmitterCmd::UnsubscribeAll => {
                    let n = remove_peers(subs, std::slice::from_ref(client), &mut events)?;
                    encode(&n)
                }
                EmitterCmd::RemovePeers(peers) => {
                    let n = remove_peers(subs, &peers, &mut events)?;
                    encode(&n)
                }
                EmitterCmd::UpdateMetadata {
                    event,
                    new,
                    expected,
                } => {
                    let current = subs.get_mut(&event).and_then(|p| p.get_mut(client));
                    let hit = match current {
                        Some(current) if expected.as_ref().is_none_or(|e| e == current) => {
                            let old = std::mem::replace(current, new.clone());
                            if let Some(ev) = events.as_mut() {
                                ev.push(Raw::Update {
                                    key: sub_key(&event, client)?,
                                    old,
                                    new,
                                });
                            }
                            true
                        }
                        _ => false,
                    };
                    encode(&hit)
                }
            }
        };
        core.emit(events.unwrap_or_default());
        response
    }
}

fn remove_peers(
    subs: &mut BTreeMap<String, BTreeMap<PeerId, Bytes>>,
    peers: &[PeerId],
    events: &mut Option<Vec<Raw>>,
) -> Result<u64, HamokError> {
    let mut n = 0;
    for (event, subscribers) in subs.iter_mut() {
        for peer in peers {
            if let Some(value) = subscribers.remove(peer) {
                n += 1;
                if let Some(ev) = events.as_mut() {
                    ev.push(Raw::Remove {
                        key: sub_key(event, peer)?,
                        value,
                    });
                }
            }
        }
    }
    subs.retain(|_, p| !p.is_empty());
    Ok(n)
}
