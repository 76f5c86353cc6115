//! Job files: the YAML a CI user writes, read into the `Job` message
//! `Runs.Submit` takes ([`parse_job_file`]), with errors that name the line.
//! The control plane validates the message again when it arrives: this
//! module only reads the file.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use crate::control as pb;
use crate::units::{parse_duration, parse_size};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The YAML does not parse, or a value in it is wrong; the message
    /// names the file and, where it can, the line and column.
    #[error("{0}")]
    Invalid(String),
    /// A secret's `from_env` variable is not set in the submitter's
    /// environment.
    #[error("{file}: secrets.{secret}: the environment variable {variable} is not set")]
    MissingSecret {
        file: String,
        secret: String,
        variable: String,
    },
    /// An input's `from_file` could not be read.
    #[error("{file}: inputs {input:?}: reading {from_file}: {error}")]
    ReadInput {
        file: String,
        input: String,
        from_file: String,
        error: std::io::Error,
    },
}

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
            Some(t) => parse_duration(&t)
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
) -> Result<pb::Job, Error> {
    let name = path.display().to_string();
    let file: JobFile = serde_yaml_ng::from_str(text).map_err(|e| {
        let msg = strip_location(&e.to_string());
        // A step's own check fails after the parser has left the step, and
        // serde_yaml_ng then reports where the list began: find the step.
        let step_line = msg
            .strip_prefix("steps: steps[")
            .and_then(|rest| rest.split(']').next())
            .and_then(|i| i.parse().ok())
            .and_then(|i| step_line(text, i));
        Error::Invalid(match (step_line, e.location()) {
            (Some((line, col)), _) => format!("{name}:{line}:{col}: {msg}"),
            (None, Some(l)) => format!("{name}:{}:{}: {msg}", l.line(), l.column()),
            (None, None) => format!("{name}: {msg}"),
        })
    })?;
    let limits = match file.limits {
        Some(l) => Some(pb::Limits {
            memory_bytes: l
                .memory
                .map(|m| parse_size(&m))
                .transpose()
                .map_err(|e| Error::Invalid(format!("{name}: limits.memory: {e}")))?,
            cpu_millis: l.cpus.map(|c| (c * 1000.0).round() as u64),
            pids: l.pids,
            disk_bytes: l
                .disk
                .map(|m| parse_size(&m))
                .transpose()
                .map_err(|e| Error::Invalid(format!("{name}: limits.disk: {e}")))?,
        }),
        None => None,
    };
    let network = match file.network.as_deref() {
        None => pb::NetworkMode::Unspecified,
        Some("none") => pb::NetworkMode::None,
        Some("bridge") => pb::NetworkMode::Bridge,
        Some(other) => {
            return Err(Error::Invalid(format!(
                "{name}: network: {other:?} is not one of none, bridge"
            )))
        }
    };
    let mut secrets = std::collections::HashMap::new();
    for (k, s) in file.secrets {
        let Some(v) = env(&s.from_env) else {
            return Err(Error::MissingSecret {
                file: name,
                secret: k,
                variable: s.from_env,
            });
        };
        secrets.insert(k, v);
    }
    let base = path.parent().unwrap_or(Path::new("."));
    let mut inputs = Vec::new();
    for f in file.inputs {
        let content = match (f.content, f.from_file) {
            (Some(c), None) => c.into_bytes(),
            (None, Some(p)) => match std::fs::read(base.join(&p)) {
                Ok(content) => content,
                Err(error) => {
                    return Err(Error::ReadInput {
                        file: name,
                        input: f.path,
                        from_file: p,
                        error,
                    })
                }
            },
            _ => {
                return Err(Error::Invalid(format!(
                    "{name}: inputs {:?}: give exactly one of `content` and `from_file`",
                    f.path
                )))
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
        assert_eq!(j.network, pb::NetworkMode::None as i32);
        assert_eq!(j.env["CI"], "true");
        assert_eq!(j.secrets["API_TOKEN"], "s3cr3t");
        assert_eq!(j.inputs[0].path, "hello.sh");
        assert_eq!(&j.inputs[0].content[..], b"echo hello\n");
        assert_eq!(j.inputs[0].mode, 0o755);
        assert_eq!(j.steps[0].name, "build");
        assert_eq!(j.steps[0].shell, "sh hello.sh");
        assert_eq!(j.steps[1].argv, vec!["sh", "-c", "exit 0"]);
        assert_eq!(j.steps[1].timeout_seconds, 600);
        assert_eq!(j.steps[1].env["RUST_LOG"], "debug");
        assert!(j.steps[1].continue_on_error);
        assert_eq!((j.steps[2].idempotent, j.steps[2].retries), (true, 2));
        assert_eq!(j.artifacts, vec!["out/report.txt"]);
        assert_eq!(j.labels["pipeline"], "nightly");
    }

    #[test]
    fn inputs_from_files_are_read_beside_the_job_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("script.sh"), b"echo from a file\n").unwrap();
        let text = "inputs:\n  - {path: s.sh, from_file: script.sh}\nsteps: [{run: sh s.sh}]\n";
        let j = parse_job_file(&dir.path().join("job.yaml"), text, env).unwrap();
        assert_eq!(&j.inputs[0].content[..], b"echo from a file\n");
        let text = "inputs:\n  - {path: s.sh, from_file: missing.sh}\nsteps: [{run: a}]\n";
        let e = parse_job_file(&dir.path().join("job.yaml"), text, env).unwrap_err();
        assert!(matches!(e, Error::ReadInput { .. }), "{e}");
        assert!(
            e.to_string()
                .contains("inputs \"s.sh\": reading missing.sh: "),
            "{e}"
        );
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
            let e = parse_job_file(Path::new("job.yaml"), text, env)
                .unwrap_err()
                .to_string();
            assert!(e.starts_with(want), "{text:?}: {e}");
            assert_eq!(e.lines().count(), 1, "{e}");
        }
        let e = parse_job_file(
            Path::new("job.yaml"),
            "secrets: {T: {from_env: UNSET_VAR}}\nsteps: [{run: a}]\n",
            env,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("UNSET_VAR is not set"), "{e}");
        assert!(e.starts_with("job.yaml: secrets.T: "), "{e}");
        let e = parse_job_file(Path::new("job.yaml"), "image: x\n", env)
            .unwrap_err()
            .to_string();
        assert!(e.contains("steps"), "{e}");
    }
}
