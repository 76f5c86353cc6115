//! The built-in sandbox tools: their schemas and descriptions for the
//! model, their typed arguments, what a call will do ([`Action`]), and the
//! policy requests it is ([`Action::policy_requests`]).
//!
//! A tool call is never more than what the API already lets a caller do,
//! and is decided the same way: `shell` is an `exec` of its command line,
//! on the facts `Sandboxes.Exec` gives that shell string; the file tools are
//! `file.read` and `file.write` of their path, as `ReadFile` and
//! `WriteFile` are. Listing, finding and searching are reads of their
//! directory, carried out as an exec of a fixed program (`ls`, `find`,
//! `grep`) with an argv bridle writes: the model's pattern and path are
//! each one argument, never shell text, and never taken for an option.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::text::{EditError, LineRangeError};
use super::{clip, ToolError};
use crate::guard::facts;
use crate::policy::{self, Facts};
use crate::runs::job::Command;

/// The sandbox's workspace: where commands start, and what tool paths are
/// relative to.
pub const WORKSPACE: &str = "/workspace";
/// The longest a command may run.
pub const MAX_TIMEOUT_SECS: u32 = 3600;
/// A path the model gave, as quoted back to it, is cut to this many bytes.
const MAX_QUOTED_PATH_BYTES: usize = 200;

/// The tools bridle itself carries out in a session's sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Builtin {
    Shell,
    ReadFile,
    WriteFile,
    EditFile,
    ListDir,
    FindFiles,
    SearchFiles,
}

impl Builtin {
    pub const ALL: [Builtin; 7] = [
        Builtin::Shell,
        Builtin::ReadFile,
        Builtin::WriteFile,
        Builtin::EditFile,
        Builtin::ListDir,
        Builtin::FindFiles,
        Builtin::SearchFiles,
    ];

    /// The name the model calls it by.
    pub fn name(self) -> &'static str {
        match self {
            Builtin::Shell => "shell",
            Builtin::ReadFile => "read_file",
            Builtin::WriteFile => "write_file",
            Builtin::EditFile => "edit_file",
            Builtin::ListDir => "list_dir",
            Builtin::FindFiles => "find_files",
            Builtin::SearchFiles => "search_files",
        }
    }

    pub fn from_name(name: &str) -> Option<Builtin> {
        Builtin::ALL.into_iter().find(|b| b.name() == name)
    }

    /// What the model is told the tool does, its limits included.
    /// `default_timeout_secs`: how long a command may run when the call
    /// does not say.
    pub fn description(self, default_timeout_secs: u32) -> String {
        match self {
            Builtin::Shell => format!(
                "Run a command in the sandbox and get its exit status and its output \
                 (stdout and stderr). The command runs with /bin/sh -c in {WORKSPACE}, with \
                 no terminal and no input; the sandbox has a POSIX shell and the tools of its \
                 image (busybox in the default one). Use it to build, test and run programs. \
                 Long output keeps its beginning and its end, with a note of how much was cut. \
                 The command is stopped after timeout_secs (default {default_timeout_secs}, \
                 at most {MAX_TIMEOUT_SECS}). Every command is checked against the sandbox's \
                 policy: it may be refused, or wait for a person's approval."
            ),
            Builtin::ReadFile => format!(
                "Read a text file of the workspace. path is relative to {WORKSPACE} (an \
                 absolute path must start with {WORKSPACE}/). start_line and end_line \
                 (1-based, inclusive) read part of a long file; without them the whole file \
                 is read. A long result keeps its beginning and its end, with a note of how \
                 much was cut."
            ),
            Builtin::WriteFile => format!(
                "Create a file of the workspace, or replace all of an existing one, with \
                 content; missing parent directories are created. path is relative to \
                 {WORKSPACE}. To change part of a file, use edit_file."
            ),
            Builtin::EditFile => format!(
                "Change part of a file of the workspace: old_string is replaced by \
                 new_string. old_string must match the file exactly (whitespace and \
                 indentation included) and only once: give enough of the surrounding lines \
                 to make it unique, or set replace_all to replace every occurrence. path is \
                 relative to {WORKSPACE}."
            ),
            Builtin::ListDir => format!(
                "List a directory of the workspace (ls -lA): the names of its entries with \
                 their type, permissions, size and time. path is relative to {WORKSPACE} \
                 (default: {WORKSPACE} itself)."
            ),
            Builtin::FindFiles => format!(
                "Find files and directories, at any depth under path (relative to \
                 {WORKSPACE}; default: all of it), whose name matches pattern, a glob as \
                 find -name takes it: * and ? and [...] match within one name, as in *.rs \
                 or test_*. The pattern matches names, not paths: to look in one directory, \
                 give it as path. Long results keep their beginning and their end."
            ),
            Builtin::SearchFiles => format!(
                "Search the contents of files for pattern, a regular expression (POSIX \
                 extended, as grep -E), under path (a directory or a file, relative to \
                 {WORKSPACE}; default: all of it), and get the matching lines as \
                 file:line:text. glob limits the search to files whose name matches it, as \
                 in *.py. Long results keep their beginning and their end."
            ),
        }
    }

    /// The JSON Schema (draft 2020-12) of the tool's arguments.
    pub fn schema(self, default_timeout_secs: u32) -> Value {
        match self {
            Builtin::Shell => object(
                json!({
                    "command": {
                        "type": "string",
                        "minLength": 1,
                        "description": "The command line, as you would type it into sh."
                    },
                    "timeout_secs": {
                        "type": "integer",
                        "minimum": 1,
                        "maximum": MAX_TIMEOUT_SECS,
                        "default": default_timeout_secs,
                        "description": "Stop the command after this many seconds."
                    }
                }),
                &["command"],
            ),
            Builtin::ReadFile => object(
                json!({
                    "path": path_property("The file to read."),
                    "start_line": {
                        "type": "integer",
                        "minimum": 1,
                        "description": "The first line to read (1-based; default: 1)."
                    },
                    "end_line": {
                        "type": "integer",
                        "minimum": 1,
                        "description": "The last line to read, included (default: the last \
                                        line of the file)."
                    }
                }),
                &["path"],
            ),
            Builtin::WriteFile => object(
                json!({
                    "path": path_property("The file to write."),
                    "content": {
                        "type": "string",
                        "description": "The whole new content of the file."
                    }
                }),
                &["path", "content"],
            ),
            Builtin::EditFile => object(
                json!({
                    "path": path_property("The file to change."),
                    "old_string": {
                        "type": "string",
                        "minLength": 1,
                        "description": "The exact text to replace."
                    },
                    "new_string": {
                        "type": "string",
                        "description": "The text to put in its place."
                    },
                    "replace_all": {
                        "type": "boolean",
                        "default": false,
                        "description": "Replace every occurrence of old_string, not only one."
                    }
                }),
                &["path", "old_string", "new_string"],
            ),
            Builtin::ListDir => object(
                json!({
                    "path": path_property("The directory to list (default: .).")
                }),
                &[],
            ),
            Builtin::FindFiles => object(
                json!({
                    "pattern": {
                        "type": "string",
                        "minLength": 1,
                        "description": "A glob matched against each name, e.g. *.rs."
                    },
                    "path": path_property("The directory to search (default: .).")
                }),
                &["pattern"],
            ),
            Builtin::SearchFiles => object(
                json!({
                    "pattern": {
                        "type": "string",
                        "minLength": 1,
                        "description": "A POSIX extended regular expression (grep -E)."
                    },
                    "path": path_property("The directory or file to search (default: .)."),
                    "glob": {
                        "type": "string",
                        "minLength": 1,
                        "description": "Search only files whose name matches this glob, \
                                        e.g. *.py."
                    }
                }),
                &["pattern"],
            ),
        }
    }

    /// What a call with `arguments` (already checked against the schema)
    /// will do. The typed arguments refuse what the schema cannot say: a
    /// path outside the workspace, lines backwards, an edit that changes
    /// nothing. `default_timeout_secs` is the limit of a command whose call
    /// gives none.
    pub fn action(self, arguments: &Value, default_timeout_secs: u32) -> Result<Action, ToolError> {
        match self {
            Builtin::Shell => {
                let args: ShellArgs = self.parse(arguments)?;
                if args.command.trim().is_empty() {
                    return Err(self.reject("command is empty"));
                }
                let timeout_secs = args.timeout_secs.unwrap_or(default_timeout_secs);
                if !(1..=MAX_TIMEOUT_SECS).contains(&timeout_secs) {
                    return Err(
                        self.reject(format!("timeout_secs must be 1 to {MAX_TIMEOUT_SECS}"))
                    );
                }
                Ok(Action::Exec {
                    command: Command::Shell(args.command),
                    timeout_secs,
                })
            }
            Builtin::ReadFile => {
                let args: ReadFileArgs = self.parse(arguments)?;
                let path = self.file_path(&args.path)?;
                let lines = match (args.start_line, args.end_line) {
                    (None, None) => None,
                    (start, end) => {
                        let start = start.unwrap_or(1);
                        let end = end.unwrap_or(u64::MAX);
                        if start == 0 || end == 0 {
                            return Err(self.reject(LineRangeError::Zero.to_string()));
                        }
                        if end < start {
                            return Err(
                                self.reject(LineRangeError::Backwards { start, end }.to_string())
                            );
                        }
                        Some((start, end))
                    }
                };
                Ok(Action::ReadFile { path, lines })
            }
            Builtin::WriteFile => {
                let args: WriteFileArgs = self.parse(arguments)?;
                Ok(Action::WriteFile {
                    path: self.file_path(&args.path)?,
                    content: args.content,
                })
            }
            Builtin::EditFile => {
                let args: EditFileArgs = self.parse(arguments)?;
                let path = self.file_path(&args.path)?;
                if args.old_string.is_empty() {
                    return Err(self.reject(EditError::EmptyOld.to_string()));
                }
                if args.old_string == args.new_string {
                    return Err(self.reject(EditError::Unchanged.to_string()));
                }
                Ok(Action::EditFile {
                    path,
                    old_string: args.old_string,
                    new_string: args.new_string,
                    replace_all: args.replace_all,
                })
            }
            Builtin::ListDir => {
                let args: ListDirArgs = self.parse(arguments)?;
                let path = self.dir_path(args.path.as_deref())?;
                let argv = strings(&["ls", "-lA", "--", path.as_str()]);
                Ok(Action::ListDir {
                    path,
                    argv,
                    timeout_secs: default_timeout_secs,
                })
            }
            Builtin::FindFiles => {
                let args: FindFilesArgs = self.parse(arguments)?;
                let path = self.dir_path(args.path.as_deref())?;
                self.name_pattern("pattern", &args.pattern)?;
                // -name takes the next argument as its value, whatever it
                // starts with.
                let argv = strings(&[
                    "find",
                    find_operand(&path).as_str(),
                    "-name",
                    args.pattern.as_str(),
                ]);
                Ok(Action::FindFiles {
                    path,
                    argv,
                    timeout_secs: default_timeout_secs,
                })
            }
            Builtin::SearchFiles => {
                let args: SearchFilesArgs = self.parse(arguments)?;
                let path = self.dir_path(args.path.as_deref())?;
                let argv = match &args.glob {
                    // -e takes the next argument as the pattern, whatever
                    // it starts with; after `--` the path is a file operand.
                    None => strings(&[
                        "grep",
                        "-r",
                        "-n",
                        "-H",
                        "-I",
                        "-E",
                        "-e",
                        args.pattern.as_str(),
                        "--",
                        path.as_str(),
                    ]),
                    Some(glob) => {
                        self.name_pattern("glob", glob)?;
                        // find reads the arguments of -exec itself: an
                        // argument that is `;` or `+` would end them, and
                        // GNU and busybox find both refuse a second `{}` in
                        // any of them. The pattern is attached to -e, so
                        // it is never a whole argument; `{}` in it is
                        // refused.
                        if args.pattern.contains("{}") {
                            return Err(self.reject(
                                "with glob, pattern cannot contain {} (find would take it for \
                                 the list of files); write \\{\\} or [{]} instead",
                            ));
                        }
                        strings(&[
                            "find",
                            find_operand(&path).as_str(),
                            "-type",
                            "f",
                            "-name",
                            glob.as_str(),
                            "-exec",
                            "grep",
                            "-n",
                            "-H",
                            "-I",
                            "-E",
                            format!("-e{}", args.pattern).as_str(),
                            "--",
                            "{}",
                            "+",
                        ])
                    }
                };
                Ok(Action::SearchFiles {
                    path,
                    argv,
                    timeout_secs: default_timeout_secs,
                })
            }
        }
    }

    fn parse<T: DeserializeOwned>(self, arguments: &Value) -> Result<T, ToolError> {
        T::deserialize(arguments).map_err(|e| self.reject(format!("the arguments do not fit: {e}")))
    }

    fn reject(self, message: impl Into<String>) -> ToolError {
        ToolError::Rejected {
            tool: self.name().to_string(),
            message: message.into(),
        }
    }

    fn workspace_path(self, raw: &str) -> Result<String, ToolError> {
        workspace_path(raw).map_err(|message| self.reject(message))
    }

    /// The path of a file (not the workspace itself, not `dir/`).
    fn file_path(self, raw: &str) -> Result<String, ToolError> {
        let path = self.workspace_path(raw)?;
        if path == "." || raw.ends_with('/') {
            return Err(self.reject(format!(
                "path {} names a directory; give the path of a file",
                quoted(raw)
            )));
        }
        Ok(path)
    }

    /// The path of a directory to look in; none: the whole workspace.
    fn dir_path(self, raw: Option<&str>) -> Result<String, ToolError> {
        match raw {
            None => Ok(".".to_string()),
            Some(raw) => self.workspace_path(raw),
        }
    }

    /// A glob `find -name` compares with one name: a `/` never matches.
    fn name_pattern(self, field: &str, pattern: &str) -> Result<(), ToolError> {
        if pattern.contains('/') {
            return Err(self.reject(format!(
                "{field} {} holds a /, but it is matched against file names, not paths: \
                 give the directory as path and a name pattern such as *.rs as {field}",
                quoted(pattern)
            )));
        }
        Ok(())
    }
}

/// An object schema with these properties, of which `required` must be
/// given, and no others.
fn object(properties: Value, required: &[&str]) -> Value {
    let mut schema = json!({
        "type": "object",
        "properties": properties,
        "additionalProperties": false
    });
    if let (Value::Object(map), false) = (&mut schema, required.is_empty()) {
        map.insert("required".to_string(), json!(required));
    }
    schema
}

fn path_property(description: &str) -> Value {
    json!({
        "type": "string",
        "minLength": 1,
        "description": format!("{description} Relative to {WORKSPACE}.")
    })
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

fn quoted(text: &str) -> String {
    format!("{:?}", clip(text, MAX_QUOTED_PATH_BYTES))
}

/// A path the model gave, as the workspace-relative path it names: a
/// leading `/workspace`, `.` components and repeated or trailing slashes
/// dropped, `.` for the workspace itself. This is the path policy is asked
/// about and the path acted on. A path outside the workspace, or with a
/// `..` component, is refused: policy decides on the path string, so the
/// string must name what is touched (an exec of `find ..` would otherwise
/// read outside what a `file.read` of `..` was asked about).
pub fn workspace_path(raw: &str) -> Result<String, String> {
    if raw.contains('\0') {
        return Err(format!("path {} contains a NUL byte", quoted(raw)));
    }
    let relative = match raw.strip_prefix('/') {
        None => raw,
        Some(absolute) => match absolute.strip_prefix(WORKSPACE.trim_start_matches('/')) {
            Some(rest) if rest.is_empty() || rest.starts_with('/') => rest,
            _ => {
                return Err(format!(
                    "path {} is outside the workspace: paths are relative to {WORKSPACE}, and \
                     an absolute path must start with {WORKSPACE}/",
                    quoted(raw)
                ));
            }
        },
    };
    let mut parts = Vec::new();
    for part in relative.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                return Err(format!(
                    "path {} has a .. component; give the path from {WORKSPACE} without ..",
                    quoted(raw)
                ));
            }
            part => parts.push(part),
        }
    }
    Ok(if parts.is_empty() {
        ".".to_string()
    } else {
        parts.join("/")
    })
}

/// `path` as a starting point of `find`, which takes an argument starting
/// with `-`, `(` or `!` for part of its expression (and has no `--` in
/// busybox): such a path is written `./path`.
fn find_operand(path: &str) -> String {
    if path.starts_with(|c: char| c.is_ascii_alphanumeric() || c == '.' || c == '_') {
        path.to_string()
    } else {
        format!("./{path}")
    }
}

/// `shell`'s arguments.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShellArgs {
    pub command: String,
    pub timeout_secs: Option<u32>,
}

/// `read_file`'s arguments.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReadFileArgs {
    pub path: String,
    pub start_line: Option<u64>,
    pub end_line: Option<u64>,
}

/// `write_file`'s arguments.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WriteFileArgs {
    pub path: String,
    pub content: String,
}

/// `edit_file`'s arguments.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EditFileArgs {
    pub path: String,
    pub old_string: String,
    pub new_string: String,
    #[serde(default)]
    pub replace_all: bool,
}

/// `list_dir`'s arguments.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListDirArgs {
    pub path: Option<String>,
}

/// `find_files`'s arguments.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FindFilesArgs {
    pub pattern: String,
    pub path: Option<String>,
}

/// `search_files`'s arguments.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SearchFilesArgs {
    pub pattern: String,
    pub path: Option<String>,
    pub glob: Option<String>,
}

/// What a valid call to a built-in will do in the sandbox, through the
/// agent, once the guard allowed every request of
/// [`Action::policy_requests`]. Paths are workspace-relative
/// ([`workspace_path`]); execs start in the workspace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// `shell`: the command line, run as `/bin/sh -c` by the agent
    /// (`ExecStart.shell`), stopped after `timeout_secs`.
    Exec { command: Command, timeout_secs: u32 },
    /// `read_file`: the file, or lines `.0` to `.1` of it (1-based,
    /// inclusive, `.1` possibly past the end: `text::line_range`).
    ReadFile {
        path: String,
        lines: Option<(u64, u64)>,
    },
    /// `write_file`: the whole file, parent directories created.
    WriteFile { path: String, content: String },
    /// `edit_file`: the file read, changed by `text::edit`, and written
    /// back.
    EditFile {
        path: String,
        old_string: String,
        new_string: String,
        replace_all: bool,
    },
    /// `list_dir`: a read of the directory `path`, carried out as an exec
    /// of `argv` (`ls -lA -- path`), never through a shell.
    ListDir {
        path: String,
        argv: Vec<String>,
        timeout_secs: u32,
    },
    /// `find_files`: a read of the directory `path`, carried out as an exec
    /// of `argv` (`find path -name pattern`), never through a shell. The
    /// number of results is bounded by the output cap.
    FindFiles {
        path: String,
        argv: Vec<String>,
        timeout_secs: u32,
    },
    /// `search_files`: a read of `path`, carried out as an exec of `argv`
    /// (`grep -r -n -H -I -E -e pattern -- path`, or with a glob `find path
    /// -type f -name glob -exec grep -n -H -I -E -epattern -- {} +`), never
    /// through a shell. Exit status 1 with no output means no match (grep
    /// and, for the find form, find both say 1 then); the number of results
    /// is bounded by the output cap.
    SearchFiles {
        path: String,
        argv: Vec<String>,
        timeout_secs: u32,
    },
}

/// One request to the guard: the action and its facts. The resource is the
/// session's sandbox (`facts::sandbox(record)`, as the API uses).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyRequest {
    pub action: policy::Action,
    pub facts: Facts,
}

impl Action {
    /// The policy requests this action is, in the order they are asked;
    /// all must be allowed before it starts. `base` is what policy knows of
    /// the sandbox before the action (`facts::spec(&record.spec)`, as the
    /// API starts from); each request adds the action's facts with the same
    /// builder the API uses, so the model gets no more than a caller of the
    /// API would:
    ///
    /// - `shell`: `exec`, `facts::command(base, &Command::Shell(line))`, as
    ///   `Sandboxes.Exec` with that shell string: argv `/bin/sh -c line`,
    ///   command `line`;
    /// - `read_file`, `list_dir`, `find_files`, `search_files`: `file.read`,
    ///   `facts::path(base, path)`, as `Sandboxes.ReadFile`;
    /// - `write_file`: `file.write` of the path, as `Sandboxes.WriteFile`;
    /// - `edit_file`: `file.read` then `file.write` of the path.
    pub fn policy_requests(&self, base: &Facts) -> Vec<PolicyRequest> {
        let on_path = |action: policy::Action, path: &str| PolicyRequest {
            action,
            facts: facts::path(base.clone(), path),
        };
        match self {
            Action::Exec { command, .. } => vec![PolicyRequest {
                action: policy::Action::Exec,
                facts: facts::command(base.clone(), command),
            }],
            Action::ReadFile { path, .. }
            | Action::ListDir { path, .. }
            | Action::FindFiles { path, .. }
            | Action::SearchFiles { path, .. } => {
                vec![on_path(policy::Action::FileRead, path.as_str())]
            }
            Action::WriteFile { path, .. } => {
                vec![on_path(policy::Action::FileWrite, path.as_str())]
            }
            Action::EditFile { path, .. } => vec![
                on_path(policy::Action::FileRead, path.as_str()),
                on_path(policy::Action::FileWrite, path.as_str()),
            ],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUT: u32 = 600;

    fn action(tool: Builtin, arguments: Value) -> Action {
        match tool.action(&arguments, TIMEOUT) {
            Ok(action) => action,
            Err(e) => panic!("{} {arguments} was refused: {e}", tool.name()),
        }
    }

    fn refusal(tool: Builtin, arguments: Value) -> String {
        match tool.action(&arguments, TIMEOUT) {
            Ok(action) => panic!("{} {arguments} was accepted: {action:?}", tool.name()),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn names_are_unique_and_found_again() {
        for tool in Builtin::ALL {
            assert_eq!(Builtin::from_name(tool.name()), Some(tool));
        }
        let mut names: Vec<&str> = Builtin::ALL.iter().map(|b| b.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Builtin::ALL.len());
        assert_eq!(Builtin::from_name("Shell"), None);
    }

    #[test]
    fn shell_is_a_shell_exec_with_the_default_or_given_timeout() {
        assert_eq!(
            action(Builtin::Shell, json!({"command": "make test"})),
            Action::Exec {
                command: Command::Shell("make test".into()),
                timeout_secs: TIMEOUT
            }
        );
        assert_eq!(
            action(
                Builtin::Shell,
                json!({"command": "sleep 1", "timeout_secs": 5})
            ),
            Action::Exec {
                command: Command::Shell("sleep 1".into()),
                timeout_secs: 5
            }
        );
        assert!(refusal(Builtin::Shell, json!({"command": "  \n"})).contains("command is empty"));
        // What the schema also refuses is refused here too.
        assert!(
            refusal(Builtin::Shell, json!({"command": "x", "timeout_secs": 0}))
                .contains("timeout_secs must be 1 to 3600")
        );
        assert!(refusal(Builtin::Shell, json!({"command": "x", "cwd": "/"}))
            .contains("unknown field `cwd`"));
    }

    #[test]
    fn file_tools_map_to_their_file_actions() {
        assert_eq!(
            action(Builtin::ReadFile, json!({"path": "src/main.rs"})),
            Action::ReadFile {
                path: "src/main.rs".into(),
                lines: None
            }
        );
        assert_eq!(
            action(
                Builtin::ReadFile,
                json!({"path": "a.txt", "start_line": 3, "end_line": 7})
            ),
            Action::ReadFile {
                path: "a.txt".into(),
                lines: Some((3, 7))
            }
        );
        assert_eq!(
            action(Builtin::ReadFile, json!({"path": "a.txt", "start_line": 3})),
            Action::ReadFile {
                path: "a.txt".into(),
                lines: Some((3, u64::MAX))
            }
        );
        assert_eq!(
            action(Builtin::ReadFile, json!({"path": "a.txt", "end_line": 9})),
            Action::ReadFile {
                path: "a.txt".into(),
                lines: Some((1, 9))
            }
        );
        assert_eq!(
            refusal(
                Builtin::ReadFile,
                json!({"path": "a.txt", "start_line": 5, "end_line": 2})
            ),
            "read_file: end_line 2 is before start_line 5"
        );
        assert_eq!(
            action(
                Builtin::WriteFile,
                json!({"path": "/workspace/out/x.txt", "content": "hi\n"})
            ),
            Action::WriteFile {
                path: "out/x.txt".into(),
                content: "hi\n".into()
            }
        );
        assert_eq!(
            action(
                Builtin::EditFile,
                json!({"path": "./a.rs", "old_string": "a", "new_string": "b"})
            ),
            Action::EditFile {
                path: "a.rs".into(),
                old_string: "a".into(),
                new_string: "b".into(),
                replace_all: false
            }
        );
        assert_eq!(
            action(
                Builtin::EditFile,
                json!({"path": "a.rs", "old_string": "a", "new_string": "", "replace_all": true})
            ),
            Action::EditFile {
                path: "a.rs".into(),
                old_string: "a".into(),
                new_string: String::new(),
                replace_all: true
            }
        );
        assert!(refusal(
            Builtin::EditFile,
            json!({"path": "a.rs", "old_string": "a", "new_string": "a"})
        )
        .contains("the edit would change nothing"));
        // A directory is not a file.
        for path in [".", "/workspace", "src/"] {
            assert!(
                refusal(Builtin::WriteFile, json!({"path": path, "content": ""}))
                    .contains("names a directory"),
                "{path}"
            );
        }
    }

    #[test]
    fn paths_are_workspace_relative_and_never_leave_it() {
        for (raw, path) in [
            ("src/main.rs", "src/main.rs"),
            ("./src//main.rs", "src/main.rs"),
            ("/workspace/src/main.rs", "src/main.rs"),
            ("/workspace", "."),
            ("/workspace/", "."),
            (".", "."),
            ("", "."),
            ("./-rf", "-rf"),
            ("a/./b/", "a/b"),
        ] {
            assert_eq!(workspace_path(raw).as_deref(), Ok(path), "{raw:?}");
        }
        for raw in [
            "/etc/passwd",
            "/",
            "/workspacefoo/x",
            "//workspace/x",
            "../x",
            "a/../../x",
            "a/../b",
            "/workspace/..",
            "a\0b",
        ] {
            assert!(workspace_path(raw).is_err(), "{raw:?} was accepted");
        }
        assert!(refusal(Builtin::ReadFile, json!({"path": "/etc/passwd"}))
            .contains("is outside the workspace"));
        assert!(refusal(Builtin::ListDir, json!({"path": ".."})).contains(".. component"));
        assert!(refusal(
            Builtin::SearchFiles,
            json!({"pattern": "x", "path": "/root"})
        )
        .contains("is outside the workspace"));
    }

    #[test]
    fn list_and_find_run_fixed_programs_with_the_model_text_as_single_arguments() {
        assert_eq!(
            action(Builtin::ListDir, json!({})),
            Action::ListDir {
                path: ".".into(),
                argv: strings(&["ls", "-lA", "--", "."]),
                timeout_secs: TIMEOUT
            }
        );
        assert_eq!(
            action(Builtin::ListDir, json!({"path": "-l"})),
            Action::ListDir {
                path: "-l".into(),
                argv: strings(&["ls", "-lA", "--", "-l"]),
                timeout_secs: TIMEOUT
            }
        );
        // A pattern that looks like an option or a find primary stays the
        // value of -name.
        assert_eq!(
            action(Builtin::FindFiles, json!({"pattern": "-delete"})),
            Action::FindFiles {
                path: ".".into(),
                argv: strings(&["find", ".", "-name", "-delete"]),
                timeout_secs: TIMEOUT
            }
        );
        // A path that find would read as its expression is made ./path.
        for (path, operand) in [("-newer", "./-newer"), ("(", "./("), ("!x", "./!x")] {
            assert_eq!(
                action(Builtin::FindFiles, json!({"pattern": "*.rs", "path": path})),
                Action::FindFiles {
                    path: path.into(),
                    argv: strings(&["find", operand, "-name", "*.rs"]),
                    timeout_secs: TIMEOUT
                }
            );
        }
        assert_eq!(
            action(
                Builtin::FindFiles,
                json!({"pattern": "*.rs", "path": "src"})
            ),
            Action::FindFiles {
                path: "src".into(),
                argv: strings(&["find", "src", "-name", "*.rs"]),
                timeout_secs: TIMEOUT
            }
        );
        assert!(refusal(Builtin::FindFiles, json!({"pattern": "src/*.rs"}))
            .contains("matched against file names, not paths"));
    }

    #[test]
    fn search_runs_grep_with_the_pattern_never_taken_for_an_option() {
        assert_eq!(
            action(
                Builtin::SearchFiles,
                json!({"pattern": "-rf /", "path": "-x"})
            ),
            Action::SearchFiles {
                path: "-x".into(),
                argv: strings(&["grep", "-r", "-n", "-H", "-I", "-E", "-e", "-rf /", "--", "-x"]),
                timeout_secs: TIMEOUT
            }
        );
        // With a glob: find runs grep; the pattern is attached to -e, so not
        // even `;` or `+` can end find's -exec.
        for pattern in ["-v", ";", "+", "a|b"] {
            assert_eq!(
                action(
                    Builtin::SearchFiles,
                    json!({"pattern": pattern, "glob": "*.py", "path": "-src"})
                ),
                Action::SearchFiles {
                    path: "-src".into(),
                    argv: strings(&[
                        "find",
                        "./-src",
                        "-type",
                        "f",
                        "-name",
                        "*.py",
                        "-exec",
                        "grep",
                        "-n",
                        "-H",
                        "-I",
                        "-E",
                        format!("-e{pattern}").as_str(),
                        "--",
                        "{}",
                        "+"
                    ]),
                    timeout_secs: TIMEOUT
                }
            );
        }
        assert!(refusal(
            Builtin::SearchFiles,
            json!({"pattern": "fmt!(\"{}\")", "glob": "*.rs"})
        )
        .contains("cannot contain {}"));
        // Without a glob, {} is just part of the pattern.
        assert!(Builtin::SearchFiles
            .action(&json!({"pattern": "{}"}), TIMEOUT)
            .is_ok());
        assert!(refusal(
            Builtin::SearchFiles,
            json!({"pattern": "x", "glob": "src/*.rs"})
        )
        .contains("matched against file names"));
    }

    #[test]
    fn each_action_is_the_policy_requests_the_api_makes_for_the_same_thing() {
        let base = Facts {
            image: "img".into(),
            network: "none".into(),
            ..Facts::default()
        };
        let exec = action(Builtin::Shell, json!({"command": "git push origin main"}));
        let requests = exec.policy_requests(&base);
        assert_eq!(requests.len(), 1);
        assert_eq!(requests[0].action, policy::Action::Exec);
        // What Sandboxes.Exec decides on for the shell string.
        assert_eq!(
            requests[0].facts,
            facts::command(base.clone(), &Command::Shell("git push origin main".into()))
        );
        assert_eq!(
            requests[0].facts.argv,
            ["/bin/sh", "-c", "git push origin main"]
        );
        assert_eq!(requests[0].facts.command, "git push origin main");
        assert_eq!(requests[0].facts.image, "img");

        let read = |path: &str| PolicyRequest {
            action: policy::Action::FileRead,
            facts: facts::path(base.clone(), path),
        };
        let write = |path: &str| PolicyRequest {
            action: policy::Action::FileWrite,
            facts: facts::path(base.clone(), path),
        };
        let cases = [
            (
                action(Builtin::ReadFile, json!({"path": "/workspace/a.txt"})),
                vec![read("a.txt")],
            ),
            (
                action(Builtin::WriteFile, json!({"path": "k.pem", "content": ""})),
                vec![write("k.pem")],
            ),
            (
                action(
                    Builtin::EditFile,
                    json!({"path": "a.rs", "old_string": "x", "new_string": "y"}),
                ),
                vec![read("a.rs"), write("a.rs")],
            ),
            (action(Builtin::ListDir, json!({})), vec![read(".")]),
            (
                action(Builtin::FindFiles, json!({"pattern": "*", "path": "src"})),
                vec![read("src")],
            ),
            (
                action(
                    Builtin::SearchFiles,
                    json!({"pattern": "x", "path": "./docs/", "glob": "*.md"}),
                ),
                vec![read("docs")],
            ),
        ];
        for (done, expected) in cases {
            assert_eq!(done.policy_requests(&base), expected, "{done:?}");
        }
    }
}
