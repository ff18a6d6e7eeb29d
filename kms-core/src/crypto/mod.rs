//! Cryptographic primitives, each wrapped once so the rest of the crate never
//! touches a cipher API directly: AES-256-GCM-SIV (RFC 8452), HKDF-SHA256,
//! HMAC-SHA256, SHA-256, OS randomness and constant-time comparison.

pub mod aead;
pub mod kdf;
pub mod mac;
pub mod rng;

pub use self::aead::{Aead, NONCE_LEN, SEAL_OVERHEAD, TAG_LEN};

/// An authenticated decryption or verification failed.
///
/// Deliberately says nothing about why: a wrong key, a wrong context and a
/// flipped bit all look the same to the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("cannot decrypt")]
#[non_exhaustive]
pub struct CannotDecrypt;

/// Compares two byte strings in constant time (for equal lengths).
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

/// SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(data).into()
}
