//! Following an agent session (a run with `agent`): its transcript as a
//! person reads it, or its events as JSON lines, until the session waits
//! for its client (it answered, or a client tool call is its client's to
//! carry out) or ends; and the exit code that says which.
//!
//! Shared by `bridle agent run`/`send` and `bridle runs watch`, so that a
//! session reads the same whichever command follows it. The transcript
//! goes to stderr and the model's answer, at the end, to stdout: a script
//! that runs `bridle agent run` gets the answer alone.

use std::collections::HashMap;
use std::io::IsTerminal;

use bridle_client::control as pb;
use tonic::Status;

use crate::conn::Conn;
use crate::render::{
    print_json_line, print_line, run_state_name, short_line, usage_text, RunEventView,
};

/// The exit code of a follow that ends with the session waiting for its
/// client's result of a client tool call (`bridle agent send RUN --call-id
/// ID --result …` answers it).
pub(crate) const AWAITING_TOOL_RESULT_EXIT: u8 = 10;

/// Characters of a tool result's first line that its summary shows.
const SUMMARY_CHARS: usize = 120;
/// Characters of a tool call's arguments that the transcript shows.
const ARGUMENTS_CHARS: usize = 200;

/// The exit code a session's state stands for when a follow ends there: 0
/// idle (the model answered) or succeeded, [`AWAITING_TOOL_RESULT_EXIT`]
/// waiting for a client tool's result, and as for a job's run 130
/// cancelled, 75 interrupted, 1 failed (a session has no step whose code
/// could say more).
pub(crate) fn session_exit_code(state: i32) -> u8 {
    match pb::RunState::try_from(state) {
        Ok(pb::RunState::Idle | pb::RunState::Succeeded) => 0,
        Ok(pb::RunState::AwaitingToolResult) => AWAITING_TOOL_RESULT_EXIT,
        Ok(pb::RunState::Cancelled) => 130,
        Ok(pb::RunState::Interrupted) => 75,
        _ => 1,
    }
}

/// One line standing for a tool's result: its first line that is not
/// blank, cut to [`SUMMARY_CHARS`] characters (`…` when cut or when more
/// lines follow), `(error)` when the result is an error, and the size of
/// the whole result (`full_bytes`; the content's own size when 0).
pub(crate) fn result_summary(content: &str, is_error: bool, full_bytes: u64) -> String {
    // The first line (a command's status) and the last (where its output
    // ended up), each cut short.
    let lines: Vec<&str> = content.lines().filter(|l| !l.trim().is_empty()).collect();
    let shown = match lines.as_slice() {
        [] => "(empty)".to_string(),
        [only] => short_line(only.trim_end(), SUMMARY_CHARS),
        [first, .., last] => format!(
            "{} … {}",
            short_line(first.trim_end(), SUMMARY_CHARS / 2),
            short_line(last.trim_end(), SUMMARY_CHARS / 2)
        ),
    };
    let error = if is_error { " (error)" } else { "" };
    let bytes = if full_bytes > 0 {
        full_bytes
    } else {
        content.len() as u64
    };
    format!("{shown}{error} ({bytes} B)")
}

/// How a decision on a tool call reads in the transcript; none for a call
/// that simply goes ahead (allowed, or approved: the approval says so).
fn decision_line(d: &pb::ToolCallDecided) -> Option<String> {
    match d.outcome.as_str() {
        "allowed" | "approved" => None,
        "client" => Some(format!(
            "⇄ {} ({}) is the client's to carry out",
            d.tool, d.call_id
        )),
        outcome => {
            let reason = if d.reason.is_empty() {
                String::new()
            } else {
                format!(": {}", short_line(&d.reason, ARGUMENTS_CHARS))
            };
            Some(format!("✗ {} ({}) {outcome}{reason}", d.tool, d.call_id))
        }
    }
}

/// The state a session is left waiting in by `ev`, if it is one that ends
/// a follow: the model answered (idle; unless `closing`, when the end comes
/// right after), or a client tool call is the client's (awaiting its
/// result), or the run finished.
fn ends_follow(ev: &pb::RunEvent, closing: bool) -> Option<i32> {
    use pb::run_event::Event as E;
    match &ev.event {
        Some(E::Finished(f)) => Some(f.state),
        Some(E::TurnFinished(_)) if !closing => Some(pb::RunState::Idle as i32),
        Some(E::ToolCallDecided(d)) if d.outcome == "client" => {
            Some(pb::RunState::AwaitingToolResult as i32)
        }
        _ => None,
    }
}

/// Whether a follow that has printed everything up to the run's state ends
/// there: the session waits for its client, or is over.
fn waits_or_ended(state: i32) -> bool {
    matches!(
        pb::RunState::try_from(state),
        Ok(pb::RunState::Idle
            | pb::RunState::AwaitingToolResult
            | pb::RunState::Succeeded
            | pb::RunState::Failed
            | pb::RunState::Cancelled
            | pb::RunState::Interrupted)
    )
}

/// Follows session `id` from event `from_seq` until it waits for its client
/// or ends, and answers the exit code that says which (see
/// [`session_exit_code`]). `closing`: the session was asked to close after
/// its turn, and the follow waits for that end rather than stopping at the
/// answer. When the control plane goes away, follows again from the first
/// event not yet printed, as `bridle runs watch` does for a job.
pub(crate) async fn follow_session(
    c: &mut Conn,
    id: &str,
    from_seq: u64,
    closing: bool,
) -> anyhow::Result<u8> {
    let mut follower = SessionFollower::new(id, c.json, from_seq, closing);
    crate::conn::follow_resuming(c, &mut follower).await
}

/// How far a session's follower got, so that following again over a new
/// connection repeats nothing and skips nothing.
struct SessionFollower {
    id: String,
    json: bool,
    closing: bool,
    /// The first stored event not yet printed.
    next_seq: u64,
    /// The run's last event when this attempt began: streamed text is
    /// printed only once the stored events up to it are, so that it never
    /// shows amid older ones.
    caught_up_at: u64,
    /// The turn whose text is streaming, and its text printed so far.
    streamed: Option<(u32, String)>,
    /// The text of the last model answer printed.
    last_answer: Option<String>,
    /// The turn of the last model answer printed: text streamed for it
    /// (or before it) is not printed again.
    last_turn: u32,
    /// The tool of each call the model made, by call id.
    tools: HashMap<String, String>,
    /// Whether stderr is in the middle of a line of model text.
    mid_line: bool,
}

impl crate::conn::Follower for SessionFollower {
    fn next_seq(&self) -> u64 {
        self.next_seq
    }

    fn what(&self) -> String {
        format!("session {}", self.id)
    }

    async fn attempt(&mut self, c: &mut Conn) -> anyhow::Result<u8> {
        self.follow_once(c).await
    }
}

impl SessionFollower {
    fn new(id: &str, json: bool, from_seq: u64, closing: bool) -> Self {
        Self {
            id: id.to_string(),
            json,
            closing,
            next_seq: from_seq.max(1),
            caught_up_at: 0,
            streamed: None,
            last_answer: None,
            last_turn: 0,
            tools: HashMap::new(),
            mid_line: false,
        }
    }

    /// One attempt: watches from `next_seq` until the session waits or
    /// ends (answering the exit code) or the stream fails.
    async fn follow_once(&mut self, c: &mut Conn) -> anyhow::Result<u8> {
        let run = get_run(c, &self.id).await?;
        self.caught_up_at = run.last_seq;
        // Where the run stands now is where the follow ends, once the
        // events up to now are printed: already, or on the way. Without
        // this, a session that waits would be watched for ever.
        let ends_at = waits_or_ended(run.state).then_some((run.last_seq, run.state));
        if let Some((_, state)) = ends_at.filter(|(last, _)| *last < self.next_seq) {
            return self.conclude(c, state).await;
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
            // Streamed text is never stored: it has no sequence number.
            if ev.seq == 0 {
                if self.next_seq > self.caught_up_at {
                    self.print_transient(&ev)?;
                }
                continue;
            }
            if ev.seq < self.next_seq {
                continue;
            }
            if self.json {
                print_json_line(&RunEventView::new(&ev, None))?;
            } else {
                self.print_event_text(&ev);
            }
            self.next_seq = ev.seq + 1;
            // An event from before the follow began ends it only if it
            // is the last one then, with the session waiting or over (an
            // earlier turn's end is not where it stands); a newer one
            // ends it by what it is.
            let end = if ev.seq > self.caught_up_at {
                ends_follow(&ev, self.closing)
            } else {
                ends_at
                    .filter(|(last, _)| ev.seq >= *last)
                    .map(|(_, state)| state)
            };
            if let Some(state) = end {
                return self.conclude(c, state).await;
            }
        }
        // The server ends the stream only after a finished run's last
        // event; an earlier end means it is going away.
        Err(Status::unavailable("the event stream ended before the session waited or ended").into())
    }

    /// An event that is not stored (the model's text as it streams).
    fn print_transient(&mut self, ev: &pb::RunEvent) -> anyhow::Result<()> {
        use pb::run_event::Event as E;
        if self.json {
            return print_json_line(&RunEventView::new(ev, None));
        }
        if let Some(E::TextDelta(d)) = &ev.event {
            if d.turn <= self.last_turn {
                return Ok(());
            }
            if !matches!(&self.streamed, Some((turn, _)) if *turn == d.turn) {
                self.streamed = Some((d.turn, String::new()));
            }
            if let Some((_, text)) = &mut self.streamed {
                text.push_str(&d.text);
            }
            self.write_text(&d.text);
        }
        Ok(())
    }

    /// Prints a stored event of the transcript for a person, on stderr.
    fn print_event_text(&mut self, ev: &pb::RunEvent) {
        use pb::run_event::Event as E;
        match &ev.event {
            Some(E::UserMessage(m)) => {
                let close = if m.close { " (then close)" } else { "" };
                self.say(format!(
                    "> {}{close}",
                    short_line(m.text.trim(), SUMMARY_CHARS)
                ));
            }
            Some(E::ModelRequested(m)) => {
                // Text streamed for an earlier attempt at this turn is not
                // what the answer will hold.
                self.streamed = None;
                if m.resent {
                    self.say(format!(
                        "bridle: turn {}: the model request is sent again (its answer was lost in a restart)",
                        m.turn
                    ));
                }
            }
            Some(E::ModelResponded(m)) => self.print_answer(m),
            Some(E::ToolCallDecided(d)) => {
                if let Some(line) = decision_line(d) {
                    self.say(line);
                }
            }
            Some(E::ToolResult(r)) => {
                self.say(format!(
                    "← {}",
                    result_summary(&r.content, r.is_error, r.full_bytes)
                ));
            }
            Some(E::ApprovalRequested(a)) => {
                let what = if !a.call_id.is_empty() {
                    self.call_label(&a.call_id)
                } else if a.for_network {
                    "the session's network".to_string()
                } else {
                    "the session".to_string()
                };
                self.say(format!(
                    "bridle: ⏸ {what} waits for approval {} (an operator: `bridle approvals approve {} --reason …`)",
                    a.approval_id, a.approval_id
                ));
            }
            Some(E::ApprovalDecided(a)) => {
                let by = if a.by.is_empty() {
                    String::new()
                } else {
                    format!(" by {}: {}", a.by, a.reason)
                };
                self.say(format!(
                    "bridle: approval {} {}{by}",
                    a.approval_id, a.outcome
                ));
            }
            Some(E::ContextCompacted(x)) => {
                self.say(format!(
                    "bridle: context compacted: {} messages replaced, ~{} → ~{} tokens",
                    x.messages, x.tokens_before, x.tokens_after
                ));
            }
            _ => {}
        }
    }

    /// A model answer: its text (what was not streamed already), then each
    /// tool call with its arguments.
    fn print_answer(&mut self, m: &pb::ModelResponded) {
        let streamed = match self.streamed.take() {
            Some((turn, text)) if turn == m.turn => text,
            _ => String::new(),
        };
        match m.text.strip_prefix(streamed.as_str()) {
            Some(rest) => self.write_text(rest),
            None => {
                // The stream showed something else (a request sent again):
                // the answer whole, on a line of its own.
                self.end_line();
                self.write_text(&m.text);
            }
        }
        self.end_line();
        for call in &m.tool_calls {
            self.tools.insert(call.call_id.clone(), call.tool.clone());
            self.say(format!(
                "→ {} {}",
                call.tool,
                short_line(&call.arguments_json, ARGUMENTS_CHARS)
            ));
        }
        self.last_answer = Some(m.text.clone());
        self.last_turn = m.turn;
    }

    /// A call as the transcript names it: its tool, when known, and id.
    fn call_label(&self, call_id: &str) -> String {
        match self.tools.get(call_id) {
            Some(tool) => format!("{tool} call ({call_id})"),
            None => format!("call {call_id}"),
        }
    }

    /// Model text on stderr, as it comes.
    fn write_text(&mut self, text: &str) {
        if text.is_empty() {
            return;
        }
        eprint!("{text}");
        self.mid_line = !text.ends_with('\n');
    }

    /// Ends a line of model text left open.
    fn end_line(&mut self) {
        if self.mid_line {
            eprintln!();
            self.mid_line = false;
        }
    }

    /// A line of the transcript on stderr, on a line of its own.
    fn say(&mut self, line: String) {
        self.end_line();
        eprintln!("{line}");
    }

    /// The end of a follow, the session in `state`: what it waits for or
    /// how it ended, what it used, and the answer (on stdout); answers the
    /// exit code.
    async fn conclude(&mut self, c: &mut Conn, state: i32) -> anyhow::Result<u8> {
        let run = get_run(c, &self.id).await?;
        let code = session_exit_code(state);
        let state = pb::RunState::try_from(state).unwrap_or(pb::RunState::Unspecified);
        let reason = if run.reason.is_empty() {
            String::new()
        } else {
            format!(": {}", run.reason.replace('\n', " "))
        };
        if self.json {
            // The events say it all; a failure gets its one line.
            if code != 0 && state != pb::RunState::AwaitingToolResult {
                eprintln!(
                    "bridle: run {} {}{reason}",
                    self.id,
                    run_state_name(state as i32)
                );
            }
            return Ok(code);
        }
        self.end_line();
        let session = run.session.unwrap_or_default();
        match state {
            pb::RunState::Idle => eprintln!(
                "bridle: session {} waits for the next message: bridle agent send {} \"…\" (or --close)",
                self.id, self.id
            ),
            pb::RunState::AwaitingToolResult => {
                for call in &session.pending_tool_calls {
                    eprintln!(
                        "bridle: session {} waits for the result of client tool call {}: {} {}",
                        self.id,
                        call.call_id,
                        call.tool,
                        short_line(&call.arguments_json, ARGUMENTS_CHARS)
                    );
                    eprintln!(
                        "bridle: answer it: bridle agent send {} --call-id {} --result '…' [--error]",
                        self.id, call.call_id
                    );
                }
            }
            _ => eprintln!(
                "bridle: run {} {}{reason}",
                self.id,
                run_state_name(state as i32)
            ),
        }
        if let Some(usage) = &session.usage {
            eprintln!("bridle: usage: {}", usage_text(usage));
        }
        // Idle: the answer the session waits after. Succeeded: the answer
        // of the last message, when this follow saw it come.
        let answered = state == pb::RunState::Idle
            || (state == pb::RunState::Succeeded && self.last_answer.is_some());
        // On a terminal, an answer the transcript just showed is not
        // shown again.
        let just_shown = self.last_answer.as_deref() == Some(session.answer.as_str())
            && std::io::stdout().is_terminal()
            && std::io::stderr().is_terminal();
        if answered && !session.answer.is_empty() && !just_shown {
            print_line(session.answer.trim_end_matches('\n'))?;
        }
        Ok(code)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_state_maps_to_its_exit_code() {
        let code = |s: pb::RunState| session_exit_code(s as i32);
        assert_eq!(code(pb::RunState::Idle), 0);
        assert_eq!(code(pb::RunState::Succeeded), 0);
        assert_eq!(
            code(pb::RunState::AwaitingToolResult),
            AWAITING_TOOL_RESULT_EXIT
        );
        assert_eq!(code(pb::RunState::Failed), 1);
        assert_eq!(code(pb::RunState::Cancelled), 130);
        assert_eq!(code(pb::RunState::Interrupted), 75);
        assert_eq!(session_exit_code(99), 1);
        // The distinct code collides with none of the others.
        for other in [0, 1, 2, 3, 4, 5, 6, 75, 130] {
            assert_ne!(AWAITING_TOOL_RESULT_EXIT, other);
        }
    }

    #[test]
    fn a_follow_ends_where_the_session_waits_or_ends() {
        assert!(waits_or_ended(pb::RunState::Idle as i32));
        assert!(waits_or_ended(pb::RunState::AwaitingToolResult as i32));
        assert!(waits_or_ended(pb::RunState::Failed as i32));
        assert!(!waits_or_ended(pb::RunState::Running as i32));
        assert!(!waits_or_ended(pb::RunState::AwaitingApproval as i32));
        // A state this client does not know is followed, not taken for an end.
        assert!(!waits_or_ended(0));
        assert!(!waits_or_ended(99));
        let ev = |e: pb::run_event::Event| pb::RunEvent {
            seq: 5,
            event: Some(e),
            ..Default::default()
        };
        let turn = ev(pb::run_event::Event::TurnFinished(pb::TurnFinished {
            turn: 1,
        }));
        assert_eq!(ends_follow(&turn, false), Some(pb::RunState::Idle as i32));
        assert_eq!(ends_follow(&turn, true), None);
        let decided = |outcome: &str| {
            ev(pb::run_event::Event::ToolCallDecided(pb::ToolCallDecided {
                outcome: outcome.into(),
                ..Default::default()
            }))
        };
        assert_eq!(
            ends_follow(&decided("client"), true),
            Some(pb::RunState::AwaitingToolResult as i32)
        );
        assert_eq!(ends_follow(&decided("allowed"), false), None);
    }

    #[test]
    fn a_tool_result_is_summed_up_in_one_line() {
        assert_eq!(result_summary("hello\n", false, 6), "hello (6 B)");
        assert_eq!(
            result_summary("\n\nfirst\nmiddle\nlast\n", false, 0),
            "first … last (20 B)"
        );
        assert_eq!(
            result_summary("no such file", true, 12),
            "no such file (error) (12 B)"
        );
        assert_eq!(result_summary("", false, 0), "(empty) (0 B)");
        // The size is the whole result's, not the shown part's.
        assert_eq!(result_summary("head", false, 1 << 20), "head (1048576 B)");
        let long = "x".repeat(500);
        let line = result_summary(&long, false, 500);
        assert!(line.starts_with(&"x".repeat(SUMMARY_CHARS - 1)), "{line}");
        assert!(line.ends_with("… (500 B)"), "{line}");
        assert_eq!(line.chars().count(), SUMMARY_CHARS + " (500 B)".len());
        // Control characters (a terminal's escapes) are not passed on.
        assert_eq!(result_summary("a\tb\u{1b}[2J", false, 0), "a b [2J (7 B)");
    }

    #[test]
    fn only_refusals_and_client_calls_show_as_decisions() {
        let d = |outcome: &str, reason: &str| pb::ToolCallDecided {
            call_id: "c1".into(),
            tool: "shell".into(),
            outcome: outcome.into(),
            reason: reason.into(),
        };
        assert_eq!(decision_line(&d("allowed", "")), None);
        assert_eq!(decision_line(&d("approved", "")), None);
        assert_eq!(
            decision_line(&d("denied", "policy forbids")).as_deref(),
            Some("✗ shell (c1) denied: policy forbids")
        );
        assert_eq!(
            decision_line(&d("client", "")).as_deref(),
            Some("⇄ shell (c1) is the client's to carry out")
        );
    }
}
