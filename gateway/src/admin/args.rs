//! The `keygate admin` command line (clap).

use std::path::PathBuf;

use clap::{Args, Subcommand, ValueEnum};
use kms_core::TenantId;

use super::output::OutputFormat;

/// Exit codes, shown under `keygate admin --help`.
pub const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  refused or check failed: the key service said no (4xx: unknown tenant,
     forbidden, conflict, self-approval, …), the audit chain is broken, a
     compliance check fails
  2  bad usage or bad input: arguments, profile, certificate/key files,
     policy or root-provider file, malformed JSON lines
  3  unavailable: the key service or sidecar cannot be reached, the TLS
     handshake fails (untrusted or wrong certificate), a timeout, a 5xx answer

Connection settings come from a profile (--profile FILE, else
$KEYGATE_ADMIN_PROFILE, else ~/.config/keygate/admin.toml) holding
url, ca, cert and key; each is overridden by its flag or KEYGATE_ADMIN_URL,
KEYGATE_ADMIN_CA, KEYGATE_ADMIN_CERT, KEYGATE_ADMIN_KEY.

Every error is one line on stderr: `error: …`.";

/// `keygate admin …`: the security team's operations on the key service
/// (over mutual TLS with an admin certificate) and local helpers.
#[derive(Debug, Args)]
#[command(after_long_help = EXIT_CODES)]
pub struct AdminArgs {
    /// Output format: an aligned table for people, JSON for scripts.
    #[arg(
        long,
        short,
        global = true,
        value_enum,
        default_value = "table",
        env = "KEYGATE_ADMIN_OUTPUT"
    )]
    pub output: OutputFormat,
    /// How to reach the key service.
    #[command(flatten)]
    pub connection: ConnectionArgs,
    /// What to do.
    #[command(subcommand)]
    pub command: AdminCommand,
}

/// Connection settings; each overrides the profile's key of the same name.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Connection (overrides the profile)")]
pub struct ConnectionArgs {
    /// Profile file (TOML: url, ca, cert, key) [default: ~/.config/keygate/admin.toml].
    #[arg(long, global = true, env = "KEYGATE_ADMIN_PROFILE", value_name = "FILE")]
    pub profile: Option<PathBuf>,
    /// Key service URL (https://host:port).
    #[arg(long, global = true, env = "KEYGATE_ADMIN_URL")]
    pub url: Option<String>,
    /// CA bundle (PEM) that signs the key service's certificate.
    #[arg(long, global = true, env = "KEYGATE_ADMIN_CA", value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// Admin client certificate (PEM).
    #[arg(long, global = true, env = "KEYGATE_ADMIN_CERT", value_name = "FILE")]
    pub cert: Option<PathBuf>,
    /// Private key of the admin certificate (PEM, mode 0600).
    #[arg(long, global = true, env = "KEYGATE_ADMIN_KEY", value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// Seconds to wait for each call.
    #[arg(
        long,
        global = true,
        env = "KEYGATE_ADMIN_TIMEOUT",
        default_value_t = 30,
        value_name = "SECS"
    )]
    pub timeout: u64,
}

/// `keygate admin` subcommands.
#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Create, list and show tenants.
    ///
    /// Example: keygate admin tenant list
    #[command(subcommand)]
    Tenant(TenantCommand),
    /// Tenant key versions: rotate, list, change state, usage, auto-rotation.
    ///
    /// Example: keygate admin key usage --tenant onc
    #[command(subcommand)]
    Key(KeyCommand),
    /// The master key: show, rotate, create one in an HSM.
    ///
    /// Example: keygate admin master show
    #[command(subcommand)]
    Master(MasterCommand),
    /// Crypto-shredding (dual control: a second security officer approves).
    ///
    /// Example: keygate admin shred request --tenant onc --reason "contract ended"
    #[command(subcommand)]
    Shred(ShredCommand),
    /// Pending and past requests that need a second person.
    ///
    /// Example: keygate admin approvals list --state pending
    #[command(subcommand)]
    Approvals(ApprovalsCommand),
    /// Approve a pending request (as a security officer other than the
    /// requester). Name the tenant and scope you mean to approve: a request
    /// for anything else is refused and nothing is decided.
    ///
    /// Example: keygate admin approve 9f2c4e1a0b7d3c55 --tenant onc --all-versions
    Approve(ApproveArgs),
    /// Reject a pending request, or withdraw an approved shred that waits
    /// for its time (any security officer); the requester may withdraw
    /// their own pending request.
    ///
    /// Example: keygate admin reject 9f2c4e1a0b7d3c55 --comment "wrong tenant"
    Reject(DecisionArgs),
    /// Move encrypted records (JSON lines on stdin) to the tenant's active key
    /// version through a sidecar; rewrapped records go to stdout.
    ///
    /// Each record comes out byte for byte as it went in, but for its key
    /// part (`_kg`); blank lines are dropped, so output line k is the k-th
    /// record. Input is streamed in batches (bounded memory); progress goes
    /// to stderr. A malformed line N stops with `error: line N: …` (exit 2)
    /// after writing every record before it.
    ///
    /// Example: keygate admin rewrap --tenant onc --sidecar unix:///run/keygate/sidecar.sock < old.jsonl > new.jsonl
    Rewrap(RewrapArgs),
    /// Verify or export the audit log.
    ///
    /// Example: keygate admin audit verify
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Check a policy file (local, no key service).
    ///
    /// Example: keygate admin policy check policy.toml
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// A development PKI: a CA and certificates (local, no key service).
    ///
    /// Example: keygate admin pki init --dir ./pki
    #[command(subcommand)]
    Pki(PkiCommand),
    /// HIPAA technical-safeguard checks of the running key service.
    ///
    /// Example: keygate admin compliance report --output json
    #[command(subcommand)]
    Compliance(ComplianceCommand),
}

/// `keygate admin tenant …`.
#[derive(Debug, Subcommand)]
pub enum TenantCommand {
    /// Create a tenant (KEK version 1 and index root, under the active master key).
    ///
    /// Example: keygate admin tenant create onc
    Create {
        /// Tenant id (`[a-z0-9][a-z0-9_-]{0,62}`).
        #[arg(value_parser = parse_tenant)]
        tenant: TenantId,
    },
    /// List the tenants this identity may see.
    ///
    /// Example: keygate admin tenant list --output json
    List,
    /// Show a tenant and its key versions.
    ///
    /// Example: keygate admin tenant show onc
    Show {
        /// Tenant id.
        #[arg(value_parser = parse_tenant)]
        tenant: TenantId,
    },
}

/// `keygate admin key …`.
#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Create a new active KEK version; older versions become decrypt-only.
    ///
    /// Example: keygate admin key rotate --tenant onc
    Rotate(TenantArg),
    /// List a tenant's KEK versions and their states.
    ///
    /// Example: keygate admin key list --tenant onc
    List(TenantArg),
    /// Enable, disable or make decrypt-only one KEK version.
    ///
    /// Example: keygate admin key state --tenant onc --version 1 disable
    State {
        /// Tenant id.
        #[arg(long, value_parser = parse_tenant)]
        tenant: TenantId,
        /// KEK version (from 1).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
        version: u32,
        /// The new state.
        #[arg(value_enum)]
        state: KeyState,
    },
    /// Per-version usage (records issued, unwraps in the last 24 h, last
    /// unwrap), to see when an old version can be disabled.
    ///
    /// Example: keygate admin key usage --tenant onc
    Usage(TenantArg),
    /// Rotate a tenant's key automatically (--every 90d), or stop (--off).
    ///
    /// Example: keygate admin key auto-rotate --tenant onc --every 90d
    AutoRotate {
        /// Tenant id.
        #[arg(long, value_parser = parse_tenant)]
        tenant: TenantId,
        /// Interval: a number and a unit (s, m, h, d, w), e.g. 90d, 12h, 1d12h.
        #[arg(long, value_parser = super::timefmt::parse_duration, value_name = "DURATION",
              conflicts_with = "off", required_unless_present = "off")]
        every: Option<u64>,
        /// Turn automatic rotation off.
        #[arg(long)]
        off: bool,
    },
}

/// `--tenant T`.
#[derive(Debug, Args)]
pub struct TenantArg {
    /// Tenant id.
    #[arg(long, value_parser = parse_tenant)]
    pub tenant: TenantId,
}

/// The state an admin may set on a KEK version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KeyState {
    /// Usable again (as decrypt-only, or active if it is the newest).
    Enable,
    /// Refuse every unwrap under this version (reversible).
    Disable,
    /// Unwrap only; no new data keys.
    #[value(alias = "decrypt_only")]
    DecryptOnly,
}

/// `keygate admin master …`.
#[derive(Debug, Subcommand)]
pub enum MasterCommand {
    /// Show the active master key and every master version with the number
    /// of keys it still wraps.
    ///
    /// Example: keygate admin master show
    Show,
    /// Make a new master key active and rewrap every tenant key, index root
    /// and audit signing key under it (resumable: run again after a crash).
    ///
    /// FILE holds the new root provider as a TOML table exactly like the key
    /// service config's `[root]` section (either at the top level or under
    /// `[root]`); file paths in it must be absolute (the key service reads
    /// them). With many keys, raise --timeout; an interrupted call is safe
    /// to repeat.
    ///
    /// Example: keygate admin master rotate --to new-master.toml
    Rotate {
        /// TOML file with the new root provider.
        #[arg(long, value_name = "FILE")]
        to: PathBuf,
    },
    /// Connect the key service that answers to master key ID now, rather
    /// than when the wait after its last failed attempt ends (up to 15
    /// minutes): for after the master's settings were put right (a PIN file
    /// rewritten, an HSM back). Only the instance that answers stops
    /// waiting; with several replicas, run it against each (--url). After
    /// an attempt that fails, the next one waits (30 s, doubling up to 15
    /// minutes while they keep failing; 1 s up to a minute while the HSM or
    /// KMS is only unavailable): repeating it costs at most 8 failed logins
    /// in the first hour and 4 an hour after.
    ///
    /// Example: keygate admin master connect 2
    Connect {
        /// The master key's id, as `keygate admin master show` lists it.
        id: i64,
    },
    /// Create the master key in the HSM named by a key service config's
    /// `[root]` (provider = "pkcs11"): AES-256, sensitive, non-extractable.
    /// Local: talks to the HSM, not to the key service.
    ///
    /// Example: keygate admin master create-pkcs11-key --config server.toml
    CreatePkcs11Key {
        /// A key service configuration file with a pkcs11 `[root]`.
        #[arg(long, short)]
        config: PathBuf,
    },
}

/// `keygate admin shred …`.
#[derive(Debug, Subcommand)]
pub enum ShredCommand {
    /// Ask to destroy a tenant's keys (all versions, or one with --version).
    /// Nothing happens until a second security officer approves.
    ///
    /// Example: keygate admin shred request --tenant onc --reason "contract ended, ticket SEC-42"
    Request {
        /// Tenant id.
        #[arg(long, value_parser = parse_tenant)]
        tenant: TenantId,
        /// Only this KEK version (default: every version).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
        version: Option<u32>,
        /// Why (recorded in the audit log and shown to the approver).
        #[arg(long, value_parser = parse_reason)]
        reason: String,
    },
}

/// `keygate admin approvals …`.
#[derive(Debug, Subcommand)]
pub enum ApprovalsCommand {
    /// List requests, optionally only those in one state.
    ///
    /// Example: keygate admin approvals list --state pending
    List {
        /// Only requests in this state.
        #[arg(long, value_enum)]
        state: Option<ApprovalState>,
    },
}

/// The states of a dual-control request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ApprovalState {
    /// Waiting for a second security officer.
    Pending,
    /// Approved (and perhaps waiting for its execution time).
    Approved,
    /// Rejected.
    Rejected,
    /// Carried out.
    Executed,
}

/// `approve ID --tenant T (--version V | --all-versions)`.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("scope").required(true).args(["version", "all_versions"])))]
pub struct ApproveArgs {
    /// The request id and comment.
    #[command(flatten)]
    pub decision: DecisionArgs,
    /// The tenant the request must be for.
    #[arg(long, value_parser = parse_tenant)]
    pub tenant: TenantId,
    /// The KEK version the request must be for.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub version: Option<u32>,
    /// The request must be for every version of the tenant.
    #[arg(long)]
    pub all_versions: bool,
}

/// `approve ID` / `reject ID`.
#[derive(Debug, Args)]
pub struct DecisionArgs {
    /// The request id (hex, from `approvals list` or `shred request`).
    #[arg(value_parser = parse_approval_id)]
    pub id: String,
    /// A comment recorded with the decision.
    #[arg(long)]
    pub comment: Option<String>,
}

/// `keygate admin rewrap`.
#[derive(Debug, Args)]
pub struct RewrapArgs {
    /// Every record must belong to this tenant (checked per line).
    #[arg(long, value_parser = parse_tenant)]
    pub tenant: TenantId,
    /// The sidecar: unix:///path/to.sock or http://127.0.0.1:PORT (loopback only).
    #[arg(long, env = "KEYGATE_ADMIN_SIDECAR", default_value = "unix:///run/keygate/sidecar.sock")]
    pub sidecar: String,
    /// A file holding the sidecar's bearer token, if it requires one.
    #[arg(long, env = "KEYGATE_ADMIN_SIDECAR_TOKEN_FILE", value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// Records per sidecar call (1–1000).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub batch: u32,
    /// Seconds between progress lines on stderr (0: none; a summary line
    /// is always printed at the end).
    #[arg(long, default_value_t = 1, value_name = "SECS")]
    pub progress_every: u64,
}

/// `keygate admin audit …`.
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Verify every instance's hash chain and signed checkpoints; exit 1 and
    /// name the first broken position if anything was edited, deleted or
    /// reordered.
    ///
    /// Events after an instance's last checkpoint are protected by the hash
    /// chain alone: someone who can write the keystore can cut them, or
    /// rewrite them, undetected. With --anchors, each chain must also still
    /// pass through the anchors that `keygate admin audit anchor` took
    /// earlier, which catches that.
    ///
    /// Example: keygate admin audit verify --anchors /mnt/worm/keygate-anchors.jsonl
    Verify {
        /// JSON lines from `keygate admin audit anchor` (blank lines and
        /// other fields are ignored, repeats are checked once; at most 256
        /// MiB). Every 50,000 anchors take one more pass over the chains.
        #[arg(long, value_name = "FILE")]
        anchors: Option<PathBuf>,
    },
    /// Verify the audit log, then print an anchor for each instance's
    /// chain: one JSON line `{instance, seq, hash, taken_at}` naming its
    /// last event. Keep them where the keystore's writers cannot change
    /// them (a WORM bucket, a SIEM, a ticket), e.g. hourly from cron, and
    /// give them to `audit verify --anchors`. Exit 1, printing nothing, if
    /// the log does not verify.
    ///
    /// Example: keygate admin audit anchor >> /mnt/worm/keygate-anchors.jsonl
    Anchor,
    /// Export audit events as JSON lines on stdout.
    ///
    /// For a periodic job (a SIEM feed) use --cursor rather than --since:
    /// an event is timestamped when it happens but stored later (group
    /// commit, sidecar reports, other instances' clocks), so `--since
    /// <last run>` misses events stored after the last run with an older
    /// time. With --cursor each chain resumes exactly after what the last
    /// run read; a run that fails leaves the cursor as it was, so the next
    /// one repeats lines (at least once) but never skips one, and a chain
    /// rewritten since (a restored keystore, a failover) is refused.
    ///
    /// Example: keygate admin audit export --since 24h --tenant onc > onc-audit.jsonl
    ///
    /// Example: keygate admin audit export --cursor /var/lib/siem/keygate.cursor >> audit.jsonl
    Export {
        /// Events from this time on: RFC 3339 (2026-01-31T00:00:00Z) or a
        /// duration back from now (24h, 7d).
        #[arg(long, value_parser = super::timefmt::parse_since, value_name = "TIME")]
        since: Option<i64>,
        /// Only this tenant's events.
        #[arg(long, value_parser = parse_tenant)]
        tenant: Option<TenantId>,
        /// Only this key-service instance's chain (with --cursor, only its
        /// entry moves).
        #[arg(long)]
        instance: Option<String>,
        /// Events per request to the key service (1 to 100000); the
        /// export goes on page after page to the end either way.
        #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..=100_000))]
        page_size: u64,
        /// Export only what is new since the run that last wrote FILE, and
        /// record how far each chain has now been read (JSON,
        /// `{"chains": {"<instance>": {"seq": N, "hash": "<hex>"}}}`, mode
        /// 0600, replaced atomically once every line is out; FILE.lock is
        /// kept next to it). A missing FILE means from the start; --since
        /// and --tenant still choose the lines printed, but the cursor
        /// moves past the events they leave out too. Deduplicate on
        /// (instance, seq, hash). Exit 2 if FILE is not a cursor or cannot
        /// be written; exit 1, exporting nothing, if another run holds it
        /// or a chain no longer holds the event FILE says was read last (a
        /// restored keystore, a failover, another deployment). FILE is left
        /// as it is on every failure.
        #[arg(long, value_name = "FILE")]
        cursor: Option<PathBuf>,
    },
}

/// `keygate admin policy …`.
#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Parse and validate a policy file; print a summary, or the error with
    /// its line number (exit 2).
    ///
    /// Example: keygate admin policy check /etc/keygate/policy.toml
    Check {
        /// The policy file (TOML).
        file: PathBuf,
    },
}

/// `keygate admin pki …`.
#[derive(Debug, Subcommand)]
pub enum PkiCommand {
    /// Create a development CA (ca.crt, ca.key) and a server certificate
    /// (server.crt, server.key) in DIR. Development only.
    ///
    /// Example: keygate admin pki init --dir ./pki --server-name localhost --server-name 127.0.0.1
    Init {
        /// Directory to create (mode 0700); existing CA files are not overwritten.
        #[arg(long)]
        dir: PathBuf,
        /// DNS name or IP address for the server certificate (repeatable).
        #[arg(long = "server-name", default_values = ["localhost", "127.0.0.1"])]
        server_names: Vec<String>,
        /// Days the server certificate is valid.
        #[arg(long, default_value_t = 365, value_parser = clap::value_parser!(u64).range(1..=3650))]
        days: u64,
    },
    /// Issue a client certificate for an identity (a URI such as
    /// spiffe://prod/ns/onc/sa/api) from the CA in DIR: NAME.crt and NAME.key.
    ///
    /// Example: keygate admin pki issue --dir ./pki --identity spiffe://prod/sec/alice --out alice
    Issue {
        /// Directory holding ca.crt and ca.key (from `pki init`).
        #[arg(long)]
        dir: PathBuf,
        /// The identity, written as the certificate's URI SAN.
        #[arg(long)]
        identity: String,
        /// File name stem (default: the identity's last path segment).
        #[arg(long, value_name = "NAME")]
        out: Option<String>,
        /// Days the certificate is valid.
        #[arg(long, default_value_t = 90, value_parser = clap::value_parser!(u64).range(1..=3650))]
        days: u64,
    },
}

/// `keygate admin compliance …`.
#[derive(Debug, Subcommand)]
pub enum ComplianceCommand {
    /// Run the key service's compliance checks (HIPAA §164.312 mapping);
    /// exit 1 if any fails.
    ///
    /// Example: keygate admin compliance report
    Report,
}

fn parse_tenant(text: &str) -> Result<TenantId, String> {
    TenantId::new(text).map_err(|e| e.to_string())
}

fn parse_reason(text: &str) -> Result<String, String> {
    let reason = text.trim();
    if reason.is_empty() {
        return Err("give a reason".to_owned());
    }
    if reason.chars().count() > 1_000 {
        return Err("at most 1000 characters".to_owned());
    }
    Ok(reason.to_owned())
}

fn parse_approval_id(text: &str) -> Result<String, String> {
    let id = text.trim().to_ascii_lowercase();
    if id.is_empty() || id.len() > 128 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("{text:?} is not a request id (hexadecimal)"));
    }
    Ok(id)
}
