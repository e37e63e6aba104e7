//! Client requests submitted on this peer: numbering, proposing (on the leader) or forwarding (to it,
//! gathered into one frame per flush), retries across leader changes, answers and deadlines; and, on
//! the leader, the admission of the requests other peers forward.
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
use crate::wire::{Forward, HamokMessage, FORWARD_ENVELOPE_BYTES};

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
    /// It is in the outbox, to be forwarded at the next flush.
    queued: bool,
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
    /// The requests to forward at the next flush, in the order they were sent ([`Requests::flush`]):
    /// a burst of submissions travels in one frame instead of one frame each. A request is here at
    /// most once (`Pending::queued`), so it holds at most `max_pending` numbers.
    outbox: Vec<u64>,
    /// Most command bytes in one `Submit` frame (a larger command travels alone): the engine's
    /// `max_bytes_per_append`, which keeps a frame within a broker's message limit.
    max_forward_bytes: usize,
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
        max_forward_bytes: usize,
        resend_after_ms: u64,
    ) -> Self {
        Requests {
            client,
            next_seq: 1,
            pending: SeqSlots::default(),
            max_pending,
            max_command_bytes,
            resend_after_ms,
            outbox: Vec::new(),
            max_forward_bytes,
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

    /// Whether forwards wait for [`Requests::flush`].
    pub(super) fn has_forwards(&self) -> bool {
        !self.outbox.is_empty()
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
                queued: false,
                followed_redirect: false,
            },
        );
        self.send(now_ms, seq, route);
    }

    /// Proposes (on the leader) or queues for forwarding (to the leader, at the next flush) one
    /// pending request.
    fn send(&mut self, now_ms: u64, seq: u64, route: Route<'_>) {
        let Some(p) = self.pending.get_mut(seq) else {
            return;
        };
        let proposed = if route.raft.role() == Role::Leader {
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
        } else {
            // Sent only if a leader is known at the flush: `last_sent_ms` is set then.
            if route.leader().is_some() && !p.queued {
                p.queued = true;
                self.outbox.push(seq);
            }
            false
        };
        if proposed {
            p.last_sent_ms = Some(now_ms);
        }
    }

    /// Forwards the requests queued since the last flush, in order, to the leader as known now: in
    /// frames of at most `max_forward_bytes` of commands (a larger one alone). If this peer leads by
    /// now, it proposes them instead; with no leader known, they stay unsent (the next tick's retry
    /// sends them once one is known). Requests answered meanwhile are skipped.
    pub(super) fn flush(&mut self, now_ms: u64, route: Route<'_>, out: &mut Output) {
        let mut outbox = std::mem::take(&mut self.outbox);
        let Route { raft, leader_hint } = route;
        let leading = raft.role() == Role::Leader;
        let leader = if leading {
            None
        } else {
            raft.leader_id().cloned().or(leader_hint.clone())
        };
        let mut batch: Vec<Forward> = Vec::new();
        let mut batch_bytes = 0usize;
        for &seq in &outbox {
            let Some(p) = self.pending.get_mut(seq) else {
                continue;
            };
            p.queued = false;
            if leading {
                let route = Route {
                    raft: &mut *raft,
                    leader_hint: leader_hint.clone(),
                };
                self.send(now_ms, seq, route);
                continue;
            }
            let Some(leader) = &leader else {
                continue;
            };
            p.last_sent_ms = Some(now_ms);
            let bytes = p.command.len() + FORWARD_ENVELOPE_BYTES;
            if !batch.is_empty() && batch_bytes + bytes > self.max_forward_bytes {
                let requests = std::mem::take(&mut batch);
                out.send(leader.clone(), HamokMessage::Submit { requests });
                batch_bytes = 0;
            }
            batch.push(Forward {
                seq,
                command: p.command.clone(),
            });
            batch_bytes += bytes;
        }
        if let (Some(leader), false) = (leader, batch.is_empty()) {
            out.send(leader, HamokMessage::Submit { requests: batch });
        }
        // Keep the allocation for the next burst (at most `max_pending` numbers).
        outbox.clear();
        self.outbox = outbox;
    }

    /// A forward of request `seq` reached `from`, which does not lead. It is sent again at once if the
    /// route now names another peer (once per timed send); otherwise the retry timer or the next leader
    /// change sends it.
    pub(super) fn on_redirect(&mut self, now_ms: u64, seq: u64, from: &PeerId, route: Route<'_>) {
        let Some(p) = self.pending.get_mut(seq) else {
            return;
        };
        let elsewhere =
            route.leader().is_some_and(|l| l != *from) || route.raft.role() == Role::Leader;
        if p.followed_redirect || !elsewhere {
            return;
        }
        p.followed_redirect = true;
        self.send(now_ms, seq, route);
    }

    /// Resends requests not yet applied: all of them when `all` (a new leader), else those never sent
    /// (no leader was known) or unanswered for `resend_after_ms`.
    pub(super) fn retry(&mut self, now_ms: u64, all: bool, route: Route<'_>, counters: &Counters) {
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
        self.outbox.clear();
        for (_, p) in std::mem::take(&mut self.pending).into_values() {
            let _ = p.reply.send(Err(error.clone()));
        }
    }
}

/// On the leader: each request forwarded by `from` enters the log only if it decodes and names its
/// sender as the client, so no peer can spoof another's session (and with it, the dedup of its
/// requests); each refused one is counted as malformed. A peer that does not lead redirects them all.
pub(super) fn admit_forwarded(
    now_ms: u64,
    from: PeerId,
    requests: Vec<Forward>,
    raft: &mut RaftNode,
    counters: &Arc<Counters>,
    out: &mut Output,
) {
    if raft.role() != Role::Leader {
        let leader = raft.leader_id().cloned();
        let seqs = requests.iter().map(|r| r.seq).collect();
        out.send(from, HamokMessage::SubmitRedirect { seqs, leader });
        return;
    }
    for Forward { seq, command } in requests {
        let valid =
            LogCommand::decode(&command).is_ok_and(|c| c.client.peer == from && c.seq == seq);
        if !valid {
            Counters::bump(&counters.dropped_malformed);
            continue;
        }
        // Busy or transferring: the client retries after its timer.
        let _ = raft.propose(now_ms, command);
    }
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

    /// Flushes the forwards and returns the `Submit` frames sent: to whom, and the numbers each
    /// carried.
    fn flushed(
        requests: &mut Requests,
        now_ms: u64,
        route: Route<'_>,
        out: &mut Output,
    ) -> Vec<(String, Vec<u64>)> {
        requests.flush(now_ms, route, out);
        out.frames
            .drain(..)
            .filter_map(|(to, m)| match m {
                HamokMessage::Submit { requests } => Some((
                    to.map(|p| p.to_string()).unwrap_or_default(),
                    requests.iter().map(|r| r.seq).collect(),
                )),
                _ => None,
            })
            .collect()
    }

    fn submits_to(
        requests: &mut Requests,
        now_ms: u64,
        route: Route<'_>,
        out: &mut Output,
    ) -> Vec<String> {
        flushed(requests, now_ms, route, out)
            .into_iter()
            .map(|(to, _)| to)
            .collect()
    }

    fn requests_of(peer: &str, max_forward_bytes: usize) -> Requests {
        let client = ClientId {
            peer: PeerId::from(peer),
            nonce: 1,
        };
        Requests::new(client, 10, 1 << 20, max_forward_bytes, 300)
    }

    fn output() -> Output {
        let (events, _) = tokio::sync::broadcast::channel(64);
        Output::new(events)
    }

    /// Two peers that each name the other as leader must not bounce a request without pause: a
    /// redirect is followed at once at most once per timed send. (The whole-peer simulation found the
    /// unbounded version as a message storm.)
    #[test]
    fn redirects_are_followed_at_most_once_per_timed_send() {
        let mut raft = follower();
        let mut out = output();
        let mut requests = requests_of("b", 1 << 20);
        let (reply, _rx) = oneshot::channel();
        requests.submit(0, Op::Noop, 5_000, reply, route(&mut raft, "a"));
        assert_eq!(
            submits_to(&mut requests, 0, route(&mut raft, "a"), &mut out),
            ["a"]
        );
        // a redirects without naming anyone else: wait for the timer.
        requests.on_redirect(1, 1, &PeerId::from("a"), route(&mut raft, "a"));
        assert!(submits_to(&mut requests, 1, route(&mut raft, "a"), &mut out).is_empty());
        // a names c: follow at once.
        requests.on_redirect(2, 1, &PeerId::from("a"), route(&mut raft, "c"));
        assert_eq!(
            submits_to(&mut requests, 2, route(&mut raft, "c"), &mut out),
            ["c"]
        );
        // c names a back: not again before the timer.
        requests.on_redirect(3, 1, &PeerId::from("c"), route(&mut raft, "a"));
        assert!(submits_to(&mut requests, 3, route(&mut raft, "a"), &mut out).is_empty());
        let counters = Counters::default();
        requests.retry(100, false, route(&mut raft, "a"), &counters);
        assert!(
            submits_to(&mut requests, 100, route(&mut raft, "a"), &mut out).is_empty(),
            "not due yet"
        );
        requests.retry(302, false, route(&mut raft, "a"), &counters);
        assert_eq!(
            submits_to(&mut requests, 302, route(&mut raft, "a"), &mut out),
            ["a"]
        );
        // After a timed send, one redirect may be followed again.
        requests.on_redirect(303, 1, &PeerId::from("a"), route(&mut raft, "c"));
        assert_eq!(
            submits_to(&mut requests, 303, route(&mut raft, "c"), &mut out),
            ["c"]
        );
    }

    fn submit_apply(requests: &mut Requests, raft: &mut RaftNode, payload: usize) {
        let (reply, _rx) = oneshot::channel();
        let op = Op::Apply {
            collection: "m".into(),
            payload: vec![7u8; payload].into(),
            fence: None,
        };
        // The answer is never awaited here: a dropped receiver is fine.
        requests.submit(0, op, 5_000, reply, route(raft, "a"));
    }

    /// The forwards of a burst leave together at the flush, in the order they were made, each once
    /// however often it was sent meanwhile; a frame holds at most `max_forward_bytes` of commands (a
    /// larger command alone); a request answered before the flush is not sent.
    #[test]
    fn a_burst_of_forwards_leaves_in_frames_in_order() {
        let mut raft = follower();
        let mut out = output();
        let mut requests = requests_of("b", 1 << 20);
        for _ in 0..5 {
            submit_apply(&mut requests, &mut raft, 10);
        }
        assert!(out.frames.is_empty(), "nothing leaves before the flush");
        assert!(requests.has_forwards());
        // A retry of every request (a leader change) before the flush queues none twice.
        requests.retry(1, true, route(&mut raft, "a"), &Counters::default());
        requests.answer(3, Ok(Bytes::new()), &mut out);
        assert_eq!(
            flushed(&mut requests, 1, route(&mut raft, "a"), &mut out),
            [("a".to_string(), vec![1, 2, 4, 5])]
        );
        assert!(!requests.has_forwards());
        assert!(flushed(&mut requests, 2, route(&mut raft, "a"), &mut out).is_empty());

        // Bounded frames: room for two of these commands per frame.
        let command_bytes = requests.pending.get(1).expect("pending").command.len();
        let mut requests = requests_of("b", 2 * (command_bytes + FORWARD_ENVELOPE_BYTES));
        for _ in 0..3 {
            submit_apply(&mut requests, &mut raft, 10);
        }
        submit_apply(&mut requests, &mut raft, 4 * command_bytes);
        submit_apply(&mut requests, &mut raft, 10);
        assert_eq!(
            flushed(&mut requests, 1, route(&mut raft, "a"), &mut out),
            [
                ("a".to_string(), vec![1, 2]),
                ("a".to_string(), vec![3]),
                ("a".to_string(), vec![4]),
                ("a".to_string(), vec![5]),
            ]
        );

        // Failing every request (the peer left or closed) leaves nothing to forward.
        submit_apply(&mut requests, &mut raft, 10);
        assert!(requests.has_forwards());
        requests.fail_all(HamokError::Closed);
        assert!(!requests.has_forwards());
    }

    /// A peer that leads by the flush proposes what it had queued for forwarding instead of sending
    /// it anywhere.
    #[test]
    fn forwards_queued_before_leading_are_proposed_at_the_flush() {
        let genesis = PersistedState::genesis(Membership::with_voters([PeerId::from("b")]));
        let mut raft =
            RaftNode::new(PeerId::from("b"), RaftConfig::default(), 1, 0, genesis).unwrap();
        let mut out = output();
        let mut requests = requests_of("b", 1 << 20);
        submit_apply(&mut requests, &mut raft, 10);
        submit_apply(&mut requests, &mut raft, 10);
        assert!(requests.has_forwards());
        raft.campaign_now(1);
        assert_eq!(raft.role(), Role::Leader, "a lone voter leads at once");
        let before = raft.last_index();
        assert!(flushed(&mut requests, 2, route(&mut raft, "a"), &mut out).is_empty());
        assert_eq!(raft.last_index(), before + 2, "both proposed");
        assert!(!requests.has_forwards());
    }

    /// The destination is the leader as known at the flush; with none known, nothing is sent and a
    /// request that expires so was certainly never applied (`NoQuorum`, not `Timeout`).
    #[test]
    fn forwards_go_to_the_leader_known_at_the_flush() {
        let mut raft = follower();
        let mut out = output();
        let mut requests = requests_of("b", 1 << 20);
        submit_apply(&mut requests, &mut raft, 10);
        assert_eq!(
            flushed(&mut requests, 1, route(&mut raft, "c"), &mut out),
            [("c".to_string(), vec![1])]
        );

        let mut requests = requests_of("b", 1 << 20);
        let (reply, mut rx) = oneshot::channel();
        requests.submit(0, Op::Noop, 100, reply, route(&mut raft, "a"));
        let nobody = Route {
            raft: &mut raft,
            leader_hint: None,
        };
        assert!(flushed(&mut requests, 1, nobody, &mut out).is_empty());
        requests.expire(100);
        assert!(matches!(
            rx.try_recv(),
            Ok(Err(HamokError::NoQuorum { .. }))
        ));
    }
}
