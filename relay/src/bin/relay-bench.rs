//! relay-bench: how fast the relay drains a backlog into Kafka, and its commit-to-ack latency at a
//! steady rate, each next to the same broker's raw produce figures measured in the same run.
//!
//!   cargo run --release -p relay --features bench --bin relay-bench -- --events 200000
//!
//! Needs PostgreSQL and Kafka (scripts/stack.sh deps). Creates a fresh database and fresh topics.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use outbox_core::kafka;
use outbox_core::testing::{unique_topic, TestDb};
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "relay-bench",
    about = "Measure the relay against raw Kafka produce on this machine"
)]
struct Args {
    /// Backlog size for the drain measurement.
    #[arg(long, default_value_t = 200_000)]
    events: i64,
    /// Approximate size of each event's envelope, in bytes.
    #[arg(long, default_value_t = 1024)]
    payload_bytes: usize,
    /// Rows per relay batch.
    #[arg(long, default_value_t = 2000)]
    batch_size: i64,
    /// Offered rate for the latency measurement, events per second.
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    /// How long the latency measurement offers that rate.
    #[arg(long, default_value = "10s", value_parser = outbox_core::config::parse_duration)]
    duration: Duration,
    /// Partitions of the benchmark topics.
    #[arg(long, default_value_t = 6)]
    partitions: i32,
    /// Distinct aggregate keys.
    #[arg(long, default_value_t = 1000)]
    keys: i64,
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

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if std::env::var_os("RUST_LOG").is_none() {
        std::env::set_var("RUST_LOG", "warn");
    }
    outbox_core::telemetry::init_logging();
    let brokers = outbox_core::testing::kafka_brokers();
    let content: String = "x".repeat(
        args.payload_bytes
            .saturating_sub(envelope_like("evt_00000000", "").len()),
    );
    let sample = envelope_like("evt_00000000", &content);
    progress(&format!(
        "events of {} bytes, {} keys, {} partitions",
        sample.len(),
        args.keys,
        args.partitions
    ));

    // 1. Raw produce: the same records, the same producer settings, no database.
    let raw_topic = unique_topic("bench-raw");
    kafka::ensure_topics(&brokers, &[raw_topic.clone()], args.partitions)
        .await
        .map_err(anyhow::Error::msg)?;
    let producer: FutureProducer =
        kafka::idempotent_producer_config(&brokers, "bench-raw", Duration::from_secs(30))
            .create()?;
    progress(&format!("raw produce of {} records", args.events));
    let started = Instant::now();
    let mut futures = Vec::with_capacity(args.events as usize);
    for i in 0..args.events {
        let key = format!("key-{}", i % args.keys);
        let payload = envelope_like(&format!("evt_raw_{i}"), &content);
        let mut record = FutureRecord::to(&raw_topic).key(&key).payload(&payload);
        loop {
            match producer.send_result(record) {
                Ok(f) => {
                    futures.push(f);
                    break;
                }
                Err((_, back)) => {
                    record = back;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        }
    }
    for f in futures {
        f.await?.map_err(|(e, _)| e)?;
    }
    let raw_secs = started.elapsed().as_secs_f64();
    let raw_rate = args.events as f64 / raw_secs;
    progress(&format!("raw: {raw_rate:.0} events/s"));

    // 2. Relay drain of a backlog written beforehand.
    let db = TestDb::create().await;
    let topic = unique_topic("bench-relay");
    progress(&format!("writing a backlog of {} outbox rows", args.events));
    let client = db.client().await;
    client
        .execute(
            "insert into outbox (event_id, event_type, aggregate_id, topic, payload, headers)
             select 'evt_bench_' || g, 'message.created', 'key-' || (g % $3), $1,
                    json_build_object('id', 'evt_bench_' || g, 'event', 'message.created', 'version', '1.0',
                        'idempotency_key', 'message.created-bench-' || g, 'timestamp', '2026-11-23T10:30:45.123Z',
                        'data', json_build_object('content', $4::text),
                        'metadata', json_build_object('source', 'bench', 'environment', 'bench', 'correlation_id', 'req_bench')),
                    jsonb_build_object('event_id', 'evt_bench_' || g, 'event_type', 'message.created', 'correlation_id', 'req_bench')
               from generate_series(1, $2::bigint) g",
            &[&topic, &args.events, &args.keys, &content],
        )
        .await?;
    client.batch_execute("vacuum analyze outbox").await?;
    kafka::ensure_topics(&brokers, &[topic.clone()], args.partitions)
        .await
        .map_err(anyhow::Error::msg)?;

    let mut config: relay::Config = outbox_core::config::from_env()?;
    config.database.database_url = db.url.clone();
    config.kafka.kafka_brokers = brokers.clone();
    config.kafka_topic = topic.clone();
    config.batch_size = args.batch_size;
    config.poll_interval = Duration::from_millis(100);
    config.lock_key = 0x6265_6e63_68;
    let stop = CancellationToken::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    progress("starting the relay");
    let started = Instant::now();
    let relay = tokio::spawn(relay::run(config, listener, stop.clone()));
    let mut last_report = Instant::now();
    loop {
        let left: i64 = client
            .query_one("select count(*) from outbox where state in ('P', 'X')", &[])
            .await?
            .get(0);
        if left == 0 {
            break;
        }
        if last_report.elapsed() > Duration::from_secs(2) {
            progress(&format!(
                "{left} rows left, {:.0} events/s so far",
                (args.events - left) as f64 / started.elapsed().as_secs_f64()
            ));
            last_report = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let drain_secs = started.elapsed().as_secs_f64();
    let drain_rate = args.events as f64 / drain_secs;
    progress(&format!("relay: {drain_rate:.0} events/s"));

    // 3. Latency at a steady offered rate: commit of each outbox row → marked E after Kafka's ack.
    let total = (args.rate as f64 * args.duration.as_secs_f64()) as u64;
    progress(&format!(
        "offering {} events/s for {:?} ({total} events), one transaction each",
        args.rate, args.duration
    ));
    let pool = db.pool.clone();
    let content = Arc::new(content);
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / args.rate as f64));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut writers = Vec::with_capacity(total as usize);
    for i in 0..total {
        ticker.tick().await;
        let (pool, content, topic) = (pool.clone(), content.clone(), topic.clone());
        writers.push(tokio::spawn(async move {
            let mut client = pool.get().await?;
            let tx = client.transaction().await?;
            let envelope = outbox_core::envelope::Envelope::new(
                "message.created",
                &format!("lat-{}", i % 1000),
                serde_json::json!({"content": *content}),
                outbox_core::envelope::Metadata {
                    source: "bench".into(),
                    environment: "bench".into(),
                    correlation_id: format!("req_lat_{i}"),
                },
            );
            outbox_core::outbox::insert_event(&tx, &envelope, &format!("lat-{}", i % 1000), &topic)
                .await?;
            tx.commit().await?;
            anyhow::Ok(())
        }));
    }
    for w in writers {
        w.await??;
    }
    loop {
        let left: i64 = client
            .query_one("select count(*) from outbox where state in ('P', 'X')", &[])
            .await?
            .get(0);
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut relay_latencies: Vec<f64> = client
        .query(
            "select extract(epoch from sent_at - created_at)::float8 * 1000 from outbox
              where aggregate_id like 'lat-%'",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    relay_latencies.sort_by(f64::total_cmp);
    stop.cancel();
    let _ = relay.await;

    // 4. Raw produce→ack latency at the same offered rate.
    progress("raw produce latency at the same rate");
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / args.rate as f64));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut acks = Vec::with_capacity(total as usize);
    for i in 0..total {
        ticker.tick().await;
        let producer = producer.clone();
        let (raw_topic, content) = (raw_topic.clone(), content.clone());
        acks.push(tokio::spawn(async move {
            let payload = envelope_like(&format!("evt_rawlat_{i}"), &content);
            let key = format!("lat-{}", i % 1000);
            let sent = Instant::now();
            producer
                .send(
                    FutureRecord::to(&raw_topic).key(&key).payload(&payload),
                    Duration::from_secs(30),
                )
                .await
                .map_err(|(e, _)| e)?;
            anyhow::Ok(sent.elapsed().as_secs_f64() * 1000.0)
        }));
    }
    let mut raw_latencies = Vec::with_capacity(acks.len());
    for a in acks {
        raw_latencies.push(a.await??);
    }
    raw_latencies.sort_by(f64::total_cmp);

    println!();
    println!(
        "relay-bench: {} events of {} bytes, {} partitions, batch {}, this machine ({} cores)",
        args.events,
        sample.len(),
        args.partitions,
        args.batch_size,
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    println!();
    println!(
        "| measurement                                   | events/s | seconds | share of raw |"
    );
    println!(
        "|-----------------------------------------------|---------:|--------:|-------------:|"
    );
    println!("| raw Kafka produce (idempotent, acks=all)      | {raw_rate:>8.0} | {raw_secs:>7.2} |        100 % |");
    println!("| relay: outbox backlog drained to Kafka        | {drain_rate:>8.0} | {drain_secs:>7.2} | {:>10.0} % |", 100.0 * drain_rate / raw_rate);
    println!();
    println!(
        "| latency at {:>5} events/s ({} events)         |   p50 ms |  p99 ms |   max ms |",
        args.rate, total
    );
    println!("|-----------------------------------------------|---------:|--------:|---------:|");
    println!(
        "| raw Kafka produce → ack                       | {:>8.1} | {:>7.1} | {:>8.1} |",
        percentile(&raw_latencies, 0.5),
        percentile(&raw_latencies, 0.99),
        percentile(&raw_latencies, 1.0)
    );
    println!(
        "| relay: outbox commit → Kafka ack → marked E   | {:>8.1} | {:>7.1} | {:>8.1} |",
        percentile(&relay_latencies, 0.5),
        percentile(&relay_latencies, 0.99),
        percentile(&relay_latencies, 1.0)
    );
    Ok(())
}
