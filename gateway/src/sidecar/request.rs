//! What every API request gets around its handler: an id, echoed in
//! `x-request-id` and recorded in its field-level audit events, and a
//! deadline.
//!
//! The id is the app's own when it sends one (the SDK sends the same id on
//! every attempt of a call), else one this sidecar makes. It is the app's
//! claim, not proof: an id listed twice says the app presents two requests
//! as one call retried, and each is still an access. An id is 32 hex
//! digits (the SDK's, a W3C trace id) or a UUID: two fixed forms, never
//! free text, so that an app's own identifiers (a name, an SSN with a
//! birth date, an account number) do not ride in it into the audit log.
//! Any other `x-request-id` is refused (400 `invalid_request_id`) rather
//! than replaced, so an app that means to link its retries learns that it
//! does not.
//!
//! The deadline (`[limits] request_timeout_ms`) starts once the body has
//! been read: the abuse layer reads it whole before the router runs, under
//! `[abuse] body_read_timeout_secs`, so a slow client is bounded there and
//! its upload never eats into the time of the work. Past the deadline the
//! handler is dropped and the app gets 503 `timeout` with `Retry-After`.
//! Dropping is what a client hanging up already does: DEKs a request took
//! from the pool go back to it, a shared key service call goes on for the
//! other requests on it, and field events are recorded with no await after
//! them, so a handler either recorded its events and answered, or did
//! neither (the key service audited any unwrap it made).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus_client::metrics::counter::Counter;
use serde::{Serialize, Serializer};

use crate::error::ApiError;

/// The header that carries a request's id, both ways.
pub(super) const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// The longest id taken: a UUID's text.
const MAX_LEN: usize = 36;
/// The pause asked of the app after a timeout: the deadline passing says
/// the key service is slow or away, and a retry at once adds to its load.
const RETRY_AFTER_SECS: u64 = 1;

/// A request's id: 32 hex digits, or a UUID (8-4-4-4-12 hex digits), held
/// inline.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) struct RequestId {
    len: u8,
    bytes: [u8; MAX_LEN],
}

impl RequestId {
    /// `text` if it is a valid id.
    pub(super) fn parse(text: &[u8]) -> Option<Self> {
        // Two fixed forms only: a free length and free hyphens would let
        // an app's own identifiers through (an SSN and a birth date, an
        // account number), and the audit log keeps what it is given.
        let valid = match text.len() {
            32 => text.iter().all(u8::is_ascii_hexdigit),
            MAX_LEN => text.iter().enumerate().all(|(i, b)| match i {
                8 | 13 | 18 | 23 => *b == b'-',
                _ => b.is_ascii_hexdigit(),
            }),
            _ => false,
        };
        if !valid {
            return None;
        }
        let mut bytes = [0; MAX_LEN];
        bytes.get_mut(..text.len())?.copy_from_slice(text);
        Some(Self { len: u8::try_from(text.len()).ok()?, bytes })
    }

    /// A new id: 128 random bits as 32 lower-case hex digits, as the SDK
    /// makes them.
    fn generate() -> Result<Self, kms_core::crypto::rng::RandomError> {
        const LEN: usize = 32;
        let random = kms_core::crypto::rng::array::<{ LEN / 2 }>()?;
        let mut bytes = [0; MAX_LEN];
        if let Some(hex) = bytes.get_mut(..LEN) {
            data_encoding::HEXLOWER.encode_mut(&random, hex);
        }
        Ok(Self { len: LEN as u8, bytes })
    }

    pub(super) fn as_str(&self) -> &str {
        let text = self.bytes.get(..usize::from(self.len)).unwrap_or_default();
        // Only ASCII is ever stored.
        std::str::from_utf8(text).unwrap_or_default()
    }

    /// Bytes of its text.
    pub(super) fn len(&self) -> usize {
        usize::from(self.len)
    }

    /// The id of a request, from its headers: `None` without one, an error
    /// for anything but exactly one valid id.
    fn from_headers(headers: &HeaderMap) -> Result<Option<Self>, ApiError> {
        let mut values = headers.get_all(REQUEST_ID).iter();
        let Some(value) = values.next() else { return Ok(None) };
        match (Self::parse(value.as_bytes()), values.next()) {
            (Some(id), None) => Ok(Some(id)),
            // Not quoted back: it is the app's text, and may not be an id.
            _ => Err(ApiError::bad_request(
                "invalid_request_id",
                "x-request-id must be one header of 32 hex digits or a UUID \
                 (8-4-4-4-12 hex digits), never data of a record",
            )),
        }
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("RequestId").field(&self.as_str()).finish()
    }
}

impl Serialize for RequestId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

/// The deadline of API requests, and the count of those that passed it.
pub(super) struct RequestScope {
    pub(super) deadline: Duration,
    pub(super) timeouts: Counter,
}

/// Gives the request its id (in its extensions, for the handler), runs
/// it within the deadline, and echoes the id in the answer.
pub(super) async fn scope(
    State(scope): State<Arc<RequestScope>>,
    mut request: Request,
    next: Next,
) -> Response {
    let id = match RequestId::from_headers(request.headers()) {
        Ok(Some(id)) => id,
        Ok(None) => match RequestId::generate() {
            Ok(id) => id,
            // Fail closed: its audit events would carry no id.
            Err(e) => return crate::error::internal(&e).into_response(),
        },
        Err(refused) => return refused.into_response(),
    };
    request.extensions_mut().insert(id);
    let route = request.extensions().get::<MatchedPath>().cloned();
    let mut response = match tokio::time::timeout(scope.deadline, next.run(request)).await {
        Ok(response) => response,
        Err(_) => {
            scope.timeouts.inc();
            let deadline_ms = scope.deadline.as_millis();
            tracing::warn!(
                request_id = %id,
                route = route.as_ref().map_or("unmatched", MatchedPath::as_str),
                deadline_ms,
                "request dropped at its deadline (limits.request_timeout_ms): 503 timeout"
            );
            ApiError::unavailable(
                "timeout",
                format!(
                    "the request passed the sidecar's {deadline_ms} ms deadline and was dropped"
                ),
            )
            .with_retry_after(Some(RETRY_AFTER_SECS))
            .into_response()
        }
    };
    if let Ok(value) = HeaderValue::from_str(id.as_str()) {
        response.headers_mut().insert(REQUEST_ID, value);
    }
    response
}

#[cfg(test)]
mod tests {
    use axum::Router;
    use axum::body::Body;
    use axum::extract::Extension;
    use axum::http::StatusCode;
    use axum::routing::post;
    use tower::ServiceExt;

    use super::*;

    #[test]
    fn only_32_hex_digits_or_a_uuid_are_ids() {
        for good in [
            "0123456789abcdef0123456789abcdef",
            "0123456789ABCDEF0123456789ABCDEF",
            "123e4567-e89b-12d3-a456-426614174000",
        ] {
            assert_eq!(
                RequestId::parse(good.as_bytes()).map(|id| id.to_string()).as_deref(),
                Some(good)
            );
        }
        for bad in [
            "",
            "0123456789abcdef0123456789abcde",      // one short
            "0123456789abcdef0123456789abcdef0",    // one long
            "123-45-6789",                          // an SSN
            "123-45-6789-19800101",                 // an SSN and a birth date
            "4111111111111111",                     // a card number
            "01234567-89ab-cdef0-123-456789abcdef", // hyphens out of place
            "123e4567e89b-12d3-a456-4266141740000",
            "MRN-000123-00000042",
            "jane.doe@example.org",
            "0123456789abcdef 0123456789abcde",
            "0123456789abcdef0123456789abcde\n",
            "0123456789abcdéf0123456789abcde",
        ] {
            assert!(RequestId::parse(bad.as_bytes()).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn generated_ids_are_128_random_bits_in_hex() {
        let (a, b) = (RequestId::generate().unwrap(), RequestId::generate().unwrap());
        assert_ne!(a, b);
        assert_eq!(a.len(), 32);
        assert!(a.as_str().bytes().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        assert_eq!(RequestId::parse(a.as_str().as_bytes()), Some(a));
        assert_eq!(serde_json::to_string(&a).unwrap(), format!("\"{a}\""));
    }

    /// A router whose one route waits `ms` and answers the id it was given.
    fn router(deadline: Duration, timeouts: &Counter) -> Router {
        async fn slow(Extension(id): Extension<RequestId>, body: String) -> String {
            let ms = body.parse().unwrap_or(0);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            id.to_string()
        }
        let scope = Arc::new(RequestScope { deadline, timeouts: timeouts.clone() });
        Router::new()
            .route("/v1/slow", post(slow))
            .layer(axum::middleware::from_fn_with_state(scope, super::scope))
    }

    async fn send(router: &Router, ms: u64, ids: &[&str]) -> (StatusCode, Option<String>, String) {
        let mut request = Request::post("/v1/slow");
        for id in ids {
            request = request.header(REQUEST_ID, *id);
        }
        let response = router
            .clone()
            .oneshot(request.body(Body::from(ms.to_string())).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let echoed = response.headers().get(REQUEST_ID).map(|v| v.to_str().unwrap().to_owned());
        let retry_after = response.headers().get("retry-after").cloned();
        let body = axum::body::to_bytes(response.into_body(), 1 << 16).await.unwrap();
        let mut body = String::from_utf8(body.to_vec()).unwrap();
        if let Some(after) = retry_after {
            body = format!("retry-after {} {body}", after.to_str().unwrap());
        }
        (status, echoed, body)
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_past_its_deadline_is_dropped_with_503_timeout() {
        let timeouts = Counter::default();
        let router = router(Duration::from_millis(1_000), &timeouts);
        let id = "0123456789abcdef0123456789abcdef";
        let (status, echoed, body) = send(&router, 999, &[id]).await;
        assert_eq!((status, echoed.as_deref(), body.as_str()), (StatusCode::OK, Some(id), id));
        let started = tokio::time::Instant::now();
        let (status, echoed, body) = send(&router, 60_000, &[id]).await;
        assert_eq!(started.elapsed(), Duration::from_millis(1_000));
        assert_eq!((status, echoed.as_deref()), (StatusCode::SERVICE_UNAVAILABLE, Some(id)));
        assert!(
            body.starts_with("retry-after 1 ") && body.contains(r#""code":"timeout""#),
            "{body}"
        );
        assert_eq!(timeouts.get(), 1);
        // The next one is served as before.
        assert_eq!(send(&router, 10, &[]).await.0, StatusCode::OK);
        assert_eq!(timeouts.get(), 1);
    }

    #[tokio::test]
    async fn the_id_is_the_apps_or_a_new_one_and_a_bad_one_is_refused() {
        let router = router(Duration::from_secs(5), &Counter::default());
        let (status, echoed, body) = send(&router, 0, &[]).await;
        let made = echoed.unwrap();
        assert_eq!((status, body.as_str()), (StatusCode::OK, made.as_str()));
        assert_eq!(made.len(), 32);
        assert_ne!(send(&router, 0, &[]).await.1.unwrap(), made, "one per request");
        let uuid = "123e4567-e89b-12d3-a456-426614174000";
        assert_eq!(send(&router, 0, &[uuid]).await.2, uuid);
        for bad in [
            vec!["123-45-6789"],
            vec!["jane.doe@example.org-0000000000"],
            vec![&*"a".repeat(65)],
            vec![uuid, uuid],
        ] {
            let (status, echoed, body) = send(&router, 0, &bad).await;
            assert_eq!((status, echoed), (StatusCode::BAD_REQUEST, None), "{bad:?}");
            assert!(body.contains(r#""code":"invalid_request_id""#), "{body}");
            assert!(!body.contains("6789") && !body.contains("jane"), "not quoted back: {body}");
        }
    }
}
