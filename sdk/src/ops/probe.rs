//! `GET /healthz` and `GET /readyz`.

use serde_json::Value;

use crate::client::Client;
use crate::error::Error;
use crate::operation::Operation;
use crate::transport::success_body;

/// The sidecar's answer to a readiness probe.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Readiness {
    /// Whether the sidecar can serve requests now (HTTP 200; `false` for 503).
    pub ready: bool,
    /// The sidecar's JSON explanation, as it is (`Null` if it sent none).
    pub detail: Value,
}

impl Client {
    /// Whether the sidecar process is up: `Ok` if it answers `GET /healthz`
    /// with success. Made once, never retried.
    pub async fn health(&self) -> Result<(), Error> {
        let answer = self.get(Operation::Health).await?;
        success_body(Operation::Health, answer).map(drop)
    }

    /// Whether the sidecar is ready to serve (`GET /readyz`): a 503 answer is
    /// `Ok` with `ready: false`, not an error. Made once, never retried.
    pub async fn ready(&self) -> Result<Readiness, Error> {
        let answer = self.get(Operation::Ready).await?;
        let ready = answer.status != 503;
        let body = if ready { success_body(Operation::Ready, answer)? } else { answer.body };
        let detail = serde_json::from_slice(&body).unwrap_or(Value::Null);
        Ok(Readiness { ready, detail })
    }
}
