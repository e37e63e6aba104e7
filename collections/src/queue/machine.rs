//! The state machine of a queue: its replicated state, its commands, and how each changes the state.

use std::collections::VecDeque;

use bytes::Bytes;
use hamok_runtime::state_machine::ApplyContext;
use hamok_runtime::HamokError;
use serde::{Deserialize, Serialize};

use super::{QUEUE_FULL, QUEUE_KIND};
use crate::common::{encode, write_lock, Raw};
use crate::machine::{Core, Logic, Machine};

/// The replicated content of a queue.
#[derive(Default, Serialize, Deserialize)]
pub(crate) struct QueueState {
    pub(super) items: VecDeque<Bytes>,
    pub(super) capacity: Option<u64>,
}

#[derive(Serialize, Deserialize)]
pub(crate) enum QueueCmd {
    Push(Vec<Bytes>),
    Pop(u32),
    Clear,
    SetCapacity(Option<u64>),
}

/// What is particular to a queue's state machine ([`Machine`]`<QueueLogic>`).
#[derive(Default)]
pub(crate) struct QueueLogic;

/// The state machine of a queue.
pub(crate) type QueueMachine = Machine<QueueLogic>;

impl Logic for QueueLogic {
    type State = QueueState;
    type Extra = ();
    type Command = QueueCmd;

    fn kind(&self) -> &str {
        QUEUE_KIND
    }

    fn exec(
        &self,
        core: &Core<QueueState, ()>,
        _ctx: &ApplyContext,
        cmd: QueueCmd,
    ) -> Result<Bytes, HamokError> {
        let listening = core.listening();
        let mut events = Vec::new();
        let response = {
            let mut state = write_lock(&core.state);
            match cmd {
                QueueCmd::Push(values) => {
                    let after = state.items.len() as u64 + values.len() as u64;
                    if state.capacity.is_some_and(|cap| after > cap) {
                        return Err(HamokError::Busy(QUEUE_FULL));
                    }
                    let was_empty = state.items.is_empty();
                    for v in values {
                        if listening {
                            events.push(Raw::Insert {
                                key: Bytes::new(),
                                value: v.clone(),
                            });
                        }
                        state.items.push_back(v);
                    }
                    if listening && was_empty && !state.items.is_empty() {
                        events.push(Raw::NotEmpty);
                    }
                    encode(&(state.items.len() as u64))
                }
                QueueCmd::Pop(n) => {
                    let n = (n as usize).min(state.items.len());
                    let popped: Vec<Bytes> = state.items.drain(..n).collect();
                    if listening {
                        for v in &popped {
                            events.push(Raw::Remove {
                                key: Bytes::new(),
                                value: v.clone(),
                            });
                        }
                        if n > 0 && state.items.is_empty() {
                            events.push(Raw::Empty);
                        }
                    }
                    encode(&popped)
                }
                QueueCmd::Clear => {
                    let n = state.items.len() as u64;
                    state.items.clear();
                    if listening {
                        events.push(Raw::Clear);
                        if n > 0 {
                            events.push(Raw::Empty);
                        }
                    }
                    encode(&n)
                }
                QueueCmd::SetCapacity(capacity) => {
                    state.capacity = capacity;
                    encode(&())
                }
            }
        };
        core.emit(events);
        response
    }
}
