//! Test support (feature `testing`): every integration test gets its own database and its own
//! topic names against the real PostgreSQL and Kafka, so tests run in parallel and can be re-run.
//!
//! `TEST_DATABASE_URL` names the server (default: the local stack's), `TEST_KAFKA_BROKERS` the
//! broker (default `127.0.0.1:9092`).

use std::future::Future;
use std::time::{Duration, Instant};

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::Message;
use tokio_postgres::NoTls;

use crate::db::{self, PgPool};

mod app;
pub mod bench;
mod calls;
mod openapi;
pub mod plan;
pub use app::{listen, ApiClient, Refusal, TestApp};
pub use calls::{assert_refused, get_json, get_text, try_get_text};
pub use openapi::{assert_openapi_lists_every_route, openapi_problems, operations};

/// The server tests create their databases on.
pub fn server_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// The broker tests use.
pub fn kafka_brokers() -> String {
    std::env::var("TEST_KAFKA_BROKERS")
        .unwrap_or_else(|_| crate::config::DEFAULT_KAFKA_BROKERS.into())
}

/// A fresh, migrated database of its own. Clones share it (the pool and the name).
#[derive(Clone)]
pub struct TestDb {
    pub url: String,
    pub name: String,
    pub pool: PgPool,
}

/// Test databases older than this are dropped by the next test that creates one: nothing drops a
/// test's database when it ends (a failed test's is worth a look), and a machine that runs the
/// suite all day would otherwise fill its disk.
const STALE_TEST_DATABASE: std::time::Duration = std::time::Duration::from_secs(3 * 3600);

/// Creates `test_<UUIDv7>` (so its age is in its name) after dropping stale ones; no migrations.
pub async fn create_database(client: &tokio_postgres::Client) -> String {
    let names = client
        .query(
            "select datname from pg_database where datname like 'test\\_%'",
            &[],
        )
        .await
        .map(|rows| {
            rows.iter()
                .map(|r| r.get::<_, String>(0))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    let now = std::time::SystemTime::now();
    for stale in names.iter().filter(|name| {
        let created = uuid::Uuid::try_parse(name.trim_start_matches("test_"))
            .ok()
            .and_then(|id| id.get_timestamp())
            .map(|t| {
                let (secs, nanos) = t.to_unix();
                std::time::UNIX_EPOCH + std::time::Duration::new(secs, nanos)
            });
        created.is_some_and(|t| now.duration_since(t).unwrap_or_default() > STALE_TEST_DATABASE)
    }) {
        // Best effort: a database still in use is left for a later run.
        let _ = client
            .batch_execute(&format!("drop database if exists {stale}"))
            .await;
    }
    let name = format!("test_{}", uuid::Uuid::now_v7().simple());
    client
        .batch_execute(&format!("create database {name}"))
        .await
        .expect("create test database");
    name
}

impl TestDb {
    /// Creates `test_<random>` on the test server and applies every migration.
    pub async fn create() -> TestDb {
        Self::create_on(&server_url()).await
    }

    /// [`TestDb::create`] on another PostgreSQL server (`server` names its maintenance database).
    pub async fn create_on(server: &str) -> TestDb {
        let server = server.to_owned();
        let (client, connection) = tokio_postgres::connect(&server, NoTls)
            .await
            .unwrap_or_else(|e| panic!("PostgreSQL at {server} is not reachable ({e}); run scripts/test.sh, or scripts/stack.sh deps first"));
        tokio::spawn(connection);
        let name = create_database(&client).await;
        let url = with_database(&server, &name);
        let pool = db::pool(&url, 16, &db::Schema::ALL).expect("pool");
        db::migrate(&pool, &db::Schema::ALL)
            .await
            .expect("migrations apply to a fresh database");
        // Tests name tables unqualified, as the services do (the consumer's breakers come first).
        client
            .batch_execute(&format!(
                "alter database {name} set search_path = outbox, producer, webhooks, notifier, public"
            ))
            .await
            .expect("set the test database's search_path");
        TestDb { url, name, pool }
    }

    /// Drops the database now (its pool closed first), for a benchmark that leaves nothing
    /// behind; a test's database is left to the next run's clean-up instead, to be looked at.
    /// Best effort: a failure is only logged.
    pub async fn drop_now(self) {
        let TestDb { name, pool, .. } = self;
        pool.close();
        let dropped = async {
            let (client, connection) = tokio_postgres::connect(&server_url(), NoTls).await?;
            tokio::spawn(connection);
            client
                .batch_execute(&format!("drop database if exists {name} with (force)"))
                .await
        };
        if let Err(error) = dropped.await {
            eprintln!("database {name} not dropped: {error}");
        }
    }

    /// A database as an earlier release made it: every table in `public` (see
    /// [`db::migrate_as_legacy_release`]), for upgrade tests.
    pub async fn create_legacy() -> TestDb {
        let server = server_url();
        let (client, connection) = tokio_postgres::connect(&server, NoTls)
            .await
            .expect("PostgreSQL is reachable");
        tokio::spawn(connection);
        let name = create_database(&client).await;
        client
            .batch_execute(&format!(
                "alter database {name} set search_path = outbox, producer, webhooks, notifier, public"
            ))
            .await
            .expect("set the test database's search_path");
        let url = with_database(&server, &name);
        let pool = db::pool(&url, 16, &[]).expect("pool");
        db::migrate_as_legacy_release(&pool)
            .await
            .expect("the legacy migrations apply");
        TestDb { url, name, pool }
    }

    /// A client from the pool.
    pub async fn client(&self) -> db::Client {
        self.pool.get().await.expect("test database connection")
    }

    /// Runs `sql` with `params` (a change a test makes by hand, as an operator would); returns
    /// the rows it touched and panics, naming `sql`, when it fails.
    pub async fn execute(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> u64 {
        self.client()
            .await
            .execute(sql, params)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// Waits (up to `timeout`) until [`TestDb::count`] of `sql` is `expected`; panics naming
    /// `what` and the last count otherwise.
    pub async fn wait_for_count(&self, what: &str, sql: &str, expected: i64, timeout: Duration) {
        let what = format!("{what} ({sql} = {expected})");
        eventually(&what, timeout, || async {
            (self.count(sql).await == expected).then_some(())
        })
        .await;
    }

    /// The first column of the first row of `sql`, as i64 (for counts).
    pub async fn count(&self, sql: &str) -> i64 {
        self.client()
            .await
            .query_one(sql, &[])
            .await
            .expect(sql)
            .get(0)
    }
}

/// Replaces the database name of a `postgres://` URL.
pub fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let slash = base
        .rfind('/')
        .filter(|&i| i > "postgres://".len())
        .unwrap_or(base.len());
    let mut out = format!("{}/{}", &base[..slash], name);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

/// A topic name nobody else uses.
pub fn unique_topic(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

/// Creates a topic with `partitions` partitions on the test broker.
pub async fn create_topic(name: &str, partitions: i32) {
    crate::kafka::ensure_topics(&kafka_brokers(), &[name.to_owned()], partitions)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "Kafka at {} is not usable ({e}); run scripts/test.sh",
                kafka_brokers()
            )
        });
}

/// Produces `envelope` as the relay does: key = its idempotency key, the envelope JSON as the
/// value, and the `event_id`, `event_type` and `correlation_id` headers.
pub async fn produce_envelope(
    producer: &rdkafka::producer::FutureProducer,
    topic: &str,
    envelope: &crate::envelope::Envelope,
) -> Result<(), rdkafka::error::KafkaError> {
    produce_envelope_with_headers(producer, topic, envelope, &[]).await
}

/// [`produce_envelope`] with more record headers after the contract's three (a `traceparent`,
/// say).
pub async fn produce_envelope_with_headers(
    producer: &rdkafka::producer::FutureProducer,
    topic: &str,
    envelope: &crate::envelope::Envelope,
    extra: &[(&str, &str)],
) -> Result<(), rdkafka::error::KafkaError> {
    use crate::envelope::{HEADER_CORRELATION_ID, HEADER_EVENT_ID, HEADER_EVENT_TYPE};
    use rdkafka::message::{Header, OwnedHeaders};
    let value = serde_json::to_vec(envelope).expect("an envelope is JSON");
    let headers = [
        (HEADER_EVENT_ID, envelope.id.as_str()),
        (HEADER_EVENT_TYPE, envelope.event.as_str()),
        (
            HEADER_CORRELATION_ID,
            envelope.metadata.correlation_id.as_str(),
        ),
    ]
    .into_iter()
    .chain(extra.iter().copied())
    .fold(OwnedHeaders::new(), |headers, (key, value)| {
        headers.insert(Header {
            key,
            value: Some(value),
        })
    });
    let record = rdkafka::producer::FutureRecord::to(topic)
        .key(&envelope.idempotency_key)
        .payload(&value)
        .headers(headers);
    producer
        .send(record, Duration::from_secs(30))
        .await
        .map(|_| ())
        .map_err(|(e, _)| e)
}

/// Polls `check` until it returns `Some`, or panics after `timeout` naming `what`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One record read back from a topic.
#[derive(Debug, Clone)]
pub struct Record {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<String>,
    pub value: Vec<u8>,
    pub headers: Vec<(String, String)>,
    /// The record's timestamp, Unix milliseconds (CreateTime: when the producer client took it).
    pub timestamp_ms: Option<i64>,
}

impl Record {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.value).expect("record value is JSON")
    }
}

/// Reads a topic from the beginning until `expected` records arrived (or `timeout` passed), and
/// then a little longer so that extra records (duplicates) are seen too.
pub async fn read_topic(topic: &str, expected: usize, timeout: Duration) -> Vec<Record> {
    read_topic_from(&kafka_brokers(), topic, expected, timeout).await
}

/// [`read_topic`] on another broker.
pub async fn read_topic_from(
    brokers: &str,
    topic: &str,
    expected: usize,
    timeout: Duration,
) -> Vec<Record> {
    use rdkafka::message::Headers;
    let consumer: StreamConsumer = crate::kafka::base_config(brokers, "test-reader")
        .set(
            "group.id",
            format!("test-reader-{}", uuid::Uuid::new_v4().simple()),
        )
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .expect("test consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let mut records = Vec::new();
    let deadline = Instant::now() + timeout;
    let mut grace: Option<Instant> = None;
    loop {
        let now = Instant::now();
        let until = grace.unwrap_or(deadline).min(deadline);
        if now >= until {
            break;
        }
        match tokio::time::timeout(until - now, consumer.recv()).await {
            Ok(Ok(m)) => {
                let headers = m
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|h| {
                                let value = h
                                    .value
                                    .map(|v| String::from_utf8_lossy(v).into_owned())
                                    .unwrap_or_default();
                                (h.key.to_owned(), value)
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                records.push(Record {
                    partition: m.partition(),
                    offset: m.offset(),
                    key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                    value: m.payload().unwrap_or_default().to_vec(),
                    headers,
                    timestamp_ms: m.timestamp().to_millis(),
                });
                if records.len() >= expected && grace.is_none() {
                    grace = Some(Instant::now() + Duration::from_millis(500));
                }
            }
            Ok(Err(e)) => panic!("reading {topic}: {e}"),
            Err(_) => break,
        }
    }
    records
}

/// The broker the chaos tests stop and start (other tests keep the shared one on 9092).
pub const CHAOS_BROKER: &str = "127.0.0.1:19092";
/// The PostgreSQL server the chaos tests stop and start.
pub const CHAOS_POSTGRES: &str = "postgres://postgres@127.0.0.1:15432/postgres";

/// Runs `scripts/stack.sh <subcommand>` (`kafka-stop`, `kafka-start`, `pg-stop`, `pg-start`) on
/// the chaos stack: its own state directory and ports, so stopping it disturbs no other test.
pub fn chaos_stack(subcommand: &str) {
    let script = std::env::var("TEST_STACK_SCRIPT")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/stack.sh").to_owned());
    let status = std::process::Command::new("bash")
        .arg(&script)
        .arg(subcommand)
        .env("OUTBOX_STACK_DIR", "/var/tmp/outbox-chaos")
        .env("KAFKA_PORT", "19092")
        .env("KAFKA_CONTROLLER_PORT", "19093")
        .env("KAFKA_HEAP", "384m")
        .env("PG_PORT", "15432")
        .status()
        .expect("run scripts/stack.sh");
    assert!(status.success(), "scripts/stack.sh {subcommand} failed");
}

/// A stack of `scripts/stack.sh` of a test binary's own: its own state directory and ports, so the
/// test may stop and kill its brokers while other tests keep the shared ones.
pub struct PrivateStack {
    env: Vec<(&'static str, String)>,
}

impl PrivateStack {
    /// A stack in `dir` with `brokers` Kafka nodes, node n on `kafka_port + 3(n-1)` and its
    /// controller on the port after it, PostgreSQL on `pg_port` and the services from
    /// `service_port_base` (used only by the subcommands that start them).
    pub fn new(
        dir: &str,
        brokers: u8,
        kafka_port: u16,
        pg_port: u16,
        service_port_base: u16,
    ) -> Self {
        PrivateStack {
            env: vec![
                ("OUTBOX_STACK_DIR", dir.to_owned()),
                ("STACK_BROKERS", brokers.to_string()),
                ("KAFKA_PORT", kafka_port.to_string()),
                ("KAFKA_CONTROLLER_PORT", (kafka_port + 1).to_string()),
                ("PG_PORT", pg_port.to_string()),
                ("SERVICE_PORT_BASE", service_port_base.to_string()),
                ("KAFKA_HEAP", "384m".to_owned()),
                ("OUTBOX_ENV_FILE", "none".to_owned()),
            ],
        }
    }

    /// The variables that point `scripts/stack.sh` (and `scripts/chaos.sh`) at this stack.
    pub fn env(&self) -> &[(&'static str, String)] {
        &self.env
    }

    /// Runs `scripts/stack.sh <args>`; panics unless it succeeds. Returns what it printed.
    pub fn run(&self, args: &[&str]) -> String {
        let output = std::process::Command::new("bash")
            .arg(stack_script())
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (*k, v.as_str())))
            .stderr(std::process::Stdio::inherit())
            .output()
            .expect("run scripts/stack.sh");
        assert!(
            output.status.success(),
            "scripts/stack.sh {} failed",
            args.join(" ")
        );
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    }

    /// The bootstrap list of every node (what the services get as `KAFKA_BROKERS`).
    pub fn bootstrap(&self) -> String {
        self.run(&["bootstrap"])
    }
}

/// `scripts/stack.sh` of this checkout (`TEST_STACK_SCRIPT` names another).
pub fn stack_script() -> String {
    std::env::var("TEST_STACK_SCRIPT")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/stack.sh").to_owned())
}

/// The sum of the samples of metric `name` in Prometheus text, over the series whose labels
/// include every one of `labels` (written like `outcome="duplicate"`).
pub fn metric_total(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(['{', ' ']))
        })
        .filter(|l| labels.iter().all(|label| l.contains(label)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// One route of a service as a test calls it: `route` is the template as the router has it
/// (`/messages/{id}`), `path` a concrete path reaching its handler, `answers` the status the
/// handler gives this request once it is let through.
pub struct RouteCall {
    pub method: &'static str,
    pub route: &'static str,
    pub path: String,
    /// Sent with `Content-Type: application/json` when present.
    pub body: Option<Vec<u8>>,
    /// Further headers (a webhook's signature, say).
    pub headers: Vec<(String, String)>,
    pub answers: u16,
}

impl RouteCall {
    /// A call without body or extra headers.
    pub fn new(method: &'static str, route: &'static str, path: &str, answers: u16) -> Self {
        RouteCall {
            method,
            route,
            path: path.to_owned(),
            body: None,
            headers: Vec::new(),
            answers,
        }
    }

    /// The same call with a JSON body.
    pub fn json(mut self, body: serde_json::Value) -> Self {
        self.body = Some(body.to_string().into_bytes());
        self
    }
}

/// Checks a service started with `ADMIN_TOKEN=token` at `base`: every call whose route is open
/// (the service's `open` list or [`crate::admin_auth::OPERATIONAL_ROUTES`]) answers as its
/// handler does without a token and with a wrong one; every other call answers
/// `401 {"code": "unauthorized"}` with `WWW-Authenticate: Bearer` without a token, with a wrong
/// one and with another scheme, and as its handler does with the right one. Every open route
/// must be among `calls`, so none goes untested.
pub async fn assert_admin_token_guards(
    base: &str,
    token: &str,
    open: &[crate::admin_auth::RouteSpec],
    calls: &[RouteCall],
) {
    let auth = crate::admin_auth::AdminAuth::new(Some(token), open);
    for &(method, route) in crate::admin_auth::OPERATIONAL_ROUTES.iter().chain(open) {
        assert!(
            calls.iter().any(|c| c.method == method && c.route == route),
            "the open route {method} {route} is not among the calls tested"
        );
    }
    let http = reqwest::Client::new();
    let send = |call: &RouteCall, authorization: Option<String>| {
        let method = reqwest::Method::from_bytes(call.method.as_bytes()).expect("method");
        let mut request = http.request(method, format!("{base}{}", call.path));
        if let Some(value) = authorization {
            request = request.header("authorization", value);
        }
        for (name, value) in &call.headers {
            request = request.header(name, value);
        }
        if let Some(body) = &call.body {
            request = request
                .header("content-type", "application/json")
                .body(body.clone());
        }
        async move {
            let response = request.send().await.expect("the service answers");
            let status = response.status().as_u16();
            let challenge = response.headers().get("www-authenticate").cloned();
            let body: serde_json::Value = response.json().await.unwrap_or_default();
            (status, challenge, body)
        }
    };
    let wrong = [
        None,
        Some(format!("Bearer {token}x")),
        Some("Bearer ".to_owned()),
        Some(format!("Basic {token}")),
    ];
    for call in calls {
        let what = format!("{} {}", call.method, call.path);
        if auth.is_open(call.method, call.route) {
            for authorization in wrong.iter().take(2) {
                let (status, _, body) = send(call, authorization.clone()).await;
                assert_eq!(status, call.answers, "open route {what}: {body}");
                assert_ne!(body["code"], "unauthorized", "open route {what}");
            }
            continue;
        }
        for authorization in &wrong {
            let (status, challenge, body) = send(call, authorization.clone()).await;
            assert_eq!(status, 401, "{what} with {authorization:?}: {body}");
            assert_eq!(body["code"], "unauthorized", "{what}");
            assert_eq!(
                challenge.as_ref().and_then(|v| v.to_str().ok()),
                Some("Bearer"),
                "{what}"
            );
        }
        let (status, _, body) = send(call, Some(format!("Bearer {token}"))).await;
        assert_eq!(status, call.answers, "{what} with the right token: {body}");
    }
}

/// Runs `binary --help` with every secret setting set to a recognisable value (and a password in
/// `DATABASE_URL`); panics if any of the values appears in what it prints.
pub fn assert_help_hides_secrets(binary: &str) {
    const PASSWORD: &str = "hunter2";
    let secrets = [
        ("ADMIN_TOKEN", "admin-hunter2-token"),
        ("DATABASE_URL", "postgres://u:hunter2@h/db"),
        (
            "WEBHOOK_SECRET",
            "whsec_aHVudGVyMmh1bnRlcjJodW50ZXIyaHVudGVyMg==",
        ),
        ("CHAT_BOT_TOKEN", "123456:hunter2-bot"),
    ];
    let output = std::process::Command::new(binary)
        .arg("--help")
        .envs(secrets)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {binary}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "{binary} --help failed: {text}");
    assert!(
        text.contains("[env: DATABASE_URL"),
        "--help documents DATABASE_URL: {text}"
    );
    for (name, value) in secrets {
        assert!(!text.contains(value), "--help shows {name}: {text}");
    }
    assert!(!text.contains(PASSWORD), "--help shows a password: {text}");
}
