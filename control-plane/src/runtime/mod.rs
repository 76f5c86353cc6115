//! Where sandboxes run. [`Runtime`] is the narrow surface the control plane
//! needs from a container engine; [`docker::Docker`] implements it with
//! bollard against the real daemon.

pub mod docker;

use std::future::Future;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no container for sandbox {0}")]
    NotFound(String),
    #[error("image {0:?} is not on the Docker host (build it with images/build.sh; no registry is used)")]
    ImageMissing(String),
    #[error("docker: {0}")]
    Docker(String),
}

/// Where an `egress` sandbox's relay listens, on its own loopback.
pub const EGRESS_PROXY: &str = "127.0.0.1:3128";
/// Where an `egress` sandbox's agent answers DNS queries (its
/// `/etc/resolv.conf` names it).
pub const EGRESS_DNS: &str = "127.0.0.1:53";

/// The network a sandbox's container is attached to. Part of a sandbox's
/// stored spec (`sandboxes::Spec`), so its serialized form is kept stable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Network {
    None,
    Bridge,
    /// No interface but loopback; a relay there hands each connection to
    /// the control plane's egress proxy (docs/network.md).
    Egress,
}

impl Network {
    pub fn as_str(self) -> &'static str {
        match self {
            Network::None => "none",
            Network::Bridge => "bridge",
            Network::Egress => "egress",
        }
    }
}

impl FromStr for Network {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "none" => Ok(Network::None),
            "bridge" => Ok(Network::Bridge),
            "egress" => Ok(Network::Egress),
            other => Err(format!("unknown network {other:?} (none, bridge)")),
        }
    }
}

/// Everything needed to start one sandbox container.
#[derive(Debug, Clone)]
pub struct ContainerSpec {
    pub sandbox_id: String,
    pub image: String,
    /// `uid:gid`.
    pub user: String,
    pub memory_bytes: u64,
    pub cpu_millis: u64,
    pub pids: u64,
    pub tmp_bytes: u64,
    /// 0: a named volume (or `workspace_mount`); otherwise a tmpfs of this
    /// size owned by `user`.
    pub workspace_tmpfs_bytes: u64,
    /// A host directory (the sandbox's own filesystem) to bind at
    /// `/workspace`, instead of a volume.
    pub workspace_mount: Option<PathBuf>,
    pub network: Network,
    /// Host directory mounted at `/run/bridle`, where the agent puts its socket.
    pub socket_dir: PathBuf,
    /// The agent's identity key, hex (see `bridle_proto::handshake`).
    pub agent_key: String,
    /// Static agent binary to mount read-only as the entrypoint, for images
    /// that do not carry one.
    pub inject_agent: Option<PathBuf>,
    /// Pool profile or owner, only for labels (`docker ps` readability).
    pub owner_label: String,
}

/// A container of this control plane that stopped, as the engine tells it.
#[derive(Debug, Clone)]
pub struct Exit {
    pub sandbox_id: String,
    /// Empty when the engine did not say.
    pub exit_code: String,
}

/// A container this control plane created, as the engine reports it.
#[derive(Debug, Clone)]
pub struct ContainerStatus {
    pub sandbox_id: String,
    pub container_id: String,
    pub running: bool,
    pub paused: bool,
}

pub trait Runtime: Send + Sync + 'static {
    /// Creates and starts the container; answers its id. Readiness is the
    /// caller's business (the agent's health check).
    fn create(&self, spec: &ContainerSpec) -> impl Future<Output = Result<String, Error>> + Send;
    /// Removes the container and its workspace volume; absent is fine.
    fn remove(&self, sandbox_id: &str) -> impl Future<Output = Result<(), Error>> + Send;
    /// Removes a container found by [`Runtime::list`] that no record owns
    /// (its name may not be the one bridle would give it).
    fn remove_orphan(
        &self,
        orphan: &ContainerStatus,
    ) -> impl Future<Output = Result<(), Error>> + Send;
    fn pause(&self, sandbox_id: &str) -> impl Future<Output = Result<(), Error>> + Send;
    fn resume(&self, sandbox_id: &str) -> impl Future<Output = Result<(), Error>> + Send;
    /// Starts a stopped container again (its volume kept its workspace).
    fn restart(&self, sandbox_id: &str) -> impl Future<Output = Result<(), Error>> + Send;
    /// The sandbox's container, if there is one.
    fn status(
        &self,
        sandbox_id: &str,
    ) -> impl Future<Output = Result<Option<ContainerStatus>, Error>> + Send;
    /// Every container this control plane owns, whatever its state.
    fn list(&self) -> impl Future<Output = Result<Vec<ContainerStatus>, Error>> + Send;
    /// The last lines the container printed, for error messages.
    fn logs(&self, sandbox_id: &str) -> impl Future<Output = String> + Send;
    /// The sandbox ids of this control plane's workspace volumes.
    fn volumes(&self) -> impl Future<Output = Result<Vec<String>, Error>> + Send;
    /// Containers of this control plane stopping, as it happens; the
    /// stream ends when the engine's event stream does.
    fn exits(&self) -> impl futures::Stream<Item = Exit> + Send + 'static;
}
