//! `bridle agent`: start an agent session (a run the control plane drives
//! with a model, checking each tool call it makes against policy), send it
//! the next message or a client tool's result, and follow it (see
//! [`crate::session`]).

use std::path::PathBuf;

use anyhow::Context;
use bridle_client::control as pb;
use clap::{Args, Subcommand};

use crate::args::key_values;
use crate::conn::Conn;
use crate::render::{print_json, run_state_name, RunView};
use crate::runs::random_key;
use crate::session::follow_session;

/// The built-in tools, all of which a session gets unless `--tool` names
/// some.
pub(crate) const BUILTIN_TOOLS: [&str; 7] = [
    "shell",
    "read_file",
    "write_file",
    "edit_file",
    "list_dir",
    "find_files",
    "search_files",
];

#[derive(Subcommand)]
pub(crate) enum AgentCmd {
    /// Start a session with a goal and follow it until the model answers.
    ///
    /// Shows on stderr the model's text as it comes, each tool call with
    /// its arguments and a line for its result, calls refused or held for
    /// an approval, and at the end what the session used; prints the
    /// answer on stdout. Exits 0 when the model has answered (the session
    /// is then idle: `bridle agent send` goes on) or the session
    /// succeeded, 10 when it waits for the result of a client tool call,
    /// 1 failed, 130 cancelled, 75 interrupted.
    Run(RunArgs),
    /// Send a session its next message, a client tool's result, or close
    /// it; then follow it as `agent run` does (same exit codes).
    ///
    /// `send RUN "message"`: the next user message (the session must be
    /// idle). `send RUN --call-id ID --result TEXT [--error]`: the result
    /// of a client tool call it waits for. `send RUN --close`: end an idle
    /// session now; with a message, once the model has answered it.
    Send(SendArgs),
}

#[derive(Args)]
pub(crate) struct RunArgs {
    /// The goal: the session's first user message.
    goal: String,
    /// The model, by the name of one of the server's `[[model]]` entries.
    #[arg(long, value_name = "NAME")]
    model: String,
    /// A built-in tool the model may call (repeatable): shell, read_file,
    /// write_file, edit_file, list_dir, find_files, search_files.
    /// Default: all of them.
    #[arg(long = "tool", value_name = "NAME", conflicts_with = "all_tools")]
    tools: Vec<String>,
    /// Every built-in tool (the default when no --tool is given).
    #[arg(long)]
    all_tools: bool,
    /// The system prompt.
    #[arg(long, value_name = "TEXT", conflicts_with = "instructions_file")]
    instructions: Option<String>,
    /// A file holding the system prompt.
    #[arg(long, value_name = "PATH")]
    instructions_file: Option<PathBuf>,
    /// At most this many model calls (default: the server's maximum).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    max_iterations: Option<u32>,
    /// At most this many tool calls (default: the server's maximum).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    max_tool_calls: Option<u32>,
    /// The image of the sandbox the tools act in (default: the server's).
    #[arg(long, value_name = "IMAGE")]
    image: Option<String>,
    /// The sandbox's network (default: none).
    #[arg(long, value_parser = ["none", "bridge", "egress"])]
    network: Option<String>,
    /// Environment for the commands the tools run (repeatable).
    #[arg(long = "env", short = 'e', value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// A label on the session's run (repeatable).
    #[arg(long = "label", value_name = "KEY=VALUE")]
    labels: Vec<String>,
    /// The same key returns the same session (default: a new key each
    /// time).
    #[arg(long, value_name = "KEY")]
    idempotency_key: Option<String>,
    /// Print the session's run id and return without following it.
    #[arg(long)]
    detach: bool,
}

#[derive(Args)]
pub(crate) struct SendArgs {
    /// The session's run id.
    run: String,
    /// The next user message (the session must be idle).
    #[arg(required_unless_present_any = ["call_id", "close"], conflicts_with = "call_id")]
    message: Option<String>,
    /// Answer this client tool call, which the session waits for (its
    /// state is awaiting_tool_result); with --result.
    #[arg(long, value_name = "ID", requires = "result", conflicts_with = "close")]
    call_id: Option<String>,
    /// The client tool's result, as the model reads it.
    #[arg(long, value_name = "TEXT", requires = "call_id")]
    result: Option<String>,
    /// The result is an error.
    #[arg(long, requires = "call_id")]
    error: bool,
    /// End the session: now if no message is given (it must be idle),
    /// else once the model has answered the message.
    #[arg(long)]
    close: bool,
    /// The same id again adds nothing and answers the session as it is
    /// (default: a new random id).
    #[arg(long, value_name = "ID")]
    message_id: Option<String>,
    /// Print the session's run id and state and return without following
    /// it.
    #[arg(long)]
    detach: bool,
}

/// The agent task `a` asks for, its instructions file read; a bad flag or
/// an unreadable file is refused before anything is contacted.
pub(crate) fn task_of(a: &RunArgs) -> anyhow::Result<pb::AgentTask> {
    let instructions = match (&a.instructions, &a.instructions_file) {
        (Some(text), _) => text.clone(),
        (None, Some(path)) => std::fs::read_to_string(path)
            .with_context(|| format!("reading the instructions file {}", path.display()))?,
        (None, None) => String::new(),
    };
    build_task(a, instructions)
}

/// The agent task of `a`'s flags with `instructions` as its system
/// prompt. Only what the flags say is set: budgets left out take the
/// server's maxima, a sandbox left unsaid its defaults.
fn build_task(a: &RunArgs, instructions: String) -> anyhow::Result<pb::AgentTask> {
    let tools = if a.all_tools || a.tools.is_empty() {
        BUILTIN_TOOLS.iter().map(|t| t.to_string()).collect()
    } else {
        a.tools.clone()
    };
    let budgets = (a.max_iterations.is_some() || a.max_tool_calls.is_some()).then(|| pb::Budgets {
        max_iterations: a.max_iterations.unwrap_or(0),
        max_tool_calls: a.max_tool_calls.unwrap_or(0),
        ..Default::default()
    });
    let network = match a.network.as_deref() {
        Some("bridge") => pb::NetworkMode::Bridge,
        Some("egress") => pb::NetworkMode::Egress,
        Some(_) => pb::NetworkMode::None,
        None => pb::NetworkMode::Unspecified,
    };
    let sandbox = pb::Job {
        image: a.image.clone().unwrap_or_default(),
        network: network as i32,
        env: key_values(&a.env, "--env")?,
        labels: key_values(&a.labels, "--label")?,
        ..Default::default()
    };
    Ok(pb::AgentTask {
        instructions,
        message: a.goal.clone(),
        model: a.model.clone(),
        tools,
        client_tools: Vec::new(),
        budgets,
        sandbox: Some(sandbox),
        loop_threshold: 0,
    })
}

/// `bridle agent …`. `task`: the task of `agent run`, when already made
/// from its flags (see [`task_of`]).
pub(crate) async fn run(
    c: &mut Conn,
    cmd: AgentCmd,
    task: Option<pb::AgentTask>,
) -> anyhow::Result<u8> {
    match cmd {
        AgentCmd::Run(a) => {
            let task = match task {
                Some(task) => task,
                None => task_of(&a)?,
            };
            start(c, a, task).await
        }
        AgentCmd::Send(a) => send(c, a).await,
    }
}

/// `agent run`: submits the session, then follows it from its first
/// event unless `--detach`.
async fn start(c: &mut Conn, a: RunArgs, task: pb::AgentTask) -> anyhow::Result<u8> {
    let key = match a.idempotency_key {
        Some(key) => key,
        None => random_key()?,
    };
    let r = c
        .runs
        .submit(pb::SubmitRunRequest {
            idempotency_key: key,
            job: None,
            agent: Some(task),
        })
        .await?
        .into_inner();
    if a.detach {
        if c.json {
            print_json(&RunView::from(&r));
        } else {
            println!("{}", r.id);
        }
        return Ok(0);
    }
    eprintln!("bridle: run {}", r.id);
    follow_session(c, &r.id, 1, false).await
}

/// `agent send`: sends, then follows the session from the first event
/// after what the send recorded unless `--detach`.
async fn send(c: &mut Conn, a: SendArgs) -> anyhow::Result<u8> {
    let message_id = match a.message_id {
        Some(id) => id,
        None => random_key()?,
    };
    let tool_result = a.call_id.map(|call_id| pb::ToolResultInput {
        call_id,
        content: a.result.unwrap_or_default(),
        is_error: a.error,
    });
    // With a message, the close comes after the model's answer: the follow
    // waits for it.
    let closing = a.close && a.message.is_some();
    let r = c
        .runs
        .send(pb::SendRequest {
            run_id: a.run,
            message_id,
            message: a.message.unwrap_or_default(),
            tool_result,
            close: a.close,
        })
        .await?
        .into_inner();
    if a.detach {
        if c.json {
            print_json(&RunView::from(&r));
        } else {
            println!("{} {}", r.id, run_state_name(r.state));
        }
        return Ok(0);
    }
    follow_session(c, &r.id, r.last_seq + 1, closing).await
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::*;

    /// `bridle agent`'s arguments, alone.
    #[derive(Parser)]
    struct Agent {
        #[command(subcommand)]
        cmd: AgentCmd,
    }

    fn run_args(args: &[&str]) -> RunArgs {
        let argv: Vec<&str> = ["agent", "run"]
            .into_iter()
            .chain(args.iter().copied())
            .collect();
        match Agent::try_parse_from(argv) {
            Ok(Agent {
                cmd: AgentCmd::Run(a),
            }) => a,
            Ok(_) => panic!("not agent run"),
            Err(e) => panic!("{e}"),
        }
    }

    fn task(args: &[&str]) -> pb::AgentTask {
        build_task(&run_args(args), String::new()).unwrap()
    }

    #[test]
    fn the_flags_hold_together() {
        Agent::command().debug_assert();
    }

    #[test]
    fn a_task_gets_every_builtin_tool_unless_told() {
        let t = task(&["--model", "m", "fix the build"]);
        assert_eq!(t.message, "fix the build");
        assert_eq!(t.model, "m");
        assert_eq!(t.tools, BUILTIN_TOOLS);
        assert!(t.client_tools.is_empty());
        // No budget flag: the server's maxima.
        assert_eq!(t.budgets, None);
        assert_eq!(t.loop_threshold, 0);
        let sandbox = t.sandbox.unwrap();
        assert_eq!(sandbox.image, "");
        assert_eq!(sandbox.network, pb::NetworkMode::Unspecified as i32);
        assert!(sandbox.steps.is_empty());

        let all = task(&["--model", "m", "--all-tools", "goal"]);
        assert_eq!(all.tools, BUILTIN_TOOLS);
    }

    #[test]
    fn a_task_gets_only_the_tools_named() {
        let t = task(&[
            "--model",
            "m",
            "--tool",
            "read_file",
            "--tool",
            "list_dir",
            "goal",
        ]);
        assert_eq!(t.tools, ["read_file", "list_dir"]);
        // Naming tools and asking for all of them contradict each other.
        let both = Agent::try_parse_from([
            "agent",
            "run",
            "--model",
            "m",
            "--tool",
            "shell",
            "--all-tools",
            "goal",
        ]);
        assert!(both.is_err());
    }

    #[test]
    fn a_task_carries_budgets_and_its_sandbox() {
        let t = task(&[
            "--model",
            "m",
            "--max-iterations",
            "5",
            "--image",
            "img",
            "--network",
            "bridge",
            "-e",
            "A=1",
            "--label",
            "team=x",
            "goal",
        ]);
        let budgets = t.budgets.unwrap();
        assert_eq!(budgets.max_iterations, 5);
        assert_eq!(budgets.max_tool_calls, 0);
        let sandbox = t.sandbox.unwrap();
        assert_eq!(sandbox.image, "img");
        assert_eq!(sandbox.network, pb::NetworkMode::Bridge as i32);
        assert_eq!(sandbox.env.get("A").map(String::as_str), Some("1"));
        assert_eq!(sandbox.labels.get("team").map(String::as_str), Some("x"));
        // 0 would mean the server's maximum: refused as a flag.
        assert!(Agent::try_parse_from([
            "agent",
            "run",
            "--model",
            "m",
            "--max-tool-calls",
            "0",
            "g"
        ])
        .is_err());
        let bad = build_task(
            &run_args(&["--model", "m", "-e", "NOEQUALS", "g"]),
            String::new(),
        );
        assert!(bad.is_err());
    }

    #[test]
    fn instructions_come_from_the_flag_or_a_file() {
        let t = task_of(&run_args(&[
            "--model",
            "m",
            "--instructions",
            "be brief",
            "g",
        ]))
        .unwrap();
        assert_eq!(t.instructions, "be brief");
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("system.md");
        std::fs::write(&file, "from a file\n").unwrap();
        let path = file.to_str().unwrap();
        let t = task_of(&run_args(&[
            "--model",
            "m",
            "--instructions-file",
            path,
            "g",
        ]))
        .unwrap();
        assert_eq!(t.instructions, "from a file\n");
        let missing = dir.path().join("nope.md");
        let e = task_of(&run_args(&[
            "--model",
            "m",
            "--instructions-file",
            missing.to_str().unwrap(),
            "g",
        ]))
        .unwrap_err();
        assert!(format!("{e:#}").contains("nope.md"), "{e:#}");
    }

    #[test]
    fn a_send_says_what_it_sends() {
        let parse = |args: &[&str]| {
            let argv: Vec<&str> = ["agent", "send", "run-1"]
                .into_iter()
                .chain(args.iter().copied())
                .collect();
            Agent::try_parse_from(argv).map(|_| ())
        };
        assert!(parse(&["next, please"]).is_ok());
        assert!(parse(&["--close"]).is_ok());
        assert!(parse(&["last one", "--close"]).is_ok());
        assert!(parse(&["--call-id", "c1", "--result", "42"]).is_ok());
        assert!(parse(&["--call-id", "c1", "--result", "no", "--error"]).is_ok());
        // Nothing to send, half a tool result, or a message and a result.
        assert!(parse(&[]).is_err());
        assert!(parse(&["--call-id", "c1"]).is_err());
        assert!(parse(&["--result", "42"]).is_err());
        assert!(parse(&["--error"]).is_err());
        assert!(parse(&["hi", "--call-id", "c1", "--result", "42"]).is_err());
        assert!(parse(&["--call-id", "c1", "--result", "42", "--close"]).is_err());
    }
}
