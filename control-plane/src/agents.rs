//! Sandbox agents' socket directories, and the connections to the agents
//! in them.
//!
//! An agent's socket sits in a host directory that is also the sandbox's
//! `/run/bridle`. The control plane opens that directory for the agent to
//! bind its socket ([`open_socket_dir`]) and locks it once the agent is
//! serving ([`lock_socket_dir`]): this module is that policy. Connections
//! go through `bridle_client::agent`, which on every connection trusts
//! neither the path (no link is followed) nor the peer (it must prove it
//! holds this sandbox's agent key).

use std::path::Path;

pub use bridle_client::agent::{connect, serving, Agent, SOCKET_NAME};

/// Closes a sandbox's socket directory to the sandbox, once its agent is
/// serving: the agent no longer needs it (it holds its listening socket),
/// and commands in the sandbox, which run as the agent's uid, can then
/// neither reach the socket, replace it, nor write anything there.
pub fn lock_socket_dir(dir: &Path) -> std::io::Result<()> {
    set_mode(dir, 0o700)
}

/// Opens a sandbox's socket directory for its agent to bind a socket (at
/// create, and before its container is started again; no command of the
/// sandbox runs until the agent serves, and then it is locked again). What
/// an earlier boot left there is removed.
pub fn open_socket_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    set_mode(dir, 0o700)?;
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        // remove_file removes a link itself, never what it points to.
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(_) => std::fs::remove_dir_all(&path)?,
        }
    }
    set_mode(dir, 0o777)
}

fn set_mode(path: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opening_the_socket_dir_clears_what_a_sandbox_left_and_locking_closes_it() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        let outside = t.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("keep"), b"x").unwrap();
        let dir = t.path().join("sb");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("fill"), vec![0u8; 1024]).unwrap();
        std::os::unix::fs::symlink(&outside, dir.join("agent.sock")).unwrap();
        std::fs::create_dir(dir.join("sub")).unwrap();
        std::os::unix::fs::symlink(&outside, dir.join("sub/link")).unwrap();
        open_socket_dir(&dir).unwrap();
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
        assert!(
            outside.join("keep").exists(),
            "links are removed, not followed"
        );
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode(&dir), 0o777);
        lock_socket_dir(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
    }
}
