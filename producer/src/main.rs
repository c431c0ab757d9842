use clap::Parser;

/// The producer: `POST /messages` writes the message and its outbox event in one transaction.
#[derive(Parser)]
#[command(name = "producer", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Option<outbox_core::service::Command>,
    #[command(flatten)]
    config: producer::Config,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = cli.config;
    outbox_core::service::main(
        "producer",
        cli.command,
        &config.database.database_url.clone(),
        producer::SCHEMAS,
        &config.listen_addr.clone(),
        |listener, shutdown| producer::run(config, listener, shutdown),
    )
    .await
}
