//! Every refusal in the shared JSON shape, wherever it comes from: an unknown route (404), a
//! wrong method (405), a NUL character in the path or query (400), and any plain-text rejection
//! an axum extractor or the router answers by itself.

use axum::extract::Request;
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::Router;

use super::ApiError;

/// Longest plain-text refusal carried over into the JSON error's message.
const MAX_PLAIN_ERROR_BYTES: usize = 16 * 1024;

/// `router` with a JSON 404 for unknown routes, a JSON 400 `nul_character` for `%00` in the path
/// or query (before any route sees it), and every non-JSON 4xx/5xx turned into the JSON shape,
/// keeping its status and headers (`Allow` on a 405). [`super::serve`] applies it to every
/// service.
pub fn uniform_errors(router: Router) -> Router {
    router
        .fallback(|| async { ApiError::not_found("route") })
        .layer(middleware::map_response(plain_errors_as_json))
        .layer(middleware::from_fn(refuse_nul_in_uri))
}

async fn refuse_nul_in_uri(request: Request, next: Next) -> Response {
    let target = request
        .uri()
        .path_and_query()
        .map(|target| target.as_str())
        .unwrap_or_default();
    // `%00` is the only way to write a NUL in a URI; a raw one never gets past hyper's parser.
    if target.contains("%00") || target.contains('\0') {
        return super::extract::nul_character().into_response();
    }
    next.run(request).await
}

async fn plain_errors_as_json(response: Response) -> Response {
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) || is_json(response.headers()) {
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, MAX_PLAIN_ERROR_BYTES)
        .await
        .unwrap_or_default();
    let text = String::from_utf8_lossy(&text).trim().to_owned();
    let message = if text.is_empty() {
        status
            .canonical_reason()
            .unwrap_or("request refused")
            .to_owned()
    } else {
        text
    };
    let mut json = ApiError::new(status, code_for(status), message).into_response();
    for (name, value) in &parts.headers {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            json.headers_mut().append(name, value.clone());
        }
    }
    json
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"))
}

fn code_for(status: StatusCode) -> &'static str {
    match status {
        StatusCode::BAD_REQUEST => "bad_request",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::REQUEST_TIMEOUT => "request_timeout",
        StatusCode::PAYLOAD_TOO_LARGE => "body_too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        StatusCode::UNPROCESSABLE_ENTITY => "invalid_body",
        StatusCode::SERVICE_UNAVAILABLE => "unavailable",
        status if status.is_server_error() => "internal_error",
        _ => "bad_request",
    }
}
