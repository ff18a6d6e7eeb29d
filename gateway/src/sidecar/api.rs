//! Request bodies of the sidecar API (DESIGN §5).

use kms_core::record::WipedValue;
use kms_core::{Name, TenantId};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;
use utoipa::ToSchema;

use crate::error::ApiError;

/// `POST /v1/encrypt`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct EncryptRequest<'a> {
    #[schema(value_type = String, pattern = "^[a-z0-9][a-z0-9_-]{0,62}$")]
    pub(crate) tenant: TenantId,
    #[schema(value_type = String, pattern = "^[a-z0-9][a-z0-9_-]{0,62}$")]
    pub(crate) schema: Name,
    #[serde(default)]
    pub(crate) schema_version: Option<u32>,
    /// One record (a JSON object); or use `records`.
    #[serde(default, borrow)]
    #[schema(value_type = Option<Object>)]
    pub(crate) record: Option<&'a RawValue>,
    /// Several records (1 to `limits.max_records`); or use `record`.
    #[serde(default, borrow)]
    #[schema(value_type = Option<Vec<Object>>)]
    pub(crate) records: Option<Vec<&'a RawValue>>,
}

/// `POST /v1/decrypt`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct DecryptRequest<'a> {
    /// One record (a JSON object); or use `records`.
    #[serde(default, borrow)]
    #[schema(value_type = Option<Object>)]
    pub(crate) record: Option<&'a RawValue>,
    /// Several records (1 to `limits.max_records`); or use `record`.
    #[serde(default, borrow)]
    #[schema(value_type = Option<Vec<Object>>)]
    pub(crate) records: Option<Vec<&'a RawValue>>,
    #[serde(default)]
    #[schema(value_type = Option<String>, pattern = "^[a-z0-9][a-z0-9_-]{0,62}$")]
    pub(crate) purpose: Option<Name>,
}

/// `POST /v1/rewrap`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RewrapRequest<'a> {
    /// One record (a JSON object); or use `records`.
    #[serde(default, borrow)]
    #[schema(value_type = Option<Object>)]
    pub(crate) record: Option<&'a RawValue>,
    /// Several records (1 to `limits.max_records`); or use `record`.
    #[serde(default, borrow)]
    #[schema(value_type = Option<Vec<Object>>)]
    pub(crate) records: Option<Vec<&'a RawValue>>,
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
    /// The value to search for, as it appears in the record (any JSON).
    // Plaintext: wiped when the request is dropped.
    #[schema(value_type = Value)]
    pub(crate) value: WipedValue,
    /// The purpose of use, as for decrypt. Without `encryptor` on the
    /// tenant, the field must be revealed or masked to the caller for it.
    #[serde(default)]
    #[schema(value_type = Option<String>, pattern = "^[a-z0-9][a-z0-9_-]{0,62}$")]
    pub(crate) purpose: Option<Name>,
}

/// `POST /v1/pseudonym` (only for an identity with `encryptor` on the
/// tenant).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct PseudonymRequest {
    #[schema(value_type = String, pattern = "^[a-z0-9][a-z0-9_-]{0,62}$")]
    pub(crate) tenant: TenantId,
    #[schema(value_type = String, pattern = "^[a-z0-9][a-z0-9_-]{0,62}$")]
    pub(crate) namespace: Name,
    /// The value to pseudonymize (any JSON).
    // Plaintext: wiped when the request is dropped.
    #[schema(value_type = Value)]
    pub(crate) value: WipedValue,
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
/// the answer should use the single form. `body_nesting` is how deeply the
/// request body nests (`ApiBody::nesting`): records inside a body that
/// nests at most one level more than `max_depth` cannot be too deep, and
/// are not measured again.
pub(crate) fn one_or_many<'a>(
    record: Option<&'a RawValue>,
    records: Option<Vec<&'a RawValue>>,
    max: usize,
    max_depth: usize,
    body_nesting: usize,
) -> Result<(Vec<&'a RawValue>, bool), ApiError> {
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
    let measure = body_nesting > max_depth.saturating_add(1);
    if measure && records.iter().any(|r| depth(r.get().as_bytes()) > max_depth) {
        return Err(ApiError::bad_request(
            "json_too_deep",
            format!("records may nest at most {max_depth} levels"),
        ));
    }
    Ok((records, single))
}

/// Nesting depth of a JSON value given as (valid) text: how many arrays
/// and objects enclose its deepest value (a scalar is 0, `{"a":1}` is 1,
/// `{"a":{}}` is 1 too).
fn depth(text: &[u8]) -> usize {
    let (mut deepest, mut open) = (0usize, 0usize);
    let mut rest = text;
    while let Some((&byte, tail)) = rest.split_first() {
        rest = tail;
        match byte {
            b'{' | b'[' => {
                deepest = deepest.max(open);
                open += 1;
            }
            b'}' | b']' => open = open.saturating_sub(1),
            b' ' | b'\t' | b'\n' | b'\r' | b',' | b':' => {}
            // A string (a member name counts with its value, which is as
            // deep) or a scalar is a value at this depth.
            b'"' => {
                deepest = deepest.max(open);
                rest = crate::abuse::after_string(rest);
            }
            _ => deepest = deepest.max(open),
        }
    }
    deepest
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A record one level too deep is refused, whether alone or in a
    /// batch: by the body's own depth check or, where that lets it in
    /// (a single record), by `one_or_many`.
    #[test]
    fn records_too_deep_are_refused_at_the_edge() {
        const MAX: usize = 4;
        let nested = |levels: usize| format!("{}1{}", "[".repeat(levels), "]".repeat(levels));
        for (levels, ok) in [(MAX - 1, true), (MAX, false)] {
            // {"x": [[..1..]]}: the record's depth is levels + 1.
            let record = format!(r#"{{"x":{}}}"#, nested(levels));
            for body in [
                format!(r#"{{"record":{record}}}"#),
                format!(r#"{{"records":[{{"y":1}},{record}]}}"#),
            ] {
                let request: DecryptRequest<'_> = serde_json::from_str(&body).unwrap();
                let nesting = crate::abuse::nesting(body.as_bytes(), MAX + 2);
                let accepted = nesting <= MAX + 2
                    && one_or_many(request.record, request.records, 10, MAX, nesting).is_ok();
                assert_eq!(accepted, ok, "{body}");
                // The single form is the one only `one_or_many` can refuse.
                if body.starts_with(r#"{"record""#) {
                    assert!(nesting <= MAX + 2, "{body}");
                }
            }
        }
    }

    /// The depth of the text is the depth of its tree.
    #[test]
    fn depth_of_text_is_depth_of_tree() {
        fn tree_depth(value: &Value) -> usize {
            match value {
                Value::Array(items) => items.iter().map(|i| 1 + tree_depth(i)).max().unwrap_or(0),
                Value::Object(map) => map.values().map(|v| 1 + tree_depth(v)).max().unwrap_or(0),
                _ => 0,
            }
        }
        let mut cases: Vec<String> = [
            "1",
            "\"a\"",
            "{}",
            "[]",
            "{\"a\":1}",
            "{\"a\":{}}",
            "[[]]",
            "[[1]]",
            "[{},[]]",
            "{\"a\":[1,{\"b\":\"x]}\\\"\"}]}",
            " { \"a\" : [ ] , \"b\" : [ [ ] ] } ",
            "[1,[2,[3,[4]]]]",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        // Seeded random trees of empty and non-empty containers and
        // strings holding brackets and escapes, written compactly.
        fn tree(state: &mut u64, level: usize) -> Value {
            *state ^= *state << 13;
            *state ^= *state >> 7;
            *state ^= *state << 17;
            let width = (*state % 4) as usize;
            match (*state >> 8) % 5 {
                _ if level > 6 => Value::from(1),
                0 => Value::Array((0..width).map(|_| tree(state, level + 1)).collect()),
                1 => Value::Object(
                    (0..width).map(|i| (format!("k{i}]"), tree(state, level + 1))).collect(),
                ),
                2 => Value::from("s[{\\\"}"),
                3 => Value::Null,
                _ => Value::from(7.5),
            }
        }
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        cases.extend((0..2_000).map(|_| tree(&mut state, 0).to_string()));
        let mut deepest = 0;
        for text in cases {
            let value: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(depth(text.as_bytes()), tree_depth(&value), "{text}");
            deepest = deepest.max(tree_depth(&value));
        }
        assert!(deepest >= 5, "the generated trees nest");
    }
}
