//! Sandboxes: [`Sandboxes`] creates, finds, pauses and removes them on a
//! [`Runtime`] and snapshots and forks them. What one is lives in [`spec`],
//! its record and SQL in [`store`], its workspace filesystem in [`disks`];
//! the warm pools in `pool`, and bringing records and containers into line
//! (orphans removed, live ones re-adopted, expired and idle ones deleted,
//! exits noticed) in `reconcile`.

pub mod disks;
mod pool;
mod reconcile;
pub mod spec;
pub mod store;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bridle_proto::sandbox::v1 as agent_pb;
use sqlx::SqlitePool;
use tokio::sync::{Notify, Semaphore};

use crate::agents;
use crate::artifacts::Artifacts;
use crate::auth::Principal;
use crate::config::Config;
use crate::runtime::{self, ContainerSpec, Runtime};
use disks::Disks;

pub use crate::agents::Agent;
pub use spec::{
    check_client_labels, check_lifetime, CreateRequest, Network, SandboxState, Spec,
    MAX_LIFETIME_SECS, RESERVED_EXEC_ID_PREFIX, RESERVED_LABEL_PREFIX,
};
pub use store::{SandboxRecord, SandboxStore, SnapshotRecord};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("sandbox {0} not found")]
    NotFound(String),
    #[error("snapshot {0} not found")]
    SnapshotNotFound(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    Exhausted(String),
    #[error("sandbox {id} did not become ready: {reason}")]
    NotReady { id: String, reason: String },
    #[error(transparent)]
    Runtime(#[from] runtime::Error),
    #[error(transparent)]
    Store(#[from] crate::store::Error),
    #[error("sandbox agent: {0}")]
    Agent(tonic::Status),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("the sandbox's disk: {0}")]
    Disk(#[from] disks::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

pub struct Sandboxes<R: Runtime> {
    inner: Arc<Inner<R>>,
}

impl<R: Runtime> Clone for Sandboxes<R> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

struct Inner<R> {
    config: Config,
    runtime: R,
    store: SandboxStore,
    artifacts: Artifacts,
    sockets: PathBuf,
    disks: Disks,
    /// Each sandbox's agent key is derived from this (`<data_dir>/agent.key`).
    agent_master_key: [u8; 32],
    agents: Mutex<HashMap<String, Agent>>,
    /// Last activity not yet written to the store.
    activity: Mutex<HashMap<String, i64>>,
    /// Open exec streams per sandbox: a sandbox with one is never idle.
    streams: Mutex<HashMap<String, usize>>,
    /// Sandboxes this process is creating right now (the sweep leaves them).
    creating: Mutex<HashSet<String>>,
    create_permits: Semaphore,
    /// Creates holding one of `create_permits` now (logged at debug as
    /// each starts, so the bound can be seen from outside).
    creates_in_flight: AtomicUsize,
    pool_wake: Notify,
}

impl<R: Runtime> Sandboxes<R> {
    pub fn new(
        config: Config,
        runtime: R,
        pool: SqlitePool,
        artifacts: Artifacts,
    ) -> std::io::Result<Self> {
        let sockets = config.data_dir.join("sandboxes");
        std::fs::create_dir_all(&sockets)?;
        set_mode(&sockets, 0o700)?;
        // sun_path holds 108 bytes; say so now rather than at the first create.
        let longest = sockets.join("sb-000000000000/agent.sock");
        if longest.as_os_str().len() >= 108 {
            return Err(std::io::Error::other(format!(
                "data_dir {} is too long: agent socket paths must fit in 107 bytes",
                config.data_dir.display()
            )));
        }
        let agent_master_key = crate::keys::key_file(&config.data_dir.join("agent.key"))
            .map_err(|e| std::io::Error::other(format!("the agent key file: {e}")))?;
        // The socket directory is locked against the sandbox by its mode, so
        // its owner (this process's uid) must not be the sandbox user's.
        let (sandbox_uid, _) = crate::config::parse_user(&config.sandbox.user)
            .ok_or_else(|| std::io::Error::other("sandbox.user must be uid:gid"))?;
        // SAFETY: geteuid has no preconditions.
        if sandbox_uid == unsafe { libc::geteuid() } {
            return Err(std::io::Error::other(format!(
                "sandbox.user ({}) is the control plane's own uid: sandboxes could then reach into the control plane's files; run the control plane as another user (root, or one in the docker group)",
                config.sandbox.user
            )));
        }
        // Mounting a filesystem per sandbox needs root: say so now rather
        // than at the first create.
        let limits_disk =
            config.sandbox.disk_bytes > 0 || config.pool.iter().any(|p| p.disk_bytes > 0);
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        if limits_disk && config.sandbox.workspace_tmpfs_bytes == 0 && !root {
            return Err(std::io::Error::other(
                "sandbox.disk_bytes needs the control plane to run as root (it mounts a filesystem image per sandbox); run it as root, or set sandbox.disk_bytes = 0 to run without disk limits",
            ));
        }
        let disks = Disks::at(&config.data_dir.join("disks")).map_err(std::io::Error::other)?;
        Ok(Self {
            inner: Arc::new(Inner {
                disks,
                agent_master_key,
                create_permits: Semaphore::new(config.docker.max_concurrent_creates.max(1)),
                creates_in_flight: AtomicUsize::new(0),
                config,
                runtime,
                store: SandboxStore::new(pool),
                artifacts,
                sockets,
                agents: Mutex::default(),
                activity: Mutex::default(),
                streams: Mutex::default(),
                creating: Mutex::default(),
                pool_wake: Notify::new(),
            }),
        })
    }

    pub fn store(&self) -> &SandboxStore {
        &self.inner.store
    }

    pub fn artifacts(&self) -> &Artifacts {
        &self.inner.artifacts
    }

    fn socket_dir(&self, id: &str) -> PathBuf {
        self.inner.sockets.join(id)
    }

    fn agent_key(&self, id: &str) -> [u8; 32] {
        bridle_proto::handshake::sandbox_key(&self.inner.agent_master_key, id)
    }

    /// Resolves a request against the defaults and the limits in config.
    pub fn resolve_spec(&self, req: &CreateRequest) -> Result<Spec> {
        let d = &self.inner.config.sandbox;
        let spec = Spec {
            image: req.image.clone().unwrap_or_else(|| d.image.clone()),
            memory_bytes: req.memory_bytes.unwrap_or(d.memory_bytes),
            cpu_millis: req.cpu_millis.unwrap_or(d.cpu_millis),
            pids: req.pids.unwrap_or(d.pids),
            // A tmpfs workspace is its own limit.
            disk_bytes: match d.workspace_tmpfs_bytes {
                0 => req.disk_bytes.unwrap_or(d.disk_bytes),
                _ => 0,
            },
            network: match req.network {
                Some(n) => n,
                None => Network::from_str(&d.network).map_err(Error::Invalid)?,
            },
            env: req.env.clone(),
            labels: req.labels.clone(),
        };
        let bound = |name: &str, v: u64, min: u64, max: u64| {
            if v < min || v > max {
                Err(Error::Invalid(format!(
                    "{name} must be between {min} and {max}, got {v}"
                )))
            } else {
                Ok(())
            }
        };
        bound(
            "limits.memory_bytes",
            spec.memory_bytes,
            16 << 20,
            d.max_memory_bytes,
        )?;
        bound("limits.cpu_millis", spec.cpu_millis, 10, d.max_cpu_millis)?;
        bound("limits.pids", spec.pids, 8, d.max_pids)?;
        if spec.disk_bytes != 0 || req.disk_bytes.is_some() {
            bound(
                "limits.disk_bytes",
                spec.disk_bytes,
                16 << 20,
                d.max_disk_bytes,
            )?;
        }
        if spec.network == Network::Bridge && !d.allow_network {
            return Err(Error::FailedPrecondition(
                "this server does not allow sandboxes with a network (sandbox.allow_network)"
                    .into(),
            ));
        }
        Ok(spec)
    }

    /// Creates a sandbox for `principal`: from a warm pool when one matches,
    /// otherwise cold; answers once its agent is healthy (and its snapshot,
    /// if any, restored).
    pub async fn create(&self, principal: &Principal, req: CreateRequest) -> Result<SandboxRecord> {
        principal.require_write().map_err(denied)?;
        let spec = self.resolve_spec(&req)?;
        // Counted where a sandbox is handed over or recorded, in the same
        // statement (see `build`).
        let max_owned = self.inner.config.sandbox.max_per_owner;
        let snapshot = match &req.from_snapshot {
            Some(id) => Some(self.visible_snapshot(principal, id).await?),
            None => None,
        };
        let now = crate::clock::now_ms();
        let d = &self.inner.config.sandbox;
        let ttl = if req.ttl_secs > 0 {
            req.ttl_secs
        } else {
            d.ttl_secs
        };
        let idle = if req.idle_timeout_secs > 0 {
            req.idle_timeout_secs
        } else {
            d.idle_timeout_secs
        };
        let expires = if ttl > 0 {
            now + (ttl as i64) * 1000
        } else {
            0
        };
        if snapshot.is_none() {
            if let Some(rec) = self
                .claim_warm(&spec, &principal.owner, expires, idle, now, max_owned)
                .await?
            {
                return Ok(rec);
            }
        }
        let record = SandboxRecord {
            id: format!("sb-{}", crate::ids::random_hex(6)),
            owner: Some(principal.owner.clone()),
            state: SandboxState::Creating,
            spec,
            container_id: String::new(),
            created_unix_ms: now,
            expires_unix_ms: expires,
            idle_timeout_secs: idle,
            last_active_unix_ms: now,
            from_snapshot: snapshot.as_ref().map(|s| s.id.clone()).unwrap_or_default(),
            pool_profile: String::new(),
            failure: String::new(),
        };
        self.build(record, snapshot.as_ref(), &principal.owner, max_owned)
            .await
    }

    /// Inserts the record, starts the container, waits for the agent and
    /// restores the snapshot. On any failure nothing is left behind.
    ///
    /// The record goes in first, only while its owner has fewer than
    /// `max_owned` sandboxes (0: no limit), counted in the insert itself:
    /// a sandbox being made counts from then on, so creates racing each
    /// other cannot pass `sandbox.max_per_owner`. Only then does it wait
    /// its turn for the runtime (`docker.max_concurrent_creates`).
    async fn build(
        &self,
        mut record: SandboxRecord,
        snapshot: Option<&SnapshotRecord>,
        owner_label: &str,
        max_owned: u64,
    ) -> Result<SandboxRecord> {
        let id = record.id.clone();
        // Marked before the record exists: the sweep must never take it for
        // one whose creation was interrupted.
        self.inner.creating.lock().expect("lock").insert(id.clone());
        let inserted = match self.inner.store.insert_sandbox(&record, max_owned).await {
            Ok(true) => Ok(()),
            Ok(false) => Err(Error::Exhausted(format!(
                "owner {} already has {max_owned} sandboxes, counting those being created \
                 (sandbox.max_per_owner); delete one first",
                record.owner.as_deref().unwrap_or_default()
            ))),
            Err(e) => Err(Error::Store(e)),
        };
        if let Err(e) = inserted {
            self.inner.creating.lock().expect("lock").remove(&id);
            return Err(e);
        }
        let result = async {
            let _permit = self
                .inner
                .create_permits
                .acquire()
                .await
                .map_err(|_| Error::FailedPrecondition("shutting down".into()))?;
            let (_counted, in_flight) = InFlight::start(&self.inner.creates_in_flight);
            tracing::debug!(
                sandbox = %id,
                in_flight,
                max = self.inner.config.docker.max_concurrent_creates.max(1),
                "container create started"
            );
            let dir = self.socket_dir(&id);
            // The agent runs as the sandbox user and creates its socket here.
            agents::open_socket_dir(&dir)?;
            let d = &self.inner.config.sandbox;
            let workspace_mount = match record.spec.disk_bytes {
                0 => None,
                bytes => {
                    let (uid, gid) = crate::config::parse_user(&d.user).unwrap_or((1000, 1000));
                    Some(self.inner.disks.create(&id, bytes, uid, gid).await?)
                }
            };
            let container_id = self
                .inner
                .runtime
                .create(&ContainerSpec {
                    workspace_mount,
                    sandbox_id: id.clone(),
                    image: record.spec.image.clone(),
                    user: d.user.clone(),
                    memory_bytes: record.spec.memory_bytes,
                    cpu_millis: record.spec.cpu_millis,
                    pids: record.spec.pids,
                    tmp_bytes: d.tmp_bytes,
                    workspace_tmpfs_bytes: d.workspace_tmpfs_bytes,
                    network: record.spec.network,
                    socket_dir: dir.clone(),
                    agent_key: hex::encode(self.agent_key(&id)),
                    inject_agent: d.inject_agent.clone(),
                    owner_label: owner_label.to_string(),
                })
                .await?;
            self.inner.store.set_container(&id, &container_id).await?;
            record.container_id = container_id;
            self.wait_ready(&id).await?;
            if let Some(snap) = snapshot {
                self.restore(&id, snap).await?;
            }
            self.inner
                .store
                .set_sandbox_state(&id, SandboxState::Ready, "")
                .await?;
            record.state = SandboxState::Ready;
            Ok(())
        }
        .await;
        self.inner.creating.lock().expect("lock").remove(&id);
        match result {
            Ok(()) => Ok(record),
            Err(e) => {
                self.destroy_logged(&id).await;
                Err(e)
            }
        }
    }

    /// Polls the agent's health check until it proves its identity and
    /// answers SERVING, watching the container so one that died is reported
    /// at once, with its logs. Then locks the socket directory.
    async fn wait_ready(&self, id: &str) -> Result<()> {
        let dir = self.socket_dir(id);
        let socket = dir.join(agents::SOCKET_NAME);
        let key = self.agent_key(id);
        let deadline = Instant::now()
            + Duration::from_secs(self.inner.config.sandbox.ready_timeout_secs.max(1));
        let mut polls = 0u32;
        loop {
            if socket.exists() && agents::serving(&dir, &key).await {
                agents::lock_socket_dir(&dir)?;
                return Ok(());
            }
            polls += 1;
            if polls.is_multiple_of(20) {
                let status = self.inner.runtime.status(id).await?;
                if !status.is_some_and(|s| s.running) {
                    let logs = self.inner.runtime.logs(id).await;
                    return Err(Error::NotReady {
                        id: id.into(),
                        reason: format!("the container exited; its last output: {logs:?}"),
                    });
                }
            }
            if Instant::now() >= deadline {
                let logs = self.inner.runtime.logs(id).await;
                return Err(Error::NotReady {
                    id: id.into(),
                    reason: format!(
                        "no healthy agent within {} s; container output: {logs:?}",
                        self.inner.config.sandbox.ready_timeout_secs
                    ),
                });
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn restore(&self, id: &str, snap: &SnapshotRecord) -> Result<()> {
        use tokio::io::AsyncReadExt;
        let mut file = tokio::fs::File::open(self.inner.artifacts.path(&snap.sha256)).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let _ = tx
            .send(agent_pb::RestoreRequest {
                request: Some(agent_pb::restore_request::Request::Header(
                    agent_pb::RestoreHeader {
                        path: String::new(),
                        compression: agent_pb::Compression::Unspecified as i32,
                    },
                )),
            })
            .await;
        let reader = tokio::spawn(async move {
            loop {
                let mut buf = vec![0u8; 1 << 20];
                let n = file.read(&mut buf).await?;
                if n == 0 {
                    return Ok::<(), std::io::Error>(());
                }
                buf.truncate(n);
                let msg = agent_pb::RestoreRequest {
                    request: Some(agent_pb::restore_request::Request::Data(buf.into())),
                };
                if tx.send(msg).await.is_err() {
                    return Ok(());
                }
            }
        });
        let mut agent = self.agent(id);
        let answer = agent
            .restore(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await;
        reader
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))??;
        answer.map_err(Error::Agent)?;
        Ok(())
    }

    /// Removes container, volume, socket directory and record, in that
    /// order: the record goes only once the container is gone.
    async fn destroy(&self, id: &str) -> Result<()> {
        self.inner.agents.lock().expect("lock").remove(id);
        self.inner.runtime.remove(id).await?;
        // Only once the container is gone: it would keep the filesystem.
        self.inner.disks.remove(id).await?;
        let _ = std::fs::remove_dir_all(self.socket_dir(id));
        self.inner.store.delete_sandbox(id).await?;
        Ok(())
    }

    /// [`Self::destroy`] where nobody waits for the answer: a failure is
    /// logged and the next sweep tries again.
    async fn destroy_logged(&self, id: &str) {
        if let Err(e) = self.destroy(id).await {
            tracing::warn!(sandbox = id, "removing the sandbox: {e}");
        }
    }

    /// The record, when `principal` may see it; NOT_FOUND otherwise, the same
    /// answer as for an id that does not exist.
    pub async fn get(&self, principal: &Principal, id: &str) -> Result<SandboxRecord> {
        match self.inner.store.sandbox(id).await? {
            Some(r) if principal.sees(r.owner.as_deref()) => Ok(self.with_activity(r)),
            _ => Err(Error::NotFound(id.into())),
        }
    }

    fn with_activity(&self, mut r: SandboxRecord) -> SandboxRecord {
        if let Some(t) = self.inner.activity.lock().expect("lock").get(&r.id) {
            r.last_active_unix_ms = r.last_active_unix_ms.max(*t);
        }
        r
    }

    pub async fn list(
        &self,
        principal: &Principal,
        labels: &BTreeMap<String, String>,
    ) -> Result<Vec<SandboxRecord>> {
        let owner = match principal.sees(None) {
            true => None,
            false => Some(principal.owner.as_str()),
        };
        Ok(self
            .inner
            .store
            .sandboxes(owner)
            .await?
            .into_iter()
            // Unclaimed pool sandboxes are nobody's.
            .filter(|r| r.owner.is_some())
            .filter(|r| labels.iter().all(|(k, v)| r.spec.labels.get(k) == Some(v)))
            .map(|r| self.with_activity(r))
            .collect())
    }

    pub async fn delete(&self, principal: &Principal, id: &str) -> Result<()> {
        principal.require_write().map_err(denied)?;
        let r = self.get(principal, id).await?;
        if r.state == SandboxState::Creating {
            return Err(Error::FailedPrecondition(format!(
                "sandbox {id} is still being created"
            )));
        }
        self.destroy(id).await
    }

    pub async fn pause(&self, principal: &Principal, id: &str) -> Result<SandboxRecord> {
        principal.require_write().map_err(denied)?;
        let r = self.get(principal, id).await?;
        match r.state {
            SandboxState::Paused => return Ok(r),
            SandboxState::Ready => {}
            s => {
                return Err(Error::FailedPrecondition(format!(
                    "sandbox {id} is {} and cannot be paused",
                    s.as_str()
                )))
            }
        }
        self.inner.runtime.pause(id).await?;
        self.inner
            .store
            .set_sandbox_state(id, SandboxState::Paused, "")
            .await?;
        self.get(principal, id).await
    }

    pub async fn resume(&self, principal: &Principal, id: &str) -> Result<SandboxRecord> {
        principal.require_write().map_err(denied)?;
        let r = self.get(principal, id).await?;
        match r.state {
            SandboxState::Ready => return Ok(r),
            SandboxState::Paused => {}
            s => {
                return Err(Error::FailedPrecondition(format!(
                    "sandbox {id} is {} and cannot be resumed",
                    s.as_str()
                )))
            }
        }
        self.inner.runtime.resume(id).await?;
        self.inner
            .store
            .set_sandbox_state(id, SandboxState::Ready, "")
            .await?;
        self.touch(id);
        self.get(principal, id).await
    }

    /// The record of a sandbox `principal` may use now (ready, and not an
    /// auditor), and a client for its agent.
    pub async fn usable(&self, principal: &Principal, id: &str) -> Result<(SandboxRecord, Agent)> {
        principal.require_write().map_err(denied)?;
        let r = self.get(principal, id).await?;
        match r.state {
            SandboxState::Ready => {}
            SandboxState::Paused => {
                return Err(Error::FailedPrecondition(format!(
                    "sandbox {id} is paused; resume it first"
                )))
            }
            SandboxState::Creating => {
                return Err(Error::FailedPrecondition(format!(
                    "sandbox {id} is still being created"
                )))
            }
            SandboxState::Failed => {
                return Err(Error::FailedPrecondition(format!(
                    "sandbox {id} failed: {}",
                    r.failure
                )))
            }
        }
        self.touch(id);
        Ok((r, self.agent(id)))
    }

    /// A client for the sandbox's agent (connected lazily, reused).
    pub fn agent(&self, id: &str) -> Agent {
        let mut agents = self.inner.agents.lock().expect("lock");
        agents
            .entry(id.to_string())
            .or_insert_with(|| agents::connect(self.socket_dir(id), self.agent_key(id)))
            .clone()
    }

    /// Notes activity (resets the idle timeout); written to the store by the sweep.
    pub fn touch(&self, id: &str) {
        self.inner
            .activity
            .lock()
            .expect("lock")
            .insert(id.to_string(), crate::clock::now_ms());
    }

    /// Counts an open exec stream; the sandbox is not idle while it lasts.
    pub fn stream_guard(&self, id: &str) -> StreamGuard<R> {
        *self
            .inner
            .streams
            .lock()
            .expect("lock")
            .entry(id.to_string())
            .or_default() += 1;
        StreamGuard {
            sandboxes: self.clone(),
            id: id.to_string(),
        }
    }

    // ------------------------------------------------------------ snapshots

    pub async fn visible_snapshot(
        &self,
        principal: &Principal,
        id: &str,
    ) -> Result<SnapshotRecord> {
        match self.inner.store.snapshot(id).await? {
            Some(s) if principal.sees(Some(&s.owner)) => Ok(s),
            _ => Err(Error::SnapshotNotFound(id.into())),
        }
    }

    /// Streams the agent's archive of `path` into a content-addressed artifact
    /// and records a snapshot of it for the sandbox's owner.
    pub async fn snapshot(
        &self,
        principal: &Principal,
        id: &str,
        path: String,
        exclude: Vec<String>,
        compression: agent_pb::Compression,
    ) -> Result<SnapshotRecord> {
        let (record, mut agent) = self.usable(principal, id).await?;
        let stream = agent
            .snapshot(agent_pb::SnapshotRequest {
                path,
                exclude,
                compression: compression as i32,
                level: 0,
            })
            .await
            .map_err(Error::Agent)?
            .into_inner();
        use futures::StreamExt;
        let chunks = stream.map(|c| c.map(|c| c.data).map_err(Error::Agent));
        let stored = self.inner.artifacts.store(chunks).await?;
        let snap = SnapshotRecord {
            id: format!("snap-{}", crate::ids::random_hex(6)),
            owner: record.owner.clone().unwrap_or_default(),
            sandbox_id: id.to_string(),
            sha256: stored.sha256,
            size_bytes: stored.size,
            compression: match compression {
                agent_pb::Compression::None => "none",
                _ => "zstd",
            }
            .into(),
            created_unix_ms: crate::clock::now_ms(),
        };
        self.inner.store.insert_snapshot(&snap).await?;
        Ok(snap)
    }

    pub async fn delete_snapshot(&self, principal: &Principal, id: &str) -> Result<()> {
        principal.require_write().map_err(denied)?;
        self.visible_snapshot(principal, id).await?;
        self.inner.store.delete_snapshot(id).await?;
        self.collect_artifacts().await?;
        Ok(())
    }

    /// Snapshot of the whole workspace, then a new sandbox from it with the
    /// source's spec.
    pub async fn fork(
        &self,
        principal: &Principal,
        id: &str,
        ttl_secs: u64,
        labels: BTreeMap<String, String>,
    ) -> Result<SandboxRecord> {
        let source = self.get(principal, id).await?;
        let snap = self
            .snapshot(
                principal,
                id,
                String::new(),
                Vec::new(),
                agent_pb::Compression::Zstd,
            )
            .await?;
        // The source's own labels, but never the control plane's (a fork
        // of a run's sandbox is not that run's).
        let mut merged: BTreeMap<String, String> = source
            .spec
            .labels
            .iter()
            .filter(|(k, _)| !k.starts_with(RESERVED_LABEL_PREFIX))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        merged.extend(labels);
        let req = CreateRequest {
            image: Some(source.spec.image.clone()),
            memory_bytes: Some(source.spec.memory_bytes),
            cpu_millis: Some(source.spec.cpu_millis),
            pids: Some(source.spec.pids),
            disk_bytes: Some(source.spec.disk_bytes).filter(|d| *d > 0),
            network: Some(source.spec.network),
            env: source.spec.env.clone(),
            labels: merged,
            ttl_secs,
            idle_timeout_secs: source.idle_timeout_secs,
            from_snapshot: Some(snap.id),
        };
        self.create(principal, req).await
    }

    async fn collect_artifacts(&self) -> Result<()> {
        let referenced = self.inner.store.referenced_digests().await?;
        let removed = self.inner.artifacts.gc(&referenced)?;
        if removed > 0 {
            tracing::info!(removed, "removed unreferenced artifacts");
        }
        Ok(())
    }
}

/// One create counted in `creates_in_flight` for as long as it lives.
struct InFlight<'a>(&'a AtomicUsize);

impl<'a> InFlight<'a> {
    /// Counts one more create; answers the guard and the count with it.
    fn start(count: &'a AtomicUsize) -> (Self, usize) {
        let now = count.fetch_add(1, Ordering::SeqCst) + 1;
        (Self(count), now)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// See [`Sandboxes::stream_guard`].
pub struct StreamGuard<R: Runtime> {
    sandboxes: Sandboxes<R>,
    id: String,
}

impl<R: Runtime> Drop for StreamGuard<R> {
    fn drop(&mut self) {
        self.sandboxes.touch(&self.id);
        let mut streams = self.sandboxes.inner.streams.lock().expect("lock");
        if let Some(n) = streams.get_mut(&self.id) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                streams.remove(&self.id);
            }
        }
    }
}

fn denied(s: tonic::Status) -> Error {
    Error::PermissionDenied(s.message().to_string())
}

fn set_mode(path: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}
