//! The NATS adapter against a real NATS server (`HAMOK_NATS_URL`, default nats://127.0.0.1:4222).
//! A server that does not answer fails the tests with a message saying so: they never skip.
#![cfg(feature = "nats")]

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use hamok_runtime::HamokError;
use hamok_transports::nats::{NatsTransport, NatsTransportBuilder, DEFAULT_NATS_URL, NATS_URL_ENV};
use hamok_transports::TransportStats;

impl TestTransport for NatsTransport {
    fn stats(&self) -> TransportStats {
        NatsTransport::stats(self)
    }
}

async fn server() -> String {
    require_broker("NATS", NATS_URL_ENV, DEFAULT_NATS_URL, 4222).await
}

fn builder(url: &str) -> NatsTransportBuilder {
    NatsTransport::builder().server(url)
}

fn transport(url: &str) -> NatsTransport {
    builder(url).build().expect("NATS transport settings")
}

scenario_tests! {
    broker: server, transport: transport;
    three_peers_join_write_and_survive_leader_loss => three_peers("nats3"),
    two_clusters_share_a_server => two_clusters("nats2"),
    link_routing_echo_and_close => link_routing("natsr"),
    full_inbound_drops_and_counts => inbound_bound("natsi"),
    bursts_travel_several_frames_per_message_in_order => bursts_in_order_per_stream("natsb"),
    authenticated_frames_and_batches_share_the_bus => authenticated("natsk"),
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_frames_are_dropped_and_counted() {
    let url = server().await;
    let raw = async_nats::connect(url.as_str())
        .await
        .expect("raw NATS client");
    let subjects = transport(&url);
    garbage_frames(
        "natsg",
        || transport(&url),
        |cluster: String, target: Target, bytes: Bytes| {
            let subject = match target {
                Target::Broadcast => subjects.broadcast_subject(&cluster),
                Target::Peer(p) => subjects.peer_subject(&cluster, &p),
            };
            let raw = raw.clone();
            async move {
                raw.publish(subject, bytes).await.expect("raw publish");
            }
        },
    )
    .await;
    raw.flush().await.expect("flush");
}

/// A transport reaching the server through `proxy` that gives up on a disconnected client after
/// `max_disconnected`.
fn through(proxy: &Proxy, max_disconnected: Duration) -> NatsTransport {
    builder(&format!("nats://{}", proxy.addr))
        .max_disconnected(Some(max_disconnected))
        .reconnect_delay_max(Duration::from_millis(250))
        .build()
        .unwrap()
}

/// A short outage: the client reconnects by itself and re-subscribes; the links stay up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_outage_client_reconnects() {
    let url = server().await;
    let proxy = Proxy::start(host_port(&url, 4222)).await;
    let make = || through(&proxy, Duration::from_secs(10));
    let transports = outage("natso", &proxy, Duration::from_millis(1_500), make).await;
    let s = transports[0].stats();
    assert!(s.disconnects >= 1 && s.reconnects >= 1, "{s:?}");
    assert_eq!(s.links_lost, 0, "the client reconnected by itself: {s:?}");
}

/// A longer outage than `max_disconnected`: the link reports itself dead and the runtime reconnects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_outage_runtime_reconnects() {
    let url = server().await;
    let proxy = Proxy::start(host_port(&url, 4222)).await;
    let make = || through(&proxy, Duration::from_millis(500));
    let transports = outage("natsl", &proxy, Duration::from_millis(2_000), make).await;
    let s = transports[0].stats();
    assert!(s.links_lost >= 1 && s.links_opened >= 2, "{s:?}");
}

/// A link whose server is gone reports a connect failure; the runtime keeps retrying.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_to_nothing_fails_fast() {
    let nothing = builder("nats://127.0.0.1:1")
        .connect_timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    unreachable_broker(nothing).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_outbound_queue_refuses_and_counts() {
    let url = server().await;
    let small = builder(&url).outbound_capacity(8).build().unwrap();
    outbound_queue_bound("natsq", small, || transport(&url)).await;
}

/// async-nats drops messages when a subscription's buffer is full: each drop is reported as a slow
/// consumer and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumer_drops_are_counted() {
    let url = server().await;
    let cluster = unique_id("natss");
    let slow = builder(&url).subscription_capacity(4).build().unwrap();
    // A peer that takes 2 ms per frame (blocking its reader on purpose).
    let inbound = hamok_runtime::transport::Inbound::new(1 << 20, |_| {
        std::thread::sleep(Duration::from_millis(2))
    });
    let (ia, _) = collector(16);
    let _b = connect(&slow, &cluster, "b", inbound).await;
    // One frame per message: the subscription's buffer counts messages.
    let one_per_message = builder(&url).publish_batch(1).build().unwrap();
    let a = connect(&one_per_message, &cluster, "a", ia).await;
    const N: u64 = 300;
    for i in 0..N {
        a.send(
            &hamok_runtime::raft::PeerId::from("b"),
            Bytes::from(i.to_le_bytes().to_vec()),
        )
        .unwrap();
    }
    eventually("the slow consumer's drops to be reported", WAIT, || {
        let s = slow.stats();
        async move { (s.dropped_slow_consumer > 0).then_some(()) }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let s = slow.stats();
    println!("[natss] {s:?}");
    assert!(s.frames_received < N, "{s:?}");
    assert!(s.frames_received + s.dropped_slow_consumer <= N, "{s:?}");
}

/// After a reconnect to a server with a smaller `max_payload`, the link keeps to the new limit: a
/// frame above it is refused with a typed error, and frames coalesced into one message stay within it
/// (a body sized for the first server would be refused by the client and its frames lost).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_to_a_server_with_a_smaller_payload_limit_is_honoured() {
    use hamok_runtime::raft::PeerId;
    use hamok_testkit::nats_cluster::NatsCluster;
    const SMALL_LIMIT_BYTES: usize = 64 * 1024;

    let big = server().await; // the machine's server: the default limit, 1 MiB
    let config = tempfile::NamedTempFile::new().expect("a temporary file");
    std::fs::write(config.path(), format!("max_payload: {SMALL_LIMIT_BYTES}\n")).expect("config");
    let small = NatsCluster::builder()
        .servers(1)
        .jetstream(false)
        .arg("-c")
        .arg(config.path().display().to_string())
        .start()
        .await
        .unwrap_or_else(|e| {
            panic!("a private nats-server with max_payload {SMALL_LIMIT_BYTES}: {e}")
        });
    let small_url = small.client_url(0);

    let cluster = unique_id("natsm");
    let proxy = Proxy::start(host_port(&big, 4222)).await;
    let moving = builder(&format!("nats://{}", proxy.addr))
        .reconnect_delay_max(Duration::from_millis(100))
        .build()
        .unwrap();
    let (ia, _) = collector(16);
    let a = connect(&moving, &cluster, "a", ia).await;
    assert!(
        a.send(&PeerId::from("b"), Bytes::from(vec![7u8; 100 * 1024]))
            .is_ok(),
        "100 KiB is within the first server's limit"
    );

    // The client's connection moves to the small server.
    proxy.retarget(host_port(&small_url, 4222));
    let reconnects = moving.stats().reconnects;
    proxy.outage(Duration::from_millis(200)).await;
    eventually("the client to reconnect to the small server", WAIT, || {
        let s = moving.stats();
        async move { (s.reconnects > reconnects).then_some(()) }
    })
    .await;
    let stationary = transport(&small_url);
    let (ib, got_b) = collector(4096);
    let _b = connect(&stationary, &cluster, "b", ib).await;

    match a.send(&PeerId::from("b"), Bytes::from(vec![7u8; 100 * 1024])) {
        Err(HamokError::TooLarge { size, limit }) => {
            assert_eq!((size, limit), (100 * 1024, SMALL_LIMIT_BYTES))
        }
        other => panic!("a frame above the new server's limit: {other:?}"),
    }
    // 200 frames of 2 KiB, queued at once: several to a message, no message above 64 KiB.
    let before = moving.stats();
    const FRAMES: usize = 200;
    let sent: Vec<Bytes> = (0..FRAMES)
        .map(|i| {
            let mut frame = vec![(i % 251) as u8; 2 * 1024];
            frame[..4].copy_from_slice(&(i as u32).to_le_bytes());
            Bytes::from(frame)
        })
        .collect();
    for frame in &sent {
        a.send(&PeerId::from("b"), frame.clone()).unwrap();
    }
    eventually("b to get every frame", WAIT, || {
        let n = got_b.lock().unwrap().len();
        async move { (n >= FRAMES).then_some(()) }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        *got_b.lock().unwrap(),
        sent,
        "each frame whole, once, in order"
    );
    let after = moving.stats();
    println!("[natsm] {after:?}");
    assert_eq!(
        after.dropped_publish_failed, before.dropped_publish_failed,
        "{after:?}"
    );
    let messages = after.messages_sent - before.messages_sent;
    assert!(
        messages < FRAMES as u64 && messages >= (FRAMES * 2 * 1024 / SMALL_LIMIT_BYTES) as u64,
        "{messages} messages for {FRAMES} frames: coalesced, within the small limit"
    );
}
