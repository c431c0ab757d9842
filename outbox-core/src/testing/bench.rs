//! What the benchmark binaries share (relay-bench, debezium-bench, producer-bench, e2e-bench):
//! quiet logging, percentiles, the open-loop load, the raw produce ceiling and where results go.

use std::future::Future;
use std::path::Path;
use std::time::{Duration, Instant};

use rdkafka::producer::{FutureProducer, FutureRecord};

/// Logs only `level` and worse unless `RUST_LOG` says otherwise: a benchmark prints its own table.
pub fn quiet_logging(level: &str) {
    if std::env::var_os("RUST_LOG").is_none() {
        std::env::set_var("RUST_LOG", level);
    }
    crate::telemetry::init_logging();
}

/// The `p` quantile (0 to 1) of `sorted`, nearest rank; NaN when empty.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Offers `call(i)` `rate` times a second for `duration` (at least once), `i` counting from 0: an
/// open loop, each call a task of its own started on its tick whatever the earlier ones are doing
/// (a tick missed on a busy machine is caught up at once). Returns every call's output in the
/// order offered, and the rate achieved: calls per second from the first tick until the last
/// call returned.
pub async fn open_loop<T, Fut>(
    rate: u64,
    duration: Duration,
    mut call: impl FnMut(u64) -> Fut,
) -> anyhow::Result<(Vec<T>, f64)>
where
    Fut: Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let total = (rate as f64 * duration.as_secs_f64()).max(1.0) as u64;
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let started = Instant::now();
    let mut calls = Vec::with_capacity(total as usize);
    for i in 0..total {
        ticker.tick().await;
        calls.push(tokio::spawn(call(i)));
    }
    let mut outputs = Vec::with_capacity(calls.len());
    for call in calls {
        outputs.push(call.await?);
    }
    Ok((outputs, total as f64 / started.elapsed().as_secs_f64()))
}

/// Sends `count` records (`payload(i)`, keyed over `keys` keys) as fast as librdkafka takes them;
/// returns records per second until the last ack: the ceiling any relay is measured against.
pub async fn raw_produce(
    producer: &FutureProducer,
    topic: &str,
    count: i64,
    keys: i64,
    payload: impl Fn(i64) -> String,
) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut acks = Vec::with_capacity(count.max(0) as usize);
    for i in 0..count {
        let key = format!("key-{}", i % keys.max(1));
        let body = payload(i);
        let mut record = FutureRecord::to(topic).key(&key).payload(&body);
        loop {
            match producer.send_result(record) {
                Ok(ack) => {
                    acks.push(ack);
                    break;
                }
                // The local queue is full: wait for room rather than fail.
                Err((_, back)) => {
                    record = back;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        }
    }
    for ack in acks {
        ack.await?.map_err(|(e, _)| e)?;
    }
    Ok(count as f64 / started.elapsed().as_secs_f64())
}

/// Writes `result` as `results.json` into `out` (created when missing), or prints it.
pub fn write_results(out: Option<&Path>, result: &serde_json::Value) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(result)?;
    match out {
        Some(dir) => {
            std::fs::create_dir_all(dir)?;
            std::fs::write(dir.join("results.json"), text)?;
        }
        None => println!("{text}"),
    }
    Ok(())
}
