//! `keygate admin`: the security team's command line.
//!
//! Remote commands talk to the key service over mutual TLS with an admin
//! certificate (`profile` says where the settings come from); `rewrap`
//! talks to a sidecar; `policy check`, `pki` and `master
//! create-pkcs11-key` are local. Every command prints a table or JSON
//! (`output`), and every failure is one line on stderr with exit code
//! 1 (refused / check failed), 2 (bad usage or input) or 3 (unavailable)
//! (`error`). Nothing printed ever holds key material, a private key, a
//! PIN or a bearer token.

mod approvals;
mod args;
mod audit;
mod audit_cursor;
mod client;
mod compliance;
mod error;
mod key;
mod master;
mod output;
mod pki;
mod policy;
mod profile;
mod rewrap;
mod tenant;
mod timefmt;

use std::process::ExitCode;

pub use self::args::{
    AdminArgs, AdminCommand, ApprovalState, ApprovalsCommand, ApproveArgs, AuditCommand,
    ComplianceCommand, ConnectionArgs, DecisionArgs, EXIT_CODES, KeyCommand, KeyState,
    MasterCommand, PkiCommand, PolicyCommand, RewrapArgs, ShredCommand, TenantArg, TenantCommand,
};
use self::client::Client;
use self::error::AdminError;
pub use self::output::OutputFormat;

/// What every command gets: the output format and, on demand, a client.
#[derive(Debug)]
pub(crate) struct Ctx {
    output: OutputFormat,
    connection: ConnectionArgs,
}

impl Ctx {
    /// A key service client from the profile, flags and environment.
    pub(crate) fn client(&self) -> Result<Client, AdminError> {
        Client::new(&profile::resolve(&self.connection)?)
    }
}

/// Runs `keygate admin …` and returns its exit code.
pub fn run(args: AdminArgs) -> ExitCode {
    let ctx = Ctx { output: args.output, connection: args.connection };
    match execute(&ctx, args.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => e.report(),
    }
}

fn execute(ctx: &Ctx, command: AdminCommand) -> Result<(), AdminError> {
    match command {
        // Local commands: no runtime, no key service.
        AdminCommand::Policy(PolicyCommand::Check { file }) => policy::check(ctx, &file),
        AdminCommand::Pki(command) => pki::run(ctx, command),
        AdminCommand::Master(MasterCommand::CreatePkcs11Key { config }) => {
            master::create_pkcs11_key(&config)
        }
        remote => block_on(remote_command(ctx, remote)),
    }
}

async fn remote_command(ctx: &Ctx, command: AdminCommand) -> Result<(), AdminError> {
    match command {
        AdminCommand::Tenant(command) => tenant::run(ctx, command).await,
        AdminCommand::Key(command) => key::run(ctx, command).await,
        AdminCommand::Master(command) => master::run(ctx, command).await,
        AdminCommand::Shred(ShredCommand::Request { tenant, version, reason }) => {
            approvals::shred(ctx, &tenant, version, &reason).await
        }
        AdminCommand::Approvals(ApprovalsCommand::List { state }) => {
            approvals::list(ctx, state).await
        }
        AdminCommand::Approve(approve) => approvals::approve(ctx, &approve).await,
        AdminCommand::Reject(decision) => approvals::reject(ctx, &decision).await,
        AdminCommand::Rewrap(args) => rewrap::run(&args).await,
        AdminCommand::Audit(command) => audit::run(ctx, command).await,
        AdminCommand::Compliance(ComplianceCommand::Report) => compliance::report(ctx).await,
        AdminCommand::Policy(_) | AdminCommand::Pki(_) => {
            Err(AdminError::usage("this command runs locally"))
        }
    }
}

fn block_on(
    task: impl std::future::Future<Output = Result<(), AdminError>>,
) -> Result<(), AdminError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| AdminError::unavailable(format!("cannot start the async runtime: {e}")))?
        .block_on(task)
}
