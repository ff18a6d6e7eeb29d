//! Round trips of every field mode over every JSON value type, by proptest.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // test code

mod common;

use common::TenantKeys;
use kms_core::record::{Disclosure, FieldOutcome, RecordHeader};
use proptest::prelude::*;
use serde_json::{Map, Number, Value, json};

fn scalar() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_filter("JSON has no NaN or infinity", |f| f.is_finite())
            .prop_map(|f| Value::Number(Number::from_f64(f).unwrap())),
        ".{0,40}".prop_map(Value::String),
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    scalar().prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map("[a-z_~/]{0,8}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

fn maybe(v: impl Strategy<Value = Value>) -> impl Strategy<Value = Option<Value>> {
    prop::option::weighted(0.8, v)
}

prop_compose! {
    fn patient()(
        ssn in maybe(json_value()),
        mrn in maybe(json_value()),
        email in maybe(json_value()),
        diagnosis in maybe(json_value()),
        patient_id in maybe(json_value()),
        allergies in maybe(prop::collection::vec(json_value(), 0..5).prop_map(Value::Array)),
        contacts in prop::collection::vec(maybe(json_value()), 0..4),
        codes in maybe(prop::collection::vec(json_value(), 0..5).prop_map(Value::Array)),
        notes in maybe(json_value()),
        extra in json_value(),
    ) -> Value {
        let mut record = Map::new();
        for (name, value) in [
            ("ssn", ssn), ("mrn", mrn), ("email", email), ("diagnosis", diagnosis),
            ("patient_id", patient_id), ("allergies", allergies), ("codes", codes), ("notes", notes),
        ] {
            if let Some(v) = value {
                record.insert(name.to_owned(), v);
            }
        }
        let contacts: Vec<Value> = contacts
            .into_iter()
            .map(|phone| match phone {
                Some(p) => json!({"kind": "home", "phone": p}),
                None => json!({"kind": "none"}),
            })
            .collect();
        record.insert("contacts".into(), Value::Array(contacts));
        record.insert("unprotected".into(), extra);
        Value::Object(record)
    }
}

/// Long enough strings that finding them in ciphertext is not a coincidence.
fn long_strings(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::String(s) if s.len() >= 12 => out.push(s.clone()),
        Value::Array(items) => items.iter().for_each(|v| long_strings(v, out)),
        Value::Object(map) => map.values().for_each(|v| long_strings(v, out)),
        _ => {}
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn every_mode_round_trips_every_json_type(record in patient()) {
        let keys = TenantKeys::new("onc", common::key(1), common::key(2));
        let encrypted = keys.encrypt(record.clone());

        // No protected plaintext appears in the encrypted record.
        let text = encrypted.to_string();
        for pointer in ["/ssn", "/mrn", "/email", "/diagnosis", "/allergies", "/codes", "/notes"] {
            let mut secrets = Vec::new();
            if let Some(v) = record.pointer(pointer) {
                long_strings(v, &mut secrets);
            }
            for s in secrets {
                let escaped = serde_json::to_string(&s).unwrap();
                prop_assert!(!text.contains(&escaped[1..escaped.len() - 1]), "{} leaked", pointer);
            }
        }

        let decrypted = keys.decrypt(encrypted.clone()).unwrap();
        // Pseudonyms are irreversible: the decrypted record keeps them.
        let mut expected = record.clone();
        if expected.get("patient_id").is_some() {
            let pseudonym = encrypted["patient_id"].as_str().unwrap();
            prop_assert!(pseudonym.starts_with("kgp:"));
            expected["patient_id"] = json!(pseudonym);
        }
        prop_assert_eq!(decrypted, expected);
    }
}

#[test]
fn header_lists_exactly_the_present_fields() {
    let keys = TenantKeys::random("onc");
    let record =
        json!({"ssn": "1", "allergies": ["a", "b"], "contacts": [{"phone": "1"}, {}], "age": 3});
    let encrypted = keys.encrypt(record);
    let header = RecordHeader::parse(encrypted["_kg"].as_str().unwrap()).unwrap();
    let pointers: Vec<&str> = header.fields().iter().map(|f| f.pointer).collect();
    assert_eq!(pointers, ["/allergies/0", "/allergies/1", "/contacts/0/phone", "/ssn"]);
    assert_eq!(encrypted["age"], json!(3), "unprotected members untouched");
    assert!(encrypted["contacts"][0]["phone_bidx"].as_str().unwrap().starts_with("kg1b:"));
}

#[test]
fn a_record_without_protected_fields_still_round_trips() {
    let keys = TenantKeys::random("onc");
    let encrypted = keys.encrypt(json!({"age": 3}));
    assert!(encrypted["_kg"].as_str().unwrap().starts_with("kg1h:"));
    assert_eq!(keys.decrypt(encrypted).unwrap(), json!({"age": 3}));
}

#[test]
fn already_encrypted_and_non_objects_are_refused() {
    let keys = TenantKeys::random("onc");
    let encrypted = keys.encrypt(json!({"ssn": "1"}));
    let encrypt = |record| {
        kms_core::record::encrypt_record(
            record,
            &keys.tenant,
            &keys.schema,
            &keys.schema_keys,
            keys.issue(),
        )
    };
    assert!(matches!(encrypt(encrypted), Err(kms_core::record::RecordError::AlreadyEncrypted)));
    assert!(matches!(encrypt(json!([1])), Err(kms_core::record::RecordError::NotAnObject)));
    let clash = json!({"email": "a@b", "email_bidx": "mine"});
    assert!(matches!(encrypt(clash), Err(kms_core::record::RecordError::ReservedMember { .. })));
    // Protected data in an unexpected shape is refused, never left in clear.
    for odd in [
        json!({"allergies": "penicillin"}),
        json!({"allergies": {"0": "latex"}}),
        json!({"contacts": ["555-0100"]}),
    ] {
        let result = encrypt(odd.clone());
        assert!(matches!(result, Err(kms_core::record::RecordError::Shape(_))), "{odd}");
    }
    assert!(encrypt(json!({"allergies": null})).is_ok(), "null: nothing to protect");
}

#[test]
fn need_to_know_reveals_masks_and_withholds_by_class() {
    let keys = TenantKeys::random("onc");
    let encrypted = keys.encrypt(common::sample_record());
    // A caller allowed only pii.contact in clear; identifiers masked where possible.
    let decrypted = keys
        .decrypt_with(encrypted, &|field| match field.class.as_str() {
            "pii.contact" => Disclosure::Reveal,
            "phi.identifier" => Disclosure::Mask,
            _ => Disclosure::Withhold,
        })
        .unwrap();
    let r = &decrypted.record;
    assert_eq!(r["ssn"], json!("***-**-6789"));
    assert!(r.get("mrn").is_none(), "no mask defined: withheld");
    assert!(r.get("diagnosis").is_none());
    assert_eq!(r["allergies"], json!([null, null, null]), "array elements withheld in place");
    assert_eq!(r["email"], json!("  Jane.Roe@Example.org "));
    assert_eq!(r["contacts"][0]["phone"], json!("+1 (555) 010-9999"));
    assert!(r.get("email_bidx").is_none() && r.get("_kg").is_none());
    assert_eq!(r["age"], json!(51));
    let debug = format!("{decrypted:?}");
    assert!(!debug.contains("6789") && !debug.contains("Jane"), "Debug leaks: {debug}");
    let outcome = |p: &str| decrypted.fields.iter().find(|f| f.pointer == p).unwrap().outcome;
    assert_eq!(outcome("/ssn"), FieldOutcome::Masked);
    assert_eq!(outcome("/mrn"), FieldOutcome::Withheld);
    assert_eq!(outcome("/email"), FieldOutcome::Revealed);
    assert_eq!(decrypted.fields.len(), 13);
}
