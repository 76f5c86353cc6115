use clap::Parser;

fn main() -> std::process::ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    // The exec spawner must run before any thread exists.
    if args
        .get(1)
        .is_some_and(|a| a == sandbox_agent::exec::spawner::SPAWNER_ARG)
    {
        sandbox_agent::exec::spawner::main(&args[2..]);
    }
    // Descriptors inherited from whoever started the agent are never passed on.
    // SAFETY: close_range only sets flags on this process's own fds.
    unsafe {
        libc::syscall(
            libc::SYS_close_range,
            3u32,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    // Commands run as the agent's own uid: without this they could ptrace
    // PID 1 or read and write its memory through /proc/1/mem.
    sandbox_agent::pid1::make_undumpable();
    // Few malloc arenas: the agent has few threads that allocate, and every
    // arena keeps its own freed memory. (Freed heap goes back to the OS
    // periodically, see `run`.)
    // SAFETY: mallopt before any allocation-heavy work; plain integers.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 2) };
    let mut config = sandbox_agent::Config::parse();
    // Before the first thread or child: nothing the agent starts may inherit it.
    if let Err(e) = config.take_key_from_env() {
        eprintln!("sandbox-agent: {e:#}");
        return std::process::ExitCode::FAILURE;
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BRIDLE_AGENT_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sandbox-agent: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(sandbox_agent::run(
        config,
        sandbox_agent::pid1::stop_requested(),
    )) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sandbox-agent: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
