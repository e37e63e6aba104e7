//! Advertised addresses: each gateway puts `peer id -> base URL` into the replicated map
//! [`ADDRESSES`] once its peer has joined, and a follower in redirect mode reads the leader's entry to
//! answer writes with `307 Temporary Redirect`.

use std::time::Duration;

use axum::extract::{OriginalUri, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hamok_collections::{HamokCollections, HamokMap};
use hamok_runtime::{Hamok, HamokError};

use super::Shared;

/// The id of the replicated map of advertised addresses.
pub(crate) const ADDRESSES: &str = "gateway:addresses";
/// How many times a gateway tries to advertise its address before giving up.
const MAX_ATTEMPTS: u32 = 120;
/// The pause between two attempts, doubled up to [`MAX_PAUSE`].
const FIRST_PAUSE: Duration = Duration::from_millis(100);
const MAX_PAUSE: Duration = Duration::from_secs(2);
/// How long a request waits for the map to open when it is not open yet.
const OPEN_WAIT: Duration = Duration::from_secs(1);

/// The map of advertised addresses, opened once.
pub(crate) struct Addresses {
    hamok: Hamok,
    map: tokio::sync::OnceCell<HamokMap<String, String>>,
}

impl Addresses {
    pub(crate) fn new(hamok: Hamok) -> Self {
        Addresses {
            hamok,
            map: tokio::sync::OnceCell::new(),
        }
    }

    async fn map(&self) -> Result<&HamokMap<String, String>, HamokError> {
        let hamok = self.hamok.clone();
        self.map
            .get_or_try_init(|| async move {
                hamok.get_or_create_map::<String, String>(ADDRESSES).await
            })
            .await
    }

    /// The advertised URL of `peer` as this peer knows it (a local read); `None` when unknown or the
    /// map cannot be opened yet.
    pub(crate) async fn url_of(&self, peer: &str) -> Option<String> {
        let map = match self.map.get() {
            Some(map) => map,
            // Not opened yet: only worth trying once joined, and never for long (a status request
            // must not hang on it).
            None if self.hamok.is_joined() => tokio::time::timeout(OPEN_WAIT, self.map())
                .await
                .ok()?
                .ok()?,
            None => return None,
        };
        map.get(&peer.to_string()).ok().flatten()
    }

    /// Puts `url` as this peer's address (unless it is there already).
    async fn advertise(&self, url: &str) -> Result<(), HamokError> {
        let map = self.map().await?;
        let me = self.hamok.local_peer_id().to_string();
        if map.get(&me)?.as_deref() == Some(url) {
            return Ok(());
        }
        map.set(me, url.to_string()).await.map(|_| ())
    }
}

/// Starts advertising the gateway's address in the background (when it has one and a Tokio runtime
/// runs): retried until the peer is joined and the write succeeds, at most [`MAX_ATTEMPTS`] times.
pub(crate) fn start(gateway: &Shared) {
    let Some(url) = gateway.options.advertise.clone() else {
        return;
    };
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let gateway = std::sync::Arc::downgrade(gateway);
    runtime.spawn(async move {
        let mut pause = FIRST_PAUSE;
        for _ in 0..MAX_ATTEMPTS {
            let Some(g) = gateway.upgrade() else { return };
            let hamok = g.stores.hamok();
            if hamok.is_closed() {
                return;
            }
            if hamok.is_joined() && g.addresses.advertise(&url).await.is_ok() {
                return;
            }
            drop(g);
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(MAX_PAUSE);
        }
    });
}

/// Whether a request is a write that redirect mode sends to the leader.
fn redirectable(method: &Method, path: &str) -> bool {
    let write = matches!(
        *method,
        Method::PUT | Method::POST | Method::DELETE | Method::PATCH
    );
    write
        && ["/v1/kv/", "/v1/hash/", "/v1/set/", "/v1/config/"]
            .iter()
            .any(|p| path.starts_with(p))
}

/// Middleware: in redirect mode, a write on a follower whose leader has advertised an address is
/// answered `307` to the same path and query there; otherwise the request goes on.
pub(crate) async fn redirect_writes(
    State(gateway): State<Shared>,
    request: Request,
    next: Next,
) -> Response {
    if !gateway.options.redirect {
        return next.run(request).await;
    }
    let uri = request
        .extensions()
        .get::<OriginalUri>()
        .map_or_else(|| request.uri().clone(), |o| o.0.clone());
    if !redirectable(request.method(), uri.path()) {
        return next.run(request).await;
    }
    let hamok = gateway.stores.hamok();
    let leader = match hamok.leader_id() {
        Some(l) if !hamok.is_leader() && l != *hamok.local_peer_id() => l,
        _ => return next.run(request).await,
    };
    let Some(base) = gateway.addresses.url_of(leader.as_str()).await else {
        return next.run(request).await;
    };
    let path_and_query = uri.path_and_query().map_or("/", |p| p.as_str());
    let location = format!("{}{path_and_query}", base.trim_end_matches('/'));
    let Ok(value) = HeaderValue::from_str(&location) else {
        return next.run(request).await;
    };
    let body = serde_json::json!({ "leader": leader.as_str(), "location": location });
    let mut response = (StatusCode::TEMPORARY_REDIRECT, axum::Json(body)).into_response();
    response.headers_mut().insert(header::LOCATION, value);
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn which_requests_redirect() {
        assert!(redirectable(&Method::PUT, "/v1/kv/a"));
        assert!(redirectable(&Method::DELETE, "/v1/set/s/m"));
        assert!(!redirectable(&Method::GET, "/v1/kv/a"));
        assert!(!redirectable(&Method::POST, "/v1/locks/l"));
        assert!(!redirectable(&Method::POST, "/v1/queue/q/take"));
        assert!(!redirectable(&Method::PUT, "/metrics"));
    }
}
