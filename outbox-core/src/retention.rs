//! Retention, written once: a task that deletes expired rows every interval, a bounded batch per
//! statement, so a large backlog never holds many row locks or competes with the service's own
//! writes for long. The relay (sent outbox rows) and the producer (idempotency keys) use it.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::db::{DbError, PgPool};

/// Pause between batches, so a large backlog is deleted without hogging the database.
const BREATHER: Duration = Duration::from_millis(20);

/// Expired rows of one kind and how to delete them.
#[derive(Debug, Clone)]
pub struct BatchDelete {
    /// What is deleted, for logs: `"idempotency keys"`.
    pub what: &'static str,
    /// One statement that deletes at most `$2` (bigint) rows older than `$1` (bigint)
    /// milliseconds and answers one row holding how many it deleted (bigint).
    pub sql: &'static str,
    /// Rows are kept at least this long.
    pub retention: Duration,
    /// Rows deleted per statement.
    pub batch: i64,
    /// Pause between passes: a row lives at most about `retention + interval`.
    pub interval: Duration,
}

impl BatchDelete {
    /// Runs until `shutdown`: a pass at once, then one every `interval`. A failed pass
    /// (PostgreSQL down) is logged and tried again at the next interval. `on_deleted` is told
    /// each batch's count as it commits (for a metric).
    pub async fn run_every_interval(
        self,
        pool: PgPool,
        on_deleted: impl Fn(u64),
        shutdown: CancellationToken,
    ) {
        while !shutdown.is_cancelled() {
            match self.delete_expired(&pool, &on_deleted, &shutdown).await {
                Ok(0) => {}
                Ok(deleted) => tracing::info!(deleted, what = self.what, "retention deleted"),
                Err(error) => tracing::warn!(
                    %error,
                    what = self.what,
                    "retention pass failed; retried next interval"
                ),
            }
            crate::shutdown::sleep_or_cancel(self.interval, &shutdown).await;
        }
    }

    /// One pass: deletes batch after batch until one deletes fewer than `batch` rows or
    /// `shutdown` is cancelled (a batch is never cut short). Answers the rows deleted.
    pub async fn delete_expired(
        &self,
        pool: &PgPool,
        on_deleted: impl Fn(u64),
        shutdown: &CancellationToken,
    ) -> Result<u64, DbError> {
        let retention_ms = self.retention.as_millis().min(i64::MAX as u128) as i64;
        let mut total = 0;
        loop {
            let row = pool
                .get()
                .await?
                .query_one(self.sql, &[&retention_ms, &self.batch])
                .await?;
            let deleted = row.get::<_, i64>(0).max(0);
            on_deleted(deleted as u64);
            total += deleted as u64;
            if deleted < self.batch || shutdown.is_cancelled() {
                return Ok(total);
            }
            tokio::time::sleep(BREATHER).await;
        }
    }
}
