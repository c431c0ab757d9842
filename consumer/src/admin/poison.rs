//! `/events/poison`: the Kafka records that were not events, and their replay once the cause is
//! fixed.

use axum::extract::{Path, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use outbox_core::http::{ApiError, QueryParams};
use serde::{Deserialize, Serialize};

use outbox_core::http::next_cursor;

use super::PAGE;
use crate::ingest::{self, PoisonRecord, PoisonReplay, RecordError};
use crate::AppState;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/events/poison", get(list))
        .route("/events/poison/{id}/replay", post(replay))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PageQuery {
    #[serde(default)]
    after: Option<i64>,
    #[serde(default)]
    limit: Option<i64>,
}

#[derive(Serialize)]
struct PoisonPage {
    poison_records: Vec<PoisonRecord>,
    next_after: Option<i64>,
}

/// Poison records (malformed Kafka records that were skipped), in id order.
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

#[derive(Serialize)]
struct Replayed {
    id: i64,
    event_id: String,
    deliveries: u64,
    duplicate: bool,
}

/// Reads a poison record again (once its cause is fixed): 200 with the event it now is and the
/// deliveries planned for it; 422 when it still is not an event (with why); 404 when unknown.
async fn replay(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Replayed>, ApiError> {
    let id: i64 = id
        .parse()
        .ok()
        .filter(|id| *id > 0)
        .ok_or_else(|| ApiError::not_found("poison record"))?;
    let outcome = ingest::replay_poison(&state.pool, id)
        .await
        .map_err(|error| match error {
            RecordError::Pool(e) => ApiError::from(e),
            RecordError::Db(e) => ApiError::from(e),
        })?;
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
            Ok(Json(Replayed {
                id,
                event_id,
                deliveries,
                duplicate,
            }))
        }
    }
}
