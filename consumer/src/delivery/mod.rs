//! A delivery's lifecycle: its states ([`DeliveryState`], [`Hold`]), the pure decision of what an
//! attempt leads to ([`decision`]), and the store, the only code that reads or writes the
//! `deliveries` and `delivery_attempts` tables ([`store`]).
//!
//! ```text
//!   recorded ──▶ pending ──claimed/leased──▶ sending ──▶ succeeded
//!                 ▲  │ ▲                        │  └────▶ dead ──replayed/retried──▶ pending
//!                 │  │ └──── retried / released ┘
//!                 │  ├──held by the breaker (held_by = breaker) ──reset or probe time──▶ due
//!                 └──┴──parked (held_by = endpoint_disabled) ──endpoint enabled──▶ due
//! ```

pub mod decision;
mod state;
pub mod store;

pub use state::{DeliveryState, Hold};
pub use store::Claimed;
