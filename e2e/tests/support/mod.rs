//! What the end-to-end tests share: the four services started in-process on one database, each a
//! [`TestApp`] handle, with the consumer's and the notifier's typed clients (their crates' test
//! support files, included here).

#![allow(dead_code)]

use std::collections::HashSet;
use std::time::Duration;

use clap::Parser;
use outbox_core::signature::Secret;
use outbox_core::testing::{unique_topic, TestApp, TestDb};
use serde_json::{json, Value};

#[path = "../../../consumer/tests/support/admin.rs"]
pub mod consumer_admin;
#[path = "../../../notifier/tests/support/api.rs"]
pub mod notifier_api;

pub use consumer_admin::{ConsumerAdmin, NewEndpoint};
pub use notifier_api::NotifierApi;

#[derive(Parser)]
pub struct NotifierCli {
    #[command(flatten)]
    config: notifier::Config,
}

pub struct Stack {
    pub db: TestDb,
    pub topic: String,
    pub brokers: String,
    pub secret: Secret,
    pub group: String,
    pub http: reqwest::Client,
    pub producer: TestApp<producer::Config>,
    /// Its health and metrics (`kafka_consumergroup_lag` of this stack's group).
    pub relay: TestApp<relay::Config>,
    pub consumer: TestApp<consumer::Config>,
    pub notifier: TestApp<notifier::Config>,
}

/// How often the services poll and report: at test speed, or as deployed.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Timings {
    /// Polls, retries and reports within milliseconds, so that tests see the outcome fast.
    Test,
    /// The services' defaults for the intervals a steady flow runs on (the relay's and the
    /// dispatchers' polls, offset commits, lag and statistics reports): what a benchmark should measure, since
    /// test-speed polling costs CPU that a deployment does not spend. Retries keep test speed.
    Deployed,
}

impl Stack {
    pub async fn start(brokers: &str) -> Stack {
        Self::start_on(TestDb::create().await, &unique_topic("e2e"), brokers).await
    }

    /// [`Stack::start`] with `timings`.
    pub async fn start_timed(brokers: &str, timings: Timings) -> Stack {
        Self::start_with(
            TestDb::create().await,
            &unique_topic("e2e"),
            brokers,
            "",
            timings,
        )
        .await
    }

    /// The four services on `db` (migrated by them as they start), sending to `topic`.
    pub async fn start_on(db: TestDb, topic: &str, brokers: &str) -> Stack {
        Self::start_routed(db, topic, brokers, "").await
    }

    /// [`Stack::start_on`] with `TOPIC_ROUTES` for the producer and the relay (both write them
    /// into `outbox.routes`).
    pub async fn start_routed(db: TestDb, topic: &str, brokers: &str, routes: &str) -> Stack {
        Self::start_with(db, topic, brokers, routes, Timings::Test).await
    }

    async fn start_with(
        db: TestDb,
        topic: &str,
        brokers: &str,
        routes: &str,
        timings: Timings,
    ) -> Stack {
        let topic = topic.to_owned();
        outbox_core::kafka::ensure_topics(brokers, std::slice::from_ref(&topic), 3)
            .await
            .expect("topic");
        let secret = Secret::generate();
        let group = format!("e2e-{}", uuid::Uuid::new_v4().simple());

        let mut producer_config: producer::Config = outbox_core::config::from_env().unwrap();
        producer_config.database.database_url = db.url.clone();
        producer_config.topics.kafka_topic = topic.clone();
        producer_config.topics.topic_routes = routes.to_owned();
        producer_config.admin_token = None;
        let producer = TestApp::spawn(db.clone(), producer_config, producer::run).await;

        let mut consumer_config = consumer_config(&db, brokers, &topic, &group);
        if timings == Timings::Deployed {
            let defaults: consumer::Config = outbox_core::config::from_env().unwrap();
            consumer_config.dispatch_poll_interval = defaults.dispatch_poll_interval;
            consumer_config.kafka_statistics_interval = defaults.kafka_statistics_interval;
            consumer_config.consumer_commit_interval = defaults.consumer_commit_interval;
        }
        let consumer = TestApp::spawn(db.clone(), consumer_config, consumer::run).await;
        let notifier_config = notifier_config(&db, &secret);
        let notifier = TestApp::spawn(db.clone(), notifier_config, notifier::run).await;
        // The notifier's endpoint exists before the relay starts: the consumer fans an event out
        // to the endpoints subscribed when it records it, and rows already in the outbox (a
        // database upgraded in place) would otherwise be recorded before it.
        consumer.wait_ready().await;
        let endpoint = NewEndpoint::new(&notifier.url("/webhooks/logger"), &["*"])
            .secret(secret.as_str())
            .description("e2e notifier");
        consumer
            .admin()
            .create_endpoint(&endpoint)
            .await
            .unwrap_or_else(|refusal| panic!("POST /endpoints: {refusal}"));

        let mut relay_config: relay::Config = outbox_core::config::from_env().unwrap();
        relay_config.database.database_url = db.url.clone();
        relay_config.kafka.kafka_brokers = brokers.to_owned();
        relay_config.topics.kafka_topic = topic.clone();
        relay_config.topics.topic_routes = routes.to_owned();
        if timings == Timings::Test {
            relay_config.poll_interval = Duration::from_millis(200);
            relay_config.lag_poll_interval = Duration::from_millis(300);
        }
        relay_config.send_timeout = Duration::from_secs(1);
        relay_config.retry_max = Duration::from_millis(500);
        relay_config.lock_key = (uuid::Uuid::new_v4().as_u128() as i64).abs();
        relay_config.lag_consumer_groups = vec![group.clone()];
        let relay = TestApp::spawn(db.clone(), relay_config, relay::run).await;
        Stack {
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
        }
    }

    /// Stops the consumer gracefully (it commits what it recorded and leaves the group); see
    /// [`Stack::start_consumer`].
    pub async fn stop_consumer(&mut self) {
        self.consumer.stop().await;
    }

    /// Starts a consumer in the stack's group on its old address, after [`Stack::stop_consumer`],
    /// and waits until it is ready.
    pub async fn start_consumer(&mut self) {
        self.consumer.start().await;
        self.consumer.wait_ready().await;
    }

    /// Kills the consumer as in a crash and starts a new one (same group, same address).
    pub async fn restart_consumer(&mut self) {
        self.consumer.restart().await;
        self.consumer.wait_ready().await;
    }

    /// Stops every service gracefully.
    pub async fn stop(&mut self) {
        self.producer.stop().await;
        self.relay.stop().await;
        self.consumer.stop().await;
        self.notifier.stop().await;
    }

    /// POSTs one message; Some(event id) when the producer answered 201.
    pub async fn post(&self, content: String, correlation_id: &str) -> Option<String> {
        let r = self
            .http
            .post(self.producer.url("/messages"))
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

    /// The events the notifier stored, as `GET /webhooks/events` pages through them.
    pub async fn received(&self) -> Vec<notifier::ReceivedEvent> {
        self.notifier.admin().all_events().await
    }

    pub async fn received_ids(&self) -> HashSet<String> {
        self.received()
            .await
            .into_iter()
            .map(|e| e.webhook_id)
            .collect()
    }

    pub async fn notifier_metric(&self, name: &str, labels: &[&str]) -> u64 {
        let text = self.notifier.metrics().await;
        outbox_core::testing::metric_total(&text, name, labels) as u64
    }
}

/// The consumer of a stack: in `group`, reading `topic`, with enough attempts to outlast the
/// receiver's downtime in the outage test.
pub fn consumer_config(db: &TestDb, brokers: &str, topic: &str, group: &str) -> consumer::Config {
    let mut c: consumer::Config = outbox_core::config::from_env().unwrap();
    c.database.database_url = db.url.clone();
    c.kafka.kafka_brokers = brokers.to_owned();
    c.consumer_topics = vec![topic.to_owned()];
    c.consumer_group = group.to_owned();
    c.allow_private_endpoints = true;
    c.admin_token = None;
    c.endpoints_file = None;
    c.retry_schedule = "0ms,100ms,200ms,500ms,1s,1s,1s,2s,2s,2s,2s,2s,2s,2s,2s"
        .parse()
        .unwrap();
    c.delivery_timeout = Duration::from_secs(2);
    c.delivery_lease = Duration::from_secs(3);
    c.breaker.breaker_open_for = Duration::from_millis(500);
    c.dispatch_poll_interval = Duration::from_millis(20);
    c.kafka_statistics_interval = Duration::from_millis(500);
    c.consumer_commit_interval = Duration::from_millis(100);
    c
}

/// The notifier of a stack, verifying with `secret`.
pub fn notifier_config(db: &TestDb, secret: &Secret) -> notifier::Config {
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
    config
}
