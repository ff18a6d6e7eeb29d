//! The encrypted record format (DESIGN §3.2–3.4).
//!
//! An encrypted record is the original JSON object with each protected
//! field replaced by a string and one added member `_kg` holding the
//! [`RecordHeader`]. Everything here is a pure function of the record and
//! the keys passed in: no network, no storage.

mod decrypt;
mod encrypt;
mod header;
mod index;
mod keys;
mod text;
mod transform;

pub use self::decrypt::{DecryptedRecord, Disclosure, EncryptedRecord, FieldOutcome, FieldReport};
pub use self::encrypt::encrypt_record;
pub use self::header::{
    HEADER_PREFIX, HeaderContents, HeaderError, ListedField, ListedFields, ListedIter, MAX_FIELDS,
    MAX_HEADER_LEN, RecordHeader, UnsignedHeader,
};
pub use self::index::index_token;
pub use self::keys::{
    IndexPurpose, MissingFieldKey, SchemaKeys, derive_field_key, derive_path_key,
    derive_pseudonym_key,
};
pub use self::text::{EncryptedText, TextWorkspace, check_encryptable};
pub use self::transform::{
    BLIND_INDEX_PREFIX, DETERMINISTIC_PREFIX, IndexText, PSEUDONYM_PREFIX, RANDOMIZED_PREFIX,
    WipedValue, apply_mask, blind_index_token, normalize, pseudonym,
};
pub use crate::schema::{BLIND_INDEX_SUFFIX, HEADER_MEMBER};

use crate::crypto::CannotDecrypt;
use crate::crypto::rng::RandomError;

/// A record could not be encrypted or decrypted.
///
/// Authentication failures of any kind (tampered header or field, a field
/// moved, dropped or added, a wrong key or tenant) are all
/// [`RecordError::CannotDecrypt`], which says nothing about which check
/// failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RecordError {
    /// The record is not a JSON object.
    #[error("a record must be a JSON object")]
    NotAnObject,
    /// The record is valid JSON text, but a value in it cannot be read
    /// into a tree (a number out of range, say), which this record needs
    /// (see [`TextWorkspace`]). The detail is serde_json's, without values.
    #[error("the record has a value that cannot be read: {0}")]
    Unreadable(String),
    /// The record already has a `_kg` member.
    #[error("record is already encrypted (it has a {HEADER_MEMBER} member)")]
    AlreadyEncrypted,
    /// The record has no `_kg` member.
    #[error("record is not encrypted (no {HEADER_MEMBER} member)")]
    NotEncrypted,
    /// The `_kg` member is not a valid header. Displays only "cannot
    /// decrypt"; the detail is the error's `source()`, for logs.
    #[error("cannot decrypt")]
    MalformedHeader(#[from] HeaderError),
    /// Authentication failed.
    #[error("cannot decrypt")]
    CannotDecrypt,
    /// The record (authenticated) was encrypted for another tenant or
    /// schema than the keys and schema supplied; not a sign of tampering.
    #[error("record belongs to tenant {tenant}, schema {schema} v{version}")]
    WrongContext {
        /// Tenant named in the header.
        tenant: String,
        /// Schema named in the header.
        schema: String,
        /// Schema version named in the header.
        version: u32,
    },
    /// A member that encryption needs to add is already present.
    #[error("record already has a member at {pointer}, which the blind index needs")]
    ReservedMember {
        /// Where.
        pointer: String,
    },
    /// A value on a protected path is not the array or object the schema
    /// expects, so it cannot be protected (nor left in clear).
    #[error(transparent)]
    Shape(#[from] crate::pointer::ExpandError),
    /// More protected locations than a header can list.
    #[error(
        "record has more than {MAX_FIELDS} protected values, or its header would exceed {MAX_HEADER_LEN} bytes"
    )]
    TooManyFields,
    /// The schema has no field with this path.
    #[error("the schema has no protected field {path}")]
    UnknownField {
        /// The path asked for.
        path: String,
    },
    /// The field is neither deterministic nor blind-indexed.
    #[error("field {path} is not searchable (only deterministic and blind_index fields are)")]
    NotSearchable {
        /// The path asked for.
        path: String,
    },
    /// Derived keys for the schema were not supplied.
    #[error(transparent)]
    MissingKey(#[from] MissingFieldKey),
    /// The OS random number generator failed.
    #[error(transparent)]
    Random(#[from] RandomError),
}

impl From<CannotDecrypt> for RecordError {
    fn from(_: CannotDecrypt) -> Self {
        Self::CannotDecrypt
    }
}
