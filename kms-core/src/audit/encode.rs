//! The canonical, injective byte encoding shared by chain hashes and
//! checkpoint signatures.
//!
//! Every value is self-delimiting, so a sequence of values in a fixed order
//! has exactly one encoding and no two different sequences share one:
//!
//! | value            | bytes                                            |
//! |------------------|--------------------------------------------------|
//! | byte string `b`  | `u64be(len(b)) ‖ b`                              |
//! | integer `i`      | `i64be(i)` (8 bytes, two's complement)           |
//! | absent option    | `0x00`                                           |
//! | present option   | `0x01 ‖ encoding(value)`                         |
//!
//! The 64-bit length prefix never saturates (unlike the `u16` prefix of the
//! KDF `info` strings, which only carry short identifiers): an event's
//! `detail` or record key id list may be long.

use sha2::Digest;

/// Something the encoding is written into: a buffer or a running hash.
pub(super) trait Sink {
    /// Appends raw bytes.
    fn put(&mut self, bytes: &[u8]);
}

impl Sink for Vec<u8> {
    fn put(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
}

impl Sink for sha2::Sha256 {
    fn put(&mut self, bytes: &[u8]) {
        self.update(bytes);
    }
}

/// Writes canonical values into a [`Sink`].
pub(super) struct Encoder<'s, S: Sink>(pub(super) &'s mut S);

impl<S: Sink> Encoder<'_, S> {
    /// A length-prefixed byte string.
    pub(super) fn bytes(&mut self, bytes: &[u8]) -> &mut Self {
        // usize is at most 64 bits on every supported target.
        let len = u64::try_from(bytes.len()).unwrap_or(u64::MAX);
        self.0.put(&len.to_be_bytes());
        self.0.put(bytes);
        self
    }

    /// A fixed-width signed integer.
    pub(super) fn int(&mut self, value: i64) -> &mut Self {
        self.0.put(&value.to_be_bytes());
        self
    }

    /// An optional byte string.
    pub(super) fn opt_bytes(&mut self, value: Option<&[u8]>) -> &mut Self {
        match value {
            None => self.0.put(&[0]),
            Some(bytes) => {
                self.0.put(&[1]);
                self.bytes(bytes);
            }
        }
        self
    }

    /// An optional integer.
    pub(super) fn opt_int(&mut self, value: Option<i64>) -> &mut Self {
        match value {
            None => self.0.put(&[0]),
            Some(value) => {
                self.0.put(&[1]);
                self.int(value);
            }
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(f: impl FnOnce(&mut Encoder<'_, Vec<u8>>)) -> Vec<u8> {
        let mut out = Vec::new();
        f(&mut Encoder(&mut out));
        out
    }

    #[test]
    fn layout_is_as_documented() {
        let out = encode(|e| {
            e.bytes(b"ab").int(-1).opt_bytes(None).opt_int(Some(2));
        });
        let mut expected = vec![0, 0, 0, 0, 0, 0, 0, 2, b'a', b'b'];
        expected.extend_from_slice(&[0xff; 8]);
        expected.push(0);
        expected.push(1);
        expected.extend_from_slice(&2i64.to_be_bytes());
        assert_eq!(out, expected);
    }

    #[test]
    fn options_are_distinct_from_empty_values() {
        let none = encode(|e| {
            e.opt_bytes(None).bytes(b"");
        });
        let empty = encode(|e| {
            e.opt_bytes(Some(b"")).bytes(b"");
        });
        assert_ne!(none, empty);
    }
}
