//! Consuming: Kafka records become inbox rows, planned deliveries and poison records in one
//! PostgreSQL transaction, and only after it commits are the Kafka offsets committed. A crash at
//! any point therefore re-reads records rather than losing them, and the inbox's primary key turns
//! re-read records into no-ops.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::StreamExt;
use outbox_core::db::{DbError, PgPool};
use outbox_core::envelope::{self, HEADER_CORRELATION_ID};
use rdkafka::client::ClientContext;
use rdkafka::consumer::{CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::KafkaResult;
use rdkafka::message::{Headers, Message};
use rdkafka::statistics::Statistics;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

pub use crate::delivery::store::Leased;
use crate::delivery::store::{self, NewEvents};
use crate::{Config, Metrics};

/// The rdkafka context of the consumer: turns statistics into the lag gauge, logs rebalances.
pub struct IngestContext {
    metrics: Metrics,
}

impl ClientContext for IngestContext {
    fn stats(&self, statistics: Statistics) {
        for (topic, t) in &statistics.topics {
            for (partition, p) in &t.partitions {
                // Partition -1 is librdkafka's internal "unassigned" bucket; -1 lag means unknown.
                if *partition < 0 || p.consumer_lag < 0 {
                    continue;
                }
                self.metrics
                    .lag
                    .with_label_values(&[topic, &partition.to_string()])
                    .set(p.consumer_lag);
            }
        }
    }
}

impl ConsumerContext for IngestContext {
    fn post_rebalance(&self, _: &rdkafka::consumer::BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                tracing::info!(partitions = tpl.count(), "partitions assigned")
            }
            Rebalance::Revoke(tpl) => {
                // The new owner reports these partitions' lag now.
                for e in tpl.elements() {
                    let _ = self
                        .metrics
                        .lag
                        .remove_label_values(&[e.topic(), &e.partition().to_string()]);
                }
                tracing::info!(partitions = tpl.count(), "partitions revoked")
            }
            Rebalance::Error(error) => tracing::warn!(%error, "rebalance failed"),
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, _offsets: &TopicPartitionList) {
        if let Err(error) = result {
            // Harmless: the records are recorded; at worst they are read again and deduplicated.
            tracing::debug!(%error, "offset commit failed");
        }
    }
}

/// The Kafka consumer of this service.
pub type KafkaConsumer = StreamConsumer<IngestContext>;

/// Creates the consumer (it connects lazily, so Kafka may be down) and subscribes to the topics.
/// A batch's offsets are stored once it is recorded, and [`consume`] commits the stored offsets
/// every `CONSUMER_COMMIT_INTERVAL` and when it stops: an offset never reaches Kafka before its
/// records are in PostgreSQL. Not librdkafka's auto-commit: with it, closing the consumer waits
/// for a final commit, forever while every broker is down. A new group starts at the earliest
/// record.
pub fn create_consumer(config: &Config, metrics: Metrics) -> anyhow::Result<KafkaConsumer> {
    let mut client = outbox_core::kafka::base_config(&config.kafka.kafka_brokers, "consumer");
    client
        .set("group.id", &config.consumer_group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("partition.assignment.strategy", "cooperative-sticky")
        .set(
            "statistics.interval.ms",
            config
                .kafka_statistics_interval
                .as_millis()
                .max(1)
                .to_string(),
        );
    let consumer: KafkaConsumer = client.create_with_context(IngestContext { metrics })?;
    let topics: Vec<&str> = config
        .consumer_topics
        .iter()
        .map(|t| t.trim())
        .filter(|t| !t.is_empty())
        .collect();
    anyhow::ensure!(!topics.is_empty(), "CONSUMER_TOPICS names no topic");
    consumer.subscribe(&topics)?;
    Ok(consumer)
}

/// One Kafka record, copied out of librdkafka's buffer.
#[derive(Debug, Clone)]
pub struct Incoming {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub payload: Vec<u8>,
    pub correlation_header: Option<String>,
    /// The trace context of the span that recorded it (continuing its `traceparent` header),
    /// kept with its deliveries; None when spans are not exported.
    pub traceparent: Option<String>,
}

/// What a record turned out to be.
enum Parsed {
    Event {
        id: String,
        event_type: String,
        correlation_id: Option<String>,
        json: String,
    },
    Poison(String),
}

/// Checks a record against the envelope contract. `data` is not parsed (any depth is read), and
/// the fields that become webhook headers must be valid header values, so that an event either
/// can be sent to every endpoint or is visibly poison, never a delivery that cannot be built.
/// A correlation id that cannot be a header is dropped (the event id is sent in its place).
fn parse(record: &Incoming) -> Parsed {
    let head = match envelope::read_head(&record.payload) {
        Ok(head) => head,
        Err(error) => return Parsed::Poison(error.to_string()),
    };
    let correlation_id = record
        .correlation_header
        .clone()
        .filter(|c| envelope::check_correlation_id(c).is_ok())
        .or(head.correlation_id);
    Parsed::Event {
        id: head.id,
        event_type: head.event,
        correlation_id,
        // Valid UTF-8: read_head checked it.
        json: String::from_utf8_lossy(&record.payload).into_owned(),
    }
}

/// What one recorded batch did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Recorded {
    pub events: u64,
    pub duplicates: u64,
    pub deliveries: u64,
    pub poison: u64,
}

const RECORD_POISON: &str = "
    insert into poison_records (topic, kafka_partition, kafka_offset, error, payload)
    select * from unnest($1::text[], $2::int[], $3::bigint[], $4::text[], $5::bytea[])
    on conflict do nothing";

/// Records a batch in one transaction: inbox rows, deliveries, poison records. When PostgreSQL
/// refuses a value (e.g. a `\u0000` that `jsonb` cannot hold), the batch is recorded record by
/// record so that only the offending record turns poison.
///
/// With `lease` (seconds) the new deliveries are returned leased to the caller, which must send
/// them; a batch recorded record by record leases nothing.
pub async fn record_batch(
    pool: &PgPool,
    records: &[Incoming],
    lease: Option<Duration>,
) -> Result<(Recorded, Option<Leased>), DbError> {
    let parsed: Vec<Parsed> = records.iter().map(parse).collect();
    match record_parsed(pool, records, &parsed, lease).await {
        Err(error) if error.is_data_error() => {
            tracing::warn!(%error, "a record in the batch was refused; recording one by one");
            let mut total = Recorded::default();
            for (record, parsed) in records.iter().zip(parsed) {
                let one = std::slice::from_ref(record);
                let (done, _) =
                    match record_parsed(pool, one, std::slice::from_ref(&parsed), None).await {
                        Err(error) if error.is_data_error() => {
                            let poison =
                                Parsed::Poison(format!("PostgreSQL refused the event: {error}"));
                            record_parsed(pool, one, &[poison], None).await?
                        }
                        other => other?,
                    };
                total.events += done.events;
                total.duplicates += done.duplicates;
                total.deliveries += done.deliveries;
                total.poison += done.poison;
            }
            Ok((total, None))
        }
        other => other,
    }
}

/// Records the batch all or nothing. Without poison that is one statement, sent on its own: a
/// transaction around it would add three round trips (begin, and the commit waiting for the
/// previous ones), which at a steady rate were most of the time a batch took to record, and
/// the next batch waits for this one.
async fn record_parsed(
    pool: &PgPool,
    records: &[Incoming],
    parsed: &[Parsed],
    lease: Option<Duration>,
) -> Result<(Recorded, Option<Leased>), DbError> {
    let mut client = pool.get().await?;
    if !parsed.iter().any(|p| matches!(p, Parsed::Poison(_))) {
        return record_in(&client, records, parsed, lease).await;
    }
    let tx = client.transaction().await?;
    let done = record_in(&tx, records, parsed, lease).await?;
    tx.commit().await?;
    Ok(done)
}

/// Records parsed records: in the caller's transaction, or on a plain connection when `parsed`
/// holds no poison (then it is one statement).
async fn record_in(
    tx: &impl deadpool_postgres::GenericClient,
    records: &[Incoming],
    parsed: &[Parsed],
    lease: Option<Duration>,
) -> Result<(Recorded, Option<Leased>), DbError> {
    let mut events = NewEvents::default();
    let mut poison = PoisonColumns::default();
    for (record, p) in records.iter().zip(parsed) {
        columns(record, p, &mut events, &mut poison);
    }
    let planned = store::record_events(tx, &events, lease).await?;
    let mut recorded = Recorded {
        events: planned.new_events,
        duplicates: events.ids.len() as u64 - planned.new_events,
        deliveries: planned.planned,
        poison: 0,
    };
    if !poison.topics.is_empty() {
        tx.execute(
            RECORD_POISON,
            &[
                &poison.topics,
                &poison.partitions,
                &poison.offsets,
                &poison.errors,
                &poison.payloads,
            ],
        )
        .await?;
        recorded.poison = poison.topics.len() as u64;
    }
    Ok((recorded, planned.leased))
}

/// Adds one record to the columns of the batch statements.
fn columns<'a>(
    record: &'a Incoming,
    parsed: &'a Parsed,
    events: &mut NewEvents<'a>,
    poison: &mut PoisonColumns<'a>,
) {
    match parsed {
        Parsed::Event {
            id,
            event_type,
            correlation_id,
            json,
        } => {
            events.ids.push(id.as_str());
            events.types.push(event_type.as_str());
            events.topics.push(record.topic.as_str());
            events.partitions.push(record.partition);
            events.offsets.push(record.offset);
            events.correlation.push(correlation_id.as_deref());
            events.json.push(json.as_str());
            events.traceparents.push(record.traceparent.as_deref());
        }
        Parsed::Poison(error) => {
            poison.topics.push(record.topic.as_str());
            poison.partitions.push(record.partition);
            poison.offsets.push(record.offset);
            poison.errors.push(error.replace('\0', ""));
            poison.payloads.push(record.payload.as_slice());
        }
    }
}

/// What replaying a poison record did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PoisonReplay {
    NotFound,
    /// The record still cannot be read as an event, for this reason (now stored as its error).
    StillPoison(String),
    /// The record is now an event: recorded as a consumed record would have been.
    Recorded {
        event_id: String,
        deliveries: u64,
        /// The inbox already had this event id, so nothing new was planned.
        duplicate: bool,
    },
}

/// Reads a poison record again under today's rules (after the cause was fixed, e.g. a newer
/// consumer that reads what an older one could not). If it is an event now, it is recorded as if
/// just consumed (inbox row, one delivery per subscribed endpoint) and the poison row is removed,
/// in one transaction; if not, its error is refreshed and the row stays.
pub async fn replay_poison(pool: &PgPool, id: i64) -> Result<PoisonReplay, DbError> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let Some(row) = tx
        .query_opt(
            "select topic, kafka_partition, kafka_offset, payload from poison_records
              where id = $1 for update",
            &[&id],
        )
        .await?
    else {
        return Ok(PoisonReplay::NotFound);
    };
    let record = Incoming {
        topic: row.get(0),
        partition: row.get(1),
        offset: row.get(2),
        payload: row.get::<_, Option<Vec<u8>>>(3).unwrap_or_default(),
        correlation_header: None,
        traceparent: None,
    };
    let parsed = parse(&record);
    let outcome = match &parsed {
        Parsed::Poison(error) => Err(error.clone()),
        Parsed::Event { id: event_id, .. } => {
            let one = std::slice::from_ref(&record);
            match record_in(&tx, one, std::slice::from_ref(&parsed), None).await {
                Ok((recorded, _)) => Ok(PoisonReplay::Recorded {
                    event_id: event_id.clone(),
                    deliveries: recorded.deliveries,
                    duplicate: recorded.events == 0,
                }),
                Err(error) if error.is_data_error() => {
                    Err(format!("PostgreSQL refused the event: {error}"))
                }
                Err(error) => return Err(error),
            }
        }
    };
    let outcome = match outcome {
        Ok(recorded) => {
            tx.execute("delete from poison_records where id = $1", &[&id])
                .await?;
            recorded
        }
        Err(error) => {
            // A refused statement aborted the transaction: refresh the error in a new one.
            drop(tx);
            client
                .execute(
                    "update poison_records set error = $2 where id = $1",
                    &[&id, &error.replace('\0', "")],
                )
                .await?;
            return Ok(PoisonReplay::StillPoison(error));
        }
    };
    tx.commit().await?;
    Ok(outcome)
}

/// A poison record as the admin API shows it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct PoisonRecord {
    pub id: i64,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub error: String,
    /// The record's bytes, as text (invalid UTF-8 replaced).
    pub payload: Option<String>,
    pub received_at: DateTime<Utc>,
}

/// Poison records after id `after`, in id order, at most `limit`.
pub async fn list_poison(
    db: &impl tokio_postgres::GenericClient,
    after: i64,
    limit: i64,
) -> Result<Vec<PoisonRecord>, tokio_postgres::Error> {
    let rows = db
        .query(
            "select id, topic, kafka_partition, kafka_offset, error, payload, received_at
               from poison_records where id > $1 order by id limit $2",
            &[&after, &limit],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| PoisonRecord {
            id: r.get("id"),
            topic: r.get("topic"),
            partition: r.get("kafka_partition"),
            offset: r.get("kafka_offset"),
            error: r.get("error"),
            payload: r
                .get::<_, Option<Vec<u8>>>("payload")
                .map(|p| String::from_utf8_lossy(&p).into_owned()),
            received_at: r.get("received_at"),
        })
        .collect())
}

#[derive(Default)]
struct PoisonColumns<'a> {
    topics: Vec<&'a str>,
    partitions: Vec<i32>,
    offsets: Vec<i64>,
    errors: Vec<String>,
    payloads: Vec<&'a [u8]>,
}

/// The offsets to commit after a batch: per partition, one past the highest recorded offset.
fn next_offsets(records: &[Incoming]) -> KafkaResult<TopicPartitionList> {
    let mut highest: HashMap<(&str, i32), i64> = HashMap::new();
    for r in records {
        let e = highest
            .entry((r.topic.as_str(), r.partition))
            .or_insert(r.offset);
        *e = (*e).max(r.offset);
    }
    let mut tpl = TopicPartitionList::new();
    for ((topic, partition), offset) in highest {
        tpl.add_partition_offset(topic, partition, Offset::Offset(offset + 1))?;
    }
    Ok(tpl)
}

fn to_incoming(
    message: &rdkafka::message::BorrowedMessage<'_>,
    traceparent: Option<String>,
) -> Incoming {
    let correlation_header = message.headers().and_then(|headers| {
        headers
            .iter()
            .find(|h| h.key == HEADER_CORRELATION_ID)
            .and_then(|h| h.value)
            .and_then(|v| std::str::from_utf8(v).ok())
            .map(str::to_owned)
    });
    Incoming {
        topic: message.topic().to_owned(),
        partition: message.partition(),
        offset: message.offset(),
        payload: message.payload().unwrap_or_default().to_vec(),
        correlation_header,
        traceparent,
    }
}

/// Reads records in small batches until `shutdown`, records each batch durably (retrying while
/// PostgreSQL is down), stores its offsets, and hands the new deliveries on: leased, to a fast
/// lane that sends them from memory when one is free, otherwise to the dispatchers' claim (woken).
/// The stored offsets are committed `CONSUMER_COMMIT_INTERVAL` after the first batch that stored
/// any, and when it stops: one commit per interval instead of one per batch (a broker write
/// each). A crash re-reads what was stored since, and so does the next owner of a partition
/// taken away in a rebalance; the inbox drops the re-read records.
/// Never returns early because a dependency is down.
pub async fn consume(
    consumer: Arc<KafkaConsumer>,
    config: &Config,
    pool: PgPool,
    metrics: Metrics,
    wake: Arc<Notify>,
    lanes: tokio::sync::mpsc::Sender<Leased>,
    shutdown: CancellationToken,
) {
    let mut stream = consumer
        .stream()
        .ready_chunks(config.consumer_batch_size.max(1));
    let interval = config.consumer_commit_interval;
    let mut stored = false;
    // When the offsets stored since the last commit are due to be committed; None: none are.
    let mut commit_at: Option<tokio::time::Instant> = None;
    loop {
        let chunk = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            _ = sleep_until_some(commit_at) => {
                // Async: a lost commit only means these records are read (and ignored) again.
                if let Err(error) = consumer.commit_consumer_state(CommitMode::Async) {
                    tracing::debug!(%error, "offset commit not sent");
                }
                commit_at = None;
                continue;
            }
            chunk = stream.next() => match chunk {
                Some(chunk) => chunk,
                None => break,
            },
        };
        let mut records = Vec::with_capacity(chunk.len());
        let mut recording = crate::trace_context::Recording::default();
        for item in chunk {
            match item {
                Ok(message) => {
                    let traceparent = recording.add(&message);
                    records.push(to_incoming(&message, traceparent))
                }
                Err(error) => tracing::warn!(%error, "Kafka consumer error"),
            }
        }
        if records.is_empty() {
            continue;
        }
        let lane = lanes.try_reserve().ok();
        let lease = lane.as_ref().map(|_| config.delivery_lease);
        let Some((recorded, leased)) = record_until_done(&pool, &records, lease, &shutdown).await
        else {
            // Shutdown while PostgreSQL was down: nothing committed, the records are read again.
            break;
        };
        recording.finish();
        for r in &records {
            metrics.consumed.with_label_values(&[&r.topic]).inc();
        }
        metrics.duplicates.inc_by(recorded.duplicates);
        if recorded.poison > 0 {
            for r in records.iter() {
                if matches!(parse(r), Parsed::Poison(_)) {
                    metrics.poison.with_label_values(&[&r.topic]).inc();
                    tracing::warn!(topic = %r.topic, partition = r.partition, offset = r.offset, "poison record recorded and skipped");
                }
            }
        }
        tracing::debug!(
            records = records.len(),
            events = recorded.events,
            duplicates = recorded.duplicates,
            deliveries = recorded.deliveries,
            poison = recorded.poison,
            "batch recorded"
        );
        match (lane, leased) {
            (Some(lane), Some(leased)) => lane.send(leased),
            _ if recorded.deliveries > 0 => wake.notify_waiters(),
            _ => {}
        }
        match next_offsets(&records) {
            Ok(tpl) => {
                if let Err(error) = consumer.store_offsets(&tpl) {
                    tracing::debug!(%error, "offsets not stored");
                }
                stored = true;
                commit_at.get_or_insert_with(|| tokio::time::Instant::now() + interval);
            }
            Err(error) => tracing::warn!(%error, "cannot build offsets to commit"),
        }
    }
    if stored {
        let consumer = consumer.clone();
        let _ =
            tokio::task::spawn_blocking(move || consumer.commit_consumer_state(CommitMode::Sync))
                .await;
    }
    consumer.unsubscribe();
}

/// Sleeps until `at`; never returns without it.
async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn record_until_done(
    pool: &PgPool,
    records: &[Incoming],
    lease: Option<Duration>,
    shutdown: &CancellationToken,
) -> Option<(Recorded, Option<Leased>)> {
    outbox_core::db::until_done("recording a consumed batch", shutdown, || {
        record_batch(pool, records, lease)
    })
    .await
}
