//! Format-stability vectors: records encrypted once with fixed keys and
//! stored under `tests/vectors/`. Any change that would break records
//! already stored somewhere fails here.
//!
//! The keys in the vector files are published test keys, not secrets.
//! To add a vector (never to change one): `KEYGATE_WRITE_VECTORS=1 cargo
//! test -p kms-core --test format_vectors -- --ignored`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // test code

mod common;

use std::path::PathBuf;

use common::TenantKeys;
use data_encoding::HEXLOWER;
use kms_core::Key256;
use kms_core::record::RecordHeader;
use serde_json::{Value, json};

fn vectors_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/vectors")
}

fn keys_of(vector: &Value) -> TenantKeys {
    let key = |name: &str| {
        Key256::from_slice(&HEXLOWER.decode(vector[name].as_str().unwrap().as_bytes()).unwrap())
            .unwrap()
    };
    TenantKeys::new(vector["tenant"].as_str().unwrap(), key("kek_v1_hex"), key("index_root_hex"))
}

fn cases() -> Vec<(&'static str, &'static str, Value)> {
    vec![
        ("v1-patient-full", "onc-centre", common::sample_record()),
        (
            "v1-patient-sparse",
            "t2",
            json!({"ssn": "000-00-0000", "allergies": [], "contacts": [{"phone": "0"}], "x": [1.5, -0.0, 1e300]}),
        ),
        ("v1-no-protected-fields", "t3", json!({"unprotected": {"a": [true, null]}})),
    ]
}

#[test]
fn stored_vectors_still_decrypt() {
    let mut checked = 0;
    for (name, _, _) in cases() {
        let path = vectors_dir().join(format!("{name}.json"));
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let vector: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            vector["schema_toml"].as_str().unwrap(),
            common::SCHEMA,
            "{name}: schema drifted"
        );
        let keys = keys_of(&vector);
        let decrypted = keys.decrypt(vector["encrypted"].clone()).unwrap();
        assert_eq!(decrypted, vector["decrypted"], "{name}");

        // Deterministic parts must be reproduced exactly by today's code.
        let again = keys.encrypt(vector["plaintext"].clone());
        for (pointer, stored) in deterministic_parts(&vector["encrypted"]) {
            assert_eq!(again.pointer(&pointer), Some(&stored), "{name}: {pointer} changed");
        }
        let header = RecordHeader::parse(vector["encrypted"]["_kg"].as_str().unwrap()).unwrap();
        assert_eq!(header.tenant().as_str(), vector["tenant"].as_str().unwrap());
        checked += 1;
    }
    assert_eq!(checked, 3);
}

/// Every deterministic, pseudonym and blind index string (pointer, value).
fn deterministic_parts(record: &Value) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    walk(record, String::new(), &mut out);
    out
}

fn walk(value: &Value, pointer: String, out: &mut Vec<(String, Value)>) {
    match value {
        Value::String(s) if ["kg1d:", "kg1b:", "kgp:"].iter().any(|p| s.starts_with(p)) => {
            out.push((pointer, value.clone()));
        }
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                walk(v, format!("{pointer}/{i}"), out);
            }
        }
        Value::Object(map) => {
            for (k, v) in map {
                walk(v, format!("{pointer}/{}", k.replace('~', "~0").replace('/', "~1")), out);
            }
        }
        _ => {}
    }
}

#[test]
#[ignore = "writes new vector files; run by hand only when adding a vector"]
fn write_vectors() {
    if std::env::var_os("KEYGATE_WRITE_VECTORS").is_none() {
        return;
    }
    for (i, (name, tenant, plaintext)) in cases().into_iter().enumerate() {
        let path = vectors_dir().join(format!("{name}.json"));
        if path.exists() {
            continue;
        }
        let seed = u8::try_from(i).unwrap() * 2;
        let (kek, root) = ([0x10 + seed; 32], [0x11 + seed; 32]);
        let keys = TenantKeys::new(
            tenant,
            Key256::from_slice(&kek).unwrap(),
            Key256::from_slice(&root).unwrap(),
        );
        let encrypted = keys.encrypt(plaintext.clone());
        let decrypted = keys.decrypt(encrypted.clone()).unwrap();
        let vector = json!({
            "description": "keygate record format v1 stability vector; keys are public test keys",
            "tenant": tenant,
            "kek_v1_hex": HEXLOWER.encode(&kek),
            "index_root_hex": HEXLOWER.encode(&root),
            "schema_toml": common::SCHEMA,
            "plaintext": plaintext,
            "encrypted": encrypted,
            "decrypted": decrypted,
        });
        std::fs::write(&path, serde_json::to_string_pretty(&vector).unwrap() + "\n").unwrap();
    }
}
