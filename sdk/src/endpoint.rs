//! Where the sidecar listens: a unix socket or an `http(s)://` URL.

use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;

use reqwest::Url;

use crate::error::Error;

/// The sidecar's default unix socket.
pub const DEFAULT_SOCKET: &str = "/run/keygate/sidecar.sock";

/// A validated sidecar address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Endpoint {
    /// HTTP/1.1 over a unix socket.
    Unix(PathBuf),
    /// `http://` to a loopback address, or `https://` anywhere.
    Url(Url),
}

impl Endpoint {
    /// An address as configuration spells it: a string containing `://` is a
    /// URL, anything else is a socket path.
    pub(crate) fn parse(address: &str) -> Result<Self, Error> {
        if address.contains("://") { Self::url(address) } else { Self::unix(address.into()) }
    }

    /// A unix socket path.
    pub(crate) fn unix(path: PathBuf) -> Result<Self, Error> {
        if path.as_os_str().is_empty() {
            return Err(Error::config("the sidecar socket path is empty"));
        }
        Ok(Self::Unix(path))
    }

    /// An `http://` (loopback only) or `https://` base URL.
    pub(crate) fn url(url: &str) -> Result<Self, Error> {
        // Not echoed until known to hold no credential (user info, a query).
        let parsed = Url::parse(url).map_err(|e| Error::config_with("invalid sidecar URL", e))?;
        if !parsed.username().is_empty() || parsed.password().is_some() {
            // Never echo the URL: it holds a credential.
            return Err(Error::config(
                "the sidecar URL must not contain credentials; use bearer_token",
            ));
        }
        if parsed.query().is_some() || parsed.fragment().is_some() {
            return Err(Error::config("the sidecar URL must not have a query or fragment"));
        }
        match parsed.scheme() {
            "https" => {}
            "http" if is_loopback(&parsed) => {}
            "http" => {
                return Err(Error::config(format!(
                    "plain http is allowed only to a loopback address, not {url:?}: records and \
                     the bearer token would cross the network unencrypted; use https (with \
                     ca_pem) or a unix socket"
                )));
            }
            other => {
                return Err(Error::config(format!(
                    "unsupported sidecar URL scheme {other:?} (expected http or https)"
                )));
            }
        }
        Ok(Self::Url(parsed))
    }

    /// The URL prefix requests are sent to, without a trailing slash.
    pub(crate) fn base(&self) -> String {
        match self {
            // The socket decides where the request goes; the host is nominal.
            Self::Unix(_) => "http://localhost".to_owned(),
            Self::Url(url) => url.as_str().trim_end_matches('/').to_owned(),
        }
    }

    pub(crate) fn is_https(&self) -> bool {
        matches!(self, Self::Url(url) if url.scheme() == "https")
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unix(path) => write!(f, "unix:{}", path.display()),
            Self::Url(url) => f.write_str(url.as_str()),
        }
    }
}

fn is_loopback(url: &Url) -> bool {
    let Some(host) = url.host_str() else { return false };
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    let bare = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    bare.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_urls_are_told_apart() {
        assert_eq!(
            Endpoint::parse("./keygate-dev/sidecar.sock").unwrap(),
            Endpoint::Unix("./keygate-dev/sidecar.sock".into())
        );
        let e = Endpoint::parse("http://127.0.0.1:7070").unwrap();
        assert_eq!(e.base(), "http://127.0.0.1:7070");
        assert_eq!(e.to_string(), "http://127.0.0.1:7070/");
        assert_eq!(
            Endpoint::parse("/run/keygate/sidecar.sock").unwrap().base(),
            "http://localhost"
        );
        assert_eq!(
            Endpoint::parse("/run/keygate/sidecar.sock").unwrap().to_string(),
            "unix:/run/keygate/sidecar.sock"
        );
    }

    #[test]
    fn plain_http_only_to_loopback() {
        for ok in
            ["http://127.0.0.1:1", "http://127.9.9.9:1", "http://[::1]:1", "http://localhost:1"]
        {
            assert!(Endpoint::url(ok).is_ok(), "{ok}");
        }
        for bad in ["http://10.0.0.5:8080", "http://sidecar:8080", "http://0.0.0.0:1"] {
            let e = Endpoint::url(bad).unwrap_err();
            assert!(e.to_string().contains("loopback"), "{bad}: {e}");
        }
        assert!(Endpoint::url("https://sidecar.internal:8443").unwrap().is_https());
    }

    #[test]
    fn a_path_prefix_is_kept() {
        assert_eq!(
            Endpoint::url("https://gw.example/keygate/").unwrap().base(),
            "https://gw.example/keygate"
        );
    }

    #[test]
    fn bad_urls_are_refused_without_echoing_credentials() {
        for leaky in [
            "https://user:hunter2@sidecar:8443",
            "https://sidecar:8443/?token=hunter2",
            "https://user:hunter2@sidecar:99999",
        ] {
            let e = Endpoint::url(leaky).unwrap_err();
            assert!(!format!("{e} {e:?}").contains("hunter2"), "{e:?}");
        }
        assert!(Endpoint::url("ftp://127.0.0.1").is_err());
        assert!(Endpoint::url("http://127.0.0.1/?x=1").is_err());
        assert!(Endpoint::url("http://").is_err());
        assert!(Endpoint::parse("").is_err());
    }
}
