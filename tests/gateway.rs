//! The HTTP gateway over a 3-peer in-process cluster, each peer with its gateway on `127.0.0.1:0`, driven
//! by a real HTTP client: writes on a follower, redirect mode, compare-and-set, the SSE watch,
//! `/metrics`, body limits and JSON errors, `/v1/status`.
//!
//! Time is only ever a bound on a wait: no test asserts how long something took.
#![cfg(feature = "gateway")]

mod common;

use common::{agreed_leader, join_all_at_once, pid, wait_membership, Opts, TestCluster, WAIT};
use hamok::gateway::{serve, GatewayOptions};
use hamok::prelude::*;
use hamok::stores::Stores;
use reqwest::StatusCode;
use serde_json::{json, Value};

/// Three joined peers, each serving its gateway.
struct Cluster {
    peers: Vec<Hamok>,
    urls: Vec<String>,
    servers: Vec<tokio::task::JoinHandle<()>>,
    leader: usize,
}

impl Cluster {
    async fn start(name: &str, redirect: bool) -> Cluster {
        let tc = TestCluster::new(name, Opts::default());
        let o = &tc.opts;
        let mut peers = Vec::new();
        for i in 0..3 {
            let builder = Hamok::builder()
                .peer_id(pid(i))
                .cluster_id(tc.cluster_id.clone())
                .transport(tc.hub.clone())
                .election_timeout_ms(o.election_timeout_ms)
                .heartbeat_interval_ms(o.heartbeat_interval_ms)
                .peer_max_idle_ms(o.peer_max_idle_ms)
                .request_timeout_ms(o.request_timeout_ms);
            peers.push(register_kinds(builder).build().await.expect("build peer"));
        }
        join_all_at_once(&peers).await;
        wait_membership(&peers).await;
        let leader = agreed_leader(&peers).await;
        let mut urls = Vec::new();
        let mut servers = Vec::new();
        for p in &peers {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            urls.push(format!("http://{}", listener.local_addr().expect("addr")));
            let options = GatewayOptions {
                redirect,
                ..GatewayOptions::default()
            };
            let stores = Stores::new(p.clone());
            servers.push(tokio::spawn(async move {
                let _ = serve(stores, listener, options).await;
            }));
        }
        let cluster = Cluster {
            peers,
            urls,
            servers,
            leader,
        };
        cluster.wait_addresses().await;
        cluster
    }

    fn follower(&self) -> usize {
        (self.leader + 1) % self.peers.len()
    }

    /// Waits until every gateway knows every member's advertised URL.
    async fn wait_addresses(&self) {
        let client = reqwest::Client::new();
        common::eventually("every gateway knows every advertised URL", WAIT, || {
            let client = client.clone();
            let urls = self.urls.clone();
            async move {
                for url in &urls {
                    let status: Value = client
                        .get(format!("{url}/v1/status"))
                        .send()
                        .await
                        .ok()?
                        .json()
                        .await
                        .ok()?;
                    let members = status["members"].as_array()?;
                    if members.len() != urls.len() || members.iter().any(|m| !m["url"].is_string())
                    {
                        return None;
                    }
                }
                Some(())
            }
        })
        .await;
    }

    async fn close(self) {
        for s in &self.servers {
            s.abort();
        }
        common::close_all(&self.peers).await;
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(WAIT)
        .build()
        .expect("client")
}

fn no_redirect_client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(WAIT)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client")
}

/// Sends `request` and returns its JSON body.
async fn json_of(request: reqwest::RequestBuilder) -> Value {
    request.send().await.unwrap().json().await.unwrap()
}

/// Asserts `response` has `status` and a JSON error body; returns the body.
async fn expect_error(response: reqwest::Response, status: StatusCode) -> Value {
    assert_eq!(response.status(), status);
    let body: Value = response.json().await.expect("a JSON error body");
    assert!(body["error"].is_string(), "error body: {body}");
    assert!(
        body["may_have_taken_effect"].is_boolean(),
        "error body: {body}"
    );
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_on_any_peer_cas_and_status() {
    let c = Cluster::start("gw-api", false).await;
    let http = client();
    let leader = &c.urls[c.leader];
    let follower = &c.urls[c.follower()];

    // A write on a follower, read on the leader.
    let r = http
        .put(format!("{follower}/v1/kv/color"))
        .json(&json!({"value": "blue"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let etag = r.headers()["etag"].to_str().unwrap().to_string();
    assert!(etag.starts_with("\"v-"), "etag {etag}");
    let r = http
        .get(format!("{leader}/v1/kv/color?consistent=true"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["etag"].to_str().unwrap(), etag);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["value"], "blue");
    expect_error(
        http.get(format!("{leader}/v1/kv/nothing?consistent=true"))
            .send()
            .await
            .unwrap(),
        StatusCode::NOT_FOUND,
    )
    .await;

    // Compare-and-set on the key-value store.
    let r = http
        .put(format!("{follower}/v1/kv/color"))
        .header("if-match", "\"v-0000000000000000\"")
        .json(&json!({"value": "red"}))
        .send()
        .await
        .unwrap();
    expect_error(r, StatusCode::PRECONDITION_FAILED).await;
    let r = http
        .put(format!("{follower}/v1/kv/color"))
        .header("if-match", &etag)
        .json(&json!({"value": "red"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["previous"], "blue");
    // The old ETag is stale now.
    let r = http
        .put(format!("{leader}/v1/kv/color"))
        .header("if-match", &etag)
        .json(&json!({"value": "green"}))
        .send()
        .await
        .unwrap();
    expect_error(r, StatusCode::PRECONDITION_FAILED).await;
    let r = http
        .put(format!("{leader}/v1/kv/color"))
        .header("if-none-match", "*")
        .json(&json!({"value": "green"}))
        .send()
        .await
        .unwrap();
    expect_error(r, StatusCode::PRECONDITION_FAILED).await;
    let r = http
        .put(format!("{leader}/v1/kv/fresh"))
        .header("if-none-match", "*")
        .json(&json!({"value": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = http
        .delete(format!("{follower}/v1/kv/color"))
        .header("if-match", &etag)
        .send()
        .await
        .unwrap();
    expect_error(r, StatusCode::PRECONDITION_FAILED).await;
    let r = http
        .delete(format!("{follower}/v1/kv/color"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["previous"], "red");

    // Config: the revision is the ETag.
    let r = http
        .put(format!("{follower}/v1/config/mode"))
        .json(&json!({"value": "fast"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let body: Value = r.json().await.unwrap();
    let revision = body["revision"].as_u64().unwrap();
    let r = http
        .get(format!("{leader}/v1/config/mode?consistent=true"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        r.headers()["etag"].to_str().unwrap(),
        format!("\"{revision}\"")
    );
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["value"], "fast");
    assert_eq!(body["revision"], revision);
    let r = http
        .put(format!("{leader}/v1/config/mode"))
        .header("if-match", format!("\"{}\"", revision + 1_000))
        .json(&json!({"value": "slow"}))
        .send()
        .await
        .unwrap();
    expect_error(r, StatusCode::PRECONDITION_FAILED).await;
    let r = http
        .put(format!("{follower}/v1/config/mode"))
        .header("if-match", format!("\"{revision}\""))
        .json(&json!({"value": "slow"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);

    // Hash, set, locks.
    let r = http
        .put(format!("{follower}/v1/hash/user/name"))
        .json(&json!({"value": "ada"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let body: Value =
        json_of(http.get(format!("{leader}/v1/hash/user/name?consistent=true"))).await;
    assert_eq!(body["value"], "ada");
    let body: Value = json_of(http.get(format!("{leader}/v1/hash/user?consistent=true"))).await;
    assert_eq!(body["fields"]["name"], "ada");
    let r = http
        .put(format!("{follower}/v1/set/tags/rust"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let body: Value = json_of(http.get(format!("{leader}/v1/set/tags/rust?consistent=true"))).await;
    assert_eq!(body["present"], true);
    let body: Value = json_of(http.delete(format!("{leader}/v1/set/tags/rust"))).await;
    assert_eq!(body["removed"], true);
    let r = http
        .post(format!("{follower}/v1/locks/job?wait_ms=5000"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let body: Value = r.json().await.unwrap();
    assert!(body["token"].as_u64().is_some(), "lock answer {body}");
    let body: Value = json_of(http.get(format!("{follower}/v1/locks/job"))).await;
    assert_eq!(body["held"], true);
    let body: Value = json_of(http.delete(format!("{follower}/v1/locks/job"))).await;
    assert_eq!(body["released"], true);

    // Status.
    let s: Value = json_of(http.get(format!("{follower}/v1/status"))).await;
    assert_eq!(s["peer_id"], c.peers[c.follower()].local_peer_id().as_str());
    assert_eq!(s["role"], "follower");
    assert_eq!(s["leader"], c.peers[c.leader].local_peer_id().as_str());
    assert_eq!(s["leader_url"], leader.as_str());
    assert_eq!(s["advertised_url"], follower.as_str());
    assert!(s["term"].as_u64().unwrap() >= 1);
    assert!(s["commit_index"].as_u64().unwrap() >= 1);
    assert!(s["applied_index"].is_u64());
    assert_eq!(s["members"].as_array().unwrap().len(), 3);
    assert_eq!(s["remote_peers"].as_array().unwrap().len(), 2);
    let s: Value = json_of(http.get(format!("{leader}/v1/status"))).await;
    assert_eq!(s["role"], "leader");
    assert_eq!(s["is_leader"], true);
    // The leader knows how far each member has replicated (itself included, lag 0).
    let members = s["members"].as_array().unwrap();
    assert_eq!(members.len(), 3);
    for m in members {
        assert!(m["match_index"].as_u64().unwrap() >= 1, "{m}");
        assert!(m["lag"].is_u64(), "{m}");
    }
    let s: Value = json_of(http.get(format!("{follower}/v1/status"))).await;
    assert!(
        s["members"][0]["lag"].is_null(),
        "a follower does not know the lags"
    );

    c.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirect_mode_sends_writes_to_the_leader() {
    let c = Cluster::start("gw-redirect", true).await;
    let leader = &c.urls[c.leader];
    let follower = &c.urls[c.follower()];

    // Without following redirects: a 307 to the leader, same path and query.
    let r = no_redirect_client()
        .put(format!("{follower}/v1/kv/where?x=1"))
        .json(&json!({"value": "here"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::TEMPORARY_REDIRECT);
    // The leader's advertised URL (the one known at the start, unless leadership moved meanwhile).
    let location = r.headers()["location"].to_str().unwrap().to_string();
    let base = location
        .strip_suffix("/v1/kv/where?x=1")
        .unwrap_or_else(|| panic!("Location {location} keeps the path and query"));
    assert!(
        c.urls.iter().any(|u| u == base) && base != follower,
        "Location {location} is another peer's gateway"
    );
    if c.peers[c.leader].is_leader() {
        assert_eq!(base, leader);
    }
    // Reads and locks are served where they are asked.
    let r = no_redirect_client()
        .get(format!("{follower}/v1/kv/where"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let r = no_redirect_client()
        .post(format!("{follower}/v1/locks/l"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    // The leader itself does not redirect.
    let r = no_redirect_client()
        .put(format!("{leader}/v1/kv/direct"))
        .json(&json!({"value": "1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);

    // Following the redirect: the write succeeds, and is read everywhere.
    let r = client()
        .put(format!("{follower}/v1/kv/where"))
        .json(&json!({"value": "there"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_ne!(r.url().as_str(), format!("{follower}/v1/kv/where"));
    let body: Value = client()
        .get(format!("{follower}/v1/kv/where?consistent=true"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["value"], "there");

    c.close().await;
}

/// Reads SSE `data:` payloads of event `value` from `response` until one satisfies `done`, bounded.
async fn sse_until(response: &mut reqwest::Response, done: impl Fn(&Value) -> bool) -> Vec<Value> {
    let mut buffer = String::new();
    let mut seen = Vec::new();
    let read = async {
        loop {
            let chunk = response
                .chunk()
                .await
                .expect("read the stream")
                .expect("the stream ended early");
            buffer.push_str(std::str::from_utf8(&chunk).expect("utf-8"));
            while let Some(end) = buffer.find("\n\n") {
                let event: String = buffer.drain(..end + 2).collect();
                let data: String = event
                    .lines()
                    .filter_map(|l| l.strip_prefix("data:"))
                    .map(str::trim_start)
                    .collect();
                if data.is_empty() {
                    continue; // a keep-alive comment
                }
                let v: Value = serde_json::from_str(&data).expect("JSON event data");
                let stop = done(&v);
                seen.push(v);
                if stop {
                    return;
                }
            }
        }
    };
    tokio::time::timeout(WAIT, read)
        .await
        .expect("the watch delivered the update in time");
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_metrics_limits_and_errors() {
    let c = Cluster::start("gw-misc", false).await;
    let http = client();
    let leader = &c.urls[c.leader];
    let follower = &c.urls[c.follower()];

    // The watch on a follower sees a value set through the leader after it started.
    let mut watch = http
        .get(format!("{follower}/v1/config/feature/watch"))
        .send()
        .await
        .unwrap();
    assert_eq!(watch.status(), StatusCode::OK);
    assert!(watch.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let first = sse_until(&mut watch, |_| true).await;
    assert_eq!(first[0]["value"], Value::Null);
    let r = http
        .put(format!("{leader}/v1/config/feature"))
        .json(&json!({"value": "on"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let seen = sse_until(&mut watch, |v| v["value"] == "on").await;
    assert!(seen.last().unwrap()["revision"].as_u64().unwrap() > 0);
    drop(watch);

    // /metrics is Prometheus text with this peer's counters and gauges.
    let r = http
        .get(format!("{follower}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    let text = r.text().await.unwrap();
    check_prometheus_text(&text);
    let me = c.peers[c.follower()].local_peer_id().as_str().to_string();
    for name in [
        "hamok_frames_in_total",
        "hamok_frames_out_total",
        "hamok_requests_retried_total",
        "hamok_term",
        "hamok_commit_index",
        "hamok_applied_index",
        "hamok_is_leader",
        "hamok_log_entries",
        "hamok_log_bytes",
        "hamok_pending_requests",
    ] {
        let sample = format!("{name}{{peer=\"{me}\"}} ");
        assert!(text.contains(&sample), "no {sample} in\n{text}");
    }

    // The runtime's latency histograms (recorded through the `metrics` facade into the recorder the
    // gateway installed; writes went through the log above).
    assert!(
        text.contains("# TYPE hamok_proposal_commit_seconds histogram"),
        "no proposal latency histogram in\n{text}"
    );

    // A body over 1 MiB: 413.
    let big = "x".repeat((1 << 20) + 1);
    let r = http
        .put(format!("{follower}/v1/kv/big"))
        .json(&json!({ "value": big }))
        .send()
        .await
        .unwrap();
    expect_error(r, StatusCode::PAYLOAD_TOO_LARGE).await;

    // Client mistakes: 4xx with a JSON error.
    let r = http
        .put(format!("{follower}/v1/kv/k"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    expect_error(r, StatusCode::BAD_REQUEST).await;
    let r = http
        .put(format!("{follower}/v1/kv/k"))
        .json(&json!({"value": 3}))
        .send()
        .await
        .unwrap();
    expect_error(r, StatusCode::BAD_REQUEST).await;
    let r = http
        .put(format!("{follower}/v1/hash/a%20b/f"))
        .json(&json!({"value": "v"}))
        .send()
        .await
        .unwrap();
    expect_error(r, StatusCode::BAD_REQUEST).await;
    let r = http
        .get(format!("{follower}/v1/kv/k?consistent=maybe"))
        .send()
        .await
        .unwrap();
    expect_error(r, StatusCode::BAD_REQUEST).await;
    let r = http
        .put(format!("{follower}/v1/kv/k"))
        .header("if-none-match", "\"v-1\"")
        .json(&json!({"value": "v"}))
        .send()
        .await
        .unwrap();
    expect_error(r, StatusCode::BAD_REQUEST).await;
    let r = http
        .get(format!("{follower}/v1/nothing"))
        .send()
        .await
        .unwrap();
    expect_error(r, StatusCode::NOT_FOUND).await;

    c.close().await;
}

/// Checks the Prometheus text exposition format: `# HELP name text`, `# TYPE name kind`, and samples
/// `name value` or `name{labels} value` (an optional timestamp after).
fn check_prometheus_text(text: &str) {
    fn valid_name(name: &str) -> bool {
        let mut chars = name.chars();
        matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    }
    fn valid_value(v: &str) -> bool {
        v.parse::<f64>().is_ok() || matches!(v, "+Inf" | "-Inf" | "NaN")
    }
    /// `k="v",k2="v2"` (a trailing comma allowed).
    fn valid_labels(labels: &str) -> bool {
        let mut rest = labels;
        while !rest.is_empty() {
            let Some(eq) = rest.find('=') else {
                return false;
            };
            if !valid_name(&rest[..eq]) || !rest[eq + 1..].starts_with('"') {
                return false;
            }
            let mut escaped = false;
            let mut end = None;
            for (i, c) in rest[eq + 2..].char_indices() {
                match c {
                    _ if escaped => escaped = false,
                    '\\' => escaped = true,
                    '"' => {
                        end = Some(eq + 2 + i);
                        break;
                    }
                    _ => {}
                }
            }
            let Some(end) = end else { return false };
            rest = &rest[end + 1..];
            rest = rest.strip_prefix(',').unwrap_or(rest);
        }
        true
    }
    let mut typed = std::collections::HashSet::new();
    let mut samples = 0;
    for line in text.lines() {
        if line.trim().is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let name = rest.split(' ').next().unwrap();
            assert!(valid_name(name), "bad HELP line: {line}");
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let parts: Vec<&str> = rest.split(' ').collect();
            assert_eq!(parts.len(), 2, "bad TYPE line: {line}");
            assert!(valid_name(parts[0]), "bad TYPE line: {line}");
            assert!(
                matches!(
                    parts[1],
                    "counter" | "gauge" | "histogram" | "summary" | "untyped"
                ),
                "bad TYPE line: {line}"
            );
            assert!(typed.insert(parts[0].to_string()), "TYPE twice: {line}");
            continue;
        }
        if line.starts_with('#') {
            continue; // a comment
        }
        let (series, value) = if let Some(open) = line.find('{') {
            let close = line
                .rfind('}')
                .unwrap_or_else(|| panic!("bad sample: {line}"));
            assert!(valid_name(&line[..open]), "bad sample name: {line}");
            assert!(valid_labels(&line[open + 1..close]), "bad labels: {line}");
            (&line[..open], line[close + 1..].trim())
        } else {
            let (name, value) = line
                .split_once(' ')
                .unwrap_or_else(|| panic!("bad sample: {line}"));
            assert!(valid_name(name), "bad sample name: {line}");
            (name, value.trim())
        };
        let mut fields = value.split(' ');
        let v = fields.next().unwrap();
        assert!(valid_value(v), "bad sample value: {line}");
        if let Some(ts) = fields.next() {
            assert!(ts.parse::<i64>().is_ok(), "bad timestamp: {line}");
        }
        assert!(fields.next().is_none(), "trailing fields: {line}");
        assert!(!series.is_empty());
        samples += 1;
    }
    assert!(samples > 0, "no samples in\n{text}");
}

#[test]
fn the_checker_refuses_bad_text() {
    check_prometheus_text("# HELP a b\n# TYPE a counter\na{peer=\"x\\\"y\"} 1\nb 2.5\n");
    assert!(std::panic::catch_unwind(|| check_prometheus_text("a{peer=x} 1\n")).is_err());
    assert!(
        std::panic::catch_unwind(|| check_prometheus_text("# TYPE a nonsense\na 1\n")).is_err()
    );
    assert!(std::panic::catch_unwind(|| check_prometheus_text("a one\n")).is_err());
}

/// The queue routes: push on one peer, pop and take on others, at-least-once delivery (a lease that
/// runs out delivers the item again, counted), acknowledgement through any gateway, and `400`s for a
/// bad lease or id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_push_pop_take_and_ack() {
    let c = Cluster::start("gw-queue", false).await;
    let http = client();
    let leader = c.urls[c.leader].clone();
    let follower = c.urls[c.follower()].clone();
    for (i, v) in ["a", "b", "c"].iter().enumerate() {
        let r = http
            .post(format!("{follower}/v1/queue/jobs"))
            .json(&json!({"value": v}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["len"], i + 1, "{body}");
    }
    // At most once: the head leaves for good.
    let body = json_of(http.post(format!("{leader}/v1/queue/jobs/pop"))).await;
    assert_eq!(body["value"], "a");
    // At least once: "b" leased briefly to the follower and never acknowledged.
    let b = json_of(http.post(format!("{follower}/v1/queue/jobs/take?lease_ms=300"))).await;
    assert_eq!(
        (&b["value"], &b["deliveries"]),
        (&json!("b"), &json!(1)),
        "{b}"
    );
    let b_first = b["id"].as_u64().expect("a delivery id");
    // "c" leased to the leader, acknowledged through the follower's gateway.
    let cc = json_of(http.post(format!("{leader}/v1/queue/jobs/take?lease_ms=60000"))).await;
    assert_eq!(cc["value"], "c", "{cc}");
    let c_id = cc["id"].as_u64().unwrap();
    let ack = json_of(http.post(format!("{follower}/v1/queue/jobs/ack/{c_id}"))).await;
    assert_eq!(ack["acked"], true, "{ack}");
    let ack = json_of(http.post(format!("{leader}/v1/queue/jobs/ack/{c_id}"))).await;
    assert_eq!(ack["acked"], false, "acknowledged already: {ack}");
    // Once b's lease ran out it is delivered again, counted as a second delivery.
    let again = common::eventually("b delivered again", WAIT, || {
        let (http, leader) = (http.clone(), leader.clone());
        async move {
            let t: Value = http
                .post(format!("{leader}/v1/queue/jobs/take?lease_ms=60000"))
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            // Empty (`id` null) while b is still leased.
            t["id"].is_u64().then_some(t)
        }
    })
    .await;
    assert_eq!(
        (&again["value"], &again["deliveries"]),
        (&json!("b"), &json!(2)),
        "{again}"
    );
    let ack = json_of(http.post(format!("{leader}/v1/queue/jobs/ack/{b_first}"))).await;
    assert_eq!(
        ack["acked"], false,
        "the first delivery is no longer held: {ack}"
    );
    let b_id = again["id"].as_u64().unwrap();
    let ack = json_of(http.post(format!("{leader}/v1/queue/jobs/ack/{b_id}"))).await;
    assert_eq!(ack["acked"], true, "{ack}");
    // Empty now.
    let t = json_of(http.post(format!("{follower}/v1/queue/jobs/take"))).await;
    assert!(t["id"].is_null() && t["value"].is_null(), "{t}");
    let p = json_of(http.post(format!("{follower}/v1/queue/jobs/pop"))).await;
    assert!(p["value"].is_null(), "{p}");
    // Client mistakes.
    for bad in [
        "jobs/take?lease_ms=0",
        "jobs/take?lease_ms=999999999999",
        "jobs/take?lease=5",
        "jobs/ack/seven",
    ] {
        let r = http
            .post(format!("{follower}/v1/queue/{bad}"))
            .send()
            .await
            .unwrap();
        expect_error(r, StatusCode::BAD_REQUEST).await;
    }
    let r = http
        .post(format!("{follower}/v1/queue/jobs"))
        .body("not json")
        .send()
        .await
        .unwrap();
    expect_error(r, StatusCode::BAD_REQUEST).await;
    // The same millisecond check guards the lock route's wait.
    let r = http
        .post(format!("{follower}/v1/locks/l?wait_ms=60001"))
        .send()
        .await
        .unwrap();
    expect_error(r, StatusCode::BAD_REQUEST).await;
    c.close().await;
}
