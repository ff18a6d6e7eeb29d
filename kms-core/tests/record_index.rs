//! Deterministic encryption, blind indexes and pseudonyms.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // test code

mod common;

use common::TenantKeys;
use kms_core::record::{BLIND_INDEX_PREFIX, IndexPurpose, blind_index_token, derive_field_key};
use serde_json::json;

#[test]
fn deterministic_equal_within_tenant_and_path_only() {
    let t1 = TenantKeys::random("t1");
    let t2 = TenantKeys::random("t2");
    let a = t1.encrypt(json!({"mrn": "MRN-1", "codes": ["MRN-1", "E11", "E11"]}));
    let b = t1.encrypt(json!({"mrn": "MRN-1", "codes": ["E11"]}));
    let c = t2.encrypt(json!({"mrn": "MRN-1"}));
    let d = t1.encrypt(json!({"mrn": "MRN-2"}));
    assert_eq!(a["mrn"], b["mrn"], "same tenant, schema, path, value");
    assert_eq!(a["codes"][1], a["codes"][2], "same wildcard pattern, same value");
    assert_eq!(a["codes"][1], b["codes"][0], "across records");
    assert_ne!(a["mrn"], c["mrn"], "another tenant");
    assert_ne!(a["mrn"], a["codes"][0], "another path");
    assert_ne!(a["mrn"], d["mrn"], "another value");
    assert!(a["mrn"].as_str().unwrap().starts_with("kg1d:"));
}

#[test]
fn randomized_fields_differ_every_time() {
    let keys = TenantKeys::random("t1");
    let a = keys.encrypt(json!({"ssn": "123"}));
    let b = keys.encrypt(json!({"ssn": "123"}));
    assert_ne!(a["ssn"], b["ssn"]);
}

#[test]
fn blind_index_same_normalized_input_same_token() {
    let keys = TenantKeys::random("t1");
    let a = keys.encrypt(json!({"email": "Jane@Example.org"}));
    let b = keys.encrypt(json!({"email": "  jane@example.org\n"}));
    let c = keys.encrypt(json!({"email": "john@example.org"}));
    assert_eq!(a["email_bidx"], b["email_bidx"]);
    assert_ne!(a["email_bidx"], c["email_bidx"]);
    assert_ne!(a["email"], b["email"], "the field itself stays randomized");

    // The query-side token (what /v1/index returns) equals the stored one.
    let spec = keys.schema.fields.iter().find(|f| f.path.as_str() == "/email").unwrap();
    let key = derive_field_key(
        &keys.index_root,
        &keys.tenant,
        &keys.schema.name,
        spec,
        IndexPurpose::BlindIndex,
    );
    let query =
        blind_index_token(&key, spec.blind_index.as_ref().unwrap(), &json!("JANE@example.org "));
    assert_eq!(json!(query), a["email_bidx"]);

    // bits = 32 → 4 bytes; bits = 16 with digits normalizer on phones.
    let decoded = |v: &serde_json::Value| {
        let s = v.as_str().unwrap().strip_prefix(BLIND_INDEX_PREFIX).unwrap();
        data_encoding::BASE64URL_NOPAD.decode(s.as_bytes()).unwrap()
    };
    assert_eq!(decoded(&a["email_bidx"]).len(), 4);
    let p1 = keys.encrypt(json!({"contacts": [{"phone": "+1 (555) 010-9999"}]}));
    let p2 = keys.encrypt(json!({"contacts": [{"phone": "15550109999"}]}));
    assert_eq!(p1["contacts"][0]["phone_bidx"], p2["contacts"][0]["phone_bidx"]);
    assert_eq!(decoded(&p1["contacts"][0]["phone_bidx"]).len(), 2);
}

#[test]
fn blind_index_differs_across_tenants() {
    let a = TenantKeys::random("t1").encrypt(json!({"email": "x@y.z"}));
    let b = TenantKeys::random("t2").encrypt(json!({"email": "x@y.z"}));
    assert_ne!(a["email_bidx"], b["email_bidx"]);
}

#[test]
fn pseudonyms_are_stable_per_tenant_and_namespace() {
    let t1 = TenantKeys::random("t1");
    let a = t1.encrypt(json!({"patient_id": "P-1"}));
    let b = t1.encrypt(json!({"patient_id": "P-1"}));
    let c = t1.encrypt(json!({"patient_id": "P-2"}));
    let d = TenantKeys::random("t2").encrypt(json!({"patient_id": "P-1"}));
    assert_eq!(a["patient_id"], b["patient_id"]);
    assert_ne!(a["patient_id"], c["patient_id"]);
    assert_ne!(a["patient_id"], d["patient_id"]);
    // The namespace key (what /v1/pseudonym uses) gives the same pseudonym.
    let ns = kms_core::Name::new("patient").unwrap();
    let key = kms_core::record::derive_pseudonym_key(&t1.index_root, &t1.tenant, &ns);
    assert_eq!(json!(kms_core::record::pseudonym(&key, &json!("P-1"))), a["patient_id"]);
}
