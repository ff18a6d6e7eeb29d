//! The decrypt answer's `report`: one entry per record, written as JSON
//! text as the records are decrypted.
//!
//! Members are in alphabetical order, as serde_json writes a JSON map:
//! that order is the wire form, and the tests hold the writer to serde's
//! own output for structs declared in that order. Written by hand because
//! serde's string escaping, one call per pointer and class, was about 4 %
//! of a batch decrypt; nearly every string here needs no escape at all.
//!
//! Most records of a request report the same fields alike, so a record's
//! `fields` list is written once per kind of record ([`Report::fields`])
//! and copied for every record of that kind.

use std::io::Write;

use kms_core::{KekVersion, Name, RecordKeyId, TenantId};

/// One protected field's entry.
pub(super) struct FieldEntry<'a> {
    pub(super) class: &'a str,
    pub(super) outcome: &'static str,
    pub(super) pointer: &'a str,
    pub(super) reason: Option<String>,
}

/// What every record of one tenant and schema version shares in its
/// report, written once.
pub(super) struct ReportContext {
    /// `,"schema":…,"schema_version":…`
    schema: Vec<u8>,
    /// `,"tenant":…}`
    tenant: Vec<u8>,
}

impl ReportContext {
    pub(super) fn new(tenant: &TenantId, schema: &Name, schema_version: u32) -> Self {
        let mut text = Vec::with_capacity(64);
        text.extend_from_slice(b",\"schema\":");
        string(&mut text, schema.as_str());
        text.extend_from_slice(b",\"schema_version\":");
        number(&mut text, schema_version.into());
        let mut end = Vec::with_capacity(32);
        end.extend_from_slice(b",\"tenant\":");
        string(&mut end, tenant.as_str());
        end.extend_from_slice(b"}");
        Self { schema: text, tenant: end }
    }
}

/// What decides a record's `fields` list in one request: the audit event
/// group it joined (which fixes each field's pointer and outcome) and the
/// tenant, schema and schema version it was resolved under (which fix
/// each field's class and the caller's access to it, hence the reasons).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct FieldsKey {
    pub(super) group: usize,
    pub(super) resolved: usize,
}

/// A `fields` list [`Report::fields`] has written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Fields(usize);

/// The report's text: a JSON array with one entry per record, and the
/// `fields` lists written so far, for reuse.
#[derive(Default)]
pub(super) struct Report {
    text: Vec<u8>,
    /// Each `fields` list written, under its key.
    fields: Vec<(FieldsKey, Vec<u8>)>,
}

impl Report {
    pub(super) fn with_capacity(records: usize) -> Self {
        // About 450 bytes per record of six fields.
        Self { text: Vec::with_capacity(records.saturating_mul(512)), fields: Vec::new() }
    }

    /// The `fields` list under `key`, written by `entries` the first time
    /// `key` is asked for.
    pub(super) fn fields<'e>(
        &mut self,
        key: FieldsKey,
        entries: impl FnOnce() -> Vec<FieldEntry<'e>>,
    ) -> Fields {
        if let Some(at) = self.fields.iter().position(|(k, _)| *k == key) {
            return Fields(at);
        }
        let mut text = Vec::with_capacity(512);
        write_fields(&mut text, &entries());
        self.fields.push((key, text));
        Fields(self.fields.len() - 1)
    }

    /// Appends one record's entry, with a `fields` list of this report.
    pub(super) fn record(
        &mut self,
        fields: Fields,
        kek_version: KekVersion,
        record_key_id: &RecordKeyId,
        stale_key_version: bool,
        context: &ReportContext,
    ) {
        let out = &mut self.text;
        out.extend_from_slice(if out.is_empty() { b"[" } else { b"," });
        out.extend_from_slice(b"{\"fields\":");
        match self.fields.get(fields.0) {
            Some((_, text)) => out.extend_from_slice(text),
            // Not reached: a `Fields` is only made by this report's
            // `fields`, and the list never shrinks.
            None => out.extend_from_slice(b"[]"),
        }
        out.extend_from_slice(b",\"kek_version\":");
        number(out, kek_version.into());
        out.extend_from_slice(b",\"record_key_id\":\"");
        out.extend_from_slice(record_key_id.hex_in(&mut [0; 2 * RecordKeyId::LEN]).as_bytes());
        out.extend_from_slice(b"\"");
        out.extend_from_slice(&context.schema);
        out.extend_from_slice(if stale_key_version {
            b",\"stale_key_version\":true"
        } else {
            b",\"stale_key_version\":false"
        });
        out.extend_from_slice(&context.tenant);
    }

    /// The whole array.
    pub(super) fn finish(mut self) -> Vec<u8> {
        if self.text.is_empty() {
            self.text.extend_from_slice(b"[");
        }
        self.text.extend_from_slice(b"]");
        self.text
    }
}

fn write_fields(out: &mut Vec<u8>, fields: &[FieldEntry<'_>]) {
    out.extend_from_slice(b"[");
    for (j, f) in fields.iter().enumerate() {
        if j > 0 {
            out.extend_from_slice(b",");
        }
        out.extend_from_slice(b"{\"class\":");
        string(out, f.class);
        out.extend_from_slice(b",\"outcome\":");
        string(out, f.outcome);
        out.extend_from_slice(b",\"pointer\":");
        string(out, f.pointer);
        if let Some(reason) = &f.reason {
            out.extend_from_slice(b",\"reason\":");
            string(out, reason);
        }
        out.extend_from_slice(b"}");
    }
    out.extend_from_slice(b"]");
}

/// A JSON string: as it is when nothing in it needs escaping (serde_json
/// escapes only `"`, `\` and control characters), else through serde_json.
fn string(out: &mut Vec<u8>, s: &str) {
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.extend_from_slice(b"\"");
        out.extend_from_slice(s.as_bytes());
        out.extend_from_slice(b"\"");
    } else {
        // Writing a `str` into memory cannot fail.
        let _ = serde_json::to_writer(&mut *out, s);
    }
}

fn number(out: &mut Vec<u8>, n: u64) {
    // Writing into memory cannot fail.
    let _ = write!(out, "{n}");
}

#[cfg(test)]
mod tests {
    use serde::Serialize;

    use super::*;

    /// What serde_json writes, with members declared in the wire order.
    #[derive(Serialize)]
    struct RecordReport {
        fields: Vec<Entry>,
        kek_version: KekVersion,
        record_key_id: RecordKeyId,
        schema: Name,
        schema_version: u32,
        stale_key_version: bool,
        tenant: TenantId,
    }

    #[derive(Clone, Serialize)]
    struct Entry {
        class: String,
        outcome: &'static str,
        pointer: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    }

    fn entry(class: &str, outcome: &'static str, pointer: &str, reason: Option<&str>) -> Entry {
        Entry {
            class: class.into(),
            outcome,
            pointer: pointer.into(),
            reason: reason.map(Into::into),
        }
    }

    /// Written by [`Report`], each record's fields under its own key.
    fn written(reports: &[RecordReport]) -> String {
        let mut report = Report::default();
        for (i, r) in reports.iter().enumerate() {
            let fields = report.fields(FieldsKey { group: i, resolved: 0 }, || {
                r.fields
                    .iter()
                    .map(|e| FieldEntry {
                        class: &e.class,
                        outcome: e.outcome,
                        pointer: &e.pointer,
                        reason: e.reason.clone(),
                    })
                    .collect()
            });
            let context = ReportContext::new(&r.tenant, &r.schema, r.schema_version);
            report.record(fields, r.kek_version, &r.record_key_id, r.stale_key_version, &context);
        }
        String::from_utf8(report.finish()).unwrap()
    }

    fn odd_reports() -> Vec<RecordReport> {
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
        reports
    }

    #[test]
    fn the_text_is_serde_json_s() {
        let reports = odd_reports();
        for n in [0, 1, 2, reports.len()] {
            let text = written(&reports[..n]);
            assert_eq!(text, serde_json::to_string(&reports[..n]).unwrap());
            serde_json::from_str::<serde_json::Value>(&text).unwrap();
        }
    }

    #[test]
    fn a_fields_list_is_written_once_per_key_and_reused() {
        let mut report = Report::default();
        let mut calls = 0;
        let mut list = |report: &mut Report, key, class: &'static str| {
            report.fields(key, || {
                calls += 1;
                vec![FieldEntry { class, outcome: "revealed", pointer: "/a", reason: None }]
            })
        };
        let key = |group, resolved| FieldsKey { group, resolved };
        let first = list(&mut report, key(0, 0), "x");
        assert_eq!(list(&mut report, key(0, 0), "ignored: the key is known"), first);
        let other = list(&mut report, key(0, 1), "y");
        assert_ne!(other, first);
        assert_eq!(calls, 2);
        let context = ReportContext::new(&TenantId::new("t").unwrap(), &Name::new("s").unwrap(), 1);
        let id = RecordKeyId::from_bytes([1; 16]);
        report.record(first, 1, &id, false, &context);
        report.record(other, 2, &id, true, &context);
        report.record(first, 1, &id, false, &context);
        let value: serde_json::Value = serde_json::from_slice(&report.finish()).unwrap();
        let classes: Vec<&str> = value
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["fields"][0]["class"].as_str().unwrap())
            .collect();
        assert_eq!(classes, ["x", "y", "x"]);
        assert_eq!(value[1]["stale_key_version"], true);
    }
}
