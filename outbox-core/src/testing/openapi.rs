//! Checks of a service's OpenAPI document against the service itself.

use std::collections::{BTreeSet, HashSet};

use serde_json::Value;

use super::RouteCall;
use crate::admin_auth::OPERATIONAL_ROUTES;

/// The methods an OpenAPI path item may hold, lowercase as the document writes them.
const METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

/// Fetches `GET /openapi.json` from the service at `base` and checks that:
///
/// - it is a structurally valid OpenAPI 3 document ([`openapi_problems`] finds nothing);
/// - the operations it lists are exactly the routes in `calls` (the test's own list of what the
///   service serves, written independently of the document), leaving out the operational routes
///   every service has (`/health`, `/ready`, `/metrics`, tested in outbox-core);
/// - every listed operation reaches a handler: requested with its path parameters filled in, it
///   answers neither 405 nor the router's own 404 for an unknown route.
///
/// Returns the document, for further checks.
pub async fn assert_openapi_lists_every_route(base: &str, calls: &[RouteCall]) -> Value {
    let http = reqwest::Client::new();
    let document: Value = http
        .get(format!("{base}{}", crate::http::openapi::DOCUMENT_PATH))
        .send()
        .await
        .expect("the service answers")
        .json()
        .await
        .expect("the document is JSON");
    let problems = openapi_problems(&document);
    assert!(problems.is_empty(), "not valid OpenAPI 3: {problems:#?}");

    let documented = operations(&document);
    let served: BTreeSet<(String, String)> = calls
        .iter()
        .filter(|c| !OPERATIONAL_ROUTES.contains(&(c.method, c.route)))
        .map(|c| (c.method.to_owned(), c.route.to_owned()))
        .collect();
    let undocumented: Vec<_> = served.difference(&documented).collect();
    let not_served: Vec<_> = documented.difference(&served).collect();
    assert!(
        undocumented.is_empty() && not_served.is_empty(),
        "served but not documented: {undocumented:?}; documented but not among the calls: {not_served:?}"
    );

    for (method, template) in &documented {
        let path = fill_path_parameters(template);
        let response = http
            .request(
                reqwest::Method::from_bytes(method.as_bytes()).expect("method"),
                format!("{base}{path}"),
            )
            .send()
            .await
            .expect("the service answers");
        let status = response.status().as_u16();
        let body: Value = response.json().await.unwrap_or_default();
        assert_ne!(
            status, 405,
            "{method} {path} is documented but not routed: {body}"
        );
        assert!(
            !(status == 404 && body["error"] == "route not found"),
            "{method} {path} is documented but no route serves it: {body}"
        );
    }
    document
}

/// The `(METHOD, path template)` of every operation a document lists.
pub fn operations(document: &Value) -> BTreeSet<(String, String)> {
    let mut found = BTreeSet::new();
    if let Some(paths) = document["paths"].as_object() {
        for (path, item) in paths {
            for method in METHODS {
                if item.get(method).is_some() {
                    found.insert((method.to_uppercase(), path.clone()));
                }
            }
        }
    }
    found
}

/// `/outbox/{id}/retry` with every `{parameter}` replaced by `1`, which every route's parameter
/// pattern accepts as a path segment (the handler may then refuse it, which is not a 404 of the
/// router).
fn fill_path_parameters(template: &str) -> String {
    template
        .split('/')
        .map(|segment| {
            if segment.starts_with('{') && segment.ends_with('}') {
                "1"
            } else {
                segment
            }
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// What makes `document` not a valid OpenAPI 3 document, as far as the structure the
/// specification requires goes: `openapi` is a 3.x version, `info` has a title and a version,
/// every path starts with `/` and holds only known keys, every operation has at least one
/// response, each with a description and a valid status key, every path template parameter is
/// declared `in: path` and `required`, operation ids are unique, and every `$ref` resolves inside
/// the document. Empty when it is valid.
pub fn openapi_problems(document: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    let version = document["openapi"].as_str().unwrap_or_default();
    if !version.starts_with("3.") {
        problems.push(format!(
            "openapi is {:?}, not a 3.x version",
            document["openapi"]
        ));
    }
    for field in ["title", "version"] {
        if !document["info"][field].is_string() {
            problems.push(format!("info.{field} is missing"));
        }
    }
    let Some(paths) = document["paths"].as_object() else {
        problems.push("paths is not an object".into());
        return problems;
    };
    let mut operation_ids = HashSet::new();
    for (path, item) in paths {
        if !path.starts_with('/') {
            problems.push(format!("path {path} does not start with /"));
        }
        let Some(item) = item.as_object() else {
            problems.push(format!("{path} is not a path item"));
            continue;
        };
        for key in item.keys() {
            let known = METHODS.contains(&key.as_str())
                || ["$ref", "summary", "description", "servers", "parameters"]
                    .contains(&key.as_str());
            if !known {
                problems.push(format!("{path} has the unknown field {key}"));
            }
        }
        let template_parameters: Vec<&str> = path
            .split('/')
            .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .collect();
        for method in METHODS {
            let Some(operation) = item.get(method) else {
                continue;
            };
            let what = format!("{} {path}", method.to_uppercase());
            if let Some(id) = operation["operationId"].as_str() {
                if !operation_ids.insert(id.to_owned()) {
                    problems.push(format!("{what}: operationId {id} is not unique"));
                }
            }
            match operation["responses"].as_object() {
                Some(responses) if !responses.is_empty() => {
                    for (status, response) in responses {
                        if !valid_status_key(status) {
                            problems.push(format!("{what}: response key {status} is not a status"));
                        }
                        if response.get("$ref").is_none() && !response["description"].is_string() {
                            problems.push(format!("{what}: response {status} has no description"));
                        }
                    }
                }
                _ => problems.push(format!("{what} has no responses")),
            }
            let declared: Vec<&Value> = operation["parameters"]
                .as_array()
                .into_iter()
                .chain(item.get("parameters").and_then(Value::as_array))
                .flatten()
                .collect();
            for parameter in &declared {
                let in_ = parameter["in"].as_str().unwrap_or_default();
                if parameter.get("$ref").is_none()
                    && (!parameter["name"].is_string()
                        || !["query", "header", "path", "cookie"].contains(&in_))
                {
                    problems.push(format!("{what}: a parameter lacks a name or a valid `in`"));
                }
            }
            for name in &template_parameters {
                let declared_in_path = declared
                    .iter()
                    .any(|p| p["name"] == *name && p["in"] == "path" && p["required"] == true);
                if !declared_in_path {
                    problems.push(format!(
                        "{what}: path parameter {name} is not declared required in path"
                    ));
                }
            }
        }
    }
    let mut references = Vec::new();
    collect_refs(document, &mut references);
    for reference in references {
        let resolves = reference
            .strip_prefix('#')
            .is_some_and(|pointer| document.pointer(pointer).is_some());
        if !resolves {
            problems.push(format!("$ref {reference} does not resolve"));
        }
    }
    problems
}

fn valid_status_key(key: &str) -> bool {
    key == "default"
        || (key.len() == 3
            && matches!(key.as_bytes()[0], b'1'..=b'5')
            && (key[1..].bytes().all(|b| b.is_ascii_digit()) || &key[1..] == "XX"))
}

fn collect_refs<'a>(value: &'a Value, into: &mut Vec<&'a str>) {
    match value {
        Value::Object(map) => {
            for (key, inner) in map {
                match (key.as_str(), inner) {
                    ("$ref", Value::String(reference)) => into.push(reference),
                    _ => collect_refs(inner, into),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|inner| collect_refs(inner, into)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn valid() -> Value {
        json!({
            "openapi": "3.1.0",
            "info": {"title": "t", "version": "1"},
            "paths": {
                "/items/{id}": {"get": {
                    "operationId": "get_item",
                    "parameters": [{"name": "id", "in": "path", "required": true}],
                    "responses": {"200": {"description": "ok",
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Item"}}}}}
                }}
            },
            "components": {"schemas": {"Item": {"type": "object"}}}
        })
    }

    #[test]
    fn a_valid_document_has_no_problems() {
        assert_eq!(openapi_problems(&valid()), Vec::<String>::new());
        assert_eq!(
            operations(&valid()),
            BTreeSet::from([("GET".to_owned(), "/items/{id}".to_owned())])
        );
    }

    #[test]
    fn each_broken_rule_is_found() {
        type Breaks = fn(&mut Value);
        let cases: [(&str, Breaks); 6] = [
            ("not a 3.x version", |d| d["openapi"] = json!("2.0")),
            ("info.title", |d| d["info"].as_object_mut().unwrap().clear()),
            ("has no responses", |d| {
                d["paths"]["/items/{id}"]["get"]["responses"] = json!({})
            }),
            ("not declared required in path", |d| {
                d["paths"]["/items/{id}"]["get"]["parameters"] = json!([])
            }),
            ("does not resolve", |d| d["components"] = json!({})),
            ("not a status", |d| {
                d["paths"]["/items/{id}"]["get"]["responses"]["20x"] = json!({"description": "?"})
            }),
        ];
        for (expected, break_it) in cases {
            let mut document = valid();
            break_it(&mut document);
            let problems = openapi_problems(&document);
            assert!(
                problems.iter().any(|p| p.contains(expected)),
                "{expected}: {problems:?}"
            );
        }
    }

    #[test]
    fn path_parameters_are_filled_with_a_segment() {
        assert_eq!(
            fill_path_parameters("/outbox/{id}/retry"),
            "/outbox/1/retry"
        );
        assert_eq!(fill_path_parameters("/stats"), "/stats");
    }
}
