//! The agent's identity proof, exchanged on every new connection to a
//! sandbox agent before HTTP/2 starts.
//!
//! The control plane gives each sandbox's agent its own 32-byte key (in the
//! agent's environment, which commands never see: the agent drops it from its
//! environment at start and is non-dumpable, so `/proc/1/environ` is closed to
//! the sandbox user). On connecting, the control plane sends a fresh random
//! challenge and the agent answers with `HMAC-SHA256(key, CONTEXT ||
//! challenge)`. Nothing secret crosses the socket, so whatever answers a
//! socket learns nothing it could replay: a process in the sandbox that
//! serves a socket of its own, or another sandbox's agent that a planted
//! symlink leads to, cannot produce the proof, and the control plane refuses
//! to talk to it.

use hmac::{Hmac, Mac};
use sha2::Sha256;

pub const CHALLENGE_LEN: usize = 32;
pub const PROOF_LEN: usize = 32;
/// Binds proofs to this use of the key.
const CONTEXT: &[u8] = b"bridle agent identity v1\0";

fn mac(key: &[u8], challenge: &[u8; CHALLENGE_LEN]) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(CONTEXT);
    mac.update(challenge);
    mac
}

/// The key of one sandbox's agent, derived from the control plane's master
/// key: each sandbox has its own, so one agent cannot answer for another.
pub fn sandbox_key(master: &[u8; 32], sandbox_id: &str) -> [u8; 32] {
    let mut mac = Hmac::<Sha256>::new_from_slice(master).expect("HMAC takes keys of any length");
    mac.update(b"bridle sandbox agent key v1\0");
    mac.update(sandbox_id.as_bytes());
    mac.finalize().into_bytes().into()
}

/// The agent's answer to `challenge`.
pub fn prove(key: &[u8], challenge: &[u8; CHALLENGE_LEN]) -> [u8; PROOF_LEN] {
    mac(key, challenge).finalize().into_bytes().into()
}

/// Whether `proof` answers `challenge` for `key` (compared in constant time).
pub fn verify(key: &[u8], challenge: &[u8; CHALLENGE_LEN], proof: &[u8]) -> bool {
    mac(key, challenge).verify_slice(proof).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_proof_verifies_only_for_its_key_and_challenge() {
        let (key, other) = ([7u8; 32], [8u8; 32]);
        let challenge = [1u8; CHALLENGE_LEN];
        let proof = prove(&key, &challenge);
        assert!(verify(&key, &challenge, &proof));
        assert!(!verify(&other, &challenge, &proof));
        assert!(!verify(&key, &[2u8; CHALLENGE_LEN], &proof));
        assert!(!verify(&key, &challenge, &proof[..31]));
        let master = [9u8; 32];
        assert_ne!(sandbox_key(&master, "sb-1"), sandbox_key(&master, "sb-2"));
        assert_eq!(sandbox_key(&master, "sb-1"), sandbox_key(&master, "sb-1"));
    }
}
