//! The root (master) key provider interface (DESIGN §9).
//!
//! A provider wraps and unwraps 256-bit keys under a master key it never
//! reveals (an HSM key, a KMS key, or a local file for development). Every
//! wrap is bound to a [`WrapContext`]: a blob only unwraps under the exact
//! context it was wrapped with.

use std::fmt;

use async_trait::async_trait;

use crate::crypto::kdf::Info;
use crate::ids::TenantId;
use crate::secret::Key256;

/// What a wrapped key is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyPurpose {
    /// A tenant KEK version.
    TenantKek,
    /// A tenant's index root.
    IndexRoot,
    /// A key-service instance's audit signing key.
    AuditSigning,
}

impl KeyPurpose {
    /// Stable name, used in AAD and KMS encryption contexts.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::TenantKek => "tenant-kek",
            Self::IndexRoot => "index-root",
            Self::AuditSigning => "audit-signing",
        }
    }
}

/// The context a key is wrapped for; bound into the wrap (AAD, or KMS
/// `EncryptionContext`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrapContext {
    /// What the key is.
    pub purpose: KeyPurpose,
    /// The owner: a tenant id, or for the audit key the instance name.
    pub owner: String,
    /// Version of the key within its owner and purpose.
    pub version: u32,
}

impl WrapContext {
    /// Context of a tenant KEK version.
    pub fn tenant_kek(tenant: &TenantId, version: u32) -> Self {
        Self { purpose: KeyPurpose::TenantKek, owner: tenant.to_string(), version }
    }

    /// Context of a tenant's index root.
    pub fn index_root(tenant: &TenantId) -> Self {
        Self { purpose: KeyPurpose::IndexRoot, owner: tenant.to_string(), version: 1 }
    }

    /// Canonical bytes for use as AEAD associated data.
    pub fn aad(&self) -> Vec<u8> {
        Info::label("keygate/v1/root-wrap")
            .part(self.purpose.as_str().as_bytes())
            .part(self.owner.as_bytes())
            .part(&self.version.to_be_bytes())
            .as_bytes()
            .to_vec()
    }

    /// The same context as string pairs (for KMS encryption contexts).
    pub fn pairs(&self) -> [(&'static str, String); 3] {
        [
            ("keygate:purpose", self.purpose.as_str().to_owned()),
            ("keygate:owner", self.owner.clone()),
            ("keygate:version", self.version.to_string()),
        ]
    }
}

/// A description of a provider's master key: safe to log and to store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderInfo {
    /// Provider kind: `local`, `pkcs11`, `aws-kms`.
    pub kind: &'static str,
    /// Which master key, in the provider's terms (file fingerprint, token
    /// and key label, KMS key ARN). Never a secret.
    pub key_ref: String,
}

impl fmt::Display for ProviderInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind, self.key_ref)
    }
}

/// A root key provider failed. Messages never contain key bytes, PINs or
/// credentials.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RootKeyError {
    /// The blob does not unwrap under this master key and context
    /// (tampered, another context, another master key).
    #[error("the root key provider cannot unwrap this key")]
    CannotUnwrap,
    /// The provider cannot be reached or is not ready; worth retrying.
    #[error("root key provider {provider} is unavailable: {detail}")]
    Unavailable {
        /// Provider kind.
        provider: &'static str,
        /// What failed.
        detail: String,
    },
    /// The provider rejects requests for now (rate limits); retry with backoff.
    #[error("root key provider {provider} is throttling requests")]
    Throttled {
        /// Provider kind.
        provider: &'static str,
    },
    /// The provider is configured wrongly; retrying will not help.
    #[error("root key provider {provider} is misconfigured: {detail}")]
    Misconfigured {
        /// Provider kind.
        provider: &'static str,
        /// What is wrong.
        detail: String,
    },
    /// The provider's backend reported an error.
    #[error("root key provider {provider}: {operation} failed: {detail}")]
    Backend {
        /// Provider kind.
        provider: &'static str,
        /// Which backend operation.
        operation: &'static str,
        /// The backend's error (codes, not secrets).
        detail: String,
    },
}

impl RootKeyError {
    /// Whether the same request may succeed if retried later.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Unavailable { .. } | Self::Throttled { .. })
    }
}

/// A master key that wraps and unwraps keygate's tenant keys.
#[async_trait]
pub trait RootKeyProvider: Send + Sync + fmt::Debug {
    /// Which master key this is (safe to log and store).
    fn describe(&self) -> ProviderInfo;

    /// Wraps `key` for `context`. Wrapping the same key twice gives
    /// different blobs.
    async fn wrap(&self, key: &Key256, context: &WrapContext) -> Result<Vec<u8>, RootKeyError>;

    /// Unwraps a blob made by [`RootKeyProvider::wrap`] with the same context.
    async fn unwrap(&self, wrapped: &[u8], context: &WrapContext) -> Result<Key256, RootKeyError>;
}
