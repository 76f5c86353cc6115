//! Drives runs: every transition is appended to the run's log before the
//! action it allows, so [`Runner::drive`] can be called again on any run at
//! any moment (after a crash, on another start) and continues from where the
//! log says the run is, without repeating a started step.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use bridle_proto::sandbox::v1 as agent_pb;
use sha2::Digest;
use tokio::sync::{broadcast, watch, Notify};

use super::events::{Event, RunState, RunView, StepState, Stream};
use super::job::Command;
use super::redact::Redactor;
use super::sealed::Sealer;
use super::store::{EventStore, StoredEvent};
use crate::auth::{Principal, Role};
use crate::guard::{facts, Ask, Cleared, Record, Refused};
use crate::runtime::Runtime;
use crate::sandboxes::{CreateRequest, Sandboxes};

/// Label that ties a sandbox to the run it was made for, so a run whose
/// sandbox was created but not yet recorded finds it again.
pub const RUN_LABEL: &str = "bridle.run";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Store(#[from] super::store::Error),
    #[error("run {0}: {1}")]
    Fold(String, super::events::FoldError),
    #[error("run {0} not found")]
    NotFound(String),
    /// The control plane is stopping: the run stays where its log says.
    #[error("shutting down")]
    Stopping,
}

type Result<T> = std::result::Result<T, Error>;

struct Live {
    events: broadcast::Sender<StoredEvent>,
    cancel: watch::Sender<bool>,
    /// Whether a driver is running the run now ([`Runner::cancel`] waits
    /// for it to end the run, or ends it itself).
    driving: watch::Sender<bool>,
}

/// Marks its run as driven while it lives.
struct Driving(Arc<Live>);

impl Driving {
    fn new(live: Arc<Live>) -> Self {
        live.driving.send_replace(true);
        Self(live)
    }
}

impl Drop for Driving {
    fn drop(&mut self) {
        self.0.driving.send_replace(false);
    }
}

/// How long a cancel waits for the run's driver to end the run (it kills
/// the step's tree first) before it ends the run itself.
const CANCEL_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

pub struct Runner<R: Runtime, S: EventStore> {
    inner: Arc<Inner<R, S>>,
}

impl<R: Runtime, S: EventStore> Clone for Runner<R, S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

struct Inner<R: Runtime, S: EventStore> {
    store: S,
    sandboxes: Sandboxes<R>,
    live: Mutex<HashMap<String, Arc<Live>>>,
    /// Opens the runs' sealed secrets.
    sealer: Sealer,
    /// Decides each step (and a run's network) before it happens.
    guard: crate::guard::Guard,
    queue: Mutex<super::queue::Queue>,
    wake: Notify,
    shutdown: watch::Receiver<bool>,
}

/// A run's secret values, and the redactor that keeps them out of its output.
struct RunSecrets {
    values: BTreeMap<String, String>,
    redactor: Redactor,
}

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

impl<R: Runtime, S: EventStore> Runner<R, S> {
    /// A runner that starts at most `max_running` runs at once, at most
    /// `max_per_owner` of one owner, owners taking turns.
    pub fn new(
        store: S,
        sandboxes: Sandboxes<R>,
        max_running: usize,
        max_per_owner: usize,
        sealer: Sealer,
        guard: crate::guard::Guard,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        let runner = Self {
            inner: Arc::new(Inner {
                store,
                sandboxes,
                live: Mutex::default(),
                sealer,
                guard,
                queue: Mutex::new(super::queue::Queue::new(max_running, max_per_owner)),
                wake: Notify::new(),
                shutdown,
            }),
        };
        let dispatcher = runner.clone();
        tokio::spawn(async move { dispatcher.dispatch().await });
        runner
    }

    /// Queues a run; it starts when the limits and the owners' turns allow.
    pub fn schedule(&self, owner: &str, run_id: &str) {
        self.inner.queue.lock().expect("lock").push(owner, run_id);
        self.inner.wake.notify_one();
    }

    async fn dispatch(&self) {
        let mut stop = self.inner.shutdown.clone();
        loop {
            loop {
                let next = self.inner.queue.lock().expect("lock").pop();
                let Some((owner, run_id)) = next else { break };
                let runner = self.clone();
                tokio::spawn(async move {
                    if let Err(e) = runner.drive(&run_id).await {
                        tracing::warn!(run = %run_id, "run stopped: {e}");
                    }
                    runner.inner.queue.lock().expect("lock").finished(&owner);
                    runner.inner.wake.notify_one();
                });
            }
            tokio::select! {
                _ = self.inner.wake.notified() => {}
                _ = stop.changed() => return,
            }
        }
    }

    pub fn store(&self) -> &S {
        &self.inner.store
    }

    /// Seals secrets for storing with run `run_id`.
    pub fn seal(&self, run_id: &str, secrets: &BTreeMap<String, String>) -> Vec<u8> {
        self.inner.sealer.seal(run_id, secrets)
    }

    fn live(&self, run_id: &str) -> Arc<Live> {
        self.inner
            .live
            .lock()
            .expect("lock")
            .entry(run_id.to_string())
            .or_insert_with(|| {
                Arc::new(Live {
                    events: broadcast::channel(1024).0,
                    cancel: watch::channel(false).0,
                    driving: watch::channel(false).0,
                })
            })
            .clone()
    }

    /// New events of a run as they are appended.
    pub fn subscribe(&self, run_id: &str) -> broadcast::Receiver<StoredEvent> {
        self.live(run_id).events.subscribe()
    }

    pub async fn view(&self, run_id: &str) -> Result<RunView> {
        let events = self.inner.store.events(run_id, 1).await?;
        if events.is_empty() {
            return Err(Error::NotFound(run_id.into()));
        }
        RunView::fold(events.iter().map(|e| (e.seq, &e.event)))
            .map_err(|e| Error::Fold(run_id.into(), e))
    }

    /// Appends the next event and tells watchers.
    async fn record(&self, run_id: &str, view: &mut RunView, event: Event) -> Result<()> {
        // Two writers can meet on one run: its driver, and a Cancel. The
        // loser of a sequence number reads what was written and appends
        // after it (a cancel never makes the driver's event wrong).
        let mut tries = 0;
        loop {
            let seq = view.last_seq + 1;
            // The new state is what folding the event gives.
            let folded =
                RunView::fold_onto(view, seq, &event).map_err(|e| Error::Fold(run_id.into(), e))?;
            let now = crate::clock::now_ms();
            match self
                .inner
                .store
                .append(run_id, seq, &event, folded.state, now)
                .await
            {
                Ok(()) => {
                    *view = folded;
                    let _ = self.live(run_id).events.send(StoredEvent {
                        seq,
                        unix_ms: now,
                        event,
                    });
                    return Ok(());
                }
                Err(super::store::Error::Conflict { .. }) if tries < 5 => {
                    tries += 1;
                    *view = self.view(run_id).await?;
                    if view.state.is_finished() {
                        return Err(Error::Stopping);
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Deletes sandboxes made for runs that have finished (a crash between
    /// `finished` and the delete leaves one). Called at start.
    pub async fn release_leftover_sandboxes(&self) {
        let system = Principal {
            token_id: "system".into(),
            name: "control plane".into(),
            role: Role::Admin,
            owner: String::new(),
        };
        let Ok(all) = self.inner.sandboxes.list(&system, &BTreeMap::new()).await else {
            return;
        };
        for sb in all {
            let Some(run_id) = sb.spec.labels.get(RUN_LABEL) else {
                continue;
            };
            let done = match self.view(run_id).await {
                Ok(v) => v.state.is_finished(),
                Err(Error::NotFound(_)) => true,
                Err(_) => false,
            };
            if done {
                tracing::info!(run = %run_id, sandbox = %sb.id, "removing the sandbox of a finished run");
                let _ = self.inner.sandboxes.delete(&system, &sb.id).await;
            }
        }
    }

    /// Ends a run as cancelled: recorded first, then its driver kills the
    /// step's tree and finishes the run. A run that nothing drives (queued
    /// for a slot, or its driver gave up) or whose driver has not ended it
    /// within [`CANCEL_GRACE`] (stuck) is finished here, and what it leaves
    /// released: a cancel always ends the run. Answers the run as it ended.
    pub async fn cancel(&self, run_id: &str, by: &str, reason: &str) -> Result<RunView> {
        let mut view = self.view(run_id).await?;
        if view.state.is_finished() {
            return Ok(view);
        }
        if view.cancel_requested.is_none() {
            let requested = Event::CancelRequested {
                by: by.into(),
                reason: reason.into(),
            };
            match self.record(run_id, &mut view, requested).await {
                Ok(()) => {}
                // It finished meanwhile.
                Err(Error::Stopping) => return self.view(run_id).await,
                Err(e) => return Err(e),
            }
        }
        let live = self.live(run_id);
        let mut driving = live.driving.subscribe();
        let driven = *driving.borrow();
        let _ = live.cancel.send(true);
        let _ = tokio::time::timeout(CANCEL_GRACE, async move {
            driving.wait_for(|d| !*d).await.map(|_| ())
        })
        .await;
        let mut view = self.view(run_id).await?;
        if view.state.is_finished() {
            return Ok(view);
        }
        if driven {
            tracing::warn!(run = %run_id, "the run's driver did not end it within {} s of its cancel; ending it here", CANCEL_GRACE.as_secs());
        } else {
            tracing::info!(run = %run_id, "ending a cancelled run that nothing drives now");
        }
        let reason = view
            .cancel_requested
            .clone()
            .unwrap_or_else(|| reason.to_string());
        let finished = Event::Finished {
            state: RunState::Cancelled,
            reason,
        };
        match self.record(run_id, &mut view, finished).await {
            Ok(()) => {}
            // Its driver finished it meanwhile.
            Err(Error::Stopping) => return self.view(run_id).await,
            Err(e) => return Err(e),
        }
        self.release(run_id, &view).await;
        Ok(view)
    }

    /// Deletes what a finished run leaves: its sandboxes, the recorded one
    /// and any made for it but not yet recorded (this also stops a step a
    /// stuck driver started), and its sealed secrets.
    async fn release(&self, run_id: &str, view: &RunView) {
        let system = Principal {
            token_id: "system".into(),
            name: "control plane".into(),
            role: Role::Admin,
            owner: String::new(),
        };
        let labels = BTreeMap::from([(RUN_LABEL.to_string(), run_id.to_string())]);
        let mut sandboxes: Vec<String> = self
            .inner
            .sandboxes
            .list(&system, &labels)
            .await
            .map(|l| l.into_iter().map(|s| s.id).collect())
            .unwrap_or_default();
        if let Some(sb) = &view.sandbox_id {
            if !sandboxes.contains(sb) {
                sandboxes.push(sb.clone());
            }
        }
        for sb in sandboxes {
            if let Err(e) = self.inner.sandboxes.delete(&system, &sb).await {
                tracing::warn!(run = %run_id, sandbox = %sb, "could not delete the finished run's sandbox: {e}");
            }
        }
        if !view.job.secret_names.is_empty() {
            if let Err(e) = self.inner.store.forget_secrets(run_id).await {
                tracing::warn!(run = %run_id, "could not delete the finished run's sealed secrets: {e}");
            }
        }
    }

    /// Runs `run_id` to its end (or until shutdown), from wherever its log
    /// says it is. Safe to call on any run at any time, once at a time (the
    /// queue sees to that; tests may call it directly).
    pub async fn drive(&self, run_id: &str) -> Result<()> {
        // A cancel waits for this driver to end the run, while it drives.
        let _driving = Driving::new(self.live(run_id));
        let mut view = self.view(run_id).await?;
        if view.state.is_finished() {
            return Ok(());
        }
        let principal = Principal {
            token_id: format!("run:{run_id}"),
            name: format!("run {run_id}"),
            role: Role::Submitter,
            owner: view.owner.clone(),
        };
        let result = self.drive_inner(run_id, &mut view, &principal).await;
        if let Err(Error::Stopping) = result {
            return Err(Error::Stopping);
        }
        // Whatever ended the run, its sandbox goes, even one made for it and
        // not yet recorded (a run that failed writing its inputs).
        if view.state.is_finished() {
            self.release(run_id, &view).await;
        }
        result
    }

    async fn finish(
        &self,
        run_id: &str,
        view: &mut RunView,
        state: RunState,
        reason: String,
    ) -> Result<()> {
        self.record(run_id, view, Event::Finished { state, reason })
            .await
    }

    /// The run's secret values, or why they cannot be had.
    async fn secrets(
        &self,
        run_id: &str,
        view: &RunView,
    ) -> Result<std::result::Result<BTreeMap<String, String>, String>> {
        if view.job.secret_names.is_empty() {
            return Ok(Ok(BTreeMap::new()));
        }
        let Some(sealed) = self.inner.store.sealed_secrets(run_id).await? else {
            return Ok(Err("the run's secrets are missing from the store".into()));
        };
        Ok(self
            .inner
            .sealer
            .open(run_id, &sealed)
            .map_err(|e| e.to_string()))
    }

    async fn drive_inner(
        &self,
        run_id: &str,
        view: &mut RunView,
        principal: &Principal,
    ) -> Result<()> {
        if let Some(reason) = view.cancel_requested.clone() {
            return self.finish(run_id, view, RunState::Cancelled, reason).await;
        }
        let mut cancel = self.live(run_id).cancel.subscribe();
        let secrets = match self.secrets(run_id, view).await? {
            Ok(values) => RunSecrets {
                redactor: Redactor::new(values.values().map(String::as_str)),
                values,
            },
            Err(reason) => {
                return self
                    .finish(run_id, view, RunState::Interrupted, reason)
                    .await
            }
        };

        // A sandbox: the recorded one, or one made for this run.
        if view.sandbox_id.is_none() {
            if view.state == RunState::Queued {
                self.record(run_id, view, Event::Provisioning).await?;
            }
            if view.job.network == Some(crate::sandboxes::Network::Bridge) {
                let resource = facts::run(run_id, &view.owner);
                let facts = crate::policy::Facts {
                    network: "bridge".into(),
                    ..facts::job(&view.job, run_id)
                };
                let cleared = self
                    .clear(
                        run_id,
                        view,
                        crate::policy::Action::Network,
                        &resource,
                        &facts,
                        None,
                        &mut cancel,
                    )
                    .await?;
                if !cleared {
                    return Ok(());
                }
            }
            let labels = BTreeMap::from([(RUN_LABEL.to_string(), run_id.to_string())]);
            // A crash after the sandbox was made and before it was recorded
            // leaves one with this run's label: use it rather than make another.
            let found = self
                .inner
                .sandboxes
                .list(principal, &labels)
                .await
                .ok()
                .and_then(|l| l.into_iter().next());
            let sandbox = match found {
                Some(s) => {
                    tracing::info!(run = %run_id, sandbox = %s.id, "reusing the sandbox made for the run before a restart");
                    s
                }
                None => {
                    tracing::info!(run = %run_id, "creating the run's sandbox");
                    let mut job_labels = view.job.labels.clone();
                    job_labels.extend(labels);
                    let req = CreateRequest {
                        image: view.job.image.clone(),
                        memory_bytes: view.job.memory_bytes,
                        cpu_millis: view.job.cpu_millis,
                        pids: view.job.pids,
                        disk_bytes: view.job.disk_bytes,
                        network: view.job.network,
                        env: BTreeMap::new(),
                        labels: job_labels,
                        ttl_secs: 0,
                        idle_timeout_secs: 0,
                        from_snapshot: view.job.from_snapshot.clone(),
                    };
                    match self.inner.sandboxes.create(principal, req).await {
                        Ok(s) => s,
                        Err(e) => {
                            return self
                                .finish(
                                    run_id,
                                    view,
                                    RunState::Failed,
                                    format!("provisioning: {e}"),
                                )
                                .await
                        }
                    }
                }
            };
            // Inputs go in before the sandbox is recorded: a crash in between
            // writes them again into the same sandbox, which is harmless.
            if let Err(e) = self.write_inputs(view, &sandbox.id).await {
                return self
                    .finish(
                        run_id,
                        view,
                        RunState::Failed,
                        format!("writing inputs: {e}"),
                    )
                    .await;
            }
            let agent_boot_id = match self.agent_boot_id(&sandbox.id).await {
                Some(t) => t,
                None => {
                    return self
                        .finish(
                            run_id,
                            view,
                            RunState::Failed,
                            "the sandbox's agent does not answer".into(),
                        )
                        .await
                }
            };
            self.record(
                run_id,
                view,
                Event::SandboxAssigned {
                    sandbox_id: sandbox.id.clone(),
                    agent_boot_id,
                },
            )
            .await?;
            tracing::info!(run = %run_id, sandbox = %sandbox.id, "sandbox assigned");
        }
        let sandbox_id = view.sandbox_id.clone().expect("assigned above");

        let mut failed: Option<String> = None;
        // Set when the agent is seen to have restarted since the log last
        // named it; the next StepStarted records the new boot id.
        let mut agent_restarted = String::new();
        for index in 0..view.job.steps.len() {
            let step = view.job.steps[index].clone();
            let status = view.steps[index].clone();
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
                if *cancel.borrow() {
                    let reason = view.cancel_requested.clone().unwrap_or_default();
                    return self.finish(run_id, view, RunState::Cancelled, reason).await;
                }
                // A started attempt keeps the id it was recorded with; a new
                // one gets an id nobody else can have chosen (see `run_exec_id`).
                let exec_id = match resume {
                    true if !view.steps[index].exec_id.is_empty() => {
                        view.steps[index].exec_id.clone()
                    }
                    _ => run_exec_id(run_id, index, attempt),
                };
                if !resume {
                    let resource = facts::sandbox_of(&sandbox_id, &view.owner);
                    let facts = facts::command(facts::job(&view.job, run_id), &step.command);
                    let cleared = self
                        .clear(
                            run_id,
                            view,
                            crate::policy::Action::Exec,
                            &resource,
                            &facts,
                            Some(index as u32),
                            &mut cancel,
                        )
                        .await?;
                    if !cleared {
                        return Ok(());
                    }
                    self.record(
                        run_id,
                        view,
                        Event::StepStarted {
                            step: index as u32,
                            attempt,
                            exec_id: exec_id.clone(),
                            agent_boot_id: std::mem::take(&mut agent_restarted),
                        },
                    )
                    .await?;
                }
                let end = self
                    .run_step(
                        run_id,
                        view,
                        &sandbox_id,
                        index,
                        attempt,
                        &exec_id,
                        resume,
                        &secrets,
                        &mut cancel,
                    )
                    .await?;
                resume = false;
                match end {
                    StepEnd::Silent => {
                        tracing::warn!(run = %run_id, step = index + 1, "the exec stream went silent; attaching again");
                        resume = true;
                        continue;
                    }
                    StepEnd::Exited(exited) => {
                        self.record(run_id, view, exited).await?;
                    }
                    StepEnd::Lost(why) => {
                        if !step.idempotent {
                            return self
                                .finish(
                                    run_id,
                                    view,
                                    RunState::Interrupted,
                                    format!(
                                        "step {} ({}) may or may not have run to completion: {why}; it is not marked idempotent, so it is not run again",
                                        index + 1,
                                        step.name
                                    ),
                                )
                                .await;
                        }
                        if attempt > step.retries {
                            return self
                                .finish(
                                    run_id,
                                    view,
                                    RunState::Interrupted,
                                    format!("step {} ({}): {why}", index + 1, step.name),
                                )
                                .await;
                        }
                        if let Some(boot) = self.agent_boot_id(&sandbox_id).await {
                            if boot != view.agent_boot_id {
                                agent_restarted = boot;
                            }
                        }
                        attempt += 1;
                        continue;
                    }
                }
                if *cancel.borrow() {
                    let reason = view.cancel_requested.clone().unwrap_or_default();
                    return self.finish(run_id, view, RunState::Cancelled, reason).await;
                }
                if view.steps[index].state == StepState::Succeeded {
                    break;
                }
                if step.idempotent && attempt <= step.retries {
                    attempt += 1;
                    continue;
                }
                if !step.continue_on_error {
                    failed = Some(describe_failure(index, &step.name, &view.steps[index]));
                }
                break;
            }
            if failed.is_some() {
                break;
            }
        }
        if let Some(reason) = failed {
            return self.finish(run_id, view, RunState::Failed, reason).await;
        }
        for path in view.job.artifacts.clone() {
            if view.artifacts.iter().any(|a| a.path == path) {
                continue;
            }
            match self
                .inner
                .sandboxes
                .snapshot(
                    principal,
                    &sandbox_id,
                    path.clone(),
                    Vec::new(),
                    agent_pb::Compression::Zstd,
                )
                .await
            {
                Ok(snap) => {
                    self.record(
                        run_id,
                        view,
                        Event::ArtifactCollected {
                            path,
                            snapshot_id: snap.id,
                            sha256: snap.sha256,
                            size_bytes: snap.size_bytes,
                        },
                    )
                    .await?
                }
                Err(e) => {
                    return self
                        .finish(
                            run_id,
                            view,
                            RunState::Failed,
                            format!("collecting artifact {path}: {e}"),
                        )
                        .await
                }
            }
        }
        self.finish(run_id, view, RunState::Succeeded, String::new())
            .await
    }

    /// The principal policy decides a run's actions as: the token that
    /// submitted it (runs from before that was recorded: a submitter of the
    /// run's owner).
    fn submitter(view: &RunView) -> Principal {
        let by = &view.submitted_by;
        Principal {
            token_id: if by.token_id.is_empty() {
                format!("owner:{}", view.owner)
            } else {
                by.token_id.clone()
            },
            name: by.name.clone(),
            role: by.role.parse().unwrap_or(Role::Submitter),
            owner: view.owner.clone(),
        }
    }

    /// Decides one action of a run (a step's exec, `step` set; or the
    /// network) through the guard, which records the decision before
    /// anything acts on it. `require_approval` puts the run in
    /// `awaiting_approval` until the approval is decided; on a restart it
    /// waits for the same approval. Ok(true): go ahead; Ok(false): the run
    /// has ended (denied, not approved, unrecordable, or cancelled meanwhile).
    #[allow(clippy::too_many_arguments)]
    async fn clear(
        &self,
        run_id: &str,
        view: &mut RunView,
        action: crate::policy::Action,
        resource: &crate::policy::Resource,
        facts: &crate::policy::Facts,
        step: Option<u32>,
        cancel: &mut watch::Receiver<bool>,
    ) -> Result<bool> {
        let principal = Self::submitter(view);
        let guard = &self.inner.guard;
        let ask = Ask {
            principal: &principal,
            action,
            resource,
            facts,
        };
        let what = match step {
            Some(i) => format!("step {} ({})", i + 1, view.job.steps[i as usize].name),
            None => "the run's network".to_string(),
        };
        // One use per step (or network) of this run: a retry after a crash
        // may claim the same approval again, nothing else can.
        let used_by = match step {
            Some(i) => format!("{run_id}-s{i}"),
            None => format!("{run_id}-network"),
        };
        // Approved before a crash, not used yet.
        if let Some((id, s)) = view.approved.clone() {
            if s == step {
                return match guard.use_approval(&id, ask, &used_by).await {
                    Ok(_) => Ok(true),
                    Err(refused) => self.refused(run_id, view, &what, refused).await,
                };
            }
        }
        let approval_id = match view.awaiting.clone() {
            Some((id, s)) if s == step => id,
            _ => {
                let record = Record::Run {
                    run_id,
                    step,
                    request_id: format!("{run_id}:{}", view.last_seq + 1),
                    what: &what,
                };
                match guard.clear(&record, ask, None, &used_by).await {
                    Ok(Cleared::Allowed | Cleared::Approved(_)) => return Ok(true),
                    Ok(Cleared::Pending(a)) => {
                        self.record(
                            run_id,
                            view,
                            Event::ApprovalRequested {
                                approval_id: a.id.clone(),
                                step,
                            },
                        )
                        .await?;
                        tracing::info!(run = %run_id, approval = %a.id, "{what} awaits approval");
                        a.id
                    }
                    Err(refused) => return self.refused(run_id, view, &what, refused).await,
                }
            }
        };
        let mut stopping = self.inner.shutdown.clone();
        let decided = tokio::select! {
            a = guard.decision(&approval_id) => a,
            _ = cancel.changed() => {
                let reason = view.cancel_requested.clone().unwrap_or_default();
                self.finish(run_id, view, RunState::Cancelled, reason).await?;
                return Ok(false);
            }
            _ = stopping.changed() => return Err(Error::Stopping),
        };
        let decided = match decided {
            Ok(a) => a,
            Err(refused) => return self.refused(run_id, view, &what, refused).await,
        };
        self.record(
            run_id,
            view,
            Event::ApprovalDecided {
                approval_id: approval_id.clone(),
                step,
                outcome: decided.state().as_str().to_string(),
                by: decided.decided_by.clone(),
                reason: decided.decision_reason.clone(),
            },
        )
        .await?;
        match guard.go_ahead(&decided, ask, &used_by).await {
            Ok(_) => Ok(true),
            Err(refused) => self.refused(run_id, view, &what, refused).await,
        }
    }

    /// Ends a run whose next action the guard refused, saying why.
    async fn refused(
        &self,
        run_id: &str,
        view: &mut RunView,
        what: &str,
        refused: Refused,
    ) -> Result<bool> {
        let reason = match &refused {
            Refused::Unrecorded(_) => {
                // Nothing happens that is not on the record. The run ends
                // here, saying why, rather than wait in `running` for a log
                // that may not come back.
                tracing::error!(run = %run_id, "{what} was not started: {refused}");
                format!("{what} was not started: {refused}")
            }
            Refused::Denied { .. } => format!("{what} is denied: {refused}"),
            Refused::Expired(_) | Refused::NotApproved { .. } => {
                format!("{what} was not approved: {refused}")
            }
            Refused::Approval(_) => format!("{what}: {refused}"),
        };
        self.finish(run_id, view, RunState::Failed, reason).await?;
        Ok(false)
    }

    /// The boot id of the sandbox's agent (random per start of the agent).
    async fn agent_boot_id(&self, sandbox_id: &str) -> Option<String> {
        let mut agent = self.inner.sandboxes.agent(sandbox_id);
        let info = agent
            .info(agent_pb::InfoRequest {})
            .await
            .ok()?
            .into_inner();
        (!info.boot_id.is_empty()).then_some(info.boot_id)
    }

    async fn write_inputs(&self, view: &RunView, sandbox_id: &str) -> anyhow::Result<()> {
        let mut agent = self.inner.sandboxes.agent(sandbox_id);
        for f in &view.job.inputs {
            let data = self
                .inner
                .store
                .blob(&f.sha256)
                .await?
                .ok_or_else(|| anyhow::anyhow!("input {} is missing from the store", f.path))?;
            let msgs = vec![
                agent_pb::WriteFileRequest {
                    request: Some(agent_pb::write_file_request::Request::Header(
                        agent_pb::WriteFileHeader {
                            path: f.path.clone(),
                            mode: f.mode,
                            create_parents: true,
                            ..Default::default()
                        },
                    )),
                },
                agent_pb::WriteFileRequest {
                    request: Some(agent_pb::write_file_request::Request::Data(data.into())),
                },
                agent_pb::WriteFileRequest {
                    request: Some(agent_pb::write_file_request::Request::End(true)),
                },
            ];
            agent.write_file(futures::stream::iter(msgs)).await?;
        }
        Ok(())
    }

    /// Starts (or, with `resume`, re-attaches to) one attempt of a step and
    /// records its output until it exits.
    #[allow(clippy::too_many_arguments)]
    async fn run_step(
        &self,
        run_id: &str,
        view: &mut RunView,
        sandbox_id: &str,
        index: usize,
        attempt: u32,
        exec_id: &str,
        resume: bool,
        secrets: &RunSecrets,
        cancel: &mut watch::Receiver<bool>,
    ) -> Result<StepEnd> {
        let step = view.job.steps[index].clone();
        let mut agent = self.inner.sandboxes.agent(sandbox_id);
        // Output already recorded is not asked for again.
        if resume {
            tracing::info!(run = %run_id, step = index + 1, exec_id, "re-attaching to a started step");
            let attached = tokio::time::timeout(
                SILENCE,
                agent.attach(agent_pb::AttachRequest {
                    exec_id: exec_id.to_string(),
                    from_offset: view.steps[index].agent_resume_offset(),
                }),
            )
            .await;
            let Ok(attached) = attached else {
                return Ok(StepEnd::Silent);
            };
            match attached {
                Ok(s) => {
                    return self
                        .record_step(
                            run_id,
                            view,
                            index,
                            attempt,
                            exec_id,
                            s.into_inner(),
                            &secrets.redactor,
                            cancel,
                        )
                        .await
                }
                // The agent does not know the exec. If it is the same agent
                // that was there when the sandbox was assigned, the exec never
                // started (the crash fell between recording StepStarted and
                // asking the agent): start it now. Otherwise the agent lost
                // its memory, and whether the step ran is unknown.
                Err(s) if s.code() == tonic::Code::NotFound => {
                    // A boot id is random per start, so a restarted agent
                    // is never taken for the one that was asked to run it.
                    let same_agent = match self.agent_boot_id(sandbox_id).await {
                        Some(boot) => !view.agent_boot_id.is_empty() && boot == view.agent_boot_id,
                        None => false,
                    };
                    if !same_agent {
                        return Ok(StepEnd::Lost(format!(
                            "the sandbox's agent restarted and no longer knows exec {exec_id}"
                        )));
                    }
                }
                Err(s) => {
                    return Ok(StepEnd::Lost(format!(
                        "the sandbox is unreachable: {}",
                        s.message()
                    )))
                }
            }
        }
        let stream = {
            let mut env: HashMap<String, String> = view.job.env.clone().into_iter().collect();
            env.extend(secrets.values.clone());
            env.extend(step.env.clone());
            let (argv, shell) = match &step.command {
                Command::Argv(a) => (a.clone(), String::new()),
                Command::Shell(s) => (Vec::new(), s.clone()),
            };
            let start = agent_pb::ExecStart {
                exec_id: exec_id.to_string(),
                argv,
                shell,
                env,
                cwd: step.cwd.clone(),
                timeout_ms: step.timeout_secs.saturating_mul(1000),
                ..Default::default()
            };
            agent
                .exec(futures::stream::iter([agent_pb::ExecRequest {
                    request: Some(agent_pb::exec_request::Request::Start(start)),
                }]))
                .await
        };
        let events = match stream {
            Ok(s) => s.into_inner(),
            Err(s) => {
                return Ok(StepEnd::Lost(format!(
                    "the sandbox is unreachable: {}",
                    s.message()
                )))
            }
        };
        self.record_step(
            run_id,
            view,
            index,
            attempt,
            exec_id,
            events,
            &secrets.redactor,
            cancel,
        )
        .await
    }

    /// Records an exec's output and exit from its event stream.
    #[allow(clippy::too_many_arguments)]
    async fn record_step(
        &self,
        run_id: &str,
        view: &mut RunView,
        index: usize,
        attempt: u32,
        exec_id: &str,
        mut events: tonic::Streaming<agent_pb::ExecEvent>,
        redactor: &Redactor,
        cancel: &mut watch::Receiver<bool>,
    ) -> Result<StepEnd> {
        let sandbox_id = view.sandbox_id.clone().unwrap_or_default();
        let mut agent = self.inner.sandboxes.agent(&sandbox_id);
        let started = std::time::Instant::now();
        let mut stopping = self.inner.shutdown.clone();
        // On a re-attach the agent replays from the lower of the two
        // streams' positions; what a stream already recorded is skipped.
        let recorded = view.steps[index].agent_recorded;
        let mut held = [Held::default(), Held::default()];
        let mut read_to = view.steps[index].agent_resume_offset();
        loop {
            let message = tokio::select! {
                m = tokio::time::timeout(SILENCE, events.message()) => match m {
                    Ok(m) => m,
                    Err(_) => return Ok(StepEnd::Silent),
                },
                _ = cancel.changed() => {
                    let _ = agent
                        .signal(agent_pb::SignalRequest { exec_id: exec_id.into(), signal: 0, kill_tree: true })
                        .await;
                    continue;
                }
                _ = stopping.changed() => return Err(Error::Stopping),
            };
            let ev = match message {
                Ok(Some(ev)) => ev,
                Ok(None) => {
                    return Ok(StepEnd::Lost(
                        "the exec stream ended before the step exited".into(),
                    ))
                }
                Err(s) => {
                    return Ok(StepEnd::Lost(format!(
                        "the sandbox went away: {}",
                        s.message()
                    )))
                }
            };
            use agent_pb::exec_event::Event as E;
            let exited = match ev.event {
                Some(E::Output(o)) => {
                    let stream = if o.stream == agent_pb::OutputStream::Stderr as i32 {
                        Stream::Stderr
                    } else {
                        Stream::Stdout
                    };
                    let end = o.offset + o.data.len() as u64;
                    read_to = read_to.max(end);
                    let skip = recorded[stream.index()]
                        .saturating_sub(o.offset)
                        .min(o.data.len() as u64);
                    if skip as usize == o.data.len() {
                        continue;
                    }
                    held[stream.index()].push(o.offset + skip, &o.data[skip as usize..]);
                    self.record_output(
                        run_id, view, index, stream, &mut held, read_to, redactor, false,
                    )
                    .await?;
                    continue;
                }
                Some(E::Exited(x)) => Event::StepExited {
                    step: index as u32,
                    attempt,
                    exit_code: x.code,
                    signal: x.signal,
                    timed_out: x.timed_out,
                    oom_killed: x.oom_killed,
                    spawn_failure: String::new(),
                    duration_ms: x.duration_ms,
                },
                Some(E::SpawnFailed(f)) => Event::StepExited {
                    step: index as u32,
                    attempt,
                    exit_code: None,
                    signal: None,
                    timed_out: false,
                    oom_killed: false,
                    spawn_failure: f.reason,
                    duration_ms: started.elapsed().as_millis() as u64,
                },
                _ => continue,
            };
            // The end of the output: whatever was held back is decided.
            for stream in [Stream::Stdout, Stream::Stderr] {
                self.record_output(
                    run_id, view, index, stream, &mut held, read_to, redactor, true,
                )
                .await?;
            }
            return Ok(StepEnd::Exited(exited));
        }
    }

    /// Records what `held[stream]` can decide (everything, when `last`):
    /// redacted, stored as a blob, referenced by a `StepOutput` event.
    #[allow(clippy::too_many_arguments)]
    async fn record_output(
        &self,
        run_id: &str,
        view: &mut RunView,
        index: usize,
        stream: Stream,
        held: &mut [Held; 2],
        read_to: u64,
        redactor: &Redactor,
        last: bool,
    ) -> Result<()> {
        let this = stream.index();
        if held[this].bytes.is_empty() {
            return Ok(());
        }
        let (data, used) = redactor.redact(&held[this].bytes, last);
        if used == 0 {
            return Ok(());
        }
        held[this].consume(used);
        let position = |h: &Held| h.start().unwrap_or(read_to);
        let sha = hex::encode(sha2::Sha256::digest(&data));
        self.inner.store.put_blob(&sha, &data).await?;
        let offset = match stream {
            Stream::Stdout => view.steps[index].stdout_bytes,
            Stream::Stderr => view.steps[index].stderr_bytes,
        };
        self.record(
            run_id,
            view,
            Event::StepOutput {
                step: index as u32,
                stream,
                offset,
                length: data.len() as u64,
                blob_sha256: sha,
                agent_end: position(&held[this]),
                agent_other_end: position(&held[1 - this]),
            },
        )
        .await
    }
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

fn describe_failure(index: usize, name: &str, s: &super::events::StepView) -> String {
    let how = match (s.exit_code, s.signal, s.timed_out) {
        (_, _, true) => "timed out".to_string(),
        (Some(c), _, _) => format!("exited with {c}"),
        (None, Some(sig), _) => format!("was killed by signal {sig}"),
        _ => "could not start".to_string(),
    };
    format!("step {} ({name}) {how}", index + 1)
}

/// The exec id of one attempt of a run's step. It starts with the prefix the
/// public API refuses ([`crate::api::RESERVED_EXEC_ID_PREFIX`]), so no client
/// can start, signal or pre-register it, and ends in a random part, so it
/// cannot be guessed from the run id either.
fn run_exec_id(run_id: &str, index: usize, attempt: u32) -> String {
    format!(
        "{}run.{run_id}.s{index}.a{attempt}.{}",
        crate::api::RESERVED_EXEC_ID_PREFIX,
        crate::ids::random_hex(8)
    )
}
