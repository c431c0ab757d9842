use clap::Parser;

/// The relay: publishes outbox rows to Kafka; one leader, hot standbys.
#[derive(Parser)]
#[command(name = "relay", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Option<outbox_core::service::Command>,
    #[command(flatten)]
    config: relay::Config,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = cli.config;
    outbox_core::service::main(
        "relay",
        cli.command,
        &config.database.database_url.clone(),
        relay::SCHEMAS,
        &config.listen_addr.clone(),
        |listener, shutdown| relay::run(config, listener, shutdown),
    )
    .await
}
