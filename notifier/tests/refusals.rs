//! The notifier's refusals of malformed input: NUL characters in signed bodies, paths and queries,
//! bad queries and wrong methods answer a 4xx `{"error", "code"}`, never a 500, and store nothing.

mod support;

use std::time::Duration;

use outbox_core::testing::eventually;
use reqwest::StatusCode;
use serde_json::json;
use support::*;

fn signed_body(id: &str, data: serde_json::Value) -> Vec<u8> {
    serde_json::to_vec(&json!({"id": id, "event": "message.created", "data": data})).unwrap()
}

#[tokio::test]
async fn nul_characters_bad_queries_and_wrong_methods_get_json_4xx() {
    let app = spawn_app(&[]).await;
    eventually("the notifier is ready", Duration::from_secs(30), || async {
        (app.get("/ready").await.0 == StatusCode::OK).then_some(())
    })
    .await;

    let send = |body: Vec<u8>, id: String| {
        let app = &app;
        async move {
            app.send_signed(
                "/webhooks/logger",
                &id,
                &body,
                now(),
                &[&app.secret],
                Headers::Standard,
            )
            .await
        }
    };
    for data in [
        json!({"content": "a\u{0}b"}),
        json!({"nested": [{"k\u{0}": 1}]}),
    ] {
        let id = new_event_id();
        let (status, answer) = send(signed_body(&id, data.clone()), id).await;
        assert_eq!(
            (status, answer["code"].as_str()),
            (StatusCode::BAD_REQUEST, Some("nul_character")),
            "{data} → {answer}"
        );
    }
    assert_eq!(app.count("select count(*) from received_events").await, 0);

    // The JSON text "C:\\u0000" is a backslash and five characters, not a NUL.
    let id = new_event_id();
    let body =
        format!(r#"{{"id": "{id}", "event": "message.created", "data": {{"path": "C:\\u0000"}}}}"#);
    let (status, answer) = send(body.into_bytes(), id).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(app.count("select count(*) from received_events").await, 1);

    let cases = [
        ("GET", "/webhooks/events?route=%00", 400, "nul_character"),
        ("GET", "/webhooks/%00/x", 400, "nul_character"),
        ("GET", "/webhooks/events?limit=many", 400, "invalid_query"),
        (
            "POST",
            "/circuit-breaker/reset?colour=red",
            400,
            "invalid_query",
        ),
        ("GET", "/webhooks/logger", 405, "method_not_allowed"),
        ("DELETE", "/notifications", 405, "method_not_allowed"),
        ("GET", "/nowhere", 404, "not_found"),
    ];
    for (method, path, status, code) in cases {
        let url = format!("{}{path}", app.base);
        outbox_core::testing::assert_refused(&app.http, method, &url, status, code).await;
    }
}
