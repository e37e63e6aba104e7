//! `GET /v1/status`: this peer's view of its cluster.

use axum::extract::State;
use axum::Json;
use hamok_runtime::raft::Role;
use hamok_runtime::JoinState;
use serde_json::{json, Value};

use super::Shared;

/// The name of a role in the JSON.
pub(crate) fn role_name(role: Role) -> &'static str {
    match role {
        Role::Follower => "follower",
        Role::PreCandidate => "pre_candidate",
        Role::Candidate => "candidate",
        Role::Leader => "leader",
    }
}

fn join_state_name(state: JoinState) -> &'static str {
    match state {
        JoinState::Idle => "idle",
        JoinState::Discovering => "discovering",
        JoinState::Joined => "joined",
        JoinState::Leaving => "leaving",
        JoinState::Left => "left",
    }
}

/// `GET /v1/status`. On the leader each member carries its `match_index` and `lag` (entries it lacks
/// of the leader's log); elsewhere they are `null` (ask the leader's gateway, `leader_url`).
pub(crate) async fn get(State(g): State<Shared>) -> Json<Value> {
    let hamok = g.stores.hamok();
    let stats = hamok.stats();
    let s = &stats.status;
    let r = &s.raft;
    let leader = r.leader.as_ref().map(|l| l.as_str().to_string());
    let leader_url = match &leader {
        Some(l) => g.addresses.url_of(l).await,
        None => None,
    };
    // The leader's view of replication (empty elsewhere, or if the peer closed meanwhile).
    let replication = hamok.replication().await.unwrap_or_default();
    let mut members = Vec::new();
    for id in r.membership.members() {
        let progress = replication.iter().find(|p| p.peer == *id);
        members.push(json!({
            "id": id.as_str(),
            "voter": r.membership.is_voter(id),
            "url": g.addresses.url_of(id.as_str()).await,
            "match_index": progress.map(|p| p.match_index),
            "lag": progress.map(|p| p.lag),
        }));
    }
    Json(json!({
        "peer_id": hamok.local_peer_id().as_str(),
        "advertised_url": g.options.advertise,
        "redirect": g.options.redirect,
        "role": role_name(r.role),
        "is_leader": hamok.is_leader(),
        "join_state": join_state_name(s.join_state),
        "term": r.term,
        "leader": leader,
        "leader_url": leader_url,
        "commit_index": r.commit_index,
        "applied_index": r.applied_index,
        "apply_lag": r.commit_index.saturating_sub(r.applied_index),
        "last_index": r.last_index,
        "snapshot_index": r.snapshot_index,
        "members": members,
        "remote_peers": hamok.remote_peer_ids().iter().map(|p| p.as_str().to_string()).collect::<Vec<_>>(),
        "log_entries": s.log_entries,
        "log_bytes": s.log_bytes,
        "pending_requests": s.pending_requests,
        "closed": s.closed,
    }))
}
