//! `/events/poison`: the Kafka records that were not events, and their replay once the cause is
//! fixed.

use axum::extract::{Path, State};
use axum::Json;
use outbox_core::http::{ApiError, QueryParams};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};

use outbox_core::http::next_cursor;

use super::PAGE;
use crate::ingest::{self, PoisonRecord, PoisonReplay};
use crate::AppState;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list))
        .routes(routes!(replay))
}

/// Query of `GET /events/poison`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct PageQuery {
    /// Only records after this id (the previous page's `next_after`).
    #[serde(default)]
    #[param(nullable = false)]
    after: Option<i64>,
    /// At most this many (1–1000, default 100).
    #[serde(default)]
    #[param(minimum = 1, maximum = 1000, nullable = false)]
    limit: Option<i64>,
}

/// A page of poison records, in id order.
#[derive(Serialize, ToSchema)]
struct PoisonPage {
    poison_records: Vec<PoisonRecord>,
    /// The `after` of the next page; null on the last page.
    next_after: Option<i64>,
}

/// Poison records (malformed Kafka records that were skipped), in id order.
#[utoipa::path(get, path = "/events/poison", operation_id = "list_poison_records", params(PageQuery),
    responses((status = 200, body = PoisonPage)))]
async fn list(
    State(state): State<AppState>,
    QueryParams(q): QueryParams<PageQuery>,
) -> Result<Json<PoisonPage>, ApiError> {
    let limit = PAGE.of(q.limit)?;
    let client = state.pool.get().await?;
    let poison_records = ingest::list_poison(&**client, q.after.unwrap_or(0), limit).await?;
    let next_after = next_cursor(&poison_records, limit, |r| r.id);
    Ok(Json(PoisonPage {
        poison_records,
        next_after,
    }))
}

/// A poison record read again: the event it now is and the deliveries planned for it.
#[derive(Serialize, ToSchema)]
struct ReplayedPoison {
    id: i64,
    event_id: String,
    deliveries: u64,
    duplicate: bool,
}

/// Reads a poison record again (once its cause is fixed): 200 with the event it now is and the
/// deliveries planned for it; 422 when it still is not an event (with why); 404 when unknown.
#[utoipa::path(post, path = "/events/poison/{id}/replay", operation_id = "replay_poison_record",
    params(("id" = i64, Path, description = "Poison record id")),
    responses(
        (status = 200, description = "The record is an event now: recorded (or a duplicate of one recorded)", body = ReplayedPoison),
        (status = 404, description = "No such poison record"),
        (status = 422, description = "The record still is not an event (`still_poison`, with why)"),
    ))]
async fn replay(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<ReplayedPoison>, ApiError> {
    let id: i64 = id
        .parse()
        .ok()
        .filter(|id| *id > 0)
        .ok_or_else(|| ApiError::not_found("poison record"))?;
    let outcome = ingest::replay_poison(&state.pool, id).await?;
    match outcome {
        PoisonReplay::NotFound => Err(ApiError::not_found("poison record")),
        PoisonReplay::StillPoison(error) => Err(ApiError::unprocessable(
            "still_poison",
            format!("the record still cannot be read as an event: {error}"),
        )),
        PoisonReplay::Recorded {
            event_id,
            deliveries,
            duplicate,
        } => {
            state.wake.notify_waiters();
            Ok(Json(ReplayedPoison {
                id,
                event_id,
                deliveries,
                duplicate,
            }))
        }
    }
}
