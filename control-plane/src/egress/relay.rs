//! Carries an `egress` sandbox's connections from its agent's relay to the
//! proxy: the agent announces each connection a command opened on the
//! sandbox's loopback (`EgressAccepted`), and each is carried over its own
//! stream (`EgressConnection`) into [`Proxy::serve`], which decides and
//! connects. [`follow_all`] keeps one follower per running egress sandbox,
//! across restarts of the control plane and of the agent.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bridle_proto::sandbox::v1 as agent_pb;
use bridle_proto::sandbox::v1::sandbox_agent_client::SandboxAgentClient;
use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use super::proxy::{Origin, Proxy};
use crate::auth::{Principal, Role};
use crate::runtime::{Network, Runtime};
use crate::sandboxes::Sandboxes;

/// How often running sandboxes are looked over for one without a follower.
const LOOK_EVERY: Duration = Duration::from_secs(1);
/// Bytes of a connection per message to the agent.
const CHUNK: usize = 256 << 10;
/// Connections of one sandbox carried at once; more wait in its agent (which
/// keeps 1,024 and closes the rest).
const MAX_CONNECTIONS: usize = 64;
/// A DNS query is at most this long.
const MAX_QUERY: usize = 4096;

/// Keeps a follower on every running `egress` sandbox until `stop`.
pub async fn follow_all<R: Runtime>(
    sandboxes: Sandboxes<R>,
    proxy: Arc<Proxy>,
    mut stop: watch::Receiver<bool>,
) {
    let following: Arc<Mutex<HashSet<String>>> = Arc::default();
    let system = Principal {
        token_id: "system".into(),
        name: "control plane".into(),
        role: Role::Admin,
        owner: String::new(),
    };
    loop {
        if let Ok(all) = sandboxes.list(&system, &Default::default()).await {
            for sb in all {
                if sb.spec.network != Network::Egress
                    || sb.state != crate::sandboxes::SandboxState::Ready
                    || !following.lock().expect("lock").insert(sb.id.clone())
                {
                    continue;
                }
                let agent = sandboxes.agent(&sb.id);
                let proxy = proxy.clone();
                let following = following.clone();
                let owner = sb.owner.clone().unwrap_or_default();
                let run_id = sb
                    .spec
                    .labels
                    .get(crate::host::RUN_LABEL)
                    .cloned()
                    .unwrap_or_default();
                tokio::spawn(async move {
                    if let Err(e) = follow(agent, proxy, &sb.id, &owner, &run_id).await {
                        tracing::debug!(sandbox = %sb.id, "egress relay: {e}");
                    }
                    following.lock().expect("lock").remove(&sb.id);
                });
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(LOOK_EVERY) => {}
            _ = stop.changed() => return,
        }
    }
}

/// Follows one sandbox's relay until its agent goes away.
async fn follow(
    mut agent: SandboxAgentClient<Channel>,
    proxy: Arc<Proxy>,
    sandbox_id: &str,
    owner: &str,
    run_id: &str,
) -> Result<(), tonic::Status> {
    let mut accepted = agent
        .egress_accepted(agent_pb::EgressAcceptedRequest {})
        .await?
        .into_inner();
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    while let Some(a) = accepted.message().await? {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            break;
        };
        // The agent's number says which connection to carry; the record's
        // is the control plane's own (the agent's restarts from 1).
        let origin = Origin {
            sandbox_id: sandbox_id.to_string(),
            owner: owner.to_string(),
            connection: u64::from_str_radix(&crate::ids::random_hex(8), 16).unwrap_or(0),
            run_id: run_id.to_string(),
        };
        let (agent, proxy) = (agent.clone(), proxy.clone());
        tokio::spawn(async move {
            let carried = if a.dns {
                answer(agent, &proxy, &origin, a.connection).await
            } else {
                carry(agent, &proxy, &origin, a.connection).await
            };
            if let Err(e) = carried {
                tracing::debug!(sandbox = %origin.sandbox_id, connection = origin.connection, "egress connection: {e}");
            }
            drop(slot);
        });
    }
    Ok(())
}

/// Opens the agent's stream for `connection` (the first message names it):
/// what to send the agent on, and what it sends back.
async fn open(
    agent: &mut SandboxAgentClient<Channel>,
    connection: u64,
    buffer: usize,
) -> Result<
    (
        mpsc::Sender<agent_pb::EgressChunk>,
        tonic::Streaming<agent_pb::EgressChunk>,
    ),
    tonic::Status,
> {
    let (to_agent, rx) = mpsc::channel::<agent_pb::EgressChunk>(buffer);
    let _ = to_agent
        .send(agent_pb::EgressChunk {
            connection,
            data: Bytes::new(),
            eof: false,
        })
        .await;
    let from_agent = agent
        .egress_connection(ReceiverStream::new(rx))
        .await?
        .into_inner();
    Ok((to_agent, from_agent))
}

/// Answers one DNS query: its bytes (one message from the agent, at most
/// [`MAX_QUERY`]), and the answer back as one message.
async fn answer(
    mut agent: SandboxAgentClient<Channel>,
    proxy: &Proxy,
    origin: &Origin,
    connection: u64,
) -> Result<(), tonic::Status> {
    let (to_agent, mut from_agent) = open(&mut agent, connection, 2).await?;
    let query = tokio::time::timeout(Duration::from_secs(5), from_agent.message())
        .await
        .map_err(|_| tonic::Status::deadline_exceeded("the query did not come"))??
        .ok_or_else(|| tonic::Status::aborted("the agent sent no query"))?;
    if query.data.len() > MAX_QUERY {
        return Err(tonic::Status::invalid_argument("the query is too long"));
    }
    let Some(answer) = proxy.answer_dns(origin, &query.data).await else {
        return Ok(());
    };
    let _ = to_agent
        .send(agent_pb::EgressChunk {
            connection,
            data: answer.into(),
            eof: true,
        })
        .await;
    // Held open until the agent has it (its side ends once the answer is
    // sent on): dropping the call first would cancel it with the answer
    // still on the way.
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while let Ok(Some(_)) = from_agent.message().await {}
    })
    .await;
    Ok(())
}

/// Carries one connection: bytes from the command into the proxy and back.
async fn carry(
    mut agent: SandboxAgentClient<Channel>,
    proxy: &Proxy,
    origin: &Origin,
    connection: u64,
) -> Result<(), tonic::Status> {
    let (to_agent, mut from_agent) = open(&mut agent, connection, 16).await?;
    let (proxy_side, relay_side) = tokio::io::duplex(4 * CHUNK);
    let (mut from_proxy, mut to_proxy) = tokio::io::split(relay_side);
    // The command's bytes, into the proxy.
    let inbound = tokio::spawn(async move {
        while let Ok(Some(chunk)) = from_agent.message().await {
            if !chunk.data.is_empty() && to_proxy.write_all(&chunk.data).await.is_err() {
                break;
            }
            if chunk.eof {
                break;
            }
        }
        let _ = to_proxy.shutdown().await;
    });
    // The proxy's bytes, back to the command.
    let outbound = tokio::spawn(async move {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let (data, eof) = match from_proxy.read(&mut buf).await {
                Ok(0) | Err(_) => (Bytes::new(), true),
                Ok(n) => (Bytes::copy_from_slice(&buf[..n]), false),
            };
            let chunk = agent_pb::EgressChunk {
                connection,
                data,
                eof,
            };
            if to_agent.send(chunk).await.is_err() || eof {
                return;
            }
        }
    });
    let outcome = proxy.serve(origin, proxy_side).await;
    // What the proxy said is sent on first; then the stream to the agent
    // ends (not when the command closes its socket), so a command cannot
    // hold the agent's streams.
    let _ = tokio::time::timeout(Duration::from_secs(5), outbound).await;
    // The agent closes the command's socket once it has it all, which ends
    // its side; an agent that does not is cut off.
    let abort = inbound.abort_handle();
    if tokio::time::timeout(Duration::from_secs(5), inbound)
        .await
        .is_err()
    {
        abort.abort();
    }
    // A connection that never sent a request is not worth an entry (a
    // command could open and close them in a loop).
    if !outcome.host.is_empty() {
        proxy.record(origin, &outcome).await;
    }
    Ok(())
}
