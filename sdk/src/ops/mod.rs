//! The sidecar operations, one file each, as `impl Client` blocks, and the
//! request shapes they share.

pub(crate) mod decrypt;
pub(crate) mod encrypt;
pub(crate) mod lookup;
pub(crate) mod probe;
pub(crate) mod rewrap;

use std::fmt;

use serde::de::{DeserializeSeed, IgnoredAny, SeqAccess, Visitor};
use serde::{Deserializer, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;

use crate::error::Error;
use crate::operation::Operation;
use crate::redact::serde_message;

/// The member that holds an encrypted record's header, and how the header
/// starts: kms-core's `HEADER_MEMBER` and `HEADER_PREFIX`, repeated because
/// this thin client does not link kms-core. The sidecar writes both into
/// every record it encrypts or rewraps.
const HEADER_MEMBER: &str = "_kg";
const HEADER_PREFIX: &str = "kg1h:";

/// The single-record form of a request: `"record": {…}`.
#[derive(Serialize)]
pub(crate) struct One<'a, R: ?Sized> {
    pub(crate) record: &'a R,
}

/// The batch form of a request: `"records": [{…}, …]`.
#[derive(Serialize)]
pub(crate) struct Many<'a, R> {
    pub(crate) records: &'a [R],
}

/// The elements of a batch answer's array of `what` (records, reports),
/// which must hold exactly one per record sent. They are counted before
/// anything is kept for them, so an answer with far more elements than were
/// sent (`[0,0,0,…]`, up to the answer size cap) costs no memory per element.
pub(crate) fn batch_elements<'a>(
    op: Operation,
    sent: usize,
    what: &str,
    array: &'a RawValue,
) -> Result<Vec<&'a RawValue>, Error> {
    let mut json = serde_json::Deserializer::from_str(array.get());
    let (kept, total) = UpTo(sent)
        .deserialize(&mut json)
        .map_err(|e| Error::Decode { op, detail: format!("{what}: {}", serde_message(&e)) })?;
    check_count(op, sent, what, total)?;
    Ok(kept)
}

/// A JSON array read as its first `.0` elements, raw, and its length.
struct UpTo(usize);

impl<'de> DeserializeSeed<'de> for UpTo {
    type Value = (Vec<&'de RawValue>, usize);

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for UpTo {
    type Value = (Vec<&'de RawValue>, usize);

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON array")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut kept = Vec::with_capacity(self.0);
        while kept.len() < self.0 {
            match seq.next_element::<&'de RawValue>()? {
                Some(element) => kept.push(element),
                None => {
                    let total = kept.len();
                    return Ok((kept, total));
                }
            }
        }
        // Past what was sent: only counted, for the error message.
        let mut total = kept.len();
        while seq.next_element::<IgnoredAny>()?.is_some() {
            total = total.saturating_add(1);
        }
        Ok((kept, total))
    }
}

/// A record the sidecar answered an encrypt or rewrap with, checked to be
/// encrypted: a JSON object whose `_kg` is a keygate header. Anything else
/// (an echo of the request, a mock, a proxy's answer) may be the plaintext
/// the caller is about to store, so it is refused. `index` is the record's
/// position in a batch; the error names no value.
pub(crate) fn encrypted_record(
    op: Operation,
    index: Option<usize>,
    raw: &RawValue,
) -> Result<Value, Error> {
    let which = index.map(|i| format!("record {i}")).unwrap_or_else(|| "the record".to_owned());
    let record: Value = serde_json::from_str(raw.get())
        .map_err(|e| Error::Decode { op, detail: format!("{which}: {}", serde_message(&e)) })?;
    let header = record.get(HEADER_MEMBER).and_then(Value::as_str);
    if !header.is_some_and(|h| h.starts_with(HEADER_PREFIX)) {
        return Err(Error::Decode {
            op,
            detail: format!(
                "{which} returned is not an encrypted record (no {HEADER_PREFIX} header in \
                 {HEADER_MEMBER}); refusing what may be plaintext"
            ),
        });
    }
    Ok(record)
}

/// A batch answer must hold exactly one `what` per record sent.
pub(crate) fn check_count(op: Operation, sent: usize, what: &str, got: usize) -> Result<(), Error> {
    if sent == got {
        return Ok(());
    }
    Err(Error::Decode { op, detail: format!("{sent} records sent but {got} {what} returned") })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const OP: Operation = Operation::Encrypt;

    fn raw(text: &str) -> Box<RawValue> {
        RawValue::from_string(text.to_owned()).unwrap()
    }

    #[test]
    fn batch_elements_keeps_exactly_the_elements_sent() {
        let array = raw(r#"[{"a":1}, [2], "3"]"#);
        let kept = batch_elements(OP, 3, "records", &array).unwrap();
        let kept: Vec<&str> = kept.iter().map(|r| r.get()).collect();
        assert_eq!(kept, [r#"{"a":1}"#, "[2]", r#""3""#]);
    }

    #[test]
    fn batch_elements_counts_too_many_and_too_few() {
        let e = batch_elements(OP, 1, "records", &raw("[0,0,0,0,0]")).unwrap_err();
        assert!(matches!(&e, Error::Decode { .. }), "{e:?}");
        assert!(e.to_string().contains("1 records sent but 5 records returned"), "{e}");
        let e = batch_elements(OP, 3, "reports", &raw("[{}]")).unwrap_err();
        assert!(e.to_string().contains("3 records sent but 1 reports returned"), "{e}");
    }

    #[test]
    fn batch_elements_refuses_what_is_not_an_array_without_quoting_it() {
        let e = batch_elements(OP, 1, "records", &raw(r#"{"ssn":"123-45-6789"}"#)).unwrap_err();
        assert!(matches!(&e, Error::Decode { .. }), "{e:?}");
        assert!(!format!("{e} {e:?}").contains("6789"), "{e:?}");
    }

    #[test]
    fn only_objects_with_a_keygate_header_are_encrypted_records() {
        let ok = raw(r#"{"_kg":"kg1h:AAAA","ssn":"kg1:ct"}"#);
        assert_eq!(
            encrypted_record(OP, None, &ok).unwrap(),
            json!({"_kg": "kg1h:AAAA", "ssn": "kg1:ct"})
        );
        for plaintext in [
            r#"{"ssn":"123-45-6789"}"#,
            r#"{"_kg":"123-45-6789","ssn":"123-45-6789"}"#,
            r#"{"_kg":{"v":"kg1h:123-45-6789"}}"#,
            r#"{"nested":{"_kg":"kg1h:x"},"ssn":"123-45-6789"}"#,
            r#"["_kg","kg1h:123-45-6789"]"#,
            r#""123-45-6789""#,
        ] {
            let e = encrypted_record(OP, Some(4), &raw(plaintext)).unwrap_err();
            assert!(matches!(&e, Error::Decode { .. }), "{plaintext}: {e:?}");
            let shown = format!("{e} {e:?}");
            assert!(!shown.contains("6789"), "{shown}");
            assert!(shown.contains("record 4"), "{shown}");
        }
    }
}
