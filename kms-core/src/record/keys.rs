//! Keys derived from a tenant's index root for the searchable and
//! de-identified field modes (DESIGN §3.3).
//!
//! `K = HKDF-SHA256(index_root, info)` where `info` is the purpose label
//! followed by length-prefixed components (see [`Info`]):
//! - deterministic: `keygate/v1/det-enc` and `keygate/v1/det-nonce` ‖ tenant ‖ schema ‖ path;
//! - blind index: `keygate/v1/bidx` ‖ tenant ‖ schema ‖ path;
//! - pseudonym: `keygate/v1/pseudonym` ‖ tenant ‖ namespace.
//!
//! `path` is the schema's pattern (with `*`), so equal values in different
//! elements of one array give equal tokens.

use crate::crypto::Aead;
use crate::crypto::kdf::{self, Info};
use crate::crypto::mac::MacKey;
use crate::ids::{Name, TenantId};
use crate::pointer::PathPattern;
use crate::schema::{FieldMode, FieldSpec, Schema};
use crate::secret::Key256;

/// What a derived key is for. The label is part of the record format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IndexPurpose {
    /// Encryption key of a deterministic field.
    DeterministicEncryption,
    /// MAC key that makes a deterministic field's nonce.
    DeterministicNonce,
    /// MAC key of a blind index.
    BlindIndex,
    /// MAC key of a pseudonym namespace.
    Pseudonym,
}

impl IndexPurpose {
    /// The HKDF label.
    pub fn label(self) -> &'static str {
        match self {
            Self::DeterministicEncryption => "keygate/v1/det-enc",
            Self::DeterministicNonce => "keygate/v1/det-nonce",
            Self::BlindIndex => "keygate/v1/bidx",
            Self::Pseudonym => "keygate/v1/pseudonym",
        }
    }

    /// The purposes a field of this mode needs keys for.
    pub fn for_mode(mode: FieldMode) -> &'static [IndexPurpose] {
        match mode {
            FieldMode::Randomized => &[],
            FieldMode::Deterministic => &[Self::DeterministicEncryption, Self::DeterministicNonce],
            FieldMode::BlindIndex => &[Self::BlindIndex],
            FieldMode::Pseudonym => &[Self::Pseudonym],
        }
    }
}

/// Derives one field key from the tenant's index root.
pub fn derive_field_key(
    index_root: &Key256,
    tenant: &TenantId,
    schema: &Name,
    field: &FieldSpec,
    purpose: IndexPurpose,
) -> Key256 {
    if purpose == IndexPurpose::Pseudonym {
        // The schema parser always sets a namespace (default: the schema
        // name); fall back to the same default for hand-built specs.
        return derive_pseudonym_key(
            index_root,
            tenant,
            field.namespace.as_ref().unwrap_or(schema),
        );
    }
    derive_path_key(index_root, tenant, schema, &field.path, purpose)
}

/// Derives a deterministic or blind-index key for a schema path (what the
/// key service hands to sidecars, which know the field specs).
pub fn derive_path_key(
    index_root: &Key256,
    tenant: &TenantId,
    schema: &Name,
    path: &PathPattern,
    purpose: IndexPurpose,
) -> Key256 {
    let info = Info::label(purpose.label())
        .part(tenant.as_str().as_bytes())
        .part(schema.as_str().as_bytes())
        .part(path.as_str().as_bytes());
    kdf::derive(index_root, info.as_bytes())
}

/// Derives the key of a pseudonym namespace (the `/v1/pseudonym` endpoint
/// and schema fields with that namespace share it).
pub fn derive_pseudonym_key(index_root: &Key256, tenant: &TenantId, namespace: &Name) -> Key256 {
    let info = Info::label(IndexPurpose::Pseudonym.label())
        .part(tenant.as_str().as_bytes())
        .part(namespace.as_str().as_bytes());
    kdf::derive(index_root, info.as_bytes())
}

/// The keys one field needs, ready to use: the AEAD keyed, the MACs keyed
/// (their pads hashed once per schema, not once per value).
pub(crate) enum FieldKeys {
    Deterministic { enc: Box<Aead>, nonce: MacKey, aad: Vec<u8> },
    BlindIndex(MacKey),
    Pseudonym(MacKey),
}

/// Every derived key one schema version needs, for one tenant.
pub struct SchemaKeys {
    tenant: TenantId,
    schema: Name,
    version: u32,
    /// Aligned with `schema.fields`; `None` for randomized fields.
    fields: Vec<Option<FieldKeys>>,
}

/// A derived key that a schema field needs was not supplied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no {purpose:?} key supplied for field {path}")]
#[non_exhaustive]
pub struct MissingFieldKey {
    /// The field's path pattern.
    pub path: String,
    /// The missing purpose.
    pub purpose: IndexPurpose,
}

impl SchemaKeys {
    /// Derives every key from the index root (what the key service does).
    pub fn derive(index_root: &Key256, tenant: &TenantId, schema: &Schema) -> Self {
        let derived = Self::from_keys(tenant, schema, |field, purpose| {
            Some(derive_field_key(index_root, tenant, &schema.name, field, purpose))
        });
        // `from_keys` fails only when the closure returns None.
        derived.unwrap_or_else(|_| Self::empty(tenant, schema))
    }

    /// Builds the set from keys obtained elsewhere (the sidecar gets them
    /// from the key service); `key_for` is asked once per field and purpose.
    pub fn from_keys(
        tenant: &TenantId,
        schema: &Schema,
        mut key_for: impl FnMut(&FieldSpec, IndexPurpose) -> Option<Key256>,
    ) -> Result<Self, MissingFieldKey> {
        let mut fields = Vec::with_capacity(schema.fields.len());
        for field in &schema.fields {
            let mut get = |purpose| {
                key_for(field, purpose).ok_or_else(|| MissingFieldKey {
                    path: field.path.as_str().to_owned(),
                    purpose,
                })
            };
            fields.push(match field.mode {
                FieldMode::Randomized => None,
                FieldMode::Deterministic => Some(FieldKeys::Deterministic {
                    enc: Box::new(Aead::new(&get(IndexPurpose::DeterministicEncryption)?)),
                    nonce: MacKey::new(&get(IndexPurpose::DeterministicNonce)?),
                    aad: deterministic_aad(tenant, &schema.name, field),
                }),
                FieldMode::BlindIndex => {
                    Some(FieldKeys::BlindIndex(MacKey::new(&get(IndexPurpose::BlindIndex)?)))
                }
                FieldMode::Pseudonym => {
                    Some(FieldKeys::Pseudonym(MacKey::new(&get(IndexPurpose::Pseudonym)?)))
                }
            });
        }
        Ok(Self {
            tenant: tenant.clone(),
            schema: schema.name.clone(),
            version: schema.version,
            fields,
        })
    }

    fn empty(tenant: &TenantId, schema: &Schema) -> Self {
        Self {
            tenant: tenant.clone(),
            schema: schema.name.clone(),
            version: schema.version,
            fields: Vec::new(),
        }
    }

    /// The tenant these keys belong to.
    pub fn tenant(&self) -> &TenantId {
        &self.tenant
    }

    pub(crate) fn is_for(&self, tenant: &TenantId, schema: &Schema) -> bool {
        &self.tenant == tenant && self.schema == schema.name && self.version == schema.version
    }

    pub(crate) fn field(&self, index: usize) -> Option<&FieldKeys> {
        self.fields.get(index).and_then(Option::as_ref)
    }
}

/// `"keygate/v1/det" ‖ tenant ‖ schema ‖ path` (length-prefixed).
fn deterministic_aad(tenant: &TenantId, schema: &Name, field: &FieldSpec) -> Vec<u8> {
    Info::label("keygate/v1/det")
        .part(tenant.as_str().as_bytes())
        .part(schema.as_str().as_bytes())
        .part(field.path.as_str().as_bytes())
        .as_bytes()
        .to_vec()
}
