//! Where run events live: [`EventStore`], and its implementation on the
//! embedded SQLite database. The SQL is plain enough for PostgreSQL, which a
//! later backend adds behind the same trait.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;

use sqlx::{Row, SqlitePool};

use crate::store::placeholders;
use tokio::sync::{mpsc, oneshot};

use super::events::{Event, RunState};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("run store: {0}")]
    Sql(#[from] sqlx::Error),
    #[error("run {run_id}: event {seq} was already written (another writer, or a replay)")]
    Conflict { run_id: String, seq: u64 },
    #[error("run store: the write failed: {0}")]
    Batch(String),
    #[error("run store: the writer has stopped")]
    Closed,
    #[error("run store: corrupt event {run_id}#{seq}: {message}")]
    Corrupt {
        run_id: String,
        seq: u64,
        message: String,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, Clone, PartialEq)]
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
    /// Deletes the sealed secrets of every finished run (a crash between a
    /// run's `finished` and [`EventStore::forget_secrets`] leaves them);
    /// answers how many runs had some.
    fn forget_finished_secrets(&self) -> impl Future<Output = Result<u64>> + Send;
    /// Stores content once under its sha256 (a second put is a no-op).
    fn put_blob(&self, sha256: &str, data: &[u8]) -> impl Future<Output = Result<()>> + Send;
    fn blob(&self, sha256: &str) -> impl Future<Output = Result<Option<Vec<u8>>>> + Send;
}

/// The event store on SQLite. Appends and blob puts go through one writer
/// task that commits whatever has queued up while the previous commit was
/// being made durable in one transaction (group commit): a commit costs one
/// fsync however many runs are writing, and each caller still hears about
/// its own write only once it is durable.
#[derive(Clone)]
pub struct SqlEvents {
    pool: SqlitePool,
    writer: mpsc::Sender<Write>,
}

/// Writes per commit at most.
pub const DEFAULT_GROUP: usize = 512;

enum Write {
    Append {
        run_id: String,
        seq: u64,
        body: String,
        state: RunState,
        now: i64,
        done: oneshot::Sender<Result<()>>,
    },
    Blob {
        sha256: String,
        data: Vec<u8>,
        done: oneshot::Sender<Result<()>>,
    },
}

impl SqlEvents {
    pub fn new(pool: SqlitePool) -> Self {
        Self::with_group(pool, DEFAULT_GROUP)
    }

    /// At most `group` writes per commit (1: a commit per write, which the
    /// benchmark uses as its baseline).
    pub fn with_group(pool: SqlitePool, group: usize) -> Self {
        let (writer, queue) = mpsc::channel(group.max(1) * 4);
        tokio::spawn(commit_loop(pool.clone(), queue, group.max(1)));
        Self { pool, writer }
    }

    async fn write(&self, w: Write, done: oneshot::Receiver<Result<()>>) -> Result<()> {
        self.writer.send(w).await.map_err(|_| Error::Closed)?;
        done.await.map_err(|_| Error::Closed)?
    }
}

/// The writer task: takes what is queued (up to `group`), writes it in one
/// transaction, commits, answers each writer, and goes again.
async fn commit_loop(pool: SqlitePool, mut queue: mpsc::Receiver<Write>, group: usize) {
    let mut batch = Vec::with_capacity(group);
    while crate::store::next_group(&mut queue, &mut batch, group).await {
        let outcomes: Vec<std::result::Result<bool, String>> =
            match write_batch(&pool, &batch).await {
                Ok(took) => took.into_iter().map(Ok).collect(),
                Err(e) => {
                    let message = e.to_string();
                    batch.iter().map(|_| Err(message.clone())).collect()
                }
            };
        for (w, outcome) in batch.drain(..).zip(outcomes) {
            let (done, run_id, seq) = match w {
                Write::Append {
                    done, run_id, seq, ..
                } => (done, run_id, seq),
                Write::Blob { done, .. } => (done, String::new(), 0),
            };
            let _ = done.send(match outcome {
                Ok(true) => Ok(()),
                Ok(false) => Err(Error::Conflict { run_id, seq }),
                Err(message) => Err(Error::Batch(message)),
            });
        }
    }
}

/// Rows per multi-row statement (4 parameters each, well under SQLite's
/// and PostgreSQL's limits).
const ROWS_PER_STATEMENT: usize = 200;

/// Writes a batch in one transaction with a handful of statements however
/// large it is; per write, whether it took (an append whose number is not
/// the next one of its run does not). An error fails the batch.
async fn write_batch(pool: &SqlitePool, batch: &[Write]) -> Result<Vec<bool>> {
    // IMMEDIATE: the write lock is taken before last_seq is read, so nobody
    // can append in between.
    let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
    let runs: BTreeSet<&str> = batch
        .iter()
        .filter_map(|w| match w {
            Write::Append { run_id, .. } => Some(run_id.as_str()),
            Write::Blob { .. } => None,
        })
        .collect();
    let mut last: HashMap<String, i64> = HashMap::new();
    let runs: Vec<&str> = runs.into_iter().collect();
    for chunk in runs.chunks(ROWS_PER_STATEMENT) {
        let sql = format!(
            "SELECT id, last_seq FROM runs WHERE id IN ({})",
            placeholders(chunk.len(), 1)
        );
        let mut q = sqlx::query(&sql);
        for id in chunk {
            q = q.bind(*id);
        }
        for row in q.fetch_all(&mut *tx).await? {
            last.insert(row.try_get("id")?, row.try_get("last_seq")?);
        }
    }
    // Decide each write in order, as if they were made one by one.
    let mut took = Vec::with_capacity(batch.len());
    let mut events = Vec::new();
    let mut blobs = Vec::new();
    let mut states: BTreeMap<&str, (i64, RunState)> = BTreeMap::new();
    for w in batch {
        match w {
            Write::Append {
                run_id, seq, state, ..
            } => {
                let seq = *seq as i64;
                let next = last.get(run_id.as_str()).is_some_and(|&l| l == seq - 1);
                if next {
                    last.insert(run_id.clone(), seq);
                    states.insert(run_id, (seq, *state));
                    events.push(w);
                }
                took.push(next);
            }
            Write::Blob { .. } => {
                blobs.push(w);
                took.push(true);
            }
        }
    }
    for chunk in blobs.chunks(ROWS_PER_STATEMENT) {
        let sql = format!(
            "INSERT INTO blobs (sha256, size, data) VALUES {} ON CONFLICT (sha256) DO NOTHING",
            placeholders(chunk.len(), 3)
        );
        let mut q = sqlx::query(&sql);
        for w in chunk {
            if let Write::Blob { sha256, data, .. } = w {
                q = q.bind(sha256).bind(data.len() as i64).bind(data);
            }
        }
        q.execute(&mut *tx).await?;
    }
    for chunk in events.chunks(ROWS_PER_STATEMENT) {
        let sql = format!(
            "INSERT INTO run_events (run_id, seq, unix_ms, body) VALUES {}",
            placeholders(chunk.len(), 4)
        );
        let mut q = sqlx::query(&sql);
        for w in chunk {
            if let Write::Append {
                run_id,
                seq,
                body,
                now,
                ..
            } = w
            {
                q = q.bind(run_id).bind(*seq as i64).bind(now).bind(body);
            }
        }
        q.execute(&mut *tx).await?;
    }
    let states: Vec<_> = states.into_iter().collect();
    for chunk in states.chunks(ROWS_PER_STATEMENT) {
        let sql = format!(
            "WITH v (id, seq, state) AS (VALUES {}) \
             UPDATE runs SET last_seq = v.seq, state = v.state FROM v WHERE runs.id = v.id",
            placeholders(chunk.len(), 3)
        );
        let mut q = sqlx::query(&sql);
        for (id, (seq, state)) in chunk {
            q = q.bind(*id).bind(*seq).bind(state.as_str());
        }
        q.execute(&mut *tx).await?;
    }
    tx.commit().await?;
    Ok(took)
}

/// One line of a page of the log: `seq unix_ms body`.
fn decode_line(run_id: &str, line: &str) -> Result<StoredEvent> {
    let corrupt = |seq: u64, message: String| Error::Corrupt {
        run_id: run_id.into(),
        seq,
        message,
    };
    let mut parts = line.splitn(3, ' ');
    let (Some(seq), Some(unix_ms), Some(body)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(corrupt(
            0,
            "a line of the log is not `seq unix_ms body`".into(),
        ));
    };
    let seq: u64 = seq
        .parse()
        .map_err(|_| corrupt(0, format!("bad sequence number {seq:?}")))?;
    Ok(StoredEvent {
        seq,
        unix_ms: unix_ms
            .parse()
            .map_err(|_| corrupt(seq, format!("bad time {unix_ms:?}")))?,
        event: serde_json::from_str(body).map_err(|e| corrupt(seq, e.to_string()))?,
    })
}

fn encode(e: &Event) -> String {
    serde_json::to_string(e).expect("events always serialize")
}

impl SqlEvents {
    /// A long run has a million events: rather than a row each (every row
    /// crosses over from the database thread on its own), the log is read
    /// in pages of `page` events, each page one row of lines
    /// `seq unix_ms body` (an encoded event never holds a raw newline), and
    /// the next page is read while this one is decoded.
    async fn events_in_pages(
        &self,
        run_id: &str,
        from_seq: u64,
        page: u64,
    ) -> Result<Vec<StoredEvent>> {
        let read =
            |from: u64| tokio::spawn(read_page(self.pool.clone(), run_id.to_string(), from, page));
        let mut out: Vec<StoredEvent> = Vec::new();
        let mut next = Some(read(from_seq));
        while let Some(reading) = next.take() {
            let lines = reading
                .await
                .map_err(|e| Error::Batch(format!("reading the log: {e}")))??;
            let Some(lines) = lines else { break };
            let count = lines.bytes().filter(|&b| b == b'\n').count() as u64 + 1;
            if count >= page {
                let last = lines.rsplit('\n').next().unwrap_or_default();
                next = Some(read(decode_line(run_id, last)?.seq + 1));
            }
            for line in lines.split('\n') {
                out.push(decode_line(run_id, line)?);
            }
        }
        Ok(out)
    }
}

/// Up to `page` events from `from`, as lines; None when there are none.
async fn read_page(
    pool: SqlitePool,
    run_id: String,
    from: u64,
    page: u64,
) -> Result<Option<String>> {
    Ok(sqlx::query_scalar(
        "SELECT string_agg(seq || ' ' || unix_ms || ' ' || body, $4 ORDER BY seq) FROM \
         (SELECT seq, unix_ms, body FROM run_events WHERE run_id = $1 AND seq >= $2 \
          ORDER BY seq LIMIT $3) AS page",
    )
    .bind(run_id)
    .bind(from as i64)
    .bind(page as i64)
    .bind("\n")
    .fetch_one(&pool)
    .await?)
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
        let (done, answer) = oneshot::channel();
        let w = Write::Append {
            run_id: run_id.to_string(),
            seq,
            body: encode(event),
            state,
            now,
            done,
        };
        self.write(w, answer).await
    }

    async fn events(&self, run_id: &str, from_seq: u64) -> Result<Vec<StoredEvent>> {
        self.events_in_pages(run_id, from_seq, 8192).await
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

    async fn forget_finished_secrets(&self) -> Result<u64> {
        let deleted = sqlx::query(
            "DELETE FROM run_secrets WHERE run_id IN (SELECT id FROM runs \
             WHERE state IN ('succeeded', 'failed', 'cancelled', 'interrupted'))",
        )
        .execute(&self.pool)
        .await?;
        Ok(deleted.rows_affected())
    }

    async fn put_blob(&self, sha256: &str, data: &[u8]) -> Result<()> {
        let (done, answer) = oneshot::channel();
        let w = Write::Blob {
            sha256: sha256.to_string(),
            data: data.to_vec(),
            done,
        };
        self.write(w, answer).await
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
            by: Default::default(),
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
            agent_boot_id: "b1".into(),
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
    async fn concurrent_writers_share_commits_and_each_hears_its_own_outcome() {
        let (_d, s) = store().await;
        let first = submitted();
        let none = BTreeMap::new();
        let runs: Vec<String> = (0..40).map(|i| format!("r{i}")).collect();
        for (i, id) in runs.iter().enumerate() {
            let key = format!("k{i}");
            s.submit(new_run(id, "a", &key, &first, &none, 1))
                .await
                .unwrap();
        }
        // Forty runs appending at once, and for each seq a second writer
        // racing the first: exactly one of each pair takes.
        let mut tasks = tokio::task::JoinSet::new();
        for id in runs.clone() {
            let s = s.clone();
            tasks.spawn(async move {
                let mut conflicts = 0;
                for seq in 2..=30u64 {
                    let e = Event::Provisioning;
                    let (a, b) = tokio::join!(
                        s.append(&id, seq, &e, RunState::Provisioning, 2),
                        s.append(&id, seq, &e, RunState::Provisioning, 2)
                    );
                    match (a, b) {
                        (Ok(()), Err(Error::Conflict { .. }))
                        | (Err(Error::Conflict { .. }), Ok(())) => conflicts += 1,
                        other => panic!("seq {seq}: {other:?}"),
                    }
                }
                conflicts
            });
        }
        while let Some(conflicts) = tasks.join_next().await {
            assert_eq!(conflicts.unwrap(), 29);
        }
        for id in &runs {
            let seqs: Vec<u64> = s
                .events(id, 1)
                .await
                .unwrap()
                .iter()
                .map(|e| e.seq)
                .collect();
            assert_eq!(seqs, (1..=30).collect::<Vec<_>>());
        }
    }

    #[tokio::test]
    async fn the_log_reads_the_same_in_pages_of_any_size() {
        let (_d, s) = store().await;
        let none = BTreeMap::new();
        s.submit(new_run("r1", "a", "k1", &submitted(), &none, 1))
            .await
            .unwrap();
        // Output with a newline, a quote and a backslash in its fields.
        for seq in 2..=10u64 {
            let e = Event::CancelRequested {
                by: "tester".into(),
                reason: format!("line {seq}\nwith \"quotes\" and \\"),
            };
            s.append("r1", seq, &e, RunState::Running, seq as i64)
                .await
                .unwrap();
        }
        let whole = s.events_in_pages("r1", 1, 1000).await.unwrap();
        assert_eq!(whole.len(), 10);
        for page in [1, 2, 3, 9, 10, 11] {
            assert_eq!(
                s.events_in_pages("r1", 1, page).await.unwrap(),
                whole,
                "page {page}"
            );
            assert_eq!(
                s.events_in_pages("r1", 4, page).await.unwrap(),
                whole[3..],
                "page {page}"
            );
        }
        assert!(s.events_in_pages("r1", 11, 3).await.unwrap().is_empty());
        assert!(s.events_in_pages("nope", 1, 3).await.unwrap().is_empty());
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
