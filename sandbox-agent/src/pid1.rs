//! PID 1 duties: reap every child, known or orphaned.
//!
//! One reaper owns `wait4(-1)` for the whole agent. Its own children (only
//! the exec spawner) are started through [`Reaper::spawn`], under a lock that
//! also makes descriptors inheritable for that one child only.

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
