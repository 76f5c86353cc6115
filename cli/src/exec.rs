//! `bridle sandbox exec`: a command in a sandbox, with stdin, a terminal,
//! signals and the exit code passed through.

use std::io::IsTerminal;
use std::time::Duration;

use anyhow::bail;
use bridle_client::control as pb;
use bridle_client::sandbox as agent_pb;
use bridle_client::units::parse_duration;
use clap::Args;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::args::key_values;
use crate::conn::Conn;
use crate::render::{print_json, DetachedView};

#[derive(Args)]
pub(crate) struct ExecArgs {
    id: String,
    /// Allocate a terminal even when not attached to one.
    #[arg(short = 't', long)]
    tty: bool,
    /// Never allocate a terminal.
    #[arg(short = 'T', long, conflicts_with = "tty")]
    no_tty: bool,
    #[arg(long = "env", short = 'e', value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// Working directory, relative to the workspace.
    #[arg(long, short = 'w', default_value = "")]
    workdir: String,
    /// Stop the command (and everything it started) after this long.
    #[arg(long, value_parser = parse_duration)]
    timeout: Option<Duration>,
    /// Caller-chosen exec id (re-running with the same id attaches instead).
    #[arg(long, default_value = "")]
    exec_id: String,
    /// Start the command and return at once; it keeps running.
    #[arg(long, short = 'd')]
    detach: bool,
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    command: Vec<String>,
}

/// The terminal in raw mode for as long as this lives.
struct RawTerminal {
    saved: libc::termios,
}

impl RawTerminal {
    fn enter() -> Option<Self> {
        // SAFETY: tcgetattr/tcsetattr on fd 0 with valid termios structs.
        unsafe {
            let mut saved: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(0, &mut saved) != 0 {
                return None;
            }
            let mut raw = saved;
            libc::cfmakeraw(&mut raw);
            if libc::tcsetattr(0, libc::TCSANOW, &raw) != 0 {
                return None;
            }
            Some(Self { saved })
        }
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        // SAFETY: restoring the attributes read in `enter`.
        unsafe { libc::tcsetattr(0, libc::TCSANOW, &self.saved) };
    }
}

fn window_size() -> Option<agent_pb::PtySize> {
    // SAFETY: TIOCGWINSZ into a valid winsize.
    unsafe {
        let mut ws: libc::winsize = std::mem::zeroed();
        if libc::ioctl(1, libc::TIOCGWINSZ, &mut ws) != 0 || ws.ws_row == 0 {
            return None;
        }
        Some(agent_pb::PtySize {
            rows: ws.ws_row as u32,
            cols: ws.ws_col as u32,
        })
    }
}

pub(crate) async fn run(c: &mut Conn, a: ExecArgs) -> anyhow::Result<u8> {
    let tty =
        !a.no_tty && (a.tty || (std::io::stdin().is_terminal() && std::io::stdout().is_terminal()));
    let pty = if tty {
        Some(window_size().unwrap_or(agent_pb::PtySize { rows: 24, cols: 80 }))
    } else {
        None
    };
    let start = agent_pb::ExecStart {
        exec_id: a.exec_id,
        argv: a.command,
        env: key_values(&a.env, "--env")?,
        cwd: a.workdir,
        stdin: !a.detach,
        pty,
        timeout_ms: a.timeout.map(|d| d.as_millis() as u32).unwrap_or(0),
        ..Default::default()
    };
    let (tx, rx) = mpsc::channel(16);
    tx.send(pb::ExecRequest {
        request: Some(pb::exec_request::Request::Start(pb::ExecStart {
            sandbox_id: a.id,
            exec: Some(start),
            detach: a.detach,
        })),
    })
    .await?;
    let mut events = c
        .sandboxes
        .exec(ReceiverStream::new(rx))
        .await?
        .into_inner();
    if a.detach {
        // The first event says whether it started (after an approval, if
        // one is needed).
        while let Some(ev) = events.message().await? {
            use pb::exec_event::Event;
            match ev.event {
                Some(Event::Started(s)) => {
                    if c.json {
                        print_json(&DetachedView {
                            exec_id: &s.exec_id,
                            pid: s.pid,
                        });
                    } else {
                        println!("{}", s.exec_id);
                    }
                    return Ok(0);
                }
                Some(Event::SpawnFailed(f)) => {
                    bail!("the command did not start: {}", f.reason)
                }
                Some(Event::ApprovalPending(a)) => waiting(&a),
                _ => {}
            }
        }
        bail!("the exec stream ended before the command started");
    }
    let _raw = if tty { RawTerminal::enter() } else { None };
    // stdin → exec; EOF closes the command's stdin.
    let input = tx.clone();
    tokio::spawn(async move {
        let mut stdin = tokio::io::stdin();
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match stdin.read(&mut buf).await {
                Ok(0) | Err(_) => {
                    let _ = input
                        .send(pb::ExecRequest {
                            request: Some(pb::exec_request::Request::CloseStdin(
                                agent_pb::CloseStdin {},
                            )),
                        })
                        .await;
                    return;
                }
                Ok(n) => {
                    let msg = pb::ExecRequest {
                        request: Some(pb::exec_request::Request::Stdin(buf[..n].to_vec().into())),
                    };
                    if input.send(msg).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    // Signals: Ctrl-C and friends go to the command (in a terminal, Ctrl-C
    // is a byte the remote terminal turns into SIGINT); window size changes
    // resize the remote terminal.
    let signals = tx.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut int), Ok(mut term), Ok(mut hup), Ok(mut winch)) = (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
            signal(SignalKind::hangup()),
            signal(SignalKind::window_change()),
        ) else {
            return;
        };
        loop {
            let request = tokio::select! {
                _ = int.recv() => pb::exec_request::Request::Signal(libc::SIGINT),
                _ = term.recv() => pb::exec_request::Request::Signal(libc::SIGTERM),
                _ = hup.recv() => pb::exec_request::Request::Signal(libc::SIGHUP),
                _ = winch.recv() => match window_size() {
                    Some(size) if tty => pb::exec_request::Request::Resize(size),
                    _ => continue,
                },
            };
            if signals
                .send(pb::ExecRequest {
                    request: Some(request),
                })
                .await
                .is_err()
            {
                return;
            }
        }
    });
    drop(tx);
    let mut stdout = tokio::io::stdout();
    let mut stderr = tokio::io::stderr();
    while let Some(ev) = events.message().await? {
        use pb::exec_event::Event;
        match ev.event {
            Some(Event::Output(o)) => {
                if o.stream == agent_pb::OutputStream::Stderr as i32 {
                    stderr.write_all(&o.data).await?;
                    stderr.flush().await?;
                } else {
                    stdout.write_all(&o.data).await?;
                    stdout.flush().await?;
                }
            }
            Some(Event::Dropped(d)) => {
                eprintln!(
                    "bridle: [{} bytes of output dropped by the sandbox's output cap]",
                    d.to_offset - d.from_offset
                );
            }
            Some(Event::SpawnFailed(f)) => {
                eprintln!("bridle: the command did not start: {}", f.reason);
                return Ok(if f.errno == libc::ENOENT { 127 } else { 126 });
            }
            Some(Event::Exited(x)) => {
                if x.timed_out {
                    eprintln!("bridle: the command timed out and was stopped");
                }
                if x.oom_killed {
                    eprintln!("bridle: the command ran out of memory");
                }
                return Ok(match (x.code, x.signal) {
                    (Some(code), _) => code.clamp(0, 255) as u8,
                    (None, Some(sig)) => (128 + sig).clamp(0, 255) as u8,
                    (None, None) => 137,
                });
            }
            Some(Event::ApprovalPending(a)) => waiting(&a),
            Some(Event::Started(_)) | Some(Event::Keepalive(_)) | None => {}
        }
    }
    bail!("the exec stream ended before the command exited")
}

fn waiting(a: &pb::ApprovalPending) {
    eprintln!(
        "bridle: waiting for approval {} ({}); an operator decides it with `bridle approvals approve {} --reason …`",
        a.approval_id, a.reason, a.approval_id
    );
}
