//! One HTTP exchange with the sidecar: build, send, retry, map errors.

use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use reqwest::{Method, Request};
use secrecy::ExposeSecret;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::client::Client;
use crate::code::parse_error_body;
use crate::error::Error;
use crate::operation::Operation;
use crate::redact::serde_message;

const JSON: &str = "application/json";
/// The largest answer read: a sidecar's encrypt answer is at most four
/// times its body limit (16 MiB by default), and this is four times that.
pub(crate) const MAX_ANSWER_BYTES: usize = 256 * 1024 * 1024;

impl Client {
    /// POSTs `body` as JSON to `op`'s path, with retries, and decodes the
    /// success answer as `R`.
    pub(crate) async fn post<B, R>(&self, op: Operation, body: &B) -> Result<R, Error>
    where
        B: Serialize + ?Sized,
        R: DeserializeOwned,
    {
        let body = serde_json::to_vec(body)
            .map_err(|e| Error::Encode { op, detail: serde_message(&e) })?;
        let request = self.request(Method::POST, op, Some(body))?;
        let answer = self.send_with_retries(op, request).await?;
        decode(op, &answer)
    }

    /// GETs `op`'s path once and returns the status and body as they are.
    pub(crate) async fn get(&self, op: Operation) -> Result<(u16, Vec<u8>), Error> {
        let request = self.request(Method::GET, op, None)?;
        self.attempt(op, request).await
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

    /// Sends `request` until it succeeds, fails for good, or the retry budget
    /// is spent; returns the success answer's body.
    async fn send_with_retries(&self, op: Operation, request: Request) -> Result<Vec<u8>, Error> {
        let policy = self.inner().retry;
        let mut failed: u32 = 0;
        loop {
            let attempt = request
                .try_clone()
                .ok_or_else(|| Error::Encode { op, detail: "the body cannot be resent".into() })?;
            let result = self
                .attempt(op, attempt)
                .await
                .and_then(|(status, body)| success_body(op, status, body));
            let err = match result {
                Ok(body) => return Ok(body),
                Err(err) => err,
            };
            let retry = failed;
            failed = failed.saturating_add(1);
            if !policy.should_retry(failed, &err) {
                return Err(err);
            }
            let wait = policy.backoff(retry);
            tracing::debug!(%op, attempt = failed, ?wait, error = %err, "retrying keygate sidecar call");
            tokio::time::sleep(wait).await;
        }
    }

    /// One exchange: the status and the complete body, or why there are none.
    /// The body is read up to [`MAX_ANSWER_BYTES`]: a peer that is not a
    /// sidecar (an `https://` endpoint can be anything) cannot make the
    /// application hold more.
    async fn attempt(&self, op: Operation, request: Request) -> Result<(u16, Vec<u8>), Error> {
        let mut response =
            self.inner().http.execute(request).await.map_err(|e| self.transport_error(op, e))?;
        let status = response.status().as_u16();
        let too_large = || Error::Decode {
            op,
            detail: format!("the answer is larger than {MAX_ANSWER_BYTES} bytes"),
        };
        let announced = response.content_length().unwrap_or(0);
        if announced > MAX_ANSWER_BYTES as u64 {
            return Err(too_large());
        }
        let mut body = Vec::with_capacity(usize::try_from(announced).unwrap_or(0));
        while let Some(chunk) = response.chunk().await.map_err(|e| self.transport_error(op, e))? {
            if body.len().saturating_add(chunk.len()) > MAX_ANSWER_BYTES {
                return Err(too_large());
            }
            body.extend_from_slice(&chunk);
        }
        Ok((status, body))
    }

    fn transport_error(&self, op: Operation, err: reqwest::Error) -> Error {
        let inner = self.inner();
        if err.is_connect() {
            Error::Connect { op, endpoint: inner.endpoint.to_string(), source: Box::new(err) }
        } else if err.is_timeout() {
            Error::Timeout { op, timeout: inner.timeout, source: Box::new(err) }
        } else {
            Error::Transport { op, source: Box::new(err) }
        }
    }
}

/// The body of a 2xx answer, or the error an error answer stands for.
pub(crate) fn success_body(op: Operation, status: u16, body: Vec<u8>) -> Result<Vec<u8>, Error> {
    if (200..300).contains(&status) {
        return Ok(body);
    }
    Err(match parse_error_body(&body) {
        Some((code, message)) => Error::Api { op, status, code, message },
        None => Error::UnexpectedStatus { op, status },
    })
}

/// Decodes a success answer.
pub(crate) fn decode<R: DeserializeOwned>(op: Operation, body: &[u8]) -> Result<R, Error> {
    serde_json::from_slice(body).map_err(|e| Error::Decode { op, detail: serde_message(&e) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::code::ErrorCode;

    const OP: Operation = Operation::Encrypt;

    #[test]
    fn error_answers_become_typed_errors() {
        let e = success_body(
            OP,
            503,
            br#"{"error":{"code":"key_service_unavailable","message":"key service down"}}"#
                .to_vec(),
        )
        .unwrap_err();
        assert!(matches!(
            &e,
            Error::Api { status: 503, code: ErrorCode::KeyServiceUnavailable, message, .. }
                if message == "key service down"
        ));
        assert!(e.is_retryable());
        let e = success_body(OP, 502, b"<html>bad gateway</html>".to_vec()).unwrap_err();
        assert!(matches!(e, Error::UnexpectedStatus { status: 502, .. }));
        assert_eq!(success_body(OP, 200, b"{}".to_vec()).unwrap(), b"{}");
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
