//! The `relay` binary; its command line is [`relay::Config`] (`relay --help`).

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    outbox_core::service::run(relay::run).await
}
