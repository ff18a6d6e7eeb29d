//! # kms-core
//!
//! The core of keygate: key types, cryptography, the record format, schemas,
//! the keystore and the key hierarchy. Its only I/O is the keystore: the
//! embedded SQLite store (feature `sqlite`, on by default) and the shared
//! PostgreSQL store for replicas (feature `postgres`, the one network
//! client). Without either feature it is pure computation (what the fuzz
//! targets build).
//!
//! ## What it guarantees
//! - **Key material never leaks by accident.** Every key is a [`Key256`]:
//!   wiped on drop, no `Clone`/`PartialEq`/`Serialize`, a `Debug` that prints
//!   only the type name, bytes reachable only through `expose_secret()`.
//! - **One algorithm suite, used one way.** AES-256-GCM-SIV (RFC 8452) with
//!   96-bit nonces from the OS RNG, HKDF-SHA256 with versioned, length-
//!   prefixed `info` labels, HMAC-SHA256; tags and ids compared in constant
//!   time.
//! - **The record format is stable** (see `docs/record-format.md`): stored
//!   records decrypt forever; the vectors in `tests/vectors/` enforce it.
//! - **Decryption fails closed and whole.** A tampered header or field, a
//!   field moved, dropped or added, a wrong tenant or key: the record is
//!   rejected with an opaque "cannot decrypt" and no plaintext is returned.
//! - **Parsers of untrusted bytes are total.** Header parsing is strict,
//!   bounded and never panics (it is fuzzed).
//! - **Store writes are transactional.** Creating a tenant or a KEK version
//!   is all or nothing; at most one KEK version per tenant is ever active.
//!
//! Logs, errors and `Debug` output of this crate never contain key bytes or
//! field values.

#![forbid(unsafe_code)]

pub mod audit;
pub mod crypto;
mod dek;
pub mod fixed_text;
mod hierarchy;
mod ids;
mod kek;
mod pointer;
pub mod record;
mod root;
pub mod schema;
mod secret;
pub mod store;

pub use crate::dek::{
    DekBinding, IssuedDek, KekVersion, WRAPPED_DEK_LEN, WrappedDek, unwrap_dek, wrap_dek,
};
pub use crate::hierarchy::{
    CacheStats, ConnectBackoff, DekError, DekIssue, DekRequest, HierarchyConfig, HierarchyError,
    KeyHierarchy, MasterConnection, MasterConnector, MasterRotation, PreparedRotation, Rewrapped,
};
pub use crate::ids::{InvalidName, MAX_NAME_LEN, Name, RecordKeyId, TenantId};
pub use crate::kek::{InvalidTransition, KekState, StateChange};
pub use crate::pointer::{ExpandError, MAX_POINTER_LEN, PathPattern, PatternToken, PointerError};
pub use crate::root::{KeyPurpose, ProviderInfo, RootKeyError, RootKeyProvider, WrapContext};
pub use crate::secret::{KEY_LEN, Key256, SecretBuf};
