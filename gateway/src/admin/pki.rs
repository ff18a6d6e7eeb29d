//! `keygate admin pki init|issue`: a development CA on disk and the
//! certificates keygate's processes and admins present. Private keys are
//! written `0600` (never printed); nothing is overwritten.
//! The CA is [`crate::pki::DevCa`], saved to and loaded from PEM files.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde_json::json;

use super::Ctx;
use super::args::PkiCommand;
use super::error::AdminError;
use super::output::{emit_line, io_reason};
use crate::pki::{DevCa, Validity};

const CA_CERT: &str = "ca.crt";
const CA_KEY: &str = "ca.key";

pub(crate) fn run(ctx: &Ctx, command: PkiCommand) -> Result<(), AdminError> {
    match command {
        PkiCommand::Init { dir, server_names, days } => init(ctx, &dir, &server_names, days),
        PkiCommand::Issue { dir, identity, out, days } => {
            issue(ctx, &dir, &identity, out.as_deref(), days)
        }
    }
}

fn init(ctx: &Ctx, dir: &Path, server_names: &[String], days: u64) -> Result<(), AdminError> {
    if dir.join(CA_CERT).exists() || dir.join(CA_KEY).exists() {
        return Err(AdminError::usage(format!(
            "{} already holds a CA ({CA_CERT}); issue certificates from it with `pki issue`, \
             or choose another --dir",
            dir.display()
        )));
    }
    crate::claim::create_private_dir(dir)
        .map_err(|e| AdminError::usage(format!("{}: {}", dir.display(), io_reason(&e))))?;
    let ca = DevCa::generate("keygate development CA").map_err(pki_error)?;
    let names: Vec<&str> = server_names.iter().map(String::as_str).collect();
    let server = ca.issue_server(&names, Validity::days(days)).map_err(pki_error)?;

    write_new(&dir.join(CA_CERT), ca.cert_pem(), false)?;
    write_new(&dir.join(CA_KEY), &ca.key_pem(), true)?;
    write_new(&dir.join("server.crt"), &server.cert_pem, false)?;
    write_new(&dir.join("server.key"), &server.key_pem, true)?;
    let files = [CA_CERT, CA_KEY, "server.crt", "server.key"];
    let value = json!({
        "dir": dir.display().to_string(),
        "files": files,
        "server_names": server_names,
    });
    emit_line(
        ctx.output,
        &value,
        &format!(
            "created a DEVELOPMENT CA in {dir}: {CA_CERT}, {CA_KEY} (0600), server.crt and \
             server.key (0600) for {names}; issue client certificates with `keygate admin pki issue`",
            dir = dir.display(),
            names = server_names.join(", ")
        ),
    )
}

fn issue(
    ctx: &Ctx,
    dir: &Path,
    identity: &str,
    out: Option<&str>,
    days: u64,
) -> Result<(), AdminError> {
    check_identity(identity)?;
    let name = match out {
        Some(name) => check_name(name)?.to_owned(),
        None => default_name(identity),
    };
    let (crt_path, key_path) = (dir.join(format!("{name}.crt")), dir.join(format!("{name}.key")));
    for path in [&crt_path, &key_path] {
        if path.exists() {
            return Err(AdminError::usage(format!(
                "{} exists; choose another --out",
                path.display()
            )));
        }
    }
    let ca = load_ca(dir)?;
    let issued = ca
        .issue_client(identity, Validity::days(days))
        .map_err(|_| AdminError::usage(format!("--identity {identity:?}: not a usable URI")))?;
    write_new(&crt_path, &issued.cert_pem, false)?;
    write_new(&key_path, &issued.key_pem, true)?;
    let value = json!({
        "identity": identity,
        "cert": crt_path.display().to_string(),
        "key": key_path.display().to_string(),
        "days": days,
    });
    emit_line(
        ctx.output,
        &value,
        &format!(
            "issued a client certificate for {identity}: {} and {} (0600), valid {days} days",
            crt_path.display(),
            key_path.display()
        ),
    )
}

/// Loads the CA written by `pki init`; its key must be private to its owner.
fn load_ca(dir: &Path) -> Result<DevCa, AdminError> {
    let read = |name: &str| {
        let path = dir.join(name);
        std::fs::read_to_string(&path).map_err(|e| {
            AdminError::usage(format!(
                "{}: {} (create a CA with `pki init`)",
                path.display(),
                io_reason(&e)
            ))
        })
    };
    let key_path = dir.join(CA_KEY);
    let mode = std::fs::metadata(&key_path)
        .map_err(|e| AdminError::usage(format!("{}: {}", key_path.display(), io_reason(&e))))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(AdminError::usage(format!(
            "{} is readable by others (mode {:o}); chmod 600 it",
            key_path.display(),
            mode & 0o777
        )));
    }
    let cert_pem = read(CA_CERT)?;
    let key_pem = zeroize::Zeroizing::new(read(CA_KEY)?);
    DevCa::from_pem(&cert_pem, &key_pem).map_err(|_| {
        AdminError::usage(format!(
            "{} / {CA_KEY}: not a PEM CA certificate and its private key",
            dir.join(CA_CERT).display()
        ))
    })
}

fn pki_error(e: crate::pki::PkiError) -> AdminError {
    AdminError::usage(e.to_string())
}

/// Writes a new file (never overwriting), `0600` if `private`.
fn write_new(path: &PathBuf, contents: &str, private: bool) -> Result<(), AdminError> {
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if private { 0o600 } else { 0o644 })
        .open(path)
        .and_then(|mut f| f.write_all(contents.as_bytes()).and_then(|()| f.sync_all()))
        .map_err(|e| AdminError::usage(format!("{}: {}", path.display(), io_reason(&e))))
}

/// An identity is a URI the key service takes as one (`spiffe://…`):
/// `scheme://authority/path` in plain ASCII, lowercase where identities
/// are compared without case (see `tls::uri_identity`). A certificate for
/// anything else would name no usable identity.
fn check_identity(identity: &str) -> Result<(), AdminError> {
    if crate::tls::uri_identity(identity).as_deref() != Some(identity) {
        return Err(AdminError::usage(format!(
            "--identity {identity:?}: not an identity the key service takes, such as \
             spiffe://prod/ns/onc/sa/api (scheme://authority/path in plain ASCII, scheme and \
             authority lowercase, no empty, '.' or '..' segment, no '%', '?', '#' or '*')"
        )));
    }
    Ok(())
}

/// A file name stem: letters, digits, `.`, `_`, `-`; not starting with `.`.
fn check_name(name: &str) -> Result<&str, AdminError> {
    let valid = !name.is_empty()
        && name.len() <= 100
        && !name.starts_with('.')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    if valid {
        Ok(name)
    } else {
        Err(AdminError::usage(format!(
            "--out {name:?}: use letters, digits, '.', '_' and '-' (a name, not a path)"
        )))
    }
}

/// The identity's last path segment as a file name, else `client`.
fn default_name(identity: &str) -> String {
    let last = identity.trim_end_matches('/').rsplit(['/', ':']).next().unwrap_or_default();
    let name: String = last
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || "_-".contains(c) { c } else { '_' })
        .collect();
    if name.is_empty() { "client".to_owned() } else { name }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_identities() {
        assert_eq!(default_name("spiffe://prod/ns/onc/sa/api"), "api");
        assert_eq!(default_name("spiffe://test/admin/"), "admin");
        assert_eq!(default_name("urn:x"), "x");
        assert!(check_identity("spiffe://prod/x").is_ok());
        assert!(check_identity("not a uri").is_err());
        assert!(check_identity("admin").is_err());
        assert!(check_identity("spiffe:").is_err());
        // What the key service would take as no identity, or as another.
        for refused in
            ["urn:keygate:alice", "spiffe://test/admin/", "SPIFFE://test/a", "spiffe://t/a/../b"]
        {
            assert!(check_identity(refused).is_err(), "{refused}");
        }
        assert!(check_name("../etc/passwd").is_err());
        assert!(check_name(".hidden").is_err());
        assert!(check_name("alice-2").is_ok());
    }
}
