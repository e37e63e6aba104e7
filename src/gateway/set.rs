//! `/v1/set/{name}/{member}`: sets of strings (`PUT` adds, `GET` answers whether present, `DELETE`
//! removes; no body).

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::Json;
use serde_json::{json, Value};

use super::errors::ApiError;
use super::{consistent, path, ReadParams, Shared};

/// `GET /v1/set/{name}/{member}`.
pub(crate) async fn get(
    State(g): State<Shared>,
    p: Result<Path<(String, String)>, PathRejection>,
    q: Result<Query<ReadParams>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let (name, member) = path(p)?;
    ApiError::check_name(&name)?;
    let present = g.stores.set_has(&name, &member, consistent(q)?).await?;
    Ok(Json(
        json!({ "name": name, "member": member, "present": present }),
    ))
}

/// `PUT /v1/set/{name}/{member}`.
pub(crate) async fn put(
    State(g): State<Shared>,
    p: Result<Path<(String, String)>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let (name, member) = path(p)?;
    ApiError::check_name(&name)?;
    let added = g
        .stores
        .set_add(&name, std::slice::from_ref(&member))
        .await?;
    Ok(Json(
        json!({ "name": name, "member": member, "added": added > 0 }),
    ))
}

/// `DELETE /v1/set/{name}/{member}`.
pub(crate) async fn delete(
    State(g): State<Shared>,
    p: Result<Path<(String, String)>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let (name, member) = path(p)?;
    ApiError::check_name(&name)?;
    let removed = g
        .stores
        .set_del(&name, std::slice::from_ref(&member))
        .await?;
    Ok(Json(
        json!({ "name": name, "member": member, "removed": removed > 0 }),
    ))
}
