//! The HTTP calls tests make to a running service, and the check of a refusal's JSON shape.

use serde_json::Value;

/// `GET url`, the body as text; panics when the request or the read fails.
pub async fn get_text(http: &reqwest::Client, url: &str) -> String {
    try_get_text(http, url)
        .await
        .unwrap_or_else(|| panic!("GET {url} failed"))
}

/// `GET url`, the body as text; `None` when the request or the read fails (for polling a service
/// that may not be up yet).
pub async fn try_get_text(http: &reqwest::Client, url: &str) -> Option<String> {
    http.get(url).send().await.ok()?.text().await.ok()
}

/// `GET url`, the body parsed as JSON; panics when the request fails or the body is not JSON.
pub async fn get_json(http: &reqwest::Client, url: &str) -> Value {
    let text = get_text(http, url).await;
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("GET {url}: {e}: {text}"))
}

/// Sends `method url` (no body) and checks it is refused as every service refuses: `status`, a
/// JSON body `{"error": "<not empty>", "code": code}`, and on a 405 an `Allow` header.
pub async fn assert_refused(
    http: &reqwest::Client,
    method: &str,
    url: &str,
    status: u16,
    code: &str,
) {
    let method = reqwest::Method::from_bytes(method.as_bytes()).expect("an HTTP method");
    let response = http.request(method.clone(), url).send().await.unwrap();
    assert_eq!(response.status().as_u16(), status, "{method} {url}");
    if status == 405 {
        assert!(response.headers().contains_key("allow"), "{method} {url}");
    }
    let body: Value = response.json().await.expect("a JSON error body");
    assert_eq!(body["code"], code, "{method} {url} → {body}");
    assert!(
        body["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{method} {url} → {body}"
    );
}

impl super::RouteCall {
    /// `GET route` on the route itself (a route without parameters), answering `answers`.
    pub fn get(route: &'static str, answers: u16) -> Self {
        Self::new("GET", route, route, answers)
    }

    /// The operational routes every service serves
    /// ([`crate::admin_auth::OPERATIONAL_ROUTES`]), each answering 200 on a ready service.
    pub fn operational() -> impl Iterator<Item = Self> {
        crate::admin_auth::OPERATIONAL_ROUTES
            .iter()
            .map(|&(method, route)| Self::new(method, route, route, 200))
    }

    /// Every route a service with an HTTP API serves: its own `calls`, in their order, then
    /// `GET /openapi.json` and the [`operational`](Self::operational) routes.
    pub fn served(calls: impl IntoIterator<Item = Self>) -> Vec<Self> {
        calls
            .into_iter()
            .chain([Self::get("/openapi.json", 200)])
            .chain(Self::operational())
            .collect()
    }
}
