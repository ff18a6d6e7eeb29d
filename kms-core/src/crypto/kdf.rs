//! HKDF-SHA256 key derivation with unambiguous, versioned `info` strings.

use std::sync::OnceLock;

use hkdf::Hkdf;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::secret::{KEY_LEN, Key256};

/// Builds an HKDF `info` (or AAD) string: a fixed label followed by
/// length-prefixed components, so that no two different component lists
/// can produce the same bytes (`"ab" ‖ "c"` ≠ `"a" ‖ "bc"`).
#[derive(Debug, Clone, Default)]
pub struct Info(Vec<u8>);

impl Info {
    /// Starts with a fixed label such as `keygate/v1/bidx`.
    pub fn label(label: &str) -> Self {
        let mut bytes = Vec::with_capacity(label.len() + 64);
        bytes.extend_from_slice(label.as_bytes());
        Self(bytes)
    }

    /// Appends `u16be(len) ‖ bytes`. Components longer than 65,535 bytes are
    /// truncated in the length prefix only in theory: every caller passes
    /// validated identifiers and pointers bounded far below that.
    pub fn part(mut self, bytes: &[u8]) -> Self {
        let len = u16::try_from(bytes.len()).unwrap_or(u16::MAX);
        self.0.extend_from_slice(&len.to_be_bytes());
        self.0.extend_from_slice(bytes);
        self
    }

    /// The encoded bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

/// `HKDF-SHA256(ikm = key, salt = none, info)` → a 256-bit key.
///
/// Every record's header key is derived this way, so the extract step
/// (HMAC keyed with the absent salt, i.e. 32 zero bytes) starts from that
/// key's pads, hashed once per process: two of HKDF's eight SHA-256 blocks.
pub fn derive(key: &Key256, info: &[u8]) -> Key256 {
    let mut extract = zero_salt().clone();
    extract.update(key.expose_secret());
    let prk = Zeroizing::new(<[u8; 32]>::from(extract.finalize().into_bytes()));
    let hk = match Hkdf::<Sha256>::from_prk(&*prk) {
        Ok(hk) => hk,
        // A 32-byte PRK is always accepted; the plain form gives the same key.
        Err(_) => Hkdf::<Sha256>::new(None, key.expose_secret()),
    };
    let mut okm = [0u8; KEY_LEN];
    // 32 bytes is far below HKDF-SHA256's 255 × 32 byte limit, so expand
    // cannot fail; the zero key it would leave is never reached.
    let _ = hk.expand(info, &mut okm);
    Key256::from_array(&mut okm)
}

/// HMAC-SHA256 keyed with HKDF's default salt (32 zero bytes).
fn zero_salt() -> &'static Hmac<Sha256> {
    static ZERO_SALT: OnceLock<Hmac<Sha256>> = OnceLock::new();
    ZERO_SALT.get_or_init(|| <Hmac<Sha256> as KeyInit>::new(&Default::default()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 5869 Appendix A.3 (SHA-256, zero-length salt and info), which
    /// is the shape `derive` uses; first 32 bytes of the 42-byte OKM.
    #[test]
    fn rfc5869_a3_known_answer() {
        let hk = Hkdf::<Sha256>::new(None, &[0x0b; 22]);
        let mut okm = [0u8; 42];
        assert!(hk.expand(&[], &mut okm).is_ok());
        assert_eq!(
            data_encoding::HEXLOWER.encode(&okm),
            "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d\
             9d201395faa4b61a96c8"
        );
    }

    /// The precomputed extract gives exactly the hkdf crate's HKDF.
    #[test]
    fn derive_is_hkdf_with_no_salt() {
        for (byte, info) in [(0u8, &b""[..]), (7, b"keygate/v1/header"), (0xff, &[9u8; 300])] {
            let key = Key256::from_array(&mut [byte; 32]);
            let mut expected = [0u8; 32];
            Hkdf::<Sha256>::new(None, key.expose_secret()).expand(info, &mut expected).unwrap();
            assert_eq!(derive(&key, info).expose_secret(), &expected);
        }
    }

    #[test]
    fn info_parts_are_unambiguous() {
        let a = Info::label("x").part(b"ab").part(b"c");
        let b = Info::label("x").part(b"a").part(b"bc");
        assert_ne!(a.as_bytes(), b.as_bytes());
    }

    #[test]
    fn derivation_depends_on_info_and_key() {
        let k1 = Key256::from_array(&mut [1; 32]);
        let k2 = Key256::from_array(&mut [2; 32]);
        let a = derive(&k1, b"keygate/v1/a");
        assert_ne!(a.expose_secret(), derive(&k1, b"keygate/v1/b").expose_secret());
        assert_ne!(a.expose_secret(), derive(&k2, b"keygate/v1/a").expose_secret());
        assert_eq!(a.expose_secret(), derive(&k1, b"keygate/v1/a").expose_secret());
    }
}
