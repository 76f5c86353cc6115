//! What a run leaves: each path the job names, archived from its sandbox
//! into a stored snapshot once every step is done, and recorded before the
//! next (a path already recorded is not archived again).

use super::{Result, Run, Runner};
use crate::host::Host;
use crate::runs::events::{Event, RunState};
use crate::runs::store::EventStore;

impl<H: Host, S: EventStore> Runner<H, S> {
    /// Collects the job's artifacts not collected yet. Ok(false): one could
    /// not be, and the run has ended saying which.
    pub(super) async fn collect_artifacts(
        &self,
        run: &mut Run<'_>,
        sandbox_id: &str,
    ) -> Result<bool> {
        for path in run.view.job.artifacts.clone() {
            if run.view.artifacts.iter().any(|a| a.path == path) {
                continue;
            }
            let snapshot = self
                .inner
                .host
                .snapshot_artifact(run.principal, sandbox_id, &path)
                .await;
            match snapshot {
                Ok(snap) => {
                    self.record(
                        run.id,
                        run.view,
                        Event::ArtifactCollected {
                            path,
                            snapshot_id: snap.id,
                            sha256: snap.sha256,
                            size_bytes: snap.size_bytes,
                        },
                    )
                    .await?
                }
                Err(e) => {
                    self.finish(
                        run.id,
                        run.view,
                        RunState::Failed,
                        format!("collecting artifact {path}: {e}"),
                    )
                    .await?;
                    return Ok(false);
                }
            }
        }
        Ok(true)
    }
}
