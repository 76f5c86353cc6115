//! Support for bridle's end-to-end tests, benchmark and quick start: a thin
//! client for the sandbox agent, the agent started as a host process, and
//! sandbox containers started from locally built images on the real Docker
//! daemon.
//!
//! Every wait here has an end ([`PATIENCE`], [`within`]), so a broken run
//! fails naming what it waited for instead of hanging; the processes the
//! tests start die with them ([`spawn_tied`]); and what they make in Docker
//! is labelled with the test process, so that what a killed run left is
//! swept by the next ([`sweep`]).

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

pub mod client;
pub mod control;
pub mod docker;
pub mod host;
pub mod sweep;
pub mod tarcraft;
pub mod upstream;

use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::{mpsc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// How long any one wait of the tests may take before it counts as a hang.
///
/// A safety net, never what a test asserts: it turns a test that would
/// wait forever into a failure naming what it waited for. Generous, so that
/// a slow or loaded machine never trips it; a test that checks how soon
/// something happens states its own bound.
pub const PATIENCE: Duration = Duration::from_secs(120);

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
    let mut build = cmd
        .spawn()
        .with_context(|| format!("running cargo build -p {package}"))?;
    // Generous: a build from scratch, or one waiting for another's lock on
    // the target directory, takes minutes.
    let limit = Duration::from_secs(30 * 60);
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = build.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = build.kill();
            let _ = build.wait();
            bail!("cargo build -p {package} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
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

/// Polls `check` until it holds; `limit` only bounds a broken run (as does
/// [`PATIENCE`] each check, should one never answer).
pub async fn eventually(what: &str, limit: Duration, mut check: impl AsyncFnMut() -> bool) {
    let start = Instant::now();
    loop {
        let held = match tokio::time::timeout(PATIENCE, check()).await {
            Ok(held) => held,
            Err(_) => panic!("a check did not answer within {PATIENCE:?}, waiting for: {what}"),
        };
        if held {
            return;
        }
        assert!(
            start.elapsed() < limit,
            "never happened within {limit:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `fut`'s output, or a panic saying "timed out after `limit` waiting for
/// `what`" if it has none by then.
///
/// A safety net for waits that would otherwise have no end (a stream that
/// never ends, a call never answered), never what a test asserts: hence a
/// panic rather than an error, which a test expecting an error could take
/// for the one it expects. Use [`PATIENCE`] unless a wait is known to be
/// longer.
pub async fn within<T>(
    what: &str,
    limit: Duration,
    fut: impl std::future::Future<Output = T>,
) -> T {
    match tokio::time::timeout(limit, fut).await {
        Ok(value) => value,
        Err(_) => panic!("timed out after {limit:?} waiting for {what}"),
    }
}

/// [`within`] [`PATIENCE`]: the bound of every wait a test makes itself.
pub async fn bounded<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    within(what, PATIENCE, fut).await
}

/// Fetches a value (`fetch`, each call bounded too) every 50 ms until
/// `done` holds of it, and answers it; past [`PATIENCE`] the test fails
/// naming `what` and the value as last seen.
pub async fn until<T: std::fmt::Debug>(
    what: &str,
    mut fetch: impl AsyncFnMut() -> T,
    done: impl Fn(&T) -> bool,
) -> T {
    let start = Instant::now();
    loop {
        let value = bounded(what, fetch()).await;
        if done(&value) {
            return value;
        }
        assert!(
            start.elapsed() < PATIENCE,
            "never happened within {PATIENCE:?}: {what}; last seen: {value:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// [`Command::output`] (stdin empty, stdout and stderr captured) with an
/// end: once `limit` has passed the process is killed and the answer is an
/// error of kind `TimedOut` naming the command. An error rather than a
/// panic, so that it can be used in `Drop`.
pub fn output_within(cmd: &mut Command, limit: Duration) -> std::io::Result<Output> {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child_output_within(child, limit, &format!("{cmd:?}"))
}

/// [`Child::wait_with_output`] with an end: once `limit` has passed the
/// child is killed and the answer is an error of kind `TimedOut` saying it
/// timed out waiting for `what`.
pub fn child_output_within(
    mut child: Child,
    limit: Duration,
    what: &str,
) -> std::io::Result<Output> {
    let timed_out = || {
        std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("timed out after {limit:?} waiting for {what}"),
        )
    };
    let deadline = Instant::now() + limit;
    // Drained meanwhile, or a child writing more than a pipe holds would
    // never exit.
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let mut pause = Duration::from_millis(1);
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(timed_out());
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(20));
    };
    // Output still in flight when the process exited gets a little longer,
    // but not forever: something it started may hold the pipe open.
    let rest = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_secs(10));
    let stdout = stdout.recv_timeout(rest).map_err(|_| timed_out())?;
    let stderr = stderr.recv_timeout(rest).map_err(|_| timed_out())?;
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}

/// Reads `pipe` to its end on a thread of its own; the receiver gets what
/// was read.
fn drain(pipe: Option<impl Read + Send + 'static>) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut data = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut data);
        }
        let _ = tx.send(data);
    });
    rx
}

/// Takes `op` (`libc::LOCK_SH` or `libc::LOCK_EX`) on the file at `path`
/// (made if missing), waiting at most `limit` for whoever holds a
/// conflicting lock. The lock lasts as long as the returned file is open.
pub fn lock_file_within(
    path: &std::path::Path,
    op: libc::c_int,
    limit: Duration,
) -> anyhow::Result<std::fs::File> {
    let deadline = Instant::now() + limit;
    loop {
        let locked =
            try_lock_file(path, op).with_context(|| format!("locking {}", path.display()))?;
        if let Some(file) = locked {
            return Ok(file);
        }
        if Instant::now() >= deadline {
            bail!(
                "timed out after {limit:?} waiting for a lock on {}",
                path.display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Takes `op` (`libc::LOCK_SH` or `libc::LOCK_EX`) on the file at `path`
/// (made if missing) unless someone holds a conflicting lock: `None` then.
pub fn try_lock_file(
    path: &std::path::Path,
    op: libc::c_int,
) -> std::io::Result<Option<std::fs::File>> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::MetadataExt;
    loop {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        // SAFETY: flock(2) on a descriptor this function owns.
        if unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) } != 0 {
            let e = std::io::Error::last_os_error();
            return if e.kind() == std::io::ErrorKind::WouldBlock {
                Ok(None)
            } else {
                Err(e)
            };
        }
        // Whoever held the lock before may have removed the file (the sweep
        // does, with an image it removed): a lock on a removed file guards
        // nothing, so it is taken again on the file the path names now.
        let locked = file.metadata()?;
        let current = std::fs::metadata(path);
        if current.is_ok_and(|c| c.dev() == locked.dev() && c.ino() == locked.ino()) {
            return Ok(Some(file));
        }
    }
}

/// A command and where to send the child it became.
type SpawnRequest = (Command, mpsc::SyncSender<std::io::Result<Child>>);

/// Starts `cmd` as a child that dies with this process: SIGKILL reaches it
/// when this process ends, however it ends (a suite killed midway leaves no
/// control plane or agent running).
///
/// That is `PR_SET_PDEATHSIG`, which the kernel ties to the *thread* that
/// forked, not to the process: a child spawned from a test's thread (libtest
/// runs each test on a thread of its own) or from a runtime's worker would
/// be killed as soon as that thread ends. So every such child is forked by
/// one thread that lives as long as the process, and this call hands the
/// command over to it and waits for the child.
pub fn spawn_tied(mut cmd: Command) -> std::io::Result<Child> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    let parent = std::process::id() as libc::pid_t;
    let tie = move || -> std::io::Result<()> {
        // SAFETY: prctl(2) on the calling (child) process, a plain system
        // call.
        if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // If this process died before the prctl, the child was re-parented
        // already and the signal will never come: give up on it.
        // SAFETY: getppid(2) has no arguments and cannot fail.
        if unsafe { libc::getppid() } != parent {
            return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
        }
        Ok(())
    };
    // SAFETY: `tie` runs in the child between fork and exec, where only
    // async-signal-safe calls are allowed: it makes two system calls and
    // builds `io::Error`s from errno values, which allocates nothing; it
    // touches no lock and nothing of the parent's but a copied pid.
    unsafe { std::os::unix::process::CommandExt::pre_exec(&mut cmd, tie) };
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("bridle-tests-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("starting the thread that spawns tied children");
        Mutex::new(tx)
    });
    let gone = || std::io::Error::other("the thread that spawns tied children is gone");
    let (reply, child) = mpsc::sync_channel(1);
    spawner
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .send((cmd, reply))
        .map_err(|_| gone())?;
    child.recv().map_err(|_| gone())?
}
