//! The control plane's configuration, layered: built-in defaults < a TOML
//! file < `BRIDLE_*` environment variables < command-line flags. The result
//! is printable (`--dump-config`) as the same TOML a file would hold.
//!
//! Environment variables name a key path with `__` between levels:
//! `BRIDLE_LISTEN=127.0.0.1:9000`, `BRIDLE_SANDBOX__IMAGE=my-image:1`.
//! Flags take the same paths: `--set sandbox.memory_bytes=1073741824`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("{origin}: {message}")]
    Override { origin: String, message: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where the store, the bootstrap token, snapshot artifacts and the
    /// per-sandbox socket directories live.
    pub data_dir: PathBuf,
    /// gRPC listen address; port 0 picks a free one (written to
    /// `<data_dir>/endpoint`).
    pub listen: SocketAddr,
    /// Seconds a shutdown waits for open streams before it closes them.
    /// Sandboxes and their commands keep running either way.
    pub shutdown_grace_secs: u64,
    /// Seconds between sweeps (TTL, idle timeout, orphans, pool refill).
    pub sweep_interval_secs: u64,
    /// Runs executing at once; the others wait in the queue.
    pub max_running_runs: usize,
    /// Runs of one owner executing at once; owners take turns.
    pub max_running_runs_per_owner: usize,
    /// The key that seals run secrets at rest (created 0600 on first start);
    /// default `<data_dir>/secrets.key`.
    pub secrets_key_file: Option<PathBuf>,
    /// A Cedar policy file to keep in force: read at start and whenever it
    /// changes (checked every 2 s); a new content that validates becomes the
    /// next policy version, one that does not is logged and ignored.
    pub policy_file: Option<PathBuf>,
    /// Seconds a pending approval waits for a decision before it expires
    /// (fails closed, recorded as `expired`).
    pub approval_ttl_secs: u64,
    /// An http:// URL that gets a JSON POST for every new pending approval.
    pub approval_webhook_url: Option<String>,
    pub docker: DockerConfig,
    pub sandbox: SandboxDefaults,
    /// Warm pools, one per profile.
    pub pool: Vec<PoolProfile>,
    pub tls: TlsConfig,
    pub audit: AuditConfig,
}

/// The audit log.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuditConfig {
    /// Start over an audit log whose stored tail does not verify: keep the
    /// log as it is and continue the chain after it, the first new entry
    /// (`audit.damage`) saying what was found. Off, the control plane
    /// refuses to start and names the first bad entry. Meant for the one
    /// start that accepts a damage, not to be left on.
    pub continue_after_damage: bool,
}

/// TLS on the gRPC listener; both unset: plain HTTP/2 (bind to loopback).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain.
    pub cert: Option<PathBuf>,
    /// PEM private key.
    pub key: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DockerConfig {
    /// Empty: `DOCKER_HOST` or the local default socket.
    pub host: String,
    /// Sandboxes created at once, at most (the rest wait their turn).
    pub max_concurrent_creates: usize,
    /// Extra labels put on every container and workspace volume this
    /// control plane creates, e.g. to tell one deployment's or one test
    /// run's objects apart (`--set 'docker.labels={ "team" = "a" }'`). The
    /// control plane's own labels ([`OWN_DOCKER_LABELS`]) cannot be set here.
    pub labels: BTreeMap<String, String>,
}

/// The labels the control plane puts on its containers and volumes itself,
/// and finds them by: `docker.labels` may not name them.
pub const OWN_DOCKER_LABELS: [&str; 3] = ["bridle.control-plane", "bridle.sandbox", "bridle.owner"];

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SandboxDefaults {
    /// Image with the agent at `/usr/local/bin/sandbox-agent` (images/build.sh).
    pub image: String,
    /// When set, this static agent binary is bind-mounted read-only into
    /// every sandbox and is its entrypoint, so any local image works.
    pub inject_agent: Option<PathBuf>,
    /// `uid:gid` the agent and every command run as.
    pub user: String,
    pub memory_bytes: u64,
    pub cpu_millis: u64,
    pub pids: u64,
    /// Size of the `/tmp` tmpfs.
    pub tmp_bytes: u64,
    /// 0: the workspace is a Docker volume (populated from the image's
    /// `/workspace`, which must belong to `user`). Otherwise a tmpfs of this
    /// size owned by `user`: what images without such a directory need
    /// (with `inject_agent`, any image).
    pub workspace_tmpfs_bytes: u64,
    /// Size of each sandbox's workspace filesystem (a loop-mounted ext4
    /// image, sparse: it takes host disk only as it fills), enforced by the
    /// kernel. 0: no disk limit (a Docker volume, bounded only by the host's
    /// disk). Needs the control plane to run as root.
    pub disk_bytes: u64,
    /// Largest values a request may ask for.
    pub max_memory_bytes: u64,
    pub max_disk_bytes: u64,
    pub max_cpu_millis: u64,
    pub max_pids: u64,
    /// "none" or "bridge".
    pub network: String,
    /// Whether a request may ask for a network other than "none".
    pub allow_network: bool,
    /// 0: no TTL unless the request sets one.
    pub ttl_secs: u64,
    /// 0: no idle timeout unless the request sets one.
    pub idle_timeout_secs: u64,
    /// Seconds to wait for a new sandbox's agent to answer its health check.
    pub ready_timeout_secs: u64,
    /// Sandboxes one owner may have at once (0: no limit).
    pub max_per_owner: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PoolProfile {
    pub name: String,
    /// How many ready, unclaimed sandboxes to keep.
    pub size: usize,
    /// Empty fields take `[sandbox]`'s values.
    pub image: String,
    pub memory_bytes: u64,
    pub cpu_millis: u64,
    pub pids: u64,
    pub disk_bytes: u64,
    pub network: String,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: default_data_dir(),
            listen: SocketAddr::from(([127, 0, 0, 1], 7443)),
            shutdown_grace_secs: 10,
            sweep_interval_secs: 15,
            max_running_runs: 4,
            max_running_runs_per_owner: 2,
            secrets_key_file: None,
            policy_file: None,
            approval_ttl_secs: 3600,
            approval_webhook_url: None,
            docker: DockerConfig::default(),
            sandbox: SandboxDefaults::default(),
            pool: Vec::new(),
            tls: TlsConfig::default(),
            audit: AuditConfig::default(),
        }
    }
}

impl Default for DockerConfig {
    fn default() -> Self {
        Self {
            host: String::new(),
            max_concurrent_creates: 16,
            labels: BTreeMap::new(),
        }
    }
}

impl Default for SandboxDefaults {
    fn default() -> Self {
        Self {
            image: "bridle-sandbox:base".into(),
            inject_agent: None,
            user: "1000:1000".into(),
            memory_bytes: 512 << 20,
            cpu_millis: 1000,
            pids: 256,
            tmp_bytes: 64 << 20,
            workspace_tmpfs_bytes: 0,
            disk_bytes: 1 << 30,
            max_memory_bytes: 8 << 30,
            max_disk_bytes: 16 << 30,
            max_cpu_millis: 4000,
            max_pids: 4096,
            network: "none".into(),
            allow_network: true,
            ttl_secs: 0,
            idle_timeout_secs: 0,
            ready_timeout_secs: 30,
            max_per_owner: 32,
        }
    }
}

impl Default for PoolProfile {
    fn default() -> Self {
        Self {
            name: "default".into(),
            size: 0,
            image: String::new(),
            memory_bytes: 0,
            cpu_millis: 0,
            pids: 0,
            disk_bytes: 0,
            network: String::new(),
        }
    }
}

/// Name of the file in the data directory that holds the address the server
/// listens on (useful with `listen = "127.0.0.1:0"`).
pub use bridle_client::data_dir::ENDPOINT_FILE;
/// Name of the file in the data directory that holds this control plane's
/// instance id, the value of the `bridle.control-plane` label on its
/// containers.
pub const INSTANCE_FILE: &str = "instance";

/// `/var/lib/bridle` for root, else `$XDG_DATA_HOME/bridle` or
/// `~/.local/share/bridle`: where clients on this machine look too.
pub use bridle_client::data_dir::default_data_dir;

/// Environment variables that are not configuration keys.
const NOT_CONFIG: &[&str] = &[
    "BRIDLE_CONFIG",
    "BRIDLE_LOG",
    "BRIDLE_TOKEN",
    "BRIDLE_ENDPOINT",
];

impl Config {
    /// Builds the layered configuration. `file` is read when given (a missing
    /// file is an error then); `env` is the process environment (passed in so
    /// tests can supply their own); `sets` are `key.path=value` flags.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        sets: &[String],
    ) -> Result<Self, Error> {
        let mut tree =
            toml::Table::try_from(Config::default()).map_err(|e| Error::Invalid(e.to_string()))?;
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
                path: path.into(),
                source,
            })?;
            let from_file: toml::Table =
                text.parse().map_err(|e: toml::de::Error| Error::File {
                    path: path.into(),
                    message: e.to_string(),
                })?;
            merge(&mut tree, from_file);
        }
        let mut env: Vec<(String, String)> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with("BRIDLE_") && !NOT_CONFIG.contains(&k.as_str()))
            .collect();
        env.sort();
        for (key, value) in env {
            let path: Vec<String> = key["BRIDLE_".len()..]
                .split("__")
                .map(|s| s.to_ascii_lowercase())
                .collect();
            // Other programs' BRIDLE_* variables (the agent's, the tests')
            // are not ours: only known top-level keys are applied.
            if !Config::default_keys().contains(&path[0].as_str()) {
                continue;
            }
            set_path(&mut tree, &path, &value).map_err(|message| Error::Override {
                origin: key.clone(),
                message,
            })?;
        }
        for set in sets {
            let Some((key, value)) = set.split_once('=') else {
                return Err(Error::Override {
                    origin: format!("--set {set}"),
                    message: "expected key.path=value".into(),
                });
            };
            let path: Vec<String> = key.trim().split('.').map(str::to_string).collect();
            set_path(&mut tree, &path, value).map_err(|message| Error::Override {
                origin: format!("--set {set}"),
                message,
            })?;
        }
        let config: Config = toml::Value::Table(tree)
            .try_into()
            .map_err(|e: toml::de::Error| Error::Invalid(one_line(&e.to_string())))?;
        config.validate()?;
        Ok(config)
    }

    fn default_keys() -> &'static [&'static str] {
        &[
            "data_dir",
            "listen",
            "shutdown_grace_secs",
            "sweep_interval_secs",
            "max_running_runs",
            "max_running_runs_per_owner",
            "secrets_key_file",
            "policy_file",
            "approval_ttl_secs",
            "approval_webhook_url",
            "docker",
            "sandbox",
            "tls",
            "audit",
        ]
    }

    fn validate(&self) -> Result<(), Error> {
        let s = &self.sandbox;
        match parse_user(&s.user) {
            None => {
                return Err(Error::Invalid(format!(
                    "sandbox.user must be uid:gid, got {:?}",
                    s.user
                )))
            }
            // Root in a sandbox could undo what keeps the sandbox from the
            // agent (its socket directory, its peer check).
            Some((0, _)) => {
                return Err(Error::Invalid(
                    "sandbox.user must not be root (uid 0)".into(),
                ))
            }
            Some(_) => {}
        }
        for network in std::iter::once(&s.network).chain(self.pool.iter().map(|p| &p.network)) {
            if !network.is_empty() && network != "none" && network != "bridge" {
                return Err(Error::Invalid(format!(
                    "network must be \"none\" or \"bridge\", got {network:?}"
                )));
            }
        }
        if s.network.is_empty() {
            return Err(Error::Invalid("sandbox.network must be set".into()));
        }
        let mut names = std::collections::HashSet::new();
        for p in &self.pool {
            if p.name.is_empty() || !names.insert(&p.name) {
                return Err(Error::Invalid(format!(
                    "every [[pool]] needs a unique, non-empty name (got {:?})",
                    p.name
                )));
            }
        }
        if self.approval_ttl_secs == 0 {
            return Err(Error::Invalid(
                "approval_ttl_secs must be at least 1".into(),
            ));
        }
        if let Some(url) = &self.approval_webhook_url {
            if !url.starts_with("http://") && !url.starts_with("https://") {
                return Err(Error::Invalid(format!(
                    "approval_webhook_url must be an http:// or https:// URL, got {url:?}"
                )));
            }
        }
        if self.tls.cert.is_some() != self.tls.key.is_some() {
            return Err(Error::Invalid(
                "tls.cert and tls.key must be set together".into(),
            ));
        }
        if self.sweep_interval_secs == 0 {
            return Err(Error::Invalid(
                "sweep_interval_secs must be at least 1".into(),
            ));
        }
        for key in self.docker.labels.keys() {
            if key.is_empty() {
                return Err(Error::Invalid(
                    "docker.labels: a label's key must not be empty".into(),
                ));
            }
            if OWN_DOCKER_LABELS.contains(&key.as_str()) {
                return Err(Error::Invalid(format!(
                    "docker.labels: {key:?} is one of the control plane's own labels \
                     ({}), which it sets itself and finds its objects by",
                    OWN_DOCKER_LABELS.join(", ")
                )));
            }
        }
        Ok(())
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot print: {e}\n"))
    }
}

/// toml's messages span lines (with a caret under the spot); errors here
/// are one line.
fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// `uid:gid` as numbers.
pub fn parse_user(s: &str) -> Option<(u32, u32)> {
    let (u, g) = s.split_once(':')?;
    Some((u.parse().ok()?, g.parse().ok()?))
}

fn merge(into: &mut toml::Table, from: toml::Table) {
    for (k, v) in from {
        match (into.get_mut(&k), v) {
            (Some(toml::Value::Table(a)), toml::Value::Table(b)) => merge(a, b),
            (_, v) => {
                into.insert(k, v);
            }
        }
    }
}

/// Sets `path` to `raw`, read as a TOML value when it is one (numbers,
/// booleans, arrays) and as a string otherwise.
fn set_path(tree: &mut toml::Table, path: &[String], raw: &str) -> Result<(), String> {
    let value = format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    let (last, parents) = path.split_last().ok_or("empty key")?;
    let mut table = tree;
    for p in parents {
        table = match table
            .entry(p.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
        {
            toml::Value::Table(t) => t,
            _ => return Err(format!("{p} is not a section")),
        };
    }
    table.insert(last.clone(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn layers_apply_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(
            &file,
            "listen = \"127.0.0.1:1000\"\n[sandbox]\nimage = \"from-file\"\npids = 7\n[[pool]]\nname = \"small\"\nsize = 2\n",
        )
        .unwrap();
        let c = Config::load(
            Some(&file),
            env(&[
                ("BRIDLE_SANDBOX__IMAGE", "from-env"),
                ("BRIDLE_LISTEN", "127.0.0.1:2000"),
                ("BRIDLE_AGENT_SOCKET", "/ignored"),
                ("BRIDLE_TOKEN", "ignored"),
            ]),
            &["listen=127.0.0.1:3000".into()],
        )
        .unwrap();
        assert_eq!(c.sandbox.image, "from-env");
        assert_eq!(c.sandbox.pids, 7);
        assert_eq!(c.listen.port(), 3000);
        assert_eq!(c.pool[0].name, "small");
        assert_eq!(c.pool[0].size, 2);
        assert_eq!(c.sandbox.memory_bytes, 512 << 20, "defaults survive");
        // What is printed loads back to the same configuration.
        let again = dir.path().join("again.toml");
        std::fs::write(&again, c.to_toml()).unwrap();
        let c2 = Config::load(Some(&again), Vec::new(), &[]).unwrap();
        assert_eq!(c2.to_toml(), c.to_toml());
    }

    #[test]
    fn continuing_after_audit_damage_is_off_unless_asked_for() {
        assert!(!Config::default().audit.continue_after_damage);
        assert!(Config::default()
            .to_toml()
            .contains("continue_after_damage = false"));
        let c = Config::load(
            None,
            env(&[("BRIDLE_AUDIT__CONTINUE_AFTER_DAMAGE", "true")]),
            &[],
        )
        .unwrap();
        assert!(c.audit.continue_after_damage);
        let c = Config::load(
            None,
            Vec::new(),
            &["audit.continue_after_damage=true".into()],
        )
        .unwrap();
        assert!(c.audit.continue_after_damage);
    }

    #[test]
    fn docker_labels_are_a_table_without_the_control_planes_own() {
        assert!(Config::default().docker.labels.is_empty());
        // A table given as one --set (keys with dots quoted), or by the
        // environment.
        let c = Config::load(
            None,
            env(&[("BRIDLE_DOCKER__LABELS", "{ team = \"a\" }")]),
            &[r#"docker.labels={ "bridle.test.owner" = "12:34", "x" = "y" }"#.into()],
        )
        .unwrap();
        assert_eq!(
            c.docker.labels,
            BTreeMap::from([
                ("bridle.test.owner".to_string(), "12:34".to_string()),
                ("x".to_string(), "y".to_string()),
            ])
        );
        let c = Config::load(
            None,
            env(&[("BRIDLE_DOCKER__LABELS", "{ team = \"a\" }")]),
            &[],
        )
        .unwrap();
        assert_eq!(c.docker.labels.get("team").map(String::as_str), Some("a"));
        // What is printed loads back.
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, c.to_toml()).unwrap();
        let again = Config::load(Some(&file), Vec::new(), &[]).unwrap();
        assert_eq!(again.docker.labels, c.docker.labels);
        // The control plane's own labels, and an empty key, are refused,
        // naming the key.
        for own in OWN_DOCKER_LABELS {
            let set = format!("docker.labels={{ {own:?} = \"mine\" }}");
            let e = Config::load(None, Vec::new(), &[set]).unwrap_err();
            assert!(e.to_string().contains(own), "{e}");
        }
        let e =
            Config::load(None, Vec::new(), &[r#"docker.labels={ "" = "v" }"#.into()]).unwrap_err();
        assert!(e.to_string().contains("docker.labels"), "{e}");
    }

    #[test]
    fn bad_values_name_their_origin() {
        let e = Config::load(None, env(&[("BRIDLE_SANDBOX__PIDS", "lots")]), &[]).unwrap_err();
        assert!(e.to_string().contains("pids"), "{e}");
        let e = Config::load(None, Vec::new(), &["sandbox.network=wifi".into()]).unwrap_err();
        assert!(e.to_string().contains("network"), "{e}");
        let e = Config::load(None, Vec::new(), &["nonsense".into()]).unwrap_err();
        assert!(e.to_string().contains("--set nonsense"), "{e}");
        let e = Config::load(None, Vec::new(), &["sandbox.colour=red".into()]).unwrap_err();
        assert!(e.to_string().contains("colour"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "listen = [\n").unwrap();
        let e = Config::load(Some(&file), Vec::new(), &[]).unwrap_err();
        assert!(e.to_string().contains("c.toml"), "{e}");
    }
}
