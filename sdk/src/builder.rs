//! [`ClientBuilder`]: where the sidecar is, how to authenticate, how long to wait.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use reqwest::Url;
use reqwest::redirect::Policy;
use secrecy::{ExposeSecret, SecretString};

use crate::client::{Client, Inner};
use crate::endpoint::{DEFAULT_SOCKET, Endpoint};
use crate::error::Error;
use crate::retry::RetryPolicy;

/// How long one attempt may take, from sending to the last byte of the answer.
/// Longer than the sidecar's deadline for a request (`[limits]
/// request_timeout_ms`, 20 s by default), past which it drops the work and
/// answers a retryable 503 `timeout`: the attempt hears that answer rather
/// than giving up while the sidecar still works on it, and retries under
/// the same request id. The 10 s between them is
/// room for the answer's way back on a loaded machine. A sidecar whose
/// deadline is at or past this timeout gives up after the client has.
pub(crate) const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long making a connection may take.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Retries after the first attempt, for errors that allow it.
const DEFAULT_RETRIES: u32 = 2;
/// Wait before the first retry; doubles, with jitter.
const DEFAULT_RETRY_BACKOFF: Duration = Duration::from_millis(100);
/// Idle pooled connections are closed after this long: well before the
/// sidecar closes an idle keep-alive connection (its 30 s header read
/// timeout, `[abuse] header_read_timeout_secs`). At equal timers a request
/// sent on a pooled connection just as the sidecar closes it fails as
/// [`Error::Transport`]. (`tests/tests/sdk.rs` checks it against the
/// sidecar's default.)
pub(crate) const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(20);

/// Configures and builds a [`Client`]. Start with [`Client::builder`].
///
/// Without an address the client uses the sidecar's default socket,
/// [`DEFAULT_SOCKET`]. Every setting is checked in [`build`](Self::build),
/// which is the only place that fails.
#[derive(Clone)]
#[must_use]
pub struct ClientBuilder {
    address: Option<Address>,
    token: Option<Token>,
    timeout: Duration,
    deadline: Option<Duration>,
    connect_timeout: Duration,
    retries: u32,
    retry_backoff: Duration,
    ca_pem: Option<Vec<u8>>,
}

/// The sidecar's address as given, validated by `build`.
#[derive(Clone)]
enum Address {
    Unix(PathBuf),
    Url(String),
    Either(String),
}

#[derive(Clone)]
enum Token {
    Value(SecretString),
    File(PathBuf),
}

impl ClientBuilder {
    pub(crate) fn new() -> Self {
        Self {
            address: None,
            token: None,
            timeout: DEFAULT_TIMEOUT,
            deadline: None,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            retries: DEFAULT_RETRIES,
            retry_backoff: DEFAULT_RETRY_BACKOFF,
            ca_pem: None,
        }
    }

    /// Talk HTTP/1.1 over this unix socket (the default is [`DEFAULT_SOCKET`]).
    pub fn unix_socket(mut self, path: impl Into<PathBuf>) -> Self {
        self.address = Some(Address::Unix(path.into()));
        self
    }

    /// Talk to this base URL: `http://` to a loopback address
    /// (`http://127.0.0.1:7070`), or `https://` anywhere (see
    /// [`ca_pem`](Self::ca_pem)). Plain http to any other host is refused by
    /// `build`: records and the bearer token would cross the network in clear.
    pub fn base_url(mut self, url: impl Into<String>) -> Self {
        self.address = Some(Address::Url(url.into()));
        self
    }

    /// Either of the above from one configuration string: a value containing
    /// `://` is a base URL, anything else a socket path. Handy for an
    /// environment variable such as `KEYGATE_SIDECAR`.
    pub fn endpoint(mut self, address: impl Into<String>) -> Self {
        self.address = Some(Address::Either(address.into()));
        self
    }

    /// Send `Authorization: Bearer <token>` with every request. The token is
    /// revealed only to build that header; no `Debug` output shows it.
    pub fn bearer_token(mut self, token: SecretString) -> Self {
        self.token = Some(Token::Value(token));
        self
    }

    /// Like [`bearer_token`](Self::bearer_token), read from a file by `build`
    /// (surrounding whitespace, such as a final newline, is ignored, as the
    /// sidecar ignores it in its own token file).
    pub fn bearer_token_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.token = Some(Token::File(path.into()));
        self
    }

    /// How long one attempt may take, from sending the request to the last
    /// byte of the answer (default 30 s, longer than the sidecar's own
    /// deadline for a request, 20 s by default, after which it answers a
    /// retryable 503 `timeout`; keep it so if you change either). Each retry
    /// gets its own timeout; an attempt that times out is not retried. Without a
    /// [`deadline`](Self::deadline) (which bounds a whole call), it also
    /// bounds the pause before a retry that a sidecar asks for with
    /// `Retry-After`: a longer one is returned to the caller, not waited out.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// How long a whole call may take, its retries and the waits between
    /// them included (default: no bound beyond the attempts' own timeouts).
    /// An attempt gets at most what remains of it; once it has passed, or the
    /// wait before a retry (at least the sidecar's `Retry-After`, if it sent
    /// one) would outlast it, the call returns the last attempt's error.
    /// `build` refuses zero.
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.deadline = Some(deadline);
        self
    }

    /// How long making a connection may take (default 2 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How many times to retry a call after a retryable error (default 2, so
    /// at most 3 attempts). `0` disables retries. See
    /// [`Error::is_retryable`] for what is retried.
    pub fn retries(mut self, retries: u32) -> Self {
        self.retries = retries;
        self
    }

    /// The wait before the first retry (default 100 ms); it doubles with each
    /// further retry, up to 2 s, and is jittered down to half.
    pub fn retry_backoff(mut self, base: Duration) -> Self {
        self.retry_backoff = base;
        self
    }

    /// Trust only the CA certificate(s) in this PEM for an `https://` base
    /// URL, instead of the system's roots. Set for a sidecar with its own CA;
    /// `build` refuses it for a socket or an `http://` URL.
    pub fn ca_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.ca_pem = Some(pem.into());
        self
    }

    /// Checks the settings and builds the client. Does not connect: the
    /// first call does (see [`Client::health`] to check early).
    pub fn build(self) -> Result<Client, Error> {
        let endpoint = match self.address {
            None => Endpoint::unix(DEFAULT_SOCKET.into())?,
            Some(Address::Unix(path)) => Endpoint::unix(path)?,
            Some(Address::Url(url)) => Endpoint::url(&url)?,
            Some(Address::Either(address)) => Endpoint::parse(&address)?,
        };
        let token = match self.token {
            None => None,
            Some(Token::Value(token)) => Some(token),
            Some(Token::File(path)) => Some(read_token(&path)?),
        };
        if let Some(token) = &token {
            check_token(token)?;
        }
        if self.deadline == Some(Duration::ZERO) {
            return Err(Error::config("the deadline must be longer than zero"));
        }

        let mut http = reqwest::Client::builder()
            .timeout(self.timeout)
            .connect_timeout(self.connect_timeout)
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .redirect(Policy::none())
            .no_proxy()
            .user_agent(concat!("keygate-sdk/", env!("CARGO_PKG_VERSION")));
        match (&endpoint, self.ca_pem) {
            (Endpoint::Url(_), Some(pem)) if endpoint.is_https() => {
                let certs = reqwest::Certificate::from_pem_bundle(&pem)
                    .map_err(|e| Error::config_with("ca_pem holds no valid PEM certificate", e))?;
                if certs.is_empty() {
                    return Err(Error::config("ca_pem holds no certificate"));
                }
                http = http.tls_certs_only(certs);
            }
            (_, Some(_)) => {
                return Err(Error::config("ca_pem applies only to an https:// base URL"));
            }
            (Endpoint::Url(_), None) => {}
            (Endpoint::Unix(path), None) => http = unix_socket(http, path)?,
        }
        if let Endpoint::Url(url) = &endpoint {
            http = pin_localhost(http, url);
        }
        let http =
            http.build().map_err(|e| Error::config_with("cannot set up the HTTP client", e))?;
        let base = endpoint.base();
        let retry = RetryPolicy { retries: self.retries, base: self.retry_backoff };
        Ok(Client::from_inner(Arc::new(Inner {
            http,
            endpoint,
            base,
            token,
            timeout: self.timeout,
            deadline: self.deadline,
            retry,
        })))
    }
}

/// Plain http to `localhost` is allowed because it names this machine;
/// resolve it to the loopback addresses ourselves so that a resolver
/// (`/etc/hosts`, DNS search domains) cannot send it, and the records and
/// token with it, anywhere else.
fn pin_localhost(http: reqwest::ClientBuilder, url: &Url) -> reqwest::ClientBuilder {
    if url.host_str() != Some("localhost") {
        return http;
    }
    // Port 0: the URL's own port is used.
    let loopback = [
        SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 0),
        SocketAddr::new(Ipv6Addr::LOCALHOST.into(), 0),
    ];
    http.resolve_to_addrs("localhost", &loopback)
}

#[cfg(unix)]
fn unix_socket(
    http: reqwest::ClientBuilder,
    path: &std::path::Path,
) -> Result<reqwest::ClientBuilder, Error> {
    Ok(http.unix_socket(path.to_path_buf()))
}

#[cfg(not(unix))]
fn unix_socket(
    _: reqwest::ClientBuilder,
    _: &std::path::Path,
) -> Result<reqwest::ClientBuilder, Error> {
    Err(Error::config("unix sockets are not available on this platform; use base_url"))
}

fn read_token(path: &std::path::Path) -> Result<SecretString, Error> {
    let text = SecretString::from(std::fs::read_to_string(path).map_err(|e| {
        Error::config_with(format!("cannot read the bearer token file {}", path.display()), e)
    })?);
    // Surrounding whitespace (a final newline) is not part of the token; the
    // sidecar reads its token file the same way.
    Ok(SecretString::from(text.expose_secret().trim()))
}

/// A token must fit an HTTP header as one word; the error never shows it.
fn check_token(token: &SecretString) -> Result<(), Error> {
    let token = token.expose_secret();
    if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Error::config(
            "the bearer token must be non-empty printable ASCII without spaces",
        ));
    }
    Ok(())
}

impl Default for ClientBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for ClientBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let address = match &self.address {
            None => format!("unix:{DEFAULT_SOCKET} (default)"),
            Some(Address::Unix(path)) => format!("unix:{}", path.display()),
            Some(Address::Either(path)) if !path.contains("://") => format!("unix:{path}"),
            Some(Address::Url(url) | Address::Either(url)) => url_without_secrets(url),
        };
        let token = match &self.token {
            None => "none".to_owned(),
            Some(Token::Value(_)) => "<redacted>".to_owned(),
            Some(Token::File(path)) => format!("<from {}>", path.display()),
        };
        f.debug_struct("ClientBuilder")
            .field("endpoint", &address)
            .field("bearer_token", &token)
            .field("timeout", &self.timeout)
            .field("deadline", &self.deadline)
            .field("connect_timeout", &self.connect_timeout)
            .field("retries", &self.retries)
            .field("retry_backoff", &self.retry_backoff)
            .field("ca_pem", &self.ca_pem.as_ref().map(|pem| format!("{} bytes", pem.len())))
            .finish()
    }
}

/// A URL as given, for `Debug`: scheme, host, port and path only. Not yet
/// checked by `build`, it may hold a password or a token in its query.
fn url_without_secrets(url: &str) -> String {
    let Ok(url) = Url::parse(url) else { return "<invalid URL>".to_owned() };
    let port = url.port().map(|p| format!(":{p}")).unwrap_or_default();
    format!("{}://{}{port}{}", url.scheme(), url.host_str().unwrap_or_default(), url.path())
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::*;

    const TOKEN: &str = "kg-s3cret-T0KEN";

    #[test]
    fn debug_of_builder_and_client_never_shows_the_token() {
        let builder = Client::builder()
            .base_url("http://127.0.0.1:7070")
            .bearer_token(SecretString::from(TOKEN));
        let builder_debug = format!("{builder:?} {builder:#?}");
        assert!(!builder_debug.contains(TOKEN), "{builder_debug}");
        assert!(builder_debug.contains("<redacted>"));
        let client = builder.build().unwrap();
        let client_debug = format!("{client:?} {client:#?}");
        assert!(!client_debug.contains(TOKEN), "{client_debug}");
        assert!(client_debug.contains("<redacted>") && client_debug.contains("127.0.0.1:7070"));
    }

    #[test]
    fn debug_of_builder_never_shows_url_credentials_or_query() {
        let leaky = "https://svc:hunter2@sidecar:8443/kg/?token=x#frag";
        for builder in [Client::builder().base_url(leaky), Client::builder().endpoint(leaky)] {
            let debug = format!("{builder:?} {builder:#?}");
            assert!(!debug.contains("hunter2") && !debug.contains("svc"), "{debug}");
            assert!(!debug.contains("token=x") && !debug.contains("frag"), "{debug}");
            assert!(debug.contains("https://sidecar:8443/kg/"), "{debug}");
        }
        // An unparseable URL is not echoed at all.
        let builder = Client::builder().base_url("https://svc:hunter2@sidecar:99999/?token=x");
        let debug = format!("{builder:?}");
        assert!(!debug.contains("hunter2") && !debug.contains("token=x"), "{debug}");
        assert!(debug.contains("<invalid URL>"), "{debug}");
        let builder = Client::builder().endpoint("./keygate-dev/sidecar.sock");
        assert!(format!("{builder:?}").contains("unix:./keygate-dev/sidecar.sock"));
    }

    #[test]
    fn a_bad_token_is_refused_without_being_shown() {
        let e = Client::builder()
            .base_url("http://127.0.0.1:7070")
            .bearer_token(SecretString::from("kg secret\n"))
            .build()
            .unwrap_err();
        assert!(!e.to_string().contains("kg secret"), "{e}");
        let e = Client::builder().bearer_token(SecretString::from("")).build().unwrap_err();
        assert!(matches!(e, Error::Config { .. }));
    }

    #[test]
    fn a_token_file_is_read_without_surrounding_whitespace() {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        writeln!(file, " {TOKEN}\r").unwrap();
        let client = Client::builder()
            .base_url("http://127.0.0.1:7070")
            .bearer_token_file(file.path())
            .build()
            .unwrap();
        let token = client.inner().token.as_ref().unwrap();
        assert_eq!(token.expose_secret(), TOKEN);
        let e = Client::builder().bearer_token_file("/nonexistent/keygate/token").build();
        assert!(e.unwrap_err().to_string().contains("/nonexistent/keygate/token"));
    }

    #[test]
    fn defaults() {
        let client = Client::builder().build().unwrap();
        let inner = client.inner();
        assert_eq!(inner.endpoint, Endpoint::Unix(DEFAULT_SOCKET.into()));
        assert_eq!(inner.timeout, Duration::from_secs(30));
        assert_eq!(inner.deadline, None);
        assert_eq!(inner.retry, RetryPolicy { retries: 2, base: Duration::from_millis(100) });
        assert!(inner.token.is_none());
    }

    #[test]
    fn a_zero_deadline_is_refused() {
        let e = Client::builder().deadline(Duration::ZERO).build().unwrap_err();
        assert!(e.to_string().contains("deadline"), "{e}");
        let c = Client::builder().deadline(Duration::from_secs(3)).build().unwrap();
        assert_eq!(c.inner().deadline, Some(Duration::from_secs(3)));
    }

    #[test]
    fn ca_pem_only_with_https() {
        let e = Client::builder().unix_socket("/tmp/s.sock").ca_pem("x").build().unwrap_err();
        assert!(e.to_string().contains("https"), "{e}");
        let e = Client::builder().base_url("http://127.0.0.1:1").ca_pem("x").build().unwrap_err();
        assert!(e.to_string().contains("https"), "{e}");
        let e = Client::builder()
            .base_url("https://sidecar:8443")
            .ca_pem("not a certificate")
            .build()
            .unwrap_err();
        assert!(e.to_string().contains("ca_pem"), "{e}");
    }

    #[test]
    fn endpoint_strings_choose_the_transport() {
        let c = Client::builder().endpoint("./keygate-dev/sidecar.sock").build().unwrap();
        assert_eq!(c.inner().endpoint, Endpoint::Unix("./keygate-dev/sidecar.sock".into()));
        let c = Client::builder().endpoint("http://localhost:7070").build().unwrap();
        assert_eq!(c.inner().base, "http://localhost:7070");
        assert!(Client::builder().endpoint("http://192.0.2.1:7070").build().is_err());
    }
}
