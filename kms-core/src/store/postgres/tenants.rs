//! Master keys, tenants and KEK versions.
//!
//! Every write of a tenant's versions first locks the tenant's row, so
//! concurrent rotations and state changes of one tenant (from any replica)
//! run one after the other, each seeing what the previous one committed
//! (READ COMMITTED takes a fresh snapshot per statement).

use std::str::FromStr;

use sqlx::postgres::PgRow;
use sqlx::{Connection, PgConnection, Postgres, Transaction};

use super::{commit_failed, get, is_unique_violation, notify, unavailable};
use crate::dek::KekVersion;
use crate::ids::TenantId;
use crate::kek::{KekState, StateChange};
use crate::root::ProviderInfo;
use crate::store::{KekRecord, MasterKeyId, NewTenant, StoreError, TenantRecord};

/// Tenants joined with their versions, ascending (a tenant without
/// versions yields one row of NULL version columns).
macro_rules! tenant_query {
    ($where:literal) => {
        concat!(
            "SELECT t.id, t.created_at AS tenant_created_at, t.index_root_wrapped,
                    t.index_root_master, t.rotate_every_secs, v.version, v.state, v.wrapped, v.master_key,
                    v.created_at, v.state_changed_at
             FROM tenants t LEFT JOIN kek_versions v ON v.tenant = t.id ",
            $where,
            " ORDER BY t.id, v.version"
        )
    };
}

/// One KEK version by tenant and version.
const KEK_QUERY: &str = "SELECT version, state, wrapped, master_key, created_at, state_changed_at
     FROM kek_versions WHERE tenant = $1 AND version = $2";

pub(super) async fn register_master(
    conn: &mut PgConnection,
    info: &ProviderInfo,
) -> Result<MasterKeyId, StoreError> {
    let mut tx = begin(conn).await?;
    sqlx::query(
        "INSERT INTO master_keys (kind, key_ref, created_at)
         VALUES ($1, $2, floor(extract(epoch FROM now()))::bigint)
         ON CONFLICT (kind, key_ref) DO NOTHING",
    )
    .bind(info.kind)
    .bind(&info.key_ref)
    .execute(&mut *tx)
    .await
    .map_err(unavailable)?;
    let id: i64 = sqlx::query_scalar("SELECT id FROM master_keys WHERE kind = $1 AND key_ref = $2")
        .bind(info.kind)
        .bind(&info.key_ref)
        .fetch_one(&mut *tx)
        .await
        .map_err(unavailable)?;
    tx.commit().await.map_err(commit_failed)?;
    Ok(MasterKeyId(id))
}

pub(super) async fn create_tenant(
    conn: &mut PgConnection,
    t: NewTenant,
) -> Result<TenantRecord, StoreError> {
    let mut tx = begin(conn).await?;
    require_active_master(&mut tx, t.master).await?;
    let inserted = sqlx::query(
        "INSERT INTO tenants (id, created_at, index_root_wrapped, index_root_master)
         VALUES ($1, $2, $3, $4)",
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
         VALUES ($1, 1, 'active', $2, $3, $4, $4)",
    )
    .bind(t.id.as_str())
    .bind(&t.kek_wrapped)
    .bind(t.master.0)
    .bind(t.created_at)
    .execute(&mut *tx)
    .await
    .map_err(unavailable)?;
    let record = load_tenant(&mut tx, &t.id).await?;
    tx.commit().await.map_err(commit_failed)?;
    record.ok_or_else(|| StoreError::Corrupt("tenant vanished inside its transaction".into()))
}

pub(super) async fn tenant(
    conn: &mut PgConnection,
    id: &TenantId,
) -> Result<Option<TenantRecord>, StoreError> {
    load_tenant(conn, id).await
}

pub(super) async fn list_tenants(conn: &mut PgConnection) -> Result<Vec<TenantRecord>, StoreError> {
    // One statement, so one consistent snapshot of every tenant.
    let rows = sqlx::query(tenant_query!("")).fetch_all(conn).await.map_err(unavailable)?;
    tenants_from_rows(&rows)
}

pub(super) async fn kek(
    conn: &mut PgConnection,
    id: &TenantId,
    version: KekVersion,
) -> Result<Option<KekRecord>, StoreError> {
    sqlx::query(KEK_QUERY)
        .bind(id.as_str())
        .bind(i64::from(version))
        .fetch_optional(conn)
        .await
        .map_err(unavailable)?
        .as_ref()
        .map(kek_from_row)
        .transpose()
}

pub(super) async fn add_kek_version(
    conn: &mut PgConnection,
    channel: &str,
    id: &TenantId,
    version: KekVersion,
    wrapped: &[u8],
    master: MasterKeyId,
    now: i64,
) -> Result<KekRecord, StoreError> {
    let mut tx = begin(conn).await?;
    if !lock_tenant(&mut tx, id).await? {
        return Err(StoreError::UnknownTenant(id.clone()));
    }
    // A shred adds no version, so the number alone cannot tell a rotation
    // prepared before a shred from one prepared after it. The row lock
    // orders this read after any shred that committed first.
    let shredded: bool =
        sqlx::query_scalar("SELECT index_root_wrapped IS NULL FROM tenants WHERE id = $1")
            .bind(id.as_str())
            .fetch_one(&mut *tx)
            .await
            .map_err(unavailable)?;
    if shredded {
        return Err(StoreError::Shredded(id.clone()));
    }
    require_active_master(&mut tx, master).await?;
    let highest: Option<i64> =
        sqlx::query_scalar("SELECT MAX(version) FROM kek_versions WHERE tenant = $1")
            .bind(id.as_str())
            .fetch_one(&mut *tx)
            .await
            .map_err(unavailable)?;
    let Some(highest) = highest else {
        return Err(StoreError::UnknownTenant(id.clone()));
    };
    if i64::from(version) != highest.saturating_add(1) {
        return Err(StoreError::VersionConflict(id.clone()));
    }
    sqlx::query(
        "UPDATE kek_versions SET state = 'decrypt_only', state_changed_at = $1
         WHERE tenant = $2 AND state = 'active'",
    )
    .bind(now)
    .bind(id.as_str())
    .execute(&mut *tx)
    .await
    .map_err(unavailable)?;
    let inserted = sqlx::query(
        "INSERT INTO kek_versions (tenant, version, state, wrapped, master_key, created_at, state_changed_at)
         VALUES ($1, $2, 'active', $3, $4, $5, $5)",
    )
    .bind(id.as_str())
    .bind(i64::from(version))
    .bind(wrapped)
    .bind(master.0)
    .bind(now)
    .execute(&mut *tx)
    .await;
    match inserted {
        // Unreachable while the row lock serialises writers; the primary
        // key and the one-active index still have the last word.
        Err(e) if is_unique_violation(&e) => return Err(StoreError::VersionConflict(id.clone())),
        other => other.map_err(unavailable)?,
    };
    notify::notify(&mut *tx, channel, id).await?;
    tx.commit().await.map_err(commit_failed)?;
    Ok(KekRecord {
        version,
        state: KekState::Active,
        wrapped: Some(wrapped.to_vec()),
        master,
        created_at: now,
        state_changed_at: now,
    })
}

pub(super) async fn change_kek_state(
    conn: &mut PgConnection,
    channel: &str,
    id: &TenantId,
    version: KekVersion,
    change: StateChange,
    now: i64,
) -> Result<KekRecord, StoreError> {
    let mut tx = begin(conn).await?;
    let unknown = || StoreError::UnknownVersion { tenant: id.clone(), version };
    if !lock_tenant(&mut tx, id).await? {
        return Err(unknown());
    }
    let current = sqlx::query(KEK_QUERY)
        .bind(id.as_str())
        .bind(i64::from(version))
        .fetch_optional(&mut *tx)
        .await
        .map_err(unavailable)?;
    let Some(current) = current.as_ref().map(kek_from_row).transpose()? else {
        return Err(unknown());
    };
    let next = current.state.apply(change)?;
    sqlx::query(
        "UPDATE kek_versions SET state = $1, state_changed_at = $2 WHERE tenant = $3 AND version = $4",
    )
    .bind(next.as_str())
    .bind(now)
    .bind(id.as_str())
    .bind(i64::from(version))
    .execute(&mut *tx)
    .await
    .map_err(unavailable)?;
    notify::notify(&mut *tx, channel, id).await?;
    tx.commit().await.map_err(commit_failed)?;
    Ok(KekRecord { state: next, state_changed_at: now, ..current })
}

/// Refuses new key material under a master that is not the active one.
/// `FOR SHARE` holds the master's row until the transaction ends: a master
/// activation (which locks the table against it) waits for this insert, so
/// a rotation's sweep of keys under the old master, made after the
/// activation, sees it; and an activation that committed first is seen here.
pub(super) async fn require_active_master(
    conn: &mut PgConnection,
    master: MasterKeyId,
) -> Result<(), StoreError> {
    let active: Option<bool> =
        sqlx::query_scalar("SELECT active FROM master_keys WHERE id = $1 FOR SHARE")
            .bind(master.0)
            .fetch_optional(conn)
            .await
            .map_err(unavailable)?;
    match active {
        Some(true) => Ok(()),
        Some(false) => Err(StoreError::MasterNotActive(master.0)),
        None => Err(StoreError::UnknownMaster(master.0)),
    }
}

pub(super) async fn begin(
    conn: &mut PgConnection,
) -> Result<Transaction<'_, Postgres>, StoreError> {
    conn.begin().await.map_err(unavailable)
}

/// Locks the tenant's row until the end of the transaction; `false` if
/// there is no such tenant.
pub(super) async fn lock_tenant(
    conn: &mut PgConnection,
    id: &TenantId,
) -> Result<bool, StoreError> {
    let locked: Option<String> =
        sqlx::query_scalar("SELECT id FROM tenants WHERE id = $1 FOR UPDATE")
            .bind(id.as_str())
            .fetch_optional(conn)
            .await
            .map_err(unavailable)?;
    Ok(locked.is_some())
}

pub(super) async fn load_tenant(
    conn: &mut PgConnection,
    id: &TenantId,
) -> Result<Option<TenantRecord>, StoreError> {
    let rows = sqlx::query(tenant_query!("WHERE t.id = $1"))
        .bind(id.as_str())
        .fetch_all(conn)
        .await
        .map_err(unavailable)?;
    Ok(tenants_from_rows(&rows)?.pop())
}

/// Groups joined rows (ordered by tenant, then version) into tenants.
fn tenants_from_rows(rows: &[PgRow]) -> Result<Vec<TenantRecord>, StoreError> {
    let mut out: Vec<TenantRecord> = Vec::new();
    for row in rows {
        let id: String = get(row, "id")?;
        let same = out.last().is_some_and(|t| t.id.as_str() == id);
        if !same {
            out.push(TenantRecord {
                id: TenantId::new(id).map_err(|e| StoreError::Corrupt(e.to_string()))?,
                created_at: get(row, "tenant_created_at")?,
                index_root_wrapped: get(row, "index_root_wrapped")?,
                index_root_master: MasterKeyId(get(row, "index_root_master")?),
                rotate_every_secs: get(row, "rotate_every_secs")?,
                versions: Vec::new(),
            });
        }
        let has_version = get::<Option<i64>>(row, "version")?.is_some();
        if let (true, Some(tenant)) = (has_version, out.last_mut()) {
            tenant.versions.push(kek_from_row(row)?);
        }
    }
    Ok(out)
}

pub(super) fn kek_from_row(row: &PgRow) -> Result<KekRecord, StoreError> {
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
