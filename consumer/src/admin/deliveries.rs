//! `/deliveries`: list and read deliveries with their attempts, retry a dead one.

use axum::extract::{Path, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use outbox_core::http::{ApiError, QueryParams};
use serde::{Deserialize, Serialize};

use outbox_core::http::next_cursor;

use super::PAGE;
use crate::delivery::store::{self, DeliveryDetail, DeliveryView, Filter, Retry};
use crate::delivery::DeliveryState;
use crate::AppState;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/deliveries", get(list))
        .route("/deliveries/{id}", get(get_one))
        .route("/deliveries/{id}/retry", post(retry))
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

#[derive(Serialize)]
struct DeliveryPage {
    deliveries: Vec<DeliveryView>,
    next_after: Option<i64>,
}

/// Deliveries in id order, filtered by state (`pending`, `succeeded`, `dead`), endpoint and
/// event; `next_after` names the next page.
async fn list(
    State(state): State<AppState>,
    QueryParams(q): QueryParams<DeliveryQuery>,
) -> Result<Json<DeliveryPage>, ApiError> {
    let state_filter = match q.state.as_deref() {
        None => None,
        Some(text) => Some(DeliveryState::parse(text).ok_or_else(|| {
            ApiError::bad_request("invalid_state", "state is one of pending, succeeded, dead")
        })?),
    };
    let limit = PAGE.of(q.limit)?;
    let filter = Filter {
        state: state_filter,
        endpoint_id: q.endpoint_id,
        event_id: q.event_id,
    };
    let client = state.pool.get().await?;
    let deliveries = store::list(&**client, &filter, q.after.unwrap_or(0), limit).await?;
    let next_after = next_cursor(&deliveries, limit, |d| d.fields.id);
    Ok(Json(DeliveryPage {
        deliveries,
        next_after,
    }))
}

fn parse_id(id: &str) -> Result<i64, ApiError> {
    id.parse()
        .map_err(|_| ApiError::bad_request("invalid_id", "delivery ids are integers"))
}

/// One delivery with its attempts, oldest first.
async fn get_one(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<DeliveryDetail>, ApiError> {
    let id = parse_id(&id)?;
    let client = state.pool.get().await?;
    store::get(&**client, id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::not_found("delivery"))
}

#[derive(Serialize)]
struct Queued {
    id: i64,
    state: DeliveryState,
}

/// Queues a dead delivery again with a fresh retry schedule.
async fn retry(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Queued>, ApiError> {
    let id = parse_id(&id)?;
    let client = state.pool.get().await?;
    match store::retry_dead(&**client, id).await? {
        Retry::Queued => {}
        Retry::NotFound => return Err(ApiError::not_found("delivery")),
        Retry::NotDead(now) => {
            return Err(ApiError::conflict(
                "not_dead",
                format!(
                    "only dead deliveries can be retried; this one is {}",
                    now.as_str()
                ),
            ))
        }
    }
    state.wake.notify_waiters();
    tracing::info!(delivery_id = id, "dead delivery queued again");
    Ok(Json(Queued {
        id,
        state: DeliveryState::Pending,
    }))
}
