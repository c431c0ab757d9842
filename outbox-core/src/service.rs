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

/// What the command line and the logs call a service binary.
#[derive(Debug, Clone, Copy)]
pub struct Binary {
    /// The binary's name, in `--help` and the logs.
    pub name: &'static str,
    /// What `--help` says the service does.
    pub about: &'static str,
    /// The schemas its pool uses and its migrations apply.
    pub schemas: &'static [crate::db::Schema],
}

impl Binary {
    pub const fn new(
        name: &'static str,
        about: &'static str,
        schemas: &'static [crate::db::Schema],
    ) -> Self {
        Self {
            name,
            about,
            schemas,
        }
    }
}

/// The [`Binary`] of the crate this is written in: named after the crate, its `--help` saying
/// what the crate's description says, using `$schemas`.
#[macro_export]
macro_rules! this_binary {
    ($schemas:expr) => {
        $crate::service::Binary::new(
            env!("CARGO_PKG_NAME"),
            env!("CARGO_PKG_DESCRIPTION"),
            $schemas,
        )
    };
}

/// Implements [`Service`] for `$config`, a configuration with the fields `database`
/// ([`crate::config::DatabaseArgs`]) and `listen_addr`, as the binary of the crate this is
/// written in ([`this_binary!`](crate::this_binary)) using `$schemas`.
#[macro_export]
macro_rules! impl_service {
    ($config:ty, $schemas:expr) => {
        impl $crate::service::Service for $config {
            const BINARY: $crate::service::Binary = $crate::this_binary!($schemas);
            fn database_url_and_listen_addr(&self) -> (&str, &str) {
                (&self.database.database_url, &self.listen_addr)
            }
        }
    };
}

/// A service's configuration, as the command line and environment give it to [`run`].
pub trait Service: clap::Args {
    /// The binary this configuration starts.
    const BINARY: Binary;

    /// The PostgreSQL URL `migrate` applies the migrations to, and the address to bind.
    fn database_url_and_listen_addr(&self) -> (&str, &str);
}

/// The command line every service binary takes: an optional subcommand and its configuration.
#[derive(clap::Parser)]
#[command(version, long_about = None)]
struct Cli<C: clap::Args> {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    config: C,
}

/// The whole `main` of a service binary: parses the command line and environment (exiting with
/// clap's message on bad input, or after `--help`), then does what [`main`] does with `serve`.
pub async fn run<S, F, Fut>(serve: F) -> anyhow::Result<()>
where
    S: Service,
    F: FnOnce(S, TcpListener, CancellationToken) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    use clap::{CommandFactory, FromArgMatches};
    let binary = S::BINARY;
    let mut command = Cli::<S>::command().name(binary.name).about(binary.about);
    let cli = command
        .try_get_matches_from_mut(std::env::args_os())
        .and_then(|mut matches| Cli::<S>::from_arg_matches_mut(&mut matches))
        .unwrap_or_else(|error| error.format(&mut command).exit());
    let config = cli.config;
    let (database_url, listen_addr) = config.database_url_and_listen_addr();
    let (database_url, listen_addr) = (database_url.to_owned(), listen_addr.to_owned());
    main(
        binary.name,
        cli.command,
        &database_url,
        binary.schemas,
        &listen_addr,
        |listener, shutdown| serve(config, listener, shutdown),
    )
    .await
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
