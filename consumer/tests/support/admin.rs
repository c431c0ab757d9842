//! A typed client of the consumer's admin API, as the tests (and the end-to-end tests, which
//! include this file) call it: the service's own response types where they are public, small
//! mirrors of the private ones, and the request bodies a client sends. A refusal comes back as
//! [`Refusal`] (status and `code`); a test of malformed input uses [`ApiClient::call`] instead.

#![allow(dead_code, async_fn_in_trait)]

use chrono::{DateTime, Utc};
use consumer::delivery::store::{DeliveryDetail, DeliveryView};
use consumer::delivery::DeliveryState;
use consumer::endpoints::Endpoint;
use consumer::ingest::PoisonRecord;
use outbox_core::breaker::BreakerView;
use outbox_core::testing::{ApiClient, Refusal};
use serde::{Deserialize, Serialize};

/// The body of `POST /endpoints` and `PUT /endpoints/{id}`; absent fields are not sent.
#[derive(Debug, Clone, Default, Serialize)]
pub struct NewEndpoint {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub url: String,
    pub event_types: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limit_per_second: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
}

impl NewEndpoint {
    /// An endpoint for `url` subscribed to `event_types`, everything else defaulted.
    pub fn new(url: &str, event_types: &[&str]) -> Self {
        NewEndpoint {
            url: url.to_owned(),
            event_types: event_types.iter().map(|t| (*t).to_owned()).collect(),
            ..Self::default()
        }
    }

    pub fn id(mut self, id: &str) -> Self {
        self.id = Some(id.to_owned());
        self
    }

    pub fn description(mut self, description: &str) -> Self {
        self.description = Some(description.to_owned());
        self
    }

    pub fn secret(mut self, secret: &str) -> Self {
        self.secret = Some(secret.to_owned());
        self
    }
}

/// The body of `PATCH /endpoints/{id}`: only the fields to change are sent.
#[derive(Debug, Clone, Default, Serialize)]
pub struct EndpointChange {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event_types: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
}

/// The answer of `POST /endpoints/{id}/rotate-secret`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rotated {
    pub id: String,
    pub secret: String,
    pub previous_secret_expires_at: DateTime<Utc>,
}

/// The optional body of `POST /endpoints/{id}/replay`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReplayWindow {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub since: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub until: Option<DateTime<Utc>>,
}

/// The answer of `POST /endpoints/{id}/replay`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplayedDead {
    pub endpoint_id: String,
    pub replayed: u64,
}

/// Which deliveries `GET /deliveries` lists.
#[derive(Debug, Clone, Default)]
pub struct DeliveryFilter {
    pub state: Option<DeliveryState>,
    pub endpoint_id: Option<String>,
    pub event_id: Option<String>,
}

impl DeliveryFilter {
    pub fn state(state: DeliveryState) -> Self {
        DeliveryFilter {
            state: Some(state),
            ..Self::default()
        }
    }

    pub fn event(event_id: &str) -> Self {
        DeliveryFilter {
            event_id: Some(event_id.to_owned()),
            ..Self::default()
        }
    }

    pub fn endpoint(endpoint_id: &str) -> Self {
        DeliveryFilter {
            endpoint_id: Some(endpoint_id.to_owned()),
            ..Self::default()
        }
    }

    pub fn and_state(mut self, state: DeliveryState) -> Self {
        self.state = Some(state);
        self
    }

    /// The query string, `?…` (empty without filters).
    fn query(&self) -> String {
        let state = self.state.map(|s| {
            serde_json::to_value(s)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .expect("a state is a string")
        });
        let pairs: Vec<String> = [
            ("state", state),
            ("endpoint_id", self.endpoint_id.clone()),
            ("event_id", self.event_id.clone()),
        ]
        .into_iter()
        .filter_map(|(name, value)| Some(format!("{name}={}", value?)))
        .collect();
        if pairs.is_empty() {
            String::new()
        } else {
            format!("?{}", pairs.join("&"))
        }
    }
}

/// A page of `GET /deliveries`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeliveryPage {
    pub deliveries: Vec<DeliveryView>,
    pub next_after: Option<i64>,
}

/// The answer of `POST /deliveries/{id}/retry`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Queued {
    pub id: i64,
    pub state: DeliveryState,
}

/// An endpoint's breaker, as `GET /circuit-breakers` lists it.
#[derive(Debug, Clone, Deserialize)]
pub struct EndpointBreaker {
    pub endpoint_id: String,
    #[serde(flatten)]
    pub view: BreakerView,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct BreakerList {
    circuit_breakers: Vec<EndpointBreaker>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct EndpointList {
    endpoints: Vec<Endpoint>,
}

/// A page of `GET /events/poison`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoisonPage {
    pub poison_records: Vec<PoisonRecord>,
    pub next_after: Option<i64>,
}

/// The answer of `POST /events/poison/{id}/replay`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplayedPoison {
    pub id: i64,
    pub event_id: String,
    pub deliveries: u64,
    pub duplicate: bool,
}

/// The consumer's admin operations the tests use, on an [`ApiClient`] of a consumer.
pub trait ConsumerAdmin {
    /// `POST /endpoints` (201).
    async fn create_endpoint(&self, new: &NewEndpoint) -> Result<Endpoint, Refusal>;
    /// `GET /endpoints`.
    async fn list_endpoints(&self) -> Result<Vec<Endpoint>, Refusal>;
    /// `GET /endpoints/{id}`.
    async fn endpoint(&self, id: &str) -> Result<Endpoint, Refusal>;
    /// `PATCH /endpoints/{id}`.
    async fn update_endpoint(&self, id: &str, change: &EndpointChange)
        -> Result<Endpoint, Refusal>;
    /// `PUT /endpoints/{id}`.
    async fn replace_endpoint(&self, id: &str, whole: &NewEndpoint) -> Result<Endpoint, Refusal>;
    /// `DELETE /endpoints/{id}` (204).
    async fn delete_endpoint(&self, id: &str) -> Result<(), Refusal>;
    /// `POST /endpoints/{id}/disable` or `…/enable`.
    async fn set_enabled(&self, id: &str, enabled: bool) -> Result<Endpoint, Refusal>;
    /// `POST /endpoints/{id}/rotate-secret` with an empty body (a generated secret).
    async fn rotate_secret(&self, id: &str) -> Result<Rotated, Refusal>;
    /// `POST /endpoints/{id}/replay`.
    async fn replay_dead(&self, id: &str, window: &ReplayWindow) -> Result<ReplayedDead, Refusal>;
    /// `GET /deliveries` (the first page).
    async fn list_deliveries(&self, filter: &DeliveryFilter) -> Result<DeliveryPage, Refusal>;
    /// `GET /deliveries/{id}`.
    async fn delivery(&self, id: i64) -> Result<DeliveryDetail, Refusal>;
    /// `POST /deliveries/{id}/retry`.
    async fn retry_delivery(&self, id: i64) -> Result<Queued, Refusal>;
    /// `GET /circuit-breakers`.
    async fn breakers(&self) -> Result<Vec<EndpointBreaker>, Refusal>;
    /// `POST /circuit-breakers/{endpoint_id}/reset`.
    async fn reset_breaker(&self, endpoint_id: &str) -> Result<EndpointBreaker, Refusal>;
    /// `GET /events/poison` (the first page).
    async fn poison_records(&self) -> Result<PoisonPage, Refusal>;
    /// `POST /events/poison/{id}/replay`; `id` as the path has it (tests send bad ones too).
    async fn replay_poison(&self, id: &str) -> Result<ReplayedPoison, Refusal>;

    /// The breaker of `endpoint_id` as the list shows it, if the endpoint exists.
    async fn breaker(&self, endpoint_id: &str) -> Option<EndpointBreaker> {
        let all = self.breakers().await.expect("GET /circuit-breakers");
        all.into_iter().find(|b| b.endpoint_id == endpoint_id)
    }
}

impl ConsumerAdmin for ApiClient {
    async fn create_endpoint(&self, new: &NewEndpoint) -> Result<Endpoint, Refusal> {
        self.send("POST", "/endpoints", Some(new), 201).await
    }

    async fn list_endpoints(&self) -> Result<Vec<Endpoint>, Refusal> {
        Ok(self.get::<EndpointList>("/endpoints").await?.endpoints)
    }

    async fn endpoint(&self, id: &str) -> Result<Endpoint, Refusal> {
        self.get(&format!("/endpoints/{id}")).await
    }

    async fn update_endpoint(
        &self,
        id: &str,
        change: &EndpointChange,
    ) -> Result<Endpoint, Refusal> {
        self.send("PATCH", &format!("/endpoints/{id}"), Some(change), 200)
            .await
    }

    async fn replace_endpoint(&self, id: &str, whole: &NewEndpoint) -> Result<Endpoint, Refusal> {
        self.send("PUT", &format!("/endpoints/{id}"), Some(whole), 200)
            .await
    }

    async fn delete_endpoint(&self, id: &str) -> Result<(), Refusal> {
        self.send("DELETE", &format!("/endpoints/{id}"), NO_BODY, 204)
            .await
    }

    async fn set_enabled(&self, id: &str, enabled: bool) -> Result<Endpoint, Refusal> {
        let action = if enabled { "enable" } else { "disable" };
        self.send("POST", &format!("/endpoints/{id}/{action}"), NO_BODY, 200)
            .await
    }

    async fn rotate_secret(&self, id: &str) -> Result<Rotated, Refusal> {
        self.send(
            "POST",
            &format!("/endpoints/{id}/rotate-secret"),
            NO_BODY,
            200,
        )
        .await
    }

    async fn replay_dead(&self, id: &str, window: &ReplayWindow) -> Result<ReplayedDead, Refusal> {
        self.send(
            "POST",
            &format!("/endpoints/{id}/replay"),
            Some(window),
            200,
        )
        .await
    }

    async fn list_deliveries(&self, filter: &DeliveryFilter) -> Result<DeliveryPage, Refusal> {
        self.get(&format!("/deliveries{}", filter.query())).await
    }

    async fn delivery(&self, id: i64) -> Result<DeliveryDetail, Refusal> {
        self.get(&format!("/deliveries/{id}")).await
    }

    async fn retry_delivery(&self, id: i64) -> Result<Queued, Refusal> {
        self.send("POST", &format!("/deliveries/{id}/retry"), NO_BODY, 200)
            .await
    }

    async fn breakers(&self) -> Result<Vec<EndpointBreaker>, Refusal> {
        Ok(self
            .get::<BreakerList>("/circuit-breakers")
            .await?
            .circuit_breakers)
    }

    async fn reset_breaker(&self, endpoint_id: &str) -> Result<EndpointBreaker, Refusal> {
        let path = format!("/circuit-breakers/{endpoint_id}/reset");
        self.send("POST", &path, NO_BODY, 200).await
    }

    async fn poison_records(&self) -> Result<PoisonPage, Refusal> {
        self.get("/events/poison").await
    }

    async fn replay_poison(&self, id: &str) -> Result<ReplayedPoison, Refusal> {
        self.send("POST", &format!("/events/poison/{id}/replay"), NO_BODY, 200)
            .await
    }
}

/// No request body.
const NO_BODY: Option<&()> = None;
