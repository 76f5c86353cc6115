//! The audit log end to end: every call recorded with who made it and how it
//! ended, readable by auditors only, verifiable online and offline, and
//! tampering with the store file found and named. Policy changes too: each
//! is in force for the very next call, and that call's decision names it.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::time::{Duration, Instant};

use bridle_proto::control::v1 as pb;
use bridle_proto::sandbox::v1 as agent_pb;
use bridle_tests::control::cli;
use bridle_tests::control::ControlPlane;
use bridle_tests::docker::require_docker;
use bridle_tests::{bounded, PATIENCE};

macro_rules! needs_docker {
    () => {
        require_docker(module_path!())
    };
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The log as an auditor's `bridle audit query -o json` shows it.
async fn query(cp: &ControlPlane, auditor: &str) -> Vec<serde_json::Value> {
    let out = cli(
        cp,
        auditor,
        &["audit", "query", "--limit", "1000", "-o", "json"],
    )
    .await;
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
        let entries = query(cp, auditor).await;
        if check(&entries) {
            return;
        }
        assert!(
            start.elapsed() < PATIENCE,
            "not in the audit log: {entries:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn every_call_is_recorded_and_tampering_is_named() {
    needs_docker!();
    let mut cp = ControlPlane::start(&[]).await.unwrap();
    let alice = cp.token(pb::Role::Submitter, "alice").await.unwrap();
    let auditor = cp.token(pb::Role::Auditor, "audit-team").await.unwrap();

    // Calls: a good one, a refused one, one without a token, and a run with
    // a secret.
    let mut sb = cp.sandboxes(&alice).await.unwrap();
    bounded(
        "Sandboxes/List",
        sb.list(pb::ListSandboxesRequest::default()),
    )
    .await
    .unwrap();
    let missing = bounded(
        "Sandboxes/Get",
        sb.get(pb::GetSandboxRequest {
            sandbox_id: "sb-nope".into(),
        }),
    )
    .await
    .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);
    let mut anonymous = cp.sandboxes("").await.unwrap();
    bounded(
        "Sandboxes/List without a token",
        anonymous.list(pb::ListSandboxesRequest::default()),
    )
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
    let out = cli(&cp, &alice, &["run", job.to_str().unwrap(), "--follow"]).await;
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
    let whole = bounded("Audit/Query", audit.query(page(String::new(), 1000)))
        .await
        .unwrap()
        .into_inner();
    assert!(whole.next_page_token.is_empty());
    assert!(whole.entries.len() >= 3, "{:?}", whole.entries);
    let (mut paged, mut token) = (Vec::new(), String::new());
    loop {
        let r = bounded("Audit/Query, a page", audit.query(page(token, 2)))
            .await
            .unwrap()
            .into_inner();
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
    let out = cli(&cp, &alice, &["audit", "query"]).await;
    assert_eq!(out.status.code(), Some(4), "{}", text(&out.stderr));
    let out = cli(&cp, &auditor, &["audit", "verify"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).starts_with("ok: "),
        "{}",
        text(&out.stdout)
    );

    // An export verifies offline with the public key, and the secret is in
    // neither the export nor the store file.
    let out = cli(&cp, &auditor, &["audit", "export"]).await;
    assert!(out.status.success());
    let export = dir.path().join("audit.jsonl");
    std::fs::write(&export, &out.stdout).unwrap();
    assert!(!text(&out.stdout).contains(secret));
    let public = cp.data_dir().join("audit.pub");
    let public = public.to_str().unwrap();
    let export_path = export.to_str().unwrap();
    let out = cli(
        &cp,
        "",
        &[
            "audit",
            "verify",
            "--file",
            export_path,
            "--public-key",
            public,
        ],
    )
    .await;
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
    let tampered_path = tampered.to_str().unwrap();
    let out = cli(
        &cp,
        "",
        &[
            "audit",
            "verify",
            "--file",
            tampered_path,
            "--public-key",
            public,
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("entry 2:"),
        "{}",
        text(&out.stderr)
    );

    // A graceful stop writes out what was queued, then says so last.
    bounded("the control plane's graceful stop", cp.terminate())
        .await
        .unwrap();
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
    let out = cli(&cp, &auditor, &["audit", "verify"]).await;
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
    needs_docker!();
    let mut cp = ControlPlane::start(&[]).await.unwrap();
    let admin = cp.admin_token.clone();
    let alice = cp.token(pb::Role::Submitter, "alice").await.unwrap();
    let dir = tempfile::tempdir().unwrap();

    let out = cli(&cp, &admin, &["policy", "get"]).await;
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
    let out = cli(&cp, &admin, &["policy", "validate", bad.to_str().unwrap()]).await;
    assert_eq!(out.status.code(), Some(6));
    assert!(
        text(&out.stderr).contains("bad.cedar:3:"),
        "{}",
        text(&out.stderr)
    );
    let out = cli(&cp, &admin, &["policy", "set", bad.to_str().unwrap()]).await;
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
    let out = cli(&cp, &admin, &["policy", "set", good.to_str().unwrap()]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "2");
    for args in [
        vec!["policy", "get"],
        vec!["policy", "set", good.to_str().unwrap()],
    ] {
        let out = cli(&cp, &alice, &args).await;
        assert_eq!(
            out.status.code(),
            Some(4),
            "{args:?}: {}",
            text(&out.stderr)
        );
    }
    // A change made against an old version is refused.
    let out = cli(
        &cp,
        &admin,
        &[
            "policy",
            "set",
            good.to_str().unwrap(),
            "--expected-version",
            "1",
        ],
    )
    .await;
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
    let out = cli(&cp, &admin, &["policy", "get", "-o", "json"]).await;
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(got["version"], 2);
    assert!(got["source"].as_str().unwrap().contains("@id(\"admins\")"));
}

async fn eventually(what: &str, check: impl AsyncFnMut() -> bool) {
    bridle_tests::eventually(what, PATIENCE, check).await
}

/// The policy set in force, as Admin.GetPolicy answers it.
async fn policy_of(cp: &ControlPlane) -> pb::PolicyInfo {
    let mut admin = cp.admin(&cp.admin_token).await.unwrap();
    bounded("Admin/GetPolicy", admin.get_policy(pb::GetPolicyRequest {}))
        .await
        .unwrap()
        .into_inner()
}

/// Replaces `path` with `text` in one step (a new file renamed over it), so
/// a follower reads the old content or the new, never half of it.
fn write_whole(path: &std::path::Path, text: &str) {
    let next = path.with_extension("next");
    std::fs::write(&next, text).unwrap();
    std::fs::rename(&next, path).unwrap();
}

#[tokio::test]
async fn a_policy_file_is_followed_and_a_bad_edit_is_refused() {
    needs_docker!();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("policies.cedar");
    let first = "@id(\"first\")\npermit (principal, action, resource) when { principal.role == \"admin\" };\n";
    write_whole(&file, first);
    let mut cp = ControlPlane::start(&[&format!("policy_file={:?}", file.to_str().unwrap())])
        .await
        .unwrap();
    eventually("the file is in force", async || {
        policy_of(&cp).await.version == 2
    })
    .await;
    let p = policy_of(&cp).await;
    assert_eq!(p.source, first);
    assert!(p.set_by.starts_with("file:"), "{p:?}");

    // An edit that does not validate is logged with its line and ignored.
    write_whole(
        &file,
        "@id(\"broken\")\npermit (principal action, resource);\n",
    );
    eventually("the bad edit is reported", async || {
        cp.log().contains("policy file not put in force")
    })
    .await;
    assert!(cp.log().contains("policies.cedar:2:"), "{}", cp.log());
    assert_eq!(policy_of(&cp).await.version, 2);

    // A good edit becomes the next version.
    let second = "@id(\"second\")\nforbid (principal, action, resource);\n";
    write_whole(&file, second);
    eventually("the edit is in force", async || {
        policy_of(&cp).await.version == 3
    })
    .await;
    assert_eq!(policy_of(&cp).await.source, second);

    // A restart with the same file makes no new version: once the restarted
    // control plane has read the file (it says so), the version stands.
    let read = "policy file read; it is the set in force";
    let before = cp.log().matches(read).count();
    cp.restart().await.unwrap();
    eventually(
        "the restarted control plane read the policy file",
        async || cp.log().matches(read).count() > before,
    )
    .await;
    let p = policy_of(&cp).await;
    assert_eq!((p.version, p.source.as_str()), (3, second));
}

/// A policy set that lets admins do anything (policy changes included) and
/// the submitters of an owner create sandboxes in it, exec, write files and
/// submit runs there.
const PERMIT: &str = r#"@id("admins")
permit (principal, action, resource) when { principal.role == "admin" };

@id("tenants")
permit (
  principal,
  action in [
    Bridle::Action::"sandbox.create",
    Bridle::Action::"exec",
    Bridle::Action::"file.write",
    Bridle::Action::"run.submit"
  ],
  resource
)
when { principal.role == "submitter" && resource.owner == principal.owner };
"#;

/// Added to [`PERMIT`]: alice may no longer exec or write (a run's steps
/// are execs), whatever else permits it.
const FORBID_ALICE: &str = r#"
@id("alice-may-not-exec-or-write")
forbid (
  principal,
  action in [Bridle::Action::"exec", Bridle::Action::"file.write"],
  resource
)
when { principal.owner == "alice" };
"#;

/// How a policy change is made.
enum Change<'a> {
    /// Admin.SetPolicy: in force when it answers.
    SetPolicy,
    /// An edit of the policy file the control plane follows: in force once
    /// Admin.GetPolicy reports it.
    File(&'a std::path::Path),
}

/// Puts `source` in force `how` and answers its version. The caller's next
/// call follows at once: no sleep after the change.
async fn put_in_force(cp: &ControlPlane, how: &Change<'_>, source: &str) -> u64 {
    let mut admin = cp.admin(&cp.admin_token).await.unwrap();
    match how {
        Change::SetPolicy => {
            let set = pb::SetPolicyRequest {
                source: source.into(),
                expected_version: 0,
            };
            bounded("Admin/SetPolicy", admin.set_policy(set))
                .await
                .unwrap()
                .into_inner()
                .version
        }
        Change::File(path) => {
            write_whole(path, source);
            let deadline = Instant::now() + PATIENCE;
            loop {
                let p = bounded("Admin/GetPolicy", admin.get_policy(pb::GetPolicyRequest {}))
                    .await
                    .unwrap()
                    .into_inner();
                if p.source == source {
                    return p.version;
                }
                assert!(
                    Instant::now() < deadline,
                    "the policy file's edit was never put in force (version {} is)\n{}",
                    p.version,
                    cp.log()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// The request id the control plane gave a call (`x-request-id`).
fn request_id(metadata: &tonic::metadata::MetadataMap) -> String {
    metadata
        .get("x-request-id")
        .expect("every answer carries its request id")
        .to_str()
        .unwrap()
        .to_string()
}

/// The audit entry of the call answered with `request_id` (an `action`
/// call), once committed (within one group commit of the answer).
async fn entry_of(cp: &ControlPlane, action: &str, request_id: &str) -> pb::AuditEntry {
    let mut audit = cp.audit(&cp.admin_token).await.unwrap();
    let deadline = Instant::now() + PATIENCE;
    loop {
        let entries = bounded(
            "Audit/Query",
            audit.query(pb::QueryAuditRequest {
                action: action.into(),
                page_size: 1000,
                ..Default::default()
            }),
        )
        .await
        .unwrap()
        .into_inner()
        .entries;
        if let Some(e) = entries.into_iter().find(|e| e.request_id == request_id) {
            return e;
        }
        assert!(
            Instant::now() < deadline,
            "no audit entry for {action} request {request_id}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The audit entry of the policy decision on the one step of run `run_id`.
async fn step_decision_of(cp: &ControlPlane, run_id: &str) -> pb::AuditEntry {
    let mut audit = cp.audit(&cp.admin_token).await.unwrap();
    let deadline = Instant::now() + PATIENCE;
    loop {
        let entries = bounded(
            "Audit/Query",
            audit.query(pb::QueryAuditRequest {
                run_id: run_id.into(),
                page_size: 1000,
                ..Default::default()
            }),
        )
        .await
        .unwrap()
        .into_inner()
        .entries;
        let decisions: Vec<pb::AuditEntry> = entries
            .into_iter()
            .filter(|e| e.action == "run/exec")
            .collect();
        assert!(decisions.len() <= 1, "{decisions:#?}");
        if let Some(e) = decisions.into_iter().next() {
            return e;
        }
        assert!(
            Instant::now() < deadline,
            "no audit entry for the step of run {run_id}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Checks that `refused` (`what`) is the refusal of the forbid in
/// [`FORBID_ALICE`] as policy version `version` decided it.
fn assert_refused_by(refused: &tonic::Status, version: u64, what: &str) {
    assert_eq!(
        refused.code(),
        tonic::Code::PermissionDenied,
        "{what}: {refused:?}"
    );
    assert!(
        refused.message().contains("alice-may-not-exec-or-write")
            && refused
                .message()
                .contains(&format!("(policy version {version})")),
        "{what}: the refusal does not name the forbid and version {version}: {refused:?}"
    );
}

fn exec_request(sandbox: &str, cmd: &str) -> pb::ExecRequest {
    bridle_tests::control::start_request(sandbox, bridle_tests::client::shell(cmd), false)
}

fn write_requests(sandbox: &str, path: &str) -> Vec<pb::WriteFileRequest> {
    vec![
        pb::WriteFileRequest {
            request: Some(pb::write_file_request::Request::Header(
                pb::WriteFileHeader {
                    sandbox_id: sandbox.into(),
                    file: Some(agent_pb::WriteFileHeader {
                        path: path.into(),
                        ..Default::default()
                    }),
                },
            )),
        },
        pb::WriteFileRequest {
            request: Some(pb::write_file_request::Request::Data(
                bytes::Bytes::from_static(b"live\n"),
            )),
        },
    ]
}

/// Runs a one-step job as `runs`' token to its end and answers the run.
async fn run_one_step(runs: &mut bridle_tests::control::Runs, key: &str) -> pb::Run {
    let run = bounded(
        "Runs/Submit",
        runs.submit(job(key, vec![shell_step("step", "echo ran")])),
    )
    .await
    .unwrap()
    .into_inner();
    let deadline = Instant::now() + PATIENCE;
    loop {
        let r = bounded(
            "Runs/Get",
            runs.get(pb::GetRunRequest {
                run_id: run.id.clone(),
            }),
        )
        .await
        .unwrap()
        .into_inner();
        if r.finished_unix_ms != 0 {
            return r;
        }
        assert!(Instant::now() < deadline, "run {key} never ended: {r:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Flips the policy in force between a set that forbids alice's execs and
/// writes and one that permits them, `how`, and shows that the first call
/// after each change is decided by the new version: an exec, a file write
/// and a run's step, each refused naming the new version right after the
/// change to the forbid, and allowed, its audit entry naming the new
/// version, right after the change back.
async fn each_change_decides_the_next_call(cp: &ControlPlane, how: Change<'_>) {
    let forbid = format!("{PERMIT}{FORBID_ALICE}");
    put_in_force(cp, &how, PERMIT).await;
    let alice = cp.token(pb::Role::Submitter, "alice").await.unwrap();
    let mut sb = cp.sandboxes(&alice).await.unwrap();
    let mut runs = cp.runs(&alice).await.unwrap();
    let sandbox = bridle_tests::control::create(&mut sb).await.unwrap().id;

    // An exec.
    let v = put_in_force(cp, &how, &forbid).await;
    let exec = sb.exec(futures::stream::iter([exec_request(&sandbox, "echo live")]));
    match bounded("Sandboxes/Exec", exec).await {
        Err(refused) => assert_refused_by(&refused, v, "an exec"),
        Ok(_) => panic!("an exec went ahead right after version {v} forbade it"),
    }
    let v = put_in_force(cp, &how, PERMIT).await;
    let exec = sb.exec(futures::stream::iter([exec_request(&sandbox, "echo live")]));
    let opened = match bounded("Sandboxes/Exec", exec).await {
        Ok(opened) => opened,
        Err(s) => panic!("an exec was refused right after version {v} permitted it: {s:?}"),
    };
    let id = request_id(opened.metadata());
    let out = bounded(
        "the exec's output",
        bridle_tests::client::collect(opened.into_inner()),
    )
    .await
    .unwrap();
    assert_eq!((out.stdout_str().as_str(), out.code()), ("live\n", Some(0)));
    let e = entry_of(cp, "Sandboxes/Exec", &id).await;
    assert_eq!(
        (e.decision.as_str(), e.policy_version),
        ("allow", v),
        "{e:?}"
    );

    // A file write.
    let v = put_in_force(cp, &how, &forbid).await;
    let write = sb.write_file(futures::stream::iter(write_requests(&sandbox, "live.txt")));
    match bounded("Sandboxes/WriteFile", write).await {
        Err(refused) => assert_refused_by(&refused, v, "a write"),
        Ok(_) => panic!("a write went ahead right after version {v} forbade it"),
    }
    let v = put_in_force(cp, &how, PERMIT).await;
    let write = sb.write_file(futures::stream::iter(write_requests(&sandbox, "live.txt")));
    let written = match bounded("Sandboxes/WriteFile", write).await {
        Ok(written) => written,
        Err(s) => panic!("a write was refused right after version {v} permitted it: {s:?}"),
    };
    let e = entry_of(cp, "Sandboxes/WriteFile", &request_id(written.metadata())).await;
    assert_eq!(
        (e.decision.as_str(), e.policy_version),
        ("allow", v),
        "{e:?}"
    );

    // A run's step (decided when the step is about to start).
    let v = put_in_force(cp, &how, &forbid).await;
    let done = run_one_step(&mut runs, &format!("forbidden-{v}")).await;
    assert_eq!(done.state, pb::RunState::Failed as i32, "{done:?}");
    assert_eq!(
        done.steps[0].attempts, 0,
        "the step never started: {done:?}"
    );
    assert!(
        done.reason.contains("is denied")
            && done.reason.contains("alice-may-not-exec-or-write")
            && done.reason.contains(&format!("(policy version {v})")),
        "the run's end does not name the forbid and version {v}: {}",
        done.reason
    );
    let e = step_decision_of(cp, &done.id).await;
    assert_eq!(
        (e.decision.as_str(), e.policy_version),
        ("deny", v),
        "{e:?}"
    );
    let v = put_in_force(cp, &how, PERMIT).await;
    let done = run_one_step(&mut runs, &format!("permitted-{v}")).await;
    assert_eq!(done.state, pb::RunState::Succeeded as i32, "{done:?}");
    let e = step_decision_of(cp, &done.id).await;
    assert_eq!(
        (e.decision.as_str(), e.policy_version),
        ("allow", v),
        "{e:?}"
    );
}

/// Admin.SetPolicy is in force for the call right after it answers: an
/// exec, a write and a run's step are refused, then allowed, each naming
/// the version that decided it.
#[tokio::test]
async fn set_policy_decides_the_very_next_exec_write_and_run_step() {
    needs_docker!();
    let cp = ControlPlane::start(&[]).await.unwrap();
    each_change_decides_the_next_call(&cp, Change::SetPolicy).await;
}

/// An edit of the followed policy file is in force for the first call after
/// Admin.GetPolicy reports it: an exec, a write and a run's step are
/// refused, then allowed, each naming the version that decided it.
#[tokio::test]
async fn a_policy_file_edit_decides_the_next_exec_write_and_run_step() {
    needs_docker!();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("policies.cedar");
    write_whole(&file, PERMIT);
    let cp = ControlPlane::start(&[&format!("policy_file={:?}", file.to_str().unwrap())])
        .await
        .unwrap();
    each_change_decides_the_next_call(&cp, Change::File(&file)).await;
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
        agent: None,
    }
}

/// Run `id` as `token` sees it.
async fn run_of(cp: &ControlPlane, token: &str, id: &str) -> pb::Run {
    let mut runs = cp.runs(token).await.unwrap();
    bounded(
        "Runs/Get",
        runs.get(pb::GetRunRequest { run_id: id.into() }),
    )
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
    let mut sandboxes = cp.sandboxes(token).await.unwrap();
    match bounded("Sandboxes/Delete", sandboxes.delete(gone)).await {
        Err(s) if unrecordable(&s) => true,
        Err(s) if s.code() == tonic::Code::NotFound => false,
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn an_audit_log_that_cannot_record_stops_what_would_go_unrecorded() {
    needs_docker!();
    let cp = ControlPlane::start(&["max_running_runs=1"]).await.unwrap();
    let alice = cp.token(pb::Role::Submitter, "alice").await.unwrap();
    let auditor = cp.token(pb::Role::Auditor, "audit-team").await.unwrap();
    let mut sb = cp.sandboxes(&alice).await.unwrap();
    let kept = bridle_tests::control::create(&mut sb).await.unwrap();
    let mut runs = cp.runs(&alice).await.unwrap();
    // One run holds the only slot with its second step still to be
    // decided; another waits for the slot.
    let first = bounded(
        "Runs/Submit",
        runs.submit(job(
            "first",
            vec![
                shell_step("wait", "sleep 15"),
                shell_step("after", "echo after"),
            ],
        )),
    )
    .await
    .unwrap()
    .into_inner();
    let queued = bounded(
        "Runs/Submit",
        runs.submit(job("queued", vec![shell_step("never", "echo never")])),
    )
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
    let s = bounded("Sandboxes/Delete", sb.delete(gone(&kept.id)))
        .await
        .unwrap_err();
    assert!(unrecordable(&s), "{s:?}");
    let s = bounded(
        "Sandboxes/Exec",
        bridle_tests::control::exec(
            &mut sb,
            &kept.id,
            bridle_tests::client::shell("touch /workspace/unrecorded"),
        ),
    )
    .await
    .unwrap_err();
    assert!(unrecordable(&s), "{s:?}");
    let s = bounded(
        "Runs/Submit",
        runs.submit(job("refused", vec![shell_step("s", "true")])),
    )
    .await
    .unwrap_err();
    assert!(unrecordable(&s), "{s:?}");
    // Reads go on.
    bounded(
        "Sandboxes/Get",
        sb.get(pb::GetSandboxRequest {
            sandbox_id: kept.id.clone(),
        }),
    )
    .await
    .unwrap();
    let out = cli(&cp, &auditor, &["audit", "verify"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));

    // A cancel ends a run that nothing drives (it waits for the slot) at
    // once, in its answer.
    let cancelled = bounded(
        "Runs/Cancel",
        runs.cancel(pb::CancelRunRequest {
            run_id: queued.id.clone(),
            reason: "not now".into(),
        }),
    )
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
    bounded("Sandboxes/Delete", sb.delete(gone(&kept.id)))
        .await
        .unwrap();
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
    let out = cli(&cp, &auditor, &["audit", "verify"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
}

#[tokio::test]
async fn a_restart_over_a_dropped_tail_is_refused_unless_told_to_continue() {
    needs_docker!();
    let mut cp = ControlPlane::start(&[]).await.unwrap();
    let auditor = cp.token(pb::Role::Auditor, "audit-team").await.unwrap();
    let mut sb = cp.sandboxes(&auditor).await.unwrap();
    for _ in 0..5 {
        bounded(
            "Sandboxes/List",
            sb.list(pb::ListSandboxesRequest::default()),
        )
        .await
        .unwrap();
    }
    bounded("the control plane's graceful stop", cp.terminate())
        .await
        .unwrap();

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
    bounded(
        "Sandboxes/List",
        sb.list(pb::ListSandboxesRequest::default()),
    )
    .await
    .unwrap();
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
    let out = cli(&cp, &auditor, &["audit", "verify"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));

    // The next start needs no flag (the tail it continues from verifies)
    // and records no new damage.
    cp.restart().await.unwrap();
    let damage = query(&cp, &auditor)
        .await
        .iter()
        .filter(|e| e["action"] == "audit.damage")
        .count();
    assert_eq!(damage, 1);
}
