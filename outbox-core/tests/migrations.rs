//! Migrations against a real PostgreSQL: several processes starting at once apply each exactly once.

use outbox_core::db;
use outbox_core::testing::{server_url, with_database};
use tokio_postgres::NoTls;

#[tokio::test]
async fn concurrent_starts_apply_each_migration_once() {
    let server = server_url();
    let (admin, connection) = tokio_postgres::connect(&server, NoTls)
        .await
        .expect("PostgreSQL is up");
    tokio::spawn(connection);
    let name = format!("test_{}", uuid::Uuid::new_v4().simple());
    admin
        .batch_execute(&format!("create database {name}"))
        .await
        .unwrap();
    let url = with_database(&server, &name);

    let starts = (0..6).map(|_| {
        let url = url.clone();
        tokio::spawn(async move { db::migrate(&db::pool(&url, 1).unwrap()).await })
    });
    let applied: Vec<Vec<i32>> = futures::future::join_all(starts)
        .await
        .into_iter()
        .map(|r| r.unwrap().expect("every concurrent start succeeds"))
        .collect();
    let total: usize = applied.iter().map(Vec::len).sum();
    assert_eq!(
        total,
        db::MIGRATIONS.len(),
        "each migration applied by exactly one start: {applied:?}"
    );

    let pool = db::pool(&url, 1).unwrap();
    let client = pool.get().await.unwrap();
    let versions: Vec<i32> = client
        .query(
            "select version from schema_migrations order by version",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let expected: Vec<i32> = db::MIGRATIONS.iter().map(|m| m.0).collect();
    assert_eq!(versions, expected);
    drop(client);
    assert!(
        db::migrate(&pool).await.unwrap().is_empty(),
        "a later start has nothing to do"
    );
}
