//! `/v1/locks/{name}`: locks taken for this peer (held until released here, or until the peer leaves
//! the cluster). Never redirected: the holder is the peer that was asked.

use std::time::Duration;

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::errors::ApiError;
use super::{millis_param, path, Shared};

/// How long taking a lock waits by default.
const DEFAULT_WAIT_MS: u64 = 5_000;
/// The longest wait a client may ask for.
const MAX_WAIT_MS: u64 = 60_000;

/// The query of `POST /v1/locks/{name}`.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct TakeParams {
    /// How long to wait for the lock, in milliseconds.
    wait_ms: Option<u64>,
}

/// `POST` / `PUT /v1/locks/{name}?wait_ms=n`: `{"token": n}`.
pub(crate) async fn take(
    State(g): State<Shared>,
    name: Result<Path<String>, PathRejection>,
    q: Result<Query<TakeParams>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let name = path(name)?;
    ApiError::check_name(&name)?;
    let wait_ms = millis_param(q?.0.wait_ms, "wait_ms", DEFAULT_WAIT_MS, 0..=MAX_WAIT_MS)?;
    let token = g.stores.lock(&name, Duration::from_millis(wait_ms)).await?;
    Ok(Json(json!({ "name": name, "token": token })))
}

/// `DELETE /v1/locks/{name}`: `{"released": bool}` (false when this peer did not hold it).
pub(crate) async fn release(
    State(g): State<Shared>,
    name: Result<Path<String>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let name = path(name)?;
    ApiError::check_name(&name)?;
    let released = g.stores.unlock(&name).await?;
    Ok(Json(json!({ "name": name, "released": released })))
}

/// `GET /v1/locks/{name}`: whether this peer holds it, and under which token.
pub(crate) async fn get(
    State(g): State<Shared>,
    name: Result<Path<String>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let name = path(name)?;
    ApiError::check_name(&name)?;
    let token = g.stores.held_token(&name);
    Ok(Json(
        json!({ "name": name, "held": token.is_some(), "token": token }),
    ))
}
