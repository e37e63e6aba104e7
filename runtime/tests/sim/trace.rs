//! A bounded ring buffer of what happened, formatted only when printed.

use std::collections::VecDeque;
use std::fmt::Write as _;

use crate::raft::{Message, MessageBody, PeerId, Role, Term};

/// A cheap summary of a message (no payload copies).
#[derive(Clone, Debug)]
pub struct MsgSum {
    pub from: PeerId,
    pub to: PeerId,
    pub term: Term,
    pub text: MsgText,
}

/// The body of a message, reduced to numbers.
#[derive(Clone, Copy, Debug)]
pub enum MsgText {
    Vote {
        pre: bool,
        transfer: bool,
        last_index: u64,
        last_term: u64,
    },
    VoteResp {
        pre: bool,
        granted: bool,
    },
    Append {
        prev_index: u64,
        prev_term: u64,
        n: usize,
        first_term: u64,
        last_term: u64,
        commit: u64,
    },
    AppendResp {
        success: bool,
        index: u64,
        hint_index: u64,
        hint_term: u64,
    },
    Heartbeat {
        commit: u64,
        read_seq: u64,
    },
    HeartbeatResp {
        read_seq: u64,
    },
    Snap {
        last_index: u64,
        last_term: u64,
        offset: u64,
        len: usize,
        done: bool,
    },
    SnapResp {
        last_index: u64,
        last_term: u64,
        next_offset: u64,
        done: bool,
    },
    TimeoutNow,
    ReadReq {
        ctx: u64,
    },
    ReadResp {
        ctx: u64,
        index: Option<u64>,
    },
}

impl MsgSum {
    pub fn of(m: &Message) -> MsgSum {
        let text = match &m.body {
            MessageBody::RequestVote {
                pre_vote,
                transfer,
                last_log_index,
                last_log_term,
            } => MsgText::Vote {
                pre: *pre_vote,
                transfer: *transfer,
                last_index: *last_log_index,
                last_term: *last_log_term,
            },
            MessageBody::VoteResponse { pre_vote, granted } => MsgText::VoteResp {
                pre: *pre_vote,
                granted: *granted,
            },
            MessageBody::AppendEntries {
                prev_log_index,
                prev_log_term,
                entries,
                leader_commit,
                ..
            } => MsgText::Append {
                prev_index: *prev_log_index,
                prev_term: *prev_log_term,
                n: entries.len(),
                first_term: entries.first().map_or(0, |e| e.term),
                last_term: entries.last().map_or(0, |e| e.term),
                commit: *leader_commit,
            },
            MessageBody::AppendResponse {
                success,
                index,
                hint_index,
                hint_term,
            } => MsgText::AppendResp {
                success: *success,
                index: *index,
                hint_index: *hint_index,
                hint_term: *hint_term,
            },
            MessageBody::Heartbeat { commit, read_seq } => MsgText::Heartbeat {
                commit: *commit,
                read_seq: *read_seq,
            },
            MessageBody::HeartbeatResponse { read_seq } => MsgText::HeartbeatResp {
                read_seq: *read_seq,
            },
            MessageBody::InstallSnapshot {
                meta,
                offset,
                data,
                done,
            } => MsgText::Snap {
                last_index: meta.last_index,
                last_term: meta.last_term,
                offset: *offset,
                len: data.len(),
                done: *done,
            },
            MessageBody::SnapshotResponse {
                last_index,
                last_term,
                next_offset,
                done,
            } => MsgText::SnapResp {
                last_index: *last_index,
                last_term: *last_term,
                next_offset: *next_offset,
                done: *done,
            },
            MessageBody::TimeoutNow => MsgText::TimeoutNow,
            MessageBody::ReadIndexRequest { ctx } => MsgText::ReadReq { ctx: *ctx },
            MessageBody::ReadIndexResponse { ctx, index } => MsgText::ReadResp {
                ctx: *ctx,
                index: *index,
            },
        };
        MsgSum {
            from: m.from.clone(),
            to: m.to.clone(),
            term: m.term,
            text,
        }
    }
}

impl std::fmt::Display for MsgSum {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}->{} t{} ", self.from, self.to, self.term)?;
        match self.text {
            MsgText::Vote {
                pre,
                transfer,
                last_index,
                last_term,
            } => write!(
                f,
                "{}Vote{} last=({last_index},{last_term})",
                if pre { "Pre" } else { "" },
                if transfer { "(transfer)" } else { "" }
            ),
            MsgText::VoteResp { pre, granted } => write!(
                f,
                "{}VoteResp granted={granted}",
                if pre { "Pre" } else { "" }
            ),
            MsgText::Append {
                prev_index,
                prev_term,
                n,
                first_term,
                last_term,
                commit,
            } => write!(
                f,
                "Append prev=({prev_index},{prev_term}) n={n} terms={first_term}..{last_term} commit={commit}"
            ),
            MsgText::AppendResp {
                success,
                index,
                hint_index,
                hint_term,
            } => write!(
                f,
                "AppendResp ok={success} index={index} hint=({hint_index},{hint_term})"
            ),
            MsgText::Heartbeat { commit, read_seq } => {
                write!(f, "Heartbeat commit={commit} seq={read_seq}")
            }
            MsgText::HeartbeatResp { read_seq } => write!(f, "HeartbeatResp seq={read_seq}"),
            MsgText::Snap {
                last_index,
                last_term,
                offset,
                len,
                done,
            } => write!(
                f,
                "Snapshot ({last_index},{last_term}) off={offset} len={len} done={done}"
            ),
            MsgText::SnapResp {
                last_index,
                last_term,
                next_offset,
                done,
            } => write!(
                f,
                "SnapshotResp ({last_index},{last_term}) next={next_offset} done={done}"
            ),
            MsgText::TimeoutNow => write!(f, "TimeoutNow"),
            MsgText::ReadReq { ctx } => write!(f, "ReadIndexReq ctx={ctx}"),
            MsgText::ReadResp { ctx, index } => write!(f, "ReadIndexResp ctx={ctx} index={index:?}"),
        }
    }
}

/// What a trace line records.
#[derive(Clone, Debug)]
pub enum Ev {
    /// Sent (queued, lost or blocked at the sender).
    Send { msg: MsgSum, outcome: &'static str },
    /// Delivered to the receiver.
    Deliver { msg: MsgSum },
    /// Dropped at delivery time.
    DropAt { msg: MsgSum, why: &'static str },
    /// Role/term/leader change.
    Role {
        id: PeerId,
        role: Role,
        term: Term,
        leader: Option<PeerId>,
    },
    /// A durable write.
    Persist {
        id: PeerId,
        hard: Option<(Term, Option<PeerId>)>,
        snapshot: Option<(u64, u64)>,
        from: Option<u64>,
        n: usize,
        last: u64,
    },
    /// Applied a range of entries.
    Apply {
        id: PeerId,
        first: u64,
        last: u64,
        commit: u64,
    },
    /// Free text (faults, client operations, notes).
    Text(String),
}

impl std::fmt::Display for Ev {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ev::Send { msg, outcome } => write!(f, "send {msg} [{outcome}]"),
            Ev::Deliver { msg } => write!(f, "recv {msg}"),
            Ev::DropAt { msg, why } => write!(f, "drop {msg} [{why}]"),
            Ev::Role {
                id,
                role,
                term,
                leader,
            } => write!(f, "{id}: {role:?} term={term} leader={leader:?}"),
            Ev::Persist {
                id,
                hard,
                snapshot,
                from,
                n,
                last,
            } => {
                write!(f, "{id}: persist")?;
                if let Some((t, v)) = hard {
                    write!(f, " hard=(term {t}, vote {v:?})")?;
                }
                if let Some((i, t)) = snapshot {
                    write!(f, " snapshot=({i},{t})")?;
                }
                if let Some(from) = from {
                    write!(f, " log from {from} +{n}")?;
                }
                write!(f, " last={last}")
            }
            Ev::Apply {
                id,
                first,
                last,
                commit,
            } => write!(f, "{id}: apply {first}..={last} (commit {commit})"),
            Ev::Text(s) => f.write_str(s),
        }
    }
}

/// The ring buffer.
pub struct Trace {
    cap: usize,
    buf: VecDeque<(u64, Ev)>,
    dropped: u64,
    /// When set, message sends/deliveries are recorded too (they dominate the volume).
    pub messages: bool,
}

impl Trace {
    pub fn new(cap: usize, messages: bool) -> Trace {
        Trace {
            cap: cap.max(1),
            buf: VecDeque::new(),
            dropped: 0,
            messages,
        }
    }

    pub fn push(&mut self, now: u64, ev: Ev) {
        if self.buf.len() == self.cap {
            self.buf.pop_front();
            self.dropped += 1;
        }
        self.buf.push_back((now, ev));
    }

    pub fn text(&mut self, now: u64, s: String) {
        self.push(now, Ev::Text(s));
    }

    /// The last `n` lines, formatted.
    pub fn tail(&self, n: usize) -> Vec<String> {
        let skip = self.buf.len().saturating_sub(n);
        self.buf
            .iter()
            .skip(skip)
            .map(|(t, ev)| format!("[{t:>7}ms] {ev}"))
            .collect()
    }

    /// Everything still in the buffer, as one string.
    pub fn dump(&self) -> String {
        let mut out = String::new();
        if self.dropped > 0 {
            let _ = writeln!(
                out,
                "... {} earlier trace lines dropped (ring buffer full)",
                self.dropped
            );
        }
        for (t, ev) in &self.buf {
            let _ = writeln!(out, "[{t:>7}ms] {ev}");
        }
        out
    }
}
