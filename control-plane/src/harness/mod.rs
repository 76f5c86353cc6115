//! The agent harness: sessions whose work is a goal, driven by a model that
//! decides and tools that act, every step guarded and on the run's log
//! (docs/harness.md).
//!
//! So far it holds the model providers ([`providers`]): the operator's
//! `[[model]]` entries spoken to in their own wire formats over HTTP.

pub mod providers;
