//! Tokens: how one reads (`bridle_<id>_<secret>`), how one is made, and
//! their records in the store, [`TokenStore`] (only a sha256 of the secret
//! is kept).

use std::str::FromStr;

use sha2::{Digest, Sha256};
use sqlx::{Row, SqlitePool};

use super::roles::Role;
use crate::store::{Error, Result};

#[derive(Debug, Clone)]
pub struct TokenRecord {
    pub id: String,
    pub name: String,
    pub role: Role,
    pub owner: String,
    pub secret_sha256: String,
    pub created_unix_ms: i64,
    pub expires_unix_ms: i64,
    pub revoked_unix_ms: i64,
    pub created_by: String,
}

/// A freshly made token: the record to store and the secret to show once.
pub struct NewToken {
    pub record: TokenRecord,
    pub secret: String,
}

/// The `tokens` table.
#[derive(Clone)]
pub struct TokenStore {
    pool: SqlitePool,
}

impl TokenStore {
    pub fn new(pool: SqlitePool) -> Self {
        Self { pool }
    }

    pub async fn insert_token(&self, t: &TokenRecord) -> Result<()> {
        sqlx::query(
            "INSERT INTO tokens (id, name, role, owner, secret_sha256, created_unix_ms, \
             expires_unix_ms, revoked_unix_ms, created_by) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(&t.id)
        .bind(&t.name)
        .bind(t.role.as_str())
        .bind(&t.owner)
        .bind(&t.secret_sha256)
        .bind(t.created_unix_ms)
        .bind(t.expires_unix_ms)
        .bind(t.revoked_unix_ms)
        .bind(&t.created_by)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn tokens(&self) -> Result<Vec<TokenRecord>> {
        let rows = sqlx::query(
            "SELECT id, name, role, owner, secret_sha256, created_unix_ms, expires_unix_ms, \
             revoked_unix_ms, created_by FROM tokens ORDER BY created_unix_ms, id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let id: String = r.try_get("id")?;
                let role: String = r.try_get("role")?;
                Ok(TokenRecord {
                    role: Role::from_str(&role).map_err(|message| Error::Corrupt {
                        id: id.clone(),
                        message,
                    })?,
                    id,
                    name: r.try_get("name")?,
                    owner: r.try_get("owner")?,
                    secret_sha256: r.try_get("secret_sha256")?,
                    created_unix_ms: r.try_get("created_unix_ms")?,
                    expires_unix_ms: r.try_get("expires_unix_ms")?,
                    revoked_unix_ms: r.try_get("revoked_unix_ms")?,
                    created_by: r.try_get("created_by")?,
                })
            })
            .collect()
    }

    /// Marks a token revoked; false when there is no such live token.
    pub async fn revoke_token(&self, id: &str, now: i64) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE tokens SET revoked_unix_ms = $1 WHERE id = $2 AND revoked_unix_ms = 0",
        )
        .bind(now)
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }
}

/// A new token with a random id and secret.
pub fn make_token(
    name: &str,
    role: Role,
    owner: &str,
    expires_unix_ms: i64,
    created_by: &str,
    now: i64,
) -> NewToken {
    let id = crate::ids::random_hex(6);
    let secret = format!("bridle_{id}_{}", crate::ids::random_hex(32));
    NewToken {
        record: TokenRecord {
            id,
            name: name.to_string(),
            role,
            owner: owner.to_string(),
            secret_sha256: hex::encode(Sha256::digest(secret.as_bytes())),
            created_unix_ms: now,
            expires_unix_ms,
            revoked_unix_ms: 0,
            created_by: created_by.to_string(),
        },
        secret,
    }
}

pub(super) fn token_id(secret: &str) -> Option<&str> {
    let rest = secret.strip_prefix("bridle_")?;
    let (id, s) = rest.split_once('_')?;
    (!id.is_empty() && !s.is_empty()).then_some(id)
}

pub(super) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
