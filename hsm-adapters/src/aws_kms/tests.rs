//! Unit tests of the AWS KMS provider: configuration checks, error
//! sorting, and the real SDK against a scripted endpoint (`fake_kms`) for
//! the failures moto cannot produce: throttling, 5xx, hanging, and the
//! SDK's retries. The provider against moto is tested in
//! `tests/tests/root_providers.rs`.

use std::time::{Duration, Instant};

use aws_credential_types::Credentials;
use aws_credential_types::credential_fn::provide_credentials_fn;
use aws_credential_types::provider::error::CredentialsError;
use kms_core::KeyPurpose;

use self::fake_kms::{ARN, FakeKms, Mode};
use super::*;

mod fake_kms;

const SECRET: &str = "unit-test-secret-4e0c-do-not-print";

fn credentials() -> SharedCredentialsProvider {
    SharedCredentialsProvider::new(Credentials::new("AKIDUNITTEST", SECRET, None, None, "unit"))
}

fn config(endpoint: &str) -> AwsKmsConfig {
    let mut config = AwsKmsConfig::new("eu-west-1", "alias/keygate");
    config.endpoint_url = Some(endpoint.to_owned());
    config.timeout = Duration::from_millis(500);
    config.max_attempts = 1;
    config.initial_backoff = Duration::from_millis(10);
    config
}

fn context(version: u32) -> WrapContext {
    WrapContext { purpose: KeyPurpose::TenantKek, owner: "acme".to_owned(), version }
}

async fn connected(fake: &FakeKms, max_attempts: u32) -> AwsKmsRootKey {
    let mut config = config(&fake.endpoint());
    config.max_attempts = max_attempts;
    AwsKmsRootKey::connect_with_credentials(config, credentials()).await.unwrap()
}

#[test]
fn provider_is_send_and_sync() {
    fn check<T: Send + Sync + 'static>() {}
    check::<AwsKmsRootKey>();
    check::<AwsKmsError>();
}

#[test]
fn endpoint_errors_never_show_a_password() {
    for url in [
        "https://user:s3cret@kms.eu-west-1.amazonaws.com/",
        "http://admin:s3cret@10.0.0.5:4566",
        "ftp://user:s3cret@127.0.0.1?x#y",
        // A password with `/`, `?` or `#` would end the authority early.
        "https://user:s3cret?x@kms.example/",
        "https://user:s3cret/x@kms.example/",
        "https://user:s3cret#x@kms.example/",
        "https://user:p@s3cret@kms.example/",
    ] {
        let Err(AwsKmsError::InvalidConfig { reason }) = config(url).validate() else {
            panic!("{url} accepted");
        };
        assert!(!reason.contains("s3cret") && !reason.contains("user:"), "{reason}");
        assert!(reason.contains("user or password"), "{reason}");
    }
    let shown = |url| endpoint_without_userinfo(url);
    assert_eq!(shown("https://user:pw@kms.example:443/p?q#f"), "https://kms.example:443/p?q#f");
    assert_eq!(shown("https://u:s3cret?x@kms.example/"), "https://kms.example/");
    assert_eq!(shown("https://u:p@ss@kms.example"), "https://kms.example");
    assert_eq!(shown("http://[::1]:4566/"), "http://[::1]:4566/");
    assert_eq!(shown("u:s3cret@kms.example"), "kms.example");
}

#[test]
fn config_is_validated() {
    let ok = |url: &str| config(url).validate().is_ok();
    assert!(ok("https://kms.eu-west-1.amazonaws.com"));
    assert!(ok("https://vpce-0abc.kms.eu-west-1.vpce.amazonaws.com/"));
    assert!(ok("http://127.0.0.1:4566"));
    assert!(ok("http://localhost:4566"));
    assert!(ok("http://[::1]:4566/"));
    assert!(!ok("http://10.0.0.5:4566"), "plain HTTP off the machine");
    assert!(!ok("http://kms.example.com"));
    assert!(!ok("ftp://127.0.0.1"));
    assert!(!ok("http://"));
    assert!(!ok("127.0.0.1:4566"));
    // The host is what follows the userinfo: plain HTTP to kms.example.
    assert!(!ok("http://localhost:4566@kms.example"), "userinfo read as the host");
    assert!(!ok("http://127.0.0.1@kms.example:80"));
    // No userinfo at all, even to a host that would be accepted.
    assert!(!ok("http://user@127.0.0.1:4566"));
    assert!(!ok("https://user:pw@kms.eu-west-1.amazonaws.com"));
    assert!(!ok("http://[::2]:4566"));
    assert!(ok("HTTP://127.0.0.1:4566"), "schemes are case-insensitive");
    assert!(!ok("http://localhost.:4566"), "not the name localhost");
    assert!(!ok("http://[::ffff:127.0.0.1]:4566"), "a mapped address is not loopback to Rust");
    assert!(AwsKmsConfig::new("eu-west-1", "k").validate().is_ok());

    let invalid = |adjust: fn(&mut AwsKmsConfig)| {
        let mut config = AwsKmsConfig::new("eu-west-1", "k");
        adjust(&mut config);
        matches!(config.validate(), Err(AwsKmsError::InvalidConfig { .. }))
    };
    assert!(invalid(|c| c.region = String::new()));
    assert!(invalid(|c| c.region = "EU West".to_owned()));
    assert!(invalid(|c| c.key_id = " ".to_owned()));
    assert!(invalid(|c| c.timeout = Duration::ZERO));
    assert!(invalid(|c| c.max_attempts = 0));
    assert!(invalid(|c| c.max_attempts = 11));
}

#[test]
fn service_errors_are_sorted_by_code() {
    let sort = |operation, code: &str, server_error| {
        AwsKmsError::from_service(operation, ARN, code.to_owned(), "m".to_owned(), server_error)
    };
    let root = |e: AwsKmsError| RootKeyError::from(e);
    assert!(matches!(
        root(sort("Encrypt", "ThrottlingException", false)),
        RootKeyError::Throttled { .. }
    ));
    assert!(matches!(
        root(sort("Encrypt", "LimitExceededException", false)),
        RootKeyError::Throttled { .. }
    ));
    for code in ["KMSInternalException", "DependencyTimeoutException", "KeyUnavailableException"] {
        let e = root(sort("Encrypt", code, true));
        assert!(matches!(e, RootKeyError::Unavailable { .. }) && e.is_retryable(), "{code}");
    }
    assert!(matches!(
        root(sort("Encrypt", "SomethingNew", true)),
        RootKeyError::Unavailable { .. }
    ));
    for code in [
        "NotFoundException",
        "AccessDeniedException",
        "DisabledException",
        "KMSInvalidStateException",
    ] {
        let e = root(sort("Encrypt", code, false));
        assert!(matches!(e, RootKeyError::Misconfigured { .. }) && !e.is_retryable(), "{code}");
    }
    for code in ["InvalidCiphertextException", "IncorrectKeyException"] {
        assert!(matches!(root(sort("Decrypt", code, false)), RootKeyError::CannotUnwrap), "{code}");
        assert!(
            matches!(root(sort("Encrypt", code, false)), RootKeyError::Backend { .. }),
            "{code}"
        );
    }
    assert!(matches!(
        root(sort("Encrypt", "ValidationException", false)),
        RootKeyError::Backend { .. }
    ));
}

#[tokio::test]
async fn connects_resolves_the_arn_and_round_trips() {
    let fake = FakeKms::start();
    let provider = connected(&fake, 1).await;
    assert_eq!(provider.key_arn(), ARN);
    assert_eq!(provider.describe(), ProviderInfo { kind: "aws-kms", key_ref: ARN.to_owned() });
    // The readiness round trip: one Encrypt and one Decrypt.
    assert_eq!(fake.requests(), ["TrentService.Encrypt", "TrentService.Decrypt"]);

    let key = Key256::generate().unwrap();
    let wrapped = provider.wrap(&key, &context(1)).await.unwrap();
    assert_eq!(wrapped.first(), Some(&WRAP_VERSION));
    let back = provider.unwrap(&wrapped, &context(1)).await.unwrap();
    assert_eq!(back.expose_secret(), key.expose_secret());
    assert!(matches!(
        provider.unwrap(&wrapped, &context(2)).await,
        Err(RootKeyError::CannotUnwrap)
    ));

    let debug = format!("{provider:?}");
    assert!(debug.contains(ARN) && !debug.contains(SECRET), "{debug}");
}

#[tokio::test]
async fn throttling_is_retried_with_backoff_then_typed() {
    let fake = FakeKms::start();
    let provider = connected(&fake, 3).await;
    fake.set_mode(Mode::Fail { status: 400, code: "ThrottlingException" });
    fake.reset_requests();
    let error = provider.wrap(&Key256::generate().unwrap(), &context(1)).await.unwrap_err();
    assert!(matches!(error, RootKeyError::Throttled { provider: "aws-kms" }), "{error:?}");
    assert!(error.is_retryable());
    assert_eq!(fake.requests().len(), 3, "the SDK made max_attempts attempts");
}

#[tokio::test]
async fn server_errors_are_unavailable() {
    let fake = FakeKms::start();
    let provider = connected(&fake, 1).await;
    for (status, code) in [(500, "KMSInternalException"), (503, "ServiceUnavailable")] {
        fake.set_mode(Mode::Fail { status, code });
        let error = provider.wrap(&Key256::generate().unwrap(), &context(1)).await.unwrap_err();
        let RootKeyError::Unavailable { detail, .. } = &error else { panic!("{error:?}") };
        assert!(detail.contains(code), "{detail}");
        assert!(!detail.contains(SECRET));
    }
}

#[tokio::test]
async fn a_hanging_endpoint_times_out() {
    let fake = FakeKms::start();
    let provider = connected(&fake, 2).await;
    fake.set_mode(Mode::Hang);
    let started = Instant::now();
    let error = provider.wrap(&Key256::generate().unwrap(), &context(1)).await.unwrap_err();
    assert!(matches!(error, RootKeyError::Unavailable { .. }), "{error:?}");
    // Two attempts of 500 ms each plus a short backoff.
    assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
}

#[tokio::test]
async fn access_denied_on_decrypt_is_told_apart_by_the_probe() {
    let fake = FakeKms::start();
    let provider = connected(&fake, 1).await;
    let key = Key256::generate().unwrap();
    let wrapped = provider.wrap(&key, &context(1)).await.unwrap();

    // KMS denies this blob but still decrypts ours: the blob is bad.
    fake.set_mode(Mode::FailDecryptExcept {
        code: "AccessDeniedException",
        allowed: provider.probe.clone(),
    });
    assert!(matches!(
        provider.unwrap(&wrapped, &context(1)).await,
        Err(RootKeyError::CannotUnwrap)
    ));

    // KMS denies everything: permissions were revoked.
    fake.set_mode(Mode::Fail { status: 400, code: "AccessDeniedException" });
    let error = provider.unwrap(&wrapped, &context(1)).await.unwrap_err();
    assert!(matches!(error, RootKeyError::Misconfigured { .. }), "{error:?}");

    // IncorrectKeyException: a blob of another key.
    fake.set_mode(Mode::Fail { status: 400, code: "IncorrectKeyException" });
    assert!(matches!(
        provider.unwrap(&wrapped, &context(1)).await,
        Err(RootKeyError::CannotUnwrap)
    ));
}

#[tokio::test]
async fn malformed_blobs_never_reach_kms() {
    let fake = FakeKms::start();
    let provider = connected(&fake, 1).await;
    fake.reset_requests();
    let too_long = vec![WRAP_VERSION; 2 + MAX_KMS_BLOB_LEN];
    for blob in [&[][..], &[WRAP_VERSION], &[2, 1, 2, 3], &too_long] {
        assert!(matches!(
            provider.unwrap(blob, &context(1)).await,
            Err(RootKeyError::CannotUnwrap)
        ));
    }
    assert!(fake.requests().is_empty());
}

#[tokio::test]
async fn missing_credentials_are_typed() {
    let fake = FakeKms::start();
    let none = SharedCredentialsProvider::new(provide_credentials_fn(|| async {
        Err(CredentialsError::not_loaded("no credentials configured"))
    }));
    let error =
        AwsKmsRootKey::connect_with_credentials(config(&fake.endpoint()), none).await.unwrap_err();
    assert!(matches!(error, AwsKmsError::Credentials { retryable: false, .. }), "{error:?}");
    assert!(matches!(RootKeyError::from(error), RootKeyError::Misconfigured { .. }));
    assert!(fake.requests().is_empty(), "nothing unsigned was sent");
}
