//! Kafka client settings shared by the relay and the consumer, and topic creation.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::types::RDKafkaErrorCode;

/// Settings every client gets: reconnect quickly once a broker is back, so that an outage ends
/// within seconds of the broker's return rather than after librdkafka's long default backoff.
pub fn base_config(brokers: &str, client_id: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", brokers)
        .set("client.id", client_id)
        .set("reconnect.backoff.ms", "100")
        .set("reconnect.backoff.max.ms", "1000")
        .set("socket.connection.setup.timeout.ms", "5000")
        .set("topic.metadata.refresh.interval.ms", "10000")
        .set("log_level", "4");
    config
}

/// True when a broker answers a metadata request within two seconds. `client` picks the
/// librdkafka client out of `handle` (a producer or a consumer: `|p| p.client()`); the request
/// blocks, so it runs on the blocking pool.
pub async fn is_reachable<H, C>(
    handle: H,
    client: impl Fn(&H) -> &rdkafka::client::Client<C> + Send + 'static,
) -> bool
where
    H: Send + 'static,
    C: rdkafka::client::ClientContext,
{
    tokio::task::spawn_blocking(move || {
        client(&handle)
            .fetch_metadata(None, Duration::from_secs(2))
            .is_ok()
    })
    .await
    .unwrap_or(false)
}

/// The idempotent producer (acks=all, ordered per partition, no duplicates from its own retries).
/// `message_timeout` bounds how long a record may wait for the broker before its delivery report
/// fails: short, so rows turn X promptly during an outage (librdkafka's default is 5 minutes).
pub fn idempotent_producer_config(
    brokers: &str,
    client_id: &str,
    message_timeout: Duration,
) -> ClientConfig {
    let mut config = base_config(brokers, client_id);
    config
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set(
            "message.timeout.ms",
            message_timeout.as_millis().to_string(),
        )
        .set("linger.ms", "0")
        .set("socket.nagle.disable", "true")
        .set("batch.num.messages", "10000")
        .set("batch.size", "1000000")
        .set("compression.type", "lz4")
        .set("queue.buffering.max.messages", "500000")
        .set("queue.buffering.max.kbytes", "1048576");
    config
}

/// Creates the topics that are missing, with `partitions` partitions and the cluster's own
/// replication factor (`default.replication.factor`: 1 on a single node, 3 on the local stack's
/// three-node cluster), so the services need no setting of their own for it. Existing topics are
/// left as they are.
pub async fn ensure_topics(
    brokers: &str,
    topics: &[String],
    partitions: i32,
) -> Result<(), String> {
    let admin: AdminClient<DefaultClientContext> = base_config(brokers, "outbox-admin")
        .create()
        .map_err(|e| format!("cannot create Kafka admin client: {e}"))?;
    let new: Vec<NewTopic> = topics
        .iter()
        // -1: the broker's default (KIP-464, Kafka 2.4+).
        .map(|t| NewTopic::new(t, partitions, TopicReplication::Fixed(-1)))
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let results = admin
        .create_topics(&new, &options)
        .await
        .map_err(|e| format!("cannot create topics: {e}"))?;
    for result in results {
        match result {
            Ok(topic) => tracing::info!(topic, partitions, "created topic"),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => return Err(format!("cannot create topic {topic}: {code}")),
        }
    }
    Ok(())
}
