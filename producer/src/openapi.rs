//! `GET /openapi.json`, generated from the handlers' annotations. The answers every operation
//! shares (bad input, PostgreSQL down, the admin token) are added here once, so the document
//! lists every status a client can get; `scripts/api-fuzz.sh` checks it against the server.

use utoipa::openapi::path::Operation;
use utoipa::openapi::schema::{AnyOfBuilder, ArrayBuilder, ObjectBuilder, Type};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder, Schema};
use utoipa::{Modify, OpenApi, ToSchema};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Outbox producer API",
        description = "Write messages; each is published to Kafka exactly when it is committed."
    ),
    paths(
        crate::routes::create_message,
        crate::routes::list_messages,
        crate::routes::get_message,
        crate::routes::list_outbox,
        crate::routes::stats,
        crate::routes::retry_outbox,
    ),
    components(schemas(
        crate::routes::CreateMessage,
        crate::store::MessageView,
        crate::store::OutboxRow,
        ErrorBody,
        OutboxStateCode,
    )),
    modifiers(&SharedAnswers)
)]
struct ApiDoc;

/// The OpenAPI document of the producer's API.
pub fn document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// Every 4xx and 5xx answer (`outbox_core::http::ApiError`).
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct ErrorBody {
    /// A sentence for people.
    error: String,
    /// A stable code for programs, e.g. `invalid_limit`.
    code: String,
}

/// An outbox state: P pending, E sent, X retry later, D dead.
#[derive(ToSchema)]
#[allow(dead_code)]
pub enum OutboxStateCode {
    P,
    E,
    X,
    D,
}

/// The name of the bearer-token scheme of the admin routes (their `security`).
const ADMIN_TOKEN: &str = "admin_token";

/// Any JSON value without a NUL character in any string or key: PostgreSQL's jsonb cannot hold
/// one, so the producer refuses it.
const JSON_WITHOUT_NUL: &str = "JsonWithoutNul";

/// A string of any characters but NUL.
const NO_NUL: &str = "^[^\\u0000]*$";

struct SharedAnswers;

impl Modify for SharedAnswers {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            ADMIN_TOKEN,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "Needed only when the producer runs with ADMIN_TOKEN set",
                    ))
                    .build(),
            ),
        );
        components
            .schemas
            .insert(JSON_WITHOUT_NUL.into(), json_without_nul_schema());

        for item in openapi.paths.paths.values_mut() {
            let operations = [
                &mut item.get,
                &mut item.post,
                &mut item.put,
                &mut item.patch,
                &mut item.delete,
            ];
            for operation in operations.into_iter().flatten() {
                add_shared_answers(operation);
            }
        }
    }
}

/// The reference to [`JSON_WITHOUT_NUL`], for a field holding any JSON.
pub fn json_without_nul() -> Ref {
    Ref::from_schema_name(JSON_WITHOUT_NUL)
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
                    .schema(Some(Ref::from_schema_name("ErrorBody")))
                    .build(),
            )
            .build(),
    )
}
