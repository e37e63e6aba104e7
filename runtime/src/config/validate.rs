//! Validation of a [`HamokConfig`]: every field and the relations between them.

use super::{HamokConfig, MAX_ID_BYTES, MAX_PENDING_REQUESTS_LIMIT};
use crate::error::HamokError;

impl HamokConfig {
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
        if self
            .storage
            .dir
            .as_ref()
            .is_some_and(|d| d.as_os_str().is_empty())
        {
            return fail(
                "storage.dir",
                "must not be empty (leave it unset to stay in memory)",
            );
        }
        if self.storage.sync == crate::store::SyncPolicy::Interval
            && self.storage.sync_interval_ms == 0
        {
            return fail(
                "storage.sync_interval_ms",
                "must be at least 1 with sync = \"interval\"",
            );
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
pub(super) fn check_id(id: &str) -> Result<(), String> {
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
