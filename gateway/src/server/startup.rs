//! Starting and stopping the key service.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hsm_adapters::{Argon2Params, LocalRootKey};
use kms_core::store::{Invalidation, KeyStore, PgStoreOptions, PostgresStore, SqliteStore};
use kms_core::{HierarchyConfig, KeyHierarchy, RootKeyError, RootKeyProvider};
use secrecy::SecretString;
use tokio::net::TcpListener;
use tokio::signal::unix::Signal;

use super::handlers::compliance::ComplianceContext;
use super::masters::{MasterTrust, RecordedMasters, masters_in_use, recorded_settings};
use super::{AppState, jobs, listener, routes};
use crate::abuse::{KeyRoom, SlotLimits};
use crate::audit_log::AuditLog;
use crate::compliance::Profile;
use crate::config::{RootConfig, ServerConfig};
use crate::metrics::Metrics;
use crate::policy::{PolicyHandle, PolicyRefused};
use crate::tls::{TlsError, TlsReloader};

/// How long shutdown waits for in-flight requests.
const DRAIN: Duration = Duration::from_secs(20);
/// How often expired keys are dropped from memory.
const EVICT_EVERY: Duration = Duration::from_secs(5);

/// The key service could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// A startup step failed; the message names it.
    #[error("{step}: {detail}")]
    Startup {
        /// What was being done.
        step: &'static str,
        /// What went wrong (never a secret).
        detail: String,
    },
}

fn fail(step: &'static str) -> impl FnOnce(&dyn std::fmt::Display) -> ServerError {
    move |e| ServerError::Startup { step, detail: e.to_string() }
}

/// Runs the key service until SIGTERM or SIGINT.
pub async fn run(config: ServerConfig) -> Result<(), ServerError> {
    let hygiene = crate::hygiene::harden();
    crate::compliance::server_report(&config, &hygiene)
        .enforce()
        .map_err(|e| fail("compliance")(&e))?;
    let compliance = Arc::new(ComplianceContext { config: config.clone(), hygiene });
    // One key service per data directory, for the whole run, where it
    // holds this process's state: two sharing one would share its
    // generated instance id (and so an audit chain) or its SQLite keystore
    // (without hearing each other's invalidations). A PostgreSQL replica
    // with its own `instance` keeps nothing there.
    let _data_dir = if config.storage_url.is_none() || config.instance.is_none() {
        crate::claim::create_private_dir(&config.data_dir)
            .map_err(|e| fail("data directory")(&e))?;
        let lock = config.data_dir.join("key-service.lock");
        let claim = crate::claim::claim(&config.data_dir, &lock, "another key service");
        Some(claim.map_err(|e| fail("data directory")(&e))?)
    } else {
        None
    };
    let instance = instance_id(&config).map_err(|e| fail("instance id")(&e))?;
    let (store, sqlite) = open_store(&config).await?;
    // Whether commits are durable is the database's answer, not the URL's;
    // asked before the root key is used at all.
    let durability = store.durability().await.map_err(|e| fail("keystore")(&e))?;
    let mut live = crate::compliance::Report::new(config.profile);
    crate::compliance::add_keystore_durability(&mut live, &durability);
    live.enforce().map_err(|e| fail("compliance")(&e))?;
    let root = root_provider(&config.root).await?;
    let settings = recorded_settings(&config.root).map_err(|e| fail("root key settings")(&e))?;
    let master_trust = Arc::new(
        MasterTrust::new(&config.root, &config.trusted_masters).with_root_key(&root.describe()),
    );
    let hierarchy = Arc::new(
        KeyHierarchy::open(
            store.clone(),
            root.clone(),
            Some(&settings),
            Some(Arc::new(RecordedMasters::new(master_trust.clone()))),
            HierarchyConfig {
                key_ttl: Duration::from_secs(config.keys.kek_ttl_secs),
                max_batch: config.limits.max_batch,
                ..HierarchyConfig::default()
            },
        )
        .await
        .map_err(|e| fail("key hierarchy")(&e))?,
    );
    // A configured [root] that passed the checks above may not wrap the
    // keys: since a master rotation, every master that does must pass too.
    // (A development root failed already, and was reported.)
    if !matches!(config.root, RootConfig::DevLocal { .. }) {
        let in_use = masters_in_use(store.as_ref()).await.map_err(|e| fail("master keys")(&e))?;
        let mut live = crate::compliance::Report::new(config.profile);
        crate::compliance::add_masters_in_use(&mut live, &in_use);
        live.enforce().map_err(|e| fail("compliance")(&e))?;
    }
    tokio::spawn(follow_invalidations(store.clone(), hierarchy.clone()));
    let policy = Arc::new(PolicyHandle::load(&config.policy.file).map_err(|e| fail("policy")(&e))?);
    let metrics = Arc::new(Metrics::default());
    metrics.policy_loaded.set(unix_now());
    let (audit, audit_task) =
        AuditLog::start(&hierarchy, &instance, &config.audit, metrics.clone())
            .await
            .map_err(|e| fail("audit log")(&e))?;
    let tls =
        Arc::new(TlsReloader::load(&config.tls, config.profile).map_err(|e| fail("TLS")(&e))?);
    tls_loaded(&tls, &metrics);
    let key_permits = KeyRoom::new(
        config.limits.keys_in_flight(),
        config.limits.keys_in_flight_per_identity(),
        Duration::from_millis(config.limits.keys_wait_ms),
        metrics.keys_busy.clone(),
    );
    if config.limits.max_keys_in_flight_per_identity.is_none()
        && config.limits.max_batch >= config.limits.keys_in_flight()
    {
        tracing::warn!(
            max_batch = config.limits.max_batch,
            max_keys_in_flight = config.limits.max_keys_in_flight,
            "limits.max_batch leaves no room in limits.max_keys_in_flight for a share per \
             identity: each identity's requests for keys run one at a time"
        );
    }
    let state = AppState {
        hierarchy: hierarchy.clone(),
        policy: policy.clone(),
        audit,
        metrics,
        limits: config.limits.clone(),
        lifecycle: config.lifecycle.clone(),
        keys: config.keys.clone(),
        master_trust,
        key_permits,
        root_probe: Arc::default(),
    };

    // Signal handlers exist before anyone is told where to connect, so a
    // SIGTERM right after the first line is a clean shutdown, not a kill.
    let terminated = crate::signals::termination().map_err(|e| fail("signals")(&e))?;
    let listener = TcpListener::bind(config.listen).await.map_err(|e| fail("listen")(&e))?;
    let addr = listener.local_addr().map_err(|e| fail("listen")(&e))?;
    tracing::info!(%addr, instance, root = %root.describe(), "key service listening");
    // The first stdout line tells scripts and tests where to connect.
    let mut stdout = std::io::stdout();
    let _ = writeln!(stdout, "keygate server listening on https://{addr}");
    let _ = stdout.flush();

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let jobs = jobs::spawn(state.clone(), stop_rx.clone());
    spawn_maintenance(
        tls.clone(),
        policy,
        state.metrics.clone(),
        hierarchy,
        config.tls.reload_interval_secs,
        config.profile,
        stop_rx.clone(),
    );
    let limits = listener::ConnectionLimits {
        slots: SlotLimits {
            connections: config.limits.max_connections,
            handshakes: config.limits.max_handshakes,
            handshakes_per_peer: config.limits.max_handshakes_per_peer,
        },
        handshake: Duration::from_secs(config.limits.handshake_timeout_secs.max(1)),
        headers: config.abuse.header_read_timeout(),
        idle: config.abuse.idle_timeout(),
        send: Some(config.limits.keys_send_timeout()),
    };
    let metrics = state.metrics.clone();
    if let Some(ops_addr) = config.ops_listen {
        let router = routes::ops(state.clone());
        let metrics = metrics.clone();
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let shutdown = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            let ops = match TcpListener::bind(ops_addr).await {
                Ok(ops) => ops,
                Err(e) => {
                    tracing::error!(error = %e, "ops listener failed");
                    return;
                }
            };
            if let Ok(addr) = ops.local_addr() {
                tracing::info!(%addr, "ops endpoints listening (plain HTTP)");
            }
            listener::serve_plain(ops, router, limits, metrics, shutdown, DRAIN).await;
        });
    }

    let router = routes::api(state).layer(axum::Extension(compliance));
    let router =
        crate::abuse::protect_key_service(router, &config.abuse, config.limits.max_body_bytes);
    listener::serve_tls(listener, tls, router, limits, metrics, terminated, DRAIN).await;
    tracing::info!("shutting down: flushing the audit log");
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(DRAIN, jobs).await;
    // The router (and with it every audit handle) is gone: the writer
    // drains its queue, signs a final checkpoint and stops.
    let _ = tokio::time::timeout(DRAIN, audit_task).await;
    if let Some(sqlite) = sqlite {
        sqlite.close().await;
    }
    Ok(())
}

/// The configured keystore: PostgreSQL for replicas, else SQLite.
async fn open_store(
    config: &ServerConfig,
) -> Result<(Arc<dyn KeyStore>, Option<SqliteStore>), ServerError> {
    match &config.storage_url {
        Some(url) if url.is_postgres() => {
            let mut options = PgStoreOptions::default();
            options.schema = config.storage_schema.clone();
            let store = PostgresStore::connect(url.expose(), options)
                .await
                .map_err(|e| fail("keystore (postgres)")(&e))?;
            Ok((Arc::new(store), None))
        }
        Some(url) => {
            Err(fail("keystore")(&format!("unsupported storage_url {url:?}: use postgres://…")))
        }
        None => {
            let store = SqliteStore::open_in_dir(&config.data_dir)
                .await
                .map_err(|e| fail("keystore")(&e))?;
            Ok((Arc::new(store.clone()), Some(store)))
        }
    }
}

/// Applies cache invalidations announced by other replicas (PostgreSQL
/// LISTEN/NOTIFY); the key TTL stays the backstop for anything missed.
async fn follow_invalidations(store: Arc<dyn KeyStore>, hierarchy: Arc<KeyHierarchy>) {
    let mut backoff = Duration::from_millis(200);
    loop {
        let mut subscription = match store.subscribe_invalidations().await {
            Ok(Some(s)) => s,
            Ok(None) => return, // a single-instance store
            Err(e) => {
                tracing::warn!(error = %e, "cannot follow cache invalidations yet; the key TTL is the backstop");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
                continue;
            }
        };
        // Anything may have changed while not subscribed.
        hierarchy.invalidate_all();
        while let Some(invalidation) = subscription.recv().await {
            match invalidation {
                Invalidation::Tenant(tenant) => hierarchy.invalidate_tenant(&tenant),
                _ => hierarchy.invalidate_all(),
            }
        }
        return; // the store is gone: the process is shutting down
    }
}

/// SIGHUP and file-change reloads of TLS material and policy, and eviction
/// of expired keys from memory. A reloaded policy must pass `profile`'s
/// rules (the TLS reloader holds its own).
fn spawn_maintenance(
    tls: Arc<TlsReloader>,
    policy: Arc<PolicyHandle>,
    metrics: Arc<Metrics>,
    hierarchy: Arc<KeyHierarchy>,
    reload_secs: u64,
    profile: Profile,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    let hup = crate::signals::hangups(
        "TLS material reloads only when its files change, and the policy only at restart",
    );
    let (polled, polled_metrics) = (tls.clone(), metrics.clone());
    let tasks = Maintenance {
        on_hangup: move || {
            tracing::info!("SIGHUP: reloading TLS material and policy");
            reload_tls(&tls, &metrics, |tls| tls.reload().map(|()| true));
            reload_policy(&policy, &metrics, profile);
        },
        on_poll: move || {
            reload_tls(&polled, &polled_metrics, TlsReloader::reload_if_changed);
        },
        on_evict: move || {
            let dropped = hierarchy.evict_expired();
            if dropped > 0 {
                tracing::debug!(dropped, "expired tenant keys dropped from memory");
            }
        },
    };
    let poll = Duration::from_secs(reload_secs.max(1));
    tokio::spawn(maintain(hup, poll, EVICT_EVERY, tasks, stop));
}

/// Runs a TLS reload (`reload`: of every file, or of changed ones only,
/// telling whether it loaded anything). A failure keeps the certificates
/// in force and is counted, so that a renewal that never took can raise
/// an alert before the old certificate expires; a broken file is tried,
/// and counted, again at each poll until it is mended. Files caught being
/// replaced are no failure: the next poll reads them again.
fn reload_tls(
    tls: &TlsReloader,
    metrics: &Metrics,
    reload: impl FnOnce(&TlsReloader) -> Result<bool, TlsError>,
) {
    match reload(tls) {
        Ok(true) => tls_loaded(tls, metrics),
        Ok(false) => {}
        Err(TlsError::Changed) => {
            tracing::info!(
                "the TLS files changed while they were read; they are read again at the next poll"
            );
        }
        Err(e) => {
            metrics.tls_reload_failures.inc();
            tracing::error!(error = %e, "TLS reload failed; keeping the previous certificates");
        }
    }
}

/// Records that `tls` now holds a newly loaded configuration.
fn tls_loaded(tls: &TlsReloader, metrics: &Metrics) {
    metrics.tls_loaded.set(unix_now());
    metrics.tls_certificate_expiry.set(tls.not_after());
}

/// Reloads the policy file. A file that does not parse, or a policy that
/// `profile` refuses (production: a rule the start would refuse it for),
/// keeps the policy in force. Either is counted, so that an edit that
/// never took (a revocation with a typo) can raise an alert rather than
/// wait in the log.
fn reload_policy(policy: &PolicyHandle, metrics: &Metrics, profile: Profile) {
    // The profile's rules judge the very policy that goes into force
    // (under development they would refuse nothing, and the start-up
    // report said once what fails).
    let checked = policy.reload_checked(|candidate| {
        crate::compliance::refused_in_production(profile, || {
            crate::compliance::policy_report(profile, candidate)
        })
    });
    match checked {
        Ok(()) => {
            metrics.policy_loaded.set(unix_now());
        }
        Err(PolicyRefused::Invalid(e)) => {
            metrics.policy_reload_failures.inc();
            tracing::error!(error = %e, "policy reload failed; keeping the previous policy");
        }
        Err(PolicyRefused::Check(e)) => {
            metrics.policy_reload_failures.inc();
            tracing::error!(
                rules = %crate::compliance::refusal(&e),
                "policy reload refused by the production profile; keeping the previous policy"
            );
        }
    }
}

/// Seconds since the Unix epoch (0 for a clock before it).
fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| i64::try_from(since.as_secs()).unwrap_or(i64::MAX))
}

/// What the maintenance task does: on SIGHUP, at each file poll, at each
/// eviction round.
struct Maintenance<H, P, E> {
    on_hangup: H,
    on_poll: P,
    on_evict: E,
}

/// Runs `tasks` until `stop` changes: SIGHUP reloads when `hup` could be
/// registered, file polls and key eviction whether or not.
async fn maintain<H: FnMut(), P: FnMut(), E: FnMut()>(
    mut hup: Option<Signal>,
    poll: Duration,
    evict: Duration,
    mut tasks: Maintenance<H, P, E>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut poll = tokio::time::interval(poll);
    let mut evict = tokio::time::interval(evict);
    loop {
        tokio::select! {
            () = crate::signals::next_hangup(&mut hup) => (tasks.on_hangup)(),
            _ = poll.tick() => (tasks.on_poll)(),
            _ = evict.tick() => (tasks.on_evict)(),
            _ = stop.changed() => break,
        }
    }
}

/// Connects the configured root key provider; each one performs a real
/// wrap/unwrap before it is returned, so a wrong PIN, an unknown key label
/// or an unreachable endpoint stops the start with a clear message.
pub(crate) async fn root_provider(
    config: &RootConfig,
) -> Result<Arc<dyn RootKeyProvider>, ServerError> {
    connect_provider(config)
        .await
        .map_err(|f| ServerError::Startup { step: f.step, detail: f.detail })
}

/// Why a provider could not be connected, keeping what the provider says
/// about retrying (a master that is only unreachable is tried again
/// sooner than one whose settings are wrong).
#[derive(Debug)]
pub(crate) struct ConnectFailure {
    /// The step, naming the provider: `root key (pkcs11)`.
    pub(crate) step: &'static str,
    /// The provider's message (never a secret).
    pub(crate) detail: String,
    /// Whether the same attempt may succeed later.
    pub(crate) retryable: bool,
}

impl ConnectFailure {
    /// A provider's own error, whose kind says whether to retry.
    fn provider<E: std::fmt::Display + Into<RootKeyError>>(
        step: &'static str,
    ) -> impl FnOnce(E) -> Self {
        move |e| {
            let detail = e.to_string();
            Self { step, detail, retryable: e.into().is_retryable() }
        }
    }

    /// Anything else: settings, files, a task that did not finish.
    fn fixed(step: &'static str) -> impl FnOnce(&dyn std::fmt::Display) -> Self {
        move |e| Self { step, detail: e.to_string(), retryable: false }
    }
}

/// [`root_provider`], keeping the failure's kind.
pub(crate) async fn connect_provider(
    config: &RootConfig,
) -> Result<Arc<dyn RootKeyProvider>, ConnectFailure> {
    match config {
        RootConfig::Pkcs11 { .. } => {
            const STEP: &str = "root key (pkcs11)";
            let pkcs11 = config
                .pkcs11()
                .map_err(|e| ConnectFailure::fixed(STEP)(&e))?
                .ok_or_else(|| ConnectFailure::fixed(STEP)(&"not a pkcs11 configuration"))?;
            let provider =
                tokio::task::spawn_blocking(move || hsm_adapters::Pkcs11RootKey::connect(pkcs11))
                    .await
                    .map_err(|e| ConnectFailure::fixed(STEP)(&e))?
                    .map_err(|e| {
                        // A token that answers a wrong PIN with, say,
                        // CKR_DEVICE_ERROR still gets the long wait.
                        let login = e.is_login_failure();
                        let failure = ConnectFailure::provider(STEP)(e);
                        ConnectFailure { retryable: failure.retryable && !login, ..failure }
                    })?;
            Ok(Arc::new(provider))
        }
        RootConfig::AwsKms { region, key_id, endpoint_url, timeout_ms } => {
            let mut kms = hsm_adapters::AwsKmsConfig::new(region, key_id);
            kms.endpoint_url = endpoint_url.clone();
            kms.timeout = Duration::from_millis((*timeout_ms).max(1));
            let provider = hsm_adapters::AwsKmsRootKey::connect(kms)
                .await
                .map_err(ConnectFailure::provider("root key (aws-kms)"))?;
            Ok(Arc::new(provider))
        }
        RootConfig::DevLocal { key_file, passphrase_file, create_if_missing } => {
            let passphrase = match passphrase_file {
                Some(path) => Some(
                    read_secret(path)
                        .map_err(|e| ConnectFailure::fixed("root key passphrase")(&e))?,
                ),
                None => None,
            };
            let (path, create) = (key_file.clone(), *create_if_missing && !key_file.exists());
            let provider = tokio::task::spawn_blocking(move || {
                if create {
                    LocalRootKey::create(&path, passphrase.as_ref(), Argon2Params::DEFAULT)
                } else {
                    LocalRootKey::open(&path, passphrase.as_ref())
                }
            })
            .await
            .map_err(|e| ConnectFailure::fixed("root key")(&e))?
            .map_err(ConnectFailure::provider("root key"))?;
            Ok(Arc::new(provider))
        }
    }
}

/// Most bytes of a passphrase file.
const MAX_SECRET_FILE_LEN: u64 = 4096;

/// Reads a secret from a regular file of at most 4 KiB (trailing newline
/// removed); settings recorded in the keystore may name any path.
fn read_secret(path: &Path) -> std::io::Result<SecretString> {
    let file = hsm_adapters::read_secret_file(path, MAX_SECRET_FILE_LEN)?;
    let text = std::str::from_utf8(&file.contents)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "not valid UTF-8"))?;
    Ok(SecretString::from(text.trim_end_matches(['\n', '\r']).to_owned()))
}

/// The configured instance name, or one generated once and kept in the
/// data directory.
fn instance_id(config: &ServerConfig) -> std::io::Result<String> {
    if let Some(instance) = &config.instance {
        return Ok(instance.clone());
    }
    std::fs::create_dir_all(&config.data_dir)?;
    let path = config.data_dir.join("instance-id");
    match std::fs::read_to_string(&path) {
        Ok(id) if !id.trim().is_empty() => Ok(id.trim().to_owned()),
        _ => {
            let random = kms_core::crypto::rng::array::<6>().map_err(std::io::Error::other)?;
            let id = format!("ks-{}", data_encoding::HEXLOWER.encode(&random));
            std::fs::write(&path, format!("{id}\n"))?;
            Ok(id)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use secrecy::ExposeSecret;

    use super::*;
    use crate::pki::{DevCa, Validity};
    use crate::policy::Role;
    use crate::tls::tests::write_files;

    #[tokio::test(start_paused = true)]
    async fn maintenance_runs_on_without_sighup() {
        let (polls, evictions) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let tasks = Maintenance {
            on_hangup: || panic!("no SIGHUP handler"),
            on_poll: {
                let polls = polls.clone();
                move || {
                    polls.fetch_add(1, Ordering::Relaxed);
                }
            },
            on_evict: {
                let evictions = evictions.clone();
                move || {
                    evictions.fetch_add(1, Ordering::Relaxed);
                }
            },
        };
        let (stop_tx, stop) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(maintain(
            None,
            Duration::from_secs(5),
            Duration::from_secs(2),
            tasks,
            stop,
        ));
        tokio::time::sleep(Duration::from_millis(20_500)).await;
        // At once, then every 5 s and every 2 s.
        assert_eq!(polls.load(Ordering::Relaxed), 5);
        assert_eq!(evictions.load(Ordering::Relaxed), 11);
        let _ = stop_tx.send(true);
        task.await.unwrap();
    }

    #[test]
    fn a_failed_policy_reload_is_counted_and_the_old_policy_stays() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("policy.toml");
        let grant = |roles: &str| {
            format!(
                "[[grant]]\nidentity = \"spiffe://a\"\ntenants = [\"onc\"]\nroles = [{roles}]\n"
            )
        };
        std::fs::write(&file, grant(r#""admin""#)).unwrap();
        let policy = PolicyHandle::load(&file).unwrap();
        let metrics = Metrics::default();
        let onc = kms_core::TenantId::new("onc").unwrap();
        let admin = |p: &PolicyHandle| p.current().authorize("spiffe://a", &onc, Role::Admin);

        // A revocation with a typo: refused, counted, the grant still in force.
        std::fs::write(&file, grant(r#""admni""#)).unwrap();
        reload_policy(&policy, &metrics, Profile::Production);
        assert_eq!(metrics.policy_reload_failures.get(), 1);
        assert_eq!(metrics.policy_loaded.get(), 0, "no load to date");
        assert!(admin(&policy), "the old policy stays in force");
        reload_policy(&policy, &metrics, Profile::Production);
        assert_eq!(metrics.policy_reload_failures.get(), 2, "each failure counts");

        // The fixed edit takes, and says when.
        std::fs::write(&file, grant(r#""auditor""#)).unwrap();
        let before = unix_now();
        reload_policy(&policy, &metrics, Profile::Production);
        assert!(!admin(&policy));
        assert_eq!(metrics.policy_reload_failures.get(), 2);
        assert!(metrics.policy_loaded.get() >= before, "{}", metrics.policy_loaded.get());
        let text = metrics.encode();
        assert!(text.lines().any(|l| l == "keygate_policy_reload_failures_total 2"), "{text}");
    }

    #[test]
    fn a_production_policy_reload_is_held_to_least_privilege() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("policy.toml");
        let encryptor = |tenants: &str| {
            format!(
                "[[grant]]\nidentity = \"spiffe://app\"\ntenants = [{tenants}]\nroles = [\"encryptor\"]\n"
            )
        };
        std::fs::write(&file, encryptor(r#""onc""#)).unwrap();
        let policy = PolicyHandle::load(&file).unwrap();
        let metrics = Metrics::default();
        let other = kms_core::TenantId::new("cardio").unwrap();
        let encrypts_for_other =
            |p: &PolicyHandle| p.current().authorize("spiffe://app", &other, Role::Encryptor);

        // A wildcard data grant, which production refuses at start.
        std::fs::write(&file, encryptor(r#""*""#)).unwrap();
        reload_policy(&policy, &metrics, Profile::Production);
        assert!(!encrypts_for_other(&policy), "the old policy stays in force");
        assert_eq!(metrics.policy_reload_failures.get(), 1);
        assert_eq!(metrics.policy_loaded.get(), 0, "no load to date");

        // The development profile takes it, and says nothing of the rule
        // at each reload (its start-up report said once what fails).
        let logs = crate::tls::tests::logs_of(|| {
            reload_policy(&policy, &metrics, Profile::Development);
        });
        assert!(!logs.contains("policy.least_privilege"), "{logs}");
        assert!(encrypts_for_other(&policy));
        assert_eq!(metrics.policy_reload_failures.get(), 1);
    }

    #[test]
    fn a_failed_tls_reload_is_counted_and_the_old_certificates_stay() {
        let dir = tempfile::tempdir().unwrap();
        let ca = DevCa::generate_for("Example Health Issuing CA", "Example Health").unwrap();
        let issue = |validity| ca.issue_server(&["localhost"], validity).unwrap();
        let paths = write_files(dir.path(), &issue(Validity::days(1)), &ca);
        let tls = TlsReloader::load(&paths, Profile::Production).unwrap();
        let metrics = Metrics::default();
        tls_loaded(&tls, &metrics);
        let (loaded, expiry) = (metrics.tls_loaded.get(), metrics.tls_certificate_expiry.get());
        assert_eq!(expiry, tls.not_after());
        let hangup = |tls: &TlsReloader| tls.reload().map(|()| true);

        // A renewed certificate without its key, then an expired one:
        // refused and counted, the certificate in force stays.
        let renewed = issue(Validity::days(30));
        std::fs::write(&paths.cert, &renewed.cert_pem).unwrap();
        reload_tls(&tls, &metrics, TlsReloader::reload_if_changed);
        assert_eq!(metrics.tls_reload_failures.get(), 1);
        write_files(dir.path(), &issue(Validity::expired()), &ca);
        reload_tls(&tls, &metrics, hangup);
        assert_eq!(metrics.tls_reload_failures.get(), 2);
        assert_eq!(tls.not_after(), expiry, "the old certificate stays in force");
        assert_eq!(metrics.tls_certificate_expiry.get(), expiry);
        assert_eq!(metrics.tls_loaded.get(), loaded);

        // The renewal completed: taken, and says when and until when.
        write_files(dir.path(), &renewed, &ca);
        reload_tls(&tls, &metrics, TlsReloader::reload_if_changed);
        assert_eq!(metrics.tls_reload_failures.get(), 2);
        assert!(metrics.tls_certificate_expiry.get() > expiry + 28 * 86_400);
        assert!(metrics.tls_loaded.get() >= loaded);
        let text = metrics.encode();
        assert!(text.lines().any(|l| l == "keygate_tls_reload_failures_total 2"), "{text}");
        let line = format!(
            "keygate_tls_certificate_expiry_timestamp_seconds {}",
            metrics.tls_certificate_expiry.get()
        );
        assert!(text.lines().any(|l| l == line), "{line} in {text}");
    }

    #[test]
    fn tls_files_caught_being_replaced_are_no_reload_failure() {
        let dir = tempfile::tempdir().unwrap();
        let ca = DevCa::generate_for("Example Health Issuing CA", "Example Health").unwrap();
        let server = ca.issue_server(&["localhost"], Validity::days(1)).unwrap();
        let paths = write_files(dir.path(), &server, &ca);
        let tls = TlsReloader::load(&paths, Profile::Production).unwrap();
        let metrics = Metrics::default();
        // A renewal under way, seen mid-way: read again at the next poll.
        let logs = crate::tls::tests::logs_of(|| {
            reload_tls(&tls, &metrics, |_| Err(TlsError::Changed));
        });
        assert_eq!(metrics.tls_reload_failures.get(), 0);
        assert!(logs.contains("INFO") && logs.contains("read again at the next poll"), "{logs}");
        assert!(!logs.contains("ERROR"), "{logs}");
    }

    #[test]
    fn a_secret_file_is_a_short_regular_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("passphrase");
        std::fs::write(&file, "correct horse\r\n").unwrap();
        assert_eq!(read_secret(&file).unwrap().expose_secret(), "correct horse");
        // A device never ends and a directory has no contents: refused
        // before they are read.
        for other in [Path::new("/dev/zero"), dir.path()] {
            let error = read_secret(other).unwrap_err();
            assert_eq!(error.to_string(), "not a regular file", "{}", other.display());
        }
        std::fs::write(&file, vec![b'x'; 4097]).unwrap();
        assert_eq!(read_secret(&file).unwrap_err().to_string(), "longer than 4096 bytes");
        std::fs::write(&file, [0xff, 0xfe]).unwrap();
        assert_eq!(read_secret(&file).unwrap_err().to_string(), "not valid UTF-8");
    }
}
