//! Query tokens: what an application searches its database with for a
//! deterministic or blind-index field.

use crate::secret::SecretBuf;
use serde_json::Value;

use super::keys::{FieldKeys, SchemaKeys};
use super::{RecordError, transform};
use crate::schema::{FieldMode, Schema};

/// The token equal to what encryption stores for `value` at `path` (the
/// schema's path pattern, e.g. `/email` or `/codes/*`): the deterministic
/// ciphertext, or the blind index sibling's value.
pub fn index_token(
    schema: &Schema,
    keys: &SchemaKeys,
    path: &str,
    value: &Value,
) -> Result<String, RecordError> {
    let (index, spec) = schema
        .fields
        .iter()
        .enumerate()
        .find(|(_, f)| f.path.as_str() == path)
        .ok_or_else(|| RecordError::UnknownField { path: path.to_owned() })?;
    let missing = || RecordError::UnknownField { path: path.to_owned() };
    match (spec.mode, keys.field(index), &spec.blind_index) {
        (FieldMode::Deterministic, Some(field_keys), _) => {
            // A buffer that wipes what it outgrows, and itself.
            let mut plaintext = SecretBuf::default();
            serde_json::to_writer(&mut plaintext, value).map_err(|_| missing())?;
            transform::seal_deterministic(field_keys, plaintext.as_slice()).ok_or_else(missing)
        }
        (FieldMode::BlindIndex, Some(FieldKeys::BlindIndex(key)), Some(bidx)) => {
            Ok(transform::blind_index_with(key, bidx, value))
        }
        _ => Err(RecordError::NotSearchable { path: path.to_owned() }),
    }
}
