//! `bridle run` (submit a job file) and `bridle runs`: look at runs, and
//! follow one to its end across restarts of the control plane.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{anyhow, bail, Context};
use bridle_client::control as pb;
use clap::Subcommand;
use tokio::io::AsyncWriteExt;
use tonic::Status;

use crate::conn::Conn;
use crate::render::{self, print_json, print_json_line, run_state_name, RunEventView, RunView};
use crate::session::follow_session;

#[derive(Subcommand)]
pub(crate) enum RunsCmd {
    List {
        /// Only runs in this state (repeatable).
        #[arg(long = "state")]
        states: Vec<String>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    Get {
        id: String,
    },
    /// A step's recorded output (steps are numbered from 1).
    Logs {
        id: String,
        #[arg(long, default_value_t = 1)]
        step: u32,
        #[arg(long, value_parser = ["stdout", "stderr"])]
        stream: Option<String>,
    },
    /// Follow a run's progress and output until it ends; exits with its
    /// code. An agent session is followed as `bridle agent run` follows it:
    /// until it answers (0), waits for a client tool's result (10) or ends.
    Watch {
        id: String,
    },
    Cancel {
        id: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
}

/// A job file, read and checked before anything is contacted; a bad one
/// is refused as an invalid argument (exit 6) naming the line.
pub(crate) fn read_job_file(file: &Path) -> anyhow::Result<pb::Job> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    bridle_client::job::parse_job_file(file, &text, |k| std::env::var(k).ok())
        .map_err(|e| anyhow::Error::new(Status::invalid_argument(e.to_string())))
}

/// `bridle run`: submits `job` (a new random key unless given one) and
/// prints the run, or follows it and answers its exit code.
pub(crate) async fn submit(
    c: &mut Conn,
    job: Option<pb::Job>,
    key: Option<String>,
    follow: bool,
) -> anyhow::Result<u8> {
    let key = match key {
        Some(key) => key,
        None => random_key()?,
    };
    let r = c
        .runs
        .submit(pb::SubmitRunRequest {
            idempotency_key: key,
            job,
            agent: None,
        })
        .await?
        .into_inner();
    if !follow {
        if c.json {
            print_json(&RunView::from(&r));
        } else {
            println!("{}", r.id);
        }
        return Ok(0);
    }
    eprintln!("bridle: run {}", r.id);
    follow_run(c, &r.id).await
}

/// 16 random bytes as hex: a key no other submission (or message) has.
pub(crate) fn random_key() -> anyhow::Result<String> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(|e| anyhow!("the OS random source: {e}"))?;
    Ok(hex::encode(bytes))
}

/// `bridle runs …`.
pub(crate) async fn run(c: &mut Conn, cmd: RunsCmd) -> anyhow::Result<u8> {
    match cmd {
        RunsCmd::List { states, limit } => {
            let mut wanted = Vec::new();
            for s in &states {
                let st = (1..=10)
                    .find(|i| run_state_name(*i) == s.as_str())
                    .ok_or_else(|| anyhow!("--state {s:?}: one of queued, provisioning, running, succeeded, failed, cancelled, interrupted, awaiting_approval, idle, awaiting_tool_result"))?;
                wanted.push(st);
            }
            let list = c
                .runs
                .list(pb::ListRunsRequest {
                    states: wanted,
                    labels: HashMap::new(),
                    page_size: limit,
                    page_token: String::new(),
                })
                .await?
                .into_inner()
                .runs;
            if c.json {
                print_json(&list.iter().map(RunView::from).collect::<Vec<_>>());
            } else {
                render::run_table(&list);
            }
        }
        RunsCmd::Get { id } => {
            let r = c
                .runs
                .get(pb::GetRunRequest { run_id: id })
                .await?
                .into_inner();
            if c.json {
                print_json(&RunView::from(&r));
            } else {
                render::run_details(&r);
            }
        }
        RunsCmd::Logs { id, step, stream } => {
            if step == 0 {
                bail!("--step counts from 1");
            }
            let stream = match stream.as_deref() {
                Some("stdout") => pb::LogStream::Stdout,
                Some("stderr") => pb::LogStream::Stderr,
                _ => pb::LogStream::Unspecified,
            };
            let mut logs = c
                .runs
                .logs(pb::LogsRequest {
                    run_id: id,
                    step: step - 1,
                    stream: stream as i32,
                    from_offset: 0,
                })
                .await?
                .into_inner();
            let mut out = tokio::io::stdout();
            while let Some(chunk) = logs.message().await? {
                out.write_all(&chunk.data).await?;
            }
            out.flush().await?;
        }
        RunsCmd::Watch { id } => {
            if render::is_session(&get_run(c, &id).await?) {
                return follow_session(c, &id, 1, false).await;
            }
            return follow_run(c, &id).await;
        }
        RunsCmd::Cancel { id, reason } => {
            let r = c
                .runs
                .cancel(pb::CancelRunRequest { run_id: id, reason })
                .await?
                .into_inner();
            if c.json {
                print_json(&RunView::from(&r));
            }
        }
    }
    Ok(0)
}

/// Follows a run to its end and answers the run's exit code. In text, step
/// progress goes to stderr and the steps' output to stdout/stderr; with
/// `-o json`, each event is one JSON object on a line of stdout. When the
/// control plane goes away (a restart, a broken connection), follows again
/// from the first event not yet printed, so nothing shows twice or is lost.
pub(crate) async fn follow_run(c: &mut Conn, id: &str) -> anyhow::Result<u8> {
    crate::conn::follow_resuming(c, &mut RunFollower::new(id, c.json)).await
}

/// The exit code a finished run stands for: 0 succeeded, the failing step's
/// code (or 1) failed, 130 cancelled, 75 interrupted.
fn run_exit_code(r: &pb::Run) -> u8 {
    match pb::RunState::try_from(r.state) {
        Ok(pb::RunState::Succeeded) => 0,
        Ok(pb::RunState::Cancelled) => 130,
        Ok(pb::RunState::Interrupted) => 75,
        _ => r
            .steps
            .iter()
            .rev()
            .find(|s| s.state == pb::StepState::Failed as i32)
            .and_then(|s| s.exit_code)
            .filter(|c| *c > 0)
            .map(|c| c.clamp(1, 255) as u8)
            .unwrap_or(1),
    }
}

/// How far a run's follower got: what it printed, so that following again
/// over a new connection repeats nothing and skips nothing.
struct RunFollower {
    id: String,
    json: bool,
    /// The job's step names, asked for once.
    step_names: Option<Vec<String>>,
    /// The first event not yet printed (the Watch's `from_seq` is inclusive).
    next_seq: u64,
    /// Text: output bytes written so far, by (step, stream).
    written: HashMap<(u32, i32), u64>,
    /// JSON: the start of a character that the last output event of a
    /// (step, stream) cut in two, printed whole with the next one.
    held: HashMap<(u32, i32), Vec<u8>>,
}

impl crate::conn::Follower for RunFollower {
    fn next_seq(&self) -> u64 {
        self.next_seq
    }

    fn what(&self) -> String {
        format!("run {}", self.id)
    }

    async fn attempt(&mut self, c: &mut Conn) -> anyhow::Result<u8> {
        self.follow_once(c).await
    }
}

impl RunFollower {
    fn new(id: &str, json: bool) -> Self {
        Self {
            id: id.to_string(),
            json,
            step_names: None,
            next_seq: 1,
            written: HashMap::new(),
            held: HashMap::new(),
        }
    }

    /// One attempt: watches from `next_seq` until the run finishes
    /// (answering its exit code) or the stream fails.
    async fn follow_once(&mut self, c: &mut Conn) -> anyhow::Result<u8> {
        if self.step_names.is_none() {
            let job = get_run(c, &self.id).await?.job;
            self.step_names = Some(
                job.map(|j| j.steps.into_iter().map(|s| s.name).collect())
                    .unwrap_or_default(),
            );
        }
        let mut events = c
            .runs
            .watch(pb::WatchRunRequest {
                run_id: self.id.clone(),
                from_seq: self.next_seq,
            })
            .await?
            .into_inner();
        while let Some(ev) = events.message().await? {
            if ev.seq < self.next_seq {
                continue;
            }
            let finished = if self.json {
                self.print_event_json(c, &ev).await?
            } else {
                self.print_event_text(c, &ev).await?
            };
            if let Some(code) = finished {
                return Ok(code);
            }
            // Only once printed: an event whose output a lost connection
            // cut off is fetched again, from the first byte not written.
            self.next_seq = ev.seq + 1;
        }
        // The server ends the stream after the run's last event; an earlier
        // end means it is going away.
        Err(Status::unavailable("the event stream ended before the run did").into())
    }

    fn step_label(&self, step: u32) -> String {
        let names = self.step_names.as_deref().unwrap_or_default();
        let name = names.get(step as usize).map(String::as_str).unwrap_or("");
        format!("step {}/{} {name}", step + 1, names.len())
    }

    /// Prints an event for a person; answers the run's exit code after its
    /// last event.
    async fn print_event_text(
        &mut self,
        c: &mut Conn,
        ev: &pb::RunEvent,
    ) -> anyhow::Result<Option<u8>> {
        use pb::run_event::Event as E;
        match &ev.event {
            Some(E::StepStarted(s)) => {
                let again = if s.attempt > 1 {
                    format!(" (attempt {})", s.attempt)
                } else {
                    String::new()
                };
                eprintln!("bridle: ▶ {}{again}", self.step_label(s.step))
            }
            Some(E::ApprovalRequested(a)) => {
                let what = if a.for_network {
                    "the run's network".to_string()
                } else {
                    self.step_label(a.step)
                };
                eprintln!(
                    "bridle: ⏸ {what} waits for approval {} (an operator: `bridle approvals approve {} --reason …`)",
                    a.approval_id, a.approval_id
                )
            }
            Some(E::ApprovalDecided(a)) => {
                let by = if a.by.is_empty() {
                    String::new()
                } else {
                    format!(" by {}: {}", a.by, a.reason)
                };
                eprintln!("bridle: approval {} {}{by}", a.approval_id, a.outcome)
            }
            Some(E::StepOutput(o)) => self.write_output(c, o).await?,
            Some(E::StepExited(x)) => {
                let how = match (x.exit_code, x.signal) {
                    _ if !x.spawn_failure.is_empty() => {
                        format!("could not start: {}", x.spawn_failure)
                    }
                    _ if x.timed_out => "timed out".into(),
                    (Some(code), _) => format!("exited {code}"),
                    (None, Some(sig)) => format!("killed by signal {sig}"),
                    _ => "ended".into(),
                };
                eprintln!(
                    "bridle: ■ {} {how} ({} ms)",
                    self.step_label(x.step),
                    x.duration_ms
                );
            }
            Some(E::Finished(f)) => {
                let r = get_run(c, &self.id).await?;
                eprintln!(
                    "bridle: run {} {}{}",
                    self.id,
                    run_state_name(f.state),
                    if f.reason.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", f.reason)
                    }
                );
                return Ok(Some(run_exit_code(&r)));
            }
            _ => {}
        }
        Ok(None)
    }

    /// Writes a step's output from the first byte not yet written to what
    /// is stored now; the output events this covers are then skipped.
    async fn write_output(&mut self, c: &mut Conn, o: &pb::StepOutput) -> anyhow::Result<()> {
        let key = (o.step, o.stream);
        let from = self.written.get(&key).copied().unwrap_or(0);
        if o.offset + o.length <= from {
            return Ok(());
        }
        let mut logs = c
            .runs
            .logs(pb::LogsRequest {
                run_id: self.id.clone(),
                step: o.step,
                stream: o.stream,
                from_offset: from,
            })
            .await?
            .into_inner();
        while let Some(chunk) = logs.message().await? {
            if o.stream == pb::LogStream::Stderr as i32 {
                std::io::Write::write_all(&mut std::io::stderr(), &chunk.data)?;
            } else {
                std::io::Write::write_all(&mut std::io::stdout(), &chunk.data)?;
                std::io::Write::flush(&mut std::io::stdout())?;
            }
            // Chunk by chunk, so that a lost connection resumes mid-output.
            self.written
                .insert(key, chunk.offset + chunk.data.len() as u64);
        }
        Ok(())
    }

    /// Prints an event as one JSON line; answers the run's exit code after
    /// its last event.
    async fn print_event_json(
        &mut self,
        c: &mut Conn,
        ev: &pb::RunEvent,
    ) -> anyhow::Result<Option<u8>> {
        use pb::run_event::Event as E;
        let mut text = None;
        let mut exit = None;
        match &ev.event {
            Some(E::StepOutput(o)) => text = Some(self.output_text(c, o).await?),
            Some(E::Finished(_)) => exit = Some(run_exit_code(&get_run(c, &self.id).await?)),
            _ => {}
        }
        print_json_line(&RunEventView::new(ev, text))?;
        Ok(exit)
    }

    /// The bytes of one output event (from Logs) as text. A character the
    /// event's end cuts in two is held back and begins the next event's
    /// text of the same stream; bytes that are not UTF-8 become U+FFFD
    /// (`bridle runs logs` has them exactly).
    async fn output_text(&mut self, c: &mut Conn, o: &pb::StepOutput) -> anyhow::Result<String> {
        let key = (o.step, o.stream);
        let end = o.offset + o.length;
        let mut bytes = self.held.get(&key).cloned().unwrap_or_default();
        let mut logs = c
            .runs
            .logs(pb::LogsRequest {
                run_id: self.id.clone(),
                step: o.step,
                stream: o.stream,
                from_offset: o.offset,
            })
            .await?
            .into_inner();
        // Logs goes on to the end of the stream; this event is [offset, end).
        while let Some(chunk) = logs.message().await? {
            let take = end
                .saturating_sub(chunk.offset)
                .min(chunk.data.len() as u64) as usize;
            bytes.extend_from_slice(&chunk.data[..take]);
            if chunk.offset + chunk.data.len() as u64 >= end {
                break;
            }
        }
        let held = bytes.split_off(bytes.len() - incomplete_utf8_tail(&bytes));
        self.held.insert(key, held);
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }
}

async fn get_run(c: &mut Conn, id: &str) -> anyhow::Result<pb::Run> {
    Ok(c.runs
        .get(pb::GetRunRequest {
            run_id: id.to_string(),
        })
        .await?
        .into_inner())
}

/// How many bytes at the end of `b` are the start of a UTF-8 character
/// whose rest has not come yet (0 when the last one is whole or invalid).
fn incomplete_utf8_tail(b: &[u8]) -> usize {
    // A character is at most 4 bytes: its first byte is among the last 3
    // if it is incomplete.
    for back in 1..=b.len().min(3) {
        let start = b.len() - back;
        let is_continuation = b[start] & 0xC0 == 0x80;
        if !is_continuation {
            return match std::str::from_utf8(&b[start..]) {
                Err(e) if e.error_len().is_none() => back,
                _ => 0,
            };
        }
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_character_cut_in_two_is_held_back() {
        assert_eq!(incomplete_utf8_tail(b""), 0);
        assert_eq!(incomplete_utf8_tail(b"plain"), 0);
        assert_eq!(incomplete_utf8_tail("h\u{e9}".as_bytes()), 0);
        assert_eq!(incomplete_utf8_tail(b"h\xc3"), 1);
        assert_eq!(incomplete_utf8_tail(b"x\xe2\x82"), 2);
        assert_eq!(incomplete_utf8_tail(b"\xf0\x9f\x98"), 3);
        assert_eq!(incomplete_utf8_tail(b"\xf0\x9f\x98\x80"), 0);
        // Not UTF-8 at all: nothing to wait for.
        assert_eq!(incomplete_utf8_tail(b"a\xff"), 0);
        assert_eq!(incomplete_utf8_tail(b"a\x80"), 0);
    }

    #[test]
    fn a_run_exits_with_its_failing_steps_code() {
        let step = |state: pb::StepState, code: Option<i32>| pb::StepStatus {
            state: state as i32,
            exit_code: code,
            ..Default::default()
        };
        let finished = |state: pb::RunState, steps: Vec<pb::StepStatus>| pb::Run {
            state: state as i32,
            steps,
            ..Default::default()
        };
        assert_eq!(run_exit_code(&finished(pb::RunState::Succeeded, vec![])), 0);
        assert_eq!(
            run_exit_code(&finished(pb::RunState::Cancelled, vec![])),
            130
        );
        assert_eq!(
            run_exit_code(&finished(pb::RunState::Interrupted, vec![])),
            75
        );
        let failed = vec![
            step(pb::StepState::Failed, Some(3)),
            step(pb::StepState::Succeeded, Some(0)),
            step(pb::StepState::Failed, Some(300)),
        ];
        assert_eq!(run_exit_code(&finished(pb::RunState::Failed, failed)), 255);
        let killed = vec![step(pb::StepState::Failed, None)];
        assert_eq!(run_exit_code(&finished(pb::RunState::Failed, killed)), 1);
    }
}
