//! The apply path: the log store (what each `Ready` asks to persist), the state machines (the state
//! machines every committed command is applied to, at most once per request), the attach hooks of
//! local handles, and snapshots with log compaction by log size.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::config::HamokConfig;
use crate::error::HamokError;
use crate::raft::{Entry, LogIndex, Membership, PersistedState, RaftNode, Ready, Snapshot, Term};
use crate::state_machine::{
    Applied, ClientId, LogCommand, Op, StateMachine, StateMachineFactory, StateMachines,
};
use crate::stats::Counters;
use crate::store::{LogStore, SyncDone};

/// A hook run on a collection's state machine whenever it is (re)created (to attach local observers).
pub(crate) type AttachFn = Arc<dyn Fn(&mut dyn StateMachine) + Send + Sync>;

/// What applying one committed command did.
pub(super) enum CommandApplied {
    /// The command does not decode: skipped identically on every peer (determinism holds).
    Undecodable(String),
    /// The command creates a collection of a kind this peer has not registered: it cannot follow the
    /// cluster and must stop rather than diverge.
    UnknownKind(String),
    /// Applied, or recognised as a retry.
    Done {
        /// The request's client and number.
        client: ClientId,
        seq: u64,
        /// The outcome.
        applied: Applied,
    },
}

pub(super) struct Apply {
    store: Box<dyn LogStore>,
    state_machines: StateMachines,
    attach_hooks: BTreeMap<String, Vec<AttachFn>>,
    snapshot_after_entries: u64,
    snapshot_after_bytes: u64,
}

impl Apply {
    pub(super) fn new(
        store: Box<dyn LogStore>,
        kinds: BTreeMap<String, StateMachineFactory>,
        config: &HamokConfig,
    ) -> Self {
        Apply {
            store,
            state_machines: StateMachines::new(kinds),
            attach_hooks: BTreeMap::new(),
            snapshot_after_entries: config.snapshot_after_entries,
            snapshot_after_bytes: config.snapshot_after_bytes,
        }
    }

    /// Drops the store (closing a durable one's files and lock); a closed peer persists nothing more.
    pub(super) fn release_store(&mut self) {
        self.store = Box::new(Released);
    }

    /// The planted bug `fence_not_checked` (see `PlantedBugs`).
    pub(super) fn plant_fence_not_checked(&mut self) {
        self.state_machines.fence_not_checked = true;
    }

    /// Loads what the store holds and restores the state machines from its snapshot.
    pub(super) fn load(&mut self) -> Result<PersistedState, HamokError> {
        let persisted = self.store.load()?;
        self.state_machines.restore(
            &persisted.snapshot.data,
            &persisted.snapshot.meta,
            |_, _| {},
        )?;
        Ok(persisted)
    }

    pub(super) fn state_machines(&self) -> &StateMachines {
        &self.state_machines
    }

    pub(super) fn knows_kind(&self, kind: &str) -> bool {
        self.state_machines.knows_kind(kind)
    }

    /// The incarnation of the cluster the stored log belongs to (0: none yet).
    pub(super) fn incarnation(&self) -> u64 {
        self.store.incarnation()
    }

    /// Records the incarnation of the cluster the log belongs to, durably.
    pub(super) fn save_incarnation(&mut self, incarnation: u64) -> Result<(), HamokError> {
        self.store.save_incarnation(incarnation)
    }

    /// Records a founding snapshot.
    pub(super) fn save_snapshot(&mut self, snapshot: &Snapshot) -> Result<(), HamokError> {
        self.store.save_snapshot(snapshot)
    }

    /// Persists what `ready` asks for, in order, and syncs once (group commit): before any of its
    /// messages leave. The commit mark goes with it, so a restarted peer applies as far as it had
    /// before serving anything (a durable store syncs the mark with the next batch that must be synced,
    /// as etcd does: a power cut can take the mark back, never an acknowledged entry).
    ///
    /// With `background`, the sync may run on the store's sync thread instead: `Ok(true)` when it
    /// does (`background` then gets its outcome there); otherwise the writes are durable on return.
    pub(super) fn persist(
        &mut self,
        ready: &Ready,
        background: Option<SyncDone>,
    ) -> Result<bool, HamokError> {
        // A Ready that only moves the commit mark writes a few bytes and, unless the store's policy
        // says a sync is due, syncs nothing; entries, under a policy that syncs them later, only
        // reach the page cache: both made here, without a thread hand-off.
        // (Asked in this order: a store that never blocks, the in-memory default, costs one call.)
        let entries_block = || {
            let bytes = ready.entries.iter().map(Entry::size_bytes).sum();
            self.store.entries_may_block(ready.entries.len(), bytes)
        };
        let blocks = self.store.may_block()
            && (ready.snapshot.is_some()
                || ready.hard_state.is_some()
                || (ready.entries_from.is_some() && entries_block())
                || self.store.sync_may_block());
        if let Some(done) = background {
            // Nothing here waits on the disk (the writes only reach the kernel, the sync runs on
            // the store's thread): no hand-off of the worker's tasks, which costs more than a write.
            if !self.write(ready)? {
                return Ok(false);
            }
            if self.store.sync_in_background(done)? {
                return Ok(true);
            }
            off_the_runtime(blocks, || self.store.sync())?;
            return Ok(false);
        }
        off_the_runtime(blocks, || {
            if self.write(ready)? {
                self.store.sync()?;
            }
            Ok(false)
        })
    }

    /// Whether the store can sync in the background (see [`Apply::persist`]).
    pub(super) fn syncs_in_background(&self) -> bool {
        self.store.syncs_in_background()
    }

    /// Whether the engine must count this peer's log writes only as reported durable
    /// (`RaftConfig::persist_async`): when the store syncs in the background, and whenever it
    /// outlives the process (`LogStore::is_volatile`), because a leader's replication leaves before
    /// its own write (`Peer::send_replication_early`) and a follower promised a commit on an
    /// unwritten copy could answer a write that a power cut then takes from the leader. The peer
    /// simulation cuts the power in the middle of a leader's write and catches the planted bug
    /// `counts_unwritten_copy` (this rule without `is_volatile`).
    pub(super) fn counts_only_reported_writes(&self) -> bool {
        self.store.syncs_in_background() || !self.store.is_volatile()
    }

    /// Writes what `ready` asks for; whether there was anything to write.
    fn write(&mut self, ready: &Ready) -> Result<bool, HamokError> {
        if let Some(snapshot) = &ready.snapshot {
            self.store.save_snapshot(snapshot)?;
        }
        if let Some(hs) = &ready.hard_state {
            self.store.save_hard_state(hs)?;
        }
        if let Some(from) = ready.entries_from {
            self.store.write_entries(from, &ready.entries)?;
        }
        if let Some(last) = ready.committed.last() {
            self.store.save_committed(last.index, last.term)?;
        }
        Ok(writes_more_than_commit(ready) || !ready.committed.is_empty())
    }

    /// Time passed: lets a store with an interval sync policy sync writes that wait for it.
    pub(super) fn tick(&mut self) -> Result<(), HamokError> {
        off_the_runtime(self.store.sync_may_block(), || self.store.sync())
    }

    /// Replaces every collection with a received snapshot's, running the attach hooks.
    pub(super) fn install(&mut self, snapshot: &Snapshot) -> Result<(), HamokError> {
        let hooks = &self.attach_hooks;
        self.state_machines
            .restore(&snapshot.data, &snapshot.meta, |id, machine| {
                for hook in hooks.get(id).into_iter().flatten() {
                    hook(machine);
                }
            })
    }

    /// Applies one committed command.
    pub(super) fn apply_command(
        &mut self,
        index: LogIndex,
        term: Term,
        bytes: &[u8],
        local: &ClientId,
    ) -> CommandApplied {
        let cmd = match LogCommand::decode(bytes) {
            Ok(c) => c,
            Err(e) => return CommandApplied::Undecodable(format!("undecodable command: {e}")),
        };
        let created = match &cmd.op {
            Op::Create { collection, kind } => {
                if !self.state_machines.knows_kind(kind) {
                    // The submitter knew this kind (it checks before submitting), so the others build
                    // it: this peer would silently diverge.
                    return CommandApplied::UnknownKind(format!(
                        "collection `{collection}` has kind `{kind}`, which this peer has not registered: \
                         it cannot follow the cluster and stops"
                    ));
                }
                Some(collection.clone())
            }
            _ => None,
        };
        let client = cmd.client.clone();
        let seq = cmd.seq;
        let is_local = client == *local;
        let applied = self.state_machines.apply(index, term, cmd, is_local);
        if let Some(collection) = created {
            self.run_attach_hooks(&collection);
        }
        CommandApplied::Done {
            client,
            seq,
            applied,
        }
    }

    /// A membership entry was applied at `index`: the state machines hear of the new members.
    pub(super) fn apply_members(&mut self, index: LogIndex, membership: &Membership) {
        self.state_machines
            .apply_members(index, membership.members().cloned().collect());
    }

    /// Registers a hook run on `collection`'s state machine whenever it is (re)created, and now if it
    /// exists.
    pub(super) fn attach(&mut self, collection: String, hook: AttachFn) {
        if let Some(machine) = self.state_machines.get_mut(&collection) {
            hook(machine);
        }
        self.attach_hooks.entry(collection).or_default().push(hook);
    }

    fn run_attach_hooks(&mut self, collection: &str) {
        let Some(hooks) = self.attach_hooks.get(collection) else {
            return;
        };
        if let Some(machine) = self.state_machines.get_mut(collection) {
            for hook in hooks {
                hook(machine);
            }
        }
    }

    /// Takes a snapshot and compacts the log once it holds `snapshot_after_entries` entries or
    /// `snapshot_after_bytes` bytes beyond the last snapshot. It waits, up to twice the thresholds so
    /// the log stays bounded, while a snapshot streams to a lagging peer (a new one would make it stale
    /// on arrival: a second install) and while a leader's follower that keeps up has not been sent
    /// entries the compaction would drop (its send window was full: it would need a whole snapshot for
    /// a few entries; with 3 peers at 100 writes in flight, 18 of 286 compactions did that).
    /// Returns the index of the snapshot taken, if one was.
    pub(super) fn maybe_snapshot(
        &mut self,
        raft: &mut RaftNode,
        counters: &Counters,
    ) -> Result<Option<LogIndex>, HamokError> {
        let applied = raft.applied_index();
        let since = applied.saturating_sub(raft.snapshot_index());
        let (_, bytes) = raft.log_size();
        let due = |slack: u64| {
            since > 0
                && (since >= self.snapshot_after_entries.saturating_mul(slack)
                    || bytes >= self.snapshot_after_bytes.saturating_mul(slack))
        };
        // The peers' progress is only looked at once a snapshot is due (this runs at every flush).
        let hold_back =
            || raft.snapshot_send_in_progress() || raft.compaction_would_strand(applied);
        if !due(1) || (!due(2) && hold_back()) {
            return Ok(None);
        }
        // The last snapshot's buffer, when nothing else holds it: written over, not doubled. Should
        // this fail, the peer stops (see `Peer::flush`) and the engine sends nothing from the buffer.
        let buffer = raft.take_snapshot_buffer().unwrap_or_default();
        let data = self.state_machines.snapshot_into_buffer(buffer)?;
        raft.compact(applied, data)?;
        off_the_runtime(self.store.may_block(), || {
            self.store.save_snapshot(raft.snapshot())
        })?;
        Counters::bump(&counters.snapshots_taken);
        Ok(Some(applied))
    }
}

/// Whether `ready` persists anything besides the commit mark (a snapshot, term and vote, entries).
fn writes_more_than_commit(ready: &Ready) -> bool {
    ready.snapshot.is_some() || ready.hard_state.is_some() || ready.entries_from.is_some()
}

/// Runs `f`, a store call that may wait on the disk (`blocks`), without holding up the runtime's other
/// tasks: on a multi-thread runtime the worker hands its queued tasks to another thread first
/// (`block_in_place`), so the other peers and clients of this process keep running during an
/// `fdatasync` (on 2 cores, two peers syncing at once would otherwise stop everything). On a
/// current-thread runtime (tests) and for stores that never wait, it just runs `f`.
fn off_the_runtime<R>(blocks: bool, f: impl FnOnce() -> R) -> R {
    use tokio::runtime::{Handle, RuntimeFlavor};
    let multi_thread = blocks
        && Handle::try_current().is_ok_and(|h| h.runtime_flavor() == RuntimeFlavor::MultiThread);
    if multi_thread {
        tokio::task::block_in_place(f)
    } else {
        f()
    }
}

/// The store of a closed peer: refuses every call, so nothing can be acknowledged as persisted after
/// the real store was dropped.
struct Released;

impl LogStore for Released {
    fn load(&mut self) -> Result<PersistedState, HamokError> {
        Err(HamokError::Closed)
    }
    fn save_hard_state(&mut self, _: &crate::raft::HardState) -> Result<(), HamokError> {
        Err(HamokError::Closed)
    }
    fn save_snapshot(&mut self, _: &Snapshot) -> Result<(), HamokError> {
        Err(HamokError::Closed)
    }
    fn write_entries(&mut self, _: LogIndex, _: &[crate::raft::Entry]) -> Result<(), HamokError> {
        Err(HamokError::Closed)
    }
    fn sync(&mut self) -> Result<(), HamokError> {
        Err(HamokError::Closed)
    }
    fn size(&self) -> (u64, u64) {
        (0, 0)
    }
    fn may_block(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{FileLogStore, FileLogStoreOptions, MemoryLogStore};

    fn apply(store: Box<dyn LogStore>) -> Apply {
        Apply::new(store, BTreeMap::new(), &HamokConfig::default())
    }

    #[test]
    fn only_an_in_memory_store_counts_writes_unreported() {
        assert!(!apply(Box::new(MemoryLogStore::new())).counts_only_reported_writes());
        let dir = tempfile::tempdir().unwrap();
        for background_sync in [false, true] {
            let options = FileLogStoreOptions {
                background_sync,
                ..FileLogStoreOptions::default()
            };
            let store =
                FileLogStore::open(dir.path().join(format!("{background_sync}")), options).unwrap();
            assert!(
                apply(Box::new(store)).counts_only_reported_writes(),
                "file store, background sync {background_sync}"
            );
        }
    }
}
