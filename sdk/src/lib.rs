//! # keygate-sdk
//!
//! The Rust client for the keygate sidecar API (DESIGN §5). Not built yet;
//! it will offer typed, async `encrypt`/`decrypt` of `serde` types and of
//! `serde_json::Value`, batch variants, `index` and `pseudonym` helpers,
//! over a unix socket or loopback TCP with connection reuse and timeouts,
//! and typed errors mirroring the API's error codes.

#![forbid(unsafe_code)]
