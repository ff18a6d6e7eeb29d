//! The wrapped-key blob: AES-256-GCM in the token, the wrap context as
//! associated data.
//!
//! ```text
//! u8 version = 1 ‖ iv(12) ‖ ciphertext(32) ‖ tag(16)        (61 bytes)
//! ```
//!
//! The IV is 12 random bytes from the host's OS RNG, one per wrap. (If a
//! module generates the IV itself and writes it back into the parameter,
//! as some FIPS-mode HSMs do, the IV read back after the call is the one
//! stored.) Tenant keys are wrapped rarely — once per tenant key version —
//! so the random-IV bound of 2^32 encryptions per key is far away.

use cryptoki::error::RvError;
use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::types::Ulong;
use kms_core::crypto::{NONCE_LEN, TAG_LEN, ct_eq, rng};
use kms_core::{KEY_LEN, Key256};
use zeroize::Zeroizing;

use super::error::Pkcs11Error;
use super::pool::Live;

/// Version byte of a blob.
pub(super) const VERSION: u8 = 1;
/// Length of a blob.
pub(super) const LEN: usize = 1 + NONCE_LEN + KEY_LEN + TAG_LEN;
/// GCM tag length in bits.
const TAG_BITS: usize = TAG_LEN * 8;

/// A blob known to unwrap (made when the provider connected), used to tell
/// an authentication failure from a module failure (see [`open`]) and to
/// prove that a key found later is the same key ([`prove_same_key`]).
pub(super) struct Probe {
    /// The blob.
    pub(super) blob: Vec<u8>,
    /// Its associated data.
    pub(super) aad: Vec<u8>,
}

/// Wraps `key` under the session's master key with `aad`.
pub(super) fn seal(live: &Live, key: &Key256, aad: &[u8]) -> Result<Vec<u8>, Pkcs11Error> {
    let mut iv: [u8; NONCE_LEN] = rng::array()?;
    let sealed = {
        let params = GcmParams::new(&mut iv, aad, Ulong::try_from(TAG_BITS)?)?;
        live.session().encrypt(&Mechanism::AesGcm(params), live.key(), key.expose_secret())?
    };
    if sealed.len() != KEY_LEN + TAG_LEN {
        return Err(Pkcs11Error::Binding {
            detail: format!(
                "C_Encrypt returned {} bytes, expected {}",
                sealed.len(),
                KEY_LEN + TAG_LEN
            ),
        });
    }
    let mut blob = Vec::with_capacity(LEN);
    blob.push(VERSION);
    blob.extend_from_slice(&iv);
    blob.extend_from_slice(&sealed);
    Ok(blob)
}

/// Unwraps `blob` with `aad`.
///
/// A malformed blob, or one that does not authenticate, is
/// [`Pkcs11Error::CannotUnwrap`]. Modules disagree on how they report a
/// failed GCM tag check: the standard `CKR_ENCRYPTED_DATA_INVALID`, or
/// (SoftHSM2 and others) `CKR_GENERAL_ERROR`, which also means "the module
/// is broken". For such an ambiguous `C_Decrypt` failure the `probe` blob
/// is decrypted on the same session: if that works, the module is fine and
/// the blob was bad; if not, the original error is returned (and the pool
/// retries on a fresh session).
pub(super) fn open(
    live: &Live,
    blob: &[u8],
    aad: &[u8],
    probe: Option<&Probe>,
) -> Result<Key256, Pkcs11Error> {
    let Some((&VERSION, rest)) = blob.split_first() else {
        return Err(Pkcs11Error::CannotUnwrap);
    };
    if blob.len() != LEN {
        return Err(Pkcs11Error::CannotUnwrap);
    }
    let (iv, sealed) = rest.split_at(NONCE_LEN);
    match decrypt(live, iv, sealed, aad) {
        Ok(plaintext) => Key256::from_slice(&plaintext).ok_or(Pkcs11Error::CannotUnwrap),
        Err(Pkcs11Error::Call { function, rv }) if is_ambiguous(function, rv) => {
            let module_works = probe.is_some_and(|probe| {
                probe
                    .blob
                    .get(1..1 + NONCE_LEN)
                    .zip(probe.blob.get(1 + NONCE_LEN..))
                    .is_some_and(|(iv, sealed)| decrypt(live, iv, sealed, &probe.aad).is_ok())
            });
            if module_works {
                Err(Pkcs11Error::CannotUnwrap)
            } else {
                Err(Pkcs11Error::Call { function, rv })
            }
        }
        Err(e) => Err(e),
    }
}

/// Proves that the key of `live` (found under the label in a new session)
/// is the master key the provider connected to, by unwrapping `probe`,
/// wrapped under that key at connection: GCM authenticates, so no other
/// key unwraps it. A key that does not is [`Pkcs11Error::KeyReplaced`].
/// A module that reports the failed tag check ambiguously (see [`open`])
/// is asked to wrap and unwrap a random key on the same session: if that
/// works the key is another one; if not, the module is failing and its
/// error is returned (the pool then retries on a fresh session).
pub(super) fn prove_same_key(
    live: &Live,
    probe: &Probe,
    token: &str,
    label: &str,
) -> Result<(), Pkcs11Error> {
    let replaced = || Pkcs11Error::KeyReplaced { token: token.to_owned(), key: label.to_owned() };
    match open(live, &probe.blob, &probe.aad, None) {
        Ok(_) => Ok(()),
        Err(Pkcs11Error::CannotUnwrap) => Err(replaced()),
        Err(Pkcs11Error::Call { function, rv }) if is_ambiguous(function, rv) => {
            let key = Key256::generate()?;
            let round_trip = seal(live, &key, &probe.aad)
                .and_then(|blob| open(live, &blob, &probe.aad, None))
                .is_ok_and(|back| ct_eq(back.expose_secret(), key.expose_secret()));
            if round_trip { Err(replaced()) } else { Err(Pkcs11Error::Call { function, rv }) }
        }
        Err(e) => Err(e),
    }
}

/// `C_DecryptInit` + `C_Decrypt` with AES-GCM; the plaintext is wiped on drop.
fn decrypt(
    live: &Live,
    iv: &[u8],
    sealed: &[u8],
    aad: &[u8],
) -> Result<Zeroizing<Vec<u8>>, Pkcs11Error> {
    let mut iv: [u8; NONCE_LEN] = iv.try_into().map_err(|_| Pkcs11Error::CannotUnwrap)?;
    let params = GcmParams::new(&mut iv, aad, Ulong::try_from(TAG_BITS)?)?;
    match live.session().decrypt(&Mechanism::AesGcm(params), live.key(), sealed) {
        Ok(plaintext) => Ok(Zeroizing::new(plaintext)),
        Err(cryptoki::error::Error::Pkcs11(
            RvError::EncryptedDataInvalid | RvError::EncryptedDataLenRange,
            _,
        )) => Err(Pkcs11Error::CannotUnwrap),
        Err(e) => Err(e.into()),
    }
}

/// Whether a failure of `function` with `rv` may be a failed tag check.
fn is_ambiguous(function: cryptoki::context::Function, rv: RvError) -> bool {
    matches!(function, cryptoki::context::Function::Decrypt)
        && matches!(
            rv,
            RvError::GeneralError
                | RvError::FunctionFailed
                | RvError::DataInvalid
                | RvError::DataLenRange
        )
}
