//! [`SharedConfig`]: one replicated, validated, watched value with revisions and a bounded history.
//!
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use hamok_collections::{register_kinds, HamokCollections};
//! use hamok_runtime::Hamok;
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
//! struct Limits { max_conns: u32 }
//!
//! let hamok = register_kinds(Hamok::builder().cluster_id("doc-config")).build().await?;
//! hamok.join().await?;
//! let config = hamok
//!     .get_or_create_config::<Limits>("limits")
//!     .await?
//!     .with_validator(|l: &Limits| if l.max_conns == 0 { Err("max_conns must be > 0".into()) } else { Ok(()) });
//! let mut watch = config.watch();
//! let first = config.set(Limits { max_conns: 10 }).await?;
//! assert!(config.set(Limits { max_conns: 0 }).await.is_err(), "refused before the log");
//! // The watch's first item is the current value; a slow watcher gets the latest, never an error.
//! let now = watch.next().await.unwrap()?.unwrap();
//! assert_eq!((now.revision, now.value), (first, Limits { max_conns: 10 }));
//! hamok.close().await;
//! # Ok::<(), hamok_runtime::HamokError>(()) }).unwrap();
//! ```
//!
//! - A value's **revision** is the log index of the entry that set it: it grows with every change, on
//!   every peer alike. [`SharedConfig::compare_and_set`] sets only over an expected revision;
//!   [`SharedConfig::update`] retries a read-modify-write on conflicts.
//! - **Validation before the log**: a handle's validator runs before a value is submitted, so an invalid
//!   value never reaches any replica. Give every replica the same validator.
//! - **Watches** ([`SharedConfig::watch`]) are fed by this peer's own apply path (not by the bus): the
//!   first item is always the current value (or nothing yet), a slow watcher skips to the latest value
//!   (never an error because history moved on), and a broker reconnect cannot silence them.
//! - A bounded **history** ([`MAX_HISTORY`] values) and [`SharedConfig::rollback`] to any value in it.

use std::collections::VecDeque;
use std::marker::PhantomData;
use std::sync::Arc;

use bytes::Bytes;
use hamok_runtime::state_machine::ApplyContext;
use hamok_runtime::HamokError;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::common::{
    decode, encode, handle_basics, write_lock, Handle, Local, LogicHandle, Opened,
};
use crate::machine::{Core, Logic, Machine};

/// The kind a shared config is registered under.
pub const CONFIG_KIND: &str = "hamok.config";

/// Most earlier values a config keeps for [`SharedConfig::history`] and rollback.
pub const MAX_HISTORY: usize = 32;

/// Most attempts [`SharedConfig::update`] makes before it gives up with [`HamokError::Busy`].
const UPDATE_ATTEMPTS: usize = 16;

/// A value with the revision that set it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Versioned<T> {
    /// The log index of the entry that set the value.
    pub revision: u64,
    /// The value.
    pub value: T,
}

/// The replicated part: the current value and the earlier ones, encoded.
#[derive(Default, Serialize, Deserialize)]
pub(crate) struct ConfigState {
    current: Option<(u64, Bytes)>,
    history: VecDeque<(u64, Bytes)>,
}

#[derive(Serialize, Deserialize)]
pub(crate) enum ConfigCmd {
    /// Set `value` (if `expected` is given, only over that revision; `Some(0)`: only if unset).
    Set { value: Bytes, expected: Option<u64> },
    /// Set the value that `revision` set again (as a new revision).
    Rollback(u64),
}

/// What [`SharedConfig::compare_and_set`] answered (also what every set answers inside the log).
///
/// ```
/// use hamok_collections::CasOutcome;
/// let won = CasOutcome::Set(7);
/// assert_eq!(won.revision(), Some(7));
/// assert_eq!(CasOutcome::Conflict(Some(9)).revision(), None);
/// ```
#[must_use = "a conflict means nothing was set"]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CasOutcome {
    /// The value was set: its new revision.
    Set(u64),
    /// Nothing changed: the revision there instead (`None`: the config was never set).
    Conflict(Option<u64>),
}

impl CasOutcome {
    /// The new revision when the value was set, `None` on a conflict.
    pub fn revision(self) -> Option<u64> {
        match self {
            CasOutcome::Set(revision) => Some(revision),
            CasOutcome::Conflict(_) => None,
        }
    }
}

/// The local part: the watch every handle and watcher of this config on this peer shares.
pub(crate) struct ConfigExtra {
    latest: watch::Sender<Option<(u64, Bytes)>>,
}

#[derive(Default)]
pub(crate) struct ConfigLogic;

/// The state machine of a config.
pub(crate) type ConfigMachine = Machine<ConfigLogic>;

fn publish(core: &Core<ConfigState, ConfigExtra>, current: &Option<(u64, Bytes)>) {
    if let Some(local) = core.live_local() {
        local.extra.latest.send_replace(current.clone());
    }
}

impl Logic for ConfigLogic {
    type State = ConfigState;
    type Extra = ConfigExtra;
    type Command = ConfigCmd;

    fn kind(&self) -> &str {
        CONFIG_KIND
    }

    fn exec(
        &self,
        core: &Core<ConfigState, ConfigExtra>,
        ctx: &ApplyContext,
        cmd: ConfigCmd,
    ) -> Result<Bytes, HamokError> {
        let mut state = write_lock(&core.state);
        let value = match cmd {
            ConfigCmd::Set { value, expected } => {
                let current = state.current.as_ref().map(|(r, _)| *r);
                if let Some(expected) = expected {
                    if current.unwrap_or(0) != expected {
                        return encode(&CasOutcome::Conflict(current));
                    }
                }
                value
            }
            ConfigCmd::Rollback(revision) => {
                let found = state
                    .history
                    .iter()
                    .chain(state.current.iter())
                    .find(|(r, _)| *r == revision)
                    .map(|(_, v)| v.clone());
                match found {
                    Some(v) => v,
                    None => {
                        return Err(HamokError::Rejected(format!(
                            "revision {revision} is not in the config's history"
                        )))
                    }
                }
            }
        };
        if let Some(old) = state.current.replace((ctx.index, value)) {
            state.history.push_back(old);
            while state.history.len() > MAX_HISTORY {
                state.history.pop_front();
            }
        }
        let current = state.current.clone();
        drop(state);
        publish(core, &current);
        encode(&CasOutcome::Set(ctx.index))
    }

    fn on_observe(
        &self,
        core: &Core<ConfigState, ConfigExtra>,
        local: &Local<ConfigState, ConfigExtra>,
    ) {
        let current = crate::common::read_lock(&core.state).current.clone();
        local.extra.latest.send_replace(current);
    }
}

/// A validator: `Err(reason)` refuses a value before it is submitted.
type Validator<T> = Arc<dyn Fn(&T) -> Result<(), String> + Send + Sync>;

/// A replicated configuration value of type `T` (see the [module documentation](self)). Cheap to clone.
pub struct SharedConfig<T> {
    handle: Handle<ConfigState, ConfigExtra>,
    validator: Option<Validator<T>>,
    _types: PhantomData<fn() -> T>,
}

impl<T> Clone for SharedConfig<T> {
    fn clone(&self) -> Self {
        SharedConfig {
            handle: self.handle.clone(),
            validator: self.validator.clone(),
            _types: PhantomData,
        }
    }
}

impl<T> std::fmt::Debug for SharedConfig<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedConfig")
            .field("id", &self.handle.local.id)
            .field("revision", &self.revision())
            .finish()
    }
}

impl<T> Opened for SharedConfig<T>
where
    T: Serialize + DeserializeOwned,
{
    type Logic = ConfigLogic;
    type Options = ();

    fn kind(_id: &str) -> String {
        CONFIG_KIND.to_string()
    }

    fn extra(_id: &str) -> ConfigExtra {
        ConfigExtra {
            latest: watch::channel(None).0,
        }
    }

    async fn finish(handle: LogicHandle<ConfigLogic>, _options: ()) -> Result<Self, HamokError> {
        Ok(SharedConfig {
            handle,
            validator: None,
            _types: PhantomData,
        })
    }
}

handle_basics!(SharedConfig<T>);

impl<T> SharedConfig<T> {
    /// The revision of the current value (local), `None` if never set.
    pub fn revision(&self) -> Option<u64> {
        self.handle
            .local
            .read(|s| s.current.as_ref().map(|(r, _)| *r))
    }
}

impl<T> SharedConfig<T>
where
    T: Serialize + DeserializeOwned,
{
    /// This handle, refusing (with [`HamokError::Rejected`], before anything is submitted) every value
    /// `validator` refuses.
    pub fn with_validator(
        mut self,
        validator: impl Fn(&T) -> Result<(), String> + Send + Sync + 'static,
    ) -> Self {
        self.validator = Some(Arc::new(validator));
        self
    }

    fn check(&self, value: &T) -> Result<Bytes, HamokError> {
        if let Some(validate) = &self.validator {
            validate(value).map_err(|reason| {
                HamokError::Rejected(format!("config `{}`: invalid value: {reason}", self.id()))
            })?;
        }
        encode(value)
    }

    /// The current value and its revision, as applied on this peer.
    pub fn get(&self) -> Result<Option<Versioned<T>>, HamokError> {
        let current = self.handle.local.read(|s| s.current.clone());
        current
            .map(|(revision, bytes)| {
                Ok(Versioned {
                    revision,
                    value: decode(&bytes)?,
                })
            })
            .transpose()
    }

    /// The current value, reflecting every change acknowledged anywhere before the call.
    pub async fn get_linearizable(&self) -> Result<Option<Versioned<T>>, HamokError> {
        self.handle.sync().await?;
        self.get()
    }

    /// Sets the value (validated first); returns its revision.
    pub async fn set(&self, value: T) -> Result<u64, HamokError> {
        let value = self.check(&value)?;
        match self
            .handle
            .submit(ConfigCmd::Set {
                value,
                expected: None,
            })
            .await?
        {
            CasOutcome::Set(revision) => Ok(revision),
            CasOutcome::Conflict(_) => Err(HamokError::Rejected("unexpected conflict".into())),
        }
    }

    /// Sets the value only if the current revision is `expected` (`0`: only if never set):
    /// [`CasOutcome::Set`] with the new revision, or [`CasOutcome::Conflict`] with the revision that
    /// is there instead (nothing changed). `Err` only when the call failed (it may have taken effect
    /// where the error says so).
    pub async fn compare_and_set(&self, expected: u64, value: T) -> Result<CasOutcome, HamokError> {
        let value = self.check(&value)?;
        self.handle
            .submit(ConfigCmd::Set {
                value,
                expected: Some(expected),
            })
            .await
    }

    /// Read-modify-write: applies `f` to the current value (linearizable read) and sets the result over
    /// that revision, again on conflict (at most 16 times, then [`HamokError::Busy`]).
    pub async fn update(&self, f: impl Fn(Option<T>) -> T) -> Result<u64, HamokError> {
        for _ in 0..UPDATE_ATTEMPTS {
            let current = self.get_linearizable().await?;
            let revision = current.as_ref().map_or(0, |c| c.revision);
            let next = f(current.map(|c| c.value));
            if let CasOutcome::Set(revision) = self.compare_and_set(revision, next).await? {
                return Ok(revision);
            }
        }
        Err(HamokError::Busy("config update kept conflicting"))
    }

    /// The earlier values still kept (oldest first, at most [`MAX_HISTORY`]), then the current one.
    pub fn history(&self) -> Result<Vec<Versioned<T>>, HamokError> {
        let all: Vec<(u64, Bytes)> = self
            .handle
            .local
            .read(|s| s.history.iter().chain(s.current.iter()).cloned().collect());
        all.into_iter()
            .map(|(revision, bytes)| {
                Ok(Versioned {
                    revision,
                    value: decode(&bytes)?,
                })
            })
            .collect()
    }

    /// Sets the value that `revision` set again (validated, as a new revision).
    pub async fn rollback(&self, revision: u64) -> Result<u64, HamokError> {
        if let Some(old) = self.history()?.into_iter().find(|v| v.revision == revision) {
            self.check(&old.value)?;
        }
        match self.handle.submit(ConfigCmd::Rollback(revision)).await? {
            CasOutcome::Set(revision) => Ok(revision),
            CasOutcome::Conflict(_) => Err(HamokError::Rejected("unexpected conflict".into())),
        }
    }

    /// A watch of the value (see [`ConfigWatch`]). It has no `Resync` and needs none: it is a
    /// `tokio::sync::watch` of the current value, written by this peer's apply path and again whenever
    /// the group is linked to a rebuilt machine (an installed snapshot), so it always ends at the
    /// latest value applied here. It delivers states, not changes: intermediate values may be skipped
    /// (a slow watcher, or the entries a snapshot covers), never the latest; use
    /// [`SharedConfig::history`] for the changes themselves.
    pub fn watch(&self) -> ConfigWatch<T> {
        // The watch ends when the peer closes: the group must learn of it.
        self.handle.watch_close();
        ConfigWatch {
            rx: self.handle.local.extra.latest.subscribe(),
            keep: self.handle.local.clone(),
            first: true,
            _types: PhantomData,
        }
    }
}

/// A watch of a [`SharedConfig`]: the first [`ConfigWatch::next`] answers the current value at once,
/// each later one the latest value after a change (a slow watcher skips intermediate values). `None`
/// once the peer closed.
pub struct ConfigWatch<T> {
    rx: watch::Receiver<Option<(u64, Bytes)>>,
    keep: Arc<Local<ConfigState, ConfigExtra>>,
    first: bool,
    _types: PhantomData<fn() -> T>,
}

impl<T: DeserializeOwned> ConfigWatch<T> {
    /// The current value first, then the latest after each change; `Ok(None)` inside while the config
    /// was never set; `None` once the peer closed.
    pub async fn next(&mut self) -> Option<Result<Option<Versioned<T>>, HamokError>> {
        if self.first {
            self.first = false;
        } else {
            tokio::select! {
                // Closed first: a watch of a closed peer ends even while changes keep coming.
                biased;
                _ = self.keep.closed() => return None,
                changed = self.rx.changed() => {
                    if changed.is_err() {
                        return None;
                    }
                }
            }
        }
        let current = self.rx.borrow_and_update().clone();
        Some(
            current
                .map(|(revision, bytes)| {
                    Ok(Versioned {
                        revision,
                        value: decode(&bytes)?,
                    })
                })
                .transpose(),
        )
    }
}
