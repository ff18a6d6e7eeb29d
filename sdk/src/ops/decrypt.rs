//! `POST /v1/decrypt`.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{Many, One, check_count};
use crate::client::Client;
use crate::error::Error;
use crate::operation::Operation;
use crate::redact::serde_message;
use crate::report::{Decrypted, RecordReport};

/// `{"record" | "records", "purpose"?}`.
#[derive(Serialize)]
pub(crate) struct DecryptRequest<'a, P> {
    #[serde(flatten)]
    pub(crate) payload: P,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) purpose: Option<&'a str>,
}

#[derive(Deserialize)]
struct OneDecrypted {
    record: Value,
    report: Vec<RecordReport>,
}

#[derive(Deserialize)]
struct ManyDecrypted {
    records: Vec<Value>,
    report: Vec<RecordReport>,
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
        let answer: OneDecrypted = self.post(OP, &request).await?;
        pair(1, vec![answer.record], answer.report, false)?
            .pop()
            .ok_or_else(|| Error::Decode { op: OP, detail: "no record returned".into() })
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
        let answer: ManyDecrypted = self.post(OP, &request).await?;
        pair(encrypted.len(), answer.records, answer.report, true)
    }
}

/// Pairs each record with its report, checking there is one of each per
/// record sent, and converts the records to `T`.
fn pair<T: DeserializeOwned>(
    sent: usize,
    records: Vec<Value>,
    reports: Vec<RecordReport>,
    batch: bool,
) -> Result<Vec<Decrypted<T>>, Error> {
    check_count(OP, sent, "records", records.len())?;
    check_count(OP, sent, "reports", reports.len())?;
    records
        .into_iter()
        .zip(reports)
        .enumerate()
        .map(|(i, (record, report))| {
            let record = serde_json::from_value(record).map_err(|e| Error::Record {
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

    use super::*;

    fn report(id: &str) -> RecordReport {
        serde_json::from_value(json!({
            "record_key_id": id, "tenant": "demo", "schema": "patient", "schema_version": 1,
            "kek_version": 1, "stale_key_version": false, "fields": []
        }))
        .unwrap()
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
        let out: Vec<Decrypted<Patient>> = pair(
            2,
            vec![json!({"ssn": "123-45-6789", "age": 51}), json!({"age": 7})],
            vec![report("a"), report("b")],
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
        let e = pair::<Value>(2, vec![json!({})], vec![report("a")], true).unwrap_err();
        assert!(matches!(e, Error::Decode { .. }), "{e}");
        let e = pair::<Value>(1, vec![json!({})], vec![], false).unwrap_err();
        assert!(e.to_string().contains("reports"), "{e}");
    }

    #[test]
    fn a_record_that_does_not_fit_names_its_position_but_not_its_values() {
        let e = pair::<Patient>(
            2,
            vec![json!({"age": 1}), json!({"ssn": "123-45-6789", "age": "fifty-one"})],
            vec![report("a"), report("b")],
            true,
        )
        .unwrap_err();
        assert!(matches!(e, Error::Record { index: Some(1), .. }), "{e}");
        let message = e.to_string();
        assert!(!message.contains("fifty") && !message.contains("6789"), "{message}");
    }
}
