//! Runs: jobs executed in sandboxes, recorded as an append-only event log.
//!
//! `job` is what a run executes, `events` what happens to it and the state
//! that folds from them, `store` where the events live, `queue` who runs
//! next, and `executor` what drives a run from its log (docs/recovery.md).
//! `sealed` keeps secrets encrypted at rest and `redact` keeps them out of
//! recorded output.

pub mod events;
pub mod executor;
pub mod job;
pub mod queue;
pub mod redact;
pub mod sealed;
pub mod store;
