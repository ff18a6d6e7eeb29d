//! The tamper matrix: every manipulation of an encrypted record is rejected
//! as a whole, with no plaintext returned.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // test code

mod common;

use common::{TenantKeys, sample_record};
use data_encoding::BASE64URL_NOPAD;
use kms_core::record::{HEADER_PREFIX, RecordError, RecordHeader};
use serde_json::{Value, json};

fn header_bytes(record: &Value) -> Vec<u8> {
    let text = record["_kg"].as_str().unwrap();
    BASE64URL_NOPAD.decode(&text.as_bytes()[HEADER_PREFIX.len()..]).unwrap()
}

fn with_header_bytes(record: &Value, bytes: &[u8]) -> Value {
    let mut out = record.clone();
    out["_kg"] = Value::String(format!("{HEADER_PREFIX}{}", BASE64URL_NOPAD.encode(bytes)));
    out
}

fn assert_rejected(keys: &TenantKeys, record: Value, what: &str) {
    match keys.decrypt(record) {
        Ok(plain) => panic!("{what}: accepted and returned {plain}"),
        Err(RecordError::NotAnObject | RecordError::NotEncrypted) => {
            panic!("{what}: rejected for the wrong reason")
        }
        Err(_) => {}
    }
}

/// Every protected string in a record (JSON pointer → value).
fn protected_strings(record: &Value) -> Vec<(String, String)> {
    let header = RecordHeader::parse(record["_kg"].as_str().unwrap()).unwrap();
    header
        .fields()
        .iter()
        .map(|f| {
            (f.pointer.to_owned(), record.pointer(f.pointer).unwrap().as_str().unwrap().to_owned())
        })
        .collect()
}

#[test]
fn untampered_record_decrypts() {
    let keys = TenantKeys::random("t1");
    let encrypted = keys.encrypt(sample_record());
    let mut expected = sample_record();
    expected.as_object_mut().unwrap().insert("patient_id".into(), encrypted["patient_id"].clone());
    assert_eq!(keys.decrypt(encrypted).unwrap(), expected);
}

#[test]
fn every_flipped_header_byte_is_rejected() {
    let keys = TenantKeys::random("t1");
    let encrypted = keys.encrypt(sample_record());
    let bytes = header_bytes(&encrypted);
    for i in 0..bytes.len() {
        for flip in [0x01u8, 0x80] {
            let mut tampered = bytes.clone();
            tampered[i] ^= flip;
            assert_rejected(
                &keys,
                with_header_bytes(&encrypted, &tampered),
                &format!("header byte {i}"),
            );
        }
    }
}

#[test]
fn every_flipped_field_byte_is_rejected() {
    let keys = TenantKeys::random("t1");
    let encrypted = keys.encrypt(sample_record());
    for (pointer, text) in protected_strings(&encrypted) {
        let (prefix, body) = text.split_at(text.find(':').unwrap() + 1);
        let decoded = BASE64URL_NOPAD
            .decode(body.as_bytes())
            .or_else(|_| data_encoding::BASE32_NOPAD.decode(body.as_bytes()))
            .unwrap();
        let is_base32 = prefix == "kgp:";
        for i in 0..decoded.len() {
            let mut tampered = decoded.clone();
            tampered[i] ^= 0x01;
            let body = if is_base32 {
                data_encoding::BASE32_NOPAD.encode(&tampered)
            } else {
                BASE64URL_NOPAD.encode(&tampered)
            };
            let mut record = encrypted.clone();
            *record.pointer_mut(&pointer).unwrap() = Value::String(format!("{prefix}{body}"));
            assert_rejected(&keys, record, &format!("{pointer} byte {i}"));
        }
    }
}

#[test]
fn blind_index_siblings_are_verified() {
    let keys = TenantKeys::random("t1");
    let encrypted = keys.encrypt(sample_record());
    let mut changed = encrypted.clone();
    changed["email_bidx"] = json!("kg1b:AAAAAA");
    assert_rejected(&keys, changed, "changed blind index");
    let mut dropped = encrypted.clone();
    dropped.as_object_mut().unwrap().remove("email_bidx");
    assert_rejected(&keys, dropped, "dropped blind index");
    let mut nested = encrypted;
    nested["contacts"][0].as_object_mut().unwrap().remove("phone_bidx");
    assert_rejected(&keys, nested, "dropped nested blind index");
}

#[test]
fn moving_a_field_to_another_path_is_rejected() {
    let keys = TenantKeys::random("t1");
    let encrypted = keys.encrypt(sample_record());
    let mut swapped = encrypted.clone();
    swapped["ssn"] = encrypted["diagnosis"].clone();
    swapped["diagnosis"] = encrypted["ssn"].clone();
    assert_rejected(&keys, swapped, "ssn <-> diagnosis");
    let mut in_array = encrypted.clone();
    in_array["allergies"][0] = encrypted["allergies"][1].clone();
    in_array["allergies"][1] = encrypted["allergies"][0].clone();
    assert_rejected(&keys, in_array, "allergies/0 <-> allergies/1");
    let mut det = encrypted.clone();
    det["codes"][0] = encrypted["codes"][1].clone();
    assert_rejected(&keys, det, "deterministic codes/1 -> codes/0");
}

#[test]
fn moving_a_field_between_records_is_rejected() {
    let keys = TenantKeys::random("t1");
    let a = keys.encrypt(sample_record());
    let mut other = sample_record();
    other["mrn"] = json!("MRN-999");
    other["patient_id"] = json!("P-7");
    let b = keys.encrypt(other);
    for pointer in ["/ssn", "/diagnosis", "/allergies/2", "/email", "/mrn", "/patient_id"] {
        let mut mixed = a.clone();
        *mixed.pointer_mut(pointer).unwrap() = b.pointer(pointer).unwrap().clone();
        if pointer == "/email" {
            mixed["email_bidx"] = b["email_bidx"].clone();
        }
        assert_rejected(&keys, mixed, &format!("{pointer} from another record"));
    }
}

#[test]
fn swapping_key_parts_or_headers_is_rejected() {
    let keys = TenantKeys::random("t1");
    let a = keys.encrypt(sample_record());
    let b = keys.encrypt(sample_record());
    let (ha, hb) = (header_bytes(&a), header_bytes(&b));
    let key_part = 4 + 60;
    let mut swapped = ha[..ha.len() - key_part].to_vec();
    swapped.extend_from_slice(&hb[hb.len() - key_part..]);
    assert_rejected(&keys, with_header_bytes(&a, &swapped), "key part of another record");
    let mut whole = a.clone();
    whole["_kg"] = b["_kg"].clone();
    assert_rejected(&keys, whole, "whole header of another record");
}

#[test]
fn dropping_or_adding_a_listed_field_is_rejected() {
    let keys = TenantKeys::random("t1");
    let encrypted = keys.encrypt(sample_record());
    for pointer in ["/ssn", "/mrn", "/patient_id", "/notes", "/email"] {
        let mut dropped = encrypted.clone();
        dropped.as_object_mut().unwrap().remove(&pointer[1..]);
        assert_rejected(&keys, dropped, &format!("dropped {pointer}"));
    }
    let mut shorter = encrypted.clone();
    shorter["allergies"].as_array_mut().unwrap().pop();
    assert_rejected(&keys, shorter, "dropped array element");
    let mut longer = encrypted.clone();
    longer["allergies"].as_array_mut().unwrap().push(json!("injected"));
    assert_rejected(&keys, longer, "added plaintext at a protected path");
    let mut added = encrypted;
    added["contacts"][1]["phone"] = json!("+1 555 0000");
    assert_rejected(&keys, added, "added plaintext at an unlisted protected path");
}

#[test]
fn reordering_listed_paths_is_rejected() {
    let keys = TenantKeys::random("t1");
    let mut record = json!({"ssn": "1", "diagnosis": "x"});
    record = keys.encrypt(record);
    let bytes = header_bytes(&record);
    // Layout after the fixed prefix: u16 n=2, then (u16 len, ptr, mode) ×2.
    let start = 2 + 1 + 2 + 1 + 7 + 4 + 16;
    assert_eq!(&bytes[start..start + 2], &[0, 2]);
    let first = 2 + usize::from(u16::from_be_bytes([bytes[start + 2], bytes[start + 3]])) + 1;
    let second_start = start + 2 + first;
    let second =
        2 + usize::from(u16::from_be_bytes([bytes[second_start], bytes[second_start + 1]])) + 1;
    let mut reordered = bytes[..start + 2].to_vec();
    reordered.extend_from_slice(&bytes[second_start..second_start + second]);
    reordered.extend_from_slice(&bytes[start + 2..second_start]);
    reordered.extend_from_slice(&bytes[second_start + second..]);
    assert_eq!(reordered.len(), bytes.len());
    assert_ne!(reordered, bytes);
    assert_rejected(&keys, with_header_bytes(&record, &reordered), "reordered paths");
}

#[test]
fn wrong_tenant_or_key_is_rejected() {
    let keys = TenantKeys::random("t1");
    let encrypted = keys.encrypt(sample_record());
    let other_tenant = TenantKeys::random("t2");
    assert_rejected(&other_tenant, encrypted.clone(), "tenant t2's keys");
    // Same tenant name, other KEK and index root (another deployment).
    let impostor = TenantKeys::random("t1");
    assert_rejected(&impostor, encrypted, "another KEK for t1");
}

#[test]
fn malformed_headers_are_errors_not_panics() {
    let keys = TenantKeys::random("t1");
    for bad in [json!(1), json!("kg1h:"), json!("kg1h:AAAA"), json!("nope"), json!(null), json!({})]
    {
        let mut record = sample_record();
        record["_kg"] = bad.clone();
        assert!(keys.decrypt(record).is_err(), "{bad}");
    }
    assert!(matches!(keys.decrypt(sample_record()), Err(RecordError::NotEncrypted)));
    assert!(matches!(keys.decrypt(json!([1, 2])), Err(RecordError::NotAnObject)));
}
