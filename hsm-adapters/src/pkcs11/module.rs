//! Loading a PKCS#11 module and finding tokens in it.
//!
//! `C_Initialize` is process-wide state of a module: a second load of the
//! same library shares it, and `C_Finalize` would pull it from under every
//! other user. So each module file is loaded and initialized once per
//! process and shared by every provider that names it; it stays loaded
//! until the process exits (never finalized by this crate). If something
//! else finalizes it, [`Module::reinitialize`] brings it back.
//!
//! Session and object handles are only meaningful within one
//! initialization: after a re-initialization the module hands out the same
//! numbers again for new sessions. So every handle is tagged with the
//! module's *generation*; calls hold the generation lock for reading and a
//! re-initialization takes it for writing, which waits for calls in flight
//! and makes every older handle stale. (A module finalized *and*
//! re-initialized behind this crate's back cannot be detected.)

use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CryptokiError, RvError};
use cryptoki::mechanism::MechanismType;
use cryptoki::slot::Slot;

use super::error::Pkcs11Error;
use super::login::RefusedPins;

/// Modules loaded by this process, by canonical path.
static LOADED: Mutex<Vec<(PathBuf, Arc<Module>)>> = Mutex::new(Vec::new());

/// A loaded, initialized PKCS#11 module.
pub(super) struct Module {
    context: Pkcs11,
    /// Bumped by every re-initialization this crate performs.
    generation: RwLock<u64>,
    /// The PINs its tokens refused (see the `login` module); held across
    /// every `C_Login` through this module, which serializes them.
    logins: Mutex<RefusedPins>,
}

impl Module {
    /// The cryptoki context.
    pub(super) fn context(&self) -> &Pkcs11 {
        &self.context
    }

    /// Holds the current generation for the duration of a call.
    pub(super) fn generation(&self) -> RwLockReadGuard<'_, u64> {
        self.generation.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// The PINs this module's tokens refused, locked for a login.
    pub(super) fn logins(&self) -> MutexGuard<'_, RefusedPins> {
        self.logins.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Re-initializes the module after it was finalized, unless that was
    /// already done since `observed` (by another caller). Waits for calls
    /// in flight; afterwards every handle of an older generation is stale.
    pub(super) fn reinitialize(&self, observed: u64) -> Result<(), Pkcs11Error> {
        let mut generation = self.generation.write().unwrap_or_else(PoisonError::into_inner);
        if *generation == observed {
            initialize(&self.context)?;
            *generation = generation.wrapping_add(1);
            tracing::warn!(generation = *generation, "re-initialized the PKCS#11 module");
        }
        Ok(())
    }
}

/// Loads and initializes the module at `path` (absolute, see
/// `Pkcs11Config::validate`), or returns the module this process already
/// has for that file. A file someone else could change is refused (see
/// [`check_module_file`]).
pub(super) fn load(path: &Path) -> Result<Arc<Module>, Pkcs11Error> {
    let canonical = fs::canonicalize(path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => Pkcs11Error::ModuleNotFound { path: path.to_owned() },
        _ => Pkcs11Error::ModuleLoad { path: path.to_owned(), detail: e.to_string() },
    })?;
    check_module_file(path, &canonical)?;
    let mut loaded = LOADED.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some((_, module)) = loaded.iter().find(|(loaded_path, _)| *loaded_path == canonical) {
        return Ok(Arc::clone(module));
    }
    let context = Pkcs11::new(&canonical)
        .map_err(|e| Pkcs11Error::ModuleLoad { path: path.to_owned(), detail: e.to_string() })?;
    initialize(&context)?;
    tracing::debug!(module = %canonical.display(), "loaded and initialized the PKCS#11 module");
    let module = Arc::new(Module {
        context,
        generation: RwLock::new(0),
        logins: Mutex::new(RefusedPins::default()),
    });
    loaded.push((canonical, Arc::clone(&module)));
    Ok(module)
}

/// Refuses the module file at `canonical` (`path` resolved) if anyone but
/// this process's user or root could change it: whoever can change the
/// library runs code in this process, with the PIN. The file must be owned
/// by this user or root and not writable by group or others; so must every
/// directory above it (else the file could be replaced between this check
/// and the load), except that in a sticky directory (`/tmp`) no one may
/// replace a file they do not own.
fn check_module_file(path: &Path, canonical: &Path) -> Result<(), Pkcs11Error> {
    let refuse = |detail: String| Pkcs11Error::ModuleLoad { path: path.to_owned(), detail };
    let euid = rustix::process::geteuid().as_raw();
    for (depth, at) in canonical.ancestors().enumerate() {
        let metadata = fs::metadata(at).map_err(|e| refuse(format!("{}: {e}", at.display())))?;
        let is_module = depth == 0;
        if is_module && !metadata.is_file() {
            return Err(refuse("not a regular file".to_owned()));
        }
        let owner = metadata.uid();
        if owner != euid && owner != 0 {
            return Err(refuse(format!(
                "{} is owned by uid {owner}, neither this process's user (uid {euid}) nor root, \
                 who could change the library",
                at.display()
            )));
        }
        let mode = metadata.permissions().mode() & 0o7777;
        let sticky = !is_module && mode & 0o1000 != 0;
        if mode & 0o022 != 0 && !sticky {
            return Err(refuse(format!(
                "{} has mode {mode:04o}, which lets group or others change {}; \
                 run `chmod go-w` on it",
                at.display(),
                if is_module { "it" } else { "the files in it" }
            )));
        }
    }
    Ok(())
}

/// `C_Initialize` with OS locking; "already initialized" (by another part
/// of this process) is success.
fn initialize(context: &Pkcs11) -> Result<(), Pkcs11Error> {
    match context.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CryptokiError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// The slot holding the token labelled `label` (exactly one).
///
/// Slots whose token cannot be described are skipped: a token that is
/// going away must not hide the one we want.
pub(super) fn find_token(context: &Pkcs11, label: &str) -> Result<Slot, Pkcs11Error> {
    let mut present = Vec::new();
    let mut matching = Vec::new();
    for slot in context.get_slots_with_token()? {
        match context.get_token_info(slot) {
            Ok(info) => {
                let token_label = info.label().trim_end();
                if token_label == label {
                    matching.push(slot);
                }
                present.push(token_label.to_owned());
            }
            Err(e) => tracing::debug!(slot = slot.id(), error = %e, "skipping a PKCS#11 slot"),
        }
    }
    match matching.as_slice() {
        [slot] => Ok(*slot),
        [] => Err(Pkcs11Error::TokenNotFound { label: label.to_owned(), present }),
        many => Err(Pkcs11Error::DuplicateToken { label: label.to_owned(), count: many.len() }),
    }
}

/// Checks that the token in `slot` offers `mechanism` for `usage`
/// (`encrypt`, `decrypt`, `generate` flags as required).
pub(super) fn require_mechanism(
    context: &Pkcs11,
    slot: Slot,
    token: &str,
    mechanism: MechanismType,
    usage: Usage,
) -> Result<(), Pkcs11Error> {
    let unsupported = || Pkcs11Error::MechanismUnsupported {
        token: token.to_owned(),
        mechanism: usage.mechanism_name(),
        usage: usage.description(),
    };
    let info = match context.get_mechanism_info(slot, mechanism) {
        Ok(info) => info,
        Err(CryptokiError::Pkcs11(RvError::MechanismInvalid, _)) => return Err(unsupported()),
        Err(e) => return Err(e.into()),
    };
    let offered = match usage {
        Usage::EncryptDecrypt => info.encrypt() && info.decrypt(),
        Usage::GenerateKey => info.generate(),
    };
    if offered { Ok(()) } else { Err(unsupported()) }
}

/// What a mechanism is needed for.
#[derive(Debug, Clone, Copy)]
pub(super) enum Usage {
    /// `CKM_AES_GCM` with `C_Encrypt` and `C_Decrypt`.
    EncryptDecrypt,
    /// `CKM_AES_KEY_GEN` with `C_GenerateKey`.
    GenerateKey,
}

impl Usage {
    fn mechanism_name(self) -> &'static str {
        match self {
            Self::EncryptDecrypt => "CKM_AES_GCM",
            Self::GenerateKey => "CKM_AES_KEY_GEN",
        }
    }

    fn description(self) -> &'static str {
        match self {
            Self::EncryptDecrypt => "encryption and decryption",
            Self::GenerateKey => "key generation",
        }
    }
}
