//! In-memory stand-ins for what the control plane works on, for unit tests
//! (compiled with `cfg(test)` only):
//! - [`MemEvents`], an [`EventStore`] with the semantics of
//!   `runs::store::SqlEvents`, that can be told to stop taking appends the
//!   way a crash stops a control plane ([`CrashPoint`]);
//! - [`FakeHost`] and its [`FakeAgent`]s: sandboxes whose agents run
//!   scripted commands at once, keep every exec by id (an id started again
//!   attaches), count the commands they really start, and can restart
//!   (a new boot id, every exec forgotten), go silent or be gone;
//! - [`FakeRuntime`]: containers in a map, for what sits on a `Runtime`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use futures::StreamExt;
use sha2::Digest;
use tokio::sync::broadcast;

use crate::auth::Principal;
use crate::host::{
    self, Agent, AgentError, ExecEvent, ExecEvents, ExecSpec, Host, RunSandbox, Snapshot, RUN_LABEL,
};
use crate::runs::events::{Event, RunState, Stream};
use crate::runs::job::Command;
use crate::runs::store::{self, EventStore, NewRun, StoredEvent, Submission};
use crate::runtime::{self, ContainerSpec, ContainerStatus, Exit, Runtime};
use crate::sandboxes::CreateRequest;

/// A lock whose holder panicked is still whole: these are plain maps.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

// ------------------------------------------------------------- event store

/// Run logs, blobs and sealed secrets in memory.
#[derive(Clone, Default)]
pub struct MemEvents {
    mem: Arc<Mutex<Mem>>,
}

#[derive(Default)]
struct Mem {
    runs: BTreeMap<String, MemRun>,
    /// (owner, idempotency key) → run id.
    keys: HashMap<(String, String), String>,
    blobs: HashMap<String, Vec<u8>>,
    secrets: HashMap<String, Vec<u8>>,
    crash: Option<Crash>,
}

struct MemRun {
    owner: String,
    created_unix_ms: i64,
    state: RunState,
    labels: BTreeMap<String, String>,
    events: Vec<StoredEvent>,
}

/// Where a [`MemEvents`] told to crash stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashPoint {
    /// The append after the last one allowed fails, and is not written.
    BeforeWrite,
    /// The last append allowed is written, and its writer hears it failed
    /// (the control plane died before it acted on it).
    AfterWrite,
}

struct Crash {
    appends_left: u64,
    point: CrashPoint,
}

fn stopped() -> store::Error {
    store::Error::Batch("the store stopped taking appends (a simulated crash)".into())
}

fn conflict(run_id: &str, seq: u64) -> store::Error {
    store::Error::Conflict {
        run_id: run_id.to_string(),
        seq,
    }
}

impl MemEvents {
    pub fn new() -> Self {
        Self::default()
    }

    /// After `appends` more appends (`point` says how the last one ends),
    /// every append fails, as if the control plane had died there.
    pub fn crash_after(&self, appends: u64, point: CrashPoint) {
        lock(&self.mem).crash = Some(Crash {
            appends_left: appends,
            point,
        });
    }

    /// Appends are taken again (the store of a restarted control plane).
    pub fn recover(&self) {
        lock(&self.mem).crash = None;
    }

    /// The run's events, in order.
    pub fn log(&self, run_id: &str) -> Vec<Event> {
        lock(&self.mem)
            .runs
            .get(run_id)
            .map(|r| r.events.iter().map(|e| e.event.clone()).collect())
            .unwrap_or_default()
    }

    /// A stored blob.
    pub fn blob_bytes(&self, sha256: &str) -> Option<Vec<u8>> {
        lock(&self.mem).blobs.get(sha256).cloned()
    }
}

impl EventStore for MemEvents {
    async fn submit(&self, run: NewRun<'_>) -> store::Result<Submission> {
        let mut guard = lock(&self.mem);
        let mem = &mut *guard;
        let key = (run.owner.to_string(), run.idempotency_key.to_string());
        if let Some(existing) = mem.keys.get(&key) {
            return Ok(Submission::Existing(existing.clone()));
        }
        if mem.runs.contains_key(run.run_id) {
            return Err(conflict(run.run_id, 1));
        }
        mem.keys.insert(key, run.run_id.to_string());
        mem.runs.insert(
            run.run_id.to_string(),
            MemRun {
                owner: run.owner.to_string(),
                created_unix_ms: run.now,
                state: RunState::Queued,
                labels: run.labels.clone(),
                events: vec![StoredEvent {
                    seq: 1,
                    unix_ms: run.now,
                    event: run.first.clone(),
                }],
            },
        );
        if let Some(sealed) = run.sealed_secrets {
            mem.secrets.insert(run.run_id.to_string(), sealed.to_vec());
        }
        Ok(Submission::Created(run.run_id.to_string()))
    }

    async fn append(
        &self,
        run_id: &str,
        seq: u64,
        event: &Event,
        state: RunState,
        now: i64,
    ) -> store::Result<()> {
        let mut guard = lock(&self.mem);
        let mem = &mut *guard;
        if mem.crash.as_ref().is_some_and(|c| c.appends_left == 0) {
            return Err(stopped());
        }
        // Only the next number of a run that exists is taken.
        let run = mem
            .runs
            .get_mut(run_id)
            .ok_or_else(|| conflict(run_id, seq))?;
        if run.events.len() as u64 + 1 != seq {
            return Err(conflict(run_id, seq));
        }
        run.events.push(StoredEvent {
            seq,
            unix_ms: now,
            event: event.clone(),
        });
        run.state = state;
        if let Some(crash) = &mut mem.crash {
            crash.appends_left -= 1;
            if crash.appends_left == 0 && crash.point == CrashPoint::AfterWrite {
                return Err(stopped());
            }
        }
        Ok(())
    }

    async fn events(&self, run_id: &str, from_seq: u64) -> store::Result<Vec<StoredEvent>> {
        Ok(lock(&self.mem)
            .runs
            .get(run_id)
            .map(|r| {
                r.events
                    .iter()
                    .filter(|e| e.seq >= from_seq)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default())
    }

    async fn unfinished(&self) -> store::Result<Vec<String>> {
        let mem = lock(&self.mem);
        let mut open: Vec<(i64, String)> = mem
            .runs
            .iter()
            .filter(|(_, r)| !r.state.is_finished())
            .map(|(id, r)| (r.created_unix_ms, id.clone()))
            .collect();
        // In submission order, as SqlEvents answers.
        open.sort();
        Ok(open.into_iter().map(|(_, id)| id).collect())
    }

    async fn list(
        &self,
        owner: Option<&str>,
        states: &[RunState],
        labels: &BTreeMap<String, String>,
        offset: u64,
        limit: u64,
    ) -> store::Result<Vec<String>> {
        let mem = lock(&self.mem);
        let mut found: Vec<(i64, String)> = mem
            .runs
            .iter()
            .filter(|(_, r)| owner.is_none_or(|o| r.owner == o))
            .filter(|(_, r)| states.is_empty() || states.contains(&r.state))
            .filter(|(_, r)| labels.iter().all(|(k, v)| r.labels.get(k) == Some(v)))
            .map(|(id, r)| (r.created_unix_ms, id.clone()))
            .collect();
        // Newest first.
        found.sort();
        found.reverse();
        Ok(found
            .into_iter()
            .skip(offset as usize)
            .take(limit as usize)
            .map(|(_, id)| id)
            .collect())
    }

    async fn sealed_secrets(&self, run_id: &str) -> store::Result<Option<Vec<u8>>> {
        Ok(lock(&self.mem).secrets.get(run_id).cloned())
    }

    async fn forget_secrets(&self, run_id: &str) -> store::Result<()> {
        lock(&self.mem).secrets.remove(run_id);
        Ok(())
    }

    async fn forget_finished_secrets(&self) -> store::Result<u64> {
        let mut guard = lock(&self.mem);
        let mem = &mut *guard;
        let before = mem.secrets.len();
        let runs = &mem.runs;
        mem.secrets
            .retain(|id, _| runs.get(id).is_none_or(|r| !r.state.is_finished()));
        Ok((before - mem.secrets.len()) as u64)
    }

    async fn put_blob(&self, sha256: &str, data: &[u8]) -> store::Result<()> {
        lock(&self.mem)
            .blobs
            .entry(sha256.to_string())
            .or_insert_with(|| data.to_vec());
        Ok(())
    }

    async fn blob(&self, sha256: &str) -> store::Result<Option<Vec<u8>>> {
        Ok(lock(&self.mem).blobs.get(sha256).cloned())
    }
}

// -------------------------------------------------------- host and agents

/// What a command does when a [`FakeAgent`] runs it: all of it at once,
/// kept as the real agent keeps an exec's output and outcome.
#[derive(Debug, Clone, Default)]
pub struct Script {
    /// Its output, chunk by chunk.
    pub output: Vec<(Stream, Vec<u8>)>,
    pub exit_code: i32,
    /// Set: the command does not start, for this reason.
    pub spawn_failure: Option<String>,
}

/// Sandboxes in memory. Clones share them.
#[derive(Clone, Default)]
pub struct FakeHost {
    state: Arc<Mutex<HostState>>,
}

#[derive(Default)]
struct HostState {
    sandboxes: BTreeMap<String, FakeSandbox>,
    /// Ids given so far (sandbox and boot ids are numbered).
    ids: u64,
    /// Sandboxes made through [`Host::create_sandbox`].
    created: u64,
    scripts: HashMap<String, Script>,
    /// Commands really started (not attached to), by their text.
    starts: HashMap<String, u32>,
    /// Attaches asked for, and how many of the next ones stay silent.
    attaches: u32,
    silent_attaches: u32,
    /// Exec ids whose tree was killed, in order.
    kills: Vec<String>,
    create_failure: Option<String>,
    snapshots: u64,
}

struct FakeSandbox {
    owner: String,
    labels: BTreeMap<String, String>,
    boot_id: String,
    execs: HashMap<String, FakeExec>,
    files: BTreeMap<String, (Vec<u8>, u32)>,
    /// Deleted, or vanished: kept for what tests ask of it afterwards.
    gone: bool,
}

struct FakeExec {
    spec: ExecSpec,
    events: Vec<ExecEvent>,
}

/// The text a command is scripted and counted by: a shell string, or argv
/// joined by spaces.
pub fn command_text(command: &Command) -> String {
    match command {
        Command::Argv(argv) => argv.join(" "),
        Command::Shell(s) => s.clone(),
    }
}

impl HostState {
    fn next_id(&mut self, prefix: &str) -> String {
        self.ids += 1;
        format!("{prefix}-{}", self.ids)
    }

    fn add_sandbox(&mut self, owner: &str, labels: BTreeMap<String, String>) -> String {
        let id = self.next_id("sb");
        let boot_id = self.next_id("boot");
        self.sandboxes.insert(
            id.clone(),
            FakeSandbox {
                owner: owner.to_string(),
                labels,
                boot_id,
                execs: HashMap::new(),
                files: BTreeMap::new(),
                gone: false,
            },
        );
        id
    }

    /// The sandbox, if it is there.
    fn sandbox(&mut self, id: &str) -> Result<&mut FakeSandbox, AgentError> {
        match self.sandboxes.get_mut(id) {
            Some(sb) if !sb.gone => Ok(sb),
            _ => Err(AgentError::Unreachable(format!(
                "sandbox {id}: connection refused (it is gone)"
            ))),
        }
    }
}

impl FakeHost {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, HostState> {
        lock(&self.state)
    }

    /// What `command` (see [`command_text`]) does from now on; unscripted
    /// commands exit 0 saying nothing.
    pub fn script(&self, command: &str, script: Script) {
        self.lock().scripts.insert(command.to_string(), script);
    }

    /// A sandbox of `owner`'s made for run `run_id` (as one made before a
    /// crash would be); answers its id.
    pub fn add_run_sandbox(&self, owner: &str, run_id: &str) -> String {
        let labels = BTreeMap::from([(RUN_LABEL.to_string(), run_id.to_string())]);
        self.lock().add_sandbox(owner, labels)
    }

    /// The sandboxes there now.
    pub fn sandbox_ids(&self) -> Vec<String> {
        self.lock()
            .sandboxes
            .iter()
            .filter(|(_, sb)| !sb.gone)
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// How many sandboxes were made through [`Host::create_sandbox`].
    pub fn sandboxes_created(&self) -> u64 {
        self.lock().created
    }

    /// Creates fail from now on, saying `reason`.
    pub fn fail_creates(&self, reason: &str) {
        self.lock().create_failure = Some(reason.to_string());
    }

    pub fn boot_id(&self, sandbox_id: &str) -> Option<String> {
        self.lock()
            .sandboxes
            .get(sandbox_id)
            .map(|sb| sb.boot_id.clone())
    }

    /// The sandbox's agent starts again: a new boot id, every exec forgotten.
    pub fn restart_agent(&self, sandbox_id: &str) {
        let mut state = self.lock();
        let boot_id = state.next_id("boot");
        if let Some(sb) = state.sandboxes.get_mut(sandbox_id) {
            sb.boot_id = boot_id;
            sb.execs.clear();
        }
    }

    /// The sandbox vanishes (its container removed behind the control
    /// plane's back): its agent is unreachable.
    pub fn remove_sandbox(&self, sandbox_id: &str) {
        if let Some(sb) = self.lock().sandboxes.get_mut(sandbox_id) {
            sb.gone = true;
        }
    }

    /// How many times `command` was really started, in every sandbox.
    pub fn starts(&self, command: &str) -> u32 {
        self.lock().starts.get(command).copied().unwrap_or(0)
    }

    /// The exec the sandbox's agent knows by `exec_id`, as it was asked for.
    pub fn exec(&self, sandbox_id: &str, exec_id: &str) -> Option<ExecSpec> {
        self.lock()
            .sandboxes
            .get(sandbox_id)?
            .execs
            .get(exec_id)
            .map(|e| e.spec.clone())
    }

    /// The next `n` attaches answer a stream that never says anything (a
    /// half-open connection).
    pub fn silence_next_attaches(&self, n: u32) {
        self.lock().silent_attaches = n;
    }

    /// Attaches asked for so far.
    pub fn attaches(&self) -> u32 {
        self.lock().attaches
    }

    /// Exec ids whose tree was killed, in order.
    pub fn kills(&self) -> Vec<String> {
        self.lock().kills.clone()
    }

    /// A file written into the sandbox, and its mode.
    pub fn file(&self, sandbox_id: &str, path: &str) -> Option<(Vec<u8>, u32)> {
        self.lock()
            .sandboxes
            .get(sandbox_id)?
            .files
            .get(path)
            .cloned()
    }
}

/// What an exec says from its start: `started`, its output, its end (or
/// only its spawn failure).
fn script_events(script: &Script, pid: u32) -> Vec<ExecEvent> {
    if let Some(reason) = &script.spawn_failure {
        return vec![ExecEvent::SpawnFailed(reason.clone())];
    }
    let mut events = vec![ExecEvent::Started {
        pid,
        attached: false,
    }];
    let mut offset = 0;
    for (stream, data) in &script.output {
        events.push(ExecEvent::Output {
            stream: *stream,
            offset,
            data: Bytes::from(data.clone()),
        });
        offset += data.len() as u64;
    }
    events.push(ExecEvent::Exited {
        code: Some(script.exit_code),
        signal: None,
        timed_out: false,
        oom_killed: false,
        duration_ms: 1,
    });
    events
}

/// An exec's events from agent offset `from`, as the agent replays them.
fn replay(events: &[ExecEvent], from: u64, attached: bool) -> ExecEvents {
    let replayed: Vec<Result<ExecEvent, AgentError>> = events
        .iter()
        .filter_map(|e| match e {
            ExecEvent::Started { pid, .. } => Some(ExecEvent::Started {
                pid: *pid,
                attached,
            }),
            ExecEvent::Output {
                stream,
                offset,
                data,
            } => {
                let end = *offset + data.len() as u64;
                if end <= from {
                    None
                } else if *offset >= from {
                    Some(e.clone())
                } else {
                    Some(ExecEvent::Output {
                        stream: *stream,
                        offset: from,
                        data: data.slice((from - *offset) as usize..),
                    })
                }
            }
            other => Some(other.clone()),
        })
        .map(Ok)
        .collect();
    futures::stream::iter(replayed).boxed()
}

/// The agent of one [`FakeHost`] sandbox.
#[derive(Clone)]
pub struct FakeAgent {
    host: FakeHost,
    sandbox_id: String,
}

impl Agent for FakeAgent {
    async fn start_exec(&self, spec: ExecSpec) -> Result<ExecEvents, AgentError> {
        let mut guard = self.host.lock();
        let state = &mut *guard;
        let command = command_text(&spec.command);
        let script = state.scripts.get(&command).cloned().unwrap_or_default();
        let sandbox = state.sandbox(&self.sandbox_id)?;
        // An id the agent has is attached to, never run again.
        if let Some(exec) = sandbox.execs.get(&spec.exec_id) {
            return Ok(replay(&exec.events, 0, true));
        }
        let pid = 100 + sandbox.execs.len() as u32;
        let events = script_events(&script, pid);
        let stream = replay(&events, 0, false);
        sandbox
            .execs
            .insert(spec.exec_id.clone(), FakeExec { spec, events });
        *state.starts.entry(command).or_default() += 1;
        Ok(stream)
    }

    async fn attach_exec(&self, exec_id: &str, from_offset: u64) -> Result<ExecEvents, AgentError> {
        let mut guard = self.host.lock();
        let state = &mut *guard;
        state.sandbox(&self.sandbox_id)?;
        state.attaches += 1;
        if state.silent_attaches > 0 {
            state.silent_attaches -= 1;
            return Ok(futures::stream::pending::<Result<ExecEvent, AgentError>>().boxed());
        }
        let sandbox = state.sandbox(&self.sandbox_id)?;
        match sandbox.execs.get(exec_id) {
            Some(exec) => Ok(replay(&exec.events, from_offset, true)),
            None => Err(AgentError::NotFound(format!("no exec {exec_id}"))),
        }
    }

    async fn kill_exec(&self, exec_id: &str) -> Result<(), AgentError> {
        let mut state = self.host.lock();
        state.sandbox(&self.sandbox_id)?;
        state.kills.push(exec_id.to_string());
        Ok(())
    }

    async fn boot_id(&self) -> Result<String, AgentError> {
        let mut state = self.host.lock();
        Ok(state.sandbox(&self.sandbox_id)?.boot_id.clone())
    }

    async fn put_file(&self, path: &str, data: Vec<u8>, mode: u32) -> Result<(), AgentError> {
        let mut state = self.host.lock();
        state
            .sandbox(&self.sandbox_id)?
            .files
            .insert(path.to_string(), (data, mode));
        Ok(())
    }

    async fn get_file(&self, path: &str, max_bytes: u64) -> Result<Vec<u8>, AgentError> {
        let mut state = self.host.lock();
        match state.sandbox(&self.sandbox_id)?.files.get(path) {
            Some((data, _)) if data.len() as u64 > max_bytes => Err(AgentError::Unreachable(
                format!("{path} is larger than {max_bytes} bytes"),
            )),
            Some((data, _)) => Ok(data.clone()),
            None => Err(AgentError::NotFound(format!("{path}: no such file"))),
        }
    }
}

fn not_found(sandbox_id: &str) -> host::Error {
    host::Error::Sandboxes(format!("sandbox {sandbox_id} not found"))
}

impl Host for FakeHost {
    type Agent = FakeAgent;

    async fn run_sandboxes(
        &self,
        principal: &Principal,
        run_id: Option<&str>,
    ) -> Result<Vec<RunSandbox>, host::Error> {
        let state = self.lock();
        Ok(state
            .sandboxes
            .iter()
            .filter(|(_, sb)| !sb.gone && principal.sees(Some(sb.owner.as_str())))
            .filter_map(|(id, sb)| {
                let run = sb.labels.get(RUN_LABEL)?;
                if run_id.is_some_and(|wanted| wanted != run.as_str()) {
                    return None;
                }
                Some(RunSandbox {
                    sandbox_id: id.clone(),
                    run_id: run.clone(),
                })
            })
            .collect())
    }

    async fn create_sandbox(
        &self,
        principal: &Principal,
        req: CreateRequest,
    ) -> Result<String, host::Error> {
        let mut state = self.lock();
        if let Some(reason) = &state.create_failure {
            return Err(host::Error::Sandboxes(reason.clone()));
        }
        state.created += 1;
        Ok(state.add_sandbox(&principal.owner, req.labels))
    }

    fn check_request(&self, _req: &CreateRequest) -> Result<(), host::Error> {
        Ok(())
    }

    fn agent_of(&self, sandbox_id: &str) -> FakeAgent {
        FakeAgent {
            host: self.clone(),
            sandbox_id: sandbox_id.to_string(),
        }
    }

    async fn snapshot_artifact(
        &self,
        principal: &Principal,
        sandbox_id: &str,
        path: &str,
    ) -> Result<Snapshot, host::Error> {
        let mut state = self.lock();
        match state.sandboxes.get(sandbox_id) {
            Some(sb) if !sb.gone && principal.sees(Some(sb.owner.as_str())) => {}
            _ => return Err(not_found(sandbox_id)),
        }
        state.snapshots += 1;
        Ok(Snapshot {
            id: format!("snap-{}", state.snapshots),
            sha256: hex::encode(sha2::Sha256::digest(format!("{sandbox_id}/{path}"))),
            size_bytes: path.len() as u64,
        })
    }

    async fn delete_sandbox(
        &self,
        principal: &Principal,
        sandbox_id: &str,
    ) -> Result<(), host::Error> {
        let mut state = self.lock();
        match state.sandboxes.get_mut(sandbox_id) {
            Some(sb) if !sb.gone && principal.sees(Some(sb.owner.as_str())) => {
                sb.gone = true;
                Ok(())
            }
            _ => Err(not_found(sandbox_id)),
        }
    }
}

// ----------------------------------------------------------------- runtime

/// Containers in a map. Clones share them.
#[derive(Clone)]
pub struct FakeRuntime {
    state: Arc<Mutex<RuntimeState>>,
    exits: broadcast::Sender<Exit>,
}

#[derive(Default)]
struct RuntimeState {
    containers: BTreeMap<String, ContainerStatus>,
    volumes: BTreeSet<String>,
    made: u64,
}

impl Default for FakeRuntime {
    fn default() -> Self {
        Self {
            state: Arc::default(),
            exits: broadcast::channel(64).0,
        }
    }
}

impl FakeRuntime {
    pub fn new() -> Self {
        Self::default()
    }

    /// The sandbox's container stops as if its process died; watchers of
    /// [`Runtime::exits`] hear of it.
    pub fn stop(&self, sandbox_id: &str, exit_code: &str) {
        if let Some(c) = lock(&self.state).containers.get_mut(sandbox_id) {
            c.running = false;
            c.paused = false;
        }
        let _ = self.exits.send(Exit {
            sandbox_id: sandbox_id.to_string(),
            exit_code: exit_code.to_string(),
        });
    }

    /// Sets the container's state, for the one named.
    fn set(&self, sandbox_id: &str, running: bool, paused: bool) -> Result<(), runtime::Error> {
        match lock(&self.state).containers.get_mut(sandbox_id) {
            Some(c) => {
                c.running = running;
                c.paused = paused;
                Ok(())
            }
            None => Err(runtime::Error::NotFound(sandbox_id.to_string())),
        }
    }
}

impl Runtime for FakeRuntime {
    async fn create(&self, spec: &ContainerSpec) -> Result<String, runtime::Error> {
        let mut state = lock(&self.state);
        state.made += 1;
        let container_id = format!("c-{}", state.made);
        state.containers.insert(
            spec.sandbox_id.clone(),
            ContainerStatus {
                sandbox_id: spec.sandbox_id.clone(),
                container_id: container_id.clone(),
                running: true,
                paused: false,
            },
        );
        if spec.workspace_tmpfs_bytes == 0 && spec.workspace_mount.is_none() {
            state.volumes.insert(spec.sandbox_id.clone());
        }
        Ok(container_id)
    }

    async fn remove(&self, sandbox_id: &str) -> Result<(), runtime::Error> {
        let mut state = lock(&self.state);
        state.containers.remove(sandbox_id);
        state.volumes.remove(sandbox_id);
        Ok(())
    }

    async fn remove_orphan(&self, orphan: &ContainerStatus) -> Result<(), runtime::Error> {
        lock(&self.state).containers.remove(&orphan.sandbox_id);
        Ok(())
    }

    async fn pause(&self, sandbox_id: &str) -> Result<(), runtime::Error> {
        self.set(sandbox_id, true, true)
    }

    async fn resume(&self, sandbox_id: &str) -> Result<(), runtime::Error> {
        self.set(sandbox_id, true, false)
    }

    async fn restart(&self, sandbox_id: &str) -> Result<(), runtime::Error> {
        self.set(sandbox_id, true, false)
    }

    async fn status(&self, sandbox_id: &str) -> Result<Option<ContainerStatus>, runtime::Error> {
        Ok(lock(&self.state).containers.get(sandbox_id).cloned())
    }

    async fn list(&self) -> Result<Vec<ContainerStatus>, runtime::Error> {
        Ok(lock(&self.state).containers.values().cloned().collect())
    }

    async fn logs(&self, _sandbox_id: &str) -> String {
        String::new()
    }

    async fn volumes(&self) -> Result<Vec<String>, runtime::Error> {
        Ok(lock(&self.state).volumes.iter().cloned().collect())
    }

    fn exits(&self) -> impl futures::Stream<Item = Exit> + Send + 'static {
        futures::stream::unfold(self.exits.subscribe(), |mut exits| async move {
            loop {
                match exits.recv().await {
                    Ok(exit) => return Some((exit, exits)),
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn submitted() -> Event {
        Event::Submitted {
            owner: "a".into(),
            idempotency_key: "k".into(),
            job: Box::new(crate::runs::events::tests_support::job(1)),
            by: Default::default(),
        }
    }

    async fn submit(s: &MemEvents, run_id: &str, key: &str) -> Submission {
        s.submit(NewRun {
            run_id,
            owner: "a",
            idempotency_key: key,
            first: &submitted(),
            labels: &BTreeMap::new(),
            sealed_secrets: Some(b"sealed"),
            now: 1,
        })
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn the_memory_store_numbers_appends_like_the_sql_one_and_crashes_where_told() {
        let s = MemEvents::new();
        assert_eq!(
            submit(&s, "r1", "k1").await,
            Submission::Created("r1".into())
        );
        assert_eq!(
            submit(&s, "r2", "k1").await,
            Submission::Existing("r1".into())
        );
        let p = Event::Provisioning;
        s.append("r1", 2, &p, RunState::Provisioning, 2)
            .await
            .unwrap();
        // A second writer of a number, one that skips one, and a stranger.
        for (run, seq) in [("r1", 2), ("r1", 4), ("nope", 1)] {
            assert!(matches!(
                s.append(run, seq, &p, RunState::Provisioning, 3).await,
                Err(store::Error::Conflict { .. })
            ));
        }
        assert_eq!(s.unfinished().await.unwrap(), ["r1"]);
        assert_eq!(
            s.sealed_secrets("r1").await.unwrap().as_deref(),
            Some(&b"sealed"[..])
        );

        // Written, and reported failed: a crash just after the append.
        s.crash_after(1, CrashPoint::AfterWrite);
        assert!(s
            .append("r1", 3, &p, RunState::Provisioning, 4)
            .await
            .is_err());
        assert!(s
            .append("r1", 4, &p, RunState::Provisioning, 4)
            .await
            .is_err());
        assert_eq!(s.log("r1").len(), 3);
        // Not written: a crash just before it.
        s.recover();
        s.crash_after(0, CrashPoint::BeforeWrite);
        assert!(s
            .append("r1", 4, &p, RunState::Provisioning, 5)
            .await
            .is_err());
        assert_eq!(s.log("r1").len(), 3);
        s.recover();
        let done = Event::Finished {
            state: RunState::Succeeded,
            reason: String::new(),
        };
        s.append("r1", 4, &done, RunState::Succeeded, 6)
            .await
            .unwrap();
        assert!(s.unfinished().await.unwrap().is_empty());
        let seqs: Vec<u64> = s
            .events("r1", 2)
            .await
            .unwrap()
            .iter()
            .map(|e| e.seq)
            .collect();
        assert_eq!(seqs, [2, 3, 4]);
    }

    #[tokio::test]
    async fn a_fake_agent_runs_an_exec_id_once_and_forgets_it_when_it_restarts() {
        let host = FakeHost::new();
        host.script(
            "echo hi",
            Script {
                output: vec![(Stream::Stdout, b"hi\n".to_vec())],
                ..Script::default()
            },
        );
        let sb = host.add_run_sandbox("a", "r1");
        let agent = host.agent_of(&sb);
        let spec = ExecSpec {
            exec_id: "x1".into(),
            command: Command::Shell("echo hi".into()),
            env: BTreeMap::new(),
            cwd: String::new(),
            timeout_ms: 0,
        };
        let first: Vec<_> = agent
            .start_exec(spec.clone())
            .await
            .unwrap()
            .collect()
            .await;
        let again: Vec<_> = agent.start_exec(spec).await.unwrap().collect().await;
        assert_eq!(host.starts("echo hi"), 1);
        assert_eq!(first.len(), 3, "{first:?}");
        assert_eq!(
            again[0],
            Ok(ExecEvent::Started {
                pid: 100,
                attached: true
            })
        );
        // From an offset inside the output: the rest of it, then the end.
        let tail: Vec<_> = agent.attach_exec("x1", 1).await.unwrap().collect().await;
        assert_eq!(
            tail[1],
            Ok(ExecEvent::Output {
                stream: Stream::Stdout,
                offset: 1,
                data: Bytes::from_static(b"i\n")
            })
        );
        let boot = agent.boot_id().await.unwrap();
        host.restart_agent(&sb);
        assert_ne!(agent.boot_id().await.unwrap(), boot);
        assert!(matches!(
            agent.attach_exec("x1", 0).await,
            Err(AgentError::NotFound(_))
        ));
        host.remove_sandbox(&sb);
        assert!(matches!(
            agent.boot_id().await,
            Err(AgentError::Unreachable(_))
        ));
    }

    #[tokio::test]
    async fn the_fake_runtime_keeps_containers_and_tells_their_exits() {
        let rt = FakeRuntime::new();
        let mut exits = Box::pin(rt.exits());
        let spec = ContainerSpec {
            sandbox_id: "sb-1".into(),
            image: "bridle/test".into(),
            user: "1000:1000".into(),
            memory_bytes: 0,
            cpu_millis: 0,
            pids: 0,
            tmp_bytes: 0,
            workspace_tmpfs_bytes: 0,
            workspace_mount: None,
            network: crate::sandboxes::Network::None,
            socket_dir: std::path::PathBuf::from("/nonexistent"),
            agent_key: String::new(),
            inject_agent: None,
            owner_label: "a".into(),
        };
        rt.create(&spec).await.unwrap();
        rt.pause("sb-1").await.unwrap();
        let status = rt.status("sb-1").await.unwrap().unwrap();
        assert!(status.running && status.paused);
        assert!(matches!(
            rt.pause("sb-2").await,
            Err(runtime::Error::NotFound(_))
        ));
        assert_eq!(rt.volumes().await.unwrap(), ["sb-1"]);
        rt.stop("sb-1", "137");
        let exit = exits.next().await.unwrap();
        assert_eq!(
            (exit.sandbox_id.as_str(), exit.exit_code.as_str()),
            ("sb-1", "137")
        );
        rt.remove("sb-1").await.unwrap();
        assert!(rt.list().await.unwrap().is_empty());
        assert!(rt.volumes().await.unwrap().is_empty());
    }
}
