//! Webhook endpoints: validation of what the admin API and the endpoints file accept, and the
//! SQL that stores them.

use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use outbox_core::db::PgPool;
use outbox_core::signature::Secret;
use serde::{Deserialize, Serialize};
use tokio_postgres::Row;
use tokio_util::sync::CancellationToken;

use crate::special_address;

/// Why an endpoint definition was refused. Each case is a 4xx for the admin API.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum InvalidEndpoint {
    #[error("'{0}' is not a URL")]
    Url(String),
    #[error("only http and https URLs are accepted, not '{0}'")]
    Scheme(String),
    #[error("the URL needs a host")]
    NoHost,
    #[error("{0}: webhooks may not reach private, loopback, link-local or other special-purpose addresses; set ALLOW_PRIVATE_ENDPOINTS=true to allow them")]
    PrivateAddress(String),
    #[error("event_types needs 1 to 64 entries")]
    EventTypeCount,
    #[error("'{0}' is not an event type: use '*', 'message.created' (lowercase words joined by dots) or a prefix like 'message.*'")]
    EventType(String),
    #[error("{0}")]
    Secret(#[from] outbox_core::signature::SecretError),
    #[error("an endpoint id is 1 to 64 of [A-Za-z0-9_.-]")]
    Id,
    #[error("rate_limit_per_second is between 1 and 100000")]
    RateLimit,
    #[error("a description holds at most 1024 characters")]
    Description,
}

impl InvalidEndpoint {
    /// The machine-readable code of the admin API's error body.
    pub fn code(&self) -> &'static str {
        match self {
            InvalidEndpoint::Url(_) | InvalidEndpoint::Scheme(_) | InvalidEndpoint::NoHost => {
                "invalid_url"
            }
            InvalidEndpoint::PrivateAddress(_) => "private_url",
            InvalidEndpoint::EventTypeCount | InvalidEndpoint::EventType(_) => "invalid_event_type",
            InvalidEndpoint::Secret(_) => "invalid_secret",
            InvalidEndpoint::Id => "invalid_id",
            InvalidEndpoint::RateLimit => "invalid_rate_limit",
            InvalidEndpoint::Description => "invalid_description",
        }
    }
}

/// Checks a webhook URL: http or https with a host; unless `allow_private`, the host may not be
/// `localhost` (or a `.localhost` name) nor an address [`special_address::classify`] refuses.
/// Names are not resolved here: the webhook client checks every address it connects to, literal
/// or resolved (see [`crate::webhook_client`]).
pub fn validate_url(text: &str, allow_private: bool) -> Result<url::Url, InvalidEndpoint> {
    let url = url::Url::parse(text.trim()).map_err(|_| InvalidEndpoint::Url(text.to_owned()))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(InvalidEndpoint::Scheme(url.scheme().to_owned()));
    }
    let host = url.host().ok_or(InvalidEndpoint::NoHost)?;
    if !allow_private {
        let refused = match host {
            url::Host::Ipv4(ip) => special_address::classify(IpAddr::V4(ip)).map(|s| s.to_string()),
            url::Host::Ipv6(ip) => special_address::classify(IpAddr::V6(ip)).map(|s| s.to_string()),
            url::Host::Domain(name) => {
                let name = name.trim_end_matches('.').to_ascii_lowercase();
                (name == "localhost" || name.ends_with(".localhost"))
                    .then(|| format!("{name} is a loopback name"))
            }
        };
        if let Some(reason) = refused {
            return Err(InvalidEndpoint::PrivateAddress(reason));
        }
    }
    Ok(url)
}

/// Checks an event type filter entry: `*`, an exact type (`message.created`), or a prefix
/// (`message.*`).
pub fn valid_filter(pattern: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    if let Some(prefix) = pattern.strip_suffix(".*") {
        return prefix.len() <= 120
            && prefix.split('.').all(|part| {
                !part.is_empty()
                    && part
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            });
    }
    outbox_core::routing::valid_event_type(pattern)
}

/// Checks an event type filter.
pub fn validate_event_types(types: &[String]) -> Result<(), InvalidEndpoint> {
    if types.is_empty() || types.len() > 64 {
        return Err(InvalidEndpoint::EventTypeCount);
    }
    match types.iter().find(|t| !valid_filter(t)) {
        Some(bad) => Err(InvalidEndpoint::EventType(bad.clone())),
        None => Ok(()),
    }
}

/// Checks an endpoint id given by a user (generated ids always pass).
pub fn validate_id(id: &str) -> Result<(), InvalidEndpoint> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    ok.then_some(()).ok_or(InvalidEndpoint::Id)
}

/// Checks an optional rate limit.
pub fn validate_rate_limit(limit: Option<i32>) -> Result<(), InvalidEndpoint> {
    match limit {
        Some(n) if !(1..=100_000).contains(&n) => Err(InvalidEndpoint::RateLimit),
        _ => Ok(()),
    }
}

/// Checks an optional description.
pub fn validate_description(description: Option<&str>) -> Result<(), InvalidEndpoint> {
    match description {
        Some(d) if d.chars().count() > 1024 => Err(InvalidEndpoint::Description),
        _ => Ok(()),
    }
}

/// A new endpoint id: `ep_` and a time-ordered UUID.
pub fn new_endpoint_id() -> String {
    format!("ep_{}", uuid::Uuid::now_v7().simple())
}

/// An endpoint as the admin API shows it. The secret appears only where the contract says so
/// (on creation and rotation, and at `GET /endpoints/{id}/secret`).
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Endpoint {
    pub id: String,
    pub url: String,
    pub description: Option<String>,
    pub event_types: Vec<String>,
    pub enabled: bool,
    pub rate_limit_per_second: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    /// While set and in the future, the previous secret still signs too.
    pub previous_secret_expires_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// The columns [`Endpoint::from_row`] reads.
pub const COLUMNS: &str = "id, url, description, event_types, enabled, rate_limit_per_second, \
     secret, case when previous_secret_expires_at > now() then previous_secret_expires_at end \
     as previous_secret_expires_at, created_at, updated_at";

impl Endpoint {
    /// Reads a row of [`COLUMNS`]; the secret is kept only when `with_secret`.
    pub fn from_row(row: &Row, with_secret: bool) -> Endpoint {
        Endpoint {
            id: row.get("id"),
            url: row.get("url"),
            description: row.get("description"),
            event_types: row.get("event_types"),
            enabled: row.get("enabled"),
            rate_limit_per_second: row.get("rate_limit_per_second"),
            secret: with_secret.then(|| row.get("secret")),
            previous_secret_expires_at: row.get("previous_secret_expires_at"),
            created_at: row.get("created_at"),
            updated_at: row.get("updated_at"),
        }
    }
}

/// One entry of the endpoints file (`ENDPOINTS_FILE`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeclaredEndpoint {
    pub id: String,
    pub url: String,
    pub event_types: Vec<String>,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub secret: Option<String>,
    #[serde(default)]
    pub rate_limit_per_second: Option<i32>,
}

/// Reads and validates the endpoints file. An entry without a secret gets a generated one on its
/// first upsert and keeps it afterwards.
pub fn read_file(path: &Path, allow_private: bool) -> anyhow::Result<Vec<DeclaredEndpoint>> {
    use anyhow::Context;
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read ENDPOINTS_FILE {}", path.display()))?;
    let declared: Vec<DeclaredEndpoint> = serde_json::from_str(&text).with_context(|| {
        format!(
            "ENDPOINTS_FILE {} is not a JSON array of {{id, url, event_types, description?, secret?}}",
            path.display()
        )
    })?;
    for e in &declared {
        let check = || -> Result<(), InvalidEndpoint> {
            validate_id(&e.id)?;
            validate_url(&e.url, allow_private)?;
            validate_event_types(&e.event_types)?;
            validate_rate_limit(e.rate_limit_per_second)?;
            validate_description(e.description.as_deref())?;
            if let Some(secret) = &e.secret {
                Secret::parse(secret)?;
            }
            Ok(())
        };
        check()
            .with_context(|| format!("endpoint '{}' in ENDPOINTS_FILE {}", e.id, path.display()))?;
    }
    Ok(declared)
}

// A changed secret in the file is a rotation: the stored one keeps signing for the grace period.
const UPSERT_DECLARED: &str = "
    insert into endpoints (id, url, description, event_types, secret, rate_limit_per_second)
    values ($1, $2, $3, $4, coalesce($5, $6), $7)
    on conflict (id) do update set
        url = excluded.url, description = excluded.description,
        event_types = excluded.event_types, rate_limit_per_second = excluded.rate_limit_per_second,
        previous_secret = case when $5 is not null and $5 <> endpoints.secret
                               then endpoints.secret else endpoints.previous_secret end,
        previous_secret_expires_at = case when $5 is not null and $5 <> endpoints.secret
                               then now() + make_interval(secs => $8) else endpoints.previous_secret_expires_at end,
        secret = coalesce($5, endpoints.secret),
        updated_at = now()";

/// Upserts the declared endpoints, retrying while PostgreSQL is unreachable. Returns false only
/// when shutdown came first.
pub async fn upsert_declared_until_done(
    pool: &PgPool,
    declared: &[DeclaredEndpoint],
    grace: Duration,
    shutdown: &CancellationToken,
) -> bool {
    if declared.is_empty() {
        return true;
    }
    let done = outbox_core::db::until_done("upserting ENDPOINTS_FILE", shutdown, || {
        upsert_declared(pool, declared, grace)
    })
    .await
    .is_some();
    if done {
        tracing::info!(
            count = declared.len(),
            "endpoints from ENDPOINTS_FILE upserted"
        );
    }
    done
}

async fn upsert_declared(
    pool: &PgPool,
    declared: &[DeclaredEndpoint],
    grace: Duration,
) -> anyhow::Result<()> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    for e in declared {
        let generated = Secret::generate();
        tx.execute(
            UPSERT_DECLARED,
            &[
                &e.id,
                &e.url.trim(),
                &e.description,
                &e.event_types,
                &e.secret.as_deref().map(str::trim),
                &generated.as_str(),
                &e.rate_limit_per_second,
                &grace.as_secs_f64(),
            ],
        )
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Loads one endpoint.
pub async fn get(
    db: &impl GenericClient,
    id: &str,
    with_secret: bool,
) -> Result<Option<Endpoint>, tokio_postgres::Error> {
    let sql = format!("select {COLUMNS} from endpoints where id = $1");
    Ok(db
        .query_opt(&sql, &[&id])
        .await?
        .map(|row| Endpoint::from_row(&row, with_secret)))
}

/// A new endpoint, checked: what `POST /endpoints` stores.
#[derive(Debug)]
pub struct NewEndpoint {
    pub id: String,
    pub url: String,
    pub description: Option<String>,
    pub event_types: Vec<String>,
    pub secret: Secret,
    pub rate_limit_per_second: Option<i32>,
    pub enabled: bool,
}

/// Checked changes to an endpoint: `None` leaves a field as it is, `Some(None)` clears it.
#[derive(Debug, Default)]
pub struct EndpointChanges {
    pub url: Option<String>,
    pub event_types: Option<Vec<String>>,
    pub description: Option<Option<String>>,
    pub rate_limit_per_second: Option<Option<i32>>,
    pub enabled: Option<bool>,
}

/// Stores a new endpoint; `None` when its id is taken. The answer shows the secret.
pub async fn insert(
    db: &impl GenericClient,
    new: &NewEndpoint,
) -> Result<Option<Endpoint>, tokio_postgres::Error> {
    let sql = format!(
        "insert into endpoints (id, url, description, event_types, secret, rate_limit_per_second, enabled)
         values ($1, $2, $3, $4, $5, $6, $7)
         on conflict (id) do nothing
         returning {COLUMNS}"
    );
    let row = db
        .query_opt(
            &sql,
            &[
                &new.id,
                &new.url,
                &new.description,
                &new.event_types,
                &new.secret.as_str(),
                &new.rate_limit_per_second,
                &new.enabled,
            ],
        )
        .await?;
    Ok(row.map(|row| Endpoint::from_row(&row, true)))
}

/// Every endpoint, oldest first, without secrets.
pub async fn list(db: &impl GenericClient) -> Result<Vec<Endpoint>, tokio_postgres::Error> {
    let sql = format!("select {COLUMNS} from endpoints order by created_at, id");
    Ok(db
        .query(&sql, &[])
        .await?
        .iter()
        .map(|row| Endpoint::from_row(row, false))
        .collect())
}

/// Applies `changes` in one transaction; disabling parks the endpoint's pending deliveries and
/// enabling releases them. `None` when there is no such endpoint.
pub async fn update(
    client: &mut deadpool_postgres::Client,
    id: &str,
    changes: &EndpointChanges,
) -> Result<Option<Endpoint>, tokio_postgres::Error> {
    let tx = client.transaction().await?;
    let sql = format!(
        "update endpoints set
            url = coalesce($2, url),
            event_types = coalesce($3, event_types),
            description = case when $4 then $5 else description end,
            rate_limit_per_second = case when $6 then $7 else rate_limit_per_second end,
            enabled = coalesce($8, enabled),
            updated_at = now()
          where id = $1
         returning {COLUMNS}"
    );
    let Some(row) = tx
        .query_opt(
            &sql,
            &[
                &id,
                &changes.url,
                &changes.event_types,
                &changes.description.is_some(),
                &changes.description.clone().flatten(),
                &changes.rate_limit_per_second.is_some(),
                &changes.rate_limit_per_second.flatten(),
                &changes.enabled,
            ],
        )
        .await?
    else {
        return Ok(None);
    };
    match changes.enabled {
        Some(true) => crate::delivery::store::release_parked(&*tx, id).await?,
        Some(false) => crate::delivery::store::park_for_disabled_endpoint(&*tx, id).await?,
        None => 0,
    };
    tx.commit().await?;
    Ok(Some(Endpoint::from_row(&row, false)))
}

/// A new secret; the previous one keeps signing for `grace`. Returns when it stops, or `None`
/// when there is no such endpoint.
pub async fn rotate_secret(
    db: &impl GenericClient,
    id: &str,
    secret: &Secret,
    grace: Duration,
) -> Result<Option<DateTime<Utc>>, tokio_postgres::Error> {
    let row = db
        .query_opt(
            "update endpoints set previous_secret = secret,
                    previous_secret_expires_at = now() + make_interval(secs => $3),
                    secret = $2, updated_at = now()
              where id = $1
             returning previous_secret_expires_at",
            &[&id, &secret.as_str(), &grace.as_secs_f64()],
        )
        .await?;
    Ok(row.map(|row| row.get(0)))
}

/// Deletes an endpoint with its deliveries, their attempts and its breaker, in one transaction.
/// False when there is no such endpoint.
pub async fn delete(
    client: &mut deadpool_postgres::Client,
    id: &str,
) -> Result<bool, tokio_postgres::Error> {
    let tx = client.transaction().await?;
    crate::delivery::store::delete_attempts_of_endpoint(&*tx, id).await?;
    // Deliveries go with the endpoint (on delete cascade).
    if tx
        .execute("delete from endpoints where id = $1", &[&id])
        .await?
        == 0
    {
        return Ok(false);
    }
    tx.execute(
        "delete from circuit_breakers where scope = $1 and name = $2",
        &[&crate::dispatch::BREAKER_SCOPE, &id],
    )
    .await?;
    tx.commit().await?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked() {
        assert!(validate_url("https://example.com/hook", false).is_ok());
        assert!(validate_url("http://93.184.216.34:8080/x", false).is_ok());
        assert!(matches!(
            validate_url("ftp://example.com", false),
            Err(InvalidEndpoint::Scheme(_))
        ));
        assert!(matches!(
            validate_url("not a url", false),
            Err(InvalidEndpoint::Url(_))
        ));
        for private in [
            "http://127.0.0.1:9000/",
            "http://10.1.2.3/",
            "http://192.168.0.1/",
            "http://172.16.5.4/",
            "http://169.254.169.254/latest/meta-data",
            "http://[::1]/",
            "http://[fe80::1]/",
            "http://[fd00::1]/",
            "http://[::ffff:127.0.0.1]/",
            "http://localhost:8080/",
            "http://0.0.0.0/",
            // Forms of loopback the URL parser normalises to 127.0.0.1.
            "http://2130706433/",
            "http://0x7f.1/",
            "http://0177.0.0.1/",
            // Special blocks beyond RFC 1918 and loopback, and IPv6 forms that carry IPv4.
            "http://[::7f00:1]/",
            "http://[fec0::1]/",
            "http://[64:ff9b::7f00:1]/",
            "http://[2002:7f00:1::]/",
            "http://[::ffff:7f00:1]/",
            "http://198.18.0.1/",
            "http://240.0.0.1/",
            "http://192.0.0.170/",
            "http://100.64.0.1/",
            "http://[2001:db8::1]/",
            "http://[ff02::1]/",
            "http://app.localhost./",
        ] {
            assert!(
                matches!(
                    validate_url(private, false),
                    Err(InvalidEndpoint::PrivateAddress(_))
                ),
                "{private}"
            );
            assert!(validate_url(private, true).is_ok(), "{private}");
        }
    }

    #[test]
    fn the_endpoints_file_refuses_special_addresses_too() {
        let path = std::env::temp_dir().join(format!("endpoints-{}.json", uuid::Uuid::new_v4()));
        std::fs::write(
            &path,
            r#"[{"id": "old", "url": "http://[::7f00:1]/hook", "event_types": ["*"]}]"#,
        )
        .unwrap();
        let refused = read_file(&path, false).map(|_| ());
        let allowed = read_file(&path, true).map(|_| ());
        std::fs::remove_file(&path).unwrap();
        let error = format!("{:#}", refused.unwrap_err());
        assert!(
            error.contains("::7f00:1 is a deprecated IPv4-compatible address"),
            "{error}"
        );
        assert!(allowed.is_ok());
    }

    #[test]
    fn event_type_filters_are_checked() {
        for ok in ["*", "message.created", "message.*", "order.line_item.added"] {
            assert!(valid_filter(ok), "{ok}");
        }
        for bad in [
            "",
            "message",
            "Message.Created",
            "message..created",
            "*.created",
            "message.**",
            "a b.c",
        ] {
            assert!(!valid_filter(bad), "{bad}");
        }
        assert_eq!(
            validate_event_types(&[]),
            Err(InvalidEndpoint::EventTypeCount)
        );
    }

    #[test]
    fn ids_are_checked() {
        assert!(validate_id("notifier-logger").is_ok());
        assert!(validate_id(&new_endpoint_id()).is_ok());
        assert!(validate_id("").is_err());
        assert!(validate_id("a/b").is_err());
    }
}
