//! Readiness: a real wrap and unwrap through a provider, the same for all
//! of them.

use kms_core::crypto::ct_eq;
use kms_core::{Key256, KeyPurpose, RootKeyError, RootKeyProvider, WrapContext};

/// The context readiness checks wrap under. Version 0 is never a real key
/// version, so a readiness blob can never stand in for a real wrapped key.
/// (The same context the key service's `/readyz` uses.)
pub fn readiness_context() -> WrapContext {
    WrapContext {
        purpose: KeyPurpose::AuditSigning,
        owner: "keygate-readiness".to_owned(),
        version: 0,
    }
}

/// Checks that `provider` works end to end: wraps a fresh random key under
/// [`readiness_context`], unwraps it and compares (in constant time).
///
/// Every provider's `connect`/`open` already does this at start; call this
/// for a readiness probe of a running service.
pub async fn check_ready(provider: &dyn RootKeyProvider) -> Result<(), RootKeyError> {
    let kind = provider.describe().kind;
    let context = readiness_context();
    let key = Key256::generate().map_err(|e| RootKeyError::Backend {
        provider: kind,
        operation: "readiness check",
        detail: e.to_string(),
    })?;
    let wrapped = provider.wrap(&key, &context).await?;
    let back = provider.unwrap(&wrapped, &context).await?;
    if ct_eq(back.expose_secret(), key.expose_secret()) {
        Ok(())
    } else {
        Err(RootKeyError::Backend {
            provider: kind,
            operation: "readiness check",
            detail: "the unwrapped key differs from the wrapped one".to_owned(),
        })
    }
}
