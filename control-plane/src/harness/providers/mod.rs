//! Model providers: a [`Provider`] per `[[model]]`, speaking that model's
//! wire format over HTTP (OpenAI-compatible Chat Completions in `openai`,
//! Anthropic Messages in `anthropic`). Every call streams: text deltas go to
//! the caller as they arrive, and the complete answer is assembled from the
//! stream. What is worth another try (429, 5xx, a connection error, a cut
//! stream) is tried again with backoff, honouring `Retry-After`; anything
//! else ends the call with the provider's own message.
//!
//! The types here are the harness's and neutral to both formats. The
//! provider is outside bridle's trust boundary: what it sends is bounded
//! (an error body, one event, the assembled answer) and never assumed
//! well-formed (tool arguments that do not parse are kept as such, for the
//! harness to send the error back to the model).

mod anthropic;
mod openai;
#[cfg(test)]
mod tests;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use eventsource_stream::{EventStreamError, Eventsource};
use futures::StreamExt;
use reqwest::header::{
    HeaderMap, HeaderName, HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER,
};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::config::{ModelConfig, ProviderKind};

/// The Messages API version bridle speaks.
const ANTHROPIC_VERSION: &str = "2023-06-01";
/// The most of an error answer's body that is read.
pub const MAX_ERROR_BODY_BYTES: usize = 1 << 20;
/// The most text and tool-call arguments one answer may assemble.
pub const MAX_ANSWER_BYTES: usize = 8 << 20;
/// The most bytes received while no server-sent event completes: what the
/// stream parser may hold.
const MAX_EVENT_BYTES: usize = 8 << 20;
/// A longer `Retry-After` is waited this long.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);
/// The longest pause the backoff grows to between tries.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(60);
/// Connecting may take this long (within `request_timeout_secs`).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A provider's message is kept to this many characters.
const MAX_MESSAGE_CHARS: usize = 2000;

/// One request: the whole conversation so far (providers keep no state).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ModelRequest {
    pub system: String,
    pub messages: Vec<Message>,
    pub tools: Vec<ToolSpec>,
    /// The most tokens of the answer; 0, or more than the model's
    /// `max_output_tokens`: that.
    pub max_tokens: u32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Message {
    User(String),
    Assistant {
        text: String,
        tool_calls: Vec<ToolCall>,
    },
    /// Every result of one turn's calls. OpenAI gets one `tool` message per
    /// result; Anthropic one user message with all the `tool_result` blocks.
    ToolResults(Vec<ToolResult>),
}

/// A tool the model may call.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ToolSpec {
    pub name: String,
    pub description: String,
    /// The JSON Schema of the arguments (an object).
    pub parameters: Value,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    pub arguments: Arguments,
}

/// A call's arguments as the model sent them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Arguments {
    Json(Value),
    /// Not JSON (OpenAI's arguments are a string the model writes): kept,
    /// with the parser's complaint, so the harness can tell the model.
    Malformed {
        raw: String,
        error: String,
    },
}

impl Arguments {
    /// Reads arguments streamed as text; nothing at all is `{}` (a call
    /// without parameters).
    pub fn parse(raw: String) -> Arguments {
        if raw.trim().is_empty() {
            return Arguments::Json(Value::Object(Map::new()));
        }
        match serde_json::from_str(&raw) {
            Ok(value) => Arguments::Json(value),
            Err(e) => Arguments::Malformed {
                raw,
                error: e.to_string(),
            },
        }
    }

    /// One JSON text (OpenAI's `arguments`); malformed ones as they came.
    pub fn to_json_text(&self) -> String {
        match self {
            Arguments::Json(value) => value.to_string(),
            Arguments::Malformed { raw, .. } => raw.clone(),
        }
    }

    /// A JSON object (Anthropic's `input` must be one): `{}` for anything
    /// else.
    pub fn to_object(&self) -> Value {
        match self {
            Arguments::Json(value @ Value::Object(_)) => value.clone(),
            _ => Value::Object(Map::new()),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ToolResult {
    pub call_id: String,
    pub content: String,
    /// Anthropic marks the block `is_error`; OpenAI has no such flag, so the
    /// content itself should say so.
    pub is_error: bool,
}

/// One complete answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelResponse {
    pub id: String,
    pub model: String,
    pub text: String,
    pub tool_calls: Vec<ToolCall>,
    pub stop: StopReason,
    pub usage: Usage,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    EndTurn,
    ToolUse,
    MaxTokens,
    Refusal,
    ContextWindowExceeded,
    Other(String),
}

/// Tokens of one call, the same way for both formats.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// The whole prompt, cached parts included (Anthropic: input + cache
    /// creation + cache read; OpenAI: `prompt_tokens`).
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// Of `input_tokens`, those read from the provider's prompt cache.
    pub cache_read_input_tokens: u64,
    /// Of `input_tokens`, those written to it (Anthropic only).
    pub cache_creation_input_tokens: u64,
}

impl Usage {
    /// What the call cost in USD at the model's configured prices; none
    /// when it has no price. Cached input counts at the full input price,
    /// so with caching this is an upper bound.
    pub fn cost_usd(&self, model: &ModelConfig) -> Option<f64> {
        if model.price_input_per_mtok.is_none() && model.price_output_per_mtok.is_none() {
            return None;
        }
        let input = model.price_input_per_mtok.unwrap_or(0.0) * self.input_tokens as f64;
        let output = model.price_output_per_mtok.unwrap_or(0.0) * self.output_tokens as f64;
        Some((input + output) / 1_000_000.0)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// 401 or 403: the key is missing, wrong, expired or not allowed this
    /// model. The key is never part of the message.
    #[error("the provider refused the API key (HTTP {status}; {key_source}){detail}")]
    KeyRefused {
        status: u16,
        /// Where the key comes from (`ModelConfig::key_source`).
        key_source: String,
        /// The provider's message for a 403 (`: …`), else empty.
        detail: String,
    },
    /// The conversation does not fit the model's context window.
    #[error("the conversation is too long for the model's context window: {message}")]
    ContextWindowExceeded { message: String },
    /// Any other error status; 408, 409, 429 and 5xx are worth another try.
    #[error("the provider answered HTTP {status}: {message}")]
    Status {
        status: u16,
        message: String,
        retry_after: Option<Duration>,
    },
    /// The request did not get an answer: connecting failed, or it timed out.
    #[error("no answer from the provider: {0}")]
    Transport(String),
    /// The answer's stream stopped before its end.
    #[error("the provider's answer stopped before its end: {0}")]
    StreamCut(String),
    /// The provider reported an error in the middle of the stream.
    #[error("the provider reported an error mid-answer ({kind}): {message}")]
    InStream {
        kind: String,
        message: String,
        retryable: bool,
    },
    /// The answer grew past a bound.
    #[error("the provider's answer is too large: {what} is over {limit} bytes")]
    TooLarge { what: &'static str, limit: usize },
    /// The answer is not in the wire format the provider should speak.
    #[error("the provider's answer is not in the expected format: {0}")]
    Protocol(String),
    /// The client cannot be set up (e.g. a key an HTTP header cannot carry).
    #[error("{0}")]
    Setup(String),
    /// Tried again as configured, and failed every time.
    #[error("{last} (tried {tries} times)")]
    Exhausted {
        tries: u32,
        last: Box<ProviderError>,
    },
}

impl ProviderError {
    /// Whether another try may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            ProviderError::Status { status, .. } => is_retryable_status(*status),
            ProviderError::Transport(_) | ProviderError::StreamCut(_) => true,
            ProviderError::InStream { retryable, .. } => *retryable,
            _ => false,
        }
    }

    /// How long the provider asked to wait before the next try.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ProviderError::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// Timeouts, conflicts, rate limits and server faults pass.
fn is_retryable_status(status: u16) -> bool {
    matches!(status, 408 | 409 | 429) || (500..=599).contains(&status)
}

/// A `[[model]]` ready to be called: its configuration and one HTTP client
/// (connections are reused across calls; the key is in the client's
/// default headers, marked sensitive so not even `Debug` shows it).
#[derive(Clone, Debug)]
pub struct Provider {
    config: ModelConfig,
    client: reqwest::Client,
}

impl Provider {
    pub fn new(config: &ModelConfig) -> Result<Provider, ProviderError> {
        let mut headers = HeaderMap::new();
        if config.provider == ProviderKind::Anthropic {
            headers.insert(
                HeaderName::from_static("anthropic-version"),
                HeaderValue::from_static(ANTHROPIC_VERSION),
            );
        }
        if let Some(key) = &config.api_key {
            let (name, value) = match config.provider {
                ProviderKind::OpenAi => (AUTHORIZATION, format!("Bearer {}", key.expose())),
                ProviderKind::Anthropic => (
                    HeaderName::from_static("x-api-key"),
                    key.expose().to_string(),
                ),
            };
            let mut value = HeaderValue::from_str(&value).map_err(|_| {
                ProviderError::Setup(format!(
                    "[[model]] {:?}: the API key ({}) holds bytes an HTTP header cannot carry",
                    config.name,
                    config.key_source()
                ))
            })?;
            value.set_sensitive(true);
            headers.insert(name, value);
        }
        let timeout = Duration::from_secs(config.request_timeout_secs);
        let client = reqwest::Client::builder()
            .default_headers(headers)
            .connect_timeout(CONNECT_TIMEOUT.min(timeout))
            .timeout(timeout)
            // The configured URL is the one called: no proxy from the
            // environment, no redirect followed (the key would go along).
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("bridle/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| {
                ProviderError::Setup(format!(
                    "[[model]] {:?}: building its HTTP client: {e}",
                    config.name
                ))
            })?;
        Ok(Provider {
            config: config.clone(),
            client,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Asks the model for its next turn. Text deltas go to `on_text` as
    /// they arrive; the complete answer is returned. A retried call streams
    /// its text again from the start.
    pub async fn call(
        &self,
        req: &ModelRequest,
        on_text: &mut (dyn FnMut(&str) + Send),
    ) -> Result<ModelResponse, ProviderError> {
        let mut delays = ExponentialBuilder::default()
            .with_jitter()
            .with_min_delay(Duration::from_millis(self.config.retry_min_delay_ms))
            .with_max_delay(MAX_RETRY_DELAY)
            .with_max_times(self.config.max_retries as usize)
            .build();
        let mut retries = 0u32;
        loop {
            let error = match self.attempt(req, &mut *on_text).await {
                Ok(response) => return Ok(response),
                Err(error) => error,
            };
            if !error.is_retryable() {
                return Err(error);
            }
            let Some(backoff) = delays.next() else {
                if retries == 0 {
                    return Err(error);
                }
                return Err(ProviderError::Exhausted {
                    tries: retries + 1,
                    last: Box::new(error),
                });
            };
            let delay = error.retry_after().unwrap_or(backoff);
            retries += 1;
            tracing::warn!(
                model = %self.config.name,
                retry = retries,
                ?delay,
                "model call failed; trying again: {error}"
            );
            tokio::time::sleep(delay).await;
        }
    }

    /// One try: the request, then its streamed answer.
    async fn attempt(
        &self,
        req: &ModelRequest,
        on_text: &mut (dyn FnMut(&str) + Send),
    ) -> Result<ModelResponse, ProviderError> {
        let max_tokens = answer_tokens(req.max_tokens, self.config.max_output_tokens);
        let base = self.config.base_url.trim_end_matches('/');
        let (url, body) = match self.config.provider {
            ProviderKind::OpenAi => (
                format!("{base}/chat/completions"),
                openai::request_body(&self.config.model, req, max_tokens),
            ),
            ProviderKind::Anthropic => (
                format!("{base}/v1/messages"),
                anthropic::request_body(&self.config.model, req, max_tokens),
            ),
        };
        let response = self
            .client
            .post(url.as_str())
            .header(ACCEPT, "text/event-stream")
            .json(&body)
            .send()
            .await
            .map_err(|e| self.transport_error(&e))?;
        let status = response.status().as_u16();
        if !response.status().is_success() {
            let retry_after = retry_after(response.headers());
            let body = read_capped(response, MAX_ERROR_BODY_BYTES).await;
            return Err(error_from_status(
                status,
                retry_after,
                body.as_deref(),
                &self.config,
            ));
        }
        let content_type = response
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if content_type.starts_with("application/json") {
            return Err(ProviderError::Protocol(
                "one JSON document came instead of a stream of server-sent events \
                 (does the server support \"stream\": true?)"
                    .into(),
            ));
        }
        match self.config.provider {
            ProviderKind::OpenAi => {
                read_stream(response, openai::Answer::new(MAX_ANSWER_BYTES), on_text).await
            }
            ProviderKind::Anthropic => {
                read_stream(response, anthropic::Answer::new(MAX_ANSWER_BYTES), on_text).await
            }
        }
    }

    fn transport_error(&self, e: &reqwest::Error) -> ProviderError {
        if e.is_timeout() {
            return ProviderError::Transport(format!(
                "no answer within request_timeout_secs ({} s)",
                self.config.request_timeout_secs
            ));
        }
        ProviderError::Transport(describe(e))
    }
}

/// How many bytes of an answer have arrived, against the cap past which the
/// answer is refused (a provider is outside bridle's trust boundary too).
#[derive(Debug)]
pub(super) struct SizeCap {
    what: &'static str,
    used: usize,
    limit: usize,
}

impl SizeCap {
    pub(super) fn new(what: &'static str, limit: usize) -> SizeCap {
        SizeCap {
            what,
            used: 0,
            limit,
        }
    }

    pub(super) fn grow(&mut self, bytes: usize) -> Result<(), ProviderError> {
        self.used = self.used.saturating_add(bytes);
        if self.used > self.limit {
            return Err(ProviderError::TooLarge {
                what: self.what,
                limit: self.limit,
            });
        }
        Ok(())
    }
}

/// The answer's token limit: what the request asks, within the model's.
fn answer_tokens(requested: u32, model_max: u32) -> u32 {
    match requested {
        0 => model_max,
        n => n.min(model_max),
    }
}

/// An error with its causes, on one line.
fn describe(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// `Retry-After` in seconds (or OpenAI's `retry-after-ms`), at most a
/// minute. An HTTP date is not read: the backoff applies then.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let number =
        |name: &str| -> Option<u64> { headers.get(name)?.to_str().ok()?.trim().parse().ok() };
    let wait = number("retry-after-ms")
        .map(Duration::from_millis)
        .or_else(|| number(RETRY_AFTER.as_str()).map(Duration::from_secs))?;
    Some(wait.min(MAX_RETRY_AFTER))
}

/// The body, or none when it is over `cap` (it is not read further then).
/// A body that breaks off is what there is to show.
async fn read_capped(mut response: reqwest::Response, cap: usize) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > cap {
                    return None;
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) | Err(_) => return Some(body),
        }
    }
}

/// The error an answer with an error status means. `body` is none when it
/// was too large to read.
fn error_from_status(
    status: u16,
    retry_after: Option<Duration>,
    body: Option<&[u8]>,
    config: &ModelConfig,
) -> ProviderError {
    let detail = match body {
        Some(body) => ErrorDetail::parse(body),
        None => ErrorDetail {
            message: format!(
                "its error body is over {} KiB and was not read",
                MAX_ERROR_BODY_BYTES >> 10
            ),
            ..ErrorDetail::default()
        },
    };
    // A provider may quote the key it refused; it is not repeated.
    let mut message = match &config.api_key {
        Some(key) if !key.expose().is_empty() => detail.message.replace(key.expose(), "***"),
        _ => detail.message.clone(),
    };
    if message.is_empty() {
        message = "(no message)".into();
    }
    match status {
        // What a 401 says is about the key, which is not shown; where the
        // key comes from says what to fix.
        401 => ProviderError::KeyRefused {
            status,
            key_source: config.key_source(),
            detail: String::new(),
        },
        403 => ProviderError::KeyRefused {
            status,
            key_source: config.key_source(),
            detail: format!(": {message}"),
        },
        400 | 413 if detail.is_context_overflow() => {
            ProviderError::ContextWindowExceeded { message }
        }
        _ => ProviderError::Status {
            status,
            message,
            retry_after,
        },
    }
}

/// What a provider's error JSON says. Both formats nest it under `error`
/// (`{"error": {"message", "type", "code"}}`, `{"type": "error", "error":
/// {"type", "message"}}`); some servers send `{"error": "text"}` or
/// `{"detail": "text"}`, or plain text.
#[derive(Debug, Default)]
struct ErrorDetail {
    message: String,
    kind: String,
    code: String,
}

impl ErrorDetail {
    fn parse(body: &[u8]) -> ErrorDetail {
        match serde_json::from_slice::<Value>(body) {
            Ok(value) => ErrorDetail::from_json(&value),
            Err(_) => ErrorDetail {
                message: clip(String::from_utf8_lossy(body).trim()),
                ..ErrorDetail::default()
            },
        }
    }

    fn from_json(value: &Value) -> ErrorDetail {
        let error = value.get("error").unwrap_or(value);
        if let Some(text) = error.as_str() {
            return ErrorDetail {
                message: clip(text),
                ..ErrorDetail::default()
            };
        }
        let field = |key: &str| match error.get(key) {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(text)) => text.clone(),
            Some(other) => other.to_string(),
        };
        let mut message = field("message");
        if message.is_empty() {
            message = field("detail");
        }
        if message.is_empty() {
            message = value.to_string();
        }
        ErrorDetail {
            message: clip(&message),
            kind: field("type"),
            code: field("code"),
        }
    }

    /// OpenAI says `context_length_exceeded`; others only say it in words.
    fn is_context_overflow(&self) -> bool {
        let message = self.message.to_ascii_lowercase();
        self.code == "context_length_exceeded"
            || [
                "context length",
                "context_length",
                "context window",
                "maximum context",
                "prompt is too long",
            ]
            .iter()
            .any(|words| message.contains(words))
    }
}

/// An error event in a stream: overload, rate limits and server faults are
/// worth another try; anything else is the request's own fault.
fn in_stream_error(detail: &ErrorDetail) -> ProviderError {
    let retryable = matches!(
        detail.kind.as_str(),
        "overloaded_error"
            | "api_error"
            | "rate_limit_error"
            | "timeout_error"
            | "server_error"
            | "internal_server_error"
            | "rate_limit_exceeded"
    );
    ProviderError::InStream {
        kind: if detail.kind.is_empty() {
            "error".into()
        } else {
            detail.kind.clone()
        },
        message: detail.message.clone(),
        retryable,
    }
}

/// At most [`MAX_MESSAGE_CHARS`] characters of a provider's text.
fn clip(text: &str) -> String {
    let mut chars = text.chars();
    let kept: String = chars.by_ref().take(MAX_MESSAGE_CHARS).collect();
    if chars.next().is_some() {
        format!("{kept}…")
    } else {
        kept
    }
}

/// One streamed answer being put together from its server-sent events.
trait Assemble {
    /// Takes one event's data; true once the answer is complete.
    fn push(
        &mut self,
        data: &str,
        on_text: &mut (dyn FnMut(&str) + Send),
    ) -> Result<bool, ProviderError>;

    /// The complete answer; a stream that never completed is
    /// [`ProviderError::StreamCut`].
    fn finish(self) -> Result<ModelResponse, ProviderError>;
}

/// Why the byte stream under the event parser stopped.
enum ByteError {
    Read(reqwest::Error),
    /// More than [`MAX_EVENT_BYTES`] came without an event completing.
    TooLarge,
}

/// Reads the answer's server-sent events into `answer`, until it says it is
/// complete or the stream ends.
async fn read_stream<A: Assemble>(
    response: reqwest::Response,
    mut answer: A,
    on_text: &mut (dyn FnMut(&str) + Send),
) -> Result<ModelResponse, ProviderError> {
    // Bytes received since the last event: the parser's buffer is bounded
    // by counting what goes in and resetting when an event comes out.
    let unparsed = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&unparsed);
    let chunks = response.bytes_stream().map(
        move |chunk: reqwest::Result<bytes::Bytes>| -> Result<bytes::Bytes, ByteError> {
            match chunk {
                Ok(chunk) => {
                    let held = counter
                        .fetch_add(chunk.len(), Ordering::Relaxed)
                        .saturating_add(chunk.len());
                    if held > MAX_EVENT_BYTES {
                        Err(ByteError::TooLarge)
                    } else {
                        Ok(chunk)
                    }
                }
                Err(e) => Err(ByteError::Read(e)),
            }
        },
    );
    let mut events = std::pin::pin!(chunks.eventsource());
    while let Some(event) = events.next().await {
        let event = match event {
            Ok(event) => event,
            Err(EventStreamError::Transport(ByteError::Read(e))) => {
                return Err(ProviderError::StreamCut(describe(&e)))
            }
            Err(EventStreamError::Transport(ByteError::TooLarge)) => {
                return Err(ProviderError::TooLarge {
                    what: "one server-sent event",
                    limit: MAX_EVENT_BYTES,
                })
            }
            Err(EventStreamError::Utf8(e)) => {
                return Err(ProviderError::Protocol(format!(
                    "the event stream is not UTF-8 ({e})"
                )))
            }
            Err(EventStreamError::Parser(_)) => {
                return Err(ProviderError::Protocol(
                    "the stream does not parse as server-sent events".into(),
                ))
            }
        };
        unparsed.store(0, Ordering::Relaxed);
        if answer.push(&event.data, &mut *on_text)? {
            break;
        }
    }
    answer.finish()
}
