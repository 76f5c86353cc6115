//! Who may do what, end to end: every RPC of every service refuses a call
//! without a valid token; one tenant never sees or touches another's
//! sandboxes, runs or approvals; and the limits that keep one tenant from
//! taking the host (sandboxes per owner, container creates at once, networks)
//! hold, also against requests sent at once. The real `control-plane` binary
//! and real containers on the real Docker daemon.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use bridle_proto::control::v1 as pb;
use bridle_proto::sandbox::v1 as agent_pb;
use bridle_tests::client::{shell, start};
use bridle_tests::control::{self, Admin, ControlPlane, Runs, Sandboxes};
use bridle_tests::docker::require_docker;
use bridle_tests::PATIENCE;
use prost::Message;
use prost_types::FileDescriptorSet;
use tonic::{Code, Status};

macro_rules! needs_docker {
    () => {
        require_docker(module_path!())
    };
}

/// The trailer naming the approval a refused unary call created.
const APPROVAL_ID: &str = "x-bridle-approval-id";

async fn eventually(what: &str, check: impl AsyncFnMut() -> bool) {
    bridle_tests::eventually(what, PATIENCE, check).await
}

// ------------------------------------------------------------ authentication

#[tokio::test]
async fn every_rpc_refuses_a_missing_bad_revoked_or_expired_token() {
    needs_docker!();
    let mut cp = ControlPlane::start(&[]).await.unwrap();
    let mut admin = cp.admin(&cp.admin_token).await.unwrap();
    let revoked = new_token(&mut admin, "gone", 0).await;
    admin
        .revoke_token(pb::RevokeTokenRequest {
            token_id: revoked.id.clone(),
        })
        .await
        .unwrap();
    let expired = new_token(&mut admin, "brief", 1).await;
    wait_until_expired(&cp, &expired.secret).await;
    let live = new_token(&mut admin, "live", 0).await;

    // Forged: a made-up secret for the bootstrap admin's id, and the admin's
    // own token with the last character of its secret changed.
    let (admin_id, _) = token_parts(&cp.admin_token);
    let forged = format!("bridle_{admin_id}_{}", "0".repeat(64));
    let mut near_miss = cp.admin_token.clone();
    let last = near_miss.pop().unwrap();
    near_miss.push(if last == '0' { '1' } else { '0' });
    let bad = [
        ("no token", String::new(), "missing authorization"),
        ("garbage", "garbage".to_string(), "invalid token"),
        ("a forged secret", forged, "invalid token"),
        ("one changed character", near_miss, "invalid token"),
        ("a revoked token", revoked.secret.clone(), "token revoked"),
        ("an expired token", expired.secret.clone(), "token expired"),
    ];
    let every_rpc = control_plane_rpcs();
    for (what, token, says) in &bad {
        let answers = call_every_rpc(&cp, token).await;
        let called: BTreeSet<String> = answers.iter().map(|(rpc, _)| rpc.to_string()).collect();
        assert_eq!(
            called, every_rpc,
            "call_every_rpc must call exactly the RPCs the services define: add the new ones"
        );
        for (rpc, answer) in answers {
            let e = answer
                .err()
                .unwrap_or_else(|| panic!("{rpc} with {what} was answered"));
            assert_eq!(e.code(), Code::Unauthenticated, "{rpc} with {what}: {e:?}");
            assert!(e.message().contains(*says), "{rpc} with {what}: {e:?}");
        }
    }
    assert!(cp.containers().is_empty(), "{:?}", cp.containers());

    // Only sha256 of a token is stored: neither the token nor its secret, in
    // any encoding, is in the store's files or the log, while the control
    // plane runs (the WAL may hold pages a checkpoint would drop) nor after
    // a graceful stop.
    let tokens = [
        cp.admin_token.clone(),
        revoked.secret,
        expired.secret,
        live.secret.clone(),
    ];
    wait_until_audited(&cp, &live.secret, "live").await;
    let leaks = token_leaks(&cp, &tokens);
    assert!(leaks.is_empty(), "{leaks:#?}");
    let stopped = cp.terminate().await.unwrap();
    assert!(stopped.success(), "{stopped:?}: {}", cp.log());
    let leaks = token_leaks(&cp, &tokens);
    assert!(leaks.is_empty(), "after the stop: {leaks:#?}");
}

/// A token made through `Admin.CreateToken`.
struct Token {
    id: String,
    secret: String,
}

/// A new admin token named (and owned by) `name`; `ttl_seconds` 0: no expiry.
async fn new_token(admin: &mut Admin, name: &str, ttl_seconds: u64) -> Token {
    let made = admin
        .create_token(pb::CreateTokenRequest {
            name: name.into(),
            role: pb::Role::Admin as i32,
            owner: name.into(),
            ttl_seconds,
        })
        .await
        .unwrap()
        .into_inner();
    Token {
        id: made.token.unwrap().id,
        secret: made.secret,
    }
}

/// Polls `WhoAmI` with `token` until it is refused, which must be for its
/// expiry.
async fn wait_until_expired(cp: &ControlPlane, token: &str) {
    let mut admin = cp.admin(token).await.unwrap();
    let began = Instant::now();
    loop {
        if let Err(e) = admin.who_am_i(pb::WhoAmIRequest {}).await {
            assert_eq!(
                (e.code(), e.message()),
                (Code::Unauthenticated, "token expired"),
                "{e:?}"
            );
            return;
        }
        assert!(
            began.elapsed() < PATIENCE,
            "a token with a lifetime of 1 s was still accepted after {PATIENCE:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Makes a call with `token` (named `name`) and waits until the audit log
/// has its entry: the log commits in order, so every entry of an earlier
/// call is in the store by then.
async fn wait_until_audited(cp: &ControlPlane, token: &str, name: &str) {
    let mut own = cp.admin(token).await.unwrap();
    own.who_am_i(pb::WhoAmIRequest {}).await.unwrap();
    let mut audit = cp.audit(&cp.admin_token).await.unwrap();
    let began = Instant::now();
    loop {
        let entries = audit
            .query(pb::QueryAuditRequest {
                principal: name.into(),
                action: "Admin/WhoAmI".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .entries;
        if !entries.is_empty() {
            return;
        }
        assert!(
            began.elapsed() < PATIENCE,
            "the audit entry of {name}'s call was never committed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A token's id and secret (`bridle_<id>_<secret>`).
fn token_parts(token: &str) -> (&str, &str) {
    token
        .strip_prefix("bridle_")
        .and_then(|rest| rest.split_once('_'))
        .expect("a token reads bridle_<id>_<secret>")
}

/// What of `tokens` the files of the data directory (but the bootstrap
/// token's own) and the control plane's log hold: each token whole, and its
/// secret as hex (both cases), as bytes and in base64, and the token in
/// base64.
fn token_leaks(cp: &ControlPlane, tokens: &[String]) -> Vec<String> {
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    for entry in std::fs::read_dir(cp.data_dir()).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == bridle_client::data_dir::BOOTSTRAP_TOKEN_FILE || !entry.path().is_file() {
            continue;
        }
        // The WAL and the shared memory file go at a stop.
        if let Ok(bytes) = std::fs::read(entry.path()) {
            files.push((name, bytes));
        }
    }
    assert!(
        files.iter().any(|(name, _)| name == "bridle.db"),
        "the store is in {}",
        cp.data_dir().display()
    );
    files.push(("the log".to_string(), cp.log().into_bytes()));
    let mut leaks = Vec::new();
    for token in tokens {
        let (id, secret) = token_parts(token);
        let raw = hex::decode(secret).unwrap();
        let forms: [(&str, Vec<u8>); 7] = [
            ("the token", token.as_bytes().to_vec()),
            ("the secret", secret.as_bytes().to_vec()),
            (
                "the secret in upper case",
                secret.to_ascii_uppercase().into_bytes(),
            ),
            ("the secret's bytes", raw.clone()),
            ("the secret in base64", STANDARD.encode(&raw).into_bytes()),
            (
                "the secret in url-safe base64",
                URL_SAFE_NO_PAD.encode(&raw).into_bytes(),
            ),
            (
                "the token in base64",
                STANDARD.encode(token.as_bytes()).into_bytes(),
            ),
        ];
        for (form, needle) in &forms {
            for (file, bytes) in &files {
                if bytes.windows(needle.len()).any(|w| w == needle.as_slice()) {
                    leaks.push(format!("{file} holds {form} of token {id}"));
                }
            }
        }
    }
    leaks
}

/// Every RPC of the control plane's services (`Service/Method`), from the
/// descriptor set compiled from the .proto files: an RPC added there shows
/// up here whether or not a test calls it.
fn control_plane_rpcs() -> BTreeSet<String> {
    let set = FileDescriptorSet::decode(bridle_proto::FILE_DESCRIPTOR_SET)
        .expect("the compiled descriptor set decodes");
    set.file
        .iter()
        .filter(|f| f.package() == "bridle.control.v1")
        .flat_map(|f| &f.service)
        .flat_map(|s| {
            s.method
                .iter()
                .map(move |m| format!("{}/{}", s.name(), m.name()))
        })
        .collect()
}

type Answers = Vec<(&'static str, Result<(), Status>)>;

/// Calls every RPC of the control plane's services with `token` (empty: no
/// `authorization` header), with requests that would do something were the
/// call let through; answers how each ended, by `Service/Method`.
async fn call_every_rpc(cp: &ControlPlane, token: &str) -> Answers {
    let mut s = cp.sandboxes(token).await.unwrap();
    let mut ad = cp.admin(token).await.unwrap();
    let mut r = cp.runs(token).await.unwrap();
    let mut au = cp.audit(token).await.unwrap();
    let mut ap = cp.approvals(token).await.unwrap();
    let sid = || "sb-000000000000".to_string();
    let rid = || "run-0000000000000000".to_string();
    let aid = || "ap-0000000000000000".to_string();
    vec![
        (
            "Sandboxes/Create",
            s.create(pb::CreateSandboxRequest::default())
                .await
                .map(drop),
        ),
        (
            "Sandboxes/Get",
            s.get(pb::GetSandboxRequest { sandbox_id: sid() })
                .await
                .map(drop),
        ),
        (
            "Sandboxes/List",
            s.list(pb::ListSandboxesRequest::default()).await.map(drop),
        ),
        (
            "Sandboxes/Delete",
            s.delete(pb::DeleteSandboxRequest { sandbox_id: sid() })
                .await
                .map(drop),
        ),
        (
            "Sandboxes/Pause",
            s.pause(pb::PauseSandboxRequest { sandbox_id: sid() })
                .await
                .map(drop),
        ),
        (
            "Sandboxes/Resume",
            s.resume(pb::ResumeSandboxRequest { sandbox_id: sid() })
                .await
                .map(drop),
        ),
        (
            "Sandboxes/Exec",
            control::exec(&mut s, &sid(), start(&["true"]))
                .await
                .map(drop),
        ),
        (
            "Sandboxes/Attach",
            s.attach(pb::AttachRequest {
                sandbox_id: sid(),
                exec_id: "x".into(),
                from_offset: 0,
            })
            .await
            .map(drop),
        ),
        (
            "Sandboxes/ReadFile",
            s.read_file(pb::ReadFileRequest {
                sandbox_id: sid(),
                ..Default::default()
            })
            .await
            .map(drop),
        ),
        (
            "Sandboxes/WriteFile",
            s.write_file(futures::stream::iter(Vec::<pb::WriteFileRequest>::new()))
                .await
                .map(drop),
        ),
        (
            "Sandboxes/Snapshot",
            s.snapshot(pb::SnapshotRequest {
                sandbox_id: sid(),
                ..Default::default()
            })
            .await
            .map(drop),
        ),
        (
            "Sandboxes/ListSnapshots",
            s.list_snapshots(pb::ListSnapshotsRequest {})
                .await
                .map(drop),
        ),
        (
            "Sandboxes/DeleteSnapshot",
            s.delete_snapshot(pb::DeleteSnapshotRequest {
                snapshot_id: "snap-x".into(),
            })
            .await
            .map(drop),
        ),
        (
            "Sandboxes/Fork",
            s.fork(pb::ForkRequest {
                sandbox_id: sid(),
                ..Default::default()
            })
            .await
            .map(drop),
        ),
        (
            "Admin/CreateToken",
            ad.create_token(pb::CreateTokenRequest {
                name: "intruder".into(),
                role: pb::Role::Admin as i32,
                ..Default::default()
            })
            .await
            .map(drop),
        ),
        (
            "Admin/ListTokens",
            ad.list_tokens(pb::ListTokensRequest::default())
                .await
                .map(drop),
        ),
        (
            "Admin/RevokeToken",
            ad.revoke_token(pb::RevokeTokenRequest {
                token_id: "000000000000".into(),
            })
            .await
            .map(drop),
        ),
        (
            "Admin/WhoAmI",
            ad.who_am_i(pb::WhoAmIRequest {}).await.map(drop),
        ),
        (
            "Admin/GetPolicy",
            ad.get_policy(pb::GetPolicyRequest {}).await.map(drop),
        ),
        (
            "Admin/ValidatePolicy",
            ad.validate_policy(pb::ValidatePolicyRequest::default())
                .await
                .map(drop),
        ),
        (
            "Admin/SetPolicy",
            ad.set_policy(pb::SetPolicyRequest {
                source: "permit (principal, action, resource);".into(),
                expected_version: 0,
            })
            .await
            .map(drop),
        ),
        (
            "Runs/Submit",
            r.submit(pb::SubmitRunRequest::default()).await.map(drop),
        ),
        (
            "Runs/Get",
            r.get(pb::GetRunRequest { run_id: rid() }).await.map(drop),
        ),
        (
            "Runs/List",
            r.list(pb::ListRunsRequest::default()).await.map(drop),
        ),
        (
            "Runs/Watch",
            r.watch(pb::WatchRunRequest {
                run_id: rid(),
                from_seq: 1,
            })
            .await
            .map(drop),
        ),
        (
            "Runs/Cancel",
            r.cancel(pb::CancelRunRequest {
                run_id: rid(),
                reason: String::new(),
            })
            .await
            .map(drop),
        ),
        (
            "Runs/Logs",
            r.logs(pb::LogsRequest {
                run_id: rid(),
                ..Default::default()
            })
            .await
            .map(drop),
        ),
        (
            "Runs/Send",
            r.send(pb::SendRequest {
                run_id: rid(),
                message_id: "m1".into(),
                message: "hello".into(),
                ..Default::default()
            })
            .await
            .map(drop),
        ),
        (
            "Audit/Query",
            au.query(pb::QueryAuditRequest::default()).await.map(drop),
        ),
        (
            "Audit/Export",
            au.export(pb::ExportAuditRequest {}).await.map(drop),
        ),
        (
            "Audit/Verify",
            au.verify(pb::VerifyAuditRequest {}).await.map(drop),
        ),
        (
            "Approvals/List",
            ap.list(pb::ListApprovalsRequest::default()).await.map(drop),
        ),
        (
            "Approvals/Get",
            ap.get(pb::GetApprovalRequest { approval_id: aid() })
                .await
                .map(drop),
        ),
        (
            "Approvals/Decide",
            ap.decide(pb::DecideApprovalRequest {
                approval_id: aid(),
                approve: true,
                reason: "let me in".into(),
                remember: false,
            })
            .await
            .map(drop),
        ),
        (
            "Approvals/Watch",
            ap.watch(pb::WatchApprovalsRequest {}).await.map(drop),
        ),
    ]
}

// ------------------------------------------------------------ tenants

#[tokio::test]
async fn tenants_cannot_see_or_touch_each_other() {
    needs_docker!();
    let cp = ControlPlane::start(&[]).await.unwrap();
    let alice = cp.token(pb::Role::Submitter, "alice").await.unwrap();
    let bob = cp.token(pb::Role::Submitter, "bob").await.unwrap();
    let auditor = cp.token(pb::Role::Auditor, "audit").await.unwrap();
    let mut a = cp.sandboxes(&alice).await.unwrap();
    let mut b = cp.sandboxes(&bob).await.unwrap();
    let sb = control::create(&mut a).await.unwrap();
    assert_eq!(sb.owner, "alice");
    let snap = a
        .snapshot(pb::SnapshotRequest {
            sandbox_id: sb.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();

    // Every way bob could reach alice's sandbox answers NOT_FOUND, exactly
    // like an id that does not exist.
    let id = sb.id.clone();
    let missing = "sb-000000000000";
    let theirs = b
        .get(pb::GetSandboxRequest {
            sandbox_id: id.clone(),
        })
        .await
        .map(drop);
    let none = b
        .get(pb::GetSandboxRequest {
            sandbox_id: missing.into(),
        })
        .await
        .map(drop);
    assert_eq!(
        answered_as_missing("Sandboxes/Get", theirs, &id, none, missing),
        Code::NotFound
    );
    let not_found = |r: Result<(), tonic::Status>, what: &str| {
        let e = r.unwrap_err();
        assert_eq!(e.code(), Code::NotFound, "{what}: {e:?}");
    };
    not_found(
        b.delete(pb::DeleteSandboxRequest {
            sandbox_id: id.clone(),
        })
        .await
        .map(drop),
        "delete",
    );
    not_found(
        b.pause(pb::PauseSandboxRequest {
            sandbox_id: id.clone(),
        })
        .await
        .map(drop),
        "pause",
    );
    not_found(
        b.resume(pb::ResumeSandboxRequest {
            sandbox_id: id.clone(),
        })
        .await
        .map(drop),
        "resume",
    );
    not_found(
        control::exec(&mut b, &id, start(&["true"])).await.map(drop),
        "exec",
    );
    not_found(
        b.attach(pb::AttachRequest {
            sandbox_id: id.clone(),
            exec_id: "x".into(),
            from_offset: 0,
        })
        .await
        .map(drop),
        "attach",
    );
    not_found(
        b.read_file(pb::ReadFileRequest {
            sandbox_id: id.clone(),
            path: "x".into(),
            ..Default::default()
        })
        .await
        .map(drop),
        "read_file",
    );
    let header = pb::WriteFileRequest {
        request: Some(pb::write_file_request::Request::Header(
            pb::WriteFileHeader {
                sandbox_id: id.clone(),
                file: Some(agent_pb::WriteFileHeader {
                    path: "planted".into(),
                    ..Default::default()
                }),
            },
        )),
    };
    not_found(
        b.write_file(futures::stream::iter([header]))
            .await
            .map(drop),
        "write_file",
    );
    not_found(
        b.snapshot(pb::SnapshotRequest {
            sandbox_id: id.clone(),
            ..Default::default()
        })
        .await
        .map(drop),
        "snapshot",
    );
    not_found(
        b.fork(pb::ForkRequest {
            sandbox_id: id.clone(),
            ..Default::default()
        })
        .await
        .map(drop),
        "fork",
    );
    not_found(
        b.create(pb::CreateSandboxRequest {
            from_snapshot: snap.id.clone(),
            ..Default::default()
        })
        .await
        .map(drop),
        "create from another owner's snapshot",
    );
    not_found(
        b.delete_snapshot(pb::DeleteSnapshotRequest {
            snapshot_id: snap.id.clone(),
        })
        .await
        .map(drop),
        "delete_snapshot",
    );
    let listed = b
        .list(pb::ListSandboxesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(listed.sandboxes.is_empty(), "{listed:?}");
    let snaps = b
        .list_snapshots(pb::ListSnapshotsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(snaps.snapshots.is_empty(), "{snaps:?}");

    // The auditor sees everything and changes nothing.
    let mut au = cp.sandboxes(&auditor).await.unwrap();
    let listed = au
        .list(pb::ListSandboxesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.sandboxes.len(), 1);
    let e = control::exec(&mut au, &id, start(&["true"]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let e = au
        .delete(pb::DeleteSandboxRequest {
            sandbox_id: id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");

    let e = au
        .create(pb::CreateSandboxRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let e = cp
        .runs(&auditor)
        .await
        .unwrap()
        .submit(pb::SubmitRunRequest {
            idempotency_key: "audit".into(),
            job: Some(job(vec![step("probe", "true")])),
            agent: None,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");

    // Only admins manage tokens and policies; a submitter reads no audit log.
    let (admin_id, _) = token_parts(&cp.admin_token);
    for (who, token) in [("a submitter", &bob), ("the auditor", &auditor)] {
        let mut ad = cp.admin(token).await.unwrap();
        let refused = [
            (
                "CreateToken",
                ad.create_token(pb::CreateTokenRequest {
                    name: "mine".into(),
                    role: pb::Role::Admin as i32,
                    ..Default::default()
                })
                .await
                .map(drop),
            ),
            (
                "ListTokens",
                ad.list_tokens(pb::ListTokensRequest::default())
                    .await
                    .map(drop),
            ),
            (
                "RevokeToken",
                ad.revoke_token(pb::RevokeTokenRequest {
                    token_id: admin_id.into(),
                })
                .await
                .map(drop),
            ),
            (
                "SetPolicy",
                ad.set_policy(pb::SetPolicyRequest {
                    source: "permit (principal, action, resource);".into(),
                    expected_version: 0,
                })
                .await
                .map(drop),
            ),
        ];
        for (rpc, answer) in refused {
            let e = answer
                .err()
                .unwrap_or_else(|| panic!("{who} was let through Admin/{rpc}"));
            assert_eq!(e.code(), Code::PermissionDenied, "{who}, {rpc}: {e:?}");
        }
    }
    let e = cp
        .audit(&bob)
        .await
        .unwrap()
        .query(pb::QueryAuditRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");

    // Alice's sandbox is untouched and still hers; the admin's token works.
    let r = control::exec(&mut a, &id, shell("ls")).await.unwrap();
    assert_eq!(r.code(), Some(0));
    assert!(!r.stdout_str().contains("planted"));
    cp.admin(&cp.admin_token)
        .await
        .unwrap()
        .who_am_i(pb::WhoAmIRequest {})
        .await
        .unwrap();
}

#[tokio::test]
async fn tenants_cannot_see_or_touch_each_others_runs_or_approvals() {
    needs_docker!();
    let cp = ControlPlane::start(&[]).await.unwrap();
    let alice = cp.token(pb::Role::Submitter, "alice").await.unwrap();
    let bob = cp.token(pb::Role::Submitter, "bob").await.unwrap();
    let mut alice_runs = cp.runs(&alice).await.unwrap();
    let mut bob_runs = cp.runs(&bob).await.unwrap();
    let mut alice_approvals = cp.approvals(&alice).await.unwrap();
    let mut bob_approvals = cp.approvals(&bob).await.unwrap();

    // Alice's run: a step with output, then one that waits for an approval.
    let steps = vec![
        step("build", "echo built by alice"),
        step("publish", "echo git push origin"),
    ];
    let run = submit(&mut alice_runs, "shared-key", job(steps)).await;
    let run = wait_for_run(&mut alice_runs, &run.id, "awaiting approval", |r| {
        r.state == pb::RunState::AwaitingApproval as i32
    })
    .await;
    let run_approval = run.approval_id.clone();
    assert!(!run_approval.is_empty(), "{run:?}");
    assert_eq!(
        stdout_of(&mut alice_runs, &run.id).await.unwrap(),
        "built by alice\n"
    );

    // Every way bob could reach alice's run answers as for a run that does
    // not exist.
    let missing = "run-0000000000000000";
    for rpc in ["Get", "Watch", "Cancel", "Logs", "Send"] {
        let theirs = call_on_run(&mut bob_runs, rpc, &run.id).await;
        let none = call_on_run(&mut bob_runs, rpc, missing).await;
        let rpc = format!("Runs/{rpc}");
        assert_eq!(
            answered_as_missing(&rpc, theirs, &run.id, none, missing),
            Code::NotFound
        );
    }

    // Bob watches approvals from before alice's next one to after his own
    // first: his own is the first he sees, none of alice's (neither the
    // one pending when he started nor the one made while he watched).
    let mut watch = bob_approvals
        .watch(pb::WatchApprovalsRequest {})
        .await
        .unwrap()
        .into_inner();
    let mut alice_sandboxes = cp.sandboxes(&alice).await.unwrap();
    let asked = alice_sandboxes
        .create(pb::CreateSandboxRequest {
            network: pb::NetworkMode::Bridge as i32,
            ..Default::default()
        })
        .await
        .unwrap_err();
    let sandbox_approval = asked
        .metadata()
        .get(APPROVAL_ID)
        .unwrap_or_else(|| panic!("a network waits for an approval: {asked:?}"))
        .to_str()
        .unwrap()
        .to_string();
    // Bob's own run under the same idempotency key is his, not alice's.
    let bobs = submit(
        &mut bob_runs,
        "shared-key",
        job(vec![step("publish", "echo git push bob")]),
    )
    .await;
    assert_ne!(bobs.id, run.id);
    assert_eq!(bobs.owner, "bob");
    let seen = tokio::time::timeout(PATIENCE, watch.message())
        .await
        .expect("bob's watch never showed his own approval")
        .unwrap()
        .expect("bob's watch ended")
        .approval
        .unwrap();
    assert_eq!(
        (seen.owner.as_str(), seen.run_id.as_str()),
        ("bob", bobs.id.as_str()),
        "{seen:?}"
    );
    let bobs = wait_for_run(&mut bob_runs, &bobs.id, "awaiting approval", |r| {
        r.state == pb::RunState::AwaitingApproval as i32
    })
    .await;
    assert_eq!(seen.id, bobs.approval_id);

    // Listing shows each only their own.
    assert_eq!(run_ids(&mut bob_runs).await, vec![bobs.id.clone()]);
    assert_eq!(run_ids(&mut alice_runs).await, vec![run.id.clone()]);
    let everything = pb::ListApprovalsRequest::default();
    assert_eq!(
        approval_ids(&mut bob_approvals, everything.clone()).await,
        vec![bobs.approval_id.clone()]
    );
    let of_alices_run = pb::ListApprovalsRequest {
        run_id: run.id.clone(),
        ..Default::default()
    };
    assert!(approval_ids(&mut bob_approvals, of_alices_run)
        .await
        .is_empty());
    let alices = approval_ids(&mut alice_approvals, everything).await;
    assert!(alices.contains(&run_approval), "{alices:?}");
    assert!(alices.contains(&sandbox_approval), "{alices:?}");
    assert!(!alices.contains(&bobs.approval_id), "{alices:?}");

    // Bob can neither read nor decide alice's approvals, and cannot tell
    // them from ids that do not exist.
    let missing = "ap-0000000000000000";
    for id in [&run_approval, &sandbox_approval] {
        let theirs = get_approval(&mut bob_approvals, id).await;
        let none = get_approval(&mut bob_approvals, missing).await;
        assert_eq!(
            answered_as_missing("Approvals/Get", theirs, id, none, missing),
            Code::NotFound
        );
        let theirs = decide(&mut bob_approvals, id).await;
        let none = decide(&mut bob_approvals, missing).await;
        assert_eq!(
            answered_as_missing("Approvals/Decide", theirs, id, none, missing),
            Code::PermissionDenied
        );
    }
    let e = get_approval(&mut alice_approvals, &bobs.approval_id)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");

    // Operators see and decide every owner's approvals: that is their role.
    let operator = cp.token(pb::Role::Operator, "ops").await.unwrap();
    let mut ops = cp.approvals(&operator).await.unwrap();
    get_approval(&mut ops, &run_approval).await.unwrap();

    // Alice's run and approvals are as they were; her own cancel works.
    for id in [&run_approval, &sandbox_approval] {
        let a = alice_approvals
            .get(pb::GetApprovalRequest {
                approval_id: id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(a.state, pb::ApprovalState::Pending as i32, "{a:?}");
    }
    let now = alice_runs
        .get(pb::GetRunRequest {
            run_id: run.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(now.state, pb::RunState::AwaitingApproval as i32, "{now:?}");
    let cancelled = alice_runs
        .cancel(pb::CancelRunRequest {
            run_id: run.id.clone(),
            reason: "done here".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        cancelled.state,
        pb::RunState::Cancelled as i32,
        "{cancelled:?}"
    );
}

/// Asserts that a call on another owner's record (`id`) ended exactly as the
/// same call on an id that does not exist (`missing`): the same code, the
/// same message but for the id, so ids cannot be probed. Answers the code.
fn answered_as_missing(
    rpc: &str,
    theirs: Result<(), Status>,
    id: &str,
    none: Result<(), Status>,
    missing: &str,
) -> Code {
    let theirs = theirs
        .err()
        .unwrap_or_else(|| panic!("{rpc} on another owner's {id} went through"));
    let none = none
        .err()
        .unwrap_or_else(|| panic!("{rpc} on {missing}, which does not exist, went through"));
    assert_eq!(theirs.code(), none.code(), "{rpc}: {theirs:?} / {none:?}");
    assert_eq!(
        theirs.message().replace(id, "<id>"),
        none.message().replace(missing, "<id>"),
        "{rpc}: another owner's record must look like one that does not exist"
    );
    theirs.code()
}

fn step(name: &str, command: &str) -> pb::Step {
    pb::Step {
        name: name.into(),
        shell: command.into(),
        ..Default::default()
    }
}

fn job(steps: Vec<pb::Step>) -> pb::Job {
    pb::Job {
        steps,
        ..Default::default()
    }
}

async fn submit(runs: &mut Runs, key: &str, job: pb::Job) -> pb::Run {
    runs.submit(pb::SubmitRunRequest {
        idempotency_key: key.into(),
        job: Some(job),
        agent: None,
    })
    .await
    .unwrap()
    .into_inner()
}

/// Polls run `id` until `done` holds (`what` says what that is).
async fn wait_for_run(
    runs: &mut Runs,
    id: &str,
    what: &str,
    done: impl Fn(&pb::Run) -> bool,
) -> pb::Run {
    let began = Instant::now();
    loop {
        let run = runs
            .get(pb::GetRunRequest { run_id: id.into() })
            .await
            .unwrap()
            .into_inner();
        if done(&run) {
            return run;
        }
        assert!(
            began.elapsed() < PATIENCE,
            "run {id} was never {what}: {run:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The first step's stdout, as `Runs.Logs` streams it.
async fn stdout_of(runs: &mut Runs, run_id: &str) -> Result<String, Status> {
    let mut chunks = runs
        .logs(pb::LogsRequest {
            run_id: run_id.into(),
            step: 0,
            stream: pb::LogStream::Stdout as i32,
            from_offset: 0,
        })
        .await?
        .into_inner();
    let mut out = Vec::new();
    while let Some(chunk) = chunks.message().await? {
        out.extend_from_slice(&chunk.data);
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// Calls the Runs RPC `rpc` that names one run on `run_id`.
async fn call_on_run(runs: &mut Runs, rpc: &str, run_id: &str) -> Result<(), Status> {
    let run_id = run_id.to_string();
    match rpc {
        "Get" => runs.get(pb::GetRunRequest { run_id }).await.map(drop),
        "Watch" => runs
            .watch(pb::WatchRunRequest {
                run_id,
                from_seq: 1,
            })
            .await
            .map(drop),
        "Cancel" => runs
            .cancel(pb::CancelRunRequest {
                run_id,
                reason: "not mine".into(),
            })
            .await
            .map(drop),
        "Logs" => runs
            .logs(pb::LogsRequest {
                run_id,
                ..Default::default()
            })
            .await
            .map(drop),
        "Send" => runs
            .send(pb::SendRequest {
                run_id,
                message_id: "not-mine".into(),
                message: "do something else".into(),
                ..Default::default()
            })
            .await
            .map(drop),
        other => panic!("no Runs/{other} here"),
    }
}

async fn run_ids(runs: &mut Runs) -> Vec<String> {
    let listed = runs
        .list(pb::ListRunsRequest::default())
        .await
        .unwrap()
        .into_inner();
    listed.runs.into_iter().map(|r| r.id).collect()
}

async fn approval_ids(
    approvals: &mut control::Approvals,
    request: pb::ListApprovalsRequest,
) -> Vec<String> {
    let listed = approvals.list(request).await.unwrap().into_inner();
    listed.approvals.into_iter().map(|a| a.id).collect()
}

async fn get_approval(approvals: &mut control::Approvals, id: &str) -> Result<(), Status> {
    approvals
        .get(pb::GetApprovalRequest {
            approval_id: id.into(),
        })
        .await
        .map(drop)
}

async fn decide(approvals: &mut control::Approvals, id: &str) -> Result<(), Status> {
    approvals
        .decide(pb::DecideApprovalRequest {
            approval_id: id.into(),
            approve: true,
            reason: "looks fine to me".into(),
            remember: false,
        })
        .await
        .map(drop)
}

// ------------------------------------------------------------ limits

#[tokio::test]
async fn max_per_owner_holds_against_concurrent_creates() {
    needs_docker!();
    // A warm pool of one: the creates race through both ways a sandbox is
    // handed out, claimed from the pool and made cold.
    let cp = ControlPlane::start(&["sandbox.max_per_owner=2", "pool=[{name=\"warm\",size=1}]"])
        .await
        .unwrap();
    eventually("the warm pool is ready", async || {
        cp.log().contains("warm pool sandbox ready")
    })
    .await;
    let alice = cp.token(pb::Role::Submitter, "alice").await.unwrap();
    let mut a = cp.sandboxes(&alice).await.unwrap();

    // Six at once: two are made, the others refused saying why, and none of
    // them leaves anything behind.
    let (made, refused) = create_at_once(&a, 6).await;
    assert_eq!(made.len(), 2, "made {made:?}, refused {refused:?}");
    for e in &refused {
        assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
        assert!(e.message().contains("sandbox.max_per_owner"), "{e:?}");
    }
    assert!(
        made.iter().any(|sb| sb.pool_profile == "warm"),
        "one was claimed from the pool: {made:?}"
    );
    let mut made_ids: Vec<String> = made.iter().map(|sb| sb.id.clone()).collect();
    made_ids.sort();
    assert_eq!(sandbox_ids(&mut a).await, made_ids);

    // One more, alone, is refused too (the pool refills meanwhile: its
    // sandbox is not handed over either); another owner is not held back.
    let e = control::create(&mut a).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    let bob = cp.token(pb::Role::Submitter, "bob").await.unwrap();
    let mut b = cp.sandboxes(&bob).await.unwrap();
    control::create(&mut b).await.unwrap();

    // A deleted sandbox frees its place.
    a.delete(pb::DeleteSandboxRequest {
        sandbox_id: made_ids[0].clone(),
    })
    .await
    .unwrap();
    control::create(&mut a).await.unwrap();
    assert_eq!(sandbox_ids(&mut a).await.len(), 2);
}

#[tokio::test]
async fn container_creates_in_flight_never_exceed_max_concurrent_creates() {
    needs_docker!();
    let cp = ControlPlane::start(&["docker.max_concurrent_creates=2"])
        .await
        .unwrap();
    let c = cp.sandboxes(&cp.admin_token).await.unwrap();
    let (made, refused) = create_at_once(&c, 6).await;
    assert!(
        refused.is_empty(),
        "every create gets its turn: {refused:?}"
    );
    assert_eq!(made.len(), 6);

    // The control plane logs each create as it takes its turn, with how
    // many hold one then (itself included).
    let log = cp.log();
    let started: Vec<(u64, u64)> = log
        .lines()
        .filter(|line| line.contains("container create started"))
        .map(|line| (log_field(line, "in_flight"), log_field(line, "max")))
        .collect();
    assert_eq!(started.len(), 6, "one line per create:\n{log}");
    for (in_flight, max) in started {
        assert_eq!(max, 2, "{log}");
        assert!(
            (1..=2).contains(&in_flight),
            "{in_flight} container creates at once with docker.max_concurrent_creates = 2:\n{log}"
        );
    }
}

#[tokio::test]
async fn a_network_is_given_only_when_the_server_allows_one() {
    needs_docker!();
    let mut cp = ControlPlane::start(&[]).await.unwrap();
    let alice = cp.token(pb::Role::Submitter, "alice").await.unwrap();
    let bridge = || pb::CreateSandboxRequest {
        network: pb::NetworkMode::Bridge as i32,
        ..Default::default()
    };

    // Allowed (the default): an admin gets a bridged sandbox at once; a
    // tenant's request waits for an approval (policy), the configuration
    // does not refuse it.
    let mut admin = cp.sandboxes(&cp.admin_token).await.unwrap();
    let bridged = admin.create(bridge()).await.unwrap().into_inner();
    assert_eq!(bridged.network, pb::NetworkMode::Bridge as i32);
    assert_eq!(
        control::inspect(&bridged.id, "{{.HostConfig.NetworkMode}}"),
        "bridge"
    );
    let mut a = cp.sandboxes(&alice).await.unwrap();
    let pending = a.create(bridge()).await.unwrap_err();
    assert_eq!(pending.code(), Code::FailedPrecondition, "{pending:?}");
    assert!(pending.metadata().get(APPROVAL_ID).is_some(), "{pending:?}");

    // Not allowed: every way to a network is refused, naming the switch,
    // before policy is asked (no approval is made) and before anything is.
    cp.restart_with(&["sandbox.allow_network=false"])
        .await
        .unwrap();
    let mut admin = cp.sandboxes(&cp.admin_token).await.unwrap();
    let mut a = cp.sandboxes(&alice).await.unwrap();
    let mut approvals = cp.approvals(&cp.admin_token).await.unwrap();
    let everything = pb::ListApprovalsRequest::default();
    let approvals_before = approval_ids(&mut approvals, everything.clone()).await;
    let containers_before = cp.containers().len();
    let fork = pb::ForkRequest {
        sandbox_id: bridged.id.clone(),
        ..Default::default()
    };
    let refusals = [
        ("an admin's create", admin.create(bridge()).await.map(drop)),
        ("a tenant's create", a.create(bridge()).await.map(drop)),
        (
            "a fork of a bridged sandbox",
            admin.fork(fork).await.map(drop),
        ),
    ];
    for (what, answer) in refusals {
        let e = answer
            .err()
            .unwrap_or_else(|| panic!("{what} was let through"));
        assert_eq!(e.code(), Code::FailedPrecondition, "{what}: {e:?}");
        assert!(
            e.message().contains("sandbox.allow_network"),
            "{what}: {e:?}"
        );
        assert!(
            e.metadata().get(APPROVAL_ID).is_none(),
            "{what}: refused, not held for an approval: {e:?}"
        );
    }
    // A tenant's run that asks for a network fails, saying why, before
    // anyone is asked to approve the network.
    let mut runs = cp.runs(&alice).await.unwrap();
    let bridged_job = pb::Job {
        network: pb::NetworkMode::Bridge as i32,
        ..job(vec![step("never", "echo never")])
    };
    let run = submit(&mut runs, "bridged", bridged_job).await;
    let run = wait_for_run(&mut runs, &run.id, "finished", |r| r.finished_unix_ms != 0).await;
    assert_eq!(run.state, pb::RunState::Failed as i32, "{run:?}");
    assert!(run.reason.contains("sandbox.allow_network"), "{run:?}");
    assert_eq!(
        approval_ids(&mut approvals, everything).await,
        approvals_before
    );
    assert_eq!(
        cp.containers().len(),
        containers_before,
        "{:?}",
        cp.containers()
    );

    // Without a network, sandboxes are made as before.
    let plain = control::create(&mut admin).await.unwrap();
    assert_eq!(
        control::inspect(&plain.id, "{{.HostConfig.NetworkMode}}"),
        "none"
    );
}

/// `n` creates with the server's defaults, sent at once on one connection;
/// answers the sandboxes made and the refusals.
async fn create_at_once(client: &Sandboxes, n: usize) -> (Vec<pb::Sandbox>, Vec<Status>) {
    let creates = (0..n).map(|_| {
        let mut c = client.clone();
        async move {
            c.create(pb::CreateSandboxRequest::default())
                .await
                .map(tonic::Response::into_inner)
        }
    });
    let mut made = Vec::new();
    let mut refused = Vec::new();
    for answer in futures::future::join_all(creates).await {
        match answer {
            Ok(sb) => made.push(sb),
            Err(e) => refused.push(e),
        }
    }
    (made, refused)
}

/// The ids of the sandboxes `client`'s token sees, sorted.
async fn sandbox_ids(client: &mut Sandboxes) -> Vec<String> {
    let listed = client
        .list(pb::ListSandboxesRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut ids: Vec<String> = listed.sandboxes.into_iter().map(|sb| sb.id).collect();
    ids.sort();
    ids
}

/// The number a log line gives `name` (`name=value`).
fn log_field(line: &str, name: &str) -> u64 {
    let prefix = format!("{name}=");
    line.split_whitespace()
        .find_map(|word| word.strip_prefix(prefix.as_str()))
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("no {name}=<number> in {line:?}"))
}
