//! `/deliveries`: list and read deliveries with their attempts, retry a dead one.

use axum::extract::{Path, State};
use axum::Json;
use outbox_core::http::{ApiError, QueryParams};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};

use outbox_core::http::next_cursor;

use super::PAGE;
use crate::delivery::store::{self, DeliveryDetail, DeliveryView, Filter, Retry};
use crate::delivery::DeliveryState;
use crate::AppState;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list))
        .routes(routes!(get_one))
        .routes(routes!(retry))
}

/// Query of `GET /deliveries`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct DeliveryQuery {
    /// Only deliveries in this state.
    #[serde(default)]
    #[param(value_type = Option<DeliveryState>, nullable = false)]
    state: Option<String>,
    /// Only deliveries to this endpoint.
    #[serde(default)]
    #[param(pattern = r"^[^\u0000]*$", nullable = false)]
    endpoint_id: Option<String>,
    /// Only deliveries of this event.
    #[serde(default)]
    #[param(pattern = r"^[^\u0000]*$", nullable = false)]
    event_id: Option<String>,
    /// Page after this delivery id (the previous page's `next_after`).
    #[serde(default)]
    #[param(nullable = false)]
    after: Option<i64>,
    /// At most this many (1–1000, default 100).
    #[serde(default)]
    #[param(minimum = 1, maximum = 1000, nullable = false)]
    limit: Option<i64>,
}

/// A page of deliveries, in id order.
#[derive(Serialize, ToSchema)]
struct DeliveryPage {
    deliveries: Vec<DeliveryView>,
    /// The `after` of the next page; null on the last page.
    next_after: Option<i64>,
}

/// Deliveries in id order, filtered by state (`pending`, `succeeded`, `dead`), endpoint and
/// event; `next_after` names the next page.
#[utoipa::path(get, path = "/deliveries", operation_id = "list_deliveries", params(DeliveryQuery),
    responses((status = 200, body = DeliveryPage)))]
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
#[utoipa::path(get, path = "/deliveries/{id}", operation_id = "get_delivery",
    params(("id" = i64, Path, description = "Delivery id")),
    responses((status = 200, body = DeliveryDetail), (status = 404, description = "No such delivery")))]
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

/// A delivery queued again: pending, due at once.
#[derive(Serialize, ToSchema)]
struct Queued {
    id: i64,
    state: DeliveryState,
}

/// Queues a dead delivery again with a fresh retry schedule.
#[utoipa::path(post, path = "/deliveries/{id}/retry", operation_id = "retry_delivery",
    params(("id" = i64, Path, description = "Delivery id")),
    responses(
        (status = 200, body = Queued),
        (status = 404, description = "No such delivery"),
        (status = 409, description = "The delivery is not dead (`not_dead`)"),
    ))]
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
