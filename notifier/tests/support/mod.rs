//! What the notifier's tests start: the notifier itself on a random port against a fresh database,
//! a real SMTP server (Python's aiosmtpd, writing a maildir) and a chat API that can be told to fail.

#![allow(dead_code)]

pub mod api;
pub use api::*;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use clap::Parser;
use outbox_core::signature::{sign_headers, Secret};
use outbox_core::testing::{eventually, TestApp, TestDb};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

/// The bot token and chat the notifier is configured with.
pub const BOT_TOKEN: &str = "123456:test-token";
pub const CHAT_ID: &str = "-10042";

/// A real SMTP server in a child process; every accepted mail is one file in `<dir>/new`.
pub struct SmtpServer {
    pub port: u16,
    dir: PathBuf,
    child: Child,
}

impl SmtpServer {
    pub async fn start() -> SmtpServer {
        Self::start_on(free_port()).await
    }

    /// Starts a server on `port` (to bring a stopped one back at the same address).
    pub async fn start_on(port: u16) -> SmtpServer {
        let python = std::env::var("TEST_PYTHON").unwrap_or_else(|_| {
            let home = std::env::var("HOME").unwrap_or_default();
            format!("{home}/.cache/outbox-relay/test-venv/bin/python")
        });
        let dir = std::env::temp_dir().join(format!("notifier-mail-{}", uuid::Uuid::new_v4()));
        let child = Command::new(&python)
            .args(["-m", "aiosmtpd", "-n", "-l"])
            .arg(format!("127.0.0.1:{port}"))
            .args(["-c", "aiosmtpd.handlers.Mailbox"])
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start aiosmtpd with {python} ({e}); run scripts/test.sh, which installs it")
            });
        let server = SmtpServer { port, dir, child };
        eventually(
            "the SMTP server accepts connections",
            Duration::from_secs(15),
            || async {
                tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .ok()
                    .map(|_| ())
            },
        )
        .await;
        server
    }

    /// The mails received so far, as raw text.
    pub fn mails(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(self.dir.join("new")) else {
            return Vec::new();
        };
        entries
            .filter_map(|e| e.ok())
            .filter_map(|e| std::fs::read_to_string(e.path()).ok())
            .collect()
    }
}

impl Drop for SmtpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// What the chat API saw.
#[derive(Default)]
pub struct ChatLog {
    /// Every request, failed or not.
    pub attempts: AtomicUsize,
    /// The messages it accepted: `{"path", "body"}`.
    pub messages: Mutex<Vec<Value>>,
    /// While set, every request is answered 500.
    pub failing: AtomicBool,
}

/// A Telegram-style Bot API on a random port.
pub struct ChatServer {
    pub base: String,
    pub log: Arc<ChatLog>,
    shutdown: CancellationToken,
}

impl ChatServer {
    pub async fn start() -> ChatServer {
        async fn send_message(
            State(log): State<Arc<ChatLog>>,
            Path(bot): Path<String>,
            Json(body): Json<Value>,
        ) -> (StatusCode, Json<Value>) {
            log.attempts.fetch_add(1, Ordering::SeqCst);
            if log.failing.load(Ordering::SeqCst) {
                return (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    Json(json!({"ok": false, "description": "Internal Server Error"})),
                );
            }
            let mut messages = log.messages.lock().expect("chat log");
            messages.push(json!({"bot": bot, "body": body}));
            let id = messages.len();
            (
                StatusCode::OK,
                Json(json!({"ok": true, "result": {"message_id": id}})),
            )
        }
        let log = Arc::new(ChatLog::default());
        let app = Router::new()
            .route("/{bot}/sendMessage", post(send_message))
            .with_state(log.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let shutdown = CancellationToken::new();
        let limits = outbox_core::config::from_env().expect("HTTP defaults");
        tokio::spawn(outbox_core::http::serve(
            listener,
            app,
            limits,
            shutdown.clone(),
        ));
        ChatServer {
            base: format!("http://{addr}"),
            log,
            shutdown,
        }
    }

    pub fn fail(&self, failing: bool) {
        self.log.failing.store(failing, Ordering::SeqCst);
    }

    pub fn attempts(&self) -> usize {
        self.log.attempts.load(Ordering::SeqCst)
    }

    pub fn messages(&self) -> Vec<Value> {
        self.log.messages.lock().expect("chat log").clone()
    }
}

impl Drop for ChatServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// The notifier's command line, as `main` parses it.
#[derive(Parser)]
pub struct Cli {
    #[command(flatten)]
    pub config: notifier::Config,
}

/// Which headers a test sender puts on a webhook.
#[derive(Clone, Copy, PartialEq)]
pub enum Headers {
    /// `webhook-id`, `webhook-timestamp`, `webhook-signature`.
    Standard,
    /// `X-Webhook-Id`, `X-Webhook-Timestamp`, `X-Webhook-Signature`.
    Older,
}

/// A running notifier: the shared harness ([`TestApp`], through `Deref`) and the secret senders
/// sign with.
pub struct App {
    pub app: TestApp<notifier::Config>,
    pub secret: Secret,
}

impl std::ops::Deref for App {
    type Target = TestApp<notifier::Config>;
    fn deref(&self) -> &Self::Target {
        &self.app
    }
}

/// Starts the notifier with `args` (command-line flags, as an operator would pass them) on top of
/// a fresh database and a new secret.
pub async fn spawn_app(args: &[&str]) -> App {
    let db = TestDb::create().await;
    let url = db.url.clone();
    spawn_app_on(db, &url, args).await
}

/// The notifier's configuration from `args` with `secret` as `--webhook-secret` (the args may
/// name others) on `database_url`, with short test durations unless the args choose their own.
pub fn config(database_url: &str, secret: &Secret, args: &[&str]) -> notifier::Config {
    let mut argv = vec![
        "notifier",
        "--webhook-secret",
        secret.as_str(),
        "--database-url",
        database_url,
    ];
    for (flag, value) in [("--breaker-open-for", "800ms"), ("--notify-timeout", "3s")] {
        if !args.contains(&flag) {
            argv.extend([flag, value]);
        }
    }
    argv.extend_from_slice(args);
    let mut config = Cli::try_parse_from(argv)
        .expect("configuration parses")
        .config;
    // An ADMIN_TOKEN in the developer's environment must not close the routes tests read.
    if !args.contains(&"--admin-token") {
        config.admin_token = None;
    }
    config
}

/// [`spawn_app`] with another `DATABASE_URL` (one that is down, say).
pub async fn spawn_app_on(db: TestDb, database_url: &str, args: &[&str]) -> App {
    let secret = Secret::generate();
    let config = config(database_url, &secret, args);
    App {
        app: TestApp::spawn(db, config, notifier::run).await,
        secret,
    }
}

/// Flags that enable both channels against these servers.
pub fn channel_args(smtp: &SmtpServer, chat: &ChatServer) -> Vec<String> {
    vec![
        "--smtp-host".into(),
        "127.0.0.1".into(),
        "--smtp-port".into(),
        smtp.port.to_string(),
        "--smtp-to".into(),
        "ops@example.com".into(),
        "--chat-api-url".into(),
        chat.base.clone(),
        "--chat-bot-token".into(),
        BOT_TOKEN.into(),
        "--chat-id".into(),
        CHAT_ID.into(),
    ]
}

/// A real SMTP server, a chat API and the notifier with both channels enabled against them (and
/// `extra` flags).
pub async fn spawn_with_channels(extra: &[&str]) -> (SmtpServer, ChatServer, App) {
    let smtp = SmtpServer::start().await;
    let chat = ChatServer::start().await;
    let args = channel_args(&smtp, &chat);
    let mut args: Vec<&str> = args.iter().map(String::as_str).collect();
    args.extend_from_slice(extra);
    let app = spawn_app(&args).await;
    (smtp, chat, app)
}

/// An envelope as the consumer delivers it.
pub fn envelope(id: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "id": id,
        "event": "message.created",
        "version": "1.0",
        "idempotency_key": format!("message.created-{id}"),
        "timestamp": "2026-11-23T10:30:45.123Z",
        "data": {"content": "hello"},
        "metadata": {"source": "producer", "environment": "test", "correlation_id": "req_test"}
    }))
    .expect("JSON")
}

pub fn new_event_id() -> String {
    format!("evt_{}", uuid::Uuid::now_v7().simple())
}

pub fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

impl App {
    /// Sends `body` to `route` signed by `secrets` as of `timestamp`, with the headers of
    /// `convention`; answers the status and the JSON body.
    pub async fn send_signed(
        &self,
        route: &str,
        id: &str,
        body: &[u8],
        timestamp: i64,
        secrets: &[&Secret],
        convention: Headers,
    ) -> (reqwest::StatusCode, Value) {
        let mut headers = vec![("x-correlation-id".to_owned(), "req_test".to_owned())];
        headers.extend(
            sign_headers(secrets, id, timestamp, body)
                .into_iter()
                .filter(|(name, _)| name.starts_with("x-") == (convention == Headers::Older))
                .map(|(name, value)| (name.to_owned(), value)),
        );
        self.send_with_headers(route, headers, body).await
    }

    /// Sends `body` with the timestamp header written as `timestamp`, signed with the app's secret
    /// over the timestamp text `signed`.
    pub async fn send_with_timestamp_text(
        &self,
        route: &str,
        id: &str,
        body: &[u8],
        (timestamp, signed): (&str, &str),
        convention: Headers,
    ) -> (reqwest::StatusCode, Value) {
        use base64::Engine;
        let mac = self.secret.mac_of_text(id, signed, body);
        let headers = match convention {
            Headers::Standard => [
                ("webhook-id", id.to_owned()),
                ("webhook-timestamp", timestamp.to_owned()),
                (
                    "webhook-signature",
                    format!(
                        "v1,{}",
                        base64::engine::general_purpose::STANDARD.encode(mac)
                    ),
                ),
            ],
            Headers::Older => [
                ("x-webhook-id", id.to_owned()),
                ("x-webhook-timestamp", timestamp.to_owned()),
                (
                    "x-webhook-signature",
                    format!("sha256={}", hex::encode(mac)),
                ),
            ],
        };
        let headers = headers.map(|(name, value)| (name.to_owned(), value));
        self.send_with_headers(route, headers.into(), body).await
    }

    /// POSTs `body` as JSON to `route` with `headers`; the status and the JSON answer.
    async fn send_with_headers(
        &self,
        route: &str,
        headers: Vec<(String, String)>,
        body: &[u8],
    ) -> (reqwest::StatusCode, Value) {
        let mut request = self
            .http
            .post(self.url(route))
            .header("content-type", "application/json");
        for (name, value) in headers {
            request = request.header(name, value);
        }
        let response = request
            .body(body.to_vec())
            .send()
            .await
            .expect("notifier answers");
        let status = response.status();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// Sends a correctly signed envelope with the standard headers.
    pub async fn deliver(&self, route: &str, id: &str) -> (reqwest::StatusCode, Value) {
        self.send_signed(
            route,
            id,
            &envelope(id),
            now(),
            &[&self.secret],
            Headers::Standard,
        )
        .await
    }

    /// `GET path`: the status and the JSON answer (`Null` when not JSON).
    pub async fn get(&self, path: &str) -> (reqwest::StatusCode, Value) {
        let (code, body) = self.call("GET", path, None).await;
        (status(code), body)
    }

    /// `POST path` without a body: the status and the JSON answer (`Null` when not JSON).
    pub async fn post(&self, path: &str) -> (reqwest::StatusCode, Value) {
        let (code, body) = self.call("POST", path, None).await;
        (status(code), body)
    }

    /// The value of the sample of `name` whose labels include every one of `labels`.
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.metrics().await.lines().find_map(|line| {
            let rest = line.strip_prefix(name)?.strip_prefix('{')?;
            let (label_text, value) = rest.split_once("} ")?;
            labels
                .iter()
                .all(|(k, v)| label_text.split(',').any(|l| l == format!("{k}=\"{v}\"")))
                .then(|| value.trim().parse().ok())
                .flatten()
        })
    }

    /// Asserts that the sample of `name` with every one of `labels` is `expected`.
    pub async fn assert_metric(&self, name: &str, labels: &[(&str, &str)], expected: f64) {
        let value = self.metric(name, labels).await;
        assert_eq!(value, Some(expected), "{name} {labels:?}");
    }

    /// Asserts that `notifier_webhooks_received_total` of `route` and `outcome` is `expected`.
    pub async fn assert_received(&self, route: &str, outcome: &str, expected: f64) {
        let labels = [("route", route), ("outcome", outcome)];
        self.assert_metric("notifier_webhooks_received_total", &labels, expected)
            .await;
    }

    /// A channel's breaker as `GET /circuit-breaker` shows it.
    pub async fn breaker(&self, channel: &str) -> ChannelBreaker {
        let breakers = self.admin().breakers().await.expect("GET /circuit-breaker");
        find_channel(breakers, channel)
    }

    pub async fn count(&self, sql: &str) -> i64 {
        self.db.count(sql).await
    }
}

fn status(code: u16) -> reqwest::StatusCode {
    reqwest::StatusCode::from_u16(code).expect("an HTTP status")
}
