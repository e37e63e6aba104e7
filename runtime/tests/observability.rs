//! Observability: a 3-peer cluster records its latency histograms (with the `peer` label) through the
//! `metrics` facade, and reports elections, role and leader changes and membership changes as `tracing`
//! events with structured fields. Every wait is bounded; no timing is asserted.

use std::any::Any;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use hamok_runtime::state_machine::{ApplyContext, StateMachine};
use hamok_runtime::transport::memory::InProcessHub;
use hamok_runtime::{Hamok, HamokError};
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::Layer;

const WAIT: Duration = Duration::from_secs(10);

/// A counter: each command adds one.
#[derive(Default)]
struct Count(u64);

impl StateMachine for Count {
    fn kind(&self) -> &str {
        "count"
    }
    fn apply(&mut self, _: &ApplyContext, _: &[u8]) -> Result<Bytes, HamokError> {
        self.0 += 1;
        Ok(Bytes::copy_from_slice(&self.0.to_be_bytes()))
    }
    fn snapshot(&self) -> Result<Bytes, HamokError> {
        Ok(Bytes::copy_from_slice(&self.0.to_be_bytes()))
    }
    fn restore(&mut self, data: &[u8]) -> Result<(), HamokError> {
        self.0 = data.try_into().map(u64::from_be_bytes).unwrap_or(0);
        Ok(())
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

/// One captured tracing event: its level, message and fields (values as their `Debug` form, strings
/// and `%`-displayed values unquoted).
#[derive(Clone, Debug)]
struct Captured {
    level: Level,
    message: String,
    fields: BTreeMap<String, String>,
}

impl Captured {
    fn field(&self, name: &str) -> Option<&str> {
        self.fields.get(name).map(String::as_str)
    }
}

#[derive(Default)]
struct FieldVisitor(BTreeMap<String, String>);

impl Visit for FieldVisitor {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_string(), value.to_string());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0
            .insert(field.name().to_string(), format!("{value:?}"));
    }
}

/// A layer that keeps every event of the `hamok_runtime` crate.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<Captured>>>);

impl<S: Subscriber> Layer<S> for Capture {
    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        if !event.metadata().target().starts_with("hamok_runtime") {
            return;
        }
        let mut visitor = FieldVisitor::default();
        event.record(&mut visitor);
        let mut fields = visitor.0;
        let message = fields.remove("message").unwrap_or_default();
        self.0.lock().unwrap().push(Captured {
            level: *event.metadata().level(),
            message,
            fields,
        });
    }
}

impl Capture {
    fn events(&self) -> Vec<Captured> {
        self.0.lock().unwrap().clone()
    }

    fn find(&self, message: &str) -> Vec<Captured> {
        self.events()
            .into_iter()
            .filter(|e| e.message == message)
            .collect()
    }
}

/// The process-wide recorder and subscriber (both are global: the actors run on the runtime's worker
/// threads).
fn instruments() -> &'static (Snapshotter, Capture) {
    static INSTRUMENTS: OnceLock<(Snapshotter, Capture)> = OnceLock::new();
    INSTRUMENTS.get_or_init(|| {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        recorder.install().expect("the only metrics recorder");
        let capture = Capture::default();
        tracing::subscriber::set_global_default(
            tracing_subscriber::registry().with(capture.clone()),
        )
        .expect("the only tracing subscriber");
        (snapshotter, capture)
    })
}

/// Every histogram sample recorded so far, by metric name and `peer` label (a snapshot drains the
/// recorder's histograms, so samples accumulate here).
#[derive(Default)]
struct Samples(BTreeMap<(String, String), Vec<f64>>);

impl Samples {
    fn collect(&mut self, snapshotter: &Snapshotter) {
        for (key, _, _, value) in snapshotter.snapshot().into_vec() {
            let DebugValue::Histogram(values) = value else {
                continue;
            };
            let peer = key
                .key()
                .labels()
                .find(|l| l.key() == "peer")
                .map(|l| l.value().to_string())
                .unwrap_or_default();
            self.0
                .entry((key.key().name().to_string(), peer))
                .or_default()
                .extend(values.into_iter().map(|v| v.into_inner()));
        }
    }

    /// The `peer` labels of the histogram `name` that have at least one sample.
    fn peers(&self, name: &str) -> Vec<&str> {
        self.0
            .iter()
            .filter(|((n, _), values)| n == name && !values.is_empty())
            .map(|((_, peer), _)| peer.as_str())
            .collect()
    }
}

async fn peer(hub: &InProcessHub, id: &str) -> Hamok {
    Hamok::builder()
        .peer_id(id)
        .cluster_id("observability-test")
        .election_timeout_ms(150)
        .heartbeat_interval_ms(30)
        .peer_max_idle_ms(1_000)
        .transport(hub.clone())
        .register_kind("count", || Box::new(Count::default()))
        .build()
        .await
        .unwrap()
}

/// Polls `done` every 10 ms until it holds, for at most [`WAIT`].
async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    tokio::time::timeout(WAIT, async {
        while !done() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_records_latencies_and_reports_its_changes() {
    let (snapshotter, capture) = instruments();
    let hub = InProcessHub::new();
    let peers = [
        peer(&hub, "a").await,
        peer(&hub, "b").await,
        peer(&hub, "c").await,
    ];
    let (ja, jb, jc) = tokio::join!(peers[0].join(), peers[1].join(), peers[2].join());
    ja.unwrap();
    jb.unwrap();
    jc.unwrap();
    eventually("a cluster of three", || {
        peers
            .iter()
            .all(|p| p.is_joined() && p.remote_peer_ids().len() == 2)
    })
    .await;

    // Writes and a linearizable read on every peer (followers forward theirs to the leader).
    peers[0].create_collection("n", "count").await.unwrap();
    for p in &peers {
        p.submit("n", Vec::new()).await.unwrap();
        let exists = p.query("n", true, |m| m.is_some()).await.unwrap();
        assert!(exists);
    }

    let mut samples = Samples::default();
    for name in [
        "hamok_proposal_commit_seconds",
        "hamok_apply_seconds",
        "hamok_read_index_seconds",
    ] {
        // The apply of the last write on a follower may land just after its answer on another peer.
        eventually(&format!("samples of {name} on every peer"), || {
            samples.collect(snapshotter);
            samples.peers(name) == ["a", "b", "c"]
        })
        .await;
    }
    for ((name, peer), values) in &samples.0 {
        assert!(
            values.iter().all(|v| v.is_finite() && *v >= 0.0),
            "{name} of {peer}: {values:?}"
        );
    }

    // Close the leader: the others elect a new one and, once it is silent, remove it.
    let old_leader = peers[0].wait_until_leader(WAIT).await.unwrap().to_string();
    let (gone, rest): (Vec<&Hamok>, Vec<&Hamok>) = peers
        .iter()
        .partition(|p| p.local_peer_id().to_string() == old_leader);
    gone[0].close().await;
    eventually("a new leader", || {
        rest.iter().all(|p| {
            p.leader_id().is_some_and(|l| {
                l.to_string() != old_leader && p.leader_id() == rest[0].leader_id()
            })
        })
    })
    .await;
    let new_leader = rest[0].leader_id().unwrap().to_string();
    eventually("the old leader removed", || {
        rest.iter().all(|p| p.remote_peer_ids().len() == 1)
    })
    .await;
    eventually("the removal reported", || {
        capture
            .find("member removed")
            .iter()
            .any(|e| e.field("member") == Some(old_leader.as_str()) && e.field("peer").is_some())
    })
    .await;

    // Elections and role changes, with their structured fields.
    let won = capture.find("election won");
    assert!(
        won.iter().any(|e| e.level == Level::INFO
            && e.field("peer") == Some(new_leader.as_str())
            && e.field("term").is_some()),
        "{won:#?}"
    );
    let roles = capture.find("role changed");
    assert!(
        roles.iter().any(|e| e.level == Level::INFO
            && e.field("peer") == Some(new_leader.as_str())
            && e.field("role") == Some("Leader")
            && e.field("term").is_some()),
        "{roles:#?}"
    );
    let leaders = capture.find("leader changed");
    assert!(
        leaders.iter().any(|e| e.level == Level::INFO
            && e.field("leader") == Some(new_leader.as_str())
            && e.field("peer").is_some_and(|p| p != old_leader)
            && e.field("term").is_some()),
        "{leaders:#?}"
    );
    // Membership: applied entries with their index, and each member added.
    let applied = capture.find("membership applied");
    assert!(
        applied
            .iter()
            .any(|e| e.level == Level::INFO && e.field("index").is_some()),
        "{applied:#?}"
    );
    let added = capture.find("member added");
    for id in ["a", "b", "c"] {
        assert!(
            added.iter().any(|e| e.field("member") == Some(id)),
            "{id} added: {added:#?}"
        );
    }
    assert!(
        !capture.find("joined").is_empty(),
        "{:#?}",
        capture.events()
    );

    for p in rest {
        p.close().await;
    }
}
