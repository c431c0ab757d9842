//! What the producer's tests start: the producer on a random port against a fresh database, and
//! a typed client of its API.

#![allow(dead_code, async_fn_in_trait)]

use outbox_core::outbox::OutboxState;
use outbox_core::testing::{ApiClient, Refusal, TestApp, TestDb};
use producer::{CreatedMessage, MessageList, MessageView, OutboxList, OutboxRow, Stats};
use reqwest::StatusCode;
use serde::Serialize;
use serde_json::Value;

/// The producer running in-process.
pub type TestProducer = TestApp<producer::Config>;

/// The producer's test configuration on `database_url`: topic `messages-test`, no admin token.
pub fn config(database_url: &str) -> producer::Config {
    let mut config: producer::Config = outbox_core::config::from_env().expect("defaults parse");
    config.database.database_url = database_url.to_owned();
    config.topics.kafka_topic = "messages-test".into();
    // An ADMIN_TOKEN in the developer's environment must not close the routes tests read.
    config.admin_token = None;
    config
}

/// The producer on a fresh database.
pub async fn spawn_app() -> TestProducer {
    let db = TestDb::create().await;
    let url = db.url.clone();
    spawn_app_with(db, &url, |_| {}).await
}

/// The producer on `db` with `DATABASE_URL=database_url` (one that is down, say) and the
/// configuration `tweak` changed. Returns at once, as the tests that poll `/ready` expect.
pub async fn spawn_app_with(
    db: TestDb,
    database_url: &str,
    tweak: impl FnOnce(&mut producer::Config),
) -> TestProducer {
    let mut config = config(database_url);
    tweak(&mut config);
    TestApp::spawn(db, config, producer::run).await
}

/// The untyped calls the tests of refusals make, and the row counts they check.
pub trait ProducerTest {
    /// `POST /messages` with `body`: the status and the JSON answer (`Null` when not JSON).
    async fn post(&self, body: Value) -> (StatusCode, Value);
    /// `GET path`: the status and the JSON answer (`Null` when not JSON).
    async fn get(&self, path: &str) -> (StatusCode, Value);
    /// (messages, outbox rows).
    async fn rows(&self) -> (i64, i64);
}

fn status(code: u16) -> StatusCode {
    StatusCode::from_u16(code).expect("an HTTP status")
}

impl ProducerTest for TestProducer {
    async fn post(&self, body: Value) -> (StatusCode, Value) {
        let (code, body) = self.call("POST", "/messages", Some(body)).await;
        (status(code), body)
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        let (code, body) = self.call("GET", path, None).await;
        (status(code), body)
    }

    async fn rows(&self) -> (i64, i64) {
        (
            self.db.count("select count(*) from messages").await,
            self.db.count("select count(*) from outbox").await,
        )
    }
}

/// The body of `POST /messages`; absent fields are not sent.
#[derive(Debug, Clone, Default, Serialize)]
pub struct NewMessage {
    pub content: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
}

impl NewMessage {
    pub fn new(content: &str) -> Self {
        NewMessage {
            content: content.to_owned(),
            ..Self::default()
        }
    }
}

/// The producer's API as the tests use it, typed, on an [`ApiClient`] of a producer.
pub trait ProducerApi {
    /// `POST /messages` (201).
    async fn create_message(&self, message: &NewMessage) -> Result<CreatedMessage, Refusal>;
    /// `GET /messages/{id}`.
    async fn message(&self, id: &str) -> Result<MessageView, Refusal>;
    /// `GET /messages?limit=…&before=…`.
    async fn list_messages(
        &self,
        limit: i64,
        before: Option<uuid::Uuid>,
    ) -> Result<MessageList, Refusal>;
    /// `GET /outbox?state=…`.
    async fn list_outbox(&self, state: OutboxState) -> Result<OutboxList, Refusal>;
    /// `POST /outbox/{id}/retry`.
    async fn retry_outbox(&self, id: i64) -> Result<OutboxRow, Refusal>;
    /// `GET /stats`.
    async fn stats(&self) -> Result<Stats, Refusal>;
}

impl ProducerApi for ApiClient {
    async fn create_message(&self, message: &NewMessage) -> Result<CreatedMessage, Refusal> {
        self.send("POST", "/messages", Some(message), 201).await
    }

    async fn message(&self, id: &str) -> Result<MessageView, Refusal> {
        self.get(&format!("/messages/{id}")).await
    }

    async fn list_messages(
        &self,
        limit: i64,
        before: Option<uuid::Uuid>,
    ) -> Result<MessageList, Refusal> {
        let before = before.map(|b| format!("&before={b}")).unwrap_or_default();
        self.get(&format!("/messages?limit={limit}{before}")).await
    }

    async fn list_outbox(&self, state: OutboxState) -> Result<OutboxList, Refusal> {
        self.get(&format!("/outbox?state={}", state.code())).await
    }

    async fn retry_outbox(&self, id: i64) -> Result<OutboxRow, Refusal> {
        self.send("POST", &format!("/outbox/{id}/retry"), None::<&()>, 200)
            .await
    }

    async fn stats(&self) -> Result<Stats, Refusal> {
        self.get("/stats").await
    }
}
