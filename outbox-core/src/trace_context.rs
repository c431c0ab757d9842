//! W3C trace context (`traceparent`) across the pipeline's hops: HTTP requests, outbox rows and
//! Kafka record headers, webhook requests. Every function is a no-op when span export is off
//! ([`crate::telemetry::init_service`] without `OTEL_EXPORTER_OTLP_ENDPOINT`): no propagator is
//! installed then, so nothing is parsed or written.

use std::collections::HashMap;

use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::TraceContextExt as _;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// The header (and Kafka record header, and outbox `headers` key) that carries the context.
pub const TRACEPARENT: &str = "traceparent";

/// Makes `span` continue the trace of `carrier` (its `traceparent`, when valid); without one the
/// span starts a trace of its own.
pub fn continue_from(span: &Span, carrier: &dyn Extractor) {
    if !crate::telemetry::exporting() {
        return;
    }
    let parent = opentelemetry::global::get_text_map_propagator(|p| p.extract(carrier));
    if parent.span().span_context().is_valid() {
        let _ = span.set_parent(parent);
    }
}

/// [`continue_from`] with a `traceparent` value read elsewhere (a stored header).
pub fn continue_from_value(span: &Span, traceparent: Option<&str>) {
    if let Some(value) = traceparent {
        continue_from(span, &Single(value));
    }
}

/// Adds a link from `span` to the context in `traceparent` (a batch linking the events it carries).
pub fn link_to(span: &Span, traceparent: &str) {
    if !crate::telemetry::exporting() {
        return;
    }
    let cx = opentelemetry::global::get_text_map_propagator(|p| p.extract(&Single(traceparent)));
    let context = cx.span().span_context().clone();
    if context.is_valid() {
        span.add_link(context);
    }
}

/// The `traceparent` of `span`, to send onward; None when export is off.
pub fn traceparent(span: &Span) -> Option<String> {
    if !crate::telemetry::exporting() {
        return None;
    }
    let mut carrier = HashMap::new();
    opentelemetry::global::get_text_map_propagator(|p| {
        p.inject_context(&span.context(), &mut Carrier(&mut carrier))
    });
    carrier.remove(TRACEPARENT)
}

/// An HTTP request's headers as a carrier.
pub struct HttpHeaders<'a>(pub &'a axum::http::HeaderMap);

impl Extractor for HttpHeaders<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// One `traceparent` value as a carrier.
struct Single<'a>(&'a str);

impl Extractor for Single<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        (key == TRACEPARENT).then_some(self.0)
    }
    fn keys(&self) -> Vec<&str> {
        vec![TRACEPARENT]
    }
}

struct Carrier<'a>(&'a mut HashMap<String, String>);

impl Injector for Carrier<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.to_owned(), value);
    }
}

/// Axum middleware: one span per HTTP request (`GET /messages/{id}`, with method, route and status),
/// continuing the request's `traceparent`. Only while spans are exported, and not for the
/// `/health`, `/ready` and `/metrics` polls, which would drown everything else.
pub async fn http_request_span(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use tracing::Instrument as _;
    if !crate::telemetry::exporting() {
        return next.run(request).await;
    }
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    if matches!(route.as_str(), "/health" | "/ready" | "/metrics") {
        return next.run(request).await;
    }
    let method = request.method().clone();
    let span = tracing::info_span!(
        "http_request",
        otel.name = %format!("{method} {route}"),
        otel.kind = "server",
        http.request.method = %method,
        http.route = %route,
        http.response.status_code = tracing::field::Empty,
    );
    continue_from(&span, &HttpHeaders(request.headers()));
    let response = next.run(request).instrument(span.clone()).await;
    span.record("http.response.status_code", response.status().as_u16());
    response
}
