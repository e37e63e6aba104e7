//! What the lease timers of lock tables and queues share: submitting a clean-up command from a task,
//! with retries, and how long after a lease starts a timer may ask the cluster to end it.

use std::time::Duration;

use bytes::Bytes;
use hamok_runtime::{Hamok, HamokError};

/// Most attempts at submitting one clean-up command (a release, a cancel, an expiry). Bounded: after
/// them the membership lease (the holder's removal) or the next timer tick takes over.
const ATTEMPTS: u32 = 8;

/// Submits the encoded command `bytes` to collection `id` from a task, retrying with backoff (20 ms
/// doubling to 1 s) until it is applied, refused by the state machine, the peer closed, or [`ATTEMPTS`]
/// ran out. The command must be idempotent (it names what it ends). Outside a tokio runtime (a handle
/// dropped after shutdown) it does nothing.
pub(crate) fn submit_retrying(hamok: &Hamok, id: &str, bytes: Bytes) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let hamok = hamok.clone();
    let id = id.to_string();
    runtime.spawn(async move {
        let mut backoff = Duration::from_millis(20);
        for _ in 0..ATTEMPTS {
            match hamok.submit(&id, bytes.to_vec()).await {
                Ok(_) | Err(HamokError::Closed) | Err(HamokError::Rejected(_)) => return,
                Err(e) => {
                    tracing::debug!("`{id}`: clean-up command failed (retrying): {e}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
    });
}

/// How long after a grant, take or renewal a peer's timer asks to expire a lease of `lease_ms`: the
/// lease plus a margin for clock drift and scheduling (a tenth, at least 20 ms), so the holder, which
/// counts the bare lease from before its request, always lets go first.
pub(crate) fn expiry_after(lease_ms: u64) -> Duration {
    let lease = Duration::from_millis(lease_ms);
    lease + (lease / 10).max(Duration::from_millis(20))
}
