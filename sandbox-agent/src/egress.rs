//! The egress relay of an `egress` sandbox: a TCP listener on the sandbox's
//! loopback (`HTTP_PROXY`/`HTTPS_PROXY` point at it) and a DNS listener
//! (`/etc/resolv.conf` points at it) whose connections and queries are
//! handed, unread, to the control plane, which reads each, asks policy, and
//! connects out or answers from the host. The relay decides nothing and is
//! trusted with nothing: a command that took its place could only send the
//! same requests to the same control plane.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::broadcast;

/// Connections and queries accepted and not yet taken by the control plane,
/// at most.
pub const MAX_PENDING: usize = 1024;
/// An accepted connection nobody takes within this is closed.
pub const PENDING_FOR: Duration = Duration::from_secs(60);
/// A DNS query over UDP is at most this long (larger datagrams are cut, and
/// then fail to parse in the control plane).
pub const MAX_QUERY: usize = 4096;

/// Something a command sent that waits for the control plane.
pub enum Waiting {
    /// A connection to the proxy listener.
    Tcp(TcpStream),
    /// A DNS query: its bytes, who sent it, and where to answer from.
    Dns {
        query: Vec<u8>,
        from: SocketAddr,
        socket: Arc<UdpSocket>,
    },
}

/// One announcement: what waits, and whether it is a DNS query.
#[derive(Clone, Copy, Debug)]
pub struct Accepted {
    pub id: u64,
    pub dns: bool,
}

/// The relay's accepted connections and queries.
#[derive(Clone)]
pub struct Relay {
    inner: Arc<Inner>,
}

struct Inner {
    pending: Mutex<HashMap<u64, (Waiting, Instant)>>,
    next: AtomicU64,
    accepted: broadcast::Sender<Accepted>,
}

impl Relay {
    /// Listens for connections on `proxy` and, when given, for DNS queries
    /// on `dns` (UDP), and keeps what comes for [`Relay::take`].
    pub async fn start(proxy: SocketAddr, dns: Option<SocketAddr>) -> std::io::Result<Relay> {
        let listener = TcpListener::bind(proxy).await?;
        let socket = match dns {
            Some(addr) => Some(Arc::new(UdpSocket::bind(addr).await?)),
            None => None,
        };
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
                accepting.keep(Waiting::Tcp(conn));
            }
        });
        if let Some(socket) = socket {
            let receiving = relay.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; MAX_QUERY];
                loop {
                    let Ok((n, from)) = socket.recv_from(&mut buf).await else {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    };
                    receiving.keep(Waiting::Dns {
                        query: buf[..n].to_vec(),
                        from,
                        socket: socket.clone(),
                    });
                }
            });
        }
        Ok(relay)
    }

    fn keep(&self, waiting: Waiting) {
        let now = Instant::now();
        let dns = matches!(waiting, Waiting::Dns { .. });
        let mut pending = self.inner.pending.lock().expect("lock");
        pending.retain(|_, (_, at)| now.duration_since(*at) < PENDING_FOR);
        if pending.len() >= MAX_PENDING {
            // Dropped: the command sees its connection closed (or its query
            // unanswered).
            return;
        }
        let id = self.inner.next.fetch_add(1, Ordering::Relaxed);
        pending.insert(id, (waiting, now));
        drop(pending);
        let _ = self.inner.accepted.send(Accepted { id, dns });
    }

    /// What is accepted from now on, and what waits already.
    pub fn follow(&self) -> (Vec<Accepted>, broadcast::Receiver<Accepted>) {
        let receiver = self.inner.accepted.subscribe();
        let mut waiting: Vec<Accepted> = self
            .inner
            .pending
            .lock()
            .expect("lock")
            .iter()
            .map(|(id, (w, _))| Accepted {
                id: *id,
                dns: matches!(w, Waiting::Dns { .. }),
            })
            .collect();
        waiting.sort_unstable_by_key(|a| a.id);
        (waiting, receiver)
    }

    /// Keeps in `sent` only the ids that still wait: the others were taken
    /// or dropped, and a listing never shows them again.
    pub fn prune(&self, sent: &mut std::collections::HashSet<u64>) {
        let pending = self.inner.pending.lock().expect("lock");
        sent.retain(|id| pending.contains_key(id));
    }

    /// Takes what waits as `id`, once.
    pub fn take(&self, id: u64) -> Option<Waiting> {
        self.inner
            .pending
            .lock()
            .expect("lock")
            .remove(&id)
            .map(|(w, _)| w)
    }
}
