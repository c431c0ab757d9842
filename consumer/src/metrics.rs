//! The consumer's metrics (names in docs/metrics.md), in a registry of its own per instance, and
//! the task that keeps the database-derived gauges fresh.

use std::time::Duration;

use outbox_core::breaker::BreakerState;
use outbox_core::db::PgPool;
use outbox_core::telemetry::register;
use prometheus::{
    HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};
use tokio_util::sync::CancellationToken;

/// How often the gauges read from PostgreSQL are refreshed: other instances change them too.
const GAUGE_REFRESH: Duration = Duration::from_secs(5);

pub use crate::delivery::decision::outcome;

/// Counters and gauges of one consumer instance.
#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    /// By `topic` and `partition`: high watermark − committed offset, from librdkafka statistics.
    pub lag: IntGaugeVec,
    /// By `topic`.
    pub consumed: IntCounterVec,
    pub duplicates: IntCounter,
    /// By `topic`.
    pub poison: IntCounterVec,
    /// By `endpoint_id` and `outcome` (see [`outcome`]).
    pub deliveries: IntCounterVec,
    /// By `endpoint_id`.
    pub delivery_duration: HistogramVec,
    pub pending: IntGauge,
    /// By `endpoint_id`.
    pub dead_letters: IntGaugeVec,
    /// By `endpoint_id` and `state`: 1 for the current state, 0 for the others.
    pub breaker_state: IntGaugeVec,
    /// By `table` (`deliveries`, `delivery_attempts`, `inbox`): rows retention deleted.
    pub retention_deleted: IntCounterVec,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let r = &registry;
        let metrics = Metrics {
            lag: register(
                r,
                IntGaugeVec::new(
                    Opts::new(
                        "consumer_lag_records",
                        "High watermark minus committed offset, per partition (librdkafka statistics)",
                    ),
                    &["topic", "partition"],
                )
                .expect("metric"),
            ),
            consumed: register(
                r,
                IntCounterVec::new(
                    Opts::new("consumer_events_consumed_total", "Kafka records read"),
                    &["topic"],
                )
                .expect("metric"),
            ),
            duplicates: register(
                r,
                IntCounter::new(
                    "consumer_events_duplicate_total",
                    "Records whose event id was already in the inbox",
                )
                .expect("metric"),
            ),
            poison: register(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "consumer_poison_records_total",
                        "Malformed records recorded and skipped",
                    ),
                    &["topic"],
                )
                .expect("metric"),
            ),
            deliveries: register(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "consumer_deliveries_total",
                        "Delivery attempts by endpoint and outcome",
                    ),
                    &["endpoint_id", "outcome"],
                )
                .expect("metric"),
            ),
            delivery_duration: register(
                r,
                HistogramVec::new(
                    HistogramOpts::new(
                        "consumer_delivery_duration_seconds",
                        "One webhook request's latency",
                    )
                    .buckets(vec![
                        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                        10.0, 30.0,
                    ]),
                    &["endpoint_id"],
                )
                .expect("metric"),
            ),
            pending: register(
                r,
                IntGauge::new(
                    "consumer_deliveries_pending",
                    "Deliveries waiting to be sent",
                )
                .expect("metric"),
            ),
            dead_letters: register(
                r,
                IntGaugeVec::new(
                    Opts::new("consumer_dead_letters", "Dead deliveries now, by endpoint"),
                    &["endpoint_id"],
                )
                .expect("metric"),
            ),
            breaker_state: register(
                r,
                IntGaugeVec::new(
                    Opts::new(
                        "consumer_circuit_breaker_state",
                        "1 for the endpoint breaker's current state, 0 for the others",
                    ),
                    &["endpoint_id", "state"],
                )
                .expect("metric"),
            ),
            retention_deleted: register(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "consumer_retention_deleted_rows_total",
                        "Finished deliveries, their attempts and inbox rows deleted by retention",
                    ),
                    &["table"],
                )
                .expect("metric"),
            ),
            registry,
        };
        // Every series from the start, so rate() sees the first deletions.
        for table in ["deliveries", "delivery_attempts", "inbox"] {
            metrics.retention_deleted.with_label_values(&[table]);
        }
        metrics
    }

    /// Creates at 0 the series a healthy run may never increment (poison records, failed, dead and
    /// aborted deliveries) for the consumed topics and the endpoints known at start-up, so rate()
    /// sees the first one and a dashboard shows 0 rather than "No data".
    pub fn init_series<'a>(&self, topics: &[String], endpoint_ids: impl Iterator<Item = &'a str>) {
        for topic in topics {
            self.consumed.with_label_values(&[topic]);
            self.poison.with_label_values(&[topic]);
        }
        for id in endpoint_ids {
            for o in [
                outcome::SUCCESS,
                outcome::FAILURE,
                outcome::DEAD,
                outcome::ABORTED,
                outcome::UNSENDABLE,
            ] {
                self.deliveries.with_label_values(&[id, o]);
            }
        }
    }

    /// Sets the 0/1 state gauges of one endpoint's breaker.
    pub fn set_breaker(&self, endpoint_id: &str, state: BreakerState) {
        for s in BreakerState::ALL {
            self.breaker_state
                .with_label_values(&[endpoint_id, s.label()])
                .set(i64::from(s == state));
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

const BREAKERS: &str = "
    select e.id, coalesce(b.state, 'CLOSED')
      from endpoints e
      left join circuit_breakers b on b.scope = 'endpoint' and b.name = e.id";

/// Refreshes the pending, dead-letter and breaker gauges from PostgreSQL every few seconds, so
/// they show what every instance did; series of deleted endpoints disappear.
pub async fn refresh_gauges(pool: PgPool, metrics: Metrics, shutdown: CancellationToken) {
    while !shutdown.is_cancelled() {
        if let Ok(client) = pool.get().await {
            if let Ok((pending, dead)) = crate::delivery::store::counts(&**client).await {
                metrics.pending.set(pending);
                metrics.dead_letters.reset();
                for (id, count) in dead {
                    metrics.dead_letters.with_label_values(&[&id]).set(count);
                }
            }
            if let Ok(rows) = client.query(BREAKERS, &[]).await {
                metrics.breaker_state.reset();
                for row in rows {
                    let id: String = row.get(0);
                    let state: String = row.get(1);
                    metrics.set_breaker(
                        &id,
                        BreakerState::parse(&state).unwrap_or(BreakerState::Closed),
                    );
                }
            }
        }
        outbox_core::shutdown::sleep_or_cancel(GAUGE_REFRESH, &shutdown).await;
    }
}
