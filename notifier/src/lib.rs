//! The notifier: the reference webhook receiver. It verifies signatures (either header convention,
//! any of several secrets), refuses stale timestamps and duplicates, stores the events it accepts,
//! and for `POST /webhooks/notify` sends a notification by email (SMTP) and chat (Telegram Bot API
//! style), each channel behind its own circuit breaker shared by every instance.

mod channels;
mod metrics;
mod routes;
mod store;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use outbox_core::breaker::BreakerPolicy;
use outbox_core::config::{parse_duration, DatabaseArgs, HttpArgs};
use outbox_core::db::{self, PgPool};
use outbox_core::http::{Operational, Readiness};
use outbox_core::signature::{Secret, Verifier};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

pub use channels::{Channel, ChannelError};
pub use metrics::Metrics;
pub use routes::OPEN_ROUTES;
pub use store::{Notification, ReceivedEvent};

outbox_core::impl_service!(Config, SCHEMAS);

/// The PostgreSQL schemas this service uses (its own tables; it can run on a database of its own): its pool's `search_path`, and the
/// only migrations it applies.
pub const SCHEMAS: &[outbox_core::db::Schema] = &[outbox_core::db::Schema::Notifier];

/// One or more webhook secrets, as `WEBHOOK_SECRET` holds them (`whsec_…`, comma-separated).
#[derive(Debug, Clone)]
pub struct Secrets(pub Vec<Secret>);

/// Parses `WEBHOOK_SECRET`; refuses an empty list, so the notifier never accepts unsigned webhooks.
pub fn parse_secrets(text: &str) -> Result<Secrets, String> {
    let secrets = Secret::parse_list(text).map_err(|e| e.to_string())?;
    if secrets.is_empty() {
        return Err("at least one whsec_… secret is required".into());
    }
    Ok(Secrets(secrets))
}

/// Reads `WEBHOOK_SECRET` with [`parse_secrets`]; a refusal names the setting and the fault but
/// not the value, which may be a real secret with a typo.
#[derive(Debug, Clone, Copy)]
pub struct SecretsParser;

impl clap::builder::TypedValueParser for SecretsParser {
    type Value = Secrets;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        _arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<Secrets, clap::Error> {
        let refuse = |why: &str| {
            clap::Error::raw(
                clap::error::ErrorKind::ValueValidation,
                format!("WEBHOOK_SECRET (--webhook-secret) is invalid: {why}\n"),
            )
            .with_cmd(cmd)
        };
        let text = value.to_str().ok_or_else(|| refuse("it is not UTF-8"))?;
        parse_secrets(text).map_err(|e| refuse(&e))
    }
}

/// The notifier's configuration, from the environment (see `.env.example`).
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    #[command(flatten)]
    pub database: DatabaseArgs,
    #[command(flatten)]
    pub http: HttpArgs,
    /// Address the HTTP API listens on.
    #[arg(long, env = "LISTEN_ADDR", default_value = "127.0.0.1:8083")]
    pub listen_addr: String,
    /// Webhook signing secrets, `whsec_…`, comma-separated; a webhook signed by any one is accepted
    /// (list the new and the old secret while rotating).
    #[arg(long, env = "WEBHOOK_SECRET", value_parser = SecretsParser, hide_env_values = true)]
    pub webhook_secret: Secrets,
    /// Largest accepted distance between a webhook's timestamp and now (anti-replay).
    #[arg(long, env = "WEBHOOK_TOLERANCE", default_value = "5m", value_parser = parse_duration)]
    pub webhook_tolerance: Duration,
    #[command(flatten)]
    pub breaker: outbox_core::config::BreakerArgs,
    /// SMTP server for email notifications (plain SMTP, no TLS); unset: no email channel.
    #[arg(long, env = "SMTP_HOST")]
    pub smtp_host: Option<String>,
    /// Port of the SMTP server.
    #[arg(long, env = "SMTP_PORT", default_value_t = 25)]
    pub smtp_port: u16,
    /// Sender address of notification emails.
    #[arg(
        long,
        env = "SMTP_FROM",
        default_value = "Outbox notifier <notifier@localhost>"
    )]
    pub smtp_from: String,
    /// Recipients of notification emails, comma-separated; required when SMTP_HOST is set.
    #[arg(long, env = "SMTP_TO")]
    pub smtp_to: Option<String>,
    /// Base URL of the chat Bot API; messages go to POST {base}/bot{token}/sendMessage.
    #[arg(long, env = "CHAT_API_URL", default_value = "https://api.telegram.org")]
    pub chat_api_url: String,
    /// Bot token of the chat channel; unset: no chat channel.
    #[arg(long, env = "CHAT_BOT_TOKEN", hide_env_values = true)]
    pub chat_bot_token: Option<String>,
    /// Chat that receives the notifications; required when CHAT_BOT_TOKEN is set. Group chats
    /// have negative ids, so a leading '-' is part of the value.
    #[arg(long, env = "CHAT_ID", allow_hyphen_values = true)]
    pub chat_id: Option<String>,
    /// Longest time one notification (one SMTP session or one chat request) may take.
    #[arg(long, env = "NOTIFY_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub notify_timeout: Duration,
    /// Bearer token (`Authorization: Bearer <token>`) the read and admin routes need (stored
    /// events, notifications, breakers and their reset); the webhook routes, `/openapi.json`,
    /// `/health`, `/ready` and `/metrics` stay open. Unset or empty: every route is open.
    #[arg(long, env = "ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Largest accepted webhook body in bytes.
    #[arg(long, env = "MAX_BODY_BYTES", default_value_t = 1024 * 1024)]
    pub max_body_bytes: usize,
}

/// Handles shared by every request.
#[derive(Clone)]
pub struct AppState {
    pub pool: PgPool,
    pub verifier: Arc<Verifier>,
    /// The configured channels, email first.
    pub channels: Arc<Vec<Channel>>,
    pub policy: BreakerPolicy,
    pub metrics: Metrics,
    /// Set once the migrations are applied; until then the notifier is not ready.
    pub migrated: Arc<AtomicBool>,
    /// Bounds concurrent notifications: each holds one pooled connection for as long as its
    /// channels take, so without a bound a burst of slow sends would leave none for the other
    /// routes.
    pub notify_slots: Arc<Semaphore>,
}

impl Operational for AppState {
    fn registry(&self) -> &prometheus::Registry {
        &self.metrics.registry
    }

    async fn readiness(&self) -> Readiness {
        Readiness::of(&[
            ("postgres", db::is_reachable(&self.pool).await),
            ("migrations", self.migrated.load(Ordering::Acquire)),
        ])
    }
}

/// Serves the API on `listener` until `shutdown` is cancelled, then lets in-flight webhooks finish.
/// Fails only on a configuration error; while PostgreSQL is down the notifier runs, answers 503
/// and reports not-ready, and applies the migrations in the background once it is back.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let channels = channels::from_config(&config)?;
    let pool = config.database.pool(SCHEMAS)?;
    let metrics = Metrics::new(&[routes::LOGGER, routes::NOTIFY]);
    let state = AppState {
        pool: pool.clone(),
        verifier: Arc::new(Verifier::new(
            config.webhook_secret.0.clone(),
            config.webhook_tolerance,
        )),
        channels: Arc::new(channels),
        // A probe is one notification.
        policy: config.breaker.policy(config.notify_timeout),
        metrics: metrics.clone(),
        migrated: Arc::new(AtomicBool::new(false)),
        notify_slots: Arc::new(Semaphore::new(
            (config.database.database_pool_size / 2).max(1),
        )),
    };
    tracing::info!(
        channels = ?state.channels.iter().map(Channel::name).collect::<Vec<_>>(),
        "notification channels"
    );
    let background = {
        let state = state.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            if db::migrate_until_done(&state.pool, SCHEMAS, &shutdown).await {
                state.migrated.store(true, Ordering::Release);
            }
            metrics::refresh_breaker_gauges(&state, &shutdown).await;
        })
    };
    let app = routes::router(state, config.max_body_bytes, config.admin_token.as_deref());
    outbox_core::http::serve(listener, app, config.http, shutdown).await;
    background.abort();
    Ok(())
}
