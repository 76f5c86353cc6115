//! The two binaries' command lines: configuration layers, and errors that
//! are one line with an exit code by kind. (Against a live control plane,
//! see tests/tests/control_plane.rs.)

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::process::Command;

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn config_layers_and_bad_config() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("c.toml");
    std::fs::write(
        &file,
        "listen = \"127.0.0.1:1111\"\n[sandbox]\nimage = \"from-file\"\npids = 99\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_control-plane"))
        .args(["--config", file.to_str().unwrap()])
        .args(["--set", "sandbox.pids=77", "--dump-config"])
        .env("BRIDLE_SANDBOX__IMAGE", "from-env")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let dumped = text(&out.stdout);
    assert!(dumped.contains("listen = \"127.0.0.1:1111\""), "{dumped}");
    assert!(dumped.contains("image = \"from-env\""), "{dumped}");
    assert!(dumped.contains("pids = 77"), "{dumped}");

    for bad in [
        vec!["--set", "sandbox.network=wifi"],
        vec!["--set", "sandbox.colour=red"],
        vec!["--config", "/nonexistent/bridle.toml"],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_control-plane"))
            .args(&bad)
            .arg("--dump-config")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{bad:?}");
        let err = text(&out.stderr);
        assert_eq!(err.lines().count(), 1, "{bad:?}: {err}");
    }
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
