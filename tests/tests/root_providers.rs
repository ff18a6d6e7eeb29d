//! Root key providers against real backends: the shared contract
//! (`keygate_tests::providers::contract`) run against `local`, `pkcs11` on
//! a throwaway SoftHSM2 token and `aws-kms` on a moto server, then each
//! provider's start-up checks and its outage-and-recovery behaviour.
//!
//! What "provider down, then back" means here:
//! - **pkcs11** — (a) every session logged out behind the provider's back
//!   (`C_Logout`), (b) the module finalized (`C_Finalize`, as after a reset
//!   of an HSM client library): both are survived within the call by one
//!   retry on a fresh session; (c) the user PIN changed on the token: typed
//!   `C_Login failed: CKR_PIN_INCORRECT` (`Misconfigured`), and that PIN
//!   is never offered again by the process (a token that counts failed
//!   logins would lock its user out), even once it would work again; (d) the token's storage gone and the
//!   module reset: typed `Unavailable` ("no PKCS#11 token labelled …");
//!   after the storage is back and the module reset again, the same
//!   provider object works and unwraps blobs made before the outage.
//! - **aws-kms** — (a) the endpoint cut (a TCP proxy in front of moto
//!   stops listening and resets connections): typed, retryable
//!   `Unavailable`; after it listens again the same provider object works
//!   and unwraps blobs made before the outage; (b) moto itself stopped:
//!   `Unavailable`; started again on the same port it has lost every key
//!   (moto keeps state in memory only), which the same provider object
//!   reports as `Misconfigured` "key … not found" — not as an outage.
//! - **local** — a key file has no outage to simulate; it runs the contract.
//!
//! Every pkcs11 and aws-kms test ends by asserting that the PINs and the
//! AWS secret key appear nowhere in the captured logs (all crates, TRACE
//! level); the pkcs11 tests also check their child process's output.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // test code

use std::any::Any;
use std::sync::Arc;
use std::time::Duration;

use hsm_adapters::{
    Argon2Params, AwsKmsError, AwsKmsRootKey, LocalRootKey, Pkcs11Error, Pkcs11RootKey,
};
use keygate_tests::providers::contract;
use keygate_tests::providers::logs::Logs;
use keygate_tests::providers::moto::{self, MotoServer};
use keygate_tests::providers::softhsm2::{self, SoftHsm2};
use kms_core::{Key256, RootKeyError, RootKeyProvider};

/// Strings that must never be logged.
const SECRETS: &[&str] =
    &[softhsm2::USER_PIN, softhsm2::SO_PIN, OTHER_PIN, moto::SECRET_ACCESS_KEY];
/// The PIN the token is switched to in the wrong-PIN test.
const OTHER_PIN: &str = "other-pin-91d0c3aa-do-not-log";

/// A provider under test and what must outlive it (token, server, dir).
struct Fixture {
    provider: Arc<dyn RootKeyProvider>,
    _keep: Box<dyn Any + Send>,
}

impl Fixture {
    /// Ends a test: nothing secret was logged.
    fn finish(self) {
        drop(self.provider);
        Logs::capture().assert_free_of(SECRETS);
    }
}

/// The contract, as one test per check, for the provider made by `$setup`.
macro_rules! contract_suite {
    ($module:literal) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn round_trip() {
            let Some(fixture) = setup(concat!($module, "::round_trip")).await else { return };
            contract::round_trip(&*fixture.provider).await;
            fixture.finish();
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn other_context_fails() {
            let Some(fixture) = setup(concat!($module, "::other_context_fails")).await else {
                return;
            };
            contract::other_context_fails(&*fixture.provider).await;
            fixture.finish();
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn tampered_blob_fails() {
            let Some(fixture) = setup(concat!($module, "::tampered_blob_fails")).await else {
                return;
            };
            contract::tampered_blob_fails(&*fixture.provider).await;
            fixture.finish();
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn wraps_are_randomized() {
            let Some(fixture) = setup(concat!($module, "::wraps_are_randomized")).await else {
                return;
            };
            contract::wraps_are_randomized(&*fixture.provider).await;
            fixture.finish();
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn concurrent_round_trips() {
            let Some(fixture) = setup(concat!($module, "::concurrent_round_trips")).await else {
                return;
            };
            contract::concurrent_round_trips(Arc::clone(&fixture.provider)).await;
            fixture.finish();
        }
    };
}

/// A wrap that must fail; returns the error.
async fn wrap_fails(provider: &dyn RootKeyProvider) -> RootKeyError {
    let key = Key256::generate().unwrap();
    provider.wrap(&key, &contract::context("acme", 1)).await.expect_err("wrap must fail")
}

/// Wraps a fresh key; returns it and the blob.
async fn wrap_one(provider: &dyn RootKeyProvider) -> (Key256, Vec<u8>) {
    let key = Key256::generate().unwrap();
    let blob = provider.wrap(&key, &contract::context("acme", 1)).await.unwrap();
    (key, blob)
}

/// Unwraps `blob` and checks it is `key`.
async fn unwraps_to(provider: &dyn RootKeyProvider, blob: &[u8], key: &Key256) {
    let back = provider.unwrap(blob, &contract::context("acme", 1)).await.unwrap();
    assert_eq!(back.expose_secret(), key.expose_secret());
}

mod local {
    use super::*;

    async fn setup(_test: &str) -> Option<Fixture> {
        Logs::capture();
        let dir = tempfile::tempdir().unwrap();
        let provider =
            LocalRootKey::create(dir.path().join("root.key"), None, Argon2Params::DEFAULT).unwrap();
        Some(Fixture { provider: Arc::new(provider), _keep: Box::new(dir) })
    }

    contract_suite!("local");
}

mod pkcs11 {
    use super::*;

    /// The token with the master key, and a connected provider.
    async fn setup(test: &str) -> Option<Fixture> {
        let (token, provider) = connected(test, |_| {}).await?;
        Some(Fixture { provider: Arc::new(provider), _keep: Box::new(token) })
    }

    /// In the child process of `test`: the token with the master key, and
    /// a provider connected with the config adjusted by `adjust`.
    async fn connected(
        test: &str,
        adjust: impl FnOnce(&mut hsm_adapters::Pkcs11Config) + Send + 'static,
    ) -> Option<(SoftHsm2, Pkcs11RootKey)> {
        let token = SoftHsm2::for_test(test)?;
        Logs::capture();
        token.create_key();
        let mut config = token.config();
        adjust(&mut config);
        let provider = tokio::task::spawn_blocking(move || Pkcs11RootKey::connect(config))
            .await
            .unwrap()
            .unwrap();
        Some((token, provider))
    }

    /// Connects with `config` on a blocking thread.
    async fn connect(config: hsm_adapters::Pkcs11Config) -> Result<Pkcs11RootKey, Pkcs11Error> {
        tokio::task::spawn_blocking(move || Pkcs11RootKey::connect(config)).await.unwrap()
    }

    contract_suite!("pkcs11");

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn startup_checks_name_the_problem() {
        let Some(token) = SoftHsm2::for_test("pkcs11::startup_checks_name_the_problem") else {
            return;
        };
        let logs = Logs::capture();
        let info = token.create_key();
        assert_eq!(
            (info.token_label.as_str(), info.key_label.as_str()),
            (softhsm2::TOKEN_LABEL, softhsm2::KEY_LABEL)
        );
        assert_eq!(info.key_id.len(), 32);

        // Wrong PIN, checked while no session is logged in (a process that
        // is logged in already would not be asked for the PIN again).
        let mut config = token.config();
        config.pin = secrecy::SecretString::from(OTHER_PIN);
        let error = connect(config).await.unwrap_err();
        assert_eq!(error.to_string(), "C_Login failed: CKR_PIN_INCORRECT");
        assert!(matches!(error.rv(), Some(cryptoki::error::RvError::PinIncorrect)));
        let root = RootKeyError::from(error);
        assert!(matches!(root, RootKeyError::Misconfigured { .. }), "{root:?}");
        assert!(!root.is_retryable());

        // Missing module file.
        let mut config = token.config();
        config.module = "/nonexistent/libvendor-pkcs11.so".into();
        let message = connect(config).await.unwrap_err().to_string();
        assert!(message.contains("/nonexistent/libvendor-pkcs11.so"), "{message}");
        assert!(message.contains("apt-get install softhsm2"), "{message}");

        // A file that is not a PKCS#11 module.
        let not_a_module = tempfile::NamedTempFile::new().unwrap();
        let mut config = token.config();
        config.module = not_a_module.path().to_owned();
        let error = connect(config).await.unwrap_err();
        assert!(matches!(error, Pkcs11Error::ModuleLoad { .. }), "{error:?}");

        // Unknown token: the message lists the tokens that are there.
        let mut config = token.config();
        config.token_label = "no-such-token".into();
        let message = connect(config).await.unwrap_err().to_string();
        assert!(message.contains("no-such-token") && message.contains("keygate-test"), "{message}");

        // Unknown key label.
        let mut config = token.config();
        config.key_label = "no-such-key".into();
        let error = connect(config).await.unwrap_err();
        assert!(matches!(error, Pkcs11Error::KeyNotFound { .. }), "{error:?}");
        assert!(error.to_string().contains("no-such-key"));

        // A key that could leave the token is refused.
        token.admin().create_weak_key("weak-key");
        let mut config = token.config();
        config.key_label = "weak-key".into();
        let message = connect(config).await.unwrap_err().to_string();
        assert!(message.contains("extractable"), "{message}");

        // Creating the master key twice is refused.
        let config = token.config();
        let error = tokio::task::spawn_blocking(move || Pkcs11RootKey::create_master_key(&config))
            .await
            .unwrap()
            .unwrap_err();
        assert!(matches!(error, Pkcs11Error::KeyExists { .. }), "{error:?}");

        // Bad values are refused before the module is touched.
        let mut config = token.config();
        config.pool_size = 0;
        assert!(matches!(connect(config).await, Err(Pkcs11Error::InvalidConfig { .. })));

        // The right configuration connects; Debug never shows the PIN.
        let config = token.config();
        let debug = format!("{config:?}");
        assert!(debug.contains("[redacted]") && !debug.contains(softhsm2::USER_PIN), "{debug}");
        let provider = connect(config).await.unwrap();
        assert_eq!(provider.describe().to_string(), "pkcs11:keygate-test/keygate-master-1");
        assert!(!format!("{provider:?}").contains(softhsm2::USER_PIN));
        logs.assert_contains("connected to the PKCS#11 master key");
        drop(provider);
        logs.assert_free_of(SECRETS);
    }

    /// On a current-thread runtime the calls go to tokio's blocking
    /// threads instead of running in place.
    #[tokio::test(flavor = "current_thread")]
    async fn works_on_a_current_thread_runtime() {
        let Some(fixture) = setup("pkcs11::works_on_a_current_thread_runtime").await else {
            return;
        };
        contract::round_trip(&*fixture.provider).await;
        contract::concurrent_round_trips(Arc::clone(&fixture.provider)).await;
        fixture.finish();
    }

    #[test]
    fn created_master_key_never_leaves_the_token() {
        let Some(token) = SoftHsm2::for_test("pkcs11::created_master_key_never_leaves_the_token")
        else {
            return;
        };
        Logs::capture();
        token.create_key();
        let (flags, value_refused) = token.admin().key_protection(softhsm2::KEY_LABEL);
        // sensitive, extractable, always sensitive, never extractable, private, token
        assert_eq!(flags, [true, false, true, true, true, true]);
        assert!(value_refused, "the key's value must not be readable");
        Logs::capture().assert_free_of(SECRETS);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn logged_out_sessions_are_retried_on_a_fresh_session() {
        let test = "pkcs11::logged_out_sessions_are_retried_on_a_fresh_session";
        let Some((token, provider)) = connected(test, |_| {}).await else { return };
        let (key, blob) = wrap_one(&provider).await;
        token.admin().logout_everyone();
        // The pooled session lost its login and key handle; the call is
        // retried once on a fresh session, which logs in again.
        unwraps_to(&provider, &blob, &key).await;
        let (key, blob) = wrap_one(&provider).await;
        unwraps_to(&provider, &blob, &key).await;
        let logs = Logs::capture();
        logs.assert_contains("retrying once on a fresh session");
        logs.assert_free_of(SECRETS);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn finalized_module_is_initialized_again() {
        let test = "pkcs11::finalized_module_is_initialized_again";
        let Some((token, provider)) = connected(test, |_| {}).await else { return };
        let (key, blob) = wrap_one(&provider).await;
        token.admin().finalize_module();
        unwraps_to(&provider, &blob, &key).await;
        contract::concurrent_round_trips(Arc::new(provider)).await;
        let logs = Logs::capture();
        logs.assert_contains("CKR_CRYPTOKI_NOT_INITIALIZED");
        logs.assert_contains("re-initialized the PKCS#11 module");
        logs.assert_free_of(SECRETS);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refused_pin_is_typed_and_never_offered_again() {
        let test = "pkcs11::a_refused_pin_is_typed_and_never_offered_again";
        let retry = Duration::from_millis(300);
        let Some((token, provider)) =
            connected(test, move |config| config.pin_retry_interval = retry).await
        else {
            return;
        };
        let (_, blob) = wrap_one(&provider).await;

        // The token's PIN changes; every session is logged out.
        token.admin().change_user_pin(softhsm2::USER_PIN, OTHER_PIN);
        let error = wrap_fails(&provider).await;
        let RootKeyError::Misconfigured { detail, .. } = &error else { panic!("{error:?}") };
        assert!(detail.contains("C_Login failed: CKR_PIN_INCORRECT"), "{detail}");
        // The PIN is not tried again, not even after the retry interval
        // and with the token's PIN changed back: a restart with the right
        // PIN is the way back, and says so.
        let error = wrap_fails(&provider).await;
        let RootKeyError::Misconfigured { detail, .. } = &error else { panic!("{error:?}") };
        assert!(detail.contains("not trying it again"), "{detail}");
        token.admin().change_user_pin(OTHER_PIN, softhsm2::USER_PIN);
        tokio::time::sleep(retry).await;
        let error = wrap_fails(&provider).await;
        let RootKeyError::Misconfigured { detail, .. } = &error else { panic!("{error:?}") };
        assert!(detail.contains("restart the key service with the right PIN"), "{detail}");
        let refused = provider.unwrap(&blob, &contract::context("acme", 1)).await;
        assert!(refused.is_err(), "a blob made before is not unwrapped either");
        Logs::capture().assert_free_of(SECRETS);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn token_gone_is_unavailable_then_recovers() {
        let test = "pkcs11::token_gone_is_unavailable_then_recovers";
        let Some((token, provider)) = connected(test, |_| {}).await else { return };
        let (key, blob) = wrap_one(&provider).await;

        // The token's storage disappears and the module is reset.
        let admin = token.admin();
        let hidden = admin.hide_token_storage();
        admin.finalize_module();
        for _ in 0..2 {
            let error = wrap_fails(&provider).await;
            assert!(error.is_retryable(), "{error:?}");
            let RootKeyError::Unavailable { detail, .. } = &error else { panic!("{error:?}") };
            assert!(detail.contains("no PKCS#11 token labelled \"keygate-test\""), "{detail}");
        }

        // The storage is back and the module is reset again: the same
        // provider object works and unwraps the blob from before.
        hidden.restore();
        token.admin().finalize_module();
        unwraps_to(&provider, &blob, &key).await;
        let (key, blob) = wrap_one(&provider).await;
        unwraps_to(&provider, &blob, &key).await;
        Logs::capture().assert_free_of(SECRETS);
    }
}

mod aws_kms {
    use keygate_tests::providers::tcp_proxy::TcpProxy;

    use super::*;

    /// A moto server with a fresh key, and a provider connected to it.
    async fn setup(_test: &str) -> Option<Fixture> {
        let (moto, provider) = connected().await;
        Some(Fixture { provider: Arc::new(provider), _keep: Box::new(moto) })
    }

    async fn connected() -> (MotoServer, AwsKmsRootKey) {
        Logs::capture();
        let moto = MotoServer::start();
        let arn = moto.create_key().await;
        let provider =
            AwsKmsRootKey::connect_with_credentials(moto.config(&arn), moto::credentials())
                .await
                .unwrap();
        (moto, provider)
    }

    contract_suite!("aws_kms");

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn startup_checks_name_the_problem() {
        let logs = Logs::capture();
        let moto = MotoServer::start();
        let arn = moto.create_key().await;

        // Unknown key.
        let missing = "arn:aws:kms:eu-west-1:123456789012:key/00000000-0000-4000-8000-000000000000";
        let error =
            AwsKmsRootKey::connect_with_credentials(moto.config(missing), moto::credentials())
                .await
                .unwrap_err();
        assert!(matches!(error, AwsKmsError::KeyNotFound { .. }), "{error:?}");
        assert!(!error.is_retryable());
        assert!(matches!(RootKeyError::from(error), RootKeyError::Misconfigured { .. }));

        // Unreachable endpoint: typed, retryable, names the endpoint.
        let nowhere = format!("http://127.0.0.1:{}", moto::free_port());
        let error = AwsKmsRootKey::connect_with_credentials(
            moto::config_for(&nowhere, &arn),
            moto::credentials(),
        )
        .await
        .unwrap_err();
        assert!(matches!(error, AwsKmsError::Unreachable { .. }), "{error:?}");
        assert!(error.is_retryable());
        assert!(error.to_string().contains(&nowhere), "{error}");
        assert!(RootKeyError::from(error).is_retryable());

        // Plain HTTP to a non-loopback endpoint is refused up front.
        let error = AwsKmsRootKey::connect_with_credentials(
            moto::config_for("http://kms.example.com", &arn),
            moto::credentials(),
        )
        .await
        .unwrap_err();
        assert!(matches!(error, AwsKmsError::InvalidConfig { .. }), "{error:?}");

        // An alias is resolved to the key ARN, which `describe` reports.
        moto.create_alias("alias/keygate-root", &arn).await;
        let provider = AwsKmsRootKey::connect_with_credentials(
            moto.config("alias/keygate-root"),
            moto::credentials(),
        )
        .await
        .unwrap();
        assert_eq!(provider.key_arn(), arn);
        assert_eq!(provider.describe().key_ref, arn);
        assert!(!format!("{provider:?}").contains(moto::SECRET_ACCESS_KEY));
        logs.assert_contains("connected to the AWS KMS master key");
        logs.assert_free_of(SECRETS);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn context_travels_as_kms_encryption_context() {
        let (moto, provider) = connected().await;
        let context = contract::context("acme", 7);
        let key = Key256::generate().unwrap();
        let blob = provider.wrap(&key, &context).await.unwrap();
        let (&version, kms_blob) = blob.split_first().unwrap();
        assert_eq!(version, 1);

        // KMS itself decrypts the blob only with the context's pairs.
        let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new(moto::REGION))
            .endpoint_url(moto.endpoint())
            .credentials_provider(moto::credentials())
            .load()
            .await;
        let client = aws_sdk_kms::Client::new(&config);
        let decrypt = |pairs: Vec<(&'static str, String)>| {
            client
                .decrypt()
                .ciphertext_blob(aws_sdk_kms::primitives::Blob::new(kms_blob))
                .set_encryption_context(Some(
                    pairs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
                ))
                .send()
        };
        let output = decrypt(context.pairs().to_vec()).await.unwrap();
        assert_eq!(output.plaintext.unwrap().as_ref(), key.expose_secret());
        assert!(decrypt(contract::context("acme", 8).pairs().to_vec()).await.is_err());
        assert!(decrypt(Vec::new()).await.is_err());

        // The key travelled base64-encoded in the request body; the SDK's
        // TRACE logs must not show it, in any encoding.
        let back = provider.unwrap(&blob, &context).await.unwrap();
        assert_eq!(back.expose_secret(), key.expose_secret());
        let logs = Logs::capture();
        let encodings = [
            data_encoding::BASE64.encode(key.expose_secret()),
            data_encoding::HEXLOWER.encode(key.expose_secret()),
        ];
        logs.assert_free_of(&encodings.iter().map(String::as_str).collect::<Vec<_>>());
        logs.assert_free_of(SECRETS);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn endpoint_cut_is_unavailable_then_recovers() {
        Logs::capture();
        let moto = MotoServer::start();
        let arn = moto.create_key().await;
        let proxy = TcpProxy::start(moto.addr());
        let provider = AwsKmsRootKey::connect_with_credentials(
            moto::config_for(&proxy.endpoint(), &arn),
            moto::credentials(),
        )
        .await
        .unwrap();
        let (key, blob) = wrap_one(&provider).await;

        let cut = proxy.cut();
        let error = wrap_fails(&provider).await;
        assert!(matches!(error, RootKeyError::Unavailable { .. }), "{error:?}");
        assert!(error.is_retryable());
        let error = provider.unwrap(&blob, &contract::context("acme", 1)).await.unwrap_err();
        assert!(matches!(error, RootKeyError::Unavailable { .. }), "{error:?}");

        // Back: the same provider object, the blob from before the outage.
        let _proxy = cut.restore();
        unwraps_to(&provider, &blob, &key).await;
        let (key, blob) = wrap_one(&provider).await;
        unwraps_to(&provider, &blob, &key).await;
        Logs::capture().assert_free_of(SECRETS);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn moto_stopped_is_unavailable_and_restarted_moto_has_lost_the_key() {
        let (moto, provider) = connected().await;
        let port = moto.port();
        moto.stop();
        let error = wrap_fails(&provider).await;
        assert!(matches!(error, RootKeyError::Unavailable { .. }), "{error:?}");
        assert!(error.is_retryable());

        // A new moto on the same port answers again, but without our key:
        // the same provider object reaches it and says so, not "unavailable".
        let _moto = MotoServer::start_on(port);
        let error = wrap_fails(&provider).await;
        let RootKeyError::Misconfigured { detail, .. } = &error else { panic!("{error:?}") };
        assert!(detail.contains("not found") && detail.contains(provider.key_arn()), "{detail}");
        Logs::capture().assert_free_of(SECRETS);
    }
}
