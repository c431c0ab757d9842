//! The broker's view of consumer-group lag, exported under kafka-exporter's names
//! (`kafka_consumergroup_lag{consumergroup,topic,partition}`, `kafka_consumergroup_lag_sum
//! {consumergroup,topic}`), so dashboards and alerts work the same with either.
//!
//! Lag is read from the broker, not from the consumer: a group's committed offsets (an offset
//! fetch by a client with that `group.id` that never subscribes, so it never joins the group or
//! disturbs its assignment) against each partition's high watermark. It therefore stays visible,
//! and keeps growing, while every consumer of the group is down.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use crate::Metrics;
use outbox_core::shutdown::sleep_or_cancel;

/// How long one broker request of a poll may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// One partition's lag as the broker sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionLag {
    pub topic: String,
    pub partition: i32,
    /// High watermark − committed offset; −1 when the group has committed nothing there (as
    /// kafka-exporter reports it).
    pub lag: i64,
}

/// The lag of a partition whose group committed `committed` (None: nothing yet) and whose newest
/// offset is `high_watermark`. Never negative when known: a committed offset can run ahead of a
/// high watermark read a moment earlier.
pub fn lag_of(committed: Option<i64>, high_watermark: i64) -> i64 {
    committed.map_or(-1, |c| (high_watermark - c).max(0))
}

/// The sum of the known lags per topic (kafka-exporter's `_sum`: unknown partitions left out).
pub fn sums(lags: &[PartitionLag]) -> HashMap<String, i64> {
    let mut sums = HashMap::new();
    for l in lags {
        *sums.entry(l.topic.clone()).or_insert(0) += l.lag.max(0);
    }
    sums
}

/// Polls the lag of every group in `groups` on `topics` every `interval` until `shutdown`. A group
/// whose offsets cannot be read this time (Kafka down) loses its series until the next good read,
/// so a graph shows a gap rather than a frozen value.
pub async fn export(
    brokers: String,
    groups: Vec<String>,
    topics: Vec<String>,
    interval: Duration,
    metrics: Metrics,
    shutdown: CancellationToken,
) {
    let mut readers = Vec::new();
    for group in groups {
        let reader: Result<BaseConsumer, _> =
            outbox_core::kafka::base_config(&brokers, "outbox-relay-lag")
                .set("group.id", &group)
                .set("enable.auto.commit", "false")
                .create();
        match reader {
            Ok(r) => readers.push((group, Arc::new(r))),
            Err(error) => tracing::error!(%error, group, "cannot create the lag reader"),
        }
    }
    let topics = Arc::new(topics);
    let mut exported: HashMap<String, HashSet<(String, i32)>> = HashMap::new();
    while !shutdown.is_cancelled() {
        for (group, reader) in &readers {
            let (reader, topics) = (reader.clone(), topics.clone());
            let read = tokio::task::spawn_blocking(move || read_lag(&reader, &topics)).await;
            let lags = match read {
                Ok(Ok(lags)) => lags,
                Ok(Err(error)) => {
                    tracing::warn!(%error, group, "cannot read the group's lag");
                    Vec::new()
                }
                Err(_) => Vec::new(),
            };
            let shown = exported.entry(group.clone()).or_default();
            publish(&metrics, group, &lags, shown);
        }
        sleep_or_cancel(interval, &shutdown).await;
    }
}

/// Sets the group's series to `lags` and removes those of partitions no longer in it.
fn publish(
    metrics: &Metrics,
    group: &str,
    lags: &[PartitionLag],
    shown: &mut HashSet<(String, i32)>,
) {
    let now: HashSet<(String, i32)> = lags
        .iter()
        .map(|l| (l.topic.clone(), l.partition))
        .collect();
    for (topic, partition) in shown.difference(&now) {
        let _ = metrics
            .group_lag
            .remove_label_values(&[group, topic, &partition.to_string()]);
    }
    let topics_now: HashSet<&str> = now.iter().map(|(t, _)| t.as_str()).collect();
    for topic in shown.iter().map(|(t, _)| t.as_str()) {
        if !topics_now.contains(topic) {
            let _ = metrics.group_lag_sum.remove_label_values(&[group, topic]);
        }
    }
    for l in lags {
        metrics
            .group_lag
            .with_label_values(&[group, &l.topic, &l.partition.to_string()])
            .set(l.lag);
    }
    for (topic, sum) in sums(lags) {
        metrics
            .group_lag_sum
            .with_label_values(&[group, &topic])
            .set(sum);
    }
    *shown = now;
}

/// The group's lag on each partition of `topics` it has committed on, as `kafka-consumer-groups
/// --describe` lists them; a topic the group never committed on is left out.
fn read_lag(reader: &BaseConsumer, topics: &[String]) -> Result<Vec<PartitionLag>, KafkaError> {
    let mut lags = Vec::new();
    for topic in topics {
        let metadata = reader.fetch_metadata(Some(topic), REQUEST_TIMEOUT)?;
        let mut wanted = TopicPartitionList::new();
        for t in metadata.topics().iter().filter(|t| t.error().is_none()) {
            for p in t.partitions() {
                wanted.add_partition(topic, p.id());
            }
        }
        if wanted.count() == 0 {
            continue;
        }
        let committed = reader.committed_offsets(wanted, REQUEST_TIMEOUT)?;
        let offsets: Vec<(i32, Option<i64>)> = committed
            .elements()
            .iter()
            .map(|e| match e.offset() {
                Offset::Offset(o) => (e.partition(), Some(o)),
                _ => (e.partition(), None),
            })
            .collect();
        if offsets.iter().all(|(_, o)| o.is_none()) {
            continue;
        }
        for (partition, committed) in offsets {
            let (_, high) = reader.fetch_watermarks(topic, partition, REQUEST_TIMEOUT)?;
            lags.push(PartitionLag {
                topic: topic.clone(),
                partition,
                lag: lag_of(committed, high),
            });
        }
    }
    lags.sort_by_key(|l| (l.topic.clone(), l.partition));
    Ok(lags)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_is_the_distance_to_the_high_watermark_and_unknown_without_a_commit() {
        assert_eq!(lag_of(Some(40), 50), 10);
        assert_eq!(lag_of(Some(50), 50), 0);
        assert_eq!(lag_of(Some(51), 50), 0, "a commit read after the watermark");
        assert_eq!(lag_of(None, 50), -1);
    }

    #[test]
    fn sums_leave_out_unknown_partitions() {
        let l = |topic: &str, partition, lag| PartitionLag {
            topic: topic.into(),
            partition,
            lag,
        };
        let sums = sums(&[l("a", 0, 3), l("a", 1, -1), l("a", 2, 4), l("b", 0, 0)]);
        assert_eq!(sums["a"], 7);
        assert_eq!(sums["b"], 0);
    }
}
