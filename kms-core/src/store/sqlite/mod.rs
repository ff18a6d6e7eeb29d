//! The embedded SQLite keystore: one file in a data directory, WAL journal,
//! `synchronous = FULL` (a committed transaction survives power loss),
//! foreign keys on, and writes in `BEGIN IMMEDIATE` transactions so two
//! writers never deadlock upgrading a read lock. `secure_delete` is on, so
//! shredded key material is overwritten, not merely unlinked from its page.
//! Each connection's page cache is kept small (see [`PAGE_CACHE_KIB`]).

mod lifecycle;

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{Row, Sqlite, Transaction};

use super::coordination::try_local_job_lock;
use super::rows::{self, first_not_inserted};
use super::{
    Approval, ApprovalState, AuditRow, AuditSigningKeyRecord, CheckpointRow, DecideApproval,
    Durability, Invalidations, JobLock, KekRecord, KeyStore, MasterKeyId, MasterRecord, NewTenant,
    StoreError, StoredKey, StoredKeyRef, TenantRecord, UsageDelta, VersionUsage,
};
use crate::dek::KekVersion;
use crate::ids::TenantId;
use crate::kek::{KekState, StateChange};
use crate::root::ProviderInfo;

/// File name of the keystore inside a data directory.
pub const KEYSTORE_FILE: &str = "keystore.sqlite3";

/// The columns of `audit_events`, in the order [`rows::audit_row`] reads and
/// the INSERT of [`KeyStore::append_audit_batch`] binds them (a macro so
/// the queries stay `&'static str`).
macro_rules! audit_columns {
    () => {
        "instance, seq, ts_ms, actor, action, tenant, kek_version, \
         record_key_ids, outcome, detail, prev_hash, hash"
    };
}

const BUSY_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_CONNECTIONS: u32 = 4;
/// Each connection's page cache, in KiB (SQLite's default is 2,000). The
/// keystore's reads are fronted by the key hierarchy's caches and its
/// writes append audit rows, which fill a cache with pages never read
/// again; and where the process locks its memory (DESIGN §11) whatever a
/// cache ever held stays resident.
const PAGE_CACHE_KIB: u32 = 512;

/// The SQLite keystore.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    path: PathBuf,
}

impl SqliteStore {
    /// Opens (creating if needed) `keystore.sqlite3` in `data_dir`, which is
    /// created with mode 0700, and applies pending migrations.
    pub async fn open_in_dir(data_dir: &Path) -> Result<Self, StoreError> {
        create_private_dir(data_dir)?;
        Self::open(&data_dir.join(KEYSTORE_FILE)).await
    }

    /// Opens (creating if needed, mode 0600) the keystore at `path` and
    /// applies pending migrations.
    pub async fn open(path: &Path) -> Result<Self, StoreError> {
        create_private_file(path)?;
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(false)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .pragma("secure_delete", "ON")
            // Negative: a size in KiB rather than in pages.
            .pragma("cache_size", format!("-{PAGE_CACHE_KIB}"))
            .busy_timeout(BUSY_TIMEOUT);
        let pool = SqlitePoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            // sqlx pings a connection each time the pool hands it out. For
            // SQLite that is one more round trip to the connection's thread
            // for every query, and it checks nothing a query would not:
            // the database is a local file, not a peer that may have gone.
            .test_before_acquire(false)
            .acquire_timeout(BUSY_TIMEOUT)
            .connect_with(options)
            .await
            .map_err(unavailable)?;
        sqlx::migrate!("./migrations/sqlite")
            .run(&pool)
            .await
            .map_err(|e| StoreError::Migration(e.to_string()))?;
        Ok(Self { pool, path: path.to_owned() })
    }

    /// Where the database file is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Closes every connection (checkpointing the WAL).
    pub async fn close(&self) {
        self.pool.close().await;
    }

    async fn write_tx(&self) -> Result<Transaction<'static, Sqlite>, StoreError> {
        self.pool.begin_with("BEGIN IMMEDIATE").await.map_err(unavailable)
    }

    async fn load_versions(
        &self,
        conn: &mut sqlx::SqliteConnection,
        id: &TenantId,
    ) -> Result<Vec<KekRecord>, StoreError> {
        sqlx::query(
            "SELECT version, state, wrapped, master_key, created_at, state_changed_at
             FROM kek_versions WHERE tenant = ? ORDER BY version",
        )
        .bind(id.as_str())
        .fetch_all(&mut *conn)
        .await
        .map_err(unavailable)?
        .iter()
        .map(kek_from_row)
        .collect()
    }

    async fn load_tenant(
        &self,
        conn: &mut sqlx::SqliteConnection,
        id: &TenantId,
    ) -> Result<Option<TenantRecord>, StoreError> {
        let Some(row) = sqlx::query(
            "SELECT created_at, index_root_wrapped, index_root_master, rotate_every_secs
             FROM tenants WHERE id = ?",
        )
        .bind(id.as_str())
        .fetch_optional(&mut *conn)
        .await
        .map_err(unavailable)?
        else {
            return Ok(None);
        };
        Ok(Some(TenantRecord {
            id: id.clone(),
            created_at: get(&row, "created_at")?,
            index_root_wrapped: get(&row, "index_root_wrapped")?,
            index_root_master: MasterKeyId(get(&row, "index_root_master")?),
            rotate_every_secs: get(&row, "rotate_every_secs")?,
            versions: self.load_versions(conn, id).await?,
        }))
    }
}

/// Refuses new key material under a master that is not the active one.
/// Inside a write transaction, which SQLite serialises with the master
/// activation's, so a rotation's sweep of keys under the old master, made
/// after the activation, sees every key inserted under it.
async fn require_active_master(
    conn: &mut sqlx::SqliteConnection,
    master: MasterKeyId,
) -> Result<(), StoreError> {
    let active: Option<i64> = sqlx::query_scalar("SELECT active FROM master_keys WHERE id = ?")
        .bind(master.0)
        .fetch_optional(conn)
        .await
        .map_err(unavailable)?;
    match active {
        Some(1) => Ok(()),
        Some(_) => Err(StoreError::MasterNotActive(master.0)),
        None => Err(StoreError::UnknownMaster(master.0)),
    }
}

#[async_trait]
impl KeyStore for SqliteStore {
    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await.map_err(unavailable)?;
        Ok(())
    }

    async fn durability(&self) -> Result<Durability, StoreError> {
        // Per connection: asked of one the pool hands out, as writes are.
        let mut conn = self.pool.acquire().await.map_err(unavailable)?;
        let synchronous: i64 = sqlx::query_scalar("PRAGMA synchronous")
            .fetch_one(&mut *conn)
            .await
            .map_err(unavailable)?;
        let journal: String = sqlx::query_scalar("PRAGMA journal_mode")
            .fetch_one(&mut *conn)
            .await
            .map_err(unavailable)?;
        Ok(super::durability::sqlite(synchronous, &journal))
    }

    async fn register_master(&self, info: &ProviderInfo) -> Result<MasterKeyId, StoreError> {
        let mut tx = self.write_tx().await?;
        sqlx::query(
            "INSERT INTO master_keys (kind, key_ref, created_at) VALUES (?, ?, unixepoch())
             ON CONFLICT (kind, key_ref) DO NOTHING",
        )
        .bind(info.kind)
        .bind(&info.key_ref)
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
        let id: i64 =
            sqlx::query_scalar("SELECT id FROM master_keys WHERE kind = ? AND key_ref = ?")
                .bind(info.kind)
                .bind(&info.key_ref)
                .fetch_one(&mut *tx)
                .await
                .map_err(unavailable)?;
        tx.commit().await.map_err(unavailable)?;
        Ok(MasterKeyId(id))
    }

    async fn create_tenant(&self, t: NewTenant) -> Result<TenantRecord, StoreError> {
        let mut tx = self.write_tx().await?;
        require_active_master(&mut tx, t.master).await?;
        let inserted = sqlx::query(
            "INSERT INTO tenants (id, created_at, index_root_wrapped, index_root_master)
             VALUES (?, ?, ?, ?)",
        )
        .bind(t.id.as_str())
        .bind(t.created_at)
        .bind(&t.index_root_wrapped)
        .bind(t.master.0)
        .execute(&mut *tx)
        .await;
        match inserted {
            Err(e) if is_unique_violation(&e) => return Err(StoreError::TenantExists(t.id)),
            other => other.map_err(unavailable)?,
        };
        sqlx::query(
            "INSERT INTO kek_versions (tenant, version, state, wrapped, master_key, created_at, state_changed_at)
             VALUES (?, 1, 'active', ?, ?, ?, ?)",
        )
        .bind(t.id.as_str())
        .bind(&t.kek_wrapped)
        .bind(t.master.0)
        .bind(t.created_at)
        .bind(t.created_at)
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
        let record = self.load_tenant(&mut tx, &t.id).await?;
        tx.commit().await.map_err(unavailable)?;
        record.ok_or_else(|| StoreError::Corrupt("tenant vanished inside its transaction".into()))
    }

    async fn tenant(&self, id: &TenantId) -> Result<Option<TenantRecord>, StoreError> {
        // One read transaction, so the tenant row and its versions come
        // from one snapshot (a shred between two reads would otherwise show
        // an index root beside destroyed versions).
        let mut tx = self.pool.begin().await.map_err(unavailable)?;
        let record = self.load_tenant(&mut tx, id).await?;
        tx.commit().await.map_err(unavailable)?;
        Ok(record)
    }

    async fn list_tenants(&self) -> Result<Vec<TenantRecord>, StoreError> {
        let mut tx = self.pool.begin().await.map_err(unavailable)?;
        let ids: Vec<String> = sqlx::query_scalar("SELECT id FROM tenants ORDER BY id")
            .fetch_all(&mut *tx)
            .await
            .map_err(unavailable)?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            let id = TenantId::new(id).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            if let Some(t) = self.load_tenant(&mut tx, &id).await? {
                out.push(t);
            }
        }
        tx.commit().await.map_err(unavailable)?;
        Ok(out)
    }

    async fn kek(
        &self,
        id: &TenantId,
        version: KekVersion,
    ) -> Result<Option<KekRecord>, StoreError> {
        sqlx::query(
            "SELECT version, state, wrapped, master_key, created_at, state_changed_at
             FROM kek_versions WHERE tenant = ? AND version = ?",
        )
        .bind(id.as_str())
        .bind(i64::from(version))
        .fetch_optional(&self.pool)
        .await
        .map_err(unavailable)?
        .as_ref()
        .map(kek_from_row)
        .transpose()
    }

    async fn add_kek_version(
        &self,
        id: &TenantId,
        version: KekVersion,
        wrapped: &[u8],
        master: MasterKeyId,
        now: i64,
    ) -> Result<KekRecord, StoreError> {
        let mut tx = self.write_tx().await?;
        // A shred adds no version, so the number alone cannot tell a
        // rotation prepared before a shred from one prepared after it.
        let shredded: Option<bool> =
            sqlx::query_scalar("SELECT index_root_wrapped IS NULL FROM tenants WHERE id = ?")
                .bind(id.as_str())
                .fetch_optional(&mut *tx)
                .await
                .map_err(unavailable)?;
        match shredded {
            None => return Err(StoreError::UnknownTenant(id.clone())),
            Some(true) => return Err(StoreError::Shredded(id.clone())),
            Some(false) => {}
        }
        require_active_master(&mut tx, master).await?;
        let highest: Option<i64> =
            sqlx::query_scalar("SELECT MAX(version) FROM kek_versions WHERE tenant = ?")
                .bind(id.as_str())
                .fetch_one(&mut *tx)
                .await
                .map_err(unavailable)?;
        let Some(highest) = highest else {
            return Err(StoreError::UnknownTenant(id.clone()));
        };
        if i64::from(version) != highest + 1 {
            return Err(StoreError::VersionConflict(id.clone()));
        }
        sqlx::query(
            "UPDATE kek_versions SET state = 'decrypt_only', state_changed_at = ?
             WHERE tenant = ? AND state = 'active'",
        )
        .bind(now)
        .bind(id.as_str())
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
        let inserted = sqlx::query(
            "INSERT INTO kek_versions (tenant, version, state, wrapped, master_key, created_at, state_changed_at)
             VALUES (?, ?, 'active', ?, ?, ?, ?)",
        )
        .bind(id.as_str())
        .bind(i64::from(version))
        .bind(wrapped)
        .bind(master.0)
        .bind(now)
        .bind(now)
        .execute(&mut *tx)
        .await;
        match inserted {
            Err(e) if is_unique_violation(&e) => {
                return Err(StoreError::VersionConflict(id.clone()));
            }
            other => other.map_err(unavailable)?,
        };
        tx.commit().await.map_err(unavailable)?;
        Ok(KekRecord {
            version,
            state: KekState::Active,
            wrapped: Some(wrapped.to_vec()),
            master,
            created_at: now,
            state_changed_at: now,
        })
    }

    async fn change_kek_state(
        &self,
        id: &TenantId,
        version: KekVersion,
        change: StateChange,
        now: i64,
    ) -> Result<KekRecord, StoreError> {
        let mut tx = self.write_tx().await?;
        let current = sqlx::query(
            "SELECT version, state, wrapped, master_key, created_at, state_changed_at
             FROM kek_versions WHERE tenant = ? AND version = ?",
        )
        .bind(id.as_str())
        .bind(i64::from(version))
        .fetch_optional(&mut *tx)
        .await
        .map_err(unavailable)?;
        let Some(current) = current.as_ref().map(kek_from_row).transpose()? else {
            return Err(StoreError::UnknownVersion { tenant: id.clone(), version });
        };
        let next = current.state.apply(change)?;
        sqlx::query(
            "UPDATE kek_versions SET state = ?, state_changed_at = ? WHERE tenant = ? AND version = ?",
        )
        .bind(next.as_str())
        .bind(now)
        .bind(id.as_str())
        .bind(i64::from(version))
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
        tx.commit().await.map_err(unavailable)?;
        Ok(KekRecord { state: next, state_changed_at: now, ..current })
    }

    async fn set_rotation_period(
        &self,
        id: &TenantId,
        every_secs: Option<i64>,
    ) -> Result<TenantRecord, StoreError> {
        self.set_rotation_period_impl(id, every_secs).await
    }

    async fn destroy_keys(
        &self,
        id: &TenantId,
        version: Option<KekVersion>,
        now: i64,
    ) -> Result<TenantRecord, StoreError> {
        self.destroy_keys_impl(id, version, now).await
    }

    async fn masters(&self) -> Result<Vec<MasterRecord>, StoreError> {
        self.masters_impl().await
    }

    async fn set_master_config(&self, id: MasterKeyId, config: &str) -> Result<(), StoreError> {
        self.set_master_config_impl(id, config).await
    }

    async fn activate_master(&self, id: MasterKeyId) -> Result<(), StoreError> {
        self.activate_master_impl(id).await
    }

    async fn keys_not_under(
        &self,
        master: MasterKeyId,
        limit: u32,
    ) -> Result<Vec<StoredKey>, StoreError> {
        self.keys_not_under_impl(master, limit).await
    }

    async fn replace_wrapped(
        &self,
        key: &StoredKeyRef,
        from: MasterKeyId,
        wrapped: &[u8],
        to: MasterKeyId,
    ) -> Result<bool, StoreError> {
        self.replace_wrapped_impl(key, from, wrapped, to).await
    }

    async fn keys_per_master(&self) -> Result<Vec<(MasterKeyId, u64)>, StoreError> {
        self.keys_per_master_impl().await
    }

    async fn add_usage(&self, deltas: &[UsageDelta]) -> Result<(), StoreError> {
        self.add_usage_impl(deltas).await
    }

    async fn usage(&self, id: &TenantId, since_hour: i64) -> Result<Vec<VersionUsage>, StoreError> {
        self.usage_impl(id, since_hour).await
    }

    async fn create_approval(&self, approval: &Approval) -> Result<(), StoreError> {
        self.create_approval_impl(approval).await
    }

    async fn approval(&self, id: &str) -> Result<Option<Approval>, StoreError> {
        self.approval_impl(id).await
    }

    async fn approvals(&self, state: Option<ApprovalState>) -> Result<Vec<Approval>, StoreError> {
        self.approvals_impl(state).await
    }

    async fn decide_approval(&self, decision: &DecideApproval<'_>) -> Result<Approval, StoreError> {
        self.decide_approval_impl(decision).await
    }

    async fn withdraw_approval(
        &self,
        id: &str,
        from: ApprovalState,
        comment: &str,
    ) -> Result<Approval, StoreError> {
        self.withdraw_approval_impl(id, from, comment).await
    }

    async fn execute_approval(
        &self,
        id: &str,
        now: i64,
    ) -> Result<(Approval, TenantRecord), StoreError> {
        self.execute_approval_impl(id, now).await
    }

    async fn append_audit(&self, rows: &[AuditRow]) -> Result<(), StoreError> {
        self.append_audit_batch(rows, None).await
    }

    async fn audit_rows(
        &self,
        instance: &str,
        after: i64,
        limit: u32,
    ) -> Result<Vec<AuditRow>, StoreError> {
        sqlx::query(concat!(
            "SELECT ",
            audit_columns!(),
            " FROM audit_events WHERE instance = ? AND seq > ? ORDER BY seq LIMIT ?"
        ))
        .bind(instance)
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(unavailable)?
        .iter()
        .map(rows::audit_row)
        .collect()
    }

    async fn append_audit_batch(
        &self,
        rows: &[AuditRow],
        checkpoint: Option<&CheckpointRow>,
    ) -> Result<(), StoreError> {
        if rows.is_empty() && checkpoint.is_none() {
            return Ok(());
        }
        // Dropping `tx` on any early return rolls the whole batch back.
        let mut tx = self.write_tx().await?;
        // Multi-row inserts: each statement is a round trip to sqlx's SQLite
        // worker thread, and a group commit can hold hundreds of events.
        // Rows that already exist are skipped and reported as a conflict (at
        // the first such row, in batch order), then everything rolls back.
        let mut rest = rows;
        while !rest.is_empty() {
            let (chunk, after) = rest.split_at(insert_len(rest.len()));
            rest = after;
            let mut insert = sqlx::QueryBuilder::<Sqlite>::new(concat!(
                "INSERT INTO audit_events (",
                audit_columns!(),
                ") "
            ));
            insert.push_values(chunk, |mut row, r| {
                row.push_bind(&r.instance)
                    .push_bind(r.seq)
                    .push_bind(r.ts_ms)
                    .push_bind(&r.actor)
                    .push_bind(&r.action)
                    .push_bind(&r.tenant)
                    .push_bind(r.kek_version)
                    .push_bind(&r.record_key_ids)
                    .push_bind(&r.outcome)
                    .push_bind(&r.detail)
                    .push_bind(&r.prev_hash)
                    .push_bind(&r.hash);
            });
            insert.push(" ON CONFLICT (instance, seq) DO NOTHING RETURNING instance, seq");
            let inserted: Vec<(String, i64)> =
                insert.build_query_as().fetch_all(&mut *tx).await.map_err(unavailable)?;
            if let Some(refused) = first_not_inserted(chunk, inserted) {
                return Err(StoreError::AuditConflict {
                    instance: refused.instance.clone(),
                    seq: refused.seq,
                });
            }
        }
        if let Some(c) = checkpoint {
            let inserted = sqlx::query(
                "INSERT INTO audit_checkpoints (instance, seq, hash, signature, ts_ms)
                 VALUES (?, ?, ?, ?, ?)",
            )
            .bind(&c.instance)
            .bind(c.seq)
            .bind(&c.hash)
            .bind(&c.signature)
            .bind(c.ts_ms)
            .execute(&mut *tx)
            .await;
            conflict_or(inserted, &c.instance, c.seq)?;
        }
        tx.commit().await.map_err(unavailable)
    }

    async fn last_audit_row(&self, instance: &str) -> Result<Option<AuditRow>, StoreError> {
        sqlx::query(concat!(
            "SELECT ",
            audit_columns!(),
            " FROM audit_events WHERE instance = ? ORDER BY seq DESC LIMIT 1"
        ))
        .bind(instance)
        .fetch_optional(&self.pool)
        .await
        .map_err(unavailable)?
        .as_ref()
        .map(rows::audit_row)
        .transpose()
    }

    async fn audit_checkpoints(
        &self,
        instance: &str,
        after_seq: i64,
        limit: u32,
    ) -> Result<Vec<CheckpointRow>, StoreError> {
        sqlx::query(
            "SELECT instance, seq, hash, signature, ts_ms FROM audit_checkpoints
             WHERE instance = ? AND seq > ? ORDER BY seq LIMIT ?",
        )
        .bind(instance)
        .bind(after_seq)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(unavailable)?
        .iter()
        .map(rows::checkpoint_row)
        .collect()
    }

    async fn last_audit_checkpoint(
        &self,
        instance: &str,
    ) -> Result<Option<CheckpointRow>, StoreError> {
        sqlx::query(
            "SELECT instance, seq, hash, signature, ts_ms FROM audit_checkpoints
             WHERE instance = ? ORDER BY seq DESC LIMIT 1",
        )
        .bind(instance)
        .fetch_optional(&self.pool)
        .await
        .map_err(unavailable)?
        .as_ref()
        .map(rows::checkpoint_row)
        .transpose()
    }

    async fn audit_instances(&self) -> Result<Vec<String>, StoreError> {
        // The recursive walk visits each distinct instance of the (possibly
        // huge) event table through its primary key instead of scanning it.
        sqlx::query_scalar(
            "WITH RECURSIVE walk (instance) AS (
                 SELECT MIN(instance) FROM audit_events
                 UNION ALL
                 SELECT (SELECT MIN(instance) FROM audit_events WHERE instance > walk.instance)
                 FROM walk WHERE walk.instance IS NOT NULL
             )
             SELECT instance FROM walk WHERE instance IS NOT NULL
             UNION SELECT instance FROM audit_checkpoints
             UNION SELECT instance FROM audit_signing_keys
             ORDER BY 1",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(unavailable)
    }

    async fn audit_signing_key(
        &self,
        instance: &str,
    ) -> Result<Option<AuditSigningKeyRecord>, StoreError> {
        sqlx::query(
            "SELECT instance, wrapped, master_key, public_key, created_at
             FROM audit_signing_keys WHERE instance = ?",
        )
        .bind(instance)
        .fetch_optional(&self.pool)
        .await
        .map_err(unavailable)?
        .as_ref()
        .map(rows::signing_key)
        .transpose()
    }

    async fn insert_audit_signing_key(
        &self,
        record: &AuditSigningKeyRecord,
    ) -> Result<AuditSigningKeyRecord, StoreError> {
        let mut tx = self.write_tx().await?;
        require_active_master(&mut tx, record.master).await?;
        sqlx::query(
            "INSERT INTO audit_signing_keys (instance, wrapped, master_key, public_key, created_at)
             VALUES (?, ?, ?, ?, ?) ON CONFLICT (instance) DO NOTHING",
        )
        .bind(&record.instance)
        .bind(&record.wrapped)
        .bind(record.master.0)
        .bind(&record.public_key)
        .bind(record.created_at)
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
        let stored = sqlx::query(
            "SELECT instance, wrapped, master_key, public_key, created_at
             FROM audit_signing_keys WHERE instance = ?",
        )
        .bind(&record.instance)
        .fetch_one(&mut *tx)
        .await
        .map_err(unavailable)?;
        let stored = rows::signing_key(&stored)?;
        tx.commit().await.map_err(unavailable)?;
        Ok(stored)
    }

    /// In-process only: exclusive among all stores of this process open on
    /// the same file. SQLite serves a single key-service instance.
    async fn try_job_lock(&self, job: &str) -> Result<Option<JobLock>, StoreError> {
        let database = std::fs::canonicalize(&self.path).unwrap_or_else(|_| self.path.clone());
        Ok(try_local_job_lock(database, job))
    }

    /// Nothing to do: there are no other replicas to tell.
    async fn notify_tenant_changed(&self, _tenant: &TenantId) -> Result<(), StoreError> {
        Ok(())
    }

    /// `None`: a single instance's own changes invalidate its cache directly.
    async fn subscribe_invalidations(&self) -> Result<Option<Invalidations>, StoreError> {
        Ok(None)
    }
}

/// Most events per `INSERT`: 12 parameters each, well under SQLite's 32,766.
const AUDIT_ROWS_PER_INSERT: usize = 256;

/// How many of `remaining` rows the next `INSERT` takes: 256 while there
/// are that many, then the largest power of two that fits. Every row
/// count is a different SQL text, and sqlx keeps up to 100 prepared
/// statements per connection: with any count from 1 to 256, each
/// connection's cache filled with large multi-row statements (15–18 MiB
/// over four connections, resident for good where memory is locked).
/// Nine sizes keep the cache small and every statement reused.
fn insert_len(remaining: usize) -> usize {
    if remaining >= AUDIT_ROWS_PER_INSERT {
        AUDIT_ROWS_PER_INSERT
    } else {
        // The largest power of two not above `remaining` (0 stays 0).
        remaining.checked_ilog2().map_or(0, |log| 1 << log)
    }
}

/// Maps a unique violation of an audit insert to [`StoreError::AuditConflict`].
fn conflict_or(
    inserted: Result<sqlx::sqlite::SqliteQueryResult, sqlx::Error>,
    instance: &str,
    seq: i64,
) -> Result<(), StoreError> {
    match inserted {
        Ok(_) => Ok(()),
        Err(e) if is_unique_violation(&e) => {
            Err(StoreError::AuditConflict { instance: instance.to_owned(), seq })
        }
        Err(e) => Err(unavailable(e)),
    }
}

fn kek_from_row(row: &SqliteRow) -> Result<KekRecord, StoreError> {
    let state: String = get(row, "state")?;
    let version: i64 = get(row, "version")?;
    Ok(KekRecord {
        version: KekVersion::try_from(version)
            .map_err(|_| StoreError::Corrupt(format!("KEK version {version} out of range")))?,
        state: KekState::from_str(&state)
            .map_err(|()| StoreError::Corrupt(format!("unknown KEK state {state:?}")))?,
        wrapped: get(row, "wrapped")?,
        master: MasterKeyId(get(row, "master_key")?),
        created_at: get(row, "created_at")?,
        state_changed_at: get(row, "state_changed_at")?,
    })
}

fn get<'r, T>(row: &'r SqliteRow, column: &str) -> Result<T, StoreError>
where
    T: sqlx::Decode<'r, Sqlite> + sqlx::Type<Sqlite>,
{
    row.try_get(column).map_err(|e| StoreError::Corrupt(format!("column {column}: {e}")))
}

fn unavailable(e: sqlx::Error) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn is_unique_violation(e: &sqlx::Error) -> bool {
    e.as_database_error().is_some_and(|d| d.is_unique_violation())
}

fn create_private_dir(dir: &Path) -> Result<(), StoreError> {
    let io = |e: std::io::Error| {
        StoreError::Unavailable(format!("data directory {}: {e}", dir.display()))
    };
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io)
    }
    #[cfg(not(unix))]
    {
        std::fs::create_dir_all(dir).map_err(io)
    }
}

fn create_private_file(path: &Path) -> Result<(), StoreError> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(false);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    options
        .open(path)
        .map(drop)
        .map_err(|e| StoreError::Unavailable(format!("keystore file {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::{AUDIT_ROWS_PER_INSERT, insert_len};

    #[test]
    fn audit_inserts_cover_every_row_in_nine_sizes() {
        let mut sizes = BTreeSet::new();
        for rows in 0..=1_000 {
            let (mut rest, mut statements) = (rows, 0);
            while rest > 0 {
                let take = insert_len(rest);
                assert!((1..=rest).contains(&take), "{rows} rows: took {take} of {rest}");
                sizes.insert(take);
                rest -= take;
                statements += 1;
            }
            // 256s, then one statement per set bit of the remainder.
            let remainder = u32::try_from(rows % AUDIT_ROWS_PER_INSERT).unwrap();
            assert_eq!(statements, rows / AUDIT_ROWS_PER_INSERT + remainder.count_ones() as usize);
        }
        assert_eq!(sizes, (0..=8).map(|bit| 1usize << bit).collect::<BTreeSet<_>>());
    }
}
