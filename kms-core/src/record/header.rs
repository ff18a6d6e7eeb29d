//! The record header carried in the `_kg` member (DESIGN §3.2).
//!
//! ```text
//! record part:  u8 format=1 ‖ u8 alg=1 ‖ u8 len ‖ tenant ‖ u8 len ‖ schema ‖ u32 schema_version
//!               ‖ record_key_id(16) ‖ u16 n ‖ n × (u16 len ‖ json_pointer ‖ u8 mode)
//!               ‖ header_tag(16)
//! key part:     u32 kek_version ‖ wrapped DEK (60)
//! ```
//! Integers are big-endian. The parser is strict and total: one canonical
//! encoding per header (pointers strictly ascending, no trailing bytes,
//! canonical base64), every length bounded, and any input yields either a
//! header or an error, never a panic.

use std::fmt;

use data_encoding::BASE64URL_NOPAD;

use crate::crypto::mac::MacStream;
use crate::crypto::{CannotDecrypt, kdf, sha256};
use crate::dek::{KekVersion, WRAPPED_DEK_LEN, WrappedDek};
use crate::ids::{Name, RecordKeyId, TenantId};
use crate::pointer::{self, MAX_POINTER_LEN};
use crate::schema::FieldMode;
use crate::secret::Key256;

/// Prefix of the `_kg` member's value.
pub const HEADER_PREFIX: &str = "kg1h:";
/// Record format byte.
pub(crate) const FORMAT_V1: u8 = 1;
/// Algorithm byte: AES-256-GCM-SIV, HKDF-SHA256, HMAC-SHA256.
pub(crate) const ALG_AES256_GCM_SIV: u8 = 1;
/// Most protected fields one record may list.
pub const MAX_FIELDS: usize = 4096;
/// Largest decoded header, in bytes.
pub const MAX_HEADER_LEN: usize = 64 * 1024;
/// Header tag length.
pub(crate) const HEADER_TAG_LEN: usize = 16;

const HEADER_TAG_LABEL: &[u8] = b"keygate/v1/header";
const KEY_PART_LEN: usize = 4 + WRAPPED_DEK_LEN;

/// Why a header could not be parsed. Details are for logs; callers should
/// treat every variant as "cannot decrypt".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HeaderError {
    /// Missing the `kg1h:` prefix or not canonical base64url.
    #[error("header is not kg1h: followed by base64url")]
    Encoding,
    /// Longer than [`MAX_HEADER_LEN`] or listing more than [`MAX_FIELDS`] fields.
    #[error("header exceeds its size limits")]
    TooLarge,
    /// Ends before a field it announces.
    #[error("header is truncated")]
    Truncated,
    /// Bytes left over after the key part.
    #[error("header has trailing bytes")]
    TrailingBytes,
    /// Unknown format or algorithm byte.
    #[error("unsupported header format {format} / algorithm {alg}")]
    Unsupported {
        /// Format byte found.
        format: u8,
        /// Algorithm byte found.
        alg: u8,
    },
    /// A field failed validation.
    #[error("invalid header field: {0}")]
    Invalid(&'static str),
}

/// One protected location a header lists (or is to list).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListedField<'h> {
    /// Concrete JSON pointer (array elements by index).
    pub pointer: &'h str,
    /// The field's mode.
    pub mode: FieldMode,
}

/// The protected locations a header lists, sorted by pointer.
///
/// A header holds its pointers in one string, not one string each: a
/// header is parsed for every record read.
#[derive(Clone, Copy)]
pub struct ListedFields<'h> {
    pointers: &'h str,
    fields: &'h [FieldAt],
}

/// Where a listed field's pointer lies in the header's pointer string.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FieldAt {
    start: usize,
    end: usize,
    mode: FieldMode,
}

impl<'h> ListedFields<'h> {
    /// How many.
    pub fn len(&self) -> usize {
        self.fields.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.fields.is_empty()
    }

    /// The `i`th, in pointer order.
    pub fn get(&self, i: usize) -> Option<ListedField<'h>> {
        self.fields.get(i).map(|at| listed(self.pointers, at))
    }

    /// All of them, in pointer order.
    pub fn iter(&self) -> ListedIter<'h> {
        ListedIter { pointers: self.pointers, fields: self.fields.iter() }
    }
}

fn listed<'h>(pointers: &'h str, at: &FieldAt) -> ListedField<'h> {
    ListedField { pointer: pointers.get(at.start..at.end).unwrap_or_default(), mode: at.mode }
}

/// The iterator of [`ListedFields`].
#[derive(Debug, Clone)]
pub struct ListedIter<'h> {
    pointers: &'h str,
    fields: std::slice::Iter<'h, FieldAt>,
}

impl<'h> Iterator for ListedIter<'h> {
    type Item = ListedField<'h>;

    fn next(&mut self) -> Option<ListedField<'h>> {
        self.fields.next().map(|at| listed(self.pointers, at))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.fields.size_hint()
    }
}

impl ExactSizeIterator for ListedIter<'_> {}

impl<'h> IntoIterator for ListedFields<'h> {
    type Item = ListedField<'h>;
    type IntoIter = ListedIter<'h>;
    fn into_iter(self) -> ListedIter<'h> {
        self.iter()
    }
}

impl PartialEq for ListedFields<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.iter().eq(other.iter())
    }
}

impl fmt::Debug for ListedFields<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

/// A header's pointer string and spans.
#[derive(Default, Clone, PartialEq, Eq)]
struct Listing {
    pointers: String,
    fields: Vec<FieldAt>,
}

impl Listing {
    fn with_capacity(n: usize) -> Self {
        // Room for pointers of 16 bytes on average (`/diagnosis/notes`),
        // so that a usual header's pointers fit without growing.
        Self { pointers: String::with_capacity(n * 16), fields: Vec::with_capacity(n) }
    }

    fn push(&mut self, pointer: &str, mode: FieldMode) {
        let start = self.pointers.len();
        self.pointers.push_str(pointer);
        self.fields.push(FieldAt { start, end: self.pointers.len(), mode });
    }

    fn last(&self) -> Option<&str> {
        self.fields.last().and_then(|at| self.pointers.get(at.start..at.end))
    }

    fn view(&self) -> ListedFields<'_> {
        ListedFields { pointers: &self.pointers, fields: &self.fields }
    }
}

/// A parsed (or freshly built) record header.
#[derive(Clone, PartialEq, Eq)]
pub struct RecordHeader {
    tenant: TenantId,
    schema: Name,
    schema_version: u32,
    record_key_id: RecordKeyId,
    fields: Listing,
    kek_version: KekVersion,
    wrapped_dek: WrappedDek,
    /// The exact record-part bytes before the tag: what the tag and the
    /// field AAD are computed over.
    signed: Vec<u8>,
    tag: [u8; HEADER_TAG_LEN],
}

/// What a new header says about its record.
#[derive(Debug)]
pub struct HeaderContents<'a> {
    /// Tenant.
    pub tenant: &'a TenantId,
    /// Schema name.
    pub schema: &'a Name,
    /// Schema version.
    pub schema_version: u32,
    /// The record's DEK id.
    pub record_key_id: RecordKeyId,
    /// Protected locations; must be sorted by pointer, without duplicates.
    pub fields: Vec<ListedField<'a>>,
    /// KEK version the DEK is wrapped under.
    pub kek_version: KekVersion,
    /// The wrapped DEK.
    pub wrapped_dek: WrappedDek,
}

/// A header whose record part is laid out but not yet authenticated: the
/// field ciphertexts (whose AAD depends on the record part) are made first,
/// then the tag, which also covers the deterministic and pseudonym values.
#[derive(Debug)]
pub struct UnsignedHeader {
    header: RecordHeader,
}

impl HeaderContents<'_> {
    /// Lays out the record part. Fails if the fields are not strictly
    /// ascending valid pointers or the header would exceed its limits.
    pub fn layout(self) -> Result<UnsignedHeader, HeaderError> {
        let mut signed = Vec::with_capacity(64 + self.fields.len() * 24);
        signed.push(FORMAT_V1);
        signed.push(ALG_AES256_GCM_SIV);
        push_short(&mut signed, self.tenant.as_str().as_bytes());
        push_short(&mut signed, self.schema.as_str().as_bytes());
        signed.extend_from_slice(&self.schema_version.to_be_bytes());
        signed.extend_from_slice(self.record_key_id.as_bytes());
        if self.fields.len() > MAX_FIELDS {
            return Err(HeaderError::TooLarge);
        }
        let n = u16::try_from(self.fields.len()).map_err(|_| HeaderError::TooLarge)?;
        signed.extend_from_slice(&n.to_be_bytes());
        let mut fields = Listing::with_capacity(self.fields.len());
        for field in &self.fields {
            check_pointer(field.pointer, fields.last())?;
            fields.push(field.pointer, field.mode);
            let len = u16::try_from(field.pointer.len()).map_err(|_| HeaderError::TooLarge)?;
            signed.extend_from_slice(&len.to_be_bytes());
            signed.extend_from_slice(field.pointer.as_bytes());
            signed.push(field.mode as u8);
        }
        if signed.len() + HEADER_TAG_LEN + KEY_PART_LEN > MAX_HEADER_LEN {
            return Err(HeaderError::TooLarge);
        }
        Ok(UnsignedHeader {
            header: RecordHeader {
                tenant: self.tenant.clone(),
                schema: self.schema.clone(),
                schema_version: self.schema_version,
                record_key_id: self.record_key_id,
                fields,
                kek_version: self.kek_version,
                wrapped_dek: self.wrapped_dek,
                signed,
                tag: [0; HEADER_TAG_LEN],
            },
        })
    }
}

impl UnsignedHeader {
    /// Protected locations, sorted by pointer.
    pub fn fields(&self) -> ListedFields<'_> {
        self.header.fields.view()
    }

    /// `SHA-256(record part without tag)`: the prefix of every randomized
    /// field's AAD.
    pub fn field_aad_prefix(&self) -> [u8; 32] {
        self.header.field_aad_prefix()
    }

    /// Computes the header tag with the record's DEK over the record part
    /// and `bound`: the stored strings of the deterministic and pseudonym
    /// fields, in header order.
    pub fn sign(mut self, dek: &Key256, bound: &[&str]) -> RecordHeader {
        let full = tag_mac(dek, &self.header.signed, bound).finish();
        self.header.tag.copy_from_slice(full.get(..HEADER_TAG_LEN).unwrap_or(&[0; HEADER_TAG_LEN]));
        self.header
    }
}

impl RecordHeader {
    /// Parses the `_kg` member's value. Does not authenticate: call
    /// [`RecordHeader::verify`] once the DEK is known.
    pub fn parse(text: &str) -> Result<Self, HeaderError> {
        let body = text.strip_prefix(HEADER_PREFIX).ok_or(HeaderError::Encoding)?;
        if BASE64URL_NOPAD.decode_len(body.len()).map_err(|_| HeaderError::Encoding)?
            > MAX_HEADER_LEN
        {
            return Err(HeaderError::TooLarge);
        }
        let bytes = BASE64URL_NOPAD.decode(body.as_bytes()).map_err(|_| HeaderError::Encoding)?;
        Self::parse_vec(bytes)
    }

    /// Parses decoded header bytes.
    pub fn parse_bytes(bytes: &[u8]) -> Result<Self, HeaderError> {
        if bytes.len() > MAX_HEADER_LEN {
            return Err(HeaderError::TooLarge);
        }
        Self::parse_vec(bytes.to_vec())
    }

    /// Parses decoded header bytes, keeping their record part as `signed`
    /// (no second copy).
    fn parse_vec(mut bytes: Vec<u8>) -> Result<Self, HeaderError> {
        if bytes.len() > MAX_HEADER_LEN {
            return Err(HeaderError::TooLarge);
        }
        let mut r = Reader(&bytes);
        let (format, alg) = (r.u8()?, r.u8()?);
        if format != FORMAT_V1 || alg != ALG_AES256_GCM_SIV {
            return Err(HeaderError::Unsupported { format, alg });
        }
        let tenant =
            TenantId::new(r.short_str()?).map_err(|_| HeaderError::Invalid("tenant id"))?;
        let schema = Name::new(r.short_str()?).map_err(|_| HeaderError::Invalid("schema name"))?;
        let schema_version = r.u32()?;
        if schema_version == 0 {
            return Err(HeaderError::Invalid("schema version 0"));
        }
        let record_key_id = RecordKeyId::from_bytes(r.array()?);
        let n = usize::from(r.u16()?);
        if n > MAX_FIELDS {
            return Err(HeaderError::TooLarge);
        }
        let mut fields = Listing::with_capacity(n.min(64));
        for _ in 0..n {
            let len = usize::from(r.u16()?);
            let pointer = std::str::from_utf8(r.take(len)?)
                .map_err(|_| HeaderError::Invalid("pointer is not UTF-8"))?;
            check_pointer(pointer, fields.last())?;
            let mode = FieldMode::from_byte(r.u8()?).ok_or(HeaderError::Invalid("field mode"))?;
            fields.push(pointer, mode);
        }
        let signed_len = bytes.len() - r.0.len();
        let tag = r.array()?;
        let kek_version = r.u32()?;
        if kek_version == 0 {
            return Err(HeaderError::Invalid("KEK version 0"));
        }
        let wrapped_dek =
            WrappedDek::from_slice(r.take(WRAPPED_DEK_LEN)?).ok_or(HeaderError::Truncated)?;
        if !r.0.is_empty() {
            return Err(HeaderError::TrailingBytes);
        }
        bytes.truncate(signed_len);
        Ok(Self {
            tenant,
            schema,
            schema_version,
            record_key_id,
            fields,
            kek_version,
            wrapped_dek,
            signed: bytes,
            tag,
        })
    }

    /// Checks the header tag with the record's DEK (constant time);
    /// `bound` as for [`UnsignedHeader::sign`].
    pub fn verify(&self, dek: &Key256, bound: &[&str]) -> Result<(), CannotDecrypt> {
        tag_mac(dek, &self.signed, bound).verify_truncated(&self.tag)
    }

    /// The `_kg` member's value.
    pub fn encode(&self) -> String {
        let mut bytes = Vec::with_capacity(self.signed.len() + HEADER_TAG_LEN + KEY_PART_LEN);
        bytes.extend_from_slice(&self.signed);
        bytes.extend_from_slice(&self.tag);
        bytes.extend_from_slice(&self.kek_version.to_be_bytes());
        bytes.extend_from_slice(self.wrapped_dek.as_bytes());
        let mut out =
            String::with_capacity(HEADER_PREFIX.len() + BASE64URL_NOPAD.encode_len(bytes.len()));
        out.push_str(HEADER_PREFIX);
        BASE64URL_NOPAD.encode_append(&bytes, &mut out);
        out
    }

    /// The same header with a new key part (a rewrap). The record part and
    /// its tag are untouched, so field ciphertexts stay valid.
    pub fn with_key_part(&self, kek_version: KekVersion, wrapped_dek: WrappedDek) -> Self {
        Self { kek_version, wrapped_dek, ..self.clone() }
    }

    /// `SHA-256(record part without tag)`: the prefix of every randomized
    /// field's AAD.
    pub(crate) fn field_aad_prefix(&self) -> [u8; 32] {
        sha256(&self.signed)
    }

    /// Tenant.
    pub fn tenant(&self) -> &TenantId {
        &self.tenant
    }
    /// Schema name.
    pub fn schema(&self) -> &Name {
        &self.schema
    }
    /// Schema version.
    pub fn schema_version(&self) -> u32 {
        self.schema_version
    }
    /// The record's DEK id.
    pub fn record_key_id(&self) -> &RecordKeyId {
        &self.record_key_id
    }
    /// Protected locations, sorted by pointer.
    pub fn fields(&self) -> ListedFields<'_> {
        self.fields.view()
    }
    /// KEK version of the wrapped DEK.
    pub fn kek_version(&self) -> KekVersion {
        self.kek_version
    }
    /// The wrapped DEK.
    pub fn wrapped_dek(&self) -> &WrappedDek {
        &self.wrapped_dek
    }
}

impl fmt::Debug for RecordHeader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RecordHeader")
            .field("tenant", &self.tenant)
            .field("schema", &self.schema)
            .field("schema_version", &self.schema_version)
            .field("record_key_id", &self.record_key_id)
            .field("fields", &self.fields.view())
            .field("kek_version", &self.kek_version)
            .finish_non_exhaustive()
    }
}

/// The header tag's MAC over `record part ‖ n × (u32be len ‖ value)`,
/// keyed with the key derived from the record's DEK.
fn tag_mac(dek: &Key256, signed: &[u8], bound: &[&str]) -> MacStream {
    let mut mac = MacStream::new(&kdf::derive(dek, HEADER_TAG_LABEL));
    mac.update(signed);
    for value in bound {
        let len = u32::try_from(value.len()).unwrap_or(u32::MAX);
        mac.update(&len.to_be_bytes());
        mac.update(value.as_bytes());
    }
    mac
}

/// A pointer in a header must be a valid, non-root pointer, strictly after
/// the previous one (bytewise), which makes the encoding canonical.
fn check_pointer(pointer: &str, previous: Option<&str>) -> Result<(), HeaderError> {
    if pointer.len() > MAX_POINTER_LEN {
        return Err(HeaderError::TooLarge);
    }
    pointer::validate(pointer).map_err(|_| HeaderError::Invalid("JSON pointer"))?;
    if previous.is_some_and(|p| p.as_bytes() >= pointer.as_bytes()) {
        return Err(HeaderError::Invalid("pointers not strictly ascending"));
    }
    Ok(())
}

fn push_short(out: &mut Vec<u8>, bytes: &[u8]) {
    // Callers pass validated names of at most 63 bytes.
    out.push(u8::try_from(bytes.len()).unwrap_or(u8::MAX));
    out.extend_from_slice(bytes.get(..usize::from(u8::MAX)).unwrap_or(bytes));
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], HeaderError> {
        let (head, rest) = self.0.split_at_checked(n).ok_or(HeaderError::Truncated)?;
        self.0 = rest;
        Ok(head)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], HeaderError> {
        self.take(N)?.try_into().map_err(|_| HeaderError::Truncated)
    }
    fn u8(&mut self) -> Result<u8, HeaderError> {
        Ok(u8::from_be_bytes(self.array()?))
    }
    fn u16(&mut self) -> Result<u16, HeaderError> {
        Ok(u16::from_be_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32, HeaderError> {
        Ok(u32::from_be_bytes(self.array()?))
    }
    fn short_str(&mut self) -> Result<&'a str, HeaderError> {
        let len = usize::from(self.u8()?);
        std::str::from_utf8(self.take(len)?).map_err(|_| HeaderError::Invalid("name is not UTF-8"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(fields: Vec<ListedField<'_>>) -> (RecordHeader, Key256) {
        let dek = Key256::from_array(&mut [9; 32]);
        let header = HeaderContents {
            tenant: &TenantId::new("onc").unwrap(),
            schema: &Name::new("patient").unwrap(),
            schema_version: 3,
            record_key_id: RecordKeyId::from_bytes([1; 16]),
            fields,
            kek_version: 2,
            wrapped_dek: WrappedDek::from_slice(&[5; 60]).unwrap(),
        }
        .layout()
        .unwrap()
        .sign(&dek, &["kg1d:bound"]);
        (header, dek)
    }

    fn field(pointer: &str, mode: FieldMode) -> ListedField<'_> {
        ListedField { pointer, mode }
    }

    #[test]
    fn round_trip_and_verify() {
        let (h, dek) =
            sample(vec![field("/a", FieldMode::Randomized), field("/b/0", FieldMode::BlindIndex)]);
        let parsed = RecordHeader::parse(&h.encode()).unwrap();
        assert_eq!(parsed, h);
        assert!(parsed.verify(&dek, &["kg1d:bound"]).is_ok());
        assert!(parsed.verify(&dek, &["kg1d:other"]).is_err());
        assert!(parsed.verify(&dek, &[]).is_err());
        assert!(parsed.verify(&Key256::from_array(&mut [8; 32]), &["kg1d:bound"]).is_err());
        assert_eq!(parsed.kek_version(), 2);
        assert_eq!(parsed.schema_version(), 3);
    }

    #[test]
    fn layout_is_the_documented_one() {
        let (h, _) = sample(vec![field("/a", FieldMode::Deterministic)]);
        let bytes = BASE64URL_NOPAD.decode(&h.encode().as_bytes()[HEADER_PREFIX.len()..]).unwrap();
        let mut expected = vec![1, 1, 3];
        expected.extend_from_slice(b"onc");
        expected.push(7);
        expected.extend_from_slice(b"patient");
        expected.extend_from_slice(&[0, 0, 0, 3]);
        expected.extend_from_slice(&[1; 16]);
        expected.extend_from_slice(&[0, 1, 0, 2]);
        expected.extend_from_slice(b"/a");
        expected.push(2);
        assert_eq!(&bytes[..expected.len()], expected.as_slice());
        assert_eq!(bytes.len(), expected.len() + 16 + 4 + 60);
        assert_eq!(&bytes[expected.len() + 16..expected.len() + 20], &[0, 0, 0, 2]);
    }

    #[test]
    fn rejects_non_canonical_and_malformed() {
        let unsorted = HeaderContents {
            tenant: &TenantId::new("t").unwrap(),
            schema: &Name::new("s").unwrap(),
            schema_version: 1,
            record_key_id: RecordKeyId::from_bytes([0; 16]),
            fields: vec![field("/b", FieldMode::Randomized), field("/a", FieldMode::Randomized)],
            kek_version: 1,
            wrapped_dek: WrappedDek::from_slice(&[0; 60]).unwrap(),
        };
        assert_eq!(
            unsorted.layout().map(|_| ()),
            Err(HeaderError::Invalid("pointers not strictly ascending"))
        );
        let (h, _) = sample(vec![field("/a", FieldMode::Randomized)]);
        let bytes = BASE64URL_NOPAD.decode(&h.encode().as_bytes()[HEADER_PREFIX.len()..]).unwrap();
        for cut in 0..bytes.len() {
            assert!(RecordHeader::parse_bytes(&bytes[..cut]).is_err(), "prefix of {cut} bytes");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(RecordHeader::parse_bytes(&longer), Err(HeaderError::TrailingBytes));
        assert_eq!(RecordHeader::parse("kg1x:AAAA"), Err(HeaderError::Encoding));
        assert_eq!(RecordHeader::parse("kg1h:!!"), Err(HeaderError::Encoding));
        let huge = format!("{HEADER_PREFIX}{}", "A".repeat(MAX_HEADER_LEN * 2));
        assert_eq!(RecordHeader::parse(&huge), Err(HeaderError::TooLarge));
        let mut bad_format = bytes.clone();
        bad_format[0] = 2;
        assert!(matches!(
            RecordHeader::parse_bytes(&bad_format),
            Err(HeaderError::Unsupported { .. })
        ));
    }

    #[test]
    fn rewrap_changes_only_the_key_part() {
        let (h, dek) = sample(vec![field("/a", FieldMode::Randomized)]);
        let moved = h.with_key_part(7, WrappedDek::from_slice(&[6; 60]).unwrap());
        let reparsed = RecordHeader::parse(&moved.encode()).unwrap();
        assert_eq!(reparsed.kek_version(), 7);
        assert_eq!(reparsed.field_aad_prefix(), h.field_aad_prefix());
        assert!(reparsed.verify(&dek, &["kg1d:bound"]).is_ok());
    }
}
