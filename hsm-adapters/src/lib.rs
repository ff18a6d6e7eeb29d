//! # hsm-adapters
//!
//! Implementations of [`kms_core::RootKeyProvider`]: the master keys under
//! which keygate wraps its tenant keys (DESIGN §9).
//!
//! ## What it guarantees
//! - **The master key never leaves its provider.** Errors, logs, `Debug`
//!   output and [`describe`](kms_core::RootKeyProvider::describe) never
//!   contain key bytes, passphrases or PINs; a provider is identified by a
//!   fingerprint (a one-way derivation of the key) or a key label.
//! - **Every wrap is bound to its [`WrapContext`](kms_core::WrapContext).**
//!   A blob unwraps only under the exact context it was wrapped with;
//!   anything else fails with an opaque
//!   [`CannotUnwrap`](kms_core::RootKeyError::CannotUnwrap) that does not say
//!   why. Wrapping the same key twice gives different blobs.
//! - **Key files are parsed strictly and totally.** Exact lengths, known
//!   versions, bounded KDF parameters; any input yields a value or an error,
//!   never a panic.
//! - **Insecure conveniences say so.** The local provider is for development
//!   and logs a warning every time it is created or opened.
//!
//! ## Providers
//! - `local` ([`LocalRootKey`], Unix only): a 256-bit root key in a file
//!   with mode `0600`, optionally sealed with a passphrase (Argon2id +
//!   AES-256-GCM-SIV). For `keygate up` and development only.
//! - `pkcs11` (coming): a key on a PKCS#11 token, tested against SoftHSM2.
//! - `aws_kms` (coming): an AWS KMS key, with the wrap context carried as
//!   the KMS encryption context.

#![forbid(unsafe_code)]

#[cfg(unix)]
mod local;

#[cfg(unix)]
pub use crate::local::{Argon2Params, FormatError, LocalKeyError, LocalRootKey};
