//! PID 1 duties: reap every child, known or orphaned.
//!
//! One reaper owns `wait4(-1)` for the whole process. Spawns go through
//! [`Reaper::spawn`], which holds the same lock as the reaper, so a child
//! that exits at once cannot be reaped before its waiter is registered, and
//! the standard library's own wait after a failed spawn cannot race us.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

/// Marks this process non-dumpable: processes of the same uid can no longer
/// ptrace it or open its /proc/<pid>/{mem,environ,fd}. `execve` resets the
/// flag, so the spawner calls this again; its forks (the supervisors) inherit
/// it, while the commands they exec get the default back.
pub fn make_undumpable() {
    // SAFETY: prctl on this process only.
    unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
}

#[derive(Debug, Clone, Copy)]
pub struct ChildExit {
    pub status: i32,
    pub user_cpu_us: u64,
    pub system_cpu_us: u64,
    /// ru_maxrss, in bytes.
    pub max_rss_bytes: u64,
}

#[derive(Default)]
pub struct Reaper {
    waiters: Mutex<HashMap<i32, oneshot::Sender<ChildExit>>>,
}

impl Reaper {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Spawns a child and registers for its exit status. The close-on-exec
    /// descriptors in `inherit` are passed to this child only: they are
    /// made inheritable just for this spawn, under the lock every spawn
    /// takes, so no other child can pick them up.
    pub fn spawn(
        &self,
        cmd: &mut std::process::Command,
        inherit: &[std::os::fd::RawFd],
    ) -> std::io::Result<(u32, oneshot::Receiver<ChildExit>)> {
        let mut waiters = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
        let set_cloexec = |on: bool| {
            for fd in inherit {
                // SAFETY: F_SETFD on descriptors the caller keeps open.
                unsafe { libc::fcntl(*fd, libc::F_SETFD, if on { libc::FD_CLOEXEC } else { 0 }) };
            }
        };
        set_cloexec(false);
        let spawned = cmd.spawn();
        set_cloexec(true);
        let child = spawned?;
        let pid = child.id();
        // The Child handle is dropped without waiting: the reaper collects it.
        drop(child);
        let (tx, rx) = oneshot::channel();
        waiters.insert(pid as i32, tx);
        Ok((pid, rx))
    }

    /// Reaps every exited child; statuses go to their waiters, orphans
    /// (re-parented to us as PID 1) are simply collected.
    pub fn reap(&self) {
        let mut waiters = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let mut status = 0;
            // SAFETY: an all-zero rusage is valid.
            let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
            // SAFETY: wait4 with valid out pointers.
            let pid = unsafe { libc::wait4(-1, &mut status, libc::WNOHANG, &mut ru) };
            if pid <= 0 {
                break;
            }
            if let Some(tx) = waiters.remove(&pid) {
                let us = |tv: libc::timeval| tv.tv_sec as u64 * 1_000_000 + tv.tv_usec as u64;
                let _ = tx.send(ChildExit {
                    status,
                    user_cpu_us: us(ru.ru_utime),
                    system_cpu_us: us(ru.ru_stime),
                    max_rss_bytes: ru.ru_maxrss as u64 * 1024,
                });
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
