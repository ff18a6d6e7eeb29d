//! Shared helpers for keygate's cross-crate and end-to-end tests.
//!
//! Everything here uses real parts: the SQLite keystore on a temporary
//! directory and the local root key provider on a real key file.

#![forbid(unsafe_code)]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test support code

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

pub mod admin;
pub mod cluster;
pub mod keyservice;
pub mod providers;
pub mod sidecar;

use hsm_adapters::{Argon2Params, LocalRootKey};
use kms_core::store::SqliteStore;
use kms_core::{HierarchyConfig, KeyHierarchy, TenantId};

/// The sample schema used across end-to-end tests (every field mode): the
/// one `keygate up` installs.
pub use gateway::up::PATIENT_SCHEMA;

/// A tenant id from a literal.
pub fn tenant(name: &str) -> TenantId {
    TenantId::new(name).unwrap()
}

/// Opens (creating on first use) a key hierarchy in `dir`: `root.key`
/// (local provider, plain) and `data/keystore.sqlite3`.
pub async fn open_hierarchy(dir: &Path, key_ttl: Duration) -> KeyHierarchy {
    let key_path = dir.join("root.key");
    let root = if key_path.exists() {
        LocalRootKey::open(&key_path, None).unwrap()
    } else {
        LocalRootKey::create(&key_path, None, Argon2Params::DEFAULT).unwrap()
    };
    let store = SqliteStore::open_in_dir(&dir.join("data")).await.unwrap();
    KeyHierarchy::new(
        Arc::new(store),
        Arc::new(root),
        HierarchyConfig { key_ttl, max_batch: 1_000, ..HierarchyConfig::default() },
    )
    .await
    .unwrap()
}
