//! `bridle.sandbox.v1.SandboxAgent` over tonic. Prost messages are turned
//! into validated domain types here, once; errors are mapped to gRPC status
//! codes in one place each ([`fs_status`], [`exec_status`], [`snapshot_status`]).

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bridle_proto::sandbox::v1 as pb;
use bytes::Bytes;
use futures::Stream;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::cgroup::OwnCgroup;
use crate::exec::{self, ExecSpec, Execs, Item, Outcome, Rlimits};
use crate::fs::{self, Workspace};
use crate::snapshot;

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::ExecEvent, Status>> + Send>>;
type ChunkStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Bytes per streamed message for files and snapshots.
const STREAM_CHUNK: usize = 1 << 20;
/// Bytes of an egress connection per message.
const EGRESS_CHUNK: usize = 256 << 10;
/// Output bytes per event when replaying or following an exec.
const OUTPUT_BATCH: usize = 256 * 1024;

pub struct AgentService {
    pub ws: Arc<Workspace>,
    pub execs: Arc<Execs>,
    pub cgroup: Arc<OwnCgroup>,
    pub started: Instant,
    /// See `InfoResponse.boot_id`.
    pub boot_id: String,
    pub keepalive: Duration,
    /// The egress relay, in an `egress` sandbox.
    pub egress: Option<crate::egress::Relay>,
}

impl AgentService {
    fn relay(&self) -> Result<crate::egress::Relay, Status> {
        self.egress.clone().ok_or_else(|| {
            Status::failed_precondition(
                "this sandbox has no egress relay (its network is not `egress`)",
            )
        })
    }
}

/// Carries one DNS query of the relay: its bytes to the control plane (one
/// message, then done), and the answer it sends back (at most 64 KiB, until
/// its `eof`) to the command that asked, as one datagram.
fn answer_query(
    id: u64,
    query: Vec<u8>,
    from: std::net::SocketAddr,
    socket: std::sync::Arc<tokio::net::UdpSocket>,
    mut inbound: Streaming<pb::EgressChunk>,
) -> ChunkStream<pb::EgressChunk> {
    let (tx, rx) = mpsc::channel(1);
    let _ = tx.try_send(Ok(pb::EgressChunk {
        connection: id,
        data: Bytes::from(query),
        eof: true,
    }));
    tokio::spawn(async move {
        let mut answer = Vec::new();
        while let Ok(Some(chunk)) = inbound.message().await {
            if answer.len() + chunk.data.len() > 64 << 10 {
                return;
            }
            answer.extend_from_slice(&chunk.data);
            if chunk.eof {
                break;
            }
        }
        if !answer.is_empty() {
            let _ = socket.send_to(&answer, from).await;
        }
        drop(tx);
    });
    Box::pin(ReceiverStream::new(rx))
}

pub fn fs_status(e: fs::Error) -> Status {
    use fs::Error as E;
    let msg = e.to_string();
    match e {
        E::NotFound { .. } => Status::not_found(msg),
        E::Escapes { .. } | E::SymlinkLoop { .. } | E::PermissionDenied { .. } => {
            Status::permission_denied(msg)
        }
        E::InvalidPath { .. } => Status::invalid_argument(msg),
        E::AlreadyExists { .. } => Status::already_exists(msg),
        E::IsDirectory { .. } | E::NotDirectory { .. } | E::NotEmpty { .. } => {
            Status::failed_precondition(msg)
        }
        E::Incomplete { .. } => Status::aborted(msg),
        E::NoSpace { .. } => Status::resource_exhausted(msg),
        E::Io { .. } => Status::internal(msg),
    }
}

pub fn exec_status(e: exec::Error) -> Status {
    use exec::Error as E;
    let msg = e.to_string();
    match e {
        E::Invalid(_) => Status::invalid_argument(msg),
        E::NotFound(_) => Status::not_found(msg),
        E::Finished(_) | E::StillRunning(_) | E::NoSuchStream(..) => {
            Status::failed_precondition(msg)
        }
        E::ShuttingDown => Status::unavailable(msg),
        E::Io { .. } => Status::internal(msg),
    }
}

pub fn snapshot_status(e: snapshot::Error) -> Status {
    use snapshot::Error as E;
    match e {
        E::Fs(e) => fs_status(e),
        e @ (E::BadPattern { .. } | E::Refused { .. } | E::Corrupt(_)) => {
            Status::invalid_argument(e.to_string())
        }
        e @ E::Io { .. } => Status::internal(e.to_string()),
    }
}

impl TryFrom<pb::ExecStart> for ExecSpec {
    type Error = Status;

    fn try_from(s: pb::ExecStart) -> Result<Self, Status> {
        let argv = match (s.argv.is_empty(), s.shell.is_empty()) {
            (false, true) => s.argv,
            (true, false) => vec!["/bin/sh".into(), "-c".into(), s.shell],
            (true, true) => return Err(Status::invalid_argument("start needs argv or shell")),
            (false, false) => {
                return Err(Status::invalid_argument(
                    "start takes argv or shell, not both",
                ))
            }
        };
        if argv[0].is_empty() {
            return Err(Status::invalid_argument("argv[0] is empty"));
        }
        if argv.iter().any(|a| a.contains('\0')) {
            return Err(Status::invalid_argument("argv contains a NUL byte"));
        }
        for (k, v) in &s.env {
            if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
                return Err(Status::invalid_argument(format!(
                    "bad environment variable name or value: {k:?}"
                )));
            }
        }
        if s.exec_id.len() > 128 || s.exec_id.chars().any(|c| c.is_control()) {
            return Err(Status::invalid_argument(
                "exec_id must be at most 128 printable characters",
            ));
        }
        let pty = match s.pty {
            Some(p) if p.rows == 0 || p.cols == 0 || p.rows > 10_000 || p.cols > 10_000 => {
                return Err(Status::invalid_argument(
                    "pty rows and cols must be between 1 and 10000",
                ))
            }
            Some(p) => Some((p.rows as u16, p.cols as u16)),
            None => None,
        };
        let r = s.rlimits.unwrap_or_default();
        let mut env: Vec<(String, String)> = s.env.into_iter().collect();
        env.sort();
        Ok(ExecSpec {
            exec_id: s.exec_id,
            argv,
            env,
            clear_env: s.clear_env,
            cwd: s.cwd,
            uid: s.uid,
            gid: s.gid,
            stdin: s.stdin,
            pty,
            timeout: (s.timeout_ms > 0).then(|| Duration::from_millis(s.timeout_ms as u64)),
            kill_grace: (s.kill_grace_ms > 0)
                .then(|| Duration::from_millis(s.kill_grace_ms as u64)),
            rlimits: Rlimits {
                cpu_seconds: r.cpu_seconds,
                address_space_bytes: r.address_space_bytes,
                file_size_bytes: r.file_size_bytes,
                open_files: r.open_files,
                processes: r.processes,
                core_bytes: r.core_bytes,
                stack_bytes: r.stack_bytes,
            },
        })
    }
}

fn event(e: pb::exec_event::Event) -> pb::ExecEvent {
    pb::ExecEvent { event: Some(e) }
}

fn exited_pb(x: &exec::ExitInfo) -> pb::ExecExited {
    pb::ExecExited {
        code: x.code,
        signal: x.signal,
        timed_out: x.timed_out,
        oom_killed: x.oom_killed,
        duration_ms: x.duration.as_millis() as u64,
        usage: Some(pb::ResourceUsage {
            user_cpu_us: x.user_cpu_us,
            system_cpu_us: x.system_cpu_us,
            max_rss_bytes: x.max_rss_bytes,
        }),
        output_bytes: x.output_bytes,
        output_dropped_bytes: x.output_dropped_bytes,
        killed: x.killed,
    }
}

fn outcome_event(o: &Outcome) -> pb::ExecEvent {
    match o {
        Outcome::Exited(x) => event(pb::exec_event::Event::Exited(exited_pb(x))),
        Outcome::SpawnFailed { reason, errno } => {
            event(pb::exec_event::Event::SpawnFailed(pb::SpawnFailed {
                reason: reason.clone(),
                errno: *errno,
            }))
        }
    }
}

/// Streams an exec's output from `from` and then its outcome, following it
/// live. Idle streams get a keepalive every `keepalive`.
async fn follow(
    exec: Arc<exec::Exec>,
    mut from: u64,
    tx: mpsc::Sender<Result<pb::ExecEvent, Status>>,
    keepalive: Duration,
) {
    let mut changed = exec.subscribe();
    loop {
        changed.borrow_and_update();
        let (items, next, done) = exec.read(from, OUTPUT_BATCH);
        let sent_some = !items.is_empty();
        for item in items {
            let ev = match item {
                Item::Chunk(c) => pb::exec_event::Event::Output(pb::OutputChunk {
                    stream: match c.stream {
                        exec::Stream::Stdout => pb::OutputStream::Stdout,
                        exec::Stream::Stderr => pb::OutputStream::Stderr,
                    } as i32,
                    offset: c.offset,
                    data: c.data,
                }),
                Item::Dropped { from, to } => pb::exec_event::Event::Dropped(pb::OutputDropped {
                    from_offset: from,
                    to_offset: to,
                }),
            };
            if tx.send(Ok(event(ev))).await.is_err() {
                return;
            }
        }
        from = next;
        if let Some(outcome) = done {
            let _ = tx.send(Ok(outcome_event(&outcome))).await;
            return;
        }
        // Only an empty read may wait: anything else re-reads at once (the
        // exec may have finished while we sent, with no change left to see).
        if sent_some {
            continue;
        }
        match tokio::time::timeout(keepalive, changed.changed()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return,
            Err(_) => {
                if tx
                    .send(Ok(event(pb::exec_event::Event::Keepalive(
                        pb::Keepalive {},
                    ))))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
    }
}

/// `started` opens every stream of an exec that did start; one that never
/// started goes straight to its `spawn_failed` event.
async fn send_started(
    tx: &mpsc::Sender<Result<pb::ExecEvent, Status>>,
    exec: &exec::Exec,
    attached: bool,
) {
    if matches!(exec.outcome(), Some(Outcome::SpawnFailed { .. })) {
        return;
    }
    let _ = tx
        .send(Ok(event(pb::exec_event::Event::Started(pb::ExecStarted {
            exec_id: exec.id.clone(),
            pid: exec.pid(),
            attached,
        }))))
        .await;
}

/// Runs blocking file work off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Status> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("worker failed: {e}")))?
}

fn file_info_pb(i: fs::FileInfo) -> pb::FileInfo {
    pb::FileInfo {
        path: i.path.to_string_lossy().into_owned(),
        name: i.name.to_string_lossy().into_owned(),
        r#type: match i.file_type {
            fs::FileType::File => pb::FileType::File,
            fs::FileType::Directory => pb::FileType::Directory,
            fs::FileType::Symlink => pb::FileType::Symlink,
            fs::FileType::Other => pb::FileType::Other,
        } as i32,
        size: i.size,
        mode: i.mode,
        mtime_unix_ms: i.mtime_unix_ms,
        uid: i.uid,
        gid: i.gid,
        symlink_target: i
            .symlink_target
            .map(|t| t.to_string_lossy().into_owned())
            .unwrap_or_default(),
    }
}

/// Forwards the data messages of a client stream (after its header) to a
/// blocking worker. Anything but data, or a broken stream, reaches the worker
/// as an error so that it abandons its work; a worker that stopped early
/// stops the forwarding. Returns when the stream or the worker is done.
async fn forward_data<M>(
    mut input: Streaming<M>,
    tx: mpsc::Sender<Result<Bytes, Status>>,
    data: impl Fn(M) -> Option<Bytes>,
) {
    loop {
        let item = match input.message().await {
            Ok(Some(msg)) => match data(msg) {
                Some(d) => Ok(d),
                None => Err(Status::invalid_argument("only data may follow the header")),
            },
            Ok(None) => return,
            Err(status) => Err(status),
        };
        let last = item.is_err();
        if tx.send(item).await.is_err() || last {
            return;
        }
    }
}

/// Passes an upload's data to its writer, then an error unless the stream
/// said `end` and then ended.
async fn forward_upload(
    mut input: Streaming<pb::WriteFileRequest>,
    tx: mpsc::Sender<Result<Bytes, Status>>,
) {
    use pb::write_file_request::Request;
    let mut ended = false;
    loop {
        let item = match input.message().await {
            Ok(Some(pb::WriteFileRequest {
                request: Some(Request::Data(d)),
            })) if !ended => Ok(d),
            Ok(Some(pb::WriteFileRequest {
                request: Some(Request::End(true)),
            })) if !ended => {
                ended = true;
                continue;
            }
            Ok(Some(_)) if ended => Err(Status::invalid_argument("nothing may follow `end`")),
            Ok(Some(_)) => Err(Status::invalid_argument(
                "only data and then `end` may follow the header",
            )),
            Ok(None) if ended => return,
            Ok(None) => Err(Status::aborted(
                "the upload ended without `end`: it was cut short, and nothing was written",
            )),
            Err(status) => Err(status),
        };
        let last = item.is_err();
        if tx.send(item).await.is_err() || last {
            return;
        }
    }
}

/// A blocking `Read` over the data messages of a client stream.
struct StreamReader {
    rx: mpsc::Receiver<Result<Bytes, Status>>,
    cur: Bytes,
}

impl std::io::Read for StreamReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.cur.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(b)) => self.cur = b,
                Some(Err(s)) => {
                    return Err(std::io::Error::other(format!(
                        "client stream failed: {}",
                        s.message()
                    )))
                }
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len());
        buf[..n].copy_from_slice(&self.cur.split_to(n));
        Ok(n)
    }
}

/// A blocking `Write` that sends fixed-size chunks down a bounded channel,
/// so a slow client back-pressures the archiver instead of growing memory.
struct ChunkWriter<T> {
    tx: mpsc::Sender<Result<T, Status>>,
    buf: Vec<u8>,
    wrap: fn(Bytes) -> T,
}

impl<T> ChunkWriter<T> {
    fn send(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let data = Bytes::from(std::mem::replace(
            &mut self.buf,
            Vec::with_capacity(STREAM_CHUNK),
        ));
        self.tx
            .blocking_send(Ok((self.wrap)(data)))
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "client went away"))
    }
}

impl<T> std::io::Write for ChunkWriter<T> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let n = data.len().min(STREAM_CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() >= STREAM_CHUNK {
            self.send()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.send()
    }
}

#[tonic::async_trait]
impl pb::sandbox_agent_server::SandboxAgent for AgentService {
    type ExecStream = EventStream;

    async fn exec(
        &self,
        request: Request<Streaming<pb::ExecRequest>>,
    ) -> Result<Response<EventStream>, Status> {
        let mut input = request.into_inner();
        let first = input.message().await?.ok_or_else(|| {
            Status::invalid_argument("the exec stream ended before a start message")
        })?;
        let Some(pb::exec_request::Request::Start(start)) = first.request else {
            return Err(Status::invalid_argument(
                "the first message of an exec stream must be `start`",
            ));
        };
        let spec = ExecSpec::try_from(start)?;
        // The start and the input side live on their own task: a client that
        // goes away while the exec is still starting drops this handler, yet
        // the exec starts (see `Execs::start`) and its stdin must still close
        // when the input side ends, or a command reading stdin would wait
        // for input that can never come.
        let execs = self.execs.clone();
        let (started_tx, started_rx) = oneshot::channel();
        tokio::spawn(async move {
            let (exec, attached) = match execs.start(spec).await {
                Ok(started) => started,
                Err(e) => {
                    let _ = started_tx.send(Err(e));
                    return;
                }
            };
            let _ = started_tx.send(Ok((exec.clone(), attached)));
            // Later messages: stdin, close, signals, resizes. The input side
            // ending (half-close or disconnect) closes stdin.
            while let Ok(Some(msg)) = input.message().await {
                use pb::exec_request::Request as R;
                let res = match msg.request {
                    Some(R::Stdin(data)) => exec.write_stdin(&data).await,
                    Some(R::CloseStdin(_)) => {
                        exec.close_stdin().await;
                        Ok(())
                    }
                    Some(R::Signal(sig)) => exec.signal(sig),
                    Some(R::Resize(size)) => exec.resize(size.rows as u16, size.cols as u16),
                    Some(R::Start(_)) | None => Ok(()),
                };
                if let Err(e) = res {
                    tracing::debug!(exec_id = %exec.id, error = %e, "exec input ignored");
                }
            }
            if !attached {
                exec.close_stdin().await;
            }
        });
        let (exec, attached) = started_rx
            .await
            .map_err(|_| Status::internal("the exec's start task ended without an answer"))?
            .map_err(exec_status)?;
        let (tx, rx) = mpsc::channel(16);
        send_started(&tx, &exec, attached).await;
        tokio::spawn(follow(exec, 0, tx, self.keepalive));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type AttachStream = EventStream;

    async fn attach(
        &self,
        request: Request<pb::AttachRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let req = request.into_inner();
        let exec = self.execs.get(&req.exec_id).map_err(exec_status)?;
        let (tx, rx) = mpsc::channel(16);
        send_started(&tx, &exec, true).await;
        tokio::spawn(follow(exec, req.from_offset, tx, self.keepalive));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn list_execs(
        &self,
        _: Request<pb::ListExecsRequest>,
    ) -> Result<Response<pb::ListExecsResponse>, Status> {
        self.execs.gc();
        let execs = self
            .execs
            .list()
            .into_iter()
            .map(|e| {
                let outcome = e.outcome();
                pb::ExecSummary {
                    exec_id: e.id.clone(),
                    argv: e.argv.clone(),
                    pid: e.pid(),
                    state: match &outcome {
                        None => pb::ExecState::Running,
                        Some(Outcome::Exited(_)) => pb::ExecState::Exited,
                        Some(Outcome::SpawnFailed { .. }) => pb::ExecState::SpawnFailed,
                    } as i32,
                    started_unix_ms: e.started_unix_ms,
                    output_bytes: e.output_total(),
                    exited: match &outcome {
                        Some(Outcome::Exited(x)) => Some(exited_pb(x)),
                        _ => None,
                    },
                }
            })
            .collect();
        Ok(Response::new(pb::ListExecsResponse { execs }))
    }

    async fn signal(
        &self,
        request: Request<pb::SignalRequest>,
    ) -> Result<Response<pb::SignalResponse>, Status> {
        let req = request.into_inner();
        let exec = self.execs.get(&req.exec_id).map_err(exec_status)?;
        if req.kill_tree {
            exec.kill().map_err(exec_status)?;
        } else {
            if req.signal <= 0 || req.signal >= 65 {
                return Err(Status::invalid_argument(format!(
                    "{} is not a signal number",
                    req.signal
                )));
            }
            exec.signal(req.signal).map_err(exec_status)?;
        }
        Ok(Response::new(pb::SignalResponse {}))
    }

    async fn release_exec(
        &self,
        request: Request<pb::ReleaseExecRequest>,
    ) -> Result<Response<pb::ReleaseExecResponse>, Status> {
        self.execs
            .release(&request.into_inner().exec_id)
            .map_err(exec_status)?;
        Ok(Response::new(pb::ReleaseExecResponse {}))
    }

    type ReadFileStream = ChunkStream<pb::FileChunk>;

    async fn read_file(
        &self,
        request: Request<pb::ReadFileRequest>,
    ) -> Result<Response<Self::ReadFileStream>, Status> {
        let req = request.into_inner();
        let ws = self.ws.clone();
        let path = req.path.clone();
        let (file, _) = blocking(move || fs::open_read(&ws, &path).map_err(fs_status)).await?;
        let (tx, rx) = mpsc::channel(4);
        tokio::task::spawn_blocking(move || {
            let res = fs::read_range(
                file,
                req.offset,
                req.length,
                STREAM_CHUNK,
                |offset, data| {
                    tx.blocking_send(Ok(pb::FileChunk {
                        offset,
                        data: Bytes::from(data),
                    }))
                    .is_ok()
                },
            );
            if let Err(e) = res {
                let _ = tx.blocking_send(Err(Status::internal(format!("{}: {e}", req.path))));
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn write_file(
        &self,
        request: Request<Streaming<pb::WriteFileRequest>>,
    ) -> Result<Response<pb::WriteFileResponse>, Status> {
        let mut input = request.into_inner();
        let Some(pb::WriteFileRequest {
            request: Some(pb::write_file_request::Request::Header(h)),
        }) = input.message().await?
        else {
            return Err(Status::invalid_argument(
                "the first message of WriteFile must be the header",
            ));
        };
        let (tx, rx) = mpsc::channel::<Result<Bytes, Status>>(8);
        let ws = self.ws.clone();
        let writer = tokio::task::spawn_blocking(move || -> Result<(u64, String), Status> {
            let mut w = fs::AtomicWrite::begin(
                &ws,
                &h.path,
                fs::WriteOptions {
                    mode: h.mode,
                    create_parents: h.create_parents,
                    no_overwrite: h.no_overwrite,
                    sync: h.sync,
                    expect_size: h.size,
                    expect_sha256: (!h.sha256.is_empty()).then_some(h.sha256),
                },
            )
            .map_err(fs_status)?;
            let mut rx = rx;
            while let Some(chunk) = rx.blocking_recv() {
                w.write_bytes(chunk?).map_err(fs_status)?;
            }
            w.commit().map_err(fs_status)
        });
        // An aborted upload, or one that ends without `end`, reaches the
        // writer as an error, so it never replaces the file.
        forward_upload(input, tx).await;
        let (size, sha256) = writer
            .await
            .map_err(|e| Status::internal(format!("writer failed: {e}")))??;
        Ok(Response::new(pb::WriteFileResponse { size, sha256 }))
    }

    async fn list_dir(
        &self,
        request: Request<pb::ListDirRequest>,
    ) -> Result<Response<pb::ListDirResponse>, Status> {
        let req = request.into_inner();
        let ws = self.ws.clone();
        let (entries, truncated) =
            blocking(move || fs::list_dir(&ws, &req.path, req.depth).map_err(fs_status)).await?;
        Ok(Response::new(pb::ListDirResponse {
            entries: entries.into_iter().map(file_info_pb).collect(),
            truncated,
        }))
    }

    async fn stat(
        &self,
        request: Request<pb::StatRequest>,
    ) -> Result<Response<pb::StatResponse>, Status> {
        let req = request.into_inner();
        let ws = self.ws.clone();
        let info = blocking(move || fs::stat(&ws, &req.path).map_err(fs_status)).await?;
        Ok(Response::new(pb::StatResponse {
            info: Some(file_info_pb(info)),
        }))
    }

    async fn make_dir(
        &self,
        request: Request<pb::MakeDirRequest>,
    ) -> Result<Response<pb::MakeDirResponse>, Status> {
        let req = request.into_inner();
        let ws = self.ws.clone();
        blocking(move || fs::make_dir(&ws, &req.path, req.parents, req.mode).map_err(fs_status))
            .await?;
        Ok(Response::new(pb::MakeDirResponse {}))
    }

    async fn remove(
        &self,
        request: Request<pb::RemoveRequest>,
    ) -> Result<Response<pb::RemoveResponse>, Status> {
        let req = request.into_inner();
        let ws = self.ws.clone();
        blocking(move || fs::remove(&ws, &req.path, req.recursive).map_err(fs_status)).await?;
        Ok(Response::new(pb::RemoveResponse {}))
    }

    async fn r#move(
        &self,
        request: Request<pb::MoveRequest>,
    ) -> Result<Response<pb::MoveResponse>, Status> {
        let req = request.into_inner();
        let ws = self.ws.clone();
        blocking(move || fs::rename(&ws, &req.from, &req.to, req.overwrite).map_err(fs_status))
            .await?;
        Ok(Response::new(pb::MoveResponse {}))
    }

    type SnapshotStream = ChunkStream<pb::SnapshotChunk>;

    async fn snapshot(
        &self,
        request: Request<pb::SnapshotRequest>,
    ) -> Result<Response<Self::SnapshotStream>, Status> {
        let req = request.into_inner();
        let zstd_level = match pb::Compression::try_from(req.compression) {
            Ok(pb::Compression::Zstd) => Some(if req.level == 0 { 3 } else { req.level }),
            Ok(_) => None,
            Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "unknown compression {}",
                    req.compression
                )))
            }
        };
        let opts = snapshot::SnapshotOptions {
            path: req.path,
            exclude: req.exclude,
            zstd_level,
        };
        // A bad path or pattern is refused with a status before the stream starts.
        let ws = self.ws.clone();
        let prepared =
            blocking(move || snapshot::Snapshot::prepare(&ws, &opts).map_err(snapshot_status))
                .await?;
        let (tx, rx) = mpsc::channel(4);
        tokio::task::spawn_blocking(move || {
            let mut w = ChunkWriter {
                tx: tx.clone(),
                buf: Vec::with_capacity(STREAM_CHUNK),
                wrap: |data| pb::SnapshotChunk { data },
            };
            let res = prepared.write(&mut w).and_then(|_| {
                std::io::Write::flush(&mut w).map_err(|e| snapshot::Error::Io {
                    context: "sending".into(),
                    source: e,
                })
            });
            if let Err(e) = res {
                let _ = tx.blocking_send(Err(snapshot_status(e)));
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn restore(
        &self,
        request: Request<Streaming<pb::RestoreRequest>>,
    ) -> Result<Response<pb::RestoreResponse>, Status> {
        let mut input = request.into_inner();
        let Some(pb::RestoreRequest {
            request: Some(pb::restore_request::Request::Header(h)),
        }) = input.message().await?
        else {
            return Err(Status::invalid_argument(
                "the first message of Restore must be the header",
            ));
        };
        let compression = match pb::Compression::try_from(h.compression) {
            Ok(pb::Compression::Unspecified) => snapshot::Compression::Detect,
            Ok(pb::Compression::None) => snapshot::Compression::None,
            Ok(pb::Compression::Zstd) => snapshot::Compression::Zstd,
            Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "unknown compression {}",
                    h.compression
                )))
            }
        };
        let (tx, rx) = mpsc::channel(8);
        let ws = self.ws.clone();
        let worker = tokio::task::spawn_blocking(move || {
            let reader = StreamReader {
                rx,
                cur: Bytes::new(),
            };
            snapshot::restore(&ws, &h.path, compression, reader).map_err(snapshot_status)
        });
        forward_data(input, tx, |m: pb::RestoreRequest| match m.request {
            Some(pb::restore_request::Request::Data(d)) => Some(d),
            _ => None,
        })
        .await;
        let stats = worker
            .await
            .map_err(|e| Status::internal(format!("restore failed: {e}")))??;
        Ok(Response::new(pb::RestoreResponse {
            entries: stats.entries,
            bytes: stats.bytes,
        }))
    }

    type EgressAcceptedStream = ChunkStream<pb::EgressAccept>;

    async fn egress_accepted(
        &self,
        _: Request<pb::EgressAcceptedRequest>,
    ) -> Result<Response<Self::EgressAcceptedStream>, Status> {
        let relay = self.relay()?;
        let (waiting, mut accepted) = relay.follow();
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            let announce = |a: crate::egress::Accepted| pb::EgressAccept {
                connection: a.id,
                dns: a.dns,
            };
            let mut sent = std::collections::HashSet::new();
            for a in waiting {
                sent.insert(a.id);
                if tx.send(Ok(announce(a))).await.is_err() {
                    return;
                }
            }
            loop {
                let a = match accepted.recv().await {
                    Ok(a) => a,
                    // Fell behind: what waits is listed again.
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        let (waiting, fresh) = relay.follow();
                        accepted = fresh;
                        for a in waiting {
                            if sent.insert(a.id) && tx.send(Ok(announce(a))).await.is_err() {
                                return;
                            }
                        }
                        continue;
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                };
                if sent.insert(a.id) && tx.send(Ok(announce(a))).await.is_err() {
                    return;
                }
                // Bounded by what waits, not by every connection ever made.
                if sent.len() > 2 * crate::egress::MAX_PENDING {
                    relay.prune(&mut sent);
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type EgressConnectionStream = ChunkStream<pb::EgressChunk>;

    async fn egress_connection(
        &self,
        request: Request<Streaming<pb::EgressChunk>>,
    ) -> Result<Response<Self::EgressConnectionStream>, Status> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let relay = self.relay()?;
        let mut inbound = request.into_inner();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("the first message names the connection"))?;
        let id = first.connection;
        let conn = match relay.take(id) {
            None => {
                return Err(Status::not_found(format!(
                    "no accepted connection {id} is waiting"
                )))
            }
            Some(crate::egress::Waiting::Dns {
                query,
                from,
                socket,
            }) => {
                return Ok(Response::new(answer_query(
                    id, query, from, socket, inbound,
                )))
            }
            Some(crate::egress::Waiting::Tcp(conn)) => conn,
        };
        let (mut from_command, mut to_command) = conn.into_split();
        let (tx, rx) = mpsc::channel(16);
        let reading = tokio::spawn(async move {
            let mut buf = vec![0u8; EGRESS_CHUNK];
            loop {
                let (data, eof) = match from_command.read(&mut buf).await {
                    Ok(0) | Err(_) => (Bytes::new(), true),
                    Ok(n) => (Bytes::copy_from_slice(&buf[..n]), false),
                };
                let chunk = pb::EgressChunk {
                    connection: id,
                    data,
                    eof,
                };
                if tx.send(Ok(chunk)).await.is_err() || eof {
                    return;
                }
            }
        });
        tokio::spawn(async move {
            let mut chunk = first;
            loop {
                if !chunk.data.is_empty() && to_command.write_all(&chunk.data).await.is_err() {
                    break;
                }
                if chunk.eof {
                    break;
                }
                match inbound.message().await {
                    Ok(Some(next)) => chunk = next,
                    _ => break,
                }
            }
            let _ = to_command.shutdown().await;
            // The control plane is done with the connection (it reads no
            // more once it has said all it will): it is closed whole,
            // whatever the command does with its end.
            reading.abort();
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn info(
        &self,
        _: Request<pb::InfoRequest>,
    ) -> Result<Response<pb::InfoResponse>, Status> {
        let cgroup = self.cgroup.clone();
        let usage = blocking(move || Ok(cgroup.usage())).await?;
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()))
                .unwrap_or_default()
        };
        let rss_kb: u64 = field("VmRSS:")
            .trim_end_matches(" kB")
            .trim()
            .parse()
            .unwrap_or(0);
        let (running, retained) = self.execs.counts();
        let workspace = {
            use std::os::fd::AsRawFd;
            // SAFETY: fstatvfs into a zeroed buffer on the workspace's own fd.
            let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
            // SAFETY: as above; the fd is the workspace's own, held open.
            match unsafe { libc::fstatvfs(self.ws.root_fd().as_raw_fd(), &mut st) } {
                0 => (
                    st.f_blocks as u64 * st.f_frsize as u64,
                    st.f_bavail as u64 * st.f_frsize as u64,
                ),
                _ => (0, 0),
            }
        };
        let mut capabilities = vec![
            "exec".to_string(),
            "exec.pty".into(),
            "exec.stdin".into(),
            "exec.rlimits".into(),
            "exec.idempotent".into(),
            "files".into(),
            "snapshot.tar".into(),
            "snapshot.zstd".into(),
        ];
        capabilities.push(
            if self.ws.uses_openat2() {
                "files.openat2"
            } else {
                "files.nofollow-walk"
            }
            .into(),
        );
        // SAFETY: getuid/getgid/getpid have no preconditions.
        let (uid, gid, pid) = unsafe { (libc::getuid(), libc::getgid(), libc::getpid()) };
        Ok(Response::new(pb::InfoResponse {
            version: env!("CARGO_PKG_VERSION").into(),
            capabilities,
            workspace: self.ws.root_path().display().to_string(),
            uptime_ms: self.started.elapsed().as_millis() as u64,
            pid: pid as u32,
            uid,
            gid,
            cap_eff: field("CapEff:"),
            no_new_privs: field("NoNewPrivs:") == "1",
            cgroup: Some(pb::CgroupInfo {
                version: usage.version,
                memory_limit_bytes: usage.memory_limit_bytes,
                pids_limit: usage.pids_limit,
                cpu_limit_millis: usage.cpu_limit_millis,
                memory_current_bytes: usage.memory_current_bytes,
                memory_peak_bytes: usage.memory_peak_bytes,
                cpu_usage_us: usage.cpu_usage_us,
                pids_current: usage.pids_current,
                oom_events: usage.oom_events,
                oom_kills: usage.oom_kills,
                note: usage.note,
            }),
            kill_mode: "subreaper".into(),
            running_execs: running,
            retained_execs: retained,
            agent_rss_bytes: rss_kb * 1024,
            boot_id: self.boot_id.clone(),
            workspace_bytes_total: workspace.0,
            workspace_bytes_free: workspace.1,
        }))
    }
}
