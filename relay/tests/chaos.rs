//! Stopping things: the Kafka broker under load, and the leading relay process.
//!
//! The outage tests run their own broker (port 19092) and PostgreSQL (port 15432), with state in
//! /var/tmp/outbox-chaos, through `scripts/stack.sh kafka-stop` / `kafka-start` / `pg-stop` /
//! `pg-start`, so other tests keep the shared ones.

mod support;

use std::collections::HashSet;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use outbox_core::testing::{
    chaos_stack, eventually, kafka_brokers, read_topic, read_topic_from, CHAOS_BROKER,
};
use support::{contents_by_key, id_counts, message, wait_for_sent, Pipeline};

#[tokio::test]
async fn kafka_stopped_under_load_loses_nothing_and_keeps_per_key_order() {
    chaos_stack("kafka-start");
    let p = Pipeline::start(CHAOS_BROKER, |c| {
        c.send_timeout = Duration::from_secs(1);
        c.retry_max = Duration::from_millis(500);
        c.batch_size = 50;
    })
    .await;
    let keys = ["a", "b", "c", "d"];
    let post_round = |round: std::ops::Range<usize>| {
        let p = &p;
        futures::future::join_all(keys.iter().map(move |key| {
            let round = round.clone();
            async move {
                let mut ids = Vec::new();
                for i in round {
                    ids.push(p.post(message(format!("{i:03}"), Some(key))).await);
                }
                ids
            }
        }))
    };
    let mut ids: Vec<String> = post_round(0..5).await.into_iter().flatten().collect();
    p.all_sent(20, Duration::from_secs(30)).await;

    chaos_stack("kafka-stop");
    ids.extend(post_round(5..20).await.into_iter().flatten());
    eventually(
        "rows turn X while Kafka is down",
        Duration::from_secs(30),
        || async { (p.count_state("X").await > 0).then_some(()) },
    )
    .await;
    assert_eq!(
        p.relay.try_status("/ready").await,
        Some(503),
        "the relay reports not-ready while Kafka is down"
    );
    assert_eq!(
        p.count_state("D").await,
        0,
        "an outage never makes a row dead"
    );
    assert!(!p.relay.is_finished(), "the relay keeps running");

    chaos_stack("kafka-start");
    let back = Instant::now();
    p.all_sent(80, Duration::from_secs(60)).await;
    eprintln!(
        "all rows sent {:?} after Kafka answered again",
        back.elapsed()
    );
    assert!(!p.relay.is_finished());

    let records = read_topic_from(CHAOS_BROKER, &p.topic, 80, Duration::from_secs(30)).await;
    let counts = id_counts(&records);
    let expected: HashSet<&String> = ids.iter().collect();
    assert_eq!(
        counts.keys().collect::<HashSet<_>>(),
        expected,
        "no event lost, none unexpected"
    );
    assert!(
        counts.values().all(|&n| n == 1),
        "each event in the topic once: {counts:?}"
    );
    let by_key = contents_by_key(&records);
    for key in keys {
        let in_order: Vec<String> = (0..20).map(|i| format!("{i:03}")).collect();
        assert_eq!(
            by_key[key], in_order,
            "order of key {key} through the outage"
        );
    }
    p.relay.cancel();
    chaos_stack("kafka-stop");
}

struct RelayProcess {
    child: Child,
    url: String,
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn spawn_relay_process(database_url: &str, topic: &str, lock_key: i64) -> RelayProcess {
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_relay"))
        .env("DATABASE_URL", database_url)
        .env("KAFKA_BROKERS", kafka_brokers())
        .env("KAFKA_TOPIC", topic)
        .env("LISTEN_ADDR", format!("127.0.0.1:{port}"))
        .env("RELAY_LOCK_KEY", lock_key.to_string())
        .env("RELAY_STANDBY_POLL", "200ms")
        .env("RELAY_POLL_INTERVAL", "200ms")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("start the relay binary");
    RelayProcess {
        child,
        url: format!("http://127.0.0.1:{port}"),
    }
}

async fn is_leader(http: &reqwest::Client, relay: &RelayProcess) -> Option<bool> {
    let text = outbox_core::testing::try_get_text(http, &format!("{}/metrics", relay.url)).await?;
    Some(text.lines().any(|l| l == "relay_is_leader 1"))
}

#[tokio::test]
async fn killing_the_leader_hands_over_to_the_standby_and_loses_nothing() {
    let db = outbox_core::testing::TestDb::create().await;
    let topic = outbox_core::testing::unique_topic("relay-failover");
    let producer = support::spawn_producer(&db, &topic).await;
    let lock_key = (uuid::Uuid::new_v4().as_u128() as i64).abs();
    let http = reqwest::Client::new();

    let first = spawn_relay_process(&db.url, &topic, lock_key);
    eventually("the first relay leads", Duration::from_secs(20), || async {
        is_leader(&http, &first).await.filter(|&l| l)
    })
    .await;
    let second = spawn_relay_process(&db.url, &topic, lock_key);
    eventually(
        "the second relay stands by",
        Duration::from_secs(20),
        || async { is_leader(&http, &second).await.filter(|&l| !l) },
    )
    .await;

    let total = 600;
    let post = |i: usize| {
        let body = message(format!("f{i}"), None);
        let posted = support::post_message(&producer, body);
        async move { posted.await.expect("the producer answers 201") }
    };
    let mut ids = Vec::new();
    let mut first = Some(first);
    let mut killed_at = None;
    for i in 0..total {
        ids.push(post(i).await);
        if i == total / 3 {
            // SIGKILL: no graceful step-down; PostgreSQL ends its session and frees the lock.
            drop(first.take());
            killed_at = Some(Instant::now());
        }
    }
    eventually(
        "the standby takes over",
        Duration::from_secs(20),
        || async { is_leader(&http, &second).await.filter(|&l| l).map(|_| ()) },
    )
    .await;
    eprintln!(
        "standby leads {:?} after the leader was killed",
        killed_at.unwrap().elapsed()
    );
    wait_for_sent(&db, "every row sent", total as i64, Duration::from_secs(60)).await;

    let records = read_topic(&topic, total, Duration::from_secs(30)).await;
    let counts = id_counts(&records);
    let missing = ids.iter().filter(|id| !counts.contains_key(*id)).count();
    let unexpected = counts.keys().filter(|id| !ids.contains(id)).count();
    let duplicates: usize = counts.values().map(|&n| n - 1).sum();
    eprintln!("failover: {total} acknowledged, {} received, {missing} missing, {unexpected} unexpected, {duplicates} duplicates", records.len());
    assert_eq!(missing, 0, "no acknowledged event may be lost");
    assert_eq!(unexpected, 0);
    drop(producer);
    drop(second);
}

#[tokio::test]
async fn postgres_stopped_gets_503s_and_half_written_nothing_then_everything_resumes() {
    chaos_stack("pg-start");
    let db = outbox_core::testing::TestDb::create_on(outbox_core::testing::CHAOS_POSTGRES).await;
    let topic = outbox_core::testing::unique_topic("relay-pg-outage");
    let producer = support::spawn_producer(&db, &topic).await;
    let config = support::relay_config(&db, &kafka_brokers(), &topic);
    let relay = support::spawn_relay(&db, config).await;
    // The producer's status and JSON answer (a request nothing answers fails the test).
    let post = |content: String| producer.call("POST", "/messages", Some(message(content, None)));
    let event_id = |body: serde_json::Value| body["event_id"].as_str().unwrap().to_owned();
    let mut ids = Vec::new();
    for i in 0..10 {
        let (status, body) = post(format!("before-{i}")).await;
        assert_eq!(status, 201);
        ids.push(event_id(body));
    }
    wait_for_sent(&db, "the first rows sent", 10, Duration::from_secs(30)).await;

    chaos_stack("pg-stop");
    let (status, body) = post("during".into()).await;
    assert_eq!(status, 503);
    assert_eq!(body["code"], "unavailable");
    assert_eq!(relay.try_status("/ready").await, Some(503));
    assert_eq!(relay.try_status("/health").await, Some(200));
    assert!(
        !relay.is_finished(),
        "the relay keeps running while PostgreSQL is down"
    );

    chaos_stack("pg-start");
    for i in 0..10 {
        let body = eventually(
            "the producer writes again",
            Duration::from_secs(30),
            || async {
                let (status, body) = post(format!("after-{i}")).await;
                (status == 201).then_some(body)
            },
        )
        .await;
        ids.push(event_id(body));
    }
    wait_for_sent(
        &db,
        "every row sent after PostgreSQL's return",
        20,
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(
        db.count("select count(*) from messages").await,
        20,
        "no half-written message"
    );
    assert_eq!(
        db.count("select count(*) from outbox").await,
        20,
        "no half-written event"
    );
    let records = read_topic(&topic, 20, Duration::from_secs(30)).await;
    let counts = id_counts(&records);
    assert!(
        ids.iter().all(|id| counts.contains_key(id)),
        "no acknowledged event lost"
    );
    assert_eq!(counts.len(), 20, "nothing unexpected");
    drop((producer, relay));
    chaos_stack("pg-stop");
}
