//! Migrations against a real PostgreSQL: several processes starting at once apply each exactly once.

use outbox_core::db;
use outbox_core::testing::{create_database, server_url, with_database};
use tokio_postgres::NoTls;

/// A new database of its own with nothing in it (no migrations yet); its URL.
async fn empty_database() -> String {
    let server = server_url();
    let (admin, connection) = tokio_postgres::connect(&server, NoTls)
        .await
        .expect("PostgreSQL is up");
    tokio::spawn(connection);
    let name = create_database(&admin).await;
    with_database(&server, &name)
}

/// The first column of every row `sql` returns.
async fn first_column<T: tokio_postgres::types::FromSqlOwned>(
    client: &tokio_postgres::Client,
    sql: &str,
) -> Vec<T> {
    let rows = client.query(sql, &[]).await.unwrap();
    rows.iter().map(|r| r.get(0)).collect()
}

#[tokio::test]
async fn concurrent_starts_apply_each_migration_once() {
    let url = empty_database().await;

    let starts = (0..6).map(|_| {
        let url = url.clone();
        tokio::spawn(async move {
            db::migrate(
                &db::pool(&url, 1, &db::Schema::ALL).unwrap(),
                &db::Schema::ALL,
            )
            .await
        })
    });
    let applied: Vec<Vec<String>> = futures::future::join_all(starts)
        .await
        .into_iter()
        .map(|r| r.unwrap().expect("every concurrent start succeeds"))
        .collect();
    let total: usize = applied.iter().map(Vec::len).sum();
    assert_eq!(
        total,
        db::Schema::ALL
            .iter()
            .map(|s| s.migrations().len())
            .sum::<usize>(),
        "each migration applied by exactly one start: {applied:?}"
    );

    let pool = db::pool(&url, 1, &db::Schema::ALL).unwrap();
    let client = pool.get().await.unwrap();
    for schema in db::Schema::ALL {
        let versions: Vec<i32> = first_column(
            &client,
            &format!(
                "select version from {}.schema_migrations order by version",
                schema.name()
            ),
        )
        .await;
        let expected: Vec<i32> = schema.migrations().iter().map(|m| m.0).collect();
        assert_eq!(versions, expected, "{schema:?}");
    }
    let in_public = client
        .query_one(
            "select count(*) from pg_class c join pg_namespace n on n.oid = c.relnamespace
              where n.nspname = 'public'",
            &[],
        )
        .await
        .unwrap()
        .get::<_, i64>(0);
    assert_eq!(in_public, 0, "nothing of the product in public");
    drop(client);
    assert!(
        db::migrate(&pool, &db::Schema::ALL)
            .await
            .unwrap()
            .is_empty(),
        "a later start has nothing to do"
    );
}

#[tokio::test]
async fn the_relay_adds_the_outbox_schema_and_nothing_else() {
    let url = empty_database().await;
    // An application's own tables, including names the product once used in public.
    let (app, connection) = tokio_postgres::connect(&url, NoTls).await.unwrap();
    tokio::spawn(connection);
    app.batch_execute(
        "create table public.orders (id int primary key);
         create table public.outbox (mine text);
         create table public.schema_migrations (version varchar primary key)",
    )
    .await
    .unwrap();
    let pool = db::pool(&url, 1, &[db::Schema::Outbox]).unwrap();
    db::migrate(&pool, &[db::Schema::Outbox]).await.unwrap();
    let schemas: Vec<String> = first_column(
        &app,
        "select nspname::text from pg_namespace
              where nspname not like 'pg\\_%' and nspname <> 'information_schema' order by 1",
    )
    .await;
    assert_eq!(schemas, ["outbox", "public"]);
    let public: Vec<String> = first_column(
        &app,
        "select tablename::text from pg_tables where schemaname = 'public' order by 1",
    )
    .await;
    assert_eq!(
        public,
        ["orders", "outbox", "schema_migrations"],
        "untouched"
    );
}

#[tokio::test]
async fn a_legacy_database_ends_with_nothing_in_public_whichever_service_upgrades_first() {
    use db::Schema::{Notifier, Outbox, Producer, Webhooks};
    let orders = [
        [Outbox, Producer, Webhooks, Notifier],
        [Notifier, Webhooks, Producer, Outbox],
        [Webhooks, Outbox, Notifier, Producer],
        [Notifier, Outbox, Webhooks, Producer],
        [Producer, Notifier, Outbox, Webhooks],
        [Webhooks, Notifier, Outbox, Producer],
    ];
    for order in orders {
        let legacy = outbox_core::testing::TestDb::create_legacy().await;
        legacy
            .client()
            .await
            .batch_execute(
                "insert into public.circuit_breakers (scope, name, state) values
                     ('endpoint', 'ep_1', 'OPEN'), ('channel', 'email', 'OPEN')",
            )
            .await
            .unwrap();
        for schema in order {
            let pool = db::pool(&legacy.url, 1, &[schema]).unwrap();
            db::migrate(&pool, &[schema])
                .await
                .unwrap_or_else(|e| panic!("{order:?}, at {schema:?}: {e}"));
        }
        let public = legacy
            .count("select count(*) from pg_tables where schemaname = 'public'")
            .await;
        assert_eq!(public, 0, "{order:?}");
        for (table, scope) in [
            ("webhooks.circuit_breakers", "endpoint"),
            ("notifier.circuit_breakers", "channel"),
        ] {
            let moved = legacy
                .count(&format!(
                    "select count(*) from {table} where scope = '{scope}' and state = 'OPEN'"
                ))
                .await;
            assert_eq!(moved, 1, "{order:?}: {table}");
        }
    }
}

#[tokio::test]
async fn the_envelopes_move_into_their_events_and_the_side_table_goes() {
    let url = empty_database().await;
    let (client, connection) = tokio_postgres::connect(&url, NoTls).await.unwrap();
    tokio::spawn(connection);
    // The outbox as the release before left it (V1 to V5), with events published then.
    client
        .batch_execute(
            "create schema outbox; set search_path = outbox;
             create table outbox.schema_migrations (
                 version integer primary key, name text not null,
                 applied_at timestamptz not null default now())",
        )
        .await
        .unwrap();
    for (version, name, sql) in &db::Schema::Outbox.migrations()[..5] {
        client.batch_execute(sql).await.unwrap();
        client
            .execute(
                "insert into outbox.schema_migrations (version, name) values ($1, $2)",
                &[version, name],
            )
            .await
            .unwrap();
    }
    client
        .batch_execute(
            "select outbox.add_partition(now() - interval '1 hour', now() + interval '1 hour')",
        )
        .await
        .unwrap();
    let before: Vec<String> = first_column(
        &client,
        "select outbox.publish('order.created', 'k' || i, jsonb_build_object('n', i), 'orders') from generate_series(1, 3) i",
    )
    .await;
    let envelopes: Vec<String> = first_column(
        &client,
        "select p.payload::text from outbox.outbox_payloads p order by p.outbox_id",
    )
    .await;
    assert_eq!(envelopes.len(), 3);

    let pool = db::pool(&url, 1, &[db::Schema::Outbox]).unwrap();
    let applied = db::migrate(&pool, &[db::Schema::Outbox]).await.unwrap();
    assert_eq!(
        applied,
        ["outbox/6", "outbox/7", "outbox/8", "outbox/9", "outbox/10"]
    );

    // Each event holds its own envelope, word for word.
    let moved: Vec<String> = first_column(
        &client,
        "select payload::text from outbox.events order by id",
    )
    .await;
    assert_eq!(moved, envelopes);
    let tables: Vec<String> = first_column(
        &client,
        "select tablename::text from pg_tables where schemaname = 'outbox' and tablename like '%payloads%'",
    )
    .await;
    assert!(tables.is_empty(), "{tables:?}");
    // Publishing, hand edits, new partitions and retention work on the new layout.
    let after: Vec<String> = first_column(
        &client,
        "select outbox.publish('order.created', 'k9', '{\"n\": 9}', 'orders')",
    )
    .await;
    let envelope: Vec<serde_json::Value> = first_column(
        &client,
        &format!(
            "select payload::jsonb from outbox.events where event_id = '{}'",
            after[0]
        ),
    )
    .await;
    assert_eq!(envelope[0]["id"], after[0].as_str());
    assert_eq!(envelope[0]["data"]["n"], 9);
    client
        .batch_execute(&format!(
            "update outbox.outbox set state = 'E' where event_id = '{}';
             delete from outbox.outbox where event_id = '{}';
             select outbox.add_partition(now() + interval '1 hour', now() + interval '2 hours');",
            before[0], before[1]
        ))
        .await
        .unwrap();
    let left: Vec<i64> = first_column(&client, "select count(*) from outbox.outbox").await;
    assert_eq!(left, [3]);
    let dropped: Vec<i64> = first_column(
        &client,
        "select outbox.drop_old_partitions(now() + interval '3 hours')",
    )
    .await;
    // The first partition holds unsent rows, so it stays; the empty second one goes.
    assert_eq!(dropped, [0]);
    let partitions: Vec<i64> =
        first_column(&client, "select count(*) from outbox.partitions").await;
    assert_eq!(partitions, [1]);
}

#[tokio::test]
async fn a_new_outbox_puts_its_first_events_in_a_partition_not_in_the_default_one() {
    let url = empty_database().await;
    let pool = db::pool(&url, 1, &[db::Schema::Outbox]).unwrap();
    db::migrate(&pool, &[db::Schema::Outbox]).await.unwrap();
    let client = pool.get().await.unwrap();
    // Published before any relay ran, so before any relay made a partition: the default one
    // would hold them, and every later attach would scan them under an exclusive lock.
    let _: Vec<String> = first_column(
        &client,
        "select outbox.publish('order.created', 'k' || i, jsonb_build_object('n', i), 'orders') from generate_series(1, 3) i",
    )
    .await;
    let tables: Vec<String> = first_column(
        &client,
        "select distinct c.relname::text from outbox.events e join pg_class c on c.oid = e.tableoid",
    )
    .await;
    assert_eq!(tables, ["events_initial"]);
    // It lasts long enough for a relay to attach the next one under load.
    let runway: Vec<bool> = first_column(
        &client,
        "select upper > now() + interval '59 minutes' from outbox.partitions",
    )
    .await;
    assert_eq!(runway, [true]);
}
