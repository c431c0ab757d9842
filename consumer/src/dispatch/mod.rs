//! Dispatching: claims due deliveries (safely across instances), sends them as signed webhooks,
//! and records every attempt and the deliveries' new states in one transaction per batch.
//!
//! A batch is split by endpoint into shares, each sent on a task of its own, in named phases:
//!
//! 1. **admit** the share through the endpoint's breaker ([`admission`]): send, probe, or hold;
//! 2. **prepare** each delivery: an endpoint slot, the lease still long enough, the breaker as
//!    this instance knows it, the endpoint's rate limit; or release it unsent;
//! 3. **make the call** ([`attempt::make`]): the facts of one attempt;
//! 4. **decide** ([`decision::decide`], pure): the next step and the breaker's verdict;
//! 5. **handle** it: metrics, logs, the breaker told;
//! 6. **record** the share's outcomes ([`store::record_results`]), matched by id and lease, so a
//!    late writer never undoes another instance's work. A crashed instance's batch becomes due
//!    again by itself when its lease ends.

mod admission;
mod attempt;
mod limits;

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures::StreamExt;
use outbox_core::breaker::Breaker;
use outbox_core::db::PgPool;
use outbox_core::duration::chrono_duration;
use outbox_core::reconnect::Backoff;
use outbox_core::schedule::{with_jitter, RetrySchedule};
use outbox_core::shutdown::sleep_or_cancel;
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

pub use self::admission::BREAKER_SCOPE;
use self::admission::{Breakers, ShareAdmission};
use self::attempt::Made;
use self::limits::{lock, RateLimits, Shares};
use crate::delivery::decision::{self, Decision, Next, Verdict};
use crate::delivery::store::{self, Attempt, Claimed, Outcome, Step};
use crate::metrics::outcome;
use crate::{Config, Metrics};

/// When deliveries handed back because their endpoint already holds its limit in memory are due
/// again.
const ENDPOINT_FULL_RECHECK: Duration = Duration::from_secs(1);

/// Fixed settings of the dispatchers.
#[derive(Debug, Clone)]
struct Settings {
    schedule: RetrySchedule,
    jitter: f64,
    batch_size: i64,
    lease: Duration,
    timeout: Duration,
    poll: Duration,
    endpoint_concurrency: usize,
}

/// Sends deliveries. Shared by the dispatcher loops of one instance, which share its HTTP
/// connection pool and concurrency limits.
pub struct Dispatcher {
    pool: PgPool,
    http: crate::webhook_client::WebhookClient,
    settings: Settings,
    metrics: Metrics,
    wake: Arc<Notify>,
    breakers: Breakers,
    global: Arc<Semaphore>,
    endpoint_slots: std::sync::Mutex<std::collections::HashMap<String, Arc<Semaphore>>>,
    rates: RateLimits,
    /// Each endpoint's share of a batch is sent and recorded on a task of its own, so that a slow
    /// or hung endpoint holds up neither another endpoint's deliveries nor the dispatcher or fast
    /// lane that handed them over.
    shares: TaskTracker,
    /// Cancelled when the consumer is dropped without a shutdown (a crash, or a test aborting
    /// `run`): the share tasks stop where they are, with the rest of the instance.
    crashed: CancellationToken,
    /// Deliveries in this instance's memory (handed over, not yet recorded). `deliver` waits for
    /// room, which is what makes the dispatchers claim less and ingest lease less under load.
    in_memory: Arc<Semaphore>,
    /// Each endpoint's part of `in_memory`: at most half of it.
    in_memory_by_endpoint: Shares,
}

impl Dispatcher {
    /// A dispatcher configured from `config`; its HTTP client keeps connections alive, follows no
    /// redirects, uses no proxy but `WEBHOOK_PROXY` and (unless private endpoints are allowed)
    /// connects to no special-purpose address (see [`crate::webhook_client`]).
    pub fn new(
        config: &Config,
        pool: PgPool,
        metrics: Metrics,
        wake: Arc<Notify>,
    ) -> anyhow::Result<Self> {
        let http = crate::webhook_client::WebhookClient::new(config)?;
        // As much as every dispatcher and every fast lane holding a full batch at once, twice.
        let in_memory = 2
            * config.dispatch_workers.max(1)
            * (config.dispatch_batch_size.max(1) as usize).max(config.consumer_batch_size.max(1));
        Ok(Dispatcher {
            breakers: Breakers::new(pool.clone(), config.breaker_policy(), metrics.clone()),
            pool,
            http,
            settings: Settings {
                schedule: config.retry_schedule.clone(),
                jitter: config.retry_jitter.clamp(0.0, 1.0),
                batch_size: config.dispatch_batch_size.max(1),
                lease: config.delivery_lease,
                timeout: config.delivery_timeout,
                poll: config.dispatch_poll_interval,
                endpoint_concurrency: config.endpoint_concurrency.max(1),
            },
            metrics,
            wake,
            global: Arc::new(Semaphore::new(config.delivery_concurrency.max(1))),
            endpoint_slots: Default::default(),
            rates: RateLimits::default(),
            shares: TaskTracker::new(),
            crashed: CancellationToken::new(),
            in_memory: Arc::new(Semaphore::new(in_memory)),
            in_memory_by_endpoint: Shares::new(in_memory / 2),
        })
    }

    /// A guard to keep while the dispatcher runs: dropping it without [`Dispatcher::finish`]
    /// (a crash) stops every share still being sent, unrecorded, as a crash would.
    pub fn crash_guard(&self) -> tokio_util::sync::DropGuard {
        self.crashed.clone().drop_guard()
    }

    /// Waits until every share handed to [`Dispatcher::deliver`] is sent (or handed back) and
    /// recorded. Call after the dispatcher loops and lanes have stopped.
    pub async fn finish(&self) {
        self.shares.close();
        self.shares.wait().await;
    }

    /// One dispatcher loop: claims and sends batches until `shutdown`; sleeps for the poll
    /// interval (or until woken by new deliveries) when nothing is due. A batch in hand is
    /// finished: requests in flight complete, unsent deliveries are handed back, all is recorded.
    pub async fn work(self: &Arc<Self>, worker: usize, shutdown: CancellationToken) {
        let mut backoff = Backoff::new();
        while !shutdown.is_cancelled() {
            let wake = self.wake.notified();
            match self.dispatch_once(&shutdown).await {
                Ok(claimed) => {
                    backoff.reset();
                    if claimed as i64 >= self.settings.batch_size {
                        continue;
                    }
                }
                Err(error) => {
                    tracing::warn!(worker, %error, "dispatcher cannot claim deliveries");
                    sleep_or_cancel(backoff.next_delay(), &shutdown).await;
                    continue;
                }
            }
            tokio::select! {
                _ = wake => {}
                _ = tokio::time::sleep(self.settings.poll) => {}
                _ = shutdown.cancelled() => {}
            }
        }
    }

    /// Claims one batch, sends it, records it. Returns how many deliveries were claimed.
    pub async fn dispatch_once(
        self: &Arc<Self>,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<usize> {
        let client = self.pool.get().await?;
        let leased = store::claim(&**client, self.settings.batch_size, self.settings.lease).await?;
        drop(client);
        Ok(match leased {
            Some(leased) => {
                self.deliver(leased.deliveries, leased.until, shutdown)
                    .await
            }
            None => 0,
        })
    }

    /// Sends deliveries leased until `lease` (claimed here, or leased when ingest recorded them)
    /// and records the results. Each endpoint's share goes on a task of its own (see `shares`), so
    /// this returns once every share is under way; it waits only while this instance already
    /// holds its limit of deliveries in memory. An endpoint already holding its own limit gets its
    /// new deliveries handed back at once, due again shortly. Returns how many there were.
    pub async fn deliver(
        self: &Arc<Self>,
        claimed: Vec<Claimed>,
        lease: DateTime<Utc>,
        shutdown: &CancellationToken,
    ) -> usize {
        let count = claimed.len();
        let mut groups: Vec<(String, Vec<Claimed>)> = Vec::new();
        for d in claimed {
            match groups.iter_mut().find(|(id, _)| *id == d.endpoint_id) {
                Some((_, group)) => group.push(d),
                None => groups.push((d.endpoint_id.clone(), vec![d])),
            }
        }
        let names: Vec<&str> = groups.iter().map(|(id, _)| id.as_str()).collect();
        let breakers = self.breakers.load(&names).await;
        for (endpoint_id, group) in groups {
            let (share, overflow) = self.in_memory_by_endpoint.take(&endpoint_id, group);
            if !overflow.is_empty() {
                let due = Utc::now() + chrono_duration(ENDPOINT_FULL_RECHECK);
                let released: Vec<Outcome> =
                    overflow.iter().map(|d| Outcome::released(d, due)).collect();
                self.record_until_done(&released, lease, shutdown).await;
            }
            if share.is_empty() {
                continue;
            }
            // The semaphore is never closed; a share is at most half its permits.
            let Ok(room) = self
                .in_memory
                .clone()
                .acquire_many_owned(share.len() as u32)
                .await
            else {
                continue;
            };
            let (stored, read_at) = (breakers.get(&endpoint_id), breakers.read_at());
            let span = tracing::info_span!("dispatch_share", endpoint_id = %endpoint_id, deliveries = share.len());
            let (this, shutdown, crashed) = (self.clone(), shutdown.clone(), self.crashed.clone());
            self.shares.spawn(
                async move {
                    let held = share.len();
                    let work = async {
                        let outcomes = this
                            .send_share(&endpoint_id, share, (&stored, read_at), lease, &shutdown)
                            .await;
                        this.record_until_done(&outcomes, lease, &shutdown).await;
                    };
                    tokio::select! {
                        biased;
                        _ = crashed.cancelled() => {}
                        _ = work => {}
                    }
                    this.in_memory_by_endpoint.give_back(&endpoint_id, held);
                    drop(room);
                }
                .instrument(span),
            );
        }
        count
    }

    /// Sends one endpoint's share of a batch as its breaker allows: phase 1 (admit), then each
    /// delivery through phases 2 to 5.
    async fn send_share(
        &self,
        endpoint_id: &str,
        share: Vec<Claimed>,
        (stored, read_at): (&Breaker, Instant),
        lease: DateTime<Utc>,
        shutdown: &CancellationToken,
    ) -> Vec<Outcome> {
        match self.breakers.admit(endpoint_id, stored, read_at).await {
            ShareAdmission::Hold(until) => share
                .iter()
                .map(|d| Outcome::held_by_breaker(d, until))
                .collect(),
            ShareAdmission::Probe { recheck } => {
                let mut share = share.into_iter();
                let Some(probe) = share.next() else {
                    return Vec::new();
                };
                let mut outcomes: Vec<Outcome> = share
                    .map(|d| Outcome::held_by_breaker(&d, recheck))
                    .collect();
                let (outcome, verdict) = self.attempt(&probe).await;
                outcomes.push(outcome);
                self.breakers.report(endpoint_id, stored, verdict).await;
                outcomes
            }
            // Send with bounded concurrency. Each failure (and each success that resets a
            // non-zero count) is written at once, while the endpoint slot is held, and this
            // instance's knowledge of the breaker is updated from the result: with
            // ENDPOINT_CONCURRENCY=1 the request after the opening failure is already held, with
            // more at most the ones in flight finish.
            ShareAdmission::Send => {
                let slots = self.endpoint_slots(endpoint_id);
                let give_back_at = lease - chrono_duration(self.settings.timeout);
                futures::stream::iter(share)
                    .map(|d| {
                        let slots = slots.clone();
                        async move {
                            let Ok(_slot) = slots.acquire().await else {
                                return Outcome::released(&d, Utc::now());
                            };
                            if let Some(unsent) = self.prepare(&d, give_back_at, shutdown) {
                                return unsent;
                            }
                            let Ok(_permit) = self.global.acquire().await else {
                                return Outcome::released(&d, Utc::now());
                            };
                            let (outcome, verdict) = self.attempt(&d).await;
                            if self.breakers.must_hear(endpoint_id, verdict) {
                                self.breakers.report(endpoint_id, stored, verdict).await;
                            }
                            outcome
                        }
                    })
                    .buffer_unordered(self.settings.endpoint_concurrency)
                    .collect()
                    .await
            }
        }
    }

    /// Phase 2: whether a delivery may be sent now; if not, how it goes back unsent.
    fn prepare(
        &self,
        d: &Claimed,
        give_back_at: DateTime<Utc>,
        shutdown: &CancellationToken,
    ) -> Option<Outcome> {
        let now = Utc::now();
        // Shutting down, or the lease is about to end: hand the delivery back.
        if shutdown.is_cancelled() || now >= give_back_at {
            return Some(Outcome::released(d, now));
        }
        if let Some(probe_at) = self.breakers.probe_at(&d.endpoint_id, now) {
            return Some(Outcome::held_by_breaker(d, probe_at));
        }
        self.rates
            .check(&d.endpoint_id, d.rate_limit)
            .map(|wait| Outcome::released(d, now + chrono_duration(wait)))
    }

    /// Phases 3 to 5 for one delivery: make the call, decide, handle the decision.
    async fn attempt(&self, d: &Claimed) -> (Outcome, Verdict) {
        let span = tracing::info_span!(
            "delivery",
            delivery_id = d.id,
            event_id = %d.event_id,
            endpoint_id = %d.endpoint_id,
            correlation_id = d.correlation_id.as_deref().unwrap_or(""),
            attempt = d.attempts + 1,
            outcome = tracing::field::Empty,
        );
        crate::trace_context::continue_delivery(&span, d.traceparent.as_deref());
        async {
            let Made { reply, attempt } = attempt::make(&self.http, d).await;
            let now = Utc::now();
            let jitter = self.settings.jitter;
            let decision = decision::decide(
                attempt.number.max(0) as u32,
                &reply,
                &self.settings.schedule,
                |delay| with_jitter(delay, jitter),
                now,
            );
            self.handle(d, &attempt, &decision);
            let step = match decision.next {
                Next::Succeeded => Step::Succeeded,
                Next::RetryAt(at) => Step::RetryAt(at),
                Next::Dead => Step::Dead,
            };
            let outcome = Outcome {
                id: d.id,
                attempts: attempt.number,
                step,
                attempt: Some(attempt),
                at: now,
            };
            (outcome, decision.verdict)
        }
        .instrument(span)
        .await
    }

    /// Phase 5: what the decision tells the metrics and the logs.
    fn handle(&self, d: &Claimed, attempt: &Attempt, decision: &Decision) {
        tracing::Span::current().record("outcome", decision.outcome);
        self.metrics
            .delivery_duration
            .with_label_values(&[&d.endpoint_id])
            .observe(attempt.latency_ms as f64 / 1000.0);
        self.metrics
            .deliveries
            .with_label_values(&[&d.endpoint_id, decision.outcome])
            .inc();
        let (number, status) = (attempt.number, attempt.status);
        let error = attempt.error.as_deref().unwrap_or("");
        match (decision.outcome, decision.next) {
            (outcome::SUCCESS, _) => tracing::debug!(attempt = number, status, "delivered"),
            (_, Next::RetryAt(next)) => {
                tracing::info!(attempt = number, status, error, next_attempt_at = %next, "delivery failed; will retry")
            }
            (label, _) => tracing::warn!(
                attempt = number,
                status,
                error,
                aborted = label == outcome::ABORTED,
                "delivery is dead"
            ),
        }
    }

    fn endpoint_slots(&self, endpoint_id: &str) -> Arc<Semaphore> {
        lock(&self.endpoint_slots)
            .entry(endpoint_id.to_owned())
            .or_insert_with(|| Arc::new(Semaphore::new(self.settings.endpoint_concurrency)))
            .clone()
    }

    /// Phase 6, until it is done or the lease is over.
    async fn record_until_done(
        &self,
        outcomes: &[Outcome],
        lease: DateTime<Utc>,
        shutdown: &CancellationToken,
    ) {
        let mut backoff = Backoff::new();
        loop {
            match self.record(outcomes, lease).await {
                Ok(()) => return,
                Err(error) => {
                    tracing::warn!(%error, deliveries = outcomes.len(), "cannot record delivery results yet")
                }
            }
            // Give up once the lease is over: the deliveries are claimed and sent again, which
            // receivers deduplicate by webhook-id.
            if shutdown.is_cancelled() || Utc::now() >= lease {
                tracing::warn!(
                    deliveries = outcomes.len(),
                    "delivery results not recorded; the lease will hand them out again"
                );
                return;
            }
            tokio::time::sleep(backoff.next_delay()).await;
        }
    }

    async fn record(&self, outcomes: &[Outcome], lease: DateTime<Utc>) -> anyhow::Result<()> {
        let mut client = self.pool.get().await?;
        store::record_results(&mut client, outcomes, lease).await?;
        Ok(())
    }

    /// Records `leased` as answered 200 at once, without sending anything: the statements a
    /// successful batch runs, for consumer-bench's PostgreSQL-only ceiling.
    #[doc(hidden)]
    pub async fn record_as_delivered(
        &self,
        leased: &[Claimed],
        lease: DateTime<Utc>,
    ) -> anyhow::Result<()> {
        let at = Utc::now();
        let outcomes: Vec<Outcome> = leased
            .iter()
            .map(|d| Outcome {
                id: d.id,
                attempts: d.attempts + 1,
                step: Step::Succeeded,
                attempt: Some(Attempt {
                    number: d.attempts + 1,
                    status: Some(200),
                    latency_ms: 0,
                    error: None,
                    response_body: Some("ok".into()),
                    at,
                }),
                at,
            })
            .collect();
        self.record(&outcomes, lease).await
    }
}
