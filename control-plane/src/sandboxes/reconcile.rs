//! Records and containers brought into line: at start (re-adopting what a
//! previous run left), every `sweep_interval_secs` (orphans removed, expired
//! and idle sandboxes deleted), and as containers exit (their sandbox marked
//! failed at once).

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use super::spec::SandboxState;
use super::{Result, Sandboxes};
use crate::agents;
use crate::runtime::{self, Runtime};

impl<R: Runtime> Sandboxes<R> {
    /// Brings records and containers into line. Run at start (re-adoption
    /// after a crash) and every `sweep_interval_secs`.
    pub async fn reconcile(&self) -> Result<()> {
        self.flush_activity().await?;
        let containers = self.inner.runtime.list().await?;
        let records = self.inner.store.sandboxes(None).await?;
        let known: HashSet<&str> = records.iter().map(|r| r.id.as_str()).collect();
        let creating = self.inner.creating.lock().expect("lock").clone();
        for c in &containers {
            if !known.contains(c.sandbox_id.as_str()) && !creating.contains(&c.sandbox_id) {
                tracing::info!(sandbox = %c.sandbox_id, container = %c.container_id, "removing an orphan container");
                if let Err(e) = self.inner.runtime.remove_orphan(c).await {
                    tracing::warn!(sandbox = %c.sandbox_id, "removing an orphan: {e}");
                }
                let _ = std::fs::remove_dir_all(self.socket_dir(&c.sandbox_id));
            }
        }
        // Filesystems and volumes whose sandbox is gone (a crash between
        // removing the container and its disk, or before the record was
        // written; a container removed without its volume).
        let live: HashSet<&str> = containers.iter().map(|c| c.sandbox_id.as_str()).collect();
        let disks = self.inner.disks.ids().unwrap_or_else(|e| {
            tracing::warn!("listing sandbox disks: {e}");
            Vec::new()
        });
        for id in disks {
            if known.contains(id.as_str()) || !self.owns_nothing(&id, &live).await? {
                continue;
            }
            tracing::info!(sandbox = %id, "removing an orphan disk");
            if let Err(e) = self.inner.disks.remove(&id).await {
                tracing::warn!(sandbox = %id, "removing an orphan disk: {e}");
            }
        }
        let volumes = self.inner.runtime.volumes().await.unwrap_or_else(|e| {
            tracing::warn!("listing workspace volumes: {e}");
            Vec::new()
        });
        for id in volumes {
            if known.contains(id.as_str()) || !self.owns_nothing(&id, &live).await? {
                continue;
            }
            tracing::info!(sandbox = %id, "removing an orphan workspace volume");
            if let Err(e) = self.inner.runtime.remove(&id).await {
                tracing::warn!(sandbox = %id, "removing an orphan workspace volume: {e}");
            }
        }
        let by_id: HashMap<&str, _> = containers
            .iter()
            .map(|c| (c.sandbox_id.as_str(), c))
            .collect();
        let now = crate::clock::now_ms();
        for r in records {
            if creating.contains(&r.id) {
                continue;
            }
            let container = by_id.get(r.id.as_str());
            match r.state {
                // Left half-made by a crash: nobody is waiting for it.
                SandboxState::Creating => {
                    // `r` was read before `creating` was copied: a create of
                    // this process that finished in between reads `ready`
                    // now, and is not this sweep's to remove.
                    if !self.still_creating_and_abandoned(&r.id).await? {
                        continue;
                    }
                    tracing::info!(sandbox = %r.id, "removing a sandbox whose creation was interrupted");
                    self.destroy_logged(&r.id).await;
                    continue;
                }
                SandboxState::Ready | SandboxState::Paused => match container {
                    // The containers were listed before the records were
                    // read: one made by a create that finished in between
                    // is missing from the list, so ask again.
                    None if self.inner.runtime.status(&r.id).await?.is_some() => continue,
                    None => {
                        self.inner
                            .store
                            .set_sandbox_state(&r.id, SandboxState::Failed, "its container is gone")
                            .await?;
                        continue;
                    }
                    Some(c) if !c.running => {
                        tracing::info!(sandbox = %r.id, "starting a stopped sandbox again");
                        let restarted = async {
                            agents::open_socket_dir(&self.socket_dir(&r.id))?;
                            // After a host restart the image is not mounted.
                            if r.spec.disk_bytes > 0 {
                                self.inner.disks.mount(&r.id).await?;
                            }
                            self.inner.runtime.restart(&r.id).await?;
                            self.wait_ready(&r.id).await
                        }
                        .await;
                        if let Err(e) = restarted {
                            self.inner
                                .store
                                .set_sandbox_state(&r.id, SandboxState::Failed, &e.to_string())
                                .await?;
                            continue;
                        }
                    }
                    Some(c) => {
                        // A crash between opening the directory for a
                        // restarted agent and locking it again leaves it open.
                        if let Err(e) = agents::lock_socket_dir(&self.socket_dir(&r.id)) {
                            tracing::warn!(sandbox = %r.id, "locking its socket directory: {e}");
                        }
                        let state = if c.paused {
                            SandboxState::Paused
                        } else {
                            SandboxState::Ready
                        };
                        if state != r.state {
                            self.inner.store.set_sandbox_state(&r.id, state, "").await?;
                        }
                    }
                },
                SandboxState::Failed => {}
            }
            if r.owner.is_none() {
                continue;
            }
            let expired = r.expires_unix_ms != 0 && now >= r.expires_unix_ms;
            let busy = self
                .inner
                .streams
                .lock()
                .expect("lock")
                .get(&r.id)
                .copied()
                .unwrap_or(0)
                > 0;
            let idle = r.idle_timeout_secs > 0
                && !busy
                && now - r.last_active_unix_ms >= (r.idle_timeout_secs as i64) * 1000;
            if expired || idle {
                tracing::info!(sandbox = %r.id, expired, idle, "deleting a sandbox past its time");
                self.destroy_logged(&r.id).await;
            }
        }
        self.collect_artifacts().await?;
        Ok(())
    }

    /// Whether something named for sandbox `id` (a disk, a volume) belongs
    /// to none: no container, no creation under way and no record, the last
    /// two read now rather than from the sweep's snapshot, which a create
    /// begun since would miss.
    async fn owns_nothing(&self, id: &str, live: &HashSet<&str>) -> Result<bool> {
        Ok(!live.contains(id)
            && !self.inner.creating.lock().expect("lock").contains(id)
            && self.inner.store.sandbox(id).await?.is_none())
    }

    /// Whether sandbox `id` is still recorded `creating` with no create of
    /// this process under way: a creation a crash interrupted. The set is
    /// checked before the record is read again, and a create puts its id in
    /// the set before its record and takes it out only after the record's
    /// final state, so a create that finished meanwhile cannot be mistaken
    /// for one.
    async fn still_creating_and_abandoned(&self, id: &str) -> Result<bool> {
        if self.inner.creating.lock().expect("lock").contains(id) {
            return Ok(false);
        }
        Ok(matches!(
            self.inner.store.sandbox(id).await?,
            Some(r) if r.state == SandboxState::Creating
        ))
    }

    async fn flush_activity(&self) -> Result<()> {
        let pending: Vec<(String, i64)> =
            self.inner.activity.lock().expect("lock").drain().collect();
        for (id, t) in pending {
            self.inner.store.touch_sandbox(&id, t).await?;
        }
        Ok(())
    }

    /// Marks a sandbox `failed` the moment its container stops on its own
    /// (its agent is gone: every call would fail), with why, so that `Get`
    /// and every call say so at once instead of after the next sweep. Runs
    /// until `shutdown`; a broken event stream is opened again.
    pub async fn watch_exits(&self, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        use futures::StreamExt;
        loop {
            let mut exits = std::pin::pin!(self.inner.runtime.exits());
            loop {
                let exit = tokio::select! {
                    e = exits.next() => e,
                    _ = shutdown.changed() => return,
                };
                let Some(exit) = exit else { break };
                if let Err(e) = self.agent_gone(&exit).await {
                    tracing::warn!(sandbox = %exit.sandbox_id, "recording a stopped sandbox: {e}");
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    async fn agent_gone(&self, exit: &runtime::Exit) -> Result<()> {
        let id = &exit.sandbox_id;
        // Being created (its wait for readiness reports it) or restarted
        // by the sweep: not this watcher's to judge.
        if self.inner.creating.lock().expect("lock").contains(id) {
            return Ok(());
        }
        let Some(record) = self.inner.store.sandbox(id).await? else {
            return Ok(());
        };
        if !matches!(record.state, SandboxState::Ready | SandboxState::Paused) {
            return Ok(());
        }
        // A graceful stop from outside (`docker stop`, the daemon or host
        // shutting down): the sweep, or the next start, starts it again.
        if exit.exit_code == "0" {
            return Ok(());
        }
        // A delete under way also stops the container: the record goes next.
        if self.inner.runtime.status(id).await?.is_none() {
            return Ok(());
        }
        self.inner.agents.lock().expect("lock").remove(id);
        let code = match exit.exit_code.as_str() {
            "" => String::new(),
            c => format!(" with code {c}"),
        };
        let reason = format!(
            "its agent stopped (the container exited{code}); the sandbox cannot be used any more: delete it"
        );
        tracing::warn!(sandbox = %id, "{reason}");
        self.inner
            .store
            .set_sandbox_state(id, SandboxState::Failed, &reason)
            .await?;
        Ok(())
    }

    /// Keeps the pools full and runs [`Self::reconcile`] every
    /// `sweep_interval_secs` (and after each pool claim) until `shutdown`
    /// fires. The caller reconciles once before serving.
    pub async fn maintain(&self, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let every = Duration::from_secs(self.inner.config.sweep_interval_secs);
        loop {
            if let Err(e) = self.refill_pools().await {
                tracing::warn!("warm pool refill: {e}");
            }
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = self.inner.pool_wake.notified() => {}
                _ = shutdown.changed() => return,
            }
            if let Err(e) = self.reconcile().await {
                tracing::warn!("sandbox sweep: {e}");
            }
        }
    }
}
