//! The endpoint's circuit breaker, as the dispatcher uses it: may a share of deliveries go, and
//! what the breaker learns from each attempt.
//!
//! Each endpoint's breaker lives in `circuit_breakers` (scope `endpoint`), shared by every
//! instance. A batch reads the breakers of its endpoints once; the row is written only when
//! something changes: a failure, a probe, or a success that resets a non-zero failure count. This
//! instance also keeps what it last learnt of each breaker (from a read or its own writes), checked
//! before every request, so a breaker it just opened stops its own requests at once.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use outbox_core::breaker::{self, Admission, Breaker, BreakerPolicy, BreakerState};
use outbox_core::db::PgPool;
use outbox_core::duration::chrono_duration;

use super::limits::lock;
use crate::delivery::decision::Verdict;
use crate::Metrics;

/// The breaker scope of webhook endpoints in `circuit_breakers`.
pub const BREAKER_SCOPE: &str = "endpoint";

/// How one endpoint's share of a batch may go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShareAdmission {
    /// The breaker is closed: send, with the endpoint's concurrency.
    Send,
    /// This share holds the half-open breaker's probe: send its first delivery alone, and hold the
    /// rest until `recheck`.
    Probe { recheck: DateTime<Utc> },
    /// Hold the whole share until then (open, or another delivery is probing).
    Hold(DateTime<Utc>),
}

/// An instance's knowledge of one breaker.
#[derive(Debug, Clone)]
struct Known {
    failures: u32,
    /// While the breaker is open: when a probe may go through.
    probe_at: Option<DateTime<Utc>>,
    /// When what is known was true: the start of the read it came from, or the end of this
    /// instance's own write.
    as_of: Instant,
}

/// The stored breakers of a batch's endpoints, and when they were read.
pub struct Loaded {
    breakers: HashMap<String, Breaker>,
    read_at: Instant,
}

impl Loaded {
    /// The endpoint's breaker as read (closed when never written).
    pub fn get(&self, endpoint_id: &str) -> Breaker {
        self.breakers.get(endpoint_id).cloned().unwrap_or_default()
    }

    pub fn read_at(&self) -> Instant {
        self.read_at
    }
}

pub struct Breakers {
    pool: PgPool,
    policy: BreakerPolicy,
    /// How long deliveries wait while another delivery probes a half-open breaker.
    probe_recheck: Duration,
    known: Mutex<HashMap<String, Known>>,
    metrics: Metrics,
}

impl Breakers {
    pub fn new(pool: PgPool, policy: BreakerPolicy, metrics: Metrics) -> Self {
        Breakers {
            pool,
            probe_recheck: (policy.open_for / 10)
                .clamp(Duration::from_millis(20), Duration::from_secs(1)),
            policy,
            known: Mutex::new(HashMap::new()),
            metrics,
        }
    }

    /// The stored breakers of these endpoints (closed when never written, or unreadable).
    pub async fn load(&self, endpoint_ids: &[&str]) -> Loaded {
        let read_at = Instant::now();
        let loaded = match self.pool.get().await {
            Ok(client) => breaker::store::get_many(&client, BREAKER_SCOPE, endpoint_ids)
                .await
                .map_err(|e| e.to_string()),
            Err(error) => Err(error.to_string()),
        };
        let breakers = loaded.unwrap_or_else(|error| {
            tracing::warn!(%error, "cannot read circuit breakers; treating them as closed");
            HashMap::new()
        });
        Loaded { breakers, read_at }
    }

    /// Decides how a share may go, given the breaker as the batch read it at `read_at`. Once the
    /// cool-down is over, asks for the probe slot under the breaker's row lock.
    pub async fn admit(
        &self,
        endpoint_id: &str,
        stored: &Breaker,
        read_at: Instant,
    ) -> ShareAdmission {
        let now = Utc::now();
        let recheck = now + chrono_duration(self.probe_recheck);
        // A read older than this instance's own last write (a CLOSED read racing the failure that
        // opened it) must not undo it; a newer one (e.g. after an admin reset) replaces it.
        let newer = lock(&self.known)
            .get(endpoint_id)
            .is_none_or(|k| read_at > k.as_of);
        if newer {
            self.learn(endpoint_id, stored, read_at);
        }
        if stored.state == BreakerState::Closed {
            return ShareAdmission::Send;
        }
        if stored.state == BreakerState::Open {
            let probe_at = stored
                .probe_at(self.policy.open_for)
                .unwrap_or_else(|| now + chrono_duration(self.policy.open_for));
            if now < probe_at {
                return ShareAdmission::Hold(probe_at);
            }
        }
        let admission = match self.pool.get().await {
            Ok(mut client) => {
                breaker::store::update(&mut client, BREAKER_SCOPE, endpoint_id, |b| {
                    b.admit(&self.policy, Utc::now())
                })
                .await
                .map(|(admission, _)| admission)
            }
            Err(error) => {
                tracing::warn!(%error, "cannot reach the breaker store");
                Ok(Admission::Rejected { retry_at: recheck })
            }
        };
        match admission {
            Ok(Admission::Probe) => ShareAdmission::Probe { recheck },
            Ok(Admission::Rejected { retry_at }) => ShareAdmission::Hold(retry_at.min(recheck)),
            Ok(Admission::Allowed) => ShareAdmission::Send,
            Err(error) => {
                tracing::warn!(%error, "cannot update the circuit breaker");
                ShareAdmission::Hold(recheck)
            }
        }
    }

    /// When this instance last learnt the endpoint's breaker is open: when a probe may go.
    pub fn probe_at(&self, endpoint_id: &str, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        lock(&self.known)
            .get(endpoint_id)
            .and_then(|k| k.probe_at)
            .filter(|t| *t > now)
    }

    /// Whether the breaker must hear of this verdict: every failure, and a success only when it
    /// resets a non-zero failure count (so a healthy endpoint's successes write nothing).
    pub fn must_hear(&self, endpoint_id: &str, verdict: Verdict) -> bool {
        match verdict {
            Verdict::Failure => true,
            Verdict::Success => lock(&self.known)
                .get(endpoint_id)
                .is_some_and(|k| k.failures > 0),
            Verdict::Unsendable => false,
        }
    }

    fn learn(&self, endpoint_id: &str, breaker: &Breaker, as_of: Instant) {
        lock(&self.known).insert(
            endpoint_id.to_owned(),
            Known {
                failures: breaker.failure_count,
                probe_at: breaker.probe_at(self.policy.open_for),
                as_of,
            },
        );
    }

    /// Applies one verdict to the shared breaker under its row lock.
    pub async fn report(&self, endpoint_id: &str, before: &Breaker, verdict: Verdict) {
        let policy = self.policy;
        let updated = match self.pool.get().await {
            Ok(mut client) => {
                breaker::store::update(&mut client, BREAKER_SCOPE, endpoint_id, |b| match verdict {
                    Verdict::Success => b.on_success(&policy),
                    Verdict::Failure => b.on_failure(&policy, Utc::now()),
                    Verdict::Unsendable => b.on_no_verdict(),
                })
                .await
            }
            Err(error) => {
                tracing::warn!(endpoint_id, %error, "cannot record the breaker's outcome");
                return;
            }
        };
        match updated {
            Ok(((), after)) => {
                if after.state != before.state {
                    tracing::warn!(
                        endpoint_id,
                        from = before.state.as_str(),
                        to = after.state.as_str(),
                        failure_count = after.failure_count,
                        "circuit breaker changed state"
                    );
                }
                self.learn(endpoint_id, &after, Instant::now());
                self.metrics.set_breaker(endpoint_id, after.state);
            }
            Err(error) => {
                tracing::warn!(endpoint_id, %error, "cannot record the breaker's outcome")
            }
        }
    }
}
