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
                Err(e) => {
                    eprintln!("keygate: {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            init_logging(&config.log.level, config.log.format);
            let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("keygate: cannot start the async runtime: {e}");
                    return ExitCode::from(EXIT_FAILURE);
                }
            };
            match runtime.block_on(crate::server::run(config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %e, "key service failed");
                    eprintln!("keygate: {e}");
                    ExitCode::from(EXIT_FAILURE)
                }
            }
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
