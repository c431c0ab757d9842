//! The `consumer` binary; its command line is [`consumer::Config`] (`consumer --help`).

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    outbox_core::service::run(consumer::run).await
}
