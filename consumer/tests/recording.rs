//! Recording consumed batches (`ingest::record_batch`) on real PostgreSQL, on both of its paths: a
//! batch of events only is one statement sent on its own, a batch with poison in it a
//! transaction. Either way a batch is recorded once, and what it planned is what it returns.

mod support;

use std::time::Duration;

use chrono::Utc;
use consumer::ingest::{record_batch, Incoming, Recorded};
use outbox_core::db::{self, PgPool};
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
