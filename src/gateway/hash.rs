//! `/v1/hash/{name}` and `/v1/hash/{name}/{field}`: hashes (named string maps).

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::Json;
use serde_json::{json, Value};

use super::errors::ApiError;
use super::{consistent, path, value_of, ReadParams, Shared};

/// `GET /v1/hash/{name}`: every field (this peer's state; with `?consistent=true`, after a
/// linearizable barrier).
pub(crate) async fn all(
    State(g): State<Shared>,
    name: Result<Path<String>, PathRejection>,
    q: Result<Query<ReadParams>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let name = path(name)?;
    ApiError::check_name(&name)?;
    if consistent(q)? {
        // A linearizable read of any field waits until this peer has applied everything committed
        // before the read began; the local read of all fields after it is as fresh.
        g.stores.hash_get(&name, "", true).await?;
    }
    let fields: serde_json::Map<String, Value> = g
        .stores
        .hash_all(&name)
        .await?
        .into_iter()
        .map(|(k, v)| (k, Value::String(v)))
        .collect();
    Ok(Json(json!({ "name": name, "fields": fields })))
}

/// `GET /v1/hash/{name}/{field}`.
pub(crate) async fn get(
    State(g): State<Shared>,
    p: Result<Path<(String, String)>, PathRejection>,
    q: Result<Query<ReadParams>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let (name, field) = path(p)?;
    ApiError::check_name(&name)?;
    match g.stores.hash_get(&name, &field, consistent(q)?).await? {
        Some(value) => Ok(Json(
            json!({ "name": name, "field": field, "value": value }),
        )),
        None => Err(ApiError::not_found(format!(
            "no field {field:?} in hash {name:?}"
        ))),
    }
}

/// `PUT /v1/hash/{name}/{field}` with `{"value": "..."}`.
pub(crate) async fn put(
    State(g): State<Shared>,
    p: Result<Path<(String, String)>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let (name, field) = path(p)?;
    ApiError::check_name(&name)?;
    let value = value_of(body)?;
    let added = g
        .stores
        .hash_set(&name, &[(field.clone(), value.clone())])
        .await?;
    Ok(Json(
        json!({ "name": name, "field": field, "value": value, "created": added > 0 }),
    ))
}

/// `DELETE /v1/hash/{name}/{field}`.
pub(crate) async fn delete(
    State(g): State<Shared>,
    p: Result<Path<(String, String)>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let (name, field) = path(p)?;
    ApiError::check_name(&name)?;
    let removed = g
        .stores
        .hash_del(&name, std::slice::from_ref(&field))
        .await?;
    Ok(Json(
        json!({ "name": name, "field": field, "deleted": removed > 0 }),
    ))
}
