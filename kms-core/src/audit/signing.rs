//! Checkpoint signatures: ECDSA P-256 with SHA-256 (RFC 6979 deterministic
//! nonces), one key per key-service instance.
//!
//! The signed message is the canonical encoding (see the `encode` module)
//!
//! ```text
//! bytes("keygate/v1/audit-checkpoint") ‖ bytes(instance) ‖ int(seq)
//!     ‖ bytes(hash) ‖ int(ts_ms)
//! ```
//!
//! Its leading length prefix keeps it distinct from every chain hash input
//! (which starts with the raw label). Signatures are stored as the fixed
//! 64-byte `r ‖ s`; public keys as uncompressed SEC1 points (65 bytes).
//!
//! The key is generated at an instance's first start and stored only
//! wrapped by the root provider, exactly like a KEK, under
//! [`AuditSigner::wrap_context`].

use std::fmt;

use p256::ecdsa::signature::{Signer, Verifier};
use p256::ecdsa::{Signature, SigningKey, VerifyingKey};
use zeroize::Zeroize;

use super::chain::HASH_LEN;
use super::encode::Encoder;
use crate::crypto::rng::RandomError;
use crate::root::{KeyPurpose, WrapContext};
use crate::secret::{KEY_LEN, Key256};
use crate::store::CheckpointRow;

/// Domain-separation label of checkpoint messages.
pub const CHECKPOINT_LABEL: &[u8] = b"keygate/v1/audit-checkpoint";

/// Length of a stored checkpoint signature (`r ‖ s`).
pub const SIGNATURE_LEN: usize = 64;

/// How often [`AuditSigner::generate`] draws again when 32 random bytes are
/// not a valid scalar (probability about 2⁻³² per draw).
const GENERATE_ATTEMPTS: usize = 4;

/// The message a checkpoint signature covers (see the module docs).
pub fn checkpoint_message(instance: &str, seq: i64, hash: &[u8], ts_ms: i64) -> Vec<u8> {
    let mut out = Vec::with_capacity(96 + instance.len());
    Encoder(&mut out)
        .bytes(CHECKPOINT_LABEL)
        .bytes(instance.as_bytes())
        .int(seq)
        .bytes(hash)
        .int(ts_ms);
    out
}

/// Creating or using a signing key failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SignerError {
    /// The 32 bytes are not a valid P-256 private scalar (zero or not
    /// below the group order): not an audit signing key.
    #[error("not a valid audit signing key")]
    InvalidKey,
    /// The operating system's random number generator failed.
    #[error(transparent)]
    Random(#[from] RandomError),
    /// The signature computation failed.
    #[error("signing the audit checkpoint failed")]
    SigningFailed,
}

/// A checkpoint does not verify. Deliberately coarse: a forged, altered or
/// foreign signature all look the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CheckpointError {
    /// The public key is not a valid SEC1-encoded P-256 point.
    #[error("the audit public key is invalid")]
    InvalidPublicKey,
    /// The signature does not verify for this checkpoint under this key.
    #[error("the checkpoint signature does not verify")]
    BadSignature,
}

/// An instance's audit signing key.
///
/// The scalar is wiped on drop; there is no `Clone`, and `Debug` shows only
/// the public key. [`AuditSigner::to_key`] is the one way to the scalar,
/// for wrapping by the root provider.
pub struct AuditSigner {
    key: SigningKey,
}

impl AuditSigner {
    /// A fresh key from the operating system's random number generator.
    pub fn generate() -> Result<Self, SignerError> {
        for _ in 0..GENERATE_ATTEMPTS {
            if let Ok(signer) = Self::from_key(&Key256::generate()?) {
                return Ok(signer);
            }
        }
        // Four out-of-range draws in a row mean the generator is broken.
        Err(SignerError::Random(RandomError))
    }

    /// The key whose private scalar is `key` (big-endian), as unwrapped by
    /// the root provider.
    pub fn from_key(key: &Key256) -> Result<Self, SignerError> {
        SigningKey::from_slice(key.expose_secret())
            .map(|key| Self { key })
            .map_err(|_| SignerError::InvalidKey)
    }

    /// The private scalar as a [`Key256`], to be wrapped by the root
    /// provider under [`AuditSigner::wrap_context`].
    pub fn to_key(&self) -> Key256 {
        let mut repr = self.key.to_bytes();
        let mut bytes: [u8; KEY_LEN] = repr.into();
        repr.as_mut_slice().zeroize();
        Key256::from_array(&mut bytes)
    }

    /// The root-provider context an instance's signing key is wrapped for.
    pub fn wrap_context(instance: &str) -> WrapContext {
        WrapContext { purpose: KeyPurpose::AuditSigning, owner: instance.to_owned(), version: 1 }
    }

    /// The public key, SEC1 uncompressed (65 bytes).
    pub fn public_key_sec1(&self) -> Vec<u8> {
        self.verifying_key().to_sec1()
    }

    /// The matching verification key.
    pub fn verifying_key(&self) -> AuditVerifyingKey {
        AuditVerifyingKey { key: *self.key.verifying_key() }
    }

    /// Signs "event `seq` of `instance`'s chain has hash `hash`" at `ts_ms`.
    pub fn sign_checkpoint(
        &self,
        instance: &str,
        seq: i64,
        hash: &[u8; HASH_LEN],
        ts_ms: i64,
    ) -> Result<CheckpointRow, SignerError> {
        let message = checkpoint_message(instance, seq, hash, ts_ms);
        let signature: Signature =
            self.key.try_sign(&message).map_err(|_| SignerError::SigningFailed)?;
        Ok(CheckpointRow {
            instance: instance.to_owned(),
            seq,
            hash: hash.to_vec(),
            signature: signature.to_bytes().to_vec(),
            ts_ms,
        })
    }
}

impl zeroize::ZeroizeOnDrop for AuditSigner {}

impl fmt::Debug for AuditSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditSigner")
            .field("public_key", &data_encoding::HEXLOWER.encode(&self.public_key_sec1()))
            .finish_non_exhaustive()
    }
}

/// An instance's audit public key, parsed once for many verifications.
#[derive(Clone, PartialEq, Eq)]
pub struct AuditVerifyingKey {
    key: VerifyingKey,
}

impl AuditVerifyingKey {
    /// Parses a SEC1 point (compressed or uncompressed).
    pub fn from_sec1(bytes: &[u8]) -> Result<Self, CheckpointError> {
        VerifyingKey::from_sec1_bytes(bytes)
            .map(|key| Self { key })
            .map_err(|_| CheckpointError::InvalidPublicKey)
    }

    /// SEC1 uncompressed (65 bytes).
    pub fn to_sec1(&self) -> Vec<u8> {
        self.key.to_sec1_point(false).as_bytes().to_vec()
    }

    /// Verifies a checkpoint's signature (not whether its hash matches the
    /// chain: that is the chain verifier's job).
    pub fn verify(&self, checkpoint: &CheckpointRow) -> Result<(), CheckpointError> {
        let signature = Signature::from_slice(&checkpoint.signature)
            .map_err(|_| CheckpointError::BadSignature)?;
        let message = checkpoint_message(
            &checkpoint.instance,
            checkpoint.seq,
            &checkpoint.hash,
            checkpoint.ts_ms,
        );
        self.key.verify(&message, &signature).map_err(|_| CheckpointError::BadSignature)
    }
}

impl fmt::Debug for AuditVerifyingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AuditVerifyingKey({})", data_encoding::HEXLOWER.encode(&self.to_sec1()))
    }
}

/// Verifies a checkpoint's signature under a SEC1-encoded public key.
pub fn verify_checkpoint(
    public_key_sec1: &[u8],
    checkpoint: &CheckpointRow,
) -> Result<(), CheckpointError> {
    AuditVerifyingKey::from_sec1(public_key_sec1)?.verify(checkpoint)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_and_verify_round_trip() {
        let signer = AuditSigner::generate().unwrap();
        let cp = signer.sign_checkpoint("ks-1", 10, &[7; 32], 1_700_000_000_000).unwrap();
        assert_eq!(cp.signature.len(), SIGNATURE_LEN);
        let public = signer.public_key_sec1();
        assert_eq!((public.len(), public[0]), (65, 4));
        assert_eq!(verify_checkpoint(&public, &cp), Ok(()));

        let tampered = [
            CheckpointRow { instance: "ks-2".into(), ..cp.clone() },
            CheckpointRow { seq: 11, ..cp.clone() },
            CheckpointRow { hash: vec![8; 32], ..cp.clone() },
            CheckpointRow { ts_ms: cp.ts_ms + 1, ..cp.clone() },
            CheckpointRow { signature: cp.signature[..63].to_vec(), ..cp.clone() },
        ];
        for bad in &tampered {
            assert_eq!(verify_checkpoint(&public, bad), Err(CheckpointError::BadSignature));
        }
        let other = AuditSigner::generate().unwrap();
        assert_eq!(
            verify_checkpoint(&other.public_key_sec1(), &cp),
            Err(CheckpointError::BadSignature)
        );
        assert_eq!(verify_checkpoint(&[4; 65], &cp), Err(CheckpointError::InvalidPublicKey));
    }

    #[test]
    fn the_scalar_round_trips_through_key256() {
        let signer = AuditSigner::generate().unwrap();
        let restored = AuditSigner::from_key(&signer.to_key()).unwrap();
        assert_eq!(restored.public_key_sec1(), signer.public_key_sec1());
        // Deterministic signatures (RFC 6979): the same key signs identically.
        let a = signer.sign_checkpoint("i", 1, &[1; 32], 2).unwrap();
        let b = restored.sign_checkpoint("i", 1, &[1; 32], 2).unwrap();
        assert_eq!(a, b);
        assert!(matches!(
            AuditSigner::from_key(&Key256::from_array(&mut [0; 32])),
            Err(SignerError::InvalidKey)
        ));
        assert!(matches!(
            AuditSigner::from_key(&Key256::from_array(&mut [0xff; 32])),
            Err(SignerError::InvalidKey)
        ));
    }

    #[test]
    fn debug_shows_only_the_public_key() {
        let signer = AuditSigner::generate().unwrap();
        let debug = format!("{signer:?}");
        let scalar = data_encoding::HEXLOWER.encode(signer.to_key().expose_secret());
        assert!(!debug.contains(&scalar), "{debug}");
        assert!(debug.contains(&data_encoding::HEXLOWER.encode(&signer.public_key_sec1())));
        let wrap = AuditSigner::wrap_context("ks-1");
        assert_eq!(
            (wrap.purpose, wrap.owner.as_str(), wrap.version),
            (KeyPurpose::AuditSigning, "ks-1", 1)
        );
    }

    /// A format-stability vector. The key is RFC 6979 A.2.5's P-256 key;
    /// message and signature were checked independently with Python's
    /// `cryptography` (ECDSA-SHA256 verification of this exact message).
    #[test]
    fn known_answer() {
        let hex = |s: &str| data_encoding::HEXLOWER.decode(s.as_bytes()).unwrap();
        let scalar = hex("c9afa9d845ba75166b5c215767b1d6934e50c3db36e89b127b8a622b120f6721");
        let signer = AuditSigner::from_key(&Key256::from_slice(&scalar).unwrap()).unwrap();
        assert_eq!(
            signer.public_key_sec1(),
            hex("0460fed4ba255a9d31c961eb74c6356d68c049b8923b61fa6ce669622e60f29fb6\
                 7903fe1008b8bc99a41ae9e95628bc64f2f1b20c2d7e9f5177a3c294d4462299")
        );
        assert_eq!(
            checkpoint_message("ks-1", 10, &[7; 32], 1_700_000_000_000),
            hex("000000000000001b6b6579676174652f76312f61756469742d636865636b706f696e74\
                 00000000000000046b732d31\
                 000000000000000a\
                 00000000000000200707070707070707070707070707070707070707070707070707070707070707\
                 0000018bcfe56800")
        );
        let checkpoint = signer.sign_checkpoint("ks-1", 10, &[7; 32], 1_700_000_000_000).unwrap();
        assert_eq!(
            checkpoint.signature,
            hex("906849dcd443314f0e0f11456044858b3963be8737103be7a24842d458b9a2c8\
                 94e094ab8ce985113e1d1f4efc5e862f9ad37b16d18b6c8abba969a00095fa28")
        );
    }

    #[test]
    fn message_layout() {
        let message = checkpoint_message("i", 1, &[0xaa; 2], -1);
        let mut expected = 27u64.to_be_bytes().to_vec();
        expected.extend_from_slice(CHECKPOINT_LABEL);
        expected.extend_from_slice(&1u64.to_be_bytes());
        expected.push(b'i');
        expected.extend_from_slice(&1i64.to_be_bytes());
        expected.extend_from_slice(&2u64.to_be_bytes());
        expected.extend_from_slice(&[0xaa; 2]);
        expected.extend_from_slice(&(-1i64).to_be_bytes());
        assert_eq!(message, expected);
    }
}
