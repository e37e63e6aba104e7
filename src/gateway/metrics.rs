//! `GET /metrics`: Prometheus text exposition format. First what the process-wide
//! [`PrometheusRecorder`](metrics_exporter_prometheus::PrometheusRecorder) rendered (the runtime's
//! histograms `hamok_proposal_commit_seconds`, `hamok_apply_seconds`, `hamok_read_index_seconds`,
//! labelled `peer`, recorded through the `metrics` facade), then this peer's counters
//! (`hamok_<counter>_total{peer="id"}`) and gauges.

use std::fmt::Write as _;
use std::sync::OnceLock;
use std::time::Duration;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use hamok_runtime::HamokStats;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use super::Shared;

/// The recorder's handle, when this gateway installed it (`None`: another recorder was there first).
static RECORDER: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Histogram buckets of the `*_seconds` metrics: 100 µs to 10 s.
const BUCKETS: &[f64] = &[
    0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// How often the recorder's upkeep runs (drains histogram samples so they do not pile up between
/// scrapes).
const UPKEEP: Duration = Duration::from_secs(5);

/// Installs the Prometheus recorder as the process's global `metrics` recorder, once; skipped when
/// another recorder is installed already.
pub(crate) fn install_recorder() -> Option<&'static PrometheusHandle> {
    RECORDER
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), BUCKETS)
                .ok()?;
            let handle = builder.install_recorder().ok()?;
            let upkeep = handle.clone();
            let _ = std::thread::Builder::new()
                .name("hamok-metrics-upkeep".into())
                .spawn(move || loop {
                    std::thread::sleep(UPKEEP);
                    upkeep.run_upkeep();
                });
            Some(handle)
        })
        .as_ref()
}

/// A label value escaped for the text format.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// One metric family with one sample labelled `peer`.
fn family(out: &mut String, name: &str, kind: &str, help: &str, peer: &str, value: u64) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    let _ = writeln!(out, "{name}{{peer=\"{peer}\"}} {value}");
}

/// This peer's counters and gauges in the text format.
pub(crate) fn render_stats(stats: &HamokStats) -> String {
    let c = &stats.counters;
    let s = &stats.status;
    let peer = escape(s.raft.id.as_str());
    let mut out = String::new();
    let counters: [(&str, &str, u64); 15] = [
        ("frames_in", "Frames received.", c.frames_in),
        ("frames_out", "Frames sent.", c.frames_out),
        (
            "dropped_malformed",
            "Frames dropped: not decodable.",
            c.dropped_malformed,
        ),
        (
            "dropped_misrouted",
            "Frames dropped: addressed to another peer.",
            c.dropped_misrouted,
        ),
        (
            "dropped_foreign_cluster",
            "Frames dropped: another cluster's.",
            c.dropped_foreign_cluster,
        ),
        (
            "dropped_version",
            "Frames dropped: another protocol version.",
            c.dropped_version,
        ),
        (
            "dropped_foreign_incarnation",
            "Frames dropped: another incarnation of this cluster.",
            c.dropped_foreign_incarnation,
        ),
        (
            "dropped_unauthenticated",
            "Frames dropped: no valid authentication tag.",
            c.dropped_unauthenticated,
        ),
        (
            "dropped_outbound",
            "Frames the transport could not take.",
            c.dropped_outbound,
        ),
        (
            "dropped_inbound_full",
            "Frames dropped: this peer was saturated.",
            c.dropped_inbound_full,
        ),
        (
            "snapshots_taken",
            "Snapshots taken locally.",
            c.snapshots_taken,
        ),
        (
            "snapshots_installed",
            "Snapshots installed from the leader.",
            c.snapshots_installed,
        ),
        (
            "requests_retried",
            "Requests retried (leader change or lost forward).",
            c.requests_retried,
        ),
        (
            "duplicates_skipped",
            "Retried requests recognised as already applied.",
            c.duplicates_skipped,
        ),
        (
            "transport_connects",
            "Times the transport was (re)connected.",
            c.transport_connects,
        ),
    ];
    for (name, help, value) in counters {
        family(
            &mut out,
            &format!("hamok_{name}_total"),
            "counter",
            help,
            &peer,
            value,
        );
    }
    let r = &s.raft;
    let gauges: [(&str, &str, u64); 9] = [
        ("hamok_term", "The peer's current Raft term.", r.term),
        (
            "hamok_commit_index",
            "Highest log index known committed.",
            r.commit_index,
        ),
        (
            "hamok_applied_index",
            "Highest log index handed out for applying.",
            r.applied_index,
        ),
        (
            "hamok_last_index",
            "Last index in the peer's log.",
            r.last_index,
        ),
        (
            "hamok_is_leader",
            "1 while this peer leads its cluster.",
            u64::from(
                r.leader.as_ref() == Some(&r.id) && r.role == hamok_runtime::raft::Role::Leader,
            ),
        ),
        (
            "hamok_members",
            "Members of the committed configuration.",
            r.membership.members().count() as u64,
        ),
        (
            "hamok_log_entries",
            "Entries in the log store.",
            s.log_entries,
        ),
        (
            "hamok_log_bytes",
            "Approximate bytes of the log store's entries.",
            s.log_bytes,
        ),
        (
            "hamok_pending_requests",
            "Requests submitted here and not answered yet.",
            s.pending_requests as u64,
        ),
    ];
    for (name, help, value) in gauges {
        family(&mut out, name, "gauge", help, &peer, value);
    }
    out
}

/// `GET /metrics`.
pub(crate) async fn get(State(g): State<Shared>) -> impl IntoResponse {
    let mut body = install_recorder()
        .map(PrometheusHandle::render)
        .unwrap_or_default();
    if !body.is_empty() && !body.ends_with('\n') {
        body.push('\n');
    }
    body.push_str(&render_stats(&g.stores.hamok().stats()));
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
}
