//! A typed client of the notifier's read and operator routes, as the tests (and the end-to-end
//! tests, which include this file) call them: the service's own `ReceivedEvent` and
//! `Notification`, and small mirrors of its private list types.

#![allow(dead_code, async_fn_in_trait)]

use notifier::{Notification, ReceivedEvent};
use outbox_core::breaker::BreakerView;
use outbox_core::testing::{ApiClient, Refusal};
use serde::Deserialize;

/// A page of `GET /webhooks/events`, newest first.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventPage {
    pub events: Vec<ReceivedEvent>,
    pub next_before: Option<i64>,
}

/// A page of `GET /notifications`, newest first.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotificationPage {
    pub notifications: Vec<Notification>,
    pub next_before: Option<i64>,
}

/// A channel's breaker, as `GET /circuit-breaker` lists it.
#[derive(Debug, Clone, Deserialize)]
pub struct ChannelBreaker {
    pub channel: String,
    pub enabled: bool,
    #[serde(flatten)]
    pub view: BreakerView,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct BreakerList {
    breakers: Vec<ChannelBreaker>,
}

/// The breaker of `channel` among `breakers`; panics when it is not listed.
pub fn find_channel(breakers: Vec<ChannelBreaker>, channel: &str) -> ChannelBreaker {
    breakers
        .into_iter()
        .find(|b| b.channel == channel)
        .unwrap_or_else(|| panic!("no breaker listed for {channel}"))
}

/// The notifier's routes the tests read, on an [`ApiClient`] of a notifier.
pub trait NotifierApi {
    /// `GET /webhooks/events` with `query` (`""`, or `?route=…&limit=…&before=…`).
    async fn events(&self, query: &str) -> Result<EventPage, Refusal>;
    /// `GET /notifications?webhook_id=…`.
    async fn notifications_of(&self, webhook_id: &str) -> Result<NotificationPage, Refusal>;
    /// `GET /circuit-breaker`.
    async fn breakers(&self) -> Result<Vec<ChannelBreaker>, Refusal>;
    /// `POST /circuit-breaker/reset?channel=…`: both breakers after the reset.
    async fn reset_breaker(&self, channel: &str) -> Result<Vec<ChannelBreaker>, Refusal>;

    /// Every event the notifier stored, following `next_before` from the newest; what was read
    /// so far when a page cannot be read (for polling a notifier that may be restarting).
    async fn all_events(&self) -> Vec<ReceivedEvent> {
        let mut events = Vec::new();
        let mut query = "?limit=100".to_owned();
        while let Ok(page) = self.events(&query).await {
            events.extend(page.events);
            match page.next_before {
                Some(before) => query = format!("?limit=100&before={before}"),
                None => break,
            }
        }
        events
    }
}

impl NotifierApi for ApiClient {
    async fn events(&self, query: &str) -> Result<EventPage, Refusal> {
        self.get(&format!("/webhooks/events{query}")).await
    }

    async fn notifications_of(&self, webhook_id: &str) -> Result<NotificationPage, Refusal> {
        self.get(&format!("/notifications?webhook_id={webhook_id}"))
            .await
    }

    async fn breakers(&self) -> Result<Vec<ChannelBreaker>, Refusal> {
        Ok(self.get::<BreakerList>("/circuit-breaker").await?.breakers)
    }

    async fn reset_breaker(&self, channel: &str) -> Result<Vec<ChannelBreaker>, Refusal> {
        let path = format!("/circuit-breaker/reset?channel={channel}");
        let list: BreakerList = self.send("POST", &path, None::<&()>, 200).await?;
        Ok(list.breakers)
    }
}
