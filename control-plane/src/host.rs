//! What a run needs of the sandboxes it works in. [`Host`] finds, makes,
//! snapshots and deletes them and hands out each one's [`Agent`], through
//! which a run starts and follows its commands and writes its inputs.
//!
//! Both traits speak domain types. The agent's protos stay here, at the
//! edge, converted once: [`Agent`] is implemented for the tonic client and
//! [`Host`] for [`Sandboxes`]. The executor is written against the traits,
//! so its recovery protocol is unit-tested against in-memory fakes
//! (`crate::testing`) and end to end against these implementations.

use std::collections::BTreeMap;
use std::future::Future;

use bridle_proto::sandbox::v1 as agent_pb;
use bridle_proto::sandbox::v1::sandbox_agent_client::SandboxAgentClient;
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;
use tonic::transport::Channel;

use crate::auth::Principal;
use crate::runs::events::Stream;
use crate::runs::job::Command;
use crate::runtime::Runtime;
use crate::sandboxes::{CreateRequest, Sandboxes};

/// Label that ties a sandbox to the run it was made for, so a run whose
/// sandbox was created but not yet recorded finds it again.
pub const RUN_LABEL: &str = "bridle.run";

// ------------------------------------------------------------------ agent

/// One command for an agent to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecSpec {
    /// Chosen by the caller. The agent runs an id once: starting an id it
    /// already has attaches to that exec instead.
    pub exec_id: String,
    pub command: Command,
    pub env: BTreeMap<String, String>,
    /// Empty: the workspace.
    pub cwd: String,
    /// 0: no deadline.
    pub timeout_ms: u32,
}

/// What an agent tells about one exec, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecEvent {
    /// The exec runs (`attached`: it already ran, and this stream joined it).
    Started { pid: u32, attached: bool },
    /// Bytes of one stream at `offset` in the agent's output of the exec
    /// (the two streams share the agent's offsets).
    Output {
        stream: Stream,
        offset: u64,
        data: Bytes,
    },
    /// The agent's bounded buffer lost this output before it was read.
    Dropped { from_offset: u64, to_offset: u64 },
    /// The exec ended.
    Exited {
        code: Option<i32>,
        signal: Option<i32>,
        timed_out: bool,
        oom_killed: bool,
        duration_ms: u64,
    },
    /// The command could not be started, and why.
    SpawnFailed(String),
    /// Nothing new; the stream is alive (an agent sends one every 15 s of
    /// silence, so a longer silence means a dead stream).
    Keepalive,
}

/// An exec's events as they come; an error ends the stream.
pub type ExecEvents = BoxStream<'static, Result<ExecEvent, AgentError>>;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AgentError {
    /// The agent does not know the exec: it never started it, or it has
    /// restarted (and forgotten every exec) since.
    #[error("{0}")]
    NotFound(String),
    /// The agent could not be reached, or failed the call: what it said.
    #[error("{0}")]
    Unreachable(String),
}

impl AgentError {
    pub fn message(&self) -> &str {
        match self {
            AgentError::NotFound(m) | AgentError::Unreachable(m) => m,
        }
    }
}

/// What a run needs of a sandbox's agent.
pub trait Agent: Send + Sync + 'static {
    /// Starts the exec and follows it from its first byte; an exec id the
    /// agent already has is attached to, never run twice.
    fn start_exec(
        &self,
        spec: ExecSpec,
    ) -> impl Future<Output = Result<ExecEvents, AgentError>> + Send;
    /// Follows a known exec from `from_offset` of its output (the agent
    /// keeps an exec's output and outcome after it ends);
    /// [`AgentError::NotFound`] when the agent does not know it.
    fn attach_exec(
        &self,
        exec_id: &str,
        from_offset: u64,
    ) -> impl Future<Output = Result<ExecEvents, AgentError>> + Send;
    /// Kills the exec's whole command tree.
    fn kill_exec(&self, exec_id: &str) -> impl Future<Output = Result<(), AgentError>> + Send;
    /// The agent's boot id, random per start of the agent: another one
    /// means it restarted and forgot every exec.
    fn boot_id(&self) -> impl Future<Output = Result<String, AgentError>> + Send;
    /// Writes a file of the workspace whole (parents created), with `mode`.
    fn put_file(
        &self,
        path: &str,
        data: Vec<u8>,
        mode: u32,
    ) -> impl Future<Output = Result<(), AgentError>> + Send;
    /// Reads a file of the workspace whole; a file larger than `max_bytes`
    /// is an error (its size said), as is one that is not there
    /// ([`AgentError::NotFound`]) or not a regular file beneath the
    /// workspace (the agent resolves it beneath the root, never following a
    /// link out).
    fn get_file(
        &self,
        path: &str,
        max_bytes: u64,
    ) -> impl Future<Output = Result<Vec<u8>, AgentError>> + Send;
}

/// The agent in a sandbox, over its verified channel (`crate::agents`).
/// Each call works on a clone of the client (they share the channel), so
/// no future holds the client itself.
impl Agent for SandboxAgentClient<Channel> {
    fn start_exec(
        &self,
        spec: ExecSpec,
    ) -> impl Future<Output = Result<ExecEvents, AgentError>> + Send {
        let mut agent = self.clone();
        let (argv, shell) = match spec.command {
            Command::Argv(a) => (a, String::new()),
            Command::Shell(s) => (Vec::new(), s),
        };
        let start = agent_pb::ExecStart {
            exec_id: spec.exec_id,
            argv,
            shell,
            env: spec.env.into_iter().collect(),
            cwd: spec.cwd,
            timeout_ms: spec.timeout_ms,
            ..Default::default()
        };
        async move {
            let events = agent
                .exec(futures::stream::iter([agent_pb::ExecRequest {
                    request: Some(agent_pb::exec_request::Request::Start(start)),
                }]))
                .await
                .map_err(|s| agent_error(&s))?;
            Ok(exec_events(events.into_inner()))
        }
    }

    fn attach_exec(
        &self,
        exec_id: &str,
        from_offset: u64,
    ) -> impl Future<Output = Result<ExecEvents, AgentError>> + Send {
        let mut agent = self.clone();
        let request = agent_pb::AttachRequest {
            exec_id: exec_id.to_string(),
            from_offset,
        };
        async move {
            let events = agent.attach(request).await.map_err(|s| agent_error(&s))?;
            Ok(exec_events(events.into_inner()))
        }
    }

    fn kill_exec(&self, exec_id: &str) -> impl Future<Output = Result<(), AgentError>> + Send {
        let mut agent = self.clone();
        let request = agent_pb::SignalRequest {
            exec_id: exec_id.to_string(),
            signal: 0,
            kill_tree: true,
        };
        async move {
            agent
                .signal(request)
                .await
                .map(|_| ())
                .map_err(|s| agent_error(&s))
        }
    }

    fn boot_id(&self) -> impl Future<Output = Result<String, AgentError>> + Send {
        let mut agent = self.clone();
        async move {
            let info = agent
                .info(agent_pb::InfoRequest {})
                .await
                .map_err(|s| agent_error(&s))?
                .into_inner();
            Ok(info.boot_id)
        }
    }

    fn put_file(
        &self,
        path: &str,
        data: Vec<u8>,
        mode: u32,
    ) -> impl Future<Output = Result<(), AgentError>> + Send {
        let mut agent = self.clone();
        let msgs = vec![
            agent_pb::WriteFileRequest {
                request: Some(agent_pb::write_file_request::Request::Header(
                    agent_pb::WriteFileHeader {
                        path: path.to_string(),
                        mode,
                        create_parents: true,
                        ..Default::default()
                    },
                )),
            },
            agent_pb::WriteFileRequest {
                request: Some(agent_pb::write_file_request::Request::Data(data.into())),
            },
            agent_pb::WriteFileRequest {
                request: Some(agent_pb::write_file_request::Request::End(true)),
            },
        ];
        async move {
            agent
                .write_file(futures::stream::iter(msgs))
                .await
                .map(|_| ())
                // The whole answer (code and message): a run that cannot
                // write its inputs has always said so in these words.
                .map_err(|s| match s.code() {
                    tonic::Code::NotFound => AgentError::NotFound(s.to_string()),
                    _ => AgentError::Unreachable(s.to_string()),
                })
        }
    }

    fn get_file(
        &self,
        path: &str,
        max_bytes: u64,
    ) -> impl Future<Output = Result<Vec<u8>, AgentError>> + Send {
        let agent = self.clone();
        let path = path.to_string();
        async move { read_whole(agent, &path, max_bytes).await }
    }
}

/// Reads a whole file through the agent, refusing one over `max_bytes`.
async fn read_whole(
    mut agent: SandboxAgentClient<Channel>,
    path: &str,
    max_bytes: u64,
) -> Result<Vec<u8>, AgentError> {
    {
        let request = agent_pb::ReadFileRequest {
            path: path.to_string(),
            offset: 0,
            // One byte more than allowed: reading it says the file is larger.
            length: max_bytes.saturating_add(1),
        };
        let mut chunks = agent
            .read_file(request)
            .await
            .map_err(|s| agent_error(&s))?
            .into_inner();
        let mut data = Vec::new();
        while let Some(chunk) = chunks.message().await.map_err(|s| agent_error(&s))? {
            data.extend_from_slice(&chunk.data);
            if data.len() as u64 > max_bytes {
                return Err(AgentError::Unreachable(format!(
                    "{path} is larger than {max_bytes} bytes"
                )));
            }
        }
        Ok(data)
    }
}

fn agent_error(s: &tonic::Status) -> AgentError {
    match s.code() {
        tonic::Code::NotFound => AgentError::NotFound(s.message().to_string()),
        _ => AgentError::Unreachable(s.message().to_string()),
    }
}

fn exec_events(events: tonic::Streaming<agent_pb::ExecEvent>) -> ExecEvents {
    events
        .map(|m| m.map(exec_event).map_err(|s| agent_error(&s)))
        .boxed()
}

fn exec_event(ev: agent_pb::ExecEvent) -> ExecEvent {
    use agent_pb::exec_event::Event as E;
    match ev.event {
        Some(E::Started(s)) => ExecEvent::Started {
            pid: s.pid,
            attached: s.attached,
        },
        Some(E::Output(o)) => ExecEvent::Output {
            stream: if o.stream == agent_pb::OutputStream::Stderr as i32 {
                Stream::Stderr
            } else {
                Stream::Stdout
            },
            offset: o.offset,
            data: o.data,
        },
        Some(E::Dropped(d)) => ExecEvent::Dropped {
            from_offset: d.from_offset,
            to_offset: d.to_offset,
        },
        Some(E::Exited(x)) => ExecEvent::Exited {
            code: x.code,
            signal: x.signal,
            timed_out: x.timed_out,
            oom_killed: x.oom_killed,
            duration_ms: x.duration_ms,
        },
        Some(E::SpawnFailed(f)) => ExecEvent::SpawnFailed(f.reason),
        // A keepalive, or anything else an agent sends: the stream is alive.
        _ => ExecEvent::Keepalive,
    }
}

// ------------------------------------------------------------------- host

/// A sandbox made for a run (labelled [`RUN_LABEL`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunSandbox {
    pub sandbox_id: String,
    pub run_id: String,
}

/// A path of a sandbox, archived and stored as an artifact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub id: String,
    pub sha256: String,
    pub size_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// What the sandboxes answered, as a person reads it.
    #[error("{0}")]
    Sandboxes(String),
}

impl From<crate::sandboxes::Error> for Error {
    fn from(e: crate::sandboxes::Error) -> Self {
        Error::Sandboxes(e.to_string())
    }
}

/// What a run needs of the sandboxes it works in.
pub trait Host: Send + Sync + 'static {
    type Agent: Agent;
    /// The sandboxes `principal` sees that were made for a run: for
    /// `run_id`, or (None) for any run.
    fn run_sandboxes(
        &self,
        principal: &Principal,
        run_id: Option<&str>,
    ) -> impl Future<Output = Result<Vec<RunSandbox>, Error>> + Send;
    /// Makes a sandbox for `principal`; answers its id once its agent serves.
    fn create_sandbox(
        &self,
        principal: &Principal,
        req: CreateRequest,
    ) -> impl Future<Output = Result<String, Error>> + Send;
    /// Whether `req` is a sandbox this server would make (limits within
    /// its maxima, a network only where allowed), checked before anything
    /// is asked of policy or of a person.
    fn check_request(&self, req: &CreateRequest) -> Result<(), Error>;
    /// The agent of a sandbox (connected when first used).
    fn agent_of(&self, sandbox_id: &str) -> Self::Agent;
    /// Archives `path` of the sandbox (zstd) into a stored artifact, a
    /// snapshot of the sandbox's owner.
    fn snapshot_artifact(
        &self,
        principal: &Principal,
        sandbox_id: &str,
        path: &str,
    ) -> impl Future<Output = Result<Snapshot, Error>> + Send;
    fn delete_sandbox(
        &self,
        principal: &Principal,
        sandbox_id: &str,
    ) -> impl Future<Output = Result<(), Error>> + Send;
}

impl<R: Runtime> Host for Sandboxes<R> {
    type Agent = SandboxAgentClient<Channel>;

    async fn run_sandboxes(
        &self,
        principal: &Principal,
        run_id: Option<&str>,
    ) -> Result<Vec<RunSandbox>, Error> {
        let labels = match run_id {
            Some(id) => BTreeMap::from([(RUN_LABEL.to_string(), id.to_string())]),
            None => BTreeMap::new(),
        };
        let found = self.list(principal, &labels).await?;
        Ok(found
            .into_iter()
            .filter_map(|sb| {
                let run_id = sb.spec.labels.get(RUN_LABEL)?.clone();
                Some(RunSandbox {
                    sandbox_id: sb.id,
                    run_id,
                })
            })
            .collect())
    }

    async fn create_sandbox(
        &self,
        principal: &Principal,
        req: CreateRequest,
    ) -> Result<String, Error> {
        Ok(self.create(principal, req).await?.id)
    }

    fn check_request(&self, req: &CreateRequest) -> Result<(), Error> {
        self.resolve_spec(req).map(drop).map_err(Error::from)
    }

    fn agent_of(&self, sandbox_id: &str) -> Self::Agent {
        self.agent(sandbox_id)
    }

    async fn snapshot_artifact(
        &self,
        principal: &Principal,
        sandbox_id: &str,
        path: &str,
    ) -> Result<Snapshot, Error> {
        let snap = self
            .snapshot(
                principal,
                sandbox_id,
                path.to_string(),
                Vec::new(),
                agent_pb::Compression::Zstd,
            )
            .await?;
        Ok(Snapshot {
            id: snap.id,
            sha256: snap.sha256,
            size_bytes: snap.size_bytes,
        })
    }

    async fn delete_sandbox(&self, principal: &Principal, sandbox_id: &str) -> Result<(), Error> {
        self.delete(principal, sandbox_id)
            .await
            .map_err(Error::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_events_become_domain_events_and_unknown_ones_keep_the_stream_alive() {
        use agent_pb::exec_event::Event as E;
        let output = |stream: agent_pb::OutputStream| agent_pb::ExecEvent {
            event: Some(E::Output(agent_pb::OutputChunk {
                stream: stream as i32,
                offset: 7,
                data: Bytes::from_static(b"hi"),
            })),
        };
        assert_eq!(
            exec_event(output(agent_pb::OutputStream::Stderr)),
            ExecEvent::Output {
                stream: Stream::Stderr,
                offset: 7,
                data: Bytes::from_static(b"hi")
            }
        );
        // An unspecified stream is stdout, as it always was.
        assert!(matches!(
            exec_event(output(agent_pb::OutputStream::Unspecified)),
            ExecEvent::Output {
                stream: Stream::Stdout,
                ..
            }
        ));
        let exited = agent_pb::ExecEvent {
            event: Some(E::Exited(agent_pb::ExecExited {
                code: Some(3),
                timed_out: true,
                duration_ms: 12,
                ..Default::default()
            })),
        };
        assert_eq!(
            exec_event(exited),
            ExecEvent::Exited {
                code: Some(3),
                signal: None,
                timed_out: true,
                oom_killed: false,
                duration_ms: 12
            }
        );
        let failed = agent_pb::ExecEvent {
            event: Some(E::SpawnFailed(agent_pb::SpawnFailed {
                reason: "no such file".into(),
                errno: 2,
            })),
        };
        assert_eq!(
            exec_event(failed),
            ExecEvent::SpawnFailed("no such file".into())
        );
        assert_eq!(
            exec_event(agent_pb::ExecEvent { event: None }),
            ExecEvent::Keepalive
        );
    }

    #[test]
    fn only_not_found_means_the_agent_does_not_know_the_exec() {
        assert_eq!(
            agent_error(&tonic::Status::not_found("no exec x")),
            AgentError::NotFound("no exec x".into())
        );
        let e = agent_error(&tonic::Status::unavailable("connection refused"));
        assert_eq!(e, AgentError::Unreachable("connection refused".into()));
        assert_eq!(e.message(), "connection refused");
    }
}
