//! Extractors whose rejections answer in the shared JSON error shape, and the one rule for JSON
//! bodies: `Content-Type: application/json` (optionally `charset=utf-8`), a top-level object, and
//! no NUL character (U+0000) in any key or string value, which PostgreSQL's `text` and `jsonb`
//! cannot hold.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequest, FromRequestParts, Query, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode};
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::ApiError;

/// A JSON object request body. Answers 415 `unsupported_media_type` unless the content type is
/// `application/json` with at most `charset=utf-8`; 400 `malformed_json` for invalid JSON; 400
/// `nul_character` when a parsed key or string contains U+0000; 422 `invalid_body` when the top
/// level is not an object or does not fit `T`; 413 `body_too_large` past the body limit.
pub struct JsonBody<T>(pub T);

impl<S, T> FromRequest<S> for JsonBody<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        if !is_json_content_type(req.headers()) {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "expected a body with Content-Type: application/json (charset, if given, utf-8)",
            ));
        }
        let body = Bytes::from_request(req, state)
            .await
            .map_err(|rejection| body_rejection(rejection, "request"))?;
        parse_object(&body).map(JsonBody)
    }
}

/// Parses `body` by the rules of [`JsonBody`] (all but the content type), for routes whose body
/// is optional.
pub fn parse_object<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request("malformed_json", format!("the body is not valid JSON: {e}"))
    })?;
    if contains_nul(&value) {
        return Err(nul_character());
    }
    // serde would otherwise read an array into a struct, field by position.
    if !value.is_object() {
        return Err(ApiError::unprocessable(
            "invalid_body",
            "the body must be a JSON object",
        ));
    }
    T::deserialize(&value)
        .map_err(|e| ApiError::unprocessable("invalid_body", format!("invalid body: {e}")))
}

/// Whether any object key or string at any depth of `value` holds U+0000. It looks at parsed
/// strings: the JSON text `"\u0000"` is a NUL, `"C:\\u0000"` (an escaped backslash) is not.
pub fn contains_nul(value: &Value) -> bool {
    match value {
        Value::String(text) => text.contains('\0'),
        Value::Array(items) => items.iter().any(contains_nul),
        Value::Object(map) => map
            .iter()
            .any(|(key, value)| key.contains('\0') || contains_nul(value)),
        Value::Null | Value::Bool(_) | Value::Number(_) => false,
    }
}

/// The 400 answered for a NUL character in a body, path or query.
pub(super) fn nul_character() -> ApiError {
    ApiError::bad_request(
        "nul_character",
        "the request must not contain NUL characters (U+0000)",
    )
}

/// `application/json`, optionally with `charset=utf-8`, any case; nothing else.
fn is_json_content_type(headers: &HeaderMap) -> bool {
    let Some(value) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let mut parts = value.split(';');
    let essence = parts.next().unwrap_or_default().trim();
    essence.eq_ignore_ascii_case("application/json")
        && parts.all(|parameter| {
            parameter.split_once('=').is_some_and(|(name, value)| {
                name.trim().eq_ignore_ascii_case("charset")
                    && value.trim().trim_matches('"').eq_ignore_ascii_case("utf-8")
            })
        })
}

/// The answer to a body that could not be read: `413 body_too_large` ("the `what` body is too
/// large") past the body limit, else `400 unreadable_body`.
pub fn body_rejection(rejection: BytesRejection, what: &str) -> ApiError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("the {what} body is too large"),
        )
    } else {
        ApiError::bad_request("unreadable_body", rejection.body_text())
    }
}

/// A query string deserialized into `T`; a query that does not fit answers 400 `invalid_query`.
pub struct QueryParams<T>(pub T);

impl<S, T> FromRequestParts<S> for QueryParams<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(query)| QueryParams(query))
            .map_err(|rejection| ApiError::bad_request("invalid_query", rejection.body_text()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;
    use serde::Deserialize;

    fn content_type(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_str(value).unwrap());
        headers
    }

    #[test]
    fn only_json_in_utf8_is_json() {
        for accepted in [
            "application/json",
            "Application/JSON",
            "application/json; charset=utf-8",
            "application/json;charset=UTF-8",
            "application/json; charset=\"utf-8\"",
        ] {
            assert!(is_json_content_type(&content_type(accepted)), "{accepted}");
        }
        for refused in [
            "application/vnd.x+json",
            "application/problem+json",
            "application/json; charset=latin1",
            "application/json; boundary=x",
            "application/json;",
            "text/json",
            "application/jsonx",
        ] {
            assert!(!is_json_content_type(&content_type(refused)), "{refused}");
        }
        assert!(!is_json_content_type(&HeaderMap::new()));
    }

    #[test]
    fn nul_is_found_in_parsed_strings_at_any_depth() {
        let parse = |text: &str| serde_json::from_str::<Value>(text).unwrap();
        assert!(contains_nul(&parse(r#"{"a": "x\u0000"}"#)));
        assert!(contains_nul(&parse(r#"{"a\u0000": 1}"#)));
        assert!(contains_nul(&parse(r#"{"a": [{"b": ["\u0000"]}]}"#)));
        assert!(!contains_nul(&parse(r#"{"path": "C:\\u0000"}"#)));
        assert!(!contains_nul(&parse(r#"{"a": [1, null, true, "ok"]}"#)));
    }

    #[derive(Debug, Deserialize)]
    #[allow(dead_code)]
    struct Pair {
        a: i64,
        b: i64,
    }

    #[test]
    fn only_objects_become_structs() {
        assert!(parse_object::<Pair>(br#"{"a": 1, "b": 2}"#).is_ok());
        let array = parse_object::<Pair>(b"[1, 2]").unwrap_err();
        assert_eq!(
            (array.status, array.code),
            (StatusCode::UNPROCESSABLE_ENTITY, "invalid_body")
        );
        let nul = parse_object::<Pair>(br#"{"a": 1, "b": 2, "c": "\u0000"}"#).unwrap_err();
        assert_eq!(
            (nul.status, nul.code),
            (StatusCode::BAD_REQUEST, "nul_character")
        );
        let broken = parse_object::<Pair>(b"{").unwrap_err();
        assert_eq!(broken.code, "malformed_json");
    }
}
