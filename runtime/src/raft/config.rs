//! Engine limits and timings. Every queue and batch in the engine is bounded by a field here.

use serde::{Deserialize, Serialize};

/// Timings and bounds of one Raft peer. Times are in milliseconds of the clock the caller passes in.
///
/// ```
/// use hamok_runtime::raft::RaftConfig;
/// let config = RaftConfig { election_timeout_ms: 300, ..RaftConfig::default() };
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
    /// Most entries in one AppendEntries message.
    pub max_entries_per_append: usize,
    /// Most payload bytes in one AppendEntries message (a single larger entry is sent alone).
    pub max_bytes_per_append: usize,
    /// Most AppendEntries messages in flight to one follower (the pipeline window).
    pub max_inflight_appends: usize,
    /// Most entries the leader holds beyond the commit index; further proposals get `Busy` (backpressure).
    pub max_uncommitted_entries: usize,
    /// Most bytes the leader holds beyond the commit index; further proposals get `Busy`.
    pub max_uncommitted_bytes: usize,
    /// Most committed entries handed out in one `Ready`.
    pub max_apply_batch: usize,
    /// Size of one snapshot chunk.
    pub snapshot_chunk_bytes: usize,
    /// Most snapshot chunks in flight to one peer.
    pub max_inflight_snapshot_chunks: usize,
    /// Largest snapshot a peer accepts from a leader.
    pub max_snapshot_bytes: u64,
    /// Most ReadIndex requests waiting for leadership confirmation.
    pub max_pending_reads: usize,
    /// Largest single command accepted by `propose`. The default, 512 KiB, keeps every append (framing
    /// included) under NATS's default 1 MiB payload limit: a larger entry could be proposed but never
    /// delivered, stalling replication behind it.
    pub max_command_bytes: usize,
}

impl Default for RaftConfig {
    fn default() -> Self {
        RaftConfig {
            election_timeout_ms: 300,
            heartbeat_interval_ms: 50,
            max_entries_per_append: 1024,
            max_bytes_per_append: 512 * 1024,
            max_inflight_appends: 64,
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
    /// Checks every field; the first problem found is returned.
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
