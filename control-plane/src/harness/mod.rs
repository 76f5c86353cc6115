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
pub mod task;
pub mod tools;
pub mod transcript;

use std::collections::BTreeMap;

use crate::config::ModelConfig;

/// What a server's sessions work with: its models, ready to call, and the
/// bounds on every session.
#[derive(Clone, Debug)]
pub struct Settings {
    pub providers: BTreeMap<String, providers::Provider>,
    /// The most a task may ask for (a task's zero fields take these).
    pub max_budgets: limits::Budgets,
    /// How long a shell command may run when its call does not say.
    pub tool_timeout_secs: u32,
    /// A tool result longer than this is stored whole and shown to the
    /// model as its head and tail.
    pub max_result_bytes: usize,
    /// Output of one command kept at most (the rest is cut from the middle).
    pub max_output_bytes: usize,
    /// Bytes a file tool reads at most.
    pub max_file_bytes: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            providers: BTreeMap::new(),
            max_budgets: limits::Budgets::default(),
            tool_timeout_secs: 600,
            max_result_bytes: 16 << 10,
            max_output_bytes: 4 << 20,
            max_file_bytes: 8 << 20,
        }
    }
}

impl Settings {
    /// The server's settings: its models and `[harness]`.
    pub fn from_config(config: &crate::config::Config) -> Result<Self, providers::ProviderError> {
        let mut settings = Settings::with_models(&config.model)?;
        settings.max_budgets = config.harness.max.clone();
        settings.tool_timeout_secs = config.harness.tool_timeout_secs;
        settings.max_result_bytes = config.harness.max_result_bytes;
        Ok(settings)
    }

    /// The defaults with the configured models.
    pub fn with_models(models: &[ModelConfig]) -> Result<Self, providers::ProviderError> {
        let mut settings = Settings::default();
        for m in models {
            settings
                .providers
                .insert(m.name.clone(), providers::Provider::new(m)?);
        }
        Ok(settings)
    }

    pub fn model_names(&self) -> Vec<&str> {
        self.providers.keys().map(String::as_str).collect()
    }
}
