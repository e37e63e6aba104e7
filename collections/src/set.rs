//! [`HamokSet`]: a replicated set.
//!
//! Members are encoded with rmp-serde and kept as bytes in a `BTreeSet` (deterministic order). With
//! [`HamokMap`](crate::HamokMap) it covers the STRING, HASH and SET stores of a Raft key-value service
//! (SET/GET/DEL, HSET/HGET/HDEL, SSET/SHAS/SDEL).

use std::collections::BTreeSet;

use bytes::Bytes;
use hamok_runtime::state_machine::ApplyContext;
use hamok_runtime::HamokError;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::common::{
    decode, decode_each, encode, handle_basics, plain_opened, write_lock, Events, Handle, Raw,
    ResyncReason, Types,
};
use crate::machine::{Core, Logic, Machine};

/// The kind a set is registered under.
pub const SET_KIND: &str = "hamok.set";

/// The replicated content of a set.
#[derive(Default, Serialize, Deserialize)]
#[serde(transparent)]
pub(crate) struct SetState {
    members: BTreeSet<Bytes>,
}

#[derive(Serialize, Deserialize)]
pub(crate) enum SetCmd {
    Add(Vec<Bytes>),
    Remove(Vec<Bytes>),
    Clear,
}

/// What is particular to a set's state machine ([`Machine`]`<SetLogic>`).
#[derive(Default)]
pub(crate) struct SetLogic;

/// The state machine of a set.
pub(crate) type SetMachine = Machine<SetLogic>;

impl Logic for SetLogic {
    type State = SetState;
    type Extra = ();
    type Command = SetCmd;

    fn kind(&self) -> &str {
        SET_KIND
    }

    fn exec(
        &self,
        core: &Core<SetState, ()>,
        _ctx: &ApplyContext,
        cmd: SetCmd,
    ) -> Result<Bytes, HamokError> {
        let listening = core.listening();
        let mut events = Vec::new();
        let response = {
            let mut state = write_lock(&core.state);
            let set = &mut state.members;
            match cmd {
                SetCmd::Add(values) => {
                    let mut added = Vec::with_capacity(values.len());
                    for v in values {
                        let new = set.insert(v.clone());
                        if new && listening {
                            events.push(Raw::Insert {
                                key: v,
                                value: Bytes::new(),
                            });
                        }
                        added.push(new);
                    }
                    encode(&added)
                }
                SetCmd::Remove(values) => {
                    let mut removed = Vec::with_capacity(values.len());
                    for v in values {
                        let was = set.remove(&v);
                        if was && listening {
                            events.push(Raw::Remove {
                                key: v,
                                value: Bytes::new(),
                            });
                        }
                        removed.push(was);
                    }
                    encode(&removed)
                }
                SetCmd::Clear => {
                    set.clear();
                    if listening {
                        events.push(Raw::Clear);
                    }
                    encode(&())
                }
            }
        };
        core.emit(events);
        response
    }
}

/// An event of a set on this peer.
#[derive(Clone, Debug, PartialEq)]
pub enum SetEvent<T> {
    /// A value was added (it was absent).
    Add(T),
    /// A value was removed.
    Remove(T),
    /// The set was cleared.
    Clear,
    /// The stream could not deliver some events (see [`ResyncReason`]): the set holds exactly `items`
    /// now (in the order of their encodings), and the events after this one continue from there.
    Resync {
        /// Every member of the set.
        items: Vec<T>,
        /// Why the events in between were skipped.
        reason: ResyncReason,
    },
    /// The handle (or its peer) was closed.
    Close,
}

fn decode_event<T: DeserializeOwned>(raw: Raw) -> Result<SetEvent<T>, HamokError> {
    Ok(match raw {
        Raw::Insert { key, .. } => SetEvent::Add(decode(&key)?),
        Raw::Remove { key, .. } | Raw::Update { key, .. } => SetEvent::Remove(decode(&key)?),
        Raw::Clear | Raw::Empty | Raw::NotEmpty => SetEvent::Clear,
        Raw::Close => SetEvent::Close,
        Raw::Resync { state, reason } => SetEvent::Resync {
            items: decode_each(&decode::<SetState>(&state)?.members)?,
            reason,
        },
    })
}

/// A replicated set of `T`. Cheap to clone. Writes go through the log; reads are local.
pub struct HamokSet<T> {
    handle: Handle<SetState, ()>,
    _types: Types<T>,
}

impl<T> Clone for HamokSet<T> {
    fn clone(&self) -> Self {
        HamokSet {
            handle: self.handle.clone(),
            _types: Types::default(),
        }
    }
}

impl<T> std::fmt::Debug for HamokSet<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HamokSet")
            .field("id", &self.handle.local.id)
            .field("len", &self.len())
            .finish()
    }
}

fn encode_all<T: Serialize>(values: impl IntoIterator<Item = T>) -> Result<Vec<Bytes>, HamokError> {
    values.into_iter().map(|v| encode(&v)).collect()
}

plain_opened!(HamokSet<T>, SetLogic, SET_KIND);
handle_basics!(HamokSet<T>);

impl<T> HamokSet<T> {
    /// Number of members (local).
    pub fn len(&self) -> usize {
        self.handle.local.read(|s| s.members.len())
    }

    /// Whether the set is empty (local).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Removes every member.
    pub async fn clear(&self) -> Result<(), HamokError> {
        self.handle.submit(SetCmd::Clear).await
    }

    /// Waits until local reads reflect every write acknowledged before the call.
    pub async fn sync(&self) -> Result<(), HamokError> {
        self.handle.sync().await
    }

    /// Closes this peer's handles (subscribers get [`SetEvent::Close`]).
    pub fn close(&self) {
        self.handle.local.close();
    }
}

impl<T: Serialize + DeserializeOwned> HamokSet<T> {
    pub(crate) fn new(handle: Handle<SetState, ()>) -> Self {
        HamokSet {
            handle,
            _types: Types::default(),
        }
    }

    /// Adds `values` atomically; returns how many were not members before.
    pub async fn add(&self, values: impl IntoIterator<Item = T>) -> Result<usize, HamokError> {
        let added: Vec<bool> = self.handle.submit(SetCmd::Add(encode_all(values)?)).await?;
        Ok(added.into_iter().filter(|a| *a).count())
    }

    /// Removes `values` atomically; returns how many were members.
    pub async fn remove(&self, values: impl IntoIterator<Item = T>) -> Result<usize, HamokError> {
        let removed: Vec<bool> = self
            .handle
            .submit(SetCmd::Remove(encode_all(values)?))
            .await?;
        Ok(removed.into_iter().filter(|r| *r).count())
    }

    /// Whether `value` is a member (local).
    pub fn contains(&self, value: &T) -> Result<bool, HamokError> {
        let v = encode(value)?;
        Ok(self.handle.local.read(|s| s.members.contains(&v)))
    }

    /// Whether `value` is a member, by a linearizable read.
    pub async fn contains_linearizable(&self, value: &T) -> Result<bool, HamokError> {
        self.handle.sync().await?;
        self.contains(value)
    }

    /// The members (local), in the set's order (by encoded bytes).
    pub fn values(&self) -> Result<Vec<T>, HamokError> {
        let raw: Vec<Bytes> = self
            .handle
            .local
            .read(|s| s.members.iter().cloned().collect());
        raw.iter().map(|v| decode(v)).collect()
    }

    /// Iterates over a copy of the members taken now (members that fail to decode are skipped).
    pub fn iter(&self) -> impl Iterator<Item = T> {
        let raw: Vec<Bytes> = self
            .handle
            .local
            .read(|s| s.members.iter().cloned().collect());
        raw.into_iter().filter_map(|v| decode(&v).ok())
    }

    /// Subscribes to the set's events on this peer. Events come in log order. The stream never skips
    /// silently: after a [`SetEvent::Resync`] its `items` are the whole set at that point of the log,
    /// and the events that follow continue from exactly that state (replaying `Resync`, then the
    /// events, reproduces the set).
    pub fn events(&self) -> Events<SetEvent<T>> {
        self.handle.events(decode_event::<T>)
    }
}
