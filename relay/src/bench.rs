//! What relay-bench and debezium-bench share: the workload both offer and the relay they start in
//! their own process. (relay-bench's PostgreSQL-only ceiling runs [`crate::statements`].)

use tokio_util::sync::CancellationToken;

/// The workload of both relay benchmarks: a backlog of `events` envelopes of about
/// `payload_bytes` over `keys` aggregate keys, into topics of `partitions` partitions, drained by
/// a relay claiming `batch_size` rows a batch.
#[derive(Debug, Clone, clap::Args)]
pub struct Workload {
    /// Backlog size of each drain (debezium-bench first runs a warm-up drain of as many, for each
    /// system).
    #[arg(long, default_value_t = 200_000)]
    pub events: i64,
    /// Approximate size of each event's envelope, in bytes.
    #[arg(long, default_value_t = 1024)]
    pub payload_bytes: usize,
    /// Partitions of every benchmark topic.
    #[arg(long, default_value_t = 6)]
    pub partitions: i32,
    /// Distinct aggregate keys.
    #[arg(long, default_value_t = 1000)]
    pub keys: i64,
    /// Rows per relay batch (the relay's default, RELAY_BATCH_SIZE).
    #[arg(long, default_value_t = 4000)]
    pub batch_size: i64,
}

impl Workload {
    /// The relay's configuration for this workload (its batch size and topic partitions), on
    /// `database_url` and `brokers`; everything else as the environment (or its defaults) says.
    pub fn relay_config(&self, database_url: &str, brokers: &str) -> anyhow::Result<crate::Config> {
        let mut config: crate::Config = outbox_core::config::from_env()?;
        config.database.database_url = database_url.to_owned();
        config.kafka.kafka_brokers = brokers.to_owned();
        config.batch_size = self.batch_size;
        config.topic_partitions = self.partitions;
        Ok(config)
    }
}

/// A relay running in this process, on a port of its own, until [`InProcess::stop`].
pub struct InProcess {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl InProcess {
    /// Starts [`crate::run`] with `config` on a port of its own; it elects itself and publishes
    /// like any relay.
    pub async fn start(config: crate::Config) -> anyhow::Result<Self> {
        let stop = CancellationToken::new();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let task = tokio::spawn(crate::run(config, listener, stop.clone()));
        Ok(InProcess { stop, task })
    }

    /// Shuts the relay down (it finishes the batch in flight) and returns how its run ended.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.stop.cancel();
        self.task.await?
    }
}
