//! The sidecar's shared state.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use kms_core::schema::{Schema, SchemaSet};
use kms_core::{KekVersion, TenantId};
use secrecy::SecretString;
use serde_json::value::RawValue;

use super::api::one_or_many;
use super::cache::DekCache;
use super::config::SidecarLimits;
use super::keyring::Keyring;
use super::ks_client::KsError;
use super::pool::DekPool;
use super::reporter::Reporter;
use super::shared_calls::{Rewraps, SharedCalls, Unwraps};
use crate::error::ApiError;
use crate::extract::ApiBody;
use crate::metrics::Metrics;

/// Everything a sidecar handler needs.
pub(super) struct SidecarState {
    pub(super) schemas: SchemaSet,
    /// DEK unwraps, calls shared between concurrent requests.
    pub(super) unwraps: SharedCalls<Unwraps>,
    /// DEK rewraps, likewise.
    pub(super) rewraps: SharedCalls<Rewraps>,
    pub(super) pool: Arc<DekPool>,
    /// Shared with `unwraps`, which caches the DEKs of requests that have gone.
    pub(super) cache: Arc<DekCache>,
    pub(super) keyring: Keyring,
    pub(super) reporter: Arc<Reporter>,
    pub(super) limits: SidecarLimits,
    pub(super) token: Option<SecretString>,
    pub(super) metrics: Metrics,
    /// Last known active KEK version per tenant (from unwraps and issues).
    pub(super) active_versions: ActiveVersions,
}

impl SidecarState {
    /// A schema by name and version (latest when `version` is `None`).
    pub(super) fn schema(
        &self,
        name: &str,
        version: Option<u32>,
    ) -> Result<&Arc<Schema>, ApiError> {
        let found = match version {
            Some(v) => self.schemas.get(name, v),
            None => self.schemas.latest(name),
        };
        found.ok_or_else(|| {
            let v = version.map(|v| format!(" v{v}")).unwrap_or_default();
            ApiError::not_found("unknown_schema", format!("no schema {name}{v} is loaded"))
        })
    }

    /// A request's records (exactly one of `record` and `records`) within
    /// this sidecar's limits, and whether the answer uses the single form.
    pub(super) fn records<'a>(
        &self,
        record: Option<&'a RawValue>,
        records: Option<Vec<&'a RawValue>>,
        body: &ApiBody,
    ) -> Result<(Vec<&'a RawValue>, bool), ApiError> {
        one_or_many(record, records, self.limits.max_records, self.limits.max_depth, body.nesting())
    }

    pub(super) fn note_active(&self, tenant: &TenantId, version: KekVersion) {
        self.active_versions.note(tenant, version);
    }

    pub(super) fn active(&self, tenant: &TenantId) -> Option<KekVersion> {
        self.active_versions.get(tenant)
    }

    /// Maps a key service failure of a call for `tenant`.
    pub(super) fn tenant_error(&self, tenant: &TenantId, e: KsError) -> ApiError {
        if e.is_key_destroyed() {
            self.forget_destroyed(tenant);
        }
        ks_error(e)
    }

    /// Maps a per-item DEK error of `tenant` from the key service.
    pub(super) fn dek_error(&self, tenant: &TenantId, code: &str) -> ApiError {
        if code == "key_destroyed" {
            self.forget_destroyed(tenant);
        }
        dek_error(code)
    }

    /// A key of `tenant` was destroyed: its pooled DEKs (possibly wrapped
    /// under the destroyed version) and derived keys go at once rather than
    /// at the end of the cache TTL, so no new record is written under them.
    fn forget_destroyed(&self, tenant: &TenantId) {
        let pooled = self.pool.forget(tenant);
        self.keyring.forget(tenant);
        let cached = self.cache.forget_tenant(tenant);
        // Once per shred heard, not once per request of a shredded tenant.
        if pooled + cached > 0 {
            tracing::info!(
                tenant = %tenant,
                pooled,
                cached,
                "key destroyed: pooled, cached and derived keys dropped"
            );
        } else {
            tracing::debug!(
                tenant = %tenant,
                "key destroyed: derived keys dropped; nothing pooled or cached"
            );
        }
    }
}

/// Maps a key service failure to the sidecar's answer.
pub(super) fn ks_error(e: KsError) -> ApiError {
    use axum::http::StatusCode;
    match e {
        KsError::Unavailable(detail) => {
            tracing::warn!(detail, "key service unavailable");
            ApiError::unavailable("key_service_unavailable", "the key service cannot be reached")
        }
        // Every replica shedding load, or failing closed: the app retries
        // after the key service's `Retry-After`, if it sent one. (Its
        // audit log's outage is said as such below: final, not retried.)
        KsError::Api { status: 503, code, message, retry_after } if code != "audit_unavailable" => {
            tracing::warn!(code, message, "key service unavailable");
            ApiError::unavailable("key_service_unavailable", "the key service cannot serve now")
                .with_retry_after(retry_after)
        }
        KsError::Api { status, code, message, retry_after } => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
            let code = match code.as_str() {
                "unknown_tenant" => "unknown_tenant",
                "forbidden" => "forbidden",
                "key_destroyed" => "key_destroyed",
                "no_active_key" => "no_active_key",
                "batch_too_large" => "batch_too_large",
                "audit_unavailable" => "audit_unavailable",
                "invalid_tenant" => "invalid_tenant",
                // The key service limits this sidecar's identity: 429, so
                // the app backs off and retries rather than failing hard.
                "rate_limited" => "rate_limited",
                _ => {
                    tracing::error!(code, message, "key service error");
                    return ApiError::new(
                        StatusCode::BAD_GATEWAY,
                        "key_service_error",
                        "the key service refused the request",
                    );
                }
            };
            ApiError::new(status, code, message).with_retry_after(retry_after)
        }
        KsError::Decode(detail) => {
            tracing::error!(detail, "unexpected key service answer");
            ApiError::new(
                StatusCode::BAD_GATEWAY,
                "key_service_error",
                "unexpected key service answer",
            )
        }
    }
}

/// Maps a per-item DEK error code from the key service.
fn dek_error(code: &str) -> ApiError {
    use axum::http::StatusCode;
    match code {
        "key_version_disabled" => ApiError::new(
            StatusCode::CONFLICT,
            "key_version_disabled",
            "the record's key version is disabled",
        ),
        "key_destroyed" => {
            ApiError::new(StatusCode::GONE, "key_destroyed", "the record's key was destroyed")
        }
        _ => crate::error::cannot_decrypt(),
    }
}

/// The newest KEK version per tenant this sidecar has seen in use, what
/// `stale_key_version` compares records with.
#[derive(Default)]
pub(super) struct ActiveVersions(Mutex<HashMap<TenantId, KekVersion>>);

impl ActiveVersions {
    /// Notes a version seen active. Versions only grow; a DEK pooled
    /// before a rotation still carries the version before, so what is
    /// noted never goes back.
    fn note(&self, tenant: &TenantId, version: KekVersion) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(tenant.clone())
            .and_modify(|noted| *noted = (*noted).max(version))
            .or_insert(version);
    }

    fn get(&self, tenant: &TenantId) -> Option<KekVersion> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).get(tenant).copied()
    }
}

#[cfg(test)]
mod tests {
    use axum::http::StatusCode;

    use super::*;

    fn api(status: u16, code: &str) -> KsError {
        KsError::Api {
            status,
            code: code.to_owned(),
            message: format!("{code} from upstream"),
            retry_after: (status == 429).then_some(3),
        }
    }

    #[test]
    fn the_active_version_noted_never_goes_back() {
        let versions = ActiveVersions::default();
        let onc = TenantId::new("onc").unwrap();
        assert_eq!(versions.get(&onc), None);
        versions.note(&onc, 2);
        versions.note(&onc, 1); // a DEK pooled before the rotation
        assert_eq!(versions.get(&onc), Some(2));
        versions.note(&onc, 3);
        assert_eq!(versions.get(&onc), Some(3));
    }

    #[test]
    fn key_service_refusals_reach_the_app_with_their_meaning() {
        let limited = ks_error(api(429, "rate_limited"));
        assert_eq!(
            (limited.status(), limited.code()),
            (StatusCode::TOO_MANY_REQUESTS, "rate_limited")
        );
        // The key service's Retry-After reaches the app.
        let response = axum::response::IntoResponse::into_response(limited);
        assert_eq!(response.headers()[axum::http::header::RETRY_AFTER], "3");
        let gone = ks_error(api(410, "key_destroyed"));
        assert_eq!((gone.status(), gone.code()), (StatusCode::GONE, "key_destroyed"));
        // Anything unexpected is the key service's fault, not the app's,
        // and its message stays in our log.
        let other = ks_error(api(400, "invalid_request"));
        assert_eq!((other.status(), other.code()), (StatusCode::BAD_GATEWAY, "key_service_error"));
        let unavailable = ks_error(KsError::Unavailable("connection refused".into()));
        assert_eq!(unavailable.status(), StatusCode::SERVICE_UNAVAILABLE);
        // Shedding load: the app hears when to come back.
        let mut busy = api(503, "busy");
        if let KsError::Api { retry_after, .. } = &mut busy {
            *retry_after = Some(1);
        }
        let busy = ks_error(busy);
        assert_eq!(
            (busy.status(), busy.code()),
            (StatusCode::SERVICE_UNAVAILABLE, "key_service_unavailable")
        );
        let response = axum::response::IntoResponse::into_response(busy);
        assert_eq!(response.headers()[axum::http::header::RETRY_AFTER], "1");
        let audit = ks_error(api(503, "audit_unavailable"));
        assert_eq!(audit.code(), "audit_unavailable");
    }
}
