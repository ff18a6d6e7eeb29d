//! `keygate server`: the key service (DESIGN §4).
//!
//! The only process that ever holds tenant keys in the clear. Every request
//! arrives over mutual TLS; the caller's identity is its certificate's URI
//! SAN (else DNS SAN) and every key operation is authorized by the policy
//! and recorded in the audit chain before its result is returned.

pub(crate) mod api;
mod handlers;
mod jobs;
mod listener;
mod masters;
mod openapi;
mod routes;
mod startup;
mod state;

pub use self::listener::Caller;
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) use self::masters::{MasterTrust, recorded_settings};
pub(crate) use self::openapi::document as openapi_document;
pub use self::startup::{ServerError, run};
pub use self::state::AppState;
