//! e2e-bench: `POST /messages` at the producer until the webhook is stored by the notifier, at
//! steady offered rates (open loop: one request per tick, whatever the earlier ones are doing).
//!
//!   scripts/bench.sh e2e --rates 500,2000 --duration 10s
//!
//! The four services run in this process on a database and a topic of their own, as the e2e
//! tests start them (tests/support), but polling and reporting at their deployed intervals.
//! Latency = the notifier's `received_at` minus the moment the request was sent; one machine, one
//! clock. Every accepted event must arrive once.

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
    /// How long each rate is offered before `--duration` starts: its events are counted back like
    /// the others, but left out of p50, p99, max and the stages (the table still shows the p99
    /// with them), as in debezium-bench.
    #[arg(long, default_value = "2s", value_parser = outbox_core::config::parse_duration)]
    warm_up: Duration,
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

/// The hops an event makes, each timed between two stamps the pipeline writes anyway (one
/// machine, one clock): PostgreSQL's `now()` is the start of the writing transaction, the Kafka
/// record's timestamp is when the relay handed it to its producer client.
const STAGES: &[&str] = &[
    "request → producer transaction",
    "producer transaction → relay sends (commit, wake, claim)",
    "relay sends → consumer recorded (Kafka ack, fetch)",
    "consumer recorded → attempt started (commit, hand-off)",
    "attempt started → notifier received (HTTP)",
];

/// For each of `ids` that reached the notifier: the stamps that end the stages of [`STAGES`].
async fn stamps(
    stack: &support::Stack,
    ids: &[String],
    produced: &HashMap<String, DateTime<Utc>>,
) -> HashMap<String, [DateTime<Utc>; 5]> {
    let client = stack.db.client().await;
    client
        .query(
            "with attempted as (
                 select d.event_id, min(a.attempted_at) as at from webhooks.deliveries d
                   join webhooks.delivery_attempts a on a.delivery_id = d.id
                  where d.event_id = any($1) group by 1),
             received as (
                 select webhook_id, min(received_at) as at from notifier.received_events
                  where webhook_id = any($1) group by 1)
             select e.event_id, e.created_at, i.received_at, a.at, r.at
               from outbox.events e
               join webhooks.inbox i on i.event_id = e.event_id
               join attempted a on a.event_id = e.event_id
               join received r on r.webhook_id = e.event_id
              where e.event_id = any($1)",
            &[&ids],
        )
        .await
        .expect("stage stamps")
        .iter()
        .filter_map(|r| {
            let id: String = r.get(0);
            let at = |i| r.get::<_, DateTime<Utc>>(i);
            let kafka = *produced.get(&id)?;
            Some((id, [at(1), kafka, at(2), at(3), at(4)]))
        })
        .collect()
}

/// When the relay handed each event of the topic to Kafka (the record timestamps), by event id.
async fn produced_at(stack: &support::Stack) -> HashMap<String, DateTime<Utc>> {
    // Every event published so far (warm-up and earlier rates too): the topic is read whole.
    let expected = stack.db.count("select count(*) from outbox.events").await as usize;
    let records = outbox_core::testing::read_topic_from(
        &stack.brokers,
        &stack.topic,
        expected,
        Duration::from_secs(30),
    )
    .await;
    records
        .iter()
        .filter_map(|r| {
            let id = r.header(outbox_core::envelope::HEADER_EVENT_ID)?;
            Some((
                id.to_owned(),
                DateTime::from_timestamp_millis(r.timestamp_ms?)?,
            ))
        })
        .collect()
}

/// Beside the chain: from the producer's transaction to its answer (the commit and the response),
/// which runs while the relay already reads the event.
const ANSWERED: &str = "(beside) producer transaction → POST answered (commit, response)";

/// p50/p99/max of each stage of [`STAGES`], then of [`ANSWERED`], in ms, from the request's send
/// and answer times and the stamps.
fn stage_rows(
    rate: u64,
    requests: &HashMap<String, (DateTime<Utc>, DateTime<Utc>)>,
    stamps: &HashMap<String, [DateTime<Utc>; 5]>,
) -> Vec<Value> {
    let ms = |d: chrono::Duration| d.num_microseconds().unwrap_or(0) as f64 / 1000.0;
    let row = |stage: &str, mut lat: Vec<f64>| {
        lat.sort_by(f64::total_cmp);
        json!({"offered": rate, "stage": stage, "events": lat.len(),
               "p50": percentile(&lat, 0.5), "p99": percentile(&lat, 0.99),
               "max": percentile(&lat, 1.0)})
    };
    let mut rows: Vec<Value> = (0..STAGES.len())
        .map(|stage| {
            let lat = stamps
                .iter()
                .filter_map(|(id, at)| {
                    let from = if stage == 0 {
                        requests.get(id)?.0
                    } else {
                        at[stage - 1]
                    };
                    Some(ms(at[stage] - from))
                })
                .collect();
            row(STAGES[stage], lat)
        })
        .collect();
    let answered = stamps
        .iter()
        .filter_map(|(id, at)| Some(ms(requests.get(id)?.1 - at[0])))
        .collect();
    rows.push(row(ANSWERED, answered));
    rows
}

/// Offers `rate` requests/s for `duration`; returns the result row, the delivery count and the
/// stages' rows.
async fn measure(
    stack: &Arc<support::Stack>,
    args: &Args,
    rate: u64,
    content: &str,
) -> (Value, Value, Vec<Value>) {
    progress(&format!(
        "offering {rate} requests/s ({:?} warm-up, then {:?} measured)",
        args.warm_up, args.duration
    ));
    // The first moments of a rate are slow for reasons of their own (connections opened as the
    // load grows, the consumer's first fetches at that pace); what is compared is the steady
    // state after them.
    let warming = (rate as f64 * args.warm_up.as_secs_f64()) as u64;
    let (requests, achieved) = open_loop(rate, args.warm_up + args.duration, |i| {
        let (stack, content) = (stack.clone(), format!("{content} {rate}-{i}"));
        async move {
            let sent = Utc::now();
            stack
                .post(content, &format!("req_bench_{rate}_{i}"))
                .await
                .map(|id| (id, (sent, Utc::now()), i < warming))
        }
    })
    .await
    .expect("request task");
    let total = requests.len() as u64;
    // Event id → (request sent, answered), of every accepted request, and of the measured ones.
    let mut all: HashMap<String, (DateTime<Utc>, DateTime<Utc>)> = HashMap::new();
    let mut sent_at: HashMap<String, (DateTime<Utc>, DateTime<Utc>)> = HashMap::new();
    for (id, times, warming) in requests.into_iter().flatten() {
        if !warming {
            sent_at.insert(id.clone(), times);
        }
        all.insert(id, times);
    }
    let refused = total - all.len() as u64;
    let ids: Vec<String> = all.keys().cloned().collect();
    let deadline = Instant::now() + args.timeout;
    let mut got = received_at(stack, &ids).await;
    while got.len() < ids.len() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        got = received_at(stack, &ids).await;
    }
    let latencies = |sent: &HashMap<String, (DateTime<Utc>, DateTime<Utc>)>| {
        let mut lat: Vec<f64> = got
            .iter()
            .filter_map(|(id, (_, at))| {
                Some((*at - sent.get(id)?.0).num_microseconds()? as f64 / 1000.0)
            })
            .collect();
        lat.sort_by(f64::total_cmp);
        lat
    };
    let lat = latencies(&sent_at);
    let with_warm_up = latencies(&all);
    progress(&format!(
        "{rate}/s (achieved {achieved:.0}/s, {refused} not accepted): {} of {} received, measured {}: p50 {:.1} ms, p99 {:.1} ms",
        got.len(),
        ids.len(),
        sent_at.len(),
        percentile(&lat, 0.5),
        percentile(&lat, 0.99)
    ));
    let produced = produced_at(stack).await;
    let measured: Vec<String> = sent_at.keys().cloned().collect();
    let stages = stage_rows(rate, &sent_at, &stamps(stack, &measured, &produced).await);
    for s in &stages {
        progress(&format!(
            "  {:<66} p50 {:>7.1} ms  p99 {:>7.1} ms  max {:>7.1} ms",
            s["stage"].as_str().unwrap_or(""),
            s["p50"].as_f64().unwrap_or(f64::NAN),
            s["p99"].as_f64().unwrap_or(f64::NAN),
            s["max"].as_f64().unwrap_or(f64::NAN)
        ));
    }
    let duplicates: i64 = got.values().map(|(n, _)| n - 1).sum();
    let row = json!({"system": "POST /messages → notifier", "offered": rate, "achieved": achieved.round(),
                     "events": sent_at.len(), "warm_up_events": all.len() - sent_at.len(),
                     "failed_writes": refused, "p50": percentile(&lat, 0.5),
                     "p99": percentile(&lat, 0.99), "max": percentile(&lat, 1.0),
                     "p99_with_warm_up": percentile(&with_warm_up, 0.99)});
    let count = json!({"what": format!("at {rate}/s"), "expected": ids.len(), "unique": got.len(),
                       "duplicates": duplicates, "missing": ids.len() - got.len(), "unexpected": 0,
                       "mean_bytes": null});
    (row, count, stages)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    quiet_logging("error");
    let brokers = outbox_core::testing::kafka_brokers();
    progress("starting producer, relay, consumer and notifier on a fresh database");
    let stack = Arc::new(support::Stack::start_timed(&brokers, support::Timings::Deployed).await);
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
    let mut stages = Vec::new();
    for &rate in &args.rates {
        let (row, count, stage) = measure(&stack, &args, rate, &content).await;
        rows.push(row);
        counts.push(count);
        stages.extend(stage);
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
        "stages": stages,
        "goals": goals,
    });
    write_results(args.out.as_deref(), &result)?;
    if let Some(mut stack) = Arc::into_inner(stack) {
        stack.stop().await;
        stack.db.clone().drop_now().await;
    }
    Ok(())
}
