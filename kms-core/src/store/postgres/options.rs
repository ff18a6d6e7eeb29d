//! Configuration of the PostgreSQL keystore, and the connection options
//! derived from it and the URL.

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgSslMode};

use crate::store::StoreError;

/// The notification channel of cache invalidations (one per schema).
const CHANNEL: &str = "keygate_tenant_changed";

/// Longest schema name: the channel name (`CHANNEL:schema`) must stay
/// within PostgreSQL's 63-byte identifiers.
const MAX_SCHEMA_LEN: usize = 63 - CHANNEL.len() - 1;

/// Tunables of [`PostgresStore`](super::PostgresStore). Start from
/// [`PgStoreOptions::default`] and change what you need.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PgStoreOptions {
    /// Most pooled connections (default 10). Job locks and the
    /// invalidation listener each use one more, outside the pool.
    pub max_connections: u32,
    /// How long an operation waits for a pooled connection, including
    /// connecting (default 10 s); then it fails with
    /// [`StoreError::Unavailable`].
    pub acquire_timeout: Duration,
    /// Longest any statement may run or wait for a lock (PostgreSQL's
    /// `statement_timeout`, default 30 s); then it fails with
    /// [`StoreError::Unavailable`] and its transaction is rolled back.
    /// Also the longest a session may sit idle inside a transaction
    /// (`idle_in_transaction_session_timeout`), so that one whose client
    /// vanished does not keep its row locks. And, plus `acquire_timeout`,
    /// how long an operation that has its connection waits for the server
    /// to answer (client side, for a server gone silent); then it fails
    /// with [`StoreError::OutcomeUnknown`] (the server may still have
    /// done it) and the connection is closed.
    pub statement_timeout: Duration,
    /// Longest [`PostgresStore::connect`](super::PostgresStore::connect)
    /// waits for the migration lock and runs migrations (default 5 min).
    pub migrate_timeout: Duration,
    /// How long the invalidation listener's connection may stay silent
    /// before it is probed with a query (default 30 s): a connection that
    /// vanished without a word is noticed within this plus
    /// `acquire_timeout`, and reported as [`Invalidation::All`](crate::store::Invalidation::All).
    pub listener_probe: Duration,
    /// Schema holding the keystore's tables (and sqlx's
    /// `_sqlx_migrations`), created at first start if missing; `None` uses
    /// the role's default `search_path` (normally `public`). Lowercase
    /// ASCII letters, digits and `_`, starting with a letter or `_`, at
    /// most 40 bytes. Replicas sharing a keystore must use the same one.
    pub schema: Option<String>,
    /// `application_name` of the connections, unless the URL sets one
    /// (default `keygate`); the listener's and job locks' get a suffix.
    pub application_name: String,
}

impl Default for PgStoreOptions {
    fn default() -> Self {
        Self {
            max_connections: 10,
            acquire_timeout: Duration::from_secs(10),
            statement_timeout: Duration::from_secs(30),
            migrate_timeout: Duration::from_secs(300),
            listener_probe: Duration::from_secs(30),
            schema: None,
            application_name: "keygate".into(),
        }
    }
}

impl PgStoreOptions {
    /// The same options with the keystore in `schema`.
    pub fn with_schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = Some(schema.into());
        self
    }
}

/// Where a keystore URL connects, read as
/// [`PostgresStore::connect`](super::PostgresStore::connect) reads it: the
/// URL with its `host`, `hostaddr` and `sslmode` parameters (the last of
/// each wins), then the `PG*` environment variables for what it leaves out.
/// For checks that must judge the connection that will be made rather than
/// the text, which can say `localhost` or `sslmode=verify-full` in a part
/// that is not the one used.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PgTarget {
    /// The host name or address, or the directory of a unix socket.
    pub host: String,
    /// A unix socket, `localhost` or a loopback address.
    pub local: bool,
    /// TLS with the server's certificate verified (`sslmode=verify-ca` or
    /// `verify-full`).
    pub verified_tls: bool,
}

impl PgTarget {
    /// Reads `url` (never echoing its password in an error).
    pub fn of(url: &str) -> Result<Self, StoreError> {
        let parsed = parse(url)?;
        let host = match parsed.get_socket() {
            Some(socket) => socket.display().to_string(),
            None => parsed.get_host().to_owned(),
        };
        let address = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(&host);
        let local = parsed.get_socket().is_some()
            || host.starts_with('/')
            || host.eq_ignore_ascii_case("localhost")
            || address.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
        let verified_tls =
            matches!(parsed.get_ssl_mode(), PgSslMode::VerifyCa | PgSslMode::VerifyFull);
        Ok(Self { host, local, verified_tls })
    }
}

/// Everything a store needs to open connections, validated.
#[derive(Clone)]
pub(super) struct Settings {
    /// For migrations: no statement timeout (bounded by `migrate_timeout`).
    pub(super) migrate: PgConnectOptions,
    /// For the pool.
    pub(super) pooled: PgConnectOptions,
    /// For the invalidation listener.
    pub(super) listener: PgConnectOptions,
    /// For job locks.
    pub(super) job_lock: PgConnectOptions,
    pub(super) channel: String,
    pub(super) options: PgStoreOptions,
}

impl Settings {
    pub(super) fn new(url: &str, options: PgStoreOptions) -> Result<Self, StoreError> {
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(StoreError::Config(
                "a PostgreSQL keystore URL starts with postgres:// or postgresql://".into(),
            ));
        }
        validate(&options)?;
        let parsed = parse(url)?;
        let named = |suffix: &str| {
            if parsed.get_application_name().is_some() {
                parsed.clone()
            } else {
                parsed.clone().application_name(&format!("{}{suffix}", options.application_name))
            }
        };
        let with_path = |o: PgConnectOptions| match &options.schema {
            Some(schema) => o.options([("search_path", schema.as_str())]),
            None => o,
        };
        let timeout = options.statement_timeout.as_millis().to_string();
        // A session left idle in a transaction is one whose client is gone
        // or stuck (each operation runs its statements back to back): end
        // it, and free its row locks, rather than block every replica.
        let timed = |o: PgConnectOptions| {
            o.options([
                ("statement_timeout", timeout.as_str()),
                ("idle_in_transaction_session_timeout", timeout.as_str()),
            ])
        };
        // The server probes the client, so the session (and its locks) of
        // a replica that vanished without a FIN or RST ends in about 90 s
        // rather than the OS default of hours.
        let probed = |o: PgConnectOptions| {
            o.options([
                ("tcp_keepalives_idle", "60"),
                ("tcp_keepalives_interval", "10"),
                ("tcp_keepalives_count", "3"),
            ])
        };
        Ok(Self {
            migrate: with_path(named("")),
            pooled: probed(timed(with_path(named("")))),
            listener: probed(timed(with_path(named("-listener")))),
            job_lock: probed(timed(with_path(named("-job-lock")))),
            channel: match &options.schema {
                Some(schema) => format!("{CHANNEL}:{schema}"),
                None => CHANNEL.to_owned(),
            },
            options,
        })
    }

    pub(super) fn schema(&self) -> Option<&str> {
        self.options.schema.as_deref()
    }

    /// How long an operation that has its connection waits for the server
    /// (client side): a statement's own limit, plus a connection's worth
    /// of round trips.
    pub(super) fn operation_timeout(&self) -> Duration {
        self.options.statement_timeout.saturating_add(self.options.acquire_timeout)
    }
}

/// The URL's query keys that sqlx reads (`options[…]` aside). sqlx logs any
/// other key *with its value* and ignores it; libpq parameters it does not
/// know, such as `sslpassword`, may hold secrets, so they are refused first.
const KNOWN_PARAMETERS: &[&str] = &[
    "sslmode",
    "ssl-mode",
    "sslrootcert",
    "ssl-root-cert",
    "ssl-ca",
    "sslcert",
    "ssl-cert",
    "sslkey",
    "ssl-key",
    "statement-cache-capacity",
    "host",
    "hostaddr",
    "port",
    "dbname",
    "user",
    "password",
    "application_name",
    "options",
];

/// Parses `url` as sqlx does, once its query keys are known to be ones sqlx
/// reads. Errors name the offending part, never the password or a value.
fn parse(url: &str) -> Result<PgConnectOptions, StoreError> {
    check_parameters(url)?;
    PgConnectOptions::from_str(url)
        .map_err(|e| StoreError::Config(format!("invalid PostgreSQL URL: {e}")))
}

/// Refuses a query key sqlx does not read, naming the key (if it looks
/// like a parameter name) but never its value.
fn check_parameters(url: &str) -> Result<(), StoreError> {
    // As the URL parser splits: the fragment starts at the first `#`, the
    // query at the first `?` before it.
    let before_fragment = url.split('#').next().unwrap_or_default();
    let Some((_, query)) = before_fragment.split_once('?') else {
        return Ok(());
    };
    for pair in query.split('&').filter(|pair| !pair.is_empty()) {
        let key = form_decode(pair.split('=').next().unwrap_or_default());
        let known = KNOWN_PARAMETERS.contains(&key.as_str()) || key.starts_with("options[");
        if known {
            continue;
        }
        let plain = !key.is_empty()
            && key.len() <= 64
            && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        return Err(StoreError::Config(if plain {
            format!(
                "PostgreSQL URL parameter {key:?} is not supported (the driver would ignore \
                 it); remove it"
            )
        } else {
            "the PostgreSQL URL has a query parameter that is not a supported name; remove it"
                .to_owned()
        }));
    }
    Ok(())
}

/// `application/x-www-form-urlencoded` decoding, as the URL parser reads
/// query keys (`+` is a space; invalid UTF-8 is replaced).
fn form_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        let escaped = (b == b'%')
            .then(|| bytes.get(i + 1..i + 3))
            .flatten()
            .filter(|hex| hex.iter().all(u8::is_ascii_hexdigit))
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match (b, escaped) {
            (_, Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (b'+', None) => {
                out.push(b' ');
                i += 1;
            }
            (other, None) => {
                out.push(other);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn validate(options: &PgStoreOptions) -> Result<(), StoreError> {
    let bad = |what: &str| Err(StoreError::Config(what.to_owned()));
    if options.max_connections == 0 {
        return bad("max_connections must be at least 1");
    }
    for (name, value) in [
        ("acquire_timeout", options.acquire_timeout),
        ("statement_timeout", options.statement_timeout),
        ("migrate_timeout", options.migrate_timeout),
        ("listener_probe", options.listener_probe),
    ] {
        if value < Duration::from_millis(1) {
            return bad(&format!("{name} must be at least 1 ms"));
        }
    }
    if let Some(schema) = &options.schema
        && !is_valid_schema(schema)
    {
        return bad(&format!(
            "schema {schema:?}: use at most {MAX_SCHEMA_LEN} lowercase ASCII letters, digits \
                 and _, starting with a letter or _, and not pg_"
        ));
    }
    Ok(())
}

/// A name that needs no quoting anywhere (`SET search_path`, sqlx's
/// unquoted `CREATE SCHEMA`, the channel name) and is not reserved.
fn is_valid_schema(schema: &str) -> bool {
    let mut chars = schema.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_lowercase() || c == '_');
    first_ok
        && schema.len() <= MAX_SCHEMA_LEN
        && !schema.starts_with("pg_")
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_names_are_checked() {
        for good in ["keygate", "_x", "kg_test_0123456789abcdef", &"a".repeat(MAX_SCHEMA_LEN)] {
            assert!(is_valid_schema(good), "{good}");
        }
        for bad in ["", "1x", "Keygate", "pg_x", "a-b", "a b", "a\"b", &"a".repeat(41)] {
            assert!(!is_valid_schema(bad), "{bad}");
        }
        assert_eq!(MAX_SCHEMA_LEN, 40);
    }

    #[test]
    fn the_target_is_read_as_the_store_connects() {
        let target = |url: &str| PgTarget::of(url).unwrap();
        let remote = target("postgres://u:pw@db.internal:5432/k?sslmode=verify-full");
        assert_eq!(
            (remote.host.as_str(), remote.local, remote.verified_tls),
            ("db.internal", false, true)
        );
        assert!(target("postgres://u@localhost/k").local);
        assert!(target("postgres://u@127.0.0.2/k").local);
        assert!(target("postgres://u@[::1]:5432/k").local);
        assert!(target("postgres:///k?host=/var/run/postgresql").local);
        // What the text says is not what counts.
        let overridden = target("postgres://u@localhost/k?host=db.internal");
        assert_eq!((overridden.host.as_str(), overridden.local), ("db.internal", false));
        assert!(!target("postgres://u@localhost/k?hostaddr=10.0.0.5").local);
        // (An explicit sslmode each, so that PGSSLMODE cannot decide.)
        assert!(
            !target("postgres://u:sslmode=verify-full@db.internal/k?sslmode=prefer").verified_tls
        );
        assert!(
            !target("postgres://u@db.internal/k?sslmode=verify-full&sslmode=disable").verified_tls
        );
        assert!(target("postgres://u@db.internal/k?ssl-mode=verify-ca").verified_tls);
        assert!(!target("postgres://u@db.internal/sslmode=verify-full?sslmode=allow").verified_tls);
        let Err(StoreError::Config(e)) = PgTarget::of("postgres://u:s3cret@h:notaport/k") else {
            panic!("a bad port was read");
        };
        assert!(!e.contains("s3cret"), "{e}");
    }

    #[test]
    fn bad_urls_and_options_are_config_errors() {
        let config_error = |url: &str, options: PgStoreOptions| {
            matches!(Settings::new(url, options), Err(StoreError::Config(_)))
        };
        let ok = PgStoreOptions::default();
        assert!(config_error("sqlite:///tmp/x", ok.clone()));
        assert!(config_error("postgres://h:notaport/db", ok.clone()));
        assert!(config_error("postgres://h/db", ok.clone().with_schema("Bad")));
        let mut zero = ok.clone();
        zero.statement_timeout = Duration::ZERO;
        assert!(config_error("postgres://h/db", zero));
        let settings = Settings::new("postgres://u:secret@h/db", ok.with_schema("s1")).unwrap();
        assert_eq!(settings.channel, "keygate_tenant_changed:s1");
        assert_eq!(settings.listener.get_application_name(), Some("keygate-listener"));
        let options = settings.pooled.get_options().unwrap();
        assert!(options.contains("search_path=s1") && options.contains("statement_timeout=30000"));
        assert!(!format!("{:?}", settings.options).contains("secret"));
        // A vanished client's session, and its row locks, do not outlive it.
        assert!(options.contains("idle_in_transaction_session_timeout=30000"), "{options}");
        assert!(options.contains("tcp_keepalives_idle=60"), "{options}");
        assert_eq!(settings.operation_timeout(), Duration::from_secs(40));
    }

    #[test]
    fn unknown_url_parameters_are_refused_without_their_value() {
        let refused = |url: &str| {
            let errors = [
                Settings::new(url, PgStoreOptions::default()).map(drop),
                PgTarget::of(url).map(drop),
            ];
            errors
                .map(|e| match e {
                    Err(StoreError::Config(e)) => {
                        assert!(!e.contains("s3cret"), "{e}");
                        e
                    }
                    other => panic!("{url}: {:?}", other.map_err(|e| e.to_string())),
                })
                .join("\n")
        };
        // libpq's parameters that sqlx does not know; as sqlx decodes keys.
        assert!(refused("postgres://u@h/db?sslpassword=s3cret").contains("\"sslpassword\""));
        assert!(
            refused("postgres://u@h/db?sslmode=disable&ssl%70assword=s3cret")
                .contains("sslpassword")
        );
        assert!(refused("postgres://u@h/db?passfile=s3cret").contains("passfile"));
        // A key that is not a name is not echoed (it may be a value).
        assert!(!refused("postgres://u@h/db?s3cret+x=1").contains("s3cret"));
        assert!(!refused("postgres://u@h/db?=s3cret").is_empty());
        // What sqlx reads still works; a `?` in a fragment is no query.
        let fine = "postgres://u@h/db?sslmode=disable&ssl-mode=disable&application_name=a\
                    &options[search_path]=x&statement-cache-capacity=10&port=5433&&#x?y=1";
        assert!(Settings::new(fine, PgStoreOptions::default()).is_ok());
        assert!(PgTarget::of("postgres://u:pa%3Fss@h/db").is_ok());
        assert_eq!(form_decode("a%2b+%zz%4"), "a+ %zz%4");
    }
}
