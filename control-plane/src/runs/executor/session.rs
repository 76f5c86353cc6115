//! Agent sessions: a run whose work is a goal. The loop — rebuild the
//! conversation from the log, ask the model, decide each tool call through
//! the guard, run it, record its result — appends every transition before
//! the action it announces, so a session driven again after a crash goes on
//! from its log (docs/harness.md, docs/recovery.md):
//!
//! - a recorded answer is never asked for again;
//! - a tool whose start was recorded is re-attached by its exec id (a file
//!   write is redone with the content recorded), never decided or run anew;
//! - a call decided but not started is started once;
//! - a request with no recorded answer is sent again and counted
//!   (`ModelRequested` twice for one turn): the one repeat a crash causes.
//!
//! A session waits without a driver: `idle` for a user message, and
//! `awaiting_tool_result` for its client; [`Runner::send`] records what the
//! client sends and schedules the session again.

use std::collections::HashMap;

use futures::StreamExt;
use tokio::sync::broadcast;

use super::{Decided, Error, Result, Run, Runner};
use crate::guard::facts;
use crate::harness::limits::{self, LoopDetector, Spent};
use crate::harness::providers::{Message, ModelResponse, Provider, ToolCall};
use crate::harness::task::{AgentTask, FIRST_MESSAGE_ID};
use crate::harness::tools::builtin::Action;
use crate::harness::tools::text;
use crate::harness::tools::{Registry, Valid};
use crate::harness::transcript::{sha256_hex, Next, Record, Recorder, Transcript};
use crate::host::{Agent, AgentError, ExecEvent, ExecSpec, Host};
use crate::runs::events::{CallGate, Event, Gate, RunState, RunView};
use crate::runs::job::Command;
use crate::runs::store::EventStore;

/// Model text as it streams, for `Watch` (never stored).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TextDelta {
    pub turn: u32,
    pub text: String,
}

/// What a client sends to a session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SendInput {
    /// A user message, for an idle session.
    Message(String),
    /// The result of a client tool call the session waits for.
    ToolResult {
        call_id: String,
        content: String,
        is_error: bool,
    },
    /// Nothing: with `close`, ends an idle session now.
    Nothing,
}

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error(transparent)]
    Run(#[from] Error),
    #[error("run {0} is a job, not an agent session")]
    NotASession(String),
    #[error("session {run_id} has ended ({state})")]
    Finished { run_id: String, state: &'static str },
    #[error("session {run_id} is {state}; {what}")]
    State {
        run_id: String,
        state: &'static str,
        what: &'static str,
    },
    #[error("session {run_id} waits for no result of call {call_id:?}{waiting}")]
    UnknownCall {
        run_id: String,
        call_id: String,
        waiting: String,
    },
    #[error("{0}")]
    Invalid(String),
}

/// How handling one tool call ended.
enum Flow {
    /// Its result is recorded: on to the next.
    Next,
    /// The session waits (for its client); the driver stops.
    Park,
    /// The session has ended.
    Ended,
}

/// What one session's driving works with besides the run.
struct Session {
    task: AgentTask,
    provider: Provider,
    registry: Registry,
    recorder: Recorder,
    transcript: Transcript,
    loops: LoopDetector,
    started_unix_ms: i64,
    /// The usage of a summary call, recorded with its compaction.
    pending_usage: Option<(crate::harness::providers::Usage, Option<f64>)>,
}

/// The exec id of a session's tool call: the reserved prefix (no client can
/// start or signal it), the run, a digest of the call id (a model's call ids
/// are any text), and a random part.
fn call_exec_id(run_id: &str, call_id: &str) -> String {
    format!(
        "{}sess.{run_id}.{}.{}",
        crate::sandboxes::RESERVED_EXEC_ID_PREFIX,
        &sha256_hex(call_id.as_bytes())[..16],
        crate::ids::random_hex(8)
    )
}

impl<H: Host, S: EventStore> Runner<H, S> {
    /// New model text of a session as it streams.
    pub fn subscribe_deltas(&self, run_id: &str) -> broadcast::Receiver<TextDelta> {
        self.live(run_id).deltas.subscribe()
    }

    /// The server's harness settings (models, maxima).
    pub fn harness(&self) -> &crate::harness::Settings {
        &self.inner.harness
    }

    /// Records what a client sends to session `run_id` and schedules the
    /// session to go on. The same `message_id` again answers the session as
    /// it is, adding nothing.
    pub async fn send(
        &self,
        run_id: &str,
        message_id: &str,
        input: SendInput,
        close: bool,
    ) -> std::result::Result<RunView, SendError> {
        let live = self.live(run_id);
        // One send at a time per session: the state checked is the state
        // appended after.
        let _one = live.sending.lock().await;
        let mut view = self.view(run_id).await?;
        let Some(session) = view.session.clone() else {
            return Err(SendError::NotASession(run_id.into()));
        };
        if session.message_ids.contains(message_id) {
            return Ok(view);
        }
        if view.state.is_finished() {
            return Err(SendError::Finished {
                run_id: run_id.into(),
                state: view.state.as_str(),
            });
        }
        let settings = &self.inner.harness;
        match input {
            SendInput::Message(text) => {
                if view.state != RunState::Idle {
                    return Err(SendError::State {
                        run_id: run_id.into(),
                        state: view.state.as_str(),
                        what: "a message can be sent once it is idle (it has answered)",
                    });
                }
                if text.len() > crate::harness::task::MAX_MESSAGE_BYTES {
                    return Err(SendError::Invalid(format!(
                        "message: at most {} bytes",
                        crate::harness::task::MAX_MESSAGE_BYTES
                    )));
                }
                let sha = sha256_hex(text.as_bytes());
                self.inner
                    .store
                    .put_blob(&sha, text.as_bytes())
                    .await
                    .map_err(Error::from)?;
                let event = Event::UserMessage {
                    message_id: message_id.into(),
                    text_sha256: sha,
                    close,
                };
                self.record(run_id, &mut view, event).await?;
            }
            SendInput::ToolResult {
                call_id,
                content,
                is_error,
            } => {
                let waiting: Vec<&String> = session
                    .calls
                    .iter()
                    .filter(|(_, c)| c.outcome == "client" && !c.answered)
                    .map(|(id, _)| id)
                    .collect();
                if !waiting.contains(&&call_id) {
                    return Err(SendError::UnknownCall {
                        run_id: run_id.into(),
                        call_id,
                        waiting: if waiting.is_empty() {
                            " (it waits for none)".into()
                        } else {
                            format!(" (it waits for {waiting:?})")
                        },
                    });
                }
                let event = self
                    .result_event(&call_id, content.as_bytes(), is_error, message_id)
                    .await?;
                self.record(run_id, &mut view, event).await?;
                let _ = settings;
            }
            SendInput::Nothing => {
                if !close {
                    return Err(SendError::Invalid(
                        "send a message, a tool_result, or close".into(),
                    ));
                }
                if view.state != RunState::Idle {
                    return Err(SendError::State {
                        run_id: run_id.into(),
                        state: view.state.as_str(),
                        what: "it can be closed without a message once it is idle; cancel it to end it now",
                    });
                }
                // Its driver collects the artifacts and ends it.
                let event = Event::CloseRequested {
                    message_id: message_id.into(),
                };
                self.record(run_id, &mut view, event).await?;
            }
        }
        self.schedule(&view.owner, run_id);
        Ok(view)
    }

    /// The `ToolResult` event for `content`, its blobs stored: a result
    /// longer than the session's cap is stored whole and shown to the model
    /// as its head and tail.
    async fn result_event(
        &self,
        call_id: &str,
        content: &[u8],
        is_error: bool,
        message_id: &str,
    ) -> Result<Event> {
        let max = self.inner.harness.max_result_bytes;
        let (shown, cut) = text::cap_head_tail(content, max);
        let full_sha256 = match cut {
            Some(_) => {
                let sha = sha256_hex(content);
                self.inner.store.put_blob(&sha, content).await?;
                Some(sha)
            }
            None => None,
        };
        let sha = sha256_hex(shown.as_bytes());
        self.inner.store.put_blob(&sha, shown.as_bytes()).await?;
        Ok(Event::ToolResult {
            call_id: call_id.into(),
            content_sha256: sha,
            is_error,
            full_sha256,
            full_bytes: content.len() as u64,
            message_id: message_id.into(),
        })
    }

    /// Drives a session from where its log stands until it waits (idle,
    /// or for its client) or ends.
    pub(super) async fn run_session(&self, run: &mut Run<'_>, sandbox_id: &str) -> Result<()> {
        match self.session_loop(run, sandbox_id).await {
            // A conversation that cannot go on ends the session, saying why
            // (rather than leave it running with nothing driving it).
            Err(Error::Conversation(_, why)) => {
                let reason = format!("the session's conversation cannot go on: {why}");
                self.finish(run.id, run.view, RunState::Interrupted, reason)
                    .await
            }
            other => other,
        }
    }

    async fn session_loop(&self, run: &mut Run<'_>, sandbox_id: &str) -> Result<()> {
        let task = run
            .view
            .job
            .agent
            .clone()
            .expect("run_session is called for sessions");
        let settings = &self.inner.harness;
        let Some(provider) = settings.providers.get(&task.model).cloned() else {
            let reason = format!(
                "model {:?} is not configured on this server any more ([[model]])",
                task.model
            );
            return self
                .finish(run.id, run.view, RunState::Failed, reason)
                .await;
        };
        let registry = match task.registry(settings.tool_timeout_secs) {
            Ok(r) => r,
            Err(e) => {
                return self
                    .finish(run.id, run.view, RunState::Failed, format!("tools: {e}"))
                    .await
            }
        };
        let recorder = Recorder::new(
            task.instructions.clone(),
            registry.specs(),
            provider.config().max_output_tokens,
        );
        let events = self.inner.store.events(run.id, 1).await?;
        let started_unix_ms = events.first().map_or(0, |e| e.unix_ms);
        let mut session = Session {
            loops: LoopDetector::new(task.loop_threshold),
            task,
            provider,
            registry,
            recorder,
            transcript: Transcript::default(),
            started_unix_ms,
            pending_usage: None,
        };
        // The conversation, rebuilt from the log exactly as it was seen.
        let mut looping = None;
        for e in &events {
            let Some(entry) = e.event.transcript_entry() else {
                continue;
            };
            let blobs = self.blobs_of(&entry).await?;
            if let Err(err) = session
                .transcript
                .apply(&entry, &|sha: &str| blobs.get(sha).cloned())
            {
                let reason = format!("the session's log cannot be replayed: {err}");
                return self
                    .finish(run.id, run.view, RunState::Interrupted, reason)
                    .await;
            }
            if let Event::ModelResponded { .. } = e.event {
                if let Some(Message::Assistant { tool_calls, .. }) =
                    session.transcript.messages().last()
                {
                    for call in tool_calls {
                        looping = looping.or(session.loops.observe(call));
                    }
                }
            }
        }
        if let Some(found) = looping {
            return self
                .finish(run.id, run.view, RunState::Failed, found.to_string())
                .await;
        }
        loop {
            if *run.cancel.borrow() {
                return self.finish_cancelled(run).await;
            }
            match session.transcript.next() {
                Next::UserMessage => {
                    let event = Event::UserMessage {
                        message_id: FIRST_MESSAGE_ID.into(),
                        text_sha256: session.task.first_message_sha256.clone(),
                        close: false,
                    };
                    self.record_conversation(run, &mut session, event).await?;
                }
                Next::Model => {
                    if !self.model_turn(run, &mut session).await? {
                        return Ok(());
                    }
                }
                Next::ToolResults => {
                    let call = session.transcript.unanswered().remove(0);
                    match self.tool_call(run, &mut session, sandbox_id, &call).await? {
                        Flow::Next => {}
                        Flow::Park | Flow::Ended => return Ok(()),
                    }
                }
                Next::Nothing => {
                    let s = run.view.session.clone().unwrap_or_default();
                    if !s.turn_finished {
                        let turn = s.responses;
                        self.record(run.id, run.view, Event::TurnFinished { turn })
                            .await?;
                    }
                    if s.close_requested {
                        // As a job ends: its artifacts collected, then done.
                        if !self.collect_artifacts(run, sandbox_id).await? {
                            return Ok(());
                        }
                        return self
                            .finish(
                                run.id,
                                run.view,
                                RunState::Succeeded,
                                "closed by its client".into(),
                            )
                            .await;
                    }
                    return Ok(());
                }
            }
        }
    }

    /// The blobs an entry refers to, read from the store.
    async fn blobs_of(
        &self,
        entry: &crate::harness::transcript::Entry,
    ) -> Result<HashMap<String, Vec<u8>>> {
        let mut blobs = HashMap::new();
        if let Some(sha) = entry.blob_sha256() {
            if let Some(data) = self.inner.store.blob(sha).await? {
                blobs.insert(sha.to_string(), data);
            }
        }
        Ok(blobs)
    }

    /// Appends a conversation event and folds it into the live transcript
    /// from the stored blob, as a replay would.
    async fn record_conversation(
        &self,
        run: &mut Run<'_>,
        session: &mut Session,
        event: Event,
    ) -> Result<()> {
        let entry = event.transcript_entry().expect("a conversation event");
        let blobs = self.blobs_of(&entry).await?;
        // Checked before it is written: what a replay would refuse never is.
        let mut next = session.transcript.clone();
        if let Err(e) = next.apply(&entry, &|sha: &str| blobs.get(sha).cloned()) {
            tracing::error!(run = %run.id, "refusing to record {}: {e}", entry.kind());
            return Err(Error::Conversation(
                run.id.into(),
                format!("refusing to record {}: {e}", entry.kind()),
            ));
        }
        self.record(run.id, run.view, event).await?;
        session.transcript = next;
        Ok(())
    }

    /// Stores a record's blobs.
    async fn put_blobs(&self, record: &Record) -> Result<()> {
        for (sha, data) in &record.blobs {
            self.inner.store.put_blob(sha, data).await?;
        }
        Ok(())
    }

    /// The spending so far.
    fn spent(run: &Run<'_>, session: &Session) -> Spent {
        let s = run.view.session.clone().unwrap_or_default();
        Spent {
            iterations: s.responses,
            input_tokens: s.usage.input_tokens,
            output_tokens: s.usage.output_tokens,
            tool_calls: s.tool_calls,
            cost_usd: s.cost_nano_usd as f64 / 1e9,
            started_unix_ms: session.started_unix_ms,
        }
    }

    /// One model call: budgets, compaction, the request recorded, the
    /// answer recorded. Ok(false): the session has ended.
    async fn model_turn(&self, run: &mut Run<'_>, session: &mut Session) -> Result<bool> {
        let spent = Self::spent(run, session);
        if let Some(over) = session
            .task
            .budgets
            .exceeded(&spent, crate::clock::now_ms())
        {
            let reason = format!("budget used up: {over}");
            self.finish(run.id, run.view, RunState::Failed, reason)
                .await?;
            return Ok(false);
        }
        let s = run.view.session.clone().unwrap_or_default();
        // Every model call is a policy request, as the session's submitter.
        let turn = s.responses + 1;
        if s.pending_request.is_none()
            && !s.compacted
            && limits::needs_compaction(s.last_input_tokens, session.provider.config())
            && !self.compact(run, session, turn).await?
        {
            return Ok(false);
        }
        let s = run.view.session.clone().unwrap_or_default();
        let config = session.provider.config().clone();
        let resource = facts::run(run.id, &run.view.owner);
        let model_facts = crate::policy::Facts {
            model: config.name.clone(),
            provider: config.provider.as_str().to_string(),
            ..facts::job(&run.view.job, run.id)
        };
        let gate = Gate::Call(CallGate {
            // `#` is never in a model's call id (`bad_call_id`).
            call_id: format!("#model.{turn}.{}", s.requests),
            request: 0,
        });
        let what = format!("model call {turn} ({})", config.name);
        match self
            .decide(
                run,
                crate::policy::Action::ModelCall,
                &resource,
                &model_facts,
                gate,
                &what,
            )
            .await?
        {
            Decided::Go => {}
            Decided::Ended => return Ok(false),
            Decided::Refused(refused) => {
                self.refused(run.id, run.view, &what, refused).await?;
                return Ok(false);
            }
        }
        let request = match &s.pending_request {
            // Sent before, its answer never recorded: sent again, counted.
            Some((_, hash)) => match session.recorder.rerender(&session.transcript, hash) {
                Ok(request) => request,
                Err(e) => {
                    tracing::warn!(run = %run.id, "the request sent again is not the one recorded: {e}");
                    session
                        .recorder
                        .model_request(&session.transcript, turn)
                        .map(|(r, _)| r)
                        .map_err(|e| self.corrupt(run.id, e))?
                }
            },
            None => session
                .recorder
                .model_request(&session.transcript, turn)
                .map(|(r, _)| r)
                .map_err(|e| self.corrupt(run.id, e))?,
        };
        let (_, record) = session
            .recorder
            .model_request(&session.transcript, turn)
            .map_err(|e| self.corrupt(run.id, e))?;
        let crate::harness::transcript::Entry::ModelRequested {
            request_sha256,
            messages,
            ..
        } = record.entry
        else {
            unreachable!("model_request records a request")
        };
        let requested = Event::ModelRequested {
            turn,
            request_sha256,
            messages,
        };
        self.record_conversation(run, session, requested).await?;
        // The answer, its text streamed to watchers as it comes.
        let deltas = self.live(run.id).deltas.clone();
        let mut on_text = move |text: &str| {
            let _ = deltas.send(TextDelta {
                turn,
                text: text.to_string(),
            });
        };
        let mut stopping = self.inner.shutdown.clone();
        let mut empty_answers = 0;
        let response: ModelResponse = loop {
            let answer = tokio::select! {
                a = session.provider.call(&request, &mut on_text) => a,
                _ = run.cancel.changed() => {
                    self.finish_cancelled(run).await?;
                    return Ok(false);
                }
                _ = stopping.changed() => return Err(Error::Stopping),
            };
            match answer {
                Ok(r) if r.text.is_empty() && r.tool_calls.is_empty() && empty_answers == 0 => {
                    // Neither text nor a call: asked once more, not looped on.
                    empty_answers += 1;
                    tracing::warn!(run = %run.id, "the model answered with nothing; asking once more");
                }
                Ok(r) if r.text.is_empty() && r.tool_calls.is_empty() => {
                    let reason = format!(
                        "model {}: answered twice with neither text nor a tool call (stop reason {:?})",
                        config.name, r.stop
                    );
                    self.finish(run.id, run.view, RunState::Failed, reason)
                        .await?;
                    return Ok(false);
                }
                Ok(r) => break r,
                Err(e) => {
                    let reason = format!("model {}: {e}", config.name);
                    self.finish(run.id, run.view, RunState::Failed, reason)
                        .await?;
                    return Ok(false);
                }
            }
        };
        if response.tool_calls.len() > MAX_CALLS_PER_ANSWER {
            let reason = format!(
                "model {}: its answer makes {} tool calls, more than the {MAX_CALLS_PER_ANSWER} one answer may make",
                config.name,
                response.tool_calls.len()
            );
            self.finish(run.id, run.view, RunState::Failed, reason)
                .await?;
            return Ok(false);
        }
        if let Some(why) = response.tool_calls.iter().find_map(|c| bad_call_id(&c.id)) {
            let reason = format!(
                "model {}: its answer has a call id that cannot be used: {why}",
                config.name
            );
            self.finish(run.id, run.view, RunState::Failed, reason)
                .await?;
            return Ok(false);
        }
        let record = match session
            .recorder
            .model_response(&session.transcript, &response)
        {
            Ok(record) => record,
            Err(e) => {
                let reason = format!("model {}: its answer cannot be used: {e}", config.name);
                self.finish(run.id, run.view, RunState::Failed, reason)
                    .await?;
                return Ok(false);
            }
        };
        self.put_blobs(&record).await?;
        let message_sha256 = record
            .entry
            .blob_sha256()
            .expect("an answer has a blob")
            .to_string();
        let cost_nano_usd = response
            .usage
            .cost_usd(&config)
            .map(|usd| (usd * 1e9).round() as u64);
        let responded = Event::ModelResponded {
            turn,
            message_sha256,
            stop: format!("{:?}", response.stop),
            usage: response.usage,
            cost_nano_usd,
            response_id: response.id.clone(),
            model: response.model.clone(),
        };
        self.record_conversation(run, session, responded).await?;
        for call in &response.tool_calls {
            if let Some(found) = session.loops.observe(call) {
                self.finish(run.id, run.view, RunState::Failed, found.to_string())
                    .await?;
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Compaction, before a model call whose conversation nears the
    /// model's context window: first old tool outputs are cut to head and
    /// tail; if the conversation is still too long, its older turns are
    /// summarised by a model call. Each stage is recorded as a compaction.
    /// Ok(false): the session has ended.
    async fn compact(&self, run: &mut Run<'_>, session: &mut Session, turn: u32) -> Result<bool> {
        let messages = session.transcript.messages();
        let keep_last = 4;
        let per_result = (self.inner.harness.max_result_bytes / 8).max(256);
        if let Some((upto, replacement)) =
            limits::elide_old_tool_outputs(&messages, keep_last, per_result)
        {
            self.record_compaction(run, session, upto, replacement)
                .await?;
        }
        let config = session.provider.config().clone();
        let messages = session.transcript.messages();
        let overhead = (session.task.instructions.len()
            + serde_json::to_vec(&session.registry.specs()).map_or(0, |j| j.len()))
            as u64
            / 4;
        let estimate = limits::estimate_tokens(&messages) + overhead;
        if !limits::needs_compaction(estimate, &config) {
            return Ok(true);
        }
        // The tail kept starts with one of the model's answers, so that the
        // summary (a user message) and it alternate, and every call in it
        // keeps its results.
        let answers: Vec<usize> = (1..messages.len())
            .filter(|&i| matches!(messages[i], Message::Assistant { .. }))
            .collect();
        // The newest answer that leaves `keep_last` messages from it on, or
        // (a short conversation of long messages) the newest there is.
        let Some(upto) = answers
            .iter()
            .rev()
            .find(|&&i| messages.len() - i >= keep_last)
            .or(answers.last())
            .copied()
        else {
            tracing::warn!(run = %run.id, "the conversation nears the context window and cannot be compacted further");
            return Ok(true);
        };
        let what = format!(
            "model call {turn} ({}): a summary for compaction",
            config.name
        );
        let resource = facts::run(run.id, &run.view.owner);
        let model_facts = crate::policy::Facts {
            model: config.name.clone(),
            provider: config.provider.as_str().to_string(),
            ..facts::job(&run.view.job, run.id)
        };
        let gate = Gate::Call(CallGate {
            call_id: format!("#summary.{turn}"),
            request: 0,
        });
        match self
            .decide(
                run,
                crate::policy::Action::ModelCall,
                &resource,
                &model_facts,
                gate,
                &what,
            )
            .await?
        {
            Decided::Go => {}
            Decided::Ended => return Ok(false),
            Decided::Refused(refused) => {
                self.refused(run.id, run.view, &what, refused).await?;
                return Ok(false);
            }
        }
        let old = &messages[..upto];
        let budget_bytes = (config.context_window as usize).saturating_mul(2);
        let request = crate::harness::providers::ModelRequest {
            system: SUMMARY_INSTRUCTIONS.into(),
            messages: vec![Message::User(format!(
                "{SUMMARY_MARKER}\n{}",
                conversation_text(old, budget_bytes)
            ))],
            tools: Vec::new(),
            max_tokens: config.max_output_tokens.min(2048),
        };
        let mut stopping = self.inner.shutdown.clone();
        let mut quiet = |_: &str| {};
        let answer = tokio::select! {
            a = session.provider.call(&request, &mut quiet) => a,
            _ = run.cancel.changed() => {
                self.finish_cancelled(run).await?;
                return Ok(false);
            }
            _ = stopping.changed() => return Err(Error::Stopping),
        };
        let summary = match answer {
            Ok(r) if !r.text.trim().is_empty() => {
                session.pending_usage = Some((r.usage, r.usage.cost_usd(&config)));
                r.text
            }
            Ok(_) => {
                tracing::warn!(run = %run.id, "the summary for compaction came back empty; going on without it");
                return Ok(true);
            }
            Err(e) => {
                let reason = format!("model {}: summarising for compaction: {e}", config.name);
                self.finish(run.id, run.view, RunState::Failed, reason)
                    .await?;
                return Ok(false);
            }
        };
        let goal = old
            .iter()
            .find_map(|m| match m {
                Message::User(text) => Some(text.clone()),
                _ => None,
            })
            .unwrap_or_default();
        let replacement = vec![Message::User(format!(
            "{goal}\n\n[Earlier turns of this session were summarised to stay within the \
             model's context window:]\n{summary}"
        ))];
        let upto = u32::try_from(upto).map_err(|_| {
            self.corrupt(
                run.id,
                crate::harness::transcript::TranscriptError::TooLong(upto),
            )
        })?;
        self.record_compaction(run, session, upto, replacement)
            .await?;
        Ok(true)
    }

    /// Records messages `[0, upto)` replaced by `replacement`.
    async fn record_compaction(
        &self,
        run: &mut Run<'_>,
        session: &mut Session,
        upto: u32,
        replacement: Vec<Message>,
    ) -> Result<()> {
        let messages = session.transcript.messages();
        let before = limits::estimate_tokens(&messages);
        let record = session
            .recorder
            .compaction(&session.transcript, upto, &replacement)
            .map_err(|e| self.corrupt(run.id, e))?;
        self.put_blobs(&record).await?;
        let mut after_messages = replacement;
        after_messages.extend(messages[upto as usize..].iter().cloned());
        let after = limits::estimate_tokens(&after_messages);
        let (usage, cost) = session.pending_usage.take().unzip();
        let event = Event::ContextCompacted {
            upto,
            replacement_sha256: record
                .entry
                .blob_sha256()
                .expect("a compaction has a blob")
                .to_string(),
            tokens_before: before,
            tokens_after: after,
            usage,
            cost_nano_usd: cost.flatten().map(|usd| (usd * 1e9).round() as u64),
        };
        self.record_conversation(run, session, event).await
    }

    fn corrupt(&self, run_id: &str, e: crate::harness::transcript::TranscriptError) -> Error {
        tracing::error!(run = %run_id, "the session's conversation is inconsistent: {e}");
        Error::Conversation(run_id.into(), e.to_string())
    }

    /// Records a call's result and folds it into the transcript.
    async fn answer(
        &self,
        run: &mut Run<'_>,
        session: &mut Session,
        call_id: &str,
        content: &[u8],
        is_error: bool,
    ) -> Result<Flow> {
        let event = self.result_event(call_id, content, is_error, "").await?;
        self.record_conversation(run, session, event).await?;
        Ok(Flow::Next)
    }

    async fn decided(
        &self,
        run: &mut Run<'_>,
        call: &ToolCall,
        outcome: &str,
        reason: String,
    ) -> Result<()> {
        let event = Event::ToolCallDecided {
            call_id: call.id.clone(),
            tool: call.name.clone(),
            outcome: outcome.into(),
            reason,
        };
        self.record(run.id, run.view, event).await
    }

    /// One tool call of the model's last answer, from where the log has it.
    async fn tool_call(
        &self,
        run: &mut Run<'_>,
        session: &mut Session,
        sandbox_id: &str,
        call: &ToolCall,
    ) -> Result<Flow> {
        let known = run
            .view
            .session
            .as_ref()
            .and_then(|s| s.calls.get(&call.id).cloned())
            .unwrap_or_default();
        if known.outcome.is_empty() {
            // A new call, valid or not, counts against the budget before
            // it is decided.
            let mut spent = Self::spent(run, session);
            spent.tool_calls += 1;
            let budgets = &session.task.budgets;
            if spent.tool_calls > budgets.max_tool_calls {
                let reason = format!(
                    "budget used up: the model made more than {} tool calls",
                    budgets.max_tool_calls
                );
                self.finish(run.id, run.view, RunState::Failed, reason)
                    .await?;
                return Ok(Flow::Ended);
            }
        }
        let valid = match session.registry.validate(call) {
            Ok(valid) => valid,
            Err(e) => {
                if known.outcome.is_empty() {
                    self.decided(run, call, "invalid", e.to_string()).await?;
                }
                let result = e.to_result(&call.id);
                return self
                    .answer(run, session, &call.id, result.content.as_bytes(), true)
                    .await;
            }
        };
        match valid {
            Valid::Client {
                call_id,
                name,
                arguments,
            } => {
                if known.outcome == "client" {
                    return Ok(Flow::Park);
                }
                let resource = facts::run(run.id, &run.view.owner);
                let call_facts = crate::policy::Facts {
                    tool: name.clone(),
                    arguments: canonical_json(&arguments),
                    ..facts::job(&run.view.job, run.id)
                };
                let gate = Gate::Call(CallGate {
                    call_id: call_id.clone(),
                    request: 0,
                });
                let what = format!("tool call {name} ({call_id})");
                match self
                    .decide(
                        run,
                        crate::policy::Action::ToolCall,
                        &resource,
                        &call_facts,
                        gate,
                        &what,
                    )
                    .await?
                {
                    Decided::Go => {
                        self.decided(run, call, "client", String::new()).await?;
                        Ok(Flow::Park)
                    }
                    Decided::Ended => Ok(Flow::Ended),
                    Decided::Refused(refused) => {
                        self.refuse_call(run, session, call, refused).await
                    }
                }
            }
            Valid::Sandbox { action, .. } => {
                if known.exec_id.is_empty()
                    && !matches!(known.outcome.as_str(), "allowed" | "approved")
                {
                    let base = facts::job(&run.view.job, run.id);
                    let resource = facts::sandbox_of(sandbox_id, &run.view.owner);
                    for (i, request) in action.policy_requests(&base).into_iter().enumerate() {
                        let gate = Gate::Call(CallGate {
                            call_id: call.id.clone(),
                            request: i as u32,
                        });
                        let what = format!("tool call {} ({})", call.name, call.id);
                        match self
                            .decide(run, request.action, &resource, &request.facts, gate, &what)
                            .await?
                        {
                            Decided::Go => {}
                            Decided::Ended => return Ok(Flow::Ended),
                            Decided::Refused(refused) => {
                                return self.refuse_call(run, session, call, refused).await
                            }
                        }
                    }
                    self.decided(run, call, "allowed", String::new()).await?;
                }
                self.run_tool(run, session, sandbox_id, call, &action, &known)
                    .await
            }
        }
    }

    /// A call the guard refused: the model is told why, and goes on.
    async fn refuse_call(
        &self,
        run: &mut Run<'_>,
        session: &mut Session,
        call: &ToolCall,
        refused: crate::guard::Refused,
    ) -> Result<Flow> {
        use crate::guard::Refused;
        if let Refused::Unrecorded(_) = refused {
            // Nothing happens that is not on the record: the session stops.
            let reason = format!("tool call {} was not started: {refused}", call.name);
            self.finish(run.id, run.view, RunState::Failed, reason)
                .await?;
            return Ok(Flow::Ended);
        }
        let outcome = match refused {
            Refused::Denied { .. } => "denied",
            _ => "not_approved",
        };
        let text = format!("refused: {refused}");
        self.decided(run, call, outcome, refused.to_string())
            .await?;
        self.answer(run, session, &call.id, text.as_bytes(), true)
            .await
    }

    /// Runs a decided sandbox call, or picks it up where its recorded start
    /// left it, and records its result.
    async fn run_tool(
        &self,
        run: &mut Run<'_>,
        session: &mut Session,
        sandbox_id: &str,
        call: &ToolCall,
        action: &Action,
        known: &crate::runs::events::CallView,
    ) -> Result<Flow> {
        let agent = self.inner.host.agent_of(sandbox_id);
        let max_file = self.inner.harness.max_file_bytes;
        let started = !known.exec_id.is_empty();
        let exec_id = if started {
            known.exec_id.clone()
        } else {
            call_exec_id(run.id, &call.id)
        };
        let (content, is_error) = match action {
            Action::Exec {
                command,
                timeout_secs,
            } => {
                if !started {
                    self.tool_started(run, call, &exec_id, None).await?;
                }
                let out = self
                    .exec_tool(
                        run,
                        sandbox_id,
                        &agent,
                        &exec_id,
                        command,
                        *timeout_secs,
                        started,
                    )
                    .await?;
                match out {
                    None => return Ok(Flow::Ended),
                    Some(out) => (out.describe(), out.failed()),
                }
            }
            Action::ListDir {
                argv, timeout_secs, ..
            }
            | Action::FindFiles {
                argv, timeout_secs, ..
            }
            | Action::SearchFiles {
                argv, timeout_secs, ..
            } => {
                if !started {
                    self.tool_started(run, call, &exec_id, None).await?;
                }
                let command = Command::Argv(argv.clone());
                // grep (and find -exec grep) say "no match" with status 1.
                let search = matches!(action, Action::SearchFiles { .. });
                match self
                    .exec_tool(
                        run,
                        sandbox_id,
                        &agent,
                        &exec_id,
                        &command,
                        *timeout_secs,
                        started,
                    )
                    .await?
                {
                    None => return Ok(Flow::Ended),
                    Some(out) if search && out.exit_code == Some(1) && out.output.is_empty() => {
                        ("no matches".to_string(), false)
                    }
                    Some(out) if out.failed() => (out.describe(), true),
                    Some(out) => (out.output_text(), false),
                }
            }
            Action::ReadFile { path, lines } => {
                if !started {
                    self.tool_started(run, call, &exec_id, None).await?;
                }
                match file_io(agent.get_file(path, max_file)).await {
                    Err(e) => (format!("read_file {path}: {e}"), true),
                    Ok(data) => {
                        let text = String::from_utf8_lossy(&data).into_owned();
                        match lines {
                            None => (text, false),
                            Some((start, end)) => match text::line_range(&text, *start, *end) {
                                Ok(part) => (part.to_string(), false),
                                Err(e) => (format!("read_file {path}: {e}"), true),
                            },
                        }
                    }
                }
            }
            Action::WriteFile { path, content } => {
                let sha = sha256_hex(content.as_bytes());
                if !started {
                    self.inner.store.put_blob(&sha, content.as_bytes()).await?;
                    self.tool_started(run, call, &exec_id, Some(sha)).await?;
                }
                match file_io(agent.put_file(path, content.as_bytes().to_vec(), 0o644)).await {
                    Ok(()) => (format!("wrote {} bytes to {path}", content.len()), false),
                    Err(e) => (format!("write_file {path}: {e}"), true),
                }
            }
            Action::EditFile {
                path,
                old_string,
                new_string,
                replace_all,
            } => {
                // The edit is decided once, from the file as it was; a
                // restart writes what was decided, never edits again.
                let new = match &known.write_sha256 {
                    Some(sha) if started => match self.inner.store.blob(sha).await? {
                        Some(data) => Ok(data),
                        None => Err(format!("edit_file {path}: the recorded edit is missing")),
                    },
                    _ => match file_io(agent.get_file(path, max_file)).await {
                        Err(e) => Err(format!("edit_file {path}: {e}")),
                        Ok(data) => {
                            let original = String::from_utf8_lossy(&data).into_owned();
                            let (old, new, all) =
                                (old_string.clone(), new_string.clone(), *replace_all);
                            // Off the async workers: a file and strings of
                            // megabytes each.
                            let edited = tokio::task::spawn_blocking(move || {
                                text::edit(&original, &old, &new, all)
                            })
                            .await;
                            match edited {
                                Ok(Ok(edited)) => Ok(edited.into_bytes()),
                                Ok(Err(e)) => Err(format!("edit_file {path}: {e}")),
                                Err(e) => Err(format!("edit_file {path}: the edit failed: {e}")),
                            }
                        }
                    },
                };
                match new {
                    Err(message) => (message, true),
                    Ok(data) => {
                        if !started {
                            let sha = sha256_hex(&data);
                            self.inner.store.put_blob(&sha, &data).await?;
                            self.tool_started(run, call, &exec_id, Some(sha)).await?;
                        }
                        let size = data.len();
                        match file_io(agent.put_file(path, data, 0o644)).await {
                            Ok(()) => (format!("edited {path} ({size} bytes)"), false),
                            Err(e) => (format!("edit_file {path}: {e}"), true),
                        }
                    }
                }
            }
        };
        // What the model reads never carries a secret of the run.
        let (redacted, _) = run.secrets.redactor.redact(content.as_bytes(), true);
        self.answer(run, session, &call.id, &redacted, is_error)
            .await
    }

    async fn tool_started(
        &self,
        run: &mut Run<'_>,
        call: &ToolCall,
        exec_id: &str,
        write_sha256: Option<String>,
    ) -> Result<()> {
        let event = Event::ToolStarted {
            call_id: call.id.clone(),
            exec_id: exec_id.into(),
            write_sha256,
        };
        self.record(run.id, run.view, event).await
    }

    /// Runs (or re-attaches to) a command of a tool and collects its
    /// output. None: the session has ended (cancelled).
    #[allow(clippy::too_many_arguments)]
    async fn exec_tool(
        &self,
        run: &mut Run<'_>,
        sandbox_id: &str,
        agent: &H::Agent,
        exec_id: &str,
        command: &Command,
        timeout_secs: u32,
        started: bool,
    ) -> Result<Option<ExecOutput>> {
        let mut env = run.view.job.env.clone();
        env.extend(run.secrets.values.clone());
        let spec = ExecSpec {
            exec_id: exec_id.to_string(),
            command: command.clone(),
            env,
            cwd: String::new(),
            timeout_ms: timeout_secs.saturating_mul(1000),
        };
        let max = self.inner.harness.max_output_bytes;
        let mut tries = 0;
        loop {
            tries += 1;
            let events = if started || tries > 1 {
                match agent.attach_exec(exec_id, 0).await {
                    Ok(events) => Ok(events),
                    Err(AgentError::NotFound(_)) => {
                        // Never started (the crash fell between recording
                        // the start and asking the agent) if the agent is the
                        // one the sandbox had; otherwise unknown.
                        let same = match self.agent_boot_id(sandbox_id).await {
                            Some(boot) => {
                                !run.view.agent_boot_id.is_empty() && boot == run.view.agent_boot_id
                            }
                            None => false,
                        };
                        if same {
                            agent.start_exec(spec.clone()).await
                        } else {
                            return Ok(Some(ExecOutput::lost(
                                "the sandbox's agent restarted while the command ran; whether it completed is unknown, so it is not run again",
                            )));
                        }
                    }
                    Err(e) => Err(e),
                }
            } else {
                agent.start_exec(spec.clone()).await
            };
            let mut events = match events {
                Ok(events) => events,
                Err(e) => {
                    return Ok(Some(ExecOutput::lost(&format!(
                        "the sandbox is unreachable: {}",
                        e.message()
                    ))))
                }
            };
            let mut out = ExecOutput {
                guard: run
                    .secrets
                    .values
                    .values()
                    .map(String::len)
                    .max()
                    .unwrap_or(0)
                    .saturating_sub(1),
                ..ExecOutput::default()
            };
            let mut stopping = self.inner.shutdown.clone();
            // Left only when the stream broke off or went silent.
            loop {
                let message = tokio::select! {
                    m = tokio::time::timeout(std::time::Duration::from_secs(40), events.next()) => match m {
                        Ok(m) => m,
                        Err(_) => break,
                    },
                    _ = run.cancel.changed() => {
                        let _ = agent.kill_exec(exec_id).await;
                        self.finish_cancelled(run).await?;
                        return Ok(None);
                    }
                    _ = stopping.changed() => return Err(Error::Stopping),
                };
                match message {
                    Some(Ok(ExecEvent::Output { offset, data, .. })) => {
                        // A re-attach replays from 0: bytes already read are skipped.
                        let end = offset.saturating_add(data.len() as u64);
                        if end <= out.read {
                            continue;
                        }
                        let skip = out.read.saturating_sub(offset) as usize;
                        out.push(&data[skip..], max);
                        out.read = end;
                    }
                    Some(Ok(ExecEvent::Exited {
                        code,
                        signal,
                        timed_out,
                        ..
                    })) => {
                        out.exit_code = code;
                        out.signal = signal;
                        out.timed_out = timed_out;
                        return Ok(Some(out));
                    }
                    Some(Ok(ExecEvent::SpawnFailed(reason))) => {
                        out.spawn_failure = reason;
                        return Ok(Some(out));
                    }
                    Some(Ok(ExecEvent::Dropped {
                        from_offset,
                        to_offset,
                    })) => {
                        out.push(
                            format!(
                                "\n[… {} bytes lost …]\n",
                                to_offset.saturating_sub(from_offset)
                            )
                            .as_bytes(),
                            max,
                        );
                    }
                    Some(Ok(_)) => {}
                    None | Some(Err(_)) => break,
                }
            }
            if tries < 5 {
                tracing::warn!(run = %run.id, exec_id, "a tool's exec stream broke off; attaching again");
                continue;
            }
            return Ok(Some(ExecOutput::lost(
                "the command's output stream kept breaking off",
            )));
        }
    }
}

/// How long one file operation of a tool may take.
const FILE_IO: std::time::Duration = std::time::Duration::from_secs(120);

/// A file operation of a tool, bounded by [`FILE_IO`]; the error is what
/// the model is told.
async fn file_io<T>(
    op: impl std::future::Future<Output = std::result::Result<T, AgentError>>,
) -> std::result::Result<T, String> {
    match tokio::time::timeout(FILE_IO, op).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(e.message().to_string()),
        Err(_) => Err(format!(
            "the sandbox did not answer within {} s",
            FILE_IO.as_secs()
        )),
    }
}

/// The most tool calls one answer of the model may make.
pub const MAX_CALLS_PER_ANSWER: usize = 128;

/// Why a call id the model chose cannot be used, if it cannot: ids go into
/// events, audit entries and logs, so they are short and plain.
fn bad_call_id(id: &str) -> Option<String> {
    let ok = (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':'));
    (!ok).then(|| {
        let (shown, _) = text::cap_head_tail(id.as_bytes(), 80);
        format!("{shown:?} (a call id is 1 to 64 of A-Z, a-z, 0-9, _ - . :)")
    })
}

/// The system prompt of a summary for compaction.
const SUMMARY_INSTRUCTIONS: &str =
    "You summarise the earlier part of a conversation between a user and \
an AI agent that works with tools, so that the agent can go on with the work without it. Keep the \
goal, what was decided, which files were changed, which commands ran and what came of them, and \
what is left to do. Be brief and exact; leave out pleasantries.";

/// The first line of a summary request's message (a scripted server tells
/// summary requests apart by it).
pub const SUMMARY_MARKER: &str = "[conversation to summarise]";

/// `messages` as text for a summary request, cut in the middle past
/// `max_bytes`.
fn conversation_text(messages: &[Message], max_bytes: usize) -> String {
    let mut text = String::new();
    for m in messages {
        match m {
            Message::User(t) => text.push_str(&format!("USER: {t}\n\n")),
            Message::Assistant {
                text: t,
                tool_calls,
            } => {
                if !t.is_empty() {
                    text.push_str(&format!("AGENT: {t}\n"));
                }
                for c in tool_calls {
                    text.push_str(&format!(
                        "AGENT CALLS {} {}\n",
                        c.name,
                        c.arguments.to_json_text()
                    ));
                }
                text.push('\n');
            }
            Message::ToolResults(results) => {
                for r in results {
                    let (content, _) = text::cap_head_tail(r.content.as_bytes(), 2000);
                    let error = if r.is_error { " (error)" } else { "" };
                    text.push_str(&format!("RESULT{error}: {content}\n"));
                }
                text.push('\n');
            }
        }
    }
    text::cap_head_tail(text.as_bytes(), max_bytes).0
}

/// What a tool's command did.
#[derive(Debug, Default)]
struct ExecOutput {
    /// Both streams, in the order they came (head and tail when long).
    output: Vec<u8>,
    /// Bytes cut from the middle, after the first `head` bytes.
    cut: usize,
    head: usize,
    /// The longest secret of the run less one: bytes on each side of a cut
    /// left out too.
    guard: usize,
    /// The agent offset read to.
    read: u64,
    exit_code: Option<i32>,
    signal: Option<i32>,
    timed_out: bool,
    spawn_failure: String,
}

impl ExecOutput {
    fn lost(why: &str) -> Self {
        ExecOutput {
            spawn_failure: why.to_string(),
            ..Default::default()
        }
    }

    /// Keeps the first half of `max` and the most recent rest.
    fn push(&mut self, data: &[u8], max: usize) {
        self.output.extend_from_slice(data);
        if self.output.len() > max {
            self.head = max / 2;
            let excess = self.output.len() - max;
            self.output.drain(self.head..self.head + excess);
            self.cut += excess;
        }
    }

    fn failed(&self) -> bool {
        self.exit_code != Some(0) || !self.spawn_failure.is_empty()
    }

    fn output_text(&self) -> String {
        if self.cut == 0 {
            return String::from_utf8_lossy(&self.output).into_owned();
        }
        // A secret the cut went through would leave a piece on each side
        // that no redaction matches: as many bytes as a secret could leave
        // there go too.
        let head_end = self.head.saturating_sub(self.guard);
        let tail_start = (self.head + self.guard).min(self.output.len());
        format!(
            "{}{}{}",
            String::from_utf8_lossy(&self.output[..head_end]),
            text::cut_marker(self.cut + (tail_start - head_end)),
            String::from_utf8_lossy(&self.output[tail_start..])
        )
    }

    /// The result of a shell call: how it ended, then its output.
    fn describe(&self) -> String {
        let status = if !self.spawn_failure.is_empty() {
            format!("the command did not run: {}", self.spawn_failure)
        } else if self.timed_out {
            "timed out (killed)".to_string()
        } else if let Some(code) = self.exit_code {
            format!("exit code {code}")
        } else if let Some(signal) = self.signal {
            format!("killed by signal {signal}")
        } else {
            "ended".to_string()
        };
        let output = self.output_text();
        if output.is_empty() {
            format!("{status}\n(no output)")
        } else {
            format!("{status}\n{output}")
        }
    }
}

/// JSON text with keys sorted at every depth (policy and approvals see the
/// same arguments however the model ordered them).
fn canonical_json(value: &serde_json::Value) -> String {
    fn sorted(v: &serde_json::Value) -> serde_json::Value {
        match v {
            serde_json::Value::Object(map) => {
                let mut keys: Vec<&String> = map.keys().collect();
                keys.sort();
                let mut out = serde_json::Map::new();
                for k in keys {
                    out.insert(k.clone(), sorted(&map[k]));
                }
                serde_json::Value::Object(out)
            }
            serde_json::Value::Array(items) => {
                serde_json::Value::Array(items.iter().map(sorted).collect())
            }
            other => other.clone(),
        }
    }
    sorted(value).to_string()
}

#[cfg(test)]
mod output_tests {
    use super::ExecOutput;

    /// A secret that the middle cut goes through leaves no piece of itself.
    #[test]
    fn a_cut_through_a_secret_leaves_none_of_it() {
        let secret = "s3cr3t-value-42";
        let mut out = ExecOutput {
            guard: secret.len() - 1,
            ..ExecOutput::default()
        };
        let max = 64;
        // The head ends in the secret's first half, the tail begins in its
        // second.
        let mut data = "a".repeat(max / 2 - 7).into_bytes();
        data.extend_from_slice(secret.as_bytes());
        data.extend_from_slice("b".repeat(400).as_bytes());
        out.push(&data[..200], max);
        out.push(&data[200..], max);
        let text = out.output_text();
        for piece in secret.as_bytes().windows(4) {
            let piece = std::str::from_utf8(piece).unwrap();
            assert!(
                !text.contains(piece),
                "{piece:?} of the secret is in {text:?}"
            );
        }
        assert!(text.contains("bytes cut"), "{text}");
    }
}
