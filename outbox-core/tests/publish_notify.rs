//! outbox.publish wakes the relay with a NOTIFY only while the relay waits for one
//! (`relay_cursor.waiting`): a NOTIFY serialises commits. Against a real PostgreSQL.

use std::time::Duration;

use futures::StreamExt;
use outbox_core::testing::TestDb;
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, NoTls};

/// A session that LISTENs to `outbox`; its notifications arrive on the receiver.
async fn listen(db: &TestDb) -> (tokio_postgres::Client, mpsc::UnboundedReceiver<String>) {
    let (client, mut connection) = tokio_postgres::connect(&db.url, NoTls).await.unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
    tokio::spawn(async move {
        while let Some(Ok(message)) = messages.next().await {
            if let AsyncMessage::Notification(n) = message {
                let _ = tx.send(n.channel().to_owned());
            }
        }
    });
    client.batch_execute("listen outbox").await.unwrap();
    (client, rx)
}

async fn publish_one(db: &TestDb) {
    db.client()
        .await
        .batch_execute("select outbox.publish('order.created', 'k', '{}', 'orders')")
        .await
        .unwrap();
}

#[tokio::test]
async fn publish_notifies_only_while_the_relay_waits() {
    let db = TestDb::create().await;
    let (_session, mut notified) = listen(&db).await;
    let set_waiting = |waiting: bool| {
        let db = &db;
        async move {
            db.client()
                .await
                .execute("update relay_cursor set waiting = $1", &[&waiting])
                .await
                .unwrap();
        }
    };

    set_waiting(false).await;
    publish_one(&db).await;
    // A notification is delivered right after its commit; give it ample time to show.
    let quiet = tokio::time::timeout(Duration::from_millis(500), notified.recv()).await;
    assert!(
        quiet.is_err(),
        "no NOTIFY while the relay is busy: {quiet:?}"
    );

    set_waiting(true).await;
    publish_one(&db).await;
    let woken = tokio::time::timeout(Duration::from_secs(10), notified.recv()).await;
    assert_eq!(woken.ok().flatten().as_deref(), Some("outbox"));
}
