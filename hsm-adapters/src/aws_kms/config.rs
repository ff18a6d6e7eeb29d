//! Configuration of the AWS KMS provider.

use std::net::IpAddr;
use std::time::Duration;

use super::error::AwsKmsError;

/// Most attempts accepted for [`AwsKmsConfig::max_attempts`].
const MAX_ATTEMPTS: u32 = 10;

/// Which KMS key to use, where, and how patiently.
///
/// Credentials are not part of it: [`AwsKmsRootKey::connect`](super::AwsKmsRootKey::connect)
/// takes them from the SDK's default chain (environment, profile, web
/// identity, ECS and EC2 instance roles). Build it with
/// [`AwsKmsConfig::new`] and adjust the public fields.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct AwsKmsConfig {
    /// AWS region, e.g. `eu-west-1`.
    pub region: String,
    /// The KMS key: key id, key ARN, alias name (`alias/…`) or alias ARN.
    /// It is resolved to the key ARN at connect time, and the provider
    /// stays on that key (an alias moved later does not move it).
    pub key_id: String,
    /// Endpoint override: a VPC endpoint or a local emulator. `https://`,
    /// or `http://` to a loopback address only (the wrapped keys travel in
    /// the request); `None` uses the region's public endpoint.
    pub endpoint_url: Option<String>,
    /// Time limit of one attempt (connecting included).
    pub timeout: Duration,
    /// Attempts per call, the first included (the SDK's standard retry
    /// mode: exponential backoff with jitter, retrying throttling,
    /// transient and connection errors).
    pub max_attempts: u32,
    /// Backoff before the first retry; it doubles per retry, with jitter,
    /// up to [`MAX_BACKOFF`](Self::MAX_BACKOFF).
    pub initial_backoff: Duration,
}

impl AwsKmsConfig {
    /// Default [`timeout`](Self::timeout).
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
    /// Default [`max_attempts`](Self::max_attempts).
    pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;
    /// Default [`initial_backoff`](Self::initial_backoff).
    pub const DEFAULT_INITIAL_BACKOFF: Duration = Duration::from_millis(200);
    /// Longest backoff between two attempts.
    pub const MAX_BACKOFF: Duration = Duration::from_secs(5);

    /// A configuration for `key_id` in `region` with the default endpoint,
    /// timeout and retries.
    pub fn new(region: impl Into<String>, key_id: impl Into<String>) -> Self {
        Self {
            region: region.into(),
            key_id: key_id.into(),
            endpoint_url: None,
            timeout: Self::DEFAULT_TIMEOUT,
            max_attempts: Self::DEFAULT_MAX_ATTEMPTS,
            initial_backoff: Self::DEFAULT_INITIAL_BACKOFF,
        }
    }

    /// Checks the values that can be checked without the network.
    pub(super) fn validate(&self) -> Result<(), AwsKmsError> {
        let invalid = |reason: String| Err(AwsKmsError::InvalidConfig { reason });
        let region_ok = !self.region.is_empty()
            && self
                .region
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !region_ok {
            return invalid(format!("{:?} is not an AWS region name", self.region));
        }
        if self.key_id.trim().is_empty() {
            return invalid("the KMS key id is empty".to_owned());
        }
        if let Some(url) = &self.endpoint_url {
            check_endpoint(url)?;
        }
        if self.timeout.is_zero() {
            return invalid("the timeout must be positive".to_owned());
        }
        if !(1..=MAX_ATTEMPTS).contains(&self.max_attempts) {
            return invalid(format!(
                "max_attempts {} is outside 1..={MAX_ATTEMPTS}",
                self.max_attempts
            ));
        }
        Ok(())
    }
}

/// Accepts `https://host…`, and `http://` only to a loopback host; never a
/// user or password in the authority.
///
/// The URL is read with the `http` crate, as the SDK's HTTP stack reads it,
/// so the host checked here is the one the requests go to: a hand-made
/// split would read `http://localhost:1@kms.example` as a loopback host.
fn check_endpoint(url: &str) -> Result<(), AwsKmsError> {
    let invalid = |reason: &str| AwsKmsError::InvalidConfig {
        reason: format!("endpoint URL {:?}: {reason}", endpoint_without_userinfo(url)),
    };
    // AWS KMS authenticates requests with SigV4, never with userinfo; a
    // user or password here is a mistake at best, and it would show in
    // errors and logs. Refused wherever the `@` is: a password holding `/`,
    // `?` or `#` would move it out of what a parser takes as the authority.
    if url.contains('@') {
        return Err(invalid("a user or password in the endpoint URL is not allowed"));
    }
    let uri: http::Uri = url.parse().map_err(|_| invalid("not a URL"))?;
    let (Some(scheme), Some(authority)) = (uri.scheme_str(), uri.authority()) else {
        return Err(invalid("not a URL"));
    };
    let host = authority.host();
    if host.is_empty() {
        return Err(invalid("no host"));
    }
    match scheme {
        "https" => Ok(()),
        "http" if is_loopback(host) => {
            tracing::warn!(
                endpoint = url,
                "AWS KMS endpoint uses plain HTTP; acceptable only for a local emulator"
            );
            Ok(())
        }
        "http" => Err(invalid(
            "plain HTTP is only allowed to a loopback address (keys travel in the request); \
             use https://",
        )),
        _ => Err(invalid("the scheme must be https (or http to a loopback address)")),
    }
}

/// `url` as errors, logs and the audit log may show it: with an `@` in it,
/// everything before the last one is left out (a user, a password, and
/// whatever a password holding `/` or `?` would drag along).
pub fn endpoint_without_userinfo(url: &str) -> String {
    let Some((before, after)) = url.rsplit_once('@') else { return url.to_owned() };
    match before.split_once("://") {
        Some((scheme, _)) if !scheme.contains(['/', '?', '#']) => format!("{scheme}://{after}"),
        _ => after.to_owned(),
    }
}

/// Whether an endpoint URL is plain HTTP, which the configuration allows
/// only to a loopback host: a local emulator answers there, not AWS KMS,
/// so the master key is in software.
pub fn endpoint_is_plain_http(url: &str) -> bool {
    url.trim()
        .parse::<http::Uri>()
        .ok()
        .and_then(|uri| uri.scheme_str().map(|s| s.eq_ignore_ascii_case("http")))
        .unwrap_or(false)
}

/// `host` as [`http::uri::Authority::host`] gives it (an IPv6 address in
/// brackets).
fn is_loopback(host: &str) -> bool {
    let address = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    host.eq_ignore_ascii_case("localhost")
        || address.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}
