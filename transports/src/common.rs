//! Pieces both adapters share besides the link itself (`link.rs`): the per-transport counters, id
//! checks and broker URLs from the environment.

use std::sync::atomic::{AtomicU64, Ordering};

use hamok_runtime::HamokError;

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
    pub messages_sent: AtomicU64,
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
            messages_sent: g(&self.messages_sent),
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
}
