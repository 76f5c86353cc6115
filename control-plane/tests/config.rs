//! The control plane's command line: configuration layers, and a bad
//! configuration refused in one line with exit code 2. (The `bridle` CLI's
//! own: cli/tests/cli.rs.)

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
