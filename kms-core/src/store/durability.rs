//! Whether the keystore's commits survive a crash, as the database itself
//! is set up for this store's sessions.

/// What the database says about a commit this keystore acknowledged: the
/// audit chain's promise (an event is durable before its result leaves)
/// rests on it. Read from the database, since settings of the server, the
/// database, the role or the connection can all weaken it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Durability {
    /// A commit survives a crash of the process and of the machine; how.
    Durable(String),
    /// A setting lets an acknowledged commit be lost; which.
    Weakened(String),
}

/// Judges PostgreSQL's `synchronous_commit` and `fsync` as a session sees
/// them. `local` is refused with `off`: with synchronous standbys it drops
/// the wait for them, and the keystore never asks for it.
#[cfg(feature = "postgres")]
pub(crate) fn postgres(synchronous_commit: &str, fsync: &str) -> Durability {
    let commit = synchronous_commit.trim().to_ascii_lowercase();
    let fsync_on =
        matches!(fsync.trim().to_ascii_lowercase().as_str(), "on" | "true" | "yes" | "1");
    if !fsync_on {
        return Durability::Weakened(format!("the server runs with fsync={fsync}"));
    }
    if matches!(commit.as_str(), "off" | "local" | "false" | "no" | "0") {
        return Durability::Weakened(format!(
            "this keystore's sessions run with synchronous_commit={synchronous_commit} \
             (set by the server, database, role or storage_url)"
        ));
    }
    Durability::Durable(format!("synchronous_commit={commit}, fsync=on"))
}

/// Judges SQLite's `synchronous` (0 OFF, 1 NORMAL, 2 FULL, 3 EXTRA) in WAL
/// mode: below FULL, the last commits can be lost on power loss.
#[cfg(feature = "sqlite")]
pub(crate) fn sqlite(synchronous: i64, journal_mode: &str) -> Durability {
    if synchronous >= 2 {
        Durability::Durable(format!(
            "SQLite journal_mode={journal_mode}, synchronous={synchronous}"
        ))
    } else {
        Durability::Weakened(format!("SQLite runs with synchronous={synchronous}"))
    }
}

#[cfg(all(test, feature = "sqlite", feature = "postgres"))]
mod tests {
    use super::*;

    #[test]
    fn only_settings_that_keep_commits_are_durable() {
        for commit in ["on", "remote_apply", "remote_write", "ON"] {
            assert!(matches!(postgres(commit, "on"), Durability::Durable(_)), "{commit}");
        }
        for commit in ["off", "local", "OFF", "0", "false"] {
            assert!(matches!(postgres(commit, "on"), Durability::Weakened(_)), "{commit}");
        }
        let Durability::Weakened(why) = postgres("on", "off") else { panic!("fsync off") };
        assert!(why.contains("fsync=off"), "{why}");
        assert!(matches!(sqlite(2, "wal"), Durability::Durable(_)));
        assert!(matches!(sqlite(1, "wal"), Durability::Weakened(_)));
    }
}
