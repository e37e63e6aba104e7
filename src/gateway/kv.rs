//! `/v1/kv/{key}`: the key-value store, with ETags (`"v-<fnv64 hex>"` of the value) and
//! compare-and-set through `If-Match` / `If-None-Match: *`.

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::Response;
use serde_json::json;

use super::errors::ApiError;
use super::{
    consistent, kv_etag, not_modified, path, value_of, with_etag, write_preconditions,
    Precondition, ReadParams, Shared,
};

/// `GET /v1/kv/{key}`.
pub(crate) async fn get(
    State(g): State<Shared>,
    key: Result<Path<String>, PathRejection>,
    q: Result<Query<ReadParams>, QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let key = path(key)?;
    let linearizable = consistent(q)?;
    match g.stores.kv_get(&key, linearizable).await? {
        None => Err(ApiError::not_found(format!("no key {key:?}"))),
        Some(value) => {
            let etag = kv_etag(&value);
            if let Some(r) = not_modified(&headers, &etag)? {
                return Ok(r);
            }
            with_etag(&etag, json!({ "key": key, "value": value }))
        }
    }
}

/// The current value when it meets `if_match` (read linearizably, so a lagging follower does not
/// refuse an ETag the leader handed out); `412` otherwise.
async fn current_matching(
    g: &Shared,
    key: &str,
    if_match: &Precondition,
) -> Result<String, ApiError> {
    match g.stores.kv_get(key, true).await? {
        Some(current) if if_match.matches(&kv_etag(&current)) => Ok(current),
        Some(_) => Err(ApiError::precondition_failed(format!(
            "the value of {key:?} does not match If-Match"
        ))),
        None => Err(ApiError::precondition_failed(format!(
            "no key {key:?} to match If-Match"
        ))),
    }
}

/// `PUT /v1/kv/{key}` with `{"value": "..."}`.
pub(crate) async fn put(
    State(g): State<Shared>,
    key: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let key = path(key)?;
    let pre = write_preconditions(&headers)?;
    let value = value_of(body)?;
    let previous = if let Some(if_match) = &pre.if_match {
        let current = current_matching(&g, &key, if_match).await?;
        if !g
            .stores
            .kv_compare_and_set(&key, Some(&current), &value)
            .await?
        {
            return Err(ApiError::precondition_failed(format!(
                "the value of {key:?} changed meanwhile"
            )));
        }
        Some(current)
    } else if pre.if_absent {
        if !g.stores.kv_compare_and_set(&key, None, &value).await? {
            return Err(ApiError::precondition_failed(format!(
                "key {key:?} exists (If-None-Match: *)"
            )));
        }
        None
    } else {
        g.stores.kv_set(&key, &value).await?
    };
    with_etag(
        &kv_etag(&value),
        json!({ "key": key, "value": value, "previous": previous }),
    )
}

/// `DELETE /v1/kv/{key}`.
pub(crate) async fn delete(
    State(g): State<Shared>,
    key: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let key = path(key)?;
    let pre = write_preconditions(&headers)?;
    if pre.if_absent {
        return Err(ApiError::bad_request(
            "If-None-Match: * means nothing on a delete",
        ));
    }
    let previous = if let Some(if_match) = &pre.if_match {
        let current = current_matching(&g, &key, if_match).await?;
        // `Stores` has no conditional delete: the map itself does.
        if !g
            .kv_map()
            .await?
            .remove_if(key.clone(), current.clone())
            .await?
        {
            return Err(ApiError::precondition_failed(format!(
                "the value of {key:?} changed meanwhile"
            )));
        }
        Some(current)
    } else {
        g.stores.kv_del(&key).await?
    };
    Ok(axum::response::IntoResponse::into_response(axum::Json(
        json!({ "key": key, "previous": previous }),
    )))
}
