//! The relay: moves outbox rows into Kafka. One instance leads (a PostgreSQL advisory lock); the
//! others stand by and take over within about `RELAY_STANDBY_POLL` when the leader's session ends.
//!
//! A row is marked `E` only after Kafka acknowledged it (acks=all, idempotent producer), so a crash
//! at any point re-sends rather than loses; consumers deduplicate by event id.

#[cfg(feature = "bench")]
pub mod bench;
mod group_lag;
mod leader;
mod metrics;
mod publish;
mod retention;

/// The relay's claim and mark statements, as the relay prepares them: for relay-bench's
/// PostgreSQL-only ceiling, and for tests that look at how PostgreSQL runs them.
pub mod statements {
    pub use crate::publish::{Cursor, CLAIM_CURSOR, LOAD_CURSOR, MARK_BATCH, SNAPSHOT_XMIN};
}

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use outbox_core::config::{parse_duration, DatabaseArgs, HttpArgs, KafkaArgs};
use outbox_core::db::{self, PgPool};
use outbox_core::http::{operational_routes, Operational, Readiness};
use outbox_core::routing::TopicArgs;
use rdkafka::producer::Producer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use metrics::Metrics;
pub use publish::Publisher;

outbox_core::impl_service!(Config, SCHEMAS);

/// The PostgreSQL schemas this service uses (the outbox it reads): its pool's `search_path`, and the
/// only migrations it applies.
pub const SCHEMAS: &[outbox_core::db::Schema] = &[outbox_core::db::Schema::Outbox];

/// The relay's configuration, from the environment (see `.env.example`).
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    #[command(flatten)]
    pub database: DatabaseArgs,
    #[command(flatten)]
    pub kafka: KafkaArgs,
    #[command(flatten)]
    pub http: HttpArgs,
    /// Address of the health and metrics endpoints.
    #[arg(long, env = "LISTEN_ADDR", default_value = "127.0.0.1:8081")]
    pub listen_addr: String,
    #[command(flatten)]
    pub topics: TopicArgs,
    /// Partitions of the topics the relay creates.
    #[arg(long, env = "TOPIC_PARTITIONS", default_value_t = 6)]
    pub topic_partitions: i32,
    /// Outbox rows claimed and published per batch.
    #[arg(long, env = "RELAY_BATCH_SIZE", default_value_t = 4000)]
    pub batch_size: i64,
    /// Fallback poll interval; NOTIFY wakes the relay sooner.
    #[arg(long, env = "RELAY_POLL_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub poll_interval: Duration,
    /// Attempts before a row failing with a non-transient error (e.g. record too large) turns D.
    /// Transient errors (Kafka down) never make a row dead.
    #[arg(long, env = "RELAY_MAX_ATTEMPTS", default_value_t = 5)]
    pub max_attempts: i32,
    /// How long a record may wait for Kafka's acknowledgement before its row turns X.
    #[arg(long, env = "RELAY_SEND_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub send_timeout: Duration,
    /// First retry delay of an X row; doubles per attempt, with jitter.
    #[arg(long, env = "RELAY_RETRY_BASE", default_value = "500ms", value_parser = parse_duration)]
    pub retry_base: Duration,
    /// Longest retry delay: bounds how long after Kafka's return an X row waits.
    #[arg(long, env = "RELAY_RETRY_MAX", default_value = "5s", value_parser = parse_duration)]
    pub retry_max: Duration,
    /// Sent rows older than this are deleted: a whole partition once its time range is this old
    /// and its events are all sent (so a sent row may outlive it by up to one partition span).
    #[arg(long, env = "OUTBOX_RETENTION", default_value = "30d", value_parser = parse_duration)]
    pub retention: Duration,
    /// Time range of each outbox partition; the leader makes them two spans ahead, and retention
    /// drops them whole.
    #[arg(long, env = "OUTBOX_PARTITION_SPAN", default_value = "1d", value_parser = parse_duration)]
    pub partition_span: Duration,
    /// How often retention runs.
    #[arg(long, env = "RELAY_RETENTION_INTERVAL", default_value = "1m", value_parser = parse_duration)]
    pub retention_interval: Duration,
    /// How often a standby asks for the leader lock.
    #[arg(long, env = "RELAY_STANDBY_POLL", default_value = "1s", value_parser = parse_duration)]
    pub standby_poll: Duration,
    /// Advisory lock key that elects the leader; relays of one outbox share it.
    #[arg(long, env = "RELAY_LOCK_KEY", default_value_t = 0x6f75_7462_6f78_0002)]
    pub lock_key: i64,
    /// Consumer groups whose lag, as the broker sees it, every relay instance exports as
    /// `kafka_consumergroup_lag` (kafka-exporter's names), on the topics this relay publishes to;
    /// comma-separated, empty for none. The default is the consumer's default `CONSUMER_GROUP`.
    #[arg(
        long,
        env = "LAG_CONSUMER_GROUPS",
        default_value = "webhook-dispatcher",
        value_delimiter = ','
    )]
    pub lag_consumer_groups: Vec<String>,
    /// How often the groups' committed offsets and the partitions' high watermarks are read.
    #[arg(long, env = "LAG_POLL_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub lag_poll_interval: Duration,
}

/// Handles shared by the HTTP side and the workers.
#[derive(Clone)]
pub struct AppState {
    pub pool: PgPool,
    pub publisher: Arc<Publisher>,
    pub metrics: Metrics,
}

impl Operational for AppState {
    fn registry(&self) -> &prometheus::Registry {
        &self.metrics.registry
    }

    async fn readiness(&self) -> Readiness {
        let (postgres, kafka) = tokio::join!(
            db::is_reachable(&self.pool),
            self.publisher.kafka_reachable()
        );
        Readiness::of(&[("postgres", postgres), ("kafka", kafka)])
    }
}

/// The relay's connections, with four session settings:
/// - `synchronous_commit = off`: everything the relay writes is redone if lost (marks: the row
///   is sent again; retention: the rows are deleted next time), so its commits need not wait for
///   the WAL flush.
/// - `enable_seqscan = off`: each of its statements reads by index, and a plan must not read a
///   table row after row because the table looked empty when the plan was made. PostgreSQL
///   keeps one plan for a prepared statement once it judges that plan as good as planning anew,
///   with the estimates of that moment: a partition analyzed while empty (the relay makes them
///   ahead; an operator's `VACUUM ANALYZE` counts them) then has its sent facts read in full for
///   every event a claim looks up, until autovacuum analyzes it again.
/// - `plan_cache_mode = force_generic_plan`: the batch statements are planned once per connection.
///   Left to choose, PostgreSQL planned the claim again when it was bound, and under load such a
///   planning took 57 ms now and then (at 10,000 events/s offered, the two slowest claims of a
///   run, 105 ms each, were such a planning and the run after it; that run's p99 was 129 ms). The
///   claim is written to have one good plan whatever its values (see `CLAIM_CURSOR`).
/// - `max_parallel_workers_per_gather = 0`: the claim and the backlog gauge read index ranges,
///   but on a backlog of a few megabytes PostgreSQL planned parallel workers for them, each a
///   process forked for that one statement. In one drain of 200,000 events `perf` counted about
///   100 such processes in 4 s, together an eighth of the machine's CPU; the claim's kept plan
///   is parallel in some drains and not in others, and the gauge's always is.
pub fn pool(url: &str, size: usize) -> Result<PgPool, db::DbError> {
    db::pool_with_options(
        url,
        size,
        SCHEMAS,
        "-c synchronous_commit=off -c enable_seqscan=off -c plan_cache_mode=force_generic_plan \
         -c max_parallel_workers_per_gather=0",
    )
}

/// Runs the relay until `shutdown`: the health/metrics server, the backlog gauges, and the
/// leader election loop that publishes while it holds the lock. On shutdown the batch in flight
/// is finished and marked before the lock is released.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let routes = config.topics.routes().map_err(anyhow::Error::msg)?;
    let pool = pool(
        &config.database.database_url,
        config.database.database_pool_size,
    )?;
    let metrics = Metrics::new();
    // Series exist from the start at 0, so rate() and increase() see the first failure.
    for kind in ["transient", "permanent"] {
        metrics.failures.with_label_values(&[kind]);
    }
    for topic in routes.topics() {
        metrics.published.with_label_values(&[&topic]);
    }
    let publisher = Arc::new(Publisher::new(
        &config,
        routes.topics(),
        pool.clone(),
        metrics.clone(),
    )?);
    let state = AppState {
        pool: pool.clone(),
        publisher: publisher.clone(),
        metrics: metrics.clone(),
    };
    let app: Router = operational_routes::<AppState>().with_state(state);
    let server = tokio::spawn(outbox_core::http::serve(
        listener,
        app,
        config.http.clone(),
        shutdown.clone(),
    ));
    let gauges = tokio::spawn(metrics::refresh_backlog(
        pool.clone(),
        metrics.clone(),
        shutdown.clone(),
    ));

    let groups: Vec<String> = config
        .lag_consumer_groups
        .iter()
        .map(|g| g.trim().to_owned())
        .filter(|g| !g.is_empty())
        .collect();
    let group_lag = tokio::spawn(group_lag::export(
        config.kafka.kafka_brokers.clone(),
        groups,
        routes.topics(),
        config.lag_poll_interval,
        metrics.clone(),
        shutdown.clone(),
    ));

    if db::migrate_until_done(&pool, SCHEMAS, &shutdown).await
        && db::until_done("storing TOPIC_ROUTES", &shutdown, || routes.store(&pool))
            .await
            .is_some()
    {
        leader::elect_and_publish(&config, publisher.clone(), shutdown.clone()).await;
    }

    gauges.abort();
    group_lag.abort();
    publisher.flush();
    server.await?;
    Ok(())
}

impl Publisher {
    /// Waits (bounded) for records still queued in librdkafka.
    pub fn flush(&self) {
        let _ = self.producer().flush(Duration::from_secs(5));
    }
}
