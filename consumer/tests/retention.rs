//! Retention against a real PostgreSQL: which deliveries, attempts and inbox rows a pass deletes
//! and which it must keep, across several batches, with two instances at once, and in the
//! running consumer.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use consumer::retention::{delete_expired, Deleted};
use consumer::Metrics;
use outbox_core::testing::{eventually, metric_total, TestDb};
use support::*;

const RETENTION: Duration = Duration::from_secs(30 * 86_400);
const WAIT: Duration = Duration::from_secs(20);

/// Rows written directly with explicit ages ('40d'), oldest first: ids grow with time as they
/// do when the consumer records events.
struct Rows<'a>(&'a TestDb);

impl Rows<'_> {
    async fn endpoint(&self, id: &str) {
        self.0
            .execute(
                "insert into endpoints (id, url, event_types, secret, enabled)
                 values ($1, 'http://127.0.0.1:9/hook', '{*}',
                         'whsec_dGVzdHRlc3R0ZXN0dGVzdHRlc3R0ZXN0', false)",
                &[&id],
            )
            .await;
    }

    /// Inbox rows: (event id, received how long ago).
    async fn events(&self, events: &[(&str, &str)]) {
        let client = self.0.client().await;
        for (event_id, age) in events {
            client
                .execute(
                    "insert into inbox (event_id, event_type, topic, kafka_partition,
                                        kafka_offset, payload, received_at)
                     values ($1, 'message.created', 't', 0, 0, '{}',
                             now() - $2::text::interval)",
                    &[event_id, age],
                )
                .await
                .unwrap();
        }
    }

    /// Deliveries, in this order: (event id, endpoint, state, created and last updated how long
    /// ago, attempts made, all when it was last updated).
    async fn deliveries(&self, deliveries: &[(&str, &str, &str, &str, &str, i32)]) {
        let client = self.0.client().await;
        for (event_id, endpoint, state, created, updated, attempts) in deliveries {
            client
                .execute(
                    "with d as (
                         insert into deliveries (event_id, endpoint_id, state, attempts,
                                                 created_at, updated_at)
                         values ($1, $2, $3, $4, now() - $5::text::interval,
                                 now() - $6::text::interval)
                         returning id, updated_at)
                     insert into delivery_attempts
                            (delivery_id, attempt, latency_ms, attempted_at)
                     select d.id, n, 5, d.updated_at from d, generate_series(1, $4) n",
                    &[event_id, endpoint, state, attempts, created, updated],
                )
                .await
                .unwrap();
        }
    }

    /// `n` old events, each with one delivery and one attempt: every tenth pending, the others
    /// succeeded.
    async fn bulk(&self, n: i32, endpoint: &str) {
        self.0
            .client()
            .await
            .batch_execute(&format!(
                "insert into inbox (event_id, event_type, topic, kafka_partition, kafka_offset,
                                    payload, received_at)
                 select 'evt_bulk_' || g, 'message.created', 't', 0, g, '{{}}',
                        now() - interval '40 days'
                   from generate_series(1, {n}) g;
                 insert into deliveries
                        (event_id, endpoint_id, state, attempts, created_at, updated_at)
                 select 'evt_bulk_' || g, '{endpoint}',
                        case when g % 10 = 0 then 'pending' else 'succeeded' end, 1,
                        now() - interval '40 days', now() - interval '40 days'
                   from generate_series(1, {n}) g order by g;
                 insert into delivery_attempts
                        (delivery_id, attempt, latency_ms, attempted_at)
                 select id, 1, 5, updated_at from deliveries where event_id like 'evt_bulk_%';"
            ))
            .await
            .unwrap();
    }

    async fn strings(&self, sql: &str) -> BTreeSet<String> {
        self.0
            .client()
            .await
            .query(sql, &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect()
    }
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

fn counted(metrics: &Metrics, table: &str) -> u64 {
    metrics.retention_deleted.with_label_values(&[table]).get()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pass_deletes_finished_history_older_than_the_retention_and_nothing_else() {
    let db = TestDb::create().await;
    let rows = Rows(&db);
    rows.endpoint("ep_a").await;
    rows.endpoint("ep_b").await;

    rows.bulk(2500, "ep_a").await;
    rows.events(&[
        ("evt_old_succeeded", "40d"),
        ("evt_old_dead", "40d"),
        ("evt_old_pending", "40d"),
        ("evt_old_half_done", "40d"),
        ("evt_old_recently_dead", "40d"),
        // No endpoint wanted it.
        ("evt_old_unsubscribed", "40d"),
        ("evt_recent_succeeded", "1d"),
        ("evt_recent_unsubscribed", "1d"),
    ])
    .await;
    rows.deliveries(&[
        ("evt_old_succeeded", "ep_a", "succeeded", "40d", "40d", 2),
        ("evt_old_dead", "ep_a", "dead", "40d", "35d", 6),
        // Pending for 40 days (its endpoint is disabled): neither it nor its event may go.
        ("evt_old_pending", "ep_a", "pending", "40d", "40d", 1),
        // One endpoint done long ago, the other still pending: only the finished one goes.
        ("evt_old_half_done", "ep_a", "succeeded", "40d", "39d", 1),
        ("evt_old_half_done", "ep_b", "pending", "40d", "40d", 3),
        // Replayed and dead again recently: its age counts from the last update.
        ("evt_old_recently_dead", "ep_b", "dead", "40d", "2d", 6),
        ("evt_recent_succeeded", "ep_a", "succeeded", "1d", "1d", 1),
    ])
    .await;

    let metrics = Metrics::new();
    let deleted = delete_expired(&db.pool, RETENTION, &metrics).await.unwrap();

    let bulk_finished = 2250;
    assert_eq!(
        deleted,
        Deleted {
            deliveries: bulk_finished + 3,
            attempts: bulk_finished + 2 + 6 + 1,
            inbox: bulk_finished + 3,
        }
    );
    assert_eq!(counted(&metrics, "deliveries"), deleted.deliveries);
    assert_eq!(counted(&metrics, "delivery_attempts"), deleted.attempts);
    assert_eq!(counted(&metrics, "inbox"), deleted.inbox);

    let kept_bulk: Vec<String> = (1..=2500)
        .filter(|g| g % 10 == 0)
        .map(|g| format!("evt_bulk_{g}"))
        .collect();
    let mut expected_events = set(&[
        "evt_old_pending",
        "evt_old_half_done",
        "evt_old_recently_dead",
        "evt_recent_succeeded",
        "evt_recent_unsubscribed",
    ]);
    expected_events.extend(kept_bulk.iter().cloned());
    assert_eq!(
        rows.strings("select event_id from inbox").await,
        expected_events
    );

    let mut expected_deliveries = set(&[
        "evt_old_pending ep_a pending",
        "evt_old_half_done ep_b pending",
        "evt_old_recently_dead ep_b dead",
        "evt_recent_succeeded ep_a succeeded",
    ]);
    expected_deliveries.extend(kept_bulk.iter().map(|e| format!("{e} ep_a pending")));
    assert_eq!(
        rows.strings("select event_id || ' ' || endpoint_id || ' ' || state from deliveries")
            .await,
        expected_deliveries
    );
    // Every remaining delivery keeps all its attempts; no attempt outlives its delivery.
    let attempts_of = |event: &str| {
        format!(
            "select count(*) from delivery_attempts a join deliveries d on d.id = a.delivery_id
              where d.event_id = '{event}'"
        )
    };
    assert_eq!(db.count(&attempts_of("evt_old_pending")).await, 1);
    assert_eq!(db.count(&attempts_of("evt_old_half_done")).await, 3);
    assert_eq!(db.count(&attempts_of("evt_old_recently_dead")).await, 6);
    assert_eq!(db.count(&attempts_of("evt_recent_succeeded")).await, 1);
    assert_eq!(
        db.count(
            "select count(*) from delivery_attempts a
              where not exists (select 1 from deliveries d where d.id = a.delivery_id)"
        )
        .await,
        0
    );
    assert_eq!(
        db.count("select count(*) from delivery_attempts").await,
        250 + 1 + 3 + 6 + 1
    );

    let again = delete_expired(&db.pool, RETENTION, &metrics).await.unwrap();
    assert_eq!(again, Deleted::default(), "a second pass finds nothing");
    assert_eq!(counted(&metrics, "deliveries"), deleted.deliveries);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_running_a_pass_at_once_share_the_work() {
    let db = TestDb::create().await;
    let rows = Rows(&db);
    rows.endpoint("ep_a").await;
    rows.bulk(6000, "ep_a").await;

    let (one, two) = (Metrics::new(), Metrics::new());
    let (a, b) = tokio::join!(
        delete_expired(&db.pool, RETENTION, &one),
        delete_expired(&db.pool, RETENTION, &two)
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.deliveries + b.deliveries, 5400, "{a:?} {b:?}");
    assert_eq!(a.attempts + b.attempts, 5400, "{a:?} {b:?}");
    assert_eq!(a.inbox + b.inbox, 5400, "{a:?} {b:?}");
    assert_eq!(db.count("select count(*) from deliveries").await, 600);
    assert_eq!(
        db.count("select count(*) from delivery_attempts").await,
        600
    );
    assert_eq!(db.count("select count(*) from inbox").await, 600);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_consumer_runs_retention_every_interval() {
    let (db, topic) = setup(1).await;
    let mut config = config(&db, &topic);
    config.consumer_retention = Duration::from_secs(3600);
    config.consumer_retention_interval = Duration::from_millis(100);
    let mut consumer = spawn_app(&db, config).await;
    let rows = Rows(&db);
    rows.endpoint("ep_a").await;
    // Written after the first pass may have run: a later one must find them. Deliveries first,
    // so that no pass can see the old event without its delivery.
    rows.deliveries(&[
        ("evt_old", "ep_a", "succeeded", "2h", "2h", 2),
        ("evt_recent", "ep_a", "dead", "1min", "1min", 1),
    ])
    .await;
    rows.events(&[("evt_old", "2h"), ("evt_recent", "1min")])
        .await;

    let old_event_gone = || async {
        let left = db.count("select count(*) from inbox where event_id = 'evt_old'");
        (left.await == 0).then_some(())
    };
    eventually("retention deletes the old event", WAIT, old_event_gone).await;
    assert_eq!(
        rows.strings("select event_id from deliveries").await,
        set(&["evt_recent"])
    );
    assert_eq!(db.count("select count(*) from delivery_attempts").await, 1);
    let metrics = consumer.metrics().await;
    for (table, n) in [
        ("deliveries", 1.0),
        ("delivery_attempts", 2.0),
        ("inbox", 1.0),
    ] {
        assert_eq!(
            metric_total(
                &metrics,
                "consumer_retention_deleted_rows_total",
                &[&format!("table=\"{table}\"")]
            ),
            n,
            "{table}"
        );
    }
    consumer.stop().await;
}
