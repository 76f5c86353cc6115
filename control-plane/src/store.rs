//! The database: one SQLite file in the data directory (WAL), its
//! migrations, the instance id, and what every writer shares (the error
//! type, group commits, placeholders). The tables' SQL lives with their
//! owners, over [`Store::pool`]: tokens in `auth::tokens`, sandboxes and
//! snapshots in `sandboxes::store`, policies in `policy::store`, runs in
//! `runs::store`, approvals in `approvals`, the audit log in `audit`.
//! Queries are plain SQL that PostgreSQL accepts too, checked at run time
//! (no build-time database).

use std::path::Path;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};

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

    /// The connection pool, over which each owner keeps its own tables.
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
