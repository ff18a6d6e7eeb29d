//! The sidecar's client for the key service: mutual TLS with the sidecar's
//! identity, HTTP/2 connection reuse, a timeout on every call, and
//! failover across replicas.
//!
//! The certificate, key and CA bundle are reloaded when their files change
//! (polled) or on SIGHUP: a reload builds a whole new HTTP client and swaps
//! it in; calls under way finish on the client they started with, and a
//! broken file keeps the old client (logged, counted). Under the
//! production profile a reload is held to the rules the start enforces on
//! these files (`tls.development_pki`, `files.private_keys`). The key
//! service may be pinned to its identity (`key_service.server_identity`).

use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use axum::body::Bytes;
use kms_core::record::{IndexPurpose, SchemaKeys};
use kms_core::schema::{FieldMode, Schema};
use kms_core::{
    DekRequest, IssuedDek, KekVersion, Key256, Name, RecordKeyId, Rewrapped, TenantId, WrappedDek,
};
use prometheus_client::metrics::counter::Counter;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::sign::SingleCertAndKey;
use rustls::{CertificateError, DigitallySignedStruct, OtherError, SignatureScheme};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use zeroize::Zeroize;

use super::config::KeyServiceConfig;
use crate::compliance::{self, Profile};
use crate::config::TlsConfig;
use crate::policy::EffectiveGrants;
use crate::wire::SecretB64;
use crate::{issue_binary, unwrap_binary};

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

impl KsError {
    /// Whether the key service said the tenant's keys are destroyed
    /// (shredded): final, unlike every other failure.
    pub(super) fn is_key_destroyed(&self) -> bool {
        matches!(self, Self::Api { code, .. } if code == "key_destroyed")
    }
}

/// The client could not be built from its configuration, or a reload
/// was not taken.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(super) enum ClientSetupError {
    /// A file is missing or not what it should be (named), or rustls
    /// refused the material.
    #[error("key service client: {0}")]
    Invalid(String),
    /// The production profile refuses the files: the failed rules, each
    /// with its provision and what was found.
    #[error("key service client: the production profile refuses the TLS files: {0}")]
    Refused(String),
    /// A file was replaced while the client was built from them, so the
    /// rules may have judged other files than those loaded: a renewal
    /// under way, not a broken file.
    #[error(
        "key service client: the TLS files changed while they were read (a renewal under way?)"
    )]
    Changed,
}

/// Client of the key service API.
#[derive(Debug)]
pub(super) struct KeyServiceClient {
    /// The HTTP client built from the current TLS files; a reload swaps
    /// in a new one.
    http: ArcSwap<reqwest::Client>,
    /// What the client is built from, for reloads.
    config: KeyServiceConfig,
    /// The profile whose rules every reload is held to.
    profile: Profile,
    /// What the TLS files looked like just before the current client was
    /// built from them.
    stamps: Mutex<Stamps>,
    /// Per replica (as `config.urls`): when (ms after `started`, counted from 1)
    /// its last TLS failure was logged; 0 if never.
    tls_warned_ms: Vec<AtomicU64>,
    metrics: ClientMetrics,
    /// Each attempt's timeout.
    timeout: Duration,
    preferred: AtomicUsize,
    /// Until when (ms after `started`, counted from 1) unwraps go as JSON,
    /// because a key service older than the binary form answered it 415 (a
    /// sidecar upgraded first); 0 while the binary form works.
    json_until_ms: AtomicU64,
    started: Instant,
    /// How long a 415 sends unwraps back to JSON before the binary form is
    /// tried again (the key service may have been upgraded meanwhile).
    json_for: Duration,
}

/// [`KeyServiceClient::json_for`]: one extra round trip a minute against
/// an older key service.
const JSON_FOR: Duration = Duration::from_secs(60);

/// How often a replica's TLS failures are logged: each is counted, but a
/// sidecar calling a replica with the wrong certificate thousands of times
/// a second must not flood the log.
const TLS_WARN_EVERY: Duration = Duration::from_secs(60);

/// What `crate::tls::file_stamps` says of the certificate, key and CA files.
type Stamps = Vec<Option<(SystemTime, u64, u64)>>;

/// The client's counters: the sidecar's [`Metrics`](crate::metrics::Metrics)
/// ones once [`KeyServiceClient::counting_into`] is called, else its own.
#[derive(Debug, Default)]
struct ClientMetrics {
    /// Reloads of the TLS files that failed (the previous client stays).
    reload_failures: Counter,
    /// Calls to a replica that failed in the TLS handshake.
    tls_failures: Counter,
}

/// Verifies the key service's certificate as WebPKI does (a chain to
/// `key_service.ca`, the URL's host name, validity), then requires its
/// identity to be `key_service.server_identity`: the CA may issue
/// certificates for that host name to others.
#[derive(Debug)]
struct PinnedIdentity {
    webpki: Arc<WebPkiServerVerifier>,
    identity: String,
}

/// The key service's certificate is not of the configured identity.
#[derive(Debug, thiserror::Error)]
#[error(
    "the key service's certificate is of identity {presented}, not key_service.server_identity \
     {expected:?}"
)]
struct NotTheServerIdentity {
    expected: String,
    /// Quoted, or a sentence when it names none.
    presented: String,
}

impl ServerCertVerifier for PinnedIdentity {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verified = self.webpki.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        // Read as the key service reads its callers' certificates: the
        // one URI SAN in its one plain spelling. A DNS-only certificate
        // yields a host name, which never equals a URI.
        let presented = crate::tls::identity_of(Some(std::slice::from_ref(end_entity)));
        if presented.as_deref() == Some(self.identity.as_str()) {
            return Ok(verified);
        }
        let mismatch = NotTheServerIdentity {
            expected: self.identity.clone(),
            presented: presented
                .map_or_else(|| "none (no single URI SAN)".into(), |p| format!("{p:?}")),
        };
        Err(rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(
            mismatch,
        )))))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
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

impl IssueWire {
    /// The keys of a JSON issue answer that must hold exactly `count`.
    fn keys_from(body: &[u8], count: usize) -> Result<Vec<IssuedDek>, String> {
        let wire: Self = serde_json::from_slice(body).map_err(|e| e.to_string())?;
        if wire.keys.len() != count {
            return Err("the answer holds a different number of keys".into());
        }
        let version = wire.kek_version;
        Ok(wire
            .keys
            .into_iter()
            .map(|k| IssuedDek::new(k.record_key_id, version, k.wrapped, k.dek.0))
            .collect())
    }
}

#[derive(Deserialize)]
struct ItemWire {
    #[serde(default)]
    dek: Option<SecretB64>,
    #[serde(default)]
    kek_version: Option<KekVersion>,
    #[serde(default)]
    wrapped: Option<WrappedDek>,
    #[serde(default)]
    error: Option<String>,
}

#[derive(Deserialize)]
struct UnwrapWire {
    active_version: KekVersion,
    results: Vec<ItemWire>,
}

impl UnwrapWire {
    /// The results of a JSON unwrap answer that must hold exactly `count`.
    fn unwrapped(self, count: usize) -> Result<Unwrapped, KsError> {
        if self.results.len() != count {
            return Err(KsError::Decode("unwrap answered a different number of items".into()));
        }
        let results = self
            .results
            .into_iter()
            .map(|r| match (r.dek, r.error) {
                (Some(dek), _) => Ok(dek.0),
                (None, error) => Err(error.unwrap_or_else(|| "cannot_decrypt".into())),
            })
            .collect();
        Ok(Unwrapped { active_version: self.active_version, results })
    }
}

#[derive(Deserialize)]
struct ResultsWire {
    results: Vec<ItemWire>,
}

impl ResultsWire {
    /// The results of a rewrap answer that must hold exactly `count`.
    fn rewrapped(self, count: usize) -> Result<Vec<Result<Rewrapped, String>>, KsError> {
        if self.results.len() != count {
            return Err(KsError::Decode("rewrap answered a different number of items".into()));
        }
        Ok(self
            .results
            .into_iter()
            .map(|r| match (r.kek_version, r.wrapped, r.error) {
                (Some(kek_version), Some(wrapped), _) => Ok(Rewrapped { kek_version, wrapped }),
                (_, _, error) => Err(error.unwrap_or_else(|| "cannot_decrypt".into())),
            })
            .collect())
    }
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

/// A request body, its media type, and the answer's media type asked for
/// (if not JSON).
struct Body {
    bytes: Bytes,
    content_type: &'static str,
    accept: Option<&'static str>,
}

/// A success answer: its body and media type.
struct Answer {
    body: Bytes,
    media_type: Option<reqwest::header::HeaderValue>,
}

impl Answer {
    /// Whether the answer is of media type `expected` (lower case).
    fn is(&self, expected: &str) -> bool {
        crate::extract::is_media_type(self.media_type.as_ref(), expected)
    }
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
    /// Builds the client from PEM files, which under `profile` production
    /// must pass the rules on them, now and at every reload.
    pub(super) fn new(
        config: &KeyServiceConfig,
        profile: Profile,
    ) -> Result<Self, ClientSetupError> {
        let timeout = Duration::from_millis(config.timeout_ms.max(1));
        // A start has no old client to keep, nor a next poll to wait for:
        // files caught mid-renewal are read once more at once.
        let (http, before) = match read_checked(config, profile, timeout) {
            Err(ClientSetupError::Changed) => read_checked(config, profile, timeout)?,
            read => read?,
        };
        Ok(Self {
            http: ArcSwap::from_pointee(http),
            config: config.clone(),
            profile,
            stamps: Mutex::new(before),
            tls_warned_ms: config.urls.iter().map(|_| AtomicU64::new(0)).collect(),
            metrics: ClientMetrics::default(),
            timeout,
            preferred: AtomicUsize::new(0),
            json_until_ms: AtomicU64::new(0),
            started: Instant::now(),
            json_for: JSON_FOR,
        })
    }

    /// Builds a new HTTP client from the TLS files and swaps it in; calls
    /// under way finish on the old one. On failure, or files the
    /// production profile refuses, the old client stays, and the failure
    /// (naming the file, or the rules) is logged and counted in
    /// `keygate_sidecar_tls_reload_failures_total`. Files caught being
    /// replaced are neither: they are read again at the next poll.
    pub(super) fn reload_tls(&self) -> Result<(), ClientSetupError> {
        match read_checked(&self.config, self.profile, self.timeout) {
            Ok((http, before)) => {
                self.http.store(Arc::new(http));
                *self.stamps.lock().unwrap_or_else(|p| p.into_inner()) = before;
                tracing::info!("key service client certificate, key and CA bundle reloaded");
                Ok(())
            }
            // The stamps kept are the old files': the next poll sees the
            // change and reads them again, whole by then.
            Err(ClientSetupError::Changed) => {
                tracing::info!(
                    "the key service client's TLS files changed while they were read; they are \
                     read again at the next poll"
                );
                Err(ClientSetupError::Changed)
            }
            Err(ClientSetupError::Refused(rules)) => {
                self.metrics.reload_failures.inc();
                tracing::error!(
                    %rules,
                    "the production profile refuses the key service client's new TLS files; \
                     keeping the previous ones"
                );
                Err(ClientSetupError::Refused(rules))
            }
            Err(e) => {
                self.metrics.reload_failures.inc();
                tracing::error!(
                    error = %e,
                    "reloading the key service client's TLS files failed; keeping the previous ones"
                );
                Err(e)
            }
        }
    }

    /// [`Self::reload_tls`] if a TLS file changed (modification time, size
    /// or inode, following links, as the key service checks its own).
    pub(super) fn reload_tls_if_changed(&self) -> Result<bool, ClientSetupError> {
        let now = crate::tls::file_stamps(&tls_paths(&self.config));
        let changed = *self.stamps.lock().unwrap_or_else(|p| p.into_inner()) != now;
        if changed {
            self.reload_tls()?;
        }
        Ok(changed)
    }

    /// Counts TLS reload and handshake failures in the sidecar's metrics.
    pub(super) fn counting_into(mut self, metrics: &crate::metrics::Metrics) -> Self {
        self.metrics = ClientMetrics {
            reload_failures: metrics.sidecar_tls_reload_failures.clone(),
            tls_failures: metrics.key_service_tls_failures.clone(),
        };
        self
    }

    /// Milliseconds since `started`, counted from 1 (so that 0 can mean
    /// "never").
    fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX).saturating_add(1)
    }

    /// Counts a TLS failure of replica `index` and logs it, at most once
    /// per [`TLS_WARN_EVERY`] per replica: unlike a refused connection it
    /// is a configuration or certificate problem (or someone else
    /// answering at that address), and does not mend by waiting.
    fn note_tls_failure(&self, index: usize, url: &str, failure: &str) {
        self.metrics.tls_failures.inc();
        let Some(warned) = self.tls_warned_ms.get(index) else { return };
        let (now, last) = (self.now_ms(), warned.load(Ordering::Relaxed));
        let every = u64::try_from(TLS_WARN_EVERY.as_millis()).unwrap_or(u64::MAX);
        let due = last == 0 || now >= last.saturating_add(every);
        if due && warned.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_ok() {
            tracing::warn!(
                url,
                failure,
                "TLS handshake with a key service replica failed (a certificate or the TLS \
                 setup refused, not an unreachable replica); failing over to the next replica \
                 if there is one (this replica's failures are logged at most once a minute, \
                 and all counted in keygate_sidecar_key_service_tls_failures_total)"
            );
        }
    }

    /// The longest one call can take: every replica in turn, and for an
    /// unwrap, again as JSON after a 415.
    pub(super) fn longest_call(&self) -> Duration {
        let attempts = u32::try_from(self.config.urls.len()).unwrap_or(u32::MAX).saturating_mul(2);
        self.timeout.saturating_mul(attempts)
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
                // Not reached with these types; named as what it would be.
                bytes: serde_json::to_vec(body)
                    .map_err(|e| KsError::Decode(format!("request not encodable: {e}")))?
                    .into(),
                content_type: "application/json",
                accept: None,
            }),
            None => None,
        };
        let answer = self.send(method, path, body).await?;
        let parsed =
            serde_json::from_slice(&answer.body).map_err(|e| KsError::Decode(e.to_string()));
        // Issued, unwrapped and derived keys come in JSON answers too.
        wipe(answer.body);
        parsed
    }

    /// Sends a request to the preferred replica, failing over to the next
    /// on a connection error or a 503; a success comes back as it is, an
    /// error answer as [`KsError::Api`] (the last replica's 503 too, so
    /// that its code and `Retry-After` reach the pool's backoff and the
    /// app: a key service shedding load asks for a pause, not retries).
    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Body>,
    ) -> Result<Answer, KsError> {
        let start = self.preferred.load(Ordering::Relaxed);
        let mut last_error = String::from("no key service configured");
        // The whole call on one client, even if a reload swaps it meanwhile.
        let http = self.http.load_full();
        for attempt in 0..self.config.urls.len() {
            let index = (start + attempt) % self.config.urls.len();
            let Some(base) = self.config.urls.get(index) else { continue };
            let mut request = http.request(method.clone(), format!("{base}{path}"));
            if let Some(body) = &body {
                request = request
                    .header(reqwest::header::CONTENT_TYPE, body.content_type)
                    .body(body.bytes.clone());
                if let Some(accept) = body.accept {
                    request = request.header(reqwest::header::ACCEPT, accept);
                }
            }
            let response = match request.send().await {
                Ok(r) => r,
                Err(e) => {
                    // Connection-level: try the next replica.
                    let reason = match tls_failure(&e) {
                        Some(failure) => {
                            self.note_tls_failure(index, base, &failure);
                            format!("TLS handshake failed: {failure}")
                        }
                        None => without_url(&e),
                    };
                    last_error = format!("{base}: {reason}");
                    continue;
                }
            };
            let status = response.status();
            if status == reqwest::StatusCode::SERVICE_UNAVAILABLE
                && attempt + 1 < self.config.urls.len()
            {
                last_error = format!("{base}: 503");
                continue;
            }
            self.preferred.store(index, Ordering::Relaxed);
            // Delta-seconds only (what keygate sends); a date is ignored.
            let retry_after = response
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
            let media_type = response.headers().get(reqwest::header::CONTENT_TYPE).cloned();
            let bytes =
                response.bytes().await.map_err(|e| KsError::Unavailable(without_url(&e)))?;
            if status.is_success() {
                return Ok(Answer { body: bytes, media_type });
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
            return Err(KsError::Api { status: status.as_u16(), code, message, retry_after });
        }
        Err(KsError::Unavailable(last_error))
    }

    /// Issues `count` fresh DEKs for `tenant`, asked in the binary form
    /// ([`crate::issue_binary`]) and read in whichever form the answer is
    /// (a key service older than the binary form answers JSON). Exactly
    /// `count` keys, or an error.
    pub(super) async fn issue(
        &self,
        tenant: &TenantId,
        count: usize,
    ) -> Result<Vec<IssuedDek>, KsError> {
        let body = Body {
            bytes: format!("{{\"count\":{count}}}").into_bytes().into(),
            content_type: "application/json",
            accept: Some(issue_binary::ACCEPT),
        };
        let path = format!("/v1/tenants/{tenant}/datakeys");
        let answer = self.send(reqwest::Method::POST, &path, Some(body)).await?;
        let decoded = if answer.is(issue_binary::CONTENT_TYPE) {
            issue_binary::decode_answer(&answer.body, count).map_err(|e| e.to_string())
        } else {
            IssueWire::keys_from(&answer.body, count)
        };
        wipe(answer.body);
        decoded.map_err(|e| KsError::Decode(format!("issue: {e}")))
    }

    /// Unwraps DEKs (one call for the whole batch), in the binary form of
    /// the exchange ([`crate::unwrap_binary`]) unless the key service
    /// predates it: then as JSON for [`JSON_FOR`] before trying again.
    pub(super) async fn unwrap(
        &self,
        tenant: &TenantId,
        items: &[DekRequest],
        purpose: Option<&Name>,
    ) -> Result<Unwrapped, KsError> {
        let path = format!("/v1/tenants/{tenant}/datakeys/unwrap");
        // Counted from 1, so that 0 always means "binary".
        let now_ms = self.now_ms();
        let json_until = self.json_until_ms.load(Ordering::Relaxed);
        if now_ms >= json_until {
            match self.unwrap_binary(&path, items, purpose).await {
                Err(KsError::Api { status: 415, .. }) => {
                    let json_for = u64::try_from(self.json_for.as_millis()).unwrap_or(u64::MAX);
                    let until = now_ms.saturating_add(json_for);
                    if self.json_until_ms.swap(until, Ordering::Relaxed) == 0 {
                        tracing::warn!(
                            "the key service does not take the binary unwrap form (an older \
                             version); unwrapping as JSON, and trying again every {} s",
                            self.json_for.as_secs()
                        );
                    }
                }
                answer => {
                    if answer.is_ok() && json_until != 0 {
                        self.json_until_ms.store(0, Ordering::Relaxed);
                        tracing::info!("the key service takes the binary unwrap form again");
                    }
                    return answer;
                }
            }
        }
        self.unwrap_json(&path, items, purpose).await
    }

    async fn unwrap_binary(
        &self,
        path: &str,
        items: &[DekRequest],
        purpose: Option<&Name>,
    ) -> Result<Unwrapped, KsError> {
        let body = Body {
            bytes: unwrap_binary::encode_request(purpose, items).into(),
            content_type: unwrap_binary::CONTENT_TYPE,
            accept: None,
        };
        let answer = self.send(reqwest::Method::POST, path, Some(body)).await?;
        if !answer.is(unwrap_binary::CONTENT_TYPE) {
            wipe(answer.body);
            return Err(KsError::Decode("unwrap: the answer is not in the form asked".into()));
        }
        let decoded = unwrap_binary::decode_answer(&answer.body, items.len());
        wipe(answer.body);
        let (active_version, results) =
            decoded.map_err(|e| KsError::Decode(format!("unwrap: {e}")))?;
        Ok(Unwrapped { active_version, results })
    }

    async fn unwrap_json(
        &self,
        path: &str,
        items: &[DekRequest],
        purpose: Option<&Name>,
    ) -> Result<Unwrapped, KsError> {
        // Serialized straight from typed items (no JSON tree per item).
        let body = BatchOut { items: wire_items(items), purpose };
        let wire: UnwrapWire = self.call(reqwest::Method::POST, path, Some(&body)).await?;
        wire.unwrapped(items.len())
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
        wire.rewrapped(items.len())
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

/// The TLS paths of `config` as the key service's stamp check takes them.
fn tls_paths(config: &KeyServiceConfig) -> TlsConfig {
    TlsConfig {
        cert: config.cert.clone(),
        key: config.key.clone(),
        client_ca: config.ca.clone(),
        reload_interval_secs: config.tls_reload_interval_secs,
    }
}

fn file_error(path: &Path, reason: impl std::fmt::Display) -> ClientSetupError {
    ClientSetupError::Invalid(format!("{}: {reason}", path.display()))
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, ClientSetupError> {
    crate::tls::read_certs(path).map_err(|e| ClientSetupError::Invalid(e.to_string()))
}

/// An HTTP client of the TLS files `config` names, refused under the
/// production profile if the files fail the rules the start enforces on
/// them (`compliance::sidecar_tls_report`): a CA bundle swapped for one
/// with a development CA, whose key is a file that can mint any identity,
/// would defeat `server_identity`. Returns the files' stamps from before
/// they were read.
fn read_checked(
    config: &KeyServiceConfig,
    profile: Profile,
    timeout: Duration,
) -> Result<(reqwest::Client, Stamps), ClientSetupError> {
    let paths = tls_paths(config);
    // Stamped before reading: a file changed while it is read is seen as
    // changed at the next check, not taken as read.
    let before = crate::tls::file_stamps(&paths);
    let http = build_http(config, timeout)?;
    compliance::refused_in_production(profile, || compliance::sidecar_tls_report(profile, config))
        .map_err(|e| ClientSetupError::Refused(compliance::refusal(&e)))?;
    // The rules read the files by name: had one been replaced meanwhile,
    // they would have judged another file than the one loaded.
    if crate::tls::file_stamps(&paths) != before {
        return Err(ClientSetupError::Changed);
    }
    Ok((http, before))
}

/// The TLS configuration of the files `config` names: the sidecar's
/// certificate, and the key service's checked against the CA bundle, the
/// URL's host name and, if set, `server_identity`.
fn client_tls(config: &KeyServiceConfig) -> Result<rustls::ClientConfig, ClientSetupError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for ca in read_certs(&config.ca)? {
        roots.add(ca).map_err(|e| file_error(&config.ca, e))?;
    }
    let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| file_error(&config.ca, e))?;
    let verifier: Arc<dyn ServerCertVerifier> = match &config.server_identity {
        Some(identity) => Arc::new(PinnedIdentity { webpki, identity: identity.clone() }),
        None => webpki,
    };
    let chain = read_certs(&config.cert)?;
    // The key's decoded bytes wiped once rustls holds its signing key.
    let certified = crate::tls::certified_key(chain, &config.key)
        .map_err(|e| ClientSetupError::Invalid(e.to_string()))?;
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientSetupError::Invalid(e.to_string()))?
        // `dangerous` only names the door: this verifier is WebPKI's plus
        // the identity check.
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(Arc::new(SingleCertAndKey::from(certified)));
    // What reqwest would offer: HTTP/2 where the key service speaks it.
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tls)
}

/// An HTTP client of the TLS files `config` names.
fn build_http(
    config: &KeyServiceConfig,
    timeout: Duration,
) -> Result<reqwest::Client, ClientSetupError> {
    reqwest::Client::builder()
        .tls_backend_preconfigured(client_tls(config)?)
        .timeout(timeout)
        .connect_timeout(timeout)
        .pool_idle_timeout(Duration::from_secs(90))
        // A redirect would send the request (and take keys from
        // whoever answers) somewhere the configuration never named,
        // perhaps without TLS.
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| ClientSetupError::Invalid(e.to_string()))
}

/// What failed in the TLS handshake behind a transport error, if it
/// failed there: the key service's certificate refused (untrusted, expired,
/// another host name or identity) or ours refused by it.
fn tls_failure(e: &reqwest::Error) -> Option<String> {
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(error) = next {
        match error.downcast_ref::<rustls::Error>() {
            Some(rustls::Error::InvalidCertificate(CertificateError::Other(other))) => {
                return Some(other.to_string());
            }
            Some(rustls) => return Some(rustls.to_string()),
            None => {}
        }
        // rustls's error reaches reqwest's inside an `io::Error` (inside
        // another), whose `source()` skips what it wraps.
        next = match error.downcast_ref::<std::io::Error>().and_then(std::io::Error::get_ref) {
            Some(wrapped) => Some(wrapped),
            None => error.source(),
        };
    }
    None
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

/// The body of the `ks_answer` fuzz target (see `crate::fuzzing`): every
/// JSON answer of the key service read as the sidecar reads it. The first
/// byte is the number of keys or items asked for; the rest is the answer.
/// The property is that nothing panics: the count checks are the
/// functions' own (`keys_from`, `unwrapped`, `rewrapped`), unit-tested.
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) fn fuzz_answers(data: &[u8]) {
    let Some((&count, answer)) = data.split_first() else { return };
    let count = usize::from(count);
    let _ = IssueWire::keys_from(answer, count);
    let _ = serde_json::from_slice::<UnwrapWire>(answer).map(|w| w.unwrapped(count));
    let _ = serde_json::from_slice::<ResultsWire>(answer).map(|w| w.rewrapped(count));
    let _ = serde_json::from_slice::<DerivedWire>(answer);
}

#[cfg(test)]
pub(super) mod tests {
    use std::path::Path;
    use std::sync::Arc;

    use axum::Router;
    use axum::body::Bytes;
    use axum::extract::Path as UrlPath;
    use axum::http::{HeaderMap, StatusCode, header};
    use axum::response::IntoResponse;
    use axum::routing::post;
    use data_encoding::BASE64URL_NOPAD;
    use kms_core::SecretBuf;
    use rustls::pki_types::pem::PemObject;

    use super::*;
    use crate::pki::{DevCa, Validity};

    /// The unwrap and issue calls a fake key service saw, by form, and
    /// the identity of each connection's client.
    #[derive(Default)]
    struct Seen {
        binary: AtomicUsize,
        json: AtomicUsize,
        issued_binary: AtomicUsize,
        issued_json: AtomicUsize,
        clients: Mutex<Vec<String>>,
    }

    fn refusal(status: StatusCode, code: &str) -> axum::response::Response {
        (status, axum::Json(json!({"error": {"code": code, "message": "refused"}}))).into_response()
    }

    /// A fake key service's unwrap, behind mutual TLS: JSON, and the
    /// binary form if `takes_binary` (otherwise 415, what a key service
    /// older than it answered); 403 for tenant `denied`. Every DEK is
    /// `[7; 32]`, the active version 4. And its issue: in the binary form
    /// when asked and `takes_binary`, otherwise JSON (an older one ignores
    /// `Accept`); one key short for tenant `short`, one over for `long`.
    /// Returns its URL.
    async fn key_service(dir: &Path, ca: &DevCa, seen: Arc<Seen>, takes_binary: bool) -> String {
        key_service_of(dir, ca, seen, takes_binary, None).await
    }

    /// [`key_service`] whose certificate also names `identity` (a URI SAN).
    async fn key_service_of(
        dir: &Path,
        ca: &DevCa,
        seen: Arc<Seen>,
        takes_binary: bool,
        identity: Option<&str>,
    ) -> String {
        let server = match identity {
            Some(uri) => ca.issue_server_with_identity(&["localhost"], uri, Validity::days(1)),
            None => ca.issue_server(&["localhost"], Validity::days(1)),
        }
        .unwrap();
        let tls = crate::tls::tests::write_files(dir, &server, ca);
        let acceptor =
            tokio_rustls::TlsAcceptor::from(crate::tls::build_server_config(&tls).unwrap());
        let (seen_issue, seen_clients) = (seen.clone(), seen.clone());
        let unwrap = move |UrlPath(tenant): UrlPath<String>, headers: HeaderMap, body: Bytes| {
            let seen = seen.clone();
            async move {
                let media = headers.get(header::CONTENT_TYPE).cloned();
                let json = media.as_ref().is_some_and(|v| v == "application/json");
                let binary = media.as_ref().is_some_and(|v| v == unwrap_binary::CONTENT_TYPE);
                match (json, binary && takes_binary) {
                    (true, _) => seen.json.fetch_add(1, Ordering::Relaxed),
                    (false, true) => seen.binary.fetch_add(1, Ordering::Relaxed),
                    (false, false) => {
                        seen.binary.fetch_add(1, Ordering::Relaxed);
                        return refusal(
                            StatusCode::UNSUPPORTED_MEDIA_TYPE,
                            "unsupported_media_type",
                        );
                    }
                };
                if tenant == "denied" {
                    return refusal(StatusCode::FORBIDDEN, "forbidden");
                }
                if json {
                    let request: Value = serde_json::from_slice(&body).unwrap();
                    let dek = BASE64URL_NOPAD.encode(&[7; 32]);
                    let results: Vec<Value> = request["items"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|i| json!({"record_key_id": i["record_key_id"], "dek": dek}))
                        .collect();
                    return axum::Json(json!({"active_version": 4, "results": results}))
                        .into_response();
                }
                let request = unwrap_binary::decode_request(&body).unwrap();
                let mut out = SecretBuf::with_capacity(0);
                unwrap_binary::write_active_version(&mut out, 4);
                for _ in &request.items {
                    unwrap_binary::write_key(&mut out, &Key256::from_array(&mut [7; 32]));
                }
                ([(header::CONTENT_TYPE, unwrap_binary::CONTENT_TYPE)], out.as_slice().to_vec())
                    .into_response()
            }
        };
        let issue = move |UrlPath(tenant): UrlPath<String>, headers: HeaderMap, body: Bytes| {
            let seen = seen_issue.clone();
            async move {
                let request: Value = serde_json::from_slice(&body).unwrap();
                let count = request["count"].as_u64().unwrap() as u8;
                let count = match tenant.as_str() {
                    "short" => count - 1,
                    "long" => count + 1,
                    _ => count,
                };
                let keys: Vec<IssuedDek> = (0..count)
                    .map(|n| {
                        IssuedDek::new(
                            RecordKeyId::from_bytes([n; 16]),
                            4,
                            WrappedDek::from_slice(&[n; kms_core::WRAPPED_DEK_LEN]).unwrap(),
                            Key256::from_array(&mut [n; 32]),
                        )
                    })
                    .collect();
                if takes_binary && issue_binary::is_asked(&headers) {
                    seen.issued_binary.fetch_add(1, Ordering::Relaxed);
                    let out = issue_binary::write_answer(4, &keys);
                    // With a parameter, as a proxy might add.
                    let media = format!("{}; charset=binary", issue_binary::CONTENT_TYPE);
                    return ([(header::CONTENT_TYPE, media)], out.as_slice().to_vec())
                        .into_response();
                }
                seen.issued_json.fetch_add(1, Ordering::Relaxed);
                let keys: Vec<Value> = keys
                    .iter()
                    .map(|k| {
                        json!({
                            "record_key_id": k.record_key_id.to_hex(),
                            "dek": BASE64URL_NOPAD.encode(k.dek().expose_secret()),
                            "wrapped": BASE64URL_NOPAD.encode(k.wrapped.as_bytes()),
                        })
                    })
                    .collect();
                axum::Json(json!({"kek_version": 4, "keys": keys})).into_response()
            }
        };
        let router = Router::new()
            .route("/v1/tenants/{tenant}/datakeys/unwrap", post(unwrap))
            .route("/v1/tenants/{tenant}/datakeys", post(issue));
        let port = serve_mtls(acceptor, router, move |identity| {
            seen_clients.clients.lock().unwrap().push(identity.unwrap_or_default());
        })
        .await;
        format!("https://localhost:{port}")
    }

    /// Serves `router` behind `acceptor` on a loopback port (returned),
    /// telling `on_client` each connection's client identity.
    pub(in crate::sidecar) async fn serve_mtls(
        acceptor: tokio_rustls::TlsAcceptor,
        router: Router,
        on_client: impl Fn(Option<String>) + Clone + Send + Sync + 'static,
    ) -> u16 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, router, on_client) =
                    (acceptor.clone(), router.clone(), on_client.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else { return };
                    on_client(crate::tls::identity_of(tls.get_ref().1.peer_certificates()));
                    let _ = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(
                        hyper_util::rt::TokioIo::new(tls),
                        hyper_util::service::TowerToHyperService::new(router),
                    )
                    .await;
                });
            }
        });
        port
    }

    /// A client of a fake key service, and what that service saw.
    async fn client_of(takes_binary: bool) -> (tempfile::TempDir, KeyServiceClient, Arc<Seen>) {
        let (dir, _, client, seen) = client_and_ca(takes_binary).await;
        (dir, client, seen)
    }

    /// [`client_of`], and the CA of both sides.
    async fn client_and_ca(
        takes_binary: bool,
    ) -> (tempfile::TempDir, DevCa, KeyServiceClient, Arc<Seen>) {
        let dir = tempfile::tempdir().unwrap();
        let ca = DevCa::generate("test CA").unwrap();
        let seen = Arc::new(Seen::default());
        let url = key_service(dir.path(), &ca, seen.clone(), takes_binary).await;
        write_identity(&ca, dir.path(), "spiffe://test/app");
        let client =
            KeyServiceClient::new(&client_config(dir.path(), url, None), Profile::Development)
                .unwrap();
        (dir, ca, client, seen)
    }

    /// Writes `dir/app.crt` and `dir/app.key`: a certificate of `identity`
    /// from `ca`, each file replaced (a new inode), as a renewal does.
    fn write_identity(ca: &DevCa, dir: &Path, identity: &str) {
        let app = ca.issue_client(identity, Validity::days(1)).unwrap();
        for (name, text) in [("app.crt", app.cert_pem.as_str()), ("app.key", app.key_pem.as_str())]
        {
            std::fs::write(dir.join("next"), text).unwrap();
            std::fs::rename(dir.join("next"), dir.join(name)).unwrap();
        }
    }

    fn client_config(dir: &Path, url: String, server_identity: Option<&str>) -> KeyServiceConfig {
        KeyServiceConfig {
            urls: vec![url],
            ca: dir.join("ca.crt"),
            cert: dir.join("app.crt"),
            key: dir.join("app.key"),
            timeout_ms: 10_000,
            tls_reload_interval_secs: 60,
            server_identity: server_identity.map(str::to_owned),
        }
    }

    /// Unwraps one item for `tenant`.
    async fn unwrap_one(client: &KeyServiceClient, tenant: &str) -> Result<Unwrapped, KsError> {
        let items = [DekRequest {
            record_key_id: RecordKeyId::from_bytes([1; 16]),
            kek_version: 1,
            wrapped: WrappedDek::from_slice(&[2; kms_core::WRAPPED_DEK_LEN]).unwrap(),
        }];
        client.unwrap(&TenantId::new(tenant).unwrap(), &items, None).await
    }

    fn counts(seen: &Seen) -> (usize, usize) {
        (seen.binary.load(Ordering::Relaxed), seen.json.load(Ordering::Relaxed))
    }

    #[tokio::test]
    async fn unwraps_go_in_the_binary_form_whatever_the_answer() {
        let (_dir, client, seen) = client_of(true).await;
        // One replica at 10 s: the binary try, then JSON after a 415.
        assert_eq!(client.longest_call(), Duration::from_secs(20));
        for _ in 0..2 {
            let answer = unwrap_one(&client, "onc").await.unwrap();
            assert_eq!(answer.active_version, 4);
            assert_eq!(answer.results[0].as_ref().unwrap().expose_secret(), &[7; 32]);
        }
        // A refusal is the answer, not a reason to change form.
        let e = unwrap_one(&client, "denied").await.err();
        assert!(matches!(e, Some(KsError::Api { status: 403, .. })), "{e:?}");
        assert!(unwrap_one(&client, "onc").await.is_ok());
        assert_eq!(counts(&seen), (4, 0), "all in the binary form");
    }

    #[tokio::test]
    async fn an_older_key_service_is_asked_in_json_after_its_415_and_asked_again_later() {
        let (_dir, client, seen) = client_of(false).await;
        for _ in 0..3 {
            let answer = unwrap_one(&client, "onc").await.unwrap();
            assert_eq!(answer.active_version, 4);
            assert_eq!(answer.results[0].as_ref().unwrap().expose_secret(), &[7; 32]);
        }
        assert_eq!(counts(&seen), (1, 3), "the binary form was tried once");

        // Once the JSON period is over, the binary form is tried again.
        let (_dir, mut client, seen) = client_of(false).await;
        client.json_for = Duration::ZERO;
        for _ in 0..3 {
            assert!(unwrap_one(&client, "onc").await.is_ok());
        }
        assert_eq!(counts(&seen), (3, 3));
    }

    /// Issues `count` keys for `tenant`; checks each key is the fake's.
    async fn issue(client: &KeyServiceClient, tenant: &str, count: u8) -> Result<(), KsError> {
        let keys = client.issue(&TenantId::new(tenant).unwrap(), usize::from(count)).await?;
        assert_eq!(keys.len(), usize::from(count));
        for (n, key) in (0..count).zip(&keys) {
            assert_eq!(key.record_key_id, RecordKeyId::from_bytes([n; 16]));
            assert_eq!((key.kek_version, key.wrapped.as_bytes()), (4, &[n; 60]));
            assert_eq!(key.dek().expose_secret(), &[n; 32]);
        }
        Ok(())
    }

    #[tokio::test]
    async fn issued_keys_come_in_the_binary_form_and_from_an_older_key_service_as_json() {
        for takes_binary in [true, false] {
            let (_dir, client, seen) = client_of(takes_binary).await;
            issue(&client, "onc", 3).await.unwrap();
            issue(&client, "onc", 1).await.unwrap();
            let forms = (
                seen.issued_binary.load(Ordering::Relaxed),
                seen.issued_json.load(Ordering::Relaxed),
            );
            assert_eq!(forms, if takes_binary { (2, 0) } else { (0, 2) });
            // A short or long answer is an error in either form, never
            // fewer or more keys.
            for tenant in ["short", "long"] {
                let e = issue(&client, tenant, 3).await.unwrap_err();
                assert!(
                    matches!(&e, KsError::Decode(m) if m.contains("different number of keys")),
                    "{tenant}: {e:?}"
                );
            }
        }
    }

    #[test]
    fn json_answers_short_or_long_of_the_items_are_refused() {
        let unwrap = r#"{"active_version":1,"results":[{"error":"a"},{"error":"b"}]}"#;
        let read = |count| serde_json::from_str::<UnwrapWire>(unwrap).unwrap().unwrapped(count);
        assert!(read(1).is_err() && read(3).is_err());
        assert_eq!(read(2).unwrap().results.len(), 2);
        let rewrap = r#"{"results":[{"error":"a"}]}"#;
        let read = |count| serde_json::from_str::<ResultsWire>(rewrap).unwrap().rewrapped(count);
        assert!(read(0).is_err() && read(2).is_err());
        assert_eq!(read(1).unwrap().len(), 1);
    }

    fn metric(client: &KeyServiceClient, name: &str) -> String {
        let counter = match name {
            "keygate_sidecar_tls_reload_failures_total" => &client.metrics.reload_failures,
            "keygate_sidecar_key_service_tls_failures_total" => &client.metrics.tls_failures,
            other => panic!("no such counter: {other}"),
        };
        counter.get().to_string()
    }

    #[tokio::test]
    async fn changed_tls_files_are_reloaded_and_a_broken_one_keeps_the_old_client() {
        let (dir, ca, client, seen) = client_and_ca(true).await;
        let failures = "keygate_sidecar_tls_reload_failures_total";
        assert!(unwrap_one(&client, "onc").await.is_ok());
        assert!(!client.reload_tls_if_changed().unwrap(), "nothing changed");

        // A key file caught half-written: the old client carries on.
        std::fs::write(dir.path().join("app.key"), "-----BEGIN PRIVATE KEY-----\n").unwrap();
        let e = client.reload_tls_if_changed().unwrap_err().to_string();
        assert!(e.contains("app.key"), "names the file: {e}");
        assert_eq!(metric(&client, failures), "1");
        assert!(unwrap_one(&client, "onc").await.is_ok());
        // Tried again at the next poll, since it never loaded.
        assert!(client.reload_tls_if_changed().is_err());
        assert_eq!(metric(&client, failures), "2");

        // The renewed certificate (of another identity here, to tell them
        // apart): calls from now on present it.
        write_identity(&ca, dir.path(), "spiffe://test/renewed");
        assert!(client.reload_tls_if_changed().unwrap());
        assert!(!client.reload_tls_if_changed().unwrap(), "taken as read");
        assert!(unwrap_one(&client, "onc").await.is_ok());
        assert_eq!(metric(&client, failures), "2");
        assert_eq!(
            seen.clients.lock().unwrap().last().map(String::as_str),
            Some("spiffe://test/renewed")
        );
        // A forced reload (SIGHUP) rebuilds from files left untouched: a
        // new client, so a new connection (the old one stays open, idle).
        client.reload_tls().unwrap();
        assert!(!client.reload_tls_if_changed().unwrap());
        assert!(unwrap_one(&client, "onc").await.is_ok());
        let clients = seen.clients.lock().unwrap().clone();
        assert_eq!(
            clients,
            ["spiffe://test/app", "spiffe://test/renewed", "spiffe://test/renewed"]
        );
    }

    #[tokio::test]
    async fn production_reloads_are_held_to_the_sidecars_tls_rules() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        // The organization's own PKI, which the production profile takes.
        let ca = DevCa::generate_for("Example Health Issuing CA", "Example Health").unwrap();
        let seen = Arc::new(Seen::default());
        let url = key_service(dir.path(), &ca, seen, true).await;
        write_identity(&ca, dir.path(), "spiffe://test/app");
        let key = dir.path().join("app.key");
        let chmod = |mode| std::fs::set_permissions(&key, std::fs::Permissions::from_mode(mode));
        chmod(0o600).unwrap();
        let config = client_config(dir.path(), url, None);
        let production = KeyServiceClient::new(&config, Profile::Production).unwrap();
        let development = KeyServiceClient::new(&config, Profile::Development).unwrap();
        let failures = "keygate_sidecar_tls_reload_failures_total";
        let in_force = production.http.load_full();
        let refused = |rule: &str| {
            let e = production.reload_tls().unwrap_err();
            assert!(
                matches!(&e, ClientSetupError::Refused(rules) if rules.contains(&format!("[{rule}]"))),
                "{rule}: {e}"
            );
            assert!(Arc::ptr_eq(&production.http.load_full(), &in_force), "{rule}: kept");
        };

        // The CA bundle now also trusting a development CA, whose key (a
        // file) can mint the key service's identity for anyone: calls
        // would go on working, so nothing else would tell.
        let dev = DevCa::generate("keygate development CA").unwrap();
        std::fs::write(dir.path().join("ca.crt"), format!("{}{}", ca.cert_pem(), dev.cert_pem()))
            .unwrap();
        refused("tls.development_pki");
        assert_eq!(metric(&production, failures), "1");
        assert!(unwrap_one(&production, "onc").await.is_ok(), "on the old client");
        development.reload_tls().unwrap();
        assert_eq!(metric(&development, failures), "0");

        // The organization's CA again, but the key readable by others.
        std::fs::write(dir.path().join("ca.crt"), ca.cert_pem()).unwrap();
        chmod(0o644).unwrap();
        refused("files.private_keys");
        assert_eq!(metric(&production, failures), "2");
        development.reload_tls().unwrap();

        // Mended: taken.
        chmod(0o600).unwrap();
        assert!(production.reload_tls_if_changed().unwrap());
        assert!(!Arc::ptr_eq(&production.http.load_full(), &in_force));
        assert!(unwrap_one(&production, "onc").await.is_ok());
        // Nor does the start take what a reload refuses.
        chmod(0o640).unwrap();
        let e = KeyServiceClient::new(&config, Profile::Production).unwrap_err();
        assert!(matches!(&e, ClientSetupError::Refused(_)), "{e}");
    }

    /// Runs a handshake in memory between `client` and `server`; the
    /// client's error if it fails.
    fn handshake(
        client: Arc<rustls::ClientConfig>,
        server: Arc<rustls::ServerConfig>,
    ) -> Result<(), rustls::Error> {
        let name = ServerName::try_from("localhost").unwrap();
        let mut client = rustls::ClientConnection::new(client, name).unwrap();
        let mut server = rustls::ServerConnection::new(server).unwrap();
        loop {
            let mut to_server = Vec::new();
            while client.wants_write() {
                client.write_tls(&mut to_server).unwrap();
            }
            let mut unread = to_server.as_slice();
            while !unread.is_empty() {
                server.read_tls(&mut unread).unwrap();
                // The server's own failure shows as the client's.
                let _ = server.process_new_packets();
            }
            let mut to_client = Vec::new();
            while server.wants_write() {
                server.write_tls(&mut to_client).unwrap();
            }
            let mut unread = to_client.as_slice();
            while !unread.is_empty() {
                client.read_tls(&mut unread).unwrap();
                client.process_new_packets()?;
            }
            if to_server.is_empty() && to_client.is_empty() {
                assert!(!client.is_handshaking(), "the handshake stalled");
                return Ok(());
            }
        }
    }

    #[test]
    fn a_pinned_client_verifies_the_key_services_handshake_signature() {
        let dir = tempfile::tempdir().unwrap();
        let ca = DevCa::generate("test CA").unwrap();
        let ks = "spiffe://test/key-service";
        std::fs::write(dir.path().join("ca.crt"), ca.cert_pem()).unwrap();
        write_identity(&ca, dir.path(), "spiffe://test/app");
        let client = client_config(dir.path(), "https://localhost:1".into(), Some(ks));
        let client = Arc::new(client_tls(&client).unwrap());
        // The genuine key service certificate; served with its own key,
        // or with another one (its certificate copied, its key not).
        let genuine = ca.issue_server_with_identity(&["localhost"], ks, Validity::days(1)).unwrap();
        let other = ca.issue_server(&["localhost"], Validity::days(1)).unwrap();
        let chain = vec![CertificateDer::from_pem_slice(genuine.cert_pem.as_bytes()).unwrap()];
        let server = |key_pem: &str| {
            let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
            let signer = rustls::crypto::aws_lc_rs::sign::any_supported_type(&key).unwrap();
            // `new`, unlike `with_single_cert`, takes a key not the
            // certificate's, as an impostor's server would.
            let certified = rustls::sign::CertifiedKey::new(chain.clone(), signer);
            let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
            move |version: &'static rustls::SupportedProtocolVersion| {
                let config = rustls::ServerConfig::builder_with_provider(provider.clone())
                    .with_protocol_versions(&[version])
                    .unwrap()
                    .with_no_client_auth()
                    .with_cert_resolver(Arc::new(SingleCertAndKey::from(certified.clone())));
                Arc::new(config)
            }
        };
        let (genuine_server, impostor) = (server(&genuine.key_pem), server(&other.key_pem));
        for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
            handshake(client.clone(), genuine_server(version)).unwrap();
            let e = handshake(client.clone(), impostor(version)).unwrap_err();
            assert!(
                matches!(e, rustls::Error::InvalidCertificate(CertificateError::BadSignature)),
                "{version:?}: {e:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_pinned_client_talks_only_to_a_key_service_of_that_identity() {
        let dir = tempfile::tempdir().unwrap();
        let ca = DevCa::generate("test CA").unwrap();
        let seen = Arc::new(Seen::default());
        let ks = "spiffe://test/key-service";
        let pinned_url = key_service_of(dir.path(), &ca, seen.clone(), true, Some(ks)).await;
        write_identity(&ca, dir.path(), "spiffe://test/app");
        let pinned = |url: &str, identity: &str| {
            let config = client_config(dir.path(), url.to_owned(), Some(identity));
            KeyServiceClient::new(&config, Profile::Development).unwrap()
        };
        assert!(unwrap_one(&pinned(&pinned_url, ks), "onc").await.is_ok());

        // Same CA, same host name, another identity (or none: a
        // DNS-only certificate): refused in the handshake, counted, and
        // said so rather than "connection refused".
        // (The fake's files are rewritten, so the second fake gets the
        // DNS-only certificate.)
        let dns_only_url = key_service(dir.path(), &ca, seen.clone(), true).await;
        for (url, identity, presented) in [
            (&pinned_url, "spiffe://test/other", format!("{ks:?}")),
            (&dns_only_url, ks, "\"localhost\"".to_owned()),
        ] {
            let client = pinned(url, identity);
            let e = unwrap_one(&client, "onc").await.err();
            let Some(KsError::Unavailable(message)) = e else { panic!("{e:?}") };
            assert!(
                message.contains("TLS handshake failed")
                    && message.contains(&format!("identity {presented}"))
                    && message.contains(identity),
                "{message}"
            );
            assert_eq!(metric(&client, "keygate_sidecar_key_service_tls_failures_total"), "1");
        }
        assert_eq!(seen.binary.load(Ordering::Relaxed), 1, "no request reached a refused one");
    }

    #[tokio::test]
    async fn a_replica_whose_certificate_is_not_trusted_is_counted_and_failed_over() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, stranger) =
            (DevCa::generate("test CA").unwrap(), DevCa::generate("other").unwrap());
        let seen = Arc::new(Seen::default());
        let elsewhere = tempfile::tempdir().unwrap();
        let untrusted = key_service(elsewhere.path(), &stranger, seen.clone(), true).await;
        let trusted = key_service(dir.path(), &ca, seen.clone(), true).await;
        write_identity(&ca, dir.path(), "spiffe://test/app");
        let mut config = client_config(dir.path(), untrusted.clone(), None);
        config.urls.push(trusted);
        let client = KeyServiceClient::new(&config, Profile::Development).unwrap();
        assert!(unwrap_one(&client, "onc").await.is_ok(), "served by the second");
        assert_eq!(metric(&client, "keygate_sidecar_key_service_tls_failures_total"), "1");

        // Alone, it says why rather than "connection refused".
        let config = client_config(dir.path(), untrusted.clone(), None);
        let client = KeyServiceClient::new(&config, Profile::Development).unwrap();
        let e = unwrap_one(&client, "onc").await.err();
        let Some(KsError::Unavailable(message)) = e else { panic!("{e:?}") };
        assert!(
            message.starts_with(&untrusted)
                && message
                    .contains("TLS handshake failed: invalid peer certificate: UnknownIssuer"),
            "{message}"
        );
    }
}
