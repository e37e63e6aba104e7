//! A graceful leave: a leading peer first hands leadership to its most caught-up voter; then the peer
//! asks the leader to remove it and is done once its removal is committed (or the leader says it is
//! gone). Bounded by `request_timeout_ms`, after which the peer stops taking part anyway (the leader
//! then removes it as silent).

use tokio::sync::oneshot;

use super::frames::Output;
use crate::error::HamokError;
use crate::raft::{PeerId, RaftNode, Role};
use crate::wire::HamokMessage;

/// Where the outcome of `leave()` goes.
pub(crate) type LeaveReply = oneshot::Sender<Result<(), HamokError>>;

/// What the leave procedure needs next.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum LeaveStep {
    /// Still waiting for the removal.
    Wait,
    /// Removed (or the last voter, with nobody to hand over to): finish.
    Done,
    /// The deadline passed: finish, and tell the caller it timed out.
    TimedOut,
}

pub(super) struct Leave {
    id: PeerId,
    reply: Option<LeaveReply>,
    deadline_ms: u64,
    last_request_ms: Option<u64>,
    request_every_ms: u64,
    timeout_ms: u64,
}

impl Leave {
    pub(super) fn new(id: PeerId, request_every_ms: u64, timeout_ms: u64) -> Self {
        Leave {
            id,
            reply: None,
            deadline_ms: 0,
            last_request_ms: None,
            request_every_ms,
            timeout_ms,
        }
    }

    /// Starts leaving; `reply` is answered when done.
    pub(super) fn start(&mut self, now_ms: u64, reply: LeaveReply) {
        self.reply = Some(reply);
        self.deadline_ms = now_ms.saturating_add(self.timeout_ms);
        self.last_request_ms = None;
    }

    /// One step of the procedure.
    pub(super) fn tick(&mut self, now_ms: u64, raft: &mut RaftNode, out: &mut Output) -> LeaveStep {
        if self.reply.is_some() && now_ms >= self.deadline_ms {
            return LeaveStep::TimedOut;
        }
        let membership = raft.membership().clone();
        if !membership.contains(&self.id) {
            return LeaveStep::Done;
        }
        if raft.role() == Role::Leader {
            let target = membership
                .voters
                .iter()
                .filter(|p| **p != self.id)
                .max_by_key(|p| (raft.match_index(p).unwrap_or(0), std::cmp::Reverse(*p)))
                .cloned();
            let Some(target) = target else {
                // The last voter: there is nobody to hand over to. It stops; its log stays, so joining
                // again resumes the cluster.
                return LeaveStep::Done;
            };
            if !raft.transfer_in_progress() {
                let _ = raft.transfer_leadership(now_ms, target);
            }
        } else if let Some(leader) = raft.leader_id().cloned() {
            if self
                .last_request_ms
                .is_none_or(|t| now_ms >= t.saturating_add(self.request_every_ms))
            {
                self.last_request_ms = Some(now_ms);
                out.send(leader, HamokMessage::LeaveRequest);
            }
        }
        LeaveStep::Wait
    }

    /// Answers the caller of `leave()`.
    pub(super) fn finish(&mut self, result: Result<(), HamokError>) {
        if let Some(reply) = self.reply.take() {
            let _ = reply.send(result);
        }
    }
}
