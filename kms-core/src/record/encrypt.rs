//! Encrypting a record.

use serde_json::Value;

use super::header::{HeaderContents, ListedField};
use super::keys::{FieldKeys, SchemaKeys};
use super::transform::{self, RANDOMIZED_PREFIX, WipedValue};
use super::{BLIND_INDEX_SUFFIX, HEADER_MEMBER, MAX_FIELDS, RecordError};
use crate::crypto::Aead;
use crate::dek::IssuedDek;
use crate::ids::TenantId;
use crate::pointer;
use crate::schema::{FieldMode, FieldSpec, Schema};
use crate::secret::SecretBuf;

/// A protected location found in a record: its concrete pointer and the
/// index of the schema field that matched it.
pub(super) struct Location {
    pub(super) pointer: String,
    pub(super) field: usize,
}

/// Encrypts the protected fields of `record` under `dek` (one fresh DEK per
/// record) and adds the `_kg` header.
///
/// Fields the schema lists but the record lacks are simply not protected
/// (there is nothing to protect); a record that already has `_kg` is
/// refused.
///
/// The DEK is taken by value: one DEK encrypts exactly one record.
pub fn encrypt_record(
    record: Value,
    tenant: &TenantId,
    schema: &Schema,
    keys: &SchemaKeys,
    dek: IssuedDek,
) -> Result<Value, RecordError> {
    // Refused or failed halfway, the record (with whatever plaintext it
    // still holds) is wiped as it drops; encrypted, it is taken out whole.
    let mut plain = WipedValue(record);
    let record = &mut plain.0;
    let object = record.as_object().ok_or(RecordError::NotAnObject)?;
    if object.contains_key(HEADER_MEMBER) {
        return Err(RecordError::AlreadyEncrypted);
    }
    if !keys.is_for(tenant, schema) {
        return Err(RecordError::WrongContext {
            tenant: keys.tenant().to_string(),
            schema: schema.name.to_string(),
            version: schema.version,
        });
    }
    let locations = locate(record, schema)?;
    // Each blind index sibling's pointer, made once and checked before
    // anything is changed.
    let mut siblings: Vec<Option<String>> = Vec::with_capacity(locations.len());
    let mut specs: Vec<(usize, &FieldSpec)> = Vec::with_capacity(locations.len());
    for loc in &locations {
        let spec = field(schema, loc.field)?;
        let sibling = blind_index_sibling(&loc.pointer, spec);
        if let Some(sibling) = &sibling
            && !sibling_is_free(record, sibling)
        {
            return Err(RecordError::ReservedMember { pointer: sibling.clone() });
        }
        siblings.push(sibling);
        specs.push((loc.field, spec));
    }

    let unsigned = HeaderContents {
        tenant,
        schema: &schema.name,
        schema_version: schema.version,
        record_key_id: dek.record_key_id,
        fields: locations
            .iter()
            .zip(&specs)
            .map(|(loc, (_, spec))| ListedField { pointer: &loc.pointer, mode: spec.mode })
            .collect(),
        kek_version: dek.kek_version,
        wrapped_dek: dek.wrapped,
    }
    .layout()
    .map_err(|_| RecordError::TooManyFields)?;

    let aad_prefix = unsigned.field_aad_prefix();
    // Deterministic and pseudonym values are not bound to the record by
    // their own crypto (equality across records is their point), so the
    // header tag covers them.
    let mut bound: Vec<String> = Vec::new();
    let record_aead = Aead::new(dek.dek());
    let mut plaintext = SecretBuf::default();
    let mut aad = Vec::with_capacity(aad_prefix.len() + 64);
    for ((listed, &(index, spec)), sibling) in unsigned.fields().iter().zip(&specs).zip(siblings) {
        let field_keys = keys.field(index);
        // One lookup: the value is taken out and its replacement written
        // back through the same reference.
        let slot = pointer::get_mut(record, listed.pointer).ok_or(RecordError::CannotDecrypt)?;
        let value = WipedValue(std::mem::take(slot));
        plaintext.clear();
        serde_json::to_writer(&mut plaintext, &value.0).map_err(|_| RecordError::NotAnObject)?;
        let plaintext = plaintext.as_slice();
        let (replacement, sibling_token) = match spec.mode {
            FieldMode::Randomized | FieldMode::BlindIndex => {
                aad.clear();
                aad.extend_from_slice(&aad_prefix);
                aad.extend_from_slice(listed.pointer.as_bytes());
                let padding = transform::padding(plaintext.len());
                let mut sealed = Vec::with_capacity(
                    plaintext.len() + padding.len() + crate::crypto::SEAL_OVERHEAD,
                );
                record_aead.seal_random_padded(&aad, plaintext, padding, &mut sealed)?;
                let token = match (field_keys, &spec.blind_index) {
                    (Some(FieldKeys::BlindIndex(key)), Some(bidx)) => {
                        Some(transform::blind_index_with(key, bidx, &value.0))
                    }
                    (_, Some(_)) => return Err(missing(spec)),
                    _ => None,
                };
                (transform::encode_token(RANDOMIZED_PREFIX, &sealed), token)
            }
            FieldMode::Deterministic => {
                let keys = field_keys.ok_or_else(|| missing(spec))?;
                (transform::seal_deterministic(keys, plaintext).ok_or_else(|| missing(spec))?, None)
            }
            FieldMode::Pseudonym => match field_keys {
                Some(FieldKeys::Pseudonym(key)) => (transform::pseudonym_with(key, &value.0), None),
                _ => return Err(missing(spec)),
            },
        };
        // The plaintext `Value` is wiped as it drops here; its serialized
        // copy is in a buffer that wipes itself.
        drop(value);
        if matches!(spec.mode, FieldMode::Deterministic | FieldMode::Pseudonym) {
            bound.push(replacement.clone());
        }
        *slot = Value::String(replacement);
        if let (Some(token), Some(sibling)) = (sibling_token, sibling) {
            insert_sibling(record, &sibling, token);
        }
    }
    let bound: Vec<&str> = bound.iter().map(String::as_str).collect();
    let header = unsigned.sign(dek.dek(), &bound);
    if let Some(object) = record.as_object_mut() {
        object.insert(HEADER_MEMBER.to_owned(), Value::String(header.encode()));
    }
    Ok(std::mem::take(record))
}

/// Every location the schema protects in `record`, sorted by pointer.
pub(super) fn locate(record: &Value, schema: &Schema) -> Result<Vec<Location>, RecordError> {
    let mut locations = Vec::new();
    let mut pointers = Vec::new();
    for (index, spec) in schema.fields.iter().enumerate() {
        pointers.clear();
        let budget = MAX_FIELDS.saturating_sub(locations.len());
        spec.path.expand(record, &mut pointers, budget).map_err(|e| match e {
            crate::pointer::ExpandError::TooMany => RecordError::TooManyFields,
            shape => RecordError::Shape(shape),
        })?;
        locations.extend(pointers.drain(..).map(|pointer| Location { pointer, field: index }));
    }
    locations.sort_unstable_by(|a, b| a.pointer.as_bytes().cmp(b.pointer.as_bytes()));
    Ok(locations)
}

pub(super) fn field(schema: &Schema, index: usize) -> Result<&FieldSpec, RecordError> {
    schema.fields.get(index).ok_or(RecordError::CannotDecrypt)
}

/// The pointer of a blind index field's `<name>_bidx` sibling.
pub(super) fn blind_index_sibling(pointer: &str, spec: &FieldSpec) -> Option<String> {
    spec.blind_index.as_ref()?;
    // The schema guarantees the last token is a member name, so appending
    // the suffix to the concrete pointer names the sibling member.
    Some(format!("{pointer}{BLIND_INDEX_SUFFIX}"))
}

/// Whether the sibling member can be added: its parent is an object that
/// does not have it yet (one lookup).
fn sibling_is_free(record: &Value, sibling: &str) -> bool {
    let Some((parent, name)) = sibling.rsplit_once('/') else {
        return false;
    };
    let parent = pointer::get(record, parent);
    match parent {
        Some(Value::Object(map)) => !map.contains_key(pointer::unescape_token(name).as_ref()),
        _ => false,
    }
}

fn insert_sibling(record: &mut Value, sibling: &str, token: String) {
    let Some((parent, name)) = sibling.rsplit_once('/') else {
        return;
    };
    let name = pointer::unescape_token(name).into_owned();
    let parent = pointer::get_mut(record, parent);
    if let Some(Value::Object(map)) = parent {
        map.insert(name, Value::String(token));
    }
}

fn missing(spec: &FieldSpec) -> RecordError {
    let purpose = super::keys::IndexPurpose::for_mode(spec.mode)
        .first()
        .copied()
        .unwrap_or(super::keys::IndexPurpose::BlindIndex);
    RecordError::MissingKey(super::keys::MissingFieldKey {
        path: spec.path.as_str().to_owned(),
        purpose,
    })
}

/// Removes a member from its parent object, returning it.
pub(super) fn remove_member(record: &mut Value, pointer: &str) -> Option<Value> {
    let (parent, name) = pointer.rsplit_once('/')?;
    let name = pointer::unescape_token(name);
    let parent = pointer::get_mut(record, parent);
    match parent {
        Some(Value::Object(map)) => map.remove(name.as_ref()),
        _ => None,
    }
}
