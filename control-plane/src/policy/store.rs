//! The stored versions of the policy set (`policies` table): every set
//! ever in force; the highest version is the one in force.

use super::vocabulary::DEFAULT_POLICIES;

/// One stored version of the policy set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub version: u64,
    pub source: String,
    pub set_by: String,
    pub set_unix_ms: i64,
}

/// The policy versions in the store: every set ever in force, the highest
/// version in force.
#[derive(Clone)]
pub struct PolicyStore {
    pool: sqlx::SqlitePool,
}

impl PolicyStore {
    pub fn new(pool: sqlx::SqlitePool) -> Self {
        Self { pool }
    }

    /// Stores the built-in default as version 1 when nothing is stored yet
    /// (the first start).
    pub async fn seed_default(&self) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO policies (version, source, set_by, set_unix_ms) \
             SELECT 1, $1, 'default', $2 WHERE NOT EXISTS (SELECT 1 FROM policies)",
        )
        .bind(DEFAULT_POLICIES)
        .bind(crate::clock::now_ms())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The set in force.
    pub async fn current(&self) -> Result<Stored, sqlx::Error> {
        let (version, source, set_by, set_unix_ms): (i64, String, String, i64) = sqlx::query_as(
            "SELECT version, source, set_by, set_unix_ms FROM policies ORDER BY version DESC LIMIT 1",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(Stored {
            version: version as u64,
            source,
            set_by,
            set_unix_ms,
        })
    }

    /// Stores `version`; false when that version exists already (another
    /// change got there first).
    pub async fn put(&self, s: &Stored) -> Result<bool, sqlx::Error> {
        let r = sqlx::query(
            "INSERT INTO policies (version, source, set_by, set_unix_ms) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (version) DO NOTHING",
        )
        .bind(s.version as i64)
        .bind(&s.source)
        .bind(&s.set_by)
        .bind(s.set_unix_ms)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }
}
