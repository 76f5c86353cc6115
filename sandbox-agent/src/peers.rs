//! Who may talk to the agent: only the control plane.
//!
//! Two checks on every connection, before any gRPC is served on it:
//! - **The peer is outside the sandbox.** As PID 1 of its own PID namespace,
//!   the agent reads the connecting process's credentials (`SO_PEERCRED`):
//!   the kernel reports the pid of a process outside the namespace as 0, and
//!   every process in the sandbox has a pid of its own there. So commands in
//!   the sandbox, which run as the agent's own uid, are refused even if they
//!   reach the socket. (Not as PID 1, on a host, this check is off: there the
//!   socket's directory is what keeps others out.)
//! - **The agent proves who it is**, when it was given a key: the control
//!   plane sends a challenge and checks the answer
//!   ([`bridle_proto::handshake`]), so that it never talks to a socket some
//!   process in a sandbox put in the agent's place.

use std::sync::Arc;
use std::time::Duration;

use bridle_proto::handshake::{self, CHALLENGE_LEN};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_stream::wrappers::ReceiverStream;

/// How long a new connection may take to send its challenge.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections in their handshake at once; more wait to be accepted.
const MAX_HANDSHAKES: usize = 64;

/// What a connection must satisfy.
#[derive(Clone)]
pub struct Admission {
    /// Refuse peers that share the agent's PID namespace.
    pub only_from_outside: bool,
    /// The agent's identity key: answer a challenge before serving.
    pub key: Option<Arc<[u8; 32]>>,
}

impl Admission {
    /// The rule for this process: peers from outside the sandbox only when
    /// the agent is PID 1 of its namespace.
    pub fn for_this_process(key: Option<[u8; 32]>) -> Self {
        Self {
            only_from_outside: std::process::id() == 1,
            key: key.map(Arc::new),
        }
    }

    /// Checks one connection; `Err` says why it was refused.
    async fn admit(&self, mut stream: UnixStream) -> Result<UnixStream, String> {
        if self.only_from_outside {
            let cred = stream
                .peer_cred()
                .map_err(|e| format!("reading the peer's credentials: {e}"))?;
            match cred.pid() {
                Some(0) => {}
                pid => {
                    return Err(format!(
                        "peer pid {pid:?} (uid {}) is inside the sandbox; only the control plane may use the agent",
                        cred.uid()
                    ))
                }
            }
        }
        if let Some(key) = &self.key {
            let mut challenge = [0u8; CHALLENGE_LEN];
            tokio::time::timeout(HANDSHAKE_TIMEOUT, stream.read_exact(&mut challenge))
                .await
                .map_err(|_| "no challenge within the handshake timeout".to_string())?
                .map_err(|e| format!("reading the challenge: {e}"))?;
            let proof = handshake::prove(key.as_slice(), &challenge);
            stream
                .write_all(&proof)
                .await
                .map_err(|e| format!("answering the challenge: {e}"))?;
        }
        Ok(stream)
    }
}

/// The connections of `listener` that pass `admission`, as an incoming
/// stream for the gRPC server. Handshakes run concurrently (a slow peer does
/// not hold up the next one), at most [`MAX_HANDSHAKES`] at once.
pub fn admitted(
    listener: UnixListener,
    admission: Admission,
) -> ReceiverStream<std::io::Result<UnixStream>> {
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        let permits = Arc::new(Semaphore::new(MAX_HANDSHAKES));
        loop {
            let Ok(permit) = permits.clone().acquire_owned().await else {
                return;
            };
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // EMFILE and the like: say so, and try again shortly.
                    tracing::warn!(error = %e, "accepting a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let (admitted_tx, admission) = (tx.clone(), admission.clone());
            tokio::spawn(async move {
                match admission.admit(stream).await {
                    Ok(stream) => {
                        let _ = admitted_tx.send(Ok(stream)).await;
                    }
                    Err(reason) => tracing::warn!("refused a connection: {reason}"),
                }
                drop(permit);
            });
            if tx.is_closed() {
                return;
            }
        }
    });
    ReceiverStream::new(rx)
}
