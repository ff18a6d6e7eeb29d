//! Wire helpers shared by the key service and its clients.

use data_encoding::BASE64URL_NOPAD;
use kms_core::Key256;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

/// A 256-bit secret carried as base64url in a JSON body. Serializing and
/// deserializing go straight between the key and the JSON text, wiping the
/// intermediate encodings.
pub struct SecretB64(pub Key256);

impl std::fmt::Debug for SecretB64 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretB64(..)")
    }
}

impl Serialize for SecretB64 {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let encoded = Zeroizing::new(BASE64URL_NOPAD.encode(self.0.expose_secret()));
        s.serialize_str(&encoded)
    }
}

impl<'de> Deserialize<'de> for SecretB64 {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = SecretB64;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a 32-byte key in base64url")
            }
            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<SecretB64, E> {
                let bytes = Zeroizing::new(
                    BASE64URL_NOPAD
                        .decode(text.as_bytes())
                        .map_err(|_| E::custom("bad key encoding"))?,
                );
                Key256::from_slice(&bytes)
                    .map(SecretB64)
                    .ok_or_else(|| E::custom("a key is 32 bytes"))
            }
        }
        d.deserialize_str(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_rejects() {
        let key = SecretB64(Key256::from_array(&mut [7; 32]));
        let text = serde_json::to_string(&key).unwrap();
        let back: SecretB64 = serde_json::from_str(&text).unwrap();
        assert_eq!(back.0.expose_secret(), &[7; 32]);
        assert!(serde_json::from_str::<SecretB64>("\"AAAA\"").is_err());
        assert!(serde_json::from_str::<SecretB64>("\"!!\"").is_err());
        assert_eq!(format!("{key:?}"), "SecretB64(..)");
    }
}
