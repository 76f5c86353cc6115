//! The providers against the scripted model server over real HTTP (both
//! wire formats), and their stream assembly, usage mapping and error
//! handling on hand-written wire text.

use std::time::{Duration, Instant};

use bridle_scripted_model::{Conversation, Failure, Script, ScriptedCall, Server, Turn};
use reqwest::header::{HeaderMap, HeaderValue, RETRY_AFTER};
use serde_json::{json, Value};

use super::*;
use super::{anthropic, openai};
use crate::config::{ApiKey, ModelConfig, ProviderKind};

const OPENAI: ProviderKind = ProviderKind::OpenAi;
const ANTHROPIC: ProviderKind = ProviderKind::Anthropic;
const SYSTEM: &str = "You are a scripted test.";

fn model_config(kind: ProviderKind, base_url: String) -> ModelConfig {
    ModelConfig {
        name: "scripted".into(),
        provider: kind,
        base_url,
        model: "scripted-1".into(),
        api_key_env: None,
        api_key_file: None,
        context_window: 100_000,
        max_output_tokens: 1_000,
        price_input_per_mtok: None,
        price_output_per_mtok: None,
        request_timeout_secs: 60,
        max_retries: 3,
        // Backoff of milliseconds: a test that waits longer waits on a
        // Retry-After.
        retry_min_delay_ms: 10,
        api_key: None,
    }
}

/// The base URL each format takes: OpenAI's includes the version path.
fn base_url(kind: ProviderKind, server: &Server) -> String {
    match kind {
        ProviderKind::OpenAi => format!("{}/v1", server.base_url()),
        ProviderKind::Anthropic => server.base_url(),
    }
}

fn connect(kind: ProviderKind, server: &Server) -> Provider {
    Provider::new(&model_config(kind, base_url(kind, server))).unwrap()
}

fn conversation(name: &str, first_user_contains: &str, turns: Vec<Turn>) -> Conversation {
    Conversation {
        name: name.into(),
        first_user_contains: first_user_contains.into(),
        turn_by_last_call: false,
        turns,
    }
}

async fn serve(conversations: Vec<Conversation>) -> Server {
    Server::start(Script {
        conversations,
        api_key: None,
    })
    .await
    .unwrap()
}

fn text_turn(text: &str) -> Turn {
    Turn {
        text: text.into(),
        ..Turn::default()
    }
}

fn ask(user: &str) -> ModelRequest {
    ModelRequest {
        system: SYSTEM.into(),
        messages: vec![Message::User(user.into())],
        tools: Vec::new(),
        max_tokens: 500,
    }
}

fn read_file_schema() -> Value {
    json!({
        "type": "object",
        "properties": { "path": { "type": "string" } },
        "required": ["path"]
    })
}

fn list_dir_schema() -> Value {
    json!({
        "type": "object",
        "properties": { "path": { "type": "string" }, "depth": { "type": "integer" } }
    })
}

fn tools() -> Vec<ToolSpec> {
    vec![
        ToolSpec {
            name: "read_file".into(),
            description: "Reads a file of the workspace.".into(),
            parameters: read_file_schema(),
        },
        ToolSpec {
            name: "list_dir".into(),
            description: "Lists a directory.".into(),
            parameters: list_dir_schema(),
        },
    ]
}

/// Calls the model, keeping the text deltas in the order they came.
async fn call(
    provider: &Provider,
    req: &ModelRequest,
) -> (Result<ModelResponse, ProviderError>, Vec<String>) {
    let mut deltas = Vec::new();
    let result = provider
        .call(req, &mut |delta: &str| deltas.push(delta.to_string()))
        .await;
    (result, deltas)
}

// ------------------------------------------------------------ over HTTP

async fn streams_a_text_answer(kind: ProviderKind) {
    let text = "Forty-two, as the script says, streamed to whoever watches.";
    let server = serve(vec![conversation(
        "text",
        "meaning of life",
        vec![text_turn(text)],
    )])
    .await;
    let (result, deltas) = call(&connect(kind, &server), &ask("The meaning of life?")).await;
    let response = result.unwrap();
    assert_eq!(response.text, text);
    assert!(!deltas.is_empty(), "the text went to on_text");
    assert!(deltas.iter().all(|delta| !delta.is_empty()), "{deltas:?}");
    assert_eq!(deltas.concat(), text, "the deltas, in order, are the text");
    assert_eq!(response.stop, StopReason::EndTurn);
    assert!(response.tool_calls.is_empty());
    assert!(
        response.usage.input_tokens > 0 && response.usage.output_tokens > 0,
        "{:?}",
        response.usage
    );
    assert_eq!(server.requests("text"), vec![1]);
    let received = server.received();
    assert_eq!(received.len(), 1);
    let (path, body) = &received[0];
    let expected_path = match kind {
        ProviderKind::OpenAi => "/v1/chat/completions",
        ProviderKind::Anthropic => "/v1/messages",
    };
    assert_eq!(path, expected_path);
    assert_eq!(body["model"], "scripted-1");
    assert_eq!(body["stream"], true);
    assert_eq!(body["max_tokens"], json!(500));
}

#[tokio::test]
async fn openai_streams_a_text_answer() {
    streams_a_text_answer(OPENAI).await;
}

#[tokio::test]
async fn anthropic_streams_a_text_answer() {
    streams_a_text_answer(ANTHROPIC).await;
}

/// Turn 0 asks for two tools at once; turn 1 answers once both results are
/// back. Returns the two request bodies the server received.
async fn two_tool_calls_and_their_results(kind: ProviderKind) -> Vec<Value> {
    let calls = vec![
        ScriptedCall {
            id: "call_a".into(),
            name: "read_file".into(),
            arguments: json!({ "path": "a.txt" }),
            ..ScriptedCall::default()
        },
        ScriptedCall {
            id: "call_b".into(),
            name: "list_dir".into(),
            arguments: json!({ "path": "src", "depth": 2 }),
            ..ScriptedCall::default()
        },
    ];
    let server = serve(vec![conversation(
        "tools",
        "look around",
        vec![
            Turn {
                text: "Let me look.".into(),
                tool_calls: calls,
                ..Turn::default()
            },
            text_turn("Both seen."),
        ],
    )])
    .await;
    let provider = connect(kind, &server);
    let mut req = ask("Please look around the workspace.");
    req.tools = tools();
    let (result, deltas) = call(&provider, &req).await;
    let first = result.unwrap();
    assert_eq!(first.stop, StopReason::ToolUse);
    assert_eq!(first.text, "Let me look.");
    assert_eq!(deltas.concat(), "Let me look.");
    assert_eq!(
        first.tool_calls,
        vec![
            ToolCall {
                id: "call_a".into(),
                name: "read_file".into(),
                arguments: Arguments::Json(json!({ "path": "a.txt" })),
            },
            ToolCall {
                id: "call_b".into(),
                name: "list_dir".into(),
                arguments: Arguments::Json(json!({ "path": "src", "depth": 2 })),
            },
        ]
    );

    req.messages.push(Message::Assistant {
        text: first.text.clone(),
        tool_calls: first.tool_calls.clone(),
    });
    req.messages.push(Message::ToolResults(vec![
        ToolResult {
            call_id: "call_a".into(),
            content: "hello from a.txt".into(),
            is_error: false,
        },
        ToolResult {
            call_id: "call_b".into(),
            content: "no such directory: src".into(),
            is_error: true,
        },
    ]));
    let (result, _) = call(&provider, &req).await;
    let second = result.unwrap();
    assert_eq!(second.text, "Both seen.");
    assert_eq!(second.stop, StopReason::EndTurn);
    assert_eq!(server.requests("tools"), vec![1, 1]);
    server
        .received()
        .into_iter()
        .map(|(_, body)| body)
        .collect()
}

#[tokio::test]
async fn openai_assembles_two_tool_calls_and_sends_each_result_as_a_tool_message() {
    let bodies = two_tool_calls_and_their_results(OPENAI).await;
    assert_eq!(bodies.len(), 2);
    let first = &bodies[0];
    assert_eq!(first["stream_options"], json!({ "include_usage": true }));
    let read_schema = read_file_schema();
    let list_schema = list_dir_schema();
    assert_eq!(
        first["tools"],
        json!([
            {
                "type": "function",
                "function": {
                    "name": "read_file",
                    "description": "Reads a file of the workspace.",
                    "parameters": read_schema
                }
            },
            {
                "type": "function",
                "function": {
                    "name": "list_dir",
                    "description": "Lists a directory.",
                    "parameters": list_schema
                }
            }
        ])
    );
    let messages = bodies[1]["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 5, "{messages:#?}");
    assert_eq!(messages[0], json!({ "role": "system", "content": SYSTEM }));
    assert_eq!(
        messages[1],
        json!({ "role": "user", "content": "Please look around the workspace." })
    );
    assert_eq!(messages[2]["role"], "assistant");
    assert_eq!(messages[2]["content"], "Let me look.");
    let calls = messages[2]["tool_calls"].as_array().unwrap();
    assert_eq!(calls.len(), 2, "{calls:#?}");
    for (call, (id, name, arguments)) in calls.iter().zip([
        ("call_a", "read_file", json!({ "path": "a.txt" })),
        ("call_b", "list_dir", json!({ "path": "src", "depth": 2 })),
    ]) {
        assert_eq!(call["id"], id);
        assert_eq!(call["type"], "function");
        assert_eq!(call["function"]["name"], name);
        let text = call["function"]["arguments"].as_str().unwrap();
        assert_eq!(
            serde_json::from_str::<Value>(text).unwrap(),
            arguments,
            "arguments go back as a JSON string"
        );
    }
    assert_eq!(
        messages[3],
        json!({ "role": "tool", "tool_call_id": "call_a", "content": "hello from a.txt" })
    );
    assert_eq!(
        messages[4],
        json!({ "role": "tool", "tool_call_id": "call_b", "content": "no such directory: src" })
    );
}

#[tokio::test]
async fn anthropic_assembles_two_tool_calls_and_sends_all_results_in_one_user_message() {
    let bodies = two_tool_calls_and_their_results(ANTHROPIC).await;
    assert_eq!(bodies.len(), 2);
    let first = &bodies[0];
    assert_eq!(first["system"], SYSTEM, "the system prompt is top-level");
    let read_schema = read_file_schema();
    let list_schema = list_dir_schema();
    assert_eq!(
        first["tools"],
        json!([
            {
                "name": "read_file",
                "description": "Reads a file of the workspace.",
                "input_schema": read_schema
            },
            {
                "name": "list_dir",
                "description": "Lists a directory.",
                "input_schema": list_schema
            }
        ])
    );
    let messages = bodies[1]["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 3, "{messages:#?}");
    assert!(
        messages.iter().all(|m| m["role"] != "system"),
        "no system message: {messages:#?}"
    );
    assert_eq!(
        messages[0],
        json!({ "role": "user", "content": "Please look around the workspace." })
    );
    assert_eq!(
        messages[1],
        json!({
            "role": "assistant",
            "content": [
                { "type": "text", "text": "Let me look." },
                { "type": "tool_use", "id": "call_a", "name": "read_file",
                  "input": { "path": "a.txt" } },
                { "type": "tool_use", "id": "call_b", "name": "list_dir",
                  "input": { "path": "src", "depth": 2 } }
            ]
        })
    );
    assert_eq!(
        messages[2],
        json!({
            "role": "user",
            "content": [
                { "type": "tool_result", "tool_use_id": "call_a", "content": "hello from a.txt" },
                { "type": "tool_result", "tool_use_id": "call_b",
                  "content": "no such directory: src", "is_error": true }
            ]
        })
    );
}

async fn malformed_arguments_are_kept_for_the_model(kind: ProviderKind) {
    let server = serve(vec![conversation(
        "bad",
        "malformed",
        vec![Turn {
            tool_calls: vec![ScriptedCall {
                id: "call_m".into(),
                name: "read_file".into(),
                raw_arguments: Some("{not json".into()),
                ..ScriptedCall::default()
            }],
            ..Turn::default()
        }],
    )])
    .await;
    let mut req = ask("Send malformed arguments.");
    req.tools = tools();
    let (result, _) = call(&connect(kind, &server), &req).await;
    let response = result.unwrap();
    assert_eq!(response.stop, StopReason::ToolUse);
    assert_eq!(response.tool_calls.len(), 1, "{:?}", response.tool_calls);
    let tool_call = &response.tool_calls[0];
    assert_eq!(tool_call.id, "call_m");
    assert_eq!(tool_call.name, "read_file");
    match &tool_call.arguments {
        Arguments::Malformed { raw, error } => {
            assert_eq!(raw, "{not json");
            assert!(!error.is_empty());
        }
        other => panic!("expected malformed arguments, got {other:?}"),
    }
    assert_eq!(server.requests("bad"), vec![1], "not an error, not retried");
}

#[tokio::test]
async fn openai_malformed_arguments_are_kept_not_fatal() {
    malformed_arguments_are_kept_for_the_model(OPENAI).await;
}

#[tokio::test]
async fn anthropic_malformed_input_is_kept_not_fatal() {
    malformed_arguments_are_kept_for_the_model(ANTHROPIC).await;
}

fn failing_first(failures: Vec<Failure>, text: &str) -> Turn {
    Turn {
        fail_first: failures,
        text: text.into(),
        ..Turn::default()
    }
}

fn failure(status: u16, retry_after_secs: Option<u64>, message: &str) -> Failure {
    Failure {
        status,
        retry_after_secs,
        message: message.into(),
    }
}

async fn a_429_waits_its_retry_after_then_succeeds(kind: ProviderKind) {
    let turn = failing_first(vec![failure(429, Some(1), "slow down")], "made it");
    let server = serve(vec![conversation("busy", "busy", vec![turn])]).await;
    let started = Instant::now();
    let (result, deltas) = call(&connect(kind, &server), &ask("Are you busy?")).await;
    let response = result.unwrap();
    assert_eq!(response.text, "made it");
    assert_eq!(deltas.concat(), "made it", "a failed try streamed nothing");
    assert_eq!(server.requests("busy"), vec![2]);
    // The backoff is 10-20 ms: only the Retry-After explains a second.
    assert!(
        started.elapsed() >= Duration::from_millis(950),
        "the retry came after {:?}, before its Retry-After of 1 s",
        started.elapsed()
    );
}

#[tokio::test]
async fn openai_a_429_waits_its_retry_after_then_succeeds() {
    a_429_waits_its_retry_after_then_succeeds(OPENAI).await;
}

#[tokio::test]
async fn anthropic_a_429_waits_its_retry_after_then_succeeds() {
    a_429_waits_its_retry_after_then_succeeds(ANTHROPIC).await;
}

async fn a_500_is_tried_again(kind: ProviderKind) {
    let turn = failing_first(
        vec![failure(500, None, "scripted fault")],
        "second time lucky",
    );
    let server = serve(vec![conversation("flaky", "flaky", vec![turn])]).await;
    let (result, _) = call(&connect(kind, &server), &ask("Are you flaky?")).await;
    assert_eq!(result.unwrap().text, "second time lucky");
    assert_eq!(server.requests("flaky"), vec![2]);
}

#[tokio::test]
async fn openai_a_500_is_tried_again() {
    a_500_is_tried_again(OPENAI).await;
}

#[tokio::test]
async fn anthropic_a_500_is_tried_again() {
    a_500_is_tried_again(ANTHROPIC).await;
}

async fn a_400_ends_at_once_with_the_providers_message(kind: ProviderKind) {
    let turn = failing_first(
        vec![failure(400, None, "the scripted request is refused")],
        "never seen",
    );
    let server = serve(vec![conversation("refused", "refuse", vec![turn])]).await;
    let (result, deltas) = call(&connect(kind, &server), &ask("Please refuse this.")).await;
    let error = result.unwrap_err();
    assert!(
        matches!(error, ProviderError::Status { status: 400, .. }),
        "{error:?}"
    );
    assert!(!error.is_retryable());
    assert!(
        error
            .to_string()
            .contains("the scripted request is refused"),
        "{error}"
    );
    assert!(deltas.is_empty());
    assert_eq!(
        server.requests("refused"),
        vec![1],
        "a 400 is not tried again"
    );
}

#[tokio::test]
async fn openai_a_400_ends_at_once_with_the_providers_message() {
    a_400_ends_at_once_with_the_providers_message(OPENAI).await;
}

#[tokio::test]
async fn anthropic_a_400_ends_at_once_with_the_providers_message() {
    a_400_ends_at_once_with_the_providers_message(ANTHROPIC).await;
}

async fn retries_stop_at_max_retries(kind: ProviderKind) {
    let failures: Vec<Failure> = (0..5).map(|_| failure(503, None, "still down")).collect();
    let server = serve(vec![conversation(
        "down",
        "down",
        vec![failing_first(failures, "too late")],
    )])
    .await;
    let mut config = model_config(kind, base_url(kind, &server));
    config.max_retries = 2;
    let (result, _) = call(&Provider::new(&config).unwrap(), &ask("Are you down?")).await;
    let error = result.unwrap_err();
    match &error {
        ProviderError::Exhausted { tries, last } => {
            assert_eq!(*tries, 3);
            assert!(
                matches!(**last, ProviderError::Status { status: 503, .. }),
                "{last:?}"
            );
        }
        other => panic!("expected the retries to be used up, got {other:?}"),
    }
    assert!(error.to_string().contains("still down"), "{error}");
    assert_eq!(server.requests("down"), vec![3], "one try and two retries");
}

#[tokio::test]
async fn openai_retries_stop_at_max_retries() {
    retries_stop_at_max_retries(OPENAI).await;
}

#[tokio::test]
async fn anthropic_retries_stop_at_max_retries() {
    retries_stop_at_max_retries(ANTHROPIC).await;
}

async fn the_key_is_sent_and_a_refused_one_is_never_shown(kind: ProviderKind) {
    const RIGHT: &str = "sk-right-key-7301";
    const WRONG: &str = "sk-wrong-key-0666";
    let server = Server::start(Script {
        conversations: vec![conversation(
            "key",
            "check the key",
            vec![text_turn("authorized")],
        )],
        api_key: Some(RIGHT.into()),
    })
    .await
    .unwrap();
    let mut config = model_config(kind, base_url(kind, &server));
    config.api_key_env = Some("SCRIPTED_MODEL_KEY".into());
    config.api_key = Some(ApiKey::new(RIGHT.into()));
    let provider = Provider::new(&config).unwrap();
    let shown = format!("{provider:?}");
    assert!(!shown.contains(RIGHT), "{shown}");
    let (result, _) = call(&provider, &ask("Please check the key.")).await;
    assert_eq!(result.unwrap().text, "authorized", "the right key is sent");

    for key in [Some(WRONG), None] {
        config.api_key = key.map(|key| ApiKey::new(key.into()));
        if key.is_none() {
            config.api_key_env = None;
        }
        let provider = Provider::new(&config).unwrap();
        let (result, _) = call(&provider, &ask("Please check the key.")).await;
        let error = result.unwrap_err();
        assert!(
            matches!(error, ProviderError::KeyRefused { status: 401, .. }),
            "{key:?}: {error:?}"
        );
        assert!(!error.is_retryable());
        for shown in [error.to_string(), format!("{error:?}")] {
            assert!(!shown.contains(WRONG) && !shown.contains(RIGHT), "{shown}");
        }
        let source = if key.is_some() {
            "SCRIPTED_MODEL_KEY"
        } else {
            "no key configured"
        };
        assert!(
            error.to_string().contains(source),
            "says where the key comes from: {error}"
        );
    }
}

#[tokio::test]
async fn openai_the_key_is_sent_and_a_refused_one_is_never_shown() {
    the_key_is_sent_and_a_refused_one_is_never_shown(OPENAI).await;
}

#[tokio::test]
async fn anthropic_the_key_is_sent_and_a_refused_one_is_never_shown() {
    the_key_is_sent_and_a_refused_one_is_never_shown(ANTHROPIC).await;
}

// ----------------------------------------------------- hand-written wire

/// Feeds events' data to an answer as `read_stream` does.
fn assemble<A: Assemble>(
    mut answer: A,
    events: &[String],
) -> (Result<ModelResponse, ProviderError>, Vec<String>) {
    let mut deltas = Vec::new();
    let mut on_text = |delta: &str| deltas.push(delta.to_string());
    for data in events {
        match answer.push(data, &mut on_text) {
            Ok(true) => break,
            Ok(false) => {}
            Err(e) => return (Err(e), deltas),
        }
    }
    (answer.finish(), deltas)
}

fn openai_chunk(delta: Value) -> String {
    json!({
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "model": "gpt-test",
        "choices": [{ "index": 0, "delta": delta, "finish_reason": null }],
        "usage": null
    })
    .to_string()
}

fn openai_end(finish_reason: &str) -> Vec<String> {
    vec![
        json!({
            "id": "chatcmpl-1",
            "model": "gpt-test",
            "choices": [{ "index": 0, "delta": {}, "finish_reason": finish_reason }]
        })
        .to_string(),
        json!({
            "id": "chatcmpl-1",
            "model": "gpt-test",
            "choices": [],
            "usage": { "prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15 }
        })
        .to_string(),
        "[DONE]".to_string(),
    ]
}

#[test]
fn openai_parallel_calls_sharing_index_0_are_told_apart_by_id() {
    let mut events = vec![
        openai_chunk(json!({ "role": "assistant", "content": "Two " })),
        openai_chunk(json!({ "content": "calls." })),
        openai_chunk(
            json!({ "tool_calls": [{ "index": 0, "id": "call_1", "type": "function",
            "function": { "name": "read_file", "arguments": "{\"path\":" } }] }),
        ),
        openai_chunk(json!({ "tool_calls": [{ "index": 0,
            "function": { "arguments": "\"a.txt\"}" } }] })),
        openai_chunk(
            json!({ "tool_calls": [{ "index": 0, "id": "call_2", "type": "function",
            "function": { "name": "list_dir", "arguments": "" } }] }),
        ),
    ];
    events.extend(openai_end("tool_calls"));
    let (result, deltas) = assemble(openai::Answer::new(MAX_ANSWER_BYTES), &events);
    let response = result.unwrap();
    assert_eq!(deltas, vec!["Two ", "calls."]);
    assert_eq!(response.text, "Two calls.");
    assert_eq!(
        (response.id.as_str(), response.model.as_str()),
        ("chatcmpl-1", "gpt-test")
    );
    assert_eq!(response.stop, StopReason::ToolUse);
    assert_eq!(
        response.tool_calls,
        vec![
            ToolCall {
                id: "call_1".into(),
                name: "read_file".into(),
                arguments: Arguments::Json(json!({ "path": "a.txt" })),
            },
            ToolCall {
                id: "call_2".into(),
                name: "list_dir".into(),
                arguments: Arguments::Json(json!({})),
            },
        ]
    );
    assert_eq!(
        response.usage,
        Usage {
            input_tokens: 10,
            output_tokens: 5,
            ..Usage::default()
        }
    );
}

#[test]
fn openai_interleaved_calls_are_assembled_by_index() {
    let mut events = vec![
        openai_chunk(json!({ "tool_calls": [
            { "index": 0, "id": "call_x", "function": { "name": "read_file", "arguments": "" } },
            { "index": 1, "id": "call_y",
              "function": { "name": "read_file", "arguments": "{\"pa" } }
        ] })),
        openai_chunk(json!({ "tool_calls": [
            { "index": 0, "function": { "arguments": "{\"path\"" } }
        ] })),
        openai_chunk(json!({ "tool_calls": [
            { "index": 1, "function": { "arguments": "th\": \"y\"}" } }
        ] })),
        openai_chunk(json!({ "tool_calls": [
            { "index": 0, "function": { "arguments": ": \"x\"}" } }
        ] })),
    ];
    // Some servers end tool calls with "stop".
    events.extend(openai_end("stop"));
    let (result, deltas) = assemble(openai::Answer::new(MAX_ANSWER_BYTES), &events);
    let response = result.unwrap();
    assert!(deltas.is_empty());
    assert_eq!(response.stop, StopReason::ToolUse);
    let calls: Vec<(&str, &Arguments)> = response
        .tool_calls
        .iter()
        .map(|call| (call.id.as_str(), &call.arguments))
        .collect();
    assert_eq!(
        calls,
        vec![
            ("call_x", &Arguments::Json(json!({ "path": "x" }))),
            ("call_y", &Arguments::Json(json!({ "path": "y" }))),
        ]
    );
}

#[test]
fn openai_finish_reasons_map_to_stop_reasons() {
    for (reason, stop) in [
        ("stop", StopReason::EndTurn),
        ("length", StopReason::MaxTokens),
        ("content_filter", StopReason::Refusal),
        ("something_new", StopReason::Other("something_new".into())),
    ] {
        let mut events = vec![openai_chunk(json!({ "content": "Hi." }))];
        events.extend(openai_end(reason));
        let (result, _) = assemble(openai::Answer::new(MAX_ANSWER_BYTES), &events);
        assert_eq!(result.unwrap().stop, stop, "{reason}");
    }
}

#[test]
fn openai_errors_in_the_stream_end_the_answer() {
    let events = vec![
        openai_chunk(json!({ "content": "Half" })),
        json!({ "error": { "message": "The server had an error", "type": "server_error" } })
            .to_string(),
    ];
    let (result, deltas) = assemble(openai::Answer::new(MAX_ANSWER_BYTES), &events);
    let error = result.unwrap_err();
    assert!(error.is_retryable(), "{error:?}");
    assert!(
        error.to_string().contains("The server had an error"),
        "{error}"
    );
    assert_eq!(deltas, vec!["Half"]);
    let events = vec!["{\"choices\": not json".to_string()];
    let (result, _) = assemble(openai::Answer::new(MAX_ANSWER_BYTES), &events);
    let error = result.unwrap_err();
    assert!(matches!(error, ProviderError::Protocol(_)), "{error:?}");
    assert!(!error.is_retryable());
}

fn anthropic_events(events: &[Value]) -> Vec<String> {
    events.iter().map(ToString::to_string).collect()
}

#[test]
fn anthropic_blocks_are_assembled_by_index() {
    let events = anthropic_events(&[
        json!({ "type": "message_start", "message": {
            "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-test",
            "content": [], "stop_reason": null,
            "usage": { "input_tokens": 7, "cache_creation_input_tokens": 100,
                       "cache_read_input_tokens": 2000, "output_tokens": 1 } } }),
        json!({ "type": "content_block_start", "index": 0,
                "content_block": { "type": "text", "text": "" } }),
        json!({ "type": "ping" }),
        json!({ "type": "content_block_delta", "index": 0,
                "delta": { "type": "text_delta", "text": "Reading " } }),
        json!({ "type": "content_block_delta", "index": 0,
                "delta": { "type": "text_delta", "text": "two." } }),
        json!({ "type": "content_block_stop", "index": 0 }),
        json!({ "type": "content_block_start", "index": 1, "content_block": {
            "type": "tool_use", "id": "toolu_1", "name": "read_file", "input": {} } }),
        json!({ "type": "content_block_delta", "index": 1,
                "delta": { "type": "input_json_delta", "partial_json": "" } }),
        json!({ "type": "content_block_delta", "index": 1,
                "delta": { "type": "input_json_delta", "partial_json": "{\"path\": \"a" } }),
        json!({ "type": "content_block_delta", "index": 1,
                "delta": { "type": "input_json_delta", "partial_json": ".txt\"}" } }),
        json!({ "type": "content_block_stop", "index": 1 }),
        json!({ "type": "content_block_start", "index": 2, "content_block": {
            "type": "tool_use", "id": "toolu_2", "name": "list_dir", "input": {} } }),
        json!({ "type": "content_block_stop", "index": 2 }),
        json!({ "type": "message_delta",
                "delta": { "stop_reason": "tool_use", "stop_sequence": null },
                "usage": { "output_tokens": 42 } }),
        json!({ "type": "message_stop" }),
    ]);
    let (result, deltas) = assemble(anthropic::Answer::new(MAX_ANSWER_BYTES), &events);
    let response = result.unwrap();
    assert_eq!(deltas, vec!["Reading ", "two."]);
    assert_eq!(response.text, "Reading two.");
    assert_eq!(
        (response.id.as_str(), response.model.as_str()),
        ("msg_1", "claude-test")
    );
    assert_eq!(response.stop, StopReason::ToolUse);
    assert_eq!(
        response.tool_calls,
        vec![
            ToolCall {
                id: "toolu_1".into(),
                name: "read_file".into(),
                arguments: Arguments::Json(json!({ "path": "a.txt" })),
            },
            ToolCall {
                id: "toolu_2".into(),
                name: "list_dir".into(),
                arguments: Arguments::Json(json!({})),
            },
        ]
    );
    assert_eq!(
        response.usage,
        Usage {
            input_tokens: 2107,
            output_tokens: 42,
            cache_read_input_tokens: 2000,
            cache_creation_input_tokens: 100,
        },
        "input is the whole prompt; message_delta's output count stands"
    );
}

fn anthropic_text_answer(stop_reason: &str) -> Vec<String> {
    anthropic_events(&[
        json!({ "type": "message_start", "message": { "id": "msg_2", "model": "claude-test",
            "usage": { "input_tokens": 3, "output_tokens": 1 } } }),
        json!({ "type": "content_block_start", "index": 0,
                "content_block": { "type": "text", "text": "" } }),
        json!({ "type": "content_block_delta", "index": 0,
                "delta": { "type": "text_delta", "text": "Hi." } }),
        json!({ "type": "content_block_stop", "index": 0 }),
        json!({ "type": "message_delta", "delta": { "stop_reason": stop_reason },
                "usage": { "output_tokens": 2 } }),
        json!({ "type": "message_stop" }),
    ])
}

#[test]
fn anthropic_stop_reasons_map_to_stop_reasons() {
    for (reason, stop) in [
        ("end_turn", StopReason::EndTurn),
        ("max_tokens", StopReason::MaxTokens),
        ("refusal", StopReason::Refusal),
        (
            "model_context_window_exceeded",
            StopReason::ContextWindowExceeded,
        ),
        ("pause_turn", StopReason::Other("pause_turn".into())),
    ] {
        let (result, _) = assemble(
            anthropic::Answer::new(MAX_ANSWER_BYTES),
            &anthropic_text_answer(reason),
        );
        assert_eq!(result.unwrap().stop, stop, "{reason}");
    }
}

#[test]
fn anthropic_error_events_end_the_answer_retryable_when_transient() {
    for (kind, retryable) in [("overloaded_error", true), ("invalid_request_error", false)] {
        let mut events = anthropic_text_answer("end_turn");
        events.insert(
            2,
            json!({ "type": "error", "error": { "type": kind, "message": "scripted trouble" } })
                .to_string(),
        );
        let (result, _) = assemble(anthropic::Answer::new(MAX_ANSWER_BYTES), &events);
        let error = result.unwrap_err();
        assert_eq!(error.is_retryable(), retryable, "{kind}: {error:?}");
        assert!(error.to_string().contains("scripted trouble"), "{error}");
    }
}

#[test]
fn a_stream_that_stops_early_is_cut_and_worth_another_try() {
    let openai_events = vec![openai_chunk(json!({ "content": "Half an ans" }))];
    let (result, deltas) = assemble(openai::Answer::new(MAX_ANSWER_BYTES), &openai_events);
    let error = result.unwrap_err();
    assert!(matches!(error, ProviderError::StreamCut(_)), "{error:?}");
    assert!(error.is_retryable());
    assert_eq!(deltas, vec!["Half an ans"]);

    let mut cut = anthropic_text_answer("end_turn");
    cut.pop();
    let (result, _) = assemble(anthropic::Answer::new(MAX_ANSWER_BYTES), &cut);
    let error = result.unwrap_err();
    assert!(matches!(error, ProviderError::StreamCut(_)), "{error:?}");
    assert!(error.is_retryable());
}

#[test]
fn an_answer_past_its_bound_is_refused() {
    let events = vec![openai_chunk(json!({ "content": "seventeen bytes!!" }))];
    let (result, _) = assemble(openai::Answer::new(16), &events);
    let error = result.unwrap_err();
    assert!(
        matches!(error, ProviderError::TooLarge { limit: 16, .. }),
        "{error:?}"
    );
    assert!(!error.is_retryable());

    let events = vec![openai_chunk(
        json!({ "tool_calls": [{ "index": 0, "id": "c",
        "function": { "name": "f", "arguments": "{\"a\": \"0123456789\"}" } }] }),
    )];
    let (result, _) = assemble(openai::Answer::new(16), &events);
    assert!(matches!(result, Err(ProviderError::TooLarge { .. })));

    let events = anthropic_events(&[
        json!({ "type": "content_block_start", "index": 0, "content_block": {
            "type": "tool_use", "id": "t", "name": "f", "input": {} } }),
        json!({ "type": "content_block_delta", "index": 0,
                "delta": { "type": "input_json_delta",
                           "partial_json": "{\"a\": \"0123456789\"}" } }),
    ]);
    let (result, _) = assemble(anthropic::Answer::new(16), &events);
    assert!(matches!(result, Err(ProviderError::TooLarge { .. })));
}

#[test]
fn anthropic_input_tokens_are_the_sum_of_the_three_input_counts() {
    let wire: anthropic::WireUsage = serde_json::from_value(json!({
        "input_tokens": 12,
        "cache_creation_input_tokens": 300,
        "cache_read_input_tokens": 4000,
        "output_tokens": 56
    }))
    .unwrap();
    assert_eq!(
        anthropic::usage(&wire),
        Usage {
            input_tokens: 4312,
            output_tokens: 56,
            cache_read_input_tokens: 4000,
            cache_creation_input_tokens: 300,
        }
    );
    let wire: anthropic::WireUsage =
        serde_json::from_value(json!({ "input_tokens": 12, "output_tokens": 1 })).unwrap();
    assert_eq!(anthropic::usage(&wire).input_tokens, 12);
}

#[test]
fn openai_prompt_tokens_already_hold_the_cached_ones() {
    let wire: openai::WireUsage = serde_json::from_value(json!({
        "prompt_tokens": 1200,
        "completion_tokens": 30,
        "total_tokens": 1230,
        "prompt_tokens_details": { "cached_tokens": 1024, "audio_tokens": 0 },
        "completion_tokens_details": { "reasoning_tokens": 10 }
    }))
    .unwrap();
    assert_eq!(
        openai::usage(&wire),
        Usage {
            input_tokens: 1200,
            output_tokens: 30,
            cache_read_input_tokens: 1024,
            cache_creation_input_tokens: 0,
        }
    );
    let wire: openai::WireUsage = serde_json::from_value(json!({
        "prompt_tokens": 9,
        "completion_tokens": 2,
        "prompt_tokens_details": null
    }))
    .unwrap();
    assert_eq!(openai::usage(&wire).cache_read_input_tokens, 0);
}

#[test]
fn cost_follows_the_configured_prices() {
    let mut config = model_config(OPENAI, "http://127.0.0.1:9/v1".into());
    let usage = Usage {
        input_tokens: 2_000_000,
        output_tokens: 500_000,
        ..Usage::default()
    };
    assert_eq!(usage.cost_usd(&config), None, "no price: no cost");
    config.price_input_per_mtok = Some(3.0);
    config.price_output_per_mtok = Some(15.0);
    let cost = usage.cost_usd(&config).unwrap();
    assert!((cost - 13.5).abs() < 1e-9, "{cost}");
}

#[test]
fn error_bodies_give_the_providers_message() {
    let mut config = model_config(OPENAI, "http://127.0.0.1:9/v1".into());
    config.api_key_env = Some("OPENAI_API_KEY".into());
    config.api_key = Some(ApiKey::new("sk-secret-2468".into()));
    let answer =
        |status: u16, body: &str| error_from_status(status, None, Some(body.as_bytes()), &config);

    let e = answer(
        400,
        r#"{"error":{"message":"Invalid 'messages[1]'","type":"invalid_request_error"}}"#,
    );
    assert!(
        matches!(&e, ProviderError::Status { status: 400, message, .. }
        if message == "Invalid 'messages[1]'"),
        "{e:?}"
    );
    let e = answer(
        529,
        r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
    );
    assert!(
        matches!(&e, ProviderError::Status { status: 529, message, .. }
        if message == "Overloaded"),
        "{e:?}"
    );
    assert!(e.is_retryable());
    let e = answer(404, r#"{"detail":"Not Found"}"#);
    assert!(
        e.to_string().contains("Not Found") && !e.is_retryable(),
        "{e}"
    );
    let e = answer(404, r#"{"error":"model 'x' not found"}"#);
    assert!(e.to_string().contains("model 'x' not found"), "{e}");
    let e = answer(502, "upstream connect error");
    assert!(
        e.to_string().contains("upstream connect error") && e.is_retryable(),
        "{e}"
    );
    let e = answer(503, "");
    assert!(e.to_string().contains("no message"), "{e}");

    for body in [
        r#"{"error":{"message":"This model's context is 8192","code":"context_length_exceeded"}}"#,
        r#"{"type":"error","error":{"message":"prompt is too long: 210000 tokens > 200000"}}"#,
    ] {
        let e = answer(400, body);
        assert!(
            matches!(e, ProviderError::ContextWindowExceeded { .. }),
            "{e:?}"
        );
        assert!(!e.is_retryable());
    }

    // The key a provider quotes is not repeated; a 401 says where the key
    // comes from instead.
    let e = answer(
        401,
        r#"{"error":{"message":"Incorrect API key provided: sk-secret-2468"}}"#,
    );
    assert!(
        matches!(e, ProviderError::KeyRefused { status: 401, .. }),
        "{e:?}"
    );
    assert!(!e.to_string().contains("sk-secret-2468"), "{e}");
    assert!(e.to_string().contains("OPENAI_API_KEY"), "{e}");
    let e = answer(
        403,
        r#"{"error":{"message":"key sk-secret-2468 may not use this model"}}"#,
    );
    assert!(!format!("{e} {e:?}").contains("sk-secret-2468"), "{e}");
    assert!(e.to_string().contains("may not use this model"), "{e}");

    let e = error_from_status(500, Some(Duration::from_secs(2)), None, &config);
    assert!(e.to_string().contains("1024 KiB"), "{e}");
    assert_eq!(e.retry_after(), Some(Duration::from_secs(2)));
}

#[test]
fn retry_after_is_read_in_seconds_or_milliseconds_and_capped() {
    let mut headers = HeaderMap::new();
    assert_eq!(retry_after(&headers), None);
    headers.insert(RETRY_AFTER, HeaderValue::from_static("3"));
    assert_eq!(retry_after(&headers), Some(Duration::from_secs(3)));
    headers.insert(RETRY_AFTER, HeaderValue::from_static("3600"));
    assert_eq!(retry_after(&headers), Some(Duration::from_secs(60)));
    headers.insert(
        RETRY_AFTER,
        HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
    );
    assert_eq!(retry_after(&headers), None, "a date: the backoff applies");
    headers.insert("retry-after-ms", HeaderValue::from_static("250"));
    assert_eq!(retry_after(&headers), Some(Duration::from_millis(250)));
}

#[test]
fn statuses_worth_another_try() {
    for status in [408, 409, 429, 500, 502, 503, 504, 529] {
        assert!(is_retryable_status(status), "{status}");
    }
    for status in [400, 401, 403, 404, 413, 422] {
        assert!(!is_retryable_status(status), "{status}");
    }
}

#[test]
fn the_answer_limit_is_the_request_within_the_model() {
    assert_eq!(answer_tokens(0, 4096), 4096);
    assert_eq!(answer_tokens(500, 4096), 500);
    assert_eq!(answer_tokens(10_000, 4096), 4096);
}

#[test]
fn anthropic_user_content_after_tool_results_joins_their_message() {
    let req = ModelRequest {
        system: String::new(),
        messages: vec![
            Message::User("Go.".into()),
            Message::Assistant {
                text: String::new(),
                tool_calls: vec![ToolCall {
                    id: "t1".into(),
                    name: "f".into(),
                    arguments: Arguments::Malformed {
                        raw: "{oops".into(),
                        error: "expected a key".into(),
                    },
                }],
            },
            Message::ToolResults(vec![ToolResult {
                call_id: "t1".into(),
                content: "the arguments are not JSON".into(),
                is_error: true,
            }]),
            Message::User("Try again.".into()),
        ],
        tools: Vec::new(),
        max_tokens: 10,
    };
    let body = anthropic::request_body("m", &req, 10);
    assert!(body.get("system").is_none(), "no empty system prompt");
    assert!(body.get("tools").is_none());
    assert_eq!(
        body["messages"],
        json!([
            { "role": "user", "content": "Go." },
            { "role": "assistant", "content": [
                { "type": "tool_use", "id": "t1", "name": "f", "input": {} }
            ] },
            { "role": "user", "content": [
                { "type": "tool_result", "tool_use_id": "t1",
                  "content": "the arguments are not JSON", "is_error": true },
                { "type": "text", "text": "Try again." }
            ] }
        ])
    );
    // OpenAI sends the malformed arguments back as they came.
    let body = openai::request_body("m", &req, 10);
    assert_eq!(body["messages"][1]["content"], Value::Null);
    assert_eq!(
        body["messages"][1]["tool_calls"][0]["function"]["arguments"],
        "{oops"
    );
    assert!(body.get("tools").is_none());
    assert_eq!(
        body["messages"][0],
        json!({ "role": "user", "content": "Go." })
    );
}
