//! Content-addressed artifacts (snapshot archives) in the data directory:
//! `<data_dir>/artifacts/sha256/<hex>`. A blob is written to a temp file,
//! hashed as it streams in, and renamed into place, so a half-written blob
//! never has a name. Blobs no snapshot refers to are removed by [`Artifacts::gc`].

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use futures::{Stream, StreamExt};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

#[derive(Clone)]
pub struct Artifacts {
    dir: PathBuf,
}

#[derive(Debug, Clone)]
pub struct Stored {
    pub sha256: String,
    pub size: u64,
}

impl Artifacts {
    pub fn open(data_dir: &Path) -> std::io::Result<Self> {
        let dir = data_dir.join("artifacts");
        std::fs::create_dir_all(dir.join("sha256"))?;
        std::fs::create_dir_all(dir.join("tmp"))?;
        // Leftovers of writes that a crash interrupted.
        for e in std::fs::read_dir(dir.join("tmp"))?.flatten() {
            let _ = std::fs::remove_file(e.path());
        }
        Ok(Self { dir })
    }

    pub fn path(&self, sha256: &str) -> PathBuf {
        self.dir.join("sha256").join(sha256)
    }

    /// Streams `chunks` into a new blob; an error from the stream discards it.
    pub async fn store<S, E>(&self, mut chunks: S) -> Result<Stored, E>
    where
        S: Stream<Item = Result<bytes::Bytes, E>> + Unpin,
        E: From<std::io::Error>,
    {
        let tmp = self
            .dir
            .join("tmp")
            .join(format!("{}.part", crate::ids::random_hex(8)));
        let result = async {
            let mut file = tokio::fs::File::create(&tmp).await?;
            let mut hasher = Sha256::new();
            let mut size = 0u64;
            while let Some(chunk) = chunks.next().await {
                let chunk = chunk?;
                hasher.update(&chunk);
                size += chunk.len() as u64;
                file.write_all(&chunk).await?;
            }
            file.sync_all().await?;
            drop(file);
            let sha256 = hex::encode(hasher.finalize());
            tokio::fs::rename(&tmp, self.path(&sha256)).await?;
            Ok(Stored { sha256, size })
        }
        .await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(&tmp).await;
        }
        result
    }

    /// Removes every blob whose digest is not in `referenced`.
    pub fn gc(&self, referenced: &HashSet<String>) -> std::io::Result<usize> {
        let mut removed = 0;
        for e in std::fs::read_dir(self.dir.join("sha256"))?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !referenced.contains(&name) && std::fs::remove_file(e.path()).is_ok() {
                removed += 1;
            }
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stores_by_digest_and_collects_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let a = Artifacts::open(dir.path()).unwrap();
        let chunks = futures::stream::iter(vec![
            Ok::<_, std::io::Error>(bytes::Bytes::from_static(b"hello ")),
            Ok(bytes::Bytes::from_static(b"world")),
        ]);
        let s = a.store(chunks).await.unwrap();
        assert_eq!(s.size, 11);
        assert_eq!(
            s.sha256,
            "b94d27b9934d3e08a52e52d7da7dabfac484efe37a5380ee9088f7ace2efcde9"
        );
        assert_eq!(std::fs::read(a.path(&s.sha256)).unwrap(), b"hello world");
        // A failing stream leaves nothing behind.
        let failing = futures::stream::iter(vec![
            Ok(bytes::Bytes::from_static(b"part")),
            Err(std::io::Error::other("cut")),
        ]);
        assert!(a.store(failing).await.is_err());
        assert_eq!(
            std::fs::read_dir(dir.path().join("artifacts/tmp"))
                .unwrap()
                .count(),
            0
        );
        assert_eq!(a.gc(&HashSet::from([s.sha256.clone()])).unwrap(), 0);
        assert_eq!(a.gc(&HashSet::new()).unwrap(), 1);
        assert!(!a.path(&s.sha256).exists());
    }
}
