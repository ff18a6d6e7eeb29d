//! A throwaway SoftHSM2 token for one test: the token, its configuration
//! file and the child process that sees it come from
//! `keygate_test_support::softhsm2` (see there why a child process); this
//! adds the PKCS#11 side: the provider configuration, the master key and
//! [`TokenAdmin`].

use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::process::Command;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CryptokiError, RvError};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use hsm_adapters::{MasterKeyInfo, Pkcs11Config, Pkcs11RootKey};
use keygate_test_support::softhsm2 as shared;
pub use keygate_test_support::softhsm2::{InProcess, SO_PIN, TOKEN_LABEL, USER_PIN};
use secrecy::SecretString;

/// Label of the master key the fixtures create.
pub const KEY_LABEL: &str = "keygate-master-1";

/// A SoftHSM2 token directory with its own configuration file; derefs to
/// the shared token (`conf`, `tokens_dir`, `module`).
pub struct SoftHsm2(shared::Token);

impl Deref for SoftHsm2 {
    type Target = shared::Token;

    fn deref(&self) -> &shared::Token {
        &self.0
    }
}

impl SoftHsm2 {
    /// In the parent process: creates a token and runs `test` (its full
    /// name, e.g. `pkcs11::round_trip`) in a child process that sees it,
    /// asserts the child passed, and returns `None`. In that child: returns
    /// the token.
    pub fn for_test(test: &str) -> Option<Self> {
        shared::for_test(test).map(Self)
    }

    /// In the parent process: creates a token, runs this executable again
    /// with `args` in a child process that sees it, and returns the
    /// child's output. In that child: returns the token.
    pub fn in_child_process(args: &[&str]) -> InProcess<Self> {
        shared::in_child_process(args).map_child(Self)
    }

    /// A fresh token in this process without loading the module here (for
    /// tests that hand the token to a keygate process via `SOFTHSM2_CONF`).
    pub fn new_token() -> Self {
        Self(shared::Token::create())
    }

    /// A provider configuration for the test token and key.
    pub fn config(&self) -> Pkcs11Config {
        Pkcs11Config::new(self.module(), TOKEN_LABEL, KEY_LABEL, SecretString::from(USER_PIN))
    }

    /// Creates the master key [`KEY_LABEL`] (as `keygate admin` would).
    pub fn create_key(&self) -> MasterKeyInfo {
        Pkcs11RootKey::create_master_key(&self.config()).unwrap()
    }

    /// A key service's `[root]` section for this token's master key, with
    /// the PIN read from `pin_file`.
    pub fn root_section(&self, pin_file: &str) -> String {
        format!(
            "[root]\nprovider = \"pkcs11\"\nmodule = \"{}\"\ntoken_label = \"{TOKEN_LABEL}\"\n\
             key_label = \"{KEY_LABEL}\"\npin_file = \"{pin_file}\"\n",
            self.module().display()
        )
    }

    /// Creates the master key the way an operator does: `keygate admin
    /// master create-pkcs11-key --config <config>` (a key-service config
    /// whose `[root]` is [`SoftHsm2::root_section`]), in a child process
    /// that sees this token. Asserts success; returns what it printed.
    pub fn create_key_with_cli(&self, config: &Path) -> String {
        let created = Command::new(crate::keyservice::keygate_binary())
            .args(["admin", "master", "create-pkcs11-key", "--config"])
            .arg(config)
            .env("SOFTHSM2_CONF", self.conf())
            .output()
            .unwrap();
        assert!(created.status.success(), "{}", String::from_utf8_lossy(&created.stderr));
        String::from_utf8_lossy(&created.stdout).into_owned()
    }

    /// Direct access to the token, beside the provider (same process, same
    /// module instance).
    pub fn admin(&self) -> TokenAdmin {
        let context = Pkcs11::new(self.module()).unwrap();
        match context.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
            Ok(()) | Err(CryptokiError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
            Err(e) => panic!("C_Initialize: {e}"),
        }
        TokenAdmin { context, tokens: self.tokens_dir() }
    }
}

/// Test-side operations on the token: the faults the provider must
/// survive, and inspection of what it created.
pub struct TokenAdmin {
    context: Pkcs11,
    tokens: PathBuf,
}

impl TokenAdmin {
    fn slot(&self) -> Slot {
        self.context
            .get_slots_with_token()
            .unwrap()
            .into_iter()
            .find(|slot| {
                self.context
                    .get_token_info(*slot)
                    .is_ok_and(|i| i.label().trim_end() == TOKEN_LABEL)
            })
            .expect("the test token")
    }

    /// A read-write session logged in as the user with `pin`.
    fn user_session(&self, pin: &str) -> Session {
        let session = self.context.open_rw_session(self.slot()).unwrap();
        match session.login(UserType::User, Some(&SecretString::from(pin))) {
            Ok(()) | Err(CryptokiError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
            Err(e) => panic!("C_Login: {e}"),
        }
        session
    }

    /// `C_Logout`: logs out every session of this process, the provider's
    /// included (login state is per process and token).
    pub fn logout_everyone(&self) {
        let session = self.context.open_ro_session(self.slot()).unwrap();
        session.logout().unwrap();
    }

    /// Changes the user PIN from `old` to `new` (`C_SetPIN`), then logs
    /// every session out so the provider has to log in again.
    pub fn change_user_pin(&self, old: &str, new: &str) {
        let session = self.user_session(old);
        session.set_pin(&SecretString::from(old), &SecretString::from(new)).unwrap();
        session.logout().unwrap();
    }

    /// `C_Finalize`: the module forgets every session and login of this
    /// process, as after a reset of the HSM's client library. Leaves the
    /// module uninitialized; the provider must initialize it again.
    pub fn finalize_module(self) {
        self.context.finalize().unwrap();
    }

    /// Moves the token's storage away (the token disappears at the next
    /// module initialization); returns a guard that moves it back.
    pub fn hide_token_storage(&self) -> HiddenStorage {
        let hidden = self.tokens.with_extension("hidden");
        std::fs::rename(&self.tokens, &hidden).unwrap();
        std::fs::create_dir(&self.tokens).unwrap();
        HiddenStorage { tokens: self.tokens.clone(), hidden }
    }

    /// Creates an AES-256 key that is extractable and not sensitive (unfit
    /// as a master key) labelled `label`.
    pub fn create_weak_key(&self, label: &str) {
        let session = self.user_session(USER_PIN);
        session
            .generate_key(
                &cryptoki::mechanism::Mechanism::AesKeyGen,
                &[
                    Attribute::Class(ObjectClass::SECRET_KEY),
                    Attribute::KeyType(KeyType::AES),
                    Attribute::ValueLen(32.into()),
                    Attribute::Token(true),
                    Attribute::Sensitive(false),
                    Attribute::Extractable(true),
                    Attribute::Encrypt(true),
                    Attribute::Decrypt(true),
                    Attribute::Label(label.as_bytes().to_vec()),
                ],
            )
            .unwrap();
    }

    /// The protection attributes of the secret key labelled `label`:
    /// (sensitive, extractable, always sensitive, never extractable,
    /// private, token), and whether reading its value is refused.
    pub fn key_protection(&self, label: &str) -> ([bool; 6], bool) {
        let session = self.user_session(USER_PIN);
        let handles = session
            .find_objects(&[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::Label(label.as_bytes().to_vec()),
            ])
            .unwrap();
        let [key] = handles.as_slice() else { panic!("expected one key labelled {label}") };
        let types = [
            AttributeType::Sensitive,
            AttributeType::Extractable,
            AttributeType::AlwaysSensitive,
            AttributeType::NeverExtractable,
            AttributeType::Private,
            AttributeType::Token,
        ];
        let mut flags = [false; 6];
        for attribute in session.get_attributes(*key, &types).unwrap() {
            let (index, value) = match attribute {
                Attribute::Sensitive(v) => (0, v),
                Attribute::Extractable(v) => (1, v),
                Attribute::AlwaysSensitive(v) => (2, v),
                Attribute::NeverExtractable(v) => (3, v),
                Attribute::Private(v) => (4, v),
                Attribute::Token(v) => (5, v),
                _ => continue,
            };
            if let Some(flag) = flags.get_mut(index) {
                *flag = value;
            }
        }
        let value_refused = match session.get_attributes(*key, &[AttributeType::Value]) {
            Err(_) => true,
            Ok(values) => !values.iter().any(|a| matches!(a, Attribute::Value(v) if !v.is_empty())),
        };
        (flags, value_refused)
    }
}

/// The token storage, moved away; [`HiddenStorage::restore`] puts it back.
pub struct HiddenStorage {
    tokens: PathBuf,
    hidden: PathBuf,
}

impl HiddenStorage {
    /// Moves the storage back.
    pub fn restore(self) {
        std::fs::remove_dir_all(&self.tokens).unwrap();
        std::fs::rename(&self.hidden, &self.tokens).unwrap();
    }
}
