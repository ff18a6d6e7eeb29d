//! The bodies of the fuzz targets, one function per target (the files in
//! `fuzz_targets/` are one-liners calling these). The main workspace's
//! `tests/tests/fuzz_regressions.rs` includes this file to replay every
//! seed and every saved crash under `cargo test`, so it may depend only on
//! crates that test crate has: kms-core, gateway, hsm-adapters and
//! keygate-sdk (each with feature `fuzzing`) and serde_json.

use kms_core::audit::{
    Anchor, AuditChain, AuditEvent, AuditSigner, AuditVerifyingKey, ChainVerifier, Outcome,
    verify_chain,
};
use kms_core::crypto::Aead;
use kms_core::record::{
    Disclosure, EncryptedRecord, EncryptedText, HEADER_PREFIX, RecordHeader, SchemaKeys,
    TextWorkspace,
};
use kms_core::schema::FieldSpec;
use kms_core::schema::SchemaSet;
use kms_core::store::{AuditRow, CheckpointRow};
use kms_core::{DekBinding, Key256, RecordKeyId, SecretBuf, TenantId, unwrap_dek};

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
    ("audit_chain", audit_chain),
    ("sdk_answer", sdk_answer),
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

/// The sidecar's answers as the Rust SDK decodes them; see
/// `keygate_sdk::fuzzing::answers`.
pub fn sdk_answer(data: &[u8]) {
    keygate_sdk::fuzzing::answers(data);
}

/// A real audit chain of [`AUDIT_INSTANCE`] with signed checkpoints, and the
/// SEC1 public key that verifies them; made once.
fn audit_fixture() -> &'static (Vec<AuditRow>, Vec<CheckpointRow>, Vec<u8>) {
    static FIXTURE: std::sync::OnceLock<(Vec<AuditRow>, Vec<CheckpointRow>, Vec<u8>)> =
        std::sync::OnceLock::new();
    FIXTURE.get_or_init(|| {
        // A fixed key, so that a saved crash replays against the same chain.
        let signer = AuditSigner::from_key(&Key256::from_array(&mut [0x5a; 32]))
            .expect("a valid P-256 scalar");
        let tenant = TenantId::new("onc-centre").expect("a valid tenant name");
        let mut chain = AuditChain::new(AUDIT_INSTANCE);
        let mut rows = Vec::new();
        let mut checkpoints = Vec::new();
        for i in 1..=AUDIT_EVENTS {
            let mut event = AuditEvent::new(
                1_700_000_000_000 + i,
                "spiffe://ks/sidecar",
                "dek.issue",
                Outcome::Ok,
            );
            if i % 2 == 0 {
                let id = RecordKeyId::from_hex(&format!("{i:032x}")).expect("hex of 16 bytes");
                event =
                    event.with_tenant(tenant.clone()).with_kek_version(2).with_record_key_ids([id]);
            }
            if i % 3 == 0 {
                event = event.with_outcome(Outcome::Denied).with_detail("rule", "need-to-know");
            }
            rows.push(chain.seal(event));
            if i % AUDIT_CHECKPOINT_EVERY == 0 {
                let (seq, hash) = chain.head();
                checkpoints.push(
                    signer
                        .sign_checkpoint(AUDIT_INSTANCE, seq, &hash, 1_700_000_000_500 + i)
                        .expect("signs"),
                );
            }
        }
        (rows, checkpoints, signer.public_key_sec1())
    })
}

const AUDIT_INSTANCE: &str = "ks-0";
const AUDIT_EVENTS: i64 = 10;
const AUDIT_CHECKPOINT_EVERY: i64 = 3;

/// Reads the input a byte at a time, as edits to make.
struct Edits<'a>(&'a [u8]);

impl Edits<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (&first, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(first)
    }
}

/// Inserts (odd `how`) or removes (even `how`) one character of `text`.
fn edit_text(text: &mut String, at: u8, how: u8) {
    let chars = text.chars().count();
    if how % 2 == 1 || chars == 0 {
        let at =
            text.char_indices().nth(usize::from(at) % (chars + 1)).map_or(text.len(), |(i, _)| i);
        text.insert(at, char::from(how));
    } else {
        let (at, _) = text.char_indices().nth(usize::from(at) % chars).unwrap_or((0, ' '));
        text.remove(at);
    }
}

/// Changes one byte of `bytes` (or adds one, if it is empty).
fn edit_bytes(bytes: &mut Vec<u8>, at: u8, how: u8) {
    match bytes.len() {
        0 => bytes.push(how),
        len => {
            let at = usize::from(at) % len;
            if how == 0 {
                bytes.remove(at);
            } else if let Some(b) = bytes.get_mut(at) {
                *b ^= how;
            }
        }
    }
}

fn edit_row(row: &mut AuditRow, field: u8, at: u8, how: u8) {
    let delta = i64::from(how as i8);
    match field % 11 {
        0 => edit_text(&mut row.instance, at, how),
        1 => row.seq = row.seq.wrapping_add(delta),
        2 => row.ts_ms = row.ts_ms.wrapping_add(delta),
        3 => edit_text(&mut row.actor, at, how),
        4 => edit_text(&mut row.action, at, how),
        5 => match &mut row.tenant {
            Some(tenant) if how != 0 => edit_text(tenant, at, how),
            Some(_) => row.tenant = None,
            None => row.tenant = Some(String::new()),
        },
        6 => {
            row.kek_version =
                row.kek_version.map_or(Some(delta), |v| (how != 0).then(|| v.wrapping_add(delta)))
        }
        7 => edit_text(&mut row.record_key_ids, at, how),
        8 => edit_text(&mut row.outcome, at, how),
        9 => edit_text(&mut row.detail, at, how),
        _ => edit_bytes(
            if how.is_multiple_of(2) { &mut row.prev_hash } else { &mut row.hash },
            at,
            how,
        ),
    }
}

fn edit_checkpoint(checkpoint: &mut CheckpointRow, field: u8, at: u8, how: u8) {
    let delta = i64::from(how as i8);
    match field % 5 {
        0 => edit_text(&mut checkpoint.instance, at, how),
        1 => checkpoint.seq = checkpoint.seq.wrapping_add(delta),
        2 => edit_bytes(&mut checkpoint.hash, at, how),
        3 => edit_bytes(&mut checkpoint.signature, at, how),
        _ => checkpoint.ts_ms = checkpoint.ts_ms.wrapping_add(delta),
    }
}

/// Moves one element of `items`: removes it, repeats it, swaps it with
/// another, or cuts the list there.
fn edit_list<T: Clone>(items: &mut Vec<T>, what: u8, at: u8, other: u8) {
    if items.is_empty() {
        return;
    }
    let at = usize::from(at) % items.len();
    match what % 4 {
        0 => drop(items.remove(at)),
        1 => {
            if let Some(item) = items.get(at).cloned() {
                items.insert(at, item);
            }
        }
        2 => {
            let other = usize::from(other) % items.len();
            items.swap(at, other);
        }
        _ => items.truncate(at),
    }
}

/// Audit chain verification, on a real chain the input edits (a field of
/// a row or a checkpoint changed; rows or checkpoints dropped, repeated,
/// swapped or cut). Whatever verifies is the original's as far as its
/// checkpoints vouch: the events up to the last checkpoint given are the
/// original chain's, and each checkpoint vouches for what an original one
/// does, and was checked. (Dropped checkpoints, and events after the last
/// one given, are what verification cannot see; the report's unsigned
/// tail counts the latter.) What is left of the original (a prefix of its
/// events, some of its checkpoints in order up to there) always verifies.
/// Verifying page by page agrees with one call, and verifying from a
/// checkpoint as an anchor holds to the same rules.
pub fn audit_chain(data: &[u8]) {
    let (original_rows, original_checkpoints, public_key) = audit_fixture();
    let mut rows = original_rows.clone();
    let mut checkpoints = original_checkpoints.clone();
    let mut edits = Edits(data);
    let page = usize::from(edits.byte().unwrap_or(0) % 7) + 1;
    let anchor = usize::from(edits.byte().unwrap_or(0));
    while let (Some(op), Some(field), Some(at), Some(how)) =
        (edits.byte(), edits.byte(), edits.byte(), edits.byte())
    {
        match op % 4 {
            0 => {
                let at_row = usize::from(field) % rows.len().max(1);
                if let Some(row) = rows.get_mut(at_row) {
                    edit_row(row, field / 16, at, how);
                }
            }
            1 => edit_list(&mut rows, field, at, how),
            2 => {
                let at_checkpoint = usize::from(field) % checkpoints.len().max(1);
                if let Some(checkpoint) = checkpoints.get_mut(at_checkpoint) {
                    edit_checkpoint(checkpoint, field / 16, at, how);
                }
            }
            _ => edit_list(&mut checkpoints, field, at, how),
        }
    }
    // What a checkpoint vouches for. (Its signature is not unique: ECDSA
    // accepts `s` and `n − s` alike, over the same contents.)
    let vouches = |c: &CheckpointRow| (c.instance.clone(), c.seq, c.hash.clone(), c.ts_ms);
    let is_original_checkpoint =
        |c: &CheckpointRow| original_checkpoints.iter().any(|o| vouches(o) == vouches(c));
    // Events after the last checkpoint given are vouched for by nothing:
    // rewritten with their hashes recomputed, they verify (the report's
    // unsigned tail counts them). Those up to it must be the original's.
    let signed_part = |rows: &[AuditRow], from: usize, last_checkpoint: Option<i64>| {
        let signed = last_checkpoint.map_or(0, |seq| usize::try_from(seq).unwrap_or(0));
        rows.len().min(signed.saturating_sub(from))
    };
    let is_original_prefix =
        |rows: &[AuditRow], from: usize| original_rows.get(from..from + rows.len()) == Some(rows);

    // What verification cannot tell from the original: its events up to
    // some point, and some of its checkpoints (in order, signatures and
    // all) up to there.
    let is_untouched = |rows: &[AuditRow], from: usize, checkpoints: &[CheckpointRow]| {
        let end = i64::try_from(from + rows.len()).unwrap_or(i64::MAX);
        is_original_prefix(rows, from)
            && checkpoints.windows(2).all(|pair| matches!(pair, [a, b] if a.seq < b.seq))
            && checkpoints.iter().all(|c| original_checkpoints.contains(c) && c.seq <= end)
    };

    let whole = verify_chain(AUDIT_INSTANCE, &rows, &checkpoints, public_key);
    match &whole {
        Ok(report) => {
            let signed = signed_part(&rows, 0, report.last_checkpoint);
            let signed_rows = rows.get(..signed).unwrap_or_default();
            assert!(is_original_prefix(signed_rows, 0), "an edited chain verified: {report:?}");
            assert!(
                checkpoints.iter().all(is_original_checkpoint),
                "an edited checkpoint verified"
            );
            assert_eq!(report.events, rows.len() as u64);
            assert_eq!(report.checkpoints, checkpoints.len() as u64, "a checkpoint went unchecked");
            assert_eq!(report.last_checkpoint, checkpoints.last().map(|c| c.seq));
        }
        Err(broken) => {
            assert!(!is_untouched(&rows, 0, &checkpoints), "the original chain failed: {broken:?}");
        }
    }

    // Page by page, each checkpoint given before the page with its event.
    let key = AuditVerifyingKey::from_sec1(public_key).expect("the fixture's key");
    let mut verifier = ChainVerifier::new(AUDIT_INSTANCE, key.clone());
    let mut next = 0;
    let mut streamed = Ok(());
    for chunk in rows.chunks(page) {
        let upto = chunk.last().map_or(0, |row| row.seq);
        while let Some(checkpoint) = checkpoints.get(next).filter(|c| c.seq <= upto) {
            streamed = streamed.and_then(|()| verifier.push_checkpoint(checkpoint));
            next += 1;
        }
        streamed = streamed.and_then(|()| verifier.push_rows(chunk));
    }
    let rest = checkpoints.get(next..).unwrap_or_default();
    let streamed =
        streamed.and_then(|()| verifier.push_checkpoints(rest)).and_then(|()| verifier.finish());
    assert_eq!(
        streamed.is_ok(),
        whole.is_ok(),
        "page by page: {streamed:?}, in one call: {whole:?}"
    );
    if let (Ok(streamed), Ok(whole)) = (&streamed, &whole) {
        assert_eq!(streamed, whole);
    }

    // Through an anchor of the original (an event's position and hash, kept
    // elsewhere): whatever verifies has the original's events up to it,
    // signed or not; what is left of the original and reaches it verifies;
    // an anchor with another hash there never holds.
    let at = anchor % original_rows.len().max(1);
    if let Some(event) = original_rows.get(at) {
        let hash: [u8; 32] = event.hash.as_slice().try_into().expect("the fixture's hashes");
        let held = Anchor { seq: event.seq, hash };
        let through = |anchor: Anchor| {
            let mut verifier = ChainVerifier::new(AUDIT_INSTANCE, key.clone());
            verifier
                .expect_anchors(&[anchor])
                .and_then(|()| verifier.push_checkpoints(&checkpoints))
                .and_then(|()| verifier.push_rows(&rows))
                .and_then(|()| verifier.finish())
        };
        let reaches = rows.len() > at;
        match through(held) {
            Ok(report) => {
                assert!(reaches, "verified through an anchor past its end: {report:?}");
                assert!(is_original_prefix(rows.get(..=at).unwrap_or_default(), 0), "{report:?}");
                assert_eq!(report.anchors, 1);
            }
            Err(broken) => {
                let untouched = reaches && is_untouched(&rows, 0, &checkpoints);
                assert!(!untouched, "the original chain failed through its anchor: {broken:?}");
            }
        }
        let mut forged = held;
        let flip = usize::from(data.last().copied().unwrap_or(0)) % forged.hash.len();
        if let Some(byte) = forged.hash.get_mut(flip) {
            *byte ^= 1;
        }
        assert!(through(forged).is_err(), "a chain passed through a forged anchor");
    }

    // From a checkpoint, verifying only the events after it.
    let Some(anchor) = checkpoints.get(anchor % (checkpoints.len() + 1)) else { return };
    let anchored = ChainVerifier::from_checkpoint(key, anchor);
    let Ok(mut verifier) = anchored else {
        assert!(
            !original_checkpoints.contains(anchor),
            "an original anchor was refused: {anchored:?}"
        );
        return;
    };
    let from = usize::try_from(anchor.seq).unwrap_or(usize::MAX).min(rows.len());
    let after: Vec<CheckpointRow> =
        checkpoints.iter().filter(|c| c.seq > anchor.seq).cloned().collect();
    let tail = rows.get(from..).unwrap_or_default();
    let result = verifier
        .push_checkpoints(&after)
        .and_then(|()| verifier.push_rows(tail))
        .and_then(|()| verifier.finish());
    match result {
        Ok(report) => {
            assert!(is_original_checkpoint(anchor), "an edited anchor verified");
            let signed = signed_part(tail, from, report.last_checkpoint);
            assert!(
                is_original_prefix(tail.get(..signed).unwrap_or_default(), from),
                "edited events after an anchor verified: {report:?}"
            );
            assert!(after.iter().all(is_original_checkpoint), "an edited checkpoint verified");
        }
        Err(broken) => {
            let original = original_checkpoints.contains(anchor)
                && usize::try_from(anchor.seq).is_ok_and(|seq| seq == from)
                && is_untouched(tail, from, &after);
            assert!(!original, "the original chain failed after an anchor: {broken:?}");
        }
    }
}
