//! Every error the gateway answers, in one place: the status of each [`HamokError`] and of each client
//! mistake, and the JSON body `{"error": "...", "may_have_taken_effect": bool}`.
//!
//! | cause | status | `may_have_taken_effect` |
//! |---|---|---|
//! | bad JSON, bad name, bad query or path, bad `If-Match`/`If-None-Match` | 400 | false |
//! | no such key / field / config | 404 | false |
//! | `Rejected`, `KindMismatch`, `StaleFence` | 409 | false |
//! | `If-Match` / `If-None-Match: *` not met | 412 | false |
//! | body over `max_body_bytes`, `TooLarge` (value too large for the log) | 413 | false |
//! | `NotJoined`, `NoQuorum`, `NotLeader`, `Closed`, `Busy`, `Raft`, `Transport` | 503 | false |
//! | `Timeout`, `Interrupted` | 503 | true |
//! | `AppliedResponseLost`, `OutcomeUnknown` | 500 | true |
//! | `Codec`, `Config`, `Storage`, anything else | 500 | as the error says |

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use hamok_runtime::HamokError;

/// An error answer: a status and the JSON body `{"error", "may_have_taken_effect"}`.
#[derive(Debug)]
pub(crate) struct ApiError {
    pub(crate) status: StatusCode,
    pub(crate) message: String,
    pub(crate) may_have_taken_effect: bool,
}

impl ApiError {
    /// A client mistake or a refusal that changed nothing.
    pub(crate) fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            may_have_taken_effect: false,
        }
    }

    /// `400 Bad Request`.
    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    /// `404 Not Found`.
    pub(crate) fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }

    /// `412 Precondition Failed`.
    pub(crate) fn precondition_failed(message: impl Into<String>) -> Self {
        Self::new(StatusCode::PRECONDITION_FAILED, message)
    }

    /// A store name checked with [`check_name`](crate::stores::check_name): `400` when it is not valid.
    pub(crate) fn check_name(name: &str) -> Result<(), ApiError> {
        crate::stores::check_name(name).map_err(|e| match e {
            HamokError::Rejected(reason) => ApiError::bad_request(reason),
            other => ApiError::from(other),
        })
    }
}

/// The status of each [`HamokError`] (see the module table).
fn status_of(e: &HamokError) -> StatusCode {
    match e {
        HamokError::NotJoined
        | HamokError::NoQuorum { .. }
        | HamokError::Timeout { .. }
        | HamokError::Interrupted(_)
        | HamokError::NotLeader { .. }
        | HamokError::Closed
        | HamokError::Busy(_)
        | HamokError::Raft(_)
        | HamokError::Transport { .. } => StatusCode::SERVICE_UNAVAILABLE,
        HamokError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
        HamokError::Rejected(_)
        | HamokError::KindMismatch { .. }
        | HamokError::StaleFence { .. } => StatusCode::CONFLICT,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl From<HamokError> for ApiError {
    fn from(e: HamokError) -> Self {
        ApiError {
            status: status_of(&e),
            may_have_taken_effect: e.may_have_taken_effect(),
            message: e.to_string(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({
            "error": self.message,
            "may_have_taken_effect": self.may_have_taken_effect,
        });
        let mut response = (self.status, axum::Json(body)).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

/// A rejection of one of axum's extractors (path, query, body) as a JSON error: its own 4xx status
/// (`413` for a body over the limit), never a 500.
pub(crate) fn rejection(status: StatusCode, message: String) -> ApiError {
    let status = if status.is_client_error() {
        status
    } else {
        StatusCode::BAD_REQUEST
    };
    ApiError::new(status, message)
}

impl From<axum::extract::rejection::PathRejection> for ApiError {
    fn from(r: axum::extract::rejection::PathRejection) -> Self {
        rejection(r.status(), r.body_text())
    }
}

impl From<axum::extract::rejection::QueryRejection> for ApiError {
    fn from(r: axum::extract::rejection::QueryRejection) -> Self {
        rejection(r.status(), r.body_text())
    }
}

impl From<axum::extract::rejection::BytesRejection> for ApiError {
    fn from(r: axum::extract::rejection::BytesRejection) -> Self {
        rejection(r.status(), r.body_text())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapping() {
        let e = ApiError::from(HamokError::Timeout { after_ms: 1 });
        assert_eq!(e.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(e.may_have_taken_effect);
        let e = ApiError::from(HamokError::NotJoined);
        assert_eq!(e.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(!e.may_have_taken_effect);
        let e = ApiError::from(HamokError::TooLarge { size: 2, limit: 1 });
        assert_eq!(e.status, StatusCode::PAYLOAD_TOO_LARGE);
        let e = ApiError::from(HamokError::Rejected("no".into()));
        assert_eq!(e.status, StatusCode::CONFLICT);
        assert_eq!(
            ApiError::check_name("a b").unwrap_err().status,
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            rejection(StatusCode::INTERNAL_SERVER_ERROR, String::new()).status,
            StatusCode::BAD_REQUEST
        );
    }
}
