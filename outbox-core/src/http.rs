//! What every service's HTTP side shares: `/health`, `/ready`, `/metrics`, the JSON error shape,
//! extractors whose rejections use that shape, and the server (timeouts, connection bound,
//! bounded graceful shutdown).

mod body_timeout;
mod extract;
pub mod openapi;
mod page;
mod server;
mod uniform;

pub use extract::{body_rejection, contains_nul, parse_object, JsonBody, QueryParams};
pub use page::{next_cursor, PageLimit};
pub use server::serve;
pub use uniform::uniform_errors;

use std::future::Future;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use serde_json::json;
use tokio::net::TcpListener;

/// The one error shape of every API: `{"error": "human sentence", "code": "machine_code"}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }
    pub fn unprocessable(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, code, message)
    }
    pub fn not_found(what: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("{what} not found"),
        )
    }
    pub fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, code, message)
    }
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
    }
    pub fn unauthorized(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, code, message)
    }
}

/// Seconds a client is told to wait (`Retry-After`) before repeating a request refused with 503.
pub const RETRY_AFTER_SECONDS: u32 = 1;

/// A 503 carries `Retry-After: 1`: every 503 here is a dependency that is briefly unavailable.
impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::warn!(status = self.status.as_u16(), code = self.code, error = %self.message, "request failed");
        }
        let mut response = (
            self.status,
            Json(json!({"error": self.message, "code": self.code})),
        )
            .into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(axum::http::header::RETRY_AFTER, RETRY_AFTER_SECONDS.into());
        }
        response
    }
}

/// PostgreSQL errors: a transient one ([`crate::db::is_transient`]: connection lost, server
/// shutting down or starting, out of resources, serialization failure or deadlock) is a 503 with
/// `Retry-After`, since the same request may succeed shortly; anything else a 500.
impl From<tokio_postgres::Error> for ApiError {
    fn from(error: tokio_postgres::Error) -> Self {
        if crate::db::is_transient(&error) {
            ApiError::unavailable(format!(
                "PostgreSQL is unavailable: {}",
                crate::db::describe(&error)
            ))
        } else {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "database_error",
                format!("database error: {}", crate::db::describe(&error)),
            )
        }
    }
}

/// What `outbox.publish` refused is the request's fault (422); PostgreSQL trouble maps as usual.
impl From<crate::outbox::PublishError> for ApiError {
    fn from(error: crate::outbox::PublishError) -> Self {
        use crate::outbox::PublishError;
        match error {
            PublishError::Invalid(m) => ApiError::unprocessable("invalid_event", m),
            PublishError::TooLarge(m) => ApiError::unprocessable("event_too_large", m),
            PublishError::NoRoute(m) => ApiError::unprocessable("no_topic_route", m),
            PublishError::Db(e) => ApiError::from(e),
        }
    }
}

impl From<deadpool_postgres::PoolError> for ApiError {
    fn from(error: deadpool_postgres::PoolError) -> Self {
        ApiError::unavailable(format!("PostgreSQL is unavailable: {error}"))
    }
}

impl From<crate::db::DbError> for ApiError {
    fn from(error: crate::db::DbError) -> Self {
        use crate::db::DbError;
        match error {
            DbError::Unavailable(e) => ApiError::from(e),
            DbError::Query(e) => ApiError::from(e),
            other => ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "database_error",
                format!("database error: {other}"),
            ),
        }
    }
}

/// Longest accepted `X-Correlation-Id` (the envelope's rule).
pub use crate::envelope::MAX_CORRELATION_ID_BYTES;

/// The request's `X-Correlation-Id` when it is one the envelope can carry
/// ([`crate::envelope::check_correlation_id`]); anything else is ignored rather than logged or
/// forwarded.
pub fn correlation_id(headers: &axum::http::HeaderMap) -> Option<String> {
    headers
        .get("x-correlation-id")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| crate::envelope::check_correlation_id(v).is_ok())
        .map(str::to_owned)
}

/// The answer of `GET /ready`: whether each dependency answers.
#[derive(Debug, Serialize)]
pub struct Readiness {
    pub ready: bool,
    pub checks: serde_json::Map<String, serde_json::Value>,
}

impl Readiness {
    /// Ready when every named check passed.
    pub fn of(checks: &[(&str, bool)]) -> Self {
        Readiness {
            ready: checks.iter().all(|(_, ok)| *ok),
            checks: checks
                .iter()
                .map(|(n, ok)| (n.to_string(), (*ok).into()))
                .collect(),
        }
    }
}

/// What a service's state offers to the shared operational routes.
pub trait Operational: Clone + Send + Sync + 'static {
    fn registry(&self) -> &prometheus::Registry;
    fn readiness(&self) -> impl Future<Output = Readiness> + Send;
}

/// `GET /health` (the process is alive), `GET /ready` (its dependencies answer: 200, else 503)
/// and `GET /metrics` (Prometheus text).
pub fn operational_routes<S: Operational>() -> Router<S> {
    Router::new()
        .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/ready", get(ready::<S>))
        .route("/metrics", get(metrics::<S>))
}

async fn ready<S: Operational>(State(state): State<S>) -> Response {
    let readiness = state.readiness().await;
    let status = if readiness.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(readiness)).into_response()
}

async fn metrics<S: Operational>(State(state): State<S>) -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        crate::telemetry::encode(state.registry()),
    )
        .into_response()
}

/// Binds `addr`, with a message that names the setting when the port is taken.
pub async fn bind(addr: &str) -> anyhow::Result<TcpListener> {
    use anyhow::Context;
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} (set LISTEN_ADDR to another address)"))
}
