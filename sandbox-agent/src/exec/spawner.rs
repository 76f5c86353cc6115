//! The fork server that starts every exec's supervisor.
//!
//! Forking the agent itself would copy a multi-threaded process, after which
//! only async-signal-safe calls are allowed until exec, and exec'ing the
//! 10 MB agent binary once per command costs more than the command itself
//! (the more so on a FUSE-backed root). So the agent execs itself once, at
//! start, as a small single-threaded spawner. For each command it sends the
//! spawner a [`ShimSpec`] and five descriptors (stdin, stdout, stderr, the
//! working directory, the control socket) over a Unix socket with
//! SCM_RIGHTS; the spawner forks, and the child becomes that command's
//! supervisor ([`shim::run_forked`]). The spawner reaps its children and
//! exits when the agent's end of the socket closes.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::Mutex;

use super::shim::{self, ShimSpec};
use crate::pid1::Reaper;

pub const SPAWNER_ARG: &str = "__spawner";
const NFDS: usize = 5;
/// Largest spec accepted (argv + env); Linux's own ARG_MAX is 2 MiB.
const MAX_SPEC: u64 = 4 << 20;

pub struct Spawner {
    sock: Mutex<UnixStream>,
    reaper: std::sync::Arc<Reaper>,
    /// The current spawner process.
    pid: std::sync::atomic::AtomicU32,
}

impl Spawner {
    /// Starts the spawner process (as a child the reaper knows about).
    pub fn start(reaper: std::sync::Arc<Reaper>) -> std::io::Result<Self> {
        let (sock, pid) = Self::start_process(&reaper)?;
        Ok(Self {
            sock: Mutex::new(sock),
            reaper,
            pid: pid.into(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.pid.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn start_process(reaper: &Reaper) -> std::io::Result<(UnixStream, u32)> {
        let (ours, theirs) = UnixStream::pair()?;
        let mut cmd = std::process::Command::new("/proc/self/exe");
        use std::os::unix::process::CommandExt;
        cmd.arg0("sandbox-agent: spawner")
            .arg(SPAWNER_ARG)
            .arg(theirs.as_raw_fd().to_string())
            .stdin(std::process::Stdio::null());
        let pid = reaper.spawn(&mut cmd, &[theirs.as_raw_fd()])?;
        drop(theirs);
        Ok((ours, pid))
    }

    /// Asks for a supervisor running `spec` with `fds` = [stdin, stdout,
    /// stderr, cwd, control]. The supervisor reports on the control socket.
    pub fn spawn(&self, spec: &ShimSpec, fds: [RawFd; NFDS]) -> std::io::Result<()> {
        let body = spec.encode();
        let header = (body.len() as u64).to_le_bytes();
        let mut sock = self.sock.lock().unwrap_or_else(|e| e.into_inner());
        match send_with_fds(sock.as_raw_fd(), &header, &fds) {
            Err(e)
                if e.raw_os_error() == Some(libc::EPIPE)
                    || e.raw_os_error() == Some(libc::ECONNRESET) =>
            {
                // The spawner died (killed from inside the sandbox, say):
                // start a new one and retry once.
                tracing::warn!("exec spawner was gone; restarting it");
                let (new_sock, pid) = Self::start_process(&self.reaper)?;
                *sock = new_sock;
                self.pid.store(pid, std::sync::atomic::Ordering::Relaxed);
                send_with_fds(sock.as_raw_fd(), &header, &fds)?;
            }
            other => other?,
        }
        (&*sock).write_all(&body)
    }
}

/// Room for one SCM_RIGHTS message carrying `nfds` descriptors.
fn control_buffer(nfds: usize) -> Vec<u8> {
    // SAFETY: CMSG_SPACE is a pure computation.
    vec![0u8; unsafe { libc::CMSG_SPACE((nfds * std::mem::size_of::<RawFd>()) as u32) } as usize]
}

/// A message header over one iovec and a control buffer; both must outlive
/// the sendmsg/recvmsg call that uses it.
fn msghdr(iov: &mut libc::iovec, cbuf: &mut [u8]) -> libc::msghdr {
    // SAFETY: msghdr is plain data; all-zero is valid.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = cbuf.len();
    msg
}

fn send_with_fds(sock: RawFd, data: &[u8], fds: &[RawFd]) -> std::io::Result<()> {
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    let mut cbuf = control_buffer(fds.len());
    let msg = msghdr(&mut iov, &mut cbuf);
    // SAFETY: the control buffer is CMSG_SPACE bytes, enough for one header
    // and `fds`.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of_val(fds) as u32) as usize;
        std::ptr::copy_nonoverlapping(
            fds.as_ptr(),
            libc::CMSG_DATA(cmsg).cast::<RawFd>(),
            fds.len(),
        );
    }
    loop {
        // SAFETY: msg is fully initialised above.
        let n = unsafe { libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL) };
        if n == data.len() as isize {
            return Ok(());
        }
        let err = std::io::Error::last_os_error();
        if n < 0 && err.kind() == std::io::ErrorKind::Interrupted {
            continue;
        }
        return Err(if n < 0 {
            err
        } else {
            std::io::Error::other("short write to the spawner")
        });
    }
}

/// Reads exactly the 8-byte header and the descriptors sent with it.
fn recv_with_fds(sock: RawFd) -> std::io::Result<Option<([u8; 8], Vec<OwnedFd>)>> {
    let mut header = [0u8; 8];
    let mut iov = libc::iovec {
        iov_base: header.as_mut_ptr().cast(),
        iov_len: header.len(),
    };
    let mut cbuf = control_buffer(NFDS);
    let mut msg = msghdr(&mut iov, &mut cbuf);
    let n = loop {
        // SAFETY: as above; received fds are close-on-exec.
        let n =
            unsafe { libc::recvmsg(sock, &mut msg, libc::MSG_CMSG_CLOEXEC | libc::MSG_WAITALL) };
        if n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
            continue;
        }
        break n;
    };
    if n == 0 {
        return Ok(None);
    }
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    // SAFETY: walking the control messages the kernel wrote into cbuf.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let count =
                    ((*cmsg).cmsg_len - libc::CMSG_LEN(0) as usize) / std::mem::size_of::<RawFd>();
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                for i in 0..count {
                    fds.push(OwnedFd::from_raw_fd(*data.add(i)));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if n != 8 {
        return Err(std::io::Error::other("truncated request header"));
    }
    Ok(Some((header, fds)))
}

/// Entry point of `sandbox-agent __spawner <fd>`. Never returns.
pub fn main(args: &[std::ffi::OsString]) -> ! {
    let Some(fd) = args
        .first()
        .and_then(|a| a.to_str())
        .and_then(|s| s.parse::<RawFd>().ok())
    else {
        eprintln!("sandbox-agent spawner: expected the socket's fd");
        std::process::exit(2);
    };
    // SAFETY: the fd was passed to us open; nothing else owns it here.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    crate::pid1::make_undumpable();
    // SAFETY: plain syscalls on this process.
    unsafe {
        libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
        // Supervisors report on their control sockets, so their exit status
        // is not needed: the kernel reaps them (no zombies between requests).
        libc::signal(libc::SIGCHLD, libc::SIG_IGN);
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
    let mut stream = std::fs::File::from(sock);
    loop {
        let (header, fds) = match recv_with_fds(stream.as_raw_fd()) {
            Ok(Some(v)) => v,
            Ok(None) => std::process::exit(0),
            Err(e) => {
                eprintln!("sandbox-agent spawner: {e}");
                std::process::exit(1);
            }
        };
        let len = u64::from_le_bytes(header);
        if len > MAX_SPEC {
            eprintln!("sandbox-agent spawner: request of {len} bytes refused");
            std::process::exit(1);
        }
        let mut body = vec![0u8; len as usize];
        if let Err(e) = stream.read_exact(&mut body) {
            eprintln!("sandbox-agent spawner: {e}");
            std::process::exit(1);
        }
        let spec = ShimSpec::decode(&body);
        let fds: Result<[OwnedFd; NFDS], _> = fds.try_into();
        let (Ok(spec), Ok(fds)) = (spec, fds) else {
            // A malformed request: the supervisor's control socket (if it
            // came) is dropped, and the agent sees EOF as a failed start.
            continue;
        };
        // SAFETY: fork of this single-threaded process.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // The child must not keep the spawner's socket.
            drop(stream);
            let raw = fds.each_ref().map(|f| f.as_raw_fd());
            // The child owns these now; run_forked never returns.
            std::mem::forget(fds);
            shim::run_forked(spec, raw);
        }
        if pid < 0 {
            let err = std::io::Error::last_os_error();
            let mut ctl = std::fs::File::from(fds.into_iter().nth(4).expect("five fds"));
            let _ = writeln!(
                ctl,
                "spawn_failed {} fork",
                err.raw_os_error().unwrap_or(libc::EAGAIN)
            );
            let _ = writeln!(ctl, "done 0 0 0");
        }
        // Our copies of the descriptors close here; the child has its own.
    }
}
