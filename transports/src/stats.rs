//! What a transport did with the frames it carried: [`TransportStats`].

/// Counters of one transport value (a `NatsTransport` or `AmqpTransport` and its clones), summed over
/// every link it opened. Read with `transport.stats()`; every field only grows.
///
/// A transport is best effort: Raft retransmits what is lost, so a drop costs latency, never safety.
/// `dropped` is the total of the frames lost by this transport, for any reason; the `dropped_*` fields
/// break it down. Frames the runtime itself rejects (garbage, another cluster, another protocol version)
/// are delivered by the transport and counted by the peer (`Hamok::stats()`: `dropped_malformed`,
/// `dropped_foreign_cluster`, `dropped_version`), not here.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TransportStats {
    /// Links established (`Transport::connect` calls that succeeded).
    pub links_opened: u64,
    /// Links that died (their `closed()` resolved) other than by `close()`; each one makes the
    /// runtime reconnect.
    pub links_lost: u64,
    /// `Transport::connect` calls that failed (broker down, refused, bad credentials, timeout).
    pub connect_failures: u64,
    /// Times a live connection lost its broker (NATS: the client then reconnects by itself; RabbitMQ:
    /// the link dies and the runtime reconnects).
    pub disconnects: u64,
    /// Times the NATS client reconnected by itself, subscriptions restored (always 0 for RabbitMQ,
    /// where a new link is made instead).
    pub reconnects: u64,
    /// Frames handed to the broker client.
    pub frames_sent: u64,
    /// Payload bytes of `frames_sent`.
    pub bytes_sent: u64,
    /// Broker messages that carried `frames_sent`: one per destination per batch of the link's writer
    /// (the frames queued for one peer travel together; a broadcast alone).
    pub messages_sent: u64,
    /// Frames received from the broker (including those the peer then refused as saturated).
    pub frames_received: u64,
    /// Payload bytes of `frames_received`.
    pub bytes_received: u64,
    /// RabbitMQ only: this peer's own broadcasts, routed back to its queue by the exchange and skipped
    /// (not a loss). NATS never echoes (the connection is made with `no_echo`).
    pub self_echo_skipped: u64,
    /// Total frames lost by the transport: the sum of the `dropped_*` fields below.
    pub dropped: u64,
    /// Not sent: the link's bounded outbound queue was full (broker slower than the peer).
    pub dropped_queue_full: u64,
    /// Not sent: the link was closed or the client was disconnected from the broker.
    pub dropped_link_down: u64,
    /// Not sent: larger than the broker accepts (NATS `max_payload`, 1 MiB by default).
    pub dropped_too_large: u64,
    /// Not sent: addressed to a peer id that cannot be a subject token / routing key.
    pub dropped_invalid_target: u64,
    /// Lost: the broker client failed to publish it.
    pub dropped_publish_failed: u64,
    /// Lost on receipt, NATS only: the client's subscription buffer was full (async-nats drops the message
    /// and reports a slow consumer). Counts messages, not the frames they carried (a dropped message is
    /// never seen): a lower bound, as the client's event channel is itself bounded.
    pub dropped_slow_consumer: u64,
    /// Lost on receipt: the peer's bounded inbound queue was full (`Inbound::deliver` refused it; the
    /// peer's own `dropped_inbound_full` counts the same frames).
    pub dropped_inbound_full: u64,
    /// RabbitMQ with publisher confirms only: the broker refused (nacked) the publish (every frame of
    /// the message).
    pub dropped_nacked: u64,
}
