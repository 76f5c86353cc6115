//! `bridle-scripted-model`: serves a script as if it were a model provider.
//!
//! It is a script, not a model: it answers OpenAI Chat Completions
//! (`/v1/chat/completions`) and Anthropic Messages (`/v1/messages`) requests
//! from the JSON script it is given, and says so when it starts. For demos
//! and for tests of agent code that talks to a provider over HTTP; the
//! script's format is in the crate's README.md.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use bridle_scripted_model::{Script, Server};
use clap::Parser;
use tokio::signal::unix::{signal, Signal, SignalKind};

/// A scripted stand-in for a model provider (not a model).
#[derive(Parser)]
#[command(name = "bridle-scripted-model", version)]
struct Args {
    /// The script: a JSON file (conversations, their turns, an optional API key).
    #[arg(long, value_name = "FILE.json")]
    script: PathBuf,
    /// The address to listen on (port 0: any free port, printed at start).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let script = match load(&args.script) {
        Ok(script) => script,
        Err(e) => {
            eprintln!("bridle-scripted-model: {e:#}");
            return ExitCode::from(2);
        }
    };
    let server = match Server::bind(script, args.listen).await {
        Ok(server) => server,
        Err(e) => {
            eprintln!(
                "bridle-scripted-model: cannot listen on {}: {e}",
                args.listen
            );
            return ExitCode::FAILURE;
        }
    };
    // Registered before the banner: a SIGTERM sent as soon as the banner is
    // read must stop the server cleanly, not kill it.
    let (mut terminate, mut interrupt) = match shutdown_signals() {
        Ok(signals) => signals,
        Err(e) => {
            eprintln!("bridle-scripted-model: cannot listen for SIGTERM and SIGINT: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "bridle-scripted-model: a scripted stand-in for a model provider (not a model), \
         listening on {}",
        server.base_url()
    );
    tokio::select! {
        _ = terminate.recv() => {}
        _ = interrupt.recv() => {}
    }
    drop(server);
    ExitCode::SUCCESS
}

/// Reads and checks the script, so that a bad file is refused before the
/// server starts, with a message naming the file.
fn load(path: &Path) -> anyhow::Result<Script> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the script {}", path.display()))?;
    let script: Script = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a valid script", path.display()))?;
    script
        .check()
        .map_err(anyhow::Error::msg)
        .with_context(|| format!("{} is not a valid script", path.display()))?;
    Ok(script)
}

/// SIGTERM and SIGINT (ctrl-c), the signals that stop the server.
fn shutdown_signals() -> std::io::Result<(Signal, Signal)> {
    Ok((
        signal(SignalKind::terminate())?,
        signal(SignalKind::interrupt())?,
    ))
}
