//! relay-bench: how fast the relay drains a backlog into Kafka, and its commit-to-ack latency at a
//! steady rate, each next to the same broker's raw produce figures measured in the same run.
//!
//!   cargo run --release -p relay --features bench --bin relay-bench -- --events 200000
//!
//! Needs PostgreSQL and Kafka (scripts/stack.sh deps). Creates fresh databases and topics, and
//! drops the databases when done.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use clap::Parser;
use outbox_core::kafka;
use outbox_core::testing::bench::{open_loop, percentile, quiet_logging, raw_produce};
use outbox_core::testing::{unique_topic, TestDb};
use rdkafka::producer::{FutureProducer, FutureRecord};
use relay::bench::{InProcess, Workload};

/// Measure the relay against raw Kafka produce on this machine.
#[derive(Parser, Clone)]
#[command(name = "relay-bench")]
struct Args {
    #[command(flatten)]
    workload: Workload,
    /// Offered rate for the latency measurement, events per second.
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    /// How long the latency measurement offers that rate.
    #[arg(long, default_value = "10s", value_parser = outbox_core::config::parse_duration)]
    duration: Duration,
}

fn progress(text: &str) {
    eprintln!("[relay-bench] {text}");
}

fn envelope_like(id: &str, content: &str) -> String {
    serde_json::json!({
        "id": id, "event": "message.created", "version": "1.0",
        "idempotency_key": format!("message.created-bench-{id}"),
        "timestamp": "2026-11-23T10:30:45.123Z",
        "data": {"content": content},
        "metadata": {"source": "bench", "environment": "bench", "correlation_id": "req_bench"}
    })
    .to_string()
}

/// Writes `args.workload.events` unsent outbox rows for `topic`, as the producer would.
async fn write_backlog(db: &TestDb, topic: &str, args: &Args, content: &str) -> anyhow::Result<()> {
    let load = &args.workload;
    progress(&format!("writing a backlog of {} outbox rows", load.events));
    let client = db.client().await;
    client
        .execute(
            "insert into events (event_id, event_type, aggregate_id, topic, headers, payload)
             select 'evt_bench_' || g, 'message.created', 'key-' || (g % $3), $1,
                    jsonb_build_object('event_id', 'evt_bench_' || g, 'event_type', 'message.created', 'correlation_id', 'req_bench'),
                    json_build_object('id', 'evt_bench_' || g, 'event', 'message.created', 'version', '1.0',
                        'idempotency_key', 'message.created-bench-evt_bench_' || g, 'timestamp', '2026-11-23T10:30:45.123Z',
                        'data', json_build_object('content', $4::text),
                        'metadata', json_build_object('source', 'bench', 'environment', 'bench', 'correlation_id', 'req_bench'))
               from generate_series(1, $2::bigint) g",
            &[&topic, &load.events, &load.keys, &content],
        )
        .await?;
    client
        .batch_execute("vacuum analyze events, sent, unsent")
        .await?;
    Ok(())
}

/// Rows per second PostgreSQL moves through the relay's claim and mark statements alone, one
/// batch after the other on one connection, as the relay's commits do (no flush wait).
async fn postgres_ceiling(args: &Args, content: &str) -> anyhow::Result<f64> {
    let load = &args.workload;
    use relay::statements::*;
    let db = TestDb::create().await;
    write_backlog(&db, "bench-postgres-only", args, content).await?;
    let pool = relay::pool(&db.url, 1)?;
    let client = pool.get().await?;
    // Prepared, as the relay prepares them.
    let claim = client.prepare_cached(CLAIM_CURSOR).await?;
    let mark = client.prepare_cached(&MARK_BATCH).await?;
    let mut cursor = Cursor::from_row(&client.query_one(LOAD_CURSOR, &[]).await?);
    let none_i64: Vec<i64> = Vec::new();
    let none_ts: Vec<DateTime<Utc>> = Vec::new();
    let none_text: Vec<String> = Vec::new();
    let none_i32: Vec<i32> = Vec::new();
    let started = Instant::now();
    let mut moved = 0;
    while moved < load.events {
        let xmin: i64 = client.query_one(SNAPSHOT_XMIN, &[]).await?.get(0);
        let rows = client
            .query(
                &claim,
                &[
                    &load.batch_size,
                    &cursor.xmin_done,
                    &cursor.id_done,
                    &xmin,
                    &cursor.ahead_xid,
                    &none_text,
                ],
            )
            .await?;
        anyhow::ensure!(!rows.is_empty(), "the cursor found nothing before the end");
        let ids: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
        let created: Vec<DateTime<Utc>> = rows.iter().map(|r| r.get(5)).collect();
        // The payloads are read, as the relay reads them.
        let bytes: usize = rows.iter().map(|r| r.get::<_, &str>(3).len()).sum();
        anyhow::ensure!(bytes > 0, "claimed rows without payload");
        let partitions = vec![0i32; ids.len()];
        let attempts = vec![1i32; ids.len()];
        let next = Cursor {
            xmin_done: xmin,
            id_done: ids.iter().copied().max().unwrap_or(cursor.id_done),
            version: cursor.version + 1,
            ..cursor
        };
        let marked: i64 = client
            .query_one(
                &mark,
                &[
                    &next.xmin_done,
                    &next.id_done,
                    &cursor.version,
                    &ids,
                    &created,
                    &partitions,
                    &ids,
                    &attempts,
                    &none_i64,
                    &none_i64,
                    &none_ts,
                    &none_text,
                    &none_i64,
                    &none_ts,
                    &none_text,
                    &none_text,
                    &none_i32,
                    &none_text,
                    &none_text,
                    &none_i64,
                    &next.ahead_xid,
                    &next.ahead_max_xid,
                    &next.ahead_max_id,
                ],
            )
            .await?
            .get(0);
        anyhow::ensure!(marked == 1, "the cursor moved");
        cursor = next;
        moved += ids.len() as i64;
    }
    let rate = load.events as f64 / started.elapsed().as_secs_f64();
    progress(&format!("PostgreSQL alone moved {rate:.0} rows/s"));
    drop((client, pool));
    db.drop_now().await;
    Ok(rate)
}

/// A relay running in this process on a database and topic of its own.
struct Relay {
    db: TestDb,
    topic: String,
    relay: InProcess,
}

async fn start_relay(
    args: &Args,
    brokers: &str,
    db: TestDb,
    topic: String,
) -> anyhow::Result<Relay> {
    let mut config = args.workload.relay_config(&db.url, brokers)?;
    config.topics.kafka_topic = topic.clone();
    let relay = InProcess::start(config).await?;
    Ok(Relay { db, topic, relay })
}

/// Unsent: in `unsent` as P or X, or beyond the committed cursor without a sent fact. It reads
/// every event beyond the cursor (a whole backlog at first), so it is asked only once `IDS_LEFT`
/// says it may be true.
const UNSENT: &str = "select i.id from outbox.unsent_ids() i(id)";

/// About how many rows are left: the ids beyond the newest sent one. Two index probes, cheap
/// enough to poll while the relay drains (it sends a backlog in id order); 0 once the newest event
/// is sent.
const IDS_LEFT: &str = "select coalesce((select max(id) from outbox.events), 0)
                             - coalesce((select max(id) from outbox.sent), 0)";

async fn ids_left(client: &tokio_postgres::Client) -> anyhow::Result<i64> {
    Ok(client.query_one(IDS_LEFT, &[]).await?.get(0))
}

/// Whether any row is unsent.
async fn any_unsent(client: &tokio_postgres::Client) -> anyhow::Result<bool> {
    Ok(ids_left(client).await? > 0
        || client
            .query_one(&format!("select exists ({UNSENT})"), &[])
            .await?
            .get(0))
}

impl Relay {
    /// Returns once every row is sent, probing every `every`.
    async fn wait_until_sent(&self, every: Duration) -> anyhow::Result<()> {
        let client = self.db.client().await;
        while any_unsent(&client).await? {
            tokio::time::sleep(every).await;
        }
        Ok(())
    }

    /// Stops the relay and drops its database.
    async fn stop(self) {
        let _ = self.relay.stop().await;
        self.db.drop_now().await;
    }
}

/// Raw produce → ack latencies (ms, sorted) at `rate` per second.
async fn raw_latency(
    producer: &FutureProducer,
    topic: &str,
    args: &Args,
    content: Arc<String>,
) -> anyhow::Result<Vec<f64>> {
    let (acks, _) = open_loop(args.rate, args.duration, |i| {
        let (producer, topic, content) = (producer.clone(), topic.to_owned(), content.clone());
        async move {
            let payload = envelope_like(&format!("evt_rawlat_{i}"), &content);
            let key = format!("lat-{}", i % 1000);
            let sent = Instant::now();
            producer
                .send(
                    FutureRecord::to(&topic).key(&key).payload(&payload),
                    Duration::from_secs(30),
                )
                .await
                .map_err(|(e, _)| e)?;
            anyhow::Ok(sent.elapsed().as_secs_f64() * 1000.0)
        }
    })
    .await?;
    let mut latencies = acks.into_iter().collect::<anyhow::Result<Vec<f64>>>()?;
    latencies.sort_by(f64::total_cmp);
    Ok(latencies)
}

/// Commits one outbox row per tick at `rate` per second (as the producer does: one transaction
/// with NOTIFY each) while the relay runs; returns commit → marked-E latencies (ms, sorted).
async fn relay_latency(
    relay: &Relay,
    args: &Args,
    content: Arc<String>,
    tag: &str,
) -> anyhow::Result<Vec<f64>> {
    // Warm up: the relay elected, its topic known, connections open.
    {
        let mut client = relay.db.pool.get().await?;
        let tx = client.transaction().await?;
        publish(
            &*tx,
            "warm-up",
            &serde_json::json!({}),
            &relay.topic,
            "warm-up",
        )
        .await?;
        tx.commit().await?;
        relay.wait_until_sent(Duration::from_millis(20)).await?;
    }
    // As many writers at once as the pool has connections: on a loaded machine the others wait
    // here (before their transaction, so outside the measured commit → sent latency) instead of
    // timing out in the pool.
    let slots = Arc::new(tokio::sync::Semaphore::new(relay.db.pool.status().max_size));
    let (writes, _) = open_loop(args.rate, args.duration, |i| {
        let (pool, content, topic) = (relay.db.pool.clone(), content.clone(), relay.topic.clone());
        let slots = slots.clone();
        let key = format!("{tag}-{}", i % 1000);
        let correlation_id = format!("req_{tag}_{i}");
        async move {
            let _slot = slots.acquire_owned().await?;
            let mut client = pool.get().await?;
            let tx = client.transaction().await?;
            let data = serde_json::json!({"content": *content});
            let id = publish(&*tx, &key, &data, &topic, &correlation_id).await?;
            tx.commit().await?;
            anyhow::Ok((id, Utc::now()))
        }
    })
    .await?;
    let committed_at = writes
        .into_iter()
        .collect::<anyhow::Result<HashMap<_, _>>>()?;
    relay.wait_until_sent(Duration::from_millis(50)).await?;
    // sent_at is taken by the statement that appends the row's sent fact, after Kafka acknowledged it; both
    // clocks are this machine's.
    let client = relay.db.client().await;
    let mut latencies: Vec<f64> = client
        .query(
            "select event_id, sent_at from outbox where aggregate_id like $1",
            &[&format!("{tag}-%")],
        )
        .await?
        .iter()
        .filter_map(|r| {
            let sent: DateTime<Utc> = r.get(1);
            let committed = committed_at.get(&r.get::<_, String>(0))?;
            Some((sent - *committed).num_microseconds()? as f64 / 1000.0)
        })
        .collect();
    anyhow::ensure!(
        latencies.len() == committed_at.len(),
        "every committed row was sent"
    );
    latencies.sort_by(f64::total_cmp);
    Ok(latencies)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let load = &args.workload;
    quiet_logging("warn");
    let brokers = outbox_core::testing::kafka_brokers();
    let filler = "x".repeat(
        load.payload_bytes
            .saturating_sub(envelope_like("evt_00000000", "").len()),
    );
    let size = envelope_like("evt_00000000", &filler).len();
    let content = Arc::new(filler);
    let latency_events = (args.rate as f64 * args.duration.as_secs_f64()) as u64;
    progress(&format!(
        "events of {size} bytes, {} keys, {} partitions",
        load.keys, load.partitions
    ));

    // 1. Raw produce: the same records, the same producer settings, no database.
    let raw_topic = unique_topic("bench-raw");
    kafka::ensure_topics(&brokers, std::slice::from_ref(&raw_topic), load.partitions)
        .await
        .map_err(anyhow::Error::msg)?;
    let producer: FutureProducer =
        kafka::idempotent_producer_config(&brokers, "bench-raw", Duration::from_secs(30))
            .create()?;
    // A broker just started runs interpreted Java for a while: warm it up so that neither side
    // of the comparison pays for the JIT.
    progress("warming the broker up (not measured)");
    raw_produce(&producer, &raw_topic, load.events, load.keys, |i| {
        envelope_like(&format!("evt_raw_{i}"), &content)
    })
    .await?;
    progress(&format!("raw produce of {} records", load.events));
    let raw_rate = raw_produce(&producer, &raw_topic, load.events, load.keys, |i| {
        envelope_like(&format!("evt_raw_{i}"), &content)
    })
    .await?;
    progress(&format!("raw produce: {raw_rate:.0} events/s"));
    progress(&format!("raw produce latency at {} events/s", args.rate));
    let raw_lat = raw_latency(&producer, &raw_topic, &args, content.clone()).await?;

    // 2. Steady-rate latency through the relay on a fresh outbox.
    progress(&format!(
        "relay latency at {} events/s on a fresh outbox",
        args.rate
    ));
    let fresh = start_relay(
        &args,
        &brokers,
        TestDb::create().await,
        unique_topic("bench-latency"),
    )
    .await?;
    let fresh_lat = relay_latency(&fresh, &args, content.clone(), "fresh").await?;
    fresh.stop().await;

    // 3. The database alone: the relay's own claim and mark statements on the same backlog,
    // with made-up partitions and offsets instead of Kafka.
    progress(&format!(
        "PostgreSQL alone: claim + mark of a backlog of {} rows, no Kafka",
        load.events
    ));
    let pg_rate = postgres_ceiling(&args, &content).await?;

    // 4. Drain of a backlog written beforehand.
    let db = TestDb::create().await;
    let topic = unique_topic("bench-drain");
    write_backlog(&db, &topic, &args, &content).await?;
    kafka::ensure_topics(&brokers, std::slice::from_ref(&topic), load.partitions)
        .await
        .map_err(anyhow::Error::msg)?;
    progress("starting the relay on the backlog");
    let started = Instant::now();
    let drained = start_relay(&args, &brokers, db, topic).await?;
    let mut last_report = Instant::now();
    let poll = drained.db.client().await;
    while any_unsent(&poll).await? {
        if last_report.elapsed() > Duration::from_secs(2) {
            let left = ids_left(&poll).await?;
            progress(&format!(
                "about {left} rows left, {:.0} events/s so far",
                (load.events - left) as f64 / started.elapsed().as_secs_f64()
            ));
            last_report = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let drain_secs = started.elapsed().as_secs_f64();
    let drain_rate = load.events as f64 / drain_secs;
    progress(&format!("relay drained {drain_rate:.0} events/s"));

    // 5. The same latency right after the drain (with the old, rewriting outbox, its indexes still
    // held the dead entries of every row just marked).
    progress("relay latency right after the drain");
    let after_lat = relay_latency(&drained, &args, content.clone(), "after").await?;
    drained.stop().await;

    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    println!();
    println!(
        "relay-bench: {} events of {size} bytes, {} partitions, {} keys, batch {}, {cores} cores; PostgreSQL and Kafka on this machine",
        load.events, load.partitions, load.keys, load.batch_size
    );
    println!();
    println!("| throughput                                     | events/s | share of raw |");
    println!("|------------------------------------------------|---------:|-------------:|");
    println!("| raw Kafka produce (idempotent, acks=all)       | {raw_rate:>8.0} |        100 % |");
    println!(
        "| PostgreSQL alone: claim + mark, no Kafka       | {pg_rate:>8.0} | {:>10.0} % |",
        100.0 * pg_rate / raw_rate
    );
    println!(
        "| relay: outbox backlog drained to Kafka         | {drain_rate:>8.0} | {:>10.0} % |",
        100.0 * drain_rate / raw_rate
    );
    println!();
    println!(
        "relay drain ÷ PostgreSQL alone: {:.0} %; ÷ the lower of the two limits: {:.0} %",
        100.0 * drain_rate / pg_rate,
        100.0 * drain_rate / pg_rate.min(raw_rate)
    );
    println!();
    println!("| latency at {:>5} events/s, {latency_events:>6} events          |  p50 ms |  p99 ms |  max ms |", args.rate);
    println!("|------------------------------------------------|--------:|--------:|--------:|");
    for (name, lat) in [
        ("raw Kafka produce → ack", &raw_lat),
        ("relay: commit → Kafka ack → marked E (fresh)", &fresh_lat),
        ("relay: the same right after the drain", &after_lat),
    ] {
        println!(
            "| {name:<46} | {:>7.1} | {:>7.1} | {:>7.1} |",
            percentile(lat, 0.5),
            percentile(lat, 0.99),
            percentile(lat, 1.0)
        );
    }
    Ok(())
}

/// One event through `outbox.publish`, as every publisher writes them.
async fn publish(
    tx: &impl tokio_postgres::GenericClient,
    key: &str,
    data: &serde_json::Value,
    topic: &str,
    correlation_id: &str,
) -> anyhow::Result<String> {
    Ok(outbox_core::outbox::publish(
        tx,
        &outbox_core::outbox::NewEvent {
            event_type: "message.created",
            key,
            data,
            topic: Some(topic),
            headers: None,
            correlation_id: Some(correlation_id),
            source: Some("bench"),
        },
    )
    .await?)
}
