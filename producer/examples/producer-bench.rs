//! producer-bench: `POST /messages` per second with wrk, next to pgbench running the producer's
//! own transaction (scripts/bench/producer-transaction.sql) with as many connections as the
//! producer's pool has: the ceiling PostgreSQL sets for what the producer does per request.
//!
//!   scripts/bench.sh producer --duration 15s --connections 32
//!
//! Each side gets a fresh database of its own; the producer runs in this process. Every 201 must
//! have left one message row with its outbox event.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use outbox_core::testing::bench::{quiet_logging, write_results};
use outbox_core::testing::TestDb;
use serde_json::json;
use tokio_util::sync::CancellationToken;

/// POST /messages throughput next to pgbench of its transaction.
#[derive(Parser, Clone)]
#[command(name = "producer-bench")]
struct Args {
    /// How long wrk and pgbench each run.
    #[arg(long, default_value = "15s", value_parser = outbox_core::config::parse_duration)]
    duration: Duration,
    /// wrk's connections.
    #[arg(long, default_value_t = 32)]
    connections: u32,
    /// Size of each message's content, in bytes.
    #[arg(long, default_value_t = 512)]
    content_bytes: usize,
    /// The folder with producer-transaction.sql and unique-messages.lua.
    #[arg(long, default_value = "scripts/bench")]
    scripts: PathBuf,
    /// Where results.json goes (scripts/bench-report.py turns it into a table and plots).
    #[arg(long)]
    out: Option<PathBuf>,
}

fn progress(text: &str) {
    eprintln!("[producer-bench] {text}");
}

/// `key=value` fields of the line starting with `prefix`.
fn fields<'a>(output: &'a str, prefix: &str) -> Vec<(&'a str, &'a str)> {
    output
        .lines()
        .find(|l| l.starts_with(prefix))
        .map(|l| {
            l.split_whitespace()
                .filter_map(|f| f.split_once('='))
                .collect()
        })
        .unwrap_or_default()
}

fn field(fields: &[(&str, &str)], name: &str) -> f64 {
    fields
        .iter()
        .find(|(k, _)| *k == name)
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(f64::NAN)
}

/// What wrk measured.
struct Wrk {
    /// Requests answered 201, and per second.
    created: i64,
    rate: f64,
    p50: f64,
    p99: f64,
    /// Requests answered anything else.
    other: i64,
}

/// What `command` (the tool `tool`, in the Debian package `package`) writes to its standard
/// output; an error with both outputs when it fails.
fn stdout_of(mut command: Command, tool: &str, package: &str) -> anyhow::Result<String> {
    let output = command
        .output()
        .with_context(|| format!("{tool} (Debian: {package})"))?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    anyhow::ensure!(
        output.status.success(),
        "{tool} failed: {text}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(text)
}

fn run_wrk(url: &str, args: &Args, filler: &str, duration: Duration) -> anyhow::Result<Wrk> {
    let mut wrk = Command::new("wrk");
    wrk.args([
        "-t2",
        &format!("-c{}", args.connections),
        &format!("-d{}s", duration.as_secs().max(1)),
    ])
    .arg("-s")
    .arg(args.scripts.join("unique-messages.lua"))
    .arg(url)
    .env("FILLER", filler);
    let text = stdout_of(wrk, "wrk", "wrk")?;
    let f = fields(&text, "wrk-result");
    let (requests, failed, secs) = (
        field(&f, "requests"),
        field(&f, "non201"),
        field(&f, "seconds"),
    );
    anyhow::ensure!(requests.is_finite(), "no result line from wrk: {text}");
    Ok(Wrk {
        created: (requests - failed) as i64,
        rate: (requests - failed) / secs,
        p50: field(&f, "p50_ms"),
        p99: field(&f, "p99_ms"),
        other: failed as i64,
    })
}

/// pgbench of the producer's transaction with `clients` connections; transactions/s.
fn run_pgbench(db: &TestDb, args: &Args, clients: usize, filler: &str) -> anyhow::Result<f64> {
    let mut pgbench = Command::new("pgbench");
    pgbench
        .args(["-n", "-M", "prepared", "-j", "2"])
        .args([
            "-c",
            &clients.to_string(),
            "-T",
            &args.duration.as_secs().max(1).to_string(),
        ])
        .args(["-D", &format!("filler={filler}")])
        .arg("-f")
        .arg(args.scripts.join("producer-transaction.sql"))
        .arg(&db.url)
        // outbox.publish writes this into metadata.environment, as the producer's pool sets it.
        .env("PGOPTIONS", "-c outbox.environment=bench");
    let text = stdout_of(pgbench, "pgbench", "postgresql-contrib")?;
    text.lines()
        .find_map(|l| {
            l.strip_prefix("tps = ")?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .with_context(|| format!("no tps in pgbench's output: {text}"))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    quiet_logging("error");
    let filler = "x".repeat(args.content_bytes);

    let db = TestDb::create().await;
    let mut config: producer::Config = outbox_core::config::from_env()?;
    config.database.database_url = db.url.clone();
    config.admin_token = None;
    let pool_size = config.database.database_pool_size;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let stop = CancellationToken::new();
    let server = tokio::spawn(producer::run(config, listener, stop.clone()));
    outbox_core::testing::eventually("the producer is ready", Duration::from_secs(30), || async {
        reqwest::get(format!("{url}/ready"))
            .await
            .ok()
            .filter(|r| r.status() == 200)
    })
    .await;
    progress(&format!(
        "producer on {url} (pool of {pool_size}); wrk warm-up, 3 s"
    ));
    let (u, a, f) = (url.clone(), args.clone(), filler.clone());
    tokio::task::spawn_blocking(move || run_wrk(&u, &a, &f, Duration::from_secs(3))).await??;
    let before = db.count("select count(*) from producer.messages").await;
    progress(&format!(
        "wrk: {} connections for {:?}",
        args.connections, args.duration
    ));
    let (u, a, f) = (url.clone(), args.clone(), filler.clone());
    let wrk = tokio::task::spawn_blocking(move || run_wrk(&u, &a, &f, a.duration)).await?;
    let Wrk {
        created,
        rate: http_rate,
        p50,
        p99,
        other,
    } = wrk?;
    let written = db.count("select count(*) from producer.messages").await - before;
    stop.cancel();
    let _ = server.await;
    progress(&format!("producer: {http_rate:.0} requests/s answered 201 (p50 {p50:.1} ms, p99 {p99:.1} ms), {written} messages written, {other} other answers"));

    let bench_db = TestDb::create().await;
    progress(&format!(
        "pgbench: the producer's transaction, {pool_size} clients for {:?}",
        args.duration
    ));
    let (a, f) = (args.clone(), filler.clone());
    let tps =
        tokio::task::spawn_blocking(move || run_pgbench(&bench_db, &a, pool_size, &f)).await?;
    let tps = tps?;
    progress(&format!("pgbench: {tps:.0} transactions/s"));

    let share = 100.0 * http_rate / tps;
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let result = json!({
        "section": "producer",
        "title": format!("producer: POST /messages (content {} B, wrk -c{}) next to pgbench of its transaction (-c{pool_size})",
                         args.content_bytes, args.connections),
        "cores": cores,
        "unit": "per second",
        "throughput": [
            {"name": "pgbench: the producer's transaction", "value": tps.round()},
            {"name": "producer: POST /messages answered 201", "value": http_rate.round()},
        ],
        "ratios": [
            {"name": "producer ÷ pgbench", "value": format!("{share:.0} %")},
            {"name": "wrk latency p50 / p99 (closed loop)", "value": format!("{p50:.1} ms / {p99:.1} ms")},
        ],
        "counts": [{"what": "201s counted by wrk → message rows (rows also of requests in flight when wrk stopped, at most --connections)", "expected": created,
                    "unique": written, "duplicates": 0, "missing": created - written.min(created), "unexpected": (written - created).max(0), "mean_bytes": null}],
        "goals": [{"goal": "producer ≥ 80 % of pgbench running its transaction", "met": share >= 80.0,
                   "measured": format!("{share:.0} %")}],
    });
    write_results(args.out.as_deref(), &result)?;
    Ok(())
}
