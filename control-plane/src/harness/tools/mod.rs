//! The tools a session's model may call: the built-in sandbox tools
//! ([`builtin`]) and the tools a task's client declares, each with the JSON
//! Schema (draft 2020-12) of its arguments, compiled once, when the
//! [`Registry`] is built.
//!
//! A call is validated before anything else happens to it. An unknown
//! name, arguments that are not JSON, JSON that does not fit the schema,
//! or a built-in's arguments that do not make sense become a
//! [`ToolError`], whose text goes back to the model as the call's result
//! (`is_error`) so it can correct itself: nothing the model sends ends the
//! session. A valid call to a built-in is an [`Action`], which the loop
//! asks the guard about ([`Action::policy_requests`]: the same requests the
//! API makes for the same thing) and then carries out through the agent.
//! [`text`] has the text work the tools need (an exact edit, a range of
//! lines, output kept to its head and tail).

pub mod builtin;
pub mod text;

use std::fmt::{self, Write as _};

use serde_json::Value;

use super::providers::{Arguments, ToolCall, ToolResult, ToolSpec};

pub use builtin::{Action, Builtin, PolicyRequest, MAX_TIMEOUT_SECS, WORKSPACE};

/// The longest tool name the providers accept.
const MAX_NAME_CHARS: usize = 64;
/// The most schema violations one error lists.
const MAX_VIOLATIONS: usize = 10;
/// One listed violation is cut to this many bytes (the value it quotes may
/// be megabytes).
const MAX_VIOLATION_BYTES: usize = 300;
/// A tool name the model sent, as quoted back to it, is cut to this many
/// bytes.
const MAX_QUOTED_NAME_BYTES: usize = 100;
/// The JSON parser's complaint, as quoted back, is cut to this many bytes.
const MAX_QUOTED_ERROR_BYTES: usize = 500;
/// Why a schema does not compile is cut to this many bytes.
const MAX_SCHEMA_ERROR_BYTES: usize = 1000;

/// A tool the model may call.
#[derive(Debug, Clone, PartialEq)]
pub struct Tool {
    pub name: String,
    /// What the model is told it does.
    pub description: String,
    /// The JSON Schema (draft 2020-12) of its arguments: an object schema.
    pub schema: Value,
    pub kind: ToolKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolKind {
    /// Carried out by bridle in the sandbox, through the agent.
    Sandbox(Builtin),
    /// Declared by the task's client, which carries it out and sends the
    /// result.
    Client,
}

/// A call that passed validation.
#[derive(Debug, Clone, PartialEq)]
pub enum Valid {
    /// A built-in, and what it will do.
    Sandbox {
        call_id: String,
        tool: Builtin,
        action: Action,
    },
    /// A client's tool, with arguments that fit its schema.
    Client {
        call_id: String,
        name: String,
        arguments: Value,
    },
}

/// Why a call was not valid. Its text is written for the model, which gets
/// it as the call's result ([`ToolError::to_result`]); every part it quotes
/// from the call is bounded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ToolError {
    #[error("there is no tool named {name:?}; the tools you may use are: {available}")]
    UnknownTool {
        name: String,
        /// The registry's tool names, comma-separated ("none" for none).
        available: String,
    },
    #[error(
        "the arguments of {tool} are not valid JSON ({error}); send them again as one JSON \
         object that fits the tool's schema"
    )]
    Malformed { tool: String, error: String },
    #[error("the arguments of {tool} do not fit its schema:\n{violations}")]
    Invalid {
        tool: String,
        /// One line per violation: `- /pointer: what is wrong`.
        violations: String,
    },
    /// Arguments that fit the schema but not the tool (a path outside the
    /// workspace, lines backwards, …).
    #[error("{tool}: {message}")]
    Rejected { tool: String, message: String },
}

impl ToolError {
    /// The call's result that tells the model what was wrong.
    pub fn to_result(&self, call_id: &str) -> ToolResult {
        ToolResult {
            call_id: call_id.to_string(),
            content: self.to_string(),
            is_error: true,
        }
    }
}

/// Why a tool cannot be registered: a startup error for the built-ins, the
/// client's error for a tool it declares.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    #[error("tool name {name:?} is not allowed: a tool name is 1 to 64 of a-z, A-Z, 0-9, _ and -")]
    BadName { name: String },
    #[error("tool {name:?} has the name of a built-in tool; choose another name")]
    Reserved { name: String },
    #[error("tool {name:?} is declared twice")]
    Duplicate { name: String },
    #[error(
        "the schema of tool {name:?} is not an object schema: the arguments of a tool are an \
         object, so its schema must say \"type\": \"object\""
    )]
    NotObject { name: String },
    #[error("the schema of tool {name:?} does not compile: {error}")]
    Schema { name: String, error: String },
    #[error("default_timeout_secs is {secs}; it must be 1 to {max}", max = MAX_TIMEOUT_SECS)]
    DefaultTimeout { secs: u32 },
}

/// The tools of one session, their schemas compiled.
#[derive(Debug, Clone)]
pub struct Registry {
    tools: Vec<Entry>,
    /// How long a command may run when its call does not say.
    default_timeout_secs: u32,
}

#[derive(Debug, Clone)]
struct Entry {
    tool: Tool,
    validator: jsonschema::Validator,
}

impl Registry {
    /// A registry of `builtins`; `default_timeout_secs` is how long a
    /// command may run when its call does not say.
    pub fn new(builtins: &[Builtin], default_timeout_secs: u32) -> Result<Self, RegistryError> {
        if !(1..=MAX_TIMEOUT_SECS).contains(&default_timeout_secs) {
            return Err(RegistryError::DefaultTimeout {
                secs: default_timeout_secs,
            });
        }
        let mut registry = Registry {
            tools: Vec::new(),
            default_timeout_secs,
        };
        for &builtin in builtins {
            if registry.get(builtin.name()).is_some() {
                return Err(RegistryError::Duplicate {
                    name: builtin.name().to_string(),
                });
            }
            registry.insert(Tool {
                name: builtin.name().to_string(),
                description: builtin.description(default_timeout_secs),
                schema: builtin.schema(default_timeout_secs),
                kind: ToolKind::Sandbox(builtin),
            })?;
        }
        Ok(registry)
    }

    /// Adds a tool the task's client declared, which the client carries
    /// out. Its name must be one the providers accept and not a built-in's
    /// (even one this registry leaves out) or another tool's; its schema
    /// must be an object schema that compiles (draft 2020-12; a `$ref` to
    /// anything outside the schema itself does not resolve).
    pub fn add_client_tool(
        &mut self,
        name: &str,
        description: &str,
        schema: Value,
    ) -> Result<(), RegistryError> {
        let quoted_name = || clip(name, MAX_QUOTED_NAME_BYTES);
        if !is_valid_name(name) {
            return Err(RegistryError::BadName {
                name: quoted_name(),
            });
        }
        if Builtin::from_name(name).is_some() {
            return Err(RegistryError::Reserved {
                name: quoted_name(),
            });
        }
        if self.get(name).is_some() {
            return Err(RegistryError::Duplicate {
                name: quoted_name(),
            });
        }
        if schema.get("type").and_then(Value::as_str) != Some("object") {
            return Err(RegistryError::NotObject {
                name: quoted_name(),
            });
        }
        self.insert(Tool {
            name: name.to_string(),
            description: description.to_string(),
            schema,
            kind: ToolKind::Client,
        })
    }

    fn insert(&mut self, tool: Tool) -> Result<(), RegistryError> {
        // Offline: a `$ref` resolves within the schema or not at all.
        let compiled = jsonschema::draft202012::options()
            .offline()
            .build(&tool.schema);
        let validator = compiled.map_err(|e| {
            let pointer = e.instance_path().as_str();
            let error = bounded(MAX_SCHEMA_ERROR_BYTES, |w| {
                if pointer.is_empty() {
                    write!(w, "{e}")
                } else {
                    write!(w, "at {pointer}: {e}")
                }
            });
            RegistryError::Schema {
                name: tool.name.clone(),
                error,
            }
        })?;
        self.tools.push(Entry { tool, validator });
        Ok(())
    }

    /// The tools as the model is told of them, in the order registered.
    pub fn specs(&self) -> Vec<ToolSpec> {
        self.tools
            .iter()
            .map(|entry| ToolSpec {
                name: entry.tool.name.clone(),
                description: entry.tool.description.clone(),
                parameters: entry.tool.schema.clone(),
            })
            .collect()
    }

    pub fn get(&self, name: &str) -> Option<&Tool> {
        self.entry(name).map(|entry| &entry.tool)
    }

    pub fn names(&self) -> Vec<&str> {
        self.tools
            .iter()
            .map(|entry| entry.tool.name.as_str())
            .collect()
    }

    fn entry(&self, name: &str) -> Option<&Entry> {
        self.tools.iter().find(|entry| entry.tool.name == name)
    }

    /// Checks a call: its tool exists, its arguments are JSON that fits the
    /// tool's schema, and, for a built-in, they make sense to it.
    pub fn validate(&self, call: &ToolCall) -> Result<Valid, ToolError> {
        let Some(entry) = self.entry(&call.name) else {
            let names = self.names();
            return Err(ToolError::UnknownTool {
                name: clip(&call.name, MAX_QUOTED_NAME_BYTES),
                available: if names.is_empty() {
                    "none".to_string()
                } else {
                    names.join(", ")
                },
            });
        };
        let tool = &entry.tool;
        let arguments = match &call.arguments {
            Arguments::Json(value) => value,
            Arguments::Malformed { error, .. } => {
                return Err(ToolError::Malformed {
                    tool: tool.name.clone(),
                    error: clip(error, MAX_QUOTED_ERROR_BYTES),
                })
            }
        };
        if let Some(violations) = violations(&entry.validator, arguments) {
            return Err(ToolError::Invalid {
                tool: tool.name.clone(),
                violations,
            });
        }
        match tool.kind {
            ToolKind::Sandbox(builtin) => Ok(Valid::Sandbox {
                call_id: call.id.clone(),
                tool: builtin,
                action: builtin.action(arguments, self.default_timeout_secs)?,
            }),
            ToolKind::Client => Ok(Valid::Client {
                call_id: call.id.clone(),
                name: tool.name.clone(),
                arguments: arguments.clone(),
            }),
        }
    }
}

/// The providers' rule for tool names: `^[a-zA-Z0-9_-]{1,64}$`.
fn is_valid_name(name: &str) -> bool {
    (1..=MAX_NAME_CHARS).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Where `arguments` do not fit the schema, one line per violation with its
/// JSON pointer (`(root)` for the arguments object itself), at most
/// [`MAX_VIOLATIONS`] of them and each bounded; none when they fit.
fn violations(validator: &jsonschema::Validator, arguments: &Value) -> Option<String> {
    let mut text = String::new();
    let mut listed = 0usize;
    let mut more = 0usize;
    for error in validator.iter_errors(arguments) {
        if listed == MAX_VIOLATIONS {
            more += 1;
            continue;
        }
        listed += 1;
        let pointer = error.instance_path().as_str();
        let at = if pointer.is_empty() {
            "(root)"
        } else {
            pointer
        };
        let line = bounded(MAX_VIOLATION_BYTES, |w| write!(w, "- {at}: {error}"));
        if !text.is_empty() {
            text.push('\n');
        }
        text.push_str(&line);
    }
    if listed == 0 {
        return None;
    }
    if more > 0 {
        let _ = write!(text, "\n- … and {more} more");
    }
    Some(text)
}

/// At most `limit` bytes of `text` (cut at a character boundary, `…`
/// added when cut).
fn clip(text: &str, limit: usize) -> String {
    bounded(limit, |w| w.write_str(text))
}

/// What `write` writes, cut to at most `limit` bytes (at a character
/// boundary, `…` added when cut). Writing stops at the limit, so a value
/// of megabytes is never formatted whole.
fn bounded(limit: usize, write: impl FnOnce(&mut Bounded) -> fmt::Result) -> String {
    let mut out = Bounded {
        text: String::new(),
        limit,
        cut: false,
    };
    // An error here is only the limit being reached.
    let _ = write(&mut out);
    if out.cut {
        out.text.push('…');
    }
    out.text
}

/// A `fmt::Write` that keeps at most `limit` bytes and then refuses more.
struct Bounded {
    text: String,
    limit: usize,
    cut: bool,
}

impl fmt::Write for Bounded {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let room = self.limit.saturating_sub(self.text.len());
        if s.len() <= room {
            self.text.push_str(s);
            return Ok(());
        }
        let mut end = room;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        self.text.push_str(&s[..end]);
        self.cut = true;
        Err(fmt::Error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runs::job::Command;
    use serde_json::json;

    fn registry() -> Registry {
        Registry::new(&Builtin::ALL, 600).unwrap()
    }

    fn call(name: &str, arguments: Value) -> ToolCall {
        ToolCall {
            id: "call_1".into(),
            name: name.into(),
            arguments: Arguments::Json(arguments),
        }
    }

    fn error_of(registry: &Registry, call: &ToolCall) -> String {
        match registry.validate(call) {
            Ok(valid) => panic!("{call:?} was accepted: {valid:?}"),
            Err(e) => e.to_string(),
        }
    }

    fn question_schema() -> Value {
        json!({
            "type": "object",
            "properties": {"question": {"type": "string"}},
            "required": ["question"],
            "additionalProperties": false
        })
    }

    #[test]
    fn the_specs_are_the_builtins_with_valid_object_schemas_that_round_trip() {
        let registry = registry();
        let specs = registry.specs();
        let names: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
        let builtins: Vec<&str> = Builtin::ALL.iter().map(|b| b.name()).collect();
        assert_eq!(names, builtins);
        for spec in &specs {
            assert!(
                jsonschema::draft202012::meta::is_valid(&spec.parameters),
                "{}: {}",
                spec.name,
                spec.parameters
            );
            assert_eq!(spec.parameters["type"], "object", "{}", spec.name);
            assert_eq!(
                spec.parameters["additionalProperties"], false,
                "{}",
                spec.name
            );
            assert!(
                spec.description.contains(WORKSPACE),
                "{}: {}",
                spec.name,
                spec.description
            );
            let json = serde_json::to_string(spec).unwrap();
            let back: ToolSpec = serde_json::from_str(&json).unwrap();
            assert_eq!(&back, spec);
            let tool = registry.get(&spec.name).unwrap();
            assert_eq!(tool.schema, spec.parameters);
            assert_eq!(
                tool.kind,
                ToolKind::Sandbox(Builtin::from_name(&spec.name).unwrap())
            );
        }
        // The default timeout is what the model is told.
        let shell = registry.get("shell").unwrap();
        assert_eq!(shell.schema["properties"]["timeout_secs"]["default"], 600);
        assert!(shell.description.contains("default 600"));
    }

    #[test]
    fn a_valid_call_is_its_action() {
        let valid = registry()
            .validate(&call("shell", json!({"command": "ls -la"})))
            .unwrap();
        assert_eq!(
            valid,
            Valid::Sandbox {
                call_id: "call_1".into(),
                tool: Builtin::Shell,
                action: Action::Exec {
                    command: Command::Shell("ls -la".into()),
                    timeout_secs: 600
                }
            }
        );
    }

    #[test]
    fn every_argument_a_schema_allows_is_one_its_typed_arguments_take() {
        // Every property of every built-in, through the schema and the
        // typed arguments (deny_unknown_fields) alike.
        let registry = registry();
        let calls = [
            ("shell", json!({"command": "ls", "timeout_secs": 10})),
            (
                "read_file",
                json!({"path": "a", "start_line": 1, "end_line": 2}),
            ),
            ("write_file", json!({"path": "a", "content": "x"})),
            (
                "edit_file",
                json!({"path": "a", "old_string": "x", "new_string": "y", "replace_all": true}),
            ),
            ("list_dir", json!({"path": "src"})),
            ("find_files", json!({"pattern": "*.rs", "path": "src"})),
            (
                "search_files",
                json!({"pattern": "fn main", "path": "src", "glob": "*.rs"}),
            ),
        ];
        assert_eq!(calls.len(), Builtin::ALL.len());
        for (name, arguments) in calls {
            match registry.validate(&call(name, arguments)) {
                Ok(Valid::Sandbox { tool, .. }) => assert_eq!(tool.name(), name),
                other => panic!("{name}: {other:?}"),
            }
        }
    }

    #[test]
    fn an_unknown_tool_is_told_the_tools_it_may_use() {
        let registry = Registry::new(&[Builtin::Shell, Builtin::ReadFile], 600).unwrap();
        let error = registry
            .validate(&call("bash", json!({"command": "ls"})))
            .unwrap_err();
        assert_eq!(
            error.to_string(),
            "there is no tool named \"bash\"; the tools you may use are: shell, read_file"
        );
        let result = error.to_result("call_9");
        assert!(result.is_error);
        assert_eq!(result.call_id, "call_9");
        assert_eq!(result.content, error.to_string());
        // A built-in left out of the registry is unknown too; a long name is
        // quoted back cut.
        let message = error_of(&registry, &call("write_file", json!({})));
        assert!(
            message.contains("no tool named \"write_file\""),
            "{message}"
        );
        let message = error_of(&registry, &call(&"x".repeat(10_000), json!({})));
        assert!(message.len() < 300, "{message}");
        let empty = Registry::new(&[], 600).unwrap();
        assert!(error_of(&empty, &call("shell", json!({}))).ends_with("you may use are: none"));
    }

    #[test]
    fn malformed_arguments_are_told_the_parsers_complaint() {
        let arguments = Arguments::parse("{\"command\": \"ls".to_string());
        let Arguments::Malformed { error, .. } = &arguments else {
            panic!("{arguments:?} parsed");
        };
        let message = error_of(
            &registry(),
            &ToolCall {
                id: "call_1".into(),
                name: "shell".into(),
                arguments: arguments.clone(),
            },
        );
        assert!(
            message.starts_with("the arguments of shell are not valid JSON ("),
            "{message}"
        );
        assert!(message.contains(error.as_str()), "{message}");
    }

    #[test]
    fn schema_violations_are_listed_with_their_pointers() {
        let registry = registry();
        let cases = [
            (
                call("shell", json!({})),
                "- (root): \"command\" is a required property",
            ),
            (
                call("shell", json!({"command": 5})),
                "- /command: 5 is not of type \"string\"",
            ),
            (
                call("shell", json!({"command": ""})),
                "- /command: \"\" is shorter than 1 character",
            ),
            (
                call("shell", json!({"command": "ls", "timeout_secs": -1})),
                "- /timeout_secs: -1 is less than the minimum of 1",
            ),
            (
                call("shell", json!({"command": "ls", "timeout_secs": 7200})),
                "- /timeout_secs: 7200 is greater than the maximum of 3600",
            ),
            (
                call("shell", json!({"command": "ls", "timeout_secs": "10"})),
                "- /timeout_secs: \"10\" is not of type \"integer\"",
            ),
            (
                call("shell", json!({"command": "ls", "cwd": "/"})),
                "- (root): Additional properties are not allowed ('cwd' was unexpected)",
            ),
            (
                call("read_file", json!({"path": "a", "start_line": 0})),
                "- /start_line: 0 is less than the minimum of 1",
            ),
            (
                call("edit_file", json!({"path": "a", "old_string": "x"})),
                "- (root): \"new_string\" is a required property",
            ),
            (
                call("shell", json!(["ls"])),
                "- (root): [\"ls\"] is not of type \"object\"",
            ),
        ];
        for (call, line) in cases {
            let message = error_of(&registry, &call);
            let header = format!("the arguments of {} do not fit its schema:\n", call.name);
            assert!(message.starts_with(&header), "{message}");
            assert!(
                message.lines().any(|l| l == line),
                "{line:?} not in {message:?}"
            );
        }
        // Every violation is listed, not only the first.
        let message = error_of(
            &registry,
            &call("shell", json!({"command": 1, "timeout_secs": 0, "x": 1})),
        );
        assert_eq!(message.lines().count(), 4, "{message}");
    }

    #[test]
    fn violations_are_bounded() {
        let mut registry = registry();
        let properties: serde_json::Map<String, Value> = (0..20)
            .map(|i| (format!("p{i}"), json!({"type": "integer"})))
            .collect();
        registry
            .add_client_tool(
                "many",
                "Twenty numbers.",
                json!({"type": "object", "properties": properties}),
            )
            .unwrap();
        let arguments: serde_json::Map<String, Value> = (0..20)
            .map(|i| (format!("p{i}"), json!("x".repeat(100_000))))
            .collect();
        let message = error_of(&registry, &call("many", Value::Object(arguments)));
        assert!(message.ends_with("\n- … and 10 more"), "{message}");
        assert_eq!(message.lines().count(), 12, "{message}");
        assert!(message.len() < 4_000, "{} bytes", message.len());
        assert!(message.contains("…\n"), "each long line is cut: {message}");
    }

    #[test]
    fn arguments_that_fit_the_schema_but_not_the_tool_are_refused_by_it() {
        let message = error_of(
            &registry(),
            &call("read_file", json!({"path": "../../etc/shadow"})),
        );
        assert!(message.starts_with("read_file: path"), "{message}");
        assert!(message.contains(".. component"), "{message}");
    }

    #[test]
    fn client_tools_are_validated_by_their_own_schema() {
        let mut registry = registry();
        registry
            .add_client_tool("ask_user", "Ask the user a question.", question_schema())
            .unwrap();
        assert_eq!(registry.get("ask_user").unwrap().kind, ToolKind::Client);
        assert_eq!(registry.specs().len(), Builtin::ALL.len() + 1);
        assert_eq!(
            registry
                .validate(&call("ask_user", json!({"question": "Which branch?"})))
                .unwrap(),
            Valid::Client {
                call_id: "call_1".into(),
                name: "ask_user".into(),
                arguments: json!({"question": "Which branch?"})
            }
        );
        let message = error_of(&registry, &call("ask_user", json!({"question": 1})));
        assert!(
            message.contains("- /question: 1 is not of type \"string\""),
            "{message}"
        );
    }

    #[test]
    fn a_client_tool_may_not_take_a_builtin_or_taken_or_bad_name() {
        let mut registry = Registry::new(&[Builtin::Shell], 600).unwrap();
        // Every built-in's name is reserved, even one left out here.
        for name in ["shell", "write_file"] {
            let error = registry
                .add_client_tool(name, "", question_schema())
                .unwrap_err();
            assert_eq!(
                error,
                RegistryError::Reserved {
                    name: name.to_string()
                }
            );
            assert!(error.to_string().contains(&format!("{name:?}")), "{error}");
        }
        registry
            .add_client_tool("ask", "", question_schema())
            .unwrap();
        assert_eq!(
            registry.add_client_tool("ask", "", question_schema()),
            Err(RegistryError::Duplicate { name: "ask".into() })
        );
        let too_long = "x".repeat(65);
        for name in ["", "has space", "dot.ted", "é", too_long.as_str()] {
            assert!(
                matches!(
                    registry.add_client_tool(name, "", question_schema()),
                    Err(RegistryError::BadName { .. })
                ),
                "{name:?}"
            );
        }
        registry
            .add_client_tool(&"x".repeat(64), "", question_schema())
            .unwrap();
        registry
            .add_client_tool("A-z_0-9", "", question_schema())
            .unwrap();
    }

    #[test]
    fn a_client_schema_must_be_an_object_schema_that_compiles() {
        let mut registry = registry();
        for schema in [
            json!({"type": "string"}),
            json!({"properties": {}}),
            json!(true),
            json!({"type": ["object"]}),
        ] {
            assert_eq!(
                registry.add_client_tool("t", "", schema),
                Err(RegistryError::NotObject { name: "t".into() })
            );
        }
        let error = registry
            .add_client_tool(
                "broken",
                "",
                json!({"type": "object", "properties": {"x": {"type": "no-such-type"}}}),
            )
            .unwrap_err();
        assert!(
            matches!(&error, RegistryError::Schema { name, .. } if name == "broken"),
            "{error:?}"
        );
        assert!(
            error
                .to_string()
                .starts_with("the schema of tool \"broken\" does not compile: "),
            "{error}"
        );
        // Nothing is fetched: a remote $ref does not resolve.
        let error = registry
            .add_client_tool(
                "remote",
                "",
                json!({"type": "object", "$ref": "https://example.com/schema.json"}),
            )
            .unwrap_err();
        assert!(
            matches!(&error, RegistryError::Schema { name, .. } if name == "remote"),
            "{error:?}"
        );
        assert!(registry.get("broken").is_none() && registry.get("remote").is_none());
    }

    #[test]
    fn the_default_timeout_must_be_one_a_call_could_give() {
        assert_eq!(
            Registry::new(&Builtin::ALL, 0).unwrap_err(),
            RegistryError::DefaultTimeout { secs: 0 }
        );
        assert!(Registry::new(&Builtin::ALL, 3601).is_err());
        assert!(Registry::new(&Builtin::ALL, 3600).is_ok());
        assert_eq!(
            Registry::new(&[Builtin::Shell, Builtin::Shell], 60).unwrap_err(),
            RegistryError::Duplicate {
                name: "shell".into()
            }
        );
    }

    #[test]
    fn clipping_keeps_whole_characters() {
        assert_eq!(clip("abc", 3), "abc");
        assert_eq!(clip("abcd", 3), "abc…");
        assert_eq!(clip("aé", 2), "a…");
        assert_eq!(clip("😀", 3), "…");
    }
}
