//! The consumer's part of the trace of an event (see `outbox_core::trace_context`): a span per
//! record while its batch is recorded, continuing the record's `traceparent` header, and each
//! delivery attempt as a child of that span, sent on as the webhook's `traceparent`.
//!
//! The context of an event is kept in memory (the most recent [`REMEMBERED`] events), so a retry
//! by this instance continues the same trace; a retry by another instance, or after a restart,
//! starts a trace of its own. Nothing happens when span export is off.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, OnceLock};

use outbox_core::envelope::HEADER_EVENT_ID;
use outbox_core::trace_context::{self, TRACEPARENT};
use rdkafka::message::{BorrowedMessage, Headers as _, Message as _};
use tracing::Span;

/// How many events' trace contexts are kept for their retries.
pub const REMEMBERED: usize = 100_000;

/// Event id → the `traceparent` of the span that recorded it, oldest first in `order`.
#[derive(Default)]
struct Contexts {
    by_event: HashMap<String, String>,
    order: VecDeque<String>,
}

fn contexts() -> &'static Mutex<Contexts> {
    static CONTEXTS: OnceLock<Mutex<Contexts>> = OnceLock::new();
    CONTEXTS.get_or_init(Default::default)
}

fn remember(event_id: String, traceparent: String) {
    let mut c = contexts().lock().unwrap_or_else(|e| e.into_inner());
    if c.by_event.insert(event_id.clone(), traceparent).is_none() {
        c.order.push_back(event_id);
    }
    while c.order.len() > REMEMBERED {
        if let Some(old) = c.order.pop_front() {
            c.by_event.remove(&old);
        }
    }
}

fn recalled(event_id: &str) -> Option<String> {
    let c = contexts().lock().unwrap_or_else(|e| e.into_inner());
    c.by_event.get(event_id).cloned()
}

/// The spans of one batch's records: open while the batch is recorded, closed by [`Self::finish`]
/// (after the transaction committed).
#[derive(Default)]
pub struct Recording {
    spans: Vec<Span>,
}

impl Recording {
    /// Opens the span of one record read from Kafka, continuing its `traceparent`.
    pub fn add(&mut self, message: &BorrowedMessage<'_>) {
        if !outbox_core::telemetry::exporting() {
            return;
        }
        let header = |name: &str| {
            message.headers().and_then(|h| {
                h.iter()
                    .find(|h| h.key == name)
                    .and_then(|h| h.value)
                    .and_then(|v| std::str::from_utf8(v).ok())
                    .map(str::to_owned)
            })
        };
        let event_id = header(HEADER_EVENT_ID).unwrap_or_default();
        let span = tracing::info_span!(
            "consumer_record",
            otel.kind = "consumer",
            event_id = %event_id,
            topic = message.topic(),
            partition = message.partition(),
            offset = message.offset(),
        );
        trace_context::continue_from_value(&span, header(TRACEPARENT).as_deref());
        if let Some(tp) = trace_context::traceparent(&span) {
            if !event_id.is_empty() {
                remember(event_id, tp);
            }
        }
        self.spans.push(span);
    }

    /// Closes the spans: the batch is recorded.
    pub fn finish(self) {}
}

/// Makes a delivery attempt's span a child of the span that recorded its event, when this
/// instance recorded it recently.
pub fn continue_delivery(span: &Span, event_id: &str) {
    if outbox_core::telemetry::exporting() {
        trace_context::continue_from_value(span, recalled(event_id).as_deref());
    }
}

/// The `traceparent` header of the attempt being sent (the current span), when spans are exported.
pub fn webhook_header() -> Option<(&'static str, String)> {
    trace_context::traceparent(&Span::current()).map(|tp| (TRACEPARENT, tp))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_contexts_are_forgotten_first() {
        for i in 0..REMEMBERED + 2 {
            remember(format!("evt_t{i}"), format!("tp{i}"));
        }
        assert_eq!(recalled("evt_t0"), None);
        assert_eq!(recalled("evt_t1"), None);
        assert_eq!(recalled("evt_t2").as_deref(), Some("tp2"));
        assert_eq!(
            recalled(&format!("evt_t{}", REMEMBERED + 1)).as_deref(),
            Some(&*format!("tp{}", REMEMBERED + 1))
        );
    }
}
