//! What the leader knows of one follower's log, and how it sends to it: probing for the match point,
//! pipelining appends within a bounded window, or streaming a snapshot.

use std::collections::VecDeque;

use super::snapshot::SnapshotSender;
use super::types::LogIndex;

/// How the leader currently sends to a follower.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProgressState {
    /// The match point is unknown: one append at a time, wait for the answer.
    Probe,
    /// The match point is known: appends are pipelined, up to the in-flight window.
    Replicate,
    /// The entries the follower needs are compacted: a snapshot is being streamed.
    Snapshot,
}

/// One follower, seen from the leader.
#[derive(Debug)]
pub struct Progress {
    /// Highest index known to match the leader's log.
    pub match_index: LogIndex,
    /// Next index to send.
    pub next_index: LogIndex,
    /// The sending mode.
    pub state: ProgressState,
    /// In `Probe`: a probe is out and unanswered.
    pub paused: bool,
    /// When the outstanding probe was sent.
    pub probe_sent_ms: u64,
    /// In `Replicate`: the last index and send time of each append in flight, oldest first.
    /// Bounded by `max_inflight_appends`.
    inflight: VecDeque<(LogIndex, u64)>,
    /// Heard from in the current check-quorum period.
    pub recent_active: bool,
    /// Highest leadership-confirmation round this follower has acknowledged (ReadIndex).
    pub read_acked_seq: u64,
    /// In `Snapshot`: the transfer under way.
    pub snapshot: Option<SnapshotSender>,
    /// The highest commit index this follower has been told (capped at what it held when told).
    pub commit_sent: LogIndex,
}

impl Progress {
    /// A follower whose log is unknown, probed from `next_index`.
    pub fn new(next_index: LogIndex) -> Self {
        Progress {
            match_index: 0,
            next_index,
            state: ProgressState::Probe,
            paused: false,
            probe_sent_ms: 0,
            inflight: VecDeque::new(),
            recent_active: false,
            read_acked_seq: 0,
            snapshot: None,
            commit_sent: 0,
        }
    }

    /// Records a successful append up to `index`. Returns whether the match index advanced.
    pub fn maybe_update(&mut self, index: LogIndex) -> bool {
        let updated = index > self.match_index;
        if updated {
            self.match_index = index;
        }
        if self.next_index < index + 1 {
            self.next_index = index + 1;
        }
        while self
            .inflight
            .front()
            .is_some_and(|&(last, _)| last <= index)
        {
            self.inflight.pop_front();
        }
        updated
    }

    /// Back to probing from just after the match point (after a rejection or a lost message).
    pub fn become_probe(&mut self) {
        self.state = ProgressState::Probe;
        self.next_index = self.match_index + 1;
        self.paused = false;
        self.inflight.clear();
        self.snapshot = None;
    }

    /// The match point is known: pipeline from it.
    pub fn become_replicate(&mut self) {
        self.state = ProgressState::Replicate;
        self.next_index = self.match_index + 1;
        self.paused = false;
        self.inflight.clear();
        self.snapshot = None;
    }

    /// Start streaming a snapshot.
    pub fn become_snapshot(&mut self, sender: SnapshotSender) {
        self.state = ProgressState::Snapshot;
        self.paused = false;
        self.inflight.clear();
        self.snapshot = Some(sender);
    }

    /// Whether an append may be sent now.
    pub fn can_send(&self, max_inflight: usize) -> bool {
        match self.state {
            ProgressState::Probe => !self.paused,
            ProgressState::Replicate => self.inflight.len() < max_inflight,
            ProgressState::Snapshot => false,
        }
    }

    /// Records an append sent whose last entry is `last_index`.
    pub fn on_sent(&mut self, last_index: LogIndex, now_ms: u64) {
        match self.state {
            ProgressState::Probe => {
                self.paused = true;
                self.probe_sent_ms = now_ms;
            }
            ProgressState::Replicate => {
                self.next_index = last_index + 1;
                self.inflight.push_back((last_index, now_ms));
            }
            ProgressState::Snapshot => {}
        }
    }

    /// Send time of the oldest unanswered append, if any.
    pub fn oldest_inflight_ms(&self) -> Option<u64> {
        self.inflight.front().map(|&(_, sent)| sent)
    }
}
