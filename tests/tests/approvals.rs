//! Policy enforcement and human approvals end to end, against the default
//! policy set: an exec of `git push` waits for an operator other than the
//! requester; an approval is good for exactly one action, once; denial and
//! expiry fail closed; a run waiting for approval survives kill -9; the
//! webhook hears of pending approvals; forbidden writes are refused.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bridle_proto::control::v1 as pb;
use bridle_proto::sandbox::v1 as agent_pb;
use bridle_tests::client::{apply, ExecResult};
use bridle_tests::control::cli;
use bridle_tests::control::{create, start_request, Approvals, ControlPlane, Sandboxes};
use bridle_tests::docker::require_docker;
use bridle_tests::{bounded, PATIENCE};
use tonic::Code;

macro_rules! needs_docker {
    () => {
        require_docker(module_path!())
    };
}

fn shell(cmd: &str) -> agent_pb::ExecStart {
    agent_pb::ExecStart {
        shell: cmd.into(),
        ..Default::default()
    }
}

/// A request carrying `approval` (if any) in the approval header.
fn carrying<T>(message: T, approval: Option<&str>) -> tonic::Request<T> {
    let mut req = tonic::Request::new(message);
    if let Some(id) = approval {
        req.metadata_mut()
            .insert("x-bridle-approval", id.parse().unwrap());
    }
    req
}

/// The approval a refused unary call names in its trailer.
fn approval_named(refused: &tonic::Status) -> String {
    refused
        .metadata()
        .get("x-bridle-approval-id")
        .expect("the approval is named")
        .to_str()
        .unwrap()
        .to_string()
}

/// Starts an exec (with `approval` in the approval header, if given) and
/// reads until the stream ends or says it waits for an approval.
async fn exec_until_pending(
    c: &mut Sandboxes,
    sandbox: &str,
    cmd: &str,
    approval: Option<&str>,
) -> (
    Result<ExecResult, tonic::Status>,
    Option<tonic::Streaming<pb::ExecEvent>>,
) {
    let req = carrying(
        futures::stream::iter([start_request(sandbox, shell(cmd), false)]),
        approval,
    );
    bounded(&format!("exec of {cmd:?}"), async move {
        let mut events = match c.exec(req).await {
            Ok(s) => s.into_inner(),
            Err(s) => return (Err(s), None),
        };
        let mut r = ExecResult::default();
        loop {
            match events.message().await {
                Ok(Some(ev)) => {
                    apply(&mut r, ev);
                    if r.approval_pending.is_some() {
                        return (Ok(r), Some(events));
                    }
                }
                Ok(None) => return (Ok(r), None),
                Err(s) => return (Err(s), None),
            }
        }
    })
    .await
}

/// Reads an exec stream to its end.
async fn finish(mut events: tonic::Streaming<pb::ExecEvent>) -> Result<ExecResult, tonic::Status> {
    bounded("the end of an exec", async move {
        let mut r = ExecResult::default();
        while let Some(ev) = events.message().await? {
            apply(&mut r, ev);
        }
        Ok::<_, tonic::Status>(r)
    })
    .await
}

async fn decide(
    c: &mut Approvals,
    id: &str,
    approve: bool,
    reason: &str,
) -> Result<pb::Approval, tonic::Status> {
    bounded(
        &format!("deciding approval {id}"),
        c.decide(pb::DecideApprovalRequest {
            approval_id: id.into(),
            approve,
            reason: reason.into(),
            remember: false,
        }),
    )
    .await
    .map(|r| r.into_inner())
}

async fn get(c: &mut Approvals, id: &str) -> pb::Approval {
    bounded(
        &format!("getting approval {id}"),
        c.get(pb::GetApprovalRequest {
            approval_id: id.into(),
        }),
    )
    .await
    .unwrap()
    .into_inner()
}

/// Polls approval `id` until `done` holds and answers it.
async fn until_approval(
    c: &mut Approvals,
    id: &str,
    what: &str,
    done: impl Fn(&pb::Approval) -> bool,
) -> pb::Approval {
    bridle_tests::until(what, async || get(c, id).await, done).await
}

#[tokio::test]
async fn an_exec_waits_for_another_operator_and_an_approval_is_used_once_for_one_command() {
    needs_docker!();
    let cp = ControlPlane::start(&[]).await.unwrap();
    // Two operators of one team, and a submitter of another.
    let op1 = cp.token(pb::Role::Operator, "team").await.unwrap();
    let op2 = cp.token(pb::Role::Operator, "team").await.unwrap();
    let mallory = cp.token(pb::Role::Submitter, "other").await.unwrap();
    let mut s1 = cp.sandboxes(&op1).await.unwrap();
    let mut a1 = cp.approvals(&op1).await.unwrap();
    let mut a2 = cp.approvals(&op2).await.unwrap();
    let mut am = cp.approvals(&mallory).await.unwrap();
    let sb = bounded("Sandboxes/Create", create(&mut s1))
        .await
        .unwrap()
        .id;

    // Harmless commands run at once.
    let (r, _) = exec_until_pending(&mut s1, &sb, "echo fine", None).await;
    assert_eq!(r.unwrap().stdout, b"fine\n");

    // `git push` waits, on the open stream.
    let cmd = "echo git push origin main";
    let (r, events) = exec_until_pending(&mut s1, &sb, cmd, None).await;
    let pending = r.unwrap().approval_pending.expect("the exec waits");
    let id = pending.approval_id.clone();
    assert!(pending.reason.contains("git push"), "{pending:?}");
    let events = events.unwrap();
    let a = get(&mut a2, &id).await;
    assert_eq!(a.state, pb::ApprovalState::Pending as i32);
    assert!(a.summary.contains(cmd), "{a:?}");
    assert_eq!(a.action, "exec");

    // The requester can never decide it; nobody decides without a reason;
    // a submitter of another owner neither sees nor decides it.
    let own = decide(&mut a1, &id, true, "looks fine to me")
        .await
        .unwrap_err();
    assert_eq!(own.code(), Code::PermissionDenied, "{own:?}");
    assert!(own.message().contains("same principal"), "{own:?}");
    let no_reason = decide(&mut a2, &id, true, "  ").await.unwrap_err();
    assert_eq!(no_reason.code(), Code::InvalidArgument);
    let outsider = decide(&mut am, &id, true, "sure").await.unwrap_err();
    assert_eq!(outsider.code(), Code::PermissionDenied);
    // Only a sandbox's connections can be remembered, never an exec.
    let remembered = bounded(
        "Approvals/Decide",
        a2.decide(pb::DecideApprovalRequest {
            approval_id: id.clone(),
            approve: true,
            reason: "every push".into(),
            remember: true,
        }),
    )
    .await
    .unwrap_err();
    assert_eq!(remembered.code(), Code::InvalidArgument, "{remembered:?}");
    assert!(
        remembered.message().contains("cannot be remembered"),
        "{remembered:?}"
    );
    let unseen = bounded(
        "Approvals/Get",
        am.get(pb::GetApprovalRequest {
            approval_id: id.clone(),
        }),
    )
    .await
    .unwrap_err();
    assert_eq!(unseen.code(), Code::NotFound);

    // Another operator approves: the waiting exec runs, once.
    let decided = decide(&mut a2, &id, true, "release day").await.unwrap();
    assert_eq!(decided.state, pb::ApprovalState::Approved as i32);
    let r = finish(events).await.unwrap();
    assert_eq!(r.stdout, b"git push origin main\n");
    assert_eq!(r.code(), Some(0));
    assert!(get(&mut a2, &id).await.used);
    // Single decision, single use.
    let again = decide(&mut a2, &id, false, "changed my mind")
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::FailedPrecondition);
    let (reused, _) = exec_until_pending(&mut s1, &sb, cmd, Some(&id)).await;
    let reused = reused.unwrap_err();
    assert_eq!(reused.code(), Code::FailedPrecondition, "{reused:?}");
    assert!(reused.message().contains("already been used"), "{reused:?}");

    // A client that leaves while waiting comes back with the approval id;
    // the approval is good for the exact command only.
    let (r, events) = exec_until_pending(&mut s1, &sb, "echo git push a", None).await;
    let id = r.unwrap().approval_pending.unwrap().approval_id;
    drop(events);
    decide(&mut a2, &id, true, "a is fine").await.unwrap();
    let (other, _) = exec_until_pending(&mut s1, &sb, "echo git push b --force", Some(&id)).await;
    let other = other.unwrap_err();
    assert_eq!(other.code(), Code::PermissionDenied, "{other:?}");
    assert!(other.message().contains("different action"), "{other:?}");
    // ... and for the principal that asked, nobody else.
    let mut s2 = cp.sandboxes(&op2).await.unwrap();
    let (stolen, _) = exec_until_pending(&mut s2, &sb, "echo git push a", Some(&id)).await;
    assert_eq!(stolen.unwrap_err().code(), Code::PermissionDenied);
    let (same, _) = exec_until_pending(&mut s1, &sb, "echo git push a", Some(&id)).await;
    assert_eq!(same.unwrap().stdout, b"git push a\n");

    // Denied: the exec ends PERMISSION_DENIED and never runs.
    let (r, events) =
        exec_until_pending(&mut s1, &sb, "echo git push > /workspace/pushed", None).await;
    let id = r.unwrap().approval_pending.unwrap().approval_id;
    decide(&mut a2, &id, false, "not on a Friday")
        .await
        .unwrap();
    let denied = finish(events.unwrap()).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    assert!(denied.message().contains("not on a Friday"), "{denied:?}");
    let (r, _) = exec_until_pending(&mut s1, &sb, "test -e /workspace/pushed", None).await;
    assert_eq!(r.unwrap().code(), Some(1), "the denied command never ran");

    // Operators list what is pending; Watch shows it, then its decision.
    let mut watch = bounded("Approvals/Watch", a2.watch(pb::WatchApprovalsRequest {}))
        .await
        .unwrap()
        .into_inner();
    let (r, events) = exec_until_pending(&mut s1, &sb, "echo git push later", None).await;
    let id = r.unwrap().approval_pending.unwrap().approval_id;
    let seen = bounded("the pending approval on the watch", watch.message())
        .await
        .unwrap()
        .unwrap()
        .approval
        .unwrap();
    assert_eq!(
        (seen.id.as_str(), seen.state),
        (id.as_str(), pb::ApprovalState::Pending as i32)
    );
    let listed = bounded(
        "Approvals/List",
        a2.list(pb::ListApprovalsRequest {
            states: vec![pb::ApprovalState::Pending as i32],
            ..Default::default()
        }),
    )
    .await
    .unwrap()
    .into_inner();
    assert_eq!(listed.approvals.len(), 1);
    decide(&mut a2, &id, false, "later").await.unwrap();
    let seen = bounded("the decision on the watch", watch.message())
        .await
        .unwrap()
        .unwrap()
        .approval
        .unwrap();
    assert_eq!(seen.state, pb::ApprovalState::Denied as i32);
    drop(events);

    // Every decision and approval event is on the record, and the record
    // verifies.
    let mut audit = cp.audit(&cp.admin_token).await.unwrap();
    let start = Instant::now();
    loop {
        let entries = bounded(
            "Audit/Query",
            audit.query(pb::QueryAuditRequest {
                page_size: 1000,
                ..Default::default()
            }),
        )
        .await
        .unwrap()
        .into_inner()
        .entries;
        let has = |action: &str| entries.iter().any(|e| e.action == action);
        let exec_pending = entries.iter().any(|e| {
            e.action == "Sandboxes/Exec"
                && e.decision == "require_approval"
                && e.policy_version >= 1
        });
        if has("approval.requested")
            && has("approval.approved")
            && has("approval.denied")
            && exec_pending
        {
            break;
        }
        assert!(start.elapsed() < PATIENCE, "{entries:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let v = bounded("Audit/Verify", audit.verify(pb::VerifyAuditRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert!(v.ok, "{v:?}");
}

#[tokio::test]
async fn an_unanswered_approval_expires_closed_and_policy_forbids_secret_paths() {
    needs_docker!();
    // Pending approvals expire after a second here: nothing in this part
    // has to happen before that, the test waits for the expiry itself.
    let cp = ControlPlane::start(&["approval_ttl_secs=1"]).await.unwrap();
    let alice = cp.token(pb::Role::Submitter, "alice").await.unwrap();
    let op = cp.token(pb::Role::Operator, "ops").await.unwrap();
    let mut s = cp.sandboxes(&alice).await.unwrap();
    let mut a = cp.approvals(&op).await.unwrap();
    let sb = bounded("Sandboxes/Create", create(&mut s))
        .await
        .unwrap()
        .id;

    let (r, events) =
        exec_until_pending(&mut s, &sb, "echo git push > /workspace/pushed", None).await;
    let id = r.unwrap().approval_pending.unwrap().approval_id;
    let got = until_approval(&mut a, &id, "the approval is decided", |a| {
        a.state != pb::ApprovalState::Pending as i32
    })
    .await;
    assert_eq!(
        got.state,
        pb::ApprovalState::Expired as i32,
        "nobody decided it: {got:?}"
    );
    // Once expired it cannot be decided any more...
    let late = decide(&mut a, &id, true, "too late").await.unwrap_err();
    assert_eq!(late.code(), Code::FailedPrecondition, "{late:?}");
    assert!(late.message().contains("expired"), "{late:?}");
    // ...the exec that waited for it ends refused, saying why...
    let expired = finish(events.unwrap()).await.unwrap_err();
    assert_eq!(expired.code(), Code::PermissionDenied, "{expired:?}");
    assert!(expired.message().contains("expired"), "{expired:?}");
    // ...its command never ran, and the expiry is on the record.
    let (r, _) = exec_until_pending(&mut s, &sb, "test -e /workspace/pushed", None).await;
    assert_eq!(r.unwrap().code(), Some(1), "the expired command never ran");
    let mut audit = cp.audit(&cp.admin_token).await.unwrap();
    let start = Instant::now();
    loop {
        let entries = bounded(
            "Audit/Query",
            audit.query(pb::QueryAuditRequest {
                resource: id.clone(),
                page_size: 1000,
                ..Default::default()
            }),
        )
        .await
        .unwrap()
        .into_inner()
        .entries;
        if entries.iter().any(|e| e.action == "approval.expired") {
            break;
        }
        assert!(start.elapsed() < PATIENCE, "{entries:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(cp);

    // The rest needs decisions to come in time: the default ttl (an hour).
    let cp = ControlPlane::start(&[]).await.unwrap();
    let alice = cp.token(pb::Role::Submitter, "alice").await.unwrap();
    let op = cp.token(pb::Role::Operator, "ops").await.unwrap();
    let mut s = cp.sandboxes(&alice).await.unwrap();
    let mut a = cp.approvals(&op).await.unwrap();
    let sb = bounded("Sandboxes/Create", create(&mut s))
        .await
        .unwrap()
        .id;

    // Writes to secret-looking paths are forbidden, whoever asks.
    for path in ["deploy/prod.env", "keys/server.key", ".ssh/authorized_keys"] {
        let header = pb::WriteFileRequest {
            request: Some(pb::write_file_request::Request::Header(
                pb::WriteFileHeader {
                    sandbox_id: sb.clone(),
                    file: Some(agent_pb::WriteFileHeader {
                        path: path.into(),
                        create_parents: true,
                        ..Default::default()
                    }),
                },
            )),
        };
        let data = pb::WriteFileRequest {
            request: Some(pb::write_file_request::Request::Data(
                bytes::Bytes::from_static(b"x"),
            )),
        };
        let refused = bounded(
            "Sandboxes/WriteFile",
            s.write_file(futures::stream::iter([header, data])),
        )
        .await
        .unwrap_err();
        assert_eq!(
            refused.code(),
            Code::PermissionDenied,
            "{path}: {refused:?}"
        );
        assert!(
            refused
                .message()
                .contains("no-writes-to-secret-looking-paths"),
            "{path}: {refused:?}"
        );
    }
    let (r, _) = exec_until_pending(&mut s, &sb, "ls -A /workspace", None).await;
    assert_eq!(r.unwrap().stdout, b"", "nothing was written");

    // A sandbox with a network needs an approval too; the repeated request
    // carries it.
    let ask = pb::CreateSandboxRequest {
        network: pb::NetworkMode::Bridge as i32,
        ..Default::default()
    };
    let pending = bounded("Sandboxes/Create", s.create(ask.clone()))
        .await
        .unwrap_err();
    assert_eq!(pending.code(), Code::FailedPrecondition, "{pending:?}");
    let id = approval_named(&pending);
    decide(&mut a, &id, true, "needs the package mirror")
        .await
        .unwrap();
    let made = bounded(
        "Sandboxes/Create with the approval",
        s.create(carrying(ask.clone(), Some(&id))),
    )
    .await
    .unwrap()
    .into_inner();
    assert_eq!(made.network, pb::NetworkMode::Bridge as i32);

    // An approval not used within the ttl of its decision goes stale. Its
    // decision is moved two hours back in the store (the ttl is one),
    // rather than an hour waited out; the only difference from the
    // approval used just above.
    let pending = bounded("Sandboxes/Create", s.create(ask.clone()))
        .await
        .unwrap_err();
    let id = approval_named(&pending);
    decide(&mut a, &id, true, "later").await.unwrap();
    {
        use sqlx::ConnectOptions;
        let mut conn = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(cp.data_dir().join("bridle.db"))
            .connect()
            .await
            .unwrap();
        let moved = sqlx::query(
            "UPDATE approvals SET decided_unix_ms = decided_unix_ms - 7200000 WHERE id = $1",
        )
        .bind(&id)
        .execute(&mut conn)
        .await
        .unwrap();
        assert_eq!(moved.rows_affected(), 1);
    }
    let stale = bounded(
        "Sandboxes/Create with a stale approval",
        s.create(carrying(ask, Some(&id))),
    )
    .await
    .unwrap_err();
    assert_eq!(stale.code(), Code::FailedPrecondition, "{stale:?}");
    assert!(stale.message().contains("never used"), "{stale:?}");
}

/// A run waits in awaiting_approval across a SIGKILL of the control plane;
/// the decision made after the restart resumes it. A denied step fails the
/// run, and the webhook heard of every pending approval.
#[tokio::test]
async fn a_run_awaiting_approval_survives_kill_9_and_resumes_when_approved() {
    needs_docker!();
    // The webhook: a plain HTTP listener that keeps each request body.
    let hook = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook_url = format!("http://{}/bridle", hook.local_addr().unwrap());
    let (bodies_tx, mut bodies) = tokio::sync::mpsc::unbounded_channel::<String>();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        loop {
            let Ok((mut conn, _)) = hook.accept().await else {
                return;
            };
            let tx = bodies_tx.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                // Until the body announced by Content-Length is in.
                loop {
                    let n = conn.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        break;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buf).to_string();
                    if let Some((head, body)) = text.split_once("\r\n\r\n") {
                        let len: usize = head
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().parse().unwrap_or(0))
                            })
                            .unwrap_or(0);
                        if body.len() >= len {
                            let _ = tx.send(body.to_string());
                            break;
                        }
                    }
                }
                let _ = conn
                    .write_all(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")
                    .await;
            });
        }
    });
    let set = format!("approval_webhook_url={hook_url}");
    let mut cp = ControlPlane::start(&[&set]).await.unwrap();
    let alice = cp.token(pb::Role::Submitter, "alice").await.unwrap();
    let op = cp.token(pb::Role::Operator, "ops").await.unwrap();
    let mut runs = cp.runs(&alice).await.unwrap();
    let job = |push: &str| pb::Job {
        steps: vec![
            pb::Step {
                name: "build".into(),
                shell: "echo built".into(),
                ..Default::default()
            },
            pb::Step {
                name: "publish".into(),
                shell: format!("echo git push {push}"),
                ..Default::default()
            },
        ],
        labels: HashMap::from([("suite".to_string(), "approvals".to_string())]),
        ..Default::default()
    };
    let run = submit_until_awaiting(&mut runs, "publish", job("origin")).await;
    let id = run.approval_id.clone();
    assert!(!id.is_empty(), "{run:?}");
    assert_eq!(run.steps[0].state, pb::StepState::Succeeded as i32);
    assert_eq!(run.steps[1].state, pb::StepState::Pending as i32);
    let body = bounded("the webhook's call", bodies.recv()).await.unwrap();
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["approval_id"], id.as_str());
    assert_eq!(body["run_id"], run.id.as_str());

    // The submitter cannot approve its own run's step.
    let mut own = cp.approvals(&alice).await.unwrap();
    let refused = decide(&mut own, &id, true, "mine").await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);

    cp.restart().await.unwrap();
    let mut runs = cp.runs(&alice).await.unwrap();
    let mut a = cp.approvals(&op).await.unwrap();
    let still = until_run(&mut runs, &run.id, |r| {
        r.state == pb::RunState::AwaitingApproval as i32
    })
    .await;
    assert_eq!(still.approval_id, id, "the same approval after the restart");
    let approved = decide(&mut a, &id, true, "ship it").await.unwrap();
    assert_eq!(approved.run_id, run.id);
    let done = until_run(&mut runs, &run.id, |r| r.finished_unix_ms != 0).await;
    assert_eq!(done.state, pb::RunState::Succeeded as i32, "{done:?}");
    assert_eq!(done.steps[1].attempts, 1);

    // The run's record: its submission, the decision on each step, its
    // approval requested and approved, and nothing of other runs.
    let auditor = cp.token(pb::Role::Auditor, "audit").await.unwrap();
    bridle_tests::eventually("the run's audit entries", PATIENCE, async || {
        let of_run = query(
            &cp,
            &auditor,
            &["audit", "query", "--run", &run.id, "-o", "json"],
        )
        .await;
        let actions: Vec<(&str, &str)> = of_run
            .iter()
            .map(|e| {
                (
                    e["action"].as_str().unwrap(),
                    e["decision"].as_str().unwrap(),
                )
            })
            .collect();
        actions.contains(&("Runs/Submit", "allow"))
            && actions.contains(&("run/exec", "allow"))
            && actions.contains(&("run/exec", "require_approval"))
            && actions.contains(&("approval.requested", ""))
            && actions.contains(&("approval.approved", ""))
            && of_run.iter().all(|e| {
                e["resource"] == run.id.as_str()
                    || e["resource"] == id.as_str()
                    || e["request_id"].as_str().unwrap().starts_with(&run.id)
            })
    })
    .await;
    let since = query(
        &cp,
        &auditor,
        &["audit", "query", "--since", "1h", "-o", "json"],
    )
    .await;
    assert!(!since.is_empty());
    let until = query(
        &cp,
        &auditor,
        &["audit", "query", "--until", "1h", "-o", "json"],
    )
    .await;
    assert!(until.is_empty());

    // Denied: the run fails, saying who denied it and why.
    let run2 = submit_until_awaiting(&mut runs, "publish-2", job("--force")).await;
    decide(&mut a, &run2.approval_id, false, "no force pushes")
        .await
        .unwrap();
    let done = until_run(&mut runs, &run2.id, |r| r.finished_unix_ms != 0).await;
    assert_eq!(done.state, pb::RunState::Failed as i32);
    assert!(done.reason.contains("no force pushes"), "{done:?}");
    assert_eq!(done.steps[1].attempts, 0, "the denied step never started");
}

/// The entries `bridle audit query …` (`args`) shows `token`.
async fn query(cp: &ControlPlane, token: &str, args: &[&str]) -> Vec<serde_json::Value> {
    let out = cli(cp, token, args).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice::<Vec<serde_json::Value>>(&out.stdout).unwrap()
}

/// Submits `job` and waits until the run awaits an approval.
async fn submit_until_awaiting(
    runs: &mut bridle_tests::control::Runs,
    key: &str,
    job: pb::Job,
) -> pb::Run {
    let run = bounded(
        "Runs/Submit",
        runs.submit(pb::SubmitRunRequest {
            idempotency_key: key.into(),
            job: Some(job),
            agent: None,
        }),
    )
    .await
    .unwrap()
    .into_inner();
    until_run(runs, &run.id, |r| {
        r.state == pb::RunState::AwaitingApproval as i32
    })
    .await
}

async fn until_run(
    c: &mut bridle_tests::control::Runs,
    id: &str,
    done: impl Fn(&pb::Run) -> bool,
) -> pb::Run {
    let get = async || {
        bounded("Runs/Get", c.get(pb::GetRunRequest { run_id: id.into() }))
            .await
            .unwrap()
            .into_inner()
    };
    bridle_tests::until(&format!("run {id}"), get, done).await
}
