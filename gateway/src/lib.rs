//! # gateway
//!
//! The `keygate` binary's library: transport and process. Nothing here is
//! built yet; this is the outline the key service, sidecar and admin CLI
//! issues fill in, each as its own module:
//!
//! - `config`: one TOML file, every key overridable by `KEYGATE_…` env
//!   vars, secrets by file path (DESIGN §11).
//! - `tls`: rustls with mandatory client certificates; identity from the
//!   certificate's URI SAN, else DNS SAN (DESIGN §6).
//! - `policy`: default-deny grants of roles, field classes and purposes.
//! - `audit`: the per-instance SHA-256 hash chain with signed checkpoints.
//! - `server`: the key service HTTP API (DESIGN §4) over
//!   [`kms_core::KeyHierarchy`].
//! - `sidecar`: the app-facing API (DESIGN §5): DEK pool, DEK cache, field
//!   crypto from [`kms_core::record`].
//! - `admin`: the security team's CLI (DESIGN §7).
//! - `error`: the one place errors become HTTP statuses and codes.

#![forbid(unsafe_code)]
