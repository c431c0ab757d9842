//! `/endpoints`: create, read, change, enable/disable, rotate the secret, replay dead letters,
//! delete.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use chrono::{DateTime, Utc};
use outbox_core::http::{ApiError, JsonBody};
use outbox_core::signature::Secret;
use serde::{Deserialize, Deserializer, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};

use super::optional_body;
use crate::delivery::store;
use crate::endpoints::{self, Endpoint, EndpointChanges, InvalidEndpoint, NewEndpoint};
use crate::AppState;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create, list))
        .routes(routes!(get_one, patch, put, delete))
        .routes(routes!(secret))
        .routes(routes!(rotate_secret))
        .routes(routes!(disable))
        .routes(routes!(enable))
        .routes(routes!(replay))
}

/// `event_types` in the document: 1 to 64 filters, none with a NUL character (which the API
/// refuses before reading the body); which filters are valid the description says.
fn event_types() -> utoipa::openapi::schema::Array {
    use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, Type};
    ArrayBuilder::new()
        .description(Some(
            "1 to 64 filters: `*`, an event type (`message.created`) or a prefix (`message.*`)",
        ))
        .items(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .pattern(Some(outbox_core::http::openapi::NO_NUL)),
        )
        .min_items(Some(1))
        .max_items(Some(64))
        .build()
}

/// [`event_types`], where null means absent (`PATCH`).
fn event_types_or_null() -> utoipa::openapi::schema::Array {
    let mut array = event_types();
    array.schema_type = utoipa::openapi::schema::SchemaType::from_iter([
        utoipa::openapi::schema::Type::Array,
        utoipa::openapi::schema::Type::Null,
    ]);
    array
}

/// The `{id}` of every `/endpoints/{id}…` route.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
struct EndpointPath {
    /// Endpoint id
    #[param(min_length = 1, pattern = r"^[^\u0000/]*$")]
    id: String,
}

fn invalid(error: InvalidEndpoint) -> ApiError {
    ApiError::unprocessable(error.code(), error.to_string())
}

fn not_found() -> ApiError {
    ApiError::not_found("endpoint")
}

/// `Some(None)` for an explicit `null`, `None` when the field is absent.
fn nullable<'de, T: Deserialize<'de>, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

/// The body of `POST /endpoints`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct CreateEndpoint {
    /// 1 to 64 of `[A-Za-z0-9_.-]`; generated when absent.
    #[serde(default)]
    #[schema(pattern = r"^[A-Za-z0-9_.-]{1,64}$")]
    id: Option<String>,
    /// An http or https URL with a host; private, loopback and other special-purpose addresses
    /// only with `ALLOW_PRIVATE_ENDPOINTS=true` (else 422 `private_url`).
    #[schema(pattern = r"^[^\u0000]*$")]
    url: String,
    /// 1 to 64 filters: `*`, an event type (`message.created`) or a prefix (`message.*`).
    #[schema(schema_with = event_types)]
    event_types: Vec<String>,
    /// At most 1024 characters.
    #[serde(default)]
    #[schema(max_length = 1024, pattern = r"^[^\u0000]*$")]
    description: Option<String>,
    /// A `whsec_` secret (base64 of 24 to 64 bytes); generated when absent.
    #[serde(default)]
    #[schema(pattern = r"^[^\u0000]*$")]
    secret: Option<String>,
    /// Requests a second at most; absent or null: no limit.
    #[serde(default)]
    #[schema(minimum = 1, maximum = 100000)]
    rate_limit_per_second: Option<i32>,
    /// Default true.
    #[serde(default)]
    enabled: Option<bool>,
}

impl CreateEndpoint {
    fn check(self, allow_private: bool) -> Result<NewEndpoint, InvalidEndpoint> {
        let id = match self.id {
            Some(id) => {
                endpoints::validate_id(&id)?;
                id
            }
            None => endpoints::new_endpoint_id(),
        };
        let url = endpoints::validate_url(&self.url, allow_private)?;
        endpoints::validate_event_types(&self.event_types)?;
        endpoints::validate_rate_limit(self.rate_limit_per_second)?;
        endpoints::validate_description(self.description.as_deref())?;
        let secret = match self.secret {
            Some(text) => Secret::parse(&text)?,
            None => Secret::generate(),
        };
        Ok(NewEndpoint {
            id,
            url: url.to_string(),
            description: self.description,
            event_types: self.event_types,
            secret,
            rate_limit_per_second: self.rate_limit_per_second,
            enabled: self.enabled.unwrap_or(true),
        })
    }
}

/// Creates an endpoint; the answer holds its secret (the only answer besides `/secret` and
/// `rotate-secret` that does).
#[utoipa::path(post, path = "/endpoints", operation_id = "create_endpoint", request_body = CreateEndpoint,
    responses(
        (status = 201, description = "The endpoint, with its secret", body = Endpoint),
        (status = 409, description = "An endpoint with this id exists (`endpoint_exists`)"),
        (status = 422, description = "An invalid field (`invalid_url`, `private_url`, `invalid_event_type`, …)"),
    ))]
async fn create(
    State(state): State<AppState>,
    JsonBody(body): JsonBody<CreateEndpoint>,
) -> Result<(StatusCode, Json<Endpoint>), ApiError> {
    let new = body
        .check(state.config.allow_private_endpoints)
        .map_err(invalid)?;
    let client = state.pool.get().await?;
    let endpoint = endpoints::insert(&client, &new).await?.ok_or_else(|| {
        ApiError::conflict(
            "endpoint_exists",
            format!("endpoint '{}' already exists", new.id),
        )
    })?;
    tracing::info!(endpoint_id = %endpoint.id, url = %endpoint.url, "endpoint created");
    Ok((StatusCode::CREATED, Json(endpoint)))
}

/// Every endpoint, in id order, without secrets.
#[derive(Serialize, ToSchema)]
struct EndpointList {
    endpoints: Vec<Endpoint>,
}

/// Every endpoint, without secrets.
#[utoipa::path(get, path = "/endpoints", operation_id = "list_endpoints",
    responses((status = 200, body = EndpointList)))]
async fn list(State(state): State<AppState>) -> Result<Json<EndpointList>, ApiError> {
    let client = state.pool.get().await?;
    let endpoints = endpoints::list(&client).await?;
    Ok(Json(EndpointList { endpoints }))
}

/// One endpoint, without its secret.
#[utoipa::path(get, path = "/endpoints/{id}", operation_id = "get_endpoint", params(EndpointPath),
    responses((status = 200, body = Endpoint), (status = 404, description = "No such endpoint")))]
async fn get_one(
    State(state): State<AppState>,
    Path(EndpointPath { id }): Path<EndpointPath>,
) -> Result<Json<Endpoint>, ApiError> {
    let client = state.pool.get().await?;
    endpoints::get(&client, &id, false)
        .await?
        .map(Json)
        .ok_or_else(not_found)
}

/// An endpoint's current signing secret.
#[derive(Serialize, ToSchema)]
struct EndpointSecret {
    id: String,
    secret: Option<String>,
}

/// The endpoint's current signing secret.
#[utoipa::path(get, path = "/endpoints/{id}/secret", operation_id = "get_endpoint_secret", params(EndpointPath),
    responses((status = 200, body = EndpointSecret), (status = 404, description = "No such endpoint")))]
async fn secret(
    State(state): State<AppState>,
    Path(EndpointPath { id }): Path<EndpointPath>,
) -> Result<Json<EndpointSecret>, ApiError> {
    let client = state.pool.get().await?;
    let endpoint = endpoints::get(&client, &id, true)
        .await?
        .ok_or_else(not_found)?;
    Ok(Json(EndpointSecret {
        id: endpoint.id,
        secret: endpoint.secret,
    }))
}

/// The body of `PATCH /endpoints/{id}` (the fields to change) and of `PUT` (the whole
/// definition: `url` and `event_types` required, absent optional fields cleared).
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct UpdateEndpoint {
    /// As on creation.
    #[serde(default)]
    #[schema(pattern = r"^[^\u0000]*$")]
    url: Option<String>,
    /// As on creation.
    #[serde(default)]
    #[schema(schema_with = event_types_or_null)]
    event_types: Option<Vec<String>>,
    /// Null clears it.
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<String>, max_length = 1024, pattern = r"^[^\u0000]*$")]
    description: Option<Option<String>>,
    /// Null removes the limit.
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<i32>, minimum = 1, maximum = 100000)]
    rate_limit_per_second: Option<Option<i32>>,
    #[serde(default)]
    enabled: Option<bool>,
}

impl UpdateEndpoint {
    fn check(self, allow_private: bool) -> Result<EndpointChanges, InvalidEndpoint> {
        let url = match &self.url {
            Some(url) => Some(endpoints::validate_url(url, allow_private)?.to_string()),
            None => None,
        };
        if let Some(types) = &self.event_types {
            endpoints::validate_event_types(types)?;
        }
        if let Some(limit) = self.rate_limit_per_second {
            endpoints::validate_rate_limit(limit)?;
        }
        if let Some(description) = &self.description {
            endpoints::validate_description(description.as_deref())?;
        }
        Ok(EndpointChanges {
            url,
            event_types: self.event_types,
            description: self.description,
            rate_limit_per_second: self.rate_limit_per_second,
            enabled: self.enabled,
        })
    }
}

/// Changes the fields given.
#[utoipa::path(patch, path = "/endpoints/{id}", operation_id = "patch_endpoint", params(EndpointPath),
    request_body = UpdateEndpoint,
    responses(
        (status = 200, body = Endpoint),
        (status = 404, description = "No such endpoint"),
        (status = 422, description = "An invalid field"),
    ))]
async fn patch(
    State(state): State<AppState>,
    Path(EndpointPath { id }): Path<EndpointPath>,
    JsonBody(body): JsonBody<UpdateEndpoint>,
) -> Result<Json<Endpoint>, ApiError> {
    let changes = body
        .check(state.config.allow_private_endpoints)
        .map_err(invalid)?;
    update(&state, &id, changes).await
}

/// PUT replaces the definition: `url` and `event_types` are required, absent optional fields
/// are cleared. The secret stays (rotate it with `rotate-secret`).
#[utoipa::path(put, path = "/endpoints/{id}", operation_id = "put_endpoint", params(EndpointPath),
    request_body(content = UpdateEndpoint, description = "The whole definition: `url` and `event_types` are required"),
    responses(
        (status = 200, body = Endpoint),
        (status = 404, description = "No such endpoint"),
        (status = 422, description = "An invalid field, or `url` or `event_types` missing (`invalid_body`)"),
    ))]
async fn put(
    State(state): State<AppState>,
    Path(EndpointPath { id }): Path<EndpointPath>,
    JsonBody(mut body): JsonBody<UpdateEndpoint>,
) -> Result<Json<Endpoint>, ApiError> {
    if body.url.is_none() || body.event_types.is_none() {
        return Err(ApiError::unprocessable(
            "invalid_body",
            "PUT needs the whole endpoint: url and event_types (use PATCH to change some fields)",
        ));
    }
    body.description = Some(body.description.flatten());
    body.rate_limit_per_second = Some(body.rate_limit_per_second.flatten());
    let changes = body
        .check(state.config.allow_private_endpoints)
        .map_err(invalid)?;
    update(&state, &id, changes).await
}

async fn update(
    state: &AppState,
    id: &str,
    changes: EndpointChanges,
) -> Result<Json<Endpoint>, ApiError> {
    let mut client = state.pool.get().await?;
    let endpoint = endpoints::update(&mut client, id, &changes)
        .await?
        .ok_or_else(not_found)?;
    if changes.enabled == Some(true) {
        state.wake.notify_waiters();
    }
    tracing::info!(endpoint_id = id, "endpoint updated");
    Ok(Json(endpoint))
}

async fn set_enabled(
    state: &AppState,
    id: &str,
    enabled: bool,
) -> Result<Json<Endpoint>, ApiError> {
    let changes = EndpointChanges {
        enabled: Some(enabled),
        ..Default::default()
    };
    update(state, id, changes).await
}

/// Stops deliveries to the endpoint: its pending deliveries are parked until it is enabled.
#[utoipa::path(post, path = "/endpoints/{id}/disable", operation_id = "disable_endpoint", params(EndpointPath),
    responses((status = 200, body = Endpoint), (status = 404, description = "No such endpoint")))]
async fn disable(
    State(state): State<AppState>,
    Path(EndpointPath { id }): Path<EndpointPath>,
) -> Result<Json<Endpoint>, ApiError> {
    set_enabled(&state, &id, false).await
}

/// Resumes deliveries to the endpoint: the parked ones are due at once.
#[utoipa::path(post, path = "/endpoints/{id}/enable", operation_id = "enable_endpoint", params(EndpointPath),
    responses((status = 200, body = Endpoint), (status = 404, description = "No such endpoint")))]
async fn enable(
    State(state): State<AppState>,
    Path(EndpointPath { id }): Path<EndpointPath>,
) -> Result<Json<Endpoint>, ApiError> {
    set_enabled(&state, &id, true).await
}

/// Deletes the endpoint with its deliveries.
#[utoipa::path(delete, path = "/endpoints/{id}", operation_id = "delete_endpoint", params(EndpointPath),
    responses((status = 204, description = "Deleted"), (status = 404, description = "No such endpoint")))]
async fn delete(
    State(state): State<AppState>,
    Path(EndpointPath { id }): Path<EndpointPath>,
) -> Result<StatusCode, ApiError> {
    let mut client = state.pool.get().await?;
    if !endpoints::delete(&mut client, &id).await? {
        return Err(not_found());
    }
    tracing::info!(endpoint_id = %id, "endpoint deleted");
    Ok(StatusCode::NO_CONTENT)
}

/// The optional body of `POST /endpoints/{id}/rotate-secret`.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct Rotate {
    /// The new `whsec_` secret; generated when absent.
    #[serde(default)]
    #[schema(pattern = r"^[^\u0000]*$")]
    secret: Option<String>,
}

/// The new secret, and until when the previous one still signs.
#[derive(Serialize, ToSchema)]
struct Rotated {
    id: String,
    secret: String,
    previous_secret_expires_at: DateTime<Utc>,
}

/// A new secret (given or generated); the previous one keeps signing for `SECRET_ROTATION_GRACE`.
#[utoipa::path(post, path = "/endpoints/{id}/rotate-secret", operation_id = "rotate_endpoint_secret",
    params(EndpointPath),
    request_body(content = Option<Rotate>, description = "Optional: an empty body generates the secret"),
    responses(
        (status = 200, body = Rotated),
        (status = 404, description = "No such endpoint"),
        (status = 422, description = "Not a valid secret (`invalid_secret`), or a body that is not an object"),
    ))]
async fn rotate_secret(
    State(state): State<AppState>,
    Path(EndpointPath { id }): Path<EndpointPath>,
    body: Bytes,
) -> Result<Json<Rotated>, ApiError> {
    let rotate: Rotate = optional_body(&body)?;
    let secret = match rotate.secret {
        Some(text) => Secret::parse(&text).map_err(|e| invalid(e.into()))?,
        None => Secret::generate(),
    };
    let client = state.pool.get().await?;
    let expires =
        endpoints::rotate_secret(&client, &id, &secret, state.config.secret_rotation_grace)
            .await?
            .ok_or_else(not_found)?;
    tracing::info!(endpoint_id = %id, previous_secret_expires_at = %expires, "endpoint secret rotated");
    Ok(Json(Rotated {
        id,
        secret: secret.as_str().to_owned(),
        previous_secret_expires_at: expires,
    }))
}

/// The optional body of `POST /endpoints/{id}/replay`.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct Replay {
    /// Only deliveries that died at or after this instant.
    #[serde(default)]
    since: Option<DateTime<Utc>>,
    /// Only deliveries that died before this instant.
    #[serde(default)]
    until: Option<DateTime<Utc>>,
}

/// How many dead deliveries were queued again.
#[derive(Serialize, ToSchema)]
struct ReplayedDeadLetters {
    endpoint_id: String,
    replayed: u64,
}

/// Queues every dead delivery of the endpoint again (those that died within `since`..`until`
/// when given), each with a fresh retry schedule.
#[utoipa::path(post, path = "/endpoints/{id}/replay", operation_id = "replay_dead_deliveries",
    params(EndpointPath),
    request_body(content = Option<Replay>, description = "Optional: an empty body replays every dead delivery"),
    responses(
        (status = 200, body = ReplayedDeadLetters),
        (status = 404, description = "No such endpoint"),
        (status = 422, description = "A body that is not an object of `since` and `until`"),
    ))]
async fn replay(
    State(state): State<AppState>,
    Path(EndpointPath { id }): Path<EndpointPath>,
    body: Bytes,
) -> Result<Json<ReplayedDeadLetters>, ApiError> {
    let replay: Replay = optional_body(&body)?;
    let client = state.pool.get().await?;
    if endpoints::get(&client, &id, false).await?.is_none() {
        return Err(not_found());
    }
    let replayed = store::replay_dead(&**client, &id, replay.since, replay.until).await?;
    state.wake.notify_waiters();
    tracing::info!(endpoint_id = %id, replayed, "dead deliveries replayed");
    Ok(Json(ReplayedDeadLetters {
        endpoint_id: id,
        replayed,
    }))
}
