//! The session pool: logged-in sessions with the master key's handle,
//! reused across calls, and the retry-once-on-a-fresh-session rule.
//!
//! A call takes an idle session (or opens one: find the token, open a
//! read-only session, log in, find the key and check it is fit to be the
//! master key) and runs one operation on it.
//! If the operation fails because the session, the login or the device went
//! away ([`Pkcs11Error::wants_fresh_session`]), every idle session is
//! dropped too (they share the fate), the module is re-initialized if it
//! was finalized, and the operation runs once more on a fresh session.
//! A second failure is returned as it is.
//!
//! Logins are serialized, and after the token rejects the PIN no login is
//! attempted for `pin_retry_interval`, so a wrong PIN costs one failed
//! login per interval, not one per call.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use cryptoki::error::{Error as CryptokiError, RvError};
use cryptoki::object::ObjectHandle;
use cryptoki::session::{Session, UserType};
use secrecy::SecretString;

use super::error::{Pkcs11Error, ckr_name, is_pin_rejection};
use super::key;
use super::module::{self, Module};

/// A logged-in session and the master key's handle in it.
pub(super) struct Live {
    session: Session,
    key: ObjectHandle,
    /// The module generation the handles belong to.
    generation: u64,
}

impl Live {
    /// The session.
    pub(super) fn session(&self) -> &Session {
        &self.session
    }

    /// The master key's handle.
    pub(super) fn key(&self) -> ObjectHandle {
        self.key
    }

    /// Closes the session. Only for sessions of the current generation,
    /// with the generation lock held (an older handle may now name
    /// someone else's session).
    fn close(self) {
        close_session(self.session);
    }
}

/// The pool of one provider.
pub(super) struct Pool {
    module: Arc<Module>,
    token: String,
    key_label: String,
    pin: SecretString,
    /// Serializes logins; holds the time and return value of the last
    /// rejected PIN.
    pin_rejected: Mutex<Option<(Instant, RvError)>>,
    pin_retry_interval: Duration,
    idle: Mutex<Vec<Live>>,
    max_idle: usize,
}

impl Pool {
    /// An empty pool; sessions are opened on demand.
    pub(super) fn new(
        module: Arc<Module>,
        token: String,
        key_label: String,
        pin: SecretString,
        pin_retry_interval: Duration,
        max_idle: usize,
    ) -> Self {
        Self {
            module,
            token,
            key_label,
            pin,
            pin_rejected: Mutex::new(None),
            pin_retry_interval,
            idle: Mutex::new(Vec::with_capacity(max_idle)),
            max_idle,
        }
    }

    /// The token label.
    pub(super) fn token(&self) -> &str {
        &self.token
    }

    /// The key label.
    pub(super) fn key_label(&self) -> &str {
        &self.key_label
    }

    /// Runs `op` on a pooled session, retrying once on a fresh session as
    /// described in the module docs.
    pub(super) fn run<T>(
        &self,
        mut op: impl FnMut(&Live) -> Result<T, Pkcs11Error>,
    ) -> Result<T, Pkcs11Error> {
        let idle = self.take_idle();
        let (error, generation) = match self.attempt(idle, &mut op) {
            Ok(value) => return Ok(value),
            Err((error, generation)) if error.wants_fresh_session() => (error, generation),
            Err((error, _)) => return Err(error),
        };
        tracing::warn!(
            token = %self.token,
            error = %error,
            "PKCS#11 call failed; retrying once on a fresh session"
        );
        self.discard_idle();
        if error.rv() == Some(RvError::CryptokiNotInitialized) {
            self.module.reinitialize(generation)?;
        }
        self.attempt(None, &mut op).map_err(|(error, _)| error)
    }

    /// One attempt: `live` if it is current, else a fresh session.
    fn attempt<T>(
        &self,
        live: Option<Live>,
        op: &mut impl FnMut(&Live) -> Result<T, Pkcs11Error>,
    ) -> Result<T, (Pkcs11Error, u64)> {
        let guard = self.module.generation();
        let generation = *guard;
        // A stale session is dropped without closing it (see `Live::close`).
        let live = match live.filter(|live| live.generation == generation) {
            Some(live) => live,
            None => self.open(generation).map_err(|e| (e, generation))?,
        };
        let result = op(&live);
        match &result {
            Ok(_) => self.put_back(live),
            Err(e) if e.keeps_session() => self.put_back(live),
            Err(_) => live.close(),
        }
        drop(guard);
        result.map_err(|e| (e, generation))
    }

    /// Opens a logged-in session, finds the key in it and checks the key
    /// is fit to be the master key: the label is looked up again in every
    /// new session, so a key put there since the last one (the old key
    /// deleted, another created with its label) is checked too. Call with
    /// the generation lock held.
    fn open(&self, generation: u64) -> Result<Live, Pkcs11Error> {
        let context = self.module.context();
        let slot = module::find_token(context, &self.token)?;
        // Closed explicitly (`close_session`), never on drop: see the module docs.
        let session = context.open_ro_session_no_drop(slot)?;
        let key = self.login(&session).and_then(|()| {
            let key = key::find(&session, &self.token, &self.key_label)?;
            key::check_suitable(&session, key, &self.token, &self.key_label)?;
            Ok(key)
        });
        match key {
            Ok(key) => Ok(Live { session, key, generation }),
            Err(e) => {
                close_session(session);
                Err(e)
            }
        }
    }

    /// Runs `op` on a fresh read-write session logged in as the user (for
    /// creating the master key), then closes it.
    pub(super) fn with_read_write<T>(
        &self,
        op: impl FnOnce(&Session) -> Result<T, Pkcs11Error>,
    ) -> Result<T, Pkcs11Error> {
        let _guard = self.module.generation();
        let context = self.module.context();
        let slot = module::find_token(context, &self.token)?;
        let session = context.open_rw_session_no_drop(slot)?;
        let result = self.login(&session).and_then(|()| op(&session));
        close_session(session);
        result
    }

    /// `C_Login` as the user, unless the PIN was rejected less than
    /// `pin_retry_interval` ago. "Already logged in" (by another session of
    /// this process) is success.
    fn login(&self, session: &Session) -> Result<(), Pkcs11Error> {
        let mut rejected = self.pin_rejected.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((at, rv)) = *rejected {
            let elapsed = at.elapsed();
            if elapsed < self.pin_retry_interval {
                return Err(Pkcs11Error::PinRejected {
                    token: self.token.clone(),
                    rv,
                    retry_in: self.pin_retry_interval.saturating_sub(elapsed),
                });
            }
        }
        match session.login(UserType::User, Some(&self.pin)) {
            Ok(()) | Err(CryptokiError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {
                *rejected = None;
                Ok(())
            }
            Err(CryptokiError::Pkcs11(rv, function)) if is_pin_rejection(rv) => {
                *rejected = Some((Instant::now(), rv));
                tracing::warn!(
                    token = %self.token,
                    rv = %ckr_name(rv),
                    retry_after = ?self.pin_retry_interval,
                    "the token rejected the user PIN; not trying it again before the retry interval"
                );
                Err(Pkcs11Error::Call { function, rv })
            }
            Err(e) => Err(e.into()),
        }
    }

    fn take_idle(&self) -> Option<Live> {
        self.idle.lock().unwrap_or_else(PoisonError::into_inner).pop()
    }

    fn put_back(&self, live: Live) {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < self.max_idle {
            idle.push(live);
        } else {
            drop(idle);
            live.close();
        }
    }

    /// Drops every idle session: closes those of the current generation,
    /// forgets older ones.
    fn discard_idle(&self) {
        let guard = self.module.generation();
        let idle = std::mem::take(&mut *self.idle.lock().unwrap_or_else(PoisonError::into_inner));
        for live in idle {
            if live.generation == *guard {
                live.close();
            }
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.discard_idle();
    }
}

/// `C_CloseSession`; a failure (the session is gone already) is only
/// logged. Only for sessions of the current generation, with the
/// generation lock held.
fn close_session(session: Session) {
    if let Err(e) = session.close() {
        tracing::debug!(error = %e, "closing a PKCS#11 session failed");
    }
}
