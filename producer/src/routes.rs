//! The HTTP API: handlers validate input, then call `store`.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use outbox_core::admin_auth::{with_operational_routes, RouteSpec};
use outbox_core::envelope::new_correlation_id;
use outbox_core::http::{next_cursor, openapi, ApiError, JsonBody, PageLimit, QueryParams};
use outbox_core::outbox::OutboxState;
use outbox_core::routing::valid_event_type;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tracing::Instrument;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use crate::store::{self, Created, CreatedMessage, Idempotency, NewMessage};
use crate::AppState;

/// Longest accepted `content`, in bytes.
pub const MAX_CONTENT_BYTES: usize = 64 * 1024;
const MAX_KEY_BYTES: usize = 256;

/// The routes that need no `ADMIN_TOKEN` (besides `/health`, `/ready` and `/metrics`): publishing
/// a message and the API description. Every other route needs it when it is set.
pub const OPEN_ROUTES: &[RouteSpec] = &[("POST", "/messages"), ("GET", "/openapi.json")];

/// The API's routes, each registered with its OpenAPI operation (`routes!`), and the document
/// they make, served at `GET /openapi.json`.
pub fn api() -> (Router<AppState>, utoipa::openapi::OpenApi) {
    openapi::serve_document(
        OpenApiRouter::with_openapi(crate::openapi::info())
            .routes(routes!(create_message, list_messages))
            .routes(routes!(get_message))
            .routes(routes!(list_outbox))
            .routes(routes!(retry_outbox))
            .routes(routes!(stats)),
        OPEN_ROUTES,
    )
}

pub fn router(state: AppState) -> Router {
    let (api, _) = api();
    with_operational_routes(api, state.config.admin_token.as_deref(), OPEN_ROUTES)
        .route_layer(middleware::from_fn_with_state(
            state.metrics.clone(),
            crate::metrics::track,
        ))
        .with_state(state)
}

/// The body of `POST /messages`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateMessage {
    /// The message text; required, not only white space, no NUL, at most 64 KiB of UTF-8.
    #[schema(
        min_length = 1,
        max_length = 65536,
        pattern = r"^[^\u0000]*[^\u0000\t\n\u000b\f\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000][^\u0000]*$"
    )]
    pub content: String,
    /// Aggregate id: events with the same key reach Kafka in order. Default: the message id.
    /// Not only white space, no NUL, at most 256 bytes of UTF-8.
    #[schema(
        min_length = 1,
        max_length = 256,
        pattern = r"^[^\u0000]*[^\u0000\t\n\u000b\f\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000][^\u0000]*$"
    )]
    pub key: Option<String>,
    /// Event type, default `message.created`: dot-separated lowercase words. Types other than
    /// `message.*` need a `TOPIC_ROUTES` rule, else 422 `no_topic_route`.
    #[serde(rename = "type")]
    #[schema(max_length = 128, pattern = r"^[a-z0-9_]+(\.[a-z0-9_]+)+$")]
    pub event_type: Option<String>,
    /// Extra JSON carried in the event's `data.data`.
    #[schema(schema_with = openapi::json_without_nul)]
    pub data: Option<Value>,
}

fn validate(request: &CreateMessage) -> Result<(), ApiError> {
    if request.content.trim().is_empty() {
        return Err(ApiError::unprocessable(
            "empty_content",
            "content must not be empty",
        ));
    }
    if request.content.len() > MAX_CONTENT_BYTES {
        return Err(ApiError::unprocessable(
            "content_too_long",
            format!(
                "content is {} bytes; at most {MAX_CONTENT_BYTES} are accepted",
                request.content.len()
            ),
        ));
    }
    if let Some(data) = &request.data {
        // The event's data is {"message_id", "content", "key", "data": <this>}: one level more.
        let depth = outbox_core::envelope::depth(data) + 1;
        if depth > outbox_core::envelope::MAX_DATA_DEPTH {
            return Err(ApiError::unprocessable(
                "data_too_deep",
                format!(
                    "data nests {} levels deep; at most {} are accepted (the event wraps it in one more)",
                    depth - 1,
                    outbox_core::envelope::MAX_DATA_DEPTH - 1
                ),
            ));
        }
    }
    if let Some(key) = &request.key {
        if key.trim().is_empty() || key.len() > MAX_KEY_BYTES {
            return Err(ApiError::unprocessable(
                "invalid_key",
                format!("key must be 1 to {MAX_KEY_BYTES} bytes"),
            ));
        }
    }
    if let Some(event_type) = &request.event_type {
        if !valid_event_type(event_type) {
            return Err(ApiError::unprocessable(
                "invalid_type",
                "type must be dot-separated lowercase words, like message.created",
            ));
        }
    }
    Ok(())
}

/// The request's `X-Correlation-Id`, or a new one when it has none. One that could not be carried
/// into the event's headers unchanged is refused rather than silently replaced.
fn correlation_id(headers: &HeaderMap) -> Result<String, ApiError> {
    let Some(value) = headers.get("x-correlation-id") else {
        return Ok(new_correlation_id());
    };
    let value = value.to_str().unwrap_or_default();
    outbox_core::envelope::check_correlation_id(value)
        .map_err(|e| ApiError::bad_request("invalid_correlation_id", e.to_string()))?;
    Ok(value.to_owned())
}

/// Creates a message and its event in one transaction.
#[utoipa::path(
    post, path = "/messages", request_body = CreateMessage,
    params(
        ("Idempotency-Key" = Option<String>, Header, min_length = 1, max_length = 255, pattern = r"^[\t\x20-\x7e]*[\x21-\x7e][\t\x20-\x7e]*$",
            description = "Repeat-safe key (1 to 255 visible ASCII characters): the same key and body return the first response for IDEMPOTENCY_KEY_RETENTION"),
        ("X-Correlation-Id" = Option<String>, Header, pattern = r"^[!-~]{1,128}$", description = "Carried into the event (1 to 128 visible ASCII characters, else 400); generated when absent"),
    ),
    responses(
        (status = 201, description = "Message and outbox event committed (state P)", body = CreatedMessage),
        (status = 400, description = "Malformed JSON, a body that is not an object, or an invalid Idempotency-Key"),
        (status = 413, description = "Body larger than MAX_BODY_BYTES"),
        (status = 415, description = "Not Content-Type: application/json"),
        (status = 422, description = "Invalid fields, or an Idempotency-Key reused with another body"),
        (status = 503, description = "PostgreSQL unavailable; nothing was written"),
    )
)]
pub async fn create_message(
    State(state): State<AppState>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<Value>,
) -> Result<Response, ApiError> {
    let correlation_id = correlation_id(&headers)?;
    let span = tracing::info_span!("create_message", otel.name = "producer transaction", correlation_id = %correlation_id);
    let request_hash = hex::encode(Sha256::digest(body.to_string().as_bytes()));
    let request: CreateMessage = serde_json::from_value(body)
        .map_err(|e| ApiError::unprocessable("invalid_body", format!("invalid message: {e}")))?;
    validate(&request)?;
    let event_type = request
        .event_type
        .unwrap_or_else(|| "message.created".into());
    let topic = state.routes.topic_for(&event_type).ok_or_else(|| {
        ApiError::unprocessable(
            "no_topic_route",
            format!("no topic is configured for event type '{event_type}' (see TOPIC_ROUTES)"),
        )
    })?;
    let idempotency_key = match headers.get("idempotency-key") {
        None => None,
        Some(value) => Some(
            value
                .to_str()
                .ok()
                .map(str::trim)
                .filter(|k| !k.is_empty() && k.len() <= 255)
                .ok_or_else(|| {
                    ApiError::bad_request(
                        "invalid_idempotency_key",
                        "Idempotency-Key must be 1 to 255 visible characters",
                    )
                })?,
        ),
    };
    let new = NewMessage {
        content: request.content,
        aggregate_id: request.key,
        event_type,
        topic: topic.to_owned(),
        data: request.data,
        correlation_id: correlation_id.clone(),
    };
    let idempotency = idempotency_key.map(|key| Idempotency { key, request_hash });
    let outcome = async {
        let mut client = state.pool.get().await?;
        store::create_message(&mut client, new, idempotency).await
    }
    .instrument(span.clone())
    .await?;
    let _entered = span.enter();
    let (mut response, replayed) = match outcome {
        Created::New(body) => {
            state.metrics.messages_created.inc();
            tracing::info!(event_id = %body.event_id, message_id = %body.id, "message created");
            ((StatusCode::CREATED, Json(body)).into_response(), false)
        }
        Created::Replayed(body) => {
            state.metrics.idempotent_replays.inc();
            ((StatusCode::CREATED, Json(body)).into_response(), true)
        }
        Created::KeyReused => {
            return Err(ApiError::unprocessable(
                "idempotency_key_reused",
                "this Idempotency-Key was used with a different request body",
            ))
        }
    };
    let headers = response.headers_mut();
    if let Ok(value) = HeaderValue::from_str(&correlation_id) {
        headers.insert("x-correlation-id", value);
    }
    if replayed {
        headers.insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    Ok(response)
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct MessagePage {
    /// At most this many (1–500, default 50).
    #[param(minimum = 1, maximum = 500, nullable = false)]
    limit: Option<i64>,
    /// Only messages older than this message id (the `next_before` of the previous page).
    #[param(
        nullable = false,
        pattern = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
    )]
    before: Option<Uuid>,
}

/// Pages of the list routes: 50 by default, at most 500.
const PAGE: PageLimit = PageLimit::new(50, 500);

/// A page of messages, newest first.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct MessageList {
    pub items: Vec<store::MessageView>,
    /// The `before` of the next page; null on the last page.
    pub next_before: Option<Uuid>,
}

/// Lists messages, newest first.
#[utoipa::path(get, path = "/messages", params(MessagePage), responses((status = 200, body = MessageList)))]
pub async fn list_messages(
    State(state): State<AppState>,
    QueryParams(page): QueryParams<MessagePage>,
) -> Result<Json<MessageList>, ApiError> {
    let limit = PAGE.of(page.limit)?;
    let client = state.pool.get().await?;
    let items = store::list_messages(&client, limit, page.before).await?;
    let next_before = next_cursor(&items, limit, |m| m.id);
    Ok(Json(MessageList { items, next_before }))
}

/// One message with its event's state, attempts, last error and Kafka position.
#[utoipa::path(get, path = "/messages/{id}", params(("id" = Uuid, Path, pattern = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$", description = "Message id")),
    responses((status = 200, body = store::MessageView), (status = 400, description = "The id is not a UUID"), (status = 404, description = "No such message")))]
pub async fn get_message(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<store::MessageView>, ApiError> {
    let id = Uuid::parse_str(&id)
        .map_err(|_| ApiError::bad_request("invalid_id", "message ids are UUIDs"))?;
    let client = state.pool.get().await?;
    store::get_message(&client, id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::not_found("message"))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct OutboxPage {
    /// P, E, X or D.
    #[param(value_type = OutboxState, required = false)]
    state: Option<String>,
    /// Only rows with a larger id (the `next_after` of the previous page).
    #[param(nullable = false)]
    after: Option<i64>,
    /// At most this many (1–500, default 50).
    #[param(minimum = 1, maximum = 500, nullable = false)]
    limit: Option<i64>,
}

/// A page of outbox rows in id order.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct OutboxList {
    pub items: Vec<store::OutboxRow>,
    /// The `after` of the next page; null on the last page.
    pub next_after: Option<i64>,
}

/// Outbox rows in id order, optionally of one state.
#[utoipa::path(get, path = "/outbox", params(OutboxPage), responses((status = 200, body = OutboxList)))]
pub async fn list_outbox(
    State(state): State<AppState>,
    QueryParams(page): QueryParams<OutboxPage>,
) -> Result<Json<OutboxList>, ApiError> {
    let limit = PAGE.of(page.limit)?;
    let filter = match page.state.as_deref() {
        None => None,
        Some(code) => Some(OutboxState::parse(code).ok_or_else(|| {
            ApiError::bad_request(
                "invalid_state",
                "state must be P (pending), E (sent), X (retry) or D (dead)",
            )
        })?),
    };
    let client = state.pool.get().await?;
    let items = store::list_outbox(&client, filter, page.after.unwrap_or(0), limit).await?;
    let next_after = next_cursor(&items, limit, |r| r.id);
    Ok(Json(OutboxList { items, next_after }))
}

/// Counts by state and the age of the oldest unsent row.
#[utoipa::path(get, path = "/stats", responses((status = 200, body = store::Stats)))]
pub async fn stats(State(state): State<AppState>) -> Result<Json<store::Stats>, ApiError> {
    let client = state.pool.get().await?;
    Ok(Json(store::stats(&client).await?))
}

/// Sends a dead (D) row again: it becomes P with its attempts reset.
#[utoipa::path(post, path = "/outbox/{id}/retry", params(("id" = i64, Path, description = "Outbox row id")),
    responses((status = 200, body = store::OutboxRow), (status = 404, description = "No such outbox row"), (status = 409, description = "The row is not dead")))]
pub async fn retry_outbox(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<store::OutboxRow>, ApiError> {
    let id: i64 = id
        .parse()
        .map_err(|_| ApiError::bad_request("invalid_id", "outbox ids are integers"))?;
    let mut client = state.pool.get().await?;
    let row = store::retry_dead(&mut client, id).await?;
    tracing::info!(outbox_id = id, event_id = %row.event_id, "dead outbox row queued again");
    Ok(Json(row))
}
