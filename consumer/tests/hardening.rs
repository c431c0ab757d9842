//! Hostile and careless input against the real consumer: events the old code lost or that stalled
//! every endpoint, each reproduced as found, with its neighbours.

mod support;

use std::time::Duration;

use consumer::delivery::{DeliveryState, Hold};
use consumer::ingest::PoisonRecord;
use outbox_core::breaker::BreakerState;
use outbox_core::testing::{self, TestDb};
use serde_json::json;
use support::*;

/// The envelope text of `e` with `data` replaced by `data_json`, exactly as a publisher might
/// write it.
fn with_data(e: &outbox_core::envelope::Envelope, data_json: &str) -> String {
    let mut value = serde_json::to_value(e).unwrap();
    value["data"] = json!("__DATA__");
    value.to_string().replace("\"__DATA__\"", data_json)
}

fn nested(levels: usize) -> String {
    "[".repeat(levels) + &"]".repeat(levels)
}

async fn poison_records(consumer: &TestConsumer) -> Vec<PoisonRecord> {
    let page = consumer.admin().poison_records().await;
    page.expect("GET /events/poison").poison_records
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_nested_at_any_depth_is_delivered_and_poison_records_can_be_replayed() {
    let (db, topic) = setup(1).await;
    let mut consumer = spawn_app(&db, config(&db, &topic)).await;
    let receiver = Receiver::start().await;
    create_endpoint(&consumer, &receiver.url, &["*"]).await;
    let kafka = producer();

    // 127 levels inside the envelope's object: past serde_json's default limit of 128.
    let deep = envelope(1);
    let deep_text = with_data(
        &deep,
        &format!("{{\"content\":\"d\",\"data\":{}}}", nested(126)),
    );
    produce_raw(&kafka, &topic, deep_text.as_bytes()).await;
    let deeper = envelope(2);
    let deeper_text = with_data(&deeper, &nested(2000));
    produce_raw(&kafka, &topic, deeper_text.as_bytes()).await;
    produce_raw(&kafka, &topic, br#"{"not": "an envelope"}"#).await;

    receiver
        .wait_for_count("both deep events delivered", 2, Duration::from_secs(20))
        .await;
    let bodies: Vec<Vec<u8>> = receiver.requests().into_iter().map(|r| r.body).collect();
    assert!(
        bodies.contains(&deep_text.clone().into_bytes()),
        "sent as read"
    );
    assert!(bodies.contains(&deeper_text.into_bytes()));
    let poison = testing::eventually(
        "the bad record is poison",
        Duration::from_secs(10),
        || async {
            let p = poison_records(&consumer).await;
            (p.len() == 1).then_some(p)
        },
    )
    .await;

    // Still not an event: 422 with why, and the record stays listed.
    let id = poison[0].id;
    let refused = consumer.admin().replay_poison(&id.to_string()).await;
    let refused = refused.unwrap_err();
    assert_eq!(refused.status, 422, "{refused}");
    assert_eq!(refused.code, "still_poison");
    assert_eq!(poison_records(&consumer).await.len(), 1);

    // A record an older consumer could not read, listed as poison: once readable, replayed once.
    let old = envelope(3);
    let old_text = with_data(&old, &nested(200));
    let client = db.client().await;
    let row = client
        .query_one(
            "insert into poison_records (topic, kafka_partition, kafka_offset, error, payload)
             values ($1, 0, 999, 'recursion limit exceeded', $2) returning id",
            &[&topic, &old_text.as_bytes()],
        )
        .await
        .unwrap();
    let old_id: i64 = row.get(0);
    let replayed = consumer.admin().replay_poison(&old_id.to_string()).await;
    let replayed = replayed.unwrap();
    assert_eq!(replayed.event_id, old.id);
    assert_eq!(replayed.deliveries, 1);
    assert!(!replayed.duplicate);
    testing::eventually(
        "the replayed event delivered",
        Duration::from_secs(10),
        || async { (receiver.counts_by_event().get(&old.id) == Some(&1)).then_some(()) },
    )
    .await;
    let again = consumer.admin().replay_poison(&old_id.to_string()).await;
    let again = again.unwrap_err();
    assert_eq!(again.status, 404, "a replayed record is no longer poison");
    for bad in ["abc", "0", "-1", "99999999999999999999"] {
        let refused = consumer.admin().replay_poison(bad).await.unwrap_err();
        assert_eq!(refused.status, 404, "{bad}: {refused}");
    }
    wait_for_succeeded(&db, 3).await;
    consumer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_that_cannot_be_headers_are_poison_and_every_endpoint_keeps_flowing() {
    let (db, topic) = setup(1).await;
    let mut consumer = spawn_app(&db, config(&db, &topic)).await;
    let a = Receiver::start().await;
    let b = Receiver::start().await;
    let (a_id, _) = create_endpoint(&consumer, &a.url, &["*"]).await;
    let (b_id, _) = create_endpoint(&consumer, &b.url, &["*"]).await;
    let kafka = producer();

    for bad_id in [
        "evt_a\nb",
        "evt_a\rb",
        "evt_a\x01b",
        "évt_non_ascii",
        "evt a",
        "",
    ] {
        let mut e = envelope(0);
        e.id = bad_id.to_owned();
        produce_raw(&kafka, &topic, &serde_json::to_vec(&e).unwrap()).await;
    }
    // A usable event whose correlation id (in the envelope and the Kafka header) is not.
    let mut odd = envelope(100);
    odd.metadata.correlation_id = "req\r\nx-injected: 1".into();
    produce(&kafka, &topic, &odd).await;
    let good: Vec<_> = (1..=10).map(envelope).collect();
    produce_all(&kafka, &topic, &good).await;

    for receiver in [&a, &b] {
        receiver
            .wait_for_count("11 events at each endpoint", 11, Duration::from_secs(20))
            .await;
        let odd_request = receiver
            .requests()
            .into_iter()
            .find(|r| r.event_id() == odd.id)
            .expect("the odd event arrived");
        assert_eq!(
            odd_request.header("x-correlation-id"),
            odd.id,
            "replaced by the event id"
        );
        assert_eq!(odd_request.header("x-injected"), "");
    }
    wait_for_succeeded(&db, 22).await;
    let poison = poison_records(&consumer).await;
    assert_eq!(poison.len(), 6, "{poison:?}");
    assert!(poison.iter().all(|p| p.error.contains("id")), "{poison:?}");
    for endpoint in [&a_id, &b_id] {
        let breaker = consumer.admin().breaker(endpoint).await;
        assert!(
            breaker.as_ref().is_none_or(|b| {
                b.view.breaker.state == BreakerState::Closed && b.view.breaker.failure_count == 0
            }),
            "{breaker:?}"
        );
    }
    assert_eq!(
        db.count("select count(*) from deliveries where state <> 'succeeded'")
            .await,
        0
    );
    consumer.stop().await;
}

/// Writes an event straight into the inbox with a delivery to `endpoint_id`, as rows recorded by
/// an older consumer (or by hand) may be.
async fn stored_delivery(db: &TestDb, event_id: &str, endpoint_id: &str) {
    let client = db.client().await;
    let payload = json!({"id": event_id, "event": "message.created"}).to_string();
    client
        .execute(
            "insert into inbox (event_id, event_type, topic, kafka_partition, kafka_offset, payload)
             values ($1, 'message.created', 't', 0, 0, $2::text::json)",
            &[&event_id, &payload],
        )
        .await
        .unwrap();
    client
        .execute(
            "insert into deliveries (event_id, endpoint_id, next_attempt_at)
             values ($1, $2, now() - interval '1 minute')",
            &[&event_id, &endpoint_id],
        )
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_that_cannot_be_built_is_dead_at_once_and_never_keeps_a_breaker_open() {
    let (db, topic) = setup(1).await;
    let mut c = config(&db, &topic);
    // Long enough that a probe slot held by the bad delivery would outlast the test.
    c.breaker.breaker_open_for = Duration::from_secs(60);
    let mut consumer = spawn_app(&db, c).await;
    let receiver = Receiver::start().await;
    let (endpoint, _) = create_endpoint(&consumer, &receiver.url, &["*"]).await;

    // The breaker is half-open and the oldest due delivery, the probe, cannot be built.
    let client = db.client().await;
    client
        .execute(
            "insert into circuit_breakers (scope, name, state, failure_count, opened_at)
             values ('endpoint', $1, 'HALF_OPEN', 5, now() - interval '2 minutes')",
            &[&endpoint],
        )
        .await
        .unwrap();
    let bad_ids = ["evt_bad\nline", "evt_bad\u{1}ctl", "évt_bad"];
    for bad in bad_ids {
        stored_delivery(&db, bad, &endpoint).await;
    }
    let kafka = producer();
    let good: Vec<_> = (1..=3).map(envelope).collect();
    produce_all(&kafka, &topic, &good).await;

    receiver
        .wait_for_count("the good events delivered", 3, Duration::from_secs(10))
        .await;
    testing::eventually("the breaker closed", Duration::from_secs(10), || async {
        let breaker = consumer.admin().breaker(&endpoint).await?;
        (breaker.view.breaker.state == BreakerState::Closed).then_some(())
    })
    .await;
    let rows = client
        .query(
            "select state, attempts, last_error from deliveries where event_id = any($1)",
            &[&bad_ids.as_slice()],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 3);
    for row in rows {
        let (state, attempts, error): (String, i32, Option<String>) =
            (row.get(0), row.get(1), row.get(2));
        assert_eq!((state.as_str(), attempts), ("dead", 1), "{error:?}");
        assert!(
            error.as_deref().unwrap_or("").contains("cannot be built"),
            "{error:?}"
        );
    }
    assert_eq!(
        receiver.count(),
        3,
        "nothing of the bad deliveries was sent"
    );
    let metrics = consumer.metrics().await;
    assert_eq!(
        testing::metric_total(
            &metrics,
            "consumer_deliveries_total",
            &["outcome=\"unsendable\""]
        ),
        3.0,
        "{metrics}"
    );
    consumer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_for_a_disabled_endpoint_are_held_and_sent_once_it_is_enabled() {
    let (db, topic) = setup(1).await;
    let mut consumer = spawn_app(&db, config(&db, &topic)).await;
    let receiver = Receiver::start().await;
    let other = Receiver::start().await;
    let (endpoint, _) = create_endpoint(&consumer, &receiver.url, &["*"]).await;
    create_endpoint(&consumer, &other.url, &["*"]).await;
    consumer
        .admin()
        .set_enabled(&endpoint, false)
        .await
        .unwrap();

    let kafka = producer();
    let events: Vec<_> = (1..=5).map(envelope).collect();
    produce_all(&kafka, &topic, &events).await;
    // The enabled endpoint got them all, so they were consumed and planned.
    other
        .wait_for_count(
            "delivered to the enabled endpoint",
            5,
            Duration::from_secs(20),
        )
        .await;
    let held = db
        .count(&format!(
            "select count(*) from deliveries where endpoint_id = '{endpoint}' and state = 'pending'"
        ))
        .await;
    assert_eq!(held, 5, "recorded and held for the disabled endpoint");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(receiver.count(), 0, "nothing sent while disabled");

    consumer.admin().set_enabled(&endpoint, true).await.unwrap();
    receiver
        .wait_for_count("sent once enabled", 5, Duration::from_secs(20))
        .await;
    wait_for_succeeded(&db, 10).await;
    let ids: std::collections::HashSet<String> =
        receiver.requests().iter().map(|r| r.event_id()).collect();
    assert_eq!(ids.len(), 5);
    consumer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_endpoint_does_not_slow_a_healthy_one() {
    let (db, topic) = setup(1).await;
    let mut c = config(&db, &topic);
    c.delivery_timeout = Duration::from_secs(3);
    c.delivery_lease = Duration::from_secs(20);
    // The breaker must not be what rescues the healthy endpoint here.
    c.breaker.breaker_failures = 10_000;
    c.retry_schedule = "0ms,30s".parse().unwrap();
    let mut consumer = spawn_app(&db, c).await;
    let hung = Receiver::start().await;
    hung.state
        .delay_ms
        .store(60_000, std::sync::atomic::Ordering::SeqCst);
    let healthy = Receiver::start().await;
    create_endpoint(&consumer, &hung.url, &["*"]).await;
    create_endpoint(&consumer, &healthy.url, &["*"]).await;

    let kafka = producer();
    let mut produced = std::collections::HashMap::new();
    for round in 0..20 {
        for k in 0..5 {
            let e = envelope(round * 5 + k);
            produce(&kafka, &topic, &e).await;
            produced.insert(e.id.clone(), std::time::Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let n = produced.len();
    healthy
        .wait_for_count(
            "the healthy endpoint got every event",
            n,
            Duration::from_secs(30),
        )
        .await;
    // From the moment Kafka acknowledged an event to its arrival at the healthy endpoint.
    let mut latencies: Vec<f64> = healthy
        .requests()
        .iter()
        .map(|r| (r.started - produced[&r.event_id()]).as_secs_f64())
        .collect();
    latencies.sort_by(f64::total_cmp);
    let (p50, p99) = (latencies[n / 2], latencies[n * 99 / 100]);
    assert!(
        p99 < 1.0,
        "healthy endpoint: p50 {p50:.3} s, p99 {p99:.3} s while another endpoint hangs (timeout 3 s)"
    );
    assert!(
        hung.state
            .max_in_flight
            .load(std::sync::atomic::Ordering::SeqCst)
            > 0
    );
    consumer.stop().await;
}

/// Held and parked are facts in the data: a breaker reset lets go exactly what the breaker held,
/// including deliveries that had already failed before it opened (which the old guess, "never
/// attempted", kept waiting for the whole cool-down), and leaves a disabled endpoint's parked
/// deliveries parked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_breaker_reset_releases_every_delivery_the_breaker_held_and_only_those() {
    let (db, topic) = setup(1).await;
    let receiver = Receiver::failing_with(500).await;
    let parked_receiver = Receiver::start().await;
    let mut c = config(&db, &topic);
    c.retry_schedule = std::iter::once("0ms")
        .chain(std::iter::repeat_n("20ms", 30))
        .collect::<Vec<_>>()
        .join(",")
        .parse()
        .unwrap();
    c.endpoint_concurrency = 1;
    // Far longer than the test: only the reset can release what the breaker holds.
    c.breaker.breaker_open_for = Duration::from_secs(600);
    let mut consumer = spawn_app(&db, c).await;
    let (endpoint, _) = create_endpoint(&consumer, &receiver.url, &["*"]).await;
    let (parked, _) = create_endpoint(&consumer, &parked_receiver.url, &["*"]).await;
    consumer.admin().set_enabled(&parked, false).await.unwrap();

    let kafka = producer();
    for n in 0..8 {
        produce(&kafka, &topic, &envelope(n)).await;
    }
    let held = testing::eventually(
        "every delivery of the failing endpoint is held by its open breaker",
        Duration::from_secs(20),
        || async {
            let filter = DeliveryFilter::endpoint(&endpoint).and_state(DeliveryState::Pending);
            let deliveries = consumer
                .admin()
                .list_deliveries(&filter)
                .await
                .ok()?
                .deliveries;
            (deliveries.len() == 8
                && deliveries
                    .iter()
                    .all(|d| d.fields.held_by == Some(Hold::Breaker)))
            .then_some(deliveries)
        },
    )
    .await;
    // Five failures opened it (a delivery may have failed more than once on its 20 ms schedule).
    let attempts: i32 = held.iter().map(|d| d.attempts).sum();
    assert_eq!(attempts, 5, "five failures opened it: {held:?}");
    assert!(
        held.iter().any(|d| d.attempts != 0),
        "some held deliveries had failed before: {held:?}"
    );
    let breaker = consumer.admin().breaker(&endpoint).await.expect("listed");
    assert_eq!(breaker.view.breaker.state, BreakerState::Open);

    let parked_page = consumer
        .admin()
        .list_deliveries(&DeliveryFilter::endpoint(&parked))
        .await;
    let parked_rows = parked_page.unwrap().deliveries;
    assert_eq!(parked_rows.len(), 8);
    for d in &parked_rows {
        assert_eq!(d.fields.held_by, Some(Hold::EndpointDisabled), "{d:?}");
        assert_eq!(
            d.fields.next_attempt_at, None,
            "parked: no next attempt {d:?}"
        );
    }

    receiver.succeed();
    let reset = consumer.admin().reset_breaker(&endpoint).await.unwrap();
    assert_eq!(reset.view.breaker.state, BreakerState::Closed, "{reset:?}");
    testing::eventually(
        "every held delivery arrives after the reset",
        Duration::from_secs(20),
        || async {
            let ok: std::collections::HashSet<String> = receiver
                .requests()
                .iter()
                .filter(|r| r.status == 200)
                .map(|r| r.event_id())
                .collect();
            (ok.len() == 8).then_some(())
        },
    )
    .await;
    assert_eq!(
        parked_receiver.count(),
        0,
        "the reset released nothing parked"
    );
    let still_parked = db
        .count(&format!(
            "select count(*) from deliveries where endpoint_id = '{parked}'
              and held_by = 'endpoint_disabled' and next_attempt_at = 'infinity'"
        ))
        .await;
    assert_eq!(still_parked, 8);
    consumer.stop().await;
}
