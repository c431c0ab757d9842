//! Starting the producer and the relay in-process against a fresh database and topic.

#![allow(dead_code)]

use std::time::Duration;

use futures::StreamExt;
use outbox_core::testing::{eventually, TestDb};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

pub struct Pipeline {
    pub db: TestDb,
    pub topic: String,
    pub producer_url: String,
    pub relay_url: String,
    pub http: reqwest::Client,
    pub producer_stop: CancellationToken,
    pub relay_stop: CancellationToken,
    pub relay: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        self.producer_stop.cancel();
        self.relay_stop.cancel();
    }
}

pub fn relay_config(db: &TestDb, brokers: &str, topic: &str) -> relay::Config {
    outbox_core::telemetry::init_logging();
    let mut config: relay::Config = outbox_core::config::from_env().expect("relay defaults");
    config.database.database_url = db.url.clone();
    config.kafka.kafka_brokers = brokers.to_owned();
    config.kafka_topic = topic.to_owned();
    config.poll_interval = Duration::from_millis(200);
    config.send_timeout = Duration::from_secs(2);
    config.retry_base = Duration::from_millis(100);
    config.retry_max = Duration::from_millis(500);
    config.standby_poll = Duration::from_millis(200);
    // Each test database elects its own leader.
    config.lock_key = rand_key();
    config
}

fn rand_key() -> i64 {
    (uuid::Uuid::new_v4().as_u128() as i64).abs()
}

pub async fn start_producer(db: &TestDb, topic: &str, stop: CancellationToken) -> String {
    let mut config: producer::Config = outbox_core::config::from_env().expect("producer defaults");
    config.database.database_url = db.url.clone();
    config.kafka_topic = topic.to_owned();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(producer::run(config, listener, stop));
    url
}

pub async fn start_relay(
    config: relay::Config,
    stop: CancellationToken,
) -> (String, tokio::task::JoinHandle<anyhow::Result<()>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    (url, tokio::spawn(relay::run(config, listener, stop)))
}

impl Pipeline {
    pub async fn start(brokers: &str, tweak: impl FnOnce(&mut relay::Config)) -> Pipeline {
        let db = TestDb::create().await;
        let topic = outbox_core::testing::unique_topic("relay-test");
        let producer_stop = CancellationToken::new();
        let relay_stop = CancellationToken::new();
        let producer_url = start_producer(&db, &topic, producer_stop.clone()).await;
        let mut config = relay_config(&db, brokers, &topic);
        tweak(&mut config);
        let (relay_url, relay) = start_relay(config, relay_stop.clone()).await;
        Pipeline {
            db,
            topic,
            producer_url,
            relay_url,
            http: reqwest::Client::new(),
            producer_stop,
            relay_stop,
            relay: Some(relay),
        }
    }

    /// POSTs a message; returns its event id. Panics unless the answer is 201.
    pub async fn post(&self, body: Value) -> String {
        let response = self
            .http
            .post(format!("{}/messages", self.producer_url))
            .json(&body)
            .send()
            .await
            .expect("producer answers");
        assert_eq!(response.status(), reqwest::StatusCode::CREATED);
        let body: Value = response.json().await.unwrap();
        body["event_id"].as_str().unwrap().to_owned()
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

    pub async fn metrics(&self) -> String {
        self.http
            .get(format!("{}/metrics", self.relay_url))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
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
