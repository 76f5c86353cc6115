//! [`Runtime`] on the Docker Engine API, through bollard.
//!
//! Every container is hardened the same way: all capabilities dropped,
//! `no-new-privileges`, a non-root user, a read-only root, a tmpfs `/tmp`, a
//! named volume for the workspace, memory (without swap), CPU and pids
//! limits, and network `none` unless asked. The agent's socket directory is a
//! host directory bind-mounted at `/run/bridle`, so sandboxes without a
//! network are still reachable.

use std::collections::{BTreeMap, HashMap};

use bollard::models::{ContainerCreateBody, HostConfig, Mount, MountType, VolumeCreateRequest};
use bollard::query_parameters::{
    CreateContainerOptions, EventsOptions, ListContainersOptions, ListVolumesOptions, LogsOptions,
    RemoveContainerOptions, RemoveVolumeOptions,
};
use futures::StreamExt;

use super::{
    ContainerSpec, ContainerStatus, Error, Exit, Network, Runtime, EGRESS_DNS, EGRESS_PROXY,
};
use crate::config::DockerConfig;

// All three are in `config::OWN_DOCKER_LABELS`, which `docker.labels` may
// not set (a unit test below keeps it so).
pub const LABEL_CONTROL_PLANE: &str = "bridle.control-plane";
pub const LABEL_SANDBOX: &str = "bridle.sandbox";
pub const LABEL_OWNER: &str = "bridle.owner";
/// Where an injected agent is mounted.
const INJECTED_AGENT: &str = "/.bridle/sandbox-agent";

#[derive(Clone)]
pub struct Docker {
    client: bollard::Docker,
    instance: String,
    /// `docker.labels`: put on every container and volume besides ours.
    extra_labels: BTreeMap<String, String>,
}

impl Docker {
    /// Connects to `config.host` (empty: `DOCKER_HOST` or the local socket)
    /// and agrees on an API version with the daemon.
    pub async fn connect(config: &DockerConfig, instance: &str) -> Result<Self, Error> {
        let host = &config.host;
        let client = if host.is_empty() {
            bollard::Docker::connect_with_defaults()
        } else {
            bollard::Docker::connect_with_host(host)
        }
        .map_err(docker_error)?;
        let client = client
            .negotiate_version()
            .await
            .map_err(|e| Error::Docker(format!("the Docker daemon is unreachable: {e}")))?;
        Ok(Self {
            client,
            instance: instance.to_string(),
            extra_labels: config.labels.clone(),
        })
    }

    pub fn container_name(sandbox_id: &str) -> String {
        format!("bridle-{sandbox_id}")
    }

    fn volume_name(sandbox_id: &str) -> String {
        format!("bridle-{sandbox_id}-workspace")
    }

    /// The engine's filter for what this control plane made (its label).
    fn own_objects(&self) -> HashMap<String, Vec<String>> {
        HashMap::from([(
            "label".to_string(),
            vec![format!("{LABEL_CONTROL_PLANE}={}", self.instance)],
        )])
    }
}

fn docker_error(e: bollard::errors::Error) -> Error {
    Error::Docker(e.to_string())
}

fn status_code(e: &bollard::errors::Error) -> Option<u16> {
    match e {
        bollard::errors::Error::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    }
}

impl Runtime for Docker {
    async fn create(&self, spec: &ContainerSpec) -> Result<String, Error> {
        let name = Self::container_name(&spec.sandbox_id);
        // Ours last: configuration cannot name them (config::validate), and
        // if it did they would still win.
        let labels: HashMap<String, String> = self
            .extra_labels
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .chain([
                (LABEL_CONTROL_PLANE, self.instance.as_str()),
                (LABEL_SANDBOX, spec.sandbox_id.as_str()),
                (LABEL_OWNER, spec.owner_label.as_str()),
            ])
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let mut mounts = vec![Mount {
            typ: Some(MountType::BIND),
            source: Some(spec.socket_dir.display().to_string()),
            target: Some("/run/bridle".into()),
            ..Default::default()
        }];
        let mut tmpfs = HashMap::from([(
            "/tmp".to_string(),
            format!("rw,nosuid,nodev,size={}", spec.tmp_bytes),
        )]);
        if spec.workspace_tmpfs_bytes > 0 {
            let (uid, gid) = crate::config::parse_user(&spec.user).unwrap_or((1000, 1000));
            tmpfs.insert(
                "/workspace".into(),
                format!(
                    "rw,nosuid,nodev,size={},uid={uid},gid={gid},mode=0755",
                    spec.workspace_tmpfs_bytes
                ),
            );
        } else if let Some(dir) = &spec.workspace_mount {
            mounts.push(Mount {
                typ: Some(MountType::BIND),
                source: Some(dir.display().to_string()),
                target: Some("/workspace".into()),
                ..Default::default()
            });
        } else {
            // Made here, with the labels, rather than implicitly by the
            // mount: a volume whose container is gone is then still found
            // (`volumes`) and swept.
            self.client
                .create_volume(VolumeCreateRequest {
                    name: Some(Self::volume_name(&spec.sandbox_id)),
                    labels: Some(labels.clone()),
                    ..Default::default()
                })
                .await
                .map_err(docker_error)?;
            mounts.push(Mount {
                typ: Some(MountType::VOLUME),
                source: Some(Self::volume_name(&spec.sandbox_id)),
                target: Some("/workspace".into()),
                ..Default::default()
            });
        }
        let mut entrypoint = None;
        if let Some(agent) = &spec.inject_agent {
            mounts.push(Mount {
                typ: Some(MountType::BIND),
                source: Some(agent.display().to_string()),
                target: Some(INJECTED_AGENT.into()),
                read_only: Some(true),
                ..Default::default()
            });
            entrypoint = Some(vec![INJECTED_AGENT.to_string()]);
        }
        let memory = spec.memory_bytes as i64;
        let host_config = HostConfig {
            cap_drop: Some(vec!["ALL".into()]),
            security_opt: Some(vec!["no-new-privileges".into()]),
            readonly_rootfs: Some(true),
            tmpfs: Some(tmpfs),
            mounts: Some(mounts),
            memory: Some(memory),
            memory_swap: Some(memory),
            nano_cpus: Some(spec.cpu_millis as i64 * 1_000_000),
            pids_limit: Some(spec.pids as i64),
            // The agent must be PID 1 (its peer and signal checks rely on
            // it), whatever the daemon's default.
            init: Some(false),
            // Bounded, so that what a sandbox makes its agent log cannot
            // fill the host's disk.
            log_config: Some(bollard::models::HostConfigLogConfig {
                typ: Some("json-file".into()),
                config: Some(HashMap::from([
                    ("max-size".to_string(), "1m".to_string()),
                    ("max-file".to_string(), "2".to_string()),
                ])),
            }),
            // An egress sandbox's resolver is its agent's relay, on port 53
            // of its own loopback (which its unprivileged agent may bind
            // only when the namespace's unprivileged ports start there).
            dns: (spec.network == Network::Egress).then(|| vec!["127.0.0.1".to_string()]),
            sysctls: (spec.network == Network::Egress).then(|| {
                HashMap::from([(
                    "net.ipv4.ip_unprivileged_port_start".to_string(),
                    "53".to_string(),
                )])
            }),
            network_mode: Some(
                match spec.network {
                    Network::None | Network::Egress => "none",
                    Network::Bridge => "bridge",
                }
                .into(),
            ),
            ..Default::default()
        };
        let body = ContainerCreateBody {
            image: Some(spec.image.clone()),
            user: Some(spec.user.clone()),
            entrypoint,
            cmd: Some(Vec::new()),
            env: Some({
                let mut env = vec![
                    "BRIDLE_AGENT_SOCKET=/run/bridle/agent.sock".to_string(),
                    "BRIDLE_AGENT_WORKSPACE=/workspace".into(),
                    // Read and dropped from its environment by the agent at start.
                    format!("{}={}", "BRIDLE_AGENT_KEY", spec.agent_key),
                ];
                if spec.network == Network::Egress {
                    env.push(format!("BRIDLE_AGENT_EGRESS_PROXY={EGRESS_PROXY}"));
                    env.push(format!("BRIDLE_AGENT_EGRESS_DNS={EGRESS_DNS}"));
                    // What ordinary tools read (curl, pip, git, npm, wget).
                    let proxy = format!("http://{EGRESS_PROXY}");
                    for name in ["HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"] {
                        env.push(format!("{name}={proxy}"));
                    }
                    env.push("NO_PROXY=localhost,127.0.0.1,::1".into());
                    env.push("no_proxy=localhost,127.0.0.1,::1".into());
                }
                env
            }),
            working_dir: Some("/workspace".into()),
            labels: Some(labels),
            network_disabled: Some(spec.network != Network::Bridge),
            host_config: Some(host_config),
            ..Default::default()
        };
        let created = self
            .client
            .create_container(
                Some(CreateContainerOptions {
                    name: Some(name.clone()),
                    ..Default::default()
                }),
                body,
            )
            .await
            .map_err(|e| match status_code(&e) {
                Some(404) => Error::ImageMissing(spec.image.clone()),
                _ => docker_error(e),
            })?;
        if let Err(e) = self.client.start_container(&created.id, None).await {
            let _ = self.remove(&spec.sandbox_id).await;
            return Err(docker_error(e));
        }
        Ok(created.id)
    }

    async fn remove(&self, sandbox_id: &str) -> Result<(), Error> {
        let name = Self::container_name(sandbox_id);
        match self
            .client
            .remove_container(
                &name,
                Some(RemoveContainerOptions {
                    force: true,
                    v: true,
                    ..Default::default()
                }),
            )
            .await
        {
            Ok(()) => {}
            Err(e) if status_code(&e) == Some(404) => {}
            // Removal already under way (a concurrent delete).
            Err(e) if status_code(&e) == Some(409) => {}
            Err(e) => return Err(docker_error(e)),
        }
        match self
            .client
            .remove_volume(
                &Self::volume_name(sandbox_id),
                Some(RemoveVolumeOptions { force: true }),
            )
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if status_code(&e) == Some(404) => Ok(()),
            Err(e) => Err(docker_error(e)),
        }
    }

    async fn remove_orphan(&self, orphan: &ContainerStatus) -> Result<(), Error> {
        match self
            .client
            .remove_container(
                &orphan.container_id,
                Some(RemoveContainerOptions {
                    force: true,
                    v: true,
                    ..Default::default()
                }),
            )
            .await
        {
            Ok(()) => {}
            Err(e) if matches!(status_code(&e), Some(404) | Some(409)) => {}
            Err(e) => return Err(docker_error(e)),
        }
        self.remove(&orphan.sandbox_id).await
    }

    async fn pause(&self, sandbox_id: &str) -> Result<(), Error> {
        self.client
            .pause_container(&Self::container_name(sandbox_id))
            .await
            .map_err(|e| match status_code(&e) {
                Some(404) => Error::NotFound(sandbox_id.into()),
                _ => docker_error(e),
            })
    }

    async fn resume(&self, sandbox_id: &str) -> Result<(), Error> {
        self.client
            .unpause_container(&Self::container_name(sandbox_id))
            .await
            .map_err(|e| match status_code(&e) {
                Some(404) => Error::NotFound(sandbox_id.into()),
                _ => docker_error(e),
            })
    }

    async fn restart(&self, sandbox_id: &str) -> Result<(), Error> {
        match self
            .client
            .start_container(&Self::container_name(sandbox_id), None)
            .await
        {
            Ok(()) => Ok(()),
            // 304: already running.
            Err(e) if status_code(&e) == Some(304) => Ok(()),
            Err(e) if status_code(&e) == Some(404) => Err(Error::NotFound(sandbox_id.into())),
            Err(e) => Err(docker_error(e)),
        }
    }

    async fn status(&self, sandbox_id: &str) -> Result<Option<ContainerStatus>, Error> {
        match self
            .client
            .inspect_container(&Self::container_name(sandbox_id), None)
            .await
        {
            Ok(c) => {
                let state = c.state.unwrap_or_default();
                Ok(Some(ContainerStatus {
                    sandbox_id: sandbox_id.to_string(),
                    container_id: c.id.unwrap_or_default(),
                    running: state.running.unwrap_or(false),
                    paused: state.paused.unwrap_or(false),
                }))
            }
            Err(e) if status_code(&e) == Some(404) => Ok(None),
            Err(e) => Err(docker_error(e)),
        }
    }

    async fn list(&self) -> Result<Vec<ContainerStatus>, Error> {
        let filters = self.own_objects();
        let containers = self
            .client
            .list_containers(Some(ListContainersOptions {
                all: true,
                filters: Some(filters),
                ..Default::default()
            }))
            .await
            .map_err(docker_error)?;
        Ok(containers
            .into_iter()
            .filter_map(|c| {
                let sandbox_id = c.labels.as_ref()?.get(LABEL_SANDBOX)?.clone();
                let state = c.state.map(|s| s.to_string()).unwrap_or_default();
                Some(ContainerStatus {
                    sandbox_id,
                    container_id: c.id.unwrap_or_default(),
                    running: state == "running" || state == "paused",
                    paused: state == "paused",
                })
            })
            .collect())
    }

    async fn volumes(&self) -> Result<Vec<String>, Error> {
        let filters = self.own_objects();
        let listed = self
            .client
            .list_volumes(Some(ListVolumesOptions {
                filters: Some(filters),
            }))
            .await
            .map_err(docker_error)?;
        Ok(listed
            .volumes
            .unwrap_or_default()
            .into_iter()
            .filter_map(|v| v.labels.get(LABEL_SANDBOX).cloned())
            .collect())
    }

    fn exits(&self) -> impl futures::Stream<Item = Exit> + Send + 'static {
        let mut filters = self.own_objects();
        filters.insert("type".into(), vec!["container".into()]);
        filters.insert("event".into(), vec!["die".into()]);
        self.client
            .events(Some(EventsOptions {
                filters: Some(filters),
                ..Default::default()
            }))
            .take_while(|e| futures::future::ready(e.is_ok()))
            .filter_map(|e| {
                let exit = e.ok().and_then(|e| {
                    let attributes = e.actor?.attributes?;
                    Some(Exit {
                        sandbox_id: attributes.get(LABEL_SANDBOX)?.clone(),
                        exit_code: attributes.get("exitCode").cloned().unwrap_or_default(),
                    })
                });
                futures::future::ready(exit)
            })
    }

    async fn logs(&self, sandbox_id: &str) -> String {
        let mut stream = self.client.logs(
            &Self::container_name(sandbox_id),
            Some(LogsOptions {
                stdout: true,
                stderr: true,
                tail: "20".into(),
                ..Default::default()
            }),
        );
        let mut out = String::new();
        while let Some(Ok(chunk)) = stream.next().await {
            out.push_str(&String::from_utf8_lossy(&chunk.into_bytes()));
            if out.len() > 4096 {
                break;
            }
        }
        out.trim().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configuration_cannot_set_the_labels_the_control_plane_finds_its_objects_by() {
        for own in [LABEL_CONTROL_PLANE, LABEL_SANDBOX, LABEL_OWNER] {
            assert!(
                crate::config::OWN_DOCKER_LABELS.contains(&own),
                "{own} is missing from config::OWN_DOCKER_LABELS"
            );
        }
    }
}
