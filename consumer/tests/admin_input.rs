//! The admin API's refusals of malformed input, against the running consumer: NUL characters in
//! bodies, paths and queries, non-object bodies, bad queries and wrong methods all answer a 4xx
//! `{"error", "code"}` and change nothing.

mod support;

use serde_json::json;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nul_characters_non_objects_bad_queries_and_wrong_methods_get_json_4xx() {
    let (db, topic) = setup(1).await;
    let mut consumer = spawn_app(&db, config(&db, &topic)).await;

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

    let (id, _) = create_endpoint(&consumer, "http://127.0.0.1:9/hook", &["*"]).await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_is_valid_and_lists_every_route_with_typed_answers() {
    let (db, topic) = setup(1).await;
    let mut consumer = spawn_app(&db, config(&db, &topic)).await;
    let document =
        outbox_core::testing::assert_openapi_lists_every_route(&consumer.base, &every_route())
            .await;
    for (method, path) in outbox_core::testing::operations(&document) {
        if path == "/openapi.json" {
            continue;
        }
        let answers = &document["paths"][&path][method.to_lowercase()]["responses"];
        let (status, answer) = answers
            .as_object()
            .and_then(|all| all.iter().find(|(status, _)| status.starts_with('2')))
            .unwrap_or_else(|| panic!("{method} {path} has no 2xx answer: {answers}"));
        if status == "204" {
            continue;
        }
        assert!(
            answer["content"]["application/json"]["schema"]["$ref"].is_string(),
            "{method} {path} answers {status} with an untyped body: {answer}"
        );
        let security = &document["paths"][&path][method.to_lowercase()]["security"];
        assert!(
            security.to_string().contains("admin_token"),
            "{method} {path} does not say it may need the admin token: {security}"
        );
    }
    let schemas = &document["components"]["schemas"];
    // The breaker JSON is the shared view: one name for the instant a probe may go.
    assert!(
        schemas["BreakerView"].to_string().contains("\"probe_at\""),
        "{}",
        schemas["BreakerView"]
    );
    // Delivery states and holds are the enums the store writes.
    assert_eq!(
        schemas["DeliveryState"]["enum"],
        json!(["pending", "succeeded", "dead"])
    );
    assert_eq!(
        schemas["Hold"]["enum"],
        json!(["breaker", "endpoint_disabled"])
    );
    // Request bodies are documented, with what they accept.
    let create = &document["paths"]["/endpoints"]["post"]["requestBody"];
    assert!(
        create["content"]["application/json"]["schema"]["$ref"].is_string(),
        "{create}"
    );
    assert_eq!(
        schemas["CreateEndpoint"]["required"],
        json!(["url", "event_types"])
    );
    consumer.stop().await;
}
