//! Several key-service replicas on one PostgreSQL database (each test in
//! its own schema, dropped afterwards), sharing one PKI and master key.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use crate::keyservice::{KeyService, Options, Pki};

/// The database tests use: `KEYGATE_TEST_PG_URL`, else the machine's server.
pub fn pg_url() -> String {
    std::env::var("KEYGATE_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// Runs SQL through `psql` against the test database.
pub fn psql(sql: &str) {
    let out = Command::new("psql")
        .arg(pg_url())
        .args(["-v", "ON_ERROR_STOP=1", "-q", "-c", sql])
        .output()
        .unwrap_or_else(|e| panic!("psql: {e} (install postgresql-client)"));
    assert!(
        out.status.success(),
        "psql failed (is PostgreSQL running? `pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`): {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A schema of its own, dropped when this is dropped.
pub struct PgSchema {
    /// Schema name.
    pub name: String,
}

impl PgSchema {
    /// Names `kg_test_<random>` (the key service creates it at first
    /// start); checks that PostgreSQL answers.
    pub fn create() -> Self {
        psql("SELECT 1");
        let random = kms_core::crypto::rng::array::<6>().unwrap();
        Self { name: format!("kg_test_{}", data_encoding_hex(&random)) }
    }
}

impl Drop for PgSchema {
    fn drop(&mut self) {
        let _ = Command::new("psql")
            .arg(pg_url())
            .args(["-q", "-c", &format!("DROP SCHEMA IF EXISTS {} CASCADE", self.name)])
            .output();
    }
}

fn data_encoding_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Replicas on one schema.
pub struct Cluster {
    /// The shared PKI.
    pub pki: Arc<Pki>,
    /// The replicas (`ks-0`, `ks-1`, …).
    pub replicas: Vec<KeyService>,
    /// The schema (dropped last).
    pub schema: PgSchema,
    dir: PathBuf,
}

impl Cluster {
    /// Starts `n` replicas under `dir`; `extra` goes into each config.
    pub fn start(dir: &Path, n: usize, extra: &str) -> Self {
        Self::start_with_env(dir, n, extra, &[])
    }

    /// Like [`Cluster::start`], with environment variables for every
    /// replica (e.g. `SOFTHSM2_CONF` for a PKCS#11 master key).
    pub fn start_with_env(dir: &Path, n: usize, extra: &str, env: &[(&str, &str)]) -> Self {
        let schema = PgSchema::create();
        let pki = Arc::new(Pki::create(&dir.join("pki")));
        let url = pg_url();
        let root = format!(
            "[root]\nprovider = \"dev_local\"\nkey_file = \"{}\"\ncreate_if_missing = true\n",
            dir.join("root.key").display()
        );
        let mut replicas = Vec::with_capacity(n);
        for i in 0..n {
            let instance = format!("ks-{i}");
            // One at a time: the first creates the root key and migrates.
            replicas.push(KeyService::start_with(
                &dir.join(&instance),
                &Options {
                    extra,
                    root: Some(&root),
                    pki: Some(pki.clone()),
                    instance: Some(&instance),
                    storage_url: Some(&url),
                    storage_schema: Some(&schema.name),
                    env,
                },
            ));
        }
        Self { pki, replicas, schema, dir: dir.to_owned() }
    }

    /// The cluster's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}
