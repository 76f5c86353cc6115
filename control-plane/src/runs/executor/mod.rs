//! Drives runs: every transition is appended to the run's log before the
//! action it allows, so [`Runner::drive`] can be called again on any run at
//! any moment (after a crash, on another start) and continues from where the
//! log says the run is, without repeating a started step.
//!
//! Here: the runner, a run's drive from start to end, its cancel, and the
//! guard's say on each action. Driving a run goes through `provision`
//! (secrets, network, sandbox, inputs), `steps` and `artifacts`, each
//! working on the run's context (`Run`). Sandboxes are reached through
//! [`Host`], so `tests` drive runs against the fakes of `crate::testing`.

mod artifacts;
mod provision;
mod session;
mod steps;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use tokio::sync::{broadcast, watch, Notify};

use super::events::{Event, Gate, RunState, RunView};
use super::redact::Redactor;
use super::sealed::Sealer;
use super::store::{EventStore, StoredEvent};
use crate::auth::{Principal, Role};
use crate::guard::{Ask, Cleared, Record, Refused};
use crate::host::Host;

pub use crate::host::RUN_LABEL;
pub use session::{SendError, SendInput, TextDelta};

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
    /// A session's conversation would no longer pair calls and results
    /// (or its log does not replay): it cannot go on.
    #[error("run {0}: {1}")]
    Conversation(String, String),
}

type Result<T> = std::result::Result<T, Error>;

struct Live {
    events: broadcast::Sender<StoredEvent>,
    cancel: watch::Sender<bool>,
    /// Whether a driver is running the run now ([`Runner::cancel`] waits
    /// for it to end the run, or ends it itself).
    driving: watch::Sender<bool>,
    /// A session's model text as it streams (not stored).
    deltas: broadcast::Sender<session::TextDelta>,
    /// Held while a client's send to the session is checked and recorded.
    sending: tokio::sync::Mutex<()>,
}

/// Marks its run as driven while it lives.
struct Driving(Arc<Live>);

impl Driving {
    /// The run's driving, unless another driver has it.
    fn claim(live: Arc<Live>) -> Option<Self> {
        let claimed = live.driving.send_if_modified(|driven| {
            let free = !*driven;
            *driven = true;
            free
        });
        claimed.then_some(Self(live))
    }
}

impl Drop for Driving {
    fn drop(&mut self) {
        self.0.driving.send_replace(false);
    }
}

/// What the guard said of one action of a run.
enum Decided {
    /// Go ahead (allowed, or approved and the approval now used).
    Go,
    /// Denied, not approved, or not recordable.
    Refused(Refused),
    /// The run has ended meanwhile (cancelled).
    Ended,
}

/// How long a cancel waits for the run's driver to end the run (it kills
/// the step's tree first) before it ends the run itself.
const CANCEL_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

pub struct Runner<H: Host, S: EventStore> {
    inner: Arc<Inner<H, S>>,
}

impl<H: Host, S: EventStore> Clone for Runner<H, S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

struct Inner<H: Host, S: EventStore> {
    store: S,
    /// Where runs get their sandboxes (`Sandboxes` on Docker in production).
    host: H,
    live: Mutex<HashMap<String, Arc<Live>>>,
    /// Opens the runs' sealed secrets.
    sealer: Sealer,
    /// Decides each step (and a run's network) before it happens.
    guard: crate::guard::Guard,
    queue: Mutex<super::queue::Queue>,
    /// Agent sessions' models and bounds.
    harness: Arc<crate::harness::Settings>,
    wake: Notify,
    shutdown: watch::Receiver<bool>,
}

/// A run's secret values, and the redactor that keeps them out of its output.
struct RunSecrets {
    values: BTreeMap<String, String>,
    redactor: Redactor,
}

impl RunSecrets {
    fn new(values: BTreeMap<String, String>) -> Self {
        Self {
            redactor: Redactor::new(values.values().map(String::as_str)),
            values,
        }
    }
}

/// One run being driven: what each part of driving it works with.
struct Run<'a> {
    id: &'a str,
    /// The run as its log says; every append moves it on.
    view: &'a mut RunView,
    /// Who the run's sandbox work is done as (the guard decides each action
    /// as the run's submitter, see [`Runner::submitter`]).
    principal: &'a Principal,
    /// Turns true when a cancel is requested.
    cancel: watch::Receiver<bool>,
    secrets: RunSecrets,
}

impl<H: Host, S: EventStore> Runner<H, S> {
    /// A runner that starts at most `max_running` runs at once, at most
    /// `max_per_owner` of one owner, owners taking turns.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: S,
        host: H,
        max_running: usize,
        max_per_owner: usize,
        sealer: Sealer,
        guard: crate::guard::Guard,
        harness: Arc<crate::harness::Settings>,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        let runner = Self {
            inner: Arc::new(Inner {
                store,
                host,
                live: Mutex::default(),
                sealer,
                guard,
                queue: Mutex::new(super::queue::Queue::new(max_running, max_per_owner)),
                harness,
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
                    deltas: broadcast::channel(1024).0,
                    sending: tokio::sync::Mutex::new(()),
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
                    let finished = matches!(event, Event::Finished { .. });
                    let _ = self.live(run_id).events.send(StoredEvent {
                        seq,
                        unix_ms: now,
                        event,
                    });
                    if finished {
                        // Nothing more will be sent: watchers have their
                        // receivers, and a later one reads the store.
                        self.inner.live.lock().expect("lock").remove(run_id);
                    }
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

    /// Deletes what runs that have finished left behind: their sealed
    /// secrets and the sandboxes made for them (a crash between `finished`
    /// and the release that follows it leaves both). Called at start.
    pub async fn release_leftover_sandboxes(&self) {
        match self.inner.store.forget_finished_secrets().await {
            Ok(0) => {}
            Ok(n) => tracing::info!("deleted the sealed secrets of {n} finished runs"),
            Err(e) => tracing::warn!("could not delete the sealed secrets of finished runs: {e}"),
        }
        let system = Principal {
            token_id: "system".into(),
            name: "control plane".into(),
            role: Role::Admin,
            owner: String::new(),
        };
        let Ok(all) = self.inner.host.run_sandboxes(&system, None).await else {
            return;
        };
        for sb in all {
            let run_id = &sb.run_id;
            let done = match self.view(run_id).await {
                Ok(v) => v.state.is_finished(),
                Err(Error::NotFound(_)) => true,
                Err(_) => false,
            };
            if done {
                tracing::info!(run = %run_id, sandbox = %sb.sandbox_id, "removing the sandbox of a finished run");
                let _ = self
                    .inner
                    .host
                    .delete_sandbox(&system, &sb.sandbox_id)
                    .await;
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
        let mut sandboxes: Vec<String> = self
            .inner
            .host
            .run_sandboxes(&system, Some(run_id))
            .await
            .map(|l| l.into_iter().map(|s| s.sandbox_id).collect())
            .unwrap_or_default();
        if let Some(sb) = &view.sandbox_id {
            if !sandboxes.contains(sb) {
                sandboxes.push(sb.clone());
            }
        }
        for sb in sandboxes {
            if let Err(e) = self.inner.host.delete_sandbox(&system, &sb).await {
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
        // One driver at a time. A cancel waits for this driver to end the
        // run, while it drives.
        let live = self.live(run_id);
        let Some(_driving) = Driving::claim(live.clone()) else {
            // Another driver has it (a session sent a message while its
            // driver was winding down): this run is driven again once that
            // one is done, so nothing sent meanwhile is left waiting.
            let view = self.view(run_id).await?;
            let (runner, run_id) = (self.clone(), run_id.to_string());
            let mut driving = live.driving.subscribe();
            tokio::spawn(async move {
                if driving.wait_for(|d| !*d).await.is_ok() {
                    runner.schedule(&view.owner, &run_id);
                }
            });
            return Ok(());
        };
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

    async fn drive_inner(
        &self,
        run_id: &str,
        view: &mut RunView,
        principal: &Principal,
    ) -> Result<()> {
        if let Some(reason) = view.cancel_requested.clone() {
            return self.finish(run_id, view, RunState::Cancelled, reason).await;
        }
        let cancel = self.live(run_id).cancel.subscribe();
        let secrets = match self.secrets(run_id, view).await? {
            Ok(secrets) => secrets,
            Err(reason) => {
                return self
                    .finish(run_id, view, RunState::Interrupted, reason)
                    .await
            }
        };
        let mut run = Run {
            id: run_id,
            view,
            principal,
            cancel,
            secrets,
        };
        // Each part answers false (or no sandbox) once it has ended the run.
        let Some(sandbox_id) = self.provision(&mut run).await? else {
            return Ok(());
        };
        if run.view.job.agent.is_some() {
            return self.run_session(&mut run, &sandbox_id).await;
        }
        if !self.run_steps(&mut run, &sandbox_id).await? {
            return Ok(());
        }
        if !self.collect_artifacts(&mut run, &sandbox_id).await? {
            return Ok(());
        }
        self.finish(run.id, run.view, RunState::Succeeded, String::new())
            .await
    }

    /// Ends the run as cancelled, with the reason its cancel gave.
    async fn finish_cancelled(&self, run: &mut Run<'_>) -> Result<()> {
        let reason = run.view.cancel_requested.clone().unwrap_or_default();
        self.finish(run.id, run.view, RunState::Cancelled, reason)
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

    /// Decides one action of a job (a step's exec, `step` set; or the
    /// network) through [`Runner::decide`]. Ok(true): go ahead; Ok(false):
    /// the run has ended (denied, not approved, unrecordable, or cancelled
    /// meanwhile).
    async fn clear(
        &self,
        run: &mut Run<'_>,
        action: crate::policy::Action,
        resource: &crate::policy::Resource,
        facts: &crate::policy::Facts,
        step: Option<u32>,
    ) -> Result<bool> {
        let (gate, what) = match step {
            Some(i) => (
                Gate::Step(i),
                format!("step {} ({})", i + 1, run.view.job.steps[i as usize].name),
            ),
            None => (Gate::Network, "the run's network".to_string()),
        };
        match self
            .decide(run, action, resource, facts, gate, &what)
            .await?
        {
            Decided::Go => Ok(true),
            Decided::Ended => Ok(false),
            Decided::Refused(refused) => self.refused(run.id, run.view, &what, refused).await,
        }
    }

    /// Decides one action of a run through the guard, which records the
    /// decision before anything acts on it. `require_approval` puts the run
    /// in `awaiting_approval` until the approval is decided; on a restart it
    /// waits for the same approval, and an approval granted before a crash
    /// and not yet used is used. `what` names the action for a person.
    async fn decide(
        &self,
        run: &mut Run<'_>,
        action: crate::policy::Action,
        resource: &crate::policy::Resource,
        facts: &crate::policy::Facts,
        gate: Gate,
        what: &str,
    ) -> Result<Decided> {
        let run_id = run.id;
        let principal = Self::submitter(run.view);
        let guard = &self.inner.guard;
        let ask = Ask {
            principal: &principal,
            action,
            resource,
            facts,
        };
        // One use per step, network or tool call request of this run: a
        // retry after a crash may claim the same approval again, nothing
        // else can.
        let used_by = match &gate {
            Gate::Step(i) => format!("{run_id}-s{i}"),
            Gate::Network => format!("{run_id}-network"),
            Gate::Call(c) => format!("{run_id}-c{}-{}", c.call_id, c.request),
        };
        // Approved before a crash, not used yet.
        if let Some((id, g)) = run.view.approved.clone() {
            if g == gate {
                return Ok(match guard.use_approval(&id, ask, &used_by).await {
                    Ok(_) => Decided::Go,
                    Err(refused) => Decided::Refused(refused),
                });
            }
        }
        let approval_id = match run.view.awaiting.clone() {
            Some((id, g)) if g == gate => id,
            _ => {
                let record = Record::Run {
                    run_id,
                    step: gate.step(),
                    request_id: format!("{run_id}:{}", run.view.last_seq + 1),
                    what,
                };
                match guard.clear(&record, ask, None, &used_by).await {
                    Ok(Cleared::Allowed | Cleared::Approved(_) | Cleared::Remembered(_)) => {
                        return Ok(Decided::Go)
                    }
                    Ok(Cleared::Pending(a)) => {
                        self.record(
                            run_id,
                            run.view,
                            Event::ApprovalRequested {
                                approval_id: a.id.clone(),
                                step: gate.step(),
                                call: gate.call(),
                            },
                        )
                        .await?;
                        tracing::info!(run = %run_id, approval = %a.id, "{what} awaits approval");
                        a.id
                    }
                    Err(refused) => return Ok(Decided::Refused(refused)),
                }
            }
        };
        let mut stopping = self.inner.shutdown.clone();
        let decided = tokio::select! {
            a = guard.decision(&approval_id) => a,
            _ = run.cancel.changed() => {
                self.finish_cancelled(run).await?;
                return Ok(Decided::Ended);
            }
            _ = stopping.changed() => return Err(Error::Stopping),
        };
        let decided = match decided {
            Ok(a) => a,
            Err(refused) => return Ok(Decided::Refused(refused)),
        };
        self.record(
            run_id,
            run.view,
            Event::ApprovalDecided {
                approval_id: approval_id.clone(),
                step: gate.step(),
                call: gate.call(),
                outcome: decided.state().as_str().to_string(),
                by: decided.decided_by.clone(),
                reason: decided.decision_reason.clone(),
            },
        )
        .await?;
        Ok(match guard.go_ahead(&decided, ask, &used_by).await {
            Ok(_) => Decided::Go,
            Err(refused) => Decided::Refused(refused),
        })
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
                // that may not come back. (The audit log has said why, as an
                // error, once.)
                tracing::warn!(run = %run_id, "{what} was not started: {refused}");
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
}
