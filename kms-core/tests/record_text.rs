//! The text path (`TextWorkspace`) against the tree path (`encrypt_record`,
//! `EncryptedRecord::decrypt`): on generated records written out in many
//! ways (member order, whitespace, escaped names, repeated members), and on
//! tampered ones, both give the same records, the same field reports and
//! the same errors.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // test code

mod common;

use common::TenantKeys;
use kms_core::record::{
    Disclosure, EncryptedRecord, EncryptedText, FieldOutcome, FieldReport, RecordError,
    RecordHeader, TextWorkspace, check_encryptable,
};
use kms_core::schema::FieldSpec;
use kms_core::{DekBinding, Key256, SecretBuf, unwrap_dek};
use proptest::prelude::*;
use serde_json::value::RawValue;
use serde_json::{Map, Number, Value, json};

// ---------------------------------------------------------------- helpers

/// A small deterministic generator for the writing choices.
struct Choices(u64);

impl Choices {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn one_in(&mut self, n: u64) -> bool {
        self.next().is_multiple_of(n)
    }
}

/// How a record is written out.
#[derive(Clone, Copy, Debug)]
struct Style {
    seed: u64,
    /// Members in a shuffled order rather than sorted.
    shuffle: bool,
    /// Whitespace between tokens.
    spaces: bool,
    /// Some member names written with a `\u` escape.
    escapes: bool,
    /// Some members written twice (the first with another value).
    repeats: bool,
    /// `_kg` written last, where the text path writes it.
    header_last: bool,
}

impl Style {
    const PLAIN: Style = Style {
        seed: 1,
        shuffle: false,
        spaces: false,
        escapes: false,
        repeats: false,
        header_last: false,
    };
}

fn write(value: &Value, style: Style) -> String {
    let mut out = String::new();
    let mut choices = Choices(style.seed | 1);
    write_value(value, style, &mut choices, &mut out);
    out
}

fn space(style: Style, choices: &mut Choices, out: &mut String) {
    if style.spaces && choices.one_in(2) {
        out.push_str([" ", "\n  ", "\t", "\r\n"][(choices.next() % 4) as usize]);
    }
}

fn write_name(name: &str, style: Style, choices: &mut Choices, out: &mut String) {
    if style.escapes && !name.is_empty() && choices.one_in(4) {
        // The first character as a \u escape: the same name to a parser.
        let mut chars = name.chars();
        let first = chars.next().unwrap();
        let mut units = [0u16; 2];
        out.push('"');
        for unit in first.encode_utf16(&mut units) {
            out.push_str(&format!("\\u{unit:04x}"));
        }
        let rest = serde_json::to_string(chars.as_str()).unwrap();
        out.push_str(&rest[1..]);
    } else {
        out.push_str(&serde_json::to_string(name).unwrap());
    }
}

fn write_value(value: &Value, style: Style, choices: &mut Choices, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut members: Vec<(&String, &Value)> = map.iter().collect();
            if style.shuffle {
                for i in (1..members.len()).rev() {
                    members.swap(i, (choices.next() % (i as u64 + 1)) as usize);
                }
            }
            if style.header_last {
                // A stable sort on one key: `_kg` to the end, the rest in order.
                members.sort_by_key(|(name, _)| name.as_str() == "_kg");
            }
            out.push('{');
            let mut first = true;
            for (name, value) in members {
                let mut emit = |v: &Value, choices: &mut Choices, out: &mut String| {
                    if !first {
                        out.push(',');
                    }
                    first = false;
                    space(style, choices, out);
                    write_name(name, style, choices, out);
                    space(style, choices, out);
                    out.push(':');
                    space(style, choices, out);
                    write_value(v, style, choices, out);
                    space(style, choices, out);
                };
                if style.repeats && choices.one_in(5) {
                    // An earlier member of the same name: a parser keeps
                    // the last one.
                    emit(&json!("an earlier, shadowed value"), choices, out);
                }
                emit(value, choices, out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                space(style, choices, out);
                write_value(item, style, choices, out);
                space(style, choices, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&serde_json::to_string(scalar).unwrap()),
    }
}

fn raw(text: &str) -> Box<RawValue> {
    RawValue::from_string(text.to_owned()).expect("valid JSON")
}

fn dek_for(keys: &TenantKeys, header: &RecordHeader) -> Result<Key256, RecordError> {
    let binding = DekBinding {
        tenant: header.tenant(),
        kek_version: header.kek_version(),
        record_key_id: header.record_key_id(),
    };
    unwrap_dek(&keys.kek, &binding, header.wrapped_dek()).map_err(|_| RecordError::CannotDecrypt)
}

type Outcome = Result<(Value, Vec<FieldReport>), String>;

/// The tree path's decrypt of `text`.
fn tree_decrypt(
    keys: &TenantKeys,
    text: &str,
    disclose: &dyn Fn(&FieldSpec) -> Disclosure,
) -> Outcome {
    let value: Value = serde_json::from_str(text).unwrap();
    let parsed = EncryptedRecord::parse(value).map_err(|e| e.to_string())?;
    let dek = dek_for(keys, parsed.header()).map_err(|e| e.to_string())?;
    let decrypted = parsed
        .decrypt(&dek, &keys.schema, &keys.schema_keys, disclose)
        .map_err(|e| e.to_string())?;
    Ok((decrypted.record, decrypted.fields))
}

/// The text path's decrypt of `text`; also checks that a failure wrote
/// nothing and that a success wrote one JSON value.
fn text_decrypt(
    ws: &mut TextWorkspace,
    keys: &TenantKeys,
    text: &str,
    disclose: &dyn Fn(&FieldSpec) -> Disclosure,
) -> Outcome {
    let record = raw(text);
    let parsed = EncryptedText::parse(&record).map_err(|e| e.to_string())?;
    let dek = dek_for(keys, parsed.header()).map_err(|e| e.to_string())?;
    let mut out = SecretBuf::default();
    out.extend_from_slice(b"[");
    let result = ws.decrypt(parsed, &dek, &keys.schema, &keys.schema_keys, disclose, &mut out);
    match result {
        Ok(reports) => {
            let written = std::str::from_utf8(&out.as_slice()[1..]).unwrap();
            let value = serde_json::from_str(written)
                .unwrap_or_else(|e| panic!("not JSON ({e}): {written}"));
            Ok((value, reports.to_vec()))
        }
        Err(e) => {
            assert_eq!(out.as_slice(), b"[", "a failed decrypt wrote nothing");
            Err(e.to_string())
        }
    }
}

fn text_encrypt(ws: &mut TextWorkspace, keys: &TenantKeys, text: &str) -> Result<String, String> {
    let mut out = SecretBuf::default();
    ws.encrypt(&raw(text), &keys.tenant, &keys.schema, &keys.schema_keys, keys.issue(), &mut out)
        .map_err(|e| e.to_string())?;
    Ok(String::from_utf8(out.as_slice().to_vec()).unwrap())
}

fn tree_encrypt(keys: &TenantKeys, text: &str) -> Result<Value, String> {
    let value: Value = serde_json::from_str(text).unwrap();
    kms_core::record::encrypt_record(
        value,
        &keys.tenant,
        &keys.schema,
        &keys.schema_keys,
        keys.issue(),
    )
    .map_err(|e| e.to_string())
}

fn header_of(record: &Value) -> RecordHeader {
    RecordHeader::parse(record["_kg"].as_str().unwrap()).unwrap()
}

/// The tree path and the text path decrypt `text` alike under every
/// disclosure: the same record and reports, or the same error.
fn decrypts_alike(
    ws: &mut TextWorkspace,
    keys: &TenantKeys,
    text: &str,
) -> Result<(), TestCaseError> {
    for (name, policy) in policies() {
        let tree = tree_decrypt(keys, text, policy);
        let ours = text_decrypt(ws, keys, text, policy);
        prop_assert_eq!(&tree, &ours, "policy {}: {}", name, text);
    }
    Ok(())
}

fn reveal(_: &FieldSpec) -> Disclosure {
    Disclosure::Reveal
}

type Policy = &'static dyn Fn(&FieldSpec) -> Disclosure;

/// Every disclosure shape: all, masked, none, and mixed by class.
fn policies() -> [(&'static str, Policy); 4] {
    [
        ("reveal", &reveal),
        ("mask", &|_| Disclosure::Mask),
        ("withhold", &|_| Disclosure::Withhold),
        ("mixed", &|f: &FieldSpec| match f.class.as_str() {
            "phi.identifier" => Disclosure::Mask,
            "pii.contact" => Disclosure::Withhold,
            _ => Disclosure::Reveal,
        }),
    ]
}

// ------------------------------------------------------------- generators

fn scalar() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_filter("JSON has no NaN or infinity", |f| f.is_finite())
            .prop_map(|f| Value::Number(Number::from_f64(f).unwrap())),
        // Mostly plain strings, some with quotes, escapes, controls, non-ASCII.
        "[a-zA-Z0-9 .@-]{0,24}".prop_map(Value::String),
        ".{0,12}".prop_map(Value::String),
        "[\"\\\\\n\t\u{1}é😀/~]{0,6}".prop_map(Value::String),
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    scalar().prop_recursive(3, 24, 5, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-z_~/]{0,6}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

fn maybe(v: impl Strategy<Value = Value>) -> impl Strategy<Value = Option<Value>> {
    prop::option::weighted(0.8, v)
}

prop_compose! {
    /// Records for the test schema: every protected path present or not,
    /// of any type (so also of the wrong shape), plus unprotected members.
    fn record()(
        ssn in maybe(json_value()),
        mrn in maybe(json_value()),
        email in maybe(json_value()),
        diagnosis in maybe(json_value()),
        patient_id in maybe(json_value()),
        allergies in maybe(prop_oneof![
            4 => prop::collection::vec(json_value(), 0..4).prop_map(Value::Array),
            1 => json_value(),
        ]),
        contacts in maybe(prop_oneof![
            4 => prop::collection::vec(
                maybe(json_value()).prop_map(|phone| match phone {
                    Some(p) => json!({"kind": "home", "phone": p}),
                    None => json!({"kind": "none"}),
                }),
                0..3,
            ).prop_map(Value::Array),
            1 => json_value(),
        ]),
        codes in maybe(prop::collection::vec(json_value(), 0..4).prop_map(Value::Array)),
        notes in maybe(json_value()),
        extra in prop::collection::btree_map("[a-z~/]{1,8}", json_value(), 0..4),
        sibling in prop::option::weighted(0.05, json_value()),
    ) -> Value {
        let mut record: Map<String, Value> = extra.into_iter().collect();
        for (name, value) in [
            ("ssn", ssn), ("mrn", mrn), ("email", email), ("diagnosis", diagnosis),
            ("patient_id", patient_id), ("allergies", allergies), ("contacts", contacts),
            ("codes", codes), ("notes", notes), ("email_bidx", sibling),
        ] {
            if let Some(v) = value {
                record.insert(name.to_owned(), v);
            }
        }
        Value::Object(record)
    }
}

fn style() -> impl Strategy<Value = Style> {
    (
        any::<u64>(),
        any::<bool>(),
        any::<bool>(),
        prop::bool::weighted(0.2),
        prop::bool::weighted(0.1),
        any::<bool>(),
    )
        .prop_map(|(seed, shuffle, spaces, escapes, repeats, header_last)| Style {
            seed,
            shuffle,
            spaces,
            escapes,
            repeats,
            header_last,
        })
}

// ------------------------------------------------------------------ tests

proptest! {
    #![proptest_config(ProptestConfig { cases: 384, ..ProptestConfig::default() })]

    /// Encrypting text gives what encrypting the tree gives: the same
    /// header fields, the same deterministic values, and a record that
    /// decrypts (by the tree path) to the same record; or the same error.
    #[test]
    fn text_encrypt_agrees_with_the_tree(record in record(), style in style()) {
        let keys = TenantKeys::new("onc", common::key(1), common::key(2));
        let mut ws = TextWorkspace::default();
        let text = write(&record, style);
        let tree = tree_encrypt(&keys, &text);
        let ours = text_encrypt(&mut ws, &keys, &text);
        let checked = check_encryptable(&raw(&text)).map_err(|e| e.to_string());
        match (&tree, &ours) {
            (Ok(tree), Ok(ours)) => {
                prop_assert!(checked.is_ok());
                let ours: Value = serde_json::from_str(ours)
                    .unwrap_or_else(|e| panic!("not JSON ({e}): {ours}"));
                let (th, oh) = (header_of(tree), header_of(&ours));
                prop_assert_eq!(th.fields(), oh.fields());
                prop_assert_eq!(th.tenant(), oh.tenant());
                for field in oh.fields() {
                    let deterministic = matches!(
                        field.mode,
                        kms_core::schema::FieldMode::Deterministic | kms_core::schema::FieldMode::Pseudonym
                    );
                    if deterministic {
                        prop_assert_eq!(tree.pointer(field.pointer), ours.pointer(field.pointer));
                    }
                    if field.mode == kms_core::schema::FieldMode::BlindIndex {
                        let sibling = format!("{}_bidx", field.pointer);
                        prop_assert_eq!(tree.pointer(&sibling), ours.pointer(&sibling));
                    }
                }
                let expected = tree_decrypt(&keys, &serde_json::to_string(tree).unwrap(), &reveal);
                let got = tree_decrypt(&keys, &serde_json::to_string(&ours).unwrap(), &reveal);
                // A round trip, but for pseudonyms, which do not go back.
                let mut original: Value = serde_json::from_str(&text).unwrap();
                let mut back = got.clone().map(|r| r.0).unwrap();
                for record in [&mut original, &mut back] {
                    record.as_object_mut().unwrap().remove("patient_id");
                }
                prop_assert_eq!(back, original);
                prop_assert_eq!(expected, got);
            }
            (Err(tree), Err(ours)) => prop_assert_eq!(tree, ours),
            _ => prop_assert!(false, "tree {:?} vs text {:?} for {}", tree, ours, text),
        }
        // The pre-check refuses exactly what encryption refuses for being
        // encrypted already or not an object.
        if let Err(e) = &checked {
            prop_assert_eq!(Some(e), tree.as_ref().err());
        }
    }

    /// Decrypting text gives what decrypting the tree gives, under every
    /// disclosure, however the encrypted record is written out.
    #[test]
    fn text_decrypt_agrees_with_the_tree(record in record(), style in style()) {
        let keys = TenantKeys::new("onc", common::key(1), common::key(2));
        let mut ws = TextWorkspace::default();
        let plain = write(&record, Style::PLAIN);
        let Ok(encrypted) = tree_encrypt(&keys, &plain) else { return Ok(()) };
        let text = write(&encrypted, style);
        decrypts_alike(&mut ws, &keys, &text)?;
    }

    /// Rewrapping text gives the tree's rewrapped record however the record
    /// is written out, a shadowed `_kg` member included; only the header
    /// changes.
    #[test]
    fn text_rewrap_agrees_with_the_tree(record in record(), style in style()) {
        let keys = TenantKeys::new("onc", common::key(1), common::key(2));
        let plain = write(&record, Style::PLAIN);
        let Ok(encrypted) = tree_encrypt(&keys, &plain) else { return Ok(()) };
        let text = write(&encrypted, style);
        let wrapped = kms_core::WrappedDek::from_slice(&[7; 60]).unwrap();
        let tree = EncryptedRecord::parse(serde_json::from_str(&text).unwrap())
            .unwrap()
            .into_rewrapped(9, wrapped);
        let record = raw(&text);
        let mut out = SecretBuf::default();
        EncryptedText::parse(&record).unwrap().write_rewrapped(9, wrapped, &mut out).unwrap();
        let rewrapped: Value = serde_json::from_slice(out.as_slice()).unwrap();
        prop_assert_eq!(rewrapped, tree);
    }

    /// A tampered record: the text path refuses it when the tree path does,
    /// with the same error, and otherwise gives the same record.
    #[test]
    fn tampered_records_fail_alike(record in record(), style in style(), edit in 0u8..8, at in any::<prop::sample::Index>(), byte in any::<u8>()) {
        let keys = TenantKeys::new("onc", common::key(1), common::key(2));
        let mut ws = TextWorkspace::default();
        let plain = write(&record, Style::PLAIN);
        let Ok(mut encrypted) = tree_encrypt(&keys, &plain) else { return Ok(()) };
        let header = header_of(&encrypted);
        let pointers: Vec<String> = header.fields().iter().map(|f| f.pointer.to_owned()).collect();
        let map = encrypted.as_object_mut().unwrap();
        let names: Vec<String> = map.keys().cloned().collect();
        let name = at.get(&names).clone();
        match edit {
            0 => { map.remove(&name); }
            1 => { map.insert(format!("{name}_bidx"), json!("kg1b:AAAAAA")); }
            2 => { map.insert(name, json!(byte)); }
            3 => {
                // A character of a stored string changed.
                if let Some(Value::String(s)) = map.get_mut(&name) && !s.is_empty() {
                    let i = at.index(s.len());
                    if i < s.len() && s.is_char_boundary(i) && s.is_char_boundary(i + 1) {
                        let c = if s.as_bytes()[i] == b'A' { "B" } else { "A" };
                        s.replace_range(i..i + 1, c);
                    }
                }
            }
            4 if pointers.len() >= 2 => {
                // Two protected values swapped.
                let (a, b) = (&pointers[0], &pointers[at.index(pointers.len() - 1) + 1]);
                let va = encrypted.pointer(a).cloned().unwrap();
                let vb = encrypted.pointer(b).cloned().unwrap();
                *encrypted.pointer_mut(a).unwrap() = vb;
                *encrypted.pointer_mut(b).unwrap() = va;
            }
            5 => { map.insert("allergies".into(), json!(["kg1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"])); }
            6 => { map.insert("_kg".into(), json!(byte)); }
            _ => { map.insert("notes".into(), json!(null)); }
        }
        let text = write(&encrypted, style);
        decrypts_alike(&mut ws, &keys, &text)?;
    }
}

/// The text path really runs for ordinary records: it keeps members in
/// the order they came (the tree path writes them sorted), and the
/// result is the tree path's.
#[test]
fn ordinary_records_take_the_text_path() {
    let keys = TenantKeys::random("onc");
    let mut ws = TextWorkspace::default();
    let text = r#"{"zeta": 1, "ssn": "123-45-6789", "email": " Jane.Roe@Example.org", "allergies": ["latex", {"a": 1}], "mrn": "MRN-1", "patient_id": "P-42", "age": 51}"#;
    let encrypted = text_encrypt(&mut ws, &keys, text).unwrap();
    assert!(encrypted.starts_with(r#"{"zeta":1,"ssn":"kg1:"#), "{encrypted}");
    let email_at = encrypted.find(r#""email":"kg1:"#).unwrap();
    let sibling_at = encrypted.find(r#""email_bidx":"kg1b:"#).unwrap();
    assert!(email_at < sibling_at && encrypted.ends_with("\"}"), "{encrypted}");
    assert!(encrypted.contains(r#""_kg":"kg1h:"#));

    let decrypted = text_decrypt(&mut ws, &keys, &encrypted, &reveal).unwrap();
    let mut expected = serde_json::from_str::<Value>(text).unwrap();
    expected["patient_id"] =
        serde_json::from_str::<Value>(&encrypted).unwrap()["patient_id"].clone();
    assert_eq!(decrypted.0, expected);
    let mut out = SecretBuf::default();
    let record = raw(&encrypted);
    let parsed = EncryptedText::parse(&record).unwrap();
    let dek = dek_for(&keys, parsed.header()).unwrap();
    let reports =
        ws.decrypt(parsed, &dek, &keys.schema, &keys.schema_keys, &reveal, &mut out).unwrap();
    assert_eq!(
        std::str::from_utf8(out.as_slice()).unwrap(),
        r#"{"zeta":1,"ssn":"123-45-6789","email":" Jane.Roe@Example.org","allergies":["latex",{"a":1}],"mrn":"MRN-1","patient_id":"kgp:"#
            .to_owned()
            + &encrypted[encrypted.find("kgp:").unwrap() + 4..encrypted.find("kgp:").unwrap() + 30]
            + r#"","age":51}"#
    );
    assert!(reports.iter().all(|r| r.outcome == FieldOutcome::Revealed));
    let pointers: Vec<&str> = reports.iter().map(|r| r.pointer.as_str()).collect();
    assert_eq!(pointers, ["/allergies/0", "/allergies/1", "/email", "/mrn", "/patient_id", "/ssn"]);
}

/// Records the text path leaves to the tree path still come out right,
/// written as the tree writes them.
#[test]
fn escaped_or_repeated_names_take_the_tree_path() {
    let keys = TenantKeys::random("onc");
    let mut ws = TextWorkspace::default();
    for text in [
        r#"{"zeta": 1, "s\u0073n": "123-45-6789"}"#,
        r#"{"zeta": 1, "ssn": "shadowed", "ssn": "123-45-6789"}"#,
    ] {
        let encrypted = text_encrypt(&mut ws, &keys, text).unwrap();
        assert!(encrypted.starts_with(r#"{"_kg":"#), "sorted, so the tree wrote it: {encrypted}");
        let value: Value = serde_json::from_str(&encrypted).unwrap();
        assert!(value["ssn"].as_str().unwrap().starts_with("kg1:"));
        assert_eq!(
            text_decrypt(&mut ws, &keys, &encrypted, &reveal).unwrap().0,
            json!({"zeta": 1, "ssn": "123-45-6789"})
        );
    }
}

/// A number no `f64` holds is valid JSON text: the text path passes it
/// through where nothing reads it, and a record that needs a tree says
/// what it cannot read.
#[test]
fn numbers_out_of_range_pass_through_or_are_named() {
    let keys = TenantKeys::random("onc");
    let mut ws = TextWorkspace::default();
    let passed = text_encrypt(&mut ws, &keys, r#"{"age": 1e400, "ssn": "1"}"#).unwrap();
    assert!(passed.starts_with(r#"{"age":1e400,"ssn":"kg1:"#), "{passed}");
    for text in [r#"{"ssn": 1e400}"#, r#"{"age": 1e400, "s\u0073n": "1"}"#] {
        let refused = text_encrypt(&mut ws, &keys, text).unwrap_err();
        assert!(refused.starts_with("the record has a value that cannot be read"), "{refused}");
        assert!(refused.contains("number out of range"), "{refused}");
    }
}

/// A parsed record's `Debug` shows its header, never the record: the
/// members a schema does not protect are in clear.
#[test]
fn debug_shows_the_header_only() {
    let keys = TenantKeys::random("onc");
    let mut ws = TextWorkspace::default();
    for plain in [r#"{"name": "Jane Roe", "ssn": "1"}"#, r#"{"n\u0061me": "Jane Roe", "ssn": "1"}"#]
    {
        let encrypted = text_encrypt(&mut ws, &keys, plain).unwrap();
        let record = raw(&encrypted);
        let shown = format!("{:?}", EncryptedText::parse(&record).unwrap());
        assert!(shown.contains("RecordHeader") && shown.contains("onc"), "{shown}");
        assert!(!shown.contains("Jane") && !shown.contains("kg1:"), "{shown}");
    }
}

/// The pre-check refuses a root `_kg` member however it is written, and
/// only that: `_kg` in a value or deeper down, or an escape elsewhere,
/// does not make a record unencryptable.
#[test]
fn the_pre_check_finds_a_root_header_however_it_is_written() {
    let encryptable = [
        r#"{"a": 1}"#,
        r#" {}"#,
        r#"{"note": "_kg", "weight_kg": 70}"#,
        r#"{"a": {"_kg": 1}, "b": [{"_kg": 2}]}"#,
        r#"{"a": "tab\there", "b": "x"}"#,
        r#"{"\u0061": "_kg"}"#,
    ];
    for text in encryptable {
        assert!(check_encryptable(&raw(text)).is_ok(), "{text}");
    }
    let encrypted = [
        r#"{"_kg": "kg1h:x"}"#,
        r#"{"a": 1, "_kg": 2}"#,
        r#"{"\u005fkg": 1}"#,
        r#"{"_\u006bg": 1, "a": "b"}"#,
        r#"{"a": "\n", "_kg": {}}"#,
    ];
    for text in encrypted {
        assert!(
            matches!(check_encryptable(&raw(text)), Err(RecordError::AlreadyEncrypted)),
            "{text}"
        );
    }
    for text in [r#"[{"a": 1}]"#, r#""_kg""#, "3", "null"] {
        assert!(matches!(check_encryptable(&raw(text)), Err(RecordError::NotAnObject)), "{text}");
    }
}

/// A header found at the end that is not the record's only `_kg` member
/// is not trusted: decrypt and rewrap go through the tree (which writes
/// members sorted and keeps the last of repeated ones).
#[test]
fn a_shadowed_header_takes_the_tree_path() {
    let keys = TenantKeys::random("onc");
    let mut ws = TextWorkspace::default();
    let encrypted = text_encrypt(&mut ws, &keys, r#"{"b": 2, "ssn": "1", "a": 1}"#).unwrap();
    let shadowed = encrypted.replacen('{', r#"{"_kg":"kg1h:AAAA","#, 1);
    let record = raw(&shadowed);
    let parsed = EncryptedText::parse(&record).unwrap();
    let dek = dek_for(&keys, parsed.header()).unwrap();
    let mut out = SecretBuf::default();
    ws.decrypt(parsed, &dek, &keys.schema, &keys.schema_keys, &reveal, &mut out).unwrap();
    assert_eq!(std::str::from_utf8(out.as_slice()).unwrap(), r#"{"a":1,"b":2,"ssn":"1"}"#);

    let wrapped = kms_core::WrappedDek::from_slice(&[7; 60]).unwrap();
    let mut out = SecretBuf::default();
    EncryptedText::parse(&record).unwrap().write_rewrapped(9, wrapped, &mut out).unwrap();
    let moved = std::str::from_utf8(out.as_slice()).unwrap();
    assert!(moved.starts_with(r#"{"_kg":"kg1h:"#), "sorted, so the tree wrote it: {moved}");
    assert_eq!(moved.matches("_kg").count(), 1, "{moved}");
}

/// A rewrap changes the header's key part only, in place.
#[test]
fn rewrap_replaces_only_the_header() {
    let keys = TenantKeys::random("onc");
    let mut ws = TextWorkspace::default();
    let encrypted = text_encrypt(&mut ws, &keys, r#"{"b": 2, "ssn": "1", "a": 1}"#).unwrap();
    let record = raw(&encrypted);
    let parsed = EncryptedText::parse(&record).unwrap();
    let header = parsed.header().clone();
    let wrapped = kms_core::WrappedDek::from_slice(&[7; 60]).unwrap();
    let mut out = SecretBuf::default();
    parsed.write_rewrapped(9, wrapped, &mut out).unwrap();
    let moved = std::str::from_utf8(out.as_slice()).unwrap();
    let new_header = header.with_key_part(9, wrapped).encode();
    assert_eq!(moved, encrypted.replace(&header.encode(), &new_header));
    assert_ne!(moved, encrypted);

    // A record the tree wrote (members sorted, `_kg` first, as stored
    // before the text path) is rewrapped in place too.
    let sorted =
        serde_json::to_string(&tree_encrypt(&keys, r#"{"b": 2, "ssn": "1"}"#).unwrap()).unwrap();
    assert!(sorted.starts_with(r#"{"_kg":"#), "{sorted}");
    let record = raw(&sorted);
    let parsed = EncryptedText::parse(&record).unwrap();
    let header = parsed.header().clone();
    let mut out = SecretBuf::default();
    parsed.write_rewrapped(9, wrapped, &mut out).unwrap();
    let new_header = header.with_key_part(9, wrapped).encode();
    assert_eq!(out.as_slice(), sorted.replace(&header.encode(), &new_header).as_bytes());
}

/// One workspace serves records of any shape in turn: a record with fewer
/// protected fields than the last, one the tree path decrypts (a member
/// name with an escape), one that fails and a one-field record each get
/// exactly their own reports.
#[test]
fn a_workspace_reports_each_record_alone_whatever_came_before() {
    let keys = TenantKeys::random("onc");
    let mut ws = TextWorkspace::default();
    let texts = [
        r#"{"ssn": "1", "email": "a@b.c", "allergies": ["x", "y", "z"], "mrn": "M", "patient_id": "P"}"#,
        r#"{"ssn": "2", "mrn": "M2"}"#,
        r#"{"zeta": 1, "s\u0073n": "3", "allergies": ["w"]}"#,
        r#"{"allergies": ["a", "b"], "email": "c@d.e"}"#,
        r#"{"ssn": "4"}"#,
    ];
    let encrypted: Vec<String> =
        texts.iter().map(|text| text_encrypt(&mut ws, &keys, text).unwrap()).collect();
    let mut tampered = encrypted[0].clone();
    let at = tampered.find(r#""ssn":"kg1:"#).unwrap() + r#""ssn":"kg1:"#.len();
    tampered.replace_range(at..at + 1, if &tampered[at..=at] == "A" { "B" } else { "A" });
    let escaped = encrypted[1].replacen(r#""mrn":"#, r#""m\u0072n":"#, 1);
    assert_ne!(escaped, encrypted[1]);
    let mut sequence = encrypted.clone();
    sequence.insert(2, tampered);
    sequence.insert(1, escaped);
    for text in sequence.iter().chain(encrypted.iter().rev()) {
        for (name, policy) in policies() {
            let ours = text_decrypt(&mut ws, &keys, text, policy);
            assert_eq!(ours, tree_decrypt(&keys, text, policy), "policy {name}: {text}");
        }
    }
    let last = text_decrypt(&mut ws, &keys, &encrypted[4], &reveal).unwrap();
    assert_eq!(last.1.len(), 1, "{:?}", last.1);
    assert_eq!(last.1[0].pointer, "/ssn");
}

/// A schema with more paths through one object than a walk keeps on the
/// stack still takes the text path, and agrees with the tree path.
#[test]
fn a_wide_schema_takes_the_text_path_too() {
    use kms_core::schema::SchemaSet;
    let mut toml = String::from("[[schema]]\nname = \"wide\"\nversion = 1\nfields = [\n");
    for i in 0..40 {
        let mode = match i % 4 {
            0 => "mode = \"randomized\"",
            1 => "mode = \"deterministic\"",
            2 => "mode = \"blind_index\", bits = 32",
            _ => "mode = \"pseudonym\"",
        };
        toml.push_str(&format!("  {{ path = \"/f{i:02}\", {mode}, class = \"c{}\" }},\n", i % 3));
    }
    toml.push_str("]\n");
    let schema =
        (**SchemaSet::from_toml(&toml, "wide.toml").unwrap().latest("wide").unwrap()).clone();
    let mut keys = TenantKeys::random("onc");
    keys.schema_keys =
        kms_core::record::SchemaKeys::derive(&keys.index_root, &keys.tenant, &schema);
    keys.schema = schema;
    // Members in reverse order: the tree path would write them sorted.
    let members: Vec<String> =
        (0..40).rev().map(|i| format!("\"f{i:02}\": \"value {i}\"")).collect();
    let text = format!("{{\"plain\": true, {}}}", members.join(", "));
    let mut ws = TextWorkspace::default();
    let encrypted = text_encrypt(&mut ws, &keys, &text).unwrap();
    assert!(encrypted.starts_with(r#"{"plain":true,"f39":"kgp:"#), "{encrypted}");
    assert!(encrypted.contains(r#""f38":"kg1:"#) && encrypted.contains(r#""f38_bidx":"kg1b:"#));
    for (name, policy) in policies() {
        let ours = text_decrypt(&mut ws, &keys, &encrypted, policy);
        assert_eq!(ours, tree_decrypt(&keys, &encrypted, policy), "policy {name}");
    }
    let (record, reports) = text_decrypt(&mut ws, &keys, &encrypted, &reveal).unwrap();
    assert_eq!(reports.len(), 40);
    assert_eq!(record["f38"], "value 38");
    assert!(record.get("f38_bidx").is_none(), "the checked sibling is dropped: {record}");
    let plain: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(record["f00"], plain["f00"]);
    // Decrypted by the text path too: the members keep their order.
    let raw_record = raw(&encrypted);
    let parsed = EncryptedText::parse(&raw_record).unwrap();
    let dek = dek_for(&keys, parsed.header()).unwrap();
    let mut out = SecretBuf::default();
    ws.decrypt(parsed, &dek, &keys.schema, &keys.schema_keys, &reveal, &mut out).unwrap();
    let written = std::str::from_utf8(out.as_slice()).unwrap();
    assert!(written.starts_with(r#"{"plain":true,"f39":"kgp:"#), "{written}");
    assert!(written.contains(r#""f38":"value 38","f37":"#), "{written}");
}

/// A randomized field's ciphertext tells its value's length only to 16
/// bytes: `true` and `false`, `"M"` and `"unknown"`, `7` and `1234` are not
/// told apart by their tokens, by either path. Both paths open what either
/// wrote, and the text path still writes the value as the tree would.
#[test]
fn short_randomized_values_are_not_told_apart_by_length() {
    let keys = TenantKeys::new("onc", common::key(1), common::key(2));
    let mut ws = TextWorkspace::default();
    let token_len =
        |record: &Value, pointer: &str| record.pointer(pointer).unwrap().as_str().unwrap().len();
    let mut lengths = std::collections::BTreeSet::new();
    for value in [
        json!(true),
        json!(false),
        json!("M"),
        json!("unknown"),
        json!(7),
        json!(1234),
        json!(null),
        json!([1, 2]),
    ] {
        let plain = json!({"ssn": value, "notes": value});
        let text = serde_json::to_string(&plain).unwrap();
        let by_text: Value =
            serde_json::from_str(&text_encrypt(&mut ws, &keys, &text).unwrap()).unwrap();
        let by_tree = tree_encrypt(&keys, &text).unwrap();
        for record in [&by_text, &by_tree] {
            lengths.insert(token_len(record, "/ssn"));
            lengths.insert(token_len(record, "/notes"));
            let written = serde_json::to_string(record).unwrap();
            let (opened, _) = text_decrypt(&mut ws, &keys, &written, &reveal).unwrap();
            assert_eq!(opened, plain, "text path");
            assert_eq!(tree_decrypt(&keys, &written, &reveal).unwrap().0, plain, "tree path");
        }
    }
    assert_eq!(lengths.len(), 1, "token lengths {lengths:?}");
}
