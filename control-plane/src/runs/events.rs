//! A run's events and the state they fold into. Events are the truth:
//! [`RunView::fold`] rebuilds everything about a run from them, and the
//! `runs` table only caches the state for listing.

use serde::{Deserialize, Serialize};

use super::job::Job;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    Queued,
    Provisioning,
    Running,
    Succeeded,
    Failed,
    Cancelled,
    Interrupted,
    /// Waiting for a human to decide an approval.
    AwaitingApproval,
    /// An agent session that has answered and waits for a user message.
    Idle,
    /// An agent session waiting for its client's result of a client tool.
    AwaitingToolResult,
}

impl RunState {
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Queued => "queued",
            RunState::Provisioning => "provisioning",
            RunState::Running => "running",
            RunState::Succeeded => "succeeded",
            RunState::Failed => "failed",
            RunState::Cancelled => "cancelled",
            RunState::Interrupted => "interrupted",
            RunState::AwaitingApproval => "awaiting_approval",
            RunState::Idle => "idle",
            RunState::AwaitingToolResult => "awaiting_tool_result",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "queued" => RunState::Queued,
            "provisioning" => RunState::Provisioning,
            "running" => RunState::Running,
            "succeeded" => RunState::Succeeded,
            "failed" => RunState::Failed,
            "cancelled" => RunState::Cancelled,
            "interrupted" => RunState::Interrupted,
            "awaiting_approval" => RunState::AwaitingApproval,
            "idle" => RunState::Idle,
            "awaiting_tool_result" => RunState::AwaitingToolResult,
            _ => return None,
        })
    }

    pub fn is_finished(self) -> bool {
        matches!(
            self,
            RunState::Succeeded | RunState::Failed | RunState::Cancelled | RunState::Interrupted
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stream {
    Stdout,
    Stderr,
}

/// Everything that happens to a run, in the order it happened. Each one is
/// stored before the action it allows is taken.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
// Externally tagged (`{"step_output": {...}}`): decoding needs no
// buffering, which matters when a long run is rebuilt from its log.
#[serde(rename_all = "snake_case")]
pub enum Event {
    Submitted {
        owner: String,
        idempotency_key: String,
        job: Box<Job>,
        /// The token that submitted the run: policy decides its steps as
        /// that principal, and it can never approve them itself.
        #[serde(default)]
        by: Submitter,
    },
    /// Policy asked for a human approval before a step (`step`) or before
    /// the run's sandbox gets a network (`step` none).
    ApprovalRequested {
        approval_id: String,
        step: Option<u32>,
        /// An agent session's tool call (`step` none).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        call: Option<CallGate>,
    },
    /// The approval was decided (or expired); an approved one is used by
    /// the action right after.
    ApprovalDecided {
        approval_id: String,
        step: Option<u32>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        call: Option<CallGate>,
        /// approved, denied or expired.
        outcome: String,
        by: String,
        reason: String,
    },
    Provisioning,
    SandboxAssigned {
        sandbox_id: String,
        /// The agent's boot id (`Info.boot_id`): an agent with another one
        /// restarted (its container did) and has forgotten every exec.
        #[serde(default)]
        agent_boot_id: String,
    },
    /// Written before the agent is asked to run the step: a restarted
    /// control plane re-attaches by `exec_id` and never starts it again.
    StepStarted {
        step: u32,
        attempt: u32,
        exec_id: String,
        /// The boot id of the agent asked to run it, when it differs from
        /// the one before (the sandbox's container restarted in between).
        #[serde(default, skip_serializing_if = "String::is_empty")]
        agent_boot_id: String,
    },
    StepOutput {
        step: u32,
        stream: Stream,
        /// Offset within this step's stream (across attempts, the latest
        /// attempt's output follows the earlier ones).
        offset: u64,
        length: u64,
        blob_sha256: String,
        /// The agent's own offset (both streams, raw, this attempt) below
        /// which every byte of this stream is recorded. Bytes that might
        /// begin a secret wait for the next chunk (docs/recovery.md), so
        /// this can stand before the end of the chunk just read.
        agent_end: u64,
        /// The same for the other stream.
        #[serde(default)]
        agent_other_end: u64,
    },
    StepExited {
        step: u32,
        attempt: u32,
        exit_code: Option<i32>,
        signal: Option<i32>,
        timed_out: bool,
        oom_killed: bool,
        spawn_failure: String,
        duration_ms: u64,
    },
    ArtifactCollected {
        path: String,
        snapshot_id: String,
        sha256: String,
        size_bytes: u64,
    },
    CancelRequested {
        by: String,
        reason: String,
    },
    Finished {
        state: RunState,
        reason: String,
    },
    // ------------------------------------------------- agent sessions
    // (docs/harness.md). Contents are blobs; each event names only what is
    // new, so the log grows with what a turn adds.
    /// A user message (the blob is its text). `close`: the session ends
    /// once the model has answered it.
    UserMessage {
        message_id: String,
        text_sha256: String,
        #[serde(default)]
        close: bool,
    },
    /// Written before a model call. A second one for the same turn means
    /// the answer to the first was never recorded and the request went out
    /// again (counted as resent).
    ModelRequested {
        turn: u32,
        request_sha256: String,
        messages: u32,
    },
    /// The model's complete answer (the blob is the assistant message: its
    /// text and tool calls).
    ModelResponded {
        turn: u32,
        message_sha256: String,
        stop: String,
        usage: crate::harness::providers::Usage,
        /// At the model's prices, in billionths of a USD (none: no prices).
        #[serde(default)]
        cost_nano_usd: Option<u64>,
        #[serde(default)]
        response_id: String,
        #[serde(default)]
        model: String,
    },
    /// What became of one tool call before it runs: `allowed` or
    /// `approved` (it starts next), `client` (it waits for the client's
    /// result), or `denied`, `not_approved`, `invalid` (its error result
    /// follows).
    ToolCallDecided {
        call_id: String,
        tool: String,
        outcome: String,
        #[serde(default)]
        reason: String,
    },
    /// Written before a sandbox tool acts: a restarted control plane
    /// re-attaches an exec by `exec_id` and writes a file only with the
    /// content recorded here (`write_sha256`), never decides it again.
    ToolStarted {
        call_id: String,
        exec_id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        write_sha256: Option<String>,
    },
    /// A tool call's result as the model reads it (the blob); a result
    /// larger than the session's cap is stored whole too (`full_sha256`).
    ToolResult {
        call_id: String,
        content_sha256: String,
        is_error: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        full_sha256: Option<String>,
        #[serde(default)]
        full_bytes: u64,
        /// The client's message id, for a client tool's result.
        #[serde(default, skip_serializing_if = "String::is_empty")]
        message_id: String,
    },
    /// Messages `[0, upto)` of the conversation replaced by the blob's.
    ContextCompacted {
        upto: u32,
        replacement_sha256: String,
        tokens_before: u64,
        tokens_after: u64,
        /// What the summary call used, when the model summarised.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        usage: Option<crate::harness::providers::Usage>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cost_nano_usd: Option<u64>,
    },
    /// The model answered without calling a tool: the turn's result is its
    /// last message, and the session is idle.
    TurnFinished {
        turn: u32,
    },
    /// The client closed an idle session: its driver collects its artifacts
    /// and ends it (succeeded).
    CloseRequested {
        message_id: String,
    },
}

/// Which use of an approval a session's tool call is: the call, and which
/// of its policy requests (an edit is a read and a write).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallGate {
    pub call_id: String,
    pub request: u32,
}

/// What an approval of a run is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gate {
    Network,
    Step(u32),
    Call(CallGate),
}

impl Gate {
    pub fn of(step: Option<u32>, call: &Option<CallGate>) -> Gate {
        match (step, call) {
            (_, Some(c)) => Gate::Call(c.clone()),
            (Some(s), None) => Gate::Step(s),
            (None, None) => Gate::Network,
        }
    }

    pub fn step(&self) -> Option<u32> {
        match self {
            Gate::Step(s) => Some(*s),
            _ => None,
        }
    }

    pub fn call(&self) -> Option<CallGate> {
        match self {
            Gate::Call(c) => Some(c.clone()),
            _ => None,
        }
    }
}

impl Event {
    /// The conversation entry this event is, for a session's transcript.
    pub fn transcript_entry(&self) -> Option<crate::harness::transcript::Entry> {
        use crate::harness::transcript::Entry;
        Some(match self {
            Event::UserMessage {
                message_id,
                text_sha256,
                ..
            } => Entry::User {
                message_id: message_id.clone(),
                text_sha256: text_sha256.clone(),
            },
            Event::ModelRequested {
                turn,
                request_sha256,
                messages,
            } => Entry::ModelRequested {
                turn: *turn,
                request_sha256: request_sha256.clone(),
                messages: *messages,
            },
            Event::ModelResponded { message_sha256, .. } => Entry::Assistant {
                message_sha256: message_sha256.clone(),
            },
            Event::ToolResult {
                call_id,
                content_sha256,
                is_error,
                ..
            } => Entry::ToolResult {
                call_id: call_id.clone(),
                content_sha256: content_sha256.clone(),
                is_error: *is_error,
            },
            Event::ContextCompacted {
                upto,
                replacement_sha256,
                ..
            } => Entry::Compacted {
                upto: *upto,
                replacement_sha256: replacement_sha256.clone(),
            },
            _ => return None,
        })
    }
}

/// An agent session as its events describe it (beyond its conversation,
/// which is rebuilt from the same events and their blobs).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SessionView {
    /// Model answers recorded.
    pub responses: u32,
    /// Model requests recorded, resends included.
    pub requests: u32,
    /// Requests recorded again for a turn whose answer was never recorded.
    pub resent: u32,
    /// A request recorded with no answer after it: (turn, request hash).
    pub pending_request: Option<(u32, String)>,
    pub usage: crate::harness::providers::Usage,
    pub cost_nano_usd: u64,
    /// The input tokens of the last answered request.
    pub last_input_tokens: u64,
    /// Message ids of user messages and client results recorded.
    pub message_ids: std::collections::BTreeSet<String>,
    /// Tool calls of the last answer, by id, as far as they got.
    pub calls: std::collections::BTreeMap<String, CallView>,
    /// Tool calls the model made in all.
    pub tool_calls: u32,
    /// The blob of the model's last answer.
    pub last_answer_sha256: String,
    /// Whether the last answer ended a turn (no tool calls).
    pub turn_finished: bool,
    /// The session ends once the model has answered the last message.
    pub close_requested: bool,
    pub user_messages: u32,
    /// A compaction was recorded since the last answer (the next request
    /// goes out without compacting again).
    pub compacted: bool,
}

impl SessionView {
    fn add_usage(&mut self, usage: &crate::harness::providers::Usage, cost_nano_usd: Option<u64>) {
        self.usage.input_tokens += usage.input_tokens;
        self.usage.output_tokens += usage.output_tokens;
        self.usage.cache_read_input_tokens += usage.cache_read_input_tokens;
        self.usage.cache_creation_input_tokens += usage.cache_creation_input_tokens;
        self.cost_nano_usd += cost_nano_usd.unwrap_or(0);
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct CallView {
    pub tool: String,
    pub outcome: String,
    pub exec_id: String,
    pub write_sha256: Option<String>,
    pub answered: bool,
}

/// Who submitted a run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Submitter {
    pub token_id: String,
    pub name: String,
    pub role: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepState {
    Pending,
    Running,
    Succeeded,
    Failed,
    Skipped,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepView {
    pub state: StepState,
    pub attempts: u32,
    pub exec_id: String,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub timed_out: bool,
    pub stdout_bytes: u64,
    pub stderr_bytes: u64,
    /// Per stream (stdout, stderr), the agent's output offset below which
    /// the current attempt's bytes of that stream are recorded.
    pub agent_recorded: [u64; 2],
}

impl StepView {
    /// Where a re-attach to the current attempt continues: bytes from here
    /// on are either unrecorded or skipped by their stream's position.
    pub fn agent_resume_offset(&self) -> u64 {
        self.agent_recorded[0].min(self.agent_recorded[1])
    }
}

impl Stream {
    pub fn index(self) -> usize {
        match self {
            Stream::Stdout => 0,
            Stream::Stderr => 1,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Artifact {
    pub path: String,
    pub snapshot_id: String,
    pub sha256: String,
    pub size_bytes: u64,
}

/// A run as its events describe it.
#[derive(Debug, Clone, PartialEq)]
pub struct RunView {
    pub owner: String,
    pub idempotency_key: String,
    pub job: Job,
    pub state: RunState,
    pub steps: Vec<StepView>,
    pub sandbox_id: Option<String>,
    /// The boot id of the sandbox's agent as last recorded.
    pub agent_boot_id: String,
    pub cancel_requested: Option<String>,
    pub reason: String,
    pub artifacts: Vec<Artifact>,
    pub last_seq: u64,
    pub submitted_by: Submitter,
    /// The approval the run waits for, and what for.
    pub awaiting: Option<(String, Gate)>,
    /// An approval granted and not yet used by its action.
    pub approved: Option<(String, Gate)>,
    /// Agent sessions only.
    pub session: Option<SessionView>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FoldError {
    #[error("a run's log must start with `submitted`")]
    NotSubmitted,
    #[error("event {seq} follows {prev}: the log has a gap or a duplicate")]
    Gap { seq: u64, prev: u64 },
    #[error("event {seq} names step {step}, and the job has {steps}")]
    NoSuchStep { seq: u64, step: u32, steps: usize },
    #[error("event {seq} is a session's, and the run is a job")]
    NotASession { seq: u64 },
}

impl RunView {
    /// Folds `(seq, event)` pairs, numbered from 1 without gaps.
    pub fn fold<'a>(events: impl IntoIterator<Item = (u64, &'a Event)>) -> Result<Self, FoldError> {
        let mut events = events.into_iter();
        let (seq, first) = events.next().ok_or(FoldError::NotSubmitted)?;
        let Event::Submitted {
            owner,
            idempotency_key,
            job,
            by,
        } = first
        else {
            return Err(FoldError::NotSubmitted);
        };
        if seq != 1 {
            return Err(FoldError::Gap { seq, prev: 0 });
        }
        let mut view = RunView {
            owner: owner.clone(),
            idempotency_key: idempotency_key.clone(),
            steps: vec![
                StepView {
                    state: StepState::Pending,
                    attempts: 0,
                    exec_id: String::new(),
                    exit_code: None,
                    signal: None,
                    timed_out: false,
                    stdout_bytes: 0,
                    stderr_bytes: 0,
                    agent_recorded: [0, 0],
                };
                job.steps.len()
            ],
            job: job.as_ref().clone(),
            state: RunState::Queued,
            sandbox_id: None,
            agent_boot_id: String::new(),
            cancel_requested: None,
            reason: String::new(),
            artifacts: Vec::new(),
            last_seq: 1,
            submitted_by: by.clone(),
            awaiting: None,
            approved: None,
            session: job.agent.as_ref().map(|_| SessionView::default()),
        };
        for (seq, event) in events {
            if seq != view.last_seq + 1 {
                return Err(FoldError::Gap {
                    seq,
                    prev: view.last_seq,
                });
            }
            view.last_seq = seq;
            view.apply(seq, event)?;
        }
        Ok(view)
    }

    /// `view` with one more event applied.
    pub fn fold_onto(view: &RunView, seq: u64, event: &Event) -> Result<RunView, FoldError> {
        if seq != view.last_seq + 1 {
            return Err(FoldError::Gap {
                seq,
                prev: view.last_seq,
            });
        }
        let mut next = view.clone();
        next.last_seq = seq;
        next.apply(seq, event)?;
        Ok(next)
    }

    fn step_mut(&mut self, seq: u64, step: u32) -> Result<&mut StepView, FoldError> {
        let steps = self.steps.len();
        self.steps
            .get_mut(step as usize)
            .ok_or(FoldError::NoSuchStep { seq, step, steps })
    }

    fn apply(&mut self, seq: u64, event: &Event) -> Result<(), FoldError> {
        match event {
            Event::Submitted { .. } => return Err(FoldError::Gap { seq, prev: seq }),
            Event::Provisioning => self.state = RunState::Provisioning,
            Event::SandboxAssigned {
                sandbox_id,
                agent_boot_id,
            } => {
                self.sandbox_id = Some(sandbox_id.clone());
                self.agent_boot_id = agent_boot_id.clone();
                self.state = RunState::Running;
                if matches!(self.approved, Some((_, Gate::Network))) {
                    self.approved = None;
                }
            }
            Event::StepStarted {
                step,
                attempt,
                exec_id,
                agent_boot_id,
            } => {
                if !agent_boot_id.is_empty() {
                    self.agent_boot_id = agent_boot_id.clone();
                }
                let s = self.step_mut(seq, *step)?;
                s.state = StepState::Running;
                s.attempts = *attempt;
                s.exec_id = exec_id.clone();
                s.agent_recorded = [0, 0];
                self.state = RunState::Running;
                if matches!(&self.approved, Some((_, Gate::Step(a))) if a == step) {
                    self.approved = None;
                }
            }
            Event::ApprovalRequested {
                approval_id,
                step,
                call,
            } => {
                if let Some(step) = step {
                    self.step_mut(seq, *step)?;
                }
                self.awaiting = Some((approval_id.clone(), Gate::of(*step, call)));
                self.state = RunState::AwaitingApproval;
            }
            Event::ApprovalDecided {
                approval_id,
                step,
                call,
                outcome,
                ..
            } => {
                self.awaiting = None;
                if outcome == "approved" {
                    self.approved = Some((approval_id.clone(), Gate::of(*step, call)));
                }
                self.state = if self.sandbox_id.is_some() {
                    RunState::Running
                } else {
                    RunState::Provisioning
                };
            }
            Event::StepOutput {
                step,
                stream,
                offset,
                length,
                agent_end,
                agent_other_end,
                ..
            } => {
                let s = self.step_mut(seq, *step)?;
                let (this, other) = (stream.index(), 1 - stream.index());
                s.agent_recorded[this] = s.agent_recorded[this].max(*agent_end);
                s.agent_recorded[other] = s.agent_recorded[other].max(*agent_other_end);
                let end = offset + length;
                match stream {
                    Stream::Stdout => s.stdout_bytes = s.stdout_bytes.max(end),
                    Stream::Stderr => s.stderr_bytes = s.stderr_bytes.max(end),
                }
            }
            Event::StepExited {
                step,
                exit_code,
                signal,
                timed_out,
                spawn_failure,
                ..
            } => {
                let s = self.step_mut(seq, *step)?;
                s.exit_code = *exit_code;
                s.signal = *signal;
                s.timed_out = *timed_out;
                s.state = if *exit_code == Some(0) && spawn_failure.is_empty() {
                    StepState::Succeeded
                } else {
                    StepState::Failed
                };
            }
            Event::ArtifactCollected {
                path,
                snapshot_id,
                sha256,
                size_bytes,
            } => self.artifacts.push(Artifact {
                path: path.clone(),
                snapshot_id: snapshot_id.clone(),
                sha256: sha256.clone(),
                size_bytes: *size_bytes,
            }),
            Event::CancelRequested { reason, .. } => {
                self.cancel_requested = Some(reason.clone());
            }
            Event::Finished { state, reason } => {
                self.state = *state;
                self.reason = reason.clone();
                self.awaiting = None;
                for s in &mut self.steps {
                    if s.state == StepState::Pending {
                        s.state = StepState::Skipped;
                    }
                }
            }
            session_event => return self.apply_session(seq, session_event),
        }
        Ok(())
    }

    fn apply_session(&mut self, seq: u64, event: &Event) -> Result<(), FoldError> {
        let finished = self.state.is_finished();
        let Some(s) = self.session.as_mut() else {
            return Err(FoldError::NotASession { seq });
        };
        let mut state = None;
        match event {
            Event::UserMessage {
                message_id, close, ..
            } => {
                s.message_ids.insert(message_id.clone());
                s.close_requested |= *close;
                s.turn_finished = false;
                s.user_messages += 1;
                state = Some(RunState::Running);
            }
            Event::ModelRequested {
                turn,
                request_sha256,
                ..
            } => {
                if matches!(&s.pending_request, Some((t, _)) if t == turn) {
                    s.resent += 1;
                }
                s.requests += 1;
                s.pending_request = Some((*turn, request_sha256.clone()));
                state = Some(RunState::Running);
            }
            Event::ModelResponded {
                message_sha256,
                usage,
                cost_nano_usd,
                ..
            } => {
                s.pending_request = None;
                s.responses += 1;
                s.add_usage(usage, *cost_nano_usd);
                s.last_input_tokens = usage.input_tokens;
                // The model call's approval, if it had one, is used.
                if matches!(&self.approved, Some((_, Gate::Call(c))) if c.call_id.starts_with('#'))
                {
                    self.approved = None;
                }
                s.last_answer_sha256 = message_sha256.clone();
                s.calls.clear();
                s.compacted = false;
            }
            Event::ToolCallDecided {
                call_id,
                tool,
                outcome,
                ..
            } => {
                let call = s.calls.entry(call_id.clone()).or_default();
                if call.outcome.is_empty() {
                    s.tool_calls += 1;
                }
                call.tool = tool.clone();
                call.outcome = outcome.clone();
                if outcome == "client" {
                    state = Some(RunState::AwaitingToolResult);
                }
            }
            Event::ToolStarted {
                call_id,
                exec_id,
                write_sha256,
            } => {
                let call = s.calls.entry(call_id.clone()).or_default();
                call.exec_id = exec_id.clone();
                call.write_sha256 = write_sha256.clone();
                if matches!(&self.approved, Some((_, Gate::Call(c))) if &c.call_id == call_id) {
                    self.approved = None;
                }
            }
            Event::ToolResult {
                call_id,
                message_id,
                ..
            } => {
                s.calls.entry(call_id.clone()).or_default().answered = true;
                if !message_id.is_empty() {
                    s.message_ids.insert(message_id.clone());
                }
                if matches!(&self.approved, Some((_, Gate::Call(c))) if &c.call_id == call_id) {
                    self.approved = None;
                }
                state = Some(RunState::Running);
            }
            Event::ContextCompacted {
                usage,
                cost_nano_usd,
                ..
            } => {
                s.compacted = true;
                if let Some(u) = usage {
                    s.add_usage(u, *cost_nano_usd);
                }
                if matches!(&self.approved, Some((_, Gate::Call(c))) if c.call_id.starts_with('#'))
                {
                    self.approved = None;
                }
            }
            Event::TurnFinished { .. } => {
                s.turn_finished = true;
                state = Some(RunState::Idle);
            }
            Event::CloseRequested { message_id } => {
                s.message_ids.insert(message_id.clone());
                s.close_requested = true;
                state = Some(RunState::Running);
            }
            _ => unreachable!("apply handles every run event"),
        }
        if let Some(state) = state {
            if !finished {
                self.state = state;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests_support {
    use super::*;
    use crate::runs::job::{Command, Step};

    /// A job of `steps` shell steps, for tests.
    pub fn job(steps: usize) -> Job {
        Job {
            image: None,
            from_snapshot: None,
            memory_bytes: None,
            cpu_millis: None,
            pids: None,
            disk_bytes: None,
            network: None,
            env: Default::default(),
            secret_names: vec![],
            inputs: vec![],
            steps: (0..steps)
                .map(|i| Step {
                    name: format!("s{i}"),
                    command: Command::Shell("true".into()),
                    env: Default::default(),
                    cwd: String::new(),
                    timeout_secs: 0,
                    continue_on_error: false,
                    idempotent: false,
                    retries: 0,
                })
                .collect(),
            artifacts: vec![],
            labels: Default::default(),
            agent: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::tests_support::job;
    use super::*;

    fn exited(step: u32, code: i32) -> Event {
        Event::StepExited {
            step,
            attempt: 1,
            exit_code: Some(code),
            signal: None,
            timed_out: false,
            oom_killed: false,
            spawn_failure: String::new(),
            duration_ms: 1,
        }
    }

    #[test]
    fn a_run_folds_from_its_events() {
        let events = [
            Event::Submitted {
                owner: "a".into(),
                idempotency_key: "k".into(),
                job: Box::new(job(3)),
                by: Submitter::default(),
            },
            Event::Provisioning,
            Event::SandboxAssigned {
                sandbox_id: "sb-1".into(),
                agent_boot_id: "b1".into(),
            },
            Event::StepStarted {
                step: 0,
                attempt: 1,
                exec_id: "x0".into(),
                agent_boot_id: String::new(),
            },
            Event::StepOutput {
                step: 0,
                stream: Stream::Stdout,
                offset: 0,
                length: 5,
                blob_sha256: "h".into(),
                agent_end: 5,
                agent_other_end: 5,
            },
            exited(0, 0),
            Event::StepStarted {
                step: 1,
                attempt: 1,
                exec_id: "x1".into(),
                agent_boot_id: String::new(),
            },
            exited(1, 2),
            Event::Finished {
                state: RunState::Failed,
                reason: "step s1 exited with 2".into(),
            },
        ];
        let v = RunView::fold(events.iter().enumerate().map(|(i, e)| (i as u64 + 1, e))).unwrap();
        assert_eq!(v.state, RunState::Failed);
        assert_eq!(v.last_seq, 9);
        assert_eq!(v.sandbox_id.as_deref(), Some("sb-1"));
        assert_eq!(v.steps[0].state, StepState::Succeeded);
        assert_eq!(v.steps[0].stdout_bytes, 5);
        assert_eq!(v.steps[1].state, StepState::Failed);
        assert_eq!(v.steps[1].exec_id, "x1");
        assert_eq!(v.steps[2].state, StepState::Skipped);
        // Halfway through, the same log says where the run stands.
        let partial = RunView::fold(
            events[..7]
                .iter()
                .enumerate()
                .map(|(i, e)| (i as u64 + 1, e)),
        )
        .unwrap();
        assert_eq!(partial.state, RunState::Running);
        assert_eq!(partial.steps[1].state, StepState::Running);
    }

    #[test]
    fn gaps_duplicates_and_strangers_are_refused() {
        let s = Event::Submitted {
            owner: "a".into(),
            idempotency_key: "k".into(),
            job: Box::new(job(1)),
            by: Submitter::default(),
        };
        let p = Event::Provisioning;
        assert_eq!(
            RunView::fold([(1, &s), (3, &p)]).unwrap_err(),
            FoldError::Gap { seq: 3, prev: 1 }
        );
        assert_eq!(
            RunView::fold([(1, &s), (2, &p), (2, &p)]).unwrap_err(),
            FoldError::Gap { seq: 2, prev: 2 }
        );
        assert_eq!(
            RunView::fold([(1, &p)]).unwrap_err(),
            FoldError::NotSubmitted
        );
        let bad = exited(7, 0);
        assert!(matches!(
            RunView::fold([(1, &s), (2, &bad)]).unwrap_err(),
            FoldError::NoSuchStep { step: 7, .. }
        ));
    }
}
