//! The recovery matrix of docs/recovery.md, driven without Docker: runs over
//! the in-memory store and the fake host of `crate::testing`, decided by a
//! real guard (default policies) over SQLite in a tempdir.

use std::collections::BTreeMap;
use std::time::Duration;

use sha2::Digest;
use tokio::sync::watch;

use super::Runner;
use crate::guard::Guard;
use crate::host::{Agent, ExecSpec, Host};
use crate::runs::events::{tests_support, Event, RunState, RunView, Stream, Submitter};
use crate::runs::job::{Command, InputFile, Job};
use crate::runs::sealed::Sealer;
use crate::runs::store::{EventStore, NewRun};
use crate::testing::{CrashPoint, FakeHost, MemEvents, Script};

const OWNER: &str = "alice";
const SECRETS_KEY: [u8; 32] = [7; 32];

/// What a control plane shares across its restarts: the guard's database
/// (policies, approvals, audit log) and its shutdown signal.
struct World {
    _dir: tempfile::TempDir,
    guard: Guard,
    /// A runner whose shutdown sender is gone stops at once.
    _shutdown: watch::Sender<bool>,
    stop: watch::Receiver<bool>,
    harness: std::sync::Arc<crate::harness::Settings>,
}

impl World {
    async fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::store::Store::open(&dir.path().join("bridle.db"))
            .await
            .unwrap();
        let mut key = [0u8; 32];
        getrandom::fill(&mut key).unwrap();
        let audit = crate::audit::AuditLog::open(
            db.pool().clone(),
            ed25519_dalek::SigningKey::from_bytes(&key),
        )
        .await
        .unwrap();
        let guard = Guard {
            policies: crate::policy::Policies::load(db.pool().clone())
                .await
                .unwrap(),
            approvals: crate::approvals::Approvals::new(
                db.pool().clone(),
                audit.clone(),
                Duration::from_secs(60),
                None,
            ),
            audit,
        };
        let (shutdown, stop) = watch::channel(false);
        Self {
            _dir: dir,
            guard,
            _shutdown: shutdown,
            stop,
            harness: Default::default(),
        }
    }

    /// A runner over `store` and `host`, as a (re)started control plane
    /// makes one.
    fn runner(&self, store: &MemEvents, host: &FakeHost) -> Runner<FakeHost, MemEvents> {
        Runner::new(
            store.clone(),
            host.clone(),
            8,
            8,
            Sealer::from_key(&SECRETS_KEY),
            self.guard.clone(),
            self.harness.clone(),
            self.stop.clone(),
        )
    }
}

fn sha(data: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(data))
}

/// A job of shell steps named s0, s1, …
fn shell_job(commands: &[&str]) -> Job {
    let mut job = tests_support::job(commands.len());
    for (step, command) in job.steps.iter_mut().zip(commands) {
        step.command = Command::Shell(command.to_string());
    }
    job
}

/// Submits `job` as run `run_id` of [`OWNER`], with its secrets sealed.
async fn submit(store: &MemEvents, run_id: &str, job: Job, secrets: &BTreeMap<String, String>) {
    let first = Event::Submitted {
        owner: OWNER.into(),
        idempotency_key: run_id.into(),
        job: Box::new(job),
        by: Submitter::default(),
    };
    let sealed =
        (!secrets.is_empty()).then(|| Sealer::from_key(&SECRETS_KEY).seal(run_id, secrets));
    let labels = BTreeMap::new();
    store
        .submit(NewRun {
            run_id,
            owner: OWNER,
            idempotency_key: run_id,
            first: &first,
            labels: &labels,
            sealed_secrets: sealed.as_deref(),
            now: 1,
        })
        .await
        .unwrap();
}

/// Appends `events` to the run's log, as a driver before a crash did.
async fn append(store: &MemEvents, run_id: &str, events: Vec<Event>) {
    let stored = store.events(run_id, 1).await.unwrap();
    let mut view = RunView::fold(stored.iter().map(|e| (e.seq, &e.event))).unwrap();
    for event in events {
        let seq = view.last_seq + 1;
        view = RunView::fold_onto(&view, seq, &event).unwrap();
        store
            .append(run_id, seq, &event, view.state, 2)
            .await
            .unwrap();
    }
}

/// A one-step job (`make`, printing `built`) whose step was recorded as
/// started in a sandbox of its own; answers the sandbox and the exec id.
async fn started_step(
    store: &MemEvents,
    host: &FakeHost,
    run_id: &str,
    job: Job,
) -> (String, String) {
    host.script(
        "make",
        Script {
            output: vec![(Stream::Stdout, b"built\n".to_vec())],
            ..Script::default()
        },
    );
    submit(store, run_id, job, &BTreeMap::new()).await;
    let sandbox = host.add_run_sandbox(OWNER, run_id);
    let boot = host.boot_id(&sandbox).unwrap();
    let exec_id = format!("bridle.run.{run_id}.s0.a1.0123456789abcdef");
    append(
        store,
        run_id,
        vec![
            Event::Provisioning,
            Event::SandboxAssigned {
                sandbox_id: sandbox.clone(),
                agent_boot_id: boot,
            },
            Event::StepStarted {
                step: 0,
                attempt: 1,
                exec_id: exec_id.clone(),
                agent_boot_id: String::new(),
            },
        ],
    )
    .await;
    (sandbox, exec_id)
}

/// What the log recorded of one step's stream, read back from its blobs;
/// checks that each piece follows the one before.
fn recorded_output(store: &MemEvents, run_id: &str, step: u32, stream: Stream) -> Vec<u8> {
    let mut out = Vec::new();
    for event in store.log(run_id) {
        if let Event::StepOutput {
            step: s,
            stream: of,
            offset,
            blob_sha256,
            ..
        } = event
        {
            if s == step && of == stream {
                assert_eq!(
                    offset,
                    out.len() as u64,
                    "output recorded twice, or with a gap"
                );
                out.extend(store.blob_bytes(&blob_sha256).unwrap());
            }
        }
    }
    out
}

fn finished(state: RunState, reason: &str) -> Event {
    Event::Finished {
        state,
        reason: reason.to_string(),
    }
}

#[tokio::test]
async fn a_job_runs_to_success_with_every_event_in_order() {
    let world = World::new().await;
    let (store, host) = (MemEvents::new(), FakeHost::new());
    host.script(
        "make build",
        Script {
            output: vec![
                (Stream::Stdout, b"compiling\n".to_vec()),
                (Stream::Stderr, b"token s3cret\n".to_vec()),
            ],
            ..Script::default()
        },
    );
    host.script(
        "make test",
        Script {
            output: vec![(Stream::Stdout, b"ok\n".to_vec())],
            ..Script::default()
        },
    );
    let mut job = tests_support::job(2);
    job.env = BTreeMap::from([("A".to_string(), "1".to_string())]);
    job.secret_names = vec!["TOKEN".to_string()];
    job.inputs = vec![InputFile {
        path: "in.txt".into(),
        sha256: sha(b"hello"),
        size: 5,
        mode: 0o600,
    }];
    job.steps[0].command = Command::Shell("make build".into());
    job.steps[0].env = BTreeMap::from([("B".to_string(), "2".to_string())]);
    job.steps[1].command = Command::Argv(vec!["make".into(), "test".into()]);
    job.artifacts = vec!["out".into()];
    store.put_blob(&sha(b"hello"), b"hello").await.unwrap();
    let secrets = BTreeMap::from([("TOKEN".to_string(), "s3cret".to_string())]);
    submit(&store, "r-1", job, &secrets).await;

    world.runner(&store, &host).drive("r-1").await.unwrap();

    let log = store.log("r-1");
    assert_eq!(log.len(), 12, "{log:#?}");
    assert!(matches!(&log[0], Event::Submitted { .. }), "{:?}", log[0]);
    assert_eq!(log[1], Event::Provisioning);
    let Event::SandboxAssigned {
        sandbox_id,
        agent_boot_id,
    } = &log[2]
    else {
        panic!("{:?}", log[2]);
    };
    assert_eq!(Some(agent_boot_id.clone()), host.boot_id(sandbox_id));
    let exec_id = |i: usize| match &log[i] {
        Event::StepStarted { exec_id, .. } => exec_id.clone(),
        other => panic!("{other:?}"),
    };
    let (x0, x1) = (exec_id(3), exec_id(7));
    assert!(x0.starts_with("bridle.run.r-1.s0.a1."), "{x0}");
    assert!(x1.starts_with("bridle.run.r-1.s1.a1."), "{x1}");
    let output = |step: u32, stream: Stream, data: &[u8], agent_end: u64| Event::StepOutput {
        step,
        stream,
        offset: 0,
        length: data.len() as u64,
        blob_sha256: sha(data),
        agent_end,
        agent_other_end: agent_end,
    };
    let exited = |step: u32| Event::StepExited {
        step,
        attempt: 1,
        exit_code: Some(0),
        signal: None,
        timed_out: false,
        oom_killed: false,
        spawn_failure: String::new(),
        duration_ms: 1,
    };
    let started = |step: u32, exec_id: &str| Event::StepStarted {
        step,
        attempt: 1,
        exec_id: exec_id.to_string(),
        agent_boot_id: String::new(),
    };
    let expected = [
        started(0, &x0),
        output(0, Stream::Stdout, b"compiling\n", 10),
        // The secret's value never reaches the log.
        output(0, Stream::Stderr, b"token ***\n", 23),
        exited(0),
        started(1, &x1),
        output(1, Stream::Stdout, b"ok\n", 3),
        exited(1),
    ];
    assert_eq!(log[3..10], expected);
    assert!(
        matches!(&log[10], Event::ArtifactCollected { path, .. } if path == "out"),
        "{:?}",
        log[10]
    );
    assert_eq!(log[11], finished(RunState::Succeeded, ""));
    assert!(store.blob_bytes(&sha(b"token ***\n")).is_some());

    // Each step ran once, with the job's env, the secrets and its own env.
    assert_eq!(
        (host.starts("make build"), host.starts("make test")),
        (1, 1)
    );
    let spec = host.exec(sandbox_id, &x0).unwrap();
    let env = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    assert_eq!(
        spec.env,
        env(&[("A", "1"), ("B", "2"), ("TOKEN", "s3cret")])
    );
    assert_eq!(
        host.exec(sandbox_id, &x1).unwrap().env,
        env(&[("A", "1"), ("TOKEN", "s3cret")])
    );
    assert_eq!(
        host.file(sandbox_id, "in.txt"),
        Some((b"hello".to_vec(), 0o600))
    );
    // What the run leaves is released: its sandbox and its sealed secrets.
    assert!(host.sandbox_ids().is_empty());
    assert_eq!(store.sealed_secrets("r-1").await.unwrap(), None);
}

/// The crash fell between recording `step_started` and asking the agent:
/// the same agent (same boot id) does not know the exec, so the step never
/// started, and it is started now, once, under the recorded exec id.
#[tokio::test]
async fn a_started_step_the_same_agent_never_heard_of_is_started_once() {
    let world = World::new().await;
    let (store, host) = (MemEvents::new(), FakeHost::new());
    let (sandbox, exec_id) = started_step(&store, &host, "r-2", shell_job(&["make"])).await;

    world.runner(&store, &host).drive("r-2").await.unwrap();

    assert_eq!(host.starts("make"), 1);
    assert!(
        host.exec(&sandbox, &exec_id).is_some(),
        "not started under the recorded exec id"
    );
    let log = store.log("r-2");
    let starts = log
        .iter()
        .filter(|e| matches!(e, Event::StepStarted { .. }))
        .count();
    assert_eq!(starts, 1, "{log:#?}");
    assert_eq!(log.last(), Some(&finished(RunState::Succeeded, "")));
    assert_eq!(
        recorded_output(&store, "r-2", 0, Stream::Stdout),
        b"built\n"
    );
}

/// The agent restarted since the step started: whether the step ran is
/// unknown, and a step not marked idempotent is not run again.
#[tokio::test]
async fn a_restarted_agent_interrupts_a_step_not_marked_idempotent() {
    let world = World::new().await;
    let (store, host) = (MemEvents::new(), FakeHost::new());
    let (sandbox, exec_id) = started_step(&store, &host, "r-3", shell_job(&["make"])).await;
    host.restart_agent(&sandbox);

    world.runner(&store, &host).drive("r-3").await.unwrap();

    assert_eq!(host.starts("make"), 0);
    let reason = format!(
        "step 1 (s0) may or may not have run to completion: the sandbox's agent restarted and no longer knows exec {exec_id}; it is not marked idempotent, so it is not run again"
    );
    assert_eq!(
        store.log("r-3").last(),
        Some(&finished(RunState::Interrupted, &reason))
    );
    assert!(host.sandbox_ids().is_empty());
}

/// The same, for a step marked idempotent (with a retry to spend): it runs
/// again as a new attempt, whose `step_started` names the new boot id.
#[tokio::test]
async fn a_restarted_agent_runs_an_idempotent_step_again_as_a_new_attempt() {
    let world = World::new().await;
    let (store, host) = (MemEvents::new(), FakeHost::new());
    let mut job = shell_job(&["make"]);
    job.steps[0].idempotent = true;
    job.steps[0].retries = 1;
    let (sandbox, exec_id) = started_step(&store, &host, "r-4", job).await;
    host.restart_agent(&sandbox);
    let new_boot = host.boot_id(&sandbox).unwrap();

    let runner = world.runner(&store, &host);
    runner.drive("r-4").await.unwrap();

    assert_eq!(host.starts("make"), 1);
    let log = store.log("r-4");
    let started: Vec<(u32, String, String)> = log
        .iter()
        .filter_map(|e| match e {
            Event::StepStarted {
                attempt,
                exec_id,
                agent_boot_id,
                ..
            } => Some((*attempt, exec_id.clone(), agent_boot_id.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(started.len(), 2, "{log:#?}");
    assert_eq!(started[0], (1, exec_id.clone(), String::new()));
    assert_eq!(started[1].0, 2);
    assert_ne!(started[1].1, exec_id);
    assert_eq!(started[1].2, new_boot);
    assert_eq!(log.last(), Some(&finished(RunState::Succeeded, "")));
    let view = runner.view("r-4").await.unwrap();
    assert_eq!(view.steps[0].attempts, 2);
    assert_eq!(view.agent_boot_id, new_boot);
}

/// The sandbox of a started step is gone: the step is in the ambiguous
/// window, and the run ends `interrupted` saying so.
#[tokio::test]
async fn a_started_step_whose_sandbox_is_gone_ends_the_run_interrupted() {
    let world = World::new().await;
    let (store, host) = (MemEvents::new(), FakeHost::new());
    let (sandbox, _) = started_step(&store, &host, "r-5", shell_job(&["make"])).await;
    host.remove_sandbox(&sandbox);

    world.runner(&store, &host).drive("r-5").await.unwrap();

    assert_eq!(host.starts("make"), 0);
    let log = store.log("r-5");
    let Some(Event::Finished { state, reason }) = log.last() else {
        panic!("{log:#?}");
    };
    assert_eq!(*state, RunState::Interrupted);
    assert!(
        reason.starts_with(
            "step 1 (s0) may or may not have run to completion: the sandbox is unreachable: "
        ),
        "{reason}"
    );
}

/// An attached stream that says nothing for longer than the agent's
/// keepalive period is dead: the step is attached to again, not started
/// again.
#[tokio::test]
async fn a_silent_attach_is_replaced_by_a_new_one_and_the_step_is_not_started_again() {
    let world = World::new().await;
    let (store, host) = (MemEvents::new(), FakeHost::new());
    let (sandbox, exec_id) = started_step(&store, &host, "r-6", shell_job(&["make"])).await;
    // The step started, and ran, before the control plane went down.
    let _ = host
        .agent_of(&sandbox)
        .start_exec(ExecSpec {
            exec_id: exec_id.clone(),
            command: Command::Shell("make".into()),
            env: BTreeMap::new(),
            cwd: String::new(),
            timeout_ms: 0,
        })
        .await
        .unwrap();
    host.silence_next_attaches(1);
    let runner = world.runner(&store, &host);

    // The silence lasts the executor's 40 s, on a paused clock (the guard's
    // database is not used after this).
    tokio::time::pause();
    runner.drive("r-6").await.unwrap();

    assert_eq!(host.attaches(), 2);
    assert_eq!(host.starts("make"), 1);
    let log = store.log("r-6");
    assert_eq!(log.last(), Some(&finished(RunState::Succeeded, "")));
    assert_eq!(
        recorded_output(&store, "r-6", 0, Stream::Stdout),
        b"built\n"
    );
}

/// A cancel while the run waits for a person to approve its step ends the
/// run `cancelled`, and the step never starts.
#[tokio::test]
async fn a_cancel_during_an_approval_wait_ends_the_run_cancelled() {
    let world = World::new().await;
    let (store, host) = (MemEvents::new(), FakeHost::new());
    // The default policies hold a `git push` for approval.
    submit(
        &store,
        "r-7",
        shell_job(&["git push origin main"]),
        &BTreeMap::new(),
    )
    .await;
    let runner = world.runner(&store, &host);
    let driver = tokio::spawn({
        let runner = runner.clone();
        async move { runner.drive("r-7").await }
    });
    let mut waited = 0;
    while !store
        .log("r-7")
        .iter()
        .any(|e| matches!(e, Event::ApprovalRequested { .. }))
    {
        assert!(
            waited < 1000,
            "no approval was asked for: {:#?}",
            store.log("r-7")
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
        waited += 1;
    }

    let view = runner.cancel("r-7", "alice", "not today").await.unwrap();

    assert_eq!(view.state, RunState::Cancelled);
    driver.await.unwrap().unwrap();
    assert_eq!(host.starts("git push origin main"), 0);
    let log = store.log("r-7");
    assert!(
        matches!(
            &log[..],
            [
                Event::Submitted { .. },
                Event::Provisioning,
                Event::SandboxAssigned { .. },
                Event::ApprovalRequested { step: Some(0), .. },
                Event::CancelRequested { .. },
                Event::Finished {
                    state: RunState::Cancelled,
                    ..
                },
            ]
        ),
        "{log:#?}"
    );
    assert!(host.sandbox_ids().is_empty());
}

/// A job with everything that gets recorded: an input, a secret (whose
/// value the output splits across two chunks), two steps with output on
/// both streams, an artifact.
async fn everything_job(store: &MemEvents, host: &FakeHost, run_id: &str) {
    host.script(
        "build",
        Script {
            output: vec![
                (Stream::Stdout, b"token s3".to_vec()),
                (Stream::Stdout, b"cret done\n".to_vec()),
                (Stream::Stderr, b"warn\n".to_vec()),
            ],
            ..Script::default()
        },
    );
    host.script(
        "check",
        Script {
            output: vec![(Stream::Stdout, b"ok\n".to_vec())],
            ..Script::default()
        },
    );
    let mut job = shell_job(&["build", "check"]);
    job.secret_names = vec!["TOKEN".to_string()];
    job.inputs = vec![InputFile {
        path: "in.txt".into(),
        sha256: sha(b"hello"),
        size: 5,
        mode: 0o644,
    }];
    job.artifacts = vec!["out".into()];
    store.put_blob(&sha(b"hello"), b"hello").await.unwrap();
    let secrets = BTreeMap::from([("TOKEN".to_string(), "s3cret".to_string())]);
    submit(store, run_id, job, &secrets).await;
}

/// The log without what differs from one drive to another (exec, sandbox
/// and snapshot ids).
fn shape(log: &[Event]) -> Vec<String> {
    log.iter()
        .map(|e| match e {
            Event::Submitted { .. } => "submitted".to_string(),
            Event::Provisioning => "provisioning".to_string(),
            Event::SandboxAssigned { .. } => "sandbox_assigned".to_string(),
            Event::StepStarted {
                step,
                attempt,
                agent_boot_id,
                ..
            } => format!("step_started {step}/{attempt} {agent_boot_id}"),
            Event::StepOutput {
                step,
                stream,
                offset,
                length,
                ..
            } => format!("step_output {step} {stream:?} {offset}+{length}"),
            Event::StepExited {
                step,
                attempt,
                exit_code,
                ..
            } => format!("step_exited {step}/{attempt} {exit_code:?}"),
            Event::ArtifactCollected { path, .. } => format!("artifact_collected {path}"),
            Event::Finished { state, reason } => format!("finished {state:?} {reason}"),
            other => format!("{other:?}"),
        })
        .collect()
}

/// A crash between any two events of a run: the store stops taking appends
/// just before the k-th is written, or just after (the driver dies before
/// acting on it). A restarted control plane (a new runner over the same
/// store and sandboxes, releasing finished runs' sandboxes first) drives
/// the run on: every step's command has run exactly once, the run ends as
/// it does without a crash, with the same events and output, and its log
/// folds.
#[tokio::test]
async fn a_crash_between_any_two_events_repeats_no_step_and_changes_no_outcome() {
    let world = World::new().await;
    let (store, host) = (MemEvents::new(), FakeHost::new());
    everything_job(&store, &host, "r-base").await;
    world.runner(&store, &host).drive("r-base").await.unwrap();
    let baseline = shape(&store.log("r-base"));
    assert_eq!(
        baseline.last().map(String::as_str),
        Some("finished Succeeded "),
        "{baseline:#?}"
    );
    // Every event but `submitted` is an append.
    let appends = baseline.len() as u64 - 1;
    let crashes = (0..appends)
        .map(|k| (k, CrashPoint::BeforeWrite))
        .chain((1..=appends).map(|k| (k, CrashPoint::AfterWrite)));
    for (k, point) in crashes {
        let case = format!("crash {point:?} after {k} appends");
        let run_id = format!("r-{k}-{point:?}");
        let (store, host) = (MemEvents::new(), FakeHost::new());
        everything_job(&store, &host, &run_id).await;
        store.crash_after(k, point);
        let crashed = world.runner(&store, &host).drive(&run_id).await;
        assert!(
            crashed.is_err(),
            "{case}: the driver went on without its store"
        );

        store.recover();
        let restarted = world.runner(&store, &host);
        restarted.release_leftover_sandboxes().await;
        restarted.drive(&run_id).await.unwrap();

        assert_eq!(shape(&store.log(&run_id)), baseline, "{case}");
        restarted.view(&run_id).await.unwrap();
        assert_eq!(
            (host.starts("build"), host.starts("check")),
            (1, 1),
            "{case}: a step ran twice, or never"
        );
        assert_eq!(host.sandboxes_created(), 1, "{case}");
        assert!(
            host.sandbox_ids().is_empty(),
            "{case}: the run's sandbox was left"
        );
        assert_eq!(
            recorded_output(&store, &run_id, 0, Stream::Stdout),
            b"token *** done\n",
            "{case}"
        );
        assert_eq!(
            recorded_output(&store, &run_id, 0, Stream::Stderr),
            b"warn\n",
            "{case}"
        );
        assert_eq!(
            recorded_output(&store, &run_id, 1, Stream::Stdout),
            b"ok\n",
            "{case}"
        );
    }
}

// ------------------------------------------------------------- sessions

mod sessions {
    use std::sync::Arc;

    use bridle_scripted_model::{Conversation, ScriptedCall, Server, Turn};
    use serde_json::json;

    use super::*;
    use crate::config::{ModelConfig, ProviderKind};
    use crate::harness::task::AgentTask;
    use crate::harness::tools::builtin::Builtin;
    use crate::runs::executor::SendInput;
    use crate::testing::Script as ExecScript;

    /// The scripted conversation every session test plays: the model runs
    /// `make test` with the shell tool, writes a file, and answers; after a
    /// second message it answers once more.
    fn script() -> bridle_scripted_model::Script {
        let call = |id: &str, name: &str, arguments: serde_json::Value| ScriptedCall {
            id: id.into(),
            name: name.into(),
            arguments,
            raw_arguments: None,
        };
        bridle_scripted_model::Script {
            conversations: vec![Conversation {
                name: "fix".into(),
                first_user_contains: "fix the build".into(),
                turn_by_last_call: false,
                turns: vec![
                    Turn {
                        text: "Let me look.".into(),
                        tool_calls: vec![call("c1", "shell", json!({"command": "make test"}))],
                        ..Turn::default()
                    },
                    Turn {
                        tool_calls: vec![
                            call(
                                "c2",
                                "write_file",
                                json!({"path": "notes.txt", "content": "fixed\n"}),
                            ),
                            call("c3", "read_file", json!({"path": "notes.txt"})),
                        ],
                        ..Turn::default()
                    },
                    Turn {
                        text: "The build is fixed.".into(),
                        ..Turn::default()
                    },
                    Turn {
                        text: "You are welcome.".into(),
                        ..Turn::default()
                    },
                ],
            }],
            api_key: None,
        }
    }

    fn settings(server: &Server) -> Arc<crate::harness::Settings> {
        settings_with_window(server, 100_000)
    }

    fn settings_with_window(server: &Server, context_window: u64) -> Arc<crate::harness::Settings> {
        let config = ModelConfig {
            name: "scripted".into(),
            provider: ProviderKind::OpenAi,
            base_url: format!("{}/v1", server.base_url()),
            model: "scripted-1".into(),
            api_key_env: None,
            api_key_file: None,
            context_window,
            max_output_tokens: 200,
            price_input_per_mtok: Some(1.0),
            price_output_per_mtok: Some(2.0),
            request_timeout_secs: 60,
            max_retries: 3,
            retry_min_delay_ms: 10,
            api_key: None,
        };
        Arc::new(crate::harness::Settings::with_models(&[config]).unwrap())
    }

    fn runner(
        world: &World,
        store: &MemEvents,
        host: &FakeHost,
        harness: &Arc<crate::harness::Settings>,
    ) -> Runner<FakeHost, MemEvents> {
        Runner::new(
            store.clone(),
            host.clone(),
            8,
            8,
            Sealer::from_key(&SECRETS_KEY),
            world.guard.clone(),
            harness.clone(),
            world.stop.clone(),
        )
    }

    /// Submits the session and scripts its command.
    async fn submit_session(store: &MemEvents, host: &FakeHost, run_id: &str) {
        host.script(
            "make test",
            ExecScript {
                output: vec![(Stream::Stdout, b"2 passed\n".to_vec())],
                ..ExecScript::default()
            },
        );
        let goal = "Please fix the build.";
        store
            .put_blob(&sha(goal.as_bytes()), goal.as_bytes())
            .await
            .unwrap();
        let mut job = tests_support::job(0);
        job.agent = Some(AgentTask {
            instructions: "You fix builds.".into(),
            model: "scripted".into(),
            tools: Builtin::ALL.to_vec(),
            client_tools: vec![],
            budgets: Default::default(),
            loop_threshold: 3,
            first_message_sha256: sha(goal.as_bytes()),
        });
        let first = Event::Submitted {
            owner: OWNER.into(),
            idempotency_key: run_id.into(),
            job: Box::new(job),
            by: Submitter::default(),
        };
        // Now: wall time counts from the submission.
        store
            .submit(NewRun {
                run_id,
                owner: OWNER,
                idempotency_key: run_id,
                first: &first,
                labels: &BTreeMap::new(),
                sealed_secrets: None,
                now: crate::clock::now_ms(),
            })
            .await
            .unwrap();
    }

    fn kinds(log: &[Event]) -> Vec<String> {
        log.iter()
            .map(|e| {
                let json = serde_json::to_value(e).unwrap();
                match json {
                    serde_json::Value::String(s) => s,
                    serde_json::Value::Object(m) => m.keys().next().unwrap().clone(),
                    other => other.to_string(),
                }
            })
            .collect()
    }

    #[tokio::test]
    async fn a_session_runs_its_tools_once_goes_idle_and_answers_the_next_message() {
        let world = World::new().await;
        let server = Server::start(script()).await.unwrap();
        let harness = settings(&server);
        let (store, host) = (MemEvents::new(), FakeHost::new());
        submit_session(&store, &host, "s1").await;
        let runner = runner(&world, &store, &host, &harness);
        runner.drive("s1").await.unwrap();
        let view = runner.view("s1").await.unwrap();
        assert_eq!(view.state, RunState::Idle, "{:?}", view.reason);
        let s = view.session.clone().unwrap();
        assert_eq!((s.responses, s.requests, s.resent), (3, 3, 0));
        assert_eq!(s.tool_calls, 3);
        assert!(s.turn_finished);
        assert!(s.cost_nano_usd > 0, "the model has prices");
        assert_eq!(host.starts("make test"), 1);
        let sandbox = view.sandbox_id.clone().unwrap();
        assert_eq!(
            host.file(&sandbox, "notes.txt").map(|(d, _)| d),
            Some(b"fixed\n".to_vec())
        );
        let log = store.log("s1");
        let results: Vec<String> = log
            .iter()
            .filter_map(|e| match e {
                Event::ToolResult { content_sha256, .. } => {
                    Some(String::from_utf8(store.blob_bytes(content_sha256).unwrap()).unwrap())
                }
                _ => None,
            })
            .collect();
        assert_eq!(
            results,
            [
                "exit code 0\n2 passed\n",
                "wrote 6 bytes to notes.txt",
                "fixed\n"
            ]
        );
        assert_eq!(server.requests("fix"), vec![1, 1, 1, 0]);

        // A message sent twice is added once, and the session answers it.
        let sent = runner
            .send("s1", "m2", SendInput::Message("Thanks!".into()), true)
            .await
            .unwrap();
        assert_eq!(sent.state, RunState::Running);
        let again = runner
            .send("s1", "m2", SendInput::Message("Thanks!".into()), true)
            .await
            .unwrap();
        assert_eq!(again.session.unwrap().user_messages, 2);
        // The send scheduled the session: its driver answers and closes it.
        let view = tokio::time::timeout(Duration::from_secs(60), async {
            loop {
                let view = runner.view("s1").await.unwrap();
                if view.state.is_finished() {
                    return view;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("the session ends within a minute");
        assert_eq!(view.state, RunState::Succeeded, "closed after its answer");
        assert_eq!(server.requests("fix"), vec![1, 1, 1, 1]);
        // The request carried the whole conversation, results paired.
        let (_, last) = server.received().pop().unwrap();
        let roles: Vec<&str> = last["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["role"].as_str().unwrap())
            .collect();
        assert_eq!(
            roles,
            [
                "system",
                "user",
                "assistant",
                "tool",
                "assistant",
                "tool",
                "tool",
                "assistant",
                "user"
            ]
        );
    }

    /// Kill the control plane at every append of a session (before the
    /// write, and after it before it is acted on), restart it: no tool runs
    /// twice, no answer on the log is asked for again, and the one request
    /// whose answer was lost is counted as resent.
    #[tokio::test]
    async fn a_crash_at_any_append_repeats_no_tool_and_no_recorded_answer() {
        let world = World::new().await;
        let base_server = Server::start(script()).await.unwrap();
        let (store, host) = (MemEvents::new(), FakeHost::new());
        submit_session(&store, &host, "base").await;
        runner(&world, &store, &host, &settings(&base_server))
            .drive("base")
            .await
            .unwrap();
        let baseline = kinds(&store.log("base"));
        let appends = baseline.len() as u64 - 1;
        let crashes = (0..appends)
            .map(|k| (k, CrashPoint::BeforeWrite))
            .chain((1..=appends).map(|k| (k, CrashPoint::AfterWrite)));
        for (k, point) in crashes {
            let case = format!("crash {point:?} after {k} appends");
            let server = Server::start(script()).await.unwrap();
            let harness = settings(&server);
            let (store, host) = (MemEvents::new(), FakeHost::new());
            submit_session(&store, &host, "s").await;
            store.crash_after(k, point);
            let crashed = runner(&world, &store, &host, &harness).drive("s").await;
            assert!(crashed.is_err(), "{case}: went on without its store");
            store.recover();
            let restarted = runner(&world, &store, &host, &harness);
            restarted.drive("s").await.unwrap();
            let view = restarted.view("s").await.unwrap();
            assert_eq!(view.state, RunState::Idle, "{case}: {}", view.reason);
            assert_eq!(host.starts("make test"), 1, "{case}: the tool ran twice");
            let s = view.session.unwrap();
            assert_eq!(s.responses, 3, "{case}");
            assert!(s.resent <= 1, "{case}: {} resent", s.resent);
            // Each request that went out was recorded first; a turn is asked
            // for again only when its answer never reached the log.
            let log = store.log("s");
            for (turn, sent) in server.requests("fix").into_iter().enumerate() {
                let recorded = log
                    .iter()
                    .filter(|e| matches!(e, Event::ModelRequested { turn: t, .. } if *t as usize == turn + 1))
                    .count() as u32;
                assert!(
                    sent <= recorded,
                    "{case}: turn {turn} was asked for {sent} times, recorded {recorded}"
                );
                assert!(sent <= 2, "{case}: turn {turn} asked for {sent} times");
            }
            let sandbox = view.sandbox_id.unwrap();
            assert_eq!(
                host.file(&sandbox, "notes.txt").map(|(d, _)| d),
                Some(b"fixed\n".to_vec()),
                "{case}"
            );
            // A request sent again is byte for byte the one sent before the
            // crash: the conversation rebuilt from the log is what the model
            // saw.
            let mut by_turn: BTreeMap<usize, Vec<String>> = BTreeMap::new();
            for (_, body) in server.received() {
                let answers = body["messages"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|m| m["role"] == "assistant")
                    .count();
                by_turn.entry(answers).or_default().push(body.to_string());
            }
            for (turn, bodies) in by_turn {
                assert!(
                    bodies.windows(2).all(|w| w[0] == w[1]),
                    "{case}: turn {turn} was sent again differently"
                );
            }
        }
    }

    /// A 200-turn session in a 4,000-token window: the conversation is
    /// compacted (tool outputs cut, older turns summarised by a model
    /// call) each time it nears the window, no request exceeds the window,
    /// and the session still finishes. The log, replayed, rebuilds it.
    #[tokio::test]
    async fn compaction_keeps_a_200_turn_session_within_its_window() {
        const TURNS: usize = 200;
        const WINDOW: u64 = 4_000;
        let world = World::new().await;
        let goal = "Please count in the build.";
        let mut turns: Vec<Turn> = (0..TURNS)
            .map(|i| Turn {
                tool_calls: vec![ScriptedCall {
                    id: format!("n{i}"),
                    name: "shell".into(),
                    arguments: json!({"command": format!("seq {i}")}),
                    raw_arguments: None,
                }],
                ..Turn::default()
            })
            .collect();
        turns.push(Turn {
            text: "Counted to 200.".into(),
            ..Turn::default()
        });
        let server = Server::start(bridle_scripted_model::Script {
            conversations: vec![
                // Summary requests first: they quote the goal too.
                Conversation {
                    name: "summaries".into(),
                    first_user_contains: crate::runs::executor::session::SUMMARY_MARKER.into(),
                    turn_by_last_call: false,
                    turns: vec![Turn {
                        text: "The agent has been counting with seq; it goes on.".into(),
                        ..Turn::default()
                    }],
                },
                Conversation {
                    name: "count".into(),
                    first_user_contains: "count in the build".into(),
                    turn_by_last_call: true,
                    turns,
                },
            ],
            api_key: None,
        })
        .await
        .unwrap();
        let harness = settings_with_window(&server, WINDOW);
        let (store, host) = (MemEvents::new(), FakeHost::new());
        // Each command prints a few hundred bytes.
        for i in 0..TURNS {
            host.script(
                &format!("seq {i}"),
                ExecScript {
                    output: vec![(Stream::Stdout, format!("{i} ").repeat(40).into_bytes())],
                    ..ExecScript::default()
                },
            );
        }
        store
            .put_blob(&sha(goal.as_bytes()), goal.as_bytes())
            .await
            .unwrap();
        let mut job = tests_support::job(0);
        job.agent = Some(AgentTask {
            instructions: "You count.".into(),
            model: "scripted".into(),
            tools: vec![Builtin::Shell],
            client_tools: vec![],
            budgets: crate::harness::limits::Budgets {
                max_iterations: 500,
                max_tool_calls: 500,
                max_input_tokens: 100_000_000,
                ..Default::default()
            },
            loop_threshold: 3,
            first_message_sha256: sha(goal.as_bytes()),
        });
        let first = Event::Submitted {
            owner: OWNER.into(),
            idempotency_key: "c".into(),
            job: Box::new(job),
            by: Submitter::default(),
        };
        store
            .submit(NewRun {
                run_id: "c",
                owner: OWNER,
                idempotency_key: "c",
                first: &first,
                labels: &BTreeMap::new(),
                sealed_secrets: None,
                now: crate::clock::now_ms(),
            })
            .await
            .unwrap();
        let first_driver = runner(&world, &store, &host, &harness);
        first_driver.drive("c").await.unwrap();
        let view = first_driver.view("c").await.unwrap();
        assert_eq!(view.state, RunState::Idle, "{}", view.reason);
        let s = view.session.unwrap();
        assert_eq!(s.responses as usize, TURNS + 1);
        let log = store.log("c");
        let compactions = log
            .iter()
            .filter(|e| matches!(e, Event::ContextCompacted { .. }))
            .count();
        assert!(compactions >= 2, "{compactions} compactions");
        let summaries: u32 = server.requests("summaries").iter().sum();
        assert!(summaries >= 1, "older turns were never summarised");
        for e in &log {
            if let Event::ModelResponded { usage, .. } = e {
                assert!(
                    usage.input_tokens + 200 <= WINDOW,
                    "a request of {} tokens in a window of {WINDOW}",
                    usage.input_tokens
                );
            }
        }
        // Every command ran once, in order.
        for i in 0..TURNS {
            assert_eq!(host.starts(&format!("seq {i}")), 1, "seq {i}");
        }
        // A driver started again on the finished log replays it whole and
        // has nothing left to do.
        let again = runner(&world, &store, &host, &harness);
        again.drive("c").await.unwrap();
        assert_eq!(store.log("c").len(), log.len());
    }
}
