//! e2e-bench: `POST /messages` at the producer until the webhook is stored by the notifier, at
//! steady offered rates (open loop: one request per tick, whatever the earlier ones are doing).
//!
//!   scripts/bench.sh e2e --rates 500,2000 --duration 10s
//!
//! The four services run in this process on a database and a topic of their own, as the e2e
//! tests start them (tests/support). Latency = the notifier's `received_at` minus the moment the
//! request was sent; one machine, one clock. Every accepted event must arrive once.

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use clap::Parser;
use outbox_core::testing::bench::{open_loop, percentile, quiet_logging, write_results};
use serde_json::{json, Value};

/// POST /messages → webhook at the notifier, latency at offered rates.
#[derive(Parser)]
#[command(name = "e2e-bench")]
struct Args {
    /// Offered rates, requests per second, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "500,2000")]
    rates: Vec<u64>,
    /// How long each rate is offered.
    #[arg(long, default_value = "10s", value_parser = outbox_core::config::parse_duration)]
    duration: Duration,
    /// Size of each message's content, in bytes.
    #[arg(long, default_value_t = 512)]
    content_bytes: usize,
    /// How long to wait for every accepted event to reach the notifier.
    #[arg(long, default_value = "120s", value_parser = outbox_core::config::parse_duration)]
    timeout: Duration,
    /// Where results.json goes (scripts/bench-report.py turns it into a table and plots).
    #[arg(long)]
    out: Option<PathBuf>,
}

fn progress(text: &str) {
    eprintln!("[e2e-bench] {text}");
}

/// When each of `ids` was stored by the notifier.
async fn received_at(
    stack: &support::Stack,
    ids: &[String],
) -> HashMap<String, (i64, DateTime<Utc>)> {
    let client = stack.db.client().await;
    client
        .query(
            "select payload->>'id', count(*), min(received_at) from notifier.received_events
              where payload->>'id' = any($1) group by 1",
            &[&ids],
        )
        .await
        .expect("received_events")
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect()
}

/// Offers `rate` requests/s for `duration`; returns the result row and the delivery count.
async fn measure(
    stack: &Arc<support::Stack>,
    args: &Args,
    rate: u64,
    content: &str,
) -> (Value, Value) {
    progress(&format!(
        "offering {rate} requests/s for {:?}",
        args.duration
    ));
    let (requests, achieved) = open_loop(rate, args.duration, |i| {
        let (stack, content) = (stack.clone(), format!("{content} {rate}-{i}"));
        async move {
            let sent = Utc::now();
            stack
                .post(content, &format!("req_bench_{rate}_{i}"))
                .await
                .map(|id| (id, sent))
        }
    })
    .await
    .expect("request task");
    let total = requests.len() as u64;
    let sent_at: HashMap<String, DateTime<Utc>> = requests.into_iter().flatten().collect();
    let refused = total - sent_at.len() as u64;
    let ids: Vec<String> = sent_at.keys().cloned().collect();
    let deadline = Instant::now() + args.timeout;
    let mut got = received_at(stack, &ids).await;
    while got.len() < ids.len() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        got = received_at(stack, &ids).await;
    }
    let mut lat: Vec<f64> = got
        .iter()
        .filter_map(|(id, (_, at))| {
            Some((*at - sent_at.get(id)?).num_microseconds()? as f64 / 1000.0)
        })
        .collect();
    lat.sort_by(f64::total_cmp);
    progress(&format!(
        "{rate}/s (achieved {achieved:.0}/s, {refused} not accepted): {} of {} received, p50 {:.1} ms, p99 {:.1} ms",
        got.len(),
        ids.len(),
        percentile(&lat, 0.5),
        percentile(&lat, 0.99)
    ));
    let duplicates: i64 = got.values().map(|(n, _)| n - 1).sum();
    let row = json!({"system": "POST /messages → notifier", "offered": rate, "achieved": achieved.round(),
                     "events": ids.len(), "failed_writes": refused, "p50": percentile(&lat, 0.5),
                     "p99": percentile(&lat, 0.99), "max": percentile(&lat, 1.0)});
    let count = json!({"what": format!("at {rate}/s"), "expected": ids.len(), "unique": got.len(),
                       "duplicates": duplicates, "missing": ids.len() - got.len(), "unexpected": 0,
                       "mean_bytes": null});
    (row, count)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    quiet_logging("error");
    let brokers = outbox_core::testing::kafka_brokers();
    progress("starting producer, relay, consumer and notifier on a fresh database");
    let stack = Arc::new(support::Stack::start(&brokers).await);
    stack.consumer.wait_ready().await;
    let content = "x".repeat(args.content_bytes);
    // Warm-up: the relay elected, the consumer assigned, every connection open.
    let warm: Vec<String> = {
        let mut ids = Vec::new();
        for i in 0..20 {
            ids.extend(stack.post(format!("warm-up {i}"), "req_warm").await);
        }
        ids
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while received_at(&stack, &warm).await.len() < warm.len() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut rows = Vec::new();
    let mut counts = Vec::new();
    for &rate in &args.rates {
        let (row, count) = measure(&stack, &args, rate, &content).await;
        rows.push(row);
        counts.push(count);
    }
    let p99_500 = rows
        .iter()
        .find(|r| r["offered"] == 500)
        .and_then(|r| r["p99"].as_f64());
    let mut goals = Vec::new();
    if let Some(p) = p99_500 {
        goals.push(json!({"goal": "p99 < 100 ms at 500 events/s", "met": p < 100.0, "measured": format!("{p:.1} ms")}));
    }
    goals.push(json!({"goal": "every accepted event received once", "met": counts.iter().all(|c| c["missing"] == 0 && c["duplicates"] == 0), "measured": ""}));
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let result = json!({
        "section": "e2e",
        "title": format!("end to end: POST /messages → signed webhook stored by the notifier, content {} B", args.content_bytes),
        "cores": cores,
        "latency_title": "POST sent → notifier received_at",
        "latency": rows,
        "counts": counts,
        "goals": goals,
    });
    write_results(args.out.as_deref(), &result)?;
    // The services stop with the process (their handles cancel on drop).
    Ok(())
}
