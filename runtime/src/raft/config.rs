//! Engine limits and timings. Every queue and batch in the engine is bounded by a field here.

use serde::{Deserialize, Serialize};

/// Timings and bounds of one Raft peer. Times are in milliseconds of the clock the caller passes in.
///
/// ```
/// use hamok_runtime::raft::{RaftConfig, RaftLimits};
/// let config = RaftConfig {
///     election_timeout_ms: 300,
///     limits: RaftLimits { max_inflight_appends: 16, ..RaftLimits::default() },
///     ..RaftConfig::default()
/// };
/// assert!(config.validate().is_ok());
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RaftConfig {
    /// A follower that hears nothing from a leader for a random time in
    /// `[election_timeout_ms, 2 * election_timeout_ms)` starts a (pre-)election; a leader that has not heard
    /// from a majority within `election_timeout_ms` steps down (check-quorum).
    pub election_timeout_ms: u64,
    /// How often a leader sends heartbeats. Must be well under the election timeout.
    pub heartbeat_interval_ms: u64,
    /// Every bound on the engine's queues and batches.
    pub limits: RaftLimits,
    /// Whether the driver reports its log writes durable with [`RaftNode::on_persisted`] instead of
    /// making them durable before it steps anything else. A leader then counts its own log toward a
    /// commit only up to what was reported, so its driver may sync in the background while the
    /// followers' acknowledgements commit (the Raft dissertation, §10.2.1). Default `false`: the
    /// engine takes every log write as durable once [`RaftNode::take_ready`] hands it out.
    ///
    /// [`RaftNode::on_persisted`]: super::RaftNode::on_persisted
    /// [`RaftNode::take_ready`]: super::RaftNode::take_ready
    #[serde(default)]
    pub persist_async: bool,
}

impl Default for RaftConfig {
    fn default() -> Self {
        RaftConfig {
            election_timeout_ms: 300,
            heartbeat_interval_ms: 50,
            limits: RaftLimits::default(),
            persist_async: false,
        }
    }
}

/// Every bound on the engine's queues and batches: past one, the engine refuses (`Busy`,
/// `CommandTooLarge`) or waits, it never grows. A hamok peer reads them from the `[raft]` table of its
/// configuration (`raft.max_inflight_appends`, `HAMOK_RAFT__MAX_INFLIGHT_APPENDS`).
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
    /// Why 2: one append travels while the next gathers every entry proposed meanwhile, so under load
    /// each message carries a batch instead of one entry (a broker's cost is per message). Measured on
    /// 2026-11-30, 3 peers, map.set from the leader at 100 in flight, one run each: RabbitMQ 37-40 k
    /// ops/s with 2 against 7-10 k with the earlier 64; NATS 50 k against 39 k; in-process 108 k against
    /// 81 k. At 1 in flight it changes nothing. A link whose round trip is long against the time to
    /// fill a batch (a WAN) wants a wider window.
    pub max_inflight_appends: usize,
    /// Most entries the leader holds beyond the commit index; further proposals get `Busy`
    /// (backpressure).
    ///
    /// Why 50 000: backpressure that only triggers when followers cannot keep up, bounding the leader's
    /// memory.
    pub max_uncommitted_entries: usize,
    /// Most bytes the leader holds beyond the commit index; further proposals get `Busy`.
    ///
    /// Why 64 MiB: same backpressure, for large entries. Must be at least `max_command_bytes`.
    pub max_uncommitted_bytes: usize,
    /// Most committed entries handed out in one `Ready`.
    ///
    /// Why 4096: amortises the per-batch cost without stalling the driver on one huge batch.
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
    /// Most ReadIndex requests waiting for leadership confirmation.
    ///
    /// Why 100 000: reads are cheap and batched per confirmation round; the bound only stops runaway
    /// callers.
    pub max_pending_reads: usize,
    /// Largest single command accepted by `propose`.
    ///
    /// Why 512 KiB: generous for collection operations, and an append carrying one such command (framing
    /// included) stays under NATS's default 1 MiB message limit: a larger entry could be proposed but
    /// never delivered, stalling replication behind it. Must not exceed `max_uncommitted_bytes`.
    pub max_command_bytes: usize,
}

impl Default for RaftLimits {
    fn default() -> Self {
        RaftLimits {
            max_entries_per_append: 1024,
            max_bytes_per_append: 512 * 1024,
            max_inflight_appends: 2,
            max_uncommitted_entries: 50_000,
            max_uncommitted_bytes: 64 * 1024 * 1024,
            max_apply_batch: 4096,
            snapshot_chunk_bytes: 256 * 1024,
            max_inflight_snapshot_chunks: 4,
            max_snapshot_bytes: 4 * 1024 * 1024 * 1024,
            max_pending_reads: 100_000,
            max_command_bytes: 512 * 1024,
        }
    }
}

/// A configuration value that cannot work, naming the field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid raft config `{field}`: {reason}")]
pub struct RaftConfigError {
    /// The offending field.
    pub field: &'static str,
    /// Why it cannot work.
    pub reason: &'static str,
}

impl RaftConfig {
    /// Checks the timings and every limit; the first problem found is returned.
    pub fn validate(&self) -> Result<(), RaftConfigError> {
        let fail = |field, reason| Err(RaftConfigError { field, reason });
        if self.heartbeat_interval_ms == 0 {
            return fail("heartbeat_interval_ms", "must be at least 1");
        }
        if self.election_timeout_ms < 2 * self.heartbeat_interval_ms {
            return fail(
                "election_timeout_ms",
                "must be at least twice heartbeat_interval_ms",
            );
        }
        self.limits.validate()
    }
}

impl RaftLimits {
    /// Checks every bound; the first problem found is returned.
    pub fn validate(&self) -> Result<(), RaftConfigError> {
        let fail = |field, reason| Err(RaftConfigError { field, reason });
        let positive = [
            ("max_entries_per_append", self.max_entries_per_append),
            ("max_bytes_per_append", self.max_bytes_per_append),
            ("max_inflight_appends", self.max_inflight_appends),
            ("max_uncommitted_entries", self.max_uncommitted_entries),
            ("max_uncommitted_bytes", self.max_uncommitted_bytes),
            ("max_apply_batch", self.max_apply_batch),
            ("snapshot_chunk_bytes", self.snapshot_chunk_bytes),
            (
                "max_inflight_snapshot_chunks",
                self.max_inflight_snapshot_chunks,
            ),
            ("max_pending_reads", self.max_pending_reads),
            ("max_command_bytes", self.max_command_bytes),
        ];
        for (field, value) in positive {
            if value == 0 {
                return fail(field, "must be at least 1");
            }
        }
        if self.max_snapshot_bytes == 0 {
            return fail("max_snapshot_bytes", "must be at least 1");
        }
        if self.max_command_bytes > self.max_uncommitted_bytes {
            return fail("max_command_bytes", "must not exceed max_uncommitted_bytes");
        }
        Ok(())
    }
}
