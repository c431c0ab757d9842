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

/// Longest event id. Ids become the `webhook-id` header, so they are also limited to visible ASCII.
pub const MAX_EVENT_ID_BYTES: usize = 256;
/// Longest event type.
pub const MAX_EVENT_TYPE_BYTES: usize = 128;
/// Longest correlation id. It becomes the `X-Correlation-Id` header (visible ASCII only).
pub const MAX_CORRELATION_ID_BYTES: usize = 128;
/// Deepest accepted nesting of `data` (an empty object or array is one level). Publishers refuse
/// deeper `data` at the door; with the envelope around it, every accepted event stays well inside
/// the 128 levels of common JSON parsers (serde_json's default among them), so every receiver can
/// read what a publisher accepted.
pub const MAX_DATA_DEPTH: usize = 64;

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

/// Why a value cannot be part of an envelope.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    #[error("the value is not UTF-8")]
    NotUtf8,
    #[error("the value is not an event envelope: {0}")]
    NotAnEnvelope(String),
    #[error("the event id must be 1 to {MAX_EVENT_ID_BYTES} visible ASCII characters (it becomes the webhook-id header)")]
    InvalidId,
    #[error("the event type must be 1 to {MAX_EVENT_TYPE_BYTES} bytes without control characters")]
    InvalidType,
    #[error("the correlation id must be 1 to {MAX_CORRELATION_ID_BYTES} visible ASCII characters (it becomes the X-Correlation-Id header)")]
    InvalidCorrelationId,
    #[error("data nests {0} levels deep; at most {MAX_DATA_DEPTH} are accepted")]
    DataTooDeep(usize),
}

/// 1 to `max` bytes of visible ASCII (`!` to `~`): what an HTTP header value can carry unchanged
/// and every receiver reads the same way.
fn is_header_token(value: &str, max: usize) -> bool {
    !value.is_empty() && value.len() <= max && value.bytes().all(|b| b.is_ascii_graphic())
}

/// Checks an event id: it is sent as the `webhook-id` header and receivers deduplicate by it.
pub fn check_event_id(id: &str) -> Result<(), EnvelopeError> {
    is_header_token(id, MAX_EVENT_ID_BYTES)
        .then_some(())
        .ok_or(EnvelopeError::InvalidId)
}

/// Checks a correlation id: it is sent as the `X-Correlation-Id` header.
pub fn check_correlation_id(id: &str) -> Result<(), EnvelopeError> {
    is_header_token(id, MAX_CORRELATION_ID_BYTES)
        .then_some(())
        .ok_or(EnvelopeError::InvalidCorrelationId)
}

/// Checks an event type: endpoints filter on it and it is stored as text.
pub fn check_event_type(event_type: &str) -> Result<(), EnvelopeError> {
    let ok = !event_type.is_empty()
        && event_type.len() <= MAX_EVENT_TYPE_BYTES
        && !event_type.chars().any(char::is_control);
    ok.then_some(()).ok_or(EnvelopeError::InvalidType)
}

/// How deeply `value` nests: 0 for a scalar, 1 for `[]` or `{"a": 1}`. Iterative, so any depth a
/// parser produced can be measured.
pub fn depth(value: &Value) -> usize {
    let mut deepest = 0;
    let mut stack = vec![(value, 0usize)];
    while let Some((v, level)) = stack.pop() {
        let children: Box<dyn Iterator<Item = &Value>> = match v {
            Value::Array(items) => Box::new(items.iter()),
            Value::Object(fields) => Box::new(fields.values()),
            _ => continue,
        };
        deepest = deepest.max(level + 1);
        stack.extend(children.map(|c| (c, level + 1)));
    }
    deepest
}

/// Checks `data` against [`MAX_DATA_DEPTH`].
pub fn check_data(data: &Value) -> Result<(), EnvelopeError> {
    match depth(data) {
        d if d > MAX_DATA_DEPTH => Err(EnvelopeError::DataTooDeep(d)),
        _ => Ok(()),
    }
}

/// What a reader of the Kafka record needs of an envelope, checked against the contract.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub id: String,
    pub event: String,
    /// The envelope's correlation id when it is a valid one; an unusable one is dropped (it would
    /// only become a header that cannot be sent) rather than making the event unreadable.
    pub correlation_id: Option<String>,
}

/// Reads the head of an envelope from a Kafka record value, at any nesting depth of `data`
/// (which is skipped, not parsed: the bytes are forwarded exactly as they are).
pub fn read_head(value: &[u8]) -> Result<Head, EnvelopeError> {
    #[derive(Deserialize)]
    struct Raw {
        id: String,
        event: String,
        #[allow(dead_code)]
        version: String,
        #[allow(dead_code)]
        idempotency_key: String,
        #[allow(dead_code)]
        timestamp: String,
        #[allow(dead_code)]
        data: serde::de::IgnoredAny,
        metadata: RawMetadata,
    }
    #[derive(Deserialize)]
    struct RawMetadata {
        #[allow(dead_code)]
        source: String,
        #[allow(dead_code)]
        environment: String,
        correlation_id: String,
    }
    let text = std::str::from_utf8(value).map_err(|_| EnvelopeError::NotUtf8)?;
    let raw: Raw =
        serde_json::from_str(text).map_err(|e| EnvelopeError::NotAnEnvelope(e.to_string()))?;
    check_event_id(&raw.id)?;
    check_event_type(&raw.event)?;
    let correlation_id =
        Some(raw.metadata.correlation_id).filter(|c| check_correlation_id(c).is_ok());
    Ok(Head {
        id: raw.id,
        event: raw.event,
        correlation_id,
    })
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

    fn nested(levels: usize) -> String {
        "[".repeat(levels) + &"]".repeat(levels)
    }

    fn envelope_text(id: &str, correlation_id: &str, data: &str) -> String {
        format!(
            r#"{{"id":{},"event":"message.created","version":"1.0","idempotency_key":"k","timestamp":"2026-11-23T10:30:45.123Z","data":{data},"metadata":{{"source":"t","environment":"dev","correlation_id":{}}}}}"#,
            serde_json::to_string(id).unwrap(),
            serde_json::to_string(correlation_id).unwrap()
        )
    }

    #[test]
    fn depth_counts_nesting_levels() {
        assert_eq!(depth(&serde_json::json!(1)), 0);
        assert_eq!(depth(&serde_json::json!([])), 1);
        assert_eq!(depth(&serde_json::json!({"a": {"b": [1]}})), 3);
        let limit: Value = serde_json::from_str(&nested(MAX_DATA_DEPTH)).unwrap();
        assert_eq!(check_data(&limit), Ok(()));
        let deeper: Value = serde_json::from_str(&nested(MAX_DATA_DEPTH + 1)).unwrap();
        assert_eq!(
            check_data(&deeper),
            Err(EnvelopeError::DataTooDeep(MAX_DATA_DEPTH + 1))
        );
    }

    #[test]
    fn the_head_is_read_at_any_data_depth() {
        for levels in [1, 126, 127, 500, 10_000] {
            let text = envelope_text("evt_1", "req_1", &format!("{{\"a\":{}}}", nested(levels)));
            let head = read_head(text.as_bytes()).unwrap_or_else(|e| panic!("{levels}: {e}"));
            assert_eq!(head.id, "evt_1");
            assert_eq!(head.correlation_id.as_deref(), Some("req_1"));
        }
    }

    #[test]
    fn ids_that_cannot_be_headers_are_refused_and_bad_correlation_ids_dropped() {
        for bad in ["", "a\nb", "a\rb", "a\x01b", "évt", "a b", &"x".repeat(257)] {
            let text = envelope_text(bad, "req_1", "{}");
            assert_eq!(
                read_head(text.as_bytes()),
                Err(EnvelopeError::InvalidId),
                "{bad:?}"
            );
        }
        for bad in ["", "r\nx", "r\x01", "réq", &"x".repeat(129)] {
            let text = envelope_text("evt_1", bad, "{}");
            assert_eq!(
                read_head(text.as_bytes()).unwrap().correlation_id,
                None,
                "{bad:?}"
            );
        }
        assert_eq!(read_head(b"\xff"), Err(EnvelopeError::NotUtf8));
        assert!(matches!(
            read_head(b"[1]"),
            Err(EnvelopeError::NotAnEnvelope(_))
        ));
        assert_eq!(check_event_type("message.created"), Ok(()));
        assert_eq!(check_event_type("a\nb"), Err(EnvelopeError::InvalidType));
    }
}
