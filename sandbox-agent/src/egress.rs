//! The egress relay of an `egress` sandbox: a TCP listener on the sandbox's
//! loopback (`HTTP_PROXY`/`HTTPS_PROXY` point at it) whose connections are
//! handed, unread, to the control plane, which reads each request, asks
//! policy, and connects out from the host. The relay decides nothing and is
//! trusted with nothing: a command that took its place could only send the
//! same requests to the same control plane.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;

/// Connections accepted and not yet taken by the control plane, at most.
pub const MAX_PENDING: usize = 256;
/// An accepted connection nobody takes within this is closed.
pub const PENDING_FOR: Duration = Duration::from_secs(60);

/// The relay's accepted connections.
#[derive(Clone)]
pub struct Relay {
    inner: Arc<Inner>,
}

struct Inner {
    pending: Mutex<HashMap<u64, (TcpStream, Instant)>>,
    next: AtomicU64,
    accepted: broadcast::Sender<u64>,
}

impl Relay {
    /// Listens on `addr` and keeps what it accepts for [`Relay::take`].
    pub async fn start(addr: SocketAddr) -> std::io::Result<Relay> {
        let listener = TcpListener::bind(addr).await?;
        let relay = Relay {
            inner: Arc::new(Inner {
                pending: Mutex::new(HashMap::new()),
                next: AtomicU64::new(1),
                accepted: broadcast::channel(MAX_PENDING).0,
            }),
        };
        let accepting = relay.clone();
        tokio::spawn(async move {
            loop {
                let Ok((conn, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                accepting.keep(conn);
            }
        });
        Ok(relay)
    }

    fn keep(&self, conn: TcpStream) {
        let now = Instant::now();
        let mut pending = self.inner.pending.lock().expect("lock");
        pending.retain(|_, (_, at)| now.duration_since(*at) < PENDING_FOR);
        if pending.len() >= MAX_PENDING {
            // Dropped: the command sees its connection closed.
            return;
        }
        let id = self.inner.next.fetch_add(1, Ordering::Relaxed);
        pending.insert(id, (conn, now));
        drop(pending);
        let _ = self.inner.accepted.send(id);
    }

    /// Connections as they are accepted, from now on, and those waiting.
    pub fn follow(&self) -> (Vec<u64>, broadcast::Receiver<u64>) {
        let receiver = self.inner.accepted.subscribe();
        let mut waiting: Vec<u64> = self
            .inner
            .pending
            .lock()
            .expect("lock")
            .keys()
            .copied()
            .collect();
        waiting.sort_unstable();
        (waiting, receiver)
    }

    /// Takes an accepted connection, once.
    pub fn take(&self, id: u64) -> Option<TcpStream> {
        self.inner
            .pending
            .lock()
            .expect("lock")
            .remove(&id)
            .map(|(conn, _)| conn)
    }
}
