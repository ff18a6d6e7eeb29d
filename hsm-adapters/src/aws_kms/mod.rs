//! The `aws-kms` root key provider: the master key is an AWS KMS symmetric
//! encryption key, used through `aws-sdk-kms`.
//!
//! A tenant key is wrapped with KMS `Encrypt` (`SYMMETRIC_DEFAULT`) and the
//! wrap context as the KMS **encryption context** (the three
//! [`WrapContext::pairs`]: `keygate:purpose`, `keygate:owner`,
//! `keygate:version`), which KMS binds to the ciphertext and also records in
//! CloudTrail. Unwrapping calls `Decrypt` with the same encryption context
//! and the key's ARN as `KeyId`, so a blob of another key is refused by KMS.
//!
//! ```text
//! u8 version = 1 ‖ KMS ciphertext blob (opaque, at most 6144 bytes)
//! ```
//!
//! ## Behaviour
//! - **Pinned to one key.** [`AwsKmsRootKey::connect`] resolves the
//!   configured id (key id, ARN or alias) to the key ARN with a real
//!   `Encrypt` + `Decrypt` round trip (the readiness check), and every later
//!   call names that ARN; [`describe`](RootKeyProvider::describe) reports it.
//!   Only `kms:Encrypt` and `kms:Decrypt` are needed.
//! - **Timeouts and retries** come from the SDK: a per-attempt timeout, the
//!   standard retry mode (exponential backoff with jitter) for throttling,
//!   transient and connection errors. What is left after the retries is
//!   typed: unreachable or unavailable → [`RootKeyError::Unavailable`],
//!   throttled → [`RootKeyError::Throttled`] (both retryable).
//! - **`AccessDeniedException` on `Decrypt`** is ambiguous: KMS (and moto)
//!   also answer it for a blob that names a key we cannot see. The
//!   provider then decrypts its own readiness blob: if that works, the
//!   blob was bad ([`RootKeyError::CannotUnwrap`]); if not, permissions
//!   were revoked ([`RootKeyError::Misconfigured`]).
//! - **Credentials** come from the SDK's default chain, or from
//!   [`AwsKmsRootKey::connect_with_credentials`]. They never appear in an
//!   error, a log line of this crate or `Debug` output.
//!
//! The tenant key travels to KMS inside the TLS request body, and the SDK's
//! request and response buffers holding it are not wiped (the SDK offers no
//! way to); the buffers this crate owns are.

use std::collections::HashMap;
use std::fmt;

use async_trait::async_trait;
use aws_config::{BehaviorVersion, Region};
use aws_credential_types::provider::SharedCredentialsProvider;
use aws_sdk_kms::Client;
use aws_sdk_kms::config::retry::RetryConfig;
use aws_sdk_kms::config::timeout::TimeoutConfig;
use aws_sdk_kms::primitives::Blob;
use aws_sdk_kms::types::EncryptionAlgorithmSpec;
use kms_core::crypto::ct_eq;
use kms_core::{Key256, ProviderInfo, RootKeyError, RootKeyProvider, WrapContext};
use zeroize::Zeroizing;

use crate::readiness::readiness_context;

mod config;
mod error;

pub use self::config::{AwsKmsConfig, endpoint_is_plain_http, endpoint_without_userinfo};
pub use self::error::AwsKmsError;

/// Provider kind reported by [`RootKeyProvider::describe`].
pub const PROVIDER_KIND: &str = "aws-kms";
/// Version byte of a wrapped blob.
const WRAP_VERSION: u8 = 1;
/// Longest KMS ciphertext blob (the API's limit).
const MAX_KMS_BLOB_LEN: usize = 6144;

/// The `aws-kms` root key provider: a KMS symmetric encryption key.
///
/// [`connect`](Self::connect) is async and performs a real round trip;
/// `wrap` and `unwrap` are one KMS call each (plus the SDK's retries) and
/// safe to call concurrently; the SDK pools connections.
pub struct AwsKmsRootKey {
    client: Client,
    key_arn: String,
    region: String,
    endpoint: String,
    /// A blob known to decrypt (see the module docs on `AccessDenied`).
    probe: Vec<u8>,
}

impl AwsKmsRootKey {
    /// Connects to the key in `config` with credentials from the SDK's
    /// default chain, and checks it with a real `Encrypt` + `Decrypt`.
    pub async fn connect(config: AwsKmsConfig) -> Result<Self, AwsKmsError> {
        Self::connect_inner(config, None).await
    }

    /// Like [`connect`](Self::connect), with explicit credentials (static
    /// test credentials, or a provider the caller built).
    pub async fn connect_with_credentials(
        config: AwsKmsConfig,
        credentials: SharedCredentialsProvider,
    ) -> Result<Self, AwsKmsError> {
        Self::connect_inner(config, Some(credentials)).await
    }

    /// The key's ARN.
    pub fn key_arn(&self) -> &str {
        &self.key_arn
    }

    async fn connect_inner(
        config: AwsKmsConfig,
        credentials: Option<SharedCredentialsProvider>,
    ) -> Result<Self, AwsKmsError> {
        config.validate()?;
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .region(Region::new(config.region.clone()))
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(config.timeout)
                    .operation_attempt_timeout(config.timeout)
                    .build(),
            )
            .retry_config(
                RetryConfig::standard()
                    .with_max_attempts(config.max_attempts)
                    .with_initial_backoff(config.initial_backoff)
                    .with_max_backoff(AwsKmsConfig::MAX_BACKOFF),
            );
        if let Some(credentials) = credentials {
            loader = loader.credentials_provider(credentials);
        }
        // The configured endpoint, or AWS's own for the region, and never
        // one from AWS_ENDPOINT_URL(_KMS) or a profile's endpoint_url, which
        // the SDK would otherwise use: only the configured one passed
        // `check_endpoint` and the key service's [trusted_masters].
        let mut kms = aws_sdk_kms::config::Builder::from(&loader.load().await);
        kms.set_endpoint_url(config.endpoint_url.clone());
        let client = Client::from_conf(kms.build());
        let endpoint = config
            .endpoint_url
            .clone()
            .unwrap_or_else(|| format!("https://kms.{}.amazonaws.com", config.region));

        // Readiness: a real round trip, which also resolves the key ARN.
        let context = readiness_context();
        let key = Key256::generate()?;
        let mut provider = Self {
            client,
            key_arn: config.key_id.clone(),
            region: config.region,
            endpoint,
            probe: Vec::new(),
        };
        let (blob, key_arn) = provider.encrypt(&key, &context).await?;
        provider.key_arn = key_arn;
        let back = provider.decrypt(&blob, &context).await?;
        if !ct_eq(back.expose_secret(), key.expose_secret()) {
            return Err(AwsKmsError::RoundTripMismatch);
        }
        provider.probe = blob;
        tracing::info!(
            region = %provider.region,
            key = %provider.key_arn,
            endpoint = %provider.endpoint,
            "connected to the AWS KMS master key"
        );
        Ok(provider)
    }

    /// KMS `Encrypt` of `key` under `self.key_arn` (the configured id
    /// before connecting); returns the KMS blob and the key's ARN.
    async fn encrypt(
        &self,
        key: &Key256,
        context: &WrapContext,
    ) -> Result<(Vec<u8>, String), AwsKmsError> {
        let output = self
            .client
            .encrypt()
            .key_id(&self.key_arn)
            .plaintext(Blob::new(key.expose_secret().to_vec()))
            .set_encryption_context(Some(encryption_context(context)))
            .encryption_algorithm(EncryptionAlgorithmSpec::SymmetricDefault)
            .send()
            .await
            .map_err(|e| AwsKmsError::from_sdk("Encrypt", &self.key_arn, &self.endpoint, e))?;
        let missing = |field| AwsKmsError::MalformedResponse { operation: "Encrypt", field };
        let blob = output.ciphertext_blob.ok_or_else(|| missing("CiphertextBlob"))?.into_inner();
        if blob.is_empty() || blob.len() > MAX_KMS_BLOB_LEN {
            return Err(missing("CiphertextBlob of a valid length"));
        }
        let key_arn = output.key_id.ok_or_else(|| missing("KeyId"))?;
        Ok((blob, key_arn))
    }

    /// KMS `Decrypt` of a KMS blob, pinned to `self.key_arn`.
    async fn decrypt(&self, blob: &[u8], context: &WrapContext) -> Result<Key256, AwsKmsError> {
        let mut output = self
            .client
            .decrypt()
            .key_id(&self.key_arn)
            .ciphertext_blob(Blob::new(blob))
            .set_encryption_context(Some(encryption_context(context)))
            .encryption_algorithm(EncryptionAlgorithmSpec::SymmetricDefault)
            .send()
            .await
            .map_err(|e| AwsKmsError::from_sdk("Decrypt", &self.key_arn, &self.endpoint, e))?;
        let plaintext = Zeroizing::new(
            output
                .plaintext
                .take()
                .ok_or(AwsKmsError::MalformedResponse { operation: "Decrypt", field: "Plaintext" })?
                .into_inner(),
        );
        Key256::from_slice(&plaintext).ok_or(AwsKmsError::CannotUnwrap)
    }

    /// Unwraps a provider blob; see the module docs on `AccessDenied`.
    async fn unwrap_blob(
        &self,
        wrapped: &[u8],
        context: &WrapContext,
    ) -> Result<Key256, AwsKmsError> {
        let kms_blob = match wrapped.split_first() {
            Some((&WRAP_VERSION, rest)) if !rest.is_empty() && rest.len() <= MAX_KMS_BLOB_LEN => {
                rest
            }
            _ => return Err(AwsKmsError::CannotUnwrap),
        };
        match self.decrypt(kms_blob, context).await {
            Err(denied @ AwsKmsError::AccessDenied { .. }) => {
                match self.decrypt(&self.probe, &readiness_context()).await {
                    Ok(_) => Err(AwsKmsError::CannotUnwrap),
                    Err(_) => Err(denied),
                }
            }
            other => other,
        }
    }
}

impl fmt::Debug for AwsKmsRootKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AwsKmsRootKey")
            .field("region", &self.region)
            .field("key_arn", &self.key_arn)
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl RootKeyProvider for AwsKmsRootKey {
    fn describe(&self) -> ProviderInfo {
        ProviderInfo { kind: PROVIDER_KIND, key_ref: self.key_arn.clone() }
    }

    async fn wrap(&self, key: &Key256, context: &WrapContext) -> Result<Vec<u8>, RootKeyError> {
        let (blob, _) = self.encrypt(key, context).await?;
        let mut wrapped = Vec::with_capacity(1 + blob.len());
        wrapped.push(WRAP_VERSION);
        wrapped.extend_from_slice(&blob);
        Ok(wrapped)
    }

    async fn unwrap(&self, wrapped: &[u8], context: &WrapContext) -> Result<Key256, RootKeyError> {
        Ok(self.unwrap_blob(wrapped, context).await?)
    }
}

/// The wrap context as a KMS encryption context.
fn encryption_context(context: &WrapContext) -> HashMap<String, String> {
    context.pairs().into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
}

#[cfg(test)]
mod tests;
