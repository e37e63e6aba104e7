//! The supervisor of one peer: starts the node and transport actors linked to it, restarts the transport
//! (with backoff) whenever its link dies, and shuts everything down when the node stops or fails.
//!
//! ractor's default supervision stops the supervisor when any child fails; we override it so that a
//! transport failure is a restart, not a shutdown.

use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef, SpawnErr, SupervisionEvent};

use super::node::{NodeActor, NodeArgs, NodeMsg};
use super::transport::{TransportActor, TransportArgs, TransportMsg};
use crate::events::HamokEvent;
use crate::raft::PeerId;
use crate::transport::{Inbound, Transport};

/// Backoff between transport reconnection attempts: doubles from the first to the last.
const RECONNECT_BACKOFF_MS: (u64, u64) = (50, 5_000);

pub(crate) struct SupervisorActor;

pub(crate) struct SupervisorArgs {
    pub node: NodeArgs,
    pub transport: Arc<dyn Transport>,
    pub cluster: String,
    pub peer: PeerId,
    pub inbound: Inbound,
    /// Filled with the node actor once spawned (the handle talks to it directly).
    pub node_ref: tokio::sync::oneshot::Sender<ActorRef<NodeMsg>>,
}

pub(crate) enum SupervisorMsg {
    RestartTransport,
}

pub(crate) struct SupervisorState {
    node: ActorRef<NodeMsg>,
    transport: Option<ActorRef<TransportMsg>>,
    transport_factory: Arc<dyn Transport>,
    cluster: String,
    peer: PeerId,
    inbound: Inbound,
    backoff_ms: u64,
    events: tokio::sync::broadcast::Sender<HamokEvent>,
}

impl SupervisorState {
    async fn start_transport(&mut self, myself: &ActorRef<SupervisorMsg>) {
        let args = TransportArgs {
            transport: self.transport_factory.clone(),
            cluster: self.cluster.clone(),
            peer: self.peer.clone(),
            inbound: self.inbound.clone(),
            node: self.node.clone(),
        };
        match Actor::spawn_linked(None, TransportActor, args, myself.get_cell()).await {
            Ok((actor, _)) => {
                self.transport = Some(actor);
                self.backoff_ms = RECONNECT_BACKOFF_MS.0;
            }
            Err(e) => {
                let e = startup_error(&e);
                tracing::error!(
                    peer = %self.peer,
                    error = %e,
                    retry_in_ms = self.backoff_ms,
                    "transport connect failed"
                );
                let _ = self
                    .events
                    .send(HamokEvent::Error(format!("transport connect failed: {e}")));
                self.schedule_restart(myself);
            }
        }
    }

    fn schedule_restart(&mut self, myself: &ActorRef<SupervisorMsg>) {
        let delay = Duration::from_millis(self.backoff_ms);
        self.backoff_ms = (self.backoff_ms * 2).min(RECONNECT_BACKOFF_MS.1);
        myself.send_after(delay, || SupervisorMsg::RestartTransport);
    }
}

/// Why the transport actor did not start, with every cause: its `connect` error ("transport: NATS
/// connect: ...: Connection refused"). ractor's own text for any failed start is `Actor panicked
/// during startup '<error>'`, which names no panic here and drops the error's causes.
fn startup_error(e: &SpawnErr) -> String {
    match e {
        SpawnErr::StartupFailed(inner) => {
            let mut text = inner.to_string();
            let mut cause = inner.source();
            while let Some(c) = cause {
                // Some errors already end their own text with their cause's: not twice.
                let next = c.to_string();
                if !text.ends_with(&next) {
                    text.push_str(": ");
                    text.push_str(&next);
                }
                cause = c.source();
            }
            text
        }
        other => other.to_string(),
    }
}

impl Actor for SupervisorActor {
    type Msg = SupervisorMsg;
    type State = SupervisorState;
    type Arguments = SupervisorArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<SupervisorMsg>,
        args: SupervisorArgs,
    ) -> Result<SupervisorState, ActorProcessingErr> {
        let events = args.node.events.clone();
        let (node, _) = Actor::spawn_linked(None, NodeActor, args.node, myself.get_cell()).await?;
        let _ = args.node_ref.send(node.clone());
        let mut state = SupervisorState {
            node,
            transport: None,
            transport_factory: args.transport,
            cluster: args.cluster,
            peer: args.peer,
            inbound: args.inbound,
            backoff_ms: RECONNECT_BACKOFF_MS.0,
            events,
        };
        state.start_transport(&myself).await;
        Ok(state)
    }

    async fn handle(
        &self,
        myself: ActorRef<SupervisorMsg>,
        msg: SupervisorMsg,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SupervisorMsg::RestartTransport => {
                if state.transport.is_none() {
                    state.start_transport(&myself).await;
                }
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<SupervisorMsg>,
        event: SupervisionEvent,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        let (cell, failure) = match event {
            SupervisionEvent::ActorFailed(cell, err) => (cell, Some(err.to_string())),
            SupervisionEvent::ActorTerminated(cell, _, reason) => (cell, reason),
            _ => return Ok(()),
        };
        if cell.get_id() == state.node.get_id() {
            // The node is gone (closed, or failed): nothing to supervise any more.
            match &failure {
                Some(reason) => tracing::error!(peer = %state.peer, %reason, "peer stopped"),
                None => tracing::info!(peer = %state.peer, "peer closed"),
            }
            if let Some(reason) = failure {
                let _ = state
                    .events
                    .send(HamokEvent::Error(format!("node stopped: {reason}")));
            }
            myself.stop(None);
            return Ok(());
        }
        let is_transport = state
            .transport
            .as_ref()
            .is_some_and(|t| t.get_id() == cell.get_id());
        if is_transport {
            tracing::warn!(
                peer = %state.peer,
                reason = failure.as_deref().unwrap_or("stopped"),
                retry_in_ms = state.backoff_ms,
                "transport link lost: reconnecting"
            );
            state.transport = None;
            let _ = state.node.send_message(NodeMsg::LinkDown);
            if let Some(reason) = failure {
                let _ = state.events.send(HamokEvent::Error(reason));
            }
            state.schedule_restart(&myself);
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        myself: ActorRef<SupervisorMsg>,
        _state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        // Stop (not kill) the children and wait, so the node answers what is pending, closes its link
        // and publishes that it is closed.
        myself
            .stop_children_and_wait(None, Some(Duration::from_secs(5)))
            .await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::HamokError;

    #[test]
    fn a_failed_connect_is_told_with_its_causes_and_no_panic() {
        let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let e = SpawnErr::StartupFailed(Box::new(HamokError::transport("NATS connect", refused)));
        assert_eq!(startup_error(&e), "transport: NATS connect: refused");
    }
}
