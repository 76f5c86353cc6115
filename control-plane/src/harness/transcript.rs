//! How a session's conversation is kept on its run's log: as [`Entry`]s
//! that each name only what is new (a user message, the model's answer, one
//! tool result, the fact that a request went out, a compaction), while the
//! contents themselves are content-addressed blobs, stored once. The log
//! therefore grows by what a turn adds, never by the whole conversation
//! again (Temporal histories hit their 50 MB cap because every model
//! request re-sent everything).
//!
//! A [`Transcript`] is the fold of those entries. The live session and a
//! replay after a crash build theirs the same way, from the same blob
//! bytes ([`Record::apply_to`]), never the live one from the values the
//! provider sent: so the request rendered from it ([`render`]) is
//! byte-for-byte the same in both, and an [`Entry::ModelRequested`] records
//! its hash ([`request_hash`]) for a replay to check ([`Recorder::rerender`]).
//!
//! Tool results are checked as they are recorded and again as they are
//! replayed: a result must answer a call of the assistant message awaiting
//! results, once; nothing goes on (a request, a user message) while a call
//! has no result. Providers refuse an orphan or a duplicate result, and
//! refuse a call left unanswered (OpenHands #4487, #1782).

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::providers::{Message, ModelRequest, ModelResponse, ToolCall, ToolResult, ToolSpec};

/// What a session's log records about its conversation. Contents are
/// referred to by the sha256 (hex) of a blob, never inline.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Entry {
    /// A user message; the blob is its text (UTF-8).
    User {
        message_id: String,
        text_sha256: String,
    },
    /// The model's answer; the blob is the JSON of its
    /// `Message::Assistant` (text and tool calls).
    Assistant { message_sha256: String },
    /// One tool call's result; the blob is its content (UTF-8). A turn's
    /// results become one `Message::ToolResults` after the assistant
    /// message that asked for them, in the order of its calls (not the
    /// order the results came in).
    ToolResult {
        call_id: String,
        content_sha256: String,
        is_error: bool,
    },
    /// Written before a model call: the hash of the rendered request and
    /// how many messages it carried. The request itself is not stored (it
    /// is the whole conversation): it is rendered again from the entries.
    ModelRequested {
        turn: u32,
        request_sha256: String,
        messages: u32,
    },
    /// Messages `[0, upto)` of the conversation (pending results counted
    /// as their message) are replaced by the blob's `Vec<Message>` (JSON);
    /// later entries append after it.
    Compacted {
        upto: u32,
        replacement_sha256: String,
    },
}

impl Entry {
    /// The blob the entry refers to, if any.
    pub fn blob_sha256(&self) -> Option<&str> {
        match self {
            Entry::User { text_sha256, .. } => Some(text_sha256),
            Entry::Assistant { message_sha256 } => Some(message_sha256),
            Entry::ToolResult { content_sha256, .. } => Some(content_sha256),
            Entry::ModelRequested { .. } => None,
            Entry::Compacted {
                replacement_sha256, ..
            } => Some(replacement_sha256),
        }
    }

    /// The entry's `kind`, as it is serialized.
    pub fn kind(&self) -> &'static str {
        match self {
            Entry::User { .. } => "user",
            Entry::Assistant { .. } => "assistant",
            Entry::ToolResult { .. } => "tool_result",
            Entry::ModelRequested { .. } => "model_requested",
            Entry::Compacted { .. } => "compacted",
        }
    }
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum TranscriptError {
    #[error("the {kind} entry refers to blob {sha256}, which is not in the store")]
    MissingBlob { kind: &'static str, sha256: String },
    #[error("the {kind} entry's blob {sha256} is not what it should be: {reason}")]
    BadBlob {
        kind: &'static str,
        sha256: String,
        reason: String,
    },
    #[error(
        "a tool result for call {call_id:?} answers no call of an assistant message awaiting \
         results (an orphan result is never sent)"
    )]
    OrphanResult { call_id: String },
    #[error("a second tool result for call {call_id:?} (providers refuse duplicate results)")]
    DuplicateResult { call_id: String },
    #[error(
        "the model's answer calls {call_id:?} more than once: its results could not be told apart"
    )]
    RepeatedCallId { call_id: String },
    #[error(
        "a {kind} entry while calls {missing:?} of the last assistant message have no result \
         (every call is answered before the conversation goes on)"
    )]
    UnansweredCalls {
        kind: &'static str,
        missing: Vec<String>,
    },
    #[error(
        "the model request of turn {turn} carried {recorded} messages, but the conversation \
         rebuilt from the log has {rebuilt}"
    )]
    CountMismatch {
        turn: u32,
        recorded: u32,
        rebuilt: usize,
    },
    #[error(
        "the request rebuilt from the log hashes to {rebuilt}, not to the {recorded} recorded \
         (did the system prompt, the tools or max_tokens change?)"
    )]
    RequestMismatch { recorded: String, rebuilt: String },
    #[error("a compaction replaces messages up to {upto}, but the conversation has {len}")]
    CompactionOutOfRange { upto: u32, len: usize },
    #[error("after the compaction, tool calls and results would no longer pair: {0}")]
    CompactionBreaksPairing(String),
    #[error("the conversation has {0} messages, more than an entry can count")]
    TooLong(usize),
}

/// What a conversation needs next ([`Transcript::next`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// Nothing has been said yet.
    UserMessage,
    /// The model's turn: the last message is the user's or the results.
    Model,
    /// Results for the model's calls.
    ToolResults,
    /// The model answered without a call: the turn is over.
    Nothing,
}

/// The conversation rebuilt from a session's entries.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Transcript {
    messages: Vec<Message>,
    /// Results of the last assistant message's calls, in its calls' order,
    /// not yet one message.
    pending_results: Vec<ToolResult>,
}

impl Transcript {
    /// Folds one entry in. `blob` finds a blob by its sha256; a blob that
    /// is missing, does not hash to its name or does not decode is an
    /// error naming it and the entry's kind.
    pub fn apply(
        &mut self,
        entry: &Entry,
        blob: &dyn Fn(&str) -> Option<Vec<u8>>,
    ) -> Result<(), TranscriptError> {
        let kind = entry.kind();
        match entry {
            Entry::User { text_sha256, .. } => {
                let text = text_blob(kind, text_sha256, blob)?;
                self.close_turn(kind)?;
                self.messages.push(Message::User(text));
            }
            Entry::Assistant { message_sha256 } => {
                let message: Message = json_blob(kind, message_sha256, blob)?;
                let Message::Assistant { tool_calls, .. } = &message else {
                    return Err(TranscriptError::BadBlob {
                        kind,
                        sha256: message_sha256.clone(),
                        reason: "it holds a message that is not the model's".into(),
                    });
                };
                if let Some(call_id) = repeated_id(tool_calls) {
                    return Err(TranscriptError::RepeatedCallId { call_id });
                }
                self.close_turn(kind)?;
                self.messages.push(message);
            }
            Entry::ToolResult {
                call_id,
                content_sha256,
                is_error,
            } => {
                let index = self.result_index(call_id)?;
                let content = text_blob(kind, content_sha256, blob)?;
                // Kept in the calls' order, whatever order results come in.
                let calls = self.open_calls();
                let at = self
                    .pending_results
                    .iter()
                    .position(|r| calls.iter().position(|c| c.id == r.call_id) > Some(index))
                    .unwrap_or(self.pending_results.len());
                self.pending_results.insert(
                    at,
                    ToolResult {
                        call_id: call_id.clone(),
                        content,
                        is_error: *is_error,
                    },
                );
            }
            Entry::ModelRequested { turn, messages, .. } => {
                self.check_turn_closed(kind)?;
                let rebuilt = self.messages.len() + usize::from(!self.pending_results.is_empty());
                if rebuilt != *messages as usize {
                    return Err(TranscriptError::CountMismatch {
                        turn: *turn,
                        recorded: *messages,
                        rebuilt,
                    });
                }
                self.close_turn(kind)?;
            }
            Entry::Compacted {
                upto,
                replacement_sha256,
            } => {
                let replacement: Vec<Message> = json_blob(kind, replacement_sha256, blob)?;
                self.check_turn_closed(kind)?;
                let mut conversation = self.messages();
                let upto_index = *upto as usize;
                if upto_index > conversation.len() {
                    return Err(TranscriptError::CompactionOutOfRange {
                        upto: *upto,
                        len: conversation.len(),
                    });
                }
                let mut compacted = replacement;
                compacted.extend(conversation.drain(upto_index..));
                check_pairing(&compacted).map_err(TranscriptError::CompactionBreaksPairing)?;
                self.messages = compacted;
                self.pending_results.clear();
            }
        }
        Ok(())
    }

    /// The conversation as the next request would carry it: pending tool
    /// results as one message at the end.
    pub fn messages(&self) -> Vec<Message> {
        let mut messages = self.messages.clone();
        if !self.pending_results.is_empty() {
            messages.push(Message::ToolResults(self.pending_results.clone()));
        }
        messages
    }

    /// The calls of the model's last answer that have no result yet, in
    /// the answer's order.
    pub fn unanswered(&self) -> Vec<ToolCall> {
        self.open_calls()
            .iter()
            .filter(|c| !self.pending_results.iter().any(|r| r.call_id == c.id))
            .cloned()
            .collect()
    }

    /// What the conversation needs next.
    pub fn next(&self) -> Next {
        if !self.unanswered().is_empty() {
            return Next::ToolResults;
        }
        match self.messages.last() {
            Some(Message::Assistant { tool_calls, .. }) if tool_calls.is_empty() => Next::Nothing,
            Some(_) => Next::Model,
            None => Next::UserMessage,
        }
    }

    /// The calls awaiting results: those of the last message when it is the
    /// model's (once their results are a message, none are).
    fn open_calls(&self) -> &[ToolCall] {
        match self.messages.last() {
            Some(Message::Assistant { tool_calls, .. }) => tool_calls.as_slice(),
            _ => &[],
        }
    }

    /// Where a result for `call_id` goes among the open calls; an error
    /// when it answers none of them or was already recorded.
    fn result_index(&self, call_id: &str) -> Result<usize, TranscriptError> {
        let Some(index) = self.open_calls().iter().position(|c| c.id == call_id) else {
            // A result for a call whose results already went out is a
            // second one, not an orphan.
            let sent = matches!(
                self.messages.last(),
                Some(Message::ToolResults(results)) if results.iter().any(|r| r.call_id == call_id)
            );
            return Err(if sent {
                TranscriptError::DuplicateResult {
                    call_id: call_id.to_string(),
                }
            } else {
                TranscriptError::OrphanResult {
                    call_id: call_id.to_string(),
                }
            });
        };
        if self.pending_results.iter().any(|r| r.call_id == call_id) {
            return Err(TranscriptError::DuplicateResult {
                call_id: call_id.to_string(),
            });
        }
        Ok(index)
    }

    /// Whether the conversation may go on past the current turn: every
    /// open call has its result.
    fn check_turn_closed(&self, kind: &'static str) -> Result<(), TranscriptError> {
        let missing: Vec<String> = self
            .open_calls()
            .iter()
            .filter(|c| !self.pending_results.iter().any(|r| r.call_id == c.id))
            .map(|c| c.id.clone())
            .collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(TranscriptError::UnansweredCalls { kind, missing })
        }
    }

    /// Ends the current turn: its results become one message.
    fn close_turn(&mut self, kind: &'static str) -> Result<(), TranscriptError> {
        self.check_turn_closed(kind)?;
        if !self.pending_results.is_empty() {
            let results = std::mem::take(&mut self.pending_results);
            self.messages.push(Message::ToolResults(results));
        }
        Ok(())
    }
}

/// The request for a conversation.
pub fn render(
    system: &str,
    tools: &[ToolSpec],
    messages: Vec<Message>,
    max_tokens: u32,
) -> ModelRequest {
    ModelRequest {
        system: system.to_string(),
        messages,
        tools: tools.to_vec(),
        max_tokens,
    }
}

/// The hex sha256 of the request's JSON: its fingerprint on the log.
pub fn request_hash(req: &ModelRequest) -> String {
    sha256_hex(&serde_json::to_vec(req).expect("a ModelRequest always serializes"))
}

/// The hex sha256 of `data`: a blob's name.
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// One thing to record: the entry for the run's log and the blobs it
/// refers to (`(sha256, bytes)`; the store keeps each sha once).
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    pub entry: Entry,
    pub blobs: Vec<(String, Vec<u8>)>,
}

impl Record {
    fn with_blob(entry: Entry, sha256: String, data: Vec<u8>) -> Record {
        Record {
            entry,
            blobs: vec![(sha256, data)],
        }
    }

    /// One of this record's blobs.
    pub fn blob(&self, sha256: &str) -> Option<Vec<u8>> {
        self.blobs
            .iter()
            .find(|(sha, _)| sha.as_str() == sha256)
            .map(|(_, data)| data.clone())
    }

    /// Folds the entry into `transcript` from this record's own blobs: how
    /// the live session keeps its transcript, once the entry is on the log,
    /// equal to what a replay rebuilds.
    pub fn apply_to(&self, transcript: &mut Transcript) -> Result<(), TranscriptError> {
        transcript.apply(&self.entry, &|sha256: &str| self.blob(sha256))
    }
}

/// Turns what happens in a session into [`Record`]s, refusing what would
/// make a conversation a provider rejects. Pure: the caller appends each
/// entry to the run's log and puts its blobs in the store, then applies it
/// to its transcript ([`Record::apply_to`]).
#[derive(Clone, Debug)]
pub struct Recorder {
    system: String,
    tools: Vec<ToolSpec>,
    max_tokens: u32,
}

impl Recorder {
    /// A session's recorder; what every request of the session carries
    /// besides the conversation.
    pub fn new(system: impl Into<String>, tools: Vec<ToolSpec>, max_tokens: u32) -> Recorder {
        Recorder {
            system: system.into(),
            tools,
            max_tokens,
        }
    }

    pub fn user_message(
        &self,
        transcript: &Transcript,
        message_id: &str,
        text: &str,
    ) -> Result<Record, TranscriptError> {
        transcript.check_turn_closed("user")?;
        let data = text.as_bytes().to_vec();
        let sha256 = sha256_hex(&data);
        let entry = Entry::User {
            message_id: message_id.to_string(),
            text_sha256: sha256.clone(),
        };
        Ok(Record::with_blob(entry, sha256, data))
    }

    /// The model's answer (its text and tool calls; usage and the stop
    /// reason belong to the session's other events).
    pub fn model_response(
        &self,
        transcript: &Transcript,
        response: &ModelResponse,
    ) -> Result<Record, TranscriptError> {
        transcript.check_turn_closed("assistant")?;
        if let Some(call_id) = repeated_id(&response.tool_calls) {
            return Err(TranscriptError::RepeatedCallId { call_id });
        }
        let message = Message::Assistant {
            text: response.text.clone(),
            tool_calls: response.tool_calls.clone(),
        };
        let data = serde_json::to_vec(&message).expect("a Message always serializes");
        let sha256 = sha256_hex(&data);
        let entry = Entry::Assistant {
            message_sha256: sha256.clone(),
        };
        Ok(Record::with_blob(entry, sha256, data))
    }

    pub fn tool_result(
        &self,
        transcript: &Transcript,
        result: &ToolResult,
    ) -> Result<Record, TranscriptError> {
        transcript.result_index(&result.call_id)?;
        let data = result.content.as_bytes().to_vec();
        let sha256 = sha256_hex(&data);
        let entry = Entry::ToolResult {
            call_id: result.call_id.clone(),
            content_sha256: sha256.clone(),
            is_error: result.is_error,
        };
        Ok(Record::with_blob(entry, sha256, data))
    }

    /// The request for turn `turn`, and its record (no blob: the request is
    /// rendered again from the log when needed).
    pub fn model_request(
        &self,
        transcript: &Transcript,
        turn: u32,
    ) -> Result<(ModelRequest, Record), TranscriptError> {
        transcript.check_turn_closed("model_requested")?;
        let messages = transcript.messages();
        let count =
            u32::try_from(messages.len()).map_err(|_| TranscriptError::TooLong(messages.len()))?;
        let request = render(&self.system, &self.tools, messages, self.max_tokens);
        let entry = Entry::ModelRequested {
            turn,
            request_sha256: request_hash(&request),
            messages: count,
        };
        let record = Record {
            entry,
            blobs: Vec::new(),
        };
        Ok((request, record))
    }

    /// The request a replay sends again for a recorded `ModelRequested`
    /// (with no response on the log), from the transcript rebuilt up to
    /// and including that entry; an error unless it hashes as recorded.
    pub fn rerender(
        &self,
        transcript: &Transcript,
        request_sha256: &str,
    ) -> Result<ModelRequest, TranscriptError> {
        let request = render(
            &self.system,
            &self.tools,
            transcript.messages(),
            self.max_tokens,
        );
        let rebuilt = request_hash(&request);
        if rebuilt != request_sha256 {
            return Err(TranscriptError::RequestMismatch {
                recorded: request_sha256.to_string(),
                rebuilt,
            });
        }
        Ok(request)
    }

    /// Messages `[0, upto)` of the conversation replaced by `replacement`
    /// (a summary); refused when the result would not pair calls and
    /// results.
    pub fn compaction(
        &self,
        transcript: &Transcript,
        upto: u32,
        replacement: &[Message],
    ) -> Result<Record, TranscriptError> {
        let data = serde_json::to_vec(replacement).expect("messages always serialize");
        let sha256 = sha256_hex(&data);
        let entry = Entry::Compacted {
            upto,
            replacement_sha256: sha256.clone(),
        };
        let record = Record::with_blob(entry, sha256, data);
        // Tried on a copy, so that what would be refused on replay is
        // never written.
        record.apply_to(&mut transcript.clone())?;
        Ok(record)
    }
}

/// A blob's bytes, checked against its name.
fn fetch(
    kind: &'static str,
    sha256: &str,
    blob: &dyn Fn(&str) -> Option<Vec<u8>>,
) -> Result<Vec<u8>, TranscriptError> {
    let Some(data) = blob(sha256) else {
        return Err(TranscriptError::MissingBlob {
            kind,
            sha256: sha256.to_string(),
        });
    };
    let actual = sha256_hex(&data);
    if actual != sha256 {
        return Err(TranscriptError::BadBlob {
            kind,
            sha256: sha256.to_string(),
            reason: format!("its bytes hash to {actual}"),
        });
    }
    Ok(data)
}

fn text_blob(
    kind: &'static str,
    sha256: &str,
    blob: &dyn Fn(&str) -> Option<Vec<u8>>,
) -> Result<String, TranscriptError> {
    String::from_utf8(fetch(kind, sha256, blob)?).map_err(|e| TranscriptError::BadBlob {
        kind,
        sha256: sha256.to_string(),
        reason: format!("it is not UTF-8 text ({e})"),
    })
}

fn json_blob<T: DeserializeOwned>(
    kind: &'static str,
    sha256: &str,
    blob: &dyn Fn(&str) -> Option<Vec<u8>>,
) -> Result<T, TranscriptError> {
    serde_json::from_slice(&fetch(kind, sha256, blob)?).map_err(|e| TranscriptError::BadBlob {
        kind,
        sha256: sha256.to_string(),
        reason: format!("it does not decode ({e})"),
    })
}

/// A call id that appears twice among `calls`.
fn repeated_id(calls: &[ToolCall]) -> Option<String> {
    calls
        .iter()
        .enumerate()
        .find(|(i, call)| calls[..*i].iter().any(|c| c.id == call.id))
        .map(|(_, call)| call.id.clone())
}

/// Every message of tool results follows the assistant message whose calls
/// it answers, one result a call; every message with calls is followed by
/// its results.
fn check_pairing(messages: &[Message]) -> Result<(), String> {
    let mut open: Option<(usize, &[ToolCall])> = None;
    for (i, message) in messages.iter().enumerate() {
        if let Message::ToolResults(results) = message {
            let Some((_, calls)) = open.take() else {
                return Err(format!(
                    "message {i} holds tool results that follow no message calling tools"
                ));
            };
            let answered = results.len() == calls.len()
                && calls
                    .iter()
                    .all(|call| results.iter().any(|r| r.call_id == call.id));
            if !answered {
                return Err(format!(
                    "the tool results in message {i} do not answer the calls before them one \
                     for one"
                ));
            }
            continue;
        }
        if let Some((at, _)) = open {
            return Err(format!(
                "message {at} calls tools whose results do not follow it"
            ));
        }
        if let Message::Assistant { tool_calls, .. } = message {
            if !tool_calls.is_empty() {
                open = Some((i, tool_calls.as_slice()));
            }
        }
    }
    match open {
        Some((at, _)) => Err(format!(
            "message {at} calls tools whose results do not follow it"
        )),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, HashSet};

    use serde_json::json;

    use super::*;
    use crate::harness::providers::{Arguments, StopReason, Usage};

    /// A session's recording, written the way the loop writes it, next to
    /// the conversation kept directly from what came and went (`shadow`,
    /// never through a blob).
    struct Session {
        recorder: Recorder,
        live: Transcript,
        entries: Vec<Entry>,
        blobs: HashMap<String, Vec<u8>>,
        shadow: Vec<Message>,
        /// The JSON of each request sent, by its entry's index.
        sent: HashMap<usize, Vec<u8>>,
    }

    impl Session {
        fn new() -> Session {
            let tools = vec![ToolSpec {
                name: "read_file".into(),
                description: "Reads a file of the workspace.".into(),
                parameters: json!({
                    "type": "object",
                    "properties": {"path": {"type": "string"}},
                    "required": ["path"]
                }),
            }];
            Session {
                recorder: Recorder::new("You are careful.", tools, 4096),
                live: Transcript::default(),
                entries: Vec::new(),
                blobs: HashMap::new(),
                shadow: Vec::new(),
                sent: HashMap::new(),
            }
        }

        fn write(&mut self, record: Record) {
            record.apply_to(&mut self.live).unwrap();
            for (sha256, data) in record.blobs {
                self.blobs.insert(sha256, data);
            }
            self.entries.push(record.entry);
        }

        fn user(&mut self, text: &str) {
            let id = format!("msg-{}", self.entries.len());
            let record = self.recorder.user_message(&self.live, &id, text).unwrap();
            self.write(record);
            self.shadow.push(Message::User(text.into()));
        }

        fn request(&mut self, turn: u32) -> ModelRequest {
            let (request, record) = self.recorder.model_request(&self.live, turn).unwrap();
            self.sent
                .insert(self.entries.len(), serde_json::to_vec(&request).unwrap());
            self.write(record);
            request
        }

        fn respond(&mut self, response: &ModelResponse) {
            let record = self.recorder.model_response(&self.live, response).unwrap();
            self.write(record);
            self.shadow.push(Message::Assistant {
                text: response.text.clone(),
                tool_calls: response.tool_calls.clone(),
            });
        }

        /// Records a result for each call, in `arrival` order (indexes
        /// into `calls`); the conversation gets them in the calls' order.
        fn results(&mut self, calls: &[ToolCall], arrival: &[usize]) {
            let results: Vec<ToolResult> = calls
                .iter()
                .map(|call| ToolResult {
                    call_id: call.id.clone(),
                    content: format!("{} says:\n{}", call.id, "a line of output\n".repeat(10)),
                    is_error: call.name == "fail",
                })
                .collect();
            for &i in arrival {
                let record = self.recorder.tool_result(&self.live, &results[i]).unwrap();
                self.write(record);
            }
            self.shadow.push(Message::ToolResults(results));
        }

        /// A request, an answer with one call, and its result.
        fn tool_turn(&mut self, turn: u32) {
            self.request(turn);
            let calls = vec![ToolCall {
                id: format!("call_{turn:04}"),
                name: "read_file".into(),
                arguments: Arguments::Json(json!({"path": format!("src/file_{turn:04}.rs")})),
            }];
            self.respond(&response(
                &format!("Reading file {turn:04} next."),
                calls.clone(),
            ));
            self.results(&calls, &[0]);
        }
    }

    fn response(text: &str, calls: Vec<ToolCall>) -> ModelResponse {
        ModelResponse {
            id: "resp".into(),
            model: "model".into(),
            text: text.into(),
            stop: if calls.is_empty() {
                StopReason::EndTurn
            } else {
                StopReason::ToolUse
            },
            tool_calls: calls,
            usage: Usage::default(),
        }
    }

    /// Call `k` of turn `turn`, with arguments whose keys are not sorted,
    /// with floats, big and negative numbers, escapes and non-ASCII text;
    /// turn 7's does not parse; call 1 fails.
    fn call(turn: u32, k: u32) -> ToolCall {
        let arguments = if turn == 7 {
            Arguments::parse("{\"path\": \"src/lib.rs\"".into())
        } else {
            Arguments::Json(json!({
                "path": format!("src/m{turn}.rs"),
                "zeta": {
                    "ratio": 0.1 * f64::from(turn),
                    "big": u64::MAX,
                    "neg": -7,
                    "é": "tab\t\"q\" \u{1F600}"
                },
                "alpha": [1.5e300, 2.5e-300, true, null]
            }))
        };
        ToolCall {
            id: format!("call_{turn}_{k}"),
            name: if k == 1 { "fail" } else { "read_file" }.into(),
            arguments,
        }
    }

    fn rebuild(
        entries: &[Entry],
        blobs: &HashMap<String, Vec<u8>>,
    ) -> Result<Transcript, TranscriptError> {
        let mut transcript = Transcript::default();
        for entry in entries {
            transcript.apply(entry, &|sha256: &str| blobs.get(sha256).cloned())?;
        }
        Ok(transcript)
    }

    /// Every request recorded in `s` is rebuilt, from the entries up to its
    /// own, byte for byte as it was sent; returns how many there are.
    /// Rebuilding is a fold from an empty transcript, so folding the log
    /// entry by entry is rebuilding every prefix of it: what a crash after
    /// any entry leaves.
    fn assert_requests_rebuild(s: &Session) -> usize {
        let mut requests = 0;
        let mut rebuilt = Transcript::default();
        for (i, entry) in s.entries.iter().enumerate() {
            rebuilt
                .apply(entry, &|sha256: &str| s.blobs.get(sha256).cloned())
                .unwrap_or_else(|e| panic!("rebuilding up to entry {i}: {e}"));
            let Entry::ModelRequested {
                request_sha256,
                messages,
                ..
            } = entry
            else {
                continue;
            };
            requests += 1;
            let request = s.recorder.rerender(&rebuilt, request_sha256).unwrap();
            assert_eq!(request_hash(&request), *request_sha256, "entry {i}");
            assert_eq!(request.messages.len(), *messages as usize, "entry {i}");
            assert_eq!(
                serde_json::to_vec(&request).unwrap(),
                s.sent[&i],
                "entry {i}"
            );
        }
        assert_eq!(rebuild(&s.entries, &s.blobs).unwrap(), s.live);
        requests
    }

    #[test]
    fn a_rebuilt_conversation_is_byte_for_byte_what_the_model_saw() {
        let mut s = Session::new();
        s.user("Fix the failing test in src/lib.rs.");
        for turn in 0..30u32 {
            let request = s.request(turn);
            // What went out is the conversation as it happened, not only as
            // the blobs have it.
            let direct = render(
                &request.system,
                &request.tools,
                s.shadow.clone(),
                request.max_tokens,
            );
            assert_eq!(
                serde_json::to_vec(&request).unwrap(),
                serde_json::to_vec(&direct).unwrap(),
                "turn {turn}"
            );
            let calls = if turn % 5 == 4 {
                Vec::new()
            } else if turn % 2 == 0 {
                vec![call(turn, 0), call(turn, 1)]
            } else {
                vec![call(turn, 0)]
            };
            s.respond(&response(
                &format!("Turn {turn}: looking at \"it\" — next.\n"),
                calls.clone(),
            ));
            if calls.is_empty() {
                if turn != 29 {
                    s.user(&format!("Go on (after turn {turn})."));
                }
                continue;
            }
            // Results arrive last call first; they are sent in the calls'
            // order.
            let arrival: Vec<usize> = (0..calls.len()).rev().collect();
            s.results(&calls, &arrival);
        }
        assert_eq!(s.live.messages(), s.shadow);
        let Some(Message::ToolResults(first)) = s.shadow.get(2) else {
            panic!(
                "the first turn's results are message 2: {:?}",
                s.shadow.get(2)
            );
        };
        let ids: Vec<&str> = first.iter().map(|r| r.call_id.as_str()).collect();
        assert_eq!(ids, ["call_0_0", "call_0_1"]);
        assert!(first[1].is_error);
        assert_eq!(assert_requests_rebuild(&s), 30);
        // And from scratch, from each prefix of the log that ends at a
        // request.
        for (i, entry) in s.entries.iter().enumerate() {
            let Entry::ModelRequested { request_sha256, .. } = entry else {
                continue;
            };
            let rebuilt = rebuild(&s.entries[..=i], &s.blobs).unwrap();
            let request = s.recorder.rerender(&rebuilt, request_sha256).unwrap();
            assert_eq!(
                serde_json::to_vec(&request).unwrap(),
                s.sent[&i],
                "entry {i}"
            );
        }
    }

    #[test]
    fn the_log_grows_by_what_is_new_in_a_turn() {
        let mut s = Session::new();
        s.user("Read every file, one a turn.");
        let mut entry_bytes = Vec::new();
        let mut full_request_bytes = Vec::new();
        let mut new_blobs = Vec::new();
        let mut new_blob_bytes = Vec::new();
        for turn in 0..200u32 {
            let entries_before = s.entries.len();
            let blobs_before: HashSet<String> = s.blobs.keys().cloned().collect();
            s.tool_turn(turn);
            // The alternative: the whole request stored at every turn.
            full_request_bytes.push(s.sent[&entries_before].len());
            entry_bytes.push(
                s.entries[entries_before..]
                    .iter()
                    .map(|e| serde_json::to_vec(e).unwrap().len())
                    .sum::<usize>(),
            );
            let added: Vec<&String> = s
                .blobs
                .keys()
                .filter(|sha| !blobs_before.contains(*sha))
                .collect();
            new_blobs.push(added.len());
            new_blob_bytes.push(added.iter().map(|sha| s.blobs[*sha].len()).sum::<usize>());
        }
        /// Turn 200's against turn 10's.
        fn ratio(v: &[usize]) -> f64 {
            v[199] as f64 / v[9] as f64
        }
        /// The first 200 turns' total against the first 100's.
        fn growth(v: &[usize]) -> f64 {
            let total = |n: usize| v[..n].iter().sum::<usize>() as f64;
            total(200) / total(100)
        }
        assert!(
            ratio(&entry_bytes) <= 1.5,
            "entry bytes of turn 200 / turn 10: {} ({} / {})",
            ratio(&entry_bytes),
            entry_bytes[199],
            entry_bytes[9]
        );
        assert!(
            ratio(&full_request_bytes) >= 10.0,
            "whole requests would grow: turn 200 / turn 10 = {}",
            ratio(&full_request_bytes)
        );
        // Twice the turns: twice the entries, four times the requests.
        assert!(growth(&entry_bytes) <= 2.2, "{}", growth(&entry_bytes));
        assert!(
            growth(&full_request_bytes) >= 3.5,
            "{}",
            growth(&full_request_bytes)
        );
        // The model's answer and the tool's result: two new blobs a turn,
        // of the same size at turn 200 as at turn 10.
        assert!(new_blobs.iter().all(|&n| n == 2), "{new_blobs:?}");
        assert!(ratio(&new_blob_bytes) <= 1.5, "{new_blob_bytes:?}");
        assert_eq!(assert_requests_rebuild(&s), 200);
    }

    #[test]
    fn a_compaction_replaces_the_head_and_later_turns_append_after_it() {
        let mut s = Session::new();
        s.user("Tidy the repository.");
        for turn in 0..6 {
            s.tool_turn(turn);
        }
        // user, then (call, result) × 6; the last results still pending.
        assert_eq!(s.live.messages().len(), 13);
        let summary = vec![Message::User(
            "Summary: files 0 to 3 were read; nothing needs fixing.".into(),
        )];
        // Message 10 is turn 4's results: cutting there orphans them.
        let orphaning = s.recorder.compaction(&s.live, 10, &summary).unwrap_err();
        assert!(
            matches!(orphaning, TranscriptError::CompactionBreaksPairing(_)),
            "{orphaning}"
        );
        let too_far = s.recorder.compaction(&s.live, 14, &summary).unwrap_err();
        assert_eq!(
            too_far,
            TranscriptError::CompactionOutOfRange { upto: 14, len: 13 }
        );
        let record = s.recorder.compaction(&s.live, 9, &summary).unwrap();
        s.write(record);
        let tail = s.shadow[9..].to_vec();
        s.shadow = summary.iter().cloned().chain(tail).collect();
        assert_eq!(s.live.messages(), s.shadow);
        assert_eq!(s.live.messages().len(), 5);
        for turn in 6..9 {
            s.tool_turn(turn);
        }
        let last = s.request(9);
        assert_eq!(last.messages[0], summary[0]);
        assert_eq!(last.messages.len(), 5 + 3 * 2);
        assert_eq!(s.live.messages(), s.shadow);
        assert_eq!(assert_requests_rebuild(&s), 10);
    }

    #[test]
    fn a_missing_or_wrong_blob_is_an_error_naming_it() {
        let mut s = Session::new();
        s.user("Start.");
        s.tool_turn(0);
        s.request(1);
        let Entry::Assistant { message_sha256 } = &s.entries[2] else {
            panic!("entry 2 is the answer: {:?}", s.entries[2]);
        };
        let sha = message_sha256.clone();
        let mut blobs = s.blobs.clone();
        blobs.remove(&sha);
        let missing = rebuild(&s.entries, &blobs).unwrap_err();
        assert_eq!(
            missing,
            TranscriptError::MissingBlob {
                kind: "assistant",
                sha256: sha.clone()
            }
        );
        assert!(missing.to_string().contains(&sha), "{missing}");
        // Bytes that are not the ones named are not taken.
        blobs.insert(sha.clone(), b"{\"user\":\"forged\"}".to_vec());
        let forged = rebuild(&s.entries, &blobs).unwrap_err();
        assert!(
            matches!(
                &forged,
                TranscriptError::BadBlob { kind: "assistant", sha256, .. } if *sha256 == sha
            ),
            "{forged}"
        );
        // Bytes that are named right but are not an answer.
        for data in [&b"not json"[..], &b"{\"user\":\"hello\"}"[..]] {
            let name = sha256_hex(data);
            let entry = Entry::Assistant {
                message_sha256: name.clone(),
            };
            let err = Transcript::default()
                .apply(&entry, &|_: &str| Some(data.to_vec()))
                .unwrap_err();
            assert!(
                matches!(&err, TranscriptError::BadBlob { sha256, .. } if *sha256 == name),
                "{err}"
            );
        }
        // A request rebuilt with another system prompt is not the one
        // recorded.
        let rebuilt = rebuild(&s.entries, &s.blobs).unwrap();
        let Entry::ModelRequested { request_sha256, .. } = &s.entries[4] else {
            panic!("entry 4 is a request: {:?}", s.entries[4]);
        };
        let other = Recorder::new("Another prompt.", Vec::new(), 4096);
        assert!(matches!(
            other.rerender(&rebuilt, request_sha256),
            Err(TranscriptError::RequestMismatch { .. })
        ));
    }

    #[test]
    fn orphan_duplicate_and_unanswered_calls_are_refused() {
        let mut s = Session::new();
        s.user("Start.");
        s.request(0);
        let calls = vec![call(0, 0), call(0, 2)];
        s.respond(&response("Two reads.", calls));
        let result = |call_id: &str| ToolResult {
            call_id: call_id.into(),
            content: "done".into(),
            is_error: false,
        };
        let done = sha256_hex(b"done");
        let lookup = |sha256: &str| (sha256 == done).then(|| b"done".to_vec());
        let result_entry = |call_id: &str| Entry::ToolResult {
            call_id: call_id.into(),
            content_sha256: done.clone(),
            is_error: false,
        };
        let orphan = |call_id: &str| TranscriptError::OrphanResult {
            call_id: call_id.into(),
        };
        let duplicate = |call_id: &str| TranscriptError::DuplicateResult {
            call_id: call_id.into(),
        };

        // A result for a call nobody made: neither recorded nor replayed.
        assert_eq!(
            s.recorder.tool_result(&s.live, &result("call_x")),
            Err(orphan("call_x"))
        );
        assert_eq!(
            s.live.clone().apply(&result_entry("call_x"), &lookup),
            Err(orphan("call_x"))
        );
        // Nor one before any call.
        assert_eq!(
            Transcript::default().apply(&result_entry("call_0_0"), &lookup),
            Err(orphan("call_0_0"))
        );

        // A second result for a call.
        let first = s
            .recorder
            .tool_result(&s.live, &result("call_0_0"))
            .unwrap();
        s.write(first.clone());
        assert_eq!(
            s.recorder.tool_result(&s.live, &result("call_0_0")),
            Err(duplicate("call_0_0"))
        );
        assert_eq!(
            s.live.clone().apply(&first.entry, &lookup),
            Err(duplicate("call_0_0"))
        );

        // Nothing goes on while call_0_2 has no result.
        let unanswered = |kind: &'static str| TranscriptError::UnansweredCalls {
            kind,
            missing: vec!["call_0_2".into()],
        };
        assert_eq!(
            s.recorder.model_request(&s.live, 1).map(|_| ()),
            Err(unanswered("model_requested"))
        );
        assert_eq!(
            s.recorder.user_message(&s.live, "m", "hello").map(|_| ()),
            Err(unanswered("user"))
        );
        let (_, early) = Recorder::new("", Vec::new(), 0)
            .model_request(&Transcript::default(), 1)
            .unwrap();
        assert_eq!(
            s.live.clone().apply(&early.entry, &lookup),
            Err(unanswered("model_requested"))
        );

        let second = s
            .recorder
            .tool_result(&s.live, &result("call_0_2"))
            .unwrap();
        s.write(second);
        s.request(1);
        // Once the results went out, another one is still a duplicate.
        assert_eq!(
            s.recorder.tool_result(&s.live, &result("call_0_0")),
            Err(duplicate("call_0_0"))
        );
        // A log whose request carried another number of messages than it
        // rebuilds is refused.
        let wrong = Entry::ModelRequested {
            turn: 2,
            request_sha256: "0".repeat(64),
            messages: 99,
        };
        assert_eq!(
            s.live.clone().apply(&wrong, &lookup),
            Err(TranscriptError::CountMismatch {
                turn: 2,
                recorded: 99,
                rebuilt: 3
            })
        );
        // An answer that calls the same id twice could not be answered.
        s.respond(&response("Reading.", vec![call(1, 0)]));
        let twice = response("Twice.", vec![call(2, 0), call(2, 0)]);
        let mut after = s.live.clone();
        let result_record = s
            .recorder
            .tool_result(&s.live, &result("call_1_0"))
            .unwrap();
        result_record.apply_to(&mut after).unwrap();
        assert_eq!(
            s.recorder.model_response(&after, &twice),
            Err(TranscriptError::RepeatedCallId {
                call_id: "call_2_0".into()
            })
        );
    }
}
