//! Recording consumed batches (`ingest::record_batch`) on real PostgreSQL, on both of its paths: a
//! batch of events only is one statement sent on its own, a batch with poison in it a
//! transaction. Either way a batch is recorded once, and what it planned is what it returns.

mod support;

use std::time::Duration;

use chrono::Utc;
use consumer::ingest::{record_batch, Incoming, Recorded};
use outbox_core::db::{self, PgPool};
use outbox_core::testing::plan::{explain_analyze, rows_read};
use outbox_core::testing::TestDb;
use support::envelope;

async fn migrated() -> (TestDb, PgPool) {
    let db = TestDb::create().await;
    let pool = db::pool(&db.url, 4, consumer::SCHEMAS).expect("pool");
    db::migrate(&pool, consumer::SCHEMAS)
        .await
        .expect("migrations");
    let client = pool.get().await.expect("connection");
    // One endpoint takes every event, one takes none of these.
    client
        .batch_execute(
            "insert into endpoints (id, url, event_types, secret) values
               ('ep_all', 'http://127.0.0.1:9/all', '{*}', 'whsec_dGVzdHRlc3R0ZXN0dGVzdHRlc3R0ZXN0'),
               ('ep_other', 'http://127.0.0.1:9/other', '{order.*}', 'whsec_dGVzdHRlc3R0ZXN0dGVzdHRlc3R0ZXN0')",
        )
        .await
        .expect("endpoints");
    (db, pool)
}

fn record(offset: i64, payload: Vec<u8>) -> Incoming {
    Incoming {
        topic: "recording".into(),
        partition: 0,
        offset,
        payload,
        correlation_header: None,
        traceparent: None,
    }
}

fn event(n: usize) -> (String, Incoming) {
    let e = envelope(n);
    (
        e.id.clone(),
        record(n as i64, serde_json::to_vec(&e).expect("envelope")),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_is_recorded_once_with_its_deliveries_leased_and_poison_beside_events_too() {
    let (db, pool) = migrated().await;
    let lease = Duration::from_secs(60);
    let (ids, batch): (Vec<String>, Vec<Incoming>) = (1..=3).map(event).unzip();

    // Events only: the one-statement path.
    let before = Utc::now();
    let (recorded, leased) = record_batch(&pool, &batch, Some(lease))
        .await
        .expect("recorded");
    assert_eq!(
        recorded,
        Recorded {
            events: 3,
            duplicates: 0,
            deliveries: 3,
            poison: 0
        }
    );
    let leased = leased.expect("the new deliveries come back leased");
    let mut sent: Vec<&str> = leased
        .deliveries
        .iter()
        .map(|d| d.event_id.as_str())
        .collect();
    sent.sort();
    let mut expected: Vec<&str> = ids.iter().map(String::as_str).collect();
    expected.sort();
    assert_eq!(sent, expected);
    assert!(leased.deliveries.iter().all(|d| d.endpoint_id == "ep_all"));
    assert!(leased.until >= before + chrono::Duration::seconds(59));
    assert_eq!(db.count("select count(*) from inbox").await, 3);
    assert_eq!(
        db.count("select count(*) from deliveries where leased_until is not null")
            .await,
        3
    );

    // The same records read again (after a crash before the offsets were committed): nothing new.
    let (again, leased) = record_batch(&pool, &batch, Some(lease))
        .await
        .expect("recorded again");
    assert_eq!(
        again,
        Recorded {
            events: 0,
            duplicates: 3,
            deliveries: 0,
            poison: 0
        }
    );
    assert!(leased.is_none(), "nothing planned, nothing leased");
    assert_eq!(db.count("select count(*) from deliveries").await, 3);

    // An event and a poison record in one batch: the transaction path records both.
    let (id, fresh) = event(4);
    let mixed = vec![fresh, record(5, b"not an envelope".to_vec())];
    let (recorded, leased) = record_batch(&pool, &mixed, Some(lease))
        .await
        .expect("recorded with poison");
    assert_eq!(
        recorded,
        Recorded {
            events: 1,
            duplicates: 0,
            deliveries: 1,
            poison: 1
        }
    );
    let leased = leased.expect("the event's delivery comes back leased");
    assert_eq!(leased.deliveries.len(), 1);
    assert_eq!(leased.deliveries[0].event_id, id);
    assert_eq!(db.count("select count(*) from inbox").await, 4);
    assert_eq!(
        db.count("select count(*) from poison_records where kafka_offset = 5")
            .await,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recording_a_batch_and_writing_its_results_find_their_rows_by_key_not_by_reading_the_history(
) {
    // The consumer's connections keep one plan per prepared statement (plan_cache_mode), made on
    // its first run, when the tables may be young. The plans of the two statements every batch
    // runs must still find the batch's rows by key: the one that writes results once read every
    // delivery kept to find a batch's few, until autovacuum analyzed the table.
    use consumer::delivery::store::{RECORD_EVENTS, RECORD_RESULTS};
    const HISTORY: i64 = 20_000;
    let (db, _) = migrated().await;
    // Statistics taken while the tables were young (autovacuum analyzes a table after its first
    // 50 changes), and none after: the estimates every plan below is made with.
    for table in ["inbox", "deliveries"] {
        db.execute(
            &format!("alter table {table} set (autovacuum_enabled = off)"),
            &[],
        )
        .await;
        db.execute(&format!("analyze {table}"), &[]).await;
    }
    // On a connection set up as the consumer's are, both prepared and run while the tables are
    // empty; from then on their plans are kept (nothing analyzes the tables). The consumer asks
    // for that; PostgreSQL also does it by itself once a kept plan looks as good as a new one.
    let pool = consumer::pool(&db.url, 1).expect("pool");
    let client = pool.get().await.expect("connection");
    client
        .batch_execute(&format!(
            "prepare events(text[], text[], text[], int[], bigint[], text[], text[], float8, text[])
                 as {RECORD_EVENTS};
             prepare results(bigint[], text[], int[], timestamptz[], int[], text[], bool[],
                             timestamptz, timestamptz[], text[]) as {RECORD_RESULTS};
             set plan_cache_mode = force_generic_plan;
             execute results('{{}}', '{{}}', '{{}}', '{{}}', '{{}}', '{{}}', '{{}}', now(), '{{}}', '{{}}');
             execute events('{{}}', '{{}}', '{{}}', '{{}}', '{{}}', '{{}}', '{{}}', 60, '{{}}');"
        ))
        .await
        .expect("prepared and run on empty tables");

    // The history: events received and delivered long ago.
    db.execute(
        "with i as (
             insert into inbox (event_id, event_type, topic, kafka_partition, kafka_offset, payload)
             select 'evt_history_' || g, 'message.created', 'recording', 0, g, '{}'
               from generate_series(1, $1::bigint) g returning event_id)
         insert into deliveries (event_id, endpoint_id, state, attempts, delivered_at)
         select event_id, 'ep_all', 'succeeded', 1, now() from i",
        &[&HISTORY],
    )
    .await;

    // A batch of three events, recorded with their deliveries leased...
    let plan = explain_analyze(
        &client,
        "",
        "execute events('{evt_new_1,evt_new_2,evt_new_3}',
             '{message.created,message.created,message.created}', '{recording,recording,recording}',
             '{0,0,0}', '{-3,-2,-1}', '{null,null,null}', '{\"{}\",\"{}\",\"{}\"}', 60,
             '{null,null,null}')",
    )
    .await;
    let (inbox, deliveries) = (
        rows_read(&plan, |r| r == "inbox"),
        rows_read(&plan, |r| r == "deliveries"),
    );
    assert!(
        inbox <= 30.0 && deliveries <= 30.0,
        "recording 3 events read {inbox} inbox rows and {deliveries} deliveries (history: {HISTORY} of each): {plan:#}"
    );
    let leased: Vec<(i64, chrono::DateTime<Utc>)> = client
        .query(
            "select id, leased_until from deliveries where event_id like 'evt_new_%'",
            &[],
        )
        .await
        .expect("the batch's deliveries")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(leased.len(), 3, "one delivery per new event, leased");

    // ...then their results written.
    let ids = leased
        .iter()
        .map(|(id, _)| id.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let plan = explain_analyze(
        &client,
        "",
        &format!(
            "execute results('{{{ids}}}', '{{succeeded,succeeded,succeeded}}', '{{1,1,1}}',
                 array[now(), now(), now()], '{{200,200,200}}', '{{null,null,null}}', '{{t,t,t}}',
                 '{}', array[now(), now(), now()], '{{null,null,null}}')",
            leased[0].1.to_rfc3339()
        ),
    )
    .await;
    let deliveries = rows_read(&plan, |r| r == "deliveries");
    assert_eq!(
        db.count("select count(*) from deliveries where state = 'succeeded' and event_id like 'evt_new_%'")
            .await,
        3,
        "the batch's results are written"
    );
    assert!(
        deliveries <= 30.0,
        "writing 3 results read {deliveries} deliveries (history: {HISTORY}): {plan:#}"
    );
}
