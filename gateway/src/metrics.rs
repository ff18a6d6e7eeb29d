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

/// Labels of a client certificate that gives no identity.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IdentityRefusedLabels {
    /// Why ([`NoIdentity::as_str`](crate::tls::NoIdentity::as_str)):
    /// `uri_san_not_plain`, `several_uri_sans`, `dns_san_not_host_name`,
    /// `no_uri_or_dns_san`.
    pub reason: &'static str,
}

/// The metrics of the key service or of a sidecar: each registers (and so
/// exports) only its own ([`Metrics::key_service`], [`Metrics::sidecar`]),
/// so that no process reports another's as zero (a "policy loaded at 0"
/// would set off an age alert on every sidecar).
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
    /// Connections whose verified client certificate gives no identity
    /// (so 403 beyond the open routes), by why.
    pub client_identities_refused: Family<IdentityRefusedLabels, Counter>,
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
    /// Sidecar: reloads of its key service client's certificate, key or CA
    /// bundle that failed (the previous ones stay in use).
    pub sidecar_tls_reload_failures: Counter,
    /// Sidecar: calls to a key service replica that failed in the TLS
    /// handshake.
    pub key_service_tls_failures: Counter,
    /// Sidecar: API requests dropped at their deadline (503 `timeout`).
    pub sidecar_request_timeouts: Counter,
}

impl Default for Metrics {
    /// The key service's.
    fn default() -> Self {
        Self::key_service()
    }
}

impl Metrics {
    /// The key service's metrics.
    pub fn key_service() -> Self {
        let mut metrics = Self::unregistered();
        metrics.register_requests();
        metrics.register_key_service();
        metrics
    }

    /// A sidecar's metrics.
    pub fn sidecar() -> Self {
        let mut metrics = Self::unregistered();
        metrics.register_requests();
        metrics.register_sidecar();
        metrics
    }

    fn unregistered() -> Self {
        Self {
            registry: Registry::with_prefix("keygate"),
            requests: Family::default(),
            latency: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.000_1, 2.0, 18))
            }),
            kek_cache_hits: Gauge::default(),
            kek_cache_misses: Gauge::default(),
            kek_cache_entries: Gauge::default(),
            audit_queue_depth: Gauge::default(),
            audit_events: Counter::default(),
            audit_failures: Counter::default(),
            audit_commits: Counter::default(),
            connections_refused: Family::default(),
            client_identities_refused: Family::default(),
            keys_busy: Family::default(),
            key_sends_overdue: Counter::default(),
            policy_reload_failures: Counter::default(),
            policy_loaded: Gauge::default(),
            tls_reload_failures: Counter::default(),
            tls_loaded: Gauge::default(),
            tls_certificate_expiry: Gauge::default(),
            dek_pool_size: Gauge::default(),
            dek_cache_hits: Gauge::default(),
            dek_cache_misses: Gauge::default(),
            dek_cache_entries: Gauge::default(),
            audit_pending: Gauge::default(),
            dek_unwrap_calls: Gauge::default(),
            dek_unwrap_requests: Gauge::default(),
            dek_rewrap_calls: Gauge::default(),
            dek_rewrap_requests: Gauge::default(),
            sidecar_tls_reload_failures: Counter::default(),
            key_service_tls_failures: Counter::default(),
            sidecar_request_timeouts: Counter::default(),
        }
    }

    /// What both export: requests and their latency.
    fn register_requests(&mut self) {
        let r = &mut self.registry;
        r.register("requests", "API requests by route and status", self.requests.clone());
        r.register("request_duration_seconds", "API request latency", self.latency.clone());
    }

    fn register_key_service(&mut self) {
        let r = &mut self.registry;
        r.register("kek_cache_hits", "KEK cache hits", self.kek_cache_hits.clone());
        r.register("kek_cache_misses", "KEK cache misses", self.kek_cache_misses.clone());
        r.register("kek_cache_entries", "Unwrapped keys in memory", self.kek_cache_entries.clone());
        r.register(
            "audit_queue_depth",
            "Audit events awaiting commit",
            self.audit_queue_depth.clone(),
        );
        r.register("audit_events", "Audit events committed", self.audit_events.clone());
        r.register("audit_commit_failures", "Failed audit commits", self.audit_failures.clone());
        r.register("audit_commits", "Audit group commits written", self.audit_commits.clone());
        r.register(
            "connections_refused",
            "Connections closed at accept, by listener and the cap they were over",
            self.connections_refused.clone(),
        );
        r.register(
            "client_identities_refused",
            "Connections whose client certificate gives no identity (403 beyond the open routes), \
             by reason",
            self.client_identities_refused.clone(),
        );
        r.register(
            "keys_busy",
            "Issue and unwrap requests answered 503 busy, by what had no room for their keys",
            self.keys_busy.clone(),
        );
        r.register(
            "key_sends_overdue",
            "Connections closed because an answer carrying keys was not taken in time",
            self.key_sends_overdue.clone(),
        );
        r.register(
            "policy_reload_failures",
            "Policy reloads that failed; the previous policy stays in force",
            self.policy_reload_failures.clone(),
        );
        r.register(
            "policy_loaded_timestamp_seconds",
            "When the policy in force was loaded (Unix time)",
            self.policy_loaded.clone(),
        );
        r.register(
            "tls_reload_failures",
            "TLS reloads that failed; the previous certificates stay in force",
            self.tls_reload_failures.clone(),
        );
        r.register(
            "tls_loaded_timestamp_seconds",
            "When the TLS configuration in force was loaded (Unix time)",
            self.tls_loaded.clone(),
        );
        r.register(
            "tls_certificate_expiry_timestamp_seconds",
            "When the server certificate in force expires (notAfter, Unix time)",
            self.tls_certificate_expiry.clone(),
        );
    }

    fn register_sidecar(&mut self) {
        let r = &mut self.registry;
        r.register("dek_pool_size", "Pre-issued DEKs pooled", self.dek_pool_size.clone());
        r.register("dek_cache_hits", "DEK cache hits", self.dek_cache_hits.clone());
        r.register("dek_cache_misses", "DEK cache misses", self.dek_cache_misses.clone());
        r.register("dek_cache_entries", "Unwrapped DEKs cached", self.dek_cache_entries.clone());
        r.register(
            "audit_pending",
            "Record accesses in field events not yet reported",
            self.audit_pending.clone(),
        );
        r.register(
            "dek_unwrap_calls",
            "Unwrap calls to the key service",
            self.dek_unwrap_calls.clone(),
        );
        r.register(
            "dek_unwrap_requests",
            "Requests (per tenant) whose cache misses were unwrapped; above the calls when calls \
             were shared",
            self.dek_unwrap_requests.clone(),
        );
        r.register(
            "dek_rewrap_calls",
            "Rewrap calls to the key service",
            self.dek_rewrap_calls.clone(),
        );
        r.register(
            "dek_rewrap_requests",
            "Rewrap requests (per tenant); above the calls when calls were shared",
            self.dek_rewrap_requests.clone(),
        );
        r.register(
            "sidecar_tls_reload_failures",
            "Reloads of the key service client's certificate, key or CA bundle that failed; the \
             previous ones stay in use",
            self.sidecar_tls_reload_failures.clone(),
        );
        r.register(
            "sidecar_key_service_tls_failures",
            "Calls to a key service replica that failed in the TLS handshake (its certificate \
             not trusted or not key_service.server_identity, or ours refused)",
            self.key_service_tls_failures.clone(),
        );
        r.register(
            "sidecar_request_timeouts",
            "API requests dropped at their deadline (limits.request_timeout_ms), answered 503 \
             timeout",
            self.sidecar_request_timeouts.clone(),
        );
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
    fn each_process_exports_only_its_own_metrics() {
        let encode = |metrics: Metrics| {
            // A family with no label set yet exports nothing: give each one.
            metrics.requests.get_or_create(&RequestLabels { route: "/x".into(), code: 200 }).inc();
            metrics.latency.get_or_create(&RouteLabels { route: "/x".into() }).observe(0.1);
            metrics.encode()
        };
        let (key_service, sidecar) = (encode(Metrics::key_service()), encode(Metrics::sidecar()));
        for own in ["keygate_requests", "keygate_request_duration_seconds"] {
            assert!(key_service.contains(own) && sidecar.contains(own), "{own}");
        }
        for theirs in [
            "keygate_policy_loaded_timestamp_seconds",
            "keygate_tls_certificate_expiry_timestamp_seconds",
            "keygate_kek_cache_hits",
            "keygate_audit_queue_depth",
        ] {
            assert!(key_service.contains(theirs) && !sidecar.contains(theirs), "{theirs}");
        }
        for theirs in ["keygate_dek_cache_hits", "keygate_sidecar_key_service_tls_failures"] {
            assert!(sidecar.contains(theirs) && !key_service.contains(theirs), "{theirs}");
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
