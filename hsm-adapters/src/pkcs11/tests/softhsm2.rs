//! A throwaway SoftHSM2 token for one unit test: the token and the child
//! process that sees it come from `keygate_test_support::softhsm2` (see
//! there why); this adds the PKCS#11 side.

use cryptoki::error::{Error as CryptokiError, RvError};
use cryptoki::session::{Session, UserType};
use keygate_test_support::softhsm2::{self as shared, TOKEN_LABEL, USER_PIN};
use secrecy::SecretString;

use super::super::{Pkcs11Config, module};

/// The test token, in the child process.
pub(super) struct Token(shared::Token);

impl Token {
    /// In the parent process: creates a token, runs `test` (its path as
    /// `module_path!()` gives it, plus `::name`) in a child process that
    /// sees it, asserts the child passed and returns `None`. In that
    /// child: returns the token.
    pub(super) fn for_test(test: &str) -> Option<Self> {
        shared::for_test(test.strip_prefix("hsm_adapters::").unwrap_or(test)).map(Self)
    }

    /// A provider configuration for the test token and `key_label`.
    pub(super) fn config(&self, key_label: &str) -> Pkcs11Config {
        Pkcs11Config::new(self.0.module(), TOKEN_LABEL, key_label, SecretString::from(USER_PIN))
    }

    /// A read-write session logged in as the user, on the provider's own
    /// instance of the module (login state is shared with the provider).
    pub(super) fn user_session(&self) -> Session {
        self.session_as(USER_PIN)
    }

    /// A read-write session logged in as the user with `pin`.
    pub(super) fn session_as(&self, pin: &str) -> Session {
        let session = self.public_session();
        match session.login(UserType::User, Some(&SecretString::from(pin))) {
            Ok(()) | Err(CryptokiError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
            Err(e) => panic!("C_Login: {e}"),
        }
        session
    }

    /// A read-write session, not logged in (unless another session of this
    /// process is: login state is shared): what anyone who can reach the
    /// token may open, without the PIN.
    pub(super) fn public_session(&self) -> Session {
        let module = module::load(self.0.module()).unwrap();
        let slot = module::find_token(module.context(), TOKEN_LABEL).unwrap();
        module.context().open_rw_session(slot).unwrap()
    }
}
