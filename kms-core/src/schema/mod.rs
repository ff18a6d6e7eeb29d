//! Schemas: which fields of a record type are protected, and how (DESIGN §3.4).

mod parse;

use std::collections::BTreeMap;
use std::sync::Arc;

pub use self::parse::{BLIND_INDEX_SUFFIX, HEADER_MEMBER, SchemaError};
use crate::ids::Name;
use crate::pointer::PathPattern;

/// How a field is protected. The discriminant is the mode byte stored in
/// record headers, so it is part of the record format and never changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FieldMode {
    /// AEAD under the record's DEK, bound to the record and the path.
    Randomized = 1,
    /// Deterministic AEAD under a tenant+field key: equal values, equal ciphertexts.
    Deterministic = 2,
    /// Randomized, plus a sibling `<name>_bidx` keyed-hash token for search.
    BlindIndex = 3,
    /// Replaced by an irreversible, stable pseudonym.
    Pseudonym = 4,
}

impl FieldMode {
    /// The mode for a header byte, if it names one.
    pub fn from_byte(byte: u8) -> Option<Self> {
        match byte {
            1 => Some(Self::Randomized),
            2 => Some(Self::Deterministic),
            3 => Some(Self::BlindIndex),
            4 => Some(Self::Pseudonym),
            _ => None,
        }
    }

    /// The name used in schema files.
    pub fn name(self) -> &'static str {
        match self {
            Self::Randomized => "randomized",
            Self::Deterministic => "deterministic",
            Self::BlindIndex => "blind_index",
            Self::Pseudonym => "pseudonym",
        }
    }
}

/// Normalization applied before computing a blind index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Normalizer {
    /// No change.
    Exact,
    /// Unicode lowercase.
    Lowercase,
    /// Leading and trailing whitespace removed.
    Trim,
    /// Only the ASCII digits kept (phone numbers, identifiers with separators).
    Digits,
}

/// A masked view shown to callers allowed only the masked form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Mask {
    /// Every letter and digit but the last four replaced by `*`; separators kept
    /// (`123-45-6789` → `***-**-6789`).
    Last4,
    /// First character of the local part and the domain (`j***@example.org`).
    Email,
    /// Only the leading four-digit year of a date (`1984-03-07` → `1984`).
    Year,
    /// Always `***`.
    Redact,
}

/// Blind index parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlindIndexSpec {
    /// Token length in bits (8–256); fewer bits, more false positives, less leakage.
    pub bits: u16,
    /// Applied in order before hashing.
    pub normalize: Vec<Normalizer>,
}

/// One protected field of a schema.
#[derive(Debug, Clone)]
pub struct FieldSpec {
    /// The JSON pointer pattern (may contain `*`).
    pub path: PathPattern,
    /// How it is protected.
    pub mode: FieldMode,
    /// The data class policy decisions are made on (`phi.identifier`, …).
    pub class: String,
    /// The masked view, if the schema defines one.
    pub mask: Option<Mask>,
    /// Present exactly when `mode` is [`FieldMode::BlindIndex`].
    pub blind_index: Option<BlindIndexSpec>,
    /// Pseudonym namespace (defaults to the schema name); present exactly
    /// when `mode` is [`FieldMode::Pseudonym`].
    pub namespace: Option<Name>,
}

/// A record type and its protected fields.
#[derive(Debug, Clone)]
pub struct Schema {
    /// Schema name.
    pub name: Name,
    /// Schema version.
    pub version: u32,
    /// Protected fields, in file order.
    pub fields: Vec<FieldSpec>,
}

impl Schema {
    /// The field spec whose pattern matches a concrete pointer's tokens.
    pub fn field_for(&self, concrete: &[String]) -> Option<&FieldSpec> {
        self.fields.iter().find(|f| f.path.matches(concrete))
    }
}

/// All loaded schemas, by name and version.
#[derive(Debug, Clone, Default)]
pub struct SchemaSet {
    schemas: BTreeMap<(Name, u32), Arc<Schema>>,
}

impl SchemaSet {
    /// Parses one TOML schema file; `source` names it in errors.
    pub fn from_toml(text: &str, source: &str) -> Result<Self, SchemaError> {
        let mut set = Self::default();
        for schema in parse::parse_file(text, source)? {
            set.insert(schema, source)?;
        }
        Ok(set)
    }

    /// Adds every schema of `other`, refusing duplicates.
    pub fn merge(&mut self, other: Self, source: &str) -> Result<(), SchemaError> {
        for schema in other.schemas.into_values() {
            self.insert(Arc::unwrap_or_clone(schema), source)?;
        }
        Ok(())
    }

    fn insert(&mut self, schema: Schema, source: &str) -> Result<(), SchemaError> {
        let key = (schema.name.clone(), schema.version);
        if self.schemas.contains_key(&key) {
            return Err(SchemaError::Invalid {
                file: source.to_owned(),
                schema: format!("{} v{}", schema.name, schema.version),
                field: None,
                reason: "defined twice".to_owned(),
            });
        }
        self.schemas.insert(key, Arc::new(schema));
        Ok(())
    }

    /// A specific version.
    pub fn get(&self, name: &str, version: u32) -> Option<&Arc<Schema>> {
        let name = Name::new(name).ok()?;
        self.schemas.get(&(name, version))
    }

    /// The highest version of a schema (what new records are encrypted with).
    pub fn latest(&self, name: &str) -> Option<&Arc<Schema>> {
        let name = Name::new(name).ok()?;
        self.schemas.range((name.clone(), 0)..=(name, u32::MAX)).next_back().map(|(_, s)| s)
    }

    /// Every loaded schema.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Schema>> {
        self.schemas.values()
    }
}
