//! A job: what a run executes. [`Job`] is the validated domain type the
//! server works with (`TryFrom<pb::Job>`, checked once at the API edge);
//! [`parse_job_file`] reads the YAML job file CI users write and turns it
//! into the same `pb::Job`, with errors that name the line.

use std::collections::BTreeMap;
use std::path::Path;

use bridle_proto::control::v1 as pb;
use serde::{Deserialize, Serialize};

use crate::sandboxes::Network;

/// Steps a job may have at most.
pub const MAX_STEPS: usize = 1000;
/// Bytes of input files a job may carry inline, in total.
pub const MAX_INPUT_BYTES: usize = 8 << 20;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    pub image: Option<String>,
    pub from_snapshot: Option<String>,
    pub memory_bytes: Option<u64>,
    pub cpu_millis: Option<u64>,
    pub pids: Option<u64>,
    #[serde(default)]
    pub disk_bytes: Option<u64>,
    pub network: Option<Network>,
    pub env: BTreeMap<String, String>,
    /// Names only: the values never enter the event log.
    pub secret_names: Vec<String>,
    pub inputs: Vec<InputFile>,
    pub steps: Vec<Step>,
    pub artifacts: Vec<String>,
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputFile {
    pub path: String,
    /// sha256 of the content, which is stored once as a blob.
    pub sha256: String,
    pub size: u64,
    pub mode: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    Argv(Vec<String>),
    Shell(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step {
    pub name: String,
    pub command: Command,
    pub env: BTreeMap<String, String>,
    pub cwd: String,
    pub timeout_secs: u32,
    pub continue_on_error: bool,
    pub idempotent: bool,
    pub retries: u32,
}

/// A submitted job, split into what may be recorded and what may not.
#[derive(Debug)]
pub struct Submitted {
    pub job: Job,
    /// Secret values, by name: kept out of the event log.
    pub secrets: BTreeMap<String, String>,
    /// Input file contents, by sha256.
    pub blobs: Vec<(String, Vec<u8>)>,
}

fn env_name_ok(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn check_env(field: &str, env: &BTreeMap<String, String>) -> Result<(), String> {
    for (k, v) in env {
        if !env_name_ok(k) {
            return Err(format!(
                "{field}: {k:?} is not a variable name (letters, digits, _)"
            ));
        }
        if v.contains('\0') {
            return Err(format!("{field}.{k}: values cannot contain NUL"));
        }
    }
    Ok(())
}

fn relative_path(field: &str, p: &str) -> Result<(), String> {
    if p.is_empty() || p.contains('\0') {
        return Err(format!("{field}: a path is required"));
    }
    Ok(())
}

impl TryFrom<pb::Job> for Submitted {
    type Error = String;

    /// Checks everything that can be checked before anything runs; each
    /// message names the field.
    fn try_from(j: pb::Job) -> Result<Self, String> {
        use sha2::Digest;
        if j.steps.is_empty() {
            return Err("steps: a job needs at least one step".into());
        }
        if j.steps.len() > MAX_STEPS {
            return Err(format!("steps: at most {MAX_STEPS} steps"));
        }
        let env: BTreeMap<String, String> = j.env.into_iter().collect();
        check_env("env", &env)?;
        let secrets: BTreeMap<String, String> = j.secrets.into_iter().collect();
        check_env("secrets", &secrets)?;
        for k in secrets.keys() {
            if env.contains_key(k) {
                return Err(format!("secrets.{k}: also set in env; use one"));
            }
        }
        if secrets.values().any(|v| v.is_empty()) {
            return Err("secrets: a secret cannot be empty".into());
        }
        let network = match pb::NetworkMode::try_from(j.network) {
            Ok(pb::NetworkMode::Unspecified) => None,
            Ok(pb::NetworkMode::None) => Some(Network::None),
            Ok(pb::NetworkMode::Bridge) => Some(Network::Bridge),
            Err(_) => return Err(format!("network: {} is not a NetworkMode", j.network)),
        };
        crate::sandboxes::check_client_labels(j.labels.keys())?;
        let mut total = 0usize;
        let mut inputs = Vec::new();
        let mut blobs = Vec::new();
        for (i, f) in j.inputs.into_iter().enumerate() {
            relative_path(&format!("inputs[{i}].path"), &f.path)?;
            if f.mode & !0o777 != 0 {
                return Err(format!(
                    "inputs[{i}].mode: only permission bits (0777) may be set"
                ));
            }
            total += f.content.len();
            if total > MAX_INPUT_BYTES {
                return Err(format!(
                    "inputs: more than {MAX_INPUT_BYTES} bytes inline; upload large inputs to a sandbox and snapshot it"
                ));
            }
            let sha256 = hex::encode(sha2::Sha256::digest(&f.content));
            inputs.push(InputFile {
                path: f.path,
                sha256: sha256.clone(),
                size: f.content.len() as u64,
                mode: if f.mode == 0 { 0o644 } else { f.mode },
            });
            blobs.push((sha256, f.content.to_vec()));
        }
        let mut steps = Vec::new();
        for (i, s) in j.steps.into_iter().enumerate() {
            let field = format!("steps[{i}]");
            let command = match (s.argv.is_empty(), s.shell.is_empty()) {
                (false, true) => Command::Argv(s.argv),
                (true, false) => Command::Shell(s.shell),
                _ => return Err(format!("{field}: exactly one of argv and shell (run)")),
            };
            if s.retries > 0 && !s.idempotent {
                return Err(format!(
                    "{field}: retries are allowed only for steps marked idempotent"
                ));
            }
            let env: BTreeMap<String, String> = s.env.into_iter().collect();
            check_env(&format!("{field}.env"), &env)?;
            steps.push(Step {
                name: if s.name.is_empty() {
                    format!("step {}", i + 1)
                } else {
                    s.name
                },
                command,
                env,
                cwd: s.cwd,
                timeout_secs: s.timeout_seconds,
                continue_on_error: s.continue_on_error,
                idempotent: s.idempotent,
                retries: s.retries,
            });
        }
        for (i, a) in j.artifacts.iter().enumerate() {
            relative_path(&format!("artifacts[{i}]"), a)?;
        }
        let limits = j.limits.unwrap_or_default();
        Ok(Submitted {
            job: Job {
                image: Some(j.image).filter(|s| !s.is_empty()),
                from_snapshot: Some(j.from_snapshot).filter(|s| !s.is_empty()),
                memory_bytes: limits.memory_bytes,
                cpu_millis: limits.cpu_millis,
                pids: limits.pids,
                disk_bytes: limits.disk_bytes,
                network,
                env,
                secret_names: secrets.keys().cloned().collect(),
                inputs,
                steps,
                artifacts: j.artifacts,
                labels: j.labels.into_iter().collect(),
            },
            secrets,
            blobs,
        })
    }
}

// ---------------------------------------------------------------- job files

/// The YAML a CI user writes. Unknown keys are errors.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JobFile {
    #[serde(default)]
    image: String,
    #[serde(default)]
    from_snapshot: String,
    #[serde(default)]
    limits: Option<LimitsFile>,
    #[serde(default)]
    network: Option<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    secrets: BTreeMap<String, SecretFile>,
    #[serde(default)]
    inputs: Vec<InputFileFile>,
    steps: Steps,
    #[serde(default)]
    artifacts: Vec<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitsFile {
    #[serde(default)]
    memory: Option<String>,
    #[serde(default)]
    cpus: Option<f64>,
    #[serde(default)]
    pids: Option<u64>,
    #[serde(default)]
    disk: Option<String>,
}

/// A secret's value comes from the submitting process's environment, so it
/// never has to be written in the job file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SecretFile {
    from_env: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InputFileFile {
    path: String,
    #[serde(default)]
    content: Option<String>,
    /// Read by the CLI, relative to the job file.
    #[serde(default)]
    from_file: Option<String>,
    #[serde(default)]
    mode: Option<u32>,
}

/// The steps, each converted as soon as it is read, so an error carries the
/// position the YAML parser is at: the step it is about.
#[derive(Debug)]
struct Steps(Vec<pb::Step>);

impl<'de> Deserialize<'de> for Steps {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Steps;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a list of steps")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Steps, A::Error> {
                let mut steps = Vec::new();
                while let Some(raw) = seq.next_element::<StepFileRaw>()? {
                    let i = steps.len();
                    let step = StepFile::try_from(raw)
                        .map_err(|e| serde::de::Error::custom(format!("steps[{i}]: {e}")))?;
                    steps.push(step.0);
                }
                Ok(Steps(steps))
            }
        }
        d.deserialize_seq(Visit)
    }
}

struct StepFile(pb::Step);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StepFileRaw {
    #[serde(default)]
    name: String,
    /// A shell command line.
    #[serde(default)]
    run: Option<String>,
    #[serde(default)]
    argv: Option<Vec<String>>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    cwd: String,
    /// `90s`, `10m`, `1h`.
    #[serde(default)]
    timeout: Option<String>,
    #[serde(default)]
    continue_on_error: bool,
    #[serde(default)]
    idempotent: bool,
    #[serde(default)]
    retries: u32,
}

impl TryFrom<StepFileRaw> for StepFile {
    type Error = String;
    fn try_from(s: StepFileRaw) -> Result<Self, String> {
        let (argv, shell) = match (s.argv, s.run) {
            (Some(a), None) if !a.is_empty() => (a, String::new()),
            (None, Some(r)) if !r.trim().is_empty() => (Vec::new(), r),
            _ => {
                return Err(format!(
                    "step {:?}: give exactly one of `run` (a shell command) and `argv` (a list)",
                    s.name
                ))
            }
        };
        if s.retries > 0 && !s.idempotent {
            return Err(format!(
                "step {:?}: `retries` needs `idempotent: true` (a step that is not idempotent never runs twice)",
                s.name
            ));
        }
        let timeout_seconds = match s.timeout {
            Some(t) => crate::cli::parse_duration(&t)
                .map_err(|e| format!("step {:?}: timeout: {e}", s.name))?
                .as_secs()
                .try_into()
                .map_err(|_| format!("step {:?}: timeout too long", s.name))?,
            None => 0,
        };
        Ok(StepFile(pb::Step {
            name: s.name,
            argv,
            shell,
            env: s.env.into_iter().collect(),
            cwd: s.cwd,
            timeout_seconds,
            continue_on_error: s.continue_on_error,
            idempotent: s.idempotent,
            retries: s.retries,
        }))
    }
}

/// Reads a YAML job file into the message `Runs.Submit` takes. `env` looks up
/// `secrets: NAME: {from_env: VAR}`; `from_file` inputs are read relative to
/// the file's directory. Errors name the file and, for YAML and field
/// errors, the line and column.
pub fn parse_job_file(
    path: &Path,
    text: &str,
    env: impl Fn(&str) -> Option<String>,
) -> Result<pb::Job, String> {
    let name = path.display();
    let file: JobFile = serde_yaml_ng::from_str(text).map_err(|e| {
        let msg = strip_location(&e.to_string());
        // A step's own check fails after the parser has left the step, and
        // serde_yaml_ng then reports where the list began: find the step.
        let step_line = msg
            .strip_prefix("steps: steps[")
            .and_then(|rest| rest.split(']').next())
            .and_then(|i| i.parse().ok())
            .and_then(|i| step_line(text, i));
        match (step_line, e.location()) {
            (Some((line, col)), _) => format!("{name}:{line}:{col}: {msg}"),
            (None, Some(l)) => format!("{name}:{}:{}: {msg}", l.line(), l.column()),
            (None, None) => format!("{name}: {msg}"),
        }
    })?;
    let limits = match file.limits {
        Some(l) => Some(pb::Limits {
            memory_bytes: l
                .memory
                .map(|m| crate::cli::parse_size(&m))
                .transpose()
                .map_err(|e| format!("{name}: limits.memory: {e}"))?,
            cpu_millis: l.cpus.map(|c| (c * 1000.0).round() as u64),
            pids: l.pids,
            disk_bytes: l
                .disk
                .map(|m| crate::cli::parse_size(&m))
                .transpose()
                .map_err(|e| format!("{name}: limits.disk: {e}"))?,
        }),
        None => None,
    };
    let network = match file.network.as_deref() {
        None => pb::NetworkMode::Unspecified,
        Some("none") => pb::NetworkMode::None,
        Some("bridge") => pb::NetworkMode::Bridge,
        Some(other) => {
            return Err(format!(
                "{name}: network: {other:?} is not one of none, bridge"
            ))
        }
    };
    let mut secrets = std::collections::HashMap::new();
    for (k, s) in file.secrets {
        let v = env(&s.from_env).ok_or_else(|| {
            format!(
                "{name}: secrets.{k}: the environment variable {} is not set",
                s.from_env
            )
        })?;
        secrets.insert(k, v);
    }
    let base = path.parent().unwrap_or(Path::new("."));
    let mut inputs = Vec::new();
    for f in file.inputs {
        let content = match (f.content, f.from_file) {
            (Some(c), None) => c.into_bytes(),
            (None, Some(p)) => std::fs::read(base.join(&p))
                .map_err(|e| format!("{name}: inputs {:?}: reading {p}: {e}", f.path))?,
            _ => {
                return Err(format!(
                    "{name}: inputs {:?}: give exactly one of `content` and `from_file`",
                    f.path
                ))
            }
        };
        inputs.push(pb::InputFile {
            path: f.path,
            content: content.into(),
            mode: f.mode.unwrap_or(0),
        });
    }
    Ok(pb::Job {
        image: file.image,
        from_snapshot: file.from_snapshot,
        limits,
        network: network as i32,
        env: file.env.into_iter().collect(),
        secrets,
        inputs,
        steps: file.steps.0,
        artifacts: file.artifacts,
        labels: file.labels.into_iter().collect(),
    })
}

/// Line and column (1-based) where step `index` of the top-level block list
/// `steps:` begins; None for other layouts (flow lists).
fn step_line(text: &str, index: usize) -> Option<(usize, usize)> {
    let mut lines = text.lines().enumerate();
    lines.find(|(_, l)| l.trim_end() == "steps:")?;
    let mut indent = None;
    let mut seen = 0;
    for (n, l) in lines {
        let trimmed = l.trim_start();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let col = l.len() - trimmed.len();
        if col == 0 && !trimmed.starts_with('-') {
            return None;
        }
        if trimmed.starts_with("- ") || trimmed == "-" {
            let level = *indent.get_or_insert(col);
            if col == level {
                if seen == index {
                    return Some((n + 1, col + 1));
                }
                seen += 1;
            }
        }
    }
    None
}

/// serde_yaml_ng appends " at line L column C" to messages; the location is
/// already at the front of ours.
fn strip_location(msg: &str) -> String {
    match msg.rfind(" at line ") {
        Some(i) => msg[..i].to_string(),
        None => msg.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
image: bridle-sandbox:base
limits: {memory: 256m, cpus: 0.5, pids: 64}
network: none
env: {CI: "true"}
secrets:
  API_TOKEN: {from_env: TEST_API_TOKEN}
inputs:
  - path: hello.sh
    content: |
      echo hello
    mode: 0o755
steps:
  - name: build
    run: sh hello.sh
  - name: test
    argv: [sh, -c, "exit 0"]
    timeout: 10m
    env: {RUST_LOG: debug}
    continue_on_error: true
  - name: fetch
    run: echo fetch
    idempotent: true
    retries: 2
artifacts: [out/report.txt]
labels: {pipeline: nightly}
"#;

    fn env(k: &str) -> Option<String> {
        (k == "TEST_API_TOKEN").then(|| "s3cr3t".to_string())
    }

    #[test]
    fn a_job_file_maps_to_the_submit_message() {
        let j = parse_job_file(Path::new("job.yaml"), GOOD, env).unwrap();
        assert_eq!(j.image, "bridle-sandbox:base");
        let l = j.limits.unwrap();
        assert_eq!(
            (l.memory_bytes, l.cpu_millis, l.pids),
            (Some(256 << 20), Some(500), Some(64))
        );
        assert_eq!(j.secrets["API_TOKEN"], "s3cr3t");
        assert_eq!(j.inputs[0].mode, 0o755);
        assert_eq!(j.steps[0].shell, "sh hello.sh");
        assert_eq!(j.steps[1].argv, vec!["sh", "-c", "exit 0"]);
        assert_eq!(j.steps[1].timeout_seconds, 600);
        assert!(j.steps[1].continue_on_error);
        assert_eq!((j.steps[2].idempotent, j.steps[2].retries), (true, 2));
        let s = Submitted::try_from(j).unwrap();
        assert_eq!(s.job.secret_names, vec!["API_TOKEN"]);
        assert_eq!(s.secrets["API_TOKEN"], "s3cr3t");
        // The domain job, which is what gets recorded, has no secret value.
        let recorded = serde_json::to_string(&s.job).unwrap();
        assert!(!recorded.contains("s3cr3t"), "{recorded}");
        assert_eq!(s.blobs[0].1, b"echo hello\n");
    }

    #[test]
    fn errors_point_at_the_line() {
        let cases = [
            // Unknown key in step 2 (line 5).
            (
                "steps:\n  - run: a\n  - run: b\n    name: x\n    colour: red\n",
                "job.yaml:5:",
            ),
            // retries without idempotent: reported at the step (line 3).
            (
                "image: x\n# the steps\nsteps:\n\n  - run: a\n  - run: b\n    retries: 2\n",
                "job.yaml:6:3:",
            ),
            (
                "steps:\n  - run: a\n  - run: b\n    retries: 2\n",
                "job.yaml:3:",
            ),
            // Both run and argv.
            ("steps:\n  - run: a\n    argv: [b]\n", "job.yaml:2:"),
            // A bad timeout.
            ("steps:\n  - run: a\n    timeout: soon\n", "job.yaml:2:"),
            // Not YAML at all.
            ("steps: [\n", "job.yaml:2:"),
        ];
        for (text, want) in cases {
            let e = parse_job_file(Path::new("job.yaml"), text, env).unwrap_err();
            assert!(e.starts_with(want), "{text:?}: {e}");
            assert_eq!(e.lines().count(), 1, "{e}");
        }
        let e = parse_job_file(
            Path::new("job.yaml"),
            "secrets: {T: {from_env: UNSET_VAR}}\nsteps: [{run: a}]\n",
            env,
        )
        .unwrap_err();
        assert!(e.contains("UNSET_VAR is not set"), "{e}");
        let e = parse_job_file(Path::new("job.yaml"), "image: x\n", env).unwrap_err();
        assert!(e.contains("steps"), "{e}");
    }

    #[test]
    fn messages_are_validated_field_by_field() {
        let step = |f: fn(&mut pb::Step)| {
            let mut s = pb::Step {
                shell: "true".into(),
                ..Default::default()
            };
            f(&mut s);
            pb::Job {
                steps: vec![s],
                ..Default::default()
            }
        };
        let bad = [
            (pb::Job::default(), "at least one step"),
            (step(|s| s.argv = vec!["x".into()]), "exactly one of argv"),
            (step(|s| s.retries = 1), "idempotent"),
            (
                step(|s| {
                    s.env.insert("BAD NAME".into(), "v".into());
                }),
                "steps[0].env",
            ),
        ];
        for (job, want) in bad {
            let e = Submitted::try_from(job).unwrap_err();
            assert!(e.contains(want), "{e}");
        }
        let mut j = step(|_| {});
        j.env.insert("X".into(), "1".into());
        j.secrets.insert("X".into(), "2".into());
        assert!(Submitted::try_from(j).unwrap_err().contains("secrets.X"));
        let mut j = step(|_| {});
        j.inputs.push(pb::InputFile {
            path: "f".into(),
            content: vec![0; MAX_INPUT_BYTES + 1].into(),
            mode: 0,
        });
        assert!(Submitted::try_from(j).unwrap_err().contains("inline"));
    }
}
