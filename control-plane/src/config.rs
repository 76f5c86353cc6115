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
    /// Models agent sessions may use, picked by name (`[[model]]`).
    pub model: Vec<ModelConfig>,
    /// Bounds on agent sessions.
    pub harness: HarnessConfig,
    /// `egress` sandboxes' proxy (docs/network.md).
    pub egress: EgressConfig,
}

/// The egress proxy (`[egress]`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EgressConfig {
    /// Networks (`address/bits`) taken as public: a lab's or a test suite's
    /// network that stands in for the internet. Empty in production.
    pub treat_as_public: Vec<String>,
    /// Names the proxy resolves to these addresses instead of asking DNS
    /// (pinned hosts, test servers).
    pub hosts: std::collections::BTreeMap<String, String>,
    /// Credentials the proxy adds to a host's requests, so that commands
    /// use a service without ever reading its secret (`[[egress.credentials]]`).
    pub credentials: Vec<EgressCredential>,
}

/// A header the proxy sets on every plain-HTTP request to `host` and `port`
/// (80 when not given), its value read at start from the environment
/// variable `value_env` or the file `value_file`. What a command sent in
/// that header is replaced. HTTPS requests cannot be given one: their
/// headers are encrypted between the command and the server.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EgressCredential {
    pub host: String,
    pub port: Option<u16>,
    pub header: String,
    pub value_env: String,
    pub value_file: String,
}

impl EgressConfig {
    /// `credentials` with their values read (from the environment or the
    /// file each names) and checked.
    pub fn credentials(&self) -> Result<Vec<crate::egress::proxy::Credential>, Error> {
        self.credentials
            .iter()
            .map(|c| {
                let at = format!("egress.credentials for {:?}", c.host);
                let host = c.host.trim_end_matches('.').to_ascii_lowercase();
                if host.is_empty() {
                    return Err(Error::Invalid(format!("{at}: host is required")));
                }
                let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
                if c.header.is_empty() || !c.header.bytes().all(token) {
                    return Err(Error::Invalid(format!(
                        "{at}: header {:?} is not a header name",
                        c.header
                    )));
                }
                // Headers that frame or route the request: set by the proxy,
                // they would make it another request.
                let framing = [
                    "host",
                    "content-length",
                    "transfer-encoding",
                    "connection",
                    "keep-alive",
                    "upgrade",
                    "te",
                    "trailer",
                    "expect",
                ];
                let lower = c.header.to_ascii_lowercase();
                if framing.contains(&lower.as_str()) || lower.starts_with("proxy-") {
                    return Err(Error::Invalid(format!(
                        "{at}: header {} frames or routes the request; it cannot be a credential",
                        c.header
                    )));
                }
                let value = match (c.value_env.is_empty(), c.value_file.is_empty()) {
                    (false, true) => std::env::var(&c.value_env).map_err(|_| {
                        Error::Invalid(format!("{at}: the variable {} is not set", c.value_env))
                    })?,
                    (true, false) => std::fs::read_to_string(&c.value_file)
                        .map_err(|e| {
                            Error::Invalid(format!("{at}: reading {}: {e}", c.value_file))
                        })?
                        .trim_end_matches(['\r', '\n'])
                        .to_string(),
                    _ => {
                        return Err(Error::Invalid(format!(
                            "{at}: set one of value_env and value_file"
                        )))
                    }
                };
                if value.is_empty() || value.bytes().any(|b| (b < 0x20 && b != b'\t') || b == 0x7f)
                {
                    return Err(Error::Invalid(format!(
                        "{at}: the value is empty or has a line break or another control character"
                    )));
                }
                Ok(crate::egress::proxy::Credential {
                    host,
                    port: c.port.unwrap_or(80),
                    header: c.header.clone(),
                    value,
                })
            })
            .collect()
    }

    /// `treat_as_public` parsed.
    pub fn public_networks(&self) -> Result<Vec<(std::net::IpAddr, u8)>, Error> {
        self.treat_as_public
            .iter()
            .map(|n| {
                let bad =
                    || Error::Invalid(format!("egress.treat_as_public: {n:?} is not address/bits"));
                let (addr, bits) = n.split_once('/').ok_or_else(bad)?;
                let addr: std::net::IpAddr = addr.parse().map_err(|_| bad())?;
                let bits: u8 = bits.parse().map_err(|_| bad())?;
                let max = if addr.is_ipv4() { 32 } else { 128 };
                if bits > max {
                    return Err(bad());
                }
                Ok((addr, bits))
            })
            .collect()
    }
}

/// Bounds on every agent session (`[harness]`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HarnessConfig {
    /// The most a session may spend (`[harness.max]`: max_iterations,
    /// max_input_tokens, max_output_tokens, max_wall_secs, max_tool_calls,
    /// max_cost_usd); a task's zero budgets take these, larger ones are
    /// refused.
    pub max: crate::harness::limits::Budgets,
    /// How long a shell call may run when it does not say (seconds).
    pub tool_timeout_secs: u32,
    /// A tool result longer than this (bytes) is stored whole and shown to
    /// the model as its head and tail.
    pub max_result_bytes: usize,
}

impl Default for HarnessConfig {
    fn default() -> Self {
        Self {
            max: crate::harness::limits::Budgets::default(),
            tool_timeout_secs: 600,
            max_result_bytes: 16 << 10,
        }
    }
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

/// One model an operator offers to agent sessions: where it is served, in
/// which wire format, with which key, and what it holds and costs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// What sessions pick the model by: unique, `[a-z0-9._-]+`.
    #[serde(default)]
    pub name: String,
    /// The wire format the server speaks.
    pub provider: ProviderKind,
    /// `openai`: the base including the version path
    /// (`https://api.openai.com/v1`, `http://localhost:11434/v1`), to which
    /// `/chat/completions` is appended. `anthropic`: the bare base
    /// (`https://api.anthropic.com`), to which `/v1/messages` is appended.
    #[serde(default)]
    pub base_url: String,
    /// The provider's own id for the model; empty: `name`.
    #[serde(default)]
    pub model: String,
    /// The environment variable that holds the API key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_env: Option<String>,
    /// A file that holds the API key (read at start, trimmed). Neither
    /// this nor `api_key_env`: no key is sent (local servers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_file: Option<PathBuf>,
    /// The model's context window in tokens (required).
    #[serde(default)]
    pub context_window: u64,
    /// The most tokens one answer may have (required).
    #[serde(default)]
    pub max_output_tokens: u32,
    /// USD per million input tokens; none: the model's cost is not counted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub price_input_per_mtok: Option<f64>,
    /// USD per million output tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub price_output_per_mtok: Option<f64>,
    /// Seconds one request may take, its whole streamed answer included.
    #[serde(default = "default_request_timeout_secs")]
    pub request_timeout_secs: u64,
    /// Tries after the first when the provider is busy or unreachable
    /// (429, 5xx, a connection error, a cut stream).
    #[serde(default = "default_max_retries")]
    pub max_retries: u32,
    /// The first wait before trying again, doubled (with jitter) on each
    /// retry up to a minute; a `Retry-After` from the provider wins.
    #[serde(default = "default_retry_min_delay_ms")]
    pub retry_min_delay_ms: u64,
    /// The key, read from `api_key_env` or `api_key_file` at load. Never
    /// printed: not by `--dump-config`, not by `Debug`.
    #[serde(skip)]
    pub api_key: Option<ApiKey>,
}

fn default_request_timeout_secs() -> u64 {
    300
}

fn default_max_retries() -> u32 {
    4
}

fn default_retry_min_delay_ms() -> u64 {
    1000
}

/// The wire format of a `[[model]]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ProviderKind {
    /// OpenAI-compatible Chat Completions (OpenAI, Ollama, vLLM,
    /// llama.cpp's server, LiteLLM, ...).
    #[serde(rename = "openai")]
    OpenAi,
    /// Anthropic Messages.
    #[serde(rename = "anthropic")]
    Anthropic,
}

impl ProviderKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::OpenAi => "openai",
            ProviderKind::Anthropic => "anthropic",
        }
    }
}

/// An API key. It prints as `***` (`Debug` and `Display`) and cannot be
/// serialized, so no log line or config dump shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(String);

impl ApiKey {
    pub fn new(key: String) -> Self {
        ApiKey(key)
    }

    /// The key itself, for the one header that carries it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

impl std::fmt::Display for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

impl ModelConfig {
    /// Where the key comes from, for messages (never the key itself).
    pub fn key_source(&self) -> String {
        match (&self.api_key_env, &self.api_key_file) {
            (Some(var), _) => format!("api_key_env {var}"),
            (None, Some(path)) => format!("api_key_file {}", path.display()),
            (None, None) => "no key configured (set api_key_env or api_key_file)".into(),
        }
    }

    fn validate(&self) -> Result<(), Error> {
        match self.problem() {
            Some(problem) => Err(Error::Invalid(format!(
                "[[model]] {:?}: {problem}",
                self.name
            ))),
            None => Ok(()),
        }
    }

    /// The first thing wrong with the entry, if any.
    fn problem(&self) -> Option<String> {
        let name_ok = !self.name.is_empty()
            && self
                .name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
        if !name_ok {
            return Some("name must be non-empty and made of a-z, 0-9, '.', '_' and '-'".into());
        }
        match reqwest::Url::parse(&self.base_url) {
            Ok(url) if matches!(url.scheme(), "http" | "https") && url.has_host() => {}
            _ => {
                return Some(format!(
                    "base_url must be an http:// or https:// URL, got {:?}",
                    self.base_url
                ))
            }
        }
        if self.api_key_env.is_some() && self.api_key_file.is_some() {
            return Some("set api_key_env or api_key_file, not both".into());
        }
        if self.api_key_env.as_deref() == Some("") {
            return Some("api_key_env must name an environment variable".into());
        }
        if self.context_window == 0 {
            return Some("context_window is required: the model's context window in tokens".into());
        }
        if self.max_output_tokens == 0 {
            return Some(
                "max_output_tokens is required: the most tokens an answer may have".into(),
            );
        }
        if u64::from(self.max_output_tokens) > self.context_window {
            return Some(format!(
                "max_output_tokens ({}) is larger than context_window ({})",
                self.max_output_tokens, self.context_window
            ));
        }
        for (field, price) in [
            ("price_input_per_mtok", self.price_input_per_mtok),
            ("price_output_per_mtok", self.price_output_per_mtok),
        ] {
            if let Some(p) = price {
                if !p.is_finite() || p < 0.0 {
                    return Some(format!(
                        "{field} must be a number of USD per million tokens, at least 0, got {p}"
                    ));
                }
            }
        }
        if self.request_timeout_secs == 0 {
            return Some("request_timeout_secs must be at least 1".into());
        }
        if self.max_retries > MAX_MODEL_RETRIES {
            return Some(format!(
                "max_retries must be at most {MAX_MODEL_RETRIES}, got {}",
                self.max_retries
            ));
        }
        if self.retry_min_delay_ms > 60_000 {
            return Some(format!(
                "retry_min_delay_ms must be at most 60000 (a minute), got {}",
                self.retry_min_delay_ms
            ));
        }
        None
    }

    /// Reads the key from where the entry says: the variable in `env`, or
    /// the file. An unset or empty source is an error naming it.
    fn load_key(&mut self, env: &[(String, String)]) -> Result<(), Error> {
        let entry = format!("[[model]] {:?}", self.name);
        let key = match (&self.api_key_env, &self.api_key_file) {
            (Some(var), _) => {
                let value = env.iter().find(|(k, _)| k == var).map(|(_, v)| v.trim());
                match value {
                    Some(v) if !v.is_empty() => v.to_string(),
                    Some(_) => {
                        return Err(Error::Invalid(format!(
                            "{entry}: the environment variable {var} (api_key_env) is empty"
                        )))
                    }
                    None => {
                        return Err(Error::Invalid(format!(
                            "{entry}: the environment variable {var} (api_key_env) is not set"
                        )))
                    }
                }
            }
            (None, Some(path)) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    Error::Invalid(format!(
                        "{entry}: reading api_key_file {}: {e}",
                        path.display()
                    ))
                })?;
                let key = text.trim();
                if key.is_empty() {
                    return Err(Error::Invalid(format!(
                        "{entry}: api_key_file {} is empty",
                        path.display()
                    )));
                }
                key.to_string()
            }
            (None, None) => return Ok(()),
        };
        self.api_key = Some(ApiKey(key));
        Ok(())
    }
}

/// Retries of one model call, at most (each waits up to a minute).
const MAX_MODEL_RETRIES: u32 = 20;

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
            model: Vec::new(),
            harness: HarnessConfig::default(),
            egress: EgressConfig::default(),
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
        // All of it: `[[model]] api_key_env` may name any variable.
        let env: Vec<(String, String)> = env.into_iter().collect();
        let mut ours: Vec<(String, String)> = env
            .iter()
            .filter(|(k, _)| k.starts_with("BRIDLE_") && !NOT_CONFIG.contains(&k.as_str()))
            .cloned()
            .collect();
        ours.sort();
        for (key, value) in ours {
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
        let mut config: Config = toml::Value::Table(tree)
            .try_into()
            .map_err(|e: toml::de::Error| Error::Invalid(one_line(&e.to_string())))?;
        for m in &mut config.model {
            if m.model.is_empty() {
                m.model = m.name.clone();
            }
        }
        config.validate()?;
        for m in &mut config.model {
            m.load_key(&env)?;
        }
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
            "harness",
            "egress",
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
        self.egress.public_networks()?;
        self.egress.credentials()?;
        for (name, addr) in &self.egress.hosts {
            if addr.parse::<std::net::IpAddr>().is_err() {
                return Err(Error::Invalid(format!(
                    "egress.hosts.{name}: {addr:?} is not an IP address"
                )));
            }
        }
        let h = &self.harness;
        if !(1..=crate::harness::tools::builtin::MAX_TIMEOUT_SECS).contains(&h.tool_timeout_secs) {
            return Err(Error::Invalid(format!(
                "harness.tool_timeout_secs must be 1 to {}, got {}",
                crate::harness::tools::builtin::MAX_TIMEOUT_SECS,
                h.tool_timeout_secs
            )));
        }
        if h.max_result_bytes < 1024 {
            return Err(Error::Invalid(format!(
                "harness.max_result_bytes must be at least 1024, got {}",
                h.max_result_bytes
            )));
        }
        let m = &h.max;
        if m.max_iterations == 0
            || m.max_input_tokens == 0
            || m.max_output_tokens == 0
            || m.max_wall_secs == 0
            || m.max_tool_calls == 0
        {
            return Err(Error::Invalid(
                "harness.max: every maximum must be at least 1".into(),
            ));
        }
        if m.max_cost_usd.is_some_and(|c| !c.is_finite() || c <= 0.0) {
            return Err(Error::Invalid(
                "harness.max.max_cost_usd must be a positive number of USD".into(),
            ));
        }
        let mut model_names = std::collections::HashSet::new();
        for m in &self.model {
            m.validate()?;
            if !model_names.insert(&m.name) {
                return Err(Error::Invalid(format!(
                    "[[model]] {:?} is configured twice: model names must be unique",
                    m.name
                )));
            }
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

    const MODELS: &str = r#"
[[model]]
name = "local-qwen"
provider = "openai"
base_url = "http://localhost:11434/v1"
model = "qwen3:8b"
context_window = 32768
max_output_tokens = 4096

[[model]]
name = "claude"
provider = "anthropic"
base_url = "https://api.anthropic.com"
api_key_env = "TEST_ANTHROPIC_KEY"
context_window = 200000
max_output_tokens = 8192
price_input_per_mtok = 3.0
price_output_per_mtok = 15.0
"#;

    #[test]
    fn models_load_with_their_defaults_and_keys_never_print() {
        assert!(Config::default().model.is_empty());
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, MODELS).unwrap();
        let key_env = env(&[("TEST_ANTHROPIC_KEY", "sk-ant-secret-4417\n")]);
        let c = Config::load(Some(&file), key_env.clone(), &[]).unwrap();
        assert_eq!(c.model.len(), 2);
        let local = &c.model[0];
        assert_eq!(local.provider, ProviderKind::OpenAi);
        assert_eq!(local.model, "qwen3:8b");
        assert!(
            local.api_key.is_none(),
            "no key source: no key (a local server)"
        );
        assert_eq!(local.request_timeout_secs, 300);
        assert_eq!(local.max_retries, 4);
        assert_eq!(local.price_input_per_mtok, None);
        let claude = &c.model[1];
        assert_eq!(claude.provider, ProviderKind::Anthropic);
        assert_eq!(
            claude.model, "claude",
            "the provider's model id defaults to the name"
        );
        assert_eq!(
            claude.api_key.as_ref().map(ApiKey::expose),
            Some("sk-ant-secret-4417"),
            "read from the variable, trimmed"
        );
        assert_eq!(claude.price_output_per_mtok, Some(15.0));
        // Neither the dump nor Debug shows the key; the dump says where it
        // comes from.
        let dump = c.to_toml();
        assert!(!dump.contains("sk-ant-secret-4417"), "{dump}");
        assert!(
            dump.contains("api_key_env = \"TEST_ANTHROPIC_KEY\""),
            "{dump}"
        );
        let debug = format!("{c:?}");
        assert!(!debug.contains("sk-ant-secret-4417"), "{debug}");
        assert!(debug.contains("***"), "{debug}");
        assert_eq!(format!("{}", ApiKey::new("k".into())), "***");
        // What is printed loads back (the key read again).
        let again = dir.path().join("again.toml");
        std::fs::write(&again, &dump).unwrap();
        let c2 = Config::load(Some(&again), key_env, &[]).unwrap();
        assert_eq!(c2.to_toml(), dump);
        assert_eq!(
            c2.model[1].api_key.as_ref().map(ApiKey::expose),
            Some("sk-ant-secret-4417")
        );
    }

    #[test]
    fn a_model_key_file_is_read_and_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("key");
        std::fs::write(&key, "  sk-from-file-93\n").unwrap();
        let set = format!(
            "model=[{{ name = \"gpt\", provider = \"openai\", \
             base_url = \"https://api.openai.com/v1\", model = \"gpt-4.1\", api_key_file = {:?}, \
             context_window = 1000, max_output_tokens = 100 }}]",
            key.display().to_string()
        );
        let c = Config::load(None, Vec::new(), &[set]).unwrap();
        assert_eq!(
            c.model[0].api_key.as_ref().map(ApiKey::expose),
            Some("sk-from-file-93")
        );
        assert!(!c.to_toml().contains("sk-from-file-93"));
        std::fs::write(&key, " \n").unwrap();
        let set = format!(
            "model=[{{ name = \"gpt\", provider = \"openai\", \
             base_url = \"https://api.openai.com/v1\", api_key_file = {:?}, \
             context_window = 1000, max_output_tokens = 100 }}]",
            key.display().to_string()
        );
        let e = Config::load(None, Vec::new(), &[set]).unwrap_err();
        assert!(e.to_string().contains("api_key_file"), "{e}");
        assert!(e.to_string().contains("empty"), "{e}");
    }

    #[test]
    fn egress_credentials_are_read_at_load_and_bad_ones_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("auth");
        std::fs::write(&file, "Bearer from-file-77\n").unwrap();
        let set = |entry: &str| format!("egress.credentials=[{{ {entry} }}]");
        let good = set(&format!(
            r#"host = "Git.Internal.", header = "Authorization", value_file = {:?}"#,
            file.display().to_string()
        ));
        let c = Config::load(None, Vec::new(), &[good]).unwrap();
        let creds = c.egress.credentials().unwrap();
        assert_eq!(creds[0].host, "git.internal");
        assert_eq!(creds[0].value, "Bearer from-file-77");
        assert!(!format!("{creds:?}").contains("from-file-77"));
        assert!(!c.to_toml().contains("from-file-77"));
        for (entry, says) in [
            (
                r#"host = "x", header = "Bad Header", value_env = "HOME""#,
                "not a header name",
            ),
            (
                r#"host = "", header = "X-A", value_env = "HOME""#,
                "host is required",
            ),
            (
                r#"host = "x", header = "X-A""#,
                "one of value_env and value_file",
            ),
            (
                r#"host = "x", header = "Content-Length", value_env = "HOME""#,
                "frames or routes",
            ),
            (
                r#"host = "x", header = "Proxy-Authorization", value_env = "HOME""#,
                "frames or routes",
            ),
            (
                r#"host = "x", header = "X-A", value_env = "BRIDLE_TEST_SURELY_UNSET_42""#,
                "is not set",
            ),
        ] {
            let e = Config::load(None, Vec::new(), &[set(entry)]).unwrap_err();
            assert!(e.to_string().contains(says), "{entry}: {e}");
        }
        std::fs::write(&file, "a\r\nInjected: yes").unwrap();
        let split = set(&format!(
            r#"host = "x", header = "X-A", value_file = {:?}"#,
            file.display().to_string()
        ));
        let e = Config::load(None, Vec::new(), &[split]).unwrap_err();
        assert!(e.to_string().contains("line break"), "{e}");
    }

    #[test]
    fn bad_models_are_refused_naming_the_entry_and_the_field() {
        const OK: &str = "provider = \"openai\", base_url = \"http://localhost:11434/v1\", \
                          context_window = 1000, max_output_tokens = 100";
        let load = |entries: &[String]| {
            let tables: Vec<String> = entries.iter().map(|e| format!("{{ {e} }}")).collect();
            Config::load(
                None,
                env(&[("SET_KEY", "sk-set"), ("EMPTY_KEY", "")]),
                &[format!("model=[{}]", tables.join(", "))],
            )
        };
        let c = load(&[format!("name = \"m1\", {OK}")]).unwrap();
        assert_eq!(c.model[0].model, "m1");
        let c = load(&[format!("name = \"m1\", api_key_env = \"SET_KEY\", {OK}")]).unwrap();
        assert_eq!(
            c.model[0].api_key.as_ref().map(ApiKey::expose),
            Some("sk-set")
        );
        for (entry, words) in [
            (
                format!("name = \"Big Model\", {OK}"),
                &["Big Model", "name"][..],
            ),
            (format!("name = \"\", {OK}"), &["name"][..]),
            (
                "name = \"m1\", provider = \"openai\", base_url = \"ftp://host/v1\", \
                 context_window = 1000, max_output_tokens = 100"
                    .to_string(),
                &["m1", "base_url", "ftp://host/v1"][..],
            ),
            (
                "name = \"m1\", provider = \"openai\", base_url = \"http://localhost:11434/v1\", \
                 max_output_tokens = 100"
                    .to_string(),
                &["m1", "context_window"][..],
            ),
            (
                "name = \"m1\", provider = \"openai\", base_url = \"http://localhost:11434/v1\", \
                 context_window = 1000, max_output_tokens = 0"
                    .to_string(),
                &["m1", "max_output_tokens"][..],
            ),
            (
                "name = \"m1\", provider = \"openai\", base_url = \"http://localhost:11434/v1\", \
                 context_window = 1000, max_output_tokens = 2000"
                    .to_string(),
                &["m1", "max_output_tokens", "context_window"][..],
            ),
            (
                "name = \"m1\", provider = \"gemini\", base_url = \"http://localhost:11434/v1\", \
                 context_window = 1000, max_output_tokens = 100"
                    .to_string(),
                &["gemini", "openai", "anthropic"][..],
            ),
            (
                format!("name = \"m1\", price_input_per_mtok = -1.0, {OK}"),
                &["m1", "price_input_per_mtok"][..],
            ),
            (
                format!("name = \"m1\", request_timeout_secs = 0, {OK}"),
                &["m1", "request_timeout_secs"][..],
            ),
            (
                format!("name = \"m1\", api_key_env = \"SET_KEY\", api_key_file = \"/k\", {OK}"),
                &["m1", "api_key_env", "api_key_file", "not both"][..],
            ),
            (
                format!("name = \"m1\", api_key_env = \"TEST_NOT_SET_8812\", {OK}"),
                &["m1", "TEST_NOT_SET_8812", "not set"][..],
            ),
            (
                format!("name = \"m1\", api_key_env = \"EMPTY_KEY\", {OK}"),
                &["m1", "EMPTY_KEY", "empty"][..],
            ),
            (
                format!("name = \"m1\", api_key_file = \"/nonexistent/bridle-key\", {OK}"),
                &["m1", "/nonexistent/bridle-key"][..],
            ),
        ] {
            let e = load(std::slice::from_ref(&entry)).unwrap_err().to_string();
            for word in words {
                assert!(e.contains(word), "{entry}: {e:?} should name {word:?}");
            }
        }
        let e = load(&[
            format!("name = \"m1\", {OK}"),
            format!("name = \"m1\", {OK}"),
        ])
        .unwrap_err()
        .to_string();
        assert!(e.contains("\"m1\"") && e.contains("twice"), "{e}");
        // A key cannot be written into the configuration, and the refusal
        // does not repeat it.
        let e = load(&[format!("name = \"m1\", api_key = \"sk-inline-5150\", {OK}")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("api_key"), "{e}");
        assert!(!e.contains("sk-inline-5150"), "{e}");
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
