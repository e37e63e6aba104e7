//! Configuration of a hamok peer: [`HamokConfig`], loaded from defaults, an optional TOML file, `HAMOK_*`
//! environment variables and values set in code.
//!
//! # Precedence
//!
//! Lowest to highest: the defaults of [`HamokConfig::default`], then the TOML file given to
//! [`HamokConfig::figment`] / [`HamokConfig::load`], then the `HAMOK_*` environment, then whatever the
//! caller merges into the returned [`Figment`]:
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
//! # Errors
//!
//! Every failure is a [`HamokError::Config`] whose `key` is the dotted path of the offending key
//! (`"election_timeout_ms"`, `"raft.max_inflight_appends"`), or `"config_file"` when the TOML file itself
//! cannot be read or parsed.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::Path;

use figment::providers::{Format, Serialized, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};
use serde::{Deserialize, Serialize};

use crate::error::HamokError;
use crate::raft::RaftConfig;

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
const ENV_STRING_KEYS: &[&str] = &["cluster_id", "peer_id", "cluster_key"];

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
    /// to a peer it waits up to twice this (and twice `snapshot_after_bytes`), so that snapshot is not
    /// stale on arrival. Must be at least 1.
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

    /// The remaining limits of the Raft engine (`[raft]` table, `HAMOK_RAFT__<FIELD>` variables); the
    /// engine's timings are `election_timeout_ms` and `heartbeat_interval_ms` above.
    pub raft: RaftLimits,
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
        }
    }
}

/// The Raft engine's limits (every [`RaftConfig`] field but the two timings, which are top-level in
/// [`HamokConfig`]). The defaults are [`RaftConfig::default`]'s; see [`RaftConfig`] for each field's role.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RaftLimits {
    /// Most entries in one AppendEntries message.
    ///
    /// Why 1024: catches a lagging follower up in few round trips while keeping one message's decoding
    /// short.
    pub max_entries_per_append: usize,
    /// Most payload bytes in one AppendEntries message (a single larger entry is sent alone).
    ///
    /// Why 512 KiB: large enough for throughput, small enough to fit common broker message limits
    /// (NATS: 1 MiB) with room for headers.
    pub max_bytes_per_append: usize,
    /// Most AppendEntries messages in flight to one follower (the pipeline window).
    ///
    /// Why 64: keeps the link busy under sustained writes without waiting for each acknowledgement, while
    /// bounding what must be resent after a loss.
    pub max_inflight_appends: usize,
    /// Most entries the leader holds beyond the commit index; further proposals are refused as busy.
    ///
    /// Why 50 000: backpressure that only triggers when followers cannot keep up, bounding the leader's
    /// memory.
    pub max_uncommitted_entries: usize,
    /// Most bytes the leader holds beyond the commit index; further proposals are refused as busy.
    ///
    /// Why 64 MiB: same backpressure, for large entries. Must be at least `max_command_bytes`.
    pub max_uncommitted_bytes: usize,
    /// Most committed entries handed to the state machine in one batch.
    ///
    /// Why 4096: amortises the per-batch cost without stalling the node actor on one huge batch.
    pub max_apply_batch: usize,
    /// Size of one snapshot chunk.
    ///
    /// Why 256 KiB: fits broker message limits with a wide margin; a snapshot streams as many chunks.
    pub snapshot_chunk_bytes: usize,
    /// Most snapshot chunks in flight to one peer.
    ///
    /// Why 4: pipelines the transfer (1 MiB in flight) without flooding a peer that is catching up.
    pub max_inflight_snapshot_chunks: usize,
    /// Largest snapshot a peer accepts from a leader.
    ///
    /// Why 4 GiB: a sanity bound against a corrupt or hostile size, far above any in-memory state a
    /// replica is expected to hold.
    pub max_snapshot_bytes: u64,
    /// Most linearizable reads waiting for the leader to confirm its leadership.
    ///
    /// Why 100 000: reads are cheap and batched per confirmation round; the bound only stops runaway
    /// callers.
    pub max_pending_reads: usize,
    /// Largest single command accepted by a submit.
    ///
    /// Why 512 KiB: generous for collection operations, and an append carrying one such command (with
    /// framing) stays under NATS's default 1 MiB message limit; a command that could be proposed but never
    /// delivered would stall replication behind it. Must not exceed `max_uncommitted_bytes`.
    pub max_command_bytes: usize,
}

impl Default for RaftLimits {
    fn default() -> Self {
        // Exhaustive destructuring: a field added to `RaftConfig` fails to compile here until it is added.
        let RaftConfig {
            election_timeout_ms: _,
            heartbeat_interval_ms: _,
            max_entries_per_append,
            max_bytes_per_append,
            max_inflight_appends,
            max_uncommitted_entries,
            max_uncommitted_bytes,
            max_apply_batch,
            snapshot_chunk_bytes,
            max_inflight_snapshot_chunks,
            max_snapshot_bytes,
            max_pending_reads,
            max_command_bytes,
        } = RaftConfig::default();
        RaftLimits {
            max_entries_per_append,
            max_bytes_per_append,
            max_inflight_appends,
            max_uncommitted_entries,
            max_uncommitted_bytes,
            max_apply_batch,
            snapshot_chunk_bytes,
            max_inflight_snapshot_chunks,
            max_snapshot_bytes,
            max_pending_reads,
            max_command_bytes,
        }
    }
}

impl HamokConfig {
    /// The configuration sources in precedence order: the defaults, then the TOML file `toml_file` if given,
    /// then the `HAMOK_*` environment variables naming a known key (read now). Merge values set in code on
    /// top, then call [`HamokConfig::from_figment`]:
    ///
    /// ```
    /// use figment::providers::Serialized;
    /// use hamok_runtime::config::HamokConfig;
    ///
    /// let figment = HamokConfig::figment(None)
    ///     .merge(Serialized::default("election_timeout_ms", 200))
    ///     .merge(Serialized::default("raft.max_inflight_appends", 8));
    /// let config = HamokConfig::from_figment(figment).unwrap();
    /// assert_eq!(config.election_timeout_ms, 200);
    /// assert_eq!(config.raft.max_inflight_appends, 8);
    /// ```
    ///
    /// A `toml_file` is used exactly as given (no search in parent directories); a missing or unreadable
    /// file makes [`HamokConfig::from_figment`] fail with key `"config_file"`.
    pub fn figment(toml_file: Option<&Path>) -> Figment {
        let vars = std::env::vars_os().filter_map(|(key, value)| {
            Some((
                key.into_string().ok()?,
                value.to_string_lossy().into_owned(),
            ))
        });
        Self::figment_with_env(toml_file, vars)
    }

    /// As [`HamokConfig::figment`], with the environment given as `(name, value)` pairs.
    fn figment_with_env(
        toml_file: Option<&Path>,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Figment {
        let mut figment = Figment::from(Serialized::defaults(HamokConfig::default()));
        if let Some(path) = toml_file {
            figment = figment.merge(Toml::file_exact(path));
        }
        figment.merge(EnvProvider::new(vars))
    }

    /// Extracts the configuration from `figment` and validates it.
    ///
    /// # Errors
    ///
    /// [`HamokError::Config`] naming the dotted key that failed (`"election_timeout_ms"`,
    /// `"raft.max_inflight_appends"`), or `"config_file"` if the TOML file could not be read or parsed.
    pub fn from_figment(figment: Figment) -> Result<HamokConfig, HamokError> {
        let config: HamokConfig = figment.extract().map_err(config_error)?;
        config.validate()?;
        Ok(config)
    }

    /// Loads the configuration: defaults < `toml_file` (if given) < `HAMOK_*` environment, then validates it.
    ///
    /// # Errors
    ///
    /// As [`HamokConfig::from_figment`].
    pub fn load(toml_file: Option<&Path>) -> Result<HamokConfig, HamokError> {
        Self::from_figment(Self::figment(toml_file))
    }

    /// The Raft engine's configuration: the two timings of this configuration and its `[raft]` limits.
    pub fn raft_config(&self) -> RaftConfig {
        let RaftLimits {
            max_entries_per_append,
            max_bytes_per_append,
            max_inflight_appends,
            max_uncommitted_entries,
            max_uncommitted_bytes,
            max_apply_batch,
            snapshot_chunk_bytes,
            max_inflight_snapshot_chunks,
            max_snapshot_bytes,
            max_pending_reads,
            max_command_bytes,
        } = self.raft;
        RaftConfig {
            election_timeout_ms: self.election_timeout_ms,
            heartbeat_interval_ms: self.heartbeat_interval_ms,
            max_entries_per_append,
            max_bytes_per_append,
            max_inflight_appends,
            max_uncommitted_entries,
            max_uncommitted_bytes,
            max_apply_batch,
            snapshot_chunk_bytes,
            max_inflight_snapshot_chunks,
            max_snapshot_bytes,
            max_pending_reads,
            max_command_bytes,
        }
    }

    /// Checks every field and their relations; the first problem found is returned.
    ///
    /// # Errors
    ///
    /// [`HamokError::Config`] naming the offending key (`"raft.<field>"` for the engine limits).
    pub fn validate(&self) -> Result<(), HamokError> {
        fn fail(key: &str, reason: impl Into<String>) -> Result<(), HamokError> {
            Err(HamokError::Config {
                key: key.to_owned(),
                reason: reason.into(),
            })
        }
        if self.heartbeat_interval_ms == 0 {
            return fail("heartbeat_interval_ms", "must be at least 1");
        }
        if self.election_timeout_ms < self.heartbeat_interval_ms.saturating_mul(2) {
            return fail(
                "election_timeout_ms",
                "must be at least twice heartbeat_interval_ms",
            );
        }
        if self.tick_interval_ms == 0 || self.tick_interval_ms > self.heartbeat_interval_ms {
            return fail(
                "tick_interval_ms",
                "must be between 1 and heartbeat_interval_ms",
            );
        }
        if self.peer_max_idle_ms <= self.election_timeout_ms {
            return fail("peer_max_idle_ms", "must exceed election_timeout_ms");
        }
        if self.hello_interval_ms == 0 {
            return fail("hello_interval_ms", "must be at least 1");
        }
        if self.discovery_window_ms < self.hello_interval_ms.saturating_mul(2) {
            return fail(
                "discovery_window_ms",
                "must be at least twice hello_interval_ms",
            );
        }
        if let Err(reason) = check_id(&self.cluster_id) {
            return fail("cluster_id", reason);
        }
        if let Some(key) = &self.cluster_key {
            if key.len() < 16 {
                return fail("cluster_key", "must be at least 16 bytes");
            }
        }
        if let Some(peer_id) = &self.peer_id {
            if let Err(reason) = check_id(peer_id) {
                return fail("peer_id", reason);
            }
        }
        let positive = [
            ("request_timeout_ms", self.request_timeout_ms),
            ("join_timeout_ms", self.join_timeout_ms),
            ("snapshot_after_entries", self.snapshot_after_entries),
            ("snapshot_after_bytes", self.snapshot_after_bytes),
            ("max_inbound_frames", self.max_inbound_frames as u64),
            ("max_outbound_frames", self.max_outbound_frames as u64),
            ("max_pending_requests", self.max_pending_requests as u64),
            ("max_frame_bytes", self.max_frame_bytes as u64),
        ];
        for (key, value) in positive {
            if value == 0 {
                return fail(key, "must be at least 1");
            }
        }
        if self.max_pending_requests > MAX_PENDING_REQUESTS_LIMIT {
            return fail(
                "max_pending_requests",
                format!("must be at most {MAX_PENDING_REQUESTS_LIMIT}"),
            );
        }
        self.raft_config()
            .validate()
            .map_err(|e| HamokError::Config {
                key: match e.field {
                    "election_timeout_ms" | "heartbeat_interval_ms" => e.field.to_owned(),
                    field => format!("raft.{field}"),
                },
                reason: e.reason.to_owned(),
            })?;
        // A frame carries one command, one append batch or one snapshot chunk, plus headers: a limit below
        // any of them would make the cluster unable to replicate what it accepted.
        let largest_payload = [
            ("raft.max_command_bytes", self.raft.max_command_bytes),
            ("raft.max_bytes_per_append", self.raft.max_bytes_per_append),
            ("raft.snapshot_chunk_bytes", self.raft.snapshot_chunk_bytes),
        ];
        for (key, value) in largest_payload {
            if self.max_frame_bytes <= value {
                return fail("max_frame_bytes", format!("must exceed {key} ({value})"));
            }
        }
        Ok(())
    }
}

/// Checks a cluster or peer id: 1 to [`MAX_ID_BYTES`] bytes of `[A-Za-z0-9_-]` (it appears in broker
/// subjects, where `.`, spaces, `*` and `>` have a meaning).
fn check_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err("must not be empty".to_owned());
    }
    if id.len() > MAX_ID_BYTES {
        return Err(format!(
            "must be at most {MAX_ID_BYTES} bytes, is {}",
            id.len()
        ));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-'))
    {
        return Err(format!(
            "may only contain ASCII letters, digits, `_` and `-` (found {c:?})"
        ));
    }
    Ok(())
}

/// Turns the first error of a failed extraction into a [`HamokError::Config`] naming its dotted key.
fn config_error(error: figment::Error) -> HamokError {
    let Some(error) = error.into_iter().next() else {
        return HamokError::Config {
            key: CONFIG_FILE_KEY.to_owned(),
            reason: "unknown error".to_owned(),
        };
    };
    let mut path = error.path.clone();
    if let figment::error::Kind::UnknownField(field, _) = &error.kind {
        // Make sure the unknown field itself is named, not only its parent table.
        if path.last() != Some(field) {
            path.push(field.clone());
        }
    }
    let key = if path.is_empty() {
        // No key: the provider itself failed, i.e. the TOML file could not be read or parsed.
        CONFIG_FILE_KEY.to_owned()
    } else {
        path.join(".")
    };
    let mut reason = error.kind.to_string().trim_end().to_owned();
    if let Some(metadata) = &error.metadata {
        match &metadata.source {
            Some(source) => write!(reason, " (in {source} {})", metadata.name),
            None => write!(reason, " (in {})", metadata.name),
        }
        .expect("writing to a String cannot fail");
    }
    HamokError::Config { key, reason }
}

/// Provider of the `HAMOK_*` environment variables that name a known key of [`HamokConfig`].
///
/// Unlike `figment::providers::Env` it keeps the values of string keys verbatim, and it drops variables of
/// other components sharing the prefix.
struct EnvProvider {
    /// `(dotted key, value)` pairs, already filtered.
    entries: Vec<(String, Value)>,
}

impl EnvProvider {
    fn new(vars: impl IntoIterator<Item = (String, String)>) -> Self {
        let known = known_keys();
        let mut entries: Vec<(String, Value)> = vars
            .into_iter()
            .filter_map(|(name, value)| {
                let name = name.trim();
                let rest = name.get(..ENV_PREFIX.len()).and_then(|prefix| {
                    prefix
                        .eq_ignore_ascii_case(ENV_PREFIX)
                        .then(|| &name[ENV_PREFIX.len()..])
                })?;
                let key = rest.to_ascii_lowercase().replace(ENV_SEPARATOR, ".");
                let verbatim = ENV_STRING_KEYS.contains(&key.as_str())
                    || key.split_once('.').is_some_and(|(map, entry)| {
                        ENV_STRING_MAPS.contains(&map) && !entry.is_empty() && !entry.contains('.')
                    });
                if verbatim {
                    Some((key, Value::from(value)))
                } else if known.contains(key.as_str()) {
                    let Ok(parsed) = value.parse::<Value>();
                    Some((key, parsed))
                } else {
                    None
                }
            })
            .collect();
        // Deterministic result whatever the environment's order.
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        EnvProvider { entries }
    }
}

/// Every dotted key an environment variable may set without being a free-form map entry: the top-level
/// fields and the fields of nested tables (`raft.max_inflight_appends`), taken from the serialized defaults
/// so the list cannot drift from the struct.
fn known_keys() -> BTreeSet<String> {
    fn walk(prefix: &str, dict: &Dict, keys: &mut BTreeSet<String>) {
        for (name, value) in dict {
            let key = if prefix.is_empty() {
                name.clone()
            } else {
                format!("{prefix}.{name}")
            };
            if let Value::Dict(_, inner) = value {
                walk(&key, inner, keys);
            }
            keys.insert(key);
        }
    }
    let mut keys = BTreeSet::new();
    if let Ok(Value::Dict(_, dict)) = Value::serialize(HamokConfig::default()) {
        walk("", &dict, &mut keys);
    }
    keys
}

impl Provider for EnvProvider {
    fn metadata(&self) -> Metadata {
        Metadata::named(format!("`{ENV_PREFIX}` environment variable(s)")).interpolater(
            |_: &Profile, keys: &[&str]| {
                let keys: Vec<String> = keys.iter().map(|k| k.to_ascii_uppercase()).collect();
                format!("{ENV_PREFIX}{}", keys.join(ENV_SEPARATOR))
            },
        )
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        let mut dict = Dict::new();
        for (key, value) in &self.entries {
            if let Value::Dict(_, nested) = figment::util::nest(key, value.clone()) {
                dict = merge_dicts(dict, nested);
            }
        }
        Ok(Profile::Default.collect(dict))
    }
}

/// Recursively merges `right` into `left`, `right` winning on conflicts.
fn merge_dicts(mut left: Dict, right: Dict) -> Dict {
    for (key, value) in right {
        let merged = match (left.remove(&key), value) {
            (Some(Value::Dict(_, l)), Value::Dict(tag, r)) => Value::Dict(tag, merge_dicts(l, r)),
            (_, value) => value,
        };
        left.insert(key, merged);
    }
    left
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A TOML file in the temporary directory, removed on drop.
    struct TempToml(PathBuf);

    impl TempToml {
        fn new(contents: &str) -> Self {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let path = std::env::temp_dir().join(format!(
                "hamok-config-test-{}-{}.toml",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::write(&path, contents).expect("write temporary TOML file");
            TempToml(path)
        }
    }

    impl Drop for TempToml {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn load_with(toml: Option<&str>, vars: &[(&str, &str)]) -> Result<HamokConfig, HamokError> {
        let file = toml.map(TempToml::new);
        HamokConfig::from_figment(HamokConfig::figment_with_env(
            file.as_ref().map(|f| f.0.as_path()),
            env(vars),
        ))
    }

    fn key_of(result: Result<HamokConfig, HamokError>) -> String {
        match result {
            Err(HamokError::Config { key, .. }) => key,
            other => panic!("expected a config error, got {other:?}"),
        }
    }

    fn invalid_key(config: HamokConfig) -> String {
        match config.validate() {
            Err(HamokError::Config { key, .. }) => key,
            other => panic!("expected a config error, got {other:?}"),
        }
    }

    #[test]
    fn defaults_validate() {
        let config = HamokConfig::default();
        config.validate().unwrap();
        assert_eq!(config.cluster_id, "hamok");
        assert_eq!(config.peer_id, None);
        assert_eq!(config.election_timeout_ms, 300);
        assert_eq!(config.heartbeat_interval_ms, 50);
        assert_eq!(config.tick_interval_ms, 5);
        assert_eq!(config.snapshot_after_bytes, 8 * 1024 * 1024);
        assert_eq!(config.raft_config(), RaftConfig::default());
        assert_eq!(load_with(None, &[]).unwrap(), config);
    }

    #[test]
    fn serde_round_trip_and_partial_input() {
        let config = HamokConfig {
            peer_id: Some("p-1".into()),
            app_data: [("zone".to_owned(), "a".to_owned())].into(),
            ..HamokConfig::default()
        };
        let figment = Figment::from(Serialized::defaults(&config));
        assert_eq!(figment.extract::<HamokConfig>().unwrap(), config);
        // `#[serde(default)]`: a partial input fills the rest from the defaults.
        let partial: HamokConfig = Figment::from(Toml::string(
            "cluster_id = \"x\"\n[raft]\nmax_apply_batch = 7",
        ))
        .extract()
        .unwrap();
        assert_eq!(partial.cluster_id, "x");
        assert_eq!(partial.raft.max_apply_batch, 7);
        assert_eq!(
            partial.raft.max_inflight_appends,
            RaftLimits::default().max_inflight_appends
        );
        assert_eq!(partial.election_timeout_ms, 300);
    }

    #[test]
    fn toml_overrides_defaults() {
        let config = load_with(
            Some(
                r#"
                cluster_id = "orders"
                peer_id = "007"
                election_timeout_ms = 500
                only_follower = true
                [raft]
                max_inflight_appends = 16
                [app_data]
                zone = "eu-1"
                "#,
            ),
            &[],
        )
        .unwrap();
        assert_eq!(config.cluster_id, "orders");
        assert_eq!(config.peer_id.as_deref(), Some("007"));
        assert_eq!(config.election_timeout_ms, 500);
        assert!(config.only_follower);
        assert_eq!(config.raft.max_inflight_appends, 16);
        assert_eq!(
            config.raft.max_apply_batch,
            RaftLimits::default().max_apply_batch
        );
        assert_eq!(
            config.app_data.get("zone").map(String::as_str),
            Some("eu-1")
        );
        assert_eq!(config.heartbeat_interval_ms, 50);
        assert_eq!(config.raft_config().election_timeout_ms, 500);
        assert_eq!(config.raft_config().max_inflight_appends, 16);
    }

    #[test]
    fn env_overrides_toml() {
        let config = load_with(
            Some("election_timeout_ms = 500\nheartbeat_interval_ms = 60\n[raft]\nmax_inflight_appends = 16"),
            &[
                ("HAMOK_ELECTION_TIMEOUT_MS", "400"),
                ("HAMOK_RAFT__MAX_INFLIGHT_APPENDS", "32"),
                ("HAMOK_ONLY_FOLLOWER", "true"),
                ("HAMOK_PEER_ID", "007"),
                ("HAMOK_CLUSTER_ID", "42"),
                ("HAMOK_APP_DATA__ZONE", "1.10"),
                ("hamok_join_max_retry", "5"),
            ],
        )
        .unwrap();
        assert_eq!(config.election_timeout_ms, 400);
        assert_eq!(
            config.heartbeat_interval_ms, 60,
            "not in the environment: from TOML"
        );
        assert_eq!(config.raft.max_inflight_appends, 32);
        assert!(config.only_follower);
        assert_eq!(
            config.peer_id.as_deref(),
            Some("007"),
            "string keys are verbatim"
        );
        assert_eq!(config.cluster_id, "42");
        assert_eq!(
            config.app_data.get("zone").map(String::as_str),
            Some("1.10")
        );
        assert_eq!(config.join_max_retry, 5);
    }

    #[test]
    fn code_overrides_env() {
        let figment = HamokConfig::figment_with_env(
            None,
            env(&[
                ("HAMOK_ELECTION_TIMEOUT_MS", "400"),
                ("HAMOK_RAFT__MAX_INFLIGHT_APPENDS", "32"),
            ]),
        )
        .merge(Serialized::default("election_timeout_ms", 200))
        .merge(Serialized::default("raft.max_inflight_appends", 8));
        let config = HamokConfig::from_figment(figment).unwrap();
        assert_eq!(config.election_timeout_ms, 200);
        assert_eq!(config.raft.max_inflight_appends, 8);
    }

    #[test]
    fn process_environment_is_read() {
        // A free-form `app_data` entry with a name no other test uses: concurrent loads are unaffected.
        const VAR: &str = "HAMOK_APP_DATA__CONFIG_RS_PROCESS_ENV_PROBE";
        std::env::set_var(VAR, "seen");
        let result = HamokConfig::load(None);
        std::env::remove_var(VAR);
        let config = result.unwrap();
        assert_eq!(
            config
                .app_data
                .get("config_rs_process_env_probe")
                .map(String::as_str),
            Some("seen")
        );
    }

    #[test]
    fn unrelated_hamok_variables_are_ignored() {
        let config = load_with(
            None,
            &[
                ("HAMOK_SIM_SEEDS", "1,2,3"),
                ("HAMOK_NATS_URL", "nats://localhost:4222"),
                ("HAMOK_RAFT__NOT_A_LIMIT", "x"),
                ("HAMOK_APP_DATA__A__B", "nested"),
                ("HAMOK_", "empty"),
                ("HAMOKELECTION_TIMEOUT_MS", "1"),
                ("ELECTION_TIMEOUT_MS", "1"),
            ],
        )
        .unwrap();
        assert_eq!(config, HamokConfig::default());
    }

    #[test]
    fn invalid_values_name_their_key() {
        assert_eq!(
            key_of(load_with(Some("election_timeout_ms = \"abc\""), &[])),
            "election_timeout_ms"
        );
        assert_eq!(
            key_of(load_with(Some("[raft]\nmax_inflight_appends = 0"), &[])),
            "raft.max_inflight_appends"
        );
        assert_eq!(
            key_of(load_with(Some("[raft]\nmax_inflight_appends = -3"), &[])),
            "raft.max_inflight_appends"
        );
        assert_eq!(
            key_of(load_with(Some("heartbeat_interval_ms = 0"), &[])),
            "heartbeat_interval_ms"
        );
        assert_eq!(
            key_of(load_with(None, &[("HAMOK_RAFT__MAX_APPLY_BATCH", "lots")])),
            "raft.max_apply_batch"
        );
        assert_eq!(
            key_of(load_with(None, &[("HAMOK_ONLY_FOLLOWER", "maybe")])),
            "only_follower"
        );
        assert_eq!(
            key_of(load_with(Some("election_timeout_msx = 3"), &[])),
            "election_timeout_msx",
            "misspelt keys are reported"
        );
        assert_eq!(
            key_of(load_with(Some("[raft]\ninflight = 3"), &[])),
            "raft.inflight"
        );
        match load_with(Some("election_timeout_ms = \"abc\""), &[]) {
            Err(HamokError::Config { reason, .. }) => {
                assert!(
                    reason.contains("TOML file"),
                    "reason names the source: {reason}"
                )
            }
            other => panic!("expected a config error, got {other:?}"),
        }
    }

    #[test]
    fn toml_file_errors_name_config_file() {
        let missing = std::env::temp_dir().join("hamok-config-test-does-not-exist.toml");
        assert_eq!(key_of(HamokConfig::load(Some(&missing))), CONFIG_FILE_KEY);
        assert_eq!(
            key_of(load_with(Some("this is = = not toml"), &[])),
            CONFIG_FILE_KEY
        );
    }

    #[test]
    fn validate_checks_relations() {
        let base = HamokConfig::default;
        assert_eq!(
            invalid_key(HamokConfig {
                heartbeat_interval_ms: 0,
                ..base()
            }),
            "heartbeat_interval_ms"
        );
        assert_eq!(
            invalid_key(HamokConfig {
                election_timeout_ms: 99,
                ..base()
            }),
            "election_timeout_ms"
        );
        assert_eq!(
            invalid_key(HamokConfig {
                tick_interval_ms: 0,
                ..base()
            }),
            "tick_interval_ms"
        );
        assert_eq!(
            invalid_key(HamokConfig {
                tick_interval_ms: 51,
                ..base()
            }),
            "tick_interval_ms"
        );
        assert_eq!(
            invalid_key(HamokConfig {
                peer_max_idle_ms: 300,
                ..base()
            }),
            "peer_max_idle_ms"
        );
        assert_eq!(
            invalid_key(HamokConfig {
                hello_interval_ms: 0,
                ..base()
            }),
            "hello_interval_ms"
        );
        assert_eq!(
            invalid_key(HamokConfig {
                discovery_window_ms: 99,
                ..base()
            }),
            "discovery_window_ms"
        );
        for (key, config) in [
            (
                "request_timeout_ms",
                HamokConfig {
                    request_timeout_ms: 0,
                    ..base()
                },
            ),
            (
                "join_timeout_ms",
                HamokConfig {
                    join_timeout_ms: 0,
                    ..base()
                },
            ),
            (
                "snapshot_after_entries",
                HamokConfig {
                    snapshot_after_entries: 0,
                    ..base()
                },
            ),
            (
                "snapshot_after_bytes",
                HamokConfig {
                    snapshot_after_bytes: 0,
                    ..base()
                },
            ),
            (
                "max_inbound_frames",
                HamokConfig {
                    max_inbound_frames: 0,
                    ..base()
                },
            ),
            (
                "max_outbound_frames",
                HamokConfig {
                    max_outbound_frames: 0,
                    ..base()
                },
            ),
            (
                "max_pending_requests",
                HamokConfig {
                    max_pending_requests: 0,
                    ..base()
                },
            ),
            (
                "max_pending_requests",
                HamokConfig {
                    max_pending_requests: MAX_PENDING_REQUESTS_LIMIT + 1,
                    ..base()
                },
            ),
            (
                "max_frame_bytes",
                HamokConfig {
                    max_frame_bytes: 0,
                    ..base()
                },
            ),
            (
                "max_frame_bytes",
                HamokConfig {
                    // Not larger than the largest command (512 KiB): such a command could never be sent.
                    max_frame_bytes: 512 * 1024,
                    ..base()
                },
            ),
        ] {
            assert_eq!(invalid_key(config), key);
        }
        let raft = |raft: RaftLimits| HamokConfig { raft, ..base() };
        let limits = RaftLimits::default;
        assert_eq!(
            invalid_key(raft(RaftLimits {
                max_snapshot_bytes: 0,
                ..limits()
            })),
            "raft.max_snapshot_bytes"
        );
        assert_eq!(
            invalid_key(raft(RaftLimits {
                max_command_bytes: 65 * 1024 * 1024,
                ..limits()
            })),
            "raft.max_command_bytes"
        );
        HamokConfig {
            join_max_retry: 0,
            ..base()
        }
        .validate()
        .unwrap();
        HamokConfig {
            election_timeout_ms: 100,
            peer_max_idle_ms: 101,
            ..base()
        }
        .validate()
        .unwrap();
    }

    #[test]
    fn ids_are_checked() {
        let base = HamokConfig::default;
        for bad in [
            "",
            "a.b",
            "a b",
            "a*",
            "a>",
            "é",
            &"x".repeat(MAX_ID_BYTES + 1),
        ] {
            assert_eq!(
                invalid_key(HamokConfig {
                    cluster_id: bad.to_owned(),
                    ..base()
                }),
                "cluster_id",
                "{bad:?}"
            );
            assert_eq!(
                invalid_key(HamokConfig {
                    peer_id: Some(bad.to_owned()),
                    ..base()
                }),
                "peer_id",
                "{bad:?}"
            );
        }
        for good in ["a", "Orders_v2-eu", &"x".repeat(MAX_ID_BYTES)] {
            HamokConfig {
                cluster_id: good.to_owned(),
                peer_id: Some(good.to_owned()),
                ..base()
            }
            .validate()
            .unwrap();
        }
        assert_eq!(
            key_of(load_with(Some("cluster_id = \"my.cluster\""), &[])),
            "cluster_id"
        );
        assert_eq!(
            key_of(load_with(None, &[("HAMOK_CLUSTER_ID", "a b")])),
            "cluster_id"
        );
    }

    #[test]
    fn known_keys_cover_every_field() {
        let keys = known_keys();
        for key in [
            "peer_id",
            "cluster_id",
            "election_timeout_ms",
            "tick_interval_ms",
            "max_frame_bytes",
            "app_data",
            "raft",
            "raft.max_inflight_appends",
            "raft.max_snapshot_bytes",
        ] {
            assert!(keys.contains(key), "{key}");
        }
        // Every string-valued default is read verbatim from the environment.
        if let Ok(Value::Dict(_, dict)) = Value::serialize(HamokConfig::default()) {
            for (key, value) in dict {
                if matches!(value, Value::String(..)) {
                    assert!(ENV_STRING_KEYS.contains(&key.as_str()), "{key}");
                }
            }
        }
    }
}
