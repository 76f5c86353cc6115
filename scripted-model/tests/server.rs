//! The scripted server over real HTTP, spoken to with a plain HTTP client:
//! both wire formats, streamed and not, tool calls, scripted failures, the
//! API key, the requests it refuses, and what it counts and records.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::time::{Duration, Instant};

use bridle_scripted_model::{Script, Server, ANTHROPIC_PATH, OPENAI_PATH};
use serde_json::{json, Value};

const WEATHER_QUESTION: &str = "What is the weather in Paris?";
/// The arguments of the scripted call, as the server serializes them.
const WEATHER_ARGUMENTS: &str = r#"{"city":"Paris"}"#;
const RAW_ARGUMENTS: &str = r#"{"path": "a.txt", "#;

/// The script of these tests, written as a script file would be (so the
/// serde defaults are exercised too).
fn script() -> Script {
    serde_json::from_value(json!({
        "conversations": [
            {
                "name": "weather",
                "first_user_contains": "weather in Paris",
                "turns": [
                    {
                        "text": "Let me look.",
                        "tool_calls": [
                            {"id": "call_1", "name": "get_weather", "arguments": {"city": "Paris"}}
                        ]
                    },
                    {"text": "It is sunny in Paris."}
                ]
            },
            {
                "name": "flaky",
                "first_user_contains": "flaky",
                "turns": [{
                    "fail_first": [
                        {"status": 429, "retry_after_secs": 7},
                        {"status": 503, "message": "overloaded, try later"}
                    ],
                    "text": "finally"
                }]
            },
            {
                "name": "raw",
                "first_user_contains": "raw please",
                "turns": [{
                    "tool_calls": [
                        {"id": "call_raw", "name": "write", "raw_arguments": RAW_ARGUMENTS}
                    ]
                }]
            },
            {
                "name": "slow",
                "first_user_contains": "slowly",
                "turns": [{"delay_ms": 300, "text": "done"}]
            }
        ]
    }))
    .unwrap()
}

fn with_key(key: &str) -> Script {
    Script {
        api_key: Some(key.to_owned()),
        ..script()
    }
}

async fn post_openai(server: &Server, body: &Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{}{OPENAI_PATH}", server.base_url()))
        .json(body)
        .send()
        .await
        .expect("POST /v1/chat/completions")
}

async fn post_anthropic(server: &Server, body: &Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{}{ANTHROPIC_PATH}", server.base_url()))
        .header("anthropic-version", "2023-06-01")
        .json(body)
        .send()
        .await
        .expect("POST /v1/messages")
}

fn openai_request(messages: Value) -> Value {
    json!({"model": "gpt-test", "messages": messages})
}

fn anthropic_request(messages: Value) -> Value {
    json!({
        "model": "claude-test",
        "max_tokens": 1024,
        "system": "You are terse.",
        "messages": messages,
    })
}

fn openai_first_turn() -> Value {
    openai_request(json!([
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": WEATHER_QUESTION},
    ]))
}

fn anthropic_first_turn() -> Value {
    anthropic_request(json!([
        {"role": "user", "content": [{"type": "text", "text": WEATHER_QUESTION}]},
    ]))
}

/// A quarter of `bytes`, rounded up, at least 1 (the script's token count).
fn tokens(bytes: usize) -> u64 {
    (bytes as u64).div_ceil(4).max(1)
}

/// The frames of a server-sent-events body: each frame's event name (if
/// any) and its data. Fails on anything but `event:` and `data:` lines.
fn sse_frames(body: &str) -> Vec<(Option<String>, String)> {
    assert!(
        body.ends_with("\n\n"),
        "an SSE body ends with a blank line: {body:?}"
    );
    body.split("\n\n")
        .filter(|frame| !frame.is_empty())
        .map(|frame| {
            let mut event = None;
            let mut data = None;
            for line in frame.lines() {
                if let Some(name) = line.strip_prefix("event: ") {
                    event = Some(name.to_owned());
                } else if let Some(payload) = line.strip_prefix("data: ") {
                    assert!(data.is_none(), "two data lines in one frame: {frame:?}");
                    data = Some(payload.to_owned());
                } else {
                    panic!("unexpected SSE line {line:?} in {body:?}");
                }
            }
            (event, data.expect("every frame has data"))
        })
        .collect()
}

async fn sse_body(response: reqwest::Response) -> String {
    assert_eq!(response.status().as_u16(), 200);
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert!(
        content_type.starts_with("text/event-stream"),
        "{content_type}"
    );
    response.text().await.unwrap()
}

async fn json_body(response: reqwest::Response, status: u16) -> Value {
    assert_eq!(response.status().as_u16(), status);
    response.json().await.unwrap()
}

fn retry_after(response: &reqwest::Response) -> Option<String> {
    response
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned())
}

#[tokio::test]
async fn openai_answers_a_tool_call_then_text_and_a_replay_gets_the_same_answer() {
    let server = Server::start(script()).await.unwrap();
    let first = openai_first_turn();
    let answer = json_body(post_openai(&server, &first).await, 200).await;
    assert_eq!(answer["object"], "chat.completion");
    assert_eq!(answer["model"], "gpt-test");
    assert!(
        answer["id"]
            .as_str()
            .unwrap()
            .starts_with("chatcmpl-script-"),
        "{answer}"
    );
    assert!(answer["created"].as_u64().is_some(), "{answer}");
    let choice = &answer["choices"][0];
    assert_eq!(choice["index"], 0);
    assert_eq!(choice["finish_reason"], "tool_calls");
    let message = &choice["message"];
    assert_eq!(message["role"], "assistant");
    assert_eq!(message["content"], "Let me look.");
    let calls = message["tool_calls"].as_array().unwrap();
    assert_eq!(calls.len(), 1, "{answer}");
    assert_eq!(calls[0]["id"], "call_1");
    assert_eq!(calls[0]["type"], "function");
    assert_eq!(calls[0]["function"]["name"], "get_weather");
    let arguments = calls[0]["function"]["arguments"].as_str().unwrap();
    assert_eq!(arguments, WEATHER_ARGUMENTS);
    let usage = &answer["usage"];
    let prompt = tokens(first["messages"].to_string().len());
    let completion = tokens("Let me look.".len() + WEATHER_ARGUMENTS.len());
    assert_eq!(usage["prompt_tokens"], prompt);
    assert_eq!(usage["completion_tokens"], completion);
    assert_eq!(usage["total_tokens"], prompt + completion);

    // The next turn: the request now holds one assistant message.
    let second = openai_request(json!([
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": WEATHER_QUESTION},
        {"role": "assistant", "content": "Let me look.", "tool_calls": calls},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 24 C"},
    ]));
    let answer2 = json_body(post_openai(&server, &second).await, 200).await;
    let choice2 = &answer2["choices"][0];
    assert_eq!(choice2["finish_reason"], "stop");
    assert_eq!(choice2["message"]["content"], "It is sunny in Paris.");
    assert!(choice2["message"].get("tool_calls").is_none(), "{answer2}");

    // The first request again: the same answer, counted again.
    let again = json_body(post_openai(&server, &first).await, 200).await;
    assert_eq!(again["choices"], answer["choices"]);
    assert_eq!(again["usage"], answer["usage"]);

    assert_eq!(server.requests("weather"), vec![2, 1]);
    assert_eq!(server.requests("flaky"), vec![0]);
    assert!(server.requests("no such conversation").is_empty());
    let received = server.received();
    let expected = vec![
        (OPENAI_PATH.to_owned(), first.clone()),
        (OPENAI_PATH.to_owned(), second),
        (OPENAI_PATH.to_owned(), first),
    ];
    assert_eq!(received, expected);
}

#[tokio::test]
async fn openai_matches_the_first_user_message_given_as_text_parts() {
    let server = Server::start(script()).await.unwrap();
    let request = openai_request(json!([
        {"role": "user", "content": [
            {"type": "text", "text": "Hello."},
            {"type": "text", "text": WEATHER_QUESTION},
        ]},
    ]));
    let answer = json_body(post_openai(&server, &request).await, 200).await;
    assert_eq!(
        answer["choices"][0]["message"]["tool_calls"][0]["id"],
        "call_1"
    );
    assert_eq!(server.requests("weather"), vec![1, 0]);
}

#[tokio::test]
async fn openai_streams_text_and_tool_calls_in_fragments_with_usage_last() {
    let server = Server::start(script()).await.unwrap();
    let mut request = openai_first_turn();
    request["stream"] = json!(true);
    request["stream_options"] = json!({"include_usage": true});
    let body = sse_body(post_openai(&server, &request).await).await;
    let frames = sse_frames(&body);
    let (last_event, last_data) = frames.last().unwrap();
    assert!(last_event.is_none());
    assert_eq!(last_data, "[DONE]");
    let chunks: Vec<Value> = frames[..frames.len() - 1]
        .iter()
        .map(|(event, data)| {
            assert!(
                event.is_none(),
                "OpenAI frames carry no event name: {event:?}"
            );
            serde_json::from_str(data).unwrap()
        })
        .collect();
    let id = chunks[0]["id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("chatcmpl-script-"), "{id}");
    for chunk in &chunks {
        assert_eq!(chunk["object"], "chat.completion.chunk");
        assert_eq!(chunk["id"], id.as_str());
        assert_eq!(chunk["model"], "gpt-test");
    }
    assert_eq!(
        chunks[0]["choices"][0]["delta"],
        json!({"role": "assistant"})
    );

    // The usage chunk is last, with no choices; every other carries usage null.
    let (usage_chunk, others) = chunks.split_last().unwrap();
    assert_eq!(usage_chunk["choices"], json!([]));
    let prompt = tokens(request["messages"].to_string().len());
    let completion = tokens("Let me look.".len() + WEATHER_ARGUMENTS.len());
    assert_eq!(usage_chunk["usage"]["prompt_tokens"], prompt);
    assert_eq!(usage_chunk["usage"]["completion_tokens"], completion);
    assert_eq!(usage_chunk["usage"]["total_tokens"], prompt + completion);
    for chunk in others {
        assert_eq!(chunk.get("usage"), Some(&Value::Null), "{chunk}");
    }

    // The finish chunk closes the choices; none before it finishes.
    let (finish, deltas) = others.split_last().unwrap();
    assert_eq!(finish["choices"][0]["delta"], json!({}));
    assert_eq!(finish["choices"][0]["finish_reason"], "tool_calls");
    let mut text = Vec::new();
    let mut call_starts = Vec::new();
    let mut argument_pieces = Vec::new();
    for chunk in deltas {
        let choice = &chunk["choices"][0];
        assert_eq!(choice["finish_reason"], Value::Null, "{chunk}");
        let delta = &choice["delta"];
        if let Some(piece) = delta.get("content").and_then(Value::as_str) {
            text.push(piece.to_owned());
        }
        for call in delta["tool_calls"].as_array().into_iter().flatten() {
            assert_eq!(call["index"], 0, "{chunk}");
            if call.get("id").is_some() {
                call_starts.push(call.clone());
            } else {
                argument_pieces.push(call["function"]["arguments"].as_str().unwrap().to_owned());
            }
        }
    }
    assert!(text.len() >= 2, "text in at least two deltas: {text:?}");
    assert_eq!(text.concat(), "Let me look.");
    assert_eq!(
        call_starts,
        vec![json!({
            "index": 0,
            "id": "call_1",
            "type": "function",
            "function": {"name": "get_weather", "arguments": ""},
        })]
    );
    assert!(argument_pieces.len() >= 2, "{argument_pieces:?}");
    assert_eq!(argument_pieces.concat(), WEATHER_ARGUMENTS);
}

#[tokio::test]
async fn openai_streams_without_usage_unless_asked() {
    let server = Server::start(script()).await.unwrap();
    let request = json!({
        "model": "gpt-test",
        "stream": true,
        "messages": [
            {"role": "user", "content": WEATHER_QUESTION},
            {"role": "assistant", "content": "Let me look."},
        ],
    });
    let body = sse_body(post_openai(&server, &request).await).await;
    let frames = sse_frames(&body);
    assert_eq!(frames.last().unwrap().1, "[DONE]");
    let chunks: Vec<Value> = frames[..frames.len() - 1]
        .iter()
        .map(|(_, data)| serde_json::from_str(data).unwrap())
        .collect();
    let mut text = String::new();
    for chunk in &chunks {
        assert!(chunk.get("usage").is_none(), "{chunk}");
        assert_eq!(chunk["choices"].as_array().unwrap().len(), 1, "{chunk}");
        if let Some(piece) = chunk["choices"][0]["delta"]["content"].as_str() {
            text.push_str(piece);
        }
    }
    assert_eq!(text, "It is sunny in Paris.");
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "stop"
    );
    assert_eq!(server.requests("weather"), vec![0, 1]);
}

#[tokio::test]
async fn openai_sends_raw_arguments_verbatim_and_null_content_without_text() {
    let server = Server::start(script()).await.unwrap();
    let request = openai_request(json!([{"role": "user", "content": "raw please"}]));
    let answer = json_body(post_openai(&server, &request).await, 200).await;
    let message = &answer["choices"][0]["message"];
    assert_eq!(message["content"], Value::Null, "{answer}");
    assert_eq!(
        message["tool_calls"][0]["function"]["arguments"],
        RAW_ARGUMENTS
    );
    assert_eq!(answer["choices"][0]["finish_reason"], "tool_calls");
}

#[tokio::test]
async fn anthropic_answers_a_tool_use_then_text() {
    let server = Server::start(script()).await.unwrap();
    let first = anthropic_first_turn();
    let answer = json_body(post_anthropic(&server, &first).await, 200).await;
    assert_eq!(answer["type"], "message");
    assert_eq!(answer["role"], "assistant");
    assert_eq!(answer["model"], "claude-test");
    assert!(
        answer["id"].as_str().unwrap().starts_with("msg_script_"),
        "{answer}"
    );
    assert_eq!(answer["stop_reason"], "tool_use");
    assert_eq!(answer["stop_sequence"], Value::Null);
    assert_eq!(
        answer["content"],
        json!([
            {"type": "text", "text": "Let me look."},
            {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}},
        ])
    );
    let input = tokens(first["messages"].to_string().len() + "You are terse.".len());
    let output = tokens("Let me look.".len() + WEATHER_ARGUMENTS.len());
    assert_eq!(
        answer["usage"],
        json!({
            "input_tokens": input,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "output_tokens": output,
        })
    );

    let second = anthropic_request(json!([
        {"role": "user", "content": WEATHER_QUESTION},
        {"role": "assistant", "content": answer["content"]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "call_1", "content": "sunny, 24 C"},
        ]},
    ]));
    let answer2 = json_body(post_anthropic(&server, &second).await, 200).await;
    assert_eq!(answer2["stop_reason"], "end_turn");
    assert_eq!(
        answer2["content"],
        json!([{"type": "text", "text": "It is sunny in Paris."}])
    );
    assert_eq!(server.requests("weather"), vec![1, 1]);
    let paths: Vec<String> = server
        .received()
        .into_iter()
        .map(|(path, _)| path)
        .collect();
    assert_eq!(
        paths,
        vec![ANTHROPIC_PATH.to_owned(), ANTHROPIC_PATH.to_owned()]
    );
}

/// A streamed Messages answer, checked event by event and put together:
/// the message_start, the blocks (their start and joined deltas, each in at
/// least two pieces) and the message_delta.
struct Streamed {
    start: Value,
    blocks: Vec<(Value, String)>,
    delta: Value,
}

fn assemble_anthropic(body: &str) -> Streamed {
    let events: Vec<(String, Value)> = sse_frames(body)
        .into_iter()
        .map(|(event, data)| {
            let data: Value = serde_json::from_str(&data).unwrap();
            let event = event.expect("every Anthropic frame names its event");
            assert_eq!(
                data["type"],
                event.as_str(),
                "the event name is the data's type"
            );
            (event, data)
        })
        .collect();
    let names: Vec<&str> = events.iter().map(|(event, _)| event.as_str()).collect();
    assert_eq!(names.first(), Some(&"message_start"), "{names:?}");
    assert_eq!(names.last(), Some(&"message_stop"), "{names:?}");
    assert_eq!(names[names.len() - 2], "message_delta", "{names:?}");
    let mut blocks: Vec<(Value, Vec<String>, bool)> = Vec::new();
    for (event, data) in &events[1..events.len() - 2] {
        match event.as_str() {
            "ping" => {}
            "content_block_start" => {
                assert_eq!(data["index"], blocks.len(), "blocks start in order");
                assert!(blocks.iter().all(|(_, _, stopped)| *stopped), "{names:?}");
                blocks.push((data["content_block"].clone(), Vec::new(), false));
            }
            "content_block_delta" => {
                let open = blocks.len().checked_sub(1).expect("a delta in a block");
                assert_eq!(data["index"], open, "a delta of the open block");
                let (start, pieces, stopped) = blocks.last_mut().expect("a delta in a block");
                assert!(!*stopped, "a delta after its block stopped");
                let piece = match start["type"].as_str().unwrap() {
                    "text" => {
                        assert_eq!(data["delta"]["type"], "text_delta");
                        data["delta"]["text"].as_str().unwrap()
                    }
                    "tool_use" => {
                        assert_eq!(data["delta"]["type"], "input_json_delta");
                        data["delta"]["partial_json"].as_str().unwrap()
                    }
                    other => panic!("unexpected block type {other}"),
                };
                pieces.push(piece.to_owned());
            }
            "content_block_stop" => {
                let open = blocks.len().checked_sub(1).expect("a stop in a block");
                assert_eq!(data["index"], open, "the open block stops");
                let (_, _, stopped) = blocks.last_mut().expect("a stop in a block");
                assert!(!*stopped, "a block stopped twice");
                *stopped = true;
            }
            other => panic!("unexpected event {other} in {names:?}"),
        }
    }
    let blocks = blocks
        .into_iter()
        .map(|(start, pieces, stopped)| {
            assert!(stopped, "every block stops");
            assert!(
                pieces.len() >= 2,
                "a block in at least two deltas: {pieces:?}"
            );
            (start, pieces.concat())
        })
        .collect();
    Streamed {
        start: events[0].1["message"].clone(),
        blocks,
        delta: events[events.len() - 2].1.clone(),
    }
}

#[tokio::test]
async fn anthropic_streams_blocks_in_fragments() {
    let server = Server::start(script()).await.unwrap();
    let mut request = anthropic_first_turn();
    request["stream"] = json!(true);
    let body = sse_body(post_anthropic(&server, &request).await).await;
    let streamed = assemble_anthropic(&body);
    let input = tokens(request["messages"].to_string().len() + "You are terse.".len());
    let output = tokens("Let me look.".len() + WEATHER_ARGUMENTS.len());
    assert!(streamed.start["id"]
        .as_str()
        .unwrap()
        .starts_with("msg_script_"));
    assert_eq!(streamed.start["role"], "assistant");
    assert_eq!(streamed.start["model"], "claude-test");
    assert_eq!(streamed.start["content"], json!([]));
    assert_eq!(streamed.start["usage"]["input_tokens"], input);
    assert_eq!(streamed.start["usage"]["output_tokens"], 1);
    assert_eq!(streamed.blocks.len(), 2, "{body}");
    assert_eq!(streamed.blocks[0].0, json!({"type": "text", "text": ""}));
    assert_eq!(streamed.blocks[0].1, "Let me look.");
    assert_eq!(
        streamed.blocks[1].0,
        json!({"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {}})
    );
    let input_json: Value = serde_json::from_str(&streamed.blocks[1].1).unwrap();
    assert_eq!(input_json, json!({"city": "Paris"}));
    assert_eq!(
        streamed.delta,
        json!({
            "type": "message_delta",
            "delta": {"stop_reason": "tool_use", "stop_sequence": null},
            "usage": {"output_tokens": output},
        })
    );
}

#[tokio::test]
async fn anthropic_streams_raw_arguments_but_refuses_them_unstreamed() {
    let server = Server::start(script()).await.unwrap();
    let mut request = anthropic_request(json!([{"role": "user", "content": "raw please"}]));
    let refused = json_body(post_anthropic(&server, &request).await, 500).await;
    assert_eq!(refused["type"], "error");
    assert_eq!(refused["error"]["type"], "api_error");
    let message = refused["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("raw arguments need streaming on /v1/messages"),
        "{message}"
    );

    request["stream"] = json!(true);
    let body = sse_body(post_anthropic(&server, &request).await).await;
    let streamed = assemble_anthropic(&body);
    assert_eq!(
        streamed.blocks.len(),
        1,
        "no text block for empty text: {body}"
    );
    assert_eq!(streamed.blocks[0].0["id"], "call_raw");
    assert_eq!(streamed.blocks[0].1, RAW_ARGUMENTS);
    assert_eq!(streamed.delta["delta"]["stop_reason"], "tool_use");
    assert_eq!(server.requests("raw"), vec![2]);
}

#[tokio::test]
async fn openai_fails_first_as_scripted_with_retry_after_then_answers() {
    let server = Server::start(script()).await.unwrap();
    let request = openai_request(json!([{"role": "user", "content": "be flaky"}]));

    let response = post_openai(&server, &request).await;
    assert_eq!(retry_after(&response).as_deref(), Some("7"));
    let error = json_body(response, 429).await;
    assert_eq!(error["error"]["type"], "rate_limit_error");
    assert_eq!(error["error"]["code"], Value::Null);
    assert!(
        !error["error"]["message"].as_str().unwrap().is_empty(),
        "{error}"
    );

    let response = post_openai(&server, &request).await;
    assert_eq!(retry_after(&response), None);
    let error = json_body(response, 503).await;
    assert_eq!(
        error,
        json!({"error": {"message": "overloaded, try later", "type": "server_error", "code": null}})
    );

    for _ in 0..2 {
        let answer = json_body(post_openai(&server, &request).await, 200).await;
        assert_eq!(answer["choices"][0]["message"]["content"], "finally");
    }
    assert_eq!(server.requests("flaky"), vec![4]);
}

#[tokio::test]
async fn anthropic_fails_first_in_its_own_error_format() {
    let server = Server::start(script()).await.unwrap();
    let mut request = anthropic_request(json!([{"role": "user", "content": "be flaky"}]));
    // Failures come before the stream starts, as plain HTTP errors.
    request["stream"] = json!(true);

    let response = post_anthropic(&server, &request).await;
    assert_eq!(retry_after(&response).as_deref(), Some("7"));
    let error = json_body(response, 429).await;
    assert_eq!(error["type"], "error");
    assert_eq!(error["error"]["type"], "rate_limit_error");

    let response = post_anthropic(&server, &request).await;
    assert_eq!(retry_after(&response), None);
    let error = json_body(response, 503).await;
    assert_eq!(
        error,
        json!({"type": "error", "error": {"type": "api_error", "message": "overloaded, try later"}})
    );

    let body = sse_body(post_anthropic(&server, &request).await).await;
    let streamed = assemble_anthropic(&body);
    assert_eq!(streamed.blocks.len(), 1);
    assert_eq!(streamed.blocks[0].1, "finally");
    assert_eq!(streamed.delta["delta"]["stop_reason"], "end_turn");
    assert_eq!(server.requests("flaky"), vec![3]);
}

#[tokio::test]
async fn the_api_key_is_required_in_each_providers_header() {
    let key = "sk-script-secret";
    let server = Server::start(with_key(key)).await.unwrap();
    let client = reqwest::Client::new();
    let openai_url = format!("{}{OPENAI_PATH}", server.base_url());
    let anthropic_url = format!("{}{ANTHROPIC_PATH}", server.base_url());
    let openai_body = openai_first_turn();
    let anthropic_body = anthropic_first_turn();

    let refused_openai = [
        client.post(&openai_url).json(&openai_body),
        client
            .post(&openai_url)
            .json(&openai_body)
            .bearer_auth("sk-wrong"),
        client
            .post(&openai_url)
            .json(&openai_body)
            .header("x-api-key", key),
        client
            .post(&openai_url)
            .json(&openai_body)
            .header("authorization", key),
    ];
    for attempt in refused_openai {
        let error = json_body(attempt.send().await.unwrap(), 401).await;
        assert_eq!(error["error"]["type"], "authentication_error", "{error}");
        assert!(
            !error.to_string().contains(key),
            "the key is never echoed: {error}"
        );
    }
    let refused_anthropic = [
        client.post(&anthropic_url).json(&anthropic_body),
        client
            .post(&anthropic_url)
            .json(&anthropic_body)
            .bearer_auth(key),
        client
            .post(&anthropic_url)
            .json(&anthropic_body)
            .header("x-api-key", "sk-wrong"),
    ];
    for attempt in refused_anthropic {
        let response = attempt
            .header("anthropic-version", "2023-06-01")
            .send()
            .await
            .unwrap();
        let error = json_body(response, 401).await;
        assert_eq!(error["type"], "error");
        assert_eq!(error["error"]["type"], "authentication_error", "{error}");
        assert!(
            !error.to_string().contains(key),
            "the key is never echoed: {error}"
        );
    }
    assert_eq!(
        server.requests("weather"),
        vec![0, 0],
        "refused requests are not counted"
    );

    let accepted = client
        .post(&openai_url)
        .bearer_auth(key)
        .json(&openai_body)
        .send()
        .await
        .unwrap();
    json_body(accepted, 200).await;
    let accepted = client
        .post(&anthropic_url)
        .header("x-api-key", key)
        .header("anthropic-version", "2023-06-01")
        .json(&anthropic_body)
        .send()
        .await
        .unwrap();
    json_body(accepted, 200).await;
    assert_eq!(server.requests("weather"), vec![2, 0]);
    assert_eq!(
        server.received().len(),
        9,
        "refused requests are recorded too"
    );
}

#[tokio::test]
async fn requests_the_script_cannot_answer_get_400_saying_why() {
    let server = Server::start(script()).await.unwrap();

    let unknown = openai_request(json!([{"role": "user", "content": "Tell me a joke."}]));
    let error = json_body(post_openai(&server, &unknown).await, 400).await;
    assert_eq!(error["error"]["type"], "invalid_request_error");
    let message = error["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("no conversation matches the first user message"),
        "{message}"
    );

    let unknown = anthropic_request(json!([{"role": "user", "content": "Tell me a joke."}]));
    let error = json_body(post_anthropic(&server, &unknown).await, 400).await;
    assert_eq!(error["type"], "error");
    assert_eq!(error["error"]["type"], "invalid_request_error");
    let message = error["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("no conversation matches the first user message"),
        "{message}"
    );

    let past_the_end = json!([
        {"role": "user", "content": WEATHER_QUESTION},
        {"role": "assistant", "content": "Let me look."},
        {"role": "user", "content": "And tomorrow?"},
        {"role": "assistant", "content": "It is sunny in Paris."},
        {"role": "user", "content": "And the day after?"},
    ]);
    let error = json_body(
        post_openai(&server, &openai_request(past_the_end.clone())).await,
        400,
    )
    .await;
    let message = error["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("conversation weather has 2 turns; this request is turn 2"),
        "{message}"
    );
    let error = json_body(
        post_anthropic(&server, &anthropic_request(past_the_end)).await,
        400,
    )
    .await;
    let message = error["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("conversation weather has 2 turns; this request is turn 2"),
        "{message}"
    );
    assert_eq!(server.requests("weather"), vec![0, 0, 2]);

    // Without anthropic-version the Messages API refuses, before counting.
    let response = reqwest::Client::new()
        .post(format!("{}{ANTHROPIC_PATH}", server.base_url()))
        .json(&anthropic_first_turn())
        .send()
        .await
        .unwrap();
    let error = json_body(response, 400).await;
    assert_eq!(error["error"]["type"], "invalid_request_error");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("anthropic-version"),
        "{error}"
    );
    assert_eq!(server.requests("weather"), vec![0, 0, 2]);

    // A body that is not JSON.
    let response = reqwest::Client::new()
        .post(format!("{}{OPENAI_PATH}", server.base_url()))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    let error = json_body(response, 400).await;
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not JSON"),
        "{error}"
    );
    assert_eq!(
        server.received().len(),
        5,
        "the body that is not JSON is not recorded"
    );
}

#[tokio::test]
async fn a_turn_with_a_delay_answers_no_sooner() {
    let server = Server::start(script()).await.unwrap();
    let request = openai_request(json!([{"role": "user", "content": "answer slowly"}]));
    let sent = Instant::now();
    let answer = json_body(post_openai(&server, &request).await, 200).await;
    // A lower bound only: a slow machine answers later, never sooner.
    assert!(
        sent.elapsed() >= Duration::from_millis(300),
        "{:?}",
        sent.elapsed()
    );
    assert_eq!(answer["choices"][0]["message"]["content"], "done");
}

#[tokio::test]
async fn scripts_with_a_non_error_failure_status_are_refused() {
    let mut bad = script();
    bad.conversations[1].turns[0].fail_first[0].status = 200;
    let error = match Server::start(bad).await {
        Ok(_) => panic!("a failure with status 200 was accepted"),
        Err(error) => error,
    };
    assert_eq!(error.kind(), std::io::ErrorKind::InvalidInput);
    assert!(error.to_string().contains("200"), "{error}");
}
