//! What relay-bench and debezium-bench share: the workload both offer, and the relay's claim and
//! mark statements for relay-bench's PostgreSQL-only ceiling.

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

/// The relay's claim and mark statements, as the relay prepares them.
pub mod statements {
    pub use crate::publish::{Cursor, CLAIM_CURSOR, LOAD_CURSOR, MARK_BATCH, SNAPSHOT_XMIN};
}
