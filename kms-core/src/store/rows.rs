//! Row decoding both SQL stores share: the same columns decode the same way
//! whatever the database, so one generic function serves each row shape.

use std::collections::HashMap;
use std::str::FromStr;

use sqlx::{ColumnIndex, Decode, Row, Type};

use super::{
    Approval, ApprovalState, AuditRow, AuditSigningKeyRecord, CheckpointRow, MasterKeyId,
    StoreError, StoredKey, StoredKeyRef,
};
use crate::dek::KekVersion;
use crate::ids::TenantId;

/// One column, or [`StoreError::Corrupt`] naming it.
pub(super) fn column<'r, R, T>(row: &'r R, name: &str) -> Result<T, StoreError>
where
    R: Row,
    for<'a> &'a str: ColumnIndex<R>,
    T: Decode<'r, R::Database> + Type<R::Database>,
{
    row.try_get(name).map_err(|e| StoreError::Corrupt(format!("column {name}: {e}")))
}

/// A row of `approvals`.
pub(super) fn approval<'r, R>(row: &'r R) -> Result<Approval, StoreError>
where
    R: Row,
    for<'a> &'a str: ColumnIndex<R>,
    String: Decode<'r, R::Database> + Type<R::Database>,
    Option<String>: Decode<'r, R::Database> + Type<R::Database>,
    i64: Decode<'r, R::Database> + Type<R::Database>,
    Option<i64>: Decode<'r, R::Database> + Type<R::Database>,
{
    let state: String = column(row, "state")?;
    let version: Option<i64> = column(row, "version")?;
    Ok(Approval {
        id: column(row, "id")?,
        tenant: tenant(column(row, "tenant")?)?,
        version: version
            .map(KekVersion::try_from)
            .transpose()
            .map_err(|_| StoreError::Corrupt("approval version out of range".into()))?,
        reason: column(row, "reason")?,
        requested_by: column(row, "requested_by")?,
        requested_at: column(row, "requested_at")?,
        state: ApprovalState::from_str(&state)
            .map_err(|()| StoreError::Corrupt(format!("unknown approval state {state:?}")))?,
        decided_by: column(row, "decided_by")?,
        decided_at: column(row, "decided_at")?,
        comment: column(row, "comment")?,
        execute_after: column(row, "execute_after")?,
        executed_at: column(row, "executed_at")?,
    })
}

/// A row of the `keys_not_under` union: `kind, owner, version, master_key,
/// wrapped`.
pub(super) fn stored_key<'r, R>(row: &'r R) -> Result<StoredKey, StoreError>
where
    R: Row,
    for<'a> &'a str: ColumnIndex<R>,
    String: Decode<'r, R::Database> + Type<R::Database>,
    i64: Decode<'r, R::Database> + Type<R::Database>,
    Vec<u8>: Decode<'r, R::Database> + Type<R::Database>,
{
    let kind: String = column(row, "kind")?;
    let owner: String = column(row, "owner")?;
    let key = match kind.as_str() {
        "kek" => {
            let version: i64 = column(row, "version")?;
            StoredKeyRef::Kek {
                tenant: tenant(owner)?,
                version: KekVersion::try_from(version)
                    .map_err(|_| StoreError::Corrupt(format!("KEK version {version}")))?,
            }
        }
        "index_root" => StoredKeyRef::IndexRoot { tenant: tenant(owner)? },
        "audit_signing" => StoredKeyRef::AuditSigning { instance: owner },
        other => return Err(StoreError::Corrupt(format!("unknown stored key kind {other:?}"))),
    };
    Ok(StoredKey {
        key,
        master: MasterKeyId(column(row, "master_key")?),
        wrapped: column(row, "wrapped")?,
    })
}

/// A count from the database.
pub(super) fn count(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

fn tenant(id: String) -> Result<TenantId, StoreError> {
    TenantId::new(id).map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// A row of `audit_events` (the columns of `audit_columns!`).
pub(super) fn audit_row<'r, R>(row: &'r R) -> Result<AuditRow, StoreError>
where
    R: Row,
    for<'a> &'a str: ColumnIndex<R>,
    String: Decode<'r, R::Database> + Type<R::Database>,
    Option<String>: Decode<'r, R::Database> + Type<R::Database>,
    i64: Decode<'r, R::Database> + Type<R::Database>,
    Option<i64>: Decode<'r, R::Database> + Type<R::Database>,
    Vec<u8>: Decode<'r, R::Database> + Type<R::Database>,
{
    Ok(AuditRow {
        instance: column(row, "instance")?,
        seq: column(row, "seq")?,
        ts_ms: column(row, "ts_ms")?,
        actor: column(row, "actor")?,
        action: column(row, "action")?,
        tenant: column(row, "tenant")?,
        kek_version: column(row, "kek_version")?,
        record_key_ids: column(row, "record_key_ids")?,
        outcome: column(row, "outcome")?,
        detail: column(row, "detail")?,
        prev_hash: column(row, "prev_hash")?,
        hash: column(row, "hash")?,
    })
}

/// A row of `audit_checkpoints`.
pub(super) fn checkpoint_row<'r, R>(row: &'r R) -> Result<CheckpointRow, StoreError>
where
    R: Row,
    for<'a> &'a str: ColumnIndex<R>,
    String: Decode<'r, R::Database> + Type<R::Database>,
    i64: Decode<'r, R::Database> + Type<R::Database>,
    Vec<u8>: Decode<'r, R::Database> + Type<R::Database>,
{
    Ok(CheckpointRow {
        instance: column(row, "instance")?,
        seq: column(row, "seq")?,
        hash: column(row, "hash")?,
        signature: column(row, "signature")?,
        ts_ms: column(row, "ts_ms")?,
    })
}

/// A row of `audit_signing_keys`.
pub(super) fn signing_key<'r, R>(row: &'r R) -> Result<AuditSigningKeyRecord, StoreError>
where
    R: Row,
    for<'a> &'a str: ColumnIndex<R>,
    String: Decode<'r, R::Database> + Type<R::Database>,
    i64: Decode<'r, R::Database> + Type<R::Database>,
    Vec<u8>: Decode<'r, R::Database> + Type<R::Database>,
{
    Ok(AuditSigningKeyRecord {
        instance: column(row, "instance")?,
        wrapped: column(row, "wrapped")?,
        master: MasterKeyId(column(row, "master_key")?),
        public_key: column(row, "public_key")?,
        created_at: column(row, "created_at")?,
    })
}

/// The first row of `rows` that `inserted` (a multiset) does not account for.
pub(super) fn first_not_inserted(
    rows: &[AuditRow],
    inserted: Vec<(String, i64)>,
) -> Option<&AuditRow> {
    let mut remaining: HashMap<(String, i64), usize> = HashMap::new();
    for key in inserted {
        *remaining.entry(key).or_default() += 1;
    }
    rows.iter().find(|r| match remaining.get_mut(&(r.instance.clone(), r.seq)) {
        Some(n) if *n > 0 => {
            *n -= 1;
            false
        }
        _ => true,
    })
}
