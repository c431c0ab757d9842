use clap::Parser;

/// The consumer: records Kafka events once and delivers them as signed webhooks, with retries, a
/// per-endpoint circuit breaker, dead letters and replay; admin API on LISTEN_ADDR.
#[derive(Parser)]
#[command(name = "consumer", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Option<outbox_core::service::Command>,
    #[command(flatten)]
    config: consumer::Config,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = cli.config;
    outbox_core::service::main(
        "consumer",
        cli.command,
        &config.database.database_url.clone(),
        consumer::SCHEMAS,
        &config.listen_addr.clone(),
        |listener, shutdown| consumer::run(config, listener, shutdown),
    )
    .await
}
