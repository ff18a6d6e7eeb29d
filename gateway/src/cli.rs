//! The `keygate` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{LogFormat, ServerConfig};

/// keygate: key management and field encryption for health data.
#[derive(Debug, Parser)]
#[command(name = "keygate", version, about)]
pub struct Cli {
    /// What to run.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the key service (mutual TLS API, DESIGN §4).
    ///
    /// Example: keygate server --config /etc/keygate/server.toml
    Server {
        /// The configuration file (TOML; every key overridable by KEYGATE_… variables).
        #[arg(long, short, env = "KEYGATE_CONFIG")]
        config: PathBuf,
    },
    /// Run the sidecar beside an application (unix socket or loopback API, DESIGN §5).
    ///
    /// Example: keygate sidecar --config /etc/keygate/sidecar.toml
    Sidecar {
        /// The configuration file (TOML; every key overridable by KEYGATE_… variables).
        #[arg(long, short, env = "KEYGATE_SIDECAR_CONFIG")]
        config: PathBuf,
    },
    /// Security-team operations.
    #[command(subcommand)]
    Admin(AdminCommand),
    /// Run everything on this machine with development defaults (dev CA,
    /// local root key, SQLite) and print curl lines to try it.
    ///
    /// Example: keygate up --dir ./keygate-dev
    Up {
        /// Where to keep keys, certificates, data and configs.
        #[arg(long, default_value = "keygate-dev")]
        dir: PathBuf,
    },
}

/// `keygate admin …`.
#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Master key operations.
    #[command(subcommand)]
    Master(MasterCommand),
}

/// `keygate admin master …`.
#[derive(Debug, Subcommand)]
pub enum MasterCommand {
    /// Create the master key in the HSM named by a key service config's
    /// `[root]` (provider = "pkcs11"): AES-256, sensitive, non-extractable.
    ///
    /// Example: keygate admin master create-pkcs11-key --config server.toml
    CreatePkcs11Key {
        /// A key service configuration file with a pkcs11 `[root]`.
        #[arg(long, short)]
        config: PathBuf,
    },
}

/// Exit code for a bad configuration (EX_CONFIG).
const EXIT_CONFIG: u8 = 78;
/// Exit code for a failure to start or run.
const EXIT_FAILURE: u8 = 1;

/// Parses the command line and runs it.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Server { config } => {
            let config = match ServerConfig::load(&config) {
                Ok(c) => c,
                Err(e) => return config_error(&e),
            };
            init_logging(&config.log.level, config.log.format);
            block_on(crate::server::run(config))
        }
        Command::Sidecar { config } => {
            let config = match crate::sidecar::SidecarConfig::load(&config) {
                Ok(c) => c,
                Err(e) => return config_error(&e),
            };
            init_logging(&config.log.level, config.log.format);
            block_on(crate::sidecar::run(config))
        }
        Command::Admin(AdminCommand::Master(MasterCommand::CreatePkcs11Key { config })) => {
            let created = ServerConfig::load(&config).and_then(|c| {
                c.root.pkcs11()?.ok_or_else(|| {
                    crate::config::ConfigError::new("[root] is not a pkcs11 provider")
                })
            });
            let pkcs11 = match created {
                Ok(p) => p,
                Err(e) => return config_error(&e),
            };
            match hsm_adapters::Pkcs11RootKey::create_master_key(&pkcs11) {
                Ok(info) => {
                    println!(
                        "created master key {} (CKA_ID {}) in token {}: AES-256, sensitive, non-extractable",
                        info.key_label, info.key_id, info.token_label
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("keygate: {e}");
                    ExitCode::from(EXIT_FAILURE)
                }
            }
        }
        Command::Up { dir } => {
            init_logging("warn", LogFormat::Text);
            block_on(crate::up::run(&dir))
        }
    }
}

fn config_error(e: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("keygate: {e}");
    ExitCode::from(EXIT_CONFIG)
}

fn block_on<E: std::fmt::Display>(
    task: impl std::future::Future<Output = Result<(), E>>,
) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("keygate: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    match runtime.block_on(task) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "keygate failed");
            eprintln!("keygate: {e}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

fn init_logging(level: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_new(level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}
