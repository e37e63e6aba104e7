//! What a peer reports about itself, read with [`Hamok::stats`](crate::Hamok::stats): its published
//! [`PeerStatus`] (the engine's [`Status`] plus the runtime's state) and its counters.

use std::sync::atomic::{AtomicU64, Ordering};

/// Latency histograms a peer records through the [`metrics`] facade (a no-op unless the application, or
/// `hamok::gateway`, installs a recorder). Every sample is in seconds and carries the label `peer` (the
/// peer's id). Declared once here, so recorders and dashboards share the names.
pub mod metric_names {
    /// A request submitted on this peer, from its submission to its answer by the apply of its command
    /// here (whatever the state machine answered; a request refused, interrupted or timed out is not
    /// sampled). Resolution: the start is taken at the peer's millisecond time base and the end with
    /// the actor's clock, so a sample can exceed the true latency by under 1 ms.
    pub const PROPOSAL_COMMIT_SECONDS: &str = "hamok_proposal_commit_seconds";
    /// Applying the committed entries of one engine output (`Ready`) to the state machines.
    pub const APPLY_SECONDS: &str = "hamok_apply_seconds";
    /// A linearizable read, from its start to being served (a read that fails is not sampled). Same
    /// resolution as [`PROPOSAL_COMMIT_SECONDS`].
    pub const READ_INDEX_SECONDS: &str = "hamok_read_index_seconds";
    /// The label every sample carries: the id of the peer that recorded it.
    pub const PEER_LABEL: &str = "peer";
}

use crate::raft::{LogIndex, Membership, PeerId, Role, Status};

/// Where the peer stands with respect to a cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JoinState {
    /// `join` not called yet.
    Idle,
    /// Looking for a cluster (or for the peers to found one with), or coming back to it after being
    /// removed or cut off: not a member as far as this peer can tell.
    Discovering,
    /// A voter of the cluster (a learner when `only_follower`), in contact with its leader.
    Joined,
    /// Leaving.
    Leaving,
    /// Left; `join` starts over.
    Left,
}

/// The state a peer publishes whenever it changes: what the handle's getters and waits read, without a
/// round trip to the node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerStatus {
    /// The engine's part: role, term, leader, log indices, committed configuration.
    pub raft: Status,
    /// Where the peer stands with respect to its cluster.
    pub join_state: JoinState,
    /// Entries in the log (after the last snapshot).
    pub log_entries: u64,
    /// Approximate bytes of those entries.
    pub log_bytes: u64,
    /// Requests submitted here and not answered yet.
    pub pending_requests: usize,
    /// The peer's actors have stopped.
    pub closed: bool,
}

impl PeerStatus {
    pub(crate) fn initial() -> Self {
        PeerStatus {
            raft: Status {
                id: crate::raft::PeerId::from(""),
                role: Role::Follower,
                term: 0,
                leader: None,
                commit_index: 0,
                applied_index: 0,
                last_index: 0,
                snapshot_index: 0,
                membership: Membership::default(),
            },
            join_state: JoinState::Idle,
            log_entries: 0,
            log_bytes: 0,
            pending_requests: 0,
            closed: false,
        }
    }

    /// The other members of the committed configuration (voters and learners).
    pub fn remote_peers(&self) -> usize {
        self.raft
            .membership
            .members()
            .filter(|p| **p != self.raft.id)
            .count()
    }
}

/// Declares the counters once: the atomics the actors bump and the values a reader gets.
macro_rules! counters {
    ($( $(#[doc = $doc:literal])+ $name:ident, )+) => {
        /// Counters the actors bump; read without a round trip.
        #[derive(Debug, Default)]
        pub(crate) struct Counters {
            $( pub(crate) $name: AtomicU64, )+
        }

        /// A peer's counters since it started.
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
        pub struct CounterValues {
            $( $(#[doc = $doc])+ pub $name: u64, )+
            /// Frames dropped: this peer was saturated (its inbound bound reached; counted by the
            /// transport's [`Inbound`](crate::transport::Inbound)).
            pub dropped_inbound_full: u64,
        }

        impl Counters {
            /// The current values; `dropped_inbound_full` comes from the peer's inbound sink.
            pub(crate) fn values(&self, dropped_inbound_full: u64) -> CounterValues {
                CounterValues {
                    $( $name: self.$name.load(Ordering::Relaxed), )+
                    dropped_inbound_full,
                }
            }
        }
    };
}

counters! {
    /// Frames received.
    frames_in,
    /// Frames sent.
    frames_out,
    /// Frames dropped: not decodable (garbage, truncated, wrong types, too large). A leader also counts
    /// here each forwarded request it refused (its command does not decode or names another client).
    dropped_malformed,
    /// Frames dropped: addressed to another peer (a transport that delivered a unicast frame to the
    /// wrong peer; counted apart from `dropped_malformed`, since the frame itself was sound).
    dropped_misrouted,
    /// Frames dropped: another cluster's.
    dropped_foreign_cluster,
    /// Frames dropped: another protocol version.
    dropped_version,
    /// Frames dropped: another incarnation of this cluster (a founding since this peer's log began, or
    /// before it: see [`Frame::incarnation`](crate::wire::Frame::incarnation)).
    dropped_foreign_incarnation,
    /// Frames dropped: authentication is on and the frame had no valid tag.
    dropped_unauthenticated,
    /// Frames the transport could not take (link down or outbound queue full).
    dropped_outbound,
    /// Snapshots taken locally.
    snapshots_taken,
    /// Snapshots installed from the leader.
    snapshots_installed,
    /// Requests retried (leader change or lost forward).
    requests_retried,
    /// Retried requests recognised as already applied.
    duplicates_skipped,
    /// Times the transport was (re)connected.
    transport_connects,
}

impl Counters {
    pub(crate) fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// One member's replication, as its leader sees it ([`Hamok::replication`](crate::Hamok::replication)).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicaProgress {
    /// The member.
    pub peer: PeerId,
    /// The highest log index known to be on it.
    pub match_index: LogIndex,
    /// How many entries it lacks of the leader's log.
    pub lag: u64,
}

/// A point-in-time view of one peer: its status and its counters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HamokStats {
    /// The published status (as of the last change the node published).
    pub status: PeerStatus,
    /// The counters since the peer started.
    pub counters: CounterValues,
}

/// When this peer last heard from the leader of its cluster, or last led it, in the peer's own time
/// base (milliseconds since it started). The node writes it after every message it handles; handles read
/// it without a message (a lock holder polls it to learn, before the cluster can remove it, that it may
/// have lost its lock). One atomic store per message: cheaper than publishing it through the status.
#[derive(Debug)]
pub(crate) struct LeaderContact {
    started: tokio::time::Instant,
    at_ms: AtomicU64,
}

impl LeaderContact {
    /// Starts the peer's clock now.
    pub(crate) fn new() -> Self {
        LeaderContact {
            started: tokio::time::Instant::now(),
            at_ms: AtomicU64::new(0),
        }
    }

    /// The instant the peer's time base counts from.
    pub(crate) fn started(&self) -> tokio::time::Instant {
        self.started
    }

    /// Records the latest contact (never moves back).
    pub(crate) fn record(&self, at_ms: u64) {
        self.at_ms.fetch_max(at_ms, Ordering::Relaxed);
    }

    /// How long ago the latest contact was.
    pub(crate) fn age(&self) -> std::time::Duration {
        let at =
            self.started + std::time::Duration::from_millis(self.at_ms.load(Ordering::Relaxed));
        tokio::time::Instant::now().saturating_duration_since(at)
    }
}
