//! Durable state: tokens, sandbox records and snapshot records, in SQLite
//! (one file in the data directory, WAL). Queries are plain SQL that
//! PostgreSQL accepts too, checked at run time (no build-time database).

use std::path::Path;
use std::str::FromStr;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};

use crate::auth::Role;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("store: {0}")]
    Sql(#[from] sqlx::Error),
    #[error("store migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("store: corrupt record {id}: {message}")]
    Corrupt { id: String, message: String },
}

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Clone)]
pub struct Store {
    pool: SqlitePool,
}

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

impl Store {
    /// Opens (creating if needed) the database at `path` and applies the
    /// embedded migrations.
    pub async fn open(path: &Path) -> Result<Self> {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // Every commit is on disk before it is acknowledged, power loss
            // included; run events are committed in groups
            // (runs::store::SqlEvents) so this costs one fsync per group.
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(std::time::Duration::from_secs(10))
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await?;
        sqlx::migrate!("./migrations").run(&pool).await?;
        Ok(Self { pool })
    }

    /// The connection pool, for the run event store that shares the database.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// This control plane's identity, created on first start; it names the
    /// containers it owns.
    pub async fn instance_id(&self, fresh: &str, now: i64) -> Result<String> {
        sqlx::query(
            "INSERT INTO instance (id, instance_id, created_unix_ms) VALUES (1, $1, $2) \
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(fresh)
        .bind(now)
        .execute(&self.pool)
        .await?;
        let row = sqlx::query("SELECT instance_id FROM instance WHERE id = 1")
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get("instance_id")?)
    }

    // ------------------------------------------------------------ tokens

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

/// Waits for the next group of queued writes (up to `max`) for a
/// group-committing writer: everything already queued, after letting the
/// writers that the previous commit woke queue theirs, so a group is as
/// large as the load. False when every sender is gone.
pub async fn next_group<T>(
    queue: &mut tokio::sync::mpsc::Receiver<T>,
    batch: &mut Vec<T>,
    max: usize,
) -> bool {
    if queue.recv_many(batch, max).await == 0 {
        return false;
    }
    tokio::task::yield_now().await;
    while batch.len() < max {
        match queue.try_recv() {
            Ok(w) => batch.push(w),
            Err(_) => break,
        }
    }
    true
}

/// `rows` groups of `width` numbered placeholders for a multi-row
/// statement, `($1, $2), ($3, $4)`; with `width` 1 a plain list, `$1, $2`.
pub fn placeholders(rows: usize, width: usize) -> String {
    let mut out = String::new();
    for r in 0..rows {
        if r > 0 {
            out.push_str(", ");
        }
        let cols: Vec<String> = (0..width)
            .map(|c| format!("${}", r * width + c + 1))
            .collect();
        if width == 1 {
            out.push_str(&cols[0]);
        } else {
            out.push('(');
            out.push_str(&cols.join(", "));
            out.push(')');
        }
    }
    out
}
