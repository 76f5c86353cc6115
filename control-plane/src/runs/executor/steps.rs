//! A run's steps, in order: each attempt decided by the guard and recorded
//! (`step_started`) before the agent is asked to run it, its output recorded
//! (redacted) as it comes, its exit recorded before anything follows; a
//! started attempt found in the log is re-attached by its exec id, never
//! started again (docs/recovery.md).

use futures::StreamExt;
use sha2::Digest;

use super::{Error, Result, Run, Runner};
use crate::guard::facts;
use crate::host::{Agent, AgentError, ExecEvent, ExecEvents, ExecSpec, Host};
use crate::runs::events::{Event, RunState, StepState, StepView, Stream};
use crate::runs::store::EventStore;

/// How long an attached exec stream may stay silent: the agent sends a
/// keepalive every 15 s, so a longer silence means the stream is dead (a
/// half-open connection) and is replaced by a fresh attach.
const SILENCE: std::time::Duration = std::time::Duration::from_secs(40);

/// Where a step's attempt ended.
enum StepEnd {
    /// The stream to the agent went silent; attach again.
    Silent,
    Exited(Event),
    /// The sandbox or the exec is gone while the step ran.
    Lost(String),
}

/// One attempt of one step.
struct Attempt {
    /// The step's index in the job.
    step: usize,
    /// Counted from 1, across restarts.
    number: u32,
    exec_id: String,
}

impl<H: Host, S: EventStore> Runner<H, S> {
    /// Runs the job's steps from where the log stands, in `sandbox_id`.
    /// Ok(false): the run has ended (a step failed, was refused or lost, or
    /// the run was cancelled); Ok(true): every step is done.
    pub(super) async fn run_steps(&self, run: &mut Run<'_>, sandbox_id: &str) -> Result<bool> {
        let mut failed: Option<String> = None;
        // Set when the agent is seen to have restarted since the log last
        // named it; the next StepStarted records the new boot id.
        let mut agent_restarted = String::new();
        for index in 0..run.view.job.steps.len() {
            let step = run.view.job.steps[index].clone();
            let status = run.view.steps[index].clone();
            match status.state {
                StepState::Succeeded => continue,
                StepState::Failed if status.attempts > step.retries => {
                    if step.continue_on_error {
                        continue;
                    }
                    failed = Some(format!("step {} ({}) failed", index + 1, step.name));
                    break;
                }
                _ => {}
            }
            // Attempts: resume the one the log says is running, else start the next.
            let mut attempt = status.attempts.max(1);
            let mut resume = status.state == StepState::Running;
            if status.state == StepState::Failed {
                attempt = status.attempts + 1;
            }
            loop {
                if *run.cancel.borrow() {
                    self.finish_cancelled(run).await?;
                    return Ok(false);
                }
                // A started attempt keeps the id it was recorded with; a new
                // one gets an id nobody else can have chosen (see `run_exec_id`).
                let exec_id = match resume {
                    true if !run.view.steps[index].exec_id.is_empty() => {
                        run.view.steps[index].exec_id.clone()
                    }
                    _ => run_exec_id(run.id, index, attempt),
                };
                if !resume {
                    let resource = facts::sandbox_of(sandbox_id, &run.view.owner);
                    let facts = facts::command(facts::job(&run.view.job, run.id), &step.command);
                    let cleared = self
                        .clear(
                            run,
                            crate::policy::Action::Exec,
                            &resource,
                            &facts,
                            Some(index as u32),
                        )
                        .await?;
                    if !cleared {
                        return Ok(false);
                    }
                    self.record(
                        run.id,
                        run.view,
                        Event::StepStarted {
                            step: index as u32,
                            attempt,
                            exec_id: exec_id.clone(),
                            agent_boot_id: std::mem::take(&mut agent_restarted),
                        },
                    )
                    .await?;
                }
                let this = Attempt {
                    step: index,
                    number: attempt,
                    exec_id,
                };
                let end = self.run_step(run, sandbox_id, &this, resume).await?;
                resume = false;
                match end {
                    StepEnd::Silent => {
                        tracing::warn!(run = %run.id, step = index + 1, "the exec stream went silent; attaching again");
                        resume = true;
                        continue;
                    }
                    StepEnd::Exited(exited) => {
                        self.record(run.id, run.view, exited).await?;
                    }
                    StepEnd::Lost(why) => {
                        if !step.idempotent {
                            self.finish(
                                run.id,
                                run.view,
                                RunState::Interrupted,
                                format!(
                                    "step {} ({}) may or may not have run to completion: {why}; it is not marked idempotent, so it is not run again",
                                    index + 1,
                                    step.name
                                ),
                            )
                            .await?;
                            return Ok(false);
                        }
                        if attempt > step.retries {
                            self.finish(
                                run.id,
                                run.view,
                                RunState::Interrupted,
                                format!(
                                    "step {} ({}) may or may not have run to completion: {why}; it is idempotent, but its retries ({}) are used up",
                                    index + 1,
                                    step.name,
                                    step.retries
                                ),
                            )
                            .await?;
                            return Ok(false);
                        }
                        if let Some(boot) = self.agent_boot_id(sandbox_id).await {
                            if boot != run.view.agent_boot_id {
                                agent_restarted = boot;
                            }
                        }
                        attempt += 1;
                        continue;
                    }
                }
                if *run.cancel.borrow() {
                    self.finish_cancelled(run).await?;
                    return Ok(false);
                }
                if run.view.steps[index].state == StepState::Succeeded {
                    break;
                }
                if step.idempotent && attempt <= step.retries {
                    attempt += 1;
                    continue;
                }
                if !step.continue_on_error {
                    failed = Some(describe_failure(index, &step.name, &run.view.steps[index]));
                }
                break;
            }
            if failed.is_some() {
                break;
            }
        }
        if let Some(reason) = failed {
            self.finish(run.id, run.view, RunState::Failed, reason)
                .await?;
            return Ok(false);
        }
        Ok(true)
    }

    /// Starts (or, with `resume`, re-attaches to) one attempt of a step and
    /// records its output until it exits.
    async fn run_step(
        &self,
        run: &mut Run<'_>,
        sandbox_id: &str,
        attempt: &Attempt,
        resume: bool,
    ) -> Result<StepEnd> {
        let index = attempt.step;
        let exec_id = attempt.exec_id.as_str();
        let step = run.view.job.steps[index].clone();
        let agent = self.inner.host.agent_of(sandbox_id);
        // Output already recorded is not asked for again.
        if resume {
            tracing::info!(run = %run.id, step = index + 1, exec_id, "re-attaching to a started step");
            let attached = tokio::time::timeout(
                SILENCE,
                agent.attach_exec(exec_id, run.view.steps[index].agent_resume_offset()),
            )
            .await;
            let Ok(attached) = attached else {
                return Ok(StepEnd::Silent);
            };
            match attached {
                Ok(events) => return self.record_step(run, attempt, &agent, events).await,
                // The agent does not know the exec. If it is the same agent
                // that was there when the sandbox was assigned, the exec never
                // started (the crash fell between recording StepStarted and
                // asking the agent): start it now. Otherwise the agent lost
                // its memory, and whether the step ran is unknown.
                Err(AgentError::NotFound(_)) => {
                    // A boot id is random per start, so a restarted agent
                    // is never taken for the one that was asked to run it.
                    let same_agent = match self.agent_boot_id(sandbox_id).await {
                        Some(boot) => {
                            !run.view.agent_boot_id.is_empty() && boot == run.view.agent_boot_id
                        }
                        None => false,
                    };
                    if !same_agent {
                        return Ok(StepEnd::Lost(format!(
                            "the sandbox's agent restarted and no longer knows exec {exec_id}"
                        )));
                    }
                }
                Err(e) => {
                    return Ok(StepEnd::Lost(format!(
                        "the sandbox is unreachable: {}",
                        e.message()
                    )))
                }
            }
        }
        let mut env = run.view.job.env.clone();
        env.extend(run.secrets.values.clone());
        env.extend(step.env.clone());
        let spec = ExecSpec {
            exec_id: exec_id.to_string(),
            command: step.command.clone(),
            env,
            cwd: step.cwd.clone(),
            timeout_ms: step.timeout_secs.saturating_mul(1000),
        };
        let events = match agent.start_exec(spec).await {
            Ok(events) => events,
            Err(e) => {
                return Ok(StepEnd::Lost(format!(
                    "the sandbox is unreachable: {}",
                    e.message()
                )))
            }
        };
        self.record_step(run, attempt, &agent, events).await
    }

    /// Records an exec's output and exit from its event stream.
    async fn record_step(
        &self,
        run: &mut Run<'_>,
        attempt: &Attempt,
        agent: &H::Agent,
        mut events: ExecEvents,
    ) -> Result<StepEnd> {
        let index = attempt.step;
        let started = std::time::Instant::now();
        let mut stopping = self.inner.shutdown.clone();
        // On a re-attach the agent replays from the lower of the two
        // streams' positions; what a stream already recorded is skipped.
        let recorded = run.view.steps[index].agent_recorded;
        let mut unrecorded = Unrecorded {
            held: [Held::default(), Held::default()],
            read_to: run.view.steps[index].agent_resume_offset(),
        };
        loop {
            let message = tokio::select! {
                m = tokio::time::timeout(SILENCE, events.next()) => match m {
                    Ok(m) => m,
                    Err(_) => return Ok(StepEnd::Silent),
                },
                _ = run.cancel.changed() => {
                    let _ = agent.kill_exec(&attempt.exec_id).await;
                    continue;
                }
                _ = stopping.changed() => return Err(Error::Stopping),
            };
            let ev = match message {
                Some(Ok(ev)) => ev,
                None => {
                    return Ok(StepEnd::Lost(
                        "the exec stream ended before the step exited".into(),
                    ))
                }
                Some(Err(e)) => {
                    return Ok(StepEnd::Lost(format!(
                        "the sandbox went away: {}",
                        e.message()
                    )))
                }
            };
            let exited = match ev {
                ExecEvent::Output {
                    stream,
                    offset,
                    data,
                } => {
                    let end = offset + data.len() as u64;
                    unrecorded.read_to = unrecorded.read_to.max(end);
                    let skip = recorded[stream.index()]
                        .saturating_sub(offset)
                        .min(data.len() as u64);
                    if skip as usize == data.len() {
                        continue;
                    }
                    unrecorded.held[stream.index()].push(offset + skip, &data[skip as usize..]);
                    self.record_output(run, index, stream, &mut unrecorded, false)
                        .await?;
                    continue;
                }
                ExecEvent::Exited {
                    code,
                    signal,
                    timed_out,
                    oom_killed,
                    duration_ms,
                } => Event::StepExited {
                    step: index as u32,
                    attempt: attempt.number,
                    exit_code: code,
                    signal,
                    timed_out,
                    oom_killed,
                    spawn_failure: String::new(),
                    duration_ms,
                },
                ExecEvent::SpawnFailed(reason) => Event::StepExited {
                    step: index as u32,
                    attempt: attempt.number,
                    exit_code: None,
                    signal: None,
                    timed_out: false,
                    oom_killed: false,
                    spawn_failure: reason,
                    duration_ms: started.elapsed().as_millis() as u64,
                },
                ExecEvent::Started { .. } | ExecEvent::Dropped { .. } | ExecEvent::Keepalive => {
                    continue
                }
            };
            // The end of the output: whatever was held back is decided.
            for stream in [Stream::Stdout, Stream::Stderr] {
                self.record_output(run, index, stream, &mut unrecorded, true)
                    .await?;
            }
            return Ok(StepEnd::Exited(exited));
        }
    }

    /// Records what is held of `stream` and can be decided (everything,
    /// when `last`): redacted, stored as a blob, referenced by a
    /// `StepOutput` event.
    async fn record_output(
        &self,
        run: &mut Run<'_>,
        index: usize,
        stream: Stream,
        unrecorded: &mut Unrecorded,
        last: bool,
    ) -> Result<()> {
        let this = stream.index();
        let held = &mut unrecorded.held;
        if held[this].bytes.is_empty() {
            return Ok(());
        }
        let (data, used) = run.secrets.redactor.redact(&held[this].bytes, last);
        if used == 0 {
            return Ok(());
        }
        held[this].consume(used);
        let read_to = unrecorded.read_to;
        let position = |h: &Held| h.start().unwrap_or(read_to);
        let sha = hex::encode(sha2::Sha256::digest(&data));
        self.inner.store.put_blob(&sha, &data).await?;
        let offset = match stream {
            Stream::Stdout => run.view.steps[index].stdout_bytes,
            Stream::Stderr => run.view.steps[index].stderr_bytes,
        };
        let event = Event::StepOutput {
            step: index as u32,
            stream,
            offset,
            length: data.len() as u64,
            blob_sha256: sha,
            agent_end: position(&held[this]),
            agent_other_end: position(&held[1 - this]),
        };
        self.record(run.id, run.view, event).await
    }
}

/// What an attempt has read from the agent and not recorded yet.
struct Unrecorded {
    /// Per stream (stdout, stderr).
    held: [Held; 2],
    /// The agent offset read up to, both streams.
    read_to: u64,
}

/// Raw output of one stream that is not recorded yet, because it might be
/// the beginning of a secret, with the agent offset of each piece (the two
/// streams share the agent's offsets, so one stream's bytes are not
/// contiguous in them).
#[derive(Debug, Default)]
struct Held {
    bytes: Vec<u8>,
    /// (index into `bytes`, agent offset of that byte), ascending.
    pieces: Vec<(usize, u64)>,
}

impl Held {
    fn push(&mut self, agent_offset: u64, data: &[u8]) {
        self.pieces.push((self.bytes.len(), agent_offset));
        self.bytes.extend_from_slice(data);
    }

    /// The agent offset of the first held byte.
    fn start(&self) -> Option<u64> {
        (!self.bytes.is_empty()).then(|| self.pieces[0].1)
    }

    fn consume(&mut self, n: usize) {
        self.bytes.drain(..n);
        let mut pieces = Vec::new();
        for (i, &(at, offset)) in self.pieces.iter().enumerate() {
            let next = self.pieces.get(i + 1).map_or(usize::MAX, |p| p.0);
            if next <= n {
                continue;
            }
            pieces.push(if at >= n {
                (at - n, offset)
            } else {
                (0, offset + (n - at) as u64)
            });
        }
        self.pieces = pieces;
        if self.bytes.is_empty() {
            self.pieces.clear();
        }
    }
}

fn describe_failure(index: usize, name: &str, s: &StepView) -> String {
    let how = match (s.exit_code, s.signal, s.timed_out) {
        (_, _, true) => "timed out".to_string(),
        (Some(c), _, _) => format!("exited with {c}"),
        (None, Some(sig), _) => format!("was killed by signal {sig}"),
        _ => "could not start".to_string(),
    };
    format!("step {} ({name}) {how}", index + 1)
}

/// The exec id of one attempt of a run's step. It starts with the prefix the
/// public API refuses ([`crate::sandboxes::RESERVED_EXEC_ID_PREFIX`]), so no client
/// can start, signal or pre-register it, and ends in a random part, so it
/// cannot be guessed from the run id either.
fn run_exec_id(run_id: &str, index: usize, attempt: u32) -> String {
    format!(
        "{}run.{run_id}.s{index}.a{attempt}.{}",
        crate::sandboxes::RESERVED_EXEC_ID_PREFIX,
        crate::ids::random_hex(8)
    )
}
