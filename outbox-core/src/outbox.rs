//! Outbox rows: their states (contract) and how a service writes one inside its own transaction.

use deadpool_postgres::GenericClient;
use serde::Serialize;

use crate::envelope::{Envelope, HEADER_CORRELATION_ID, HEADER_EVENT_ID, HEADER_EVENT_TYPE};

/// An outbox row's state (contract).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
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

/// Inserts the outbox row for `envelope` (state `P`, the envelope itself in `outbox_payloads`)
/// and wakes the relay when the caller's transaction commits. Call it inside the transaction
/// that writes the domain row.
pub async fn insert_event(
    tx: &impl GenericClient,
    envelope: &Envelope,
    aggregate_id: &str,
    topic: &str,
) -> Result<i64, tokio_postgres::Error> {
    let payload = serde_json::to_value(envelope).expect("an envelope always serialises");
    let headers = serde_json::json!({
        HEADER_EVENT_ID: envelope.id,
        HEADER_EVENT_TYPE: envelope.event,
        HEADER_CORRELATION_ID: envelope.metadata.correlation_id,
    });
    let row = tx
        .query_one(
            "with row as (
                 insert into outbox (event_id, event_type, aggregate_id, topic, headers)
                 values ($1, $2, $3, $4, $6) returning id
             ), envelope as (
                 insert into outbox_payloads (outbox_id, payload) select id, $5 from row
             )
             select id from row",
            &[
                &envelope.id,
                &envelope.event,
                &aggregate_id,
                &topic,
                &payload,
                &headers,
            ],
        )
        .await?;
    // NOTIFY is delivered at commit, and only if the transaction commits.
    tx.execute("select pg_notify($1, '')", &[&NOTIFY_CHANNEL])
        .await?;
    Ok(row.get(0))
}
