//! consumer-bench: signed, durably recorded webhook deliveries per second, next to the ceiling of
//! the receiver itself measured with `wrk` in the same run.
//!
//!   cargo run --release -p consumer --bin consumer-bench -- --events 50000
//!
//! It creates its own database and topic (like the tests), puts N envelopes into Kafka, starts a
//! receiver that answers 200 at once, measures that receiver with `wrk`, then starts the consumer
//! and waits until every delivery is recorded as succeeded.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use outbox_core::envelope::{Envelope, Metadata};
use outbox_core::testing::{self, TestDb};
use rdkafka::producer::FutureProducer;
use tokio_util::sync::CancellationToken;

/// Webhook delivery throughput of the consumer.
#[derive(Parser)]
#[command(name = "consumer-bench")]
struct Args {
    /// Events put into Kafka (one endpoint, so as many deliveries).
    #[arg(long, default_value_t = 50_000)]
    events: usize,
    /// Partitions of the benchmark topic.
    #[arg(long, default_value_t = 6)]
    partitions: i32,
    /// wrk connections when measuring the receiver's ceiling.
    #[arg(long, default_value_t = 64)]
    wrk_connections: u32,
    /// How long wrk measures.
    #[arg(long, default_value_t = 5)]
    wrk_seconds: u32,
}

fn progress(text: &str) {
    eprintln!("[consumer-bench] {text}");
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let n = args.events.max(1);

    progress("creating a database and a topic");
    let db = TestDb::create().await;
    let topic = testing::unique_topic("consumer-bench");
    testing::create_topic(&topic, args.partitions).await;

    let received = Arc::new(AtomicU64::new(0));
    let receiver_url = start_receiver(received.clone()).await?;
    progress(&format!("receiver answering 200 at once on {receiver_url}"));

    let ceiling = receiver_ceiling(&receiver_url, args.wrk_connections, args.wrk_seconds).await;

    let postgres = postgres_ceiling(n).await?;

    progress(&format!("putting {n} events into Kafka topic {topic}"));
    produce(&topic, n).await?;

    let client = db.client().await;
    let secret = outbox_core::signature::Secret::generate();
    client
        .execute(
            "insert into endpoints (id, url, event_types, secret) values ('bench', $1, '{*}', $2)",
            &[&receiver_url, &secret.as_str()],
        )
        .await?;

    let mut config: consumer::Config = outbox_core::config::from_env()?;
    config.database.database_url = db.url.clone();
    config.kafka.kafka_brokers = testing::kafka_brokers();
    config.consumer_topics = vec![topic.clone()];
    config.consumer_group = format!("bench-{}", uuid::Uuid::new_v4().simple());
    config.allow_private_endpoints = true;
    config.endpoints_file = None;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let shutdown = CancellationToken::new();
    progress("starting the consumer");
    let started = Instant::now();
    let task = tokio::spawn(consumer::run(config, listener, shutdown.clone()));

    let deadline = started + Duration::from_secs(600);
    let mut last_print = Instant::now();
    loop {
        let done: i64 = client
            .query_one(
                "select count(*) from deliveries where state = 'succeeded'",
                &[],
            )
            .await?
            .get(0);
        if done as usize >= n {
            break;
        }
        if last_print.elapsed() >= Duration::from_secs(2) {
            let inbox: i64 = client
                .query_one("select count(*) from inbox", &[])
                .await?
                .get(0);
            progress(&format!(
                "{:>6.1}s: {inbox} events recorded, {done} of {n} deliveries succeeded",
                started.elapsed().as_secs_f64()
            ));
            last_print = Instant::now();
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the benchmark did not finish in 10 minutes"
        );
        // Counting scans the table: not so often that it slows what it measures.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let wall = started.elapsed();
    shutdown.cancel();
    let _ = task.await;

    let row = client
        .query_one(
            "select extract(epoch from max(delivered_at) - min(delivered_at))::float8,
                    percentile_cont(0.5) within group (order by extract(epoch from delivered_at - i.received_at))::float8,
                    percentile_cont(0.99) within group (order by extract(epoch from delivered_at - i.received_at))::float8
               from deliveries d join inbox i using (event_id)
              where d.state = 'succeeded'",
            &[],
        )
        .await?;
    let span: f64 = row.get(0);
    let (e2e_p50, e2e_p99): (f64, f64) = (row.get(1), row.get(2));
    let row = client
        .query_one(
            "select percentile_cont(0.5) within group (order by latency_ms)::float8,
                    percentile_cont(0.99) within group (order by latency_ms)::float8,
                    count(*)
               from delivery_attempts",
            &[],
        )
        .await?;
    let (req_p50, req_p99, attempts): (f64, f64, i64) = (row.get(0), row.get(1), row.get(2));
    let overall = n as f64 / wall.as_secs_f64();
    let steady = if span > 0.0 { n as f64 / span } else { overall };

    println!();
    println!(
        "consumer-bench: {n} events, 1 endpoint, {} partitions, {} attempts recorded, {} requests received",
        args.partitions,
        attempts,
        received.load(Ordering::Relaxed)
    );
    println!("| measure | value |");
    println!("| --- | --- |");
    println!(
        "| deliveries/s, first to last success (signed, attempt + state committed) | {steady:.0} |"
    );
    println!(
        "| deliveries/s, whole run incl. start-up and group join ({:.1} s) | {overall:.0} |",
        wall.as_secs_f64()
    );
    match ceiling {
        Some(c) => {
            println!(
                "| receiver ceiling (wrk, {} connections, the same signed POST) | {c:.0} req/s |",
                args.wrk_connections
            );
            println!("| ratio deliveries/s ÷ ceiling | {:.2} |", steady / c);
        }
        None => println!("| receiver ceiling | not measured (wrk is not installed) |"),
    }
    println!(
        "| PostgreSQL alone: the consumer's record + result statements, no Kafka or HTTP | {postgres:.0} deliveries/s |"
    );
    println!(
        "| ratio deliveries/s ÷ PostgreSQL alone | {:.2} |",
        steady / postgres
    );
    if let Some(c) = ceiling {
        println!(
            "| ratio deliveries/s ÷ the lower of the two limits | {:.2} |",
            steady / c.min(postgres)
        );
    }
    println!("| webhook request latency p50 / p99 | {req_p50:.0} ms / {req_p99:.0} ms |");
    println!(
        "| inbox recorded → delivery recorded p50 / p99 (all {n} queued at once) | {:.2} s / {:.2} s |",
        e2e_p50, e2e_p99
    );
    db.drop_now().await;
    Ok(())
}

async fn start_receiver(received: Arc<AtomicU64>) -> anyhow::Result<String> {
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::any(move || {
            let received = received.clone();
            async move {
                received.fetch_add(1, Ordering::Relaxed);
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/hook", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(url)
}

/// Requests per second `wrk` gets from the receiver, or `None` when wrk is missing.
async fn receiver_ceiling(url: &str, connections: u32, seconds: u32) -> Option<f64> {
    let found = tokio::process::Command::new("wrk")
        .arg("--version")
        .output()
        .await
        .is_ok();
    if !found {
        progress(
            "wrk is not installed (apt-get install -y wrk); the receiver's ceiling is not measured",
        );
        return None;
    }
    // The same request the consumer sends: a POST of an envelope of the benchmark's size with
    // the Standard Webhooks headers, so the ceiling is not flattered by empty GETs.
    let secret = outbox_core::signature::Secret::generate();
    let body = serde_json::to_string(&envelope(0)).ok()?;
    let mut script = String::from("wrk.method = \"POST\"\n");
    script.push_str(&format!("wrk.body = {}\n", lua_string(&body)));
    script.push_str("wrk.headers[\"Content-Type\"] = \"application/json\"\n");
    for (name, value) in
        outbox_core::signature::sign_headers(&[&secret], "evt_x", 1, body.as_bytes())
    {
        script.push_str(&format!(
            "wrk.headers[{}] = {}\n",
            lua_string(name),
            lua_string(&value)
        ));
    }
    let script_path =
        std::env::temp_dir().join(format!("consumer-bench-{}.lua", std::process::id()));
    std::fs::write(&script_path, script).ok()?;
    progress(&format!(
        "measuring the receiver's ceiling: wrk -t2 -c{connections} -d{seconds}s -s {} {url} (POST, {} byte body, signed headers)",
        script_path.display(),
        body.len()
    ));
    let out = tokio::process::Command::new("wrk")
        .args([
            "-t2",
            &format!("-c{connections}"),
            &format!("-d{seconds}s"),
            "-s",
            &script_path.to_string_lossy(),
            url,
        ])
        .output()
        .await
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let rate = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok());
    if rate.is_none() {
        progress(&format!("could not read wrk's output:\n{text}"));
    }
    rate
}

async fn produce(topic: &str, n: usize) -> anyhow::Result<()> {
    let producer: FutureProducer =
        outbox_core::kafka::base_config(&testing::kafka_brokers(), "consumer-bench")
            .set("linger.ms", "5")
            .set("queue.buffering.max.messages", "1000000")
            .create()
            .context("Kafka producer")?;
    let started = Instant::now();
    for chunk_start in (0..n).step_by(10_000) {
        let sends = (chunk_start..(chunk_start + 10_000).min(n)).map(|i| {
            let e = envelope(i);
            let producer = producer.clone();
            let topic = topic.to_owned();
            async move {
                testing::produce_envelope(&producer, &topic, &e).await?;
                anyhow::Ok(())
            }
        });
        futures::future::try_join_all(sends).await?;
    }
    progress(&format!(
        "{n} events in Kafka after {:.1} s",
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}

/// The benchmark's event number `i`.
fn envelope(i: usize) -> Envelope {
    Envelope::new(
        "message.created",
        &format!("agg-{}", i % 1000),
        serde_json::json!({"n": i, "text": "benchmark message with a little body to sign"}),
        Metadata {
            source: "bench".into(),
            environment: "bench".into(),
            correlation_id: format!("req_bench_{i}"),
        },
    )
}

/// A Lua string literal.
fn lua_string(text: &str) -> String {
    format!("{text:?}")
}

/// Deliveries per second PostgreSQL records with the consumer's own statements and nothing else:
/// batches of events recorded with their deliveries leased (as ingest does), then recorded as
/// answered 200 (as a fast lane does), from as many concurrent tasks as the consumer runs.
async fn postgres_ceiling(n: usize) -> anyhow::Result<f64> {
    const BATCH: usize = 500;
    const TASKS: usize = 2;
    progress(&format!(
        "PostgreSQL alone: recording {n} events and their deliveries, {TASKS} tasks, batches of {BATCH}"
    ));
    let db = TestDb::create().await;
    db.client()
        .await
        .execute(
            "insert into endpoints (id, url, event_types, secret) values ('pg', 'http://127.0.0.1:9/', '{*}', $1)",
            &[&outbox_core::signature::Secret::generate().as_str()],
        )
        .await?;
    let mut config: consumer::Config = outbox_core::config::from_env()?;
    config.database.database_url = db.url.clone();
    let pool = outbox_core::db::pool(&db.url, TASKS * 2, consumer::SCHEMAS)?;
    let dispatcher = Arc::new(consumer::dispatch::Dispatcher::new(
        &config,
        pool.clone(),
        consumer::Metrics::new(),
        Arc::new(tokio::sync::Notify::new()),
    )?);
    let records: Vec<consumer::ingest::Incoming> = (0..n)
        .map(|i| consumer::ingest::Incoming {
            topic: "bench".into(),
            partition: (i % 6) as i32,
            offset: i as i64,
            payload: serde_json::to_vec(&envelope(i)).expect("envelope"),
            correlation_header: None,
            traceparent: None,
        })
        .collect();
    let records = Arc::new(records);
    let lease = config.delivery_lease;
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..TASKS {
        let (records, pool, dispatcher) = (records.clone(), pool.clone(), dispatcher.clone());
        tasks.spawn(async move {
            for chunk in records.chunks(BATCH).skip(task).step_by(TASKS) {
                let (_, leased) = consumer::ingest::record_batch(&pool, chunk, Some(lease)).await?;
                let leased = leased.context("deliveries were leased")?;
                dispatcher
                    .record_as_delivered(&leased.deliveries, leased.until)
                    .await?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    let succeeded: i64 = db
        .client()
        .await
        .query_one(
            "select count(*) from deliveries where state = 'succeeded'",
            &[],
        )
        .await?
        .get(0);
    anyhow::ensure!(
        succeeded as usize == n,
        "{succeeded} of {n} deliveries recorded"
    );
    progress(&format!("PostgreSQL alone recorded {rate:.0} deliveries/s"));
    drop((dispatcher, pool));
    db.drop_now().await;
    Ok(rate)
}
