//! Client requests submitted on this peer: numbering, proposing (on the leader) or forwarding (to it),
//! retries across leader changes, answers and deadlines; and, on the leader, the admission of the
//! requests other peers forward.
//!
//! The rule this concern keeps: every request is answered exactly once, by the apply of its command on
//! this peer, by an error that says it was refused, or by its deadline.

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::oneshot;

use super::frames::Output;
use crate::error::HamokError;
use crate::raft::{PeerId, RaftError, RaftNode, Role};
use crate::seq_deque::SeqSlots;
use crate::state_machine::{ClientId, LogCommand, Op, SeqStatus, StateMachines};
use crate::stats::metric_names::PROPOSAL_COMMIT_SECONDS;
use crate::stats::Counters;
use crate::wire::HamokMessage;

/// Where the answer of one request goes.
pub(crate) type Reply = oneshot::Sender<Result<Bytes, HamokError>>;

/// A request submitted on this peer, waiting to be applied here.
struct Pending {
    command: Bytes,
    timeout_ms: u64,
    reply: Reply,
    deadline_ms: u64,
    /// When it was submitted (for the proposal-to-commit latency).
    submitted_ms: u64,
    /// When it was last proposed or forwarded (`None`: not yet).
    last_sent_ms: Option<u64>,
    /// It was sent again at once on a redirect since its last timed send: the next redirect waits
    /// for the timer or a leader change (two peers that each name the other as leader must not
    /// bounce a request between them without pause).
    followed_redirect: bool,
}

/// The client side of this peer's requests.
pub(super) struct Requests {
    client: ClientId,
    next_seq: u64,
    pending: SeqSlots<Pending>,
    max_pending: usize,
    max_command_bytes: usize,
    /// A request unanswered for this long is sent again (a lost forward, or a proposal lost with a
    /// deposed leader).
    resend_after_ms: u64,
}

/// Who the requests go to when this peer does not lead.
pub(super) struct Route<'a> {
    pub raft: &'a mut RaftNode,
    /// The leader as far as anyone told us (the engine's own knowledge first).
    pub leader_hint: Option<PeerId>,
}

impl Route<'_> {
    fn leader(&self) -> Option<PeerId> {
        self.raft.leader_id().cloned().or(self.leader_hint.clone())
    }
}

impl Requests {
    pub(super) fn new(
        client: ClientId,
        max_pending: usize,
        max_command_bytes: usize,
        resend_after_ms: u64,
    ) -> Self {
        Requests {
            client,
            next_seq: 1,
            pending: SeqSlots::default(),
            max_pending,
            max_command_bytes,
            resend_after_ms,
        }
    }

    pub(super) fn client(&self) -> &ClientId {
        &self.client
    }

    pub(super) fn len(&self) -> usize {
        self.pending.len()
    }

    pub(super) fn is_pending(&self, seq: u64) -> bool {
        self.pending.get(seq).is_some()
    }

    /// The lowest request number not answered yet: everything below it is answered.
    fn floor(&self) -> u64 {
        self.pending.first_key().unwrap_or(self.next_seq)
    }

    /// Accepts a request (the caller checked that the peer is joined and the op is known) and sends
    /// it. Refusals are answered at once and leave no gap in the numbering.
    pub(super) fn submit(
        &mut self,
        now_ms: u64,
        op: Op,
        timeout_ms: u64,
        reply: Reply,
        route: Route<'_>,
        out: &mut Output,
    ) {
        if self.pending.len() >= self.max_pending {
            let _ = reply.send(Err(HamokError::Busy("too many pending requests")));
            return;
        }
        let seq = self.next_seq;
        let cmd = LogCommand {
            client: self.client.clone(),
            seq,
            floor: self.floor().min(seq),
            op,
        };
        let command = match cmd.encode() {
            Ok(bytes) => bytes,
            Err(e) => {
                let _ = reply.send(Err(e));
                return;
            }
        };
        if command.len() > self.max_command_bytes {
            let _ = reply.send(Err(HamokError::TooLarge {
                size: command.len(),
                limit: self.max_command_bytes,
            }));
            return;
        }
        self.next_seq += 1;
        self.pending.push(
            seq,
            Pending {
                command,
                timeout_ms,
                reply,
                deadline_ms: now_ms.saturating_add(timeout_ms),
                submitted_ms: now_ms,
                last_sent_ms: None,
                followed_redirect: false,
            },
        );
        self.send(now_ms, seq, route, out);
    }

    /// Proposes (on the leader) or forwards (to the leader) one pending request.
    fn send(&mut self, now_ms: u64, seq: u64, route: Route<'_>, out: &mut Output) {
        let floor = self.floor();
        let Some(p) = self.pending.get_mut(seq) else {
            return;
        };
        let sent = if route.raft.role() == Role::Leader {
            match route.raft.propose(now_ms, p.command.clone()) {
                Ok(_) => true,
                Err(RaftError::CommandTooLarge { size, limit }) => {
                    if let Some(p) = self.pending.remove(seq) {
                        let _ = p.reply.send(Err(HamokError::TooLarge { size, limit }));
                    }
                    return;
                }
                // Busy, transfer in progress: the retry timer tries again.
                Err(_) => false,
            }
        } else if let Some(leader) = route.leader() {
            out.send(
                leader,
                HamokMessage::Submit {
                    seq,
                    floor,
                    command: p.command.to_vec(),
                },
            );
            true
        } else {
            false
        };
        if sent {
            p.last_sent_ms = Some(now_ms);
        }
    }

    /// A forward of request `seq` reached `from`, which does not lead. It is sent again at once if the
    /// route now names another peer (once per timed send); otherwise the retry timer or the next leader
    /// change sends it.
    pub(super) fn on_redirect(
        &mut self,
        now_ms: u64,
        seq: u64,
        from: &PeerId,
        route: Route<'_>,
        out: &mut Output,
    ) {
        let Some(p) = self.pending.get_mut(seq) else {
            return;
        };
        let elsewhere =
            route.leader().is_some_and(|l| l != *from) || route.raft.role() == Role::Leader;
        if p.followed_redirect || !elsewhere {
            return;
        }
        p.followed_redirect = true;
        self.send(now_ms, seq, route, out);
    }

    /// Resends requests not yet applied: all of them when `all` (a new leader), else those never sent
    /// (no leader was known) or unanswered for `resend_after_ms`.
    pub(super) fn retry(
        &mut self,
        now_ms: u64,
        all: bool,
        route: Route<'_>,
        counters: &Counters,
        out: &mut Output,
    ) {
        let resend_after = self.resend_after_ms;
        let due: Vec<(u64, bool)> = self
            .pending
            .iter()
            .filter(|(_, p)| {
                all || p
                    .last_sent_ms
                    .is_none_or(|t| now_ms >= t.saturating_add(resend_after))
            })
            .map(|(seq, p)| (*seq, p.last_sent_ms.is_some()))
            .collect();
        let Route { raft, leader_hint } = route;
        for (seq, sent_before) in due {
            if sent_before {
                Counters::bump(&counters.requests_retried);
            }
            if let Some(p) = self.pending.get_mut(seq) {
                p.followed_redirect = false;
            }
            self.send(
                now_ms,
                seq,
                Route {
                    raft: &mut *raft,
                    leader_hint: leader_hint.clone(),
                },
                out,
            );
        }
    }

    /// Answers request `seq` if it is still waiting: the apply of its command (or of the snapshot
    /// holding it) decided `result` (the state machine's answer, an error included): it ends a
    /// proposal-to-commit latency.
    pub(super) fn answer(&mut self, seq: u64, result: Result<Bytes, HamokError>, out: &mut Output) {
        if let Some(p) = self.pending.remove(seq) {
            out.latency(PROPOSAL_COMMIT_SECONDS, p.submitted_ms);
            let _ = p.reply.send(result);
        }
    }

    /// After a snapshot install: local requests the snapshot already applied will never be applied
    /// here one by one, so they are answered now (from the sessions' response cache).
    pub(super) fn answer_applied_in_snapshot(
        &mut self,
        state_machines: &StateMachines,
        out: &mut Output,
    ) {
        let done: Vec<(u64, SeqStatus)> = self
            .pending
            .keys()
            .map(|&seq| (seq, state_machines.request_status(&self.client, seq)))
            .filter(|(_, status)| *status != SeqStatus::New)
            .collect();
        for (seq, status) in done {
            let answer = match status {
                SeqStatus::Forgotten => Err(HamokError::OutcomeUnknown),
                _ => state_machines
                    .cached_response(&self.client, seq)
                    .ok_or(HamokError::AppliedResponseLost),
            };
            self.answer(seq, answer, out);
        }
    }

    /// Fails the requests whose deadline has passed.
    pub(super) fn expire(&mut self, now_ms: u64) {
        let expired: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| now_ms >= p.deadline_ms)
            .map(|(seq, _)| *seq)
            .collect();
        for seq in expired {
            if let Some(p) = self.pending.remove(seq) {
                // Never handed to a leader (none was known): certainly not applied.
                let error = match p.last_sent_ms {
                    None => HamokError::NoQuorum {
                        after_ms: p.timeout_ms,
                    },
                    Some(_) => HamokError::Timeout {
                        after_ms: p.timeout_ms,
                    },
                };
                let _ = p.reply.send(Err(error));
            }
        }
    }

    /// Fails every waiting request with `error`.
    pub(super) fn fail_all(&mut self, error: HamokError) {
        for (_, p) in std::mem::take(&mut self.pending).into_values() {
            let _ = p.reply.send(Err(error.clone()));
        }
    }
}

/// On the leader: a request forwarded by `from` enters the log only if it decodes and names its sender
/// as the client, so no peer can spoof another's session (and with it, the dedup of its requests). A
/// peer that does not lead redirects it.
pub(super) fn admit_forwarded(
    now_ms: u64,
    from: PeerId,
    seq: u64,
    command: Bytes,
    raft: &mut RaftNode,
    counters: &Arc<Counters>,
    out: &mut Output,
) {
    if raft.role() != Role::Leader {
        let leader = raft.leader_id().cloned();
        out.send(from, HamokMessage::SubmitRedirect { seq, leader });
        return;
    }
    let valid = LogCommand::decode(&command).is_ok_and(|c| c.client.peer == from && c.seq == seq);
    if !valid {
        Counters::bump(&counters.dropped_malformed);
        return;
    }
    // Busy or transferring: the client retries after its timer.
    let _ = raft.propose(now_ms, command);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::{Membership, PersistedState, RaftConfig};

    fn follower() -> RaftNode {
        let genesis = PersistedState::genesis(Membership::with_voters(
            ["a", "b", "c"].into_iter().map(PeerId::from),
        ));
        RaftNode::new(PeerId::from("b"), RaftConfig::default(), 1, 0, genesis).unwrap()
    }

    fn route<'a>(raft: &'a mut RaftNode, hint: &str) -> Route<'a> {
        Route {
            raft,
            leader_hint: Some(PeerId::from(hint)),
        }
    }

    fn submits_to(out: &mut Output) -> Vec<String> {
        out.frames
            .drain(..)
            .filter(|(_, m)| matches!(m, HamokMessage::Submit { .. }))
            .map(|(to, _)| to.map(|p| p.to_string()).unwrap_or_default())
            .collect()
    }

    /// Two peers that each name the other as leader must not bounce a request without pause: a
    /// redirect is followed at once at most once per timed send. (The whole-peer simulation found the
    /// unbounded version as a message storm.)
    #[test]
    fn redirects_are_followed_at_most_once_per_timed_send() {
        let mut raft = follower();
        let (events, _received) = tokio::sync::broadcast::channel(64);
        let mut out = Output::new(events);
        let client = ClientId {
            peer: PeerId::from("b"),
            nonce: 1,
        };
        let mut requests = Requests::new(client, 10, 1 << 20, 300);
        let (reply, _rx) = oneshot::channel();
        requests.submit(0, Op::Noop, 5_000, reply, route(&mut raft, "a"), &mut out);
        assert_eq!(submits_to(&mut out), ["a"]);
        // a redirects without naming anyone else: wait for the timer.
        requests.on_redirect(1, 1, &PeerId::from("a"), route(&mut raft, "a"), &mut out);
        assert!(submits_to(&mut out).is_empty());
        // a names c: follow at once.
        requests.on_redirect(2, 1, &PeerId::from("a"), route(&mut raft, "c"), &mut out);
        assert_eq!(submits_to(&mut out), ["c"]);
        // c names a back: not again before the timer.
        requests.on_redirect(3, 1, &PeerId::from("c"), route(&mut raft, "a"), &mut out);
        assert!(submits_to(&mut out).is_empty());
        let counters = Counters::default();
        requests.retry(100, false, route(&mut raft, "a"), &counters, &mut out);
        assert!(submits_to(&mut out).is_empty(), "not due yet");
        requests.retry(302, false, route(&mut raft, "a"), &counters, &mut out);
        assert_eq!(submits_to(&mut out), ["a"]);
        // After a timed send, one redirect may be followed again.
        requests.on_redirect(303, 1, &PeerId::from("a"), route(&mut raft, "c"), &mut out);
        assert_eq!(submits_to(&mut out), ["c"]);
    }
}
