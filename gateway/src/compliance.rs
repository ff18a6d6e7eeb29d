//! Compliance as code: the safeguards a production deployment must keep,
//! each checked against the running configuration and mapped to the HIPAA
//! Security Rule provision it implements (45 CFR 164.312).
//!
//! Every check has a stable rule id; [`Report`] is what `GET
//! /v1/compliance` returns and what `keygate server|sidecar --profile
//! production` (or `profile = "production"` in the config) enforces at
//! start: any failed rule stops the start with an error naming the rule
//! and the provision. The development profile reports the same checks and
//! only logs failures. `docs/compliance.md` maps each rule to its code and
//! the test that proves it.

use std::fmt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use kms_core::store::Durability;

use crate::config::{RootConfig, ServerConfig};
use crate::hygiene::Hygiene;
use crate::policy::{Grant, Policy, PolicyHandle, Role, TenantPattern};
use crate::sidecar::SidecarConfig;
use crate::sidecar::config::{KeyServiceConfig, Listen};

/// HIPAA Security Rule provisions (45 CFR 164.312) the checks map to.
pub mod hipaa {
    /// Access control.
    pub const ACCESS_CONTROL: &str = "164.312(a)(1)";
    /// Audit controls.
    pub const AUDIT_CONTROLS: &str = "164.312(b)";
    /// Integrity.
    pub const INTEGRITY: &str = "164.312(c)(1)";
    /// Person or entity authentication.
    pub const AUTHENTICATION: &str = "164.312(d)";
    /// Transmission security.
    pub const TRANSMISSION: &str = "164.312(e)(1)";

    /// The provision's name.
    pub fn title(provision: &str) -> &'static str {
        match provision {
            ACCESS_CONTROL => "access control",
            AUDIT_CONTROLS => "audit controls",
            INTEGRITY => "integrity",
            AUTHENTICATION => "person or entity authentication",
            TRANSMISSION => "transmission security",
            _ => "HIPAA Security Rule",
        }
    }
}

/// The rule that the master key is in an HSM or a KMS.
const ROOT_KEY_RULE: &str = "root_key.hardware_backed";
const AUDIT_DURABLE_RULE: &str = "audit.durable";
/// The rule that no certificate comes from a keygate development CA.
const DEVELOPMENT_PKI_RULE: &str = "tls.development_pki";

/// Longest KEK auto-rotation period a production deployment may allow.
pub const MAX_ROTATION_DAYS: u64 = 365;
/// Longest a signed audit checkpoint may wait, in seconds.
pub const MAX_CHECKPOINT_INTERVAL_SECS: u64 = 3_600;
/// Most events between two signed checkpoints.
pub const MAX_CHECKPOINT_EVERY: u64 = 100_000;
/// Longest a sidecar may keep keys or unreported field events, in seconds.
pub const MAX_SIDECAR_HOLD_SECS: u64 = 300;

/// Which safeguards are enforced at start.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum, ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Profile {
    /// Checks are reported and failures logged; nothing is refused.
    #[default]
    Development,
    /// Any failed check refuses the start.
    Production,
}

/// A check's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// The safeguard holds.
    Pass,
    /// It does not; `detail` says why.
    Fail,
}

/// One safeguard checked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Check {
    /// Stable rule id (`root_key.hardware_backed`, …).
    pub rule: String,
    /// The HIPAA provision (`164.312(a)(1)`, …).
    pub hipaa: String,
    /// Pass or fail.
    pub status: Status,
    /// What was found (never a secret).
    pub detail: String,
}

/// Every check of one process, with the profile it runs under.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Report {
    /// `production` or `development`.
    pub profile: Profile,
    /// The checks, in a fixed order.
    pub checks: Vec<Check>,
}

/// A production start refused: names every failed rule and its provision.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ComplianceError {
    failed: Vec<Check>,
}

impl ComplianceError {
    /// The failed checks.
    pub fn failed(&self) -> &[Check] {
        &self.failed
    }
}

impl fmt::Display for ComplianceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the production profile refuses to start:")?;
        for check in &self.failed {
            write!(
                f,
                " [{}] violates HIPAA 45 CFR {} ({}): {};",
                check.rule,
                check.hipaa,
                hipaa::title(&check.hipaa),
                check.detail
            )?;
        }
        Ok(())
    }
}

impl Report {
    /// A report with no checks yet, for checks added one by one.
    pub fn new(profile: Profile) -> Self {
        Self { profile, checks: Vec::new() }
    }

    fn add(&mut self, rule: &str, hipaa: &str, outcome: Result<String, String>) {
        let (status, detail) = match outcome {
            Ok(detail) => (Status::Pass, detail),
            Err(detail) => (Status::Fail, detail),
        };
        self.checks.push(Check { rule: rule.to_owned(), hipaa: hipaa.to_owned(), status, detail });
    }

    /// Fails `rule` for `detail` as well, with what was found after the
    /// configuration's checks (from the keystore, once connected): a
    /// passing check fails, a failing one gives both reasons, a missing
    /// one is added.
    fn fail_also(&mut self, rule: &str, hipaa: &str, detail: String) {
        match self.checks.iter_mut().find(|c| c.rule == rule) {
            Some(check) if check.status == Status::Pass => {
                check.status = Status::Fail;
                check.detail = detail;
            }
            Some(check) => check.detail = format!("{}; {detail}", check.detail),
            None => self.add(rule, hipaa, Err(detail)),
        }
    }

    /// The failed checks.
    pub fn failures(&self) -> impl Iterator<Item = &Check> {
        self.checks.iter().filter(|c| c.status == Status::Fail)
    }

    /// Logs failures; in the production profile, any failure is an error.
    pub fn enforce(&self) -> Result<(), ComplianceError> {
        let failed: Vec<Check> = self.failures().cloned().collect();
        for check in &failed {
            tracing::warn!(
                rule = check.rule,
                hipaa = check.hipaa,
                detail = check.detail,
                profile = ?self.profile,
                "compliance check failed"
            );
        }
        if self.profile == Profile::Production && !failed.is_empty() {
            return Err(ComplianceError { failed });
        }
        Ok(())
    }
}

/// The key service's checks, reading the policy file named by the config.
pub fn server_report(config: &ServerConfig, hygiene: &Hygiene) -> Report {
    let policy = PolicyHandle::load(&config.policy.file).map(|h| h.current());
    let policy = policy.as_deref().map_err(|e| e.to_string());
    server_report_with(config, hygiene, policy)
}

/// The key service's checks against a given (e.g. the live) policy.
pub fn server_report_with(
    config: &ServerConfig,
    hygiene: &Hygiene,
    policy: Result<&Policy, String>,
) -> Report {
    let mut r = Report::new(config.profile);
    r.add(ROOT_KEY_RULE, hipaa::ACCESS_CONTROL, root_key(&config.root));
    r.add(
        "transmission.api_mtls",
        hipaa::TRANSMISSION,
        Ok(match config.ops_listen {
            Some(ops) => format!(
                "the API on {} is served only over TLS with client certificates; {ops} serves \
                 plain /healthz, /readyz and /metrics only",
                config.listen
            ),
            None => format!(
                "the API on {} is served only over TLS with client certificates",
                config.listen
            ),
        }),
    );
    r.add("transmission.keystore_tls", hipaa::TRANSMISSION, keystore_tls(config));
    r.add(
        "authentication.client_certificates",
        hipaa::AUTHENTICATION,
        client_ca(&config.tls.client_ca),
    );
    r.add(
        DEVELOPMENT_PKI_RULE,
        hipaa::AUTHENTICATION,
        development_pki(&[
            ("tls.cert", &config.tls.cert),
            ("tls.client_ca", &config.tls.client_ca),
        ]),
    );
    r.add(AUDIT_DURABLE_RULE, hipaa::AUDIT_CONTROLS, audit_durable(config));
    r.add("integrity.audit_checkpoints", hipaa::INTEGRITY, checkpoints(config));
    r.add(
        "integrity.shred_delay",
        hipaa::INTEGRITY,
        shred_delay(config.lifecycle.shred_delay_secs),
    );
    r.add(
        "keys.rotation_period",
        hipaa::ACCESS_CONTROL,
        rotation(config.keys.max_rotation_period_days),
    );
    r.add("policy.least_privilege", hipaa::ACCESS_CONTROL, policy.and_then(least_privilege));
    let mut secrets = vec![("tls.key", config.tls.key.as_path())];
    match &config.root {
        RootConfig::DevLocal { key_file, passphrase_file, .. } => {
            secrets.push(("root.key_file", key_file));
            if let Some(p) = passphrase_file {
                secrets.push(("root.passphrase_file", p));
            }
        }
        RootConfig::Pkcs11 { pin_file: Some(p), .. } => secrets.push(("root.pin_file", p)),
        _ => {}
    }
    r.add("files.private_keys", hipaa::ACCESS_CONTROL, private_files(&secrets));
    r.add("process.core_dumps", hipaa::ACCESS_CONTROL, core_dumps(hygiene));
    r
}

/// Adds the live check that every tenant rotates its KEK on schedule:
/// `schedules` holds each live (not shredded) tenant's auto-rotation
/// period in seconds, if it has one.
pub fn add_tenant_rotation(
    report: &mut Report,
    max_days: u64,
    schedules: &[(String, Option<i64>)],
) {
    report.add("keys.tenant_rotation", hipaa::ACCESS_CONTROL, tenant_rotation(max_days, schedules));
}

fn tenant_rotation(max_days: u64, schedules: &[(String, Option<i64>)]) -> Result<String, String> {
    let max_secs = i64::try_from(max_days.saturating_mul(86_400)).unwrap_or(i64::MAX);
    let late: Vec<&str> = schedules
        .iter()
        .filter(|(_, every)| every.is_none_or(|secs| secs > max_secs))
        .map(|(tenant, _)| tenant.as_str())
        .collect();
    if late.is_empty() {
        return Ok(format!(
            "all {} tenants rotate their KEK at least every {max_days} days",
            schedules.len()
        ));
    }
    const SHOWN: usize = 10;
    let mut names = late.iter().take(SHOWN).copied().collect::<Vec<_>>().join(", ");
    if late.len() > SHOWN {
        names.push_str(&format!(" and {} more", late.len() - SHOWN));
    }
    Err(format!(
        "{} of {} tenants have no auto-rotation or one longer than {max_days} days: {names} \
         (keygate admin key auto-rotate --tenant T --every 90d)",
        late.len(),
        schedules.len()
    ))
}

/// The sidecar's checks.
pub fn sidecar_report(config: &SidecarConfig, hygiene: &Hygiene) -> Report {
    let mut r = Report::new(config.profile);
    let plain: Vec<&String> =
        config.key_service.urls.iter().filter(|u| !u.starts_with("https://")).collect();
    r.add(
        "transmission.key_service_tls",
        hipaa::TRANSMISSION,
        if plain.is_empty() {
            Ok("every key service URL is https:// with mutual TLS".to_owned())
        } else {
            Err(format!("key service URLs without TLS: {plain:?}"))
        },
    );
    r.add(
        "authentication.key_service_identity",
        hipaa::AUTHENTICATION,
        match &config.key_service.server_identity {
            Some(identity) => Ok(format!("the key service must present the identity {identity}")),
            None => Err("key_service.server_identity is not set: any certificate \
                         key_service.ca issues for the URL's host name is taken for the key \
                         service, whose answers are the DEKs records are encrypted under; set it \
                         to the key service's URI SAN"
                .to_owned()),
        },
    );
    r.add(
        "authentication.app_callers",
        hipaa::AUTHENTICATION,
        match (&config.listen, &config.token_file) {
            (_, Some(_)) => Ok("apps present a bearer token (token_file)".to_owned()),
            (Listen::Unix(path), None) => Ok(format!(
                "apps reach the API only through the unix socket {} (mode 0660)",
                path.display()
            )),
            (Listen::Tcp(addr), None) => Err(format!(
                "the API listens on {addr} without a bearer token: any local process can \
                 call it; set token_file or listen on a unix socket"
            )),
        },
    );
    r.add(
        "audit.field_events",
        hipaa::AUDIT_CONTROLS,
        if config.audit.max_unreported_secs <= MAX_SIDECAR_HOLD_SECS
            && config.audit.max_buffered > 0
        {
            Ok(format!(
                "field-level events reach the key service's audit chain; requests are refused \
                 once events wait over {} s",
                config.audit.max_unreported_secs
            ))
        } else {
            Err(format!(
                "audit.max_unreported_secs is {} (at most {MAX_SIDECAR_HOLD_SECS}) and \
                 audit.max_buffered {} (more than 0)",
                config.audit.max_unreported_secs, config.audit.max_buffered
            ))
        },
    );
    let hold = config.cache.ttl_secs.max(config.pool.ttl_secs);
    r.add(
        "keys.revocation_bound",
        hipaa::ACCESS_CONTROL,
        if hold <= MAX_SIDECAR_HOLD_SECS {
            Ok(format!("a disabled or shredded key stops working here within {hold} s"))
        } else {
            Err(format!(
                "cache.ttl_secs / pool.ttl_secs keep keys {hold} s (at most \
                 {MAX_SIDECAR_HOLD_SECS}): revocations would take that long to apply"
            ))
        },
    );
    let token = config.token_file.as_ref().map(|token| ("token_file", token.as_path()));
    add_sidecar_tls(&mut r, &config.key_service, token);
    r.add("process.core_dumps", hipaa::ACCESS_CONTROL, core_dumps(hygiene));
    r
}

/// Adds the sidecar's rules that judge its key service TLS files
/// (`tls.development_pki` and `files.private_keys`), the latter over
/// `other_secret` too if there is one.
fn add_sidecar_tls(
    r: &mut Report,
    key_service: &KeyServiceConfig,
    other_secret: Option<(&str, &Path)>,
) {
    r.add(
        DEVELOPMENT_PKI_RULE,
        hipaa::AUTHENTICATION,
        development_pki(&[
            ("key_service.cert", &key_service.cert),
            ("key_service.ca", &key_service.ca),
        ]),
    );
    let mut secrets = vec![("key_service.key", key_service.key.as_path())];
    secrets.extend(other_secret);
    r.add("files.private_keys", hipaa::ACCESS_CONTROL, private_files(&secrets));
}

/// Adds to `report` what the keystore says about the masters in use: a
/// master rotation can have moved keys away from the configured `[root]`,
/// and `root_key.hardware_backed` holds for every master that wraps keys
/// (or wraps the new ones) as much as for the configured one. `in_use`
/// holds each such master's kind and key reference
/// ([`kms_core::ProviderInfo`]); a `local` one fails the rule.
pub fn add_masters_in_use(report: &mut Report, in_use: &[(String, String)]) {
    let local: Vec<String> = in_use
        .iter()
        .filter(|(kind, _)| kind == hsm_adapters::LOCAL_PROVIDER_KIND)
        .map(|(kind, key_ref)| format!("{kind}:{key_ref}"))
        .collect();
    if local.is_empty() {
        return;
    }
    let detail = format!(
        "keys are wrapped under a local development key file ({}), not an HSM or KMS key \
         (a master rotation moved them there)",
        local.join(", ")
    );
    report.fail_also(ROOT_KEY_RULE, hipaa::ACCESS_CONTROL, detail);
}

/// Adds what the keystore itself says about its commits to the
/// `audit.durable` check: settings of the server, the database, the role
/// or `storage_url` that let an acknowledged commit (an audit event among
/// them) be lost fail it, wherever they were made.
pub fn add_keystore_durability(report: &mut Report, durability: &Durability) {
    match durability {
        Durability::Weakened(reason) => report.fail_also(
            AUDIT_DURABLE_RULE,
            hipaa::AUDIT_CONTROLS,
            format!("{reason}: audit events could be lost after they are acknowledged"),
        ),
        // The database's own words for a check that passes.
        Durability::Durable(how) => {
            let passing = report.checks.iter_mut().find(|c| c.rule == AUDIT_DURABLE_RULE);
            if let Some(check) = passing.filter(|c| c.status == Status::Pass) {
                check.detail = format!("{} ({how})", check.detail);
            }
        }
    }
}

/// Whether the profile allows `root` as a master key: the production
/// profile refuses what `root_key.hardware_backed` fails (the reason).
pub fn refused_root(profile: Profile, root: &RootConfig) -> Option<String> {
    match profile {
        Profile::Production => root_key(root).err(),
        Profile::Development => None,
    }
}

fn root_key(root: &RootConfig) -> Result<String, String> {
    match root {
        RootConfig::DevLocal { key_file, .. } => Err(format!(
            "the master key is a local development key file ({}), not an HSM or KMS key",
            key_file.display()
        )),
        RootConfig::Pkcs11 { token_label, key_label, .. } => {
            Ok(format!("master key {key_label} in PKCS#11 token {token_label}"))
        }
        RootConfig::AwsKms { endpoint_url: Some(url), .. }
            if hsm_adapters::endpoint_is_plain_http(url) =>
        {
            Err(format!(
                "the master key is reached over plain HTTP at {}: a local KMS emulator, not \
                 AWS KMS",
                hsm_adapters::endpoint_without_userinfo(url)
            ))
        }
        RootConfig::AwsKms { key_id, region, .. } => {
            Ok(format!("master key {key_id} in AWS KMS ({region})"))
        }
    }
}

fn keystore_tls(config: &ServerConfig) -> Result<String, String> {
    let Some(url) = &config.storage_url else {
        return Ok("SQLite keystore on local disk (no network)".to_owned());
    };
    // Judged as the store will connect, not by the text: a `host`
    // parameter overrides the URL's host, the last `sslmode` wins, and a
    // password may contain anything.
    let target = url.target().map_err(|e| format!("keystore {url:?}: {e}"))?;
    if target.verified_tls {
        Ok(format!(
            "keystore {url:?} at {} over TLS with a verified server certificate",
            target.host
        ))
    } else if target.local {
        Ok(format!("keystore {url:?} on this host ({})", target.host))
    } else {
        Err(format!(
            "keystore {url:?} is reached at {} over the network without sslmode=verify-full \
             (or verify-ca): wrapped keys and audit events would travel unprotected",
            target.host
        ))
    }
}

/// Most certificates a client CA bundle may hold: one dedicated to keygate
/// holds an organization's few issuing CAs, and one far larger is likely a
/// system bundle, which would make every public CA an issuer of identities
/// (a DNS SAN is an identity).
const MAX_CLIENT_CAS: usize = 16;

fn client_ca(path: &Path) -> Result<String, String> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    use x509_parser::prelude::{FromDer, X509Certificate};
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map(|iter| iter.filter_map(Result::ok).collect())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no CA certificate", path.display()));
    }
    if certs.len() > MAX_CLIENT_CAS {
        return Err(format!(
            "{} holds {} certificates (at most {MAX_CLIENT_CAS}): a bundle of public or \
             system CAs would let any of them issue keygate identities; give the \
             organization's own client CAs",
            path.display(),
            certs.len()
        ));
    }
    // A leaf in the bundle would be trusted as an issuer of identities.
    let not_ca = certs.iter().position(|der| {
        X509Certificate::from_der(der.as_ref()).map_or(true, |(_, cert)| !cert.is_ca())
    });
    if let Some(index) = not_ca {
        return Err(format!(
            "{}: certificate {} is not a CA certificate (no basicConstraints CA:TRUE, or \
             unreadable): a client CA bundle holds issuing CAs only",
            path.display(),
            index + 1
        ));
    }
    Ok(format!(
        "every connection must present a client certificate chaining to {} ({} CA \
         certificate(s)); its URI or DNS SAN is the identity",
        path.display(),
        certs.len()
    ))
}

/// No certificate in `files` (setting name, path) is a keygate
/// development CA's or issued by one (`keygate up`, `keygate admin pki`:
/// organization [`crate::pki::DEVELOPMENT_ORGANIZATION`]). Such a CA's key
/// sits in a file beside the certificates, so whoever reads it can mint
/// any identity. A file that cannot be read is left to the checks and the
/// TLS setup that need it.
fn development_pki(files: &[(&str, &Path)]) -> Result<String, String> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    use x509_parser::prelude::{FromDer, X509Certificate, X509Name};
    let development = |name: &X509Name<'_>| {
        name.iter_organization()
            .any(|o| o.as_str().is_ok_and(|o| o == crate::pki::DEVELOPMENT_ORGANIZATION))
    };
    let mut found = Vec::new();
    let mut read = Vec::new();
    for (setting, path) in files {
        let Ok(certs) = CertificateDer::pem_file_iter(path) else { continue };
        read.push(*setting);
        let from_development_ca = certs.filter_map(Result::ok).any(|der| {
            X509Certificate::from_der(der.as_ref())
                .is_ok_and(|(_, cert)| development(cert.subject()) || development(cert.issuer()))
        });
        if from_development_ca {
            found.push(format!("{setting} ({})", path.display()));
        }
    }
    if found.is_empty() {
        Ok(format!(
            "no certificate in {} is of a keygate development CA",
            if read.is_empty() { "the TLS files".to_owned() } else { read.join(" or ") }
        ))
    } else {
        Err(format!(
            "{} {} certificates of a keygate development CA (O={:?}, made by `keygate up` \
             or `keygate admin pki`), whose private key is a file anyone who reads it can mint \
             identities with: use the organization's PKI",
            found.join(" and "),
            if found.len() == 1 { "holds" } else { "hold" },
            crate::pki::DEVELOPMENT_ORGANIZATION
        ))
    }
}

fn audit_durable(config: &ServerConfig) -> Result<String, String> {
    if config.storage_url.is_some() {
        // What the server runs with is asked of it once connected
        // (`add_keystore_durability`): the URL is only one of the places
        // that can weaken a commit.
        return Ok("every key operation's event is committed to PostgreSQL before its result \
                   leaves (fail closed)"
            .to_owned());
    }
    let dir = &config.data_dir;
    // The data directory may not exist yet: check the nearest parent.
    let existing = dir.ancestors().find(|p| p.exists()).unwrap_or(dir);
    match ephemeral_filesystem(existing) {
        Some(kind) => Err(format!(
            "data_dir {} is on {kind}: the audit chain (and keystore) would not survive it; \
             put it on a persistent volume",
            dir.display()
        )),
        None => Ok(format!(
            "every key operation's event is committed (SQLite WAL, synchronous=FULL) in {} \
             before its result leaves (fail closed)",
            dir.display()
        )),
    }
}

/// What `path` is on, if it is a file system whose contents do not last.
fn ephemeral_filesystem(path: &Path) -> Option<&'static str> {
    let stat = rustix::fs::statfs(path).ok()?;
    ephemeral_kind(u64::try_from(stat.f_type).ok()?)
}

/// The file systems, by `statfs` magic number, whose contents are lost: in
/// memory, or a container's writable layer (overlayfs), which goes with
/// the container when it is replaced.
fn ephemeral_kind(magic: u64) -> Option<&'static str> {
    const TMPFS_MAGIC: u64 = 0x0102_1994;
    const RAMFS_MAGIC: u64 = 0x8584_58f6;
    const OVERLAYFS_MAGIC: u64 = 0x794c_7630;
    match magic {
        TMPFS_MAGIC => Some("tmpfs (memory): lost at a reboot"),
        RAMFS_MAGIC => Some("ramfs (memory): lost at a reboot"),
        OVERLAYFS_MAGIC => {
            Some("overlayfs (a container's writable layer): lost when the container is replaced")
        }
        _ => None,
    }
}

fn checkpoints(config: &ServerConfig) -> Result<String, String> {
    let (every, interval) = (config.audit.checkpoint_every, config.audit.checkpoint_interval_secs);
    if every <= MAX_CHECKPOINT_EVERY && interval <= MAX_CHECKPOINT_INTERVAL_SECS {
        Ok(format!(
            "hash-chained events with a P-256 signed checkpoint every {every} events or {interval} s"
        ))
    } else {
        Err(format!(
            "signed checkpoints every {every} events / {interval} s: at most \
             {MAX_CHECKPOINT_EVERY} events and {MAX_CHECKPOINT_INTERVAL_SECS} s, or edits to the \
             chain's tail go unsigned too long"
        ))
    }
}

/// The shortest wait between a shred's approval and the destruction in
/// production: time for a mistaken or coerced approval to be noticed and
/// withdrawn (`docs/lifecycle.md` advises 24 to 72 hours).
const MIN_SHRED_DELAY_SECS: u64 = 3_600;

fn shred_delay(secs: u64) -> Result<String, String> {
    if secs >= MIN_SHRED_DELAY_SECS {
        Ok(format!(
            "an approved shred waits {secs} s before any key is destroyed, and can be withdrawn \
             meanwhile"
        ))
    } else {
        Err(format!(
            "lifecycle.shred_delay_secs is {secs}: an approved shred must wait at least \
             {MIN_SHRED_DELAY_SECS} s (24 to 72 hours is usual), so that a mistaken or coerced \
             approval can be withdrawn before keys are destroyed"
        ))
    }
}

fn rotation(days: u64) -> Result<String, String> {
    if (1..=MAX_ROTATION_DAYS).contains(&days) {
        Ok(format!("tenant KEKs rotate at least every {days} days"))
    } else {
        Err(format!(
            "keys.max_rotation_period_days is {days}: a KEK must rotate at least every \
             {MAX_ROTATION_DAYS} days"
        ))
    }
}

/// No identity has data access to every tenant or holds every role, and
/// no grant reveals every field class. (Admin, auditor and security
/// officer grants may cover every tenant: the endpoints not scoped to one
/// tenant need that.) An identity holds what every grant matching it
/// gives, so roles and tenants are judged over those grants together.
fn least_privilege(policy: &Policy) -> Result<String, String> {
    let grants = policy.grants();
    let mut problems: Vec<String> = Vec::new();
    let mut note = |problem: String| {
        if !problems.contains(&problem) {
            problems.push(problem);
        }
    };
    for (i, grant) in grants.iter().enumerate() {
        if grant.classes.iter().any(|c| c.as_str() == "*") {
            note(format!("grant {} ({}) reveals every field class (\"*\")", i + 1, grant.identity));
        }
    }
    // Every identity matched by some set of grants is matched by all of
    // them at one of these: each grant's identity without its `*` (for
    // nested prefixes, the longest one).
    for candidate in grants.iter().map(|g| g.identity.as_str().trim_end_matches('*')) {
        let matching: Vec<(usize, &Grant)> =
            grants.iter().enumerate().filter(|(_, g)| g.identity.matches(candidate)).collect();
        let who = match matching.as_slice() {
            [(i, g)] => format!("grant {} ({})", i + 1, g.identity),
            _ => {
                let numbers: Vec<String> =
                    matching.iter().map(|(i, _)| (i + 1).to_string()).collect();
                format!("grants {} (together, for identity {candidate:?})", numbers.join(", "))
            }
        };
        let holds = |role: &Role| matching.iter().any(|(_, g)| g.roles.contains(role));
        if Role::ALL.iter().all(holds) {
            note(format!("{who} hold every role"));
        }
        let data_roles: Vec<&str> = [Role::Encryptor, Role::Decryptor]
            .iter()
            .filter(|r| holds(r))
            .map(|r| r.as_str())
            .collect();
        let data_tenants: Vec<&TenantPattern> = matching
            .iter()
            .filter(|(_, g)| g.roles.iter().any(|r| matches!(r, Role::Encryptor | Role::Decryptor)))
            .flat_map(|(_, g)| &g.tenants)
            .collect();
        if covers_every_tenant(&data_tenants) {
            note(format!(
                "{who} give {} on every tenant (\"*\", or a prefix for every first character)",
                data_roles.join("+")
            ));
        }
    }
    if problems.is_empty() {
        Ok(format!(
            "{} grants, no identity with data access to every tenant or every role, no grant \
             revealing every field class",
            grants.len()
        ))
    } else {
        Err(problems.join("; "))
    }
}

/// Whether tenant patterns cover every tenant, present and future: `*`,
/// or `c*` for every character a tenant id may start with.
fn covers_every_tenant(patterns: &[&TenantPattern]) -> bool {
    let first_chars = ('a'..='z').chain('0'..='9');
    patterns.iter().any(|p| p.is_all())
        || first_chars.into_iter().all(|c| {
            patterns
                .iter()
                .any(|p| p.as_str().strip_suffix('*') == Some(c.encode_utf8(&mut [0; 4])))
        })
}

fn private_files(files: &[(&str, &Path)]) -> Result<String, String> {
    let mut problems = Vec::new();
    for (what, path) in files {
        match std::fs::metadata(path) {
            Ok(meta) => {
                let mode = meta.permissions().mode() & 0o777;
                if mode & 0o077 != 0 {
                    problems.push(format!(
                        "{what} {} is mode {mode:03o}: group or others may read or change it \
                         (chmod 600)",
                        path.display()
                    ));
                }
            }
            Err(e) => problems.push(format!("{what} {}: {e}", path.display())),
        }
    }
    if problems.is_empty() {
        let names: Vec<&str> = files.iter().map(|(w, _)| *w).collect();
        Ok(format!("{} readable by the owner only", names.join(", ")))
    } else {
        Err(problems.join("; "))
    }
}

fn core_dumps(hygiene: &Hygiene) -> Result<String, String> {
    let locked = if hygiene.memory_locked { "memory locked" } else { "memory not locked" };
    if hygiene.core_dumps_disabled() {
        Ok(format!("RLIMIT_CORE 0 and not dumpable; {locked}"))
    } else {
        Err(format!("core dumps could not be disabled: {}", hygiene.notes.join("; ")))
    }
}

/// The checks of a policy about to be swapped in on reload: the rules
/// that judge a policy, so that a reload cannot bring in what the start
/// refuses.
pub(crate) fn policy_report(profile: Profile, policy: &Policy) -> Report {
    let mut r = Report::new(profile);
    r.add("policy.least_privilege", hipaa::ACCESS_CONTROL, least_privilege(policy));
    r
}

/// The checks of TLS files about to be loaded (at start and on reload):
/// the rules of [`server_report_with`] that judge these files.
pub(crate) fn tls_report(profile: Profile, tls: &crate::config::TlsConfig) -> Report {
    let mut r = Report::new(profile);
    r.add("authentication.client_certificates", hipaa::AUTHENTICATION, client_ca(&tls.client_ca));
    r.add(
        DEVELOPMENT_PKI_RULE,
        hipaa::AUTHENTICATION,
        development_pki(&[("tls.cert", &tls.cert), ("tls.client_ca", &tls.client_ca)]),
    );
    r.add("files.private_keys", hipaa::ACCESS_CONTROL, private_files(&[("tls.key", &tls.key)]));
    r
}

/// The checks of the sidecar's key service TLS files about to be loaded
/// (at start and on reload): the rules of [`sidecar_report`] that judge
/// these files.
pub(crate) fn sidecar_tls_report(profile: Profile, key_service: &KeyServiceConfig) -> Report {
    let mut r = Report::new(profile);
    add_sidecar_tls(&mut r, key_service, None);
    r
}

/// What the production profile refuses of the checks `report` makes:
/// the rules a reload (and the TLS files' load at start) is held to.
/// Under the development profile `report` is not even built: its rules
/// never refuse there, and the start-up report has already said once
/// what fails, so judging every reload again would only repeat it in the
/// log. Nothing is logged here either way: the caller says what it kept
/// ([`refusal`]).
pub(crate) fn refused_in_production(
    profile: Profile,
    report: impl FnOnce() -> Report,
) -> Result<(), ComplianceError> {
    if profile != Profile::Production {
        return Ok(());
    }
    let failed: Vec<Check> = report().failures().cloned().collect();
    if failed.is_empty() { Ok(()) } else { Err(ComplianceError { failed }) }
}

/// The failed rules of a refusal, for a reload's error (the error's own
/// text speaks of a start): `[rule] (HIPAA 45 CFR provision): detail`.
pub(crate) fn refusal(error: &ComplianceError) -> String {
    let rules: Vec<String> = error
        .failed()
        .iter()
        .map(|c| format!("[{}] (HIPAA 45 CFR {}): {}", c.rule, c.hipaa, c.detail))
        .collect();
    rules.join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(text: &str) -> Policy {
        Policy::from_toml(text, "p.toml").unwrap()
    }

    #[test]
    fn least_privilege_flags_wildcards() {
        let ok = policy(
            "[[grant]]\nidentity = \"a\"\ntenants = [\"*\"]\nroles = [\"admin\", \"auditor\"]\n\
             [[grant]]\nidentity = \"b\"\ntenants = [\"onc\"]\nroles = [\"decryptor\"]\nclasses = [\"phi.*\"]\npurposes = [\"*\"]\n",
        );
        assert!(least_privilege(&ok).is_ok());
        let all_tenants =
            policy("[[grant]]\nidentity = \"b\"\ntenants = [\"*\"]\nroles = [\"encryptor\"]\n");
        assert!(least_privilege(&all_tenants).unwrap_err().contains("encryptor on every tenant"));
        let all_classes = policy(
            "[[grant]]\nidentity = \"b\"\ntenants = [\"onc\"]\nroles = [\"decryptor\"]\nclasses = [\"*\"]\npurposes = [\"*\"]\n",
        );
        assert!(least_privilege(&all_classes).unwrap_err().contains("every field class"));
        let all_roles = policy(
            "[[grant]]\nidentity = \"b\"\ntenants = [\"onc\"]\nroles = [\"encryptor\", \"decryptor\", \"admin\", \"security_officer\", \"auditor\"]\nclasses = [\"phi\"]\npurposes = [\"x\"]\n",
        );
        assert!(least_privilege(&all_roles).unwrap_err().contains("every role"));
    }

    #[test]
    fn least_privilege_judges_an_identity_by_all_its_grants() {
        // Bob holds the management roles on his own and the data roles
        // through a prefix grant: every role, together.
        let split = policy(
            "[[grant]]\nidentity = \"spiffe://p/ops/bob\"\ntenants = [\"*\"]\nroles = [\"admin\", \"auditor\", \"security_officer\"]\n\
             [[grant]]\nidentity = \"spiffe://p/ops/*\"\ntenants = [\"onc\"]\nroles = [\"encryptor\", \"decryptor\"]\nclasses = [\"phi\"]\npurposes = [\"x\"]\n",
        );
        let e = least_privilege(&split).unwrap_err();
        assert!(e.contains("grants 1, 2") && e.contains("every role"), "{e}");
        // Others under the prefix hold only the data roles: not flagged.
        let apart = policy(
            "[[grant]]\nidentity = \"spiffe://p/ops/bob\"\ntenants = [\"*\"]\nroles = [\"admin\", \"auditor\", \"security_officer\"]\n\
             [[grant]]\nidentity = \"spiffe://p/app/*\"\ntenants = [\"onc\"]\nroles = [\"encryptor\", \"decryptor\"]\nclasses = [\"phi\"]\npurposes = [\"x\"]\n",
        );
        assert!(least_privilege(&apart).is_ok(), "{:?}", least_privilege(&apart));
        // Every first character spelled out is every tenant.
        let prefixes: Vec<String> =
            ('a'..='z').chain('0'..='9').map(|c| format!("\"{c}*\"")).collect();
        let spelled = policy(&format!(
            "[[grant]]\nidentity = \"spiffe://p/app\"\ntenants = [{}]\nroles = [\"encryptor\"]\n",
            prefixes.join(", ")
        ));
        let e = least_privilege(&spelled).unwrap_err();
        assert!(e.contains("encryptor on every tenant"), "{e}");
        // ... and so across two grants of one identity; but not one short.
        let halves = policy(&format!(
            "[[grant]]\nidentity = \"spiffe://p/app\"\ntenants = [{}]\nroles = [\"encryptor\"]\n\
             [[grant]]\nidentity = \"spiffe://p/app\"\ntenants = [{}]\nroles = [\"decryptor\"]\nclasses = [\"phi\"]\npurposes = [\"x\"]\n",
            prefixes[..18].join(", "),
            prefixes[18..].join(", ")
        ));
        assert!(
            least_privilege(&halves).unwrap_err().contains("encryptor+decryptor on every tenant")
        );
        let short = policy(&format!(
            "[[grant]]\nidentity = \"spiffe://p/app\"\ntenants = [{}]\nroles = [\"encryptor\"]\n",
            prefixes[1..].join(", ")
        ));
        assert!(least_privilege(&short).is_ok());
    }

    #[test]
    fn an_aws_kms_master_over_plain_http_is_not_hardware() {
        let kms = |endpoint_url: Option<&str>| RootConfig::AwsKms {
            region: "us-east-1".into(),
            key_id: "alias/keygate".into(),
            endpoint_url: endpoint_url.map(str::to_owned),
            timeout_ms: 1_000,
        };
        assert!(root_key(&kms(None)).is_ok());
        assert!(root_key(&kms(Some("https://vpce-1.kms.us-east-1.vpce.amazonaws.com"))).is_ok());
        let e = root_key(&kms(Some("http://127.0.0.1:4566"))).unwrap_err();
        assert!(e.contains("plain HTTP") && e.contains("emulator"), "{e}");
        assert!(refused_root(Profile::Production, &kms(Some("HTTP://localhost:4566"))).is_some());
        assert!(refused_root(Profile::Development, &kms(Some("http://localhost:4566"))).is_none());
    }

    #[test]
    fn tenant_rotation_schedules() {
        let t = |id: &str, every: Option<i64>| (id.to_owned(), every);
        assert!(tenant_rotation(365, &[]).is_ok());
        assert!(tenant_rotation(90, &[t("a", Some(90 * 86_400)), t("b", Some(60))]).is_ok());
        let err = tenant_rotation(90, &[t("a", Some(91 * 86_400)), t("b", None), t("c", Some(1))])
            .unwrap_err();
        assert!(err.starts_with("2 of 3 tenants") && err.contains("a, b"), "{err}");
        let many: Vec<_> = (0..12).map(|i| t(&format!("t{i}"), None)).collect();
        assert!(tenant_rotation(90, &many).unwrap_err().contains("t9 and 2 more"));
    }

    #[test]
    fn rotation_bounds() {
        assert!(rotation(90).is_ok());
        assert!(rotation(365).is_ok());
        assert!(rotation(366).is_err());
        assert!(rotation(0).is_err());
    }

    #[test]
    fn file_modes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        std::fs::write(&path, "x").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(private_files(&[("k", &path)]).is_ok());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(private_files(&[("k", &path)]).unwrap_err().contains("mode 640"));
        assert!(private_files(&[("k", &dir.path().join("absent"))]).is_err());
    }

    #[test]
    fn memory_and_container_layers_are_not_durable() {
        assert!(ephemeral_kind(0x0102_1994).is_some_and(|k| k.starts_with("tmpfs")));
        assert!(ephemeral_kind(0x8584_58f6).is_some_and(|k| k.starts_with("ramfs")));
        assert!(ephemeral_kind(0x794c_7630).is_some_and(|k| k.contains("container")));
        for lasting in [0xef53, 0x5846_5342, 0x9123_683e] {
            assert_eq!(ephemeral_kind(lasting), None, "ext4, xfs, btrfs: {lasting:x}");
        }
    }

    #[test]
    fn a_client_ca_bundle_holds_a_few_issuing_cas_only() {
        use crate::pki::{DevCa, Validity};
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, pem: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, pem).unwrap();
            path
        };
        let cas: Vec<_> = (0..=MAX_CLIENT_CAS)
            .map(|i| DevCa::generate_for(&format!("Issuing CA {i}"), "Example Health").unwrap())
            .collect();
        let pems: Vec<&str> = cas.iter().map(DevCa::cert_pem).collect();
        let few = write("few.crt", &pems[..2].concat());
        assert!(client_ca(&few).unwrap().contains("(2 CA certificate(s))"));
        let most = write("most.crt", &pems[..MAX_CLIENT_CAS].concat());
        assert!(client_ca(&most).is_ok());
        let system = write("system.crt", &pems.concat());
        let e = client_ca(&system).unwrap_err();
        assert!(e.contains(&format!("holds {} certificates", MAX_CLIENT_CAS + 1)), "{e}");
        let leaf = cas[0].issue_client("spiffe://test/app", Validity::days(1)).unwrap();
        let with_leaf = write("with-leaf.crt", &format!("{}{}", pems[0], leaf.cert_pem));
        let e = client_ca(&with_leaf).unwrap_err();
        assert!(e.contains("certificate 2 is not a CA certificate"), "{e}");
        assert!(client_ca(&write("empty.crt", "")).unwrap_err().contains("no CA certificate"));
    }

    #[test]
    fn certificates_of_a_development_ca_fail() {
        use crate::pki::{DevCa, Validity};
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, pem: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, pem).unwrap();
            path
        };
        let own = DevCa::generate_for("Example Health Issuing CA", "Example Health").unwrap();
        let dev = DevCa::generate("keygate up development CA").unwrap();
        let own_ca = write("own-ca.crt", own.cert_pem());
        let own_leaf = own.issue_server(&["localhost"], Validity::days(1)).unwrap();
        let own_leaf = write("own.crt", &own_leaf.cert_pem);
        let dev_ca = write("dev-ca.crt", dev.cert_pem());
        let dev_leaf = dev.issue_server(&["localhost"], Validity::days(1)).unwrap();
        let dev_leaf = write("dev.crt", &dev_leaf.cert_pem);
        let bundle = write("bundle.crt", &format!("{}{}", own.cert_pem(), dev.cert_pem()));

        let ok = development_pki(&[("tls.cert", &own_leaf), ("tls.client_ca", &own_ca)]);
        assert!(ok.unwrap().contains("tls.cert or tls.client_ca"));
        // A leaf the development CA issued, the CA itself, or one of a bundle.
        for (setting, path) in [("tls.cert", &dev_leaf), ("tls.client_ca", &dev_ca)] {
            let e = development_pki(&[("tls.cert", &own_leaf), (setting, path)]).unwrap_err();
            assert!(e.starts_with(&format!("{setting} (")) && e.contains("development CA"), "{e}");
        }
        assert!(development_pki(&[("tls.client_ca", &bundle)]).is_err());
        // Files that cannot be read are not this rule's to judge.
        assert!(development_pki(&[("tls.cert", &dir.path().join("absent"))]).is_ok());
    }

    #[test]
    fn what_the_keystore_says_fails_or_adds_to_a_check() {
        let detail = |r: &Report| r.checks.iter().map(|c| c.detail.clone()).collect::<Vec<_>>();
        let mut report = Report::new(Profile::Production);
        report.add(AUDIT_DURABLE_RULE, hipaa::AUDIT_CONTROLS, Ok("committed".into()));
        add_keystore_durability(&mut report, &Durability::Durable("fsync=on".into()));
        assert_eq!(detail(&report), ["committed (fsync=on)"]);
        assert_eq!(report.failures().count(), 0);
        add_keystore_durability(&mut report, &Durability::Weakened("fsync=off".into()));
        add_keystore_durability(&mut report, &Durability::Weakened("unlogged".into()));
        let failed: Vec<&Check> = report.failures().collect();
        assert_eq!(failed.len(), 1, "{report:?}");
        assert!(failed[0].detail.starts_with("fsync=off: "), "{report:?}");
        assert!(failed[0].detail.contains("; unlogged: "), "both reasons: {report:?}");
        let mut empty = Report::new(Profile::Production);
        add_keystore_durability(&mut empty, &Durability::Weakened("fsync=off".into()));
        assert_eq!(
            empty.failures().map(|c| c.rule.as_str()).collect::<Vec<_>>(),
            [AUDIT_DURABLE_RULE]
        );
    }

    #[test]
    fn error_names_rule_and_provision() {
        let mut report = Report::new(Profile::Production);
        report.add("root_key.hardware_backed", hipaa::ACCESS_CONTROL, Err("dev key".into()));
        report.add("audit.durable", hipaa::AUDIT_CONTROLS, Ok("fine".into()));
        let e = report.enforce().unwrap_err().to_string();
        assert!(e.contains("[root_key.hardware_backed]"), "{e}");
        assert!(e.contains("164.312(a)(1) (access control)"), "{e}");
        assert!(!e.contains("audit.durable"), "{e}");
        report.profile = Profile::Development;
        assert!(report.enforce().is_ok());
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["profile"], "development");
        assert_eq!(json["checks"][0]["status"], "fail");
        assert_eq!(json["checks"][1]["hipaa"], "164.312(b)");
    }
}
