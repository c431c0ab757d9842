//! The PostgreSQL pool and the migrations in `sql/`.

use std::time::Duration;

use backon::Retryable;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::NoTls;
use tokio_util::sync::CancellationToken;

pub use deadpool_postgres::{Object as Client, Pool as PgPool};

/// What can go wrong talking to PostgreSQL.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("invalid DATABASE_URL: {0}")]
    Url(tokio_postgres::Error),
    #[error("PostgreSQL is unavailable: {0}")]
    Unavailable(#[from] deadpool_postgres::PoolError),
    #[error("PostgreSQL error: {}", describe(.0))]
    Query(#[from] tokio_postgres::Error),
    #[error("cannot build the PostgreSQL pool: {0}")]
    Build(#[from] deadpool_postgres::BuildError),
}

impl DbError {
    /// PostgreSQL refused a value (SQLSTATE class 22): retrying the same rows cannot help.
    pub fn is_data_error(&self) -> bool {
        match self {
            DbError::Query(e) => e
                .as_db_error()
                .is_some_and(|e| e.code().code().starts_with("22")),
            _ => false,
        }
    }
}

/// One migration: version, name, SQL.
pub type Migration = (i32, &'static str, &'static str);

/// A component's PostgreSQL schema (contract: each component's tables live in a schema of its
/// own, nothing in `public`). Each binary applies only the migrations of the schemas it uses, so
/// pointing the relay at an application's database adds `outbox` and nothing else.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Schema {
    /// What publishers write and the relay reads: `events` with their envelopes, the relay's `sent`,
    /// `unsent` and cursor, the `outbox` view over them, `routes`, and the
    /// `outbox.publish` function with its `outbox_publisher` role.
    Outbox,
    /// The producer's demo domain (`messages`) and its idempotency keys.
    Producer,
    /// The consumer's inbox, endpoints, deliveries and breakers.
    Webhooks,
    /// The notifier's received events, notifications and breakers.
    Notifier,
}

impl Schema {
    pub const ALL: [Schema; 4] = [
        Schema::Outbox,
        Schema::Producer,
        Schema::Webhooks,
        Schema::Notifier,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Schema::Outbox => "outbox",
            Schema::Producer => "producer",
            Schema::Webhooks => "webhooks",
            Schema::Notifier => "notifier",
        }
    }

    /// Its migrations, in order; each runs once, in a transaction, with `search_path` set to the
    /// schema, recorded in the schema's own `schema_migrations`.
    pub fn migrations(self) -> &'static [Migration] {
        match self {
            Schema::Outbox => &[
                (1, "outbox", include_str!("../../sql/outbox/V1__outbox.sql")),
                (
                    2,
                    "publish",
                    include_str!("../../sql/outbox/V2__publish.sql"),
                ),
                (
                    3,
                    "append_only",
                    include_str!("../../sql/outbox/V3__append_only.sql"),
                ),
                (
                    4,
                    "unsent_ids_by_index",
                    include_str!("../../sql/outbox/V4__unsent_ids_by_index.sql"),
                ),
                (
                    5,
                    "notify_only_when_waited_for",
                    include_str!("../../sql/outbox/V5__notify_only_when_waited_for.sql"),
                ),
                (
                    6,
                    "envelope_in_events",
                    include_str!("../../sql/outbox/V6__envelope_in_events.sql"),
                ),
                (
                    7,
                    "publish_counts_brackets_by_bytes",
                    include_str!("../../sql/outbox/V7__publish_counts_brackets_by_bytes.sql"),
                ),
                (
                    8,
                    "publish_checks_lengths_apart_from_patterns",
                    include_str!(
                        "../../sql/outbox/V8__publish_checks_lengths_apart_from_patterns.sql"
                    ),
                ),
                (
                    9,
                    "first_partition_at_install",
                    include_str!("../../sql/outbox/V9__first_partition_at_install.sql"),
                ),
                (
                    10,
                    "publish_helpers_planned_once",
                    include_str!("../../sql/outbox/V10__publish_helpers_planned_once.sql"),
                ),
            ],
            Schema::Producer => &[
                (
                    1,
                    "producer",
                    include_str!("../../sql/producer/V1__producer.sql"),
                ),
                (
                    2,
                    "idempotency_keys_created_brin",
                    include_str!("../../sql/producer/V2__idempotency_keys_created_brin.sql"),
                ),
                (
                    3,
                    "messages_data_json",
                    include_str!("../../sql/producer/V3__messages_data_json.sql"),
                ),
            ],
            Schema::Webhooks => &[
                (
                    1,
                    "webhooks",
                    include_str!("../../sql/webhooks/V1__webhooks.sql"),
                ),
                (
                    2,
                    "delivery_holds",
                    include_str!("../../sql/webhooks/V2__delivery_holds.sql"),
                ),
                (
                    3,
                    "delivery_traceparent",
                    include_str!("../../sql/webhooks/V3__delivery_traceparent.sql"),
                ),
            ],
            Schema::Notifier => &[(
                1,
                "notifier",
                include_str!("../../sql/notifier/V1__notifier.sql"),
            )],
        }
    }
}

/// The migrations of the releases that kept every table in `public` (recorded in
/// `public.schema_migrations`). A database they made is brought to their last version first, so
/// that each schema's first migration finds the tables it moves in the shape it expects.
const LEGACY_MIGRATIONS: &[Migration] = &[
    (
        1,
        "producer_outbox",
        include_str!("../../sql/legacy/V1__producer_outbox.sql"),
    ),
    (
        2,
        "consumer",
        include_str!("../../sql/legacy/V2__consumer.sql"),
    ),
    (
        3,
        "breakers_notifier",
        include_str!("../../sql/legacy/V3__breakers_notifier.sql"),
    ),
    (
        5,
        "notifier",
        include_str!("../../sql/legacy/V5__notifier.sql"),
    ),
    (
        6,
        "inbox_payload_json",
        include_str!("../../sql/legacy/V6__inbox_payload_json.sql"),
    ),
    (
        7,
        "delivery_hot_path",
        include_str!("../../sql/legacy/V7__delivery_hot_path.sql"),
    ),
    (
        8,
        "outbox_payloads",
        include_str!("../../sql/legacy/V8__outbox_payloads.sql"),
    ),
    (
        9,
        "inbox_received_brin",
        include_str!("../../sql/legacy/V9__inbox_received_brin.sql"),
    ),
];

/// The tables the legacy migrations made in `public`.
const LEGACY_TABLES: &[&str] = &[
    "outbox",
    "outbox_payloads",
    "messages",
    "idempotency_keys",
    "inbox",
    "poison_records",
    "endpoints",
    "deliveries",
    "delivery_attempts",
    "circuit_breakers",
    "received_events",
    "notifications",
];

/// True when the same statement may well succeed if tried again shortly: the connection broke or
/// was never made, the server is shutting down, restarting or starting up (`57P01` admin_shutdown,
/// `57P02` crash_shutdown, `57P03` cannot_connect_now), it ran out of resources (class `53`, e.g.
/// too many connections), or the transaction lost a race with another one (`40001`
/// serialization_failure, `40P01` deadlock_detected). Every other database error is a fault of
/// the statement or the data, and retrying it would fail the same way.
pub fn is_transient(error: &tokio_postgres::Error) -> bool {
    match error.code() {
        None => error.is_closed() || error.as_db_error().is_none(),
        Some(code) => is_transient_sqlstate(code.code()),
    }
}

/// [`is_transient`] for a SQLSTATE code alone.
pub fn is_transient_sqlstate(code: &str) -> bool {
    code.starts_with("08")
        || code.starts_with("53")
        || matches!(code, "57P01" | "57P02" | "57P03" | "40001" | "40P01")
}

/// A PostgreSQL error with what the server said (tokio-postgres alone prints only "db error").
pub fn describe(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => format!("{} {}: {}", db.severity(), db.code().code(), db.message()),
        None => error.to_string(),
    }
}

/// Functions the migrations call (`pg_temp.rewrite_function`), defined before they run.
const MIGRATION_HELPERS: &str = include_str!("../../sql/migration_helpers.sql");

/// Key of the advisory lock that serialises migrations when several processes start at once.
const MIGRATION_LOCK: i64 = 0x6f75_7462_6f78_0001;

/// Builds a pool. It connects lazily, so a service starts even while PostgreSQL is down.
pub fn pool(url: &str, size: usize, schemas: &[Schema]) -> Result<Pool, DbError> {
    build_pool(url, size, &options_for(schemas, ""))
}

/// [`pool`] with more connection options (`-c name=value`, space-separated).
pub fn pool_with_options(
    url: &str,
    size: usize,
    schemas: &[Schema],
    options: &str,
) -> Result<Pool, DbError> {
    build_pool(url, size, &options_for(schemas, &format!(" {options}")))
}

/// Connection options: the service's schemas as `search_path` (its SQL names its tables
/// unqualified), then `extra`. No schemas: the database's own `search_path`.
fn options_for(schemas: &[Schema], extra: &str) -> String {
    if schemas.is_empty() {
        return extra.trim_start().to_owned();
    }
    let path: Vec<&str> = schemas.iter().map(|s| s.name()).collect();
    format!("-c search_path={}{extra}", path.join(","))
}

fn build_pool(url: &str, size: usize, options: &str) -> Result<Pool, DbError> {
    let mut config: tokio_postgres::Config = url.parse().map_err(DbError::Url)?;
    // JIT off unless the URL's own options turn it on: it compiles any plan whose estimated cost
    // passes jit_above_cost, and for these short statements the compile costs far more than it
    // saves. Estimates cross that line on their own, e.g. while a table grows before its first
    // analyze: measured, the relay's claim went from about 2 ms to 250 ms, 110 ms of it JIT.
    let options = match config.get_options() {
        Some(given) => format!("-c jit=off {given} {options}"),
        None => format!("-c jit=off {options}"),
    };
    config.options(&options);
    config.connect_timeout(Duration::from_secs(5));
    config.keepalives_idle(Duration::from_secs(30));
    if config.get_application_name().is_none() {
        config.application_name(env!("CARGO_PKG_NAME"));
    }
    let manager = Manager::from_config(
        config,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Ok(Pool::builder(manager)
        .max_size(size.max(1))
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(Duration::from_secs(5)))
        .create_timeout(Some(Duration::from_secs(5)))
        .recycle_timeout(Some(Duration::from_secs(5)))
        .build()?)
}

/// Applies the migrations of `schemas` not applied yet, all in one transaction, under an
/// advisory lock so that processes starting at once apply each exactly once. A database made by
/// the releases that kept every table in `public` is first completed and then moved: each
/// schema's first migration takes its tables over, rows and all. Returns what was applied, as
/// `schema/version`.
pub async fn migrate(pool: &Pool, schemas: &[Schema]) -> Result<Vec<String>, DbError> {
    let mut attempt = 1;
    loop {
        match migrate_once(pool, schemas).await {
            Err(e) if attempt < MIGRATION_ATTEMPTS && lost_cluster_race(&e) => {
                tracing::info!(
                    error = %e,
                    attempt,
                    "another database's migration created a cluster-wide object first; migrating again"
                );
                attempt += 1;
            }
            done => return done,
        }
    }
}

/// Tries of a migration that lost a race for a cluster-wide object (see [`lost_cluster_race`]);
/// one more is enough, the object exists by then, and the bound keeps a real bug from looping.
const MIGRATION_ATTEMPTS: u32 = 3;

/// The migration created a cluster-wide object (the `outbox_publisher` role) while another
/// database's migration, uncommitted, was creating it too. The advisory lock cannot prevent it:
/// it counts within one database, and roles belong to the cluster. The loser waits for the
/// winner to commit, then fails on the catalog's unique index (23505 in `pg_catalog`), or with
/// 42710 once the winner's object is visible to it. Its transaction left nothing behind, and
/// migrating again finds the object there.
fn lost_cluster_race(error: &DbError) -> bool {
    let DbError::Query(e) = error else {
        return false;
    };
    e.as_db_error().is_some_and(|db| match db.code().code() {
        "23505" => db.schema() == Some("pg_catalog"),
        "42710" => true,
        _ => false,
    })
}

async fn migrate_once(pool: &Pool, schemas: &[Schema]) -> Result<Vec<String>, DbError> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    tx.execute("select pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    tx.batch_execute(MIGRATION_HELPERS).await?;
    let mut newly = Vec::new();
    let legacy = is_legacy(&tx).await?;
    if legacy {
        tx.batch_execute("set local search_path = public; set local outbox.legacy_public = 'on'")
            .await?;
        let applied = applied_versions(&tx, "public").await?;
        for (version, name, sql) in LEGACY_MIGRATIONS {
            if !applied.contains(version) {
                tx.batch_execute(sql).await?;
                record(&tx, "public", *version, name).await?;
                newly.push(format!("public/{version}"));
            }
        }
    }
    for schema in schemas {
        let name = schema.name();
        tx.batch_execute(&format!(
            "create schema if not exists {name};
             set local search_path = {name};
             create table if not exists {name}.schema_migrations (
                 version integer primary key,
                 name text not null,
                 applied_at timestamptz not null default now())"
        ))
        .await?;
        let applied = applied_versions(&tx, name).await?;
        for (version, migration, sql) in schema.migrations() {
            if applied.contains(version) {
                continue;
            }
            tx.batch_execute(sql).await?;
            record(&tx, name, *version, migration).await?;
            tracing::info!(schema = name, version, migration, "applied migration");
            newly.push(format!("{name}/{version}"));
        }
    }
    if legacy {
        drop_emptied_legacy(&tx).await?;
    }
    // The helpers live in this session's pg_temp; the pooled connection goes on to other work.
    tx.batch_execute("drop function pg_temp.rewrite_function(regprocedure, text, text)")
        .await?;
    tx.commit().await?;
    Ok(newly)
}

/// Makes a database as the releases that kept every table in `public` did (their migrations,
/// recorded in `public.schema_migrations`), to test the upgrade in place.
#[doc(hidden)]
pub async fn migrate_as_legacy_release(pool: &Pool) -> Result<(), DbError> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    tx.batch_execute(
        "set local search_path = public;
         create table schema_migrations (
             version integer primary key,
             name text not null,
             applied_at timestamptz not null default now())",
    )
    .await?;
    for (version, name, sql) in LEGACY_MIGRATIONS {
        tx.batch_execute(sql).await?;
        record(&tx, "public", *version, name).await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Whether this database was made by the releases that kept every table in `public`: their
/// history table, with their first migration in it. Another tool's `public.schema_migrations`
/// (Rails, golang-migrate, ...) has other columns and is left alone.
async fn is_legacy(tx: &tokio_postgres::Transaction<'_>) -> Result<bool, DbError> {
    let shaped_like_ours: bool = tx
        .query_one(
            "select count(*) = 2 from information_schema.columns
              where table_schema = 'public' and table_name = 'schema_migrations'
                and ((column_name = 'version' and data_type = 'integer')
                     or (column_name = 'name' and data_type = 'text'))",
            &[],
        )
        .await?
        .get(0);
    if !shaped_like_ours {
        return Ok(false);
    }
    Ok(tx
        .query_one(
            "select exists (select 1 from public.schema_migrations
                             where version = 1 and name = 'producer_outbox')",
            &[],
        )
        .await?
        .get(0))
}

async fn applied_versions(
    tx: &tokio_postgres::Transaction<'_>,
    schema: &str,
) -> Result<Vec<i32>, DbError> {
    Ok(tx
        .query(
            &format!("select version from {schema}.schema_migrations"),
            &[],
        )
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect())
}

async fn record(
    tx: &tokio_postgres::Transaction<'_>,
    schema: &str,
    version: i32,
    name: &str,
) -> Result<(), DbError> {
    tx.execute(
        &format!("insert into {schema}.schema_migrations (version, name) values ($1, $2)"),
        &[&version, &name],
    )
    .await?;
    Ok(())
}

/// Once every component has taken its tables out of `public` (the breakers table is shared, so
/// it goes when no component's rows are left in it), the legacy history goes too.
async fn drop_emptied_legacy(tx: &tokio_postgres::Transaction<'_>) -> Result<(), DbError> {
    tx.batch_execute(
        // Nested: PL/pgSQL plans a condition whole, so the table may only be named once it exists.
        "do $$ begin
             if to_regclass('public.circuit_breakers') is not null then
                 if not exists (select 1 from public.circuit_breakers) then
                     drop table public.circuit_breakers;
                 end if;
             end if;
         end $$",
    )
    .await?;
    let tables: Vec<&str> = LEGACY_TABLES.to_vec();
    let left: i64 = tx
        .query_one(
            "select count(*) from pg_tables where schemaname = 'public' and tablename = any($1)",
            &[&tables],
        )
        .await?
        .get(0);
    if left == 0 {
        tx.batch_execute("drop table public.schema_migrations")
            .await?;
        tracing::info!("every table has left public; dropped the legacy public.schema_migrations");
    }
    Ok(())
}

/// Applies migrations, retrying with backoff while PostgreSQL is unreachable. Returns false only
/// when shutdown was requested before they could be applied.
pub async fn migrate_until_done(
    pool: &Pool,
    schemas: &[Schema],
    shutdown: &CancellationToken,
) -> bool {
    until_done("migrations", shutdown, || migrate(pool, schemas))
        .await
        .is_some()
}

/// Runs `attempt` until it succeeds, with the [`crate::reconnect`] backoff and a warning naming
/// `what` after each failure. Returns its value, or `None` only when shutdown was requested first.
pub async fn until_done<T, E, F, Fut>(
    what: &str,
    shutdown: &CancellationToken,
    attempt: F,
) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
    E: std::fmt::Display,
{
    let retried = attempt
        .retry(crate::reconnect::policy())
        .notify(|error, after| {
            tracing::warn!(%error, what, retry_in_ms = after.as_millis() as u64, "not done yet; retrying");
        });
    tokio::select! {
        result = retried => result.ok(),
        _ = shutdown.cancelled() => None,
    }
}

/// True when PostgreSQL answers a trivial query within two seconds.
pub async fn is_reachable(pool: &Pool) -> bool {
    let probe = async {
        let client = pool.get().await.ok()?;
        client.query_one("select 1", &[]).await.ok()
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), probe).await,
        Ok(Some(_))
    )
}

#[cfg(test)]
mod tests {
    use super::is_transient_sqlstate;

    #[test]
    fn connection_shutdown_resource_and_serialization_errors_are_transient() {
        for code in [
            "08000", "08003", "08006", "08001", "08004", "57P01", "57P02", "57P03", "53000",
            "53100", "53200", "53300", "40001", "40P01",
        ] {
            assert!(is_transient_sqlstate(code), "{code} is transient");
        }
        // Faults of the statement or the data: retrying fails the same way.
        for code in [
            "23505", "23503", "22P02", "42P01", "42601", "P0001", "57014", "40002", "XX000",
        ] {
            assert!(!is_transient_sqlstate(code), "{code} is not transient");
        }
    }
}
