//! `POST /v1/rewrap`.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{Many, One, check_count};
use crate::client::Client;
use crate::error::Error;
use crate::operation::Operation;

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
struct OneAnswer {
    record: Value,
    rewrapped: usize,
}

#[derive(Deserialize)]
struct ManyAnswer {
    records: Vec<Value>,
    rewrapped: usize,
}

impl Client {
    /// Moves an encrypted record to the tenant's active KEK version without
    /// re-encrypting its fields (only the wrapped data key changes). Store
    /// the result in place of the old record when `changed` is true.
    pub async fn rewrap(&self, encrypted: &(impl Serialize + ?Sized)) -> Result<Rewrapped, Error> {
        let answer: OneAnswer = self.post(Operation::Rewrap, &One { record: encrypted }).await?;
        Ok(Rewrapped { record: answer.record, changed: answer.rewrapped > 0 })
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
        let answer: ManyAnswer = self.post(Operation::Rewrap, &Many { records: encrypted }).await?;
        check_count(Operation::Rewrap, encrypted.len(), "records", answer.records.len())?;
        Ok(RewrappedBatch { records: answer.records, rewrapped: answer.rewrapped })
    }
}
