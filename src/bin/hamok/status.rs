//! `STATUS`: one peer's view from [`Hamok::stats`], as `name:value` lines (like redis `INFO`).

use hamok::prelude::Hamok;

use crate::reply::Reply;

fn ids<'a>(ids: impl Iterator<Item = &'a hamok::prelude::PeerId>) -> String {
    ids.map(ToString::to_string).collect::<Vec<_>>().join(",")
}

/// The status lines of `hamok`.
pub fn status(hamok: &Hamok) -> Reply {
    let s = hamok.stats().status;
    let r = &s.raft;
    Reply::Lines(vec![
        format!("peer:{}", hamok.local_peer_id()),
        format!("role:{:?}", r.role),
        format!("term:{}", r.term),
        format!(
            "leader:{}",
            r.leader
                .as_ref()
                .map_or_else(|| "none".into(), ToString::to_string)
        ),
        format!("commit_index:{}", r.commit_index),
        format!("applied_index:{}", r.applied_index),
        format!("last_index:{}", r.last_index),
        format!("snapshot_index:{}", r.snapshot_index),
        format!("voters:{}", ids(r.membership.voters.iter())),
        format!("learners:{}", ids(r.membership.learners.iter())),
        format!("join_state:{:?}", s.join_state),
        format!("log_entries:{}", s.log_entries),
        format!("log_bytes:{}", s.log_bytes),
        format!("pending_requests:{}", s.pending_requests),
    ])
}
