//! The PostgreSQL keystore: several key-service replicas on one database.
//!
//! - **Same semantics as SQLite.** Same schema (BIGINT, BYTEA, TEXT with
//!   CHECKs, `COLLATE "C"` keys), same errors, same contract suite.
//! - **Correct under concurrency.** Writers of one tenant lock its row
//!   (`SELECT … FOR UPDATE`) and so serialise; the partial unique index
//!   (one active version per tenant) and the primary keys remain the last
//!   line, and their violations map to [`StoreError::VersionConflict`],
//!   [`StoreError::TenantExists`] or [`StoreError::AuditConflict`].
//! - **Migrations once.** Versioned files in `migrations/postgres`, applied
//!   at [`PostgresStore::connect`] by sqlx's migrator, which holds a
//!   session-level `pg_advisory_lock` (keyed by the database name) while it
//!   checks and applies them, so replicas starting together migrate once.
//! - **Bounded waits.** A connection pool with an acquire timeout, a
//!   `statement_timeout` (and `idle_in_transaction_session_timeout`) on
//!   every pooled connection, and a client-side limit on every operation
//!   (for a server gone silent, which no server-side timeout notices).
//!   What certainly had no effect surfaces as [`StoreError::Unavailable`];
//!   an operation given up on for silence, or whose COMMIT was lost with
//!   its connection, as [`StoreError::OutcomeUnknown`].
//! - **TLS** as the URL's `sslmode` (and `sslrootcert`, …) asks, through
//!   rustls with aws-lc-rs.
//! - **Coordination.** Job locks are session advisory locks on a dedicated
//!   connection; rotations and state changes `NOTIFY` in their own
//!   transaction, and a listener task turns notifications into
//!   [`Invalidation`](super::Invalidation)s.

mod audit;
mod job_lock;
mod lifecycle;
mod notify;
mod options;
mod tenants;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::postgres::{PgPool, PgPoolOptions, PgRow};
use sqlx::{PgConnection, Postgres, Row};
use tokio::sync::OnceCell;

use self::options::Settings;
pub use self::options::{PgStoreOptions, PgTarget};
use super::{
    Approval, ApprovalState, AuditRow, AuditSigningKeyRecord, CheckpointRow, DecideApproval,
    Durability, Invalidations, JobLock, KekRecord, KeyStore, MasterKeyId, MasterRecord, NewTenant,
    StoreError, StoredKey, StoredKeyRef, TenantRecord, UsageDelta, VersionUsage,
};
use crate::dek::KekVersion;
use crate::ids::TenantId;
use crate::kek::StateChange;
use crate::root::ProviderInfo;

/// The PostgreSQL keystore. Cheap to clone (clones share the pool and the
/// invalidation listener).
#[derive(Clone)]
pub struct PostgresStore {
    pool: PgPool,
    settings: Arc<Settings>,
    listener: Arc<OnceCell<notify::Listener>>,
}

impl PostgresStore {
    /// Connects to the database at `url` (`postgres://user@host:port/db`,
    /// with `?sslmode=verify-full&sslrootcert=…` for TLS; a password, if
    /// any, in the URL or `PGPASSWORD`), applies pending migrations under
    /// the migration lock, and opens the pool.
    ///
    /// Fails with [`StoreError::Config`] for a malformed URL or options,
    /// [`StoreError::Unavailable`] when the server cannot be reached in
    /// time, and [`StoreError::Migration`] when migrating fails.
    pub async fn connect(url: &str, options: PgStoreOptions) -> Result<Self, StoreError> {
        let settings = Settings::new(url, options)?;
        migrate(&settings).await?;
        let pool = PgPoolOptions::new()
            .max_connections(settings.options.max_connections)
            .acquire_timeout(settings.options.acquire_timeout)
            .connect_with(settings.pooled.clone())
            .await
            .map_err(unavailable)?;
        Ok(Self { pool, settings: Arc::new(settings), listener: Arc::default() })
    }

    /// The schema the keystore lives in, if one was configured.
    pub fn schema(&self) -> Option<&str> {
        self.settings.schema()
    }

    /// Whether the pooled connections are encrypted (TLS), as the server
    /// sees it: for readiness reports and tests of the URL's `sslmode`.
    pub async fn uses_tls(&self) -> Result<bool, StoreError> {
        self.run(async |c| {
            sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
                .fetch_one(c)
                .await
                .map_err(unavailable)
        })
        .await
    }

    /// Closes every pooled connection (waiting for those in use).
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Runs `op` on a pooled connection. Every operation goes through
    /// here: `statement_timeout` is the server's, and a server gone silent
    /// (a partition, a failover) never sends its error, so the wait for
    /// an answer is bounded here too. A connection given up on is closed,
    /// never reused: it is mid-message, and its session may still hold
    /// locks (the server ends it: `idle_in_transaction_session_timeout`).
    /// A read given up on is [`StoreError::Unavailable`]; a write, see
    /// [`write`](Self::write).
    async fn run<T>(
        &self,
        op: impl AsyncFnOnce(&mut PgConnection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.bounded(op, silent).await
    }

    /// [`run`](Self::run) for an operation that changes the keystore: given
    /// up on, its outcome is unknown ([`StoreError::OutcomeUnknown`]), for
    /// the client cannot tell whether the server had its COMMIT.
    async fn write<T>(
        &self,
        op: impl AsyncFnOnce(&mut PgConnection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.bounded(op, silent_write).await
    }

    async fn bounded<T>(
        &self,
        op: impl AsyncFnOnce(&mut PgConnection) -> Result<T, StoreError>,
        on_silence: fn(Duration) -> StoreError,
    ) -> Result<T, StoreError> {
        // Bounded by `acquire_timeout` (connecting and the liveness check
        // of an idle connection included).
        let mut conn = self.pool.acquire().await.map_err(unavailable)?;
        let limit = self.settings.operation_timeout();
        match tokio::time::timeout(limit, op(&mut conn)).await {
            Ok(result) => result,
            Err(_elapsed) => {
                conn.close_on_drop();
                Err(on_silence(limit))
            }
        }
    }
}

impl fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the connect options: they hold the password.
        f.debug_struct("PostgresStore")
            .field("schema", &self.settings.schema())
            .field("max_connections", &self.settings.options.max_connections)
            .finish_non_exhaustive()
    }
}

/// Applies pending migrations on a dedicated connection (a pool of one).
/// sqlx's migrator takes `pg_advisory_lock` before reading
/// `_sqlx_migrations` and releases it after the last migration, so
/// concurrent starts apply each migration once; closing the connection
/// releases the lock even if a migration failed midway (each migration is
/// its own transaction, so that one is rolled back).
async fn migrate(settings: &Settings) -> Result<(), StoreError> {
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(settings.options.acquire_timeout)
        .connect_with(settings.migrate.clone())
        .await
        .map_err(unavailable)?;
    let run = async {
        let mut migrator = sqlx::migrate!("./migrations/postgres");
        if let Some(schema) = settings.schema() {
            // Created under the migration lock, and only when missing:
            // `CREATE SCHEMA IF NOT EXISTS` needs the CREATE privilege on
            // the database even when the schema exists.
            let exists: bool =
                sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)")
                    .bind(schema)
                    .fetch_one(&pool)
                    .await
                    .map_err(unavailable)?;
            if !exists {
                migrator.create_schema(schema.to_owned());
            }
        }
        migrator.run(&pool).await.map_err(|e| StoreError::Migration(e.to_string()))
    };
    let result = tokio::time::timeout(settings.options.migrate_timeout, run).await.map_err(|_| {
        StoreError::Migration("timed out waiting for the migration lock or migrating".into())
    });
    // Closing waits for the connection, which a silent server may never
    // give back.
    let _silent = tokio::time::timeout(settings.options.acquire_timeout, pool.close()).await;
    result?
}

#[async_trait]
impl KeyStore for PostgresStore {
    async fn ping(&self) -> Result<(), StoreError> {
        self.run(async |c| {
            sqlx::query("SELECT 1").execute(c).await.map_err(unavailable)?;
            Ok(())
        })
        .await
    }

    async fn durability(&self) -> Result<Durability, StoreError> {
        // A pooled session: it carries storage_url's options and the
        // role's and database's settings, as every write does. Tables of
        // the keystore's schema made UNLOGGED lose their rows in a crash
        // whatever the settings say.
        let query = async |c: &mut PgConnection| {
            sqlx::query_as(
                "SELECT current_setting('synchronous_commit'), current_setting('fsync'),
                        current_setting('full_page_writes'),
                        (SELECT string_agg(c.relname, ', ' ORDER BY c.relname)
                           FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                          WHERE n.nspname = current_schema() AND c.relkind = 'r'
                            AND c.relpersistence = 'u')",
            )
            .fetch_one(c)
            .await
            .map_err(unavailable)
        };
        let (commit, fsync, full_pages, unlogged): (String, String, String, Option<String>) =
            self.run(query).await?;
        Ok(super::durability::postgres(&super::durability::PgSettings {
            synchronous_commit: &commit,
            fsync: &fsync,
            full_page_writes: &full_pages,
            unlogged_tables: unlogged.as_deref(),
        }))
    }

    async fn register_master(&self, info: &ProviderInfo) -> Result<MasterKeyId, StoreError> {
        self.write(async |c| tenants::register_master(c, info).await).await
    }

    async fn create_tenant(&self, tenant: NewTenant) -> Result<TenantRecord, StoreError> {
        self.write(async move |c| tenants::create_tenant(c, tenant).await).await
    }

    async fn tenant(&self, id: &TenantId) -> Result<Option<TenantRecord>, StoreError> {
        self.run(async |c| tenants::tenant(c, id).await).await
    }

    async fn list_tenants(&self) -> Result<Vec<TenantRecord>, StoreError> {
        self.run(async |c| tenants::list_tenants(c).await).await
    }

    async fn kek(
        &self,
        id: &TenantId,
        version: KekVersion,
    ) -> Result<Option<KekRecord>, StoreError> {
        self.run(async |c| tenants::kek(c, id, version).await).await
    }

    async fn add_kek_version(
        &self,
        id: &TenantId,
        version: KekVersion,
        wrapped: &[u8],
        master: MasterKeyId,
        now: i64,
    ) -> Result<KekRecord, StoreError> {
        let channel = &self.settings.channel;
        self.write(async |c| {
            tenants::add_kek_version(c, channel, id, version, wrapped, master, now).await
        })
        .await
    }

    async fn change_kek_state(
        &self,
        id: &TenantId,
        version: KekVersion,
        change: StateChange,
        now: i64,
    ) -> Result<KekRecord, StoreError> {
        let channel = &self.settings.channel;
        self.write(async |c| tenants::change_kek_state(c, channel, id, version, change, now).await)
            .await
    }

    async fn set_rotation_period(
        &self,
        id: &TenantId,
        every_secs: Option<i64>,
    ) -> Result<TenantRecord, StoreError> {
        self.write(async |c| {
            lifecycle::set_rotation_period(c, &self.settings.channel, id, every_secs).await
        })
        .await
    }

    async fn destroy_keys(
        &self,
        id: &TenantId,
        version: Option<KekVersion>,
        now: i64,
    ) -> Result<TenantRecord, StoreError> {
        self.write(async |c| {
            lifecycle::destroy_keys(c, &self.settings.channel, id, version, now).await
        })
        .await
    }

    async fn masters(&self) -> Result<Vec<MasterRecord>, StoreError> {
        self.run(async |c| lifecycle::masters(c).await).await
    }

    async fn set_master_config(&self, id: MasterKeyId, config: &str) -> Result<(), StoreError> {
        self.write(async |c| lifecycle::set_master_config(c, id, config).await).await
    }

    async fn activate_master(&self, id: MasterKeyId) -> Result<(), StoreError> {
        self.write(async |c| lifecycle::activate_master(c, id).await).await
    }

    async fn keys_not_under(
        &self,
        master: MasterKeyId,
        limit: u32,
    ) -> Result<Vec<StoredKey>, StoreError> {
        self.run(async |c| lifecycle::keys_not_under(c, master, limit).await).await
    }

    async fn replace_wrapped(
        &self,
        key: &StoredKeyRef,
        from: MasterKeyId,
        wrapped: &[u8],
        to: MasterKeyId,
    ) -> Result<bool, StoreError> {
        self.write(async |c| lifecycle::replace_wrapped(c, key, from, wrapped, to).await).await
    }

    async fn keys_per_master(&self) -> Result<Vec<(MasterKeyId, u64)>, StoreError> {
        self.run(async |c| lifecycle::keys_per_master(c).await).await
    }

    async fn add_usage(&self, deltas: &[UsageDelta]) -> Result<(), StoreError> {
        self.write(async |c| lifecycle::add_usage(c, deltas).await).await
    }

    async fn usage(&self, id: &TenantId, since_hour: i64) -> Result<Vec<VersionUsage>, StoreError> {
        self.run(async |c| lifecycle::usage(c, id, since_hour).await).await
    }

    async fn create_approval(&self, approval: &Approval) -> Result<(), StoreError> {
        self.write(async |c| lifecycle::create_approval(c, approval).await).await
    }

    async fn approval(&self, id: &str) -> Result<Option<Approval>, StoreError> {
        self.run(async |c| lifecycle::approval(c, id).await).await
    }

    async fn approvals(&self, state: Option<ApprovalState>) -> Result<Vec<Approval>, StoreError> {
        self.run(async |c| lifecycle::approvals(c, state).await).await
    }

    async fn decide_approval(&self, decision: &DecideApproval<'_>) -> Result<Approval, StoreError> {
        self.write(async |c| lifecycle::decide_approval(c, decision).await).await
    }

    async fn execute_approval(
        &self,
        id: &str,
        now: i64,
    ) -> Result<(Approval, TenantRecord), StoreError> {
        self.write(async |c| lifecycle::execute_approval(c, &self.settings.channel, id, now).await)
            .await
    }

    async fn withdraw_approval(
        &self,
        id: &str,
        from: ApprovalState,
        comment: &str,
    ) -> Result<Approval, StoreError> {
        self.write(async |c| lifecycle::withdraw_approval(c, id, from, comment).await).await
    }

    async fn append_audit(&self, rows: &[AuditRow]) -> Result<(), StoreError> {
        self.write(async |c| audit::append_batch(c, rows, None).await).await
    }

    async fn audit_rows(
        &self,
        instance: &str,
        after: i64,
        limit: u32,
    ) -> Result<Vec<AuditRow>, StoreError> {
        self.run(async |c| audit::rows(c, instance, after, limit).await).await
    }

    async fn append_audit_batch(
        &self,
        rows: &[AuditRow],
        checkpoint: Option<&CheckpointRow>,
    ) -> Result<(), StoreError> {
        self.write(async |c| audit::append_batch(c, rows, checkpoint).await).await
    }

    async fn last_audit_row(&self, instance: &str) -> Result<Option<AuditRow>, StoreError> {
        self.run(async |c| audit::last_row(c, instance).await).await
    }

    async fn audit_checkpoints(
        &self,
        instance: &str,
        after_seq: i64,
        limit: u32,
    ) -> Result<Vec<CheckpointRow>, StoreError> {
        self.run(async |c| audit::checkpoints(c, instance, after_seq, limit).await).await
    }

    async fn last_audit_checkpoint(
        &self,
        instance: &str,
    ) -> Result<Option<CheckpointRow>, StoreError> {
        self.run(async |c| audit::last_checkpoint(c, instance).await).await
    }

    async fn audit_instances(&self) -> Result<Vec<String>, StoreError> {
        self.run(async |c| audit::instances(c).await).await
    }

    async fn audit_signing_key(
        &self,
        instance: &str,
    ) -> Result<Option<AuditSigningKeyRecord>, StoreError> {
        self.run(async |c| audit::signing_key(c, instance).await).await
    }

    async fn insert_audit_signing_key(
        &self,
        record: &AuditSigningKeyRecord,
    ) -> Result<AuditSigningKeyRecord, StoreError> {
        self.write(async |c| audit::insert_signing_key(c, record).await).await
    }

    /// A session-level `pg_try_advisory_lock` on a dedicated connection,
    /// keyed by a hash of the schema and `job`.
    async fn try_job_lock(&self, job: &str) -> Result<Option<JobLock>, StoreError> {
        job_lock::try_lock(&self.settings, job).await
    }

    /// `pg_notify` on the schema's channel, with the tenant id as payload.
    async fn notify_tenant_changed(&self, tenant: &TenantId) -> Result<(), StoreError> {
        self.run(async |c| notify::notify(c, &self.settings.channel, tenant).await).await
    }

    /// Starts this store's listener at the first call (and waits until it
    /// listens); every call returns a new subscription to it.
    async fn subscribe_invalidations(&self) -> Result<Option<Invalidations>, StoreError> {
        let listener =
            self.listener.get_or_try_init(|| notify::Listener::start(&self.settings)).await?;
        Ok(Some(listener.subscribe()))
    }
}

fn get<'r, T>(row: &'r PgRow, column: &str) -> Result<T, StoreError>
where
    T: sqlx::Decode<'r, Postgres> + sqlx::Type<Postgres>,
{
    row.try_get(column).map_err(|e| StoreError::Corrupt(format!("column {column}: {e}")))
}

/// Any database error not mapped to something more specific: connection
/// loss, pool or statement timeouts, refused constraints.
fn unavailable(e: sqlx::Error) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// A COMMIT (or a write outside a transaction, which commits itself) that
/// failed: refused by the server (so rolled back), or lost with its
/// connection, when it may have landed.
fn commit_failed(e: sqlx::Error) -> StoreError {
    if e.as_database_error().is_some() {
        return unavailable(e);
    }
    StoreError::OutcomeUnknown(format!("the connection failed while committing: {e}"))
}

/// No answer from the server within `limit`, to a read.
fn silent(limit: Duration) -> StoreError {
    StoreError::Unavailable(format!("no answer from PostgreSQL within {} ms", limit.as_millis()))
}

/// No answer from the server within `limit`, to a write.
fn silent_write(limit: Duration) -> StoreError {
    StoreError::OutcomeUnknown(format!(
        "no answer from PostgreSQL within {} ms; the outcome of the operation is unknown",
        limit.as_millis()
    ))
}

fn is_unique_violation(e: &sqlx::Error) -> bool {
    e.as_database_error().is_some_and(|d| d.is_unique_violation())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A COMMIT lost with its connection may have landed, and so may a
    /// write given up on for silence; a read given up on changed nothing.
    #[test]
    fn a_commit_lost_with_its_connection_has_an_unknown_outcome() {
        let lost = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset by peer");
        let e = commit_failed(sqlx::Error::Io(lost));
        assert!(matches!(&e, StoreError::OutcomeUnknown(m) if m.contains("reset by peer")), "{e}");
        assert!(matches!(silent_write(Duration::from_secs(1)), StoreError::OutcomeUnknown(_)));
        assert!(matches!(silent(Duration::from_secs(1)), StoreError::Unavailable(_)));
    }
}
