use clap::Parser;

/// The notifier: receives signed webhooks, refuses replays and duplicates, stores the events and
/// notifies by email and chat behind a circuit breaker per channel.
#[derive(Parser)]
#[command(name = "notifier", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Option<outbox_core::service::Command>,
    #[command(flatten)]
    config: notifier::Config,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = cli.config;
    outbox_core::service::main(
        "notifier",
        cli.command,
        &config.database.database_url.clone(),
        notifier::SCHEMAS,
        &config.listen_addr.clone(),
        |listener, shutdown| notifier::run(config, listener, shutdown),
    )
    .await
}
