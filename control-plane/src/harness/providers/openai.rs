//! OpenAI-compatible Chat Completions, `POST {base_url}/chat/completions`,
//! streamed: what OpenAI, Ollama, vLLM, llama.cpp's server and LiteLLM
//! speak.
//!
//! The stream is `data: {chunk}` events ending with `data: [DONE]`; with
//! `stream_options.include_usage` the last chunk before it has no choices
//! and carries the usage. Text arrives as `delta.content`, tool calls as
//! `delta.tool_calls[{index, id?, function: {name?, arguments: fragment}}]`.

use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::{
    in_stream_error, Arguments, Assemble, ErrorDetail, Message, ModelRequest, ModelResponse,
    ProviderError, SizeCap, StopReason, ToolCall, Usage,
};

/// The request body: the system prompt as the first message, the answer
/// streamed with its usage.
pub(super) fn request_body(model: &str, req: &ModelRequest, max_tokens: u32) -> Value {
    let mut messages = Vec::with_capacity(req.messages.len() + 1);
    if !req.system.is_empty() {
        messages.push(json!({ "role": "system", "content": req.system }));
    }
    for message in &req.messages {
        match message {
            Message::User(text) => messages.push(json!({ "role": "user", "content": text })),
            Message::Assistant { text, tool_calls } => messages.push(assistant(text, tool_calls)),
            // One `tool` message per result. The format has no error flag:
            // the content says it.
            Message::ToolResults(results) => {
                for result in results {
                    messages.push(json!({
                        "role": "tool",
                        "tool_call_id": result.call_id,
                        "content": result.content,
                    }));
                }
            }
        }
    }
    let mut body = Map::new();
    body.insert("model".into(), model.into());
    body.insert("messages".into(), messages.into());
    body.insert("max_tokens".into(), max_tokens.into());
    body.insert("stream".into(), true.into());
    body.insert("stream_options".into(), json!({ "include_usage": true }));
    if !req.tools.is_empty() {
        let tools: Vec<Value> = req
            .tools
            .iter()
            .map(|tool| {
                json!({
                    "type": "function",
                    "function": {
                        "name": tool.name,
                        "description": tool.description,
                        "parameters": tool.parameters,
                    },
                })
            })
            .collect();
        body.insert("tools".into(), tools.into());
    }
    Value::Object(body)
}

fn assistant(text: &str, tool_calls: &[ToolCall]) -> Value {
    if tool_calls.is_empty() {
        return json!({ "role": "assistant", "content": text });
    }
    let calls: Vec<Value> = tool_calls
        .iter()
        .map(|call| {
            json!({
                "id": call.id,
                "type": "function",
                "function": { "name": call.name, "arguments": call.arguments.to_json_text() },
            })
        })
        .collect();
    // Next to tool calls the content may be null, and some servers refuse
    // an empty string there.
    let content = if text.is_empty() {
        Value::Null
    } else {
        Value::String(text.to_string())
    };
    json!({ "role": "assistant", "content": content, "tool_calls": calls })
}

/// One `data:` chunk of the stream. Every field may be missing or null:
/// servers differ.
#[derive(Deserialize)]
struct Chunk {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    choices: Option<Vec<Choice>>,
    #[serde(default)]
    usage: Option<WireUsage>,
    #[serde(default)]
    error: Option<Value>,
}

#[derive(Deserialize)]
struct Choice {
    #[serde(default)]
    index: Option<u32>,
    #[serde(default)]
    delta: Option<Delta>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct Delta {
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    refusal: Option<String>,
    #[serde(default)]
    tool_calls: Option<Vec<ToolCallDelta>>,
}

#[derive(Deserialize)]
struct ToolCallDelta {
    #[serde(default)]
    index: Option<u32>,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    function: Option<FunctionDelta>,
}

#[derive(Deserialize)]
struct FunctionDelta {
    #[serde(default)]
    name: Option<String>,
    /// A fragment of the JSON text (a string; an object from servers that
    /// do not follow the format).
    #[serde(default)]
    arguments: Option<Value>,
}

/// The `usage` of a completion.
#[derive(Deserialize)]
pub(super) struct WireUsage {
    #[serde(default)]
    prompt_tokens: Option<u64>,
    #[serde(default)]
    completion_tokens: Option<u64>,
    #[serde(default)]
    prompt_tokens_details: Option<PromptDetails>,
}

#[derive(Deserialize)]
struct PromptDetails {
    #[serde(default)]
    cached_tokens: Option<u64>,
}

/// `prompt_tokens` is the whole prompt already, its cached part included.
pub(super) fn usage(wire: &WireUsage) -> Usage {
    Usage {
        input_tokens: wire.prompt_tokens.unwrap_or(0),
        output_tokens: wire.completion_tokens.unwrap_or(0),
        cache_read_input_tokens: wire
            .prompt_tokens_details
            .as_ref()
            .and_then(|details| details.cached_tokens)
            .unwrap_or(0),
        cache_creation_input_tokens: 0,
    }
}

/// A tool call being streamed.
#[derive(Default)]
struct PartialCall {
    index: u32,
    id: String,
    name: String,
    arguments: String,
}

/// An answer being assembled from its chunks.
pub(super) struct Answer {
    id: String,
    model: String,
    text: String,
    refused: bool,
    calls: Vec<PartialCall>,
    finish_reason: Option<String>,
    usage: Option<Usage>,
    /// `[DONE]` came.
    done: bool,
    /// Bytes of text, ids, names and arguments so far.
    size: SizeCap,
}

impl Answer {
    pub(super) fn new(limit: usize) -> Answer {
        Answer {
            id: String::new(),
            model: String::new(),
            text: String::new(),
            refused: false,
            calls: Vec::new(),
            finish_reason: None,
            usage: None,
            done: false,
            size: SizeCap::new("the answer's text and tool arguments", limit),
        }
    }

    fn push_call(&mut self, delta: ToolCallDelta) -> Result<(), ProviderError> {
        let index = delta.index.unwrap_or(0);
        let id = delta.id.unwrap_or_default();
        let (name, arguments) = match delta.function {
            Some(function) => (
                function.name.unwrap_or_default(),
                match function.arguments {
                    None | Some(Value::Null) => String::new(),
                    Some(Value::String(fragment)) => fragment,
                    Some(other) => other.to_string(),
                },
            ),
            None => (String::new(), String::new()),
        };
        self.size.grow(id.len() + name.len() + arguments.len())?;
        // The delta continues the latest call at its index, unless it names
        // another id: some servers send parallel calls all at index 0 and
        // tell them apart only by id.
        let continued = self.calls.iter().rposition(|call| {
            call.index == index && (id.is_empty() || call.id.is_empty() || call.id == id)
        });
        let slot = match continued {
            Some(slot) => slot,
            None => {
                self.calls.push(PartialCall {
                    index,
                    ..PartialCall::default()
                });
                self.calls.len() - 1
            }
        };
        if let Some(call) = self.calls.get_mut(slot) {
            if call.id.is_empty() {
                call.id = id;
            }
            // The name comes once, or in fragments; a server that repeats
            // it whole does not double it.
            if call.name.is_empty() {
                call.name = name;
            } else if !name.is_empty() && call.name != name {
                call.name.push_str(&name);
            }
            call.arguments.push_str(&arguments);
        }
        Ok(())
    }
}

impl Assemble for Answer {
    fn push(
        &mut self,
        data: &str,
        on_text: &mut (dyn FnMut(&str) + Send),
    ) -> Result<bool, ProviderError> {
        let data = data.trim();
        if data == "[DONE]" {
            self.done = true;
            return Ok(true);
        }
        let chunk: Chunk = serde_json::from_str(data).map_err(|e| {
            ProviderError::Protocol(format!(
                "a chunk of the stream is not a chat completion chunk ({e})"
            ))
        })?;
        if let Some(error) = chunk.error {
            return Err(in_stream_error(&ErrorDetail::from_json(&error)));
        }
        if self.id.is_empty() {
            self.id = chunk.id.unwrap_or_default();
        }
        if self.model.is_empty() {
            self.model = chunk.model.unwrap_or_default();
        }
        if let Some(wire) = &chunk.usage {
            self.usage = Some(usage(wire));
        }
        for choice in chunk.choices.unwrap_or_default() {
            // One answer is asked for (no `n`): other choices are not ours.
            if choice.index.unwrap_or(0) != 0 {
                continue;
            }
            if let Some(delta) = choice.delta {
                for (text, refusal) in [(delta.content, false), (delta.refusal, true)] {
                    let Some(text) = text.filter(|text| !text.is_empty()) else {
                        continue;
                    };
                    self.size.grow(text.len())?;
                    self.text.push_str(&text);
                    self.refused |= refusal;
                    on_text(&text);
                }
                for call in delta.tool_calls.unwrap_or_default() {
                    self.push_call(call)?;
                }
            }
            if let Some(reason) = choice.finish_reason {
                self.finish_reason = Some(reason);
            }
        }
        Ok(false)
    }

    fn finish(self) -> Result<ModelResponse, ProviderError> {
        // A server that omits `[DONE]` is done once the finish reason and
        // the usage came.
        if !self.done && (self.finish_reason.is_none() || self.usage.is_none()) {
            return Err(ProviderError::StreamCut(
                "the stream ended before its `data: [DONE]`".into(),
            ));
        }
        let tool_calls: Vec<ToolCall> = self
            .calls
            .into_iter()
            .enumerate()
            .map(|(i, call)| ToolCall {
                // Some servers send no ids; the harness needs one per call.
                id: if call.id.is_empty() {
                    format!("call_{i}")
                } else {
                    call.id
                },
                name: call.name,
                arguments: Arguments::parse(call.arguments),
            })
            .collect();
        let stop = match self.finish_reason.as_deref() {
            Some("tool_calls") | Some("function_call") => StopReason::ToolUse,
            Some("length") => StopReason::MaxTokens,
            Some("content_filter") => StopReason::Refusal,
            // Some servers say "stop" after tool calls.
            _ if !tool_calls.is_empty() => StopReason::ToolUse,
            Some("stop") | None if self.refused => StopReason::Refusal,
            Some("stop") | None => StopReason::EndTurn,
            Some(other) => StopReason::Other(other.to_string()),
        };
        Ok(ModelResponse {
            id: self.id,
            model: self.model,
            text: self.text,
            tool_calls,
            stop,
            usage: self.usage.unwrap_or_default(),
        })
    }
}
