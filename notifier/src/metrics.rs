//! The notifier's metrics (names in docs/metrics.md), in a registry of its own per instance.

use std::time::Duration;

use outbox_core::breaker::{self, Breaker, BreakerState};
use outbox_core::telemetry::register;
use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};
use tokio_util::sync::CancellationToken;

use crate::AppState;

/// How often the breaker gauges are re-read from PostgreSQL: other instances change them too.
const GAUGE_REFRESH: Duration = Duration::from_secs(5);

/// Outcome labels of `notifier_webhooks_received_total`.
pub mod received {
    pub const ACCEPTED: &str = "accepted";
    pub const BAD_SIGNATURE: &str = "bad_signature";
    pub const STALE: &str = "stale";
    pub const DUPLICATE: &str = "duplicate";
    pub const INVALID: &str = "invalid";
    /// Every outcome, for the series that exist at 0 from the start.
    pub const ALL: [&str; 5] = [ACCEPTED, BAD_SIGNATURE, STALE, DUPLICATE, INVALID];
}

/// Outcome labels of `notifier_notifications_total` (also `notifications.outcome`).
pub mod notified {
    pub const SENT: &str = "sent";
    pub const FAILED: &str = "failed";
    pub const REJECTED_OPEN: &str = "rejected_open";
    /// Every outcome, for the series that exist at 0 from the start.
    pub const ALL: [&str; 3] = [SENT, FAILED, REJECTED_OPEN];
}

/// Counters and gauges of one notifier instance.
#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    /// By `route` and `outcome` (see [`received`]).
    pub webhooks_received: IntCounterVec,
    /// By `channel` and `outcome` (see [`notified`]).
    pub notifications: IntCounterVec,
    /// By `channel` and `state`: 1 for the channel's current state, 0 for the others.
    pub breaker_state: IntGaugeVec,
}

impl Metrics {
    /// The metrics of one instance, with a series at 0 for every channel's outcomes and for every
    /// outcome of each of `webhook_routes` (the `route` labels).
    pub fn new(webhook_routes: &[&str]) -> Self {
        let registry = Registry::new();
        let metrics = Metrics {
            webhooks_received: register(
                &registry,
                IntCounterVec::new(
                    Opts::new(
                        "notifier_webhooks_received_total",
                        "Webhooks received, by route and outcome",
                    ),
                    &["route", "outcome"],
                )
                .expect("valid metric"),
            ),
            notifications: register(
                &registry,
                IntCounterVec::new(
                    Opts::new(
                        "notifier_notifications_total",
                        "Notifications, by channel and outcome",
                    ),
                    &["channel", "outcome"],
                )
                .expect("valid metric"),
            ),
            breaker_state: register(
                &registry,
                IntGaugeVec::new(
                    Opts::new(
                        "notifier_circuit_breaker_state",
                        "1 for the current state of each channel's circuit breaker",
                    ),
                    &["channel", "state"],
                )
                .expect("valid metric"),
            ),
            registry,
        };
        for channel in crate::channels::ALL {
            metrics.set_breaker(channel, BreakerState::Closed);
            // Every series at 0 from the start, so rate() sees the first one and a dashboard
            // shows 0 rather than "No data" while nothing has failed.
            for outcome in notified::ALL {
                metrics.notifications.with_label_values(&[channel, outcome]);
            }
        }
        for &route in webhook_routes {
            for outcome in received::ALL {
                metrics
                    .webhooks_received
                    .with_label_values(&[route, outcome]);
            }
        }
        metrics
    }

    /// Sets the channel's gauge to 1 for `state` and 0 for the other states.
    pub fn set_breaker(&self, channel: &str, state: BreakerState) {
        for s in BreakerState::ALL {
            self.breaker_state
                .with_label_values(&[channel, s.label()])
                .set(i64::from(s == state));
        }
    }

    pub fn received(&self, route: &str, outcome: &str) {
        self.webhooks_received
            .with_label_values(&[route, outcome])
            .inc();
    }

    pub fn notified(&self, channel: &str, outcome: &str) {
        self.notifications
            .with_label_values(&[channel, outcome])
            .inc();
    }
}

/// Keeps the breaker gauges in step with the shared breakers until `shutdown`, so a state set by
/// another instance (or a reset) shows here too.
pub async fn refresh_breaker_gauges(state: &AppState, shutdown: &CancellationToken) {
    loop {
        if let Ok(client) = state.pool.get().await {
            if let Ok(stored) = breaker::store::list(&client, crate::store::BREAKER_SCOPE).await {
                for channel in crate::channels::ALL {
                    let current = stored
                        .iter()
                        .find(|b| b.name == channel)
                        .map(|b| b.breaker.clone())
                        .unwrap_or_else(Breaker::default);
                    state.metrics.set_breaker(channel, current.state);
                }
            }
        }
        if !outbox_core::shutdown::sleep_or_cancel(GAUGE_REFRESH, shutdown).await {
            return;
        }
    }
}
