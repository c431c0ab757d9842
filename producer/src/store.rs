//! The producer's SQL: the one transaction that writes a message with its outbox event, and reads.

use std::time::Duration;

use chrono::{DateTime, Utc};
use outbox_core::http::ApiError;
use outbox_core::outbox::{self, OutboxState};
use outbox_core::retention::BatchDelete;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio_postgres::types::Json;
use tokio_postgres::Row;
use uuid::Uuid;

/// A validated request to create a message.
pub struct NewMessage {
    pub content: String,
    pub aggregate_id: Option<String>,
    pub event_type: String,
    pub topic: String,
    pub data: Option<Value>,
    pub correlation_id: String,
}

/// The idempotency key of a request and the hash of its body.
pub struct Idempotency<'a> {
    pub key: &'a str,
    pub request_hash: String,
}

/// Deletes idempotency keys older than `$1` ms, at most `$2` of them.
const DELETE_EXPIRED_KEYS: &str = "
    with gone as (
        delete from idempotency_keys where key in (
            select key from idempotency_keys
             where created_at < now() - ($1::bigint * interval '1 millisecond')
             limit $2
               for update skip locked)
        returning 1
    )
    select count(*) from gone";

/// The retention of idempotency keys: kept at least `retention`, deleted within about `interval`
/// after. A key being written (its transaction still open) is skipped, never waited for.
pub fn idempotency_key_retention(retention: Duration, interval: Duration) -> BatchDelete {
    BatchDelete {
        what: "idempotency keys",
        sql: DELETE_EXPIRED_KEYS,
        retention,
        batch: 1000,
        interval,
    }
}

/// The answer to `POST /messages`: the message and its outbox event, as committed.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CreatedMessage {
    pub id: Uuid,
    pub event_id: String,
    pub outbox_id: i64,
    /// Always `P`: the relay has not sent it yet.
    pub state: OutboxState,
    pub event_type: String,
    pub key: String,
    pub topic: String,
    pub correlation_id: String,
    pub created_at: DateTime<Utc>,
}

/// What `create_message` did.
pub enum Created {
    /// Written now; the response body.
    New(CreatedMessage),
    /// The same key and body were seen before: the first response as it was stored, nothing
    /// written.
    Replayed(Value),
    /// The same key came with another body: refused, nothing written.
    KeyReused,
}

/// Inserts the message row and its outbox row (state P) in one transaction, and NOTIFYs the relay
/// at commit. Either both rows exist afterwards or neither does. With an idempotency key, a
/// concurrent or later request with the same key waits for the first and returns its response.
pub async fn create_message(
    client: &mut outbox_core::db::Client,
    new: NewMessage,
    idempotency: Option<Idempotency<'_>>,
) -> Result<Created, ApiError> {
    let tx = client.transaction().await?;
    if let Some(idem) = &idempotency {
        // The insert blocks while another transaction holds the same key, so the loser of a race
        // sees the winner's committed response below. Retention may delete the key between the
        // two statements: it is then new, and the insert is tried again.
        loop {
            let inserted = tx
                .execute(
                    "insert into idempotency_keys (key, request_hash, response_code, response_body)
                     values ($1, $2, 0, '{}'::jsonb) on conflict (key) do nothing",
                    &[&idem.key, &idem.request_hash],
                )
                .await?;
            if inserted == 1 {
                break;
            }
            let Some(row) = tx
                .query_opt(
                    "select request_hash, response_body from idempotency_keys where key = $1",
                    &[&idem.key],
                )
                .await?
            else {
                continue;
            };
            let hash: String = row.get(0);
            return Ok(if hash == idem.request_hash {
                Created::Replayed(row.get(1))
            } else {
                Created::KeyReused
            });
        }
    }

    let id = Uuid::now_v7();
    let aggregate_id = new.aggregate_id.unwrap_or_else(|| id.to_string());
    let data = json!({
        "message_id": id,
        "content": new.content,
        "key": aggregate_id,
        "data": new.data,
    });
    // The trace of this request travels with the event (as a Kafka header) when spans are exported.
    let headers = outbox_core::trace_context::traceparent(&tracing::Span::current())
        .map(|tp| json!({ outbox_core::trace_context::TRACEPARENT: tp }));
    let published = outbox::publish_returning_row(
        &tx,
        &outbox::NewEvent {
            event_type: &new.event_type,
            key: &aggregate_id,
            data: &data,
            topic: Some(&new.topic),
            headers: headers.as_ref(),
            correlation_id: Some(&new.correlation_id),
            source: Some("producer"),
        },
    )
    .await?;
    let outbox_id = published.outbox_id;
    let insert = tx
        .prepare_cached(
            "insert into messages (id, content, aggregate_id, event_type, event_id, outbox_id, data, correlation_id)
             values ($1, $2, $3, $4, $5, $6, $7, $8) returning created_at",
        )
        .await?;
    let row = tx
        .query_one(
            &insert,
            &[
                &id,
                &new.content,
                &aggregate_id,
                &new.event_type,
                &published.event_id,
                &outbox_id,
                &new.data,
                &new.correlation_id,
            ],
        )
        .await?;
    let created_at: DateTime<Utc> = row.get(0);
    let body = CreatedMessage {
        id,
        event_id: published.event_id,
        outbox_id,
        state: OutboxState::Pending,
        event_type: new.event_type,
        key: aggregate_id,
        topic: new.topic,
        correlation_id: new.correlation_id,
        created_at,
    };
    if let Some(idem) = &idempotency {
        tx.execute(
            "update idempotency_keys set response_code = 201, response_body = $2 where key = $1",
            &[&idem.key, &Json(&body)],
        )
        .await?;
    }
    tx.commit().await?;
    Ok(Created::New(body))
}

/// A message with its event's delivery state.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct MessageView {
    pub id: Uuid,
    pub content: String,
    pub key: String,
    pub event_type: String,
    pub event_id: String,
    #[schema(schema_with = outbox_core::http::openapi::json_without_nul)]
    pub data: Option<Value>,
    pub correlation_id: String,
    pub created_at: DateTime<Utc>,
    /// The event's outbox state: P, E, X or D.
    #[schema(value_type = OutboxState)]
    pub state: String,
    pub attempts: i32,
    pub last_error: Option<String>,
    pub topic: Option<String>,
    pub kafka_partition: Option<i32>,
    pub kafka_offset: Option<i64>,
    pub sent_at: Option<DateTime<Utc>>,
}

const MESSAGE_VIEW: &str = "
    select m.id, m.content, m.aggregate_id, m.event_type, m.event_id, m.data, m.correlation_id,
           m.created_at, o.state, coalesce(o.attempts, 0) as attempts, o.last_error, o.topic,
           o.kafka_partition, o.kafka_offset, o.sent_at
      from messages m left join outbox o on o.id = m.outbox_id";

fn message_view(row: &Row) -> MessageView {
    let state: Option<String> = row.get("state");
    MessageView {
        id: row.get("id"),
        content: row.get("content"),
        key: row.get("aggregate_id"),
        event_type: row.get("event_type"),
        event_id: row.get("event_id"),
        data: row.get("data"),
        correlation_id: row.get("correlation_id"),
        created_at: row.get("created_at"),
        // Retention deletes only sent rows, so a message without its outbox row was sent.
        state: state.unwrap_or_else(|| OutboxState::Sent.code().into()),
        attempts: row.get("attempts"),
        last_error: row.get("last_error"),
        topic: row.get("topic"),
        kafka_partition: row.get("kafka_partition"),
        kafka_offset: row.get("kafka_offset"),
        sent_at: row.get("sent_at"),
    }
}

pub async fn get_message(
    client: &outbox_core::db::Client,
    id: Uuid,
) -> Result<Option<MessageView>, ApiError> {
    let sql = format!("{MESSAGE_VIEW} where m.id = $1");
    Ok(client
        .query_opt(&sql, &[&id])
        .await?
        .as_ref()
        .map(message_view))
}

/// Messages newest first, `limit` of them, older than `before` when given.
pub async fn list_messages(
    client: &outbox_core::db::Client,
    limit: i64,
    before: Option<Uuid>,
) -> Result<Vec<MessageView>, ApiError> {
    let rows = match before {
        Some(before) => {
            let sql = format!("{MESSAGE_VIEW} where m.id < $1 order by m.id desc limit $2");
            client.query(&sql, &[&before, &limit]).await?
        }
        None => {
            let sql = format!("{MESSAGE_VIEW} order by m.id desc limit $1");
            client.query(&sql, &[&limit]).await?
        }
    };
    Ok(rows.iter().map(message_view).collect())
}

/// One outbox row as the admin API shows it.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct OutboxRow {
    pub id: i64,
    pub event_id: String,
    pub event_type: String,
    pub key: String,
    pub topic: String,
    #[schema(value_type = OutboxState)]
    pub state: String,
    pub attempts: i32,
    pub last_error: Option<String>,
    pub next_attempt_at: DateTime<Utc>,
    pub kafka_partition: Option<i32>,
    pub kafka_offset: Option<i64>,
    pub created_at: DateTime<Utc>,
    pub sent_at: Option<DateTime<Utc>>,
}

const OUTBOX_VIEW: &str =
    "select id, event_id, event_type, aggregate_id, topic, state, attempts, last_error,
        next_attempt_at, kafka_partition, kafka_offset, created_at, sent_at from outbox";

fn outbox_row(row: &Row) -> OutboxRow {
    OutboxRow {
        id: row.get("id"),
        event_id: row.get("event_id"),
        event_type: row.get("event_type"),
        key: row.get("aggregate_id"),
        topic: row.get("topic"),
        state: row.get("state"),
        attempts: row.get("attempts"),
        last_error: row.get("last_error"),
        next_attempt_at: row.get("next_attempt_at"),
        kafka_partition: row.get("kafka_partition"),
        kafka_offset: row.get("kafka_offset"),
        created_at: row.get("created_at"),
        sent_at: row.get("sent_at"),
    }
}

/// Outbox rows in id order after `after`, optionally of one state.
pub async fn list_outbox(
    client: &outbox_core::db::Client,
    state: Option<OutboxState>,
    after: i64,
    limit: i64,
) -> Result<Vec<OutboxRow>, ApiError> {
    let code = state.map(OutboxState::code);
    // Unsent rows are found from the outbox's own list of them, not by walking every sent row.
    let sql = match state {
        Some(OutboxState::Pending | OutboxState::Retry | OutboxState::Dead) => format!(
            "{OUTBOX_VIEW} where id in (select outbox.unsent_ids(true)) and id > $1 and state = $2
              order by id limit $3"
        ),
        _ => format!(
            "{OUTBOX_VIEW} where id > $1 and ($2::text is null or state = $2) order by id limit $3"
        ),
    };
    Ok(client
        .query(&sql, &[&after, &code, &limit])
        .await?
        .iter()
        .map(outbox_row)
        .collect())
}

/// The answer to `GET /stats`.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Stats {
    /// Outbox rows by state (every state present, zero when none).
    pub outbox: OutboxCounts,
    /// Age of the oldest P or X row; null when none is waiting.
    pub oldest_unsent_age_seconds: Option<f64>,
    pub messages: i64,
}

/// Outbox rows by state.
#[derive(Debug, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[allow(non_snake_case)]
pub struct OutboxCounts {
    /// Pending.
    pub P: i64,
    /// Sent (enviado).
    pub E: i64,
    /// Failed, retried later.
    pub X: i64,
    /// Dead.
    pub D: i64,
}

impl OutboxCounts {
    fn count_mut(&mut self, state: OutboxState) -> &mut i64 {
        match state {
            OutboxState::Pending => &mut self.P,
            OutboxState::Sent => &mut self.E,
            OutboxState::Retry => &mut self.X,
            OutboxState::Dead => &mut self.D,
        }
    }
}

/// Counts by state and the age of the oldest unsent row.
pub async fn stats(client: &outbox_core::db::Client) -> Result<Stats, ApiError> {
    let mut counts = OutboxCounts::default();
    for row in client
        .query(
            "select state::text, count(*) from outbox group by state",
            &[],
        )
        .await?
    {
        // The view derives E for a sent fact, else unsent's state (checked to be P, X or D) or P.
        if let Some(state) = OutboxState::parse(row.get(0)) {
            *counts.count_mut(state) = row.get(1);
        }
    }
    let oldest: Option<f64> = client
        .query_one(
            "select extract(epoch from now() - min(created_at))::float8 from outbox
              where id in (select outbox.unsent_ids()) and state in ('P', 'X')",
            &[],
        )
        .await?
        .get(0);
    let messages: i64 = client
        .query_one("select count(*) from messages", &[])
        .await?
        .get(0);
    Ok(Stats {
        outbox: counts,
        oldest_unsent_age_seconds: oldest,
        messages,
    })
}

/// Puts a dead row back to pending (attempts reset) and wakes the relay.
pub async fn retry_dead(
    client: &mut outbox_core::db::Client,
    id: i64,
) -> Result<OutboxRow, ApiError> {
    let tx = client.transaction().await?;
    let sql = format!(
        "with revived as (update outbox set state = 'P', attempts = 0, next_attempt_at = now()
                           where id = $1 and state = 'D' returning *)
         {} revived",
        OUTBOX_VIEW.trim_end_matches("outbox")
    );
    let revived = tx.query_opt(&sql, &[&id]).await?;
    let Some(row) = revived else {
        let exists = tx
            .query_opt("select state::text from outbox where id = $1", &[&id])
            .await?;
        return Err(match exists {
            Some(row) => ApiError::conflict(
                "not_dead",
                format!(
                    "outbox row {id} is in state {}; only dead (D) rows can be retried",
                    row.get::<_, String>(0)
                ),
            ),
            None => ApiError::not_found("outbox row"),
        });
    };
    tx.execute("select pg_notify($1, '')", &[&outbox::NOTIFY_CHANNEL])
        .await?;
    tx.commit().await?;
    Ok(outbox_row(&row))
}
