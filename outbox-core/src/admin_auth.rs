//! The admin bearer token (`ADMIN_TOKEN`): one check, in constant time, for every service.
//!
//! With a token configured, every route of a service needs `Authorization: Bearer <token>` except
//! the ones it names as open (receiving and publishing routes) and the operational ones every
//! service has ([`OPERATIONAL_ROUTES`]). Routes are closed unless listed as open, so a route added
//! later cannot be forgotten open.
//!
//! ```ignore
//! let app = outbox_core::admin_auth::with_operational_routes(api, config.admin_token.as_deref(), OPEN_ROUTES);
//! ```
//! [`with_operational_routes`] adds the token check last, as `route_layer` covers only the routes
//! present when it is added.

use std::sync::Arc;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use sha2::{Digest, Sha256};

use crate::http::{ApiError, Operational};

/// A route as `(method, path template)`, the template as written in the router
/// (`/messages/{id}`). `GET` covers `HEAD` too, as axum routes it.
pub type RouteSpec = (&'static str, &'static str);

/// The routes of [`crate::http::operational_routes`]: open in every service, so probes and
/// Prometheus need no token.
pub const OPERATIONAL_ROUTES: &[RouteSpec] =
    &[("GET", "/health"), ("GET", "/ready"), ("GET", "/metrics")];

/// The configured token, or none (every route open).
#[derive(Clone)]
pub struct AdminToken {
    /// SHA-256 of the token: comparing digests takes the same time whatever the offered token's
    /// length or content, so timing tells an attacker nothing about the token.
    digest: Option<[u8; 32]>,
}

impl AdminToken {
    /// `None` or an empty token means no token: every route is open. An empty `ADMIN_TOKEN=` is
    /// how compose files and `.env` say "unset".
    pub fn new(token: Option<&str>) -> Self {
        AdminToken {
            digest: token
                .filter(|t| !t.is_empty())
                .map(|t| Sha256::digest(t.as_bytes()).into()),
        }
    }

    /// Whether a token is configured.
    pub fn is_set(&self) -> bool {
        self.digest.is_some()
    }

    /// True when no token is configured, or `headers` carry `Authorization: Bearer <token>`
    /// (scheme case-insensitive, as RFC 7235 has it).
    pub fn permits(&self, headers: &HeaderMap) -> bool {
        let Some(expected) = &self.digest else {
            return true;
        };
        let offered = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim())
            .unwrap_or("");
        let offered: [u8; 32] = Sha256::digest(offered.as_bytes()).into();
        crate::signature::constant_time_eq(&offered, expected)
    }
}

/// The token plus the routes that stay open whatever it is.
#[derive(Clone)]
pub struct AdminAuth {
    token: AdminToken,
    open: Arc<Vec<RouteSpec>>,
}

impl AdminAuth {
    /// `open` are the service's own open routes; [`OPERATIONAL_ROUTES`] are always open.
    pub fn new(token: Option<&str>, open: &[RouteSpec]) -> Self {
        let mut routes = OPERATIONAL_ROUTES.to_vec();
        routes.extend_from_slice(open);
        AdminAuth {
            token: AdminToken::new(token),
            open: Arc::new(routes),
        }
    }

    /// Whether `method` on the route `template` needs no token.
    pub fn is_open(&self, method: &str, template: &str) -> bool {
        let method = if method == "HEAD" { "GET" } else { method };
        self.open
            .iter()
            .any(|&(m, path)| m == method && path == template)
    }
}

/// A service's router: its `api` routes plus [`crate::http::operational_routes`], every one of them
/// but the `open` and the operational ones behind `token` ([`require_admin`]). The same `open`
/// list makes the OpenAPI document's `security` (`crate::http::openapi::serve_document`).
pub fn with_operational_routes<S: Operational>(
    api: Router<S>,
    token: Option<&str>,
    open: &[RouteSpec],
) -> Router<S> {
    api.merge(crate::http::operational_routes::<S>())
        .route_layer(axum::middleware::from_fn_with_state(
            AdminAuth::new(token, open),
            require_admin,
        ))
}

/// Middleware (for `route_layer`, so the matched route is known): with a token configured, a
/// request to a route that is not open and lacks the right bearer token answers
/// `401 {"error", "code": "unauthorized"}` with `WWW-Authenticate: Bearer`, and reaches no handler.
pub async fn require_admin(
    State(auth): State<AdminAuth>,
    request: Request,
    next: Next,
) -> Response {
    if auth.token.is_set() {
        let template = request
            .extensions()
            .get::<MatchedPath>()
            .map(MatchedPath::as_str)
            .unwrap_or("");
        if !auth.is_open(request.method().as_str(), template)
            && !auth.token.permits(request.headers())
        {
            let mut response = ApiError::unauthorized(
                "unauthorized",
                "this route needs Authorization: Bearer <ADMIN_TOKEN>",
            )
            .into_response();
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return response;
        }
    }
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bearer(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, value.parse().unwrap());
        headers
    }

    #[test]
    fn only_the_configured_token_is_permitted() {
        let token = AdminToken::new(Some("s3cret"));
        assert!(token.permits(&bearer("Bearer s3cret")));
        assert!(token.permits(&bearer("bearer s3cret")));
        assert!(!token.permits(&bearer("Bearer s3cre")));
        assert!(!token.permits(&bearer("Bearer s3cret2")));
        assert!(!token.permits(&bearer("Basic s3cret")));
        assert!(!token.permits(&bearer("s3cret")));
        assert!(!token.permits(&bearer("Bearer ")));
        assert!(!token.permits(&HeaderMap::new()));
    }

    #[test]
    fn no_or_an_empty_token_leaves_everything_open() {
        for token in [AdminToken::new(None), AdminToken::new(Some(""))] {
            assert!(!token.is_set());
            assert!(token.permits(&HeaderMap::new()));
        }
    }

    #[test]
    fn operational_routes_are_always_open_and_head_counts_as_get() {
        let auth = AdminAuth::new(Some("t"), &[("POST", "/messages")]);
        assert!(auth.is_open("GET", "/health"));
        assert!(auth.is_open("HEAD", "/metrics"));
        assert!(auth.is_open("POST", "/messages"));
        assert!(!auth.is_open("GET", "/messages"));
        assert!(!auth.is_open("POST", "/health"));
        assert!(!auth.is_open("GET", ""));
    }
}
