//! What a decryption returns: the record and a report of what was disclosed.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::operation::Operation;

/// A decrypted record and the sidecar's report on it.
///
/// The sidecar discloses only what the caller's policy allows: each protected
/// field is revealed, masked or withheld (see [`FieldOutcome`]). A **withheld**
/// object member is absent from `record` and a withheld array element is
/// `null`; a **masked** field holds the mask (a string such as
/// `"***-**-6789"`) instead of its value. So when decrypting into your own
/// type `T`, make every protected field an `Option` (or `#[serde(default)]`),
/// and give a field that may be masked a string type; otherwise a caller
/// with narrower grants gets [`Error::Record`](crate::Error::Record) instead
/// of a partial record. `T = serde_json::Value` always fits
/// ([`Client::decrypt_value`](crate::Client::decrypt_value)).
///
/// A record to edit and encrypt again comes from [`into_record`](Self::into_record),
/// which refuses a record that is not fully revealed: written back, it would
/// store masks as values and lose withheld fields.
/// [`into_partial_record`](Self::into_partial_record) is for reading only.
///
/// Its `Debug` shows the report but not the record, so that `dbg!` or a
/// `?view` in a log line does not print PHI.
#[derive(Clone, PartialEq)]
#[non_exhaustive]
pub struct Decrypted<T> {
    /// The record, with protected fields as the policy allows. It may hold
    /// masks and lack withheld fields: to write it back, take it with
    /// [`into_record`](Self::into_record), which checks that it does not.
    /// Private so that no code reaches it without choosing one of the two.
    pub(crate) record: T,
    /// Which key protected it and what happened to each protected field.
    pub report: RecordReport,
}

/// The sidecar's report on one decrypted record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct RecordReport {
    /// The record's key id (32 hex digits); the audit log names it too.
    pub record_key_id: String,
    /// The tenant the record belongs to.
    pub tenant: String,
    /// The schema it was encrypted under.
    pub schema: String,
    /// That schema's version.
    pub schema_version: u32,
    /// The key-encryption-key version its data key is wrapped under.
    pub kek_version: u32,
    /// Whether that KEK version is no longer the active one, so the record
    /// is due for [`Client::rewrap`](crate::Client::rewrap).
    pub stale_key_version: bool,
    /// One entry per protected field present in the record.
    pub fields: Vec<FieldReport>,
}

/// What happened to one protected field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct FieldReport {
    /// The field's JSON pointer in this record (`/ssn`, `/allergies/0`).
    pub pointer: String,
    /// Its class in the schema (`phi.identifier`, `pii.contact`, …).
    pub class: String,
    /// Revealed, masked or withheld.
    pub outcome: FieldOutcome,
}

/// The disclosure decision for one field.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
#[non_exhaustive]
pub enum FieldOutcome {
    /// The plaintext value is in the record.
    Revealed,
    /// A mask of the value (a string) is in the record.
    Masked,
    /// The field is absent (an object member) or `null` (an array element).
    Withheld,
    /// An outcome this version of the client does not know, verbatim.
    Other(String),
}

impl RecordReport {
    /// The report for the field at `pointer`, if it is a protected field.
    pub fn field(&self, pointer: &str) -> Option<&FieldReport> {
        self.fields.iter().find(|f| f.pointer == pointer)
    }

    /// Whether every protected field was revealed.
    pub fn fully_revealed(&self) -> bool {
        self.fields.iter().all(|f| f.outcome == FieldOutcome::Revealed)
    }
}

impl<T> Decrypted<T> {
    /// The whole record, safe to edit and encrypt again: only if every
    /// protected field was revealed ([`RecordReport::fully_revealed`]).
    ///
    /// Otherwise [`Error::PartialRecord`], naming the fields that were masked
    /// or withheld (their pointers, never their values): such a record holds
    /// masks where values were and lacks the withheld fields, and writing it
    /// back would destroy them. Decrypt with a purpose that reveals every
    /// field, or read it with [`into_partial_record`](Self::into_partial_record).
    pub fn into_record(self) -> Result<T, Error> {
        if self.report.fully_revealed() {
            return Ok(self.record);
        }
        let not_revealed =
            self.report.fields.into_iter().filter(|f| f.outcome != FieldOutcome::Revealed);
        Err(Error::PartialRecord { op: Operation::Decrypt, not_revealed: not_revealed.collect() })
    }

    /// The record as the policy disclosed it, masks and gaps included, for
    /// a read-only view (to display, to search). **Never encrypt it and
    /// store it in place of the original**: masked fields would keep the
    /// mask (`"***-**-6789"`) as their value and withheld fields would be
    /// lost. To edit a record, use [`into_record`](Self::into_record).
    pub fn into_partial_record(self) -> T {
        self.record
    }

    /// The same read-only view, borrowed (the caveat of
    /// [`into_partial_record`](Self::into_partial_record) applies).
    pub fn partial_record(&self) -> &T {
        &self.record
    }
}

/// The report, not the record: it is PHI, and `Debug` output ends up in logs.
impl<T> fmt::Debug for Decrypted<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Decrypted")
            .field("record", &format_args!("<redacted>"))
            .field("report", &self.report)
            .finish()
    }
}

impl FieldOutcome {
    /// The outcome as the sidecar spells it (`"revealed"`, …).
    pub fn as_str(&self) -> &str {
        match self {
            Self::Revealed => "revealed",
            Self::Masked => "masked",
            Self::Withheld => "withheld",
            Self::Other(other) => other,
        }
    }
}

impl fmt::Display for FieldOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<String> for FieldOutcome {
    fn from(outcome: String) -> Self {
        match outcome.as_str() {
            "revealed" => Self::Revealed,
            "masked" => Self::Masked,
            "withheld" => Self::Withheld,
            _ => Self::Other(outcome),
        }
    }
}

impl From<FieldOutcome> for String {
    fn from(outcome: FieldOutcome) -> Self {
        match outcome {
            FieldOutcome::Other(other) => other,
            known => known.as_str().to_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_report_parses_with_every_outcome_and_tolerates_new_members() {
        let report: RecordReport = serde_json::from_value(json!({
            "record_key_id": "0123456789abcdef0123456789abcdef",
            "tenant": "demo", "schema": "patient", "schema_version": 1,
            "kek_version": 2, "stale_key_version": true,
            "fields": [
                {"pointer": "/ssn", "class": "phi.identifier", "outcome": "masked"},
                {"pointer": "/email", "class": "pii.contact", "outcome": "revealed"},
                {"pointer": "/diagnosis", "class": "phi.clinical", "outcome": "withheld"},
                {"pointer": "/notes", "class": "phi.clinical", "outcome": "redacted_by_ai", "why": 1}
            ],
            "added_later": true
        }))
        .unwrap();
        assert_eq!(report.kek_version, 2);
        assert!(report.stale_key_version);
        let outcomes: Vec<_> = report.fields.iter().map(|f| f.outcome.clone()).collect();
        assert_eq!(
            outcomes,
            [
                FieldOutcome::Masked,
                FieldOutcome::Revealed,
                FieldOutcome::Withheld,
                FieldOutcome::Other("redacted_by_ai".into())
            ]
        );
        assert_eq!(report.field("/email").unwrap().class, "pii.contact");
        assert!(report.field("/age").is_none());
        assert!(!report.fully_revealed());
        let back = serde_json::to_value(&report.fields).unwrap();
        assert_eq!(back[3]["outcome"], "redacted_by_ai");
        assert_eq!(back[0]["outcome"], "masked");
    }

    fn decrypted(outcomes: &[(&str, &str)]) -> Decrypted<serde_json::Value> {
        let fields: Vec<_> = outcomes
            .iter()
            .map(|(pointer, outcome)| json!({"pointer": pointer, "class": "phi", "outcome": outcome}))
            .collect();
        let report = serde_json::from_value(json!({
            "record_key_id": "00112233445566778899aabbccddeeff",
            "tenant": "demo", "schema": "patient", "schema_version": 1,
            "kek_version": 1, "stale_key_version": false, "fields": fields
        }))
        .unwrap();
        Decrypted {
            record: json!({"ssn": "***-**-6789", "email": "jane@example.org", "age": 51}),
            report,
        }
    }

    #[test]
    fn into_record_refuses_a_partial_record_naming_its_fields_not_their_values() {
        let partial = decrypted(&[
            ("/ssn", "masked"),
            ("/email", "revealed"),
            ("/diagnosis", "withheld"),
            ("/notes", "redacted_by_ai"),
        ]);
        let err = partial.into_record().unwrap_err();
        let Error::PartialRecord { op, not_revealed } = &err else { panic!("{err:?}") };
        assert_eq!(*op, Operation::Decrypt);
        let pointers: Vec<_> = not_revealed.iter().map(|f| f.pointer.as_str()).collect();
        assert_eq!(pointers, ["/ssn", "/diagnosis", "/notes"]);
        let shown = format!("{err} {err:?}");
        assert!(
            shown.contains("/ssn masked, /diagnosis withheld, /notes redacted_by_ai"),
            "{shown}"
        );
        assert!(!shown.contains("6789") && !shown.contains("jane"), "{shown}");
        assert!(!err.is_retryable());
        assert_eq!(err.operation(), Some(Operation::Decrypt));
    }

    #[test]
    fn into_record_gives_a_fully_revealed_record() {
        let record = decrypted(&[("/ssn", "revealed"), ("/email", "revealed")]).into_record();
        assert_eq!(record.unwrap()["email"], "jane@example.org");
        assert!(decrypted(&[]).into_record().is_ok(), "no protected field: nothing hidden");
    }

    #[test]
    fn into_partial_record_gives_the_record_with_its_masks() {
        let record = decrypted(&[("/ssn", "masked")]).into_partial_record();
        assert_eq!(record["ssn"], "***-**-6789");
    }

    #[test]
    fn debug_shows_the_report_but_not_the_record() {
        let view = decrypted(&[("/ssn", "masked"), ("/email", "revealed")]);
        for shown in
            [format!("{view:?}"), format!("{view:#?}"), format!("{:?}", vec![view.clone()])]
        {
            assert!(!shown.contains("6789") && !shown.contains("jane@example.org"), "{shown}");
            assert!(!shown.contains("51"), "{shown}");
            assert!(shown.contains("<redacted>") && shown.contains("/email"), "{shown}");
        }
    }
}
