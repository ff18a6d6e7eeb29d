//! Request bodies of the sidecar API (DESIGN §5).

use kms_core::{Name, TenantId};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use crate::error::ApiError;

/// `POST /v1/encrypt`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct EncryptRequest {
    #[schema(value_type = String, pattern = "^[a-z0-9][a-z0-9_-]{0,62}$")]
    pub(crate) tenant: TenantId,
    #[schema(value_type = String, pattern = "^[a-z0-9][a-z0-9_-]{0,62}$")]
    pub(crate) schema: Name,
    #[serde(default)]
    pub(crate) schema_version: Option<u32>,
    /// One record (a JSON object); or use `records`.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub(crate) record: Option<Value>,
    /// Several records (1 to `limits.max_records`); or use `record`.
    #[serde(default)]
    #[schema(value_type = Option<Vec<Object>>)]
    pub(crate) records: Option<Vec<Value>>,
}

/// `POST /v1/decrypt`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct DecryptRequest {
    /// One record (a JSON object); or use `records`.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub(crate) record: Option<Value>,
    /// Several records (1 to `limits.max_records`); or use `record`.
    #[serde(default)]
    #[schema(value_type = Option<Vec<Object>>)]
    pub(crate) records: Option<Vec<Value>>,
    #[serde(default)]
    #[schema(value_type = Option<String>, pattern = "^[a-z0-9][a-z0-9_-]{0,62}$")]
    pub(crate) purpose: Option<Name>,
}

/// `POST /v1/rewrap`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RewrapRequest {
    /// One record (a JSON object); or use `records`.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub(crate) record: Option<Value>,
    /// Several records (1 to `limits.max_records`); or use `record`.
    #[serde(default)]
    #[schema(value_type = Option<Vec<Object>>)]
    pub(crate) records: Option<Vec<Value>>,
}

/// `POST /v1/index`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct IndexRequest {
    #[schema(value_type = String, pattern = "^[a-z0-9][a-z0-9_-]{0,62}$")]
    pub(crate) tenant: TenantId,
    #[schema(value_type = String, pattern = "^[a-z0-9][a-z0-9_-]{0,62}$")]
    pub(crate) schema: Name,
    #[serde(default)]
    pub(crate) schema_version: Option<u32>,
    pub(crate) path: String,
    pub(crate) value: Value,
}

/// `POST /v1/pseudonym`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct PseudonymRequest {
    #[schema(value_type = String, pattern = "^[a-z0-9][a-z0-9_-]{0,62}$")]
    pub(crate) tenant: TenantId,
    #[schema(value_type = String, pattern = "^[a-z0-9][a-z0-9_-]{0,62}$")]
    pub(crate) namespace: Name,
    pub(crate) value: Value,
}

/// `POST /v1/encrypt` response: `record` or `records`, as sent.
#[derive(Serialize, ToSchema)]
pub(crate) struct EncryptResponse {
    /// The encrypted record (with `_kg`).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub(crate) record: Option<Value>,
    /// The encrypted records, in order.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<Object>>)]
    pub(crate) records: Option<Vec<Value>>,
}

/// `POST /v1/decrypt` response.
#[derive(Serialize, ToSchema)]
pub(crate) struct DecryptResponse {
    /// The record with the fields the policy allows in clear (others masked or withheld).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub(crate) record: Option<Value>,
    /// The records, in order.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<Object>>)]
    pub(crate) records: Option<Vec<Value>>,
    /// Per record: what happened to each protected field.
    pub(crate) report: Vec<RecordReport>,
}

/// What a decrypt did to one record.
#[derive(Serialize, ToSchema)]
pub(crate) struct RecordReport {
    pub(crate) record_key_id: String,
    pub(crate) tenant: String,
    pub(crate) schema: String,
    pub(crate) schema_version: u32,
    pub(crate) kek_version: u32,
    /// The record's key part is not under the tenant's active KEK version.
    pub(crate) stale_key_version: bool,
    pub(crate) fields: Vec<FieldReport>,
}

/// One protected field of a decrypted record.
#[derive(Serialize, ToSchema)]
pub(crate) struct FieldReport {
    pub(crate) pointer: String,
    pub(crate) class: String,
    /// `revealed`, `masked` or `withheld`.
    pub(crate) outcome: String,
    /// Why it was not revealed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) reason: Option<String>,
}

/// `POST /v1/rewrap` response.
#[derive(Serialize, ToSchema)]
pub(crate) struct RewrapResponse {
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub(crate) record: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<Object>>)]
    pub(crate) records: Option<Vec<Value>>,
    /// How many records moved to another KEK version.
    pub(crate) rewrapped: u64,
}

/// `POST /v1/index` response.
#[derive(Serialize, ToSchema)]
pub(crate) struct IndexResponse {
    /// The blind-index or deterministic token to search for.
    pub(crate) token: String,
}

/// `POST /v1/pseudonym` response.
#[derive(Serialize, ToSchema)]
pub(crate) struct PseudonymResponse {
    /// `kgp:` and a base32 id.
    pub(crate) pseudonym: String,
}

/// Exactly one of `record` and `records`; returns the records and whether
/// the answer should use the single form.
pub(crate) fn one_or_many(
    record: Option<Value>,
    records: Option<Vec<Value>>,
    max: usize,
    max_depth: usize,
) -> Result<(Vec<Value>, bool), ApiError> {
    let (records, single) = match (record, records) {
        (Some(r), None) => (vec![r], true),
        (None, Some(rs)) if !rs.is_empty() => (rs, false),
        _ => {
            return Err(ApiError::bad_request(
                "invalid_request",
                "send either \"record\" or a non-empty \"records\" array",
            ));
        }
    };
    if records.len() > max {
        return Err(ApiError::bad_request(
            "too_many_records",
            format!("at most {max} records per request"),
        ));
    }
    if records.iter().any(|r| depth(r) > max_depth) {
        return Err(ApiError::bad_request(
            "json_too_deep",
            format!("records may nest at most {max_depth} levels"),
        ));
    }
    Ok((records, single))
}

/// Nesting depth of a JSON value (a scalar is 0).
fn depth(value: &Value) -> usize {
    let mut deepest = 0;
    let mut stack = vec![(value, 0usize)];
    while let Some((v, d)) = stack.pop() {
        deepest = deepest.max(d);
        match v {
            Value::Array(items) => stack.extend(items.iter().map(|i| (i, d + 1))),
            Value::Object(map) => stack.extend(map.values().map(|i| (i, d + 1))),
            _ => {}
        }
    }
    deepest
}
