//! The bodies of the fuzz targets, one function per target (the files in
//! `fuzz_targets/` are one-liners calling these). The main workspace's
//! `tests/tests/fuzz_regressions.rs` includes this file to replay every
//! seed and every saved crash under `cargo test`, so it may depend only on
//! crates that test crate has: kms-core, gateway and hsm-adapters (each
//! with feature `fuzzing`) and serde_json.

use kms_core::crypto::Aead;
use kms_core::record::{
    Disclosure, EncryptedRecord, EncryptedText, HEADER_PREFIX, RecordHeader, SchemaKeys,
    TextWorkspace,
};
use kms_core::schema::FieldSpec;
use kms_core::schema::SchemaSet;
use kms_core::{DekBinding, Key256, SecretBuf, unwrap_dek};

/// A target's entry point.
pub type Target = fn(&[u8]);

/// Every target: (name, entry point).
pub const TARGETS: &[(&str, Target)] = &[
    ("header_parse", header_parse),
    ("record_decrypt", record_decrypt),
    ("schema_parse", schema_parse),
    ("policy_parse", policy_parse),
    ("keyservice_request", keyservice_request),
    ("sidecar_request", sidecar_request),
    ("unwrap_binary", unwrap_binary),
    ("issue_binary", issue_binary),
    ("root_key_file", root_key_file),
    ("ks_answer", ks_answer),
];

/// The record header parser must be total: any bytes give a header or an
/// error, never a panic, and a parsed header re-encodes to the same text.
pub fn header_parse(data: &[u8]) {
    if let Ok(header) = RecordHeader::parse_bytes(data) {
        // Canonical encoding: parsing is injective.
        let text = header.encode();
        let again = RecordHeader::parse(&text).expect("re-parse of an encoded header");
        assert_eq!(again, header);
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = RecordHeader::parse(text);
        let _ = RecordHeader::parse(&format!("{HEADER_PREFIX}{text}"));
    }
}

const SCHEMA: &str = include_str!("../schema.toml");

/// (tenant, KEK v1 byte, index root byte) of the vectors in kms-core/tests/vectors.
const KEYS: &[(&str, u8, u8)] =
    &[("onc-centre", 0x10, 0x11), ("t2", 0x12, 0x13), ("t3", 0x14, 0x15)];

/// Decrypting an arbitrary record (JSON text) with real keys must never
/// panic, and the text path must give what the tree path gives (the same
/// record and reports, or the same error) under every disclosure. Seeds
/// are the format-stability vectors, whose published test keys are the
/// ones above.
pub fn record_decrypt(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(raw) = serde_json::value::RawValue::from_string(text.to_owned()) else { return };
    let Ok(record) = serde_json::from_str::<serde_json::Value>(text) else { return };
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
    let reveal = |_: &FieldSpec| Disclosure::Reveal;
    let withhold = |_: &FieldSpec| Disclosure::Withhold;
    let by_class = |f: &FieldSpec| match f.class.len() % 3 {
        0 => Disclosure::Reveal,
        1 => Disclosure::Mask,
        _ => Disclosure::Withhold,
    };
    let mut workspace = TextWorkspace::default();
    for disclose in [&reveal as &dyn Fn(&FieldSpec) -> Disclosure, &withhold, &by_class] {
        let Ok(tree) = serde_json::from_str::<serde_json::Value>(text) else { return };
        let by_tree = EncryptedRecord::parse(tree)
            .and_then(|r| r.decrypt(&dek, schema, &keys, disclose))
            .map(|d| (d.record, d.fields))
            .map_err(|e| e.to_string());
        let mut out = SecretBuf::default();
        let by_text = EncryptedText::parse(&raw)
            .and_then(|r| workspace.decrypt(r, &dek, schema, &keys, disclose, &mut out))
            .map_err(|e| e.to_string())
            .map(|fields| {
                let record =
                    serde_json::from_slice(out.as_slice()).expect("the text path wrote JSON");
                (record, fields.to_vec())
            });
        assert_eq!(by_text, by_tree, "text and tree decrypt differ");
    }
}

/// The schema file parser must be total on any text.
pub fn schema_parse(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = SchemaSet::from_toml(text, "fuzz.toml");
    }
}

/// The access policy parser (and effective grants round trip).
pub fn policy_parse(data: &[u8]) {
    gateway::fuzzing::policy(data);
}

/// Every key service request body.
pub fn keyservice_request(data: &[u8]) {
    gateway::fuzzing::key_service_request(data);
}

/// Every sidecar request body, through the record code.
pub fn sidecar_request(data: &[u8]) {
    gateway::fuzzing::sidecar_request(data);
}

/// The binary unwrap exchange (request and answer); see
/// `gateway::fuzzing::unwrap_binary`.
pub fn unwrap_binary(data: &[u8]) {
    gateway::fuzzing::unwrap_binary(data);
}

/// The binary issue answer; see `gateway::fuzzing::issue_binary`.
pub fn issue_binary(data: &[u8]) {
    gateway::fuzzing::issue_binary(data);
}

/// The local root key file parser; see `hsm_adapters::fuzzing::root_key_file`.
pub fn root_key_file(data: &[u8]) {
    hsm_adapters::fuzzing::root_key_file(data);
}

/// The key service's JSON answers; see `gateway::fuzzing::ks_answer`.
pub fn ks_answer(data: &[u8]) {
    gateway::fuzzing::ks_answer(data);
}
