//! `outbox.unsent_ids()`, the list the backlog gauges, `/stats` and `/outbox?state=` read,
//! against a real PostgreSQL: what it lists, and that it reads indexes, not every sent event.

use outbox_core::db::Client;
use outbox_core::testing::TestDb;

/// A fresh database with `sql` run on it (the tables as a relay would leave them), and a
/// connection to it.
async fn database_after(sql: &str) -> (TestDb, Client) {
    let db = TestDb::create().await;
    let client = db.client().await;
    client.batch_execute(sql).await.unwrap();
    (db, client)
}

async fn unsent(db: &TestDb, with_dead: bool) -> Vec<i64> {
    let client = db.client().await;
    let mut ids: Vec<i64> = client
        .query("select * from outbox.unsent_ids($1)", &[&with_dead])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    ids.sort();
    ids
}

#[tokio::test]
async fn lists_the_events_beyond_the_cursor_without_a_sent_fact_and_the_unsent_rows() {
    // Ten events in one transaction (one xid), then the cursor past the first six, of which 1-5
    // were sent; 6 was put in unsent as X, 5 as D (by hand: the tables as the relay leaves them).
    let (db, client) = database_after(
        "select outbox.publish('order.created', 'k', '{}', 'orders') from generate_series(1, 10);
             update relay_cursor set xmin_done = ((select max(xid) from events)::text::bigint + 1)::text::xid8, id_done = 6;
             insert into sent (id, created_at, kafka_partition, kafka_offset)
                  select id, created_at, 0, id from events where id <= 4;
             insert into unsent (id, created_at, aggregate_id, state)
                  select id, created_at, 'k', case id when 5 then 'D' else 'X' end from events where id in (5, 6);
             -- 9 was sent ahead of the cursor.
             insert into sent (id, created_at, kafka_partition, kafka_offset)
                  select id, created_at, 0, id from events where id = 9;",
    )
    .await;
    assert_eq!(unsent(&db, false).await, vec![6, 7, 8, 10]);
    assert_eq!(unsent(&db, true).await, vec![5, 6, 7, 8, 10]);

    // A transaction that committed late: its event has a low id but an xid at the cursor's xmin.
    client
        .batch_execute(
            "update relay_cursor set xmin_done = (select max(xid) from events), id_done = 10",
        )
        .await
        .unwrap();
    assert_eq!(unsent(&db, false).await, vec![6, 7, 8, 10]);
}

#[tokio::test]
async fn reads_indexes_not_every_sent_event() {
    let (_db, client) = database_after(
        "select outbox.publish('order.created', 'k' || i, '{}', 'orders') from generate_series(1, 20000) i;
             insert into sent (id, created_at, kafka_partition, kafka_offset)
                  select id, created_at, 0, id from events;
             update relay_cursor set xmin_done = ((select max(xid) from events)::text::bigint + 1)::text::xid8,
                                     id_done = 20000;
             analyze events, sent, unsent, relay_cursor;",
    )
    .await;
    // The function itself, with the tables' scan counters around it: a sequential scan of the
    // partition holding the events would read every one of them. (The planner may scan an empty
    // partition, the default one here, sequentially: that reads nothing.)
    client
        .batch_execute("set stats_fetch_consistency = none")
        .await
        .unwrap();
    let scans = || async {
        client
            .batch_execute("select pg_stat_force_next_flush()")
            .await
            .unwrap();
        client.batch_execute("select 1").await.unwrap();
        client
            .query_one(
                "select coalesce(sum(seq_tup_read), 0)::bigint, coalesce(sum(idx_scan), 0)::bigint
                   from pg_stat_user_tables where schemaname = 'outbox' and relname like 'events%'",
                &[],
            )
            .await
            .map(|r| (r.get::<_, i64>(0), r.get::<_, i64>(1)))
            .unwrap()
    };
    let before = scans().await;
    let listed: i64 = client
        .query_one("select count(*) from outbox.unsent_ids(true)", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(listed, 0);
    let after = scans().await;
    assert_eq!(after.0, before.0, "no event read by a sequential scan");
    assert!(after.1 > before.1, "the index ranges were read");
}
