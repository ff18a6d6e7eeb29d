//! The `pkcs11` root key provider: the master key is an AES-256 key in a
//! PKCS#11 token (an HSM, or SoftHSM2 in tests), used through `cryptoki`.
//!
//! ## Mechanism: `CKM_AES_GCM`, the wrap context as AAD
//!
//! A tenant key is wrapped with `C_Encrypt` under `CKM_AES_GCM`, with
//! [`WrapContext::aad`] as the additional authenticated data and a fresh
//! random 96-bit IV; the blob layout is in the `blob` module:
//!
//! ```text
//! u8 version = 1 ‖ iv(12) ‖ ciphertext(32) ‖ tag(16)        (61 bytes)
//! ```
//!
//! Why GCM and not `CKM_AES_KEY_WRAP_PAD` (RFC 5649):
//! - **The context is bound by the cipher itself.** GCM authenticates the
//!   AAD; KWP has no associated data, so binding the context would need an
//!   ad-hoc construction (a key derived per context, or the context hashed
//!   into the wrapped bytes) that the HSM does not check.
//! - **Wrapping the same key twice gives different blobs**, as
//!   [`RootKeyProvider::wrap`] requires. KWP is deterministic.
//! - **A 128-bit tag**, against KWP's 64-bit integrity check.
//! - **One call, no key objects.** `C_WrapKey` would first need the tenant
//!   key imported as a token object (`C_CreateObject`, then destroy); the
//!   tenant key is in host memory either way (the key service holds it).
//!   On SoftHSM2, GCM `C_Encrypt` is also about 2.5× faster (DESIGN §12).
//!
//! ## Sessions, failures and retries
//!
//! Calls run on a pool of logged-in read-only sessions (`pool_size`, also
//! the limit on calls in flight), on tokio's blocking threads because
//! PKCS#11 calls block. A closed or logged-out session, a finalized module
//! or a device error is retried once on a fresh session (re-finding the
//! token and key, logging in again, re-initializing a finalized module),
//! then reported as [`Pkcs11Error::Call`] naming the function and the
//! `CKR_` value. A PIN the token refuses (`CKR_PIN_INCORRECT`, `_INVALID`,
//! `_LEN_RANGE`, `_EXPIRED`, `_LOCKED`) is never tried again in this
//! process: the refusal is logged once, at error level, and every later
//! call fails at once with [`Pkcs11Error::PinRefused`] (so readiness
//! fails) until the key service is restarted with the right PIN; an HSM
//! partition that locks its user after a few failed logins is not locked
//! by a stale PIN. After any other failed login the next waits
//! `pin_retry_interval`, doubling up to 5 minutes.
//! A module that reports a failed tag check as `CKR_GENERAL_ERROR`
//! (SoftHSM2 does) is told apart from a broken module by decrypting a
//! known-good blob on the same session.
//!
//! ## What is checked at start
//!
//! [`Pkcs11RootKey::connect`] loads the module (a missing file is named),
//! finds the token by label (listing the labels present if not), checks
//! `CKM_AES_GCM` is offered, logs in (a wrong PIN is `C_Login failed:
//! CKR_PIN_INCORRECT`), finds the key by label (among private AES keys
//! stored in the token only, so a public object anyone could create
//! without the PIN neither shadows it nor makes the label ambiguous) and
//! checks it is AES-256, may encrypt and decrypt, is private, stored in
//! the token, may not derive keys, and is and always was sensitive and not
//! extractable (a token that does not report one of these attributes
//! fails the check), and then wraps and unwraps a random key. That blob
//! pins the key's identity: every session opened later (a new pooled
//! session, after a re-login or a re-initialization) finds the key by
//! label, checks it again and must unwrap the blob with it before it is
//! used. A key swapped in under the same label (the old one deleted and
//! another generated, or the token restored from another backup) is
//! refused even if it is fit to be a master key: the session is closed,
//! and the call fails with [`Pkcs11Error::KeyReplaced`]
//! (`Misconfigured`), so nothing is wrapped under a key the blobs already
//! recorded under this master could not be unwrapped with. Once the
//! original key is back, new sessions use it again.
//!
//! The PIN is held as a [`SecretString`](secrecy::SecretString), handed to
//! `C_Login` only, and never appears in an error, a log line or `Debug`.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use cryptoki::mechanism::MechanismType;
use kms_core::crypto::ct_eq;
use kms_core::{Key256, ProviderInfo, RootKeyError, RootKeyProvider, WrapContext};

use tokio::sync::Semaphore;

use self::blob::Probe;
use self::module::Usage;
use self::pool::Pool;
use crate::readiness::readiness_context;

mod blob;
mod config;
mod error;
mod key;
mod login;
mod module;
mod pool;

pub use self::config::{PinSource, Pkcs11Config};
pub use self::error::{Pkcs11Error, ckr_name};
pub use self::key::MasterKeyInfo;

/// Provider kind reported by [`RootKeyProvider::describe`].
const PROVIDER_KIND: &str = "pkcs11";

/// The `pkcs11` root key provider: an AES-256 key in a PKCS#11 token.
///
/// [`connect`](Self::connect) and [`create_master_key`](Self::create_master_key)
/// block (they load the module and talk to the token); call them from
/// `tokio::task::spawn_blocking` in async code. `wrap` and `unwrap` are
/// async, run the PKCS#11 calls on tokio's blocking threads, and need a
/// tokio runtime. The provider is cheap to share (`Arc`) and safe to call
/// concurrently: at most `pool_size` calls reach the token at once.
pub struct Pkcs11RootKey {
    pool: Arc<Pool>,
    sessions: Arc<Semaphore>,
    module: PathBuf,
    pool_size: usize,
    call_timeout: Duration,
}

impl Pkcs11RootKey {
    /// Connects to the master key described by `config`, checking
    /// everything listed in the module docs and performing a real wrap and
    /// unwrap. Blocks.
    pub fn connect(config: Pkcs11Config) -> Result<Self, Pkcs11Error> {
        config.validate()?;
        let module = module::load(&config.module)?;
        let slot = module::find_token(module.context(), &config.token_label)?;
        module::require_mechanism(
            module.context(),
            slot,
            &config.token_label,
            MechanismType::AES_GCM,
            Usage::EncryptDecrypt,
        )?;
        let pool = Pool::new(
            module,
            config.token_label,
            config.key_label,
            config.pin,
            config.pin_retry_interval,
            config.pool_size,
        );
        // The first call opens a session, which finds and checks the key;
        // the round trip's blob pins it for every session opened later.
        let probe = round_trip(&pool)?;
        pool.pin_key(probe);
        tracing::info!(
            module = %config.module.display(),
            token = %pool.token(),
            key = %pool.key_label(),
            pool_size = config.pool_size,
            "connected to the PKCS#11 master key"
        );
        Ok(Self {
            pool: Arc::new(pool),
            sessions: Arc::new(Semaphore::new(config.pool_size)),
            module: config.module,
            pool_size: config.pool_size,
            call_timeout: config.call_timeout,
        })
    }

    /// Creates the master key named by `config` in its token: AES-256,
    /// generated inside the token, private, sensitive, never extractable,
    /// usable only to encrypt and decrypt, not modifiable, with a random
    /// `CKA_ID`. Refuses if any object already has the label
    /// ([`Pkcs11Error::KeyExists`]). Blocks. `keygate admin` calls this; [`connect`](Self::connect)
    /// afterwards.
    pub fn create_master_key(config: &Pkcs11Config) -> Result<MasterKeyInfo, Pkcs11Error> {
        config.validate()?;
        let module = module::load(&config.module)?;
        let slot = module::find_token(module.context(), &config.token_label)?;
        let token = &config.token_label;
        let context = module.context();
        module::require_mechanism(
            context,
            slot,
            token,
            MechanismType::AES_KEY_GEN,
            Usage::GenerateKey,
        )?;
        module::require_mechanism(
            context,
            slot,
            token,
            MechanismType::AES_GCM,
            Usage::EncryptDecrypt,
        )?;
        let pool = Pool::new(
            module,
            config.token_label.clone(),
            config.key_label.clone(),
            config.pin.clone(),
            config.pin_retry_interval,
            1,
        );
        let info =
            pool.with_read_write(|session| key::create(session, token, &config.key_label))?;
        tracing::info!(token = %info.token_label, key = %info.key_label, id = %info.key_id,
            "created the PKCS#11 master key");
        Ok(info)
    }

    /// The module path.
    pub fn module(&self) -> &Path {
        &self.module
    }

    /// Runs `op` on a blocking thread once a session permit is free, and
    /// waits for both at most `call_timeout`. Not in place
    /// (`block_in_place`, which saved a thread handoff): a call blocked in
    /// place cannot be given up on, neither by this nor by the request's
    /// timeout, and a network HSM that stops answering would hold every
    /// caller. A call given up on runs on until the module returns, keeping
    /// its permit, so a hung module uses up the pool and later calls give
    /// up waiting for a permit: in time too.
    async fn call<T: Send + 'static>(
        &self,
        op: impl FnOnce(&Pool) -> Result<T, Pkcs11Error> + Send + 'static,
    ) -> Result<T, RootKeyError> {
        let deadline = tokio::time::Instant::now() + self.call_timeout;
        let no_answer = || RootKeyError::from(Pkcs11Error::NoAnswer { waited: self.call_timeout });
        let permit = tokio::time::timeout_at(deadline, Arc::clone(&self.sessions).acquire_owned())
            .await
            .map_err(|_| no_answer())?
            .map_err(|_| Pkcs11Error::Worker { detail: "the session pool is closed".to_owned() })?;
        let pool = Arc::clone(&self.pool);
        let job = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            op(&pool)
        });
        match tokio::time::timeout_at(deadline, job).await {
            Err(_elapsed) => Err(no_answer()),
            Ok(Ok(result)) => result.map_err(RootKeyError::from),
            Ok(Err(join)) => Err(Pkcs11Error::Worker { detail: join.to_string() }.into()),
        }
    }
}

impl fmt::Debug for Pkcs11RootKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pkcs11RootKey")
            .field("module", &self.module)
            .field("token", &self.pool.token())
            .field("key", &self.pool.key_label())
            .field("pool_size", &self.pool_size)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl RootKeyProvider for Pkcs11RootKey {
    fn describe(&self) -> ProviderInfo {
        ProviderInfo {
            kind: PROVIDER_KIND,
            key_ref: format!("{}/{}", self.pool.token(), self.pool.key_label()),
        }
    }

    async fn wrap(&self, key: &Key256, context: &WrapContext) -> Result<Vec<u8>, RootKeyError> {
        let key = key.duplicate();
        let aad = context.aad();
        self.call(move |pool| pool.run(|live| blob::seal(live, &key, &aad))).await
    }

    async fn unwrap(&self, wrapped: &[u8], context: &WrapContext) -> Result<Key256, RootKeyError> {
        // Malformed blobs never reach the token.
        if wrapped.len() != blob::LEN || wrapped.first() != Some(&blob::VERSION) {
            return Err(RootKeyError::CannotUnwrap);
        }
        let wrapped = wrapped.to_vec();
        let aad = context.aad();
        self.call(move |pool| pool.run(|live| blob::open(live, &wrapped, &aad, pool.probe()))).await
    }
}

/// Wraps and unwraps a random key under the readiness context; the blob
/// becomes the probe that pins the master key (`Pool::pin_key`).
fn round_trip(pool: &Pool) -> Result<Probe, Pkcs11Error> {
    let key = Key256::generate()?;
    let aad = readiness_context().aad();
    let wrapped = pool.run(|live| blob::seal(live, &key, &aad))?;
    let back = pool.run(|live| blob::open(live, &wrapped, &aad, None))?;
    if !ct_eq(back.expose_secret(), key.expose_secret()) {
        return Err(Pkcs11Error::RoundTripMismatch);
    }
    Ok(Probe { blob: wrapped, aad })
}

#[cfg(test)]
mod tests;
