//! Dispatching: claims due deliveries (safely across instances), sends them as signed webhooks,
//! and records every attempt and the deliveries' new states in one transaction per batch.
//!
//! A claim sets `leased_until` (and moves `next_attempt_at` to the same instant), so a crashed
//! instance's batch becomes due again by itself when the lease ends. Results are only written
//! while the lease is still the one this batch took, so a late writer never undoes another
//! instance's work.
//!
//! The circuit breaker of each endpoint lives in `circuit_breakers` (scope `endpoint`). A batch
//! reads the breakers of its endpoints once; the row is written only when something changes: a
//! failure, a probe, or a success that resets a non-zero failure count. While a breaker is open
//! its deliveries are *held*: `next_attempt_at` moves to when a probe may go through, and their
//! attempt count is untouched.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use outbox_core::breaker::{self, Admission, Breaker, BreakerPolicy, BreakerState};
use outbox_core::db::PgPool;
use outbox_core::schedule::{with_jitter, RetrySchedule};
use outbox_core::signature::{sign_headers, Secret};
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::metrics::outcome;
use crate::{Config, Metrics};

/// The breaker scope of webhook endpoints in `circuit_breakers`.
pub const BREAKER_SCOPE: &str = "endpoint";
/// Longest stored excerpt of a receiver's response body.
const RESPONSE_EXCERPT_BYTES: usize = 1024;

/// Claims up to $1 due deliveries of enabled endpoints for $2 seconds, with what sending needs.
const CLAIM: &str = "
    with due as (
        select d.id from deliveries d join endpoints e on e.id = d.endpoint_id
         where d.state = 'pending' and d.next_attempt_at <= now() and e.enabled
         order by d.next_attempt_at, d.id
         limit $1
         for update of d skip locked
    )
    update deliveries d
       set leased_until = now() + make_interval(secs => $2),
           next_attempt_at = now() + make_interval(secs => $2)
      from due, inbox i, endpoints e
     where d.id = due.id and i.event_id = d.event_id and e.id = d.endpoint_id
    returning d.id, d.event_id, d.endpoint_id, d.attempts, i.payload::text, i.correlation_id,
              e.url, e.secret,
              case when e.previous_secret_expires_at > now() then e.previous_secret end,
              e.rate_limit_per_second, d.leased_until";

/// Writes a batch's results, but only for rows still under this batch's lease ($8): a lease is only
/// ever held by pending rows. (No `state = 'pending'` here: with it the planner may pick the
/// `deliveries_due` index and read every pending delivery to find this batch's few hundred.)
const RECORD_RESULTS: &str = "
    update deliveries d
       set state = u.state, attempts = u.attempts, next_attempt_at = u.next_attempt_at,
           leased_until = null,
           last_status = case when u.sent then u.status else d.last_status end,
           last_error = case when u.sent then u.error else d.last_error end,
           delivered_at = case when u.state = 'succeeded' then u.at else d.delivered_at end,
           updated_at = now()
      from unnest($1::bigint[], $2::text[], $3::int[], $4::timestamptz[], $5::int[], $6::text[],
                  $7::bool[], $9::timestamptz[])
           as u(id, state, attempts, next_attempt_at, status, error, sent, at)
     where d.id = u.id and d.leased_until = $8";

const RECORD_ATTEMPTS: &str = "
    insert into delivery_attempts
           (delivery_id, attempt, status_code, latency_ms, error, response_body, attempted_at)
    select * from unnest($1::bigint[], $2::int[], $3::int[], $4::int[], $5::text[], $6::text[],
                         $7::timestamptz[])";

/// One leased delivery with everything needed to send it.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub id: i64,
    pub event_id: String,
    pub endpoint_id: String,
    pub attempts: i32,
    /// The envelope exactly as read from Kafka: the bytes that are signed and sent.
    pub body: Bytes,
    pub correlation_id: Option<String>,
    pub url: String,
    pub secret: String,
    /// The previous secret while its rotation grace period lasts.
    pub previous_secret: Option<String>,
    pub rate_limit: Option<i32>,
}

/// A delivery's new state after this batch.
#[derive(Debug)]
struct Done {
    id: i64,
    state: &'static str,
    attempts: i32,
    next_attempt_at: DateTime<Utc>,
    status: Option<i32>,
    error: Option<String>,
    /// False for a held delivery: nothing was sent, last status and error stay.
    sent: bool,
    at: DateTime<Utc>,
    attempt: Option<Attempt>,
}

#[derive(Debug)]
struct Attempt {
    number: i32,
    status: Option<i32>,
    latency_ms: i32,
    error: Option<String>,
    response_body: Option<String>,
    at: DateTime<Utc>,
}

impl Done {
    fn held(d: &Claimed, until: DateTime<Utc>) -> Done {
        Done {
            id: d.id,
            state: "pending",
            attempts: d.attempts,
            next_attempt_at: until,
            status: None,
            error: None,
            sent: false,
            at: Utc::now(),
            attempt: None,
        }
    }
}

/// What the breaker learns from one attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Success,
    Failure,
    /// The request could not even be built (e.g. a stored event id that is no valid header):
    /// the delivery's fault, not the endpoint's. The breaker learns nothing, and a probe slot this
    /// attempt held is given back so that the next delivery can probe.
    Unsendable,
}

/// Fixed settings of the dispatchers.
#[derive(Debug, Clone)]
struct Settings {
    schedule: RetrySchedule,
    jitter: f64,
    policy: BreakerPolicy,
    batch_size: i64,
    lease: Duration,
    timeout: Duration,
    poll: Duration,
    endpoint_concurrency: usize,
    /// How long deliveries wait while another delivery probes a half-open breaker.
    probe_recheck: Duration,
}

/// Sends deliveries. Shared by the dispatcher loops of one instance, which share its HTTP
/// connection pool and concurrency limits.
pub struct Dispatcher {
    pool: PgPool,
    http: crate::webhook_client::WebhookClient,
    settings: Settings,
    metrics: Metrics,
    wake: Arc<Notify>,
    global: Arc<Semaphore>,
    endpoint_slots: Mutex<HashMap<String, Arc<Semaphore>>>,
    rates: Mutex<HashMap<String, TokenBucket>>,
    /// What this instance last learnt of each endpoint's breaker (from a batch's read or its own
    /// writes): checked before every request.
    views: Mutex<HashMap<String, BreakerView>>,
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
    /// Deliveries in memory per endpoint: one endpoint may hold at most `endpoint_share_limit`,
    /// so a hung endpoint cannot take the room every other endpoint needs.
    in_memory_by_endpoint: Mutex<HashMap<String, usize>>,
    endpoint_share_limit: usize,
}

/// An instance's knowledge of one breaker.
#[derive(Debug, Clone, Default)]
struct BreakerView {
    failures: u32,
    /// While the breaker is open: when a probe may go through.
    reopen_at: Option<DateTime<Utc>>,
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
        let endpoint_concurrency = config.endpoint_concurrency.max(1);
        let http = crate::webhook_client::WebhookClient::new(config)?;
        let open_for = config.breaker.breaker_open_for;
        // As much as every dispatcher and every fast lane holding a full batch at once, twice.
        let in_memory = 2
            * config.dispatch_workers.max(1)
            * (config.dispatch_batch_size.max(1) as usize).max(config.consumer_batch_size.max(1));
        Ok(Dispatcher {
            pool,
            http,
            settings: Settings {
                schedule: config.retry_schedule.clone(),
                jitter: config.retry_jitter.clamp(0.0, 1.0),
                policy: config.breaker_policy(),
                batch_size: config.dispatch_batch_size.max(1),
                lease: config.delivery_lease,
                timeout: config.delivery_timeout,
                poll: config.dispatch_poll_interval,
                endpoint_concurrency,
                probe_recheck: (open_for / 10)
                    .clamp(Duration::from_millis(20), Duration::from_secs(1)),
            },
            metrics,
            wake,
            global: Arc::new(Semaphore::new(config.delivery_concurrency.max(1))),
            endpoint_slots: Mutex::new(HashMap::new()),
            rates: Mutex::new(HashMap::new()),
            views: Mutex::new(HashMap::new()),
            shares: TaskTracker::new(),
            crashed: CancellationToken::new(),
            in_memory: Arc::new(Semaphore::new(in_memory)),
            in_memory_by_endpoint: Mutex::new(HashMap::new()),
            endpoint_share_limit: (in_memory / 2).max(1),
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
        let mut failures = 0u32;
        while !shutdown.is_cancelled() {
            let wake = self.wake.notified();
            match self.dispatch_once(&shutdown).await {
                Ok(claimed) => {
                    failures = 0;
                    if claimed as i64 >= self.settings.batch_size {
                        continue;
                    }
                }
                Err(error) => {
                    failures += 1;
                    tracing::warn!(worker, %error, "dispatcher cannot claim deliveries");
                    let backoff = Duration::from_millis(100 * 2u64.pow(failures.min(6)));
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.cancelled() => {}
                    }
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
        let rows = client
            .query(
                CLAIM,
                &[
                    &self.settings.batch_size,
                    &self.settings.lease.as_secs_f64(),
                ],
            )
            .await?;
        drop(client);
        let Some(first) = rows.first() else {
            return Ok(0);
        };
        let lease: DateTime<Utc> = first.get(10);
        let claimed = rows
            .iter()
            .map(|row| {
                let body: String = row.get(4);
                Claimed {
                    id: row.get(0),
                    event_id: row.get(1),
                    endpoint_id: row.get(2),
                    attempts: row.get(3),
                    body: Bytes::from(body),
                    correlation_id: row.get(5),
                    url: row.get(6),
                    secret: row.get(7),
                    previous_secret: row.get(8),
                    rate_limit: row.get(9),
                }
            })
            .collect();
        Ok(self.deliver(claimed, lease, shutdown).await)
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
        let breakers = self.load_breakers(&groups).await;
        for (endpoint_id, group) in groups {
            let (share, overflow) = self.take_share(&endpoint_id, group);
            if !overflow.is_empty() {
                let until = Utc::now() + chrono_duration(ENDPOINT_FULL_RECHECK);
                let held: Vec<Done> = overflow.iter().map(|d| Done::held(d, until)).collect();
                self.record_until_done(&held, lease, shutdown).await;
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
            let stored = breakers.get(&endpoint_id).cloned().unwrap_or_default();
            let span = tracing::info_span!("dispatch_share", endpoint_id = %endpoint_id, deliveries = share.len());
            let (this, shutdown, crashed) = (self.clone(), shutdown.clone(), self.crashed.clone());
            self.shares.spawn(
                async move {
                    let held = share.len();
                    let work = async {
                        let done = this
                            .send_group(endpoint_id.clone(), share, stored, lease, &shutdown)
                            .await;
                        this.record_until_done(&done, lease, &shutdown).await;
                    };
                    tokio::select! {
                        biased;
                        _ = crashed.cancelled() => {}
                        _ = work => {}
                    }
                    this.give_back_share(&endpoint_id, held);
                    drop(room);
                }
                .instrument(span),
            );
        }
        count
    }

    /// Takes as much of `group` as its endpoint's limit of deliveries in memory allows; returns
    /// that and the rest.
    fn take_share(
        &self,
        endpoint_id: &str,
        mut group: Vec<Claimed>,
    ) -> (Vec<Claimed>, Vec<Claimed>) {
        let mut held = lock(&self.in_memory_by_endpoint);
        let taken = held.entry(endpoint_id.to_owned()).or_default();
        let room = self.endpoint_share_limit.saturating_sub(*taken);
        let overflow = group.split_off(room.min(group.len()));
        *taken += group.len();
        (group, overflow)
    }

    fn give_back_share(&self, endpoint_id: &str, n: usize) {
        let mut held = lock(&self.in_memory_by_endpoint);
        if let Some(taken) = held.get_mut(endpoint_id) {
            *taken = taken.saturating_sub(n);
            if *taken == 0 {
                held.remove(endpoint_id);
            }
        }
    }

    async fn load_breakers(&self, groups: &[(String, Vec<Claimed>)]) -> HashMap<String, Breaker> {
        let names: Vec<&str> = groups.iter().map(|(id, _)| id.as_str()).collect();
        let loaded = match self.pool.get().await {
            Ok(client) => breaker::store::get_many(&client, BREAKER_SCOPE, &names)
                .await
                .map_err(|e| e.to_string()),
            Err(error) => Err(error.to_string()),
        };
        loaded.unwrap_or_else(|error| {
            tracing::warn!(%error, "cannot read circuit breakers; treating them as closed");
            HashMap::new()
        })
    }

    /// Sends one endpoint's share of a batch as the breaker allows.
    async fn send_group(
        &self,
        endpoint_id: String,
        group: Vec<Claimed>,
        stored: Breaker,
        lease: DateTime<Utc>,
        shutdown: &CancellationToken,
    ) -> Vec<Done> {
        let policy = self.settings.policy;
        let now = Utc::now();
        let recheck = now + chrono_duration(self.settings.probe_recheck);
        // A CLOSED read older than this instance's own opening write must not undo it (an admin
        // reset is then seen once the cool-down passes).
        let opened_here = self.view(&endpoint_id).reopen_at.is_some_and(|t| t > now);
        if !(opened_here && stored.state == BreakerState::Closed) {
            self.learn(&endpoint_id, &stored);
        }
        if stored.state != BreakerState::Closed {
            let reopen = stored.opened_at.unwrap_or(now) + chrono_duration(policy.open_for);
            if stored.state == BreakerState::Open && now < reopen {
                return group.iter().map(|d| Done::held(d, reopen)).collect();
            }
            // Cool-down over (or already half-open): ask for the probe slot under the row lock.
            let admission = match self.pool.get().await {
                Ok(mut client) => {
                    breaker::store::update(&mut client, BREAKER_SCOPE, &endpoint_id, |b| {
                        b.admit(&policy, Utc::now())
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
                Ok(Admission::Probe) => {
                    let mut group = group.into_iter();
                    let Some(probe) = group.next() else {
                        return Vec::new();
                    };
                    let mut done: Vec<Done> = group.map(|d| Done::held(&d, recheck)).collect();
                    let (result, verdict) = self.send(&probe).await;
                    done.push(result);
                    self.report(&endpoint_id, &stored, verdict).await;
                    return done;
                }
                Ok(Admission::Rejected { retry_at }) => {
                    let until = retry_at.min(recheck);
                    return group.iter().map(|d| Done::held(d, until)).collect();
                }
                Ok(Admission::Allowed) => {}
                Err(error) => {
                    tracing::warn!(%error, "cannot update the circuit breaker");
                    return group.iter().map(|d| Done::held(d, recheck)).collect();
                }
            }
        }

        // CLOSED: send with bounded concurrency. Each failure (and each success that resets a
        // non-zero count) is written at once, while the endpoint slot is held, and the instance's
        // view of the breaker is updated from the result: with ENDPOINT_CONCURRENCY=1 the request
        // after the opening failure is already held, with more at most the ones in flight finish.
        let slots = self.endpoint_slots(&endpoint_id);
        let give_back_at = lease - chrono_duration(self.settings.timeout);
        let endpoint_id = endpoint_id.as_str();
        let stored = &stored;
        futures::stream::iter(group)
            .map(|d| {
                let slots = slots.clone();
                async move {
                    let Ok(_slot) = slots.acquire().await else {
                        return Done::held(&d, Utc::now());
                    };
                    let now = Utc::now();
                    // Shutting down, or the lease is about to end: hand the delivery back.
                    if shutdown.is_cancelled() || now >= give_back_at {
                        return Done::held(&d, now);
                    }
                    if let Some(reopen) = self.view(endpoint_id).reopen_at.filter(|t| *t > now) {
                        return Done::held(&d, reopen);
                    }
                    if let Some(wait) = self.rate_limited(&d) {
                        return Done::held(&d, now + chrono_duration(wait));
                    }
                    let Ok(_permit) = self.global.acquire().await else {
                        return Done::held(&d, now);
                    };
                    let (result, verdict) = self.send(&d).await;
                    let known_failures = self.view(endpoint_id).failures;
                    let tell_breaker = match verdict {
                        Verdict::Failure => true,
                        Verdict::Success => known_failures > 0,
                        Verdict::Unsendable => false,
                    };
                    if tell_breaker {
                        self.report(endpoint_id, stored, verdict).await;
                    }
                    result
                }
            })
            .buffer_unordered(self.settings.endpoint_concurrency)
            .collect()
            .await
    }

    /// This instance's latest knowledge of an endpoint's breaker.
    fn view(&self, endpoint_id: &str) -> BreakerView {
        lock(&self.views)
            .get(endpoint_id)
            .cloned()
            .unwrap_or_default()
    }

    fn learn(&self, endpoint_id: &str, breaker: &Breaker) {
        let policy = &self.settings.policy;
        lock(&self.views).insert(
            endpoint_id.to_owned(),
            BreakerView {
                failures: breaker.failure_count,
                reopen_at: open_until(breaker, policy),
            },
        );
    }

    /// Applies one outcome to the shared breaker under its row lock.
    async fn report(&self, endpoint_id: &str, before: &Breaker, verdict: Verdict) {
        let policy = self.settings.policy;
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
                self.learn(endpoint_id, &after);
                self.metrics.set_breaker(endpoint_id, after.state);
            }
            Err(error) => {
                tracing::warn!(endpoint_id, %error, "cannot record the breaker's outcome")
            }
        }
    }

    fn endpoint_slots(&self, endpoint_id: &str) -> Arc<Semaphore> {
        lock(&self.endpoint_slots)
            .entry(endpoint_id.to_owned())
            .or_insert_with(|| Arc::new(Semaphore::new(self.settings.endpoint_concurrency)))
            .clone()
    }

    /// `Some(wait)` when the endpoint's rate limit allows no request now.
    fn rate_limited(&self, d: &Claimed) -> Option<Duration> {
        let limit = d.rate_limit.filter(|&n| n > 0)?;
        let mut rates = lock(&self.rates);
        let bucket = rates
            .entry(d.endpoint_id.clone())
            .or_insert_with(|| TokenBucket::new(limit as f64));
        bucket.take(limit as f64, Instant::now())
    }

    /// Sends one delivery and decides its next state.
    async fn send(&self, d: &Claimed) -> (Done, Verdict) {
        let span = tracing::info_span!(
            "delivery",
            delivery_id = d.id,
            event_id = %d.event_id,
            endpoint_id = %d.endpoint_id,
            correlation_id = d.correlation_id.as_deref().unwrap_or(""),
            attempt = d.attempts + 1,
            outcome = tracing::field::Empty,
        );
        crate::trace_context::continue_delivery(&span, &d.event_id);
        self.send_inner(d).instrument(span).await
    }

    async fn send_inner(&self, d: &Claimed) -> (Done, Verdict) {
        let number = d.attempts + 1;
        let at = Utc::now();
        let started = Instant::now();
        let response = match self.request(d, at.timestamp()).await {
            Ok(request) => request.send().await.map_err(|e| {
                if e.is_builder() {
                    Failed::Unsendable(describe(e))
                } else {
                    Failed::Sending(describe(e))
                }
            }),
            Err(error) => Err(error),
        };
        let unsendable = matches!(response, Err(Failed::Unsendable(_)));
        let (status, abort, retry_after, excerpt, error) = match response {
            Ok(response) => {
                let status = response.status();
                let abort = response
                    .headers()
                    .get("webhook-delivery")
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|v| v.trim().eq_ignore_ascii_case("abort-message"));
                let retry_after = matches!(status.as_u16(), 429 | 503)
                    .then(|| response.headers().get(reqwest::header::RETRY_AFTER))
                    .flatten()
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| parse_retry_after(v, Utc::now()));
                let (excerpt, body_error) = read_excerpt(response).await;
                let error = match (status.is_success(), body_error) {
                    (true, _) => None,
                    (false, Some(e)) => Some(format!("HTTP {}: {e}", status.as_u16())),
                    (false, None) => Some(format!("HTTP {}", status.as_u16())),
                };
                (
                    Some(status.as_u16() as i32),
                    abort,
                    retry_after,
                    excerpt,
                    error,
                )
            }
            Err(Failed::Sending(error)) => (None, false, None, None, Some(error)),
            Err(Failed::Unsendable(error)) => (
                None,
                false,
                None,
                None,
                Some(format!("the request cannot be built: {error}")),
            ),
        };
        let elapsed = started.elapsed();
        self.metrics
            .delivery_duration
            .with_label_values(&[&d.endpoint_id])
            .observe(elapsed.as_secs_f64());
        let success = status.is_some_and(|s| (200..300).contains(&s));
        let attempt = Attempt {
            number,
            status,
            latency_ms: elapsed.as_millis().min(i32::MAX as u128) as i32,
            error: error.clone(),
            response_body: excerpt,
            at,
        };
        let now = Utc::now();
        let (state, next, label, verdict) = if success {
            ("succeeded", now, outcome::SUCCESS, Verdict::Success)
        } else if abort {
            // The receiver is up and asks us to stop: not the endpoint's failure.
            ("dead", now, outcome::ABORTED, Verdict::Success)
        } else if unsendable {
            // Nothing reached the endpoint, and another attempt would build the same request.
            ("dead", now, outcome::UNSENDABLE, Verdict::Unsendable)
        } else {
            match self.settings.schedule.delay_after(number.max(0) as u32) {
                Some(delay) => (
                    "pending",
                    // A receiver that says when to come back (429/503 with Retry-After) is not
                    // retried sooner; the attempt still counts.
                    now + chrono_duration(
                        with_jitter(delay, self.settings.jitter)
                            .max(retry_after.unwrap_or_default()),
                    ),
                    outcome::FAILURE,
                    Verdict::Failure,
                ),
                None => ("dead", now, outcome::DEAD, Verdict::Failure),
            }
        };
        tracing::Span::current().record("outcome", label);
        self.metrics
            .deliveries
            .with_label_values(&[&d.endpoint_id, label])
            .inc();
        match label {
            outcome::SUCCESS => tracing::debug!(attempt = number, status, "delivered"),
            outcome::FAILURE => {
                tracing::info!(attempt = number, status, error = error.as_deref().unwrap_or(""), next_attempt_at = %next, "delivery failed; will retry")
            }
            _ => {
                tracing::warn!(
                    attempt = number,
                    status,
                    error = error.as_deref().unwrap_or(""),
                    aborted = abort,
                    "delivery is dead"
                )
            }
        }
        let done = Done {
            id: d.id,
            state,
            attempts: number,
            next_attempt_at: next,
            status,
            error,
            sent: true,
            at: now,
            attempt: Some(attempt),
        };
        (done, verdict)
    }

    /// The signed request: the body bytes exactly as signed, the current secret and, during a
    /// rotation's grace period, the previous one. Every value that becomes a header is checked
    /// here, so a delivery recorded before those checks existed fails as unsendable rather than
    /// as a request error charged to the endpoint. A correlation id that is no valid header is
    /// replaced by the event id, as a missing one is. A target the address guard refuses is the
    /// endpoint's failure (its URL), retried on schedule.
    async fn request(
        &self,
        d: &Claimed,
        timestamp: i64,
    ) -> Result<reqwest::RequestBuilder, Failed> {
        outbox_core::envelope::check_event_id(&d.event_id)
            .map_err(|e| Failed::Unsendable(format!("{e}: {:?}", d.event_id)))?;
        let correlation_id = d
            .correlation_id
            .as_deref()
            .filter(|c| outbox_core::envelope::check_correlation_id(c).is_ok())
            .unwrap_or(&d.event_id);
        let current = Secret::parse(&d.secret)
            .map_err(|e| Failed::Unsendable(format!("the endpoint's secret is unusable: {e}")))?;
        let previous = d
            .previous_secret
            .as_deref()
            .and_then(|s| Secret::parse(s).ok());
        let secrets: Vec<&Secret> = std::iter::once(&current).chain(previous.as_ref()).collect();
        let mut request = self
            .http
            .post(&d.url)
            .await
            .map_err(|e| Failed::Sending(e.to_string()))?
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("x-correlation-id", correlation_id);
        for (name, value) in sign_headers(&secrets, &d.event_id, timestamp, &d.body) {
            request = request.header(name, value);
        }
        if let Some((name, value)) = crate::trace_context::webhook_header() {
            request = request.header(name, value);
        }
        Ok(request.body(d.body.clone()))
    }

    async fn record_until_done(
        &self,
        done: &[Done],
        lease: DateTime<Utc>,
        shutdown: &CancellationToken,
    ) {
        let mut delay = Duration::from_millis(100);
        loop {
            match self.record(done, lease).await {
                Ok(()) => return,
                Err(error) => {
                    tracing::warn!(%error, deliveries = done.len(), "cannot record delivery results yet")
                }
            }
            // Give up once the lease is over: the deliveries are claimed and sent again, which
            // receivers deduplicate by webhook-id.
            if shutdown.is_cancelled() || Utc::now() >= lease {
                tracing::warn!(
                    deliveries = done.len(),
                    "delivery results not recorded; the lease will hand them out again"
                );
                return;
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(2));
        }
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
        let done: Vec<Done> = leased
            .iter()
            .map(|d| Done {
                id: d.id,
                state: "succeeded",
                attempts: d.attempts + 1,
                next_attempt_at: at,
                status: Some(200),
                error: None,
                sent: true,
                at,
                attempt: Some(Attempt {
                    number: d.attempts + 1,
                    status: Some(200),
                    latency_ms: 0,
                    error: None,
                    response_body: Some("ok".into()),
                    at,
                }),
            })
            .collect();
        self.record(&done, lease).await
    }

    async fn record(&self, done: &[Done], lease: DateTime<Utc>) -> anyhow::Result<()> {
        let mut ids = Vec::with_capacity(done.len());
        let mut states = Vec::with_capacity(done.len());
        let mut attempts = Vec::with_capacity(done.len());
        let mut nexts = Vec::with_capacity(done.len());
        let mut statuses = Vec::with_capacity(done.len());
        let mut errors: Vec<Option<String>> = Vec::with_capacity(done.len());
        let mut sent = Vec::with_capacity(done.len());
        let mut ats = Vec::with_capacity(done.len());
        let mut a_ids = Vec::new();
        let mut a_numbers = Vec::new();
        let mut a_statuses = Vec::new();
        let mut a_latencies = Vec::new();
        let mut a_errors: Vec<Option<String>> = Vec::new();
        let mut a_bodies: Vec<Option<String>> = Vec::new();
        let mut a_ats = Vec::new();
        for d in done {
            ids.push(d.id);
            states.push(d.state);
            attempts.push(d.attempts);
            nexts.push(d.next_attempt_at);
            statuses.push(d.status);
            errors.push(d.error.as_deref().map(clean));
            sent.push(d.sent);
            ats.push(d.at);
            if let Some(a) = &d.attempt {
                a_ids.push(d.id);
                a_numbers.push(a.number);
                a_statuses.push(a.status);
                a_latencies.push(a.latency_ms);
                a_errors.push(a.error.as_deref().map(clean));
                a_bodies.push(a.response_body.as_deref().map(clean));
                a_ats.push(a.at);
            }
        }
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 9] = [
            &ids, &states, &attempts, &nexts, &statuses, &errors, &sent, &lease, &ats,
        ];
        let statement = tx.prepare_cached(RECORD_RESULTS).await?;
        let update = tx.execute(&statement, &params);
        let insert = async {
            if a_ids.is_empty() {
                return Ok(0);
            }
            tx.execute(
                RECORD_ATTEMPTS,
                &[
                    &a_ids,
                    &a_numbers,
                    &a_statuses,
                    &a_latencies,
                    &a_errors,
                    &a_bodies,
                    &a_ats,
                ],
            )
            .await
        };
        // Both statements go out pipelined on the one connection.
        let (updated, inserted) = tokio::join!(update, insert);
        updated?;
        inserted?;
        tx.commit().await?;
        Ok(())
    }
}

/// When deliveries handed back because their endpoint already holds its limit in memory are due
/// again.
const ENDPOINT_FULL_RECHECK: Duration = Duration::from_secs(1);

/// Why an attempt got no response.
enum Failed {
    /// The request was sent (or tried to be) and failed: connect, timeout, reading.
    Sending(String),
    /// The request could not be built: see [`Verdict::Unsendable`].
    Unsendable(String),
}

/// The longest `Retry-After` honoured: a receiver cannot park a delivery for longer.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(6 * 3600);

/// A `Retry-After` value, in seconds or as an HTTP date, as a wait from `now` (at most
/// [`MAX_RETRY_AFTER`]).
fn parse_retry_after(value: &str, now: DateTime<Utc>) -> Option<Duration> {
    let value = value.trim();
    let wait = match value.parse::<u64>() {
        Ok(seconds) => Duration::from_secs(seconds),
        Err(_) => {
            let at = DateTime::parse_from_rfc2822(value).ok()?;
            (at.with_timezone(&Utc) - now).to_std().unwrap_or_default()
        }
    };
    Some(wait.min(MAX_RETRY_AFTER))
}

/// PostgreSQL text cannot hold NUL characters.
fn clean(text: &str) -> String {
    text.replace('\0', "")
}

fn describe(error: reqwest::Error) -> String {
    use std::error::Error;
    let kind = if error.is_timeout() {
        "timed out"
    } else if error.is_connect() {
        "cannot connect"
    } else {
        "request failed"
    };
    let mut text = format!("{kind}: {error}");
    let mut source = error.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Reads at most [`RESPONSE_EXCERPT_BYTES`] of the response body.
async fn read_excerpt(mut response: reqwest::Response) -> (Option<String>, Option<String>) {
    let mut buffer: Vec<u8> = Vec::new();
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                buffer.extend_from_slice(&chunk);
                if buffer.len() >= RESPONSE_EXCERPT_BYTES {
                    break;
                }
            }
            Ok(None) => break,
            Err(error) => return (excerpt(&buffer), Some(describe(error))),
        }
    }
    (excerpt(&buffer), None)
}

fn excerpt(bytes: &[u8]) -> Option<String> {
    if bytes.is_empty() {
        return None;
    }
    let cut = &bytes[..bytes.len().min(RESPONSE_EXCERPT_BYTES)];
    Some(String::from_utf8_lossy(cut).into_owned())
}

/// When a locally opened breaker may let a probe through, if it is open.
fn open_until(b: &Breaker, policy: &BreakerPolicy) -> Option<DateTime<Utc>> {
    (b.state == BreakerState::Open)
        .then(|| b.opened_at.unwrap_or_else(Utc::now) + chrono_duration(policy.open_for))
}

fn chrono_duration(d: Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
}

/// A poisoned lock only means another delivery panicked; the data is still usable.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A per-endpoint token bucket: `rate` requests per second, bursts up to one second's worth.
#[derive(Debug, Clone)]
struct TokenBucket {
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    fn new(rate: f64) -> Self {
        TokenBucket {
            tokens: rate,
            last: Instant::now(),
        }
    }

    /// Takes a token, or says how long until one is available.
    fn take(&mut self, rate: f64, now: Instant) -> Option<Duration> {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(rate.max(1.0));
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            None
        } else {
            Some(Duration::from_secs_f64((1.0 - self.tokens) / rate))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_bucket_spreads_requests() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(2.0);
        bucket.last = start;
        assert_eq!(bucket.take(2.0, start), None);
        assert_eq!(bucket.take(2.0, start), None);
        let wait = bucket.take(2.0, start).expect("empty");
        assert!((wait.as_secs_f64() - 0.5).abs() < 1e-6, "{wait:?}");
        assert_eq!(bucket.take(2.0, start + Duration::from_millis(500)), None);
    }

    #[test]
    fn retry_after_is_read_in_seconds_or_as_a_date_and_capped() {
        let now = DateTime::parse_from_rfc3339("2026-11-23T10:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(
            parse_retry_after(" 120 ", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            parse_retry_after("Mon, 23 Nov 2026 10:00:30 GMT", now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            parse_retry_after("Mon, 23 Nov 2026 09:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("999999", now), Some(MAX_RETRY_AFTER));
        assert_eq!(parse_retry_after("soon", now), None);
    }

    #[test]
    fn excerpts_are_bounded() {
        assert_eq!(excerpt(b""), None);
        let long = vec![b'a'; 5000];
        assert_eq!(
            excerpt(&long).map(|s| s.len()),
            Some(RESPONSE_EXCERPT_BYTES)
        );
    }
}
