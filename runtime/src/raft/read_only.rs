//! ReadIndex: a leader serves a linearizable read at its commit index once a majority has confirmed, by
//! answering a heartbeat round sent after the read arrived, that it is still the leader.

use std::collections::VecDeque;

use super::types::{LogIndex, PeerId};

/// A read waiting for its confirmation round.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PendingRead {
    /// The caller's id for the read.
    pub ctx: u64,
    /// The follower that forwarded it, or `None` for a local read.
    pub from: Option<PeerId>,
    /// The commit index when the read arrived.
    pub index: LogIndex,
    /// The confirmation round that must be acknowledged by a majority.
    pub seq: u64,
}

/// A read that arrived before this leader committed an entry of its term (its commit index may be stale).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WaitingRead {
    /// The caller's id for the read.
    pub ctx: u64,
    /// The follower that forwarded it, or `None` for a local read.
    pub from: Option<PeerId>,
}

/// The leader's ReadIndex bookkeeping. Queues are bounded by the caller (`max_pending_reads`).
#[derive(Debug, Default)]
pub struct ReadOnly {
    /// Reads waiting for confirmation, in arrival order (so `seq` never decreases along it).
    pending: VecDeque<PendingRead>,
    /// Reads waiting for the first commit of the leader's term.
    waiting: VecDeque<WaitingRead>,
    /// The last confirmation round broadcast. Never reset, so rounds of different terms never collide.
    current_seq: u64,
    /// A round must be broadcast for reads that arrived since the last one.
    broadcast_needed: bool,
}

impl ReadOnly {
    /// Number of reads queued.
    pub fn len(&self) -> usize {
        self.pending.len() + self.waiting.len()
    }

    /// Whether no read is queued.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The last round broadcast.
    pub fn current_seq(&self) -> u64 {
        self.current_seq
    }

    /// Queues a read at `index`; it needs the next round.
    pub fn add_pending(&mut self, ctx: u64, from: Option<PeerId>, index: LogIndex) {
        self.pending.push_back(PendingRead {
            ctx,
            from,
            index,
            seq: self.current_seq + 1,
        });
        self.broadcast_needed = true;
    }

    /// Queues a read until the leader's first commit in its term.
    pub fn add_waiting(&mut self, ctx: u64, from: Option<PeerId>) {
        self.waiting.push_back(WaitingRead { ctx, from });
    }

    /// Takes the reads that waited for the first commit of the term.
    pub fn take_waiting(&mut self) -> Vec<WaitingRead> {
        self.waiting.drain(..).collect()
    }

    /// If reads wait for a round, starts one and returns its number.
    pub fn take_broadcast(&mut self) -> Option<u64> {
        if !self.broadcast_needed {
            return None;
        }
        self.broadcast_needed = false;
        self.current_seq += 1;
        Some(self.current_seq)
    }

    /// Starts a round now (a periodic heartbeat), whether or not reads wait; it serves the reads queued
    /// for the next round. Returns its number.
    pub fn start_round(&mut self) -> u64 {
        self.broadcast_needed = false;
        self.current_seq += 1;
        self.current_seq
    }

    /// Releases every read whose round a majority has acknowledged (`confirmed_seq`).
    pub fn release(&mut self, confirmed_seq: u64) -> Vec<PendingRead> {
        let mut out = Vec::new();
        while self.pending.front().is_some_and(|r| r.seq <= confirmed_seq) {
            out.extend(self.pending.pop_front());
        }
        out
    }

    /// Drops every queued read (leadership lost), returning them so their callers can be told.
    pub fn abandon_all(&mut self) -> Vec<(u64, Option<PeerId>)> {
        let mut out: Vec<(u64, Option<PeerId>)> =
            self.pending.drain(..).map(|r| (r.ctx, r.from)).collect();
        out.extend(self.waiting.drain(..).map(|r| (r.ctx, r.from)));
        self.broadcast_needed = false;
        out
    }
}
