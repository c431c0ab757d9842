//! Rebalances lose nothing: a second consumer joins the group while events stream in, then the
//! first one leaves, and every event still reaches the endpoint, once per (event, endpoint).

mod support;

use support::{
    config, create_endpoint, envelope, produce_all, producer, setup, spawn_app, Receiver,
    TestConsumer,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_joining_and_one_leaving_lose_nothing() {
    let (db, topic) = setup(6).await;
    let receiver = Receiver::start().await;
    let c = config(&db, &topic);
    let mut first = spawn_app(&db, c.clone()).await;
    create_endpoint(&first, &receiver.url, &["*"]).await;
    let kafka = producer();
    let events: Vec<_> = (0..600).map(envelope).collect();

    produce_all(&kafka, &topic, &events[..200]).await;
    // A second member joins: the group rebalances while records are being read.
    let mut second = spawn_app(&db, c.clone()).await;
    produce_all(&kafka, &topic, &events[200..400]).await;
    // The first member leaves: its partitions move to the second.
    let consumed_by_first = consumed(&first).await;
    first.stop().await;
    produce_all(&kafka, &topic, &events[400..]).await;

    support::wait_for_each_delivered_once(&db, &receiver, "every event at the endpoint", &events)
        .await;
    let consumed_by_second = consumed(&second).await;
    assert!(consumed_by_first > 0, "the first member read records");
    assert!(
        consumed_by_second > 0,
        "the second member took partitions over"
    );
    let extra_requests = receiver.count() - 600;
    eprintln!(
        "rebalance: 600 events, 600 deliveries, {extra_requests} repeated requests; \
         records read: first {consumed_by_first}, second {consumed_by_second}"
    );
    second.stop().await;
}

/// `consumer_events_consumed_total` of one member, summed over topics.
async fn consumed(consumer: &TestConsumer) -> u64 {
    let text = consumer.metrics().await;
    outbox_core::testing::metric_total(&text, "consumer_events_consumed_total", &[]) as u64
}
