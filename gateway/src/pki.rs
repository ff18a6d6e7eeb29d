//! A development PKI: a CA and the certificates keygate's processes and
//! their callers present to each other. For `keygate up`, `keygate admin
//! pki` and tests; production deployments bring their own PKI (SPIFFE,
//! cert-manager, …).

use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

/// The organization (`O=`) of every CA [`DevCa::generate`] makes (`keygate
/// up`, `keygate admin pki init`): the production profile refuses
/// certificates of such a CA (rule `tls.development_pki`).
pub const DEVELOPMENT_ORGANIZATION: &str = "keygate development CA";

/// A certificate and its private key, PEM-encoded.
pub struct IssuedCert {
    /// The certificate.
    pub cert_pem: String,
    /// The private key (PKCS#8). Secret: write it with mode 0600.
    pub key_pem: zeroize::Zeroizing<String>,
}

impl std::fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedCert").finish_non_exhaustive()
    }
}

/// A development certificate authority.
pub struct DevCa {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
}

impl std::fmt::Debug for DevCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevCa").finish_non_exhaustive()
    }
}

/// Validity of a certificate relative to now.
#[derive(Debug, Clone, Copy)]
pub struct Validity {
    /// Starts this long before now.
    pub starts_ago: Duration,
    /// Ends this long after now (or before now, with `expired`).
    pub lasts: Duration,
    /// Whether `lasts` counts backwards (a certificate already expired).
    pub expired: bool,
}

impl Validity {
    /// From an hour ago for `days` days.
    pub fn days(days: u64) -> Self {
        Self {
            starts_ago: Duration::from_secs(3600),
            lasts: Duration::from_secs(days * 86_400),
            expired: false,
        }
    }

    /// Valid last week, expired yesterday.
    pub fn expired() -> Self {
        Self {
            starts_ago: Duration::from_secs(7 * 86_400),
            lasts: Duration::from_secs(86_400),
            expired: true,
        }
    }

    fn apply(self, params: &mut CertificateParams) {
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - self.starts_ago;
        params.not_after = if self.expired { now - self.lasts } else { now + self.lasts };
    }
}

/// Failure generating a certificate.
#[derive(Debug, thiserror::Error)]
#[error("certificate generation failed: {0}")]
pub struct PkiError(#[from] rcgen::Error);

impl DevCa {
    /// A new development CA named `name` (organization
    /// [`DEVELOPMENT_ORGANIZATION`]), valid ten years.
    pub fn generate(name: &str) -> Result<Self, PkiError> {
        Self::generate_for(name, DEVELOPMENT_ORGANIZATION)
    }

    /// A new CA named `name` of `organization`, valid ten years. It signs
    /// only end-entity certificates (path length 0).
    pub fn generate_for(name: &str, organization: &str) -> Result<Self, PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        dn.push(DnType::OrganizationName, organization);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        Validity::days(3650).apply(&mut params);
        let cert_pem = params.self_signed(&key)?.pem();
        Ok(Self { issuer: Issuer::new(params, key), cert_pem })
    }

    /// A CA saved earlier: its certificate and private key (PEM).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let key = KeyPair::from_pem(key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)?;
        Ok(Self { issuer, cert_pem: cert_pem.to_owned() })
    }

    /// The CA certificate (PEM).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA's private key (PKCS#8 PEM), to keep it (mode 0600). Secret.
    pub fn key_pem(&self) -> zeroize::Zeroizing<String> {
        zeroize::Zeroizing::new(self.issuer.key().serialize_pem())
    }

    /// A server certificate for DNS names and IP addresses.
    pub fn issue_server(&self, names: &[&str], validity: Validity) -> Result<IssuedCert, PkiError> {
        let mut params =
            CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())?;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.sign(params, names.first().copied().unwrap_or("server"), validity)
    }

    /// A server certificate for DNS names and IP addresses that also names
    /// the server's identity `uri` (a URI SAN, what a sidecar's
    /// `key_service.server_identity` pins).
    pub fn issue_server_with_identity(
        &self,
        names: &[&str],
        uri: &str,
        validity: Validity,
    ) -> Result<IssuedCert, PkiError> {
        let mut params =
            CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())?;
        params.subject_alt_names.push(SanType::URI(uri.try_into()?));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.sign(params, names.first().copied().unwrap_or("server"), validity)
    }

    /// A client certificate whose identity is `uri` (a URI SAN such as
    /// `spiffe://prod/ns/onc/sa/api`).
    pub fn issue_client(&self, uri: &str, validity: Validity) -> Result<IssuedCert, PkiError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.subject_alt_names = vec![SanType::URI(uri.try_into()?)];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(params, uri, validity)
    }

    fn sign(
        &self,
        mut params: CertificateParams,
        cn: &str,
        validity: Validity,
    ) -> Result<IssuedCert, PkiError> {
        let key = KeyPair::generate()?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, cn);
        params.distinguished_name = dn;
        // Marked as no CA: a leaf key cannot sign certificates.
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        validity.apply(&mut params);
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            key_pem: zeroize::Zeroizing::new(key.serialize_pem()),
        })
    }
}

#[cfg(test)]
mod tests {
    use x509_parser::prelude::{FromDer, X509Certificate};

    use super::*;

    fn parsed(pem: &str, check: impl FnOnce(&X509Certificate<'_>)) {
        let (_, der) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
        let (_, cert) = X509Certificate::from_der(&der.contents).unwrap();
        check(&cert);
    }

    #[test]
    fn the_ca_signs_only_leaves_and_leaves_are_no_ca() {
        let ca = DevCa::generate("test").unwrap();
        parsed(ca.cert_pem(), |cert| {
            let constraints = cert.basic_constraints().unwrap().unwrap().value;
            assert!(constraints.ca);
            assert_eq!(constraints.path_len_constraint, Some(0));
            let org = cert.subject().iter_organization().next().unwrap();
            assert_eq!(org.as_str().unwrap(), DEVELOPMENT_ORGANIZATION);
        });
        let server = ca.issue_server(&["localhost"], Validity::days(1)).unwrap();
        let client = ca.issue_client("spiffe://t/a", Validity::days(1)).unwrap();
        for leaf in [&server.cert_pem, &client.cert_pem] {
            parsed(leaf, |cert| {
                let constraints = cert.basic_constraints().unwrap().expect("present").value;
                assert!(!constraints.ca);
                let org = cert.issuer().iter_organization().next().unwrap();
                assert_eq!(org.as_str().unwrap(), DEVELOPMENT_ORGANIZATION);
            });
        }
        let other = DevCa::generate_for("test", "Example Health").unwrap();
        parsed(other.cert_pem(), |cert| {
            let org = cert.subject().iter_organization().next().unwrap();
            assert_eq!(org.as_str().unwrap(), "Example Health");
        });
    }
}
