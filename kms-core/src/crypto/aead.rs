//! AES-256-GCM-SIV with the sealed layout used throughout keygate:
//! `nonce(12) ‖ ciphertext ‖ tag(16)`.

use aes_gcm_siv::aead::{AeadInOut, KeyInit};
use aes_gcm_siv::{Aes256GcmSiv, Nonce, Tag};
use zeroize::Zeroizing;

use super::CannotDecrypt;
use super::rng::{self, RandomError};
use crate::secret::Key256;

/// Nonce length (96 bits, RFC 8452).
pub const NONCE_LEN: usize = 12;
/// Authentication tag length.
pub const TAG_LEN: usize = 16;
/// Bytes a sealed message adds to its plaintext.
pub const SEAL_OVERHEAD: usize = NONCE_LEN + TAG_LEN;

/// An AES-256-GCM-SIV cipher keyed once and used for many messages.
///
/// The key schedule is wiped when the value is dropped.
pub struct Aead(Aes256GcmSiv);

impl Aead {
    /// Keys the cipher.
    pub fn new(key: &Key256) -> Self {
        Self(Aes256GcmSiv::new(key.expose_secret().into()))
    }

    /// Seals `plaintext` under a fresh random nonce, appending
    /// `nonce ‖ ciphertext ‖ tag` to `out`.
    pub fn seal_random(
        &self,
        aad: &[u8],
        plaintext: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), RandomError> {
        let nonce = rng::array::<NONCE_LEN>()?;
        self.seal_with_nonce(&nonce, aad, plaintext, out);
        Ok(())
    }

    /// Seals `plaintext` under the given nonce, appending
    /// `nonce ‖ ciphertext ‖ tag` to `out`.
    ///
    /// Only the deterministic field mode (whose nonce is a MAC of the
    /// plaintext) and known-answer tests choose nonces themselves.
    pub fn seal_with_nonce(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        plaintext: &[u8],
        out: &mut Vec<u8>,
    ) {
        out.reserve(plaintext.len() + SEAL_OVERHEAD);
        out.extend_from_slice(nonce);
        let start = out.len();
        out.extend_from_slice(plaintext);
        let body = out.get_mut(start..).unwrap_or_default();
        // The only error AES-GCM-SIV reports is a message or AAD over 2^36
        // bytes, far beyond any input keygate's size limits let through; a
        // failure here would leave the plaintext in `out`, so wipe it.
        match self.0.encrypt_inout_detached(&Nonce::from(*nonce), aad, body.into()) {
            Ok(tag) => out.extend_from_slice(&tag),
            Err(_) => {
                zeroize::Zeroize::zeroize(out.get_mut(start..).unwrap_or_default());
                out.truncate(start - NONCE_LEN);
            }
        }
    }

    /// Opens a sealed `nonce ‖ ciphertext ‖ tag` message.
    pub fn open(&self, sealed: &[u8], aad: &[u8]) -> Result<Zeroizing<Vec<u8>>, CannotDecrypt> {
        let mut buffer = Zeroizing::new(sealed.to_vec());
        let len = self.open_in_place(&mut buffer, aad)?.len();
        buffer.copy_within(NONCE_LEN..NONCE_LEN + len, 0);
        buffer.truncate(len);
        Ok(buffer)
    }

    /// Opens a sealed `nonce ‖ ciphertext ‖ tag` message where it lies,
    /// returning the plaintext: the part of `sealed` that held the
    /// ciphertext. On failure `sealed` holds the ciphertext again, never
    /// unauthenticated plaintext.
    pub fn open_in_place<'a>(
        &self,
        sealed: &'a mut [u8],
        aad: &[u8],
    ) -> Result<&'a [u8], CannotDecrypt> {
        let (nonce, rest) = sealed.split_at_mut_checked(NONCE_LEN).ok_or(CannotDecrypt)?;
        let ct_len = rest.len().checked_sub(TAG_LEN).ok_or(CannotDecrypt)?;
        let (body, tag) = rest.split_at_mut(ct_len);
        let nonce: [u8; NONCE_LEN] = (&*nonce).try_into().map_err(|_| CannotDecrypt)?;
        let tag: [u8; TAG_LEN] = (&*tag).try_into().map_err(|_| CannotDecrypt)?;
        // aes-gcm-siv re-encrypts the buffer when the tag does not match.
        self.0
            .decrypt_inout_detached(&Nonce::from(nonce), aad, (&mut *body).into(), &Tag::from(tag))
            .map_err(|_| CannotDecrypt)?;
        Ok(body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8) -> Key256 {
        Key256::from_array(&mut [byte; 32])
    }

    #[test]
    fn round_trip_with_aad() -> Result<(), Box<dyn std::error::Error>> {
        let aead = Aead::new(&key(7));
        let mut sealed = Vec::new();
        aead.seal_random(b"context", b"hello", &mut sealed)?;
        assert_eq!(sealed.len(), 5 + SEAL_OVERHEAD);
        assert_eq!(aead.open(&sealed, b"context")?.as_slice(), b"hello");
        assert_eq!(aead.open(&sealed, b"other"), Err(CannotDecrypt));
        assert_eq!(Aead::new(&key(8)).open(&sealed, b"context"), Err(CannotDecrypt));
        let mut in_place = sealed.clone();
        assert_eq!(aead.open_in_place(&mut in_place, b"context")?, b"hello");
        let mut refused = sealed.clone();
        assert_eq!(aead.open_in_place(&mut refused, b"other"), Err(CannotDecrypt));
        assert_eq!(refused, sealed, "a refused message is left as it was, not decrypted");
        Ok(())
    }

    #[test]
    fn every_flipped_bit_is_rejected() -> Result<(), RandomError> {
        let aead = Aead::new(&key(1));
        let mut sealed = Vec::new();
        aead.seal_random(b"", b"sixteen byte msg", &mut sealed)?;
        for i in 0..sealed.len() * 8 {
            let mut tampered = sealed.clone();
            if let Some(b) = tampered.get_mut(i / 8) {
                *b ^= 1 << (i % 8);
            }
            assert_eq!(aead.open(&tampered, b""), Err(CannotDecrypt), "bit {i}");
        }
        Ok(())
    }

    #[test]
    fn short_input_is_rejected_not_panicking() {
        let aead = Aead::new(&key(1));
        for len in 0..SEAL_OVERHEAD {
            assert_eq!(aead.open(&vec![0u8; len], b""), Err(CannotDecrypt));
            assert_eq!(aead.open_in_place(&mut vec![0u8; len], b""), Err(CannotDecrypt));
        }
    }
}
