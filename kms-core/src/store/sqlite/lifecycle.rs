//! Lifecycle operations of the SQLite keystore: shredding, master keys,
//! usage counters and approvals.

use std::time::Duration;

use sqlx::{Row, SqlitePool};

use super::{SqliteStore, get, kek_from_row, unavailable};
use crate::dek::KekVersion;
use crate::ids::TenantId;
use crate::kek::StateChange;
use crate::store::rows;
use crate::store::{
    Approval, ApprovalState, DecideApproval, MasterKeyId, MasterRecord, StoreError, StoredKey,
    StoredKeyRef, TenantRecord, UsageDelta, VersionUsage,
};

/// `SELECT` of approvals with a `WHERE` clause (a macro so the query stays
/// `&'static str`).
macro_rules! select_approvals {
    ($rest:literal) => {
        concat!(
            "SELECT id, tenant, version, reason, requested_by, requested_at, state, decided_by, \
             decided_at, comment, execute_after, executed_at FROM approvals ",
            $rest
        )
    };
}

/// Waits before each further try to truncate the WAL after a shred.
const WAL_RETRY_DELAYS: [Duration; 6] = [
    Duration::from_secs(1),
    Duration::from_secs(5),
    Duration::from_secs(30),
    Duration::from_secs(120),
    Duration::from_secs(600),
    Duration::from_secs(3600),
];

/// Checkpoints the WAL into the database and truncates it to nothing.
/// `Ok(false)` when a reader's snapshot kept it from finishing: SQLite
/// reports that in the pragma's first column (`busy`), not as an error.
async fn truncate_wal(pool: &SqlitePool) -> Result<bool, sqlx::Error> {
    let row = sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)").fetch_one(pool).await?;
    Ok(row.try_get::<i64, _>(0)? == 0)
}

/// Tries [`truncate_wal`] again until it finishes, for a while.
async fn truncate_wal_later(pool: SqlitePool) {
    for delay in WAL_RETRY_DELAYS {
        tokio::time::sleep(delay).await;
        if pool.is_closed() {
            return;
        }
        if let Ok(true) = truncate_wal(&pool).await {
            tracing::info!("the WAL is truncated: no older copies of shredded keys remain in it");
            return;
        }
    }
    tracing::error!(
        "the WAL could not be truncated after a shred: a reader keeps an old snapshot open; \
         older copies of the erased keys may remain in the -wal file until it is"
    );
}

impl SqliteStore {
    pub(super) async fn set_rotation_period_impl(
        &self,
        id: &TenantId,
        every_secs: Option<i64>,
    ) -> Result<TenantRecord, StoreError> {
        let mut tx = self.write_tx().await?;
        let updated = sqlx::query("UPDATE tenants SET rotate_every_secs = ? WHERE id = ?")
            .bind(every_secs)
            .bind(id.as_str())
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
        if updated.rows_affected() == 0 {
            return Err(StoreError::UnknownTenant(id.clone()));
        }
        let record = self.load_tenant(&mut tx, id).await?;
        tx.commit().await.map_err(unavailable)?;
        record.ok_or_else(|| StoreError::UnknownTenant(id.clone()))
    }

    pub(super) async fn destroy_keys_impl(
        &self,
        id: &TenantId,
        version: Option<KekVersion>,
        now: i64,
    ) -> Result<TenantRecord, StoreError> {
        let mut tx = self.write_tx().await?;
        let record = self.destroy_in(&mut tx, id, version, now).await?;
        tx.commit().await.map_err(unavailable)?;
        self.after_shred().await;
        Ok(record)
    }

    /// Runs an approved shred: the request checked to be still approved,
    /// its keys destroyed and the request marked executed, in one write
    /// transaction.
    pub(super) async fn execute_approval_impl(
        &self,
        id: &str,
        now: i64,
    ) -> Result<(Approval, TenantRecord), StoreError> {
        let mut tx = self.write_tx().await?;
        let approval = approval_in(&mut tx, id).await?;
        approval.check_runnable(now)?;
        let record = self.destroy_in(&mut tx, &approval.tenant, approval.version, now).await?;
        sqlx::query("UPDATE approvals SET state = 'executed', executed_at = ? WHERE id = ?")
            .bind(now)
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
        let executed = approval_in(&mut tx, id).await?;
        tx.commit().await.map_err(unavailable)?;
        self.after_shred().await;
        Ok((executed, record))
    }

    /// Destroys what [`SqliteStore::destroy_keys_impl`] destroys, in `tx`.
    async fn destroy_in(
        &self,
        tx: &mut sqlx::SqliteConnection,
        id: &TenantId,
        version: Option<KekVersion>,
        now: i64,
    ) -> Result<TenantRecord, StoreError> {
        let Some(tenant) = self.load_tenant(&mut *tx, id).await? else {
            return Err(StoreError::UnknownTenant(id.clone()));
        };
        match version {
            Some(version) => {
                let current =
                    tenant.versions.iter().find(|v| v.version == version).ok_or_else(|| {
                        StoreError::UnknownVersion { tenant: id.clone(), version }
                    })?;
                current.state.apply(StateChange::Destroy)?;
                sqlx::query(
                    "UPDATE kek_versions SET state = 'destroyed', wrapped = NULL,
                         state_changed_at = CASE WHEN state = 'destroyed' THEN state_changed_at ELSE ? END
                     WHERE tenant = ? AND version = ?",
                )
                .bind(now)
                .bind(id.as_str())
                .bind(i64::from(version))
                .execute(&mut *tx)
                .await
                .map_err(unavailable)?;
            }
            None => {
                sqlx::query(
                    "UPDATE kek_versions SET state = 'destroyed', wrapped = NULL, state_changed_at = ?
                     WHERE tenant = ? AND state <> 'destroyed'",
                )
                .bind(now)
                .bind(id.as_str())
                .execute(&mut *tx)
                .await
                .map_err(unavailable)?;
                sqlx::query("UPDATE tenants SET index_root_wrapped = NULL WHERE id = ?")
                    .bind(id.as_str())
                    .execute(&mut *tx)
                    .await
                    .map_err(unavailable)?;
            }
        }
        let record = self.load_tenant(&mut *tx, id).await?;
        record.ok_or_else(|| StoreError::UnknownTenant(id.clone()))
    }

    /// After a shred's commit: its erased bytes out of the WAL.
    async fn after_shred(&self) {
        // `secure_delete` zeroed the erased bytes in the pages the
        // transaction wrote; older copies of those pages may sit in the
        // WAL until it is checkpointed and truncated. A reader holding a
        // snapshot from before the shred keeps that from finishing (after
        // the busy timeout); then it is tried again in the background.
        match truncate_wal(&self.pool).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(
                    "a reader holds a snapshot from before the shred: the WAL, which may hold \
                     older copies of the erased keys, is truncated later"
                );
                tokio::spawn(truncate_wal_later(self.pool.clone()));
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not truncate the WAL after shredding; retrying");
                tokio::spawn(truncate_wal_later(self.pool.clone()));
            }
        }
    }

    pub(super) async fn masters_impl(&self) -> Result<Vec<MasterRecord>, StoreError> {
        sqlx::query(
            "SELECT id, kind, key_ref, config, active, created_at FROM master_keys ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(unavailable)?
        .iter()
        .map(|row| {
            Ok(MasterRecord {
                id: MasterKeyId(get(row, "id")?),
                kind: get(row, "kind")?,
                key_ref: get(row, "key_ref")?,
                config: get(row, "config")?,
                active: get::<i64>(row, "active")? == 1,
                created_at: get(row, "created_at")?,
            })
        })
        .collect()
    }

    pub(super) async fn set_master_config_impl(
        &self,
        id: MasterKeyId,
        config: &str,
    ) -> Result<(), StoreError> {
        let updated = sqlx::query("UPDATE master_keys SET config = ? WHERE id = ?")
            .bind(config)
            .bind(id.0)
            .execute(&self.pool)
            .await
            .map_err(unavailable)?;
        if updated.rows_affected() == 0 {
            return Err(StoreError::UnknownMaster(id.0));
        }
        Ok(())
    }

    pub(super) async fn activate_master_impl(&self, id: MasterKeyId) -> Result<(), StoreError> {
        let mut tx = self.write_tx().await?;
        sqlx::query("UPDATE master_keys SET active = 0 WHERE active = 1 AND id <> ?")
            .bind(id.0)
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
        let updated = sqlx::query("UPDATE master_keys SET active = 1 WHERE id = ?")
            .bind(id.0)
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
        if updated.rows_affected() == 0 {
            return Err(StoreError::UnknownMaster(id.0));
        }
        tx.commit().await.map_err(unavailable)
    }

    pub(super) async fn keys_not_under_impl(
        &self,
        master: MasterKeyId,
        limit: u32,
    ) -> Result<Vec<StoredKey>, StoreError> {
        sqlx::query(
            "SELECT 'kek' AS kind, tenant AS owner, version, master_key, wrapped
               FROM kek_versions WHERE wrapped IS NOT NULL AND master_key <> ?1
             UNION ALL
             SELECT 'index_root', id, 1, index_root_master, index_root_wrapped
               FROM tenants WHERE index_root_wrapped IS NOT NULL AND index_root_master <> ?1
             UNION ALL
             SELECT 'audit_signing', instance, 1, master_key, wrapped
               FROM audit_signing_keys WHERE master_key <> ?1
             LIMIT ?2",
        )
        .bind(master.0)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(unavailable)?
        .iter()
        .map(rows::stored_key)
        .collect()
    }

    pub(super) async fn replace_wrapped_impl(
        &self,
        key: &StoredKeyRef,
        from: MasterKeyId,
        wrapped: &[u8],
        to: MasterKeyId,
    ) -> Result<bool, StoreError> {
        let query = match key {
            StoredKeyRef::Kek { tenant, version } => sqlx::query(
                "UPDATE kek_versions SET wrapped = ?, master_key = ?
                 WHERE tenant = ? AND version = ? AND master_key = ? AND wrapped IS NOT NULL",
            )
            .bind(wrapped)
            .bind(to.0)
            .bind(tenant.as_str())
            .bind(i64::from(*version))
            .bind(from.0),
            StoredKeyRef::IndexRoot { tenant } => sqlx::query(
                "UPDATE tenants SET index_root_wrapped = ?, index_root_master = ?
                 WHERE id = ? AND index_root_master = ? AND index_root_wrapped IS NOT NULL",
            )
            .bind(wrapped)
            .bind(to.0)
            .bind(tenant.as_str())
            .bind(from.0),
            StoredKeyRef::AuditSigning { instance } => sqlx::query(
                "UPDATE audit_signing_keys SET wrapped = ?, master_key = ?
                 WHERE instance = ? AND master_key = ?",
            )
            .bind(wrapped)
            .bind(to.0)
            .bind(instance.as_str())
            .bind(from.0),
        };
        let mut tx = self.write_tx().await?;
        // Keys move only to the active master: a sweep whose rotation was
        // overtaken by another must not move them back.
        super::require_active_master(&mut tx, to).await?;
        let updated = query.execute(&mut *tx).await.map_err(unavailable)?;
        tx.commit().await.map_err(unavailable)?;
        Ok(updated.rows_affected() == 1)
    }

    pub(super) async fn keys_per_master_impl(&self) -> Result<Vec<(MasterKeyId, u64)>, StoreError> {
        sqlx::query(
            "SELECT master, COUNT(*) AS keys FROM (
                 SELECT master_key AS master FROM kek_versions WHERE wrapped IS NOT NULL
                 UNION ALL
                 SELECT index_root_master FROM tenants WHERE index_root_wrapped IS NOT NULL
                 UNION ALL
                 SELECT master_key FROM audit_signing_keys
             ) GROUP BY master ORDER BY master",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(unavailable)?
        .iter()
        .map(|row| Ok((MasterKeyId(get(row, "master")?), rows::count(get(row, "keys")?))))
        .collect()
    }

    pub(super) async fn add_usage_impl(&self, deltas: &[UsageDelta]) -> Result<(), StoreError> {
        if deltas.is_empty() {
            return Ok(());
        }
        let mut tx = self.write_tx().await?;
        for d in deltas {
            sqlx::query(
                "INSERT INTO kek_usage (tenant, version, hour, issued, unwraps, last_unwrap_at)
                 VALUES (?, ?, ?, ?, ?, ?)
                 ON CONFLICT (tenant, version, hour) DO UPDATE SET
                     issued = issued + excluded.issued,
                     unwraps = unwraps + excluded.unwraps,
                     last_unwrap_at = MAX(COALESCE(last_unwrap_at, excluded.last_unwrap_at),
                                          COALESCE(excluded.last_unwrap_at, last_unwrap_at))",
            )
            .bind(d.tenant.as_str())
            .bind(i64::from(d.version))
            .bind(d.hour)
            .bind(i64::try_from(d.issued).unwrap_or(i64::MAX))
            .bind(i64::try_from(d.unwraps).unwrap_or(i64::MAX))
            .bind(d.last_unwrap_at)
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
        }
        tx.commit().await.map_err(unavailable)
    }

    pub(super) async fn usage_impl(
        &self,
        id: &TenantId,
        since_hour: i64,
    ) -> Result<Vec<VersionUsage>, StoreError> {
        let rows = sqlx::query(
            "SELECT v.version, v.state, v.wrapped, v.master_key, v.created_at, v.state_changed_at,
                    COALESCE(SUM(u.issued), 0) AS issued,
                    COALESCE(SUM(u.unwraps), 0) AS unwraps,
                    COALESCE(SUM(CASE WHEN u.hour >= ? THEN u.unwraps ELSE 0 END), 0) AS recent,
                    MAX(u.last_unwrap_at) AS last_unwrap_at
             FROM kek_versions v
             LEFT JOIN kek_usage u ON u.tenant = v.tenant AND u.version = v.version
             WHERE v.tenant = ?
             GROUP BY v.version ORDER BY v.version",
        )
        .bind(since_hour)
        .bind(id.as_str())
        .fetch_all(&self.pool)
        .await
        .map_err(unavailable)?;
        if rows.is_empty() {
            return Err(StoreError::UnknownTenant(id.clone()));
        }
        rows.iter()
            .map(|row| {
                let kek = kek_from_row(row)?;
                Ok(VersionUsage {
                    version: kek.version,
                    state: kek.state,
                    created_at: kek.created_at,
                    issued: rows::count(get(row, "issued")?),
                    unwraps: rows::count(get(row, "unwraps")?),
                    recent_unwraps: rows::count(get(row, "recent")?),
                    last_unwrap_at: get(row, "last_unwrap_at")?,
                })
            })
            .collect()
    }

    pub(super) async fn create_approval_impl(&self, a: &Approval) -> Result<(), StoreError> {
        let mut tx = self.write_tx().await?;
        let inserted = sqlx::query(
            "INSERT INTO approvals (id, action, tenant, version, reason, requested_by,
                                    requested_at, state)
             VALUES (?, 'shred', ?, ?, ?, ?, ?, ?)",
        )
        .bind(&a.id)
        .bind(a.tenant.as_str())
        .bind(a.version.map(i64::from))
        .bind(&a.reason)
        .bind(&a.requested_by)
        .bind(a.requested_at)
        .bind(a.state.as_str())
        .execute(&mut *tx)
        .await;
        match inserted {
            Err(e) if is_foreign_key_violation(&e) => {
                return Err(StoreError::UnknownTenant(a.tenant.clone()));
            }
            other => other.map_err(unavailable)?,
        };
        tx.commit().await.map_err(unavailable)
    }

    pub(super) async fn approval_impl(&self, id: &str) -> Result<Option<Approval>, StoreError> {
        sqlx::query(select_approvals!("WHERE id = ?"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(unavailable)?
            .as_ref()
            .map(rows::approval)
            .transpose()
    }

    pub(super) async fn approvals_impl(
        &self,
        state: Option<ApprovalState>,
    ) -> Result<Vec<Approval>, StoreError> {
        sqlx::query(select_approvals!(
            "WHERE ?1 IS NULL OR state = ?1
             ORDER BY requested_at, id"
        ))
        .bind(state.map(ApprovalState::as_str))
        .fetch_all(&self.pool)
        .await
        .map_err(unavailable)?
        .iter()
        .map(rows::approval)
        .collect()
    }

    pub(super) async fn decide_approval_impl(
        &self,
        d: &DecideApproval<'_>,
    ) -> Result<Approval, StoreError> {
        let mut tx = self.write_tx().await?;
        let decided = approval_in(&mut tx, d.id).await?.decide(d)?;
        sqlx::query(
            "UPDATE approvals SET state = ?, decided_by = ?, decided_at = ?, comment = ?,
                                  execute_after = ?
             WHERE id = ? AND state = 'pending'",
        )
        .bind(decided.state.as_str())
        .bind(&decided.decided_by)
        .bind(decided.decided_at)
        .bind(&decided.comment)
        .bind(decided.execute_after)
        .bind(d.id)
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
        tx.commit().await.map_err(unavailable)?;
        Ok(decided)
    }

    pub(super) async fn withdraw_approval_impl(
        &self,
        id: &str,
        from: ApprovalState,
        comment: &str,
    ) -> Result<Approval, StoreError> {
        let mut tx = self.write_tx().await?;
        let updated = sqlx::query(
            "UPDATE approvals SET state = 'rejected', comment = ?
             WHERE id = ? AND state = ? AND state IN ('pending', 'approved')",
        )
        .bind(comment)
        .bind(id)
        .bind(from.as_str())
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
        let current = approval_in(&mut tx, id).await?;
        tx.commit().await.map_err(unavailable)?;
        if updated.rows_affected() == 1 {
            Ok(current)
        } else {
            Err(StoreError::ApprovalNotPending { id: id.to_owned(), state: current.state })
        }
    }
}

/// One request for approval, read in `conn`'s transaction.
async fn approval_in(conn: &mut sqlx::SqliteConnection, id: &str) -> Result<Approval, StoreError> {
    sqlx::query(select_approvals!("WHERE id = ?"))
        .bind(id)
        .fetch_optional(conn)
        .await
        .map_err(unavailable)?
        .as_ref()
        .map(rows::approval)
        .transpose()?
        .ok_or_else(|| StoreError::UnknownApproval(id.to_owned()))
}

fn is_foreign_key_violation(e: &sqlx::Error) -> bool {
    e.as_database_error().is_some_and(|d| d.is_foreign_key_violation())
}
