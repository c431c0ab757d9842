//! The consumer: a Kafka consumer group that records each event once (the inbox), plans one
//! delivery per subscribed endpoint in the same PostgreSQL transaction, and only then commits the
//! Kafka offsets; dispatchers send the deliveries as signed webhooks with retries, a per-endpoint
//! circuit breaker shared through PostgreSQL, dead letters and replay. An admin API manages
//! endpoints, deliveries and breakers.

mod admin;
pub mod delivery;
pub mod dispatch;
pub mod endpoints;
pub mod ingest;
mod metrics;
pub mod retention;
pub mod special_address;
mod trace_context;
pub mod webhook_client;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use outbox_core::breaker::BreakerPolicy;
use outbox_core::config::{parse_duration, DatabaseArgs, HttpArgs, KafkaArgs};
use outbox_core::db::{self, PgPool};
use outbox_core::http::{Operational, Readiness};
use outbox_core::schedule::RetrySchedule;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

pub use admin::OPEN_ROUTES;
pub use metrics::Metrics;

outbox_core::impl_service!(Config, SCHEMAS);

/// The PostgreSQL schemas this service uses (its own tables; it can run on a database of its own): its pool's `search_path`, and the
/// only migrations it applies.
pub const SCHEMAS: &[outbox_core::db::Schema] = &[outbox_core::db::Schema::Webhooks];

/// The consumer's connections, with two session settings:
/// - `plan_cache_mode = force_generic_plan`: a prepared statement (the ones every batch runs) is
///   planned once per connection, not at each run. Replanning them was most of what they cost:
///   at 500 events/s end to end, recording a batch took 0.57 ms, 0.21 ms of it without planning,
///   and PostgreSQL used 110 % of a core instead of 119 %. (Other statements are planned for
///   their values, as before.)
/// - `enable_seqscan = off`: a kept plan must not read a table row after row because the table
///   looked empty when the plan was made (autovacuum analyzes a young table after its first 50
///   changes). PostgreSQL keeps such plans by itself too: the one that writes a batch's results
///   read every delivery kept to find the batch's few until the next analyze (1.2-1.4 ms a batch
///   measured end to end, the consumer's costliest statement). Each statement also names the
///   keys it reads (`id = any(...)`), so that no index is read whole instead. Small tables
///   (endpoints) are still read whole when that is the only way.
pub fn pool(url: &str, size: usize) -> Result<outbox_core::db::PgPool, outbox_core::db::DbError> {
    outbox_core::db::pool_with_options(
        url,
        size,
        SCHEMAS,
        "-c enable_seqscan=off -c plan_cache_mode=force_generic_plan",
    )
}

/// The consumer's configuration, from the environment (see `.env.example`).
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    #[command(flatten)]
    pub database: DatabaseArgs,
    #[command(flatten)]
    pub kafka: KafkaArgs,
    #[command(flatten)]
    pub http: HttpArgs,
    /// Address of the admin API, health and metrics.
    #[arg(long, env = "LISTEN_ADDR", default_value = "127.0.0.1:8082")]
    pub listen_addr: String,
    /// Kafka consumer group id; every instance of one deployment uses the same.
    #[arg(long, env = "CONSUMER_GROUP", default_value = "webhook-dispatcher")]
    pub consumer_group: String,
    /// Topics to consume, comma-separated.
    #[arg(
        long,
        env = "CONSUMER_TOPICS",
        default_value = "messages",
        value_delimiter = ','
    )]
    pub consumer_topics: Vec<String>,
    /// Most Kafka records recorded in one PostgreSQL transaction.
    #[arg(long, env = "CONSUMER_BATCH_SIZE", default_value_t = 500)]
    pub consumer_batch_size: usize,
    /// How often the offsets of recorded batches are committed to Kafka (they are stored after
    /// each recording transaction, and committed at this interval and at a stop). A crash
    /// re-reads at most this much, which the inbox drops; committing after every batch cost the
    /// broker a write per batch.
    #[arg(long, env = "CONSUMER_COMMIT_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub consumer_commit_interval: Duration,
    /// How often librdkafka reports statistics, from which the consumer lag gauge comes.
    #[arg(long, env = "KAFKA_STATISTICS_INTERVAL", default_value = "5s", value_parser = parse_duration)]
    pub kafka_statistics_interval: Duration,
    /// Delay before each attempt of a delivery, comma-separated; after the last failure it is dead.
    #[arg(long, env = "RETRY_SCHEDULE", default_value = RetrySchedule::DEFAULT)]
    pub retry_schedule: RetrySchedule,
    /// Spread of each retry delay, as a fraction (0.2 = ±20%).
    #[arg(long, env = "RETRY_JITTER", default_value_t = 0.2)]
    pub retry_jitter: f64,
    /// Longest time one webhook request may take (connect, headers and the read body).
    #[arg(long, env = "DELIVERY_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub delivery_timeout: Duration,
    #[command(flatten)]
    pub breaker: outbox_core::config::BreakerArgs,
    /// Accept endpoint URLs on private, loopback, link-local and other special-purpose addresses
    /// (local stacks, tests). When false, such addresses are refused when an endpoint is created
    /// and again at every connection, for IP literals and resolved names alike.
    #[arg(
        long,
        env = "ALLOW_PRIVATE_ENDPOINTS",
        default_value_t = false,
        action = clap::ArgAction::Set,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub allow_private_endpoints: bool,
    /// HTTP(S) proxy for webhooks, e.g. `http://proxy.internal:3128`; unset: webhooks connect
    /// directly (`HTTP_PROXY`, `HTTPS_PROXY` and `ALL_PROXY` are ignored). With a proxy, each
    /// endpoint's name is resolved and checked before the request is handed over, and the proxy
    /// is trusted to resolve it to the same addresses; the proxy's own address is not checked.
    #[arg(long, env = "WEBHOOK_PROXY", hide_env_values = true)]
    pub webhook_proxy: Option<String>,
    /// Bearer token (`Authorization: Bearer <token>`) every admin route needs (all but `/health`,
    /// `/ready` and `/metrics`); unset or empty: the admin API is open.
    #[arg(long, env = "ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// JSON file of endpoints upserted at start-up:
    /// `[{"id", "url", "event_types", "description"?, "secret"?}]`.
    #[arg(long, env = "ENDPOINTS_FILE")]
    pub endpoints_file: Option<PathBuf>,
    /// Webhook requests in flight at once, over all endpoints.
    #[arg(long, env = "DELIVERY_CONCURRENCY", default_value_t = 256)]
    pub delivery_concurrency: usize,
    /// Webhook requests in flight at once to one endpoint.
    #[arg(long, env = "ENDPOINT_CONCURRENCY", default_value_t = 64)]
    pub endpoint_concurrency: usize,
    /// Dispatcher loops per instance, each claiming, sending and recording its own batches (retries,
    /// overflow), and as many fast lanes sending new deliveries straight from ingest.
    #[arg(long, env = "DISPATCH_WORKERS", default_value_t = 4)]
    pub dispatch_workers: usize,
    /// Deliveries claimed per dispatcher batch.
    #[arg(long, env = "DISPATCH_BATCH_SIZE", default_value_t = 500)]
    pub dispatch_batch_size: i64,
    /// How often an idle dispatcher looks for due deliveries (new events wake it at once).
    #[arg(long, env = "DISPATCH_POLL_INTERVAL", default_value = "200ms", value_parser = parse_duration)]
    pub dispatch_poll_interval: Duration,
    /// How long a claimed delivery belongs to the instance that claimed it; after a crash it is
    /// sent again once this has passed. Unsent deliveries of a batch are handed back before it ends.
    #[arg(long, env = "DELIVERY_LEASE", default_value = "2m", value_parser = parse_duration)]
    pub delivery_lease: Duration,
    /// How long the previous secret keeps signing after a rotation.
    #[arg(long, env = "SECRET_ROTATION_GRACE", default_value = "24h", value_parser = parse_duration)]
    pub secret_rotation_grace: Duration,
    /// Largest accepted admin request body in bytes.
    #[arg(long, env = "MAX_BODY_BYTES", default_value_t = 64 * 1024)]
    pub max_body_bytes: usize,
    /// Succeeded and dead deliveries (with their attempts) last updated longer ago than this are
    /// deleted, and inbox rows received longer ago that have no delivery left. Kafka records
    /// redelivered within this window are still recognised as duplicates.
    #[arg(long, env = "CONSUMER_RETENTION", default_value = "30d", value_parser = parse_duration)]
    pub consumer_retention: Duration,
    /// How often retention runs.
    #[arg(long, env = "CONSUMER_RETENTION_INTERVAL", default_value = "1h", value_parser = parse_duration)]
    pub consumer_retention_interval: Duration,
}

impl Config {
    /// The breaker thresholds, a probe being one delivery.
    pub fn breaker_policy(&self) -> BreakerPolicy {
        self.breaker.policy(self.delivery_timeout)
    }
}

/// Handles shared by the admin API and the workers.
#[derive(Clone)]
pub struct AppState {
    pub pool: PgPool,
    pub config: Arc<Config>,
    pub metrics: Metrics,
    /// Set once the migrations are applied; until then the consumer is not ready.
    pub migrated: Arc<AtomicBool>,
    /// Kafka client used for the readiness check (the consuming client itself).
    pub kafka: Arc<ingest::KafkaConsumer>,
    /// Wakes the dispatchers when new deliveries (or replays) are recorded.
    pub wake: Arc<Notify>,
}

impl Operational for AppState {
    fn registry(&self) -> &prometheus::Registry {
        &self.metrics.registry
    }

    async fn readiness(&self) -> Readiness {
        let (postgres, kafka) = tokio::join!(
            db::is_reachable(&self.pool),
            outbox_core::kafka::is_reachable(self.kafka.clone(), |c| {
                rdkafka::consumer::Consumer::client(&**c)
            })
        );
        Readiness::of(&[
            ("postgres", postgres),
            ("migrations", self.migrated.load(Ordering::Acquire)),
            ("kafka", kafka),
        ])
    }
}

/// Runs the consumer until `shutdown`: the admin API, the Kafka consumer loop and the dispatchers.
///
/// Fails only on a configuration error (bad endpoints file, invalid Kafka settings). While
/// PostgreSQL or Kafka is down it keeps running, reports not-ready and resumes by itself. On
/// shutdown the ingest batch in hand is recorded (or left uncommitted in Kafka) and every
/// dispatcher finishes and records the batch it is sending.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        config.delivery_lease > config.delivery_timeout,
        "DELIVERY_LEASE ({:?}) must be longer than DELIVERY_TIMEOUT ({:?}): a delivery is only sent \
         while its lease outlasts the request",
        config.delivery_lease,
        config.delivery_timeout
    );
    let declared = match &config.endpoints_file {
        Some(path) => endpoints::read_file(path, config.allow_private_endpoints)?,
        None => Vec::new(),
    };
    let pool = pool(
        &config.database.database_url,
        config.database.database_pool_size,
    )?;
    let metrics = Metrics::new();
    metrics.init_series(
        &config.consumer_topics,
        declared.iter().map(|e| e.id.as_str()),
    );
    let kafka = Arc::new(ingest::create_consumer(&config, metrics.clone())?);
    let state = AppState {
        pool: pool.clone(),
        config: Arc::new(config.clone()),
        metrics: metrics.clone(),
        migrated: Arc::new(AtomicBool::new(false)),
        kafka: kafka.clone(),
        wake: Arc::new(Notify::new()),
    };
    let dispatcher = Arc::new(dispatch::Dispatcher::new(
        &config,
        pool.clone(),
        metrics.clone(),
        state.wake.clone(),
    )?);

    let app = admin::router(state.clone()).layer(DefaultBodyLimit::max(config.max_body_bytes));
    // Dropping `run` (a test aborting it, like a crash) stops every task it started.
    let server = AbortOnDrop(tokio::spawn(outbox_core::http::serve(
        listener,
        app,
        config.http.clone(),
        shutdown.clone(),
    )));

    let workers = AbortOnDrop({
        let state = state.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            if !db::migrate_until_done(&state.pool, SCHEMAS, &shutdown).await {
                return;
            }
            state.migrated.store(true, Ordering::Release);
            if !endpoints::upsert_declared_until_done(
                &state.pool,
                &declared,
                state.config.secret_rotation_grace,
                &shutdown,
            )
            .await
            {
                return;
            }
            let _gauges = AbortOnDrop(tokio::spawn(metrics::refresh_gauges(
                state.pool.clone(),
                state.metrics.clone(),
                shutdown.clone(),
            )));
            let _retention = AbortOnDrop(tokio::spawn(retention::run(
                state.pool.clone(),
                state.config.consumer_retention,
                state.config.consumer_retention_interval,
                state.metrics.clone(),
                shutdown.clone(),
            )));
            // Dropped without `finish` only when `run` is aborted: then the shares stop too.
            let _crash = dispatcher.crash_guard();
            let workers = state.config.dispatch_workers.max(1);
            let mut dispatchers = tokio::task::JoinSet::new();
            for worker in 0..workers {
                let dispatcher = dispatcher.clone();
                let shutdown = shutdown.clone();
                dispatchers.spawn(async move { dispatcher.work(worker, shutdown).await });
            }
            // Fast lanes: new deliveries, leased as they are recorded, sent without a claim.
            // They end once ingest stops and the batches handed to them are recorded.
            let (lanes, leased) = tokio::sync::mpsc::channel::<ingest::Leased>(workers);
            let leased = Arc::new(tokio::sync::Mutex::new(leased));
            for _ in 0..workers {
                let (dispatcher, leased, shutdown) =
                    (dispatcher.clone(), leased.clone(), shutdown.clone());
                dispatchers.spawn(async move {
                    loop {
                        let next = leased.lock().await.recv().await;
                        let Some(batch) = next else { break };
                        dispatcher
                            .deliver(batch.deliveries, batch.until, &shutdown)
                            .await;
                    }
                });
            }
            ingest::consume(
                state.kafka.clone(),
                &state.config,
                state.pool.clone(),
                state.metrics.clone(),
                state.wake.clone(),
                lanes,
                shutdown.clone(),
            )
            .await;
            while dispatchers.join_next().await.is_some() {}
            dispatcher.finish().await;
        })
    });

    server.join().await?;
    // The server stops on shutdown; the workers finish their batches before we return.
    workers.join().await?;
    Ok(())
}

/// A task that is aborted when its handle is dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> AbortOnDrop<T> {
    async fn join(mut self) -> Result<T, tokio::task::JoinError> {
        (&mut self.0).await
    }
}

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}
