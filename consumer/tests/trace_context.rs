//! A delivery's trace context outlives the consumer instance that recorded its event: a retry made
//! by a new instance (after the first one stopped) sends a `traceparent` of the Kafka record's
//! trace. Spans are exported (to an OTLP sink in this test), as with OTEL_EXPORTER_OTLP_ENDPOINT.

mod support;

use std::time::Duration;

use outbox_core::testing::eventually;
use support::*;

const WAIT: Duration = Duration::from_secs(30);

/// The trace id of a W3C `traceparent` (`00-<trace id>-<span id>-<flags>`).
fn trace_id(traceparent: &str) -> &str {
    traceparent.split('-').nth(1).unwrap_or("")
}

/// Turns span export on for this test binary: an OTLP/HTTP sink on loopback that accepts every
/// export, named by OTEL_EXPORTER_OTLP_ENDPOINT before the subscriber is installed.
async fn export_spans() {
    let app = axum::Router::new().route("/v1/traces", axum::routing::post(|| async { "" }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    // The only test in this binary: nothing else reads the environment concurrently.
    std::env::set_var("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint);
    outbox_core::telemetry::init_service("consumer");
    assert!(outbox_core::telemetry::exporting(), "span export is on");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_by_a_new_consumer_instance_continues_the_kafka_records_trace() {
    export_spans().await;
    let (db, topic) = setup(1).await;
    let receiver = Receiver::failing_with(500).await;
    let mut cfg = config(&db, &topic);
    // The first attempt at once, the retry an hour later: only the test makes it due sooner.
    cfg.retry_schedule = "0ms,1h,1h".parse().unwrap();
    let mut first = spawn_app(&db, cfg.clone()).await;
    create_endpoint(&first, &receiver.url, &["message.created"]).await;

    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let header = format!("00-{trace}-00f067aa0ba902b7-01");
    let event = envelope(1);
    produce_with_headers(&producer(), &topic, &event, &[("traceparent", &header)]).await;
    eventually("the first attempt is answered 500", WAIT, || async {
        (receiver.count() == 1).then_some(())
    })
    .await;
    eventually("the failed attempt is recorded", WAIT, || async {
        let n = db
            .count("select count(*) from deliveries where state = 'pending' and attempts = 1")
            .await;
        (n == 1).then_some(())
    })
    .await;
    first.stop().await;

    let stored: Option<String> = db
        .client()
        .await
        .query_one("select traceparent from deliveries", &[])
        .await
        .unwrap()
        .get(0);
    let stored = stored.expect("the delivery keeps a traceparent");
    assert_eq!(trace_id(&stored), trace, "stored: {stored}");

    receiver.succeed();
    let mut second = spawn_app(&db, cfg).await;
    db.client()
        .await
        .execute("update deliveries set next_attempt_at = now()", &[])
        .await
        .unwrap();
    eventually("the retry arrives", WAIT, || async {
        (receiver.count() == 2).then_some(())
    })
    .await;
    wait_for_succeeded(&db, 1).await;
    second.stop().await;

    let requests = receiver.requests();
    assert_eq!(requests[1].event_id(), event.id);
    let (first_sent, retry_sent) = (
        requests[0].header("traceparent"),
        requests[1].header("traceparent"),
    );
    assert_eq!(trace_id(first_sent), trace, "first attempt: {first_sent}");
    assert_eq!(trace_id(retry_sent), trace, "retry: {retry_sent}");
    assert_ne!(
        first_sent, retry_sent,
        "each attempt is a span of its own, sent as the webhook's parent"
    );
}
