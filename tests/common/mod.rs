//! Helpers of the cluster-level integration tests: a tiny deterministic state machine, peers built on a
//! fresh [`InProcessHub`] with a unique cluster id, and the bounded waits and cluster helpers of
//! `hamok-testkit` (re-exported).
//!
//! Time in these tests is only ever a bound on a wait: no test asserts how long something took.
#![allow(dead_code, unused_imports)] // each test binary uses a different subset

use std::any::Any;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use hamok::runtime::state_machine::{ApplyContext, StateMachine};
use hamok::runtime::transport::memory::InProcessHub;
use hamok::runtime::{Hamok, HamokError, HamokEvent};
pub use hamok_testkit::cluster::{
    agreed_leader, close_all, join_all_at_once, pid, unique_id, wait_membership,
};
pub use hamok_testkit::wait::{eventually, wait_until, WAIT};

// -------------------------------------------------------------------------------------------------
// The test state machine
// -------------------------------------------------------------------------------------------------

/// The kind the test state machine is registered under.
pub const KIND: &str = "test-sm";
/// The collection every test uses.
pub const COLLECTION: &str = "t";

/// What the test state machine holds: a string map, a counter and the ids of every increment applied
/// (in apply order, duplicates kept, so a double apply is visible).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SmState {
    pub kv: BTreeMap<String, String>,
    pub counter: u64,
    pub incr_ids: Vec<u64>,
}

impl SmState {
    /// Increment ids applied more than once.
    pub fn duplicate_ids(&self) -> Vec<u64> {
        let mut seen = BTreeSet::new();
        let mut dups = Vec::new();
        for id in &self.incr_ids {
            if !seen.insert(*id) {
                dups.push(*id);
            }
        }
        dups
    }
}

/// A deterministic state machine: `P<klen:u32><key><value>` puts, `I<id:u64>` increments the counter and
/// records `id`. Every command answers with its log index (u64, little endian).
#[derive(Default)]
pub struct TestSm {
    pub state: SmState,
}

fn codec(what: &str) -> HamokError {
    HamokError::codec(format!("test state machine: {what}"), None)
}

/// Reads `n` bytes at `*at`.
fn take<'a>(data: &'a [u8], at: &mut usize, n: usize) -> Result<&'a [u8], HamokError> {
    let end = at.checked_add(n).ok_or_else(|| codec("length overflow"))?;
    let s = data.get(*at..end).ok_or_else(|| codec("truncated"))?;
    *at = end;
    Ok(s)
}

fn take_u32(data: &[u8], at: &mut usize) -> Result<u32, HamokError> {
    let b = take(data, at, 4)?;
    Ok(u32::from_le_bytes(b.try_into().expect("4 bytes")))
}

fn take_u64(data: &[u8], at: &mut usize) -> Result<u64, HamokError> {
    let b = take(data, at, 8)?;
    Ok(u64::from_le_bytes(b.try_into().expect("8 bytes")))
}

fn take_str(data: &[u8], at: &mut usize) -> Result<String, HamokError> {
    let len = take_u32(data, at)? as usize;
    let b = take(data, at, len)?;
    String::from_utf8(b.to_vec()).map_err(|_| codec("not utf-8"))
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// The command that sets `key` to `value`.
pub fn put_cmd(key: &str, value: &str) -> Vec<u8> {
    let mut out = vec![b'P'];
    put_str(&mut out, key);
    out.extend_from_slice(value.as_bytes());
    out
}

/// The command that increments the counter once, tagged with `id`.
pub fn incr_cmd(id: u64) -> Vec<u8> {
    let mut out = vec![b'I'];
    out.extend_from_slice(&id.to_le_bytes());
    out
}

/// The log index a command's response carries.
pub fn response_index(response: &[u8]) -> u64 {
    u64::from_le_bytes(
        response
            .try_into()
            .expect("the test state machine answers 8 bytes"),
    )
}

impl StateMachine for TestSm {
    fn kind(&self) -> &str {
        KIND
    }

    fn apply(&mut self, ctx: &ApplyContext, command: &[u8]) -> Result<Bytes, HamokError> {
        match command.first() {
            Some(b'P') => {
                let mut at = 1;
                let key = take_str(command, &mut at)?;
                let value =
                    String::from_utf8(command[at..].to_vec()).map_err(|_| codec("value"))?;
                self.state.kv.insert(key, value);
            }
            Some(b'I') => {
                let mut at = 1;
                let id = take_u64(command, &mut at)?;
                self.state.counter += 1;
                self.state.incr_ids.push(id);
            }
            _ => return Err(HamokError::Rejected("unknown test command".into())),
        }
        Ok(Bytes::copy_from_slice(&ctx.index.to_le_bytes()))
    }

    fn snapshot(&self) -> Result<Bytes, HamokError> {
        let mut out = Vec::new();
        out.extend_from_slice(&self.state.counter.to_le_bytes());
        out.extend_from_slice(&(self.state.incr_ids.len() as u32).to_le_bytes());
        for id in &self.state.incr_ids {
            out.extend_from_slice(&id.to_le_bytes());
        }
        out.extend_from_slice(&(self.state.kv.len() as u32).to_le_bytes());
        for (k, v) in &self.state.kv {
            put_str(&mut out, k);
            put_str(&mut out, v);
        }
        Ok(Bytes::from(out))
    }

    fn restore(&mut self, data: &[u8]) -> Result<(), HamokError> {
        let mut at = 0;
        let mut state = SmState {
            counter: take_u64(data, &mut at)?,
            ..SmState::default()
        };
        for _ in 0..take_u32(data, &mut at)? {
            state.incr_ids.push(take_u64(data, &mut at)?);
        }
        for _ in 0..take_u32(data, &mut at)? {
            let k = take_str(data, &mut at)?;
            let v = take_str(data, &mut at)?;
            state.kv.insert(k, v);
        }
        if at != data.len() {
            return Err(codec("trailing bytes in snapshot"));
        }
        self.state = state;
        Ok(())
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

// -------------------------------------------------------------------------------------------------
// Building peers
// -------------------------------------------------------------------------------------------------

/// Settings of a test peer: short timings so failures are detected in fractions of a second.
#[derive(Clone, Debug)]
pub struct Opts {
    pub election_timeout_ms: u64,
    pub heartbeat_interval_ms: u64,
    pub peer_max_idle_ms: u64,
    pub request_timeout_ms: u64,
    pub snapshot_after_entries: Option<u64>,
    pub only_follower: bool,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            election_timeout_ms: 150,
            heartbeat_interval_ms: 30,
            peer_max_idle_ms: 1_500,
            request_timeout_ms: 3_000,
            snapshot_after_entries: None,
            only_follower: false,
        }
    }
}

/// Peers of one cluster on a hub of their own.
pub struct TestCluster {
    pub hub: InProcessHub,
    pub cluster_id: String,
    pub opts: Opts,
}

impl TestCluster {
    /// A fresh hub and a unique cluster id.
    pub fn new(name: &str, opts: Opts) -> Self {
        TestCluster {
            hub: InProcessHub::new(),
            cluster_id: unique_id(name),
            opts,
        }
    }

    /// Builds (does not join) peer `id` with the cluster's options.
    pub async fn peer(&self, id: &str) -> Hamok {
        self.peer_with(id, &self.opts).await
    }

    /// Builds (does not join) peer `id` with other options.
    pub async fn peer_with(&self, id: &str, opts: &Opts) -> Hamok {
        let mut b = Hamok::builder()
            .peer_id(id)
            .cluster_id(self.cluster_id.clone())
            .transport(self.hub.clone())
            .election_timeout_ms(opts.election_timeout_ms)
            .heartbeat_interval_ms(opts.heartbeat_interval_ms)
            .peer_max_idle_ms(opts.peer_max_idle_ms)
            .request_timeout_ms(opts.request_timeout_ms)
            .only_follower(opts.only_follower)
            .register_kind(KIND, || Box::new(TestSm::default()));
        if let Some(n) = opts.snapshot_after_entries {
            b = b.snapshot_after_entries(n);
        }
        b.build()
            .await
            .unwrap_or_else(|e| panic!("build peer {id}: {e}"))
    }

    /// Builds the peers `ids` and joins them all at the same moment.
    pub async fn start(&self, ids: &[&str]) -> Vec<Hamok> {
        let mut peers = Vec::new();
        for id in ids {
            peers.push(self.peer(id).await);
        }
        join_all_at_once(&peers).await;
        peers
    }
}

// -------------------------------------------------------------------------------------------------
// Reading and writing the test collection
// -------------------------------------------------------------------------------------------------

/// The test state machine's state on `peer` (`None` if the collection does not exist there).
pub async fn read_state(peer: &Hamok, linearizable: bool) -> Result<Option<SmState>, HamokError> {
    peer.query(COLLECTION, linearizable, |sm| {
        sm.and_then(|m| m.as_any().downcast_ref::<TestSm>())
            .map(|t| t.state.clone())
    })
    .await
}

/// The state on `peer` after a linearizable read; panics if the read fails or the collection is missing.
pub async fn lin_state(peer: &Hamok) -> SmState {
    read_state(peer, true)
        .await
        .unwrap_or_else(|e| panic!("linearizable read on {}: {e}", peer.local_peer_id()))
        .unwrap_or_else(|| panic!("collection missing on {}", peer.local_peer_id()))
}

/// The state on `peer`, local read; the default state if the collection does not exist there yet.
pub async fn local_state(peer: &Hamok) -> SmState {
    read_state(peer, false)
        .await
        .unwrap_or_else(|e| panic!("local read on {}: {e}", peer.local_peer_id()))
        .unwrap_or_default()
}

/// Creates the test collection through `peer`.
pub async fn create_collection(peer: &Hamok) {
    peer.create_collection(COLLECTION, KIND)
        .await
        .unwrap_or_else(|e| panic!("create collection on {}: {e}", peer.local_peer_id()));
}

/// Submits a put through `peer`; returns the log index it was applied at.
pub async fn put(peer: &Hamok, key: &str, value: &str) -> Result<u64, HamokError> {
    peer.submit(COLLECTION, put_cmd(key, value))
        .await
        .map(|r| response_index(&r))
}

// -------------------------------------------------------------------------------------------------
// Events
// -------------------------------------------------------------------------------------------------

/// Every event of one peer, collected by a background task from the moment of the call.
#[derive(Clone)]
pub struct EventLog {
    events: Arc<Mutex<Vec<HamokEvent>>>,
}

impl EventLog {
    /// Subscribes to `peer`'s events.
    pub fn collect(peer: &Hamok) -> Self {
        let events = Arc::new(Mutex::new(Vec::new()));
        let sink = events.clone();
        let mut rx = peer.events();
        tokio::spawn(async move {
            use tokio::sync::broadcast::error::RecvError;
            loop {
                match rx.recv().await {
                    Ok(e) => sink.lock().unwrap().push(e),
                    Err(RecvError::Lagged(n)) => {
                        sink.lock()
                            .unwrap()
                            .push(HamokEvent::Error(format!("test collector lagged by {n}")));
                    }
                    Err(RecvError::Closed) => break,
                }
            }
        });
        EventLog { events }
    }

    /// The events so far.
    pub fn all(&self) -> Vec<HamokEvent> {
        self.events.lock().unwrap().clone()
    }

    /// Whether an event matching `f` was seen.
    pub fn any(&self, f: impl Fn(&HamokEvent) -> bool) -> bool {
        self.events.lock().unwrap().iter().any(f)
    }

    /// Waits until an event matching `f` is seen.
    pub async fn wait_for(&self, what: &str, f: impl Fn(&HamokEvent) -> bool) {
        wait_until(what, WAIT, || self.any(&f)).await
    }
}
