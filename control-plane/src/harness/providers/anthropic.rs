//! Anthropic Messages, `POST {base_url}/v1/messages`, streamed (also what
//! Ollama, vLLM, llama.cpp's server and LiteLLM offer under that path).
//!
//! The stream: `message_start` (id, model, the input usage), then per
//! content block `content_block_start`, its `content_block_delta`s
//! (`text_delta`, or `input_json_delta` fragments of a tool call's input)
//! and `content_block_stop`, then `message_delta` (stop reason, output
//! usage) and `message_stop`; `ping` and `error` may come at any point.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::{
    in_stream_error, Arguments, Assemble, ErrorDetail, Message, ModelRequest, ModelResponse,
    ProviderError, SizeCap, StopReason, ToolCall, Usage,
};

/// The request body: the system prompt top-level, the answer streamed.
pub(super) fn request_body(model: &str, req: &ModelRequest, max_tokens: u32) -> Value {
    let mut messages: Vec<Value> = Vec::with_capacity(req.messages.len());
    for message in &req.messages {
        match message {
            Message::User(text) => push_user(&mut messages, Value::String(text.clone())),
            Message::Assistant { text, tool_calls } => {
                let mut content = Vec::with_capacity(tool_calls.len() + 1);
                if !text.is_empty() {
                    content.push(json!({ "type": "text", "text": text }));
                }
                for call in tool_calls {
                    content.push(json!({
                        "type": "tool_use",
                        "id": call.id,
                        "name": call.name,
                        "input": call.arguments.to_object(),
                    }));
                }
                messages.push(json!({ "role": "assistant", "content": content }));
            }
            // Every result of the turn in one user message: each tool_use
            // must have its tool_result in the next message.
            Message::ToolResults(results) => {
                let blocks: Vec<Value> = results
                    .iter()
                    .map(|result| {
                        let mut block = Map::new();
                        block.insert("type".into(), "tool_result".into());
                        block.insert("tool_use_id".into(), result.call_id.clone().into());
                        block.insert("content".into(), result.content.clone().into());
                        if result.is_error {
                            block.insert("is_error".into(), true.into());
                        }
                        Value::Object(block)
                    })
                    .collect();
                push_user(&mut messages, Value::Array(blocks));
            }
        }
    }
    let mut body = Map::new();
    body.insert("model".into(), model.into());
    body.insert("max_tokens".into(), max_tokens.into());
    if !req.system.is_empty() {
        body.insert("system".into(), req.system.clone().into());
    }
    body.insert("messages".into(), messages.into());
    if !req.tools.is_empty() {
        let tools: Vec<Value> = req
            .tools
            .iter()
            .map(|tool| {
                json!({
                    "name": tool.name,
                    "description": tool.description,
                    "input_schema": tool.parameters,
                })
            })
            .collect();
        body.insert("tools".into(), tools.into());
    }
    body.insert("stream".into(), true.into());
    Value::Object(body)
}

/// Adds user content (a string or blocks). Roles alternate: user content
/// right after user content (a message after tool results) joins that
/// message.
fn push_user(messages: &mut Vec<Value>, content: Value) {
    if let Some(last) = messages.last_mut() {
        if last.get("role").and_then(Value::as_str) == Some("user") {
            let mut blocks = into_blocks(last.get_mut("content").map(Value::take));
            blocks.extend(into_blocks(Some(content)));
            if let Some(last) = last.as_object_mut() {
                last.insert("content".into(), Value::Array(blocks));
            }
            return;
        }
    }
    messages.push(json!({ "role": "user", "content": content }));
}

fn into_blocks(content: Option<Value>) -> Vec<Value> {
    match content {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(blocks)) => blocks,
        Some(Value::String(text)) => vec![json!({ "type": "text", "text": text })],
        Some(other) => vec![other],
    }
}

/// One event of the stream, by its `type`.
#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum StreamEvent {
    MessageStart {
        message: StartMessage,
    },
    ContentBlockStart {
        index: u64,
        content_block: StartBlock,
    },
    ContentBlockDelta {
        index: u64,
        delta: BlockDelta,
    },
    ContentBlockStop,
    MessageDelta {
        #[serde(default)]
        delta: Option<MessageDeltaBody>,
        #[serde(default)]
        usage: Option<WireUsage>,
    },
    MessageStop,
    Ping,
    Error {
        error: Value,
    },
    /// Event types newer than this code: ignored, as the API asks.
    #[serde(other)]
    Unknown,
}

#[derive(Deserialize)]
struct StartMessage {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    usage: Option<WireUsage>,
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum StartBlock {
    Text {
        #[serde(default)]
        text: String,
    },
    ToolUse {
        #[serde(default)]
        id: String,
        #[serde(default)]
        name: String,
        #[serde(default)]
        input: Option<Value>,
    },
    /// Thinking, server tools and what comes next: not part of the answer.
    #[serde(other)]
    Other,
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum BlockDelta {
    TextDelta {
        text: String,
    },
    InputJsonDelta {
        partial_json: String,
    },
    #[serde(other)]
    Other,
}

#[derive(Deserialize)]
struct MessageDeltaBody {
    #[serde(default)]
    stop_reason: Option<String>,
}

/// The `usage` of a message. `input_tokens` is only the part of the prompt
/// neither read from nor written to the cache.
#[derive(Default, Deserialize)]
pub(super) struct WireUsage {
    #[serde(default)]
    input_tokens: Option<u64>,
    #[serde(default)]
    output_tokens: Option<u64>,
    #[serde(default)]
    cache_creation_input_tokens: Option<u64>,
    #[serde(default)]
    cache_read_input_tokens: Option<u64>,
}

impl WireUsage {
    /// `message_delta`'s counts are cumulative: the larger of each stands
    /// (a server that sends 0 for what it does not repeat loses nothing).
    fn merge(&mut self, later: WireUsage) {
        fn larger(a: Option<u64>, b: Option<u64>) -> Option<u64> {
            match (a, b) {
                (Some(a), Some(b)) => Some(a.max(b)),
                (a, b) => a.or(b),
            }
        }
        self.input_tokens = larger(self.input_tokens, later.input_tokens);
        self.output_tokens = larger(self.output_tokens, later.output_tokens);
        self.cache_creation_input_tokens = larger(
            self.cache_creation_input_tokens,
            later.cache_creation_input_tokens,
        );
        self.cache_read_input_tokens =
            larger(self.cache_read_input_tokens, later.cache_read_input_tokens);
    }
}

/// The whole prompt is the sum of the three input counts.
pub(super) fn usage(wire: &WireUsage) -> Usage {
    let uncached = wire.input_tokens.unwrap_or(0);
    let written = wire.cache_creation_input_tokens.unwrap_or(0);
    let read = wire.cache_read_input_tokens.unwrap_or(0);
    Usage {
        input_tokens: uncached.saturating_add(written).saturating_add(read),
        output_tokens: wire.output_tokens.unwrap_or(0),
        cache_read_input_tokens: read,
        cache_creation_input_tokens: written,
    }
}

/// A content block being streamed.
enum Block {
    Text(String),
    ToolUse {
        id: String,
        name: String,
        /// The input `content_block_start` carried (normally `{}`).
        input: Option<Value>,
        /// The `input_json_delta` fragments so far.
        json: String,
    },
    Other,
}

/// An answer being assembled from its events.
pub(super) struct Answer {
    id: String,
    model: String,
    blocks: BTreeMap<u64, Block>,
    stop_reason: Option<String>,
    usage: WireUsage,
    /// `message_stop` came.
    done: bool,
    /// Bytes of text, ids, names and input so far.
    size: SizeCap,
}

impl Answer {
    pub(super) fn new(limit: usize) -> Answer {
        Answer {
            id: String::new(),
            model: String::new(),
            blocks: BTreeMap::new(),
            stop_reason: None,
            usage: WireUsage::default(),
            done: false,
            size: SizeCap::new("the answer's text and tool inputs", limit),
        }
    }
}

impl Assemble for Answer {
    fn push(
        &mut self,
        data: &str,
        on_text: &mut (dyn FnMut(&str) + Send),
    ) -> Result<bool, ProviderError> {
        let event: StreamEvent = serde_json::from_str(data).map_err(|e| {
            ProviderError::Protocol(format!(
                "an event of the stream is not a Messages event ({e})"
            ))
        })?;
        match event {
            StreamEvent::MessageStart { message } => {
                self.id = message.id.unwrap_or_default();
                self.model = message.model.unwrap_or_default();
                if let Some(wire) = message.usage {
                    self.usage.merge(wire);
                }
            }
            StreamEvent::ContentBlockStart {
                index,
                content_block,
            } => {
                let block = match content_block {
                    StartBlock::Text { text } => {
                        self.size.grow(text.len())?;
                        if !text.is_empty() {
                            on_text(&text);
                        }
                        Block::Text(text)
                    }
                    StartBlock::ToolUse { id, name, input } => {
                        self.size.grow(id.len() + name.len())?;
                        Block::ToolUse {
                            id,
                            name,
                            input,
                            json: String::new(),
                        }
                    }
                    StartBlock::Other => Block::Other,
                };
                self.blocks.insert(index, block);
            }
            StreamEvent::ContentBlockDelta { index, delta } => match delta {
                BlockDelta::TextDelta { text } => {
                    self.size.grow(text.len())?;
                    match self.blocks.get_mut(&index) {
                        Some(Block::Text(so_far)) => so_far.push_str(&text),
                        None => {
                            self.blocks.insert(index, Block::Text(text.clone()));
                        }
                        Some(_) => {
                            return Err(ProviderError::Protocol(format!(
                                "a text delta for content block {index}, which is not text"
                            )))
                        }
                    }
                    if !text.is_empty() {
                        on_text(&text);
                    }
                }
                BlockDelta::InputJsonDelta { partial_json } => {
                    self.size.grow(partial_json.len())?;
                    match self.blocks.get_mut(&index) {
                        Some(Block::ToolUse { json, .. }) => json.push_str(&partial_json),
                        // Input of a block that is not the answer's (a
                        // server tool's).
                        Some(Block::Other) => {}
                        _ => {
                            return Err(ProviderError::Protocol(format!(
                                "an input_json_delta for content block {index}, \
                                 which is not a tool_use block"
                            )))
                        }
                    }
                }
                BlockDelta::Other => {}
            },
            StreamEvent::MessageDelta { delta, usage } => {
                if let Some(reason) = delta.and_then(|delta| delta.stop_reason) {
                    self.stop_reason = Some(reason);
                }
                if let Some(wire) = usage {
                    self.usage.merge(wire);
                }
            }
            StreamEvent::MessageStop => {
                self.done = true;
                return Ok(true);
            }
            StreamEvent::Error { error } => {
                return Err(in_stream_error(&ErrorDetail::from_json(&error)));
            }
            StreamEvent::ContentBlockStop | StreamEvent::Ping | StreamEvent::Unknown => {}
        }
        Ok(false)
    }

    fn finish(self) -> Result<ModelResponse, ProviderError> {
        if !self.done {
            return Err(ProviderError::StreamCut(
                "the stream ended before its message_stop".into(),
            ));
        }
        let mut text = String::new();
        let mut tool_calls = Vec::new();
        for block in self.blocks.into_values() {
            match block {
                Block::Text(part) => text.push_str(&part),
                Block::ToolUse {
                    id,
                    name,
                    input,
                    json,
                } => {
                    // The input streams as fragments of JSON; a call without
                    // parameters sends none (`{}`).
                    let arguments = match input {
                        Some(Value::Object(start))
                            if json.trim().is_empty() && !start.is_empty() =>
                        {
                            Arguments::Json(Value::Object(start))
                        }
                        _ => Arguments::parse(json),
                    };
                    tool_calls.push(ToolCall {
                        id,
                        name,
                        arguments,
                    });
                }
                Block::Other => {}
            }
        }
        let stop = match self.stop_reason.as_deref() {
            Some("end_turn") => StopReason::EndTurn,
            Some("tool_use") => StopReason::ToolUse,
            Some("max_tokens") => StopReason::MaxTokens,
            Some("refusal") => StopReason::Refusal,
            Some("model_context_window_exceeded") => StopReason::ContextWindowExceeded,
            Some(other) => StopReason::Other(other.to_string()),
            None if tool_calls.is_empty() => StopReason::EndTurn,
            None => StopReason::ToolUse,
        };
        Ok(ModelResponse {
            id: self.id,
            model: self.model,
            text,
            tool_calls,
            stop,
            usage: usage(&self.usage),
        })
    }
}
