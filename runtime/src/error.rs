//! The one error type of the public API.
//!
//! Every variant says when it happens and whether the failed operation may nevertheless have taken
//! effect; [`HamokError::may_have_taken_effect`] answers that question for any error, so a caller can
//! sort failures into "certainly not applied, safe to retry" and "outcome unknown, read before retrying".

use std::fmt;
use std::sync::Arc;

use crate::raft::{PeerId, RaftConfigError, RaftError, RaftStartError};
use crate::store::StorageError;

/// The underlying cause of an error, kept for [`std::error::Error::source`]. Cheap to clone; two causes
/// compare equal when they print the same.
#[derive(Clone)]
pub struct Cause(Arc<dyn std::error::Error + Send + Sync + 'static>);

impl Cause {
    /// Wraps an error.
    pub fn new(error: impl std::error::Error + Send + Sync + 'static) -> Self {
        Cause(Arc::new(error))
    }
}

impl fmt::Debug for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl std::error::Error for Cause {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

impl PartialEq for Cause {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0) || self.0.to_string() == other.0.to_string()
    }
}

impl Eq for Cause {}

/// Why a call on a [`Hamok`](crate::Hamok) handle (or a collection built on it) failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HamokError {
    /// The operation did not complete within its timeout. **May have taken effect**: until its deadline
    /// the runtime resent the request under the same request number (so it applies at most once), and a
    /// copy may still be on its way; a retry by the caller is a new request.
    #[error("timed out after {after_ms} ms")]
    Timeout {
        /// The timeout that expired.
        after_ms: u64,
    },
    /// No leader was reachable before the deadline and the request was never handed to one: it was
    /// **not applied**. The cluster has no quorum, or this peer is cut off from it.
    #[error("no leader reachable within {after_ms} ms; the request was not sent")]
    NoQuorum {
        /// The timeout that expired.
        after_ms: u64,
    },
    /// The peer is not a joined member of a cluster (`join` not called, or it left, or it is
    /// rejoining after a removal or a cut-off). The request was refused: **not applied**.
    #[error("not joined to a cluster")]
    NotJoined,
    /// The peer is closed. The request was refused: **not applied**.
    #[error("closed")]
    Closed,
    /// The peer stopped waiting for this request before it was answered (it left its cluster, or
    /// closed). **May have taken effect**, once.
    #[error("interrupted before an answer ({0}); the request may still be applied")]
    Interrupted(&'static str),
    /// This operation needs the leader, and this peer is not it. **Not applied.**
    #[error("not the leader (leader: {leader:?})")]
    NotLeader {
        /// The leader, if known.
        leader: Option<PeerId>,
    },
    /// Too much pending work (requests in flight, uncommitted entries): back off and retry. **Not
    /// applied.**
    #[error("busy: {0}")]
    Busy(&'static str),
    /// A value, command or response could not be encoded or decoded. `applied` says whether the
    /// operation took effect anyway (a response that does not decode as the caller's type comes from a
    /// command that was applied); otherwise nothing was submitted.
    #[error("codec: {context}")]
    Codec {
        /// What was being encoded or decoded.
        context: String,
        /// The codec's own error, when there is one.
        #[source]
        source: Option<Cause>,
        /// The operation was applied before the failure.
        applied: bool,
    },
    /// The transport failed (connecting, or a broker refused). Raised by transports and the
    /// supervisor; a request is never failed with it (it is retried until its deadline instead).
    #[error("transport: {context}")]
    Transport {
        /// What failed.
        context: String,
        /// The transport's own error, when there is one.
        #[source]
        source: Option<Cause>,
    },
    /// The configuration is invalid; names the key. Nothing started.
    #[error("invalid config `{key}`: {reason}")]
    Config {
        /// The offending key, as in the TOML file and (upper-cased, `HAMOK_` prefixed) the environment.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A value or command exceeds a configured limit. **Not applied.**
    #[error("too large: {size} bytes, limit {limit}")]
    TooLarge {
        /// Size of the refused value.
        size: usize,
        /// The configured limit.
        limit: usize,
    },
    /// A collection id is used for another kind of collection. **Not applied.**
    #[error("collection `{id}` exists with another kind ({existing})")]
    KindMismatch {
        /// The collection id.
        id: String,
        /// The kind it already has.
        existing: String,
    },
    /// The state machine rejected the command (its own typed reason, as text). The command went
    /// through the log but changed nothing: **not applied**, on every peer alike.
    #[error("rejected: {0}")]
    Rejected(String),
    /// A fenced write was refused at apply time: lock `name` is no longer held under `token` (released,
    /// or granted again under a newer token). The command went through the log and changed nothing:
    /// **not applied**, on every peer alike. The caller lost the lock; it must not retry under this token.
    #[error("stale fence: lock `{name}` is not held under token {token} (now: {current:?})")]
    StaleFence {
        /// The lock's name.
        name: String,
        /// The token the write carried.
        token: u64,
        /// The lock's token now, if it is held.
        current: Option<u64>,
    },
    /// The write was **applied** exactly once, but its response is gone: this peer caught up from a
    /// snapshot that already contained it, and the response was not in the snapshot's bounded response
    /// cache (or the command was rejected). Do not retry it; read the state to learn the outcome.
    #[error("the request was applied, but its response was not kept (caught up from a snapshot)")]
    AppliedResponseLost,
    /// The cluster no longer knows whether this write was applied: more requests of this peer overtook
    /// it than its dedup state keeps. It will not be applied from now on, but **may have been**. Only a
    /// peer that exceeds its own `max_pending_requests` discipline can see this.
    #[error("the request's outcome is unknown: its dedup record was forgotten")]
    OutcomeUnknown,
    /// The Raft engine refused the request. **Not applied.**
    #[error("raft: {0}")]
    Raft(#[source] RaftError),
    /// The peer's durable store refused to open or failed (see [`StorageError`] for each case). Raised
    /// by [`HamokBuilder::build`](crate::HamokBuilder::build); a store failing while the peer runs
    /// stops the peer, and its pending requests fail with [`HamokError::Interrupted`].
    #[error("storage: {0}")]
    Storage(#[source] StorageError),
}

impl HamokError {
    /// Whether the failed operation may nevertheless have taken effect (or will, once): `true` for a
    /// timeout, an interruption, an unknown outcome, a lost response and a response that did not decode;
    /// `false` when it was certainly refused before it could change anything (not joined, closed, no
    /// leader reached, busy, too large, rejected by the state machine, invalid configuration, ...).
    /// Reads never take effect.
    ///
    /// ```
    /// use hamok_runtime::HamokError;
    /// assert!(HamokError::Timeout { after_ms: 5_000 }.may_have_taken_effect());
    /// assert!(!HamokError::NotJoined.may_have_taken_effect());
    /// assert!(!HamokError::NoQuorum { after_ms: 5_000 }.may_have_taken_effect());
    /// ```
    pub fn may_have_taken_effect(&self) -> bool {
        match self {
            HamokError::Timeout { .. }
            | HamokError::Interrupted(_)
            | HamokError::AppliedResponseLost
            | HamokError::OutcomeUnknown => true,
            HamokError::Codec { applied, .. } => *applied,
            _ => false,
        }
    }

    /// A codec failure before anything was submitted.
    pub fn codec(context: impl Into<String>, source: Option<Cause>) -> Self {
        HamokError::Codec {
            context: context.into(),
            source,
            applied: false,
        }
    }

    /// A transport failure with its cause.
    pub fn transport(
        context: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        HamokError::Transport {
            context: context.into(),
            source: Some(Cause::new(source)),
        }
    }

    /// [`HamokError::Timeout`] for a call bounded by `after` (milliseconds, saturating).
    ///
    /// ```
    /// use std::time::Duration;
    /// use hamok_runtime::HamokError;
    /// assert_eq!(HamokError::timeout(Duration::from_millis(250)), HamokError::Timeout { after_ms: 250 });
    /// ```
    pub fn timeout(after: std::time::Duration) -> Self {
        HamokError::Timeout {
            after_ms: u64::try_from(after.as_millis()).unwrap_or(u64::MAX),
        }
    }

    /// The same error, marked as coming after the operation was applied (a response that did not
    /// decode).
    pub fn after_apply(self) -> Self {
        match self {
            HamokError::Codec {
                context, source, ..
            } => HamokError::Codec {
                context,
                source,
                applied: true,
            },
            other => other,
        }
    }
}

impl From<RaftError> for HamokError {
    fn from(e: RaftError) -> Self {
        match e {
            RaftError::NotLeader { leader } => HamokError::NotLeader { leader },
            RaftError::Busy => HamokError::Busy("too many uncommitted entries"),
            RaftError::CommandTooLarge { size, limit } => HamokError::TooLarge { size, limit },
            other => HamokError::Raft(other),
        }
    }
}

impl From<RaftConfigError> for HamokError {
    fn from(e: RaftConfigError) -> Self {
        HamokError::Config {
            key: e.field.to_string(),
            reason: e.reason.to_string(),
        }
    }
}

impl From<RaftStartError> for HamokError {
    fn from(e: RaftStartError) -> Self {
        match e {
            RaftStartError::Config(e) => e.into(),
            e @ RaftStartError::LogNotContiguous { .. } => {
                HamokError::Storage(StorageError::Corrupt {
                    dir: Default::default(),
                    detail: e.to_string(),
                    source: None,
                })
            }
        }
    }
}

impl From<StorageError> for HamokError {
    fn from(e: StorageError) -> Self {
        HamokError::Storage(e)
    }
}

impl From<rmp_serde::encode::Error> for HamokError {
    fn from(e: rmp_serde::encode::Error) -> Self {
        HamokError::codec("encode", Some(Cause::new(e)))
    }
}

impl From<rmp_serde::decode::Error> for HamokError {
    fn from(e: rmp_serde::decode::Error) -> Self {
        HamokError::codec("decode", Some(Cause::new(e)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    #[test]
    fn causes_are_kept_and_compared_by_message() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let e = HamokError::transport("connect to nats://x", io);
        assert_eq!(e.to_string(), "transport: connect to nats://x");
        assert_eq!(
            e.source().map(|s| s.to_string()).as_deref(),
            Some("refused")
        );
        let again = HamokError::transport(
            "connect to nats://x",
            std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused"),
        );
        assert_eq!(e, again);
        let decode = rmp_serde::from_slice::<u8>(b"\xc1").unwrap_err();
        let codec = HamokError::from(decode);
        assert!(codec.source().is_some());
        assert!(!codec.may_have_taken_effect());
        assert!(codec.after_apply().may_have_taken_effect());
    }
}
