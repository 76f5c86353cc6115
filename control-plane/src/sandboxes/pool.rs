//! Warm pools: sandboxes made ahead of time for each configured profile
//! ([`PoolProfile`]), claimed whole by a create whose spec is the same
//! machine, and refilled in the background.

use std::collections::BTreeMap;
use std::str::FromStr;

use super::spec::{Network, SandboxState, Spec};
use super::store::{Claim, SandboxRecord};
use super::{Result, Sandboxes};
use crate::config::PoolProfile;
use crate::runtime::Runtime;

impl<R: Runtime> Sandboxes<R> {
    fn profile_spec(&self, p: &PoolProfile) -> Spec {
        let d = &self.inner.config.sandbox;
        let or = |v: u64, dv: u64| if v == 0 { dv } else { v };
        Spec {
            image: if p.image.is_empty() {
                d.image.clone()
            } else {
                p.image.clone()
            },
            memory_bytes: or(p.memory_bytes, d.memory_bytes),
            cpu_millis: or(p.cpu_millis, d.cpu_millis),
            pids: or(p.pids, d.pids),
            disk_bytes: match d.workspace_tmpfs_bytes {
                0 => or(p.disk_bytes, d.disk_bytes),
                _ => 0,
            },
            network: Network::from_str(if p.network.is_empty() {
                &d.network
            } else {
                &p.network
            })
            .unwrap_or(Network::None),
            env: BTreeMap::new(),
            labels: BTreeMap::new(),
        }
    }

    /// Hands a ready sandbox of a warm pool whose profile is the same
    /// machine as `spec` to `owner`, with `spec`'s env and labels; None when
    /// no pool has one ready, or `owner` already has `max_owned` sandboxes
    /// (0: no limit; the cold create that follows says so).
    pub(super) async fn claim_warm(
        &self,
        spec: &Spec,
        owner: &str,
        expires: i64,
        idle: u64,
        now: i64,
        max_owned: u64,
    ) -> Result<Option<SandboxRecord>> {
        for p in &self.inner.config.pool {
            if p.size == 0 || !self.profile_spec(p).same_machine(spec) {
                continue;
            }
            let claim = Claim {
                spec,
                expires_unix_ms: expires,
                idle_timeout_secs: idle,
                now,
                max_owned,
            };
            if let Some(rec) = self
                .inner
                .store
                .claim_pooled(&p.name, owner, &claim)
                .await?
            {
                self.inner.pool_wake.notify_one();
                return Ok(Some(rec));
            }
        }
        Ok(None)
    }

    /// Creates what each warm pool lacks, at most `max_concurrent_creates` at a time.
    pub async fn refill_pools(&self) -> Result<()> {
        let mut tasks = tokio::task::JoinSet::new();
        for p in self.inner.config.pool.clone() {
            let have = self.inner.store.pooled_count(&p.name).await?;
            for _ in have..p.size {
                let this = self.clone();
                let spec = self.profile_spec(&p);
                let name = p.name.clone();
                tasks.spawn(async move {
                    let now = crate::clock::now_ms();
                    let record = SandboxRecord {
                        id: format!("sb-{}", crate::ids::random_hex(6)),
                        owner: None,
                        state: SandboxState::Creating,
                        spec,
                        container_id: String::new(),
                        created_unix_ms: now,
                        expires_unix_ms: 0,
                        idle_timeout_secs: 0,
                        last_active_unix_ms: now,
                        from_snapshot: String::new(),
                        pool_profile: name.clone(),
                        failure: String::new(),
                    };
                    match this.build(record, None, &format!("pool:{name}"), 0).await {
                        Ok(r) => {
                            tracing::info!(pool = %name, sandbox = %r.id, "warm pool sandbox ready")
                        }
                        Err(e) => tracing::warn!(pool = %name, "warm pool sandbox: {e}"),
                    }
                });
            }
        }
        while tasks.join_next().await.is_some() {}
        Ok(())
    }
}
