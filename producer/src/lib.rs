//! The producer: an HTTP API whose `POST /messages` writes the message row and its outbox event in
//! one PostgreSQL transaction, so an event exists if and only if its message does.

mod metrics;
mod openapi;
mod routes;
mod store;

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use std::time::Duration;

use outbox_core::config::{parse_duration, DatabaseArgs, HttpArgs};
use outbox_core::db::{self, PgPool};
use outbox_core::http::{Operational, Readiness};
use outbox_core::routing::{TopicArgs, TopicRoutes};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use metrics::Metrics;
pub use routes::{MessageList, OutboxList, OPEN_ROUTES};
pub use store::{CreatedMessage, MessageView, OutboxCounts, OutboxRow, Stats};

outbox_core::impl_service!(Config, SCHEMAS);

/// The PostgreSQL schemas this service uses (:Outbox:its demo domain, and the outbox it writes): its pool's `search_path`, and the
/// only migrations it applies.
pub const SCHEMAS: &[outbox_core::db::Schema] = &[
    outbox_core::db::Schema::Producer,
    outbox_core::db::Schema::Outbox,
];

/// The producer's configuration, from the environment (see `.env.example`).
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    #[command(flatten)]
    pub database: DatabaseArgs,
    #[command(flatten)]
    pub http: HttpArgs,
    /// Address the HTTP API listens on.
    #[arg(long, env = "LISTEN_ADDR", default_value = "127.0.0.1:8080")]
    pub listen_addr: String,
    #[command(flatten)]
    pub topics: TopicArgs,
    /// Written into every envelope's `metadata.environment`.
    #[arg(long, env = "ENVIRONMENT", default_value = "dev")]
    pub environment: String,
    /// Bearer token (`Authorization: Bearer <token>`) every route needs except `POST /messages`,
    /// `/openapi.json`, `/health`, `/ready` and `/metrics`; unset or empty: every route is open.
    #[arg(long, env = "ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Largest accepted request body in bytes.
    #[arg(long, env = "MAX_BODY_BYTES", default_value_t = 256 * 1024)]
    pub max_body_bytes: usize,
    /// How long an `Idempotency-Key` is remembered (as Svix does, a day by default). An older key
    /// is deleted and then accepted again as a new request.
    #[arg(long, env = "IDEMPOTENCY_KEY_RETENTION", default_value = "24h", value_parser = parse_duration)]
    pub idempotency_key_retention: Duration,
    /// How often expired idempotency keys are deleted (a thousand per statement).
    #[arg(long, env = "IDEMPOTENCY_KEY_RETENTION_INTERVAL", default_value = "1m", value_parser = parse_duration)]
    pub idempotency_key_retention_interval: Duration,
}

/// Handles shared by every request.
#[derive(Clone)]
pub struct AppState {
    pub pool: PgPool,
    pub routes: Arc<TopicRoutes>,
    pub config: Arc<Config>,
    pub metrics: Metrics,
}

impl Operational for AppState {
    fn registry(&self) -> &prometheus::Registry {
        &self.metrics.registry
    }

    async fn readiness(&self) -> Readiness {
        Readiness::of(&[("postgres", db::is_reachable(&self.pool).await)])
    }
}

/// Serves the API on `listener` until `shutdown` is cancelled. Migrations are applied in the
/// background, so the API starts (and reports not-ready) while PostgreSQL is still down.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let routes = config.topics.routes().map_err(anyhow::Error::msg)?;
    anyhow::ensure!(
        !config.environment.is_empty()
            && config
                .environment
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')),
        "ENVIRONMENT must be letters, digits, '-', '_' or '.'"
    );
    // outbox.publish writes this session setting into every envelope's metadata.environment.
    let pool = db::pool_with_options(
        &config.database.database_url,
        config.database.database_pool_size,
        SCHEMAS,
        &format!("-c outbox.environment={}", config.environment),
    )?;
    let state = AppState {
        pool: pool.clone(),
        routes: Arc::new(routes),
        metrics: Metrics::new(),
        config: Arc::new(config.clone()),
    };
    let background = {
        let shutdown = shutdown.clone();
        let metrics = state.metrics.clone();
        let routes = state.routes.clone();
        let retention = store::idempotency_key_retention(
            config.idempotency_key_retention,
            config.idempotency_key_retention_interval,
        );
        tokio::spawn(async move {
            if db::migrate_until_done(&pool, SCHEMAS, &shutdown).await
                && db::until_done("storing TOPIC_ROUTES", &shutdown, || routes.store(&pool))
                    .await
                    .is_some()
            {
                let deleted = |n| metrics.idempotency_keys_deleted.inc_by(n);
                retention.run_every_interval(pool, deleted, shutdown).await;
            }
        })
    };
    let app = routes::router(state).layer(DefaultBodyLimit::max(config.max_body_bytes));
    outbox_core::http::serve(listener, app, config.http, shutdown).await;
    background.abort();
    Ok(())
}
