//! A job: what a run executes. [`Job`] is the validated domain type the
//! server works with (`TryFrom<pb::Job>`, checked once at the API edge).
//! The YAML job files CI users write are read into the same `pb::Job` by
//! `bridle_client::job::parse_job_file`, on the client's side.

use std::collections::BTreeMap;

use bridle_proto::control::v1 as pb;
use serde::{Deserialize, Serialize};

use crate::sandboxes::Network;

/// Steps a job may have at most.
pub const MAX_STEPS: usize = 1000;
/// Bytes of input files a job may carry inline, in total.
pub const MAX_INPUT_BYTES: usize = 8 << 20;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
    /// An agent session's task (then `steps` is empty): the model decides
    /// what runs (docs/harness.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<crate::harness::task::AgentTask>,
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
            Ok(pb::NetworkMode::Egress) => Some(Network::Egress),
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
                agent: None,
            },
            secrets,
            blobs,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the client reads from a job file, validated: the secret's
    /// value is kept apart from the job that is recorded.
    #[test]
    fn a_job_file_validates_with_its_secrets_kept_out_of_the_record() {
        let text = r#"
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
"#;
        let env = |k: &str| (k == "TEST_API_TOKEN").then(|| "s3cr3t".to_string());
        let j = bridle_client::job::parse_job_file(std::path::Path::new("job.yaml"), text, env)
            .unwrap();
        let s = Submitted::try_from(j).unwrap();
        assert_eq!(s.job.secret_names, vec!["API_TOKEN"]);
        assert_eq!(s.secrets["API_TOKEN"], "s3cr3t");
        // The domain job, which is what gets recorded, has no secret value.
        let recorded = serde_json::to_string(&s.job).unwrap();
        assert!(!recorded.contains("s3cr3t"), "{recorded}");
        assert_eq!(s.job.inputs[0].mode, 0o755);
        assert_eq!(s.blobs[0].1, b"echo hello\n");
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
