//! `/v1/queue/{name}`: FIFO queues of strings. `POST` pushes; `pop` takes the head at most once;
//! `take` leases the head to this peer (at least once: acknowledge it with `ack`, on any gateway,
//! before the lease ends, or the cluster delivers it again). Never redirected: a lease is held by the
//! peer that was asked (and given back if that peer leaves the cluster).

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::Json;
use hamok_collections::queue::MAX_LEASE_MS;
use hamok_collections::DeliveryId;
use serde::Deserialize;
use serde_json::{json, Value};

use super::errors::ApiError;
use super::{millis_param, path, value_of, Shared};
use crate::stores::DEFAULT_LEASE_MS;

/// `POST /v1/queue/{name}` with `{"value": "..."}`: appends it; answers the queue's length after.
pub(crate) async fn push(
    State(g): State<Shared>,
    name: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let name = path(name)?;
    ApiError::check_name(&name)?;
    let value = value_of(body)?;
    let len = g
        .stores
        .queue_push(&name, std::slice::from_ref(&value))
        .await?;
    Ok(Json(json!({ "name": name, "value": value, "len": len })))
}

/// `POST /v1/queue/{name}/pop`: removes the head and answers it (`null` when the queue is empty).
/// At most once: an answer lost on its way is an item lost.
pub(crate) async fn pop(
    State(g): State<Shared>,
    name: Result<Path<String>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let name = path(name)?;
    ApiError::check_name(&name)?;
    let value = g.stores.queue_pop(&name).await?;
    Ok(Json(json!({ "name": name, "value": value })))
}

/// The query of `POST /v1/queue/{name}/take`.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct TakeParams {
    /// How long this peer holds the item before the cluster may deliver it again, in milliseconds.
    lease_ms: Option<u64>,
}

/// `POST /v1/queue/{name}/take?lease_ms=n`: leases the head to this peer; answers its delivery id
/// (`null` when the queue is empty), the item and how many times it was delivered (more than 1: an
/// earlier holder did not acknowledge it).
pub(crate) async fn take(
    State(g): State<Shared>,
    name: Result<Path<String>, PathRejection>,
    q: Result<Query<TakeParams>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let name = path(name)?;
    ApiError::check_name(&name)?;
    let lease_ms = millis_param(
        q?.0.lease_ms,
        "lease_ms",
        DEFAULT_LEASE_MS,
        1..=MAX_LEASE_MS,
    )?;
    let delivery = g
        .stores
        .queue_take(&name, Duration::from_millis(lease_ms))
        .await?;
    Ok(Json(match delivery {
        Some(d) => json!({
            "name": name,
            "id": d.id.0,
            "value": d.value,
            "deliveries": d.deliveries,
            "lease_ms": lease_ms,
        }),
        None => json!({ "name": name, "id": null, "value": null }),
    }))
}

/// `POST /v1/queue/{name}/ack/{id}`: acknowledges a delivery (taken through any gateway); `acked`
/// is false when it was no longer held (its lease ran out, it was acknowledged already, or its holder
/// left): then it may be delivered again, or already was.
pub(crate) async fn ack(
    State(g): State<Shared>,
    p: Result<Path<(String, u64)>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let (name, id) = path(p)?;
    ApiError::check_name(&name)?;
    let acked = g.stores.queue_ack(&name, DeliveryId(id)).await?;
    Ok(Json(json!({ "name": name, "id": id, "acked": acked })))
}
