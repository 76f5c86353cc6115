//! Sandbox containers on the real Docker daemon, from an image built
//! locally by `images/build.sh` around the agent binary under test.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};

use crate::client::{self, Agent};

/// Whether the daemon is reachable. Outside CI a missing daemon skips the
/// test with a printed reason; in CI (`CI` set) it is a failure.
pub fn require_docker(test: &str) -> bool {
    let ok = Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        if std::env::var_os("CI").is_some() {
            panic!("{test}: the Docker daemon is unreachable, and CI must run every test");
        }
        eprintln!("SKIPPED {test}: the Docker daemon is unreachable");
    }
    ok
}

fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The image for the agent binary under test (or `$BRIDLE_IMAGE`), built once per binary (the
/// tag carries the binary's size and mtime) under a lock shared by all test
/// processes.
pub fn ensure_image() -> anyhow::Result<String> {
    // An image built by hand (`images/build.sh`) can be named instead.
    if let Ok(image) = std::env::var("BRIDLE_IMAGE") {
        return Ok(image);
    }
    let agent = crate::agent_binary()?;
    let meta = std::fs::metadata(&agent)?;
    let mtime = meta
        .modified()?
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos();
    // The image changes with the binary and with the script that builds it.
    let script = std::fs::read(crate::repo_root().join("images/build.sh"))?;
    let key = crate::sha256_hex(
        format!("{}:{mtime}:{}", meta.len(), crate::sha256_hex(&script)).as_bytes(),
    );
    let tag = format!("bridle-sandbox:test-{}", &key[..16]);
    let lock_path = std::env::temp_dir().join("bridle-image-build.lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&lock_path)?;
    // SAFETY: flock on a valid fd; released when `lock` is dropped.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        bail!(
            "locking {}: {}",
            lock_path.display(),
            std::io::Error::last_os_error()
        );
    }
    let exists = Command::new("docker")
        .args(["image", "inspect", "--format", "{{.Id}}", &tag])
        .output()?
        .status
        .success();
    if !exists {
        run(Command::new(crate::repo_root().join("images/build.sh"))
            .arg(&agent)
            .arg(&tag))
        .context("building the sandbox image")?;
    }
    drop(lock);
    Ok(tag)
}

pub struct SandboxOptions {
    pub memory: &'static str,
    pub pids: u32,
    pub extra: Vec<String>,
}

impl Default for SandboxOptions {
    fn default() -> Self {
        Self {
            memory: "256m",
            pids: 128,
            extra: Vec::new(),
        }
    }
}

/// A hardened sandbox container running the agent as PID 1, reached over a
/// Unix socket in a host directory bind-mounted at /run/bridle. Removed
/// (with its workspace volume) on drop.
pub struct Sandbox {
    pub id: String,
    pub socket: PathBuf,
    _socket_dir: tempfile::TempDir,
}

impl Sandbox {
    pub async fn start(opts: SandboxOptions) -> anyhow::Result<Self> {
        let image = ensure_image()?;
        let dir = tempfile::Builder::new().prefix("bridle-sock-").tempdir()?;
        // The agent runs as uid 1000 and must be able to create its socket.
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o777),
        )?;
        let mut cmd = Command::new("docker");
        cmd.args(["run", "-d", "--label", "bridle.test=1"])
            .args(["--user", "1000:1000", "--cap-drop", "ALL"])
            .args(["--security-opt", "no-new-privileges"])
            .args(["--read-only", "--tmpfs", "/tmp:rw,nosuid,nodev,size=64m"])
            .args(["--mount", "type=volume,dst=/workspace"])
            .args(["--network", "none"])
            .args(["--memory", opts.memory, "--memory-swap", opts.memory])
            .args(["--pids-limit", &opts.pids.to_string()])
            .arg("-v")
            .arg(format!("{}:/run/bridle", dir.path().display()))
            .args(&opts.extra)
            .arg(&image);
        let id = run(&mut cmd)?;
        let sandbox = Self {
            id,
            socket: dir.path().join("agent.sock"),
            _socket_dir: dir,
        };
        client::wait_healthy(&sandbox.socket, Duration::from_secs(30))
            .await
            .with_context(|| format!("container {} logs: {}", sandbox.id, sandbox.logs()))?;
        Ok(sandbox)
    }

    pub fn client(&self) -> anyhow::Result<Agent> {
        client::connect(&self.socket)
    }

    pub fn logs(&self) -> String {
        Command::new("docker")
            .args(["logs", "--tail", "50", &self.id])
            .output()
            .map(|o| {
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                )
            })
            .unwrap_or_default()
    }

    /// `docker inspect` with a Go template.
    pub fn inspect(&self, format: &str) -> anyhow::Result<String> {
        run(Command::new("docker").args(["inspect", "--format", format, &self.id]))
    }

    pub fn socket_dir(&self) -> &Path {
        self.socket.parent().expect("socket has a directory")
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .args(["rm", "-fv", &self.id])
            .output();
    }
}
