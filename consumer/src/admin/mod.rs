//! The admin API, by resource: [`endpoints`], [`deliveries`] (dead letters, retry, replay),
//! [`breakers`] and [`poison`] records. Handlers are thin: they parse input into checked values
//! once and call the owner of the state (the endpoint store, the delivery store, the breaker
//! store, ingest). Every error answers `{"error", "code"}` with a 4xx for bad input; with
//! `ADMIN_TOKEN` set, every route but `/health`, `/ready`, `/metrics` and `/openapi.json` needs it
//! as a bearer token. Each resource registers its operations next to their handlers (`routes!`),
//! so the OpenAPI document served at `GET /openapi.json` lists exactly the routes served.

mod breakers;
mod deliveries;
mod endpoints;
mod poison;

use axum::body::Bytes;
use axum::Router;
use outbox_core::admin_auth::{with_operational_routes, RouteSpec};
use outbox_core::http::{openapi, ApiError, PageLimit};
use serde::de::DeserializeOwned;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;

use crate::AppState;

/// The routes that need no `ADMIN_TOKEN` (besides `/health`, `/ready` and `/metrics`): only the
/// API description; every admin route needs it when it is set.
pub const OPEN_ROUTES: &[RouteSpec] = &[("GET", openapi::DOCUMENT_PATH)];

#[derive(OpenApi)]
#[openapi(info(
    title = "Consumer admin API",
    description = "Webhook endpoints, their deliveries and dead letters, circuit breakers and \
        poison records of the consumer that delivers events as signed webhooks."
))]
struct ApiDoc;

/// The admin routes, each registered with its OpenAPI operation, and the document they make,
/// served at `GET /openapi.json`.
pub fn api() -> (Router<AppState>, utoipa::openapi::OpenApi) {
    openapi::serve_document(
        OpenApiRouter::with_openapi(ApiDoc::openapi())
            .merge(endpoints::routes())
            .merge(deliveries::routes())
            .merge(breakers::routes())
            .merge(poison::routes()),
        OPEN_ROUTES,
    )
}

/// The admin routes plus the operational ones.
pub fn router(state: AppState) -> Router {
    let (api, _) = api();
    with_operational_routes(api, state.config.admin_token.as_deref(), OPEN_ROUTES).with_state(state)
}

/// Every list of the admin API: 100 a page unless `limit` (1 to 1000) says otherwise.
const PAGE: PageLimit = PageLimit::new(100, 1000);

/// A body that may be empty (all defaults) or a JSON object.
fn optional_body<T: DeserializeOwned + Default>(body: &Bytes) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        Ok(T::default())
    } else {
        outbox_core::http::parse_object(body)
    }
}
