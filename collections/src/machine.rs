//! The one [`StateMachine`] of every collection: [`Machine<L>`] does what all collections do alike
//! (the `Init | Op` envelope, snapshot and restore of the replicated state, the link to the local
//! handles, `as_any`), and a per-collection [`Logic`] says what is particular: the replicated state,
//! the command, and how a command changes the state.
//!
//! A collection is therefore three small things: its `State` (serde, the snapshot is its encoding), its
//! `Command` enum, and one `exec` function. Adding a collection adds no state-machine boilerplate.

use std::collections::BTreeSet;
use std::sync::{Arc, RwLock, Weak};

use bytes::Bytes;
use hamok_runtime::raft::{LogIndex, PeerId};
use hamok_runtime::state_machine::{ApplyContext, StateMachine};
use hamok_runtime::HamokError;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::common::{
    decode, decode_command, encode, encoded_len, hold, read_lock, write_lock, Envelope, Gate,
    Local, Raw, ResyncReason,
};

/// What is particular to one kind of collection.
///
/// `exec` must be deterministic (same state and command, same result and new state, on every peer) and
/// must leave the state unchanged when it answers `Err` (a rejection is part of the replicated history).
pub(crate) trait Logic: Send + 'static {
    /// The replicated state. Its encoding is the collection's snapshot.
    type State: Default + Serialize + DeserializeOwned + Send + Sync + 'static;
    /// What the local handles of one peer share besides the state (an executor's wake-up, waiters for
    /// results...): never replicated, never in a snapshot.
    type Extra: Send + Sync + 'static;
    /// The collection's own command (the `Op` of the envelope).
    type Command: DeserializeOwned;

    /// Whether this collection's events come from `apply` (so a snapshot install skips some, and a
    /// subscriber resyncs to the state in its handle group). A remote map's come from its executor
    /// instead, and its state is not what its events describe.
    const EVENTS_FROM_APPLY: bool = true;

    /// The kind this collection is registered under.
    fn kind(&self) -> &str;

    /// Applies one command: changes the state through `core.state` (write lock), emits events through
    /// `core` (only built when [`Core::listening`]), and answers the caller's response.
    fn exec(
        &self,
        core: &Core<Self::State, Self::Extra>,
        ctx: &ApplyContext,
        cmd: Self::Command,
    ) -> Result<Bytes, HamokError>;

    /// The cluster's members changed at `index` (see [`StateMachine::on_members`]). Default: nothing.
    fn on_members(
        &self,
        core: &Core<Self::State, Self::Extra>,
        index: LogIndex,
        members: &BTreeSet<PeerId>,
    ) {
        let _ = (core, index, members);
    }

    /// A local handle group was linked to this machine (its first open here, or this machine replaced
    /// the one it read: created through the log or rebuilt from a snapshot). For collections that
    /// publish their state to the group (a config's watch). Default: nothing.
    fn on_observe(
        &self,
        core: &Core<Self::State, Self::Extra>,
        local: &Local<Self::State, Self::Extra>,
    ) {
        let _ = (core, local);
    }

    /// For a lock table: the token lock `name` is held under (see [`StateMachine::current_fence`]).
    fn current_fence(&self, core: &Core<Self::State, Self::Extra>, name: &str) -> Option<u64> {
        let _ = (core, name);
        None
    }
}

/// The state machine of one collection: its logic and its [`Core`].
pub(crate) struct Machine<L: Logic> {
    logic: L,
    core: Core<L::State, L::Extra>,
}

impl<L: Logic + Default> Default for Machine<L> {
    fn default() -> Self {
        Machine::new(L::default())
    }
}

impl<L: Logic> Machine<L> {
    /// An empty machine (no `Init` applied yet).
    pub(crate) fn new(logic: L) -> Self {
        Machine {
            logic,
            core: Core::default(),
        }
    }

    pub(crate) fn logic(&self) -> &L {
        &self.logic
    }

    pub(crate) fn core(&self) -> &Core<L::State, L::Extra> {
        &self.core
    }

    /// Links a local handle group to this machine (see [`Logic::on_observe`]). A re-link (this machine
    /// replaced the one the group read: rebuilt from an installed snapshot) sends the group's
    /// subscribers the whole state as a `Resync`: on the apply thread, between two applies, so it sits
    /// exactly where the snapshot does in their streams.
    pub(crate) fn observe(&mut self, local: &Arc<Local<L::State, L::Extra>>) {
        // Lock order: the gate the group read so far, then this machine's, then the state (only this
        // thread ever holds two gates). Holding the old one keeps a lagging subscriber's resync from
        // reading the group half re-linked (see `Local::resync`).
        let old_gate = read_lock(&local.gate).clone();
        let _old = old_gate.as_deref().map(hold);
        let new_gate = self.core.gate.clone();
        let same = old_gate.as_ref().is_some_and(|g| Arc::ptr_eq(g, &new_gate));
        let _new = (!same).then(|| hold(&new_gate));
        let relinked = self.core.observe(local);
        if relinked && L::EVENTS_FROM_APPLY && local.events.receiver_count() > 0 {
            match encode(&*read_lock(&self.core.state)) {
                Ok(state) => {
                    local.events.send(Raw::Resync {
                        state,
                        reason: ResyncReason::SnapshotInstalled,
                    });
                }
                Err(e) => tracing::error!("collection `{}`: resync not sent: {e}", local.id),
            }
        }
        self.logic.on_observe(&self.core, local);
    }
}

impl<L: Logic> StateMachine for Machine<L> {
    fn kind(&self) -> &str {
        self.logic.kind()
    }

    fn apply(&mut self, ctx: &ApplyContext, command: &[u8]) -> Result<Bytes, HamokError> {
        match decode_command(command)? {
            Envelope::Init => self.core.init(),
            Envelope::Op(cmd) => {
                // Held across the state change and its events (lock order: gate, then state).
                let _gate = hold(&self.core.gate);
                self.logic.exec(&self.core, ctx, cmd)
            }
        }
    }

    fn snapshot(&self) -> Result<Bytes, HamokError> {
        let state = read_lock(&self.core.state);
        encode(&(self.core.initialized, &*state))
    }

    fn snapshot_into(&self, out: &mut Vec<u8>) -> Result<(), HamokError> {
        let state = read_lock(&self.core.state);
        rmp_serde::encode::write(out, &(self.core.initialized, &*state))?;
        Ok(())
    }

    fn snapshot_len(&self) -> Option<usize> {
        let state = read_lock(&self.core.state);
        encoded_len(&(self.core.initialized, &*state)).ok()
    }

    fn restore(&mut self, data: &[u8]) -> Result<(), HamokError> {
        let (initialized, state): (bool, L::State) = decode(data)?;
        self.core.initialized = initialized;
        // In place: the local handles hold this `Arc`.
        *write_lock(&self.core.state) = state;
        Ok(())
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }

    fn on_members(&mut self, index: LogIndex, members: &BTreeSet<PeerId>) {
        // Held across the state change and its events (lock order: gate, then state).
        let _gate = hold(&self.core.gate);
        self.logic.on_members(&self.core, index, members);
    }

    fn current_fence(&self, name: &str) -> Option<u64> {
        self.logic.current_fence(&self.core, name)
    }
}

/// The part of a state machine that links it to local handles: its shared state and its observers.
pub(crate) struct Core<S, X> {
    pub(crate) state: Arc<RwLock<S>>,
    /// Held while the state changes and its events are sent (see `common`'s "Streams never skip
    /// silently"); taken before the state's lock, never after.
    gate: Gate,
    observers: Vec<Weak<Local<S, X>>>,
    /// Whether an `Init` was applied (replicated, part of the snapshot).
    pub(crate) initialized: bool,
}

impl<S: Default, X> Default for Core<S, X> {
    fn default() -> Self {
        Core {
            state: Arc::new(RwLock::new(S::default())),
            gate: Gate::default(),
            observers: Vec::new(),
            initialized: false,
        }
    }
}

impl<S, X> Core<S, X> {
    /// Applies `Init`: answers whether this is the first.
    fn init(&mut self) -> Result<Bytes, HamokError> {
        let first = !self.initialized;
        self.initialized = true;
        encode(&first)
    }

    /// Whether any local subscriber listens (events are only built then).
    pub(crate) fn listening(&self) -> bool {
        self.observers
            .iter()
            .any(|w| w.upgrade().is_some_and(|l| l.events.receiver_count() > 0))
    }

    /// Sends events to the local subscribers.
    pub(crate) fn emit(&self, events: Vec<Raw>) {
        if events.is_empty() {
            return;
        }
        for weak in &self.observers {
            if let Some(local) = weak.upgrade() {
                if local.events.receiver_count() > 0 {
                    for e in &events {
                        local.events.send(e.clone());
                    }
                }
            }
        }
    }

    /// The local handles' shared part, if one is alive (and not closed) on this peer.
    pub(crate) fn live_local(&self) -> Option<Arc<Local<S, X>>> {
        self.observers
            .iter()
            .filter_map(Weak::upgrade)
            .find(|l| !l.is_closed())
    }

    /// Links a local handle group to this machine: it reads this machine's state from now on (and holds
    /// its gate). Answers whether this is a re-link: the group read another machine's state before (not
    /// its first link, when it read nothing yet).
    fn observe(&mut self, local: &Arc<Local<S, X>>) -> bool {
        let old = std::mem::replace(&mut *write_lock(&local.slot), self.state.clone());
        let first = write_lock(&local.gate).replace(self.gate.clone()).is_none();
        self.observers.retain(|w| w.strong_count() > 0);
        if !self
            .observers
            .iter()
            .any(|w| std::ptr::eq(w.as_ptr(), Arc::as_ptr(local)))
        {
            self.observers.push(Arc::downgrade(local));
        }
        !first && !Arc::ptr_eq(&old, &self.state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Default, Serialize, Deserialize, PartialEq, Debug)]
    struct Count(u64);

    #[derive(Default)]
    struct Counter;

    impl Logic for Counter {
        type State = Count;
        type Extra = ();
        type Command = u64;
        fn kind(&self) -> &str {
            "test.counter"
        }
        fn exec(
            &self,
            core: &Core<Count, ()>,
            _ctx: &ApplyContext,
            add: u64,
        ) -> Result<Bytes, HamokError> {
            let mut state = write_lock(&core.state);
            state.0 = state
                .0
                .checked_add(add)
                .ok_or(HamokError::Busy("overflow"))?;
            encode(&state.0)
        }
    }

    fn ctx(index: u64) -> ApplyContext {
        ApplyContext {
            index,
            term: 1,
            client: "p".into(),
            local: true,
        }
    }

    #[test]
    fn envelope_snapshot_and_restore_are_shared() {
        let mut m = Machine::<Counter>::default();
        assert_eq!(m.kind(), "test.counter");
        let init = encode(&Envelope::<u64>::Init).unwrap();
        assert!(decode::<bool>(&m.apply(&ctx(1), &init).unwrap()).unwrap());
        assert!(!decode::<bool>(&m.apply(&ctx(2), &init).unwrap()).unwrap());
        let op = encode(&Envelope::Op(5u64)).unwrap();
        assert_eq!(decode::<u64>(&m.apply(&ctx(3), &op).unwrap()).unwrap(), 5);
        // A rejected command leaves the state alone.
        let huge = encode(&Envelope::Op(u64::MAX)).unwrap();
        assert!(m.apply(&ctx(4), &huge).is_err());
        // Garbage is a deterministic rejection, not a panic.
        assert!(m.apply(&ctx(5), b"\xc1garbage").is_err());

        let snap = m.snapshot().unwrap();
        let mut other = Machine::<Counter>::default();
        let shared = other.core().state.clone();
        other.restore(&snap).unwrap();
        assert_eq!(*read_lock(&shared), Count(5), "restored in place");
        assert!(
            !decode::<bool>(&other.apply(&ctx(6), &init).unwrap()).unwrap(),
            "the Init flag travels in the snapshot"
        );
        assert!(other.restore(b"\x01\x02").is_err());
    }
}
