//! Audit events, checkpoints and signing keys. Each key-service instance
//! (replica) appends to its own chain, keyed by `(instance, seq)`, so
//! replicas never contend; verifiers read every chain back.

use sqlx::postgres::PgConnection;

use super::tenants::begin;
use super::{commit_failed, unavailable};
use crate::store::rows::{self, first_not_inserted};
use crate::store::{AuditRow, AuditSigningKeyRecord, CheckpointRow, StoreError};

/// The columns of `audit_events`, in the order [`rows::audit_row`] reads
/// them and [`append_batch`] binds them.
macro_rules! audit_columns {
    () => {
        "instance, seq, ts_ms, actor, action, tenant, kek_version, \
         record_key_ids, outcome, detail, prev_hash, hash"
    };
}

const SIGNING_KEY_QUERY: &str = "SELECT instance, wrapped, master_key, public_key, created_at
     FROM audit_signing_keys WHERE instance = $1";

/// Appends all of `rows` and `checkpoint` in one transaction, or nothing.
///
/// The events go in as one `INSERT … SELECT FROM UNNEST(…)` with
/// `ON CONFLICT DO NOTHING RETURNING`: what was not inserted existed
/// already (or twice in the batch), and the first such row, in batch order,
/// is reported as [`StoreError::AuditConflict`] after rolling back — the
/// same row SQLite's row-by-row inserts stop at.
pub(super) async fn append_batch(
    conn: &mut PgConnection,
    rows: &[AuditRow],
    checkpoint: Option<&CheckpointRow>,
) -> Result<(), StoreError> {
    if rows.is_empty() && checkpoint.is_none() {
        return Ok(());
    }
    // Dropping `tx` on any early return rolls the whole batch back.
    let mut tx = begin(conn).await?;
    if !rows.is_empty() {
        let inserted: Vec<(String, i64)> = sqlx::query_as(concat!(
            "INSERT INTO audit_events (",
            audit_columns!(),
            ") SELECT * FROM UNNEST($1::text[], $2::bigint[], $3::bigint[], $4::text[], \
             $5::text[], $6::text[], $7::bigint[], $8::text[], $9::text[], $10::text[], \
             $11::bytea[], $12::bytea[]) \
             ON CONFLICT (instance, seq) DO NOTHING RETURNING instance, seq"
        ))
        .bind(rows.iter().map(|r| r.instance.clone()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.seq).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.ts_ms).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.actor.clone()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.action.clone()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.tenant.clone()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.kek_version).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.record_key_ids.clone()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.outcome.clone()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.detail.clone()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.prev_hash.clone()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.hash.clone()).collect::<Vec<_>>())
        .fetch_all(&mut *tx)
        .await
        .map_err(unavailable)?;
        if let Some(refused) = first_not_inserted(rows, inserted) {
            return Err(StoreError::AuditConflict {
                instance: refused.instance.clone(),
                seq: refused.seq,
            });
        }
    }
    if let Some(c) = checkpoint {
        let inserted: Option<i64> = sqlx::query_scalar(
            "INSERT INTO audit_checkpoints (instance, seq, hash, signature, ts_ms)
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (instance, seq) DO NOTHING RETURNING seq",
        )
        .bind(&c.instance)
        .bind(c.seq)
        .bind(&c.hash)
        .bind(&c.signature)
        .bind(c.ts_ms)
        .fetch_optional(&mut *tx)
        .await
        .map_err(unavailable)?;
        if inserted.is_none() {
            return Err(StoreError::AuditConflict { instance: c.instance.clone(), seq: c.seq });
        }
    }
    tx.commit().await.map_err(commit_failed)
}

pub(super) async fn rows(
    conn: &mut PgConnection,
    instance: &str,
    after: i64,
    limit: u32,
) -> Result<Vec<AuditRow>, StoreError> {
    sqlx::query(concat!(
        "SELECT ",
        audit_columns!(),
        " FROM audit_events WHERE instance = $1 AND seq > $2 ORDER BY seq LIMIT $3"
    ))
    .bind(instance)
    .bind(after)
    .bind(i64::from(limit))
    .fetch_all(conn)
    .await
    .map_err(unavailable)?
    .iter()
    .map(rows::audit_row)
    .collect()
}

pub(super) async fn last_row(
    conn: &mut PgConnection,
    instance: &str,
) -> Result<Option<AuditRow>, StoreError> {
    sqlx::query(concat!(
        "SELECT ",
        audit_columns!(),
        " FROM audit_events WHERE instance = $1 ORDER BY seq DESC LIMIT 1"
    ))
    .bind(instance)
    .fetch_optional(conn)
    .await
    .map_err(unavailable)?
    .as_ref()
    .map(rows::audit_row)
    .transpose()
}

pub(super) async fn checkpoints(
    conn: &mut PgConnection,
    instance: &str,
    after_seq: i64,
    limit: u32,
) -> Result<Vec<CheckpointRow>, StoreError> {
    sqlx::query(
        "SELECT instance, seq, hash, signature, ts_ms FROM audit_checkpoints
         WHERE instance = $1 AND seq > $2 ORDER BY seq LIMIT $3",
    )
    .bind(instance)
    .bind(after_seq)
    .bind(i64::from(limit))
    .fetch_all(conn)
    .await
    .map_err(unavailable)?
    .iter()
    .map(rows::checkpoint_row)
    .collect()
}

pub(super) async fn last_checkpoint(
    conn: &mut PgConnection,
    instance: &str,
) -> Result<Option<CheckpointRow>, StoreError> {
    sqlx::query(
        "SELECT instance, seq, hash, signature, ts_ms FROM audit_checkpoints
         WHERE instance = $1 ORDER BY seq DESC LIMIT 1",
    )
    .bind(instance)
    .fetch_optional(conn)
    .await
    .map_err(unavailable)?
    .as_ref()
    .map(rows::checkpoint_row)
    .transpose()
}

pub(super) async fn instances(conn: &mut PgConnection) -> Result<Vec<String>, StoreError> {
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
    .fetch_all(conn)
    .await
    .map_err(unavailable)
}

pub(super) async fn signing_key(
    conn: &mut PgConnection,
    instance: &str,
) -> Result<Option<AuditSigningKeyRecord>, StoreError> {
    sqlx::query(SIGNING_KEY_QUERY)
        .bind(instance)
        .fetch_optional(conn)
        .await
        .map_err(unavailable)?
        .as_ref()
        .map(rows::signing_key)
        .transpose()
}

/// Insert-if-absent. Under READ COMMITTED a racing insert of the same
/// instance makes `ON CONFLICT DO NOTHING` wait for it, and the following
/// SELECT (a fresh snapshot) sees whichever key won.
pub(super) async fn insert_signing_key(
    conn: &mut PgConnection,
    record: &AuditSigningKeyRecord,
) -> Result<AuditSigningKeyRecord, StoreError> {
    let mut tx = begin(conn).await?;
    super::tenants::require_active_master(&mut tx, record.master).await?;
    sqlx::query(
        "INSERT INTO audit_signing_keys (instance, wrapped, master_key, public_key, created_at)
         VALUES ($1, $2, $3, $4, $5) ON CONFLICT (instance) DO NOTHING",
    )
    .bind(&record.instance)
    .bind(&record.wrapped)
    .bind(record.master.0)
    .bind(&record.public_key)
    .bind(record.created_at)
    .execute(&mut *tx)
    .await
    .map_err(unavailable)?;
    let stored = sqlx::query(SIGNING_KEY_QUERY)
        .bind(&record.instance)
        .fetch_one(&mut *tx)
        .await
        .map_err(unavailable)?;
    let stored = rows::signing_key(&stored)?;
    tx.commit().await.map_err(commit_failed)?;
    Ok(stored)
}
