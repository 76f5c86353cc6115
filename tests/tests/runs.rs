//! Runs end to end: jobs submitted to the real control plane, executed in
//! real containers, and the control plane killed with SIGKILL again and
//! again while a job runs.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::collections::HashMap;

use sha2::Digest;
use std::time::{Duration, Instant};

use bridle_proto::control::v1 as pb;
use bridle_tests::control::cli;
use bridle_tests::control::ControlPlane;
use bridle_tests::docker::require_docker;
use bridle_tests::{bounded, PATIENCE};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

macro_rules! needs_docker {
    () => {
        require_docker(module_path!())
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

async fn submit(c: &mut Runs, key: &str, job: pb::Job) -> pb::Run {
    bounded(
        &format!("submitting run {key:?}"),
        c.submit(pb::SubmitRunRequest {
            idempotency_key: key.into(),
            job: Some(job),
            agent: None,
        }),
    )
    .await
    .unwrap()
    .into_inner()
}

async fn logs(c: &mut Runs, run_id: &str, step: u32) -> String {
    let what = format!("reading the logs of step {} of run {run_id}", step + 1);
    bounded(&what, async move {
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
    })
    .await
}

/// Waits until step `step`'s recorded stdout is `expected`.
async fn until_output(c: &mut Runs, run_id: &str, step: u32, expected: &str) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let got = logs(c, run_id, step).await;
        if got == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "step {} of run {run_id} never printed {expected:?} (it printed {got:?})",
            step + 1
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A finished run's sandbox is deleted right after `finished` is recorded.
async fn wait_released(cp: &ControlPlane) {
    let start = Instant::now();
    while !cp.containers().is_empty() {
        assert!(
            start.elapsed() < PATIENCE,
            "the run's sandbox was not released: {:?}",
            cp.containers()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs `script` in `sandbox` through the control plane, as admin, and
/// answers its stdout; it must exit 0.
async fn in_sandbox(cp: &ControlPlane, sandbox: &str, script: &str) -> String {
    let mut admin = cp.sandboxes(&cp.admin_token).await.unwrap();
    let out = bounded(
        &format!("running {script:?} in {sandbox}"),
        bridle_tests::control::exec(&mut admin, sandbox, bridle_tests::client::shell(script)),
    )
    .await
    .unwrap();
    assert_eq!(out.code(), Some(0), "{script:?} in {sandbox}: {out:?}");
    out.stdout_str()
}

/// Runs `sql` on the control plane's store, beside the control plane (the
/// store takes a writer at a time; the statements here are instant).
async fn edit_db(cp: &ControlPlane, sql: &str) {
    use sqlx::ConnectOptions;
    let mut conn = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(cp.data_dir().join("bridle.db"))
        .connect()
        .await
        .unwrap();
    sqlx::query(sql).execute(&mut conn).await.unwrap();
}

/// The sealed secrets the store holds for `run_id`, read from the database
/// file (read-only) as the control plane keeps it.
async fn sealed_secrets(cp: &ControlPlane, run_id: &str) -> Option<Vec<u8>> {
    use sqlx::ConnectOptions;
    let mut conn = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(cp.data_dir().join("bridle.db"))
        .read_only(true)
        .connect()
        .await
        .unwrap();
    let rows: Vec<(Vec<u8>,)> = sqlx::query_as("SELECT sealed FROM run_secrets WHERE run_id = $1")
        .bind(run_id)
        .fetch_all(&mut conn)
        .await
        .unwrap();
    assert!(
        rows.len() <= 1,
        "run {run_id} has {} sealed rows",
        rows.len()
    );
    rows.into_iter().next().map(|(sealed,)| sealed)
}

/// Waits until the store holds no sealed secrets for `run_id` (they are
/// deleted just after its sandbox, once `finished` is recorded).
async fn until_no_sealed_secrets(cp: &ControlPlane, run_id: &str) {
    let deadline = Instant::now() + PATIENCE;
    while sealed_secrets(cp, run_id).await.is_some() {
        assert!(
            Instant::now() < deadline,
            "the sealed secrets of run {run_id} are still in the store after it ended\n{}",
            cp.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_job_runs_with_secrets_redacted_and_the_same_key_returns_the_same_run() {
    needs_docker!();
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
    let run = submit(&mut c, "same-key", job.clone()).await;
    let again = submit(&mut c, "same-key", job).await;
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
    let bad = bounded(
        "submitting a bad job",
        c.submit(pb::SubmitRunRequest {
            idempotency_key: "bad".into(),
            job: Some(pb::Job {
                steps: vec![pb::Step {
                    shell: "x".into(),
                    retries: 2,
                    ..Default::default()
                }],
                ..Default::default()
            }),
            agent: None,
        }),
    )
    .await
    .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    assert!(bad.message().contains("steps[0]"), "{bad:?}");
    let list = bounded("listing runs", c.list(pb::ListRunsRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.runs.len(), 1);
}

/// The heart of it: a 20-step job whose steps each append one line to a
/// workspace file, with the control plane SIGKILLed 20 times while it runs
/// and restarted each time. Every step waits for the test's go, so each
/// kill falls at a state of the run the test has seen (not after a guessed
/// delay), and exactly 20 happen however fast or slow the machine is.
#[tokio::test]
async fn a_job_survives_twenty_kills_with_every_step_run_exactly_once() {
    needs_docker!();
    let mut cp = ControlPlane::start(&[]).await.unwrap();
    let token = cp.admin_token.clone();
    // Each step appends its line, says so, and waits for its go file.
    let mut steps: Vec<pb::Step> = (1..=20)
        .map(|i| {
            shell_step(
                &format!("step {i}"),
                &format!(
                    "echo line-{i} >> /workspace/lines.txt; echo out-{i}; \
                     while [ ! -e /workspace/go-{i} ]; do sleep 0.02; done"
                ),
            )
        })
        .collect();
    steps.push(shell_step("show", "cat /workspace/lines.txt"));
    let mut c = runs_client(&cp.endpoint, &token).await.unwrap();
    let run = submit(
        &mut c,
        "crash",
        pb::Job {
            steps,
            ..Default::default()
        },
    )
    .await;

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

    // Kill 1: as soon as Submit has answered (the run queued, or its
    // sandbox being made and perhaps not yet recorded).
    cp.restart().await.unwrap();
    let mut kills = 1;
    // Kills 2 to 20: one per step of steps 1 to 19, at three kinds of
    // moment in turn.
    for i in 1..=19u32 {
        let mut c = runs_client(&cp.endpoint, &cp.admin_token).await.unwrap();
        // Step i has started; its line is written and its output recorded;
        // it waits for its go.
        until_output(&mut c, &run.id, i - 1, &format!("out-{i}\n")).await;
        let sandbox = get_run(&mut c, &run.id).await.sandbox_id;
        let go = format!("touch /workspace/go-{i}");
        match i % 3 {
            // Mid-step: its output recorded, its exit not yet.
            1 => {
                cp.restart().await.unwrap();
                in_sandbox(&cp, &sandbox, &go).await;
            }
            // As the step ends: let go, and killed at once (its exit, and
            // the next step's start, recorded or not yet).
            2 => {
                in_sandbox(&cp, &sandbox, &go).await;
                cp.restart().await.unwrap();
            }
            // Right after its exit is recorded, as the next step is decided
            // and started.
            _ => {
                in_sandbox(&cp, &sandbox, &go).await;
                let what = format!("step {i}'s exit recorded");
                until_run(&mut c, &run.id, &what, |r| {
                    r.steps[i as usize - 1].state != pb::StepState::Running as i32
                })
                .await;
                cp.restart().await.unwrap();
            }
        }
        kills += 1;
    }
    assert_eq!(kills, 20);
    eprintln!("crash test: {kills} SIGKILLs and restarts during the run");
    // Step 20 goes without a kill; then the last step shows the lines.
    let mut c = runs_client(&cp.endpoint, &cp.admin_token).await.unwrap();
    until_output(&mut c, &run.id, 19, "out-20\n").await;
    let sandbox = get_run(&mut c, &run.id).await.sandbox_id;
    in_sandbox(&cp, &sandbox, "touch /workspace/go-20").await;

    let done = wait_finished(&mut c, &run.id).await;
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
    let seen = bounded("the watcher seeing the run finish", watcher)
        .await
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

/// A step whose command tree tries every way out of a cancel: a plain
/// background child, a setsid'd one (a session of its own), a double fork
/// (re-parented away from the step's shell) and one that ignores SIGTERM.
/// Each writes its pid under /workspace/pids; then the step says so and
/// waits.
const ESCAPEES: &str = r#"mkdir -p /workspace/pids
sleep 1000 & echo $! > /workspace/pids/plain
setsid sh -c 'echo $$ > /workspace/pids/setsid; exec sleep 1000' &
sh -c 'sh -c "echo \$\$ > /workspace/pids/double; exec sleep 1000" &' &
sh -c 'trap "" TERM; echo $$ > /workspace/pids/trap; while :; do sleep 1; done' &
while [ ! -s /workspace/pids/setsid ] || [ ! -s /workspace/pids/double ] || [ ! -s /workspace/pids/trap ]; do sleep 0.05; done
echo started
wait
"#;

/// Says, for each pid the step wrote, whether that process lives (a zombie
/// runs nothing: gone).
const CHILDREN: &str = r#"for f in plain setsid double trap; do
  p=$(cat /workspace/pids/$f)
  s=$(cut -d' ' -f3 /proc/$p/stat 2>/dev/null)
  case "$s" in ''|Z) echo "$f gone" ;; *) echo "$f alive" ;; esac
done
"#;

/// Makes the store refuse every run's `finished` event, so a run's end
/// (and with it the delete of its sandbox) is held back.
const HOLD_THE_END: &str = r#"CREATE TRIGGER hold_the_end BEFORE INSERT ON run_events
WHEN NEW.body LIKE '{"finished":%'
BEGIN SELECT RAISE(ABORT, 'held by the test'); END"#;

#[tokio::test]
async fn cancel_stops_the_running_step_and_its_children() {
    needs_docker!();
    let cp = ControlPlane::start(&[]).await.unwrap();
    let mut c = runs_client(&cp.endpoint, &cp.admin_token).await.unwrap();
    let run = submit(
        &mut c,
        "cancel-me",
        pb::Job {
            steps: vec![
                shell_step("forks", ESCAPEES),
                shell_step("after", "echo never"),
            ],
            ..Default::default()
        },
    )
    .await;
    until_output(&mut c, &run.id, 0, "started\n").await;
    let sandbox = get_run(&mut c, &run.id).await.sandbox_id;
    assert_eq!(
        in_sandbox(&cp, &sandbox, CHILDREN).await,
        "plain alive\nsetsid alive\ndouble alive\ntrap alive\n",
        "the step's children run before the cancel"
    );

    // A run's sandbox is deleted right after its `finished` is recorded,
    // and with it every process in it. To look inside once the step has
    // ended, the store refuses `finished` for now: the sandbox stays.
    edit_db(&cp, HOLD_THE_END).await;
    let cancel = tokio::spawn({
        let mut c = c.clone();
        let run_id = run.id.clone();
        async move {
            c.cancel(pb::CancelRunRequest {
                run_id,
                reason: "enough".into(),
            })
            .await
        }
    });
    let ended = until_run(&mut c, &run.id, "the cancelled step ended", |r| {
        r.steps[0].state != pb::StepState::Running as i32
    })
    .await;
    // The step's tree was killed (not waited out)...
    assert!(ended.steps[0].signal.is_some(), "{:?}", ended.steps[0]);
    // ...every process of it, seen from inside the sandbox it ran in.
    assert_eq!(
        in_sandbox(&cp, &sandbox, CHILDREN).await,
        "plain gone\nsetsid gone\ndouble gone\ntrap gone\n",
        "a process of the cancelled step outlived it"
    );
    // That cancel could not record the end, and said so.
    let held = bounded("the first cancel", cancel)
        .await
        .unwrap()
        .expect_err("the run ended although its end could not be recorded");
    assert!(held.message().contains("held by the test"), "{held:?}");

    // Let go, a second cancel ends the run (nothing drives it any more).
    edit_db(&cp, "DROP TRIGGER hold_the_end").await;
    let done = bounded(
        "the second cancel",
        c.cancel(pb::CancelRunRequest {
            run_id: run.id.clone(),
            reason: "again".into(),
        }),
    )
    .await
    .unwrap()
    .into_inner();
    assert_eq!(done.state, pb::RunState::Cancelled as i32, "{done:?}");
    assert_eq!(done.reason, "enough", "the first cancel's reason stands");
    assert!(done.steps[0].signal.is_some(), "{:?}", done.steps[0]);
    assert_eq!(done.steps[1].state, pb::StepState::Skipped as i32);
    wait_released(&cp).await;
}

#[tokio::test]
async fn the_cli_runs_a_job_file_and_exits_with_its_code() {
    needs_docker!();
    let cp = ControlPlane::start(&[]).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let job = dir.path().join("job.yaml");
    std::fs::write(
        &job,
        "steps:\n  - name: hello\n    run: echo hello from the job\n  - name: fails\n    run: exit 3\n",
    )
    .unwrap();
    let out = cli(
        &cp,
        &cp.admin_token,
        &["run", job.to_str().unwrap(), "--follow"],
    )
    .await;
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
    let out = cli(&cp, &cp.admin_token, &["run", job.to_str().unwrap()]).await;
    assert_eq!(out.status.code(), Some(6));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("job.yaml:2:"), "{err}");
    let out = cli(&cp, &cp.admin_token, &["runs", "list", "-o", "json"]).await;
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        list.as_array().unwrap().len(),
        1,
        "only the first run exists"
    );
}

async fn get_run(c: &mut Runs, run_id: &str) -> pb::Run {
    bounded(
        &format!("getting run {run_id}"),
        c.get(pb::GetRunRequest {
            run_id: run_id.into(),
        }),
    )
    .await
    .unwrap()
    .into_inner()
}

/// Polls the run until `done` holds and answers it; fails naming `what`
/// (and the run as last seen) after [`PATIENCE`].
async fn until_run(
    c: &mut Runs,
    run_id: &str,
    what: &str,
    done: impl Fn(&pb::Run) -> bool,
) -> pb::Run {
    bridle_tests::until(what, async || get_run(c, run_id).await, done).await
}

/// Waits until the run has finished and answers it.
async fn wait_finished(c: &mut Runs, run_id: &str) -> pb::Run {
    until_run(c, run_id, "the run finished", |r| r.finished_unix_ms != 0).await
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
        assert!(start.elapsed() < PATIENCE, "none of {ids:?} started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn owners_take_turns_in_the_queue_and_limits_hold() {
    needs_docker!();
    let cp = ControlPlane::start(&["max_running_runs=1", "max_running_runs_per_owner=1"])
        .await
        .unwrap();
    let alice = cp.token(pb::Role::Submitter, "alice").await.unwrap();
    let bob = cp.token(pb::Role::Submitter, "bob").await.unwrap();
    let mut a = runs_client(&cp.endpoint, &alice).await.unwrap();
    let mut b = runs_client(&cp.endpoint, &bob).await.unwrap();
    // Each run waits until the test lets it finish, so the order it sees
    // does not depend on how long anything takes.
    let job = || pb::Job {
        steps: vec![shell_step(
            "wait",
            "while [ ! -e /workspace/go ]; do sleep 0.02; done",
        )],
        ..Default::default()
    };
    let a1 = submit(&mut a, "a1", job()).await.id;
    assert_eq!(the_one_running(&mut a, &[&a1]).await.id, a1);
    // Alice queues two more before Bob queues one.
    let a2 = submit(&mut a, "a2", job()).await.id;
    let a3 = submit(&mut a, "a3", job()).await.id;
    let b1 = submit(&mut b, "b1", job()).await.id;
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
        in_sandbox(&cp, &r.sandbox_id, "touch /workspace/go").await;
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
    needs_docker!();
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
    let run = submit(&mut c, "sealed", job).await;
    let key = cp.data_dir().join("secrets.key");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // Wait for step 2, then kill the control plane under it.
    let sandbox = until_run(&mut c, &run.id, "step 2 runs", |r| {
        r.steps
            .get(1)
            .is_some_and(|s| s.state == pb::StepState::Running as i32)
    })
    .await
    .sandbox_id;
    cp.restart().await.unwrap();
    in_sandbox(&cp, &sandbox, "touch /workspace/go").await;
    let mut c = runs_client(&cp.endpoint, &cp.admin_token).await.unwrap();
    let done = wait_finished(&mut c, &run.id).await;
    wait_released(&cp).await;
    assert_eq!(done.state, pb::RunState::Succeeded as i32, "{done:?}");
    assert_eq!(logs(&mut c, &run.id, 0).await, "***\n");
    assert_eq!(logs(&mut c, &run.id, 2).await, "same\n");

    // Labels filter List in the store.
    let listed = bounded(
        "listing runs by label",
        c.list(pb::ListRunsRequest {
            labels: HashMap::from([("suite".to_string(), "secrets".to_string())]),
            ..Default::default()
        }),
    )
    .await
    .unwrap()
    .into_inner();
    assert_eq!(listed.runs.len(), 1);
    let none = bounded(
        "listing runs by another label",
        c.list(pb::ListRunsRequest {
            labels: HashMap::from([("suite".to_string(), "other".to_string())]),
            ..Default::default()
        }),
    )
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

/// A run's sealed secrets are in the store while it can still use them and
/// deleted however it ends: succeeded, failed, cancelled while its step
/// runs, cancelled while it waits in the queue. A crash between a run's
/// `finished` and that delete (its sealed row put back while the control
/// plane is down) is made good at the next start.
#[tokio::test]
async fn a_runs_sealed_secrets_are_deleted_however_it_ends() {
    needs_docker!();
    // One run at a time, so that a second one waits in the queue.
    let mut cp = ControlPlane::start(&["max_running_runs=1"]).await.unwrap();
    let mut c = runs_client(&cp.endpoint, &cp.admin_token).await.unwrap();
    let secret = "sealed-then-deleted-0093";
    // Each run holds at its first step until the test lets it go.
    let job = |last: &str| pb::Job {
        secrets: HashMap::from([("TOKEN".to_string(), secret.to_string())]),
        steps: vec![
            shell_step("hold", "while [ ! -e /workspace/go ]; do sleep 0.02; done"),
            shell_step("last", last),
        ],
        ..Default::default()
    };
    let holding = |r: &pb::Run| r.steps[0].state == pb::StepState::Running as i32;

    // Succeeded (and, behind it, one cancelled in the queue).
    let ok = submit(&mut c, "succeeds", job("[ -n \"$TOKEN\" ]")).await;
    let ok_sandbox = until_run(&mut c, &ok.id, "the run holds", holding)
        .await
        .sandbox_id;
    let sealed = sealed_secrets(&cp, &ok.id)
        .await
        .expect("the run's secrets are sealed in the store while it runs");
    assert!(
        !sealed.windows(secret.len()).any(|w| w == secret.as_bytes()),
        "the sealed copy holds the secret in clear"
    );
    let queued = submit(&mut c, "queued", job("true")).await;
    assert_eq!(
        get_run(&mut c, &queued.id).await.state,
        pb::RunState::Queued as i32
    );
    assert!(sealed_secrets(&cp, &queued.id).await.is_some());
    let cancelled = bounded(
        "cancelling the queued run",
        c.cancel(pb::CancelRunRequest {
            run_id: queued.id.clone(),
            reason: "not now".into(),
        }),
    )
    .await
    .unwrap()
    .into_inner();
    assert_eq!(cancelled.state, pb::RunState::Cancelled as i32);
    until_no_sealed_secrets(&cp, &queued.id).await;
    in_sandbox(&cp, &ok_sandbox, "touch /workspace/go").await;
    let done = wait_finished(&mut c, &ok.id).await;
    assert_eq!(done.state, pb::RunState::Succeeded as i32, "{done:?}");
    until_no_sealed_secrets(&cp, &ok.id).await;

    // Failed.
    let failing = submit(&mut c, "fails", job("exit 3")).await;
    let sandbox = until_run(&mut c, &failing.id, "the run holds", holding)
        .await
        .sandbox_id;
    assert!(sealed_secrets(&cp, &failing.id).await.is_some());
    in_sandbox(&cp, &sandbox, "touch /workspace/go").await;
    let done = wait_finished(&mut c, &failing.id).await;
    assert_eq!(done.state, pb::RunState::Failed as i32, "{done:?}");
    until_no_sealed_secrets(&cp, &failing.id).await;

    // Cancelled while its step runs.
    let running = submit(&mut c, "cancelled", job("true")).await;
    until_run(&mut c, &running.id, "the run holds", holding).await;
    assert!(sealed_secrets(&cp, &running.id).await.is_some());
    let done = bounded(
        "cancelling the running run",
        c.cancel(pb::CancelRunRequest {
            run_id: running.id.clone(),
            reason: "enough".into(),
        }),
    )
    .await
    .unwrap()
    .into_inner();
    assert_eq!(done.state, pb::RunState::Cancelled as i32, "{done:?}");
    until_no_sealed_secrets(&cp, &running.id).await;
    wait_released(&cp).await;

    // A crash right after `finished` is recorded leaves the sealed row of
    // a finished run behind: put back here while the control plane is
    // down. The next start deletes it.
    cp.kill9();
    edit_db(
        &cp,
        &format!(
            "INSERT INTO run_secrets (run_id, sealed) VALUES ('{}', x'{}')",
            ok.id,
            hex::encode(&sealed)
        ),
    )
    .await;
    cp.restart().await.unwrap();
    until_no_sealed_secrets(&cp, &ok.id).await;
}
