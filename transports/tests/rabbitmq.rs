//! The RabbitMQ adapter against a real broker (`HAMOK_AMQP_URL`, default
//! amqp://guest:guest@127.0.0.1:5672/%2f). A broker that does not answer fails the tests with a message
//! saying so: they never skip.
#![cfg(feature = "rabbitmq")]

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use hamok_transports::rabbitmq::{
    peer_routing_key, AmqpTransport, AmqpTransportBuilder, AMQP_URL_ENV, BROADCAST_KEY,
    DEFAULT_AMQP_URL,
};
use hamok_transports::TransportStats;
use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Connection, ConnectionProperties};

impl TestTransport for AmqpTransport {
    fn stats(&self) -> TransportStats {
        AmqpTransport::stats(self)
    }
}

async fn broker() -> String {
    require_broker("RabbitMQ", AMQP_URL_ENV, DEFAULT_AMQP_URL, 5672).await
}

fn builder(url: &str) -> AmqpTransportBuilder {
    AmqpTransport::builder().url(url)
}

fn transport(url: &str) -> AmqpTransport {
    builder(url).build().expect("AMQP transport settings")
}

/// The URL with its `host:port` replaced by `addr`.
fn via(url: &str, addr: &str) -> String {
    let hp = host_port(url, 5672);
    if url.contains(&hp) {
        url.replacen(&hp, addr, 1)
    } else {
        // No port in the URL: the host alone.
        let host = hp
            .rsplit_once(':')
            .map(|(h, _)| h)
            .unwrap_or(&hp)
            .to_string();
        url.replacen(&host, addr, 1)
    }
}

scenario_tests! {
    broker: broker, transport: transport;
    three_peers_join_write_and_survive_leader_loss => three_peers("amqp3"),
    two_clusters_share_a_broker => two_clusters("amqp2"),
    link_routing_echo_and_close => link_routing("amqpr"),
    full_inbound_drops_and_counts => inbound_bound("amqpi"),
    bursts_travel_several_frames_per_message_in_order => bursts_in_order("amqpb"),
    authenticated_frames_and_batches_share_the_bus => authenticated("amqpk"),
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_frames_are_dropped_and_counted() {
    let url = broker().await;
    let conn = Connection::connect(&url, ConnectionProperties::default())
        .await
        .expect("raw AMQP connection");
    let channel = conn.create_channel().await.expect("raw AMQP channel");
    let names = transport(&url);
    garbage_frames(
        "amqpg",
        || transport(&url),
        |cluster: String, target: Target, bytes: Bytes| {
            let exchange = names.exchange(&cluster);
            let key = match target {
                Target::Broadcast => BROADCAST_KEY.to_string(),
                Target::Peer(p) => peer_routing_key(&p),
            };
            let channel = channel.clone();
            async move {
                channel
                    .basic_publish(
                        exchange.as_str().into(),
                        key.as_str().into(),
                        BasicPublishOptions::default(),
                        &bytes,
                        BasicProperties::default(),
                    )
                    .await
                    .expect("raw publish");
            }
        },
    )
    .await;
    let _ = conn.close(200, "done".into()).await;
}

/// The broker is cut off: every link dies, the runtime reconnects with backoff and re-declares the
/// topology, and the cluster is healthy again with every acknowledged write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_outage_links_reconnect() {
    let url = broker().await;
    let proxy = Proxy::start(host_port(&url, 5672)).await;
    let through = via(&url, &proxy.addr);
    let transports = outage("amqpo", &proxy, Duration::from_millis(1_500), || {
        transport(&through)
    })
    .await;
    for t in &transports {
        let s = t.stats();
        assert!(s.links_lost >= 1 && s.links_opened >= 2, "{s:?}");
    }
}

/// Publisher confirms on: the same cluster works, nothing is nacked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publisher_confirms() {
    let url = broker().await;
    three_peers("amqpc", || {
        builder(&url).publisher_confirms(true).build().unwrap()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_to_nothing_fails_fast() {
    let nothing = builder("amqp://guest:guest@127.0.0.1:1/%2f")
        .connect_timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    unreachable_broker(nothing).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_outbound_queue_refuses_and_counts() {
    let url = broker().await;
    let small = builder(&url).outbound_capacity(8).build().unwrap();
    outbound_queue_bound("amqpq", small, || transport(&url)).await;
}
