//! `POST /v1/decrypt`.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;

use super::{Many, One, batch_elements, check_count};
use crate::client::Client;
use crate::error::Error;
use crate::operation::Operation;
use crate::redact::serde_message;
use crate::report::{Decrypted, RecordReport};
use crate::transport::decode;

/// `{"record" | "records", "purpose"?}`.
#[derive(Serialize)]
pub(crate) struct DecryptRequest<'a, P> {
    #[serde(flatten)]
    pub(crate) payload: P,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) purpose: Option<&'a str>,
}

/// Raw, so the record is parsed straight into the caller's type, and the
/// reports are counted before any is parsed.
#[derive(Deserialize)]
struct OneDecrypted<'a> {
    #[serde(borrow)]
    record: &'a RawValue,
    #[serde(borrow)]
    report: &'a RawValue,
}

/// Raw, so records and reports are counted before any is parsed.
#[derive(Deserialize)]
struct ManyDecrypted<'a> {
    #[serde(borrow)]
    records: &'a RawValue,
    #[serde(borrow)]
    report: &'a RawValue,
}

const OP: Operation = Operation::Decrypt;

impl Client {
    /// Decrypts one encrypted record into `T`, disclosing only what the
    /// caller's policy allows for `purpose` (`None`: the sidecar's default).
    ///
    /// Withheld fields are absent and masked ones hold a mask string, so the
    /// protected fields of `T` should be `Option`s; see [`Decrypted`]. A
    /// record that does not fit `T` is [`Error::Record`].
    pub async fn decrypt<T: DeserializeOwned>(
        &self,
        encrypted: &(impl Serialize + ?Sized),
        purpose: Option<&str>,
    ) -> Result<Decrypted<T>, Error> {
        let request = DecryptRequest { payload: One { record: encrypted }, purpose };
        let body = self.post_for_body(OP, &request).await?;
        decode_one(&body)
    }

    /// [`decrypt`](Self::decrypt) into a `serde_json::Value`, which fits
    /// every record however much of it is withheld.
    pub async fn decrypt_value(
        &self,
        encrypted: &(impl Serialize + ?Sized),
        purpose: Option<&str>,
    ) -> Result<Decrypted<Value>, Error> {
        self.decrypt(encrypted, purpose).await
    }

    /// Decrypts many records in one round trip; the results are in the same
    /// order. One record failing to decrypt fails the whole call (the
    /// sidecar's error names it). An empty slice returns an empty `Vec`
    /// without calling the sidecar.
    pub async fn decrypt_batch<T: DeserializeOwned, R: Serialize>(
        &self,
        encrypted: &[R],
        purpose: Option<&str>,
    ) -> Result<Vec<Decrypted<T>>, Error> {
        if encrypted.is_empty() {
            return Ok(Vec::new());
        }
        let request = DecryptRequest { payload: Many { records: encrypted }, purpose };
        let body = self.post_for_body(OP, &request).await?;
        decode_many(encrypted.len(), &body)
    }
}

/// The record and report of an answer to [`Client::decrypt`].
pub(crate) fn decode_one<T: DeserializeOwned>(body: &[u8]) -> Result<Decrypted<T>, Error> {
    let answer: OneDecrypted<'_> = decode(OP, body)?;
    pair(1, vec![answer.record], answer.report, false)?
        .pop()
        .ok_or_else(|| Error::Decode { op: OP, detail: "no record returned".into() })
}

/// The records and reports of an answer to [`Client::decrypt_batch`] of
/// `sent` records: exactly `sent` of each, paired in order.
pub(crate) fn decode_many<T: DeserializeOwned>(
    sent: usize,
    body: &[u8],
) -> Result<Vec<Decrypted<T>>, Error> {
    let answer: ManyDecrypted<'_> = decode(OP, body)?;
    let records = batch_elements(OP, sent, "records", answer.records)?;
    pair(sent, records, answer.report, true)
}

/// Pairs each record with its report from the array `reports`, checking
/// there is one of each per record sent, and converts the records to `T`.
fn pair<T: DeserializeOwned>(
    sent: usize,
    records: Vec<&RawValue>,
    reports: &RawValue,
    batch: bool,
) -> Result<Vec<Decrypted<T>>, Error> {
    check_count(OP, sent, "records", records.len())?;
    let reports = batch_elements(OP, sent, "reports", reports)?;
    records
        .into_iter()
        .zip(reports)
        .enumerate()
        .map(|(i, (record, report))| {
            let report: RecordReport = decode(OP, report.get().as_bytes())?;
            let record = serde_json::from_str(record.get()).map_err(|e| Error::Record {
                op: OP,
                index: batch.then_some(i),
                detail: serde_message(&e),
            })?;
            Ok(Decrypted { record, report })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use serde_json::value::to_raw_value;

    use super::*;

    fn report(id: &str) -> Value {
        json!({
            "record_key_id": id, "tenant": "demo", "schema": "patient", "schema_version": 1,
            "kek_version": 1, "stale_key_version": false, "fields": []
        })
    }

    /// `pair` over records and a report array given as JSON values.
    fn pair_values<T: DeserializeOwned>(
        sent: usize,
        records: &[Value],
        reports: Value,
        batch: bool,
    ) -> Result<Vec<Decrypted<T>>, Error> {
        let records: Vec<Box<RawValue>> =
            records.iter().map(|r| to_raw_value(r).unwrap()).collect();
        let reports = to_raw_value(&reports).unwrap();
        pair(sent, records.iter().map(AsRef::as_ref).collect(), &reports, batch)
    }

    #[derive(Debug, Deserialize, PartialEq)]
    struct Patient {
        #[serde(default)]
        ssn: Option<String>,
        age: u32,
    }

    #[test]
    fn single_and_batch_request_bodies() {
        let encrypted = json!({"_kg": "header", "ssn": "ct"});
        let one = DecryptRequest { payload: One { record: &encrypted }, purpose: None };
        assert_eq!(serde_json::to_value(&one).unwrap(), json!({"record": encrypted}));
        let all = [encrypted.clone(), encrypted.clone()];
        let many = DecryptRequest { payload: Many { records: &all }, purpose: Some("treatment") };
        assert_eq!(
            serde_json::to_value(&many).unwrap(),
            json!({"records": [encrypted, encrypted], "purpose": "treatment"})
        );
    }

    #[test]
    fn records_pair_with_their_reports_in_order() {
        let out: Vec<Decrypted<Patient>> = pair_values(
            2,
            &[json!({"ssn": "123-45-6789", "age": 51}), json!({"age": 7})],
            json!([report("a"), report("b")]),
            true,
        )
        .unwrap();
        assert_eq!(out[0].record, Patient { ssn: Some("123-45-6789".into()), age: 51 });
        assert_eq!(out[1].record, Patient { ssn: None, age: 7 });
        assert_eq!(
            (out[0].report.record_key_id.as_str(), out[1].report.record_key_id.as_str()),
            ("a", "b")
        );
    }

    #[test]
    fn a_count_mismatch_is_a_decode_error() {
        let e = pair_values::<Value>(2, &[json!({})], json!([report("a")]), true).unwrap_err();
        assert!(matches!(e, Error::Decode { .. }), "{e}");
        let e = pair_values::<Value>(1, &[json!({})], json!([]), false).unwrap_err();
        assert!(e.to_string().contains("reports"), "{e}");
        let e = pair_values::<Value>(1, &[json!({})], json!([0, 0, 0]), false).unwrap_err();
        assert!(e.to_string().contains("1 records sent but 3 reports returned"), "{e}");
    }

    #[test]
    fn a_report_that_does_not_fit_is_a_decode_error() {
        let e = pair_values::<Value>(1, &[json!({})], json!([{"tenant": 1}]), false).unwrap_err();
        assert!(matches!(e, Error::Decode { .. }), "{e}");
    }

    #[test]
    fn a_record_that_does_not_fit_names_its_position_but_not_its_values() {
        let e = pair_values::<Patient>(
            2,
            &[json!({"age": 1}), json!({"ssn": "123-45-6789", "age": "fifty-one"})],
            json!([report("a"), report("b")]),
            true,
        )
        .unwrap_err();
        assert!(matches!(e, Error::Record { index: Some(1), .. }), "{e}");
        let message = e.to_string();
        assert!(!message.contains("fifty") && !message.contains("6789"), "{message}");
    }
}
