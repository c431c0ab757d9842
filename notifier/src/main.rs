//! The `notifier` binary; its command line is [`notifier::Config`] (`notifier --help`).

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    outbox_core::service::run(notifier::run).await
}
