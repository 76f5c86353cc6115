//! What a sandbox is: its [`Spec`] (image, limits, network, env, labels),
//! its [`SandboxState`], a validated [`CreateRequest`], and the checks a
//! client's values go through before anything is made.

use std::collections::BTreeMap;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The network is the runtime's to give; re-exported as part of a [`Spec`].
pub use crate::runtime::Network;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SandboxState {
    Creating,
    Ready,
    Paused,
    Failed,
}

impl SandboxState {
    pub fn as_str(self) -> &'static str {
        match self {
            SandboxState::Creating => "creating",
            SandboxState::Ready => "ready",
            SandboxState::Paused => "paused",
            SandboxState::Failed => "failed",
        }
    }
}

impl FromStr for SandboxState {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "creating" => Ok(SandboxState::Creating),
            "ready" => Ok(SandboxState::Ready),
            "paused" => Ok(SandboxState::Paused),
            "failed" => Ok(SandboxState::Failed),
            other => Err(format!("unknown sandbox state {other:?}")),
        }
    }
}

/// What a sandbox is made of; stored with its record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Spec {
    pub image: String,
    pub memory_bytes: u64,
    pub cpu_millis: u64,
    pub pids: u64,
    /// Size of the workspace's filesystem; 0: no limit (see `disks`).
    #[serde(default)]
    pub disk_bytes: u64,
    pub network: Network,
    /// Added to every exec's environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

impl Spec {
    /// Whether a pooled sandbox made for `other` can serve this spec (env and
    /// labels are applied at claim time).
    pub(super) fn same_machine(&self, other: &Spec) -> bool {
        self.image == other.image
            && self.memory_bytes == other.memory_bytes
            && self.cpu_millis == other.cpu_millis
            && self.pids == other.pids
            && self.disk_bytes == other.disk_bytes
            && self.network == other.network
    }
}

/// Labels with this prefix are the control plane's (a run's sandbox is
/// found by one): clients may not set them.
pub const RESERVED_LABEL_PREFIX: &str = "bridle.";
/// Exec ids with this prefix belong to the control plane (a run's steps,
/// and later an agent's tool calls): clients can neither start nor attach to
/// one, so none can be chosen or pre-registered through the API.
pub const RESERVED_EXEC_ID_PREFIX: &str = "bridle.";
/// The longest TTL or idle timeout a sandbox may be given (ten years).
pub const MAX_LIFETIME_SECS: u64 = 10 * 365 * 24 * 3600;

/// Refuses labels a client may not set.
pub fn check_client_labels<'a>(
    mut keys: impl Iterator<Item = &'a String>,
) -> std::result::Result<(), String> {
    match keys.find(|k| k.starts_with(RESERVED_LABEL_PREFIX)) {
        Some(k) => Err(format!(
            "label {k:?}: labels starting with {RESERVED_LABEL_PREFIX:?} are the control plane's own"
        )),
        None => Ok(()),
    }
}

/// Refuses a TTL or idle timeout that is out of range.
pub fn check_lifetime(name: &str, secs: u64) -> std::result::Result<(), String> {
    if secs > MAX_LIFETIME_SECS {
        return Err(format!(
            "{name} must be at most {MAX_LIFETIME_SECS} seconds (ten years), got {secs}"
        ));
    }
    Ok(())
}

/// A validated create request; unset values take the server's defaults.
#[derive(Debug, Clone, Default)]
pub struct CreateRequest {
    pub image: Option<String>,
    pub memory_bytes: Option<u64>,
    pub cpu_millis: Option<u64>,
    pub pids: Option<u64>,
    pub disk_bytes: Option<u64>,
    pub network: Option<Network>,
    pub env: BTreeMap<String, String>,
    pub labels: BTreeMap<String, String>,
    pub ttl_secs: u64,
    pub idle_timeout_secs: u64,
    pub from_snapshot: Option<String>,
}
