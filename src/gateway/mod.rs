//! The HTTP gateway (feature `gateway`): a JSON API over one peer's [`Stores`] (the same stores as the
//! `hamok` REPL), any peer accepting writes (forwarded inside the cluster by the runtime) or redirecting
//! them to the leader, Server-Sent-Events watches, the peer's status and Prometheus `/metrics`.
//!
//! ```no_run
//! # async fn demo(stores: hamok::stores::Stores) -> std::io::Result<()> {
//! use hamok::gateway::{serve, GatewayOptions};
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! serve(stores, listener, GatewayOptions::default()).await
//! # }
//! ```
//!
//! # Routes
//!
//! Bodies are JSON `{"value": "<string>"}` (for the writes that carry a value); answers are JSON.
//! `?consistent=true` on any `GET` of a store makes it a linearizable read (confirmed with the leader
//! first); without it a read answers this peer's state.
//!
//! | method and path | does | answers |
//! |---|---|---|
//! | `GET /v1/kv/{key}` | value of `key` (`ETag: "v-<fnv64 hex>"`; `If-None-Match` -> `304`) | `{"key", "value"}`, `404` if absent |
//! | `PUT /v1/kv/{key}` | sets `key` (`If-Match: <etag>` or `*`, `If-None-Match: *`: compare-and-set, `412` if not met) | `{"key", "value", "previous"}` + `ETag` |
//! | `DELETE /v1/kv/{key}` | deletes `key` (`If-Match` as above) | `{"key", "previous"}` |
//! | `GET /v1/hash/{name}` | every field of hash `name` | `{"name", "fields": {...}}` |
//! | `GET /v1/hash/{name}/{field}` | one field | `{"name", "field", "value"}`, `404` if absent |
//! | `PUT /v1/hash/{name}/{field}` | sets the field | `{"name", "field", "value", "created"}` |
//! | `DELETE /v1/hash/{name}/{field}` | deletes the field | `{"name", "field", "deleted"}` |
//! | `GET /v1/set/{name}/{member}` | whether `member` is in set `name` | `{"name", "member", "present"}` |
//! | `PUT /v1/set/{name}/{member}` | adds it (no body) | `{"name", "member", "added"}` |
//! | `DELETE /v1/set/{name}/{member}` | removes it | `{"name", "member", "removed"}` |
//! | `POST` or `PUT /v1/locks/{name}?wait_ms=n` | takes the lock for this peer (waits up to `wait_ms`, default 5 000, at most 60 000) | `{"name", "token"}` |
//! | `DELETE /v1/locks/{name}` | releases it if this peer took it | `{"name", "released"}` |
//! | `GET /v1/locks/{name}` | whether this peer holds it (through this gateway or the REPL) | `{"name", "held", "token"}` |
//! | `POST /v1/queue/{name}` | appends the value to queue `name` | `{"name", "value", "len"}` (`503` when the queue is full) |
//! | `POST /v1/queue/{name}/pop` | removes the head (at most once) | `{"name", "value"}` (`null` when empty) |
//! | `POST /v1/queue/{name}/take?lease_ms=n` | leases the head to this peer (default 30 000 ms; at least once) | `{"name", "id", "value", "deliveries", "lease_ms"}` (`id` and `value` `null` when empty) |
//! | `POST /v1/queue/{name}/ack/{id}` | acknowledges delivery `id` (taken through any gateway) | `{"name", "id", "acked"}` |
//! | `GET /v1/config/{name}` | value and revision (`ETag: "<revision>"`) | `{"name", "value", "revision"}`, `404` if never set |
//! | `PUT /v1/config/{name}` | sets it (`If-Match: "<revision>"` or `*`, `If-None-Match: *`: `412` if not met) | `{"name", "value", "revision"}` + `ETag` |
//! | `GET /v1/config/{name}/watch` | Server-Sent Events: the current value, then every new one (`event: value`, `id: <revision>`, data `{"name", "value", "revision"}`; `value` null while never set), keep-alive comments every 15 s | `text/event-stream` |
//! | `GET /v1/status` | role, term, leader (and its URL), indices, members with their URLs, this peer's URL | JSON |
//! | `GET /metrics` | Prometheus text: the runtime's histograms, this peer's counters and gauges | `text/plain; version=0.0.4` |
//!
//! **Writes on a follower.** By default every peer accepts writes and the runtime forwards them to the
//! leader inside the cluster. With [`GatewayOptions::redirect`], a follower answers the writes of the
//! stores (`PUT`/`POST`/`DELETE` under `/v1/kv`, `/v1/hash`, `/v1/set`, `/v1/config`) with
//! `307 Temporary Redirect` to the leader's advertised base URL plus the same path and query; when the
//! leader or its address is not known yet it forwards instead. Locks are never redirected: a lock is
//! held by the peer that took it, which is the peer the client asked. Nor are queues: a `take` leases
//! the item to the peer asked.
//!
//! **Advertised addresses.** Each gateway puts `peer id -> advertised URL` into the replicated map
//! `gateway:addresses` once its peer has joined (retried in the background, bounded), and reads the
//! leader's entry from it to redirect.
//!
//! **Errors** are JSON `{"error": "...", "may_have_taken_effect": bool}`; a client mistake is always a
//! 4xx (bad JSON or name `400`, precondition `412`, body over [`GatewayOptions::max_body_bytes`] or a
//! value too large for the log `413`); an unavailable cluster is `503` (with `may_have_taken_effect`
//! true after a timeout or an interruption: read back before retrying). The full table is in the
//! source of `errors.rs`.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::routing::{get, post};
use hamok_collections::HamokMap;
use serde::Deserialize;

use crate::stores::Stores;

mod advertise;
mod config;
mod errors;
mod hash;
mod kv;
mod locks;
mod metrics;
mod queue;
mod set;
mod status;

use errors::ApiError;

/// How the gateway behaves.
#[derive(Clone, Debug)]
pub struct GatewayOptions {
    /// Answer writes on a follower with `307 Temporary Redirect` to the leader's advertised address
    /// instead of forwarding them inside the cluster.
    pub redirect: bool,
    /// This peer's HTTP address as the other peers (and clients) reach it, advertised through the
    /// cluster for redirects (default: the address it listens on).
    pub advertise: Option<String>,
    /// Largest request body accepted (default 1 MiB); a larger one is answered `413`.
    pub max_body_bytes: usize,
}

impl Default for GatewayOptions {
    fn default() -> Self {
        GatewayOptions {
            redirect: false,
            advertise: None,
            max_body_bytes: 1 << 20,
        }
    }
}

/// What every handler shares.
pub(crate) struct Gateway {
    /// The stores of this peer.
    pub(crate) stores: Stores,
    /// The options it was started with (`advertise` without a trailing `/`).
    pub(crate) options: GatewayOptions,
    /// The replicated map of advertised addresses.
    pub(crate) addresses: advertise::Addresses,
    /// The key-value store's map, opened directly for what [`Stores`] lacks (a conditional delete).
    kv_map: tokio::sync::OnceCell<HamokMap<String, String>>,
    /// Bounds the open watches.
    pub(crate) watches: Arc<tokio::sync::Semaphore>,
}

/// Shared state of the routes.
pub(crate) type Shared = Arc<Gateway>;

/// Most watch streams one gateway serves at once (more are answered `503`).
const MAX_WATCHES: usize = 1_024;

impl Gateway {
    /// The `kv` map of the stores, opened once.
    pub(crate) async fn kv_map(&self) -> Result<&HamokMap<String, String>, ApiError> {
        use hamok_collections::HamokCollections;
        let hamok = self.stores.hamok().clone();
        Ok(self
            .kv_map
            .get_or_try_init(
                || async move { hamok.get_or_create_map::<String, String>("kv").await },
            )
            .await?)
    }
}

/// The gateway's routes over `stores` (see the [module documentation](self) for the table).
///
/// Called inside a Tokio runtime, it also starts advertising `options.advertise` (when given) through
/// the cluster in the background; [`serve`] fills it with the listening address when unset.
pub fn router(stores: Stores, options: GatewayOptions) -> axum::Router {
    let options = GatewayOptions {
        advertise: options
            .advertise
            .as_deref()
            .map(|a| a.trim_end_matches('/').to_string()),
        ..options
    };
    let max_body = options.max_body_bytes;
    let gateway = Arc::new(Gateway {
        addresses: advertise::Addresses::new(stores.hamok().clone()),
        stores,
        options,
        kv_map: tokio::sync::OnceCell::new(),
        watches: Arc::new(tokio::sync::Semaphore::new(MAX_WATCHES)),
    });
    advertise::start(&gateway);
    metrics::install_recorder();
    axum::Router::new()
        .route("/v1/kv/{key}", get(kv::get).put(kv::put).delete(kv::delete))
        .route("/v1/hash/{name}", get(hash::all))
        .route(
            "/v1/hash/{name}/{field}",
            get(hash::get).put(hash::put).delete(hash::delete),
        )
        .route(
            "/v1/set/{name}/{member}",
            get(set::get).put(set::put).delete(set::delete),
        )
        .route(
            "/v1/locks/{name}",
            get(locks::get)
                .post(locks::take)
                .put(locks::take)
                .delete(locks::release),
        )
        .route("/v1/queue/{name}", post(queue::push))
        .route("/v1/queue/{name}/pop", post(queue::pop))
        .route("/v1/queue/{name}/take", post(queue::take))
        .route("/v1/queue/{name}/ack/{id}", post(queue::ack))
        .route("/v1/config/{name}", get(config::get).put(config::put))
        .route("/v1/config/{name}/watch", get(config::watch))
        .route("/v1/status", get(status::get))
        .route("/metrics", get(metrics::get))
        .fallback(|| async { ApiError::not_found("no such route") })
        .layer(axum::middleware::from_fn_with_state(
            gateway.clone(),
            advertise::redirect_writes,
        ))
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(gateway)
}

/// Serves the gateway on `listener` until the returned future is dropped (or fails). Advertises
/// `options.advertise`, or `http://<the listening address>` when unset.
pub async fn serve(
    stores: Stores,
    listener: tokio::net::TcpListener,
    options: GatewayOptions,
) -> std::io::Result<()> {
    let local: SocketAddr = listener.local_addr()?;
    let options = GatewayOptions {
        advertise: options
            .advertise
            .clone()
            .or_else(|| Some(format!("http://{local}"))),
        ..options
    };
    axum::serve(listener, router(stores, options)).await
}

// -------------------------------------------------------------------------------------------------
// What the routes share: extracting paths, queries and bodies as JSON errors, ETags.

/// The query of a read.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct ReadParams {
    /// Linearizable read.
    #[serde(default)]
    consistent: bool,
}

/// Whether a read asked for `?consistent=true`.
pub(crate) fn consistent(q: Result<Query<ReadParams>, QueryRejection>) -> Result<bool, ApiError> {
    Ok(q?.0.consistent)
}

/// A millisecond query parameter `name`: `default` when absent, else within `range` or a `400`.
pub(crate) fn millis_param(
    value: Option<u64>,
    name: &str,
    default: u64,
    range: std::ops::RangeInclusive<u64>,
) -> Result<u64, ApiError> {
    let ms = value.unwrap_or(default);
    if range.contains(&ms) {
        Ok(ms)
    } else {
        Err(ApiError::bad_request(format!(
            "{name} must be from {} to {}",
            range.start(),
            range.end()
        )))
    }
}

/// A path's parameters, or a `400`.
pub(crate) fn path<T>(p: Result<Path<T>, PathRejection>) -> Result<T, ApiError> {
    Ok(p?.0)
}

/// The body of a write that carries a value.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ValueBody {
    value: String,
}

/// The `value` of a `{"value": "..."}` body (whatever its content type): `400` when it is not that,
/// `413` when over the body limit.
pub(crate) fn value_of(body: Result<Bytes, BytesRejection>) -> Result<String, ApiError> {
    let body = body?;
    serde_json::from_slice::<ValueBody>(&body)
        .map(|b| b.value)
        .map_err(|e| {
            ApiError::bad_request(format!("the body must be {{\"value\": \"<string>\"}}: {e}"))
        })
}

/// A JSON answer with an `ETag`.
pub(crate) fn with_etag(
    etag: &str,
    body: serde_json::Value,
) -> Result<axum::response::Response, ApiError> {
    use axum::response::IntoResponse;
    let mut response = axum::Json(body).into_response();
    let value =
        HeaderValue::from_str(etag).map_err(|_| ApiError::bad_request("unrepresentable ETag"))?;
    response.headers_mut().insert(header::ETAG, value);
    Ok(response)
}

/// The ETag of a key-value value: `"v-<FNV-1a 64 of the value, hex>"`.
pub(crate) fn kv_etag(value: &str) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in value.as_bytes() {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("\"v-{hash:016x}\"")
}

/// The ETag of a config revision: `"<revision>"`.
pub(crate) fn revision_etag(revision: u64) -> String {
    format!("\"{revision}\"")
}

/// A parsed `If-Match` / `If-None-Match` header.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Precondition {
    /// `*`.
    Any,
    /// A list of entity tags (quoted, a weak `W/` prefix dropped).
    Tags(Vec<String>),
}

impl Precondition {
    /// Whether `etag` (quoted) is matched.
    pub(crate) fn matches(&self, etag: &str) -> bool {
        match self {
            Precondition::Any => true,
            Precondition::Tags(tags) => tags.iter().any(|t| t == etag),
        }
    }
}

/// The precondition in header `name`, if any; `400` when it is not valid text.
pub(crate) fn precondition(
    headers: &HeaderMap,
    name: header::HeaderName,
) -> Result<Option<Precondition>, ApiError> {
    let mut tags = Vec::new();
    let mut any = false;
    for value in headers.get_all(&name) {
        let text = value
            .to_str()
            .map_err(|_| ApiError::bad_request(format!("{name} is not visible ASCII")))?;
        for tag in text.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            if tag == "*" {
                any = true;
            } else {
                tags.push(tag.strip_prefix("W/").unwrap_or(tag).to_string());
            }
        }
    }
    Ok(match (any, tags.is_empty()) {
        (true, _) => Some(Precondition::Any),
        (false, false) => Some(Precondition::Tags(tags)),
        (false, true) => None,
    })
}

/// The preconditions of a write: `If-Match`, and `If-None-Match` (only `*` is meaningful on a write:
/// "only if absent"; a list of tags is a `400`).
pub(crate) struct WritePreconditions {
    /// `If-Match`.
    pub(crate) if_match: Option<Precondition>,
    /// `If-None-Match: *`.
    pub(crate) if_absent: bool,
}

/// Reads the preconditions of a write.
pub(crate) fn write_preconditions(headers: &HeaderMap) -> Result<WritePreconditions, ApiError> {
    let if_match = precondition(headers, header::IF_MATCH)?;
    let if_absent = match precondition(headers, header::IF_NONE_MATCH)? {
        None => false,
        Some(Precondition::Any) => true,
        Some(Precondition::Tags(_)) => {
            return Err(ApiError::bad_request(
                "on a write, If-None-Match only takes `*` (only if absent)",
            ))
        }
    };
    if if_match.is_some() && if_absent {
        return Err(ApiError::bad_request(
            "If-Match and If-None-Match: * cannot both hold",
        ));
    }
    Ok(WritePreconditions {
        if_match,
        if_absent,
    })
}

/// `304 Not Modified` when a read's `If-None-Match` matches `etag`.
pub(crate) fn not_modified(
    headers: &HeaderMap,
    etag: &str,
) -> Result<Option<axum::response::Response>, ApiError> {
    use axum::response::IntoResponse;
    if let Some(p) = precondition(headers, header::IF_NONE_MATCH)? {
        if p.matches(etag) {
            let mut r = axum::http::StatusCode::NOT_MODIFIED.into_response();
            if let Ok(v) = HeaderValue::from_str(etag) {
                r.headers_mut().insert(header::ETAG, v);
            }
            return Ok(Some(r));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preconditions() {
        let mut h = HeaderMap::new();
        assert_eq!(precondition(&h, header::IF_MATCH).unwrap(), None);
        h.insert(header::IF_MATCH, HeaderValue::from_static("\"a\", W/\"b\""));
        let p = precondition(&h, header::IF_MATCH).unwrap().unwrap();
        assert!(p.matches("\"a\"") && p.matches("\"b\"") && !p.matches("\"c\""));
        h.insert(header::IF_NONE_MATCH, HeaderValue::from_static("*"));
        assert!(write_preconditions(&h).is_err());
        assert_eq!(kv_etag("x"), kv_etag("x"));
        assert_ne!(kv_etag("x"), kv_etag("y"));
        assert_eq!(revision_etag(7), "\"7\"");
    }
}
