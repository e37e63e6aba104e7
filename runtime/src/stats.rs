//! Counters and gauges of one peer, read with [`Hamok::stats`](crate::Hamok::stats).

use std::sync::atomic::{AtomicU64, Ordering};

use crate::raft::{LogIndex, PeerId, Role, Term};

/// A point-in-time view of one peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HamokStats {
    /// This peer.
    pub peer_id: PeerId,
    /// Its role.
    pub role: Role,
    /// Its term.
    pub term: Term,
    /// The leader it knows of.
    pub leader: Option<PeerId>,
    /// Highest committed index known.
    pub commit_index: LogIndex,
    /// Highest applied index.
    pub applied_index: LogIndex,
    /// Last log index.
    pub last_index: LogIndex,
    /// Last index covered by the latest snapshot.
    pub snapshot_index: LogIndex,
    /// Entries in the log store.
    pub log_entries: u64,
    /// Approximate bytes of the entries in the log store.
    pub log_bytes: u64,
    /// Other members of the cluster.
    pub remote_peers: usize,
    /// Requests submitted here and not answered yet.
    pub pending_requests: usize,
    /// Frames received.
    pub frames_in: u64,
    /// Frames sent.
    pub frames_out: u64,
    /// Frames dropped: not decodable (garbage, truncated, wrong types, too large).
    pub dropped_malformed: u64,
    /// Frames dropped: another cluster's.
    pub dropped_foreign_cluster: u64,
    /// Frames dropped: another protocol version.
    pub dropped_version: u64,
    /// Frames dropped: authentication is on and the frame had no valid tag.
    pub dropped_unauthenticated: u64,
    /// Frames dropped: this peer was saturated (inbound bound reached).
    pub dropped_inbound_full: u64,
    /// Frames the transport could not take (link down or outbound queue full).
    pub dropped_outbound: u64,
    /// Snapshots taken locally.
    pub snapshots_taken: u64,
    /// Snapshots installed from the leader.
    pub snapshots_installed: u64,
    /// Requests retried (leader change or lost forward).
    pub requests_retried: u64,
    /// Retried requests recognised as already applied.
    pub duplicates_skipped: u64,
    /// Times the transport was (re)connected.
    pub transport_connects: u64,
}

/// Counters the actors bump; `Hamok::stats` reads them without a round trip.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub frames_in: AtomicU64,
    pub frames_out: AtomicU64,
    pub dropped_malformed: AtomicU64,
    pub dropped_foreign_cluster: AtomicU64,
    pub dropped_version: AtomicU64,
    pub dropped_unauthenticated: AtomicU64,
    pub dropped_outbound: AtomicU64,
    pub snapshots_taken: AtomicU64,
    pub snapshots_installed: AtomicU64,
    pub requests_retried: AtomicU64,
    pub duplicates_skipped: AtomicU64,
    pub transport_connects: AtomicU64,
}

impl Counters {
    pub(crate) fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}
