//! The `[abuse]` tables of the key service's and the sidecar's configs.

use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// Longer than the 90 s for which reqwest's and hyper's clients keep an
/// idle connection by default, so that a client reusing one does not race
/// the server closing it.
const DEFAULT_IDLE_TIMEOUT_SECS: u64 = 120;

/// The slow-client timeouts of either `[abuse]` table, named as in the file.
fn timeouts(header: u64, body: u64, idle: u64) -> [(&'static str, Duration); 3] {
    [
        ("abuse.header_read_timeout_secs", Duration::from_secs(header)),
        ("abuse.body_read_timeout_secs", Duration::from_secs(body)),
        ("abuse.idle_timeout_secs", Duration::from_secs(idle)),
    ]
}

/// Reads a rate (requests per second): a finite number, 0 (no limit) or
/// more. NaN, an infinity or a negative number would each switch the
/// limit off without saying so.
fn rate<'de, D: Deserializer<'de>>(deserializer: D) -> Result<f64, D::Error> {
    let rate = f64::deserialize(deserializer)?;
    if rate.is_finite() && rate >= 0.0 {
        Ok(rate)
    } else {
        Err(serde::de::Error::custom(format!(
            "a rate must be a finite number of requests per second, 0 (no limit) or more, \
             not {rate}"
        )))
    }
}

/// Key service `[abuse]`: per-identity rate limit, slow-client timeouts,
/// JSON nesting.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AbuseConfig {
    /// Sustained requests per second per client identity (0: no limit).
    #[serde(deserialize_with = "rate")]
    pub rate_per_sec: f64,
    /// Requests an identity may send at once above the sustained rate.
    pub burst: u32,
    /// Seconds a client has to send a request's headers (HTTP/1; the
    /// connection is closed after that).
    pub header_read_timeout_secs: u64,
    /// Seconds a client has to send a request body (408 after that).
    pub body_read_timeout_secs: u64,
    /// Seconds a connection may sit with no request in flight and no byte
    /// moving before it is closed.
    pub idle_timeout_secs: u64,
    /// Deepest nesting of arrays and objects accepted in a JSON body.
    pub max_json_depth: usize,
    /// Most identities tracked at once (refilled buckets are dropped first).
    pub max_tracked_identities: usize,
}

impl Default for AbuseConfig {
    fn default() -> Self {
        Self {
            rate_per_sec: 5_000.0,
            burst: 10_000,
            header_read_timeout_secs: 30,
            body_read_timeout_secs: 30,
            idle_timeout_secs: DEFAULT_IDLE_TIMEOUT_SECS,
            max_json_depth: 64,
            max_tracked_identities: 100_000,
        }
    }
}

impl AbuseConfig {
    /// Its timeouts, named as in the file.
    pub(crate) fn durations(&self) -> [(&'static str, Duration); 3] {
        timeouts(self.header_read_timeout_secs, self.body_read_timeout_secs, self.idle_timeout_secs)
    }

    /// The HTTP/1 header read timeout.
    pub fn header_read_timeout(&self) -> Duration {
        Duration::from_secs(self.header_read_timeout_secs.max(1))
    }

    /// How long a connection may sit idle.
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.idle_timeout_secs.max(1))
    }
}

/// Sidecar `[abuse]`: limits per app connection, slow-client timeouts.
/// (The JSON depth limit is `limits.max_depth`, for records.)
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SidecarAbuseConfig {
    /// Requests in flight at once on one connection (HTTP/2 multiplexes).
    pub max_concurrent_per_connection: usize,
    /// Sustained requests per second on one connection (0: no limit).
    #[serde(deserialize_with = "rate")]
    pub rate_per_sec_per_connection: f64,
    /// Requests one connection may send at once above the sustained rate.
    pub burst_per_connection: u32,
    /// Seconds a client has to send a request's headers (HTTP/1).
    pub header_read_timeout_secs: u64,
    /// Seconds a client has to send a request body (408 after that).
    pub body_read_timeout_secs: u64,
    /// Seconds a connection may sit with no request in flight and no byte
    /// moving before it is closed.
    pub idle_timeout_secs: u64,
}

impl Default for SidecarAbuseConfig {
    fn default() -> Self {
        Self {
            max_concurrent_per_connection: 128,
            rate_per_sec_per_connection: 20_000.0,
            burst_per_connection: 40_000,
            header_read_timeout_secs: 30,
            body_read_timeout_secs: 30,
            idle_timeout_secs: DEFAULT_IDLE_TIMEOUT_SECS,
        }
    }
}

impl SidecarAbuseConfig {
    /// Its timeouts, named as in the file.
    pub(crate) fn durations(&self) -> [(&'static str, Duration); 3] {
        timeouts(self.header_read_timeout_secs, self.body_read_timeout_secs, self.idle_timeout_secs)
    }

    /// The HTTP/1 header read timeout.
    pub fn header_read_timeout(&self) -> Duration {
        Duration::from_secs(self.header_read_timeout_secs.max(1))
    }

    /// How long a connection may sit idle.
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.idle_timeout_secs.max(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rate_is_finite_and_not_negative() {
        let key_service = |rate: &str| {
            toml::from_str::<AbuseConfig>(&format!("rate_per_sec = {rate}")).map(|c| c.rate_per_sec)
        };
        let sidecar = |rate: &str| {
            toml::from_str::<SidecarAbuseConfig>(&format!("rate_per_sec_per_connection = {rate}"))
                .map(|c| c.rate_per_sec_per_connection)
        };
        for ok in ["0.0", "0.25", "5000.0"] {
            assert_eq!(key_service(ok).unwrap(), ok.parse::<f64>().unwrap());
            assert_eq!(sidecar(ok).unwrap(), ok.parse::<f64>().unwrap());
        }
        for bad in ["nan", "inf", "-inf", "-1.0"] {
            let e = key_service(bad).unwrap_err().to_string();
            assert!(e.contains("a rate must be a finite number"), "{bad}: {e}");
            let e = sidecar(bad).unwrap_err().to_string();
            assert!(e.contains("a rate must be a finite number"), "{bad}: {e}");
        }
        // Unset, the default.
        assert_eq!(toml::from_str::<AbuseConfig>("").unwrap().rate_per_sec, 5_000.0);
    }
}
