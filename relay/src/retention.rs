//! Retention without dead rows: events live in time-range partitions (of `events` and `sent`,
//! made ahead by the leader); a partition whose time range ended more than `OUTBOX_RETENTION`
//! ago and whose events are all sent is dropped whole. Only the default partition (events stamped
//! before any partition covered their time) is trimmed row by row, a small batch at a time.
//!
//! Dropping and attaching partitions take locks on the parent tables; `lock_timeout` bounds how
//! long publishers may queue behind them (a pass that cannot get its lock tries again next
//! interval).

use std::time::Duration;

use outbox_core::db::PgPool;
use outbox_core::retention::BatchDelete;
use tokio_postgres::types::{FromSqlOwned, ToSql};
use tokio_util::sync::CancellationToken;

use crate::Metrics;

const BATCH: i64 = 1000;

/// How long a partition change may wait for its lock (publishers wait behind it meanwhile).
const LOCK_TIMEOUT: &str = "set lock_timeout = '200ms'";

/// Old sent rows of the default partitions, with their sent facts; answers how many went.
const DELETE_OLD_SENT_DEFAULT: &str = "
    with old as (
        select id, created_at from sent_default
         where created_at < now() - ($1::bigint * interval '1 millisecond')
           and sent_at < now() - ($1::bigint * interval '1 millisecond')
         limit $2
    ), gone as (
        delete from events_default e using old where e.id = old.id and e.created_at = old.created_at
        returning e.id
    ), facts as (
        delete from sent_default s using old where s.id = old.id and s.created_at = old.created_at
    )
    select count(*) from gone";

/// The partition layout: each partition covers `span`, and they are made `ahead` in advance.
#[derive(Debug, Clone, Copy)]
pub struct Partitions {
    pub span: Duration,
    pub ahead: Duration,
}

impl Partitions {
    /// Makes the partitions up to `ahead` from now; returns how many were made.
    pub async fn ensure(&self, pool: &PgPool) -> Result<i32, outbox_core::db::DbError> {
        partition_change(
            pool,
            "select outbox.ensure_partitions($1::bigint * interval '1 millisecond', $2::bigint * interval '1 millisecond')",
            &[&millis(self.span), &millis(self.ahead)],
        )
        .await
    }
}

/// Runs `sql`, a partition change answering one value, in a transaction of its own under
/// [`LOCK_TIMEOUT`].
async fn partition_change<T: FromSqlOwned>(
    pool: &PgPool,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<T, outbox_core::db::DbError> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    tx.batch_execute(LOCK_TIMEOUT).await?;
    let value: T = tx.query_one(sql, params).await?.get(0);
    tx.commit().await?;
    Ok(value)
}

fn millis(d: Duration) -> i64 {
    d.as_millis().min(i64::MAX as u128) as i64
}

/// Drops the partitions older than `retention` whose events are all sent; returns the events
/// that went with them.
pub async fn drop_old_partitions(
    pool: &PgPool,
    retention: Duration,
) -> Result<i64, outbox_core::db::DbError> {
    partition_change(
        pool,
        "select outbox.drop_old_partitions(now() - $1::bigint * interval '1 millisecond')",
        &[&millis(retention)],
    )
    .await
}

/// Runs until `stop` (leadership ends): every `interval`, makes the partitions ahead, drops the
/// expired ones, and trims the default partition.
pub async fn run(
    pool: PgPool,
    retention: Duration,
    interval: Duration,
    partitions: Partitions,
    metrics: Metrics,
    stop: CancellationToken,
) {
    let trim = BatchDelete {
        what: "sent outbox rows of the default partition",
        sql: DELETE_OLD_SENT_DEFAULT,
        retention,
        batch: BATCH,
        interval,
    };
    while !stop.is_cancelled() {
        match partitions.ensure(&pool).await {
            Ok(0) => {}
            Ok(made) => tracing::info!(made, "outbox partitions made"),
            Err(error) => {
                tracing::warn!(%error, "outbox partitions not made yet; retried next interval")
            }
        }
        match drop_old_partitions(&pool, retention).await {
            Ok(0) => {}
            Ok(dropped) => {
                metrics.retention_deleted.inc_by(dropped as u64);
                tracing::info!(dropped, "expired outbox partitions dropped");
            }
            Err(error) => {
                tracing::warn!(%error, "expired outbox partitions not dropped; retried next interval")
            }
        }
        match trim
            .delete_expired(&pool, |n| metrics.retention_deleted.inc_by(n), &stop)
            .await
        {
            Ok(0) => {}
            Ok(deleted) => tracing::info!(deleted, what = trim.what, "retention deleted"),
            Err(error) => {
                tracing::warn!(%error, what = trim.what, "retention pass failed; retried next interval")
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stop.cancelled() => {}
        }
    }
}
