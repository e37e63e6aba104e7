//! The state-machine layer: replicated state machines registered under collection ids, the command
//! envelope every log command travels in, and at-most-once application of client requests.
//!
//! Every peer applies every committed command, whether or not it made a local handle for the collection,
//! so a snapshot of this layer ([`StateMachines::snapshot`]) is the whole replicated state.

use std::any::Any;
use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::error::HamokError;
use crate::raft::{LogIndex, PeerId, SnapshotMeta, Term};
pub use crate::session::SeqStatus;
use crate::session::{Session, MAX_RESPONSE_CACHE_BYTES};

/// What a state machine knows about the command it applies.
#[derive(Clone, Debug)]
pub struct ApplyContext {
    /// The log index of the command.
    pub index: LogIndex,
    /// The term of the command.
    pub term: Term,
    /// The peer that submitted it.
    pub client: PeerId,
    /// Whether it was submitted on this peer.
    pub local: bool,
}

/// A deterministic replicated state machine. `apply` must give the same result and the same new state on
/// every peer for the same sequence of commands: no clock, no randomness, no I/O that can differ.
pub trait StateMachine: Send + 'static {
    /// The kind of collection (e.g. `"map"`), checked when a collection id is reused.
    fn kind(&self) -> &str;
    /// Applies one command and returns the response for the caller. An `Err` is a deterministic
    /// rejection (the same on every peer) returned to the caller; the state must be unchanged by it.
    fn apply(&mut self, ctx: &ApplyContext, command: &[u8]) -> Result<Bytes, HamokError>;
    /// Serializes the whole state.
    fn snapshot(&self) -> Result<Bytes, HamokError>;
    /// Appends to `out` the same bytes as [`snapshot`](Self::snapshot). A peer's snapshot is built in
    /// one buffer this way, without a second copy of every collection's state. Default: `snapshot`,
    /// copied.
    fn snapshot_into(&self, out: &mut Vec<u8>) -> Result<(), HamokError> {
        out.extend_from_slice(&self.snapshot()?);
        Ok(())
    }
    /// The length of the bytes [`snapshot_into`](Self::snapshot_into) would append, if the machine can
    /// tell without building them. A peer's first snapshot buffer is sized from it: grown by doubling
    /// instead, a buffer of a few MiB briefly holds its old and new halves (three times its size), on
    /// every peer at once since peers snapshot at about the same index. Default: `None` (not known).
    fn snapshot_len(&self) -> Option<usize> {
        None
    }
    /// Replaces the whole state with a snapshot.
    fn restore(&mut self, data: &[u8]) -> Result<(), HamokError>;
    /// For local reads by typed handles.
    fn as_any(&self) -> &dyn Any;
    /// For typed handles that attach local observers (event senders) to their state machine.
    fn as_any_mut(&mut self) -> &mut dyn Any;

    /// The cluster's members (voters and learners) changed, at log index `index`: called on every peer
    /// in log order, between the commands before and after that index, and once with the members in
    /// force when the machine is created or restored. Deterministic like `apply` (a lock table
    /// releases the locks of removed peers here). Default: nothing.
    ///
    /// `members` is empty until the cluster's first membership change (a founding peer's genesis
    /// configuration is in no log entry): treat empty as "not known yet", not as "nobody".
    fn on_members(&mut self, index: LogIndex, members: &BTreeSet<PeerId>) {
        let _ = (index, members);
    }

    /// For a lock table: the fencing token of lock `name` if it is held (see [`Fence`]). A fenced
    /// command is applied only while this answers its token. Default: not a lock table.
    fn current_fence(&self, name: &str) -> Option<u64> {
        let _ = name;
        None
    }
}

/// A fence carried by a command: apply it only if lock `name` of the lock table `table` is still held
/// under `token`, else refuse it with [`HamokError::StaleFence`] — decided at apply time, in log
/// order, on every peer alike, so a holder that lost the lock cannot overwrite what a newer holder did.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Fence {
    /// The id of the lock table's collection.
    pub table: String,
    /// The lock's name.
    pub name: String,
    /// The fencing token the holder was granted.
    pub token: u64,
}

/// Builds an empty state machine of one kind. Registered on the builder for every kind a cluster uses,
/// so a peer can rebuild state machines it learns of from the log or from a snapshot.
pub type StateMachineFactory = Arc<dyn Fn() -> Box<dyn StateMachine> + Send + Sync>;

/// A client: one peer during one run of its process (the nonce tells runs apart, so a restarted peer's
/// sequence numbers never collide with those of its previous run).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ClientId {
    /// The peer.
    pub peer: PeerId,
    /// Random per process start.
    pub nonce: u64,
}

/// The envelope of every command in the log.
///
/// Its strings and payload are [`Cow`]s: a submitter builds it owned (`LogCommand<'static>`), and every
/// peer that applies it decodes it borrowing from the log entry's bytes, so applying a command copies
/// neither its collection id nor its payload (see [`LogCommand::decode`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogCommand<'a> {
    /// Who submitted it.
    pub client: ClientId,
    /// The client's sequence number for this request (from 1).
    pub seq: u64,
    /// Every request of this client below `floor` has been answered; its dedup state may go.
    pub floor: u64,
    /// What to do.
    #[serde(borrow)]
    pub op: Op<'a>,
}

impl LogCommand<'_> {
    /// Encodes the command for the log, into a buffer sized for it up front: the bytes stay in the log
    /// of every peer until the next snapshot, so a buffer grown by doubling would hold up to twice
    /// their size (and cost a reallocation per doubling on the write path).
    pub fn encode(&self) -> Result<Bytes, HamokError> {
        // The envelope (client, numbers, variant tags, lengths) is well under this; an estimate too
        // small only costs one growth.
        const ENVELOPE_BYTES: usize = 64;
        let op = match &self.op {
            Op::Create { collection, kind } => collection.len() + kind.len(),
            Op::Apply {
                collection,
                payload,
                fence,
            } => {
                collection.len()
                    + payload.len()
                    + fence
                        .as_ref()
                        .map_or(0, |f| f.table.len() + f.name.len() + 16)
            }
            Op::Noop => 0,
        };
        let mut buf = Vec::with_capacity(ENVELOPE_BYTES + self.client.peer.as_str().len() + op);
        rmp_serde::encode::write(&mut buf, self)?;
        Ok(Bytes::from(buf))
    }
}

impl<'a> LogCommand<'a> {
    /// Decodes a command, borrowing its collection id, kind and payload from `bytes`.
    ///
    /// ```
    /// use hamok_runtime::state_machine::{ClientId, LogCommand, Op};
    /// use std::borrow::Cow;
    ///
    /// let cmd = LogCommand {
    ///     client: ClientId { peer: "peer-a".into(), nonce: 7 },
    ///     seq: 1,
    ///     floor: 1,
    ///     op: Op::Apply { collection: "users".into(), payload: vec![1, 2, 3].into(), fence: None },
    /// };
    /// let bytes = cmd.encode()?;
    /// let decoded = LogCommand::decode(&bytes)?;
    /// assert_eq!(decoded, cmd);
    /// assert!(matches!(decoded.op, Op::Apply { payload: Cow::Borrowed(_), .. }));
    /// # Ok::<(), hamok_runtime::HamokError>(())
    /// ```
    pub fn decode(bytes: &'a [u8]) -> Result<Self, HamokError> {
        Ok(rmp_serde::from_slice(bytes)?)
    }
}

/// A runtime-level operation. Owned (`Op<'static>`) when submitted; borrowed from the log entry when a
/// peer applies it (see [`LogCommand`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op<'a> {
    /// Creates collection `collection` of `kind` if absent. Fails if it exists with another kind.
    Create {
        /// The collection id.
        #[serde(borrow)]
        collection: Cow<'a, str>,
        /// Its kind.
        #[serde(borrow)]
        kind: Cow<'a, str>,
    },
    /// Applies `payload` to collection `collection`.
    Apply {
        /// The collection id.
        #[serde(borrow)]
        collection: Cow<'a, str>,
        /// The collection's command.
        #[serde(borrow, with = "serde_bytes")]
        payload: Cow<'a, [u8]>,
        /// Apply only while this fence holds (see [`Fence`]).
        fence: Option<Fence>,
    },
    /// A command with no effect (used to measure and to barrier).
    Noop,
}

/// Most clients whose dedup state is kept; beyond it the least recently active is forgotten
/// (deterministically, by log index). Sessions outlive the removal of their peer on purpose: a retry of
/// a removed peer's request can still be in flight, and without its session it would apply twice. A
/// forgotten client's late retry could apply twice, so the bound is far above any realistic count of
/// peer process starts (each start is a new client) that are still sending.
pub const MAX_CLIENT_SESSIONS: usize = 16_384;

/// What applying a log command produced.
#[derive(Debug)]
pub enum Applied {
    /// Applied: the response (empty unless the command was submitted on this peer), or the
    /// deterministic rejection.
    Done(Result<Bytes, HamokError>),
    /// A retry of a request already applied: skipped.
    Duplicate,
    /// A retry of a request whose dedup record the session bound forgot: skipped, and its submitter
    /// answers it with [`HamokError::OutcomeUnknown`].
    Forgotten,
}

/// All state machines of a peer, and the client sessions that make requests at-most-once.
pub struct StateMachines {
    kinds: BTreeMap<String, StateMachineFactory>,
    machines: BTreeMap<String, Box<dyn StateMachine>>,
    sessions: BTreeMap<ClientId, Session>,
    /// Bytes of cached responses over all sessions (bounded by `MAX_RESPONSE_CACHE_BYTES`).
    response_cache_bytes: usize,
    /// The members of the last membership entry applied; empty before the first one. (Not the engine's
    /// configuration: a founding peer's genesis configuration is in no entry, so peers that replay the
    /// log from its start could not agree on it. What every peer applies alike is what counts.)
    members: BTreeSet<PeerId>,
    /// A planted bug (hamok's own simulation only): fences are not checked.
    pub(crate) fence_not_checked: bool,
    /// Length of the last snapshot: the next one is sized from it.
    last_snapshot_bytes: std::sync::atomic::AtomicUsize,
}

/// The serialized form of [`StateMachines`]: the runtime's part of every Raft snapshot.
#[derive(Serialize, Deserialize)]
struct MachinesSnapshot {
    sessions: Vec<(ClientId, Session)>,
    machines: Vec<(String, String, Bytes)>,
    /// The members as of the snapshot's last entry (see `StateMachines::apply_members`).
    members: Vec<PeerId>,
}

impl StateMachines {
    /// No state machines; `kinds` tells how to build each kind.
    pub fn new(kinds: BTreeMap<String, StateMachineFactory>) -> Self {
        StateMachines {
            kinds,
            machines: BTreeMap::new(),
            sessions: BTreeMap::new(),
            response_cache_bytes: 0,
            members: BTreeSet::new(),
            fence_not_checked: false,
            last_snapshot_bytes: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// The members changed at `index` (a membership entry was applied): every machine hears of it.
    pub fn apply_members(&mut self, index: LogIndex, members: BTreeSet<PeerId>) {
        if members == self.members {
            return;
        }
        for machine in self.machines.values_mut() {
            machine.on_members(index, &members);
        }
        self.members = members;
    }

    /// The state machine of `collection`, if it exists.
    pub fn get(&self, collection: &str) -> Option<&dyn StateMachine> {
        self.machines.get(collection).map(|m| m.as_ref())
    }

    /// The state machine of `collection`, mutably (to attach local observers).
    pub fn get_mut(&mut self, collection: &str) -> Option<&mut (dyn StateMachine + 'static)> {
        self.machines.get_mut(collection).map(|m| m.as_mut())
    }

    /// Collection ids and kinds.
    pub fn list(&self) -> Vec<(String, String)> {
        self.machines
            .iter()
            .map(|(id, m)| (id.clone(), m.kind().to_string()))
            .collect()
    }

    /// Applies one command with at-most-once semantics per (client, seq). `local`: it was submitted on
    /// this peer, whose caller waits for the response; elsewhere a success answers empty bytes (the
    /// response is kept for a retry all the same, see [`StateMachines::cached_response`]).
    pub fn apply(
        &mut self,
        index: LogIndex,
        term: Term,
        cmd: LogCommand<'_>,
        local: bool,
    ) -> Applied {
        let LogCommand {
            client,
            seq,
            floor,
            op,
        } = cmd;
        let ctx = ApplyContext {
            index,
            term,
            client: client.peer.clone(),
            local,
        };
        // One session lookup per command: the borrow of `sessions` stays disjoint from the machines'.
        let session = self.sessions.entry(client).or_default();
        let cached_before = session.response_bytes();
        session.last_active = index;
        session.advance_floor(floor);
        let status = session.status(seq);
        // Raising the floor only drops cached responses.
        self.response_cache_bytes -= cached_before - session.response_bytes();
        match status {
            SeqStatus::New => {}
            SeqStatus::Applied => return Applied::Duplicate,
            SeqStatus::Forgotten => return Applied::Forgotten,
        }
        let inserted = session.insert(seq);
        debug_assert!(inserted, "status was New");
        let fence_checked = !self.fence_not_checked;
        let result = apply_op(
            &mut self.machines,
            &self.kinds,
            &self.members,
            fence_checked,
            &ctx,
            op,
        );
        // The response stays in the session for a retry. Only the submitting peer answers a caller
        // with it: elsewhere it is moved in, not shared (a `Bytes`' first clone allocates).
        let result = result.map(|response| {
            let answer = if local {
                response.clone()
            } else {
                Bytes::new()
            };
            let delta = session.cache_response(seq, response);
            self.response_cache_bytes = self.response_cache_bytes.saturating_add_signed(delta);
            answer
        });
        if self.sessions.len() > MAX_CLIENT_SESSIONS {
            // The current client is the most recently active, so it is never the one evicted.
            let stalest = self
                .sessions
                .iter()
                .min_by_key(|(id, s)| (s.last_active, (*id).clone()))
                .map(|(id, _)| id.clone());
            if let Some(gone) = stalest.and_then(|id| self.sessions.remove(&id)) {
                self.response_cache_bytes -= gone.response_bytes();
            }
        }
        self.trim_response_cache();
        Applied::Done(result)
    }

    /// Keeps the response caches within `MAX_RESPONSE_CACHE_BYTES` by dropping whole caches of the
    /// least recently active sessions (rare: only departed or runaway clients hold much).
    fn trim_response_cache(&mut self) {
        while self.response_cache_bytes > MAX_RESPONSE_CACHE_BYTES {
            let stalest = self
                .sessions
                .iter_mut()
                .filter(|(_, s)| s.response_bytes() > 0)
                .min_by_key(|(_, s)| s.last_active);
            let Some((_, session)) = stalest else {
                self.response_cache_bytes = 0;
                return;
            };
            self.response_cache_bytes -= session.drop_responses();
        }
    }

    /// What the dedup state says about request `seq` of `client` (used after a snapshot install to
    /// answer the local requests the snapshot already contains).
    pub fn request_status(&self, client: &ClientId, seq: u64) -> SeqStatus {
        self.sessions
            .get(client)
            .map_or(SeqStatus::New, |s| s.status(seq))
    }

    /// The cached response of an applied request `seq` of `client`, if still held (see
    /// [`session`](crate::session)).
    pub fn cached_response(&self, client: &ClientId, seq: u64) -> Option<Bytes> {
        self.sessions.get(client)?.response(seq).cloned()
    }

    /// Serializes every collection and every session, in the layout of `MachinesSnapshot`, into one
    /// buffer: each collection writes its state straight into it (a second copy of every state would
    /// double the memory a snapshot takes), and the buffer is sized from the last snapshot, since it
    /// stays in memory until the next one (a buffer grown by doubling holds up to twice its size).
    pub fn snapshot(&self) -> Result<Bytes, HamokError> {
        self.snapshot_into_buffer(Vec::new())
    }

    /// [`snapshot`](Self::snapshot), written into `buf` (cleared first): the last snapshot's buffer,
    /// when the engine could hand it over, so a peer never holds two snapshots at once.
    pub fn snapshot_into_buffer(&self, mut buf: Vec<u8>) -> Result<Bytes, HamokError> {
        use std::sync::atomic::Ordering;
        let mut hint = self.last_snapshot_bytes.load(Ordering::Relaxed);
        if hint == 0 {
            // The first snapshot: sized from what the machines can tell (each collection's own header
            // is a few bytes, covered by the margin below).
            hint = self
                .machines
                .values()
                .filter_map(|m| m.snapshot_len())
                .sum();
        }
        buf.clear();
        buf.reserve(hint + hint / 8 + 256);
        let array = |buf: &mut Vec<u8>, len: usize| -> Result<(), HamokError> {
            let len = u32::try_from(len)
                .map_err(|_| HamokError::codec("too many items for one snapshot array", None))?;
            rmp::encode::write_array_len(buf, len)
                .map(|_| ())
                .map_err(|e| HamokError::codec(format!("snapshot header: {e}"), None))
        };
        array(&mut buf, 3)?;
        let sessions: Vec<(&ClientId, &Session)> = self.sessions.iter().collect();
        rmp_serde::encode::write(&mut buf, &sessions)?;
        array(&mut buf, self.machines.len())?;
        for (id, machine) in &self.machines {
            array(&mut buf, 3)?;
            rmp_serde::encode::write(&mut buf, id.as_str())?;
            rmp_serde::encode::write(&mut buf, machine.kind())?;
            // A `bin 32` header, its length filled in once the state is written.
            let header = buf.len();
            buf.extend_from_slice(&[0xc6, 0, 0, 0, 0]);
            machine.snapshot_into(&mut buf)?;
            let len = u32::try_from(buf.len() - header - 5).map_err(|_| HamokError::TooLarge {
                size: buf.len() - header - 5,
                limit: u32::MAX as usize,
            })?;
            buf[header + 1..header + 5].copy_from_slice(&len.to_be_bytes());
        }
        let members: Vec<&PeerId> = self.members.iter().collect();
        rmp_serde::encode::write(&mut buf, &members)?;
        self.last_snapshot_bytes.store(buf.len(), Ordering::Relaxed);
        if buf.capacity() / 2 > buf.len() {
            // A reused buffer from a larger state: it would hold twice what is needed until the next.
            buf.shrink_to_fit();
        }
        Ok(Bytes::from(buf))
    }

    /// Replaces everything with a snapshot. StateMachines of kinds not registered here are an error.
    /// Local observers attached to existing machines are carried over by `reattach`.
    pub fn restore(
        &mut self,
        data: &[u8],
        meta: &SnapshotMeta,
        mut reattach: impl FnMut(&str, &mut dyn StateMachine),
    ) -> Result<(), HamokError> {
        if data.is_empty() {
            // The genesis snapshot: nothing yet.
            self.members.clear();
            self.machines.clear();
            self.sessions.clear();
            self.response_cache_bytes = 0;
            return Ok(());
        }
        let snap: MachinesSnapshot = rmp_serde::from_slice(data)?;
        self.members = snap.members.into_iter().collect();
        let mut machines: BTreeMap<String, Box<dyn StateMachine>> = BTreeMap::new();
        for (id, kind, bytes) in snap.machines {
            let factory = self.kinds.get(&kind).ok_or_else(|| {
                HamokError::Rejected(format!(
                    "snapshot has collection `{id}` of unknown kind `{kind}`"
                ))
            })?;
            let mut machine = factory();
            machine.restore(&bytes)?;
            machine.on_members(meta.last_index, &self.members);
            reattach(&id, machine.as_mut());
            machines.insert(id, machine);
        }
        self.machines = machines;
        self.sessions = snap
            .sessions
            .into_iter()
            .map(|(id, mut session)| {
                session.recount();
                (id, session)
            })
            .collect();
        self.response_cache_bytes = self.sessions.values().map(Session::response_bytes).sum();
        self.trim_response_cache();
        Ok(())
    }

    /// Whether this peer can build state machines of `kind`.
    pub fn knows_kind(&self, kind: &str) -> bool {
        self.kinds.contains_key(kind)
    }

    /// Registers (or replaces) the factory of a kind.
    pub fn register_kind(&mut self, kind: &str, factory: StateMachineFactory) {
        self.kinds.insert(kind.to_string(), factory);
    }
}

/// Applies one runtime operation to the machines (the part of [`StateMachines::apply`] after dedup).
fn apply_op(
    machines: &mut BTreeMap<String, Box<dyn StateMachine>>,
    kinds: &BTreeMap<String, StateMachineFactory>,
    members: &BTreeSet<PeerId>,
    fence_checked: bool,
    ctx: &ApplyContext,
    op: Op<'_>,
) -> Result<Bytes, HamokError> {
    match op {
        Op::Noop => Ok(Bytes::new()),
        Op::Create { collection, kind } => {
            if let Some(existing) = machines.get(collection.as_ref()) {
                if existing.kind() != kind {
                    return Err(HamokError::KindMismatch {
                        id: collection.into_owned(),
                        existing: existing.kind().to_string(),
                    });
                }
                return Ok(Bytes::new());
            }
            let factory = kinds
                .get(kind.as_ref())
                .ok_or_else(|| HamokError::Rejected(format!("unknown collection kind `{kind}`")))?;
            let mut machine = factory();
            machine.on_members(ctx.index, members);
            machines.insert(collection.into_owned(), machine);
            Ok(Bytes::new())
        }
        Op::Apply {
            collection,
            payload,
            fence,
        } => {
            if let Some(fence) = fence.filter(|_| fence_checked) {
                let current = machines
                    .get(&fence.table)
                    .and_then(|table| table.current_fence(&fence.name));
                if current != Some(fence.token) {
                    return Err(HamokError::StaleFence {
                        name: fence.name,
                        token: fence.token,
                        current,
                    });
                }
            }
            match machines.get_mut(collection.as_ref()) {
                Some(machine) => machine.apply(ctx, &payload),
                None => Err(HamokError::Rejected(format!(
                    "no collection `{collection}`"
                ))),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A counter: the command is a little-endian i64 to add; the response is the new total.
    struct Counter(i64);
    impl StateMachine for Counter {
        fn kind(&self) -> &str {
            "counter"
        }
        fn apply(&mut self, _: &ApplyContext, cmd: &[u8]) -> Result<Bytes, HamokError> {
            let add =
                i64::from_le_bytes(cmd.try_into().map_err(|_| HamokError::codec("len", None))?);
            self.0 += add;
            Ok(Bytes::copy_from_slice(&self.0.to_le_bytes()))
        }
        fn snapshot(&self) -> Result<Bytes, HamokError> {
            Ok(Bytes::copy_from_slice(&self.0.to_le_bytes()))
        }
        fn restore(&mut self, d: &[u8]) -> Result<(), HamokError> {
            self.0 = i64::from_le_bytes(d.try_into().map_err(|_| HamokError::codec("len", None))?);
            Ok(())
        }
        fn as_any(&self) -> &dyn Any {
            self
        }
        fn as_any_mut(&mut self) -> &mut dyn Any {
            self
        }
    }

    fn state_machines() -> StateMachines {
        let mut kinds: BTreeMap<String, StateMachineFactory> = BTreeMap::new();
        kinds.insert("counter".into(), Arc::new(|| Box::new(Counter(0))));
        StateMachines::new(kinds)
    }

    /// The total of the counter `c`.
    fn counter_total(s: &StateMachines) -> i64 {
        s.get("c")
            .and_then(|m| m.as_any().downcast_ref::<Counter>())
            .expect("counter c")
            .0
    }

    fn cmd(seq: u64, floor: u64, op: Op) -> LogCommand {
        LogCommand {
            client: ClientId {
                peer: PeerId::from("a"),
                nonce: 1,
            },
            seq,
            floor,
            op,
        }
    }

    /// Creates the counter `c`.
    fn create_counter() -> Op<'static> {
        Op::Create {
            collection: "c".into(),
            kind: "counter".into(),
        }
    }

    fn add(n: i64) -> Op<'static> {
        Op::Apply {
            collection: "c".into(),
            payload: n.to_le_bytes().to_vec().into(),
            fence: None,
        }
    }

    #[test]
    fn retried_request_applies_once_even_out_of_order() {
        let mut s = state_machines();
        let create = create_counter();
        assert!(matches!(
            s.apply(1, 1, cmd(1, 1, create), true),
            Applied::Done(Ok(_))
        ));
        // seq 3 lands before seq 2 (a retry across a leader change), then both are retried.
        assert!(matches!(
            s.apply(2, 1, cmd(3, 1, add(10)), true),
            Applied::Done(Ok(_))
        ));
        assert!(matches!(
            s.apply(3, 1, cmd(2, 1, add(5)), true),
            Applied::Done(Ok(_))
        ));
        assert!(matches!(
            s.apply(4, 2, cmd(3, 1, add(10)), true),
            Applied::Duplicate
        ));
        assert!(matches!(
            s.apply(5, 2, cmd(2, 4, add(5)), true),
            Applied::Duplicate
        ));
        let total = counter_total(&s);
        assert_eq!(total, 15);
    }

    #[test]
    fn only_the_submitting_peer_is_answered_and_every_peer_keeps_the_response() {
        let client = cmd(1, 1, Op::Noop).client;
        for local in [true, false] {
            let mut s = state_machines();
            let create = create_counter();
            assert!(matches!(
                s.apply(1, 1, cmd(1, 1, create), local),
                Applied::Done(Ok(_))
            ));
            let Applied::Done(Ok(answer)) = s.apply(2, 1, cmd(2, 1, add(10)), local) else {
                panic!("applied");
            };
            let total = Bytes::copy_from_slice(&10i64.to_le_bytes());
            let expected = if local { total.clone() } else { Bytes::new() };
            assert_eq!(answer, expected, "local: {local}");
            // What a retry through this peer (a later leader) would be answered with.
            assert_eq!(s.cached_response(&client, 2), Some(total), "local: {local}");
        }
    }

    #[test]
    fn a_log_command_decodes_borrowing_its_strings_and_payload() {
        let fenced = LogCommand {
            op: Op::Apply {
                collection: "c".into(),
                payload: vec![1, 2, 3].into(),
                fence: Some(Fence {
                    table: "locks".into(),
                    name: "l".into(),
                    token: 9,
                }),
            },
            ..cmd(4, 2, Op::Noop)
        };
        let create = cmd(1, 1, create_counter());
        for command in [fenced, create, cmd(2, 1, Op::Noop)] {
            let bytes = command.encode().unwrap();
            let decoded = LogCommand::decode(&bytes).unwrap();
            assert_eq!(decoded, command);
            match decoded.op {
                Op::Apply {
                    collection,
                    payload,
                    ..
                } => assert!(matches!(
                    (collection, payload),
                    (Cow::Borrowed(_), Cow::Borrowed(_))
                )),
                Op::Create { collection, kind } => {
                    assert!(matches!(
                        (collection, kind),
                        (Cow::Borrowed(_), Cow::Borrowed(_))
                    ))
                }
                Op::Noop => {}
            }
        }
        assert!(LogCommand::decode(&[0xc1]).is_err());
    }

    #[test]
    fn kind_mismatch_is_an_error_and_snapshot_round_trips() {
        let mut s = state_machines();
        let create = |kind: &str| Op::Create {
            collection: "c".into(),
            kind: kind.to_string().into(),
        };
        assert!(matches!(
            s.apply(1, 1, cmd(1, 1, create("counter")), true),
            Applied::Done(Ok(_))
        ));
        assert!(matches!(
            s.apply(2, 1, cmd(2, 1, create("map")), true),
            Applied::Done(Err(HamokError::KindMismatch { .. }))
        ));
        assert!(matches!(
            s.apply(3, 1, cmd(3, 1, add(7)), true),
            Applied::Done(Ok(_))
        ));
        let snap = s.snapshot().unwrap();
        let mut t = state_machines();
        t.restore(&snap, &SnapshotMeta::default(), |_, _| {})
            .unwrap();
        // The response cache travels with the snapshot; its size is recounted, not stored.
        assert!(s.response_cache_bytes > 0);
        assert_eq!(t.response_cache_bytes, s.response_cache_bytes);
        assert_eq!(counter_total(&t), 7);
        // Dedup state travels with the snapshot.
        assert!(matches!(
            t.apply(4, 2, cmd(3, 1, add(7)), true),
            Applied::Duplicate
        ));
    }

    #[test]
    fn the_one_buffer_snapshot_decodes_as_the_serde_layout() {
        let mut s = state_machines();
        for (i, name) in ["b", "c"].into_iter().enumerate() {
            let i = i as u64 + 1;
            let create = Op::Create {
                collection: name.into(),
                kind: "counter".into(),
            };
            s.apply(i, 1, cmd(i, 1, create), true);
        }
        s.apply(3, 1, cmd(3, 1, add(5)), true);
        s.apply_members(4, [PeerId::from("p"), PeerId::from("q")].into());
        let data = s.snapshot().unwrap();
        let mut decoded: MachinesSnapshot = rmp_serde::from_slice(&data).unwrap();
        for (_, session) in &mut decoded.sessions {
            session.recount(); // derived, not in the snapshot (as on restore)
        }
        let expected = MachinesSnapshot {
            sessions: s
                .sessions
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            machines: s
                .machines
                .iter()
                .map(|(id, m)| (id.clone(), m.kind().to_string(), m.snapshot().unwrap()))
                .collect(),
            members: s.members.iter().cloned().collect(),
        };
        assert_eq!(decoded.sessions, expected.sessions);
        assert_eq!(decoded.machines, expected.machines);
        assert_eq!(decoded.members, expected.members);
        assert_eq!(decoded.machines.len(), 2);
        // The next one is sized from this one and is the same.
        assert_eq!(s.snapshot().unwrap(), data);
    }

    /// A lock table stub: holds lock "l" under the token in its state while `holder` is a member.
    #[derive(Default)]
    struct Table {
        token: Option<u64>,
        holder: Option<PeerId>,
        heard: Vec<(LogIndex, usize)>,
    }
    impl StateMachine for Table {
        fn kind(&self) -> &str {
            "table"
        }
        fn apply(&mut self, ctx: &ApplyContext, _: &[u8]) -> Result<Bytes, HamokError> {
            self.token = Some(ctx.index);
            self.holder = Some(ctx.client.clone());
            Ok(Bytes::new())
        }
        fn snapshot(&self) -> Result<Bytes, HamokError> {
            Ok(Bytes::new())
        }
        fn restore(&mut self, _: &[u8]) -> Result<(), HamokError> {
            Ok(())
        }
        fn as_any(&self) -> &dyn Any {
            self
        }
        fn as_any_mut(&mut self) -> &mut dyn Any {
            self
        }
        fn on_members(&mut self, index: LogIndex, members: &BTreeSet<PeerId>) {
            self.heard.push((index, members.len()));
            if self.holder.as_ref().is_some_and(|h| !members.contains(h)) {
                self.holder = None;
                self.token = None;
            }
        }
        fn current_fence(&self, name: &str) -> Option<u64> {
            (name == "l").then_some(self.token).flatten()
        }
    }

    fn fenced(n: i64, token: u64) -> Op<'static> {
        Op::Apply {
            collection: "c".into(),
            payload: n.to_le_bytes().to_vec().into(),
            fence: Some(Fence {
                table: "t".into(),
                name: "l".into(),
                token,
            }),
        }
    }

    #[test]
    fn fenced_writes_apply_only_under_the_current_token_and_members_reach_every_machine() {
        let mut s = state_machines();
        s.register_kind("table", Arc::new(|| Box::<Table>::default()));
        s.apply_members(1, [PeerId::from("a"), PeerId::from("b")].into());
        let create = |id: &str, kind: &str| Op::Create {
            collection: id.to_string().into(),
            kind: kind.to_string().into(),
        };
        assert!(matches!(
            s.apply(2, 1, cmd(1, 1, create("c", "counter")), true),
            Applied::Done(Ok(_))
        ));
        assert!(matches!(
            s.apply(3, 1, cmd(2, 1, create("t", "table")), true),
            Applied::Done(Ok(_))
        ));
        let table = |s: &StateMachines| {
            s.get("t")
                .unwrap()
                .as_any()
                .downcast_ref::<Table>()
                .unwrap()
                .heard
                .clone()
        };
        assert_eq!(
            table(&s),
            vec![(3, 2)],
            "a new machine hears the members in force"
        );
        // No holder yet: a fenced write is refused, changes nothing.
        assert!(matches!(
            s.apply(4, 1, cmd(3, 1, fenced(5, 4)), true),
            Applied::Done(Err(HamokError::StaleFence { current: None, .. }))
        ));
        // `a` takes the lock at index 5: token 5.
        let grab = Op::Apply {
            collection: "t".into(),
            payload: vec![].into(),
            fence: None,
        };
        assert!(matches!(
            s.apply(5, 1, cmd(4, 1, grab), true),
            Applied::Done(Ok(_))
        ));
        assert!(matches!(
            s.apply(6, 1, cmd(5, 1, fenced(5, 5)), true),
            Applied::Done(Ok(_))
        ));
        assert!(matches!(
            s.apply(7, 1, cmd(6, 1, fenced(5, 4)), true),
            Applied::Done(Err(HamokError::StaleFence {
                current: Some(5),
                ..
            }))
        ));
        // `a` is removed: the table releases in log order, and `a`'s token no longer writes.
        s.apply_members(8, [PeerId::from("b")].into());
        assert_eq!(table(&s), vec![(3, 2), (8, 1)]);
        assert!(matches!(
            s.apply(9, 1, cmd(7, 1, fenced(5, 5)), true),
            Applied::Done(Err(HamokError::StaleFence { current: None, .. }))
        ));
        let total = counter_total(&s);
        assert_eq!(total, 5, "only the write under the current token applied");
        // A snapshot restore tells every machine the members as of the snapshot.
        let snap = s.snapshot().unwrap();
        let mut t = state_machines();
        t.register_kind("table", Arc::new(|| Box::<Table>::default()));
        let meta = SnapshotMeta {
            last_index: 9,
            last_term: 1,
            membership: crate::raft::Membership::with_voters([PeerId::from("b")]),
        };
        t.restore(&snap, &meta, |_, _| {}).unwrap();
        assert_eq!(table(&t), vec![(9, 1)]);
    }
}
