//! HMAC-SHA256.

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use super::CannotDecrypt;
use crate::secret::Key256;

/// Full-length HMAC-SHA256 output.
pub type MacTag = [u8; 32];

/// An HMAC-SHA256 key keyed once — its inner and outer pads already
/// hashed — and used for many messages: each tag costs the message's
/// blocks and one more, not the two extra blocks of keying. The keyed
/// state is wiped on drop (sha2's `zeroize`); `Debug` shows nothing.
pub struct MacKey(Hmac<Sha256>);

impl MacKey {
    /// Keys HMAC-SHA256 with `key`.
    pub fn new(key: &Key256) -> Self {
        Self(keyed(key))
    }

    /// `HMAC-SHA256(key, part₀ ‖ part₁ ‖ …)`.
    pub fn tag(&self, parts: &[&[u8]]) -> MacTag {
        let mut mac = self.0.clone();
        for part in parts {
            mac.update(part);
        }
        mac.finalize().into_bytes().into()
    }
}

impl std::fmt::Debug for MacKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MacKey(..)")
    }
}

/// `HMAC-SHA256(key, part₀ ‖ part₁ ‖ …)`.
pub fn hmac(key: &Key256, parts: &[&[u8]]) -> MacTag {
    let mut mac = keyed(key);
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

/// One HMAC-SHA256 over a message fed in pieces, so that a message made
/// of parts need not be copied into one buffer first.
pub struct MacStream(Hmac<Sha256>);

impl MacStream {
    /// Keys HMAC-SHA256 with `key`.
    pub fn new(key: &Key256) -> Self {
        Self(keyed(key))
    }

    /// Appends `part` to the message.
    pub fn update(&mut self, part: &[u8]) {
        self.0.update(part);
    }

    /// The tag.
    pub fn finish(self) -> MacTag {
        self.0.finalize().into_bytes().into()
    }

    /// Whether `tag` is the leftmost `tag.len()` bytes of the tag, in
    /// constant time.
    pub fn verify_truncated(self, tag: &[u8]) -> Result<(), CannotDecrypt> {
        self.0.verify_truncated_left(tag).map_err(|_| CannotDecrypt)
    }
}

impl std::fmt::Debug for MacStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MacStream(..)")
    }
}

fn keyed(key: &Key256) -> Hmac<Sha256> {
    // HMAC accepts keys of any length, so this cannot fail; the fallback
    // only exists to keep library code free of panics.
    <Hmac<Sha256> as KeyInit>::new_from_slice(key.expose_secret())
        .unwrap_or_else(|_| <Hmac<Sha256> as KeyInit>::new(&Default::default()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 4231 §4.2's message with a 32-byte key (ours are always 32 bytes);
    /// expected value computed independently with Python's `hmac` module.
    #[test]
    fn known_answer_32_byte_key() {
        let key = Key256::from_array(&mut [0x0b; 32]);
        let tag = hmac(&key, &[b"Hi ", b"There"]);
        assert_eq!(
            data_encoding::HEXLOWER.encode(&tag),
            "198a607eb44bfbc69903a0f1cf2bbdc5ba0aa3f3d9ae3c1c7a3b1696a0b68cf7"
        );
    }

    #[test]
    fn keyed_once_equals_keyed_each_time() {
        let key = Key256::from_array(&mut [0x0b; 32]);
        let keyed = MacKey::new(&key);
        for message in [&b""[..], b"Hi There", &[7u8; 200]] {
            assert_eq!(keyed.tag(&[message]), hmac(&key, &[message]));
        }
        assert_eq!(format!("{keyed:?}"), "MacKey(..)");
    }

    #[test]
    fn a_stream_fed_in_pieces_tags_and_verifies_the_whole_message() {
        let key = Key256::from_array(&mut [9; 32]);
        let tag = hmac(&key, &[b"message"]);
        let fed = |pieces: &[&[u8]]| {
            let mut mac = MacStream::new(&key);
            pieces.iter().for_each(|p| mac.update(p));
            mac
        };
        assert_eq!(fed(&[b"mes", b"", b"sage"]).finish(), tag);
        assert!(fed(&[b"message"]).verify_truncated(&tag[..16]).is_ok());
        assert!(fed(&[b"messa", b"gf"]).verify_truncated(&tag[..16]).is_err());
        let mut bad = tag;
        bad[15] ^= 1;
        assert!(fed(&[b"message"]).verify_truncated(&bad[..16]).is_err());
        assert_eq!(format!("{:?}", fed(&[])), "MacStream(..)");
    }
}
