//! The sidecar's client for the key service: mutual TLS with the sidecar's
//! identity, HTTP/2 connection reuse, a timeout on every call, and
//! failover across replicas.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::Bytes;
use kms_core::record::{IndexPurpose, SchemaKeys};
use kms_core::schema::{FieldMode, Schema};
use kms_core::{
    DekRequest, IssuedDek, KekVersion, Key256, Name, RecordKeyId, Rewrapped, TenantId, WrappedDek,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use zeroize::Zeroize;

use super::config::KeyServiceConfig;
use crate::policy::EffectiveGrants;
use crate::unwrap_binary;
use crate::wire::SecretB64;

/// A key service call failed.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub(super) enum KsError {
    /// No replica could be reached or answered in time.
    #[error("key service unavailable: {0}")]
    Unavailable(String),
    /// The key service answered with an error.
    #[error("key service refused: {code}: {message}")]
    Api {
        /// HTTP status.
        status: u16,
        /// The API error code.
        code: String,
        /// Its message.
        message: String,
        /// Its `Retry-After` seconds, if it sent them.
        retry_after: Option<u64>,
    },
    /// The answer did not decode.
    #[error("unexpected key service answer: {0}")]
    Decode(String),
}

/// The client could not be built from its configuration.
#[derive(Debug, thiserror::Error)]
#[error("key service client: {0}")]
pub(super) struct ClientSetupError(String);

/// Client of the key service API.
#[derive(Debug)]
pub(super) struct KeyServiceClient {
    http: reqwest::Client,
    urls: Vec<String>,
    preferred: AtomicUsize,
}

#[derive(Deserialize)]
struct IssuedWire {
    record_key_id: RecordKeyId,
    dek: SecretB64,
    wrapped: WrappedDek,
}

#[derive(Deserialize)]
struct IssueWire {
    kek_version: KekVersion,
    keys: Vec<IssuedWire>,
}

#[derive(Deserialize)]
struct ItemWire {
    #[serde(default)]
    kek_version: Option<KekVersion>,
    #[serde(default)]
    wrapped: Option<WrappedDek>,
    #[serde(default)]
    error: Option<String>,
}

#[derive(Deserialize)]
struct ResultsWire {
    results: Vec<ItemWire>,
}

#[derive(Deserialize)]
struct DerivedWire {
    keys: Vec<DerivedKeyWire>,
}

#[derive(Deserialize)]
struct DerivedKeyWire {
    path: String,
    purpose: String,
    key: SecretB64,
}

/// Body of unwrap and rewrap calls.
#[derive(Serialize)]
struct BatchOut<'a> {
    items: Vec<ItemOut>,
    #[serde(skip_serializing_if = "Option::is_none")]
    purpose: Option<&'a Name>,
}

#[derive(Serialize)]
struct ItemOut {
    record_key_id: RecordKeyId,
    kek_version: KekVersion,
    wrapped: WrappedDek,
}

/// A request body and its media type.
struct Body {
    bytes: Bytes,
    content_type: &'static str,
}

/// Per-item results of an unwrap, and the tenant's active version.
pub(super) struct Unwrapped {
    /// The active KEK version now.
    pub(super) active_version: KekVersion,
    /// One result per request item, in order (error = the API code).
    pub(super) results: Vec<Result<Key256, String>>,
}

/// Path used to ask for a pseudonym namespace key.
const NAMESPACE_PATH: &str = "/_namespace";

impl KeyServiceClient {
    /// Builds the client from PEM files.
    pub(super) fn new(config: &KeyServiceConfig) -> Result<Self, ClientSetupError> {
        let read = |p: &std::path::Path| {
            std::fs::read(p).map_err(|e| ClientSetupError(format!("{}: {e}", p.display())))
        };
        let ca = reqwest::Certificate::from_pem_bundle(&read(&config.ca)?)
            .map_err(|e| ClientSetupError(format!("CA bundle: {e}")))?;
        let mut pem = zeroize::Zeroizing::new(read(&config.cert)?);
        pem.push(b'\n');
        pem.extend_from_slice(&zeroize::Zeroizing::new(read(&config.key)?));
        let identity = reqwest::Identity::from_pem(&pem)
            .map_err(|e| ClientSetupError(format!("client certificate: {e}")))?;
        let timeout = Duration::from_millis(config.timeout_ms.max(1));
        let http = reqwest::Client::builder()
            .tls_certs_only(ca)
            .identity(identity)
            .timeout(timeout)
            .connect_timeout(timeout)
            .pool_idle_timeout(Duration::from_secs(90))
            .build()
            .map_err(|e| ClientSetupError(e.to_string()))?;
        Ok(Self { http, urls: config.urls.clone(), preferred: AtomicUsize::new(0) })
    }

    /// A JSON call: `body` sent as JSON, the answer read as JSON.
    async fn call<T: DeserializeOwned, B: Serialize + ?Sized>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, KsError> {
        let body = match body {
            Some(body) => Some(Body {
                bytes: serde_json::to_vec(body).map_err(|e| KsError::Decode(e.to_string()))?.into(),
                content_type: "application/json",
            }),
            None => None,
        };
        let bytes = self.send(method, path, body).await?;
        serde_json::from_slice(&bytes).map_err(|e| KsError::Decode(e.to_string()))
    }

    /// Sends a request to the preferred replica, failing over to the next
    /// on a connection error or a 503; a success's body comes back as it
    /// is, an error answer as [`KsError::Api`].
    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Body>,
    ) -> Result<Bytes, KsError> {
        let start = self.preferred.load(Ordering::Relaxed);
        let mut last_error = String::from("no key service configured");
        for attempt in 0..self.urls.len() {
            let index = (start + attempt) % self.urls.len();
            let Some(base) = self.urls.get(index) else { continue };
            let mut request = self.http.request(method.clone(), format!("{base}{path}"));
            if let Some(body) = &body {
                request = request
                    .header(reqwest::header::CONTENT_TYPE, body.content_type)
                    .body(body.bytes.clone());
            }
            let response = match request.send().await {
                Ok(r) => r,
                Err(e) => {
                    // Connection-level: try the next replica.
                    last_error = format!("{base}: {}", without_url(&e));
                    continue;
                }
            };
            let status = response.status();
            if status == reqwest::StatusCode::SERVICE_UNAVAILABLE && attempt + 1 < self.urls.len() {
                last_error = format!("{base}: 503");
                continue;
            }
            self.preferred.store(index, Ordering::Relaxed);
            // Delta-seconds only (what keygate sends); a date is ignored.
            let retry_after = response
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
            let bytes =
                response.bytes().await.map_err(|e| KsError::Unavailable(without_url(&e)))?;
            if status.is_success() {
                return Ok(bytes);
            }
            let error: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            let field = |name: &str| {
                error
                    .pointer(&format!("/error/{name}"))
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned()
            };
            let (code, message) = (field("code"), field("message"));
            if status == reqwest::StatusCode::SERVICE_UNAVAILABLE {
                return Err(KsError::Unavailable(format!("{code}: {message}")));
            }
            return Err(KsError::Api { status: status.as_u16(), code, message, retry_after });
        }
        Err(KsError::Unavailable(last_error))
    }

    /// Issues `count` fresh DEKs for `tenant`.
    pub(super) async fn issue(
        &self,
        tenant: &TenantId,
        count: usize,
    ) -> Result<Vec<IssuedDek>, KsError> {
        let body = json!({ "count": count });
        let wire: IssueWire = self
            .call(reqwest::Method::POST, &format!("/v1/tenants/{tenant}/datakeys"), Some(&body))
            .await?;
        Ok(wire
            .keys
            .into_iter()
            .map(|k| IssuedDek::new(k.record_key_id, wire.kek_version, k.wrapped, k.dek.0))
            .collect())
    }

    /// Unwraps DEKs (one call for the whole batch), in the binary form of
    /// the exchange ([`crate::unwrap_binary`]).
    pub(super) async fn unwrap(
        &self,
        tenant: &TenantId,
        items: &[DekRequest],
        purpose: Option<&Name>,
    ) -> Result<Unwrapped, KsError> {
        let body = Body {
            bytes: unwrap_binary::encode_request(purpose, items).into(),
            content_type: unwrap_binary::CONTENT_TYPE,
        };
        let path = format!("/v1/tenants/{tenant}/datakeys/unwrap");
        let answer = self.send(reqwest::Method::POST, &path, Some(body)).await?;
        let decoded = unwrap_binary::decode_answer(&answer, items.len());
        wipe(answer);
        let (active_version, results) =
            decoded.map_err(|e| KsError::Decode(format!("unwrap: {e}")))?;
        Ok(Unwrapped { active_version, results })
    }

    /// Moves wrapped DEKs to the active KEK version (no plaintext travels).
    pub(super) async fn rewrap(
        &self,
        tenant: &TenantId,
        items: &[DekRequest],
    ) -> Result<Vec<Result<Rewrapped, String>>, KsError> {
        let body = BatchOut { items: wire_items(items), purpose: None };
        let wire: ResultsWire = self
            .call(
                reqwest::Method::POST,
                &format!("/v1/tenants/{tenant}/datakeys/rewrap"),
                Some(&body),
            )
            .await?;
        if wire.results.len() != items.len() {
            return Err(KsError::Decode("rewrap answered a different number of items".into()));
        }
        Ok(wire
            .results
            .into_iter()
            .map(|r| match (r.kek_version, r.wrapped, r.error) {
                (Some(kek_version), Some(wrapped), _) => Ok(Rewrapped { kek_version, wrapped }),
                (_, _, error) => Err(error.unwrap_or_else(|| "cannot_decrypt".into())),
            })
            .collect())
    }

    /// The index-derived keys of a schema for a tenant.
    pub(super) async fn schema_keys(
        &self,
        tenant: &TenantId,
        schema: &Schema,
    ) -> Result<SchemaKeys, KsError> {
        let fields: Vec<Value> = schema
            .fields
            .iter()
            .filter_map(|f| {
                let mode = match f.mode {
                    FieldMode::Randomized => return None,
                    FieldMode::Deterministic => "deterministic",
                    FieldMode::BlindIndex => "blind_index",
                    FieldMode::Pseudonym => "pseudonym",
                };
                Some(json!({ "path": f.path.as_str(), "mode": mode, "namespace": f.namespace }))
            })
            .collect();
        if fields.is_empty() {
            return SchemaKeys::from_keys(tenant, schema, |_, _| None)
                .map_err(|e| KsError::Decode(e.to_string()));
        }
        let body = json!({ "schema": schema.name, "fields": fields });
        let mut wire: DerivedWire = self
            .call(reqwest::Method::POST, &format!("/v1/tenants/{tenant}/derived"), Some(&body))
            .await?;
        SchemaKeys::from_keys(tenant, schema, |field, purpose| {
            let at = wire
                .keys
                .iter()
                .position(|k| k.path == field.path.as_str() && k.purpose == purpose.label())?;
            Some(wire.keys.swap_remove(at).key.0)
        })
        .map_err(|e| KsError::Decode(e.to_string()))
    }

    /// The key of a pseudonym namespace.
    pub(super) async fn pseudonym_key(
        &self,
        tenant: &TenantId,
        namespace: &Name,
    ) -> Result<Key256, KsError> {
        let body = json!({
            "schema": namespace,
            "fields": [{ "path": NAMESPACE_PATH, "mode": "pseudonym", "namespace": namespace }],
        });
        let wire: DerivedWire = self
            .call(reqwest::Method::POST, &format!("/v1/tenants/{tenant}/derived"), Some(&body))
            .await?;
        wire.keys
            .into_iter()
            .find(|k| k.purpose == IndexPurpose::Pseudonym.label())
            .map(|k| k.key.0)
            .ok_or_else(|| KsError::Decode("no pseudonym key in the answer".into()))
    }

    /// This sidecar's grants.
    pub(super) async fn policy_self(&self) -> Result<EffectiveGrants, KsError> {
        self.call(reqwest::Method::GET, "/v1/policy/self", None::<&Value>).await
    }

    /// Reports field-level access events.
    pub(super) async fn report(&self, events: &impl Serialize) -> Result<(), KsError> {
        let _: Value = self.call(reqwest::Method::POST, "/v1/audit/events", Some(events)).await?;
        Ok(())
    }
}

fn wire_items(items: &[DekRequest]) -> Vec<ItemOut> {
    items
        .iter()
        .map(|i| ItemOut {
            record_key_id: i.record_key_id,
            kek_version: i.kek_version,
            wrapped: i.wrapped,
        })
        .collect()
}

/// Wipes an answer that carried keys once they are copied out, if this is
/// the buffer's only reference (a body that came in several frames was
/// gathered into a buffer of its own; one frame may share hyper's). The
/// buffers of hyper and rustls are out of reach: see the threat model.
fn wipe(answer: Bytes) {
    if let Ok(mut owned) = answer.try_into_mut() {
        owned.as_mut().zeroize();
    }
}

/// A transport error's text without the URL's query (none is used) —
/// kept short for logs and 503 messages.
fn without_url(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "timed out".to_owned()
    } else if e.is_connect() {
        "connection refused or failed".to_owned()
    } else {
        e.to_string()
    }
}
