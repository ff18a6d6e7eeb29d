//! The key service client: mutual TLS with the admin certificate, a
//! timeout on every call, and API errors turned into one-line messages
//! with the exit code they deserve (4xx → 1, transport and 5xx → 3).

use std::error::Error as _;

use reqwest::{Method, Response, StatusCode};
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::error::AdminError;
use super::output::io_reason;
use super::profile::Connection;

/// A connected-on-demand client of one key service.
#[derive(Debug)]
pub(crate) struct Client {
    http: reqwest::Client,
    base: String,
}

impl Client {
    /// Builds the client from the connection's PEM files. Bad or missing
    /// files are usage errors; nothing of a private key is ever printed.
    pub(crate) fn new(connection: &Connection) -> Result<Self, AdminError> {
        let read = |flag: &str, path: &std::path::Path| {
            std::fs::read(path).map_err(|e| {
                AdminError::usage(format!("{flag} {}: {}", path.display(), io_reason(&e)))
            })
        };
        let ca_pem = read("--ca", &connection.ca)?;
        let ca = reqwest::Certificate::from_pem_bundle(&ca_pem)
            .ok()
            .filter(|certs| !certs.is_empty())
            .ok_or_else(|| {
                AdminError::usage(format!(
                    "--ca {}: no PEM certificate in the file",
                    connection.ca.display()
                ))
            })?;
        let mut pem = zeroize::Zeroizing::new(read("--cert", &connection.cert)?);
        pem.push(b'\n');
        pem.extend_from_slice(&zeroize::Zeroizing::new(read("--key", &connection.key)?));
        let identity = reqwest::Identity::from_pem(&pem).map_err(|_| {
            AdminError::usage(format!(
                "--cert {} / --key {}: not a PEM certificate and matching private key",
                connection.cert.display(),
                connection.key.display()
            ))
        })?;
        let http = reqwest::Client::builder()
            .tls_certs_only(ca)
            .identity(identity)
            .timeout(connection.timeout)
            .connect_timeout(connection.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| AdminError::usage(format!("cannot set up TLS: {}", cause(&e))))?;
        Ok(Self { http, base: connection.url.clone() })
    }

    /// `GET path` → JSON.
    pub(crate) async fn get(&self, path: &str) -> Result<Value, AdminError> {
        self.call(Method::GET, path, None).await
    }

    /// `POST path` with a JSON body → JSON.
    pub(crate) async fn post(&self, path: &str, body: &Value) -> Result<Value, AdminError> {
        self.call(Method::POST, path, Some(body)).await
    }

    /// `POST path` without a body → JSON.
    pub(crate) async fn post_empty(&self, path: &str) -> Result<Value, AdminError> {
        self.call(Method::POST, path, None).await
    }

    /// `PUT path` with a JSON body → JSON.
    pub(crate) async fn put(&self, path: &str, body: &Value) -> Result<Value, AdminError> {
        self.call(Method::PUT, path, Some(body)).await
    }

    /// Sends a request and returns the successful response unread (for
    /// streaming answers such as the audit export).
    pub(crate) async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Response, AdminError> {
        let mut request = self.http.request(method.clone(), format!("{}{path}", self.base));
        if let Some(body) = body {
            request = request.json(body);
        }
        let response =
            request.send().await.map_err(|e| transport_error("the key service", &self.base, &e))?;
        if response.status().is_success() {
            return Ok(response);
        }
        Err(api_error(response, &format!("{method} {path}")).await)
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, AdminError> {
        let response = self.send(method, path, body).await?;
        let bytes = response
            .bytes()
            .await
            .map_err(|e| transport_error("the key service", &self.base, &e))?;
        if bytes.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&bytes).map_err(|e| {
            AdminError::unavailable(format!(
                "the key service answered something that is not JSON: {e}"
            ))
        })
    }
}

/// Reads a typed view of an answer; a shape this CLI does not understand
/// is reported as a service problem (exit 3), not a crash.
pub(crate) fn decode<T: DeserializeOwned>(value: &Value, what: &str) -> Result<T, AdminError> {
    T::deserialize(value).map_err(|e| {
        AdminError::unavailable(format!("unexpected answer from the key service for {what}: {e}"))
    })
}

/// An error answer (`{"error":{"code","message"}}`) as `message (code)`:
/// 4xx → refused (1), anything else → unavailable (3).
pub(crate) async fn api_error(response: Response, what: &str) -> AdminError {
    let status = response.status();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    let field = |name: &str| {
        body.pointer(&format!("/error/{name}")).and_then(Value::as_str).map(str::to_owned)
    };
    let message = match (field("message"), field("code")) {
        (Some(m), Some(code)) if code == "not_found" && status == StatusCode::NOT_FOUND => format!(
            "{m} ({code}): {what} is not offered by this server (is it older than this CLI?)"
        ),
        (Some(m), Some(code)) => format!("{m} ({code})"),
        (Some(m), None) => m,
        (None, Some(code)) => code,
        (None, None) => format!("{what}: HTTP {status}"),
    };
    if status.is_client_error() {
        AdminError::refused(message)
    } else {
        AdminError::unavailable(message)
    }
}

/// A request that got no HTTP answer: connection, TLS or timeout (exit 3),
/// with the most useful cause found in the error chain.
pub(crate) fn transport_error(who: &str, at: &str, e: &reqwest::Error) -> AdminError {
    let reason = if e.is_timeout() {
        "no answer in time".to_owned()
    } else {
        match tls_error(e) {
            Some(rustls::Error::InvalidCertificate(c)) => {
                format!("its TLS certificate is not trusted ({c}); check the CA bundle (--ca)")
            }
            Some(rustls::Error::AlertReceived(alert)) => refused_handshake(&format!("{alert:?}")),
            Some(other) => format!("TLS failure: {other}"),
            None => cause(e),
        }
    };
    AdminError::unavailable(format!("cannot reach {who} at {at}: {reason}"))
}

/// The rustls error somewhere in `e`'s source chain, if any (it may sit
/// inside `io::Error`s nested in each other, which `source()` skips).
fn tls_error(e: &reqwest::Error) -> Option<&rustls::Error> {
    let mut source = e.source();
    while let Some(s) = source {
        if let Some(tls) = s.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        let mut io = s.downcast_ref::<std::io::Error>();
        while let Some(inner) = io.and_then(std::io::Error::get_ref) {
            if let Some(tls) = inner.downcast_ref::<rustls::Error>() {
                return Some(tls);
            }
            io = inner.downcast_ref::<std::io::Error>();
        }
        source = s.source();
    }
    None
}

/// The innermost cause's text (reqwest's own text repeats the URL).
fn cause(e: &reqwest::Error) -> String {
    let mut innermost: &dyn std::error::Error = e;
    while let Some(next) = innermost.source() {
        innermost = next;
    }
    let text = innermost.to_string();
    // After the handshake (TLS 1.3) the alert reaches the client as text.
    if let Some(alert) = text.split_once("received fatal alert: ").map(|(_, a)| a.trim()) {
        return refused_handshake(alert);
    }
    // What a TLS 1.3 client sees when the server drops it right after the
    // handshake (typically over its certificate) before the alert is read.
    let dropped = |reason: &str| {
        format!("{reason} (if the service is up, it may have refused the client certificate)")
    };
    if let Some(io) = innermost.downcast_ref::<std::io::Error>() {
        use std::io::ErrorKind;
        return match io.kind() {
            ErrorKind::ConnectionRefused => "connection refused".to_owned(),
            ErrorKind::NotFound => "no such socket".to_owned(),
            ErrorKind::ConnectionReset
            | ErrorKind::ConnectionAborted
            | ErrorKind::BrokenPipe
            | ErrorKind::UnexpectedEof => dropped(&io_reason(io)),
            _ => io_reason(io),
        };
    }
    if text.contains("connection closed") || text.contains("unexpected EOF") {
        return dropped(&text);
    }
    text
}

/// The server sent a TLS alert: almost always about the client certificate.
fn refused_handshake(alert: &str) -> String {
    format!(
        "it refused the TLS handshake (alert {alert}): is the client certificate (--cert) \
         issued by a CA it trusts, still valid, and matching --key?"
    )
}
