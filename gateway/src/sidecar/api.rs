//! Request bodies of the sidecar API (DESIGN §5).

use kms_core::{Name, TenantId};
use serde::Deserialize;
use serde_json::Value;

use crate::error::ApiError;

/// `POST /v1/encrypt`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct EncryptRequest {
    pub(super) tenant: TenantId,
    pub(super) schema: Name,
    #[serde(default)]
    pub(super) schema_version: Option<u32>,
    #[serde(default)]
    pub(super) record: Option<Value>,
    #[serde(default)]
    pub(super) records: Option<Vec<Value>>,
}

/// `POST /v1/decrypt`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct DecryptRequest {
    #[serde(default)]
    pub(super) record: Option<Value>,
    #[serde(default)]
    pub(super) records: Option<Vec<Value>>,
    #[serde(default)]
    pub(super) purpose: Option<Name>,
}

/// `POST /v1/rewrap`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RewrapRequest {
    #[serde(default)]
    pub(super) record: Option<Value>,
    #[serde(default)]
    pub(super) records: Option<Vec<Value>>,
}

/// `POST /v1/index`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct IndexRequest {
    pub(super) tenant: TenantId,
    pub(super) schema: Name,
    #[serde(default)]
    pub(super) schema_version: Option<u32>,
    pub(super) path: String,
    pub(super) value: Value,
}

/// `POST /v1/pseudonym`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PseudonymRequest {
    pub(super) tenant: TenantId,
    pub(super) namespace: Name,
    pub(super) value: Value,
}

/// Exactly one of `record` and `records`; returns the records and whether
/// the answer should use the single form.
pub(super) fn one_or_many(
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
