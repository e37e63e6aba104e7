//! A remote map's state machine: the replicated list of pending mutations (no I/O in `apply`).

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use hamok_runtime::raft::{LogIndex, PeerId};
use hamok_runtime::state_machine::ApplyContext;
use hamok_runtime::HamokError;
use serde::{Deserialize, Serialize};

use super::executor::RemoteExtra;
use super::store::{RemoteMap, RemoteOp};
use super::MAX_PENDING_MUTATIONS;
use crate::common::{encode, write_lock};
use crate::machine::{Core, Logic};

/// A mutation committed and not yet known executed.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(super) struct PendingOp {
    pub(super) client: PeerId,
    pub(super) req: u64,
    pub(super) op: RemoteOp,
}

/// The replicated part of a remote map: the pending mutations.
#[derive(Default, Serialize, Deserialize)]
pub(crate) struct RemoteState {
    pub(super) pending: BTreeMap<LogIndex, PendingOp>,
    pub(super) executed_up_to: LogIndex,
}

#[derive(Serialize, Deserialize)]
pub(crate) enum RemoteCmd {
    /// A mutation; answers its log index.
    Mutate { req: u64, op: RemoteOp },
    /// Mutations up to this index are executed: forget them.
    Executed(LogIndex),
}

/// What is particular to a remote map's state machine
/// ([`Machine`](crate::machine::Machine)`<RemoteMapLogic>`): its kind (one per map) and the store it
/// executes against (given at registration).
pub(crate) struct RemoteMapLogic {
    kind: String,
    pub(crate) store: Arc<dyn RemoteMap>,
}

impl RemoteMapLogic {
    pub(crate) fn new(kind: String, store: Arc<dyn RemoteMap>) -> Self {
        RemoteMapLogic { kind, store }
    }
}

impl Logic for RemoteMapLogic {
    type State = RemoteState;
    type Extra = RemoteExtra;
    type Command = RemoteCmd;

    /// The events are the executor's (see `announce`), and the state is the pending list, not the map.
    const EVENTS_FROM_APPLY: bool = false;

    fn kind(&self) -> &str {
        &self.kind
    }

    fn exec(
        &self,
        core: &Core<RemoteState, RemoteExtra>,
        ctx: &ApplyContext,
        cmd: RemoteCmd,
    ) -> Result<Bytes, HamokError> {
        match cmd {
            RemoteCmd::Mutate { req, op } => {
                {
                    let mut state = write_lock(&core.state);
                    if state.pending.len() >= MAX_PENDING_MUTATIONS {
                        return Err(HamokError::Busy("remote map: too many pending mutations"));
                    }
                    state.pending.insert(
                        ctx.index,
                        PendingOp {
                            client: ctx.client.clone(),
                            req,
                            op,
                        },
                    );
                }
                if let Some(local) = core.live_local() {
                    local.extra.wake.notify_one();
                }
                encode(&ctx.index)
            }
            RemoteCmd::Executed(up_to) => {
                let mut state = write_lock(&core.state);
                if up_to > state.executed_up_to {
                    state.executed_up_to = up_to;
                    let keep = state.pending.split_off(&(up_to + 1));
                    state.pending = keep;
                }
                encode(&())
            }
        }
    }
}
