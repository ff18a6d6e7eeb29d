//! Test fixtures shared by crates that cannot depend on the tests crate
//! (`keygate-tests` depends on them): only std and tempfile, no keygate
//! crate, so any crate may take this as a dev-dependency.

#![forbid(unsafe_code)]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test support code

pub mod softhsm2;
