//! What every service's OpenAPI document shares: the error body, the answers every operation can
//! give (bad input, PostgreSQL down, the admin token), the admin security scheme, a schema for
//! JSON without NUL characters, and `GET /openapi.json` itself.
//!
//! A service registers each operation next to its handler with `utoipa-axum` and hands the
//! router to [`serve_document`]:
//!
//! ```ignore
//! let (router, document) = outbox_core::http::openapi::serve_document(
//!     OpenApiRouter::with_openapi(ApiDoc::openapi()) // info only
//!         .routes(routes!(create_message, list_messages))
//!         .routes(routes!(get_message)),
//!     OPEN_ROUTES,
//! );
//! ```
//! Every operation but the open ones (the list `AdminAuth` is given) gets the admin token's
//! `security` ([`ADMIN_TOKEN_SCHEME`]), so the document says what the server enforces.

use std::sync::Arc;

use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use utoipa::openapi::path::{HttpMethod, Operation, OperationBuilder, PathItem};
use utoipa::openapi::schema::{AnyOfBuilder, ArrayBuilder, ObjectBuilder, Type};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{ContentBuilder, OpenApi, Ref, RefOr, ResponseBuilder, Schema};
use utoipa::{PartialSchema, ToSchema};
use utoipa_axum::router::OpenApiRouter;

/// The name of the bearer-token scheme of the admin routes (their `security`).
pub const ADMIN_TOKEN_SCHEME: &str = "admin_token";

/// The path every service serves its document at.
pub const DOCUMENT_PATH: &str = "/openapi.json";

/// Every 4xx and 5xx answer ([`super::ApiError`]).
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct ErrorBody {
    /// A sentence for people.
    error: String,
    /// A stable code for programs, e.g. `invalid_limit`.
    code: String,
}

/// Any JSON value without a NUL character in any string or key: PostgreSQL's jsonb cannot hold
/// one, so the services refuse it.
const JSON_WITHOUT_NUL: &str = "JsonWithoutNul";

/// A string of any characters but NUL.
pub const NO_NUL: &str = "^[^\\u0000]*$";

/// The reference to the `JsonWithoutNul` schema, for a field holding any JSON
/// (`#[schema(schema_with = outbox_core::http::openapi::json_without_nul)]`).
pub fn json_without_nul() -> Ref {
    Ref::from_schema_name(JSON_WITHOUT_NUL)
}

/// Splits `router` into the axum router and its document, completes the document (shared answers,
/// the admin scheme, `GET /openapi.json` itself) and adds the route serving it. The document
/// therefore lists exactly the operations registered with `routes!`, plus `/openapi.json`.
///
/// `open` are the routes that need no admin token, as `(method, path template)`: the list the
/// service gives `admin_auth::AdminAuth`. Every other operation is documented as needing the
/// token when one is set: `security: [{}, {"admin_token": []}]`.
pub fn serve_document<S>(router: OpenApiRouter<S>, open: &[(&str, &str)]) -> (Router<S>, OpenApi)
where
    S: Clone + Send + Sync + 'static,
{
    let (router, mut document) = router.split_for_parts();
    document.paths.add_path_operation(
        DOCUMENT_PATH,
        vec![HttpMethod::Get],
        OperationBuilder::new()
            .summary(Some("This document"))
            .operation_id(Some("openapi_document"))
            .response(
                "200",
                ResponseBuilder::new()
                    .description("The OpenAPI document of this service")
                    .content(
                        "application/json",
                        ContentBuilder::new()
                            .schema(Some(ObjectBuilder::new().schema_type(Type::Object)))
                            .build(),
                    ),
            ),
    );
    for (path, item) in document.paths.paths.iter_mut() {
        for (method, operation) in operations(item) {
            if let Some(operation) = operation {
                if !open.contains(&(method, path.as_str())) {
                    operation.security = Some(vec![
                        SecurityRequirement::default(),
                        SecurityRequirement::new(ADMIN_TOKEN_SCHEME, Vec::<String>::new()),
                    ]);
                }
            }
        }
    }
    complete(&mut document);
    let body: Arc<str> = serde_json::to_string(&document)
        .expect("an OpenAPI document serializes")
        .into();
    let router = router.route(
        DOCUMENT_PATH,
        get(move || {
            let body = body.clone();
            async move {
                (
                    [(header::CONTENT_TYPE, "application/json")],
                    body.to_string(),
                )
                    .into_response()
            }
        }),
    );
    (router, document)
}

/// Adds what every document shares: the error body and `JsonWithoutNul` schemas, the admin
/// scheme, and to every operation the answers it can give besides its own (400 and 503 always;
/// 413, 415 and 422 with a body; 401 with `security`). Answers an operation declares without a
/// body get the error body.
pub fn complete(openapi: &mut OpenApi) {
    let components = openapi.components.get_or_insert_with(Default::default);
    components.add_security_scheme(
        ADMIN_TOKEN_SCHEME,
        SecurityScheme::Http(
            HttpBuilder::new()
                .scheme(HttpAuthScheme::Bearer)
                .description(Some(
                    "Needed only when the service runs with ADMIN_TOKEN set",
                ))
                .build(),
        ),
    );
    components
        .schemas
        .insert(ErrorBody::name().into_owned(), ErrorBody::schema());
    components
        .schemas
        .insert(JSON_WITHOUT_NUL.into(), json_without_nul_schema());

    for item in openapi.paths.paths.values_mut() {
        for (_, operation) in operations(item) {
            if let Some(operation) = operation {
                add_shared_answers(operation);
            }
        }
    }
}

/// The operations of a path the services serve, by method as `admin_auth` writes it.
fn operations(item: &mut PathItem) -> [(&'static str, &mut Option<Operation>); 5] {
    [
        ("GET", &mut item.get),
        ("POST", &mut item.post),
        ("PUT", &mut item.put),
        ("PATCH", &mut item.patch),
        ("DELETE", &mut item.delete),
    ]
}

fn json_without_nul_schema() -> RefOr<Schema> {
    let itself = || Ref::from_schema_name(JSON_WITHOUT_NUL);
    let of = |kind: Type| ObjectBuilder::new().schema_type(kind);
    AnyOfBuilder::new()
        .description(Some(
            "Any JSON value; no string or key may contain a NUL character",
        ))
        .item(of(Type::Null))
        .item(of(Type::String).pattern(Some(NO_NUL)))
        .item(of(Type::Number))
        .item(of(Type::Boolean))
        .item(ArrayBuilder::new().items(itself()))
        .item(
            of(Type::Object)
                .additional_properties(Some(itself()))
                .property_names(Some(of(Type::String).pattern(Some(NO_NUL)))),
        )
        .into()
}

fn add_shared_answers(operation: &mut Operation) {
    let mut answers = vec![
        (
            "400",
            "Bad input: a malformed query or path parameter, header or body",
        ),
        ("503", "PostgreSQL unavailable; nothing was read or written"),
    ];
    if operation.request_body.is_some() {
        answers.extend([
            ("413", "The body is larger than MAX_BODY_BYTES"),
            ("415", "The body is not Content-Type: application/json"),
            ("422", "Well-formed JSON, but not a valid request"),
        ]);
    }
    if operation.security.is_some() {
        answers.push((
            "401",
            "ADMIN_TOKEN is set and the request lacks Authorization: Bearer <ADMIN_TOKEN>",
        ));
    }
    for (status, description) in answers {
        operation
            .responses
            .responses
            .entry(status.into())
            .or_insert_with(|| error_answer(description));
    }
    // Answers the handlers declare without a body are the error shape too.
    for (status, answer) in operation.responses.responses.iter_mut() {
        if let RefOr::T(response) = answer {
            if status.starts_with(['4', '5']) && response.content.is_empty() {
                let description = response.description.clone();
                *answer = error_answer(&description);
            }
        }
    }
}

fn error_answer(description: &str) -> RefOr<utoipa::openapi::Response> {
    RefOr::T(
        ResponseBuilder::new()
            .description(description)
            .content(
                "application/json",
                ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name(ErrorBody::name())))
                    .build(),
            )
            .build(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use utoipa_axum::routes;

    #[utoipa::path(get, path = "/open", responses((status = 200, description = "Open")))]
    async fn open() {}

    #[utoipa::path(post, path = "/closed/{id}", params(("id" = String, Path)),
        responses((status = 200, description = "Closed")))]
    async fn closed() {}

    #[test]
    fn every_operation_but_the_open_ones_needs_the_admin_token() {
        let router = OpenApiRouter::<()>::new()
            .routes(routes!(open))
            .routes(routes!(closed));
        let (_, document) = serve_document(router, &[("GET", "/open"), ("GET", DOCUMENT_PATH)]);
        let paths = &serde_json::to_value(&document).unwrap()["paths"];
        let closed = &paths["/closed/{id}"]["post"];
        assert_eq!(
            closed["security"],
            serde_json::json!([{}, {"admin_token": []}])
        );
        assert!(closed["responses"]["401"].is_object(), "{closed}");
        for open in [&paths["/open"]["get"], &paths[DOCUMENT_PATH]["get"]] {
            assert!(open.get("security").is_none(), "{open}");
            assert!(open["responses"].get("401").is_none(), "{open}");
        }
    }
}
