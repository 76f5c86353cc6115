//! PID 1 duties: reap every child, known or orphaned.
//!
//! One reaper owns `wait4(-1)` for the whole agent. Its own children (only
//! the exec spawner) are started through [`Reaper::spawn`], under a lock that
//! also makes descriptors inheritable for that one child only.

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Marks this process non-dumpable: processes of the same uid can no longer
/// ptrace it or open its /proc/<pid>/{mem,environ,fd}. `execve` resets the
/// flag, so the spawner calls this again; its forks (the supervisors) inherit
/// it, while the commands they exec get the default back.
pub fn make_undumpable() {
    // SAFETY: prctl on this process only.
    unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
}

/// One process as /proc/<pid>/stat describes it.
#[derive(Debug, Clone, Copy)]
pub struct Process {
    pub pid: i32,
    pub ppid: i32,
    pub zombie: bool,
}

/// Every process visible in /proc (those that vanish while we look are
/// skipped).
pub fn processes() -> Vec<Process> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|entry| {
            let pid = entry.file_name().to_str()?.parse::<i32>().ok()?;
            let stat = std::fs::read(format!("/proc/{pid}/stat")).ok()?;
            // The command name is in parentheses and may contain anything,
            // so fields are read after the last ')'.
            let close = stat.iter().rposition(|b| *b == b')')?;
            let rest = std::str::from_utf8(&stat[close + 1..]).ok()?;
            let mut fields = rest.split_whitespace();
            let state = fields.next()?;
            let ppid = fields.next()?.parse().ok()?;
            Some(Process {
                pid,
                ppid,
                zombie: state == "Z",
            })
        })
        .collect()
}

#[derive(Default)]
pub struct Reaper {
    spawn_lock: Mutex<()>,
}

impl Reaper {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Spawns a child and returns its pid. The close-on-exec descriptors in
    /// `inherit` are passed to this child only: they are made inheritable
    /// just for this spawn, under a lock every spawn takes, so no other child
    /// can pick them up. The child is reaped like every other.
    pub fn spawn(
        &self,
        cmd: &mut std::process::Command,
        inherit: &[std::os::fd::RawFd],
    ) -> std::io::Result<u32> {
        let _guard = self.spawn_lock.lock().unwrap_or_else(|e| e.into_inner());
        let set_cloexec = |on: bool| {
            for fd in inherit {
                // SAFETY: F_SETFD on descriptors the caller keeps open.
                unsafe { libc::fcntl(*fd, libc::F_SETFD, if on { libc::FD_CLOEXEC } else { 0 }) };
            }
        };
        set_cloexec(false);
        let spawned = cmd.spawn();
        set_cloexec(true);
        // The Child handle is dropped without waiting: the reaper collects it.
        Ok(spawned?.id())
    }

    /// Reaps every exited child: the spawner when it dies, and orphans
    /// re-parented to the agent (as PID 1, or as a subreaper).
    pub fn reap(&self) {
        // Not while a spawn is in progress: the standard library waits for a
        // child that failed to exec, and must find it.
        let _guard = self.spawn_lock.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let mut status = 0;
            // SAFETY: non-blocking waitpid for any child.
            if unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) } <= 0 {
                break;
            }
        }
    }

    /// Reaps on every SIGCHLD (and once a second, as a safety net) until
    /// the runtime shuts down.
    pub async fn run(self: Arc<Self>) {
        use tokio::signal::unix::{signal, SignalKind};
        let mut sigchld = match signal(SignalKind::child()) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot watch SIGCHLD; reaping once a second");
                loop {
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    self.reap();
                }
            }
        };
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = sigchld.recv() => {}
                _ = tick.tick() => {}
            }
            self.reap();
        }
    }
}

/// Write end of the pipe the stop-signal handler wakes the agent with.
static STOP_PIPE: AtomicI32 = AtomicI32::new(-1);
/// Whether the handler ignores signals sent from inside the sandbox.
static ONLY_FROM_OUTSIDE: AtomicBool = AtomicBool::new(false);
/// Set by the handler when a stop is to be obeyed; the pipe only wakes the
/// reader, so a full pipe loses nothing.
static STOP_REQUESTED: AtomicBool = AtomicBool::new(false);
/// Signals ignored since the last log line, and the last sender.
static IGNORED: AtomicU64 = AtomicU64::new(0);
static IGNORED_FROM: AtomicI32 = AtomicI32::new(0);
/// Whether the next ignored signal may wake the reader: at most one wakeup
/// per log line, so a flood of `kill -TERM 1` costs the agent nothing.
static IGNORED_WAKES: AtomicBool = AtomicBool::new(true);
/// Ignored signals are logged at most this often.
const IGNORED_LOG_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

extern "C" fn on_stop_signal(
    _signal: libc::c_int,
    info: *mut libc::siginfo_t,
    _context: *mut libc::c_void,
) {
    // SAFETY: errno is this thread's; it is put back before returning, so
    // the interrupted code never sees the handler's write fail.
    let errno = unsafe { *libc::__errno_location() };
    // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler.
    let (code, pid) = unsafe { ((*info).si_code, (*info).si_pid()) };
    // kill(2) from a process outside our PID namespace arrives as SI_USER
    // with pid 0 (the kernel cannot name it here). sigqueue-like calls may
    // forge si_pid, but only with a negative si_code, which is refused.
    let from_outside = pid == 0 && (code == libc::SI_USER || code == libc::SI_KERNEL);
    let wake = if from_outside || !ONLY_FROM_OUTSIDE.load(Ordering::Relaxed) {
        STOP_REQUESTED.store(true, Ordering::SeqCst);
        true
    } else {
        IGNORED.fetch_add(1, Ordering::Relaxed);
        IGNORED_FROM.store(pid, Ordering::Relaxed);
        IGNORED_WAKES.swap(false, Ordering::Relaxed)
    };
    if wake {
        let fd = STOP_PIPE.load(Ordering::Relaxed);
        // SAFETY: write(2) is async-signal-safe; a full pipe is fine (the
        // reader is awake already, and also checks every second).
        unsafe { libc::write(fd, [1u8].as_ptr().cast(), 1) };
    }
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = errno };
}

/// Resolves on SIGTERM or SIGINT (what `docker stop` and an operator send)
/// from outside the sandbox. As PID 1, the same signals sent by a command in
/// the sandbox (`kill -TERM 1`) are ignored, and logged at most every
/// [`IGNORED_LOG_EVERY`]: only the control plane and the container runtime
/// may stop the agent. Elsewhere any sender is obeyed.
pub async fn stop_requested() {
    if let Err(e) = watch_stop_signals().await {
        // Without handlers PID 1 would ignore SIGTERM; better to say so.
        tracing::error!("cannot watch SIGTERM/SIGINT: {e}");
        std::future::pending::<()>().await;
    }
}

async fn watch_stop_signals() -> std::io::Result<()> {
    use std::os::fd::FromRawFd;
    use tokio::io::AsyncReadExt;
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills the two descriptors on success.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the read end was just created and is owned here alone.
    let read = unsafe { std::os::fd::OwnedFd::from_raw_fd(fds[0]) };
    let mut read = tokio::net::unix::pipe::Receiver::from_owned_fd(read)?;
    ONLY_FROM_OUTSIDE.store(std::process::id() == 1, Ordering::Relaxed);
    // The write end lives as long as the process: the handler may run at
    // any time.
    STOP_PIPE.store(fds[1], Ordering::Relaxed);
    for signal in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: a zeroed sigaction is valid; the handler only does
        // async-signal-safe work (atomics, write, errno).
        let rc = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_stop_signal as *const () as usize;
            action.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(signal, &action, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    let mut logged: Option<std::time::Instant> = None;
    let mut buf = [0u8; 64];
    loop {
        tokio::select! {
            r = read.read(&mut buf) => { r?; }
            _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
        }
        if STOP_REQUESTED.load(Ordering::SeqCst) {
            tracing::info!("stop requested");
            return Ok(());
        }
        let due = logged.is_none_or(|t| t.elapsed() >= IGNORED_LOG_EVERY);
        if due && IGNORED.load(Ordering::Relaxed) > 0 {
            tracing::warn!(
                count = IGNORED.swap(0, Ordering::Relaxed),
                last_sender_pid = IGNORED_FROM.load(Ordering::Relaxed),
                "ignored stop signals sent from inside the sandbox"
            );
            logged = Some(std::time::Instant::now());
            IGNORED_WAKES.store(true, Ordering::Relaxed);
        }
    }
}
