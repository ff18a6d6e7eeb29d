//! The binary form of the unwrap exchange between a sidecar and the key
//! service, `Content-Type: application/vnd.keygate.unwrap.v1`: fixed-size
//! fields where the JSON form spells every id in hex and every key in
//! base64 (docs/performance.md, item 31). JSON stays the documented form
//! of `POST /v1/tenants/{t}/datakeys/unwrap`; the key service answers in
//! the form it was asked in. A sidecar whose key service predates this
//! form gets 415 and unwraps as JSON from then on.
//!
//! Request: the purpose's length (one byte, 0 for none), the purpose, then
//! for each item its record key id (16 bytes), KEK version (u32,
//! big-endian) and wrapped DEK (60 bytes).
//!
//! Answer: the tenant's active KEK version (u32, big-endian), then for each
//! item, in the request's order, either `0` and the DEK (32 bytes), or an
//! error code's length (1 to 63) and the code (`[a-z0-9_]`).

use kms_core::{
    DekRequest, KEY_LEN, KekVersion, Key256, MAX_NAME_LEN, Name, RecordKeyId, SecretBuf,
};
use kms_core::{WRAPPED_DEK_LEN, WrappedDek};

/// The media type of both directions.
pub const CONTENT_TYPE: &str = "application/vnd.keygate.unwrap.v1";

/// One request item's length.
const ITEM_LEN: usize = RecordKeyId::LEN + 4 + WRAPPED_DEK_LEN;
/// The longest error code (and purpose): a name's length.
const MAX_CODE_LEN: usize = MAX_NAME_LEN;
/// One answered DEK's length: its tag and the key.
pub const ANSWER_KEY_LEN: usize = 1 + KEY_LEN;

/// A binary body that does not follow the layout above. The message names
/// what is wrong, never the bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Malformed(pub(crate) &'static str);

/// A decoded unwrap request.
#[derive(Debug)]
pub struct UnwrapRequest {
    /// The purpose of use, recorded in the audit event.
    pub purpose: Option<Name>,
    /// The wrapped DEKs, at least one.
    pub items: Vec<DekRequest>,
}

/// Writes a request for `items` (the sidecar's side).
pub fn encode_request(purpose: Option<&Name>, items: &[DekRequest]) -> Vec<u8> {
    let purpose = purpose.map_or("", Name::as_str).as_bytes();
    let mut out = Vec::with_capacity(1 + purpose.len() + items.len() * ITEM_LEN);
    // A name is at most 63 bytes, so its length fits the byte.
    out.push(purpose.len() as u8);
    out.extend_from_slice(purpose);
    for item in items {
        out.extend_from_slice(item.record_key_id.as_bytes());
        out.extend_from_slice(&item.kek_version.to_be_bytes());
        out.extend_from_slice(item.wrapped.as_bytes());
    }
    out
}

/// Reads a request (the key service's side). The batch size is the
/// caller's to bound.
pub fn decode_request(bytes: &[u8]) -> Result<UnwrapRequest, Malformed> {
    let (&purpose_len, rest) = bytes.split_first().ok_or(Malformed("the body is empty"))?;
    let purpose_len = usize::from(purpose_len);
    if purpose_len > MAX_CODE_LEN || rest.len() < purpose_len {
        return Err(Malformed("the purpose's length is wrong"));
    }
    let (purpose, items) = rest.split_at(purpose_len);
    let purpose = match purpose {
        [] => None,
        text => {
            let text =
                std::str::from_utf8(text).map_err(|_| Malformed("the purpose is not a name"))?;
            Some(Name::new(text).map_err(|_| Malformed("the purpose is not a name"))?)
        }
    };
    if items.is_empty() {
        return Err(Malformed("the request holds no item"));
    }
    if items.len() % ITEM_LEN != 0 {
        return Err(Malformed("the items are not a whole number of 80-byte items"));
    }
    let items = items
        .chunks_exact(ITEM_LEN)
        .map(|item| {
            let (id, rest) = item.split_first_chunk::<{ RecordKeyId::LEN }>()?;
            let (version, wrapped) = rest.split_first_chunk::<4>()?;
            Some(DekRequest {
                record_key_id: RecordKeyId::from_bytes(*id),
                kek_version: KekVersion::from_be_bytes(*version),
                wrapped: WrappedDek::from_slice(wrapped)?,
            })
        })
        .collect::<Option<Vec<_>>>()
        // Unreachable: every chunk is exactly one item long.
        .ok_or(Malformed("an item is not 80 bytes"))?;
    Ok(UnwrapRequest { purpose, items })
}

/// Starts an answer in `out` (the key service's side); then one
/// [`write_key`] or [`write_error`] per item, in order.
pub fn write_active_version(out: &mut SecretBuf, active: KekVersion) {
    out.extend_from_slice(&active.to_be_bytes());
}

/// Answers an item with its DEK.
pub fn write_key(out: &mut SecretBuf, dek: &Key256) {
    out.extend_from_slice(&[0]);
    out.extend_from_slice(dek.expose_secret());
}

/// Answers an item with an error code (`[a-z0-9_]{1,63}`; the key
/// service's own constants).
pub fn write_error(out: &mut SecretBuf, code: &str) {
    // Anything else would make the whole answer unreadable: it goes as
    // the generic code instead.
    let code = if is_code(code) { code } else { "cannot_decrypt" };
    out.extend_from_slice(&[code.len() as u8]);
    out.extend_from_slice(code.as_bytes());
}

/// An error code as the answer may carry it: `[a-z0-9_]{1,63}`.
fn is_code(code: &str) -> bool {
    (1..=MAX_CODE_LEN).contains(&code.len())
        && code.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// A decoded answer: the active version and, per item, the DEK or the
/// error code.
pub type UnwrapAnswer = (KekVersion, Vec<Result<Key256, String>>);

/// Reads an answer to a request of `expected` items (the sidecar's side).
/// The DEKs are copied into [`Key256`]s; wiping `bytes` is the caller's.
pub fn decode_answer(bytes: &[u8], expected: usize) -> Result<UnwrapAnswer, Malformed> {
    let (version, mut rest) =
        bytes.split_first_chunk::<4>().ok_or(Malformed("the answer is shorter than its header"))?;
    let mut results = Vec::with_capacity(expected.min(bytes.len() / ANSWER_KEY_LEN + 1));
    while let Some((&tag, after)) = rest.split_first() {
        let len = if tag == 0 { KEY_LEN } else { usize::from(tag) };
        if len > after.len() || (tag != 0 && len > MAX_CODE_LEN) {
            return Err(Malformed("an item of the answer is cut short or too long"));
        }
        let (value, after) = after.split_at(len);
        results.push(if tag == 0 {
            // Copied straight into the key's own (wiped) allocation.
            let key = Key256::decode_with(|key| match <&[u8; KEY_LEN]>::try_from(value) {
                Ok(value) => {
                    *key = *value;
                    true
                }
                Err(_) => false,
            });
            Ok(key.ok_or(Malformed("a key is not 32 bytes"))?)
        } else {
            let code = std::str::from_utf8(value)
                .ok()
                .filter(|c| is_code(c))
                .ok_or(Malformed("an error code is not [a-z0-9_]"))?;
            Err(code.to_owned())
        });
        rest = after;
        if results.len() > expected {
            break;
        }
    }
    if results.len() != expected {
        return Err(Malformed("the answer holds a different number of items"));
    }
    Ok((KekVersion::from_be_bytes(*version), results))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(n: u8) -> DekRequest {
        DekRequest {
            record_key_id: RecordKeyId::from_bytes([n; 16]),
            kek_version: 0x0102_0300 + u32::from(n),
            wrapped: WrappedDek::from_slice(&[n ^ 0x5a; WRAPPED_DEK_LEN]).unwrap(),
        }
    }

    #[test]
    fn a_request_round_trips_with_and_without_a_purpose() {
        let items: Vec<_> = (1..=3).map(item).collect();
        let purpose = Name::new("treatment").unwrap();
        for purpose in [None, Some(&purpose)] {
            let bytes = encode_request(purpose, &items);
            assert_eq!(bytes.len(), 1 + purpose.map_or(0, |p| p.as_str().len()) + 3 * 80);
            let back = decode_request(&bytes).unwrap();
            assert_eq!(back.purpose.as_ref(), purpose);
            assert_eq!(back.items.len(), items.len());
            for (back, item) in back.items.iter().zip(&items) {
                assert_eq!(back.record_key_id, item.record_key_id);
                assert_eq!(back.kek_version, item.kek_version);
                assert_eq!(back.wrapped, item.wrapped);
            }
        }
        // The layout is fixed: a known item at a known place.
        let bytes = encode_request(None, &items[..1]);
        assert_eq!(bytes[0], 0);
        assert_eq!(&bytes[1..17], &[1; 16]);
        assert_eq!(&bytes[17..21], &[1, 2, 3, 1]);
        assert_eq!(&bytes[21..], &[1 ^ 0x5a; 60]);
    }

    #[test]
    fn a_malformed_request_is_refused() {
        let good = encode_request(Some(&Name::new("care").unwrap()), &[item(1), item(2)]);
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (vec![], "empty"),
            (vec![0], "no item"),
            (good[..good.len() - 1].to_vec(), "whole number"),
            ([&good[..], &[0]].concat(), "whole number"),
            (vec![64; 200], "purpose's length"),
            (vec![10, b'a'], "purpose's length"),
            ([&[4u8][..], b"Care", &good[5..]].concat(), "not a name"),
            ([&[2u8][..], &[0xff, 0xfe], &good[5..]].concat(), "not a name"),
        ];
        for (bytes, why) in cases {
            let e = decode_request(&bytes).unwrap_err();
            assert!(e.to_string().contains(why), "{bytes:?}: {e}");
        }
    }

    #[test]
    fn an_answer_round_trips_keys_and_codes() {
        let keys = [Key256::from_array(&mut [7; 32]), Key256::from_array(&mut [9; 32])];
        let mut out = SecretBuf::with_capacity(0);
        write_active_version(&mut out, 3);
        write_key(&mut out, &keys[0]);
        write_error(&mut out, "key_destroyed");
        write_key(&mut out, &keys[1]);
        // A code the sidecar could not read goes as the generic one.
        write_error(&mut out, "not-a-code");
        write_error(&mut out, "");
        let (active, results) = decode_answer(out.as_slice(), 5).unwrap();
        assert_eq!(active, 3);
        assert_eq!(results[0].as_ref().unwrap().expose_secret(), &[7; 32]);
        assert_eq!(results[1].as_ref().unwrap_err(), "key_destroyed");
        assert_eq!(results[2].as_ref().unwrap().expose_secret(), &[9; 32]);
        assert_eq!(results[3].as_ref().unwrap_err(), "cannot_decrypt");
        assert_eq!(results[4].as_ref().unwrap_err(), "cannot_decrypt");
    }

    #[test]
    fn a_malformed_answer_is_refused() {
        let mut out = SecretBuf::with_capacity(0);
        write_active_version(&mut out, 1);
        write_key(&mut out, &Key256::from_array(&mut [7; 32]));
        write_error(&mut out, "cannot_decrypt");
        let good = out.as_slice();
        assert!(decode_answer(good, 2).is_ok());
        for (bytes, expected) in
            [(&good[..3], 2), (&good[..good.len() - 1], 2), (good, 1), (good, 3), (&good[..4], 1)]
        {
            assert!(decode_answer(bytes, expected).is_err(), "{} bytes, {expected}", bytes.len());
        }
        let mut bad_code = good.to_vec();
        let at = bad_code.len() - 1;
        bad_code[at] = b'!';
        assert!(decode_answer(&bad_code, 2).is_err());
        let mut too_long = good[..4].to_vec();
        too_long.push(64);
        too_long.extend_from_slice(&[b'a'; 64]);
        assert!(decode_answer(&too_long, 1).is_err());
    }
}
