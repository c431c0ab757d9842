//! Structured JSON logs and Prometheus metrics.

use prometheus::{Encoder, Registry, TextEncoder};
use tracing_subscriber::{fmt, EnvFilter};

/// Logs JSON lines to stdout, filtered by `RUST_LOG` (default `info`). Span fields, such as the
/// correlation id of the request or batch being handled, appear on every line inside the span.
/// Safe to call more than once (tests start several services in one process).
pub fn init_logging() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new("info,rdkafka=warn,tokio_postgres=warn,hyper=warn,reqwest=warn")
    });
    let _ = fmt()
        .json()
        .with_env_filter(filter)
        .with_current_span(true)
        .with_span_list(false)
        .flatten_event(true)
        .with_target(true)
        .try_init();
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
