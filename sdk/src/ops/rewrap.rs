//! `POST /v1/rewrap`.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;

use super::{Many, One, batch_elements, encrypted_record};
use crate::client::Client;
use crate::error::Error;
use crate::operation::Operation;
use crate::transport::decode;

const OP: Operation = Operation::Rewrap;

/// A record after [`Client::rewrap`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Rewrapped {
    /// The record, its data key now wrapped under the active KEK version.
    pub record: Value,
    /// Whether the record changed (`false`: it already used the active
    /// version, and need not be written back).
    pub changed: bool,
}

/// Records after [`Client::rewrap_batch`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct RewrappedBatch {
    /// The records, in the order sent.
    pub records: Vec<Value>,
    /// How many of them changed.
    pub rewrapped: usize,
}

#[derive(Deserialize)]
struct OneAnswer<'a> {
    #[serde(borrow)]
    record: &'a RawValue,
    rewrapped: usize,
}

/// Raw, so the records are counted before any is parsed.
#[derive(Deserialize)]
struct ManyAnswer<'a> {
    #[serde(borrow)]
    records: &'a RawValue,
    rewrapped: usize,
}

impl Client {
    /// Moves an encrypted record to the tenant's active KEK version without
    /// re-encrypting its fields (only the wrapped data key changes). Store
    /// the result in place of the old record when `changed` is true. As with
    /// [`encrypt`](Self::encrypt), a returned record without a keygate header
    /// is [`Error::Decode`].
    pub async fn rewrap(&self, encrypted: &(impl Serialize + ?Sized)) -> Result<Rewrapped, Error> {
        let body = self.post_for_body(OP, &One { record: encrypted }).await?;
        decode_one(&body)
    }

    /// [`rewrap`](Self::rewrap) for many records in one round trip. An empty
    /// slice returns an empty batch without calling the sidecar.
    pub async fn rewrap_batch<R: Serialize>(
        &self,
        encrypted: &[R],
    ) -> Result<RewrappedBatch, Error> {
        if encrypted.is_empty() {
            return Ok(RewrappedBatch { records: Vec::new(), rewrapped: 0 });
        }
        let body = self.post_for_body(OP, &Many { records: encrypted }).await?;
        decode_many(encrypted.len(), &body)
    }
}

/// More records rewrapped than were sent is an answer from something
/// other than the sidecar (what the caller writes back depends on it).
fn check_rewrapped(sent: usize, rewrapped: usize) -> Result<(), Error> {
    if rewrapped > sent {
        return Err(Error::Decode {
            op: OP,
            detail: format!("{sent} records sent but {rewrapped} said to be rewrapped"),
        });
    }
    Ok(())
}

/// The record of an answer to [`Client::rewrap`], checked to be encrypted.
pub(crate) fn decode_one(body: &[u8]) -> Result<Rewrapped, Error> {
    let answer: OneAnswer<'_> = decode(OP, body)?;
    check_rewrapped(1, answer.rewrapped)?;
    let record = encrypted_record(OP, None, answer.record)?;
    Ok(Rewrapped { record, changed: answer.rewrapped > 0 })
}

/// The records of an answer to [`Client::rewrap_batch`] of `sent` records:
/// exactly `sent`, each checked.
pub(crate) fn decode_many(sent: usize, body: &[u8]) -> Result<RewrappedBatch, Error> {
    let answer: ManyAnswer<'_> = decode(OP, body)?;
    check_rewrapped(sent, answer.rewrapped)?;
    let records = batch_elements(OP, sent, "records", answer.records)?
        .into_iter()
        .enumerate()
        .map(|(i, record)| encrypted_record(OP, Some(i), record))
        .collect::<Result<_, _>>()?;
    Ok(RewrappedBatch { records, rewrapped: answer.rewrapped })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn more_rewrapped_than_sent_is_not_the_sidecars_answer() {
        let record = json!({"_kg": "kg1h:header", "ssn": "kg1r:x"});
        let body = |rewrapped: usize| {
            serde_json::to_vec(&json!({"records": [record, record], "rewrapped": rewrapped}))
                .unwrap()
        };
        assert_eq!(decode_many(2, &body(2)).unwrap().rewrapped, 2);
        let e = decode_many(2, &body(3)).unwrap_err().to_string();
        assert!(e.contains("2 records sent but 3 said to be rewrapped"), "{e}");
        let one = serde_json::to_vec(&json!({"record": record, "rewrapped": 2})).unwrap();
        assert!(matches!(decode_one(&one), Err(Error::Decode { .. })));
    }
}
