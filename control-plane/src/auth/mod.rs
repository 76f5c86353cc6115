//! Bearer tokens checked, and who a request is. Every RPC starts with
//! [`Auth::authenticate`]. What a token looks like and how its record is
//! stored (only a sha256 of the secret) is in [`tokens`]; roles and the
//! rule for what each sees in [`roles`].
//!
//! A token reads `bridle_<id>_<secret>`: the id finds the record without a
//! scan, the 256-bit secret is what is checked. Records are cached in memory
//! (the store is the source of truth; this instance is the only writer).

pub mod roles;
pub mod tokens;

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::{Arc, RwLock};

use sha2::{Digest, Sha256};
use sqlx::SqlitePool;
use tonic::Status;

use tokens::{constant_time_eq, token_id};

pub use roles::{Principal, Role};
pub use tokens::{make_token, NewToken, TokenRecord, TokenStore};

#[derive(Clone)]
pub struct Auth {
    store: TokenStore,
    tokens: Arc<RwLock<HashMap<String, TokenRecord>>>,
}

pub use bridle_client::data_dir::BOOTSTRAP_TOKEN_FILE;

impl Auth {
    pub async fn load(pool: SqlitePool) -> Result<Self, crate::store::Error> {
        let store = TokenStore::new(pool);
        let records = store.tokens().await?;
        let tokens = records.into_iter().map(|t| (t.id.clone(), t)).collect();
        Ok(Self {
            store,
            tokens: Arc::new(RwLock::new(tokens)),
        })
    }

    /// On the very first start (no token exists), creates an admin token and
    /// writes it to `<data_dir>/admin.token` with mode 0600. It is never
    /// logged; the path is.
    pub async fn bootstrap(
        &self,
        data_dir: &Path,
        now: i64,
    ) -> anyhow::Result<Option<std::path::PathBuf>> {
        if !self.tokens.read().expect("token cache lock").is_empty() {
            return Ok(None);
        }
        let token = make_token("bootstrap-admin", Role::Admin, "admin", 0, "bootstrap", now);
        let path = data_dir.join(BOOTSTRAP_TOKEN_FILE);
        let tmp = data_dir.join(format!(".{BOOTSTRAP_TOKEN_FILE}.tmp"));
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(token.secret.as_bytes())?;
        f.write_all(b"\n")?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        self.insert(token.record).await?;
        Ok(Some(path))
    }

    pub async fn insert(&self, record: TokenRecord) -> Result<(), crate::store::Error> {
        self.store.insert_token(&record).await?;
        self.tokens
            .write()
            .expect("token cache lock")
            .insert(record.id.clone(), record);
        Ok(())
    }

    pub async fn revoke(&self, id: &str, now: i64) -> Result<bool, crate::store::Error> {
        let done = self.store.revoke_token(id, now).await?;
        if done {
            if let Some(t) = self.tokens.write().expect("token cache lock").get_mut(id) {
                t.revoked_unix_ms = now;
            }
        }
        Ok(done)
    }

    pub fn list(&self) -> Vec<TokenRecord> {
        let mut v: Vec<TokenRecord> = self
            .tokens
            .read()
            .expect("token cache lock")
            .values()
            .cloned()
            .collect();
        v.sort_by(|a, b| (a.created_unix_ms, &a.id).cmp(&(b.created_unix_ms, &b.id)));
        v
    }

    pub fn get(&self, id: &str) -> Option<TokenRecord> {
        self.tokens
            .read()
            .expect("token cache lock")
            .get(id)
            .cloned()
    }

    /// The principal behind a request's `authorization: Bearer` header.
    pub fn authenticate(
        &self,
        metadata: &tonic::metadata::MetadataMap,
    ) -> Result<Principal, Status> {
        self.authenticate_headers(metadata.as_ref())
    }

    /// [`Auth::authenticate`] on the raw HTTP headers (for layers that see
    /// the request before it is a gRPC call).
    pub fn authenticate_headers(
        &self,
        headers: &tonic::codegen::http::HeaderMap,
    ) -> Result<Principal, Status> {
        let header = headers
            .get("authorization")
            .ok_or_else(|| Status::unauthenticated("missing authorization: Bearer <token>"))?;
        let value = header
            .to_str()
            .map_err(|_| Status::unauthenticated("authorization header is not ASCII"))?;
        let secret = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .ok_or_else(|| Status::unauthenticated("authorization must be \"Bearer <token>\""))?
            .trim();
        self.check(secret, crate::clock::now_ms())
    }

    pub fn check(&self, secret: &str, now: i64) -> Result<Principal, Status> {
        let bad = || Status::unauthenticated("invalid token");
        let id = token_id(secret).ok_or_else(bad)?;
        let tokens = self.tokens.read().expect("token cache lock");
        let record = tokens.get(id).ok_or_else(bad)?;
        let digest = hex::encode(Sha256::digest(secret.as_bytes()));
        if !constant_time_eq(digest.as_bytes(), record.secret_sha256.as_bytes()) {
            return Err(bad());
        }
        if record.revoked_unix_ms != 0 {
            return Err(Status::unauthenticated("token revoked"));
        }
        if record.expires_unix_ms != 0 && record.expires_unix_ms <= now {
            return Err(Status::unauthenticated("token expired"));
        }
        Ok(Principal {
            token_id: record.id.clone(),
            name: record.name.clone(),
            role: record.role,
            owner: record.owner.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn auth() -> (tempfile::TempDir, Auth) {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open(&dir.path().join("db"))
            .await
            .unwrap();
        (dir, Auth::load(store.pool().clone()).await.unwrap())
    }

    #[tokio::test]
    async fn tokens_check_expire_and_revoke() {
        let (_dir, auth) = auth().await;
        let t = make_token("ci", Role::Submitter, "team-a", 2_000, "test", 1_000);
        let secret = t.secret.clone();
        auth.insert(t.record).await.unwrap();
        let p = auth.check(&secret, 1_500).unwrap();
        assert_eq!((p.role, p.owner.as_str()), (Role::Submitter, "team-a"));
        assert_eq!(
            auth.check(&secret, 2_000).unwrap_err().message(),
            "token expired"
        );
        // One changed character of the secret, a missing secret, garbage.
        let mut wrong = secret.clone().into_bytes();
        let last = wrong.len() - 1;
        wrong[last] = if wrong[last] == b'0' { b'1' } else { b'0' };
        for bad in [
            String::from_utf8(wrong).unwrap(),
            format!("bridle_{}_", p.token_id),
            "x".into(),
        ] {
            assert_eq!(
                auth.check(&bad, 1_500).unwrap_err().code(),
                tonic::Code::Unauthenticated
            );
        }
        assert!(auth.revoke(&p.token_id, 1_600).await.unwrap());
        assert_eq!(
            auth.check(&secret, 1_700).unwrap_err().message(),
            "token revoked"
        );
        // The store holds the hash, never the secret.
        let stored = auth.store.tokens().await.unwrap();
        assert!(stored.iter().all(|t| !t.secret_sha256.contains(&secret)));
        assert_ne!(stored[0].secret_sha256, secret);
    }

    #[tokio::test]
    async fn bootstrap_writes_a_private_file_once() {
        use std::os::unix::fs::PermissionsExt;
        let (dir, auth) = auth().await;
        let path = auth.bootstrap(dir.path(), 1).await.unwrap().unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let secret = std::fs::read_to_string(&path).unwrap();
        assert_eq!(auth.check(secret.trim(), 2).unwrap().role, Role::Admin);
        assert!(auth.bootstrap(dir.path(), 3).await.unwrap().is_none());
    }
}
