//! Two databases of one new PostgreSQL cluster migrating at once. The `outbox_publisher` role
//! belongs to the cluster, so the migrations' advisory lock (one database's) does not keep them
//! apart: both find the role missing and create it, and the one that commits second loses.
//!
//! The cluster is this binary's own (state in /var/tmp/outbox-roles-test, port 5450): the test
//! drops the role there, which on the shared server would pull it from under every other test.

use std::time::Duration;

use outbox_core::db;
use outbox_core::testing::{create_database, eventually, with_database, PrivateStack};
use tokio_postgres::NoTls;

const SERVER: &str = "postgres://postgres@127.0.0.1:5450/postgres";

fn cluster() -> PrivateStack {
    PrivateStack::new("/var/tmp/outbox-roles-test", 1, 19190, 5450, 19200)
}

async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .expect("the test's PostgreSQL is up");
    tokio::spawn(connection);
    client
}

#[tokio::test]
async fn a_migration_that_loses_the_race_for_the_role_to_another_database_migrates_again() {
    tokio::task::spawn_blocking(|| cluster().run(&["pg-start"]))
        .await
        .unwrap();
    let admin = connect(SERVER).await;

    // The cluster as a new one is, without the role: drop what earlier runs made.
    let earlier = admin
        .query(
            "select datname from pg_database where datname like 'test\\_%'",
            &[],
        )
        .await
        .unwrap();
    for row in earlier {
        let name: String = row.get(0);
        admin
            .batch_execute(&format!("drop database {name} with (force)"))
            .await
            .unwrap();
    }
    admin
        .batch_execute("drop role if exists outbox_publisher")
        .await
        .unwrap();
    let name = create_database(&admin).await;

    // Another database's migration, past its creation of the role and not committed yet.
    let winner = connect(SERVER).await;
    winner
        .batch_execute("begin; create role outbox_publisher nologin")
        .await
        .unwrap();

    let url = with_database(SERVER, &name);
    let migrating = tokio::spawn(async move {
        db::migrate(
            &db::pool(&url, 1, &db::Schema::ALL).unwrap(),
            &db::Schema::ALL,
        )
        .await
    });
    // It found no role either, created it, and now waits on the role's name for the winner.
    eventually(
        "the migration waits for the other transaction's role",
        Duration::from_secs(30),
        || async {
            let waiting: i64 = admin
                .query_one(
                    "select count(*) from pg_stat_activity
                      where datname = $1 and wait_event_type = 'Lock'
                        and wait_event = 'transactionid'",
                    &[&name],
                )
                .await
                .unwrap()
                .get(0);
            (waiting > 0).then_some(())
        },
    )
    .await;
    winner.batch_execute("commit").await.unwrap();

    let applied = migrating
        .await
        .unwrap()
        .expect("the migration that lost the race succeeds");
    let every: usize = db::Schema::ALL.iter().map(|s| s.migrations().len()).sum();
    assert_eq!(applied.len(), every, "every migration applied: {applied:?}");

    let migrated = connect(&with_database(SERVER, &name)).await;
    let may_publish: bool = migrated
        .query_one(
            "select has_function_privilege('outbox_publisher',
                 'outbox.publish(text, text, jsonb, text, jsonb, text, text)', 'execute')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        may_publish,
        "the role the other database made may publish in this one"
    );

    drop(migrated);
    admin
        .batch_execute(&format!("drop database {name} with (force)"))
        .await
        .unwrap();
    tokio::task::spawn_blocking(|| cluster().run(&["pg-stop"]))
        .await
        .unwrap();
}
