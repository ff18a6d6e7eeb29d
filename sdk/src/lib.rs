#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]

// Configuration and the client handle.
mod builder;
mod client;
mod endpoint;
mod retry;
mod transport;

// The operations, one file each.
mod ops;
mod report;
mod schema_ref;

// Errors.
mod code;
mod error;
mod operation;
mod redact;

// Entry points for the fuzz targets (`fuzz/`); never in a release build.
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;

#[cfg(test)]
mod http_tests;
#[cfg(test)]
mod test_server;

pub use builder::ClientBuilder;
pub use client::Client;
pub use code::ErrorCode;
pub use endpoint::DEFAULT_SOCKET;
pub use error::Error;
pub use operation::Operation;
pub use ops::probe::Readiness;
pub use ops::rewrap::{Rewrapped, RewrappedBatch};
pub use report::{Decrypted, FieldOutcome, FieldReport, RecordReport};
pub use schema_ref::SchemaRef;
/// The bearer token's type, re-exported so callers need not depend on `secrecy`.
pub use secrecy::SecretString;
