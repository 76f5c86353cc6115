//! Runs end to end: jobs submitted to the real control plane, executed in
//! real containers, and the control plane killed with SIGKILL again and
//! again while a job runs.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::collections::HashMap;

use sha2::Digest;
use std::time::{Duration, Instant};

use bridle_proto::control::v1 as pb;
use bridle_tests::control::ControlPlane;
use bridle_tests::docker::require_docker;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

macro_rules! docker_or_skip {
    () => {
        if !require_docker(module_path!()) {
            return;
        }
    };
}

type Runs = pb::runs_client::RunsClient<InterceptedService<Channel, bridle_tests::control::Bearer>>;

async fn runs_client(endpoint: &str, token: &str) -> anyhow::Result<Runs> {
    let ch = Channel::from_shared(endpoint.to_string())?
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await?;
    Ok(pb::runs_client::RunsClient::with_interceptor(
        ch,
        bridle_tests::control::bearer(token)?,
    ))
}

fn shell_step(name: &str, cmd: &str) -> pb::Step {
    pb::Step {
        name: name.into(),
        shell: cmd.into(),
        ..Default::default()
    }
}

async fn logs(c: &mut Runs, run_id: &str, step: u32) -> String {
    let mut s = c
        .logs(pb::LogsRequest {
            run_id: run_id.into(),
            step,
            stream: pb::LogStream::Stdout as i32,
            from_offset: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut out = Vec::new();
    while let Some(chunk) = s.message().await.unwrap() {
        out.extend_from_slice(&chunk.data);
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A finished run's sandbox is deleted right after `finished` is recorded.
async fn wait_released(cp: &ControlPlane) {
    let start = Instant::now();
    while !cp.containers().is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the run's sandbox was not released: {:?}",
            cp.containers()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_job_runs_with_secrets_redacted_and_the_same_key_returns_the_same_run() {
    docker_or_skip!();
    let cp = ControlPlane::start(&[]).await.unwrap();
    let mut c = runs_client(&cp.endpoint, &cp.admin_token).await.unwrap();
    let job = pb::Job {
        secrets: HashMap::from([("TOKEN".to_string(), "hunter2-secret-value".to_string())]),
        inputs: vec![pb::InputFile {
            path: "in/data.txt".into(),
            content: b"input data\n".to_vec().into(),
            mode: 0,
        }],
        steps: vec![
            shell_step("read", "cat in/data.txt; echo \"token=$TOKEN\""),
            shell_step("fail", "exit 4"),
            shell_step("never", "echo never"),
        ],
        ..Default::default()
    };
    let submit = pb::SubmitRunRequest {
        idempotency_key: "same-key".into(),
        job: Some(job.clone()),
    };
    let run = c.submit(submit.clone()).await.unwrap().into_inner();
    let again = c.submit(submit).await.unwrap().into_inner();
    assert_eq!(run.id, again.id, "the same key returns the same run");
    assert_eq!(run.job.unwrap().secrets["TOKEN"], "***");

    let done = wait_finished(&mut c, &run.id).await;
    assert_eq!(done.state, pb::RunState::Failed as i32, "{done:?}");
    assert_eq!(done.steps[1].exit_code, Some(4));
    assert_eq!(done.steps[2].state, pb::StepState::Skipped as i32);
    assert!(done.reason.contains("exited with 4"), "{}", done.reason);
    assert_eq!(logs(&mut c, &run.id, 0).await, "input data\ntoken=***\n");
    // The secret is nowhere: not in the store file, not in the log.
    let needle = b"hunter2-secret-value";
    for f in ["bridle.db", "bridle.db-wal"] {
        let bytes = std::fs::read(cp.data_dir().join(f)).unwrap_or_default();
        assert!(
            !bytes.windows(needle.len()).any(|w| w == needle),
            "{f} holds the secret"
        );
    }
    assert!(!cp.log().contains("hunter2"));
    // Its sandbox goes with it (right after `finished` is recorded).
    wait_released(&cp).await;

    // Bad jobs are refused with the field named, and create nothing.
    let bad = c
        .submit(pb::SubmitRunRequest {
            idempotency_key: "bad".into(),
            job: Some(pb::Job {
                steps: vec![pb::Step {
                    shell: "x".into(),
                    retries: 2,
                    ..Default::default()
                }],
                ..Default::default()
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    assert!(bad.message().contains("steps[0]"), "{bad:?}");
    let list = c
        .list(pb::ListRunsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.runs.len(), 1);
}

/// The heart of it: a 20-step job whose steps each append one line to a
/// workspace file, with the control plane SIGKILLed at least 20 times while
/// it runs and restarted each time.
#[tokio::test]
async fn a_job_survives_twenty_kills_with_every_step_run_exactly_once() {
    docker_or_skip!();
    let mut cp = ControlPlane::start(&[]).await.unwrap();
    let token = cp.admin_token.clone();
    let mut steps: Vec<pb::Step> = (1..=20)
        .map(|i| {
            shell_step(
                &format!("step {i}"),
                &format!("echo line-{i} >> lines.txt; echo out-{i}; sleep 0.4"),
            )
        })
        .collect();
    steps.push(shell_step("show", "cat lines.txt"));
    let mut c = runs_client(&cp.endpoint, &token).await.unwrap();
    let run = c
        .submit(pb::SubmitRunRequest {
            idempotency_key: "crash".into(),
            job: Some(pb::Job {
                steps,
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner();

    // A watcher that reconnects across every restart, from the next seq.
    let endpoint_file = cp.data_dir().join("endpoint");
    let run_id = run.id.clone();
    let watcher = tokio::spawn(async move {
        let mut seen: Vec<u64> = Vec::new();
        let mut next = 1u64;
        loop {
            let endpoint = match std::fs::read_to_string(&endpoint_file) {
                Ok(e) => e.trim().to_string(),
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            };
            let Ok(mut c) = runs_client(&endpoint, &token).await else {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            };
            let Ok(stream) = c
                .watch(pb::WatchRunRequest {
                    run_id: run_id.clone(),
                    from_seq: next,
                })
                .await
            else {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            };
            let mut stream = stream.into_inner();
            while let Ok(Some(ev)) = stream.message().await {
                seen.push(ev.seq);
                next = ev.seq + 1;
                if matches!(ev.event, Some(pb::run_event::Event::Finished(_))) {
                    return seen;
                }
            }
        }
    });

    // At least 20 kills while the run is unfinished, at varied moments
    // (right after a restart, mid-step, around step boundaries).
    let mut kills = 0;
    let mut rng = 0x2545F4914F6CDD1Du64;
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        tokio::time::sleep(Duration::from_millis(rng % 350)).await;
        let mut c = match runs_client(&cp.endpoint, &cp.admin_token).await {
            Ok(c) => c,
            Err(_) => continue,
        };
        let got = c
            .get(pb::GetRunRequest {
                run_id: run.id.clone(),
            })
            .await;
        let finished = match &got {
            Ok(r) => r.get_ref().finished_unix_ms != 0,
            Err(_) => false,
        };
        let last_seen = format!("{got:?}");
        if finished {
            break;
        }
        if kills < 24 {
            cp.kill9();
            kills += 1;
            cp.restart().await.unwrap();
        }
        assert!(
            Instant::now() < deadline,
            "the run did not finish after {kills} kills; last Get: {last_seen}\ncontainers: {:?}\n{}",
            cp.containers(),
            cp.log()
        );
    }
    assert!(
        kills >= 20,
        "only {kills} kills happened before the run finished"
    );
    eprintln!("crash test: {kills} SIGKILLs and restarts during the run");

    let mut c = runs_client(&cp.endpoint, &cp.admin_token).await.unwrap();
    let done = c
        .get(pb::GetRunRequest {
            run_id: run.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        done.state,
        pb::RunState::Succeeded as i32,
        "{done:?}\n{}",
        cp.log()
    );
    let expected: String = (1..=20).map(|i| format!("line-{i}\n")).collect();
    assert_eq!(
        logs(&mut c, &run.id, 20).await,
        expected,
        "each line exactly once, in order"
    );
    // Every step's own output recorded once.
    for i in 1..=20u32 {
        assert_eq!(logs(&mut c, &run.id, i - 1).await, format!("out-{i}\n"));
        assert_eq!(done.steps[i as usize - 1].attempts, 1, "step {i} ran once");
    }
    // The log has no gap, and the watcher saw every event once, in order.
    let seen = tokio::time::timeout(Duration::from_secs(60), watcher)
        .await
        .unwrap()
        .unwrap();
    let all: Vec<u64> = (1..=done.last_seq).collect();
    eprintln!(
        "crash test: {} events, the watcher saw {} across the restarts",
        all.len(),
        seen.len()
    );
    assert_eq!(seen, all);
    wait_released(&cp).await;
}

#[tokio::test]
async fn cancel_stops_the_running_step_and_its_children() {
    docker_or_skip!();
    let cp = ControlPlane::start(&[]).await.unwrap();
    let mut c = runs_client(&cp.endpoint, &cp.admin_token).await.unwrap();
    let run = c
        .submit(pb::SubmitRunRequest {
            idempotency_key: "cancel-me".into(),
            job: Some(pb::Job {
                steps: vec![
                    shell_step("forks", "sleep 1000 & sleep 1000 & echo started; wait"),
                    shell_step("after", "echo never"),
                ],
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner();
    let start = Instant::now();
    while logs(&mut c, &run.id, 0).await != "started\n" {
        assert!(start.elapsed() < Duration::from_secs(60));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    c.cancel(pb::CancelRunRequest {
        run_id: run.id.clone(),
        reason: "enough".into(),
    })
    .await
    .unwrap();
    let done = loop {
        let r = c
            .get(pb::GetRunRequest {
                run_id: run.id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        if r.finished_unix_ms != 0 {
            break r;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "{r:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(done.state, pb::RunState::Cancelled as i32, "{done:?}");
    assert_eq!(done.reason, "enough");
    // The step's tree was killed (not waited out), and nothing after it ran.
    assert!(done.steps[0].signal.is_some(), "{:?}", done.steps[0]);
    assert_eq!(done.steps[1].state, pb::StepState::Skipped as i32);
    let gone = Instant::now();
    while !cp.containers().is_empty() {
        assert!(
            gone.elapsed() < Duration::from_secs(30),
            "the sandbox is released"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn the_cli_runs_a_job_file_and_exits_with_its_code() {
    docker_or_skip!();
    let cp = ControlPlane::start(&[]).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let job = dir.path().join("job.yaml");
    std::fs::write(
        &job,
        "steps:\n  - name: hello\n    run: echo hello from the job\n  - name: fails\n    run: exit 3\n",
    )
    .unwrap();
    let out = cp
        .cli(&cp.admin_token, &["run", job.to_str().unwrap(), "--follow"])
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello from the job\n");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("failed"), "{err}");

    // A malformed file: one line naming the line, exit 6, and no run.
    std::fs::write(&job, "steps:\n  - run: a\n    retries: 2\n").unwrap();
    let out = cp
        .cli(&cp.admin_token, &["run", job.to_str().unwrap()])
        .unwrap();
    assert_eq!(out.status.code(), Some(6));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("job.yaml:2:"), "{err}");
    let out = cp
        .cli(&cp.admin_token, &["runs", "list", "-o", "json"])
        .unwrap();
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        list.as_array().unwrap().len(),
        1,
        "only the first run exists"
    );
}

async fn get_run(c: &mut Runs, run_id: &str) -> pb::Run {
    c.get(pb::GetRunRequest {
        run_id: run_id.into(),
    })
    .await
    .unwrap()
    .into_inner()
}

/// Waits until the run has finished and answers it.
async fn wait_finished(c: &mut Runs, run_id: &str) -> pb::Run {
    let start = Instant::now();
    loop {
        let r = get_run(c, run_id).await;
        if r.finished_unix_ms != 0 {
            return r;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "run never finished: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until exactly one of `ids` is running (its step started) and
/// answers it.
async fn the_one_running(c: &mut Runs, ids: &[&str]) -> pb::Run {
    let start = Instant::now();
    loop {
        let mut running = Vec::new();
        for id in ids {
            let r = get_run(c, id).await;
            if r.state == pb::RunState::Running as i32
                && r.steps
                    .first()
                    .is_some_and(|s| s.state == pb::StepState::Running as i32)
            {
                running.push(r);
            }
        }
        assert!(running.len() <= 1, "more than one run at once: {running:?}");
        if let Some(r) = running.pop() {
            return r;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "none of {ids:?} started"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn owners_take_turns_in_the_queue_and_limits_hold() {
    docker_or_skip!();
    let cp = ControlPlane::start(&["max_running_runs=1", "max_running_runs_per_owner=1"])
        .await
        .unwrap();
    let alice = cp.token(pb::Role::Submitter, "alice").await.unwrap();
    let bob = cp.token(pb::Role::Submitter, "bob").await.unwrap();
    let mut a = runs_client(&cp.endpoint, &alice).await.unwrap();
    let mut b = runs_client(&cp.endpoint, &bob).await.unwrap();
    let mut admin = cp.sandboxes(&cp.admin_token).await.unwrap();
    // Each run waits until the test lets it finish, so the order it sees
    // does not depend on how long anything takes.
    let job = || pb::Job {
        steps: vec![shell_step(
            "wait",
            "while [ ! -e /workspace/go ]; do sleep 0.02; done",
        )],
        ..Default::default()
    };
    let submit = |key: &str| pb::SubmitRunRequest {
        idempotency_key: key.into(),
        job: Some(job()),
    };
    let a1 = a.submit(submit("a1")).await.unwrap().into_inner().id;
    assert_eq!(the_one_running(&mut a, &[&a1]).await.id, a1);
    // Alice queues two more before Bob queues one.
    let a2 = a.submit(submit("a2")).await.unwrap().into_inner().id;
    let a3 = a.submit(submit("a3")).await.unwrap().into_inner().id;
    let b1 = b.submit(submit("b1")).await.unwrap().into_inner().id;
    for id in [&a2, &a3] {
        assert_eq!(get_run(&mut a, id).await.state, pb::RunState::Queued as i32);
    }
    assert_eq!(
        get_run(&mut b, &b1).await.state,
        pb::RunState::Queued as i32
    );

    let all = [a1.as_str(), &a2, &a3, &b1];
    let mut runs = admin_runs(&cp).await;
    let mut order = Vec::new();
    for _ in 0..all.len() {
        let r = the_one_running(&mut runs, &all).await;
        order.push(r.id.clone());
        let go = bridle_proto::sandbox::v1::ExecStart {
            argv: vec!["touch".into(), "/workspace/go".into()],
            ..Default::default()
        };
        let out = bridle_tests::control::exec(&mut admin, &r.sandbox_id, go)
            .await
            .unwrap();
        assert_eq!(out.exited.as_ref().and_then(|x| x.code), Some(0), "{out:?}");
        // Wait for it to finish before looking for the next one.
        wait_finished(&mut runs, &r.id).await;
    }
    // Bob's one run went before Alice's third, which was submitted earlier.
    assert_eq!(order, [a1.clone(), a2, b1, a3]);
    wait_released(&cp).await;
}

async fn admin_runs(cp: &ControlPlane) -> Runs {
    runs_client(&cp.endpoint, &cp.admin_token).await.unwrap()
}

/// Secrets are sealed at rest, so a run that uses them survives a SIGKILL
/// of the control plane; a secret the command writes in two pieces is still
/// masked; and once the run ends its sealed copy is gone too.
#[tokio::test]
async fn secrets_survive_a_restart_sealed_and_a_split_secret_is_still_masked() {
    docker_or_skip!();
    let mut cp = ControlPlane::start(&[]).await.unwrap();
    let secret = "s3cr3t-value-split-in-two";
    let job = pb::Job {
        secrets: HashMap::from([("TOKEN".to_string(), secret.to_string())]),
        labels: HashMap::from([("suite".to_string(), "secrets".to_string())]),
        steps: vec![
            // Two writes with a pause between: two output chunks.
            shell_step(
                "split",
                "printf '%s' \"$TOKEN\" | head -c 9; sleep 0.3; printf '%s' \"$TOKEN\" | tail -c +10; echo",
            ),
            shell_step("wait", "while [ ! -e /workspace/go ]; do sleep 0.02; done"),
            // The secret is still there after the restart (compared by
            // hash, so the job itself does not carry it in clear).
            shell_step(
                "check",
                &format!(
                    "[ \"$(printf '%s' \"$TOKEN\" | sha256sum | cut -c1-64)\" = {} ] && echo same",
                    hex::encode(sha2::Sha256::digest(secret))
                ),
            ),
        ],
        ..Default::default()
    };
    let mut c = runs_client(&cp.endpoint, &cp.admin_token).await.unwrap();
    let run = c
        .submit(pb::SubmitRunRequest {
            idempotency_key: "sealed".into(),
            job: Some(job),
        })
        .await
        .unwrap()
        .into_inner();
    let key = cp.data_dir().join("secrets.key");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // Wait for step 2, then kill the control plane under it.
    let start = Instant::now();
    let sandbox = loop {
        let r = get_run(&mut c, &run.id).await;
        if r.steps
            .get(1)
            .is_some_and(|s| s.state == pb::StepState::Running as i32)
        {
            break r.sandbox_id;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "{r:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    cp.restart().await.unwrap();
    let mut admin = cp.sandboxes(&cp.admin_token).await.unwrap();
    let go = bridle_proto::sandbox::v1::ExecStart {
        argv: vec!["touch".into(), "/workspace/go".into()],
        ..Default::default()
    };
    let out = bridle_tests::control::exec(&mut admin, &sandbox, go)
        .await
        .unwrap();
    assert_eq!(out.exited.as_ref().and_then(|x| x.code), Some(0), "{out:?}");
    let mut c = runs_client(&cp.endpoint, &cp.admin_token).await.unwrap();
    let done = wait_finished(&mut c, &run.id).await;
    wait_released(&cp).await;
    assert_eq!(done.state, pb::RunState::Succeeded as i32, "{done:?}");
    assert_eq!(logs(&mut c, &run.id, 0).await, "***\n");
    assert_eq!(logs(&mut c, &run.id, 2).await, "same\n");

    // Labels filter List in the store.
    let listed = c
        .list(pb::ListRunsRequest {
            labels: HashMap::from([("suite".to_string(), "secrets".to_string())]),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.runs.len(), 1);
    let none = c
        .list(pb::ListRunsRequest {
            labels: HashMap::from([("suite".to_string(), "other".to_string())]),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(none.runs.is_empty());

    let needle = secret.as_bytes();
    for f in ["bridle.db", "bridle.db-wal"] {
        let bytes = std::fs::read(cp.data_dir().join(f)).unwrap_or_default();
        assert!(
            !bytes.windows(needle.len()).any(|w| w == needle),
            "{f} holds the secret"
        );
    }
    assert!(!cp.log().contains(secret));
}
