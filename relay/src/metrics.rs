//! The relay's metrics (names in docs/metrics.md) and the task that keeps the backlog gauges fresh.

use std::time::Duration;

use outbox_core::db::PgPool;
use outbox_core::outbox::OutboxState;
use outbox_core::telemetry::register;
use prometheus::{
    Gauge, GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry,
};
use tokio_util::sync::CancellationToken;

#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub is_leader: IntGauge,
    pub rows: GaugeVec,
    pub oldest_unsent_age: Gauge,
    pub snapshot_xmin_age: Gauge,
    pub published: IntCounterVec,
    pub failures: IntCounterVec,
    pub dead: IntCounter,
    pub resent: IntCounter,
    pub batch_size: Histogram,
    pub commit_to_ack: Histogram,
    pub retention_deleted: IntCounter,
    /// kafka-exporter's `kafka_consumergroup_lag`, by `consumergroup`, `topic`, `partition`.
    pub group_lag: IntGaugeVec,
    /// kafka-exporter's `kafka_consumergroup_lag_sum`, by `consumergroup`, `topic`.
    pub group_lag_sum: IntGaugeVec,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let r = &registry;
        Metrics {
            is_leader: register(
                r,
                IntGauge::new(
                    "relay_is_leader",
                    "1 while this instance holds the leader lock",
                )
                .expect("metric"),
            ),
            rows: register(
                r,
                GaugeVec::new(
                    Opts::new(
                        "relay_outbox_rows",
                        "Outbox rows by state (E is an estimate)",
                    ),
                    &["state"],
                )
                .expect("metric"),
            ),
            oldest_unsent_age: register(
                r,
                Gauge::new(
                    "relay_outbox_oldest_unsent_age_seconds",
                    "Age of the oldest P or X row",
                )
                .expect("metric"),
            ),
            snapshot_xmin_age: register(
                r,
                Gauge::new(
                    "relay_snapshot_xmin_age_seconds",
                    "Age of the oldest running transaction with an xid (the snapshot's xmin): events committed after it began wait for it to end",
                )
                .expect("metric"),
            ),
            published: register(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "relay_events_published_total",
                        "Records acknowledged by Kafka",
                    ),
                    &["topic"],
                )
                .expect("metric"),
            ),
            failures: register(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "relay_publish_failures_total",
                        "Failed sends, by transient or permanent error",
                    ),
                    &["kind"],
                )
                .expect("metric"),
            ),
            dead: register(
                r,
                IntCounter::new("relay_events_dead_total", "Rows turned D").expect("metric"),
            ),
            resent: register(
                r,
                IntCounter::new(
                    "relay_events_resent_total",
                    "Events sent again although already marked sent (Kafka holds them twice; consumers drop the second by event id)",
                )
                .expect("metric"),
            ),
            batch_size: register(
                r,
                Histogram::with_opts(
                    HistogramOpts::new("relay_batch_size_events", "Rows per claimed batch")
                        .buckets(vec![
                            1.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0,
                        ]),
                )
                .expect("metric"),
            ),
            commit_to_ack: register(
                r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "relay_commit_to_ack_seconds",
                        "Outbox row creation to Kafka acknowledgement",
                    )
                    .buckets(vec![
                        0.002, 0.005, 0.01, 0.02, 0.035, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                        30.0, 60.0,
                    ]),
                )
                .expect("metric"),
            ),
            retention_deleted: register(
                r,
                IntCounter::new("relay_retention_deleted_total", "Old sent rows deleted")
                    .expect("metric"),
            ),
            group_lag: register(
                r,
                IntGaugeVec::new(
                    Opts::new(
                        "kafka_consumergroup_lag",
                        "High watermark minus the group's committed offset, per partition, as the broker reports them (-1: nothing committed)",
                    ),
                    &["consumergroup", "topic", "partition"],
                )
                .expect("metric"),
            ),
            group_lag_sum: register(
                r,
                IntGaugeVec::new(
                    Opts::new(
                        "kafka_consumergroup_lag_sum",
                        "kafka_consumergroup_lag summed over a topic's partitions with a committed offset",
                    ),
                    &["consumergroup", "topic"],
                )
                .expect("metric"),
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

// Unsent (`outbox.unsent_ids`): the rows in `unsent`, and the events beyond the committed cursor
// not sent yet. Counting sent rows exactly would scan every partition; the planner's estimate is
// enough for E.
const BACKLOG: &str = "
    with pending as (
        select e.id, e.created_at, coalesce(u.state, 'P') as state
          from outbox.unsent_ids(true) i(id) join events e on e.id = i.id
          left join unsent u on u.id = i.id)
    select count(*) filter (where state = 'P')::float8,
           count(*) filter (where state = 'X')::float8,
           count(*) filter (where state = 'D')::float8,
           (select coalesce(sum(greatest(reltuples, 0)), 0)::float8 from pg_class
             where oid in (select inhrelid from pg_inherits where inhparent = 'events'::regclass)),
           extract(epoch from now() - min(created_at) filter (where state in ('P', 'X')))::float8,
           outbox.snapshot_xmin_age()
      from pending";

/// Refreshes the backlog gauges every few seconds, on every instance (standbys too).
pub async fn refresh_backlog(pool: PgPool, metrics: Metrics, shutdown: CancellationToken) {
    while !shutdown.is_cancelled() {
        if let Ok(client) = pool.get().await {
            match client.query_one(BACKLOG, &[]).await {
                Err(error) => tracing::debug!(%error, "backlog gauges not refreshed"),
                Ok(row) => {
                    let (p, x, d, total): (f64, f64, f64, f64) =
                        (row.get(0), row.get(1), row.get(2), row.get(3));
                    let rows = |state: OutboxState| metrics.rows.with_label_values(&[state.code()]);
                    rows(OutboxState::Pending).set(p);
                    rows(OutboxState::Retry).set(x);
                    rows(OutboxState::Dead).set(d);
                    rows(OutboxState::Sent).set((total - p - x - d).max(0.0));
                    metrics
                        .oldest_unsent_age
                        .set(row.get::<_, Option<f64>>(4).unwrap_or(0.0));
                    metrics.snapshot_xmin_age.set(row.get(5));
                }
            }
        }
        outbox_core::shutdown::sleep_or_cancel(Duration::from_secs(5), &shutdown).await;
    }
}
