//! Validated identifiers: tenants, names (schemas, namespaces), record key ids.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::crypto::rng::{self, RandomError};
use crate::fixed_text;

/// Longest tenant id or name, in bytes.
pub const MAX_NAME_LEN: usize = 63;

/// An identifier was not of the required form.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind} {value:?}: must match [a-z0-9][a-z0-9_-]{{0,62}}")]
#[non_exhaustive]
pub struct InvalidName {
    /// What was being named ("tenant id", "schema name", …).
    pub kind: &'static str,
    /// The rejected value, cut to a printable length.
    pub value: String,
}

fn check_name(kind: &'static str, value: &str) -> Result<(), InvalidName> {
    let bytes = value.as_bytes();
    let valid = matches!(bytes.first(), Some(b'a'..=b'z' | b'0'..=b'9'))
        && bytes.len() <= MAX_NAME_LEN
        && bytes.iter().all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-'));
    if valid { Ok(()) } else { Err(InvalidName { kind, value: value.chars().take(80).collect() }) }
}

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Validates and wraps `value`.
            pub fn new(value: impl Into<String>) -> Result<Self, InvalidName> {
                let value = value.into();
                check_name($kind, &value)?;
                Ok(Self(value))
            }

            /// The identifier as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = InvalidName;
            fn try_from(value: String) -> Result<Self, InvalidName> {
                Self::new(value)
            }
        }

        impl From<$name> for String {
            fn from(value: $name) -> String {
                value.0
            }
        }

        impl std::str::FromStr for $name {
            type Err = InvalidName;
            fn from_str(value: &str) -> Result<Self, InvalidName> {
                Self::new(value)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&self.0, f)
            }
        }
    };
}

name_type!(
    /// A tenant: the unit of key isolation. Matches `[a-z0-9][a-z0-9_-]{0,62}`.
    TenantId,
    "tenant id"
);

name_type!(
    /// A schema or pseudonym namespace name. Matches `[a-z0-9][a-z0-9_-]{0,62}`.
    Name,
    "name"
);

/// The 16 random bytes that name one record's DEK.
///
/// Chosen by the key service, bound into the DEK wrapping AAD, and carried
/// in the record header. Not secret, but compared in constant time because
/// callers may probe with guessed ids.
#[derive(Clone, Copy)]
pub struct RecordKeyId([u8; RecordKeyId::LEN]);

impl RecordKeyId {
    /// Length in bytes.
    pub const LEN: usize = 16;

    /// A fresh random id.
    pub fn generate() -> Result<Self, RandomError> {
        Ok(Self(rng::array()?))
    }

    /// Wraps raw bytes.
    pub const fn from_bytes(bytes: [u8; Self::LEN]) -> Self {
        Self(bytes)
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8; Self::LEN] {
        &self.0
    }

    /// Lowercase hex, as used in APIs and audit events.
    pub fn to_hex(&self) -> String {
        data_encoding::HEXLOWER.encode(&self.0)
    }

    /// [`Self::to_hex`] into a stack buffer.
    pub fn hex_in<'b>(&self, buf: &'b mut [u8; 2 * Self::LEN]) -> &'b str {
        fixed_text::encode_into(&data_encoding::HEXLOWER, &self.0, buf)
    }

    /// Parses 32 lowercase hex digits (one canonical form).
    pub fn from_hex(text: &str) -> Option<Self> {
        fixed_text::decode_exact(&data_encoding::HEXLOWER, text).map(Self)
    }
}

impl PartialEq for RecordKeyId {
    fn eq(&self, other: &Self) -> bool {
        crate::crypto::ct_eq(&self.0, &other.0)
    }
}

impl Eq for RecordKeyId {}

impl std::hash::Hash for RecordKeyId {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.hash(state);
    }
}

impl fmt::Debug for RecordKeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RecordKeyId({})", self.hex_in(&mut [0; 2 * Self::LEN]))
    }
}

impl Serialize for RecordKeyId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.hex_in(&mut [0; 2 * Self::LEN]))
    }
}

impl<'de> Deserialize<'de> for RecordKeyId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        fixed_text::deserialize_with(d, "record_key_id must be 32 hex digits", Self::from_hex)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_ids() {
        for ok in ["a", "0", "onc-centre_2", &"a".repeat(63)] {
            assert!(TenantId::new(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-a", "_a", "A", "a b", "a/b", "é", &"a".repeat(64)] {
            assert!(TenantId::new(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn record_key_id_hex_round_trip() -> Result<(), RandomError> {
        let id = RecordKeyId::generate()?;
        assert_eq!(RecordKeyId::from_hex(&id.to_hex()), Some(id));
        assert_eq!(RecordKeyId::from_hex("00"), None);
        assert_eq!(RecordKeyId::from_hex(&"zz".repeat(16)), None);
        Ok(())
    }

    #[test]
    fn record_key_id_json() -> Result<(), Box<dyn std::error::Error>> {
        let id = RecordKeyId::from_bytes(std::array::from_fn(|i| (i * 16 + i) as u8));
        let text = serde_json::to_string(&id)?;
        assert_eq!(text, "\"00112233445566778899aabbccddeeff\"");
        assert_eq!(serde_json::from_str::<RecordKeyId>(&text)?, id);
        // An escaped digit goes through serde_json's scratch buffer.
        let escaped = "\"\\u0030\\u0030112233445566778899aabbccddeeff\"";
        assert_eq!(serde_json::from_str::<RecordKeyId>(escaped)?, id);
        for bad in ["\"00112233445566778899AABBCCDDEEFF\"", "\"0011\"", "7", "null", "[]"] {
            let e = serde_json::from_str::<RecordKeyId>(bad).expect_err(bad).to_string();
            assert!(e.contains("record_key_id must be 32 hex digits"), "{bad}: {e}");
        }
        assert_eq!(format!("{id:?}"), "RecordKeyId(00112233445566778899aabbccddeeff)");
        Ok(())
    }
}
