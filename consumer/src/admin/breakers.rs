//! `/circuit-breakers`: every endpoint's breaker, and a reset that lets held deliveries go.

use axum::extract::{Path, State};
use axum::Json;
use outbox_core::breaker::{self, BreakerState, BreakerView};
use outbox_core::http::ApiError;
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::delivery::store;
use crate::dispatch::BREAKER_SCOPE;
use crate::endpoints;
use crate::AppState;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list))
        .routes(routes!(reset))
}

/// An endpoint's breaker: the shared breaker view beside the endpoint's id.
#[derive(Debug, Serialize, ToSchema)]
struct EndpointBreaker {
    endpoint_id: String,
    #[serde(flatten)]
    breaker: BreakerView,
}

/// Every endpoint with its stored breaker, if it was ever written.
const BREAKER_VIEW: &str = "
    select e.id as endpoint_id, b.name, b.state, b.failure_count, b.success_count, b.opened_at,
           b.probe_until, b.updated_at
      from endpoints e
      left join circuit_breakers b on b.scope = 'endpoint' and b.name = e.id";

fn breaker_view(state: &AppState, row: &tokio_postgres::Row) -> EndpointBreaker {
    let stored = row
        .get::<_, Option<String>>("name")
        .map(|_| breaker::store::from_row(row));
    EndpointBreaker {
        endpoint_id: row.get("endpoint_id"),
        breaker: BreakerView::of_stored(stored.as_ref(), state.config.breaker.breaker_open_for),
    }
}

/// Every endpoint's breaker, in endpoint id order.
#[derive(Serialize, ToSchema)]
struct BreakerList {
    circuit_breakers: Vec<EndpointBreaker>,
}

/// Every endpoint's breaker (never written: CLOSED with zero counts).
#[utoipa::path(get, path = "/circuit-breakers", operation_id = "list_breakers",
    responses((status = 200, body = BreakerList)))]
async fn list(State(state): State<AppState>) -> Result<Json<BreakerList>, ApiError> {
    let client = state.pool.get().await?;
    let rows = client
        .query(&format!("{BREAKER_VIEW} order by e.id"), &[])
        .await?;
    let circuit_breakers = rows.iter().map(|r| breaker_view(&state, r)).collect();
    Ok(Json(BreakerList { circuit_breakers }))
}

/// Closes the endpoint's breaker with zero counts and lets the deliveries it held go at once.
#[utoipa::path(post, path = "/circuit-breakers/{endpoint_id}/reset", operation_id = "reset_breaker",
    params(("endpoint_id" = String, Path, min_length = 1, description = "Endpoint id")),
    responses(
        (status = 200, description = "The endpoint's breaker after the reset", body = EndpointBreaker),
        (status = 404, description = "No such endpoint"),
    ))]
async fn reset(
    State(state): State<AppState>,
    Path(endpoint_id): Path<String>,
) -> Result<Json<EndpointBreaker>, ApiError> {
    let client = state.pool.get().await?;
    if endpoints::get(&client, &endpoint_id, false)
        .await?
        .is_none()
    {
        return Err(ApiError::not_found("endpoint"));
    }
    breaker::store::reset(&client, BREAKER_SCOPE, &endpoint_id).await?;
    // The deliveries the open breaker held may go now.
    store::release_held_by_breaker(&**client, &endpoint_id).await?;
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
