//! How what the control plane answers is shown: every table and listing a
//! person reads, and every JSON object `-o json` prints, made with serde
//! from the view structs here (their fields in the order they print).
//! Subcommands print only bare ids, one-line confirmations and diagnostics
//! themselves.

use std::collections::HashMap;

use bridle_client::control as pb;
use clap::ValueEnum;
use serde::Serialize;

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Output {
    Text,
    Json,
}

/// A view as indented JSON on stdout.
pub(crate) fn print_json(view: &impl Serialize) {
    println!("{}", serde_json::to_string_pretty(view).unwrap_or_default());
}

/// One line on stdout; a closed pipe ends the command with an error
/// rather than a panic.
pub(crate) fn print_line(line: impl std::fmt::Display) -> std::io::Result<()> {
    use std::io::Write;
    writeln!(std::io::stdout(), "{line}")
}

/// A view as one line of compact JSON on stdout (see [`print_line`]).
pub(crate) fn print_json_line(view: &impl Serialize) -> anyhow::Result<()> {
    print_line(serde_json::to_string(view)?)?;
    Ok(())
}

/// `text` on one line, for a transcript or a table: control characters
/// (line ends, a terminal's escapes) become spaces, and a text longer than
/// `max_chars` characters is cut to that many, the last one `…`.
pub(crate) fn short_line(text: &str, max_chars: usize) -> String {
    let line: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if line.chars().nth(max_chars).is_none() {
        return line;
    }
    let end = line
        .char_indices()
        .nth(max_chars.saturating_sub(1))
        .map_or(0, |(i, _)| i);
    format!("{}…", &line[..end])
}

// ---------------------------------------------------------------- names

fn sandbox_state_name(s: i32) -> &'static str {
    match pb::SandboxState::try_from(s) {
        Ok(pb::SandboxState::Creating) => "creating",
        Ok(pb::SandboxState::Ready) => "ready",
        Ok(pb::SandboxState::Paused) => "paused",
        Ok(pb::SandboxState::Failed) => "failed",
        _ => "unknown",
    }
}

fn network_name(n: i32) -> &'static str {
    match pb::NetworkMode::try_from(n) {
        Ok(pb::NetworkMode::Bridge) => "bridge",
        Ok(pb::NetworkMode::Egress) => "egress",
        _ => "none",
    }
}

pub(crate) fn run_state_name(s: i32) -> &'static str {
    match pb::RunState::try_from(s) {
        Ok(pb::RunState::Queued) => "queued",
        Ok(pb::RunState::Provisioning) => "provisioning",
        Ok(pb::RunState::Running) => "running",
        Ok(pb::RunState::Succeeded) => "succeeded",
        Ok(pb::RunState::Failed) => "failed",
        Ok(pb::RunState::Cancelled) => "cancelled",
        Ok(pb::RunState::Interrupted) => "interrupted",
        Ok(pb::RunState::AwaitingApproval) => "awaiting_approval",
        Ok(pb::RunState::Idle) => "idle",
        Ok(pb::RunState::AwaitingToolResult) => "awaiting_tool_result",
        _ => "unknown",
    }
}

fn step_state_name(s: i32) -> &'static str {
    match pb::StepState::try_from(s) {
        Ok(pb::StepState::Pending) => "pending",
        Ok(pb::StepState::Running) => "running",
        Ok(pb::StepState::Succeeded) => "succeeded",
        Ok(pb::StepState::Failed) => "failed",
        Ok(pb::StepState::Skipped) => "skipped",
        _ => "unknown",
    }
}

fn log_stream_name(s: i32) -> &'static str {
    match pb::LogStream::try_from(s) {
        Ok(pb::LogStream::Stdout) => "stdout",
        Ok(pb::LogStream::Stderr) => "stderr",
        _ => "both",
    }
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

pub(crate) fn approval_state_name(s: i32) -> &'static str {
    match pb::ApprovalState::try_from(s) {
        Ok(pb::ApprovalState::Pending) => "pending",
        Ok(pb::ApprovalState::Approved) => "approved",
        Ok(pb::ApprovalState::Denied) => "denied",
        Ok(pb::ApprovalState::Expired) => "expired",
        _ => "unknown",
    }
}

// ---------------------------------------------------------------- sandboxes

#[derive(Serialize)]
pub(crate) struct SandboxView<'a> {
    id: &'a str,
    owner: &'a str,
    state: &'static str,
    image: &'a str,
    limits: LimitsView,
    network: &'static str,
    env: &'a HashMap<String, String>,
    labels: &'a HashMap<String, String>,
    created_unix_ms: i64,
    expires_unix_ms: i64,
    idle_timeout_seconds: u64,
    last_active_unix_ms: i64,
    from_snapshot: &'a str,
    pool_profile: &'a str,
    failure: &'a str,
}

#[derive(Serialize)]
struct LimitsView {
    memory_bytes: Option<u64>,
    cpu_millis: Option<u64>,
    pids: Option<u64>,
}

impl<'a> From<&'a pb::Sandbox> for SandboxView<'a> {
    fn from(s: &'a pb::Sandbox) -> Self {
        let limits = s.limits.unwrap_or_default();
        Self {
            id: &s.id,
            owner: &s.owner,
            state: sandbox_state_name(s.state),
            image: &s.image,
            limits: LimitsView {
                memory_bytes: limits.memory_bytes,
                cpu_millis: limits.cpu_millis,
                pids: limits.pids,
            },
            network: network_name(s.network),
            env: &s.env,
            labels: &s.labels,
            created_unix_ms: s.created_unix_ms,
            expires_unix_ms: s.expires_unix_ms,
            idle_timeout_seconds: s.idle_timeout_seconds,
            last_active_unix_ms: s.last_active_unix_ms,
            from_snapshot: &s.from_snapshot,
            pool_profile: &s.pool_profile,
            failure: &s.failure,
        }
    }
}

pub(crate) fn sandbox_table(list: &[pb::Sandbox]) {
    println!("{:<16} {:<9} {:<16} IMAGE", "ID", "STATE", "OWNER");
    for s in list {
        println!(
            "{:<16} {:<9} {:<16} {}",
            s.id,
            sandbox_state_name(s.state),
            s.owner,
            s.image
        );
    }
}

pub(crate) fn sandbox_details(s: &pb::Sandbox) {
    let limits = s.limits.unwrap_or_default();
    println!("id:       {}", s.id);
    println!("state:    {}", sandbox_state_name(s.state));
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

#[derive(Serialize)]
pub(crate) struct SnapshotView<'a> {
    id: &'a str,
    owner: &'a str,
    sandbox_id: &'a str,
    sha256: &'a str,
    size_bytes: u64,
    created_unix_ms: i64,
}

impl<'a> From<&'a pb::SnapshotInfo> for SnapshotView<'a> {
    fn from(s: &'a pb::SnapshotInfo) -> Self {
        Self {
            id: &s.id,
            owner: &s.owner,
            sandbox_id: &s.sandbox_id,
            sha256: &s.sha256,
            size_bytes: s.size_bytes,
            created_unix_ms: s.created_unix_ms,
        }
    }
}

pub(crate) fn snapshot_table(list: &[pb::SnapshotInfo]) {
    println!("{:<18} {:<16} {:>12} SHA256", "ID", "SANDBOX", "BYTES");
    for s in list {
        println!(
            "{:<18} {:<16} {:>12} {}",
            s.id, s.sandbox_id, s.size_bytes, s.sha256
        );
    }
}

/// `sandbox rm -o json`: one object per sandbox deleted.
#[derive(Serialize)]
pub(crate) struct DeletedView<'a> {
    pub(crate) deleted: &'a str,
}

/// `sandbox exec --detach -o json`.
#[derive(Serialize)]
pub(crate) struct DetachedView<'a> {
    pub(crate) exec_id: &'a str,
    pub(crate) pid: u32,
}

/// `sandbox cp` into a sandbox, `-o json`.
#[derive(Serialize)]
pub(crate) struct UploadedView<'a> {
    pub(crate) path: &'a str,
    pub(crate) size: u64,
    pub(crate) sha256: &'a str,
}

/// `sandbox cp` out of a sandbox to a file, `-o json`.
#[derive(Serialize)]
pub(crate) struct DownloadedView {
    pub(crate) path: String,
    pub(crate) size: u64,
}

// ---------------------------------------------------------------- tokens

#[derive(Serialize)]
pub(crate) struct TokenView<'a> {
    id: &'a str,
    name: &'a str,
    role: &'static str,
    owner: &'a str,
    created_unix_ms: i64,
    expires_unix_ms: i64,
    revoked_unix_ms: i64,
    created_by: &'a str,
    /// Only when the token was just made: the one time it is shown.
    #[serde(skip_serializing_if = "Option::is_none")]
    secret: Option<&'a str>,
}

impl<'a> TokenView<'a> {
    pub(crate) fn with_secret(self, secret: &'a str) -> Self {
        Self {
            secret: Some(secret),
            ..self
        }
    }
}

impl<'a> From<&'a pb::TokenInfo> for TokenView<'a> {
    fn from(t: &'a pb::TokenInfo) -> Self {
        Self {
            id: &t.id,
            name: &t.name,
            role: role_name(t.role),
            owner: &t.owner,
            created_unix_ms: t.created_unix_ms,
            expires_unix_ms: t.expires_unix_ms,
            revoked_unix_ms: t.revoked_unix_ms,
            created_by: &t.created_by,
            secret: None,
        }
    }
}

pub(crate) fn token_table(list: &[pb::TokenInfo]) {
    println!(
        "{:<14} {:<10} {:<16} {:<20} REVOKED",
        "ID", "ROLE", "OWNER", "NAME"
    );
    for t in list {
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

pub(crate) fn whoami(t: &pb::TokenInfo) {
    println!(
        "{} ({}, owner {}, token {})",
        t.name,
        role_name(t.role),
        t.owner,
        t.id
    );
}

// ---------------------------------------------------------------- policy

#[derive(Serialize)]
pub(crate) struct PolicyView<'a> {
    version: u64,
    source: &'a str,
    set_by: &'a str,
    set_unix_ms: i64,
}

impl<'a> From<&'a pb::PolicyInfo> for PolicyView<'a> {
    fn from(p: &'a pb::PolicyInfo) -> Self {
        Self {
            version: p.version,
            source: &p.source,
            set_by: &p.set_by,
            set_unix_ms: p.set_unix_ms,
        }
    }
}

/// The policy source on stdout, its version on stderr (so that stdout is a
/// file `policy set` takes back).
pub(crate) fn policy(p: &pb::PolicyInfo) {
    eprintln!("bridle: policy version {} (set by {})", p.version, p.set_by);
    print!("{}", p.source);
}

// ---------------------------------------------------------------- audit

#[derive(Serialize)]
pub(crate) struct AuditEntryView<'a> {
    seq: u64,
    unix_ms: i64,
    request_id: &'a str,
    token_id: &'a str,
    principal: &'a str,
    role: &'a str,
    owner: &'a str,
    action: &'a str,
    resource: &'a str,
    decision: &'a str,
    policy_version: u64,
    outcome: &'a str,
    hash: &'a str,
}

impl<'a> From<&'a pb::AuditEntry> for AuditEntryView<'a> {
    fn from(e: &'a pb::AuditEntry) -> Self {
        Self {
            seq: e.seq,
            unix_ms: e.unix_ms,
            request_id: &e.request_id,
            token_id: &e.token_id,
            principal: &e.principal,
            role: &e.role,
            owner: &e.owner,
            action: &e.action,
            resource: &e.resource,
            decision: &e.decision,
            policy_version: e.policy_version,
            outcome: &e.outcome,
            hash: &e.hash,
        }
    }
}

pub(crate) fn audit_table(entries: &[pb::AuditEntry]) {
    println!(
        "{:<6} {:<14} {:<20} {:<28} OUTCOME",
        "SEQ", "TIME(ms)", "PRINCIPAL", "ACTION"
    );
    for e in entries {
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

/// What a verification of the audit log found, on the server or offline.
#[derive(Serialize)]
pub(crate) struct VerdictView<'a> {
    pub(crate) ok: bool,
    pub(crate) entries: u64,
    pub(crate) checkpoints: u64,
    pub(crate) first_bad_seq: u64,
    pub(crate) problem: &'a str,
}

// ---------------------------------------------------------------- approvals

#[derive(Serialize)]
pub(crate) struct ApprovalView<'a> {
    id: &'a str,
    state: &'static str,
    requested_by: &'a str,
    requested_by_token: &'a str,
    owner: &'a str,
    action: &'a str,
    resource: &'a str,
    summary: &'a str,
    run_id: &'a str,
    step: u32,
    action_sha256: &'a str,
    policy: &'a str,
    policy_reason: &'a str,
    policy_version: u64,
    created_unix_ms: i64,
    expires_unix_ms: i64,
    decided_by: &'a str,
    decision_reason: &'a str,
    decided_unix_ms: i64,
    used: bool,
    #[serde(skip_serializing_if = "str::is_empty")]
    scope: &'a str,
    remember: bool,
}

impl<'a> From<&'a pb::Approval> for ApprovalView<'a> {
    fn from(a: &'a pb::Approval) -> Self {
        Self {
            id: &a.id,
            state: approval_state_name(a.state),
            requested_by: &a.requested_by,
            requested_by_token: &a.requested_by_token,
            owner: &a.owner,
            action: &a.action,
            resource: &a.resource,
            summary: &a.summary,
            run_id: &a.run_id,
            step: a.step,
            action_sha256: &a.action_sha256,
            policy: &a.policy,
            policy_reason: &a.policy_reason,
            policy_version: a.policy_version,
            created_unix_ms: a.created_unix_ms,
            expires_unix_ms: a.expires_unix_ms,
            decided_by: &a.decided_by,
            decision_reason: &a.decision_reason,
            decided_unix_ms: a.decided_unix_ms,
            used: a.used,
            scope: &a.scope,
            remember: a.remember,
        }
    }
}

pub(crate) fn approval_table_header() {
    println!("{:<20} {:<9} {:<16} ACTION", "ID", "STATE", "REQUESTED BY");
}

/// One approval as a row under [`approval_table_header`].
pub(crate) fn approval_line(a: &pb::Approval) -> String {
    format!(
        "{:<20} {:<9} {:<16} {}",
        a.id,
        approval_state_name(a.state),
        a.requested_by,
        a.summary
    )
}

/// One approval in full; `now_ms` to say when it expires.
pub(crate) fn approval_details(a: &pb::Approval, now_ms: i64) {
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
    let left = (a.expires_unix_ms - now_ms) / 1000;
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

// ---------------------------------------------------------------- runs

#[derive(Serialize)]
pub(crate) struct RunView<'a> {
    id: &'a str,
    owner: &'a str,
    state: &'static str,
    idempotency_key: &'a str,
    sandbox_id: &'a str,
    reason: &'a str,
    created_unix_ms: i64,
    finished_unix_ms: i64,
    last_seq: u64,
    steps: Vec<StepView<'a>>,
    artifacts: Vec<ArtifactView<'a>>,
    /// The approval the run waits for (awaiting_approval).
    #[serde(skip_serializing_if = "str::is_empty")]
    approval_id: &'a str,
    /// Agent sessions only.
    #[serde(skip_serializing_if = "Option::is_none")]
    session: Option<SessionView<'a>>,
}

/// An agent session's progress, what it used, what it waits for and its
/// last answer.
#[derive(Serialize)]
struct SessionView<'a> {
    model: &'a str,
    turns: u32,
    model_requests: u32,
    model_requests_resent: u32,
    tool_calls: u32,
    usage: UsageView,
    pending_tool_calls: Vec<ToolCallView<'a>>,
    answer: &'a str,
}

#[derive(Serialize, Default)]
struct UsageView {
    input_tokens: u64,
    output_tokens: u64,
    cache_read_input_tokens: u64,
    cache_creation_input_tokens: u64,
    cost_usd: f64,
}

#[derive(Serialize)]
struct ToolCallView<'a> {
    call_id: &'a str,
    tool: &'a str,
    arguments_json: &'a str,
}

impl<'a> From<&'a pb::Session> for SessionView<'a> {
    fn from(s: &'a pb::Session) -> Self {
        Self {
            model: &s.model,
            turns: s.turns,
            model_requests: s.model_requests,
            model_requests_resent: s.model_requests_resent,
            tool_calls: s.tool_calls,
            usage: s.usage.as_ref().map(UsageView::from).unwrap_or_default(),
            pending_tool_calls: s
                .pending_tool_calls
                .iter()
                .map(ToolCallView::from)
                .collect(),
            answer: &s.answer,
        }
    }
}

impl From<&pb::Usage> for UsageView {
    fn from(u: &pb::Usage) -> Self {
        Self {
            input_tokens: u.input_tokens,
            output_tokens: u.output_tokens,
            cache_read_input_tokens: u.cache_read_input_tokens,
            cache_creation_input_tokens: u.cache_creation_input_tokens,
            cost_usd: u.cost_usd,
        }
    }
}

impl<'a> From<&'a pb::ToolCall> for ToolCallView<'a> {
    fn from(c: &'a pb::ToolCall) -> Self {
        Self {
            call_id: &c.call_id,
            tool: &c.tool,
            arguments_json: &c.arguments_json,
        }
    }
}

#[derive(Serialize)]
struct StepView<'a> {
    name: &'a str,
    state: &'static str,
    attempts: u32,
    exit_code: Option<i32>,
    signal: Option<i32>,
    timed_out: bool,
    stdout_bytes: u64,
    stderr_bytes: u64,
}

#[derive(Serialize)]
struct ArtifactView<'a> {
    path: &'a str,
    snapshot_id: &'a str,
    sha256: &'a str,
    size_bytes: u64,
}

impl<'a> From<&'a pb::Run> for RunView<'a> {
    fn from(r: &'a pb::Run) -> Self {
        Self {
            id: &r.id,
            owner: &r.owner,
            state: run_state_name(r.state),
            idempotency_key: &r.idempotency_key,
            sandbox_id: &r.sandbox_id,
            reason: &r.reason,
            created_unix_ms: r.created_unix_ms,
            finished_unix_ms: r.finished_unix_ms,
            last_seq: r.last_seq,
            steps: r
                .steps
                .iter()
                .map(|s| StepView {
                    name: &s.name,
                    state: step_state_name(s.state),
                    attempts: s.attempts,
                    exit_code: s.exit_code,
                    signal: s.signal,
                    timed_out: s.timed_out,
                    stdout_bytes: s.stdout_bytes,
                    stderr_bytes: s.stderr_bytes,
                })
                .collect(),
            artifacts: r.artifacts.iter().map(ArtifactView::from).collect(),
            approval_id: &r.approval_id,
            session: r.session.as_ref().map(SessionView::from),
        }
    }
}

impl<'a> From<&'a pb::Artifact> for ArtifactView<'a> {
    fn from(a: &'a pb::Artifact) -> Self {
        Self {
            path: &a.path,
            snapshot_id: &a.snapshot_id,
            sha256: &a.sha256,
            size_bytes: a.size_bytes,
        }
    }
}

pub(crate) fn run_table(list: &[pb::Run]) {
    println!("{:<22} {:<13} {:<16} STEPS", "ID", "STATE", "OWNER");
    for r in list {
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

/// Whether a run is an agent session (submitted with `agent`).
pub(crate) fn is_session(r: &pb::Run) -> bool {
    r.agent.is_some() || r.session.is_some()
}

/// What a session used, as a person reads it; the cost only when the
/// model has prices configured.
pub(crate) fn usage_text(u: &pb::Usage) -> String {
    let cached = if u.cache_read_input_tokens > 0 {
        format!(" ({} cached)", u.cache_read_input_tokens)
    } else {
        String::new()
    };
    let cost = if u.cost_usd > 0.0 {
        format!(", ${:.4}", u.cost_usd)
    } else {
        String::new()
    };
    format!(
        "{} input tokens{cached}, {} output tokens{cost}",
        u.input_tokens, u.output_tokens
    )
}

pub(crate) fn run_details(r: &pb::Run) {
    if is_session(r) {
        session_details(r);
        return;
    }
    println!("id:      {}", r.id);
    println!("state:   {}", run_state_name(r.state));
    if !r.reason.is_empty() {
        println!("reason:  {}", r.reason);
    }
    println!("sandbox: {}", r.sandbox_id);
    for (i, s) in r.steps.iter().enumerate() {
        println!(
            "step {:>2}: {:<10} {:<20} exit {}",
            i + 1,
            step_state_name(s.state),
            s.name,
            s.exit_code
                .map(|c| c.to_string())
                .unwrap_or_else(|| "-".into())
        );
    }
}

/// An agent session in full: where it stands, what it used, the client
/// tool calls it waits for, and its last answer (last, as it may be long).
fn session_details(r: &pb::Run) {
    let s = r.session.clone().unwrap_or_default();
    let model = match (&r.agent, s.model.is_empty()) {
        (Some(task), true) => task.model.as_str(),
        _ => s.model.as_str(),
    };
    println!("id:          {}", r.id);
    println!("state:       {}", run_state_name(r.state));
    if !r.reason.is_empty() {
        println!("reason:      {}", r.reason);
    }
    println!("model:       {model}");
    if !r.sandbox_id.is_empty() {
        println!("sandbox:     {}", r.sandbox_id);
    }
    println!(
        "turns:       {} ({} model requests, {} sent again after a restart)",
        s.turns, s.model_requests, s.model_requests_resent
    );
    println!("tool calls:  {}", s.tool_calls);
    println!("usage:       {}", usage_text(&s.usage.unwrap_or_default()));
    if !r.approval_id.is_empty() {
        println!(
            "approval:    {} (bridle approvals show {})",
            r.approval_id, r.approval_id
        );
    }
    for call in &s.pending_tool_calls {
        println!(
            "waiting for: {} {} {}",
            call.call_id,
            call.tool,
            short_line(&call.arguments_json, 200)
        );
    }
    if !s.answer.is_empty() {
        println!("answer:");
        println!("{}", s.answer.trim_end_matches('\n'));
    }
}

/// A run event as one JSON object: `run_id`, `seq`, `unix_ms`, `type` (the
/// event's name in the proto) and the event's own fields; steps are
/// numbered from 0, as in the API. An output event also carries its
/// `text`.
#[derive(Serialize)]
pub(crate) struct RunEventView<'a> {
    run_id: &'a str,
    seq: u64,
    unix_ms: i64,
    #[serde(flatten)]
    event: EventView<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    text: Option<String>,
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum EventView<'a> {
    Submitted {
        owner: &'a str,
        idempotency_key: &'a str,
        steps: u32,
    },
    Provisioning {},
    Sandbox {
        sandbox_id: &'a str,
    },
    StepStarted {
        step: u32,
        attempt: u32,
        exec_id: &'a str,
    },
    StepOutput {
        step: u32,
        stream: &'static str,
        offset: u64,
        length: u64,
        blob_sha256: &'a str,
    },
    StepExited {
        step: u32,
        attempt: u32,
        exit_code: Option<i32>,
        signal: Option<i32>,
        timed_out: bool,
        oom_killed: bool,
        spawn_failure: &'a str,
        duration_ms: u64,
    },
    Artifact {
        artifact: Option<ArtifactView<'a>>,
    },
    CancelRequested {
        by: &'a str,
        reason: &'a str,
    },
    Finished {
        state: &'static str,
        reason: &'a str,
    },
    ApprovalRequested {
        approval_id: &'a str,
        step: u32,
        for_network: bool,
        /// An agent session's tool call.
        #[serde(skip_serializing_if = "str::is_empty")]
        call_id: &'a str,
    },
    ApprovalDecided {
        approval_id: &'a str,
        step: u32,
        for_network: bool,
        outcome: &'a str,
        by: &'a str,
        reason: &'a str,
        #[serde(skip_serializing_if = "str::is_empty")]
        call_id: &'a str,
    },
    UserMessage {
        message_id: &'a str,
        text: &'a str,
        close: bool,
    },
    ModelRequested {
        turn: u32,
        request_sha256: &'a str,
        messages: u32,
        resent: bool,
    },
    ModelResponded {
        turn: u32,
        text: &'a str,
        tool_calls: Vec<ToolCallView<'a>>,
        stop_reason: &'a str,
        usage: Option<UsageView>,
        model: &'a str,
    },
    ToolCallDecided {
        call_id: &'a str,
        tool: &'a str,
        outcome: &'a str,
        reason: &'a str,
    },
    ToolStarted {
        call_id: &'a str,
        exec_id: &'a str,
    },
    ToolResult {
        call_id: &'a str,
        content: &'a str,
        is_error: bool,
        full_bytes: u64,
    },
    ContextCompacted {
        messages: u32,
        tokens_before: u64,
        tokens_after: u64,
    },
    TurnFinished {
        turn: u32,
    },
    CloseRequested {
        message_id: &'a str,
    },
    /// Not stored: `seq` is 0.
    TextDelta {
        turn: u32,
        text: &'a str,
    },
    Unknown {},
}

impl<'a> RunEventView<'a> {
    /// `text`: an output event's bytes as text.
    pub(crate) fn new(ev: &'a pb::RunEvent, text: Option<String>) -> Self {
        use pb::run_event::Event as E;
        let event = match &ev.event {
            Some(E::Submitted(s)) => EventView::Submitted {
                owner: &s.owner,
                idempotency_key: &s.idempotency_key,
                steps: s.steps,
            },
            Some(E::Provisioning(_)) => EventView::Provisioning {},
            Some(E::Sandbox(s)) => EventView::Sandbox {
                sandbox_id: &s.sandbox_id,
            },
            Some(E::StepStarted(s)) => EventView::StepStarted {
                step: s.step,
                attempt: s.attempt,
                exec_id: &s.exec_id,
            },
            Some(E::StepOutput(o)) => EventView::StepOutput {
                step: o.step,
                stream: log_stream_name(o.stream),
                offset: o.offset,
                length: o.length,
                blob_sha256: &o.blob_sha256,
            },
            Some(E::StepExited(x)) => EventView::StepExited {
                step: x.step,
                attempt: x.attempt,
                exit_code: x.exit_code,
                signal: x.signal,
                timed_out: x.timed_out,
                oom_killed: x.oom_killed,
                spawn_failure: &x.spawn_failure,
                duration_ms: x.duration_ms,
            },
            Some(E::Artifact(a)) => EventView::Artifact {
                artifact: a.artifact.as_ref().map(ArtifactView::from),
            },
            Some(E::CancelRequested(x)) => EventView::CancelRequested {
                by: &x.by,
                reason: &x.reason,
            },
            Some(E::Finished(f)) => EventView::Finished {
                state: run_state_name(f.state),
                reason: &f.reason,
            },
            Some(E::ApprovalRequested(a)) => EventView::ApprovalRequested {
                approval_id: &a.approval_id,
                step: a.step,
                for_network: a.for_network,
                call_id: &a.call_id,
            },
            Some(E::ApprovalDecided(a)) => EventView::ApprovalDecided {
                approval_id: &a.approval_id,
                step: a.step,
                for_network: a.for_network,
                outcome: &a.outcome,
                by: &a.by,
                reason: &a.reason,
                call_id: &a.call_id,
            },
            Some(E::UserMessage(m)) => EventView::UserMessage {
                message_id: &m.message_id,
                text: &m.text,
                close: m.close,
            },
            Some(E::ModelRequested(m)) => EventView::ModelRequested {
                turn: m.turn,
                request_sha256: &m.request_sha256,
                messages: m.messages,
                resent: m.resent,
            },
            Some(E::ModelResponded(m)) => EventView::ModelResponded {
                turn: m.turn,
                text: &m.text,
                tool_calls: m.tool_calls.iter().map(ToolCallView::from).collect(),
                stop_reason: &m.stop_reason,
                usage: m.usage.as_ref().map(UsageView::from),
                model: &m.model,
            },
            Some(E::ToolCallDecided(d)) => EventView::ToolCallDecided {
                call_id: &d.call_id,
                tool: &d.tool,
                outcome: &d.outcome,
                reason: &d.reason,
            },
            Some(E::ToolStarted(t)) => EventView::ToolStarted {
                call_id: &t.call_id,
                exec_id: &t.exec_id,
            },
            Some(E::ToolResult(r)) => EventView::ToolResult {
                call_id: &r.call_id,
                content: &r.content,
                is_error: r.is_error,
                full_bytes: r.full_bytes,
            },
            Some(E::ContextCompacted(x)) => EventView::ContextCompacted {
                messages: x.messages,
                tokens_before: x.tokens_before,
                tokens_after: x.tokens_after,
            },
            Some(E::TurnFinished(t)) => EventView::TurnFinished { turn: t.turn },
            Some(E::CloseRequested(c)) => EventView::CloseRequested {
                message_id: &c.message_id,
            },
            Some(E::TextDelta(t)) => EventView::TextDelta {
                turn: t.turn,
                text: &t.text,
            },
            None => EventView::Unknown {},
        };
        Self {
            run_id: &ev.run_id,
            seq: ev.seq,
            unix_ms: ev.unix_ms,
            event,
            text,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let text = serde_json::to_string(&RunEventView::new(&ev, None)).unwrap();
        assert!(!text.contains('\n'), "{text}");
        assert!(
            text.starts_with(
                "{\"run_id\":\"run-1\",\"seq\":7,\"unix_ms\":1000,\"type\":\"step_exited\",\"step\":2,"
            ),
            "{text}"
        );
        let line: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(line["type"], "step_exited");
        assert_eq!(line["seq"], 7);
        assert_eq!(line["step"], 2);
        assert_eq!(line["exit_code"], 3);
        assert!(line["signal"].is_null());
        assert!(line.get("text").is_none());
    }

    #[test]
    fn an_output_event_carries_its_text_last() {
        let ev = pb::RunEvent {
            run_id: "run-1".into(),
            seq: 8,
            unix_ms: 1000,
            event: Some(pb::run_event::Event::StepOutput(pb::StepOutput {
                step: 0,
                stream: pb::LogStream::Stderr as i32,
                offset: 0,
                length: 3,
                blob_sha256: "ab".into(),
            })),
        };
        let text = serde_json::to_string(&RunEventView::new(&ev, Some("hi\n".into()))).unwrap();
        assert!(
            text.ends_with(
                "\"type\":\"step_output\",\"step\":0,\"stream\":\"stderr\",\"offset\":0,\"length\":3,\"blob_sha256\":\"ab\",\"text\":\"hi\\n\"}"
            ),
            "{text}"
        );
        let empty = pb::RunEvent {
            event: Some(pb::run_event::Event::Provisioning(pb::Provisioning {})),
            ..ev
        };
        let text = serde_json::to_string(&RunEventView::new(&empty, None)).unwrap();
        assert_eq!(
            text,
            "{\"run_id\":\"run-1\",\"seq\":8,\"unix_ms\":1000,\"type\":\"provisioning\"}"
        );
    }

    #[test]
    fn a_session_event_is_one_flat_json_object_too() {
        let ev = pb::RunEvent {
            run_id: "run-1".into(),
            seq: 9,
            unix_ms: 1000,
            event: Some(pb::run_event::Event::ModelResponded(pb::ModelResponded {
                turn: 2,
                text: "done".into(),
                tool_calls: vec![pb::ToolCall {
                    call_id: "c1".into(),
                    tool: "shell".into(),
                    arguments_json: "{\"command\":\"ls\"}".into(),
                }],
                usage: Some(pb::Usage {
                    input_tokens: 10,
                    output_tokens: 3,
                    ..Default::default()
                }),
                ..Default::default()
            })),
        };
        let line = serde_json::to_value(RunEventView::new(&ev, None)).unwrap();
        assert_eq!(line["type"], "model_responded");
        assert_eq!(line["turn"], 2);
        assert_eq!(line["text"], "done");
        assert_eq!(line["tool_calls"][0]["tool"], "shell");
        assert_eq!(line["usage"]["input_tokens"], 10);
        // A job's approval carries no call id.
        let approval = pb::RunEvent {
            event: Some(pb::run_event::Event::ApprovalRequested(
                pb::RunApprovalRequested {
                    approval_id: "a1".into(),
                    ..Default::default()
                },
            )),
            ..ev
        };
        let line = serde_json::to_value(RunEventView::new(&approval, None)).unwrap();
        assert!(line.get("call_id").is_none(), "{line}");
    }

    #[test]
    fn a_long_text_is_cut_to_one_short_line() {
        assert_eq!(short_line("a\nb", 10), "a b");
        assert_eq!(short_line("abcdef", 6), "abcdef");
        assert_eq!(short_line("abcdefg", 6), "abcde…");
        assert_eq!(short_line("éééé", 3), "éé…");
    }

    #[test]
    fn usage_shows_a_cost_only_when_there_is_one() {
        let u = pb::Usage {
            input_tokens: 1200,
            output_tokens: 34,
            ..Default::default()
        };
        assert_eq!(usage_text(&u), "1200 input tokens, 34 output tokens");
        let u = pb::Usage {
            cache_read_input_tokens: 1000,
            cost_usd: 0.01234,
            ..u
        };
        assert_eq!(
            usage_text(&u),
            "1200 input tokens (1000 cached), 34 output tokens, $0.0123"
        );
    }

    #[test]
    fn a_token_shows_its_secret_only_when_made() {
        let t = pb::TokenInfo {
            id: "t1".into(),
            role: pb::Role::Auditor as i32,
            ..Default::default()
        };
        let listed = serde_json::to_value(TokenView::from(&t)).unwrap();
        assert_eq!(listed["role"], "auditor");
        assert!(listed.get("secret").is_none());
        let made = serde_json::to_value(TokenView::from(&t).with_secret("s")).unwrap();
        assert_eq!(made["secret"], "s");
    }
}
