//! The sandbox and snapshot records, and their SQL: [`SandboxStore`] over
//! the shared pool (see `crate::store`).

use std::str::FromStr;

use sqlx::{Row, SqlitePool};

use super::spec::{SandboxState, Spec};
use crate::store::{Error, Result};

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

/// The `sandboxes` and `snapshots` tables.
#[derive(Clone)]
pub struct SandboxStore {
    pool: SqlitePool,
}

impl SandboxStore {
    pub fn new(pool: SqlitePool) -> Self {
        Self { pool }
    }

    /// Inserts the record unless its owner already has `max_owned`
    /// sandboxes (0: no limit); false when it was not inserted. The count
    /// and the insert are one statement, so creates racing each other
    /// cannot all pass a limit they read before any of them was inserted
    /// (SQLite runs a statement in one write transaction).
    pub async fn insert_sandbox(&self, s: &SandboxRecord, max_owned: u64) -> Result<bool> {
        let inserted = sqlx::query(&format!(
            "INSERT INTO sandboxes ({SANDBOX_COLUMNS}) \
             SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12 \
             WHERE $13 = 0 OR (SELECT COUNT(*) FROM sandboxes WHERE owner = $2) < $13"
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
        .bind(limit(max_owned))
        .execute(&self.pool)
        .await?;
        Ok(inserted.rows_affected() == 1)
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
    /// one statement, so two claims can never get the same sandbox, and
    /// only while `owner` has fewer than `claim.max_owned` sandboxes (0: no
    /// limit), counted in that same statement.
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
               AND ($7 = 0 OR (SELECT COUNT(*) FROM sandboxes WHERE owner = $1) < $7) \
             RETURNING {SANDBOX_COLUMNS}"
        ))
        .bind(owner)
        .bind(claim.expires_unix_ms)
        .bind(claim.idle_timeout_secs as i64)
        .bind(claim.now)
        .bind(spec_json(claim.spec))
        .bind(profile)
        .bind(limit(claim.max_owned))
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
    /// Sandboxes the claimer may have at most (0: no limit).
    pub max_owned: u64,
}

/// A `max_*` setting as SQLite stores integers.
fn limit(max: u64) -> i64 {
    i64::try_from(max).unwrap_or(i64::MAX)
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::runtime::Network;

    fn record(owner: Option<&str>, pool_profile: &str, state: SandboxState) -> SandboxRecord {
        SandboxRecord {
            id: format!("sb-{}", crate::ids::random_hex(6)),
            owner: owner.map(str::to_string),
            state,
            spec: Spec {
                image: "bridle-sandbox:base".into(),
                memory_bytes: 64 << 20,
                cpu_millis: 100,
                pids: 64,
                disk_bytes: 0,
                network: Network::None,
                env: BTreeMap::new(),
                labels: BTreeMap::new(),
            },
            container_id: String::new(),
            created_unix_ms: 1,
            expires_unix_ms: 0,
            idle_timeout_secs: 0,
            last_active_unix_ms: 1,
            from_snapshot: String::new(),
            pool_profile: pool_profile.into(),
            failure: String::new(),
        }
    }

    #[tokio::test]
    async fn an_owner_limit_holds_for_inserts_at_once_and_for_claims() {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::store::Store::open(&dir.path().join("db"))
            .await
            .unwrap();
        let store = SandboxStore::new(db.pool().clone());

        // Eight at once with a limit of three: the count is part of each
        // insert, so exactly three go in, creating ones counted.
        let inserts = (0..8).map(|_| {
            let store = store.clone();
            async move {
                let r = record(Some("alice"), "", SandboxState::Creating);
                store.insert_sandbox(&r, 3).await
            }
        });
        let inserted = futures::future::join_all(inserts).await;
        let made = inserted.iter().filter(|r| matches!(r, Ok(true))).count();
        assert_eq!(made, 3, "{inserted:?}");
        assert!(inserted.iter().all(Result::is_ok), "{inserted:?}");
        assert_eq!(store.sandboxes(Some("alice")).await.unwrap().len(), 3);

        // A pooled sandbox is not handed to an owner at the limit, but to
        // another; 0 is no limit.
        let pooled = record(None, "warm", SandboxState::Ready);
        assert!(store.insert_sandbox(&pooled, 0).await.unwrap());
        let spec = pooled.spec.clone();
        let claim = Claim {
            spec: &spec,
            expires_unix_ms: 0,
            idle_timeout_secs: 0,
            now: 2,
            max_owned: 3,
        };
        let refused = store.claim_pooled("warm", "alice", &claim).await.unwrap();
        assert!(refused.is_none(), "{refused:?}");
        let claimed = store.claim_pooled("warm", "bob", &claim).await.unwrap();
        assert_eq!(claimed.unwrap().owner.as_deref(), Some("bob"));
        let unlimited = record(Some("alice"), "", SandboxState::Creating);
        assert!(store.insert_sandbox(&unlimited, 0).await.unwrap());
    }
}
