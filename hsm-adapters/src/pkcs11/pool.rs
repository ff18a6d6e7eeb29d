//! The session pool: logged-in sessions with the master key's handle,
//! reused across calls, and the retry-once-on-a-fresh-session rule.
//!
//! A call takes an idle session (or opens one: find the token, open a
//! read-only session, log in, find the key, check it is fit to be the
//! master key and, once the provider has connected, that it is the same
//! key: it must unwrap the probe blob wrapped under the master key at
//! connection) and runs one operation on it.
//! If the operation fails because the session, the login or the device went
//! away ([`Pkcs11Error::wants_fresh_session`]), every idle session is
//! dropped too (they share the fate), the module is re-initialized if it
//! was finalized, and the operation runs once more on a fresh session.
//! A second failure is returned as it is.
//!
//! Logins are serialized and go through a [`LoginGate`]: once the token
//! refuses the PIN it is never tried again in this process (every call
//! fails at once), and after other login failures the next login waits
//! `pin_retry_interval`, doubling up to 5 minutes (see the `login` module).

use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use cryptoki::error::{Error as CryptokiError, RvError};
use cryptoki::object::ObjectHandle;
use cryptoki::session::{Session, UserType};
use secrecy::SecretString;

use super::blob::{self, Probe};
use super::error::{Pkcs11Error, ckr_name};
use super::key;
use super::login::{LoginGate, is_pin_refusal};
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
    /// Whether a login may be tried (see the `login` module); held across
    /// `C_Login`.
    login: Mutex<LoginGate>,
    /// Set once the token refused the PIN (also in `login`), read without
    /// waiting for a login in flight.
    pin_refused: OnceLock<RvError>,
    /// A blob wrapped under the master key when the provider connected:
    /// every session opened later must unwrap it before it is used.
    probe: OnceLock<Probe>,
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
            login: Mutex::new(LoginGate::new(pin_retry_interval)),
            pin_refused: OnceLock::new(),
            probe: OnceLock::new(),
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

    /// Pins the master key: from now on a session is used only if its key
    /// unwraps `probe` (a blob wrapped under the key the provider
    /// connected to). Once; a later probe is ignored.
    pub(super) fn pin_key(&self, probe: Probe) {
        if self.probe.set(probe).is_err() {
            tracing::debug!("the PKCS#11 master key was pinned already");
        }
    }

    /// The probe blob of [`pin_key`](Self::pin_key), once pinned.
    pub(super) fn probe(&self) -> Option<&Probe> {
        self.probe.get()
    }

    /// Runs `op` on a pooled session, retrying once on a fresh session as
    /// described in the module docs. Once the token has refused the PIN,
    /// fails at once, even on a session that is still logged in.
    pub(super) fn run<T>(
        &self,
        mut op: impl FnMut(&Live) -> Result<T, Pkcs11Error>,
    ) -> Result<T, Pkcs11Error> {
        if let Some(&rv) = self.pin_refused.get() {
            return Err(Pkcs11Error::PinRefused { token: self.token.clone(), rv });
        }
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

    /// Opens a logged-in session, finds the key in it, checks the key is
    /// fit to be the master key and, once the key is pinned, that it is the
    /// master key: the label is looked up again in every new session, so a
    /// key put there since the last one (the old key deleted, another
    /// created with its label; the token restored from another backup)
    /// must unwrap the probe blob, or is refused
    /// ([`Pkcs11Error::KeyReplaced`]) and its session closed. Call with the
    /// generation lock held.
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
        let live = match key {
            Ok(key) => Live { session, key, generation },
            Err(e) => {
                close_session(session);
                return Err(e);
            }
        };
        let proof = self.probe().map_or(Ok(()), |probe| {
            blob::prove_same_key(&live, probe, &self.token, &self.key_label)
        });
        match proof {
            Ok(()) => Ok(live),
            Err(e) => {
                live.close();
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

    /// `C_Login` as the user, if the [`LoginGate`] lets it through (never
    /// after the token refused this PIN, here or to another provider of
    /// this process; after other failures, once the wait is over). "Already
    /// logged in" (by another session of this process) is success.
    fn login(&self, session: &Session) -> Result<(), Pkcs11Error> {
        let mut gate = self.login_gate();
        let mut refused_pins = self.module.logins();
        if let Some(rv) = refused_pins.find(&self.token, &self.pin) {
            gate.refuse(rv);
        }
        if let Some(rv) = gate.refused() {
            let _ = self.pin_refused.set(rv);
        }
        gate.check(&self.token, Instant::now())?;
        match session.login(UserType::User, Some(&self.pin)) {
            Ok(()) | Err(CryptokiError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {
                gate.succeeded();
                Ok(())
            }
            Err(CryptokiError::Pkcs11(rv, function)) if is_pin_refusal(rv) => {
                gate.refuse(rv);
                let _ = self.pin_refused.set(rv);
                refused_pins.add(&self.token, &self.pin, rv);
                tracing::error!(
                    token = %self.token,
                    rv = %ckr_name(rv),
                    "the token rejected the user PIN; not trying it again in this process, so \
                     that failed logins cannot lock the token's user out: restart the key \
                     service with the right PIN"
                );
                Err(Pkcs11Error::Call { function, rv })
            }
            Err(CryptokiError::Pkcs11(rv, function)) => {
                let wait = gate.failed(rv, Instant::now());
                tracing::warn!(
                    token = %self.token,
                    rv = %ckr_name(rv),
                    retry_after = ?wait,
                    "C_Login failed; not trying again before the wait is over"
                );
                Err(Pkcs11Error::Call { function, rv })
            }
            Err(e) => Err(e.into()),
        }
    }

    fn login_gate(&self) -> MutexGuard<'_, LoginGate> {
        self.login.lock().unwrap_or_else(PoisonError::into_inner)
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
