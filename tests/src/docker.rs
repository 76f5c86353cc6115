//! Sandbox containers on the real Docker daemon, from an image built
//! locally by `images/build.sh` around the agent binary under test.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};

use crate::client::{self, Agent};

/// Fails the test when the daemon is unreachable: a test that needs
/// Docker never passes without it. (`scripts/test` leaves these tests out,
/// counted as skipped, on a machine without Docker outside CI: the nextest
/// profile `no-docker`.)
pub fn require_docker(test: &str) {
    // A daemon that does not answer within PATIENCE counts as unreachable.
    let ok = crate::output_within(
        Command::new("docker").args(["info", "--format", "{{.ServerVersion}}"]),
        crate::PATIENCE,
    )
    .map(|o| o.status.success())
    .unwrap_or(false);
    assert!(
        ok,
        "{test} needs the Docker daemon, which is unreachable: start it, or run \
         `cargo nextest run --profile no-docker` (or scripts/test, which picks that profile \
         outside CI) to skip the tests that need it"
    );
}

/// How long building the test image may take (it may download busybox).
const IMAGE_BUILD_PATIENCE: Duration = Duration::from_secs(600);

fn run(cmd: &mut Command) -> anyhow::Result<String> {
    run_within(cmd, crate::PATIENCE)
}

fn run_within(cmd: &mut Command, limit: Duration) -> anyhow::Result<String> {
    let out = crate::output_within(cmd, limit).with_context(|| format!("running {cmd:?}"))?;
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
/// processes. The first call in a process sweeps what test processes that
/// are gone left behind ([`crate::sweep`]); the image is held for this
/// process's lifetime, so no sweep removes it meanwhile.
pub fn ensure_image() -> anyhow::Result<String> {
    // An image built by hand (`images/build.sh`) can be named instead.
    if let Ok(image) = std::env::var("BRIDLE_IMAGE") {
        crate::sweep::hold_image(&image)?;
        crate::sweep::once();
        return Ok(image);
    }
    let agent = crate::agent_binary()?;
    let meta = std::fs::metadata(&agent)?;
    let mtime = meta
        .modified()?
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos();
    // The image changes with the binary and with the script that builds it,
    // and is this scope's own (see crate::sweep: its users are judged by
    // locks in this machine's temporary directory).
    let script = std::fs::read(crate::repo_root().join("images/build.sh"))?;
    // (The leading `2`: images of the first labelling scheme, which put an
    // owner label on the image, are not reused.)
    let made_of = format!(
        "2:{}:{mtime}:{}:{}",
        meta.len(),
        crate::sha256_hex(&script),
        crate::sweep::scope()
    );
    let key = crate::sha256_hex(made_of.as_bytes());
    let tag = format!("{}{}", crate::sweep::TEST_IMAGE_PREFIX, &key[..16]);
    // Held before the sweep and before looking for the image: a sweep
    // elsewhere removes no image a live process holds.
    crate::sweep::hold_image(&tag)?;
    crate::sweep::once();
    let lock_path = std::env::temp_dir().join("bridle-image-build.lock");
    let lock = crate::lock_file_within(&lock_path, libc::LOCK_EX, IMAGE_BUILD_PATIENCE)
        .context("waiting for another test process to build the sandbox image")?;
    let exists = crate::output_within(
        Command::new("docker").args(["image", "inspect", "--format", "{{.Id}}", &tag]),
        crate::PATIENCE,
    )?
    .status
    .success();
    if !exists {
        // Labelled with its scope only (a cache that later runs share):
        // the sweep judges test images by use, in their scope.
        run_within(
            Command::new(crate::repo_root().join("images/build.sh"))
                .args(crate::sweep::image_label_args())
                .arg(&agent)
                .arg(&tag),
            IMAGE_BUILD_PATIENCE,
        )
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
        // Marked for the sweep; the directory mounted into the container is
        // one below, so the sandbox never sees the mark.
        let dir = crate::sweep::temp_dir("bridle-sock-")?;
        let run_dir = dir.path().join("run");
        std::fs::create_dir(&run_dir)?;
        // The agent runs as uid 1000 and must be able to create its socket.
        std::fs::set_permissions(
            &run_dir,
            std::os::unix::fs::PermissionsExt::from_mode(0o777),
        )?;
        let mut cmd = Command::new("docker");
        cmd.args(["run", "-d", "--label", "bridle.test=1"])
            .args(crate::sweep::label_args())
            .args(["--user", "1000:1000", "--cap-drop", "ALL"])
            .args(["--security-opt", "no-new-privileges"])
            .args(["--read-only", "--tmpfs", "/tmp:rw,nosuid,nodev,size=64m"])
            .args(["--mount", "type=volume,dst=/workspace"])
            .args(["--network", "none"])
            .args(["--memory", opts.memory, "--memory-swap", opts.memory])
            .args(["--pids-limit", &opts.pids.to_string()])
            .arg("-v")
            .arg(format!("{}:/run/bridle", run_dir.display()))
            .args(&opts.extra)
            .arg(&image);
        let id = run(&mut cmd)?;
        let sandbox = Self {
            id,
            socket: run_dir.join("agent.sock"),
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
        crate::output_within(
            Command::new("docker").args(["logs", "--tail", "50", &self.id]),
            crate::PATIENCE,
        )
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
        let _ = crate::output_within(
            Command::new("docker").args(["rm", "-fv", &self.id]),
            crate::PATIENCE,
        );
    }
}
