//! Deletes finished history older than `CONSUMER_RETENTION`: succeeded and dead deliveries with
//! their attempts, then inbox rows that no longer have a delivery. Pending deliveries and their
//! inbox rows are never touched.
//!
//! The inbox is what deduplicates Kafka records by event id, so an inbox row is kept at least the
//! whole retention (by `received_at`), even when its deliveries finished sooner: a record Kafka
//! redelivers within that window (a rebalance, an offset reset) still creates nothing. Dead
//! deliveries follow the same age rule; whoever wants dead letters longer raises the retention.
//!
//! Every instance runs this; concurrent passes skip each other's locked rows, so two instances
//! only share the work. Each statement handles at most `BATCH` rows in its own short transaction,
//! so it never holds many locks or competes with ingest and dispatch for long.

use std::time::Duration;

use chrono::{DateTime, Utc};
use outbox_core::db::PgPool;
use tokio_util::sync::CancellationToken;

use crate::{delivery, Metrics};

const BATCH: i64 = 1000;

/// Pause between batches, so a large backlog is deleted without hogging the database.
const BREATHER: Duration = Duration::from_millis(20);

// Inbox rows have no ordered key, so the walk goes in physical order from the last old row the
// previous batch looked at; the BRIN index on `received_at` (V9) lets PostgreSQL read only the
// page ranges that hold old rows rather than the whole table. Only the batch's own candidates are then probed for deliveries (by
// index), so the anti-join never reads the whole deliveries table.
const DELETE_INBOX: &str = "
    with scanned as (
        select ctid, event_id from inbox where ctid > $1::text::tid and received_at < $2 limit $3
    ), doomed as (
        select i.event_id from inbox i
         where i.event_id = any(array(select event_id from scanned)) and i.received_at < $2
           and not exists (select 1 from deliveries d where d.event_id = i.event_id)
           for update skip locked
    ), gone as (
        delete from inbox where event_id = any(array(select event_id from doomed)) returning 1
    )
    select (select count(*) from gone), (select count(*) from scanned),
           (select max(ctid)::text from scanned)";

/// Rows one pass deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Deleted {
    pub deliveries: u64,
    pub attempts: u64,
    pub inbox: u64,
}

impl Deleted {
    pub fn is_empty(&self) -> bool {
        *self == Deleted::default()
    }
}

/// Runs until `shutdown`: a pass at once, then one every `interval`. A failed pass (PostgreSQL
/// down) is logged and retried at the next interval.
pub async fn run(
    pool: PgPool,
    retention: Duration,
    interval: Duration,
    metrics: Metrics,
    shutdown: CancellationToken,
) {
    while !shutdown.is_cancelled() {
        match delete_expired(&pool, retention, &metrics).await {
            Ok(deleted) if !deleted.is_empty() => tracing::info!(
                deliveries = deleted.deliveries,
                delivery_attempts = deleted.attempts,
                inbox = deleted.inbox,
                "retention deleted finished deliveries, their attempts and inbox rows"
            ),
            Ok(_) => {}
            Err(error) => {
                tracing::warn!(
                    error = format!("{error:#}"),
                    "retention pass failed; retried next interval"
                )
            }
        }
        outbox_core::shutdown::sleep_or_cancel(interval, &shutdown).await;
    }
}

/// One pass: deletes, batch by batch, every finished delivery (and its attempts) last updated
/// before `retention` ago, then every inbox row received before then that has no delivery left.
/// Counts each batch in `metrics` as it commits.
pub async fn delete_expired(
    pool: &PgPool,
    retention: Duration,
    metrics: &Metrics,
) -> anyhow::Result<Deleted> {
    let retention_ms = retention.as_millis().min(i64::MAX as u128) as i64;
    // One cutoff for the whole pass, on the database's clock like the timestamps it is compared to.
    let cutoff: DateTime<Utc> = pool
        .get()
        .await?
        .query_one(
            "select now() - $1::bigint * interval '1 millisecond'",
            &[&retention_ms],
        )
        .await?
        .get(0);
    let counter = |table: &str| metrics.retention_deleted.with_label_values(&[table]);
    let mut deleted = Deleted::default();

    let mut after = 0i64;
    loop {
        let step =
            delivery::store::delete_finished(&**pool.get().await?, after, cutoff, BATCH).await?;
        counter("deliveries").inc_by(step.deliveries);
        counter("delivery_attempts").inc_by(step.attempts);
        deleted.deliveries += step.deliveries;
        deleted.attempts += step.attempts;
        match step.last_id {
            Some(last) if step.scanned == BATCH as u64 && !step.reached_cutoff => after = last,
            _ => break,
        }
        tokio::time::sleep(BREATHER).await;
    }

    let mut after = String::from("(0,0)");
    loop {
        let row = pool
            .get()
            .await?
            .query_one(DELETE_INBOX, &[&after, &cutoff, &BATCH])
            .await?;
        let inbox = row.get::<_, i64>(0) as u64;
        counter("inbox").inc_by(inbox);
        deleted.inbox += inbox;
        let scanned: i64 = row.get(1);
        match row.get::<_, Option<String>>(2) {
            Some(last) if scanned == BATCH => after = last,
            _ => break,
        }
        tokio::time::sleep(BREATHER).await;
    }
    Ok(deleted)
}
