//! Where run events live: [`EventStore`], and its implementation on the
//! embedded SQLite database. The SQL is plain enough for PostgreSQL, which a
//! later backend adds behind the same trait.

use std::collections::BTreeMap;
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

/// A run as Submit creates it.
#[derive(Debug, Clone, Copy)]
pub struct NewRun<'a> {
    pub run_id: &'a str,
    pub owner: &'a str,
    pub idempotency_key: &'a str,
    /// Event 1, `submitted`.
    pub first: &'a Event,
    pub labels: &'a BTreeMap<String, String>,
    /// The run's secrets, sealed; stored with the run in one transaction.
    pub sealed_secrets: Option<&'a [u8]>,
    pub now: i64,
}

pub trait EventStore: Clone + Send + Sync + 'static {
    /// Creates the run with its first event, labels and sealed secrets, all
    /// or nothing, unless the owner already has a run with this idempotency
    /// key.
    fn submit(&self, run: NewRun<'_>) -> impl Future<Output = Result<Submission>> + Send;
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
    /// in some states and only those carrying every one of `labels`,
    /// `offset` into that order, at most `limit`.
    fn list(
        &self,
        owner: Option<&str>,
        states: &[RunState],
        labels: &BTreeMap<String, String>,
        offset: u64,
        limit: u64,
    ) -> impl Future<Output = Result<Vec<String>>> + Send;
    /// The run's sealed secrets, until [`EventStore::forget_secrets`].
    fn sealed_secrets(&self, run_id: &str) -> impl Future<Output = Result<Option<Vec<u8>>>> + Send;
    fn forget_secrets(&self, run_id: &str) -> impl Future<Output = Result<()>> + Send;
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
    async fn submit(&self, run: NewRun<'_>) -> Result<Submission> {
        let NewRun {
            run_id,
            owner,
            idempotency_key,
            first,
            labels,
            sealed_secrets,
            now,
        } = run;
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
        for (key, value) in labels {
            sqlx::query("INSERT INTO run_labels (run_id, key, value) VALUES ($1, $2, $3)")
                .bind(run_id)
                .bind(key)
                .bind(value)
                .execute(&mut *tx)
                .await?;
        }
        if let Some(sealed) = sealed_secrets {
            sqlx::query("INSERT INTO run_secrets (run_id, sealed) VALUES ($1, $2)")
                .bind(run_id)
                .bind(sealed)
                .execute(&mut *tx)
                .await?;
        }
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
        labels: &BTreeMap<String, String>,
        offset: u64,
        limit: u64,
    ) -> Result<Vec<String>> {
        // States are a fixed vocabulary, so they can be spelled into the SQL;
        // labels are the caller's and are bound.
        let mut sql = String::from("SELECT id FROM runs WHERE ($1 IS NULL OR owner = $1)");
        if !states.is_empty() {
            let list: Vec<String> = states.iter().map(|s| format!("'{}'", s.as_str())).collect();
            sql.push_str(&format!(" AND state IN ({})", list.join(", ")));
        }
        let mut n = 1;
        for _ in labels {
            sql.push_str(&format!(
                " AND id IN (SELECT run_id FROM run_labels WHERE key = ${} AND value = ${})",
                n + 1,
                n + 2
            ));
            n += 2;
        }
        sql.push_str(&format!(
            " ORDER BY created_unix_ms DESC, id DESC LIMIT ${} OFFSET ${}",
            n + 1,
            n + 2
        ));
        let mut query = sqlx::query(&sql).bind(owner);
        for (key, value) in labels {
            query = query.bind(key).bind(value);
        }
        let rows = query
            .bind(limit as i64)
            .bind(offset as i64)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|r| Ok(r.try_get("id")?)).collect()
    }

    async fn sealed_secrets(&self, run_id: &str) -> Result<Option<Vec<u8>>> {
        let row = sqlx::query("SELECT sealed FROM run_secrets WHERE run_id = $1")
            .bind(run_id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| r.try_get("sealed")).transpose()?)
    }

    async fn forget_secrets(&self, run_id: &str) -> Result<()> {
        sqlx::query("DELETE FROM run_secrets WHERE run_id = $1")
            .bind(run_id)
            .execute(&self.pool)
            .await?;
        Ok(())
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

    fn new_run<'a>(
        run_id: &'a str,
        owner: &'a str,
        key: &'a str,
        first: &'a Event,
        labels: &'a BTreeMap<String, String>,
        now: i64,
    ) -> NewRun<'a> {
        NewRun {
            run_id,
            owner,
            idempotency_key: key,
            first,
            labels,
            sealed_secrets: None,
            now,
        }
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
        let none = BTreeMap::new();
        assert_eq!(
            s.submit(new_run("r1", "a", "k1", &first, &none, 1))
                .await
                .unwrap(),
            Submission::Created("r1".into())
        );
        assert_eq!(
            s.submit(new_run("r2", "a", "k1", &first, &none, 2))
                .await
                .unwrap(),
            Submission::Existing("r1".into())
        );
        // Another owner's key is its own.
        assert_eq!(
            s.submit(new_run("r3", "b", "k1", &first, &none, 3))
                .await
                .unwrap(),
            Submission::Created("r3".into())
        );
        assert_eq!(s.events("r2", 1).await.unwrap(), vec![]);
    }

    #[tokio::test]
    async fn appends_are_numbered_without_gaps_or_duplicates() {
        let (_d, s) = store().await;
        let none = BTreeMap::new();
        s.submit(new_run("r1", "a", "k1", &submitted(), &none, 1))
            .await
            .unwrap();
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
    async fn list_filters_labels_before_paging() {
        let (_d, s) = store().await;
        let first = submitted();
        let ci = BTreeMap::from([("team".to_string(), "ci".to_string())]);
        let web = BTreeMap::from([
            ("team".to_string(), "web".to_string()),
            ("env".to_string(), "prod".to_string()),
        ]);
        for i in 0..6 {
            let labels = if i % 3 == 0 { &web } else { &ci };
            let (id, key) = (format!("r{i}"), format!("k{i}"));
            s.submit(new_run(&id, "a", &key, &first, labels, i))
                .await
                .unwrap();
        }
        let page = |labels: BTreeMap<String, String>, offset, limit| {
            let s = s.clone();
            async move { s.list(None, &[], &labels, offset, limit).await.unwrap() }
        };
        // The two `web` runs are found on the first page of one, then the next.
        let web_only = BTreeMap::from([("team".to_string(), "web".to_string())]);
        assert_eq!(page(web_only.clone(), 0, 1).await, ["r3"]);
        assert_eq!(page(web_only.clone(), 1, 1).await, ["r0"]);
        assert_eq!(page(web.clone(), 0, 10).await, ["r3", "r0"]);
        let nobody = BTreeMap::from([
            ("team".to_string(), "ci".to_string()),
            ("env".to_string(), "prod".to_string()),
        ]);
        assert!(page(nobody, 0, 10).await.is_empty());
        assert_eq!(page(BTreeMap::new(), 0, 10).await.len(), 6);
    }

    #[tokio::test]
    async fn sealed_secrets_are_kept_with_the_run_until_forgotten() {
        let (_d, s) = store().await;
        let first = submitted();
        let none = BTreeMap::new();
        let run = NewRun {
            sealed_secrets: Some(b"sealed bytes"),
            ..new_run("r1", "a", "k1", &first, &none, 1)
        };
        s.submit(run).await.unwrap();
        // A duplicate submit does not replace them.
        let again = NewRun {
            sealed_secrets: Some(b"other"),
            ..new_run("r2", "a", "k1", &first, &none, 2)
        };
        s.submit(again).await.unwrap();
        assert_eq!(
            s.sealed_secrets("r1").await.unwrap().as_deref(),
            Some(&b"sealed bytes"[..])
        );
        assert_eq!(s.sealed_secrets("r2").await.unwrap(), None);
        s.forget_secrets("r1").await.unwrap();
        assert_eq!(s.sealed_secrets("r1").await.unwrap(), None);
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
