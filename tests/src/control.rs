//! The real `control-plane` binary, started on a data directory of its own
//! with a free port, and the real `bridle` CLI pointed at it.

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bridle_client::agent::Agent;
use bridle_client::connect;
use bridle_client::control as pb;
use bridle_client::data_dir;
use tonic::transport::Channel;

pub use bridle_client::connect::{Admin, Approvals, Audit, Bearer, Runs, Sandboxes};

/// The bearer of `token`; an empty token sends no `authorization` header
/// at all (an unauthenticated call).
pub fn bearer(token: &str) -> anyhow::Result<Bearer> {
    Ok(if token.is_empty() {
        Bearer::none()
    } else {
        Bearer::new(token)?
    })
}

pub struct ControlPlane {
    pub data: tempfile::TempDir,
    child: Option<Child>,
    pub endpoint: String,
    pub admin_token: String,
    pub instance: String,
    sets: Vec<String>,
    /// CA certificate the CLI verifies an https endpoint with.
    pub ca_cert: Option<PathBuf>,
}

impl ControlPlane {
    /// Starts a control plane whose sandboxes use the image built around the
    /// agent under test; `sets` are extra `--set key=value` flags.
    ///
    /// What it creates in Docker carries this test process's labels
    /// (`docker.labels`, see [`crate::sweep`]), its data directory is marked
    /// as this process's, and the process dies with this one
    /// ([`crate::spawn_tied`]): a suite killed midway leaves nothing that
    /// the next one does not sweep.
    pub async fn start(sets: &[&str]) -> anyhow::Result<Self> {
        // Also the first sweep of this process (see crate::sweep).
        let image = crate::docker::ensure_image()?;
        let data = crate::sweep::temp_dir("bridle-cp-")?;
        let mut sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        if !sets.iter().any(|s| s.starts_with("sandbox.image=")) {
            sets.push(format!("sandbox.image={image:?}"));
        }
        if !sets.iter().any(|s| s.starts_with("docker.labels=")) {
            sets.push(format!("docker.labels={}", crate::sweep::labels_toml()));
        }
        let mut cp = Self {
            data,
            child: None,
            endpoint: String::new(),
            admin_token: String::new(),
            instance: String::new(),
            sets,
            ca_cert: None,
        };
        cp.launch().await?;
        cp.admin_token = data_dir::read_bootstrap_token(&cp.data_dir())?;
        cp.instance = std::fs::read_to_string(cp.data_dir().join("instance"))?
            .trim()
            .to_string();
        Ok(cp)
    }

    pub fn data_dir(&self) -> PathBuf {
        self.data.path().join("data")
    }

    /// A direct, verified connection to the agent of one of this control
    /// plane's sandboxes, as the control plane itself makes it (tests and
    /// the benchmark compare with it).
    pub fn agent_of(&self, sandbox_id: &str) -> anyhow::Result<Agent> {
        let master: [u8; 32] = std::fs::read(self.data_dir().join("agent.key"))?
            .try_into()
            .map_err(|_| anyhow::anyhow!("agent.key is not 32 bytes"))?;
        let key = bridle_proto::handshake::sandbox_key(&master, sandbox_id);
        Ok(bridle_client::agent::connect(
            self.data_dir().join("sandboxes").join(sandbox_id),
            key,
        ))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data.path().join("control-plane.log")).unwrap_or_default()
    }

    /// The last `n` lines of [`ControlPlane::log`].
    fn log_tail(&self, n: usize) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    async fn launch(&mut self) -> anyhow::Result<()> {
        let endpoint_file = self.data_dir().join(data_dir::ENDPOINT_FILE);
        let _ = std::fs::remove_file(&endpoint_file);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.data.path().join("control-plane.log"))?;
        let mut cmd = Command::new(crate::workspace_binary("control-plane", "control-plane")?);
        cmd.arg("--data-dir")
            .arg(self.data_dir())
            .args(["--listen", "127.0.0.1:0"]);
        for s in &self.sets {
            cmd.arg("--set").arg(s);
        }
        cmd.env("BRIDLE_LOG", "info,control_plane=debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = crate::spawn_tied(cmd).context("starting control-plane")?;
        self.child = Some(child);
        let start = Instant::now();
        while !endpoint_file.exists() {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!("control-plane exited with {status}: {}", self.log());
            }
            if start.elapsed() > crate::PATIENCE {
                bail!(
                    "control-plane did not write its endpoint within {:?}: {}",
                    crate::PATIENCE,
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.endpoint = std::fs::read_to_string(&endpoint_file)?.trim().to_string();
        Ok(())
    }

    /// SIGKILL: nothing gets to clean up.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then waits for the process to exit (without blocking the
    /// runtime, so this process's own connections can wind down meanwhile).
    /// A control plane still running after [`crate::PATIENCE`] is killed,
    /// and the test fails with the end of its log.
    pub async fn terminate(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        let mut c = self.child.take().context("not running")?;
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let start = Instant::now();
        loop {
            if let Some(status) = c.try_wait()? {
                return Ok(status);
            }
            if start.elapsed() > crate::PATIENCE {
                let _ = c.kill();
                let _ = c.wait();
                panic!(
                    "timed out after {:?} waiting for the control plane to exit after SIGTERM; \
                     the end of its log:\n{}",
                    crate::PATIENCE,
                    self.log_tail(100)
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Starts the control plane again on the same data directory.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill9();
        self.launch().await
    }

    /// [`ControlPlane::restart`] with `extra` `--set` flags for this start
    /// only.
    pub async fn restart_with(&mut self, extra: &[&str]) -> anyhow::Result<()> {
        let kept = self.sets.clone();
        self.sets.extend(extra.iter().map(|s| s.to_string()));
        let started = self.restart().await;
        self.sets = kept;
        started
    }

    /// A new channel to this control plane, as the CLI makes it (an https
    /// endpoint verified against [`ControlPlane::ca_cert`]).
    async fn channel(&self) -> anyhow::Result<Channel> {
        let ca = match &self.ca_cert {
            Some(path) => Some(std::fs::read(path)?),
            None => None,
        };
        // Bounded as a whole, handshakes included, whatever the client's
        // connect timeout covers: a server may accept and then say nothing.
        let connecting = connect::channel(&self.endpoint, ca.as_deref());
        let what = "a connection to the control plane";
        Ok(crate::within(what, crate::PATIENCE, connecting).await?)
    }

    /// A Sandboxes client sending `token` (empty: no authorization header).
    pub async fn sandboxes(&self, token: &str) -> anyhow::Result<Sandboxes> {
        Ok(connect::sandboxes(self.channel().await?, bearer(token)?))
    }

    pub async fn admin(&self, token: &str) -> anyhow::Result<Admin> {
        Ok(connect::admin(self.channel().await?, bearer(token)?))
    }

    pub async fn runs(&self, token: &str) -> anyhow::Result<Runs> {
        Ok(connect::runs(self.channel().await?, bearer(token)?))
    }

    pub async fn audit(&self, token: &str) -> anyhow::Result<Audit> {
        Ok(connect::audit(self.channel().await?, bearer(token)?))
    }

    pub async fn approvals(&self, token: &str) -> anyhow::Result<Approvals> {
        Ok(connect::approvals(self.channel().await?, bearer(token)?))
    }

    /// A new token with `role` acting for `owner`; answers its secret.
    pub async fn token(&self, role: pb::Role, owner: &str) -> anyhow::Result<String> {
        let mut admin = self.admin(&self.admin_token).await?;
        let created = crate::within(
            "the control plane to answer CreateToken",
            crate::PATIENCE,
            admin.create_token(pb::CreateTokenRequest {
                name: format!("{owner}-{}", role.as_str_name().to_lowercase()),
                role: role as i32,
                owner: owner.into(),
                ttl_seconds: 0,
            }),
        )
        .await?;
        Ok(created.into_inner().secret)
    }

    /// Runs `bridle` against this control plane with `token`. A CLI still
    /// running after [`crate::PATIENCE`] is killed, and the answer is an
    /// error saying so.
    pub fn cli(&self, token: &str, args: &[&str]) -> anyhow::Result<Output> {
        self.cli_with_stdin(token, args, &[])
    }

    pub fn cli_with_stdin(
        &self,
        token: &str,
        args: &[&str],
        stdin: &[u8],
    ) -> anyhow::Result<Output> {
        use std::io::Write;
        let mut child = self
            .cli_command(token, args)?
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting bridle")?;
        let mut input = child.stdin.take().context("stdin")?;
        let data = stdin.to_vec();
        let writer = std::thread::spawn(move || {
            let _ = input.write_all(&data);
        });
        let what = format!("`bridle {}` to exit", args.join(" "));
        let out = crate::child_output_within(child, crate::PATIENCE, &what)?;
        // Ends even if the CLI read nothing: its end of the pipe is closed.
        let _ = writer.join();
        Ok(out)
    }

    /// `bridle args…` against this control plane as `token`: its endpoint,
    /// CA and token in the environment, none of the caller's own.
    fn cli_command(&self, token: &str, args: &[&str]) -> anyhow::Result<Command> {
        let mut cmd = Command::new(crate::workspace_binary("bridle", "bridle")?);
        if let Some(ca) = &self.ca_cert {
            cmd.env("BRIDLE_CA_CERT", ca);
        }
        cmd.args(args)
            .env("BRIDLE_ENDPOINT", &self.endpoint)
            .env("BRIDLE_TOKEN", token)
            .env_remove("BRIDLE_TOKEN_FILE")
            .env_remove("BRIDLE_DATA_DIR");
        Ok(cmd)
    }

    /// Names of this control plane's containers, as Docker lists them.
    pub fn containers(&self) -> Vec<String> {
        containers_labelled(&format!("bridle.control-plane={}", self.instance))
    }

    /// Prints the end of the control plane's log and the processes in each
    /// of its containers to stderr.
    fn dump(&self) {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        eprintln!(
            "--- control-plane log (last {} of {} lines) ---",
            lines.len().min(300),
            lines.len()
        );
        for line in &lines[lines.len().saturating_sub(300)..] {
            eprintln!("{line}");
        }
        for name in self.containers() {
            let ps = crate::output_within(
                Command::new("docker").args(["exec", &name, "ps", "-o", "pid,ppid,stat,args"]),
                crate::PATIENCE,
            );
            eprintln!("--- processes in {name} ---");
            match ps {
                Ok(o) => eprintln!(
                    "{}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                ),
                Err(e) => eprintln!("docker exec: {e}"),
            }
        }
    }
}

pub fn containers_labelled(label: &str) -> Vec<String> {
    let filter = format!("label={label}");
    crate::output_within(
        Command::new("docker").args(["ps", "-a", "--filter", &filter, "--format", "{{.Names}}"]),
        crate::PATIENCE,
    )
    .map(|o| {
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(str::to_string)
            .collect()
    })
    .unwrap_or_default()
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        // A failing test shows what the control plane said and what its
        // sandboxes were running: the only trace CI keeps.
        if std::thread::panicking() {
            self.dump();
        }
        self.kill9();
        // Whatever the test left: containers and their workspace volumes.
        // A create the killed process had already sent may still land on
        // the daemon after the first pass, hence a second one.
        for pass in 0..2 {
            if pass == 1 {
                std::thread::sleep(Duration::from_millis(500));
            }
            for name in self.containers() {
                let volume = format!("{name}-workspace");
                let _ = crate::output_within(
                    Command::new("docker").args(["rm", "-fv", &name]),
                    crate::PATIENCE,
                );
                let _ = crate::output_within(
                    Command::new("docker").args(["volume", "rm", "-f", &volume]),
                    crate::PATIENCE,
                );
            }
        }
        // And the sandboxes' disks, which the killed control plane left
        // mounted (its next start would have kept them): unmounted before
        // the data directory goes, or its removal would stop at them.
        let mounts = self.data_dir().join("disks").join("mnt");
        for entry in std::fs::read_dir(&mounts).into_iter().flatten().flatten() {
            let point = entry.path();
            let unmounted =
                crate::output_within(Command::new("umount").arg(&point), crate::PATIENCE);
            if !unmounted.is_ok_and(|o| o.status.success()) {
                let _ = crate::output_within(
                    Command::new("umount").arg("-l").arg(&point),
                    crate::PATIENCE,
                );
            }
        }
    }
}

/// `docker inspect` of a sandbox's container with a Go template.
pub fn inspect(sandbox_id: &str, format: &str) -> String {
    let container = format!("bridle-{sandbox_id}");
    crate::output_within(
        Command::new("docker").args(["inspect", "--format", format, &container]),
        crate::PATIENCE,
    )
    .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    .unwrap_or_default()
}

pub fn start_request(
    sandbox_id: &str,
    exec: bridle_client::sandbox::ExecStart,
    detach: bool,
) -> pb::ExecRequest {
    pb::ExecRequest {
        request: Some(pb::exec_request::Request::Start(pb::ExecStart {
            sandbox_id: sandbox_id.into(),
            exec: Some(exec),
            detach,
        })),
    }
}

/// Runs a command in a sandbox through the control plane, to completion.
/// Panics if that takes longer than [`crate::PATIENCE`] (a safety net, see
/// [`crate::within`]).
pub async fn exec(
    client: &mut Sandboxes,
    sandbox_id: &str,
    s: bridle_client::sandbox::ExecStart,
) -> Result<crate::client::ExecResult, tonic::Status> {
    let what = format!("an exec in {sandbox_id} to end");
    crate::within(&what, crate::PATIENCE, async move {
        let mut events = client
            .exec(futures::stream::iter([start_request(sandbox_id, s, false)]))
            .await?
            .into_inner();
        let mut r = crate::client::ExecResult::default();
        while let Some(ev) = events.message().await? {
            crate::client::apply(&mut r, ev);
        }
        Ok::<_, tonic::Status>(r)
    })
    .await
}

/// Writes `data` to `path` in a sandbox's workspace, with `mode`, through
/// the control plane.
pub async fn put_file(
    client: &mut Sandboxes,
    sandbox_id: &str,
    path: &str,
    mode: u32,
    data: &[u8],
) -> Result<(), tonic::Status> {
    let mut msgs = vec![pb::WriteFileRequest {
        request: Some(pb::write_file_request::Request::Header(
            pb::WriteFileHeader {
                sandbox_id: sandbox_id.into(),
                file: Some(bridle_proto::sandbox::v1::WriteFileHeader {
                    path: path.into(),
                    mode,
                    ..Default::default()
                }),
            },
        )),
    }];
    msgs.extend(data.chunks(1 << 20).map(|d| pb::WriteFileRequest {
        request: Some(pb::write_file_request::Request::Data(
            bytes::Bytes::copy_from_slice(d),
        )),
    }));
    let what = format!("writing {path} in {sandbox_id}");
    crate::bounded(&what, client.write_file(futures::stream::iter(msgs))).await?;
    Ok(())
}

/// Starts a command through the control plane and hands back the request
/// sender and the event stream.
pub async fn exec_interactive(
    client: &mut Sandboxes,
    sandbox_id: &str,
    s: bridle_client::sandbox::ExecStart,
    detach: bool,
) -> anyhow::Result<(
    tokio::sync::mpsc::Sender<pb::ExecRequest>,
    tonic::Streaming<bridle_client::control::ExecEvent>,
)> {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tx.send(start_request(sandbox_id, s, detach)).await?;
    let events = crate::within(
        "the control plane to answer Exec",
        crate::PATIENCE,
        client.exec(tokio_stream::wrappers::ReceiverStream::new(rx)),
    )
    .await?
    .into_inner();
    Ok((tx, events))
}

/// Creates a sandbox with the server's defaults.
pub async fn create(client: &mut Sandboxes) -> Result<pb::Sandbox, tonic::Status> {
    let created = crate::within(
        "the control plane to answer Create",
        crate::PATIENCE,
        client.create(pb::CreateSandboxRequest::default()),
    )
    .await?;
    Ok(created.into_inner())
}

/// [`ControlPlane::cli`] without blocking the runtime, so the test's own
/// tasks (a Watch, a follower) go on meanwhile; stdin empty. Killed, and the
/// test failed, past [`crate::PATIENCE`].
pub async fn cli(cp: &ControlPlane, token: &str, args: &[&str]) -> Output {
    let mut cmd = tokio::process::Command::from(cp.cli_command(token, args).unwrap());
    cmd.stdin(Stdio::null()).kill_on_drop(true);
    crate::bounded(&format!("bridle {}", args.join(" ")), cmd.output())
        .await
        .unwrap()
}
