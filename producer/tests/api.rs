//! The producer's HTTP API against a real PostgreSQL (a fresh database per test).

mod support;

use std::time::Duration;

use outbox_core::outbox::OutboxState;
use outbox_core::testing::TestDb;
use reqwest::StatusCode;
use serde_json::{json, Value};
use support::*;

#[tokio::test]
async fn a_message_and_its_event_are_written_together() {
    let app = spawn_app().await;
    let r = app
        .http
        .post(app.url("/messages"))
        .header("x-correlation-id", "req_test_1")
        .json(&json!({"content": "hello", "key": "customer-7", "data": {"n": 1}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(r.headers()["x-correlation-id"], "req_test_1");
    let created: Value = r.json().await.unwrap();
    assert_eq!(created["state"], "P");
    assert_eq!(created["topic"], "messages-test");
    let event_id = created["event_id"].as_str().unwrap().to_owned();
    assert!(event_id.starts_with("evt_"));

    let (status, message) = app
        .get(&format!("/messages/{}", created["id"].as_str().unwrap()))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(message["state"], "P");
    assert_eq!(message["event_id"], event_id.as_str());
    assert_eq!(message["key"], "customer-7");

    let row = app
        .db
        .client()
        .await
        .query_one(
            "select e.payload, o.headers, o.aggregate_id, o.topic, o.state::text
               from outbox o join events e on e.id = o.id",
            &[],
        )
        .await
        .unwrap();
    let envelope: Value = row.get(0);
    assert_eq!(envelope["id"], event_id.as_str());
    assert_eq!(envelope["event"], "message.created");
    assert_eq!(envelope["version"], "1.0");
    assert_eq!(envelope["data"]["content"], "hello");
    assert_eq!(envelope["data"]["data"]["n"], 1);
    assert_eq!(envelope["metadata"]["correlation_id"], "req_test_1");
    assert_eq!(envelope["metadata"]["source"], "producer");
    let headers: Value = row.get(1);
    assert_eq!(headers["event_id"], event_id.as_str());
    assert_eq!(headers["correlation_id"], "req_test_1");
    assert_eq!(row.get::<_, String>(2), "customer-7");
    assert_eq!(row.get::<_, String>(4), "P");
    assert_eq!(app.rows().await, (1, 1));

    let stats = app.admin().stats().await.unwrap();
    assert_eq!(stats.outbox.P, 1);
}

#[tokio::test]
async fn an_idempotency_key_replays_the_first_answer_and_refuses_another_body() {
    let app = spawn_app().await;
    let send = |body: Value| {
        app.http
            .post(app.url("/messages"))
            .header("idempotency-key", "order-42")
            .json(&body)
            .send()
    };
    let first = send(json!({"content": "once"})).await.unwrap();
    assert_eq!(first.status(), StatusCode::CREATED);
    let first: Value = first.json().await.unwrap();
    let again = send(json!({"content": "once"})).await.unwrap();
    assert_eq!(again.status(), StatusCode::CREATED);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(again.json::<Value>().await.unwrap(), first);
    let other = send(json!({"content": "twice"})).await.unwrap();
    assert_eq!(other.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        other.json::<Value>().await.unwrap()["code"],
        "idempotency_key_reused"
    );
    assert_eq!(app.rows().await, (1, 1));

    // Racing requests with one new key: exactly one write, every one answered 201.
    let key2 = (0..8).map(|_| {
        app.http
            .post(app.url("/messages"))
            .header("idempotency-key", "race-1")
            .json(&json!({"content": "race"}))
            .send()
    });
    let answers = futures::future::join_all(key2).await;
    assert!(answers
        .iter()
        .all(|a| a.as_ref().unwrap().status() == StatusCode::CREATED));
    assert_eq!(app.rows().await, (2, 2));
}

#[tokio::test]
async fn an_idempotency_key_older_than_the_retention_is_deleted_then_new_again() {
    let db = TestDb::create().await;
    let url = db.url.clone();
    let app = spawn_app_with(db, &url, |c| {
        c.idempotency_key_retention = Duration::from_millis(300);
        c.idempotency_key_retention_interval = Duration::from_millis(50);
    })
    .await;
    let send = |content: &str| {
        app.http
            .post(app.url("/messages"))
            .header("idempotency-key", "order-43")
            .json(&json!({ "content": content }))
            .send()
    };
    assert_eq!(send("first").await.unwrap().status(), StatusCode::CREATED);
    // Within the retention the key still belongs to the first body.
    let reused = send("second").await.unwrap();
    assert_eq!(reused.status(), StatusCode::UNPROCESSABLE_ENTITY);

    app.db
        .wait_for_count(
            "the expired key is deleted",
            "select count(*) from idempotency_keys",
            0,
            Duration::from_secs(10),
        )
        .await;
    let again = send("second").await.unwrap();
    assert_eq!(again.status(), StatusCode::CREATED);
    assert!(again.headers().get("idempotent-replayed").is_none());
    let created: Value = again.json().await.unwrap();
    let (_, message) = app
        .get(&format!(
            "/messages/{}",
            created["id"].as_str().unwrap_or_default()
        ))
        .await;
    assert_eq!(message["content"], "second");
    assert_eq!(app.rows().await, (2, 2));
    assert_eq!(
        app.db.count("select count(*) from idempotency_keys").await,
        1,
        "the key is remembered again, for the new body"
    );
}

#[tokio::test]
async fn bad_input_gets_a_json_error_and_writes_nothing() {
    let db = TestDb::create().await;
    let url = db.url.clone();
    let app = spawn_app_with(db, &url, |c| c.max_body_bytes = 1024).await;
    let url = app.url("/messages");
    let cases: Vec<(reqwest::RequestBuilder, StatusCode, &str)> = vec![
        (
            app.http
                .post(&url)
                .header("content-type", "application/json")
                .body("{not json"),
            StatusCode::BAD_REQUEST,
            "malformed_json",
        ),
        (
            app.http
                .post(&url)
                .header("content-type", "text/plain")
                .body("{\"content\":\"x\"}"),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        ),
        (
            app.http.post(&url).json(&json!({})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
        ),
        (
            app.http.post(&url).json(&json!({"content": "  "})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "empty_content",
        ),
        (
            app.http.post(&url).json(&json!({"content": 5})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
        ),
        (
            app.http
                .post(&url)
                .json(&json!({"content": "x", "type": "Bad Type"})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_type",
        ),
        (
            app.http
                .post(&url)
                .json(&json!({"content": "x", "type": "order.created"})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "no_topic_route",
        ),
        (
            app.http
                .post(&url)
                .json(&json!({"content": "x", "extra": 1})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
        ),
        (
            app.http.post(&url).json(&json!({"content": "nul\u{0}"})),
            StatusCode::BAD_REQUEST,
            "nul_character",
        ),
        (
            app.http
                .post(&url)
                .json(&json!({"content": "x", "data": {"deep": [{"k\u{0}": 1}]}})),
            StatusCode::BAD_REQUEST,
            "nul_character",
        ),
        (
            // serde would read an array into the struct by position.
            app.http.post(&url).json(&json!(["x", null, null, null])),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
        ),
        (
            app.http
                .post(&url)
                .header("content-type", "application/vnd.x+json")
                .body("{\"content\":\"x\"}"),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        ),
        (
            app.http
                .post(&url)
                .header("content-type", "application/json; charset=latin1")
                .body("{\"content\":\"x\"}"),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        ),
        (
            app.http
                .post(&url)
                .json(&json!({"content": "x".repeat(2000)})),
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
        ),
    ];
    for (request, status, code) in cases {
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), status, "expected {code}");
        let body: Value = response.json().await.expect("a JSON error body");
        assert_eq!(body["code"], code, "{body}");
        assert!(body["error"].as_str().is_some_and(|e| !e.is_empty()));
    }
    assert_eq!(app.rows().await, (0, 0));
    let (status, body) = app.get("/messages/not-a-uuid").await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_id"))
    );
    let (status, _) = app
        .get(&format!("/messages/{}", uuid::Uuid::new_v4()))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = app.get("/outbox?state=Q").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn an_escaped_backslash_before_u0000_is_text_not_a_nul() {
    let app = spawn_app().await;
    let body = r#"{"content": "C:\\u0000", "data": {"path": "C:\\u0000"}}"#;
    let response = app
        .http
        .post(app.url("/messages"))
        .header("content-type", "application/json; charset=UTF-8")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let created: Value = response.json().await.unwrap();
    let id = created["id"].as_str().unwrap();
    let message = app.admin().message(id).await.unwrap();
    assert_eq!(message.content, "C:\\u0000", "{message:?}");
}

#[tokio::test]
async fn refused_paths_queries_and_methods_answer_the_json_shape() {
    let app = spawn_app().await;
    let cases = [
        ("GET", "/messages?limit=many", 400, "invalid_query"),
        ("GET", "/messages?before=%00", 400, "nul_character"),
        ("GET", "/messages/a%00b", 400, "nul_character"),
        ("GET", "/messages/%FF", 400, "bad_request"),
        ("DELETE", "/messages", 405, "method_not_allowed"),
        ("GET", "/nowhere", 404, "not_found"),
    ];
    for (method, path, status, code) in cases {
        let url = app.url(path);
        outbox_core::testing::assert_refused(&app.http, method, &url, status, code).await;
    }
    assert_eq!(app.rows().await, (0, 0));
}

#[tokio::test]
async fn a_failed_insert_on_either_side_leaves_no_row_on_the_other() {
    let app = spawn_app().await;
    // Real constraint failures inside the transaction, one on each table.
    app.db
        .client()
        .await
        .batch_execute(
            "create function refuse() returns trigger language plpgsql as $$
               begin raise exception 'refused by test trigger'; end $$;
             create trigger refuse_outbox before insert on events for each row
               when (new.payload->'data'->>'content' = 'fail-outbox') execute function refuse();
             create trigger refuse_message before insert on messages for each row
               when (new.content = 'fail-message') execute function refuse();",
        )
        .await
        .unwrap();
    for (content, left) in [
        (
            "fail-outbox",
            "outbox insert failed: the message row must not exist",
        ),
        ("fail-message", "message insert failed: no outbox row"),
    ] {
        let (status, _) = app.post(json!({ "content": content })).await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(app.rows().await, (0, 0), "{left}");
    }
    let (status, _) = app.post(json!({"content": "fine"})).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(app.rows().await, (1, 1));
}

#[tokio::test]
async fn postgres_down_answers_503_and_the_service_stays_up() {
    // A port nothing listens on stands in for a stopped PostgreSQL.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let db = TestDb::create().await;
    let app = spawn_app_with(
        db,
        &format!("postgres://postgres@127.0.0.1:{port}/nowhere"),
        |_| {},
    )
    .await;
    let (status, body) = app.post(json!({"content": "hello"})).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["code"], "unavailable");
    let (status, body) = app.get("/ready").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["checks"]["postgres"], false);
    let (status, _) = app.get("/health").await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn dead_rows_can_be_retried_and_admin_routes_need_the_token() {
    let db = TestDb::create().await;
    let url = db.url.clone();
    let app = spawn_app_with(db, &url, |c| c.admin_token = Some("s3cret".into())).await;
    let created = app.admin().create_message(&NewMessage::new("x")).await;
    let id = created.unwrap().outbox_id;
    app.db
        .execute(
            "update outbox set state = 'D', attempts = 5, last_error = 'too large' where id = $1",
            &[&id],
        )
        .await;
    let refused = app.admin().retry_outbox(id).await.unwrap_err();
    assert_eq!(refused.status, 401, "{refused}");
    let admin = app.admin().with_token("s3cret");
    let row = admin.retry_outbox(id).await.unwrap();
    assert_eq!((row.state.as_str(), row.attempts), ("P", 0));
    let again = admin.retry_outbox(id).await.unwrap_err();
    assert_eq!(again.status, 409, "{again}");
    let pending = admin.list_outbox(OutboxState::Pending).await.unwrap();
    assert_eq!(pending.items.len(), 1);
}

#[tokio::test]
async fn pages_openapi_and_metrics() {
    let app = spawn_app().await;
    for i in 0..5 {
        let message = NewMessage::new(&format!("m{i}"));
        app.admin().create_message(&message).await.unwrap();
    }
    let page = app.admin().list_messages(3, None).await.unwrap();
    assert_eq!(page.items.len(), 3);
    assert_eq!(page.items[0].content, "m4", "newest first");
    let next = page.next_before.expect("a next page");
    let rest = app.admin().list_messages(3, Some(next)).await.unwrap();
    let contents: Vec<&str> = rest.items.iter().map(|m| m.content.as_str()).collect();
    assert_eq!(contents, ["m1", "m0"]);
    assert!(rest.next_before.is_none());

    let (_, doc) = app.get("/openapi.json").await;
    assert!(doc["paths"]["/messages"]["post"].is_object());
    assert!(doc["paths"]["/messages/{id}"]["get"].is_object());

    let metrics = app.metrics().await;
    assert!(
        metrics.contains("producer_messages_created_total 5"),
        "{metrics}"
    );
    assert!(metrics.contains(
        "producer_http_requests_total{method=\"POST\",route=\"/messages\",status=\"201\"} 5"
    ));
}

#[tokio::test]
async fn data_nested_deeper_than_the_envelope_allows_is_refused_at_the_door() {
    let app = spawn_app().await;
    let nested = |levels: usize| -> Value {
        serde_json::from_str(&("[".repeat(levels) + &"]".repeat(levels))).unwrap()
    };
    // The event's data wraps the request's data in one more object.
    let limit = outbox_core::envelope::MAX_DATA_DEPTH - 1;
    let (status, body) = app
        .post(json!({"content": "deep", "data": nested(limit)}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    for levels in [limit + 1, 100, 126] {
        let (status, body) = app
            .post(json!({"content": "too deep", "data": nested(levels)}))
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{levels}: {body}");
        assert_eq!(body["code"], "data_too_deep");
    }
    assert_eq!(
        app.rows().await,
        (1, 1),
        "only the accepted one was written"
    );
}

#[tokio::test]
async fn a_correlation_id_that_cannot_travel_as_a_header_is_refused() {
    let app = spawn_app().await;
    let long = "r".repeat(129);
    let bad: [&[u8]; 4] = [b"req \xc3\xa9", b"r\xffx", b"two words", long.as_bytes()];
    for value in bad {
        let r = app
            .http
            .post(app.url("/messages"))
            .header(
                "x-correlation-id",
                reqwest::header::HeaderValue::from_bytes(value).unwrap(),
            )
            .json(&json!({"content": "hello"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{value:?}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["code"], "invalid_correlation_id");
    }
    assert_eq!(app.rows().await, (0, 0));
}

#[test]
fn help_shows_no_secret_values() {
    outbox_core::testing::assert_help_hides_secrets(env!("CARGO_BIN_EXE_producer"));
}

#[tokio::test]
async fn with_admin_token_every_route_but_publishing_and_operations_needs_it() {
    let db = TestDb::create().await;
    let url = db.url.clone();
    let app = spawn_app_with(db, &url, |c| c.admin_token = Some("s3cret".into())).await;
    outbox_core::testing::eventually("the producer is ready", Duration::from_secs(10), || async {
        (app.get("/ready").await.0 == StatusCode::OK).then_some(())
    })
    .await;
    outbox_core::testing::assert_admin_token_guards(
        &app.base,
        "s3cret",
        producer::OPEN_ROUTES,
        &every_route(),
    )
    .await;
}

/// Every route the producer serves, called so that it reaches its handler, with the status the
/// handler answers.
fn every_route() -> Vec<outbox_core::testing::RouteCall> {
    use outbox_core::testing::RouteCall;
    let unknown = "0193a4b2-0000-7000-8000-000000000000";
    RouteCall::served([
        RouteCall::new("POST", "/messages", "/messages", 201).json(json!({"content": "hi"})),
        RouteCall::get("/messages", 200),
        RouteCall::new(
            "GET",
            "/messages/{id}",
            &format!("/messages/{unknown}"),
            404,
        ),
        RouteCall::get("/outbox", 200),
        RouteCall::new("POST", "/outbox/{id}/retry", "/outbox/999999/retry", 404),
        RouteCall::get("/stats", 200),
    ])
}

#[tokio::test]
async fn the_openapi_document_is_valid_and_lists_every_route_with_typed_answers() {
    let app = spawn_app().await;
    let document =
        outbox_core::testing::assert_openapi_lists_every_route(&app.base, &every_route()).await;
    // Every success answer names its schema: none is a bare object.
    for (method, path) in outbox_core::testing::operations(&document) {
        if path == "/openapi.json" {
            continue;
        }
        let operation = &document["paths"][&path][method.to_lowercase()];
        let (status, answer) = operation["responses"]
            .as_object()
            .unwrap()
            .iter()
            .find(|(status, _)| status.starts_with('2'))
            .unwrap_or_else(|| panic!("{method} {path} has no 2xx answer"));
        let schema = &answer["content"]["application/json"]["schema"];
        assert!(
            schema["$ref"].is_string(),
            "{method} {path} answers {status} with an untyped body: {schema}"
        );
    }
}

/// A query in flight when its backend is terminated (as PostgreSQL does to every session when it
/// shuts down) fails with SQLSTATE 57P01 admin_shutdown: the client is told to retry (503,
/// Retry-After), not that the server is broken (500), and requests soon succeed again.
#[tokio::test]
async fn a_query_cut_by_a_postgres_shutdown_answers_503_with_retry_after() {
    let db = TestDb::create().await;
    let url = db.url.clone();
    let app = spawn_app_with(db, &url, |c| c.database.database_pool_size = 1).await;
    outbox_core::testing::eventually("the producer is ready", Duration::from_secs(10), || async {
        (app.get("/ready").await.0 == StatusCode::OK).then_some(())
    })
    .await;
    // Our own session holds a lock the producer's query waits for, so the query is in flight
    // when its backend is terminated.
    let (mut locker, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let lock = locker.transaction().await.unwrap();
    lock.batch_execute("lock table messages in access exclusive mode")
        .await
        .unwrap();
    let request = tokio::spawn({
        let (http, url) = (app.http.clone(), app.url("/messages"));
        async move { http.get(url).send().await.unwrap() }
    });
    let waiting = "select count(*) from pg_stat_activity
                   where datname = current_database() and pid <> pg_backend_pid()
                     and wait_event_type = 'Lock'";
    outbox_core::testing::eventually(
        "the producer's query waits for the lock",
        Duration::from_secs(10),
        || async {
            let n: i64 = lock.query_one(waiting, &[]).await.unwrap().get(0);
            (n == 1).then_some(())
        },
    )
    .await;
    lock.query(
        "select pg_terminate_backend(pid) from pg_stat_activity
         where datname = current_database() and pid <> pg_backend_pid()",
        &[],
    )
    .await
    .unwrap();
    let response = request.await.unwrap();
    let status = response.status();
    let retry_after = response.headers().get("retry-after").cloned();
    let body: Value = response.json().await.unwrap();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["code"], "unavailable");
    assert_eq!(
        retry_after.as_ref().and_then(|v| v.to_str().ok()),
        Some("1")
    );
    lock.rollback().await.unwrap();
    // The pool may hand out the cut connection once more before it sees it closed: that is a 503
    // too, never a 500, and the pool then connects afresh.
    outbox_core::testing::eventually("the producer recovers", Duration::from_secs(10), || async {
        let (status, body) = app.get("/messages").await;
        assert!(
            [StatusCode::OK, StatusCode::SERVICE_UNAVAILABLE].contains(&status),
            "{status}: {body}"
        );
        (status == StatusCode::OK).then_some(())
    })
    .await;
}

#[tokio::test]
async fn data_with_extreme_numbers_reads_back_as_written() {
    let app = spawn_app().await;
    let data =
        json!({"max": f64::MAX, "tiny": 5e-324, "big": 12345678901234567890u64, "neg": -1.5e300});
    let created = app
        .admin()
        .create_message(&NewMessage {
            data: Some(data.clone()),
            ..NewMessage::new("numbers")
        })
        .await
        .unwrap();
    let one = app.admin().message(&created.id.to_string()).await.unwrap();
    assert_eq!(one.data.as_ref(), Some(&data));
    // The raw JSON of the list too: no typed reading stands between the bytes and the check.
    let (status, page) = app.get("/messages").await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert_eq!(page["items"][0]["data"], data);
}
