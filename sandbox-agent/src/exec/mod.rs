//! Commands: starting them under a supervisor, collecting their output into
//! bounded buffers, and keeping their results after they end so that a
//! client that lost its connection can collect them with `Attach`.

pub mod output;
pub mod shim;
pub mod spawner;

use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};

use crate::cgroup::OwnCgroup;
use crate::fs::Workspace;
pub use output::{Item, OutputBuffer, Stream};
use shim::ShimSpec;
use spawner::Spawner;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Invalid(String),
    #[error("no exec with id {0:?}")]
    NotFound(String),
    #[error("exec {0:?} has already finished")]
    Finished(String),
    #[error("exec {0:?} is still running; stop it before releasing it")]
    StillRunning(String),
    #[error("exec {0:?} has no {1}")]
    NoSuchStream(String, &'static str),
    #[error("the agent is shutting down")]
    ShuttingDown,
    #[error("{context}: {source}")]
    Io {
        context: &'static str,
        source: std::io::Error,
    },
}

fn io_err(context: &'static str) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Io { context, source }
}

#[derive(Debug, Clone, Default)]
pub struct Rlimits {
    pub cpu_seconds: Option<u64>,
    pub address_space_bytes: Option<u64>,
    pub file_size_bytes: Option<u64>,
    pub open_files: Option<u64>,
    pub processes: Option<u64>,
    pub core_bytes: Option<u64>,
    pub stack_bytes: Option<u64>,
}

impl Rlimits {
    fn to_shim(&self) -> Vec<(String, u64)> {
        [
            ("cpu", self.cpu_seconds),
            ("as", self.address_space_bytes),
            ("fsize", self.file_size_bytes),
            ("nofile", self.open_files),
            ("nproc", self.processes),
            ("core", self.core_bytes),
            ("stack", self.stack_bytes),
        ]
        .into_iter()
        .filter_map(|(n, v)| v.map(|v| (n.to_string(), v)))
        .collect()
    }
}

/// A validated request to start a command.
#[derive(Debug, Clone, Default)]
pub struct ExecSpec {
    pub exec_id: String,
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub clear_env: bool,
    pub cwd: String,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub stdin: bool,
    pub pty: Option<(u16, u16)>,
    pub timeout: Option<Duration>,
    pub kill_grace: Option<Duration>,
    pub rlimits: Rlimits,
}

#[derive(Debug, Clone, Default)]
pub struct ExitInfo {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub timed_out: bool,
    pub killed: bool,
    pub oom_killed: bool,
    pub duration: Duration,
    pub user_cpu_us: u64,
    pub system_cpu_us: u64,
    pub max_rss_bytes: u64,
    pub output_bytes: u64,
    pub output_dropped_bytes: u64,
}

#[derive(Debug, Clone)]
pub enum Outcome {
    Exited(ExitInfo),
    SpawnFailed { reason: String, errno: i32 },
}

#[derive(Debug, Clone)]
pub struct Limits {
    /// Output bytes kept per exec (head + tail).
    pub output_cap: usize,
    /// How long a finished exec's result is kept for Attach.
    pub retention: Duration,
    /// Finished execs kept at most; the oldest go first.
    pub max_retained: usize,
    /// Output bytes kept by all finished execs together; past it, the
    /// oldest finished execs are forgotten first.
    pub retained_output_bytes: usize,
    pub default_grace: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            output_cap: 8 << 20,
            retention: Duration::from_secs(3600),
            max_retained: 1024,
            retained_output_bytes: 64 << 20,
            default_grace: Duration::from_secs(2),
        }
    }
}

/// ^D, the default VEOF of a terminal.
const VEOF: u8 = 4;

/// Where stdin bytes go: a pipe, or a terminal's master side.
enum Stdin {
    Pipe(tokio::net::unix::pipe::Sender),
    Pty(PtyWriter),
}

impl Stdin {
    async fn write_all(&mut self, data: &[u8]) -> std::io::Result<()> {
        match self {
            Stdin::Pipe(p) => p.write_all(data).await,
            Stdin::Pty(t) => t.write_all(data).await,
        }
    }
}

/// Writes to a terminal master (non-blocking, through the reactor).
struct PtyWriter(tokio::io::unix::AsyncFd<OwnedFd>);

impl PtyWriter {
    fn new(master: &OwnedFd) -> std::io::Result<Self> {
        let fd = master.try_clone()?;
        // SAFETY: F_GETFL/F_SETFL on a valid fd.
        unsafe {
            let fl = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
            libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK);
        }
        // SAFETY: the OwnedFd is moved into the AsyncFd and stays open and
        // the same file for its whole life.
        let afd = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::WRITABLE)
        }
        .map_err(|e| e.into_parts().1)?;
        Ok(Self(afd))
    }

    async fn write_all(&mut self, mut data: &[u8]) -> std::io::Result<()> {
        while !data.is_empty() {
            let mut guard = self.0.writable().await?;
            // SAFETY: write from a valid buffer to a valid fd.
            let n = unsafe {
                libc::write(
                    self.0.get_ref().as_raw_fd(),
                    data.as_ptr().cast(),
                    data.len(),
                )
            };
            if n >= 0 {
                data = &data[n as usize..];
                continue;
            }
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::WouldBlock {
                guard.clear_ready();
                continue;
            }
            return Err(err);
        }
        Ok(())
    }
}

enum Control {
    Kill,
    Signal(i32),
}

struct State {
    output: OutputBuffer,
    outcome: Option<Outcome>,
    finished_at: Option<Instant>,
    timed_out: bool,
    killed: bool,
}

pub struct Exec {
    pub id: String,
    pub argv: Vec<String>,
    pub started_unix_ms: u64,
    pid: std::sync::atomic::AtomicU32,
    /// The exec's supervisor process, once it has said so.
    supervisor: std::sync::atomic::AtomicU32,
    state: Mutex<State>,
    /// Bumped on every change to `state`; readers wait on it.
    changed: watch::Sender<u64>,
    control: mpsc::UnboundedSender<Control>,
    stdin: tokio::sync::Mutex<Option<Stdin>>,
    pty_master: Option<Arc<OwnedFd>>,
}

impl Exec {
    pub fn pid(&self) -> u32 {
        self.pid.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn bump(&self) {
        self.changed.send_modify(|v| *v += 1);
    }

    pub fn outcome(&self) -> Option<Outcome> {
        self.lock().outcome.clone()
    }

    pub fn output_total(&self) -> u64 {
        self.lock().output.total()
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Output from `from` (at most `max` bytes), and the outcome if the exec
    /// has finished and everything up to the end has been returned.
    pub fn read(&self, from: u64, max: usize) -> (Vec<Item>, u64, Option<Outcome>) {
        let st = self.lock();
        let (items, next) = st.output.read_from(from, max);
        let done = if items.is_empty() && next >= st.output.total() {
            st.outcome.clone()
        } else {
            None
        };
        (items, next, done)
    }

    pub async fn write_stdin(&self, data: &[u8]) -> Result<(), Error> {
        let mut guard = self.stdin.lock().await;
        let Some(stdin) = guard.as_mut() else {
            return Err(Error::NoSuchStream(self.id.clone(), "open stdin"));
        };
        if let Err(e) = stdin.write_all(data).await {
            // The command closed its stdin: further input is discarded.
            *guard = None;
            if e.kind() != std::io::ErrorKind::BrokenPipe {
                return Err(Error::Io {
                    context: "writing stdin",
                    source: e,
                });
            }
        }
        Ok(())
    }

    /// Closes a pipe; on a terminal, sends the end-of-file character, which
    /// is what closing input means there.
    pub async fn close_stdin(&self) {
        if let Some(Stdin::Pty(mut pty)) = self.stdin.lock().await.take() {
            let _ = pty.write_all(&[VEOF]).await;
        }
    }

    pub fn signal(&self, sig: i32) -> Result<(), Error> {
        if self.lock().outcome.is_some() {
            return Err(Error::Finished(self.id.clone()));
        }
        let _ = self.control.send(Control::Signal(sig));
        Ok(())
    }

    /// Stops the whole command tree (SIGTERM, then SIGKILL after the grace).
    pub fn kill(&self) -> Result<(), Error> {
        {
            let mut st = self.lock();
            if st.outcome.is_some() {
                return Err(Error::Finished(self.id.clone()));
            }
            st.killed = true;
        }
        let _ = self.control.send(Control::Kill);
        Ok(())
    }

    pub fn resize(&self, rows: u16, cols: u16) -> Result<(), Error> {
        let Some(master) = &self.pty_master else {
            return Err(Error::NoSuchStream(self.id.clone(), "terminal"));
        };
        set_winsize(master.as_raw_fd(), rows, cols).map_err(io_err("resizing the terminal"))
    }
}

fn set_winsize(fd: i32, rows: u16, cols: u16) -> std::io::Result<()> {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ with a valid winsize on a pty fd.
    if unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &ws) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// All execs of this agent, running and retained.
pub struct Execs {
    table: Mutex<HashMap<String, Arc<Exec>>>,
    limits: Limits,
    ws: Arc<Workspace>,
    spawner: Spawner,
    /// stdin of commands started without one.
    devnull: OwnedFd,
    /// The agent's own environment, minus its configuration, as the base
    /// every command starts from.
    base_env: Vec<(String, String)>,
    cgroup: Arc<OwnCgroup>,
    shutting_down: std::sync::atomic::AtomicBool,
}

impl Execs {
    pub fn new(
        limits: Limits,
        ws: Arc<Workspace>,
        spawner: Spawner,
        cgroup: Arc<OwnCgroup>,
    ) -> std::io::Result<Arc<Self>> {
        Ok(Arc::new(Self {
            devnull: std::fs::File::open("/dev/null")?.into(),
            table: Mutex::new(HashMap::new()),
            limits,
            ws,
            spawner,
            base_env: std::env::vars_os()
                .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
                .filter(|(k, _)| !k.starts_with("BRIDLE_AGENT_"))
                .collect(),
            cgroup,
            shutting_down: false.into(),
        }))
    }

    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Exec>>> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn get(&self, id: &str) -> Result<Arc<Exec>, Error> {
        self.table()
            .get(id)
            .cloned()
            .ok_or_else(|| Error::NotFound(id.into()))
    }

    pub fn list(&self) -> Vec<Arc<Exec>> {
        let mut v: Vec<_> = self.table().values().cloned().collect();
        v.sort_by_key(|e| e.started_unix_ms);
        v
    }

    pub fn counts(&self) -> (u32, u32) {
        let t = self.table();
        let running = t.values().filter(|e| e.outcome().is_none()).count() as u32;
        (running, t.len() as u32 - running)
    }

    pub fn release(&self, id: &str) -> Result<(), Error> {
        let mut t = self.table();
        let exec = t.get(id).ok_or_else(|| Error::NotFound(id.into()))?;
        if exec.outcome().is_none() {
            return Err(Error::StillRunning(id.into()));
        }
        t.remove(id);
        Ok(())
    }

    /// Starts a command, or returns the existing exec with the same id
    /// (`true` = attached to an existing one). Waits until the command is
    /// running or has failed to start, never longer.
    pub async fn start(self: &Arc<Self>, mut spec: ExecSpec) -> Result<(Arc<Exec>, bool), Error> {
        if self
            .shutting_down
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            return Err(Error::ShuttingDown);
        }
        if spec.exec_id.is_empty() {
            spec.exec_id = format!("exec-{:016x}", crate::fs::rand_u64());
        }
        let (control_tx, control_rx) = mpsc::unbounded_channel();
        let (changed, _) = watch::channel(0u64);

        // Everything that can fail before the command exists is prepared
        // first, so a failure is reported as a spawn failure of this exec.
        let prepared = self.prepare(&spec);
        let pty_master = prepared.as_ref().ok().and_then(|p| p.pty_master.clone());
        let exec = Arc::new(Exec {
            id: spec.exec_id.clone(),
            argv: spec.argv.clone(),
            started_unix_ms: unix_ms(SystemTime::now()),
            pid: 0.into(),
            supervisor: 0.into(),
            state: Mutex::new(State {
                output: OutputBuffer::new(self.limits.output_cap),
                outcome: None,
                finished_at: None,
                timed_out: false,
                killed: false,
            }),
            changed,
            control: control_tx,
            stdin: tokio::sync::Mutex::new(None),
            pty_master,
        });
        {
            let mut t = self.table();
            if let Some(existing) = t.get(&spec.exec_id) {
                return Ok((existing.clone(), true));
            }
            t.insert(spec.exec_id.clone(), exec.clone());
        }
        match prepared {
            // The launch runs as its own task: the caller's future may be
            // dropped (its client went away) while the supervisor is still
            // reporting, and an exec already in the table must then still
            // be supervised to its end rather than left without an outcome.
            Ok(p) => {
                let launch = tokio::spawn(self.clone().launch(exec.clone(), spec, p, control_rx));
                if let Err(e) = launch.await {
                    finish(
                        &exec,
                        Outcome::SpawnFailed {
                            reason: format!("starting the command failed: {e}"),
                            errno: libc::EIO,
                        },
                    );
                }
            }
            Err((reason, errno)) => finish(&exec, Outcome::SpawnFailed { reason, errno }),
        }
        self.gc();
        Ok((exec, false))
    }

    fn prepare(&self, spec: &ExecSpec) -> Result<Prepared, (String, i32)> {
        let fail = |what: String, e: std::io::Error| {
            (
                format!("{what}: {e}"),
                e.raw_os_error().unwrap_or(libc::EIO),
            )
        };
        let rel = self
            .ws
            .relative(&spec.cwd)
            .map_err(|e| (format!("cwd {e}"), libc::EXDEV))?;
        let cwd = self
            .ws
            .open(&rel, libc::O_PATH | libc::O_DIRECTORY, 0)
            .map_err(|e| (format!("cwd {e}"), errno_of(&e)))?;
        let (stdout_r, stdout_w, stderr_r, stderr_w, pty_master, pty_slave) = match spec.pty {
            Some((rows, cols)) => {
                let (master, slave) =
                    open_pty().map_err(|e| fail("opening a terminal".into(), e))?;
                set_winsize(master.as_raw_fd(), rows, cols)
                    .map_err(|e| fail("sizing the terminal".into(), e))?;
                (None, None, None, None, Some(Arc::new(master)), Some(slave))
            }
            None => {
                let (or, ow) = pipe(0).map_err(|e| fail("pipe".into(), e))?;
                let (er, ew) = pipe(0).map_err(|e| fail("pipe".into(), e))?;
                (Some(or), Some(ow), Some(er), Some(ew), None, None)
            }
        };
        let stdin = if spec.stdin && spec.pty.is_none() {
            Some(pipe(1).map_err(|e| fail("pipe".into(), e))?)
        } else {
            None
        };
        let (ctl_agent, ctl_shim) =
            std::os::unix::net::UnixStream::pair().map_err(|e| fail("control socket".into(), e))?;
        Ok(Prepared {
            cwd,
            stdout_r,
            stdout_w,
            stderr_r,
            stderr_w,
            pty_master,
            pty_slave,
            stdin,
            ctl_agent,
            ctl_shim,
        })
    }

    async fn launch(
        self: Arc<Self>,
        exec: Arc<Exec>,
        spec: ExecSpec,
        p: Prepared,
        control_rx: mpsc::UnboundedReceiver<Control>,
    ) {
        let shim = ShimSpec {
            grace_ms: spec
                .kill_grace
                .unwrap_or(self.limits.default_grace)
                .as_millis() as u64,
            pty: spec.pty.is_some(),
            uid: spec.uid,
            gid: spec.gid,
            rlimits: spec.rlimits.to_shim(),
            argv: spec.argv.clone(),
            env: self.command_env(&spec),
        };
        let fds = match (&p.pty_slave, &p.stdout_w, &p.stderr_w) {
            (Some(slave), _, _) => [slave.as_raw_fd(); 3],
            (None, Some(ow), Some(ew)) => [
                p.stdin
                    .as_ref()
                    .map(|(r, _)| r.as_raw_fd())
                    .unwrap_or(self.devnull.as_raw_fd()),
                ow.as_raw_fd(),
                ew.as_raw_fd(),
            ],
            _ => unreachable!("prepare sets either a pty or pipes"),
        };
        let oom_before = self.cgroup.oom_kills();
        let started = Instant::now();
        let sent = self.spawner.spawn(
            &shim,
            [
                fds[0],
                fds[1],
                fds[2],
                p.cwd.as_raw_fd(),
                p.ctl_shim.as_raw_fd(),
            ],
        );
        if let Err(err) = sent {
            return finish(&exec, spawn_failed("starting the exec supervisor", &err));
        }
        let Prepared {
            cwd,
            stdout_r,
            stdout_w,
            stderr_r,
            stderr_w,
            pty_master,
            pty_slave,
            stdin,
            ctl_agent,
            ctl_shim,
        } = p;
        // The command's ends belong to the command now: holding them here
        // would keep the output pipes from ever reaching EOF.
        drop((cwd, stdout_w, stderr_w, pty_slave, ctl_shim));
        if let Some((r, w)) = stdin {
            drop(r);
            match tokio::net::unix::pipe::Sender::from_owned_fd(w) {
                Ok(s) => *exec.stdin.lock().await = Some(Stdin::Pipe(s)),
                Err(err) => tracing::warn!(error = %err, "stdin pipe unusable"),
            }
        }
        if let (Some(master), true) = (&pty_master, spec.stdin) {
            match PtyWriter::new(master) {
                Ok(w) => *exec.stdin.lock().await = Some(Stdin::Pty(w)),
                Err(err) => tracing::warn!(error = %err, "terminal input unusable"),
            }
        }

        // Readers drain output into the bounded buffer whatever the clients do.
        let mut readers = Vec::new();
        if let Some(r) = stdout_r {
            readers.push(tokio::spawn(drain_pipe(exec.clone(), r, Stream::Stdout)));
        }
        if let Some(r) = stderr_r {
            readers.push(tokio::spawn(drain_pipe(exec.clone(), r, Stream::Stderr)));
        }
        if let Some(m) = pty_master {
            readers.push(tokio::spawn(drain_pty(exec.clone(), m)));
        }

        let ctl = match ctl_agent
            .set_nonblocking(true)
            .and_then(|_| tokio::net::UnixStream::from_std(ctl_agent))
        {
            Ok(c) => c,
            // Dropping the socket makes the supervisor stop the command.
            Err(err) => return finish(&exec, spawn_failed("control socket", &err)),
        };
        let (ctl_read, ctl_write) = ctl.into_split();
        let mut lines = tokio::io::BufReader::new(ctl_read).lines();

        // The supervisor names itself, then says whether the command started.
        let mut first = lines.next_line().await.ok().flatten().unwrap_or_default();
        if let Some(pid) = first.strip_prefix("supervisor ") {
            exec.supervisor.store(
                pid.trim().parse().unwrap_or(0),
                std::sync::atomic::Ordering::Relaxed,
            );
            first = lines.next_line().await.ok().flatten().unwrap_or_default();
        }
        if let Some(rest) = first.strip_prefix("spawned ") {
            exec.pid.store(
                rest.trim().parse().unwrap_or(0),
                std::sync::atomic::Ordering::Relaxed,
            );
            exec.bump();
        } else {
            let (errno, stage) = first
                .strip_prefix("spawn_failed ")
                .and_then(|r| r.split_once(' '))
                .map(|(e, s)| (e.parse().unwrap_or(libc::EIO), s.to_string()))
                .unwrap_or((
                    libc::EIO,
                    "the exec supervisor ended before starting the command".into(),
                ));
            let err = std::io::Error::from_raw_os_error(errno);
            let reason = match stage.as_str() {
                "exec" => format!("cannot execute {:?}: {err}", spec.argv[0]),
                "setuid" | "setgid" => format!(
                    "cannot switch to uid {:?} gid {:?}: {err} (the sandbox was started without CAP_SETUID/CAP_SETGID)",
                    spec.uid, spec.gid
                ),
                other => format!("{other}: {err}"),
            };
            drop(lines);
            for r in readers {
                let _ = r.await;
            }
            return finish(&exec, Outcome::SpawnFailed { reason, errno });
        }

        let this = self.clone();
        tokio::spawn(async move {
            this.supervise(
                exec,
                spec.timeout,
                started,
                oom_before,
                lines,
                ctl_write,
                control_rx,
                readers,
            )
            .await
        });
    }

    /// The command's environment: the agent's own (unless the request
    /// clears it) with the request's variables on top.
    fn command_env(&self, spec: &ExecSpec) -> Vec<String> {
        let mut env: Vec<(String, String)> = if spec.clear_env {
            Vec::new()
        } else {
            self.base_env.clone()
        };
        for (k, v) in &spec.env {
            match env.iter_mut().find(|(ek, _)| ek == k) {
                Some(slot) => slot.1 = v.clone(),
                None => env.push((k.clone(), v.clone())),
            }
        }
        env.into_iter().map(|(k, v)| format!("{k}={v}")).collect()
    }

    #[allow(clippy::too_many_arguments)]
    async fn supervise(
        self: Arc<Self>,
        exec: Arc<Exec>,
        timeout: Option<Duration>,
        started: Instant,
        oom_before: u64,
        mut lines: tokio::io::Lines<tokio::io::BufReader<tokio::net::unix::OwnedReadHalf>>,
        mut ctl_write: tokio::net::unix::OwnedWriteHalf,
        mut control_rx: mpsc::UnboundedReceiver<Control>,
        readers: Vec<tokio::task::JoinHandle<()>>,
    ) {
        let deadline = tokio::time::sleep_until(tokio::time::Instant::from_std(
            started + timeout.unwrap_or(Duration::from_secs(100 * 365 * 86400)),
        ));
        tokio::pin!(deadline);
        let mut deadline_armed = timeout.is_some();
        let mut main_status: (Option<i32>, Option<i32>) = (None, None);
        // `done` (or EOF, if the supervisor itself died) ends the exec: by
        // then every process of the command is gone. The process exit, not
        // output EOF, is what ends an exec.
        let usage: Option<(u64, u64, u64)> = loop {
            tokio::select! {
                line = lines.next_line() => match line {
                    Ok(Some(l)) => {
                        if let Some(c) = l.strip_prefix("exited code ") {
                            main_status = (c.trim().parse().ok(), None);
                        } else if let Some(s) = l.strip_prefix("exited signal ") {
                            main_status = (None, s.trim().parse().ok());
                        } else if let Some(rest) = l.strip_prefix("done") {
                            let n: Vec<u64> = rest.split_whitespace().filter_map(|x| x.parse().ok()).collect();
                            break (n.len() == 3).then(|| (n[0], n[1], n[2] * 1024));
                        }
                    }
                    _ => {
                        // The supervisor died without saying `done` (the
                        // command can signal it: same uid). Its processes
                        // are now the agent's children: stop them. What the
                        // command itself exited with is unknown.
                        tracing::warn!(exec_id = %exec.id, "exec supervisor vanished; stopping what it left");
                        exec.supervisor.store(0, std::sync::atomic::Ordering::Relaxed);
                        exec.lock().killed = true;
                        main_status = (None, None);
                        self.stop_strays().await;
                        break None;
                    }
                },
                Some(cmd) = control_rx.recv() => {
                    let line = match cmd {
                        Control::Kill => "kill\n".to_string(),
                        Control::Signal(s) => format!("signal {s}\n"),
                    };
                    let _ = ctl_write.write_all(line.as_bytes()).await;
                }
                _ = &mut deadline, if deadline_armed => {
                    deadline_armed = false;
                    {
                        let mut st = exec.lock();
                        st.timed_out = true;
                        st.killed = true;
                    }
                    let _ = ctl_write.write_all(b"kill\n").await;
                }
            }
        };
        // Output still in flight is collected, for a bounded time: a pipe
        // held open by something outside the tree must not hold the exec.
        let drain = futures::future::join_all(readers);
        let _ = tokio::time::timeout(Duration::from_millis(500), drain).await;
        let duration = started.elapsed();
        let oom_after = self.cgroup.oom_kills();
        let (timed_out, killed, total, dropped) = {
            let st = exec.lock();
            (
                st.timed_out,
                st.killed,
                st.output.total(),
                st.output.dropped(),
            )
        };
        let (user_cpu_us, system_cpu_us, max_rss_bytes) = usage.unwrap_or_default();
        let (code, signal) = main_status;
        // Without a cgroup of its own per exec, an OOM kill is attributed to
        // the exec when the container's oom_kill counter moved while it ran
        // and the command did not succeed.
        let oom_killed = oom_after > oom_before && code != Some(0);
        finish(
            &exec,
            Outcome::Exited(ExitInfo {
                code,
                signal,
                timed_out,
                killed,
                oom_killed,
                duration,
                user_cpu_us,
                system_cpu_us,
                max_rss_bytes,
                output_bytes: total,
                output_dropped_bytes: dropped,
            }),
        );
        // Finished output counts against the retention budget from now on.
        self.gc();
    }

    /// Stops every child of the agent that is neither the spawner nor a live
    /// supervisor. Every process a command starts lives under its exec's
    /// supervisor; one that was re-parented to the agent (PID 1, or a
    /// subreaper when not) lost its supervisor and belongs to no exec.
    /// Repeats until none is left, since each kill re-parents that process's
    /// own children to the agent.
    pub async fn stop_strays(&self) {
        for _ in 0..200 {
            let mut keep: Vec<u32> = self
                .table()
                .values()
                .map(|e| e.supervisor.load(std::sync::atomic::Ordering::Relaxed))
                .collect();
            keep.push(self.spawner.pid());
            let killed = tokio::task::spawn_blocking(move || kill_strays(&keep))
                .await
                .unwrap_or(0);
            if killed == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Drops finished execs past the retention window, and the oldest
    /// finished ones beyond the retention count.
    pub fn gc(&self) {
        let mut t = self.table();
        let now = Instant::now();
        t.retain(|_, e| match e.lock().finished_at {
            Some(at) => now.duration_since(at) < self.limits.retention,
            None => true,
        });
        // Oldest first, each with the output it holds.
        let mut finished: Vec<(Instant, String, usize)> = t
            .iter()
            .filter_map(|(id, e)| {
                let st = e.lock();
                st.finished_at.map(|at| (at, id.clone(), st.output.held()))
            })
            .collect();
        finished.sort();
        let mut count = finished.len();
        let mut bytes: usize = finished.iter().map(|f| f.2).sum();
        for (_, id, held) in finished {
            if count <= self.limits.max_retained && bytes <= self.limits.retained_output_bytes {
                break;
            }
            t.remove(&id);
            count -= 1;
            bytes -= held;
        }
    }

    /// Refuses new execs, stops every running one and waits (bounded by
    /// `wait`) for them to finish.
    pub async fn shutdown(&self, wait: Duration) {
        self.shutting_down
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let running: Vec<_> = self
            .list()
            .into_iter()
            .filter(|e| e.outcome().is_none())
            .collect();
        for e in &running {
            let _ = e.kill();
        }
        let all = futures::future::join_all(running.iter().map(|e| wait_finished(e.clone())));
        let _ = tokio::time::timeout(wait, all).await;
    }
}

/// SIGKILLs every child of this process whose pid is not in `keep`;
/// returns how many there were.
fn kill_strays(keep: &[u32]) -> usize {
    let me = std::process::id() as i32;
    let mut killed = 0;
    for p in crate::pid1::processes() {
        // Zombies are the reaper's: they are already dead.
        if p.ppid == me && !p.zombie && !keep.contains(&(p.pid as u32)) {
            // SAFETY: kill(2) of our own child.
            unsafe { libc::kill(p.pid, libc::SIGKILL) };
            killed += 1;
        }
    }
    killed
}

pub async fn wait_finished(exec: Arc<Exec>) {
    let mut rx = exec.subscribe();
    while exec.outcome().is_none() {
        if rx.changed().await.is_err() {
            return;
        }
    }
}

fn finish(exec: &Exec, outcome: Outcome) {
    {
        let mut st = exec.lock();
        st.outcome = Some(outcome);
        st.finished_at = Some(Instant::now());
    }
    exec.bump();
}

fn spawn_failed(what: &str, err: &std::io::Error) -> Outcome {
    Outcome::SpawnFailed {
        reason: format!("{what}: {err}"),
        errno: err.raw_os_error().unwrap_or(libc::EIO),
    }
}

fn errno_of(e: &crate::fs::Error) -> i32 {
    use crate::fs::Error as F;
    match e {
        F::NotFound { .. } => libc::ENOENT,
        F::NotDirectory { .. } => libc::ENOTDIR,
        F::PermissionDenied { .. } => libc::EACCES,
        F::Escapes { .. } => libc::EXDEV,
        F::SymlinkLoop { .. } => libc::ELOOP,
        F::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
        _ => libc::EINVAL,
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

const READ_CHUNK: usize = 64 * 1024;

async fn drain_pipe(exec: Arc<Exec>, fd: OwnedFd, stream: Stream) {
    let Ok(mut rx) = tokio::net::unix::pipe::Receiver::from_owned_fd(fd) else {
        return;
    };
    let mut buf = vec![0u8; READ_CHUNK];
    loop {
        match rx.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                exec.lock()
                    .output
                    .append(stream, Bytes::copy_from_slice(&buf[..n]));
                exec.bump();
            }
        }
    }
}

async fn drain_pty(exec: Arc<Exec>, master: Arc<OwnedFd>) {
    // A dup so the AsyncFd owns its own fd while `master` stays usable for
    // resizes.
    let Ok(fd) = master.try_clone() else { return };
    // SAFETY: F_SETFL on a valid fd.
    unsafe {
        let fl = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK);
    }
    // SAFETY: `fd` is an OwnedFd moved into the AsyncFd, so it stays open
    // and refers to the same file for the AsyncFd's whole life.
    let Ok(afd) = (unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
    }) else {
        return;
    };
    let mut buf = vec![0u8; READ_CHUNK];
    loop {
        let Ok(mut guard) = afd.readable().await else {
            return;
        };
        // SAFETY: read into a valid buffer from a valid fd.
        let n = unsafe {
            libc::read(
                afd.get_ref().as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        if n > 0 {
            exec.lock()
                .output
                .append(Stream::Stdout, Bytes::copy_from_slice(&buf[..n as usize]));
            exec.bump();
        } else if n == 0 {
            return;
        } else {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::WouldBlock {
                guard.clear_ready();
                continue;
            }
            // EIO: every holder of the terminal's slave side has exited.
            return;
        }
    }
}

/// A pipe whose `agent_end` (0 = read, 1 = write) is non-blocking for the
/// runtime; the command's end stays blocking, as programs expect.
fn pipe(agent_end: usize) -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 into a valid array; both fds are owned below.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fresh fds from pipe2.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let agent = if agent_end == 0 { &r } else { &w };
    // SAFETY: F_SETFL on a valid fd.
    unsafe { libc::fcntl(agent.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
    Ok((r, w))
}

fn open_pty() -> std::io::Result<(OwnedFd, OwnedFd)> {
    // SAFETY: posix_openpt/grantpt/unlockpt/ptsname_r on fds we own.
    unsafe {
        let m = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC);
        if m < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let master = OwnedFd::from_raw_fd(m);
        if libc::grantpt(m) < 0 || libc::unlockpt(m) < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // TIOCGPTPEER opens the slave from the master without a path lookup.
        let s = libc::ioctl(
            m,
            libc::TIOCGPTPEER,
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        );
        if s < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok((master, OwnedFd::from_raw_fd(s)))
    }
}

struct Prepared {
    cwd: OwnedFd,
    stdout_r: Option<OwnedFd>,
    stdout_w: Option<OwnedFd>,
    stderr_r: Option<OwnedFd>,
    stderr_w: Option<OwnedFd>,
    pty_master: Option<Arc<OwnedFd>>,
    pty_slave: Option<OwnedFd>,
    stdin: Option<(OwnedFd, OwnedFd)>,
    ctl_agent: std::os::unix::net::UnixStream,
    ctl_shim: std::os::unix::net::UnixStream,
}
