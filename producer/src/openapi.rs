//! The producer's OpenAPI document: its description here; each operation is registered next to
//! its handler (`routes::api`), and the answers every service shares come from
//! `outbox_core::http::openapi`. `scripts/api-fuzz.sh` checks the document against the server.

use utoipa::OpenApi;

#[derive(OpenApi)]
#[openapi(info(
    title = "Outbox producer API",
    description = "Write messages; each is published to Kafka exactly when it is committed."
))]
struct ApiDoc;

/// The document's `info`, before any operation is added.
pub fn info() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}
