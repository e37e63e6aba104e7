//! Pieces both adapters share: the per-transport counters, the "link is dead" signal, id checks and the
//! bounded outbound queue.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use hamok_runtime::HamokError;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::stats::TransportStats;

// ---------------------------------------------------------------------------------------------------
// Counters
// ---------------------------------------------------------------------------------------------------

/// The live counters behind [`TransportStats`]; shared by every link a transport made.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub links_opened: AtomicU64,
    pub links_lost: AtomicU64,
    pub connect_failures: AtomicU64,
    pub disconnects: AtomicU64,
    pub reconnects: AtomicU64,
    pub frames_sent: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub frames_received: AtomicU64,
    pub bytes_received: AtomicU64,
    pub self_echo_skipped: AtomicU64,
    pub dropped_queue_full: AtomicU64,
    pub dropped_link_down: AtomicU64,
    pub dropped_too_large: AtomicU64,
    pub dropped_invalid_target: AtomicU64,
    pub dropped_publish_failed: AtomicU64,
    pub dropped_slow_consumer: AtomicU64,
    pub dropped_inbound_full: AtomicU64,
    pub dropped_nacked: AtomicU64,
}

impl Counters {
    pub(crate) fn bump(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> TransportStats {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut s = TransportStats {
            links_opened: g(&self.links_opened),
            links_lost: g(&self.links_lost),
            connect_failures: g(&self.connect_failures),
            disconnects: g(&self.disconnects),
            reconnects: g(&self.reconnects),
            frames_sent: g(&self.frames_sent),
            bytes_sent: g(&self.bytes_sent),
            frames_received: g(&self.frames_received),
            bytes_received: g(&self.bytes_received),
            self_echo_skipped: g(&self.self_echo_skipped),
            dropped: 0,
            dropped_queue_full: g(&self.dropped_queue_full),
            dropped_link_down: g(&self.dropped_link_down),
            dropped_too_large: g(&self.dropped_too_large),
            dropped_invalid_target: g(&self.dropped_invalid_target),
            dropped_publish_failed: g(&self.dropped_publish_failed),
            dropped_slow_consumer: g(&self.dropped_slow_consumer),
            dropped_inbound_full: g(&self.dropped_inbound_full),
            dropped_nacked: g(&self.dropped_nacked),
        };
        s.dropped = s.dropped_queue_full
            + s.dropped_link_down
            + s.dropped_too_large
            + s.dropped_invalid_target
            + s.dropped_publish_failed
            + s.dropped_slow_consumer
            + s.dropped_inbound_full
            + s.dropped_nacked;
        s
    }
}

// ---------------------------------------------------------------------------------------------------
// Close signal
// ---------------------------------------------------------------------------------------------------

/// The "this link is dead" flag of one link: an atomic for the send path and a watch channel for
/// `Link::closed` futures. The first reason wins.
#[derive(Debug)]
pub(crate) struct CloseSignal {
    closed: AtomicBool,
    reason: watch::Sender<Option<String>>,
}

impl CloseSignal {
    pub(crate) fn new() -> Self {
        CloseSignal {
            closed: AtomicBool::new(false),
            reason: watch::Sender::new(None),
        }
    }

    /// Marks the link dead; returns whether this call did it (false if it already was).
    pub(crate) fn close(&self, reason: impl Into<String>) -> bool {
        let mut reason = Some(reason.into());
        let first = self.reason.send_if_modified(|r| {
            if r.is_none() {
                *r = reason.take();
                true
            } else {
                false
            }
        });
        self.closed.store(true, Ordering::Release);
        first
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Resolves with the reason once the link is dead (at once if it already is).
    pub(crate) fn wait(&self) -> impl Future<Output = String> + Send + 'static {
        let mut rx = self.reason.subscribe();
        async move {
            match rx.wait_for(Option::is_some).await {
                Ok(reason) => reason.clone().unwrap_or_default(),
                Err(_) => "link dropped".to_string(),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// Tasks
// ---------------------------------------------------------------------------------------------------

/// The background tasks of one link, aborted together when the link is closed or dropped.
#[derive(Debug, Default)]
pub(crate) struct Tasks(Mutex<Vec<JoinHandle<()>>>);

impl Tasks {
    pub(crate) fn push(&self, handle: JoinHandle<()>) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(handle);
    }

    pub(crate) fn abort_all(&self) {
        for t in self.0.lock().unwrap_or_else(|e| e.into_inner()).drain(..) {
            t.abort();
        }
    }
}

impl Drop for Tasks {
    fn drop(&mut self) {
        self.abort_all();
    }
}

// ---------------------------------------------------------------------------------------------------
// Ids
// ---------------------------------------------------------------------------------------------------

/// Whether `s` can be used as one token of a NATS subject or an AMQP routing key: non-empty,
/// `[A-Za-z0-9_-]` only (no `.`, wildcards, whitespace or non-ASCII), at most 128 bytes.
pub fn is_valid_token(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= hamok_runtime::config::MAX_ID_BYTES
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Checks an id that becomes part of a subject or routing key.
pub(crate) fn check_token(key: &str, s: &str) -> Result<(), HamokError> {
    if is_valid_token(s) {
        Ok(())
    } else {
        Err(HamokError::Config {
            key: key.to_string(),
            reason: format!(
                "{s:?} cannot be used in a broker subject: use 1 to {} bytes of [A-Za-z0-9_-]",
                hamok_runtime::config::MAX_ID_BYTES
            ),
        })
    }
}

/// Checks a subject / exchange prefix: dot-separated tokens of [`is_valid_token`].
pub(crate) fn check_prefix(key: &str, prefix: &str) -> Result<(), HamokError> {
    if !prefix.is_empty() && prefix.split('.').all(is_valid_token) {
        Ok(())
    } else {
        Err(HamokError::Config {
            key: key.to_string(),
            reason: format!("{prefix:?}: use dot-separated tokens of [A-Za-z0-9_-]"),
        })
    }
}

// ---------------------------------------------------------------------------------------------------
// Outbound queue
// ---------------------------------------------------------------------------------------------------

/// Queues `item` for the writer task without ever waiting: a full queue drops (and counts) the frame.
pub(crate) fn enqueue<T>(
    tx: &mpsc::Sender<T>,
    item: T,
    counters: &Arc<Counters>,
) -> Result<(), HamokError> {
    match tx.try_send(item) {
        Ok(()) => Ok(()),
        Err(mpsc::error::TrySendError::Full(_)) => {
            Counters::bump(&counters.dropped_queue_full);
            Err(HamokError::Busy("transport outbound queue full"))
        }
        Err(mpsc::error::TrySendError::Closed(_)) => {
            Counters::bump(&counters.dropped_link_down);
            Err(HamokError::Transport {
                context: "link closed".into(),
                source: None,
            })
        }
    }
}

/// Reads a broker URL list from `var` (comma-separated), or `default`.
pub(crate) fn env_urls(var: &str, default: &str) -> Vec<String> {
    let raw = std::env::var(var)
        .ok()
        .filter(|v| !v.trim().is_empty())
        .unwrap_or_else(|| default.to_string());
    raw.split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens() {
        for good in ["a", "Orders_v2-eu", "0", &"x".repeat(128)] {
            assert!(is_valid_token(good), "{good}");
        }
        for bad in [
            "",
            "a.b",
            "a b",
            "*",
            ">",
            "#",
            "é",
            "a\n",
            &"x".repeat(129),
        ] {
            assert!(!is_valid_token(bad), "{bad:?}");
        }
        assert!(check_prefix("p", "hamok").is_ok());
        assert!(check_prefix("p", "org.hamok").is_ok());
        assert!(check_prefix("p", "org..hamok").is_err());
        assert!(check_prefix("p", "").is_err());
        assert!(check_prefix("p", "a.*").is_err());
    }

    #[tokio::test]
    async fn close_signal_first_reason_wins() {
        let s = CloseSignal::new();
        let w = s.wait();
        assert!(!s.is_closed());
        assert!(s.close("one"));
        assert!(!s.close("two"));
        assert!(s.is_closed());
        assert_eq!(w.await, "one");
        assert_eq!(s.wait().await, "one");
    }

    #[tokio::test]
    async fn full_queue_drops_and_counts() {
        let counters = Arc::new(Counters::default());
        let (tx, rx) = mpsc::channel(2);
        enqueue(&tx, 1, &counters).unwrap();
        enqueue(&tx, 2, &counters).unwrap();
        assert!(enqueue(&tx, 3, &counters).is_err());
        drop(rx);
        assert!(enqueue(&tx, 4, &counters).is_err());
        let s = counters.snapshot();
        assert_eq!(
            (s.dropped_queue_full, s.dropped_link_down, s.dropped),
            (1, 1, 2)
        );
    }
}
