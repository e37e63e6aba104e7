//! Engine tests in the style of the Raft paper's: one behaviour per test, driven through the public API
//! of [`RaftNode`] only (step, tick, propose, ..., take_ready), with message bodies and `Ready` contents
//! asserted directly. Multi-peer scenarios use the hand-delivered network in `common`.

mod common;

use std::collections::BTreeSet;

use bytes::Bytes;
use common::{cfg, entries, msg, persisted, pid, Net};
use hamok_runtime::raft::{
    Entry, EntryPayload, HardState, LogIndex, Membership, MembershipChange, Message, MessageBody,
    PeerId, PersistedState, RaftConfig, RaftError, RaftLimits, RaftNode, RaftStartError, ReadState,
    Role, Snapshot, SnapshotMeta, SoftState, Term,
};

// ---------------------------------------------------------------------------------------------------
// Helpers

const ELECTION: u64 = 100;
const HEARTBEAT: u64 = 10;

/// `cfg()` with some engine limits changed.
fn cfg_with(change: impl FnOnce(&mut RaftLimits)) -> RaftConfig {
    let mut config = cfg();
    change(&mut config.limits);
    config
}

fn voters(ids: &[&str]) -> Membership {
    Membership::with_voters(ids.iter().map(|i| pid(i)))
}

fn genesis_node(id: &str, ids: &[&str], seed: u64) -> RaftNode {
    RaftNode::new(
        pid(id),
        cfg(),
        seed,
        0,
        PersistedState::genesis(voters(ids)),
    )
    .unwrap()
}

fn restored_node(id: &str, state: PersistedState) -> RaftNode {
    RaftNode::new(pid(id), cfg(), 7, 0, state).unwrap()
}

fn cmd(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

fn rv(
    pre_vote: bool,
    transfer: bool,
    last_log_index: LogIndex,
    last_log_term: Term,
) -> MessageBody {
    MessageBody::RequestVote {
        pre_vote,
        transfer,
        last_log_index,
        last_log_term,
    }
}

fn vote_resp(pre_vote: bool, granted: bool) -> MessageBody {
    MessageBody::VoteResponse { pre_vote, granted }
}

fn append(prev: (LogIndex, Term), entries: Vec<Entry>, leader_commit: LogIndex) -> MessageBody {
    MessageBody::AppendEntries {
        prev_log_index: prev.0,
        prev_log_term: prev.1,
        entries,
        leader_commit,
        committed_once_held: 0,
    }
}

fn heartbeat(commit: LogIndex, read_seq: u64) -> MessageBody {
    MessageBody::Heartbeat { commit, read_seq }
}

fn chunk(meta: &SnapshotMeta, offset: u64, data: &'static [u8], done: bool) -> MessageBody {
    MessageBody::InstallSnapshot {
        meta: meta.clone(),
        offset,
        data: Bytes::from_static(data),
        done,
    }
}

/// `(to, term, pre_vote, granted)` of every vote response.
fn vote_responses(msgs: &[Message]) -> Vec<(PeerId, Term, bool, bool)> {
    msgs.iter()
        .filter_map(|m| match m.body {
            MessageBody::VoteResponse { pre_vote, granted } => {
                Some((m.to.clone(), m.term, pre_vote, granted))
            }
            _ => None,
        })
        .collect()
}

/// `(to, term, pre_vote, transfer, last_log_index, last_log_term)` of every vote request.
fn vote_requests(msgs: &[Message]) -> Vec<(PeerId, Term, bool, bool, LogIndex, Term)> {
    msgs.iter()
        .filter_map(|m| match m.body {
            MessageBody::RequestVote {
                pre_vote,
                transfer,
                last_log_index,
                last_log_term,
            } => Some((
                m.to.clone(),
                m.term,
                pre_vote,
                transfer,
                last_log_index,
                last_log_term,
            )),
            _ => None,
        })
        .collect()
}

/// `(prev_log_index, prev_log_term, entries, leader_commit)` of every append to `to`.
fn appends_to(msgs: &[Message], to: &str) -> Vec<(LogIndex, Term, Vec<Entry>, LogIndex)> {
    msgs.iter()
        .filter(|m| m.to.as_str() == to)
        .filter_map(|m| match &m.body {
            MessageBody::AppendEntries {
                prev_log_index,
                prev_log_term,
                entries,
                leader_commit,
                ..
            } => Some((
                *prev_log_index,
                *prev_log_term,
                entries.clone(),
                *leader_commit,
            )),
            _ => None,
        })
        .collect()
}

/// `(success, index, hint_index, hint_term)` of every append response.
fn append_responses(msgs: &[Message]) -> Vec<(bool, LogIndex, LogIndex, Term)> {
    msgs.iter()
        .filter_map(|m| match m.body {
            MessageBody::AppendResponse {
                success,
                index,
                hint_index,
                hint_term,
            } => Some((success, index, hint_index, hint_term)),
            _ => None,
        })
        .collect()
}

/// Takes everything queued and delivers only the first message to `to` (the rest is lost).
fn deliver_only_first_to(net: &mut Net, to: &str) {
    let first = net
        .take_queue()
        .into_iter()
        .find(|m| m.to.as_str() == to)
        .expect("a message to deliver");
    net.deliver(first);
}

fn indices(entries: &[Entry]) -> Vec<LogIndex> {
    entries.iter().map(|e| e.index).collect()
}

/// Ticks `node` exactly to its election deadline, making it a pre-candidate; returns that time.
fn time_out(node: &mut RaftNode) -> u64 {
    let t = node.next_deadline_ms();
    node.tick(t);
    assert_eq!(node.role(), Role::PreCandidate);
    node.take_ready();
    t
}

/// Times `node` out and grants it pre-votes from `peers` until it campaigns; returns the time.
fn make_candidate(node: &mut RaftNode, peers: &[&str]) -> u64 {
    let t = time_out(node);
    let me = node.id().as_str().to_owned();
    for p in peers {
        if node.role() == Role::Candidate {
            break;
        }
        let term = node.term() + 1;
        node.step(t, msg(p, &me, term, vote_resp(true, true)));
    }
    assert_eq!(node.role(), Role::Candidate);
    t
}

/// A three-peer cluster where `a` leads and everything (its no-op included) is committed everywhere.
fn settled(config: RaftConfig) -> Net {
    let mut net = Net::new(&["a", "b", "c"], config);
    net.elect("a");
    net.run_for(HEARTBEAT); // the slower follower learns the commit from the next heartbeat
    for id in ["a", "b", "c"] {
        assert_eq!(net.node(id).commit_index(), 1, "{id} committed the no-op");
    }
    net
}

/// `settled`, plus a learner `d` added through the log and caught up.
fn with_learner() -> Net {
    let mut net = settled(cfg());
    net.add_node("d", PersistedState::default());
    let now = net.now;
    net.node_mut("a")
        .propose_membership(now, MembershipChange::AddLearner(pid("d")))
        .unwrap();
    net.deliver_all();
    net.run_for(2 * HEARTBEAT);
    assert!(net.node("a").membership().is_learner(&pid("d")));
    net
}

// ---------------------------------------------------------------------------------------------------
// Elections

#[test]
fn follower_election_timeout_starts_a_pre_vote_without_changing_its_term() {
    let mut a = genesis_node("a", &["a", "b", "c"], 1);
    let deadline = a.next_deadline_ms();
    a.tick(deadline - 1);
    assert_eq!(a.role(), Role::Follower);
    assert!(a.take_ready().is_empty());

    a.tick(deadline);
    assert_eq!(a.role(), Role::PreCandidate);
    assert_eq!(a.term(), 0, "a pre-vote does not bump the term");
    let ready = a.take_ready();
    assert!(ready.hard_state.is_none(), "a pre-vote persists nothing");
    let requests = vote_requests(&ready.messages);
    assert_eq!(
        requests,
        vec![
            (pid("b"), 1, true, false, 0, 0),
            (pid("c"), 1, true, false, 0, 0)
        ],
        "pre-vote requests in the prospective term to every other voter"
    );
}

#[test]
fn pre_vote_majority_makes_a_candidate_whose_self_vote_is_persisted_with_its_vote_requests() {
    let mut a = genesis_node("a", &["a", "b", "c"], 1);
    let t = time_out(&mut a);
    a.step(t, msg("b", "a", 1, vote_resp(true, true)));
    assert_eq!(a.role(), Role::Candidate);
    assert_eq!(a.term(), 1);

    let ready = a.take_ready();
    assert_eq!(
        ready.hard_state,
        Some(HardState {
            term: 1,
            voted_for: Some(pid("a"))
        }),
        "the self-vote must be persisted before the requests go out"
    );
    assert_eq!(
        vote_requests(&ready.messages),
        vec![
            (pid("b"), 1, false, false, 0, 0),
            (pid("c"), 1, false, false, 0, 0)
        ]
    );
}

#[test]
fn candidate_with_a_majority_of_votes_becomes_leader_and_appends_a_noop_of_its_term() {
    let mut a = genesis_node("a", &["a", "b", "c"], 1);
    let t = make_candidate(&mut a, &["b"]);
    a.take_ready();
    a.step(t, msg("b", "a", 1, vote_resp(false, true)));
    assert_eq!(a.role(), Role::Leader);
    assert_eq!(a.leader_id(), Some(&pid("a")));

    let ready = a.take_ready();
    assert_eq!(
        ready.soft_state,
        Some(SoftState {
            role: Role::Leader,
            term: 1,
            leader: Some(pid("a"))
        })
    );
    let noop = Entry {
        term: 1,
        index: 1,
        payload: EntryPayload::Noop,
    };
    assert_eq!(ready.entries_from, Some(1));
    assert_eq!(ready.entries, vec![noop.clone()]);
    for f in ["b", "c"] {
        assert_eq!(
            appends_to(&ready.messages, f),
            vec![(0, 0, vec![noop.clone()], 0)]
        );
    }
}

#[test]
fn candidate_losing_a_split_vote_returns_to_follower_and_retries_after_a_randomized_timeout() {
    let mut a = genesis_node("a", &["a", "b", "c", "d"], 3);
    let t = make_candidate(&mut a, &["b", "c"]);
    a.take_ready();
    a.step(t, msg("b", "a", 1, vote_resp(false, true)));
    a.step(t, msg("c", "a", 1, vote_resp(false, false)));
    assert_eq!(
        a.role(),
        Role::Candidate,
        "2 of 4 granted, 1 refused: still open"
    );
    a.step(t, msg("d", "a", 1, vote_resp(false, false)));
    assert_eq!(a.role(), Role::Follower, "a 2-2 tie cannot reach 3 of 4");
    assert_eq!(a.term(), 1);
    assert_eq!(a.leader_id(), None);

    let retry = a.next_deadline_ms();
    assert!(
        (t + ELECTION..t + 2 * ELECTION).contains(&retry),
        "retry at {retry} not in [{}, {})",
        t + ELECTION,
        t + 2 * ELECTION
    );
    a.tick(retry - 1);
    assert_eq!(a.role(), Role::Follower);
    a.tick(retry);
    assert_eq!(a.role(), Role::PreCandidate);
    let requests = vote_requests(&a.take_ready().messages);
    assert_eq!(requests.len(), 3);
    assert!(
        requests.iter().all(|r| r.1 == 2 && r.2),
        "pre-vote for term 2"
    );
}

#[test]
fn candidate_that_hears_nothing_retries_with_a_new_pre_vote_after_its_timeout() {
    let mut a = genesis_node("a", &["a", "b", "c"], 4);
    let t = make_candidate(&mut a, &["b"]);
    a.take_ready();
    let retry = a.next_deadline_ms();
    assert!((t + ELECTION..t + 2 * ELECTION).contains(&retry));
    a.tick(retry);
    assert_eq!(a.role(), Role::PreCandidate);
    assert_eq!(
        a.term(),
        1,
        "the retry starts with a pre-vote, not a new term"
    );
    let requests = vote_requests(&a.take_ready().messages);
    assert!(requests.iter().all(|r| r.1 == 2 && r.2 && !r.3));
}

#[test]
fn election_timeouts_are_randomized_in_one_to_two_timeouts_and_deterministic_per_seed() {
    let mut seen = BTreeSet::new();
    for seed in 0..64 {
        let node = RaftNode::new(
            pid("a"),
            cfg(),
            seed,
            1_000,
            PersistedState::genesis(voters(&["a", "b", "c"])),
        )
        .unwrap();
        let timeout = node.next_deadline_ms() - 1_000;
        assert!((ELECTION..2 * ELECTION).contains(&timeout), "{timeout}");
        seen.insert(timeout);
    }
    assert!(seen.len() > 16, "timeouts barely vary: {seen:?}");

    let deadlines = |seed: u64| {
        let mut node = genesis_node("a", &["a", "b", "c"], seed);
        let mut out = vec![node.next_deadline_ms()];
        for _ in 0..6 {
            let now = *out.last().unwrap();
            node.tick(now);
            node.take_ready();
            let next = node.next_deadline_ms();
            assert!((now + ELECTION..now + 2 * ELECTION).contains(&next));
            out.push(next);
        }
        out
    };
    assert_eq!(deadlines(42), deadlines(42), "same seed, same timeouts");
    assert_ne!(deadlines(42), deadlines(43));
}

// ---------------------------------------------------------------------------------------------------
// Voting rules

#[test]
fn follower_grants_at_most_one_vote_per_term() {
    let mut b = genesis_node("b", &["a", "b", "c"], 2);
    b.step(10, msg("a", "b", 1, rv(false, false, 0, 0)));
    b.step(10, msg("c", "b", 1, rv(false, false, 0, 0)));
    b.step(10, msg("a", "b", 1, rv(false, false, 0, 0)));
    let ready = b.take_ready();
    assert_eq!(
        vote_responses(&ready.messages),
        vec![
            (pid("a"), 1, false, true),
            (pid("c"), 1, false, false),
            (pid("a"), 1, false, true), // a repeated request from the same candidate is fine
        ]
    );
    assert_eq!(
        ready.hard_state,
        Some(HardState {
            term: 1,
            voted_for: Some(pid("a"))
        })
    );
}

/// A follower with log (1,1) (2,2) (3,2) in term 2, asked for a vote in term 3.
fn vote_from_log_holder(last_log_index: LogIndex, last_log_term: Term) -> bool {
    let mut b = restored_node(
        "b",
        persisted(&["a", "b", "c"], 2, entries(&[(1, 1), (2, 2), (3, 2)])),
    );
    b.step(
        10,
        msg("a", "b", 3, rv(false, false, last_log_index, last_log_term)),
    );
    let responses = vote_responses(&b.take_ready().messages);
    assert_eq!(responses.len(), 1);
    assert_eq!(b.term(), 3);
    responses[0].3
}

#[test]
fn vote_granted_to_candidate_whose_last_term_is_higher_even_with_a_shorter_log() {
    assert!(vote_from_log_holder(2, 3));
}

#[test]
fn vote_granted_to_candidate_with_same_last_term_and_a_log_at_least_as_long() {
    assert!(vote_from_log_holder(3, 2));
    assert!(vote_from_log_holder(7, 2));
}

#[test]
fn vote_refused_to_candidate_with_same_last_term_and_a_shorter_log() {
    assert!(!vote_from_log_holder(2, 2));
}

#[test]
fn vote_refused_to_candidate_whose_last_term_is_lower_even_with_a_longer_log() {
    assert!(!vote_from_log_holder(10, 1));
}

#[test]
fn granted_vote_is_persisted_in_the_same_ready_as_the_response() {
    let mut b = genesis_node("b", &["a", "b", "c"], 2);
    b.step(10, msg("a", "b", 1, rv(false, false, 0, 0)));
    let ready = b.take_ready();
    assert_eq!(
        ready.hard_state,
        Some(HardState {
            term: 1,
            voted_for: Some(pid("a"))
        })
    );
    assert_eq!(
        vote_responses(&ready.messages),
        vec![(pid("a"), 1, false, true)]
    );
    assert!(b.take_ready().hard_state.is_none(), "reported once");
}

#[test]
fn vote_granted_without_a_term_change_is_still_persisted_before_the_response() {
    // b already is in term 1 (it saw the term earlier) and has not voted.
    let mut b = restored_node("b", persisted(&["a", "b", "c"], 1, vec![]));
    b.step(10, msg("a", "b", 1, rv(false, false, 0, 0)));
    let ready = b.take_ready();
    assert_eq!(
        vote_responses(&ready.messages),
        vec![(pid("a"), 1, false, true)]
    );
    assert_eq!(
        ready.hard_state,
        Some(HardState {
            term: 1,
            voted_for: Some(pid("a"))
        }),
        "the vote must be durable before the response is sent"
    );
}

/// A follower of `a` in term 1 that last heard from it at time 1000.
fn follower_in_lease() -> RaftNode {
    let mut b = genesis_node("b", &["a", "b", "c"], 2);
    b.step(1_000, msg("a", "b", 1, heartbeat(0, 0)));
    b.take_ready();
    assert_eq!(b.leader_id(), Some(&pid("a")));
    b
}

#[test]
fn follower_within_leader_lease_ignores_a_higher_term_vote_request() {
    let mut b = follower_in_lease();
    b.step(1_050, msg("c", "b", 2, rv(false, false, 5, 1)));
    b.step(1_050, msg("c", "b", 2, rv(true, false, 5, 1)));
    assert_eq!(b.term(), 1, "term unchanged");
    assert_eq!(b.leader_id(), Some(&pid("a")));
    let ready = b.take_ready();
    assert!(ready.messages.is_empty(), "no answer: {:?}", ready.messages);
    assert!(ready.hard_state.is_none());
}

#[test]
fn follower_within_leader_lease_honours_a_transfer_vote_request() {
    let mut b = follower_in_lease();
    b.step(1_050, msg("c", "b", 2, rv(false, true, 0, 0)));
    assert_eq!(b.term(), 2);
    let ready = b.take_ready();
    assert_eq!(
        vote_responses(&ready.messages),
        vec![(pid("c"), 2, false, true)]
    );
    assert_eq!(
        ready.hard_state,
        Some(HardState {
            term: 2,
            voted_for: Some(pid("c"))
        })
    );
}

#[test]
fn follower_whose_lease_expired_grants_a_higher_term_vote() {
    let mut b = follower_in_lease();
    b.step(1_000 + ELECTION, msg("c", "b", 2, rv(false, false, 0, 0)));
    assert_eq!(b.term(), 2);
    assert_eq!(
        vote_responses(&b.take_ready().messages),
        vec![(pid("c"), 2, false, true)]
    );
}

#[test]
fn pre_vote_request_changes_neither_the_term_nor_the_vote_of_the_receiver() {
    let mut b = genesis_node("b", &["a", "b", "c"], 2);
    b.step(10, msg("a", "b", 1, rv(true, false, 0, 0)));
    assert_eq!(b.term(), 0);
    let ready = b.take_ready();
    assert!(ready.hard_state.is_none());
    assert_eq!(
        vote_responses(&ready.messages),
        vec![(pid("a"), 1, true, true)],
        "a granted pre-vote answers in the prospective term"
    );
    // The vote itself is still free.
    b.step(10, msg("c", "b", 1, rv(false, false, 0, 0)));
    assert_eq!(
        vote_responses(&b.take_ready().messages),
        vec![(pid("c"), 1, false, true)]
    );
}

// ---------------------------------------------------------------------------------------------------
// Check-quorum

#[test]
fn leader_that_hears_from_no_majority_for_an_election_timeout_steps_down() {
    let mut net = settled(cfg());
    let term = net.node("a").term();
    let start = net.now;
    net.isolate("a");
    let mut stepped_down_at = None;
    for t in 1..=3 * ELECTION {
        net.tick("a", start + t);
        net.deliver_all();
        if net.node("a").role() != Role::Leader {
            stepped_down_at = Some(t);
            break;
        }
    }
    let t = stepped_down_at.expect("the cut-off leader never stepped down");
    assert!(
        (ELECTION..=2 * ELECTION).contains(&t),
        "stepped down after {t} ms"
    );
    let a = net.node("a");
    assert_eq!(a.role(), Role::Follower);
    assert_eq!(a.term(), term, "stepping down does not bump the term");
    assert_eq!(a.leader_id(), None);
}

#[test]
fn leader_in_contact_with_a_majority_keeps_leading() {
    let mut net = settled(cfg());
    let term = net.node("a").term();
    net.isolate("c");
    net.run_for(5 * ELECTION);
    assert_eq!(net.node("a").role(), Role::Leader);
    assert_eq!(net.node("a").term(), term);
}

// ---------------------------------------------------------------------------------------------------
// Replication

#[test]
fn proposal_is_replicated_in_the_next_ready_without_a_tick() {
    let mut net = settled(cfg());
    let now = net.now;
    let (index, term) = net.node_mut("a").propose(now, cmd("x")).unwrap();
    let ready = net.drain("a");
    let entry = Entry {
        term,
        index,
        payload: EntryPayload::Command(cmd("x")),
    };
    assert_eq!(ready.entries_from, Some(index));
    assert_eq!(ready.entries, vec![entry.clone()]);
    for f in ["b", "c"] {
        assert_eq!(
            appends_to(&ready.messages, f),
            vec![(index - 1, term, vec![entry.clone()], 1)]
        );
    }
}

#[test]
fn proposals_made_before_one_take_ready_are_batched_into_one_append_per_follower() {
    let mut net = settled(cfg());
    let now = net.now;
    let first = net.node_mut("a").propose(now, cmd("x")).unwrap().0;
    net.node_mut("a").propose(now, cmd("y")).unwrap();
    let last = net.node_mut("a").propose(now, cmd("z")).unwrap().0;
    let ready = net.drain("a");
    for f in ["b", "c"] {
        let appends = appends_to(&ready.messages, f);
        assert_eq!(appends.len(), 1, "one message to {f}");
        assert_eq!(indices(&appends[0].2), (first..=last).collect::<Vec<_>>());
    }
}

#[test]
fn append_batches_respect_max_entries_per_append() {
    let mut net = settled(cfg_with(|l| {
        l.max_entries_per_append = 2;
        // Wide enough for every batch to leave at once (the window has its own test below).
        l.max_inflight_appends = 8;
    }));
    let now = net.now;
    for i in 0..5 {
        net.node_mut("a")
            .propose(now, cmd(&format!("{i}")))
            .unwrap();
    }
    let ready = net.drain("a");
    for f in ["b", "c"] {
        let appends = appends_to(&ready.messages, f);
        let sizes: Vec<usize> = appends.iter().map(|a| a.2.len()).collect();
        assert_eq!(sizes, vec![2, 2, 1]);
        let prevs: Vec<LogIndex> = appends.iter().map(|a| a.0).collect();
        assert_eq!(prevs, vec![1, 3, 5], "batches are contiguous");
    }
}

#[test]
fn pipelining_stops_at_max_inflight_appends_until_acknowledged() {
    let mut net = settled(cfg_with(|l| {
        l.max_entries_per_append = 1;
        l.max_inflight_appends = 2;
    }));
    let now = net.now;
    for i in 0..4 {
        net.node_mut("a")
            .propose(now, cmd(&format!("{i}")))
            .unwrap();
    }
    let ready = net.drain("a");
    net.queue.clear();
    for f in ["b", "c"] {
        let appends = appends_to(&ready.messages, f);
        assert_eq!(
            appends.iter().map(|a| indices(&a.2)).collect::<Vec<_>>(),
            vec![vec![2], vec![3]],
            "two appends in flight to {f}"
        );
    }
    assert!(
        net.drain("a").messages.is_empty(),
        "the window is full: nothing more until an ack"
    );

    // b acknowledges the first append: exactly one more goes to b, nothing to c.
    let first_to_b = ready
        .messages
        .iter()
        .find(|m| m.to.as_str() == "b")
        .unwrap()
        .clone();
    net.deliver(first_to_b);
    let answer = net.drain("b").messages;
    net.queue.clear();
    assert_eq!(append_responses(&answer), vec![(true, 2, 0, 0)]);
    net.deliver(answer[0].clone());
    let next = net.drain("a");
    assert_eq!(
        appends_to(&next.messages, "b")
            .iter()
            .map(|a| indices(&a.2))
            .collect::<Vec<_>>(),
        vec![vec![4]]
    );
    assert!(appends_to(&next.messages, "c").is_empty());
}

#[test]
fn follower_rejects_an_append_whose_previous_entry_does_not_match_and_returns_a_conflict_hint() {
    let log = entries(&[(1, 1), (2, 1), (3, 2), (4, 2)]);
    let mut b = restored_node("b", persisted(&["a", "b", "c"], 2, log.clone()));
    // prev term differs at index 4.
    b.step(10, msg("a", "b", 3, append((4, 3), entries(&[(5, 3)]), 0)));
    // prev index beyond the end of the log.
    b.step(10, msg("a", "b", 3, append((7, 3), entries(&[(8, 3)]), 0)));
    // the leader's term at 4 is 1: the hint skips the whole term-2 tail.
    b.step(10, msg("a", "b", 3, append((4, 1), entries(&[(5, 3)]), 0)));
    let ready = b.take_ready();
    assert_eq!(
        append_responses(&ready.messages),
        vec![(false, 4, 4, 2), (false, 7, 4, 2), (false, 4, 2, 1)]
    );
    assert!(ready.messages.iter().all(|m| m.term == 3));
    assert_eq!(ready.entries_from, None, "the log is untouched");
    assert_eq!(b.last_index(), 4);
    assert_eq!(b.term_at(4), Some(2));
}

#[test]
fn leader_backs_up_over_a_long_divergent_tail_in_one_round_trip() {
    // a and c: (1,1) (2,1) then 3..=12 of term 3. b: (1,1) (2,1) then 3..=30 of term 2, never committed.
    let mut leader_log = entries(&[(1, 1), (2, 1)]);
    leader_log.extend(entries(&(3..=12).map(|i| (i, 3)).collect::<Vec<_>>()));
    let mut stale_log = entries(&[(1, 1), (2, 1)]);
    stale_log.extend(entries(&(3..=30).map(|i| (i, 2)).collect::<Vec<_>>()));
    let ids = ["a", "b", "c"];
    let mut net = Net::with_states(
        cfg(),
        vec![
            ("a", persisted(&ids, 3, leader_log.clone())),
            ("b", persisted(&ids, 2, stale_log)),
            ("c", persisted(&ids, 3, leader_log)),
        ],
    );
    net.elect("a");
    let rejections = net
        .delivered
        .iter()
        .filter(|m| m.from.as_str() == "b")
        .filter(|m| matches!(m.body, MessageBody::AppendResponse { success: false, .. }))
        .count();
    let appends = net.delivered_to("b", |b| matches!(b, MessageBody::AppendEntries { .. }));
    assert_eq!(rejections, 1, "one rejection skips the whole term-2 tail");
    assert!(
        appends.len() <= 3,
        "{} appends to converge (one per entry would be ~10)",
        appends.len()
    );
    let (a, b) = (net.node("a"), net.node("b"));
    assert_eq!(b.last_index(), a.last_index());
    for i in 1..=a.last_index() {
        assert_eq!(b.term_at(i), a.term_at(i), "index {i}");
    }
    let durable: Vec<(LogIndex, Term)> = net.storage[&pid("b")]
        .entries
        .iter()
        .map(|e| (e.index, e.term))
        .collect();
    let expected: Vec<(LogIndex, Term)> = (1..=a.last_index())
        .map(|i| (i, a.term_at(i).unwrap()))
        .collect();
    assert_eq!(durable, expected, "the truncation reached b's durable log");
}

#[test]
fn follower_truncates_conflicting_uncommitted_entries() {
    let mut b = restored_node(
        "b",
        persisted(
            &["a", "b", "c"],
            2,
            entries(&[(1, 1), (2, 1), (3, 2), (4, 2)]),
        ),
    );
    let new = entries(&[(3, 3)]);
    b.step(10, msg("a", "b", 3, append((2, 1), new.clone(), 2)));
    let ready = b.take_ready();
    assert_eq!(ready.entries_from, Some(3), "truncate the durable log at 3");
    assert_eq!(ready.entries, new);
    assert_eq!(append_responses(&ready.messages), vec![(true, 3, 0, 0)]);
    assert_eq!(b.last_index(), 3);
    assert_eq!(b.term_at(3), Some(3));
    assert_eq!(b.commit_index(), 2);
    assert_eq!(indices(&ready.committed), vec![1, 2]);
}

#[test]
fn lost_append_is_retransmitted_after_two_heartbeat_intervals() {
    let mut net = settled(cfg());
    let start = net.now;
    let (index, _) = net.node_mut("a").propose(start, cmd("x")).unwrap();
    net.take_queue(); // the append is lost
    let mut resent_at = None;
    for t in 1..=4 * HEARTBEAT {
        net.tick("a", start + t);
        let sent = net.take_queue(); // and so is everything else
        if appends_to(&sent, "b")
            .iter()
            .any(|a| a.2.iter().any(|e| e.index == index))
        {
            resent_at = Some(t);
            break;
        }
    }
    let t = resent_at.expect("never retransmitted");
    assert!(
        (2 * HEARTBEAT..=3 * HEARTBEAT).contains(&t),
        "retransmitted after {t} ms"
    );
}

// ---------------------------------------------------------------------------------------------------
// Commit

#[test]
fn leader_commits_an_entry_once_a_majority_holds_it() {
    let mut net = settled(cfg());
    let now = net.now;
    let (index, _) = net.node_mut("a").propose(now, cmd("x")).unwrap();
    deliver_only_first_to(&mut net, "b");
    let answer = net.drain("b").messages;
    net.queue.clear();
    assert!(
        net.node("a").commit_index() < index,
        "a alone is no majority"
    );
    net.deliver(answer[0].clone());
    assert_eq!(net.node("a").commit_index(), index);
    let ready = net.drain("a");
    assert_eq!(indices(&ready.committed), vec![index]);
}

/// Figure 8 of the paper, built by hand. Five voters; b is down.
///   a: (1,1) (2,2)  term 3   -- was leader in term 2, replicated index 2 only to b
///   b: (1,1) (2,2)  term 2
///   c: (1,1)        term 1
///   d: (1,1)        term 1
///   e: (1,1) (2,3)  term 3   -- was leader in term 3
/// a is elected in term 4 (c, d vote for it) and replicates (2,2) to c, d and e, but the entries of its
/// own term (its no-op) never reach anyone.
fn figure8() -> Net {
    let ids = ["a", "b", "c", "d", "e"];
    let mut net = Net::with_states(
        cfg(),
        vec![
            ("a", persisted(&ids, 3, entries(&[(1, 1), (2, 2)]))),
            ("b", persisted(&ids, 2, entries(&[(1, 1), (2, 2)]))),
            ("c", persisted(&ids, 1, entries(&[(1, 1)]))),
            ("d", persisted(&ids, 1, entries(&[(1, 1)]))),
            ("e", persisted(&ids, 3, entries(&[(1, 1), (2, 3)]))),
        ],
    );
    net.isolate("b");
    let deadline = net.node("a").next_deadline_ms();
    net.tick("a", deadline);
    net.deliver_all_with(|mut m| {
        if let MessageBody::AppendEntries { entries, .. } = &mut m.body {
            entries.retain(|e| e.term != 4);
        }
        Some(m)
    });
    assert_eq!(net.node("a").role(), Role::Leader);
    assert_eq!(net.node("a").term(), 4);
    assert_eq!(net.node("a").term_at(3), Some(4), "the no-op of term 4");
    net
}

#[test]
fn leader_never_commits_an_entry_of_a_previous_term_by_counting_replicas() {
    let net = figure8();
    let a = net.node("a");
    for f in ["c", "d", "e"] {
        assert_eq!(net.node(f).term_at(2), Some(2), "{f} holds (2,2)");
        assert_eq!(a.match_index(&pid(f)), Some(2));
    }
    // Four of five hold (2,2), yet committing it would be unsafe (e could still win term 5 and
    // overwrite it with (2,3) in the original scenario).
    assert_eq!(a.commit_index(), 0);
    for id in ["a", "c", "d", "e"] {
        assert_eq!(net.node(id).commit_index(), 0, "{id}");
    }
}

#[test]
fn leader_commits_a_previous_term_entry_indirectly_with_an_entry_of_its_own_term() {
    let mut net = figure8();
    let now = net.now;
    let (index, term) = net.node_mut("a").propose(now, cmd("y")).unwrap();
    assert_eq!((index, term), (4, 4));
    net.deliver_all();
    assert_eq!(net.node("a").commit_index(), 4);
    let applied: Vec<(LogIndex, Term)> = net.applied[&pid("a")]
        .iter()
        .map(|e| (e.index, e.term))
        .collect();
    assert_eq!(applied, vec![(1, 1), (2, 2), (3, 4), (4, 4)]);
}

#[test]
fn followers_learn_the_commit_index_from_the_next_heartbeat() {
    let mut net = settled(cfg());
    let now = net.now;
    let (index, _) = net.node_mut("a").propose(now, cmd("x")).unwrap();
    net.deliver_all();
    assert_eq!(net.node("a").commit_index(), index);
    net.run_for(HEARTBEAT);
    for f in ["b", "c"] {
        assert_eq!(net.node(f).commit_index(), index, "{f}");
        assert_eq!(net.applied[&pid(f)].last().map(|e| e.index), Some(index));
    }
}

#[test]
fn follower_whose_ack_completed_the_majority_learns_the_commit_without_a_tick() {
    let mut net = settled(cfg());
    let now = net.now;
    let (index, _) = net.node_mut("a").propose(now, cmd("x")).unwrap();
    net.deliver_all(); // no tick: b's ack commits the entry, and a tells b at once
    assert_eq!(net.node("a").commit_index(), index);
    assert_eq!(net.node("b").commit_index(), index);
}

/// Every follower learns a new commit index without waiting for the next tick, including the one whose
/// ack arrives after the entry already committed (its notice is not capped at its old match index).
#[test]
fn every_follower_holding_a_committed_entry_learns_the_commit_without_a_tick() {
    let mut net = settled(cfg());
    let now = net.now;
    let (index, _) = net.node_mut("a").propose(now, cmd("x")).unwrap();
    net.deliver_all();
    for f in ["b", "c"] {
        assert_eq!(net.node(f).commit_index(), index, "{f}");
    }
}

#[test]
fn follower_commit_index_follows_the_leader_commit_in_append_entries() {
    let mut b = genesis_node("b", &["a", "b", "c"], 2);
    b.step(
        10,
        msg(
            "a",
            "b",
            1,
            append((0, 0), entries(&[(1, 1), (2, 1), (3, 1)]), 2),
        ),
    );
    assert_eq!(b.commit_index(), 2);
    assert_eq!(indices(&b.take_ready().committed), vec![1, 2]);
    b.step(20, msg("a", "b", 1, append((3, 1), vec![], 3)));
    assert_eq!(b.commit_index(), 3);
    assert_eq!(indices(&b.take_ready().committed), vec![3]);
}

#[test]
fn follower_commit_is_capped_at_the_last_entry_of_the_append() {
    let mut b = genesis_node("b", &["a", "b", "c"], 2);
    // The leader has committed 5 but this message only carries index 1.
    b.step(10, msg("a", "b", 1, append((0, 0), entries(&[(1, 1)]), 5)));
    assert_eq!(b.commit_index(), 1);
}

#[test]
fn follower_commit_index_follows_heartbeats() {
    let mut b = restored_node(
        "b",
        persisted(&["a", "b", "c"], 1, entries(&[(1, 1), (2, 1)])),
    );
    b.step(10, msg("a", "b", 1, heartbeat(2, 0)));
    let ready = b.take_ready();
    assert_eq!(b.commit_index(), 2);
    assert_eq!(indices(&ready.committed), vec![1, 2]);
    assert_eq!(
        ready
            .messages
            .iter()
            .map(|m| (m.to.clone(), m.body.clone()))
            .collect::<Vec<_>>(),
        vec![(pid("a"), MessageBody::HeartbeatResponse { read_seq: 0 })]
    );
}

#[test]
fn a_follower_answers_each_heartbeat_round_once_per_term() {
    let mut b = restored_node(
        "b",
        persisted(&["a", "b", "c"], 1, entries(&[(1, 1), (2, 1), (3, 1)])),
    );
    let answers = |b: &mut RaftNode| -> Vec<MessageBody> {
        b.take_ready()
            .messages
            .into_iter()
            .map(|m| m.body)
            .filter(|body| matches!(body, MessageBody::HeartbeatResponse { .. }))
            .collect()
    };
    b.step(10, msg("a", "b", 1, heartbeat(1, 4)));
    assert_eq!(
        answers(&mut b),
        vec![MessageBody::HeartbeatResponse { read_seq: 4 }]
    );
    // A commit notice reuses the round: the follower commits but does not answer again.
    b.step(11, msg("a", "b", 1, heartbeat(2, 4)));
    assert_eq!(b.commit_index(), 2);
    assert_eq!(answers(&mut b), vec![]);
    // A late duplicate of an older round is not answered either.
    b.step(12, msg("a", "b", 1, heartbeat(2, 3)));
    assert_eq!(answers(&mut b), vec![]);
    // The next round is.
    b.step(13, msg("a", "b", 1, heartbeat(3, 5)));
    assert_eq!(
        answers(&mut b),
        vec![MessageBody::HeartbeatResponse { read_seq: 5 }]
    );
    // A new leader in a new term counts its rounds afresh.
    b.step(14, msg("c", "b", 2, heartbeat(3, 1)));
    assert_eq!(
        answers(&mut b),
        vec![MessageBody::HeartbeatResponse { read_seq: 1 }]
    );
}

#[test]
fn every_periodic_heartbeat_starts_a_new_round() {
    let mut net = settled(cfg());
    let rounds = |net: &mut Net| -> Vec<u64> {
        net.now += HEARTBEAT;
        let now = net.now;
        let a = net.node_mut("a");
        a.tick(now);
        a.take_ready()
            .messages
            .into_iter()
            .filter_map(|m| match m.body {
                MessageBody::Heartbeat { read_seq, .. } => Some(read_seq),
                _ => None,
            })
            .collect()
    };
    let first = rounds(&mut net);
    let second = rounds(&mut net);
    assert_eq!(first.len(), 2, "{first:?}");
    assert_eq!(second.len(), 2, "{second:?}");
    assert!(
        second.iter().min() > first.iter().max(),
        "{first:?} then {second:?}"
    );
}

#[test]
fn committed_entries_are_applied_in_log_order_exactly_once_on_every_peer() {
    let mut net = settled(cfg());
    let mut proposed = Vec::new();
    for round in 0..5 {
        for k in 0..4 {
            let now = net.now;
            let data = cmd(&format!("{round}-{k}"));
            net.node_mut("a").propose(now, data.clone()).unwrap();
            proposed.push(data);
        }
        if round % 2 == 0 {
            net.deliver_all();
        }
        net.run_for(HEARTBEAT + 5);
    }
    net.run_for(2 * HEARTBEAT);
    let last = net.node("a").last_index();
    let leader_applied = net.applied[&pid("a")].clone();
    assert_eq!(indices(&leader_applied), (1..=last).collect::<Vec<_>>());
    let commands: Vec<Bytes> = leader_applied
        .iter()
        .filter_map(|e| match &e.payload {
            EntryPayload::Command(b) => Some(b.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(commands, proposed);
    for f in ["b", "c"] {
        assert_eq!(net.applied[&pid(f)], leader_applied, "{f}");
    }
}

// ---------------------------------------------------------------------------------------------------
// Membership

#[test]
fn added_learner_receives_the_log() {
    let net = with_learner();
    let (a, d) = (net.node("a"), net.node("d"));
    assert_eq!(d.last_index(), a.last_index());
    assert_eq!(d.commit_index(), a.commit_index());
    assert!(d.membership().is_learner(&pid("d")));
    assert!(!d.membership().is_voter(&pid("d")));
    assert_eq!(d.role(), Role::Follower);
}

#[test]
fn learner_acknowledgements_do_not_count_towards_commit() {
    let mut net = with_learner();
    net.isolate("b");
    net.isolate("c");
    let now = net.now;
    let (index, _) = net.node_mut("a").propose(now, cmd("x")).unwrap();
    net.deliver_all();
    assert_eq!(net.node("d").last_index(), index, "the learner got it");
    assert_eq!(net.node("a").match_index(&pid("d")), Some(index));
    assert!(
        net.node("a").commit_index() < index,
        "a leader plus a learner is not a majority of {{a, b, c}}"
    );
}

#[test]
fn candidates_do_not_ask_learners_for_votes_and_learner_votes_do_not_count() {
    let mut net = with_learner();
    let deadline = net.node("b").next_deadline_ms();
    net.tick("b", deadline);
    let ready = net.drain("b");
    net.queue.clear();
    let asked: BTreeSet<PeerId> = vote_requests(&ready.messages)
        .into_iter()
        .map(|r| r.0)
        .collect();
    assert_eq!(asked, BTreeSet::from([pid("a"), pid("c")]));

    let now = net.now;
    let b = net.node_mut("b");
    let term = b.term() + 1;
    b.step(now, msg("d", "b", term, vote_resp(true, true)));
    assert_eq!(b.role(), Role::PreCandidate, "a learner's grant is no vote");
    b.step(now, msg("c", "b", term, vote_resp(true, true)));
    assert_eq!(b.role(), Role::Candidate);
}

#[test]
fn learner_never_campaigns() {
    let mut net = with_learner();
    net.isolate("d");
    let term = net.node("d").term();
    for _ in 0..10 {
        let deadline = net.node("d").next_deadline_ms();
        net.tick("d", deadline);
        let ready = net.drain("d");
        assert!(vote_requests(&ready.messages).is_empty());
        assert_eq!(net.node("d").role(), Role::Follower);
    }
    assert_eq!(net.node("d").term(), term);
}

#[test]
fn promoting_a_learner_is_refused_until_it_has_caught_up() {
    let mut net = settled(cfg());
    net.add_node("d", PersistedState::default());
    net.drop_messages_to("d");
    let now = net.now;
    net.node_mut("a")
        .propose_membership(now, MembershipChange::AddLearner(pid("d")))
        .unwrap();
    net.deliver_all();
    assert!(net.node("a").membership().is_learner(&pid("d")));
    assert_eq!(
        net.node_mut("a")
            .propose_membership(now, MembershipChange::Promote(pid("d"))),
        Err(RaftError::LearnerBehind(pid("d")))
    );

    net.heal();
    net.run_for(5 * HEARTBEAT);
    let now = net.now;
    let (index, _) = net
        .node_mut("a")
        .propose_membership(now, MembershipChange::Promote(pid("d")))
        .expect("caught up: promotion accepted");
    net.deliver_all();
    let a = net.node("a");
    assert!(a.commit_index() >= index);
    assert!(a.membership().is_voter(&pid("d")));
    assert!(!a.membership().is_learner(&pid("d")));
}

#[test]
fn only_one_membership_change_may_be_pending_at_a_time() {
    let mut net = settled(cfg());
    let now = net.now;
    let a = net.node_mut("a");
    a.propose_membership(now, MembershipChange::AddLearner(pid("d")))
        .unwrap();
    assert_eq!(
        a.propose_membership(now, MembershipChange::AddLearner(pid("e"))),
        Err(RaftError::MembershipChangePending)
    );
    assert_eq!(
        a.propose_membership(now, MembershipChange::Remove(pid("c"))),
        Err(RaftError::MembershipChangePending)
    );
    net.deliver_all();
    net.node_mut("a")
        .propose_membership(now, MembershipChange::AddLearner(pid("e")))
        .expect("the first change committed");
}

#[test]
fn new_leader_cannot_change_membership_before_committing_an_entry_of_its_term() {
    let mut net = Net::new(&["a", "b", "c"], cfg());
    let deadline = net.node("a").next_deadline_ms();
    net.tick("a", deadline);
    net.deliver_all_with(|m| (!matches!(m.body, MessageBody::AppendEntries { .. })).then_some(m));
    assert_eq!(net.node("a").role(), Role::Leader);
    assert_eq!(net.node("a").commit_index(), 0);
    let now = net.now;
    assert_eq!(
        net.node_mut("a")
            .propose_membership(now, MembershipChange::AddLearner(pid("d"))),
        Err(RaftError::MembershipChangePending)
    );
    net.run_for(3 * HEARTBEAT);
    assert_eq!(net.node("a").commit_index(), 1, "the no-op committed");
    let now = net.now;
    net.node_mut("a")
        .propose_membership(now, MembershipChange::AddLearner(pid("d")))
        .expect("allowed once an entry of the term is committed");
}

#[test]
fn removed_follower_no_longer_counts_towards_the_quorum() {
    let mut net = Net::new(&["a", "b", "c", "d"], cfg());
    net.elect("a");
    net.run_for(HEARTBEAT);
    let now = net.now;
    net.node_mut("a")
        .propose_membership(now, MembershipChange::Remove(pid("d")))
        .unwrap();
    net.deliver_all();
    assert_eq!(net.node("a").membership(), &voters(&["a", "b", "c"]));

    // a and b are no majority of {a, b, c, d}, but they are one of {a, b, c}.
    net.isolate("c");
    net.isolate("d");
    let now = net.now;
    let (index, _) = net.node_mut("a").propose(now, cmd("x")).unwrap();
    net.deliver_all();
    assert_eq!(net.node("a").commit_index(), index);
}

#[test]
fn removed_follower_stops_receiving_messages() {
    let mut net = settled(cfg());
    let now = net.now;
    net.node_mut("a")
        .propose_membership(now, MembershipChange::Remove(pid("c")))
        .unwrap();
    net.deliver_all();
    assert_eq!(net.node("a").membership(), &voters(&["a", "b"]));
    assert_eq!(net.node("a").match_index(&pid("c")), None);

    net.sent.clear();
    let now = net.now;
    net.node_mut("a").propose(now, cmd("x")).unwrap();
    net.run_for(3 * HEARTBEAT);
    let from_a_to_c = net
        .sent
        .iter()
        .filter(|m| m.from.as_str() == "a" && m.to.as_str() == "c")
        .count();
    assert_eq!(from_a_to_c, 0);
    assert!(net
        .sent
        .iter()
        .any(|m| m.from.as_str() == "a" && m.to.as_str() == "b"));
}

#[test]
fn removed_follower_cannot_disrupt_the_cluster() {
    let mut net = settled(cfg());
    let now = net.now;
    net.node_mut("a")
        .propose_membership(now, MembershipChange::Remove(pid("c")))
        .unwrap();
    net.deliver_all();
    let term = net.node("a").term();
    net.run_for(10 * ELECTION);
    assert_eq!(net.node("a").role(), Role::Leader);
    assert_eq!(net.node("a").term(), term);
    assert_eq!(net.node("b").term(), term);
}

#[test]
fn leader_removing_itself_steps_down_once_the_change_commits_and_never_campaigns_again() {
    let mut net = settled(cfg());
    let now = net.now;
    let term = net.node("a").term();
    net.node_mut("a")
        .propose_membership(now, MembershipChange::Remove(pid("a")))
        .unwrap();
    net.drain("a");
    assert_eq!(
        net.node("a").role(),
        Role::Leader,
        "still leading while the change is uncommitted"
    );
    net.deliver_all();
    assert_ne!(net.node("a").role(), Role::Leader);
    assert!(!net.node("a").membership().contains(&pid("a")));
    let leader = net.leader().expect("a successor took over");
    assert_ne!(leader.as_str(), "a");
    assert_eq!(net.node(leader.as_str()).term(), term + 1);

    net.sent.clear();
    net.run_for(10 * ELECTION);
    assert_eq!(net.node("a").role(), Role::Follower);
    let campaigned = net
        .sent
        .iter()
        .any(|m| m.from.as_str() == "a" && matches!(m.body, MessageBody::RequestVote { .. }));
    assert!(!campaigned, "the removed leader campaigned");
    assert_eq!(net.leader(), Some(leader));
}

#[test]
fn follower_that_truncates_an_uncommitted_membership_entry_reverts_to_the_previous_configuration() {
    let ids = ["a", "b", "c"];
    let mut with_d = voters(&ids);
    with_d.learners.insert(pid("d"));
    let mut log = entries(&[(1, 1)]);
    log.push(Entry {
        term: 1,
        index: 2,
        payload: EntryPayload::Membership(Box::new(with_d.clone())),
    });
    let mut b = restored_node("b", persisted(&ids, 1, log));
    assert_eq!(b.latest_membership(), &with_d);
    assert_eq!(b.membership(), &voters(&ids), "not committed: not in force");

    // The leader of term 2 never had that entry.
    b.step(10, msg("c", "b", 2, append((1, 1), entries(&[(2, 2)]), 1)));
    assert_eq!(b.term_at(2), Some(2));
    assert_eq!(b.latest_membership(), &voters(&ids));
    assert_eq!(b.membership(), &voters(&ids));
}

#[test]
fn leader_heartbeat_commit_never_exceeds_what_the_follower_is_known_to_hold() {
    let mut net = settled(cfg());
    net.isolate("c");
    let now = net.now;
    let (index, _) = net.node_mut("a").propose(now, cmd("x")).unwrap();
    net.deliver_all();
    assert_eq!(net.node("a").commit_index(), index);
    let c_match = net.node("a").match_index(&pid("c")).unwrap();
    assert!(c_match < index);
    net.sent.clear();
    net.tick_all(HEARTBEAT);
    net.drain_all();
    let to_c: Vec<LogIndex> = net
        .sent
        .iter()
        .filter(|m| m.to.as_str() == "c")
        .filter_map(|m| match m.body {
            MessageBody::Heartbeat { commit, .. } => Some(commit),
            _ => None,
        })
        .collect();
    assert!(!to_c.is_empty());
    assert!(to_c.iter().all(|&commit| commit <= c_match), "{to_c:?}");
}

/// The latest configuration in the log decides quorums from the moment it is appended (the Raft
/// dissertation's rule, §4.1: a restarted peer whose commit index restarts at its snapshot cannot fall back
/// to an older configuration); `membership()` reports it as agreed only once it is committed.
#[test]
fn membership_change_counts_from_append_and_is_reported_once_committed() {
    let mut net = settled(cfg());
    let now = net.now;
    let (index, _) = net
        .node_mut("a")
        .propose_membership(now, MembershipChange::Remove(pid("c")))
        .unwrap();
    let a = net.node("a");
    assert_eq!(a.membership(), &voters(&["a", "b", "c"]), "committed: old");
    assert_eq!(a.latest_membership(), &voters(&["a", "b"]), "latest: new");

    // Only c acknowledges. Under the old {a, b, c}, a and c would be a majority; under the new {a, b},
    // which is already the one that counts, they are not: nothing commits.
    net.isolate("b");
    net.deliver_all();
    assert!(net.node("a").commit_index() < index);
    assert_eq!(net.node("a").membership(), &voters(&["a", "b", "c"]));

    // Once b acknowledges, the change commits and is reported as agreed.
    net.heal();
    net.run_for(200);
    let a = net.node("a");
    assert!(a.commit_index() >= index);
    assert_eq!(a.membership(), &voters(&["a", "b"]));
}

// ---------------------------------------------------------------------------------------------------
// Leadership transfer

#[test]
fn transfer_to_an_up_to_date_follower_sends_it_timeout_now() {
    let mut net = settled(cfg());
    let now = net.now;
    let term = net.node("a").term();
    net.node_mut("a")
        .transfer_leadership(now, pid("b"))
        .unwrap();
    let ready = net.drain("a");
    let timeout_now: Vec<&Message> = ready
        .messages
        .iter()
        .filter(|m| m.body == MessageBody::TimeoutNow)
        .collect();
    assert_eq!(timeout_now.len(), 1);
    assert_eq!(timeout_now[0].to, pid("b"));
    assert_eq!(timeout_now[0].term, term);
}

#[test]
fn transfer_target_campaigns_at_once_without_pre_vote_and_with_the_transfer_flag() {
    let mut net = settled(cfg());
    let now = net.now;
    let term = net.node("a").term();
    let last = net.node("b").last_index();
    net.node_mut("a")
        .transfer_leadership(now, pid("b"))
        .unwrap();
    let timeout_now = net
        .take_queue()
        .into_iter()
        .find(|m| m.body == MessageBody::TimeoutNow)
        .unwrap();
    net.deliver(timeout_now);
    assert_eq!(net.node("b").role(), Role::Candidate);
    let ready = net.drain("b");
    assert_eq!(
        ready.hard_state,
        Some(HardState {
            term: term + 1,
            voted_for: Some(pid("b"))
        })
    );
    assert_eq!(
        vote_requests(&ready.messages),
        vec![
            (pid("a"), term + 1, false, true, last, term),
            (pid("c"), term + 1, false, true, last, term)
        ]
    );
}

#[test]
fn transfer_target_wins_although_the_other_followers_are_within_their_lease() {
    let mut net = settled(cfg());
    let now = net.now;
    let term = net.node("a").term();
    net.node_mut("a")
        .transfer_leadership(now, pid("b"))
        .unwrap();
    net.deliver_all(); // no time passes: c heard from a just now
    assert_eq!(net.node("b").role(), Role::Leader);
    assert_eq!(net.node("b").term(), term + 1);
    assert_eq!(net.node("a").role(), Role::Follower);
    assert_eq!(net.node("c").leader_id(), Some(&pid("b")));
}

#[test]
fn transfer_to_a_lagging_follower_catches_it_up_before_timeout_now() {
    let mut net = settled(cfg());
    net.isolate("c");
    let now = net.now;
    for i in 0..3 {
        net.node_mut("a")
            .propose(now, cmd(&format!("{i}")))
            .unwrap();
    }
    net.deliver_all();
    let last = net.node("a").last_index();
    let term = net.node("a").term();
    assert!(net.node("c").last_index() < last);
    net.heal();

    net.node_mut("a")
        .transfer_leadership(now, pid("c"))
        .unwrap();
    let ready = net.drain("a");
    assert!(
        ready
            .messages
            .iter()
            .all(|m| m.body != MessageBody::TimeoutNow),
        "c is behind: no TimeoutNow yet"
    );
    net.delivered.clear();
    net.run_for(ELECTION / 2);

    let timeout_at = net
        .delivered
        .iter()
        .position(|m| m.to.as_str() == "c" && m.body == MessageBody::TimeoutNow)
        .expect("TimeoutNow sent once c caught up");
    let caught_up = net.delivered[..timeout_at].iter().any(|m| {
        m.to.as_str() == "c"
            && matches!(&m.body, MessageBody::AppendEntries { entries, .. }
                if entries.last().is_some_and(|e| e.index == last))
    });
    assert!(caught_up, "c got the last entry before TimeoutNow");
    assert_eq!(net.node("c").role(), Role::Leader);
    assert_eq!(net.node("c").term(), term + 1);
}

#[test]
fn proposals_are_refused_while_a_transfer_is_in_progress() {
    let mut net = settled(cfg());
    net.isolate("c");
    let now = net.now;
    net.node_mut("a").propose(now, cmd("x")).unwrap();
    net.deliver_all();
    let a = net.node_mut("a");
    a.transfer_leadership(now, pid("c")).unwrap();
    assert_eq!(a.propose(now, cmd("y")), Err(RaftError::TransferInProgress));
    assert_eq!(
        a.propose_membership(now, MembershipChange::AddLearner(pid("d"))),
        Err(RaftError::TransferInProgress)
    );
}

#[test]
fn transfer_that_does_not_complete_within_an_election_timeout_is_abandoned() {
    let mut net = settled(cfg());
    net.isolate("c");
    let now = net.now;
    net.node_mut("a").propose(now, cmd("x")).unwrap();
    net.deliver_all();
    net.node_mut("a")
        .transfer_leadership(now, pid("c"))
        .unwrap();
    for t in 1..=ELECTION {
        net.tick("a", now + t);
        net.deliver_all();
    }
    assert_eq!(net.node("a").role(), Role::Leader);
    let now = net.now;
    net.node_mut("a")
        .propose(now, cmd("y"))
        .expect("proposals accepted again");
}

#[test]
fn transfer_to_a_non_voter_is_refused() {
    let mut net = with_learner();
    let now = net.now;
    let a = net.node_mut("a");
    assert_eq!(
        a.transfer_leadership(now, pid("d")),
        Err(RaftError::InvalidTransferTarget(pid("d")))
    );
    assert_eq!(
        a.transfer_leadership(now, pid("a")),
        Err(RaftError::InvalidTransferTarget(pid("a")))
    );
    assert_eq!(
        a.transfer_leadership(now, pid("zz")),
        Err(RaftError::InvalidTransferTarget(pid("zz")))
    );
    a.propose(now, cmd("x"))
        .expect("a refused transfer leaves proposals open");
}

// ---------------------------------------------------------------------------------------------------
// ReadIndex

#[test]
fn leader_read_index_is_answered_only_after_a_majority_confirms_leadership() {
    let mut net = settled(cfg());
    let now = net.now;
    let commit = net.node("a").commit_index();
    net.node_mut("a").read_index(now, 7).unwrap();
    let ready = net.drain("a");
    net.queue.clear();
    assert!(ready.read_states.is_empty(), "not before a heartbeat round");
    let rounds: Vec<(PeerId, u64)> = ready
        .messages
        .iter()
        .filter_map(|m| match m.body {
            MessageBody::Heartbeat { read_seq, .. } => Some((m.to.clone(), read_seq)),
            _ => None,
        })
        .collect();
    assert_eq!(rounds.len(), 2, "a confirmation round to each follower");
    let seq = rounds[0].1;
    assert!(seq > 0 && rounds.iter().all(|r| r.1 == seq));

    let to_b = ready
        .messages
        .iter()
        .find(|m| m.to.as_str() == "b")
        .unwrap()
        .clone();
    net.deliver(to_b);
    let answer = net.drain("b").messages;
    net.queue.clear();
    assert!(net.drain("a").read_states.is_empty());
    net.deliver(answer[0].clone());
    assert_eq!(
        net.drain("a").read_states,
        vec![ReadState {
            ctx: 7,
            index: Some(commit)
        }]
    );
}

#[test]
fn single_peer_leader_answers_read_index_immediately() {
    let mut net = Net::new(&["a"], cfg());
    net.elect("a");
    let now = net.now;
    let commit = net.node("a").commit_index();
    net.node_mut("a").read_index(now, 5).unwrap();
    assert_eq!(
        net.drain("a").read_states,
        vec![ReadState {
            ctx: 5,
            index: Some(commit)
        }]
    );
}

#[test]
fn new_leader_defers_reads_until_it_commits_an_entry_of_its_term() {
    let mut net = Net::new(&["a", "b", "c"], cfg());
    let deadline = net.node("a").next_deadline_ms();
    net.tick("a", deadline);
    net.deliver_all_with(|m| (!matches!(m.body, MessageBody::AppendEntries { .. })).then_some(m));
    assert_eq!(net.node("a").role(), Role::Leader);
    assert_eq!(net.node("a").commit_index(), 0);
    let now = net.now;
    net.node_mut("a").read_index(now, 3).unwrap();
    let ready = net.drain("a");
    assert!(ready.read_states.is_empty());
    assert!(
        ready
            .messages
            .iter()
            .all(|m| !matches!(m.body, MessageBody::Heartbeat { read_seq, .. } if read_seq > 0)),
        "no confirmation round before the no-op commits"
    );

    net.run_for(4 * HEARTBEAT);
    let states = net.read_states[&pid("a")].clone();
    assert_eq!(states.len(), 1);
    assert_eq!(states[0].ctx, 3);
    let index = states[0].index.expect("answered");
    assert!(index >= 1, "at least the no-op of the term");
    assert_eq!(net.node("a").term_at(index), Some(net.node("a").term()));
}

#[test]
fn follower_read_index_is_forwarded_to_the_leader_and_answered() {
    let mut net = settled(cfg());
    let now = net.now;
    let commit = net.node("a").commit_index();
    net.node_mut("b").read_index(now, 9).unwrap();
    let ready = net.drain("b");
    assert_eq!(
        ready
            .messages
            .iter()
            .map(|m| (m.to.clone(), m.body.clone()))
            .collect::<Vec<_>>(),
        vec![(pid("a"), MessageBody::ReadIndexRequest { ctx: 9 })]
    );
    net.deliver_all();
    assert_eq!(
        net.read_states[&pid("b")],
        vec![ReadState {
            ctx: 9,
            index: Some(commit)
        }]
    );
}

#[test]
fn follower_without_a_known_leader_refuses_read_index() {
    let mut b = genesis_node("b", &["a", "b", "c"], 2);
    assert_eq!(
        b.read_index(0, 1),
        Err(RaftError::NotLeader { leader: None })
    );
}

#[test]
fn leader_stepping_down_answers_pending_reads_with_no_index() {
    let mut net = settled(cfg());
    let now = net.now;
    let term = net.node("a").term();
    net.node_mut("a").read_index(now, 5).unwrap();
    net.node_mut("b").read_index(now, 6).unwrap();
    let forwarded = net
        .take_queue()
        .into_iter()
        .find(|m| m.body == MessageBody::ReadIndexRequest { ctx: 6 })
        .unwrap();
    net.deliver(forwarded);
    net.take_queue(); // confirmation rounds lost

    // A leader of a later term shows up.
    net.deliver(msg("c", "a", term + 1, heartbeat(0, 0)));
    assert_eq!(net.node("a").role(), Role::Follower);
    let ready = net.drain("a");
    assert_eq!(
        ready.read_states,
        vec![ReadState {
            ctx: 5,
            index: None
        }]
    );
    assert!(ready.messages.iter().any(|m| m.to.as_str() == "b"
        && m.body
            == MessageBody::ReadIndexResponse {
                ctx: 6,
                index: None
            }));
}

// ---------------------------------------------------------------------------------------------------
// Snapshots

#[test]
fn compact_drops_the_applied_log_prefix() {
    let mut net = settled(cfg());
    let now = net.now;
    for i in 0..5 {
        net.node_mut("a")
            .propose(now, cmd(&format!("{i}")))
            .unwrap();
    }
    net.deliver_all();
    let a = net.node_mut("a");
    let (applied, last) = (a.applied_index(), a.last_index());
    assert_eq!(applied, 6);
    let term = a.term_at(4).unwrap();
    a.compact(4, cmd("state@4")).unwrap();
    assert_eq!(a.snapshot_index(), 4);
    assert_eq!(a.term_at(4), Some(term), "the snapshot keeps its last term");
    assert_eq!(a.term_at(3), None, "the prefix is gone");
    assert_eq!(a.last_index(), last);
    assert_eq!(a.term_at(5), Some(term));
}

#[test]
fn compaction_would_strand_a_follower_that_keeps_up_but_was_not_sent_the_entries() {
    // One append in flight per follower: `c`'s window stays full while its answer is held back.
    let mut net = settled(cfg_with(|l| l.max_inflight_appends = 1));
    let now = net.now;
    let mut held = Vec::new();
    let mut hold_c = |m: Message| {
        if m.from == pid("c") {
            held.push(m);
            None
        } else {
            Some(m)
        }
    };
    net.node_mut("a").propose(now, cmd("x1")).unwrap();
    net.deliver_all_with(&mut hold_c);
    let (x2, _) = net.node_mut("a").propose(now, cmd("x2")).unwrap();
    net.deliver_all_with(&mut hold_c);
    let a = net.node("a");
    assert_eq!(a.applied_index(), x2, "committed with b alone");
    assert!(
        a.compaction_would_strand(x2),
        "c was sent x1 but not x2 (its window is full): compacting x2 would leave it a snapshot"
    );
    assert!(
        !a.compaction_would_strand(x2 - 1),
        "c was sent everything up to x1"
    );
    // c's answer arrives: the leader sends it x2, and compacting x2 strands nobody.
    for m in held {
        net.deliver(m);
    }
    net.deliver_all();
    assert!(!net.node("a").compaction_would_strand(x2));
    assert!(
        !net.node("b").compaction_would_strand(x2),
        "only a leader sends entries"
    );

    // A follower not heard from for a check-quorum period does not hold compaction back.
    net.isolate("c");
    net.run_for(3 * ELECTION);
    let now = net.now;
    let (x3, _) = net.node_mut("a").propose(now, cmd("x3")).unwrap();
    net.deliver_all();
    let a = net.node("a");
    assert_eq!(a.applied_index(), x3);
    assert!(!a.compaction_would_strand(x3), "c is gone, not keeping up");
}

#[test]
fn compaction_beyond_the_applied_index_or_not_past_the_snapshot_is_refused() {
    let mut net = settled(cfg());
    let now = net.now;
    let a = net.node_mut("a");
    let (last, _) = a.propose(now, cmd("x")).unwrap();
    let applied = a.applied_index();
    assert!(applied < last);
    assert_eq!(
        a.compact(last, cmd("s")),
        Err(RaftError::InvalidCompaction {
            index: last,
            applied,
            snapshot: 0
        })
    );
    a.compact(applied, cmd("s")).unwrap();
    assert_eq!(
        a.compact(applied, cmd("s")),
        Err(RaftError::InvalidCompaction {
            index: applied,
            applied,
            snapshot: applied
        }),
        "compaction must move forward"
    );
    assert_eq!(a.snapshot_index(), applied);
}

/// A settled cluster (`a` leads, snapshot chunks of 4 bytes) with a new learner `d` that hears nothing,
/// and three commands applied on the others since it was added.
fn deaf_learner_d_behind_three_commands() -> Net {
    let mut net = settled(cfg_with(|l| {
        l.snapshot_chunk_bytes = 4;
    }));
    net.add_node("d", PersistedState::default());
    net.drop_messages_to("d");
    let now = net.now;
    net.node_mut("a")
        .propose_membership(now, MembershipChange::AddLearner(pid("d")))
        .unwrap();
    net.deliver_all();
    for i in 0..3 {
        net.node_mut("a")
            .propose(now, cmd(&format!("{i}")))
            .unwrap();
    }
    net.deliver_all();
    net
}

#[test]
fn the_snapshot_buffer_is_handed_over_only_when_unique_and_nothing_is_sent_from_it_meanwhile() {
    let mut net = deaf_learner_d_behind_three_commands();
    let first = net.node("a").applied_index();
    let held = Bytes::from(b"0123456789".to_vec());
    let a = net.node_mut("a");
    a.compact(first, held.clone()).unwrap();
    assert_eq!(a.take_snapshot_buffer(), None, "someone else holds it");
    assert_eq!(a.snapshot().data, held, "and it is left as it was");
    drop(held);
    assert_eq!(
        a.take_snapshot_buffer().as_deref(),
        Some(&b"0123456789"[..])
    );
    assert_eq!(a.take_snapshot_buffer(), None, "handed over once");

    // d needs the snapshot, but nothing is sent from a buffer being written over.
    net.heal();
    net.delivered.clear();
    net.run_for(5 * HEARTBEAT);
    let install = |b: &MessageBody| matches!(b, MessageBody::InstallSnapshot { .. });
    assert!(net.delivered_to("d", install).is_empty());

    // The next compaction ends that: d gets the new snapshot.
    let now = net.now;
    net.node_mut("a").propose(now, cmd("3")).unwrap();
    net.deliver_all();
    let second = net.node("a").applied_index();
    assert!(second > first);
    net.node_mut("a")
        .compact(second, Bytes::from(b"abcdef".to_vec()))
        .unwrap();
    net.run_for(5 * HEARTBEAT);
    let sent: Vec<LogIndex> = net
        .delivered_to("d", install)
        .iter()
        .map(|m| match &m.body {
            MessageBody::InstallSnapshot { meta, .. } => meta.last_index,
            _ => unreachable!(),
        })
        .collect();
    assert_eq!(sent, vec![second, second]);
}

#[test]
fn peer_behind_the_snapshot_receives_it_in_chunks_and_restores_it() {
    let mut net = deaf_learner_d_behind_three_commands();
    let snap_index = net.node("a").applied_index();
    let snap_term = net.node("a").term_at(snap_index).unwrap();
    net.node_mut("a")
        .compact(snap_index, Bytes::from_static(b"0123456789"))
        .unwrap();

    net.heal();
    net.delivered.clear();
    net.run_for(5 * HEARTBEAT);

    let chunks: Vec<(u64, usize, bool, LogIndex)> = net
        .delivered_to("d", |b| matches!(b, MessageBody::InstallSnapshot { .. }))
        .iter()
        .map(|m| match &m.body {
            MessageBody::InstallSnapshot {
                meta,
                offset,
                data,
                done,
            } => (*offset, data.len(), *done, meta.last_index),
            _ => unreachable!(),
        })
        .collect();
    assert_eq!(
        chunks,
        vec![
            (0, 4, false, snap_index),
            (4, 4, false, snap_index),
            (8, 2, true, snap_index)
        ]
    );

    let mut expected_membership = voters(&["a", "b", "c"]);
    expected_membership.learners.insert(pid("d"));
    assert_eq!(
        net.restored[&pid("d")],
        vec![Snapshot {
            meta: SnapshotMeta {
                last_index: snap_index,
                last_term: snap_term,
                membership: expected_membership.clone()
            },
            data: Bytes::from_static(b"0123456789")
        }]
    );
    let d = net.node("d");
    assert_eq!(d.snapshot_index(), snap_index);
    assert!(d.commit_index() >= snap_index);
    assert_eq!(d.last_index(), net.node("a").last_index());
    assert_eq!(d.membership(), &expected_membership);
    assert!(
        net.applied[&pid("d")].iter().all(|e| e.index > snap_index),
        "entries covered by the snapshot are not applied again"
    );
}

fn learner_snapshot_meta() -> SnapshotMeta {
    let mut membership = voters(&["a", "b", "c"]);
    membership.learners.insert(pid("d"));
    SnapshotMeta {
        last_index: 10,
        last_term: 2,
        membership,
    }
}

fn snapshot_responses(msgs: &[Message]) -> Vec<(LogIndex, Term, u64, bool)> {
    msgs.iter()
        .filter_map(|m| match m.body {
            MessageBody::SnapshotResponse {
                last_index,
                last_term,
                next_offset,
                done,
            } => Some((last_index, last_term, next_offset, done)),
            _ => None,
        })
        .collect()
}

#[test]
fn out_of_order_snapshot_chunk_is_refused_with_the_expected_offset() {
    let meta = learner_snapshot_meta();
    let mut d = restored_node("d", PersistedState::default());
    d.step(10, msg("a", "d", 3, chunk(&meta, 4, b"efgh", false)));
    d.step(10, msg("a", "d", 3, chunk(&meta, 0, b"abcd", false)));
    d.step(10, msg("a", "d", 3, chunk(&meta, 8, b"ij", true)));
    let ready = d.take_ready();
    assert_eq!(
        snapshot_responses(&ready.messages),
        vec![(10, 2, 0, false), (10, 2, 4, false), (10, 2, 4, false)]
    );
    assert!(ready.snapshot.is_none());
    assert_eq!(d.snapshot_index(), 0);
    assert_eq!(d.commit_index(), 0);
}

#[test]
fn completed_snapshot_is_restored_and_moves_commit_applied_and_membership() {
    let meta = learner_snapshot_meta();
    let mut d = restored_node("d", PersistedState::default());
    d.step(10, msg("a", "d", 3, chunk(&meta, 0, b"abcd", false)));
    d.step(10, msg("a", "d", 3, chunk(&meta, 4, b"efgh", false)));
    assert!(d.take_ready().snapshot.is_none(), "incomplete");
    d.step(10, msg("a", "d", 3, chunk(&meta, 8, b"ij", true)));
    let ready = d.take_ready();
    assert_eq!(
        ready.snapshot,
        Some(Snapshot {
            meta: meta.clone(),
            data: Bytes::from_static(b"abcdefghij")
        })
    );
    assert_eq!(snapshot_responses(&ready.messages), vec![(10, 2, 0, true)]);
    assert!(ready.committed.is_empty(), "the snapshot replaces applying");
    assert_eq!(d.commit_index(), 10);
    assert_eq!(d.applied_index(), 10);
    assert_eq!(d.snapshot_index(), 10);
    assert_eq!(d.last_index(), 10);
    assert_eq!(d.term_at(10), Some(2));
    assert_eq!(d.membership(), &meta.membership);
    assert_eq!(d.term(), 3);
    assert_eq!(d.leader_id(), Some(&pid("a")));
}

#[test]
fn snapshot_matching_the_follower_log_keeps_the_entries_after_it() {
    let ids = ["a", "b", "c"];
    let log = entries(&(1..=6).map(|i| (i, 1)).collect::<Vec<_>>());
    let mut b = restored_node("b", persisted(&ids, 1, log));
    let meta = SnapshotMeta {
        last_index: 3,
        last_term: 1,
        membership: voters(&ids),
    };
    b.step(10, msg("a", "b", 1, chunk(&meta, 0, b"s", true)));
    let ready = b.take_ready();
    assert!(ready.snapshot.is_some());
    assert_eq!(ready.entries_from, None, "no durable entry is dropped");
    assert_eq!(b.snapshot_index(), 3);
    assert_eq!(b.commit_index(), 3);
    assert_eq!(b.last_index(), 6);
    assert_eq!(b.term_at(5), Some(1));
}

#[test]
fn snapshot_conflicting_with_the_follower_log_replaces_the_whole_log() {
    let ids = ["a", "b", "c"];
    let log = entries(&(1..=6).map(|i| (i, 1)).collect::<Vec<_>>());
    let mut b = restored_node("b", persisted(&ids, 1, log));
    let meta = SnapshotMeta {
        last_index: 3,
        last_term: 2,
        membership: voters(&ids),
    };
    b.step(10, msg("a", "b", 2, chunk(&meta, 0, b"s", true)));
    let ready = b.take_ready();
    assert!(ready.snapshot.is_some());
    assert_eq!(ready.entries_from, Some(4), "drop the durable log after it");
    assert!(ready.entries.is_empty());
    assert_eq!(b.last_index(), 3);
    assert_eq!(b.term_at(3), Some(2));
    assert_eq!(b.term_at(4), None);
}

// ---------------------------------------------------------------------------------------------------
// Restart

#[test]
fn restarted_peer_keeps_its_term_and_vote() {
    let mut net = Net::new(&["a", "b", "c"], cfg());
    net.deliver(msg("a", "b", 1, rv(false, false, 0, 0)));
    net.drain("b");
    net.queue.clear();

    net.restart("b");
    assert_eq!(net.node("b").term(), 1);
    net.deliver(msg("c", "b", 1, rv(false, false, 0, 0)));
    net.deliver(msg("a", "b", 1, rv(false, false, 0, 0)));
    let ready = net.drain("b");
    assert_eq!(
        vote_responses(&ready.messages),
        vec![(pid("c"), 1, false, false), (pid("a"), 1, false, true)],
        "no second vote in term 1 after a restart"
    );
}

#[test]
fn restarted_peer_keeps_its_log_and_relearns_the_commit_index() {
    let mut net = settled(cfg());
    let now = net.now;
    for i in 0..3 {
        net.node_mut("a")
            .propose(now, cmd(&format!("{i}")))
            .unwrap();
    }
    net.deliver_all();
    net.run_for(HEARTBEAT);
    let last = net.node("b").last_index();
    assert_eq!(last, 4);
    let before = net.applied[&pid("b")].clone();

    net.restart("b");
    assert_eq!(net.node("b").last_index(), last);
    assert_eq!(net.node("b").term(), net.node("a").term());
    net.run_for(2 * HEARTBEAT);
    assert_eq!(net.node("b").commit_index(), last);
    assert_eq!(
        net.applied[&pid("b")],
        before,
        "the state machine is rebuilt"
    );
}

// ---------------------------------------------------------------------------------------------------
// Bad input

#[test]
fn message_addressed_to_another_peer_or_from_itself_is_ignored() {
    let mut b = genesis_node("b", &["a", "b", "c"], 2);
    b.step(10, msg("a", "z", 5, heartbeat(0, 0)));
    b.step(10, msg("b", "b", 5, heartbeat(0, 0)));
    assert_eq!(b.term(), 0);
    assert_eq!(b.leader_id(), None);
    assert!(!b.has_ready());
}

#[test]
fn append_response_acknowledging_an_index_the_leader_never_had_is_ignored() {
    let mut net = settled(cfg());
    let now = net.now;
    let term = net.node("a").term();
    let (index, _) = net.node_mut("a").propose(now, cmd("x")).unwrap();
    net.take_queue();
    let before = net.node("a").match_index(&pid("b"));
    net.deliver(msg(
        "b",
        "a",
        term,
        MessageBody::AppendResponse {
            success: true,
            index: index + 100,
            hint_index: 0,
            hint_term: 0,
        },
    ));
    let a = net.node("a");
    assert_eq!(a.match_index(&pid("b")), before);
    assert!(a.commit_index() < index);
    assert!(net.drain("a").committed.is_empty());
}

#[test]
fn non_contiguous_entries_are_dropped_without_touching_the_log() {
    let mut b = restored_node(
        "b",
        persisted(&["a", "b", "c"], 1, entries(&[(1, 1), (2, 1)])),
    );
    b.step(
        10,
        msg("a", "b", 1, append((2, 1), entries(&[(3, 1), (5, 1)]), 0)),
    );
    b.step(10, msg("a", "b", 1, append((2, 1), entries(&[(4, 1)]), 0)));
    let ready = b.take_ready();
    assert_eq!(b.last_index(), 2);
    assert_eq!(ready.entries_from, None);
    assert!(append_responses(&ready.messages).iter().all(|r| !r.0));

    b.step(10, msg("a", "b", 1, append((2, 1), entries(&[(3, 1)]), 0)));
    assert_eq!(b.last_index(), 3, "the log still takes well-formed appends");
}

#[test]
fn invalid_config_is_rejected_naming_the_field() {
    let cases: Vec<(RaftConfig, &str)> = vec![
        (
            RaftConfig {
                heartbeat_interval_ms: 0,
                ..cfg()
            },
            "heartbeat_interval_ms",
        ),
        (
            RaftConfig {
                election_timeout_ms: 15,
                ..cfg()
            },
            "election_timeout_ms",
        ),
        (
            cfg_with(|l| {
                l.max_entries_per_append = 0;
            }),
            "max_entries_per_append",
        ),
        (
            cfg_with(|l| {
                l.max_inflight_appends = 0;
            }),
            "max_inflight_appends",
        ),
        (
            cfg_with(|l| {
                l.snapshot_chunk_bytes = 0;
            }),
            "snapshot_chunk_bytes",
        ),
        (
            cfg_with(|l| {
                l.max_snapshot_bytes = 0;
            }),
            "max_snapshot_bytes",
        ),
        (
            cfg_with(|l| {
                l.max_command_bytes = 2_000;
                l.max_uncommitted_bytes = 1_000;
            }),
            "max_command_bytes",
        ),
    ];
    for (config, field) in cases {
        let err = config.validate().unwrap_err();
        assert_eq!(err.field, field);
        assert!(err.to_string().contains(field), "{err}");
        match RaftNode::new(pid("a"), config, 1, 0, PersistedState::default()) {
            Ok(_) => panic!("RaftNode::new accepted an invalid `{field}`"),
            Err(RaftStartError::Config(e)) => assert_eq!(e.field, field),
            Err(other) => panic!("expected a config error for `{field}`, got {other}"),
        }
    }
}

/// A persisted log with a hole is refused with a typed error (a store lost entries), never a panic.
#[test]
fn a_persisted_log_with_a_hole_is_a_typed_error() {
    let mut state = persisted(&["a", "b", "c"], 2, vec![]);
    state.entries = vec![
        Entry {
            index: 1,
            term: 1,
            payload: EntryPayload::Noop,
        },
        Entry {
            index: 3,
            term: 2,
            payload: EntryPayload::Noop,
        },
    ];
    match RaftNode::new(pid("a"), RaftConfig::default(), 1, 0, state) {
        Err(RaftStartError::LogNotContiguous { expected, found }) => {
            assert_eq!((expected, found), (2, 3))
        }
        Err(other) => panic!("expected LogNotContiguous, got {other}"),
        Ok(_) => panic!("a log with a hole was accepted"),
    }
}

/// A restarted peer's persisted commit mark makes its entries committed again (so they are applied
/// before anything is served), clamped to the log it holds.
#[test]
fn the_persisted_commit_mark_is_restored_and_clamped() {
    let log: Vec<Entry> = (1..=5)
        .map(|index| Entry {
            index,
            term: 1,
            payload: EntryPayload::Noop,
        })
        .collect();
    let mut state = persisted(&["a", "b", "c"], 1, log);
    state.committed = 3;
    let mut node = RaftNode::new(pid("a"), RaftConfig::default(), 1, 0, state.clone()).unwrap();
    assert_eq!(node.commit_index(), 3);
    let ready = node.take_ready();
    assert_eq!(
        ready.committed.iter().map(|e| e.index).collect::<Vec<_>>(),
        vec![1, 2, 3],
        "the committed prefix is handed out to apply"
    );
    state.committed = 99;
    let node = RaftNode::new(pid("a"), RaftConfig::default(), 1, 0, state).unwrap();
    assert_eq!(node.commit_index(), 5);
}

// ---------------------------------------------------------------------------------------------------
// Terms and roles

#[test]
fn leader_steps_down_when_a_peer_answers_with_a_higher_term() {
    let mut net = settled(cfg());
    let term = net.node("a").term();
    net.deliver(msg(
        "b",
        "a",
        term + 5,
        MessageBody::AppendResponse {
            success: false,
            index: 0,
            hint_index: 0,
            hint_term: 0,
        },
    ));
    let a = net.node("a");
    assert_eq!(a.role(), Role::Follower);
    assert_eq!(a.term(), term + 5);
    assert_eq!(a.leader_id(), None);
}

#[test]
fn append_from_a_stale_leader_is_rejected_with_the_current_term() {
    let mut b = restored_node("b", persisted(&["a", "b", "c"], 3, entries(&[(1, 1)])));
    b.step(10, msg("a", "b", 2, append((1, 1), entries(&[(2, 2)]), 1)));
    let ready = b.take_ready();
    assert_eq!(ready.messages.len(), 1);
    assert_eq!(ready.messages[0].term, 3);
    assert!(!append_responses(&ready.messages)[0].0, "rejected");
    assert_eq!(b.last_index(), 1);
    assert_eq!(b.commit_index(), 0);
}

#[test]
fn candidate_receiving_an_append_from_a_leader_of_its_term_becomes_follower() {
    let mut a = genesis_node("a", &["a", "b", "c"], 1);
    let t = make_candidate(&mut a, &["b"]);
    a.step(t, msg("c", "a", 1, append((0, 0), entries(&[(1, 1)]), 0)));
    assert_eq!(a.role(), Role::Follower);
    assert_eq!(a.term(), 1);
    assert_eq!(a.leader_id(), Some(&pid("c")));
}

#[test]
fn proposal_to_a_follower_is_refused_naming_the_leader() {
    let mut net = settled(cfg());
    let now = net.now;
    assert_eq!(
        net.node_mut("b").propose(now, cmd("x")),
        Err(RaftError::NotLeader {
            leader: Some(pid("a"))
        })
    );
}

#[test]
fn proposals_beyond_max_uncommitted_entries_are_refused_as_busy() {
    let mut net = settled(cfg_with(|l| {
        l.max_uncommitted_entries = 3;
    }));
    net.isolate("b");
    net.isolate("c");
    let now = net.now;
    let a = net.node_mut("a");
    for i in 0..3 {
        a.propose(now, cmd(&format!("{i}"))).unwrap();
    }
    assert_eq!(a.propose(now, cmd("one too many")), Err(RaftError::Busy));
}

/// Votes are counted in the latest configuration in the log, so they must also be asked of its voters:
/// a peer whose log holds an uncommitted promotion of `d` asks `d` too (asking only the committed
/// configuration's voters left it one vote short forever; simulation seed 10169).
#[test]
fn candidate_asks_every_voter_of_the_latest_configuration() {
    let mut state = persisted(&["a", "b", "c"], 1, vec![]);
    state.entries = vec![Entry {
        term: 1,
        index: 1,
        payload: EntryPayload::Membership(Box::new(Membership::with_voters(
            ["a", "b", "c", "d"].into_iter().map(pid),
        ))),
    }];
    let mut net = Net::with_states(cfg(), vec![("a", state)]);
    net.run_for(3 * cfg().election_timeout_ms);
    let asked: BTreeSet<PeerId> = net
        .sent
        .iter()
        .filter(|m| matches!(m.body, MessageBody::RequestVote { .. }))
        .map(|m| m.to.clone())
        .collect();
    assert_eq!(asked, ["b", "c", "d"].into_iter().map(pid).collect());
}

/// A read index answered by the leader of an older term is still valid (that leader confirmed its
/// leadership after receiving the request), so a follower that moved on to a newer term meanwhile keeps
/// it instead of leaving the read unanswered (simulation seed 17833).
#[test]
fn follower_keeps_a_read_index_answered_in_an_older_term() {
    let mut net = settled(cfg());
    let now = net.now;
    let term = net.node("b").term();
    let commit = net.node("a").commit_index();
    net.node_mut("b").read_index(now, 9).unwrap();
    let mut held = Vec::new();
    net.deliver_all_with(|m| {
        if matches!(m.body, MessageBody::ReadIndexResponse { .. }) {
            held.push(m);
            None
        } else {
            Some(m)
        }
    });
    assert_eq!(held.len(), 1, "the leader answered");
    // b follows a new leader in a newer term before the answer arrives.
    net.deliver(msg(
        "c",
        "b",
        term + 1,
        MessageBody::Heartbeat {
            commit: 0,
            read_seq: 0,
        },
    ));
    assert_eq!(net.node("b").term(), term + 1);
    net.deliver(held.remove(0));
    net.drain("b");
    assert_eq!(
        net.read_states[&pid("b")],
        vec![ReadState {
            ctx: 9,
            index: Some(commit)
        }]
    );
}

/// A peer that has never had a configuration (an empty log: never founded a cluster nor received a
/// log, perhaps a member that lost its storage) grants no vote and no pre-vote, even to a candidate it
/// would otherwise find up to date. (Found by the whole-peer simulation: a removed peer with a stale log
/// was elected by such a peer's vote and then overwrote committed entries.)
#[test]
fn peer_without_a_configuration_grants_no_vote() {
    let mut net = Net::new(&["a", "b", "c"], cfg());
    net.add_node("d", PersistedState::default());
    for pre_vote in [true, false] {
        net.deliver(msg(
            "a",
            "d",
            5,
            MessageBody::RequestVote {
                pre_vote,
                transfer: false,
                last_log_index: 3,
                last_log_term: 2,
            },
        ));
        net.drain("d");
        let answer = net
            .queue
            .iter()
            .rev()
            .find(|m| m.from == pid("d") && matches!(m.body, MessageBody::VoteResponse { .. }))
            .cloned()
            .expect("d answers");
        assert_eq!(
            answer.body,
            MessageBody::VoteResponse {
                pre_vote,
                granted: false
            },
            "pre_vote {pre_vote}"
        );
        net.queue.clear();
    }
    // With a configuration, the same request is granted.
    net.deliver(msg(
        "a",
        "b",
        5,
        MessageBody::RequestVote {
            pre_vote: false,
            transfer: false,
            last_log_index: 3,
            last_log_term: 2,
        },
    ));
    net.drain("b");
    assert!(net.queue.iter().any(|m| m.from == pid("b")
        && m.body
            == MessageBody::VoteResponse {
                pre_vote: false,
                granted: true
            }));
}

/// A follower that no longer holds entries it acknowledged (its storage lost them) makes the leader
/// lower its match index and repair its log, instead of probing above what it has forever. (Found by
/// the whole-peer simulation as a message storm: one rejected append per round trip, without end.)
#[test]
fn leader_repairs_a_follower_that_lost_acknowledged_entries() {
    let mut net = settled(cfg());
    let now = net.now;
    for i in 0..5u8 {
        net.node_mut("a")
            .propose(now, Bytes::from(vec![i]))
            .unwrap();
    }
    net.deliver_all();
    net.run_for(2 * HEARTBEAT);
    let last = net.node("a").last_index();
    assert_eq!(net.node("a").match_index(&pid("c")), Some(last));
    // c comes back with only the genesis snapshot and the leader's first entry: it lost the rest.
    let kept: Vec<Entry> = net.storage[&pid("c")]
        .entries
        .iter()
        .filter(|e| e.index <= 1)
        .cloned()
        .collect();
    net.storage.get_mut(&pid("c")).unwrap().entries = kept;
    net.restart("c");
    let now = net.now;
    net.node_mut("a")
        .propose(now, Bytes::from_static(b"next"))
        .unwrap();
    let mut rounds = 0;
    while !net.queue.is_empty() || net.node("a").has_ready() {
        net.drain("a");
        let batch: Vec<Message> = net.queue.drain(..).collect();
        for m in batch {
            net.deliver(m);
        }
        for id in ["b", "c"] {
            net.drain(id);
        }
        rounds += 1;
        assert!(rounds < 50, "the leader keeps probing c without progress");
    }
    net.run_for(2 * HEARTBEAT);
    assert_eq!(net.node("c").last_index(), net.node("a").last_index());
    assert_eq!(
        net.node("a").match_index(&pid("c")),
        Some(net.node("a").last_index())
    );
}

// ---------------------------------------------------------------------------------------------------
// Background persistence at the leader (`persist_async`, the Raft dissertation §10.2.1)

fn async_cfg() -> RaftConfig {
    RaftConfig {
        persist_async: true,
        ..cfg()
    }
}

#[test]
fn with_persist_async_a_lone_leader_commits_only_what_its_driver_reported_durable() {
    let genesis = PersistedState::genesis(voters(&["a"]));
    let mut a = RaftNode::new(pid("a"), async_cfg(), 1, 0, genesis).unwrap();
    a.tick(1_000);
    assert_eq!(a.role(), Role::Leader);
    let (noop, term) = (a.last_index(), a.term());
    assert!(
        a.take_ready().committed.is_empty(),
        "its no-op is not durable yet"
    );
    a.on_persisted(noop, term + 1);
    assert!(
        a.take_ready().committed.is_empty(),
        "a report the log does not match is ignored"
    );
    a.on_persisted(noop, term);
    assert_eq!(indices(&a.take_ready().committed), vec![noop]);

    let (index, term) = a.propose(1_000, cmd("x")).unwrap();
    let ready = a.take_ready();
    assert_eq!(indices(&ready.entries), vec![index]);
    assert!(ready.committed.is_empty());
    a.on_persisted(index, term);
    assert_eq!(indices(&a.take_ready().committed), vec![index]);
}

#[test]
fn with_persist_async_the_leaders_unsynced_copy_does_not_count_toward_a_majority() {
    let mut net = settled(async_cfg());
    let now = net.now;
    let (index, term) = net.node_mut("a").propose(now, cmd("x")).unwrap();
    // Only b hears of the entry: b and the leader's unreported copy would be a majority, b alone is not.
    for m in net.take_queue() {
        if m.to == pid("b") {
            net.deliver(m);
        }
    }
    net.deliver_all_with(|m| (m.to == pid("a")).then_some(m));
    assert_eq!(net.node("a").match_index(&pid("b")), Some(index));
    assert!(net.node("a").commit_index() < index);
    net.node_mut("a").on_persisted(index, term);
    assert_eq!(net.node("a").commit_index(), index);
    assert_eq!(indices(&net.drain("a").committed), vec![index]);
}

#[test]
fn with_persist_async_two_followers_commit_without_the_leaders_report() {
    let mut net = settled(async_cfg());
    let now = net.now;
    let (index, _) = net.node_mut("a").propose(now, cmd("x")).unwrap();
    net.deliver_all();
    assert_eq!(net.node("a").commit_index(), index);
}

// ---------------------------------------------------------------------------------------------------
// Committed once held: with three voters, the leader's copy and the follower's are a majority

/// `committed_once_held` of every append to `to`.
fn held_promises(msgs: &[Message], to: &str) -> Vec<LogIndex> {
    msgs.iter()
        .filter(|m| m.to.as_str() == to)
        .filter_map(|m| match m.body {
            MessageBody::AppendEntries {
                committed_once_held,
                ..
            } => Some(committed_once_held),
            _ => None,
        })
        .collect()
}

fn heartbeats_in(msgs: &[Message]) -> usize {
    msgs.iter()
        .filter(|m| matches!(m.body, MessageBody::Heartbeat { .. }))
        .count()
}

#[test]
fn with_three_voters_a_follower_commits_an_entry_of_the_leaders_term_as_soon_as_it_holds_it() {
    let mut net = settled(cfg());
    let now = net.now;
    let (index, _) = net.node_mut("a").propose(now, cmd("x")).unwrap();
    let ready = net.drain("a");
    for f in ["b", "c"] {
        assert_eq!(held_promises(&ready.messages, f), vec![index], "to {f}");
    }
    deliver_only_first_to(&mut net, "b");
    let at_b = net.drain("b");
    assert_eq!(
        indices(&at_b.committed),
        vec![index],
        "b commits (and applies) on receipt"
    );
    assert_eq!(
        net.node("a").commit_index(),
        index - 1,
        "before the leader has counted any answer"
    );
    // The leader counts b's answer and commits; both followers know already: no commit notice.
    net.deliver_all_with(|m| (m.to == pid("a")).then_some(m));
    assert_eq!(net.node("a").commit_index(), index);
    assert_eq!(heartbeats_in(&net.drain("a").messages), 0);
}

#[test]
fn a_follower_does_not_commit_on_a_promise_for_an_entry_of_an_earlier_term() {
    // b holds entry 2 of term 1; a leader of term 2 (forged: no leader makes this promise) says it is
    // committed once held. Counting replicas commits only entries of the current term (§5.4.2).
    let mut b = restored_node("b", persisted(&["a", "b", "c"], 2, entries(&[(1, 1)])));
    b.step(
        0,
        msg(
            "a",
            "b",
            2,
            MessageBody::AppendEntries {
                prev_log_index: 1,
                prev_log_term: 1,
                entries: entries(&[(2, 1)]),
                leader_commit: 0,
                committed_once_held: 2,
            },
        ),
    );
    assert_eq!(b.last_index(), 2);
    assert_eq!(b.commit_index(), 0);
    assert_eq!(
        append_responses(&b.take_ready().messages),
        vec![(true, 2, 0, 0)]
    );
}

#[test]
fn with_five_voters_no_append_promises_a_commit() {
    let ids = ["a", "b", "c", "d", "e"];
    let mut net = Net::new(&ids, cfg());
    net.elect("a");
    net.run_for(HEARTBEAT);
    let now = net.now;
    net.node_mut("a").propose(now, cmd("x")).unwrap();
    let ready = net.drain("a");
    for f in &ids[1..] {
        assert_eq!(held_promises(&ready.messages, f), vec![0], "to {f}");
    }
}

#[test]
fn no_append_promises_a_commit_while_a_configuration_change_is_pending_or_to_a_learner() {
    let mut net = settled(cfg());
    net.add_node("d", PersistedState::default());
    let now = net.now;
    net.node_mut("a")
        .propose_membership(now, MembershipChange::AddLearner(pid("d")))
        .unwrap();
    net.node_mut("a").propose(now, cmd("x")).unwrap();
    let ready = net.drain("a");
    for f in ["b", "c", "d"] {
        assert!(
            held_promises(&ready.messages, f).iter().all(|p| *p == 0),
            "to {f} while the change is pending"
        );
    }
    net.deliver_all();
    net.run_for(2 * HEARTBEAT);
    assert!(net.node("a").membership().is_learner(&pid("d")));
    let now = net.now;
    let (index, _) = net.node_mut("a").propose(now, cmd("y")).unwrap();
    let ready = net.drain("a");
    assert_eq!(held_promises(&ready.messages, "b"), vec![index]);
    assert_eq!(
        held_promises(&ready.messages, "d"),
        vec![0],
        "d is no voter"
    );
}

#[test]
fn with_persist_async_an_append_promises_only_what_the_leader_holds_durably() {
    let mut net = settled(async_cfg());
    let now = net.now;
    let (first, term) = net.node_mut("a").propose(now, cmd("x")).unwrap();
    let ready = net.drain("a");
    assert!(
        held_promises(&ready.messages, "b")
            .iter()
            .all(|p| *p < first),
        "its copy of {first} is not durable yet"
    );
    deliver_only_first_to(&mut net, "b");
    assert!(net.node("b").commit_index() < first);
    net.node_mut("a").on_persisted(first, term);
    // The next append (window permitting) promises the first entry, now durable, but not itself.
    let (second, _) = net.node_mut("a").propose(now, cmd("y")).unwrap();
    let ready = net.drain("a");
    let promises = held_promises(&ready.messages, "c");
    assert!(promises.contains(&first), "{promises:?}");
    assert!(promises.iter().all(|p| *p < second), "{promises:?}");
}

#[test]
fn a_read_begins_no_lower_than_what_a_follower_may_have_committed_on_a_promise() {
    let mut net = settled(cfg());
    let now = net.now;
    let commit = net.node("a").commit_index();
    let (index, _) = net.node_mut("a").propose(now, cmd("x")).unwrap();
    net.drain("a");
    // b holds the entry and commits it on the promise; its answer is lost, c hears nothing.
    deliver_only_first_to(&mut net, "b");
    net.drain("b");
    net.queue.clear();
    assert_eq!(net.node("b").commit_index(), index);
    assert_eq!(net.node("a").commit_index(), commit);
    // A read at the leader now must see the write b may have answered.
    net.node_mut("a").read_index(now, 7).unwrap();
    net.drain("a");
    net.deliver_all_with(|m| {
        matches!(
            m.body,
            MessageBody::Heartbeat { .. } | MessageBody::HeartbeatResponse { .. }
        )
        .then_some(m)
    });
    assert_eq!(
        net.read_states.get(&pid("a")).cloned().unwrap_or_default(),
        vec![ReadState {
            ctx: 7,
            index: Some(index)
        }],
        "confirmed at the promised index, not at the commit index {commit}"
    );
}

// ---------------------------------------------------------------------------------------------------
// Who may campaign

#[test]
fn a_peer_whose_log_holds_its_own_uncommitted_removal_campaigns_commits_it_and_hands_over() {
    // The leader `a` appended b's removal, b stored it, and `a` lost it (a power cut before its sync).
    // a's log is shorter than b's, so b refuses it its vote; only b can be elected, although b is no
    // voter in its latest configuration.
    let removal = Entry {
        term: 1,
        index: 2,
        payload: EntryPayload::Membership(Box::new(voters(&["a"]))),
    };
    let a = persisted(&["a", "b"], 1, entries(&[(1, 1)]));
    let b = persisted(&["a", "b"], 1, vec![entries(&[(1, 1)])[0].clone(), removal]);
    let mut net = Net::with_states(cfg(), vec![("a", a), ("b", b)]);
    net.tick_until_leader(20 * ELECTION);
    net.run_for(4 * ELECTION);
    // b led (only it could win), replicated its log, committed its own removal and handed over.
    assert!(
        net.sent
            .iter()
            .any(|m| m.from == pid("b") && matches!(m.body, MessageBody::AppendEntries { .. })),
        "b never led"
    );
    assert_eq!(net.leader(), Some(pid("a")));
    assert_eq!(net.node("a").membership(), &voters(&["a"]));
    assert!(net.node("a").commit_index() >= 2);
    assert_eq!(net.node("b").role(), Role::Follower);
}
