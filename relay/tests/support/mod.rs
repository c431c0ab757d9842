//! Starting the producer and the relay in-process against a fresh database and topic.

#![allow(dead_code)]

use std::time::Duration;

use futures::StreamExt;
use outbox_core::testing::{eventually, TestApp, TestDb};
use serde_json::{json, Value};

/// The producer running in-process.
pub type TestProducer = TestApp<producer::Config>;
/// The relay running in-process.
pub type TestRelay = TestApp<relay::Config>;

/// The producer and the relay on one fresh database, sending to a fresh topic.
pub struct Pipeline {
    pub db: TestDb,
    pub topic: String,
    pub producer: TestProducer,
    pub relay: TestRelay,
}

pub fn relay_config(db: &TestDb, brokers: &str, topic: &str) -> relay::Config {
    let mut config: relay::Config = outbox_core::config::from_env().expect("relay defaults");
    config.database.database_url = db.url.clone();
    config.kafka.kafka_brokers = brokers.to_owned();
    config.topics.kafka_topic = topic.to_owned();
    config.poll_interval = Duration::from_millis(200);
    config.send_timeout = Duration::from_secs(2);
    config.retry_base = Duration::from_millis(100);
    config.retry_max = Duration::from_millis(500);
    config.standby_poll = Duration::from_millis(200);
    // Each test database elects its own leader.
    config.lock_key = rand_key();
    config
}

pub fn rand_key() -> i64 {
    (uuid::Uuid::new_v4().as_u128() as i64).abs()
}

/// Starts the producer on `db`, writing events for `topic` (not waiting for `/ready`).
pub async fn spawn_producer(db: &TestDb, topic: &str) -> TestProducer {
    let mut config: producer::Config = outbox_core::config::from_env().expect("producer defaults");
    config.database.database_url = db.url.clone();
    config.topics.kafka_topic = topic.to_owned();
    TestApp::spawn(db.clone(), config, producer::run).await
}

/// Starts the relay with `config` on `db` (not waiting for `/ready`).
pub async fn spawn_relay(db: &TestDb, config: relay::Config) -> TestRelay {
    TestApp::spawn(db.clone(), config, relay::run).await
}

impl Pipeline {
    pub async fn start(brokers: &str, tweak: impl FnOnce(&mut relay::Config)) -> Pipeline {
        let db = TestDb::create().await;
        let topic = outbox_core::testing::unique_topic("relay-test");
        let producer = spawn_producer(&db, &topic).await;
        let mut config = relay_config(&db, brokers, &topic);
        tweak(&mut config);
        let relay = spawn_relay(&db, config).await;
        Pipeline {
            db,
            topic,
            producer,
            relay,
        }
    }

    /// POSTs a message; returns its event id. Panics unless the answer is 201.
    pub async fn post(&self, body: Value) -> String {
        post_message(&self.producer, body)
            .await
            .expect("the producer answers 201")
    }

    /// POSTs `contents` with at most `concurrency` requests in flight; returns the event ids.
    pub async fn post_many(&self, bodies: Vec<Value>, concurrency: usize) -> Vec<String> {
        futures::stream::iter(bodies)
            .map(|b| self.post(b))
            .buffer_unordered(concurrency)
            .collect()
            .await
    }

    pub async fn count_state(&self, state: &str) -> i64 {
        self.db
            .count(&format!(
                "select count(*) from outbox where state = '{state}'"
            ))
            .await
    }

    /// Waits until every outbox row is E.
    pub async fn all_sent(&self, expected: i64, timeout: Duration) {
        eventually(&format!("{expected} rows in state E"), timeout, || async {
            (self.count_state("E").await == expected
                && self.db.count("select count(*) from outbox").await == expected)
                .then_some(())
        })
        .await;
    }

    /// The relay's `/metrics`.
    pub async fn metrics(&self) -> String {
        self.relay.metrics().await
    }
}

/// Waits (up to `timeout`) until `n` outbox rows are sent (state E); `what` names the wait.
pub async fn wait_for_sent(db: &TestDb, what: &str, n: i64, timeout: Duration) {
    db.wait_for_count(
        what,
        "select count(*) from outbox where state = 'E'",
        n,
        timeout,
    )
    .await;
}

/// POSTs a message to the producer: `Some(event id)` when it answered 201, `None` otherwise
/// (or when it did not answer).
pub async fn post_message(producer: &TestProducer, body: Value) -> Option<String> {
    let response = producer
        .http
        .post(producer.url("/messages"))
        .json(&body)
        .send()
        .await
        .ok()?;
    if response.status() != reqwest::StatusCode::CREATED {
        return None;
    }
    let body: Value = response.json().await.ok()?;
    body["event_id"].as_str().map(str::to_owned)
}

pub fn message(content: impl Into<String>, key: Option<&str>) -> Value {
    match key {
        Some(key) => json!({"content": content.into(), "key": key}),
        None => json!({"content": content.into()}),
    }
}

/// Event ids in a topic, with how often each appears.
pub fn id_counts(
    records: &[outbox_core::testing::Record],
) -> std::collections::HashMap<String, usize> {
    let mut counts = std::collections::HashMap::new();
    for r in records {
        *counts
            .entry(r.json()["id"].as_str().unwrap().to_owned())
            .or_insert(0) += 1;
    }
    counts
}

/// For each key, the `content` values in the order the topic holds them (per partition order).
pub fn contents_by_key(
    records: &[outbox_core::testing::Record],
) -> std::collections::HashMap<String, Vec<String>> {
    let mut sorted: Vec<&outbox_core::testing::Record> = records.iter().collect();
    sorted.sort_by_key(|r| (r.partition, r.offset));
    let mut by_key: std::collections::HashMap<String, Vec<String>> =
        std::collections::HashMap::new();
    for r in sorted {
        let v = r.json();
        by_key
            .entry(r.key.clone().unwrap_or_default())
            .or_default()
            .push(v["data"]["content"].as_str().unwrap().to_owned());
    }
    by_key
}

/// A topic of one partition whose records may hold at most 2,000 bytes: Kafka refuses larger
/// ones for good.
pub async fn topic_refusing_large_records(brokers: &str) -> String {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    let name = outbox_core::testing::unique_topic("relay-small");
    let admin: AdminClient<rdkafka::client::DefaultClientContext> =
        outbox_core::kafka::base_config(brokers, "test-admin")
            .create()
            .unwrap();
    let topic =
        NewTopic::new(&name, 1, TopicReplication::Fixed(1)).set("max.message.bytes", "2000");
    admin
        .create_topics(&[topic], &AdminOptions::new())
        .await
        .unwrap();
    name
}

/// Content that [`topic_refusing_large_records`] refuses: random text, which does not compress
/// below the limit.
pub fn refused_content() -> String {
    (0..200)
        .map(|_| uuid::Uuid::new_v4().simple().to_string())
        .collect()
}
