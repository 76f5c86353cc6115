//! `bridle`, the command-line client of the control plane.
//!
//! Errors are one line on stderr and an exit code that says what kind of
//! failure it was (see [`exit_code`]); `sandbox exec` exits with the
//! command's own code (128 + N when a signal ended it).

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use bridle_proto::control::v1 as pb;
use bridle_proto::sandbox::v1 as agent_pb;
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

#[derive(Parser)]
#[command(name = "bridle", version, about = "Client of the bridle control plane")]
pub struct Cli {
    /// Control-plane address. Default: the `endpoint` file in the data
    /// directory, else http://127.0.0.1:7443.
    #[arg(long, global = true, env = "BRIDLE_ENDPOINT")]
    endpoint: Option<String>,
    /// PEM CA certificate to verify an https endpoint with.
    #[arg(long, global = true, env = "BRIDLE_CA_CERT")]
    ca_cert: Option<PathBuf>,
    /// API token. Default: --token-file.
    #[arg(long, global = true, env = "BRIDLE_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// File holding the API token. Default: <data dir>/admin.token when readable.
    #[arg(long, global = true, env = "BRIDLE_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// The control plane's data directory (to find the endpoint and the
    /// bootstrap token on the same machine).
    #[arg(long, global = true, env = "BRIDLE_DATA_DIR")]
    data_dir: Option<PathBuf>,
    #[arg(long, short, global = true, value_enum, default_value_t = Output::Text)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Create, use and remove sandboxes.
    #[command(subcommand)]
    Sandbox(SandboxCmd),
    /// Manage API tokens (admin), or show your own.
    #[command(subcommand)]
    Token(TokenCmd),
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
    Runs(RunsCmd),
    /// Read and verify the audit log (admin, auditor).
    #[command(subcommand)]
    Audit(AuditCmd),
    /// The Cedar policy set in force: show, check or change it.
    #[command(subcommand)]
    Policy(PolicyCmd),
    /// Human approvals: list, show, approve or deny (operator), watch.
    #[command(subcommand)]
    Approvals(ApprovalsCmd),
}

#[derive(Subcommand)]
enum ApprovalsCmd {
    /// Approvals, newest first (default: pending ones).
    List {
        /// Every state, not only pending.
        #[arg(long)]
        all: bool,
        /// Only those of this run.
        #[arg(long)]
        run: Option<String>,
    },
    /// One approval in full.
    Show { approval_id: String },
    /// Approve (operator; never your own request).
    Approve {
        approval_id: String,
        #[arg(long)]
        reason: String,
    },
    /// Deny (operator; never your own request).
    Deny {
        approval_id: String,
        #[arg(long)]
        reason: String,
    },
    /// Pending approvals now, then each change as it happens.
    Watch,
}

#[derive(Subcommand)]
enum PolicyCmd {
    /// Print the set in force (its version goes to stderr).
    Get,
    /// Check a policy file against the schema; problems as FILE:LINE:COL.
    Validate { file: PathBuf },
    /// Put a policy file in force as the next version (admin).
    Set {
        file: PathBuf,
        /// Refuse if the version in force is not this one.
        #[arg(long)]
        expected_version: Option<u64>,
    },
}

#[derive(Subcommand)]
enum AuditCmd {
    /// Check the hash chain and the signed checkpoints: names the first bad
    /// entry and exits 1. With --file, checks an export offline.
    Verify {
        /// An export (`bridle audit export > F`) to check without a server.
        #[arg(long, requires = "public_key")]
        file: Option<PathBuf>,
        /// The control plane's public key file (`<data dir>/audit.pub`).
        #[arg(long)]
        public_key: Option<PathBuf>,
    },
    /// The whole log as JSON lines, with hashes and signed checkpoints.
    Export,
    /// Entries, oldest first.
    Query {
        /// Only this token id or principal name.
        #[arg(long)]
        principal: Option<String>,
        /// Only actions starting with this (e.g. `Runs/`).
        #[arg(long)]
        action: Option<String>,
        /// Only entries about this resource.
        #[arg(long)]
        resource: Option<String>,
        /// Only entries of this run: calls about it, its steps' policy
        /// decisions, its approvals.
        #[arg(long)]
        run: Option<String>,
        /// Only entries newer than this long ago (e.g. `90s`, `15m`, `2h`).
        #[arg(long, value_parser = parse_duration)]
        since: Option<Duration>,
        /// Only entries older than this long ago.
        #[arg(long, value_parser = parse_duration)]
        until: Option<Duration>,
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
}

#[derive(Subcommand)]
enum RunsCmd {
    List {
        /// Only runs in this state (repeatable).
        #[arg(long = "state")]
        states: Vec<String>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    Get {
        id: String,
    },
    /// A step's recorded output (steps are numbered from 1).
    Logs {
        id: String,
        #[arg(long, default_value_t = 1)]
        step: u32,
        #[arg(long, value_parser = ["stdout", "stderr"])]
        stream: Option<String>,
    },
    /// Follow a run's progress and output until it ends; exits with its code.
    Watch {
        id: String,
    },
    Cancel {
        id: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
}

#[derive(Subcommand)]
enum SandboxCmd {
    /// Create a sandbox; prints its id.
    Create(CreateArgs),
    List {
        /// Only sandboxes with this label (repeatable).
        #[arg(long = "label", value_name = "KEY=VALUE")]
        labels: Vec<String>,
    },
    Get {
        id: String,
    },
    /// Run a command; stdin, a terminal, signals and the exit code pass through.
    Exec(ExecArgs),
    /// Copy a file in or out: `cp ./file ID:path`, `cp ID:path ./file` (`-` is stdin/stdout).
    Cp {
        src: String,
        dst: String,
    },
    /// Store a snapshot of the workspace; prints its id.
    Snapshot {
        id: String,
        /// Subpath of the workspace.
        #[arg(long, default_value = "")]
        path: String,
        /// Glob to leave out (repeatable).
        #[arg(long)]
        exclude: Vec<String>,
    },
    /// List your snapshots.
    Snapshots,
    /// Delete a snapshot.
    RmSnapshot {
        id: String,
    },
    /// A new sandbox with a copy of this one's workspace; prints its id.
    Fork {
        id: String,
        #[arg(long, value_parser = parse_duration)]
        ttl: Option<Duration>,
    },
    Pause {
        id: String,
    },
    Resume {
        id: String,
    },
    /// Delete sandboxes (container, workspace and all).
    Rm {
        #[arg(required = true)]
        ids: Vec<String>,
    },
}

#[derive(Args)]
struct CreateArgs {
    #[arg(long)]
    image: Option<String>,
    /// Memory limit: 512m, 2g, or bytes.
    #[arg(long, value_parser = parse_size)]
    memory: Option<u64>,
    /// CPU limit in CPUs: 0.5, 2.
    #[arg(long)]
    cpus: Option<f64>,
    #[arg(long)]
    pids: Option<u64>,
    /// Size of the workspace's filesystem: 256m, 4g (the server's limit
    /// applies).
    #[arg(long, value_parser = parse_size)]
    disk: Option<u64>,
    #[arg(long, value_parser = ["none", "bridge"])]
    network: Option<String>,
    /// Environment for every exec (repeatable).
    #[arg(long = "env", short = 'e', value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// Delete the sandbox after this long: 30m, 2h, 1d.
    #[arg(long, value_parser = parse_duration)]
    ttl: Option<Duration>,
    /// Delete the sandbox after this long without use.
    #[arg(long, value_parser = parse_duration)]
    idle_timeout: Option<Duration>,
    #[arg(long)]
    from_snapshot: Option<String>,
    #[arg(long = "label", value_name = "KEY=VALUE")]
    labels: Vec<String>,
}

#[derive(Args)]
struct ExecArgs {
    id: String,
    /// Allocate a terminal even when not attached to one.
    #[arg(short = 't', long)]
    tty: bool,
    /// Never allocate a terminal.
    #[arg(short = 'T', long, conflicts_with = "tty")]
    no_tty: bool,
    #[arg(long = "env", short = 'e', value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// Working directory, relative to the workspace.
    #[arg(long, short = 'w', default_value = "")]
    workdir: String,
    /// Stop the command (and everything it started) after this long.
    #[arg(long, value_parser = parse_duration)]
    timeout: Option<Duration>,
    /// Caller-chosen exec id (re-running with the same id attaches instead).
    #[arg(long, default_value = "")]
    exec_id: String,
    /// Start the command and return at once; it keeps running.
    #[arg(long, short = 'd')]
    detach: bool,
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    command: Vec<String>,
}

#[derive(Subcommand)]
enum TokenCmd {
    /// Create a token; prints its secret once.
    Create {
        #[arg(long)]
        name: String,
        #[arg(long, value_parser = ["admin", "operator", "submitter", "auditor"])]
        role: String,
        /// Tenant the token acts for (default: its name).
        #[arg(long, default_value = "")]
        owner: String,
        #[arg(long, value_parser = parse_duration)]
        ttl: Option<Duration>,
    },
    List {
        /// Include revoked tokens.
        #[arg(long)]
        all: bool,
    },
    Revoke {
        id: String,
    },
    Whoami,
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
            let code = e.downcast_ref::<Status>().map(exit_code).unwrap_or(1);
            eprintln!("bridle: {}", one_line(&e));
            code
        }
    };
    // Blocking stdin reads must not hold the process open.
    runtime.shutdown_timeout(Duration::from_millis(10));
    std::process::ExitCode::from(code)
}

/// Exit codes by failure kind: 1 other, 2 usage, 3 not found,
/// 4 not authenticated or not allowed, 5 server unreachable or unavailable,
/// 6 refused as invalid or in the wrong state.
pub fn exit_code(s: &Status) -> u8 {
    match s.code() {
        Code::NotFound => 3,
        Code::Unauthenticated | Code::PermissionDenied => 4,
        Code::Unavailable | Code::DeadlineExceeded => 5,
        Code::InvalidArgument
        | Code::FailedPrecondition
        | Code::AlreadyExists
        | Code::ResourceExhausted
        | Code::OutOfRange => 6,
        _ => 1,
    }
}

fn one_line(e: &anyhow::Error) -> String {
    let text = match e.downcast_ref::<Status>() {
        Some(s) => format!("{}: {}", code_name(s.code()), s.message()),
        None => format!("{e:#}"),
    };
    text.replace('\n', " ")
}

fn code_name(c: Code) -> &'static str {
    match c {
        Code::NotFound => "not found",
        Code::Unauthenticated => "not authenticated",
        Code::PermissionDenied => "permission denied",
        Code::Unavailable => "unavailable",
        Code::Cancelled => "cancelled",
        Code::InvalidArgument => "invalid argument",
        Code::FailedPrecondition => "failed precondition",
        Code::ResourceExhausted => "resource exhausted",
        Code::DeadlineExceeded => "deadline exceeded",
        _ => "error",
    }
}

type Authed = InterceptedService<Channel, Bearer>;

#[derive(Clone)]
pub struct Bearer(tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

struct Conn {
    sandboxes: pb::sandboxes_client::SandboxesClient<Authed>,
    admin: pb::admin_client::AdminClient<Authed>,
    runs: pb::runs_client::RunsClient<Authed>,
    audit: pb::audit_client::AuditClient<Authed>,
    approvals: pb::approvals_client::ApprovalsClient<Authed>,
    json: bool,
    /// How this connection was made, to make it again (see [`Conn::redial`]).
    dial: Dial,
}

impl Conn {
    /// Replaces every client with one on a new channel, to the endpoint as
    /// it is now. tonic's `Channel` does reconnect by itself, but only to
    /// the address it was made with, and a control plane restarted with
    /// `--listen …:0` writes another one into its `endpoint` file.
    async fn redial(&mut self) -> anyhow::Result<()> {
        *self = self.dial.connect().await?;
        Ok(())
    }
}

fn data_dir(cli: &Cli) -> PathBuf {
    cli.data_dir
        .clone()
        .unwrap_or_else(crate::config::default_data_dir)
}

/// What it takes to reach the control plane: the flags, with the token read
/// once (the bootstrap token does not change when the control plane
/// restarts; its endpoint may).
#[derive(Clone)]
struct Dial {
    /// --endpoint; without it, the data directory's `endpoint` file is read
    /// at each dial.
    endpoint: Option<String>,
    data_dir: PathBuf,
    ca_cert: Option<PathBuf>,
    bearer: Bearer,
    json: bool,
}

impl Dial {
    fn new(cli: &Cli) -> anyhow::Result<Self> {
        let token = match (&cli.token, &cli.token_file) {
            (Some(t), _) => t.clone(),
            (None, Some(f)) => std::fs::read_to_string(f)
                .with_context(|| format!("reading the token file {}", f.display()))?
                .trim()
                .to_string(),
            (None, None) => {
                let f = data_dir(cli).join(crate::auth::BOOTSTRAP_TOKEN_FILE);
                std::fs::read_to_string(&f)
                    .map(|s| s.trim().to_string())
                    .map_err(|_| {
                        anyhow!(
                            "no token: set BRIDLE_TOKEN, --token or --token-file ({} is not readable)",
                            f.display()
                        )
                    })?
            }
        };
        let value = format!("Bearer {token}")
            .parse()
            .map_err(|_| anyhow!("the token contains characters a header cannot carry"))?;
        Ok(Self {
            endpoint: cli.endpoint.clone(),
            data_dir: data_dir(cli),
            ca_cert: cli.ca_cert.clone(),
            bearer: Bearer(value),
            json: cli.output == Output::Json,
        })
    }

    fn endpoint(&self) -> String {
        match &self.endpoint {
            Some(e) => e.clone(),
            None => std::fs::read_to_string(self.data_dir.join(crate::config::ENDPOINT_FILE))
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| "http://127.0.0.1:7443".into()),
        }
    }

    async fn connect(&self) -> anyhow::Result<Conn> {
        let endpoint = self.endpoint();
        let mut ep = Endpoint::from_shared(endpoint.clone())
            .with_context(|| format!("bad endpoint {endpoint:?}"))?;
        if endpoint.starts_with("https://") {
            let ca = self.ca_cert.as_ref().ok_or_else(|| {
                anyhow!(
                    "{endpoint} is https: give the CA certificate with --ca-cert or BRIDLE_CA_CERT"
                )
            })?;
            let pem = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
            ep = ep
                .tls_config(
                    tonic::transport::ClientTlsConfig::new()
                        .ca_certificate(tonic::transport::Certificate::from_pem(pem)),
                )
                .context("configuring TLS")?;
        }
        let channel = ep
            .connect_timeout(Duration::from_secs(5))
            .initial_stream_window_size(8 << 20)
            .initial_connection_window_size(16 << 20)
            .connect()
            .await
            .map_err(|e| {
                anyhow::Error::new(Status::unavailable(format!(
                    "cannot reach the control plane at {endpoint}: {e}"
                )))
            })?;
        let bearer = self.bearer.clone();
        Ok(Conn {
            sandboxes: pb::sandboxes_client::SandboxesClient::with_interceptor(
                channel.clone(),
                bearer.clone(),
            )
            .max_decoding_message_size(16 << 20)
            .max_encoding_message_size(16 << 20),
            admin: pb::admin_client::AdminClient::with_interceptor(channel.clone(), bearer.clone()),
            audit: pb::audit_client::AuditClient::with_interceptor(channel.clone(), bearer.clone()),
            approvals: pb::approvals_client::ApprovalsClient::with_interceptor(
                channel.clone(),
                bearer.clone(),
            ),
            runs: pb::runs_client::RunsClient::with_interceptor(channel, bearer)
                .max_decoding_message_size(16 << 20)
                .max_encoding_message_size(64 << 20),
            json: self.json,
            dial: self.clone(),
        })
    }
}

async fn connect(cli: &Cli) -> anyhow::Result<Conn> {
    Dial::new(cli)?.connect().await
}

async fn run(cli: Cli) -> anyhow::Result<u8> {
    // A bad job file is reported before anything is contacted.
    let job = match &cli.command {
        Command::Run { file, .. } => {
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("reading {}", file.display()))?;
            Some(
                crate::runs::job::parse_job_file(file, &text, |k| std::env::var(k).ok())
                    .map_err(|e| anyhow::Error::new(Status::invalid_argument(e)))?,
            )
        }
        _ => None,
    };
    // An export is verified offline, without a control plane.
    if let Command::Audit(AuditCmd::Verify {
        file: Some(file),
        public_key: Some(key),
    }) = &cli.command
    {
        return verify_export(file, key, cli.output == Output::Json);
    }
    let mut c = connect(&cli).await?;
    match cli.command {
        Command::Sandbox(cmd) => sandbox(&mut c, cmd).await,
        Command::Token(cmd) => token(&mut c, cmd).await.map(|()| 0),
        Command::Run { key, follow, .. } => {
            let key = key.unwrap_or_else(|| crate::ids::random_hex(16));
            let r = c
                .runs
                .submit(pb::SubmitRunRequest {
                    idempotency_key: key,
                    job,
                })
                .await?
                .into_inner();
            if !follow {
                if c.json {
                    print_json(run_json(&r));
                } else {
                    println!("{}", r.id);
                }
                return Ok(0);
            }
            eprintln!("bridle: run {}", r.id);
            follow_run(&mut c, &r.id).await
        }
        Command::Runs(cmd) => runs(&mut c, cmd).await,
        Command::Audit(cmd) => audit(&mut c, cmd).await,
        Command::Approvals(cmd) => approvals(&mut c, cmd).await,
        Command::Policy(cmd) => policy(&mut c, cmd).await,
    }
}

async fn policy(c: &mut Conn, cmd: PolicyCmd) -> anyhow::Result<u8> {
    let read = |file: &Path| {
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))
    };
    match cmd {
        PolicyCmd::Get => {
            let p = c
                .admin
                .get_policy(pb::GetPolicyRequest {})
                .await?
                .into_inner();
            if c.json {
                print_json(json!({
                    "version": p.version, "source": p.source,
                    "set_by": p.set_by, "set_unix_ms": p.set_unix_ms,
                }));
            } else {
                eprintln!("bridle: policy version {} (set by {})", p.version, p.set_by);
                print!("{}", p.source);
            }
            Ok(0)
        }
        PolicyCmd::Validate { file } => {
            let source = read(&file)?;
            let r = c
                .admin
                .validate_policy(pb::ValidatePolicyRequest { source })
                .await?
                .into_inner();
            if r.ok {
                println!("ok");
                return Ok(0);
            }
            for p in &r.problems {
                eprintln!(
                    "{}:{}:{}: {}",
                    file.display(),
                    p.line,
                    p.column,
                    p.message.replace('\n', " ")
                );
            }
            Ok(6)
        }
        PolicyCmd::Set {
            file,
            expected_version,
        } => {
            let source = read(&file)?;
            let p = c
                .admin
                .set_policy(pb::SetPolicyRequest {
                    source,
                    expected_version: expected_version.unwrap_or(0),
                })
                .await?
                .into_inner();
            println!("{}", p.version);
            Ok(0)
        }
    }
}

fn audit_verdict(
    json: bool,
    ok: bool,
    entries: u64,
    checkpoints: u64,
    bad: u64,
    problem: &str,
) -> u8 {
    if json {
        print_json(json!({
            "ok": ok,
            "entries": entries,
            "checkpoints": checkpoints,
            "first_bad_seq": bad,
            "problem": problem,
        }));
    }
    if ok {
        if !json {
            println!("ok: {entries} entries, {checkpoints} signed checkpoints");
        }
        0
    } else {
        eprintln!("bridle: audit log: entry {bad}: {problem}");
        1
    }
}

fn verify_export(file: &Path, key: &Path, json: bool) -> anyhow::Result<u8> {
    let key = std::fs::read_to_string(key).with_context(|| format!("reading {}", key.display()))?;
    let key = crate::audit::parse_public_key(&key).context("--public-key")?;
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let mut lines = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        lines.push(serde_json::from_str(line).map_err(|e| {
            anyhow::Error::new(Status::invalid_argument(format!(
                "{}:{}: not an audit export line: {e}",
                file.display(),
                n + 1
            )))
        })?);
    }
    let r = crate::audit::verify(lines, &key);
    let (bad, problem) = r.first_bad.clone().unwrap_or_default();
    Ok(audit_verdict(
        json,
        r.ok(),
        r.entries,
        r.checkpoints,
        bad,
        &problem,
    ))
}

fn approval_state_name(s: i32) -> &'static str {
    match pb::ApprovalState::try_from(s) {
        Ok(pb::ApprovalState::Pending) => "pending",
        Ok(pb::ApprovalState::Approved) => "approved",
        Ok(pb::ApprovalState::Denied) => "denied",
        Ok(pb::ApprovalState::Expired) => "expired",
        _ => "unknown",
    }
}

fn approval_json(a: &pb::Approval) -> serde_json::Value {
    json!({
        "id": a.id, "state": approval_state_name(a.state),
        "requested_by": a.requested_by, "requested_by_token": a.requested_by_token,
        "owner": a.owner, "action": a.action, "resource": a.resource, "summary": a.summary,
        "run_id": a.run_id, "step": a.step, "action_sha256": a.action_sha256,
        "policy": a.policy, "policy_reason": a.policy_reason, "policy_version": a.policy_version,
        "created_unix_ms": a.created_unix_ms, "expires_unix_ms": a.expires_unix_ms,
        "decided_by": a.decided_by, "decision_reason": a.decision_reason,
        "decided_unix_ms": a.decided_unix_ms, "used": a.used,
    })
}

fn approval_line(a: &pb::Approval) -> String {
    format!(
        "{:<20} {:<9} {:<16} {}",
        a.id,
        approval_state_name(a.state),
        a.requested_by,
        a.summary
    )
}

async fn approvals(c: &mut Conn, cmd: ApprovalsCmd) -> anyhow::Result<u8> {
    match cmd {
        ApprovalsCmd::List { all, run } => {
            let r = c
                .approvals
                .list(pb::ListApprovalsRequest {
                    states: if all {
                        vec![]
                    } else {
                        vec![pb::ApprovalState::Pending as i32]
                    },
                    run_id: run.unwrap_or_default(),
                    page_size: 1000,
                    ..Default::default()
                })
                .await?
                .into_inner();
            if c.json {
                print_json(serde_json::Value::Array(
                    r.approvals.iter().map(approval_json).collect(),
                ));
            } else {
                println!("{:<20} {:<9} {:<16} ACTION", "ID", "STATE", "REQUESTED BY");
                for a in &r.approvals {
                    println!("{}", approval_line(a));
                }
            }
            Ok(0)
        }
        ApprovalsCmd::Show { approval_id } => {
            let a = c
                .approvals
                .get(pb::GetApprovalRequest { approval_id })
                .await?
                .into_inner();
            if c.json {
                print_json(approval_json(&a));
            } else {
                println!("id:           {}", a.id);
                println!("state:        {}", approval_state_name(a.state));
                println!("action:       {}", a.summary);
                println!(
                    "requested by: {} ({})",
                    a.requested_by, a.requested_by_token
                );
                if !a.run_id.is_empty() {
                    println!("run:          {} step {}", a.run_id, a.step + 1);
                }
                println!(
                    "policy:       {} (version {}): {}",
                    a.policy, a.policy_version, a.policy_reason
                );
                println!("action hash:  {}", a.action_sha256);
                let left = (a.expires_unix_ms - crate::clock::now_ms()) / 1000;
                let when = if left > 0 {
                    format!("in {}m {}s", left / 60, left % 60)
                } else {
                    format!("{}m {}s ago", -left / 60, -left % 60)
                };
                println!("expires:      {when} (unix ms {})", a.expires_unix_ms);
                if !a.decided_by.is_empty() {
                    println!("decided by:   {}: {}", a.decided_by, a.decision_reason);
                }
                if a.used {
                    println!("used:         yes");
                }
            }
            Ok(0)
        }
        ApprovalsCmd::Approve {
            approval_id,
            reason,
        }
        | ApprovalsCmd::Deny {
            approval_id,
            reason,
        } if reason.trim().is_empty() => {
            let _ = approval_id;
            bail!("--reason must say why")
        }
        ApprovalsCmd::Approve {
            approval_id,
            reason,
        } => decide(c, approval_id, true, reason).await,
        ApprovalsCmd::Deny {
            approval_id,
            reason,
        } => decide(c, approval_id, false, reason).await,
        ApprovalsCmd::Watch => watch_approvals(c).await,
    }
}

async fn decide(
    c: &mut Conn,
    approval_id: String,
    approve: bool,
    reason: String,
) -> anyhow::Result<u8> {
    let a = c
        .approvals
        .decide(pb::DecideApprovalRequest {
            approval_id,
            approve,
            reason,
        })
        .await?
        .into_inner();
    if c.json {
        print_json(approval_json(&a));
    } else {
        println!("{} {}", a.id, approval_state_name(a.state));
    }
    Ok(0)
}

async fn audit(c: &mut Conn, cmd: AuditCmd) -> anyhow::Result<u8> {
    match cmd {
        AuditCmd::Verify { .. } => {
            let r = c
                .audit
                .verify(pb::VerifyAuditRequest {})
                .await?
                .into_inner();
            Ok(audit_verdict(
                c.json,
                r.ok,
                r.entries,
                r.checkpoints,
                r.first_bad_seq,
                &r.problem,
            ))
        }
        AuditCmd::Export => {
            let mut s = c
                .audit
                .export(pb::ExportAuditRequest {})
                .await?
                .into_inner();
            let mut out = std::io::stdout().lock();
            while let Some(chunk) = s.message().await? {
                std::io::Write::write_all(&mut out, &chunk.data)?;
            }
            Ok(0)
        }
        AuditCmd::Query {
            principal,
            action,
            resource,
            run,
            since,
            until,
            limit,
        } => {
            let ago = |d: Option<Duration>| {
                d.map_or(0, |d| {
                    (crate::clock::now_ms() - d.as_millis() as i64).max(1)
                })
            };
            let r = c
                .audit
                .query(pb::QueryAuditRequest {
                    principal: principal.unwrap_or_default(),
                    action: action.unwrap_or_default(),
                    resource: resource.unwrap_or_default(),
                    run_id: run.unwrap_or_default(),
                    since_unix_ms: ago(since),
                    until_unix_ms: ago(until),
                    page_size: limit,
                    ..Default::default()
                })
                .await?
                .into_inner();
            if c.json {
                print_json(serde_json::Value::Array(
                    r.entries
                        .iter()
                        .map(|e| {
                            json!({
                                "seq": e.seq, "unix_ms": e.unix_ms, "request_id": e.request_id,
                                "token_id": e.token_id, "principal": e.principal, "role": e.role,
                                "owner": e.owner, "action": e.action, "resource": e.resource,
                                "decision": e.decision, "policy_version": e.policy_version,
                                "outcome": e.outcome, "hash": e.hash,
                            })
                        })
                        .collect(),
                ));
            } else {
                println!(
                    "{:<6} {:<14} {:<20} {:<28} OUTCOME",
                    "SEQ", "TIME(ms)", "PRINCIPAL", "ACTION"
                );
                for e in r.entries {
                    let who = if e.principal.is_empty() {
                        "-"
                    } else {
                        e.principal.as_str()
                    };
                    println!(
                        "{:<6} {:<14} {:<20} {:<28} {}",
                        e.seq, e.unix_ms, who, e.action, e.outcome
                    );
                }
            }
            Ok(0)
        }
    }
}

fn run_state_name(s: i32) -> &'static str {
    match pb::RunState::try_from(s) {
        Ok(pb::RunState::Queued) => "queued",
        Ok(pb::RunState::Provisioning) => "provisioning",
        Ok(pb::RunState::Running) => "running",
        Ok(pb::RunState::Succeeded) => "succeeded",
        Ok(pb::RunState::Failed) => "failed",
        Ok(pb::RunState::Cancelled) => "cancelled",
        Ok(pb::RunState::Interrupted) => "interrupted",
        Ok(pb::RunState::AwaitingApproval) => "awaiting_approval",
        _ => "unknown",
    }
}

fn run_json(r: &pb::Run) -> serde_json::Value {
    json!({
        "id": r.id,
        "owner": r.owner,
        "state": run_state_name(r.state),
        "idempotency_key": r.idempotency_key,
        "sandbox_id": r.sandbox_id,
        "reason": r.reason,
        "created_unix_ms": r.created_unix_ms,
        "finished_unix_ms": r.finished_unix_ms,
        "last_seq": r.last_seq,
        "steps": r.steps.iter().map(|s| json!({
            "name": s.name,
            "state": match pb::StepState::try_from(s.state) {
                Ok(pb::StepState::Pending) => "pending",
                Ok(pb::StepState::Running) => "running",
                Ok(pb::StepState::Succeeded) => "succeeded",
                Ok(pb::StepState::Failed) => "failed",
                Ok(pb::StepState::Skipped) => "skipped",
                _ => "unknown",
            },
            "attempts": s.attempts,
            "exit_code": s.exit_code,
            "signal": s.signal,
            "timed_out": s.timed_out,
            "stdout_bytes": s.stdout_bytes,
            "stderr_bytes": s.stderr_bytes,
        })).collect::<Vec<_>>(),
        "artifacts": r.artifacts.iter().map(|a| json!({
            "path": a.path, "snapshot_id": a.snapshot_id, "sha256": a.sha256, "size_bytes": a.size_bytes,
        })).collect::<Vec<_>>(),
    })
}

/// The exit code a finished run stands for: 0 succeeded, the failing step's
/// code (or 1) failed, 130 cancelled, 75 interrupted.
fn run_exit_code(r: &pb::Run) -> u8 {
    match pb::RunState::try_from(r.state) {
        Ok(pb::RunState::Succeeded) => 0,
        Ok(pb::RunState::Cancelled) => 130,
        Ok(pb::RunState::Interrupted) => 75,
        _ => r
            .steps
            .iter()
            .rev()
            .find(|s| s.state == pb::StepState::Failed as i32)
            .and_then(|s| s.exit_code)
            .filter(|c| *c > 0)
            .map(|c| c.clamp(1, 255) as u8)
            .unwrap_or(1),
    }
}

/// Follows a run to its end and answers the run's exit code. In text, step
/// progress goes to stderr and the steps' output to stdout/stderr; with
/// `-o json`, each event is one JSON object on a line of stdout. When the
/// control plane goes away (a restart, a broken connection), follows again
/// from the first event not yet printed, so nothing shows twice or is lost.
async fn follow_run(c: &mut Conn, id: &str) -> anyhow::Result<u8> {
    let mut follower = RunFollower::new(id, c.json);
    let mut reconnects = Reconnects::new();
    loop {
        let from = follower.next_seq;
        let failure = match follower.follow(c).await {
            Ok(code) => return Ok(code),
            Err(e) => e,
        };
        if follower.next_seq > from {
            reconnects.progressed();
        }
        let again = format!("following run {id} again from event {}", follower.next_seq);
        reconnects.redial(c, failure, &again).await?;
    }
}

/// How far a run's follower got: what it printed, so that following again
/// over a new connection repeats nothing and skips nothing.
struct RunFollower {
    id: String,
    json: bool,
    /// The job's step names, asked for once.
    step_names: Option<Vec<String>>,
    /// The first event not yet printed (the Watch's `from_seq` is inclusive).
    next_seq: u64,
    /// Text: output bytes written so far, by (step, stream).
    written: HashMap<(u32, i32), u64>,
    /// JSON: the start of a character that the last output event of a
    /// (step, stream) cut in two, printed whole with the next one.
    held: HashMap<(u32, i32), Vec<u8>>,
}

impl RunFollower {
    fn new(id: &str, json: bool) -> Self {
        Self {
            id: id.to_string(),
            json,
            step_names: None,
            next_seq: 1,
            written: HashMap::new(),
            held: HashMap::new(),
        }
    }

    /// One attempt: watches from `next_seq` until the run finishes
    /// (answering its exit code) or the stream fails.
    async fn follow(&mut self, c: &mut Conn) -> anyhow::Result<u8> {
        if self.step_names.is_none() {
            let job = get_run(c, &self.id).await?.job;
            self.step_names = Some(
                job.map(|j| j.steps.into_iter().map(|s| s.name).collect())
                    .unwrap_or_default(),
            );
        }
        let mut events = c
            .runs
            .watch(pb::WatchRunRequest {
                run_id: self.id.clone(),
                from_seq: self.next_seq,
            })
            .await?
            .into_inner();
        while let Some(ev) = events.message().await? {
            if ev.seq < self.next_seq {
                continue;
            }
            let finished = if self.json {
                self.print_event_json(c, &ev).await?
            } else {
                self.print_event_text(c, &ev).await?
            };
            if let Some(code) = finished {
                return Ok(code);
            }
            // Only once printed: an event whose output a lost connection
            // cut off is fetched again, from the first byte not written.
            self.next_seq = ev.seq + 1;
        }
        // The server ends the stream after the run's last event; an earlier
        // end means it is going away.
        Err(Status::unavailable("the event stream ended before the run did").into())
    }

    fn step_label(&self, step: u32) -> String {
        let names = self.step_names.as_deref().unwrap_or_default();
        let name = names.get(step as usize).map(String::as_str).unwrap_or("");
        format!("step {}/{} {name}", step + 1, names.len())
    }

    /// Prints an event for a person; answers the run's exit code after its
    /// last event.
    async fn print_event_text(
        &mut self,
        c: &mut Conn,
        ev: &pb::RunEvent,
    ) -> anyhow::Result<Option<u8>> {
        use pb::run_event::Event as E;
        match &ev.event {
            Some(E::StepStarted(s)) => {
                let again = if s.attempt > 1 {
                    format!(" (attempt {})", s.attempt)
                } else {
                    String::new()
                };
                eprintln!("bridle: ▶ {}{again}", self.step_label(s.step))
            }
            Some(E::ApprovalRequested(a)) => {
                let what = if a.for_network {
                    "the run's network".to_string()
                } else {
                    self.step_label(a.step)
                };
                eprintln!(
                    "bridle: ⏸ {what} waits for approval {} (an operator: `bridle approvals approve {} --reason …`)",
                    a.approval_id, a.approval_id
                )
            }
            Some(E::ApprovalDecided(a)) => {
                let by = if a.by.is_empty() {
                    String::new()
                } else {
                    format!(" by {}: {}", a.by, a.reason)
                };
                eprintln!("bridle: approval {} {}{by}", a.approval_id, a.outcome)
            }
            Some(E::StepOutput(o)) => self.write_output(c, o).await?,
            Some(E::StepExited(x)) => {
                let how = match (x.exit_code, x.signal) {
                    _ if !x.spawn_failure.is_empty() => {
                        format!("could not start: {}", x.spawn_failure)
                    }
                    _ if x.timed_out => "timed out".into(),
                    (Some(code), _) => format!("exited {code}"),
                    (None, Some(sig)) => format!("killed by signal {sig}"),
                    _ => "ended".into(),
                };
                eprintln!(
                    "bridle: ■ {} {how} ({} ms)",
                    self.step_label(x.step),
                    x.duration_ms
                );
            }
            Some(E::Finished(f)) => {
                let r = get_run(c, &self.id).await?;
                eprintln!(
                    "bridle: run {} {}{}",
                    self.id,
                    run_state_name(f.state),
                    if f.reason.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", f.reason)
                    }
                );
                return Ok(Some(run_exit_code(&r)));
            }
            _ => {}
        }
        Ok(None)
    }

    /// Writes a step's output from the first byte not yet written to what
    /// is stored now; the output events this covers are then skipped.
    async fn write_output(&mut self, c: &mut Conn, o: &pb::StepOutput) -> anyhow::Result<()> {
        let key = (o.step, o.stream);
        let from = self.written.get(&key).copied().unwrap_or(0);
        if o.offset + o.length <= from {
            return Ok(());
        }
        let mut logs = c
            .runs
            .logs(pb::LogsRequest {
                run_id: self.id.clone(),
                step: o.step,
                stream: o.stream,
                from_offset: from,
            })
            .await?
            .into_inner();
        while let Some(chunk) = logs.message().await? {
            if o.stream == pb::LogStream::Stderr as i32 {
                std::io::Write::write_all(&mut std::io::stderr(), &chunk.data)?;
            } else {
                std::io::Write::write_all(&mut std::io::stdout(), &chunk.data)?;
                std::io::Write::flush(&mut std::io::stdout())?;
            }
            // Chunk by chunk, so that a lost connection resumes mid-output.
            self.written
                .insert(key, chunk.offset + chunk.data.len() as u64);
        }
        Ok(())
    }

    /// Prints an event as one JSON line; answers the run's exit code after
    /// its last event.
    async fn print_event_json(
        &mut self,
        c: &mut Conn,
        ev: &pb::RunEvent,
    ) -> anyhow::Result<Option<u8>> {
        use pb::run_event::Event as E;
        let mut line = run_event_json(ev);
        let mut exit = None;
        match &ev.event {
            Some(E::StepOutput(o)) => {
                let text = self.output_text(c, o).await?;
                line["text"] = serde_json::Value::String(text);
            }
            Some(E::Finished(_)) => exit = Some(run_exit_code(&get_run(c, &self.id).await?)),
            _ => {}
        }
        print_line(line)?;
        Ok(exit)
    }

    /// The bytes of one output event (from Logs) as text. A character the
    /// event's end cuts in two is held back and begins the next event's
    /// text of the same stream; bytes that are not UTF-8 become U+FFFD
    /// (`bridle runs logs` has them exactly).
    async fn output_text(&mut self, c: &mut Conn, o: &pb::StepOutput) -> anyhow::Result<String> {
        let key = (o.step, o.stream);
        let end = o.offset + o.length;
        let mut bytes = self.held.get(&key).cloned().unwrap_or_default();
        let mut logs = c
            .runs
            .logs(pb::LogsRequest {
                run_id: self.id.clone(),
                step: o.step,
                stream: o.stream,
                from_offset: o.offset,
            })
            .await?
            .into_inner();
        // Logs goes on to the end of the stream; this event is [offset, end).
        while let Some(chunk) = logs.message().await? {
            let take = end
                .saturating_sub(chunk.offset)
                .min(chunk.data.len() as u64) as usize;
            bytes.extend_from_slice(&chunk.data[..take]);
            if chunk.offset + chunk.data.len() as u64 >= end {
                break;
            }
        }
        let held = bytes.split_off(bytes.len() - incomplete_utf8_tail(&bytes));
        self.held.insert(key, held);
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }
}

async fn get_run(c: &mut Conn, id: &str) -> anyhow::Result<pb::Run> {
    Ok(c.runs
        .get(pb::GetRunRequest {
            run_id: id.to_string(),
        })
        .await?
        .into_inner())
}

/// How many bytes at the end of `b` are the start of a UTF-8 character
/// whose rest has not come yet (0 when the last one is whole or invalid).
fn incomplete_utf8_tail(b: &[u8]) -> usize {
    // A character is at most 4 bytes: its first byte is among the last 3
    // if it is incomplete.
    for back in 1..=b.len().min(3) {
        let start = b.len() - back;
        let is_continuation = b[start] & 0xC0 == 0x80;
        if !is_continuation {
            return match std::str::from_utf8(&b[start..]) {
                Err(e) if e.error_len().is_none() => back,
                _ => 0,
            };
        }
    }
    0
}

fn log_stream_name(s: i32) -> &'static str {
    match pb::LogStream::try_from(s) {
        Ok(pb::LogStream::Stdout) => "stdout",
        Ok(pb::LogStream::Stderr) => "stderr",
        _ => "both",
    }
}

/// A run event as one JSON object: `run_id`, `seq`, `unix_ms`, `type` (the
/// event's name in the proto) and the event's own fields; steps are
/// numbered from 0, as in the API.
fn run_event_json(ev: &pb::RunEvent) -> serde_json::Value {
    use pb::run_event::Event as E;
    let (kind, fields) = match &ev.event {
        Some(E::Submitted(s)) => (
            "submitted",
            json!({"owner": s.owner, "idempotency_key": s.idempotency_key, "steps": s.steps}),
        ),
        Some(E::Provisioning(_)) => ("provisioning", json!({})),
        Some(E::Sandbox(s)) => ("sandbox", json!({"sandbox_id": s.sandbox_id})),
        Some(E::StepStarted(s)) => (
            "step_started",
            json!({"step": s.step, "attempt": s.attempt, "exec_id": s.exec_id}),
        ),
        Some(E::StepOutput(o)) => (
            "step_output",
            json!({
                "step": o.step, "stream": log_stream_name(o.stream), "offset": o.offset,
                "length": o.length, "blob_sha256": o.blob_sha256,
            }),
        ),
        Some(E::StepExited(x)) => (
            "step_exited",
            json!({
                "step": x.step, "attempt": x.attempt, "exit_code": x.exit_code,
                "signal": x.signal, "timed_out": x.timed_out, "oom_killed": x.oom_killed,
                "spawn_failure": x.spawn_failure, "duration_ms": x.duration_ms,
            }),
        ),
        Some(E::Artifact(a)) => (
            "artifact",
            json!({"artifact": a.artifact.as_ref().map(|art| json!({
                "path": art.path, "snapshot_id": art.snapshot_id, "sha256": art.sha256,
                "size_bytes": art.size_bytes,
            }))}),
        ),
        Some(E::CancelRequested(x)) => {
            ("cancel_requested", json!({"by": x.by, "reason": x.reason}))
        }
        Some(E::Finished(f)) => (
            "finished",
            json!({"state": run_state_name(f.state), "reason": f.reason}),
        ),
        Some(E::ApprovalRequested(a)) => (
            "approval_requested",
            json!({"approval_id": a.approval_id, "step": a.step, "for_network": a.for_network}),
        ),
        Some(E::ApprovalDecided(a)) => (
            "approval_decided",
            json!({
                "approval_id": a.approval_id, "step": a.step, "for_network": a.for_network,
                "outcome": a.outcome, "by": a.by, "reason": a.reason,
            }),
        ),
        None => ("unknown", json!({})),
    };
    let mut line = json!({"run_id": ev.run_id, "seq": ev.seq, "unix_ms": ev.unix_ms, "type": kind});
    if let (Some(all), serde_json::Value::Object(fields)) = (line.as_object_mut(), fields) {
        all.extend(fields);
    }
    line
}

/// `approvals watch`: the pending approvals, then each change, across
/// restarts of the control plane.
async fn watch_approvals(c: &mut Conn) -> anyhow::Result<u8> {
    let mut follower = ApprovalsFollower {
        json: c.json,
        shown: HashMap::new(),
        received: 0,
    };
    let mut reconnects = Reconnects::new();
    loop {
        let from = follower.received;
        let failure = match follower.follow(c).await {
            // The server ends this stream only when it shuts down.
            Ok(()) => Status::unavailable("the approvals stream ended").into(),
            Err(e) => e,
        };
        if follower.received > from {
            reconnects.progressed();
        }
        // The Watch has no sequence to resume from: it starts again with
        // what is pending, and what changed in between is not replayed.
        let again = "watching approvals again (changes made meanwhile are not replayed: \
                     `bridle approvals list --all`)";
        reconnects.redial(c, failure, again).await?;
    }
}

struct ApprovalsFollower {
    json: bool,
    /// Each approval as last printed: the pending ones come again after a
    /// reconnect, and are not printed twice.
    shown: HashMap<String, serde_json::Value>,
    /// Events received, all attempts together.
    received: u64,
}

impl ApprovalsFollower {
    /// One attempt: prints what the stream brings until it ends or fails.
    async fn follow(&mut self, c: &mut Conn) -> anyhow::Result<()> {
        let mut events = c
            .approvals
            .watch(pb::WatchApprovalsRequest {})
            .await?
            .into_inner();
        while let Some(ev) = events.message().await? {
            self.received += 1;
            let Some(a) = ev.approval else { continue };
            let view = approval_json(&a);
            if self.shown.get(&a.id) == Some(&view) {
                continue;
            }
            if self.json {
                print_line(&view)?;
            } else {
                print_line(approval_line(&a))?;
            }
            self.shown.insert(a.id, view);
        }
        Ok(())
    }
}

/// How a follower tries again after losing the control plane: waits that
/// double from 200 ms to 5 s, until 5 minutes pass without an event.
///
/// An explicit loop rather than a retry crate (`backon`): what is retried
/// is not one call but a stream resumed from where it stopped, whose
/// backoff starts over with every event received, and whose every retry
/// says on stderr where it resumes.
struct Reconnects {
    delay: Duration,
    /// When the failures since the last event began.
    failing_since: Option<tokio::time::Instant>,
}

impl Reconnects {
    const FIRST_DELAY: Duration = Duration::from_millis(200);
    const MAX_DELAY: Duration = Duration::from_secs(5);
    const GIVE_UP_AFTER: Duration = Duration::from_secs(5 * 60);

    fn new() -> Self {
        Self {
            delay: Self::FIRST_DELAY,
            failing_since: None,
        }
    }

    /// Events came: the control plane is back, and the next failure starts
    /// the count again.
    fn progressed(&mut self) {
        *self = Self::new();
    }

    /// After `failure` ended a follower's attempt: if it means the control
    /// plane went away, says so on stderr (`resuming`: how the follower goes
    /// on), waits, and dials again until a dial succeeds. Any other failure,
    /// or one still there after [`Self::GIVE_UP_AFTER`], is answered.
    async fn redial(
        &mut self,
        c: &mut Conn,
        mut failure: anyhow::Error,
        resuming: &str,
    ) -> anyhow::Result<()> {
        loop {
            let (code, message) = match failure.downcast_ref::<Status>() {
                Some(s) if lost_the_control_plane(s) => (s.code(), s.message().replace('\n', " ")),
                _ => return Err(failure),
            };
            let since = *self
                .failing_since
                .get_or_insert_with(tokio::time::Instant::now);
            if since.elapsed() >= Self::GIVE_UP_AFTER {
                // Unavailable whatever the last code: the exit code says
                // the control plane could not be reached.
                let secs = Self::GIVE_UP_AFTER.as_secs();
                return Err(Status::unavailable(format!(
                    "no control plane for {secs} s; last: {}: {message}",
                    code_name(code)
                ))
                .into());
            }
            eprintln!(
                "bridle: lost the control plane ({}: {message}); {resuming}",
                code_name(code)
            );
            tokio::time::sleep(self.delay).await;
            self.delay = (self.delay * 2).min(Self::MAX_DELAY);
            match c.redial().await {
                Ok(()) => return Ok(()),
                Err(e) => failure = e,
            }
        }
    }
}

/// Whether a failed call means the control plane went away (it restarts,
/// or the connection to it broke) rather than that it refused.
fn lost_the_control_plane(s: &Status) -> bool {
    match s.code() {
        // Unreachable, or a call on a connection that then closed
        // (hyper's "operation was canceled").
        Code::Unavailable | Code::Cancelled => true,
        // A connection reset mid-stream comes as an h2 error, which tonic
        // turns into Unknown or Internal here with that error as the
        // status's source; the same codes sent by the server have no source
        // and are real failures. A channel that failed as a whole comes
        // without a source, in the generated client's words.
        Code::Unknown | Code::Internal => {
            std::error::Error::source(s).is_some()
                || s.message().starts_with("Service was not ready")
        }
        _ => false,
    }
}

/// One line on stdout; a closed pipe ends the command with an error
/// rather than a panic.
fn print_line(line: impl std::fmt::Display) -> std::io::Result<()> {
    use std::io::Write;
    writeln!(std::io::stdout(), "{line}")
}

async fn runs(c: &mut Conn, cmd: RunsCmd) -> anyhow::Result<u8> {
    match cmd {
        RunsCmd::List { states, limit } => {
            let mut wanted = Vec::new();
            for s in &states {
                let st = (1..=7)
                    .find(|i| run_state_name(*i) == s.as_str())
                    .ok_or_else(|| anyhow!("--state {s:?}: one of queued, provisioning, running, succeeded, failed, cancelled, interrupted"))?;
                wanted.push(st);
            }
            let list = c
                .runs
                .list(pb::ListRunsRequest {
                    states: wanted,
                    labels: HashMap::new(),
                    page_size: limit,
                    page_token: String::new(),
                })
                .await?
                .into_inner()
                .runs;
            if c.json {
                print_json(json!(list.iter().map(run_json).collect::<Vec<_>>()));
            } else {
                println!("{:<22} {:<13} {:<16} STEPS", "ID", "STATE", "OWNER");
                for r in &list {
                    let done = r
                        .steps
                        .iter()
                        .filter(|s| s.state == pb::StepState::Succeeded as i32)
                        .count();
                    println!(
                        "{:<22} {:<13} {:<16} {}/{}",
                        r.id,
                        run_state_name(r.state),
                        r.owner,
                        done,
                        r.steps.len()
                    );
                }
            }
        }
        RunsCmd::Get { id } => {
            let r = c
                .runs
                .get(pb::GetRunRequest { run_id: id })
                .await?
                .into_inner();
            if c.json {
                print_json(run_json(&r));
            } else {
                println!("id:      {}", r.id);
                println!("state:   {}", run_state_name(r.state));
                if !r.reason.is_empty() {
                    println!("reason:  {}", r.reason);
                }
                println!("sandbox: {}", r.sandbox_id);
                for (i, s) in r.steps.iter().enumerate() {
                    let state = run_json(&pb::Run {
                        steps: vec![s.clone()],
                        ..Default::default()
                    })["steps"][0]["state"]
                        .as_str()
                        .unwrap_or("")
                        .to_string();
                    println!(
                        "step {:>2}: {:<10} {:<20} exit {}",
                        i + 1,
                        state,
                        s.name,
                        s.exit_code
                            .map(|c| c.to_string())
                            .unwrap_or_else(|| "-".into())
                    );
                }
            }
        }
        RunsCmd::Logs { id, step, stream } => {
            if step == 0 {
                bail!("--step counts from 1");
            }
            let stream = match stream.as_deref() {
                Some("stdout") => pb::LogStream::Stdout,
                Some("stderr") => pb::LogStream::Stderr,
                _ => pb::LogStream::Unspecified,
            };
            let mut logs = c
                .runs
                .logs(pb::LogsRequest {
                    run_id: id,
                    step: step - 1,
                    stream: stream as i32,
                    from_offset: 0,
                })
                .await?
                .into_inner();
            let mut out = tokio::io::stdout();
            while let Some(chunk) = logs.message().await? {
                out.write_all(&chunk.data).await?;
            }
            out.flush().await?;
        }
        RunsCmd::Watch { id } => return follow_run(c, &id).await,
        RunsCmd::Cancel { id, reason } => {
            let r = c
                .runs
                .cancel(pb::CancelRunRequest { run_id: id, reason })
                .await?
                .into_inner();
            if c.json {
                print_json(run_json(&r));
            }
        }
    }
    Ok(0)
}

fn print_json(v: serde_json::Value) {
    println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
}

fn key_values(pairs: &[String], what: &str) -> anyhow::Result<HashMap<String, String>> {
    pairs
        .iter()
        .map(|p| {
            p.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| anyhow!("{what} {p:?} must be KEY=VALUE"))
        })
        .collect()
}

fn sandbox_json(s: &pb::Sandbox) -> serde_json::Value {
    let limits = s.limits.unwrap_or_default();
    json!({
        "id": s.id,
        "owner": s.owner,
        "state": state_name(s.state),
        "image": s.image,
        "limits": {
            "memory_bytes": limits.memory_bytes,
            "cpu_millis": limits.cpu_millis,
            "pids": limits.pids,
        },
        "network": match pb::NetworkMode::try_from(s.network) {
            Ok(pb::NetworkMode::Bridge) => "bridge",
            _ => "none",
        },
        "env": s.env,
        "labels": s.labels,
        "created_unix_ms": s.created_unix_ms,
        "expires_unix_ms": s.expires_unix_ms,
        "idle_timeout_seconds": s.idle_timeout_seconds,
        "last_active_unix_ms": s.last_active_unix_ms,
        "from_snapshot": s.from_snapshot,
        "pool_profile": s.pool_profile,
        "failure": s.failure,
    })
}

fn state_name(s: i32) -> &'static str {
    match pb::SandboxState::try_from(s) {
        Ok(pb::SandboxState::Creating) => "creating",
        Ok(pb::SandboxState::Ready) => "ready",
        Ok(pb::SandboxState::Paused) => "paused",
        Ok(pb::SandboxState::Failed) => "failed",
        _ => "unknown",
    }
}

fn snapshot_json(s: &pb::SnapshotInfo) -> serde_json::Value {
    json!({
        "id": s.id,
        "owner": s.owner,
        "sandbox_id": s.sandbox_id,
        "sha256": s.sha256,
        "size_bytes": s.size_bytes,
        "created_unix_ms": s.created_unix_ms,
    })
}

async fn sandbox(c: &mut Conn, cmd: SandboxCmd) -> anyhow::Result<u8> {
    match cmd {
        SandboxCmd::Create(a) => {
            let network = match a.network.as_deref() {
                Some("bridge") => pb::NetworkMode::Bridge,
                Some(_) => pb::NetworkMode::None,
                None => pb::NetworkMode::Unspecified,
            };
            let s = c
                .sandboxes
                .create(pb::CreateSandboxRequest {
                    image: a.image.unwrap_or_default(),
                    limits: Some(pb::Limits {
                        memory_bytes: a.memory,
                        cpu_millis: a.cpus.map(|c| (c * 1000.0).round() as u64),
                        pids: a.pids,
                        disk_bytes: a.disk,
                    }),
                    network: network as i32,
                    env: key_values(&a.env, "--env")?,
                    ttl_seconds: a.ttl.map(|d| d.as_secs()).unwrap_or(0),
                    idle_timeout_seconds: a.idle_timeout.map(|d| d.as_secs()).unwrap_or(0),
                    from_snapshot: a.from_snapshot.unwrap_or_default(),
                    labels: key_values(&a.labels, "--label")?,
                })
                .await?
                .into_inner();
            if c.json {
                print_json(sandbox_json(&s));
            } else {
                println!("{}", s.id);
            }
        }
        SandboxCmd::List { labels } => {
            let list = c
                .sandboxes
                .list(pb::ListSandboxesRequest {
                    labels: key_values(&labels, "--label")?,
                })
                .await?
                .into_inner()
                .sandboxes;
            if c.json {
                print_json(json!(list.iter().map(sandbox_json).collect::<Vec<_>>()));
            } else {
                println!("{:<16} {:<9} {:<16} IMAGE", "ID", "STATE", "OWNER");
                for s in &list {
                    println!(
                        "{:<16} {:<9} {:<16} {}",
                        s.id,
                        state_name(s.state),
                        s.owner,
                        s.image
                    );
                }
            }
        }
        SandboxCmd::Get { id } => {
            let s = c
                .sandboxes
                .get(pb::GetSandboxRequest { sandbox_id: id })
                .await?
                .into_inner();
            if c.json {
                print_json(sandbox_json(&s));
            } else {
                let limits = s.limits.unwrap_or_default();
                println!("id:       {}", s.id);
                println!("state:    {}", state_name(s.state));
                println!("owner:    {}", s.owner);
                println!("image:    {}", s.image);
                println!(
                    "limits:   memory {} B, cpu {} m, pids {}",
                    limits.memory_bytes.unwrap_or(0),
                    limits.cpu_millis.unwrap_or(0),
                    limits.pids.unwrap_or(0)
                );
                if !s.failure.is_empty() {
                    println!("failure:  {}", s.failure);
                }
            }
        }
        SandboxCmd::Exec(a) => return exec(c, a).await,
        SandboxCmd::Cp { src, dst } => copy(c, &src, &dst).await?,
        SandboxCmd::Snapshot { id, path, exclude } => {
            let s = c
                .sandboxes
                .snapshot(pb::SnapshotRequest {
                    sandbox_id: id,
                    path,
                    exclude,
                    compression: agent_pb::Compression::Zstd as i32,
                })
                .await?
                .into_inner();
            if c.json {
                print_json(snapshot_json(&s));
            } else {
                println!("{}", s.id);
            }
        }
        SandboxCmd::Snapshots => {
            let list = c
                .sandboxes
                .list_snapshots(pb::ListSnapshotsRequest {})
                .await?
                .into_inner()
                .snapshots;
            if c.json {
                print_json(json!(list.iter().map(snapshot_json).collect::<Vec<_>>()));
            } else {
                println!("{:<18} {:<16} {:>12} SHA256", "ID", "SANDBOX", "BYTES");
                for s in &list {
                    println!(
                        "{:<18} {:<16} {:>12} {}",
                        s.id, s.sandbox_id, s.size_bytes, s.sha256
                    );
                }
            }
        }
        SandboxCmd::RmSnapshot { id } => {
            c.sandboxes
                .delete_snapshot(pb::DeleteSnapshotRequest { snapshot_id: id })
                .await?;
        }
        SandboxCmd::Fork { id, ttl } => {
            let s = c
                .sandboxes
                .fork(pb::ForkRequest {
                    sandbox_id: id,
                    ttl_seconds: ttl.map(|d| d.as_secs()).unwrap_or(0),
                    labels: HashMap::new(),
                })
                .await?
                .into_inner();
            if c.json {
                print_json(sandbox_json(&s));
            } else {
                println!("{}", s.id);
            }
        }
        SandboxCmd::Pause { id } => {
            let s = c
                .sandboxes
                .pause(pb::PauseSandboxRequest { sandbox_id: id })
                .await?
                .into_inner();
            if c.json {
                print_json(sandbox_json(&s));
            }
        }
        SandboxCmd::Resume { id } => {
            let s = c
                .sandboxes
                .resume(pb::ResumeSandboxRequest { sandbox_id: id })
                .await?
                .into_inner();
            if c.json {
                print_json(sandbox_json(&s));
            }
        }
        SandboxCmd::Rm { ids } => {
            for id in ids {
                c.sandboxes
                    .delete(pb::DeleteSandboxRequest {
                        sandbox_id: id.clone(),
                    })
                    .await?;
                if c.json {
                    print_json(json!({ "deleted": id }));
                }
            }
        }
    }
    Ok(0)
}

fn token_json(t: &pb::TokenInfo) -> serde_json::Value {
    json!({
        "id": t.id,
        "name": t.name,
        "role": role_name(t.role),
        "owner": t.owner,
        "created_unix_ms": t.created_unix_ms,
        "expires_unix_ms": t.expires_unix_ms,
        "revoked_unix_ms": t.revoked_unix_ms,
        "created_by": t.created_by,
    })
}

fn role_name(r: i32) -> &'static str {
    match pb::Role::try_from(r) {
        Ok(pb::Role::Admin) => "admin",
        Ok(pb::Role::Operator) => "operator",
        Ok(pb::Role::Submitter) => "submitter",
        Ok(pb::Role::Auditor) => "auditor",
        _ => "unknown",
    }
}

async fn token(c: &mut Conn, cmd: TokenCmd) -> anyhow::Result<()> {
    match cmd {
        TokenCmd::Create {
            name,
            role,
            owner,
            ttl,
        } => {
            let role = match role.as_str() {
                "admin" => pb::Role::Admin,
                "operator" => pb::Role::Operator,
                "auditor" => pb::Role::Auditor,
                _ => pb::Role::Submitter,
            };
            let r = c
                .admin
                .create_token(pb::CreateTokenRequest {
                    name,
                    role: role as i32,
                    owner,
                    ttl_seconds: ttl.map(|d| d.as_secs()).unwrap_or(0),
                })
                .await?
                .into_inner();
            if c.json {
                let mut v = token_json(&r.token.unwrap_or_default());
                v["secret"] = json!(r.secret);
                print_json(v);
            } else {
                println!("{}", r.secret);
            }
        }
        TokenCmd::List { all } => {
            let list = c
                .admin
                .list_tokens(pb::ListTokensRequest {
                    include_revoked: all,
                })
                .await?
                .into_inner()
                .tokens;
            if c.json {
                print_json(json!(list.iter().map(token_json).collect::<Vec<_>>()));
            } else {
                println!(
                    "{:<14} {:<10} {:<16} {:<20} REVOKED",
                    "ID", "ROLE", "OWNER", "NAME"
                );
                for t in &list {
                    println!(
                        "{:<14} {:<10} {:<16} {:<20} {}",
                        t.id,
                        role_name(t.role),
                        t.owner,
                        t.name,
                        if t.revoked_unix_ms != 0 { "yes" } else { "" }
                    );
                }
            }
        }
        TokenCmd::Revoke { id } => {
            c.admin
                .revoke_token(pb::RevokeTokenRequest { token_id: id })
                .await?;
        }
        TokenCmd::Whoami => {
            let t = c.admin.who_am_i(pb::WhoAmIRequest {}).await?.into_inner();
            if c.json {
                print_json(token_json(&t));
            } else {
                println!(
                    "{} ({}, owner {}, token {})",
                    t.name,
                    role_name(t.role),
                    t.owner,
                    t.id
                );
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- exec

/// The terminal in raw mode for as long as this lives.
struct RawTerminal {
    saved: libc::termios,
}

impl RawTerminal {
    fn enter() -> Option<Self> {
        // SAFETY: tcgetattr/tcsetattr on fd 0 with valid termios structs.
        unsafe {
            let mut saved: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(0, &mut saved) != 0 {
                return None;
            }
            let mut raw = saved;
            libc::cfmakeraw(&mut raw);
            if libc::tcsetattr(0, libc::TCSANOW, &raw) != 0 {
                return None;
            }
            Some(Self { saved })
        }
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        // SAFETY: restoring the attributes read in `enter`.
        unsafe { libc::tcsetattr(0, libc::TCSANOW, &self.saved) };
    }
}

fn window_size() -> Option<agent_pb::PtySize> {
    // SAFETY: TIOCGWINSZ into a valid winsize.
    unsafe {
        let mut ws: libc::winsize = std::mem::zeroed();
        if libc::ioctl(1, libc::TIOCGWINSZ, &mut ws) != 0 || ws.ws_row == 0 {
            return None;
        }
        Some(agent_pb::PtySize {
            rows: ws.ws_row as u32,
            cols: ws.ws_col as u32,
        })
    }
}

async fn exec(c: &mut Conn, a: ExecArgs) -> anyhow::Result<u8> {
    let tty =
        !a.no_tty && (a.tty || (std::io::stdin().is_terminal() && std::io::stdout().is_terminal()));
    let pty = if tty {
        Some(window_size().unwrap_or(agent_pb::PtySize { rows: 24, cols: 80 }))
    } else {
        None
    };
    let start = agent_pb::ExecStart {
        exec_id: a.exec_id,
        argv: a.command,
        env: key_values(&a.env, "--env")?,
        cwd: a.workdir,
        stdin: !a.detach,
        pty,
        timeout_ms: a.timeout.map(|d| d.as_millis() as u32).unwrap_or(0),
        ..Default::default()
    };
    let (tx, rx) = mpsc::channel(16);
    tx.send(pb::ExecRequest {
        request: Some(pb::exec_request::Request::Start(pb::ExecStart {
            sandbox_id: a.id,
            exec: Some(start),
            detach: a.detach,
        })),
    })
    .await?;
    let mut events = c
        .sandboxes
        .exec(ReceiverStream::new(rx))
        .await?
        .into_inner();
    if a.detach {
        // The first event says whether it started.
        return match events.message().await? {
            Some(agent_pb::ExecEvent {
                event: Some(agent_pb::exec_event::Event::Started(s)),
            }) => {
                if c.json {
                    print_json(json!({ "exec_id": s.exec_id, "pid": s.pid }));
                } else {
                    println!("{}", s.exec_id);
                }
                Ok(0)
            }
            Some(agent_pb::ExecEvent {
                event: Some(agent_pb::exec_event::Event::SpawnFailed(f)),
            }) => bail!("the command did not start: {}", f.reason),
            _ => bail!("the exec stream ended before the command started"),
        };
    }
    let _raw = if tty { RawTerminal::enter() } else { None };
    // stdin → exec; EOF closes the command's stdin.
    let input = tx.clone();
    tokio::spawn(async move {
        let mut stdin = tokio::io::stdin();
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match stdin.read(&mut buf).await {
                Ok(0) | Err(_) => {
                    let _ = input
                        .send(pb::ExecRequest {
                            request: Some(pb::exec_request::Request::CloseStdin(
                                agent_pb::CloseStdin {},
                            )),
                        })
                        .await;
                    return;
                }
                Ok(n) => {
                    let msg = pb::ExecRequest {
                        request: Some(pb::exec_request::Request::Stdin(buf[..n].to_vec().into())),
                    };
                    if input.send(msg).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    // Signals: Ctrl-C and friends go to the command (in a terminal, Ctrl-C
    // is a byte the remote terminal turns into SIGINT); window size changes
    // resize the remote terminal.
    let signals = tx.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut int), Ok(mut term), Ok(mut hup), Ok(mut winch)) = (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
            signal(SignalKind::hangup()),
            signal(SignalKind::window_change()),
        ) else {
            return;
        };
        loop {
            let request = tokio::select! {
                _ = int.recv() => pb::exec_request::Request::Signal(libc::SIGINT),
                _ = term.recv() => pb::exec_request::Request::Signal(libc::SIGTERM),
                _ = hup.recv() => pb::exec_request::Request::Signal(libc::SIGHUP),
                _ = winch.recv() => match window_size() {
                    Some(size) if tty => pb::exec_request::Request::Resize(size),
                    _ => continue,
                },
            };
            if signals
                .send(pb::ExecRequest {
                    request: Some(request),
                })
                .await
                .is_err()
            {
                return;
            }
        }
    });
    drop(tx);
    let mut stdout = tokio::io::stdout();
    let mut stderr = tokio::io::stderr();
    while let Some(ev) = events.message().await? {
        use agent_pb::exec_event::Event;
        match ev.event {
            Some(Event::Output(o)) => {
                if o.stream == agent_pb::OutputStream::Stderr as i32 {
                    stderr.write_all(&o.data).await?;
                    stderr.flush().await?;
                } else {
                    stdout.write_all(&o.data).await?;
                    stdout.flush().await?;
                }
            }
            Some(Event::Dropped(d)) => {
                eprintln!(
                    "bridle: [{} bytes of output dropped by the sandbox's output cap]",
                    d.to_offset - d.from_offset
                );
            }
            Some(Event::SpawnFailed(f)) => {
                eprintln!("bridle: the command did not start: {}", f.reason);
                return Ok(if f.errno == libc::ENOENT { 127 } else { 126 });
            }
            Some(Event::Exited(x)) => {
                if x.timed_out {
                    eprintln!("bridle: the command timed out and was stopped");
                }
                if x.oom_killed {
                    eprintln!("bridle: the command ran out of memory");
                }
                return Ok(match (x.code, x.signal) {
                    (Some(code), _) => code.clamp(0, 255) as u8,
                    (None, Some(sig)) => (128 + sig).clamp(0, 255) as u8,
                    (None, None) => 137,
                });
            }
            Some(Event::ApprovalPending(a)) => {
                eprintln!(
                    "bridle: waiting for approval {} ({}); an operator decides it with `bridle approvals approve {} --reason …`",
                    a.approval_id, a.reason, a.approval_id
                );
            }
            Some(Event::Started(_)) | Some(Event::Keepalive(_)) | None => {}
        }
    }
    bail!("the exec stream ended before the command exited")
}

// ---------------------------------------------------------------- cp

/// `ID:path` names a file in a sandbox.
fn remote(spec: &str) -> Option<(&str, &str)> {
    let (id, path) = spec.split_once(':')?;
    (id.starts_with("sb-") && !id.contains('/')).then_some((id, path))
}

fn progress(total: Option<u64>, label: &str) -> indicatif::ProgressBar {
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = match total {
        Some(t) if t >= 8 << 20 => indicatif::ProgressBar::new(t),
        Some(_) => return indicatif::ProgressBar::hidden(),
        None => indicatif::ProgressBar::new_spinner(),
    };
    let template = if total.is_some() {
        "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}"
    } else {
        "{msg} {spinner} {bytes} {bytes_per_sec}"
    };
    if let Ok(style) = indicatif::ProgressStyle::with_template(template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(label.to_string());
    bar
}

async fn copy(c: &mut Conn, src: &str, dst: &str) -> anyhow::Result<()> {
    match (remote(src), remote(dst)) {
        (None, Some((id, path))) => upload(c, src, id, path).await,
        (Some((id, path)), None) => download(c, id, path, dst).await,
        (Some(_), Some(_)) => {
            bail!("copying between two sandboxes is not supported; go through a local file")
        }
        (None, None) => {
            bail!("one side of cp must be a sandbox path, like sb-1234:path/in/workspace")
        }
    }
}

async fn upload(c: &mut Conn, src: &str, id: &str, path: &str) -> anyhow::Result<()> {
    let (mut reader, size, mode): (
        Box<dyn tokio::io::AsyncRead + Unpin + Send>,
        Option<u64>,
        u32,
    ) = if src == "-" {
        (Box::new(tokio::io::stdin()), None, 0o644)
    } else {
        use std::os::unix::fs::PermissionsExt;
        let f = tokio::fs::File::open(src)
            .await
            .with_context(|| format!("opening {src}"))?;
        let meta = f.metadata().await?;
        if !meta.is_file() {
            bail!("{src} is not a regular file");
        }
        (
            Box::new(f),
            Some(meta.len()),
            meta.permissions().mode() & 0o777,
        )
    };
    let path = if path.is_empty() || path.ends_with('/') {
        let name = Path::new(src)
            .file_name()
            .ok_or_else(|| anyhow!("name the destination file: {id}:path/name"))?;
        format!("{path}{}", name.to_string_lossy())
    } else {
        path.to_string()
    };
    let bar = progress(size, &format!("{src} → {id}:{path}"));
    let (tx, rx) = mpsc::channel(4);
    tx.send(pb::WriteFileRequest {
        request: Some(pb::write_file_request::Request::Header(
            pb::WriteFileHeader {
                sandbox_id: id.to_string(),
                file: Some(agent_pb::WriteFileHeader {
                    path: path.clone(),
                    mode,
                    create_parents: true,
                    // Announced, so that a copy cut short is never committed.
                    size,
                    ..Default::default()
                }),
            },
        )),
    })
    .await?;
    let feeder_bar = bar.clone();
    let feeder = tokio::spawn(async move {
        loop {
            let mut buf = vec![0u8; 1 << 20];
            let n = match reader.read(&mut buf).await {
                Ok(n) => n,
                Err(e) => {
                    // Ending the stream here would commit what was sent so
                    // far; the call is dropped instead (see below), with the
                    // stream still open, which the server takes as a failure.
                    std::mem::forget(tx);
                    return Err(e);
                }
            };
            if n == 0 {
                return Ok::<(), std::io::Error>(());
            }
            buf.truncate(n);
            feeder_bar.inc(n as u64);
            let msg = pb::WriteFileRequest {
                request: Some(pb::write_file_request::Request::Data(buf.into())),
            };
            if tx.send(msg).await.is_err() {
                return Ok(());
            }
        }
    });
    let call = c.sandboxes.write_file(ReceiverStream::new(rx));
    tokio::pin!(feeder);
    // A read error wins over the answer: the call is dropped unfinished.
    let answer = tokio::select! {
        answer = call => answer,
        Ok(Err(e)) = &mut feeder => return Err(e).with_context(|| format!("reading {src}")),
    };
    let r = answer?.into_inner();
    bar.finish_and_clear();
    if c.json {
        print_json(json!({ "path": path, "size": r.size, "sha256": r.sha256 }));
    }
    Ok(())
}

async fn download(c: &mut Conn, id: &str, path: &str, dst: &str) -> anyhow::Result<()> {
    let mut chunks = c
        .sandboxes
        .read_file(pb::ReadFileRequest {
            sandbox_id: id.to_string(),
            path: path.to_string(),
            offset: 0,
            length: 0,
        })
        .await?
        .into_inner();
    // Written to a temp file next to the destination and renamed when all
    // of it arrived, so a failed copy leaves no partial file.
    let (mut out, tmp, dst_path): (
        Box<dyn tokio::io::AsyncWrite + Unpin + Send>,
        Option<PathBuf>,
        PathBuf,
    ) = if dst == "-" {
        (Box::new(tokio::io::stdout()), None, PathBuf::new())
    } else {
        let mut d = PathBuf::from(dst);
        if d.is_dir() {
            d.push(
                Path::new(path)
                    .file_name()
                    .ok_or_else(|| anyhow!("{path} has no file name"))?,
            );
        }
        let tmp = d.with_file_name(format!(
            ".{}.bridle-part",
            d.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        ));
        let f = tokio::fs::File::create(&tmp)
            .await
            .with_context(|| format!("creating {}", tmp.display()))?;
        (Box::new(f), Some(tmp), d)
    };
    let bar = progress(None, &format!("{id}:{path} → {dst}"));
    let result = async {
        let mut total = 0u64;
        while let Some(chunk) = chunks.message().await? {
            total += chunk.data.len() as u64;
            bar.inc(chunk.data.len() as u64);
            out.write_all(&chunk.data).await?;
        }
        out.flush().await?;
        Ok::<u64, anyhow::Error>(total)
    }
    .await;
    bar.finish_and_clear();
    match (result, tmp) {
        (Ok(total), Some(tmp)) => {
            drop(out);
            std::fs::rename(&tmp, &dst_path)?;
            if c.json {
                print_json(json!({ "path": dst_path, "size": total }));
            }
            Ok(())
        }
        (Ok(_), None) => Ok(()),
        (Err(e), tmp) => {
            if let Some(tmp) = tmp {
                let _ = std::fs::remove_file(tmp);
            }
            Err(e)
        }
    }
}

// ---------------------------------------------------------------- parsing

/// `90`, `90s`, `15m`, `2h`, `1d`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 90s, 15m, 2h, 1d"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86400,
        "ms" => return Ok(Duration::from_millis(n)),
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (ms, s, m, h, d)")),
    };
    Ok(Duration::from_secs(secs))
}

/// `1048576`, `512k`, `512m`, `2g` (powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim().to_ascii_lowercase();
    let t = t.strip_suffix('b').unwrap_or(&t);
    let (num, unit) = t.split_at(t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size like 512m or 2g"))?;
    let mult = match unit {
        "" => 1,
        "k" | "ki" => 1 << 10,
        "m" | "mi" => 1 << 20,
        "g" | "gi" => 1 << 30,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (k, m, g)")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_sizes() {
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("15m").unwrap(), Duration::from_secs(900));
        assert_eq!(parse_duration("1d").unwrap(), Duration::from_secs(86400));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5y").is_err());
        assert_eq!(parse_size("512m").unwrap(), 512 << 20);
        assert_eq!(parse_size("2G").unwrap(), 2 << 30);
        assert_eq!(parse_size("100").unwrap(), 100);
        assert!(parse_size("lots").is_err());
        assert!(parse_size("99999999999999g").is_err());
    }

    #[test]
    fn remote_paths() {
        assert_eq!(remote("sb-12ab:dir/f"), Some(("sb-12ab", "dir/f")));
        assert_eq!(remote("./sb-1:x"), None);
        assert_eq!(remote("C:/x"), None);
        assert_eq!(remote("file"), None);
    }

    #[test]
    fn a_lost_connection_is_told_from_a_refusal() {
        assert!(lost_the_control_plane(&Status::unavailable("restarting")));
        assert!(lost_the_control_plane(&Status::cancelled(
            "operation was canceled"
        )));
        // Made here from a transport error: it has that error as its source.
        let reset = Status::from_error(Box::new(std::io::Error::other("connection reset")));
        assert_eq!(reset.code(), Code::Unknown);
        assert!(lost_the_control_plane(&reset));
        assert!(lost_the_control_plane(&Status::unknown(
            "Service was not ready: transport error"
        )));
        // Sent by the server.
        assert!(!lost_the_control_plane(&Status::internal("a bug")));
        assert!(!lost_the_control_plane(&Status::unknown("a bug")));
        assert!(!lost_the_control_plane(&Status::not_found("no run")));
        assert!(!lost_the_control_plane(&Status::permission_denied("no")));
    }

    #[test]
    fn a_character_cut_in_two_is_held_back() {
        assert_eq!(incomplete_utf8_tail(b""), 0);
        assert_eq!(incomplete_utf8_tail(b"plain"), 0);
        assert_eq!(incomplete_utf8_tail("h\u{e9}".as_bytes()), 0);
        assert_eq!(incomplete_utf8_tail(b"h\xc3"), 1);
        assert_eq!(incomplete_utf8_tail(b"x\xe2\x82"), 2);
        assert_eq!(incomplete_utf8_tail(b"\xf0\x9f\x98"), 3);
        assert_eq!(incomplete_utf8_tail(b"\xf0\x9f\x98\x80"), 0);
        // Not UTF-8 at all: nothing to wait for.
        assert_eq!(incomplete_utf8_tail(b"a\xff"), 0);
        assert_eq!(incomplete_utf8_tail(b"a\x80"), 0);
    }

    #[test]
    fn a_run_event_is_one_flat_json_object() {
        let ev = pb::RunEvent {
            run_id: "run-1".into(),
            seq: 7,
            unix_ms: 1000,
            event: Some(pb::run_event::Event::StepExited(pb::StepExited {
                step: 2,
                exit_code: Some(3),
                ..Default::default()
            })),
        };
        let line = run_event_json(&ev);
        assert_eq!(line["type"], "step_exited");
        assert_eq!(line["seq"], 7);
        assert_eq!(line["step"], 2);
        assert_eq!(line["exit_code"], 3);
        assert!(line["signal"].is_null());
        assert!(!line.to_string().contains('\n'));
    }

    #[test]
    fn exit_codes_by_kind() {
        assert_eq!(exit_code(&Status::not_found("x")), 3);
        assert_eq!(exit_code(&Status::unauthenticated("x")), 4);
        assert_eq!(exit_code(&Status::permission_denied("x")), 4);
        assert_eq!(exit_code(&Status::unavailable("x")), 5);
        assert_eq!(exit_code(&Status::invalid_argument("x")), 6);
        assert_eq!(exit_code(&Status::internal("x")), 1);
    }
}
