//! The sidecar calls the client makes, named so errors can say which one failed.

use std::fmt;

/// One sidecar API call. Every [`Error`](crate::Error) that reached the
/// sidecar (or tried to) records which call it came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Operation {
    /// `POST /v1/encrypt`.
    Encrypt,
    /// `POST /v1/decrypt`.
    Decrypt,
    /// `POST /v1/rewrap`.
    Rewrap,
    /// `POST /v1/index`.
    Index,
    /// `POST /v1/pseudonym`.
    Pseudonym,
    /// `GET /healthz`.
    Health,
    /// `GET /readyz`.
    Ready,
}

impl Operation {
    /// A stable lower-case name (`"encrypt"`, `"decrypt"`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Encrypt => "encrypt",
            Self::Decrypt => "decrypt",
            Self::Rewrap => "rewrap",
            Self::Index => "index",
            Self::Pseudonym => "pseudonym",
            Self::Health => "health",
            Self::Ready => "ready",
        }
    }

    /// The request path on the sidecar.
    pub(crate) fn path(self) -> &'static str {
        match self {
            Self::Encrypt => "/v1/encrypt",
            Self::Decrypt => "/v1/decrypt",
            Self::Rewrap => "/v1/rewrap",
            Self::Index => "/v1/index",
            Self::Pseudonym => "/v1/pseudonym",
            Self::Health => "/healthz",
            Self::Ready => "/readyz",
        }
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
