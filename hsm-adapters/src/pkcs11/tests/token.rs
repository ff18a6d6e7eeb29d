//! Tests against a real SoftHSM2 token: which keys may be the master key,
//! on connecting and on every session opened later. (The provider's
//! contract and outage behaviour are tested in `tests/tests/root_providers.rs`.)

use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use kms_core::{Key256, RootKeyError, RootKeyProvider};

use super::softhsm2::Token;
use super::*;
use crate::readiness_context;

/// The label of the master key the tests create.
const MASTER: &str = "master";

/// The template of a key fit to be the master key, labelled `label`, with
/// `change` replacing the attribute of the same type (or added).
fn template(label: &str, change: Option<Attribute>) -> Vec<Attribute> {
    let mut template = vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Encrypt(true),
        Attribute::Decrypt(true),
        Attribute::Derive(false),
        Attribute::Label(label.as_bytes().to_vec()),
    ];
    if let Some(change) = change {
        template.retain(|a| a.attribute_type() != change.attribute_type());
        template.push(change);
    }
    template
}

/// Generates an AES-256 key in the token.
fn generate(session: &Session, label: &str, change: Option<Attribute>) -> ObjectHandle {
    let mut template = template(label, change);
    template.push(Attribute::ValueLen(32.into()));
    session.generate_key(&Mechanism::AesKeyGen, &template).unwrap()
}

/// The handle of the one secret key labelled `label`.
fn find(session: &Session, label: &str) -> ObjectHandle {
    let found = session
        .find_objects(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::Label(label.as_bytes().to_vec()),
        ])
        .unwrap();
    let [key] = found.as_slice() else { panic!("{} keys labelled {label}", found.len()) };
    *key
}

/// A provider of [`MASTER`] with one session (so a test knows which
/// session a call takes), and `change` made to its configuration.
fn one_session(token: &Token, change: impl FnOnce(&mut Pkcs11Config)) -> Pkcs11RootKey {
    let mut config = token.config(MASTER);
    config.pool_size = 1;
    change(&mut config);
    Pkcs11RootKey::connect(config).unwrap()
}

/// Connects to the key labelled `label`; the reason it is unsuitable.
fn refusal(token: &Token, label: &str) -> &'static str {
    match Pkcs11RootKey::connect(token.config(label)) {
        Err(Pkcs11Error::UnsuitableKey { reason, key, .. }) if key == label => reason,
        Err(other) => panic!("{label}: {other}"),
        Ok(_) => panic!("{label}: connected to an unsuitable key"),
    }
}

#[test]
fn created_master_key_is_accepted_and_cannot_be_modified() {
    let Some(token) = Token::for_test(concat!(
        module_path!(),
        "::created_master_key_is_accepted_and_cannot_be_modified"
    )) else {
        return;
    };
    Pkcs11RootKey::create_master_key(&token.config(MASTER)).unwrap();
    Pkcs11RootKey::connect(token.config(MASTER)).unwrap();
    let session = token.user_session();
    let key = find(&session, MASTER);
    let attributes = session.get_attributes(key, &[AttributeType::Modifiable]).unwrap();
    assert!(matches!(attributes.as_slice(), [Attribute::Modifiable(false)]), "{attributes:?}");
    // Neither its label nor its usage can be changed.
    for change in [Attribute::Label(b"other".to_vec()), Attribute::Derive(true)] {
        let result = session.update_attributes(key, std::slice::from_ref(&change));
        assert!(result.is_err(), "{change:?} was changed");
    }
    Pkcs11RootKey::connect(token.config(MASTER)).unwrap();
}

#[test]
fn unfit_keys_are_refused_naming_the_attribute() {
    let Some(token) =
        Token::for_test(concat!(module_path!(), "::unfit_keys_are_refused_naming_the_attribute"))
    else {
        return;
    };
    // Kept open: a session object lives as long as the session that made it.
    let session = token.user_session();
    // The base template makes a fit key, so each refusal below is caused
    // by the one attribute that differs.
    generate(&session, "fit", None);
    Pkcs11RootKey::connect(token.config("fit")).unwrap();

    let changed = [
        ("not-private", Attribute::Private(false), "CKA_PRIVATE"),
        ("derives", Attribute::Derive(true), "CKA_DERIVE"),
        ("session-object", Attribute::Token(false), "CKA_TOKEN"),
        ("extractable", Attribute::Extractable(true), "CKA_EXTRACTABLE"),
        ("not-sensitive", Attribute::Sensitive(false), "CKA_SENSITIVE"),
        ("no-encrypt", Attribute::Encrypt(false), "CKA_ENCRYPT"),
    ];
    for (label, change, attribute) in changed {
        generate(&session, label, Some(change));
        let reason = refusal(&token, label);
        assert!(reason.contains(attribute), "{label}: {reason}");
    }

    // Imported in plaintext: its value was known outside the token.
    let mut imported = template("imported", None);
    imported.push(Attribute::Value(vec![0x42; 32]));
    session.create_object(&imported).unwrap();
    let reason = refusal(&token, "imported");
    assert!(reason.contains("CKA_ALWAYS_SENSITIVE"), "{reason}");

    // Made sensitive, or not extractable, only after it was made.
    for (label, before, after, attribute) in [
        (
            "was-readable",
            Attribute::Sensitive(false),
            Attribute::Sensitive(true),
            "CKA_ALWAYS_SENSITIVE",
        ),
        (
            "was-extractable",
            Attribute::Extractable(true),
            Attribute::Extractable(false),
            "CKA_NEVER_EXTRACTABLE",
        ),
    ] {
        let key = generate(&session, label, Some(before));
        session.update_attributes(key, &[after]).unwrap();
        let reason = refusal(&token, label);
        assert!(reason.contains(attribute), "{label}: {reason}");
    }

    // The message names the key, the token and the attribute.
    let error = Pkcs11RootKey::connect(token.config("not-private")).unwrap_err();
    let message = error.to_string();
    assert!(message.contains("\"not-private\"") && message.contains("CKA_PRIVATE"), "{message}");
    assert!(matches!(RootKeyError::from(error), RootKeyError::Misconfigured { .. }));
}

/// A key deleted and replaced under the same label by one that could
/// leave the token is refused on the next session the provider opens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_swapped_in_under_the_label_is_refused() {
    let Some(token) =
        Token::for_test(concat!(module_path!(), "::a_key_swapped_in_under_the_label_is_refused"))
    else {
        return;
    };
    Pkcs11RootKey::create_master_key(&token.config(MASTER)).unwrap();
    let provider = one_session(&token, |_| {});
    let context = readiness_context();
    let key = Key256::generate().unwrap();
    let blob = provider.wrap(&key, &context).await.unwrap();
    provider.unwrap(&blob, &context).await.unwrap();

    let session = token.user_session();
    session.destroy_object(find(&session, MASTER)).unwrap();
    generate(&session, MASTER, Some(Attribute::Extractable(true)));
    drop(session);

    // The pooled session's key handle is gone, so the call is retried on a
    // fresh session, which finds the new key and refuses it.
    let error = provider.wrap(&key, &context).await.unwrap_err();
    let RootKeyError::Misconfigured { detail, .. } = &error else { panic!("{error:?}") };
    assert!(detail.contains("CKA_EXTRACTABLE"), "{detail}");
    // And it keeps being refused.
    let error = provider.wrap(&key, &context).await.unwrap_err();
    assert!(matches!(error, RootKeyError::Misconfigured { .. }), "{error:?}");
}

/// A key deleted and replaced under the same label by one that is fit to
/// be a master key (as regenerating it, or restoring the token from the
/// wrong backup, would leave it) is not used: a session that finds it
/// fails closed, so nothing is wrapped under a key that blobs recorded
/// under this master could not be unwrapped with.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fit_key_swapped_in_under_the_label_is_not_used() {
    let Some(token) = Token::for_test(concat!(
        module_path!(),
        "::a_fit_key_swapped_in_under_the_label_is_not_used"
    )) else {
        return;
    };
    Pkcs11RootKey::create_master_key(&token.config(MASTER)).unwrap();
    let provider = one_session(&token, |_| {});
    let context = readiness_context();
    let key = Key256::generate().unwrap();
    let blob = provider.wrap(&key, &context).await.unwrap();

    let session = token.user_session();
    session.destroy_object(find(&session, MASTER)).unwrap();
    generate(&session, MASTER, None);

    // The pooled session's key handle is gone, so the call is retried on a
    // fresh session, which finds the new key: fit, but not the master key.
    // Then every call opens a fresh session (none is pooled), and each
    // refuses it again; neither wrap nor unwrap uses it.
    let expect_refused = |error: RootKeyError| {
        let RootKeyError::Misconfigured { detail, .. } = &error else { panic!("{error:?}") };
        assert!(detail.contains("is not the master key this process connected to"), "{detail}");
        assert!(detail.contains(&format!("{MASTER:?}")), "{detail}");
    };
    for _ in 0..2 {
        expect_refused(provider.wrap(&key, &context).await.unwrap_err());
        expect_refused(provider.unwrap(&blob, &context).await.unwrap_err());
    }
    // After a re-login too (every session logged out behind its back).
    session.logout().unwrap();
    expect_refused(provider.wrap(&key, &context).await.unwrap_err());
    let session = token.user_session();

    // It is refused for being another key, not for being unfit: a provider
    // connecting afresh takes it (and cannot unwrap the old blob).
    let fresh = Pkcs11RootKey::connect(token.config(MASTER)).unwrap();
    let error = fresh.unwrap(&blob, &context).await.unwrap_err();
    assert!(matches!(error, RootKeyError::CannotUnwrap), "{error:?}");
    drop(session);
}

/// A public AES key under the master's label (anyone who can open a
/// session may create one, without the PIN) neither shadows the master key
/// nor makes its label ambiguous, at connection or in a later session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_public_key_under_the_label_does_not_shadow_the_master() {
    let Some(token) = Token::for_test(concat!(
        module_path!(),
        "::a_public_key_under_the_label_does_not_shadow_the_master"
    )) else {
        return;
    };
    Pkcs11RootKey::create_master_key(&token.config(MASTER)).unwrap();
    // Planted on a session that did not log in (no session of this process
    // is logged in now), as a token object.
    let public = token.public_session();
    let mut planted = template(MASTER, Some(Attribute::Private(false)));
    planted.push(Attribute::Value(vec![0x42; 32]));
    public.create_object(&planted).unwrap();

    let provider = one_session(&token, |_| {});
    let context = readiness_context();
    let key = Key256::generate().unwrap();
    let blob = provider.wrap(&key, &context).await.unwrap();
    let back = provider.unwrap(&blob, &context).await.unwrap();
    assert_eq!(back.expose_secret(), key.expose_secret());

    // Another one, generated in the token, planted while the provider
    // runs; a fresh session (all logged out) still finds the master key.
    generate(&public, MASTER, Some(Attribute::Private(false)));
    public.logout().unwrap();
    let back = provider.unwrap(&blob, &context).await.unwrap();
    assert_eq!(back.expose_secret(), key.expose_secret());
    let blob = provider.wrap(&key, &context).await.unwrap();
    provider.unwrap(&blob, &context).await.unwrap();
    Pkcs11RootKey::connect(token.config(MASTER)).unwrap();
}

/// Once the token refuses the PIN, it is never offered again: after the
/// token's PIN is put back to the provider's, a login would succeed, yet
/// every call (and a provider connected again with that PIN) fails at once
/// saying the service must be restarted, however long the retry interval.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_pin_is_never_offered_again() {
    let Some(token) =
        Token::for_test(concat!(module_path!(), "::a_refused_pin_is_never_offered_again"))
    else {
        return;
    };
    const ROTATED: &str = "rotated-pin-5c0e7d21-do-not-log";
    let user_pin = || secrecy::SecretString::from(keygate_test_support::softhsm2::USER_PIN);
    let rotated = || secrecy::SecretString::from(ROTATED);
    Pkcs11RootKey::create_master_key(&token.config(MASTER)).unwrap();
    let mut config = token.config(MASTER);
    config.pin_retry_interval = std::time::Duration::from_millis(10);
    let provider = Pkcs11RootKey::connect(config).unwrap();
    let context = readiness_context();
    let key = Key256::generate().unwrap();
    let blob = provider.wrap(&key, &context).await.unwrap();

    // The HSM PIN is rotated and every session logged out: the provider's
    // next login is refused.
    let session = token.user_session();
    session.set_pin(&user_pin(), &rotated()).unwrap();
    session.logout().unwrap();
    let error = provider.wrap(&key, &context).await.unwrap_err();
    let RootKeyError::Misconfigured { detail, .. } = &error else { panic!("{error:?}") };
    assert_eq!(detail, "C_Login failed: CKR_PIN_INCORRECT");

    // The PIN is put back, and no session is logged in: a login with the
    // provider's PIN would now succeed, and the retry interval is over.
    drop(session);
    let session = token.session_as(ROTATED);
    session.set_pin(&rotated(), &user_pin()).unwrap();
    session.logout().unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let refused = |error: RootKeyError| {
        let RootKeyError::Misconfigured { detail, .. } = &error else { panic!("{error:?}") };
        assert!(detail.contains("refused the user PIN"), "{detail}");
        assert!(detail.contains("CKR_PIN_INCORRECT"), "{detail}");
        assert!(detail.contains("restart the key service with the right PIN"), "{detail}");
    };
    for _ in 0..3 {
        refused(provider.wrap(&key, &context).await.unwrap_err());
        refused(provider.unwrap(&blob, &context).await.unwrap_err());
    }
    // Not by a provider connected again with the same PIN either.
    let error = Pkcs11RootKey::connect(token.config(MASTER)).unwrap_err();
    assert!(matches!(error, Pkcs11Error::PinRefused { rv: RvError::PinIncorrect, .. }), "{error}");
    assert!(error.is_login_failure());
    // No login happened: the user is still logged out.
    let info = session.get_session_info().unwrap();
    assert_eq!(info.session_state(), cryptoki::session::SessionState::RwPublic);
}

/// A module that stops answering (a network HSM on a half-open connection)
/// does not hold its callers: a call gives up after `call_timeout`, and so
/// does one waiting for the session the stuck call holds; once the module
/// answers again, so does the provider.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_module_that_stops_answering_is_given_up_on_in_time() {
    let Some(token) = Token::for_test(concat!(
        module_path!(),
        "::a_module_that_stops_answering_is_given_up_on_in_time"
    )) else {
        return;
    };
    Pkcs11RootKey::create_master_key(&token.config(MASTER)).unwrap();
    let timeout = std::time::Duration::from_millis(300);
    let provider = one_session(&token, |config| config.call_timeout = timeout);
    let started = std::time::Instant::now();
    let stuck = provider
        .call(|_| {
            std::thread::sleep(std::time::Duration::from_millis(2_000));
            Ok(())
        })
        .await;
    let no_answer = |e: &RootKeyError| matches!(e, RootKeyError::Unavailable { detail, .. } if detail.contains("no answer"));
    assert!(stuck.as_ref().is_err_and(no_answer), "{stuck:?}");
    let waiting = provider.wrap(&Key256::generate().unwrap(), &readiness_context()).await;
    assert!(waiting.as_ref().is_err_and(no_answer), "{waiting:?}");
    assert!(started.elapsed() < std::time::Duration::from_millis(1_500), "{:?}", started.elapsed());

    tokio::time::sleep(std::time::Duration::from_millis(2_000)).await;
    let key = Key256::generate().unwrap();
    let blob = provider.wrap(&key, &readiness_context()).await.unwrap();
    let back = provider.unwrap(&blob, &readiness_context()).await.unwrap();
    assert_eq!(back.expose_secret(), key.expose_secret());
}
