//! `bridle`, the command-line client of the control plane.
//!
//! Errors are one line on stderr and an exit code that says what kind of
//! failure it was (see [`exit`]); `sandbox exec` exits with the command's
//! own code (128 + N when a signal ended it).
//!
//! One module per subcommand; `conn` holds the options they share and the
//! connection made from them, `render` every view of what the control plane
//! answers (tables, details, JSON), `session` how an agent session is
//! followed (by `agent` and `runs watch`).

mod agent;
mod approvals;
mod args;
mod audit;
mod clock;
mod conn;
mod cp;
mod exec;
pub mod exit;
mod policy;
mod render;
mod runs;
mod sandbox;
mod session;
mod token;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tonic::Status;

use crate::conn::{Dial, GlobalArgs};

#[derive(Parser)]
#[command(name = "bridle", version, about = "Client of the bridle control plane")]
pub struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create, use and remove sandboxes.
    #[command(subcommand)]
    Sandbox(sandbox::SandboxCmd),
    /// Manage API tokens (admin), or show your own.
    #[command(subcommand)]
    Token(token::TokenCmd),
    /// Submit a job file; with --follow, show its progress and output and
    /// exit with the job's code.
    Run {
        file: PathBuf,
        /// The same key returns the same run (default: a new key each time).
        #[arg(long)]
        key: Option<String>,
        #[arg(long, short)]
        follow: bool,
    },
    /// Look at runs.
    #[command(subcommand)]
    Runs(runs::RunsCmd),
    /// Read and verify the audit log (admin, auditor).
    #[command(subcommand)]
    Audit(audit::AuditCmd),
    /// The Cedar policy set in force: show, check or change it.
    #[command(subcommand)]
    Policy(policy::PolicyCmd),
    /// Human approvals: list, show, approve or deny (operator), watch.
    #[command(subcommand)]
    Approvals(approvals::ApprovalsCmd),
    /// Agent sessions: start one with a goal, send it the next message or
    /// a client tool's result, and follow it.
    #[command(subcommand)]
    Agent(agent::AgentCmd),
}

/// Runs the CLI with the process's arguments and returns its exit code.
pub fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bridle: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let code = match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            let code = e.downcast_ref::<Status>().map(exit::exit_code).unwrap_or(1);
            eprintln!("bridle: {}", exit::one_line(&e));
            code
        }
    };
    // Blocking stdin reads must not hold the process open.
    runtime.shutdown_timeout(Duration::from_millis(10));
    std::process::ExitCode::from(code)
}

async fn run(cli: Cli) -> anyhow::Result<u8> {
    // A bad job file or agent task is reported before anything is contacted.
    let job = match &cli.command {
        Command::Run { file, .. } => Some(runs::read_job_file(file)?),
        _ => None,
    };
    let task = match &cli.command {
        Command::Agent(agent::AgentCmd::Run(a)) => Some(agent::task_of(a)?),
        _ => None,
    };
    // An export is verified offline, without a control plane.
    if let Command::Audit(audit::AuditCmd::Verify {
        file: Some(file),
        public_key: Some(key),
    }) = &cli.command
    {
        return audit::verify_export(file, key, cli.global.json());
    }
    let mut c = Dial::new(&cli.global)?.connect().await?;
    match cli.command {
        Command::Sandbox(cmd) => sandbox::run(&mut c, cmd).await,
        Command::Token(cmd) => token::run(&mut c, cmd).await.map(|()| 0),
        Command::Run { key, follow, .. } => runs::submit(&mut c, job, key, follow).await,
        Command::Runs(cmd) => runs::run(&mut c, cmd).await,
        Command::Audit(cmd) => audit::run(&mut c, cmd).await,
        Command::Approvals(cmd) => approvals::run(&mut c, cmd).await,
        Command::Policy(cmd) => policy::run(&mut c, cmd).await,
        Command::Agent(cmd) => agent::run(&mut c, cmd, task).await,
    }
}
