//! The agent binary on the host, over a Unix socket in a tempdir: the exec
//! contract (idempotency, attach, stdin, timeouts that kill whole trees,
//! spawn failures) and the file and snapshot RPCs.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::time::Duration;

use bridle_proto::sandbox::v1 as pb;
use bridle_tests::client::{
    self, attach, collect, read_file, read_to_end, read_until, restore, run, shell, snapshot,
    start, start_interactive, write_file,
};
use bridle_tests::host::{alive, HostAgent};
use bridle_tests::{bounded, PATIENCE};
use bytes::Bytes;
use tonic::Code;

#[tokio::test]
async fn runs_a_command_and_reports_its_exit() {
    let agent = HostAgent::start(&[]).await.unwrap();
    let mut c = agent.client().unwrap();
    let r = run(&mut c, shell("echo out; echo err >&2; exit 3"))
        .await
        .unwrap();
    assert_eq!(r.stdout, b"out\n");
    assert_eq!(r.stderr, b"err\n");
    let exited = r.exited.unwrap();
    assert_eq!(exited.code, Some(3));
    assert!(!exited.timed_out && !exited.oom_killed && !exited.killed);
    assert!(r.pid > 0);

    let r = run(&mut c, shell("kill -USR1 $$")).await.unwrap();
    assert_eq!(r.exited.unwrap().signal, Some(libc::SIGUSR1));
}

#[tokio::test]
async fn spawn_failures_are_distinct_and_immediate() {
    let agent = HostAgent::start(&[]).await.unwrap();
    let mut c = agent.client().unwrap();
    std::fs::write(agent.workspace.join("not-exec"), b"#!/bin/sh\n").unwrap();
    let cases = [
        (start(&["/definitely/missing"]), libc::ENOENT),
        (start(&["no-such-command-anywhere"]), libc::ENOENT),
        (start(&["./not-exec"]), libc::EACCES),
        (
            pb::ExecStart {
                cwd: "missing-dir".into(),
                ..start(&["true"])
            },
            libc::ENOENT,
        ),
        (
            pb::ExecStart {
                cwd: "../..".into(),
                ..start(&["true"])
            },
            libc::EXDEV,
        ),
    ];
    for (s, errno) in cases {
        let what = format!("{:?} in {:?}", s.argv, s.cwd);
        let r = tokio::time::timeout(Duration::from_secs(10), client::run(&mut c, s))
            .await
            .expect("a spawn failure must not hang")
            .unwrap();
        let f = r
            .spawn_failed
            .clone()
            .unwrap_or_else(|| panic!("{what}: expected spawn failure, got {r:?}"));
        assert_eq!(f.errno, errno, "{what}: {}", f.reason);
        assert!(r.exited.is_none());
        assert_eq!(
            r.pid, 0,
            "{what}: a command that never ran is not `started`"
        );
        assert!(r.exec_id.is_empty(), "{what}: no `started` event");
    }
}

#[tokio::test]
async fn bad_requests_get_invalid_argument() {
    let agent = HostAgent::start(&[]).await.unwrap();
    let mut c = agent.client().unwrap();
    for s in [
        pb::ExecStart::default(),
        pb::ExecStart {
            argv: vec!["true".into()],
            shell: "true".into(),
            ..Default::default()
        },
        pb::ExecStart {
            env: [("A=B".to_string(), "x".to_string())].into(),
            ..start(&["true"])
        },
    ] {
        let err = run(&mut c, s).await.unwrap_err();
        let status = err.downcast_ref::<tonic::Status>().expect("a gRPC status");
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    }
}

#[tokio::test]
async fn exec_id_is_idempotent_and_attach_replays() {
    let agent = HostAgent::start(&[]).await.unwrap();
    let mut c = agent.client().unwrap();
    let counter = agent.workspace.join("count");
    let s = pb::ExecStart {
        exec_id: "job-1".into(),
        ..shell("echo run >> count; echo hello")
    };
    let first = run(&mut c, s.clone()).await.unwrap();
    assert!(!first.attached);
    let second = run(&mut c, s).await.unwrap();
    assert!(second.attached, "same exec_id attaches");
    assert_eq!(second.stdout, b"hello\n");
    assert_eq!(
        std::fs::read_to_string(&counter).unwrap(),
        "run\n",
        "the command ran once"
    );

    let replay = attach(&mut c, "job-1", 2).await.unwrap();
    assert_eq!(replay.stdout, b"llo\n");
    assert_eq!(replay.code(), Some(0));

    let listed = c
        .list_execs(pb::ListExecsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(listed
        .execs
        .iter()
        .any(|e| e.exec_id == "job-1" && e.state == pb::ExecState::Exited as i32));
    c.release_exec(pb::ReleaseExecRequest {
        exec_id: "job-1".into(),
    })
    .await
    .unwrap();
    let err = attach(&mut c, "job-1", 0).await.unwrap_err();
    assert_eq!(
        err.downcast_ref::<tonic::Status>().unwrap().code(),
        Code::NotFound
    );
}

#[tokio::test]
async fn a_running_exec_survives_its_client_and_can_be_reattached() {
    let agent = HostAgent::start(&[]).await.unwrap();
    let mut c = agent.client().unwrap();
    let s = pb::ExecStart {
        exec_id: "long".into(),
        ..shell("echo one; read x; echo two")
    };
    let s = pb::ExecStart { stdin: true, ..s };
    let (tx, mut events) = start_interactive(&mut c, s).await.unwrap();
    // Read until "one" arrives, then drop the stream (the client "crashes").
    let mut r = client::ExecResult::default();
    read_until(&mut events, &mut r, |r| r.stdout == b"one\n")
        .await
        .unwrap();
    drop(events);
    drop(tx); // stdin closes: `read` returns and "two" is printed
    let again = attach(&mut c, "long", r.next_offset).await.unwrap();
    assert_eq!(again.stdout, b"two\n");
    assert_eq!(again.code(), Some(0));
}

/// A client that goes away while the agent is still starting its exec (the
/// control plane killed between asking and hearing back) must not leave an
/// exec that never finishes: a later attach gets its outcome.
///
/// Each try cancels the call the moment the agent lists the exec. A try hits
/// the window when the listing showed the exec still being started (no pid
/// yet, so `started` cannot have been sent) and the call was cancelled
/// before `started` reached it. Tries go on until a few have hit; the test
/// fails if none did, so it cannot pass without having dropped a client
/// mid-start. Every exec, hit or not, must have run to its end.
#[tokio::test]
async fn a_client_gone_during_start_leaves_an_exec_that_still_finishes() {
    let agent = HostAgent::start(&[]).await.unwrap();
    let mut c = agent.client().unwrap();
    let (mut tries, mut hits) = (0u32, 0u32);
    while hits < 5 && tries < 200 {
        let id = format!("cut-{tries}");
        tries += 1;
        let mut starter = agent.client().unwrap();
        // The command reads its stdin to the end first: a client gone before
        // `started` must still have it closed, or it never ends.
        let s = pb::ExecStart {
            exec_id: id.clone(),
            stdin: true,
            ..shell("cat; echo hi")
        };
        // Finishes only once `started` has arrived.
        let call = tokio::spawn(async move {
            let (_tx, mut events) = client::start_interactive(&mut starter, s).await.unwrap();
            events.message().await.unwrap().and_then(|ev| ev.event)
        });
        // Cancel the call the moment the agent has the exec in its table.
        let mut seen_starting = false;
        let deadline = std::time::Instant::now() + PATIENCE;
        loop {
            let listed = bounded("ListExecs", c.list_execs(pb::ListExecsRequest {}))
                .await
                .unwrap()
                .into_inner();
            if let Some(e) = listed.execs.iter().find(|e| e.exec_id == id) {
                seen_starting = e.pid == 0 && e.state == pb::ExecState::Running as i32;
                break;
            }
            if call.is_finished() {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "exec {id} was never listed and its call never answered"
            );
        }
        call.abort();
        let gone_before_started = match call.await {
            Err(e) if e.is_cancelled() => true,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
            Ok(first) => {
                assert!(
                    matches!(first, Some(pb::exec_event::Event::Started(_))),
                    "{id}: the first event is not `started`: {first:?}"
                );
                false
            }
        };
        if seen_starting && gone_before_started {
            hits += 1;
        }
        // The exec is there, ran its command, and ended.
        let again = attach(&mut c, &id, 0)
            .await
            .unwrap_or_else(|e| panic!("exec {id} after its client went away: {e:#}"));
        assert_eq!(again.code(), Some(0), "{id}: {again:?}");
        assert_eq!(again.stdout, b"hi\n", "{id}: {again:?}");
    }
    assert!(
        hits >= 1,
        "none of {tries} tries dropped its client while the agent was still starting the exec"
    );
}

#[tokio::test]
async fn stdin_streams_and_closes() {
    let agent = HostAgent::start(&[]).await.unwrap();
    let mut c = agent.client().unwrap();
    let (tx, events) = start_interactive(
        &mut c,
        pb::ExecStart {
            stdin: true,
            ..start(&["cat"])
        },
    )
    .await
    .unwrap();
    tx.send(client::stdin(b"abc")).await.unwrap();
    tx.send(client::stdin(b"def")).await.unwrap();
    tx.send(client::close_stdin()).await.unwrap();
    let r = collect(events).await.unwrap();
    assert_eq!(r.stdout, b"abcdef");
    assert_eq!(r.code(), Some(0));
}

/// The command gets a terminal of the size asked for, and a resize reaches
/// it as a terminal's does: SIGWINCH, then the new size from the terminal.
#[tokio::test]
async fn pty_gives_a_terminal_and_resizes() {
    let agent = HostAgent::start(&[]).await.unwrap();
    let mut c = agent.client().unwrap();
    let (tx, mut events) = start_interactive(
        &mut c,
        pb::ExecStart {
            pty: Some(pb::PtySize {
                rows: 33,
                cols: 101,
            }),
            // The trap is set before the first size is printed, so a resize
            // sent after seeing it cannot be missed.
            ..shell(
                "test -t 0 && test -t 1 || exit 9; \
                 trap 'echo \"resized to $(stty size)\"; exit 0' WINCH; \
                 echo \"started at $(stty size)\"; \
                 while :; do sleep 0.05; done",
            )
        },
    )
    .await
    .unwrap();
    let mut r = client::ExecResult::default();
    // The whole first line, whichever chunks it came in.
    read_until(&mut events, &mut r, |r| {
        r.stdout_str().contains('\n') || r.exited.is_some()
    })
    .await
    .unwrap();
    assert!(
        r.stdout_str().contains("started at 33 101"),
        "{:?} {:?}",
        r.stdout_str(),
        r.exited
    );
    tx.send(pb::ExecRequest {
        request: Some(pb::exec_request::Request::Resize(pb::PtySize {
            rows: 41,
            cols: 132,
        })),
    })
    .await
    .unwrap();
    read_to_end(&mut events, &mut r).await.unwrap();
    let out = r.stdout_str();
    assert!(out.contains("resized to 41 132"), "{out:?}");
    assert_eq!(r.code(), Some(0), "{out:?}");
}

#[tokio::test]
async fn a_terminal_session_takes_input_and_resizes() {
    let agent = HostAgent::start(&[]).await.unwrap();
    let mut c = agent.client().unwrap();
    let (tx, mut events) = start_interactive(
        &mut c,
        pb::ExecStart {
            stdin: true,
            pty: Some(pb::PtySize { rows: 24, cols: 80 }),
            ..shell("echo ready; read line; echo \"got:$line\"; stty size; cat")
        },
    )
    .await
    .unwrap();
    let mut r = client::ExecResult::default();
    read_until(&mut events, &mut r, |r| r.stdout_str().contains("ready"))
        .await
        .unwrap();
    tx.send(pb::ExecRequest {
        request: Some(pb::exec_request::Request::Resize(pb::PtySize {
            rows: 40,
            cols: 120,
        })),
    })
    .await
    .unwrap();
    tx.send(client::stdin(b"hello\n")).await.unwrap();
    // Closing input on a terminal is ^D: `cat` sees end of file and exits.
    tx.send(client::close_stdin()).await.unwrap();
    read_to_end(&mut events, &mut r).await.unwrap();
    let out = r.stdout_str();
    assert!(out.contains("got:hello"), "{out:?}");
    assert!(out.contains("40 120"), "{out:?}");
    assert_eq!(r.code(), Some(0), "{out:?}");
}

/// Writes the pids of a command tree that tries every way out: a setsid'd
/// grandchild, a double fork, and one that ignores SIGTERM, all holding the
/// output pipe open.
const ESCAPEES: &str = r#"
setsid sh -c 'echo $$ > pids.setsid; exec sleep 1000' &
sh -c 'sh -c "echo \$\$ > pids.double; exec sleep 1000" &' &
sh -c 'trap "" TERM; echo $$ > pids.trap; while :; do sleep 1; done' &
while [ ! -s pids.setsid ] || [ ! -s pids.double ] || [ ! -s pids.trap ]; do sleep 0.05; done
echo ready
sleep 1000
"#;

fn escapee_pids(ws: &std::path::Path) -> Vec<i32> {
    ["pids.setsid", "pids.double", "pids.trap"]
        .iter()
        .map(|f| {
            std::fs::read_to_string(ws.join(f))
                .unwrap()
                .trim()
                .parse()
                .unwrap()
        })
        .collect()
}

#[tokio::test]
async fn timeout_kills_the_whole_tree_even_escapees() {
    let agent = HostAgent::start(&[]).await.unwrap();
    let mut c = agent.client().unwrap();
    let r = run(
        &mut c,
        pb::ExecStart {
            // Far longer than the escapees take to start (they say `ready`
            // first), so the deadline never races them on a slow machine.
            timeout_ms: 10_000,
            kill_grace_ms: 300,
            ..shell(ESCAPEES)
        },
    )
    .await
    .unwrap();
    assert_eq!(
        r.stdout, b"ready\n",
        "every escapee was up before the deadline"
    );
    let exited = r.exited.unwrap();
    assert!(exited.timed_out && exited.killed, "{exited:?}");
    for pid in escapee_pids(&agent.workspace) {
        assert!(!alive(pid), "process {pid} outlived the timeout");
    }
}

#[tokio::test]
async fn kill_tree_signal_and_normal_exit_leave_nothing_behind() {
    let agent = HostAgent::start(&[]).await.unwrap();
    let mut c = agent.client().unwrap();
    let (_tx, mut events) = start_interactive(
        &mut c,
        pb::ExecStart {
            exec_id: "tree".into(),
            kill_grace_ms: 200,
            ..shell(ESCAPEES)
        },
    )
    .await
    .unwrap();
    let mut r = client::ExecResult::default();
    read_until(&mut events, &mut r, |r| r.stdout == b"ready\n")
        .await
        .unwrap();
    c.signal(pb::SignalRequest {
        exec_id: "tree".into(),
        signal: 0,
        kill_tree: true,
    })
    .await
    .unwrap();
    read_to_end(&mut events, &mut r).await.unwrap();
    assert!(r.exited.unwrap().killed);
    for pid in escapee_pids(&agent.workspace) {
        assert!(!alive(pid), "process {pid} survived kill_tree");
    }

    // A command that exits normally still takes its leftovers with it.
    let r = run(&mut c, shell("sleep 1000 & echo $! > bg.pid"))
        .await
        .unwrap();
    assert_eq!(r.code(), Some(0));
    let bg: i32 = std::fs::read_to_string(agent.workspace.join("bg.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(!alive(bg));
}

#[tokio::test]
async fn commands_inherit_only_stdio() {
    let agent = HostAgent::start(&[]).await.unwrap();
    let mut c = agent.client().unwrap();
    let r = run(&mut c, start(&["ls", "/proc/self/fd"])).await.unwrap();
    // 0, 1, 2 and the fd `ls` itself opened to read the directory.
    let fds: Vec<String> = r
        .stdout_str()
        .split_whitespace()
        .map(String::from)
        .collect();
    assert!(fds.len() <= 4, "leaked fds: {fds:?}");
    for fd in ["0", "1", "2"] {
        assert!(fds.contains(&fd.to_string()));
    }
}

#[tokio::test]
async fn rlimits_apply_to_the_command() {
    let agent = HostAgent::start(&[]).await.unwrap();
    let mut c = agent.client().unwrap();
    let r = run(
        &mut c,
        pb::ExecStart {
            rlimits: Some(pb::Rlimits {
                open_files: Some(17),
                file_size_bytes: Some(4096),
                ..Default::default()
            }),
            ..shell("ulimit -n; ulimit -f")
        },
    )
    .await
    .unwrap();
    // ulimit -f reports 512-byte blocks.
    assert_eq!(r.stdout_str(), "17\n8\n");
}

#[tokio::test]
async fn output_is_bounded_and_marks_what_was_dropped() {
    let agent = HostAgent::start(&["--output-cap", "65536"]).await.unwrap();
    let mut c = agent.client().unwrap();
    // A reader that is not there while the output is produced (it reads
    // only after the command ended) finds the head, the tail and the gap.
    let (_tx, events) = start_interactive(
        &mut c,
        pb::ExecStart {
            exec_id: "loud".into(),
            ..shell("head -c 10000000 /dev/zero | tr '\\0' x; echo END")
        },
    )
    .await
    .unwrap();
    drop(events);
    bridle_tests::eventually("the loud exec has exited", PATIENCE, async || {
        let list = c
            .list_execs(pb::ListExecsRequest {})
            .await
            .unwrap()
            .into_inner();
        list.execs
            .iter()
            .any(|e| e.exec_id == "loud" && e.state == pb::ExecState::Exited as i32)
    })
    .await;
    let r = attach(&mut c, "loud", 0).await.unwrap();
    let exited = r.exited.unwrap();
    assert_eq!(exited.output_bytes, 10_000_004);
    assert_eq!(r.stdout.len(), 65536);
    assert!(r.stdout.ends_with(b"END\n"));
    assert_eq!(r.dropped.len(), 1);
    let (from, to) = r.dropped[0];
    assert_eq!((from, to), (32768, 10_000_004 - 32768));
    assert_eq!(exited.output_dropped_bytes, to - from);
}

#[tokio::test]
async fn files_round_trip_and_refuse_escapes() {
    let agent = HostAgent::start(&[]).await.unwrap();
    let mut c = agent.client().unwrap();
    let data = Bytes::from(
        (0..3_000_000u32)
            .map(|i| (i % 251) as u8)
            .collect::<Vec<u8>>(),
    );
    let resp = write_file(&mut c, client::write_header("a/b/data.bin"), data.clone())
        .await
        .unwrap();
    assert_eq!(resp.size, data.len() as u64);
    assert_eq!(resp.sha256, bridle_tests::sha256_hex(&data));
    assert_eq!(read_file(&mut c, "a/b/data.bin").await.unwrap(), data);
    let abs = format!("{}/a/b/data.bin", agent.workspace.display());
    assert_eq!(read_file(&mut c, &abs).await.unwrap().len(), data.len());

    let mut part = c
        .read_file(pb::ReadFileRequest {
            path: "a/b/data.bin".into(),
            offset: 10,
            length: 5,
        })
        .await
        .unwrap()
        .into_inner();
    let chunk = bounded("a part of a file", part.message())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((chunk.offset, &chunk.data[..]), (10, &data[10..15]));

    std::os::unix::fs::symlink("/etc", agent.workspace.join("etc-link")).unwrap();
    std::os::unix::fs::symlink("/proc/self/root", agent.workspace.join("root-link")).unwrap();
    for path in [
        "../outside",
        "/etc/passwd",
        "etc-link/passwd",
        "root-link/etc/passwd",
        "a/../../x",
        "/proc/self/root/etc/passwd",
    ] {
        let err = read_file(&mut c, path).await.unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{path}: {err:?}");
        let err = write_file(&mut c, client::write_header(path), Bytes::from_static(b"x"))
            .await
            .unwrap_err();
        assert!(
            matches!(err.code(), Code::PermissionDenied | Code::InvalidArgument),
            "{path}: {err:?}"
        );
    }
    assert!(!agent.dir.path().join("outside").exists());

    let st = c
        .stat(pb::StatRequest {
            path: "etc-link".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .info
        .unwrap();
    assert_eq!(st.r#type, pb::FileType::Symlink as i32);
    assert_eq!(st.symlink_target, "/etc");

    c.make_dir(pb::MakeDirRequest {
        path: "d/e".into(),
        parents: true,
        mode: 0,
    })
    .await
    .unwrap();
    c.r#move(pb::MoveRequest {
        from: "a/b/data.bin".into(),
        to: "d/e/moved.bin".into(),
        overwrite: false,
    })
    .await
    .unwrap();
    let listing = c
        .list_dir(pb::ListDirRequest {
            path: "d".into(),
            depth: 2,
        })
        .await
        .unwrap()
        .into_inner();
    let paths: Vec<_> = listing.entries.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(paths, ["d/e", "d/e/moved.bin"]);
    let err = c
        .remove(pb::RemoveRequest {
            path: "d".into(),
            recursive: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    c.remove(pb::RemoveRequest {
        path: "d".into(),
        recursive: true,
    })
    .await
    .unwrap();
    let err = c
        .stat(pb::StatRequest { path: "d".into() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

#[tokio::test]
async fn an_aborted_upload_changes_nothing() {
    let agent = HostAgent::start(&[]).await.unwrap();
    let mut c = agent.client().unwrap();
    std::fs::write(agent.workspace.join("f"), b"original").unwrap();
    // A header followed by a second header is a malformed stream.
    let msgs = vec![
        pb::WriteFileRequest {
            request: Some(pb::write_file_request::Request::Header(
                client::write_header("f"),
            )),
        },
        pb::WriteFileRequest {
            request: Some(pb::write_file_request::Request::Data(Bytes::from_static(
                b"partial",
            ))),
        },
        pb::WriteFileRequest {
            request: Some(pb::write_file_request::Request::Header(
                client::write_header("f"),
            )),
        },
    ];
    let err = c.write_file(futures::stream::iter(msgs)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(
        std::fs::read(agent.workspace.join("f")).unwrap(),
        b"original"
    );
    assert_eq!(
        std::fs::read_dir(&agent.workspace).unwrap().count(),
        1,
        "no temp file left"
    );
}

#[tokio::test]
async fn snapshot_and_restore_round_trip() {
    let agent = HostAgent::start(&[]).await.unwrap();
    let mut c = agent.client().unwrap();
    let r = run(
        &mut c,
        shell("mkdir -p src/deep && echo a > src/a && echo b > src/deep/b && ln -s deep/b src/link && chmod 0750 src/deep && mkdir skip && echo x > skip/x"),
    )
    .await
    .unwrap();
    assert_eq!(r.code(), Some(0));
    for compression in [pb::Compression::None, pb::Compression::Zstd] {
        let tar = snapshot(
            &mut c,
            pb::SnapshotRequest {
                exclude: vec!["skip".into()],
                compression: compression as i32,
                ..Default::default()
            },
        )
        .await
        .unwrap();
        run(&mut c, shell("rm -rf src skip; echo junk > junk"))
            .await
            .unwrap();
        let resp = restore(&mut c, "", Bytes::from(tar)).await.unwrap();
        assert!(resp.entries >= 5);
        let r = run(
            &mut c,
            shell("find . | sort; cat src/link; stat -c %a src/deep"),
        )
        .await
        .unwrap();
        assert_eq!(
            r.stdout_str(),
            ".\n./src\n./src/a\n./src/deep\n./src/deep/b\n./src/link\nb\n750\n",
            "{compression:?}"
        );
    }
    // Bad requests are refused on the call itself, before any stream starts.
    for (req, code) in [
        (
            pb::SnapshotRequest {
                exclude: vec!["[".into()],
                ..Default::default()
            },
            Code::InvalidArgument,
        ),
        (
            pb::SnapshotRequest {
                path: "../..".into(),
                ..Default::default()
            },
            Code::PermissionDenied,
        ),
        (
            pb::SnapshotRequest {
                path: "missing".into(),
                ..Default::default()
            },
            Code::NotFound,
        ),
    ] {
        let err = c
            .snapshot(req.clone())
            .await
            .err()
            .unwrap_or_else(|| panic!("{req:?} was accepted"));
        assert_eq!(err.code(), code, "{req:?}: {err:?}");
    }
}

/// `key = "value"` in `[section]` of a Cargo.toml, unquoted.
fn toml_value(toml: &str, section: &str, key: &str) -> Option<String> {
    let mut current = "";
    for line in toml.lines().map(str::trim) {
        if line.starts_with('[') {
            current = line;
            continue;
        }
        match line.split_once('=') {
            Some((k, v)) if current == section && k.trim() == key => {
                return Some(v.trim().trim_matches('"').to_string())
            }
            _ => {}
        }
    }
    None
}

/// The sandbox-agent crate's version as its sources say it now: its own
/// Cargo.toml, or the workspace's when the crate inherits it.
fn agent_crate_version() -> String {
    let root = bridle_tests::repo_root();
    let read = |path: &str| {
        std::fs::read_to_string(root.join(path)).unwrap_or_else(|e| panic!("reading {path}: {e}"))
    };
    let own = read("sandbox-agent/Cargo.toml");
    if let Some(version) = toml_value(&own, "[package]", "version") {
        return version;
    }
    assert_eq!(
        toml_value(&own, "[package]", "version.workspace").as_deref(),
        Some("true"),
        "sandbox-agent/Cargo.toml names no version"
    );
    toml_value(&read("Cargo.toml"), "[workspace.package]", "version")
        .expect("the workspace's Cargo.toml names a version")
}

/// A field of /proc/<pid>/status (`name` with its colon), trimmed.
fn proc_status(pid: u32, name: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .map(|v| v.trim().to_string())
        .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
}

/// The first number of a /proc/<pid>/status field (`Uid:`: the real uid).
fn proc_status_number(pid: u32, name: &str) -> u64 {
    let value = proc_status(pid, name);
    value
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{name} {value:?} of process {pid}"))
}

/// What the kernel says of a process's cgroup.
#[derive(Debug, PartialEq)]
struct CgroupTruth {
    version: u32,
    /// None: unlimited, or no such controller there.
    memory_limit: Option<u64>,
    pids_limit: Option<u64>,
    /// Whether the cgroup accounts the memory its processes use.
    memory_accounted: bool,
}

/// The cgroup of process `pid`, from /proc/<pid>/cgroup and the files of
/// that cgroup under /sys/fs/cgroup.
fn cgroup_of(pid: u32) -> CgroupTruth {
    let membership = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let root = std::path::Path::new("/sys/fs/cgroup");
    let number = |text: Option<String>| text.and_then(|t| t.trim().parse::<u64>().ok());
    if root.join("cgroup.controllers").exists() {
        // The unified hierarchy: one line, `0::<path>`.
        let path = membership
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .unwrap_or_else(|| panic!("no cgroup v2 line in {membership:?}"));
        let dir = root.join(path.trim_start_matches('/'));
        let read = |file: &str| std::fs::read_to_string(dir.join(file)).ok();
        CgroupTruth {
            version: 2,
            memory_limit: number(read("memory.max")),
            pids_limit: number(read("pids.max")),
            memory_accounted: read("memory.current").is_some(),
        }
    } else {
        // One hierarchy per controller, `<n>:<controllers>:<path>`, mounted
        // at /sys/fs/cgroup/<controller>; a container's mount is rooted at
        // its own cgroup, where the path from the host's root is not found.
        let read = |controller: &str, file: &str| {
            let path = membership.lines().find_map(|l| {
                let mut parts = l.splitn(3, ':');
                let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
                controllers
                    .split(',')
                    .any(|c| c == controller)
                    .then_some(path)
            })?;
            let mount = root.join(controller);
            std::fs::read_to_string(mount.join(path.trim_start_matches('/')).join(file))
                .or_else(|_| std::fs::read_to_string(mount.join(file)))
                .ok()
        };
        CgroupTruth {
            version: 1,
            // v1 says "unlimited" with a huge number.
            memory_limit: number(read("memory", "memory.limit_in_bytes"))
                .filter(|b| (1..(1u64 << 62)).contains(b)),
            pids_limit: number(read("pids", "pids.max")),
            memory_accounted: read("memory", "memory.usage_in_bytes").is_some(),
        }
    }
}

/// Whether openat2(2) with RESOLVE_BENEATH works here: the kernel has it
/// and no seccomp profile refuses it.
fn openat2_works(dir: &std::path::Path) -> bool {
    use std::os::fd::AsRawFd;
    let dir = std::fs::File::open(dir).unwrap();
    // SAFETY: open_how is a plain C struct of integers; all-zero is valid.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_PATH | libc::O_CLOEXEC) as u64;
    how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: a valid open_how with its size, and a NUL-terminated path.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            c".".as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd >= 0 {
        // SAFETY: the descriptor was just opened here and is closed once.
        unsafe { libc::close(fd as i32) };
        return true;
    }
    let errno = std::io::Error::last_os_error().raw_os_error();
    !matches!(errno, Some(libc::ENOSYS) | Some(libc::EPERM))
}

/// Every value Info reports is checked against what the agent's sources
/// and the kernel say of the agent process, never against a constant
/// alone: a hard-coded answer would not match them.
#[tokio::test]
async fn info_reports_version_cgroup_and_capabilities() {
    let agent = HostAgent::start(&[]).await.unwrap();
    let mut c = agent.client().unwrap();
    let pid = agent.pid();
    let rss_before = proc_status_number(pid, "VmRSS:") * 1024;
    let info = bounded("Info", c.info(pb::InfoRequest {}))
        .await
        .unwrap()
        .into_inner();
    let rss_after = proc_status_number(pid, "VmRSS:") * 1024;

    assert_eq!(
        info.version,
        agent_crate_version(),
        "the version in sandbox-agent's Cargo.toml"
    );
    assert_eq!(info.pid, pid);
    assert_eq!(
        (info.uid as u64, info.gid as u64),
        (
            proc_status_number(pid, "Uid:"),
            proc_status_number(pid, "Gid:")
        )
    );
    assert_eq!(info.workspace, agent.workspace.display().to_string());

    // Linux capabilities and privileges, as the kernel has them.
    assert_eq!(info.cap_eff, proc_status(pid, "CapEff:"));
    assert_eq!(info.no_new_privs, proc_status(pid, "NoNewPrivs:") == "1");

    // The agent's features: the path resolver it says it uses is the one
    // this kernel (and seccomp profile) allows.
    let resolver = if openat2_works(&agent.workspace) {
        "files.openat2"
    } else {
        "files.nofollow-walk"
    };
    let resolvers: Vec<&str> = info
        .capabilities
        .iter()
        .map(String::as_str)
        .filter(|c| c.starts_with("files."))
        .collect();
    assert_eq!(resolvers, [resolver], "{:?}", info.capabilities);
    assert_eq!(info.kill_mode, "subreaper", "no delegated cgroup on a host");

    // The cgroup the agent is in, its limits (or none) and its accounting.
    let cg = info.cgroup.unwrap();
    let truth = cgroup_of(pid);
    assert_eq!(
        CgroupTruth {
            version: cg.version,
            memory_limit: cg.memory_limit_bytes,
            pids_limit: cg.pids_limit,
            memory_accounted: cg.memory_current_bytes > 0,
        },
        truth,
        "{cg:?}"
    );

    // Its resident set, as the kernel counted it around the call.
    let (low, high) = (rss_before.min(rss_after), rss_before.max(rss_after));
    assert!(
        (low / 2..=high * 2).contains(&info.agent_rss_bytes),
        "reported RSS {} against {rss_before}..{rss_after} from /proc",
        info.agent_rss_bytes
    );
}

#[tokio::test]
async fn sigterm_stops_running_commands_and_exits_cleanly() {
    let mut agent = HostAgent::start(&[]).await.unwrap();
    let mut c = agent.client().unwrap();
    let (_tx, mut events) =
        start_interactive(&mut c, shell("echo $$ > main.pid; echo up; sleep 1000"))
            .await
            .unwrap();
    let mut r = client::ExecResult::default();
    read_until(&mut events, &mut r, |r| r.stdout == b"up\n")
        .await
        .unwrap();
    let main: i32 = std::fs::read_to_string(agent.workspace.join("main.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // SIGTERM, and a bounded wait for the agent to exit (a plain wait
    // would hang a broken run).
    let pid = agent.pid() as i32;
    // SAFETY: kill(2) of the agent this test started.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    bridle_tests::eventually("the agent exits on SIGTERM", PATIENCE, async || !alive(pid)).await;
    // Collects the exit status (the agent is gone: the wait returns at once).
    let status = agent.terminate().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(!alive(main));
    assert!(!agent.socket.exists(), "socket removed on exit");
}

#[tokio::test]
async fn a_flood_with_a_slow_reader_does_not_grow_the_agent() {
    let agent = HostAgent::start(&["--output-cap", "1048576"])
        .await
        .unwrap();
    let mut c = agent.client().unwrap();
    let rss_before = c
        .info(pb::InfoRequest {})
        .await
        .unwrap()
        .into_inner()
        .agent_rss_bytes;
    // 400 MB of output, read one event at a time with pauses in between.
    let (_tx, mut events) =
        start_interactive(&mut c, start(&["head", "-c", "400000000", "/dev/zero"]))
            .await
            .unwrap();
    let mut r = client::ExecResult::default();
    let mut peak_rss = 0;
    let mut seen = 0u32;
    let slow_reader = async {
        while let Some(ev) = events.message().await.unwrap() {
            client::apply(&mut r, ev);
            seen += 1;
            if seen.is_multiple_of(8) {
                tokio::time::sleep(Duration::from_millis(20)).await;
                let rss = c
                    .info(pb::InfoRequest {})
                    .await
                    .unwrap()
                    .into_inner()
                    .agent_rss_bytes;
                peak_rss = peak_rss.max(rss);
            }
        }
    };
    // Slow on purpose, so bounded more generously than other waits.
    tokio::time::timeout(Duration::from_secs(300), slow_reader)
        .await
        .expect("the flood's stream did not end within 300 s");
    let exited = r.exited.expect("the flood ends");
    assert_eq!(exited.code, Some(0));
    assert_eq!(exited.output_bytes, 400_000_000);
    assert!(exited.output_dropped_bytes > 0);
    assert!(
        !r.dropped.is_empty(),
        "the slow reader is told what it missed"
    );
    let received = r.stdout.len() as u64 + r.dropped.iter().map(|(a, b)| b - a).sum::<u64>();
    assert_eq!(
        received, 400_000_000,
        "every byte is either delivered or accounted as dropped"
    );
    assert!(
        peak_rss < rss_before + (64 << 20),
        "agent RSS grew from {rss_before} to {peak_rss} while a slow reader lagged"
    );
}

#[tokio::test]
async fn idle_exec_streams_get_keepalives() {
    let agent = HostAgent::start(&["--keepalive-secs", "1"]).await.unwrap();
    let mut c = agent.client().unwrap();
    // Three silent seconds against a one-second keepalive interval.
    let r = run(&mut c, shell("sleep 3; echo done")).await.unwrap();
    assert_eq!(r.stdout, b"done\n");
    assert!(r.keepalives >= 1, "no keepalive on a silent stream: {r:?}");
}

#[tokio::test]
async fn signal_reaches_the_command() {
    let agent = HostAgent::start(&[]).await.unwrap();
    let mut c = agent.client().unwrap();
    let (_tx, mut events) = start_interactive(
        &mut c,
        pb::ExecStart {
            exec_id: "trapper".into(),
            ..shell("trap 'echo got-usr1; exit 7' USR1; echo ready; while :; do sleep 0.05; done")
        },
    )
    .await
    .unwrap();
    let mut r = client::ExecResult::default();
    read_until(&mut events, &mut r, |r| r.stdout == b"ready\n")
        .await
        .unwrap();
    c.signal(pb::SignalRequest {
        exec_id: "trapper".into(),
        signal: libc::SIGUSR1,
        kill_tree: false,
    })
    .await
    .unwrap();
    read_to_end(&mut events, &mut r).await.unwrap();
    assert_eq!(r.stdout, b"ready\ngot-usr1\n");
    let exited = r.exited.unwrap();
    assert_eq!(exited.code, Some(7));
    assert!(!exited.killed);
    // A finished exec cannot be signalled, and a bogus signal is refused.
    let err = c
        .signal(pb::SignalRequest {
            exec_id: "trapper".into(),
            signal: libc::SIGUSR1,
            kill_tree: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    let err = c
        .signal(pb::SignalRequest {
            exec_id: "nope".into(),
            signal: 999,
            kill_tree: false,
        })
        .await
        .unwrap_err();
    assert!(
        matches!(err.code(), Code::InvalidArgument | Code::NotFound),
        "{err:?}"
    );
}

#[tokio::test]
async fn killing_its_own_supervisor_does_not_let_a_command_escape() {
    let agent = HostAgent::start(&[]).await.unwrap();
    let mut c = agent.client().unwrap();
    // The command's parent is its supervisor, which it can signal (same
    // uid). Its children must still not outlive the exec.
    let r = run(
        &mut c,
        pb::ExecStart {
            timeout_ms: 60_000,
            ..shell("sleep 1000 & echo $! > bg.pid; setsid sleep 1000 & echo $! > bg2.pid; kill -9 $PPID; sleep 1000")
        },
    )
    .await
    .unwrap();
    let exited = r.exited.expect("the exec ends when its supervisor is gone");
    assert!(exited.killed, "{exited:?}");
    assert_eq!(
        (exited.code, exited.signal),
        (None, None),
        "the command's own status is unknown"
    );
    for f in ["bg.pid", "bg2.pid"] {
        let pid: i32 = std::fs::read_to_string(agent.workspace.join(f))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // The agent stops strays as soon as it learns the supervisor is gone.
        let deadline = std::time::Instant::now() + PATIENCE;
        while alive(pid) && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(!alive(pid), "{f}: process {pid} escaped its exec");
    }
    // The agent still works.
    assert_eq!(run(&mut c, start(&["true"])).await.unwrap().code(), Some(0));
}

#[tokio::test]
async fn a_killed_spawner_is_replaced_and_running_execs_survive() {
    let agent = HostAgent::start(&[]).await.unwrap();
    let mut c = agent.client().unwrap();
    let (tx, mut events) = start_interactive(
        &mut c,
        pb::ExecStart {
            stdin: true,
            ..shell("echo up; read x; echo after")
        },
    )
    .await
    .unwrap();
    let mut r = client::ExecResult::default();
    read_until(&mut events, &mut r, |r| r.stdout == b"up\n")
        .await
        .unwrap();
    // A command could do this too: the spawner runs as the same user.
    let r2 = run(
        &mut c,
        shell(&format!(
            // Pick first, then kill: killing the spawner re-parents its
            // supervisors to the agent, and they carry the same name.
            "t=''; for d in /proc/[0-9]*; do \
               ppid=$(sed 's/.*) //' $d/stat | cut -d' ' -f2); \
               if [ \"$ppid\" = {} ] && grep -q __spawner $d/cmdline; then t=\"$t ${{d#/proc/}}\"; fi; \
             done; for p in $t; do kill -9 $p && echo killed; done",
            agent.pid()
        )),
    )
    .await
    .unwrap();
    assert_eq!(r2.stdout_str(), "killed\n");
    // The running exec is unaffected.
    tx.send(client::stdin(b"go\n")).await.unwrap();
    read_to_end(&mut events, &mut r).await.unwrap();
    assert_eq!(r.stdout, b"up\nafter\n");
    assert_eq!(r.code(), Some(0));
    // New execs get a new spawner.
    let r3 = run(&mut c, start(&["echo", "fine"])).await.unwrap();
    assert_eq!(r3.stdout, b"fine\n", "{r3:?}");
}

#[tokio::test]
async fn tcp_listener_health_and_reflection() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let addr = format!("127.0.0.1:{port}");
    let _agent = HostAgent::start(&["--tcp", &addr]).await.unwrap();
    let channel = tonic::transport::Endpoint::try_from(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut agent = pb::sandbox_agent_client::SandboxAgentClient::new(channel.clone());
    let info = agent.info(pb::InfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.version, agent_crate_version());

    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "bridle.sandbox.v1.SandboxAgent".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        status.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    // Server reflection: what grpcurl uses to work without .proto files.
    use tonic_reflection::pb::v1 as refl;
    let mut reflection = refl::server_reflection_client::ServerReflectionClient::new(channel);
    let request = refl::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            refl::server_reflection_request::MessageRequest::ListServices(String::new()),
        ),
    };
    let mut responses = reflection
        .server_reflection_info(futures::stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = bounded("the reflection answer", responses.message())
        .await
        .unwrap()
        .unwrap();
    let Some(refl::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        response.message_response
    else {
        panic!("unexpected reflection answer: {response:?}");
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    assert!(
        names.contains(&"bridle.sandbox.v1.SandboxAgent"),
        "{names:?}"
    );
    assert!(names.contains(&"grpc.health.v1.Health"), "{names:?}");
}

#[tokio::test]
async fn write_options_mode_and_no_overwrite() {
    let agent = HostAgent::start(&[]).await.unwrap();
    let mut c = agent.client().unwrap();
    let header = pb::WriteFileHeader {
        mode: 0o600,
        ..client::write_header("secret.txt")
    };
    write_file(&mut c, header.clone(), Bytes::from_static(b"one"))
        .await
        .unwrap();
    let st = c
        .stat(pb::StatRequest {
            path: "secret.txt".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .info
        .unwrap();
    assert_eq!(st.mode, 0o600);
    let err = write_file(
        &mut c,
        pb::WriteFileHeader {
            no_overwrite: true,
            ..header
        },
        Bytes::from_static(b"two"),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    assert_eq!(
        std::fs::read(agent.workspace.join("secret.txt")).unwrap(),
        b"one"
    );
    // Without create_parents a missing directory is an error, not created.
    let err = write_file(
        &mut c,
        pb::WriteFileHeader {
            create_parents: false,
            ..client::write_header("no/such/dir/f")
        },
        Bytes::from_static(b"x"),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(!agent.workspace.join("no").exists());
}

#[tokio::test]
async fn restore_into_a_subdirectory_leaves_the_rest_alone() {
    let agent = HostAgent::start(&[]).await.unwrap();
    let mut c = agent.client().unwrap();
    run(
        &mut c,
        shell("mkdir -p a b && echo 1 > a/old && echo 2 > b/keep"),
    )
    .await
    .unwrap();
    let archive =
        bridle_tests::tarcraft::build(&[bridle_tests::tarcraft::Entry::file("new", b"3")]);
    restore(&mut c, "a", Bytes::from(archive)).await.unwrap();
    // a/ now holds exactly the archive; b/ is untouched.
    let r = run(&mut c, shell("find . -type f | sort")).await.unwrap();
    assert_eq!(r.stdout_str(), "./a/new\n./b/keep\n");
    assert_eq!(std::fs::read(agent.workspace.join("a/new")).unwrap(), b"3");
    assert_eq!(
        std::fs::read(agent.workspace.join("b/keep")).unwrap(),
        b"2\n"
    );
}

#[tokio::test]
async fn retained_output_has_a_total_budget() {
    // 256 KiB per exec, 600 KiB for everything finished: at most two of the
    // 200 KiB outputs below can be kept, the oldest go first.
    let agent = HostAgent::start(&[
        "--output-cap",
        "262144",
        "--retained-output-bytes",
        "614400",
    ])
    .await
    .unwrap();
    let mut c = agent.client().unwrap();
    for i in 0..5 {
        let r = run(
            &mut c,
            pb::ExecStart {
                exec_id: format!("noisy-{i}"),
                ..start(&["head", "-c", "204800", "/dev/zero"])
            },
        )
        .await
        .unwrap();
        assert_eq!(r.stdout.len(), 204800);
    }
    let list = c
        .list_execs(pb::ListExecsRequest {})
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<_> = list.execs.iter().map(|e| e.exec_id.as_str()).collect();
    assert!(ids.len() <= 3 && ids.contains(&"noisy-4"), "{ids:?}");
    assert!(
        !ids.contains(&"noisy-0"),
        "the oldest is evicted first: {ids:?}"
    );
    let err = attach(&mut c, "noisy-0", 0).await.unwrap_err();
    assert_eq!(
        err.downcast_ref::<tonic::Status>().unwrap().code(),
        Code::NotFound
    );
}
