//! Fresh keystores for the contract suite: SQLite in a temporary directory,
//! PostgreSQL in a schema of its own (`kg_test_<random>`), dropped when the
//! fixture is.
//!
//! PostgreSQL: `KEYGATE_TEST_PG_URL`, else the machine's server at
//! `postgres://postgres@127.0.0.1:5432/test`. An unreachable server fails
//! the tests (with how to start it); they are never skipped.

use std::sync::Arc;
use std::time::Duration;

use kms_core::store::{KeyStore, MasterKeyId, PgStoreOptions, PostgresStore, SqliteStore};
use kms_core::{ProviderInfo, TenantId};
use sqlx::{AssertSqlSafe, Connection};

pub(crate) const DEFAULT_PG_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Backend {
    Sqlite,
    Postgres,
}

pub(crate) struct Fixture {
    backend: Backend,
    sqlite_dir: Option<tempfile::TempDir>,
    pg: Option<PgSchema>,
}

/// A test schema; dropped (with everything in it) on drop.
pub(crate) struct PgSchema {
    pub(crate) url: String,
    pub(crate) name: String,
}

impl Fixture {
    pub(crate) async fn sqlite() -> Self {
        let dir = tempfile::tempdir().unwrap();
        Self { backend: Backend::Sqlite, sqlite_dir: Some(dir), pg: None }
    }

    pub(crate) async fn postgres() -> Self {
        let url = pg_url();
        // Fail, loudly, when there is no server to test against.
        let reached =
            tokio::time::timeout(Duration::from_secs(10), sqlx::PgConnection::connect(&url)).await;
        match reached {
            Ok(Ok(conn)) => conn.close().await.unwrap(),
            Ok(Err(e)) => panic!("{}", unreachable_message(&url, &e.to_string())),
            Err(_) => panic!("{}", unreachable_message(&url, "timed out")),
        }
        let mut random = [0u8; 8];
        getrandom::fill(&mut random).unwrap();
        let name = format!("kg_test_{}", data_encoding::HEXLOWER.encode(&random));
        Self { backend: Backend::Postgres, sqlite_dir: None, pg: Some(PgSchema { url, name }) }
    }

    pub(crate) fn backend(&self) -> Backend {
        self.backend
    }

    /// Another, independent instance of the store (its own pool): what a
    /// second replica, or a restart, sees.
    pub(crate) async fn open(&self) -> Arc<dyn KeyStore> {
        match self.backend {
            Backend::Sqlite => Arc::new(self.open_sqlite().await),
            Backend::Postgres => Arc::new(self.open_pg().await),
        }
    }

    /// [`Fixture::open`], with the test master key registered.
    pub(crate) async fn open_with_master(&self) -> (Arc<dyn KeyStore>, MasterKeyId) {
        let store = self.open().await;
        let master = store.register_master(&test_master()).await.unwrap();
        // New key material goes under the active master only.
        store.activate_master(master).await.unwrap();
        (store, master)
    }

    pub(crate) async fn open_sqlite(&self) -> SqliteStore {
        let dir = self.sqlite_dir.as_ref().expect("a SQLite fixture");
        SqliteStore::open_in_dir(&dir.path().join("data")).await.unwrap()
    }

    pub(crate) async fn open_pg(&self) -> PostgresStore {
        self.open_pg_with(self.pg_options()).await
    }

    pub(crate) async fn open_pg_with(&self, options: PgStoreOptions) -> PostgresStore {
        PostgresStore::connect(&self.pg().url, options).await.unwrap()
    }

    pub(crate) fn pg(&self) -> &PgSchema {
        self.pg.as_ref().expect("a PostgreSQL fixture")
    }

    /// Options for this fixture's schema (small pools: tests run in parallel).
    pub(crate) fn pg_options(&self) -> PgStoreOptions {
        let mut options = PgStoreOptions::default().with_schema(&self.pg().name);
        options.max_connections = 5;
        options.acquire_timeout = Duration::from_secs(20);
        options
    }

    /// Runs raw SQL (several statements allowed) in the store's database
    /// and schema, for fault injection and inspection.
    pub(crate) async fn try_exec(&self, sql: &str) -> Result<(), sqlx::Error> {
        let sql = AssertSqlSafe(sql.to_owned());
        match self.backend {
            Backend::Sqlite => {
                let path = self.sqlite_dir.as_ref().unwrap().path().join("data/keystore.sqlite3");
                let mut conn =
                    sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display()))
                        .await?;
                sqlx::raw_sql(sql).execute(&mut conn).await?;
                conn.close().await
            }
            Backend::Postgres => {
                let mut conn = self.pg().connect().await;
                sqlx::raw_sql(sql).execute(&mut conn).await?;
                conn.close().await
            }
        }
    }

    pub(crate) async fn exec(&self, sql: &str) {
        self.try_exec(sql).await.unwrap();
    }

    /// Makes every INSERT into `kek_versions` (of `version`, if given) fail.
    pub(crate) async fn fail_kek_inserts(&self, version: Option<i64>) {
        let sql = match (self.backend, version) {
            (Backend::Sqlite, Some(v)) => format!(
                "CREATE TRIGGER inject_failure BEFORE INSERT ON kek_versions WHEN NEW.version = {v}
                 BEGIN SELECT RAISE(ABORT, 'injected failure'); END"
            ),
            (Backend::Sqlite, None) => "CREATE TRIGGER inject_failure BEFORE INSERT ON kek_versions
                 BEGIN SELECT RAISE(ABORT, 'injected failure'); END"
                .to_owned(),
            (Backend::Postgres, version) => format!(
                "CREATE FUNCTION inject_failure() RETURNS trigger LANGUAGE plpgsql
                     AS $$ BEGIN RAISE EXCEPTION 'injected failure'; END $$;
                 CREATE TRIGGER inject_failure BEFORE INSERT ON kek_versions FOR EACH ROW {}
                     EXECUTE FUNCTION inject_failure();",
                version.map_or(String::new(), |v| format!("WHEN (NEW.version = {v})"))
            ),
        };
        self.exec(&sql).await;
    }

    pub(crate) async fn stop_failing(&self) {
        self.exec(match self.backend {
            Backend::Sqlite => "DROP TRIGGER inject_failure",
            Backend::Postgres => {
                "DROP TRIGGER inject_failure ON kek_versions; DROP FUNCTION inject_failure();"
            }
        })
        .await;
    }
}

impl PgSchema {
    /// A raw connection whose `search_path` is the test schema.
    pub(crate) async fn connect(&self) -> sqlx::PgConnection {
        let mut conn = sqlx::PgConnection::connect(&self.url).await.unwrap();
        sqlx::raw_sql(AssertSqlSafe(format!("SET search_path TO {}", self.name)))
            .execute(&mut conn)
            .await
            .unwrap();
        conn
    }

    /// The URL with a query parameter added.
    pub(crate) fn url_with(&self, param: &str) -> String {
        let joiner = if self.url.contains('?') { '&' } else { '?' };
        format!("{}{joiner}{param}", self.url)
    }
}

impl Drop for PgSchema {
    fn drop(&mut self) {
        // Drop runs inside the test's runtime (maybe while unwinding), so
        // the cleanup gets a thread and a runtime of its own.
        let (url, name) = (self.url.clone(), self.name.clone());
        let cleanup = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            runtime.block_on(async {
                let mut conn = sqlx::PgConnection::connect(&url).await?;
                let sql = format!("SET lock_timeout = '10s'; DROP SCHEMA IF EXISTS {name} CASCADE");
                sqlx::raw_sql(AssertSqlSafe(sql)).execute(&mut conn).await?;
                conn.close().await
            })?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
        });
        match cleanup.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("could not drop test schema {}: {e}", self.name),
            Err(_) => eprintln!("could not drop test schema {}: cleanup panicked", self.name),
        }
    }
}

pub(crate) fn pg_url() -> String {
    std::env::var("KEYGATE_TEST_PG_URL").unwrap_or_else(|_| DEFAULT_PG_URL.to_owned())
}

fn unreachable_message(url: &str, error: &str) -> String {
    format!(
        "PostgreSQL is not reachable at {url}: {error}.\n\
         The keystore contract suite runs against PostgreSQL too and is never skipped.\n\
         Start the machine's server with\n    \
         pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start\n\
         or point KEYGATE_TEST_PG_URL at another one (postgres://user@host:port/database;\n\
         the role needs CREATE on that database)."
    )
}

pub(crate) fn test_master() -> ProviderInfo {
    ProviderInfo { kind: "local", key_ref: "test".into() }
}

pub(crate) fn tenant(name: &str) -> TenantId {
    TenantId::new(name).unwrap()
}

/// Waits (polling) until `probe` yields `Some`, for at most `limit`.
pub(crate) async fn eventually<T, F, Fut>(limit: Duration, mut probe: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(value) = probe().await {
            return Some(value);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
