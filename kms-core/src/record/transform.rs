//! The value-level transforms of the field modes: blind index tokens,
//! pseudonyms, deterministic encryption, normalizers and masks.

use data_encoding::{BASE32_NOPAD, BASE64URL_NOPAD};
use serde_json::{Number, Value};
use zeroize::{Zeroize, Zeroizing};

use super::keys::FieldKeys;
use crate::crypto::mac::MacKey;
use crate::crypto::{CannotDecrypt, NONCE_LEN};
use crate::schema::{BlindIndexSpec, Mask, Normalizer};
use crate::secret::{Key256, SecretBuf};

/// Prefix of a randomized field.
pub const RANDOMIZED_PREFIX: &str = "kg1:";
/// Prefix of a deterministic field.
pub const DETERMINISTIC_PREFIX: &str = "kg1d:";
/// Prefix of a blind index token.
pub const BLIND_INDEX_PREFIX: &str = "kg1b:";
/// Prefix of a pseudonym.
pub const PSEUDONYM_PREFIX: &str = "kgp:";

/// Bytes of HMAC output kept in a pseudonym (128 bits).
const PSEUDONYM_LEN: usize = 16;

/// `prefix ‖ base64url_nopad(bytes)`.
pub(crate) fn encode_token(prefix: &str, bytes: &[u8]) -> String {
    let mut out = String::with_capacity(prefix.len() + BASE64URL_NOPAD.encode_len(bytes.len()));
    encode_token_into(prefix, bytes, &mut out);
    out
}

/// [`encode_token`] into a reused string (emptied first).
pub(crate) fn encode_token_into(prefix: &str, bytes: &[u8], out: &mut String) {
    out.clear();
    out.push_str(prefix);
    BASE64URL_NOPAD.encode_append(bytes, out);
}

/// The text a value is indexed, pseudonymized or masked by (see
/// [`index_text`]): borrowed where it can be, otherwise an owned copy that
/// is wiped when dropped, since it is plaintext or made from it.
pub enum IndexText<'a> {
    /// A slice of the value or of the text given.
    Borrowed(&'a str),
    /// Made for the purpose; wiped on drop.
    Owned(Zeroizing<String>),
}

impl std::ops::Deref for IndexText<'_> {
    type Target = str;
    fn deref(&self) -> &str {
        match self {
            Self::Borrowed(text) => text,
            Self::Owned(text) => text,
        }
    }
}

impl std::fmt::Debug for IndexText<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IndexText(..)")
    }
}

fn owned(text: String) -> IndexText<'static> {
    IndexText::Owned(Zeroizing::new(text))
}

/// The text a value is indexed or pseudonymized by: a string's own
/// contents, otherwise the value's canonical JSON text.
pub(crate) fn index_text(value: &Value) -> IndexText<'_> {
    match value {
        Value::String(s) => IndexText::Borrowed(s),
        other => IndexText::Owned(json_text(other)),
    }
}

/// A value's compact JSON text (what `Display` writes), grown in a buffer
/// that wipes what it outgrows.
fn json_text(value: &Value) -> Zeroizing<String> {
    let mut buf = SecretBuf::with_capacity(32);
    // Writing a `Value` to memory cannot fail, and JSON text is UTF-8.
    let _ = serde_json::to_writer(&mut buf, value);
    Zeroizing::new(std::str::from_utf8(buf.as_slice()).unwrap_or_default().to_owned())
}

/// Applies normalizers in order. What they make is wiped when dropped,
/// except what `to_lowercase` outgrows in the rare case a lowercase form
/// is longer than the text.
pub fn normalize<'a>(text: &'a str, normalizers: &[Normalizer]) -> IndexText<'a> {
    let mut out = IndexText::Borrowed(text);
    for n in normalizers {
        out = match (n, out) {
            (Normalizer::Exact, same) => same,
            (Normalizer::Lowercase, text) => owned(text.to_lowercase()),
            (Normalizer::Trim, IndexText::Borrowed(text)) => IndexText::Borrowed(text.trim()),
            (Normalizer::Trim, text) => owned(text.trim().to_owned()),
            (Normalizer::Digits, text) => {
                let mut digits = String::with_capacity(text.len());
                digits.extend(text.chars().filter(char::is_ascii_digit));
                owned(digits)
            }
        };
    }
    out
}

/// A JSON value holding plaintext. When dropped, what it holds is first
/// overwritten in place: strings and member names zeroized, numbers set to
/// 0, booleans to false. (serde_json may have unescaped a string in a
/// scratch buffer of its own while parsing; that one is out of reach.) Its
/// `Debug` shows no value.
pub struct WipedValue(pub(crate) Value);

impl WipedValue {
    /// Parses `json`; `None` if it is not JSON.
    pub(crate) fn parse(json: &[u8]) -> Option<Self> {
        serde_json::from_slice(json).ok().map(Self)
    }

    /// The value.
    pub fn get(&self) -> &Value {
        &self.0
    }
}

impl<'de> serde::Deserialize<'de> for WipedValue {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Value::deserialize(deserializer).map(Self)
    }
}

impl std::fmt::Debug for WipedValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WipedValue(..)")
    }
}

impl Drop for WipedValue {
    fn drop(&mut self) {
        wipe(&mut self.0);
    }
}

fn wipe(value: &mut Value) {
    match value {
        Value::Null => {}
        Value::Bool(b) => *b = false,
        Value::Number(n) => *n = Number::from(0u8),
        Value::String(s) => s.zeroize(),
        Value::Array(items) => items.iter_mut().for_each(wipe),
        Value::Object(map) => {
            // Values in place first: one moved out of the map would leave
            // its bytes behind in the map's node.
            map.values_mut().for_each(wipe);
            for (mut name, _) in std::mem::take(map) {
                name.zeroize();
            }
        }
    }
}

/// The blind index token of `value`: `kg1b:` + the first `bits` bits of
/// `HMAC(K_bidx, normalize(value))` (unused low bits of the last byte zero).
pub fn blind_index_token(key: &Key256, spec: &BlindIndexSpec, value: &Value) -> String {
    blind_index_with(&MacKey::new(key), spec, value)
}

/// [`blind_index_token`] with the MAC already keyed.
pub(crate) fn blind_index_with(key: &MacKey, spec: &BlindIndexSpec, value: &Value) -> String {
    let mut out = String::new();
    blind_index_of_text(key, spec, &index_text(value), &mut out);
    out
}

/// [`blind_index_token`] of a value's index text (see [`index_text`]),
/// into a reused string (emptied first).
pub(crate) fn blind_index_of_text(
    key: &MacKey,
    spec: &BlindIndexSpec,
    text: &str,
    out: &mut String,
) {
    let normalized = normalize(text, &spec.normalize);
    let tag = key.tag(&[normalized.as_bytes()]);
    let bits = usize::from(spec.bits.clamp(8, 256));
    let len = bits.div_ceil(8);
    let mut truncated = tag;
    let kept = truncated.get_mut(..len).unwrap_or_default();
    let spare = len * 8 - bits;
    if let Some(last) = kept.last_mut() {
        *last &= 0xffu8 << spare;
    }
    encode_token_into(BLIND_INDEX_PREFIX, kept, out);
}

/// The pseudonym of `value`: `kgp:` + base32(HMAC(K_pseud, text)[..16]).
pub fn pseudonym(key: &Key256, value: &Value) -> String {
    pseudonym_with(&MacKey::new(key), value)
}

/// [`pseudonym`] with the MAC already keyed.
pub(crate) fn pseudonym_with(key: &MacKey, value: &Value) -> String {
    let mut out = String::with_capacity(PSEUDONYM_PREFIX.len() + 26);
    pseudonym_of_text(key, &index_text(value), &mut out);
    out
}

/// [`pseudonym`] of a value's index text (see [`index_text`]), into a
/// reused string (emptied first).
pub(crate) fn pseudonym_of_text(key: &MacKey, text: &str, out: &mut String) {
    let tag = key.tag(&[text.as_bytes()]);
    let kept = tag.get(..PSEUDONYM_LEN).unwrap_or(&tag);
    out.clear();
    out.push_str(PSEUDONYM_PREFIX);
    BASE32_NOPAD.encode_append(kept, out);
}

/// The index text of a value given as JSON text (see [`index_text`]): a
/// string without escapes is its own contents, anything else is parsed.
/// `None` if `json` is not JSON.
pub(crate) fn index_text_of_json(json: &[u8]) -> Option<IndexText<'_>> {
    if let Some(contents) = plain_string_contents(json) {
        return Some(IndexText::Borrowed(contents));
    }
    let mut value = WipedValue::parse(json)?;
    Some(IndexText::Owned(match &mut value.0 {
        // An escaped string: its buffer moves into the wiping wrapper.
        Value::String(text) => Zeroizing::new(std::mem::take(text)),
        other => json_text(other),
    }))
}

/// The contents of `json` if it is a JSON string without escapes: a quote,
/// UTF-8 text without quotes, backslashes or control characters, a quote.
/// Such a string is also exactly how serde_json writes its value.
pub(crate) fn plain_string_contents(json: &[u8]) -> Option<&str> {
    let inner = json.strip_prefix(b"\"")?.strip_suffix(b"\"")?;
    if inner.iter().any(|&b| b == b'"' || b == b'\\' || b < 0x20) {
        return None;
    }
    std::str::from_utf8(inner).ok()
}

/// Decodes `prefix ‖ base64url` (canonical encoding only) and appends the
/// bytes to `out`, returning where they lie in it. On failure `out` is as
/// it was.
pub(crate) fn decode_token_append(
    prefix: &str,
    text: &str,
    out: &mut SecretBuf,
) -> Option<std::ops::Range<usize>> {
    let body = text.strip_prefix(prefix)?.as_bytes();
    let start = out.len();
    let room = out.extend_zeroed(BASE64URL_NOPAD.decode_len(body.len()).ok()?);
    match BASE64URL_NOPAD.decode_mut(body, room) {
        Ok(len) => {
            out.truncate(start + len);
            Some(start..start + len)
        }
        Err(_) => {
            out.truncate(start);
            None
        }
    }
}

/// Decodes `prefix ‖ base64url` (canonical encoding only) into `out`,
/// which is wiped and emptied first: one buffer serves every field of a
/// record, ciphertext in, plaintext out.
pub(crate) fn decode_token_into(prefix: &str, text: &str, out: &mut SecretBuf) -> Option<()> {
    out.clear();
    decode_token_append(prefix, text, out).map(|_| ())
}

/// Whether `text` has the form of a pseudonym (decoded on the stack: it
/// is checked for every pseudonym field read).
pub(crate) fn is_pseudonym(text: &str) -> bool {
    let Some(body) = text.strip_prefix(PSEUDONYM_PREFIX) else { return false };
    let mut bytes = [0u8; PSEUDONYM_LEN];
    BASE32_NOPAD.decode_len(body.len()) == Ok(PSEUDONYM_LEN)
        && BASE32_NOPAD.decode_mut(body.as_bytes(), &mut bytes).is_ok_and(|n| n == PSEUDONYM_LEN)
}

/// A randomized field's plaintext is padded to a multiple of this many
/// bytes, so that its ciphertext's length tells the value's length only to
/// this grain: `true` from `false`, `"M"` from `"F"`, one short code or
/// small number from another are not told apart.
pub(crate) const PAD_BLOCK: usize = 16;

/// The trailing spaces that pad a value's JSON text of `len` bytes to a
/// multiple of [`PAD_BLOCK`] (at least one block): JSON whitespace, which
/// every reader of the value skips, so records written before padding and
/// after read alike. Sealed after the value by
/// [`Aead::seal_random_padded`](crate::crypto::Aead::seal_random_padded).
///
/// Deterministic fields are not padded: their tokens must stay equal to
/// those already stored, which equality search depends on.
pub(crate) fn padding(len: usize) -> &'static [u8] {
    const SPACES: [u8; PAD_BLOCK] = [b' '; PAD_BLOCK];
    let missing = len.max(1).div_ceil(PAD_BLOCK) * PAD_BLOCK - len;
    SPACES.get(..missing).unwrap_or_default()
}

/// An opened value's JSON text without the [`padding`] sealed after it (no
/// JSON value's text ends in a space). Only spaces: what else a forged
/// plaintext ends in is left for the JSON reader to judge, as the tree
/// path does.
pub(crate) fn unpadded(plaintext: &[u8]) -> &[u8] {
    let end = plaintext.iter().rposition(|&b| b != b' ').map_or(0, |last| last + 1);
    plaintext.get(..end).unwrap_or_default()
}

/// Deterministic encryption of a field's canonical JSON text.
pub(crate) fn seal_deterministic(keys: &FieldKeys, plaintext: &[u8]) -> Option<String> {
    let mut sealed = Vec::with_capacity(plaintext.len() + crate::crypto::SEAL_OVERHEAD);
    seal_deterministic_into(keys, plaintext, &mut sealed)?;
    Some(encode_token(DETERMINISTIC_PREFIX, &sealed))
}

/// Deterministic encryption into `sealed` (emptied first): `nonce ‖
/// ciphertext ‖ tag`, the nonce a MAC of the plaintext.
pub(crate) fn seal_deterministic_into(
    keys: &FieldKeys,
    plaintext: &[u8],
    sealed: &mut Vec<u8>,
) -> Option<()> {
    let FieldKeys::Deterministic { enc, nonce, aad } = keys else {
        return None;
    };
    let tag = nonce.tag(&[plaintext]);
    let mut n = [0u8; NONCE_LEN];
    n.copy_from_slice(tag.get(..NONCE_LEN)?);
    sealed.clear();
    enc.seal_with_nonce(&n, aad, plaintext, sealed);
    Some(())
}

/// Opens a deterministic field in `scratch` (see [`decode_token_into`]),
/// returning its plaintext.
pub(crate) fn open_deterministic<'a>(
    keys: &FieldKeys,
    text: &str,
    scratch: &'a mut SecretBuf,
) -> Result<&'a [u8], CannotDecrypt> {
    let FieldKeys::Deterministic { enc, aad, .. } = keys else {
        return Err(CannotDecrypt);
    };
    decode_token_into(DETERMINISTIC_PREFIX, text, scratch).ok_or(CannotDecrypt)?;
    enc.open_in_place(scratch.as_mut_slice(), aad)
}

/// The masked view of a value. Its copies of the value's text are wiped;
/// the masked string is sized up front, so nothing it outgrows is left.
pub fn apply_mask(mask: Mask, value: &Value) -> Value {
    const HIDDEN: &str = "***";
    let text = index_text(value);
    let masked = match mask {
        Mask::Redact => HIDDEN.to_owned(),
        Mask::Last4 => {
            let total = text.chars().filter(|c| c.is_alphanumeric()).count();
            let keep_from = total.saturating_sub(4);
            let mut seen = 0;
            // Never longer than the text: a kept character is itself, a
            // hidden one a single '*'.
            let mut out = String::with_capacity(text.len());
            out.extend(text.chars().map(|c| {
                if !c.is_alphanumeric() {
                    return c;
                }
                seen += 1;
                if seen > keep_from && total > 4 { c } else { '*' }
            }));
            out
        }
        Mask::Email => match text.split_once('@') {
            Some((local, domain)) if !local.is_empty() && !domain.is_empty() => {
                let first = local.chars().next().map_or(0, char::len_utf8);
                let mut out = String::with_capacity(first + HIDDEN.len() + 1 + domain.len());
                out.push_str(local.get(..first).unwrap_or_default());
                out.push_str(HIDDEN);
                out.push('@');
                out.push_str(domain);
                out
            }
            _ => HIDDEN.to_owned(),
        },
        Mask::Year => match text.get(..4) {
            Some(year) if year.bytes().all(|b| b.is_ascii_digit()) => year.to_owned(),
            _ => HIDDEN.to_owned(),
        },
    };
    Value::String(masked)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn tokens_decode_into_a_reused_buffer() {
        let mut buf = SecretBuf::default();
        for bytes in [&b"a longer first value"[..], b"", b"xy", &[0u8, 255, 7]] {
            let token = encode_token(RANDOMIZED_PREFIX, bytes);
            assert_eq!(decode_token_into(RANDOMIZED_PREFIX, &token, &mut buf), Some(()));
            assert_eq!(buf.as_slice(), bytes);
        }
        // Wrong prefix, padding, non-zero trailing bits, bad characters.
        for bad in ["kg1d:eHk", "kg1:eHk=", "kg1:eHl", "kg1:e+k", "kg1:e", "eHk"] {
            assert_eq!(decode_token_into(RANDOMIZED_PREFIX, bad, &mut buf), None, "{bad}");
        }
    }

    #[test]
    fn normalizers() {
        use Normalizer::*;
        assert_eq!(&*normalize("  A@B.org ", &[Trim, Lowercase]), "a@b.org");
        assert_eq!(&*normalize("+1 (555) 010-9999", &[Digits]), "15550109999");
        assert_eq!(&*normalize("Ab", &[Exact]), "Ab");
        // `str::to_lowercase` itself (a final sigma), as stored indexes expect.
        assert_eq!(&*normalize("ΟΔΟΣ", &[Lowercase]), "οδος".replace('σ', "ς"));
        // Borrowed while nothing had to be made; made text is owned (wiped).
        assert!(matches!(normalize(" a ", &[Trim, Exact]), IndexText::Borrowed("a")));
        assert!(matches!(normalize("a ", &[Lowercase, Trim]), IndexText::Owned(_)));
        assert_eq!(format!("{:?}", normalize("secret", &[Digits])), "IndexText(..)");
    }

    #[test]
    fn index_text_is_the_contents_or_the_compact_json() {
        for value in [
            json!(5550001234u64),
            json!(-2.5),
            json!(true),
            json!(null),
            json!({"b": [1, "x"], "a": {}}),
        ] {
            let text = index_text(&value);
            assert!(matches!(text, IndexText::Owned(_)));
            assert_eq!(&*text, value.to_string());
            let again = index_text_of_json(value.to_string().as_bytes()).map(|t| t.to_owned());
            assert_eq!(again.as_deref(), Some(value.to_string().as_str()));
        }
        assert!(matches!(index_text(&json!("Jane")), IndexText::Borrowed("Jane")));
        assert_eq!(index_text_of_json(br#""Jane""#).as_deref(), Some("Jane"));
        assert_eq!(index_text_of_json(br#""J\u0061ne""#).as_deref(), Some("Jane"));
        assert!(index_text_of_json(b"{").is_none());
    }

    #[test]
    fn a_wiped_value_holds_nothing_afterwards() {
        let mut value = json!(["123-45-6789", 5550001234u64, -3, 2.5, true, null, [false, "bb"]]);
        wipe(&mut value);
        assert_eq!(value, json!(["", 0, 0, 0, false, null, [false, ""]]));
        // Member names cannot be overwritten in place: they leave the map
        // and are zeroized; the values are wiped before that.
        let mut value = json!({"ssn": "123-45-6789", "n": {"deep": 7}});
        wipe(&mut value);
        assert_eq!(value, json!({}));
    }

    #[test]
    fn a_wiped_value_parsed_from_a_request_shows_nothing_in_debug() {
        let value: WipedValue = serde_json::from_str(r#"{"ssn":"123-45-6789"}"#).unwrap();
        assert_eq!(value.get(), &json!({"ssn": "123-45-6789"}));
        let debug = format!("{value:?}");
        assert!(!debug.contains("6789") && !debug.contains("ssn"), "{debug}");
    }

    #[test]
    fn masks() {
        assert_eq!(apply_mask(Mask::Last4, &json!("123-45-6789")), json!("***-**-6789"));
        assert_eq!(
            apply_mask(Mask::Last4, &json!("1234")),
            json!("****"),
            "short values fully hidden"
        );
        assert_eq!(apply_mask(Mask::Last4, &json!(5550001234u64)), json!("******1234"));
        assert_eq!(
            apply_mask(Mask::Email, &json!("jane.doe@example.org")),
            json!("j***@example.org")
        );
        assert_eq!(apply_mask(Mask::Email, &json!("nonsense")), json!("***"));
        assert_eq!(apply_mask(Mask::Year, &json!("1984-03-07")), json!("1984"));
        assert_eq!(apply_mask(Mask::Year, &json!("soon")), json!("***"));
        assert_eq!(apply_mask(Mask::Redact, &json!({"a": 1})), json!("***"));
    }

    #[test]
    fn blind_index_respects_bits() {
        let key = Key256::from_array(&mut [3; 32]);
        for bits in [8u16, 12, 31, 32, 100, 256] {
            let spec = BlindIndexSpec { bits, normalize: vec![Normalizer::Lowercase] };
            let token = blind_index_token(&key, &spec, &json!("Jane@Example.org"));
            let mut bytes = SecretBuf::default();
            bytes.extend_from_slice(&[0xff; 3]);
            decode_token_into(BLIND_INDEX_PREFIX, &token, &mut bytes).unwrap();
            let bytes = bytes.as_slice();
            assert_eq!(bytes.len(), usize::from(bits).div_ceil(8));
            let spare = bytes.len() * 8 - usize::from(bits);
            assert_eq!(bytes.last().unwrap() & ((1u8 << spare) - 1), 0, "bits={bits}");
            assert_eq!(token, blind_index_token(&key, &spec, &json!("jane@example.org")));
        }
    }

    #[test]
    fn pseudonyms_are_stable_and_well_formed() {
        let key = Key256::from_array(&mut [4; 32]);
        let p = pseudonym(&key, &json!("MRN-1"));
        assert!(is_pseudonym(&p), "{p}");
        let body = &p[PSEUDONYM_PREFIX.len()..];
        for not in [
            format!("kgq:{body}"),
            format!("{p}A"),
            p[..p.len() - 1].to_owned(),
            format!("{PSEUDONYM_PREFIX}{}", body.to_lowercase()),
            format!("{PSEUDONYM_PREFIX}{}1", &body[..body.len() - 1]),
            PSEUDONYM_PREFIX.to_owned(),
        ] {
            assert!(!is_pseudonym(&not), "{not}");
        }
        assert_eq!(p, pseudonym(&key, &json!("MRN-1")));
        assert_ne!(p, pseudonym(&key, &json!("MRN-2")));
        assert_ne!(p, pseudonym(&Key256::from_array(&mut [5; 32]), &json!("MRN-1")));
    }
}
