//! The agent as PID 1 of real, hardened containers on the real Docker
//! daemon (memory and pids limits, all capabilities dropped, read-only
//! root, no network), checked the way a user would check it.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::time::Duration;

use bridle_proto::sandbox::v1 as pb;
use bridle_tests::client::{
    self, read_file, read_until, restore, run, shell, snapshot, start, start_interactive,
    write_file,
};
use bridle_tests::docker::{require_docker, Sandbox, SandboxOptions};
use bridle_tests::tarcraft::{self, Entry};
use bridle_tests::{bounded, PATIENCE};
use bytes::Bytes;
use tonic::Code;

macro_rules! needs_docker {
    () => {
        require_docker(module_path!())
    };
}

#[tokio::test]
async fn hardened_and_reporting_its_limits() {
    needs_docker!();
    let sb = Sandbox::start(SandboxOptions::default()).await.unwrap();
    let mut c = sb.client().unwrap();
    let info = c.info(pb::InfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.pid, 1, "the agent is PID 1");
    assert_eq!((info.uid, info.gid), (1000, 1000));
    assert_eq!(info.cap_eff, "0000000000000000");
    assert!(info.no_new_privs);
    assert_eq!(info.workspace, "/workspace");
    let cg = info.cgroup.unwrap();
    assert_eq!(cg.memory_limit_bytes, Some(256 << 20), "{cg:?}");
    assert_eq!(cg.pids_limit, Some(128), "{cg:?}");
    assert!(cg.memory_current_bytes > 0, "{cg:?}");

    let r = run(&mut c, shell("grep -E '^(CapEff|NoNewPrivs)' /proc/self/status; touch /rootfs-write; ls /sys/class/net")).await.unwrap();
    let out = r.stdout_str();
    assert!(out.contains("CapEff:\t0000000000000000"), "{out}");
    assert!(out.contains("NoNewPrivs:\t1"), "{out}");
    assert!(
        String::from_utf8_lossy(&r.stderr).contains("Read-only file system"),
        "{:?}",
        r.stderr
    );
    assert_eq!(
        out.lines().last(),
        Some("lo"),
        "only loopback under network none: {out}"
    );
}

#[tokio::test]
async fn a_fork_bomb_is_contained_and_the_agent_stays_healthy() {
    needs_docker!();
    let sb = Sandbox::start(SandboxOptions {
        pids: 64,
        ..Default::default()
    })
    .await
    .unwrap();
    let mut c = sb.client().unwrap();
    let r = run(
        &mut c,
        pb::ExecStart {
            timeout_ms: 3000,
            kill_grace_ms: 200,
            // The command's own wait is forked before the bomb can use up
            // the pids: only the deadline can end it, however fast the
            // bomb grows.
            ..shell("sleep 100 & s=$!; bomb() { bomb | bomb & }; bomb; wait $s")
        },
    )
    .await
    .unwrap();
    let exited = r.exited.expect("the bomb's exec ends");
    assert!(exited.timed_out, "{exited:?}");
    // Everything the bomb started is gone and the agent still works.
    let info = c.info(pb::InfoRequest {}).await.unwrap().into_inner();
    assert!(info.cgroup.unwrap().pids_current < 10);
    // What is left is the agent (PID 1), its spawner, and this listing's
    // own supervisor and `ps`: no shell of the bomb. (A bracketed `[exe]`
    // seen once after a bomb was a supervisor in its own exit, after it had
    // reported that its tree was gone: a fork of the spawner, so named
    // `exe`, whose memory was already released, so with no command line;
    // the kernel reaps it, as the spawner ignores SIGCHLD.)
    bridle_tests::eventually(
        "only the agent's own processes are left",
        PATIENCE,
        async || {
            let r = run(&mut c, start(&["ps", "-o", "pid,comm"])).await.unwrap();
            let comms: Vec<String> = r
                .stdout_str()
                .lines()
                .skip(1)
                .filter_map(|l| l.split_whitespace().nth(1).map(str::to_string))
                .collect();
            comms.len() == 4 && !comms.iter().any(|c| c == "sh")
        },
    )
    .await;
    let r = run(&mut c, start(&["echo", "still here"])).await.unwrap();
    assert_eq!(r.stdout, b"still here\n");
}

#[tokio::test]
async fn a_memory_bomb_is_reported_oom_killed() {
    needs_docker!();
    let sb = Sandbox::start(SandboxOptions {
        memory: "64m",
        ..Default::default()
    })
    .await
    .unwrap();
    let mut c = sb.client().unwrap();
    // dd allocates its whole block size up front.
    let r = run(
        &mut c,
        start(&["dd", "if=/dev/zero", "of=/dev/null", "bs=512M", "count=1"]),
    )
    .await
    .unwrap();
    let exited = r.exited.unwrap();
    assert!(exited.oom_killed, "{exited:?} {:?}", r.stderr_str());
    assert_eq!(exited.signal, Some(libc::SIGKILL));
    // A plain SIGKILL is not an OOM kill.
    let r = run(&mut c, shell("kill -9 $$")).await.unwrap();
    let exited = r.exited.unwrap();
    assert_eq!(exited.signal, Some(libc::SIGKILL));
    assert!(!exited.oom_killed);
    let info = c.info(pb::InfoRequest {}).await.unwrap().into_inner();
    assert!(info.cgroup.unwrap().oom_kills >= 1);
}

#[tokio::test]
async fn a_grandchild_dies_on_timeout() {
    needs_docker!();
    let sb = Sandbox::start(SandboxOptions::default()).await.unwrap();
    let mut c = sb.client().unwrap();
    let started = std::time::Instant::now();
    let r = run(
        &mut c,
        pb::ExecStart {
            // Far longer than the grandchild takes to start (the command
            // says `ready` once it has), so the deadline never races it.
            timeout_ms: 10_000,
            kill_grace_ms: 200,
            // The grandchild ignores SIGTERM, leaves the session and holds
            // stdout open: the deadline, not EOF, must end the exec.
            ..shell(
                "setsid sh -c 'trap \"\" TERM; echo $$ > /tmp/gc.pid; sleep 1000' & \
                 while [ ! -s /tmp/gc.pid ]; do sleep 0.05; done; echo ready; sleep 1000",
            )
        },
    )
    .await
    .unwrap();
    assert_eq!(
        r.stdout_str(),
        "ready\n",
        "the grandchild was up before the deadline"
    );
    assert!(r.exited.unwrap().timed_out);
    assert!(
        started.elapsed() < Duration::from_secs(120),
        "the exec returned at its deadline, not when `sleep 1000` ended"
    );
    let r = run(
        &mut c,
        shell("pid=$(cat /tmp/gc.pid); test -e /proc/$pid && echo alive || echo gone"),
    )
    .await
    .unwrap();
    assert_eq!(r.stdout_str(), "gone\n");
}

#[tokio::test]
async fn a_100_mb_file_round_trips() {
    needs_docker!();
    let sb = Sandbox::start(SandboxOptions::default()).await.unwrap();
    let mut c = sb.client().unwrap();
    let mut data = vec![0u8; 100 << 20];
    let mut x: u64 = 0x9e3779b97f4a7c15;
    for chunk in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    let sha = bridle_tests::sha256_hex(&data);
    let data = Bytes::from(data);
    let resp = write_file(&mut c, client::write_header("big/blob.bin"), data.clone())
        .await
        .unwrap();
    assert_eq!(resp.size, 100 << 20);
    assert_eq!(resp.sha256, sha);
    let r = run(&mut c, start(&["sha256sum", "big/blob.bin"]))
        .await
        .unwrap();
    assert!(
        r.stdout_str().starts_with(&sha),
        "inside the container: {}",
        r.stdout_str()
    );
    let back = read_file(&mut c, "/workspace/big/blob.bin").await.unwrap();
    assert_eq!(bridle_tests::sha256_hex(&back), sha);
}

const TREE: &str = "mkdir -p src/deep/er && echo hello > src/a.txt && head -c 300000 /dev/urandom > src/deep/rand.bin \
    && ln -s ../a.txt src/deep/link && chmod 0700 src/deep/er && echo x > src/deep/er/x && chmod 0600 src/a.txt";
const LISTING: &str = "find . | sort | while read f; do if [ -L \"$f\" ]; then echo \"$f -> $(readlink \"$f\")\"; \
    elif [ -f \"$f\" ]; then echo \"$f $(stat -c %a \"$f\") $(sha256sum < \"$f\")\"; else echo \"$f $(stat -c %a \"$f\")\"; fi; done";

/// Builds [`TREE`] in the workspace and returns its [`LISTING`].
async fn make_tree(c: &mut client::Agent) -> String {
    assert_eq!(run(c, shell(TREE)).await.unwrap().code(), Some(0));
    run(c, shell(LISTING)).await.unwrap().stdout_str()
}

#[tokio::test]
async fn snapshot_then_restore_in_another_sandbox_gives_an_identical_tree() {
    needs_docker!();
    let a = Sandbox::start(SandboxOptions::default()).await.unwrap();
    let mut ca = a.client().unwrap();
    let listing = make_tree(&mut ca).await;
    let archive = snapshot(
        &mut ca,
        pb::SnapshotRequest {
            compression: pb::Compression::Zstd as i32,
            ..Default::default()
        },
    )
    .await
    .unwrap();

    let b = Sandbox::start(SandboxOptions::default()).await.unwrap();
    let mut cb = b.client().unwrap();
    restore(&mut cb, "", Bytes::from(archive)).await.unwrap();
    let restored = run(&mut cb, shell(LISTING)).await.unwrap().stdout_str();
    assert_eq!(restored, listing);
    assert!(listing.contains("./src/deep/link -> ../a.txt"), "{listing}");
}

#[tokio::test]
async fn a_tar_slip_archive_is_refused_and_changes_nothing() {
    needs_docker!();
    let sb = Sandbox::start(SandboxOptions::default()).await.unwrap();
    let mut c = sb.client().unwrap();
    let before = make_tree(&mut c).await;
    let hostile = [
        vec![
            Entry::file("ok.txt", b"fine"),
            Entry::file("../../tmp/slipped", b"pwned"),
        ],
        vec![
            Entry::symlink("out", "/tmp"),
            Entry::file("out/slipped", b"pwned"),
        ],
        vec![
            Entry::dir("d"),
            Entry::symlink("d/up", "../.."),
            Entry::file("d/up/tmp/slipped", b"pwned"),
        ],
    ];
    for entries in hostile {
        let err = restore(&mut c, "", Bytes::from(tarcraft::build(&entries)))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains("refused"), "{}", err.message());
    }
    let after = run(&mut c, shell(LISTING)).await.unwrap().stdout_str();
    assert_eq!(after, before);
    let r = run(&mut c, shell("ls /tmp/slipped 2>&1; ls -a /workspace"))
        .await
        .unwrap();
    assert!(
        r.stdout_str().contains("No such file"),
        "{}",
        r.stdout_str()
    );
    assert!(
        !r.stdout_str().contains(".bridle-"),
        "no staging left: {}",
        r.stdout_str()
    );
}

#[tokio::test]
async fn the_sandbox_user_cannot_modify_the_agent() {
    needs_docker!();
    let sb = Sandbox::start(SandboxOptions::default()).await.unwrap();
    let mut c = sb.client().unwrap();
    // The binary is execute-only: read from outside, through the engine.
    let sha = || {
        let out = std::process::Command::new("docker")
            .args([
                "cp",
                &format!("{}:/usr/local/bin/sandbox-agent", sb.id),
                "-",
            ])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        bridle_tests::sha256_hex(&out.stdout)
    };
    let before = sha();
    let r = run(
        &mut c,
        shell("cat /usr/local/bin/sandbox-agent > /dev/null"),
    )
    .await
    .unwrap();
    assert_ne!(
        r.code(),
        Some(0),
        "the sandbox user can read the agent binary"
    );
    let hostile = "echo evil >> /usr/local/bin/sandbox-agent; \
        cp /bin/busybox /usr/local/bin/sandbox-agent; \
        chmod 777 /usr/local/bin/sandbox-agent; \
        rm -f /usr/local/bin/sandbox-agent; \
        mv /usr/local/bin/sandbox-agent /tmp/x; \
        cat /bin/busybox > /proc/1/exe; \
        echo evil > /proc/1/mem; \
        kill -9 1; \
        true";
    let r = run(&mut c, shell(hostile)).await.unwrap();
    assert_eq!(r.code(), Some(0));
    assert_eq!(sha(), before, "the agent binary changed");
    // PID 1 ignored the SIGKILL from its own uid (the kernel protects init).
    assert!(c.info(pb::InfoRequest {}).await.is_ok());
    // Same uid, but the agent and its helpers are not dumpable: their memory,
    // descriptors and environment are out of reach (no ptrace, no
    // /proc/<pid>/mem), for the agent and for every process it runs as.
    let r = run(
        &mut c,
        shell(
            "n=0; for d in /proc/[0-9]*; do \
               case \"$(tr '\\0' ' ' < $d/cmdline)\" in sandbox-agent*|/usr/local/bin/sandbox-agent*) ;; *) continue;; esac; \
               n=$((n+1)); \
               cat $d/environ >/dev/null 2>&1 && echo \"open $d/environ\"; \
               ls $d/fd >/dev/null 2>&1 && echo \"open $d/fd\"; \
             done; echo checked $n",
        ),
    )
    .await
    .unwrap();
    let out = r.stdout_str();
    assert!(
        !out.contains("open "),
        "agent processes readable by the sandbox user: {out}"
    );
    assert!(out.contains("checked "), "{out}");
    // PID 1, the spawner and this command's supervisor.
    assert!(
        out.trim_end().ends_with("checked 3"),
        "expected three agent processes: {out}"
    );
    // And files cannot reach it either.
    let err = write_file(
        &mut c,
        client::write_header("/usr/local/bin/sandbox-agent"),
        Bytes::from_static(b"x"),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
}

#[tokio::test]
async fn switching_users_without_the_capability_fails_clearly() {
    needs_docker!();
    let sb = Sandbox::start(SandboxOptions::default()).await.unwrap();
    let mut c = sb.client().unwrap();
    let r = run(
        &mut c,
        pb::ExecStart {
            uid: Some(0),
            gid: Some(0),
            ..start(&["id"])
        },
    )
    .await
    .unwrap();
    let failed = r
        .spawn_failed
        .expect("running as root must fail, not silently run as 1000");
    assert!(failed.reason.contains("CAP_SETUID"), "{}", failed.reason);
    assert!(r.stdout.is_empty());
}

/// `docker stop` is SIGTERM to the agent: it stops the running command,
/// whose stream gets an exit event saying the agent killed it, and exits 0
/// on its own, before Docker's SIGKILL (which would make it 137).
#[tokio::test]
async fn docker_stop_ends_commands_and_the_agent_cleanly() {
    needs_docker!();
    let sb = Sandbox::start(SandboxOptions::default()).await.unwrap();
    let mut c = sb.client().unwrap();
    let (_tx, mut events) = start_interactive(&mut c, shell("echo up; sleep 1000"))
        .await
        .unwrap();
    let mut r = client::ExecResult::default();
    read_until(&mut events, &mut r, |r| r.stdout == b"up\n")
        .await
        .unwrap();
    // The stream is read while the container stops, as a client would.
    let reader = tokio::spawn(async move {
        let end = client::read_to_end(&mut events, &mut r).await;
        (r, end)
    });
    let stopped = bounded(
        "docker stop",
        tokio::process::Command::new("docker")
            .args(["stop", "-t", "20", &sb.id])
            .output(),
    )
    .await
    .unwrap();
    assert!(stopped.status.success(), "{stopped:?}");
    let (r, end) = bounded("the exec stream after docker stop", reader)
        .await
        .unwrap();
    let exited = r
        .exited
        .unwrap_or_else(|| panic!("the stream ended ({end:?}) without the command's exit: {r:?}"));
    assert!(exited.killed, "the agent stopped the command: {exited:?}");
    assert_eq!(
        exited.code, None,
        "the command did not end on its own: {exited:?}"
    );
    assert_eq!(
        sb.inspect("{{.State.ExitCode}} {{.State.OOMKilled}}")
            .unwrap(),
        "0 false",
        "the agent exits 0 on SIGTERM (137: killed by Docker after the timeout); logs: {}",
        sb.logs()
    );
}

#[tokio::test]
async fn the_agent_runs_injected_into_a_plain_image() {
    needs_docker!();
    // An image without the agent, built locally like every image here.
    let tag = "bridle-plain:test";
    let built = std::process::Command::new(bridle_tests::repo_root().join("images/build.sh"))
        .args(["--plain", tag])
        .output()
        .unwrap();
    assert!(
        built.status.success(),
        "{}",
        String::from_utf8_lossy(&built.stderr)
    );
    let agent = bridle_tests::agent_binary().unwrap();
    let sock = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        sock.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let out = std::process::Command::new("docker")
        .args([
            "run",
            "-d",
            "--label",
            "bridle.test=1",
            "--user",
            "1000:1000",
            "--cap-drop",
            "ALL",
        ])
        .args(bridle_tests::sweep::label_args())
        .args([
            "--security-opt",
            "no-new-privileges",
            "--read-only",
            "--tmpfs",
            "/tmp",
        ])
        .args([
            "--tmpfs",
            "/workspace:uid=1000,gid=1000",
            "--network",
            "none",
        ])
        .arg("-v")
        .arg(format!("{}:/bridle/sandbox-agent:ro", agent.display()))
        .arg("-v")
        .arg(format!("{}:/run/bridle", sock.path().display()))
        .args(["--entrypoint", "/bridle/sandbox-agent", tag])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let cleanup = scopeguard(id.clone());
    let socket = sock.path().join("agent.sock");
    client::wait_healthy(&socket, Duration::from_secs(30))
        .await
        .unwrap();
    let mut c = client::connect(&socket).unwrap();
    let r = run(
        &mut c,
        shell("echo injected > hello; cat hello; test -w /bridle/sandbox-agent || echo read-only"),
    )
    .await
    .unwrap();
    assert_eq!(r.stdout_str(), "injected\nread-only\n");
    let info = c.info(pb::InfoRequest {}).await.unwrap().into_inner();
    assert_eq!((info.pid, info.uid), (1, 1000));
    drop(cleanup);
}

/// Removes a container when dropped, even if the test panics.
fn scopeguard(id: String) -> impl Drop {
    struct Remove(String);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = std::process::Command::new("docker")
                .args(["rm", "-fv", &self.0])
                .output();
        }
    }
    Remove(id)
}
