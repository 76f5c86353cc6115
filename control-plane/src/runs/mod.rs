//! Runs: jobs executed in sandboxes, recorded as an append-only event log.
//!
//! Built so far: the job (validation and the YAML job file). The event
//! store, the executor, recovery and the `Runs` service follow.

pub mod job;
