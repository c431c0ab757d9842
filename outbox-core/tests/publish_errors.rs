//! What a caller of `outbox_core::outbox::publish_returning_row` (the producer's path) learns when PostgreSQL refuses it for a
//! reason of its own (not one of publish's SQLSTATEs): the server's code and message, in the
//! error and in the HTTP answer built from it, not tokio-postgres's bare "db error".

use outbox_core::http::ApiError;
use outbox_core::outbox::{self, NewEvent, PublishError};
use outbox_core::testing::TestDb;

#[tokio::test]
async fn a_publish_in_an_aborted_transaction_says_what_postgresql_said() {
    let db = TestDb::create().await;
    let mut client = db.client().await;
    let tx = client.transaction().await.unwrap();
    assert!(tx.batch_execute("select 1 / 0").await.is_err());
    let data = serde_json::json!({"n": 1});
    let event = NewEvent {
        event_type: "order.created",
        key: "k",
        data: &data,
        topic: Some("orders"),
        headers: None,
        correlation_id: None,
        source: None,
    };
    let error = outbox::publish_returning_row(&tx, &event)
        .await
        .unwrap_err();
    assert!(matches!(error, PublishError::Db(_)), "{error:?}");
    let said = error.to_string();
    assert!(
        said.contains("25P02") && said.contains("current transaction is aborted"),
        "{said}"
    );
    let answer = ApiError::from(error);
    assert_eq!(answer.status.as_u16(), 500);
    assert_eq!(answer.code, "database_error");
    assert!(answer.message.contains("25P02"), "{}", answer.message);
}
