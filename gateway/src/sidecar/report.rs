//! The decrypt answer's `report`: one entry per record, written straight
//! into the answer as JSON text.
//!
//! The text is what serde_json writes for these types (members in
//! alphabetical order, as a JSON map would print them); the tests hold the
//! writer to serde's own output. Written by hand because serde's string
//! escaping, one call per pointer and class, was about 4 % of a batch
//! decrypt; nearly every string here needs no escape at all.

use std::io::Write;

use kms_core::{KekVersion, Name, RecordKeyId, SecretBuf, TenantId};

/// One record's report.
#[cfg_attr(test, derive(serde::Serialize))]
pub(super) struct RecordReport {
    pub(super) fields: Vec<FieldEntry>,
    pub(super) kek_version: KekVersion,
    pub(super) record_key_id: RecordKeyId,
    pub(super) schema: Name,
    pub(super) schema_version: u32,
    pub(super) stale_key_version: bool,
    pub(super) tenant: TenantId,
}

/// One protected field's entry.
#[cfg_attr(test, derive(serde::Serialize))]
pub(super) struct FieldEntry {
    pub(super) class: String,
    pub(super) outcome: &'static str,
    pub(super) pointer: String,
    #[cfg_attr(test, serde(skip_serializing_if = "Option::is_none"))]
    pub(super) reason: Option<String>,
}

/// Appends `reports` as a JSON array.
pub(super) fn write_reports(out: &mut SecretBuf, reports: &[RecordReport]) {
    out.extend_from_slice(b"[");
    for (i, r) in reports.iter().enumerate() {
        if i > 0 {
            out.extend_from_slice(b",");
        }
        out.extend_from_slice(b"{\"fields\":[");
        for (j, f) in r.fields.iter().enumerate() {
            if j > 0 {
                out.extend_from_slice(b",");
            }
            out.extend_from_slice(b"{\"class\":");
            string(out, &f.class);
            out.extend_from_slice(b",\"outcome\":");
            string(out, f.outcome);
            out.extend_from_slice(b",\"pointer\":");
            string(out, &f.pointer);
            if let Some(reason) = &f.reason {
                out.extend_from_slice(b",\"reason\":");
                string(out, reason);
            }
            out.extend_from_slice(b"}");
        }
        out.extend_from_slice(b"],\"kek_version\":");
        number(out, r.kek_version.into());
        out.extend_from_slice(b",\"record_key_id\":\"");
        out.extend_from_slice(r.record_key_id.hex_in(&mut [0; 2 * RecordKeyId::LEN]).as_bytes());
        out.extend_from_slice(b"\",\"schema\":");
        string(out, r.schema.as_str());
        out.extend_from_slice(b",\"schema_version\":");
        number(out, r.schema_version.into());
        out.extend_from_slice(if r.stale_key_version {
            b",\"stale_key_version\":true,\"tenant\":"
        } else {
            b",\"stale_key_version\":false,\"tenant\":"
        });
        string(out, r.tenant.as_str());
        out.extend_from_slice(b"}");
    }
    out.extend_from_slice(b"]");
}

/// A JSON string: as it is when nothing in it needs escaping (serde_json
/// escapes only `"`, `\` and control characters), else through serde_json.
fn string(out: &mut SecretBuf, s: &str) {
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.extend_from_slice(b"\"");
        out.extend_from_slice(s.as_bytes());
        out.extend_from_slice(b"\"");
    } else {
        // Writing a `str` into memory cannot fail.
        let _ = serde_json::to_writer(&mut *out, s);
    }
}

fn number(out: &mut SecretBuf, n: u64) {
    // Writing into memory cannot fail.
    let _ = write!(out, "{n}");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(
        class: &str,
        outcome: &'static str,
        pointer: &str,
        reason: Option<&str>,
    ) -> FieldEntry {
        FieldEntry {
            class: class.into(),
            outcome,
            pointer: pointer.into(),
            reason: reason.map(Into::into),
        }
    }

    fn written(reports: &[RecordReport]) -> String {
        let mut out = SecretBuf::default();
        write_reports(&mut out, reports);
        String::from_utf8(out.as_slice().to_vec()).unwrap()
    }

    #[test]
    fn the_text_is_serde_json_s() {
        let odd = ["/a\"b", "/back\\slash", "/tab\there", "/nl\n", "/\u{1}", "/é/✓", "/~1x", ""];
        let mut reports = Vec::new();
        for (i, pointer) in odd.iter().enumerate() {
            let i = u32::try_from(i).unwrap();
            reports.push(RecordReport {
                fields: vec![
                    entry("phi.clinical", "revealed", pointer, None),
                    entry(pointer, "withheld", "/x", Some("the policy does not grant \"x\"")),
                    entry("pii", "masked", "/m", Some(pointer)),
                ],
                kek_version: i + 1,
                record_key_id: RecordKeyId::from_bytes([u8::try_from(i).unwrap(); 16]),
                schema: Name::new("patient").unwrap(),
                schema_version: i * 1000,
                stale_key_version: i % 2 == 0,
                tenant: TenantId::new("onc").unwrap(),
            });
        }
        reports.push(RecordReport {
            fields: Vec::new(),
            kek_version: u32::MAX,
            record_key_id: RecordKeyId::from_bytes([0xab; 16]),
            schema: Name::new("s").unwrap(),
            schema_version: u32::MAX,
            stale_key_version: false,
            tenant: TenantId::new("t").unwrap(),
        });
        for n in [0, 1, 2, reports.len()] {
            let text = written(&reports[..n]);
            assert_eq!(text, serde_json::to_string(&reports[..n]).unwrap());
            serde_json::from_str::<serde_json::Value>(&text).unwrap();
        }
    }
}
