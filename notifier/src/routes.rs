//! The HTTP API: the two webhook routes and the read/admin routes beside them (which need
//! `ADMIN_TOKEN` when it is set).
//!
//! Every webhook is checked in the same order: the body's size, the signature over the raw body
//! bytes (401, nothing stored), the body's JSON (400), then the dedupe record (200 duplicate).

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use outbox_core::admin_auth::{with_operational_routes, RouteSpec};
use outbox_core::breaker::{self, Admission, BreakerView};
use outbox_core::duration::time_until;
use outbox_core::http::{next_cursor, openapi, ApiError, PageLimit, QueryParams};
use outbox_core::signature::VerifyError;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tracing::{field, Instrument, Span};
use utoipa::{IntoParams, OpenApi, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::channels::{self, Notice};
use crate::metrics::{notified, received};
use crate::store::{self, NewEvent, BREAKER_SCOPE};
use crate::AppState;

/// The route that stores events only.
pub const LOGGER: &str = "/webhooks/logger";
/// The route that stores events and notifies by every configured channel.
pub const NOTIFY: &str = "/webhooks/notify";

/// Longest accepted webhook id: it is a primary key, and btree entries have a size limit.
const MAX_WEBHOOK_ID_BYTES: usize = 256;
const MAX_EVENT_TYPE_CHARS: usize = 200;
/// Pages of the list routes: 50 by default, at most 500.
const PAGE: PageLimit = PageLimit::new(50, 500);

/// The routes that need no `ADMIN_TOKEN` (besides `/health`, `/ready` and `/metrics`): the two
/// receiving routes, which check webhook signatures instead. The stored events, notifications and
/// breakers need it when it is set.
pub const OPEN_ROUTES: &[RouteSpec] = &[
    ("POST", LOGGER),
    ("POST", NOTIFY),
    ("GET", openapi::DOCUMENT_PATH),
];

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Notifier API",
        description = "Receives signed webhooks, stores them and notifies by email and chat."
    ),
    // Named by a query parameter only, which `routes!` does not collect.
    components(schemas(ChannelName))
)]
struct ApiDoc;

/// The API's routes, each registered with its OpenAPI operation (`routes!`), and the document
/// they make, served at `GET /openapi.json`.
pub fn api() -> (Router<AppState>, utoipa::openapi::OpenApi) {
    openapi::serve_document(
        OpenApiRouter::with_openapi(ApiDoc::openapi())
            .routes(routes!(log_webhook))
            .routes(routes!(notify_webhook))
            .routes(routes!(list_events))
            .routes(routes!(list_notifications))
            .routes(routes!(list_breakers))
            .routes(routes!(reset_breakers)),
        OPEN_ROUTES,
    )
}

pub fn router(state: AppState, max_body_bytes: usize, admin_token: Option<&str>) -> Router {
    let (api, _) = api();
    with_operational_routes(api, admin_token, OPEN_ROUTES)
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(state)
}

/// A webhook whose signature matched and whose body is JSON.
struct Received {
    webhook_id: String,
    event_type: Option<String>,
    correlation_id: Option<String>,
    payload: Value,
}

impl Received {
    fn as_new_event<'a>(&'a self, route: &'a str) -> NewEvent<'a> {
        NewEvent {
            route,
            webhook_id: &self.webhook_id,
            event_type: self.event_type.as_deref(),
            payload: &self.payload,
            correlation_id: self.correlation_id.as_deref(),
        }
    }
}

fn webhook_span(route: &'static str, correlation_id: Option<&str>) -> Span {
    tracing::info_span!(
        "webhook",
        route,
        webhook_id = field::Empty,
        correlation_id = correlation_id.map(field::display),
    )
}

/// The id a refused webhook claims to have, shortened: worth logging, not worth trusting.
fn claimed_id(headers: &HeaderMap) -> Option<String> {
    ["webhook-id", "x-webhook-id"]
        .iter()
        .find_map(|name| headers.get(*name).and_then(|v| v.to_str().ok()))
        .map(|id| {
            id.chars()
                .take(outbox_core::http::MAX_CORRELATION_ID_BYTES)
                .collect()
        })
}

/// Verifies and parses a webhook. Every refusal is counted and answered with a 4xx; nothing has
/// been stored when it returns an error.
fn receive(
    state: &AppState,
    route: &'static str,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Received, ApiError> {
    let body = body.map_err(|rejection| {
        state.metrics.received(route, received::INVALID);
        outbox_core::http::body_rejection(rejection, "webhook")
    })?;
    // The signature covers the exact bytes sent, so it is checked before any parsing.
    let verified = state
        .verifier
        .verify(headers, &body, Utc::now().timestamp())
        .map_err(|error| {
            let (outcome, code) = match error {
                VerifyError::MissingHeaders => (received::BAD_SIGNATURE, "missing_signature"),
                VerifyError::BadTimestamp => (received::BAD_SIGNATURE, "invalid_timestamp"),
                VerifyError::BadSignature => (received::BAD_SIGNATURE, "invalid_signature"),
                VerifyError::TooOld { .. } | VerifyError::TooNew { .. } => {
                    (received::STALE, "stale_timestamp")
                }
            };
            state.metrics.received(route, outcome);
            let claimed_id = claimed_id(headers);
            tracing::warn!(%error, code, claimed_id = claimed_id.as_deref(), "webhook refused");
            ApiError::unauthorized(code, error.to_string())
        })?;
    Span::current().record("webhook_id", verified.id.as_str());
    let invalid = |code: &'static str, message: String| {
        state.metrics.received(route, received::INVALID);
        tracing::warn!(code, error = %message, "webhook body refused");
        ApiError::bad_request(code, message)
    };
    if verified.id.is_empty() || verified.id.len() > MAX_WEBHOOK_ID_BYTES {
        return Err(invalid(
            "invalid_webhook_id",
            format!("the webhook id must be 1 to {MAX_WEBHOOK_ID_BYTES} bytes"),
        ));
    }
    let payload: Value = serde_json::from_slice(&body)
        .map_err(|e| invalid("malformed_json", format!("the body is not JSON: {e}")))?;
    // PostgreSQL's jsonb cannot hold NUL characters.
    if outbox_core::http::contains_nul(&payload) {
        return Err(invalid(
            "nul_character",
            "the body must not contain NUL characters".into(),
        ));
    }
    let event_type = payload
        .get("event")
        .and_then(Value::as_str)
        .map(|t| t.chars().take(MAX_EVENT_TYPE_CHARS).collect());
    Ok(Received {
        webhook_id: verified.id,
        event_type,
        correlation_id: outbox_core::http::correlation_id(headers),
        payload,
    })
}

fn duplicate(state: &AppState, route: &str) -> Response {
    state.metrics.received(route, received::DUPLICATE);
    tracing::info!("duplicate webhook, already handled");
    Json(WebhookAnswer::Duplicate { duplicate: true }).into_response()
}

/// The answer to an accepted webhook.
#[derive(Debug, Serialize, ToSchema)]
#[serde(untagged)]
enum WebhookAnswer {
    /// Stored (and notified, on `/webhooks/notify`) now.
    Received {
        received: bool,
        webhook_id: String,
        /// `/webhooks/notify` only: each configured channel's outcome (`sent`, `already_sent`).
        #[serde(skip_serializing_if = "Option::is_none")]
        notifications: Option<BTreeMap<&'static str, &'static str>>,
    },
    /// Handled before (same webhook id): nothing done again.
    Duplicate { duplicate: bool },
}

/// `POST /webhooks/logger`: verifies, deduplicates and stores the event.
#[utoipa::path(post, path = LOGGER, request_body(content = inline(Object), description = "Any JSON; the body is signed"),
    params(
        ("webhook-id" = Option<String>, Header, description = "Standard Webhooks headers (or x-webhook-id, x-webhook-timestamp, x-webhook-signature)"),
        ("webhook-timestamp" = Option<String>, Header),
        ("webhook-signature" = Option<String>, Header),
    ),
    responses(
        (status = 200, description = "Stored, or a duplicate", body = WebhookAnswer),
        (status = 401, description = "Missing, invalid or stale signature"),
    ))]
async fn log_webhook(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let span = webhook_span(
        LOGGER,
        outbox_core::http::correlation_id(&headers).as_deref(),
    );
    async move {
        let event = receive(&state, LOGGER, &headers, body)?;
        let client = state.pool.get().await?;
        if !store::insert_event(&client, &event.as_new_event(LOGGER)).await? {
            return Ok(duplicate(&state, LOGGER));
        }
        state.metrics.received(LOGGER, received::ACCEPTED);
        tracing::info!(event_type = event.event_type.as_deref(), "webhook logged");
        Ok(Json(WebhookAnswer::Received {
            received: true,
            webhook_id: event.webhook_id,
            notifications: None,
        })
        .into_response())
    }
    .instrument(span)
    .await
}

/// Why a notification webhook was not accepted (yet); the sender retries it later.
#[derive(Debug, thiserror::Error)]
enum NotifyError {
    #[error("the circuit breaker of {channels} is open; retry after {retry_at}")]
    BreakerOpen {
        channels: String,
        retry_at: DateTime<Utc>,
    },
    #[error("the notification failed on {channels}: {detail}")]
    ChannelFailed { channels: String, detail: String },
    #[error("{}", .0.message)]
    Api(ApiError),
}

impl From<ApiError> for NotifyError {
    fn from(error: ApiError) -> Self {
        NotifyError::Api(error)
    }
}

impl From<tokio_postgres::Error> for NotifyError {
    fn from(error: tokio_postgres::Error) -> Self {
        NotifyError::Api(error.into())
    }
}

impl From<deadpool_postgres::PoolError> for NotifyError {
    fn from(error: deadpool_postgres::PoolError) -> Self {
        NotifyError::Api(error.into())
    }
}

impl IntoResponse for NotifyError {
    fn into_response(self) -> Response {
        let message = self.to_string();
        match self {
            NotifyError::BreakerOpen { retry_at, .. } => {
                let millis = time_until(retry_at, Utc::now()).as_millis() as u64;
                let mut response = ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "channel_unavailable",
                    message,
                )
                .into_response();
                // Whole seconds, rounded up: a sender retrying at once would only be refused again.
                let retry_after = HeaderValue::from(millis.div_ceil(1000).max(1));
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, retry_after);
                response
            }
            NotifyError::ChannelFailed { .. } => {
                ApiError::new(StatusCode::BAD_GATEWAY, "notification_failed", message)
                    .into_response()
            }
            NotifyError::Api(error) => error.into_response(),
        }
    }
}

/// `POST /webhooks/notify`: verifies and deduplicates like the logger, then notifies by every
/// configured channel. The event is recorded as received only once every channel has sent it;
/// a channel that already sent it on an earlier attempt is skipped, so a retried webhook never
/// sends a second email or chat message.
#[utoipa::path(post, path = NOTIFY, request_body(content = inline(Object), description = "Any JSON; the body is signed"),
    params(
        ("webhook-id" = Option<String>, Header, description = "Standard Webhooks headers (or x-webhook-id, x-webhook-timestamp, x-webhook-signature)"),
        ("webhook-timestamp" = Option<String>, Header),
        ("webhook-signature" = Option<String>, Header),
    ),
    responses(
        (status = 200, description = "Stored and notified by every configured channel, or a duplicate", body = WebhookAnswer),
        (status = 401, description = "Missing, invalid or stale signature"),
        (status = 502, description = "A channel failed; the sender retries"),
        (status = 503, description = "A channel's circuit breaker is open (Retry-After), or PostgreSQL is unavailable"),
    ))]
async fn notify_webhook(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let span = webhook_span(
        NOTIFY,
        outbox_core::http::correlation_id(&headers).as_deref(),
    );
    async move {
        let event = match receive(&state, NOTIFY, &headers, body) {
            Ok(event) => event,
            Err(error) => return error.into_response(),
        };
        // Detached from the connection: a sender that hangs up (or times out) must not cancel us
        // between sending a notification and recording that it was sent.
        let work = tokio::spawn(notify(state, event).instrument(Span::current()));
        match work.await {
            Ok(Ok(response)) => response,
            Ok(Err(error)) => error.into_response(),
            Err(join) => ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                format!("the notification task failed: {join}"),
            )
            .into_response(),
        }
    }
    .instrument(span)
    .await
}

async fn notify(state: AppState, event: Received) -> Result<Response, NotifyError> {
    let _slot =
        state.notify_slots.acquire().await.map_err(|_| {
            NotifyError::Api(ApiError::unavailable("the notifier is shutting down"))
        })?;
    // A concurrent delivery of the same webhook waits here, then sees it as a duplicate (we
    // recorded it) or takes over (we did not, having recorded what was sent).
    let client = state.pool.get().await?;
    let mut lock = store::EventLock::acquire(client, NOTIFY, &event.webhook_id).await?;
    let outcome = notify_locked(&state, &event, lock.client()).await;
    lock.release().await;
    outcome
}

/// Notifies by every channel that has not sent the event yet, then records the event; on the one
/// connection that holds the event's lock.
async fn notify_locked(
    state: &AppState,
    event: &Received,
    client: &mut outbox_core::db::Client,
) -> Result<Response, NotifyError> {
    if store::has_event(&*client, NOTIFY, &event.webhook_id).await? {
        return Ok(duplicate(state, NOTIFY));
    }
    let notice = Notice {
        webhook_id: &event.webhook_id,
        event_type: event.event_type.as_deref(),
        correlation_id: event.correlation_id.as_deref(),
        payload: &event.payload,
    };
    let policy = state.policy;
    let mut outcomes = BTreeMap::new();
    let mut open: Vec<&str> = Vec::new();
    let mut retry_at: Option<DateTime<Utc>> = None;
    let mut failed: Vec<(&str, String)> = Vec::new();
    for channel in state.channels.iter() {
        let name = channel.name();
        if store::already_sent(&*client, &event.webhook_id, name).await? {
            outcomes.insert(name, "already_sent");
            continue;
        }
        let (admission, breaker) = breaker::store::update(client, BREAKER_SCOPE, name, |b| {
            b.admit(&policy, Utc::now())
        })
        .await?;
        state.metrics.set_breaker(name, breaker.state);
        if let Admission::Rejected { retry_at: at } = admission {
            store::record_notification(
                &*client,
                &event.webhook_id,
                name,
                notified::REJECTED_OPEN,
                Some("circuit breaker open"),
            )
            .await?;
            state.metrics.notified(name, notified::REJECTED_OPEN);
            tracing::warn!(channel = name, retry_at = %at, "channel breaker open; not sent");
            outcomes.insert(name, notified::REJECTED_OPEN);
            open.push(name);
            retry_at = Some(retry_at.map_or(at, |r| r.min(at)));
            continue;
        }
        let result = channel.send(&notice).await;
        // The record first: once it says "sent", no retry sends again.
        let (outcome, error) = match &result {
            Ok(()) => (notified::SENT, None),
            Err(e) => (notified::FAILED, Some(e.to_string())),
        };
        store::record_notification(&*client, &event.webhook_id, name, outcome, error.as_deref())
            .await?;
        state.metrics.notified(name, outcome);
        let ((), breaker) =
            breaker::store::update(client, BREAKER_SCOPE, name, |b| match &result {
                Ok(()) => b.on_success(&policy),
                Err(_) => b.on_failure(&policy, Utc::now()),
            })
            .await?;
        state.metrics.set_breaker(name, breaker.state);
        match error {
            None => tracing::info!(channel = name, breaker = breaker.state.as_str(), "notified"),
            Some(error) => {
                tracing::warn!(channel = name, %error, breaker = breaker.state.as_str(), "notification failed");
                failed.push((name, error));
            }
        }
        outcomes.insert(name, outcome);
    }
    if let Some(retry_at) = retry_at {
        return Err(NotifyError::BreakerOpen {
            channels: open.join(", "),
            retry_at,
        });
    }
    if !failed.is_empty() {
        return Err(NotifyError::ChannelFailed {
            channels: failed
                .iter()
                .map(|(n, _)| *n)
                .collect::<Vec<_>>()
                .join(", "),
            detail: failed
                .iter()
                .map(|(n, e)| format!("{n}: {e}"))
                .collect::<Vec<_>>()
                .join("; "),
        });
    }
    // Recorded last: an event on record is one every channel has sent.
    if !store::insert_event(&*client, &event.as_new_event(NOTIFY)).await? {
        return Ok(duplicate(state, NOTIFY));
    }
    state.metrics.received(NOTIFY, received::ACCEPTED);
    tracing::info!(
        event_type = event.event_type.as_deref(),
        "webhook accepted and notified"
    );
    Ok(Json(WebhookAnswer::Received {
        received: true,
        webhook_id: event.webhook_id.clone(),
        notifications: Some(outcomes),
    })
    .into_response())
}

/// Query of `GET /webhooks/events`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct EventsQuery {
    /// At most this many (1–500, default 50).
    #[param(minimum = 1, maximum = 500, nullable = false)]
    limit: Option<i64>,
    /// Only events older than this `seq` (the previous page's `next_before`).
    #[param(nullable = false)]
    before: Option<i64>,
    /// Only events of this route, e.g. `/webhooks/logger`.
    #[param(pattern = r"^[^\u0000]*$", nullable = false)]
    route: Option<String>,
}

/// A page of received events, newest first.
#[derive(Debug, Serialize, ToSchema)]
struct EventList {
    events: Vec<store::ReceivedEvent>,
    /// The `before` of the next page; null on the last page.
    next_before: Option<i64>,
}

/// `GET /webhooks/events`: received events, newest first; `next_before` fetches the next page.
#[utoipa::path(get, path = "/webhooks/events", params(EventsQuery),
    responses((status = 200, body = EventList)))]
async fn list_events(
    State(state): State<AppState>,
    QueryParams(q): QueryParams<EventsQuery>,
) -> Result<Json<EventList>, ApiError> {
    let limit = PAGE.of(q.limit)?;
    let client = state.pool.get().await?;
    let events = store::list_events(&client, q.route.as_deref(), q.before, limit).await?;
    let next_before = next_cursor(&events, limit, |e| e.seq);
    Ok(Json(EventList {
        events,
        next_before,
    }))
}

/// Query of `GET /notifications`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct NotificationsQuery {
    /// At most this many (1–500, default 50).
    #[param(minimum = 1, maximum = 500, nullable = false)]
    limit: Option<i64>,
    /// Only attempts older than this id (the previous page's `next_before`).
    #[param(nullable = false)]
    before: Option<i64>,
    /// Only attempts for this webhook id.
    #[param(pattern = r"^[^\u0000]*$", nullable = false)]
    webhook_id: Option<String>,
    /// Only attempts by this channel (`email`, `chat`).
    #[param(pattern = r"^[^\u0000]*$", nullable = false)]
    channel: Option<String>,
}

/// A page of notification attempts, newest first.
#[derive(Debug, Serialize, ToSchema)]
struct NotificationList {
    notifications: Vec<store::Notification>,
    /// The `before` of the next page; null on the last page.
    next_before: Option<i64>,
}

/// `GET /notifications`: every notification attempt and its outcome, newest first.
#[utoipa::path(get, path = "/notifications", params(NotificationsQuery),
    responses((status = 200, body = NotificationList)))]
async fn list_notifications(
    State(state): State<AppState>,
    QueryParams(q): QueryParams<NotificationsQuery>,
) -> Result<Json<NotificationList>, ApiError> {
    let limit = PAGE.of(q.limit)?;
    let client = state.pool.get().await?;
    let notifications = store::list_notifications(
        &client,
        q.webhook_id.as_deref(),
        q.channel.as_deref(),
        q.before,
        limit,
    )
    .await?;
    let next_before = next_cursor(&notifications, limit, |n| n.id);
    Ok(Json(NotificationList {
        notifications,
        next_before,
    }))
}

/// One channel's breaker: its name, whether it is configured, and the shared breaker view.
#[derive(Debug, Serialize, ToSchema)]
struct ChannelBreaker {
    channel: &'static str,
    enabled: bool,
    #[serde(flatten)]
    breaker: BreakerView,
}

/// Both channels' breakers.
#[derive(Debug, Serialize, ToSchema)]
struct BreakerList {
    breakers: Vec<ChannelBreaker>,
}

/// Both channels' breakers (configured or not), as stored, with when an open one lets a probe in.
async fn breakers(state: &AppState) -> Result<Json<BreakerList>, ApiError> {
    let client = state.pool.get().await?;
    let stored = breaker::store::list(&client, BREAKER_SCOPE).await?;
    let list: Vec<ChannelBreaker> = channels::ALL
        .iter()
        .map(|&name| {
            let view = BreakerView::of_stored(
                stored.iter().find(|b| b.name == name),
                state.policy.open_for,
            );
            state.metrics.set_breaker(name, view.breaker.state);
            ChannelBreaker {
                channel: name,
                enabled: state.channels.iter().any(|c| c.name() == name),
                breaker: view,
            }
        })
        .collect();
    Ok(Json(BreakerList { breakers: list }))
}

/// `GET /circuit-breaker`.
#[utoipa::path(get, path = "/circuit-breaker",
    responses((status = 200, body = BreakerList)))]
async fn list_breakers(State(state): State<AppState>) -> Result<Json<BreakerList>, ApiError> {
    breakers(&state).await
}

/// Query of `POST /circuit-breaker/reset`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct ResetQuery {
    /// `email` or `chat`; absent: both.
    #[param(value_type = Option<ChannelName>, nullable = false)]
    channel: Option<String>,
}

/// A channel's name (`channels::ALL`), for the document.
#[derive(ToSchema)]
#[serde(rename_all = "lowercase")]
#[allow(dead_code)]
enum ChannelName {
    Email,
    Chat,
}

/// `POST /circuit-breaker/reset[?channel=chat]`: closes the breaker(s) with zero counts.
#[utoipa::path(post, path = "/circuit-breaker/reset", params(ResetQuery),
    responses((status = 200, description = "Both channels' breakers after the reset", body = BreakerList)))]
async fn reset_breakers(
    State(state): State<AppState>,
    QueryParams(q): QueryParams<ResetQuery>,
) -> Result<Json<BreakerList>, ApiError> {
    let names: Vec<&str> = match q.channel.as_deref() {
        None => channels::ALL.to_vec(),
        Some(name) => match channels::ALL.iter().find(|&&c| c == name) {
            Some(&c) => vec![c],
            None => {
                return Err(ApiError::bad_request(
                    "unknown_channel",
                    format!("channel must be one of {}", channels::ALL.join(", ")),
                ))
            }
        },
    };
    let client = state.pool.get().await?;
    for name in names {
        breaker::store::reset(&client, BREAKER_SCOPE, name).await?;
        tracing::info!(channel = name, "circuit breaker reset");
    }
    breakers(&state).await
}
