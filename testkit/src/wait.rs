//! Bounded waits of the integration tests. Time there is only ever a bound on a wait: no test asserts
//! how long something took.

use std::future::Future;
use std::time::{Duration, Instant};

/// The bound of most waits: far above what any step needs, so only a real failure reaches it.
pub const WAIT: Duration = Duration::from_secs(15);

/// Polls `f` every 10 ms until it returns `Some`, and panics naming `what` after `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Polls a condition every 10 ms until it holds, and panics naming `what` after `timeout`.
pub async fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    eventually(what, timeout, || {
        let ok = cond();
        async move { ok.then_some(()) }
    })
    .await
}
