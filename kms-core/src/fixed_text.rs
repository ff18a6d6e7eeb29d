//! Fixed-length binary values as JSON strings, without allocating.
//!
//! Record key ids, wrapped DEKs and keys cross every unwrap exchange a
//! hundred at a time; going through a `String` and a `Vec` for each cost
//! three allocations per value on both sides of the exchange. These decode
//! straight into an array and encode into a stack buffer.

use data_encoding::Encoding;

/// Decodes `text` into exactly `N` bytes, or `None` when it is not the
/// canonical encoding of `N` bytes under `encoding`.
pub fn decode_exact<const N: usize>(encoding: &Encoding, text: &str) -> Option<[u8; N]> {
    let mut out = [0u8; N];
    decode_exact_into(encoding, text, &mut out).then_some(out)
}

/// [`decode_exact`] into a caller's buffer (a secret's, say, that wipes
/// itself). On `false` the buffer's contents are unspecified.
pub fn decode_exact_into(encoding: &Encoding, text: &str, out: &mut [u8]) -> bool {
    encoding.decode_len(text.len()).is_ok_and(|len| len == out.len())
        && encoding.decode_mut(text.as_bytes(), out) == Ok(out.len())
}

/// Length of `n` bytes in base64 without padding, for sizing buffers at
/// compile time.
pub const fn base64_nopad_len(n: usize) -> usize {
    (n * 8).div_ceil(6)
}

/// Encodes `bytes` into `buf` and returns the text.
///
/// # Panics
/// If `buf` is not exactly `encoding.encode_len(bytes.len())` long (a
/// buffer sized by [`base64_nopad_len`] or `2 * n` for hex always is).
pub fn encode_into<'b>(encoding: &Encoding, bytes: &[u8], buf: &'b mut [u8]) -> &'b str {
    encoding.encode_mut(bytes, buf);
    // Every encoding's alphabet is ASCII.
    std::str::from_utf8(buf).unwrap_or_default()
}

/// Deserializes a string through `parse` without taking ownership of it:
/// serde_json hands over a borrowed slice of its input, or of its scratch
/// buffer when the string holds escapes.
pub fn deserialize_with<'de, D, T>(
    d: D,
    expecting: &'static str,
    parse: impl FnOnce(&str) -> Option<T>,
) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
{
    struct Visitor<F>(&'static str, F);
    impl<T, F: FnOnce(&str) -> Option<T>> serde::de::Visitor<'_> for Visitor<F> {
        type Value = T;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
        fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<T, E> {
            (self.1)(text).ok_or_else(|| E::custom(self.0))
        }
    }
    d.deserialize_str(Visitor(expecting, parse))
}

#[cfg(test)]
mod tests {
    use data_encoding::{BASE64URL_NOPAD, HEXLOWER};

    use super::*;

    #[test]
    fn decodes_only_the_exact_length_in_canonical_form() {
        let bytes: [u8; 16] = std::array::from_fn(|i| (i * 17) as u8);
        let hex = HEXLOWER.encode(&bytes);
        assert_eq!(decode_exact::<16>(&HEXLOWER, &hex), Some(bytes));
        // Too short, too long, odd, uppercase, non-hex.
        assert_eq!(decode_exact::<16>(&HEXLOWER, &hex[..30]), None);
        assert_eq!(decode_exact::<16>(&HEXLOWER, &format!("{hex}00")), None);
        assert_eq!(decode_exact::<16>(&HEXLOWER, &hex[..31]), None);
        assert_eq!(decode_exact::<16>(&HEXLOWER, &hex.to_uppercase()), None);
        assert_eq!(decode_exact::<16>(&HEXLOWER, &format!("{}zz", &hex[..30])), None);
        assert_eq!(decode_exact::<16>(&HEXLOWER, ""), None);

        let wrapped: [u8; 60] = std::array::from_fn(|i| (i * 7 + 3) as u8);
        let b64 = BASE64URL_NOPAD.encode(&wrapped);
        assert_eq!(decode_exact::<60>(&BASE64URL_NOPAD, &b64), Some(wrapped));
        assert_eq!(decode_exact::<60>(&BASE64URL_NOPAD, &format!("{b64}=")), None);
        assert_eq!(decode_exact::<60>(&BASE64URL_NOPAD, &format!("+{}", &b64[1..])), None);
        assert_eq!(decode_exact::<59>(&BASE64URL_NOPAD, &b64), None);
        // A 32-byte key's last character carries 4 unused bits: non-zero
        // ones are not the canonical encoding and are refused.
        let key = BASE64URL_NOPAD.encode(&[0xffu8; 32]);
        assert!(key.ends_with('8'));
        assert_eq!(decode_exact::<32>(&BASE64URL_NOPAD, &key), Some([0xff; 32]));
        let loose = format!("{}9", &key[..key.len() - 1]);
        assert_eq!(decode_exact::<32>(&BASE64URL_NOPAD, &loose), None);
    }

    #[test]
    fn sizes_match_the_encoder() {
        for n in [0, 1, 2, 3, 16, 32, 60, 61] {
            assert_eq!(base64_nopad_len(n), BASE64URL_NOPAD.encode_len(n), "{n}");
        }
    }

    #[test]
    fn encodes_as_the_allocating_encoder_does() {
        let bytes: [u8; 60] = std::array::from_fn(|i| (255 - i) as u8);
        let mut buf = [0u8; 80];
        assert_eq!(encode_into(&BASE64URL_NOPAD, &bytes, &mut buf), BASE64URL_NOPAD.encode(&bytes));
        let mut hex = [0u8; 120];
        assert_eq!(encode_into(&HEXLOWER, &bytes, &mut hex), HEXLOWER.encode(&bytes));
    }
}
