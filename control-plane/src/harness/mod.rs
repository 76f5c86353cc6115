//! The agent harness: sessions whose work is a goal, driven by a model that
//! decides and tools that act, every step guarded and on the run's log
//! (docs/harness.md).
//!
//! So far it holds the model providers ([`providers`]): the operator's
//! `[[model]]` entries spoken to in their own wire formats over HTTP;
//! the tools ([`tools`]): what the model may call, each call validated
//! against its schema and, for a built-in, turned into the action it will
//! be and the policy requests it is; the transcript ([`transcript`]):
//! a session's conversation as entries on its run's log that name only
//! what each turn adds, their contents stored once as blobs, rebuilt after
//! a crash into the very request the model saw; and the limits
//! ([`limits`]): a session's budgets, the detector of a model calling the
//! same tool over and over, and the first stage of compaction.

pub mod limits;
pub mod providers;
pub mod tools;
pub mod transcript;
