//! Entry points for the fuzz targets (`fuzz/`) and their regression
//! tests: the policy parser; every request body of the key service and the
//! sidecar, deserialized and validated the way the handlers do; the binary
//! exchanges, the `Accept` header that chooses one, and the key service's
//! JSON answers as the sidecar reads them.
//! Compiled only for this crate's tests or with the `fuzzing` feature
//! (which `fuzz/` and the `tests/` crate enable); never part of a release
//! build. Each function must never panic on any input; asserts
//! inside are properties, and a failed one is a bug.

use kms_core::audit::Outcome;
use kms_core::record::{
    Disclosure, EncryptedRecord, EncryptedText, RecordError, SchemaKeys, TextWorkspace,
    check_encryptable, encrypt_record, index_token, pseudonym,
};
use kms_core::schema::{FieldSpec, SchemaSet};
use kms_core::{IssuedDek, Key256, PathPattern, RecordKeyId, SecretBuf, TenantId, WrappedDek};
use serde_json::Value;
use serde_json::value::RawValue;

use crate::config::{RootConfig, TrustedMasters};
use crate::extract::parse;
use crate::policy::{EffectiveGrants, Policy};
use crate::server::api as ks;
use crate::server::{MasterTrust, recorded_settings};
use crate::sidecar::api as sc;

/// The policy file parser: any text gives a policy or an error; a policy's
/// effective grants survive a JSON round trip (what a sidecar receives).
pub fn policy(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(policy) = Policy::from_toml(text, "fuzz.toml") else { return };
    for grant in policy.grants() {
        let effective = policy.effective(grant.identity.as_str());
        let json = serde_json::to_string(&effective).unwrap_or_default();
        let back: Result<EffectiveGrants, _> = serde_json::from_str(&json);
        assert!(back.is_ok_and(|b| b == effective), "effective grants round trip");
    }
}

/// Every key service request body (and a tenant path segment).
pub fn key_service_request(data: &[u8]) {
    const DEPTH: usize = 64;
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = TenantId::new(text);
    }
    let _ = parse::<ks::CreateTenant>(data, DEPTH);
    let _ = parse::<ks::ChangeState>(data, DEPTH);
    let _ = parse::<ks::IssueRequest>(data, DEPTH);
    let _ = parse::<ks::BatchRequest>(data, DEPTH);
    if let Ok(request) = parse::<ks::DerivedRequest>(data, DEPTH) {
        for field in &request.fields {
            let _ = PathPattern::parse(&field.path);
        }
    }
    if let Ok(request) = parse::<ks::ReportedEvents>(data, DEPTH) {
        for event in &request.events {
            let _ = event.outcome.parse::<Outcome>();
        }
    }
    let _ = parse::<ks::AutoRotate>(data, DEPTH);
    let _ = parse::<ks::ShredRequest>(data, DEPTH);
    let _ = parse::<ks::DecideRequest>(data, DEPTH);
    if let Ok(request) = parse::<ks::MasterRotateRequest>(data, DEPTH) {
        master_rotation_target(&request.to);
    }
    if let Ok(request) = parse::<ks::VerifyRequest>(data, DEPTH)
        && let Ok(by_instance) = request.anchors_by_instance()
    {
        // Every anchor given is checked, under its own instance.
        let checked: usize = by_instance.values().map(Vec::len).sum();
        assert_eq!(checked, request.anchors.len(), "anchors lost");
        for entry in &request.anchors {
            let hash = data_encoding::HEXLOWER.decode(entry.hash.as_bytes()).ok();
            let found = by_instance.get(&entry.instance).is_some_and(|anchors| {
                anchors
                    .iter()
                    .any(|a| a.seq == entry.seq && Some(a.hash.as_slice()) == hash.as_deref())
            });
            assert!(found, "anchor {} of {:?} checked as given", entry.seq, entry.instance);
        }
    }
}

/// A master rotation's target, checked as the handler checks it: the
/// settings the key service records read back, and the trust rule lets
/// through only the module, endpoint and AWS account the host configured.
fn master_rotation_target(to: &RootConfig) {
    const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
    const ENDPOINT: &str = "https://kms.example";
    const ACCOUNT: &str = "111122223333";
    let _ = to.check_timers();
    let _ = to.paths_are_absolute();
    if let Ok(recorded) = recorded_settings(to) {
        // What a replica reads back is what was recorded, field for field.
        let back = serde_json::from_str::<RootConfig>(&recorded).map(|c| serde_json::to_string(&c));
        assert!(
            matches!(back, Ok(Ok(ref again)) if *again == recorded),
            "recorded settings read back"
        );
    }
    let trusted = TrustedMasters {
        pkcs11_modules: vec![MODULE.into()],
        aws_kms_endpoints: vec![ENDPOINT.into()],
        aws_kms_accounts: vec![ACCOUNT.into()],
        keys: None,
    };
    let root = RootConfig::DevLocal {
        key_file: "/keys/root.key".into(),
        passphrase_file: None,
        create_if_missing: false,
    };
    let allowed = MasterTrust::new(&root, &trusted).refusal(to).is_none();
    match to {
        RootConfig::Pkcs11 { module, .. } => {
            assert_eq!(allowed, module == std::path::Path::new(MODULE), "module {module:?}");
        }
        RootConfig::AwsKms { endpoint_url, key_id, .. } => {
            let endpoint =
                endpoint_url.as_deref().is_none_or(|e| e.trim_end_matches('/') == ENDPOINT);
            let account = crate::config::arn_account(key_id).is_none_or(|a| a == ACCOUNT);
            assert_eq!(allowed, endpoint && account, "{endpoint_url:?} {key_id:?}");
        }
        RootConfig::DevLocal { .. } => assert!(allowed),
    }
}

/// The binary unwrap exchange: any bytes give a request or an error, and a
/// request writes back to the same bytes (one encoding per request); after
/// a first byte giving the item count, any bytes give an answer or an
/// error, and an answer writes back to the same bytes.
pub fn unwrap_binary(data: &[u8]) {
    use crate::unwrap_binary::{
        decode_answer, decode_request, encode_request, write_active_version, write_error, write_key,
    };
    if let Ok(request) = decode_request(data) {
        let again = encode_request(request.purpose.as_ref(), &request.items);
        assert_eq!(again, data, "a request has one encoding");
    }
    let Some((&count, answer)) = data.split_first() else { return };
    if let Ok((active, results)) = decode_answer(answer, usize::from(count)) {
        let mut again = SecretBuf::with_capacity(answer.len());
        write_active_version(&mut again, active);
        for result in &results {
            match result {
                Ok(key) => write_key(&mut again, key),
                Err(code) => write_error(&mut again, code),
            }
        }
        assert_eq!(again.as_slice(), answer, "an answer has one encoding");
    }
}

/// The binary issue answer as the sidecar reads it: after a first byte
/// giving the key count, any bytes give the keys or an error, and keys
/// write back to the same bytes.
pub fn issue_binary(data: &[u8]) {
    use crate::issue_binary::{CONTENT_TYPE, decode_answer, is_asked, write_answer};
    // The same bytes as `Accept` header lines: the binary form is chosen
    // only when named.
    let mut headers = axum::http::HeaderMap::new();
    for line in data.split(|b| *b == b'\n') {
        if let Ok(value) = axum::http::HeaderValue::from_bytes(line) {
            headers.append(axum::http::header::ACCEPT, value);
        }
    }
    if is_asked(&headers) {
        let named = data
            .to_ascii_lowercase()
            .windows(CONTENT_TYPE.len())
            .any(|w| w == CONTENT_TYPE.as_bytes());
        assert!(named, "the binary form chosen without being named");
    }
    let Some((&count, answer)) = data.split_first() else { return };
    if let Ok(keys) = decode_answer(answer, usize::from(count)) {
        let version = answer.first_chunk::<4>().map(|v| u32::from_be_bytes(*v));
        assert!(keys.iter().all(|k| Some(k.kek_version) == version), "one version for all");
        let again = write_answer(version.unwrap_or_default(), &keys);
        assert_eq!(again.as_slice(), answer, "an answer has one encoding");
    }
}

/// Every JSON answer of the key service (issued keys, unwrap and rewrap
/// results, derived keys) as the sidecar reads it: any bytes give an
/// answer or an error, and an issue answer holds exactly the keys asked.
pub fn ks_answer(data: &[u8]) {
    crate::sidecar::fuzz_answers(data);
}

/// Every sidecar request body, validated and then processed by the record
/// code with fixed keys and the sample `patient` schema: each record is
/// encrypted by the text path and by the tree path, which must agree (see
/// [`text_and_tree_agree`]).
pub fn sidecar_request(data: &[u8]) {
    const RECORDS: usize = 1_000;
    const DEPTH: usize = 64;
    let body_depth = DEPTH + 2;
    if let Ok(request) = parse::<sc::EncryptRequest<'_>>(data, body_depth)
        && let Ok((records, _)) =
            sc::one_or_many(request.record, request.records, RECORDS, DEPTH, usize::MAX)
    {
        let fixture = Fixture::new();
        let mut workspace = TextWorkspace::default();
        for record in records {
            text_and_tree_agree(&fixture, &mut workspace, record);
        }
    }
    for records in [
        parse::<sc::DecryptRequest<'_>>(data, body_depth).map(|r| (r.record, r.records)),
        parse::<sc::RewrapRequest<'_>>(data, body_depth).map(|r| (r.record, r.records)),
    ]
    .into_iter()
    .flatten()
    {
        if let Ok((records, _)) = sc::one_or_many(records.0, records.1, RECORDS, DEPTH, usize::MAX)
        {
            for record in records {
                let tree = tree_of(record).map(EncryptedRecord::parse);
                let text = EncryptedText::parse(record);
                match (tree, text) {
                    (Some(Ok(tree)), Ok(text)) => assert_eq!(tree.header(), text.header()),
                    (Some(Err(tree)), Err(text)) => assert_eq!(tree.to_string(), text.to_string()),
                    // No tree holds the record (a number beyond `f64`):
                    // the text path reads the header if it can, and
                    // otherwise says it cannot read the record.
                    (None, Ok(_) | Err(RecordError::Unreadable(_))) => {}
                    (tree, text) => unreachable!("headers differ: {tree:?} / {text:?}"),
                }
            }
        }
    }
    if let Ok(request) = parse::<sc::IndexRequest>(data, body_depth) {
        let fixture = Fixture::new();
        let _ = index_token(&fixture.schema(), &fixture.keys(), &request.path, request.value.get());
    }
    if let Ok(request) = parse::<sc::PseudonymRequest>(data, body_depth) {
        let _ = pseudonym(&Key256::from_array(&mut [9; 32]), request.value.get());
    }
}

fn tree_of(record: &RawValue) -> Option<Value> {
    serde_json::from_str(record.get()).ok()
}

/// The text path and the tree path encrypt `record` alike (the same error,
/// or records with the same header fields that decrypt to the same
/// record), and decrypt the result alike, revealing or masking all.
fn text_and_tree_agree(fixture: &Fixture, workspace: &mut TextWorkspace, record: &RawValue) {
    let (schema, keys) = (fixture.schema(), fixture.keys());
    let Some(value) = tree_of(record) else { return };
    let tree = encrypt_record(value, &fixture.tenant, &schema, &keys, fixture.dek());
    let mut out = SecretBuf::default();
    let text = workspace.encrypt(record, &fixture.tenant, &schema, &keys, fixture.dek(), &mut out);
    // The sidecar's pre-check refuses exactly what encryption refuses for
    // being encrypted already or not an object (and what no tree holds,
    // which returned above).
    let checked = check_encryptable(record).map_err(|e| e.to_string());
    if let Err(refused) = &checked {
        let tree = tree.as_ref().map_err(ToString::to_string).err();
        assert_eq!(tree.as_ref(), Some(refused), "the pre-check refused what encrypts");
    }
    let (tree, ()) = match (tree, text) {
        (Ok(tree), Ok(text)) => (tree, text),
        (Err(tree), Err(text)) => {
            assert_eq!(tree.to_string(), text.to_string(), "encrypt errors differ");
            if matches!(tree, RecordError::AlreadyEncrypted | RecordError::NotAnObject) {
                assert_eq!(checked, Err(tree.to_string()), "the pre-check let it through");
            }
            return;
        }
        (tree, text) => unreachable!("encrypt outcomes differ: {tree:?} / {text:?}"),
    };
    let text = String::from_utf8(out.as_slice().to_vec()).unwrap_or_default();
    let Ok(ours) = RawValue::from_string(text) else {
        unreachable!("the text path wrote something that is not JSON")
    };
    let dek = fixture.dek();
    let reveal = |_: &FieldSpec| Disclosure::Reveal;
    let mask = |_: &FieldSpec| Disclosure::Mask;
    for disclose in [&reveal as &dyn Fn(&FieldSpec) -> Disclosure, &mask] {
        let by_tree = |value: Value| {
            EncryptedRecord::parse(value)
                .and_then(|r| r.decrypt(dek.dek(), &schema, &keys, disclose))
                .map(|d| (d.record, d.fields))
                .map_err(|e| e.to_string())
        };
        let expected = by_tree(tree.clone());
        assert!(expected.is_ok(), "the tree path decrypts its own record");
        let Some(ours_tree) = tree_of(&ours) else { unreachable!("parsed once already") };
        assert_eq!(by_tree(ours_tree), expected, "text-encrypted record decrypts differently");
        let mut plain = SecretBuf::default();
        let by_text = EncryptedText::parse(&ours)
            .and_then(|r| workspace.decrypt(r, dek.dek(), &schema, &keys, disclose, &mut plain))
            .map_err(|e| e.to_string())
            .map(|fields| {
                let record = serde_json::from_slice::<Value>(plain.as_slice()).ok();
                (record, fields.to_vec())
            });
        let expected = expected.map(|(record, fields)| (Some(record), fields));
        assert_eq!(by_text, expected, "the text path decrypts differently");
    }
}

/// Fixed keys and the sample schema.
struct Fixture {
    tenant: TenantId,
    set: SchemaSet,
}

impl Fixture {
    fn new() -> Self {
        let tenant = TenantId::new("fuzz").unwrap_or_else(|_| unreachable!("a valid tenant id"));
        let set = SchemaSet::from_toml(crate::up::PATIENT_SCHEMA, "patient.toml")
            .unwrap_or_else(|e| unreachable!("the sample schema parses: {e}"));
        Self { tenant, set }
    }

    fn schema(&self) -> std::sync::Arc<kms_core::schema::Schema> {
        self.set.latest("patient").cloned().unwrap_or_else(|| unreachable!("patient schema"))
    }

    fn keys(&self) -> SchemaKeys {
        SchemaKeys::derive(&Key256::from_array(&mut [7; 32]), &self.tenant, &self.schema())
    }

    fn dek(&self) -> IssuedDek {
        let wrapped = WrappedDek::from_slice(&[3; 60]).unwrap_or_else(|| unreachable!("60 bytes"));
        IssuedDek::new(
            RecordKeyId::from_bytes([5; 16]),
            1,
            wrapped,
            Key256::from_array(&mut [8; 32]),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_points_take_valid_and_invalid_bodies() {
        for body in [
            &br#"{"tenant":"fuzz","schema":"patient","record":{"ssn":"1","allergies":["a"]}}"#[..],
            br#"{"records":[{"_kg":"kg1h:AAAA"}]}"#,
            br#"{"items":[{"record_key_id":"00","kek_version":1,"wrapped":"x"}]}"#,
            br#"{"events":[{"actor":"a","action":"b","tenant":"t","outcome":"ok","ts_ms":1}]}"#,
            b"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[",
            b"\xff\xfe",
            b"",
        ] {
            key_service_request(body);
            sidecar_request(body);
            policy(body);
        }
        policy(b"[[grant]]\nidentity = \"a\"\ntenants = [\"*\"]\nroles = [\"auditor\"]\n");
    }
}
