//! Data keys (DEKs) and their wrapping under a tenant KEK (DESIGN §3.1).
//!
//! `wrapped = nonce(12) ‖ AES-256-GCM-SIV(KEK_v, nonce, DEK, aad)` with
//! `aad = "keygate/v1/dek" ‖ u8 len ‖ tenant ‖ u32be(v) ‖ record_key_id(16)`.
//! The AAD does not depend on the record's contents, so DEKs can be issued
//! ahead of time in batches; it does bind the tenant, the KEK version and the
//! record key id, so a wrapped DEK presented under any other of those fails.

use std::fmt;

use data_encoding::BASE64URL_NOPAD;
use serde::{Deserialize, Serialize};

use crate::crypto::rng::RandomError;
use crate::crypto::{Aead, CannotDecrypt, SEAL_OVERHEAD};
use crate::fixed_text;
use crate::ids::{RecordKeyId, TenantId};
use crate::secret::{KEY_LEN, Key256};

/// Length of a wrapped DEK: nonce ‖ 32-byte key ‖ tag.
pub const WRAPPED_DEK_LEN: usize = KEY_LEN + SEAL_OVERHEAD;

/// Length of a wrapped DEK in base64url.
const WRAPPED_DEK_TEXT_LEN: usize = fixed_text::base64_nopad_len(WRAPPED_DEK_LEN);

const DEK_AAD_LABEL: &[u8] = b"keygate/v1/dek";

/// A KEK version number (1, 2, …).
pub type KekVersion = u32;

/// A DEK wrapped under a tenant KEK version. Not secret.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct WrappedDek([u8; WRAPPED_DEK_LEN]);

impl WrappedDek {
    /// Wraps raw bytes read from a header or a request.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        Some(Self(bytes.try_into().ok()?))
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8; WRAPPED_DEK_LEN] {
        &self.0
    }
}

impl fmt::Debug for WrappedDek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("WrappedDek(..)")
    }
}

impl Serialize for WrappedDek {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut buf = [0; WRAPPED_DEK_TEXT_LEN];
        s.serialize_str(fixed_text::encode_into(&BASE64URL_NOPAD, &self.0, &mut buf))
    }
}

impl<'de> Deserialize<'de> for WrappedDek {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        fixed_text::deserialize_with(d, "wrapped DEK must be 60 bytes of base64url", |text| {
            fixed_text::decode_exact(&BASE64URL_NOPAD, text).map(Self)
        })
    }
}

/// A freshly issued DEK: the plaintext key for encrypting one record, and
/// everything the record header needs to get it back later.
pub struct IssuedDek {
    /// The record's DEK id.
    pub record_key_id: RecordKeyId,
    /// The KEK version the DEK is wrapped under.
    pub kek_version: KekVersion,
    /// The DEK wrapped under that KEK version.
    pub wrapped: WrappedDek,
    dek: Key256,
}

impl IssuedDek {
    /// Assembles an issued DEK.
    pub fn new(
        record_key_id: RecordKeyId,
        kek_version: KekVersion,
        wrapped: WrappedDek,
        dek: Key256,
    ) -> Self {
        Self { record_key_id, kek_version, wrapped, dek }
    }

    /// The plaintext DEK.
    pub fn dek(&self) -> &Key256 {
        &self.dek
    }
}

impl fmt::Debug for IssuedDek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedDek")
            .field("record_key_id", &self.record_key_id)
            .field("kek_version", &self.kek_version)
            .finish_non_exhaustive()
    }
}

/// Where a wrapped DEK belongs: it only unwraps under exactly this binding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DekBinding<'a> {
    /// The tenant whose KEK wraps the DEK.
    pub tenant: &'a TenantId,
    /// The KEK version.
    pub kek_version: KekVersion,
    /// The record the DEK belongs to.
    pub record_key_id: &'a RecordKeyId,
}

impl DekBinding<'_> {
    fn aad(&self) -> Vec<u8> {
        let tenant = self.tenant.as_str().as_bytes();
        let mut aad = Vec::with_capacity(DEK_AAD_LABEL.len() + 1 + tenant.len() + 4 + 16);
        aad.extend_from_slice(DEK_AAD_LABEL);
        // Tenant ids are at most 63 bytes (validated by `TenantId`).
        aad.push(u8::try_from(tenant.len()).unwrap_or(u8::MAX));
        aad.extend_from_slice(tenant);
        aad.extend_from_slice(&self.kek_version.to_be_bytes());
        aad.extend_from_slice(self.record_key_id.as_bytes());
        aad
    }
}

/// Wraps `dek` under `kek` for `binding`.
pub fn wrap_dek(
    kek: &Aead,
    binding: &DekBinding<'_>,
    dek: &Key256,
) -> Result<WrappedDek, RandomError> {
    let mut out = Vec::with_capacity(WRAPPED_DEK_LEN);
    kek.seal_random(&binding.aad(), dek.expose_secret(), &mut out)?;
    // seal_random always appends exactly nonce ‖ 32 ‖ tag.
    WrappedDek::from_slice(&out).ok_or(RandomError)
}

/// Unwraps a DEK; fails unless `binding` is exactly the one it was wrapped for.
pub fn unwrap_dek(
    kek: &Aead,
    binding: &DekBinding<'_>,
    wrapped: &WrappedDek,
) -> Result<Key256, CannotDecrypt> {
    let plain = kek.open(wrapped.as_bytes(), &binding.aad())?;
    Key256::from_slice(&plain).ok_or(CannotDecrypt)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant(name: &str) -> TenantId {
        TenantId::new(name).unwrap_or_else(|_| unreachable!())
    }

    #[test]
    fn aad_layout_matches_design() {
        let t = tenant("onc");
        let id = RecordKeyId::from_bytes([7; 16]);
        let aad = DekBinding { tenant: &t, kek_version: 2, record_key_id: &id }.aad();
        let mut expected = b"keygate/v1/dek".to_vec();
        expected.push(3);
        expected.extend_from_slice(b"onc");
        expected.extend_from_slice(&[0, 0, 0, 2]);
        expected.extend_from_slice(&[7; 16]);
        assert_eq!(aad, expected);
    }

    #[test]
    fn unwrap_only_under_the_same_binding() -> Result<(), Box<dyn std::error::Error>> {
        let kek = Aead::new(&Key256::generate()?);
        let (a, b) = (tenant("a"), tenant("b"));
        let (id, other_id) = (RecordKeyId::generate()?, RecordKeyId::generate()?);
        let dek = Key256::generate()?;
        let binding = DekBinding { tenant: &a, kek_version: 1, record_key_id: &id };
        let wrapped = wrap_dek(&kek, &binding, &dek)?;
        assert_eq!(unwrap_dek(&kek, &binding, &wrapped)?.expose_secret(), dek.expose_secret());

        let wrong = [
            DekBinding { tenant: &b, ..binding.clone() },
            DekBinding { kek_version: 2, ..binding.clone() },
            DekBinding { record_key_id: &other_id, ..binding.clone() },
        ];
        for w in &wrong {
            assert!(unwrap_dek(&kek, w, &wrapped).is_err(), "{w:?}");
        }
        let other_kek = Aead::new(&Key256::generate()?);
        assert!(unwrap_dek(&other_kek, &binding, &wrapped).is_err());
        Ok(())
    }

    #[test]
    fn wrapped_dek_json() -> Result<(), Box<dyn std::error::Error>> {
        let wrapped = WrappedDek(std::array::from_fn(|i| (i * 5 + 1) as u8));
        let text = serde_json::to_string(&wrapped)?;
        assert_eq!(text, format!("\"{}\"", BASE64URL_NOPAD.encode(wrapped.as_bytes())));
        assert_eq!(serde_json::from_str::<WrappedDek>(&text)?, wrapped);
        let short = format!("{}\"", &text[..text.len() - 5]);
        let padded = format!("{}=\"", &text[..text.len() - 1]);
        let standard = format!("\"+{}", &text[2..]);
        for bad in [short.as_str(), &padded, &standard, "\"\"", "60", "null"] {
            let e = serde_json::from_str::<WrappedDek>(bad).expect_err(bad).to_string();
            assert!(e.contains("wrapped DEK must be 60 bytes of base64url"), "{bad}: {e}");
        }
        Ok(())
    }
}
