//! What hostile code in a sandbox, a run's owner and a dying client must not
//! be able to do (docs/security.md): each test does it as an attacker would,
//! against the real control plane, agent and Docker.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::sync::Arc;
use std::time::Duration;

use bridle_proto::control::v1 as pb;
use bridle_proto::sandbox::v1 as agent_pb;
use bridle_tests::client::{self, shell};
use bridle_tests::control::{self, create, exec, ControlPlane, Sandboxes};
use bridle_tests::docker::{require_docker, Sandbox, SandboxOptions};
use bridle_tests::{bounded, PATIENCE};
use tonic::Code;

macro_rules! needs_docker {
    () => {
        require_docker(module_path!())
    };
}

/// The probe that tries to drive an agent from inside a sandbox.
fn probe() -> bytes::Bytes {
    let path = bridle_tests::workspace_binary("bridle-tests", "agent-probe").unwrap();
    std::fs::read(path).unwrap().into()
}

fn upload_messages(
    sandbox_id: &str,
    file: agent_pb::WriteFileHeader,
    data: &bytes::Bytes,
) -> Vec<pb::WriteFileRequest> {
    let mut msgs = vec![pb::WriteFileRequest {
        request: Some(pb::write_file_request::Request::Header(
            pb::WriteFileHeader {
                sandbox_id: sandbox_id.into(),
                file: Some(file),
            },
        )),
    }];
    msgs.extend(data.chunks(1 << 20).map(|d| pb::WriteFileRequest {
        request: Some(pb::write_file_request::Request::Data(
            bytes::Bytes::copy_from_slice(d),
        )),
    }));
    msgs
}

async fn upload(
    c: &mut Sandboxes,
    sandbox_id: &str,
    file: agent_pb::WriteFileHeader,
    data: bytes::Bytes,
) -> Result<agent_pb::WriteFileResponse, tonic::Status> {
    let msgs = upload_messages(sandbox_id, file, &data);
    let written = bounded("an upload", c.write_file(futures::stream::iter(msgs))).await?;
    Ok(written.into_inner())
}

async fn sh(c: &mut Sandboxes, sandbox_id: &str, cmd: &str) -> client::ExecResult {
    exec(c, sandbox_id, shell(cmd)).await.unwrap()
}

#[tokio::test]
async fn commands_in_a_sandbox_cannot_reach_replace_or_fill_the_agents_directory() {
    needs_docker!();
    let mut cp = ControlPlane::start(&[]).await.unwrap();
    let mut c = cp.sandboxes(&cp.admin_token).await.unwrap();
    let id = create(&mut c).await.unwrap().id;
    upload(
        &mut c,
        &id,
        agent_pb::WriteFileHeader {
            path: "probe".into(),
            mode: 0o755,
            ..Default::default()
        },
        probe(),
    )
    .await
    .unwrap();

    // The agent's socket is out of reach: the probe cannot use it.
    let r = sh(&mut c, &id, "./probe /run/bridle/agent.sock").await;
    assert_eq!(r.code(), Some(3), "{}", r.stdout_str());
    assert!(r.stdout_str().contains("refused"), "{}", r.stdout_str());

    // Nothing can be written, replaced or planted in the directory, which
    // is the host's <data_dir>/sandboxes/<id>.
    let attempts = [
        "ls /run/bridle",
        "touch /run/bridle/fill",
        "head -c 1048576 /dev/zero > /run/bridle/fill",
        "rm -f /run/bridle/agent.sock",
        "ln -sf /run/bridle/../x /run/bridle/agent.sock",
        "mv /run/bridle/agent.sock /run/bridle/old",
        "chmod 777 /run/bridle",
    ];
    for cmd in attempts {
        let r = sh(&mut c, &id, cmd).await;
        assert_ne!(r.code(), Some(0), "{cmd} succeeded: {}", r.stdout_str());
    }
    let host_dir = cp.data_dir().join("sandboxes").join(&id);
    let entries: Vec<_> = std::fs::read_dir(&host_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(entries, vec![std::ffi::OsString::from("agent.sock")]);
    let kind = std::fs::symlink_metadata(host_dir.join("agent.sock"))
        .unwrap()
        .file_type();
    assert!(std::os::unix::fs::FileTypeExt::is_socket(&kind));

    // After a restart the control plane reaches the same, verified agent.
    cp.restart().await.unwrap();
    let mut c = cp.sandboxes(&cp.admin_token).await.unwrap();
    let r = sh(&mut c, &id, "echo still here").await;
    assert_eq!(r.stdout_str(), "still here\n");
}

/// Even where the socket is reachable (a sandbox whose directory is left
/// open, as here), the agent serves only peers outside its PID namespace.
#[tokio::test]
async fn the_agent_refuses_peers_from_inside_its_sandbox() {
    needs_docker!();
    let sb = Sandbox::start(SandboxOptions::default()).await.unwrap();
    let mut agent = sb.client().unwrap();
    let header = agent_pb::WriteFileHeader {
        path: "probe".into(),
        mode: 0o755,
        ..Default::default()
    };
    bounded(
        "uploading the probe",
        client::write_file(&mut agent, header, probe()),
    )
    .await
    .unwrap();
    let r = bounded(
        "the probe",
        client::run(&mut agent, shell("./probe /run/bridle/agent.sock")),
    )
    .await
    .unwrap();
    assert_eq!(r.code(), Some(3), "{}", r.stdout_str());
    // The agent says why in its log, and still serves the host.
    assert!(
        sb.logs().contains("inside the sandbox"),
        "agent log: {}",
        sb.logs()
    );
    let listed = agent
        .list_execs(agent_pb::ListExecsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(!listed.execs.is_empty());
}

#[tokio::test]
async fn stop_signals_from_inside_the_sandbox_are_ignored() {
    needs_docker!();
    let cp = ControlPlane::start(&[]).await.unwrap();
    let mut c = cp.sandboxes(&cp.admin_token).await.unwrap();
    let id = create(&mut c).await.unwrap().id;
    let r = sh(
        &mut c,
        &id,
        "kill -TERM 1; kill -INT 1; kill -HUP 1; kill -QUIT 1; echo sent",
    )
    .await;
    assert_eq!(r.stdout_str(), "sent\n");
    let r = sh(&mut c, &id, "echo alive").await;
    assert_eq!(r.stdout_str(), "alive\n");
    let got = c
        .get(pb::GetSandboxRequest {
            sandbox_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.state, pb::SandboxState::Ready as i32);
    assert_eq!(control::inspect(&id, "{{.State.Running}}"), "true");
    // The agent says so in its log (once for the lot).
    bridle_tests::eventually("the agent logs what it ignored", PATIENCE, async || {
        let logs = std::process::Command::new("docker")
            .args(["logs", &format!("bridle-{id}")])
            .output()
            .unwrap();
        String::from_utf8_lossy(&logs.stderr)
            .contains("ignored stop signals sent from inside the sandbox")
    })
    .await;
}

#[tokio::test]
async fn exec_ids_of_runs_cannot_be_chosen_or_guessed_by_a_client() {
    needs_docker!();
    let cp = ControlPlane::start(&[]).await.unwrap();
    let mut c = cp.sandboxes(&cp.admin_token).await.unwrap();
    let id = create(&mut c).await.unwrap().id;
    let mut start = shell("echo forged; exit 0");
    start.exec_id = "bridle.run.r-1.s1.a1.0000".into();
    let e = exec(&mut c, &id, start).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    assert!(e.message().contains("control plane's own"), "{e}");
    let e = c
        .attach(pb::AttachRequest {
            sandbox_id: id.clone(),
            exec_id: "bridle.run.r-1.s1.a1.0000".into(),
            from_offset: 0,
        })
        .await
        .map(drop)
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");

    // A run's steps get ids in that reserved space, with a random part.
    let mut runs = cp.runs(&cp.admin_token).await.unwrap();
    let step = |name: &str| pb::Step {
        name: name.into(),
        shell: "true".into(),
        ..Default::default()
    };
    let job = pb::Job {
        steps: vec![step("a"), step("b")],
        ..Default::default()
    };
    let run = submit(&mut runs, "ids", job).await;
    let ids: Vec<String> = events_until(&mut runs, &run.id, finished)
        .await
        .into_iter()
        .filter_map(|ev| match ev.event {
            Some(pb::run_event::Event::StepStarted(s)) => Some(s.exec_id),
            _ => None,
        })
        .collect();
    assert_eq!(ids.len(), 2);
    for (i, exec_id) in ids.iter().enumerate() {
        let prefix = format!("bridle.run.{}.s{i}.a1.", run.id);
        let random = exec_id.strip_prefix(&prefix).unwrap_or_else(|| {
            panic!("{exec_id} does not start with {prefix}");
        });
        assert_eq!(random.len(), 16, "{exec_id}");
    }
}

#[tokio::test]
async fn an_upload_that_is_not_what_was_announced_changes_nothing() {
    needs_docker!();
    let cp = ControlPlane::start(&[]).await.unwrap();
    let mut c = cp.sandboxes(&cp.admin_token).await.unwrap();
    let id = create(&mut c).await.unwrap().id;
    let file = |size: Option<u64>, sha256: &str| agent_pb::WriteFileHeader {
        path: "data.bin".into(),
        size,
        sha256: sha256.into(),
        ..Default::default()
    };
    upload(
        &mut c,
        &id,
        file(None, ""),
        bytes::Bytes::from_static(b"old"),
    )
    .await
    .unwrap();
    let part = bytes::Bytes::from(vec![7u8; 5 << 20]);

    // A stream that ends normally but short of what was announced (what a
    // killed client looks like to a server that sees a clean end).
    let e = upload(&mut c, &id, file(Some(10 << 20), ""), part.clone())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Aborted, "{e}");
    assert!(e.message().contains("were announced"), "{e}");
    // The wrong bytes for the announced digest.
    let wrong = bridle_tests::sha256_hex(b"something else");
    let e = upload(&mut c, &id, file(Some(5 << 20), &wrong), part.clone())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Aborted, "{e}");

    // A client killed mid-stream (SIGKILL, stdin half sent, nothing
    // announced since the CLI cannot know the size of its stdin).
    let mut cli = std::process::Command::new(
        bridle_tests::workspace_binary("control-plane", "bridle").unwrap(),
    )
    .args(["sandbox", "cp", "-", &format!("{id}:data.bin")])
    .env("BRIDLE_ENDPOINT", &cp.endpoint)
    .env("BRIDLE_TOKEN", &cp.admin_token)
    .env_remove("BRIDLE_TOKEN_FILE")
    .env_remove("BRIDLE_DATA_DIR")
    .stdin(std::process::Stdio::piped())
    .spawn()
    .unwrap();
    let mut stdin = cli.stdin.take().unwrap();
    std::io::Write::write_all(&mut stdin, &part).unwrap();
    // The window is hit: the agent holds megabytes of it in its temporary file.
    bridle_tests::eventually("the upload is under way", PATIENCE, async || {
        let r = sh(
            &mut c,
            &id,
            "find . -name '.data.bin.bridle-*' -size +2047k",
        )
        .await;
        !r.stdout_str().is_empty()
    })
    .await;
    cli.kill().unwrap();
    cli.wait().unwrap();
    drop(stdin);
    // The agent removes its temporary file once it sees the call cut off.
    bridle_tests::eventually("only the old file is left", PATIENCE, async || {
        sh(&mut c, &id, "cat data.bin; ls -A").await.stdout_str() == "olddata.bin\n"
    })
    .await;

    // Straight to the agent, a stream that ends without `end` is cut short.
    let mut agent = cp.agent_of(&id).unwrap();
    let cut = vec![
        agent_pb::WriteFileRequest {
            request: Some(agent_pb::write_file_request::Request::Header(file(
                None, "",
            ))),
        },
        agent_pb::WriteFileRequest {
            request: Some(agent_pb::write_file_request::Request::Data(part.clone())),
        },
    ];
    let e = agent
        .write_file(futures::stream::iter(cut))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Aborted, "{e}");
    assert_eq!(sh(&mut c, &id, "cat data.bin").await.stdout_str(), "old");

    // What was announced and arrives is committed.
    let sha = bridle_tests::sha256_hex(&part);
    let done = upload(&mut c, &id, file(Some(5 << 20), &sha), part)
        .await
        .unwrap();
    assert_eq!(done.sha256, sha);
}

/// Submits `job` under `key` and answers the run.
async fn submit(runs: &mut control::Runs, key: &str, job: pb::Job) -> pb::Run {
    runs.submit(pb::SubmitRunRequest {
        idempotency_key: key.into(),
        job: Some(job),
        agent: None,
    })
    .await
    .unwrap()
    .into_inner()
}

/// A run's events from its first, up to and including the first `until`
/// matches.
async fn events_until(
    runs: &mut control::Runs,
    run_id: &str,
    until: impl Fn(&pb::run_event::Event) -> bool,
) -> Vec<pb::RunEvent> {
    let mut events = runs
        .watch(pb::WatchRunRequest {
            run_id: run_id.into(),
            from_seq: 1,
        })
        .await
        .unwrap()
        .into_inner();
    let mut seen = Vec::new();
    let what = format!("the events of run {run_id}");
    bounded(&what, async {
        while let Some(ev) = events.message().await.unwrap() {
            let last = ev.event.as_ref().is_some_and(&until);
            seen.push(ev);
            if last {
                break;
            }
        }
    })
    .await;
    seen
}

fn finished(e: &pb::run_event::Event) -> bool {
    matches!(e, pb::run_event::Event::Finished(_))
}

async fn wait_finished(runs: &mut control::Runs, run_id: &str) -> pb::Run {
    events_until(runs, run_id, finished).await;
    runs.get(pb::GetRunRequest {
        run_id: run_id.into(),
    })
    .await
    .unwrap()
    .into_inner()
}

#[tokio::test]
async fn a_run_that_fails_writing_its_inputs_releases_its_sandbox() {
    needs_docker!();
    let cp = ControlPlane::start(&[]).await.unwrap();
    let mut runs = cp.runs(&cp.admin_token).await.unwrap();
    let input = |path: &str| pb::InputFile {
        path: path.into(),
        content: b"x".to_vec().into(),
        mode: 0,
    };
    let job = pb::Job {
        // The second cannot be written: its parent is a file.
        inputs: vec![input("a"), input("a/b")],
        steps: vec![pb::Step {
            name: "never".into(),
            shell: "true".into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    let run = submit(&mut runs, "inputs", job).await;
    let done = wait_finished(&mut runs, &run.id).await;
    assert_eq!(done.state, pb::RunState::Failed as i32, "{done:?}");
    assert!(done.reason.contains("writing inputs"), "{}", done.reason);
    bridle_tests::eventually("the run's sandbox is released", PATIENCE, async || {
        cp.containers().is_empty()
    })
    .await;
}

#[tokio::test]
async fn a_sandbox_whose_agent_stopped_says_so_at_once() {
    needs_docker!();
    // No sweep during the test: what it sees comes from the engine's events.
    let cp = ControlPlane::start(&["sweep_interval_secs=3600"])
        .await
        .unwrap();
    let mut c = cp.sandboxes(&cp.admin_token).await.unwrap();
    let id = create(&mut c).await.unwrap().id;
    let killed = std::process::Command::new("docker")
        .args(["kill", &format!("bridle-{id}")])
        .output()
        .unwrap();
    assert!(killed.status.success(), "{killed:?}");
    bridle_tests::eventually("the sandbox shows it failed", PATIENCE, async || {
        let got = c
            .get(pb::GetSandboxRequest {
                sandbox_id: id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        got.state == pb::SandboxState::Failed as i32 && got.failure.contains("its agent stopped")
    })
    .await;
    let e = exec(&mut c, &id, shell("true")).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
    assert!(e.message().contains("its agent stopped"), "{e}");
}

#[tokio::test]
async fn out_of_range_and_reserved_values_are_refused() {
    needs_docker!();
    let cp = ControlPlane::start(&[]).await.unwrap();
    let mut c = cp.sandboxes(&cp.admin_token).await.unwrap();
    let refused = |r: Result<tonic::Response<pb::Sandbox>, tonic::Status>, what: &str| {
        let e = r.map(drop).unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{what}: {e}");
        e.message().to_string()
    };
    let msg = refused(
        c.create(pb::CreateSandboxRequest {
            labels: [("bridle.run".to_string(), "r-1".to_string())].into(),
            ..Default::default()
        })
        .await,
        "a reserved label",
    );
    assert!(msg.contains("control plane's own"), "{msg}");
    let msg = refused(
        c.create(pb::CreateSandboxRequest {
            ttl_seconds: u64::MAX,
            ..Default::default()
        })
        .await,
        "ttl 2^64-1",
    );
    assert!(msg.contains("ten years"), "{msg}");
    refused(
        c.create(pb::CreateSandboxRequest {
            idle_timeout_seconds: u64::MAX,
            ..Default::default()
        })
        .await,
        "idle timeout 2^64-1",
    );
    let mut runs = cp.runs(&cp.admin_token).await.unwrap();
    let e = runs
        .submit(pb::SubmitRunRequest {
            idempotency_key: "labels".into(),
            job: Some(pb::Job {
                labels: [("bridle.run".to_string(), "r-1".to_string())].into(),
                steps: vec![pb::Step {
                    name: "s".into(),
                    shell: "true".into(),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            agent: None,
        })
        .await
        .map(drop)
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");

    // A path of 3,000 components is a bad argument, not an internal error.
    let id = create(&mut c).await.unwrap().id;
    let long = vec!["a"; 3000].join("/");
    let e = c
        .read_file(pb::ReadFileRequest {
            sandbox_id: id.clone(),
            path: long.clone(),
            ..Default::default()
        })
        .await
        .map(drop)
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    let e = upload(
        &mut c,
        &id,
        agent_pb::WriteFileHeader {
            path: long,
            create_parents: true,
            ..Default::default()
        },
        bytes::Bytes::from_static(b"x"),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
}

/// Submits a one-step job (plus `then`, if any), waits for its first step to
/// print, kills the control plane, restarts the sandbox's container no
/// sooner than `after_boot` after the sandbox was made, starts the control
/// plane again and answers the run as it ended.
async fn restart_the_container_mid_step(
    step: pb::Step,
    then: Option<pb::Step>,
    after_boot: Duration,
) -> (ControlPlane, pb::Run) {
    let mut cp = ControlPlane::start(&["sweep_interval_secs=3600"])
        .await
        .unwrap();
    let mut runs = cp.runs(&cp.admin_token).await.unwrap();
    let made = std::time::Instant::now();
    let job = pb::Job {
        steps: std::iter::once(step).chain(then).collect(),
        ..Default::default()
    };
    let run = submit(&mut runs, "restart", job).await;
    events_until(&mut runs, &run.id, |e| {
        matches!(e, pb::run_event::Event::StepOutput(_))
    })
    .await;
    let left = after_boot.saturating_sub(made.elapsed());
    tokio::time::sleep(left).await;
    cp.kill9();
    let names = cp.containers();
    assert_eq!(names.len(), 1, "{names:?}");
    let restarted = std::process::Command::new("docker")
        .args(["restart", "-t", "0", &names[0]])
        .output()
        .unwrap();
    assert!(restarted.status.success(), "{restarted:?}");
    // Restarted behind the control plane's back, the agent cannot take its
    // locked socket directory again and stops; the control plane starts
    // the container afresh when it comes back.
    let id = names[0].trim_start_matches("bridle-");
    bridle_tests::eventually("the restarted container stops", PATIENCE, async || {
        control::inspect(id, "{{.State.Running}}") == "false"
    })
    .await;
    cp.restart().await.unwrap();
    let mut runs = cp.runs(&cp.admin_token).await.unwrap();
    let done = wait_finished(&mut runs, &run.id).await;
    (cp, done)
}

/// The agent is told apart by a random boot id, never by when it started:
/// a container restarted seconds after its first boot is not taken for the
/// agent that was asked to run the step.
#[tokio::test]
async fn a_step_interrupted_by_a_container_restart_soon_after_boot_is_not_run_again() {
    needs_docker!();
    let step = pb::Step {
        name: "deploy".into(),
        shell: "echo started; sleep 120".into(),
        ..Default::default()
    };
    let (_cp, done) = restart_the_container_mid_step(step, None, Duration::ZERO).await;
    assert_eq!(done.state, pb::RunState::Interrupted as i32, "{done:?}");
    assert!(
        done.reason.contains("not marked idempotent") && done.reason.contains("agent restarted"),
        "{}",
        done.reason
    );
    assert_eq!(done.steps[0].attempts, 1, "{done:?}");
}

#[tokio::test]
async fn an_idempotent_step_interrupted_by_a_container_restart_runs_exactly_once_more() {
    needs_docker!();
    let step = pb::Step {
        name: "fetch".into(),
        // The first attempt waits to be interrupted; the second one ends.
        shell: "echo x >> runs.txt; echo started; [ $(wc -l < runs.txt) -ge 2 ] || sleep 120"
            .into(),
        idempotent: true,
        retries: 3,
        ..Default::default()
    };
    let count = pb::Step {
        name: "count".into(),
        shell: "wc -l < runs.txt".into(),
        ..Default::default()
    };
    let (cp, done) =
        restart_the_container_mid_step(step, Some(count), Duration::from_secs(11)).await;
    assert_eq!(done.state, pb::RunState::Succeeded as i32, "{done:?}");
    assert_eq!(done.steps[0].attempts, 2, "{done:?}");
    let mut runs = cp.runs(&cp.admin_token).await.unwrap();
    let mut out = runs
        .logs(pb::LogsRequest {
            run_id: done.id.clone(),
            step: 1,
            stream: pb::LogStream::Stdout as i32,
            from_offset: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut text = Vec::new();
    bounded("the count step's log", async {
        while let Some(chunk) = out.message().await.unwrap() {
            text.extend_from_slice(&chunk.data);
        }
    })
    .await;
    assert_eq!(String::from_utf8_lossy(&text).trim(), "2");
}

/// Size of a directory tree on the host, in bytes actually allocated.
fn allocated(dir: &std::path::Path) -> u64 {
    let out = std::process::Command::new("du")
        .args(["-s", "-B1", "-x"])
        .arg(dir)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn a_sandbox_cannot_write_past_its_disk_limit_anywhere() {
    needs_docker!();
    let cp = ControlPlane::start(&[]).await.unwrap();
    let mut c = cp.sandboxes(&cp.admin_token).await.unwrap();
    let sb = c
        .create(pb::CreateSandboxRequest {
            limits: Some(pb::Limits {
                disk_bytes: Some(64 << 20),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(sb.limits.unwrap().disk_bytes, Some(64 << 20));
    let id = sb.id;
    assert_eq!(
        sh(&mut c, &id, "ls -A").await.stdout_str(),
        "",
        "a fresh, empty workspace"
    );
    let before = allocated(&cp.data_dir());
    // Every place a command can write ends in ENOSPC (or is not writable
    // at all), whatever it writes.
    for place in ["/workspace/fill", "/tmp/fill", "/dev/shm/fill"] {
        let r = sh(
            &mut c,
            &id,
            &format!("dd if=/dev/zero of={place} bs=1M count=200; echo rc=$?; rm -f {place}"),
        )
        .await;
        let err = String::from_utf8_lossy(&r.stderr).into_owned();
        assert!(
            r.stdout_str().contains("rc=1"),
            "{place}: {} {err}",
            r.stdout_str()
        );
        assert!(err.contains("No space left on device"), "{place}: {err}");
    }
    // Many small files run out of inodes the same way.
    let r = sh(
        &mut c,
        &id,
        "mkdir many; i=0; while echo -n 2>/dev/null > many/$i; do i=$((i+1)); done; echo made=$i; rm -rf many",
    )
    .await;
    let made: u64 = r
        .stdout_str()
        .trim()
        .strip_prefix("made=")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{}", r.stdout_str()));
    assert!(made > 1000, "only {made} files before the first refusal");
    let after = allocated(&cp.data_dir());
    assert!(
        after < before + (80 << 20),
        "the host's data directory grew from {before} to {after} bytes"
    );
    // The agent reports the workspace's size: the limit, less the
    // filesystem's own overhead.
    let mut agent = cp.agent_of(&id).unwrap();
    let info = agent
        .info(agent_pb::InfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(
        info.workspace_bytes_total > 40 << 20 && info.workspace_bytes_total <= 64 << 20,
        "{info:?}"
    );
    // Deleting the sandbox removes its filesystem.
    c.delete(pb::DeleteSandboxRequest { sandbox_id: id })
        .await
        .unwrap();
    let disks: Vec<_> = std::fs::read_dir(cp.data_dir().join("disks/img"))
        .unwrap()
        .collect();
    assert!(disks.is_empty(), "{disks:?}");
}

/// A `bridle runs watch` process whose output is collected as it comes.
struct Follower {
    child: std::process::Child,
    stdout: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    stderr: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
}

impl Follower {
    fn start(cp: &ControlPlane, args: &[&str]) -> Self {
        let mut child = std::process::Command::new(
            bridle_tests::workspace_binary("control-plane", "bridle").unwrap(),
        )
        .args(args)
        // Found from the data directory each time, as a restart moves it.
        .env("BRIDLE_DATA_DIR", cp.data_dir())
        .env("BRIDLE_TOKEN", &cp.admin_token)
        .env_remove("BRIDLE_ENDPOINT")
        .env_remove("BRIDLE_TOKEN_FILE")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
        let collect = |mut from: Box<dyn std::io::Read + Send>| {
            let into = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
            let sink = into.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = from.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    sink.lock().unwrap().extend_from_slice(&buf[..n]);
                }
            });
            into
        };
        let stdout = collect(Box::new(child.stdout.take().unwrap()));
        let stderr = collect(Box::new(child.stderr.take().unwrap()));
        Self {
            child,
            stdout,
            stderr,
        }
    }

    fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stdout.lock().unwrap()).into_owned()
    }

    fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }
}

#[tokio::test]
async fn followers_survive_restarts_and_miss_nothing() {
    needs_docker!();
    let mut cp = ControlPlane::start(&[]).await.unwrap();
    let mut runs = cp.runs(&cp.admin_token).await.unwrap();
    let steps: Vec<pb::Step> = (1..=12)
        .map(|i| pb::Step {
            name: format!("s{i}"),
            shell: format!("echo out-{i}; sleep 0.5"),
            ..Default::default()
        })
        .collect();
    let job = pb::Job {
        steps,
        ..Default::default()
    };
    let run = submit(&mut runs, "followed", job).await;
    let followers = [
        Follower::start(&cp, &["runs", "watch", &run.id]),
        Follower::start(&cp, &["runs", "watch", &run.id]),
        Follower::start(&cp, &["runs", "watch", &run.id, "-o", "json"]),
    ];
    // Every follower is following before the first kill.
    bridle_tests::eventually("every follower printed", PATIENCE, async || {
        followers.iter().all(|f| f.stdout().contains("out-1"))
    })
    .await;
    for _ in 0..4 {
        cp.restart().await.unwrap();
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    let mut followers = followers;
    for f in &mut followers {
        let mut status = None;
        bridle_tests::eventually("the follower exits", PATIENCE, async || {
            status = f.child.try_wait().unwrap();
            status.is_some()
        })
        .await;
        let status = status.unwrap();
        // The output threads have everything once the pipes close.
        bridle_tests::eventually("the output is read", PATIENCE, async || {
            Arc::strong_count(&f.stdout) == 1
        })
        .await;
        assert!(status.success(), "{status:?}: {}", f.stderr());
        assert!(
            f.stderr().contains("lost the control plane"),
            "no restart was seen: {}",
            f.stderr()
        );
    }
    for f in &followers[..2] {
        let out = f.stdout();
        let lines: Vec<&str> = out.lines().filter(|l| l.starts_with("out-")).collect();
        let want: Vec<String> = (1..=12).map(|i| format!("out-{i}")).collect();
        assert_eq!(lines, want, "{out}");
    }
    let json = followers[2].stdout();
    let events: Vec<serde_json::Value> = json
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let seqs: Vec<u64> = events.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    let want: Vec<u64> = (1..=seqs.len() as u64).collect();
    assert_eq!(seqs, want, "every event once, in order");
    let last = events.last().unwrap();
    assert_eq!(last["type"], "finished");
    assert_eq!(last["state"], "succeeded");
}

#[tokio::test]
async fn workspace_volumes_are_labelled_and_orphans_swept() {
    needs_docker!();
    // Without a disk limit the workspace is a Docker volume.
    let mut cp = ControlPlane::start(&["sandbox.disk_bytes=0"])
        .await
        .unwrap();
    let mut c = cp.sandboxes(&cp.admin_token).await.unwrap();
    let id = create(&mut c).await.unwrap().id;
    let volume = format!("bridle-{id}-workspace");
    let label = |name: &str| {
        let out = std::process::Command::new("docker")
            .args([
                "volume",
                "inspect",
                "--format",
                "{{index .Labels \"bridle.control-plane\"}}",
                name,
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(label(&volume), cp.instance);
    // A volume of this control plane that no sandbox owns (its container
    // was removed without it) is removed at the next sweep.
    let ghost = "bridle-sb-0123456789ab-workspace";
    let made = std::process::Command::new("docker")
        .args(["volume", "create", "--label"])
        .arg(format!("bridle.control-plane={}", cp.instance))
        .args(bridle_tests::sweep::label_args())
        .args(["--label", "bridle.sandbox=sb-0123456789ab", ghost])
        .output()
        .unwrap();
    assert!(made.status.success(), "{made:?}");
    cp.restart().await.unwrap();
    bridle_tests::eventually("the orphan volume is removed", PATIENCE, async || {
        label(ghost).is_empty()
    })
    .await;
    assert_eq!(
        label(&volume),
        cp.instance,
        "the live sandbox keeps its own"
    );
}

/// Runs `cmd` to its end, capturing its output; kills it and fails once
/// [`PATIENCE`] has passed (an agent that does not refuse serves for ever).
fn output_within(cmd: &mut std::process::Command) -> std::process::Output {
    use std::process::Stdio;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + PATIENCE;
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "{cmd:?} still running after {} s: {}",
                PATIENCE.as_secs(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// Given an identity key, the agent runs only as PID 1 (its peer and
/// signal checks rest on it) and never with the unchecked TCP listener.
#[test]
fn an_agent_with_a_key_refuses_to_run_where_its_checks_would_not_hold() {
    let agent = bridle_tests::agent_binary().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let run = |extra: &[&str]| {
        output_within(
            std::process::Command::new(&agent)
                .arg("--socket")
                .arg(dir.path().join("agent.sock"))
                .arg("--workspace")
                .arg(dir.path())
                .args(extra)
                .env("BRIDLE_AGENT_KEY", "00".repeat(32)),
        )
    };
    let out = run(&[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is not PID 1"), "{err}");
    let out = output_within(std::process::Command::new(&agent).env("BRIDLE_AGENT_KEY", "not hex"));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("64 hex digits"));
}
