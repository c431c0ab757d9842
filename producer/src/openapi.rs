//! `GET /openapi.json`, generated from the handlers' annotations.

use utoipa::OpenApi;

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
        crate::store::OutboxRow
    ))
)]
struct ApiDoc;

/// The OpenAPI document of the producer's API.
pub fn document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}
