//! `keygate sidecar`: the app-facing encryption gateway (DESIGN §5).
//!
//! Runs beside each application, on a unix socket or loopback address, so
//! the application never holds a key. Encrypts with pre-issued DEKs from a
//! per-tenant pool, decrypts with DEKs unwrapped by the key service (one
//! batched call for all cache misses, shared with concurrent requests of
//! the same tenant and purpose) or from a bounded TTL cache, reveals
//! only the field classes this sidecar's identity may see, and reports
//! every field-level access to the key service's audit chain.

pub(crate) mod api;
mod cache;
pub mod config;
mod decrypt;
mod handlers;
mod keyring;
mod ks_client;
mod listener;
mod openapi;
mod pool;
mod report;
mod reporter;
mod request;
mod run;
mod shared_calls;
mod single_flight;
mod state;

pub use self::config::SidecarConfig;
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) use self::ks_client::fuzz_answers;
pub(crate) use self::openapi::document as openapi_document;
pub use self::run::{SidecarError, run};
