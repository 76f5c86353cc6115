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
    }
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
        Ok(run_pb(run_id, &view, first.unix_ms, finished))
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
        let job = req
            .job
            .ok_or_else(|| Status::invalid_argument("job is required"))?;
        let submitted =
            Submitted::try_from(job).map_err(|e| Status::invalid_argument(format!("job.{e}")))?;
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
                            if tx.send(Ok(event_pb(&run_id, &e))).await.is_err() {
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
                    match live.recv().await {
                        Ok(e) if e.seq < next => continue,
                        Ok(e) if e.seq == next => {
                            finished |= matches!(e.event, Event::Finished { .. });
                            next += 1;
                            if tx.send(Ok(event_pb(&run_id, &e))).await.is_err() {
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
