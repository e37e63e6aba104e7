//! The Raft node actor: a thin shell around [`Peer`], the peer's pure logic.
//!
//! The shell is the only part that reads the clock (tokio's, so a paused test clock drives it), holds
//! the live transport link and publishes the [`PeerStatus`]. Everything it receives becomes one
//! call on the [`Peer`] with the current time; after each, it sends the frames the peer produced,
//! publishes the status and, when the engine has output, posts itself a `Flush` (so
//! a burst of input is processed in batches). One message at a time: no locks.
//!
//! The logic lives one concern per file, each owning its fields: [`frames`] (codec and the peer's
//! output), [`apply`] (log store, state machines, snapshots), [`requests`], [`reads`], [`discovery`]
//! (join and rejoin rules, bootstrap), [`admission`] (the leader's membership duties), [`leave`],
//! composed by [`peer`].

mod admission;
mod apply;
mod discovery;
mod frames;
mod leave;
mod peer;
mod planted_bugs;
mod reads;
mod requests;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::sync::{broadcast, oneshot, watch};
use tokio::time::Instant;

pub(crate) use apply::AttachFn;
pub(crate) use peer::DirectFn;
pub(crate) use peer::{Peer, PeerArgs};
#[cfg(not(feature = "testing"))]
pub(crate) use planted_bugs::PlantedBugs;
#[cfg(feature = "testing")]
pub use planted_bugs::PlantedBugs;
pub(crate) use reads::{QueryFn, Served};

use crate::error::HamokError;
use crate::events::HamokEvent;
use crate::raft::PeerId;
use crate::state_machine::Op;
use crate::stats::metric_names::{APPLY_SECONDS, PEER_LABEL};
use crate::stats::{Counters, LeaderContact, PeerStatus};
use crate::transport::{Inbound, Link};

/// Messages of the node actor.
pub(crate) enum NodeMsg {
    /// A frame from the transport.
    Inbound(Bytes),
    /// Timer.
    Tick,
    /// Process the engine's output (posted to self, so bursts of input are batched).
    Flush,
    /// The transport (re)connected.
    LinkUp(Arc<dyn Link>),
    /// The transport lost its connection.
    LinkDown,
    /// Start discovery and joining.
    Join,
    /// Leave the cluster; answered when done.
    Leave(oneshot::Sender<Result<(), HamokError>>),
    /// Submit an operation; answered once applied on this peer.
    Submit {
        op: Op<'static>,
        timeout: Duration,
        reply: oneshot::Sender<Result<Bytes, HamokError>>,
    },
    /// Run a closure on a collection, after a ReadIndex barrier if `linearizable`.
    Query {
        collection: String,
        linearizable: bool,
        timeout: Duration,
        f: QueryFn,
    },
    /// Register a hook run on a collection's state machine whenever it is (re)created, and now if it exists.
    Attach { collection: String, hook: AttachFn },
    /// Register the handler of a direct-message channel.
    OnDirect { channel: String, handler: DirectFn },
    /// Send a direct message to one peer, or to all with `None`.
    SendDirect {
        to: Option<PeerId>,
        channel: String,
        payload: Bytes,
    },
    /// The leader's view of each member's match index (empty on a follower).
    Replication(oneshot::Sender<Vec<(PeerId, crate::raft::LogIndex)>>),
    /// A background sync of the store ended (from the store's sync thread).
    Synced {
        ticket: u64,
        result: Result<(), crate::store::StorageError>,
    },
}

/// Everything the node actor starts from. The peer is built (and its store loaded) by the caller, so
/// a store that cannot be loaded fails `HamokBuilder::build` with its typed error.
pub(crate) struct NodeArgs {
    pub peer: Peer,
    pub tick_interval_ms: u64,
    pub inbound: Inbound,
    pub view: watch::Sender<PeerStatus>,
    pub events: broadcast::Sender<HamokEvent>,
    pub counters: Arc<Counters>,
    pub contact: Arc<LeaderContact>,
}

/// How often, at most, a warning sums up the frames dropped since the last one.
const DROP_SUMMARY_INTERVAL_MS: u64 = 10_000;

pub(crate) struct NodeState {
    peer: Peer,
    /// The peer's id, as the label of its metrics.
    label: Arc<str>,
    /// Every message is handled inside it (so every event carries the peer).
    span: tracing::Span,
    started: Instant,
    link: Option<Arc<dyn Link>>,
    inbound: Inbound,
    view: watch::Sender<PeerStatus>,
    counters: Arc<Counters>,
    contact: Arc<LeaderContact>,
    flush_scheduled: bool,
    /// Frames dropped as of the last summary, and when it was (`now_ms`).
    drops_reported: (u64, u64),
}

/// The node actor.
pub(crate) struct NodeActor;

impl Actor for NodeActor {
    type Msg = NodeMsg;
    type State = NodeState;
    type Arguments = NodeArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<NodeMsg>,
        args: NodeArgs,
    ) -> Result<NodeState, ActorProcessingErr> {
        let tick = Duration::from_millis(args.tick_interval_ms);
        myself.send_interval(tick, || NodeMsg::Tick);
        let id = args.peer.id().to_string();
        let mut peer = args.peer;
        // A background sync's outcome comes back as a message, handled in turn with the rest.
        let me = myself.clone();
        peer.set_sync_notifier(Arc::new(move |ticket, result| {
            let _ = me.send_message(NodeMsg::Synced { ticket, result });
        }));
        let state = NodeState {
            span: tracing::info_span!("hamok_peer", peer = %id),
            label: Arc::from(id),
            peer,
            started: args.contact.started(),
            link: None,
            inbound: args.inbound,
            view: args.view,
            counters: args.counters,
            contact: args.contact,
            flush_scheduled: false,
            drops_reported: (0, 0),
        };
        state.publish_view();
        Ok(state)
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<NodeMsg>,
        state: &mut NodeState,
    ) -> Result<(), ActorProcessingErr> {
        state.peer.close();
        let _ = state.drain();
        if let Some(link) = state.link.take() {
            link.close();
        }
        state.view.send_modify(|v| v.closed = true);
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<NodeMsg>,
        msg: NodeMsg,
        state: &mut NodeState,
    ) -> Result<(), ActorProcessingErr> {
        let span = state.span.clone();
        let _entered = span.enter();
        let now_ms = state.now_ms();
        let mut publish = true;
        let peer = &mut state.peer;
        match msg {
            NodeMsg::Inbound(bytes) => {
                state.inbound.processed();
                peer.on_frame(now_ms, &bytes);
                publish = false; // a flush follows if anything changed
            }
            NodeMsg::Tick => {
                peer.tick(now_ms);
                state.summarize_drops(now_ms);
            }
            NodeMsg::Flush => {
                state.flush_scheduled = false;
                let label = &state.label;
                let (link, counters) = (&state.link, &state.counters);
                peer.flush(
                    now_ms,
                    &mut |apply| {
                        let began = Instant::now();
                        apply();
                        metrics::histogram!(APPLY_SECONDS, PEER_LABEL => label.clone())
                            .record(began.elapsed().as_secs_f64());
                    },
                    &mut |frames| send_frames(link.as_ref(), counters, frames),
                );
            }
            NodeMsg::LinkUp(link) => {
                Counters::bump(&state.counters.transport_connects);
                tracing::info!(peer = %state.label, "transport link up");
                state.link = Some(link);
                peer.link_up();
            }
            NodeMsg::LinkDown => {
                if state.link.take().is_some() {
                    // Also the last word of an orderly close; a lost link is warned about by the
                    // supervisor ("transport link lost: reconnecting").
                    tracing::info!(peer = %state.label, "transport link down");
                }
            }
            NodeMsg::Join => peer.join(now_ms),
            NodeMsg::Leave(reply) => peer.leave(now_ms, reply),
            NodeMsg::Submit { op, timeout, reply } => {
                peer.submit(now_ms, op, duration_ms(timeout), reply);
                publish = false;
            }
            NodeMsg::Query {
                collection,
                linearizable,
                timeout,
                f,
            } => {
                peer.query(now_ms, collection, linearizable, duration_ms(timeout), f);
                publish = false;
            }
            NodeMsg::Attach { collection, hook } => peer.attach(collection, hook),
            NodeMsg::OnDirect { channel, handler } => peer.on_direct(channel, handler),
            NodeMsg::SendDirect {
                to,
                channel,
                payload,
            } => peer.send_direct(to, channel, payload),
            NodeMsg::Replication(reply) => {
                let _ = reply.send(peer.replication());
                publish = false;
            }
            NodeMsg::Synced { ticket, result } => {
                peer.on_synced(ticket, result);
                publish = false;
            }
        }
        state.contact.record(state.peer.leader_contact_ms(now_ms));
        let stop = state.drain();
        if publish {
            state.publish_view();
        }
        if state.peer.has_ready() && !state.flush_scheduled {
            state.flush_scheduled = true;
            myself.send_message(NodeMsg::Flush)?;
        }
        if let Some(reason) = stop {
            myself.stop(Some(reason));
        }
        Ok(())
    }
}

/// Sends encoded frames through `link` (to one peer, or to all with `None`), counting each.
fn send_frames(
    link: Option<&Arc<dyn Link>>,
    counters: &Counters,
    frames: Vec<(Option<PeerId>, Bytes)>,
) {
    for (to, bytes) in frames {
        let sent = match (link, &to) {
            (None, _) => Err(HamokError::Closed),
            (Some(link), Some(peer)) => link.send(peer, bytes),
            (Some(link), None) => link.broadcast(bytes),
        };
        match sent {
            Ok(()) => Counters::bump(&counters.frames_out),
            Err(_) => Counters::bump(&counters.dropped_outbound),
        }
    }
}

/// Milliseconds of a timeout, saturating.
fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl NodeState {
    /// Milliseconds since the peer started: the time base of the peer and its engine.
    fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Sends the frames the peer produced; returns its stop request, if any.
    fn drain(&mut self) -> Option<String> {
        let drained = self.peer.drain();
        if !drained.latencies.is_empty() {
            let now = Instant::now();
            for (metric, started_ms) in drained.latencies {
                let began = self.started + Duration::from_millis(started_ms);
                metrics::histogram!(metric, PEER_LABEL => self.label.clone())
                    .record(now.saturating_duration_since(began).as_secs_f64());
            }
        }
        send_frames(self.link.as_ref(), &self.counters, drained.frames);
        drained.stop
    }

    /// At most every [`DROP_SUMMARY_INTERVAL_MS`], a warning with the frames dropped since the last
    /// one, if any (each drop is a debug event; this is the summary an operator sees).
    fn summarize_drops(&mut self, now_ms: u64) {
        let (reported, at_ms) = self.drops_reported;
        if now_ms < at_ms.saturating_add(DROP_SUMMARY_INTERVAL_MS) {
            return;
        }
        let c = self.counters.values(self.inbound.dropped());
        let total = c.dropped_malformed
            + c.dropped_misrouted
            + c.dropped_foreign_cluster
            + c.dropped_version
            + c.dropped_foreign_incarnation
            + c.dropped_unauthenticated
            + c.dropped_outbound
            + c.dropped_inbound_full;
        self.drops_reported = (total, now_ms);
        if total > reported {
            tracing::warn!(
                peer = %self.label,
                dropped = total - reported,
                malformed = c.dropped_malformed,
                misrouted = c.dropped_misrouted,
                foreign_cluster = c.dropped_foreign_cluster,
                version = c.dropped_version,
                foreign_incarnation = c.dropped_foreign_incarnation,
                unauthenticated = c.dropped_unauthenticated,
                outbound = c.dropped_outbound,
                inbound_full = c.dropped_inbound_full,
                "frames dropped since the last summary (totals by reason since the peer started)"
            );
        }
    }

    fn publish_view(&self) {
        let view = self.peer.status();
        self.view.send_if_modified(|v| {
            if *v == view {
                false
            } else {
                *v = view;
                true
            }
        });
    }
}
