//! The audit log end to end: every call recorded with who made it and how it
//! ended, readable by auditors only, verifiable online and offline, and
//! tampering with the store file found and named.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::time::{Duration, Instant};

use bridle_proto::control::v1 as pb;
use bridle_tests::control::ControlPlane;
use bridle_tests::docker::require_docker;

macro_rules! docker_or_skip {
    () => {
        if !require_docker(module_path!()) {
            return;
        }
    };
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The log as an auditor's `bridle audit query -o json` shows it.
fn query(cp: &ControlPlane, auditor: &str) -> Vec<serde_json::Value> {
    let out = cp
        .cli(
            auditor,
            &["audit", "query", "--limit", "1000", "-o", "json"],
        )
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

/// Entries are committed within one group commit of the answer.
async fn until_logged(
    cp: &ControlPlane,
    auditor: &str,
    check: impl Fn(&[serde_json::Value]) -> bool,
) {
    let start = Instant::now();
    loop {
        let entries = query(cp, auditor);
        if check(&entries) {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "not in the audit log: {entries:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn every_call_is_recorded_and_tampering_is_named() {
    docker_or_skip!();
    let mut cp = ControlPlane::start(&[]).await.unwrap();
    let alice = cp.token(pb::Role::Submitter, "alice").await.unwrap();
    let auditor = cp.token(pb::Role::Auditor, "audit-team").await.unwrap();

    // Calls: a good one, a refused one, one without a token, and a run with
    // a secret.
    let mut sb = cp.sandboxes(&alice).await.unwrap();
    sb.list(pb::ListSandboxesRequest::default()).await.unwrap();
    let missing = sb
        .get(pb::GetSandboxRequest {
            sandbox_id: "sb-nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);
    let mut anonymous = cp.sandboxes("").await.unwrap();
    anonymous
        .list(pb::ListSandboxesRequest::default())
        .await
        .unwrap_err();
    let secret = "audit-secret-value-0451";
    let dir = tempfile::tempdir().unwrap();
    let job = dir.path().join("job.yaml");
    std::fs::write(
        &job,
        "secrets: {TOKEN: {from_env: AUDIT_TEST_TOKEN}}\nsteps:\n  - run: echo \"$TOKEN\"\n",
    )
    .unwrap();
    // SAFETY: set before the CLI child is spawned; this test's own threads
    // do not read the environment.
    unsafe { std::env::set_var("AUDIT_TEST_TOKEN", secret) };
    let out = cp
        .cli(&alice, &["run", job.to_str().unwrap(), "--follow"])
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));

    until_logged(&cp, &auditor, |entries| {
        let has = |action: &str, who: &str, outcome: &str| {
            entries.iter().any(|e| {
                e["action"] == action
                    && e["principal"] == who
                    && e["outcome"].as_str().unwrap().starts_with(outcome)
            })
        };
        has("Sandboxes/List", "alice-role_submitter", "ok")
            && has("Sandboxes/Get", "alice-role_submitter", "NotFound")
            && has("Sandboxes/List", "", "Unauthenticated")
            && has("Runs/Submit", "alice-role_submitter", "ok")
            && has("Admin/CreateToken", "bootstrap-admin", "ok")
    })
    .await;

    // Pages of two, filtered, add up to the filtered whole, in order.
    let mut audit = cp.audit(&auditor).await.unwrap();
    let page = |token: String, size: u32| pb::QueryAuditRequest {
        action: "Sandboxes/".into(),
        page_size: size,
        page_token: token,
        ..Default::default()
    };
    let whole = audit
        .query(page(String::new(), 1000))
        .await
        .unwrap()
        .into_inner();
    assert!(whole.next_page_token.is_empty());
    assert!(whole.entries.len() >= 3, "{:?}", whole.entries);
    let (mut paged, mut token) = (Vec::new(), String::new());
    loop {
        let r = audit.query(page(token, 2)).await.unwrap().into_inner();
        assert!(r.entries.len() <= 2);
        paged.extend(r.entries.iter().map(|e| e.seq));
        if r.next_page_token.is_empty() {
            break;
        }
        token = r.next_page_token;
    }
    let all: Vec<u64> = whole.entries.iter().map(|e| e.seq).collect();
    assert!(
        whole
            .entries
            .iter()
            .all(|e| e.action.starts_with("Sandboxes/")),
        "{:?}",
        whole.entries
    );
    assert_eq!(paged, all);

    // Only auditors and admins read it.
    let out = cp.cli(&alice, &["audit", "query"]).unwrap();
    assert_eq!(out.status.code(), Some(4), "{}", text(&out.stderr));
    let out = cp.cli(&auditor, &["audit", "verify"]).unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).starts_with("ok: "),
        "{}",
        text(&out.stdout)
    );

    // An export verifies offline with the public key, and the secret is in
    // neither the export nor the store file.
    let out = cp.cli(&auditor, &["audit", "export"]).unwrap();
    assert!(out.status.success());
    let export = dir.path().join("audit.jsonl");
    std::fs::write(&export, &out.stdout).unwrap();
    assert!(!text(&out.stdout).contains(secret));
    let public = cp.data_dir().join("audit.pub");
    let offline = |file: &std::path::Path| {
        cp.cli(
            "",
            &[
                "audit",
                "verify",
                "--file",
                file.to_str().unwrap(),
                "--public-key",
                public.to_str().unwrap(),
            ],
        )
        .unwrap()
    };
    let out = offline(&export);
    assert!(out.status.success(), "{}", text(&out.stderr));
    // An edited export is named at the entry.
    let edited: Vec<String> = std::fs::read_to_string(&export)
        .unwrap()
        .lines()
        .map(|l| {
            if l.contains("\"seq\":2,") {
                l.replace("\"outcome\":\"ok\"", "\"outcome\":\"fine\"")
            } else {
                l.to_string()
            }
        })
        .collect();
    let tampered = dir.path().join("tampered.jsonl");
    std::fs::write(&tampered, edited.join("\n")).unwrap();
    let out = offline(&tampered);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("entry 2:"),
        "{}",
        text(&out.stderr)
    );

    // A graceful stop writes out what was queued, then says so last.
    cp.terminate().await.unwrap();
    let db = cp.data_dir().join("bridle.db");
    let last: Vec<serde_json::Value> = {
        use sqlx::ConnectOptions;
        let mut conn = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(&db)
            .connect()
            .await
            .unwrap();
        let bodies: Vec<(String,)> =
            sqlx::query_as("SELECT body FROM audit_log ORDER BY seq DESC LIMIT 10")
                .fetch_all(&mut conn)
                .await
                .unwrap();
        bodies
            .iter()
            .map(|(b,)| serde_json::from_str(b).unwrap())
            .collect()
    };
    assert_eq!(last[0]["action"], "control-plane.stop", "{last:#?}");
    assert!(
        last.iter().any(|e| e["action"] == "Audit/Export"),
        "the last call before the stop is on disk: {last:#?}"
    );

    // Tampering with the store file, the control plane stopped meanwhile.
    for f in ["bridle.db", "bridle.db-wal"] {
        let bytes = std::fs::read(cp.data_dir().join(f)).unwrap_or_default();
        assert!(
            !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "{f} holds the secret"
        );
    }
    edit_db(
        &db,
        "UPDATE audit_log SET body = replace(body, '\"ok\"', '\"fine\"') WHERE seq = 3",
    )
    .await;
    cp.restart().await.unwrap();
    let out = cp.cli(&auditor, &["audit", "verify"]).unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    let err = text(&out.stderr);
    assert!(err.contains("entry 3:") && err.contains("edited"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}

async fn edit_db(db: &std::path::Path, sql: &str) {
    use sqlx::ConnectOptions;
    let mut conn = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(db)
        .connect()
        .await
        .unwrap();
    sqlx::query(sql).execute(&mut conn).await.unwrap();
}

#[tokio::test]
async fn policy_sets_are_validated_versioned_kept_and_audited() {
    docker_or_skip!();
    let mut cp = ControlPlane::start(&[]).await.unwrap();
    let admin = cp.admin_token.clone();
    let alice = cp.token(pb::Role::Submitter, "alice").await.unwrap();
    let dir = tempfile::tempdir().unwrap();

    let out = cp.cli(&admin, &["policy", "get"]).unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("admins-may-do-anything"));
    assert!(
        text(&out.stderr).contains("version 1"),
        "{}",
        text(&out.stderr)
    );

    // A syntax error on line 3: named by validate and by set, nothing changes.
    let bad = dir.path().join("bad.cedar");
    std::fs::write(
        &bad,
        "permit (principal, action, resource);\n\npermit (principal action, resource);\n",
    )
    .unwrap();
    let out = cp
        .cli(&admin, &["policy", "validate", bad.to_str().unwrap()])
        .unwrap();
    assert_eq!(out.status.code(), Some(6));
    assert!(
        text(&out.stderr).contains("bad.cedar:3:"),
        "{}",
        text(&out.stderr)
    );
    let out = cp
        .cli(&admin, &["policy", "set", bad.to_str().unwrap()])
        .unwrap();
    assert_eq!(out.status.code(), Some(6), "{}", text(&out.stderr));
    assert_eq!(text(&out.stderr).lines().count(), 1);
    assert!(text(&out.stderr).contains("3:"), "{}", text(&out.stderr));

    // A valid set becomes version 2; a submitter can neither read nor set.
    let good = dir.path().join("good.cedar");
    std::fs::write(
        &good,
        "@id(\"admins\")\npermit (principal, action, resource) when { principal.role == \"admin\" };\n",
    )
    .unwrap();
    let out = cp
        .cli(&admin, &["policy", "set", good.to_str().unwrap()])
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "2");
    for args in [
        vec!["policy", "get"],
        vec!["policy", "set", good.to_str().unwrap()],
    ] {
        let out = cp.cli(&alice, &args).unwrap();
        assert_eq!(
            out.status.code(),
            Some(4),
            "{args:?}: {}",
            text(&out.stderr)
        );
    }
    // A change made against an old version is refused.
    let out = cp
        .cli(
            &admin,
            &[
                "policy",
                "set",
                good.to_str().unwrap(),
                "--expected-version",
                "1",
            ],
        )
        .unwrap();
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("version 2 is in force"),
        "{}",
        text(&out.stderr)
    );

    // Every change is on the record (entries are committed within one group
    // commit of the answer, so this waits before the SIGKILL below)...
    until_logged(&cp, &admin, |entries| {
        let sets: Vec<&str> = entries
            .iter()
            .filter(|e| e["action"] == "Admin/SetPolicy")
            .map(|e| e["outcome"].as_str().unwrap())
            .collect();
        sets.iter().filter(|o| **o == "ok").count() == 1
            && sets.iter().any(|o| o.starts_with("InvalidArgument"))
            && sets.iter().any(|o| o.starts_with("PermissionDenied"))
            && sets.iter().any(|o| o.starts_with("Aborted"))
    })
    .await;
    // ...and the set is kept across a restart.
    cp.restart().await.unwrap();
    let out = cp.cli(&admin, &["policy", "get", "-o", "json"]).unwrap();
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(got["version"], 2);
    assert!(got["source"].as_str().unwrap().contains("@id(\"admins\")"));
}

async fn eventually(what: &str, check: impl AsyncFnMut() -> bool) {
    bridle_tests::eventually(what, Duration::from_secs(60), check).await
}

#[tokio::test]
async fn a_policy_file_is_followed_and_a_bad_edit_is_refused() {
    docker_or_skip!();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("policies.cedar");
    let first = "@id(\"first\")\npermit (principal, action, resource) when { principal.role == \"admin\" };\n";
    std::fs::write(&file, first).unwrap();
    let mut cp = ControlPlane::start(&[&format!("policy_file={:?}", file.to_str().unwrap())])
        .await
        .unwrap();
    let admin = cp.admin_token.clone();
    let policy = |cp: &ControlPlane| {
        let out = cp.cli(&admin, &["policy", "get", "-o", "json"]).unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    eventually("the file is in force", async || policy(&cp)["version"] == 2).await;
    let p = policy(&cp);
    assert_eq!(p["source"], first);
    assert!(p["set_by"].as_str().unwrap().starts_with("file:"), "{p}");

    // An edit that does not validate is logged with its line and ignored.
    std::fs::write(
        &file,
        "@id(\"broken\")\npermit (principal action, resource);\n",
    )
    .unwrap();
    eventually("the bad edit is reported", async || {
        cp.log().contains("policy file not put in force")
    })
    .await;
    assert!(cp.log().contains("policies.cedar:2:"), "{}", cp.log());
    assert_eq!(policy(&cp)["version"], 2);

    // A good edit becomes the next version.
    let second = "@id(\"second\")\nforbid (principal, action, resource);\n";
    std::fs::write(&file, second).unwrap();
    eventually("the edit is in force", async || policy(&cp)["version"] == 3).await;
    assert_eq!(policy(&cp)["source"], second);

    // A restart with the same file makes no new version.
    cp.restart().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let p = policy(&cp);
    assert_eq!(
        (p["version"].clone(), p["source"].clone()),
        (3.into(), second.into())
    );
}

fn shell_step(name: &str, cmd: &str) -> pb::Step {
    pb::Step {
        name: name.into(),
        shell: cmd.into(),
        ..Default::default()
    }
}

fn job(key: &str, steps: Vec<pb::Step>) -> pb::SubmitRunRequest {
    pb::SubmitRunRequest {
        idempotency_key: key.into(),
        job: Some(pb::Job {
            steps,
            ..Default::default()
        }),
    }
}

/// Run `id` as `token` sees it.
async fn run_of(cp: &ControlPlane, token: &str, id: &str) -> pb::Run {
    cp.runs(token)
        .await
        .unwrap()
        .get(pb::GetRunRequest { run_id: id.into() })
        .await
        .unwrap()
        .into_inner()
}

/// Whether `s` is the refusal of a call the audit log cannot record.
fn unrecordable(s: &tonic::Status) -> bool {
    s.code() == tonic::Code::Unavailable
        && s.message().contains("the audit log cannot record")
        && s.message().contains("boom")
}

/// Whether deleting a sandbox that does not exist is refused for the audit
/// log (else it is NOT_FOUND, as usual).
async fn refused_for_the_audit_log(cp: &ControlPlane, token: &str) -> bool {
    let gone = pb::DeleteSandboxRequest {
        sandbox_id: "sb-nope".into(),
    };
    match cp.sandboxes(token).await.unwrap().delete(gone).await {
        Err(s) if unrecordable(&s) => true,
        Err(s) if s.code() == tonic::Code::NotFound => false,
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn an_audit_log_that_cannot_record_stops_what_would_go_unrecorded() {
    docker_or_skip!();
    let cp = ControlPlane::start(&["max_running_runs=1"]).await.unwrap();
    let alice = cp.token(pb::Role::Submitter, "alice").await.unwrap();
    let auditor = cp.token(pb::Role::Auditor, "audit-team").await.unwrap();
    let mut sb = cp.sandboxes(&alice).await.unwrap();
    let kept = bridle_tests::control::create(&mut sb).await.unwrap();
    let mut runs = cp.runs(&alice).await.unwrap();
    // One run holds the only slot with its second step still to be
    // decided; another waits for the slot.
    let first = runs
        .submit(job(
            "first",
            vec![
                shell_step("wait", "sleep 15"),
                shell_step("after", "echo after"),
            ],
        ))
        .await
        .unwrap()
        .into_inner();
    let queued = runs
        .submit(job("queued", vec![shell_step("never", "echo never")]))
        .await
        .unwrap()
        .into_inner();
    eventually("the first run's first step runs", async || {
        run_of(&cp, &alice, &first.id).await.steps[0].state == pb::StepState::Running as i32
    })
    .await;

    // The store stops taking audit entries; the next entry written fails.
    let db = cp.data_dir().join("bridle.db");
    edit_db(
        &db,
        "CREATE TRIGGER boom BEFORE INSERT ON audit_log BEGIN SELECT RAISE(ABORT, 'boom'); END",
    )
    .await;
    eventually("calls that change something are refused", async || {
        refused_for_the_audit_log(&cp, &alice).await
    })
    .await;
    let gone = |id: &str| pb::DeleteSandboxRequest {
        sandbox_id: id.into(),
    };

    // Before they act: nothing is created, deleted, run or submitted.
    let s = bridle_tests::control::create(&mut sb).await.unwrap_err();
    assert!(unrecordable(&s), "{s:?}");
    let s = sb.delete(gone(&kept.id)).await.unwrap_err();
    assert!(unrecordable(&s), "{s:?}");
    let s = bridle_tests::control::exec(
        &mut sb,
        &kept.id,
        bridle_tests::client::shell("touch /workspace/unrecorded"),
    )
    .await
    .unwrap_err();
    assert!(unrecordable(&s), "{s:?}");
    let s = runs
        .submit(job("refused", vec![shell_step("s", "true")]))
        .await
        .unwrap_err();
    assert!(unrecordable(&s), "{s:?}");
    // Reads go on.
    sb.get(pb::GetSandboxRequest {
        sandbox_id: kept.id.clone(),
    })
    .await
    .unwrap();
    let out = cp.cli(&auditor, &["audit", "verify"]).unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));

    // A cancel ends a run that nothing drives (it waits for the slot) at
    // once, in its answer.
    let cancelled = runs
        .cancel(pb::CancelRunRequest {
            run_id: queued.id.clone(),
            reason: "not now".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        cancelled.state,
        pb::RunState::Cancelled as i32,
        "{cancelled:?}"
    );
    assert_eq!(cancelled.reason, "not now");

    // The running run's next step cannot be put on the record: the run
    // fails saying so, instead of staying `running`.
    eventually("the first run ends", async || {
        run_of(&cp, &alice, &first.id).await.finished_unix_ms != 0
    })
    .await;
    let done = run_of(&cp, &alice, &first.id).await;
    assert_eq!(done.state, pb::RunState::Failed as i32, "{done:?}");
    assert!(
        done.reason.contains("step 2 (after) was not started")
            && done.reason.contains("the audit log cannot record")
            && done.reason.contains("boom"),
        "{}",
        done.reason
    );
    assert_eq!(done.steps[1].attempts, 0, "{done:?}");
    // The control plane said why, once, and kept what it could not record.
    let log = cp.log();
    // (Refused calls quote it too, in the entries logged as not recorded.)
    assert_eq!(
        log.lines()
            .filter(|l| l.contains("ERROR") && l.contains("the audit log cannot record: "))
            .count(),
        1,
        "{log}"
    );
    assert!(log.contains("audit: not recorded"), "{log}");

    // Once the store takes entries again, so does the log, and the first
    // entry it writes says what is missing.
    edit_db(&db, "DROP TRIGGER boom").await;
    eventually("calls go ahead again", async || {
        !refused_for_the_audit_log(&cp, &alice).await
    })
    .await;
    sb.delete(gone(&kept.id)).await.unwrap();
    until_logged(&cp, &auditor, |entries| {
        entries.iter().any(|e| {
            e["action"] == "audit.unrecorded"
                && e["outcome"]
                    .as_str()
                    .unwrap()
                    .contains("could not be recorded")
        }) && entries
            .iter()
            .any(|e| e["action"] == "Sandboxes/Delete" && e["outcome"] == "ok")
    })
    .await;
    let out = cp.cli(&auditor, &["audit", "verify"]).unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
}

#[tokio::test]
async fn a_restart_over_a_dropped_tail_is_refused_unless_told_to_continue() {
    docker_or_skip!();
    let mut cp = ControlPlane::start(&[]).await.unwrap();
    let auditor = cp.token(pb::Role::Auditor, "audit-team").await.unwrap();
    let mut sb = cp.sandboxes(&auditor).await.unwrap();
    for _ in 0..5 {
        sb.list(pb::ListSandboxesRequest::default()).await.unwrap();
    }
    cp.terminate().await.unwrap();

    // The last three entries go; the signed checkpoints that name them stay.
    let db = cp.data_dir().join("bridle.db");
    let last: i64 = {
        use sqlx::ConnectOptions;
        let mut conn = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(&db)
            .connect()
            .await
            .unwrap();
        let (last,): (i64,) = sqlx::query_as("SELECT MAX(seq) FROM audit_log")
            .fetch_one(&mut conn)
            .await
            .unwrap();
        last
    };
    edit_db(
        &db,
        &format!("DELETE FROM audit_log WHERE seq > {}", last - 3),
    )
    .await;

    // The control plane does not start, and says why and what to do.
    let e = format!("{:#}", cp.restart().await.unwrap_err());
    let dropped = format!("the log ends at entry {}: its tail was dropped", last - 3);
    for part in [
        "the audit log is damaged at entry",
        dropped.as_str(),
        "audit.continue_after_damage=true",
    ] {
        assert!(e.contains(part), "{part:?} not in: {e}");
    }

    // Told to, it continues after the damage, with the damage on record.
    cp.restart_with(&["audit.continue_after_damage=true"])
        .await
        .unwrap();
    let mut sb = cp.sandboxes(&auditor).await.unwrap();
    sb.list(pb::ListSandboxesRequest::default()).await.unwrap();
    until_logged(&cp, &auditor, |entries| {
        entries.iter().any(|e| {
            e["action"] == "audit.damage"
                && e["outcome"]
                    .as_str()
                    .unwrap()
                    .contains("its tail was dropped")
        })
    })
    .await;
    // Verifying the whole log goes on naming the damage.
    let out = cp.cli(&auditor, &["audit", "verify"]).unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));

    // The next start needs no flag (the tail it continues from verifies)
    // and records no new damage.
    cp.restart().await.unwrap();
    let damage = query(&cp, &auditor)
        .iter()
        .filter(|e| e["action"] == "audit.damage")
        .count();
    assert_eq!(damage, 1);
}
