//! Entry points for the fuzz targets (`fuzz/`) and their regression tests:
//! the sidecar's answers as this client decodes them. Whatever answers on
//! the configured endpoint (a wrong URL, a proxy) can send anything, so
//! these decoders parse untrusted bytes.
//! Compiled only for this crate's tests or with the `fuzzing` feature
//! (which `fuzz/` and the `tests/` crate enable); never part of a release
//! build. Must never panic on any input; asserts inside are properties,
//! and a failed one is a bug.

use std::fmt;

use reqwest::header::{HeaderMap, HeaderValue, RETRY_AFTER};
use serde::Deserialize;
use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::Value;

use crate::error::Error;
use crate::operation::Operation;
use crate::ops::{decrypt, encrypt, rewrap};
use crate::transport::{Answer, MAX_RETRY_AFTER, parse_retry_after, success_body};

/// How long the client keeps an idle pooled connection, for the `tests/`
/// crate to check against the sidecar's own idle close.
pub const POOL_IDLE_TIMEOUT: std::time::Duration = crate::builder::POOL_IDLE_TIMEOUT;
/// The default attempt timeout, for the test that holds the sidecar's
/// request deadline below it.
pub const ATTEMPT_TIMEOUT: std::time::Duration = crate::builder::DEFAULT_TIMEOUT;

/// The numbers of records sent that each batch answer is decoded for.
const SENT: [usize; 3] = [1, 2, 7];

/// A record's string value of at least this many characters must never
/// show in an error unless it is one of the error's own words (which the
/// check tells apart). Short values are PHI too (an SSN is 11 characters);
/// shorter than this, a value is too likely to be a part of any error text.
const MIN_SECRET_CHARS: usize = 4;

/// The record format's header member and prefix, written out here so that
/// the property does not lean on the constants of the code it checks.
const HEADER_MEMBER: &str = "_kg";
const HEADER_PREFIX: &str = "kg1h:";

/// The members of an answer that hold records.
const RECORD_MEMBERS: [&str; 2] = ["record", "records"];

/// A caller's record type, as the crate docs advise (protected fields
/// optional), with members of several kinds so that a record that does
/// not fit fails on each kind's serde message.
#[derive(Deserialize)]
#[allow(dead_code)] // decoded only
struct Patient {
    #[serde(default)]
    ssn: Option<String>,
    age: u32,
    #[serde(default)]
    kind: Option<Kind>,
    #[serde(default)]
    initial: Option<char>,
    #[serde(default)]
    allergies: Vec<String>,
    #[serde(default)]
    weight: Option<f32>,
}

#[derive(Deserialize)]
enum Kind {
    Inpatient,
    Outpatient,
}

/// Every sidecar answer, decoded the way the client decodes it: as the
/// answer to a single encrypt, decrypt and rewrap; as the answer to a batch
/// of 1, 2 and 7 records of each (decrypted records into a
/// `serde_json::Value` and into a caller's struct); as an error answer (its
/// status and error body); and as a `Retry-After` header value. None may
/// panic, and:
///
/// - a batch answer that decodes holds exactly one record per record sent;
/// - every record an encrypt or rewrap answer decodes to is a JSON object
///   whose `_kg` is a string starting `kg1h:` (anything else may be the
///   plaintext the caller is about to store);
/// - no error shows a string value of the answer's records (its top-level
///   `record` and `records` members: for a decrypt, plaintext) of 4
///   characters or more, unless that value is also elsewhere in the answer
///   (an error answer's message is shown as sent) or is one of the error's
///   own words: decoding the answer with the value replaced (same length,
///   same structure, same header prefix) must then give an error that
///   still shows it. A value that cannot be replaced so counts as shown;
/// - a 2xx answer's body is passed on unchanged, and an error status is
///   always an error; a `Retry-After` is at most an hour.
pub fn answers(data: &[u8]) {
    let secrets = record_only_strings(data);
    status(data, &secrets);
    retry_after(data);
    if let Some(record) = decoded(data, &secrets, encrypt::decode_one) {
        assert!(is_encrypted(&record), "an encrypt answer's record is not encrypted");
    }
    if let Some(rewrapped) = decoded(data, &secrets, rewrap::decode_one) {
        assert!(is_encrypted(&rewrapped.record), "a rewrap answer's record is not encrypted");
    }
    let _ = decoded(data, &secrets, decrypt::decode_one::<Value>);
    let _ = decoded(data, &secrets, decrypt::decode_one::<Patient>);
    for sent in SENT {
        if let Some(records) = decoded(data, &secrets, |d| encrypt::decode_many(sent, d)) {
            assert_eq!(records.len(), sent, "encrypt: records returned for {sent} sent");
            assert!(
                records.iter().all(is_encrypted),
                "an encrypt answer's record is not encrypted"
            );
        }
        if let Some(batch) = decoded(data, &secrets, |d| rewrap::decode_many(sent, d)) {
            assert_eq!(batch.records.len(), sent, "rewrap: records returned for {sent} sent");
            assert!(
                batch.records.iter().all(is_encrypted),
                "a rewrap answer's record is not encrypted"
            );
        }
        if let Some(records) = decoded(data, &secrets, |d| decrypt::decode_many::<Value>(sent, d)) {
            assert_eq!(records.len(), sent, "decrypt: records returned for {sent} sent");
        }
        let typed = decoded(data, &secrets, |d| decrypt::decode_many::<Patient>(sent, d));
        if let Some(records) = typed {
            assert_eq!(records.len(), sent, "decrypt: records returned for {sent} sent");
        }
    }
}

/// `data` as the body of a success and of an error answer.
fn status(data: &[u8], secrets: &[String]) {
    const OP: Operation = Operation::Decrypt;
    let answer =
        |status: u16, body: &[u8]| Answer { status, retry_after: None, body: body.to_vec() };
    let passed = success_body(OP, answer(200, data));
    assert!(passed.is_ok_and(|body| body == data), "a 2xx answer's body was not passed on");
    for status in [400, 503] {
        let refused = decoded(data, secrets, |d| success_body(OP, answer(status, d)));
        assert!(refused.is_none(), "an HTTP {status} answer was taken for a success");
    }
}

/// `data` as a `Retry-After` header value.
fn retry_after(data: &[u8]) {
    let Ok(value) = HeaderValue::from_bytes(data) else { return };
    let mut headers = HeaderMap::new();
    headers.insert(RETRY_AFTER, value);
    if let Some(wait) = parse_retry_after(&headers) {
        assert!(wait <= MAX_RETRY_AFTER, "a Retry-After of {wait:?} passed on");
    }
}

/// What `decode` makes of `data`; when that is an error, checks that it
/// shows none of `secrets` (see [`answers`]).
fn decoded<T>(
    data: &[u8],
    secrets: &[String],
    decode: impl Fn(&[u8]) -> Result<T, Error>,
) -> Option<T> {
    let err = match decode(data) {
        Ok(value) => return Some(value),
        Err(err) => err,
    };
    let text = shown(&err);
    for secret in secrets.iter().filter(|s| text.contains(s.as_str())) {
        // It may be one of the error's own words: replaced in the answer,
        // it is still shown if so. Not replaceable, it cannot be told from
        // a leak, and counts as one.
        let own = replace(data, secret).is_some_and(|replaced| {
            decode(&replaced).err().is_some_and(|e| shown(&e).contains(secret.as_str()))
        });
        assert!(own, "an error shows a record's value {secret:?}: {text}");
    }
    None
}

/// What an error shows: its `Display` and its `Debug`.
fn shown(err: &Error) -> String {
    format!("{err} {err:?}")
}

fn is_encrypted(record: &Value) -> bool {
    record.get(HEADER_MEMBER).and_then(Value::as_str).is_some_and(|h| h.starts_with(HEADER_PREFIX))
}

/// The string values of [`MIN_SECRET_CHARS`] or more that `data` (a JSON
/// object) holds in its records and nowhere else: not within a string
/// outside them, a member name anywhere, or a number. None if `data` is not
/// JSON.
fn record_only_strings(data: &[u8]) -> Vec<String> {
    let mut strings = Strings::default();
    let mut json = serde_json::Deserializer::from_slice(data);
    let seed = Collect { into: &mut strings, inside: false, top: true };
    if seed.deserialize(&mut json).and_then(|()| json.end()).is_err() {
        return Vec::new();
    }
    // Joined, a value spanning two of them is left out too: that errs on
    // the safe side.
    let outside = strings.outside.join("\0");
    let mut secrets: Vec<String> = strings
        .inside
        .into_iter()
        .filter(|s| s.chars().count() >= MIN_SECRET_CHARS && !outside.contains(s.as_str()))
        .collect();
    secrets.sort_unstable();
    secrets.dedup();
    secrets
}

/// `data` (valid JSON) with every string (value or member name) that is
/// `secret` replaced by as many bytes of a character `secret` lacks, after
/// `kg1h:` if `secret` starts so: byte offsets (which errors quote), the
/// structure and which records have a header stay as they were. None only
/// if `secret` holds every printable ASCII character that a JSON string
/// may hold unescaped.
fn replace(data: &[u8], secret: &str) -> Option<Vec<u8>> {
    let fill =
        "ZQXJ#".chars().chain('!'..='~').find(|&c| c != '"' && c != '\\' && !secret.contains(c))?;
    let mut out = data.to_vec();
    let mut at = 0;
    while let Some(start) = data.get(at..)?.iter().position(|&b| b == b'"').map(|i| at + i) {
        let end = string_end(data, start)?;
        let token = data.get(start..=end)?;
        if serde_json::from_slice::<String>(token).is_ok_and(|s| s == secret) {
            let inner = out.get_mut(start + 1..end)?;
            inner.fill(fill as u8);
            if secret.starts_with(HEADER_PREFIX) {
                inner.get_mut(..HEADER_PREFIX.len())?.copy_from_slice(HEADER_PREFIX.as_bytes());
            }
        }
        at = end + 1;
    }
    Some(out)
}

/// The index of the quote that closes the JSON string opening at `start`.
fn string_end(data: &[u8], start: usize) -> Option<usize> {
    let mut at = start + 1;
    loop {
        match data.get(at)? {
            b'\\' => at += 2,
            b'"' => return Some(at),
            _ => at += 1,
        }
    }
}

/// The strings of a JSON document, by where they are.
#[derive(Default)]
struct Strings {
    /// String values within the top-level record members.
    inside: Vec<String>,
    /// Every other string value, every member name and every number.
    outside: Vec<String>,
}

/// Sorts the strings of one JSON value into [`Strings`]. Unlike a
/// `serde_json::Value`, it sees every member of an object that names one
/// twice.
struct Collect<'a> {
    into: &'a mut Strings,
    inside: bool,
    top: bool,
}

impl<'de> DeserializeSeed<'de> for Collect<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Collect<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }

    fn visit_i64<E>(self, v: i64) -> Result<(), E> {
        self.into.outside.push(v.to_string());
        Ok(())
    }

    fn visit_u64<E>(self, v: u64) -> Result<(), E> {
        self.into.outside.push(v.to_string());
        Ok(())
    }

    fn visit_f64<E>(self, v: f64) -> Result<(), E> {
        self.into.outside.push(v.to_string());
        Ok(())
    }

    fn visit_str<E>(self, v: &str) -> Result<(), E> {
        let strings = if self.inside { &mut self.into.inside } else { &mut self.into.outside };
        strings.push(v.to_owned());
        Ok(())
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let Self { into, inside, .. } = self;
        while seq.next_element_seed(Collect { into: &mut *into, inside, top: false })?.is_some() {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let Self { into, inside, top } = self;
        while let Some(name) = map.next_key::<String>()? {
            let inside = inside || (top && RECORD_MEMBERS.contains(&name.as_str()));
            into.outside.push(name);
            map.next_value_seed(Collect { into: &mut *into, inside, top: false })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SSN: &str = "123-45-6789-0000";

    #[test]
    fn entry_point_takes_valid_and_invalid_answers() {
        for body in [
            &br#"{"record":{"_kg":"kg1h:AAAA","ssn":"kg1:ct"}}"#[..],
            br#"{"records":[{"_kg":"kg1h:A"},{"_kg":"kg1h:B"}],"rewrapped":1}"#,
            br#"{"record":{"ssn":"123-45-6789-0000","age":"fifty-one years"},"report":{}}"#,
            br#"{"records":[{"age":"123-45-6789-0000"}],"report":[{"tenant":1}]}"#,
            br#"{"error":{"code":"rate_limited","message":"slow down"}}"#,
            b"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[",
            b"\xff\xfe",
            b"7",
            b"",
        ] {
            answers(body);
        }
    }

    #[test]
    fn strings_of_four_characters_or_more_held_only_in_records_are_secrets() {
        let data = br#"{"record":{"ssn":"123-45-6789-0000","name":"Jane Roe","again":"shown as message",
            "_kg":"kg1h:123456789abc"},"error":{"message":"it was shown as message"},
            "report":{"tenant":"tenant-abcdefghij"},"records":["tenant-abcdefghij","second record value"]}"#;
        assert_eq!(
            record_only_strings(data),
            ["123-45-6789-0000", "Jane Roe", "kg1h:123456789abc", "second record value"]
        );
        let short = br#"{"record":{"ssn":"123-45-6789","dx":"C50","zip":"1234"}}"#;
        assert_eq!(record_only_strings(short), ["123-45-6789", "1234"]);
        // A record member named twice is seen twice.
        let twice = br#"{"record":{"a":"first value of a","a":"second value of a"}}"#;
        assert_eq!(record_only_strings(twice), ["first value of a", "second value of a"]);
        assert!(record_only_strings(br#"["123-45-6789-0000"]"#).is_empty());
        assert!(record_only_strings(br#"{"record":"123-45-6789-0000"} x"#).is_empty());
    }

    #[test]
    fn replacing_keeps_offsets_structure_and_header_prefix() {
        let data = br#"{"record":{"ssn":"123-45-6789-0000","_kg":"kg1h:123-45-6789\"x"},"s":"123-45-6789-0000"}"#;
        let replaced = replace(data, SSN).unwrap();
        assert_eq!(
            std::str::from_utf8(&replaced).unwrap(),
            r#"{"record":{"ssn":"ZZZZZZZZZZZZZZZZ","_kg":"kg1h:123-45-6789\"x"},"s":"ZZZZZZZZZZZZZZZZ"}"#
        );
        let header = "kg1h:123-45-6789\"x";
        let replaced = replace(data, header).unwrap();
        assert_eq!(
            std::str::from_utf8(&replaced).unwrap(),
            r#"{"record":{"ssn":"123-45-6789-0000","_kg":"kg1h:ZZZZZZZZZZZZZZ"},"s":"123-45-6789-0000"}"#
        );
        assert_eq!(replace(br#"{"a":"ZQXJ#"}"#, "ZQXJ#").unwrap(), br#"{"a":"!!!!!"}"#);
        assert_eq!(replace(br#"{"a":"x"}"#, &every_fill()), None);
    }

    /// Every character `replace` could fill with.
    fn every_fill() -> String {
        ('!'..='~').filter(|&c| c != '"' && c != '\\').collect()
    }

    /// A decoder whose error quotes the record's `ssn`.
    fn quoting(d: &[u8]) -> Result<(), Error> {
        let value: Value = serde_json::from_slice(d).unwrap();
        Err(Error::Decode { op: Operation::Decrypt, detail: value["record"]["ssn"].to_string() })
    }

    #[test]
    fn the_leak_check_catches_short_values() {
        for ssn in ["123-45-6789", "6789"] {
            let data = format!(r#"{{"record":{{"ssn":"{ssn}"}}}}"#);
            let secrets = record_only_strings(data.as_bytes());
            let caught = std::panic::catch_unwind(|| decoded(data.as_bytes(), &secrets, quoting));
            assert!(caught.is_err(), "{ssn} quoted in an error went unnoticed");
        }
    }

    #[test]
    fn a_value_that_cannot_be_replaced_counts_as_shown() {
        let data =
            serde_json::to_vec(&serde_json::json!({"record": {"ssn": every_fill()}})).unwrap();
        let secrets = record_only_strings(&data);
        assert_eq!(secrets.len(), 1);
        let caught = std::panic::catch_unwind(|| decoded(&data, &secrets, quoting));
        assert!(caught.is_err(), "the leak check skipped a value it could not replace");
    }

    /// A decoder whose error quotes the record, and one whose error's own
    /// words happen to be a record's value.
    #[test]
    fn the_leak_check_tells_a_quoted_value_from_the_errors_own_words() {
        let data = br#"{"record":{"ssn":"123-45-6789-0000","note":"cannot decode the keygate"}}"#;
        let secrets = record_only_strings(data);
        assert_eq!(secrets, ["123-45-6789-0000", "cannot decode the keygate"]);
        let own_words = |_: &[u8]| -> Result<(), Error> {
            Err(Error::Decode { op: Operation::Encrypt, detail: "fixed".into() })
        };
        assert!(decoded(data, &secrets, own_words).is_none());
        let quoting = |d: &[u8]| -> Result<(), Error> {
            let value: Value = serde_json::from_slice(d).unwrap();
            Err(Error::Decode {
                op: Operation::Encrypt,
                detail: value["record"]["ssn"].to_string(),
            })
        };
        let caught = std::panic::catch_unwind(|| decoded(data, &secrets, quoting));
        assert!(caught.is_err(), "a quoted record value went unnoticed");
    }
}
