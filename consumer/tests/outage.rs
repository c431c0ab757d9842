//! PostgreSQL stopped under the consumer while events keep arriving: it stays up, reports
//! not-ready, and once PostgreSQL is back every event is recorded and delivered once. Runs on the
//! chaos stack's own PostgreSQL (`scripts/stack.sh pg-stop` / `pg-start`), so other tests keep theirs.

mod support;

use std::time::Duration;

use outbox_core::testing::{self, chaos_stack, eventually, TestDb, CHAOS_POSTGRES};
use support::{config, create_endpoint, envelope, produce_all, producer, spawn_app, Receiver};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_stopped_under_the_consumer_loses_nothing() {
    chaos_stack("pg-start");
    let db = TestDb::create_on(CHAOS_POSTGRES).await;
    let topic = testing::unique_topic("consumer-pg-outage");
    testing::create_topic(&topic, 3).await;
    let receiver = Receiver::start().await;
    let mut consumer = spawn_app(&db, config(&db, &topic)).await;
    create_endpoint(&consumer, &receiver.url, &["*"]).await;
    let kafka = producer();
    let events: Vec<_> = (0..150).map(envelope).collect();
    produce_all(&kafka, &topic, &events[..50]).await;
    eventually(
        "the first events delivered",
        Duration::from_secs(30),
        || async { (receiver.counts_by_event().len() == 50).then_some(()) },
    )
    .await;

    chaos_stack("pg-stop");
    produce_all(&kafka, &topic, &events[50..]).await;
    eventually(
        "the consumer reports not-ready",
        Duration::from_secs(15),
        || async { (consumer.try_status("/ready").await? == 503).then_some(()) },
    )
    .await;
    assert!(
        !consumer.is_finished(),
        "the consumer keeps running while PostgreSQL is down"
    );

    chaos_stack("pg-start");
    support::wait_for_each_delivered_once(
        &db,
        &receiver,
        "every event delivered after PostgreSQL's return",
        &events,
    )
    .await;
    consumer.stop().await;
    chaos_stack("pg-stop");
}
