//! What the end-to-end tests share: the four services started in-process on one database.

#![allow(dead_code)]

use std::collections::HashSet;
use std::time::Duration;

use clap::Parser;
use outbox_core::signature::Secret;
use outbox_core::testing::{eventually, unique_topic, TestDb};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
pub struct NotifierCli {
    #[command(flatten)]
    config: notifier::Config,
}

pub struct Service {
    pub stop: CancellationToken,
    pub task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Service {
    pub async fn stop(mut self) {
        self.stop.cancel();
        let _ = (&mut self.task).await;
    }
    pub async fn kill(mut self) {
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
pub async fn listen(port: u16) -> (TcpListener, u16) {
    let listener = eventually("the port is free", Duration::from_secs(10), || async {
        TcpListener::bind(("127.0.0.1", port)).await.ok()
    })
    .await;
    let port = listener.local_addr().unwrap().port();
    (listener, port)
}

pub struct Stack {
    pub db: TestDb,
    pub topic: String,
    pub brokers: String,
    pub secret: Secret,
    pub group: String,
    pub producer_url: String,
    pub consumer_url: String,
    /// The relay's health and metrics (`kafka_consumergroup_lag` of this stack's group).
    pub relay_url: String,
    pub notifier_port: u16,
    pub http: reqwest::Client,
    pub producer: Service,
    pub relay: Service,
    pub consumer: Service,
    pub notifier: Service,
}

impl Stack {
    pub async fn start(brokers: &str) -> Stack {
        Self::start_on(TestDb::create().await, &unique_topic("e2e"), brokers).await
    }

    /// The four services on `db` (migrated by them as they start), sending to `topic`.
    pub async fn start_on(db: TestDb, topic: &str, brokers: &str) -> Stack {
        Self::start_routed(db, topic, brokers, "").await
    }

    /// [`Stack::start_on`] with `TOPIC_ROUTES` for the producer and the relay (both write them
    /// into `outbox.routes`).
    pub async fn start_routed(db: TestDb, topic: &str, brokers: &str, routes: &str) -> Stack {
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
        producer_config.topic_routes = routes.to_owned();
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
        relay_config.topic_routes = routes.to_owned();
        relay_config.poll_interval = Duration::from_millis(200);
        relay_config.send_timeout = Duration::from_secs(1);
        relay_config.retry_max = Duration::from_millis(500);
        relay_config.lock_key = (uuid::Uuid::new_v4().as_u128() as i64).abs();
        relay_config.lag_consumer_groups = vec![group.clone()];
        relay_config.lag_poll_interval = Duration::from_millis(300);
        let (relay_listener, relay_port) = listen(0).await;
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
            relay_url: format!("http://127.0.0.1:{relay_port}"),
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

    pub async fn start_consumer_on(
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

    pub async fn start_notifier_on(db: &TestDb, secret: &Secret, port: u16) -> (Service, u16) {
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

    /// Stops the consumer gracefully (it commits what it recorded and leaves the group); see
    /// [`Stack::start_consumer`].
    pub async fn stop_consumer(&mut self) {
        self.take_consumer().stop().await;
    }

    /// Starts a consumer in the stack's group on its old address, after [`Stack::stop_consumer`].
    pub async fn start_consumer(&mut self) {
        let port = self
            .consumer_url
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        let (fresh, port) =
            Self::start_consumer_on(&self.db, &self.brokers, &self.topic, &self.group, port).await;
        self.consumer = fresh;
        self.consumer_url = format!("http://127.0.0.1:{port}");
        self.wait_until_consumer_ready().await;
    }

    /// Kills the consumer as in a crash and starts a new one (same group, same address).
    pub async fn restart_consumer(&mut self) {
        self.take_consumer().kill().await;
        self.start_consumer().await;
    }

    /// The running consumer, leaving a finished placeholder in its place.
    fn take_consumer(&mut self) -> Service {
        std::mem::replace(
            &mut self.consumer,
            Service {
                stop: CancellationToken::new(),
                task: tokio::spawn(async { Ok(()) }),
            },
        )
    }

    pub async fn wait_until_consumer_ready(&self) {
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
    pub async fn post(&self, content: String, correlation_id: &str) -> Option<String> {
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
    pub async fn received(&self) -> Vec<Value> {
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

    pub async fn get_json(&self, url: &str) -> Value {
        let r = self.http.get(url).send().await.expect("answers");
        assert_eq!(r.status(), 200, "GET {url}");
        r.json().await.expect("JSON")
    }

    pub async fn received_ids(&self) -> HashSet<String> {
        self.received()
            .await
            .iter()
            .filter_map(|e| e["webhook_id"].as_str().map(str::to_owned))
            .collect()
    }

    pub async fn notifier_metric(&self, name: &str, labels: &[&str]) -> u64 {
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
