//! Secret keys kept in files of their own (secrets, audit, agent identity).

/// A 32-byte secret key kept in its own file: read, or on first use made
/// from the OS random source and written with mode 0600 (never replaced).
pub fn key_file(path: &std::path::Path) -> Result<[u8; 32], String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::read(path) {
        Ok(bytes) => bytes
            .as_slice()
            .try_into()
            .map_err(|_| format!("holds {} bytes, a key is 32", bytes.len())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut key = [0u8; 32];
            getrandom::fill(&mut key).map_err(|e| e.to_string())?;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(|e| e.to_string())?;
            f.write_all(&key)
                .and_then(|()| f.sync_all())
                .map_err(|e| e.to_string())?;
            Ok(key)
        }
        Err(e) => Err(e.to_string()),
    }
}
