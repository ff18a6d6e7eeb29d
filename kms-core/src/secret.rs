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

    /// A key decoded by `decode` straight into its own allocation, or
    /// `None` (the partial bytes wiped) when `decode` says it failed.
    pub fn decode_with(decode: impl FnOnce(&mut [u8; KEY_LEN]) -> bool) -> Option<Self> {
        let mut key = Self(Box::new([0u8; KEY_LEN]));
        decode(&mut key.0).then_some(key)
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

/// A growable byte buffer for secrets (serialized plaintext, JSON bodies
/// carrying keys) that wipes every allocation it lets go of: a plain `Vec`
/// frees its old buffer unwiped each time it grows.
///
/// Only bytes that were written are wiped: the buffer grows by copying
/// into a new allocation (never `Vec`'s own reallocation) and empties by
/// wiping, so nothing is ever left beyond its length. A buffer reserved
/// far larger than what it ends up holding (a response sized from its
/// request) costs a wipe of what it holds, not of its whole capacity.
#[derive(Default)]
pub struct SecretBuf(Vec<u8>);

impl SecretBuf {
    /// An empty buffer with room for `capacity` bytes (size it right and it
    /// never reallocates).
    pub fn with_capacity(capacity: usize) -> Self {
        Self(Vec::with_capacity(capacity))
    }

    /// Empties the buffer, keeping (and wiping) its allocation.
    pub fn clear(&mut self) {
        wipe_written(&mut self.0);
    }

    /// Shortens the buffer to `len` bytes, wiping what it drops (a no-op if
    /// it is not longer).
    pub fn truncate(&mut self, len: usize) {
        if let Some(tail) = self.0.get_mut(len..) {
            tail.zeroize();
            self.0.truncate(len);
        }
    }

    /// Appends `n` zero bytes, to be written in place, and returns them
    /// (growing, like every append, by a wiped move).
    pub fn extend_zeroed(&mut self, n: usize) -> &mut [u8] {
        if n > self.0.capacity() - self.0.len() {
            self.grow(n);
        }
        let start = self.0.len();
        self.0.resize(start + n, 0);
        self.0.get_mut(start..).unwrap_or_default()
    }

    /// The bytes written so far, to change in place.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.0
    }

    /// The number of bytes written.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether nothing has been written.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The bytes written so far.
    pub fn as_slice(&self) -> &[u8] {
        &self.0
    }

    /// Appends `data`, moving to a larger allocation (and wiping the old
    /// one) when it does not fit.
    #[inline]
    pub fn extend_from_slice(&mut self, data: &[u8]) {
        if data.len() > self.0.capacity() - self.0.len() {
            self.grow(data.len());
        }
        self.0.extend_from_slice(data);
    }

    /// Moves to an allocation with room for `additional` more bytes.
    #[cold]
    fn grow(&mut self, additional: usize) {
        let needed = self.0.len().saturating_add(additional);
        let mut bigger = Vec::with_capacity(needed.max(2 * self.0.capacity()).max(64));
        bigger.extend_from_slice(&self.0);
        let mut old = std::mem::replace(&mut self.0, bigger);
        wipe_written(&mut old);
    }
}

/// Wipes a vector's bytes and empties it. Spare capacity is left alone:
/// every writer of a [`SecretBuf`] appends, so it was never written.
fn wipe_written(bytes: &mut Vec<u8>) {
    let written = bytes.len();
    bytes.clear();
    if let Some(spare) = bytes.spare_capacity_mut().get_mut(..written) {
        spare.zeroize();
    }
}

impl Drop for SecretBuf {
    fn drop(&mut self) {
        wipe_written(&mut self.0);
    }
}

impl zeroize::ZeroizeOnDrop for SecretBuf {}

impl AsRef<[u8]> for SecretBuf {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for SecretBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretBuf({} bytes)", self.0.len())
    }
}

impl std::io::Write for SecretBuf {
    // serde_json writes a value as many small pieces (quotes, separators,
    // string runs): inlined, the common case is a bounds check and a copy.
    #[inline]
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.extend_from_slice(data);
        Ok(data.len())
    }

    #[inline]
    fn write_all(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.extend_from_slice(data);
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
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

    #[test]
    fn secret_buf_grows_and_keeps_its_bytes() {
        use std::io::Write;
        let mut buf = SecretBuf::with_capacity(4);
        buf.write_all(b"abc").unwrap();
        buf.write_all(&[7u8; 300]).unwrap();
        assert_eq!(buf.as_slice().len(), 303);
        assert_eq!(&buf.as_slice()[..3], b"abc");
        assert_eq!(format!("{buf:?}"), "SecretBuf(303 bytes)");
        buf.clear();
        assert!(buf.as_slice().is_empty());
        buf.write_all(b"x").unwrap();
        assert_eq!(buf.as_ref(), b"x");
        // Pieces of every size across many growths, as serde_json writes.
        let mut expected = Vec::new();
        let mut buf = SecretBuf::default();
        for n in 0..200usize {
            let piece: Vec<u8> = (0..n % 37).map(|i| (n + i) as u8).collect();
            buf.write_all(&piece).unwrap();
            expected.extend_from_slice(&piece);
            assert_eq!(buf.as_slice(), expected.as_slice(), "after piece {n}");
        }
    }

    #[test]
    fn secret_buf_room_to_write_in_place_and_truncate() {
        let mut buf = SecretBuf::with_capacity(2);
        buf.extend_from_slice(b"ab");
        // Growing past the capacity keeps what was written.
        let room = buf.extend_zeroed(5);
        assert_eq!(room, &[0; 5]);
        room.copy_from_slice(b"cdefg");
        assert_eq!(buf.as_slice(), b"abcdefg");
        buf.as_mut_slice()[0] = b'A';
        buf.truncate(3);
        assert_eq!((buf.as_slice(), buf.len(), buf.is_empty()), (&b"Abc"[..], 3, false));
        buf.truncate(10);
        assert_eq!(buf.as_slice(), b"Abc", "truncating to more is a no-op");
    }
}
