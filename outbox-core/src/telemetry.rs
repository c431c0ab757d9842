//! Structured JSON logs, Prometheus metrics, and (when `OTEL_EXPORTER_OTLP_ENDPOINT` is set) spans
//! exported over OTLP.

use std::sync::OnceLock;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use prometheus::{Encoder, Registry, TextEncoder};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, EnvFilter, Layer};

/// The OTLP tracer provider, when export is on: flushed by [`shutdown`].
static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

/// Logs JSON lines to stdout, filtered by `RUST_LOG` (default `info`). Span fields, such as the
/// correlation id of the request or batch being handled, appear on every line inside the span.
/// Safe to call more than once (tests start several services in one process). Exports no spans.
pub fn init_logging() {
    init(None);
}

/// [`init_logging`], and when `OTEL_EXPORTER_OTLP_ENDPOINT` is set (e.g. `http://127.0.0.1:4318`,
/// OTLP over HTTP/protobuf; `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` and the other standard `OTEL_*`
/// variables apply too), every span is also exported as service `service` (`OTEL_SERVICE_NAME`
/// overrides it), and W3C trace context (`traceparent`) is read and written by
/// [`crate::trace_context`]. Unset or empty: no exporter, no propagator, nothing recorded beyond
/// the logs, so it costs nothing.
pub fn init_service(service: &str) {
    init(Some(service));
}

fn init(service: Option<&str>) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new("info,rdkafka=warn,tokio_postgres=warn,hyper=warn,reqwest=warn")
    });
    let logs = fmt::layer()
        .json()
        .with_current_span(true)
        .with_span_list(false)
        .flatten_event(true)
        .with_target(true);
    let otlp = service.and_then(otlp_layer);
    let _ = tracing_subscriber::registry()
        .with(logs.with_filter(filter))
        .with(otlp)
        .try_init();
}

/// The OTLP layer, when `OTEL_EXPORTER_OTLP_ENDPOINT` (or its traces variant) names a collector.
fn otlp_layer<S>(service: &str) -> Option<Box<dyn Layer<S> + Send + Sync>>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a> + Send + Sync,
{
    let set = |name| std::env::var(name).is_ok_and(|v| !v.trim().is_empty());
    if !set("OTEL_EXPORTER_OTLP_ENDPOINT") && !set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
        return None;
    }
    use opentelemetry_otlp::WithExportConfig as _;
    let exporter = match opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
        .build()
    {
        Ok(exporter) => exporter,
        Err(error) => {
            eprintln!(
                "OTEL_EXPORTER_OTLP_ENDPOINT is set but no OTLP exporter could be built: {error}"
            );
            return None;
        }
    };
    let name = std::env::var("OTEL_SERVICE_NAME")
        .ok()
        .filter(|n| !n.trim().is_empty())
        .unwrap_or_else(|| service.to_owned());
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name(name.clone())
                .build(),
        )
        .build();
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    let tracer = provider.tracer(name);
    let _ = PROVIDER.set(provider);
    // Spans at info and above: the request, batch and attempt spans, not every debug span.
    let filter = tracing_subscriber::filter::LevelFilter::INFO;
    Some(
        tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_filter(filter)
            .boxed(),
    )
}

/// Exports the spans still buffered (at shutdown); nothing when export is off.
pub fn shutdown() {
    if let Some(provider) = PROVIDER.get() {
        let _ = provider.force_flush();
        let _ = provider.shutdown();
    }
}

/// True when spans are exported over OTLP (see [`init_service`]).
pub fn exporting() -> bool {
    PROVIDER.get().is_some()
}

/// The Prometheus text exposition of a registry.
pub fn encode(registry: &Registry) -> String {
    let mut buffer = Vec::new();
    let encoder = TextEncoder::new();
    if let Err(error) = encoder.encode(&registry.gather(), &mut buffer) {
        tracing::error!(%error, "cannot encode metrics");
    }
    String::from_utf8(buffer).unwrap_or_default()
}

/// Registers a collector, panicking only on a programming error (a name registered twice).
pub fn register<C: prometheus::core::Collector + Clone + 'static>(
    registry: &Registry,
    collector: C,
) -> C {
    registry
        .register(Box::new(collector.clone()))
        .expect("each metric is registered once per registry");
    collector
}
