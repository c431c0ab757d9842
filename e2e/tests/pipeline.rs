//! The whole pipeline, as a user runs it: `POST /messages` at the producer, the relay, Kafka, the
//! consumer, and the notifier receiving signed webhooks. All four services run in this process on
//! one fresh database, with a fresh topic.
//!
//! The outage test counts like Jepsen's total-queue checker: acknowledged = ids answered 201,
//! received = ids the notifier stored; lost = acknowledged − received must be empty, as must
//! unexpected = received − attempted. Duplicates are counted, not fatal (the notifier drops them).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use outbox_core::signature::Secret;
use outbox_core::testing::{
    chaos_stack, eventually, kafka_brokers, unique_topic, TestDb, CHAOS_BROKER,
};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
struct NotifierCli {
    #[command(flatten)]
    config: notifier::Config,
}

struct Service {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Service {
    async fn stop(mut self) {
        self.stop.cancel();
        let _ = (&mut self.task).await;
    }
    async fn kill(mut self) {
        self.task.abort();
        let _ = (&mut self.task).await;
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Binds `port` (0: any). A restarted service takes its predecessor's port, which the predecessor's
/// aborted tasks may hold for a moment longer.
async fn listen(port: u16) -> (TcpListener, u16) {
    let listener = eventually("the port is free", Duration::from_secs(10), || async {
        TcpListener::bind(("127.0.0.1", port)).await.ok()
    })
    .await;
    let port = listener.local_addr().unwrap().port();
    (listener, port)
}

struct Stack {
    db: TestDb,
    topic: String,
    brokers: String,
    secret: Secret,
    group: String,
    producer_url: String,
    consumer_url: String,
    notifier_port: u16,
    http: reqwest::Client,
    producer: Service,
    relay: Service,
    consumer: Service,
    notifier: Service,
}

impl Stack {
    async fn start(brokers: &str) -> Stack {
        Self::start_on(TestDb::create().await, &unique_topic("e2e"), brokers).await
    }

    /// The four services on `db` (migrated by them as they start), sending to `topic`.
    async fn start_on(db: TestDb, topic: &str, brokers: &str) -> Stack {
        outbox_core::telemetry::init_logging();
        let topic = topic.to_owned();
        outbox_core::kafka::ensure_topics(brokers, std::slice::from_ref(&topic), 3)
            .await
            .expect("topic");
        let secret = Secret::generate();
        let group = format!("e2e-{}", uuid::Uuid::new_v4().simple());

        let mut producer_config: producer::Config = outbox_core::config::from_env().unwrap();
        producer_config.database.database_url = db.url.clone();
        producer_config.kafka_topic = topic.clone();
        producer_config.admin_token = None;
        let (listener, port) = listen(0).await;
        let stop = CancellationToken::new();
        let producer = Service {
            task: tokio::spawn(producer::run(producer_config, listener, stop.clone())),
            stop,
        };

        let mut relay_config: relay::Config = outbox_core::config::from_env().unwrap();
        relay_config.database.database_url = db.url.clone();
        relay_config.kafka.kafka_brokers = brokers.to_owned();
        relay_config.kafka_topic = topic.clone();
        relay_config.poll_interval = Duration::from_millis(200);
        relay_config.send_timeout = Duration::from_secs(1);
        relay_config.retry_max = Duration::from_millis(500);
        relay_config.lock_key = (uuid::Uuid::new_v4().as_u128() as i64).abs();
        let (relay_listener, _) = listen(0).await;
        let stop = CancellationToken::new();
        let relay = Service {
            task: tokio::spawn(relay::run(relay_config, relay_listener, stop.clone())),
            stop,
        };

        let (consumer, consumer_port) =
            Self::start_consumer_on(&db, brokers, &topic, &group, 0).await;
        let (notifier, notifier_port) = Self::start_notifier_on(&db, &secret, 0).await;
        let stack = Stack {
            producer_url: format!("http://127.0.0.1:{port}"),
            consumer_url: format!("http://127.0.0.1:{consumer_port}"),
            notifier_port,
            http: reqwest::Client::new(),
            producer,
            relay,
            consumer,
            notifier,
            db,
            topic,
            brokers: brokers.to_owned(),
            secret,
            group,
        };
        stack.wait_until_consumer_ready().await;
        let url = format!("http://127.0.0.1:{}/webhooks/logger", stack.notifier_port);
        let r = stack
            .http
            .post(format!("{}/endpoints", stack.consumer_url))
            .json(&json!({"url": url, "event_types": ["*"], "secret": stack.secret.as_str(), "description": "e2e notifier"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
        stack
    }

    async fn start_consumer_on(
        db: &TestDb,
        brokers: &str,
        topic: &str,
        group: &str,
        port: u16,
    ) -> (Service, u16) {
        let mut c: consumer::Config = outbox_core::config::from_env().unwrap();
        c.database.database_url = db.url.clone();
        c.kafka.kafka_brokers = brokers.to_owned();
        c.consumer_topics = vec![topic.to_owned()];
        c.consumer_group = group.to_owned();
        c.allow_private_endpoints = true;
        c.admin_token = None;
        c.endpoints_file = None;
        // Enough attempts to outlast the receiver's downtime in the outage test.
        c.retry_schedule = "0ms,100ms,200ms,500ms,1s,1s,1s,2s,2s,2s,2s,2s,2s,2s,2s"
            .parse()
            .unwrap();
        c.delivery_timeout = Duration::from_secs(2);
        c.delivery_lease = Duration::from_secs(3);
        c.breaker.breaker_open_for = Duration::from_millis(500);
        c.dispatch_poll_interval = Duration::from_millis(20);
        c.kafka_statistics_interval = Duration::from_millis(500);
        let (listener, port) = listen(port).await;
        let stop = CancellationToken::new();
        let task = tokio::spawn(consumer::run(c, listener, stop.clone()));
        (Service { stop, task }, port)
    }

    async fn start_notifier_on(db: &TestDb, secret: &Secret, port: u16) -> (Service, u16) {
        let cli = NotifierCli::try_parse_from([
            "notifier",
            "--webhook-secret",
            secret.as_str(),
            "--database-url",
            &db.url,
        ])
        .expect("notifier flags");
        let mut config = cli.config;
        config.admin_token = None;
        let (listener, port) = listen(port).await;
        let stop = CancellationToken::new();
        let task = tokio::spawn(notifier::run(config, listener, stop.clone()));
        (Service { stop, task }, port)
    }

    /// Kills the consumer as in a crash and starts a new one (same group, same address).
    async fn restart_consumer(&mut self) {
        let port = self
            .consumer_url
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        let old = std::mem::replace(
            &mut self.consumer,
            Service {
                stop: CancellationToken::new(),
                task: tokio::spawn(async { Ok(()) }),
            },
        );
        old.kill().await;
        let (fresh, port) =
            Self::start_consumer_on(&self.db, &self.brokers, &self.topic, &self.group, port).await;
        self.consumer = fresh;
        self.consumer_url = format!("http://127.0.0.1:{port}");
        self.wait_until_consumer_ready().await;
    }

    async fn wait_until_consumer_ready(&self) {
        let http = &self.http;
        let url = &self.consumer_url;
        eventually(
            "the consumer is ready",
            Duration::from_secs(30),
            || async move {
                let r = http.get(format!("{url}/ready")).send().await.ok()?;
                r.status().is_success().then_some(())
            },
        )
        .await;
    }

    /// POSTs one message; Some(event id) when the producer answered 201.
    async fn post(&self, content: String, correlation_id: &str) -> Option<String> {
        let r = self
            .http
            .post(format!("{}/messages", self.producer_url))
            .header("x-correlation-id", correlation_id)
            .json(&json!({"content": content}))
            .send()
            .await
            .ok()?;
        if r.status() != 201 {
            return None;
        }
        let body: Value = r.json().await.ok()?;
        body["event_id"].as_str().map(str::to_owned)
    }

    /// The webhook ids the notifier stored, as `GET /webhooks/events` pages through them.
    async fn received(&self) -> Vec<Value> {
        let mut events = Vec::new();
        let mut before: Option<i64> = None;
        loop {
            let mut url = format!(
                "http://127.0.0.1:{}/webhooks/events?limit=100",
                self.notifier_port
            );
            if let Some(b) = before {
                url.push_str(&format!("&before={b}"));
            }
            let Ok(r) = self.http.get(&url).send().await else {
                return events;
            };
            let Ok(page) = r.json::<Value>().await else {
                return events;
            };
            events.extend(page["events"].as_array().cloned().unwrap_or_default());
            match page["next_before"].as_i64() {
                Some(next) => before = Some(next),
                None => return events,
            }
        }
    }

    async fn get_json(&self, url: &str) -> Value {
        let r = self.http.get(url).send().await.expect("answers");
        assert_eq!(r.status(), 200, "GET {url}");
        r.json().await.expect("JSON")
    }

    async fn received_ids(&self) -> HashSet<String> {
        self.received()
            .await
            .iter()
            .filter_map(|e| e["webhook_id"].as_str().map(str::to_owned))
            .collect()
    }

    async fn notifier_metric(&self, name: &str, labels: &[&str]) -> u64 {
        let text = self
            .http
            .get(format!("http://127.0.0.1:{}/metrics", self.notifier_port))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        outbox_core::testing::metric_total(&text, name, labels) as u64
    }
}

#[tokio::test]
async fn a_posted_message_reaches_the_notifier_signed_once_with_its_correlation_id() {
    let stack = Stack::start(&kafka_brokers()).await;
    let mut ids = Vec::new();
    for i in 0..20 {
        ids.push(
            stack
                .post(format!("hello {i}"), &format!("req_e2e_{i}"))
                .await
                .expect("201"),
        );
    }
    let expected: HashSet<String> = ids.iter().cloned().collect();
    eventually(
        "the notifier stored every event",
        Duration::from_secs(60),
        || async { (stack.received_ids().await == expected).then_some(()) },
    )
    .await;
    let events = stack.received().await;
    let first = events
        .iter()
        .find(|e| e["webhook_id"] == ids[0].as_str())
        .expect("first event");
    let body = &first["payload"];
    assert_eq!(body["id"], ids[0].as_str());
    assert_eq!(body["event"], "message.created");
    assert_eq!(body["data"]["content"], "hello 0");
    assert_eq!(body["metadata"]["correlation_id"], "req_e2e_0");
    assert_eq!(
        first["correlation_id"], "req_e2e_0",
        "X-Correlation-Id travels to the receiver"
    );
    assert_eq!(
        stack
            .db
            .count("select count(*) from outbox where state = 'E'")
            .await,
        20
    );
    // The consumer records a delivery's success after the receiver answered, a moment later.
    eventually(
        "20 deliveries recorded as succeeded",
        Duration::from_secs(10),
        || async {
            let succeeded = stack
                .db
                .count("select count(*) from deliveries where state = 'succeeded'")
                .await;
            (succeeded == 20).then_some(())
        },
    )
    .await;
    let _ = (
        &stack.producer,
        &stack.relay,
        &stack.consumer,
        &stack.notifier,
        &stack.group,
    );
}

#[tokio::test]
async fn kafka_stopped_consumer_killed_receiver_down_under_load_nothing_acknowledged_is_lost() {
    chaos_stack("kafka-start");
    let mut stack = Stack::start(CHAOS_BROKER).await;
    let attempted = Arc::new(Mutex::new(0usize));
    let acknowledged = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop_posting = CancellationToken::new();
    let load = {
        let (attempted, acknowledged, stop_posting) = (
            attempted.clone(),
            acknowledged.clone(),
            stop_posting.clone(),
        );
        let http = stack.http.clone();
        let url = format!("{}/messages", stack.producer_url);
        tokio::spawn(async move {
            let mut i = 0;
            while !stop_posting.is_cancelled() {
                let posts = (0..5).map(|k| {
                    let http = http.clone();
                    let url = url.clone();
                    let n = i + k;
                    async move {
                        let r = http
                            .post(url)
                            .json(&json!({"content": format!("load {n}")}))
                            .send()
                            .await
                            .ok()?;
                        if r.status() != 201 {
                            return None;
                        }
                        r.json::<Value>().await.ok()?["event_id"]
                            .as_str()
                            .map(str::to_owned)
                    }
                });
                let answers = futures::future::join_all(posts).await;
                *attempted.lock().unwrap() += answers.len();
                acknowledged
                    .lock()
                    .unwrap()
                    .extend(answers.into_iter().flatten());
                i += 5;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    chaos_stack("kafka-stop");
    tokio::time::sleep(Duration::from_secs(3)).await;
    chaos_stack("kafka-start");
    tokio::time::sleep(Duration::from_secs(1)).await;
    stack.restart_consumer().await;
    // The receiver goes away for two seconds: deliveries fail, the breaker opens, they wait.
    let notifier = std::mem::replace(
        &mut stack.notifier,
        Service {
            stop: CancellationToken::new(),
            task: tokio::spawn(async { Ok(()) }),
        },
    );
    notifier.stop().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (fresh, _) = Stack::start_notifier_on(&stack.db, &stack.secret, stack.notifier_port).await;
    stack.notifier = fresh;
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop_posting.cancel();
    load.await.unwrap();
    let faults_over = started.elapsed();

    let acknowledged: Vec<String> = acknowledged.lock().unwrap().clone();
    let attempted = *attempted.lock().unwrap();
    let acked: HashSet<String> = acknowledged.iter().cloned().collect();
    assert!(
        acked.len() > 100,
        "the load ran: {} acknowledged",
        acked.len()
    );
    let received = eventually(
        "every acknowledged event at the receiver",
        Duration::from_secs(120),
        || {
            let stack = &stack;
            let acked = &acked;
            async move {
                let received = stack.received_ids().await;
                acked.is_subset(&received).then_some(received)
            }
        },
    )
    .await;
    let lost: Vec<&String> = acked.difference(&received).collect();
    let unexpected = received.difference(&acked).count();
    let duplicates = stack
        .notifier_metric(
            "notifier_webhooks_received_total",
            &["outcome=\"duplicate\""],
        )
        .await;
    eprintln!(
        "outage run: {attempted} attempted, {} acknowledged, {} received, {} lost, {unexpected} unexpected, \
         {duplicates} duplicate deliveries dropped by the notifier (faults over after {faults_over:?}, drained {:?} later)",
        acked.len(),
        received.len(),
        lost.len(),
        started.elapsed() - faults_over
    );
    assert!(lost.is_empty(), "lost: {lost:?}");
    // A 503/timeout at the producer may still have committed; such ids are received but were never
    // answered 201. They are attempted, so they are not unexpected in Jepsen's sense; there are none
    // here because PostgreSQL never went down.
    assert_eq!(unexpected, 0);
    assert_eq!(
        stack
            .db
            .count("select count(*) from outbox where state = 'D'")
            .await,
        0
    );
    assert_eq!(
        stack
            .db
            .count("select count(*) from deliveries where state = 'dead'")
            .await,
        0
    );
    stack.producer.stop().await;
    stack.relay.stop().await;
    stack.consumer.stop().await;
    stack.notifier.stop().await;
    chaos_stack("kafka-stop");
}

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
    let stack = Stack::start_on(db, &topic, &brokers).await;

    // Every table left public, with its rows, and the legacy history went with them, once each
    // of the four services has applied its own schema's migrations.
    eventually(
        "nothing of the product stays in public",
        Duration::from_secs(30),
        || async {
            let left = stack
                .db
                .count("select count(*) from pg_tables where schemaname = 'public'")
                .await;
            (left == 0).then_some(())
        },
    )
    .await;
    for (table, rows) in [
        ("outbox.outbox", 5),
        ("outbox.outbox_payloads", 5),
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
    eventually(
        "the legacy unsent rows are sent",
        Duration::from_secs(30),
        || async {
            (stack
                .db
                .count("select count(*) from outbox.outbox where state in ('P', 'X')")
                .await
                == 0)
                .then_some(())
        },
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
    let breakers: Value = stack
        .get_json(&format!("{}/circuit-breakers", stack.consumer_url))
        .await;
    let legacy = breakers["circuit_breakers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["endpoint_id"] == "ep_legacy")
        .cloned()
        .expect("the legacy breaker");
    assert_eq!(legacy["state"], "OPEN", "{legacy}");
    let dead: Value = stack
        .get_json(&format!("{}/deliveries?state=dead", stack.consumer_url))
        .await;
    assert!(dead.to_string().contains("evt_legacy_dead"), "{dead}");
    // The operator points the old endpoint at the notifier (its secret is the notifier's).
    let logger = format!("http://127.0.0.1:{}/webhooks/logger", stack.notifier_port);
    stack
        .db
        .client()
        .await
        .execute(
            "update webhooks.endpoints set url = $1, secret = $2 where id = 'ep_legacy'",
            &[&logger, &stack.secret.as_str()],
        )
        .await
        .unwrap();
    let r = stack
        .http
        .post(format!(
            "{}/circuit-breakers/ep_legacy/reset",
            stack.consumer_url
        ))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    eventually("the legacy pending delivery is delivered", Duration::from_secs(30), || async {
        (stack
            .db
            .count("select count(*) from webhooks.deliveries where event_id = 'evt_legacy_pending' and state = 'succeeded'")
            .await
            == 1)
            .then_some(())
    })
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
    stack.producer.stop().await;
    stack.relay.stop().await;
    stack.consumer.stop().await;
    stack.notifier.stop().await;
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

/// The stack with the examples' event types routed to its topic.
async fn stack_for_examples() -> Stack {
    let stack = Stack::start(&kafka_brokers()).await;
    eventually("TOPIC_ROUTES stored", Duration::from_secs(20), || async {
        (stack.db.count("select count(*) from outbox.routes").await > 0).then_some(())
    })
    .await;
    stack
        .db
        .client()
        .await
        .execute(
            "insert into outbox.routes values (100, 'product.*', $1), (101, 'order.*', $1)",
            &[&stack.topic],
        )
        .await
        .unwrap();
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
                .all(|id| events.iter().any(|e| e["webhook_id"] == id.as_str()))
                .then_some(events)
        },
    )
    .await;
    let types: Vec<&str> = ids
        .iter()
        .map(|id| {
            received
                .iter()
                .find(|e| e["webhook_id"] == id.as_str())
                .unwrap()["event_type"]
                .as_str()
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
