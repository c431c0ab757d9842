//! Claiming due outbox rows, publishing them with the idempotent producer, and marking the batch
//! from the delivery reports: one statement for the sent rows, one for the failed ones.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, Utc};
use outbox_core::db::PgPool;
use outbox_core::envelope::{HEADER_CORRELATION_ID, HEADER_EVENT_ID, HEADER_EVENT_TYPE};
use outbox_core::kafka;
use outbox_core::outbox::OutboxState;
use outbox_core::reconnect::Backoff;
use outbox_core::schedule::exponential_backoff;
use outbox_core::shutdown::sleep_or_cancel;
use outbox_core::trace_context::TRACEPARENT;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;
use serde_json::Value;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::{Config, Metrics};

/// Due `P`/`X` rows in id order, never a row whose key has an older unsent row that is not due
/// (that row would then be overtaken). Older due rows of the same key are in the same batch,
/// before it, and the idempotent producer keeps their order within the partition. The keys to
/// hold back come from the few rows waiting for a later retry, found by `outbox_unsent_due`, so a
/// claim costs the same however long the backlog is. `$2` are the rows of the previous batch,
/// acknowledged by Kafka but whose marks are still being written.
pub const CLAIM_DUE_ROWS: &str = "
    with held as (
        select aggregate_id, min(id) as from_id from outbox
         where state in ('P', 'X') and next_attempt_at > now()
         group by aggregate_id)
    select o.id, o.topic, o.aggregate_id,
           (select p.payload::text from outbox_payloads p where p.outbox_id = o.id),
           o.headers, o.attempts, o.created_at,
           o.last_error_kind = 'permanent' as solo
      from outbox o
     where o.state in ('P', 'X') and o.next_attempt_at <= now()
       and not exists (select 1 from held h where h.aggregate_id = o.aggregate_id and h.from_id < o.id)
       and not exists (select 1 from unnest($2::bigint[]) marking(id) where marking.id = o.id)
     order by o.id
     limit $1";

pub const MARK_SENT: &str = "
    update outbox o
       set state = 'E', kafka_partition = u.partition, kafka_offset = u.kafka_offset,
           sent_at = now(), attempts = o.attempts + 1, last_error = null, last_error_kind = null
      from unnest($1::bigint[], $2::int[], $3::bigint[]) as u(id, partition, kafka_offset)
     where o.id = u.id and o.state in ('P', 'X')";

const MARK_FAILED: &str = "
    update outbox o
       set state = u.state, attempts = o.attempts + 1, last_error = u.error, last_error_kind = u.kind,
           next_attempt_at = now() + u.delay_ms * interval '1 millisecond'
      from unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::bigint[])
           as u(id, state, error, kind, delay_ms)
     where o.id = u.id and o.state in ('P', 'X')";

/// When the next unsent row falls due (to sleep exactly that long when nothing is due now).
const NEXT_DUE: &str = "select min(next_attempt_at) from outbox where state in ('P', 'X')";

struct Claimed {
    id: i64,
    topic: String,
    key: String,
    /// None only if the row's `outbox_payloads` row was deleted by hand: sent as a record Kafka
    /// refuses, so the row turns dead after its attempts instead of blocking its key.
    payload: Option<String>,
    headers: Value,
    attempts: i32,
    created_at: DateTime<Utc>,
    /// Last failed permanently: sent alone, after everything before it was acknowledged.
    solo: bool,
}

/// Errors that will not go away by waiting: the row counts towards `RELAY_MAX_ATTEMPTS` and then
/// turns dead. Everything else (timeouts, broker down, leader changes) is transient and retried
/// for as long as it takes.
/// The spans of one batch's sends: the batch's own, linked to the trace of every event it carries
/// (a batch belongs to many traces, so it is a child of none), and one per event, a child of the
/// event's `traceparent` header, which then carries that span's context on into Kafka. Nothing
/// when spans are not exported.
fn batch_spans(rows: &mut [Claimed]) -> (tracing::Span, Vec<tracing::Span>) {
    let batch = tracing::info_span!(
        "relay_batch",
        events = rows.len(),
        sent = tracing::field::Empty
    );
    if !outbox_core::telemetry::exporting() {
        return (batch, Vec::new());
    }
    let mut per_event = Vec::new();
    for row in rows.iter_mut() {
        let Some(tp) = row
            .headers
            .get(TRACEPARENT)
            .and_then(Value::as_str)
            .map(str::to_owned)
        else {
            continue;
        };
        outbox_core::trace_context::link_to(&batch, &tp);
        let span = tracing::info_span!(parent: None, "relay_publish", otel.kind = "producer", outbox_id = row.id, topic = %row.topic);
        outbox_core::trace_context::continue_from_value(&span, Some(&tp));
        if let (Some(next), Some(headers)) = (
            outbox_core::trace_context::traceparent(&span),
            row.headers.as_object_mut(),
        ) {
            headers.insert(TRACEPARENT.to_owned(), Value::String(next));
        }
        per_event.push(span);
    }
    (batch, per_event)
}

fn is_permanent(error: &KafkaError) -> bool {
    use RDKafkaErrorCode::*;
    matches!(
        error.rdkafka_error_code(),
        Some(
            MessageSizeTooLarge
                | InvalidMessageSize
                | InvalidMessage
                | MessageBatchTooLarge
                | TopicAuthorizationFailed
                | InvalidTopic
                | PolicyViolation
        )
    )
}

/// The relay's Kafka side and its batch loop.
pub struct Publisher {
    producer: Mutex<FutureProducer>,
    brokers: String,
    send_timeout: Duration,
    pool: PgPool,
    metrics: Metrics,
    configured_topics: Vec<String>,
    known_topics: Mutex<HashSet<String>>,
    partitions: i32,
    batch_size: i64,
    poll_interval: Duration,
    max_attempts: i32,
    retry_base: Duration,
    retry_max: Duration,
}

impl Publisher {
    pub fn new(
        config: &Config,
        topics: Vec<String>,
        pool: PgPool,
        metrics: Metrics,
    ) -> anyhow::Result<Self> {
        let producer = Self::create_producer(&config.kafka.kafka_brokers, config.send_timeout)?;
        Ok(Publisher {
            producer: Mutex::new(producer),
            brokers: config.kafka.kafka_brokers.clone(),
            send_timeout: config.send_timeout,
            pool,
            metrics,
            configured_topics: topics,
            known_topics: Mutex::new(HashSet::new()),
            partitions: config.topic_partitions,
            batch_size: config.batch_size.max(1),
            poll_interval: config.poll_interval,
            max_attempts: config.max_attempts.max(1),
            retry_base: config.retry_base,
            retry_max: config.retry_max,
        })
    }

    fn create_producer(brokers: &str, send_timeout: Duration) -> anyhow::Result<FutureProducer> {
        Ok(kafka::idempotent_producer_config(brokers, "outbox-relay", send_timeout).create()?)
    }

    pub fn producer(&self) -> FutureProducer {
        self.producer.lock().expect("producer lock").clone()
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// True when the cluster answers a metadata request within two seconds.
    pub async fn kafka_reachable(&self) -> bool {
        outbox_core::kafka::is_reachable(self.producer(), |p| p.client()).await
    }

    /// Publishes batches while `leadership` and `shutdown` hold; sleeps until NOTIFY, the next due
    /// row or the poll interval when nothing is due.
    pub async fn lead(
        &self,
        wake: &Notify,
        leadership: &CancellationToken,
        shutdown: &CancellationToken,
    ) {
        self.ensure_topics(&self.configured_topics).await;
        let mut db_backoff = Backoff::new();
        let mut pipeline = Pipeline::default();
        while !leadership.is_cancelled() && !shutdown.is_cancelled() {
            match self.publish_batch(&mut pipeline, leadership).await {
                Ok(0) => {
                    let wait = self.until_next_due().await;
                    tokio::select! {
                        _ = wake.notified() => {}
                        _ = tokio::time::sleep(wait) => {}
                        _ = leadership.cancelled() => {}
                        _ = shutdown.cancelled() => {}
                    }
                }
                Ok(_) => db_backoff.reset(),
                Err(error) => {
                    let delay = db_backoff.next_delay();
                    tracing::warn!(%error, retry_in_ms = delay.as_millis() as u64, "batch not claimed or not marked; its rows stay unsent and are sent again");
                    pipeline.next = None;
                    sleep_or_cancel(delay, leadership).await;
                }
            }
        }
        // Leadership lost or shutting down: the marks in flight still get their chance.
        let _ = pipeline.settle().await;
    }

    async fn until_next_due(&self) -> Duration {
        let next: Option<DateTime<Utc>> = match self.pool.get().await {
            Ok(client) => client
                .query_one(NEXT_DUE, &[])
                .await
                .ok()
                .and_then(|r| r.get(0)),
            Err(_) => None,
        };
        match next {
            Some(at) => outbox_core::config::time_until(at, Utc::now())
                .clamp(Duration::from_millis(5), self.poll_interval),
            None => self.poll_interval,
        }
    }

    /// Creates the topics not yet known to exist. A failure (Kafka down) is logged; the sends then
    /// fail transiently and their rows turn X until Kafka is back.
    async fn ensure_topics(&self, topics: &[String]) {
        let missing: Vec<String> = {
            let known = self.known_topics.lock().expect("topics lock");
            topics
                .iter()
                .filter(|t| !known.contains(*t))
                .cloned()
                .collect()
        };
        if missing.is_empty() {
            return;
        }
        let created = tokio::time::timeout(
            self.send_timeout,
            kafka::ensure_topics(&self.brokers, &missing, self.partitions),
        )
        .await;
        match created {
            Ok(Ok(())) => self
                .known_topics
                .lock()
                .expect("topics lock")
                .extend(missing),
            Ok(Err(error)) => tracing::warn!(%error, "topics not created yet"),
            Err(_) => tracing::warn!(topics = ?missing, "topic creation timed out (is Kafka up?)"),
        }
    }

    /// Claims one batch, publishes it and marks every row: E with its partition and offset, or X/D
    /// with the error and the next attempt time. Returns how many rows the batch had.
    ///
    /// When the whole batch was acknowledged, its marks are written in the background while the
    /// next batch is claimed (without the rows whose marks are in flight) and sent. That batch is
    /// only claimed after every row before it is in Kafka, so per-key order holds as in a
    /// sequential loop. (Claiming it while this one is still in Kafka was measured slower: on two
    /// cores the claim then competes with the send.) A batch with a failure is marked before
    /// anything else is claimed, so that its keys hold back.
    async fn publish_batch(
        &self,
        pipeline: &mut Pipeline,
        leadership: &CancellationToken,
    ) -> Result<usize, BatchError> {
        let claim_started = std::time::Instant::now();
        let rows = match pipeline.next.take() {
            Some(rows) => rows,
            None => {
                pipeline.settle().await?;
                self.claim(&[]).await?
            }
        };
        if rows.is_empty() {
            pipeline.settle().await?;
            return Ok(0);
        }
        self.metrics.batch_size.observe(rows.len() as f64);
        let batch_topics: Vec<String> = rows
            .iter()
            .map(|r| r.topic.clone())
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        self.ensure_topics(&batch_topics).await;

        let claim_ms = claim_started.elapsed().as_secs_f64() * 1000.0;
        let send_started = std::time::Instant::now();
        let producer = self.producer();
        let mut rows = rows;
        let (span, per_event) = batch_spans(&mut rows);
        let outcomes = self
            .send_in_order(&producer, &rows)
            .instrument(span.clone())
            .await;
        span.record("sent", outcomes.iter().filter(|o| o.is_ok()).count());
        drop(per_event);
        let mut sent = Sent::default();
        let mut failed = Failed::default();
        for (row, outcome) in rows.iter().zip(outcomes) {
            match outcome {
                Ok((partition, offset)) => {
                    sent.ids.push(row.id);
                    sent.partitions.push(partition);
                    sent.offsets.push(offset);
                    *sent.per_topic.entry(row.topic.as_str()).or_default() += 1;
                    let latency = (Utc::now() - row.created_at)
                        .num_microseconds()
                        .unwrap_or(0) as f64
                        / 1e6;
                    self.metrics.commit_to_ack.observe(latency.max(0.0));
                }
                Err(error) => {
                    let permanent = is_permanent(&error);
                    let attempts = row.attempts + 1;
                    // A batch-mate's refusal can fail a good record, so only a failure of the
                    // record sent alone counts as the last one.
                    let dead = permanent && row.solo && attempts >= self.max_attempts;
                    let delay =
                        exponential_backoff(attempts as u32, self.retry_base, self.retry_max);
                    failed.ids.push(row.id);
                    let state = if dead {
                        OutboxState::Dead
                    } else {
                        OutboxState::Retry
                    };
                    failed.states.push(state.code().to_owned());
                    failed.errors.push(error.to_string());
                    failed
                        .kinds
                        .push(if permanent { "permanent" } else { "transient" }.to_owned());
                    failed.delays_ms.push(delay.as_millis() as i64);
                    self.metrics
                        .failures
                        .with_label_values(&[if permanent { "permanent" } else { "transient" }])
                        .inc();
                    if dead {
                        self.metrics.dead.inc();
                        tracing::error!(outbox_id = row.id, attempts, %error, "row is dead: non-transient error after the last attempt");
                    }
                }
            }
        }
        let total = rows.len();
        let send_ms = send_started.elapsed().as_secs_f64() * 1000.0;
        for (topic, n) in &sent.per_topic {
            self.metrics
                .published
                .with_label_values(&[topic])
                .inc_by(*n);
        }
        let mark_started = std::time::Instant::now();
        let marks = Marks {
            pool: self.pool.clone(),
            sent_ids: sent.ids,
            partitions: sent.partitions,
            offsets: sent.offsets,
            failed,
        };
        if marks.failed.ids.is_empty() {
            pipeline.make_room().await?;
            pipeline.marking.push_back(Marking {
                ids: rows.iter().map(|r| r.id).collect(),
                task: tokio::spawn(marks.write_until_done(leadership.clone())),
            });
            pipeline.next = Some(self.claim(&pipeline.unmarked()).await?);
            tracing::debug!(sent = total, "batch published");
        } else {
            pipeline.settle().await?;
            marks.write().await?;
            tracing::warn!(sent = marks.sent_ids.len(), failed = marks.failed.ids.len(), first_error = %marks.failed.errors[0], "batch partly failed; failed rows turned X (or D)");
        }
        tracing::debug!(
            rows = total,
            claim_ms,
            send_ms,
            next_claim_ms = mark_started.elapsed().as_secs_f64() * 1000.0,
            "batch timing"
        );
        self.replace_producer_if_fatal();
        Ok(total)
    }

    /// Sends the rows in id order and returns each one's outcome. Rows flagged `solo` are sent
    /// alone: everything before them is acknowledged first, and they are acknowledged before
    /// anything after them is sent, so per-key order holds around them too.
    async fn send_in_order(
        &self,
        producer: &FutureProducer,
        rows: &[Claimed],
    ) -> Vec<Result<(i32, i64), KafkaError>> {
        let mut outcomes = Vec::with_capacity(rows.len());
        let mut pending = Vec::new();
        for row in rows {
            if row.solo {
                outcomes.extend(Self::acknowledged(std::mem::take(&mut pending)).await);
                let alone = vec![self.enqueue(producer, row).await];
                outcomes.extend(Self::acknowledged(alone).await);
            } else {
                pending.push(self.enqueue(producer, row).await);
            }
        }
        outcomes.extend(Self::acknowledged(pending).await);
        outcomes
    }

    async fn acknowledged(
        pending: Vec<Result<rdkafka::producer::DeliveryFuture, KafkaError>>,
    ) -> Vec<Result<(i32, i64), KafkaError>> {
        let mut outcomes = Vec::with_capacity(pending.len());
        for delivery in pending {
            outcomes.push(match delivery {
                Ok(future) => match future.await {
                    Ok(Ok(delivery)) => Ok((delivery.partition, delivery.offset)),
                    Ok(Err((error, _))) => Err(error),
                    Err(_) => Err(KafkaError::Canceled),
                },
                Err(error) => Err(error),
            });
        }
        outcomes
    }

    async fn enqueue(
        &self,
        producer: &FutureProducer,
        row: &Claimed,
    ) -> Result<rdkafka::producer::DeliveryFuture, KafkaError> {
        let Some(payload) = &row.payload else {
            return Err(KafkaError::MessageProduction(
                RDKafkaErrorCode::InvalidMessage,
            ));
        };
        // The contract's three headers first (absent ones empty, as before), then whatever else
        // the publisher gave (outbox.publish's `headers`).
        let header = |name: &str| {
            row.headers
                .get(name)
                .and_then(Value::as_str)
                .unwrap_or_default()
        };
        let mut headers = OwnedHeaders::new_with_capacity(3);
        for name in [HEADER_EVENT_ID, HEADER_EVENT_TYPE, HEADER_CORRELATION_ID] {
            headers = headers.insert(Header {
                key: name,
                value: Some(header(name)),
            });
        }
        if let Some(extra) = row.headers.as_object() {
            for (name, value) in extra {
                let contract = [HEADER_EVENT_ID, HEADER_EVENT_TYPE, HEADER_CORRELATION_ID];
                if let (false, Some(value)) = (contract.contains(&name.as_str()), value.as_str()) {
                    headers = headers.insert(Header {
                        key: name,
                        value: Some(value),
                    });
                }
            }
        }
        let mut record = FutureRecord::to(&row.topic)
            .key(&row.key)
            .payload(payload)
            .headers(headers);
        loop {
            match producer.send_result(record) {
                Ok(future) => return Ok(future),
                // librdkafka's local queue is full: wait for deliveries to drain it.
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((error, _)) => return Err(error),
            }
        }
    }

    /// Due rows in id order, without the rows in `marking` (sent, marks not yet committed).
    async fn claim(&self, marking: &[i64]) -> Result<Vec<Claimed>, BatchError> {
        let client = self.pool.get().await?;
        // Prepared: planning this query cost about as much as running it for small batches
        // (relay-bench: drain +10 %, latency p50 9-14 → 4-12 ms). A generic plan made while nearly
        // every row is unsent may walk the primary key; once sent rows pile up, autoanalyze
        // invalidates it and the next plan takes the unsent index.
        let claim = client.prepare_cached(CLAIM_DUE_ROWS).await?;
        Ok(client
            .query(&claim, &[&self.batch_size, &marking])
            .await?
            .iter()
            .map(|r| Claimed {
                id: r.get(0),
                topic: r.get(1),
                key: r.get(2),
                payload: r.get(3),
                headers: r.get(4),
                attempts: r.get(5),
                created_at: r.get(6),
                solo: r.get::<_, Option<bool>>(7).unwrap_or(false),
            })
            .collect())
    }

    /// A fatal idempotent-producer error poisons the instance: drop it and start a new one. The
    /// rows of its purged records were marked X above and will be sent again.
    fn replace_producer_if_fatal(&self) {
        let producer = self.producer();
        if let Some((code, reason)) = producer.client().fatal_error() {
            tracing::error!(
                ?code,
                reason,
                "fatal Kafka producer error; recreating the producer"
            );
            match Self::create_producer(&self.brokers, self.send_timeout) {
                Ok(fresh) => *self.producer.lock().expect("producer lock") = fresh,
                Err(error) => tracing::error!(%error, "cannot recreate the Kafka producer"),
            }
        }
    }
}

#[derive(Default)]
struct Sent<'a> {
    ids: Vec<i64>,
    partitions: Vec<i32>,
    offsets: Vec<i64>,
    per_topic: HashMap<&'a str, u64>,
}

/// The batches whose marks are being written, oldest first, and the batch claimed meanwhile.
#[derive(Default)]
struct Pipeline {
    marking: VecDeque<Marking>,
    next: Option<Vec<Claimed>>,
}

struct Marking {
    ids: Vec<i64>,
    task: tokio::task::JoinHandle<Result<(), BatchError>>,
}

impl Pipeline {
    /// Batches whose marks may be in flight at once. Two keep a slow commit off the path of the
    /// next claim; the claim excludes their rows.
    const MAX_MARKING: usize = 2;

    /// Waits until every mark in flight is committed.
    async fn settle(&mut self) -> Result<(), BatchError> {
        while let Some(marking) = self.marking.pop_front() {
            marking.finish().await?;
        }
        Ok(())
    }

    /// Collects the marks already written, and waits for the oldest while the pipeline is full.
    async fn make_room(&mut self) -> Result<(), BatchError> {
        while let Some(oldest) = self.marking.front() {
            if !oldest.task.is_finished() && self.marking.len() < Self::MAX_MARKING {
                break;
            }
            if let Some(marking) = self.marking.pop_front() {
                marking.finish().await?;
            }
        }
        Ok(())
    }

    /// The rows sent whose marks are not known to be committed.
    fn unmarked(&self) -> Vec<i64> {
        self.marking
            .iter()
            .flat_map(|m| m.ids.iter().copied())
            .collect()
    }
}

impl Marking {
    async fn finish(self) -> Result<(), BatchError> {
        self.task.await.unwrap_or(Err(BatchError::MarkAbandoned))
    }
}

/// A batch's outcome, to be written in one statement for the sent rows and one for the failed.
struct Marks {
    pool: PgPool,
    sent_ids: Vec<i64>,
    partitions: Vec<i32>,
    offsets: Vec<i64>,
    failed: Failed,
}

impl Marks {
    async fn write(&self) -> Result<(), BatchError> {
        let client = self.pool.get().await?;
        if !self.sent_ids.is_empty() {
            let mark_sent = client.prepare_cached(MARK_SENT).await?;
            client
                .execute(
                    &mark_sent,
                    &[&self.sent_ids, &self.partitions, &self.offsets],
                )
                .await?;
        }
        let failed = &self.failed;
        if !failed.ids.is_empty() {
            client
                .execute(
                    MARK_FAILED,
                    &[
                        &failed.ids,
                        &failed.states,
                        &failed.errors,
                        &failed.kinds,
                        &failed.delays_ms,
                    ],
                )
                .await?;
        }
        Ok(())
    }

    /// Retries until written: the next batch is already in Kafka, so giving up would send these
    /// rows again after it. Only a lost leadership ends the attempts (the next leader resends).
    async fn write_until_done(self, leadership: CancellationToken) -> Result<(), BatchError> {
        let mut backoff = Backoff::new();
        loop {
            match self.write().await {
                Ok(()) => return Ok(()),
                Err(error) if leadership.is_cancelled() => return Err(error),
                Err(error) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(%error, rows = self.sent_ids.len(), retry_in_ms = delay.as_millis() as u64, "sent rows not marked yet");
                    sleep_or_cancel(delay, &leadership).await;
                }
            }
        }
    }
}

#[derive(Default)]
struct Failed {
    ids: Vec<i64>,
    states: Vec<String>,
    errors: Vec<String>,
    kinds: Vec<String>,
    delays_ms: Vec<i64>,
}

/// Why a batch could not be claimed or marked. Its rows stay as they were and are sent again.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error("PostgreSQL is unavailable: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("PostgreSQL error: {0}")]
    Query(#[from] tokio_postgres::Error),
    #[error("the task writing a batch's marks ended abnormally")]
    MarkAbandoned,
}
