//! Support for bridle's end-to-end tests, benchmark and quick start: a thin
//! client for the sandbox agent, the agent started as a host process, and
//! sandbox containers started from locally built images on the real Docker
//! daemon.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

pub mod client;
pub mod control;
pub mod docker;
pub mod host;
pub mod tarcraft;

use std::path::PathBuf;

use anyhow::{bail, Context};

/// The workspace's root directory (where Cargo.toml and images/ live).
///
/// Taken from cargo's `CARGO_MANIFEST_DIR` at run time (`cargo test`,
/// nextest and `cargo run` set it) rather than only at build time: with a
/// target directory shared between checkouts, a build made in another
/// checkout can be reused here and would point at that checkout.
pub fn repo_root() -> PathBuf {
    let manifest = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    manifest
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The `sandbox-agent` binary built alongside the running test or tool:
/// `$BRIDLE_AGENT_BIN`, else the same target directory as this executable.
/// If it is missing (only `-p bridle-tests` was built) it is built now.
pub fn agent_binary() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("BRIDLE_AGENT_BIN") {
        return Ok(PathBuf::from(p));
    }
    workspace_binary("sandbox-agent", "sandbox-agent")
}

/// A binary of this workspace from the same target directory as the running
/// executable, built now (same profile) if it is missing.
pub fn workspace_binary(package: &str, bin: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the current executable")?;
    let mut dir = exe
        .parent()
        .context("executable has no directory")?
        .to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let candidate = dir.join(bin);
    if candidate.exists() {
        return Ok(candidate);
    }
    let release = dir.ends_with("release");
    let mut cmd =
        std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.args(["build", "-p", package, "--bin", bin])
        .current_dir(repo_root());
    if release {
        cmd.arg("--release");
    }
    let status = cmd
        .status()
        .with_context(|| format!("running cargo build -p {package}"))?;
    if !status.success() || !candidate.exists() {
        bail!(
            "{bin} binary not found at {} (build it with `cargo build -p {package}`)",
            candidate.display()
        );
    }
    Ok(candidate)
}

/// sha256 of a byte slice, as lowercase hex.
pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}

/// Polls `check` until it holds; `within` only bounds a broken run.
pub async fn eventually(
    what: &str,
    within: std::time::Duration,
    mut check: impl AsyncFnMut() -> bool,
) {
    let start = std::time::Instant::now();
    while !check().await {
        assert!(start.elapsed() < within, "never happened: {what}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}
