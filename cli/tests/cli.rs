//! The `bridle` command line without a control plane: errors are one line
//! with an exit code by kind. (Against a live control plane, see
//! tests/tests/control_plane.rs.)

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::process::Command;

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn cli_errors_are_one_line_with_an_exit_code() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str], envs: &[(&str, &str)]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_bridle"));
        cmd.args(args)
            .env_remove("BRIDLE_TOKEN")
            .env_remove("BRIDLE_ENDPOINT")
            .env_remove("BRIDLE_TOKEN_FILE")
            .env("BRIDLE_DATA_DIR", dir.path());
        for (k, v) in envs {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    };
    // No token anywhere.
    let out = run(&["sandbox", "list"], &[]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("no token"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    // Nobody listening.
    let out = run(
        &["sandbox", "list"],
        &[
            ("BRIDLE_TOKEN", "t"),
            ("BRIDLE_ENDPOINT", "http://127.0.0.1:9"),
        ],
    );
    assert_eq!(out.status.code(), Some(5), "{}", text(&out.stderr));
    assert_eq!(text(&out.stderr).lines().count(), 1);
    // Usage errors are clap's (exit 2).
    let out = run(
        &["sandbox", "create", "--ttl", "soon"],
        &[("BRIDLE_TOKEN", "t")],
    );
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn a_bad_job_file_is_refused_before_anything_is_contacted() {
    let dir = tempfile::tempdir().unwrap();
    let job = dir.path().join("job.yaml");
    std::fs::write(&job, "steps:\n  - run: a\n    colour: red\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_bridle"))
        .args(["run", job.to_str().unwrap()])
        .env("BRIDLE_TOKEN", "t")
        // Nobody listens there: the file is refused first.
        .env("BRIDLE_ENDPOINT", "http://127.0.0.1:9")
        .env_remove("BRIDLE_TOKEN_FILE")
        .env("BRIDLE_DATA_DIR", dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(6), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.starts_with("bridle: invalid argument: ") && err.contains("job.yaml:3:"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn a_bad_agent_task_is_refused_before_anything_is_contacted() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("system.md");
    let bridle = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_bridle"))
            .args(args)
            .env("BRIDLE_TOKEN", "t")
            // Nobody listens there: the task is refused first.
            .env("BRIDLE_ENDPOINT", "http://127.0.0.1:9")
            .env_remove("BRIDLE_TOKEN_FILE")
            .env("BRIDLE_DATA_DIR", dir.path())
            .output()
            .unwrap()
    };
    let out = bridle(&[
        "agent",
        "run",
        "--model",
        "m",
        "--instructions-file",
        missing.to_str().unwrap(),
        "goal",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(err.contains("system.md"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    let out = bridle(&["agent", "run", "--model", "m", "-e", "NOEQUALS", "goal"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    // Nothing to send is a usage error (clap's exit 2).
    let out = bridle(&["agent", "send", "run-1"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
}
