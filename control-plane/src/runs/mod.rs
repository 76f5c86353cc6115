//! Runs: jobs executed in sandboxes, recorded as an append-only event log.
//!
//! Built so far: the job (validation and the YAML job file), the events and
//! the state they fold into, and the event store. The executor, recovery and
//! the `Runs` service follow.

pub mod events;
pub mod executor;
pub mod job;
pub mod store;
