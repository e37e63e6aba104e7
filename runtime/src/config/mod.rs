//! Configuration of a hamok peer: [`HamokConfig`], loaded from defaults, an optional TOML file, `HAMOK_*`
//! environment variables and values set in code.
//!
//! # Precedence
//!
//! Lowest to highest: the defaults of [`HamokConfig::default`], then the TOML file given to
//! [`HamokConfig::figment`] / [`HamokConfig::load`], then the `HAMOK_*` environment, then whatever the
//! caller merges into the returned [`Figment`](figment::Figment):
//!
//! ```
//! use figment::providers::Serialized;
//! use hamok_runtime::config::HamokConfig;
//!
//! let figment = HamokConfig::figment(None) // defaults < TOML file (none here) < HAMOK_* environment
//!     .merge(Serialized::default("election_timeout_ms", 200)); // < values set in code
//! let config = HamokConfig::from_figment(figment).expect("valid configuration");
//! assert_eq!(config.election_timeout_ms, 200);
//! ```
//!
//! # TOML
//!
//! Keys are the field names; the engine limits live in a `[raft]` table and the free-form application data
//! in an `[app_data]` table. Unknown keys are errors (a misspelt key would otherwise be silently ignored).
//!
//! ```toml
//! cluster_id = "orders"
//! election_timeout_ms = 500
//!
//! [raft]
//! max_inflight_appends = 16
//!
//! [app_data]
//! zone = "eu-west-1a"
//! ```
//!
//! # Environment
//!
//! `HAMOK_` followed by the upper-cased key, with `__` for the `.` of a nested key:
//! `HAMOK_ELECTION_TIMEOUT_MS=500`, `HAMOK_RAFT__MAX_INFLIGHT_APPENDS=16`, `HAMOK_APP_DATA__ZONE=eu-west-1a`
//! (environment keys are lower-cased, so that one sets `app_data.zone`). Only variables naming a known key
//! are read: other `HAMOK_*` variables (`HAMOK_NATS_URL`, `HAMOK_SIM_SEEDS`, ...) belong to other
//! components and are ignored. The values of `cluster_id`, `peer_id` and `app_data.*` are taken verbatim
//! (`HAMOK_PEER_ID=007` is the string `"007"`); the others are parsed like TOML values.
//!
//! The code is split by concern: the fields and their defaults here, loading in `load.rs`, the
//! environment provider in `env.rs`, validation in `validate.rs`.
//!
//! # Errors
//!
//! Every failure is a [`HamokError::Config`](crate::HamokError::Config) whose `key` is the dotted path of the offending key
//! (`"election_timeout_ms"`, `"raft.max_inflight_appends"`), or `"config_file"` when the TOML file itself
//! cannot be read or parsed.

mod env;
mod load;
mod validate;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::raft::{RaftConfig, RaftLimits};
use crate::store::SyncPolicy;

/// Prefix of the environment variables read by [`HamokConfig::figment`].
pub const ENV_PREFIX: &str = "HAMOK_";

/// Separator standing for the `.` of a nested key in an environment variable name
/// (`HAMOK_RAFT__MAX_INFLIGHT_APPENDS` is `raft.max_inflight_appends`).
pub const ENV_SEPARATOR: &str = "__";

/// The key reported when the TOML file cannot be read or parsed.
pub const CONFIG_FILE_KEY: &str = "config_file";

/// Longest accepted `cluster_id` / `peer_id`, in bytes.
pub const MAX_ID_BYTES: usize = 128;

/// Largest accepted `max_pending_requests`. Each pending request can leave one gap in its client's dedup
/// state, which keeps at most [`MAX_SEQ_RANGES_PER_SESSION`](crate::session::MAX_SEQ_RANGES_PER_SESSION)
/// ranges: half of that leaves room for requests that timed out while an older one was still pending.
pub const MAX_PENDING_REQUESTS_LIMIT: usize = crate::session::MAX_SEQ_RANGES_PER_SESSION / 2;

/// Keys whose environment values are taken verbatim as strings rather than parsed (a numeric-looking
/// `HAMOK_PEER_ID=007` must stay `"007"`).
const ENV_STRING_KEYS: &[&str] = &["cluster_id", "peer_id", "cluster_key", "storage.dir"];

/// Free-form string maps: any `<name>.<entry>` key is accepted from the environment, verbatim.
const ENV_STRING_MAPS: &[&str] = &["app_data"];

/// Configuration of one hamok peer.
///
/// Every field has a default (see [`HamokConfig::default`]), so a configuration source only names what it
/// changes. The defaults aim at fast failover between replicas on a LAN or behind a message broker, where a
/// round trip takes about a millisecond: a failed leader is replaced in well under a second.
///
/// Build it with [`HamokConfig::load`] (defaults, TOML file, environment), [`HamokConfig::figment`] +
/// [`HamokConfig::from_figment`] (to merge values set in code on top), or a struct literal with
/// `..HamokConfig::default()` followed by [`HamokConfig::validate`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HamokConfig {
    /// This peer's id in the cluster; `None` (the default) means a random UUID v4 is generated when the peer
    /// is built.
    ///
    /// Why `None`: replicas of one service usually run the same configuration, and ids must be unique; a
    /// random id needs no coordination. Set it when a peer must keep its identity across restarts (logs,
    /// dashboards). At most 128 bytes of `[A-Za-z0-9_-]`, since it appears in transport subjects.
    pub peer_id: Option<String>,

    /// Name of the cluster; frames carrying another cluster id are dropped.
    ///
    /// Why `"hamok"`: any fixed name lets replicas sharing a broker find each other with no setting at all;
    /// set a distinct one per replicated group that shares a broker. At most 128 bytes of `[A-Za-z0-9_-]`:
    /// it becomes part of broker subjects, where `.`, spaces and wildcards have a meaning.
    pub cluster_id: String,

    /// Optional shared secret that authenticates every frame (HMAC-SHA256). When set, frames without a
    /// valid tag (a peer without the key, a forger, another cluster's key) are dropped and counted in
    /// `dropped_unauthenticated`: such a peer cannot join, vote or write. At least 16 bytes.
    ///
    /// Why `None`: a private bus needs none and it costs a hash per frame; turn it on with one line
    /// (`cluster_key = "..."`, or `HAMOK_CLUSTER_KEY`) where the bus is shared with untrusted clients.
    /// It authenticates, it does not encrypt.
    pub cluster_key: Option<String>,

    /// A follower that hears no leader for a random time in `[election_timeout_ms, 2 * election_timeout_ms)`
    /// starts an election, and a leader that has not heard from a majority for that long steps down.
    ///
    /// Why 300 ms: on a LAN or broker a round trip is about a millisecond, so 300 ms is six heartbeats and
    /// hundreds of round trips — scheduling hiccups and a lost heartbeat or two do not cause spurious
    /// elections — while a crashed leader is replaced in roughly half a second. Must be at least twice
    /// `heartbeat_interval_ms`; raise it for WAN links or peers prone to long pauses.
    pub election_timeout_ms: u64,

    /// How often the leader sends heartbeats (empty appends that hold its followers' election timers off).
    ///
    /// Why 50 ms: six heartbeats per election timeout, so several consecutive ones must be lost before a
    /// follower gives up on the leader, at a cost of only 20 small frames per second per follower.
    pub heartbeat_interval_ms: u64,

    /// Granularity of the node actor's timer: how often time is advanced in the Raft engine.
    ///
    /// Why 5 ms: a tenth of the heartbeat interval, so heartbeats and elections fire at most 5 ms late,
    /// while 200 wake-ups per second are negligible. Must be between 1 and `heartbeat_interval_ms`.
    pub tick_interval_ms: u64,

    /// The leader removes (through the replicated log) a peer it has not heard from for longer than this.
    ///
    /// Why 3000 ms: ten election timeouts, so a peer that is merely slow, paused or reconnecting to the
    /// broker keeps its seat, while a crashed or scaled-down replica is dropped from the quorum within
    /// seconds (otherwise enough dead members would eventually cost the cluster its majority). Must exceed
    /// `election_timeout_ms`.
    pub peer_max_idle_ms: u64,

    /// When `true`, this peer never starts an election, so it never becomes the leader.
    ///
    /// Why `false`: every replica able to lead is what makes failover fast. Set it for peers that should
    /// not carry the leader's load (a slow host, a short-lived tool attached to the cluster).
    pub only_follower: bool,

    /// When `true`, the peer stops itself once it has no remote peers left.
    ///
    /// Why `false`: a peer alone is a valid single-member cluster and keeps serving; stopping is only
    /// wanted by processes that are pointless without the rest of the group.
    pub auto_stop_on_no_remote_peers: bool,

    /// Default timeout of a submit, a read or a wait, when the call does not give one.
    ///
    /// Why 5000 ms: several election rounds (a failover takes well under a second with the defaults), so a
    /// request issued during a failover still completes, while a cluster without quorum fails callers in
    /// bounded time instead of hanging them. Must be at least 1.
    pub request_timeout_ms: u64,

    /// Period of the discovery announcement a peer sends while it is not joined to a cluster.
    ///
    /// Why 50 ms: the heartbeat period, so joining peers and the existing cluster learn of each other within
    /// a few tens of milliseconds; the announcements stop once joined, so the traffic is only paid at
    /// start-up. Must be at least 1.
    pub hello_interval_ms: u64,

    /// How long a starting peer listens for an existing cluster before, if none answers, the peer with the
    /// lowest id among those announcing bootstraps a new one.
    ///
    /// Why 200 ms: four hello periods, so announcements are heard even if one or two frames are lost,
    /// while the first replicas of a new cluster are serving a fraction of a second after start. Must be at
    /// least twice `hello_interval_ms`.
    pub discovery_window_ms: u64,

    /// Timeout of one attempt to join an existing cluster (being added through the log and caught up).
    ///
    /// Why 5000 ms: enough for the leader to add the peer and stream it a snapshot of a few tens of MiB on a
    /// LAN, even across a failover, yet a join that cannot succeed is reported within seconds. Must be at
    /// least 1.
    pub join_timeout_ms: u64,

    /// How many times a failed or timed-out join is retried before `join` gives up.
    ///
    /// Why 3: a join usually fails only because leadership moved during it; three more attempts ride out
    /// that while bounding the total wait to about four `join_timeout_ms`. 0 means a single attempt.
    pub join_max_retry: u32,

    /// Number of log entries since the last snapshot that triggers a new snapshot and log compaction.
    ///
    /// Why 10 000: together with `snapshot_after_bytes` it bounds the memory of the log under endless
    /// writes, while snapshots (a copy of the whole state) stay rare enough to cost little; a lagging peer
    /// is caught up from the log when it is at most this far behind. While the leader streams a snapshot
    /// to a peer, or has not yet sent a follower that keeps up entries the compaction would drop, it
    /// waits up to twice this (and twice `snapshot_after_bytes`), so that the snapshot is not stale on
    /// arrival and no follower needs one for a few entries. Must be at least 1.
    pub snapshot_after_entries: u64,

    /// Bytes of log payload since the last snapshot that trigger a new snapshot and log compaction.
    ///
    /// Why 8 MiB: bounds the log's memory when entries are large (10 000 entries could otherwise be
    /// gigabytes) while staying far above typical write bursts. Must be at least 1.
    pub snapshot_after_bytes: u64,

    /// Most received frames queued for the node actor; bounds memory when the peer falls behind.
    ///
    /// Why 65 536: absorbs the bursts of a busy cluster (pipelined appends from the leader, requests from
    /// many callers) without loss, at a worst-case memory of a few hundred MiB only if frames are huge.
    /// Must be at least 1.
    pub max_inbound_frames: usize,

    /// Most frames queued for sending; bounds memory when the transport or broker is slower than the peer.
    ///
    /// Why 65 536: same reasoning as `max_inbound_frames`. Must be at least 1.
    pub max_outbound_frames: usize,

    /// Most requests (submits, reads, waits) of this peer waiting for completion; beyond it requests are
    /// refused as busy.
    ///
    /// Why 10 000: far more concurrency than a replica normally has, so only runaway callers hit it; it
    /// turns overload into a fast, retryable error instead of unbounded memory. Must be at least 1 and
    /// at most [`MAX_PENDING_REQUESTS_LIMIT`] (so the dedup state of a client stays within its bound).
    pub max_pending_requests: usize,

    /// Largest encoded frame sent or accepted, in bytes.
    ///
    /// Why 8 MiB: a frame carries an append batch or a snapshot chunk, so it must exceed
    /// `raft.max_command_bytes`, `raft.max_bytes_per_append` and `raft.snapshot_chunk_bytes` (all 512 KiB or
    /// less by default, which keeps what we *send* under NATS's default 1 MiB message limit); accepting up
    /// to 8 MiB leaves room for peers configured with larger limits on brokers that allow them.
    pub max_frame_bytes: usize,

    /// Free-form application data (`[app_data]` table, `HAMOK_APP_DATA__<KEY>` variables): stored with the
    /// configuration, not interpreted by hamok.
    ///
    /// Why empty: there is nothing to say unless the application has something to say.
    pub app_data: BTreeMap<String, String>,

    /// The Raft engine's limits (`[raft]` table, `HAMOK_RAFT__<FIELD>` variables): the engine's own
    /// [`RaftLimits`], documented there; the engine's timings are `election_timeout_ms` and
    /// `heartbeat_interval_ms` above.
    pub raft: RaftLimits,

    /// Where this peer keeps its Raft state (`[storage]` table, `HAMOK_STORAGE__<FIELD>` variables).
    /// In memory by default; `storage.dir` makes the peer durable.
    pub storage: StorageConfig,
}

/// Where a peer keeps its term, vote, log and snapshots.
///
/// ```
/// use hamok_runtime::config::StorageConfig;
/// let storage = StorageConfig { dir: Some("/var/lib/orders/hamok".into()), ..StorageConfig::default() };
/// assert_eq!(storage.sync, hamok_runtime::store::SyncPolicy::Batch);
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    /// A directory of this peer's own: term, vote, log and snapshots are kept there, and a restarted
    /// peer resumes from them (with its id, when `peer_id` is not set). `None` keeps everything in
    /// memory.
    ///
    /// Why `None`: an embedded library should not write to disk unasked, and a peer that restarts empty
    /// is safe (it rejoins and catches up); durability matters when a whole cluster may stop at once.
    pub dir: Option<PathBuf>,
    /// When the log is `fdatasync`ed: `batch`, `interval` or `never` (see
    /// [`SyncPolicy`] for what each can lose).
    ///
    /// Why `batch`: it is the only policy under which an acknowledged write survives a power cut of a
    /// majority, and one sync per Ready is shared by every write of the batch.
    pub sync: SyncPolicy,
    /// With `sync = "interval"`: the longest time between two syncs.
    ///
    /// Why 100 ms: a tenth of a second of writes is what a power cut may take, at a tenth of the syncs.
    pub sync_interval_ms: u64,
    /// With `sync = "batch"`: a leader syncs its own log writes on a thread of the store while it goes
    /// on, and counts its copy toward a commit once that sync returns (the followers' syncs may commit
    /// an entry first). Loses nothing `batch` keeps.
    ///
    /// Why off: measured on 2026-12-01 with 3 durable peers in one process on one shared disk (2
    /// cores), it gained nothing: at 1,000 writes in flight from the leader 54-72 k ops/s against
    /// 56-83 k inline (six runs each, alternated), and a leader's write took about 35 µs more at one
    /// in flight (a thread wake-up and a message more per sync). It is for leaders whose disk is
    /// slower than their followers', with cores to spare.
    pub background_sync: bool,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            dir: None,
            sync: SyncPolicy::Batch,
            sync_interval_ms: 100,
            background_sync: false,
        }
    }
}

impl Default for HamokConfig {
    fn default() -> Self {
        HamokConfig {
            peer_id: None,
            cluster_key: None,
            cluster_id: "hamok".to_owned(),
            election_timeout_ms: 300,
            heartbeat_interval_ms: 50,
            tick_interval_ms: 5,
            peer_max_idle_ms: 3_000,
            only_follower: false,
            auto_stop_on_no_remote_peers: false,
            request_timeout_ms: 5_000,
            hello_interval_ms: 50,
            discovery_window_ms: 200,
            join_timeout_ms: 5_000,
            join_max_retry: 3,
            snapshot_after_entries: 10_000,
            snapshot_after_bytes: 8 * 1024 * 1024,
            max_inbound_frames: 65_536,
            max_outbound_frames: 65_536,
            max_pending_requests: 10_000,
            max_frame_bytes: 8 * 1024 * 1024,
            app_data: BTreeMap::new(),
            raft: RaftLimits::default(),
            storage: StorageConfig::default(),
        }
    }
}

impl HamokConfig {
    /// The Raft engine's configuration: the two timings of this configuration and its `[raft]` limits
    /// (the node turns `persist_async` on when its store can sync in the background).
    pub fn raft_config(&self) -> RaftConfig {
        RaftConfig {
            election_timeout_ms: self.election_timeout_ms,
            heartbeat_interval_ms: self.heartbeat_interval_ms,
            limits: self.raft,
            persist_async: false,
        }
    }
}
