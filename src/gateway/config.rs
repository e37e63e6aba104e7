//! `/v1/config/{name}` and `/v1/config/{name}/watch`: shared config values with their revision (the
//! ETag), compare-and-set through `If-Match` / `If-None-Match: *`, and a Server-Sent-Events watch.

use std::convert::Infallible;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::Stream;
use hamok_collections::{CasOutcome, ConfigWatch, Versioned};
use hamok_runtime::HamokError;
use serde_json::json;

use super::errors::ApiError;
use super::{
    consistent, not_modified, path, revision_etag, value_of, with_etag, write_preconditions,
    ReadParams, Shared,
};

/// How often an idle watch sends a keep-alive comment.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// `GET /v1/config/{name}`: `{"value", "revision"}`, `ETag: "<revision>"`.
pub(crate) async fn get(
    State(g): State<Shared>,
    name: Result<Path<String>, PathRejection>,
    q: Result<Query<ReadParams>, QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let name = path(name)?;
    ApiError::check_name(&name)?;
    match g.stores.config_get(&name, consistent(q)?).await? {
        None => Err(ApiError::not_found(format!(
            "config {name:?} was never set"
        ))),
        Some(Versioned { revision, value }) => {
            let etag = revision_etag(revision);
            if let Some(r) = not_modified(&headers, &etag)? {
                return Ok(r);
            }
            with_etag(
                &etag,
                json!({ "name": name, "value": value, "revision": revision }),
            )
        }
    }
}

/// `PUT /v1/config/{name}` with `{"value": "..."}`: `{"revision"}`, `ETag: "<revision>"`.
pub(crate) async fn put(
    State(g): State<Shared>,
    name: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let name = path(name)?;
    ApiError::check_name(&name)?;
    let pre = write_preconditions(&headers)?;
    let value = value_of(body)?;
    let expected = if let Some(if_match) = &pre.if_match {
        // The revision the client saw, checked against a linearizable read (so a lagging follower
        // does not refuse it), then compare-and-set on it in the log.
        match g.stores.config_get(&name, true).await? {
            Some(current) if if_match.matches(&revision_etag(current.revision)) => {
                Some(current.revision)
            }
            Some(_) => {
                return Err(ApiError::precondition_failed(format!(
                    "the revision of config {name:?} does not match If-Match"
                )))
            }
            None => {
                return Err(ApiError::precondition_failed(format!(
                    "config {name:?} was never set (If-Match)"
                )))
            }
        }
    } else if pre.if_absent {
        Some(0)
    } else {
        None
    };
    match g.stores.config_set(&name, &value, expected).await? {
        CasOutcome::Set(revision) => with_etag(
            &revision_etag(revision),
            json!({ "name": name, "value": value, "revision": revision }),
        ),
        CasOutcome::Conflict(current) => Err(ApiError::precondition_failed(format!(
            "config {name:?} is at revision {} now",
            current.unwrap_or(0)
        ))),
    }
}

/// One watch event: `event: value`, `id: <revision>`, data `{"name", "value", "revision"}`.
fn event(name: &str, item: Result<Option<Versioned<String>>, HamokError>) -> Event {
    match item {
        Ok(Some(v)) => Event::default()
            .event("value")
            .id(v.revision.to_string())
            .data(json!({ "name": name, "value": v.value, "revision": v.revision }).to_string()),
        Ok(None) => Event::default()
            .event("value")
            .data(json!({ "name": name, "value": null, "revision": 0 }).to_string()),
        Err(e) => Event::default()
            .event("error")
            .data(json!({ "error": e.to_string(), "may_have_taken_effect": false }).to_string()),
    }
}

/// The events of `watch` until the peer closes (or the client goes: the stream is dropped then).
fn events(
    name: String,
    watch: ConfigWatch<String>,
    permit: tokio::sync::OwnedSemaphorePermit,
) -> impl Stream<Item = Result<Event, Infallible>> {
    futures_util::stream::unfold(
        (name, watch, permit),
        |(name, mut watch, permit)| async move {
            let item = watch.next().await?;
            let ev = event(&name, item);
            Some((Ok(ev), (name, watch, permit)))
        },
    )
}

/// `GET /v1/config/{name}/watch`: Server-Sent Events, the current value then each new one.
pub(crate) async fn watch(
    State(g): State<Shared>,
    name: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let name = path(name)?;
    ApiError::check_name(&name)?;
    let permit = g.watches.clone().try_acquire_owned().map_err(|_| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many watches open on this peer",
        )
    })?;
    let watch = g.stores.config_watch(&name).await?;
    Ok(Sse::new(events(name, watch, permit))
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response())
}
