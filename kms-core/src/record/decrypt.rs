//! Decrypting a record, with per-field need-to-know.

use serde_json::Value;

use super::encrypt::{blind_index_sibling, field, locate, remove_member};
use super::header::RecordHeader;
use super::keys::{FieldKeys, SchemaKeys};
use super::transform::{self, RANDOMIZED_PREFIX, WipedValue};
use super::{HEADER_MEMBER, RecordError};
use crate::crypto::{Aead, ct_eq};
use crate::pointer;
use crate::schema::{FieldMode, FieldSpec, Schema};
use crate::secret::{Key256, SecretBuf};

/// What a caller may see of one field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disclosure {
    /// The plaintext value.
    Reveal,
    /// The schema's masked view (withheld if the field has no mask).
    Mask,
    /// Nothing.
    Withhold,
}

/// What happened to one protected field on decrypt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldOutcome {
    /// The plaintext was returned.
    Revealed,
    /// The masked view was returned.
    Masked,
    /// Removed (object member) or replaced by `null` (array element).
    Withheld,
}

/// One protected field's fate, for the caller and the audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldReport {
    /// Concrete pointer.
    pub pointer: String,
    /// The field's data class.
    pub class: String,
    /// What the caller got.
    pub outcome: FieldOutcome,
}

/// A decrypted record and what was revealed, masked or withheld.
///
/// Its `Debug` shows the field reports only, never the record.
pub struct DecryptedRecord {
    /// The record without `_kg` and blind index members.
    pub record: Value,
    /// One entry per protected field, sorted by pointer.
    pub fields: Vec<FieldReport>,
}

/// An encrypted record whose header has been parsed (not yet authenticated).
///
/// Decryption is two steps because the DEK comes from elsewhere: parse,
/// ask the key service to unwrap [`RecordHeader::wrapped_dek`] for this
/// header's tenant, KEK version and record key id, then [`Self::decrypt`].
pub struct EncryptedRecord {
    header: RecordHeader,
    /// The record without its `_kg` member.
    body: Value,
}

impl std::fmt::Debug for DecryptedRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DecryptedRecord").field("fields", &self.fields).finish_non_exhaustive()
    }
}

impl std::fmt::Debug for EncryptedRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EncryptedRecord").field("header", &self.header).finish_non_exhaustive()
    }
}

impl EncryptedRecord {
    /// Splits off and parses the `_kg` header.
    pub fn parse(mut record: Value) -> Result<Self, RecordError> {
        let object = record.as_object_mut().ok_or(RecordError::NotAnObject)?;
        let header = match object.remove(HEADER_MEMBER) {
            Some(Value::String(text)) => RecordHeader::parse(&text)?,
            Some(_) => return Err(RecordError::CannotDecrypt),
            None => return Err(RecordError::NotEncrypted),
        };
        Ok(Self { header, body: record })
    }

    /// The parsed header.
    pub fn header(&self) -> &RecordHeader {
        &self.header
    }

    /// The record with its key part replaced (a rewrap): field ciphertexts
    /// and the rest of the header are byte-identical.
    pub fn into_rewrapped(mut self, kek_version: u32, wrapped: crate::dek::WrappedDek) -> Value {
        let header = self.header.with_key_part(kek_version, wrapped);
        if let Some(object) = self.body.as_object_mut() {
            object.insert(HEADER_MEMBER.to_owned(), Value::String(header.encode()));
        }
        self.body
    }

    /// Authenticates and decrypts every protected field, then applies
    /// `disclose` to each. Fails as a whole, returning no plaintext, if any
    /// check fails: header tag, tenant/schema, the set of protected
    /// locations (a field added, dropped or moved), any field's ciphertext,
    /// or any blind index.
    pub fn decrypt(
        mut self,
        dek: &Key256,
        schema: &Schema,
        keys: &SchemaKeys,
        disclose: &dyn Fn(&FieldSpec) -> Disclosure,
    ) -> Result<DecryptedRecord, RecordError> {
        let header = &self.header;
        let mut bound = Vec::new();
        for listed in header.fields() {
            if matches!(listed.mode, FieldMode::Deterministic | FieldMode::Pseudonym) {
                match pointer::get(&self.body, listed.pointer) {
                    Some(Value::String(text)) => bound.push(text.as_str()),
                    _ => return Err(RecordError::CannotDecrypt),
                }
            }
        }
        header.verify(dek, &bound)?;
        if header.schema() != &schema.name
            || header.schema_version() != schema.version
            || !keys.is_for(header.tenant(), schema)
        {
            return Err(RecordError::WrongContext {
                tenant: header.tenant().to_string(),
                schema: header.schema().to_string(),
                version: header.schema_version(),
            });
        }
        // The protected locations present now must be exactly those the
        // header lists, with the modes the schema gives them.
        let locations = locate(&self.body, schema).map_err(|e| match e {
            RecordError::Shape(_) => RecordError::CannotDecrypt,
            other => other,
        })?;
        if locations.len() != header.fields().len() {
            return Err(RecordError::CannotDecrypt);
        }
        for (loc, listed) in locations.iter().zip(header.fields()) {
            if loc.pointer != listed.pointer || field(schema, loc.field)?.mode != listed.mode {
                return Err(RecordError::CannotDecrypt);
            }
        }

        let aad_prefix = header.field_aad_prefix();
        let record_aead = Aead::new(dek);
        let mut aad = Vec::with_capacity(64);
        // Each field's token is decoded and opened here, one after another.
        let mut scratch = SecretBuf::with_capacity(256);
        let mut opened = Vec::with_capacity(locations.len());
        for loc in &locations {
            let spec = field(schema, loc.field)?;
            let Some(Value::String(text)) = pointer::get(&self.body, &loc.pointer) else {
                return Err(RecordError::CannotDecrypt);
            };
            let value = match spec.mode {
                FieldMode::Randomized | FieldMode::BlindIndex => {
                    transform::decode_token_into(RANDOMIZED_PREFIX, text, &mut scratch)
                        .ok_or(RecordError::CannotDecrypt)?;
                    aad.clear();
                    aad.extend_from_slice(&aad_prefix);
                    aad.extend_from_slice(loc.pointer.as_bytes());
                    parse_plaintext(record_aead.open_in_place(scratch.as_mut_slice(), &aad)?)?
                }
                FieldMode::Deterministic => {
                    let keys = keys.field(loc.field).ok_or(RecordError::CannotDecrypt)?;
                    parse_plaintext(transform::open_deterministic(keys, text, &mut scratch)?)?
                }
                FieldMode::Pseudonym if transform::is_pseudonym(text) => {
                    WipedValue(Value::String(text.clone()))
                }
                FieldMode::Pseudonym => return Err(RecordError::CannotDecrypt),
            };
            if let Some(sibling) = blind_index_sibling(&loc.pointer, spec) {
                let stored = remove_member(&mut self.body, &sibling);
                let (Some(Value::String(stored)), Some(FieldKeys::BlindIndex(key)), Some(bidx)) =
                    (stored, keys.field(loc.field), &spec.blind_index)
                else {
                    return Err(RecordError::CannotDecrypt);
                };
                let expected = transform::blind_index_with(key, bidx, &value.0);
                if !ct_eq(stored.as_bytes(), expected.as_bytes()) {
                    return Err(RecordError::CannotDecrypt);
                }
            }
            opened.push(value);
        }

        // Every check passed: only now does any plaintext enter the output.
        // Opened values that do not enter it (masked, withheld, or all of
        // them after a failed check above) are wiped as they drop.
        let mut reports = Vec::with_capacity(locations.len());
        for (loc, mut value) in locations.into_iter().zip(opened) {
            let spec = field(schema, loc.field)?;
            let shown = match disclose(spec) {
                Disclosure::Reveal => Some((std::mem::take(&mut value.0), FieldOutcome::Revealed)),
                Disclosure::Mask => spec
                    .mask
                    .map(|mask| (transform::apply_mask(mask, &value.0), FieldOutcome::Masked)),
                Disclosure::Withhold => None,
            };
            let outcome = match shown {
                Some((value, outcome)) => {
                    if let Some(slot) = pointer::get_mut(&mut self.body, &loc.pointer) {
                        *slot = value;
                    }
                    outcome
                }
                None => {
                    withhold(&mut self.body, &loc.pointer);
                    FieldOutcome::Withheld
                }
            };
            reports.push(FieldReport { pointer: loc.pointer, class: spec.class.clone(), outcome });
        }
        Ok(DecryptedRecord { record: self.body, fields: reports })
    }
}

/// Removes an object member; replaces an array element by `null` so that
/// the indices of the others do not shift.
fn withhold(record: &mut Value, location: &str) {
    if remove_member(record, location).is_none()
        && let Some(slot) = pointer::get_mut(record, location)
    {
        *slot = Value::Null;
    }
}

fn parse_plaintext(bytes: &[u8]) -> Result<WipedValue, RecordError> {
    // Authenticated bytes that are not JSON mean a bug or a forged key;
    // either way, fail closed.
    WipedValue::parse(bytes).ok_or(RecordError::CannotDecrypt)
}
