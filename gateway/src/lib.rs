//! # gateway
//!
//! The `keygate` binary's library: transport and process around
//! [`kms_core`]. What it guarantees:
//! - every API call arrives over mutual TLS and is authorized by a
//!   default-deny policy for the identity in the client certificate;
//! - every key operation is recorded in the tamper-evident audit chain
//!   before its result leaves (fail closed when the audit log cannot write);
//! - errors become HTTP responses in one place ([`error`]) with stable codes
//!   and no secret, key byte or backend detail;
//! - no log line, error or metric contains key material or field values.
//!
//! Modules: [`config`], [`tls`], [`policy`], [`audit_log`], [`server`]
//! (the key service), [`sidecar`] (the app-facing encryption gateway),
//! [`admin`] (the security team's CLI), [`up`] (everything on one machine
//! for development), [`metrics`], [`error`], [`pki`] (development
//! certificates), [`cli`].

#![forbid(unsafe_code)]

pub mod abuse;
pub mod admin;
pub mod audit_log;
mod claim;
pub mod cli;
pub mod compliance;
pub mod config;
pub mod error;
pub mod extract;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub mod hygiene;
pub mod issue_binary;
pub mod metrics;
pub mod openapi;
pub mod pki;
pub mod policy;
pub mod server;
pub mod sidecar;
mod signals;
pub mod tls;
pub mod unwrap_binary;
pub mod up;
pub mod wire;
