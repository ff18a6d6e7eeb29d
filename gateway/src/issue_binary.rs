//! The binary form of the key service's answer to a batch issue,
//! `application/vnd.keygate.datakeys.v1`: what the sidecar's DEK pool asks
//! for, in fixed-size fields where the JSON answer spells every id in hex
//! and every key in base64 (docs/performance.md, item 34). The request
//! stays `{"count":N}` in JSON; the sidecar names this form in `Accept`,
//! and the key service answers in it only when asked. A key service that
//! predates this form ignores `Accept` and answers JSON, which the sidecar
//! reads as before: no fallback state is needed on either side.
//!
//! Answer: the KEK version the keys are wrapped under (u32, big-endian),
//! then for each key its record key id (16 bytes), its wrapped form
//! (60 bytes) and the DEK (32 bytes).

use axum::http::{HeaderMap, header};
use kms_core::{IssuedDek, KEY_LEN, KekVersion, Key256, RecordKeyId, SecretBuf};
use kms_core::{WRAPPED_DEK_LEN, WrappedDek};

pub use crate::unwrap_binary::Malformed;

/// The media type of the answer.
pub const CONTENT_TYPE: &str = "application/vnd.keygate.datakeys.v1";

/// The sidecar's `Accept`: this form, JSON (all a key service older than
/// it knows) otherwise.
pub const ACCEPT: &str = "application/vnd.keygate.datakeys.v1, application/json;q=0.5";

/// One key's length in the answer.
pub const KEY_ITEM_LEN: usize = RecordKeyId::LEN + WRAPPED_DEK_LEN + KEY_LEN;

/// Whether the request's `Accept` asks for this form: names it, with a
/// weight above 0 and at least JSON's (that of `application/json`, or
/// failing it `application/*`, or `*/*`, as RFC 9110 ranks ranges). A
/// range whose weight is not a number from 0 to 1 is ignored.
pub fn is_asked(headers: &HeaderMap) -> bool {
    let (mut ours, mut json, mut application, mut any) = (None, None, None, None);
    let ranges = headers.get_all(header::ACCEPT).iter().filter_map(|v| v.to_str().ok());
    for range in ranges.flat_map(|value| value.split(',')) {
        let mut parts = range.split(';').map(str::trim);
        let essence = parts.next().unwrap_or_default();
        let mut weight = Some(1.0f32);
        for parameter in parts {
            if let Some(q) = parameter.strip_prefix("q=").or_else(|| parameter.strip_prefix("Q=")) {
                weight = q.parse().ok().filter(|q| (0.0..=1.0).contains(q));
            }
        }
        let Some(weight) = weight else { continue };
        let is = |name: &str| essence.eq_ignore_ascii_case(name);
        let slot = if is(CONTENT_TYPE) {
            &mut ours
        } else if is("application/json") {
            &mut json
        } else if is("application/*") {
            &mut application
        } else if is("*/*") {
            &mut any
        } else {
            continue;
        };
        *slot = Some(slot.map_or(weight, |w: f32| w.max(weight)));
    }
    let json = json.or(application).or(any).unwrap_or(0.0);
    ours.is_some_and(|q| q > 0.0 && q >= json)
}

/// Writes the answer for `issued`, all wrapped under `kek_version` (the
/// key service's side).
pub fn write_answer(kek_version: KekVersion, issued: &[IssuedDek]) -> SecretBuf {
    let mut out = SecretBuf::with_capacity(4 + issued.len() * KEY_ITEM_LEN);
    out.extend_from_slice(&kek_version.to_be_bytes());
    for dek in issued {
        out.extend_from_slice(dek.record_key_id.as_bytes());
        out.extend_from_slice(dek.wrapped.as_bytes());
        out.extend_from_slice(dek.dek().expose_secret());
    }
    out
}

/// Reads an answer that must hold exactly `expected` keys (the sidecar's
/// side). The DEKs are copied into [`Key256`]s; wiping `bytes` is the
/// caller's.
pub fn decode_answer(bytes: &[u8], expected: usize) -> Result<Vec<IssuedDek>, Malformed> {
    let (version, keys) =
        bytes.split_first_chunk::<4>().ok_or(Malformed("the answer is shorter than its header"))?;
    if keys.len() % KEY_ITEM_LEN != 0 {
        return Err(Malformed("the keys are not a whole number of 108-byte items"));
    }
    if keys.len() / KEY_ITEM_LEN != expected {
        return Err(Malformed("the answer holds a different number of keys"));
    }
    let kek_version = KekVersion::from_be_bytes(*version);
    keys.chunks_exact(KEY_ITEM_LEN)
        .map(|item| {
            let (id, rest) = item.split_first_chunk::<{ RecordKeyId::LEN }>()?;
            let (wrapped, dek) = rest.split_at_checked(WRAPPED_DEK_LEN)?;
            let dek = <&[u8; KEY_LEN]>::try_from(dek).ok()?;
            // Copied straight into the key's own (wiped) allocation.
            let dek = Key256::decode_with(|key| {
                *key = *dek;
                true
            })?;
            Some(IssuedDek::new(
                RecordKeyId::from_bytes(*id),
                kek_version,
                WrappedDek::from_slice(wrapped)?,
                dek,
            ))
        })
        .collect::<Option<Vec<_>>>()
        // Unreachable: every chunk is exactly one item long.
        .ok_or(Malformed("a key is not 108 bytes"))
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    fn issued(n: u8, version: KekVersion) -> IssuedDek {
        IssuedDek::new(
            RecordKeyId::from_bytes([n; 16]),
            version,
            WrappedDek::from_slice(&[n ^ 0x5a; WRAPPED_DEK_LEN]).unwrap(),
            Key256::from_array(&mut [n ^ 0xa5; KEY_LEN]),
        )
    }

    #[test]
    fn an_answer_round_trips_and_its_layout_is_fixed() {
        let keys: Vec<_> = (1..=3).map(|n| issued(n, 0x0102_0304)).collect();
        let out = write_answer(0x0102_0304, &keys);
        let bytes = out.as_slice();
        assert_eq!(bytes.len(), 4 + 3 * 108);
        assert_eq!(&bytes[..4], &[1, 2, 3, 4]);
        assert_eq!(&bytes[4..20], &[1; 16]);
        assert_eq!(&bytes[20..80], &[1 ^ 0x5a; 60]);
        assert_eq!(&bytes[80..112], &[1 ^ 0xa5; 32]);
        let back = decode_answer(bytes, 3).unwrap();
        for (back, key) in back.iter().zip(&keys) {
            assert_eq!(back.record_key_id, key.record_key_id);
            assert_eq!(back.kek_version, 0x0102_0304);
            assert_eq!(back.wrapped, key.wrapped);
            assert_eq!(back.dek().expose_secret(), key.dek().expose_secret());
        }
        assert!(decode_answer(write_answer(7, &[]).as_slice(), 0).unwrap().is_empty());
    }

    #[test]
    fn an_answer_off_by_any_length_or_count_is_refused() {
        let keys: Vec<_> = (1..=2).map(|n| issued(n, 1)).collect();
        let out = write_answer(1, &keys);
        let good = out.as_slice();
        let cases: [(&[u8], usize, &str); 6] = [
            (&[], 0, "shorter than its header"),
            (&good[..3], 2, "shorter than its header"),
            (&good[..good.len() - 1], 2, "whole number"),
            (&[good, &[0]].concat(), 2, "whole number"),
            (good, 1, "different number"),
            (good, 3, "different number"),
        ];
        for (bytes, expected, why) in cases {
            let e = decode_answer(bytes, expected).unwrap_err();
            assert!(e.to_string().contains(why), "{} bytes, {expected}: {e}", bytes.len());
        }
    }

    #[test]
    fn the_form_is_asked_only_by_name_and_never_with_weight_zero() {
        let asked = |values: &[&str]| {
            let mut headers = HeaderMap::new();
            for v in values {
                headers.append(header::ACCEPT, HeaderValue::from_str(v).unwrap());
            }
            is_asked(&headers)
        };
        assert!(asked(&[CONTENT_TYPE]));
        assert!(asked(&[ACCEPT]));
        assert!(asked(&["application/vnd.keygate.datakeys.v1, application/json;q=0.5"]));
        assert!(asked(&["application/json", "Application/VND.keygate.datakeys.v1 ; q=1"]));
        assert!(!asked(&[]));
        assert!(!asked(&["application/json"]));
        assert!(!asked(&["*/*"]), "only an explicit ask gets the binary form");
        assert!(!asked(&["application/vnd.keygate.datakeys.v2"]));
        assert!(!asked(&["application/vnd.keygate.datakeys.v1;q=0"]));
        assert!(!asked(&["application/vnd.keygate.datakeys.v1; q=0.000"]));
        // JSON preferred, by name or by a wildcard: JSON.
        assert!(!asked(&["application/json, application/vnd.keygate.datakeys.v1;q=0.1"]));
        assert!(!asked(&["application/vnd.keygate.datakeys.v1;q=0.5, */*"]));
        assert!(!asked(&["application/vnd.keygate.datakeys.v1;q=0.5, application/*;q=0.6"]));
        assert!(asked(&["application/vnd.keygate.datakeys.v1;q=0.5, application/*;q=0.5"]));
        assert!(asked(&[
            "application/vnd.keygate.datakeys.v1;q=0.5, */*;q=0.9, application/json;q=0.2"
        ]));
        // A weight that is not one is not an ask.
        for q in ["nan", "inf", "2", "-1", "", "high"] {
            assert!(!asked(&[&format!("application/vnd.keygate.datakeys.v1;q={q}")]), "q={q}");
        }
    }
}
