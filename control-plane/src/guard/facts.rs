//! What policy sees of an action: the resource it is on and the facts about
//! it, built here — and only here — from the domain types, so that an RPC
//! and a run's step asking for the same thing are decided on the same facts.

use crate::policy::{Facts, Resource, ResourceKind};
use crate::runs::job::{Command, Job};
use crate::sandboxes::{SandboxRecord, Spec};

/// A sandbox about to be made for `owner`.
pub fn new_sandbox(owner: &str) -> Resource {
    Resource {
        kind: ResourceKind::Sandbox,
        id: "new".into(),
        owner: owner.to_string(),
    }
}

/// An existing sandbox.
pub fn sandbox(record: &SandboxRecord) -> Resource {
    Resource {
        kind: ResourceKind::Sandbox,
        id: record.id.clone(),
        owner: record.owner.clone().unwrap_or_default(),
    }
}

/// A sandbox of `owner`'s known by id only (a run's).
pub fn sandbox_of(id: &str, owner: &str) -> Resource {
    Resource {
        kind: ResourceKind::Sandbox,
        id: id.to_string(),
        owner: owner.to_string(),
    }
}

/// A run of `owner`'s.
pub fn run(run_id: &str, owner: &str) -> Resource {
    Resource {
        kind: ResourceKind::Run,
        id: run_id.to_string(),
        owner: owner.to_string(),
    }
}

/// What policy knows of a sandbox from its spec, before the facts of one
/// action.
pub fn spec(spec: &Spec) -> Facts {
    Facts {
        image: spec.image.clone(),
        network: spec.network.as_str().to_string(),
        memory_bytes: spec.memory_bytes,
        cpu_millis: spec.cpu_millis,
        pids: spec.pids,
        labels: labels(&spec.labels),
        ..Facts::default()
    }
}

/// A run of `job` as a whole (a step adds its command).
pub fn job(job: &Job, run_id: &str) -> Facts {
    Facts {
        image: job.image.clone().unwrap_or_default(),
        network: job
            .network
            .map(|n| n.as_str().to_string())
            .unwrap_or_default(),
        memory_bytes: job.memory_bytes.unwrap_or(0),
        cpu_millis: job.cpu_millis.unwrap_or(0),
        pids: job.pids.unwrap_or(0),
        run_id: run_id.to_string(),
        labels: labels(&job.labels),
        ..Facts::default()
    }
}

/// `base` with the command to run: argv (a shell string as
/// `/bin/sh -c …`) and the command as one line.
pub fn command(base: Facts, command: &Command) -> Facts {
    let (argv, line) = match command {
        Command::Argv(argv) => (argv.clone(), argv.join(" ")),
        Command::Shell(sh) => (
            vec!["/bin/sh".to_string(), "-c".to_string(), sh.clone()],
            sh.clone(),
        ),
    };
    Facts {
        argv,
        command: line,
        ..base
    }
}

/// `base` with the path acted on (empty: the whole workspace).
pub fn path(base: Facts, path: &str) -> Facts {
    Facts {
        path: path.to_string(),
        ..base
    }
}

fn labels(labels: &std::collections::BTreeMap<String, String>) -> Vec<(String, String)> {
    labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shell_command_is_seen_as_sh_dash_c_and_argv_as_one_line() {
        let shell = command(Facts::default(), &Command::Shell("make test".into()));
        assert_eq!(shell.argv, ["/bin/sh", "-c", "make test"]);
        assert_eq!(shell.command, "make test");
        let argv = command(
            Facts::default(),
            &Command::Argv(vec!["cargo".into(), "build".into()]),
        );
        assert_eq!(argv.argv, ["cargo", "build"]);
        assert_eq!(argv.command, "cargo build");
    }
}
