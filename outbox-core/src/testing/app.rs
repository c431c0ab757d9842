//! The one harness shape every crate's tests use (zero-to-production's `spawn_app`): a service
//! started in-process on a random port of 127.0.0.1 against a fresh [`TestDb`], handed back as a
//! [`TestApp`] with its base URL, database, HTTP client and configuration, which can stop, kill
//! and start it again on the same address.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{eventually, TestDb};

type Running = Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send>>;
type Start<C> = Arc<dyn Fn(C, TcpListener, CancellationToken) -> Running + Send + Sync>;

/// A service running in-process. Dropping it cancels its shutdown token (the service stops in the
/// background); [`TestApp::stop`] stops it and waits.
pub struct TestApp<C> {
    /// `http://127.0.0.1:<port>`.
    pub base: String,
    pub port: u16,
    /// The database it runs on (a clone of the handle: services of one test may share it).
    pub db: TestDb,
    /// What it was started with; [`TestApp::start`] starts it with this again.
    pub config: C,
    pub http: reqwest::Client,
    /// The bearer token [`TestApp::admin`] sends, if any.
    pub token: Option<String>,
    shutdown: CancellationToken,
    task: Option<JoinHandle<anyhow::Result<()>>>,
    start: Start<C>,
}

impl<C> Drop for TestApp<C> {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Binds `port` of 127.0.0.1 (0: any). A restarted service takes its predecessor's port, which
/// the predecessor's aborted tasks may hold for a moment longer, so this waits for it.
pub async fn listen(port: u16) -> (TcpListener, u16) {
    let listener = eventually("the port is free", Duration::from_secs(10), || async {
        TcpListener::bind(("127.0.0.1", port)).await.ok()
    })
    .await;
    let port = listener.local_addr().expect("bound address").port();
    (listener, port)
}

impl<C: Clone + Send + 'static> TestApp<C> {
    /// Starts `run(config, listener, shutdown)` (a service's `run`) on a random port, on `db`.
    /// Returns at once: [`TestApp::wait_ready`] waits for `/ready`.
    pub async fn spawn<F, Fut>(db: TestDb, config: C, run: F) -> Self
    where
        F: Fn(C, TcpListener, CancellationToken) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        crate::telemetry::init_logging();
        let start: Start<C> = Arc::new(move |config, listener, shutdown| {
            Box::pin(run(config, listener, shutdown)) as Running
        });
        let mut app = TestApp {
            base: String::new(),
            port: 0,
            db,
            config,
            http: reqwest::Client::new(),
            token: None,
            shutdown: CancellationToken::new(),
            task: None,
            start,
        };
        app.start().await;
        app
    }

    /// Starts the service again with [`TestApp::config`] on its old port (the first time: on a
    /// random one), after [`TestApp::stop`] or [`TestApp::kill`].
    pub async fn start(&mut self) {
        assert!(self.task.is_none(), "the service is still running");
        let (listener, port) = listen(self.port).await;
        self.port = port;
        self.base = format!("http://127.0.0.1:{port}");
        // What a killed predecessor spawned stops now, as when its handle is dropped.
        self.shutdown.cancel();
        self.shutdown = CancellationToken::new();
        let running = (self.start)(self.config.clone(), listener, self.shutdown.clone());
        self.task = Some(tokio::spawn(running));
    }

    /// Stops it gracefully (cancels its shutdown token) and waits until it returned.
    pub async fn stop(&mut self) -> Option<anyhow::Result<()>> {
        self.cancel();
        self.join().await
    }

    /// Asks it to stop (cancels its shutdown token) without waiting.
    pub fn cancel(&self) {
        self.shutdown.cancel();
    }

    /// Kills it as in a crash: its task is aborted wherever it is. What the task spawned keeps
    /// running until the shutdown token is cancelled: by [`TestApp::start`], [`TestApp::cancel`]
    /// or dropping the handle.
    pub async fn kill(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
        let _ = self.join().await;
    }

    /// Kills it and starts it again on the same address with the same configuration.
    pub async fn restart(&mut self) {
        self.kill().await;
        self.start().await;
    }

    /// Waits until it returned by itself; what it returned (`None` when it panicked or was
    /// aborted, or was not running).
    pub async fn join(&mut self) -> Option<anyhow::Result<()>> {
        self.task.take()?.await.ok()
    }

    /// Whether its task has returned.
    pub fn is_finished(&self) -> bool {
        self.task.as_ref().is_none_or(|t| t.is_finished())
    }
}

impl<C> TestApp<C> {
    /// The same, sending `Authorization: Bearer <token>` from [`TestApp::admin`].
    pub fn with_token(mut self, token: Option<String>) -> Self {
        self.token = token;
        self
    }

    /// `base` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Polls `GET /ready` until it answers 2xx (30 s at most).
    pub async fn wait_ready(&self) {
        eventually("the service is ready", Duration::from_secs(30), || async {
            let status = self.try_status("/ready").await?;
            (200..300).contains(&status).then_some(())
        })
        .await;
    }

    /// The status `GET path` answers; `None` when nothing answers (for polling).
    pub async fn try_status(&self, path: &str) -> Option<u16> {
        let response = self.http.get(self.url(path)).send().await.ok()?;
        Some(response.status().as_u16())
    }

    /// The Prometheus text of `/metrics`.
    pub async fn metrics(&self) -> String {
        super::get_text(&self.http, &self.url("/metrics")).await
    }

    /// `GET path`, the body as JSON (whatever the status).
    pub async fn get_json(&self, path: &str) -> Value {
        super::get_json(&self.http, &self.url(path)).await
    }

    /// [`ApiClient::call`] with the app's token: for requests a typed client cannot send
    /// (malformed input, say).
    pub async fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        self.admin().call(method, path, body).await
    }

    /// A client of its API, with the app's token.
    pub fn admin(&self) -> ApiClient {
        ApiClient {
            base: self.base.clone(),
            http: self.http.clone(),
            token: self.token.clone(),
        }
    }
}

/// A refusal as every service answers one: the status and `{"error", "code"}`
/// ([`crate::http::ApiError`]), or the body as it came when it is not that shape.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub status: u16,
    pub code: String,
    pub error: String,
    pub body: Value,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status, self.body)
    }
}

/// A JSON client of one service: typed calls on top of [`ApiClient::call`]. Each crate's test
/// support adds the service's own operations to it (a trait of typed methods).
#[derive(Clone)]
pub struct ApiClient {
    pub base: String,
    pub http: reqwest::Client,
    pub token: Option<String>,
}

impl ApiClient {
    /// The same client sending `Authorization: Bearer <token>`.
    pub fn with_token(mut self, token: &str) -> Self {
        self.token = Some(token.to_owned());
        self
    }

    /// `method base+path` with `body` as JSON (when given) and the bearer token (when set);
    /// the status and the body as JSON (`Null` when it is not JSON). Panics when nothing answers.
    pub async fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        self.try_call(method, path, body)
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: the service does not answer: {e}"))
    }

    /// [`ApiClient::call`], with the error when nothing answers.
    pub async fn try_call(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> Result<(u16, Value), reqwest::Error> {
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("an HTTP method");
        let mut request = self.http.request(method, format!("{}{path}", self.base));
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await?;
        let status = response.status().as_u16();
        let text = response.text().await.unwrap_or_default();
        Ok((status, serde_json::from_str(&text).unwrap_or(Value::Null)))
    }

    /// [`ApiClient::call`] answered with `expected`, its body read as `T`; any other status is a
    /// [`Refusal`] (status 0 when nothing answered). Panics when the body of the expected status is not a `T`.
    pub async fn send<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&(impl Serialize + ?Sized)>,
        expected: u16,
    ) -> Result<T, Refusal> {
        let body = body.map(|b| serde_json::to_value(b).expect("a request body is JSON"));
        let (status, body) = match self.try_call(method, path, body).await {
            Ok(answer) => answer,
            // Nothing answered (a service being restarted, say): status 0.
            Err(error) => (
                0,
                serde_json::json!({"code": "no_answer", "error": error.to_string()}),
            ),
        };
        if status != expected {
            return Err(Refusal {
                status,
                code: body["code"].as_str().unwrap_or_default().to_owned(),
                error: body["error"].as_str().unwrap_or_default().to_owned(),
                body,
            });
        }
        // A 204 has no body: read it as `null` (for `T = ()`).
        Ok(serde_json::from_value(body.clone())
            .unwrap_or_else(|e| panic!("{method} {path} answered {status} with {body}: {e}")))
    }

    /// `GET path` answering 200, read as `T`.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, Refusal> {
        self.send("GET", path, None::<&Value>, 200).await
    }
}
