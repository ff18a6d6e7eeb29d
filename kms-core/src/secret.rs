//! Key material as a type that cannot leak by accident.

use std::fmt;

use zeroize::Zeroize;

use crate::crypto::rng;
use crate::crypto::rng::RandomError;

/// Length in bytes of every symmetric key keygate handles (KEKs, DEKs, index roots).
pub const KEY_LEN: usize = 32;

/// A 256-bit secret key.
///
/// The bytes live in one heap allocation that is wiped when the key is
/// dropped, so moving a `Key256` around never leaves copies on the stack.
/// It deliberately has no `Clone`, `PartialEq`, `Hash` or `Serialize`, and its
/// `Debug` prints only the type name; the bytes are reachable only through
/// [`Key256::expose_secret`], which keeps every use greppable.
pub struct Key256(Box<[u8; KEY_LEN]>);

impl Key256 {
    /// A fresh key from the operating system's random number generator.
    pub fn generate() -> Result<Self, RandomError> {
        let mut key = Self(Box::new([0u8; KEY_LEN]));
        rng::fill(key.0.as_mut_slice())?;
        Ok(key)
    }

    /// Takes ownership of key bytes, wiping the caller's array.
    pub fn from_array(bytes: &mut [u8; KEY_LEN]) -> Self {
        let key = Self(Box::new(*bytes));
        bytes.zeroize();
        key
    }

    /// Copies key bytes from a slice; `None` unless it is exactly 32 bytes.
    /// The caller stays responsible for wiping its own copy.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        let array: &[u8; KEY_LEN] = bytes.try_into().ok()?;
        Some(Self(Box::new(*array)))
    }

    /// The raw key bytes. Every call site is a place where key material is used.
    pub fn expose_secret(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// A copy of this key as a new, independently owned secret.
    ///
    /// Named (rather than `Clone`) so that duplicating key material is a
    /// visible decision at the call site.
    pub fn duplicate(&self) -> Self {
        Self(Box::new(*self.0))
    }
}

impl Drop for Key256 {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl zeroize::ZeroizeOnDrop for Key256 {}

impl fmt::Debug for Key256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Key256(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_bytes() {
        let mut bytes = [0xabu8; KEY_LEN];
        let key = Key256::from_array(&mut bytes);
        assert_eq!(format!("{key:?}"), "Key256(..)");
        assert_eq!(bytes, [0u8; KEY_LEN], "caller's copy is wiped");
        assert_eq!(key.expose_secret(), &[0xabu8; KEY_LEN]);
    }

    #[test]
    fn generated_keys_differ() -> Result<(), RandomError> {
        let a = Key256::generate()?;
        let b = Key256::generate()?;
        assert_ne!(a.expose_secret(), b.expose_secret());
        Ok(())
    }

    #[test]
    fn from_slice_requires_exact_length() {
        assert!(Key256::from_slice(&[1u8; 31]).is_none());
        assert!(Key256::from_slice(&[1u8; 33]).is_none());
        assert!(Key256::from_slice(&[1u8; 32]).is_some());
    }
}
