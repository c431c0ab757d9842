//! The consumer's part of the trace of an event (see `outbox_core::trace_context`): a span per
//! record while its batch is recorded, continuing the record's `traceparent` header, and each
//! delivery attempt as a child of that span, sent on as the webhook's `traceparent`.
//!
//! The recording span's context is stored with the event's deliveries (`deliveries.traceparent`),
//! so every attempt continues the same trace, whichever instance makes it and however many
//! restarts lie between. Nothing happens when span export is off.

use outbox_core::envelope::HEADER_EVENT_ID;
use outbox_core::trace_context::{self, TRACEPARENT};
use rdkafka::message::{BorrowedMessage, Headers as _, Message as _};
use tracing::Span;

/// The spans of one batch's records: open while the batch is recorded, closed by [`Self::finish`]
/// (after the transaction committed).
#[derive(Default)]
pub struct Recording {
    spans: Vec<Span>,
}

impl Recording {
    /// Opens the span of one record read from Kafka, continuing its `traceparent`, and returns the
    /// span's own `traceparent`, to keep with the event's deliveries (None when export is off).
    pub fn add(&mut self, message: &BorrowedMessage<'_>) -> Option<String> {
        if !outbox_core::telemetry::exporting() {
            return None;
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
        let span = tracing::info_span!(
            "consumer_record",
            otel.kind = "consumer",
            event_id = %header(HEADER_EVENT_ID).unwrap_or_default(),
            topic = message.topic(),
            partition = message.partition(),
            offset = message.offset(),
        );
        trace_context::continue_from_value(&span, header(TRACEPARENT).as_deref());
        let traceparent = trace_context::traceparent(&span);
        self.spans.push(span);
        traceparent
    }

    /// Closes the spans: the batch is recorded.
    pub fn finish(self) {}
}

/// Makes a delivery attempt's span a child of the span that recorded its event (the delivery's
/// stored `traceparent`, when it has one).
pub fn continue_delivery(span: &Span, traceparent: Option<&str>) {
    trace_context::continue_from_value(span, traceparent);
}

/// The `traceparent` header of the attempt being sent (the current span), when spans are exported.
pub fn webhook_header() -> Option<(&'static str, String)> {
    trace_context::traceparent(&Span::current()).map(|tp| (TRACEPARENT, tp))
}
