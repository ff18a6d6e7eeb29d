//! [`Client`]: a cheap-to-clone handle on one connection pool to the sidecar.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use secrecy::SecretString;

use crate::builder::ClientBuilder;
use crate::endpoint::Endpoint;
use crate::retry::RetryPolicy;

/// An async client for one keygate sidecar.
///
/// Build one with [`Client::builder`] and share it: clones share one pool of
/// keep-alive connections, so calls reuse connections instead of opening one
/// each. The operations are in the method list below: [`encrypt`](Self::encrypt),
/// [`decrypt`](Self::decrypt), [`rewrap`](Self::rewrap), their batch forms,
/// [`index`](Self::index), [`pseudonym`](Self::pseudonym),
/// [`health`](Self::health) and [`ready`](Self::ready).
///
/// # Timeouts and retries
///
/// Every attempt is bounded by the [timeout](ClientBuilder::timeout), and a
/// whole call, if you set one, by the [deadline](ClientBuilder::deadline). A call
/// is retried, with a short jittered backoff and up to
/// [`retries`](ClientBuilder::retries) times, only when the sidecar cannot
/// have produced a result the caller saw: the connection could not be made or
/// broke before a complete answer (but not while a success answer was read,
/// [`Error::Interrupted`](crate::Error::Interrupted): the sidecar did the
/// work, and audited it), or the sidecar answered 503
/// `key_service_unavailable` or 503 `timeout` (it dropped the request at its
/// own deadline, shorter than the attempt timeout). An answer that refuses the request
/// (every 4xx, and every other code) is final, and so is a client-side
/// timeout (the sidecar may still be working; a retry would multiply the wait
/// the caller chose). See [`Error::is_retryable`](crate::Error::is_retryable).
///
/// Every attempt of one call carries the same request id (`x-request-id`,
/// 128 random bits in hex, nothing of the records), and each call a new
/// one: the sidecar records it in the call's audit events, so an auditor
/// can tell a call retried from two calls.
///
/// When the key service sheds load, the sidecar's 503 carries its
/// `Retry-After`: the retry then waits at least that long (plus the jittered
/// backoff). If that wait would pass the call's [deadline](ClientBuilder::deadline)
/// (without one: if it is longer than the attempt [timeout](ClientBuilder::timeout)),
/// the call returns the 503 at once, with the pause asked for in
/// [`Error::retry_after`](crate::Error::retry_after). A 429 `rate_limited`
/// is never retried by the client; it too comes with its `retry_after`.
///
/// Repeating a call is safe for every operation:
/// - `decrypt`, `index`, `pseudonym` and `rewrap` are idempotent: the same
///   request gives the same result (a repeated decrypt also records another
///   access in the audit log, which is accurate: the request was made again).
/// - `encrypt` is not idempotent — encrypting again draws a fresh data key
///   and nonce, so the ciphertext differs — but a retried attempt's result was
///   never returned to the caller and so was never stored anywhere. The
///   caller gets exactly one encrypted record, and a record encrypted by an
///   abandoned attempt is simply discarded. Nothing is written twice.
///
/// Health and readiness probes are never retried: they report the sidecar's
/// state at the moment they are made.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

/// What every clone of a client shares.
pub(crate) struct Inner {
    pub(crate) http: reqwest::Client,
    pub(crate) endpoint: Endpoint,
    /// The URL prefix of every request, without a trailing slash.
    pub(crate) base: String,
    pub(crate) token: Option<SecretString>,
    /// Each attempt's timeout.
    pub(crate) timeout: Duration,
    /// The bound on a whole call, retries included.
    pub(crate) deadline: Option<Duration>,
    pub(crate) retry: RetryPolicy,
}

impl Client {
    /// Starts configuring a client (unix socket [`DEFAULT_SOCKET`](crate::DEFAULT_SOCKET),
    /// 30 s timeout per attempt, 2 retries, no deadline, no bearer token).
    pub fn builder() -> ClientBuilder {
        ClientBuilder::new()
    }

    pub(crate) fn from_inner(inner: Arc<Inner>) -> Self {
        Self { inner }
    }

    pub(crate) fn inner(&self) -> &Inner {
        &self.inner
    }
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = self.inner();
        f.debug_struct("Client")
            .field("endpoint", &inner.endpoint.to_string())
            .field("bearer_token", &inner.token.as_ref().map(|_| "<redacted>"))
            .field("timeout", &inner.timeout)
            .field("deadline", &inner.deadline)
            .field("retries", &inner.retry.retries)
            .field("retry_backoff", &inner.retry.base)
            .finish_non_exhaustive()
    }
}
