//! Publishers other than the producer, end to end: a database of the release before schemas
//! upgraded in place, and the example services in examples/ (Node and Go) publishing from their
//! own transactions. A binary of its own, so that the outage test in pipeline.rs (it stops Kafka)
//! never runs beside them.

mod support;

use std::time::Duration;

use consumer::delivery::DeliveryState;
use outbox_core::breaker::BreakerState;
use outbox_core::testing::{eventually, kafka_brokers, unique_topic, TestDb};
use serde_json::{json, Value};
use support::consumer_admin::DeliveryFilter;
use support::{ConsumerAdmin, Stack};

/// A database an earlier release made (every table in `public`) with rows in every state, as a
/// running system leaves it.
async fn legacy_database_with_rows(topic: &str) -> (TestDb, Vec<String>) {
    use outbox_core::envelope::{Envelope, Metadata};
    let db = TestDb::create_legacy().await;
    let client = db.client().await;
    let mut unsent = Vec::new();
    for (n, state) in ["P", "P", "X", "E", "D"].iter().enumerate() {
        let envelope = Envelope::new(
            "message.created",
            &format!("legacy-{n}"),
            json!({"content": format!("legacy {n}")}),
            Metadata {
                source: "producer".into(),
                environment: "test".into(),
                correlation_id: format!("req_legacy_{n}"),
            },
        );
        let headers = json!({"event_id": envelope.id, "event_type": envelope.event, "correlation_id": envelope.metadata.correlation_id});
        let row = client
            .query_one(
                "insert into public.outbox (event_id, event_type, aggregate_id, topic, headers, state, attempts,
                                            next_attempt_at, kafka_partition, kafka_offset)
                 values ($1, 'message.created', $2, $3, $4, $5::text, case when $5::text in ('X', 'D') then 3 else 0 end,
                         now() - interval '1 minute',
                         case when $5::text = 'E' then 0 end, case when $5::text = 'E' then 0 end)
                 returning id",
                &[&envelope.id, &format!("legacy-{n}"), &topic, &headers, &state.to_string()],
            )
            .await
            .unwrap();
        let outbox_id: i64 = row.get(0);
        client
            .execute(
                "insert into public.outbox_payloads (outbox_id, payload) values ($1, $2)",
                &[&outbox_id, &serde_json::to_value(&envelope).unwrap()],
            )
            .await
            .unwrap();
        client
            .execute(
                "insert into public.messages (id, content, aggregate_id, event_type, event_id, outbox_id, correlation_id)
                 values ($1, $2, $3, 'message.created', $4, $5, $6)",
                &[&uuid::Uuid::now_v7(), &format!("legacy {n}"), &format!("legacy-{n}"), &envelope.id, &outbox_id,
                  &envelope.metadata.correlation_id],
            )
            .await
            .unwrap();
        if matches!(*state, "P" | "X") {
            unsent.push(envelope.id.clone());
        }
    }
    // The consumer's side: an endpoint whose address is not up yet, a pending delivery to it, a
    // dead one, its open breaker; the notifier's side: an event it stored, an open channel breaker.
    client
        .batch_execute(
            "insert into public.endpoints (id, url, event_types, secret)
                 values ('ep_legacy', 'http://127.0.0.1:9/down', '{*}', 'whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw');
             insert into public.inbox (event_id, event_type, topic, kafka_partition, kafka_offset, payload)
                 values ('evt_legacy_pending', 'message.created', 'old', 0, 1, '{\"id\": \"evt_legacy_pending\"}'),
                        ('evt_legacy_dead', 'message.created', 'old', 0, 2, '{\"id\": \"evt_legacy_dead\"}');
             insert into public.deliveries (event_id, endpoint_id, state, attempts)
                 values ('evt_legacy_pending', 'ep_legacy', 'pending', 1),
                        ('evt_legacy_dead', 'ep_legacy', 'dead', 6);
             insert into public.circuit_breakers (scope, name, state, failure_count, opened_at)
                 values ('endpoint', 'ep_legacy', 'OPEN', 5, now() - interval '1 hour'),
                        ('channel', 'email', 'OPEN', 5, now() - interval '1 hour');
             insert into public.received_events (webhook_id, route, event_type, payload)
                 values ('evt_legacy_received', '/webhooks/logger', 'message.created', '{}');",
        )
        .await
        .unwrap();
    (db, unsent)
}

#[tokio::test]
async fn a_database_of_the_release_before_schemas_is_upgraded_in_place_and_keeps_flowing() {
    let brokers = kafka_brokers();
    let topic = unique_topic("e2e-upgrade");
    outbox_core::kafka::ensure_topics(&brokers, std::slice::from_ref(&topic), 3)
        .await
        .expect("topic");
    let (db, unsent) = legacy_database_with_rows(&topic).await;
    let mut stack = Stack::start_on(db, &topic, &brokers).await;

    // Every table left public, with its rows, and the legacy history went with them, once each
    // of the four services has applied its own schema's migrations.
    stack
        .db
        .wait_for_count(
            "nothing of the product stays in public",
            "select count(*) from pg_tables where schemaname = 'public'",
            0,
            Duration::from_secs(30),
        )
        .await;
    for (table, rows) in [
        ("outbox.outbox", 5),
        ("outbox.events where payload is not null", 5),
        ("producer.messages", 5),
        ("webhooks.inbox", 2),
        ("webhooks.deliveries", 2),
        ("webhooks.circuit_breakers", 1),
        ("notifier.circuit_breakers", 1),
        ("notifier.received_events", 1),
    ] {
        let n = stack
            .db
            .count(&format!("select count(*) from {table}"))
            .await;
        assert!(n >= rows, "{table}: {n} rows, expected at least {rows}");
    }
    // The outbox keeps flowing: P and X rows are sent, E and D stay as they were.
    stack
        .db
        .wait_for_count(
            "the legacy unsent rows are sent",
            "select count(*) from outbox.outbox where state in ('P', 'X')",
            0,
            Duration::from_secs(30),
        )
        .await;
    assert_eq!(
        stack
            .db
            .count("select count(*) from outbox.outbox where state = 'D'")
            .await,
        1
    );
    let received = eventually(
        "the notifier got the legacy events",
        Duration::from_secs(30),
        || async {
            let ids = stack.received_ids().await;
            unsent.iter().all(|id| ids.contains(id)).then_some(ids)
        },
    )
    .await;
    assert!(received.len() >= unsent.len());
    let stored = stack.db.count("select count(*) from notifier.received_events where webhook_id = 'evt_legacy_received'").await;
    assert_eq!(stored, 1, "the notifier's old events stay");

    // The consumer's state came along: its breaker is still open, the dead letter listed and
    // replayable, and the pending delivery goes out once its endpoint has an address.
    let admin = stack.consumer.admin();
    let legacy = admin
        .breaker("ep_legacy")
        .await
        .expect("the legacy breaker");
    assert_eq!(legacy.view.breaker.state, BreakerState::Open, "{legacy:?}");
    let dead = admin
        .list_deliveries(&DeliveryFilter::state(DeliveryState::Dead))
        .await
        .unwrap()
        .deliveries;
    assert!(
        dead.iter().any(|d| d.fields.event_id == "evt_legacy_dead"),
        "{dead:?}"
    );
    // The operator points the old endpoint at the notifier (its secret is the notifier's).
    let logger = stack.notifier.url("/webhooks/logger");
    stack
        .db
        .execute(
            "update webhooks.endpoints set url = $1, secret = $2 where id = 'ep_legacy'",
            &[&logger, &stack.secret.as_str()],
        )
        .await;
    admin.reset_breaker("ep_legacy").await.unwrap();
    let delivered = "select count(*) from webhooks.deliveries
                      where event_id = 'evt_legacy_pending' and state = 'succeeded'";
    let what = "the legacy pending delivery is delivered";
    stack
        .db
        .wait_for_count(what, delivered, 1, Duration::from_secs(30))
        .await;
    // And a new message goes all the way, as on a fresh database.
    let id = stack
        .post("after the upgrade".into(), "req_after_upgrade")
        .await
        .expect("201");
    eventually(
        "the new message arrives",
        Duration::from_secs(30),
        || async { stack.received_ids().await.contains(&id).then_some(()) },
    )
    .await;
    stack.stop().await;
}

/// An example service from `examples/`, run as its own process against the stack's database.
struct Example {
    base: String,
    _process: tokio::process::Child,
}

impl Example {
    async fn start(program: &str, args: &[&str], database_url: &str) -> Example {
        let port = {
            let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            probe.local_addr().unwrap().port()
        };
        let process = tokio::process::Command::new(program)
            .args(args)
            .env("DATABASE_URL", database_url)
            .env("PORT", port.to_string())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("{program} starts ({e}); scripts/test.sh installs the examples")
            });
        let base = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        eventually(
            &format!("{program} answers"),
            Duration::from_secs(30),
            || async {
                let r = http.get(format!("{base}/health")).send().await.ok()?;
                r.status().is_success().then_some(())
            },
        )
        .await;
        Example {
            base,
            _process: process,
        }
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Value) -> (u16, Value) {
        let r = reqwest::Client::new()
            .request(method, format!("{}{path}", self.base))
            .json(&body)
            .send()
            .await
            .expect("the example answers");
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }
}

fn examples_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

/// The stack with the examples' event types routed to its topic, once the routes are stored.
async fn stack_for_examples() -> Stack {
    let brokers = kafka_brokers();
    let topic = unique_topic("e2e-examples");
    outbox_core::kafka::ensure_topics(&brokers, std::slice::from_ref(&topic), 3)
        .await
        .expect("topic");
    let routes = format!("product.*={topic},order.*={topic}");
    let stack = Stack::start_routed(TestDb::create().await, &topic, &brokers, &routes).await;
    stack
        .db
        .wait_for_count(
            "TOPIC_ROUTES stored",
            "select count(*) from outbox.routes where pattern in ('product.*', 'order.*')",
            2,
            Duration::from_secs(20),
        )
        .await;
    stack
}

#[tokio::test]
async fn the_node_products_example_publishes_in_its_transactions_and_a_rollback_publishes_nothing()
{
    let stack = stack_for_examples().await;
    let script = examples_dir().join("products/server.js");
    let products = Example::start("node", &[script.to_str().unwrap()], &stack.db.url).await;
    use reqwest::Method;

    let product = json!({"sku": "sku-1", "name": "Lamp", "price": 10});
    let (status, created) = products
        .call(Method::POST, "/products", product.clone())
        .await;
    assert_eq!(status, 201, "{created}");
    // The same sku again: its event was published first in the transaction, then rolled back.
    let (status, body) = products.call(Method::POST, "/products", product).await;
    assert_eq!(status, 409, "{body}");
    let (status, updated) = products
        .call(Method::PUT, "/products/sku-1", json!({"price": 12.5}))
        .await;
    assert_eq!(status, 200, "{updated}");
    let (status, _) = products
        .call(Method::PUT, "/products/nope", json!({"price": 1}))
        .await;
    assert_eq!(status, 404);

    let ids: Vec<String> = [&created, &updated]
        .iter()
        .map(|b| b["event_id"].as_str().unwrap().to_owned())
        .collect();
    let received = eventually(
        "both product events at the notifier",
        Duration::from_secs(30),
        || async {
            let events = stack.received().await;
            ids.iter()
                .all(|id| events.iter().any(|e| &e.webhook_id == id))
                .then_some(events)
        },
    )
    .await;
    let types: Vec<&str> = ids
        .iter()
        .map(|id| {
            received
                .iter()
                .find(|e| &e.webhook_id == id)
                .unwrap()
                .event_type
                .as_deref()
                .unwrap_or("")
        })
        .collect();
    assert_eq!(types, ["product.created", "product.updated"]);
    assert_eq!(
        stack
            .db
            .count("select count(*) from outbox.outbox where aggregate_id = 'sku-1'")
            .await,
        2,
        "the rolled-back create left no event"
    );
}

#[tokio::test]
async fn the_go_orders_example_sends_100_updates_of_one_order_in_order() {
    let stack = stack_for_examples().await;
    let binary = std::env::var("EXAMPLE_ORDERS_BIN").unwrap_or_else(|_| {
        examples_dir()
            .join("../target/examples/orders")
            .to_string_lossy()
            .into_owned()
    });
    let orders = Example::start(&binary, &[], &stack.db.url).await;
    use reqwest::Method;

    let (status, body) = orders
        .call(Method::POST, "/orders/o-1/process", json!({"total": -1}))
        .await;
    assert_eq!(status, 422, "{body}");
    let mut ids = Vec::new();
    for n in 1..=100 {
        let (status, body) = orders
            .call(Method::POST, "/orders/o-1/process", json!({"total": n}))
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["order"]["revision"], n);
        ids.push(body["event_id"].as_str().unwrap().to_owned());
    }
    eventually(
        "all 100 at the notifier",
        Duration::from_secs(60),
        || async {
            let received = stack.received_ids().await;
            ids.iter().all(|id| received.contains(id)).then_some(())
        },
    )
    .await;
    let records =
        outbox_core::testing::read_topic(&stack.topic, 100, Duration::from_secs(30)).await;
    let revisions: Vec<i64> = records
        .iter()
        .filter(|r| r.key.as_deref() == Some("o-1"))
        .map(|r| r.json()["data"]["revision"].as_i64().unwrap())
        .collect();
    assert_eq!(
        revisions,
        (1..=100).collect::<Vec<i64>>(),
        "one key, in commit order"
    );
    assert_eq!(
        stack
            .db
            .count("select count(*) from outbox.outbox where aggregate_id = 'o-1'")
            .await,
        100,
        "the refused negative total published nothing"
    );
}
