//! `/circuit-breakers`: every endpoint's breaker, and a reset that lets held deliveries go.

use axum::extract::{Path, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use outbox_core::breaker::{self, BreakerState};
use outbox_core::http::ApiError;
use serde::Serialize;

use crate::delivery::store;
use crate::dispatch::BREAKER_SCOPE;
use crate::endpoints;
use crate::AppState;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/circuit-breakers", get(list))
        .route("/circuit-breakers/{endpoint_id}/reset", post(reset))
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

#[derive(Serialize)]
struct BreakerList {
    circuit_breakers: Vec<BreakerView>,
}

/// Every endpoint's breaker (never written: CLOSED with zero counts).
async fn list(State(state): State<AppState>) -> Result<Json<BreakerList>, ApiError> {
    let client = state.pool.get().await?;
    let rows = client
        .query(&format!("{BREAKER_VIEW} order by e.id"), &[])
        .await?;
    let circuit_breakers = rows.iter().map(|r| breaker_view(&state, r)).collect();
    Ok(Json(BreakerList { circuit_breakers }))
}

async fn reset(
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
