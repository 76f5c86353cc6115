//! Policy: every action a principal asks for is a Cedar request checked
//! against the policy set in force. The outcome is `deny` (a `forbid`
//! matches, or no `permit` does), `require_approval` (a matching `permit`
//! carries `@approval("why")`), or `allow`. The schema and the default
//! policies live in `deploy/policies/`; the set in force is versioned, and
//! the version goes with every decision.
//!
//! `vocabulary` has the actions, resources and facts and turns a request
//! into Cedar's; `engine` decides; `slicing` leaves out the policies a
//! principal cannot satisfy; `store` keeps the versions. Here,
//! [`Policies`]: the engine and the stored versions, changed together.

mod engine;
mod slicing;
mod store;
mod vocabulary;

use std::sync::Arc;

pub use engine::{Decision, Engine, Problem, Verdict};
pub use store::{PolicyStore, Stored};
pub use vocabulary::{Action, Facts, Resource, ResourceKind, DEFAULT_POLICIES, SCHEMA};

/// Why a policy change was not made.
#[derive(Debug)]
pub enum Refusal {
    Invalid(Vec<Problem>),
    /// `expected_version` is not the version in force.
    Changed {
        in_force: u64,
        expected: u64,
    },
    /// Another change was stored at the same time.
    Race,
    Store(sqlx::Error),
}

/// The engine and the stored versions, changed together.
#[derive(Clone)]
pub struct Policies {
    pub engine: Engine,
    pub store: PolicyStore,
    change: Arc<tokio::sync::Mutex<()>>,
}

impl Policies {
    /// Loads the version in force from the store (the default set on first
    /// start).
    pub async fn load(pool: sqlx::SqlitePool) -> anyhow::Result<Self> {
        let store = PolicyStore::new(pool);
        store.seed_default().await?;
        let in_force = store.current().await?;
        let engine = Engine::new(&in_force.source, in_force.version).map_err(|problems| {
            anyhow::anyhow!(
                "the stored policy set (version {}) does not load: {}",
                in_force.version,
                problems
                    .iter()
                    .map(|p| p.to_string())
                    .collect::<Vec<_>>()
                    .join("; ")
            )
        })?;
        Ok(Self {
            engine,
            store,
            change: Arc::default(),
        })
    }

    /// The stored set in force. Read under the lock a change holds from
    /// storing its version to installing it in the engine, so a version is
    /// never reported before the engine decides by it: whoever sees a new
    /// version here (a client following a policy file) has its next call
    /// decided by it.
    pub async fn in_force(&self) -> Result<Stored, sqlx::Error> {
        let _no_change_half_made = self.change.lock().await;
        self.store.current().await
    }

    /// Validates `source`, stores it as the next version and puts it in
    /// force. `expected_version` 0 accepts whatever is in force.
    pub async fn change(
        &self,
        source: &str,
        set_by: &str,
        expected_version: u64,
    ) -> Result<Stored, Refusal> {
        let policies = self.engine.parse(source).map_err(Refusal::Invalid)?;
        let _one_at_a_time = self.change.lock().await;
        let current = self.store.current().await.map_err(Refusal::Store)?;
        if expected_version != 0 && expected_version != current.version {
            return Err(Refusal::Changed {
                in_force: current.version,
                expected: expected_version,
            });
        }
        let next = Stored {
            version: current.version + 1,
            source: source.to_string(),
            set_by: set_by.to_string(),
            set_unix_ms: crate::clock::now_ms(),
        };
        if !self.store.put(&next).await.map_err(Refusal::Store)? {
            return Err(Refusal::Race);
        }
        self.engine.install(policies, &next.source, next.version);
        tracing::info!(version = next.version, by = %set_by, "policy set changed");
        Ok(next)
    }

    /// Keeps `path` in force: at once, then whenever its content changes.
    pub async fn follow_file(
        self,
        path: std::path::PathBuf,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        let by = format!("file:{}", path.display());
        let mut seen: Option<String> = None;
        loop {
            match std::fs::read_to_string(&path) {
                Ok(text) if seen.as_deref() != Some(text.as_str()) => {
                    let (in_force, _) = self.engine.current();
                    if in_force != text {
                        match self.change(&text, &by, 0).await {
                            Ok(_) => {}
                            Err(Refusal::Invalid(problems)) => {
                                for p in problems {
                                    tracing::error!(
                                        "{}:{p}: policy file not put in force",
                                        path.display()
                                    );
                                }
                            }
                            Err(e) => tracing::error!(
                                "{}: policy file not put in force: {e:?}",
                                path.display()
                            ),
                        }
                    } else {
                        tracing::debug!(
                            "{}: policy file read; it is the set in force",
                            path.display()
                        );
                    }
                    seen = Some(text);
                }
                Ok(_) => {}
                Err(e) => {
                    if seen.is_some() {
                        tracing::warn!("{}: {e}; the policy set in force stays", path.display());
                    }
                    seen = None;
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(std::time::Duration::from_secs(2)) => {}
                _ = stop.changed() => return,
            }
        }
    }
}
