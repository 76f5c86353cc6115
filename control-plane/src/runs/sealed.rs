//! Run secrets at rest. A run must survive a restart of the control plane,
//! so its secret values are stored with it, but never in clear: they are
//! sealed with XChaCha20-Poly1305 under a key kept in its own 0600 file
//! (`secrets.key` in the data directory, or wherever `secrets_key_file`
//! points, e.g. a volume the database backups do not include). The run id is
//! bound in as associated data, so a sealed value cannot be moved to another
//! run. A sealed value is deleted when its run finishes.

use std::collections::BTreeMap;
use std::path::Path;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};

const NONCE_LEN: usize = 24;

#[derive(Clone)]
pub struct Sealer {
    cipher: XChaCha20Poly1305,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer(..)")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("secrets key {path}: {message}")]
    Key { path: String, message: String },
    #[error("the run's sealed secrets do not open with this key (another data directory's key, or a damaged record)")]
    Open,
}

impl Sealer {
    /// Reads the key at `path`, creating it (32 random bytes, mode 0600) the
    /// first time.
    pub fn open_or_create(path: &Path) -> Result<Self, Error> {
        let key = crate::keys::key_file(path).map_err(|message| Error::Key {
            path: path.display().to_string(),
            message,
        })?;
        Ok(Self::from_key(&key))
    }

    pub fn from_key(key: &[u8]) -> Self {
        Self {
            cipher: XChaCha20Poly1305::new_from_slice(key).expect("32-byte key"),
        }
    }

    /// Seals a run's secrets: a random nonce followed by the ciphertext.
    pub fn seal(&self, run_id: &str, secrets: &BTreeMap<String, String>) -> Vec<u8> {
        let plain = serde_json::to_vec(secrets).expect("a map of strings serializes");
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).expect("the kernel's random source");
        let sealed = self
            .cipher
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: &plain,
                    aad: run_id.as_bytes(),
                },
            )
            .expect("encryption of a bounded message");
        let mut out = nonce.to_vec();
        out.extend(sealed);
        out
    }

    pub fn open(&self, run_id: &str, sealed: &[u8]) -> Result<BTreeMap<String, String>, Error> {
        if sealed.len() < NONCE_LEN {
            return Err(Error::Open);
        }
        let (nonce, body) = sealed.split_at(NONCE_LEN);
        let plain = self
            .cipher
            .decrypt(
                XNonce::from_slice(nonce),
                Payload {
                    msg: body,
                    aad: run_id.as_bytes(),
                },
            )
            .map_err(|_| Error::Open)?;
        serde_json::from_slice(&plain).map_err(|_| Error::Open)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_secrets_open_only_for_their_run_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secrets.key");
        let s = Sealer::open_or_create(&path).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let secrets = BTreeMap::from([("TOKEN".to_string(), "hunter2".to_string())]);
        let sealed = s.seal("run-1", &secrets);
        assert!(!sealed.windows(7).any(|w| w == b"hunter2"));
        // The same key, read back from its file, opens it.
        let again = Sealer::open_or_create(&path).unwrap();
        assert_eq!(again.open("run-1", &sealed).unwrap(), secrets);
        // Another run, another key, or a flipped bit does not.
        assert!(again.open("run-2", &sealed).is_err());
        assert!(Sealer::from_key(&[7; 32]).open("run-1", &sealed).is_err());
        let mut bad = sealed.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert!(again.open("run-1", &bad).is_err());
        assert!(again.open("run-1", b"short").is_err());
    }

    #[test]
    fn a_key_file_of_the_wrong_size_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secrets.key");
        std::fs::write(&path, b"too short").unwrap();
        let e = Sealer::open_or_create(&path).unwrap_err().to_string();
        assert!(e.contains("holds 9 bytes"), "{e}");
    }
}
