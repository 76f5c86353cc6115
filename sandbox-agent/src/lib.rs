//! bridle's sandbox agent: the gRPC server that runs as PID 1 inside every
//! sandbox container and executes commands, file I/O and snapshots there.
//!
//! `main.rs` only parses [`Config`] and calls [`run`]; everything else lives
//! here so tests can start the server on a socket of their own.

pub mod cgroup;
pub mod egress;
pub mod exec;
pub mod fs;
pub mod peers;
pub mod pid1;
pub mod service;
pub mod snapshot;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bridle_proto::sandbox::v1::sandbox_agent_server::SandboxAgentServer;

/// HTTP/2 flow-control windows; clients should use the same (see README).
pub const STREAM_WINDOW: u32 = 8 << 20;
pub const CONNECTION_WINDOW: u32 = 16 << 20;
/// Largest HTTP/2 frame we accept (the protocol's default is 16 KiB).
pub const MAX_FRAME: u32 = 1 << 20;

/// Everything the agent can be told, from flags or `BRIDLE_AGENT_*`.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "sandbox-agent",
    version,
    about = "bridle's in-sandbox execution server"
)]
pub struct Config {
    /// Unix socket to serve on.
    #[arg(
        long,
        env = "BRIDLE_AGENT_SOCKET",
        default_value = "/run/bridle/agent.sock"
    )]
    pub socket: PathBuf,
    /// Also serve on this TCP address (no authentication: only for trusted networks).
    #[arg(long, env = "BRIDLE_AGENT_TCP")]
    pub tcp: Option<SocketAddr>,
    /// Root of every file operation; commands start here by default.
    #[arg(long, env = "BRIDLE_AGENT_WORKSPACE", default_value = "/workspace")]
    pub workspace: PathBuf,
    /// Output bytes kept per exec (head and tail halves).
    #[arg(long, env = "BRIDLE_AGENT_OUTPUT_CAP", default_value_t = 8 << 20)]
    pub output_cap: usize,
    /// Seconds a finished exec's result and output are kept for Attach.
    #[arg(long, env = "BRIDLE_AGENT_RETENTION_SECS", default_value_t = 3600)]
    pub retention_secs: u64,
    /// Finished execs kept at most.
    #[arg(long, env = "BRIDLE_AGENT_MAX_RETAINED", default_value_t = 1024)]
    pub max_retained: usize,
    /// Output bytes kept by all finished execs together (oldest forgotten first).
    #[arg(long, env = "BRIDLE_AGENT_RETAINED_OUTPUT_BYTES", default_value_t = 64 << 20)]
    pub retained_output_bytes: usize,
    /// Milliseconds between SIGTERM and SIGKILL when a command tree is stopped.
    #[arg(long, env = "BRIDLE_AGENT_KILL_GRACE_MS", default_value_t = 2000)]
    pub kill_grace_ms: u64,
    /// Seconds of silence after which an exec stream gets a keepalive.
    #[arg(long, env = "BRIDLE_AGENT_KEEPALIVE_SECS", default_value_t = 15)]
    pub keepalive_secs: u64,
    /// Concurrent gRPC streams per connection.
    #[arg(long, env = "BRIDLE_AGENT_MAX_STREAMS", default_value_t = 256)]
    pub max_streams: u32,
    /// An `egress` sandbox's relay: listen here (the sandbox's loopback) and
    /// hand each connection to the control plane (`EgressAccepted`).
    #[arg(long, env = "BRIDLE_AGENT_EGRESS_PROXY")]
    pub egress_proxy: Option<SocketAddr>,
    /// With `egress_proxy`: also answer DNS queries (UDP) here, each handed
    /// to the control plane like a connection.
    #[arg(long, env = "BRIDLE_AGENT_EGRESS_DNS")]
    pub egress_dns: Option<SocketAddr>,
    /// The identity key (see [`peers`]); never a flag, since any process can
    /// read PID 1's command line. Set by [`Config::take_key_from_env`].
    #[arg(skip)]
    pub key: Option<AgentKey>,
}

/// The agent's identity key; never printed.
#[derive(Clone)]
pub struct AgentKey(pub [u8; 32]);

impl std::fmt::Debug for AgentKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AgentKey(***)")
    }
}

/// Where the control plane puts the agent's identity key (64 hex digits).
pub const KEY_ENV: &str = "BRIDLE_AGENT_KEY";

impl Config {
    /// Reads the identity key from [`KEY_ENV`] and removes it from the
    /// environment, so that nothing the agent starts inherits it. Call it
    /// before any other thread or child exists.
    pub fn take_key_from_env(&mut self) -> anyhow::Result<()> {
        let Some(hex_key) = std::env::var_os(KEY_ENV) else {
            return Ok(());
        };
        // The environment's own copy (on the initial stack, which
        // /proc/1/environ shows) is overwritten, not just unlinked.
        let name = std::ffi::CString::new(KEY_ENV).expect("no NUL in the name");
        // SAFETY: no other thread exists yet (the caller's promise); getenv
        // points at the value's bytes, which are overwritten in place with
        // as many bytes, its terminating NUL kept.
        unsafe {
            let value = libc::getenv(name.as_ptr());
            if !value.is_null() {
                std::ptr::write_bytes(value, b'0', libc::strlen(value));
            }
        }
        std::env::remove_var(KEY_ENV);
        let key = hex::decode(hex_key.as_encoded_bytes())
            .ok()
            .and_then(|k| <[u8; 32]>::try_from(k).ok())
            .with_context(|| format!("{KEY_ENV} must be 64 hex digits"))?;
        self.key = Some(AgentKey(key));
        Ok(())
    }
}

/// A random id for this start of the agent, as 32 hex digits.
fn new_boot_id() -> anyhow::Result<String> {
    let mut id = [0u8; 16];
    // SAFETY: getrandom fills the buffer it is given, of the length given.
    let n = unsafe { libc::getrandom(id.as_mut_ptr().cast(), id.len(), 0) };
    anyhow::ensure!(
        n == id.len() as isize,
        "reading the random source: {}",
        std::io::Error::last_os_error()
    );
    Ok(hex::encode(id))
}

/// Serves until `shutdown` resolves, then stops every running command
/// (SIGTERM, SIGKILL after the grace period) and returns.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let boot_id = new_boot_id()?;
    let ws = fs::Workspace::at(&config.workspace)
        .with_context(|| format!("opening workspace {}", config.workspace.display()))?;
    let ws = Arc::new(ws);
    // As PID 1 the agent inherits every orphan in the sandbox. Elsewhere it
    // asks for the same, so that it can stop processes that escaped their
    // exec's supervisor (see Execs::stop_strays).
    if std::process::id() != 1 {
        // SAFETY: prctl on this process only.
        unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    }
    let reaper = pid1::Reaper::new();
    tokio::spawn(reaper.clone().run());
    let cgroup = Arc::new(cgroup::OwnCgroup::detect());
    let spawner =
        exec::spawner::Spawner::start(reaper.clone()).context("starting the exec spawner")?;
    let execs = exec::Execs::new(
        exec::Limits {
            output_cap: config.output_cap.max(2),
            retention: Duration::from_secs(config.retention_secs),
            max_retained: config.max_retained,
            retained_output_bytes: config.retained_output_bytes,
            default_grace: Duration::from_millis(config.kill_grace_ms),
        },
        ws.clone(),
        spawner,
        cgroup.clone(),
    )
    .context("opening /dev/null")?;
    let svc = service::AgentService {
        ws: ws.clone(),
        execs: execs.clone(),
        cgroup,
        started,
        boot_id,
        keepalive: Duration::from_secs(config.keepalive_secs.max(1)),
        egress: match config.egress_proxy {
            Some(addr) => Some(
                egress::Relay::start(addr, config.egress_dns)
                    .await
                    .with_context(|| format!("listening for egress on {addr}"))?,
            ),
            None => None,
        },
    };

    let (health, health_svc) = tonic_health::server::health_reporter();
    health
        .set_serving::<SandboxAgentServer<service::AgentService>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(bridle_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("building the reflection service")?;
    let agent = SandboxAgentServer::new(svc)
        .max_decoding_message_size(8 << 20)
        .max_encoding_message_size(8 << 20);

    if let Some(dir) = config.socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    match std::fs::remove_file(&config.socket) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(e)
                .with_context(|| format!("removing stale socket {}", config.socket.display()))
        }
    }
    let uds = tokio::net::UnixListener::bind(&config.socket)
        .with_context(|| format!("binding {}", config.socket.display()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        // The control plane may run as another uid than the agent; who may
        // talk to the agent is decided per connection (see `peers`).
        std::fs::set_permissions(&config.socket, std::fs::Permissions::from_mode(0o666))
            .with_context(|| format!("chmod {}", config.socket.display()))?;
    }
    let admission = peers::Admission::for_this_process(config.key.as_ref().map(|k| k.0));
    // Given a key, the agent is in a sandbox of a control plane, whose
    // promises rest on it being PID 1 (peer and stop-signal checks) and
    // having no listener without those checks.
    if admission.key.is_some() {
        anyhow::ensure!(
            admission.only_from_outside,
            "the agent has an identity key but is not PID 1 (pid {}): run it as the container's entrypoint, without an init",
            std::process::id()
        );
        anyhow::ensure!(
            config.tcp.is_none(),
            "--tcp serves without the peer and identity checks; it cannot be used with an identity key"
        );
    }
    tracing::info!(
        socket = %config.socket.display(),
        workspace = %ws.root_path().display(),
        only_from_outside = admission.only_from_outside,
        identity_key = admission.key.is_some(),
        "sandbox agent serving"
    );

    // On shutdown: stop accepting, and stop every running command so that
    // open exec streams end with their exit event; then the server drains.
    let grace = Duration::from_millis(config.kill_grace_ms) + Duration::from_secs(2);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let (drained_tx, drained_rx) = tokio::sync::oneshot::channel::<()>();
    let stopping_execs = execs.clone();
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
        stopping_execs.shutdown(grace).await;
        let _ = drained_tx.send(());
    });
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|v| *v).await;
    };

    // Bulk transfers (files, snapshots) move 1 MiB messages; with HTTP/2's
    // default 64 KiB windows every message would wait on window updates.
    let router = tonic::transport::Server::builder()
        .initial_stream_window_size(Some(STREAM_WINDOW))
        .initial_connection_window_size(Some(CONNECTION_WINDOW))
        .max_frame_size(Some(MAX_FRAME))
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .max_concurrent_streams(Some(config.max_streams))
        .tcp_nodelay(true)
        .add_service(health_svc)
        .add_service(reflection)
        .add_service(agent);

    let gc_execs = execs.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(60));
        loop {
            tick.tick().await;
            gc_execs.gc();
        }
    });
    // Orphans are stopped as soon as a supervisor is seen to vanish; this
    // sweep catches any that slip past that.
    let sweep_execs = execs.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            sweep_execs.stop_strays().await;
        }
    });
    // Bulk transfers leave freed 1 MiB buffers in glibc's heap, which keeps
    // them (its mmap threshold rises after large frees, which is also what
    // makes the next transfer fast). Handing free memory back every few
    // seconds keeps an idle agent small without slowing a busy one.
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            // SAFETY: malloc_trim only releases free memory.
            let _ = tokio::task::spawn_blocking(|| unsafe { libc::malloc_trim(0) }).await;
        }
    });

    let uds_stream = peers::admitted(uds, admission);
    let tcp = match config.tcp {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding {addr}"))?,
        ),
        None => None,
    };
    let serve = async move {
        match tcp {
            Some(tcp) => {
                let tcp_stream =
                    tonic::transport::server::TcpIncoming::from(tcp).with_nodelay(Some(true));
                let tcp_router = router.clone();
                let a = router.serve_with_incoming_shutdown(uds_stream, stopped(stop_rx.clone()));
                let b =
                    tcp_router.serve_with_incoming_shutdown(tcp_stream, stopped(stop_rx.clone()));
                tokio::try_join!(a, b).map(|_| ())
            }
            None => {
                router
                    .serve_with_incoming_shutdown(uds_stream, stopped(stop_rx.clone()))
                    .await
            }
        }
    };
    // A client that keeps a stream open after its command ended must not
    // keep PID 1 alive: once the commands are stopped, connections get a
    // short time to finish.
    let give_up = async move {
        let _ = drained_rx.await;
        tokio::time::sleep(Duration::from_secs(2)).await;
    };
    let result = tokio::select! {
        r = serve => r,
        _ = give_up => Ok(()),
    };
    execs.shutdown(grace).await;
    let _ = std::fs::remove_file(&config.socket);
    result.context("serving gRPC")
}
