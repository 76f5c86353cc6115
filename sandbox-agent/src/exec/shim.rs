//! The per-exec supervisor.
//!
//! Every command runs under its own short-lived supervisor. The supervisor sets
//! `PR_SET_CHILD_SUBREAPER`, so everything the command starts (including
//! processes that `setsid`, double-fork or ignore SIGTERM) re-parents to it
//! rather than escaping to PID 1. To stop the command it signals every
//! descendant it can find in /proc, SIGTERM first and SIGKILL after a grace
//! period, repeating until it has no children left. When the command's main
//! process exits, whatever it left behind is stopped the same way, so an exec
//! never leaks processes.
//!
//! Supervisors are forked by the [spawner](super::spawner), a small
//! single-threaded process, so each one is ordinary Rust code running in a
//! fresh fork, with no exec of its own. A supervisor gets the command's
//! stdio, the directory to run it in (already resolved beneath the
//! workspace) and a Unix stream socket to the agent, over which it speaks
//! one text line per message:
//!
//! * supervisor → agent: `supervisor <own pid>`, then
//!   `spawned <pid>` or `spawn_failed <errno> <stage>`,
//!   `exited code <n>` or `exited signal <n>`, then
//!   `done <user_us> <system_us> <max_rss_kb>` (the resource usage of
//!   everything it reaped) just before it exits.
//! * agent → supervisor: `kill` (stop the whole tree), `signal <n>` (deliver
//!   to the command's main process). EOF on the socket is treated as `kill`.

use std::ffi::CString;
use std::io::Write;
use std::time::{Duration, Instant};

/// What a supervisor runs, sent from the agent to the spawner.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ShimSpec {
    pub grace_ms: u64,
    pub pty: bool,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// (resource name, value) applied with setrlimit before exec.
    pub rlimits: Vec<(String, u64)>,
    pub argv: Vec<String>,
    /// The command's whole environment, as `KEY=VALUE`.
    pub env: Vec<String>,
}

impl ShimSpec {
    /// NUL-separated `key=value` fields; argv and env items are prefixed
    /// `a:` and `e:`. Neither may contain NUL (validated at the API edge).
    pub fn encode(&self) -> Vec<u8> {
        let mut f = vec![format!("grace_ms={}", self.grace_ms)];
        if self.pty {
            f.push("pty=1".into());
        }
        if let Some(uid) = self.uid {
            f.push(format!("uid={uid}"));
        }
        if let Some(gid) = self.gid {
            f.push(format!("gid={gid}"));
        }
        for (name, v) in &self.rlimits {
            f.push(format!("rlimit.{name}={v}"));
        }
        f.extend(self.argv.iter().map(|a| format!("a:{a}")));
        f.extend(self.env.iter().map(|e| format!("e:{e}")));
        f.join("\0").into_bytes()
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        let text = std::str::from_utf8(bytes).map_err(|_| "spec is not UTF-8")?;
        let mut spec = ShimSpec::default();
        for field in text.split('\0') {
            if let Some(a) = field.strip_prefix("a:") {
                spec.argv.push(a.to_string());
                continue;
            }
            if let Some(e) = field.strip_prefix("e:") {
                spec.env.push(e.to_string());
                continue;
            }
            let (k, v) = field
                .split_once('=')
                .ok_or_else(|| format!("bad field {field:?}"))?;
            let num = |v: &str| {
                v.parse::<u64>()
                    .map_err(|_| format!("bad number in {field:?}"))
            };
            match k {
                "grace_ms" => spec.grace_ms = num(v)?,
                "pty" => spec.pty = v == "1",
                "uid" => spec.uid = Some(num(v)? as u32),
                "gid" => spec.gid = Some(num(v)? as u32),
                _ if k.starts_with("rlimit.") => spec
                    .rlimits
                    .push((k["rlimit.".len()..].to_string(), num(v)?)),
                _ => return Err(format!("unknown field {field:?}")),
            }
        }
        if spec.argv.is_empty() {
            return Err("no command".into());
        }
        Ok(spec)
    }
}

pub fn rlimit_resource(name: &str) -> Option<libc::__rlimit_resource_t> {
    Some(match name {
        "cpu" => libc::RLIMIT_CPU,
        "as" => libc::RLIMIT_AS,
        "fsize" => libc::RLIMIT_FSIZE,
        "nofile" => libc::RLIMIT_NOFILE,
        "nproc" => libc::RLIMIT_NPROC,
        "core" => libc::RLIMIT_CORE,
        "stack" => libc::RLIMIT_STACK,
        _ => return None,
    })
}

struct Control {
    fd: i32,
    inbuf: Vec<u8>,
}

impl Control {
    fn send(&self, line: &str) {
        let msg = format!("{line}\n");
        let mut f = std::mem::ManuallyDrop::new(unsafe_file(self.fd));
        // The agent may be gone; there is nothing useful to do about it here.
        let _ = f.write_all(msg.as_bytes());
    }
}

fn unsafe_file(fd: i32) -> std::fs::File {
    use std::os::fd::FromRawFd;
    // SAFETY: callers wrap the result in ManuallyDrop, so the fd is borrowed.
    unsafe { std::fs::File::from_raw_fd(fd) }
}

/// Runs in a freshly forked child of the spawner: becomes the supervisor
/// of one command and exits when it is done. `fds` are the command's
/// stdin, stdout and stderr, its working directory, and the control socket.
pub fn run_forked(spec: ShimSpec, fds: [i32; 5]) -> ! {
    let [stdin, stdout, stderr, cwd, ctl_fd] = fds;
    let ctl = Control {
        fd: ctl_fd,
        inbuf: Vec::new(),
    };
    // The agent learns who supervises this exec: any other process that
    // ends up as the agent's child belongs to no exec and is stopped.
    ctl.send(&format!("supervisor {}", std::process::id()));
    // SAFETY: plain syscalls on this (single-threaded, just forked)
    // process's own descriptors and signal state.
    let chdir = unsafe {
        // The spawner ignores SIGCHLD (so the kernel reaps supervisors); a
        // supervisor needs it back to collect its own children.
        libc::signal(libc::SIGCHLD, libc::SIG_DFL);
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        let mut none: libc::sigset_t = zeroed();
        libc::sigemptyset(&mut none);
        libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
        for (from, to) in [(stdin, 0), (stdout, 1), (stderr, 2)] {
            if from != to {
                libc::dup2(from, to);
            }
        }
        let rc = libc::fchdir(cwd);
        let err = errno();
        for fd in [stdin, stdout, stderr, cwd] {
            if fd > 2 && fd != ctl_fd {
                libc::close(fd);
            }
        }
        // Whatever else this process holds must not reach the command: it
        // gets fds 0-2 and nothing more.
        libc::syscall(
            libc::SYS_close_range,
            3u32,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        );
        libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
        if rc == 0 {
            Ok(())
        } else {
            Err(err)
        }
    };
    if let Err(e) = chdir {
        ctl.send(&format!("spawn_failed {e} chdir"));
        ctl.send("done 0 0 0");
        // SAFETY: leave without running the spawner's exit handlers.
        unsafe { libc::_exit(1) };
    }
    let code = supervise(ctl, spec);
    // SAFETY: as above.
    unsafe { libc::_exit(code) }
}

fn errno() -> i32 {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

fn supervise(mut ctl: Control, spec: ShimSpec) -> i32 {
    // Block the signals we handle through a signalfd; the command gets a
    // clean mask and default dispositions back before exec.
    let mut mask: libc::sigset_t = zeroed();
    let mut old: libc::sigset_t = zeroed();
    // SAFETY: sigset manipulation on valid local structs.
    let sfd = unsafe {
        libc::sigemptyset(&mut mask);
        for s in [libc::SIGCHLD, libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::sigaddset(&mut mask, s);
        }
        libc::sigprocmask(libc::SIG_BLOCK, &mask, &mut old);
        libc::signalfd(-1, &mask, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK)
    };
    if sfd < 0 {
        ctl.send(&format!("spawn_failed {} supervisor:signalfd", errno()));
        ctl.send(&done_line());
        return 1;
    }

    // Everything the child needs is prepared before fork: only async-signal-
    // safe calls happen between fork and exec.
    let argv_c: Vec<CString> = match spec
        .argv
        .iter()
        .map(|a| CString::new(a.as_bytes()))
        .collect()
    {
        Ok(v) => v,
        Err(_) => {
            ctl.send(&format!("spawn_failed {} argv:contains_NUL", libc::EINVAL));
            ctl.send(&done_line());
            return 1;
        }
    };
    let mut argv_p: Vec<*const libc::c_char> = argv_c.iter().map(|c| c.as_ptr()).collect();
    argv_p.push(std::ptr::null());
    let env_c: Vec<CString> = spec
        .env
        .iter()
        .filter_map(|e| CString::new(e.as_bytes()).ok())
        .collect();
    let mut env_p: Vec<*const libc::c_char> = env_c.iter().map(|c| c.as_ptr()).collect();
    env_p.push(std::ptr::null());
    let path_var = spec.env.iter().find_map(|e| e.strip_prefix("PATH="));
    let program = resolve_program(&spec.argv[0], path_var);
    let rlimits: Vec<(libc::__rlimit_resource_t, u64)> = spec
        .rlimits
        .iter()
        .filter_map(|(n, v)| rlimit_resource(n).map(|r| (r, *v)))
        .collect();

    let mut errpipe = [0i32; 2];
    // SAFETY: pipe2 into a valid array.
    if unsafe { libc::pipe2(errpipe.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        ctl.send(&format!("spawn_failed {} supervisor:pipe", errno()));
        ctl.send(&done_line());
        return 1;
    }

    // SAFETY: fork in a single-threaded process.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        ctl.send(&format!("spawn_failed {} fork", errno()));
        ctl.send(&done_line());
        return 1;
    }
    if pid == 0 {
        // Child: only async-signal-safe calls from here to exec.
        // SAFETY: raw syscalls on our own process; on any failure the errno
        // and the stage are reported through the CLOEXEC pipe and we _exit.
        unsafe {
            let fail = |stage: u8| -> ! {
                let e = *libc::__errno_location();
                let msg = [stage, (e & 0xff) as u8, ((e >> 8) & 0xff) as u8, 0];
                libc::write(errpipe[1], msg.as_ptr().cast(), 4);
                libc::_exit(127);
            };
            libc::close(errpipe[0]);
            // Every disposition is already the default here (run_forked
            // restored the two the spawner ignores); only the mask needs
            // restoring.
            libc::sigprocmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
            if libc::setsid() < 0 {
                fail(b's');
            }
            if spec.pty && libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                fail(b't');
            }
            for (res, v) in &rlimits {
                let lim = libc::rlimit {
                    rlim_cur: *v,
                    rlim_max: *v,
                };
                if libc::setrlimit(*res, &lim) < 0 {
                    fail(b'r');
                }
            }
            if let Some(gid) = spec.gid {
                if libc::setgroups(0, std::ptr::null()) < 0
                    && *libc::__errno_location() != libc::EPERM
                {
                    fail(b'g');
                }
                if libc::setgid(gid) < 0 {
                    fail(b'g');
                }
            }
            if let Some(uid) = spec.uid {
                if libc::setuid(uid) < 0 {
                    fail(b'u');
                }
            }
            match &program {
                Ok(p) => {
                    libc::execve(p.as_ptr(), argv_p.as_ptr(), env_p.as_ptr());
                }
                Err(e) => *libc::__errno_location() = *e,
            }
            fail(b'e');
        }
    }

    // SAFETY: closing our copy of the write end.
    unsafe { libc::close(errpipe[1]) };
    let mut msg = [0u8; 4];
    // EOF (0) means exec succeeded.
    let n = loop {
        // SAFETY: read into a valid 4-byte buffer.
        let n = unsafe { libc::read(errpipe[0], msg.as_mut_ptr().cast(), 4) };
        if n < 0 && errno() == libc::EINTR {
            continue;
        }
        break n;
    };
    // SAFETY: closing the read end.
    unsafe { libc::close(errpipe[0]) };
    if n == 4 {
        let e = msg[1] as i32 | (msg[2] as i32) << 8;
        let stage = match msg[0] {
            b's' => "setsid",
            b't' => "controlling_terminal",
            b'r' => "rlimit",
            b'g' => "setgid",
            b'u' => "setuid",
            _ => "exec",
        };
        let mut status = 0;
        // SAFETY: reaping the child that failed to exec.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        ctl.send(&format!("spawn_failed {e} {stage}"));
        ctl.send(&done_line());
        return 0;
    }
    ctl.send(&format!("spawned {pid}"));
    // The command's stdio belongs to the command: if the supervisor kept
    // its copies, output EOF would wait for the supervisor's own exit.
    // SAFETY: closing this process's own descriptors.
    unsafe {
        for fd in 0..3 {
            libc::close(fd);
        }
    }

    let grace = Duration::from_millis(spec.grace_ms);
    let mut main_alive = true;
    // When set, the tree is being stopped: SIGTERM was sent at .0, SIGKILL
    // follows once .0 + grace has passed.
    let mut stopping: Option<Instant> = None;
    let mut ctl_open = true;
    loop {
        // Reap everything that has exited.
        loop {
            let mut status = 0;
            // SAFETY: non-blocking waitpid for any child.
            let r = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if r <= 0 {
                if r < 0 && errno() == libc::ECHILD && !main_alive {
                    ctl.send(&done_line());
                    return 0;
                }
                break;
            }
            if r == pid {
                main_alive = false;
                if libc::WIFEXITED(status) {
                    ctl.send(&format!("exited code {}", libc::WEXITSTATUS(status)));
                } else if libc::WIFSIGNALED(status) {
                    ctl.send(&format!("exited signal {}", libc::WTERMSIG(status)));
                }
            }
        }
        if !main_alive && stopping.is_none() {
            // The command is done and something it started is still here
            // (waitpid found children but none exited): it goes too.
            stopping = Some(Instant::now());
            signal_descendants(libc::SIGTERM);
        }
        if let Some(since) = stopping {
            if since.elapsed() >= grace {
                signal_descendants(libc::SIGKILL);
            }
        }
        let timeout_ms = match stopping {
            Some(since) if since.elapsed() < grace => {
                (grace - since.elapsed()).as_millis().clamp(1, 50) as i32
            }
            Some(_) => 10,
            None => -1,
        };
        let mut fds = [
            libc::pollfd {
                fd: sfd,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: if ctl_open { ctl.fd } else { -1 },
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: poll on a valid array of two pollfds.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout_ms) };
        if n < 0 {
            continue;
        }
        if fds[0].revents & libc::POLLIN != 0 {
            let mut info: libc::signalfd_siginfo = zeroed();
            // SAFETY: read one siginfo from the signalfd into a valid struct.
            while unsafe {
                libc::read(
                    sfd,
                    (&mut info as *mut libc::signalfd_siginfo).cast(),
                    std::mem::size_of::<libc::signalfd_siginfo>(),
                )
            } > 0
            {
                if info.ssi_signo as i32 != libc::SIGCHLD && stopping.is_none() {
                    stopping = Some(Instant::now());
                    signal_descendants(libc::SIGTERM);
                }
            }
        }
        if ctl_open && fds[1].revents != 0 {
            let mut buf = [0u8; 256];
            // SAFETY: read into a valid buffer.
            let n = unsafe { libc::read(ctl.fd, buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                // The agent is gone: nobody will collect the result, so do
                // not leave the command running.
                ctl_open = false;
                if stopping.is_none() {
                    stopping = Some(Instant::now());
                    signal_descendants(libc::SIGTERM);
                }
                continue;
            }
            ctl.inbuf.extend_from_slice(&buf[..n as usize]);
            while let Some(nl) = ctl.inbuf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = ctl.inbuf.drain(..=nl).collect();
                let line = String::from_utf8_lossy(&line[..line.len() - 1]).into_owned();
                if line == "kill" {
                    if stopping.is_none() {
                        stopping = Some(Instant::now());
                        signal_descendants(libc::SIGTERM);
                    }
                } else if let Some(sig) = line
                    .strip_prefix("signal ")
                    .and_then(|s| s.parse::<i32>().ok())
                {
                    if main_alive {
                        // SAFETY: signalling our own, not yet reaped, child.
                        unsafe { libc::kill(pid, sig) };
                    }
                }
            }
        }
    }
}

/// `done` with the resource usage of every process this supervisor reaped.
fn done_line() -> String {
    let mut ru: libc::rusage = zeroed();
    // SAFETY: getrusage into a valid struct.
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    let us = |tv: libc::timeval| tv.tv_sec as u64 * 1_000_000 + tv.tv_usec as u64;
    format!(
        "done {} {} {}",
        us(ru.ru_utime),
        us(ru.ru_stime),
        ru.ru_maxrss
    )
}

fn zeroed<T>() -> T {
    // SAFETY: only used for plain C structs (sigset_t, siginfo) where all-zero is valid.
    unsafe { std::mem::zeroed() }
}

/// execvp's search, done before forking: a name without a slash is looked
/// up in the command's own PATH (or the default one). The error is the
/// errno execve would have reported.
fn resolve_program(name: &str, path: Option<&str>) -> Result<CString, i32> {
    if name.contains('/') {
        return CString::new(name).map_err(|_| libc::EINVAL);
    }
    let path = path.unwrap_or("/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin");
    let mut err = libc::ENOENT;
    for dir in path.split(':') {
        let dir = if dir.is_empty() { "." } else { dir };
        let Ok(c) = CString::new(format!("{dir}/{name}")) else {
            continue;
        };
        let mut st: libc::stat = zeroed();
        // SAFETY: stat and access with a NUL-terminated path.
        unsafe {
            if libc::stat(c.as_ptr(), &mut st) != 0 || st.st_mode & libc::S_IFMT != libc::S_IFREG {
                continue;
            }
            if libc::access(c.as_ptr(), libc::X_OK) == 0 {
                return Ok(c);
            }
        }
        err = libc::EACCES;
    }
    Err(err)
}

/// Sends `sig` to every process below this supervisor, found by walking
/// parent links in /proc (a process that re-parented to us is our child).
fn signal_descendants(sig: i32) {
    // SAFETY: getpid has no preconditions.
    let me = unsafe { libc::getpid() };
    let procs = crate::pid1::processes();
    let mut tree = vec![me];
    let mut i = 0;
    while i < tree.len() {
        let parent = tree[i];
        for p in &procs {
            if p.ppid == parent && !tree.contains(&p.pid) {
                tree.push(p.pid);
            }
        }
        i += 1;
    }
    for pid in tree.into_iter().skip(1) {
        // SAFETY: kill(2) of a descendant pid.
        unsafe { libc::kill(pid, sig) };
        if sig == libc::SIGTERM {
            // A stopped process does not act on SIGTERM until continued.
            // SAFETY: as above.
            unsafe { libc::kill(pid, libc::SIGCONT) };
        }
    }
}
