//! The PostgreSQL pool and the migrations in `sql/`.

use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
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
    #[error("PostgreSQL error: {0}")]
    Query(#[from] tokio_postgres::Error),
    #[error("cannot build the PostgreSQL pool: {0}")]
    Build(#[from] deadpool_postgres::BuildError),
}

/// The migrations, in order. Each runs once, in a transaction, recorded in `schema_migrations`.
pub const MIGRATIONS: &[(i32, &str, &str)] = &[
    (
        1,
        "producer_outbox",
        include_str!("../../sql/V1__producer_outbox.sql"),
    ),
    (2, "consumer", include_str!("../../sql/V2__consumer.sql")),
    (
        3,
        "breakers_notifier",
        include_str!("../../sql/V3__breakers_notifier.sql"),
    ),
    (5, "notifier", include_str!("../../sql/V5__notifier.sql")),
    (
        6,
        "inbox_payload_json",
        include_str!("../../sql/V6__inbox_payload_json.sql"),
    ),
    (
        7,
        "delivery_hot_path",
        include_str!("../../sql/V7__delivery_hot_path.sql"),
    ),
    (
        8,
        "outbox_payloads",
        include_str!("../../sql/V8__outbox_payloads.sql"),
    ),
    (
        9,
        "inbox_received_brin",
        include_str!("../../sql/V9__inbox_received_brin.sql"),
    ),
    (
        10,
        "idempotency_keys_created_brin",
        include_str!("../../sql/V10__idempotency_keys_created_brin.sql"),
    ),
];

/// Key of the advisory lock that serialises migrations when several processes start at once.
const MIGRATION_LOCK: i64 = 0x6f75_7462_6f78_0001;

/// Builds a pool. It connects lazily, so a service starts even while PostgreSQL is down.
pub fn pool(url: &str, size: usize) -> Result<Pool, DbError> {
    build_pool(url, size, None)
}

/// A pool whose commits do not wait for the WAL flush (`synchronous_commit = off`). Only for
/// writes that are safe to lose in a PostgreSQL crash because they are redone: the relay's
/// "marked sent" updates (a lost mark means the row is sent again, a duplicate the consumers drop).
/// Never for writes that acknowledge something to a client.
pub fn pool_without_flush_wait(url: &str, size: usize) -> Result<Pool, DbError> {
    build_pool(url, size, Some("-c synchronous_commit=off"))
}

fn build_pool(url: &str, size: usize, options: Option<&str>) -> Result<Pool, DbError> {
    let mut config: tokio_postgres::Config = url.parse().map_err(DbError::Url)?;
    if let Some(options) = options {
        config.options(options);
    }
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

/// Applies the pending migrations. Safe when several processes call it at once: the first takes
/// an advisory lock, the others wait for it and then find nothing left to do.
pub async fn migrate(pool: &Pool) -> Result<Vec<i32>, DbError> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    tx.execute("select pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    tx.batch_execute(
        "create table if not exists schema_migrations (
            version integer primary key,
            name text not null,
            applied_at timestamptz not null default now())",
    )
    .await?;
    let applied: Vec<i32> = tx
        .query("select version from schema_migrations", &[])
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect();
    let mut newly = Vec::new();
    for (version, name, sql) in MIGRATIONS {
        if applied.contains(version) {
            continue;
        }
        tx.batch_execute(sql).await?;
        tx.execute(
            "insert into schema_migrations (version, name) values ($1, $2)",
            &[version, name],
        )
        .await?;
        tracing::info!(version, name, "applied migration");
        newly.push(*version);
    }
    tx.commit().await?;
    Ok(newly)
}

/// Applies migrations, retrying with backoff while PostgreSQL is unreachable. Returns false only
/// when shutdown was requested before they could be applied.
pub async fn migrate_until_done(pool: &Pool, shutdown: &CancellationToken) -> bool {
    let attempt = || async { migrate(pool).await };
    let retried = attempt
        .retry(
            ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(200))
                .with_max_delay(Duration::from_secs(5))
                .without_max_times(),
        )
        .notify(|error, after| {
            tracing::warn!(%error, retry_in_ms = after.as_millis() as u64, "migrations not applied yet");
        });
    tokio::select! {
        result = retried => result.is_ok(),
        _ = shutdown.cancelled() => false,
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
