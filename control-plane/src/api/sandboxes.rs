//! `bridle.control.v1.Sandboxes`: authenticated, owner-scoped, and streamed
//! through to the sandbox's agent without holding whole payloads.

use std::collections::BTreeMap;
use std::pin::Pin;

use bridle_proto::control::v1 as pb;
use bridle_proto::sandbox::v1 as agent_pb;
use futures::{Stream, StreamExt};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::status::{self, APPROVAL_HEADER};
use super::{approval_of, authorize, note_of};
use crate::auth::Principal;
use crate::guard::{facts, Ask, AuditNote, Cleared, Guard, Record};
use crate::policy::Action;
use crate::runs::job::Command;
use crate::runtime::Runtime;
use crate::sandboxes::{
    check_client_labels, check_lifetime, CreateRequest, Network, SandboxState, Sandboxes,
};
use crate::sandboxes::{SandboxRecord, SnapshotRecord};

pub struct SandboxesApi<R: Runtime> {
    pub sandboxes: Sandboxes<R>,
    pub guard: Guard,
    /// Flips to true when the server shuts down: open exec streams end with
    /// UNAVAILABLE and leave their commands running.
    pub shutdown: watch::Receiver<bool>,
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

impl TryFrom<pb::CreateSandboxRequest> for CreateRequest {
    type Error = Status;
    fn try_from(r: pb::CreateSandboxRequest) -> Result<Self, Status> {
        let network = match pb::NetworkMode::try_from(r.network) {
            Ok(pb::NetworkMode::Unspecified) => None,
            Ok(pb::NetworkMode::None) => Some(Network::None),
            Ok(pb::NetworkMode::Bridge) => Some(Network::Bridge),
            Ok(pb::NetworkMode::Egress) => Some(Network::Egress),
            Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "network {} is not a NetworkMode",
                    r.network
                )))
            }
        };
        for k in r.env.keys() {
            if k.is_empty() || k.contains('=') || k.contains('\0') {
                return Err(Status::invalid_argument(format!(
                    "env name {k:?} must be non-empty, without '=' or NUL"
                )));
            }
        }
        if r.env.values().any(|v| v.contains('\0')) {
            return Err(Status::invalid_argument("env values cannot contain NUL"));
        }
        check_client_labels(r.labels.keys()).map_err(Status::invalid_argument)?;
        check_lifetime("ttl_seconds", r.ttl_seconds).map_err(Status::invalid_argument)?;
        check_lifetime("idle_timeout_seconds", r.idle_timeout_seconds)
            .map_err(Status::invalid_argument)?;
        let limits = r.limits.unwrap_or_default();
        Ok(CreateRequest {
            image: Some(r.image).filter(|i| !i.is_empty()),
            memory_bytes: limits.memory_bytes,
            cpu_millis: limits.cpu_millis,
            pids: limits.pids,
            disk_bytes: limits.disk_bytes,
            network,
            env: r.env.into_iter().collect(),
            labels: r.labels.into_iter().collect(),
            ttl_secs: r.ttl_seconds,
            idle_timeout_secs: r.idle_timeout_seconds,
            from_snapshot: Some(r.from_snapshot).filter(|s| !s.is_empty()),
        })
    }
}

pub fn sandbox_pb(r: SandboxRecord) -> pb::Sandbox {
    pb::Sandbox {
        id: r.id,
        owner: r.owner.unwrap_or_default(),
        state: match r.state {
            SandboxState::Creating => pb::SandboxState::Creating,
            SandboxState::Ready => pb::SandboxState::Ready,
            SandboxState::Paused => pb::SandboxState::Paused,
            SandboxState::Failed => pb::SandboxState::Failed,
        } as i32,
        image: r.spec.image,
        limits: Some(pb::Limits {
            memory_bytes: Some(r.spec.memory_bytes),
            cpu_millis: Some(r.spec.cpu_millis),
            pids: Some(r.spec.pids),
            disk_bytes: Some(r.spec.disk_bytes).filter(|d| *d > 0),
        }),
        network: match r.spec.network {
            Network::None => pb::NetworkMode::None,
            Network::Bridge => pb::NetworkMode::Bridge,
            Network::Egress => pb::NetworkMode::Egress,
        } as i32,
        env: r.spec.env.into_iter().collect(),
        labels: r.spec.labels.into_iter().collect(),
        created_unix_ms: r.created_unix_ms,
        expires_unix_ms: r.expires_unix_ms,
        idle_timeout_seconds: r.idle_timeout_secs,
        last_active_unix_ms: r.last_active_unix_ms,
        from_snapshot: r.from_snapshot,
        pool_profile: r.pool_profile,
        failure: r.failure,
    }
}

fn snapshot_pb(s: SnapshotRecord) -> pb::SnapshotInfo {
    pb::SnapshotInfo {
        id: s.id,
        owner: s.owner,
        sandbox_id: s.sandbox_id,
        sha256: s.sha256,
        size_bytes: s.size_bytes,
        compression: match s.compression.as_str() {
            "none" => agent_pb::Compression::None,
            _ => agent_pb::Compression::Zstd,
        } as i32,
        created_unix_ms: s.created_unix_ms,
    }
}

/// An exec's command, as policy sees it.
fn command_of(exec: &agent_pb::ExecStart) -> Command {
    if exec.shell.is_empty() {
        Command::Argv(exec.argv.clone())
    } else {
        Command::Shell(exec.shell.clone())
    }
}

fn required(field: &str, value: &str) -> Result<(), Status> {
    if value.is_empty() {
        Err(Status::invalid_argument(format!("{field} is required")))
    } else {
        Ok(())
    }
}

/// Copies the caller's deadline onto a request to the agent, so the agent
/// stops working when nobody waits for the answer any more.
fn with_deadline<T>(from: &tonic::metadata::MetadataMap, msg: T) -> Request<T> {
    let mut req = Request::new(msg);
    if let Some(t) = from.get("grpc-timeout") {
        req.metadata_mut().insert("grpc-timeout", t.clone());
    }
    req
}

impl<R: Runtime> SandboxesApi<R> {
    /// `sandbox.create`, and `network` when the sandbox would have one, on
    /// the spec as it will be made (defaults filled in).
    async fn authorize_create<T>(
        &self,
        request: &Request<T>,
        principal: &Principal,
        req: &CreateRequest,
    ) -> Result<(), Status> {
        let spec = self.sandboxes.resolve_spec(req)?;
        let resource = facts::new_sandbox(&principal.owner);
        let facts = facts::spec(&spec);
        let note = note_of(request);
        let mut ask = Ask {
            principal,
            action: Action::SandboxCreate,
            resource: &resource,
            facts: &facts,
        };
        authorize(&self.guard, &note, request.metadata(), ask).await?;
        // Egress is decided connection by connection; only the bridge is
        // a whole network at once.
        if spec.network == Network::Bridge {
            ask.action = Action::Network;
            authorize(&self.guard, &note, request.metadata(), ask).await?;
        }
        Ok(())
    }

    /// Decides `action` on an existing sandbox of the caller's.
    async fn authorize_on<T>(
        &self,
        request: &Request<T>,
        principal: &Principal,
        sandbox_id: &str,
        action: Action,
        path: &str,
    ) -> Result<SandboxRecord, Status> {
        let record = self
            .sandboxes
            .get(principal, sandbox_id)
            .await
            .map_err(status::sandbox)?;
        self.authorize_path(
            &note_of(request),
            request.metadata(),
            principal,
            &record,
            action,
            path,
        )
        .await?;
        Ok(record)
    }

    /// Decides `action` on `path` (empty: the whole workspace) in `record`.
    async fn authorize_path(
        &self,
        note: &AuditNote,
        metadata: &tonic::metadata::MetadataMap,
        principal: &Principal,
        record: &SandboxRecord,
        action: Action,
        path: &str,
    ) -> Result<(), Status> {
        let facts = facts::path(facts::spec(&record.spec), path);
        let ask = Ask {
            principal,
            action,
            resource: &facts::sandbox(record),
            facts: &facts,
        };
        authorize(&self.guard, note, metadata, ask).await
    }
}

#[tonic::async_trait]
impl<R: Runtime> pb::sandboxes_server::Sandboxes for SandboxesApi<R> {
    async fn create(
        &self,
        request: Request<pb::CreateSandboxRequest>,
    ) -> Result<Response<pb::Sandbox>, Status> {
        let principal = super::caller(&request)?;
        let req = CreateRequest::try_from(request.get_ref().clone())?;
        self.authorize_create(&request, &principal, &req).await?;
        let record = self
            .sandboxes
            .create(&principal, req)
            .await
            .map_err(status::sandbox)?;
        tracing::info!(sandbox = %record.id, owner = %principal.owner, token = %principal.token_id, "sandbox created");
        Ok(Response::new(sandbox_pb(record)))
    }

    async fn get(
        &self,
        request: Request<pb::GetSandboxRequest>,
    ) -> Result<Response<pb::Sandbox>, Status> {
        let principal = super::caller(&request)?;
        let id = request.into_inner().sandbox_id;
        required("sandbox_id", &id)?;
        let r = self
            .sandboxes
            .get(&principal, &id)
            .await
            .map_err(status::sandbox)?;
        Ok(Response::new(sandbox_pb(r)))
    }

    async fn list(
        &self,
        request: Request<pb::ListSandboxesRequest>,
    ) -> Result<Response<pb::ListSandboxesResponse>, Status> {
        let principal = super::caller(&request)?;
        let labels: BTreeMap<String, String> = request.into_inner().labels.into_iter().collect();
        let records = self
            .sandboxes
            .list(&principal, &labels)
            .await
            .map_err(status::sandbox)?;
        Ok(Response::new(pb::ListSandboxesResponse {
            sandboxes: records.into_iter().map(sandbox_pb).collect(),
        }))
    }

    async fn delete(
        &self,
        request: Request<pb::DeleteSandboxRequest>,
    ) -> Result<Response<pb::DeleteSandboxResponse>, Status> {
        let principal = super::caller(&request)?;
        let id = request.into_inner().sandbox_id;
        required("sandbox_id", &id)?;
        self.sandboxes
            .delete(&principal, &id)
            .await
            .map_err(status::sandbox)?;
        tracing::info!(sandbox = %id, token = %principal.token_id, "sandbox deleted");
        Ok(Response::new(pb::DeleteSandboxResponse {}))
    }

    async fn pause(
        &self,
        request: Request<pb::PauseSandboxRequest>,
    ) -> Result<Response<pb::Sandbox>, Status> {
        let principal = super::caller(&request)?;
        let id = request.into_inner().sandbox_id;
        required("sandbox_id", &id)?;
        let r = self
            .sandboxes
            .pause(&principal, &id)
            .await
            .map_err(status::sandbox)?;
        Ok(Response::new(sandbox_pb(r)))
    }

    async fn resume(
        &self,
        request: Request<pb::ResumeSandboxRequest>,
    ) -> Result<Response<pb::Sandbox>, Status> {
        let principal = super::caller(&request)?;
        let id = request.into_inner().sandbox_id;
        required("sandbox_id", &id)?;
        let r = self
            .sandboxes
            .resume(&principal, &id)
            .await
            .map_err(status::sandbox)?;
        Ok(Response::new(sandbox_pb(r)))
    }

    type ExecStream = BoxStream<pb::ExecEvent>;

    async fn exec(
        &self,
        request: Request<Streaming<pb::ExecRequest>>,
    ) -> Result<Response<Self::ExecStream>, Status> {
        let principal = super::caller(&request)?;
        let metadata = request.metadata().clone();
        let note = note_of(&request);
        let mut inbound = request.into_inner();
        let first = inbound.message().await?.ok_or_else(|| {
            Status::invalid_argument("the exec stream ended before a start message")
        })?;
        let Some(pb::exec_request::Request::Start(start)) = first.request else {
            return Err(Status::invalid_argument(
                "the first message of an exec stream must be `start`",
            ));
        };
        required("start.sandbox_id", &start.sandbox_id)?;
        let mut exec = start
            .exec
            .ok_or_else(|| Status::invalid_argument("start.exec is required"))?;
        let (record, mut agent) = self
            .sandboxes
            .usable(&principal, &start.sandbox_id)
            .await
            .map_err(status::sandbox)?;
        for (k, v) in &record.spec.env {
            exec.env.entry(k.clone()).or_insert(v.clone());
        }
        super::client_exec_id(&exec.exec_id)?;
        // An id of our own, so the exec can be stopped when the client leaves.
        if exec.exec_id.is_empty() {
            exec.exec_id = format!("x-{}", crate::ids::random_hex(8));
        }
        let exec_id = exec.exec_id.clone();
        let used_by = format!("exec:{}:{exec_id}", start.sandbox_id);
        let resource = facts::sandbox(&record);
        let facts = facts::command(facts::spec(&record.spec), &command_of(&exec));
        let ask = Ask {
            principal: &principal,
            action: Action::Exec,
            resource: &resource,
            facts: &facts,
        };
        let cleared = self
            .guard
            .clear(
                &Record::Call(&note),
                ask,
                approval_of(&metadata).as_deref(),
                &used_by,
            )
            .await?;
        let (to_agent, agent_rx) = mpsc::channel(16);
        let _ = to_agent
            .send(agent_pb::ExecRequest {
                request: Some(agent_pb::exec_request::Request::Start(exec)),
            })
            .await;
        let (tx, rx) = mpsc::channel(16);
        let stream_guard = self.sandboxes.stream_guard(&start.sandbox_id);
        let shutdown = self.shutdown.clone();
        let detach = start.detach;
        let Cleared::Pending(approval) = cleared else {
            let events = agent
                .exec(with_deadline(&metadata, ReceiverStream::new(agent_rx)))
                .await?
                .into_inner();
            tokio::spawn(forward(
                events,
                inbound,
                to_agent,
                tx,
                agent,
                stream_guard,
                shutdown,
                detach,
                exec_id,
            ));
            return Ok(Response::new(Box::pin(ReceiverStream::new(rx))));
        };
        // The stream opens now and says what it waits for; the command
        // starts only once the approval is granted, and never if the client
        // leaves first (the approval stays, usable by a new Exec that
        // carries its id).
        let guard = self.guard.clone();
        tokio::spawn(async move {
            let ask = Ask {
                principal: &principal,
                action: Action::Exec,
                resource: &resource,
                facts: &facts,
            };
            let mut stop = shutdown.clone();
            let pending = pb::ExecEvent {
                event: Some(pb::exec_event::Event::ApprovalPending(
                    pb::ApprovalPending {
                        approval_id: approval.id.clone(),
                        reason: approval.policy_reason.clone(),
                        expires_unix_ms: approval.expires_unix_ms,
                    },
                )),
            };
            if tx.send(Ok(pending)).await.is_err() {
                return;
            }
            let decided = tokio::select! {
                a = guard.decision(&approval.id) => a,
                _ = tx.closed() => return,
                _ = stop.changed() => {
                    let _ = tx.send(Err(Status::unavailable(format!(
                        "the control plane is shutting down; approval {} stays pending: once approved, exec again with the header {}: {}",
                        approval.id, APPROVAL_HEADER, approval.id
                    )))).await;
                    return;
                }
            };
            // Approved, still recordable (the audit log may have stopped
            // while the exec waited), and used once, by this exec.
            let go = match decided {
                Ok(a) => guard.go_ahead(&a, ask, &used_by).await,
                Err(e) => Err(e),
            }
            .map_err(status::refused);
            if let Err(status) = go {
                let _ = tx.send(Err(status)).await;
                return;
            }
            match agent
                .exec(with_deadline(&metadata, ReceiverStream::new(agent_rx)))
                .await
            {
                Ok(events) => {
                    forward(
                        events.into_inner(),
                        inbound,
                        to_agent,
                        tx,
                        agent,
                        stream_guard,
                        shutdown,
                        detach,
                        exec_id,
                    )
                    .await
                }
                Err(status) => {
                    let _ = tx.send(Err(status)).await;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type AttachStream = BoxStream<pb::ExecEvent>;

    async fn attach(
        &self,
        request: Request<pb::AttachRequest>,
    ) -> Result<Response<Self::AttachStream>, Status> {
        let principal = super::caller(&request)?;
        let metadata = request.metadata().clone();
        let req = request.into_inner();
        required("sandbox_id", &req.sandbox_id)?;
        required("exec_id", &req.exec_id)?;
        super::client_exec_id(&req.exec_id)?;
        let (_, mut agent) = self
            .sandboxes
            .usable(&principal, &req.sandbox_id)
            .await
            .map_err(status::sandbox)?;
        let events = agent
            .attach(with_deadline(
                &metadata,
                agent_pb::AttachRequest {
                    exec_id: req.exec_id,
                    from_offset: req.from_offset,
                },
            ))
            .await?
            .into_inner();
        let guard = self.sandboxes.stream_guard(&req.sandbox_id);
        Ok(Response::new(Box::pin(GuardedStream {
            inner: events.map(|e| e.map(client_event)),
            _guard: guard,
        })))
    }

    type ReadFileStream = BoxStream<agent_pb::FileChunk>;

    async fn read_file(
        &self,
        request: Request<pb::ReadFileRequest>,
    ) -> Result<Response<Self::ReadFileStream>, Status> {
        let principal = super::caller(&request)?;
        let metadata = request.metadata().clone();
        let note = note_of(&request);
        let req = request.into_inner();
        required("sandbox_id", &req.sandbox_id)?;
        let (record, mut agent) = self
            .sandboxes
            .usable(&principal, &req.sandbox_id)
            .await
            .map_err(status::sandbox)?;
        self.authorize_path(
            &note,
            &metadata,
            &principal,
            &record,
            Action::FileRead,
            &req.path,
        )
        .await?;
        let chunks = agent
            .read_file(with_deadline(
                &metadata,
                agent_pb::ReadFileRequest {
                    path: req.path,
                    offset: req.offset,
                    length: req.length,
                },
            ))
            .await?
            .into_inner();
        Ok(Response::new(Box::pin(chunks)))
    }

    async fn write_file(
        &self,
        request: Request<Streaming<pb::WriteFileRequest>>,
    ) -> Result<Response<agent_pb::WriteFileResponse>, Status> {
        let principal = super::caller(&request)?;
        let metadata = request.metadata().clone();
        let note = note_of(&request);
        let mut inbound = request.into_inner();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("the stream ended before its header"))?;
        let Some(pb::write_file_request::Request::Header(header)) = first.request else {
            return Err(Status::invalid_argument(
                "the first message of WriteFile must be the header",
            ));
        };
        required("header.sandbox_id", &header.sandbox_id)?;
        let file = header
            .file
            .ok_or_else(|| Status::invalid_argument("header.file is required"))?;
        let (record, mut agent) = self
            .sandboxes
            .usable(&principal, &header.sandbox_id)
            .await
            .map_err(status::sandbox)?;
        self.authorize_path(
            &note,
            &metadata,
            &principal,
            &record,
            Action::FileWrite,
            &file.path,
        )
        .await?;
        let (tx, rx) = mpsc::channel(4);
        let _ = tx
            .send(agent_pb::WriteFileRequest {
                request: Some(agent_pb::write_file_request::Request::Header(file)),
            })
            .await;
        // A client that fails mid-stream must not commit a truncated file:
        // the agent commits only on `end`, which is sent only when the
        // client's stream ended normally. (Cancelling the agent's call is
        // not enough: the HTTP/2 client keeps sending its request body,
        // and would end it cleanly, after the call is dropped.)
        let (failed_tx, failed_rx) = tokio::sync::oneshot::channel::<Status>();
        let pump = tokio::spawn(async move {
            let failure = loop {
                match inbound.message().await {
                    Ok(Some(pb::WriteFileRequest {
                        request: Some(pb::write_file_request::Request::Data(d)),
                    })) => {
                        let msg = agent_pb::WriteFileRequest {
                            request: Some(agent_pb::write_file_request::Request::Data(d)),
                        };
                        if tx.send(msg).await.is_err() {
                            return;
                        }
                    }
                    Ok(Some(_)) => {
                        break Status::invalid_argument("only data may follow the header")
                    }
                    Ok(None) => {
                        let end = agent_pb::WriteFileRequest {
                            request: Some(agent_pb::write_file_request::Request::End(true)),
                        };
                        let _ = tx.send(end).await;
                        return;
                    }
                    Err(e) => break e,
                }
            };
            // Without `end`, the agent discards what it was sent.
            let _ = failed_tx.send(failure);
        });
        let call = agent.write_file(with_deadline(&metadata, ReceiverStream::new(rx)));
        let answer = tokio::select! {
            answer = call => answer,
            Ok(failure) = failed_rx => Err(failure),
        };
        pump.abort();
        Ok(Response::new(answer?.into_inner()))
    }

    async fn snapshot(
        &self,
        request: Request<pb::SnapshotRequest>,
    ) -> Result<Response<pb::SnapshotInfo>, Status> {
        let principal = super::caller(&request)?;
        required("sandbox_id", &request.get_ref().sandbox_id)?;
        let (id, path) = (
            request.get_ref().sandbox_id.clone(),
            request.get_ref().path.clone(),
        );
        self.authorize_on(&request, &principal, &id, Action::Snapshot, &path)
            .await?;
        let req = request.into_inner();
        let compression = match agent_pb::Compression::try_from(req.compression) {
            Ok(agent_pb::Compression::Unspecified) => agent_pb::Compression::Zstd,
            Ok(c) => c,
            Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "compression {} is not a Compression",
                    req.compression
                )))
            }
        };
        let snap = self
            .sandboxes
            .snapshot(
                &principal,
                &req.sandbox_id,
                req.path,
                req.exclude,
                compression,
            )
            .await
            .map_err(status::sandbox)?;
        Ok(Response::new(snapshot_pb(snap)))
    }

    async fn list_snapshots(
        &self,
        request: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<pb::ListSnapshotsResponse>, Status> {
        let principal = super::caller(&request)?;
        let owner = (!principal.sees(None)).then_some(principal.owner.as_str());
        let snaps = self
            .sandboxes
            .store()
            .snapshots(owner)
            .await
            .map_err(|e| status::sandbox(e.into()))?;
        Ok(Response::new(pb::ListSnapshotsResponse {
            snapshots: snaps.into_iter().map(snapshot_pb).collect(),
        }))
    }

    async fn delete_snapshot(
        &self,
        request: Request<pb::DeleteSnapshotRequest>,
    ) -> Result<Response<pb::DeleteSnapshotResponse>, Status> {
        let principal = super::caller(&request)?;
        let id = request.into_inner().snapshot_id;
        required("snapshot_id", &id)?;
        self.sandboxes
            .delete_snapshot(&principal, &id)
            .await
            .map_err(status::sandbox)?;
        Ok(Response::new(pb::DeleteSnapshotResponse {}))
    }

    async fn fork(
        &self,
        request: Request<pb::ForkRequest>,
    ) -> Result<Response<pb::Sandbox>, Status> {
        let principal = super::caller(&request)?;
        required("sandbox_id", &request.get_ref().sandbox_id)?;
        // A fork is a snapshot of the parent and a new sandbox like it.
        let id = request.get_ref().sandbox_id.clone();
        check_client_labels(request.get_ref().labels.keys()).map_err(Status::invalid_argument)?;
        check_lifetime("ttl_seconds", request.get_ref().ttl_seconds)
            .map_err(Status::invalid_argument)?;
        let parent = self
            .authorize_on(&request, &principal, &id, Action::Snapshot, "")
            .await?;
        let like = CreateRequest {
            image: Some(parent.spec.image.clone()),
            memory_bytes: Some(parent.spec.memory_bytes),
            cpu_millis: Some(parent.spec.cpu_millis),
            pids: Some(parent.spec.pids),
            disk_bytes: Some(parent.spec.disk_bytes).filter(|d| *d > 0),
            network: Some(parent.spec.network),
            env: parent.spec.env.clone(),
            labels: request.get_ref().labels.clone().into_iter().collect(),
            ttl_secs: request.get_ref().ttl_seconds,
            idle_timeout_secs: 0,
            from_snapshot: None,
        };
        self.authorize_create(&request, &principal, &like).await?;
        let req = request.into_inner();
        let r = self
            .sandboxes
            .fork(
                &principal,
                &req.sandbox_id,
                req.ttl_seconds,
                req.labels.into_iter().collect(),
            )
            .await
            .map_err(status::sandbox)?;
        Ok(Response::new(sandbox_pb(r)))
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Keeps a sandbox marked busy for as long as a streamed answer lasts.
struct GuardedStream<S, G> {
    inner: S,
    _guard: G,
}

impl<S, G> Stream for GuardedStream<S, G>
where
    S: Stream + Unpin,
    G: Unpin,
{
    type Item = S::Item;
    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<S::Item>> {
        Pin::new(&mut self.inner).poll_next(cx)
    }
}

/// The agent's exec event as the control plane's: the same messages,
/// passed through.
fn client_event(ev: agent_pb::ExecEvent) -> pb::ExecEvent {
    use agent_pb::exec_event::Event as A;
    use pb::exec_event::Event as C;
    pb::ExecEvent {
        event: ev.event.map(|e| match e {
            A::Started(x) => C::Started(x),
            A::Output(x) => C::Output(x),
            A::Dropped(x) => C::Dropped(x),
            A::Exited(x) => C::Exited(x),
            A::SpawnFailed(x) => C::SpawnFailed(x),
            A::Keepalive(x) => C::Keepalive(x),
        }),
    }
}

/// Carries an exec both ways: the client's later messages (stdin, signals,
/// resizes) to the agent, the agent's events to the client. The client's
/// side ending ends the agent's (which closes stdin), exactly as if the
/// client talked to the agent; a client that leaves before the command
/// exits has its command tree stopped unless it asked for a detached exec.
#[allow(clippy::too_many_arguments)]
async fn forward<R: Runtime>(
    mut events: Streaming<agent_pb::ExecEvent>,
    mut inbound: Streaming<pb::ExecRequest>,
    to_agent: mpsc::Sender<agent_pb::ExecRequest>,
    tx: mpsc::Sender<Result<pb::ExecEvent, Status>>,
    mut agent: crate::sandboxes::Agent,
    _stream_guard: crate::sandboxes::StreamGuard<R>,
    mut shutdown: watch::Receiver<bool>,
    detach: bool,
    exec_id: String,
) {
    // Lives no longer than the answer: dropping the request stream resets
    // it, so the connection can close.
    let _pump = AbortOnDrop(tokio::spawn(async move {
        while let Ok(Some(msg)) = inbound.message().await {
            use agent_pb::exec_request::Request as A;
            use pb::exec_request::Request as C;
            let forwarded = match msg.request {
                Some(C::Stdin(d)) => A::Stdin(d),
                Some(C::CloseStdin(c)) => A::CloseStdin(c),
                Some(C::Signal(s)) => A::Signal(s),
                Some(C::Resize(r)) => A::Resize(r),
                Some(C::Start(_)) | None => continue,
            };
            let msg = agent_pb::ExecRequest {
                request: Some(forwarded),
            };
            if to_agent.send(msg).await.is_err() {
                break;
            }
        }
    }));
    let mut finished = false;
    loop {
        tokio::select! {
            event = events.message() => match event {
                Ok(Some(ev)) => {
                    use agent_pb::exec_event::Event;
                    finished |= matches!(ev.event, Some(Event::Exited(_)) | Some(Event::SpawnFailed(_)));
                    if tx.send(Ok(client_event(ev))).await.is_err() {
                        break;
                    }
                }
                Ok(None) => return,
                Err(status) => {
                    let _ = tx.send(Err(status)).await;
                    return;
                }
            },
            _ = tx.closed() => break,
            _ = shutdown.changed() => {
                let _ = tx.send(Err(Status::unavailable(format!(
                    "the control plane is shutting down; exec {exec_id} keeps running: re-attach with its exec_id"
                )))).await;
                return;
            }
        }
    }
    if !finished && !detach {
        tracing::info!(exec_id, "client went away: stopping the command tree");
        let _ = agent
            .signal(agent_pb::SignalRequest {
                exec_id,
                signal: 0,
                kill_tree: true,
            })
            .await;
    }
}
