//! Process hygiene at start (DESIGN §11): no core dumps, not dumpable, key
//! pages locked in memory where the OS allows.
//!
//! - `RLIMIT_CORE` is set to 0 (soft and hard) and `PR_SET_DUMPABLE` to 0:
//!   a crash writes no core file, and other processes of the same user
//!   cannot ptrace this one or read its `/proc/<pid>/mem`.
//! - Memory is locked with `mlockall(MCL_CURRENT | MCL_FUTURE |
//!   MCL_ONFAULT)` only when that cannot make later allocations fail: with
//!   `CAP_IPC_LOCK` or an unlimited `RLIMIT_MEMLOCK`. Otherwise (and when
//!   the call fails) it is logged, never fatal. `MCL_ONFAULT` locks pages
//!   as they are touched instead of populating every mapping up front.
//!
//! - Long-running processes (key service, sidecar, `keygate up`) make the
//!   allocator map its large pages from the OS, so that memory freed after
//!   a burst goes back even though it is locked ([`allocate_from_the_os`]).
//!
//! Everything goes through rustix's and std's safe wrappers; there is no
//! `unsafe` here.

use rustix::mm::{MlockAllFlags, mlockall};
use rustix::process::{
    DumpableBehavior, Resource, Rlimit, dumpable_behavior, getrlimit, set_dumpable_behavior,
    setrlimit,
};
use rustix::thread::{CapabilitySet, capabilities};
use serde::Serialize;

/// What [`harden`] achieved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Hygiene {
    /// `RLIMIT_CORE` is 0 (soft and hard).
    pub core_limit_zero: bool,
    /// `PR_GET_DUMPABLE` answers 0.
    pub not_dumpable: bool,
    /// `mlockall` succeeded.
    pub memory_locked: bool,
    /// Why something could not be done (for logs and the compliance report).
    pub notes: Vec<String>,
}

impl Hygiene {
    /// Core dumps are off: no core file and not dumpable.
    pub fn core_dumps_disabled(&self) -> bool {
        self.core_limit_zero && self.not_dumpable
    }
}

/// Disables core dumps and locks memory where allowed; logs what it could
/// not do. Call once, early, before any key is loaded.
pub fn harden() -> Hygiene {
    let mut notes = Vec::new();
    let (core_limit_zero, not_dumpable) = disable_core_dumps(&mut notes);
    let memory_locked = lock_memory(&mut notes);
    let hygiene = Hygiene { core_limit_zero, not_dumpable, memory_locked, notes };
    if hygiene.core_dumps_disabled() {
        tracing::info!(memory_locked, "core dumps disabled");
    } else {
        tracing::warn!(notes = ?hygiene.notes, "core dumps could not be disabled");
    }
    if !memory_locked {
        tracing::warn!(notes = ?hygiene.notes, "memory is not locked: key pages may be swapped");
    }
    hygiene
}

/// `RLIMIT_CORE` 0 and `PR_SET_DUMPABLE` 0; returns what holds afterwards.
fn disable_core_dumps(notes: &mut Vec<String>) -> (bool, bool) {
    if let Err(e) = setrlimit(Resource::Core, Rlimit { current: Some(0), maximum: Some(0) }) {
        notes.push(format!("cannot set RLIMIT_CORE to 0: {e}"));
    }
    let core = getrlimit(Resource::Core);
    let core_limit_zero = core.current == Some(0) && core.maximum == Some(0);
    if let Err(e) = set_dumpable_behavior(DumpableBehavior::NotDumpable) {
        notes.push(format!("cannot clear PR_SET_DUMPABLE: {e}"));
    }
    let not_dumpable = matches!(dumpable_behavior(), Ok(DumpableBehavior::NotDumpable));
    (core_limit_zero, not_dumpable)
}

fn lock_memory(notes: &mut Vec<String>) -> bool {
    let can_lock = capabilities(None).is_ok_and(|c| c.effective.contains(CapabilitySet::IPC_LOCK));
    let limit = getrlimit(Resource::Memlock);
    if !can_lock && limit.current.is_some() {
        notes.push(format!(
            "memory not locked: RLIMIT_MEMLOCK is {} bytes and CAP_IPC_LOCK is absent \
             (locking future allocations would make them fail); raise it, e.g. \
             LimitMEMLOCK=infinity or `ulimit -l unlimited`",
            limit.current.unwrap_or_default()
        ));
        return false;
    }
    match mlockall(MlockAllFlags::CURRENT | MlockAllFlags::FUTURE | MlockAllFlags::ONFAULT) {
        Ok(()) => true,
        Err(e) => {
            notes.push(format!("mlockall failed: {e}"));
            false
        }
    }
}

/// The `keygate` binary's allocator (mimalloc) reads this option from the
/// environment when the process starts: the largest page, in KiB, it
/// carves from its arenas. Anything larger — the pages of request and
/// response bodies, big vectors — is mapped from the OS and unmapped when
/// free.
pub const ALLOCATOR_ENV: &str = "MIMALLOC_ARENA_MAX_OBJECT_SIZE";
/// [`ALLOCATOR_ENV`]'s value: small-object pages (64 KiB) stay in arenas,
/// where reuse is cheapest.
pub const ALLOCATOR_ARENA_MAX_KIB: &str = "128";

/// Restarts this process (same binary, arguments and process id) with
/// [`ALLOCATOR_ENV`] set, unless it is set already (by an earlier restart
/// or by the operator, whose value is kept). Returns only if it did not
/// restart.
///
/// Why: with memory locked (`mlockall`), the kernel refuses the `madvise`
/// by which mimalloc gives freed arena memory back, so a process stayed at
/// the high-water mark of its whole life — a key service that had served
/// a burst of 100-record encrypts sat at 80 MiB with a live heap of about
/// 7 MB. Memory mapped from the OS is unmapped when free, which the kernel
/// allows locked or not. In benchmark runs the key service peaked at
/// 43–47 MiB instead of 64–86 and a sidecar with 100,000 cached DEKs sat
/// at 35–37 MiB instead of 55–66, at the same throughput within the runs'
/// noise
/// (docs/performance.md). The option can only be read at startup, before
/// `main`, hence the restart; it goes through `/proc/self/exe`, so it runs
/// the very file that was started.
pub fn allocate_from_the_os() {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::process::CommandExt;

        if std::env::var_os(ALLOCATOR_ENV).is_some() {
            return;
        }
        let mut args = std::env::args_os();
        let mut restart = std::process::Command::new("/proc/self/exe");
        if let Some(name) = args.next() {
            restart.arg0(name);
        }
        let error = restart.args(args).env(ALLOCATOR_ENV, ALLOCATOR_ARENA_MAX_KIB).exec();
        // Still here: the restart failed. Run on, with every page in arenas.
        eprintln!(
            "keygate: could not restart with {ALLOCATOR_ENV}={ALLOCATOR_ARENA_MAX_KIB} ({error}); \
             freed memory will stay resident where memory is locked"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn core_dumps_off() {
        // In the test process (memory locking is left to the end-to-end
        // test): lowering RLIMIT_CORE and clearing dumpable are always
        // permitted, even unprivileged.
        let mut notes = Vec::new();
        assert_eq!(disable_core_dumps(&mut notes), (true, true), "{notes:?}");
        assert_eq!(getrlimit(Resource::Core).maximum, Some(0));
    }
}
