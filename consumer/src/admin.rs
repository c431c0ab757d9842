//! The admin API: endpoints, deliveries (dead letters, retry, replay), circuit breakers and poison
//! records. Every error answers `{"error", "code"}` with a 4xx for bad input; with `ADMIN_TOKEN`
//! set, every route but `/health`, `/ready` and `/metrics` needs it as a bearer token.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::middleware;
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use outbox_core::admin_auth::{require_admin, AdminAuth, RouteSpec};
use outbox_core::breaker::{self, BreakerState};
use outbox_core::http::{operational_routes, ApiError, JsonBody, QueryParams};
use outbox_core::signature::Secret;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{json, Value};

use crate::dispatch::BREAKER_SCOPE;
use crate::endpoints::{self, Endpoint, InvalidEndpoint};
use crate::AppState;

/// The routes that need no `ADMIN_TOKEN`: only the operational ones (`/health`, `/ready`,
/// `/metrics`); every admin route needs it when it is set.
pub const OPEN_ROUTES: &[RouteSpec] = &[];

/// The admin routes plus the operational ones.
pub fn router(state: AppState) -> Router {
    let auth = AdminAuth::new(state.config.admin_token.as_deref(), OPEN_ROUTES);
    Router::new()
        .route("/endpoints", post(create_endpoint).get(list_endpoints))
        .route(
            "/endpoints/{id}",
            get(get_endpoint)
                .patch(patch_endpoint)
                .put(put_endpoint)
                .delete(delete_endpoint),
        )
        .route("/endpoints/{id}/secret", get(get_secret))
        .route("/endpoints/{id}/rotate-secret", post(rotate_secret))
        .route("/endpoints/{id}/disable", post(disable_endpoint))
        .route("/endpoints/{id}/enable", post(enable_endpoint))
        .route("/endpoints/{id}/replay", post(replay_endpoint))
        .route("/deliveries", get(list_deliveries))
        .route("/deliveries/{id}", get(get_delivery))
        .route("/deliveries/{id}/retry", post(retry_delivery))
        .route("/circuit-breakers", get(list_breakers))
        .route("/circuit-breakers/{endpoint_id}/reset", post(reset_breaker))
        .route("/events/poison", get(list_poison))
        .route("/events/poison/{id}/replay", post(replay_poison))
        .merge(operational_routes::<AppState>())
        .route_layer(middleware::from_fn_with_state(auth, require_admin))
        .with_state(state)
}

fn invalid(error: InvalidEndpoint) -> ApiError {
    ApiError::unprocessable(error.code(), error.to_string())
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

async fn create_endpoint(
    State(state): State<AppState>,
    JsonBody(body): JsonBody<CreateEndpoint>,
) -> Result<(StatusCode, Json<Endpoint>), ApiError> {
    let id = match body.id {
        Some(id) => {
            endpoints::validate_id(&id).map_err(invalid)?;
            id
        }
        None => endpoints::new_endpoint_id(),
    };
    let url = endpoints::validate_url(&body.url, state.config.allow_private_endpoints)
        .map_err(invalid)?;
    endpoints::validate_event_types(&body.event_types).map_err(invalid)?;
    endpoints::validate_rate_limit(body.rate_limit_per_second).map_err(invalid)?;
    endpoints::validate_description(body.description.as_deref()).map_err(invalid)?;
    let secret = match body.secret {
        Some(text) => Secret::parse(&text).map_err(|e| invalid(e.into()))?,
        None => Secret::generate(),
    };
    let client = state.pool.get().await?;
    let sql = format!(
        "insert into endpoints (id, url, description, event_types, secret, rate_limit_per_second, enabled)
         values ($1, $2, $3, $4, $5, $6, $7)
         on conflict (id) do nothing
         returning {}",
        endpoints::COLUMNS
    );
    let row = client
        .query_opt(
            &sql,
            &[
                &id,
                &url.as_str(),
                &body.description,
                &body.event_types,
                &secret.as_str(),
                &body.rate_limit_per_second,
                &body.enabled.unwrap_or(true),
            ],
        )
        .await?
        .ok_or_else(|| {
            ApiError::conflict("endpoint_exists", format!("endpoint '{id}' already exists"))
        })?;
    let endpoint = Endpoint::from_row(&row, true);
    tracing::info!(endpoint_id = %endpoint.id, url = %endpoint.url, "endpoint created");
    Ok((StatusCode::CREATED, Json(endpoint)))
}

async fn list_endpoints(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let client = state.pool.get().await?;
    let sql = format!(
        "select {} from endpoints order by created_at, id",
        endpoints::COLUMNS
    );
    let endpoints: Vec<Endpoint> = client
        .query(&sql, &[])
        .await?
        .iter()
        .map(|row| Endpoint::from_row(row, false))
        .collect();
    Ok(Json(json!({ "endpoints": endpoints })))
}

async fn get_endpoint(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Endpoint>, ApiError> {
    let client = state.pool.get().await?;
    endpoints::get(&client, &id, false)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::not_found("endpoint"))
}

async fn get_secret(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let client = state.pool.get().await?;
    let endpoint = endpoints::get(&client, &id, true)
        .await?
        .ok_or_else(|| ApiError::not_found("endpoint"))?;
    Ok(Json(json!({"id": endpoint.id, "secret": endpoint.secret})))
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

async fn patch_endpoint(
    State(state): State<AppState>,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<UpdateEndpoint>,
) -> Result<Json<Endpoint>, ApiError> {
    update_endpoint(&state, &id, body).await
}

/// PUT replaces the definition: `url` and `event_types` are required, absent optional fields
/// are cleared. The secret stays (rotate it with `rotate-secret`).
async fn put_endpoint(
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
    update_endpoint(&state, &id, body).await
}

async fn update_endpoint(
    state: &AppState,
    id: &str,
    body: UpdateEndpoint,
) -> Result<Json<Endpoint>, ApiError> {
    let url = match &body.url {
        Some(url) => Some(
            endpoints::validate_url(url, state.config.allow_private_endpoints)
                .map_err(invalid)?
                .to_string(),
        ),
        None => None,
    };
    if let Some(types) = &body.event_types {
        endpoints::validate_event_types(types).map_err(invalid)?;
    }
    if let Some(limit) = body.rate_limit_per_second {
        endpoints::validate_rate_limit(limit).map_err(invalid)?;
    }
    if let Some(description) = &body.description {
        endpoints::validate_description(description.as_deref()).map_err(invalid)?;
    }
    let mut client = state.pool.get().await?;
    let tx = client.transaction().await?;
    let sql = format!(
        "update endpoints set
            url = coalesce($2, url),
            event_types = coalesce($3, event_types),
            description = case when $4 then $5 else description end,
            rate_limit_per_second = case when $6 then $7 else rate_limit_per_second end,
            enabled = coalesce($8, enabled),
            updated_at = now()
          where id = $1
         returning {}",
        endpoints::COLUMNS
    );
    let row = tx
        .query_opt(
            &sql,
            &[
                &id,
                &url,
                &body.event_types,
                &body.description.is_some(),
                &body.description.clone().flatten(),
                &body.rate_limit_per_second.is_some(),
                &body.rate_limit_per_second.flatten(),
                &body.enabled,
            ],
        )
        .await?
        .ok_or_else(|| ApiError::not_found("endpoint"))?;
    if let Some(enabled) = body.enabled {
        park_or_release(&tx, id, enabled).await?;
    }
    tx.commit().await?;
    if body.enabled == Some(true) {
        state.wake.notify_waiters();
    }
    tracing::info!(endpoint_id = id, "endpoint updated");
    Ok(Json(Endpoint::from_row(&row, false)))
}

/// A disabled endpoint's pending deliveries wait indefinitely (so the dispatchers' due-index scan
/// never walks over them); enabling makes them due at once.
async fn park_or_release(
    tx: &deadpool_postgres::Transaction<'_>,
    id: &str,
    enabled: bool,
) -> Result<(), tokio_postgres::Error> {
    let sql = if enabled {
        "update deliveries set next_attempt_at = now(), updated_at = now()
          where endpoint_id = $1 and state = 'pending' and next_attempt_at = 'infinity'"
    } else {
        "update deliveries set next_attempt_at = 'infinity', updated_at = now()
          where endpoint_id = $1 and state = 'pending'"
    };
    tx.execute(sql, &[&id]).await?;
    Ok(())
}

async fn set_enabled(
    state: &AppState,
    id: &str,
    enabled: bool,
) -> Result<Json<Endpoint>, ApiError> {
    update_endpoint(
        state,
        id,
        UpdateEndpoint {
            enabled: Some(enabled),
            ..Default::default()
        },
    )
    .await
}

async fn disable_endpoint(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Endpoint>, ApiError> {
    set_enabled(&state, &id, false).await
}

async fn enable_endpoint(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Endpoint>, ApiError> {
    set_enabled(&state, &id, true).await
}

async fn delete_endpoint(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let mut client = state.pool.get().await?;
    let tx = client.transaction().await?;
    // Deliveries go with the endpoint (on delete cascade); their attempts have no foreign key.
    tx.execute(
        "delete from delivery_attempts a using deliveries d
          where d.id = a.delivery_id and d.endpoint_id = $1",
        &[&id],
    )
    .await?;
    let deleted = tx
        .execute("delete from endpoints where id = $1", &[&id])
        .await?;
    if deleted == 0 {
        return Err(ApiError::not_found("endpoint"));
    }
    tx.execute(
        "delete from circuit_breakers where scope = $1 and name = $2",
        &[&BREAKER_SCOPE, &id],
    )
    .await?;
    tx.commit().await?;
    tracing::info!(endpoint_id = %id, "endpoint deleted");
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Rotate {
    #[serde(default)]
    secret: Option<String>,
}

/// A new secret (given or generated); the previous one keeps signing for `SECRET_ROTATION_GRACE`.
async fn rotate_secret(
    State(state): State<AppState>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let rotate: Rotate = if body.iter().all(u8::is_ascii_whitespace) {
        Rotate::default()
    } else {
        outbox_core::http::parse_object(&body)?
    };
    let secret = match rotate.secret {
        Some(text) => Secret::parse(&text).map_err(|e| invalid(e.into()))?,
        None => Secret::generate(),
    };
    let client = state.pool.get().await?;
    let row = client
        .query_opt(
            "update endpoints set previous_secret = secret,
                    previous_secret_expires_at = now() + make_interval(secs => $3),
                    secret = $2, updated_at = now()
              where id = $1
             returning previous_secret_expires_at",
            &[
                &id,
                &secret.as_str(),
                &state.config.secret_rotation_grace.as_secs_f64(),
            ],
        )
        .await?
        .ok_or_else(|| ApiError::not_found("endpoint"))?;
    let expires: DateTime<Utc> = row.get(0);
    tracing::info!(endpoint_id = %id, previous_secret_expires_at = %expires, "endpoint secret rotated");
    Ok(Json(json!({
        "id": id,
        "secret": secret.as_str(),
        "previous_secret_expires_at": expires,
    })))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Replay {
    #[serde(default)]
    since: Option<DateTime<Utc>>,
    #[serde(default)]
    until: Option<DateTime<Utc>>,
}

/// Queues every dead delivery of the endpoint again (those that died within `since`..`until`
/// when given), each with a fresh retry schedule.
async fn replay_endpoint(
    State(state): State<AppState>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let replay: Replay = if body.iter().all(u8::is_ascii_whitespace) {
        Replay::default()
    } else {
        outbox_core::http::parse_object(&body)?
    };
    let client = state.pool.get().await?;
    if endpoints::get(&client, &id, false).await?.is_none() {
        return Err(ApiError::not_found("endpoint"));
    }
    let replayed = client
        .execute(
            "update deliveries set state = 'pending', attempts = 0, next_attempt_at = now(),
                    leased_until = null, updated_at = now()
              where endpoint_id = $1 and state = 'dead'
                and ($2::timestamptz is null or updated_at >= $2)
                and ($3::timestamptz is null or updated_at < $3)",
            &[&id, &replay.since, &replay.until],
        )
        .await?;
    state.wake.notify_waiters();
    tracing::info!(endpoint_id = %id, replayed, "dead deliveries replayed");
    Ok(Json(json!({"endpoint_id": id, "replayed": replayed})))
}

#[derive(Debug, Serialize)]
struct Delivery {
    id: i64,
    event_id: String,
    event_type: String,
    endpoint_id: String,
    state: String,
    attempts: i32,
    next_attempt_at: Option<DateTime<Utc>>,
    leased_until: Option<DateTime<Utc>>,
    last_status: Option<i32>,
    last_error: Option<String>,
    correlation_id: Option<String>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    delivered_at: Option<DateTime<Utc>>,
}

const DELIVERY_COLUMNS: &str = "d.id, d.event_id, i.event_type, d.endpoint_id, d.state, d.attempts,
    case when d.state = 'pending' and d.next_attempt_at <> 'infinity' then d.next_attempt_at end as next_attempt_at,
    d.leased_until, d.last_status, d.last_error, i.correlation_id, d.created_at, d.updated_at, d.delivered_at";

impl Delivery {
    fn from_row(row: &tokio_postgres::Row) -> Delivery {
        Delivery {
            id: row.get("id"),
            event_id: row.get("event_id"),
            event_type: row.get("event_type"),
            endpoint_id: row.get("endpoint_id"),
            state: row.get("state"),
            attempts: row.get("attempts"),
            next_attempt_at: row.get("next_attempt_at"),
            leased_until: row.get("leased_until"),
            last_status: row.get("last_status"),
            last_error: row.get("last_error"),
            correlation_id: row.get("correlation_id"),
            created_at: row.get("created_at"),
            updated_at: row.get("updated_at"),
            delivered_at: row.get("delivered_at"),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeliveryQuery {
    #[serde(default)]
    state: Option<String>,
    #[serde(default)]
    endpoint_id: Option<String>,
    #[serde(default)]
    event_id: Option<String>,
    /// Page after this delivery id (the previous page's `next_after`).
    #[serde(default)]
    after: Option<i64>,
    #[serde(default)]
    limit: Option<i64>,
}

fn page_limit(limit: Option<i64>) -> Result<i64, ApiError> {
    match limit {
        None => Ok(100),
        Some(n) if (1..=1000).contains(&n) => Ok(n),
        Some(_) => Err(ApiError::bad_request(
            "invalid_limit",
            "limit is between 1 and 1000",
        )),
    }
}

/// Deliveries in id order, filtered by state (`pending`, `succeeded`, `dead`), endpoint and
/// event; `next_after` names the next page.
async fn list_deliveries(
    State(state): State<AppState>,
    QueryParams(q): QueryParams<DeliveryQuery>,
) -> Result<Json<Value>, ApiError> {
    if let Some(s) = &q.state {
        if !matches!(s.as_str(), "pending" | "succeeded" | "dead") {
            return Err(ApiError::bad_request(
                "invalid_state",
                "state is one of pending, succeeded, dead",
            ));
        }
    }
    let limit = page_limit(q.limit)?;
    let client = state.pool.get().await?;
    let sql = format!(
        "select {DELIVERY_COLUMNS} from deliveries d join inbox i on i.event_id = d.event_id
          where ($1::text is null or d.state = $1) and ($2::text is null or d.endpoint_id = $2)
            and ($3::text is null or d.event_id = $3) and d.id > $4
          order by d.id limit $5"
    );
    let rows = client
        .query(
            &sql,
            &[
                &q.state,
                &q.endpoint_id,
                &q.event_id,
                &q.after.unwrap_or(0),
                &limit,
            ],
        )
        .await?;
    let deliveries: Vec<Delivery> = rows.iter().map(Delivery::from_row).collect();
    let next_after = (deliveries.len() as i64 == limit)
        .then(|| deliveries.last().map(|d| d.id))
        .flatten();
    Ok(Json(
        json!({"deliveries": deliveries, "next_after": next_after}),
    ))
}

fn parse_delivery_id(id: &str) -> Result<i64, ApiError> {
    id.parse()
        .map_err(|_| ApiError::bad_request("invalid_id", "delivery ids are integers"))
}

/// One delivery with its attempts, oldest first.
async fn get_delivery(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = parse_delivery_id(&id)?;
    let client = state.pool.get().await?;
    let sql = format!(
        "select {DELIVERY_COLUMNS} from deliveries d join inbox i on i.event_id = d.event_id
          where d.id = $1"
    );
    let row = client
        .query_opt(&sql, &[&id])
        .await?
        .ok_or_else(|| ApiError::not_found("delivery"))?;
    let attempts: Vec<Value> = client
        .query(
            "select attempt, status_code, latency_ms, error, response_body, attempted_at
               from delivery_attempts where delivery_id = $1 order by attempted_at, id",
            &[&id],
        )
        .await?
        .iter()
        .map(|r| {
            json!({
                "attempt": r.get::<_, i32>(0),
                "status_code": r.get::<_, Option<i32>>(1),
                "latency_ms": r.get::<_, i32>(2),
                "error": r.get::<_, Option<String>>(3),
                "response_body": r.get::<_, Option<String>>(4),
                "attempted_at": r.get::<_, DateTime<Utc>>(5),
            })
        })
        .collect();
    let mut body = serde_json::to_value(Delivery::from_row(&row))
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
    body["attempts"] = Value::Array(attempts);
    Ok(Json(body))
}

/// Queues a dead delivery again with a fresh retry schedule.
async fn retry_delivery(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = parse_delivery_id(&id)?;
    let client = state.pool.get().await?;
    let row = client
        .query_opt(
            "update deliveries set state = 'pending', attempts = 0, next_attempt_at = now(),
                    leased_until = null, updated_at = now()
              where id = $1 and state = 'dead'
             returning id",
            &[&id],
        )
        .await?;
    if row.is_none() {
        let exists = client
            .query_opt("select state from deliveries where id = $1", &[&id])
            .await?;
        return Err(match exists {
            None => ApiError::not_found("delivery"),
            Some(r) => ApiError::conflict(
                "not_dead",
                format!(
                    "only dead deliveries can be retried; this one is {}",
                    r.get::<_, String>(0)
                ),
            ),
        });
    }
    state.wake.notify_waiters();
    tracing::info!(delivery_id = id, "dead delivery queued again");
    Ok(Json(json!({"id": id, "state": "pending"})))
}

#[derive(Debug, Serialize)]
struct BreakerView {
    endpoint_id: String,
    state: BreakerState,
    failure_count: i32,
    success_count: i32,
    opened_at: Option<DateTime<Utc>>,
    /// While OPEN: when a probe may go through.
    half_open_at: Option<DateTime<Utc>>,
    probe_until: Option<DateTime<Utc>>,
    updated_at: Option<DateTime<Utc>>,
}

const BREAKER_VIEW: &str = "
    select e.id, coalesce(b.state, 'CLOSED'), coalesce(b.failure_count, 0),
           coalesce(b.success_count, 0), b.opened_at, b.probe_until, b.updated_at
      from endpoints e
      left join circuit_breakers b on b.scope = 'endpoint' and b.name = e.id";

fn breaker_view(state: &AppState, row: &tokio_postgres::Row) -> BreakerView {
    let text: String = row.get(1);
    let breaker_state = BreakerState::parse(&text).unwrap_or(BreakerState::Closed);
    let opened_at: Option<DateTime<Utc>> = row.get(4);
    let open_for = chrono::Duration::from_std(state.config.breaker.breaker_open_for)
        .unwrap_or(chrono::Duration::MAX);
    BreakerView {
        endpoint_id: row.get(0),
        state: breaker_state,
        failure_count: row.get(2),
        success_count: row.get(3),
        opened_at,
        half_open_at: (breaker_state == BreakerState::Open)
            .then(|| opened_at.map(|t| t + open_for))
            .flatten(),
        probe_until: row.get(5),
        updated_at: row.get(6),
    }
}

/// Every endpoint's breaker (never written: CLOSED with zero counts).
async fn list_breakers(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let client = state.pool.get().await?;
    let rows = client
        .query(&format!("{BREAKER_VIEW} order by e.id"), &[])
        .await?;
    let breakers: Vec<BreakerView> = rows.iter().map(|r| breaker_view(&state, r)).collect();
    Ok(Json(json!({ "circuit_breakers": breakers })))
}

async fn reset_breaker(
    State(state): State<AppState>,
    Path(endpoint_id): Path<String>,
) -> Result<Json<BreakerView>, ApiError> {
    let client = state.pool.get().await?;
    if endpoints::get(&client, &endpoint_id, false)
        .await?
        .is_none()
    {
        return Err(ApiError::not_found("endpoint"));
    }
    breaker::store::reset(&client, BREAKER_SCOPE, &endpoint_id).await?;
    // Deliveries held by the open breaker may go now.
    client
        .execute(
            "update deliveries set next_attempt_at = now()
              where endpoint_id = $1 and state = 'pending' and leased_until is null
                and attempts = 0 and next_attempt_at > now() and next_attempt_at <> 'infinity'",
            &[&endpoint_id],
        )
        .await?;
    state
        .metrics
        .set_breaker(&endpoint_id, BreakerState::Closed);
    state.wake.notify_waiters();
    tracing::info!(endpoint_id = %endpoint_id, "circuit breaker reset");
    let row = client
        .query_one(&format!("{BREAKER_VIEW} where e.id = $1"), &[&endpoint_id])
        .await?;
    Ok(Json(breaker_view(&state, &row)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PageQuery {
    #[serde(default)]
    after: Option<i64>,
    #[serde(default)]
    limit: Option<i64>,
}

/// Poison records (malformed Kafka records that were skipped), in id order.
async fn list_poison(
    State(state): State<AppState>,
    QueryParams(q): QueryParams<PageQuery>,
) -> Result<Json<Value>, ApiError> {
    let limit = page_limit(q.limit)?;
    let client = state.pool.get().await?;
    let rows = client
        .query(
            "select id, topic, kafka_partition, kafka_offset, error, payload, received_at
               from poison_records where id > $1 order by id limit $2",
            &[&q.after.unwrap_or(0), &limit],
        )
        .await?;
    let records: Vec<Value> = rows
        .iter()
        .map(|r| {
            let payload: Option<Vec<u8>> = r.get(5);
            json!({
                "id": r.get::<_, i64>(0),
                "topic": r.get::<_, String>(1),
                "partition": r.get::<_, i32>(2),
                "offset": r.get::<_, i64>(3),
                "error": r.get::<_, String>(4),
                "payload": payload.map(|p| String::from_utf8_lossy(&p).into_owned()),
                "received_at": r.get::<_, DateTime<Utc>>(6),
            })
        })
        .collect();
    let next_after = (records.len() as i64 == limit)
        .then(|| records.last().and_then(|r| r["id"].as_i64()))
        .flatten();
    Ok(Json(
        json!({"poison_records": records, "next_after": next_after}),
    ))
}

/// Reads a poison record again (once its cause is fixed): 200 with the event it now is and the
/// deliveries planned for it; 422 when it still is not an event (with why); 404 when unknown.
async fn replay_poison(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id: i64 = id
        .parse()
        .ok()
        .filter(|id| *id > 0)
        .ok_or_else(|| ApiError::not_found("poison record"))?;
    let outcome = crate::ingest::replay_poison(&state.pool, id)
        .await
        .map_err(|error| match error {
            crate::ingest::RecordError::Pool(e) => ApiError::from(e),
            crate::ingest::RecordError::Db(e) => ApiError::from(e),
        })?;
    match outcome {
        crate::ingest::PoisonReplay::NotFound => Err(ApiError::not_found("poison record")),
        crate::ingest::PoisonReplay::StillPoison(error) => Err(ApiError::unprocessable(
            "still_poison",
            format!("the record still cannot be read as an event: {error}"),
        )),
        crate::ingest::PoisonReplay::Recorded {
            event_id,
            deliveries,
            duplicate,
        } => {
            state.wake.notify_waiters();
            Ok(Json(json!({
                "id": id,
                "event_id": event_id,
                "deliveries": deliveries,
                "duplicate": duplicate,
            })))
        }
    }
}
