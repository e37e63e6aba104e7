//! The transport actor: holds one live link of the peer. When the link dies the actor fails, and its
//! supervisor starts a new one (which reconnects) after a backoff.

use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef};

use super::node::NodeMsg;
use crate::raft::PeerId;
use crate::transport::{Inbound, Link, Transport};

pub(crate) struct TransportActor;

pub(crate) struct TransportArgs {
    pub transport: Arc<dyn Transport>,
    pub cluster: String,
    pub peer: PeerId,
    pub inbound: Inbound,
    pub node: ActorRef<NodeMsg>,
}

pub(crate) enum TransportMsg {
    /// The link died.
    Closed(String),
}

pub(crate) struct TransportState {
    link: Arc<dyn Link>,
    node: ActorRef<NodeMsg>,
}

impl Actor for TransportActor {
    type Msg = TransportMsg;
    type State = TransportState;
    type Arguments = TransportArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<TransportMsg>,
        args: TransportArgs,
    ) -> Result<TransportState, ActorProcessingErr> {
        let link = args
            .transport
            .connect(&args.cluster, args.peer, args.inbound)
            .await?;
        let closed = link.closed();
        tokio::spawn(async move {
            let reason = closed.await;
            let _ = myself.send_message(TransportMsg::Closed(reason));
        });
        args.node.send_message(NodeMsg::LinkUp(link.clone()))?;
        Ok(TransportState {
            link,
            node: args.node,
        })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<TransportMsg>,
        state: &mut TransportState,
    ) -> Result<(), ActorProcessingErr> {
        state.link.close();
        let _ = state.node.send_message(NodeMsg::LinkDown);
        Ok(())
    }

    async fn handle(
        &self,
        _myself: ActorRef<TransportMsg>,
        msg: TransportMsg,
        _state: &mut TransportState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            TransportMsg::Closed(reason) => Err(format!("transport link closed: {reason}").into()),
        }
    }
}
