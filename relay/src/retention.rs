//! Deletes sent rows older than `OUTBOX_RETENTION`, a small batch at a time, so the delete never
//! holds many row locks or competes with publishing for long. A row was created before it was
//! sent, so `created_at` (BRIN-indexed) narrows the search to old rows.

use std::time::Duration;

use outbox_core::db::PgPool;
use outbox_core::retention::BatchDelete;
use tokio_util::sync::CancellationToken;

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
    BatchDelete {
        what: "sent outbox rows",
        sql: DELETE_OLD_SENT,
        retention,
        batch: BATCH,
        interval,
    }
    .run_every_interval(pool, |n| metrics.retention_deleted.inc_by(n), stop)
    .await
}
