//! Where the key service is and which admin certificate to present: a
//! profile file, overridden by flags and `KEYGATE_ADMIN_…` variables.
//!
//! ```toml
//! # ~/.config/keygate/admin.toml
//! url  = "https://keygate.internal:8443"
//! ca   = "ca.crt"          # CA bundle that signs the key service's certificate
//! cert = "admin.crt"       # the admin certificate (its URI SAN is the identity)
//! key  = "admin.key"       # its private key (keep it 0600)
//! ```
//!
//! Relative paths in the file are resolved against the file's directory.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::args::ConnectionArgs;
use super::error::{AdminError, toml_error};
use super::output::io_reason;

/// Largest profile file read, in bytes.
const MAX_PROFILE_BYTES: u64 = 64 * 1024;

/// A profile file's contents; every key optional (flags may supply it).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProfileFile {
    url: Option<String>,
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
}

/// Resolved connection settings.
#[derive(Debug, Clone)]
pub(crate) struct Connection {
    /// `https://host:port`, without a trailing slash.
    pub(crate) url: String,
    /// CA bundle (PEM) for the key service's certificate.
    pub(crate) ca: PathBuf,
    /// Admin certificate (PEM).
    pub(crate) cert: PathBuf,
    /// Its private key (PEM).
    pub(crate) key: PathBuf,
    /// Timeout of each call.
    pub(crate) timeout: Duration,
}

/// The profile used when neither `--profile` nor `KEYGATE_ADMIN_PROFILE`
/// names one: `$XDG_CONFIG_HOME/keygate/admin.toml`, else
/// `~/.config/keygate/admin.toml`.
pub(crate) fn default_profile_path() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .map(|h| PathBuf::from(h).join(".config"))
        })?;
    Some(base.join("keygate").join("admin.toml"))
}

/// Combines flags/env (`args`) with the profile file: a flag or variable
/// wins over the file. A profile named explicitly must exist; the default
/// one may be absent if flags give everything.
pub(crate) fn resolve(args: &ConnectionArgs) -> Result<Connection, AdminError> {
    let (file, source) = match &args.profile {
        Some(path) => (Some(load(path)?), Some(path.clone())),
        None => match default_profile_path() {
            Some(path) if path.is_file() => (Some(load(&path)?), Some(path)),
            _ => (None, None),
        },
    };
    let base = source.as_deref().and_then(Path::parent).map(Path::to_path_buf);
    let file = file.unwrap_or_default();
    let from_file = |p: Option<PathBuf>| {
        p.map(|p| match &base {
            Some(base) if p.is_relative() => base.join(p),
            _ => p,
        })
    };
    let missing = |flag: &str, var: &str, key: &str| {
        let whence = match &source {
            Some(p) => format!("the profile {} has no `{key}`", p.display()),
            None => match default_profile_path() {
                Some(p) => format!("no profile at {}", p.display()),
                None => "no profile".to_owned(),
            },
        };
        AdminError::usage(format!(
            "no {what}: give {flag}, set {var} or put `{key}` in a profile ({whence})",
            what = match key {
                "url" => "key service URL",
                "ca" => "CA bundle",
                "cert" => "admin certificate",
                _ => "admin private key",
            }
        ))
    };
    let url = args
        .url
        .clone()
        .or(file.url)
        .ok_or_else(|| missing("--url", "KEYGATE_ADMIN_URL", "url"))?;
    let ca = args
        .ca
        .clone()
        .or_else(|| from_file(file.ca))
        .ok_or_else(|| missing("--ca", "KEYGATE_ADMIN_CA", "ca"))?;
    let cert = args
        .cert
        .clone()
        .or_else(|| from_file(file.cert))
        .ok_or_else(|| missing("--cert", "KEYGATE_ADMIN_CERT", "cert"))?;
    let key = args
        .key
        .clone()
        .or_else(|| from_file(file.key))
        .ok_or_else(|| missing("--key", "KEYGATE_ADMIN_KEY", "key"))?;
    Ok(Connection {
        url: check_url(&url)?,
        ca,
        cert,
        key,
        timeout: Duration::from_secs(args.timeout.max(1)),
    })
}

fn load(path: &Path) -> Result<ProfileFile, AdminError> {
    let shown = path.display();
    let meta = std::fs::metadata(path)
        .map_err(|e| AdminError::usage(format!("profile {shown}: {}", io_reason(&e))))?;
    if !meta.is_file() {
        return Err(AdminError::usage(format!("profile {shown}: not a file")));
    }
    if meta.len() > MAX_PROFILE_BYTES {
        return Err(AdminError::usage(format!(
            "profile {shown}: larger than {MAX_PROFILE_BYTES} bytes"
        )));
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| AdminError::usage(format!("profile {shown}: {}", io_reason(&e))))?;
    toml::from_str(&text)
        .map_err(|e| AdminError::usage(format!("profile {shown}: {}", toml_error(&text, &e))))
}

/// The key service URL: `https://` only (the API requires mutual TLS),
/// without a trailing slash, path, query or credentials.
fn check_url(url: &str) -> Result<String, AdminError> {
    // Errors show the URL without anything before an `@`: a password put
    // there by mistake must not reach a terminal or a CI log.
    let shown = hsm_adapters::endpoint_without_userinfo(url.trim());
    let parsed = reqwest::Url::parse(url.trim())
        .map_err(|e| AdminError::usage(format!("key service URL {shown:?}: {e}")))?;
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(AdminError::usage(
            "key service URL: must not hold credentials (the admin certificate is the identity)",
        ));
    }
    if parsed.scheme() != "https" {
        return Err(AdminError::usage(format!(
            "key service URL {shown:?}: must be https:// (the key service requires mutual TLS)"
        )));
    }
    if parsed.query().is_some() || parsed.fragment().is_some() {
        return Err(AdminError::usage(format!(
            "key service URL {shown:?}: must not have a query or fragment"
        )));
    }
    Ok(parsed.as_str().trim_end_matches('/').to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(profile: Option<PathBuf>) -> ConnectionArgs {
        ConnectionArgs { profile, url: None, ca: None, cert: None, key: None, timeout: 30 }
    }

    #[test]
    fn flags_override_the_profile_and_paths_resolve_against_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin.toml");
        std::fs::write(
            &path,
            "url = \"https://ks.internal:8443/\"\nca = \"ca.crt\"\ncert = \"/abs/admin.crt\"\nkey = \"admin.key\"\n",
        )
        .unwrap();
        let c = resolve(&args(Some(path.clone()))).unwrap();
        assert_eq!(c.url, "https://ks.internal:8443");
        assert_eq!(c.ca, dir.path().join("ca.crt"));
        assert_eq!(c.cert, PathBuf::from("/abs/admin.crt"));
        let mut a = args(Some(path));
        a.url = Some("https://other:9".into());
        a.key = Some("k.pem".into());
        let c = resolve(&a).unwrap();
        assert_eq!(c.url, "https://other:9");
        assert_eq!(c.key, PathBuf::from("k.pem"));
    }

    #[test]
    fn bad_profiles_are_usage_errors() {
        let dir = tempfile::tempdir().unwrap();
        let missing = resolve(&args(Some(dir.path().join("absent.toml")))).unwrap_err();
        assert_eq!(missing.failure(), super::super::error::Failure::Usage);
        assert!(missing.to_string().contains("absent.toml"), "{missing}");
        let path = dir.path().join("admin.toml");
        std::fs::write(&path, "url = \"https://x\"\npassword = \"hunter2\"\n").unwrap();
        let e = resolve(&args(Some(path.clone()))).unwrap_err().to_string();
        assert!(e.contains("line 2") && !e.contains("hunter2"), "{e}");
        std::fs::write(&path, "url = \"http://x\"\nca = \"a\"\ncert = \"b\"\nkey = \"c\"\n")
            .unwrap();
        let e = resolve(&args(Some(path.clone()))).unwrap_err().to_string();
        assert!(e.contains("https"), "{e}");
        std::fs::write(&path, "url = \"https://x\"\n").unwrap();
        let e = resolve(&args(Some(path))).unwrap_err().to_string();
        assert!(e.contains("--ca") && e.contains("KEYGATE_ADMIN_CA"), "{e}");
    }

    #[test]
    fn a_password_in_the_url_never_reaches_an_error() {
        for url in [
            "http://admin:s3cret@ks.internal:8443",
            "https://admin:s3cret@ks.internal:8443",
            "https://admin:s3cret@[not-an-address",
            "ftp://admin:s3cret@ks.internal",
            "https://admin:s3cret@ks.internal/?q=1",
        ] {
            let e = check_url(url).unwrap_err().to_string();
            assert!(!e.contains("s3cret"), "{url}: {e}");
        }
    }
}
