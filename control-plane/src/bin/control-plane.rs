use std::path::PathBuf;

use clap::Parser;

/// bridle's control plane: authenticated gRPC in front of Docker sandboxes.
#[derive(Parser)]
#[command(name = "control-plane", version)]
struct Args {
    /// TOML config file (defaults < file < BRIDLE_* env < flags).
    #[arg(long, short, env = "BRIDLE_CONFIG")]
    config: Option<PathBuf>,
    /// Data directory (store, tokens, artifacts, sockets).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// gRPC listen address, e.g. 127.0.0.1:7443.
    #[arg(long)]
    listen: Option<String>,
    /// Any key: --set sandbox.image=my-image --set sandbox.memory_bytes=1073741824
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    /// Print the resulting configuration and exit.
    #[arg(long)]
    dump_config: bool,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let mut sets = args.sets.clone();
    if let Some(d) = &args.data_dir {
        sets.push(format!("data_dir={:?}", d.display().to_string()));
    }
    if let Some(l) = &args.listen {
        sets.push(format!("listen={l:?}"));
    }
    let config = match control_plane::config::Config::load(
        args.config.as_deref(),
        std::env::vars(),
        &sets,
    ) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("control-plane: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    if args.dump_config {
        print!("{}", config.to_toml());
        return std::process::ExitCode::SUCCESS;
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BRIDLE_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        // Colours only on a terminal: a log file gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("control-plane: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(control_plane::run(config, shutdown_signal())) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("control-plane: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        eprintln!("control-plane: cannot install signal handlers");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
