//! `POST /v1/encrypt`.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;

use super::{Many, One, batch_elements, encrypted_record};
use crate::client::Client;
use crate::error::Error;
use crate::operation::Operation;
use crate::schema_ref::SchemaRef;
use crate::transport::decode;

const OP: Operation = Operation::Encrypt;

/// `{"tenant", "schema", "schema_version"?, "record" | "records"}`.
#[derive(Serialize)]
pub(crate) struct EncryptRequest<'a, P> {
    pub(crate) tenant: &'a str,
    pub(crate) schema: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) schema_version: Option<u32>,
    #[serde(flatten)]
    pub(crate) payload: P,
}

#[derive(Deserialize)]
struct OneRecord<'a> {
    #[serde(borrow)]
    record: &'a RawValue,
}

/// Raw, so the records are counted before any is parsed.
#[derive(Deserialize)]
struct ManyRecords<'a> {
    #[serde(borrow)]
    records: &'a RawValue,
}

impl<'a, P> EncryptRequest<'a, P> {
    pub(crate) fn new(tenant: &'a str, schema: SchemaRef<'a>, payload: P) -> Self {
        Self { tenant, schema: schema.name(), schema_version: schema.version(), payload }
    }
}

impl Client {
    /// Encrypts one record of `tenant` under `schema` (a name for its latest
    /// version, or a [`SchemaRef::pinned`] version).
    ///
    /// `record` must serialize to a JSON object shaped as the schema
    /// describes. The result is the encrypted record: JSON to store as it
    /// is, not a `T` (its protected fields are ciphertext and it carries a
    /// keygate header). Encrypting the same record twice gives different
    /// ciphertext; see [`Client`] for why a retried encrypt is still safe.
    ///
    /// An answer whose record is not encrypted (no keygate header in `_kg`:
    /// something other than a sidecar answered) is [`Error::Decode`], so
    /// plaintext is never handed back as if it were safe to store.
    pub async fn encrypt<'s>(
        &self,
        tenant: &str,
        schema: impl Into<SchemaRef<'s>>,
        record: &(impl Serialize + ?Sized),
    ) -> Result<Value, Error> {
        let request = EncryptRequest::new(tenant, schema.into(), One { record });
        let body = self.post_for_body(OP, &request).await?;
        decode_one(&body)
    }

    /// Encrypts many records in one round trip; the results are in the same
    /// order. An empty slice returns an empty `Vec` without calling the
    /// sidecar. The sidecar caps the batch size (`too_many_records`). Every
    /// returned record is checked as [`encrypt`](Self::encrypt) checks one.
    pub async fn encrypt_batch<'s, R: Serialize>(
        &self,
        tenant: &str,
        schema: impl Into<SchemaRef<'s>>,
        records: &[R],
    ) -> Result<Vec<Value>, Error> {
        if records.is_empty() {
            return Ok(Vec::new());
        }
        let request = EncryptRequest::new(tenant, schema.into(), Many { records });
        let body = self.post_for_body(OP, &request).await?;
        decode_many(records.len(), &body)
    }
}

/// The encrypted record of an answer to [`Client::encrypt`].
pub(crate) fn decode_one(body: &[u8]) -> Result<Value, Error> {
    let answer: OneRecord<'_> = decode(OP, body)?;
    encrypted_record(OP, None, answer.record)
}

/// The encrypted records of an answer to [`Client::encrypt_batch`] of
/// `sent` records: exactly `sent`, each checked.
pub(crate) fn decode_many(sent: usize, body: &[u8]) -> Result<Vec<Value>, Error> {
    let answer: ManyRecords<'_> = decode(OP, body)?;
    batch_elements(OP, sent, "records", answer.records)?
        .into_iter()
        .enumerate()
        .map(|(i, record)| encrypted_record(OP, Some(i), record))
        .collect()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[derive(Serialize)]
    struct Patient {
        ssn: &'static str,
        age: u32,
    }

    #[test]
    fn single_request_carries_record_and_no_version_for_latest() {
        let patient = Patient { ssn: "123-45-6789", age: 51 };
        let body = EncryptRequest::new("demo", "patient".into(), One { record: &patient });
        assert_eq!(
            serde_json::to_value(&body).unwrap(),
            json!({"tenant": "demo", "schema": "patient", "record": {"ssn": "123-45-6789", "age": 51}})
        );
    }

    #[test]
    fn batch_request_carries_records_and_a_pinned_version() {
        let records = [json!({"ssn": "1"}), json!({"ssn": "2"})];
        let body = EncryptRequest::new(
            "demo",
            SchemaRef::pinned("patient", 3),
            Many { records: &records },
        );
        assert_eq!(
            serde_json::to_value(&body).unwrap(),
            json!({"tenant": "demo", "schema": "patient", "schema_version": 3,
                   "records": [{"ssn": "1"}, {"ssn": "2"}]})
        );
    }
}
