//! Shared state of the key service's handlers.

use std::sync::Arc;

use kms_core::{KeyHierarchy, TenantId};

use super::listener::Caller;
use super::masters::MasterTrust;
use crate::abuse::{KeyRoom, KeysHeld, NO_IDENTITY, SecretSends};
use crate::audit_log::AuditLog;
use crate::config::{KeysConfig, LifecycleConfig, Limits};
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::policy::{PolicyHandle, Role};

/// Everything a handler needs.
#[derive(Clone)]
pub struct AppState {
    /// Tenants, KEKs, DEKs.
    pub hierarchy: Arc<KeyHierarchy>,
    /// The current policy.
    pub policy: Arc<PolicyHandle>,
    /// The audit chain writer.
    pub audit: AuditLog,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Request limits.
    pub limits: Limits,
    /// Lifecycle settings.
    pub lifecycle: LifecycleConfig,
    /// Tenant key settings (the longest auto-rotation period allowed).
    pub keys: KeysConfig,
    /// What masters other than the configured root may load, reach and be.
    pub(crate) master_trust: Arc<MasterTrust>,
    /// One permit per plaintext DEK in flight (`limits.max_keys_in_flight`),
    /// with each identity's share.
    pub key_permits: Arc<KeyRoom>,
    /// The readiness check's last round trip through the root provider.
    pub(crate) root_probe: Arc<super::handlers::ops::RootProbe>,
}

impl AppState {
    /// The caller's identity, or 403 if its certificate names none.
    pub fn identity<'a>(&self, caller: &'a Caller) -> Result<&'a str, ApiError> {
        caller.0.as_deref().ok_or_else(|| ApiError::forbidden(NO_IDENTITY))
    }

    /// Allows the call if the caller holds one of `roles` for `tenant`;
    /// otherwise records the denial and answers 403.
    pub async fn authorize(
        &self,
        caller: &Caller,
        tenant: &TenantId,
        roles: &[Role],
        action: &'static str,
    ) -> Result<String, ApiError> {
        let identity = self.identity(caller)?;
        let policy = self.policy.current();
        if roles.iter().any(|role| policy.authorize(identity, tenant, *role)) {
            return Ok(identity.to_owned());
        }
        self.audit.record_denial(identity, action, Some(tenant)).await;
        Err(ApiError::forbidden(format!("{identity} may not {action} for tenant {tenant}")))
    }

    /// Waits (for `limits.keys_wait_ms` at most, else 503 `busy`) for
    /// room for `count` more plaintext DEKs in flight for `identity`, within
    /// its share ([`KeyRoom`]). Hold it with the response carrying them
    /// (after [`KeysHeld::sending`]) until that has been sent; `sends` is
    /// the connection's, which closes it if that takes too long.
    pub async fn room_for_keys(
        &self,
        identity: &str,
        count: usize,
        sends: Option<SecretSends>,
    ) -> Result<KeysHeld, ApiError> {
        self.key_permits.acquire(identity, count, sends).await
    }

    /// Like [`AppState::authorize`] for calls not scoped to one tenant: the
    /// grant must cover every tenant (`"*"`).
    pub async fn authorize_global(
        &self,
        caller: &Caller,
        roles: &[Role],
        action: &'static str,
    ) -> Result<String, ApiError> {
        let identity = self.identity(caller)?;
        let policy = self.policy.current();
        if roles.iter().any(|role| policy.authorize_any_tenant(identity, *role)) {
            return Ok(identity.to_owned());
        }
        self.audit.record_denial(identity, action, None).await;
        Err(ApiError::forbidden(format!("{identity} may not {action}")))
    }
}
