//! Publishing from any service: `outbox.publish` inside the caller's own transaction, against a
//! real PostgreSQL, the real relay and a real Kafka broker.

mod support;

use std::time::Duration;

use outbox_core::testing::{self, read_topic};
use support::*;
use tokio_postgres::NoTls;

fn brokers() -> String {
    testing::kafka_brokers()
}

/// The producer and the relay write TOPIC_ROUTES into outbox.routes once their migrations ran.
async fn routes_stored(p: &Pipeline) {
    testing::eventually("TOPIC_ROUTES stored", Duration::from_secs(20), || async {
        (p.db.count("select count(*) from outbox.routes").await > 0).then_some(())
    })
    .await;
}

const ORDERS: &str = "create table if not exists public.orders (id text primary key, total int)";

#[tokio::test]
async fn a_commit_publishes_through_the_relay_and_a_rollback_publishes_nothing() {
    let p = Pipeline::start(&brokers(), |_| {}).await;
    routes_stored(&p).await;
    let mut client = p.db.client().await;
    client.batch_execute(ORDERS).await.unwrap();

    let tx = client.transaction().await.unwrap();
    tx.execute("insert into public.orders values ('order-42', 10)", &[])
        .await
        .unwrap();
    let committed: String = tx
        .query_one(
            "select outbox.publish(event_type => 'message.order_created', key => 'order-42',
                    data => '{\"total\": 10}', headers => '{\"x-trace\": \"t1\"}',
                    correlation_id => 'req_sql_1', source => 'orders')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    tx.commit().await.unwrap();

    let tx = client.transaction().await.unwrap();
    tx.execute("insert into public.orders values ('order-43', 11)", &[])
        .await
        .unwrap();
    tx.query_one(
        "select outbox.publish(event_type => 'message.order_created', key => 'order-43', data => '{}')",
        &[],
    )
    .await
    .unwrap();
    tx.rollback().await.unwrap();

    p.all_sent(1, Duration::from_secs(20)).await;
    let records = read_topic(&p.topic, 1, Duration::from_secs(20)).await;
    assert_eq!(records.len(), 1);
    let record = &records[0];
    assert_eq!(record.key.as_deref(), Some("order-42"));
    let envelope = record.json();
    assert_eq!(envelope["id"], committed.as_str());
    assert!(
        committed.starts_with("evt_") && committed.len() == 36,
        "{committed}"
    );
    assert_eq!(envelope["event"], "message.order_created");
    assert_eq!(envelope["version"], "1.0");
    assert_eq!(envelope["data"], serde_json::json!({"total": 10}));
    assert_eq!(envelope["metadata"]["source"], "orders");
    assert_eq!(envelope["metadata"]["correlation_id"], "req_sql_1");
    assert_eq!(
        envelope["idempotency_key"],
        format!("message.order_created-order-42-{committed}")
    );
    let timestamp = envelope["timestamp"].as_str().unwrap();
    assert!(
        chrono::DateTime::parse_from_rfc3339(timestamp).is_ok() && timestamp.len() == 24,
        "{timestamp}"
    );
    assert_eq!(record.header("event_id"), Some(committed.as_str()));
    assert_eq!(record.header("correlation_id"), Some("req_sql_1"));
    assert_eq!(record.header("x-trace"), Some("t1"));
    assert_eq!(p.db.count("select count(*) from public.orders").await, 1);
    assert_eq!(p.db.count("select count(*) from outbox.outbox").await, 1);
}

#[tokio::test]
async fn bad_arguments_fail_the_callers_transaction_with_stable_sqlstates() {
    let db = testing::TestDb::create().await;
    let mut client = db.client().await;
    client.batch_execute(ORDERS).await.unwrap();
    client
        .batch_execute("insert into outbox.routes values (1, 'order.*', 'orders')")
        .await
        .unwrap();
    let deep = format!("{}1{}", "[".repeat(65), "]".repeat(65));
    let cases: Vec<(String, &str)> = vec![
        ("event_type => '', key => 'k', data => '{}'".into(), "22023"),
        ("event_type => 'Order Created', key => 'k', data => '{}'".into(), "22023"),
        ("event_type => null, key => 'k', data => '{}'".into(), "22023"),
        ("event_type => 'order.created', key => '', data => '{}'".into(), "22023"),
        ("event_type => 'order.created', key => null, data => '{}'".into(), "22023"),
        (format!("event_type => 'order.created', key => '{}', data => '{{}}'", "k".repeat(257)), "54000"),
        ("event_type => 'order.created', key => 'k', data => '[1]'".into(), "22023"),
        ("event_type => 'order.created', key => 'k', data => '\"text\"'".into(), "22023"),
        ("event_type => 'order.created', key => 'k', data => null".into(), "22023"),
        (format!("event_type => 'order.created', key => 'k', data => '{{\"a\": {deep}}}'"), "54000"),
        ("event_type => 'order.created', key => 'k', data => jsonb_build_object('a', repeat('x', 1100000))".into(), "54000"),
        ("event_type => 'invoice.created', key => 'k', data => '{}'".into(), "OB001"),
        ("event_type => 'order.created', key => 'k', data => '{}', topic => 'bad topic'".into(), "22023"),
        ("event_type => 'order.created', key => 'k', data => '{}', correlation_id => E'a\\nb'".into(), "22023"),
        (format!("event_type => 'order.created', key => 'k', data => '{{}}', topic => '{}'", "t".repeat(250)), "22023"),
        ("event_type => 'order.created', key => 'k', data => '{}', topic => ''".into(), "22023"),
        (format!("event_type => 'order.created', key => 'k', data => '{{}}', correlation_id => '{}'", "c".repeat(129)), "22023"),
        ("event_type => 'order.created', key => 'k', data => '{}', correlation_id => ''".into(), "22023"),
        (format!("event_type => 'order.created', key => 'k', data => '{{}}', headers => '{{\"{}\": \"v\"}}'", "h".repeat(129)), "22023"),
        ("event_type => 'order.created', key => 'k', data => '{}', headers => '{\"a b\": \"v\"}'".into(), "22023"),
        ("event_type => 'order.created', key => 'k', data => '{}', headers => '{\"x\": 1}'".into(), "22023"),
        ("event_type => 'order.created', key => 'k', data => '{}', headers => '[]'".into(), "22023"),
        ("event_type => 'order.created', key => 'k', data => '{}', source => ''".into(), "22023"),
    ];
    for (args, sqlstate) in &cases {
        let tx = client.transaction().await.unwrap();
        tx.execute("insert into public.orders values ('o', 1)", &[])
            .await
            .unwrap();
        let error = tx
            .query_one(&format!("select outbox.publish({args})"), &[])
            .await
            .expect_err(args);
        let db_error = error
            .as_db_error()
            .unwrap_or_else(|| panic!("{args}: {error}"));
        assert_eq!(
            db_error.code().code(),
            *sqlstate,
            "{args}: {}",
            db_error.message()
        );
        assert!(
            db_error.message().starts_with("outbox.publish: "),
            "{}",
            db_error.message()
        );
        // The caller's transaction is aborted: its domain write cannot commit by mistake.
        assert!(tx.execute("select 1", &[]).await.is_err());
        tx.rollback().await.unwrap();
    }
    assert_eq!(db.count("select count(*) from public.orders").await, 0);
    assert_eq!(db.count("select count(*) from outbox.outbox").await, 0);

    // The longest topic, correlation id and header name allowed are accepted.
    let longest = format!(
        "select outbox.publish(event_type => 'order.created', key => 'k', data => '{{}}',
                               topic => '{}', correlation_id => '{}', headers => '{{\"{}\": \"v\"}}')",
        "t".repeat(249),
        "c".repeat(128),
        "h".repeat(128)
    );
    let tx = client.transaction().await.unwrap();
    tx.query_one(&longest, &[])
        .await
        .unwrap_or_else(|e| panic!("{longest}: {e}"));
    tx.rollback().await.unwrap();
    assert_eq!(db.count("select count(*) from outbox.events").await, 0);
    // The same call with good arguments publishes, routed by outbox.routes.
    client
        .query_one(
            "select outbox.publish(event_type => 'order.created', key => 'k', data => '{}')",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        db.count("select count(*) from outbox.outbox where topic = 'orders'")
            .await,
        1
    );
}

#[tokio::test]
async fn the_publisher_role_may_publish_and_nothing_else() {
    let db = testing::TestDb::create().await;
    let role = format!("orders_app_{}", &db.name[5..17]);
    let admin = db.client().await;
    admin
        .batch_execute(&format!(
            "create role {role} login; grant outbox_publisher to {role};
             insert into outbox.routes values (1, '*', 'orders')"
        ))
        .await
        .unwrap();
    let url = db.url.replacen("postgres@", &format!("{role}@"), 1);
    let (app, connection) = tokio_postgres::connect(&url, NoTls).await.unwrap();
    tokio::spawn(connection);

    let id: String = app
        .query_one(
            "select outbox.publish(event_type => 'order.created', key => 'o-1', data => '{\"a\": 1}')",
            &[],
        )
        .await
        .expect("the role publishes")
        .get(0);
    assert!(id.starts_with("evt_"));
    for forbidden in [
        "select * from outbox.outbox",
        "select * from outbox.events",
        "select * from outbox.routes",
        "update outbox.outbox set state = 'D'",
        "delete from outbox.outbox",
        "insert into outbox.outbox (event_id, event_type, aggregate_id, topic) values ('e', 't', 'k', 'x')",
        "insert into outbox.routes values (9, '*', 'elsewhere')",
        "select outbox.route('order.created')",
        "select outbox.uuid_v7()",
    ] {
        let error = app.batch_execute(forbidden).await.expect_err(forbidden);
        assert_eq!(
            error.as_db_error().map(|e| e.code().code()),
            Some("42501"),
            "{forbidden}: {error}"
        );
    }
    assert_eq!(db.count("select count(*) from outbox.outbox").await, 1);
    assert_eq!(
        db.count("select count(*) from outbox.outbox where state = 'P'")
            .await,
        1
    );
    drop(app);
    admin
        .batch_execute(&format!("drop role if exists {role}"))
        .await
        .ok();
}

#[tokio::test]
async fn a_transaction_that_commits_after_later_ones_were_sent_is_still_sent() {
    let p = Pipeline::start(&brokers(), |_| {}).await;
    routes_stored(&p).await;
    let mut early = p.db.client().await;
    let publish = |key: &str| {
        format!(
            "select outbox.publish(event_type => 'message.created', key => '{key}', data => '{{}}')"
        )
    };
    // Takes its outbox position first, commits last.
    let held = early.transaction().await.unwrap();
    let held_id: String = held.query_one(&publish("slow"), &[]).await.unwrap().get(0);

    let later = p.db.client().await;
    let mut later_ids = Vec::new();
    for n in 0..5 {
        let id: String = later
            .query_one(&publish(&format!("fast-{n}")), &[])
            .await
            .unwrap()
            .get(0);
        later_ids.push(id);
    }
    p.all_sent(5, Duration::from_secs(20)).await;
    held.commit().await.unwrap();
    p.all_sent(6, Duration::from_secs(20)).await;

    let records = read_topic(&p.topic, 6, Duration::from_secs(20)).await;
    let ids: Vec<String> = records
        .iter()
        .map(|r| r.json()["id"].as_str().unwrap().to_owned())
        .collect();
    assert!(ids.contains(&held_id), "{ids:?}");
    for id in &later_ids {
        assert!(ids.contains(id));
    }
    assert_eq!(ids.len(), 6);
}

#[tokio::test]
async fn data_with_many_brackets_but_little_depth_is_published_whole() {
    // More than 64 brackets make publish walk the data's depth; only depth is refused. Brackets in
    // text, next to characters of more than one byte, are not nesting.
    let db = testing::TestDb::create().await;
    let client = db.client().await;
    let wide = format!(
        "{{\"rows\": [{}], \"text\": \"é[{{ü{{[ñ\"}}",
        vec!["[1, {\"k\": 2}]"; 70].join(", ")
    );
    let id: String = client
        .query_one(
            "select outbox.publish(event_type => 'order.created', key => 'k', data => $1::text::jsonb, topic => 'orders')",
            &[&wide],
        )
        .await
        .unwrap()
        .get(0);
    let row = client
        .query_one(
            "select payload::jsonb -> 'data' = $2::text::jsonb from outbox.events where event_id = $1",
            &[&id, &wide],
        )
        .await
        .unwrap();
    assert!(
        row.get::<_, bool>(0),
        "the envelope carries the data as given"
    );
}

/// publish calls uuid_v7 for every event (V10): inlined, it is planned once with publish's own
/// statements; called as a function of its own (it had a SET clause) it was parsed and planned
/// on every call. Its ids stay version-7 UUIDs that start with the time they were made.
#[tokio::test]
async fn uuid_v7_is_inlined_into_its_caller_and_starts_with_the_current_millisecond() {
    let db = testing::TestDb::create().await;
    let client = db.client().await;
    let plan: Vec<String> = client
        .query("explain (verbose) select outbox.uuid_v7()", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let plan = plan.join("\n");
    assert!(plan.contains("gen_random_uuid()"), "{plan}");
    assert!(!plan.contains("uuid_v7"), "called, not inlined: {plan}");

    let row = client
        .query_one(
            "select outbox.uuid_v7()::text, (extract(epoch from clock_timestamp()) * 1000)::bigint",
            &[],
        )
        .await
        .unwrap();
    let (id, now_ms): (String, i64) = (row.get(0), row.get(1));
    let hex = id.replace('-', "");
    let made_ms = i64::from_str_radix(&hex[..12], 16).unwrap();
    assert!(
        (0..=1000).contains(&(now_ms - made_ms)),
        "{id}: {made_ms} against {now_ms}"
    );
    assert_eq!(&hex[12..13], "7", "version: {id}");
    assert!("89ab".contains(&hex[16..17]), "variant: {id}");
}
