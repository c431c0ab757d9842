//! Environment configuration helpers shared by every service's `clap` definition.

use std::time::Duration;

/// The default `DATABASE_URL` of every service (contract).
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/outbox";
/// The default `KAFKA_BROKERS` (contract).
pub const DEFAULT_KAFKA_BROKERS: &str = "127.0.0.1:9092";

/// `DATABASE_URL`, shared by all four services.
#[derive(Debug, Clone, clap::Args)]
pub struct DatabaseArgs {
    /// PostgreSQL connection URL. Its value is never shown (in --help or logs) with the password.
    #[arg(long, env = "DATABASE_URL", default_value = DEFAULT_DATABASE_URL, hide_env_values = true)]
    pub database_url: String,
    /// Largest number of PostgreSQL connections this process opens.
    #[arg(long, env = "DATABASE_POOL_SIZE", default_value_t = 16)]
    pub database_pool_size: usize,
}

impl DatabaseArgs {
    /// The service's pool: `DATABASE_POOL_SIZE` connections to `DATABASE_URL` with `schemas` as
    /// their `search_path`, opened lazily (see [`crate::db::pool`]).
    pub fn pool(
        &self,
        schemas: &[crate::db::Schema],
    ) -> Result<crate::db::PgPool, crate::db::DbError> {
        crate::db::pool(&self.database_url, self.database_pool_size, schemas)
    }
}

/// `KAFKA_BROKERS`, shared by the services that talk to Kafka.
#[derive(Debug, Clone, clap::Args)]
pub struct KafkaArgs {
    /// Kafka bootstrap servers, comma-separated.
    #[arg(long, env = "KAFKA_BROKERS", default_value = DEFAULT_KAFKA_BROKERS)]
    pub kafka_brokers: String,
}

/// `HTTP_*` and `SHUTDOWN_GRACE`: how long the HTTP server of every service waits for a client,
/// how many connections it holds, and how long shutdown waits for them (see
/// [`crate::http::serve`]).
#[derive(Debug, Clone, clap::Args)]
pub struct HttpArgs {
    /// Longest time a client may take to send a complete request head (request line and
    /// headers), counted from the connection's accept, or from the first byte of a later request
    /// on a keep-alive connection; then the connection is closed.
    #[arg(long, env = "HTTP_HEADER_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub http_header_timeout: Duration,
    /// Longest time a request body may take to arrive in full, counted from its request head;
    /// then the request answers 408 and the connection is closed.
    #[arg(long, env = "HTTP_BODY_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub http_body_timeout: Duration,
    /// How long a keep-alive connection may wait for its next request before it is closed.
    #[arg(long, env = "HTTP_IDLE_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub http_idle_timeout: Duration,
    /// Most open HTTP connections. At the bound a new connection closes the oldest one that has
    /// no request in flight; when every connection has one, the new connection is closed.
    #[arg(long, env = "HTTP_MAX_CONNECTIONS", default_value_t = 512)]
    pub http_max_connections: usize,
    /// How long shutdown lets requests in flight finish; connections still open then are dropped.
    #[arg(long, env = "SHUTDOWN_GRACE", default_value = "10s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,
}

/// `BREAKER_FAILURES`, `BREAKER_OPEN_FOR`, `BREAKER_SUCCESSES`: the circuit breaker thresholds of
/// the consumer (per endpoint) and the notifier (per channel).
#[derive(Debug, Clone, clap::Args)]
pub struct BreakerArgs {
    /// Consecutive failures that open a circuit breaker.
    #[arg(long, env = "BREAKER_FAILURES", default_value_t = 5)]
    pub breaker_failures: u32,
    /// How long an open breaker lets nothing through before one probe may go.
    #[arg(long, env = "BREAKER_OPEN_FOR", default_value = "60s", value_parser = parse_duration)]
    pub breaker_open_for: Duration,
    /// Successful probes that close a half-open breaker.
    #[arg(long, env = "BREAKER_SUCCESSES", default_value_t = 2)]
    pub breaker_successes: u32,
}

impl BreakerArgs {
    /// The policy for a breaker whose probe is one call of at most `call_timeout`. A probe may take
    /// twice that plus 5 s of bookkeeping before another instance may probe in its place.
    pub fn policy(&self, call_timeout: Duration) -> crate::breaker::BreakerPolicy {
        crate::breaker::BreakerPolicy {
            failures_to_open: self.breaker_failures.max(1),
            open_for: self.breaker_open_for,
            successes_to_close: self.breaker_successes.max(1),
            probe_timeout: call_timeout * 2 + Duration::from_secs(5),
        }
    }
}

/// A service configuration read from the environment alone, with the defaults for everything
/// unset: what tests start from before overriding fields.
pub fn from_env<T: clap::Args>() -> Result<T, clap::Error> {
    #[derive(clap::Parser)]
    struct Wrapper<T: clap::Args> {
        #[command(flatten)]
        inner: T,
    }
    <Wrapper<T> as clap::Parser>::try_parse_from(["service"]).map(|w| w.inner)
}

/// Parses a duration written like `250ms`, `60s`, `5m`, `2h`, `30d` (a bare number is seconds).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("'{text}' is not a duration like 250ms, 60s, 5m, 2h or 30d"))?;
    let seconds = match unit.trim() {
        "ms" => value / 1000.0,
        "" | "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        "d" => value * 86_400.0,
        other => {
            return Err(format!(
                "unknown duration unit '{other}' in '{text}' (use ms, s, m, h or d)"
            ))
        }
    };
    if !seconds.is_finite() || seconds < 0.0 {
        return Err(format!("'{text}' is not a non-negative duration"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// `url` with its password replaced by `***`, for logs and messages: `postgres://user:***@host/db`.
/// Also masks a `password=` query parameter and `password=…` in a key/value connection string
/// (`host=h password=p`). Anything without a password comes back unchanged.
pub fn mask_password(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return mask_pairs(url, ' ');
    };
    let (scheme, rest) = url.split_at(scheme_end + 3);
    let (authority_and_path, query) = rest.split_at(rest.find(['?', '#']).unwrap_or(rest.len()));
    // Everything up to the last '@' is userinfo: a password with an unescaped '@' or '/' is then
    // masked whole (at worst the host is masked with it).
    let authority_and_path = match authority_and_path.rfind('@') {
        Some(at) => match authority_and_path[..at].find(':') {
            Some(colon) => format!(
                "{}:***{}",
                &authority_and_path[..colon],
                &authority_and_path[at..]
            ),
            None => authority_and_path.to_owned(),
        },
        None => authority_and_path.to_owned(),
    };
    format!("{scheme}{authority_and_path}{}", mask_pairs(query, '&'))
}

/// `key=value` pairs separated by `separator`, with the value of `password` masked.
fn mask_pairs(text: &str, separator: char) -> String {
    text.split(separator)
        .map(|pair| match pair.split_once('=') {
            Some((key, _)) if key.trim_start_matches('?').eq_ignore_ascii_case("password") => {
                format!("{key}=***")
            }
            _ => pair.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(&separator.to_string())
}

/// Formats a duration the way [`parse_duration`] reads it back, for `--help` defaults and logs.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    match ms {
        0 => "0s".into(),
        ms if ms % 3_600_000 == 0 => format!("{}h", ms / 3_600_000),
        ms if ms % 60_000 == 0 => format!("{}m", ms / 60_000),
        ms if ms % 1000 == 0 => format!("{}s", ms / 1000),
        ms => format!("{ms}ms"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_in_every_unit() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("60s"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("30d"), Ok(Duration::from_secs(30 * 86_400)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn passwords_are_masked_in_urls_and_connection_strings() {
        for (url, masked) in [
            ("postgres://u:hunter2@h/db", "postgres://u:***@h/db"),
            (
                "postgresql://app:p%40ss@db.example:5432/outbox?sslmode=require",
                "postgresql://app:***@db.example:5432/outbox?sslmode=require",
            ),
            (
                "postgres://u:p@ss/w@h:5432/db",
                "postgres://u:***@h:5432/db",
            ),
            ("postgres://u:@h/db", "postgres://u:***@h/db"),
            (
                "postgres://postgres@127.0.0.1:5432/outbox",
                "postgres://postgres@127.0.0.1:5432/outbox",
            ),
            ("postgres://h/db?user=u", "postgres://h/db?user=u"),
            (
                "postgres://h/db?user=u&password=hunter2&sslmode=disable",
                "postgres://h/db?user=u&password=***&sslmode=disable",
            ),
            (
                "postgres://h/db?password=hunter2",
                "postgres://h/db?password=***",
            ),
            (
                "host=h user=u password=hunter2 dbname=db",
                "host=h user=u password=*** dbname=db",
            ),
            ("host=h dbname=db", "host=h dbname=db"),
        ] {
            assert_eq!(mask_password(url), masked, "{url}");
            assert!(!mask_password(url).contains("hunter2"));
        }
    }

    #[test]
    fn formatting_round_trips() {
        for text in ["0s", "250ms", "60s", "5m", "2h"] {
            let d = parse_duration(text).unwrap();
            assert_eq!(parse_duration(&format_duration(d)), Ok(d));
        }
        assert_eq!(format_duration(Duration::from_secs(60)), "1m");
    }
}
