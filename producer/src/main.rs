//! The `producer` binary; its command line is [`producer::Config`] (`producer --help`).

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    outbox_core::service::run(producer::run).await
}
