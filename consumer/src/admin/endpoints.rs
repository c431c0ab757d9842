//! `/endpoints`: create, read, change, enable/disable, rotate the secret, replay dead letters,
//! delete.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use outbox_core::http::{ApiError, JsonBody};
use outbox_core::signature::Secret;
use serde::{Deserialize, Deserializer, Serialize};

use super::optional_body;
use crate::delivery::store;
use crate::endpoints::{self, Endpoint, EndpointChanges, InvalidEndpoint, NewEndpoint};
use crate::AppState;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/endpoints", post(create).get(list))
        .route(
            "/endpoints/{id}",
            get(get_one).patch(patch).put(put).delete(delete),
        )
        .route("/endpoints/{id}/secret", get(secret))
        .route("/endpoints/{id}/rotate-secret", post(rotate_secret))
        .route("/endpoints/{id}/disable", post(disable))
        .route("/endpoints/{id}/enable", post(enable))
        .route("/endpoints/{id}/replay", post(replay))
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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateEndpoint {
    #[serde(default)]
    id: Option<String>,
    url: String,
    event_types: Vec<String>,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    secret: Option<String>,
    #[serde(default)]
    rate_limit_per_second: Option<i32>,
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

#[derive(Serialize)]
struct EndpointList {
    endpoints: Vec<Endpoint>,
}

async fn list(State(state): State<AppState>) -> Result<Json<EndpointList>, ApiError> {
    let client = state.pool.get().await?;
    let endpoints = endpoints::list(&client).await?;
    Ok(Json(EndpointList { endpoints }))
}

async fn get_one(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Endpoint>, ApiError> {
    let client = state.pool.get().await?;
    endpoints::get(&client, &id, false)
        .await?
        .map(Json)
        .ok_or_else(not_found)
}

#[derive(Serialize)]
struct EndpointSecret {
    id: String,
    secret: Option<String>,
}

async fn secret(
    State(state): State<AppState>,
    Path(id): Path<String>,
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

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateEndpoint {
    #[serde(default)]
    url: Option<String>,
    #[serde(default)]
    event_types: Option<Vec<String>>,
    #[serde(default, deserialize_with = "nullable")]
    description: Option<Option<String>>,
    #[serde(default, deserialize_with = "nullable")]
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

async fn patch(
    State(state): State<AppState>,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<UpdateEndpoint>,
) -> Result<Json<Endpoint>, ApiError> {
    let changes = body
        .check(state.config.allow_private_endpoints)
        .map_err(invalid)?;
    update(&state, &id, changes).await
}

/// PUT replaces the definition: `url` and `event_types` are required, absent optional fields
/// are cleared. The secret stays (rotate it with `rotate-secret`).
async fn put(
    State(state): State<AppState>,
    Path(id): Path<String>,
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

async fn disable(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Endpoint>, ApiError> {
    set_enabled(&state, &id, false).await
}

async fn enable(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Endpoint>, ApiError> {
    set_enabled(&state, &id, true).await
}

async fn delete(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let mut client = state.pool.get().await?;
    if !endpoints::delete(&mut client, &id).await? {
        return Err(not_found());
    }
    tracing::info!(endpoint_id = %id, "endpoint deleted");
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Rotate {
    #[serde(default)]
    secret: Option<String>,
}

#[derive(Serialize)]
struct Rotated {
    id: String,
    secret: String,
    previous_secret_expires_at: DateTime<Utc>,
}

/// A new secret (given or generated); the previous one keeps signing for `SECRET_ROTATION_GRACE`.
async fn rotate_secret(
    State(state): State<AppState>,
    Path(id): Path<String>,
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

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Replay {
    #[serde(default)]
    since: Option<DateTime<Utc>>,
    #[serde(default)]
    until: Option<DateTime<Utc>>,
}

#[derive(Serialize)]
struct Replayed {
    endpoint_id: String,
    replayed: u64,
}

/// Queues every dead delivery of the endpoint again (those that died within `since`..`until`
/// when given), each with a fresh retry schedule.
async fn replay(
    State(state): State<AppState>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<Replayed>, ApiError> {
    let replay: Replay = optional_body(&body)?;
    let client = state.pool.get().await?;
    if endpoints::get(&client, &id, false).await?.is_none() {
        return Err(not_found());
    }
    let replayed = store::replay_dead(&**client, &id, replay.since, replay.until).await?;
    state.wake.notify_waiters();
    tracing::info!(endpoint_id = %id, replayed, "dead deliveries replayed");
    Ok(Json(Replayed {
        endpoint_id: id,
        replayed,
    }))
}
