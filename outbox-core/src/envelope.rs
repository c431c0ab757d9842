//! The event envelope (contract): the Kafka record value and the webhook body.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Kafka header carrying the event id.
pub const HEADER_EVENT_ID: &str = "event_id";
/// Kafka header carrying the event type.
pub const HEADER_EVENT_TYPE: &str = "event_type";
/// Kafka header carrying the correlation id of the request that caused the event.
pub const HEADER_CORRELATION_ID: &str = "correlation_id";
/// The envelope version this code writes.
pub const ENVELOPE_VERSION: &str = "1.0";

/// One event, exactly as it travels through Kafka and to webhook receivers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// Unique and stable across retries: receivers deduplicate by it.
    pub id: String,
    /// Event type, e.g. `message.created`.
    pub event: String,
    pub version: String,
    pub idempotency_key: String,
    /// RFC 3339 with milliseconds, UTC (`2026-11-23T10:30:45.123Z`).
    pub timestamp: String,
    pub data: Value,
    pub metadata: Metadata,
}

/// Where an event came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metadata {
    pub source: String,
    pub environment: String,
    pub correlation_id: String,
}

impl Envelope {
    /// A new event with a fresh id, stamped now.
    pub fn new(event: &str, aggregate_id: &str, data: Value, metadata: Metadata) -> Self {
        let id = new_event_id();
        Envelope {
            idempotency_key: format!("{event}-{aggregate_id}-{id}"),
            id,
            event: event.to_owned(),
            version: ENVELOPE_VERSION.to_owned(),
            timestamp: format_timestamp(Utc::now()),
            data,
            metadata,
        }
    }
}

/// A new event id: `evt_` and a time-ordered UUIDv7, so ids sort by creation time.
pub fn new_event_id() -> String {
    format!("evt_{}", uuid::Uuid::now_v7().simple())
}

/// A new correlation id for requests that arrive without one.
pub fn new_correlation_id() -> String {
    format!("req_{}", uuid::Uuid::now_v7().simple())
}

/// Formats a time the way the envelope carries it.
pub fn format_timestamp(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Millis, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_has_the_contract_shape() {
        let meta = Metadata {
            source: "producer".into(),
            environment: "dev".into(),
            correlation_id: "req_1".into(),
        };
        let e = Envelope::new(
            "message.created",
            "agg-1",
            serde_json::json!({"a": 1}),
            meta,
        );
        let v = serde_json::to_value(&e).unwrap();
        for field in [
            "id",
            "event",
            "version",
            "idempotency_key",
            "timestamp",
            "data",
            "metadata",
        ] {
            assert!(v.get(field).is_some(), "missing {field}");
        }
        assert!(e.id.starts_with("evt_"));
        assert!(e.idempotency_key.starts_with("message.created-agg-1-"));
        assert!(
            e.timestamp.ends_with('Z') && e.timestamp.len() == 24,
            "{}",
            e.timestamp
        );
        assert_ne!(new_event_id(), new_event_id());
    }
}
