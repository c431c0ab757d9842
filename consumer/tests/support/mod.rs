//! What the consumer's integration tests share: the consumer started in-process against a fresh
//! database and topic, webhook receivers that record requests and fail on demand, a Kafka
//! producer for envelopes, and an admin API client.

#![allow(dead_code)]

pub mod admin;
pub use admin::*;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use consumer::Config;
use outbox_core::envelope::{Envelope, Metadata};
use outbox_core::testing::{self, TestApp, TestDb};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::json;

/// One request a receiver saw.
#[derive(Debug, Clone)]
pub struct Received {
    pub headers: HashMap<String, String>,
    pub body: Vec<u8>,
    pub started: Instant,
    pub finished: Instant,
    pub status: u16,
}

impl Received {
    pub fn header(&self, name: &str) -> &str {
        self.headers.get(name).map(String::as_str).unwrap_or("")
    }
    pub fn event_id(&self) -> String {
        self.header("webhook-id").to_owned()
    }
}

#[derive(Default)]
pub struct ReceiverState {
    pub requests: Mutex<Vec<Received>>,
    /// The status answered; 0 means 200.
    pub status: AtomicU16,
    /// Answer `webhook-delivery: abort-message` too.
    pub abort: AtomicBool,
    /// Answer `Retry-After` with this many seconds too (0: no header).
    pub retry_after_secs: AtomicU64,
    pub delay_ms: AtomicU64,
    in_flight: AtomicUsize,
    pub max_in_flight: AtomicUsize,
}

/// A webhook receiver on 127.0.0.1.
#[derive(Clone)]
pub struct Receiver {
    pub url: String,
    pub state: Arc<ReceiverState>,
}

impl Receiver {
    pub async fn start() -> Receiver {
        let state = Arc::new(ReceiverState::default());
        let app = axum::Router::new()
            .route("/hook", axum::routing::post(receive))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Receiver { url, state }
    }

    /// A receiver that answers `status` to every request until told otherwise.
    pub async fn failing_with(status: u16) -> Receiver {
        let receiver = Receiver::start().await;
        receiver.fail_with(status);
        receiver
    }

    pub fn fail_with(&self, status: u16) {
        self.state.status.store(status, Ordering::SeqCst);
    }

    pub fn succeed(&self) {
        self.state.status.store(0, Ordering::SeqCst);
    }

    pub fn requests(&self) -> Vec<Received> {
        self.state.requests.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.state.requests.lock().unwrap().len()
    }

    /// Waits (up to `timeout`) until exactly `n` requests arrived.
    pub async fn wait_for_count(&self, what: &str, n: usize, timeout: Duration) {
        testing::eventually(what, timeout, || async {
            (self.count() == n).then_some(())
        })
        .await;
    }

    /// Waits (up to `timeout`) until the events that arrived are exactly `events` (each at least
    /// once).
    pub async fn wait_for_events(&self, what: &str, events: &[Envelope], timeout: Duration) {
        let all: HashSet<&str> = events.iter().map(|e| e.id.as_str()).collect();
        testing::eventually(what, timeout, || async {
            let counts = self.counts_by_event();
            let seen: HashSet<&str> = counts.keys().map(String::as_str).collect();
            (seen == all).then_some(())
        })
        .await;
    }

    /// How often each event id arrived.
    pub fn counts_by_event(&self) -> HashMap<String, usize> {
        let mut counts = HashMap::new();
        for r in self.requests() {
            *counts.entry(r.event_id()).or_insert(0) += 1;
        }
        counts
    }
}

async fn receive(
    State(state): State<Arc<ReceiverState>>,
    headers: HeaderMap,
    body: Bytes,
) -> impl IntoResponse {
    let started = Instant::now();
    let now = state.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    state.max_in_flight.fetch_max(now, Ordering::SeqCst);
    let delay = state.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let status = match state.status.load(Ordering::SeqCst) {
        0 => 200,
        s => s,
    };
    let abort = state.abort.load(Ordering::SeqCst);
    state.in_flight.fetch_sub(1, Ordering::SeqCst);
    state.requests.lock().unwrap().push(Received {
        headers: headers
            .iter()
            .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
            .collect(),
        body: body.to_vec(),
        started,
        finished: Instant::now(),
        status,
    });
    let mut response = (
        StatusCode::from_u16(status).unwrap(),
        format!("answered {status}"),
    )
        .into_response();
    if abort {
        response
            .headers_mut()
            .insert("webhook-delivery", "abort-message".parse().unwrap());
    }
    let retry_after = state.retry_after_secs.load(Ordering::SeqCst);
    if retry_after > 0 {
        response
            .headers_mut()
            .insert("retry-after", retry_after.to_string().parse().unwrap());
    }
    response
}

/// A configuration for tests: fast schedules, loopback endpoints allowed (a test that checks the
/// address guard sets `allow_private_endpoints = false`), no webhook proxy.
pub fn config(db: &TestDb, topic: &str) -> Config {
    let mut c: Config = outbox_core::config::from_env().expect("default config");
    c.database.database_url = db.url.clone();
    c.database.database_pool_size = 8;
    c.kafka.kafka_brokers = testing::kafka_brokers();
    c.consumer_topics = vec![topic.to_owned()];
    c.consumer_group = format!("test-group-{}", uuid::Uuid::new_v4().simple());
    c.allow_private_endpoints = true;
    c.webhook_proxy = None;
    c.admin_token = None;
    c.endpoints_file = None;
    c.retry_schedule = "0ms,50ms,100ms".parse().unwrap();
    c.retry_jitter = 0.2;
    c.delivery_timeout = Duration::from_secs(2);
    c.delivery_lease = Duration::from_secs(3);
    c.breaker.breaker_failures = 5;
    c.breaker.breaker_open_for = Duration::from_millis(300);
    c.breaker.breaker_successes = 2;
    c.dispatch_poll_interval = Duration::from_millis(20);
    c.kafka_statistics_interval = Duration::from_millis(500);
    c.consumer_commit_interval = Duration::from_millis(100);
    c
}

/// The consumer running in-process (see [`spawn_app`]).
pub type TestConsumer = TestApp<Config>;

/// Starts the consumer with `config` on `db` and waits until it is ready; its admin client
/// sends the config's admin token.
pub async fn spawn_app(db: &TestDb, config: Config) -> TestConsumer {
    let token = config.admin_token.clone();
    let app = TestApp::spawn(db.clone(), config, consumer::run)
        .await
        .with_token(token);
    app.wait_ready().await;
    app
}

/// Creates an endpoint for `url` with the given event types (described as "test"); returns
/// (id, secret).
pub async fn create_endpoint(app: &TestConsumer, url: &str, types: &[&str]) -> (String, String) {
    let endpoint = app
        .admin()
        .create_endpoint(&NewEndpoint::new(url, types).description("test"))
        .await
        .unwrap_or_else(|refusal| panic!("POST /endpoints: {refusal}"));
    (
        endpoint.id,
        endpoint.secret.expect("a new endpoint shows its secret"),
    )
}

/// Every route the consumer serves, called in an order in which each reaches its handler, with
/// the status the handler answers: the first creates the endpoint `ep-auth` the later ones use,
/// the last of its own deletes it (the routes every service serves follow).
pub fn every_route() -> Vec<outbox_core::testing::RouteCall> {
    use outbox_core::testing::RouteCall;
    // One real endpoint, created through the guarded route itself, so the routes on it answer
    // as their handlers do; `nope` does not exist.
    let ep = "/endpoints/ep-auth";
    RouteCall::served([
        RouteCall::new("POST", "/endpoints", "/endpoints", 201).json(json!({
            "id": "ep-auth", "url": "http://127.0.0.1:9/hook", "event_types": ["*"]
        })),
        RouteCall::new("GET", "/endpoints", "/endpoints", 200),
        RouteCall::new("GET", "/endpoints/{id}", ep, 200),
        RouteCall::new("PATCH", "/endpoints/{id}", ep, 200).json(json!({"description": "x"})),
        RouteCall::new("PUT", "/endpoints/{id}", ep, 200)
            .json(json!({"url": "http://127.0.0.1:9/hook", "event_types": ["*"]})),
        RouteCall::new(
            "GET",
            "/endpoints/{id}/secret",
            &format!("{ep}/secret"),
            200,
        ),
        RouteCall::new(
            "POST",
            "/endpoints/{id}/rotate-secret",
            &format!("{ep}/rotate-secret"),
            200,
        ),
        RouteCall::new(
            "POST",
            "/endpoints/{id}/disable",
            &format!("{ep}/disable"),
            200,
        ),
        RouteCall::new(
            "POST",
            "/endpoints/{id}/enable",
            &format!("{ep}/enable"),
            200,
        ),
        RouteCall::new(
            "POST",
            "/endpoints/{id}/replay",
            &format!("{ep}/replay"),
            200,
        ),
        RouteCall::new("GET", "/deliveries", "/deliveries", 200),
        RouteCall::new("GET", "/deliveries/{id}", "/deliveries/999999", 404),
        RouteCall::new(
            "POST",
            "/deliveries/{id}/retry",
            "/deliveries/999999/retry",
            404,
        ),
        RouteCall::new("GET", "/circuit-breakers", "/circuit-breakers", 200),
        RouteCall::new(
            "POST",
            "/circuit-breakers/{endpoint_id}/reset",
            "/circuit-breakers/ep-auth/reset",
            200,
        ),
        RouteCall::new("GET", "/events/poison", "/events/poison", 200),
        RouteCall::new(
            "POST",
            "/events/poison/{id}/replay",
            "/events/poison/999999/replay",
            404,
        ),
        RouteCall::new("DELETE", "/endpoints/{id}", "/endpoints/nope", 404),
        RouteCall::new("DELETE", "/endpoints/{id}", ep, 204),
    ])
}

/// A fresh database and a fresh single-partition topic.
pub async fn setup(partitions: i32) -> (TestDb, String) {
    let db = TestDb::create().await;
    let topic = testing::unique_topic("consumer-test");
    testing::create_topic(&topic, partitions).await;
    (db, topic)
}

pub fn producer() -> FutureProducer {
    outbox_core::kafka::base_config(&testing::kafka_brokers(), "consumer-test-producer")
        .set("linger.ms", "0")
        .create()
        .expect("producer")
}

/// A new message.created envelope.
pub fn envelope(n: usize) -> Envelope {
    Envelope::new(
        "message.created",
        &format!("agg-{n}"),
        json!({"n": n, "text": format!("hello {n}")}),
        Metadata {
            source: "test".into(),
            environment: "test".into(),
            correlation_id: format!("req_test_{n}"),
        },
    )
}

/// Produces an envelope as the relay does: key = idempotency key, headers with id, type,
/// correlation.
pub async fn produce(producer: &FutureProducer, topic: &str, e: &Envelope) {
    produce_with_headers(producer, topic, e, &[]).await
}

/// [`produce`] with more record headers (a `traceparent`, say).
pub async fn produce_with_headers(
    producer: &FutureProducer,
    topic: &str,
    e: &Envelope,
    extra: &[(&str, &str)],
) {
    testing::produce_envelope_with_headers(producer, topic, e, extra)
        .await
        .expect("Kafka accepts the record");
}

/// Produces each of `events` in order, with [`produce`].
pub async fn produce_all(
    producer: &FutureProducer,
    topic: &str,
    events: impl IntoIterator<Item = &Envelope>,
) {
    for e in events {
        produce(producer, topic, e).await;
    }
}

/// Produces raw bytes (for poison records).
pub async fn produce_raw(producer: &FutureProducer, topic: &str, value: &[u8]) {
    producer
        .send(
            FutureRecord::<(), [u8]>::to(topic).payload(value),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)
        .expect("Kafka accepts the record");
}

/// The Python interpreter with the `standardwebhooks` package (scripts/test.sh sets it).
pub fn python() -> String {
    std::env::var("TEST_PYTHON").unwrap_or_else(|_| {
        let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
        format!("{home}/.cache/outbox-relay/test-venv/bin/python")
    })
}

const VERIFY_PY: &str = r#"
import base64, hashlib, hmac, json, sys
from standardwebhooks.webhooks import Webhook
case = json.load(sys.stdin)
body = base64.b64decode(case["body"])
h = case["headers"]
def verify(secret):
    try:
        Webhook(secret).verify(body, {k: h[k] for k in ("webhook-id", "webhook-timestamp", "webhook-signature")})
        standard = True
    except Exception:
        standard = False
    key = base64.b64decode(secret[len("whsec_"):])
    signed = (h["x-webhook-id"] + "." + h["x-webhook-timestamp"] + ".").encode() + body
    mac = hmac.new(key, signed, hashlib.sha256).hexdigest()
    offered = [s[len("sha256="):] for s in h["x-webhook-signature"].split() if s.startswith("sha256=")]
    older = any(hmac.compare_digest(mac, o) for o in offered)
    return [standard, older]
print(json.dumps([verify(s) for s in case["secrets"]]))
"#;

/// For each secret: [Standard Webhooks verifies, `X-Webhook-Signature` hex HMAC verifies], as
/// Python's `standardwebhooks` package and `hmac` module compute them.
pub async fn verify_in_python(request: &Received, secrets: &[&str]) -> Vec<[bool; 2]> {
    use base64::Engine;
    use tokio::io::AsyncWriteExt;
    let case = json!({
        "body": base64::engine::general_purpose::STANDARD.encode(&request.body),
        "headers": request.headers,
        "secrets": secrets,
    });
    let mut child = tokio::process::Command::new(python())
        .arg("-c")
        .arg(VERIFY_PY)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("the test Python (TEST_PYTHON) runs; see scripts/test.sh");
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(case.to_string().as_bytes()).await.unwrap();
    drop(stdin);
    let out = child.wait_with_output().await.unwrap();
    assert!(
        out.status.success(),
        "python verifier failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("verifier prints JSON")
}

/// Waits (up to 60 s; `what` names the wait) until every one of `events` reached `receiver`,
/// then checks nothing was recorded twice: one inbox row per event and, the endpoint being the
/// only one, one succeeded delivery per event (the unique constraint forbids a second).
pub async fn wait_for_each_delivered_once(
    db: &TestDb,
    receiver: &Receiver,
    what: &str,
    events: &[Envelope],
) {
    receiver
        .wait_for_events(what, events, Duration::from_secs(60))
        .await;
    let n = events.len() as i64;
    assert_eq!(db.count("select count(*) from inbox").await, n);
    wait_for_succeeded(db, n).await;
}

/// Waits until exactly `n` deliveries are recorded as succeeded: a success is recorded just after
/// the receiver answered, so a test that saw every request must still wait for the bookkeeping.
pub async fn wait_for_succeeded(db: &TestDb, n: i64) {
    db.wait_for_count(
        &format!("{n} deliveries recorded as succeeded"),
        "select count(*) from deliveries where state = 'succeeded'",
        n,
        Duration::from_secs(20),
    )
    .await;
}
