//! A scripted stand-in for a model provider, for tests and demos. It is a
//! script, not a model: it answers from a fixed [`Script`] and understands
//! nothing of what it is sent.
//!
//! It speaks two real wire formats over real HTTP, so that agent code can be
//! tested end to end against it exactly as against a provider:
//! `POST /v1/chat/completions` (OpenAI Chat Completions) and
//! `POST /v1/messages` (Anthropic Messages), each streamed (`"stream": true`,
//! server-sent events) or not.
//!
//! A request is matched to a [`Conversation`] by the text of its first user
//! message, and to a [`Turn`] by how many assistant messages it holds. The
//! answer depends only on the request, so a replayed request gets the same
//! answer; what the server keeps is a log: how many requests came for each
//! turn (which also drives [`Turn::fail_first`]) and every request body, for
//! tests to check what the client sent.
//!
//! Token counts in `usage` are a deterministic count of bytes (a quarter of
//! them, rounded up), never a tokenizer's: they are there so that clients
//! which account for usage have numbers to account.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use axum::routing::post;
use axum::Router;
use serde_json::{json, Map, Value};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// The path of the OpenAI Chat Completions endpoint.
pub const OPENAI_PATH: &str = "/v1/chat/completions";
/// The path of the Anthropic Messages endpoint.
pub const ANTHROPIC_PATH: &str = "/v1/messages";

/// Request bodies up to this size are read (axum's default, 2 MB, is less
/// than a long agent conversation with file contents in it).
const BODY_LIMIT: usize = 64 * 1024 * 1024;

/// The header an Anthropic request must carry (the real API refuses
/// requests without it, and a client that forgets it must find out here).
const ANTHROPIC_VERSION: &str = "anthropic-version";

/// What the server answers: the conversations it knows, turn by turn.
#[derive(Clone, Debug, Default, serde::Deserialize, serde::Serialize)]
pub struct Script {
    /// Conversations the server knows; a request belongs to the first whose
    /// `first_user_contains` occurs in the text of the request's first user
    /// message.
    pub conversations: Vec<Conversation>,
    /// If set, every request must carry it (`Authorization: Bearer KEY` for
    /// /v1/chat/completions, `x-api-key: KEY` for /v1/messages), else 401 in
    /// the provider's error format.
    #[serde(default)]
    pub api_key: Option<String>,
}

/// One scripted conversation.
#[derive(Clone, Debug, Default, serde::Deserialize, serde::Serialize)]
pub struct Conversation {
    /// The name [`Server::requests`] and error messages use.
    pub name: String,
    /// A request belongs to this conversation when its first user message
    /// contains this text (the first matching conversation wins).
    pub first_user_contains: String,
    /// Turn i answers a request whose messages hold i assistant messages.
    pub turns: Vec<Turn>,
    /// Set: a request is matched to the turn after the one whose tool calls
    /// include the last call of the request's last assistant message
    /// (turn 0 when there is no assistant message; by the count of
    /// assistant messages when no turn has that call). For clients that
    /// compact a conversation, which leaves fewer assistant messages in
    /// it: give every call of the script its own id.
    #[serde(default)]
    pub turn_by_last_call: bool,
}

/// One scripted answer, possibly preceded by scripted failures.
#[derive(Clone, Debug, Default, serde::Deserialize, serde::Serialize)]
pub struct Turn {
    /// The first attempts at this turn fail with these, in order (then the answer).
    #[serde(default)]
    pub fail_first: Vec<Failure>,
    /// Wait this long before answering (each attempt).
    #[serde(default)]
    pub delay_ms: u64,
    /// Assistant text (may be empty when there are tool calls).
    #[serde(default)]
    pub text: String,
    /// Tool calls the answer makes, in order.
    #[serde(default)]
    pub tool_calls: Vec<ScriptedCall>,
}

/// An error answer, in the provider's error format.
#[derive(Clone, Debug, Default, serde::Deserialize, serde::Serialize)]
pub struct Failure {
    /// The HTTP status, 400 to 599.
    pub status: u16,
    /// Sent as the `Retry-After` header when set.
    #[serde(default)]
    pub retry_after_secs: Option<u64>,
    /// The error message (a generated one naming the turn when empty).
    #[serde(default)]
    pub message: String,
}

/// A tool call in a scripted answer.
#[derive(Clone, Debug, Default, serde::Deserialize, serde::Serialize)]
pub struct ScriptedCall {
    /// The call's id (OpenAI `tool_calls[].id`, Anthropic `tool_use.id`).
    pub id: String,
    /// The tool's name.
    pub name: String,
    /// The arguments as JSON (OpenAI: serialized into the `arguments` string;
    /// Anthropic: the `input` object). Absent (null) means no arguments: `{}`.
    #[serde(default)]
    pub arguments: Value,
    /// Sent verbatim instead of `arguments` (OpenAI: the `arguments` string as
    /// is, e.g. malformed JSON; Anthropic: streamed as the input_json_delta
    /// text, and in a non-streamed answer the server answers 500 "raw
    /// arguments need streaming on /v1/messages" because `input` must be an
    /// object).
    #[serde(default)]
    pub raw_arguments: Option<String>,
}

impl Script {
    /// Why this script cannot be served, if it cannot: a failure whose
    /// status is not an HTTP error status (400 to 599), or two conversations
    /// with one name (their request counts would mix).
    pub fn check(&self) -> Result<(), String> {
        let mut names = HashSet::new();
        for conversation in &self.conversations {
            if !names.insert(conversation.name.as_str()) {
                return Err(format!(
                    "two conversations are named {:?}; names must be unique",
                    conversation.name
                ));
            }
            for (index, turn) in conversation.turns.iter().enumerate() {
                for failure in &turn.fail_first {
                    if !(400..=599).contains(&failure.status) {
                        return Err(format!(
                            "conversation {:?}, turn {index}: fail_first status {} is not an \
                             HTTP error status (400 to 599)",
                            conversation.name, failure.status
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

/// A running scripted server. It serves until dropped.
pub struct Server {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl Server {
    /// Binds 127.0.0.1:0 and serves until dropped (the task is aborted on drop).
    pub async fn start(script: Script) -> io::Result<Server> {
        let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
        Server::bind(script, loopback).await
    }

    /// Binds `addr` and serves until dropped. A script that fails
    /// [`Script::check`] is an `InvalidInput` error.
    pub async fn bind(script: Script, addr: SocketAddr) -> io::Result<Server> {
        script
            .check()
            .map_err(|why| io::Error::new(io::ErrorKind::InvalidInput, why))?;
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let requests = script
            .conversations
            .iter()
            .map(|c| (c.name.clone(), vec![0; c.turns.len()]))
            .collect();
        let shared = Arc::new(Shared {
            script,
            log: Mutex::new(Log {
                requests,
                received: Vec::new(),
                answers: 0,
            }),
        });
        let app: Router = Router::new()
            .route(OPENAI_PATH, post(openai))
            .route(ANTHROPIC_PATH, post(anthropic))
            .layer(DefaultBodyLimit::max(BODY_LIMIT))
            .with_state(Arc::clone(&shared));
        let task = tokio::spawn(async move {
            // Only ends when the task is aborted (axum retries failed accepts).
            let _ = axum::serve(listener, app).await;
        });
        Ok(Server { addr, shared, task })
    }

    /// "http://127.0.0.1:PORT" (no trailing slash). OpenAI base URL =
    /// base_url() + "/v1"; Anthropic base URL = base_url().
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Requests received for `conversation`, per turn index (index i =
    /// requests for turn i, failed attempts included).
    ///
    /// The list holds one entry per turn of the script (0 for a turn never
    /// asked for), and more when requests came for turns past the script
    /// (they are answered 400 and counted too). Requests refused before they
    /// were matched to a turn (no or a wrong API key, no `anthropic-version`,
    /// a body that is not JSON) are not counted. Empty for a name the script
    /// does not hold.
    pub fn requests(&self, conversation: &str) -> Vec<u32> {
        self.shared
            .log()
            .requests
            .get(conversation)
            .cloned()
            .unwrap_or_default()
    }

    /// Every request body received (parsed JSON) with its path
    /// ("/v1/chat/completions" or "/v1/messages"), in arrival order.
    ///
    /// Refused requests are included (a body that is not JSON is not).
    pub fn received(&self) -> Vec<(String, Value)> {
        self.shared.log().received.clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Dropping the serve future also tells open connections to close once
        // their answer is sent.
        self.task.abort();
    }
}

/// What the handlers share: the script (read only) and the log.
struct Shared {
    script: Script,
    log: Mutex<Log>,
}

/// What the server has seen.
struct Log {
    /// Per conversation name: requests per turn index.
    requests: HashMap<String, Vec<u32>>,
    /// Every JSON request body with its path, in arrival order.
    received: Vec<(String, Value)>,
    /// Answers given so far (numbers the answers' ids).
    answers: u64,
}

impl Shared {
    fn log(&self) -> MutexGuard<'_, Log> {
        // The log stays consistent even if a holder panicked: every update
        // is a single push or increment.
        self.log.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn record(&self, path: &str, body: &Value) {
        self.log().received.push((path.to_owned(), body.clone()));
    }

    /// Counts a request for `turn` of `conversation`; returns how many
    /// requests for that turn came before it.
    fn count(&self, conversation: &str, turn: usize) -> usize {
        let mut log = self.log();
        let counts = log.requests.entry(conversation.to_owned()).or_default();
        if counts.len() <= turn {
            counts.resize(turn + 1, 0);
        }
        match counts.get_mut(turn) {
            Some(count) => {
                let before = *count;
                *count = count.saturating_add(1);
                before as usize
            }
            None => 0,
        }
    }

    /// The number of the answer about to be given (1 for the first).
    fn next_answer(&self) -> u64 {
        let mut log = self.log();
        log.answers += 1;
        log.answers
    }
}

/// Which wire format a request came in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Provider {
    OpenAi,
    Anthropic,
}

impl Provider {
    fn path(self) -> &'static str {
        match self {
            Provider::OpenAi => OPENAI_PATH,
            Provider::Anthropic => ANTHROPIC_PATH,
        }
    }

    /// Whether the request carries the script's API key the way this
    /// provider expects it.
    fn carries_key(self, headers: &HeaderMap, key: &str) -> bool {
        match self {
            Provider::OpenAi => {
                let expected = format!("Bearer {key}");
                headers
                    .get(header::AUTHORIZATION)
                    .is_some_and(|value| value.as_bytes() == expected.as_bytes())
            }
            Provider::Anthropic => headers
                .get("x-api-key")
                .is_some_and(|value| value.as_bytes() == key.as_bytes()),
        }
    }

    fn missing_key_message(self) -> &'static str {
        match self {
            Provider::OpenAi => {
                "script: missing or wrong API key (expected header Authorization: Bearer KEY)"
            }
            Provider::Anthropic => "script: missing or wrong API key (expected header x-api-key)",
        }
    }

    /// The error `type` this provider sends with `status`.
    fn error_type(self, status: StatusCode) -> &'static str {
        match status.as_u16() {
            400 => "invalid_request_error",
            401 => "authentication_error",
            403 => "permission_error",
            404 => "not_found_error",
            413 => "request_too_large",
            429 => "rate_limit_error",
            529 if self == Provider::Anthropic => "overloaded_error",
            500..=599 => match self {
                Provider::OpenAi => "server_error",
                Provider::Anthropic => "api_error",
            },
            _ => "invalid_request_error",
        }
    }
}

async fn openai(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    respond(shared, Provider::OpenAi, headers, body).await
}

async fn anthropic(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    respond(shared, Provider::Anthropic, headers, body).await
}

/// Answers one request from the script.
async fn respond(
    shared: Arc<Shared>,
    provider: Provider,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let request: Value = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(e) => {
            let message = format!("script: the request body is not JSON: {e}");
            return error_response(provider, StatusCode::BAD_REQUEST, None, &message);
        }
    };
    shared.record(provider.path(), &request);
    if let Some(key) = &shared.script.api_key {
        if !provider.carries_key(&headers, key) {
            let message = provider.missing_key_message();
            return error_response(provider, StatusCode::UNAUTHORIZED, None, message);
        }
    }
    if provider == Provider::Anthropic && !headers.contains_key(ANTHROPIC_VERSION) {
        let message = "script: the anthropic-version header is required";
        return error_response(provider, StatusCode::BAD_REQUEST, None, message);
    }
    let first_user = first_user_text(&request);
    let Some(conversation) = shared
        .script
        .conversations
        .iter()
        .find(|c| first_user.contains(c.first_user_contains.as_str()))
    else {
        let message = "script: no conversation matches the first user message";
        return error_response(provider, StatusCode::BAD_REQUEST, None, message);
    };
    let turn_index = match last_call_id(&request) {
        Some(id) if conversation.turn_by_last_call => conversation
            .turns
            .iter()
            .position(|t| t.tool_calls.iter().any(|c| c.id == id))
            .map_or_else(|| assistant_messages(&request), |j| j + 1),
        _ => assistant_messages(&request),
    };
    let attempt = shared.count(&conversation.name, turn_index);
    let Some(turn) = conversation.turns.get(turn_index) else {
        let message = format!(
            "script: conversation {} has {} turns; this request is turn {turn_index}",
            conversation.name,
            conversation.turns.len()
        );
        return error_response(provider, StatusCode::BAD_REQUEST, None, &message);
    };
    if turn.delay_ms > 0 {
        tokio::time::sleep(Duration::from_millis(turn.delay_ms)).await;
    }
    if let Some(failure) = turn.fail_first.get(attempt) {
        // Script::check let only 400..=599 through.
        let status =
            StatusCode::from_u16(failure.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let message = if failure.message.is_empty() {
            format!(
                "script: scripted failure {} of {} for conversation {} turn {turn_index}",
                attempt + 1,
                turn.fail_first.len(),
                conversation.name
            )
        } else {
            failure.message.clone()
        };
        return error_response(provider, status, failure.retry_after_secs, &message);
    }
    let answer = Answer {
        number: shared.next_answer(),
        created: unix_now(),
        model: request
            .get("model")
            .and_then(Value::as_str)
            .unwrap_or("scripted")
            .to_owned(),
        turn,
        input_tokens: input_tokens(&request),
        output_tokens: output_tokens(turn),
    };
    let stream = request.get("stream").and_then(Value::as_bool) == Some(true);
    match (provider, stream) {
        (Provider::OpenAi, false) => json_response(StatusCode::OK, &openai_completion(&answer)),
        (Provider::OpenAi, true) => {
            let include_usage = request
                .pointer("/stream_options/include_usage")
                .and_then(Value::as_bool)
                == Some(true);
            sse_response(openai_chunks(&answer, include_usage))
        }
        (Provider::Anthropic, false) => match anthropic_message(&answer) {
            Ok(message) => json_response(StatusCode::OK, &message),
            Err(why) => error_response(provider, StatusCode::INTERNAL_SERVER_ERROR, None, &why),
        },
        (Provider::Anthropic, true) => sse_response(anthropic_events(&answer)),
    }
}

/// The text of the first user message: a string content, or its text
/// parts (OpenAI `{type:text,text}`, Anthropic text blocks) joined by
/// newlines. Empty when there is none.
fn first_user_text(request: &Value) -> String {
    let Some(messages) = request.get("messages").and_then(Value::as_array) else {
        return String::new();
    };
    let Some(first) = messages
        .iter()
        .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))
    else {
        return String::new();
    };
    match first.get("content") {
        Some(Value::String(text)) => text.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter(|part| part.get("type").and_then(Value::as_str) == Some("text"))
            .filter_map(|part| part.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

/// The id of the last tool call of the request's last assistant message
/// (OpenAI `tool_calls[].id`, Anthropic `tool_use` blocks' `id`).
fn last_call_id(request: &Value) -> Option<String> {
    let messages = request.get("messages")?.as_array()?;
    let last = messages
        .iter()
        .rev()
        .find(|m| m.get("role").and_then(Value::as_str) == Some("assistant"))?;
    let openai = last
        .get("tool_calls")
        .and_then(Value::as_array)
        .and_then(|calls| calls.last())
        .and_then(|c| c.get("id"));
    let anthropic = last
        .get("content")
        .and_then(Value::as_array)
        .and_then(|blocks| {
            blocks
                .iter()
                .rev()
                .find(|b| b.get("type").and_then(Value::as_str) == Some("tool_use"))
        })
        .and_then(|b| b.get("id"));
    openai
        .or(anthropic)
        .and_then(Value::as_str)
        .map(str::to_owned)
}

/// The turn a request asks for: how many assistant messages it holds.
fn assistant_messages(request: &Value) -> usize {
    request
        .get("messages")
        .and_then(Value::as_array)
        .map_or(0, |messages| {
            messages
                .iter()
                .filter(|m| m.get("role").and_then(Value::as_str) == Some("assistant"))
                .count()
        })
}

/// A quarter of `bytes`, rounded up, at least 1: the script's token count.
fn tokens(bytes: usize) -> u64 {
    (bytes as u64).div_ceil(4).max(1)
}

/// Input tokens: from the bytes of the request's `messages` JSON and its
/// `system` (Anthropic; its text, or its JSON when it is blocks).
fn input_tokens(request: &Value) -> u64 {
    let messages = request
        .get("messages")
        .map_or(0, |messages| messages.to_string().len());
    let system = match request.get("system") {
        Some(Value::String(text)) => text.len(),
        Some(Value::Null) | None => 0,
        Some(other) => other.to_string().len(),
    };
    tokens(messages + system)
}

/// Output tokens: from the bytes of the answer's text and arguments.
fn output_tokens(turn: &Turn) -> u64 {
    let arguments: usize = turn
        .tool_calls
        .iter()
        .map(|call| arguments_text(call).len())
        .sum();
    tokens(turn.text.len() + arguments)
}

/// A call's arguments as an object (`{}` when the script gives none).
fn arguments_value(call: &ScriptedCall) -> Value {
    if call.arguments.is_null() {
        Value::Object(Map::new())
    } else {
        call.arguments.clone()
    }
}

/// A call's arguments as sent in a string: the raw text if scripted, else
/// the arguments' JSON.
fn arguments_text(call: &ScriptedCall) -> String {
    match &call.raw_arguments {
        Some(raw) => raw.clone(),
        None => arguments_value(call).to_string(),
    }
}

/// Splits `text` into pieces of at most 8 characters, and into at least
/// two when it has two characters or more, so a client must join deltas.
fn fragments(text: &str) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    let size = chars.len().div_ceil(2).clamp(1, 8);
    chars
        .chunks(size)
        .map(|piece| piece.iter().collect::<String>())
        .collect()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs())
}

/// One answer being given.
struct Answer<'a> {
    number: u64,
    created: u64,
    model: String,
    turn: &'a Turn,
    input_tokens: u64,
    output_tokens: u64,
}

impl Answer<'_> {
    fn has_calls(&self) -> bool {
        !self.turn.tool_calls.is_empty()
    }
}

fn openai_usage(answer: &Answer) -> Value {
    json!({
        "prompt_tokens": answer.input_tokens,
        "completion_tokens": answer.output_tokens,
        "total_tokens": answer.input_tokens + answer.output_tokens,
    })
}

fn openai_finish_reason(answer: &Answer) -> &'static str {
    if answer.has_calls() {
        "tool_calls"
    } else {
        "stop"
    }
}

/// A non-streamed Chat Completions answer.
fn openai_completion(answer: &Answer) -> Value {
    let mut message = Map::new();
    message.insert("role".to_owned(), json!("assistant"));
    let content = if answer.turn.text.is_empty() {
        Value::Null
    } else {
        Value::String(answer.turn.text.clone())
    };
    message.insert("content".to_owned(), content);
    if answer.has_calls() {
        let calls = answer
            .turn
            .tool_calls
            .iter()
            .map(|call| {
                json!({
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.name, "arguments": arguments_text(call)},
                })
            })
            .collect();
        message.insert("tool_calls".to_owned(), Value::Array(calls));
    }
    json!({
        "id": format!("chatcmpl-script-{}", answer.number),
        "object": "chat.completion",
        "created": answer.created,
        "model": answer.model,
        "choices": [{
            "index": 0,
            "message": Value::Object(message),
            "finish_reason": openai_finish_reason(answer),
        }],
        "usage": openai_usage(answer),
    })
}

/// One `data:` frame of a streamed Chat Completions answer.
fn openai_chunk(answer: &Answer, choices: Value, usage: Option<Value>) -> String {
    let mut chunk = json!({
        "id": format!("chatcmpl-script-{}", answer.number),
        "object": "chat.completion.chunk",
        "created": answer.created,
        "model": answer.model,
        "choices": choices,
    });
    if let (Some(usage), Value::Object(fields)) = (usage, &mut chunk) {
        fields.insert("usage".to_owned(), usage);
    }
    format!("data: {chunk}\n\n")
}

/// The frames of a streamed Chat Completions answer, `data: [DONE]` last.
/// With `include_usage`, every chunk carries `usage` (null but in the last
/// one, which has no choices).
fn openai_chunks(answer: &Answer, include_usage: bool) -> Vec<String> {
    let usage_null = || include_usage.then_some(Value::Null);
    let choice = |delta: Value| json!([{"index": 0, "delta": delta, "finish_reason": null}]);
    let role = choice(json!({"role": "assistant"}));
    let mut frames = vec![openai_chunk(answer, role, usage_null())];
    for piece in fragments(&answer.turn.text) {
        let content = choice(json!({"content": piece}));
        frames.push(openai_chunk(answer, content, usage_null()));
    }
    for (index, call) in answer.turn.tool_calls.iter().enumerate() {
        let start = json!({"tool_calls": [{
            "index": index,
            "id": call.id,
            "type": "function",
            "function": {"name": call.name, "arguments": ""},
        }]});
        frames.push(openai_chunk(answer, choice(start), usage_null()));
        for piece in fragments(&arguments_text(call)) {
            let more = json!({"tool_calls": [{"index": index, "function": {"arguments": piece}}]});
            frames.push(openai_chunk(answer, choice(more), usage_null()));
        }
    }
    let finish = json!([{
        "index": 0,
        "delta": {},
        "finish_reason": openai_finish_reason(answer),
    }]);
    frames.push(openai_chunk(answer, finish, usage_null()));
    if include_usage {
        let usage = Some(openai_usage(answer));
        frames.push(openai_chunk(answer, json!([]), usage));
    }
    frames.push("data: [DONE]\n\n".to_owned());
    frames
}

fn anthropic_usage(input_tokens: u64, output_tokens: u64) -> Value {
    json!({
        "input_tokens": input_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "output_tokens": output_tokens,
    })
}

fn anthropic_stop_reason(answer: &Answer) -> &'static str {
    if answer.has_calls() {
        "tool_use"
    } else {
        "end_turn"
    }
}

/// A non-streamed Messages answer; an error message when a call has raw
/// arguments (`input` must be an object, so they can only be streamed).
fn anthropic_message(answer: &Answer) -> Result<Value, String> {
    let mut content = Vec::new();
    if !answer.turn.text.is_empty() {
        content.push(json!({"type": "text", "text": answer.turn.text}));
    }
    for call in &answer.turn.tool_calls {
        if call.raw_arguments.is_some() {
            return Err("raw arguments need streaming on /v1/messages".to_owned());
        }
        content.push(json!({
            "type": "tool_use",
            "id": call.id,
            "name": call.name,
            "input": arguments_value(call),
        }));
    }
    Ok(json!({
        "id": format!("msg_script_{}", answer.number),
        "type": "message",
        "role": "assistant",
        "model": answer.model,
        "content": content,
        "stop_reason": anthropic_stop_reason(answer),
        "stop_sequence": null,
        "usage": anthropic_usage(answer.input_tokens, answer.output_tokens),
    }))
}

/// One server-sent event of a streamed Messages answer.
fn anthropic_event(data: &Value) -> String {
    let kind = data.get("type").and_then(Value::as_str).unwrap_or("error");
    format!("event: {kind}\ndata: {data}\n\n")
}

/// The events of a streamed Messages answer, `message_stop` last.
fn anthropic_events(answer: &Answer) -> Vec<String> {
    let start = json!({
        "type": "message_start",
        "message": {
            "id": format!("msg_script_{}", answer.number),
            "type": "message",
            "role": "assistant",
            "model": answer.model,
            "content": [],
            "stop_reason": null,
            "stop_sequence": null,
            "usage": anthropic_usage(answer.input_tokens, 1),
        },
    });
    let mut events = vec![
        anthropic_event(&start),
        anthropic_event(&json!({"type": "ping"})),
    ];
    // Each block: its start, its content in pieces, its stop.
    let mut blocks = Vec::new();
    if !answer.turn.text.is_empty() {
        let pieces = fragments(&answer.turn.text)
            .into_iter()
            .map(|piece| json!({"type": "text_delta", "text": piece}))
            .collect::<Vec<_>>();
        blocks.push((json!({"type": "text", "text": ""}), pieces));
    }
    for call in &answer.turn.tool_calls {
        let block = json!({"type": "tool_use", "id": call.id, "name": call.name, "input": {}});
        let pieces = fragments(&arguments_text(call))
            .into_iter()
            .map(|piece| json!({"type": "input_json_delta", "partial_json": piece}))
            .collect::<Vec<_>>();
        blocks.push((block, pieces));
    }
    for (index, (block, pieces)) in blocks.into_iter().enumerate() {
        let start = json!({"type": "content_block_start", "index": index, "content_block": block});
        events.push(anthropic_event(&start));
        for piece in pieces {
            let delta = json!({"type": "content_block_delta", "index": index, "delta": piece});
            events.push(anthropic_event(&delta));
        }
        let stop = json!({"type": "content_block_stop", "index": index});
        events.push(anthropic_event(&stop));
    }
    let delta = json!({
        "type": "message_delta",
        "delta": {"stop_reason": anthropic_stop_reason(answer), "stop_sequence": null},
        "usage": {"output_tokens": answer.output_tokens},
    });
    events.push(anthropic_event(&delta));
    events.push(anthropic_event(&json!({"type": "message_stop"})));
    events
}

fn json_response(status: StatusCode, body: &Value) -> Response {
    let mut response = Response::new(Body::from(body.to_string()));
    *response.status_mut() = status;
    let json = HeaderValue::from_static("application/json");
    response.headers_mut().insert(header::CONTENT_TYPE, json);
    response
}

/// A `text/event-stream` answer sent frame by frame.
fn sse_response(frames: Vec<String>) -> Response {
    let stream = futures::stream::iter(frames.into_iter().map(Ok::<String, Infallible>));
    let mut response = Response::new(Body::from_stream(stream));
    let headers = response.headers_mut();
    let event_stream = HeaderValue::from_static("text/event-stream");
    headers.insert(header::CONTENT_TYPE, event_stream);
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// An error in the provider's format, with `Retry-After` when given.
fn error_response(
    provider: Provider,
    status: StatusCode,
    retry_after_secs: Option<u64>,
    message: &str,
) -> Response {
    let kind = provider.error_type(status);
    let body = match provider {
        Provider::OpenAi => json!({"error": {"message": message, "type": kind, "code": null}}),
        Provider::Anthropic => {
            json!({"type": "error", "error": {"type": kind, "message": message}})
        }
    };
    let mut response = json_response(status, &body);
    if let Some(secs) = retry_after_secs {
        let value = HeaderValue::from(secs);
        response.headers_mut().insert(header::RETRY_AFTER, value);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fragments_split_into_two_or_more_short_pieces_that_join_back() {
        for text in ["ab", "{}", "hello", "It is sunny today.", "é漢字🙂x"] {
            let pieces = fragments(text);
            assert!(pieces.len() >= 2, "{text:?} gave {pieces:?}");
            assert!(pieces.iter().all(|p| p.chars().count() <= 8), "{pieces:?}");
            assert_eq!(pieces.concat(), text);
        }
        assert_eq!(fragments("x"), vec!["x".to_owned()]);
        assert!(fragments("").is_empty());
    }

    #[test]
    fn first_user_text_reads_strings_and_text_parts() {
        let openai = json!({"messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [
                {"type": "text", "text": "hello"},
                {"type": "image_url", "image_url": {"url": "x"}},
                {"type": "text", "text": "world"},
            ]},
            {"role": "user", "content": "later"},
        ]});
        assert_eq!(first_user_text(&openai), "hello\nworld");
        let anthropic = json!({"messages": [{"role": "user", "content": "plain"}]});
        assert_eq!(first_user_text(&anthropic), "plain");
        assert_eq!(first_user_text(&json!({})), "");
    }

    #[test]
    fn tokens_are_a_quarter_of_bytes_rounded_up_and_at_least_one() {
        assert_eq!(tokens(0), 1);
        assert_eq!(tokens(1), 1);
        assert_eq!(tokens(4), 1);
        assert_eq!(tokens(5), 2);
        let request = json!({"system": "abcd", "messages": []});
        // "[]" is 2 bytes, the system text 4: 6 bytes, 2 tokens.
        assert_eq!(input_tokens(&request), 2);
    }

    #[test]
    fn check_refuses_non_error_statuses_and_duplicate_names() {
        let turn = Turn {
            fail_first: vec![Failure {
                status: 200,
                ..Failure::default()
            }],
            ..Turn::default()
        };
        let script = Script {
            conversations: vec![Conversation {
                name: "a".to_owned(),
                first_user_contains: "x".to_owned(),
                turn_by_last_call: false,
                turns: vec![turn],
            }],
            api_key: None,
        };
        let why = script.check().expect_err("status 200 is no failure");
        assert!(why.contains("200"), "{why}");
        let twice = Script {
            conversations: vec![Conversation::default(), Conversation::default()],
            api_key: None,
        };
        assert!(twice.check().is_err());
    }
}
