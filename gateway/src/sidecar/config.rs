//! The sidecar's configuration (same conventions as the key service's:
//! one TOML file, `KEYGATE_…` overrides, secrets by file path, relative
//! paths against the file's directory).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::config::{ConfigError, LogConfig, check_durations, load_layered};

/// Where the app-facing API listens.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Listen {
    /// A unix socket (the default, `/run/keygate/sidecar.sock`).
    Unix(PathBuf),
    /// A TCP address; only loopback addresses are accepted.
    Tcp(std::net::SocketAddr),
}

/// The sidecar's configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SidecarConfig {
    /// App-facing listener.
    #[serde(default = "default_listen")]
    pub listen: Listen,
    /// A file holding the bearer token apps must present (optional).
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// Schema files (TOML).
    pub schemas: Vec<PathBuf>,
    /// The identity recorded as the actor of field-level events (the app
    /// this sidecar serves); defaults to `app`.
    #[serde(default = "default_app")]
    pub app_identity: String,
    /// How to reach the key service.
    pub key_service: KeyServiceConfig,
    /// DEK pool.
    #[serde(default)]
    pub pool: PoolConfig,
    /// Unwrapped DEK cache, derived keys and grants.
    #[serde(default)]
    pub cache: CacheConfig,
    /// Field-level audit reporting.
    #[serde(default)]
    pub audit: ReportConfig,
    /// Request limits.
    #[serde(default)]
    pub limits: SidecarLimits,
    /// Logging.
    #[serde(default)]
    pub log: LogConfig,
    /// Abuse limits: per-connection rate and concurrency, slow clients.
    #[serde(default)]
    pub abuse: crate::abuse::SidecarAbuseConfig,
    /// `production` refuses to start when a compliance check fails
    /// (`keygate sidecar --profile` overrides it).
    #[serde(default)]
    pub profile: crate::compliance::Profile,
}

/// The key service connection: mutual TLS with the sidecar's own identity.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyServiceConfig {
    /// One or more replicas (`https://host:port`), tried in order with failover.
    pub urls: Vec<String>,
    /// CA bundle that signs the key service's certificate.
    pub ca: PathBuf,
    /// The sidecar's client certificate (its identity).
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
    /// Timeout of each call, in milliseconds. Unwrap and rewrap calls are
    /// shared between concurrent requests (`sidecar::shared_calls`): a
    /// request that waits for a call ahead of its own gives up after
    /// `4 × replicas ×` this, and every request at `limits.request_timeout_ms`.
    #[serde(default = "default_call_timeout_ms")]
    pub timeout_ms: u64,
    /// How often, in seconds, `cert`, `key` and `ca` are checked for
    /// changes (SIGHUP reloads at once): short-lived certificates (SPIFFE
    /// SVIDs, cert-manager) are renewed in place, and a sidecar that kept
    /// the first one would lose the key service when it expired.
    #[serde(default = "default_tls_reload_secs")]
    pub tls_reload_interval_secs: u64,
    /// The key service's identity (its certificate's one URI SAN, e.g.
    /// `spiffe://prod/ns/keygate/sa/key-service`), required on top of a
    /// chain to `ca` and the URL's host name. Without it, any certificate
    /// that CA issued for that host name is taken, and a CA shared with
    /// other workloads lets them serve this sidecar keys of their choosing.
    #[serde(default)]
    pub server_identity: Option<String>,
}

/// The per-tenant pool of pre-issued DEKs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolConfig {
    /// DEKs asked for per refill.
    pub batch: usize,
    /// Refill when fewer than this many remain.
    pub low_water: usize,
    /// Seconds a pooled DEK may wait before it is discarded (and wiped);
    /// never longer than `[cache] ttl_secs`, the bound on a shred.
    pub ttl_secs: u64,
}

impl Default for PoolConfig {
    /// Refills of 2,000 DEKs, started while 2,000 remain: at 100,000
    /// records/s a refill has 20 ms to arrive before requests would wait
    /// on the key service (with 500 and 100 nearly every 100-record
    /// request did).
    fn default() -> Self {
        Self { batch: 2_000, low_water: 2_000, ttl_secs: 60 }
    }
}

/// Caches. `ttl_secs` bounds how long a rotation, state change or shred
/// takes to reach this sidecar.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Seconds an unwrapped DEK, derived key or grant set is kept.
    pub ttl_secs: u64,
    /// Most unwrapped DEKs kept.
    pub max_entries: usize,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self { ttl_secs: 60, max_entries: 100_000 }
    }
}

/// Field-level audit reporting to the key service.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReportConfig {
    /// Milliseconds between flushes.
    pub flush_interval_ms: u64,
    /// Most record accesses (record key ids of waiting events) held while
    /// the key service cannot take them (events it refused, which hold up
    /// only their tenants, are not counted)…
    pub max_buffered: usize,
    /// …and for at most this many seconds; past either bound, requests
    /// whose events cannot be recorded are refused (never silently lost).
    pub max_unreported_secs: u64,
}

impl Default for ReportConfig {
    fn default() -> Self {
        Self { flush_interval_ms: 200, max_buffered: 100_000, max_unreported_secs: 60 }
    }
}

/// Request limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SidecarLimits {
    /// Largest request body, in bytes.
    pub max_body_bytes: usize,
    /// Most records in one request.
    pub max_records: usize,
    /// Deepest JSON nesting accepted.
    pub max_depth: usize,
    /// The deadline of an API request, in milliseconds, from when its body
    /// has been read (`[abuse] body_read_timeout_secs` bounds that) to its
    /// answer: past it the work is dropped and the app gets 503 `timeout`
    /// with `Retry-After`. At least 1.
    pub request_timeout_ms: u64,
}

impl Default for SidecarLimits {
    /// The deadline is 20 s: under the SDK's 30 s attempt timeout, so the
    /// app hears the sidecar's 503 (and retries) rather than giving up
    /// while the sidecar still works; above the 15 s that failing over
    /// across three unresponsive replicas takes at the default
    /// `key_service.timeout_ms`.
    fn default() -> Self {
        Self {
            max_body_bytes: 16 * 1024 * 1024,
            max_records: 1_000,
            max_depth: 64,
            request_timeout_ms: 20_000,
        }
    }
}

impl SidecarLimits {
    /// The deadline of an API request.
    pub(crate) fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }
}

fn default_listen() -> Listen {
    Listen::Unix(PathBuf::from("/run/keygate/sidecar.sock"))
}

fn default_app() -> String {
    "app".to_owned()
}

fn default_call_timeout_ms() -> u64 {
    5_000
}

/// A minute: renewed certificates are issued well before the old ones
/// expire (cert-manager at two thirds of their life, SPIRE at half).
fn default_tls_reload_secs() -> u64 {
    60
}

pub(crate) const TOP_LEVEL_KEYS: &[&str] = &[
    "listen",
    "token_file",
    "schemas",
    "app_identity",
    "key_service",
    "pool",
    "cache",
    "audit",
    "limits",
    "log",
    "abuse",
    "profile",
];

impl SidecarConfig {
    /// Warns of `KEYGATE_…` variables that look like this config's
    /// settings misspelled (see [`crate::config::warn_mistyped_overrides`]).
    pub fn warn_mistyped_overrides(&self) {
        crate::config::warn_mistyped_overrides(TOP_LEVEL_KEYS, &[]);
    }

    /// Every timeout, interval and time-to-live, named as in the file.
    fn durations(&self) -> Vec<(&'static str, Duration)> {
        let mut durations = vec![
            ("key_service.timeout_ms", Duration::from_millis(self.key_service.timeout_ms)),
            (
                "key_service.tls_reload_interval_secs",
                Duration::from_secs(self.key_service.tls_reload_interval_secs),
            ),
            ("pool.ttl_secs", Duration::from_secs(self.pool.ttl_secs)),
            ("cache.ttl_secs", Duration::from_secs(self.cache.ttl_secs)),
            ("audit.flush_interval_ms", Duration::from_millis(self.audit.flush_interval_ms)),
            ("audit.max_unreported_secs", Duration::from_secs(self.audit.max_unreported_secs)),
            ("limits.request_timeout_ms", self.limits.request_timeout()),
        ];
        durations.extend(self.abuse.durations());
        durations
    }

    /// What the request deadline's setting risks, if anything: at or past
    /// the SDK's attempt timeout the app gives up first (and retries while
    /// the sidecar still works); below one call's timeout on every key
    /// service replica, failing over cannot finish within it.
    pub(crate) fn deadline_warnings(&self) -> Vec<String> {
        /// The SDK's default attempt timeout (`keygate_sdk`'s builder).
        const SDK_ATTEMPT: Duration = Duration::from_secs(30);
        let deadline = self.limits.request_timeout();
        let replicas = u32::try_from(self.key_service.urls.len()).unwrap_or(u32::MAX);
        let failover = Duration::from_millis(self.key_service.timeout_ms).saturating_mul(replicas);
        let mut warnings = Vec::new();
        if deadline >= SDK_ATTEMPT {
            warnings.push(format!(
                "limits.request_timeout_ms ({} ms) is not below the SDK's 30 s attempt \
                 timeout: an app gives up on a slow request before the sidecar does",
                deadline.as_millis()
            ));
        }
        if deadline < failover {
            warnings.push(format!(
                "limits.request_timeout_ms ({} ms) is below key_service.timeout_ms × {replicas} \
                 replicas ({} ms): a request cannot fail over across every replica in time",
                deadline.as_millis(),
                failover.as_millis()
            ));
        }
        warnings
    }

    /// Loads `path` with `KEYGATE_…` overrides; resolves relative paths.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let mut config: Self = load_layered(path, TOP_LEVEL_KEYS)?;
        let base = path.parent().unwrap_or(Path::new("."));
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        if let Listen::Unix(p) = &mut config.listen {
            fix(p);
        }
        if let Some(p) = &mut config.token_file {
            fix(p);
        }
        config.schemas.iter_mut().for_each(fix);
        fix(&mut config.key_service.ca);
        fix(&mut config.key_service.cert);
        fix(&mut config.key_service.key);
        check_durations(config.durations())?;
        if config.limits.request_timeout_ms == 0 {
            return Err(ConfigError::new(
                "limits.request_timeout_ms must be at least 1: every request would time out",
            ));
        }
        if config.key_service.urls.is_empty() {
            return Err(ConfigError::new("key_service.urls lists no key service"));
        }
        if let Some(identity) = &config.key_service.server_identity {
            check_server_identity(identity)?;
        }
        // Found now, not as every audit report refused (which holds every
        // tenant this sidecar serves).
        if !crate::wire::is_reportable_actor(&config.app_identity) {
            return Err(ConfigError::new(format!(
                "app_identity must be 1 to {} bytes with no control characters",
                crate::wire::MAX_ACTOR_LEN
            )));
        }
        if let Listen::Tcp(addr) = config.listen
            && !addr.ip().is_loopback()
        {
            return Err(ConfigError::new(format!(
                "refusing to listen on {addr}: the sidecar API serves plaintext PHI and \
                     listens only on a unix socket or a loopback address"
            )));
        }
        Ok(config)
    }
}

/// Refuses a `key_service.server_identity` that no certificate could
/// match, found at start rather than as every call refused: identities are
/// compared as `crate::tls::identity_of` spells them, a URI with its
/// scheme and authority in lower case. (A DNS name would add nothing to
/// the host name check already made.)
fn check_server_identity(identity: &str) -> Result<(), ConfigError> {
    let refuse = |why: &str| {
        Err(ConfigError::new(format!("key_service.server_identity {identity:?}: {why}")))
    };
    let Some((scheme, rest)) = identity.split_once("://") else {
        return refuse("not a URI SAN such as spiffe://prod/ns/keygate/sa/key-service");
    };
    let authority = rest.split('/').next().unwrap_or_default();
    if scheme.is_empty() || authority.is_empty() {
        return refuse("a URI needs a scheme and an authority");
    }
    if !identity.bytes().all(|b| b.is_ascii_graphic()) {
        return refuse("only printable ASCII without spaces can match a certificate");
    }
    if scheme.bytes().chain(authority.bytes()).any(|b| b.is_ascii_uppercase()) {
        return refuse("write its scheme and authority in lower case, as identities are compared");
    }
    // The very test a certificate's URI SAN passes to be an identity at
    // all: anything else (a trailing `/`, `*`, `%`, `?`, `user@`, `..`)
    // would start a sidecar whose every call is refused.
    if crate::tls::uri_identity(identity).as_deref() != Some(identity) {
        return refuse(
            "no certificate's identity is spelled so: scheme://authority/path in plain ASCII, \
             no userinfo ('@'), no empty, '.' or '..' segment, no '%', '?', '#' or '*'",
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_duration_longer_than_a_day_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sidecar.toml");
        // `tables` are appended after `[key_service]`, whose own keys come first.
        let load = |key_service: &str, tables: &str| {
            let text = format!(
                "schemas = [\"patient.toml\"]\n[key_service]\n\
                 urls = [\"https://127.0.0.1:8443\"]\nca = \"ca.crt\"\n\
                 cert = \"app.crt\"\nkey = \"app.key\"\n{key_service}\n{tables}\n"
            );
            std::fs::write(&path, text).unwrap();
            SidecarConfig::load(&path).map_err(|e| e.to_string())
        };
        let config = load("", "").unwrap();
        assert_eq!(config.cache.ttl_secs, 60);
        assert_eq!(config.key_service.tls_reload_interval_secs, 60);
        assert_eq!(config.key_service.server_identity, None);
        assert_eq!(config.limits.request_timeout(), Duration::from_secs(20));
        let e = load("", "[limits]\nrequest_timeout_ms = 0").unwrap_err();
        assert!(e.contains("limits.request_timeout_ms must be at least 1"), "{e}");
        // The defaults fit together; a deadline at the SDK's timeout, or
        // one failover across the replicas would outlast, is warned about.
        assert_eq!(config.deadline_warnings(), Vec::<String>::new());
        let late = load("", "[limits]\nrequest_timeout_ms = 30000").unwrap();
        let warned = late.deadline_warnings();
        assert!(warned.len() == 1 && warned[0].contains("SDK's 30 s"), "{warned:?}");
        let three = "urls = [\"https://a:1\", \"https://b:1\", \"https://c:1\"]\n";
        let text = |timeout: u64| {
            format!(
                "schemas = [\"patient.toml\"]\n[key_service]\n{three}ca = \"ca.crt\"\n\
                 cert = \"app.crt\"\nkey = \"app.key\"\ntimeout_ms = {timeout}\n"
            )
        };
        std::fs::write(&path, text(5_000)).unwrap();
        assert!(SidecarConfig::load(&path).unwrap().deadline_warnings().is_empty());
        std::fs::write(&path, text(8_000)).unwrap();
        let warned = SidecarConfig::load(&path).unwrap().deadline_warnings();
        assert!(warned.len() == 1 && warned[0].contains("× 3 replicas (24000 ms)"), "{warned:?}");
        // An actor the key service would refuse stops the sidecar at once.
        for bad in ["\"\"", "\"app\\n\"", format!("\"{}\"", "a".repeat(1025)).as_str()] {
            std::fs::write(
                &path,
                format!(
                    "schemas = [\"patient.toml\"]\napp_identity = {bad}\n[key_service]\n\
                     urls = [\"https://127.0.0.1:8443\"]\nca = \"ca.crt\"\n\
                     cert = \"app.crt\"\nkey = \"app.key\"\n"
                ),
            )
            .unwrap();
            let e = SidecarConfig::load(&path).unwrap_err().to_string();
            assert!(e.contains("app_identity must be 1 to 1024 bytes"), "{bad}: {e}");
        }
        assert_eq!(config.key_service.ca, dir.path().join("ca.crt"));
        // A day is allowed; a second more, or the largest TOML integer (which would
        // overflow at its first use), is refused with the setting's name.
        for (table, key, day) in [
            ("cache", "ttl_secs", 86_400),
            ("pool", "ttl_secs", 86_400),
            ("audit", "flush_interval_ms", 86_400_000),
            ("audit", "max_unreported_secs", 86_400),
            ("abuse", "body_read_timeout_secs", 86_400),
            ("key_service", "timeout_ms", 86_400_000),
            ("key_service", "tls_reload_interval_secs", 86_400),
            ("limits", "request_timeout_ms", 86_400_000),
        ] {
            let set = |value: u64| {
                let line = format!("{key} = {value}");
                if table == "key_service" {
                    load(&line, "")
                } else {
                    load("", &format!("[{table}]\n{line}"))
                }
            };
            assert!(set(day).is_ok(), "{table}.{key} = a day");
            for too_long in [day + 1, i64::MAX as u64] {
                let e = set(too_long).unwrap_err();
                assert!(e.contains(&format!("{table}.{key} is longer than a day")), "{e}");
            }
        }
    }

    #[test]
    fn a_server_identity_no_certificate_could_match_is_refused_at_load() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sidecar.toml");
        let load = |identity: &str| {
            let text = format!(
                "schemas = [\"patient.toml\"]\n[key_service]\n\
                 urls = [\"https://127.0.0.1:8443\"]\nca = \"ca.crt\"\n\
                 cert = \"app.crt\"\nkey = \"app.key\"\nserver_identity = {identity:?}\n"
            );
            std::fs::write(&path, text).unwrap();
            SidecarConfig::load(&path).map_err(|e| e.to_string())
        };
        let good = "spiffe://prod/ns/keygate/sa/key-service";
        assert_eq!(load(good).unwrap().key_service.server_identity.as_deref(), Some(good));
        for (bad, why) in [
            ("keygate.prod.svc", "not a URI SAN"),
            ("spiffe:///ns/keygate", "a scheme and an authority"),
            ("://prod/ns/keygate", "a scheme and an authority"),
            ("spiffe://prod/ns/key service", "printable ASCII"),
            ("spiffe://Prod/ns/keygate", "lower case"),
            ("SPIFFE://prod/ns/keygate", "lower case"),
            ("spiffe://prod/ns/keygate/", "no certificate's identity"),
            ("spiffe://prod/ns//keygate", "no certificate's identity"),
            ("spiffe://prod/ns/*", "no certificate's identity"),
            ("spiffe://prod/ns/%6beygate", "no certificate's identity"),
            ("spiffe://prod/ns/keygate?x=1", "no certificate's identity"),
            ("spiffe://prod/ns/keygate#x", "no certificate's identity"),
            ("spiffe://ks@prod/ns/keygate", "no certificate's identity"),
            ("spiffe://prod/ns/../keygate", "no certificate's identity"),
            ("spiffe://prod/ns/./keygate", "no certificate's identity"),
        ] {
            let e = load(bad).unwrap_err();
            assert!(e.contains("key_service.server_identity") && e.contains(why), "{bad}: {e}");
        }
    }
}
