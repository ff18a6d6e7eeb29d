//! One HTTP exchange with the sidecar: build, send, retry, map errors.

use std::time::Duration;

use reqwest::header::{
    ACCEPT, AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue, RETRY_AFTER,
};
use reqwest::{Method, Request};
use secrecy::ExposeSecret;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::client::Client;
use crate::code::parse_error_body;
use crate::error::Error;
use crate::operation::Operation;
use crate::redact::serde_message;

const JSON: &str = "application/json";
/// The header that carries a call's id: the same on every attempt of one
/// call, so that the sidecar's audit events tie a retry to its call.
pub(crate) const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// The largest answer read: a sidecar's encrypt answer is at most four
/// times its body limit (16 MiB by default), and this is four times that.
pub(crate) const MAX_ANSWER_BYTES: usize = 256 * 1024 * 1024;
/// The most memory set aside for an answer before its bytes arrive: its
/// `content-length` is only the peer's word, so a larger answer grows the
/// buffer as it is read instead.
const MAX_UPFRONT_RESERVATION: usize = 1024 * 1024;
/// The longest `Retry-After` passed on; a longer one is capped to it, so a
/// confused peer cannot park a caller that follows it for days.
pub(crate) const MAX_RETRY_AFTER: Duration = Duration::from_secs(60 * 60);

/// One answer as received.
pub(crate) struct Answer {
    pub(crate) status: u16,
    /// Its `Retry-After` (delta-seconds only, capped).
    pub(crate) retry_after: Option<Duration>,
    pub(crate) body: Vec<u8>,
}

/// Without the body: a decrypt answer's is the records in clear.
impl std::fmt::Debug for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Answer")
            .field("status", &self.status)
            .field("retry_after", &self.retry_after)
            .field("body_len", &self.body.len())
            .finish()
    }
}

impl Client {
    /// POSTs `body` as JSON to `op`'s path, with retries, and decodes the
    /// success answer as `R`.
    pub(crate) async fn post<B, R>(&self, op: Operation, body: &B) -> Result<R, Error>
    where
        B: Serialize + ?Sized,
        R: DeserializeOwned,
    {
        let answer = self.post_for_body(op, body).await?;
        decode(op, &answer)
    }

    /// POSTs `body` as JSON to `op`'s path, with retries, and returns the
    /// success answer's body for the caller to decode (borrowing from it).
    /// Every attempt carries the same new request id.
    pub(crate) async fn post_for_body<B>(&self, op: Operation, body: &B) -> Result<Vec<u8>, Error>
    where
        B: Serialize + ?Sized,
    {
        let body = serde_json::to_vec(body)
            .map_err(|e| Error::Encode { op, detail: serde_message(&e) })?;
        let mut request = self.request(Method::POST, op, Some(body))?;
        if let Some(id) = new_request_id() {
            request.headers_mut().insert(REQUEST_ID, id);
        }
        self.send_with_retries(op, request).await
    }

    /// GETs `op`'s path once and returns the answer as it is.
    pub(crate) async fn get(&self, op: Operation) -> Result<Answer, Error> {
        let request = self.request(Method::GET, op, None)?;
        let inner = self.inner();
        let deadline = inner.deadline.and_then(|d| Instant::now().checked_add(d));
        self.attempt(op, request, attempt_timeout(inner.timeout, deadline)).await
    }

    fn request(
        &self,
        method: Method,
        op: Operation,
        body: Option<Vec<u8>>,
    ) -> Result<Request, Error> {
        let inner = self.inner();
        let url = format!("{}{}", inner.base, op.path());
        let mut builder =
            inner.http.request(method, url).header(ACCEPT, HeaderValue::from_static(JSON));
        if let Some(body) = body {
            builder = builder.header(CONTENT_TYPE, HeaderValue::from_static(JSON)).body(body);
        }
        if let Some(token) = &inner.token {
            // Checked by the builder; the header is marked sensitive so that
            // the HTTP stack never prints it either.
            let mut value = HeaderValue::try_from(format!("Bearer {}", token.expose_secret()))
                .map_err(|_| Error::config("the bearer token is not a valid header value"))?;
            value.set_sensitive(true);
            builder = builder.header(AUTHORIZATION, value);
        }
        builder.build().map_err(|e| Error::Encode { op, detail: e.to_string() })
    }

    /// Sends `request` until it succeeds, fails for good, the retry budget is
    /// spent or the wait before the next retry (at least the sidecar's
    /// `Retry-After`) would pass the call's deadline; returns the success
    /// answer's body.
    async fn send_with_retries(&self, op: Operation, request: Request) -> Result<Vec<u8>, Error> {
        let inner = self.inner();
        let policy = inner.retry;
        // Past `Instant`'s range is as good as no deadline.
        let deadline = inner.deadline.and_then(|d| Instant::now().checked_add(d));
        let mut failed: u32 = 0;
        loop {
            let attempt = request
                .try_clone()
                .ok_or_else(|| Error::Encode { op, detail: "the body cannot be resent".into() })?;
            let result = self
                .attempt(op, attempt, attempt_timeout(inner.timeout, deadline))
                .await
                .and_then(|answer| success_body(op, answer));
            let err = match result {
                Ok(body) => return Ok(body),
                Err(err) => err,
            };
            let retry = failed;
            failed = failed.saturating_add(1);
            if !policy.should_retry(failed, &err) {
                return Err(err);
            }
            let wait = policy.wait(retry, &err);
            let too_long = match deadline {
                // A retry that could not start before the deadline cannot help.
                Some(deadline) => deadline.saturating_duration_since(Instant::now()) <= wait,
                // Without a deadline, a pause the sidecar asks for is waited
                // out only if it is no longer than one attempt may take: the
                // caller gets the error (and its `retry_after`) instead of
                // a call parked for up to an hour.
                None => err.retry_after().is_some_and(|asked| asked > inner.timeout),
            };
            if too_long {
                tracing::debug!(%op, request_id = request_id(&request), attempt = failed, ?wait, error = %err, "keygate call gives up: the wait before a retry is too long");
                return Err(err);
            }
            tracing::debug!(%op, request_id = request_id(&request), attempt = failed, ?wait, error = %err, "retrying keygate sidecar call");
            tokio::time::sleep(wait).await;
        }
    }

    /// One exchange within `timeout`: the status and the complete body, or
    /// why there are none. The body is read up to [`MAX_ANSWER_BYTES`]: a
    /// peer that is not a sidecar (an `https://` endpoint can be anything)
    /// cannot make the application hold more.
    async fn attempt(
        &self,
        op: Operation,
        mut request: Request,
        timeout: Duration,
    ) -> Result<Answer, Error> {
        *request.timeout_mut() = Some(timeout);
        let mut response = self
            .inner()
            .http
            .execute(request)
            .await
            .map_err(|e| self.transport_error(op, e, timeout))?;
        let status = response.status().as_u16();
        let retry_after = parse_retry_after(response.headers());
        let too_large = || Error::Decode {
            op,
            detail: format!("the answer is larger than {MAX_ANSWER_BYTES} bytes"),
        };
        let announced = response.content_length().unwrap_or(0);
        if announced > MAX_ANSWER_BYTES as u64 {
            return Err(too_large());
        }
        let reserve = usize::try_from(announced).unwrap_or(0).min(MAX_UPFRONT_RESERVATION);
        let mut body = Vec::with_capacity(reserve);
        // A success answer broken off means the sidecar did the work:
        // that is not retried (`Error::Interrupted`), unlike a failure
        // before it answered, or while it said it could not.
        let read_failed = |e: reqwest::Error| {
            if (200..300).contains(&status) && !e.is_timeout() {
                Error::Interrupted { op, status, source: Box::new(e) }
            } else {
                self.transport_error(op, e, timeout)
            }
        };
        while let Some(chunk) = response.chunk().await.map_err(read_failed)? {
            if body.len().saturating_add(chunk.len()) > MAX_ANSWER_BYTES {
                return Err(too_large());
            }
            body.extend_from_slice(&chunk);
        }
        Ok(Answer { status, retry_after, body })
    }

    fn transport_error(&self, op: Operation, err: reqwest::Error, timeout: Duration) -> Error {
        if err.is_connect() {
            let endpoint = self.inner().endpoint.to_string();
            Error::Connect { op, endpoint, source: Box::new(err) }
        } else if err.is_timeout() {
            Error::Timeout { op, timeout, source: Box::new(err) }
        } else {
            Error::Transport { op, source: Box::new(err) }
        }
    }
}

/// A new call's id: 128 random bits as 32 lower-case hex digits (nothing
/// of the call's records, so no PHI). `None` if the system's random source
/// fails: the call then goes without one, and the sidecar makes an id for
/// each attempt.
fn new_request_id() -> Option<HeaderValue> {
    let mut random = [0u8; 16];
    getrandom::fill(&mut random).ok()?;
    let mut hex = [0u8; 32];
    for (pair, byte) in hex.chunks_exact_mut(2).zip(random) {
        for (out, nibble) in pair.iter_mut().zip([byte >> 4, byte & 0xf]) {
            *out = char::from_digit(u32::from(nibble), 16).map_or(b'0', |c| c as u8);
        }
    }
    HeaderValue::from_bytes(&hex).ok()
}

/// A request's id, for logs.
fn request_id(request: &Request) -> &str {
    request.headers().get(REQUEST_ID).and_then(|v| v.to_str().ok()).unwrap_or_default()
}

/// The timeout of an attempt starting now: the configured one, cut to what
/// remains of the call's deadline.
fn attempt_timeout(timeout: Duration, deadline: Option<Instant>) -> Duration {
    match deadline {
        Some(deadline) => timeout.min(deadline.saturating_duration_since(Instant::now())),
        None => timeout,
    }
}

/// `Retry-After` as delta-seconds, at most [`MAX_RETRY_AFTER`]. The sidecar
/// sends whole seconds; an HTTP date or anything else is ignored.
pub(crate) fn parse_retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // Only digits, so parsing fails only past u64: past the cap anyway.
    let seconds = value.parse::<u64>().unwrap_or(u64::MAX);
    Some(Duration::from_secs(seconds).min(MAX_RETRY_AFTER))
}

/// The body of a 2xx answer, or the error an error answer stands for.
pub(crate) fn success_body(op: Operation, answer: Answer) -> Result<Vec<u8>, Error> {
    let Answer { status, retry_after, body } = answer;
    if (200..300).contains(&status) {
        return Ok(body);
    }
    Err(match parse_error_body(&body) {
        Some((code, message)) => Error::Api { op, status, code, message, retry_after },
        None => Error::UnexpectedStatus { op, status },
    })
}

/// Decodes a success answer (or a part of one), borrowing from it where `R` does.
pub(crate) fn decode<'a, R: Deserialize<'a>>(op: Operation, body: &'a [u8]) -> Result<R, Error> {
    serde_json::from_slice(body).map_err(|e| Error::Decode { op, detail: serde_message(&e) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::code::ErrorCode;

    const OP: Operation = Operation::Encrypt;

    fn answer(status: u16, body: &[u8]) -> Answer {
        Answer { status, retry_after: None, body: body.to_vec() }
    }

    #[test]
    fn error_answers_become_typed_errors() {
        let e = success_body(
            OP,
            answer(
                503,
                br#"{"error":{"code":"key_service_unavailable","message":"key service down"}}"#,
            ),
        )
        .unwrap_err();
        assert!(matches!(
            &e,
            Error::Api { status: 503, code: ErrorCode::KeyServiceUnavailable, message, .. }
                if message == "key service down"
        ));
        assert!(e.is_retryable());
        let e = success_body(OP, answer(502, b"<html>bad gateway</html>")).unwrap_err();
        assert!(matches!(e, Error::UnexpectedStatus { status: 502, .. }));
        assert_eq!(success_body(OP, answer(200, b"{}")).unwrap(), b"{}");
    }

    #[test]
    fn retry_after_is_whole_seconds_capped_and_junk_is_ignored() {
        let parse = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(RETRY_AFTER, HeaderValue::from_str(value).unwrap());
            parse_retry_after(&headers)
        };
        assert_eq!(parse("2"), Some(Duration::from_secs(2)));
        assert_eq!(parse(" 0 "), Some(Duration::ZERO));
        assert_eq!(parse("86400"), Some(MAX_RETRY_AFTER));
        assert_eq!(parse("99999999999999999999999"), Some(MAX_RETRY_AFTER));
        for junk in ["", "-1", "+3", "1.5", "2 s", "Wed, 21 Oct 2015 07:28:00 GMT"] {
            assert_eq!(parse(junk), None, "{junk:?}");
        }
        assert_eq!(parse_retry_after(&HeaderMap::new()), None);
    }

    #[test]
    fn the_retry_after_of_an_error_answer_is_kept() {
        let mut limited = answer(429, br#"{"error":{"code":"rate_limited","message":"slow"}}"#);
        limited.retry_after = Some(Duration::from_secs(2));
        let e = success_body(OP, limited).unwrap_err();
        assert_eq!(e.code(), Some(&ErrorCode::RateLimited));
        assert_eq!(e.retry_after(), Some(Duration::from_secs(2)));
        assert!(!e.is_retryable());
    }

    #[test]
    fn an_attempt_gets_what_remains_of_the_deadline() {
        let timeout = Duration::from_secs(30);
        assert_eq!(attempt_timeout(timeout, None), timeout);
        let soon = Instant::now() + Duration::from_secs(1);
        assert!(attempt_timeout(timeout, Some(soon)) <= Duration::from_secs(1));
        let later = Instant::now() + Duration::from_secs(600);
        assert_eq!(attempt_timeout(timeout, Some(later)), timeout);
        let past = Instant::now().checked_sub(Duration::from_secs(1)).unwrap();
        assert_eq!(attempt_timeout(timeout, Some(past)), Duration::ZERO);
    }

    #[test]
    fn an_answers_debug_never_shows_its_body() {
        let answer = super::Answer {
            status: 200,
            retry_after: None,
            body: br#"{"record":{"ssn":"123-45-6789"}}"#.to_vec(),
        };
        let shown = format!("{answer:?}");
        assert!(shown.contains("200") && !shown.contains("6789"), "{shown}");
    }

    #[test]
    fn undecodable_success_answers_do_not_quote_their_content() {
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        struct Answer {
            record: u32,
        }
        let e = decode::<Answer>(OP, br#"{"record":"123-45-6789"}"#).unwrap_err();
        assert!(matches!(e, Error::Decode { .. }));
        assert!(!e.to_string().contains("6789"), "{e}");
    }
}
