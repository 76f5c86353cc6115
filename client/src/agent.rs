//! Connections to sandbox agents, made so that nothing a sandbox writes can
//! redirect them.
//!
//! An agent's socket sits in a host directory that is also the sandbox's
//! `/run/bridle`. The control plane locks that directory once the agent is
//! serving (its own policy, not this connector's), and on every connection
//! this connector still trusts neither the path nor the peer:
//! - the socket is opened with `O_NOFOLLOW` from the directory and must be a
//!   socket; it is connected through its descriptor, so a symlink planted in
//!   the directory (to another sandbox's agent, or to any host socket) is
//!   never followed;
//! - the peer must prove it holds this sandbox's agent key
//!   ([`bridle_proto::handshake`]) before any request is sent.
//!
//! An agent started by hand without a key (`sandbox-agent --socket PATH`, as
//! the tests and the benchmark run it on the host) proves nothing; reach it
//! with [`connect_unverified`], and only when you started it yourself.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use bridle_proto::handshake::{self, CHALLENGE_LEN, PROOF_LEN};
use bridle_proto::sandbox::v1::sandbox_agent_client::SandboxAgentClient;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

pub type Agent = SandboxAgentClient<Channel>;

/// The agent's socket, inside its sandbox's socket directory.
pub const SOCKET_NAME: &str = "agent.sock";
/// How long an agent may take to answer the identity challenge.
const PROOF_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest message a client of the agent takes and sends (files move in
/// 1 MiB messages).
const MAX_MESSAGE_BYTES: usize = 16 << 20;

/// Opens `dir/agent.sock` without following links, connects to it and has
/// the agent prove it holds `key`. Errors say which check failed.
pub async fn dial(dir: &Path, key: &[u8; 32]) -> std::io::Result<UnixStream> {
    let socket = open_socket_no_follow(dir)?;
    // Connecting through the descriptor's /proc link reaches exactly the
    // inode opened above, whatever the directory holds by now.
    let mut stream = UnixStream::connect(format!("/proc/self/fd/{}", socket.as_raw_fd())).await?;
    drop(socket);
    let mut challenge = [0u8; CHALLENGE_LEN];
    getrandom::fill(&mut challenge).map_err(|e| std::io::Error::other(e.to_string()))?;
    stream.write_all(&challenge).await?;
    let mut proof = [0u8; PROOF_LEN];
    let answered = tokio::time::timeout(PROOF_TIMEOUT, stream.read_exact(&mut proof)).await;
    let verified = matches!(answered, Ok(Ok(_))) && handshake::verify(key, &challenge, &proof);
    if !verified {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "{} is not served by this sandbox's agent (it did not prove the agent's identity); refusing to use it",
                dir.join(SOCKET_NAME).display()
            ),
        ));
    }
    Ok(stream)
}

fn open_socket_no_follow(dir: &Path) -> std::io::Result<OwnedFd> {
    use std::os::unix::ffi::OsStrExt;
    let cpath = |p: &[u8]| {
        std::ffi::CString::new(p).map_err(|_| std::io::Error::other("a NUL byte in a path"))
    };
    let dir_c = cpath(dir.as_os_str().as_bytes())?;
    // SAFETY: open(2) with a NUL-terminated path; the fd is owned below.
    let dirfd = unsafe {
        libc::open(
            dir_c.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    if dirfd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: dirfd was just opened and is owned here alone.
    let dirfd = unsafe { OwnedFd::from_raw_fd(dirfd) };
    let name = cpath(SOCKET_NAME.as_bytes())?;
    // SAFETY: openat(2) on a valid dirfd with a NUL-terminated name.
    let fd = unsafe {
        libc::openat(
            dirfd.as_raw_fd(),
            name.as_ptr(),
            libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd was just opened and is owned here alone.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: fstat into a zeroed stat buffer on a valid fd.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above, on the fd just opened.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "{} is not a socket (a link or a file put in the agent's place); refusing to use it",
                dir.join(SOCKET_NAME).display()
            ),
        ));
    }
    Ok(fd)
}

/// The endpoint every agent channel starts from. The URI is required by
/// the API but unused: the connector dials the socket. Bulk transfers move
/// 1 MiB messages, which HTTP/2's default 64 KiB windows would stall.
fn agent_endpoint(connect_timeout: Duration) -> Endpoint {
    Endpoint::from_static("http://agent.local")
        .connect_timeout(connect_timeout)
        .initial_stream_window_size(8 << 20)
        .initial_connection_window_size(16 << 20)
}

/// A lazily dialled channel to the agent in `dir`, verified on every
/// (re)connection, with the windows the agent uses.
pub fn channel(dir: PathBuf, key: [u8; 32], connect_timeout: Duration) -> Channel {
    agent_endpoint(connect_timeout).connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
        let dir = dir.clone();
        async move { Ok::<_, std::io::Error>(TokioIo::new(dial(&dir, &key).await?)) }
    }))
}

/// A client for the agent in `dir` (see [`channel`]).
pub fn connect(dir: PathBuf, key: [u8; 32]) -> Agent {
    client(channel(dir, key, Duration::from_secs(5)))
}

/// Whether the agent in `dir` proves its identity and reports SERVING.
pub async fn serving(dir: &Path, key: &[u8; 32]) -> bool {
    let channel = channel(dir.to_path_buf(), *key, Duration::from_secs(1));
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    matches!(
        tokio::time::timeout(
            Duration::from_secs(2),
            health.check(tonic_health::pb::HealthCheckRequest { service: String::new() }),
        )
        .await,
        Ok(Ok(r)) if r.get_ref().status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    )
}

/// A lazily dialled channel to an agent that was started without an
/// identity key, at the socket path `socket`: the path is followed and the
/// peer proves nothing, so only for an agent the caller started itself.
/// Frames of up to 1 MiB are taken, as the agent sends them.
pub fn channel_unverified(socket: PathBuf, connect_timeout: Duration) -> Channel {
    agent_endpoint(connect_timeout)
        .max_frame_size(1 << 20)
        .connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(socket).await?)) }
        }))
}

/// A client for the agent at `socket` (see [`channel_unverified`]).
pub fn connect_unverified(socket: &Path) -> Agent {
    client(channel_unverified(
        socket.to_path_buf(),
        Duration::from_secs(5),
    ))
}

fn client(channel: Channel) -> Agent {
    SandboxAgentClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Serves `dir/agent.sock` (or `at`) answering every challenge with
    /// `answer(challenge)`.
    fn serve(
        at: &Path,
        answer: impl Fn(&[u8; CHALLENGE_LEN]) -> Vec<u8> + Send + 'static,
    ) -> tokio::task::JoinHandle<()> {
        let listener = tokio::net::UnixListener::bind(at).unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let mut challenge = [0u8; CHALLENGE_LEN];
                if s.read_exact(&mut challenge).await.is_ok() {
                    let _ = s.write_all(&answer(&challenge)).await;
                }
            }
        })
    }

    #[tokio::test]
    async fn only_the_agent_holding_the_sandbox_key_is_used() {
        let key = [1u8; 32];
        let t = tempfile::tempdir().unwrap();
        let (good, forged, garbage) = (t.path().join("a"), t.path().join("b"), t.path().join("c"));
        for d in [&good, &forged, &garbage] {
            std::fs::create_dir(d).unwrap();
        }
        serve(&good.join(SOCKET_NAME), move |c| {
            handshake::prove(&key, c).to_vec()
        });
        // Another sandbox's agent: a valid proof, for its own key.
        serve(&forged.join(SOCKET_NAME), |c| {
            handshake::prove(&[2u8; 32], c).to_vec()
        });
        // Something that is not an agent at all.
        serve(&garbage.join(SOCKET_NAME), |_| {
            b"HTTP/1.1 400 Bad Request\r\n\r\n".to_vec()
        });

        dial(&good, &key).await.expect("the right agent is used");
        for dir in [&forged, &garbage] {
            let e = dial(dir, &key).await.unwrap_err();
            assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied, "{e}");
            assert!(e.to_string().contains("did not prove"), "{e}");
        }
    }

    #[tokio::test]
    async fn a_link_planted_in_the_agents_place_is_never_followed() {
        let key = [1u8; 32];
        let t = tempfile::tempdir().unwrap();
        // A real agent elsewhere (another sandbox's, or any host socket)...
        let elsewhere = t.path().join("elsewhere.sock");
        serve(&elsewhere, move |c| handshake::prove(&key, c).to_vec());
        // ...and the sandbox's directory holding a link to it.
        let dir = t.path().join("sb");
        std::fs::create_dir(&dir).unwrap();
        std::os::unix::fs::symlink(&elsewhere, dir.join(SOCKET_NAME)).unwrap();
        let e = dial(&dir, &key).await.unwrap_err();
        assert!(e.to_string().contains("is not a socket"), "{e}");
        // A regular file is refused the same way.
        std::fs::remove_file(dir.join(SOCKET_NAME)).unwrap();
        std::fs::write(dir.join(SOCKET_NAME), b"x").unwrap();
        let e = dial(&dir, &key).await.unwrap_err();
        assert!(e.to_string().contains("is not a socket"), "{e}");
        // And a link in place of the directory itself.
        let linked_dir = t.path().join("linked");
        std::os::unix::fs::symlink(t.path(), &linked_dir).unwrap();
        assert!(dial(&linked_dir, &key).await.is_err());
    }
}
