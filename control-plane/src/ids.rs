//! Random ids (sandboxes, snapshots, runs, exec ids, tokens).

/// `bytes` random bytes from the OS, as hex.
pub fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf).expect("the OS random source is available");
    hex::encode(buf)
}
