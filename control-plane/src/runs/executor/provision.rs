//! What a run needs before its first step: its secrets, a decision on its
//! network, a sandbox (the recorded one, one made for it before a crash,
//! or a new one), its inputs in that sandbox, and the boot id of the
//! sandbox's agent.

use std::collections::BTreeMap;

use super::{Result, Run, RunSecrets, Runner, RUN_LABEL};
use crate::guard::facts;
use crate::host::{Agent, Host};
use crate::runs::events::{Event, RunState, RunView};
use crate::runs::store::EventStore;
use crate::sandboxes::CreateRequest;

impl<H: Host, S: EventStore> Runner<H, S> {
    /// The run's secret values, or why they cannot be had.
    pub(super) async fn secrets(
        &self,
        run_id: &str,
        view: &RunView,
    ) -> Result<std::result::Result<RunSecrets, String>> {
        if view.job.secret_names.is_empty() {
            return Ok(Ok(RunSecrets::new(BTreeMap::new())));
        }
        let Some(sealed) = self.inner.store.sealed_secrets(run_id).await? else {
            return Ok(Err("the run's secrets are missing from the store".into()));
        };
        Ok(self
            .inner
            .sealer
            .open(run_id, &sealed)
            .map(RunSecrets::new)
            .map_err(|e| e.to_string()))
    }

    /// The run's sandbox: the recorded one, or one made for this run, with
    /// the run's inputs in it and its agent's boot id on the record. None:
    /// the run has ended (refused, or the sandbox could not be had).
    pub(super) async fn provision(&self, run: &mut Run<'_>) -> Result<Option<String>> {
        if let Some(sandbox_id) = &run.view.sandbox_id {
            return Ok(Some(sandbox_id.clone()));
        }
        if run.view.state == RunState::Queued {
            self.record(run.id, run.view, Event::Provisioning).await?;
        }
        // A sandbox this server would refuse fails the run now, before a
        // person is asked to approve its network.
        if let Err(e) = self.inner.host.check_request(&sandbox_request(run)) {
            self.finish(
                run.id,
                run.view,
                RunState::Failed,
                format!("provisioning: {e}"),
            )
            .await?;
            return Ok(None);
        }
        if !self.clear_network(run).await? {
            return Ok(None);
        }
        let Some(sandbox_id) = self.find_or_create_sandbox(run).await? else {
            return Ok(None);
        };
        // Inputs go in before the sandbox is recorded: a crash in between
        // writes them again into the same sandbox, which is harmless.
        if let Err(e) = self.write_inputs(run.view, &sandbox_id).await {
            self.finish(
                run.id,
                run.view,
                RunState::Failed,
                format!("writing inputs: {e}"),
            )
            .await?;
            return Ok(None);
        }
        let Some(agent_boot_id) = self.agent_boot_id(&sandbox_id).await else {
            self.finish(
                run.id,
                run.view,
                RunState::Failed,
                "the sandbox's agent does not answer".into(),
            )
            .await?;
            return Ok(None);
        };
        self.record(
            run.id,
            run.view,
            Event::SandboxAssigned {
                sandbox_id: sandbox_id.clone(),
                agent_boot_id,
            },
        )
        .await?;
        tracing::info!(run = %run.id, sandbox = %sandbox_id, "sandbox assigned");
        Ok(Some(sandbox_id))
    }

    /// A run that asks for the bridge network has it decided first (the
    /// default policies hold it for approval). Ok(false): the run has ended.
    async fn clear_network(&self, run: &mut Run<'_>) -> Result<bool> {
        if run.view.job.network != Some(crate::sandboxes::Network::Bridge) {
            return Ok(true);
        }
        let resource = facts::run(run.id, &run.view.owner);
        let facts = crate::policy::Facts {
            network: "bridge".into(),
            ..facts::job(&run.view.job, run.id)
        };
        self.clear(run, crate::policy::Action::Network, &resource, &facts, None)
            .await
    }

    /// The sandbox made for this run before a restart, or a new one. None:
    /// it could not be made, and the run has ended saying why.
    async fn find_or_create_sandbox(&self, run: &mut Run<'_>) -> Result<Option<String>> {
        // A crash after the sandbox was made and before it was recorded
        // leaves one with this run's label: use it rather than make another.
        let found = self
            .inner
            .host
            .run_sandboxes(run.principal, Some(run.id))
            .await
            .ok()
            .and_then(|l| l.into_iter().next());
        if let Some(s) = found {
            tracing::info!(run = %run.id, sandbox = %s.sandbox_id, "reusing the sandbox made for the run before a restart");
            return Ok(Some(s.sandbox_id));
        }
        tracing::info!(run = %run.id, "creating the run's sandbox");
        let req = sandbox_request(run);
        match self.inner.host.create_sandbox(run.principal, req).await {
            Ok(sandbox_id) => Ok(Some(sandbox_id)),
            Err(e) => {
                self.finish(
                    run.id,
                    run.view,
                    RunState::Failed,
                    format!("provisioning: {e}"),
                )
                .await?;
                Ok(None)
            }
        }
    }

    async fn write_inputs(&self, view: &RunView, sandbox_id: &str) -> anyhow::Result<()> {
        let agent = self.inner.host.agent_of(sandbox_id);
        for f in &view.job.inputs {
            let data = self
                .inner
                .store
                .blob(&f.sha256)
                .await?
                .ok_or_else(|| anyhow::anyhow!("input {} is missing from the store", f.path))?;
            agent.put_file(&f.path, data, f.mode).await?;
        }
        Ok(())
    }

    /// The boot id of the sandbox's agent (random per start of the agent).
    pub(super) async fn agent_boot_id(&self, sandbox_id: &str) -> Option<String> {
        let boot_id = self.inner.host.agent_of(sandbox_id).boot_id().await.ok()?;
        (!boot_id.is_empty()).then_some(boot_id)
    }
}

/// The sandbox a run asks for, labelled as the run's.
fn sandbox_request(run: &Run<'_>) -> CreateRequest {
    let mut labels = run.view.job.labels.clone();
    labels.insert(RUN_LABEL.to_string(), run.id.to_string());
    CreateRequest {
        image: run.view.job.image.clone(),
        memory_bytes: run.view.job.memory_bytes,
        cpu_millis: run.view.job.cpu_millis,
        pids: run.view.job.pids,
        disk_bytes: run.view.job.disk_bytes,
        network: run.view.job.network,
        env: BTreeMap::new(),
        labels,
        ttl_secs: 0,
        idle_timeout_secs: 0,
        from_snapshot: run.view.job.from_snapshot.clone(),
    }
}
