//! Unit tests that need no token: error names and mapping, configuration,
//! PIN sources, module loading failures; when a login may be tried in
//! `login`. Which keys may be the master key, and which PINs are offered,
//! are tested against a real SoftHSM2 token in `token` (each test in a child
//! process: SoftHSM2 reads its configuration from the environment once per
//! process); the provider's contract and outage behaviour in
//! `tests/tests/root_providers.rs`.

use std::io::Write;

use cryptoki::context::Function;
use cryptoki::error::RvError;
use secrecy::{ExposeSecret, SecretString};

use super::*;

const PIN: &str = "unit-test-pin-63b1-do-not-print";

fn config() -> Pkcs11Config {
    Pkcs11Config::new("/usr/lib/softhsm/libsofthsm2.so", "token", "key", SecretString::from(PIN))
}

fn call(function: Function, rv: RvError) -> Pkcs11Error {
    Pkcs11Error::Call { function, rv }
}

#[test]
fn provider_is_send_and_sync() {
    fn check<T: Send + Sync + 'static>() {}
    check::<Pkcs11RootKey>();
    check::<Pkcs11Error>();
}

#[test]
fn return_values_have_their_ckr_names() {
    let cases = [
        (RvError::PinIncorrect, "CKR_PIN_INCORRECT"),
        (RvError::CryptokiAlreadyInitialized, "CKR_CRYPTOKI_ALREADY_INITIALIZED"),
        (RvError::EncryptedDataLenRange, "CKR_ENCRYPTED_DATA_LEN_RANGE"),
        (RvError::SessionReadWriteSoExists, "CKR_SESSION_READ_WRITE_SO_EXISTS"),
        (RvError::GeneralError, "CKR_GENERAL_ERROR"),
        (RvError::Cancel, "CKR_CANCEL"),
        (RvError::VendorDefined(0x8000_0001), "CKR_VENDOR_DEFINED (0x80000001)"),
        (RvError::UnknownErrorCode(0x4242), "unknown CK_RV 0x4242"),
    ];
    for (rv, name) in cases {
        assert_eq!(ckr_name(rv), name);
    }
}

#[test]
fn failed_calls_name_function_and_return_value() {
    assert_eq!(
        call(Function::Login, RvError::PinIncorrect).to_string(),
        "C_Login failed: CKR_PIN_INCORRECT"
    );
    assert_eq!(
        call(Function::Decrypt, RvError::DeviceRemoved).to_string(),
        "C_Decrypt failed: CKR_DEVICE_REMOVED"
    );
    let converted = Pkcs11Error::from(cryptoki::error::Error::Pkcs11(
        RvError::SessionHandleInvalid,
        Function::EncryptInit,
    ));
    assert_eq!(converted.to_string(), "C_EncryptInit failed: CKR_SESSION_HANDLE_INVALID");
    assert_eq!(converted.rv(), Some(RvError::SessionHandleInvalid));
}

#[test]
fn errors_map_to_root_key_errors() {
    let root = RootKeyError::from;
    for rv in [RvError::DeviceRemoved, RvError::SessionHandleInvalid, RvError::TokenNotPresent] {
        let e = root(call(Function::Encrypt, rv));
        assert!(matches!(e, RootKeyError::Unavailable { provider: "pkcs11", .. }), "{e:?}");
        assert!(e.is_retryable());
    }
    for rv in [RvError::PinIncorrect, RvError::PinLocked, RvError::KeyFunctionNotPermitted] {
        let e = root(call(Function::Login, rv));
        assert!(matches!(e, RootKeyError::Misconfigured { .. }), "{e:?}");
        assert!(!e.is_retryable());
    }
    let e = root(call(Function::Encrypt, RvError::DataLenRange));
    let RootKeyError::Backend { operation, detail, .. } = e else { panic!("{e:?}") };
    assert_eq!((operation, detail.as_str()), ("C_Encrypt", "C_Encrypt failed: CKR_DATA_LEN_RANGE"));
    assert!(matches!(root(Pkcs11Error::CannotUnwrap), RootKeyError::CannotUnwrap));
    let gone = Pkcs11Error::TokenNotFound { label: "t".to_owned(), present: vec![] };
    assert!(root(gone).is_retryable());
    let missing = Pkcs11Error::KeyNotFound { token: "t".to_owned(), key: "k".to_owned() };
    assert!(matches!(root(missing), RootKeyError::Misconfigured { .. }));
    let refused = Pkcs11Error::PinRefused { token: "t".to_owned(), rv: RvError::PinIncorrect };
    let message = refused.to_string();
    assert!(message.contains("refused the user PIN") && message.contains("CKR_PIN_INCORRECT"));
    assert!(message.contains("restart the key service with the right PIN"), "{message}");
    let e = root(refused);
    assert!(matches!(e, RootKeyError::Misconfigured { .. }) && !e.is_retryable(), "{e:?}");
    let deferred = |rv| Pkcs11Error::LoginDeferred {
        token: "t".to_owned(),
        rv,
        failures: 2,
        retry_in: std::time::Duration::from_secs(3),
    };
    let message = deferred(RvError::DeviceError).to_string();
    assert!(message.contains("CKR_DEVICE_ERROR") && message.contains("3s"), "{message}");
    assert!(root(deferred(RvError::DeviceError)).is_retryable());
    let e = root(deferred(RvError::UserPinNotInitialized));
    assert!(matches!(e, RootKeyError::Misconfigured { .. }), "{e:?}");
    let replaced = Pkcs11Error::KeyReplaced { token: "t".to_owned(), key: "k".to_owned() };
    let message = replaced.to_string();
    assert!(message.contains("not the master key this process connected to"), "{message}");
    assert!(matches!(root(replaced), RootKeyError::Misconfigured { .. }));
}

#[test]
fn any_failed_login_is_a_login_failure_whatever_its_code() {
    for rv in [RvError::PinIncorrect, RvError::DeviceError, RvError::GeneralError] {
        assert!(call(Function::Login, rv).is_login_failure(), "{rv:?}");
    }
    assert!(!call(Function::Encrypt, RvError::DeviceError).is_login_failure());
    let refused = Pkcs11Error::PinRefused { token: "t".to_owned(), rv: RvError::PinIncorrect };
    assert!(refused.is_login_failure());
    assert_eq!(refused.rv(), Some(RvError::PinIncorrect));
    let deferred = Pkcs11Error::LoginDeferred {
        token: "t".to_owned(),
        rv: RvError::DeviceError,
        failures: 1,
        retry_in: std::time::Duration::from_secs(3),
    };
    assert!(deferred.is_login_failure());
    let gone = Pkcs11Error::TokenNotFound { label: "t".to_owned(), present: vec![] };
    assert!(!gone.is_login_failure());
}

#[test]
fn only_session_and_device_failures_get_a_fresh_session() {
    for rv in [
        RvError::SessionClosed,
        RvError::SessionHandleInvalid,
        RvError::UserNotLoggedIn,
        RvError::ObjectHandleInvalid,
        RvError::DeviceError,
        RvError::CryptokiNotInitialized,
        RvError::GeneralError,
    ] {
        assert!(call(Function::Encrypt, rv).wants_fresh_session(), "{rv:?}");
    }
    for rv in [RvError::PinIncorrect, RvError::DataLenRange, RvError::MechanismInvalid] {
        assert!(!call(Function::Encrypt, rv).wants_fresh_session(), "{rv:?}");
    }
    assert!(!Pkcs11Error::CannotUnwrap.wants_fresh_session());
    assert!(Pkcs11Error::CannotUnwrap.keeps_session());
}

#[test]
fn config_is_validated() {
    assert!(config().validate().is_ok());
    let invalid = |adjust: fn(&mut Pkcs11Config)| {
        let mut config = config();
        adjust(&mut config);
        config.validate().is_err()
    };
    assert!(invalid(|c| c.module = PathBuf::new()));
    assert!(invalid(|c| c.module = PathBuf::from("libsofthsm2.so")));
    assert!(invalid(|c| c.module = PathBuf::from("./lib/libsofthsm2.so")));
    assert!(invalid(|c| c.token_label = " ".to_owned()));
    assert!(invalid(|c| c.token_label = "x".repeat(33)));
    assert!(invalid(|c| c.key_label = String::new()));
    assert!(invalid(|c| c.pool_size = 0));
    assert!(invalid(|c| c.pool_size = 1025));
    assert!(invalid(|c| c.pin = SecretString::from("")));
}

#[test]
fn debug_never_shows_the_pin() {
    let debug = format!("{:?}", config());
    assert!(debug.contains("[redacted]") && !debug.contains(PIN), "{debug}");
}

#[test]
fn pin_files_are_read_without_their_newline() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pin");
    for (contents, expected) in [("1234\n", "1234"), ("1234\r\n", "1234"), ("12 34", "12 34")] {
        std::fs::File::create(&path).unwrap().write_all(contents.as_bytes()).unwrap();
        let pin = PinSource::File(path.clone()).load().unwrap();
        assert_eq!(pin.expose_secret(), expected);
    }
    for contents in [&b"\n"[..], b"", b"\xff\xfe\n"] {
        std::fs::File::create(&path).unwrap().write_all(contents).unwrap();
        assert!(PinSource::File(path.clone()).load().is_err());
    }
    let missing = dir.path().join("missing");
    let error = PinSource::File(missing.clone()).load().unwrap_err();
    assert!(matches!(error, Pkcs11Error::PinFile { .. }));
    assert!(error.to_string().contains(&missing.display().to_string()));
    std::fs::write(&path, vec![b'7'; 4096]).unwrap();
    assert_eq!(PinSource::File(path.clone()).load().unwrap().expose_secret().len(), 4096);
    std::fs::write(&path, vec![b'7'; 4097]).unwrap();
    let error = PinSource::File(path.clone()).load().unwrap_err();
    assert!(error.to_string().contains("longer than 4096 bytes"), "{error}");
    // A device or a directory is refused before it is opened or read.
    for other in [std::path::Path::new("/dev/zero"), dir.path()] {
        let error = PinSource::File(other.to_owned()).load().unwrap_err();
        assert!(error.to_string().ends_with("not a regular file"), "{error}");
    }
}

#[test]
fn a_missing_pin_variable_is_named() {
    let var = "KEYGATE_UNIT_TEST_SURELY_UNSET_PIN_VARIABLE";
    let error = PinSource::Env(var.to_owned()).load().unwrap_err();
    assert!(matches!(error, Pkcs11Error::PinEnvMissing { .. }));
    assert!(error.to_string().contains(var));
}

#[test]
fn a_missing_module_is_named_with_the_install_hint() {
    let mut config = config();
    config.module = PathBuf::from("/nonexistent/libvendor-pkcs11.so");
    let error = Pkcs11RootKey::connect(config).unwrap_err();
    assert!(matches!(error, Pkcs11Error::ModuleNotFound { .. }), "{error:?}");
    let message = error.to_string();
    assert!(message.contains("/nonexistent/libvendor-pkcs11.so"), "{message}");
    assert!(message.contains("apt-get install softhsm2"), "{message}");
    assert!(matches!(RootKeyError::from(error), RootKeyError::Misconfigured { .. }));
}

#[test]
fn a_file_that_is_not_a_module_is_refused() {
    let file = tempfile::NamedTempFile::new().unwrap();
    let mut config = config();
    config.module = file.path().to_owned();
    let error = Pkcs11RootKey::connect(config).unwrap_err();
    assert!(matches!(error, Pkcs11Error::ModuleLoad { .. }), "{error:?}");
    let dir = tempfile::tempdir().unwrap();
    let mut config = self::config();
    config.module = dir.path().to_owned();
    assert!(matches!(Pkcs11RootKey::connect(config), Err(Pkcs11Error::ModuleLoad { .. })));
}

#[test]
fn a_relative_module_path_is_refused_before_anything_is_loaded() {
    let mut config = config();
    config.module = PathBuf::from("libsofthsm2.so");
    let error = Pkcs11RootKey::connect(config).unwrap_err();
    assert!(matches!(error, Pkcs11Error::InvalidConfig { .. }), "{error:?}");
    let message = error.to_string();
    assert!(message.contains("libsofthsm2.so") && message.contains("not absolute"), "{message}");
}

#[test]
fn a_module_that_group_or_others_may_write_is_refused() {
    use std::os::unix::fs::PermissionsExt;

    let dir = tempfile::tempdir().unwrap();
    let module = dir.path().join("libvendor.so");
    std::fs::write(&module, b"not really a library").unwrap();
    let link = dir.path().join("link.so");
    std::os::unix::fs::symlink(&module, &link).unwrap();
    for mode in [0o666, 0o664, 0o646, 0o620, 0o602, 0o777] {
        std::fs::set_permissions(&module, std::fs::Permissions::from_mode(mode)).unwrap();
        // Through a symbolic link too: the file itself is checked.
        for path in [&module, &link] {
            let mut config = config();
            config.module = path.clone();
            let error = Pkcs11RootKey::connect(config).unwrap_err();
            let message = error.to_string();
            assert!(matches!(error, Pkcs11Error::ModuleLoad { .. }), "{mode:o}: {message}");
            assert!(message.contains(&format!("{mode:04o}")), "{message}");
            assert!(message.contains("chmod go-w"), "{message}");
        }
    }
    // Not writable by others: loading is tried (and fails: not a library).
    std::fs::set_permissions(&module, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut config = config();
    config.module = module;
    let message = Pkcs11RootKey::connect(config).unwrap_err().to_string();
    assert!(!message.contains("chmod"), "{message}");
}

#[test]
fn a_module_in_a_directory_others_may_change_is_refused() {
    use std::os::unix::fs::PermissionsExt;

    let dir = tempfile::tempdir().unwrap();
    let lib = dir.path().join("lib");
    std::fs::create_dir(&lib).unwrap();
    let module = lib.join("libvendor.so");
    std::fs::write(&module, b"not really a library").unwrap();
    std::fs::set_permissions(&module, std::fs::Permissions::from_mode(0o755)).unwrap();
    let connect = || {
        let mut config = config();
        config.module = module.clone();
        Pkcs11RootKey::connect(config).unwrap_err().to_string()
    };
    // Anyone could rename another library over it.
    for mode in [0o777, 0o775, 0o757] {
        std::fs::set_permissions(&lib, std::fs::Permissions::from_mode(mode)).unwrap();
        let message = connect();
        assert!(message.contains(&format!("{} has mode {mode:04o}", lib.display())), "{message}");
        assert!(message.contains("chmod go-w"), "{message}");
    }
    // Sticky, as /tmp is: no one else may replace a file they do not own.
    std::fs::set_permissions(&lib, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let message = connect();
    assert!(!message.contains("chmod") && !message.contains("owned by"), "{message}");
    // Another user's library (only root can give a file away).
    if rustix::process::geteuid().is_root() {
        std::fs::set_permissions(&lib, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::chown(&module, Some(4242), None).unwrap();
        let message = connect();
        assert!(message.contains("is owned by uid 4242"), "{message}");
        std::os::unix::fs::chown(&module, Some(0), None).unwrap();
        std::os::unix::fs::chown(&lib, Some(4242), None).unwrap();
        let message = connect();
        assert!(message.contains(&format!("{} is owned by uid 4242", lib.display())), "{message}");
    }
}

mod login;
mod softhsm2;
mod token;
