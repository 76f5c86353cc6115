//! Where run events live: [`EventStore`], and its implementation on the
//! embedded SQLite database. The SQL is plain enough for PostgreSQL, which a
//! later backend adds behind the same trait.

use std::future::Future;

use sqlx::{Row, SqlitePool};

use super::events::{Event, RunState};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("run store: {0}")]
    Sql(#[from] sqlx::Error),
    #[error("run {run_id}: event {seq} was already written (another writer, or a replay)")]
    Conflict { run_id: String, seq: u64 },
    #[error("run store: corrupt event {run_id}#{seq}: {message}")]
    Corrupt {
        run_id: String,
        seq: u64,
        message: String,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEvent {
    pub seq: u64,
    pub unix_ms: i64,
    pub event: Event,
}

/// What Submit found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Submission {
    Created(String),
    /// The owner already submitted this idempotency key: this run.
    Existing(String),
}

pub trait EventStore: Clone + Send + Sync + 'static {
    /// Creates run `run_id` with `submitted` as event 1, unless the owner
    /// already has a run with this idempotency key.
    fn submit(
        &self,
        run_id: &str,
        owner: &str,
        idempotency_key: &str,
        first: &Event,
        now: i64,
    ) -> impl Future<Output = Result<Submission>> + Send;
    /// Appends `event` as number `seq`, which must be the next one: a second
    /// writer of the same number gets [`Error::Conflict`], so the log never
    /// has a gap or a duplicate. `state` is the run's state after it.
    fn append(
        &self,
        run_id: &str,
        seq: u64,
        event: &Event,
        state: RunState,
        now: i64,
    ) -> impl Future<Output = Result<()>> + Send;
    /// Events numbered `from_seq` and later, in order.
    fn events(
        &self,
        run_id: &str,
        from_seq: u64,
    ) -> impl Future<Output = Result<Vec<StoredEvent>>> + Send;
    /// Runs whose log does not end in `finished`.
    fn unfinished(&self) -> impl Future<Output = Result<Vec<String>>> + Send;
    /// Run ids, newest first: one owner's (or every owner's), optionally only
    /// in some states, `offset` into that order, at most `limit`.
    fn list(
        &self,
        owner: Option<&str>,
        states: &[RunState],
        offset: u64,
        limit: u64,
    ) -> impl Future<Output = Result<Vec<String>>> + Send;
    /// Stores content once under its sha256 (a second put is a no-op).
    fn put_blob(&self, sha256: &str, data: &[u8]) -> impl Future<Output = Result<()>> + Send;
    fn blob(&self, sha256: &str) -> impl Future<Output = Result<Option<Vec<u8>>>> + Send;
}

#[derive(Clone)]
pub struct SqlEvents {
    pool: SqlitePool,
}

impl SqlEvents {
    pub fn new(pool: SqlitePool) -> Self {
        Self { pool }
    }
}

fn encode(e: &Event) -> String {
    serde_json::to_string(e).expect("events always serialize")
}

impl EventStore for SqlEvents {
    async fn submit(
        &self,
        run_id: &str,
        owner: &str,
        idempotency_key: &str,
        first: &Event,
        now: i64,
    ) -> Result<Submission> {
        let mut tx = self.pool.begin().await?;
        let inserted = sqlx::query(
            "INSERT INTO runs (id, owner, idempotency_key, created_unix_ms, state, last_seq) \
             VALUES ($1, $2, $3, $4, $5, 1) ON CONFLICT (owner, idempotency_key) DO NOTHING",
        )
        .bind(run_id)
        .bind(owner)
        .bind(idempotency_key)
        .bind(now)
        .bind(RunState::Queued.as_str())
        .execute(&mut *tx)
        .await?;
        if inserted.rows_affected() == 0 {
            let row = sqlx::query("SELECT id FROM runs WHERE owner = $1 AND idempotency_key = $2")
                .bind(owner)
                .bind(idempotency_key)
                .fetch_one(&mut *tx)
                .await?;
            return Ok(Submission::Existing(row.try_get("id")?));
        }
        sqlx::query("INSERT INTO run_events (run_id, seq, unix_ms, body) VALUES ($1, 1, $2, $3)")
            .bind(run_id)
            .bind(now)
            .bind(encode(first))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Submission::Created(run_id.to_string()))
    }

    async fn append(
        &self,
        run_id: &str,
        seq: u64,
        event: &Event,
        state: RunState,
        now: i64,
    ) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        let moved = sqlx::query(
            "UPDATE runs SET last_seq = $1, state = $2 WHERE id = $3 AND last_seq = $4",
        )
        .bind(seq as i64)
        .bind(state.as_str())
        .bind(run_id)
        .bind(seq as i64 - 1)
        .execute(&mut *tx)
        .await?;
        if moved.rows_affected() != 1 {
            return Err(Error::Conflict {
                run_id: run_id.into(),
                seq,
            });
        }
        sqlx::query("INSERT INTO run_events (run_id, seq, unix_ms, body) VALUES ($1, $2, $3, $4)")
            .bind(run_id)
            .bind(seq as i64)
            .bind(now)
            .bind(encode(event))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn events(&self, run_id: &str, from_seq: u64) -> Result<Vec<StoredEvent>> {
        let rows = sqlx::query(
            "SELECT seq, unix_ms, body FROM run_events WHERE run_id = $1 AND seq >= $2 ORDER BY seq",
        )
        .bind(run_id)
        .bind(from_seq as i64)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let seq = r.try_get::<i64, _>("seq")? as u64;
                let body: String = r.try_get("body")?;
                Ok(StoredEvent {
                    seq,
                    unix_ms: r.try_get("unix_ms")?,
                    event: serde_json::from_str(&body).map_err(|e| Error::Corrupt {
                        run_id: run_id.into(),
                        seq,
                        message: e.to_string(),
                    })?,
                })
            })
            .collect()
    }

    async fn unfinished(&self) -> Result<Vec<String>> {
        let rows = sqlx::query(
            "SELECT id FROM runs WHERE state NOT IN ('succeeded', 'failed', 'cancelled', 'interrupted') \
             ORDER BY created_unix_ms, id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|r| Ok(r.try_get("id")?)).collect()
    }

    async fn list(
        &self,
        owner: Option<&str>,
        states: &[RunState],
        offset: u64,
        limit: u64,
    ) -> Result<Vec<String>> {
        // States are a fixed vocabulary, so they can be spelled into the SQL.
        let mut sql = String::from("SELECT id FROM runs WHERE ($1 IS NULL OR owner = $1)");
        if !states.is_empty() {
            let list: Vec<String> = states.iter().map(|s| format!("'{}'", s.as_str())).collect();
            sql.push_str(&format!(" AND state IN ({})", list.join(", ")));
        }
        sql.push_str(" ORDER BY created_unix_ms DESC, id DESC LIMIT $2 OFFSET $3");
        let rows = sqlx::query(&sql)
            .bind(owner)
            .bind(limit as i64)
            .bind(offset as i64)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|r| Ok(r.try_get("id")?)).collect()
    }

    async fn put_blob(&self, sha256: &str, data: &[u8]) -> Result<()> {
        sqlx::query("INSERT INTO blobs (sha256, size, data) VALUES ($1, $2, $3) ON CONFLICT (sha256) DO NOTHING")
            .bind(sha256)
            .bind(data.len() as i64)
            .bind(data)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn blob(&self, sha256: &str) -> Result<Option<Vec<u8>>> {
        let row = sqlx::query("SELECT data FROM blobs WHERE sha256 = $1")
            .bind(sha256)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| r.try_get("data")).transpose()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runs::events::RunView;

    async fn store() -> (tempfile::TempDir, SqlEvents) {
        let dir = tempfile::tempdir().unwrap();
        let s = crate::store::Store::open(&dir.path().join("db"))
            .await
            .unwrap();
        (dir, SqlEvents::new(s.pool().clone()))
    }

    fn submitted() -> Event {
        Event::Submitted {
            owner: "a".into(),
            idempotency_key: "k1".into(),
            job: Box::new(crate::runs::events::tests_support::job(2)),
        }
    }

    #[tokio::test]
    async fn submit_is_idempotent_per_owner() {
        let (_d, s) = store().await;
        let first = submitted();
        assert_eq!(
            s.submit("r1", "a", "k1", &first, 1).await.unwrap(),
            Submission::Created("r1".into())
        );
        assert_eq!(
            s.submit("r2", "a", "k1", &first, 2).await.unwrap(),
            Submission::Existing("r1".into())
        );
        // Another owner's key is its own.
        assert_eq!(
            s.submit("r3", "b", "k1", &first, 3).await.unwrap(),
            Submission::Created("r3".into())
        );
        assert_eq!(s.events("r2", 1).await.unwrap(), vec![]);
    }

    #[tokio::test]
    async fn appends_are_numbered_without_gaps_or_duplicates() {
        let (_d, s) = store().await;
        s.submit("r1", "a", "k1", &submitted(), 1).await.unwrap();
        s.append("r1", 2, &Event::Provisioning, RunState::Provisioning, 2)
            .await
            .unwrap();
        // A second writer of number 2, and a writer that skips to 4, are refused.
        assert!(matches!(
            s.append("r1", 2, &Event::Provisioning, RunState::Provisioning, 3)
                .await,
            Err(Error::Conflict { seq: 2, .. })
        ));
        assert!(matches!(
            s.append("r1", 4, &Event::Provisioning, RunState::Provisioning, 3)
                .await,
            Err(Error::Conflict { seq: 4, .. })
        ));
        let sandbox = Event::SandboxAssigned {
            sandbox_id: "sb-1".into(),
            agent_boot_unix_ms: 0,
        };
        s.append("r1", 3, &sandbox, RunState::Running, 4)
            .await
            .unwrap();
        let events = s.events("r1", 1).await.unwrap();
        assert_eq!(
            events.iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        assert_eq!(s.events("r1", 3).await.unwrap()[0].event, sandbox);
        let view = RunView::fold(events.iter().map(|e| (e.seq, &e.event))).unwrap();
        assert_eq!(view.state, RunState::Running);
        assert_eq!(s.unfinished().await.unwrap(), vec!["r1".to_string()]);
        let done = Event::Finished {
            state: RunState::Succeeded,
            reason: String::new(),
        };
        s.append("r1", 4, &done, RunState::Succeeded, 5)
            .await
            .unwrap();
        assert!(s.unfinished().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn blobs_are_stored_once() {
        let (_d, s) = store().await;
        s.put_blob("h1", b"output").await.unwrap();
        s.put_blob("h1", b"output").await.unwrap();
        assert_eq!(s.blob("h1").await.unwrap().as_deref(), Some(&b"output"[..]));
        assert_eq!(s.blob("h2").await.unwrap(), None);
    }
}
