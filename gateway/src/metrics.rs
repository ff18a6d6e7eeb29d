//! Prometheus metrics. Labels are route templates, status codes and
//! fixed names only: never tenant data, identities' secrets or key bytes.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of a finished request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The matched route template (`/v1/tenants/{tenant}/datakeys`).
    pub route: String,
    /// HTTP status code.
    pub code: u16,
}

/// Labels of a latency observation.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    /// The matched route template.
    pub route: String,
}

/// Labels of a connection closed as soon as it was accepted.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectionRefusedLabels {
    /// `api` (mutual TLS) or `ops` (`ops_listen`).
    pub listener: &'static str,
    /// The cap it was over: `connections` (`limits.max_connections`),
    /// `handshakes` (`limits.max_handshakes`) or `peer_handshakes`
    /// (`limits.max_handshakes_per_peer`).
    pub reason: &'static str,
}

/// Labels of an issue or unwrap refused 503 `busy`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KeysBusyLabels {
    /// What did not have room in time: `identity_share`
    /// (`limits.max_keys_in_flight_per_identity`) or `pool`
    /// (`limits.max_keys_in_flight`).
    pub wait: &'static str,
}

/// Every metric the key service exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Requests by route and status.
    pub requests: Family<RequestLabels, Counter>,
    /// Request latency by route, in seconds.
    pub latency: Family<RouteLabels, Histogram>,
    /// KEK cache hits (copied from the hierarchy at scrape time).
    pub kek_cache_hits: Gauge<u64, AtomicU64>,
    /// KEK cache misses.
    pub kek_cache_misses: Gauge<u64, AtomicU64>,
    /// Unwrapped keys currently cached.
    pub kek_cache_entries: Gauge<u64, AtomicU64>,
    /// Audit events waiting for their group commit.
    pub audit_queue_depth: Gauge<u64, AtomicU64>,
    /// Audit events committed.
    pub audit_events: Counter,
    /// Audit commits that failed (each refuses its requests).
    pub audit_failures: Counter,
    /// Audit group commits (transactions) written.
    pub audit_commits: Counter,
    /// Connections closed as soon as they were accepted, by listener and cap.
    pub connections_refused: Family<ConnectionRefusedLabels, Counter>,
    /// Issue and unwrap requests refused 503 `busy` (no room for their
    /// keys within `limits.keys_wait_ms`), by what they waited for.
    pub keys_busy: Family<KeysBusyLabels, Counter>,
    /// Connections closed because an answer carrying keys was not taken
    /// within `limits.keys_send_timeout_secs`.
    pub key_sends_overdue: Counter,
    /// Policy reloads (SIGHUP) that failed, leaving the previous policy in
    /// force: a revocation that did not take is otherwise only a log line.
    pub policy_reload_failures: Counter,
    /// When the policy in force was loaded, in seconds since the epoch.
    pub policy_loaded: Gauge,
    /// TLS reloads (SIGHUP or a changed file) that failed, leaving the
    /// previous certificates in force: a renewal that did not take is
    /// otherwise only a log line until the old certificate expires.
    pub tls_reload_failures: Counter,
    /// When the TLS configuration in force was loaded, in seconds since
    /// the epoch.
    pub tls_loaded: Gauge,
    /// When the server certificate in force expires (its `notAfter`), in
    /// seconds since the epoch.
    pub tls_certificate_expiry: Gauge,
    /// Sidecar: pre-issued DEKs pooled.
    pub dek_pool_size: Gauge<u64, AtomicU64>,
    /// Sidecar: DEK cache hits.
    pub dek_cache_hits: Gauge<u64, AtomicU64>,
    /// Sidecar: DEK cache misses.
    pub dek_cache_misses: Gauge<u64, AtomicU64>,
    /// Sidecar: unwrapped DEKs cached.
    pub dek_cache_entries: Gauge<u64, AtomicU64>,
    /// Sidecar: field-level events not yet reported.
    pub audit_pending: Gauge<u64, AtomicU64>,
    /// Sidecar: unwrap calls made to the key service.
    pub dek_unwrap_calls: Gauge<u64, AtomicU64>,
    /// Sidecar: requests whose cache misses those calls carried.
    pub dek_unwrap_requests: Gauge<u64, AtomicU64>,
    /// Sidecar: rewrap calls made to the key service.
    pub dek_rewrap_calls: Gauge<u64, AtomicU64>,
    /// Sidecar: rewrap requests those calls carried.
    pub dek_rewrap_requests: Gauge<u64, AtomicU64>,
}

impl Default for Metrics {
    fn default() -> Self {
        let requests = Family::<RequestLabels, Counter>::default();
        let latency: Family<RouteLabels, Histogram> =
            Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.000_1, 2.0, 18)));
        let (kek_cache_hits, kek_cache_misses, kek_cache_entries, audit_queue_depth) =
            (Gauge::default(), Gauge::default(), Gauge::default(), Gauge::default());
        let (audit_events, audit_failures, audit_commits) =
            (Counter::default(), Counter::default(), Counter::default());
        let connections_refused = Family::<ConnectionRefusedLabels, Counter>::default();
        let keys_busy = Family::<KeysBusyLabels, Counter>::default();
        let key_sends_overdue = Counter::default();
        let (policy_reload_failures, policy_loaded) = (Counter::default(), Gauge::default());
        let (tls_reload_failures, tls_loaded, tls_certificate_expiry) =
            (Counter::default(), Gauge::default(), Gauge::default());
        let (dek_pool_size, dek_cache_hits, dek_cache_misses, dek_cache_entries, audit_pending) = (
            Gauge::default(),
            Gauge::default(),
            Gauge::default(),
            Gauge::default(),
            Gauge::default(),
        );
        let (dek_unwrap_calls, dek_unwrap_requests, dek_rewrap_calls, dek_rewrap_requests) =
            (Gauge::default(), Gauge::default(), Gauge::default(), Gauge::default());

        let mut registry = Registry::with_prefix("keygate");
        registry.register("requests", "API requests by route and status", requests.clone());
        registry.register("request_duration_seconds", "API request latency", latency.clone());
        registry.register("kek_cache_hits", "KEK cache hits", kek_cache_hits.clone());
        registry.register("kek_cache_misses", "KEK cache misses", kek_cache_misses.clone());
        registry.register(
            "kek_cache_entries",
            "Unwrapped keys in memory",
            kek_cache_entries.clone(),
        );
        registry.register(
            "audit_queue_depth",
            "Audit events awaiting commit",
            audit_queue_depth.clone(),
        );
        registry.register("audit_events", "Audit events committed", audit_events.clone());
        registry.register("audit_commit_failures", "Failed audit commits", audit_failures.clone());
        registry.register("audit_commits", "Audit group commits written", audit_commits.clone());
        registry.register(
            "connections_refused",
            "Connections closed at accept, by listener and the cap they were over",
            connections_refused.clone(),
        );
        registry.register(
            "keys_busy",
            "Issue and unwrap requests answered 503 busy, by what had no room for their keys",
            keys_busy.clone(),
        );
        registry.register(
            "key_sends_overdue",
            "Connections closed because an answer carrying keys was not taken in time",
            key_sends_overdue.clone(),
        );
        registry.register(
            "policy_reload_failures",
            "Policy reloads that failed; the previous policy stays in force",
            policy_reload_failures.clone(),
        );
        registry.register(
            "policy_loaded_timestamp_seconds",
            "When the policy in force was loaded (Unix time)",
            policy_loaded.clone(),
        );
        registry.register(
            "tls_reload_failures",
            "TLS reloads that failed; the previous certificates stay in force",
            tls_reload_failures.clone(),
        );
        registry.register(
            "tls_loaded_timestamp_seconds",
            "When the TLS configuration in force was loaded (Unix time)",
            tls_loaded.clone(),
        );
        registry.register(
            "tls_certificate_expiry_timestamp_seconds",
            "When the server certificate in force expires (notAfter, Unix time)",
            tls_certificate_expiry.clone(),
        );
        registry.register(
            "dek_pool_size",
            "Pre-issued DEKs pooled (sidecar)",
            dek_pool_size.clone(),
        );
        registry.register("dek_cache_hits", "DEK cache hits (sidecar)", dek_cache_hits.clone());
        registry.register(
            "dek_cache_misses",
            "DEK cache misses (sidecar)",
            dek_cache_misses.clone(),
        );
        registry.register(
            "dek_cache_entries",
            "Unwrapped DEKs cached (sidecar)",
            dek_cache_entries.clone(),
        );
        registry.register(
            "audit_pending",
            "Record accesses in field events not yet reported (sidecar)",
            audit_pending.clone(),
        );
        registry.register(
            "dek_unwrap_calls",
            "Unwrap calls to the key service (sidecar)",
            dek_unwrap_calls.clone(),
        );
        registry.register(
            "dek_unwrap_requests",
            "Requests (per tenant) whose cache misses were unwrapped; above the calls when calls were shared (sidecar)",
            dek_unwrap_requests.clone(),
        );
        registry.register(
            "dek_rewrap_calls",
            "Rewrap calls to the key service (sidecar)",
            dek_rewrap_calls.clone(),
        );
        registry.register(
            "dek_rewrap_requests",
            "Rewrap requests (per tenant); above the calls when calls were shared (sidecar)",
            dek_rewrap_requests.clone(),
        );
        Self {
            registry,
            requests,
            latency,
            kek_cache_hits,
            kek_cache_misses,
            kek_cache_entries,
            audit_queue_depth,
            audit_events,
            audit_failures,
            audit_commits,
            connections_refused,
            keys_busy,
            key_sends_overdue,
            policy_reload_failures,
            policy_loaded,
            tls_reload_failures,
            tls_loaded,
            tls_certificate_expiry,
            dek_pool_size,
            dek_cache_hits,
            dek_cache_misses,
            dek_cache_entries,
            audit_pending,
            dek_unwrap_calls,
            dek_unwrap_requests,
            dek_rewrap_calls,
            dek_rewrap_requests,
        }
    }
}

impl Metrics {
    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_abuse_counters_are_exported() {
        let metrics = Metrics::default();
        let refused = ConnectionRefusedLabels { listener: "api", reason: "peer_handshakes" };
        metrics.connections_refused.get_or_create(&refused).inc_by(3);
        metrics.keys_busy.get_or_create(&KeysBusyLabels { wait: "pool" }).inc();
        metrics.key_sends_overdue.inc();
        let text = metrics.encode();
        for line in [
            r#"keygate_connections_refused_total{listener="api",reason="peer_handshakes"} 3"#,
            r#"keygate_keys_busy_total{wait="pool"} 1"#,
            "keygate_key_sends_overdue_total 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in {text}");
        }
    }

    #[test]
    fn the_policy_reload_metrics_are_exported() {
        let metrics = Metrics::default();
        metrics.policy_reload_failures.inc();
        metrics.policy_loaded.set(1_767_225_600);
        let text = metrics.encode();
        for line in [
            "keygate_policy_reload_failures_total 1",
            "keygate_policy_loaded_timestamp_seconds 1767225600",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in {text}");
        }
    }

    #[test]
    fn the_tls_reload_metrics_are_exported() {
        let metrics = Metrics::default();
        metrics.tls_reload_failures.inc();
        metrics.tls_loaded.set(1_767_225_600);
        metrics.tls_certificate_expiry.set(1_774_915_200);
        let text = metrics.encode();
        for line in [
            "# TYPE keygate_tls_reload_failures counter",
            "keygate_tls_reload_failures_total 1",
            "# TYPE keygate_tls_loaded_timestamp_seconds gauge",
            "keygate_tls_loaded_timestamp_seconds 1767225600",
            "# TYPE keygate_tls_certificate_expiry_timestamp_seconds gauge",
            "keygate_tls_certificate_expiry_timestamp_seconds 1774915200",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in {text}");
        }
    }
}
