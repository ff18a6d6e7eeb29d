//! TLS with mandatory client certificates, hot reload, and identities.
//!
//! The server certificate, its key and the client CA bundle are reloaded
//! when their files change (polled) or on SIGHUP. A reload builds a whole
//! new `ServerConfig` and swaps it atomically: connections already open
//! keep the configuration they were accepted with, new ones get the new
//! one, and a broken new file keeps the old configuration (logged).

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arc_swap::ArcSwap;
use rustls::ServerConfig;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::config::TlsConfig;

/// TLS material could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A file could not be read or holds no usable PEM item.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// rustls refused the material (key does not match, bad CA, …).
    #[error("TLS configuration rejected: {0}")]
    Rustls(String),
}

/// The current TLS configuration, reloadable.
#[derive(Debug)]
pub struct TlsReloader {
    paths: TlsConfig,
    current: ArcSwap<ServerConfig>,
    /// What the files looked like just before the current configuration
    /// was read from them.
    stamps: Mutex<Vec<Option<Stamp>>>,
}

/// A file's modification time, size and inode: a file replaced by a
/// rename, or rewritten within the modification time's resolution,
/// changes at least one.
type Stamp = (SystemTime, u64, u64);

impl TlsReloader {
    /// Loads the configured files.
    pub fn load(paths: &TlsConfig) -> Result<Self, TlsError> {
        let before = stamps(paths);
        let config = build_server_config(paths)?;
        Ok(Self {
            stamps: Mutex::new(before),
            paths: paths.clone(),
            current: ArcSwap::from(config),
        })
    }

    /// An acceptor with the current configuration.
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.current.load_full())
    }

    /// Rebuilds from the files; on failure the old configuration stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        // Stamped before reading: a file changed while it is read is seen
        // as changed at the next check, not taken as read.
        let before = stamps(&self.paths);
        let config = build_server_config(&self.paths)?;
        self.current.store(config);
        *self.stamps.lock().unwrap_or_else(|p| p.into_inner()) = before;
        tracing::info!("TLS certificate and client CA reloaded");
        Ok(())
    }

    /// Reloads if any file changed (modification time, size or inode).
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let now = stamps(&self.paths);
        let changed = *self.stamps.lock().unwrap_or_else(|p| p.into_inner()) != now;
        if changed {
            self.reload()?;
        }
        Ok(changed)
    }
}

fn stamps(paths: &TlsConfig) -> Vec<Option<Stamp>> {
    use std::os::unix::fs::MetadataExt;
    [&paths.cert, &paths.key, &paths.client_ca]
        .iter()
        .map(|p| {
            let meta = fs::metadata(p).ok()?;
            Some((meta.modified().ok()?, meta.len(), meta.ino()))
        })
        .collect()
}

fn file_error(path: &Path, reason: impl std::fmt::Display) -> TlsError {
    TlsError::File { path: path.to_owned(), reason: reason.to_string() }
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(path, e))?;
    if certs.is_empty() {
        return Err(file_error(path, "no certificate found"));
    }
    Ok(certs)
}

/// Builds a server configuration that requires a client certificate
/// chaining to the configured CA bundle (expired, unknown-CA or absent
/// certificates fail the handshake).
pub fn build_server_config(paths: &TlsConfig) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for ca in read_certs(&paths.client_ca)? {
        roots.add(ca).map_err(|e| file_error(&paths.client_ca, e))?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| TlsError::Rustls(e.to_string()))?;
    let chain = read_certs(&paths.cert)?;
    let key = PrivateKeyDer::from_pem_file(&paths.key).map_err(|e| file_error(&paths.key, e))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Rustls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Rustls(e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The identity of a verified client: its certificate's URI SAN (e.g.
/// `spiffe://prod/ns/onc/sa/api`, scheme and authority lowercased), else
/// its first DNS SAN, lowercased.
/// `None` if it names neither, or none that can be trusted as one:
/// - more than one URI SAN (which one is the caller would be a guess);
/// - a URI SAN that is not one plain spelling of an identity (see
///   [`uri_identity`]): otherwise one workload could hold grants under two
///   names, or a name could carry terminal escapes into logs and audit;
/// - a DNS SAN (with no URI SAN) that is not a host name: only ASCII
///   letters, digits, `.` and `-` are taken, so a DNS SAN can never
///   spell a URI identity (`spiffe://…`), a pattern (`*`) or a path.
///
/// Several DNS SANs are not refused the way several URI SANs are:
/// certificates legitimately carry several names for one service
/// (`api`, `api.onc`, `api.onc.svc.cluster.local`), so the first, in the
/// certificate's order, is the identity and the others are ignored (if the
/// first is no host name there is none: the next is not tried). The policy
/// grants roles to that first name. A URI SAN, where there is one, always
/// wins.
pub fn identity_of(chain: Option<&[CertificateDer<'_>]>) -> Option<String> {
    let leaf = chain?.first()?;
    let (_, cert) = X509Certificate::from_der(leaf.as_ref()).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    let names = &san.value.general_names;
    let mut uris = names.iter().filter_map(|n| match n {
        GeneralName::URI(uri) => Some(*uri),
        _ => None,
    });
    match (uris.next(), uris.next()) {
        (Some(uri), None) => {
            let identity = uri_identity(uri);
            if identity.is_none() {
                tracing::info!(
                    "client certificate refused as an identity: its URI SAN is not \
                     scheme://authority/path in plain ASCII"
                );
            }
            return identity;
        }
        (Some(_), Some(_)) => {
            tracing::info!("client certificate refused as an identity: more than one URI SAN");
            return None;
        }
        (None, _) => {}
    }
    // The first DNS SAN, deliberately: several are common and fine (see
    // above), unlike several URI SANs.
    let dns = names.iter().find_map(|n| match n {
        GeneralName::DNSName(dns) => Some(*dns),
        _ => None,
    })?;
    // DNS names are case-insensitive; policy matching is exact.
    let dns = dns.to_ascii_lowercase();
    if is_host_name(&dns) {
        Some(dns)
    } else {
        tracing::info!("client certificate refused as an identity: its DNS SAN is no host name");
        None
    }
}

/// `uri` as an identity, if it is one plain spelling of one:
/// `scheme://authority` and a path of `/`-separated segments, in ASCII.
/// Scheme and authority are case-insensitive (RFC 3986 §6.2.2.1), so they
/// are lowercased; the path is compared as it is. Refused: an empty
/// authority, userinfo (`@`) or anything beyond `a-z 0-9 . - _ :` in it;
/// an empty segment (`//`, a trailing `/`), a `.` or `..` segment; `%`
/// (another spelling of the same bytes), a query or fragment (`?`, `#`),
/// `*` (a pattern in the policy), control characters, spaces and
/// non-ASCII.
pub(crate) fn uri_identity(uri: &str) -> Option<String> {
    let (scheme, rest) = uri.split_once("://")?;
    let (authority, path) = rest.find('/').map_or((rest, ""), |at| rest.split_at(at));
    let scheme_ok = scheme.bytes().next().is_some_and(|b| b.is_ascii_alphabetic())
        && scheme.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'));
    let authority_ok = !authority.is_empty()
        && authority
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b':'));
    // RFC 3986 `pchar` less `%`, and less `*`: what a segment may hold.
    let segment_ok = |segment: &str| {
        !matches!(segment, "" | "." | "..")
            && segment
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._~!$&'()+,;=:@".contains(&b))
    };
    let path_ok =
        path.is_empty() || path.strip_prefix('/').is_some_and(|p| p.split('/').all(segment_ok));
    (scheme_ok && authority_ok && path_ok).then(|| {
        format!("{}://{}{path}", scheme.to_ascii_lowercase(), authority.to_ascii_lowercase())
    })
}

/// Whether `name` (lowercase) is a host name: dot-separated labels of
/// `a-z`, `0-9` and `-`, each 1 to 63 long and not starting or ending with
/// `-`, 253 bytes at most.
fn is_host_name(name: &str) -> bool {
    (1..=253).contains(&name.len())
        && name.split('.').all(|label| {
            (1..=63).contains(&label.len())
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        })
}

#[cfg(test)]
mod tests {
    use rcgen::{CertificateParams, KeyPair, SanType};

    use super::*;

    /// The identity of a (self-signed) certificate with these SANs.
    fn identity(sans: Vec<SanType>) -> Option<String> {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = sans;
        let cert = params.self_signed(&KeyPair::generate().unwrap()).unwrap();
        let chain = [cert.der().clone()];
        identity_of(Some(chain.as_slice()))
    }

    fn uri(text: &str) -> SanType {
        SanType::URI(text.try_into().unwrap())
    }

    fn dns(text: &str) -> SanType {
        SanType::DnsName(text.try_into().unwrap())
    }

    #[test]
    fn the_uri_san_else_the_dns_san_is_the_identity() {
        let api = "spiffe://prod/ns/onc/sa/api";
        assert_eq!(identity(vec![uri(api)]).as_deref(), Some(api));
        assert_eq!(identity(vec![dns("api.onc.svc"), uri(api)]).as_deref(), Some(api));
        assert_eq!(identity(vec![dns("API.Onc.svc")]).as_deref(), Some("api.onc.svc"));
        // Several DNS SANs: the first is the identity, whatever follows.
        assert_eq!(
            identity(vec![dns("a.example"), dns("b.example")]).as_deref(),
            Some("a.example")
        );
        assert_eq!(
            identity(vec![dns("b.example"), dns("a.example")]).as_deref(),
            Some("b.example")
        );
        assert_eq!(
            identity(vec![dns("a.example"), dns("*.example")]).as_deref(),
            Some("a.example")
        );
        assert_eq!(identity(vec![dns("*.example"), dns("a.example")]), None, "the first or none");
        assert_eq!(identity(vec![]), None);
        assert_eq!(identity_of(None), None);
    }

    #[test]
    fn more_than_one_uri_san_names_no_identity() {
        let two = vec![uri("spiffe://prod/ns/onc/sa/api"), uri("spiffe://prod/ns/onc/sa/admin")];
        assert_eq!(identity(two), None);
        let same_twice = vec![uri("spiffe://prod/a"), uri("spiffe://prod/a"), dns("a.example")];
        assert_eq!(identity(same_twice), None, "nor does the DNS SAN take over");
    }

    #[test]
    fn a_uri_san_must_be_one_plain_spelling_of_an_identity() {
        let alice = "spiffe://prod.example/ns/sec/sa/alice";
        assert_eq!(identity(vec![uri(alice)]).as_deref(), Some(alice));
        // Scheme and authority are case-insensitive: one spelling each.
        assert_eq!(
            identity(vec![uri("SPIFFE://Prod.Example/ns/sec/sa/alice")]).as_deref(),
            Some(alice)
        );
        assert_eq!(
            identity(vec![uri("spiffe://prod.example/ns/Sec/sa/Alice")]).as_deref(),
            Some("spiffe://prod.example/ns/Sec/sa/Alice"),
            "the path keeps its case"
        );
        assert_eq!(identity(vec![uri("spiffe://prod")]).as_deref(), Some("spiffe://prod"));
        for bad in [
            "spiffe://prod.example/ns/sec/sa/alice/",
            "spiffe://prod.example/ns//sec/sa/alice",
            "spiffe://prod.example/",
            "spiffe://prod.example/ns/./sec/sa/alice",
            "spiffe://prod.example/ns/other/../sec/sa/alice",
            "spiffe://prod.example/ns/sec/sa/..",
            "spiffe://prod.example/ns/sec/sa/%61lice",
            "spiffe://prod.example/ns/sec/sa/alice?x=1",
            "spiffe://prod.example/ns/sec/sa/alice#x",
            "spiffe://prod.example/ns/sec/sa/al\u{1b}[31mice",
            "spiffe://prod.example/ns/sec/sa/al\tice",
            "spiffe://prod.example/ns/sec/sa/al ice",
            "spiffe://prod.example/ns/sec/sa/*",
            "spiffe:///ns/sec/sa/alice",
            "spiffe://mallory@prod.example/ns/sec/sa/alice",
            "spiffe:prod.example/ns/sec/sa/alice",
            "://prod.example/ns",
            "1spiffe://prod.example/ns",
        ] {
            assert_eq!(uri_identity(bad), None, "{bad:?}");
        }
        // Non-ASCII cannot be put in a certificate's URI SAN (an
        // IA5String), but is refused should a parser ever hand it over.
        assert_eq!(uri_identity("spiffe://prod.example/ns/sec/sa/\u{430}lice"), None);
        // Through a certificate, as the listener sees it.
        for bad in [
            "spiffe://prod.example/ns/sec/sa/alice/",
            "spiffe://prod.example/ns/sec/sa/%61lice",
            "spiffe://prod.example/ns/sec/sa/al\u{1b}ice",
            "spiffe://prod.example/ns/../sec/sa/alice",
        ] {
            assert_eq!(identity(vec![uri(bad)]), None, "{bad:?}");
            assert_eq!(identity(vec![uri(bad), dns("a.example")]), None, "no DNS fallback");
        }
    }

    #[test]
    fn a_dns_san_that_is_no_host_name_names_no_identity() {
        for bad in [
            "spiffe://prod/ns/onc/sa/admin",
            "spiffe:admin",
            "*.example",
            "a/b",
            "a_b.example",
            "-a.example",
            "a..example",
            ".",
            "a b",
        ] {
            assert_eq!(identity(vec![dns(bad)]), None, "{bad}");
        }
        assert!(is_host_name("keygate-1.prod.svc.cluster.local"));
        assert!(!is_host_name(&"a".repeat(64)));
    }
}
