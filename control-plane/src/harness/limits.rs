//! What keeps a session from running on forever or past what it may cost:
//! its [`Budgets`] (iterations, tokens, tool calls, wall time, money), the
//! [`LoopDetector`] that stops a model calling the same tool with the same
//! arguments again and again, and the first stage of compaction
//! ([`elide_old_tool_outputs`]) with the test for when it is due
//! ([`needs_compaction`]).
//!
//! All of it is pure: the agent loop passes in the time, the usage the
//! provider reported and the calls the model made, and records what these
//! decide.

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::providers::{Arguments, Message, ToolCall, Usage};
use super::tools::text::{cap_head_tail, cut_marker};
use crate::config::ModelConfig;

/// Compaction is due when the last request's input tokens plus the answer
/// it may get pass this percentage of the model's context window: the rest
/// is room for the turn's new results before the next request.
pub const COMPACTION_THRESHOLD_PERCENT: u64 = 80;

/// The most a session may spend. The server's configured maxima are one of
/// these; a task's own are held within them ([`Budgets::within`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Budgets {
    /// Model calls.
    pub max_iterations: u32,
    /// Input tokens over all model calls (each call's whole prompt counts,
    /// cached parts included, as the provider reports it).
    pub max_input_tokens: u64,
    /// Output tokens over all model calls.
    pub max_output_tokens: u64,
    /// Seconds from the session's start.
    pub max_wall_secs: u64,
    /// Tool calls the model made, valid or not.
    pub max_tool_calls: u32,
    /// USD at the model's configured prices; none: no cap (a model without
    /// prices costs nothing as far as this counts).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_cost_usd: Option<f64>,
}

impl Default for Budgets {
    fn default() -> Budgets {
        Budgets {
            max_iterations: 50,
            max_input_tokens: 2_000_000,
            max_output_tokens: 200_000,
            max_wall_secs: 1800,
            max_tool_calls: 200,
            max_cost_usd: None,
        }
    }
}

impl Budgets {
    /// A task's budgets held within the server's maxima: zero (or no cost
    /// cap) takes the server's maximum; more than a maximum is refused with
    /// a message naming the field and the maximum, never quietly lowered.
    /// Without a server cost cap, the task's own cap stands.
    pub fn within(&self, server_max: &Budgets) -> Result<Budgets, String> {
        let max_cost_usd = match (self.max_cost_usd, server_max.max_cost_usd) {
            (None, server) => server,
            (Some(0.0), server) => server,
            (Some(asked), _) if !asked.is_finite() || asked < 0.0 => {
                return Err(format!(
                    "max_cost_usd must be a positive number of USD, got {asked}"
                ))
            }
            (Some(asked), Some(max)) if asked > max => {
                return Err(format!(
                    "max_cost_usd must be at most {max} (the server's maximum), got {asked}"
                ))
            }
            (Some(asked), _) => Some(asked),
        };
        Ok(Budgets {
            max_iterations: at_most(
                "max_iterations",
                self.max_iterations,
                server_max.max_iterations,
            )?,
            max_input_tokens: at_most(
                "max_input_tokens",
                self.max_input_tokens,
                server_max.max_input_tokens,
            )?,
            max_output_tokens: at_most(
                "max_output_tokens",
                self.max_output_tokens,
                server_max.max_output_tokens,
            )?,
            max_wall_secs: at_most(
                "max_wall_secs",
                self.max_wall_secs,
                server_max.max_wall_secs,
            )?,
            max_tool_calls: at_most(
                "max_tool_calls",
                self.max_tool_calls,
                server_max.max_tool_calls,
            )?,
            max_cost_usd,
        })
    }

    /// The first budget `spent` has used up, in a fixed order: iterations,
    /// tool calls, input tokens, output tokens, cost, wall time. A budget is
    /// used up once what was spent reaches it (no further call may start).
    pub fn exceeded(&self, spent: &Spent, now_unix_ms: i64) -> Option<Exceeded> {
        if spent.iterations >= self.max_iterations {
            return Some(Exceeded::Iterations {
                max: self.max_iterations,
                spent: spent.iterations,
            });
        }
        if spent.tool_calls >= self.max_tool_calls {
            return Some(Exceeded::ToolCalls {
                max: self.max_tool_calls,
                spent: spent.tool_calls,
            });
        }
        if spent.input_tokens >= self.max_input_tokens {
            return Some(Exceeded::InputTokens {
                max: self.max_input_tokens,
                spent: spent.input_tokens,
            });
        }
        if spent.output_tokens >= self.max_output_tokens {
            return Some(Exceeded::OutputTokens {
                max: self.max_output_tokens,
                spent: spent.output_tokens,
            });
        }
        if let Some(max_usd) = self.max_cost_usd {
            if spent.cost_usd >= max_usd {
                return Some(Exceeded::Cost {
                    max_usd,
                    spent_usd: spent.cost_usd,
                });
            }
        }
        // A clock that went back counts as no time passed.
        let elapsed_ms =
            u64::try_from(now_unix_ms.saturating_sub(spent.started_unix_ms)).unwrap_or(0);
        if elapsed_ms >= self.max_wall_secs.saturating_mul(1000) {
            return Some(Exceeded::WallTime {
                max_secs: self.max_wall_secs,
                elapsed_secs: elapsed_ms / 1000,
            });
        }
        None
    }
}

/// `asked` within `max`: zero is `max`, more is refused.
fn at_most<T>(name: &str, asked: T, max: T) -> Result<T, String>
where
    T: Copy + Default + PartialOrd + fmt::Display,
{
    if asked == T::default() {
        Ok(max)
    } else if asked > max {
        Err(format!(
            "{name} must be at most {max} (the server's maximum), got {asked}"
        ))
    } else {
        Ok(asked)
    }
}

/// What a session has spent so far.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Spent {
    pub iterations: u32,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub tool_calls: u32,
    /// At the model's prices; calls to a model without prices add nothing.
    pub cost_usd: f64,
    /// When the session started (ms since the Unix epoch): wall time counts
    /// from here.
    pub started_unix_ms: i64,
}

impl Spent {
    /// Nothing spent yet, at `started_unix_ms`.
    pub fn new(started_unix_ms: i64) -> Spent {
        Spent {
            started_unix_ms,
            ..Spent::default()
        }
    }

    /// One model call's tokens, and its cost when the model has prices
    /// (`Usage::cost_usd`).
    pub fn add_usage(&mut self, usage: &Usage, cost_usd: Option<f64>) {
        self.input_tokens = self.input_tokens.saturating_add(usage.input_tokens);
        self.output_tokens = self.output_tokens.saturating_add(usage.output_tokens);
        if let Some(cost) = cost_usd {
            self.cost_usd += cost;
        }
    }

    /// One model call.
    pub fn add_iteration(&mut self) {
        self.iterations = self.iterations.saturating_add(1);
    }

    /// The calls of one answer.
    pub fn add_tool_calls(&mut self, n: u32) {
        self.tool_calls = self.tool_calls.saturating_add(n);
    }
}

/// The budget that is used up, with its numbers.
#[derive(Clone, Debug, PartialEq)]
pub enum Exceeded {
    Iterations { max: u32, spent: u32 },
    ToolCalls { max: u32, spent: u32 },
    InputTokens { max: u64, spent: u64 },
    OutputTokens { max: u64, spent: u64 },
    Cost { max_usd: f64, spent_usd: f64 },
    WallTime { max_secs: u64, elapsed_secs: u64 },
}

impl Exceeded {
    /// The [`Budgets`] field of the budget.
    pub fn budget(&self) -> &'static str {
        match self {
            Exceeded::Iterations { .. } => "max_iterations",
            Exceeded::ToolCalls { .. } => "max_tool_calls",
            Exceeded::InputTokens { .. } => "max_input_tokens",
            Exceeded::OutputTokens { .. } => "max_output_tokens",
            Exceeded::Cost { .. } => "max_cost_usd",
            Exceeded::WallTime { .. } => "max_wall_secs",
        }
    }
}

impl fmt::Display for Exceeded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Exceeded::Iterations { max, .. } => write!(f, "the iteration budget ({max}) is spent"),
            Exceeded::ToolCalls { max, .. } => write!(f, "the tool-call budget ({max}) is spent"),
            Exceeded::InputTokens { max, spent } => write!(
                f,
                "the input-token budget ({max}) is spent ({spent} tokens used)"
            ),
            Exceeded::OutputTokens { max, spent } => write!(
                f,
                "the output-token budget ({max}) is spent ({spent} tokens used)"
            ),
            Exceeded::Cost { max_usd, spent_usd } => write!(
                f,
                "the cost budget ({max_usd} USD) is spent ({spent_usd:.4} USD used)"
            ),
            Exceeded::WallTime {
                max_secs,
                elapsed_secs,
            } => write!(
                f,
                "the wall-time budget ({max_secs} s) is spent ({elapsed_secs} s elapsed)"
            ),
        }
    }
}

/// Stops a session whose model calls the same tool with the same arguments
/// `threshold` times in a row: it is not getting anywhere, and every call
/// costs. A turn with several calls is observed call by call, in order.
#[derive(Clone, Debug)]
pub struct LoopDetector {
    /// How many identical calls in a row are a loop; 0: never.
    pub threshold: u32,
    last: Option<CallKey>,
    run: u32,
}

impl Default for LoopDetector {
    fn default() -> LoopDetector {
        LoopDetector::new(3)
    }
}

/// What makes two calls the same: the tool, and its arguments as canonical
/// JSON (keys sorted), or, when they did not parse, their exact text.
#[derive(Clone, Debug, PartialEq, Eq)]
enum CallKey {
    Json { tool: String, arguments: String },
    Malformed { tool: String, raw: String },
}

impl CallKey {
    fn of(call: &ToolCall) -> CallKey {
        match &call.arguments {
            Arguments::Json(value) => CallKey::Json {
                tool: call.name.clone(),
                arguments: sorted_keys(value).to_string(),
            },
            Arguments::Malformed { raw, .. } => CallKey::Malformed {
                tool: call.name.clone(),
                raw: raw.clone(),
            },
        }
    }
}

/// `value` with every object's keys in sorted order, however deep: with
/// serde_json's `preserve_order` (on in this workspace) a map keeps the
/// order keys came in, so `{"a":1,"b":2}` and `{"b":2,"a":1}` would
/// otherwise print differently.
fn sorted_keys(value: &Value) -> Value {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_by_key(|(key, _)| *key);
            Value::Object(
                entries
                    .into_iter()
                    .map(|(key, value)| (key.clone(), sorted_keys(value)))
                    .collect(),
            )
        }
        Value::Array(items) => Value::Array(items.iter().map(sorted_keys).collect()),
        other => other.clone(),
    }
}

impl LoopDetector {
    pub fn new(threshold: u32) -> LoopDetector {
        LoopDetector {
            threshold,
            last: None,
            run: 0,
        }
    }

    /// Takes the model's next call; a loop once it is the `threshold`th
    /// identical call in a row. Any different call starts a new run.
    pub fn observe(&mut self, call: &ToolCall) -> Option<LoopFound> {
        let key = CallKey::of(call);
        if self.last.as_ref() == Some(&key) {
            self.run = self.run.saturating_add(1);
        } else {
            self.last = Some(key);
            self.run = 1;
        }
        (self.threshold > 0 && self.run >= self.threshold).then(|| LoopFound {
            tool: call.name.clone(),
            times: self.run,
        })
    }
}

/// The model called one tool with the same arguments too many times in a
/// row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoopFound {
    pub tool: String,
    pub times: u32,
}

impl fmt::Display for LoopFound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the model called {} with the same arguments {} times in a row",
            self.tool, self.times
        )
    }
}

/// The first stage of compaction: in every tool-results message but the
/// last `keep_last` messages of `messages` (the conversation as
/// `Transcript::messages` gives it), each result longer than
/// `max_bytes_per_result` is cut to its head and tail
/// (`tools::text::cap_head_tail`, its marker saying how much was cut).
/// Nothing is dropped: every call keeps its results, only shorter.
///
/// Returns `(upto, replacement)` for `Recorder::compaction`: messages
/// `[0, upto)` replaced by `replacement`, which is those messages with the
/// cuts, `upto` just past the last one changed; none when nothing would
/// change. A result already cut (or longer than the budget by no more than
/// a marker) is left as it is, so compacting again changes nothing.
pub fn elide_old_tool_outputs(
    messages: &[Message],
    keep_last: usize,
    max_bytes_per_result: usize,
) -> Option<(u32, Vec<Message>)> {
    let old = messages.len().saturating_sub(keep_last);
    let mut replacement = messages[..old].to_vec();
    let mut upto = 0;
    for (i, message) in replacement.iter_mut().enumerate() {
        let Message::ToolResults(results) = message else {
            continue;
        };
        for result in results.iter_mut() {
            if let Some(shorter) = elided(&result.content, max_bytes_per_result) {
                result.content = shorter;
                upto = i + 1;
            }
        }
    }
    if upto == 0 {
        return None;
    }
    replacement.truncate(upto);
    Some((u32::try_from(upto).ok()?, replacement))
}

/// `content` cut to `max` bytes and the marker, when that makes it
/// shorter than it is.
fn elided(content: &str, max: usize) -> Option<String> {
    // A cut of `content` adds a marker at most this long: within `max` and
    // the marker it is not worth cutting, and a result cut before (at most
    // `max` kept and a marker naming fewer bytes) is never longer.
    let marker = cut_marker(content.len()).len();
    if content.len() <= max.saturating_add(marker) {
        return None;
    }
    let (text, _) = cap_head_tail(content.as_bytes(), max);
    Some(text)
}

/// About how many tokens `messages` are: the bytes of their JSON / 4,
/// rounded up. Only an estimate; the provider's usage is the ground truth.
pub fn estimate_tokens(messages: &[Message]) -> u64 {
    let bytes = serde_json::to_vec(messages).map_or(0, |json| json.len());
    (bytes as u64).div_ceil(4)
}

/// Whether the conversation should be compacted before the next request:
/// the last request's input tokens plus the answer the model may give pass
/// [`COMPACTION_THRESHOLD_PERCENT`] of its context window.
pub fn needs_compaction(last_input_tokens: u64, model: &ModelConfig) -> bool {
    let threshold = model
        .context_window
        .saturating_mul(COMPACTION_THRESHOLD_PERCENT)
        / 100;
    last_input_tokens.saturating_add(u64::from(model.max_output_tokens)) > threshold
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::config::ProviderKind;
    use crate::harness::providers::{ModelResponse, StopReason, ToolResult};
    use crate::harness::transcript::{request_hash, Entry, Record, Recorder, Transcript};

    fn model(price_per_mtok: Option<f64>) -> ModelConfig {
        ModelConfig {
            name: "m".into(),
            provider: ProviderKind::OpenAi,
            base_url: "http://127.0.0.1:1/v1".into(),
            model: "m-1".into(),
            api_key_env: None,
            api_key_file: None,
            context_window: 100_000,
            max_output_tokens: 10_000,
            price_input_per_mtok: price_per_mtok,
            price_output_per_mtok: price_per_mtok,
            request_timeout_secs: 60,
            max_retries: 0,
            retry_min_delay_ms: 10,
            api_key: None,
        }
    }

    fn call(id: &str, name: &str, arguments: &str) -> ToolCall {
        ToolCall {
            id: id.into(),
            name: name.into(),
            arguments: Arguments::parse(arguments.into()),
        }
    }

    #[test]
    fn a_task_gets_the_server_maximum_for_zero_and_is_refused_above_it() {
        let server = Budgets::default();
        assert_eq!(Budgets::default().within(&server).unwrap(), server);
        let zeros = Budgets {
            max_iterations: 0,
            max_input_tokens: 0,
            max_output_tokens: 0,
            max_wall_secs: 0,
            max_tool_calls: 0,
            max_cost_usd: None,
        };
        assert_eq!(zeros.within(&server).unwrap(), server);
        let lower = Budgets {
            max_iterations: 10,
            max_input_tokens: 1000,
            max_output_tokens: 500,
            max_wall_secs: 60,
            max_tool_calls: 20,
            max_cost_usd: Some(0.5),
        };
        assert_eq!(lower.within(&server).unwrap(), lower);

        let refused = |task: Budgets, field: &str, max: &str| {
            let err = task.within(&server).unwrap_err();
            assert!(
                err.contains(field) && err.contains(max) && err.contains("server's maximum"),
                "{err}"
            );
        };
        let base = Budgets::default();
        refused(
            Budgets {
                max_iterations: 51,
                ..base.clone()
            },
            "max_iterations",
            "at most 50",
        );
        refused(
            Budgets {
                max_input_tokens: 2_000_001,
                ..base.clone()
            },
            "max_input_tokens",
            "at most 2000000",
        );
        refused(
            Budgets {
                max_output_tokens: 200_001,
                ..base.clone()
            },
            "max_output_tokens",
            "at most 200000",
        );
        refused(
            Budgets {
                max_wall_secs: 1801,
                ..base.clone()
            },
            "max_wall_secs",
            "at most 1800",
        );
        refused(
            Budgets {
                max_tool_calls: 201,
                ..base.clone()
            },
            "max_tool_calls",
            "at most 200",
        );
    }

    #[test]
    fn a_cost_cap_is_held_within_the_server_one() {
        let capped = Budgets {
            max_cost_usd: Some(10.0),
            ..Budgets::default()
        };
        let asking = |cost: Option<f64>| Budgets {
            max_cost_usd: cost,
            ..Budgets::default()
        };
        // No server cap: the task's own stands, or none.
        let uncapped = Budgets::default();
        assert_eq!(
            asking(Some(3.0)).within(&uncapped).unwrap().max_cost_usd,
            Some(3.0)
        );
        assert_eq!(asking(None).within(&uncapped).unwrap().max_cost_usd, None);
        // A server cap: none or zero takes it, less stays, more is refused.
        assert_eq!(
            asking(None).within(&capped).unwrap().max_cost_usd,
            Some(10.0)
        );
        assert_eq!(
            asking(Some(0.0)).within(&capped).unwrap().max_cost_usd,
            Some(10.0)
        );
        assert_eq!(
            asking(Some(2.5)).within(&capped).unwrap().max_cost_usd,
            Some(2.5)
        );
        let err = asking(Some(20.0)).within(&capped).unwrap_err();
        assert!(
            err.contains("max_cost_usd") && err.contains("at most 10"),
            "{err}"
        );
        for nonsense in [-1.0, f64::NAN, f64::INFINITY] {
            let err = asking(Some(nonsense)).within(&uncapped).unwrap_err();
            assert!(err.contains("max_cost_usd"), "{err}");
        }
    }

    #[test]
    fn each_budget_is_spent_in_a_fixed_order() {
        let budgets = Budgets {
            max_iterations: 2,
            max_input_tokens: 100,
            max_output_tokens: 50,
            max_wall_secs: 60,
            max_tool_calls: 3,
            max_cost_usd: Some(1.0),
        };
        let start = 1_700_000_000_000;
        let mut spent = Spent::new(start);
        assert_eq!(budgets.exceeded(&spent, start), None);
        // Everything just short of its budget: nothing is spent yet.
        spent.add_iteration();
        spent.add_tool_calls(2);
        spent.add_usage(
            &Usage {
                input_tokens: 99,
                output_tokens: 49,
                ..Usage::default()
            },
            Some(0.5),
        );
        let just_short = start + 59_999;
        assert_eq!(budgets.exceeded(&spent, just_short), None);

        // Everything spent: the first in the order is named, and once it is
        // set back, the next.
        spent.add_iteration();
        spent.add_tool_calls(1);
        spent.add_usage(
            &Usage {
                input_tokens: 1,
                output_tokens: 1,
                ..Usage::default()
            },
            Some(0.5),
        );
        let late = start + 60_000;
        let mut order = Vec::new();
        while let Some(exceeded) = budgets.exceeded(&spent, late) {
            order.push(exceeded.budget());
            match exceeded {
                Exceeded::Iterations { max, spent: n } => {
                    assert_eq!((max, n), (2, 2));
                    spent.iterations = 0;
                }
                Exceeded::ToolCalls { max, spent: n } => {
                    assert_eq!((max, n), (3, 3));
                    spent.tool_calls = 0;
                }
                Exceeded::InputTokens { max, spent: n } => {
                    assert_eq!((max, n), (100, 100));
                    spent.input_tokens = 0;
                }
                Exceeded::OutputTokens { max, spent: n } => {
                    assert_eq!((max, n), (50, 50));
                    spent.output_tokens = 0;
                }
                Exceeded::Cost { max_usd, spent_usd } => {
                    assert_eq!(max_usd, 1.0);
                    assert!((spent_usd - 1.0).abs() < 1e-9, "{spent_usd}");
                    spent.cost_usd = 0.0;
                }
                Exceeded::WallTime {
                    max_secs,
                    elapsed_secs,
                } => {
                    assert_eq!((max_secs, elapsed_secs), (60, 60));
                    spent.started_unix_ms = late;
                }
            }
            assert!(order.len() <= 6, "{order:?}");
        }
        assert_eq!(
            order,
            [
                "max_iterations",
                "max_tool_calls",
                "max_input_tokens",
                "max_output_tokens",
                "max_cost_usd",
                "max_wall_secs"
            ]
        );
        // A clock that went back is no time passed.
        assert_eq!(
            budgets.exceeded(&Spent::new(start), start - 1_000_000),
            None
        );
    }

    #[test]
    fn what_a_spent_budget_says() {
        let said = |e: Exceeded| e.to_string();
        assert_eq!(
            said(Exceeded::Iterations { max: 50, spent: 50 }),
            "the iteration budget (50) is spent"
        );
        assert_eq!(
            said(Exceeded::ToolCalls {
                max: 200,
                spent: 201
            }),
            "the tool-call budget (200) is spent"
        );
        assert_eq!(
            said(Exceeded::InputTokens {
                max: 100,
                spent: 120
            }),
            "the input-token budget (100) is spent (120 tokens used)"
        );
        assert_eq!(
            said(Exceeded::Cost {
                max_usd: 2.5,
                spent_usd: 2.51234
            }),
            "the cost budget (2.5 USD) is spent (2.5123 USD used)"
        );
        assert_eq!(
            said(Exceeded::WallTime {
                max_secs: 1800,
                elapsed_secs: 1801
            }),
            "the wall-time budget (1800 s) is spent (1801 s elapsed)"
        );
    }

    #[test]
    fn cost_is_counted_only_when_the_model_has_prices() {
        let usage = Usage {
            input_tokens: 600_000,
            output_tokens: 400_000,
            ..Usage::default()
        };
        let budgets = Budgets {
            max_input_tokens: 10_000_000,
            max_output_tokens: 10_000_000,
            max_cost_usd: Some(1.0),
            ..Budgets::default()
        };
        let mut free = Spent::new(0);
        for _ in 0..3 {
            free.add_usage(&usage, usage.cost_usd(&model(None)));
        }
        assert_eq!(free.cost_usd, 0.0);
        assert_eq!(
            (free.input_tokens, free.output_tokens),
            (1_800_000, 1_200_000)
        );
        assert_eq!(budgets.exceeded(&free, 0), None);

        // $0.50 per million tokens each way: $0.50 a call.
        let priced = model(Some(0.5));
        let mut paid = Spent::new(0);
        paid.add_usage(&usage, usage.cost_usd(&priced));
        assert!((paid.cost_usd - 0.5).abs() < 1e-9, "{}", paid.cost_usd);
        assert_eq!(budgets.exceeded(&paid, 0), None);
        paid.add_usage(&usage, usage.cost_usd(&priced));
        assert!((paid.cost_usd - 1.0).abs() < 1e-9, "{}", paid.cost_usd);
        assert_eq!(
            budgets.exceeded(&paid, 0).map(|e| e.budget()),
            Some("max_cost_usd")
        );
    }

    #[test]
    fn the_same_call_three_times_in_a_row_is_a_loop_whatever_its_key_order() {
        let mut detector = LoopDetector::default();
        assert_eq!(detector.threshold, 3);
        let first = call(
            "c1",
            "read_file",
            r#"{"path":"a.rs","range":{"start":1,"end":9}}"#,
        );
        let reordered = call(
            "c2",
            "read_file",
            r#"{"range":{"end":9,"start":1},"path":"a.rs"}"#,
        );
        let spaced = call(
            "c3",
            "read_file",
            "{ \"range\": { \"start\": 1, \"end\": 9 }, \"path\": \"a.rs\" }",
        );
        assert_eq!(detector.observe(&first), None);
        assert_eq!(detector.observe(&reordered), None);
        let found = detector.observe(&spaced).unwrap();
        assert_eq!(
            found,
            LoopFound {
                tool: "read_file".into(),
                times: 3
            }
        );
        assert_eq!(
            found.to_string(),
            "the model called read_file with the same arguments 3 times in a row"
        );
    }

    #[test]
    fn different_values_or_calls_in_between_reset_the_run() {
        let mut detector = LoopDetector::default();
        let a = call("1", "read_file", r#"{"path":"a.rs"}"#);
        let b = call("2", "read_file", r#"{"path":"b.rs"}"#);
        let a_as_shell = call("3", "shell", r#"{"path":"a.rs"}"#);
        let a_number = call("4", "read_file", r#"{"path":"a.rs","limit":1}"#);
        let a_float = call("5", "read_file", r#"{"path":"a.rs","limit":1.0}"#);
        // a a b, a a shell, a a (limit 1), (limit 1.0) a a: never three in
        // a row.
        for other in [&b, &a_as_shell, &a_number] {
            assert_eq!(detector.observe(&a), None);
            assert_eq!(detector.observe(&a), None);
            assert_eq!(detector.observe(other), None);
        }
        assert_eq!(detector.observe(&a_float), None);
        assert_eq!(detector.observe(&a), None);
        assert_eq!(detector.observe(&a), None);
        assert!(detector.observe(&a).is_some());
        // Once found, the same call again is still a loop; another is not.
        assert_eq!(detector.observe(&a).map(|f| f.times), Some(4));
        assert_eq!(detector.observe(&b), None);
    }

    #[test]
    fn malformed_arguments_are_the_same_only_with_the_same_text() {
        let mut detector = LoopDetector::default();
        let broken = call("1", "shell", r#"{"command": "ls"#);
        let broken_spaced = call("2", "shell", r#"{"command":  "ls"#);
        assert!(matches!(broken.arguments, Arguments::Malformed { .. }));
        // The raw text is not JSON text that happens to be equal.
        let as_json_string = ToolCall {
            id: "3".into(),
            name: "shell".into(),
            arguments: Arguments::Json(Value::String(r#"{"command": "ls"#.into())),
        };
        assert_eq!(detector.observe(&broken), None);
        assert_eq!(detector.observe(&broken), None);
        assert_eq!(detector.observe(&broken_spaced), None);
        assert_eq!(detector.observe(&broken_spaced), None);
        assert_eq!(detector.observe(&as_json_string), None);
        assert_eq!(detector.observe(&broken), None);
        assert_eq!(detector.observe(&broken), None);
        assert_eq!(detector.observe(&broken).map(|f| f.times), Some(3));
    }

    #[test]
    fn the_threshold_is_how_many_in_a_row() {
        let a = call("1", "read_file", r#"{"path":"a.rs"}"#);
        let b = call("2", "read_file", r#"{"path":"b.rs"}"#);
        let mut once = LoopDetector::new(1);
        assert_eq!(once.observe(&a).map(|f| f.times), Some(1));
        assert_eq!(once.observe(&b).map(|f| f.times), Some(1));
        // The calls of one turn are observed one by one.
        let mut three = LoopDetector::new(3);
        let turn = [a.clone(), a.clone(), a.clone()];
        let found: Vec<Option<u32>> = turn
            .iter()
            .map(|c| three.observe(c).map(|f| f.times))
            .collect();
        assert_eq!(found, [None, None, Some(3)]);
        let mut off = LoopDetector::new(0);
        assert!((0..10).all(|_| off.observe(&a).is_none()));
    }

    /// A session's log, written the way the loop writes it (as in the
    /// transcript's own tests).
    struct Log {
        recorder: Recorder,
        live: Transcript,
        entries: Vec<Entry>,
        blobs: HashMap<String, Vec<u8>>,
    }

    impl Log {
        fn new() -> Log {
            Log {
                recorder: Recorder::new("You are careful.", Vec::new(), 4096),
                live: Transcript::default(),
                entries: Vec::new(),
                blobs: HashMap::new(),
            }
        }

        fn write(&mut self, record: Record) {
            record.apply_to(&mut self.live).unwrap();
            for (sha256, data) in record.blobs {
                self.blobs.insert(sha256, data);
            }
            self.entries.push(record.entry);
        }

        /// A request, then an answer calling `results`' calls, then the
        /// results.
        fn turn(&mut self, turn: u32, results: &[(&str, String)]) {
            let (_, request) = self.recorder.model_request(&self.live, turn).unwrap();
            self.write(request);
            let calls: Vec<ToolCall> = results
                .iter()
                .map(|(id, _)| call(id, "read_file", &format!(r#"{{"path":"{id}.rs"}}"#)))
                .collect();
            let response = ModelResponse {
                id: format!("resp-{turn}"),
                model: "m-1".into(),
                text: format!("Turn {turn}."),
                tool_calls: calls,
                stop: StopReason::ToolUse,
                usage: Usage::default(),
            };
            let answer = self.recorder.model_response(&self.live, &response).unwrap();
            self.write(answer);
            for (id, content) in results {
                let result = ToolResult {
                    call_id: (*id).into(),
                    content: content.clone(),
                    is_error: false,
                };
                let record = self.recorder.tool_result(&self.live, &result).unwrap();
                self.write(record);
            }
        }

        fn rebuild(&self) -> Transcript {
            let mut transcript = Transcript::default();
            for entry in &self.entries {
                transcript
                    .apply(entry, &|sha256: &str| self.blobs.get(sha256).cloned())
                    .unwrap();
            }
            transcript
        }
    }

    fn results_of(message: &Message) -> &[ToolResult] {
        match message {
            Message::ToolResults(results) => results,
            other => panic!("not tool results: {other:?}"),
        }
    }

    #[test]
    fn old_large_results_are_cut_and_every_call_keeps_its_result() {
        let big = |c: char| c.to_string().repeat(10_000);
        let mut log = Log::new();
        let user = log
            .recorder
            .user_message(&log.live, "m0", "Look around.")
            .unwrap();
        log.write(user);
        log.turn(0, &[("a", big('a'))]);
        log.turn(1, &[("b", big('b')), ("c", "small".into())]);
        log.turn(2, &[("d", big('d'))]);
        // user, (answer, results) × 3; d's results still pending.
        let before = log.live.messages();
        assert_eq!(before.len(), 7);

        // The last two messages (d's call and result) are kept as they are.
        let (upto, replacement) = elide_old_tool_outputs(&before, 2, 1000).unwrap();
        assert_eq!(upto, 5);
        assert_eq!(replacement.len(), 5);
        for i in [0, 1, 3] {
            assert_eq!(replacement[i], before[i], "message {i}");
        }
        let a = &results_of(&replacement[2])[0];
        assert_eq!(a.call_id, "a");
        assert!(a.content.len() < 1100, "{}", a.content.len());
        assert!(a.content.starts_with(&"a".repeat(500)), "{}", a.content);
        assert!(a.content.ends_with(&"a".repeat(500)), "{}", a.content);
        assert!(a.content.contains("[… 9000 bytes cut …]"), "{}", a.content);
        let bc = results_of(&replacement[4]);
        let ids: Vec<&str> = bc.iter().map(|r| r.call_id.as_str()).collect();
        assert_eq!(ids, ["b", "c"]);
        assert!(bc[0].content.contains("bytes cut"), "{}", bc[0].content);
        assert_eq!(bc[1].content, "small");

        // It is a compaction the transcript takes, and a replay rebuilds.
        let record = log
            .recorder
            .compaction(&log.live, upto, &replacement)
            .unwrap();
        log.write(record);
        let after = log.live.messages();
        assert_eq!(after.len(), 7);
        assert_eq!(&after[..5], &replacement[..]);
        assert_eq!(&after[5..], &before[5..]);
        assert_eq!(results_of(&after[6])[0].content, big('d'));
        assert!(estimate_tokens(&after) < estimate_tokens(&before));

        let (request, record) = log.recorder.model_request(&log.live, 3).unwrap();
        log.write(record);
        assert_eq!(request.messages, after);
        let Some(Entry::ModelRequested { request_sha256, .. }) = log.entries.last() else {
            panic!("the last entry is the request: {:?}", log.entries.last());
        };
        assert_eq!(*request_sha256, request_hash(&request));
        let rebuilt = log.rebuild();
        assert_eq!(rebuilt, log.live);
        let again = log.recorder.rerender(&rebuilt, request_sha256).unwrap();
        assert_eq!(
            serde_json::to_vec(&again).unwrap(),
            serde_json::to_vec(&request).unwrap()
        );

        // Compacting again changes nothing: the cut results stay as cut.
        assert_eq!(elide_old_tool_outputs(&after, 2, 1000), None);
    }

    #[test]
    fn nothing_to_cut_is_none() {
        let messages = vec![
            Message::User("Start.".into()),
            Message::Assistant {
                text: String::new(),
                tool_calls: vec![call("a", "read_file", r#"{"path":"a.rs"}"#)],
            },
            Message::ToolResults(vec![ToolResult {
                call_id: "a".into(),
                content: "x".repeat(5000),
                is_error: true,
            }]),
        ];
        // Within the budget, or among the messages kept.
        assert_eq!(elide_old_tool_outputs(&messages, 0, 5000), None);
        assert_eq!(elide_old_tool_outputs(&messages, 1, 100), None);
        assert_eq!(elide_old_tool_outputs(&messages, 10, 100), None);
        assert_eq!(elide_old_tool_outputs(&[], 0, 100), None);
        // Over the budget by less than the marker would add: not worth it.
        assert_eq!(elide_old_tool_outputs(&messages, 0, 4990), None);
        // Otherwise cut, its error flag kept.
        let (upto, replacement) = elide_old_tool_outputs(&messages, 0, 100).unwrap();
        assert_eq!(upto, 3);
        let cut = &results_of(&replacement[2])[0];
        assert!(cut.is_error);
        assert!(
            cut.content.contains("[… 4900 bytes cut …]"),
            "{}",
            cut.content
        );
    }

    #[test]
    fn tokens_are_estimated_from_the_json_and_compaction_is_due_at_80_percent() {
        let messages = vec![Message::User("x".repeat(4000))];
        let json = serde_json::to_vec(&messages).unwrap();
        assert_eq!(estimate_tokens(&messages), (json.len() as u64).div_ceil(4));
        assert!((1000..1010).contains(&estimate_tokens(&messages)));
        assert_eq!(estimate_tokens(&[]), 1);

        // 100k window, 10k answer: due once the input passes 70k.
        let m = model(None);
        assert!(!needs_compaction(0, &m));
        assert!(!needs_compaction(70_000, &m));
        assert!(needs_compaction(70_001, &m));
        assert!(needs_compaction(u64::MAX, &m));
    }
}
