//! The `bridle-scripted-model` binary: it serves a script file, says what it
//! is and where, stops on SIGTERM, and refuses a bad file with one line and
//! exit code 2.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::process::Stdio;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

/// How long any one wait may take before it counts as a hang (a safety
/// net, never what a test asserts).
const PATIENCE: Duration = Duration::from_secs(120);

const BINARY: &str = env!("CARGO_BIN_EXE_bridle-scripted-model");

const BANNER: &str =
    "bridle-scripted-model: a scripted stand-in for a model provider (not a model), listening on ";

#[tokio::test]
async fn the_binary_serves_a_script_file_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("script.json");
    let script = json!({
        "conversations": [{
            "name": "hello",
            "first_user_contains": "hello",
            "turns": [{"text": "hello from a file"}]
        }]
    });
    std::fs::write(&path, script.to_string()).unwrap();
    let mut child = Command::new(BINARY)
        .arg("--script")
        .arg(&path)
        .arg("--listen")
        .arg("127.0.0.1:0")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(PATIENCE, lines.next_line())
        .await
        .expect("the binary printed no line within PATIENCE")
        .unwrap()
        .expect("the binary closed stdout without a line");
    let base_url = line
        .strip_prefix(BANNER)
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"));
    assert!(base_url.starts_with("http://127.0.0.1:"), "{line}");

    let request = json!({
        "model": "m",
        "messages": [{"role": "user", "content": "hello there"}],
    });
    let response = reqwest::Client::new()
        .post(format!("{base_url}/v1/chat/completions"))
        .json(&request)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(
        answer["choices"][0]["message"]["content"],
        "hello from a file"
    );

    let pid = child.id().expect("the binary is still running") as libc::pid_t;
    // SAFETY: kill(2) of our own child, not yet reaped (we hold it).
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let status = tokio::time::timeout(PATIENCE, child.wait())
        .await
        .expect("the binary did not exit within PATIENCE of SIGTERM")
        .unwrap();
    assert!(status.success(), "{status}");
}

#[tokio::test]
async fn a_bad_script_file_is_refused_with_one_line_and_exit_code_2() {
    let dir = tempfile::tempdir().unwrap();
    let not_json = dir.path().join("not-json.json");
    std::fs::write(&not_json, "{not json").unwrap();
    let wrong_shape = dir.path().join("wrong-shape.json");
    std::fs::write(&wrong_shape, r#"{"conversations": [{"name": "a"}]}"#).unwrap();
    let bad_status = dir.path().join("bad-status.json");
    let script = json!({
        "conversations": [{
            "name": "a",
            "first_user_contains": "x",
            "turns": [{"fail_first": [{"status": 200}]}]
        }]
    });
    std::fs::write(&bad_status, script.to_string()).unwrap();
    let missing = dir.path().join("missing.json");

    let cases = [
        (not_json, "is not a valid script"),
        (wrong_shape, "first_user_contains"),
        (bad_status, "200"),
        (missing, "cannot read the script"),
    ];
    for (path, expected) in cases {
        let output = Command::new(BINARY)
            .arg("--script")
            .arg(&path)
            .kill_on_drop(true)
            .output();
        let output = tokio::time::timeout(PATIENCE, output)
            .await
            .expect("the binary did not exit within PATIENCE")
            .unwrap();
        let stderr = String::from_utf8(output.stderr).unwrap();
        assert_eq!(output.status.code(), Some(2), "{path:?}: {stderr}");
        assert!(
            output.stdout.is_empty(),
            "{path:?}: it never said it listens"
        );
        assert_eq!(stderr.lines().count(), 1, "{path:?}: one line: {stderr}");
        assert!(stderr.contains(&path.display().to_string()), "{stderr}");
        assert!(stderr.contains(expected), "{path:?}: {stderr}");
    }
}
