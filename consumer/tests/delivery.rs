//! The consumer against real Kafka, PostgreSQL and HTTP receivers: signatures, the circuit
//! breaker, retries and dead letters, crashes, duplicates, poison records and admin input.

mod support;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use consumer::delivery::DeliveryState;
use outbox_core::breaker::BreakerState;
use outbox_core::testing::eventually;
use serde_json::json;
use support::*;

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signatures_verify_under_an_independent_implementation_also_during_rotation() {
    let (db, topic) = setup(1).await;
    let receiver = Receiver::start().await;
    let mut consumer = spawn_app(&db, config(&db, &topic)).await;
    let (endpoint, old_secret) =
        create_endpoint(&consumer, &receiver.url, &["message.created"]).await;
    let kafka = producer();

    let first = envelope(1);
    produce(&kafka, &topic, &first).await;
    receiver
        .wait_for_count("the first webhook arrives", 1, WAIT)
        .await;
    let request = &receiver.requests()[0];
    assert_eq!(request.header("webhook-id"), first.id);
    assert_eq!(request.header("x-webhook-id"), first.id);
    assert_eq!(request.header("content-type"), "application/json");
    assert_eq!(request.header("x-correlation-id"), "req_test_1");
    let body: serde_json::Value = serde_json::from_slice(&request.body).unwrap();
    assert_eq!(body["id"], first.id.as_str());
    assert_eq!(body["data"]["n"], 1);
    let wrong = outbox_core::signature::Secret::generate();
    assert_eq!(
        verify_in_python(request, &[&old_secret, wrong.as_str()]).await,
        vec![[true, true], [false, false]],
        "the endpoint's secret verifies in both conventions, another secret does not"
    );

    let rotated = consumer.admin().rotate_secret(&endpoint).await.unwrap();
    let new_secret = rotated.secret;
    assert_ne!(new_secret, old_secret);
    // The answer's `previous_secret_expires_at` is a timestamp (the typed answer requires it).
    assert!(rotated.previous_secret_expires_at > chrono::Utc::now());

    produce(&kafka, &topic, &envelope(2)).await;
    receiver
        .wait_for_count("the second webhook arrives", 2, WAIT)
        .await;
    let request = &receiver.requests()[1];
    assert_eq!(
        request.header("webhook-signature").split(' ').count(),
        2,
        "both secrets sign during the grace period"
    );
    assert_eq!(
        verify_in_python(request, &[&new_secret, &old_secret, wrong.as_str()]).await,
        vec![[true, true], [true, true], [false, false]],
    );
    consumer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_endpoint_opens_the_breaker_then_one_probe_at_a_time_closes_it() {
    let (db, topic) = setup(1).await;
    let receiver = Receiver::failing_with(500).await;
    let mut c = config(&db, &topic);
    // Enough attempts that nothing dies during the test; one request at a time per endpoint, so
    // "exactly five failures" is exact; two dispatchers compete for the probe slot.
    c.retry_schedule = vec!["0ms"; 1]
        .into_iter()
        .chain(vec!["20ms"; 30])
        .collect::<Vec<_>>()
        .join(",")
        .parse()
        .unwrap();
    c.endpoint_concurrency = 1;
    c.dispatch_workers = 2;
    c.breaker.breaker_open_for = Duration::from_millis(800);
    let mut consumer = spawn_app(&db, c).await;
    let (endpoint, _) = create_endpoint(&consumer, &receiver.url, &["*"]).await;
    let kafka = producer();
    let events: Vec<_> = (0..8).map(envelope).collect();
    produce_all(&kafka, &topic, &events).await;

    let opened = eventually("the breaker opens", WAIT, || async {
        let b = consumer.admin().breaker(&endpoint).await?;
        (b.view.breaker.state == BreakerState::Open).then_some(b)
    })
    .await;
    assert_eq!(opened.view.breaker.failure_count, 5);
    let opened_seen = Instant::now();
    assert_eq!(receiver.count(), 5, "five failures open the breaker");

    // Cool-down: nothing is sent. Then the receiver recovers, and answers slowly so that a
    // second concurrent probe would be seen.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(receiver.count(), 5, "no request while the breaker is open");
    receiver
        .state
        .delay_ms
        .store(150, std::sync::atomic::Ordering::SeqCst);
    receiver.succeed();

    eventually("the breaker closes", WAIT, || async {
        let b = consumer.admin().breaker(&endpoint).await?;
        (b.view.breaker.state == BreakerState::Closed).then_some(())
    })
    .await;
    let requests = receiver.requests();
    let probes: Vec<_> = requests[5..].iter().filter(|r| r.status == 200).collect();
    assert!(probes.len() >= 2, "two successful probes close it");
    assert!(
        probes[0].started >= opened_seen,
        "the first probe comes after the cool-down"
    );
    assert!(
        probes[1].started >= probes[0].finished,
        "HALF_OPEN lets one probe through at a time"
    );

    // The held deliveries still have their attempts and arrive now.
    eventually("every held delivery arrives", WAIT, || async {
        let ok: HashSet<String> = receiver
            .requests()
            .iter()
            .filter(|r| r.status == 200)
            .map(|r| r.event_id())
            .collect();
        (ok.len() == events.len()).then_some(())
    })
    .await;
    let dead = consumer
        .admin()
        .list_deliveries(&DeliveryFilter::state(DeliveryState::Dead))
        .await;
    assert_eq!(dead.unwrap().deliveries.len(), 0);
    consumer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_answering_429_with_retry_after_is_not_retried_sooner() {
    let (db, topic) = setup(1).await;
    let receiver = Receiver::failing_with(429).await;
    receiver
        .state
        .retry_after_secs
        .store(1, std::sync::atomic::Ordering::SeqCst);
    let mut c = config(&db, &topic);
    c.retry_schedule = "0ms,10ms,10ms".parse().unwrap();
    let mut consumer = spawn_app(&db, c).await;
    create_endpoint(&consumer, &receiver.url, &["message.*"]).await;
    let event = envelope(9);
    produce(&producer(), &topic, &event).await;
    receiver.wait_for_count("the first attempt", 1, WAIT).await;
    receiver.succeed();
    receiver
        .state
        .retry_after_secs
        .store(0, std::sync::atomic::Ordering::SeqCst);
    let delivered = eventually("the delivery succeeds", WAIT, || async {
        let filter = DeliveryFilter::event(&event.id);
        let page = consumer.admin().list_deliveries(&filter).await.unwrap();
        let first = page.deliveries.into_iter().next();
        first.filter(|d| d.fields.state == DeliveryState::Succeeded)
    })
    .await;
    assert_eq!(delivered.attempts, 2);
    let requests = receiver.requests();
    assert_eq!(requests.len(), 2);
    let gap = requests[1].started - requests[0].finished;
    assert!(
        gap >= Duration::from_millis(990),
        "retried {gap:?} after a 429 asking for 1 s (the schedule alone says 10 ms)"
    );
    consumer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_follow_the_schedule_then_the_delivery_is_dead_and_a_replay_delivers_it_once() {
    let (db, topic) = setup(1).await;
    let receiver = Receiver::failing_with(503).await;
    let mut c = config(&db, &topic);
    c.retry_schedule = "0ms,200ms,400ms".parse().unwrap();
    c.breaker.breaker_failures = 100;
    let mut consumer = spawn_app(&db, c).await;
    let (endpoint, _) = create_endpoint(&consumer, &receiver.url, &["message.*"]).await;
    let kafka = producer();
    let event = envelope(7);
    produce(&kafka, &topic, &event).await;

    let dead = eventually("the delivery is dead", WAIT, || async {
        let filter = DeliveryFilter::state(DeliveryState::Dead);
        let page = consumer.admin().list_deliveries(&filter).await.unwrap();
        page.deliveries.into_iter().next()
    })
    .await;
    assert_eq!(dead.fields.event_id, event.id);
    assert_eq!(dead.attempts, 3);
    let requests = receiver.requests();
    assert_eq!(requests.len(), 3, "three attempts, no more");
    let gaps: Vec<Duration> = requests
        .windows(2)
        .map(|w| w[1].started - w[0].finished)
        .collect();
    // ±20% jitter on 200 ms and 400 ms. Only lower bounds: a busy machine makes a gap longer,
    // never shorter (a CI run saw 455 ms for the 200 ms one). The second gap's bound, above the
    // first entry's 240 ms at most, shows that the schedule moved on to its next entry.
    assert!(gaps[0] >= Duration::from_millis(160), "{gaps:?}");
    assert!(gaps[1] >= Duration::from_millis(320), "{gaps:?}");

    let id = dead.fields.id;
    let detail = consumer.admin().delivery(id).await.unwrap();
    let attempts = &detail.attempts;
    assert_eq!(attempts.len(), 3);
    assert_eq!(attempts[0].status_code, Some(503));
    assert_eq!(attempts[0].response_body.as_deref(), Some("answered 503"));
    assert_eq!(detail.fields.correlation_id.as_deref(), Some("req_test_7"));

    receiver.succeed();
    let since = "2000-01-01T00:00:00Z".parse().ok();
    let window = ReplayWindow { since, until: None };
    let replay = consumer.admin().replay_dead(&endpoint, &window).await;
    assert_eq!(replay.unwrap().replayed, 1);
    eventually("the replay is delivered", WAIT, || async {
        let d = consumer.admin().delivery(id).await.unwrap();
        (d.fields.state == DeliveryState::Succeeded).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let delivered: Vec<_> = receiver
        .requests()
        .into_iter()
        .filter(|r| r.status == 200)
        .collect();
    assert_eq!(delivered.len(), 1, "the replay delivers once");
    assert_eq!(delivered[0].event_id(), event.id);

    // A receiver that answers `webhook-delivery: abort-message` makes it dead at once.
    receiver.fail_with(400);
    receiver
        .state
        .abort
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let aborted = envelope(8);
    produce(&kafka, &topic, &aborted).await;
    let d = eventually("the aborted delivery is dead", WAIT, || async {
        let filter = DeliveryFilter::event(&aborted.id).and_state(DeliveryState::Dead);
        let page = consumer.admin().list_deliveries(&filter).await.unwrap();
        page.deliveries.into_iter().next()
    })
    .await;
    assert_eq!(d.attempts, 1, "no retry after abort-message");
    // Retry of one dead delivery, then 409 for a delivery that is not dead.
    receiver
        .state
        .abort
        .store(false, std::sync::atomic::Ordering::SeqCst);
    receiver.succeed();
    let queued = consumer.admin().retry_delivery(d.fields.id).await.unwrap();
    assert_eq!(queued.state, DeliveryState::Pending);
    eventually("the retried delivery succeeds", WAIT, || async {
        let x = consumer.admin().delivery(d.fields.id).await.unwrap();
        (x.fields.state == DeliveryState::Succeeded).then_some(())
    })
    .await;
    let refused = consumer
        .admin()
        .retry_delivery(d.fields.id)
        .await
        .unwrap_err();
    assert_eq!((refused.status, refused.code.as_str()), (409, "not_dead"));
    // Deleting the endpoint takes its deliveries and their attempts with it.
    let endpoint_id = &d.fields.endpoint_id;
    consumer.admin().delete_endpoint(endpoint_id).await.unwrap();
    let client = db.client().await;
    let left: (i64, i64) = {
        let row = client
            .query_one(
                "select (select count(*) from deliveries), (select count(*) from delivery_attempts)",
                &[],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert_eq!(
        left,
        (0, 0),
        "deliveries and attempts of the deleted endpoint"
    );
    consumer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_killed_mid_batch_and_restarted_delivers_everything_and_duplicates_once() {
    let (db, topic) = setup(3).await;
    let a = Receiver::start().await;
    let b = Receiver::start().await;
    // Slow receivers, so the kill lands while requests are in flight.
    a.state
        .delay_ms
        .store(20, std::sync::atomic::Ordering::SeqCst);
    b.state
        .delay_ms
        .store(20, std::sync::atomic::Ordering::SeqCst);
    let mut c = config(&db, &topic);
    c.endpoint_concurrency = 4;
    c.delivery_timeout = Duration::from_secs(1);
    c.delivery_lease = Duration::from_secs(2);
    let mut first = spawn_app(&db, c.clone()).await;
    let (ea, _) = create_endpoint(&first, &a.url, &["message.created"]).await;
    let (eb, _) = create_endpoint(&first, &b.url, &["*"]).await;
    let kafka = producer();
    let events: Vec<_> = (0..300).map(envelope).collect();
    produce_all(&kafka, &topic, &events).await;
    eventually("some deliveries arrived", WAIT, || async {
        (a.count() + b.count() >= 40).then_some(())
    })
    .await;
    first.kill().await;
    let at_kill = a.count() + b.count();
    assert!(at_kill < 2 * events.len(), "killed before the end");

    // The same events again: Kafka now holds every event twice.
    produce_all(&kafka, &topic, &events[..50]).await;
    let mut second = spawn_app(&db, c).await;
    for receiver in [&a, &b] {
        let what = "every event arrives at every endpoint";
        receiver
            .wait_for_events(what, &events, Duration::from_secs(60))
            .await;
    }
    let count = |sql: &'static str| db.count(sql);
    assert_eq!(count("select count(*) from inbox").await, 300);
    // One delivery per (event, endpoint); the unique constraint forbids a second.
    support::wait_for_succeeded(&db, 600).await;
    let dup = db
        .count("select count(*) from (select event_id, endpoint_id from deliveries group by 1, 2 having count(*) > 1) x")
        .await;
    assert_eq!(dup, 0);
    let _ = (ea, eb);

    // Without a crash, a record produced twice reaches each endpoint exactly once.
    let fresh: Vec<_> = (1000..1010).map(envelope).collect();
    produce_all(&kafka, &topic, fresh.iter().chain(fresh.iter())).await;
    for receiver in [&a, &b] {
        eventually("the fresh events arrive", WAIT, || async {
            let counts = receiver.counts_by_event();
            fresh
                .iter()
                .all(|e| counts.contains_key(&e.id))
                .then_some(())
        })
        .await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    for receiver in [&a, &b] {
        let counts = receiver.counts_by_event();
        for e in &fresh {
            assert_eq!(counts[&e.id], 1, "a duplicate record is delivered once");
        }
    }
    let metrics = second.metrics().await;
    assert!(
        metrics.contains("consumer_events_duplicate_total"),
        "{metrics}"
    );
    second.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_records_are_recorded_and_skipped_and_bad_admin_input_gets_json_errors() {
    let (db, topic) = setup(1).await;
    let mut c = config(&db, &topic);
    c.allow_private_endpoints = false;
    c.admin_token = Some("s3cret".into());
    let mut consumer = spawn_app(&db, c).await;
    let kafka = producer();
    produce_raw(&kafka, &topic, b"this is not json").await;
    produce_raw(&kafka, &topic, br#"{"id": "evt_x"}"#).await;
    let good = envelope(1);
    produce(&kafka, &topic, &good).await;

    let poison = eventually("poison records are listed", WAIT, || async {
        let list = consumer
            .admin()
            .poison_records()
            .await
            .unwrap()
            .poison_records;
        (list.len() == 2).then_some(list)
    })
    .await;
    assert_eq!(poison[0].topic, topic);
    assert_eq!(poison[0].partition, 0);
    assert_eq!(poison[0].offset, 0);
    assert_eq!(poison[1].offset, 1);
    assert!(poison[0].error.contains("envelope"));
    db.wait_for_count(
        "the good event after the poison is recorded",
        "select count(*) from inbox",
        1,
        WAIT,
    )
    .await;

    // Consumer lag comes from librdkafka's statistics once the offsets are committed.
    eventually("the lag gauge shows the partition", WAIT, || async {
        let text =
            outbox_core::testing::try_get_text(&consumer.http, &consumer.url("/metrics")).await?;
        text.lines()
            .any(|l| {
                l.starts_with("consumer_lag_records") && l.contains(&topic) && l.ends_with(" 0")
            })
            .then_some(())
    })
    .await;

    // Admin input.
    let without_token = outbox_core::testing::ApiClient {
        token: None,
        ..consumer.admin()
    };
    let refused = without_token.list_endpoints().await.unwrap_err();
    assert_eq!(
        (refused.status, refused.code.as_str()),
        (401, "unauthorized")
    );

    let cases = [
        (
            json!({"url": "not a url", "event_types": ["*"]}),
            422,
            "invalid_url",
        ),
        (
            json!({"url": "ftp://example.com/x", "event_types": ["*"]}),
            422,
            "invalid_url",
        ),
        (
            json!({"url": "http://127.0.0.1:9/x", "event_types": ["*"]}),
            422,
            "private_url",
        ),
        (
            json!({"url": "http://169.254.169.254/", "event_types": ["*"]}),
            422,
            "private_url",
        ),
        (
            json!({"url": "http://localhost/", "event_types": ["*"]}),
            422,
            "private_url",
        ),
        (
            json!({"url": "https://example.com/x", "event_types": ["Message Created"]}),
            422,
            "invalid_event_type",
        ),
        (
            json!({"url": "https://example.com/x", "event_types": []}),
            422,
            "invalid_event_type",
        ),
        (
            json!({"url": "https://example.com/x", "event_types": ["*"], "secret": "nope"}),
            422,
            "invalid_secret",
        ),
        (json!({"url": "https://example.com/x"}), 422, "invalid_body"),
        (
            json!({"url": "https://example.com/x", "event_types": ["*"], "colour": "red"}),
            422,
            "invalid_body",
        ),
    ];
    for (body, status, code) in cases {
        let (got, answer) = consumer
            .call("POST", "/endpoints", Some(body.clone()))
            .await;
        assert_eq!(
            (got, answer["code"].as_str()),
            (status, Some(code)),
            "{body} → {answer}"
        );
        assert!(answer["error"].is_string());
    }
    let raw = consumer
        .http
        .post(consumer.url("/endpoints"))
        .bearer_auth("s3cret")
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(raw.status().as_u16(), 400);
    let answer: serde_json::Value = raw.json().await.unwrap();
    assert_eq!(answer["code"], "malformed_json");
    assert_eq!(
        db.count("select count(*) from endpoints").await,
        0,
        "bad input changed nothing"
    );

    // A good public endpoint (its event type matches nothing we produce, so nothing is sent).
    let admin = consumer.admin();
    let created = admin
        .create_endpoint(&NewEndpoint::new("https://example.com/hooks", &["order.*"]))
        .await
        .unwrap();
    assert!(created.secret.unwrap().starts_with("whsec_"));
    let id = created.id.as_str();
    let to_private = EndpointChange {
        url: Some("http://10.0.0.1/x".into()),
        ..EndpointChange::default()
    };
    let patched = admin.update_endpoint(id, &to_private).await.unwrap_err();
    assert_eq!(
        (patched.status, patched.code.as_str()),
        (422, "private_url")
    );
    let disabled = admin.set_enabled(id, false).await.unwrap();
    assert!(!disabled.enabled);
    let listed = admin.list_endpoints().await.unwrap();
    assert!(listed[0].secret.is_none(), "lists hide secrets");
    let (status, _) = consumer.call("GET", "/deliveries/abc", None).await;
    assert_eq!(status, 400);
    let (status, _) = consumer.call("GET", "/deliveries?state=weird", None).await;
    assert_eq!(status, 400);
    admin.delete_endpoint(id).await.unwrap();
    let gone = admin.endpoint(id).await.unwrap_err();
    assert_eq!((gone.status, gone.code.as_str()), (404, "not_found"));
    consumer.stop().await;
}

#[test]
fn help_shows_no_secret_values() {
    outbox_core::testing::assert_help_hides_secrets(env!("CARGO_BIN_EXE_consumer"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_admin_token_every_admin_route_needs_it_and_operations_stay_open() {
    let (db, topic) = setup(1).await;
    let mut c = config(&db, &topic);
    c.admin_token = Some("s3cret".into());
    let mut consumer = spawn_app(&db, c).await;
    let calls = every_route();
    outbox_core::testing::assert_admin_token_guards(
        &consumer.base,
        "s3cret",
        consumer::OPEN_ROUTES,
        &calls,
    )
    .await;
    consumer.stop().await;
}
