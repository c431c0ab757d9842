//! The notifier's SQL: received events (the dedupe record) and notifications (every attempt).

use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use outbox_core::db::Client;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio_postgres::Row;

/// The scope of the notifier's breakers in `circuit_breakers`; the names are the channel names.
pub const BREAKER_SCOPE: &str = "channel";

/// An event as received.
pub struct NewEvent<'a> {
    pub route: &'a str,
    pub webhook_id: &'a str,
    pub event_type: Option<&'a str>,
    pub payload: &'a Value,
    pub correlation_id: Option<&'a str>,
}

const INSERT_EVENT: &str = "insert into received_events
        (route, webhook_id, event_type, payload, correlation_id)
    values ($1, $2, $3, $4, $5)
    on conflict (route, webhook_id) do nothing
    returning seq";

/// Records the event; `false` when this route already holds it (a duplicate).
pub async fn insert_event(
    db: &impl GenericClient,
    event: &NewEvent<'_>,
) -> Result<bool, tokio_postgres::Error> {
    // Prepared once per connection: it runs for every webhook, and its parse was a round trip.
    let statement = db.prepare_cached(INSERT_EVENT).await?;
    Ok(db
        .query_opt(
            &statement,
            &[
                &event.route,
                &event.webhook_id,
                &event.event_type,
                &event.payload,
                &event.correlation_id,
            ],
        )
        .await?
        .is_some())
}

/// Whether this route already holds the event.
pub async fn has_event(
    db: &impl GenericClient,
    route: &str,
    webhook_id: &str,
) -> Result<bool, tokio_postgres::Error> {
    Ok(db
        .query_opt(
            "select 1 from received_events where route = $1 and webhook_id = $2",
            &[&route, &webhook_id],
        )
        .await?
        .is_some())
}

/// A session advisory lock on one event of one route, held on the one connection that does all
/// the work under it: the lock and the bookkeeping written beside it share a connection, so a
/// handler never waits for a second pooled connection while holding the first (with a pool of
/// one, it would wait forever). The bookkeeping commits statement by statement, so it lasts
/// whatever happens to the lock.
///
/// Released by [`EventLock::release`]. If the holder never gets there (a panic, a cancelled task)
/// or unlocking fails, the connection is taken out of the pool and closed, which ends the session
/// and so the lock: a pooled connection never keeps a lock nobody holds.
pub struct EventLock {
    client: Option<Client>,
    key: String,
}

const LOCK: &str = "select pg_advisory_lock(hashtextextended($1, 0))";
const UNLOCK: &str = "select pg_advisory_unlock(hashtextextended($1, 0))";

impl EventLock {
    /// Waits until no other holder has this event of this route. Two different events may share
    /// a 64-bit lock key; they then wait for each other, nothing worse.
    pub async fn acquire(
        client: Client,
        route: &str,
        webhook_id: &str,
    ) -> Result<EventLock, tokio_postgres::Error> {
        let key = format!("notifier:{route}:{webhook_id}");
        // Until the lock is taken, a failure just returns the connection to the pool.
        client.execute(LOCK, &[&key]).await?;
        Ok(EventLock {
            client: Some(client),
            key,
        })
    }

    /// The connection the lock is held on.
    pub fn client(&mut self) -> &mut Client {
        self.client.as_mut().expect("held until released")
    }

    /// Unlocks and gives the connection back to the pool.
    pub async fn release(mut self) {
        if let Some(client) = self.client.take() {
            match client.execute(UNLOCK, &[&self.key]).await {
                Ok(_) => drop(client),
                Err(error) => {
                    tracing::warn!(%error, "cannot unlock the event; closing the connection");
                    drop(Client::take(client));
                }
            }
        }
    }
}

impl Drop for EventLock {
    fn drop(&mut self) {
        if let Some(client) = self.client.take() {
            drop(Client::take(client));
        }
    }
}

/// Whether `channel` already sent a notification for the event (on an earlier attempt).
pub async fn already_sent(
    db: &impl GenericClient,
    webhook_id: &str,
    channel: &str,
) -> Result<bool, tokio_postgres::Error> {
    Ok(db
        .query_opt(
            "select 1 from notifications
              where webhook_id = $1 and channel = $2 and outcome = 'sent' limit 1",
            &[&webhook_id, &channel],
        )
        .await?
        .is_some())
}

/// Records one notification attempt and its outcome.
pub async fn record_notification(
    db: &impl GenericClient,
    webhook_id: &str,
    channel: &str,
    outcome: &str,
    error: Option<&str>,
) -> Result<(), tokio_postgres::Error> {
    db.execute(
        "insert into notifications (webhook_id, channel, outcome, error) values ($1, $2, $3, $4)",
        &[&webhook_id, &channel, &outcome, &error],
    )
    .await?;
    Ok(())
}

/// A received event as listed by `GET /webhooks/events`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ReceivedEvent {
    pub seq: i64,
    pub webhook_id: String,
    pub route: String,
    pub event_type: Option<String>,
    pub correlation_id: Option<String>,
    #[schema(schema_with = outbox_core::http::openapi::json_without_nul)]
    pub payload: Value,
    pub received_at: DateTime<Utc>,
}

/// Up to `limit` events, newest first, older than `before` (a `seq`) when given.
pub async fn list_events(
    db: &impl GenericClient,
    route: Option<&str>,
    before: Option<i64>,
    limit: i64,
) -> Result<Vec<ReceivedEvent>, tokio_postgres::Error> {
    let rows = db
        .query(
            "select seq, webhook_id, route, event_type, correlation_id, payload, received_at
               from received_events
              where ($1::text is null or route = $1) and ($2::bigint is null or seq < $2)
              order by seq desc
              limit $3",
            &[&route, &before, &limit],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| ReceivedEvent {
            seq: r.get("seq"),
            webhook_id: r.get("webhook_id"),
            route: r.get("route"),
            event_type: r.get("event_type"),
            correlation_id: r.get("correlation_id"),
            payload: r.get("payload"),
            received_at: r.get("received_at"),
        })
        .collect())
}

/// A notification attempt as listed by `GET /notifications`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Notification {
    pub id: i64,
    pub webhook_id: String,
    pub channel: String,
    pub outcome: String,
    pub error: Option<String>,
    pub created_at: DateTime<Utc>,
}

fn notification(r: &Row) -> Notification {
    Notification {
        id: r.get("id"),
        webhook_id: r.get("webhook_id"),
        channel: r.get("channel"),
        outcome: r.get("outcome"),
        error: r.get("error"),
        created_at: r.get("created_at"),
    }
}

/// Up to `limit` notification attempts, newest first, older than `before` (an id) when given.
pub async fn list_notifications(
    db: &impl GenericClient,
    webhook_id: Option<&str>,
    channel: Option<&str>,
    before: Option<i64>,
    limit: i64,
) -> Result<Vec<Notification>, tokio_postgres::Error> {
    let rows = db
        .query(
            "select id, webhook_id, channel, outcome, error, created_at
               from notifications
              where ($1::text is null or webhook_id = $1)
                and ($2::text is null or channel = $2)
                and ($3::bigint is null or id < $3)
              order by id desc
              limit $4",
            &[&webhook_id, &channel, &before, &limit],
        )
        .await?;
    Ok(rows.iter().map(notification).collect())
}
