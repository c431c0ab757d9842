//! The admin API's refusals of malformed input, against the running consumer: NUL characters in
//! bodies, paths and queries, non-object bodies, bad queries and wrong methods all answer a 4xx
//! `{"error", "code"}` and change nothing.

mod support;

use serde_json::json;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nul_characters_non_objects_bad_queries_and_wrong_methods_get_json_4xx() {
    let (db, topic) = setup(1).await;
    let consumer = TestConsumer::start(config(&db, &topic)).await;

    let nul_body = json!({
        "url": "http://127.0.0.1:9/hook",
        "event_types": ["*"],
        "description": "before\u{0}after",
    });
    let (status, answer) = consumer.call("POST", "/endpoints", Some(nul_body)).await;
    assert_eq!(
        (status, answer["code"].as_str()),
        (400, Some("nul_character")),
        "{answer}"
    );
    let (status, answer) = consumer
        .call(
            "POST",
            "/endpoints",
            Some(json!(["http://127.0.0.1:9/hook", ["*"]])),
        )
        .await;
    assert_eq!(
        (status, answer["code"].as_str()),
        (422, Some("invalid_body")),
        "{answer}"
    );
    assert_eq!(db.count("select count(*) from endpoints").await, 0);

    let (id, _) = consumer
        .create_endpoint("http://127.0.0.1:9/hook", &["*"])
        .await;
    let cases = [
        (
            "POST",
            format!("/endpoints/{id}/rotate-secret"),
            Some(json!({"secret": "whsec_\u{0}"})),
            400,
            "nul_character",
        ),
        (
            "POST",
            format!("/endpoints/{id}/replay"),
            Some(json!([null, null])),
            422,
            "invalid_body",
        ),
        (
            "GET",
            "/endpoints/a%00b".to_owned(),
            None,
            400,
            "nul_character",
        ),
        (
            "GET",
            "/deliveries?endpoint_id=%00".to_owned(),
            None,
            400,
            "nul_character",
        ),
        (
            "GET",
            "/deliveries?limit=many".to_owned(),
            None,
            400,
            "invalid_query",
        ),
        (
            "GET",
            "/events/poison?after=x".to_owned(),
            None,
            400,
            "invalid_query",
        ),
        (
            "DELETE",
            "/deliveries".to_owned(),
            None,
            405,
            "method_not_allowed",
        ),
        ("GET", "/nowhere".to_owned(), None, 404, "not_found"),
    ];
    for (method, path, body, status, code) in cases {
        let (got, answer) = consumer.call(method, &path, body).await;
        assert_eq!(
            (got, answer["code"].as_str()),
            (status, Some(code)),
            "{method} {path} → {answer}"
        );
        assert!(answer["error"].is_string(), "{method} {path}");
    }
    let secret: String = db
        .client()
        .await
        .query_one("select secret from endpoints where id = $1", &[&id])
        .await
        .unwrap()
        .get(0);
    assert!(
        !secret.contains('\0'),
        "the refused rotation changed nothing"
    );
    consumer.stop().await;
}
