//! A small client for `bridle.sandbox.v1.SandboxAgent` over a Unix socket:
//! the connector is `bridle_client::agent`'s (for an agent the test started
//! itself, without an identity key), the rest is what the tests do with it.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bridle_proto::control::v1 as control_pb;
use bridle_proto::sandbox::v1 as pb;
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

pub use bridle_client::agent::Agent;

/// Connects to the agent's socket (lazily: the first call dials).
pub fn connect(socket: &Path) -> anyhow::Result<Agent> {
    Ok(bridle_client::agent::connect_unverified(socket))
}

/// Waits until the agent answers its health check, never by sleeping a
/// fixed time.
pub async fn wait_healthy(socket: &Path, timeout: Duration) -> anyhow::Result<()> {
    let start = Instant::now();
    let mut last_err = String::from("socket never appeared");
    while start.elapsed() < timeout {
        if socket.exists() {
            // A new channel each time: a lazy one dials on the first call,
            // and a failed dial is that call's error.
            let channel = bridle_client::agent::channel_unverified(
                socket.to_path_buf(),
                Duration::from_secs(5),
            );
            let mut health = tonic_health_client(channel);
            // Bounded, or an agent that accepts and never answers would
            // keep this loop from ever looking at its deadline.
            let answer =
                tokio::time::timeout(Duration::from_secs(5), health.check(health_request())).await;
            match answer {
                Ok(Ok(r)) if r.get_ref().status == 1 => return Ok(()),
                Ok(Ok(r)) => last_err = format!("health status {}", r.get_ref().status),
                Ok(Err(e)) => last_err = e.to_string(),
                Err(_) => last_err = "a health check unanswered for 5 s".into(),
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    bail!(
        "agent at {} not healthy after {timeout:?}: {last_err}",
        socket.display()
    )
}

fn tonic_health_client(ch: Channel) -> tonic_health::pb::health_client::HealthClient<Channel> {
    tonic_health::pb::health_client::HealthClient::new(ch)
}

fn health_request() -> tonic_health::pb::HealthCheckRequest {
    tonic_health::pb::HealthCheckRequest {
        service: String::new(),
    }
}

/// Everything an exec produced, collected.
#[derive(Debug, Default, Clone)]
pub struct ExecResult {
    pub exec_id: String,
    pub pid: u32,
    pub attached: bool,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub dropped: Vec<(u64, u64)>,
    pub exited: Option<pb::ExecExited>,
    pub spawn_failed: Option<pb::SpawnFailed>,
    pub keepalives: u32,
    /// The approval the exec waited for, if the control plane said so.
    pub approval_pending: Option<control_pb::ApprovalPending>,
    /// Offset after the last output byte seen.
    pub next_offset: u64,
}

impl ExecResult {
    pub fn code(&self) -> Option<i32> {
        self.exited.as_ref().and_then(|e| e.code)
    }

    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    pub fn stderr_str(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

pub fn start(argv: &[&str]) -> pb::ExecStart {
    pb::ExecStart {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

pub fn shell(cmd: &str) -> pb::ExecStart {
    pb::ExecStart {
        shell: cmd.to_string(),
        ..Default::default()
    }
}

fn start_request(s: pb::ExecStart) -> pb::ExecRequest {
    pb::ExecRequest {
        request: Some(pb::exec_request::Request::Start(s)),
    }
}

/// An exec event from either side: the agent's own, or the control
/// plane's (the agent's passed through, plus its approval_pending).
pub enum AnyEvent {
    Agent(pb::exec_event::Event),
    ApprovalPending(control_pb::ApprovalPending),
    Empty,
}

impl From<pb::ExecEvent> for AnyEvent {
    fn from(ev: pb::ExecEvent) -> Self {
        ev.event.map_or(AnyEvent::Empty, AnyEvent::Agent)
    }
}

impl From<control_pb::ExecEvent> for AnyEvent {
    fn from(ev: control_pb::ExecEvent) -> Self {
        use control_pb::exec_event::Event as C;
        use pb::exec_event::Event as A;
        match ev.event {
            Some(C::Started(x)) => AnyEvent::Agent(A::Started(x)),
            Some(C::Output(x)) => AnyEvent::Agent(A::Output(x)),
            Some(C::Dropped(x)) => AnyEvent::Agent(A::Dropped(x)),
            Some(C::Exited(x)) => AnyEvent::Agent(A::Exited(x)),
            Some(C::SpawnFailed(x)) => AnyEvent::Agent(A::SpawnFailed(x)),
            Some(C::Keepalive(x)) => AnyEvent::Agent(A::Keepalive(x)),
            Some(C::ApprovalPending(a)) => AnyEvent::ApprovalPending(a),
            None => AnyEvent::Empty,
        }
    }
}

/// Collects an event stream until it ends (within [`crate::PATIENCE`]).
pub async fn collect<E: Into<AnyEvent>>(
    mut events: tonic::Streaming<E>,
) -> anyhow::Result<ExecResult> {
    let mut r = ExecResult::default();
    read_to_end(&mut events, &mut r).await?;
    Ok(r)
}

pub fn apply(r: &mut ExecResult, ev: impl Into<AnyEvent>) {
    use pb::exec_event::Event;
    let ev = match ev.into() {
        AnyEvent::Agent(ev) => ev,
        AnyEvent::ApprovalPending(a) => {
            r.approval_pending = Some(a);
            return;
        }
        AnyEvent::Empty => return,
    };
    match ev {
        Event::Started(s) => {
            r.exec_id = s.exec_id;
            r.pid = s.pid;
            r.attached = s.attached;
        }
        Event::Output(o) => {
            r.next_offset = o.offset + o.data.len() as u64;
            if o.stream == pb::OutputStream::Stderr as i32 {
                r.stderr.extend_from_slice(&o.data);
            } else {
                r.stdout.extend_from_slice(&o.data);
            }
        }
        Event::Dropped(d) => {
            r.next_offset = d.to_offset;
            r.dropped.push((d.from_offset, d.to_offset));
        }
        Event::Exited(e) => r.exited = Some(e),
        Event::SpawnFailed(f) => r.spawn_failed = Some(f),
        Event::Keepalive(_) => r.keepalives += 1,
    }
}

/// Applies events to `r` until `done(r)` holds. Panics if it does not hold
/// within [`crate::PATIENCE`] (a safety net, see [`crate::within`]).
pub async fn read_until<E: Into<AnyEvent>>(
    events: &mut tonic::Streaming<E>,
    r: &mut ExecResult,
    done: impl Fn(&ExecResult) -> bool,
) -> anyhow::Result<()> {
    crate::within(
        "the exec events the test waits for",
        crate::PATIENCE,
        async move {
            while !done(r) {
                let ev = events
                    .message()
                    .await?
                    .context("the exec stream ended first")?;
                apply(r, ev);
            }
            Ok::<(), anyhow::Error>(())
        },
    )
    .await
}

/// Applies the rest of the stream to `r`. Panics if it does not end within
/// [`crate::PATIENCE`] (a safety net, see [`crate::within`]).
pub async fn read_to_end<E: Into<AnyEvent>>(
    events: &mut tonic::Streaming<E>,
    r: &mut ExecResult,
) -> anyhow::Result<()> {
    crate::within("the end of the exec stream", crate::PATIENCE, async move {
        while let Some(ev) = events.message().await? {
            apply(r, ev);
        }
        Ok::<(), anyhow::Error>(())
    })
    .await
}

/// Runs a command to completion with no stdin.
pub async fn run(agent: &mut Agent, s: pb::ExecStart) -> anyhow::Result<ExecResult> {
    let events = crate::within(
        "the agent to answer Exec",
        crate::PATIENCE,
        agent.exec(futures::stream::iter([start_request(s)])),
    )
    .await
    .context("Exec")?
    .into_inner();
    collect(events).await
}

/// Starts a command and returns the sender for later requests (stdin,
/// signals) with the event stream.
pub async fn start_interactive(
    agent: &mut Agent,
    s: pb::ExecStart,
) -> anyhow::Result<(
    mpsc::Sender<pb::ExecRequest>,
    tonic::Streaming<pb::ExecEvent>,
)> {
    let (tx, rx) = mpsc::channel(16);
    tx.send(start_request(s)).await?;
    let events = crate::within(
        "the agent to answer Exec",
        crate::PATIENCE,
        agent.exec(ReceiverStream::new(rx)),
    )
    .await
    .context("Exec")?
    .into_inner();
    Ok((tx, events))
}

pub fn stdin(data: &[u8]) -> pb::ExecRequest {
    pb::ExecRequest {
        request: Some(pb::exec_request::Request::Stdin(Bytes::copy_from_slice(
            data,
        ))),
    }
}

pub fn close_stdin() -> pb::ExecRequest {
    pb::ExecRequest {
        request: Some(pb::exec_request::Request::CloseStdin(pb::CloseStdin {})),
    }
}

pub async fn attach(
    agent: &mut Agent,
    exec_id: &str,
    from_offset: u64,
) -> anyhow::Result<ExecResult> {
    let events = crate::within(
        "the agent to answer Attach",
        crate::PATIENCE,
        agent.attach(pb::AttachRequest {
            exec_id: exec_id.into(),
            from_offset,
        }),
    )
    .await
    .context("Attach")?
    .into_inner();
    collect(events).await
}

pub const CHUNK: usize = 1 << 20;

/// `data` as slices of at most [`CHUNK`] bytes (no copies).
fn chunks(data: &Bytes) -> impl Iterator<Item = Bytes> + '_ {
    (0..data.len())
        .step_by(CHUNK)
        .map(|off| data.slice(off..(off + CHUNK).min(data.len())))
}

pub fn write_header(path: &str) -> pb::WriteFileHeader {
    pb::WriteFileHeader {
        path: path.into(),
        create_parents: true,
        ..Default::default()
    }
}

/// Uploads `data` in 1 MiB messages, then `end`.
pub async fn write_file(
    agent: &mut Agent,
    header: pb::WriteFileHeader,
    data: Bytes,
) -> Result<pb::WriteFileResponse, tonic::Status> {
    let mut msgs = vec![pb::WriteFileRequest {
        request: Some(pb::write_file_request::Request::Header(header)),
    }];
    msgs.extend(chunks(&data).map(|d| pb::WriteFileRequest {
        request: Some(pb::write_file_request::Request::Data(d)),
    }));
    msgs.push(pb::WriteFileRequest {
        request: Some(pb::write_file_request::Request::End(true)),
    });
    let answer = crate::within(
        "the agent to answer WriteFile",
        crate::PATIENCE,
        agent.write_file(futures::stream::iter(msgs)),
    )
    .await?;
    Ok(answer.into_inner())
}

pub async fn read_file(agent: &mut Agent, path: &str) -> Result<Vec<u8>, tonic::Status> {
    let what = format!("ReadFile of {path} to end");
    crate::within(&what, crate::PATIENCE, async move {
        let mut stream = agent
            .read_file(pb::ReadFileRequest {
                path: path.into(),
                offset: 0,
                length: 0,
            })
            .await?
            .into_inner();
        let mut out = Vec::new();
        while let Some(chunk) = stream.next().await {
            out.extend_from_slice(&chunk?.data);
        }
        Ok::<_, tonic::Status>(out)
    })
    .await
}

pub async fn snapshot(
    agent: &mut Agent,
    req: pb::SnapshotRequest,
) -> Result<Vec<u8>, tonic::Status> {
    crate::within("a Snapshot to end", crate::PATIENCE, async move {
        let mut stream = agent.snapshot(req).await?.into_inner();
        let mut out = Vec::new();
        while let Some(chunk) = stream.next().await {
            out.extend_from_slice(&chunk?.data);
        }
        Ok::<_, tonic::Status>(out)
    })
    .await
}

pub async fn restore(
    agent: &mut Agent,
    path: &str,
    archive: Bytes,
) -> Result<pb::RestoreResponse, tonic::Status> {
    let mut msgs = vec![pb::RestoreRequest {
        request: Some(pb::restore_request::Request::Header(pb::RestoreHeader {
            path: path.into(),
            compression: 0,
        })),
    }];
    msgs.extend(chunks(&archive).map(|d| pb::RestoreRequest {
        request: Some(pb::restore_request::Request::Data(d)),
    }));
    let answer = crate::within(
        "the agent to answer Restore",
        crate::PATIENCE,
        agent.restore(futures::stream::iter(msgs)),
    )
    .await?;
    Ok(answer.into_inner())
}
