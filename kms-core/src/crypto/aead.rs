//! AES-256-GCM-SIV with the sealed layout used throughout keygate:
//! `nonce(12) ‖ ciphertext ‖ tag(16)`.
//!
//! The cipher is aws-lc-rs's (AWS-LC's assembly for AES-NI and CLMUL):
//! on this project's machines it seals and opens a field of 16–64 bytes in
//! 130–180 ns against 360–420 ns for RustCrypto's `aes-gcm-siv`, and a
//! record has five or six such fields. aws-lc-rs is already the TLS
//! provider, so no new code is compiled. Its keys are wiped when freed
//! (`OPENSSL_free` cleanses), and a refused message's buffer is zeroed by
//! AWS-LC, never left holding unauthenticated plaintext.

use aws_lc_rs::aead::{AES_256_GCM_SIV, Aad, LessSafeKey, Nonce, UnboundKey};
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
pub struct Aead(LessSafeKey);

impl Aead {
    /// Keys the cipher.
    pub fn new(key: &Key256) -> Self {
        match UnboundKey::new(&AES_256_GCM_SIV, key.expose_secret()) {
            Ok(key) => Self(LessSafeKey::new(key)),
            // A 32-byte key is exactly what the algorithm takes, so only a
            // failed allocation inside AWS-LC gets here; Rust's own
            // allocations abort the process when they fail, and so does this.
            Err(_) => std::process::abort(),
        }
    }

    /// Seals `plaintext` under a fresh random nonce, appending
    /// `nonce ‖ ciphertext ‖ tag` to `out`.
    pub fn seal_random(
        &self,
        aad: &[u8],
        plaintext: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), RandomError> {
        self.seal_random_padded(aad, plaintext, &[], out)
    }

    /// Seals `plaintext ‖ padding` under a fresh random nonce, appending
    /// `nonce ‖ ciphertext ‖ tag` to `out`: the two are written once, into
    /// `out`, so a padded field is not first copied into a buffer of its
    /// own.
    pub fn seal_random_padded(
        &self,
        aad: &[u8],
        plaintext: &[u8],
        padding: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), RandomError> {
        let nonce = rng::array::<NONCE_LEN>()?;
        self.seal_parts(&nonce, aad, plaintext, padding, out);
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
        self.seal_parts(nonce, aad, plaintext, &[], out);
    }

    fn seal_parts(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        plaintext: &[u8],
        padding: &[u8],
        out: &mut Vec<u8>,
    ) {
        out.reserve(plaintext.len() + padding.len() + SEAL_OVERHEAD);
        out.extend_from_slice(nonce);
        let start = out.len();
        out.extend_from_slice(plaintext);
        out.extend_from_slice(padding);
        let body = out.get_mut(start..).unwrap_or_default();
        // The only error AES-GCM-SIV reports is a message or AAD over 2^36
        // bytes, far beyond any input keygate's size limits let through;
        // AWS-LC zeroes the buffer then, and nothing of it is kept.
        let sealed = self.0.seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(*nonce),
            Aad::from(aad),
            body,
        );
        match sealed {
            Ok(tag) => out.extend_from_slice(tag.as_ref()),
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
    /// ciphertext. On failure that part is zeroed, never left holding
    /// unauthenticated plaintext.
    pub fn open_in_place<'a>(
        &self,
        sealed: &'a mut [u8],
        aad: &[u8],
    ) -> Result<&'a [u8], CannotDecrypt> {
        let (nonce, rest) = sealed.split_at_mut_checked(NONCE_LEN).ok_or(CannotDecrypt)?;
        if rest.len() < TAG_LEN {
            return Err(CannotDecrypt);
        }
        let nonce: [u8; NONCE_LEN] = (&*nonce).try_into().map_err(|_| CannotDecrypt)?;
        let plaintext = self
            .0
            .open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(aad), rest)
            .map_err(|_| CannotDecrypt)?;
        Ok(plaintext)
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
        assert_eq!(refused[..NONCE_LEN], sealed[..NONCE_LEN]);
        assert!(
            refused[NONCE_LEN..NONCE_LEN + 5].iter().all(|&b| b == 0),
            "a refused message's body is zeroed, not left decrypted: {refused:?}"
        );
        Ok(())
    }

    #[test]
    fn padded_seal_opens_to_the_value_then_its_padding() -> Result<(), Box<dyn std::error::Error>> {
        let aead = Aead::new(&key(9));
        let mut sealed = vec![0xAA];
        aead.seal_random_padded(b"aad", b"true", b"    ", &mut sealed)?;
        assert_eq!(sealed.len(), 1 + 8 + SEAL_OVERHEAD, "appended after what out held");
        assert_eq!(aead.open(&sealed[1..], b"aad")?.as_slice(), b"true    ");
        let mut unpadded = Vec::new();
        aead.seal_random(b"aad", b"true", &mut unpadded)?;
        assert_eq!(aead.open(&unpadded, b"aad")?.as_slice(), b"true");
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
