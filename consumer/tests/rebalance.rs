//! The group's offsets: rebalances lose nothing (a second consumer joins the group while events
//! stream in, then the first one leaves, and every event still reaches the endpoint, once per
//! (event, endpoint)); recorded offsets are committed on the interval and when a consumer stops.

mod support;

use std::time::Duration;

use outbox_core::testing::eventually;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};
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

/// Per partition (0 to `partitions` - 1): the offset `group` has committed on `topic`, None where
/// it has committed nothing, and the high watermark. Read from the broker.
async fn committed_and_high(group: &str, topic: &str, partitions: i32) -> Vec<(Option<i64>, i64)> {
    let (group, topic) = (group.to_owned(), topic.to_owned());
    tokio::task::spawn_blocking(move || {
        let reader: BaseConsumer = outbox_core::kafka::base_config(
            &outbox_core::testing::kafka_brokers(),
            "offsets-reader",
        )
        .set("group.id", &group)
        .set("enable.auto.commit", "false")
        .create()
        .expect("reader");
        let mut wanted = TopicPartitionList::new();
        for p in 0..partitions {
            wanted.add_partition(&topic, p);
        }
        let timeout = Duration::from_secs(10);
        let committed = reader
            .committed_offsets(wanted, timeout)
            .expect("committed offsets");
        (0..partitions)
            .map(|p| {
                let offset = match committed.find_partition(&topic, p).map(|e| e.offset()) {
                    Some(Offset::Offset(o)) => Some(o),
                    _ => None,
                };
                let (_, high) = reader
                    .fetch_watermarks(&topic, p, timeout)
                    .expect("watermarks");
                (offset, high)
            })
            .collect()
    })
    .await
    .expect("reader task")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recorded_offsets_are_committed_on_the_interval_and_when_the_consumer_stops() {
    let (db, topic) = setup(2).await;
    let receiver = Receiver::start().await;
    let mut c = config(&db, &topic);
    c.consumer_commit_interval = Duration::from_secs(3600);
    let mut first = spawn_app(&db, c.clone()).await;
    create_endpoint(&first, &receiver.url, &["*"]).await;
    let kafka = producer();
    let events: Vec<_> = (0..40).map(envelope).collect();
    produce_all(&kafka, &topic, &events).await;
    support::wait_for_each_delivered_once(&db, &receiver, "every event delivered", &events).await;
    let group = c.consumer_group.clone();
    let before = committed_and_high(&group, &topic, 2).await;
    assert!(
        before.iter().all(|(committed, _)| committed.is_none()),
        "recorded batches are not committed one by one: {before:?}"
    );
    assert_eq!(before.iter().map(|(_, high)| high).sum::<i64>(), 40);

    first.stop().await;
    let stopped = committed_and_high(&group, &topic, 2).await;
    assert!(
        stopped
            .iter()
            .all(|(committed, high)| *committed == Some(*high)),
        "a consumer that stops commits everything it recorded: {stopped:?}"
    );

    // The next member of the group reads on from there, and commits on its interval.
    c.consumer_commit_interval = Duration::from_millis(200);
    let mut second = spawn_app(&db, c).await;
    let all: Vec<_> = events.into_iter().chain((40..44).map(envelope)).collect();
    produce_all(&kafka, &topic, &all[40..]).await;
    support::wait_for_each_delivered_once(&db, &receiver, "the new events delivered", &all).await;
    assert_eq!(
        consumed(&second).await,
        4,
        "nothing recorded before is read again"
    );
    eventually("the interval's commit", Duration::from_secs(10), || async {
        let now = committed_and_high(&group, &topic, 2).await;
        now.iter()
            .all(|(committed, high)| *committed == Some(*high))
            .then_some(())
    })
    .await;
    assert_eq!(receiver.count(), 44, "each event was sent once");
    second.stop().await;
}
