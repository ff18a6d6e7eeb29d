//! The `keygate` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

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
        /// `production`: refuse to start if a compliance check fails
        /// (overrides `profile` in the config).
        #[arg(long, value_enum)]
        profile: Option<crate::compliance::Profile>,
    },
    /// Run the sidecar beside an application (unix socket or loopback API, DESIGN §5).
    ///
    /// Example: keygate sidecar --config /etc/keygate/sidecar.toml
    Sidecar {
        /// The configuration file (TOML; every key overridable by KEYGATE_… variables).
        #[arg(long, short, env = "KEYGATE_SIDECAR_CONFIG")]
        config: PathBuf,
        /// `production`: refuse to start if a compliance check fails
        /// (overrides `profile` in the config).
        #[arg(long, value_enum)]
        profile: Option<crate::compliance::Profile>,
    },
    /// Security-team operations: tenants, keys, master key, shredding with
    /// dual control, rewrap, audit, policy check, development PKI.
    ///
    /// Example: keygate admin --profile ~/.config/keygate/admin.toml tenant list
    // Boxed: the admin commands' arguments dwarf the other subcommands'.
    Admin(Box<crate::admin::AdminArgs>),
    /// Run everything on this machine with development defaults (dev CA,
    /// local root key, SQLite) and print curl lines to try it.
    ///
    /// Example: keygate up --dir ./keygate-dev
    Up {
        /// Where to keep keys, certificates, data and configs.
        #[arg(long, default_value = "keygate-dev")]
        dir: PathBuf,
    },
    /// Print a shell completion script to stdout.
    ///
    /// Example: keygate completions bash > /etc/bash_completion.d/keygate
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// Exit code for a bad configuration (EX_CONFIG).
const EXIT_CONFIG: u8 = 78;
/// Exit code for bad usage (clap's).
const EXIT_USAGE: u8 = 2;
/// Exit code for a failure to start or run.
const EXIT_FAILURE: u8 = 1;

/// Parses the command line and runs it.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(&e),
    };
    if matches!(cli.command, Command::Server { .. } | Command::Sidecar { .. } | Command::Up { .. })
    {
        crate::hygiene::allocate_from_the_os();
    }
    match cli.command {
        Command::Server { config, profile } => {
            let mut config = match ServerConfig::load(&config) {
                Ok(c) => c,
                Err(e) => return config_error(&e),
            };
            config.profile = profile.unwrap_or(config.profile);
            init_logging(&config.log.level, config.log.format);
            config.warn_mistyped_overrides();
            block_on(crate::server::run(config))
        }
        Command::Sidecar { config, profile } => {
            let mut config = match crate::sidecar::SidecarConfig::load(&config) {
                Ok(c) => c,
                Err(e) => return config_error(&e),
            };
            config.profile = profile.unwrap_or(config.profile);
            init_logging(&config.log.level, config.log.format);
            config.warn_mistyped_overrides();
            block_on(crate::sidecar::run(config))
        }
        Command::Admin(args) => crate::admin::run(*args),
        Command::Completions { shell } => {
            let mut command = Cli::command();
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut command, "keygate", &mut script);
            match std::io::Write::write_all(&mut std::io::stdout().lock(), &script) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: cannot write to stdout: {e}");
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

/// Help and version go to stdout (exit 0); a usage error becomes one
/// line on stderr (`error: …`, exit 2) instead of clap's multi-line text.
fn usage_error(e: &clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
        return match e.print() {
            Ok(()) => ExitCode::SUCCESS,
            Err(_) => ExitCode::from(EXIT_FAILURE),
        };
    }
    let rendered = e.render().to_string();
    if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
        let usage = rendered
            .lines()
            .find_map(|l| l.trim().strip_prefix("Usage:"))
            .map_or_else(String::new, |u| format!(": {}", u.trim()));
        eprintln!("error: a subcommand is missing{usage} (see --help)");
    } else {
        eprintln!("{}", usage_line(&rendered));
    }
    ExitCode::from(EXIT_USAGE)
}

/// clap's rendered error on one line: its message and details, without
/// the usage block and the "For more information" trailer.
fn usage_line(rendered: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for line in rendered.lines() {
        let line = line.trim();
        if line.starts_with("Usage:") || line.starts_with("For more information") {
            break;
        }
        if !line.is_empty() {
            parts.push(line);
        }
    }
    let text = parts.join(" ");
    let text = text.strip_prefix("error: ").unwrap_or(&text);
    format!("error: {text} (see --help)")
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
