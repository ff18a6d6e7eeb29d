//! The `[abuse]` tables of the key service's and the sidecar's configs.

use std::time::Duration;

use serde::Deserialize;

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

/// Key service `[abuse]`: per-identity rate limit, slow-client timeouts,
/// JSON nesting.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AbuseConfig {
    /// Sustained requests per second per client identity (0: no limit).
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
