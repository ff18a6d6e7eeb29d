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

/// What a PostgreSQL session reports about its commits.
#[cfg(feature = "postgres")]
pub(crate) struct PgSettings<'a> {
    pub(crate) synchronous_commit: &'a str,
    pub(crate) fsync: &'a str,
    pub(crate) full_page_writes: &'a str,
    /// Tables of the keystore's schema that are UNLOGGED, if any.
    pub(crate) unlogged_tables: Option<&'a str>,
}

/// Judges PostgreSQL's settings as a session sees them (`current_setting`
/// gives each in its canonical spelling: `on`, `off`, `local` …). `local`
/// is refused with `off`: with synchronous standbys it drops the wait for
/// them, and the keystore never asks for it.
#[cfg(feature = "postgres")]
pub(crate) fn postgres(settings: &PgSettings<'_>) -> Durability {
    let on = |value: &str| value == "on";
    if !on(settings.fsync) {
        return Durability::Weakened(format!("the server runs with fsync={}", settings.fsync));
    }
    if !on(settings.full_page_writes) {
        return Durability::Weakened(format!(
            "the server runs with full_page_writes={} (a crash can tear pages)",
            settings.full_page_writes
        ));
    }
    if let Some(tables) = settings.unlogged_tables.filter(|t| !t.is_empty()) {
        return Durability::Weakened(format!(
            "keystore tables are UNLOGGED (emptied by a crash): {tables}"
        ));
    }
    let commit = settings.synchronous_commit;
    if matches!(commit, "off" | "local") {
        return Durability::Weakened(format!(
            "this keystore's sessions run with synchronous_commit={commit} \
             (set by the server, database, role or storage_url)"
        ));
    }
    Durability::Durable(format!("synchronous_commit={commit}, fsync=on, full_page_writes=on"))
}

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
        let pg = |commit, fsync, full_pages, unlogged| {
            postgres(&PgSettings {
                synchronous_commit: commit,
                fsync,
                full_page_writes: full_pages,
                unlogged_tables: unlogged,
            })
        };
        for commit in ["on", "remote_apply", "remote_write"] {
            assert!(matches!(pg(commit, "on", "on", None), Durability::Durable(_)), "{commit}");
        }
        assert!(matches!(pg("on", "on", "on", Some("")), Durability::Durable(_)));
        for commit in ["off", "local"] {
            assert!(matches!(pg(commit, "on", "on", None), Durability::Weakened(_)), "{commit}");
        }
        for (weakened, needle) in [
            (pg("on", "off", "on", None), "fsync=off"),
            (pg("on", "on", "off", None), "full_page_writes=off"),
            (
                pg("on", "on", "on", Some("audit_events")),
                "UNLOGGED (emptied by a crash): audit_events",
            ),
        ] {
            let Durability::Weakened(why) = weakened else { panic!("{needle}: durable") };
            assert!(why.contains(needle), "{why}");
        }
        assert!(matches!(sqlite(2, "wal"), Durability::Durable(_)));
        assert!(matches!(sqlite(1, "wal"), Durability::Weakened(_)));
    }
}
