//! Wire helpers shared by the key service and its clients.

use axum::body::{Body, Bytes};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use data_encoding::BASE64URL_NOPAD;
use kms_core::fixed_text;
use kms_core::{Key256, SecretBuf};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

/// A 256-bit secret carried as base64url in a JSON body. Serializing and
/// deserializing go straight between the key and the JSON text, wiping the
/// intermediate encodings.
pub struct SecretB64(pub Key256);

impl std::fmt::Debug for SecretB64 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretB64(..)")
    }
}

impl Serialize for SecretB64 {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        key_b64(&&self.0, s)
    }
}

impl<'de> Deserialize<'de> for SecretB64 {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        fixed_text::deserialize_with(d, "a 32-byte key in base64url", |text| {
            Key256::decode_with(|key| fixed_text::decode_exact_into(&BASE64URL_NOPAD, text, key))
                .map(SecretB64)
        })
    }
}

/// A key's length in base64url.
const KEY_TEXT_LEN: usize = fixed_text::base64_nopad_len(kms_core::KEY_LEN);

/// Serializes a borrowed key as base64url (`#[serde(serialize_with)]`),
/// like [`SecretB64`] without taking the key. The encoding is written to a
/// wiped stack buffer, not the heap.
pub fn key_b64<S: serde::Serializer>(key: &&Key256, s: S) -> Result<S::Ok, S::Error> {
    let mut buf = Zeroizing::new([0u8; KEY_TEXT_LEN]);
    s.serialize_str(fixed_text::encode_into(&BASE64URL_NOPAD, key.expose_secret(), &mut *buf))
}

/// A JSON response whose body carries key material (the key service's
/// issue and unwrap answers) or record values (the sidecar's encrypt,
/// decrypt and rewrap answers). axum's `Json` writes
/// into a buffer that doubles as it grows, freeing each outgrown copy
/// unwiped; this serializes into one buffer sized up front from
/// `size_hint` (a [`SecretBuf`], so a wrong hint costs a wiped copy, not a
/// leaked one) that is wiped when the body is dropped after sending. (The
/// HTTP and TLS layers copy what they send into their own buffers; those
/// are out of our reach.)
pub struct SecretJson<T> {
    value: T,
    size_hint: usize,
    held: Option<Held>,
}

/// What a secret body keeps until it has been sent (or dropped unsent):
/// the key service's room for the keys it carries.
type Held = Box<dyn Send>;

impl<T: Serialize> SecretJson<T> {
    /// `value`, expected to serialize to about `size_hint` bytes.
    pub fn new(value: T, size_hint: usize) -> Self {
        Self { value, size_hint, held: None }
    }

    /// Keeps `held` (a semaphore permit, say) until the body has been
    /// sent (or dropped unsent).
    pub fn holding(mut self, held: impl Send + 'static) -> Self {
        self.held = Some(Box::new(held));
        self
    }
}

/// A JSON response already written into a [`SecretBuf`] (the sidecar's
/// record answers, assembled record by record), wiped when the body is
/// dropped after sending, like [`SecretJson`]'s.
pub struct SecretJsonText(pub SecretBuf);

impl IntoResponse for SecretJsonText {
    fn into_response(self) -> Response {
        SecretBody { bytes: self.0, content_type: JSON, _held: None }.into_response()
    }
}

/// A response body of another media type carrying key material (the key
/// service's binary unwrap answer), sent and wiped like [`SecretJson`]'s.
pub struct SecretBytes {
    body: SecretBody,
}

impl SecretBytes {
    /// `bytes` sent as `content_type`, holding `held` until dropped.
    pub fn new(
        bytes: SecretBuf,
        content_type: &'static str,
        held: Option<impl Send + 'static>,
    ) -> Self {
        let held = held.map(|held| Box::new(held) as Held);
        Self { body: SecretBody { bytes, content_type, _held: held } }
    }
}

impl IntoResponse for SecretBytes {
    fn into_response(self) -> Response {
        self.body.into_response()
    }
}

const JSON: &str = "application/json";

/// The bytes of a secret body, its media type, and what it holds until
/// dropped.
struct SecretBody {
    bytes: SecretBuf,
    content_type: &'static str,
    _held: Option<Held>,
}

impl AsRef<[u8]> for SecretBody {
    fn as_ref(&self) -> &[u8] {
        self.bytes.as_slice()
    }
}

impl IntoResponse for SecretBody {
    fn into_response(self) -> Response {
        let content_type = self.content_type;
        ([(header::CONTENT_TYPE, content_type)], Body::from(Bytes::from_owner(self)))
            .into_response()
    }
}

impl<T: Serialize> IntoResponse for SecretJson<T> {
    fn into_response(self) -> Response {
        let mut buf = SecretBuf::with_capacity(self.size_hint);
        match serde_json::to_writer(&mut buf, &self.value) {
            Ok(()) => {
                SecretBody { bytes: buf, content_type: JSON, _held: self.held }.into_response()
            }
            // Only a failing `Serialize` impl gets here; the error text is
            // serde's, which never includes the values.
            Err(e) => {
                tracing::error!(error = %e, "response serialization failed");
                StatusCode::INTERNAL_SERVER_ERROR.into_response()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_rejects() {
        let key = SecretB64(Key256::from_array(&mut [7; 32]));
        let text = serde_json::to_string(&key).unwrap();
        assert_eq!(text, format!("\"{}\"", BASE64URL_NOPAD.encode(&[7; 32])));
        let back: SecretB64 = serde_json::from_str(&text).unwrap();
        assert_eq!(back.0.expose_secret(), &[7; 32]);
        // An escaped first character (serde_json's scratch buffer).
        let escaped = format!("\"\\u00{:x}{}", text.as_bytes()[1], &text[2..]);
        let back: SecretB64 = serde_json::from_str(&escaped).unwrap();
        assert_eq!(back.0.expose_secret(), &[7; 32]);
        let long = format!("{}A\"", &text[..text.len() - 1]);
        for bad in ["\"AAAA\"", "\"!!\"", &long, "32", "null"] {
            let e = serde_json::from_str::<SecretB64>(bad).err().map(|e| e.to_string());
            assert!(e.is_some_and(|e| e.contains("a 32-byte key in base64url")), "{bad}");
        }
        assert_eq!(format!("{key:?}"), "SecretB64(..)");
    }

    #[tokio::test]
    async fn secret_json_is_the_json_text() {
        use http_body_util::BodyExt;
        let key = Key256::from_array(&mut [9; 32]);
        #[derive(Serialize)]
        struct Out<'a> {
            #[serde(serialize_with = "key_b64")]
            dek: &'a Key256,
            n: u32,
        }
        // A hint too small: the buffer grows (wiping) and the text is whole.
        let response = SecretJson::new(Out { dek: &key, n: 3 }, 4).into_response();
        assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let value: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(value["n"], 3);
        let back: SecretB64 = serde_json::from_value(value["dek"].clone()).unwrap();
        assert_eq!(back.0.expose_secret(), &[9; 32]);
    }

    #[tokio::test]
    async fn a_held_permit_returns_when_the_body_is_dropped() {
        use std::sync::Arc;

        use http_body_util::BodyExt;
        let permits = Arc::new(tokio::sync::Semaphore::new(3));
        let permit = permits.clone().acquire_many_owned(3).await.unwrap();
        let response = SecretJson::new([1, 2, 3], 16).holding(permit).into_response();
        assert_eq!(permits.available_permits(), 0, "held while the response exists");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"[1,2,3]");
        assert_eq!(permits.available_permits(), 0, "held by the sent bytes until they go");
        drop(body);
        assert_eq!(permits.available_permits(), 3);
    }
}

/// The actions a sidecar reports: the sidecar writes them and the key
/// service's ingest reads them, so both use this one spelling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub(crate) enum ReportedAction {
    /// Records encrypted.
    #[serde(rename = "record.encrypt")]
    RecordEncrypt,
    /// Records decrypted.
    #[serde(rename = "record.decrypt")]
    RecordDecrypt,
    /// Search tokens made of values the app sent.
    #[serde(rename = "field.index")]
    FieldIndex,
    /// Pseudonyms made of values the app sent.
    #[serde(rename = "field.pseudonym")]
    FieldPseudonym,
}

impl ReportedAction {
    /// The audit event's action.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::RecordEncrypt => "record.encrypt",
            Self::RecordDecrypt => "record.decrypt",
            Self::FieldIndex => "field.index",
            Self::FieldPseudonym => "field.pseudonym",
        }
    }
}

/// Longest application identity a sidecar reports as an event's actor.
pub const MAX_ACTOR_LEN: usize = 1024;

/// Whether `actor` may be reported as an event's actor: an identity, not
/// free text, so 1 to [`MAX_ACTOR_LEN`] bytes and no control characters (a
/// NUL would fail the audit commit on PostgreSQL). The key service's ingest
/// refuses any other, and a sidecar refuses to start with one.
pub fn is_reportable_actor(actor: &str) -> bool {
    !actor.is_empty() && actor.len() <= MAX_ACTOR_LEN && !actor.chars().any(char::is_control)
}
