//! `--nats-cluster`: the run on a local cluster of three NATS servers (routes on loopback, JetStream
//! on), started here with [`NatsCluster`] and stopped when it is dropped (at the end of the run, also
//! on error). Hamok's peer `p<i>` connects to server `i` only (child peer processes too); the KV
//! baseline's bucket has 3 replicas and one client per server (see `kv.rs`).
//!
//! This module adds what only makes sense there: the `rtt` rows (the floor a write over a cluster of
//! brokers cannot beat: one NATS round trip between clients on different servers, and on one server
//! for reference), the check of where every peer is connected, and the ratios of the run.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hamok::raft::PeerId;
use hamok::runtime::transport::{Inbound, Link, Transport};
use hamok::transports::NatsTransport;
use hamok_testkit::nats_cluster::NatsCluster;

use crate::cluster::{cluster_id, LoadResult, Progress, Res, WAIT};
use crate::report::{human_us, Hist, Record};
use crate::scenarios::Ctx;

/// The transport column of the KV baseline's rows on the cluster.
pub const KV_CLUSTER_TRANSPORT: &str = "nats-kv R3 (baseline)";

/// The transport column of hamok's rows (and of the `rtt` rows) on the cluster.
pub const TRANSPORT: &str = "nats-cluster";

/// How many servers the cluster has.
pub const SERVERS: usize = 3;

/// The `what` of the NATS request/reply rows.
const RTT_REQUEST: &str = "NATS request/reply (async-nats both ends)";
/// The `what` of hamok's transport ping-pong rows.
const RTT_FRAME: &str = "hamok NatsTransport frame ping-pong (no Raft)";
/// The `from` of the rows between servers 0 and 1, and within server 0.
const ACROSS: &str = "server 0 ↔ server 1";
const WITHIN: &str = "server 0 ↔ server 0";

/// Starts the cluster and says where it is.
pub async fn start() -> Res<NatsCluster> {
    let t = Instant::now();
    let cluster = NatsCluster::start(SERVERS)
        .await
        .map_err(|e| format!("cannot start a {SERVERS}-server NATS cluster: {e}"))?;
    eprintln!(
        "-- NATS cluster {} of {SERVERS} servers ready in {:.1} s: {} (logs and stores in {})",
        cluster.name(),
        t.elapsed().as_secs_f64(),
        (0..cluster.len())
            .map(|i| format!("{} {}", cluster.server_name(i), cluster.client_url(i)))
            .collect::<Vec<_>>()
            .join(", "),
        cluster.dir().display()
    );
    Ok(cluster)
}

/// The version a server of the cluster reports (its INFO), for the run's metadata.
pub async fn server_version(url: &str) -> Option<String> {
    let client = async_nats::connect(url).await.ok()?;
    Some(client.server_info().version)
}

/// Where every peer of hamok cluster `id` is connected (`p0@0, p1@1, ...`, from each server's
/// `/connz`); warns on stderr when a peer is not on its own server (`p<i>` on server `i mod n`).
pub async fn placement(ctx: &Ctx, id: &str) -> Option<String> {
    let cluster = ctx.nats_cluster.as_ref()?;
    let prefix = format!("hamok {id}/");
    let mut found = Vec::new();
    for i in 0..cluster.len() {
        match cluster.connection_names(i).await {
            Ok(names) => {
                for name in names {
                    if let Some(peer) = name.strip_prefix(&prefix) {
                        found.push((peer.to_string(), i));
                    }
                }
            }
            Err(e) => eprintln!("  placement: {e}"),
        }
    }
    found.sort();
    let summary = found
        .iter()
        .map(|(peer, i)| format!("{peer}@{i}"))
        .collect::<Vec<_>>()
        .join(", ");
    eprintln!("  peers on servers: {summary}");
    let net = ctx.net();
    for (peer, i) in &found {
        if net.nats_url_for(peer) != Some(cluster.client_url(*i)) {
            eprintln!("  placement: warning: peer {peer} of {id} is connected to server {i}");
        }
    }
    Some(summary)
}

/// The `rtt` rows: a NATS request/reply round trip and hamok's transport ping-pong, each between
/// clients on servers 0 and 1 and on server 0 alone, at 1 in flight. Taken at the start and at the
/// end of the run (`when`): the ratios use the mean of both, since other work on the machine moves
/// these figures between the two.
pub async fn rtt_rows(ctx: &mut Ctx, when: &str) -> Res<()> {
    let Some(cluster) = ctx.nats_cluster.clone() else {
        return Ok(());
    };
    let n = ctx.sizes.rtt_n;
    let warmup = ctx.sizes.warmup_n;
    let payload = Bytes::from(vec![b'r'; ctx.value_bytes]);
    for (from, a, b) in [(ACROSS, 0, 1), (WITHIN, 0, 0)] {
        let (url_a, url_b) = (cluster.client_url(a), cluster.client_url(b));
        {
            let load = request_reply(&url_a, &url_b, n, warmup, payload.clone()).await?;
            let r = rtt_record(ctx, RTT_REQUEST, from, when)
                .config("requester", url_a.as_str())
                .config("responder", url_b.as_str())
                .config(
                    "metric",
                    "client.request() to its reply; the responder publishes each request's \
                     payload to its reply subject from its subscription's task",
                );
            let r = ctx.load_record_of(r, 1, &load);
            ctx.emit_record(r);
        }
        let load = frame_ping_pong(&url_a, &url_b, n, warmup, payload.clone()).await?;
        let r = rtt_record(ctx, RTT_FRAME, from, when)
            .config("sender", url_a.as_str())
            .config("echo", url_b.as_str())
            .config(
                "metric",
                "Link::send of a frame to the other peer to its echo arriving at the sender's \
                 Inbound; the echo is sent from the receiver's Inbound callback (what a Raft \
                 AppendEntries and its answer cross, without Raft and the actors)",
            );
        let r = ctx.load_record_of(r, 1, &load);
        ctx.emit_record(r);
    }
    Ok(())
}

fn rtt_record(ctx: &Ctx, what: &str, from: &str, when: &str) -> Record {
    let mut r = Record::new("rtt", TRANSPORT, 2, from, what)
        .extra("when", format!("{when} of run"))
        .config("value_bytes", ctx.value_bytes)
        .config("runtime_threads", ctx.threads)
        .config("quick", ctx.quick);
    r.storage = "-".into();
    r
}

/// `n` NATS requests at 1 in flight from a client on `url_req` to a responder on `url_resp` (after
/// `warmup` more), both async-nats clients like hamok's peers.
async fn request_reply(
    url_req: &str,
    url_resp: &str,
    n: u64,
    warmup: u64,
    payload: Bytes,
) -> Res<LoadResult> {
    use futures_util::StreamExt as _;
    let requester = async_nats::connect(url_req)
        .await
        .map_err(|e| format!("rtt: cannot connect to {url_req}: {e}"))?;
    let responder = async_nats::connect(url_resp)
        .await
        .map_err(|e| format!("rtt: cannot connect to {url_resp}: {e}"))?;
    let subject = format!("hamok-bench.rtt.{:016x}", crate::cluster::random_u64());
    let mut sub = responder.subscribe(subject.clone()).await?;
    responder.flush().await?;
    let echo = {
        let responder = responder.clone();
        tokio::spawn(async move {
            while let Some(msg) = sub.next().await {
                if let Some(reply) = msg.reply {
                    let _ = responder.publish(reply, msg.payload).await;
                }
            }
        })
    };
    let result = async {
        // The responder's interest reaches the requester's server over the route a little later:
        // until then a request finds no responder.
        let deadline = Instant::now() + WAIT;
        loop {
            let answer = tokio::time::timeout(
                Duration::from_secs(1),
                requester.request(subject.clone(), payload.clone()),
            )
            .await;
            match answer {
                Ok(Ok(_)) => break,
                _ if Instant::now() > deadline => {
                    return Err(format!("rtt: no reply from {url_resp} via {url_req}").into())
                }
                _ => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
        let op = {
            let (requester, subject, payload) = (requester.clone(), subject.clone(), payload);
            move |_: u64| {
                let (requester, subject, payload) =
                    (requester.clone(), subject.clone(), payload.clone());
                async move { requester.request(subject, payload).await.map(|_| ()) }
            }
        };
        crate::cluster::run_load(warmup, 1, &Progress::new(0, ""), op.clone()).await?;
        let progress = Progress::new(
            n,
            &format!("rtt: NATS request/reply {url_req} → {url_resp}"),
        );
        let load = crate::cluster::run_load(n, 1, &progress, op).await?;
        progress.finish();
        Ok::<_, crate::cluster::BoxError>(load)
    }
    .await;
    echo.abort();
    result
}

/// `n` frames at 1 in flight from a hamok `NatsTransport` link on `url_a` to one on `url_b`, which
/// echoes each from its `Inbound` callback (after `warmup` more). Each frame carries its sequence
/// number, so that a late echo of an earlier (timed-out) frame is not taken for the current one.
async fn frame_ping_pong(
    url_a: &str,
    url_b: &str,
    n: u64,
    warmup: u64,
    payload: Bytes,
) -> Res<LoadResult> {
    let cluster = cluster_id("rtt");
    let (a, b) = (PeerId::from("a"), PeerId::from("b"));
    let transport_a = NatsTransport::builder().server(url_a).build()?;
    let transport_b = NatsTransport::builder().server(url_b).build()?;

    // B: every frame goes straight back to A, from the transport's reader task.
    let link_b_slot: Arc<OnceLock<Arc<dyn Link>>> = Arc::new(OnceLock::new());
    let inbound_b_slot: Arc<OnceLock<Inbound>> = Arc::new(OnceLock::new());
    let inbound_b = {
        let (link, slot, to) = (link_b_slot.clone(), inbound_b_slot.clone(), a.clone());
        Inbound::new(1_024, move |frame: Bytes| {
            if let Some(link) = link.get() {
                let _ = link.send(&to, frame);
            }
            if let Some(inbound) = slot.get() {
                inbound.processed();
            }
        })
    };
    let _ = inbound_b_slot.set(inbound_b.clone());
    let link_b = transport_b.connect(&cluster, b.clone(), inbound_b).await?;
    let _ = link_b_slot.set(link_b.clone());

    // A: echoes to the timing loop.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Bytes>();
    let inbound_a = Inbound::new(1_024, move |frame: Bytes| {
        let _ = tx.send(frame);
    });
    let link_a = transport_a.connect(&cluster, a, inbound_a.clone()).await?;

    let progress = Progress::new(n, &format!("rtt: hamok frames {url_a} → {url_b}"));
    let timing = {
        let (link_a, progress) = (link_a.clone(), progress.clone());
        tokio::spawn(async move {
            let hist = Arc::new(Hist::default());
            let warmup = warmup.max(1);
            let mut seq = 0u64;
            let mut started = Instant::now();
            for i in 0..warmup + n {
                if i == warmup {
                    started = Instant::now();
                }
                // One frame, then its echo; sent again after a second without it (the first frames
                // may leave before B's subscription has reached A's server).
                let deadline = Instant::now() + WAIT;
                'frame: loop {
                    seq += 1;
                    let mut frame = seq.to_be_bytes().to_vec();
                    frame.extend_from_slice(&payload[frame.len().min(payload.len())..]);
                    let t = Instant::now();
                    link_a.send(&b, Bytes::from(frame))?;
                    let until = tokio::time::Instant::from_std(t + Duration::from_secs(1));
                    loop {
                        match tokio::time::timeout_at(until, rx.recv()).await {
                            Ok(Some(echo)) => {
                                inbound_a.processed();
                                if echo.get(..8) == Some(&seq.to_be_bytes()[..]) {
                                    if i >= warmup {
                                        hist.record(t.elapsed());
                                    }
                                    break 'frame;
                                }
                            }
                            Ok(None) => return Err("rtt: the echo channel closed".into()),
                            Err(_) => break,
                        }
                    }
                    if Instant::now() > deadline {
                        return Err("rtt: no echo of a hamok frame".into());
                    }
                }
                if i >= warmup && (i - warmup) % 64 == 63 {
                    progress.inc(64);
                }
            }
            Ok::<_, crate::cluster::BoxError>((hist, started.elapsed()))
        })
    };
    let outcome = timing.await;
    progress.finish();
    link_a.close();
    link_b.close();
    let (hist, elapsed) = outcome??;
    Ok(LoadResult {
        hist,
        elapsed,
        errors: 0,
        first_error: None,
    })
}

/// One ratio of the run: `numerator / denominator` of two rows' figures.
struct Ratio {
    key: &'static str,
    label: String,
    numerator: Option<f64>,
    denominator: Option<f64>,
    /// Latencies (µs) or throughputs (ops/s).
    latency: bool,
    /// How to read the ratio, given its value.
    reading: fn(f64) -> String,
}

impl Ratio {
    fn value(&self) -> Option<f64> {
        match (self.numerator, self.denominator) {
            (Some(n), Some(d)) if n > 0.0 && d > 0.0 => Some(n / d),
            _ => None,
        }
    }
}

fn figure(latency: bool, v: Option<f64>) -> String {
    match v {
        Some(v) if latency => human_us(v),
        Some(v) => format!("{} ops/s", crate::report::group(v.round() as u64)),
        None => "-".to_string(),
    }
}

fn lower(who: &'static str, other: &'static str) -> impl Fn(f64) -> String {
    move |r: f64| {
        if r >= 1.0 {
            format!("{who} {r:.2}× lower")
        } else {
            format!("{other} {:.2}× lower", 1.0 / r)
        }
    }
}

/// The ratios of the run (rows that were not measured give `-`): a markdown table, and one record per
/// ratio for the JSON output (scenario `ratio`, the ratio and both figures in its extras).
pub fn ratios(records: &[Record]) -> (String, Vec<Record>) {
    let find = |scenario: &str, transport: &str, from: &str, what: &str, concurrency: usize| {
        records
            .iter()
            .find(|r| {
                r.scenario == scenario
                    && r.transport == transport
                    && r.from == from
                    && r.what == what
                    && r.concurrency == concurrency
                    && r.storage != "durable"
                    && r.summary.n > 0
            })
            .map(|r| (r.summary.p50_us, r.ops_per_s))
    };
    let p50 = |s, t, f, w| find(s, t, f, w, 1).map(|x| x.0);
    // The `rtt` rows of the start and of the end of the run: the mean of their p50s.
    let rtt_p50 = |what: &str| {
        let all: Vec<f64> = records
            .iter()
            .filter(|r| {
                r.scenario == "rtt" && r.from == ACROSS && r.what == what && r.summary.n > 0
            })
            .map(|r| r.summary.p50_us)
            .collect();
        (!all.is_empty()).then(|| all.iter().sum::<f64>() / all.len() as f64)
    };
    let rtt = rtt_p50(RTT_REQUEST);
    let frame_rtt = rtt_p50(RTT_FRAME);
    let leader = p50("latency", TRANSPORT, "leader", "map.set sequential");
    let follower = p50("latency", TRANSPORT, "follower", "map.set sequential");
    let kv = p50(
        "latency",
        KV_CLUSTER_TRANSPORT,
        "client",
        "kv.put sequential",
    );
    let ops = |t, f, w, c| find("throughput", t, f, w, c).map(|x| x.1);
    let times = |r: f64| format!("{r:.2} round trips");
    let mut list = vec![
        Ratio {
            key: "leader_write_p50_over_rtt_p50",
            label: "hamok leader write p50 / NATS rtt p50 (different servers)".into(),
            numerator: leader,
            denominator: rtt,
            latency: true,
            reading: times,
        },
        Ratio {
            key: "follower_write_p50_over_rtt_p50",
            label: "hamok follower write p50 / NATS rtt p50 (different servers)".into(),
            numerator: follower,
            denominator: rtt,
            latency: true,
            reading: times,
        },
        Ratio {
            key: "leader_write_p50_over_frame_rtt_p50",
            label: "hamok leader write p50 / hamok frame ping-pong p50 (different servers)".into(),
            numerator: leader,
            denominator: frame_rtt,
            latency: true,
            reading: times,
        },
        Ratio {
            key: "kv_put_p50_over_leader_write_p50",
            label: "KV R3 put p50 / hamok leader write p50".into(),
            numerator: kv,
            denominator: leader,
            latency: true,
            reading: |r| lower("hamok", "KV R3")(r),
        },
        Ratio {
            key: "kv_put_p50_over_follower_write_p50",
            label: "KV R3 put p50 / hamok follower write p50".into(),
            numerator: kv,
            denominator: follower,
            latency: true,
            reading: |r| lower("hamok", "KV R3")(r),
        },
    ];
    for (key, c) in [
        ("leader_ops_over_kv_ops_100", 100usize),
        ("leader_ops_over_kv_ops_1000", 1_000),
    ] {
        list.push(Ratio {
            key,
            label: format!(
                "throughput hamok (leader) / KV R3, {} in flight",
                crate::report::group(c as u64)
            ),
            numerator: ops(TRANSPORT, "leader", "map.set", c),
            denominator: ops(KV_CLUSTER_TRANSPORT, "client", "kv.put", c),
            latency: false,
            reading: |r| {
                if r >= 1.0 {
                    format!("hamok {r:.2}× higher")
                } else {
                    format!("KV R3 {:.2}× higher", 1.0 / r)
                }
            },
        });
    }
    let mut table = String::from(
        "| ratio | numerator | denominator | value | reading |\n|---|---:|---:|---:|---|",
    );
    let mut out = Vec::new();
    for ratio in &list {
        let value = ratio.value();
        table.push_str(&format!(
            "\n| {} | {} | {} | {} | {} |",
            ratio.label,
            figure(ratio.latency, ratio.numerator),
            figure(ratio.latency, ratio.denominator),
            value.map_or("-".to_string(), |v| format!("{v:.2}")),
            value.map_or("-".to_string(), ratio.reading),
        ));
        let mut r =
            Record::new("ratio", TRANSPORT, SERVERS, "-", &ratio.label).extra("key", ratio.key);
        r.storage = "-".into();
        let unit = if ratio.latency { "p50_us" } else { "ops_per_s" };
        if let Some(v) = value {
            r = r.extra("ratio", v).extra("reading", (ratio.reading)(v));
        }
        if let Some(v) = ratio.numerator {
            r = r.extra(&format!("numerator_{unit}"), v);
        }
        if let Some(v) = ratio.denominator {
            r = r.extra(&format!("denominator_{unit}"), v);
        }
        out.push(r);
    }
    table.push_str(
        "\n\nrtt and ping-pong p50: between clients on servers 0 and 1, the mean of the rows of the \
         start and of the end of the run.",
    );
    (table, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(scenario: &str, transport: &str, from: &str, what: &str, c: usize) -> Record {
        let mut r = Record::new(scenario, transport, 3, from, what);
        r.concurrency = c;
        r.summary.n = 100;
        r
    }

    #[test]
    fn ratios_of_the_rows() {
        let p50 = |mut r: Record, us: f64| {
            r.summary.p50_us = us;
            r
        };
        let ops = |mut r: Record, ops: f64| {
            r.ops_per_s = ops;
            r
        };
        let records = vec![
            p50(row("rtt", TRANSPORT, ACROSS, RTT_REQUEST, 1), 80.0),
            p50(row("rtt", TRANSPORT, ACROSS, RTT_REQUEST, 1), 120.0),
            p50(row("rtt", TRANSPORT, WITHIN, RTT_REQUEST, 1), 50.0),
            p50(
                row("latency", TRANSPORT, "leader", "map.set sequential", 1),
                300.0,
            ),
            p50(
                row("latency", TRANSPORT, "follower", "map.set sequential", 1),
                600.0,
            ),
            p50(
                row(
                    "latency",
                    KV_CLUSTER_TRANSPORT,
                    "client",
                    "kv.put sequential",
                    1,
                ),
                450.0,
            ),
            ops(
                row("throughput", TRANSPORT, "leader", "map.set", 100),
                30_000.0,
            ),
            ops(
                row("throughput", KV_CLUSTER_TRANSPORT, "client", "kv.put", 100),
                20_000.0,
            ),
            ops(
                row("throughput", TRANSPORT, "leader", "map.set", 1_000),
                40_000.0,
            ),
        ];
        let (table, out) = ratios(&records);
        assert_eq!(out.len(), 7, "{table}");
        assert_eq!(
            table.lines().filter(|l| l.starts_with('|')).count(),
            9,
            "{table}"
        );
        assert!(
            table.contains("| 300.0 µs | 100.0 µs | 3.00 | 3.00 round trips |"),
            "{table}"
        );
        assert!(table.contains("| 1.50 | hamok 1.50× lower |"), "{table}");
        assert!(table.contains("| 0.75 | KV R3 1.33× lower |"), "{table}");
        assert!(table.contains("| 1.50 | hamok 1.50× higher |"), "{table}");
        // No frame ping-pong row, no KV row at 1,000 in flight: no ratio.
        assert!(table.contains("| 40,000 ops/s | - | - | - |"), "{table}");
        let mut json = String::new();
        out[0].json(&mut json);
        assert!(json.contains("\"ratio\": 3"), "{json}");
        assert!(
            json.contains("\"key\": \"leader_write_p50_over_rtt_p50\""),
            "{json}"
        );
    }
}
