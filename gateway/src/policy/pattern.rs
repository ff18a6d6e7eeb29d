//! The validated patterns a grant is made of, and the one matcher they share.
//!
//! Every pattern is either exact or a prefix written with a single trailing
//! `*`; matching is a byte comparison (`==` or `starts_with`), never a regex.

use std::fmt;

use kms_core::TenantId;
use serde::{Deserialize, Serialize};

/// Longest identity pattern, in bytes.
const MAX_IDENTITY_LEN: usize = 2048;
/// Longest class pattern, in bytes (as for schema classes).
const MAX_CLASS_LEN: usize = 128;

/// A policy value was not of the required form.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind} {value:?}: {expected}")]
#[non_exhaustive]
pub struct InvalidValue {
    /// What the value was meant to be ("identity pattern", "role", …).
    pub kind: &'static str,
    /// The rejected value, cut to a printable length.
    pub value: String,
    /// What a valid value looks like.
    pub expected: &'static str,
}

impl InvalidValue {
    pub(super) fn new(kind: &'static str, value: &str, expected: &'static str) -> Self {
        Self { kind, value: value.chars().take(80).collect(), expected }
    }
}

/// The one matcher: `pattern` ending in `*` matches every value that starts
/// with what precedes the `*` (so `"*"` matches everything); any other pattern
/// matches only itself.
fn prefix_match(pattern: &str, value: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => value.starts_with(prefix),
        None => value == pattern,
    }
}

macro_rules! pattern_type {
    ($(#[$doc:meta])* $name:ident, $check:path) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Validates and wraps `value`.
            pub fn new(value: impl Into<String>) -> Result<Self, InvalidValue> {
                let value = value.into();
                $check(&value)?;
                Ok(Self(value))
            }

            /// The pattern as written in the policy file.
            pub fn as_str(&self) -> &str {
                &self.0
            }

            /// Whether `value` matches this pattern.
            pub fn matches(&self, value: &str) -> bool {
                prefix_match(&self.0, value)
            }
        }

        impl TryFrom<String> for $name {
            type Error = InvalidValue;
            fn try_from(value: String) -> Result<Self, InvalidValue> {
                Self::new(value)
            }
        }

        impl From<$name> for String {
            fn from(value: $name) -> String {
                value.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&self.0, f)
            }
        }
    };
}

pattern_type!(
    /// Which client identities a grant applies to: an exact identity
    /// (`spiffe://prod/ns/onc/sa/api`) or a prefix ending in `*`
    /// (`spiffe://prod/ns/onc/*`). A bare `*` is refused.
    IdentityPattern,
    check_identity
);

pattern_type!(
    /// Which tenants a grant applies to: a tenant id (`onc`), a prefix of
    /// one ending in `*` (`onc-*`), or `*` for every tenant.
    TenantPattern,
    check_tenant
);

pattern_type!(
    /// Which field classes a grant covers: an exact class (`phi.clinical`),
    /// a class followed by `.*` (`phi.*` matches `phi.x` and `phi.x.y`, not
    /// `phi` nor `phix.y`), or `*` for every class.
    ClassPattern,
    check_class
);

pattern_type!(
    /// A purpose of use a decryptor grant allows (`treatment`), or `*` for
    /// any purpose, including none stated.
    PurposePattern,
    check_purpose
);

impl TenantPattern {
    /// Whether this pattern covers `tenant`.
    pub fn matches_tenant(&self, tenant: &TenantId) -> bool {
        self.matches(tenant.as_str())
    }

    /// Whether this is `*`, covering every tenant (present and future).
    pub fn is_all(&self) -> bool {
        self.0 == "*"
    }
}

impl PurposePattern {
    /// Whether this pattern allows `purpose` (`None`: no purpose stated,
    /// allowed only by `*`).
    pub fn allows(&self, purpose: Option<&str>) -> bool {
        match purpose {
            Some(purpose) => self.matches(purpose),
            None => self.0 == "*",
        }
    }
}

fn check_identity(value: &str) -> Result<(), InvalidValue> {
    let fail = |expected| Err(InvalidValue::new("identity pattern", value, expected));
    let body = value.strip_suffix('*').unwrap_or(value);
    if value.is_empty() {
        fail("must not be empty")
    } else if body.is_empty() {
        fail("would match every client; name at least a prefix such as \"spiffe://prod/*\"")
    } else if body.contains('*') {
        fail("\"*\" is allowed only as the last character (a prefix pattern)")
    } else if value.len() > MAX_IDENTITY_LEN {
        fail("is longer than 2048 bytes")
    } else if value.chars().any(|c| c.is_whitespace() || c.is_control()) {
        fail("must not contain whitespace or control characters")
    } else if value.contains(':') && !is_uri_identity_pattern(value) {
        fail(
            "is not a URI identity the key service takes (scheme://authority/path in plain \
             ASCII, no empty, '.' or '..' segment, no '%', '?' or '#'), or a prefix of one \
             ending in \"*\": a certificate naming it would have no identity",
        )
    } else if case_insensitive_part(value).bytes().any(|b| b.is_ascii_uppercase()) {
        // Certificate identities come lowercased there (`tls::identity_of`):
        // such a pattern would never match.
        fail("must be lowercase in its scheme and authority (a DNS name: all of it)")
    } else {
        Ok(())
    }
}

/// Whether `pattern` is a URI identity (as `tls::uri_identity` takes one,
/// case aside: that is judged on its own) or a prefix of one ending in `*`.
fn is_uri_identity_pattern(pattern: &str) -> bool {
    let identity = match pattern.strip_suffix('*') {
        // A prefix: anything that continues it into an identity will do.
        Some(prefix) => format!("{prefix}x"),
        None => pattern.to_owned(),
    };
    crate::tls::uri_identity(&identity).is_some()
}

/// The part of an identity that certificates' identities are lowercased
/// in: a URI's `scheme://authority`, or all of a DNS name.
fn case_insensitive_part(identity: &str) -> &str {
    match identity.split_once("://") {
        Some((scheme, rest)) => {
            let end = scheme.len() + 3 + rest.find('/').unwrap_or(rest.len());
            identity.get(..end).unwrap_or(identity)
        }
        None => identity,
    }
}

fn check_tenant(value: &str) -> Result<(), InvalidValue> {
    if value == "*" {
        return Ok(());
    }
    let body = value.strip_suffix('*').unwrap_or(value);
    match TenantId::new(body) {
        Ok(_) => Ok(()),
        Err(_) => Err(InvalidValue::new(
            "tenant pattern",
            value,
            "must be \"*\" or a tenant id ([a-z0-9][a-z0-9_-]{0,62}), optionally ending in \"*\"",
        )),
    }
}

fn check_class(value: &str) -> Result<(), InvalidValue> {
    let body = value.strip_suffix(".*").unwrap_or(value);
    let valid = value == "*"
        || (value.len() <= MAX_CLASS_LEN
            && body.split('.').all(|word| {
                !word.is_empty()
                    && word.bytes().all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_'))
            }));
    if valid {
        Ok(())
    } else {
        Err(InvalidValue::new(
            "class pattern",
            value,
            "must be \"*\" or dot-separated [a-z0-9_]+ words, optionally ending in \".*\"",
        ))
    }
}

fn check_purpose(value: &str) -> Result<(), InvalidValue> {
    if value == "*" || kms_core::Name::new(value).is_ok() {
        Ok(())
    } else {
        Err(InvalidValue::new(
            "purpose",
            value,
            "must be \"*\" or a name matching [a-z0-9][a-z0-9_-]{0,62}",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_patterns() {
        let exact = IdentityPattern::new("spiffe://prod/ns/onc/sa/api").unwrap();
        assert!(exact.matches("spiffe://prod/ns/onc/sa/api"));
        assert!(!exact.matches("spiffe://prod/ns/onc/sa/api2"));
        assert!(!exact.matches("spiffe://prod/ns/onc/sa/ap"));
        let prefix = IdentityPattern::new("spiffe://prod/ns/onc/*").unwrap();
        assert!(prefix.matches("spiffe://prod/ns/onc/sa/api"));
        assert!(!prefix.matches("spiffe://prod/ns/oncology/sa/api"));
        assert!(!prefix.matches("spiffe://prod/ns/onc"));
        for bad in ["", "*", "spiffe://*/sa/api", "a**", "*a", "api host", "a\u{7}"] {
            assert!(IdentityPattern::new(bad).is_err(), "{bad:?}");
        }
        // What certificates' identities are lowercased in must be lowercase
        // here, or the grant would never match; a URI path keeps its case.
        for never in ["SPIFFE://prod/ns", "spiffe://Prod/*", "Api.Example.org", "API*"] {
            let e = IdentityPattern::new(never).unwrap_err().to_string();
            assert!(e.contains("lowercase"), "{never:?}: {e}");
        }
        assert!(IdentityPattern::new("spiffe://prod/ns/Onc/sa/API").is_ok());
        // URIs no certificate could give as an identity (tls::uri_identity).
        for never in
            ["urn:keygate:alice", "spiffe://prod/ns/", "spiffe://prod/a/../b", "spiffe://p/a%20"]
        {
            let e = IdentityPattern::new(never).unwrap_err().to_string();
            assert!(e.contains("not a URI identity"), "{never:?}: {e}");
        }
        for prefix in ["spiffe://prod/*", "spiffe://prod/ns/onc-*", "spiffe://prod*"] {
            assert!(IdentityPattern::new(prefix).is_ok(), "{prefix}");
        }
        assert!(IdentityPattern::new("x".repeat(MAX_IDENTITY_LEN + 1)).is_err());
    }

    #[test]
    fn tenant_patterns() {
        let onc = TenantId::new("onc").unwrap();
        let onc_a = TenantId::new("onc-a").unwrap();
        let oncx = TenantId::new("oncx").unwrap();
        let all = TenantPattern::new("*").unwrap();
        assert!(all.is_all() && all.matches_tenant(&onc) && all.matches_tenant(&oncx));
        let exact = TenantPattern::new("onc").unwrap();
        assert!(exact.matches_tenant(&onc) && !exact.matches_tenant(&onc_a) && !exact.is_all());
        let prefix = TenantPattern::new("onc-*").unwrap();
        assert!(prefix.matches_tenant(&onc_a));
        assert!(!prefix.matches_tenant(&onc) && !prefix.matches_tenant(&oncx));
        for bad in ["", "**", "-*", "Onc", "on*c", "onc/*", &"a".repeat(64)] {
            assert!(TenantPattern::new(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn class_patterns() {
        let phi = ClassPattern::new("phi.*").unwrap();
        assert!(phi.matches("phi.x") && phi.matches("phi.x.y"));
        assert!(!phi.matches("phi") && !phi.matches("phix.y") && !phi.matches("pii.x"));
        let exact = ClassPattern::new("phi").unwrap();
        assert!(exact.matches("phi") && !exact.matches("phi.x"));
        assert!(ClassPattern::new("*").unwrap().matches("anything.at.all"));
        for ok in ["phi", "phi.clinical", "a_1.b.*"] {
            assert!(ClassPattern::new(ok).is_ok(), "{ok:?}");
        }
        for bad in ["", "phi*", "phi.", ".phi", "phi..x", "PHI", "phi.*.x", "phi-x", ".*", "**"] {
            assert!(ClassPattern::new(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn purpose_patterns() {
        let any = PurposePattern::new("*").unwrap();
        assert!(any.allows(None) && any.allows(Some("research")));
        let treatment = PurposePattern::new("treatment").unwrap();
        assert!(treatment.allows(Some("treatment")));
        assert!(!treatment.allows(None) && !treatment.allows(Some("treatment2")));
        for bad in ["", "treat*", "Treatment", "a b"] {
            assert!(PurposePattern::new(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn serde_validates() {
        let ok: TenantPattern = serde_json::from_str("\"onc-*\"").unwrap();
        assert_eq!(serde_json::to_string(&ok).unwrap(), "\"onc-*\"");
        assert!(serde_json::from_str::<TenantPattern>("\"on*c\"").is_err());
        assert!(serde_json::from_str::<ClassPattern>("\"phi*\"").is_err());
    }
}
