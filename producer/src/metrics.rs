//! The producer's metrics (names in docs/metrics.md).

use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use outbox_core::telemetry::register;
use prometheus::{HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts, Registry};

/// Counters and histograms of one producer instance.
#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub requests: IntCounterVec,
    pub request_seconds: HistogramVec,
    pub messages_created: IntCounter,
    pub idempotent_replays: IntCounter,
    pub idempotency_keys_deleted: IntCounter,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        Metrics {
            requests: register(
                &registry,
                IntCounterVec::new(
                    Opts::new("producer_http_requests_total", "HTTP requests answered"),
                    &["route", "method", "status"],
                )
                .expect("valid metric"),
            ),
            request_seconds: register(
                &registry,
                HistogramVec::new(
                    HistogramOpts::new(
                        "producer_http_request_duration_seconds",
                        "HTTP request latency",
                    )
                    .buckets(vec![
                        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    ]),
                    &["route"],
                )
                .expect("valid metric"),
            ),
            messages_created: register(
                &registry,
                IntCounter::new(
                    "producer_messages_created_total",
                    "Messages and their outbox rows committed",
                )
                .expect("valid metric"),
            ),
            idempotent_replays: register(
                &registry,
                IntCounter::new(
                    "producer_idempotent_replays_total",
                    "Requests answered from an earlier response with the same Idempotency-Key",
                )
                .expect("valid metric"),
            ),
            idempotency_keys_deleted: register(
                &registry,
                IntCounter::new(
                    "producer_idempotency_keys_deleted_total",
                    "Idempotency keys deleted after IDEMPOTENCY_KEY_RETENTION",
                )
                .expect("valid metric"),
            ),
            registry,
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Counts and times every request by its route pattern (bounded labels: never the raw path).
pub async fn track(State(metrics): State<Metrics>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".into());
    let method = request.method().as_str().to_owned();
    let started = Instant::now();
    let response = next.run(request).await;
    metrics
        .request_seconds
        .with_label_values(&[&route])
        .observe(started.elapsed().as_secs_f64());
    metrics
        .requests
        .with_label_values(&[&route, &method, response.status().as_str()])
        .inc();
    response
}
