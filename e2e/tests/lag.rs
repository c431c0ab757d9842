//! Consumer lag, three ways, agreeing: the relay's broker view (`kafka_consumergroup_lag`),
//! Kafka's own `kafka-consumer-groups --describe` (ConsumerGroupCommand from the broker jars
//! `scripts/stack.sh` fetched), and the consumer's `consumer_lag_records`. The consumer is one this
//! test starts and stops in-process; the shared broker keeps running.

mod support;

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use outbox_core::testing::{eventually, kafka_brokers};
use support::Stack;

/// Records published while the consumer is down.
const BACKLOG: usize = 40;

#[tokio::test]
async fn broker_lag_from_the_relay_agrees_with_kafka_consumer_groups_and_falls_to_zero() {
    let mut stack = Stack::start(&kafka_brokers()).await;

    // Warm up until the group has committed on every partition (the topic has 3), so that the whole
    // backlog lands on partitions with a known lag, and everything posted so far is consumed.
    let warm_up = Mutex::new(HashSet::new());
    eventually(
        "the group committed every record on every partition",
        Duration::from_secs(60),
        || async {
            let received = stack.received_ids().await;
            let lags = stack
                .lags(&stack.relay.base, "kafka_consumergroup_lag")
                .await;
            let done = {
                let posted = warm_up.lock().unwrap();
                posted.is_subset(&received) && lags.len() == 3 && lags.values().all(|&l| l == 0)
            };
            if !done {
                let n = warm_up.lock().unwrap().len();
                if let Some(id) = stack.post(format!("warm-up {n}"), "req_lag_warm").await {
                    warm_up.lock().unwrap().insert(id);
                }
            }
            done.then_some(())
        },
    )
    .await;

    stack.stop_consumer().await;
    for i in 0..BACKLOG {
        stack
            .post(format!("backlog {i}"), "req_lag_backlog")
            .await
            .expect("201");
    }
    stack
        .db
        .wait_for_count(
            "the backlog reached Kafka",
            "select count(*) from outbox where state <> 'E'",
            0,
            Duration::from_secs(30),
        )
        .await;

    let relay = eventually(
        "the relay reports the whole backlog as lag",
        Duration::from_secs(30),
        || async {
            let text = stack.metrics(&stack.relay.base).await;
            let sum = outbox_core::testing::metric_total(
                &text,
                "kafka_consumergroup_lag_sum",
                &[
                    &format!("consumergroup=\"{}\"", stack.group),
                    &format!("topic=\"{}\"", stack.topic),
                ],
            );
            (sum as usize == BACKLOG).then(|| {
                partition_lags(&text, "kafka_consumergroup_lag", &stack.group, &stack.topic)
            })
        },
    )
    .await;
    assert_eq!(relay.values().sum::<i64>() as usize, BACKLOG);
    let describe = describe_group(&stack.brokers, &stack.group, &stack.topic).await;
    assert_eq!(
        relay, describe,
        "per partition, the relay's kafka_consumergroup_lag is kafka-consumer-groups' LAG"
    );

    stack.start_consumer().await;
    eventually(
        "the consumer's own lag and the broker view fall to 0",
        Duration::from_secs(60),
        || async {
            let own = partition_lags(
                &stack.metrics(&stack.consumer.base).await,
                "consumer_lag_records",
                "",
                &stack.topic,
            );
            let broker = partition_lags(
                &stack.metrics(&stack.relay.base).await,
                "kafka_consumergroup_lag",
                &stack.group,
                &stack.topic,
            );
            let zero = |m: &BTreeMap<i32, i64>| m.len() == 3 && m.values().all(|&l| l == 0);
            (zero(&own) && zero(&broker)).then_some(())
        },
    )
    .await;
    let after = describe_group(&stack.brokers, &stack.group, &stack.topic).await;
    assert!(
        after.len() == 3 && after.values().all(|&l| l == 0),
        "kafka-consumer-groups: {after:?}"
    );
}

impl Stack {
    async fn metrics(&self, base: &str) -> String {
        match self.http.get(format!("{base}/metrics")).send().await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        }
    }

    /// Partition → `metric` for this stack's topic (and group, where the metric has the label).
    async fn lags(&self, base: &str, metric: &str) -> BTreeMap<i32, i64> {
        let group = if metric.starts_with("kafka_") {
            self.group.as_str()
        } else {
            ""
        };
        partition_lags(&self.metrics(base).await, metric, group, &self.topic)
    }
}

/// Partition → value of `metric`'s series for `topic` (and `group`, unless empty) in Prometheus text.
fn partition_lags(text: &str, metric: &str, group: &str, topic: &str) -> BTreeMap<i32, i64> {
    let topic_label = format!("topic=\"{topic}\"");
    let group_label = format!("consumergroup=\"{group}\"");
    text.lines()
        .filter(|l| l.strip_prefix(metric).is_some_and(|r| r.starts_with('{')))
        .filter(|l| l.contains(&topic_label) && (group.is_empty() || l.contains(&group_label)))
        .filter_map(|l| {
            let partition = l
                .split("partition=\"")
                .nth(1)?
                .split('"')
                .next()?
                .parse()
                .ok()?;
            let value = l.rsplit(' ').next()?.parse::<f64>().ok()?;
            Some((partition, value as i64))
        })
        .collect()
}

/// Partition → LAG of `group` on `topic`, as `kafka-consumer-groups --describe` prints it.
async fn describe_group(brokers: &str, group: &str, topic: &str) -> BTreeMap<i32, i64> {
    let libs = kafka_libs();
    let args = [
        "-cp".to_owned(),
        format!("{}/*", libs.display()),
        "org.apache.kafka.tools.consumer.group.ConsumerGroupCommand".to_owned(),
        "--bootstrap-server".to_owned(),
        brokers.split(',').next().unwrap_or(brokers).to_owned(),
        "--describe".to_owned(),
        "--group".to_owned(),
        group.to_owned(),
    ];
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new("java").args(&args).output()
    })
    .await
    .unwrap()
    .expect("run java (scripts/stack.sh deps installs it)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "ConsumerGroupCommand failed: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // GROUP TOPIC PARTITION CURRENT-OFFSET LOG-END-OFFSET LAG CONSUMER-ID HOST CLIENT-ID
    stdout
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|c| c.len() >= 6 && c[0] == group && c[1] == topic)
        .filter_map(|c| Some((c[2].parse().ok()?, c[5].parse().ok()?)))
        .collect()
}

/// The Kafka jars scripts/stack.sh fetched (`TEST_KAFKA_LIBS` overrides).
fn kafka_libs() -> PathBuf {
    let dir = std::env::var_os("TEST_KAFKA_LIBS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let cache = std::env::var_os("KAFKA_CACHE_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    std::env::var_os("XDG_CACHE_HOME")
                        .map(PathBuf::from)
                        .unwrap_or_else(|| {
                            PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                                .join(".cache")
                        })
                        .join("outbox-relay")
                });
            cache.join("kafka-4.1.1").join("libs")
        });
    assert!(
        dir.is_dir(),
        "no Kafka jars in {} (scripts/stack.sh fetches them when it starts Kafka; TEST_KAFKA_LIBS overrides)",
        dir.display()
    );
    dir
}
