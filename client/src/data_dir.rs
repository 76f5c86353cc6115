//! The control plane's data directory, as a client on the same machine
//! reads it: the control plane writes these files, clients only read them.

use std::path::{Path, PathBuf};

/// Name of the file in the data directory that holds the address the
/// control plane listens on (useful with `listen = "127.0.0.1:0"`), as
/// `http://host:port` or `https://host:port`.
pub const ENDPOINT_FILE: &str = "endpoint";

/// Name of the file in the data directory that holds the bootstrap admin
/// token (mode 0600), written on the control plane's very first start.
pub const BOOTSTRAP_TOKEN_FILE: &str = "admin.token";

/// `/var/lib/bridle` for root, else `$XDG_DATA_HOME/bridle` or
/// `~/.local/share/bridle`.
pub fn default_data_dir() -> PathBuf {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return PathBuf::from("/var/lib/bridle");
    }
    if let Some(d) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("bridle");
    }
    match std::env::var_os("HOME") {
        Some(h) => PathBuf::from(h).join(".local/share/bridle"),
        None => PathBuf::from("bridle-data"),
    }
}

/// The endpoint the control plane of `data_dir` wrote, trimmed; `None`
/// when there is none to read (it never started, or is starting now).
pub fn read_endpoint(data_dir: &Path) -> Option<String> {
    std::fs::read_to_string(data_dir.join(ENDPOINT_FILE))
        .ok()
        .map(|s| s.trim().to_string())
}

/// The bootstrap admin token of `data_dir`, trimmed.
pub fn read_bootstrap_token(data_dir: &Path) -> std::io::Result<String> {
    std::fs::read_to_string(data_dir.join(BOOTSTRAP_TOKEN_FILE)).map(|s| s.trim().to_string())
}
