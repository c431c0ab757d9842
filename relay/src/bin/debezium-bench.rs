//! debezium-bench: the relay next to Debezium's PostgreSQL connector with the Outbox Event Router,
//! on the same PostgreSQL and the same broker, in one run: drain of a backlog of N events (after a
//! warm-up drain of as many), commit-to-record latency at offered rates, and the raw produce
//! ceiling. Every event is read back from Kafka and counted, so a fast wrong answer cannot win.
//!
//!   scripts/bench.sh debezium --events 200000      (starts Kafka Connect, then runs this)
//!
//! Needs a Kafka Connect worker with the Debezium PostgreSQL connector on its plugin path
//! (`--connect-url`) and `wal_level = logical`. Creates its own database, topics, publication and
//! replication slot, and drops the connector and the slot at the end.
//!
//! Both systems are timed by Kafka itself: the bench topics stamp each record with the broker's
//! append time (`message.timestamp.type=LogAppendTime`), compared with the writer's clock after
//! its commit returned (one machine, one clock). Each rate is offered for `--warm-up` before its
//! `--duration` is measured; the warm-up's events are counted back too, and the p99 with them is
//! reported beside the measured one, with a timeline of the whole run (`timeline` in
//! results.json, `timeline.png`).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::Utc;
use clap::Parser;
use outbox_core::kafka;
use outbox_core::testing::bench::{
    open_loop, percentile, quiet_logging, raw_produce, write_results,
};
use outbox_core::testing::{unique_topic, TestDb};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::FutureProducer;
use rdkafka::{Message, Offset, TopicPartitionList};
use relay::bench::{Child, Workload};
use serde_json::{json, Value};

/// The relay next to Debezium's outbox connector, on the same PostgreSQL and Kafka.
#[derive(Parser, Clone)]
#[command(name = "debezium-bench")]
struct Args {
    #[command(flatten)]
    workload: Workload,
    /// Offered rates of the latency measurements, events per second, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "500,1000,2000,10000")]
    rates: Vec<u64>,
    /// How long each latency measurement offers its rate.
    #[arg(long, default_value = "10s", value_parser = outbox_core::config::parse_duration)]
    duration: Duration,
    /// How long each latency measurement offers its rate before `--duration` starts: its events
    /// are counted back like the others, but left out of p50, p99 and max (the table still shows
    /// the p99 with them, and timeline.png the whole run).
    #[arg(long, default_value = "2s", value_parser = outbox_core::config::parse_duration)]
    warm_up: Duration,
    /// The Kafka Connect worker's REST API.
    #[arg(long, default_value = "http://127.0.0.1:18089")]
    connect_url: String,
    /// How long to wait for every event of one measurement to arrive in Kafka.
    #[arg(long, default_value = "300s", value_parser = outbox_core::config::parse_duration)]
    timeout: Duration,
    /// Where results.json goes (scripts/bench-report.py turns it into a table and plots).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Measures the relay alone, without Kafka Connect: a quick look at a change of the relay
    /// (the goals against Debezium are then not judged).
    #[arg(long)]
    relay_only: bool,
}

fn progress(text: &str) {
    eprintln!("[debezium-bench] {text}");
}

/// The table Debezium's Outbox Event Router reads (its default column names).
const DEBEZIUM_TABLE: &str = "create table public.debezium_outbox (
        id uuid primary key,
        aggregatetype text not null,
        aggregateid text not null,
        type text not null,
        payload jsonb not null)";

/// An envelope like the relay's (`outbox.publish` builds those), for Debezium's rows. `$1` is the
/// event id, `$2` the content.
const ENVELOPE_SQL: &str = "json_build_object('id', {id}, 'event', 'message.created', 'version', '1.0',
        'idempotency_key', 'message.created-bench-' || {id}, 'timestamp', to_char(now() at time zone 'utc', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'),
        'data', json_build_object('content', {content}::text),
        'metadata', json_build_object('source', 'bench', 'environment', 'bench', 'correlation_id', 'req_bench'))::jsonb";

fn envelope_sql(id: &str, content: &str) -> String {
    ENVELOPE_SQL
        .replace("{id}", id)
        .replace("{content}", content)
}

/// Rows per transaction when a backlog is written (both systems alike).
const BACKLOG_CHUNK: i64 = 10_000;

/// Every topic this run created, deleted at its end (a 200,000-event run writes GBs).
static TOPICS: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// Creates a topic whose records carry the broker's append time.
async fn create_timed_topic(brokers: &str, topic: &str, partitions: i32) -> anyhow::Result<()> {
    TOPICS.lock().unwrap().push(topic.to_owned());
    let admin: AdminClient<DefaultClientContext> =
        kafka::base_config(brokers, "bench-admin").create()?;
    let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(1))
        .set("message.timestamp.type", "LogAppendTime");
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    for result in admin.create_topics(&[new], &options).await? {
        result.map_err(|(t, e)| anyhow::anyhow!("cannot create topic {t}: {e}"))?;
    }
    Ok(())
}

/// What came back from a topic: each event id with how often it came and where it came first.
#[derive(Default)]
struct Readback {
    seen: HashMap<String, Seen>,
    records: u64,
    bytes: u64,
}

/// One event id's records in a topic.
#[derive(Clone, Copy)]
struct Seen {
    times: u32,
    /// The first record's append time, ms since the epoch, its partition and offset.
    append_ms: i64,
    partition: i32,
    offset: i64,
}

/// Reads a topic from the beginning, one partition list, as far as its high watermarks.
struct Reader {
    consumer: BaseConsumer,
    topic: String,
    partitions: i32,
    next: Vec<i64>,
    got: Readback,
}

impl Reader {
    fn new(brokers: &str, topic: &str, partitions: i32) -> anyhow::Result<Reader> {
        let consumer: BaseConsumer = kafka::base_config(brokers, "bench-reader")
            .set("group.id", format!("bench-reader-{}", uuid::Uuid::new_v4()))
            .set("enable.auto.commit", "false")
            .set("fetch.max.bytes", "52428800")
            .create()?;
        let mut list = TopicPartitionList::new();
        for p in 0..partitions {
            list.add_partition_offset(topic, p, Offset::Beginning)?;
        }
        consumer.assign(&list)?;
        Ok(Reader {
            consumer,
            topic: topic.to_owned(),
            partitions,
            next: vec![0; partitions as usize],
            got: Readback::default(),
        })
    }

    fn high_watermarks(&self) -> anyhow::Result<Vec<i64>> {
        (0..self.partitions)
            .map(|p| {
                Ok(self
                    .consumer
                    .fetch_watermarks(&self.topic, p, Duration::from_secs(10))?
                    .1)
            })
            .collect()
    }

    /// Reads every record up to the high watermarks as they are now; returns the records there.
    fn catch_up(&mut self) -> anyhow::Result<i64> {
        let high = self.high_watermarks()?;
        while self.next.iter().zip(&high).any(|(n, h)| n < h) {
            let Some(m) = self.consumer.poll(Duration::from_secs(5)) else {
                continue;
            };
            let m = m?;
            self.next[m.partition() as usize] = m.offset() + 1;
            let payload = m.payload().unwrap_or_default();
            self.got.records += 1;
            self.got.bytes += payload.len() as u64;
            let id = serde_json::from_slice::<Value>(payload)
                .ok()
                .and_then(|v| v.get("id")?.as_str().map(str::to_owned))
                .unwrap_or_default();
            let at = m.timestamp().to_millis().unwrap_or(0);
            self.got
                .seen
                .entry(id)
                .and_modify(|e| e.times += 1)
                .or_insert(Seen {
                    times: 1,
                    append_ms: at,
                    partition: m.partition(),
                    offset: m.offset(),
                });
        }
        Ok(high.iter().sum())
    }
}

/// Reads `topic` until every id in `expected` came back or `timeout` passed; a short grace after
/// that shows duplicates that are still on their way.
async fn read_back(
    brokers: &str,
    topic: &str,
    partitions: i32,
    expected: usize,
    timeout: Duration,
) -> anyhow::Result<Readback> {
    let (brokers, topic) = (brokers.to_owned(), topic.to_owned());
    tokio::task::spawn_blocking(move || {
        let mut reader = Reader::new(&brokers, &topic, partitions)?;
        let deadline = Instant::now() + timeout;
        while reader.got.seen.len() < expected && Instant::now() < deadline {
            reader.catch_up()?;
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(500));
        reader.catch_up()?;
        Ok(reader.got)
    })
    .await?
}

/// Waits until `topic` holds at least `count` records (cheap: watermarks only).
async fn wait_for_records(
    brokers: &str,
    topic: &str,
    partitions: i32,
    count: i64,
    timeout: Duration,
) -> anyhow::Result<()> {
    let reader = Reader::new(brokers, topic, partitions)?;
    let started = Instant::now();
    let mut last_report = Instant::now();
    loop {
        // A topic just created may not have its leaders yet: that is "none yet".
        let have: i64 = tokio::task::block_in_place(|| reader.high_watermarks())
            .map(|h| h.iter().sum())
            .unwrap_or(0);
        if have >= count {
            return Ok(());
        }
        anyhow::ensure!(
            started.elapsed() < timeout,
            "{topic}: {have} of {count} records after {timeout:?}"
        );
        if last_report.elapsed() > Duration::from_secs(3) {
            progress(&format!(
                "{have} of {count} records in {topic}, {:.0}/s so far",
                have as f64 / started.elapsed().as_secs_f64()
            ));
            last_report = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// How one measurement's events came back.
#[derive(Clone, serde::Serialize)]
struct Count {
    what: String,
    expected: usize,
    unique: usize,
    duplicates: u64,
    missing: usize,
    unexpected: usize,
    mean_bytes: u64,
}

impl Count {
    fn of(what: &str, expected: &HashMap<String, i64>, got: &Readback) -> Count {
        let unique = got
            .seen
            .keys()
            .filter(|id| expected.contains_key(*id))
            .count();
        Count {
            what: what.to_owned(),
            expected: expected.len(),
            unique,
            duplicates: got
                .seen
                .values()
                .map(|s| u64::from(s.times).saturating_sub(1))
                .sum(),
            missing: expected.len() - unique,
            unexpected: got.seen.len() - unique,
            mean_bytes: got.bytes / got.records.max(1),
        }
    }

    fn exactly_once(&self) -> bool {
        self.missing == 0 && self.duplicates == 0 && self.unexpected == 0
    }
}

/// From the first to the last append time of the expected events, in seconds: the drain itself,
/// without the start of the reader (a Connect task's start takes seconds, the relay's less).
fn drain_seconds(expected: &HashMap<String, i64>, got: &Readback) -> f64 {
    let times = || {
        expected
            .keys()
            .filter_map(|id| got.seen.get(id).map(|s| s.append_ms))
    };
    let (first, last) = (times().min().unwrap_or(0), times().max().unwrap_or(0));
    // Append times have millisecond resolution.
    ((last - first).max(1)) as f64 / 1000.0
}

/// The width of one window of a latency run's timeline.
const TIMELINE_WINDOW_MS: i64 = 250;

/// A latency run over time, warm-up included: for each window of commits from the first, its
/// start in seconds from the end of the warm-up (negative during it), its p50, p99 and max, and
/// how many events it holds.
fn timeline(committed_us: &HashMap<String, i64>, got: &Readback, warm_up: Duration) -> Value {
    let Some(first) = committed_us.values().min() else {
        return json!([]);
    };
    let mut windows: BTreeMap<i64, Vec<f64>> = BTreeMap::new();
    for (id, at_us) in committed_us {
        if let Some(seen) = got.seen.get(id) {
            let window = (at_us - first) / 1000 / TIMELINE_WINDOW_MS;
            windows
                .entry(window)
                .or_default()
                .push(latency_ms(seen, *at_us));
        }
    }
    let warm_up_ms = warm_up.as_millis() as f64;
    windows
        .into_iter()
        .map(|(window, mut lat)| {
            lat.sort_by(f64::total_cmp);
            let at_s = ((window * TIMELINE_WINDOW_MS) as f64 - warm_up_ms) / 1000.0;
            json!([
                at_s,
                percentile(&lat, 0.5),
                percentile(&lat, 0.99),
                percentile(&lat, 1.0),
                lat.len()
            ])
        })
        .collect()
}

/// An event's append time minus its commit time, in ms.
fn latency_ms(seen: &Seen, committed_us: i64) -> f64 {
    (seen.append_ms as f64 * 1000.0 - committed_us as f64) / 1000.0
}

/// Append time minus commit time, in ms, sorted.
fn latencies(committed_us: &HashMap<String, i64>, got: &Readback) -> Vec<f64> {
    let mut out: Vec<f64> = committed_us
        .iter()
        .filter_map(|(id, at_us)| Some(latency_ms(got.seen.get(id)?, *at_us)))
        .collect();
    out.sort_by(f64::total_cmp);
    out
}

// ------------------------------------------------------------------ the two systems

/// What one system has to offer the measurements: a backlog writer, a one-event writer, and a
/// way to stop and restart its reading of the outbox.
#[derive(Clone, Copy, PartialEq)]
enum System {
    Relay,
    Debezium,
}

impl System {
    fn name(self) -> &'static str {
        match self {
            System::Relay => "relay",
            System::Debezium => "Debezium",
        }
    }
}

/// Writes `n` events for `topic` in transactions of [`BACKLOG_CHUNK`]; returns their ids.
async fn write_backlog(
    system: System,
    db: &TestDb,
    topic: &str,
    n: i64,
    keys: i64,
    content: &str,
) -> anyhow::Result<HashMap<String, i64>> {
    progress(&format!(
        "{}: writing a backlog of {n} events",
        system.name()
    ));
    let mut client = db.pool.get().await?;
    let mut ids = HashMap::with_capacity(n as usize);
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let mut from = 1i64;
    while from <= n {
        let to = (from + BACKLOG_CHUNK - 1).min(n);
        let tx = client.transaction().await?;
        let rows = match system {
            // The relay's rows go through outbox.publish, as every publisher writes them.
            System::Relay => {
                tx.query(
                    "select outbox.publish(event_type => 'message.created', key => 'key-' || (g % $2),
                            data => jsonb_build_object('content', $3::text), topic => $1,
                            correlation_id => 'req_bench', source => 'bench')
                       from generate_series($4::bigint, $5::bigint) g",
                    &[&topic, &keys, &content, &from, &to],
                )
                .await?
            }
            System::Debezium => {
                let sql = format!(
                    "insert into public.debezium_outbox (id, aggregatetype, aggregateid, type, payload)
                     select gen_random_uuid(), $1, 'key-' || (g % $3), 'message.created', {}
                       from generate_series($5::bigint, $6::bigint) g
                     returning payload->>'id'",
                    envelope_sql("('evt_' || $2 || '_' || g)", "$4")
                );
                tx.query(&sql, &[&topic, &tag, &keys, &content, &from, &to])
                    .await?
            }
        };
        tx.commit().await?;
        for r in rows {
            ids.insert(r.get::<_, String>(0), 0);
        }
        from = to + 1;
    }
    Ok(ids)
}

/// Commits one event in a transaction of its own; returns its id.
async fn write_one(
    system: System,
    pool: &outbox_core::db::PgPool,
    topic: &str,
    key: &str,
    content: &str,
) -> anyhow::Result<String> {
    let mut client = pool.get().await?;
    write_on(system, &mut client, topic, key, content).await
}

/// Opens every connection of the writers' pool and commits one event on each, returning how
/// many. A rate's first writes otherwise open them: at 2,000/s fifteen new backends in 90 ms,
/// each then compiling `outbox.publish`, which held both cores for the first 100 ms of the
/// run and made its first events the slowest, for whichever system was measured.
async fn warm_writers(
    system: System,
    pool: &outbox_core::db::PgPool,
    topic: &str,
    content: &str,
) -> anyhow::Result<usize> {
    let size = pool.status().max_size;
    let mut clients = futures::future::try_join_all((0..size).map(|_| pool.get())).await?;
    futures::future::try_join_all(
        clients
            .iter_mut()
            .map(|client| write_on(system, client, topic, "warm-up", content)),
    )
    .await?;
    Ok(size)
}

async fn write_on(
    system: System,
    client: &mut deadpool_postgres::Object,
    topic: &str,
    key: &str,
    content: &str,
) -> anyhow::Result<String> {
    let tx = client.transaction().await?;
    let id = match system {
        System::Relay => {
            outbox_core::outbox::publish(
                &*tx,
                &outbox_core::outbox::NewEvent {
                    event_type: "message.created",
                    key,
                    data: &json!({ "content": content }),
                    topic: Some(topic),
                    headers: None,
                    correlation_id: Some("req_bench"),
                    source: Some("bench"),
                },
            )
            .await?
        }
        System::Debezium => {
            let id = format!("evt_{}", uuid::Uuid::now_v7().simple());
            let sql = format!(
                "insert into public.debezium_outbox (id, aggregatetype, aggregateid, type, payload)
                 values (gen_random_uuid(), $1, $2, 'message.created', {})",
                envelope_sql("$3::text", "$4")
            );
            tx.execute(&sql, &[&topic, &key, &id, &content]).await?;
            id
        }
    };
    tx.commit().await?;
    Ok(id)
}

/// Kafka Connect's REST API, for the one connector of this run.
struct Connect {
    http: reqwest::Client,
    url: String,
    name: String,
    slot: String,
}

impl Connect {
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let mut request = self.http.request(
            method,
            format!("{}/connectors/{}{path}", self.url, self.name),
        );
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.context("Kafka Connect's REST API")?;
        let status = response.status();
        let text = response.text().await?;
        anyhow::ensure!(
            status.is_success(),
            "Kafka Connect answered {status}: {text}"
        );
        Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// Waits until the connector and its task run (or, with `want` = STOPPED, until stopped).
    async fn wait_state(&self, want: &str) -> anyhow::Result<()> {
        let started = Instant::now();
        loop {
            let status = self.call(reqwest::Method::GET, "/status", None).await?;
            let connector = status["connector"]["state"].as_str().unwrap_or_default();
            let tasks = status["tasks"].as_array().cloned().unwrap_or_default();
            if let Some(failed) = tasks.iter().find(|t| t["state"] == "FAILED") {
                anyhow::bail!("the Debezium task failed: {}", failed["trace"]);
            }
            let ready = match want {
                "RUNNING" => {
                    connector == "RUNNING" && tasks.iter().any(|t| t["state"] == "RUNNING")
                }
                _ => connector == want,
            };
            if ready {
                return Ok(());
            }
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(120),
                "the connector is not {want} after 120s: {status}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn stop(&self) -> anyhow::Result<()> {
        self.call(reqwest::Method::PUT, "/stop", None).await?;
        self.wait_state("STOPPED").await
    }

    async fn resume(&self) -> anyhow::Result<()> {
        self.call(reqwest::Method::PUT, "/resume", None).await?;
        self.wait_state("RUNNING").await
    }
}

/// Creates the publication and the connector on `db` (tuned as the issue says a fair user would).
async fn start_debezium(args: &Args, db: &TestDb, brokers_note: &str) -> anyhow::Result<Connect> {
    let client = db.client().await;
    client.batch_execute(DEBEZIUM_TABLE).await?;
    client
        .batch_execute("create publication bench_dbz for table public.debezium_outbox")
        .await?;
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    let connect = Connect {
        http: reqwest::Client::new(),
        url: args.connect_url.trim_end_matches('/').to_owned(),
        name: format!("bench-outbox-{}", &suffix[..8]),
        slot: format!("bench_dbz_{}", &suffix[..12]),
    };
    let pg: tokio_postgres::Config = db.url.parse()?;
    let host = match pg.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        _ => "127.0.0.1".to_owned(),
    };
    let port = pg.get_ports().first().copied().unwrap_or(5432);
    let password = pg
        .get_password()
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .unwrap_or_default();
    let config = json!({
        "connector.class": "io.debezium.connector.postgresql.PostgresConnector",
        "tasks.max": "1",
        "database.hostname": host,
        "database.port": port.to_string(),
        "database.user": pg.get_user().unwrap_or("postgres"),
        "database.password": password,
        "database.dbname": db.name,
        "topic.prefix": format!("bench{}", &suffix[..8]),
        "plugin.name": "pgoutput",
        "slot.name": connect.slot,
        "publication.name": "bench_dbz",
        "publication.autocreate.mode": "disabled",
        "table.include.list": "public.debezium_outbox",
        "snapshot.mode": "no_data",
        "tombstones.on.delete": "false",
        "max.batch.size": "4096",
        "max.queue.size": "32768",
        "poll.interval.ms": "10",
        "key.converter": "org.apache.kafka.connect.storage.StringConverter",
        "value.converter": "org.apache.kafka.connect.storage.StringConverter",
        "transforms": "outbox",
        "transforms.outbox.type": "io.debezium.transforms.outbox.EventRouter",
        "transforms.outbox.route.topic.replacement": "${routedByValue}",
        "producer.override.enable.idempotence": "true",
        "producer.override.acks": "all",
        "producer.override.linger.ms": "5",
        "producer.override.compression.type": "lz4",
    });
    progress(&format!(
        "creating connector {} (slot {}) on {} via {brokers_note}",
        connect.name, connect.slot, db.name
    ));
    connect
        .call(reqwest::Method::PUT, "/config", Some(config))
        .await?;
    connect.wait_state("RUNNING").await?;
    Ok(connect)
}

/// Deletes the connector and drops its slot (a slot left behind would keep WAL forever).
async fn remove_debezium(connect: &Connect, db: &TestDb) -> anyhow::Result<()> {
    let _ = connect.call(reqwest::Method::DELETE, "", None).await;
    let client = db.client().await;
    for _ in 0..100 {
        let dropped = client
            .query(
                "select pg_drop_replication_slot(slot_name) from pg_replication_slots
                  where slot_name = $1 and not active",
                &[&connect.slot],
            )
            .await;
        let left: i64 = client
            .query_one(
                "select count(*) from pg_replication_slots where slot_name = $1",
                &[&connect.slot],
            )
            .await?
            .get(0);
        if left == 0 {
            return Ok(());
        }
        let _ = dropped;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    anyhow::bail!("replication slot {} is still there", connect.slot)
}

/// The reader of the outbox for `system`: the relay, or the Debezium connector.
enum Runner<'a> {
    Relay(Option<Box<Child>>, &'a Args, &'a str, &'a TestDb),
    Debezium(&'a Connect),
}

impl Runner<'_> {
    async fn pause(&mut self) -> anyhow::Result<()> {
        match self {
            Runner::Relay(relay, ..) => {
                if let Some(r) = relay.take() {
                    r.stop().await?;
                }
            }
            Runner::Debezium(c) => c.stop().await?,
        }
        Ok(())
    }

    async fn start(&mut self) -> anyhow::Result<()> {
        match self {
            Runner::Relay(relay, args, brokers, db) => {
                *relay = Some(Box::new(
                    Child::start(&args.workload, &db.url, brokers).await?,
                ));
            }
            Runner::Debezium(c) => c.resume().await?,
        }
        Ok(())
    }
}

/// A drain: the reader stopped, `n` events written, the reader started; events/s until the last
/// one's append time.
async fn drain(
    system: System,
    runner: &mut Runner<'_>,
    args: &Args,
    brokers: &str,
    db: &TestDb,
    content: &str,
    what: &str,
) -> anyhow::Result<(f64, Count)> {
    let load = &args.workload;
    let topic = unique_topic(&format!("bench-{}-{what}", system.name().to_lowercase()));
    create_timed_topic(brokers, &topic, load.partitions).await?;
    runner.pause().await?;
    let expected = write_backlog(system, db, &topic, load.events, load.keys, content).await?;
    let _ = db.client().await.batch_execute("checkpoint").await;
    progress(&format!(
        "{}: {what} drain of {} events",
        system.name(),
        load.events
    ));
    let started_ms = Utc::now().timestamp_millis();
    runner.start().await?;
    wait_for_records(brokers, &topic, load.partitions, load.events, args.timeout).await?;
    let got = read_back(
        brokers,
        &topic,
        load.partitions,
        expected.len(),
        args.timeout,
    )
    .await?;
    let count = Count::of(&format!("{} {what} drain", system.name()), &expected, &got);
    let rate = count.unique as f64 / drain_seconds(&expected, &got);
    let first_ms = got
        .seen
        .values()
        .map(|s| s.append_ms)
        .min()
        .unwrap_or(started_ms);
    progress(&format!(
        "{}: {what} drain {rate:.0} events/s (first record {} ms after the start)",
        system.name(),
        first_ms - started_ms
    ));
    Ok((rate, count))
}

/// One latency measurement: `rate` events/s for `duration`, each in a transaction of its own.
async fn latency(
    system: System,
    args: &Args,
    brokers: &str,
    db: &TestDb,
    content: Arc<String>,
    rate: u64,
) -> anyhow::Result<(Value, Count)> {
    let load = &args.workload;
    let topic = unique_topic(&format!("bench-{}-lat{rate}", system.name().to_lowercase()));
    create_timed_topic(brokers, &topic, load.partitions).await?;
    // Each system's rates start from a quiet database: the vacuum that the drains' 400,000 rows
    // (and the rate before) leave to autovacuum is done now, and the checkpoint taken, rather
    // than landing in the middle of whichever measurement runs next.
    progress(&format!(
        "{}: vacuum and checkpoint before {rate}/s",
        system.name()
    ));
    let client = db.client().await;
    client.batch_execute("vacuum (analyze)").await?;
    client.batch_execute("checkpoint").await?;
    drop(client);
    // An event on each writer's connection first, so the reader knows the topic and every
    // connection is open and has written once.
    let warm_up = warm_writers(system, &db.pool, &topic, &content).await?;
    wait_for_records(
        brokers,
        &topic,
        load.partitions,
        warm_up as i64,
        Duration::from_secs(60),
    )
    .await?;
    progress(&format!(
        "{}: latency at {rate} events/s ({:?} warm-up, then {:?} measured)",
        system.name(),
        args.warm_up,
        args.duration
    ));
    // The first hundred milliseconds or so of a rate are slow for reasons of their own (a topic
    // just made, the broker's first appends to its partitions, the writers' first burst), and at
    // 500/s for 10 s they are the whole p99; what is compared is the steady state after them.
    let warming = (rate as f64 * args.warm_up.as_secs_f64()) as u64;
    let (writes, achieved) = open_loop(rate, args.warm_up + args.duration, |i| {
        let (pool, content, topic) = (db.pool.clone(), content.clone(), topic.clone());
        let key = format!("lat-{}", i % load.keys as u64);
        async move {
            let id = write_one(system, &pool, &topic, &key, &content).await?;
            anyhow::Ok((id, Utc::now().timestamp_micros(), i < warming))
        }
    })
    .await?;
    // A write that failed (say, no pooled connection in time on a loaded machine) committed
    // nothing: it is counted, and not expected back.
    let mut committed = HashMap::with_capacity(writes.len());
    let mut measured = HashMap::with_capacity(writes.len());
    let mut failed = 0u64;
    for w in writes {
        match w {
            Ok((id, at, warming)) => {
                if !warming {
                    measured.insert(id.clone(), at);
                }
                committed.insert(id, at);
            }
            Err(e) => {
                if failed == 0 {
                    progress(&format!("a write failed: {e:#}"));
                }
                failed += 1;
            }
        }
    }
    let got = read_back(
        brokers,
        &topic,
        load.partitions,
        committed.len() + warm_up,
        args.timeout,
    )
    .await?;
    let mut count = Count::of(&format!("{} at {rate}/s", system.name()), &committed, &got);
    // The warm-up events are expected too, not unexpected ones.
    count.unexpected = count.unexpected.saturating_sub(warm_up);
    let lat = latencies(&measured, &got);
    let with_warm_up = latencies(&committed, &got);
    let slowest = slowest(system, db, &measured, &got).await?;
    let row = json!({
        "system": system.name(), "offered": rate, "achieved": achieved.round(),
        "events": measured.len(), "warm_up_events": committed.len() - measured.len(),
        "failed_writes": failed, "p50": percentile(&lat, 0.5), "p99": percentile(&lat, 0.99),
        "max": percentile(&lat, 1.0), "p99_with_warm_up": percentile(&with_warm_up, 0.99),
        "timeline": timeline(&committed, &got, args.warm_up), "slowest": slowest,
    });
    progress(&format!(
        "{}: at {rate}/s (achieved {achieved:.0}/s) p50 {:.1} ms, p99 {:.1} ms",
        system.name(),
        percentile(&lat, 0.5),
        percentile(&lat, 0.99)
    ));
    Ok((row, count))
}

/// How many of the slowest events of a latency run are shown, and from what latency on an event
/// counts as an outlier.
const SLOWEST_SHOWN: usize = 5;
const OUTLIER_MS: f64 = 250.0;

/// The slowest events of a latency run, so that a maximum far above the p99 can be traced: where
/// each landed in Kafka and, for the relay, what the outbox knows of it (its writer's transaction
/// started at `created_at`; `attempts` above 1 means a failed send and a retry). Printed, and
/// kept in results.json.
async fn slowest(
    system: System,
    db: &TestDb,
    committed_us: &HashMap<String, i64>,
    got: &Readback,
) -> anyhow::Result<Value> {
    let mut late: Vec<(&String, f64, Seen, i64)> = committed_us
        .iter()
        .filter_map(|(id, at_us)| {
            let seen = *got.seen.get(id)?;
            Some((id, latency_ms(&seen, *at_us), seen, *at_us))
        })
        .collect();
    late.sort_by(|a, b| b.1.total_cmp(&a.1));
    let outliers = late.iter().take_while(|e| e.1 >= OUTLIER_MS).count();
    late.truncate(SLOWEST_SHOWN);
    let ids: Vec<String> = late.iter().map(|e| e.0.clone()).collect();
    let mut outbox: HashMap<String, Value> = HashMap::new();
    if system == System::Relay {
        let client = db.client().await;
        for row in client
            .query(
                "select e.event_id, e.id, e.xid::text, e.aggregate_id,
                        (extract(epoch from e.created_at) * 1e6)::bigint,
                        (extract(epoch from s.sent_at) * 1e6)::bigint, s.attempts
                   from outbox.events e
                   left join outbox.sent s on s.id = e.id and s.created_at = e.created_at
                  where e.event_id = any($1)",
                &[&ids],
            )
            .await?
        {
            outbox.insert(
                row.get(0),
                json!({ "row": row.get::<_, i64>(1), "xid": row.get::<_, String>(2),
                        "key": row.get::<_, String>(3), "tx_started_us": row.get::<_, i64>(4),
                        "marked_us": row.get::<_, Option<i64>>(5),
                        "attempts": row.get::<_, Option<i32>>(6) }),
            );
        }
    }
    let shown: Vec<Value> = late
        .iter()
        .map(|(id, ms, seen, at_us)| {
            let mut v = json!({ "id": id, "ms": ms, "committed_us": at_us,
                                "partition": seen.partition, "offset": seen.offset });
            if let Some(o) = outbox.get(*id) {
                v["outbox"] = o.clone();
            }
            progress(&format!("  slow: {v}"));
            v
        })
        .collect();
    progress(&format!(
        "{}: {outliers} events at or above {OUTLIER_MS} ms",
        system.name()
    ));
    Ok(json!({ "outliers_over_ms": OUTLIER_MS, "outliers": outliers, "events": shown }))
}

/// What one system measured, in the order measured.
struct Measured {
    /// Events/s of the warm-up drain (the first after the system started).
    first_drain: f64,
    /// Events/s of the measured drain.
    warm_drain: f64,
    /// Every drain's and latency run's count.
    counts: Vec<Count>,
    /// One row per rate of `args.rates`.
    latency: Vec<Value>,
}

/// One system's sequence: a warm-up drain, the measured drain, then the latency at each of
/// `args.rates`.
async fn measure(
    system: System,
    runner: &mut Runner<'_>,
    args: &Args,
    brokers: &str,
    db: &TestDb,
    content: &Arc<String>,
) -> anyhow::Result<Measured> {
    let mut counts = Vec::new();
    let (first_drain, c) = drain(system, runner, args, brokers, db, content, "warm-up").await?;
    counts.push(c);
    let (warm_drain, c) = drain(system, runner, args, brokers, db, content, "measured").await?;
    counts.push(c);
    let mut rows = Vec::new();
    for &rate in &args.rates {
        let (row, c) = latency(system, args, brokers, db, content.clone(), rate).await?;
        rows.push(row);
        counts.push(c);
    }
    Ok(Measured {
        first_drain,
        warm_drain,
        counts,
        latency: rows,
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let load = &args.workload;
    quiet_logging("warn");
    let brokers = outbox_core::testing::kafka_brokers();
    // ~payload_bytes envelopes: the content fills what the rest of the envelope leaves.
    let content = Arc::new("x".repeat(load.payload_bytes.saturating_sub(330)));
    let db = TestDb::create().await;
    progress(&format!("database {}, broker {brokers}", db.name));

    // 1. Raw produce: the ceiling of the broker on this machine (the relay's producer settings).
    let raw_topic = unique_topic("bench-raw");
    create_timed_topic(&brokers, &raw_topic, load.partitions).await?;
    let producer: FutureProducer =
        kafka::idempotent_producer_config(&brokers, "bench-raw", Duration::from_secs(30))
            .create()?;
    let payload = format!(
        "{{\"id\":\"evt_raw\",\"event\":\"message.created\",\"data\":{{\"content\":\"{content}\"}},\"pad\":\"{}\"}}",
        "x".repeat(200)
    );
    progress("raw produce: warm-up, then measured");
    raw_produce(&producer, &raw_topic, load.events, load.keys, |_| {
        payload.clone()
    })
    .await?;
    let raw_rate = raw_produce(&producer, &raw_topic, load.events, load.keys, |_| {
        payload.clone()
    })
    .await?;
    progress(&format!("raw produce {raw_rate:.0} events/s"));
    drop(producer);

    // 2. Debezium first, then removed, so that its WAL reading never runs beside the relay.
    let dbz = if args.relay_only {
        None
    } else {
        Some(debezium(&args, &db, &brokers, &content).await?)
    };

    // 3. The relay, on the same database and broker.
    let mut runner = Runner::Relay(None, &args, &brokers, &db);
    let relay = measure(System::Relay, &mut runner, &args, &brokers, &db, &content).await?;
    runner.pause().await?;
    clean_up(&brokers, db).await;

    let (relay_first, relay_warm) = (relay.first_drain, relay.warm_drain);
    let mut throughput = vec![
        json!({"name": "raw Kafka produce (idempotent, acks=all)", "value": raw_rate.round()}),
    ];
    let mut goals = Vec::new();
    let (mut counts, mut lat_rows) = (Vec::new(), Vec::new());
    if let Some(dbz) = dbz {
        throughput.push(
            json!({"name": "Debezium: first drain after start", "value": dbz.first_drain.round()}),
        );
        throughput.push(json!({"name": "Debezium: warm drain", "value": dbz.warm_drain.round()}));
        goals.push(json!({"goal": "relay drain ≥ 2× Debezium's warm drain", "met": relay_warm >= 2.0 * dbz.warm_drain,
                          "measured": format!("{:.2}×", relay_warm / dbz.warm_drain)}));
        counts.extend(dbz.counts);
        lat_rows.extend(dbz.latency);
    }
    throughput.push(json!({"name": "relay: first drain", "value": relay_first.round()}));
    throughput.push(json!({"name": "relay: warm drain", "value": relay_warm.round()}));
    counts.extend(relay.counts);
    lat_rows.extend(relay.latency);
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let p99 = |system: &str, rate: u64| {
        lat_rows
            .iter()
            .find(|r| r["system"] == system && r["offered"] == rate)
            .and_then(|r| r["p99"].as_f64())
    };
    goals.push(
        json!({"goal": "relay drain ≥ ½ raw produce", "met": relay_warm >= 0.5 * raw_rate,
                      "measured": format!("{:.0} %", 100.0 * relay_warm / raw_rate)}),
    );
    for &rate in &args.rates {
        if let (Some(r), Some(d)) = (p99("relay", rate), p99("Debezium", rate)) {
            goals.push(
                json!({"goal": format!("relay p99 < Debezium's at {rate}/s"), "met": r < d,
                              "measured": format!("{r:.1} ms vs {d:.1} ms")}),
            );
        }
    }
    if let Some(r) = p99("relay", 1000) {
        goals.push(json!({"goal": "relay p99 < 50 ms at 1,000/s", "met": r < 50.0, "measured": format!("{r:.1} ms")}));
    }
    goals.push(
        json!({"goal": format!("every event counted back exactly once, {}", if args.relay_only { "relay" } else { "both systems" }),
                      "met": counts.iter().all(Count::exactly_once), "measured": ""}),
    );
    let result = json!({
        "section": "debezium",
        "title": format!("{}: {} events of ~{} B, {} partitions, {} keys",
                         if args.relay_only { "relay alone (no Debezium in this run)" } else { "relay vs Debezium outbox" },
                         load.events, counts.first().map(|c| c.mean_bytes).unwrap_or(0), load.partitions, load.keys),
        "cores": cores,
        "unit": "events/s",
        "throughput": throughput,
        "latency_title": "commit → record appended in Kafka (LogAppendTime)",
        "latency": lat_rows,
        "counts": counts,
        "goals": goals,
    });
    write_results(args.out.as_deref(), &result)
}

/// Debezium's measurements: the connector made, measured, and removed with its slot.
async fn debezium(
    args: &Args,
    db: &TestDb,
    brokers: &str,
    content: &Arc<String>,
) -> anyhow::Result<Measured> {
    let load = &args.workload;
    let connect = start_debezium(args, db, brokers).await?;
    let debezium = async {
        let probe = unique_topic("bench-debezium-probe");
        create_timed_topic(brokers, &probe, load.partitions).await?;
        write_one(System::Debezium, &db.pool, &probe, "probe", content).await?;
        wait_for_records(
            brokers,
            &probe,
            load.partitions,
            1,
            Duration::from_secs(120),
        )
        .await?;
        let mut runner = Runner::Debezium(&connect);
        measure(System::Debezium, &mut runner, args, brokers, db, content).await
    }
    .await;
    remove_debezium(&connect, db).await?;
    debezium
}

/// Deletes this run's topics and database.
async fn clean_up(brokers: &str, db: TestDb) {
    progress("deleting this run's topics and database");
    let topics = std::mem::take(&mut *TOPICS.lock().unwrap());
    if let Ok(admin) =
        kafka::base_config(brokers, "bench-admin").create::<AdminClient<DefaultClientContext>>()
    {
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        let _ = admin.delete_topics(&names, &AdminOptions::new()).await;
    }
    db.drop_now().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An event committed at `at_ms` (ms after the epoch) and appended `latency_ms` later.
    fn event(
        got: &mut Readback,
        committed: &mut HashMap<String, i64>,
        at_ms: i64,
        latency_ms: i64,
    ) {
        let id = format!("evt_{}", committed.len());
        committed.insert(id.clone(), at_ms * 1000);
        got.seen.insert(
            id,
            Seen {
                times: 1,
                append_ms: at_ms + latency_ms,
                partition: 0,
                offset: 0,
            },
        );
    }

    #[test]
    fn the_timeline_has_a_window_per_250_ms_of_commits_from_the_first_counted_from_the_warm_up_s_end(
    ) {
        let mut got = Readback {
            seen: HashMap::new(),
            records: 0,
            bytes: 0,
        };
        let mut committed = HashMap::new();
        // The first window: latencies 1..=100 ms; the third (500-749 ms): one of 7 ms. None in
        // the second, and one committed but never read back.
        for i in 0..100 {
            event(&mut got, &mut committed, 1_000 + i, i + 1);
        }
        event(&mut got, &mut committed, 1_600, 7);
        committed.insert("evt_lost".into(), 1_700_000);
        let windows = timeline(&committed, &got, Duration::from_millis(500));
        let windows = windows.as_array().unwrap();
        assert_eq!(windows.len(), 2, "{windows:?}");
        assert_eq!(windows[0], json!([-0.5, 51.0, 99.0, 100.0, 100]));
        assert_eq!(windows[1], json!([0.0, 7.0, 7.0, 7.0, 1]));
    }

    #[test]
    fn an_empty_run_has_an_empty_timeline() {
        let got = Readback {
            seen: HashMap::new(),
            records: 0,
            bytes: 0,
        };
        assert_eq!(timeline(&HashMap::new(), &got, Duration::ZERO), json!([]));
    }
}
