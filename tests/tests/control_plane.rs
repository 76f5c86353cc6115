//! The control plane end to end: the real `control-plane` and `bridle`
//! binaries, real containers on the real Docker daemon, talked to over gRPC
//! and through the CLI the way a user would.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::time::Duration;

use bridle_proto::control::v1 as pb;
use bridle_proto::sandbox::v1 as agent_pb;
use bridle_tests::client::{self, collect, read_until, shell, start};
use bridle_tests::control::{self, create, exec, exec_interactive, ControlPlane};
use bridle_tests::docker::require_docker;
use bridle_tests::{bounded, PATIENCE};
use tonic::Code;

macro_rules! needs_docker {
    () => {
        require_docker(module_path!())
    };
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

async fn eventually(what: &str, check: impl AsyncFnMut() -> bool) {
    bridle_tests::eventually(what, Duration::from_secs(90), check).await
}

// The helpers, each bounded by [`PATIENCE`].

/// The ids of every sandbox an admin sees.
async fn listed(cp: &ControlPlane) -> Vec<String> {
    let mut c = cp.sandboxes(&cp.admin_token).await.unwrap();
    bounded("List", c.list(pb::ListSandboxesRequest::default()))
        .await
        .unwrap()
        .into_inner()
        .sandboxes
        .into_iter()
        .map(|s| s.id)
        .collect()
}

#[tokio::test]
async fn lifecycle_through_the_cli() {
    needs_docker!();
    let cp = ControlPlane::start(&[]).await.unwrap();
    let admin = cp.admin_token.clone();
    let ok = |out: std::process::Output| {
        assert!(
            out.status.success(),
            "{:?}: {}",
            out.status,
            text(&out.stderr)
        );
        text(&out.stdout).trim().to_string()
    };

    let who = ok(cp.cli(&admin, &["token", "whoami", "-o", "json"]).unwrap());
    let who: serde_json::Value = serde_json::from_str(&who).unwrap();
    assert_eq!(who["role"], "admin");

    let submitter = ok(cp
        .cli(
            &admin,
            &["token", "create", "--name", "ci", "--role", "submitter"],
        )
        .unwrap());
    let created = ok(cp
        .cli(
            &submitter,
            &[
                "sandbox",
                "create",
                "--memory",
                "256m",
                "--pids",
                "64",
                "-e",
                "GREETING=hello",
                "--label",
                "job=cli",
                "-o",
                "json",
            ],
        )
        .unwrap());
    let created: serde_json::Value = serde_json::from_str(&created).unwrap();
    let id = created["id"].as_str().unwrap().to_string();
    assert_eq!(created["state"], "ready");
    assert_eq!(created["owner"], "ci");
    assert_eq!(created["limits"]["memory_bytes"], 256 << 20);

    let listed = ok(cp
        .cli(&submitter, &["sandbox", "list", "--label", "job=cli"])
        .unwrap());
    assert!(listed.contains(&id), "{listed}");

    // Output, the sandbox's env, stdin and the exit code pass through.
    let out = cp
        .cli_with_stdin(
            &submitter,
            &[
                "sandbox",
                "exec",
                &id,
                "--",
                "sh",
                "-c",
                "echo $GREETING; cat; echo oops >&2; exit 7",
            ],
            b"from stdin\n",
        )
        .unwrap();
    assert_eq!(out.status.code(), Some(7), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "hello\nfrom stdin\n");
    assert_eq!(text(&out.stderr), "oops\n");
    let out = cp
        .cli(
            &submitter,
            &["sandbox", "exec", &id, "--", "no-such-binary"],
        )
        .unwrap();
    assert_eq!(out.status.code(), Some(127), "{}", text(&out.stderr));

    // A 5 MB file in and out, identical.
    let dir = tempfile::tempdir().unwrap();
    let data: Vec<u8> = (0..5_000_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let local = dir.path().join("blob");
    std::fs::write(&local, &data).unwrap();
    ok(cp
        .cli(
            &submitter,
            &[
                "sandbox",
                "cp",
                local.to_str().unwrap(),
                &format!("{id}:in/blob"),
            ],
        )
        .unwrap());
    let back = dir.path().join("back");
    ok(cp
        .cli(
            &submitter,
            &[
                "sandbox",
                "cp",
                &format!("{id}:in/blob"),
                back.to_str().unwrap(),
            ],
        )
        .unwrap());
    assert_eq!(std::fs::read(&back).unwrap(), data);

    // Snapshot and fork: the fork has the file, and is its own sandbox.
    let snap = ok(cp.cli(&submitter, &["sandbox", "snapshot", &id]).unwrap());
    assert!(snap.starts_with("snap-"), "{snap}");
    let fork = ok(cp.cli(&submitter, &["sandbox", "fork", &id]).unwrap());
    assert_ne!(fork, id);
    let out = ok(cp
        .cli(
            &submitter,
            &["sandbox", "exec", &fork, "--", "sha256sum", "in/blob"],
        )
        .unwrap());
    assert!(out.starts_with(&bridle_tests::sha256_hex(&data)), "{out}");
    let fresh = ok(cp
        .cli(&submitter, &["sandbox", "create", "--from-snapshot", &snap])
        .unwrap());
    let out = ok(cp
        .cli(
            &submitter,
            &["sandbox", "exec", &fresh, "--", "wc", "-c", "in/blob"],
        )
        .unwrap());
    assert!(out.contains("5000000"), "{out}");

    // Paused: exec is refused with a clear error until resumed.
    ok(cp.cli(&submitter, &["sandbox", "pause", &id]).unwrap());
    let out = cp
        .cli(&submitter, &["sandbox", "exec", &id, "--", "true"])
        .unwrap();
    assert_eq!(out.status.code(), Some(6));
    assert!(
        text(&out.stderr).contains("paused"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(
        text(&out.stderr).lines().count(),
        1,
        "one line: {}",
        text(&out.stderr)
    );
    ok(cp.cli(&submitter, &["sandbox", "resume", &id]).unwrap());
    ok(cp
        .cli(&submitter, &["sandbox", "exec", &id, "--", "true"])
        .unwrap());

    // Errors: one line and an exit code by kind.
    let out = cp
        .cli(&submitter, &["sandbox", "get", "sb-000000000000"])
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(text(&out.stderr).lines().count(), 1);
    let out = cp.cli("bridle_nope_nope", &["sandbox", "list"]).unwrap();
    assert_eq!(out.status.code(), Some(4));
    let out = cp.cli(&submitter, &["token", "list"]).unwrap();
    assert_eq!(
        out.status.code(),
        Some(4),
        "submitters cannot manage tokens"
    );
    let out = cp
        .cli(&submitter, &["sandbox", "create", "--memory", "1k"])
        .unwrap();
    assert_eq!(out.status.code(), Some(6));
    assert!(
        text(&out.stderr).contains("memory"),
        "{}",
        text(&out.stderr)
    );

    // A terminal when asked for one (or when attached to one).
    let out = ok(cp
        .cli(&submitter, &["sandbox", "exec", "-t", &id, "--", "tty"])
        .unwrap());
    assert!(out.starts_with("/dev/pts/"), "{out}");

    ok(cp
        .cli(&submitter, &["sandbox", "rm", &id, &fork, &fresh])
        .unwrap());
    for sb in [&id, &fork, &fresh] {
        let volumes = std::process::Command::new("docker")
            .args([
                "volume",
                "ls",
                "-q",
                "--filter",
                &format!("name=bridle-{sb}"),
            ])
            .output()
            .unwrap();
        assert_eq!(
            text(&volumes.stdout).trim(),
            "",
            "the workspace volume of {sb} is gone"
        );
    }
    assert_eq!(
        ok(cp
            .cli(&submitter, &["sandbox", "list", "-o", "json"])
            .unwrap()),
        "[]"
    );
    assert!(cp.containers().is_empty(), "{:?}", cp.containers());
    assert!(std::fs::read_dir(cp.data_dir().join("sandboxes"))
        .unwrap()
        .next()
        .is_none());
    // Snapshots stay until deleted; then their artifacts go too.
    let snaps: serde_json::Value = serde_json::from_str(&ok(cp
        .cli(&submitter, &["sandbox", "snapshots", "-o", "json"])
        .unwrap()))
    .unwrap();
    for s in snaps.as_array().unwrap() {
        ok(cp
            .cli(
                &submitter,
                &["sandbox", "rm-snapshot", s["id"].as_str().unwrap()],
            )
            .unwrap());
    }
    let blobs = std::fs::read_dir(cp.data_dir().join("artifacts/sha256"))
        .unwrap()
        .count();
    assert_eq!(blobs, 0);
}

#[tokio::test]
async fn sandboxes_are_hardened_inside_and_out() {
    needs_docker!();
    // Maxima of the server's own, each above the default a create gets.
    let cp = ControlPlane::start(&[
        "sandbox.max_memory_bytes=536870912",
        "sandbox.max_cpu_millis=1000",
        "sandbox.max_pids=300",
        "sandbox.max_disk_bytes=2147483648",
    ])
    .await
    .unwrap();
    let mut c = cp.sandboxes(&cp.admin_token).await.unwrap();
    let sb = c
        .create(pb::CreateSandboxRequest {
            limits: Some(pb::Limits {
                memory_bytes: Some(300 << 20),
                cpu_millis: Some(500),
                pids: Some(100),
                disk_bytes: None,
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let r = control::exec(
        &mut c,
        &sb.id,
        shell("grep -E '^(CapEff|NoNewPrivs)' /proc/self/status; id -u; touch /rootfs 2>&1; ls /sys/class/net; touch /workspace/ok /tmp/ok && echo writable"),
    )
    .await
    .unwrap();
    let out = r.stdout_str();
    assert!(out.contains("CapEff:\t0000000000000000"), "{out}");
    assert!(out.contains("NoNewPrivs:\t1"), "{out}");
    assert!(out.contains("\n1000\n"), "{out}");
    assert!(out.contains("Read-only file system"), "{out}");
    assert!(out.contains("\nlo\nwritable"), "only loopback: {out}");

    assert_eq!(control::inspect(&sb.id, "{{.HostConfig.CapDrop}}"), "[ALL]");
    assert_eq!(
        control::inspect(&sb.id, "{{.HostConfig.SecurityOpt}}"),
        "[no-new-privileges]"
    );
    assert_eq!(
        control::inspect(&sb.id, "{{.HostConfig.ReadonlyRootfs}}"),
        "true"
    );
    assert_eq!(
        control::inspect(&sb.id, "{{.HostConfig.NetworkMode}}"),
        "none"
    );
    assert_eq!(
        control::inspect(&sb.id, "{{.HostConfig.Privileged}}"),
        "false"
    );
    assert_eq!(control::inspect(&sb.id, "{{.Config.User}}"), "1000:1000");
    assert_eq!(
        control::inspect(&sb.id, "{{.HostConfig.Memory}}"),
        (300u64 << 20).to_string()
    );
    assert_eq!(
        control::inspect(&sb.id, "{{.HostConfig.MemorySwap}}"),
        (300u64 << 20).to_string()
    );
    assert_eq!(
        control::inspect(&sb.id, "{{.HostConfig.NanoCpus}}"),
        "500000000"
    );
    assert_eq!(control::inspect(&sb.id, "{{.HostConfig.PidsLimit}}"), "100");
    assert_eq!(
        control::inspect(&sb.id, "{{index .Config.Labels \"bridle.control-plane\"}}"),
        cp.instance
    );

    // Each limit beyond the server's maximum (`sandbox.max_*`), and unknown
    // snapshots and images, are refused and leave nothing behind.
    let before = cp.containers().len();
    let beyond = [
        (
            "limits.memory_bytes",
            "536870912",
            pb::Limits {
                memory_bytes: Some((512 << 20) + 1),
                ..Default::default()
            },
        ),
        (
            "limits.cpu_millis",
            "1000",
            pb::Limits {
                cpu_millis: Some(1001),
                ..Default::default()
            },
        ),
        (
            "limits.pids",
            "300",
            pb::Limits {
                pids: Some(301),
                ..Default::default()
            },
        ),
        (
            "limits.disk_bytes",
            "2147483648",
            pb::Limits {
                disk_bytes: Some((2 << 30) + 1),
                ..Default::default()
            },
        ),
    ];
    for (field, max, limits) in beyond {
        let e = c
            .create(pb::CreateSandboxRequest {
                limits: Some(limits),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{field}: {e:?}");
        assert!(
            e.message().contains(field) && e.message().contains(max),
            "{field}: {e:?}"
        );
    }
    let e = c
        .create(pb::CreateSandboxRequest {
            from_snapshot: "snap-nope".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let e = c
        .create(pb::CreateSandboxRequest {
            image: "bridle-no-such-image:1".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("images/build.sh"), "{e:?}");
    assert_eq!(cp.containers().len(), before);
}

#[tokio::test]
async fn a_client_that_goes_away_stops_its_command_unless_detached() {
    needs_docker!();
    let cp = ControlPlane::start(&[]).await.unwrap();
    let mut c = cp.sandboxes(&cp.admin_token).await.unwrap();
    let sb = create(&mut c).await.unwrap();

    let mut attached = shell("echo started; sleep 1000");
    attached.exec_id = "attached".into();
    let (tx, mut events) = exec_interactive(&mut c, &sb.id, attached, false)
        .await
        .unwrap();
    let mut r = client::ExecResult::default();
    read_until(&mut events, &mut r, |r| r.stdout_str().contains("started"))
        .await
        .unwrap();
    let mut detached = shell("echo started; sleep 1000");
    detached.exec_id = "detached".into();
    let (dtx, mut devents) = exec_interactive(&mut c, &sb.id, detached, true)
        .await
        .unwrap();
    let mut dr = client::ExecResult::default();
    read_until(&mut devents, &mut dr, |r| {
        r.stdout_str().contains("started")
    })
    .await
    .unwrap();
    // Both clients disappear.
    drop((tx, events, dtx, devents));

    // Re-attach through the control plane: the attached one was stopped,
    // the detached one still runs.
    let mut c2 = cp.sandboxes(&cp.admin_token).await.unwrap();
    let events = c2
        .attach(pb::AttachRequest {
            sandbox_id: sb.id.clone(),
            exec_id: "attached".into(),
            from_offset: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let r = collect(events).await.unwrap();
    let exited = r.exited.expect("the attached exec ended");
    assert!(exited.killed, "{exited:?}");
    let r = exec(
        &mut c2,
        &sb.id,
        shell("ps -o comm,args | grep -c '^sleep  *sleep 1000'"),
    )
    .await
    .unwrap();
    assert_eq!(
        r.stdout_str().trim(),
        "1",
        "only the detached sleep is left: {}",
        r.stdout_str()
    );
}

#[tokio::test]
async fn sandboxes_survive_a_killed_control_plane_and_orphans_are_removed() {
    needs_docker!();
    let mut cp = ControlPlane::start(&[]).await.unwrap();
    let mut c = cp.sandboxes(&cp.admin_token).await.unwrap();
    let sb = create(&mut c).await.unwrap();
    let r = exec(&mut c, &sb.id, shell("echo kept > kept.txt"))
        .await
        .unwrap();
    assert_eq!(r.code(), Some(0));
    let mut long = shell("sleep 2; echo finished while the control plane was down");
    long.exec_id = "across-restart".into();
    let (_tx, mut events) = exec_interactive(&mut c, &sb.id, long, true).await.unwrap();
    let mut r = client::ExecResult::default();
    read_until(&mut events, &mut r, |r| r.pid != 0)
        .await
        .unwrap();

    cp.kill9();
    // A container that claims to be ours but that no record owns, as a
    // crash between `docker create` and the record's commit would leave.
    let image = bridle_tests::docker::ensure_image().unwrap();
    let orphan = std::process::Command::new("docker")
        .args([
            "run",
            "-d",
            "--name",
            &format!("bridle-orphan-{}", cp.instance),
        ])
        .args(["--label", &format!("bridle.control-plane={}", cp.instance)])
        .args(["--label", "bridle.sandbox=sb-0rphan000000"])
        .args(bridle_tests::sweep::label_args())
        .args(["--entrypoint", "/bin/sleep", &image, "1000"])
        .output()
        .unwrap();
    assert!(orphan.status.success(), "{}", text(&orphan.stderr));
    // And one from another control plane, which must be left alone.
    let foreign = std::process::Command::new("docker")
        .args([
            "run",
            "-d",
            "--label",
            "bridle.control-plane=someone-else",
            "--label",
            "bridle.test=1",
        ])
        .args(bridle_tests::sweep::label_args())
        .args(["--entrypoint", "/bin/sleep", &image, "1000"])
        .output()
        .unwrap();
    let foreign_id = text(&foreign.stdout).trim().to_string();

    cp.restart().await.unwrap();
    let names = cp.containers();
    assert_eq!(
        names,
        vec![format!("bridle-{}", sb.id)],
        "orphan removed, sandbox kept"
    );
    let foreign_alive = std::process::Command::new("docker")
        .args(["inspect", "--format", "{{.State.Running}}", &foreign_id])
        .output()
        .unwrap();
    let _ = std::process::Command::new("docker")
        .args(["rm", "-f", &foreign_id])
        .output();
    assert_eq!(text(&foreign_alive.stdout).trim(), "true");

    let mut c = cp.sandboxes(&cp.admin_token).await.unwrap();
    let got = c
        .get(pb::GetSandboxRequest {
            sandbox_id: sb.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.state, pb::SandboxState::Ready as i32);
    let r = exec(&mut c, &sb.id, start(&["cat", "kept.txt"]))
        .await
        .unwrap();
    assert_eq!(r.stdout_str(), "kept\n");
    // The exec that ran on while the control plane was down kept its result.
    let events = c
        .attach(pb::AttachRequest {
            sandbox_id: sb.id.clone(),
            exec_id: "across-restart".into(),
            from_offset: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let r = collect(events).await.unwrap();
    assert_eq!(r.code(), Some(0));
    assert!(
        r.stdout_str().contains("finished while"),
        "{}",
        r.stdout_str()
    );

    // A graceful stop ends open streams with UNAVAILABLE but leaves the
    // sandbox and the command (not detached) running.
    let mut held = shell("sleep 2; echo survived the shutdown");
    held.exec_id = "held-open".into();
    let (_tx, mut events) = exec_interactive(&mut c, &sb.id, held, false).await.unwrap();
    let mut r = client::ExecResult::default();
    read_until(&mut events, &mut r, |r| r.pid != 0)
        .await
        .unwrap();
    let status = bounded("the control plane's exit on SIGTERM", cp.terminate())
        .await
        .unwrap();
    assert!(status.success(), "{status:?}: {}", cp.log());
    let end = bounded("the end of the held-open stream", async {
        loop {
            match events.message().await {
                Ok(Some(_)) => continue,
                other => break other,
            }
        }
    })
    .await;
    let e = end.expect_err("the stream ends with an error");
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains("held-open"), "{e:?}");
    assert_eq!(control::inspect(&sb.id, "{{.State.Running}}"), "true");
    cp.restart().await.unwrap();
    let mut c = cp.sandboxes(&cp.admin_token).await.unwrap();
    let events = c
        .attach(pb::AttachRequest {
            sandbox_id: sb.id.clone(),
            exec_id: "held-open".into(),
            from_offset: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let r = collect(events).await.unwrap();
    assert_eq!(r.code(), Some(0), "{r:?}");
    assert_eq!(r.stdout_str(), "survived the shutdown\n");
}

/// Concurrent claims against a warm pool: every warm sandbox goes to a
/// claim (none is left while a claim is made cold), what the API says of
/// where a sandbox came from matches the container it got, and no sandbox,
/// container or agent is handed to two claims.
#[tokio::test]
async fn warm_pool_claims_never_hand_out_a_sandbox_twice() {
    needs_docker!();
    let cp = ControlPlane::start(&["pool=[{name=\"default\",size=3}]", "sweep_interval_secs=1"])
        .await
        .unwrap();
    let pooled = || control::containers_labelled("bridle.owner=pool:default");
    eventually("the pool fills", async || {
        // Unclaimed sandboxes are nobody's: not even an admin lists them.
        listed(&cp).await.is_empty()
            && pooled().len() >= 3
            && cp.log().matches("warm pool sandbox ready").count() >= 3
    })
    .await;
    // The warm sandboxes' containers, before any claim.
    let warm = pooled();
    assert_eq!(warm.len(), 3, "the pool holds its size: {warm:?}");

    let owners: Vec<String> = (0..6).map(|i| format!("tenant{i}")).collect();
    let mut tokens = Vec::new();
    for o in &owners {
        tokens.push(cp.token(pb::Role::Submitter, o).await.unwrap());
    }
    let mut tasks = tokio::task::JoinSet::new();
    for t in tokens.clone() {
        let mut c = cp.sandboxes(&t).await.unwrap();
        tasks.spawn(async move { create(&mut c).await.unwrap() });
    }
    let mut got = Vec::new();
    while let Some(r) = tasks.join_next().await {
        got.push(r.unwrap());
    }
    let mut ids: Vec<&str> = got.iter().map(|s| s.id.as_str()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 6, "six distinct sandboxes: {got:?}");

    // Six claims against three warm sandboxes: each warm one was claimed.
    let claimed: Vec<String> = got.iter().map(|s| format!("bridle-{}", s.id)).collect();
    for name in &warm {
        assert!(
            claimed.contains(name),
            "warm sandbox {name} was left in the pool while claims were made cold: {got:?}"
        );
    }
    let from_pool = got.iter().filter(|s| s.pool_profile == "default").count();
    assert!(
        from_pool >= warm.len(),
        "{from_pool} from the pool: {got:?}"
    );
    // Each claim's container: its own, made for the pool exactly when the
    // API says the sandbox came from there, and running its own agent.
    let mut containers = Vec::new();
    let mut boots = Vec::new();
    for s in &got {
        let labels = control::inspect(
            &s.id,
            "{{.Id}} {{index .Config.Labels \"bridle.sandbox\"}} \
             {{index .Config.Labels \"bridle.owner\"}}",
        );
        let made_for = match s.pool_profile.as_str() {
            "default" => "pool:default",
            "" => s.owner.as_str(),
            other => panic!("{} claimed from an unknown pool {other:?}", s.id),
        };
        let (container, rest) = labels
            .split_once(' ')
            .unwrap_or_else(|| panic!("{}: no container ({labels:?})", s.id));
        assert_eq!(rest, format!("{} {made_for}", s.id), "{s:?}");
        containers.push(container.to_string());
        let mut agent = cp.agent_of(&s.id).unwrap();
        let info = bounded("Info", agent.info(agent_pb::InfoRequest {}))
            .await
            .unwrap()
            .into_inner();
        boots.push(info.boot_id);
    }
    for seen in [&mut containers, &mut boots] {
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 6, "shared between claims: {seen:?}");
    }

    // Each owner sees exactly its own one, and it works. Each leaves a file
    // behind: a sandbox handed out twice would show it to the next owner.
    for (t, o) in tokens.iter().zip(&owners) {
        let mut c = cp.sandboxes(t).await.unwrap();
        let list = c
            .list(pb::ListSandboxesRequest::default())
            .await
            .unwrap()
            .into_inner()
            .sandboxes;
        assert_eq!(list.len(), 1, "{o}: {list:?}");
        assert_eq!(&list[0].owner, o);
        let r = exec(
            &mut c,
            &list[0].id,
            shell(&format!("ls -A | wc -l; echo {o} > owner")),
        )
        .await
        .unwrap();
        assert_eq!(r.stdout_str().trim(), "0", "{o}: a fresh workspace");
    }
    // The pool refills behind the claims (three more become ready).
    eventually("the pool refills", async || {
        cp.log().matches("warm pool sandbox ready").count() >= 6
    })
    .await;
}

/// A TTL and an idle timeout each delete their sandbox, and activity
/// postpones the idle timeout: a sandbox kept busy with execs outlives a
/// neighbour with the same idle timeout that is left alone, and goes once
/// it is left alone itself.
#[tokio::test]
async fn ttl_and_idle_timeout_delete_sandboxes() {
    needs_docker!();
    const IDLE_SECS: u64 = 5;
    let cp = ControlPlane::start(&["sweep_interval_secs=1"])
        .await
        .unwrap();
    let mut c = cp.sandboxes(&cp.admin_token).await.unwrap();
    let with_idle_timeout = pb::CreateSandboxRequest {
        idle_timeout_seconds: IDLE_SECS,
        ..Default::default()
    };
    let busy = bounded("creating a sandbox", c.create(with_idle_timeout.clone()))
        .await
        .unwrap()
        .into_inner();
    // Kept busy from the start: an exec (activity) every 250 ms, against an
    // idle timeout twenty times as long.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let activity = {
        let mut c = cp.sandboxes(&cp.admin_token).await.unwrap();
        let (id, stop) = (busy.id.clone(), stop.clone());
        tokio::spawn(async move {
            let mut execs = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let ran =
                    tokio::time::timeout(PATIENCE, control::exec(&mut c, &id, start(&["true"])));
                match ran.await {
                    Ok(Ok(r)) if r.code() == Some(0) => execs += 1,
                    other => return Err(format!("exec {} in {id}: {other:?}", execs + 1)),
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Ok(execs)
        })
    };
    let ttl = bounded(
        "creating a sandbox",
        c.create(pb::CreateSandboxRequest {
            ttl_seconds: 1,
            ..Default::default()
        }),
    )
    .await
    .unwrap()
    .into_inner();
    let idle = bounded("creating a sandbox", c.create(with_idle_timeout))
        .await
        .unwrap()
        .into_inner();
    let keep = create(&mut c).await.unwrap();
    assert!(ttl.expires_unix_ms > ttl.created_unix_ms);
    // The idle one's timeout runs out after the busy one's would have.
    assert!(busy.last_active_unix_ms <= idle.last_active_unix_ms);

    eventually("the TTL and the idle sandbox are deleted", async || {
        let ids = listed(&cp).await;
        !ids.contains(&ttl.id) && !ids.contains(&idle.id)
    })
    .await;
    let ids = listed(&cp).await;
    assert!(ids.contains(&keep.id), "{ids:?}");
    assert!(
        ids.contains(&busy.id),
        "the busy sandbox went with its idle neighbour: {ids:?}"
    );
    // The sweep that deleted the idle one may still have been under way.
    // One that deletes a sandbox made only now began after it ended, so
    // the busy one has been through a whole sweep past its idle timeout.
    let marker = bounded(
        "creating a sandbox",
        c.create(pb::CreateSandboxRequest {
            ttl_seconds: 1,
            ..Default::default()
        }),
    )
    .await
    .unwrap()
    .into_inner();
    eventually("a later sweep deletes the marker", async || {
        !listed(&cp).await.contains(&marker.id)
    })
    .await;
    let ids = listed(&cp).await;
    assert!(
        ids.contains(&busy.id),
        "the busy sandbox was deleted as idle: {ids:?}"
    );

    // Left alone, it goes too.
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let execs = bounded("the end of the activity", activity)
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("the busy sandbox stopped working: {e}"));
    assert!(execs > 0);
    eventually("the busy sandbox is deleted once idle", async || {
        !listed(&cp).await.contains(&busy.id)
    })
    .await;
    assert_eq!(listed(&cp).await, vec![keep.id.clone()]);
    assert_eq!(cp.containers(), vec![format!("bridle-{}", keep.id)]);
}

#[tokio::test]
async fn tls_on_the_listener() {
    needs_docker!();
    let dir = tempfile::tempdir().unwrap();
    let cert =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();
    let mut cp = ControlPlane::start(&[
        &format!("tls.cert={:?}", cert_path.display().to_string()),
        &format!("tls.key={:?}", key_path.display().to_string()),
    ])
    .await
    .unwrap();
    assert!(cp.endpoint.starts_with("https://"), "{}", cp.endpoint);

    // Without the CA the CLI says what is missing; with it, it works.
    let out = cp.cli(&cp.admin_token, &["token", "whoami"]).unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("--ca-cert"),
        "{}",
        text(&out.stderr)
    );
    cp.ca_cert = Some(cert_path.clone());
    let out = cp.cli(&cp.admin_token, &["token", "whoami"]).unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("admin"));

    // A plaintext client gets nowhere.
    let plain = cp.endpoint.replace("https://", "http://");
    let ch = bounded(
        "a plaintext connection",
        tonic::transport::Channel::from_shared(plain)
            .unwrap()
            .connect(),
    )
    .await;
    if let Ok(ch) = ch {
        let mut admin = pb::admin_client::AdminClient::new(ch);
        let answer = bounded("WhoAmI in plaintext", admin.who_am_i(pb::WhoAmIRequest {})).await;
        assert!(answer.is_err());
    }
    // A certificate the client does not trust is refused.
    let other = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into()]).unwrap();
    let other_path = dir.path().join("other.pem");
    std::fs::write(&other_path, other.cert.pem()).unwrap();
    cp.ca_cert = Some(other_path);
    let out = cp.cli(&cp.admin_token, &["token", "whoami"]).unwrap();
    assert_eq!(out.status.code(), Some(5), "{}", text(&out.stderr));
}

#[tokio::test]
async fn the_agent_is_injected_read_only_into_an_image_without_one() {
    needs_docker!();
    // An image with no agent, built locally like every image here.
    let tag = "bridle-plain:control-plane-test";
    let built = std::process::Command::new(bridle_tests::repo_root().join("images/build.sh"))
        .args(["--plain", tag])
        .output()
        .unwrap();
    assert!(built.status.success(), "{}", text(&built.stderr));
    let agent = bridle_tests::agent_binary().unwrap();
    let cp = ControlPlane::start(&[
        &format!("sandbox.image={tag:?}"),
        &format!("sandbox.inject_agent={:?}", agent.display().to_string()),
        // The image has no /workspace of the sandbox user's.
        "sandbox.workspace_tmpfs_bytes=67108864",
    ])
    .await
    .unwrap();
    let mut c = cp.sandboxes(&cp.admin_token).await.unwrap();
    let sb = create(&mut c).await.unwrap();
    assert_eq!(sb.image, tag);
    let r = exec(
        &mut c,
        &sb.id,
        shell("echo works > f && cat f; cp /bin/busybox /.bridle/sandbox-agent 2>/dev/null || echo agent is read-only"),
    )
    .await
    .unwrap();
    assert_eq!(
        r.stdout_str(),
        "works\nagent is read-only\n",
        "{}",
        r.stderr_str()
    );
    let mounts = control::inspect(&sb.id, "{{range .Mounts}}{{.Destination}}={{.RW}} {{end}}");
    assert!(mounts.contains("/.bridle/sandbox-agent=false"), "{mounts}");
    let before = bridle_tests::sha256_hex(&std::fs::read(&agent).unwrap());
    drop(c);
    drop(cp);
    assert_eq!(
        bridle_tests::sha256_hex(&std::fs::read(&agent).unwrap()),
        before
    );
}
