//! The admin API, by resource: [`endpoints`], [`deliveries`] (dead letters, retry, replay),
//! [`breakers`] and [`poison`] records. Handlers are thin: they parse input into checked values
//! once and call the owner of the state (the endpoint store, the delivery store, the breaker
//! store, ingest). Every error answers `{"error", "code"}` with a 4xx for bad input; with
//! `ADMIN_TOKEN` set, every route but `/health`, `/ready` and `/metrics` needs it as a bearer token.

mod breakers;
mod deliveries;
mod endpoints;
mod poison;

use axum::body::Bytes;
use axum::middleware;
use axum::Router;
use outbox_core::admin_auth::{require_admin, AdminAuth, RouteSpec};
use outbox_core::http::{operational_routes, ApiError, PageLimit};
use serde::de::DeserializeOwned;

use crate::AppState;

/// The routes that need no `ADMIN_TOKEN`: only the operational ones (`/health`, `/ready`,
/// `/metrics`); every admin route needs it when it is set.
pub const OPEN_ROUTES: &[RouteSpec] = &[];

/// The admin routes plus the operational ones.
pub fn router(state: AppState) -> Router {
    let auth = AdminAuth::new(state.config.admin_token.as_deref(), OPEN_ROUTES);
    Router::new()
        .merge(endpoints::routes())
        .merge(deliveries::routes())
        .merge(breakers::routes())
        .merge(poison::routes())
        .merge(operational_routes::<AppState>())
        .route_layer(middleware::from_fn_with_state(auth, require_admin))
        .with_state(state)
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
