//! Shared helpers for kms-core's integration tests.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use kms_core::crypto::Aead;
use kms_core::record::{Disclosure, EncryptedRecord, SchemaKeys, encrypt_record};
use kms_core::schema::{Schema, SchemaSet};
use kms_core::{DekBinding, IssuedDek, Key256, RecordKeyId, TenantId, unwrap_dek, wrap_dek};
use serde_json::Value;

/// A schema exercising every mode, wildcards, masks and nesting.
pub const SCHEMA: &str = r#"
[[schema]]
name = "patient"
version = 1
fields = [
  { path = "/ssn",        mode = "randomized",    class = "phi.identifier", mask = "last4" },
  { path = "/mrn",        mode = "deterministic", class = "phi.identifier" },
  { path = "/email",      mode = "blind_index", bits = 32, normalize = ["trim", "lowercase"], class = "pii.contact", mask = "email" },
  { path = "/diagnosis",  mode = "randomized",    class = "phi.clinical" },
  { path = "/patient_id", mode = "pseudonym",     class = "pii.identifier" },
  { path = "/allergies/*", mode = "randomized",   class = "phi.clinical" },
  { path = "/contacts/*/phone", mode = "blind_index", bits = 16, normalize = "digits", class = "pii.contact" },
  { path = "/codes/*",    mode = "deterministic", class = "phi.clinical" },
  { path = "/notes",      mode = "randomized",    class = "phi.clinical" },
]
"#;

pub fn schema() -> Schema {
    let set = SchemaSet::from_toml(SCHEMA, "test.toml").unwrap();
    (**set.latest("patient").unwrap()).clone()
}

pub fn tenant(name: &str) -> TenantId {
    TenantId::new(name).unwrap()
}

pub fn key(byte: u8) -> Key256 {
    Key256::from_array(&mut [byte; 32])
}

/// A tenant's keys: a KEK (version 1) and an index root.
pub struct TenantKeys {
    pub tenant: TenantId,
    pub kek: Aead,
    pub index_root: Key256,
    pub schema: Schema,
    pub schema_keys: SchemaKeys,
}

impl TenantKeys {
    pub fn new(tenant_name: &str, kek: Key256, index_root: Key256) -> Self {
        let tenant = tenant(tenant_name);
        let schema = schema();
        let schema_keys = SchemaKeys::derive(&index_root, &tenant, &schema);
        Self { kek: Aead::new(&kek), index_root, schema, schema_keys, tenant }
    }

    pub fn random(tenant_name: &str) -> Self {
        Self::new(tenant_name, Key256::generate().unwrap(), Key256::generate().unwrap())
    }

    pub fn issue(&self) -> IssuedDek {
        let dek = Key256::generate().unwrap();
        let id = RecordKeyId::generate().unwrap();
        let binding = DekBinding { tenant: &self.tenant, kek_version: 1, record_key_id: &id };
        let wrapped = wrap_dek(&self.kek, &binding, &dek).unwrap();
        IssuedDek::new(id, 1, wrapped, dek)
    }

    pub fn encrypt(&self, record: Value) -> Value {
        encrypt_record(record, &self.tenant, &self.schema, &self.schema_keys, self.issue()).unwrap()
    }

    /// Decrypts with full disclosure, unwrapping the DEK like the key service would.
    pub fn decrypt(&self, record: Value) -> Result<Value, kms_core::record::RecordError> {
        self.decrypt_with(record, &|_| Disclosure::Reveal).map(|d| d.record)
    }

    pub fn decrypt_with(
        &self,
        record: Value,
        disclose: &dyn Fn(&kms_core::schema::FieldSpec) -> Disclosure,
    ) -> Result<kms_core::record::DecryptedRecord, kms_core::record::RecordError> {
        let encrypted = EncryptedRecord::parse(record)?;
        let header = encrypted.header();
        let binding = DekBinding {
            tenant: header.tenant(),
            kek_version: header.kek_version(),
            record_key_id: header.record_key_id(),
        };
        let dek = unwrap_dek(&self.kek, &binding, header.wrapped_dek())
            .map_err(|_| kms_core::record::RecordError::CannotDecrypt)?;
        encrypted.decrypt(&dek, &self.schema, &self.schema_keys, disclose)
    }
}

pub fn sample_record() -> Value {
    serde_json::json!({
        "name": "Jane Roe",
        "ssn": "123-45-6789",
        "mrn": "MRN-000123",
        "email": "  Jane.Roe@Example.org ",
        "diagnosis": {"code": "C50.9", "text": "Malignant neoplasm of breast", "stage": 2},
        "patient_id": "P-42",
        "allergies": ["penicillin", "latex", {"substance": "peanut", "severity": 3}],
        "contacts": [{"kind": "home", "phone": "+1 (555) 010-9999"}, {"kind": "none"}],
        "codes": ["E11", "I10", "E11"],
        "notes": null,
        "age": 51,
        "active": true
    })
}
