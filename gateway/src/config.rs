//! Configuration: one TOML file, every key overridable by a `KEYGATE_…`
//! environment variable (nested keys joined by `__`, e.g.
//! `KEYGATE_LIMITS__MAX_BATCH=500`), secrets only by file path.
//! Relative paths are resolved against the config file's directory.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use kms_core::store::PgTarget;
use serde::{Deserialize, Serialize};

/// The key service's configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// mTLS API address (`127.0.0.1:0` picks a free port).
    pub listen: SocketAddr,
    /// Optional plain-HTTP address for `/healthz`, `/readyz` and `/metrics`
    /// only (probes and scrapers that hold no client certificate).
    #[serde(default)]
    pub ops_listen: Option<SocketAddr>,
    /// Where the keystore (and the instance id) live.
    pub data_dir: PathBuf,
    /// A shared keystore for several replicas: `postgres://…` (TLS when the
    /// URL asks for it, e.g. `sslmode=verify-full`). Absent: SQLite in
    /// `data_dir`. A password in the URL is never logged.
    #[serde(default)]
    pub storage_url: Option<StorageUrl>,
    /// PostgreSQL schema of the keystore (created at first start).
    #[serde(default)]
    pub storage_schema: Option<String>,
    /// This instance's audit chain name; default: generated once and kept
    /// in `data_dir/instance-id`.
    #[serde(default)]
    pub instance: Option<String>,
    /// TLS material.
    pub tls: TlsConfig,
    /// The root (master) key provider.
    pub root: RootConfig,
    /// What other master keys (a master rotation's target, a master the
    /// keystore recorded) may load or reach besides `[root]`'s.
    #[serde(default)]
    pub trusted_masters: TrustedMasters,
    /// The access policy.
    pub policy: PolicyConfig,
    /// Request limits.
    #[serde(default)]
    pub limits: Limits,
    /// Tenant key caching.
    #[serde(default)]
    pub keys: KeysConfig,
    /// Audit chain settings.
    #[serde(default)]
    pub audit: AuditConfig,
    /// Key lifecycle: approvals, scheduled jobs, usage accounting.
    #[serde(default)]
    pub lifecycle: LifecycleConfig,
    /// Logging.
    #[serde(default)]
    pub log: LogConfig,
    /// Abuse limits: per-identity rate, slow clients, JSON depth.
    #[serde(default)]
    pub abuse: crate::abuse::AbuseConfig,
    /// `production` refuses to start when a compliance check fails
    /// (`keygate server --profile` overrides it).
    #[serde(default)]
    pub profile: crate::compliance::Profile,
}

/// Server certificate and the CA bundle client certificates must chain to.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key (file mode 0600).
    pub key: PathBuf,
    /// PEM CA bundle for client certificates.
    pub client_ca: PathBuf,
    /// How often the files are checked for changes (SIGHUP reloads at once).
    #[serde(default = "default_reload_secs")]
    pub reload_interval_secs: u64,
}

/// Which root key provider, and its settings. Serialized (as JSON) into
/// the keystore so another instance can reach the same master key after a
/// master rotation: it holds paths and names of secrets, never secrets.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(tag = "provider", deny_unknown_fields)]
pub enum RootConfig {
    /// A local root key file: development only (logged as such).
    #[serde(rename = "dev_local")]
    DevLocal {
        /// The key file.
        key_file: PathBuf,
        /// A file holding the passphrase, if the key file is sealed.
        #[serde(default)]
        passphrase_file: Option<PathBuf>,
        /// Create the key file if it does not exist.
        #[serde(default)]
        create_if_missing: bool,
    },
    /// An AES-256 master key inside an HSM, over PKCS#11.
    #[serde(rename = "pkcs11")]
    Pkcs11 {
        /// The PKCS#11 module (`.so`) of the HSM.
        module: PathBuf,
        /// Label of the token holding the key.
        token_label: String,
        /// Label of the master key.
        key_label: String,
        /// A file holding the user PIN (mode 0600)…
        #[serde(default)]
        pin_file: Option<PathBuf>,
        /// …or the name of an environment variable holding it.
        #[serde(default)]
        pin_env: Option<String>,
        /// Sessions kept open for concurrent calls.
        #[serde(default = "default_pool_size")]
        pool_size: usize,
        /// How long a wrap or unwrap waits for a session and the module's
        /// answer, in milliseconds, before it fails as unavailable.
        #[serde(default = "default_pkcs11_call_timeout_ms")]
        call_timeout_ms: u64,
    },
    /// A master key in AWS KMS (credentials from the SDK's default chain).
    #[serde(rename = "aws_kms")]
    AwsKms {
        /// AWS region.
        region: String,
        /// Key id, key ARN, alias (`alias/…`) or alias ARN.
        key_id: String,
        /// Endpoint override (VPC endpoints, local emulators).
        #[serde(default)]
        endpoint_url: Option<String>,
        /// Per-attempt timeout, in milliseconds.
        #[serde(default = "default_kms_timeout_ms")]
        timeout_ms: u64,
    },
}

/// What a master key other than the configured `[root]` may load or reach:
/// a master rotation's target, or a master the keystore recorded (after a
/// rotation, every instance reconnects to the masters that still wrap
/// keys from the settings the keystore holds).
///
/// The keystore is outside the trust boundary, and a master rotation is
/// one admin's request, so neither may choose a library for this process
/// to load or an endpoint to hand key material to: a PKCS#11 module or an
/// AWS KMS endpoint override is used only if it is the configured root's
/// or listed here: modules compared as paths, without resolving `..` or
/// symlinks (list absolute paths), endpoints as text without a trailing `/`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustedMasters {
    /// PKCS#11 modules (`.so`), besides `[root]`'s.
    #[serde(default)]
    pub pkcs11_modules: Vec<PathBuf>,
    /// AWS KMS endpoint overrides, besides `[root]`'s (a master without one
    /// uses AWS's own endpoint for its region and needs no entry).
    #[serde(default)]
    pub aws_kms_endpoints: Vec<String>,
    /// AWS accounts (12 digits) whose KMS keys a master may name by ARN,
    /// besides `[root]`'s account. Only an ARN reaches a key in another
    /// account; a bare key id or alias is always in the account of the key
    /// service's own credentials. A key listed in `keys` by the key ARN it
    /// is named by needs no entry (one named by an alias ARN does).
    #[serde(default)]
    pub aws_kms_accounts: Vec<String>,
    /// The master keys besides `[root]`'s that may be used at all, named as
    /// `GET /v1/master` names them (`kind:key_ref`, e.g.
    /// `pkcs11:prod-token/master-2` or `aws-kms:arn:aws:kms:…:key/…`).
    /// Absent: any key reached through a trusted module or endpoint. Set,
    /// a keystore row can no longer point a master at another key the
    /// key service's credentials happen to reach.
    #[serde(default)]
    pub keys: Option<Vec<String>>,
}

impl TrustedMasters {
    /// Refuses an `aws_kms_accounts` entry that is not an account id, so a
    /// typo is reported at start rather than refusing every rotation.
    fn check_accounts(&self) -> Result<(), ConfigError> {
        match self.aws_kms_accounts.iter().find(|a| !is_aws_account(a)) {
            Some(bad) => Err(ConfigError(format!(
                "trusted_masters.aws_kms_accounts: {bad:?} is not an AWS account id (12 digits)"
            ))),
            None => Ok(()),
        }
    }

    /// Refuses a `keys` entry that could never name a master key (kinds are
    /// those of `GET /v1/master`, not the file's `provider` names: `aws-kms`,
    /// not `aws_kms`; an AWS KMS key by its ARN, not an alias), so a misspelt
    /// one is reported at start rather than refusing every rotation.
    fn check_keys(&self) -> Result<(), ConfigError> {
        for key in self.keys.iter().flatten() {
            // What each provider reports: a fingerprint, token/label, a key ARN.
            let named = match key.split_once(':') {
                Some((hsm_adapters::LOCAL_PROVIDER_KIND, fingerprint)) => !fingerprint.is_empty(),
                Some(("pkcs11", key_ref)) => {
                    key_ref.split_once('/').is_some_and(|(t, l)| !t.is_empty() && !l.is_empty())
                }
                Some(("aws-kms", arn)) => is_key_arn(arn),
                _ => false,
            };
            if !named {
                return Err(ConfigError(format!(
                    "trusted_masters.keys: {key:?} names no master key; keys are named as \
                     GET /v1/master names them: local:<fingerprint>, pkcs11:<token>/<label> \
                     or aws-kms:<key ARN>"
                )));
            }
        }
        Ok(())
    }
}

/// The account an AWS KMS key id names, if it is an ARN (a key or alias
/// ARN, `arn:<partition>:kms:<region>:<account>:…`); a bare key id or alias
/// names none (it is looked up in the caller's own account).
pub(crate) fn arn_account(key_id: &str) -> Option<&str> {
    let mut parts = key_id.strip_prefix("arn:")?.splitn(5, ':');
    let (_partition, _service, _region) = (parts.next()?, parts.next()?, parts.next()?);
    parts.next()
}

fn is_aws_account(account: &str) -> bool {
    account.len() == 12 && account.bytes().all(|b| b.is_ascii_digit())
}

/// Whether an AWS KMS key id is a key ARN (which names the key itself; an
/// alias or alias ARN shows its key only once KMS is asked).
pub(crate) fn is_key_arn(key_id: &str) -> bool {
    key_id.starts_with("arn:") && key_id.contains(":key/")
}

fn default_pool_size() -> usize {
    8
}

fn default_pkcs11_call_timeout_ms() -> u64 {
    u64::try_from(hsm_adapters::Pkcs11Config::DEFAULT_CALL_TIMEOUT.as_millis()).unwrap_or(u64::MAX)
}

fn default_kms_timeout_ms() -> u64 {
    5_000
}

impl RootConfig {
    /// The same settings with every file path made absolute (against the
    /// current directory), for recording in the keystore.
    pub fn with_absolute_paths(&self) -> std::io::Result<Self> {
        let mut config = self.clone();
        let fix = |p: &mut PathBuf| -> std::io::Result<()> {
            *p = std::path::absolute(&*p)?;
            Ok(())
        };
        match &mut config {
            Self::DevLocal { key_file, passphrase_file, .. } => {
                fix(key_file)?;
                passphrase_file.as_mut().map(fix).transpose()?;
            }
            Self::Pkcs11 { pin_file, .. } => {
                pin_file.as_mut().map(fix).transpose()?;
            }
            Self::AwsKms { .. } => {}
        }
        Ok(config)
    }

    /// The `provider` name, as written in the config.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::DevLocal { .. } => "dev_local",
            Self::Pkcs11 { .. } => "pkcs11",
            Self::AwsKms { .. } => "aws_kms",
        }
    }

    /// Its timeouts, named as in the file (`[root]`). Checked with
    /// [`check_durations`] at load, and for settings sent to a master
    /// rotation or recorded in the keystore.
    pub fn durations(&self) -> Vec<(&'static str, Duration)> {
        match self {
            Self::AwsKms { timeout_ms, .. } => {
                vec![("root.timeout_ms", Duration::from_millis(*timeout_ms))]
            }
            Self::Pkcs11 { call_timeout_ms, .. } => {
                vec![("root.call_timeout_ms", Duration::from_millis(*call_timeout_ms))]
            }
            Self::DevLocal { .. } => Vec::new(),
        }
    }

    /// Refuses a timer of zero (every call would fail at once) or of more
    /// than a day ([`check_durations`]): at load, and for settings sent to
    /// a master rotation or recorded in the keystore.
    pub fn check_timers(&self) -> Result<(), ConfigError> {
        let durations = self.durations();
        if let Some((name, _)) = durations.iter().find(|(_, value)| value.is_zero()) {
            return Err(ConfigError(format!(
                "{name} must be at least 1: every call would fail at once"
            )));
        }
        check_durations(durations)
    }

    /// Whether every file path in it is absolute (settings sent over the
    /// API have no directory to be relative to).
    pub fn paths_are_absolute(&self) -> bool {
        match self {
            Self::DevLocal { key_file, passphrase_file, .. } => {
                key_file.is_absolute() && passphrase_file.as_ref().is_none_or(|p| p.is_absolute())
            }
            Self::Pkcs11 { pin_file, .. } => pin_file.as_ref().is_none_or(|p| p.is_absolute()),
            Self::AwsKms { .. } => true,
        }
    }

    /// The PKCS#11 provider configuration, reading the PIN from its source.
    pub fn pkcs11(&self) -> Result<Option<hsm_adapters::Pkcs11Config>, ConfigError> {
        let Self::Pkcs11 {
            module,
            token_label,
            key_label,
            pin_file,
            pin_env,
            pool_size,
            call_timeout_ms,
        } = self
        else {
            return Ok(None);
        };
        let source = match (pin_file, pin_env) {
            (Some(file), None) => hsm_adapters::PinSource::File(file.clone()),
            (None, Some(var)) => hsm_adapters::PinSource::Env(var.clone()),
            _ => return Err(ConfigError::new("root: give exactly one of pin_file and pin_env")),
        };
        let pin = source.load().map_err(|e| ConfigError::new(format!("root: {e}")))?;
        let mut config = hsm_adapters::Pkcs11Config::new(module, token_label, key_label, pin);
        config.pool_size = (*pool_size).max(1);
        config.call_timeout = Duration::from_millis((*call_timeout_ms).max(1));
        Ok(Some(config))
    }
}

/// The policy file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// Path of the policy TOML (reloaded on SIGHUP).
    pub file: PathBuf,
}

/// Request limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Most items in one batch request.
    pub max_batch: usize,
    /// Largest request body, in bytes.
    pub max_body_bytes: usize,
    /// Whole-request timeout, in seconds (0 counts as 1).
    pub request_timeout_secs: u64,
    /// TLS handshake timeout, in seconds.
    pub handshake_timeout_secs: u64,
    /// Most plaintext DEKs (issued or unwrapped) in responses being made
    /// or not yet sent. Requests beyond it wait their turn, first come
    /// first served (for `keys_wait_ms` at most): the key service's memory
    /// stays bounded whatever the clients' concurrency. A single request
    /// for more runs alone.
    pub max_keys_in_flight: usize,
    /// Most of those one client identity may hold at once (a single
    /// request for more still runs, alone among its identity's). Leaves
    /// room for other identities when one identity's clients stop reading
    /// their answers. Set, it must leave room for the largest batch:
    /// `max_keys_in_flight_per_identity + max_batch <= max_keys_in_flight`,
    /// so that while one identity holds its whole share, another's largest
    /// request still fits in the pool (rather than queueing in front of
    /// every other request for `keys_wait_ms`). Absent: half of
    /// `max_keys_in_flight` or `max_keys_in_flight - max_batch`, whichever
    /// is less, and at least 1 (with a `max_batch` as large as the pool,
    /// an identity's requests for keys then run one at a time).
    pub max_keys_in_flight_per_identity: Option<usize>,
    /// How long an issue or unwrap request waits for room for its keys
    /// (under the pool or its identity's share) before 503 `busy` with
    /// `Retry-After`, in milliseconds; shorter than `request_timeout_secs`.
    pub keys_wait_ms: u64,
    /// How long a client has to take an answer carrying keys once it is
    /// ready, in seconds (at least 1); a client that has not read it by
    /// then has its connection closed, and the room the keys took is free
    /// again.
    pub keys_send_timeout_secs: u64,
    /// Most connections open at once on each listener (the mutual-TLS API
    /// and `ops_listen`), counted from before the TLS handshake; a
    /// connection over it is closed as soon as it is accepted.
    pub max_connections: usize,
    /// Most of those still in their TLS handshake (mutual-TLS API), less
    /// than `max_connections`: anyone who reaches the port can hold a
    /// handshake open until `handshake_timeout_secs`, so handshakes get a
    /// budget of their own and cannot take the slots of authenticated
    /// connections. A connection over it is closed as soon as it is
    /// accepted.
    pub max_handshakes: usize,
    /// Most connections in their TLS handshake from one peer (an IPv4
    /// address, or an IPv6 /64) once half of `max_handshakes` is in use,
    /// so that one host cannot spend the whole budget either; over it,
    /// closed when accepted. Below half, a peer is not held to it, so that
    /// a client opening many connections at once goes through while
    /// nothing is wrong.
    pub max_handshakes_per_peer: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_batch: 10_000,
            max_body_bytes: 8 * 1024 * 1024,
            request_timeout_secs: 30,
            handshake_timeout_secs: 10,
            max_keys_in_flight: 16_384,
            max_keys_in_flight_per_identity: None,
            keys_wait_ms: 5_000,
            keys_send_timeout_secs: 30,
            max_connections: 4_096,
            max_handshakes: 256,
            max_handshakes_per_peer: 32,
        }
    }
}

impl Limits {
    /// The size of the pool of keys in flight (at least 1).
    pub fn keys_in_flight(&self) -> usize {
        self.max_keys_in_flight.clamp(1, tokio::sync::Semaphore::MAX_PERMITS)
    }

    /// The most keys in flight one identity may hold: as configured, or
    /// half the pool or what the largest batch leaves of it, whichever is
    /// less (at least 1, at most the pool).
    pub fn keys_in_flight_per_identity(&self) -> usize {
        let pool = self.keys_in_flight();
        let default = || (pool / 2).min(pool.saturating_sub(self.max_batch));
        self.max_keys_in_flight_per_identity.unwrap_or_else(default).clamp(1, pool)
    }

    /// The whole-request timeout (`request_timeout_secs`, 0 counting as 1).
    pub fn request_timeout(&self) -> Duration {
        Duration::from_secs(self.request_timeout_secs.max(1))
    }

    /// How long a client has to take an answer carrying keys.
    pub fn keys_send_timeout(&self) -> Duration {
        Duration::from_secs(self.keys_send_timeout_secs.max(1))
    }

    /// Refuses settings that would disable a limit by mistake.
    fn check(&self) -> Result<(), ConfigError> {
        for (name, value) in [
            ("max_connections", self.max_connections),
            ("max_handshakes", self.max_handshakes),
            ("max_handshakes_per_peer", self.max_handshakes_per_peer),
        ] {
            if value == 0 {
                return Err(ConfigError::new(format!("limits.{name} must be at least 1")));
            }
        }
        if self.max_handshakes >= self.max_connections {
            return Err(ConfigError::new(format!(
                "limits.max_handshakes ({}) must be less than limits.max_connections ({}), so \
                 that connections still in their TLS handshake cannot take every slot from \
                 authenticated ones",
                self.max_handshakes, self.max_connections
            )));
        }
        if let Some(share) = self.max_keys_in_flight_per_identity {
            if share == 0 {
                return Err(ConfigError::new(
                    "limits.max_keys_in_flight_per_identity must be at least 1",
                ));
            }
            if share.saturating_add(self.max_batch) > self.keys_in_flight() {
                return Err(ConfigError::new(format!(
                    "limits.max_keys_in_flight_per_identity ({share}) plus limits.max_batch \
                     ({}) must be at most limits.max_keys_in_flight ({}), so that while one \
                     identity holds its whole share another's largest request still fits: \
                     lower the share or max_batch, or raise max_keys_in_flight",
                    self.max_batch,
                    self.keys_in_flight()
                )));
            }
        }
        if self.keys_send_timeout_secs == 0 {
            return Err(ConfigError::new(
                "limits.keys_send_timeout_secs must be at least 1 (a client always has some \
                 time to take an answer carrying keys)",
            ));
        }
        if Duration::from_millis(self.keys_wait_ms) >= self.request_timeout() {
            return Err(ConfigError::new(format!(
                "limits.keys_wait_ms ({} ms) must be shorter than the request timeout ({} s; \
                 limits.request_timeout_secs, 0 counting as 1), so that a request waiting for \
                 room is answered 503 busy rather than timed out",
                self.keys_wait_ms,
                self.request_timeout().as_secs()
            )));
        }
        Ok(())
    }
}

/// Tenant key caching.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KeysConfig {
    /// How long unwrapped tenant keys stay in memory, in seconds.
    pub kek_ttl_secs: u64,
    /// The longest KEK auto-rotation period allowed, in days (the
    /// production profile refuses more than 365).
    pub max_rotation_period_days: u64,
}

impl Default for KeysConfig {
    fn default() -> Self {
        Self { kek_ttl_secs: 60, max_rotation_period_days: 365 }
    }
}

/// Audit chain settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// A signed checkpoint after this many events…
    pub checkpoint_every: u64,
    /// …or after this many seconds with new events, whichever comes first.
    pub checkpoint_interval_secs: u64,
    /// Most events waiting for their commit before new ones are refused.
    pub queue_capacity: usize,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self { checkpoint_every: 1000, checkpoint_interval_secs: 60, queue_capacity: 100_000 }
    }
}

/// Key lifecycle settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LifecycleConfig {
    /// Seconds an approved shred waits before the keys are destroyed, so
    /// a mistaken approval can still be noticed (the request stays
    /// `approved` until then). 0 destroys at approval; production
    /// deployments typically wait 24 to 72 hours.
    pub shred_delay_secs: u64,
    /// Seconds a request for approval may wait to be approved (7 days by
    /// default); an older one may only be rejected. Who asked, and why,
    /// may no longer hold: a stale request is filed again.
    pub approval_ttl_secs: u64,
    /// How often one replica checks for due auto-rotations and approved
    /// shreds whose wait is over, in milliseconds.
    pub scheduler_interval_ms: u64,
    /// How often usage counters are added to the keystore, in milliseconds.
    pub usage_flush_interval_ms: u64,
}

impl Default for LifecycleConfig {
    fn default() -> Self {
        Self {
            shred_delay_secs: 0,
            approval_ttl_secs: 7 * 86_400,
            scheduler_interval_ms: 30_000,
            usage_flush_interval_ms: 5_000,
        }
    }
}

/// Logging.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `tracing` filter (`info`, `debug`, `keygate=debug,info`, …).
    pub level: String,
    /// `json` (default) or `text`.
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self { level: "info".to_owned(), format: LogFormat::Json }
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// One JSON object per line.
    Json,
    /// Human-readable.
    Text,
}

pub(crate) const TOP_LEVEL_KEYS: &[&str] = &[
    "listen",
    "ops_listen",
    "data_dir",
    "storage_url",
    "storage_schema",
    "instance",
    "tls",
    "root",
    "trusted_masters",
    "policy",
    "limits",
    "keys",
    "audit",
    "lifecycle",
    "log",
    "abuse",
    "profile",
];

/// A keystore URL; its `Debug` shows only the scheme.
#[derive(Clone)]
pub struct StorageUrl {
    text: String,
    /// Where it connects, read once: sqlx's parser logs the value of any
    /// parameter it does not know, which may be a secret.
    target: OnceLock<Result<PgTarget, String>>,
}

impl<'de> serde::Deserialize<'de> for StorageUrl {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(Self::new)
    }
}

impl StorageUrl {
    /// Wraps `text`.
    pub fn new(text: String) -> Self {
        Self { text, target: OnceLock::new() }
    }

    /// The URL (may hold a password: never log it).
    pub fn expose(&self) -> &str {
        &self.text
    }

    /// Whether it names a PostgreSQL database.
    pub fn is_postgres(&self) -> bool {
        self.text.starts_with("postgres://") || self.text.starts_with("postgresql://")
    }

    /// Where a PostgreSQL URL connects, as the store reads it ([`PgTarget`]).
    pub fn target(&self) -> Result<&PgTarget, &str> {
        self.target
            .get_or_init(|| PgTarget::of(&self.text).map_err(|e| e.to_string()))
            .as_ref()
            .map_err(String::as_str)
    }
}

impl std::fmt::Debug for StorageUrl {
    /// The scheme alone: any other part of the text may be or hold a
    /// password (`?password=…`, a `/` in an unencoded one). Messages that
    /// need the host take it from [`StorageUrl::target`].
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = self
            .text
            .split_once("://")
            .map(|(scheme, _)| scheme)
            .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric()));
        match scheme {
            Some(scheme) => write!(f, "{scheme}://…"),
            None => f.write_str("…"),
        }
    }
}

fn default_reload_secs() -> u64 {
    5
}

/// The longest any timeout, interval or time-to-live in a configuration
/// may be. Longer is a mistake (a cached key outliving a shred by days, a
/// timeout never reached), and a value near `u64::MAX` would overflow the
/// clock arithmetic at its first use and stop the process.
pub const MAX_DURATION: Duration = Duration::from_secs(86_400);

/// Refuses the first of `durations` (a setting's name and value) longer
/// than [`MAX_DURATION`].
pub fn check_durations(
    durations: impl IntoIterator<Item = (&'static str, Duration)>,
) -> Result<(), ConfigError> {
    match durations.into_iter().find(|(_, value)| *value > MAX_DURATION) {
        Some((name, _)) => Err(ConfigError(format!(
            "{name} is longer than a day ({} s, {} ms), the most a timeout, interval \
             or key lifetime may be",
            MAX_DURATION.as_secs(),
            MAX_DURATION.as_millis()
        ))),
        None => Ok(()),
    }
}

/// The configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
#[error("configuration error: {0}")]
pub struct ConfigError(String);

impl ConfigError {
    /// An error with a message naming what is wrong.
    pub fn new(message: impl Into<String>) -> Self {
        Self(message.into())
    }
}

/// Reads a TOML file with `KEYGATE_…` environment overrides (nested keys
/// joined by `__`). Only variables naming one of `top_level_keys` are
/// taken, so unrelated `KEYGATE_…` variables (test settings, the other
/// command's) do not make the strict parser fail.
pub fn load_layered<T: serde::de::DeserializeOwned>(
    path: &Path,
    top_level_keys: &'static [&'static str],
) -> Result<T, ConfigError> {
    if !path.is_file() {
        return Err(ConfigError(format!("{}: no such file", path.display())));
    }
    let env = Env::prefixed("KEYGATE_")
        .split("__")
        .filter(move |key| under_top_level(key.as_str(), top_level_keys));
    Figment::new()
        .merge(Toml::file(path))
        .merge(env)
        .extract()
        .map_err(|e| ConfigError(format!("{}: {e}", path.display())))
}

/// Whether the environment variable `name` sets something in a config whose
/// top-level keys are `top_level_keys`: what [`load_layered`] merges.
pub(crate) fn is_override(name: &str, top_level_keys: &[&str]) -> bool {
    // The loader's prefix matches in any case (`keygate_storage_url` too).
    const PREFIX: &str = "KEYGATE_";
    let name = name.trim();
    name.get(..PREFIX.len()).is_some_and(|p| p.eq_ignore_ascii_case(PREFIX))
        && name
            .get(PREFIX.len()..)
            .is_some_and(|key| under_top_level(&key.replace("__", "."), top_level_keys))
}

/// Warns of each of this process's environment variables that names one
/// of `top_level_keys` but joins the key under it with one `_`
/// (`KEYGATE_CACHE_TTL_SECS`): the loader takes only `__`
/// (`KEYGATE_CACHE__TTL_SECS`), so the setting it meant (a shorter cache
/// TTL, a client CA) is not applied, and would be without a word. A
/// warning, not a refusal: such a name may be something else's (a PIN
/// variable a recorded master names, a Kubernetes service link); `exempt`
/// (the config's own `pin_env`) and service links are left out. Call it
/// once logging is set up.
pub(crate) fn warn_mistyped_overrides(top_level_keys: &[&str], exempt: &[&str]) {
    let names = std::env::vars_os()
        .filter_map(|(name, _)| name.into_string().ok())
        .filter(|name| !exempt.contains(&name.as_str()));
    for warning in mistyped_overrides(names, top_level_keys) {
        tracing::warn!("{warning}");
    }
}

/// What [`warn_mistyped_overrides`] says of `names`.
fn mistyped_overrides(names: impl Iterator<Item = String>, top_level_keys: &[&str]) -> Vec<String> {
    const PREFIX: &str = "KEYGATE_";
    let mut warnings = Vec::new();
    for name in names {
        let Some(key) = name
            .get(..PREFIX.len())
            .filter(|p| p.eq_ignore_ascii_case(PREFIX))
            .and_then(|_| name.get(PREFIX.len()..))
        else {
            continue;
        };
        let key = key.to_ascii_lowercase();
        if under_top_level(&key, top_level_keys) || is_service_link(&key) {
            continue;
        }
        let meant = top_level_keys.iter().find(|top| {
            key.strip_prefix(**top)
                .and_then(|rest| rest.strip_prefix('_'))
                .is_some_and(|rest| !rest.is_empty() && !rest.starts_with('_'))
        });
        if let Some(top) = meant {
            let rest = key.get(top.len() + 1..).unwrap_or_default();
            warnings.push(format!(
                "environment variable {name} is not read: a key under `{top}` is joined with a \
                 double underscore, as in KEYGATE_{}__{}",
                top.to_ascii_uppercase(),
                rest.to_ascii_uppercase()
            ));
        }
    }
    warnings
}

/// Whether `key` (lowercase) has the shape of a variable Kubernetes sets
/// for a Service (`<name>_service_host`, `<name>_service_port[_…]`,
/// `<name>_port`, `<name>_port_<n>_<proto>[_…]`): a Service named
/// `keygate-key-service` gives `KEYGATE_KEY_SERVICE_SERVICE_HOST`.
fn is_service_link(key: &str) -> bool {
    key.ends_with("_service_host")
        || key.contains("_service_port")
        || key.ends_with("_port")
        || key
            .split_once("_port_")
            .is_some_and(|(_, rest)| rest.starts_with(|c: char| c.is_ascii_digit()))
}

/// Whether `key` (`limits.max_batch`) is under one of `top_level_keys`.
fn under_top_level(key: &str, top_level_keys: &[&str]) -> bool {
    // Variables are upper case (KEYGATE_LIMITS__MAX_BATCH); keys lower.
    let key = key.to_ascii_lowercase();
    top_level_keys.iter().any(|top| {
        key.strip_prefix(top)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('.') || rest.starts_with("__"))
    })
}

impl ServerConfig {
    /// Warns of `KEYGATE_…` variables that look like this config's
    /// settings misspelled (see [`warn_mistyped_overrides`]), other than
    /// the one `root.pin_env` names.
    pub fn warn_mistyped_overrides(&self) {
        let pin_env = match &self.root {
            RootConfig::Pkcs11 { pin_env: Some(name), .. } => vec![name.as_str()],
            _ => Vec::new(),
        };
        warn_mistyped_overrides(TOP_LEVEL_KEYS, &pin_env);
    }

    /// Loads `path` (TOML) with `KEYGATE_…` overrides and resolves relative
    /// paths against the file's directory.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let mut config: Self = load_layered(path, TOP_LEVEL_KEYS)?;
        let base = path.parent().unwrap_or(Path::new("."));
        config.resolve_paths(base);
        check_durations(config.durations())?;
        config.limits.check()?;
        if config.lifecycle.approval_ttl_secs == 0 {
            return Err(ConfigError::new("lifecycle.approval_ttl_secs must be at least 1"));
        }
        config.root.check_timers()?;
        config.trusted_masters.check_keys()?;
        config.trusted_masters.check_accounts()?;
        Ok(config)
    }

    /// Every timeout, interval and time-to-live, named as in the file.
    /// (`lifecycle.shred_delay_secs` is a wait measured in days, not a
    /// timer, and is not bounded by [`MAX_DURATION`].)
    fn durations(&self) -> Vec<(&'static str, Duration)> {
        let mut durations = vec![
            ("tls.reload_interval_secs", Duration::from_secs(self.tls.reload_interval_secs)),
            ("limits.request_timeout_secs", Duration::from_secs(self.limits.request_timeout_secs)),
            (
                "limits.handshake_timeout_secs",
                Duration::from_secs(self.limits.handshake_timeout_secs),
            ),
            ("limits.keys_wait_ms", Duration::from_millis(self.limits.keys_wait_ms)),
            (
                "limits.keys_send_timeout_secs",
                Duration::from_secs(self.limits.keys_send_timeout_secs),
            ),
            ("keys.kek_ttl_secs", Duration::from_secs(self.keys.kek_ttl_secs)),
            (
                "audit.checkpoint_interval_secs",
                Duration::from_secs(self.audit.checkpoint_interval_secs),
            ),
            (
                "lifecycle.scheduler_interval_ms",
                Duration::from_millis(self.lifecycle.scheduler_interval_ms),
            ),
            (
                "lifecycle.usage_flush_interval_ms",
                Duration::from_millis(self.lifecycle.usage_flush_interval_ms),
            ),
        ];
        durations.extend(self.abuse.durations());
        durations.extend(self.root.durations());
        durations
    }

    fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut self.data_dir);
        fix(&mut self.tls.cert);
        fix(&mut self.tls.key);
        fix(&mut self.tls.client_ca);
        fix(&mut self.policy.file);
        match &mut self.root {
            RootConfig::DevLocal { key_file, passphrase_file, .. } => {
                fix(key_file);
                if let Some(p) = passphrase_file {
                    fix(p);
                }
            }
            RootConfig::Pkcs11 { pin_file, .. } => {
                if let Some(p) = pin_file {
                    fix(p);
                }
            }
            RootConfig::AwsKms { .. } => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn a_variable_joining_its_key_with_one_underscore_is_said_not_ignored() {
        let check = |names: &[&str], tops: &[&str]| {
            mistyped_overrides(names.iter().map(|n| (*n).to_owned()), tops)
        };
        for typo in ["KEYGATE_LIMITS_MAX_BATCH", "keygate_tls_client_ca", "KEYGATE_LOG_LEVEL"] {
            let warnings = check(&[typo], TOP_LEVEL_KEYS);
            assert!(matches!(&warnings[..], [w] if w.contains(typo) && w.contains("not read")));
        }
        let warnings = check(&["KEYGATE_LIMITS_MAX_BATCH"], TOP_LEVEL_KEYS);
        assert!(warnings[0].contains("KEYGATE_LIMITS__MAX_BATCH"), "names the spelling meant");
        let sidecar = crate::sidecar::config::TOP_LEVEL_KEYS;
        assert!(check(&["KEYGATE_CACHE_TTL_SECS"], sidecar)[0].contains("KEYGATE_CACHE__TTL_SECS"));
        // What the loader takes, other commands' or tools' variables, and
        // Kubernetes service links (a Service named keygate-key-service).
        let fine = [
            "KEYGATE_LIMITS__MAX_BATCH",
            "KEYGATE_STORAGE_URL",
            "KEYGATE_OPS_LISTEN",
            "KEYGATE_PROFILE",
            "KEYGATE_ADMIN_PROFILE",
            "KEYGATE_SIDECAR_TOKEN_FILE",
            "KEYGATE_CONFIG",
            "KEYGATE_TEST_PG_URL",
            "KEYGATE_CACHE_TTL_SECS", // the sidecar's setting, not the key service's
            "KEYGATE_AUDIT_SERVICE_HOST",
            "KEYGATE_AUDIT_PORT",
            "KEYGATE_AUDIT_PORT_8443_TCP_ADDR",
            "PATH",
            "KEYGATE",
        ];
        assert_eq!(check(&fine, TOP_LEVEL_KEYS), Vec::<String>::new());
        let links = [
            "KEYGATE_KEY_SERVICE_SERVICE_HOST",
            "KEYGATE_KEY_SERVICE_SERVICE_PORT",
            "KEYGATE_KEY_SERVICE_SERVICE_PORT_HTTPS",
            "KEYGATE_KEY_SERVICE_PORT_8443_TCP",
            "KEYGATE_KEY_SERVICE_PORT_8443_TCP_PROTO",
            "KEYGATE_APP_IDENTITY",
        ];
        assert_eq!(check(&links, sidecar), Vec::<String>::new());
    }

    #[test]
    fn a_storage_url_shows_only_its_scheme_and_reads_its_target_once() {
        for (url, shown) in [
            ("postgres://u:s3cret@db.internal:5432/k", "postgres://…"),
            ("postgres://db.internal/k?password=x@s3cret", "postgres://…"),
            ("postgres://u:s3/cret@db/k", "postgres://…"),
            ("mysql://u:s3cret@db/k", "mysql://…"),
            ("u:s3cret@db", "…"),
        ] {
            assert_eq!(format!("{:?}", StorageUrl::new(url.to_owned())), shown, "{url}");
        }
        let url = StorageUrl::new("postgres://u@localhost/k?host=db.internal".to_owned());
        assert_eq!(url.target().map(|t| t.host.as_str()), Ok("db.internal"));
        assert!(std::ptr::eq(url.target().unwrap(), url.target().unwrap()), "read once");
        assert!(StorageUrl::new("postgres://u:s3cret@h:port/k".to_owned()).target().is_err());
    }

    #[test]
    fn a_root_kind_is_its_provider_name_in_the_config() {
        let roots = [
            r#"{"provider":"dev_local","key_file":"/k"}"#,
            r#"{"provider":"pkcs11","module":"/m.so","token_label":"t","key_label":"k"}"#,
            r#"{"provider":"aws_kms","region":"eu-west-1","key_id":"alias/k"}"#,
        ];
        for text in roots {
            let root: RootConfig = serde_json::from_str(text).unwrap();
            let written = serde_json::to_value(&root).unwrap();
            assert_eq!(written["provider"], root.kind(), "{text}");
        }
    }

    #[test]
    fn loads_with_defaults_and_resolves_paths() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keygate.toml");
        std::fs::write(
            &path,
            r#"
listen = "127.0.0.1:0"
data_dir = "data"
[tls]
cert = "server.crt"
key = "server.key"
client_ca = "ca.crt"
[root]
provider = "dev_local"
key_file = "root.key"
[policy]
file = "policy.toml"
[limits]
max_batch = 500
"#,
        )
        .unwrap();
        let config = ServerConfig::load(&path).unwrap();
        assert_eq!(config.limits.max_batch, 500);
        assert_eq!(config.keys.kek_ttl_secs, 60);
        assert_eq!(config.data_dir, dir.path().join("data"));
        assert!(
            matches!(config.root, RootConfig::DevLocal { ref key_file, .. } if key_file == &dir.path().join("root.key"))
        );
    }

    #[test]
    fn a_duration_longer_than_a_day_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keygate.toml");
        // `tls` and `root` lines go into those tables; `tables` follow.
        let load = |tls: &str, root: &str, tables: &str| {
            let text = format!(
                "listen = \"127.0.0.1:0\"\ndata_dir = \"data\"\n\
                 [tls]\ncert = \"server.crt\"\nkey = \"server.key\"\nclient_ca = \"ca.crt\"\n{tls}\n\
                 [policy]\nfile = \"policy.toml\"\n[root]\n{root}\n{tables}\n"
            );
            std::fs::write(&path, text).unwrap();
            ServerConfig::load(&path).map(|_| ()).map_err(|e| e.to_string())
        };
        let local = "provider = \"dev_local\"\nkey_file = \"root.key\"";
        let aws = "provider = \"aws_kms\"\nregion = \"r\"\nkey_id = \"k\"";
        let hsm = "provider = \"pkcs11\"\nmodule = \"/opt/hsm/lib.so\"\ntoken_label = \"t\"\n\
                   key_label = \"k\"\npin_env = \"PIN\"";
        // A day is allowed; a second more, or the largest TOML integer (which would
        // overflow at its first use), is refused with the setting's name.
        for (table, key, day) in [
            ("keys", "kek_ttl_secs", 86_400),
            ("tls", "reload_interval_secs", 86_400),
            ("limits", "request_timeout_secs", 86_400),
            ("audit", "checkpoint_interval_secs", 86_400),
            ("lifecycle", "scheduler_interval_ms", 86_400_000),
            ("abuse", "idle_timeout_secs", 86_400),
            ("root", "timeout_ms", 86_400_000),
            ("root", "call_timeout_ms", 86_400_000),
        ] {
            let set = |value: u64| {
                let line = format!("{key} = {value}");
                match table {
                    "tls" => load(&line, local, ""),
                    "root" if key == "call_timeout_ms" => load("", &format!("{hsm}\n{line}"), ""),
                    "root" => load("", &format!("{aws}\n{line}"), ""),
                    _ => load("", local, &format!("[{table}]\n{line}")),
                }
            };
            assert!(set(day).is_ok(), "{table}.{key} = a day");
            for too_long in [day + 1, i64::MAX as u64] {
                let e = set(too_long).unwrap_err();
                assert!(e.contains(&format!("{table}.{key} is longer than a day")), "{e}");
            }
        }
        // The shred delay is a wait of days, not a timer; so is the time a
        // request may wait for approval, which must leave some.
        assert!(load("", local, "[lifecycle]\nshred_delay_secs = 259200").is_ok());
        assert!(load("", local, "[lifecycle]\napproval_ttl_secs = 2592000").is_ok());
        let e = load("", local, "[lifecycle]\napproval_ttl_secs = 0").unwrap_err();
        assert!(e.contains("lifecycle.approval_ttl_secs must be at least 1"), "{e}");
    }

    #[test]
    fn a_pkcs11_root_bounds_each_call_as_configured() {
        let dir = tempfile::tempdir().unwrap();
        let pin = dir.path().join("pin");
        std::fs::write(&pin, "1234").unwrap();
        std::fs::set_permissions(&pin, std::fs::Permissions::from_mode(0o600)).unwrap();
        let root = |extra: &str| -> RootConfig {
            let text = format!(
                "provider = \"pkcs11\"\nmodule = \"/opt/hsm/lib.so\"\ntoken_label = \"t\"\n\
                 key_label = \"k\"\npin_file = {pin:?}\n{extra}"
            );
            toml::from_str(&text).unwrap()
        };
        let call_timeout = |root: RootConfig| root.pkcs11().unwrap().unwrap().call_timeout;
        assert_eq!(call_timeout(root("")), hsm_adapters::Pkcs11Config::DEFAULT_CALL_TIMEOUT);
        assert_eq!(call_timeout(root("call_timeout_ms = 250")), Duration::from_millis(250));
        let e = root("call_timeout_ms = 0").check_timers().unwrap_err().to_string();
        assert!(e.contains("root.call_timeout_ms must be at least 1"), "{e}");
        assert!(root("call_timeout_ms = 86400001").check_timers().is_err());
        root("call_timeout_ms = 1").check_timers().unwrap();
        // Recorded before the setting existed: the default.
        let recorded = recorded_without("call_timeout_ms", &root("call_timeout_ms = 250"));
        assert_eq!(call_timeout(recorded), hsm_adapters::Pkcs11Config::DEFAULT_CALL_TIMEOUT);
    }

    /// `root` as recorded settings, read back without `field`.
    fn recorded_without(field: &str, root: &RootConfig) -> RootConfig {
        let mut value = serde_json::to_value(root).unwrap();
        value.as_object_mut().unwrap().remove(field).unwrap();
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn unknown_keys_and_missing_files_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keygate.toml");
        std::fs::write(&path, "listen = \"127.0.0.1:0\"\ncolour = \"red\"\n").unwrap();
        assert!(ServerConfig::load(&path).is_err());
        assert!(ServerConfig::load(&dir.path().join("absent.toml")).is_err());
    }

    #[test]
    fn the_server_config_reads_the_trusted_masters_table() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keygate.toml");
        let base = "listen = \"127.0.0.1:0\"\ndata_dir = \"data\"\n\
                    [tls]\ncert = \"c\"\nkey = \"k\"\nclient_ca = \"ca\"\n\
                    [root]\nprovider = \"dev_local\"\nkey_file = \"root.key\"\n\
                    [policy]\nfile = \"policy.toml\"\n";
        std::fs::write(&path, base).unwrap();
        let config = ServerConfig::load(&path).unwrap();
        assert!(config.trusted_masters.pkcs11_modules.is_empty());
        assert!(config.trusted_masters.aws_kms_endpoints.is_empty());
        assert_eq!(config.trusted_masters.keys, None);

        let table = "[trusted_masters]\npkcs11_modules = [\"/usr/lib/softhsm/libsofthsm2.so\"]\n\
                     aws_kms_endpoints = [\"https://kms.example\"]\n\
                     keys = [\"pkcs11:prod/master-2\"]\n";
        std::fs::write(&path, format!("{base}{table}")).unwrap();
        let config = ServerConfig::load(&path).unwrap();
        let trusted = config.trusted_masters;
        assert_eq!(trusted.pkcs11_modules, [Path::new("/usr/lib/softhsm/libsofthsm2.so")]);
        assert_eq!(trusted.aws_kms_endpoints, ["https://kms.example"]);
        assert_eq!(trusted.keys, Some(vec!["pkcs11:prod/master-2".to_owned()]));

        std::fs::write(&path, format!("{base}[trusted_masters]\nmodules = []\n")).unwrap();
        let error = ServerConfig::load(&path).unwrap_err().to_string();
        assert!(error.contains("unknown field"), "{error}");
        // Keys are named as GET /v1/master names them, not as the file's
        // `provider` values: a misspelt kind is refused at load.
        for key in [
            "aws_kms:arn:aws:kms:eu-west-1:1:key/k",
            "aws-kms:alias/prod",
            "pkcs11:master-2",
            "pkcs11:",
            "local:",
            "master-2",
        ] {
            std::fs::write(&path, format!("{base}[trusted_masters]\nkeys = [{key:?}]\n")).unwrap();
            let error = ServerConfig::load(&path).unwrap_err().to_string();
            assert!(error.contains("trusted_masters.keys") && error.contains(key), "{error}");
        }
        let accounts = "[trusted_masters]\naws_kms_accounts = [\"111122223333\"]\n";
        std::fs::write(&path, format!("{base}{accounts}")).unwrap();
        let trusted = ServerConfig::load(&path).unwrap().trusted_masters;
        assert_eq!(trusted.aws_kms_accounts, ["111122223333"]);
        for account in ["11112222333", "1111222233334", "1111-2222-33", "arn:aws:iam::1"] {
            let table = format!("[trusted_masters]\naws_kms_accounts = [{account:?}]\n");
            std::fs::write(&path, format!("{base}{table}")).unwrap();
            let error = ServerConfig::load(&path).unwrap_err().to_string();
            assert!(error.contains("aws_kms_accounts") && error.contains(account), "{error}");
        }
    }

    #[test]
    fn only_an_arn_names_an_aws_account() {
        let key = "arn:aws:kms:eu-west-1:111122223333:key/0000";
        assert_eq!(arn_account(key), Some("111122223333"));
        let alias = "arn:aws-us-gov:kms:us-gov-west-1:444455556666:alias/prod";
        assert_eq!(arn_account(alias), Some("444455556666"));
        for bare in ["0000-1111", "alias/prod", "arn:aws:kms", "arn:aws:kms:eu-west-1"] {
            assert_eq!(arn_account(bare), None, "{bare}");
        }
    }

    /// `[limits]` from `text`, checked.
    fn limits(text: &str) -> Result<Limits, String> {
        let limits: Limits = toml::from_str(text).map_err(|e| e.to_string())?;
        limits.check().map(|()| limits).map_err(|e| e.to_string())
    }

    #[test]
    fn an_identity_share_leaves_room_for_the_largest_batch() {
        // By default, half the pool or what the largest batch leaves of
        // it, whichever is less: 16,384 - 10,000.
        let defaults = limits("").unwrap();
        assert_eq!(defaults.keys_in_flight_per_identity(), 6_384);
        let share = |text: &str| limits(text).unwrap().keys_in_flight_per_identity();
        assert_eq!(share("max_keys_in_flight = 100_000"), 50_000);
        assert_eq!(share("max_keys_in_flight = 4000\nmax_batch = 1000"), 2_000);
        assert_eq!(share("max_keys_in_flight = 4000\nmax_batch = 3000"), 1_000);
        // A batch as large as the pool leaves nothing: 1, an identity's
        // requests for keys one at a time.
        assert_eq!(share("max_keys_in_flight = 1000"), 1);
        assert_eq!(share("max_keys_in_flight = 10000"), 1);
        // Set, the share and the largest batch must fit in the pool.
        assert_eq!(share("max_keys_in_flight_per_identity = 6384"), 6_384);
        assert_eq!(
            share(
                "max_keys_in_flight = 3500\nmax_keys_in_flight_per_identity = 1000\nmax_batch = 2500"
            ),
            1_000
        );
        for bad in [
            "max_keys_in_flight_per_identity = 8192",
            "max_keys_in_flight = 1000\nmax_keys_in_flight_per_identity = 1000",
            "max_keys_in_flight = 3500\nmax_keys_in_flight_per_identity = 1001\nmax_batch = 2500",
        ] {
            let e = limits(bad).unwrap_err();
            assert!(
                e.contains("limits.max_keys_in_flight_per_identity")
                    && e.contains("plus limits.max_batch")
                    && e.contains("must be at most limits.max_keys_in_flight"),
                "{bad}: {e}"
            );
        }
        let e = limits("max_keys_in_flight_per_identity = 0").unwrap_err();
        assert!(e.contains("max_keys_in_flight_per_identity must be at least 1"), "{e}");
    }

    #[test]
    fn waits_and_deadlines_for_keys_are_checked_as_they_apply() {
        // A request timeout of 0 counts as 1 s: the wait must be shorter.
        assert!(limits("request_timeout_secs = 0\nkeys_wait_ms = 999").is_ok());
        let e = limits("request_timeout_secs = 0\nkeys_wait_ms = 1000").unwrap_err();
        assert!(e.contains("limits.keys_wait_ms (1000 ms) must be shorter"), "{e}");
        assert!(e.contains("(1 s;"), "{e}");
        assert!(limits("request_timeout_secs = 30\nkeys_wait_ms = 30000").is_err());
        assert!(limits("request_timeout_secs = 0").unwrap_err().contains("(1 s;"), "5 s default");
        // No send deadline of 0 (it would have been 1 s without a word).
        let e = limits("keys_send_timeout_secs = 0").unwrap_err();
        assert!(e.contains("limits.keys_send_timeout_secs must be at least 1"), "{e}");
        assert_eq!(limits("keys_send_timeout_secs = 1").unwrap().keys_send_timeout().as_secs(), 1);
    }

    #[test]
    fn handshakes_have_a_budget_smaller_than_the_connections() {
        let defaults = limits("").unwrap();
        assert_eq!(
            (defaults.max_connections, defaults.max_handshakes, defaults.max_handshakes_per_peer),
            (4_096, 256, 32)
        );
        assert!(limits("max_connections = 300\nmax_handshakes = 299").is_ok());
        for bad in ["max_connections = 256", "max_connections = 100\nmax_handshakes = 200"] {
            let e = limits(bad).unwrap_err();
            assert!(e.contains("must be less than limits.max_connections"), "{bad}: {e}");
        }
        for zero in ["max_connections", "max_handshakes", "max_handshakes_per_peer"] {
            let e = limits(&format!("{zero} = 0")).unwrap_err();
            assert!(e.contains(&format!("limits.{zero} must be at least 1")), "{e}");
        }
    }
}
