//! Durable state: tokens, sandbox records and snapshot records, in SQLite
//! (one file in the data directory, WAL). Queries are plain SQL that
//! PostgreSQL accepts too, checked at run time (no build-time database).

use std::path::Path;
use std::str::FromStr;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};

use crate::auth::Role;
use crate::sandboxes::{SandboxState, Spec};

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

#[derive(Debug, Clone)]
pub struct SandboxRecord {
    pub id: String,
    /// None while the sandbox waits unclaimed in a warm pool.
    pub owner: Option<String>,
    pub state: SandboxState,
    pub spec: Spec,
    pub container_id: String,
    pub created_unix_ms: i64,
    pub expires_unix_ms: i64,
    pub idle_timeout_secs: u64,
    pub last_active_unix_ms: i64,
    pub from_snapshot: String,
    pub pool_profile: String,
    pub failure: String,
}

#[derive(Debug, Clone)]
pub struct SnapshotRecord {
    pub id: String,
    pub owner: String,
    pub sandbox_id: String,
    pub sha256: String,
    pub size_bytes: u64,
    pub compression: String,
    pub created_unix_ms: i64,
}

const SANDBOX_COLUMNS: &str = "id, owner, state, spec, container_id, created_unix_ms, \
    expires_unix_ms, idle_timeout_secs, last_active_unix_ms, from_snapshot, pool_profile, failure";

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

    // ------------------------------------------------------------ sandboxes

    pub async fn insert_sandbox(&self, s: &SandboxRecord) -> Result<()> {
        sqlx::query(&format!(
            "INSERT INTO sandboxes ({SANDBOX_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"
        ))
        .bind(&s.id)
        .bind(&s.owner)
        .bind(s.state.as_str())
        .bind(spec_json(&s.spec))
        .bind(&s.container_id)
        .bind(s.created_unix_ms)
        .bind(s.expires_unix_ms)
        .bind(s.idle_timeout_secs as i64)
        .bind(s.last_active_unix_ms)
        .bind(&s.from_snapshot)
        .bind(&s.pool_profile)
        .bind(&s.failure)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn sandbox(&self, id: &str) -> Result<Option<SandboxRecord>> {
        let row = sqlx::query(&format!(
            "SELECT {SANDBOX_COLUMNS} FROM sandboxes WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(sandbox_from_row).transpose()
    }

    /// Every record, or only one owner's.
    pub async fn sandboxes(&self, owner: Option<&str>) -> Result<Vec<SandboxRecord>> {
        let rows = match owner {
            Some(o) => {
                sqlx::query(&format!(
                    "SELECT {SANDBOX_COLUMNS} FROM sandboxes WHERE owner = $1 ORDER BY created_unix_ms, id"
                ))
                .bind(o)
                .fetch_all(&self.pool)
                .await?
            }
            None => {
                sqlx::query(&format!(
                    "SELECT {SANDBOX_COLUMNS} FROM sandboxes ORDER BY created_unix_ms, id"
                ))
                .fetch_all(&self.pool)
                .await?
            }
        };
        rows.iter().map(sandbox_from_row).collect()
    }

    pub async fn count_owned(&self, owner: &str) -> Result<u64> {
        let row = sqlx::query("SELECT COUNT(*) AS n FROM sandboxes WHERE owner = $1")
            .bind(owner)
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get::<i64, _>("n")? as u64)
    }

    pub async fn set_sandbox_state(
        &self,
        id: &str,
        state: SandboxState,
        failure: &str,
    ) -> Result<()> {
        sqlx::query("UPDATE sandboxes SET state = $1, failure = $2 WHERE id = $3")
            .bind(state.as_str())
            .bind(failure)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn set_container(&self, id: &str, container_id: &str) -> Result<()> {
        sqlx::query("UPDATE sandboxes SET container_id = $1 WHERE id = $2")
            .bind(container_id)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn touch_sandbox(&self, id: &str, now: i64) -> Result<()> {
        sqlx::query(
            "UPDATE sandboxes SET last_active_unix_ms = $1 WHERE id = $2 AND last_active_unix_ms < $1",
        )
        .bind(now)
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn delete_sandbox(&self, id: &str) -> Result<()> {
        sqlx::query("DELETE FROM sandboxes WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Hands the oldest ready, unclaimed sandbox of `profile` to `owner`, in
    /// one statement, so two claims can never get the same sandbox.
    pub async fn claim_pooled(
        &self,
        profile: &str,
        owner: &str,
        claim: &Claim<'_>,
    ) -> Result<Option<SandboxRecord>> {
        // The spec is rewritten with the claimer's env and labels.
        let row = sqlx::query(&format!(
            "UPDATE sandboxes SET owner = $1, expires_unix_ms = $2, idle_timeout_secs = $3, \
             last_active_unix_ms = $4, spec = $5 \
             WHERE id = (SELECT id FROM sandboxes WHERE owner IS NULL AND pool_profile = $6 \
                         AND state = 'ready' ORDER BY created_unix_ms, id LIMIT 1) \
               AND owner IS NULL \
             RETURNING {SANDBOX_COLUMNS}"
        ))
        .bind(owner)
        .bind(claim.expires_unix_ms)
        .bind(claim.idle_timeout_secs as i64)
        .bind(claim.now)
        .bind(spec_json(claim.spec))
        .bind(profile)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(sandbox_from_row).transpose()
    }

    /// Unclaimed sandboxes of a pool profile that are ready or on their way.
    pub async fn pooled_count(&self, profile: &str) -> Result<usize> {
        let row = sqlx::query(
            "SELECT COUNT(*) AS n FROM sandboxes WHERE owner IS NULL AND pool_profile = $1 \
             AND state IN ('creating', 'ready')",
        )
        .bind(profile)
        .fetch_one(&self.pool)
        .await?;
        Ok(row.try_get::<i64, _>("n")? as usize)
    }

    // ------------------------------------------------------------ snapshots

    pub async fn insert_snapshot(&self, s: &SnapshotRecord) -> Result<()> {
        sqlx::query(
            "INSERT INTO snapshots (id, owner, sandbox_id, sha256, size_bytes, compression, \
             created_unix_ms) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&s.id)
        .bind(&s.owner)
        .bind(&s.sandbox_id)
        .bind(&s.sha256)
        .bind(s.size_bytes as i64)
        .bind(&s.compression)
        .bind(s.created_unix_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn snapshot(&self, id: &str) -> Result<Option<SnapshotRecord>> {
        let row = sqlx::query(
            "SELECT id, owner, sandbox_id, sha256, size_bytes, compression, created_unix_ms \
             FROM snapshots WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(snapshot_from_row).transpose()
    }

    pub async fn snapshots(&self, owner: Option<&str>) -> Result<Vec<SnapshotRecord>> {
        let sql = "SELECT id, owner, sandbox_id, sha256, size_bytes, compression, created_unix_ms \
                   FROM snapshots";
        let rows = match owner {
            Some(o) => {
                sqlx::query(&format!(
                    "{sql} WHERE owner = $1 ORDER BY created_unix_ms, id"
                ))
                .bind(o)
                .fetch_all(&self.pool)
                .await?
            }
            None => {
                sqlx::query(&format!("{sql} ORDER BY created_unix_ms, id"))
                    .fetch_all(&self.pool)
                    .await?
            }
        };
        rows.iter().map(snapshot_from_row).collect()
    }

    pub async fn delete_snapshot(&self, id: &str) -> Result<()> {
        sqlx::query("DELETE FROM snapshots WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Every artifact digest some snapshot refers to.
    pub async fn referenced_digests(&self) -> Result<std::collections::HashSet<String>> {
        let rows = sqlx::query("SELECT DISTINCT sha256 FROM snapshots")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| Ok(r.try_get::<String, _>("sha256")?))
            .collect()
    }
}

/// What a claim writes into the pooled record.
pub struct Claim<'a> {
    pub spec: &'a Spec,
    pub expires_unix_ms: i64,
    pub idle_timeout_secs: u64,
    pub now: i64,
}

fn spec_json(spec: &Spec) -> String {
    serde_json::to_string(spec).expect("a Spec always serializes")
}

fn sandbox_from_row(r: &sqlx::sqlite::SqliteRow) -> Result<SandboxRecord> {
    let id: String = r.try_get("id")?;
    let corrupt = |message: String| Error::Corrupt {
        id: id.clone(),
        message,
    };
    let state: String = r.try_get("state")?;
    let spec: String = r.try_get("spec")?;
    Ok(SandboxRecord {
        owner: r.try_get("owner")?,
        state: SandboxState::from_str(&state).map_err(corrupt)?,
        spec: serde_json::from_str(&spec).map_err(|e| corrupt(e.to_string()))?,
        container_id: r.try_get("container_id")?,
        created_unix_ms: r.try_get("created_unix_ms")?,
        expires_unix_ms: r.try_get("expires_unix_ms")?,
        idle_timeout_secs: r.try_get::<i64, _>("idle_timeout_secs")? as u64,
        last_active_unix_ms: r.try_get("last_active_unix_ms")?,
        from_snapshot: r.try_get("from_snapshot")?,
        pool_profile: r.try_get("pool_profile")?,
        failure: r.try_get("failure")?,
        id,
    })
}

fn snapshot_from_row(r: &sqlx::sqlite::SqliteRow) -> Result<SnapshotRecord> {
    Ok(SnapshotRecord {
        id: r.try_get("id")?,
        owner: r.try_get("owner")?,
        sandbox_id: r.try_get("sandbox_id")?,
        sha256: r.try_get("sha256")?,
        size_bytes: r.try_get::<i64, _>("size_bytes")? as u64,
        compression: r.try_get("compression")?,
        created_unix_ms: r.try_get("created_unix_ms")?,
    })
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
