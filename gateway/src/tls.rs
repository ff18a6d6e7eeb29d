//! TLS with mandatory client certificates, hot reload, and identities.
//!
//! The server certificate, its key and the client CA bundle are reloaded
//! when their files change (polled) or on SIGHUP. A reload builds a whole
//! new `ServerConfig` and swaps it atomically: connections already open
//! keep the configuration they were accepted with, new ones get the new
//! one, and a broken new file keeps the old configuration (logged).
//! Under the production profile a reload is held to the same compliance
//! rules as the start, and an expired server certificate is refused in
//! every profile.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use rustls::server::WebPkiClientVerifier;
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::{InconsistentKeys, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
use zeroize::Zeroize;

use crate::compliance::{self, Profile};
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
    /// rustls refused the material (a CA bundle it cannot use, …). A key
    /// that does not match the certificate is a [`TlsError::File`] naming
    /// the key file.
    #[error("TLS configuration rejected: {0}")]
    Rustls(String),
    /// The production profile refuses the files: the failed rules, each
    /// with its provision and what was found.
    #[error("the production profile refuses the TLS files: {0}")]
    Refused(String),
    /// A file was replaced while the configuration was read from them, so
    /// the checks may have judged other files than those loaded: not a
    /// broken file, a renewal under way (a reload reads them again at the
    /// next poll).
    #[error("the TLS files changed while they were read (a renewal under way?)")]
    Changed,
}

/// The current TLS configuration, reloadable.
#[derive(Debug)]
pub struct TlsReloader {
    paths: TlsConfig,
    profile: Profile,
    current: ArcSwap<Loaded>,
    /// What the files looked like just before the current configuration
    /// was read from them.
    stamps: Mutex<Vec<Option<Stamp>>>,
}

/// A file's modification time, size and inode: a file replaced by a
/// rename, or rewritten within the modification time's resolution,
/// changes at least one.
type Stamp = (SystemTime, u64, u64);

/// A configuration and its server certificate's expiry, swapped together.
#[derive(Debug)]
struct Loaded {
    config: Arc<ServerConfig>,
    /// The leaf's `notAfter`, in seconds since the epoch.
    not_after: i64,
}

impl TlsReloader {
    /// Loads the configured files; under `profile` production they must
    /// pass the TLS compliance rules, at this load and at every reload.
    pub fn load(paths: &TlsConfig, profile: Profile) -> Result<Self, TlsError> {
        // A start has no old configuration to keep, nor a next poll to
        // wait for: files caught mid-renewal are read once more at once.
        let (loaded, before) = match read_checked(paths, profile) {
            Err(TlsError::Changed) => read_checked(paths, profile)?,
            read => read?,
        };
        Ok(Self {
            stamps: Mutex::new(before),
            paths: paths.clone(),
            profile,
            current: ArcSwap::from_pointee(loaded),
        })
    }

    /// An acceptor with the current configuration.
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.current.load().config.clone())
    }

    /// When the current server certificate expires (its `notAfter`), in
    /// seconds since the epoch.
    pub fn not_after(&self) -> i64 {
        self.current.load().not_after
    }

    /// Rebuilds from the files; on failure the old configuration stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let (loaded, before) = read_checked(&self.paths, self.profile)?;
        self.current.store(Arc::new(loaded));
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

/// Builds a configuration from the files and, under the production
/// profile, refuses it if the files fail a TLS compliance rule
/// (`tls.development_pki`, `files.private_keys`,
/// `authentication.client_certificates`): a reload must not bring in what
/// the start would have refused. (The development profile judges nothing
/// here: the start-up report says once what fails.) Returns the files'
/// stamps from before they were read.
fn read_checked(
    paths: &TlsConfig,
    profile: Profile,
) -> Result<(Loaded, Vec<Option<Stamp>>), TlsError> {
    // Stamped before reading: a file changed while it is read is seen
    // as changed at the next check, not taken as read.
    let before = stamps(paths);
    let loaded = build(paths)?;
    compliance::refused_in_production(profile, || compliance::tls_report(profile, paths))
        .map_err(|e| TlsError::Refused(compliance::refusal(&e)))?;
    // The rules read the files by name: had one been replaced meanwhile,
    // they would have judged another file than the one loaded.
    if stamps(paths) != before {
        return Err(TlsError::Changed);
    }
    Ok((loaded, before))
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

/// The PEM certificates in `path` (at least one).
pub(crate) fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(path, e))?;
    if certs.is_empty() {
        return Err(file_error(path, "no certificate found"));
    }
    Ok(certs)
}

/// The PEM private key in `path`, read into a buffer that is wiped (the
/// PEM text holds the key too).
pub(crate) fn read_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = zeroize::Zeroizing::new(fs::read(path).map_err(|e| file_error(path, e))?);
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| file_error(path, e))
}

/// `chain` with the private key in `key_path`, for rustls to sign with.
/// The key must match the chain's first certificate (a certificate renewed
/// without its key is refused, naming the key file). The key's decoded
/// bytes are wiped once the signing key is made from them: handed to
/// rustls (`with_single_cert`, `with_client_auth_cert`) they would be
/// dropped unwiped, at every reload.
pub(crate) fn certified_key(
    chain: Vec<CertificateDer<'static>>,
    key_path: &Path,
) -> Result<Arc<CertifiedKey>, TlsError> {
    let mut key = read_private_key(key_path)?;
    let signer = rustls::crypto::aws_lc_rs::sign::any_supported_type(&key);
    key.zeroize();
    let certified = CertifiedKey::new(chain, signer.map_err(|e| file_error(key_path, e))?);
    match certified.keys_match() {
        // As `with_single_cert` does, a key that cannot tell its public
        // half is taken: a mismatch would then fail every handshake.
        Ok(()) | Err(rustls::Error::InconsistentKeys(InconsistentKeys::Unknown)) => {
            Ok(Arc::new(certified))
        }
        Err(rustls::Error::InconsistentKeys(InconsistentKeys::KeyMismatch)) => {
            Err(file_error(key_path, "the private key does not match the certificate"))
        }
        Err(e) => Err(file_error(key_path, e)),
    }
}

/// The `notAfter` of the chain's first (leaf) certificate, in seconds
/// since the epoch; an error naming `path` if it has passed.
fn unexpired_leaf(chain: &[CertificateDer<'_>], path: &Path) -> Result<i64, TlsError> {
    let leaf = chain.first().ok_or_else(|| file_error(path, "no certificate found"))?;
    let (_, cert) = X509Certificate::from_der(leaf.as_ref())
        .map_err(|e| file_error(path, format!("cannot parse the certificate: {e}")))?;
    let not_after = cert.validity().not_after;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| i64::try_from(since.as_secs()).unwrap_or(i64::MAX));
    if not_after.timestamp() <= now {
        // Every client would refuse it: better the old one, or no start.
        return Err(file_error(path, format!("the server certificate expired on {not_after}")));
    }
    Ok(not_after.timestamp())
}

/// Builds a server configuration that requires a client certificate
/// chaining to the configured CA bundle (expired, unknown-CA or absent
/// certificates fail the handshake). An expired server certificate is
/// refused.
pub fn build_server_config(paths: &TlsConfig) -> Result<Arc<ServerConfig>, TlsError> {
    build(paths).map(|loaded| loaded.config)
}

fn build(paths: &TlsConfig) -> Result<Loaded, TlsError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for ca in read_certs(&paths.client_ca)? {
        roots.add(ca).map_err(|e| file_error(&paths.client_ca, e))?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| TlsError::Rustls(e.to_string()))?;
    let chain = read_certs(&paths.cert)?;
    let not_after = unexpired_leaf(&chain, &paths.cert)?;
    let certified = certified_key(chain, &paths.key)?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Rustls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(SingleCertAndKey::from(certified)));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    // No resumption: rustls restores a resumed session's client chain
    // without verifying it again, and each resumption hands out new
    // tickets, so a client certificate would keep working past its
    // expiry (DESIGN §6: an expired certificate fails the handshake).
    // Sidecars keep their connections alive, so full handshakes are rare.
    // (`ticketer` stays the default that never issues stateless tickets.)
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Loaded { config: Arc::new(config), not_after })
}

/// The identity of a verified client: its certificate's URI SAN (e.g.
/// `spiffe://prod/ns/onc/sa/api`, scheme and authority lowercased), else
/// its first DNS SAN, lowercased; `None` where [`client_identity`] finds
/// none.
pub fn identity_of(chain: Option<&[CertificateDer<'_>]>) -> Option<String> {
    client_identity(chain).ok()
}

/// Why a client certificate gives no identity (the label of
/// `keygate_client_identities_refused_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum NoIdentity {
    /// No certificate was presented.
    NoCertificate,
    /// Neither a URI nor a DNS SAN (or no certificate that can be read).
    NoName,
    /// More than one URI SAN.
    SeveralUris,
    /// A URI SAN that is not one plain spelling of an identity.
    UriNotPlain,
    /// No URI SAN, and the first DNS SAN is no host name.
    DnsNotHostName,
}

impl NoIdentity {
    /// The reason's name in metrics and logs.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::NoCertificate => "no_certificate",
            Self::NoName => "no_uri_or_dns_san",
            Self::SeveralUris => "several_uri_sans",
            Self::UriNotPlain => "uri_san_not_plain",
            Self::DnsNotHostName => "dns_san_not_host_name",
        }
    }
}

/// The identity of a verified client, or why it has none:
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
pub fn client_identity(chain: Option<&[CertificateDer<'_>]>) -> Result<String, NoIdentity> {
    let leaf = chain.and_then(<[_]>::first).ok_or(NoIdentity::NoCertificate)?;
    let (_, cert) = X509Certificate::from_der(leaf.as_ref()).map_err(|_| NoIdentity::NoName)?;
    let san = cert.subject_alternative_name().ok().flatten().ok_or(NoIdentity::NoName)?;
    let names = &san.value.general_names;
    let mut uris = names.iter().filter_map(|n| match n {
        GeneralName::URI(uri) => Some(*uri),
        _ => None,
    });
    match (uris.next(), uris.next()) {
        (Some(uri), None) => return uri_identity(uri).ok_or(NoIdentity::UriNotPlain),
        (Some(_), Some(_)) => return Err(NoIdentity::SeveralUris),
        (None, _) => {}
    }
    // The first DNS SAN, deliberately: several are common and fine (see
    // above), unlike several URI SANs.
    let dns = names
        .iter()
        .find_map(|n| match n {
            GeneralName::DNSName(dns) => Some(*dns),
            _ => None,
        })
        .ok_or(NoIdentity::NoName)?;
    // DNS names are case-insensitive; policy matching is exact.
    let dns = dns.to_ascii_lowercase();
    if is_host_name(&dns) { Ok(dns) } else { Err(NoIdentity::DnsNotHostName) }
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

/// What `paths`' certificate, key and CA files look like now (the stamps
/// [`TlsReloader`] compares), for the sidecar's key service client, which
/// reloads its own certificate, key and CA bundle the same way.
pub(crate) fn file_stamps(paths: &TlsConfig) -> Vec<Option<Stamp>> {
    stamps(paths)
}

#[cfg(test)]
pub(crate) mod tests {
    use std::os::unix::fs::PermissionsExt;

    use rcgen::{CertificateParams, KeyPair, SanType};
    use rustls::{ClientConfig, ClientConnection, Connection, HandshakeKind, ServerConnection};

    use super::*;
    use crate::pki::{DevCa, IssuedCert, Validity};

    /// A CA of an organization's own PKI (not a development CA).
    fn own_ca() -> DevCa {
        DevCa::generate_for("Example Health Issuing CA", "Example Health").unwrap()
    }

    /// Writes `server`'s certificate and key (mode 0600) and `ca` as the
    /// client CA bundle into `dir`.
    pub(crate) fn write_files(dir: &Path, server: &IssuedCert, ca: &DevCa) -> TlsConfig {
        let paths = TlsConfig {
            cert: dir.join("server.crt"),
            key: dir.join("server.key"),
            client_ca: dir.join("ca.crt"),
            reload_interval_secs: 5,
        };
        fs::write(&paths.cert, &server.cert_pem).unwrap();
        fs::write(&paths.key, server.key_pem.as_bytes()).unwrap();
        fs::set_permissions(&paths.key, fs::Permissions::from_mode(0o600)).unwrap();
        fs::write(&paths.client_ca, ca.cert_pem()).unwrap();
        paths
    }

    fn server_cert(ca: &DevCa, validity: Validity) -> IssuedCert {
        ca.issue_server(&["localhost"], validity).unwrap()
    }

    /// A client of `version` presenting `client`, trusting `ca`. It keeps
    /// the sessions servers offer, as clients do by default.
    fn client_config(
        ca: &DevCa,
        client: &IssuedCert,
        version: &'static rustls::SupportedProtocolVersion,
    ) -> Arc<ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from_pem_slice(ca.cert_pem().as_bytes()).unwrap()).unwrap();
        let chain = vec![CertificateDer::from_pem_slice(client.cert_pem.as_bytes()).unwrap()];
        let key = PrivateKeyDer::from_pem_slice(client.key_pem.as_bytes()).unwrap();
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[version])
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .unwrap();
        Arc::new(config)
    }

    /// Runs one handshake in memory, and whatever the server sends after
    /// it (TLS 1.3 session tickets); returns the client's kind of it.
    fn handshake(client: &Arc<ClientConfig>, server: &Arc<ServerConfig>) -> HandshakeKind {
        let name = "localhost".try_into().unwrap();
        let mut client = Connection::Client(ClientConnection::new(client.clone(), name).unwrap());
        let mut server = Connection::Server(ServerConnection::new(server.clone()).unwrap());
        // Whether `from` had anything for `to`.
        let pass = |from: &mut Connection, to: &mut Connection| {
            let mut bytes = Vec::new();
            while from.wants_write() {
                from.write_tls(&mut bytes).unwrap();
            }
            let mut unread = bytes.as_slice();
            while !unread.is_empty() {
                to.read_tls(&mut unread).unwrap();
                to.process_new_packets().unwrap();
            }
            !bytes.is_empty()
        };
        while pass(&mut client, &mut server) | pass(&mut server, &mut client) {}
        assert!(!client.is_handshaking() && !server.is_handshaking());
        client.handshake_kind().unwrap()
    }

    #[test]
    fn every_handshake_verifies_the_client_certificate_afresh() {
        let dir = tempfile::tempdir().unwrap();
        let ca = own_ca();
        let paths = write_files(dir.path(), &server_cert(&ca, Validity::days(1)), &ca);
        let server = build_server_config(&paths).unwrap();
        let client = ca.issue_client("spiffe://test/sidecar", Validity::days(1)).unwrap();
        // A resumed session would bring back the chain verified at the
        // first handshake, expired since or not.
        for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
            let config = client_config(&ca, &client, version);
            assert_eq!(handshake(&config, &server), HandshakeKind::Full);
            assert_eq!(handshake(&config, &server), HandshakeKind::Full, "{version:?}: resumed");
        }
    }

    #[test]
    fn an_expired_server_certificate_is_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let ca = own_ca();
        let paths = write_files(dir.path(), &server_cert(&ca, Validity::expired()), &ca);
        let e = TlsReloader::load(&paths, Profile::Development).unwrap_err();
        assert!(matches!(&e, TlsError::File { path, .. } if *path == paths.cert), "{e:?}");
        assert!(e.to_string().contains("expired"), "{e}");
        assert!(build_server_config(&paths).is_err());
    }

    #[test]
    fn a_refused_reload_keeps_the_configuration_in_force() {
        let dir = tempfile::tempdir().unwrap();
        let ca = own_ca();
        let first = server_cert(&ca, Validity::days(1));
        let paths = write_files(dir.path(), &first, &ca);
        let tls = TlsReloader::load(&paths, Profile::Production).unwrap();
        let before = tls.acceptor().config().clone();
        let expiry = tls.not_after();
        let kept = |tls: &TlsReloader| {
            Arc::ptr_eq(tls.acceptor().config(), &before) && tls.not_after() == expiry
        };

        // A renewal half written: the new certificate, the old key.
        let renewed = server_cert(&ca, Validity::days(30));
        fs::write(&paths.cert, &renewed.cert_pem).unwrap();
        let e = tls.reload_if_changed().unwrap_err();
        assert!(matches!(&e, TlsError::File { path, .. } if *path == paths.key), "{e:?}");
        assert!(kept(&tls));
        // An expired certificate with its own key.
        write_files(dir.path(), &server_cert(&ca, Validity::expired()), &ca);
        let e = tls.reload().unwrap_err();
        assert!(e.to_string().starts_with(&paths.cert.display().to_string()), "{e}");
        assert!(kept(&tls));

        // The renewal completed: taken, with its expiry.
        write_files(dir.path(), &renewed, &ca);
        assert!(tls.reload_if_changed().unwrap());
        assert!(!Arc::ptr_eq(tls.acceptor().config(), &before));
        assert!(tls.not_after() > expiry + 28 * 86_400, "{} vs {expiry}", tls.not_after());
        assert!(!tls.reload_if_changed().unwrap(), "nothing changed since");
    }

    #[test]
    fn production_reloads_are_held_to_the_tls_rules() {
        let dir = tempfile::tempdir().unwrap();
        let ca = own_ca();
        let good = server_cert(&ca, Validity::days(1));
        let paths = write_files(dir.path(), &good, &ca);
        let production = TlsReloader::load(&paths, Profile::Production).unwrap();
        let development = TlsReloader::load(&paths, Profile::Development).unwrap();
        let refused = |tls: &TlsReloader, rule: &str| match tls.reload() {
            Err(TlsError::Refused(rules)) => {
                assert!(rules.contains(&format!("[{rule}]")), "{rules}")
            }
            other => panic!("{rule}: {other:?}"),
        };

        // A development CA's certificates, as `keygate up` makes them.
        let dev = DevCa::generate("keygate up development CA").unwrap();
        write_files(dir.path(), &server_cert(&dev, Validity::days(1)), &dev);
        refused(&production, "tls.development_pki");
        development.reload().unwrap();
        // The organization's again, but the key readable by others.
        write_files(dir.path(), &good, &ca);
        fs::set_permissions(&paths.key, fs::Permissions::from_mode(0o644)).unwrap();
        refused(&production, "files.private_keys");
        development.reload().unwrap();
        // A client CA bundle holding no CA.
        fs::set_permissions(&paths.key, fs::Permissions::from_mode(0o600)).unwrap();
        fs::write(&paths.client_ca, format!("{}{}", ca.cert_pem(), good.cert_pem)).unwrap();
        refused(&production, "authentication.client_certificates");
        // The files mended: taken.
        fs::write(&paths.client_ca, ca.cert_pem()).unwrap();
        production.reload().unwrap();
        // Nor does the start take what a reload refuses.
        fs::set_permissions(&paths.key, fs::Permissions::from_mode(0o640)).unwrap();
        assert!(matches!(
            TlsReloader::load(&paths, Profile::Production),
            Err(TlsError::Refused(_))
        ));
    }

    #[test]
    fn a_certified_key_is_refused_unless_the_key_is_the_certificates() {
        let dir = tempfile::tempdir().unwrap();
        let ca = own_ca();
        let (server, other) =
            (server_cert(&ca, Validity::days(1)), server_cert(&ca, Validity::days(1)));
        let chain = read_pem_chain(&server);
        let key = dir.path().join("server.key");

        fs::write(&key, other.key_pem.as_bytes()).unwrap();
        let e = certified_key(chain.clone(), &key).unwrap_err();
        assert!(matches!(&e, TlsError::File { path, .. } if *path == key), "{e:?}");
        assert!(e.to_string().contains("does not match the certificate"), "{e}");
        // Not a key at all, nor a file: refused naming it too.
        fs::write(&key, "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n").unwrap();
        let e = certified_key(chain.clone(), &key).unwrap_err();
        assert!(matches!(&e, TlsError::File { path, .. } if *path == key), "{e:?}");
        let absent = dir.path().join("absent.key");
        let e = certified_key(chain.clone(), &absent).unwrap_err();
        assert!(matches!(&e, TlsError::File { path, .. } if *path == absent), "{e:?}");

        fs::write(&key, server.key_pem.as_bytes()).unwrap();
        let certified = certified_key(chain.clone(), &key).unwrap();
        assert_eq!(certified.cert, chain);
        assert!(certified.keys_match().is_ok());
    }

    fn read_pem_chain(cert: &IssuedCert) -> Vec<CertificateDer<'static>> {
        vec![CertificateDer::from_pem_slice(cert.cert_pem.as_bytes()).unwrap()]
    }

    /// What `f` logs, at every level, as text.
    pub(crate) fn logs_of(f: impl FnOnce()) -> String {
        #[derive(Clone, Default)]
        struct Buffer(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Buffer {
            fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(bytes);
                Ok(bytes.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, f);
        String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap()
    }

    #[test]
    fn development_loads_and_reloads_judge_no_rule_and_log_none() {
        let dir = tempfile::tempdir().unwrap();
        // What `keygate up` runs with: a development CA's certificates.
        let dev = DevCa::generate("keygate up development CA").unwrap();
        let paths = write_files(dir.path(), &server_cert(&dev, Validity::days(1)), &dev);
        let logs = logs_of(|| {
            let tls = TlsReloader::load(&paths, Profile::Development).unwrap();
            tls.reload().unwrap();
        });
        assert!(logs.contains("TLS certificate and client CA reloaded"), "{logs}");
        assert!(!logs.contains("tls.development_pki"), "{logs}");
        assert!(!logs.contains("compliance check failed"), "{logs}");
    }

    /// The identity of a (self-signed) certificate with these SANs.
    fn identity(sans: Vec<SanType>) -> Option<String> {
        client_identity_of(sans).ok()
    }

    /// Why a certificate with these SANs gives no identity.
    fn refusal(sans: Vec<SanType>) -> Option<NoIdentity> {
        client_identity_of(sans).err()
    }

    fn client_identity_of(sans: Vec<SanType>) -> Result<String, NoIdentity> {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = sans;
        let cert = params.self_signed(&KeyPair::generate().unwrap()).unwrap();
        let chain = [cert.der().clone()];
        client_identity(Some(chain.as_slice()))
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
        assert_eq!(refusal(vec![]), Some(NoIdentity::NoName));
        let ip = SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
        assert_eq!(refusal(vec![ip]), Some(NoIdentity::NoName));
        assert_eq!(identity_of(None), None);
        assert_eq!(client_identity(Some(&[])), Err(NoIdentity::NoCertificate));
        assert_eq!(
            client_identity(Some(&[CertificateDer::from(vec![0x30, 0x03, 1, 2, 3])])),
            Err(NoIdentity::NoName)
        );
    }

    #[test]
    fn more_than_one_uri_san_names_no_identity() {
        let two = vec![uri("spiffe://prod/ns/onc/sa/api"), uri("spiffe://prod/ns/onc/sa/admin")];
        assert_eq!(refusal(two), Some(NoIdentity::SeveralUris));
        let same_twice = vec![uri("spiffe://prod/a"), uri("spiffe://prod/a"), dns("a.example")];
        assert_eq!(refusal(same_twice), Some(NoIdentity::SeveralUris), "no DNS SAN takes over");
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
            assert_eq!(refusal(vec![uri(bad)]), Some(NoIdentity::UriNotPlain), "{bad:?}");
            assert_eq!(
                refusal(vec![uri(bad), dns("a.example")]),
                Some(NoIdentity::UriNotPlain),
                "no DNS fallback"
            );
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
            assert_eq!(refusal(vec![dns(bad)]), Some(NoIdentity::DnsNotHostName), "{bad}");
        }
        assert!(is_host_name("keygate-1.prod.svc.cluster.local"));
        assert!(!is_host_name(&"a".repeat(64)));
    }
}
