//! `bridle.control.v1.Runs`.

use std::collections::BTreeMap;
use std::pin::Pin;

use bridle_proto::control::v1 as pb;
use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::auth::Principal;
use crate::runs::events::{Event, RunState, RunView, StepState, Stream as LogStream};
use crate::runs::executor::Runner;
use crate::runs::job::{Command, Submitted};
use crate::runs::store::{EventStore, NewRun, SqlEvents, StoredEvent, Submission};
use crate::runtime::Runtime;
use crate::sandboxes::{Network, Sandboxes};

pub struct RunsApi<R: Runtime> {
    pub runner: Runner<Sandboxes<R>, SqlEvents>,
    pub guard: crate::guard::Guard,
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

use super::status::run as run_status;

fn state_pb(s: RunState) -> pb::RunState {
    match s {
        RunState::Queued => pb::RunState::Queued,
        RunState::Provisioning => pb::RunState::Provisioning,
        RunState::Running => pb::RunState::Running,
        RunState::Succeeded => pb::RunState::Succeeded,
        RunState::Failed => pb::RunState::Failed,
        RunState::Cancelled => pb::RunState::Cancelled,
        RunState::Interrupted => pb::RunState::Interrupted,
        RunState::AwaitingApproval => pb::RunState::AwaitingApproval,
        RunState::Idle => pb::RunState::Idle,
        RunState::AwaitingToolResult => pb::RunState::AwaitingToolResult,
    }
}

fn stream_pb(s: LogStream) -> pb::LogStream {
    match s {
        LogStream::Stdout => pb::LogStream::Stdout,
        LogStream::Stderr => pb::LogStream::Stderr,
    }
}

/// The run as the API shows it: the job as submitted, secrets as `***`.
pub fn run_pb(id: &str, v: &RunView, created_unix_ms: i64, finished_unix_ms: i64) -> pb::Run {
    let job = &v.job;
    pb::Run {
        id: id.to_string(),
        owner: v.owner.clone(),
        state: state_pb(v.state) as i32,
        idempotency_key: v.idempotency_key.clone(),
        job: Some(pb::Job {
            image: job.image.clone().unwrap_or_default(),
            from_snapshot: job.from_snapshot.clone().unwrap_or_default(),
            limits: Some(pb::Limits {
                memory_bytes: job.memory_bytes,
                cpu_millis: job.cpu_millis,
                pids: job.pids,
                disk_bytes: job.disk_bytes,
            }),
            network: match job.network {
                None => pb::NetworkMode::Unspecified,
                Some(Network::None) => pb::NetworkMode::None,
                Some(Network::Bridge) => pb::NetworkMode::Bridge,
                Some(Network::Egress) => pb::NetworkMode::Egress,
            } as i32,
            env: job.env.clone().into_iter().collect(),
            secrets: job
                .secret_names
                .iter()
                .map(|n| (n.clone(), "***".to_string()))
                .collect(),
            inputs: job
                .inputs
                .iter()
                .map(|f| pb::InputFile {
                    path: f.path.clone(),
                    content: Default::default(),
                    mode: f.mode,
                })
                .collect(),
            steps: job
                .steps
                .iter()
                .map(|s| {
                    let (argv, shell) = match &s.command {
                        Command::Argv(a) => (a.clone(), String::new()),
                        Command::Shell(sh) => (Vec::new(), sh.clone()),
                    };
                    pb::Step {
                        name: s.name.clone(),
                        argv,
                        shell,
                        env: s.env.clone().into_iter().collect(),
                        cwd: s.cwd.clone(),
                        timeout_seconds: s.timeout_secs,
                        continue_on_error: s.continue_on_error,
                        idempotent: s.idempotent,
                        retries: s.retries,
                    }
                })
                .collect(),
            artifacts: job.artifacts.clone(),
            labels: job.labels.clone().into_iter().collect(),
        }),
        steps: v
            .steps
            .iter()
            .enumerate()
            .map(|(i, s)| pb::StepStatus {
                index: i as u32,
                name: job.steps[i].name.clone(),
                state: match s.state {
                    StepState::Pending => pb::StepState::Pending,
                    StepState::Running => pb::StepState::Running,
                    StepState::Succeeded => pb::StepState::Succeeded,
                    StepState::Failed => pb::StepState::Failed,
                    StepState::Skipped => pb::StepState::Skipped,
                } as i32,
                attempts: s.attempts,
                exit_code: s.exit_code,
                signal: s.signal,
                timed_out: s.timed_out,
                stdout_bytes: s.stdout_bytes,
                stderr_bytes: s.stderr_bytes,
                exec_id: s.exec_id.clone(),
            })
            .collect(),
        sandbox_id: v.sandbox_id.clone().unwrap_or_default(),
        reason: v.reason.clone(),
        created_unix_ms,
        finished_unix_ms,
        last_seq: v.last_seq,
        artifacts: v
            .artifacts
            .iter()
            .map(|a| pb::Artifact {
                path: a.path.clone(),
                snapshot_id: a.snapshot_id.clone(),
                sha256: a.sha256.clone(),
                size_bytes: a.size_bytes,
            })
            .collect(),
        approval_id: v
            .awaiting
            .as_ref()
            .map(|(id, _)| id.clone())
            .unwrap_or_default(),
        // Filled from the session's blobs by `session_pb`.
        session: None,
        agent: job.agent.as_ref().map(|task| {
            let mut t = crate::harness::task::task_pb(task);
            t.sandbox = None;
            t
        }),
    }
}

fn usage_pb(u: &crate::harness::providers::Usage, cost_nano_usd: u64) -> pb::Usage {
    pb::Usage {
        input_tokens: u.input_tokens,
        output_tokens: u.output_tokens,
        cache_read_input_tokens: u.cache_read_input_tokens,
        cache_creation_input_tokens: u.cache_creation_input_tokens,
        cost_usd: cost_nano_usd as f64 / 1e9,
    }
}

fn calls_pb(calls: &[crate::harness::providers::ToolCall]) -> Vec<pb::ToolCall> {
    calls
        .iter()
        .map(|c| pb::ToolCall {
            call_id: c.id.clone(),
            tool: c.name.clone(),
            arguments_json: c.arguments.to_json_text(),
        })
        .collect()
}

/// A blob the log refers to; a missing one is data loss, said as such.
async fn blob<S: EventStore>(store: &S, sha256: &str) -> Result<Vec<u8>, Status> {
    match store.blob(sha256).await {
        Ok(Some(data)) => Ok(data),
        Ok(None) => Err(Status::data_loss(format!(
            "blob {sha256} of the session is missing"
        ))),
        Err(e) => Err(run_status(e.into())),
    }
}

/// The model's answer stored in blob `sha256`: its text and calls.
async fn answer<S: EventStore>(
    store: &S,
    sha256: &str,
) -> Result<(String, Vec<crate::harness::providers::ToolCall>), Status> {
    let data = blob(store, sha256).await?;
    match serde_json::from_slice(&data) {
        Ok(crate::harness::providers::Message::Assistant { text, tool_calls }) => {
            Ok((text, tool_calls))
        }
        _ => Err(Status::data_loss(format!(
            "blob {sha256} is not the model's answer"
        ))),
    }
}

/// A session's state as the API shows it.
async fn session_pb<S: EventStore>(store: &S, v: &RunView) -> Result<Option<pb::Session>, Status> {
    let Some(s) = &v.session else {
        return Ok(None);
    };
    // The answer's blob is read only when something of it is shown: its
    // text once the turn is over, its calls while the client owes results.
    let owes = s
        .calls
        .values()
        .any(|c| c.outcome == "client" && !c.answered);
    let (text, calls) = if s.last_answer_sha256.is_empty() || !(s.turn_finished || owes) {
        (String::new(), Vec::new())
    } else {
        answer(store, &s.last_answer_sha256).await?
    };
    let pending: Vec<_> = calls
        .into_iter()
        .filter(|c| {
            s.calls
                .get(&c.id)
                .is_some_and(|k| k.outcome == "client" && !k.answered)
        })
        .collect();
    Ok(Some(pb::Session {
        turns: s.responses,
        model_requests: s.requests,
        model_requests_resent: s.resent,
        usage: Some(usage_pb(&s.usage, s.cost_nano_usd)),
        answer: if s.turn_finished { text } else { String::new() },
        pending_tool_calls: calls_pb(&pending),
        tool_calls: s.tool_calls,
        model: v
            .job
            .agent
            .as_ref()
            .map(|t| t.model.clone())
            .unwrap_or_default(),
    }))
}

/// A stored event as the API shows it, with what a session's events refer
/// to read from their blobs.
pub async fn event_pb_full<S: EventStore>(
    store: &S,
    run_id: &str,
    e: &StoredEvent,
) -> Result<pb::RunEvent, Status> {
    use pb::run_event::Event as P;
    let text = |data: Vec<u8>| String::from_utf8_lossy(&data).into_owned();
    let event = match &e.event {
        Event::UserMessage {
            message_id,
            text_sha256,
            close,
        } => P::UserMessage(pb::SessionUserMessage {
            message_id: message_id.clone(),
            text: text(blob(store, text_sha256).await?),
            close: *close,
        }),
        Event::ModelResponded {
            turn,
            message_sha256,
            stop,
            usage,
            cost_nano_usd,
            model,
            ..
        } => {
            let (answer_text, calls) = answer(store, message_sha256).await?;
            P::ModelResponded(pb::ModelResponded {
                turn: *turn,
                text: answer_text,
                tool_calls: calls_pb(&calls),
                stop_reason: stop.clone(),
                usage: Some(usage_pb(usage, cost_nano_usd.unwrap_or(0))),
                model: model.clone(),
            })
        }
        Event::ToolResult {
            call_id,
            content_sha256,
            is_error,
            full_bytes,
            ..
        } => P::ToolResult(pb::SessionToolResult {
            call_id: call_id.clone(),
            content: text(blob(store, content_sha256).await?),
            is_error: *is_error,
            full_bytes: *full_bytes,
        }),
        _ => return Ok(event_pb(run_id, e)),
    };
    Ok(pb::RunEvent {
        run_id: run_id.to_string(),
        seq: e.seq,
        unix_ms: e.unix_ms,
        event: Some(event),
    })
}

pub fn event_pb(run_id: &str, e: &StoredEvent) -> pb::RunEvent {
    use pb::run_event::Event as P;
    let event = match &e.event {
        Event::ApprovalRequested {
            approval_id,
            step,
            call,
        } => P::ApprovalRequested(pb::RunApprovalRequested {
            approval_id: approval_id.clone(),
            step: step.unwrap_or(0),
            for_network: step.is_none() && call.is_none(),
            call_id: call.as_ref().map(|c| c.call_id.clone()).unwrap_or_default(),
        }),
        Event::ApprovalDecided {
            approval_id,
            step,
            call,
            outcome,
            by,
            reason,
        } => P::ApprovalDecided(pb::RunApprovalDecided {
            approval_id: approval_id.clone(),
            step: step.unwrap_or(0),
            for_network: step.is_none() && call.is_none(),
            call_id: call.as_ref().map(|c| c.call_id.clone()).unwrap_or_default(),
            outcome: outcome.clone(),
            by: by.clone(),
            reason: reason.clone(),
        }),
        Event::Submitted {
            owner,
            idempotency_key,
            job,
            ..
        } => P::Submitted(pb::RunSubmitted {
            owner: owner.clone(),
            idempotency_key: idempotency_key.clone(),
            steps: job.steps.len() as u32,
        }),
        Event::Provisioning => P::Provisioning(pb::Provisioning {}),
        Event::SandboxAssigned { sandbox_id, .. } => P::Sandbox(pb::SandboxAssigned {
            sandbox_id: sandbox_id.clone(),
        }),
        Event::StepStarted {
            step,
            attempt,
            exec_id,
            ..
        } => P::StepStarted(pb::StepStarted {
            step: *step,
            attempt: *attempt,
            exec_id: exec_id.clone(),
        }),
        Event::StepOutput {
            step,
            stream,
            offset,
            length,
            blob_sha256,
            ..
        } => P::StepOutput(pb::StepOutput {
            step: *step,
            stream: stream_pb(*stream) as i32,
            offset: *offset,
            length: *length,
            blob_sha256: blob_sha256.clone(),
        }),
        Event::StepExited {
            step,
            attempt,
            exit_code,
            signal,
            timed_out,
            oom_killed,
            spawn_failure,
            duration_ms,
        } => P::StepExited(pb::StepExited {
            step: *step,
            attempt: *attempt,
            exit_code: *exit_code,
            signal: *signal,
            timed_out: *timed_out,
            oom_killed: *oom_killed,
            spawn_failure: spawn_failure.clone(),
            duration_ms: *duration_ms,
        }),
        Event::ArtifactCollected {
            path,
            snapshot_id,
            sha256,
            size_bytes,
        } => P::Artifact(pb::ArtifactCollected {
            artifact: Some(pb::Artifact {
                path: path.clone(),
                snapshot_id: snapshot_id.clone(),
                sha256: sha256.clone(),
                size_bytes: *size_bytes,
            }),
        }),
        Event::CancelRequested { by, reason } => P::CancelRequested(pb::CancelRequested {
            by: by.clone(),
            reason: reason.clone(),
        }),
        Event::Finished { state, reason } => P::Finished(pb::RunFinished {
            state: state_pb(*state) as i32,
            reason: reason.clone(),
        }),
        // Without their blobs (`event_pb_full` reads them).
        Event::UserMessage {
            message_id, close, ..
        } => P::UserMessage(pb::SessionUserMessage {
            message_id: message_id.clone(),
            text: String::new(),
            close: *close,
        }),
        Event::ModelRequested {
            turn,
            request_sha256,
            messages,
        } => P::ModelRequested(pb::ModelRequested {
            turn: *turn,
            request_sha256: request_sha256.clone(),
            messages: *messages,
            resent: false,
        }),
        Event::ModelResponded {
            turn,
            stop,
            usage,
            cost_nano_usd,
            model,
            ..
        } => P::ModelResponded(pb::ModelResponded {
            turn: *turn,
            stop_reason: stop.clone(),
            usage: Some(usage_pb(usage, cost_nano_usd.unwrap_or(0))),
            model: model.clone(),
            ..Default::default()
        }),
        Event::ToolCallDecided {
            call_id,
            tool,
            outcome,
            reason,
        } => P::ToolCallDecided(pb::ToolCallDecided {
            call_id: call_id.clone(),
            tool: tool.clone(),
            outcome: outcome.clone(),
            reason: reason.clone(),
        }),
        Event::ToolStarted {
            call_id, exec_id, ..
        } => P::ToolStarted(pb::ToolStarted {
            call_id: call_id.clone(),
            exec_id: exec_id.clone(),
        }),
        Event::ToolResult {
            call_id,
            is_error,
            full_bytes,
            ..
        } => P::ToolResult(pb::SessionToolResult {
            call_id: call_id.clone(),
            content: String::new(),
            is_error: *is_error,
            full_bytes: *full_bytes,
        }),
        Event::ContextCompacted {
            upto,
            tokens_before,
            tokens_after,
            ..
        } => P::ContextCompacted(pb::ContextCompacted {
            messages: *upto,
            tokens_before: *tokens_before,
            tokens_after: *tokens_after,
        }),
        Event::TurnFinished { turn } => P::TurnFinished(pb::TurnFinished { turn: *turn }),
        Event::CloseRequested { message_id } => P::CloseRequested(pb::SessionCloseRequested {
            message_id: message_id.clone(),
        }),
    };
    pb::RunEvent {
        run_id: run_id.to_string(),
        seq: e.seq,
        unix_ms: e.unix_ms,
        event: Some(event),
    }
}

impl<R: Runtime> RunsApi<R> {
    /// The run's view and its first/last timestamps, when `principal` may see it.
    async fn visible(&self, principal: &Principal, run_id: &str) -> Result<pb::Run, Status> {
        let events = self
            .runner
            .store()
            .events(run_id, 1)
            .await
            .map_err(|e| run_status(e.into()))?;
        let not_found = || Status::not_found(format!("run {run_id} not found"));
        let first = events.first().ok_or_else(not_found)?;
        let view = RunView::fold(events.iter().map(|e| (e.seq, &e.event)))
            .map_err(|e| super::status::internal(&format!("run {run_id}"), e))?;
        if !principal.sees(Some(&view.owner)) {
            return Err(not_found());
        }
        let finished = if view.state.is_finished() {
            events.last().map(|e| e.unix_ms).unwrap_or(0)
        } else {
            0
        };
        let mut run = run_pb(run_id, &view, first.unix_ms, finished);
        run.session = session_pb(self.runner.store(), &view).await?;
        Ok(run)
    }
}

#[tonic::async_trait]
impl<R: Runtime> pb::runs_server::Runs for RunsApi<R> {
    async fn submit(
        &self,
        request: Request<pb::SubmitRunRequest>,
    ) -> Result<Response<pb::Run>, Status> {
        let principal = super::caller(&request)?;
        principal.require_write()?;
        let req = request.get_ref().clone();
        let key = req.idempotency_key.trim().to_string();
        if key.is_empty() || key.len() > 200 {
            return Err(Status::invalid_argument(
                "idempotency_key is required (1 to 200 characters): the same key returns the same run",
            ));
        }
        let submitted = match (req.job, req.agent) {
            (Some(job), None) => Submitted::try_from(job)
                .map_err(|e| Status::invalid_argument(format!("job.{e}")))?,
            (None, Some(task)) => {
                let harness = self.runner.harness();
                crate::harness::task::validate(
                    task,
                    &harness.max_budgets,
                    &harness.model_names(),
                    harness.tool_timeout_secs,
                )
                .map_err(|e| Status::invalid_argument(format!("agent.{e}")))?
            }
            (Some(_), Some(_)) => {
                return Err(Status::invalid_argument(
                    "job and agent: send one of them (a job's steps, or an agent task)",
                ))
            }
            (None, None) => {
                return Err(Status::invalid_argument(
                    "job or agent is required (a job's steps, or an agent task)",
                ))
            }
        };
        let store = self.runner.store();
        for (sha, data) in &submitted.blobs {
            store
                .put_blob(sha, data)
                .await
                .map_err(|e| run_status(e.into()))?;
        }
        let run_id = format!("run-{}", crate::ids::random_hex(8));
        // The run as a whole; each step is decided again when it starts.
        let facts = crate::guard::facts::job(&submitted.job, &run_id);
        let resource = crate::guard::facts::run(&run_id, &principal.owner);
        let note = super::note_of(&request);
        self.guard
            .screen(
                &crate::guard::Record::Call(&note),
                crate::guard::Ask {
                    principal: &principal,
                    action: crate::policy::Action::RunSubmit,
                    resource: &resource,
                    facts: &facts,
                },
            )
            .await?;
        // A session's model is chosen by policy too: a tenant not allowed
        // the model learns it now, not at its first turn.
        if let Some(task) = &submitted.job.agent {
            let provider = self
                .runner
                .harness()
                .providers
                .get(&task.model)
                .map(|p| p.config().provider.as_str())
                .unwrap_or_default();
            let model_facts = crate::policy::Facts {
                model: task.model.clone(),
                provider: provider.to_string(),
                ..crate::guard::facts::job(&submitted.job, &run_id)
            };
            self.guard
                .screen(
                    &crate::guard::Record::Call(&note),
                    crate::guard::Ask {
                        principal: &principal,
                        action: crate::policy::Action::ModelCall,
                        resource: &resource,
                        facts: &model_facts,
                    },
                )
                .await?;
        }
        let first = Event::Submitted {
            owner: principal.owner.clone(),
            idempotency_key: key.clone(),
            job: Box::new(submitted.job),
            by: crate::runs::events::Submitter {
                token_id: principal.token_id.clone(),
                name: principal.name.clone(),
                role: principal.role.as_str().to_string(),
            },
        };
        let Event::Submitted { job, .. } = &first else {
            unreachable!("built just above")
        };
        let sealed =
            (!submitted.secrets.is_empty()).then(|| self.runner.seal(&run_id, &submitted.secrets));
        let outcome = store
            .submit(NewRun {
                run_id: &run_id,
                owner: &principal.owner,
                idempotency_key: &key,
                first: &first,
                labels: &job.labels,
                sealed_secrets: sealed.as_deref(),
                now: crate::clock::now_ms(),
            })
            .await
            .map_err(|e| run_status(e.into()))?;
        let id = match outcome {
            Submission::Created(id) => {
                self.runner.schedule(&principal.owner, &id);
                tracing::info!(run = %id, owner = %principal.owner, "run submitted");
                id
            }
            Submission::Existing(id) => id,
        };
        Ok(Response::new(self.visible(&principal, &id).await?))
    }

    async fn get(&self, request: Request<pb::GetRunRequest>) -> Result<Response<pb::Run>, Status> {
        let principal = super::caller(&request)?;
        let id = request.into_inner().run_id;
        Ok(Response::new(self.visible(&principal, &id).await?))
    }

    async fn list(
        &self,
        request: Request<pb::ListRunsRequest>,
    ) -> Result<Response<pb::ListRunsResponse>, Status> {
        let principal = super::caller(&request)?;
        let req = request.into_inner();
        let mut states = Vec::new();
        for s in &req.states {
            states.push(match pb::RunState::try_from(*s) {
                Ok(pb::RunState::Queued) => RunState::Queued,
                Ok(pb::RunState::Provisioning) => RunState::Provisioning,
                Ok(pb::RunState::Running) => RunState::Running,
                Ok(pb::RunState::Succeeded) => RunState::Succeeded,
                Ok(pb::RunState::Failed) => RunState::Failed,
                Ok(pb::RunState::Cancelled) => RunState::Cancelled,
                Ok(pb::RunState::Interrupted) => RunState::Interrupted,
                Ok(pb::RunState::AwaitingApproval) => RunState::AwaitingApproval,
                Ok(pb::RunState::Idle) => RunState::Idle,
                Ok(pb::RunState::AwaitingToolResult) => RunState::AwaitingToolResult,
                _ => {
                    return Err(Status::invalid_argument(format!(
                        "states: {s} is not a RunState"
                    )))
                }
            });
        }
        let limit = match req.page_size {
            0 => 50,
            n => n.min(500),
        } as u64;
        let offset: u64 = if req.page_token.is_empty() {
            0
        } else {
            req.page_token
                .parse()
                .map_err(|_| Status::invalid_argument("page_token: not one this server gave"))?
        };
        let owner = (!principal.sees(None)).then_some(principal.owner.as_str());
        let labels: BTreeMap<String, String> = req.labels.into_iter().collect();
        let ids = self
            .runner
            .store()
            .list(owner, &states, &labels, offset, limit + 1)
            .await
            .map_err(|e| run_status(e.into()))?;
        let more = ids.len() as u64 > limit;
        let mut runs = Vec::new();
        for id in ids.iter().take(limit as usize) {
            runs.push(self.visible(&principal, id).await?);
        }
        Ok(Response::new(pb::ListRunsResponse {
            runs,
            next_page_token: if more {
                (offset + limit).to_string()
            } else {
                String::new()
            },
        }))
    }

    type WatchStream = BoxStream<pb::RunEvent>;

    async fn watch(
        &self,
        request: Request<pb::WatchRunRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let principal = super::caller(&request)?;
        let req = request.into_inner();
        self.visible(&principal, &req.run_id).await?;
        // Subscribe before reading the stored events, so nothing falls in between.
        let mut live = self.runner.subscribe(&req.run_id);
        let mut deltas = self.runner.subscribe_deltas(&req.run_id);
        let store = self.runner.store().clone();
        let run_id = req.run_id.clone();
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            let mut next = req.from_seq.max(1);
            let mut finished = false;
            // Stored events first; again after a lagged live feed.
            loop {
                match store.events(&run_id, next).await {
                    Ok(events) => {
                        for e in events {
                            finished |= matches!(e.event, Event::Finished { .. });
                            next = e.seq + 1;
                            let shown = event_pb_full(&store, &run_id, &e).await;
                            if tx.send(shown).await.is_err() {
                                return;
                            }
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(run_status(e.into()))).await;
                        return;
                    }
                }
                if finished {
                    return;
                }
                loop {
                    let received = tokio::select! {
                        biased;
                        e = live.recv() => e,
                        d = deltas.recv() => {
                            // Text as it streams: not stored, seq 0. A
                            // watcher that lags loses some; the stored
                            // answer has all of it.
                            if let Ok(d) = d {
                                let delta = pb::RunEvent {
                                    run_id: run_id.clone(),
                                    seq: 0,
                                    unix_ms: crate::clock::now_ms(),
                                    event: Some(pb::run_event::Event::TextDelta(pb::TextDelta {
                                        turn: d.turn,
                                        text: d.text,
                                    })),
                                };
                                if tx.send(Ok(delta)).await.is_err() {
                                    return;
                                }
                            }
                            continue;
                        }
                    };
                    match received {
                        Ok(e) if e.seq < next => continue,
                        Ok(e) if e.seq == next => {
                            finished |= matches!(e.event, Event::Finished { .. });
                            next += 1;
                            let shown = event_pb_full(&store, &run_id, &e).await;
                            if tx.send(shown).await.is_err() {
                                return;
                            }
                            if finished {
                                return;
                            }
                        }
                        // A gap in the live feed (lagged, or out of order): read the store.
                        Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => break,
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn cancel(
        &self,
        request: Request<pb::CancelRunRequest>,
    ) -> Result<Response<pb::Run>, Status> {
        let principal = super::caller(&request)?;
        principal.require_write()?;
        let req = request.into_inner();
        self.visible(&principal, &req.run_id).await?;
        let reason = if req.reason.is_empty() {
            format!("cancelled by {}", principal.name)
        } else {
            req.reason
        };
        self.runner
            .cancel(&req.run_id, &principal.token_id, &reason)
            .await
            .map_err(run_status)?;
        Ok(Response::new(self.visible(&principal, &req.run_id).await?))
    }

    async fn send(&self, request: Request<pb::SendRequest>) -> Result<Response<pb::Run>, Status> {
        use crate::runs::executor::{SendError, SendInput};
        let principal = super::caller(&request)?;
        principal.require_write()?;
        let req = request.into_inner();
        let run = self.visible(&principal, &req.run_id).await?;
        // Only the token that submitted the session speaks in it (and an
        // admin): another principal of the owner could otherwise steer the
        // model into asking what it then approves itself.
        let submitter = self
            .runner
            .view(&req.run_id)
            .await
            .map_err(run_status)?
            .submitted_by
            .token_id;
        if principal.token_id != submitter && principal.role != crate::auth::Role::Admin {
            return Err(Status::permission_denied(format!(
                "only the token that submitted session {} sends to it",
                run.id
            )));
        }
        let message_id = req.message_id.trim();
        if message_id.is_empty() || message_id.len() > 200 {
            return Err(Status::invalid_argument(
                "message_id is required (1 to 200 characters): the same id is added once",
            ));
        }
        if message_id == crate::harness::task::FIRST_MESSAGE_ID {
            return Err(Status::invalid_argument(format!(
                "message_id {message_id:?} is the session's first message; choose another"
            )));
        }
        let input = match (req.message.is_empty(), req.tool_result) {
            (false, None) => SendInput::Message(req.message),
            (true, Some(r)) => SendInput::ToolResult {
                call_id: r.call_id,
                content: r.content,
                is_error: r.is_error,
            },
            (true, None) => SendInput::Nothing,
            (false, Some(_)) => {
                return Err(Status::invalid_argument(
                    "message and tool_result: send one of them",
                ))
            }
        };
        match self
            .runner
            .send(&req.run_id, message_id, input, req.close)
            .await
        {
            Ok(_) => {}
            Err(SendError::Run(e)) => return Err(run_status(e)),
            Err(e @ SendError::NotASession(_)) | Err(e @ SendError::Invalid(_)) => {
                return Err(Status::invalid_argument(e.to_string()))
            }
            Err(e @ SendError::UnknownCall { .. }) => {
                return Err(Status::invalid_argument(e.to_string()))
            }
            Err(e @ SendError::Finished { .. }) | Err(e @ SendError::State { .. }) => {
                return Err(Status::failed_precondition(e.to_string()))
            }
        }
        Ok(Response::new(self.visible(&principal, &req.run_id).await?))
    }

    type LogsStream = BoxStream<pb::LogChunk>;

    async fn logs(
        &self,
        request: Request<pb::LogsRequest>,
    ) -> Result<Response<Self::LogsStream>, Status> {
        let principal = super::caller(&request)?;
        let req = request.into_inner();
        let run = self.visible(&principal, &req.run_id).await?;
        if req.step as usize >= run.steps.len() {
            return Err(Status::invalid_argument(format!(
                "step {} does not exist: the job has {} steps (numbered from 0)",
                req.step,
                run.steps.len()
            )));
        }
        let want = pb::LogStream::try_from(req.stream).unwrap_or(pb::LogStream::Unspecified);
        let store = self.runner.store().clone();
        let events = store
            .events(&req.run_id, 1)
            .await
            .map_err(|e| run_status(e.into()))?;
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            let mut combined = 0u64;
            for e in events {
                let Event::StepOutput {
                    step,
                    stream,
                    offset,
                    length,
                    blob_sha256,
                    ..
                } = e.event
                else {
                    continue;
                };
                let s = stream_pb(stream);
                if step != req.step || (want != pb::LogStream::Unspecified && want != s) {
                    continue;
                }
                // With one stream, offsets are that stream's; with both, their sum.
                let start = if want == pb::LogStream::Unspecified {
                    combined
                } else {
                    offset
                };
                combined += length;
                if start + length <= req.from_offset {
                    continue;
                }
                let data = match store.blob(&blob_sha256).await {
                    Ok(Some(d)) => d,
                    Ok(None) => {
                        let _ = tx
                            .send(Err(Status::data_loss(format!(
                                "output blob {blob_sha256} is missing"
                            ))))
                            .await;
                        return;
                    }
                    Err(err) => {
                        let _ = tx.send(Err(run_status(err.into()))).await;
                        return;
                    }
                };
                let skip = req.from_offset.saturating_sub(start) as usize;
                let chunk = pb::LogChunk {
                    step,
                    stream: s as i32,
                    offset: start + skip as u64,
                    data: data[skip.min(data.len())..].to_vec().into(),
                };
                if tx.send(Ok(chunk)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
