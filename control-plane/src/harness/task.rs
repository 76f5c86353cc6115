//! An agent task as it is recorded: what a session's client asked for
//! (`Runs.Submit` with `agent`), checked once at the API edge. The
//! environment (image, limits, network, env, secrets, inputs) is the
//! run's [`Job`](crate::runs::job::Job), with no steps.

use bridle_proto::control::v1 as pb;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::limits::Budgets;
use super::tools::builtin::Builtin;
use super::tools::Registry;
use crate::runs::job::Submitted;

/// Bytes the first message (and any message sent later) may have.
pub const MAX_MESSAGE_BYTES: usize = 1 << 20;
/// Bytes the instructions may have.
pub const MAX_INSTRUCTIONS_BYTES: usize = 256 << 10;
/// Client tools a task may declare.
pub const MAX_CLIENT_TOOLS: usize = 64;
/// The loop threshold when a task leaves it at 0.
pub const DEFAULT_LOOP_THRESHOLD: u32 = 3;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentTask {
    /// The system prompt.
    pub instructions: String,
    /// A `[[model]]` name.
    pub model: String,
    /// Built-in tools the model may call, in the order the model is told
    /// of them.
    pub tools: Vec<Builtin>,
    pub client_tools: Vec<ClientTool>,
    /// Held within the server's maxima.
    pub budgets: Budgets,
    pub loop_threshold: u32,
    /// The blob of the first user message, which the session's driver
    /// records as its first `user_message` (message id [`FIRST_MESSAGE_ID`]).
    pub first_message_sha256: String,
}

/// The message id of a session's first user message.
pub const FIRST_MESSAGE_ID: &str = "first";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClientTool {
    pub name: String,
    pub description: String,
    pub parameters: Value,
}

impl AgentTask {
    /// The session's tool registry.
    pub fn registry(&self, default_timeout_secs: u32) -> Result<Registry, String> {
        let mut registry =
            Registry::new(&self.tools, default_timeout_secs).map_err(|e| e.to_string())?;
        for t in &self.client_tools {
            registry
                .add_client_tool(&t.name, &t.description, t.parameters.clone())
                .map_err(|e| e.to_string())?;
        }
        Ok(registry)
    }
}

/// A submitted agent task: the run's job (no steps, the task in `agent`),
/// its secrets and its blobs (inputs, and the first message).
pub type SubmittedTask = Submitted;

/// Checks an agent task; each message names the field (under `agent.`).
/// `server_max` are the server's budget maxima; `models` the names of the
/// configured models.
pub fn validate(
    t: pb::AgentTask,
    server_max: &Budgets,
    models: &[&str],
    default_timeout_secs: u32,
) -> Result<SubmittedTask, String> {
    if t.message.trim().is_empty() {
        return Err("message: the first user message is required".into());
    }
    if t.message.len() > MAX_MESSAGE_BYTES {
        return Err(format!("message: at most {MAX_MESSAGE_BYTES} bytes"));
    }
    if t.instructions.len() > MAX_INSTRUCTIONS_BYTES {
        return Err(format!(
            "instructions: at most {MAX_INSTRUCTIONS_BYTES} bytes"
        ));
    }
    if t.model.is_empty() {
        return Err(format!(
            "model: required; this server offers: {}",
            offered(models)
        ));
    }
    if !models.contains(&t.model.as_str()) {
        return Err(format!(
            "model: {:?} is not a model of this server; it offers: {}",
            t.model,
            offered(models)
        ));
    }
    let mut tools = Vec::new();
    for (i, name) in t.tools.iter().enumerate() {
        let Some(b) = Builtin::from_name(name) else {
            let all: Vec<&str> = Builtin::ALL.iter().map(|b| b.name()).collect();
            return Err(format!(
                "tools[{i}]: {name:?} is not a built-in tool; they are: {}",
                all.join(", ")
            ));
        };
        if tools.contains(&b) {
            return Err(format!("tools[{i}]: {name:?} is listed twice"));
        }
        tools.push(b);
    }
    if t.client_tools.len() > MAX_CLIENT_TOOLS {
        return Err(format!("client_tools: at most {MAX_CLIENT_TOOLS}"));
    }
    let mut client_tools = Vec::new();
    for (i, c) in t.client_tools.into_iter().enumerate() {
        let parameters: Value = if c.parameters_json.trim().is_empty() {
            serde_json::json!({"type": "object"})
        } else {
            serde_json::from_str(&c.parameters_json)
                .map_err(|e| format!("client_tools[{i}].parameters_json: not JSON ({e})"))?
        };
        client_tools.push(ClientTool {
            name: c.name,
            description: c.description,
            parameters,
        });
    }
    let b = t.budgets.unwrap_or_default();
    let budgets = Budgets {
        max_iterations: b.max_iterations,
        max_input_tokens: b.max_input_tokens,
        max_output_tokens: b.max_output_tokens,
        max_wall_secs: b.max_wall_seconds,
        max_tool_calls: b.max_tool_calls,
        max_cost_usd: b.max_cost_usd,
    }
    .within(server_max)
    .map_err(|e| format!("budgets.{e}"))?;
    let mut sandbox = t.sandbox.unwrap_or_default();
    if !sandbox.steps.is_empty() {
        return Err("sandbox.steps: an agent task has no steps; the model decides".into());
    }
    // A job's check wants a step: the sandbox is checked as a job of one.
    sandbox.steps.push(pb::Step {
        shell: "true".into(),
        ..Default::default()
    });
    let mut sandbox = Submitted::try_from(sandbox).map_err(|e| format!("sandbox.{e}"))?;
    sandbox.job.steps.clear();
    let first_message_sha256 = super::transcript::sha256_hex(t.message.as_bytes());
    let task = AgentTask {
        instructions: t.instructions,
        model: t.model,
        tools,
        client_tools,
        budgets,
        loop_threshold: if t.loop_threshold == 0 {
            DEFAULT_LOOP_THRESHOLD
        } else {
            t.loop_threshold
        },
        first_message_sha256: first_message_sha256.clone(),
    };
    // The client's tools must register (names, schemas).
    task.registry(default_timeout_secs)
        .map_err(|e| format!("client_tools: {e}"))?;
    sandbox
        .blobs
        .push((first_message_sha256, t.message.into_bytes()));
    sandbox.job.agent = Some(task);
    Ok(sandbox)
}

fn offered(models: &[&str]) -> String {
    if models.is_empty() {
        "none (an operator adds [[model]] entries to the config)".into()
    } else {
        models.join(", ")
    }
}

/// The task as the API shows it.
pub fn task_pb(task: &AgentTask) -> pb::AgentTask {
    let b = &task.budgets;
    pb::AgentTask {
        instructions: task.instructions.clone(),
        message: String::new(),
        model: task.model.clone(),
        tools: task.tools.iter().map(|b| b.name().to_string()).collect(),
        client_tools: task
            .client_tools
            .iter()
            .map(|c| pb::ClientTool {
                name: c.name.clone(),
                description: c.description.clone(),
                parameters_json: c.parameters.to_string(),
            })
            .collect(),
        budgets: Some(pb::Budgets {
            max_iterations: b.max_iterations,
            max_input_tokens: b.max_input_tokens,
            max_output_tokens: b.max_output_tokens,
            max_wall_seconds: b.max_wall_secs,
            max_tool_calls: b.max_tool_calls,
            max_cost_usd: b.max_cost_usd,
        }),
        sandbox: None,
        loop_threshold: task.loop_threshold,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task() -> pb::AgentTask {
        pb::AgentTask {
            message: "fix the tests".into(),
            model: "m".into(),
            tools: vec!["shell".into()],
            ..Default::default()
        }
    }

    #[test]
    fn a_task_validates_field_by_field() {
        let max = Budgets::default();
        let ok = validate(task(), &max, &["m"], 600).unwrap();
        let agent = ok.job.agent.as_ref().unwrap();
        assert_eq!(agent.tools, vec![Builtin::Shell]);
        assert_eq!(agent.budgets, max, "zero budgets take the maxima");
        assert_eq!(agent.loop_threshold, DEFAULT_LOOP_THRESHOLD);
        assert!(ok.job.steps.is_empty());
        assert!(ok
            .blobs
            .iter()
            .any(|(sha, data)| sha == &agent.first_message_sha256 && data == b"fix the tests"));
        type Change = fn(&mut pb::AgentTask);
        let bad: Vec<(Change, &str)> = vec![
            (|t| t.message.clear(), "message"),
            (|t| t.model = "gpt-9".into(), "\"gpt-9\" is not a model"),
            (|t| t.tools.push("rm_rf".into()), "tools[1]"),
            (|t| t.tools.push("shell".into()), "listed twice"),
            (
                |t| {
                    t.budgets = Some(pb::Budgets {
                        max_iterations: 1_000_000,
                        ..Default::default()
                    })
                },
                "budgets.max_iterations",
            ),
            (
                |t| {
                    t.sandbox = Some(pb::Job {
                        steps: vec![pb::Step {
                            shell: "x".into(),
                            ..Default::default()
                        }],
                        ..Default::default()
                    })
                },
                "sandbox.steps",
            ),
            (
                |t| {
                    t.client_tools.push(pb::ClientTool {
                        name: "shell".into(),
                        parameters_json: r#"{"type":"object"}"#.into(),
                        ..Default::default()
                    })
                },
                "client_tools",
            ),
            (
                |t| {
                    t.client_tools.push(pb::ClientTool {
                        name: "ask".into(),
                        parameters_json: "{".into(),
                        ..Default::default()
                    })
                },
                "client_tools[0].parameters_json",
            ),
        ];
        for (change, want) in bad {
            let mut t = task();
            change(&mut t);
            let e = validate(t, &max, &["m"], 600).unwrap_err();
            assert!(e.contains(want), "{want}: {e}");
        }
    }
}
