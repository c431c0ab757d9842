//! Which Kafka topic an event type goes to (`TOPIC_ROUTES`), shared by the producer, which stamps
//! each outbox row with its topic, and the relay, which creates those topics at start-up.

/// `KAFKA_TOPIC` and `TOPIC_ROUTES`, which the producer and the relay are given alike: the producer
/// stamps each outbox row with its topic, the relay creates every topic at start-up.
#[derive(Debug, Clone, clap::Args)]
pub struct TopicArgs {
    /// Topic of `message.*` events (the relay creates it at start-up when missing).
    #[arg(long, env = "KAFKA_TOPIC", default_value = "messages")]
    pub kafka_topic: String,
    /// Further event type → topic rules, first match wins: `order.*=orders,user.deleted=gdpr`
    /// (the relay creates their topics too).
    #[arg(long, env = "TOPIC_ROUTES", default_value = "")]
    pub topic_routes: String,
}

impl TopicArgs {
    /// The routes these settings name ([`TopicRoutes::parse`]).
    pub fn routes(&self) -> Result<TopicRoutes, String> {
        TopicRoutes::parse(&self.topic_routes, &self.kafka_topic)
    }
}

/// Event type → topic rules, first match wins: `message.*=messages,order.created=orders`.
/// A pattern is an exact type, a prefix ending in `.*`, or `*`.
#[derive(Debug, Clone, PartialEq)]
pub struct TopicRoutes {
    rules: Vec<(String, String)>,
}

impl TopicRoutes {
    /// The routes from `TOPIC_ROUTES`, then the default rule `message.*` → `default_topic`
    /// (`KAFKA_TOPIC`).
    pub fn parse(routes: &str, default_topic: &str) -> Result<Self, String> {
        let mut rules = Vec::new();
        for rule in routes.split(',').map(str::trim).filter(|r| !r.is_empty()) {
            let (pattern, topic) = rule
                .split_once('=')
                .ok_or_else(|| format!("topic route '{rule}' is not pattern=topic"))?;
            let (pattern, topic) = (pattern.trim(), topic.trim());
            if pattern.is_empty() || !valid_topic(topic) {
                return Err(format!(
                    "topic route '{rule}' needs an event type pattern and a valid topic name"
                ));
            }
            rules.push((pattern.to_owned(), topic.to_owned()));
        }
        if !valid_topic(default_topic) {
            return Err(format!("'{default_topic}' is not a valid topic name"));
        }
        rules.push(("message.*".to_owned(), default_topic.to_owned()));
        Ok(TopicRoutes { rules })
    }

    /// The topic for `event_type`, or `None` when no rule matches.
    pub fn topic_for(&self, event_type: &str) -> Option<&str> {
        self.rules
            .iter()
            .find(|(pattern, _)| matches(pattern, event_type))
            .map(|(_, topic)| topic.as_str())
    }

    /// Every topic some rule sends to, without repeats.
    pub fn topics(&self) -> Vec<String> {
        let mut topics: Vec<String> = Vec::new();
        for (_, topic) in &self.rules {
            if !topics.contains(topic) {
                topics.push(topic.clone());
            }
        }
        topics
    }
}

fn matches(pattern: &str, event_type: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some("") => true,
        Some(prefix) => event_type.starts_with(prefix),
        None => pattern == event_type,
    }
}

impl TopicRoutes {
    /// Writes the rules into `outbox.routes`, replacing what was there, so that `outbox.publish`
    /// routes SQL callers as this configuration routes the producer. The producer and the relay
    /// both do it at start-up; the last to start wins, so give them the same `TOPIC_ROUTES`.
    pub async fn store(&self, pool: &crate::db::PgPool) -> Result<(), crate::db::DbError> {
        let mut client = pool.get().await?;
        let tx = client.transaction().await?;
        let positions: Vec<i32> = (1..=self.rules.len() as i32).collect();
        let patterns: Vec<&str> = self.rules.iter().map(|(p, _)| p.as_str()).collect();
        let topics: Vec<&str> = self.rules.iter().map(|(_, t)| t.as_str()).collect();
        tx.batch_execute("lock table outbox.routes in exclusive mode; delete from outbox.routes")
            .await?;
        tx.execute(
            "insert into outbox.routes (position, pattern, topic)
             select * from unnest($1::int[], $2::text[], $3::text[])",
            &[&positions, &patterns, &topics],
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }
}

/// Kafka's rule for topic names: 1–249 of `[a-zA-Z0-9._-]`.
pub fn valid_topic(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 249
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// An event type is dot-separated lowercase words, e.g. `message.created`.
pub fn valid_event_type(name: &str) -> bool {
    name.len() <= 128
        && name.split('.').count() >= 2
        && name.split('.').all(|part| {
            !part.is_empty()
                && part
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_first_match_then_default() {
        let r = TopicRoutes::parse("order.*=orders, user.deleted=gdpr", "messages").unwrap();
        assert_eq!(r.topic_for("order.created"), Some("orders"));
        assert_eq!(r.topic_for("user.deleted"), Some("gdpr"));
        assert_eq!(r.topic_for("message.created"), Some("messages"));
        assert_eq!(r.topic_for("user.created"), None);
        assert_eq!(r.topics(), vec!["orders", "gdpr", "messages"]);
        let all = TopicRoutes::parse("*=everything", "messages").unwrap();
        assert_eq!(all.topic_for("message.created"), Some("everything"));
    }

    #[test]
    fn bad_routes_and_names_are_refused() {
        assert!(TopicRoutes::parse("order.*", "messages").is_err());
        assert!(TopicRoutes::parse("order.*=bad topic", "messages").is_err());
        assert!(TopicRoutes::parse("", "bad/topic").is_err());
        assert!(valid_event_type("message.created"));
        assert!(!valid_event_type("message"));
        assert!(!valid_event_type("Message.Created"));
        assert!(!valid_event_type("message..created"));
    }
}
