//! The agent started as a plain process on the host, serving a Unix socket
//! in a temporary directory, with a temporary workspace.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::client::{self, Agent};

pub struct HostAgent {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub workspace: PathBuf,
    child: Option<Child>,
}

impl HostAgent {
    /// Starts the agent with extra flags and waits until it is healthy. The
    /// agent dies with this process ([`crate::spawn_tied`]).
    pub async fn start(extra: &[&str]) -> anyhow::Result<Self> {
        // Marked for the sweep (see crate::sweep).
        let dir = crate::sweep::temp_dir("bridle-host-")?;
        let socket = dir.path().join("agent.sock");
        let workspace = dir.path().join("workspace");
        std::fs::create_dir(&workspace)?;
        let mut cmd = Command::new(crate::agent_binary()?);
        cmd.arg("--socket")
            .arg(&socket)
            .arg("--workspace")
            .arg(&workspace)
            .args(extra)
            .env("BRIDLE_AGENT_LOG", "warn")
            .stdin(Stdio::null());
        let child = crate::spawn_tied(cmd).context("starting sandbox-agent")?;
        let mut agent = Self {
            dir,
            socket,
            workspace,
            child: Some(child),
        };
        client::wait_healthy(&agent.socket, Duration::from_secs(20)).await?;
        // A workspace path that the agent resolved (tempdirs may be symlinked).
        agent.workspace = std::fs::canonicalize(&agent.workspace)?;
        Ok(agent)
    }

    pub fn client(&self) -> anyhow::Result<Agent> {
        client::connect(&self.socket)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Sends SIGTERM and waits for the agent to exit; returns its status.
    /// An agent still running after [`crate::PATIENCE`] is killed, and the
    /// test fails saying so.
    pub fn terminate(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        let mut child = self.child.take().context("already stopped")?;
        // SAFETY: kill(2) of our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + crate::PATIENCE;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "timed out after {:?} waiting for the agent (pid {}) to exit after SIGTERM",
                    crate::PATIENCE,
                    child.id()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for HostAgent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Whether a process exists (and is not a zombie).
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next());
            state != Some("Z")
        }
        Err(_) => false,
    }
}
