//! Lifecycle operations of the PostgreSQL keystore: shredding, master keys,
//! usage counters and approvals. Writers of a tenant lock its row first,
//! as in `tenants`.

use sqlx::postgres::PgConnection;

use super::tenants::{begin, kek_from_row, load_tenant, lock_tenant};
use super::{commit_failed, get, notify, unavailable};
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

pub(super) async fn set_rotation_period(
    conn: &mut PgConnection,
    channel: &str,
    id: &TenantId,
    every_secs: Option<i64>,
) -> Result<TenantRecord, StoreError> {
    let mut tx = begin(conn).await?;
    if !lock_tenant(&mut tx, id).await? {
        return Err(StoreError::UnknownTenant(id.clone()));
    }
    sqlx::query("UPDATE tenants SET rotate_every_secs = $1 WHERE id = $2")
        .bind(every_secs)
        .bind(id.as_str())
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
    let record = load_tenant(&mut tx, id).await?;
    notify::notify(&mut *tx, channel, id).await?;
    tx.commit().await.map_err(commit_failed)?;
    record.ok_or_else(|| StoreError::UnknownTenant(id.clone()))
}

pub(super) async fn destroy_keys(
    conn: &mut PgConnection,
    channel: &str,
    id: &TenantId,
    version: Option<KekVersion>,
    now: i64,
) -> Result<TenantRecord, StoreError> {
    let mut tx = begin(conn).await?;
    let record = destroy_in(&mut tx, channel, id, version, now).await?;
    tx.commit().await.map_err(commit_failed)?;
    Ok(record)
}

/// Runs an approved shred: the request locked and checked to be still
/// approved and due, its keys destroyed and the request marked executed, in one
/// transaction.
pub(super) async fn execute_approval(
    conn: &mut PgConnection,
    channel: &str,
    id: &str,
    now: i64,
) -> Result<(Approval, TenantRecord), StoreError> {
    let mut tx = begin(conn).await?;
    let approval = approval_locked(&mut tx, id).await?;
    approval.check_runnable(now)?;
    let record = destroy_in(&mut tx, channel, &approval.tenant, approval.version, now).await?;
    sqlx::query("UPDATE approvals SET state = 'executed', executed_at = $1 WHERE id = $2")
        .bind(now)
        .bind(id)
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
    let executed = approval_locked(&mut tx, id).await?;
    tx.commit().await.map_err(commit_failed)?;
    Ok((executed, record))
}

/// Destroys what [`destroy_keys`] destroys, in `tx`, and announces it.
async fn destroy_in(
    tx: &mut PgConnection,
    channel: &str,
    id: &TenantId,
    version: Option<KekVersion>,
    now: i64,
) -> Result<TenantRecord, StoreError> {
    if !lock_tenant(&mut *tx, id).await? {
        return Err(StoreError::UnknownTenant(id.clone()));
    }
    let tenant =
        load_tenant(&mut *tx, id).await?.ok_or_else(|| StoreError::UnknownTenant(id.clone()))?;
    match version {
        Some(version) => {
            let current = tenant
                .versions
                .iter()
                .find(|v| v.version == version)
                .ok_or_else(|| StoreError::UnknownVersion { tenant: id.clone(), version })?;
            current.state.apply(StateChange::Destroy)?;
            sqlx::query(
                "UPDATE kek_versions SET state = 'destroyed', wrapped = NULL,
                     state_changed_at = CASE WHEN state = 'destroyed' THEN state_changed_at ELSE $1 END
                 WHERE tenant = $2 AND version = $3",
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
                "UPDATE kek_versions SET state = 'destroyed', wrapped = NULL, state_changed_at = $1
                 WHERE tenant = $2 AND state <> 'destroyed'",
            )
            .bind(now)
            .bind(id.as_str())
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
            sqlx::query("UPDATE tenants SET index_root_wrapped = NULL WHERE id = $1")
                .bind(id.as_str())
                .execute(&mut *tx)
                .await
                .map_err(unavailable)?;
        }
    }
    let record = load_tenant(&mut *tx, id).await?;
    notify::notify(&mut *tx, channel, id).await?;
    record.ok_or_else(|| StoreError::UnknownTenant(id.clone()))
}

pub(super) async fn masters(conn: &mut PgConnection) -> Result<Vec<MasterRecord>, StoreError> {
    sqlx::query("SELECT id, kind, key_ref, config, active, created_at FROM master_keys ORDER BY id")
        .fetch_all(conn)
        .await
        .map_err(unavailable)?
        .iter()
        .map(|row| {
            Ok(MasterRecord {
                id: MasterKeyId(get(row, "id")?),
                kind: get(row, "kind")?,
                key_ref: get(row, "key_ref")?,
                config: get(row, "config")?,
                active: get(row, "active")?,
                created_at: get(row, "created_at")?,
            })
        })
        .collect()
}

pub(super) async fn set_master_config(
    conn: &mut PgConnection,
    id: MasterKeyId,
    config: &str,
) -> Result<(), StoreError> {
    let updated = sqlx::query("UPDATE master_keys SET config = $1 WHERE id = $2")
        .bind(config)
        .bind(id.0)
        .execute(conn)
        .await
        .map_err(commit_failed)?;
    if updated.rows_affected() == 0 {
        return Err(StoreError::UnknownMaster(id.0));
    }
    Ok(())
}

pub(super) async fn activate_master(
    conn: &mut PgConnection,
    id: MasterKeyId,
) -> Result<(), StoreError> {
    let mut tx = begin(conn).await?;
    // Serialise activations: two at once would each clear the other's flag
    // before setting their own, and the unique index would refuse one.
    sqlx::query("LOCK TABLE master_keys IN SHARE ROW EXCLUSIVE MODE")
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
    sqlx::query("UPDATE master_keys SET active = false WHERE active AND id <> $1")
        .bind(id.0)
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
    let updated = sqlx::query("UPDATE master_keys SET active = true WHERE id = $1")
        .bind(id.0)
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
    if updated.rows_affected() == 0 {
        return Err(StoreError::UnknownMaster(id.0));
    }
    tx.commit().await.map_err(commit_failed)
}

pub(super) async fn keys_not_under(
    conn: &mut PgConnection,
    master: MasterKeyId,
    limit: u32,
) -> Result<Vec<StoredKey>, StoreError> {
    sqlx::query(
        "SELECT 'kek' AS kind, tenant AS owner, version, master_key, wrapped
           FROM kek_versions WHERE wrapped IS NOT NULL AND master_key <> $1
         UNION ALL
         SELECT 'index_root', id, 1, index_root_master, index_root_wrapped
           FROM tenants WHERE index_root_wrapped IS NOT NULL AND index_root_master <> $1
         UNION ALL
         SELECT 'audit_signing', instance, 1, master_key, wrapped
           FROM audit_signing_keys WHERE master_key <> $1
         LIMIT $2",
    )
    .bind(master.0)
    .bind(i64::from(limit))
    .fetch_all(conn)
    .await
    .map_err(unavailable)?
    .iter()
    .map(rows::stored_key)
    .collect()
}

pub(super) async fn replace_wrapped(
    conn: &mut PgConnection,
    key: &StoredKeyRef,
    from: MasterKeyId,
    wrapped: &[u8],
    to: MasterKeyId,
) -> Result<bool, StoreError> {
    // READ COMMITTED re-checks the WHERE clause after waiting for a
    // concurrent writer of the row, so a shred that commits first wins.
    let query = match key {
        StoredKeyRef::Kek { tenant, version } => sqlx::query(
            "UPDATE kek_versions SET wrapped = $1, master_key = $2
             WHERE tenant = $3 AND version = $4 AND master_key = $5 AND wrapped IS NOT NULL",
        )
        .bind(wrapped)
        .bind(to.0)
        .bind(tenant.as_str())
        .bind(i64::from(*version))
        .bind(from.0),
        StoredKeyRef::IndexRoot { tenant } => sqlx::query(
            "UPDATE tenants SET index_root_wrapped = $1, index_root_master = $2
             WHERE id = $3 AND index_root_master = $4 AND index_root_wrapped IS NOT NULL",
        )
        .bind(wrapped)
        .bind(to.0)
        .bind(tenant.as_str())
        .bind(from.0),
        StoredKeyRef::AuditSigning { instance } => sqlx::query(
            "UPDATE audit_signing_keys SET wrapped = $1, master_key = $2
             WHERE instance = $3 AND master_key = $4",
        )
        .bind(wrapped)
        .bind(to.0)
        .bind(instance.as_str())
        .bind(from.0),
    };
    // Keys move only to the active master: a sweep whose rotation was
    // overtaken by another (its job lock lost) must not move them back.
    let mut tx = begin(conn).await?;
    super::tenants::require_active_master(&mut tx, to).await?;
    let updated = query.execute(&mut *tx).await.map_err(unavailable)?;
    tx.commit().await.map_err(commit_failed)?;
    Ok(updated.rows_affected() == 1)
}

pub(super) async fn keys_per_master(
    conn: &mut PgConnection,
) -> Result<Vec<(MasterKeyId, u64)>, StoreError> {
    sqlx::query(
        "SELECT master, COUNT(*) AS keys FROM (
             SELECT master_key AS master FROM kek_versions WHERE wrapped IS NOT NULL
             UNION ALL
             SELECT index_root_master FROM tenants WHERE index_root_wrapped IS NOT NULL
             UNION ALL
             SELECT master_key FROM audit_signing_keys
         ) k GROUP BY master ORDER BY master",
    )
    .fetch_all(conn)
    .await
    .map_err(unavailable)?
    .iter()
    .map(|row| Ok((MasterKeyId(get(row, "master")?), rows::count(get(row, "keys")?))))
    .collect()
}

pub(super) async fn add_usage(
    conn: &mut PgConnection,
    deltas: &[UsageDelta],
) -> Result<(), StoreError> {
    if deltas.is_empty() {
        return Ok(());
    }
    // Rows are upserted (and so locked) in one order on every replica:
    // two flushes sharing rows in different orders would deadlock.
    let mut sorted: Vec<&UsageDelta> = deltas.iter().collect();
    sorted.sort_by_key(|d| (d.tenant.as_str(), i64::from(d.version), d.hour));
    let mut tx = begin(conn).await?;
    for d in sorted {
        sqlx::query(
            "INSERT INTO kek_usage (tenant, version, hour, issued, unwraps, last_unwrap_at)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (tenant, version, hour) DO UPDATE SET
                 issued = kek_usage.issued + excluded.issued,
                 unwraps = kek_usage.unwraps + excluded.unwraps,
                 last_unwrap_at = GREATEST(kek_usage.last_unwrap_at, excluded.last_unwrap_at)",
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
    tx.commit().await.map_err(commit_failed)
}

pub(super) async fn usage(
    conn: &mut PgConnection,
    id: &TenantId,
    since_hour: i64,
) -> Result<Vec<VersionUsage>, StoreError> {
    let rows = sqlx::query(
        "SELECT v.version, v.state, v.wrapped, v.master_key, v.created_at, v.state_changed_at,
                COALESCE(SUM(u.issued), 0)::bigint AS issued,
                COALESCE(SUM(u.unwraps), 0)::bigint AS unwraps,
                COALESCE(SUM(CASE WHEN u.hour >= $1 THEN u.unwraps ELSE 0 END), 0)::bigint AS recent,
                MAX(u.last_unwrap_at) AS last_unwrap_at
         FROM kek_versions v
         LEFT JOIN kek_usage u ON u.tenant = v.tenant AND u.version = v.version
         WHERE v.tenant = $2
         GROUP BY v.tenant, v.version ORDER BY v.version",
    )
    .bind(since_hour)
    .bind(id.as_str())
    .fetch_all(conn)
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

pub(super) async fn create_approval(
    conn: &mut PgConnection,
    a: &Approval,
) -> Result<(), StoreError> {
    let inserted = sqlx::query(
        "INSERT INTO approvals (id, action, tenant, version, reason, requested_by,
                                requested_at, state)
         VALUES ($1, 'shred', $2, $3, $4, $5, $6, $7)",
    )
    .bind(&a.id)
    .bind(a.tenant.as_str())
    .bind(a.version.map(i64::from))
    .bind(&a.reason)
    .bind(&a.requested_by)
    .bind(a.requested_at)
    .bind(a.state.as_str())
    .execute(conn)
    .await;
    match inserted {
        Err(e) if e.as_database_error().is_some_and(|d| d.is_foreign_key_violation()) => {
            Err(StoreError::UnknownTenant(a.tenant.clone()))
        }
        // One statement, its own transaction: lost with its connection,
        // it may have been made.
        other => other.map(drop).map_err(commit_failed),
    }
}

pub(super) async fn approval(
    conn: &mut PgConnection,
    id: &str,
) -> Result<Option<Approval>, StoreError> {
    sqlx::query(select_approvals!("WHERE id = $1"))
        .bind(id)
        .fetch_optional(conn)
        .await
        .map_err(unavailable)?
        .as_ref()
        .map(rows::approval)
        .transpose()
}

pub(super) async fn approvals(
    conn: &mut PgConnection,
    state: Option<ApprovalState>,
) -> Result<Vec<Approval>, StoreError> {
    sqlx::query(select_approvals!(
        "WHERE $1::text IS NULL OR state = $1
         ORDER BY requested_at, id"
    ))
    .bind(state.map(ApprovalState::as_str))
    .fetch_all(conn)
    .await
    .map_err(unavailable)?
    .iter()
    .map(rows::approval)
    .collect()
}

pub(super) async fn decide_approval(
    conn: &mut PgConnection,
    d: &DecideApproval<'_>,
) -> Result<Approval, StoreError> {
    let mut tx = begin(conn).await?;
    let decided = approval_locked(&mut tx, d.id).await?.decide(d)?;
    sqlx::query(
        "UPDATE approvals SET state = $1, decided_by = $2, decided_at = $3, comment = $4,
                              execute_after = $5
         WHERE id = $6 AND state = 'pending'",
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
    tx.commit().await.map_err(commit_failed)?;
    Ok(decided)
}

pub(super) async fn withdraw_approval(
    conn: &mut PgConnection,
    id: &str,
    from: ApprovalState,
    comment: &str,
) -> Result<Approval, StoreError> {
    let mut tx = begin(conn).await?;
    let updated = sqlx::query(
        "UPDATE approvals SET state = 'rejected', comment = $1
         WHERE id = $2 AND state = $3 AND state IN ('pending', 'approved')",
    )
    .bind(comment)
    .bind(id)
    .bind(from.as_str())
    .execute(&mut *tx)
    .await
    .map_err(unavailable)?;
    let current = approval_locked(&mut tx, id).await?;
    tx.commit().await.map_err(commit_failed)?;
    if updated.rows_affected() == 1 {
        Ok(current)
    } else {
        Err(StoreError::ApprovalNotPending { id: id.to_owned(), state: current.state })
    }
}

/// One request for approval, its row locked until `conn`'s transaction ends.
async fn approval_locked(conn: &mut PgConnection, id: &str) -> Result<Approval, StoreError> {
    sqlx::query(select_approvals!("WHERE id = $1 FOR UPDATE"))
        .bind(id)
        .fetch_optional(conn)
        .await
        .map_err(unavailable)?
        .as_ref()
        .map(rows::approval)
        .transpose()?
        .ok_or_else(|| StoreError::UnknownApproval(id.to_owned()))
}
