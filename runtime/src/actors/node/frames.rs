//! Frames in and out of one peer: the codec with its counted drops, and the [`Output`] every concern
//! writes to (frames to send, events to report, a reason to stop). The actor shell drains the output
//! after each input; nothing here does I/O.

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::broadcast;

use crate::config::HamokConfig;
use crate::events::HamokEvent;
use crate::raft::PeerId;
use crate::stats::Counters;
use crate::wire::{self, DecodeError, Frame, FrameKey, HamokMessage, PROTOCOL_VERSION};

/// What the peer wants done: frames to send and a stop, collected while it handles one input, and
/// events, reported at once (so an event is out before the answer it goes with: a caller woken by the
/// answer finds the event already sent).
pub(crate) struct Output {
    /// Frames to send, in order: to one peer, or to all with `None`.
    pub frames: Vec<(Option<PeerId>, HamokMessage)>,
    /// Where events go (a bounded broadcast: a lagging subscriber loses the oldest; nobody listening is
    /// fine).
    events: broadcast::Sender<HamokEvent>,
    /// The peer cannot go on (e.g. a committed collection kind it does not know): stop it.
    pub stop: Option<String>,
    /// Latencies that ended during this input: the metric and when it started (in the peer's
    /// `now_ms` time base). The shell records them with its clock when it drains the output.
    pub latencies: Vec<(&'static str, u64)>,
}

impl Output {
    pub(super) fn new(events: broadcast::Sender<HamokEvent>) -> Self {
        Output {
            frames: Vec::new(),
            events,
            stop: None,
            latencies: Vec::new(),
        }
    }

    pub(super) fn send(&mut self, to: PeerId, body: HamokMessage) {
        self.frames.push((Some(to), body));
    }

    pub(super) fn broadcast(&mut self, body: HamokMessage) {
        self.frames.push((None, body));
    }

    pub(super) fn emit(&mut self, event: HamokEvent) {
        let _ = self.events.send(event);
    }

    /// Something measured by `metric` (a name of [`crate::stats::metric_names`]) that started at
    /// `started_ms` ended now.
    pub(super) fn latency(&mut self, metric: &'static str, started_ms: u64) {
        self.latencies.push((metric, started_ms));
    }
}

/// The wire codec of one peer: its identity on the bus and the optional frame key.
pub(super) struct Codec {
    id: PeerId,
    cluster: String,
    /// The incarnation of the cluster this peer belongs to, stamped on every frame (0: none yet).
    pub(super) incarnation: u64,
    max_frame_bytes: usize,
    key: Option<FrameKey>,
}

impl Codec {
    pub(super) fn new(id: PeerId, config: &HamokConfig) -> Self {
        Codec {
            id,
            cluster: config.cluster_id.clone(),
            incarnation: 0,
            max_frame_bytes: config.max_frame_bytes,
            key: config
                .cluster_key
                .as_ref()
                .map(|k| FrameKey::new(k.as_bytes())),
        }
    }

    /// Encodes one outgoing frame.
    pub(super) fn encode(
        &self,
        to: Option<PeerId>,
        body: HamokMessage,
    ) -> Result<Bytes, rmp_serde::encode::Error> {
        let frame = Frame {
            version: PROTOCOL_VERSION,
            cluster: self.cluster.clone(),
            incarnation: self.incarnation,
            from: self.id.clone(),
            to,
            body,
        };
        wire::encode_with(&frame, self.key.as_ref())
    }

    /// Decodes one incoming frame. A frame that is dropped is counted; one that should alarm the
    /// operator (garbage, a frame without a valid tag) is reported as an event. A frame of this
    /// cluster in another protocol version is the caller's to act on ([`Dropped::OtherVersion`]).
    pub(super) fn decode(
        &self,
        bytes: &Bytes,
        counters: &Arc<Counters>,
        out: &mut Output,
    ) -> Result<Frame, Dropped> {
        Counters::bump(&counters.frames_in);
        match wire::decode_shared(
            bytes,
            &self.cluster,
            &self.id,
            self.max_frame_bytes,
            self.key.as_ref(),
        ) {
            Ok(frame) if frame.from == self.id => Err(Dropped::Counted), // our own broadcast, echoed
            Ok(frame) => Ok(frame),
            Err(e) => {
                let counter = match &e {
                    DecodeError::ForeignCluster(_) => &counters.dropped_foreign_cluster,
                    DecodeError::Version(_) => &counters.dropped_version,
                    DecodeError::Unauthenticated => &counters.dropped_unauthenticated,
                    DecodeError::NotForUs => &counters.dropped_misrouted,
                    DecodeError::Malformed(_) | DecodeError::TooLarge(_) => {
                        &counters.dropped_malformed
                    }
                };
                Counters::bump(counter);
                if !matches!(e, DecodeError::NotForUs) {
                    // Per frame: debug only (the shell sums drops up in a periodic warning).
                    tracing::debug!(peer = %self.id, reason = %e, "frame dropped");
                }
                match e {
                    DecodeError::Version(version) => Err(Dropped::OtherVersion(version)),
                    DecodeError::ForeignCluster(_) | DecodeError::NotForUs => Err(Dropped::Counted),
                    _ => {
                        out.emit(HamokEvent::Error(format!("dropped frame: {e}")));
                        Err(Dropped::Counted)
                    }
                }
            }
        }
    }
}

/// Why [`Codec::decode`] gave no frame (the frame is counted either way).
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Dropped {
    /// Not for this peer, not readable, or its own broadcast echoed back.
    Counted,
    /// A frame of this cluster in protocol version `.0`: a peer of another build speaks on the bus.
    OtherVersion(u16),
}
