//! Argument values that several subcommands take. Durations and sizes are
//! `bridle_client::units`.

use std::collections::HashMap;

use anyhow::anyhow;

/// `KEY=VALUE` pairs (`--env`, `--label`); `what` names the flag in errors.
pub(crate) fn key_values(pairs: &[String], what: &str) -> anyhow::Result<HashMap<String, String>> {
    pairs
        .iter()
        .map(|p| {
            p.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| anyhow!("{what} {p:?} must be KEY=VALUE"))
        })
        .collect()
}
