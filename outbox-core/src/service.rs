//! The start-up every binary shares: logs, the `migrate` subcommand, binding, signals.

use std::future::Future;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// What a binary was asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::Subcommand)]
pub enum Command {
    /// Apply the database migrations in sql/ and exit.
    Migrate,
    /// Run the service (the default).
    Serve,
}

/// Runs a service binary: JSON logs, then either applies migrations and exits, or binds
/// `listen_addr` and calls `run` until SIGTERM/Ctrl-C.
pub async fn main<F, Fut>(
    name: &str,
    command: Option<Command>,
    database_url: &str,
    schemas: &[crate::db::Schema],
    listen_addr: &str,
    run: F,
) -> anyhow::Result<()>
where
    F: FnOnce(TcpListener, CancellationToken) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    crate::telemetry::init_service(name);
    // The password never reaches the logs.
    let database = crate::config::mask_password(database_url);
    if command == Some(Command::Migrate) {
        let pool = crate::db::pool(database_url, 1, schemas)?;
        let applied = crate::db::migrate(&pool, schemas).await?;
        tracing::info!(service = name, %database, ?applied, "migrations are up to date");
        return Ok(());
    }
    let listener = crate::http::bind(listen_addr).await?;
    tracing::info!(
        service = name,
        listen_addr,
        %database,
        version = env!("CARGO_PKG_VERSION"),
        "starting"
    );
    let result = run(listener, crate::shutdown::on_signal()).await;
    crate::telemetry::shutdown();
    match &result {
        Ok(()) => tracing::info!(service = name, "stopped"),
        Err(error) => {
            tracing::error!(service = name, error = %format!("{error:#}"), "stopped with an error")
        }
    }
    result
}
