//! [`CloseSignal`], the "this link is dead" flag every link of every transport keeps.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::watch;

/// The "this link is dead" flag of one [`Link`](super::Link): an atomic for the send path (cheap to
/// test on every frame) and a watch channel behind [`Link::closed`](super::Link::closed) futures.
///
/// A signal only ever goes from open to closed, once: the first reason given wins and every later
/// [`close`](CloseSignal::close) is a no-op that returns `false`. Transports use that return value to
/// count a link's death exactly once.
///
/// ```
/// use hamok_runtime::transport::CloseSignal;
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let signal = CloseSignal::new();
/// let closed = signal.wait(); // asked before the close: resolves with its reason
/// assert!(signal.close("broker gone"));
/// assert!(!signal.close("closed")); // already dead: the first reason stays
/// assert!(signal.is_closed());
/// assert_eq!(closed.await, "broker gone");
/// assert_eq!(signal.wait().await, "broker gone"); // asked after: resolves at once
/// # });
/// ```
#[derive(Debug)]
pub struct CloseSignal {
    closed: AtomicBool,
    reason: watch::Sender<Option<String>>,
}

impl Default for CloseSignal {
    fn default() -> Self {
        Self::new()
    }
}

impl CloseSignal {
    /// An open signal.
    pub fn new() -> Self {
        CloseSignal {
            closed: AtomicBool::new(false),
            reason: watch::Sender::new(None),
        }
    }

    /// Marks the link dead with `reason`; returns whether this call did it (`false` if it already was
    /// dead, in which case the earlier reason stays).
    pub fn close(&self, reason: impl Into<String>) -> bool {
        let mut reason = Some(reason.into());
        let first = self.reason.send_if_modified(|current| {
            if current.is_none() {
                *current = reason.take();
                true
            } else {
                false
            }
        });
        self.closed.store(true, Ordering::Release);
        first
    }

    /// Whether the link is dead.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Resolves with the reason once the link is dead (at once if it already is). The future does not
    /// borrow the signal, so it can be returned from [`Link::closed`](super::Link::closed).
    pub fn wait(&self) -> impl Future<Output = String> + Send + 'static {
        let mut rx = self.reason.subscribe();
        async move {
            match rx.wait_for(Option::is_some).await {
                Ok(reason) => reason.clone().unwrap_or_default(),
                // Only when the signal itself was dropped before closing.
                Err(_) => "link dropped".to_string(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn first_reason_wins() {
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
    async fn dropped_signal_resolves_waiters() {
        let s = CloseSignal::new();
        let w = s.wait();
        drop(s);
        assert_eq!(w.await, "link dropped");
    }
}
