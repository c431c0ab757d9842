//! Deletes sent rows older than `OUTBOX_RETENTION`, a small batch at a time, so the delete never
//! holds many row locks or competes with publishing for long. A row was created before it was
//! sent, so `created_at` (BRIN-indexed) narrows the search to old rows.

use std::time::Duration;

use outbox_core::db::PgPool;
use tokio_util::sync::CancellationToken;

use crate::leader::sleep_or_cancel;
use crate::Metrics;

const BATCH: i64 = 1000;

/// Returns the number of outbox rows deleted, their envelopes with them.
const DELETE_OLD_SENT: &str = "
    with gone as (
        delete from outbox where id in (
            select id from outbox
             where created_at < now() - ($1::bigint * interval '1 millisecond')
               and state = 'E' and sent_at < now() - ($1::bigint * interval '1 millisecond')
             limit $2)
        returning id
    ), envelopes as (
        delete from outbox_payloads where outbox_id in (select id from gone)
    )
    select count(*) from gone";

/// Runs until `stop` (leadership ends): every `interval`, deletes old sent rows in batches.
pub async fn run(
    pool: PgPool,
    retention: Duration,
    interval: Duration,
    metrics: Metrics,
    stop: CancellationToken,
) {
    let retention_ms = retention.as_millis().min(i64::MAX as u128) as i64;
    while !stop.is_cancelled() {
        loop {
            let deleted = match pool.get().await {
                Ok(client) => client
                    .query_one(DELETE_OLD_SENT, &[&retention_ms, &BATCH])
                    .await
                    .map(|row| row.get::<_, i64>(0).max(0) as u64),
                Err(error) => {
                    tracing::warn!(%error, "retention skipped: PostgreSQL unavailable");
                    break;
                }
            };
            match deleted {
                Ok(n) => {
                    metrics.retention_deleted.inc_by(n);
                    if n > 0 {
                        tracing::info!(deleted = n, "retention deleted old sent rows");
                    }
                    if (n as i64) < BATCH || stop.is_cancelled() {
                        break;
                    }
                    // Let publishing have the database between batches.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(error) => {
                    tracing::warn!(%error, "retention delete failed");
                    break;
                }
            }
        }
        sleep_or_cancel(interval, &stop).await;
    }
}
