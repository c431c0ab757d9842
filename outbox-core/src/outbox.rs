//! Outbox rows: their states (contract) and how a service writes one inside its own transaction.

use serde::{Deserialize, Serialize};
use tokio_postgres::GenericClient;

/// An outbox row's state (contract): P pending, E sent, X retry later, D dead.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub enum OutboxState {
    /// `P`: written, not yet sent.
    #[serde(rename = "P")]
    Pending,
    /// `E`: acknowledged by Kafka (enviado).
    #[serde(rename = "E")]
    Sent,
    /// `X`: a send failed; retried at `next_attempt_at`.
    #[serde(rename = "X")]
    Retry,
    /// `D`: given up after the configured attempts on a non-transient error; replayable.
    #[serde(rename = "D")]
    Dead,
}

impl OutboxState {
    pub fn code(self) -> &'static str {
        match self {
            OutboxState::Pending => "P",
            OutboxState::Sent => "E",
            OutboxState::Retry => "X",
            OutboxState::Dead => "D",
        }
    }

    pub fn parse(code: &str) -> Option<Self> {
        match code {
            "P" => Some(OutboxState::Pending),
            "E" => Some(OutboxState::Sent),
            "X" => Some(OutboxState::Retry),
            "D" => Some(OutboxState::Dead),
            _ => None,
        }
    }

    pub const ALL: [OutboxState; 4] = [
        OutboxState::Pending,
        OutboxState::Sent,
        OutboxState::Retry,
        OutboxState::Dead,
    ];
}

/// The channel the relay LISTENs on; a commit that adds outbox rows NOTIFYs it.
pub const NOTIFY_CHANNEL: &str = "outbox";

/// An event to publish: the arguments of `outbox.publish` (contract).
#[derive(Debug, Clone, Copy)]
pub struct NewEvent<'a> {
    /// Dot-separated lowercase words, e.g. `order.created`.
    pub event_type: &'a str,
    /// The aggregate id: the Kafka key, so events of one key keep their order.
    pub key: &'a str,
    /// A JSON object, at most 64 levels deep.
    pub data: &'a serde_json::Value,
    /// The topic; `None` routes by `outbox.routes` (`TOPIC_ROUTES`).
    pub topic: Option<&'a str>,
    /// Extra Kafka headers, a JSON object of strings.
    pub headers: Option<&'a serde_json::Value>,
    /// Carried into the envelope and the headers; made when `None`.
    pub correlation_id: Option<&'a str>,
    /// `metadata.source` of the envelope; `sql` when `None`.
    pub source: Option<&'a str>,
}

/// A published event: its id, and its outbox row for callers allowed to know it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    pub event_id: String,
    pub outbox_id: i64,
}

/// Why `outbox.publish` refused an event; the caller's transaction is then aborted.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// SQLSTATE 22023: a missing or malformed argument.
    #[error("{0}")]
    Invalid(String),
    /// SQLSTATE 54000: key, data depth or envelope size over its limit.
    #[error("{0}")]
    TooLarge(String),
    /// SQLSTATE OB001: no route for the event type and no topic given.
    #[error("{0}")]
    NoRoute(String),
    /// Anything else PostgreSQL said (a connection lost, an aborted transaction).
    #[error("PostgreSQL error: {}", crate::db::describe(.0))]
    Db(#[from] tokio_postgres::Error),
}

impl PublishError {
    fn from_db(error: tokio_postgres::Error) -> Self {
        let Some(db) = error.as_db_error() else {
            return PublishError::Db(error);
        };
        let message = db.message().to_owned();
        match db.code().code() {
            "22023" => PublishError::Invalid(message),
            "54000" => PublishError::TooLarge(message),
            "OB001" => PublishError::NoRoute(message),
            _ => PublishError::Db(error),
        }
    }
}

const PUBLISH: &str = "outbox.publish(event_type => $1, key => $2, data => $3, topic => $4,
                                      headers => $5, correlation_id => $6, source => $7)";

/// Publishes `event` inside the caller's transaction, through `outbox.publish`: the envelope
/// (contract) is built there, the relay is woken at commit, and a rollback leaves nothing.
/// Returns the event id. Needs nothing but the `outbox_publisher` role.
///
/// ```no_run
/// # async fn example(client: &mut tokio_postgres::Client) -> Result<(), Box<dyn std::error::Error>> {
/// use outbox_core::outbox::{publish, NewEvent};
/// let tx = client.transaction().await?;
/// tx.execute("update orders set state = 'processed' where id = $1", &[&42i64]).await?;
/// let event_id = publish(&tx, &NewEvent {
///     event_type: "order.processed",
///     key: "order-42",
///     data: &serde_json::json!({"total": 10}),
///     topic: None,
///     headers: None,
///     correlation_id: None,
///     source: Some("orders"),
/// })
/// .await?;
/// tx.commit().await?; // the event is sent once this commits
/// # let _ = event_id; Ok(()) }
/// ```
pub async fn publish(
    tx: &impl GenericClient,
    event: &NewEvent<'_>,
) -> Result<String, PublishError> {
    let row = tx
        .query_one(&format!("select {PUBLISH}"), &params(event))
        .await
        .map_err(PublishError::from_db)?;
    Ok(row.get(0))
}

/// [`publish`], also returning the outbox row's id (for callers that keep it beside their domain
/// row, as the producer does). Reads the outbox's id sequence, so it needs more than the
/// `outbox_publisher` role. The statement is prepared once per pooled connection: a request then
/// costs one round trip for it, not two, and PostgreSQL plans it once.
pub async fn publish_returning_row(
    tx: &deadpool_postgres::Transaction<'_>,
    event: &NewEvent<'_>,
) -> Result<Published, PublishError> {
    // The subquery runs first (offset 0 keeps it from being folded), so currval is this call's id.
    let sql = format!(
        "select e, currval('outbox.events_id_seq')
           from (select {PUBLISH} as e offset 0) p"
    );
    let statement = tx
        .prepare_cached(&sql)
        .await
        .map_err(PublishError::from_db)?;
    let row = tx
        .query_one(&statement, &params(event))
        .await
        .map_err(PublishError::from_db)?;
    Ok(Published {
        event_id: row.get(0),
        outbox_id: row.get(1),
    })
}

fn params<'a>(event: &'a NewEvent<'a>) -> [&'a (dyn tokio_postgres::types::ToSql + Sync); 7] {
    [
        &event.event_type,
        &event.key,
        event.data,
        &event.topic,
        &event.headers,
        &event.correlation_id,
        &event.source,
    ]
}
