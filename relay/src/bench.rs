//! What relay-bench and debezium-bench share: the workload both offer, and the relay they start
//! (in their own process, or as the `relay` binary beside them). relay-bench's PostgreSQL-only
//! ceiling runs [`crate::statements`].

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

/// The `relay` binary built beside the running benchmark, started as a process of its own (as it
/// is deployed, and as Debezium runs in Kafka Connect's), until [`Child::stop`].
pub struct Child {
    process: tokio::process::Child,
}

impl Child {
    /// Starts it on `database_url` and `brokers` with the workload's batch size and partitions,
    /// listening on a port of its own; it elects itself and publishes like any relay.
    pub async fn start(
        workload: &Workload,
        database_url: &str,
        brokers: &str,
    ) -> anyhow::Result<Self> {
        let exe = std::env::current_exe()?;
        let relay = exe.with_file_name("relay");
        anyhow::ensure!(
            relay.exists(),
            "{} is not built (cargo build --release -p relay --bin relay)",
            relay.display()
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let process = tokio::process::Command::new(&relay)
            .env("DATABASE_URL", database_url)
            .env("KAFKA_BROKERS", brokers)
            .env("RELAY_BATCH_SIZE", workload.batch_size.to_string())
            .env("TOPIC_PARTITIONS", workload.partitions.to_string())
            .env("LISTEN_ADDR", format!("127.0.0.1:{port}"))
            .env(
                "RUST_LOG",
                std::env::var("BENCH_RELAY_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .kill_on_drop(true)
            .spawn()?;
        Ok(Child { process })
    }

    /// Asks it to shut down (SIGTERM: it finishes the batch in flight and marks it) and waits.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(pid) = self.process.id() {
            let _ = tokio::process::Command::new("kill")
                .arg(pid.to_string())
                .status()
                .await;
        }
        let status = self.process.wait().await?;
        anyhow::ensure!(status.success(), "the relay ended with {status}");
        Ok(())
    }
}
