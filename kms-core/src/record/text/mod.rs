//! Records as JSON text: encrypted and decrypted without building a
//! `serde_json::Value` tree.
//!
//! The sidecar receives records as text and answers with text; building a
//! tree of every record only to find six values in it, and writing the tree
//! back, was most of its work per record. Here one pass over the text
//! ([`scan`]) finds the protected values, and the answer is written from
//! the pieces of the original text and the new values. The result is the
//! same record format, byte for byte in every protected value and header,
//! as [`encrypt_record`] and [`EncryptedRecord::decrypt`] give; members
//! keep the order they came in (a tree writes them sorted).
//!
//! Records this path does not reproduce exactly (a member name with an
//! escape, a relevant member twice, a value of the wrong shape) and every
//! record that fails to decrypt go through the tree path instead, which
//! gives the answer or the error: errors are always the tree path's.
//!
//! [`encrypt_record`]: super::encrypt_record

mod scan;
mod write;

use serde_json::Value;
use serde_json::value::RawValue;

use self::scan::{Bail, Direction, Event, Scan, Span, Step};
use self::write::Writer;
use super::decrypt::{Disclosure, EncryptedRecord, FieldOutcome, FieldReport};
use super::header::{HeaderContents, ListedField, RecordHeader};
use super::keys::{FieldKeys, SchemaKeys};
use super::transform::{self, DETERMINISTIC_PREFIX, IndexText, RANDOMIZED_PREFIX, WipedValue};
use super::{BLIND_INDEX_SUFFIX, HEADER_MEMBER, RecordError, encrypt_record};
use crate::crypto::{Aead, ct_eq};
use crate::dek::{IssuedDek, KekVersion, WrappedDek};
use crate::ids::TenantId;
use crate::schema::{FieldMode, FieldSpec, Schema};
use crate::secret::{Key256, SecretBuf};

/// Buffers reused from one record to the next; one per thread of work
/// (a request's records, say). Plaintext it held is wiped before reuse
/// and on drop.
#[derive(Default)]
pub struct TextWorkspace {
    scan: Scan,
    /// Header position of each found location (by document order).
    rank: Vec<usize>,
    /// Found locations in header order.
    order: Vec<usize>,
    empty: Vec<bool>,
    sealed: Vec<u8>,
    token: String,
    /// A blind index sibling's token (encrypt) or the expected one (decrypt).
    sibling: String,
    aad: Vec<u8>,
    /// A value's canonical JSON text when it is not its own.
    plaintext: SecretBuf,
    /// Decrypt: every field's plaintext, until all have been checked (a
    /// `SecretBuf`: it grows by wiped moves).
    opened: SecretBuf,
    plains: Vec<Plain>,
    /// Decrypt: what the caller gets of each field, once all are checked.
    shown: Vec<Shown>,
    used: Vec<bool>,
    /// Encrypt: where each bound value went in the output, in header order.
    bound: Vec<Option<(usize, usize)>>,
    /// Decrypt: the last record's field reports.
    reports: Reports,
}

/// Field reports reused from record to record: a report's strings keep
/// their room, so a record of the same shape as the last allocates none.
#[derive(Default)]
struct Reports {
    all: Vec<FieldReport>,
    len: usize,
}

impl Reports {
    fn clear(&mut self) {
        self.len = 0;
    }

    fn push(&mut self, pointer: &str, class: &str, outcome: FieldOutcome) {
        match self.all.get_mut(self.len) {
            Some(report) => {
                report.pointer.clear();
                report.pointer.push_str(pointer);
                report.class.clear();
                report.class.push_str(class);
                report.outcome = outcome;
            }
            None => self.all.push(FieldReport {
                pointer: pointer.to_owned(),
                class: class.to_owned(),
                outcome,
            }),
        }
        self.len += 1;
    }

    fn replace(&mut self, reports: Vec<FieldReport>) {
        self.len = reports.len();
        self.all = reports;
    }

    fn as_slice(&self) -> &[FieldReport] {
        self.all.get(..self.len).unwrap_or_default()
    }
}

impl std::fmt::Debug for TextWorkspace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TextWorkspace(..)")
    }
}

/// Where a decrypted field's JSON text lies.
#[derive(Debug, Clone, Copy)]
enum Plain {
    /// In [`TextWorkspace::opened`].
    Opened(usize, usize),
    /// In the record itself (a pseudonym shows as it is stored).
    Stored(Span),
}

/// An encrypted record, as text, whose header has been found and parsed
/// (not yet authenticated); the text form of [`EncryptedRecord`].
///
/// Its `Debug` shows the header only, never the record: the members a
/// schema does not protect are in clear.
pub struct EncryptedText<'a>(Source<'a>);

impl std::fmt::Debug for EncryptedText<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EncryptedText").field("header", self.header()).finish_non_exhaustive()
    }
}

enum Source<'a> {
    Text {
        text: &'a str,
        header: RecordHeader,
        header_value: Span,
        /// Found from the end: not yet known to be the only `_kg` member.
        unchecked: bool,
    },
    /// A record this path does not handle, as a tree.
    Tree(EncryptedRecord),
}

impl<'a> EncryptedText<'a> {
    /// Finds and parses the `_kg` header.
    ///
    /// It is looked for at the end first, where keygate writes it. Found
    /// there, it is not yet known to be the record's only `_kg` member:
    /// the walk of a decrypt and [`Self::write_rewrapped`] check that
    /// before they rely on it, and fall back to the tree otherwise.
    pub fn parse(record: &'a RawValue) -> Result<Self, RecordError> {
        let text = record.get();
        let found = match scan::last_string_member(text, HEADER_MEMBER, is_header_byte) {
            Some(value) => Some((value, true)),
            None => scan::root_member(text, HEADER_MEMBER).ok().flatten().map(|v| (v, false)),
        };
        if let Some((value, unchecked)) = found
            && let Ok(Ok(header)) = stored_string(text, value).map(RecordHeader::parse)
        {
            return Ok(Self(Source::Text { text, header, header_value: value, unchecked }));
        }
        Ok(Self(Source::Tree(EncryptedRecord::parse(tree(text)?)?)))
    }

    /// The parsed header.
    pub fn header(&self) -> &RecordHeader {
        match &self.0 {
            Source::Text { header, .. } => header,
            Source::Tree(record) => record.header(),
        }
    }

    /// Writes the record with its key part replaced (a rewrap) to `out`:
    /// field ciphertexts and the rest of the header are byte-identical.
    pub fn write_rewrapped(
        self,
        kek_version: KekVersion,
        wrapped: WrappedDek,
        out: &mut SecretBuf,
    ) -> Result<(), RecordError> {
        match self.0 {
            Source::Text { text, header, header_value, unchecked }
                if !unchecked
                    || scan::root_member(text, HEADER_MEMBER) == Ok(Some(header_value)) =>
            {
                let header = header.with_key_part(kek_version, wrapped);
                let bytes = text.as_bytes();
                out.extend_from_slice(bytes.get(..header_value.start).unwrap_or_default());
                out.extend_from_slice(b"\"");
                out.extend_from_slice(header.encode().as_bytes());
                out.extend_from_slice(b"\"");
                out.extend_from_slice(bytes.get(header_value.end..).unwrap_or_default());
                Ok(())
            }
            // The header found at the end is not the only `_kg` member.
            Source::Text { text, .. } => write_tree(
                &EncryptedRecord::parse(tree(text)?)?.into_rewrapped(kek_version, wrapped),
                out,
            ),
            Source::Tree(record) => write_tree(&record.into_rewrapped(kek_version, wrapped), out),
        }
    }
}

/// Whether `byte` may occur in a stored header (`kg1h:` and base64url).
fn is_header_byte(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b':')
}

/// Checks, before any DEK is spent on it, that [`TextWorkspace::encrypt`]
/// can encrypt `record`: a JSON object without a `_kg` member.
pub fn check_encryptable(record: &RawValue) -> Result<(), RecordError> {
    // Most records hold no escape and no `_kg` anywhere: `root_member`
    // then answers without reading their structure.
    match scan::root_member(record.get(), HEADER_MEMBER) {
        Ok(None) => Ok(()),
        Ok(Some(_)) => Err(RecordError::AlreadyEncrypted),
        // The whole plaintext record as a tree: wiped as it drops.
        Err(Bail) => match &WipedValue(tree(record.get())?).0 {
            Value::Object(map) if map.contains_key(HEADER_MEMBER) => {
                Err(RecordError::AlreadyEncrypted)
            }
            Value::Object(_) => Ok(()),
            _ => Err(RecordError::NotAnObject),
        },
    }
}

impl TextWorkspace {
    /// [`encrypt_record`] on text: appends the encrypted record to `out`.
    pub fn encrypt(
        &mut self,
        record: &RawValue,
        tenant: &TenantId,
        schema: &Schema,
        keys: &SchemaKeys,
        dek: IssuedDek,
        out: &mut SecretBuf,
    ) -> Result<(), RecordError> {
        let start = out.len();
        match self.encrypt_text(record.get(), tenant, schema, keys, &dek, out) {
            Ok(()) => Ok(()),
            Err(Fallback::Error(e)) => {
                out.truncate(start);
                Err(e)
            }
            Err(Fallback::Tree) => {
                out.truncate(start);
                let encrypted = encrypt_record(tree(record.get())?, tenant, schema, keys, dek)?;
                write_tree(&encrypted, out)
            }
        }
    }

    /// [`EncryptedRecord::decrypt`] on text: appends the decrypted record to
    /// `out` and returns the field reports (held here until the next
    /// record). Fails as a whole, writing nothing, if any check fails.
    pub fn decrypt(
        &mut self,
        record: EncryptedText<'_>,
        dek: &Key256,
        schema: &Schema,
        keys: &SchemaKeys,
        disclose: &dyn Fn(&FieldSpec) -> Disclosure,
        out: &mut SecretBuf,
    ) -> Result<&[FieldReport], RecordError> {
        self.reports.clear();
        let record = match record.0 {
            Source::Text { text, header, header_value, .. } => {
                let start = out.len();
                let result = self.decrypt_text(
                    text,
                    &header,
                    header_value,
                    dek,
                    schema,
                    keys,
                    disclose,
                    out,
                );
                self.opened.clear();
                self.shown.clear();
                match result {
                    Ok(()) => return Ok(self.reports.as_slice()),
                    Err(_) => out.truncate(start),
                }
                EncryptedRecord::parse(tree(text)?)?
            }
            Source::Tree(record) => record,
        };
        let decrypted = record.decrypt(dek, schema, keys, disclose)?;
        // The tree holds the plaintext: wiped once written.
        let tree = WipedValue(decrypted.record);
        write_tree(&tree.0, out)?;
        self.reports.replace(decrypted.fields);
        Ok(self.reports.as_slice())
    }

    fn encrypt_text(
        &mut self,
        text: &str,
        tenant: &TenantId,
        schema: &Schema,
        keys: &SchemaKeys,
        dek: &IssuedDek,
        out: &mut SecretBuf,
    ) -> Result<(), Fallback> {
        if !keys.is_for(tenant, schema) {
            return Err(Fallback::Tree);
        }
        self.scan.run(text, schema, Direction::Encrypt)?;
        self.sort_found()?;
        let mut fields = Vec::with_capacity(self.order.len());
        for &at in &self.order {
            let found = self.scan.found.get(at).ok_or(Fallback::Tree)?;
            let mode = schema.fields.get(found.field).ok_or(Fallback::Tree)?.mode;
            fields.push(ListedField { pointer: self.scan.pointer(found.pointer), mode });
        }
        let unsigned = HeaderContents {
            tenant,
            schema: &schema.name,
            schema_version: schema.version,
            record_key_id: dek.record_key_id,
            fields,
            kek_version: dek.kek_version,
            wrapped_dek: dek.wrapped,
        }
        .layout()
        .map_err(|_| Fallback::Tree)?;
        let aad_prefix = unsigned.field_aad_prefix();
        let record_aead = Aead::new(dek.dek());
        self.bound.clear();
        self.bound.resize(self.order.len(), None);

        let bytes = text.as_bytes();
        let mut w = Writer::new(bytes, out, &mut self.empty);
        for event in &self.scan.events {
            match *event {
                Event::Open(bracket) => w.open(bracket),
                Event::Close(bracket) => {
                    if w.depth() == 1 {
                        break; // the root's end, written below with `_kg`
                    }
                    w.close(bracket);
                }
                Event::Name(name) => w.name(name),
                Event::Raw(span) => w.raw(span),
                Event::Found(at) => {
                    let found = self.scan.found.get(at).ok_or(Fallback::Tree)?;
                    let rank = *self.rank.get(at).ok_or(Fallback::Tree)?;
                    let listed = unsigned.fields().get(rank).ok_or(Fallback::Tree)?;
                    let spec = schema.fields.get(found.field).ok_or(Fallback::Tree)?;
                    let field_keys = keys.field(found.field);
                    let raw = w.slice(found.value);
                    // The plaintext is the value's canonical JSON text: a
                    // string without escapes is its own, and its index text
                    // is its contents.
                    let simple = stored_string(text, found.value).ok();
                    let index_text = || match simple {
                        Some(contents) => Some(IndexText::Borrowed(contents)),
                        None => transform::index_text_of_json(raw),
                    };
                    let plaintext = if simple.is_some() {
                        raw
                    } else {
                        self.plaintext.clear();
                        let value = WipedValue::parse(raw).ok_or(Fallback::Tree)?;
                        serde_json::to_writer(&mut self.plaintext, &value.0)
                            .map_err(|_| Fallback::Tree)?;
                        self.plaintext.as_slice()
                    };
                    let mut sibling = false;
                    match spec.mode {
                        FieldMode::Randomized | FieldMode::BlindIndex => {
                            self.aad.clear();
                            self.aad.extend_from_slice(&aad_prefix);
                            self.aad.extend_from_slice(listed.pointer.as_bytes());
                            self.sealed.clear();
                            record_aead
                                .seal_random_padded(
                                    &self.aad,
                                    plaintext,
                                    transform::padding(plaintext.len()),
                                    &mut self.sealed,
                                )
                                .map_err(|e| Fallback::Error(e.into()))?;
                            transform::encode_token_into(
                                RANDOMIZED_PREFIX,
                                &self.sealed,
                                &mut self.token,
                            );
                            if spec.mode == FieldMode::BlindIndex {
                                let (Some(FieldKeys::BlindIndex(key)), Some(bidx)) =
                                    (field_keys, &spec.blind_index)
                                else {
                                    return Err(Fallback::Tree);
                                };
                                let index = index_text().ok_or(Fallback::Tree)?;
                                transform::blind_index_of_text(
                                    key,
                                    bidx,
                                    &index,
                                    &mut self.sibling,
                                );
                                sibling = true;
                            }
                        }
                        FieldMode::Deterministic => {
                            let field_keys = field_keys.ok_or(Fallback::Tree)?;
                            transform::seal_deterministic_into(
                                field_keys,
                                plaintext,
                                &mut self.sealed,
                            )
                            .ok_or(Fallback::Tree)?;
                            transform::encode_token_into(
                                DETERMINISTIC_PREFIX,
                                &self.sealed,
                                &mut self.token,
                            );
                        }
                        FieldMode::Pseudonym => {
                            let Some(FieldKeys::Pseudonym(key)) = field_keys else {
                                return Err(Fallback::Tree);
                            };
                            let index = index_text().ok_or(Fallback::Tree)?;
                            transform::pseudonym_of_text(key, &index, &mut self.token);
                        }
                    }
                    let name = w.begin();
                    w.out.extend_from_slice(b"\"");
                    let at_out = w.out.len();
                    w.out.extend_from_slice(self.token.as_bytes());
                    w.out.extend_from_slice(b"\"");
                    if matches!(spec.mode, FieldMode::Deterministic | FieldMode::Pseudonym)
                        && let Some(slot) = self.bound.get_mut(rank)
                    {
                        *slot = Some((at_out, at_out + self.token.len()));
                    }
                    if sibling {
                        let name = name.ok_or(Fallback::Tree)?;
                        let quoted = w.slice(name);
                        let unquoted = quoted.get(1..quoted.len() - 1).ok_or(Fallback::Tree)?;
                        w.added_member(unquoted, BLIND_INDEX_SUFFIX, self.sibling.as_bytes());
                    }
                }
                Event::Sibling(_) | Event::Header(_) => return Err(Fallback::Tree),
            }
        }
        // The header tag covers the deterministic and pseudonym values as
        // stored, in header order: they are in the output already.
        let written = w.out.as_slice();
        let bound: Vec<&str> = self
            .bound
            .iter()
            .flatten()
            .map(|&(start, end)| {
                written.get(start..end).and_then(|b| std::str::from_utf8(b).ok()).unwrap_or("")
            })
            .collect();
        let header = unsigned.sign(dek.dek(), &bound).encode();
        w.added_member(HEADER_MEMBER.as_bytes(), "", header.as_bytes());
        w.close(b'}');
        Ok(())
    }

    /// Sorts the found locations into header order (by pointer):
    /// `order` lists them in that order, `rank` gives each one's place.
    fn sort_found(&mut self) -> Step<()> {
        let scan = &self.scan;
        self.order.clear();
        self.order.extend(0..scan.found.len());
        self.order.sort_unstable_by(|&a, &b| {
            let pointer = |i: usize| scan.found.get(i).map(|f| scan.pointer(f.pointer).as_bytes());
            pointer(a).cmp(&pointer(b))
        });
        self.rank.clear();
        self.rank.resize(scan.found.len(), 0);
        for (rank, &at) in self.order.iter().enumerate() {
            *self.rank.get_mut(at).ok_or(Bail)? = rank;
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn decrypt_text(
        &mut self,
        text: &str,
        header: &RecordHeader,
        header_value: Span,
        dek: &Key256,
        schema: &Schema,
        keys: &SchemaKeys,
        disclose: &dyn Fn(&FieldSpec) -> Disclosure,
        out: &mut SecretBuf,
    ) -> Step<()> {
        if header.schema() != &schema.name
            || header.schema_version() != schema.version
            || !keys.is_for(header.tenant(), schema)
        {
            return Err(Bail);
        }
        self.scan.run(text, schema, Direction::Decrypt)?;
        // The walk bails on a second `_kg` member; this makes sure the one
        // it saw is the one the header was read from.
        let seen = self.scan.events.iter().find_map(|event| match *event {
            Event::Header(span) => Some(span),
            _ => None,
        });
        if seen != Some(header_value) {
            return Err(Bail);
        }
        // The protected locations present must be exactly those the header
        // lists, with the schema's modes.
        self.sort_found()?;
        if self.order.len() != header.fields().len() {
            return Err(Bail);
        }
        let bytes = text.as_bytes();
        let mut bound = Vec::new();
        for (listed, &at) in header.fields().iter().zip(&self.order) {
            let found = self.scan.found.get(at).ok_or(Bail)?;
            let mode = schema.fields.get(found.field).ok_or(Bail)?.mode;
            if self.scan.pointer(found.pointer) != listed.pointer || mode != listed.mode {
                return Err(Bail);
            }
            if matches!(listed.mode, FieldMode::Deterministic | FieldMode::Pseudonym) {
                bound.push(stored_string(text, found.value)?);
            }
        }
        header.verify(dek, &bound).map_err(|_| Bail)?;

        let aad_prefix = header.field_aad_prefix();
        let record_aead = Aead::new(dek);
        self.plains.clear();
        self.used.clear();
        self.used.resize(self.scan.siblings.len(), false);
        for found in &self.scan.found {
            let spec = schema.fields.get(found.field).ok_or(Bail)?;
            let stored = stored_string(text, found.value)?;
            // Randomized and blind index fields open under the record's DEK
            // with the record-bound AAD, deterministic ones under their
            // field key; a pseudonym shows as it is stored.
            let (prefix, aead, aad) = match (spec.mode, keys.field(found.field)) {
                (FieldMode::Randomized | FieldMode::BlindIndex, _) => {
                    self.aad.clear();
                    self.aad.extend_from_slice(&aad_prefix);
                    self.aad.extend_from_slice(self.scan.pointer(found.pointer).as_bytes());
                    (RANDOMIZED_PREFIX, &record_aead, self.aad.as_slice())
                }
                (FieldMode::Deterministic, Some(FieldKeys::Deterministic { enc, aad, .. })) => {
                    (DETERMINISTIC_PREFIX, &**enc, aad.as_slice())
                }
                (FieldMode::Pseudonym, _) if transform::is_pseudonym(stored) => {
                    self.plains.push(Plain::Stored(found.value));
                    continue;
                }
                _ => return Err(Bail),
            };
            let range =
                transform::decode_token_append(prefix, stored, &mut self.opened).ok_or(Bail)?;
            let sealed = self.opened.as_mut_slice().get_mut(range.clone()).ok_or(Bail)?;
            let len = aead.open_in_place(sealed, aad).map_err(|_| Bail)?.len();
            let start = range.start + crate::crypto::NONCE_LEN;
            let plain = canonical(&mut self.opened, start, start + len)?;
            if spec.mode == FieldMode::BlindIndex {
                // Its sibling must be there and hold this plaintext's token.
                let (Some(FieldKeys::BlindIndex(key)), Some(bidx)) =
                    (keys.field(found.field), &spec.blind_index)
                else {
                    return Err(Bail);
                };
                let pointer = self.scan.pointer(found.pointer);
                let at = self
                    .scan
                    .siblings
                    .iter()
                    .position(|s| {
                        self.scan.pointer(s.pointer).strip_prefix(pointer)
                            == Some(BLIND_INDEX_SUFFIX)
                    })
                    .ok_or(Bail)?;
                let sibling = self.scan.siblings.get(at).ok_or(Bail)?;
                let stored = stored_string(text, sibling.value)?;
                let plaintext = plain_bytes(plain, self.opened.as_slice(), bytes);
                let index = transform::index_text_of_json(plaintext).ok_or(Bail)?;
                transform::blind_index_of_text(key, bidx, &index, &mut self.sibling);
                if !ct_eq(stored.as_bytes(), self.sibling.as_bytes()) {
                    return Err(Bail);
                }
                *self.used.get_mut(at).ok_or(Bail)? = true;
            }
            self.plains.push(plain);
        }

        // Every check passed: only now does any plaintext enter the output.
        self.shown.clear();
        for (found, &plain) in self.scan.found.iter().zip(&self.plains) {
            let spec = schema.fields.get(found.field).ok_or(Bail)?;
            self.shown.push(match disclose(spec) {
                Disclosure::Reveal => Shown::Plain(plain),
                Disclosure::Mask => match spec.mask {
                    Some(mask) => {
                        let value =
                            WipedValue::parse(plain_bytes(plain, self.opened.as_slice(), bytes))
                                .ok_or(Bail)?;
                        Shown::Masked(WipedValue(transform::apply_mask(mask, &value.0)))
                    }
                    None => Shown::Withheld,
                },
                Disclosure::Withhold => Shown::Withheld,
            });
        }
        let mut w = Writer::new(bytes, out, &mut self.empty);
        for event in &self.scan.events {
            match *event {
                Event::Open(bracket) => w.open(bracket),
                Event::Close(bracket) => w.close(bracket),
                Event::Name(name) => w.name(name),
                Event::Raw(span) => w.raw(span),
                Event::Header(_) => {
                    w.drop_member();
                }
                Event::Sibling(at) => {
                    let sibling = self.scan.siblings.get(at).ok_or(Bail)?;
                    if self.used.get(at) == Some(&true) {
                        w.drop_member();
                    } else {
                        w.raw(sibling.value);
                    }
                }
                Event::Found(at) => match self.shown.get(at).ok_or(Bail)? {
                    Shown::Plain(plain) => {
                        w.value(plain_bytes(*plain, self.opened.as_slice(), bytes))
                    }
                    Shown::Masked(value) => {
                        w.begin();
                        serde_json::to_writer(&mut *w.out, &value.0).map_err(|_| Bail)?;
                    }
                    // A member goes; an array element becomes null, so
                    // that the others keep their indices.
                    Shown::Withheld => {
                        if w.drop_member().is_none() {
                            w.value(b"null");
                        }
                    }
                },
            }
        }
        for &at in &self.order {
            let found = self.scan.found.get(at).ok_or(Bail)?;
            let spec = schema.fields.get(found.field).ok_or(Bail)?;
            let outcome = match self.shown.get(at).ok_or(Bail)? {
                Shown::Plain(_) => FieldOutcome::Revealed,
                Shown::Masked(_) => FieldOutcome::Masked,
                Shown::Withheld => FieldOutcome::Withheld,
            };
            self.reports.push(self.scan.pointer(found.pointer), &spec.class, outcome);
        }
        Ok(())
    }
}

/// The opened plaintext at `start..end` of `opened`, as the JSON text the
/// tree path would write for it (appended, if it is not that already):
/// authenticated bytes that are not JSON mean a bug or a forged key, and
/// fail.
fn canonical(opened: &mut SecretBuf, start: usize, end: usize) -> Step<Plain> {
    let plaintext = transform::unpadded(opened.as_slice().get(start..end).ok_or(Bail)?);
    if transform::plain_string_contents(plaintext).is_some() {
        return Ok(Plain::Opened(start, start + plaintext.len()));
    }
    let value = WipedValue::parse(plaintext).ok_or(Bail)?;
    let at = opened.len();
    serde_json::to_writer(&mut *opened, &value.0).map_err(|_| Bail)?;
    Ok(Plain::Opened(at, opened.len()))
}

/// What a caller gets of one field.
enum Shown {
    Plain(Plain),
    Masked(WipedValue),
    Withheld,
}

/// The text path gives way to the tree path, or fails for good.
enum Fallback {
    Tree,
    Error(RecordError),
}

impl From<Bail> for Fallback {
    fn from(_: Bail) -> Self {
        Self::Tree
    }
}

fn plain_bytes<'b>(plain: Plain, opened: &'b [u8], text: &'b [u8]) -> &'b [u8] {
    match plain {
        Plain::Opened(start, end) => opened.get(start..end),
        Plain::Stored(span) => text.get(span.start..span.end),
    }
    .unwrap_or_default()
}

/// The contents of a stored value that must be a string without escapes
/// (every token and pseudonym keygate writes is one). The record is valid
/// JSON, so a string span without a backslash holds no quote or control
/// character, and its contents are a `str` slice at quote boundaries.
fn stored_string(text: &str, span: Span) -> Step<&str> {
    let quoted = text.get(span.start..span.end).ok_or(Bail)?;
    let contents = quoted.strip_prefix('"').and_then(|q| q.strip_suffix('"')).ok_or(Bail)?;
    match memchr::memchr(b'\\', contents.as_bytes()) {
        None => Ok(contents),
        Some(_) => Err(Bail),
    }
}

/// The record as a tree, for the tree path. A `RawValue` is valid JSON
/// text, but a number too large for an `f64` is valid text that no tree
/// holds; the text path copies such a value as it is when nothing needs to
/// read it, and this is where a record that does need a tree stops.
fn tree(text: &str) -> Result<Value, RecordError> {
    serde_json::from_str(text).map_err(|e| RecordError::Unreadable(e.to_string()))
}

fn write_tree(record: &Value, out: &mut SecretBuf) -> Result<(), RecordError> {
    // Writing a tree into memory does not fail; should serde_json ever
    // refuse one, its message says why (never a value).
    serde_json::to_writer(out, record).map_err(|e| RecordError::Unreadable(e.to_string()))
}
